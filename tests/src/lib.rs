//! Whole clusters as real processes, for the tests of every crate and for the crash,
//! partition and power-loss suite in `tests/crash/`.
//!
//! - [`process`]: child processes killed by their own pid when dropped, free ports, logs.
//! - [`proxy`]: a TCP proxy in front of a server that can cut a link and heal it.
//! - [`netns`]: simulated hosts (network namespaces) whose links can be cut and healed.
//! - [`fuse`]: mount points (stale or not) and whether FUSE is here at all.
//! - [`servers`]: a Raft group of `petal`, `lockserver` or `raft-kv` processes; [`gfs`]: a GFS cluster.
//! - [`frangipani`]: a whole Frangipani cluster: Petal, the lock service and mounts.
//! - [`report`]: the table a suite prints at its end.
//! - [`tmpfs`]: a small data disk that fills up.

pub mod bins;
pub mod frangipani;
pub mod fuse;
pub mod gfs;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod report;
pub mod servers;
pub mod tmpfs;
