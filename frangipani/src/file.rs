//! File data and attributes: read, write, truncate, setattr, fsync, open/release, statfs.
//!
//! File data is not logged: it lives in the data cache under the inode's lock and is
//! written back on fsync, on revocation and periodically. The inode changes a write
//! makes (size, times, newly allocated blocks) are metadata and go through the log.

use crate::cache::{DataPage, PAGE_BYTES};
use crate::error::{FsError, FsResult};
use crate::fs::{lock, page_addr, Frangipani};
use crate::inode::{Inode, Time, S_IFDIR, S_IFMT, S_IFREG};
use crate::layout::{self, Bitmap, LARGE_BLOCK_BYTES};
use crate::locks::{LockName, Mode};
use crate::namespace::Attr;
use crate::txn::Txn;

/// Attribute changes of `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits (the type bits are kept).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend with zeros).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<Time>,
    /// New modification time.
    pub mtime: Option<Time>,
    /// New change time (otherwise set to now).
    pub ctime: Option<Time>,
}

/// File system totals, as `statfs` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Size of a block in bytes.
    pub block_bytes: u32,
    /// Blocks in all.
    pub blocks: u64,
    /// Blocks free.
    pub blocks_free: u64,
    /// Inodes in all.
    pub inodes: u64,
    /// Inodes free.
    pub inodes_free: u64,
    /// Longest name.
    pub name_max: u32,
}

/// Nominal blocks a large block is counted as in `statfs` (it is 1 TiB of address space,
/// but only what is written takes room on Petal).
const LARGE_BLOCK_STATFS_PAGES: u64 = 1 << 18;

