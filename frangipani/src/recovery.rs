//! Recovering a dead client: replay its log slot onto the disk (only records newer than
//! what the disk holds), then reset the slot for its next owner.

use crate::disk::VirtualDisk;
use crate::error::{FsError, FsResult};
use crate::layout::Params;
use crate::wal::{self, LogRegion};

/// Replays the log of `slot` and resets it; returns how many sectors were written.
/// The caller holds the slot's lock (its owner is dead or is us), so nobody else writes
/// the sectors the log covers meanwhile.
pub fn recover_slot(
    disk: &dyn VirtualDisk,
    params: &Params,
    slot: u32,
    lease_expiry_ms: Option<u64>,
) -> FsResult<usize> {
    let (start, len) = params.log_region(slot);
    let region = LogRegion { start, len };
    let records =
        wal::read_log(disk, region).map_err(|e| FsError::Io(format!("read log of slot {slot}: {e}")))?;
    if records.is_empty() {
        return Ok(0);
    }
    let written = wal::replay(disk, &records, lease_expiry_ms)
        .map_err(|e| FsError::Io(format!("replay slot {slot}: {e}")))?;
    wal::reset(disk, region, lease_expiry_ms).map_err(|e| FsError::Io(format!("reset slot {slot}: {e}")))?;
    tracing::info!(slot, records = records.len(), sectors = written, "recovered log");
    Ok(written)
}
