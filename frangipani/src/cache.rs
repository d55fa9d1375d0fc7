//! The client's caches, bounded in bytes: metadata sectors and file data pages, each
//! filed under the lock that covers it so a revocation can write back and drop exactly
//! what the lock covers.
//!
//! Dirty metadata carries the sequence number of the log record that describes it: it
//! may be written back only once that record is durable (write-ahead logging).

use crate::locks::LockName;
use crate::sector::{Sector, SECTOR_BYTES};
use lru::LruCache;
use std::collections::{HashMap, HashSet};

/// Bytes of a data page.
pub const PAGE_BYTES: usize = 4096;

/// The bytes of one data page.
pub type PageBytes = Box<[u8; PAGE_BYTES]>;

/// A cached metadata sector.
#[derive(Clone, Debug)]
pub struct MetaEntry {
    /// The sector as this client last saw or wrote it.
    pub sector: Sector,
    /// The lock that covers it.
    pub lock: LockName,
    /// Set while not yet written back: the log record describing the change.
    pub dirty_seq: Option<u64>,
}

/// A cached page of file data.
#[derive(Clone, Debug)]
pub struct DataPage {
    /// The page's bytes.
    pub bytes: Box<[u8; PAGE_BYTES]>,
    /// Not yet written back.
    pub dirty: bool,
}

/// Both caches; the caller keeps them behind one mutex.
pub struct Cache {
    meta: HashMap<u64, MetaEntry>,
    meta_by_lock: HashMap<LockName, HashSet<u64>>,
    meta_lru: LruCache<u64, ()>,
    meta_max: usize,
    data: HashMap<(u64, u64), DataPage>,
    data_by_ino: HashMap<u64, HashSet<u64>>,
    data_lru: LruCache<(u64, u64), ()>,
    data_max: usize,
}

impl Cache {
    /// A cache holding at most about `bytes` (a quarter for metadata).
    pub fn new(bytes: usize) -> Cache {
        let meta_max = (bytes / 4 / SECTOR_BYTES).max(1024);
        let data_max = (bytes * 3 / 4 / PAGE_BYTES).max(64);
        Cache {
            meta: HashMap::new(),
            meta_by_lock: HashMap::new(),
            meta_lru: LruCache::unbounded(),
            meta_max,
            data: HashMap::new(),
            data_by_ino: HashMap::new(),
            data_lru: LruCache::unbounded(),
            data_max,
        }
    }

    /// A cached sector.
    pub fn meta(&mut self, addr: u64) -> Option<&MetaEntry> {
        self.meta_lru.get(&addr);
        self.meta.get(&addr)
    }

    /// Caches a sector (clean, or dirty with its log record).
    pub fn put_meta(&mut self, addr: u64, lock: LockName, sector: Sector, dirty_seq: Option<u64>) {
        // A sector stays dirty until written back, even if re-cached clean meanwhile.
        let dirty_seq = match (self.meta.get(&addr).and_then(|e| e.dirty_seq), dirty_seq) {
            (Some(old), None) => Some(old),
            (_, new) => new,
        };
        self.meta_by_lock.entry(lock.clone()).or_default().insert(addr);
        self.meta.insert(addr, MetaEntry { sector, lock, dirty_seq });
        self.meta_lru.put(addr, ());
        self.evict_meta();
    }

    fn evict_meta(&mut self) {
        let mut skipped = Vec::new();
        while self.meta.len() > self.meta_max {
            let Some((addr, ())) = self.meta_lru.pop_lru() else { break };
            match self.meta.get(&addr) {
                Some(e) if e.dirty_seq.is_some() => skipped.push(addr),
                Some(_) => self.remove_meta(addr),
                None => {}
            }
        }
        for addr in skipped {
            self.meta_lru.put(addr, ());
        }
    }

    fn remove_meta(&mut self, addr: u64) {
        if let Some(e) = self.meta.remove(&addr) {
            if let Some(set) = self.meta_by_lock.get_mut(&e.lock) {
                set.remove(&addr);
                if set.is_empty() {
                    self.meta_by_lock.remove(&e.lock);
                }
            }
        }
        self.meta_lru.pop(&addr);
    }

    /// Dirty sectors, optionally only those under `lock`: (addr, sector, log seq).
    pub fn dirty_meta(&self, lock: Option<&LockName>) -> Vec<(u64, Sector, u64)> {
        let pick = |addr: &u64| {
            let e = &self.meta[addr];
            e.dirty_seq.map(|seq| (*addr, e.sector.clone(), seq))
        };
        match lock {
            Some(l) => self.meta_by_lock.get(l).map_or(Vec::new(), |s| s.iter().filter_map(pick).collect()),
            None => self.meta.keys().filter_map(pick).collect(),
        }
    }

    /// Marks a sector clean if it still holds what was written back.
    pub fn meta_written(&mut self, addr: u64, version: u64) {
        if let Some(e) = self.meta.get_mut(&addr) {
            if e.sector.version() == version {
                e.dirty_seq = None;
            }
        }
    }

    /// Drops every sector under `lock` (they must be clean).
    pub fn drop_lock(&mut self, lock: &LockName) {
        let dirty = self.discard_lock(lock);
        debug_assert!(dirty == 0, "dropped {dirty} dirty sectors of {lock}");
    }

