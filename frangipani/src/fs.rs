//! A mounted Frangipani client: its caches, its log, its locks, the background writeback,
//! and the callbacks the lock service makes into it.

use crate::cache::{Cache, PAGE_BYTES};
use crate::disk::VirtualDisk;
use crate::error::{FsError, FsResult};
use crate::inode::Inode;
use crate::layout::{self, Bitmap, Params};
use crate::locks::{LockCallbacks, LockName, Locks, Mode};
use crate::sector::{Sector, SECTOR_BYTES};
use crate::wal::{self, LogRegion, SectorUpdate, Wal};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How a client behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes of cached metadata and data.
    pub cache_bytes: usize,
    /// How often the log is group-committed in the background.
    pub log_flush_interval: Duration,
    /// How often dirty metadata and data are written back in the background.
    pub writeback_interval: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            cache_bytes: 256 << 20,
            log_flush_interval: Duration::from_secs(1),
            writeback_interval: Duration::from_secs(30),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot of a client's cache and log ([`Frangipani::stats`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Metadata sectors cached ([`crate::sector::SECTOR_BYTES`] each).
    pub meta_sectors: usize,
    /// File data pages cached ([`crate::cache::PAGE_BYTES`] each).
    pub data_pages: usize,
    /// Cached metadata sectors not yet written back.
    pub dirty_meta_sectors: usize,
    /// Cached data pages not yet written back.
    pub dirty_data_pages: usize,
    /// The fraction of the client's log slot in use (0 to 1).
    pub log_used_fraction: f64,
}

/// The shared state of a mounted client.
pub(crate) struct Inner {
    pub(crate) disk: Arc<dyn VirtualDisk>,
    pub(crate) locks: Arc<dyn Locks>,
    pub(crate) params: Params,
    pub(crate) slot: u32,
    pub(crate) cache: Mutex<Cache>,
    wal: Mutex<Wal>,
    segment_hint: [AtomicU64; 3],
    lease_lost: AtomicBool,
    /// Open handles per inode on this client.
    pub(crate) open: Mutex<HashMap<u64, u32>>,
    /// Serializes write-backs (background, fsync, log reclaim, revocation), so a write-back
    /// never lands after a revocation has handed the lock to another client.
    writeback: Mutex<()>,
    /// Freed blocks to zero on the disk (returning Petal space) once the free is durable,
    /// and before their bitmap segment's lock leaves this client. Allocating one again
    /// cancels it.
    pending_decommits: Mutex<BTreeSet<(Bitmap, u64)>>,
}

/// Most metadata sectors written back in one disk write.
const META_RUN_SECTORS_MAX: usize = 2048;

/// How full the log may get before the metadata it covers is written back and it is trimmed.
const LOG_RECLAIM_FRACTION: f64 = 0.75;

impl Inner {
    pub(crate) fn lease_lost(&self) -> bool {
        self.lease_lost.load(Ordering::SeqCst)
    }

    /// The lease expiry every disk write of this client carries, so that Petal refuses it
    /// once the lease has run out. Refused here once the lease is known lost: by then
    /// another client may have recovered our log and changed what our cache covers, so
    /// nothing in the cache may reach the disk any more (write-back, log, decommits).
    pub(crate) fn lease_expiry(&self) -> FsResult<Option<u64>> {
        if self.lease_lost() {
            return Err(FsError::LeaseLost);
        }
        Ok(self.locks.lease_expiry_ms())
    }

