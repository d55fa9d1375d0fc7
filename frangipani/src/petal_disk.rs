//! The production [`VirtualDisk`]: a Petal virtual disk through the blocking client.
//! Requests longer than Petal's bound on one request are split (each piece stays atomic;
//! the log writes in 512-byte blocks that are each self-checking, so that is enough).

use crate::disk::{DiskError, VirtualDisk};
use petal::{BlockingClient, PetalError};

/// Bytes per request to Petal (its default bound).
const REQUEST_BYTES_MAX: u64 = petal::service::MAX_IO_BYTES_DEFAULT;

/// One Petal virtual disk.
pub struct PetalDisk {
    client: BlockingClient,
    disk: String,
}

impl PetalDisk {
    /// The disk named `disk` through `client`.
    pub fn new(client: BlockingClient, disk: impl Into<String>) -> PetalDisk {
        PetalDisk { client, disk: disk.into() }
    }

    /// The client underneath.
    pub fn client(&self) -> &BlockingClient {
        &self.client
    }
}

fn disk_error(e: PetalError) -> DiskError {
    match e {
        PetalError::Fenced { .. } => DiskError::Fenced,
        PetalError::Unavailable(m) if m.contains("space") => DiskError::NoSpace,
        other => DiskError::Io(other.to_string()),
    }
}

/// Splits `[offset, offset + len)` into pieces of at most the request bound.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = (end - at).min(REQUEST_BYTES_MAX);
        let piece = (at, n);
        at += n;
        Some(piece)
    })
}

impl VirtualDisk for PetalDisk {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let mut out = Vec::with_capacity(len);
        for (at, n) in pieces(offset, len as u64) {
            out.extend(self.client.read(&self.disk, at, n).map_err(disk_error)?);
        }
        Ok(out)
    }

    fn write(&self, offset: u64, data: &[u8], lease_expiry_ms: Option<u64>) -> Result<(), DiskError> {
        for (at, n) in pieces(offset, data.len() as u64) {
            let from = (at - offset) as usize;
            self.client
                .write(&self.disk, at, &data[from..from + n as usize], lease_expiry_ms)
                .map_err(disk_error)?;
        }
        Ok(())
    }

    fn decommit(&self, offset: u64, len: u64, lease_expiry_ms: Option<u64>) -> Result<(), DiskError> {
        // Decommit is metadata on Petal: one request covers any range.
        self.client.decommit(&self.disk, offset, len, lease_expiry_ms).map_err(disk_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_split_at_the_bound() {
        let p: Vec<_> = pieces(10, 2 * REQUEST_BYTES_MAX + 5).collect();
        assert_eq!(
            p,
            vec![
                (10, REQUEST_BYTES_MAX),
                (10 + REQUEST_BYTES_MAX, REQUEST_BYTES_MAX),
                (10 + 2 * REQUEST_BYTES_MAX, 5)
            ]
        );
        assert_eq!(pieces(7, 0).count(), 0);
    }
}
