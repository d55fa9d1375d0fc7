//! The lock service: Raft-replicated lock table with leases, and the clerk (not built yet).
