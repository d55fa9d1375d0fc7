//! The Frangipani file system library (not built yet).