impl Frangipani {
    /// Reads up to `len` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        let inode = txn.live_inode(ino)?;
        if inode.is_dir() {
            return Err(FsError::IsDir);
        }
        if offset >= inode.size {
            return Ok(Vec::new());
        }
        let end = inode.size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        let first = offset / PAGE_BYTES as u64;
        let last = (end - 1) / PAGE_BYTES as u64;
        let mut page = first;
        while page <= last {
            // Pages missing from the cache are read in runs that are contiguous on disk.
            let mut run = 0u64;
            {
                let mut cache = lock(&self.inner.cache);
                while page + run <= last && cache.page(ino, page + run).is_none() && run < 256 {
                    run += 1;
                }
            }
            if run > 0 {
                self.load_pages(&inode, ino, page, run)?;
            }
            let upto = page + run.max(1);
            let cache = &mut lock(&self.inner.cache);
            for p in page..upto {
                let Some(cached) = cache.page(ino, p) else { continue };
                let page_start = p * PAGE_BYTES as u64;
                let from = offset.max(page_start);
                let to = end.min(page_start + PAGE_BYTES as u64);
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&cached.bytes[(from - page_start) as usize..(to - page_start) as usize]);
            }
            page = upto;
        }
        drop(txn);
        self.inner.trim_pages()?;
        Ok(out)
    }

    /// Reads `count` pages from `page` on into the cache (holes read as zeros).
    fn load_pages(&self, inode: &Inode, ino: u64, page: u64, count: u64) -> FsResult<()> {
        let mut p = page;
        while p < page + count {
            let addr = page_addr(inode, p);
            let mut run = 1;
            while p + run < page + count
                && addr.is_some()
                && page_addr(inode, p + run) == addr.map(|a| a + run * PAGE_BYTES as u64)
            {
                run += 1;
            }
            let bytes = match addr {
                Some(a) => self.inner.disk.read(a, (run as usize) * PAGE_BYTES)?,
                None => vec![0u8; PAGE_BYTES],
            };
            let mut cache = lock(&self.inner.cache);
            for i in 0..run {
                if cache.page(ino, p + i).is_some() {
                    continue; // someone filled it meanwhile (and may have dirtied it)
                }
                let mut buf = Box::new([0u8; PAGE_BYTES]);
                let at = (i as usize) * PAGE_BYTES;
                if addr.is_some() {
                    buf.copy_from_slice(&bytes[at..at + PAGE_BYTES]);
                }
                cache.put_page(ino, p + i, DataPage { bytes: buf, dirty: false });
            }
            p += run;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; returns the bytes written.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::TooBig)?;
        if end > LARGE_BLOCK_BYTES {
            return Err(FsError::TooBig);
        }
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Exclusive)?;
        let mut inode = txn.live_inode(ino)?;
        if inode.is_dir() {
            return Err(FsError::IsDir);
        }
        if offset > inode.size {
            self.zero_gap(ino, &inode, inode.size, offset)?;
        }
        let first = offset / PAGE_BYTES as u64;
        let last = (end - 1) / PAGE_BYTES as u64;
        // Allocate blocks for every page written.
        for p in first..=last {
            if p < layout::SMALL_BLOCKS_PER_FILE as u64 || inode.large == 0 {
                txn.map(ino, &mut inode, p * PAGE_BYTES as u64, true)?;
            }
        }
        // Partially written pages need their old bytes first.
        for p in [first, last] {
            let page_start = p * PAGE_BYTES as u64;
            let partial = offset > page_start || end < page_start + PAGE_BYTES as u64;
            if partial && lock(&self.inner.cache).page(ino, p).is_none() {
                self.load_pages(&inode, ino, p, 1)?;
            }
        }
        {
            let mut cache = lock(&self.inner.cache);
            for p in first..=last {
                let page_start = p * PAGE_BYTES as u64;
                let from = offset.max(page_start);
                let to = end.min(page_start + PAGE_BYTES as u64);
                let src = &data[(from - offset) as usize..(to - offset) as usize];
                match cache.page(ino, p) {
                    Some(page) => {
                        page.bytes[(from - page_start) as usize..(to - page_start) as usize]
                            .copy_from_slice(src);
                        page.dirty = true;
                    }
                    None => {
                        let mut buf = Box::new([0u8; PAGE_BYTES]);
                        buf[(from - page_start) as usize..(to - page_start) as usize].copy_from_slice(src);
                        cache.put_page(ino, p, DataPage { bytes: buf, dirty: true });
                    }
                }
            }
        }
        let now = Time::now();
        inode.size = inode.size.max(end);
        // Every write changes the modification time (POSIX), even an overwrite in place.
        inode.mtime = now;
        inode.ctime = now;
        txn.write_inode(ino, &inode)?;
        txn.commit()?;
        self.inner.trim_pages()?;
        Ok(data.len())
    }

    /// Changes attributes (chmod, chown, utimens, truncate).
    pub fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Exclusive)?;
        let mut inode = txn.live_inode(ino)?;
        let now = Time::now();
        if let Some(mode) = set.mode {
            inode.mode = (inode.mode & S_IFMT) | (mode & 0o7777);
        }
        if let Some(uid) = set.uid {
            if uid != inode.uid && inode.kind() != S_IFDIR {
                inode.mode &= !0o6000;
            }
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            if gid != inode.gid && inode.kind() != S_IFDIR {
                inode.mode &= !0o6000;
            }
            inode.gid = gid;
        }
        if let Some(size) = set.size {
            if inode.is_dir() {
                return Err(FsError::IsDir);
            }
            if inode.kind() != S_IFREG {
                return Err(FsError::Invalid("truncate of a special file".into()));
            }
            if size > LARGE_BLOCK_BYTES {
                return Err(FsError::TooBig);
            }
            self.resize(&mut txn, ino, &mut inode, size)?;
            inode.mtime = now;
        }
        if let Some(t) = set.atime {
            inode.atime = t;
        }
        if let Some(t) = set.mtime {
            inode.mtime = t;
        }
        inode.ctime = set.ctime.unwrap_or(now);
        txn.write_inode(ino, &inode)?;
        txn.commit()?;
        Ok(Attr::of(ino, &inode))
    }

    /// Changes a file's size: shrinking frees the blocks wholly beyond it; growing zeroes
    /// the gap, which may hold bytes of an earlier, longer life of the file.
    fn resize(&self, txn: &mut Txn<'_>, ino: u64, inode: &mut Inode, size: u64) -> FsResult<()> {
        if size < inode.size {
            lock(&self.inner.cache).truncate_pages(ino, size.div_ceil(PAGE_BYTES as u64));
            txn.free_blocks_from(inode, size)?;
        } else if size > inode.size {
            self.zero_gap(ino, inode, inode.size, size)?;
        }
        inode.size = size;
        Ok(())
    }

    /// Zeroes `[from, to)`, beyond the file's current end, before the end moves past it:
    /// partial pages in the cache, whole pages by decommitting them on the disk.
    fn zero_gap(&self, ino: u64, inode: &Inode, from: u64, to: u64) -> FsResult<()> {
        let page_bytes = PAGE_BYTES as u64;
        let mut decommit: Vec<(u64, u64)> = Vec::new();
        let mut p = from / page_bytes;
        while p * page_bytes < to {
            let start = p * page_bytes;
            let (a, b) = (from.max(start), to.min(start + page_bytes));
            match page_addr(inode, p) {
                None => {}
                Some(addr) if a == start && b == start + page_bytes => {
                    lock(&self.inner.cache).forget_page(ino, p);
                    match decommit.last_mut() {
                        Some((s, len)) if *s + *len == addr => *len += page_bytes,
                        _ => decommit.push((addr, page_bytes)),
                    }
                }
                Some(_) => {
                    if lock(&self.inner.cache).page(ino, p).is_none() {
                        self.load_pages(inode, ino, p, 1)?;
                    }
                    if let Some(page) = lock(&self.inner.cache).page(ino, p) {
                        page.bytes[(a - start) as usize..(b - start) as usize].fill(0);
                        page.dirty = true;
                    }
                }
            }
            // Beyond 64 KiB a hole in the large block can be zeroed in one go.
            if start >= layout::SMALL_LIMIT && inode.large != 0 && b == start + page_bytes {
                let last_full = to / page_bytes;
                if last_full > p + 1 {
                    let base = layout::large_block_addr(inode.large - 1);
                    let (s, e) = ((p + 1) * page_bytes, last_full * page_bytes);
                    lock(&self.inner.cache).truncate_pages_range(ino, p + 1, last_full);
                    decommit.push((base + s, e - s));
                    p = last_full;
                    continue;
                }
            }
            p += 1;
        }
        for (addr, len) in decommit {
            self.inner.disk.decommit(addr, len, self.inner.lease_expiry()?)?;
        }
        Ok(())
    }

    /// Makes a file's data and metadata durable.
    pub fn fsync(&self, ino: u64, _datasync: bool) -> FsResult<()> {
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        txn.live_inode(ino)?;
        self.inner.write_back(Some(&LockName::Inode(ino)))
    }

    /// Notes an open handle (unlinked files stay until their last close).
    pub fn open(&self, ino: u64) -> FsResult<Attr> {
        let attr = self.getattr(ino)?;
        *lock(&self.inner.open).entry(ino).or_default() += 1;
        Ok(attr)
    }

    /// Closes a handle; frees the inode if it was unlinked and this was the last handle.
    pub fn release(&self, ino: u64) -> FsResult<()> {
        let last = {
            let mut open = lock(&self.inner.open);
            let n = open.entry(ino).or_default();
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                open.remove(&ino);
            }
            last
        };
        if !last {
            return Ok(());
        }
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Exclusive)?;
        let mut inode = txn.read_inode(ino)?;
        if inode.in_use() && inode.nlink == 0 {
            self.free_inode(&mut txn, ino, &mut inode)?;
            txn.remove_orphan(ino)?;
            txn.commit()?;
        }
        Ok(())
    }

    /// File system totals, counted from the bitmaps.
    pub fn statfs(&self) -> FsResult<StatFs> {
        let p = &self.inner.params;
        let used = |b: Bitmap| -> FsResult<u64> {
            Ok(self.inner.bitmap_snapshot(b)?.iter().map(|byte| byte.count_ones() as u64).sum())
        };
        let small_used = used(Bitmap::Small)?;
        let large_used = used(Bitmap::Large)?;
        let inodes_used = used(Bitmap::Inodes)?;
        let blocks = p.small_blocks + p.large_blocks * LARGE_BLOCK_STATFS_PAGES;
        let blocks_used = small_used + large_used * LARGE_BLOCK_STATFS_PAGES;
        Ok(StatFs {
            block_bytes: PAGE_BYTES as u32,
            blocks,
            blocks_free: blocks.saturating_sub(blocks_used),
            inodes: p.inodes,
            inodes_free: p.inodes.saturating_sub(inodes_used + 1),
            name_max: crate::dir::NAME_MAX as u32,
        })
    }
}
