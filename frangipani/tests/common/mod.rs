//! Test clusters in one process: a memory disk, an in-memory lock service, and clients.
#![allow(dead_code)]

use frangipani::disk::{DiskError, MemDisk, VirtualDisk};
use frangipani::layout::Params;
use frangipani::locks::{MemLockClient, MemLockService};
use frangipani::{Config, Frangipani};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A client's view of the shared disk that can be cut off after some number of writes,
/// as if the client crashed at that moment.
pub struct CutDisk {
    pub inner: Arc<MemDisk>,
    /// Writes still allowed (negative: unlimited).
    pub budget: AtomicI64,
}

impl CutDisk {
    pub fn new(inner: Arc<MemDisk>) -> Arc<CutDisk> {
        Arc::new(CutDisk { inner, budget: AtomicI64::new(-1) })
    }

    fn take(&self) -> Result<(), DiskError> {
        loop {
            let b = self.budget.load(Ordering::SeqCst);
            if b < 0 {
                return Ok(());
            }
            if b == 0 {
                return Err(DiskError::Io("client crashed".into()));
            }
            if self.budget.compare_exchange(b, b - 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Ok(());
            }
        }
    }
}

impl VirtualDisk for CutDisk {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        self.inner.read(offset, len)
    }
    fn write(&self, offset: u64, data: &[u8], lease: Option<u64>) -> Result<(), DiskError> {
        self.take()?;
        self.inner.write(offset, data, lease)
    }
    fn decommit(&self, offset: u64, len: u64, lease: Option<u64>) -> Result<(), DiskError> {
        self.take()?;
        self.inner.decommit(offset, len, lease)
    }
}

pub struct Cluster {
    pub disk: Arc<MemDisk>,
    pub locks: Arc<MemLockService>,
}

pub struct Client {
    pub fs: Frangipani,
    pub locks: Arc<MemLockClient>,
    pub disk: Arc<CutDisk>,
}

pub fn small_params() -> Params {
    Params { inodes: 4096, small_blocks: 8192, large_blocks: 64, log_bytes: 1 << 20, fs_id: 7 }
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::with_params(small_params())
    }

    pub fn with_params(params: Params) -> Cluster {
        let disk = Arc::new(MemDisk::new());
        frangipani::mkfs::mkfs(disk.clone(), params).expect("mkfs");
        Cluster { disk, locks: MemLockService::new() }
    }

    pub fn client(&self, slot: u32) -> Client {
        let disk = CutDisk::new(self.disk.clone());
        let locks = self.locks.client(slot);
        let config = Config { cache_bytes: 4 << 20, ..Config::default() };
        let fs = Frangipani::mount(disk.clone(), locks.clone(), config).expect("mount");
        locks.set_callbacks(fs.callbacks());
        Client { fs, locks, disk }
    }
}
