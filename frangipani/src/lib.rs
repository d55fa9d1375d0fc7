//! The Frangipani file system (Thekkath, Mann, Lee, SOSP 1997) as a library: every client
//! runs it over one shared virtual disk (Petal), keeps its caches coherent with the lock
//! service, and logs its metadata changes in its own slot of the disk so any other client
//! can replay them after a crash. No FUSE here: the `mount` crate adapts it.
//!
//! ```
//! use frangipani::{disk::MemDisk, fs::Config, layout::Params, locks::MemLockService, namespace::Caller};
//! use frangipani::{mkfs, Frangipani, ROOT_INO};
//! use std::sync::Arc;
//!
//! let disk = Arc::new(MemDisk::new());
//! mkfs::mkfs(disk.clone(), Params::default())?;
//! let locks = MemLockService::new();
//! let client = locks.client(1);
//! let fs = Frangipani::mount(disk, client.clone(), Config::default())?;
//! client.set_callbacks(fs.callbacks());
//! let f = fs.create(ROOT_INO, b"hello.txt", 0o644, 0, Caller::default())?;
//! fs.write(f.ino, 0, b"hello, world")?;
//! assert_eq!(fs.read(f.ino, 0, 100)?, b"hello, world");
//! fs.unmount()?;
//! # Ok::<(), frangipani::FsError>(())
//! ```
#![deny(missing_docs)]

pub mod cache;
pub mod clerk_locks;
pub mod dir;
pub mod disk;
mod error;
mod file;
pub mod fs;
pub mod fsck;
pub mod inode;
pub mod layout;
pub mod locks;
pub mod mkfs;
pub mod namespace;
mod orphans;
pub mod petal_disk;
pub mod recovery;
pub mod sector;
mod txn;
pub mod wal;
mod xattr;

pub use error::{FsError, FsResult};
pub use file::{SetAttr, StatFs};
pub use fs::{Config, Frangipani, Stats};
pub use fsck::FsckReport;
pub use layout::ROOT_INO;
pub use namespace::{Attr, Caller, DirItem, RenameFlags};
pub use xattr::XattrFlags;
