//! GFS mode: master, chunkservers and client (not built yet).
