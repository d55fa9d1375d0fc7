//! The virtual disk the file system runs on: Petal in production, memory in tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Why a disk request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// The writer's lease had expired: the write was refused and never became visible.
    #[error("write fenced: lease expired")]
    Fenced,
    /// The disk is full.
    #[error("no space on the virtual disk")]
    NoSpace,
    /// Any other failure (unreachable service, corrupt data...).
    #[error("disk I/O failed: {0}")]
    Io(String),
}

/// A sparse 2^64-byte disk. Unwritten bytes read as zeros; each write is atomic.
pub trait VirtualDisk: Send + Sync {
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError>;
    /// Writes `data` at `offset`. `lease_expiry_ms` (unix ms) lets the disk refuse a write
    /// whose writer's lease has expired.
    fn write(&self, offset: u64, data: &[u8], lease_expiry_ms: Option<u64>) -> Result<(), DiskError>;
    /// Frees `[offset, offset+len)`: it reads as zeros afterwards. Fenced like a write.
    fn decommit(&self, offset: u64, len: u64, lease_expiry_ms: Option<u64>) -> Result<(), DiskError>;
}

/// Bytes of one page of [`MemDisk`].
const PAGE_BYTES: u64 = 4096;

/// An in-memory sparse disk for tests, which can also stop taking writes (a crash) and
/// count what it was asked.
#[derive(Default)]
pub struct MemDisk {
    pages: Mutex<BTreeMap<u64, Box<[u8; PAGE_BYTES as usize]>>>,
    /// When set, writes fail (the writer has "crashed" or lost the disk).
    frozen: std::sync::atomic::AtomicBool,
    writes: std::sync::atomic::AtomicU64,
}

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// Makes every later write fail, as if the writer had crashed.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes done so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Pages holding data.
    pub fn pages(&self) -> usize {
        self.pages.lock().unwrap().len()
    }
}

impl VirtualDisk for MemDisk {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let pages = self.pages.lock().unwrap();
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE_BYTES, (at % PAGE_BYTES) as usize);
            let n = (PAGE_BYTES as usize - within).min(len - done);
            if let Some(p) = pages.get(&page) {
                out[done..done + n].copy_from_slice(&p[within..within + n]);
            }
            done += n;
        }
        Ok(out)
    }

    fn write(&self, offset: u64, data: &[u8], _lease_expiry_ms: Option<u64>) -> Result<(), DiskError> {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DiskError::Io("disk frozen".into()));
        }
        self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut pages = self.pages.lock().unwrap();
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE_BYTES, (at % PAGE_BYTES) as usize);
            let n = (PAGE_BYTES as usize - within).min(data.len() - done);
            let p = pages.entry(page).or_insert_with(|| Box::new([0; PAGE_BYTES as usize]));
            p[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn decommit(&self, offset: u64, len: u64, _lease_expiry_ms: Option<u64>) -> Result<(), DiskError> {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DiskError::Io("disk frozen".into()));
        }
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let mut pages = self.pages.lock().unwrap();
        // Only pages that hold data matter: walk those in the range.
        let touched: Vec<u64> = pages
            .range(offset / PAGE_BYTES..=(end.saturating_sub(1)) / PAGE_BYTES)
            .map(|(p, _)| *p)
            .collect();
        for page in touched {
            let start = page * PAGE_BYTES;
            let (from, to) = (offset.max(start), end.min(start + PAGE_BYTES));
            if from == start && to == start + PAGE_BYTES {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[(from - start) as usize..(to - start) as usize].fill(0);
            }
        }
        Ok(())
    }
}