    pub(crate) fn preferred_segment(&self, b: Bitmap) -> u64 {
        self.segment_hint[b as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn defer_decommits(&self, units: Vec<(Bitmap, u64)>) {
        if !units.is_empty() {
            lock(&self.pending_decommits).extend(units);
        }
    }

    pub(crate) fn cancel_decommit(&self, b: Bitmap, unit: u64) {
        lock(&self.pending_decommits).remove(&(b, unit));
    }

    /// Zeroes freed blocks whose frees are durable: those of one segment, or all.
    fn run_decommits(&self, segment: Option<(u8, u64)>) -> FsResult<()> {
        let mut pending = lock(&self.pending_decommits);
        let due: Vec<(Bitmap, u64)> = pending
            .iter()
            .copied()
            .filter(|(b, unit)| {
                segment.is_none_or(|(sb, seg)| *b as u8 == sb && layout::segment_of(*unit) == seg)
            })
            .collect();
        for (b, unit) in due {
            let (addr, len) = match b {
                Bitmap::Small => (layout::small_block_addr(unit), layout::SMALL_BLOCK_BYTES),
                _ => (layout::large_block_addr(unit), layout::LARGE_BLOCK_BYTES),
            };
            self.disk.decommit(addr, len, self.lease_expiry()?)?;
            pending.remove(&(b, unit));
        }
        Ok(())
    }

    /// Retires freed metadata blocks: makes the log durable, writes their dirty sectors
    /// back (so the disk holds versions at least as new as any logged one) and forgets
    /// them. Whoever reuses a block then starts from those versions, and no log record
    /// can be replayed over the block's new content.
    pub(crate) fn retire(&self, ranges: &[(u64, u64)]) -> FsResult<()> {
        let _wb = lock(&self.writeback);
        self.flush_log()?;
        let taken = lock(&self.cache).take_meta_ranges(ranges);
        for (addr, sector, dirty) in taken {
            if dirty {
                self.disk.write(addr, sector.bytes(), self.lease_expiry()?)?;
            }
        }
        Ok(())
    }

    pub(crate) fn reset_segment_hints(&self) {
        for h in &self.segment_hint {
            h.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn note_segment(&self, b: Bitmap, seg: u64) {
        self.segment_hint[b as usize].store(seg, Ordering::Relaxed);
    }

    /// A metadata sector, from the cache or the disk (then cached clean under `lock`).
    pub(crate) fn read_sector(&self, addr: u64, lock_name: &LockName) -> FsResult<Sector> {
        if let Some(e) = lock(&self.cache).meta(addr) {
            return Ok(e.sector.clone());
        }
        let bytes = self.disk.read(addr, SECTOR_BYTES)?;
        let s = Sector::from_bytes(&bytes);
        let mut cache = lock(&self.cache);
        // Another thread may have cached (or dirtied) it meanwhile: keep theirs.
        if let Some(e) = cache.meta(addr) {
            return Ok(e.sector.clone());
        }
        cache.put_meta(addr, lock_name.clone(), s.clone(), None);
        Ok(s)
    }

    /// Appends a transaction's record to the log and installs its sectors as dirty.
    pub(crate) fn log_and_cache(
        &self,
        updates: Vec<SectorUpdate>,
        staged: Vec<(u64, LockName, Sector)>,
    ) -> FsResult<()> {
        let mut wal = lock(&self.wal);
        let seq = match wal.append(updates.clone()) {
            Ok(seq) => seq,
            Err(wal::WalError::Full) => {
                drop(wal);
                self.reclaim_log()?;
                wal = lock(&self.wal);
                wal.append(updates).map_err(wal_error)?
            }
            Err(e) => return Err(wal_error(e)),
        };
        // Installed while the log is still locked, so a reclaim that sees this record
        // durable also sees these sectors dirty.
        {
            let mut cache = lock(&self.cache);
            for (addr, lock_name, sector) in staged {
                cache.put_meta(addr, lock_name, sector, Some(seq));
            }
        }
        let full = wal.used_fraction() >= LOG_RECLAIM_FRACTION;
        drop(wal);
        if full {
            self.reclaim_log()?;
        }
        Ok(())
    }

    /// Frees log space once it is three quarters full: makes the log durable, writes back
    /// the metadata it covers, and trims it.
    fn reclaim_log(&self) -> FsResult<()> {
        let _wb = lock(&self.writeback);
        let durable = self.flush_log()?;
        self.write_back_meta(None, durable)?;
        lock(&self.wal).trim_to(durable);
        Ok(())
    }

    /// Group-commits the log.
    pub(crate) fn flush_log(&self) -> FsResult<u64> {
        let lease = self.lease_expiry()?;
        let mut wal = lock(&self.wal);
        wal.flush(self.disk.as_ref(), lease).map_err(wal_error)
    }

    /// Writes back dirty metadata (under `lock_name`, or all) whose records are durable up
    /// to `durable`.
    fn write_back_meta(&self, lock_name: Option<&LockName>, durable: u64) -> FsResult<()> {
        // Its record not durable yet, a sector stays dirty.
        let mut dirty: Vec<(u64, Sector)> = lock(&self.cache)
            .dirty_meta(lock_name)
            .into_iter()
            .filter(|(_, _, seq)| *seq <= durable)
            .map(|(addr, sector, _)| (addr, sector))
            .collect();
        dirty.sort_unstable_by_key(|(addr, _)| *addr);
        // Sectors that are neighbours on the disk (inodes made one after another, a
        // directory's nodes) go out in one write.
        let mut i = 0;
        while i < dirty.len() {
            let mut j = i + 1;
            while j < dirty.len()
                && dirty[j].0 == dirty[j - 1].0 + SECTOR_BYTES as u64
                && j - i < META_RUN_SECTORS_MAX
            {
                j += 1;
            }
            let mut buf = Vec::with_capacity((j - i) * SECTOR_BYTES);
            for (_, sector) in &dirty[i..j] {
                buf.extend_from_slice(sector.bytes());
            }
            self.disk.write(dirty[i].0, &buf, self.lease_expiry()?)?;
            let mut cache = lock(&self.cache);
            for (addr, sector) in &dirty[i..j] {
                cache.meta_written(*addr, sector.version());
            }
            i = j;
        }
        Ok(())
    }

    /// Writes back dirty pages of `ino` (or of every inode).
    fn write_back_pages(&self, ino: Option<u64>) -> FsResult<()> {
        let pages = lock(&self.cache).dirty_pages(ino);
        let mut i = 0;
        while i < pages.len() {
            let (ino, first, _) = pages[i];
            let inode = self.cached_inode(ino)?;
            let Some(addr) = page_addr(&inode, first) else {
                // The page lies in a hole that was freed (truncate): nothing to keep.
                lock(&self.cache).forget_page(ino, first);
                i += 1;
                continue;
            };
            // Coalesce pages that are contiguous on the disk into one write.
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].0 == ino
                && pages[j].1 == pages[j - 1].1 + 1
                && page_addr(&inode, pages[j].1) == Some(addr + (pages[j].1 - first) * PAGE_BYTES as u64)
                && (j - i) < 256
            {
                j += 1;
            }
            let mut buf = Vec::with_capacity((j - i) * PAGE_BYTES);
            for (_, _, bytes) in &pages[i..j] {
                buf.extend_from_slice(&bytes[..]);
            }
            self.disk.write(addr, &buf, self.lease_expiry()?)?;
            let mut cache = lock(&self.cache);
            for (ino, page, bytes) in &pages[i..j] {
                cache.page_written(*ino, *page, bytes);
            }
            i = j;
        }
        Ok(())
    }

    /// A bitmap's bits as this client sees them: the disk, overlaid with cached sectors
    /// (which may be newer: their changes still in the log). Bit `i` is bit `i % 8` of
    /// byte `i / 8`, as in the sectors' payloads.
    pub(crate) fn bitmap_snapshot(&self, b: Bitmap) -> FsResult<Vec<u8>> {
        let sectors = self.params.bits(b).div_ceil(layout::BITS_PER_SECTOR);
        let (start, _) = layout::bitmap_sector(b, 0);
        let raw = self.disk.read(start, sectors as usize * SECTOR_BYTES)?;
        let mut cache = lock(&self.cache);
        let mut out = Vec::with_capacity(sectors as usize * crate::sector::PAYLOAD_BYTES);
        for (i, on_disk) in raw.chunks(SECTOR_BYTES).enumerate() {
            let addr = start + (i * SECTOR_BYTES) as u64;
            match cache.meta(addr) {
                Some(e) => out.extend_from_slice(e.sector.payload()),
                None => out.extend_from_slice(&on_disk[crate::sector::VERSION_BYTES..]),
            }
        }
        Ok(out)
    }

    /// The inode as this client knows it (cache, else disk).
    pub(crate) fn cached_inode(&self, ino: u64) -> FsResult<Inode> {
        let s = self.read_sector(layout::inode_addr(ino), &LockName::Inode(ino))?;
        Inode::decode(&s).map_err(|e| FsError::Corrupt(format!("inode {ino}: {e}")))
    }

    /// Writes back everything a lock covers (or everything): data pages, then the log,
    /// then the metadata.
    pub(crate) fn write_back(&self, lock_name: Option<&LockName>) -> FsResult<()> {
        let _wb = lock(&self.writeback);
        self.write_back_locked(lock_name)
    }

    fn write_back_locked(&self, lock_name: Option<&LockName>) -> FsResult<()> {
        match lock_name {
            Some(LockName::Inode(ino)) => self.write_back_pages(Some(*ino))?,
            Some(_) => {}
            None => self.write_back_pages(None)?,
        }
        let durable = self.flush_log()?;
        self.write_back_meta(lock_name, durable)?;
        match lock_name {
            Some(LockName::Segment(b, seg)) => self.run_decommits(Some((*b, *seg))),
            Some(_) => Ok(()),
            None => self.run_decommits(None),
        }
    }

    /// Evicts pages beyond the cache bound, writing dirty ones back first.
    pub(crate) fn trim_pages(&self) -> FsResult<()> {
        if !lock(&self.cache).pages_over_budget() {
            return Ok(());
        }
        let _wb = lock(&self.writeback);
        // Write every dirty page back in large runs first, so evicting costs no small writes.
        self.write_back_pages(None)?;
        let victims = lock(&self.cache).over_budget_pages();
        for (ino, page, dirty) in victims {
            if let Some(bytes) = dirty {
                let inode = self.cached_inode(ino)?;
                if let Some(addr) = page_addr(&inode, page) {
                    self.disk.write(addr, &bytes[..], self.lease_expiry()?)?;
                }
            }
            lock(&self.cache).forget_page(ino, page);
        }
        Ok(())
    }
}

/// Where page `page` of a file lives, if allocated.
pub(crate) fn page_addr(inode: &Inode, page: u64) -> Option<u64> {
    let offset = page * PAGE_BYTES as u64;
    if offset < layout::SMALL_LIMIT {
        let b = inode.small[page as usize];
        (b != 0).then(|| layout::small_block_addr(b - 1))
    } else {
        (inode.large != 0 && offset < layout::LARGE_BLOCK_BYTES)
            .then(|| layout::large_block_addr(inode.large - 1) + offset)
    }
}

fn wal_error(e: wal::WalError) -> FsError {
    match e {
        wal::WalError::Disk(d) => d.into(),
        other => FsError::Io(format!("log: {other}")),
    }
}

impl LockCallbacks for Inner {
    fn revoke(&self, name: &LockName, wanted: Mode) {
        let _wb = lock(&self.writeback);
        match self.write_back_locked(Some(name)) {
            Ok(()) if wanted == Mode::Exclusive => lock(&self.cache).drop_lock(name),
            Ok(()) => {}
            Err(e) => {
                // Nothing else can be done: the lock must go, and if it goes for good, what
                // stayed dirty (all of it, once the lease is lost) goes with it. Recovery of
                // our log (if we crash) or the next writer sees the last durable state.
                let lost = if wanted == Mode::Exclusive { lock(&self.cache).discard_lock(name) } else { 0 };
                tracing::error!(lock = %name, dirty_sectors_lost = lost, "write-back on revoke failed: {e}");
            }
        }
    }

    fn recover(&self, slot: u32) -> Result<(), String> {
        let recovered = self
            .lease_expiry()
            .and_then(|lease| crate::recovery::recover_slot(self.disk.as_ref(), &self.params, slot, lease));
        match recovered {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(slot, "recovery failed: {e}");
                Err(e.to_string())
            }
        }
    }

    fn lease_lost(&self) {
        tracing::error!("lock lease lost: refusing writes until remounted");
        self.lease_lost.store(true, Ordering::SeqCst);
    }
}

/// A mounted client of a Frangipani file system.
pub struct Frangipani {
    pub(crate) inner: Arc<Inner>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Frangipani {
    /// Mounts the file system on `disk`, taking locks from `locks`. Recovers this client's
    /// own slot first if a previous owner left a log in it.
    pub fn mount(disk: Arc<dyn VirtualDisk>, locks: Arc<dyn Locks>, config: Config) -> FsResult<Frangipani> {
        let params = crate::mkfs::read_params(disk.as_ref())?;
        let slot = locks.slot();
        if slot >= layout::LOG_SLOTS {
            return Err(FsError::Invalid(format!("log slot {slot} out of range")));
        }
        locks.acquire(&LockName::Slot(slot), Mode::Exclusive)?;
        let (start, len) = params.log_region(slot);
        let region = LogRegion { start, len };
        crate::recovery::recover_slot(disk.as_ref(), &params, slot, locks.lease_expiry_ms())?;
        let wal = Wal::open(disk.as_ref(), region).map_err(wal_error)?;
        let seg = |b: Bitmap| AtomicU64::new((slot as u64 * 7) % params.segments(b).max(1));
        let inner = Arc::new(Inner {
            segment_hint: [seg(Bitmap::Inodes), seg(Bitmap::Small), seg(Bitmap::Large)],
            disk,
            locks,
            params,
            slot,
            cache: Mutex::new(Cache::new(config.cache_bytes)),
            wal: Mutex::new(wal),
            lease_lost: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            writeback: Mutex::new(()),
            pending_decommits: Mutex::new(BTreeSet::new()),
        });
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flusher = {
            let inner = Arc::downgrade(&inner);
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("frangipani-flush-{slot}"))
                .spawn(move || background(inner, stop, config))
                .map_err(|e| FsError::Io(format!("start flusher: {e}")))?
        };
        let fs = Frangipani { inner, stop, flusher: Some(flusher) };
        fs.free_leftover_orphans()?;
        Ok(fs)
    }

    /// The callbacks to hand to the lock service's clerk.
    pub fn callbacks(&self) -> std::sync::Weak<dyn LockCallbacks> {
        let inner: Arc<dyn LockCallbacks> = self.inner.clone();
        Arc::downgrade(&inner)
    }

    /// This client's log slot.
    pub fn slot(&self) -> u32 {
        self.inner.slot
    }

    /// The file system's parameters.
    pub fn params(&self) -> &Params {
        &self.inner.params
    }

    /// Makes every change so far durable: data, log and metadata.
    pub fn sync(&self) -> FsResult<()> {
        self.inner.write_back(None)
    }

    /// Whether the lease was lost (writes refused until remount).
    pub fn is_lease_lost(&self) -> bool {
        self.inner.lease_lost()
    }

    /// Cached (metadata sectors, data pages).
    pub fn cache_sizes(&self) -> (usize, usize) {
        lock(&self.inner.cache).sizes()
    }

    /// What the client caches and how full its log is, for status displays.
    pub fn stats(&self) -> Stats {
        let (meta_sectors, data_pages, dirty_meta_sectors, dirty_data_pages) = {
            let cache = lock(&self.inner.cache);
            let (meta, data) = cache.sizes();
            (meta, data, cache.dirty_meta_count(), cache.dirty_page_count())
        };
        Stats {
            meta_sectors,
            data_pages,
            dirty_meta_sectors,
            dirty_data_pages,
            log_used_fraction: lock(&self.inner.wal).used_fraction(),
        }
    }

    /// Writes everything back and stops the background flusher.
    pub fn unmount(mut self) -> FsResult<()> {
        self.stop_flusher();
        self.inner.write_back(None)
    }

    /// Stops at once without writing anything back, as a crash would (tests).
    pub fn crash(mut self) {
        self.inner.lease_lost.store(true, Ordering::SeqCst);
        self.stop_flusher();
    }

    fn stop_flusher(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Frangipani {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

fn background(inner: std::sync::Weak<Inner>, stop: Arc<(Mutex<bool>, Condvar)>, config: Config) {
    let mut since_writeback = Duration::ZERO;
    loop {
        {
            let stopped = lock(&stop.0);
            let (stopped, _) = stop
                .1
                .wait_timeout_while(stopped, config.log_flush_interval, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.lease_lost() {
            continue;
        }
        since_writeback += config.log_flush_interval;
        let result = if since_writeback >= config.writeback_interval {
            since_writeback = Duration::ZERO;
            inner.write_back(None)
        } else {
            inner.flush_log().map(|_| ())
        };
        if let Err(e) = result {
            tracing::warn!("background write-back failed: {e}");
        }
    }
}
