//! The FUSE adapter and the `frangipani` command (not built yet).