    /// Drops every sector and page under `lock`, dirty or not (their write-back failed and
    /// the lock must go); returns how many dirty sectors were lost.
    pub fn discard_lock(&mut self, lock: &LockName) -> usize {
        let mut dirty = 0;
        if let Some(addrs) = self.meta_by_lock.remove(lock) {
            for addr in addrs {
                if self.meta.remove(&addr).is_some_and(|e| e.dirty_seq.is_some()) {
                    dirty += 1;
                }
                self.meta_lru.pop(&addr);
            }
        }
        if let LockName::Inode(ino) = lock {
            self.drop_data(*ino);
        }
        dirty
    }

    /// Removes every cached sector whose address lies in one of `ranges` (start, len):
    /// (addr, sector, whether it was dirty).
    pub fn take_meta_ranges(&mut self, ranges: &[(u64, u64)]) -> Vec<(u64, Sector, bool)> {
        let addrs: Vec<u64> = self
            .meta
            .keys()
            .copied()
            .filter(|a| ranges.iter().any(|(s, l)| *a >= *s && *a - *s < *l))
            .collect();
        let mut out = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(e) = self.meta.get(&addr) {
                out.push((addr, e.sector.clone(), e.dirty_seq.is_some()));
            }
            self.remove_meta(addr);
        }
        out
    }

    /// Number of dirty metadata sectors.
    pub fn dirty_meta_count(&self) -> usize {
        self.meta.values().filter(|e| e.dirty_seq.is_some()).count()
    }

    // ---- data ----

    /// A cached page of inode `ino`.
    pub fn page(&mut self, ino: u64, page: u64) -> Option<&mut DataPage> {
        self.data_lru.get(&(ino, page));
        self.data.get_mut(&(ino, page))
    }

    /// Caches a page.
    pub fn put_page(&mut self, ino: u64, page: u64, p: DataPage) {
        self.data_by_ino.entry(ino).or_default().insert(page);
        self.data.insert((ino, page), p);
        self.data_lru.put((ino, page), ());
    }

    /// Whether more pages are cached than the bound allows.
    pub fn pages_over_budget(&self) -> bool {
        self.data.len() > self.data_max
    }

    /// Pages to evict to respect the bound: the caller writes back the dirty ones first
    /// (it needs the disk), then calls [`Cache::forget_page`].
    pub fn over_budget_pages(&mut self) -> Vec<(u64, u64, Option<PageBytes>)> {
        let mut out = Vec::new();
        let mut n = self.data.len();
        let mut lru: Vec<(u64, u64)> = Vec::new();
        while n > self.data_max {
            let Some((key, ())) = self.data_lru.pop_lru() else { break };
            lru.push(key);
            n -= 1;
        }
        for key in lru {
            if let Some(p) = self.data.get(&key) {
                out.push((key.0, key.1, p.dirty.then(|| p.bytes.clone())));
            }
        }
        out
    }

    /// Forgets a page (after writing it back if it was dirty).
    pub fn forget_page(&mut self, ino: u64, page: u64) {
        self.data.remove(&(ino, page));
        self.data_lru.pop(&(ino, page));
        if let Some(set) = self.data_by_ino.get_mut(&ino) {
            set.remove(&page);
        }
    }

    /// Dirty pages of `ino` (or of every inode), sorted.
    pub fn dirty_pages(&self, ino: Option<u64>) -> Vec<(u64, u64, Box<[u8; PAGE_BYTES]>)> {
        let mut out: Vec<_> = match ino {
            Some(ino) => self
                .data_by_ino
                .get(&ino)
                .map(|pages| {
                    pages
                        .iter()
                        .filter_map(|p| {
                            self.data.get(&(ino, *p)).filter(|d| d.dirty).map(|d| (ino, *p, d.bytes.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            None => {
                self.data.iter().filter(|(_, d)| d.dirty).map(|(k, d)| (k.0, k.1, d.bytes.clone())).collect()
            }
        };
        out.sort_by_key(|(i, p, _)| (*i, *p));
        out
    }

    /// Marks a page clean if it still holds `bytes`.
    pub fn page_written(&mut self, ino: u64, page: u64, bytes: &[u8; PAGE_BYTES]) {
        if let Some(p) = self.data.get_mut(&(ino, page)) {
            if *p.bytes == *bytes {
                p.dirty = false;
            }
        }
    }

    /// Drops every page of `ino` at or after `from_page` (truncate), dirty or not.
    pub fn truncate_pages(&mut self, ino: u64, from_page: u64) {
        let pages: Vec<u64> = self
            .data_by_ino
            .get(&ino)
            .map(|s| s.iter().copied().filter(|p| *p >= from_page).collect())
            .unwrap_or_default();
        for p in pages {
            self.forget_page(ino, p);
        }
    }

    /// Drops the pages of `ino` in `[from, to)`, dirty or not.
    pub fn truncate_pages_range(&mut self, ino: u64, from: u64, to: u64) {
        let pages: Vec<u64> = self
            .data_by_ino
            .get(&ino)
            .map(|s| s.iter().copied().filter(|p| *p >= from && *p < to).collect())
            .unwrap_or_default();
        for p in pages {
            self.forget_page(ino, p);
        }
    }

    /// Drops every page of `ino` (they must be clean).
    pub fn drop_data(&mut self, ino: u64) {
        if let Some(pages) = self.data_by_ino.remove(&ino) {
            for p in pages {
                self.data.remove(&(ino, p));
                self.data_lru.pop(&(ino, p));
            }
        }
    }

    /// Number of dirty data pages.
    pub fn dirty_page_count(&self) -> usize {
        self.data.values().filter(|p| p.dirty).count()
    }

    /// Cached metadata sectors and data pages.
    pub fn sizes(&self) -> (usize, usize) {
        (self.meta.len(), self.data.len())
    }
}
