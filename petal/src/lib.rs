//! Petal: the replicated virtual disk service (not built yet).
