//! The FUSE adapter of the Frangipani file system: a fuser [`Filesystem`](fuser::Filesystem)
//! over the `frangipani` library ([`fuse`]), the kernel cache invalidations that keep a
//! mount coherent with the other machines ([`notify`]), and mounting, unmounting and
//! signal handling ([`mounter`]). The `frangipani` binary is built on these.
//!
//! Mounting a fresh in-memory file system at a directory until Ctrl-C:
//!
//! ```no_run
//! use frangipani::{disk::MemDisk, layout::Params, locks::MemLockService, mkfs};
//! use mount::mounter::{MountOptions, Signals, Supervisor};
//! use std::sync::Arc;
//!
//! let signals = Signals::block()?; // first: every thread started later inherits the mask
//! let disk = Arc::new(MemDisk::new());
//! mkfs::mkfs(disk.clone(), Params::default())?;
//! let locks = MemLockService::new().client(1);
//! let mut supervisor = Supervisor::new(signals)?;
//! let dir = std::path::Path::new("/mnt/frangipani");
//! supervisor.mount(disk, locks.clone(), |cb| locks.set_callbacks(cb), dir, &MountOptions::default())?;
//! supervisor.run()?; // until SIGINT/SIGTERM, then unmounted and written back
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod filelock;
pub mod fuse;
pub mod mounter;
pub mod notify;
pub mod status;
