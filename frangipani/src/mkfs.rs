//! Formatting a virtual disk, and reading the superblock back.

use crate::disk::VirtualDisk;
use crate::error::{FsError, FsResult};
use crate::fs::{Config, Frangipani};
use crate::layout::{self, Params, LOG_BASE, SMALL_BASE};
use crate::locks::MemLockService;
use crate::sector::SECTOR_BYTES;
use std::sync::Arc;

/// Reads and checks the superblock.
pub fn read_params(disk: &dyn VirtualDisk) -> FsResult<Params> {
    let b = disk.read(0, SECTOR_BYTES)?;
    Params::decode(&b).map_err(|e| FsError::Invalid(e.to_string()))
}

/// Formats `disk`: wipes the metadata regions, writes the superblock and an empty root
/// directory. Data regions need no wiping: blocks are zeroed when allocated.
pub fn mkfs(disk: Arc<dyn VirtualDisk>, mut params: Params) -> FsResult<()> {
    if params.fs_id == 0 {
        params.fs_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
    }
    params.validate().map_err(|e| FsError::Invalid(e.to_string()))?;
    disk.decommit(0, SMALL_BASE, None)?;
    debug_assert!(LOG_BASE > SECTOR_BYTES as u64);
    disk.write(0, &params.encode(), None)?;
    // Build the root with an ordinary client (slot 0, a private lock service).
    let locks = MemLockService::new().client(0);
    let fs = Frangipani::mount(disk.clone(), locks.clone(), Config::default())?;
    locks.set_callbacks(fs.callbacks());
    fs.init_root()?;
    fs.unmount()?;
    // Leave no log behind for the first real owner of slot 0.
    let (start, len) = params.log_region(0);
    crate::wal::reset(disk.as_ref(), crate::wal::LogRegion { start, len }, None)
        .map_err(|e| FsError::Io(format!("reset log: {e}")))?;
    let _ = layout::ROOT_INO;
    Ok(())
}
