//! Transactions: an operation takes its locks (in the global order), reads metadata
//! sectors through the cache, stages new sector images, and commits them as one redo
//! record in the client's log. The staged sectors become dirty cache entries that are
//! written back only after their record is durable.

use crate::dir::{DirError, DirSectors};
use crate::error::{FsError, FsResult};
use crate::fs::Inner;
use crate::inode::Inode;
use crate::layout::{
    self, Bitmap, BITS_PER_SECTOR, BITS_PER_SEGMENT, LARGE_BLOCK_BYTES, SEGMENT_SECTORS, SMALL_BLOCK_BYTES,
    SMALL_LIMIT,
};
use crate::locks::{LockError, LockName, Mode};
use crate::sector::{Sector, PAYLOAD_BYTES, SECTOR_BYTES};
use crate::wal::SectorUpdate;
use std::collections::BTreeMap;

/// Which blocks an allocation may use. Blocks that hold metadata (directories, symlink
/// targets, extended attributes) are never reused for file data, and the other way round:
/// log records name metadata sectors by address, and replaying one over a block that
/// became file data would destroy the data (file data carries no version to compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pool {
    /// Inode numbers: every unit.
    Any,
    /// Small blocks of even-numbered runs of [`SMALL_RUN`]; even large blocks.
    Meta,
    /// Small blocks of odd-numbered runs; odd large blocks. A file's small blocks can sit
    /// side by side on the disk, so its pages go back in one write.
    Data,
}

/// Small blocks alternate between the pools in runs of this many (256 KiB, more than a
/// file's [`SMALL_LIMIT`]).
const SMALL_RUN: u64 = 64;

impl Pool {
    pub(crate) fn of(inode: &Inode) -> Pool {
        if inode.kind() == crate::inode::S_IFREG {
            Pool::Data
        } else {
            Pool::Meta
        }
    }

    pub(crate) fn holds(self, bitmap: Bitmap, unit: u64) -> bool {
        let stripe = if bitmap == Bitmap::Small { unit / SMALL_RUN } else { unit };
        match self {
            Pool::Any => true,
            Pool::Meta => stripe.is_multiple_of(2),
            Pool::Data => !stripe.is_multiple_of(2),
        }
    }
}

/// An operation's locks and staged changes. Dropping it releases the locks and discards
/// whatever was not committed.
pub(crate) struct Txn<'a> {
    pub(crate) fs: &'a Inner,
    held: Vec<(LockName, Mode)>,
    /// addr -> (covering lock, new image, version it replaces)
    writes: BTreeMap<u64, (LockName, Sector, u64)>,
    /// Set when an allocation needs a segment below one already held: the operation must
    /// start over from segment 0 to keep the lock order.
    pub(crate) restart_low: bool,
    /// Blocks freed here, to decommit on the disk once the change is durable.
    freed: Vec<(Bitmap, u64)>,
    /// Byte ranges of freed metadata blocks: written back and dropped from the cache at
    /// commit, so that no log record can ever carry a newer version than the disk holds.
    retired: Vec<(u64, u64)>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(fs: &'a Inner) -> Txn<'a> {
        Txn {
            fs,
            held: Vec::new(),
            writes: BTreeMap::new(),
            restart_low: false,
            freed: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// Takes `name` in `mode` (a no-op if already held in a covering mode).
    pub(crate) fn lock(&mut self, name: LockName, mode: Mode) -> FsResult<()> {
        if self.held.iter().any(|(n, m)| *n == name && m.covers(mode)) {
            return Ok(());
        }
        if mode == Mode::Exclusive && self.fs.lease_lost() {
            return Err(FsError::LeaseLost);
        }
        // The client's own slot lock is held for as long as it is mounted.
        if name != LockName::Slot(self.fs.slot) {
            self.fs.locks.acquire(&name, mode)?;
        }
        self.held.push((name, mode));
        Ok(())
    }

    /// Takes many locks in `mode` at once, several requests in flight (fsck takes every
    /// bitmap segment: one at a time, that is thousands of lock-service round trips).
    pub(crate) fn lock_many(&mut self, names: Vec<LockName>, mode: Mode) -> FsResult<()> {
        const IN_FLIGHT: usize = 16;
        let wanted: Vec<LockName> = names
            .into_iter()
            .filter(|n| {
                *n != LockName::Slot(self.fs.slot) && !self.held.iter().any(|(h, m)| h == n && m.covers(mode))
            })
            .collect();
        if mode == Mode::Exclusive && self.fs.lease_lost() {
            return Err(FsError::LeaseLost);
        }
        let locks = &self.fs.locks;
        let results: Vec<(LockName, Result<(), LockError>)> = std::thread::scope(|scope| {
            let chunk = wanted.len().div_ceil(IN_FLIGHT).max(1);
            let workers: Vec<_> = wanted
                .chunks(chunk)
                .map(|names| {
                    scope.spawn(move || {
                        let mut out = Vec::with_capacity(names.len());
                        for n in names {
                            let r = locks.acquire(n, mode);
                            let failed = r.is_err();
                            out.push((n.clone(), r));
                            if failed {
                                break;
                            }
                        }
                        out
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().expect("lock worker panicked")).collect()
        });
        let mut first_error = None;
        for (name, r) in results {
            match r {
                // Held from here on, so that dropping the transaction releases it.
                Ok(()) => self.held.push((name, mode)),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Takes several inode locks exclusively, in inode order.
    pub(crate) fn lock_inodes(&mut self, inos: &[u64], mode: Mode) -> FsResult<()> {
        let mut sorted: Vec<u64> = inos.iter().copied().filter(|i| *i != 0).collect();
        sorted.sort_unstable();
        sorted.dedup();
        for ino in sorted {
            self.lock(LockName::Inode(ino), mode)?;
        }
        Ok(())
    }

    fn holds(&self, name: &LockName) -> bool {
        self.held.iter().any(|(n, _)| n == name)
    }

    // ---- sectors ----

    /// Reads a metadata sector covered by `lock` (which must be held).
    pub(crate) fn read(&mut self, addr: u64, lock: &LockName) -> FsResult<Sector> {
        debug_assert!(self.holds(lock), "reading {addr:#x} without {lock}");
        if let Some((_, s, _)) = self.writes.get(&addr) {
            return Ok(s.clone());
        }
        self.fs.read_sector(addr, lock)
    }

    /// Stages a new image for a sector (its version is set at commit).
    pub(crate) fn write(&mut self, addr: u64, lock: &LockName, sector: Sector) -> FsResult<()> {
        debug_assert!(
            self.held.iter().any(|(n, m)| n == lock && *m == Mode::Exclusive),
            "writing without {lock}"
        );
        let base = match self.writes.get(&addr) {
            Some((_, _, base)) => *base,
            None => self.fs.read_sector(addr, lock)?.version(),
        };
        self.writes.insert(addr, (lock.clone(), sector, base));
        Ok(())
    }

    /// Commits the staged sectors as one log record.
    pub(crate) fn commit(mut self) -> FsResult<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        if self.fs.lease_lost() {
            return Err(FsError::LeaseLost);
        }
        let mut updates = Vec::with_capacity(self.writes.len());
        let mut staged = Vec::with_capacity(self.writes.len());
        for (addr, (lock, mut sector, base)) in std::mem::take(&mut self.writes) {
            sector.set_version(base + 1);
            updates.push(SectorUpdate { addr, image: sector.clone() });
            staged.push((addr, lock, sector));
        }
        self.fs.log_and_cache(updates, staged)?;
        self.fs.defer_decommits(std::mem::take(&mut self.freed));
        if !self.retired.is_empty() {
            self.fs.retire(&std::mem::take(&mut self.retired))?;
        }
        Ok(())
    }

    // ---- inodes ----

    pub(crate) fn read_inode(&mut self, ino: u64) -> FsResult<Inode> {
        if ino == 0 || ino >= self.fs.params.inodes {
            return Err(FsError::NotFound);
        }
        let s = self.read(layout::inode_addr(ino), &LockName::Inode(ino))?;
        Inode::decode(&s).map_err(|e| FsError::Corrupt(format!("inode {ino}: {e}")))
    }

    /// Reads an inode that must be in use.
    pub(crate) fn live_inode(&mut self, ino: u64) -> FsResult<Inode> {
        let inode = self.read_inode(ino)?;
        if !inode.in_use() {
            return Err(FsError::NotFound);
        }
        Ok(inode)
    }

    pub(crate) fn write_inode(&mut self, ino: u64, inode: &Inode) -> FsResult<()> {
        let lock = LockName::Inode(ino);
        let mut s = self.read(layout::inode_addr(ino), &lock)?;
        inode.encode_into(&mut s);
        self.write(layout::inode_addr(ino), &lock, s)
    }

    // ---- allocation ----

    /// Allocates a unit of `bitmap` from `pool`, starting at this client's preferred
    /// segment.
    pub(crate) fn alloc(&mut self, bitmap: Bitmap, pool: Pool) -> FsResult<u64> {
        let total = self.fs.params.bits(bitmap);
        let segments = self.fs.params.segments(bitmap);
        let start = self.fs.preferred_segment(bitmap).min(segments.saturating_sub(1));
        let highest_held = self
            .held
            .iter()
            .filter_map(|(n, _)| match n {
                LockName::Segment(b, s) if *b == bitmap as u8 => Some(*s),
                _ => None,
            })
            .max();
        let order: Vec<u64> = (start..segments).chain(0..start).collect();
        for seg in order {
            if highest_held.is_some_and(|h| seg < h) {
                // Taking a lower segment now would break the lock order.
                self.restart_low = true;
                return Err(FsError::NoSpace);
            }
            let lock = LockName::Segment(bitmap as u8, seg);
            self.lock(lock.clone(), Mode::Exclusive)?;
            for i in 0..SEGMENT_SECTORS {
                let first_bit = seg * BITS_PER_SEGMENT + i * BITS_PER_SECTOR;
                if first_bit >= total {
                    break;
                }
                let (addr, _) = layout::bitmap_sector(bitmap, first_bit);
                let mut s = self.read(addr, &lock)?;
                let payload = s.payload_mut();
                for (byte_i, byte) in payload.iter_mut().enumerate() {
                    if *byte == 0xff {
                        continue;
                    }
                    for bit in 0..8 {
                        let unit = first_bit + (byte_i * 8 + bit) as u64;
                        if unit >= total {
                            break;
                        }
                        // Inode 0 and block 0 of each bitmap are never handed out.
                        if unit == 0 || *byte & (1 << bit) != 0 || !pool.holds(bitmap, unit) {
                            continue;
                        }
                        *byte |= 1 << bit;
                        self.write(addr, &lock, s)?;
                        self.fs.note_segment(bitmap, seg);
                        self.fs.cancel_decommit(bitmap, unit);
                        return Ok(unit);
                    }
                }
            }
        }
        Err(FsError::NoSpace)
    }

    /// Frees units of `bitmap` (sorted, so segment locks go in order).
    pub(crate) fn free(&mut self, bitmap: Bitmap, units: &[u64]) -> FsResult<()> {
        let mut units = units.to_vec();
        units.sort_unstable();
        for unit in units {
            let lock = LockName::Segment(bitmap as u8, layout::segment_of(unit));
            self.lock(lock.clone(), Mode::Exclusive)?;
            let (addr, bit) = layout::bitmap_sector(bitmap, unit);
            let mut s = self.read(addr, &lock)?;
            let byte = &mut s.payload_mut()[bit / 8];
            if *byte & (1 << (bit % 8)) == 0 {
                return Err(FsError::Corrupt(format!("freeing free unit {unit} of {bitmap:?}")));
            }
            *byte &= !(1 << (bit % 8));
            self.write(addr, &lock, s)?;
            // Only data blocks are zeroed once free: metadata blocks keep their versions.
            if bitmap != Bitmap::Inodes && Pool::Data.holds(bitmap, unit) {
                self.freed.push((bitmap, unit));
            }
        }
        Ok(())
    }

    /// Marks a unit of `bitmap` in use (fsck repair).
    pub(crate) fn mark(&mut self, bitmap: Bitmap, unit: u64) -> FsResult<()> {
        let lock = LockName::Segment(bitmap as u8, layout::segment_of(unit));
        self.lock(lock.clone(), Mode::Exclusive)?;
        let (addr, bit) = layout::bitmap_sector(bitmap, unit);
        let mut s = self.read(addr, &lock)?;
        s.payload_mut()[bit / 8] |= 1 << (bit % 8);
        self.write(addr, &lock, s)
    }

    // ---- block mapping ----

    /// Allocates a fresh block. A data block is zeroed on the disk (no stale bytes show).
    /// A metadata block keeps its sectors' versions, which replay depends on: a small one
    /// is cleared through the log instead, and a directory never reads a sector of its
    /// large block before writing it.
    pub(crate) fn new_block(&mut self, bitmap: Bitmap, pool: Pool, owner: u64) -> FsResult<u64> {
        let n = self.alloc(bitmap, pool)?;
        match (bitmap, pool) {
            (Bitmap::Small, Pool::Meta) => {
                // Filed under the lock of the inode the block is for.
                let lock = LockName::Inode(owner);
                let base = layout::small_block_addr(n);
                for i in 0..SMALL_BLOCK_BYTES / SECTOR_BYTES as u64 {
                    let addr = base + i * SECTOR_BYTES as u64;
                    let mut s = self.read(addr, &lock)?;
                    s.payload_mut().fill(0);
                    self.write(addr, &lock, s)?;
                }
            }
            (Bitmap::Small, _) => {
                let lease = self.fs.lease_expiry()?;
                self.fs.disk.decommit(layout::small_block_addr(n), SMALL_BLOCK_BYTES, lease)?
            }
            (_, Pool::Meta) => {}
            _ => {
                let lease = self.fs.lease_expiry()?;
                self.fs.disk.decommit(layout::large_block_addr(n), LARGE_BLOCK_BYTES, lease)?
            }
        }
        Ok(n + 1)
    }

    /// The disk address of byte `offset` of an inode's data, allocating its block when
    /// `allocate` is set (the inode is updated in place; the caller writes it).
    pub(crate) fn map(
        &mut self,
        ino: u64,
        inode: &mut Inode,
        offset: u64,
        allocate: bool,
    ) -> FsResult<Option<u64>> {
        if offset >= LARGE_BLOCK_BYTES {
            return Err(FsError::TooBig);
        }
        if offset < SMALL_LIMIT {
            let i = (offset / SMALL_BLOCK_BYTES) as usize;
            if inode.small[i] == 0 {
                if !allocate {
                    return Ok(None);
                }
                inode.small[i] = self.new_block(Bitmap::Small, Pool::of(inode), ino)?;
            }
            return Ok(Some(layout::small_block_addr(inode.small[i] - 1) + offset % SMALL_BLOCK_BYTES));
        }
        if inode.large == 0 {
            if !allocate {
                return Ok(None);
            }
            inode.large = self.new_block(Bitmap::Large, Pool::of(inode), ino)?;
        }
        Ok(Some(layout::large_block_addr(inode.large - 1) + offset))
    }

    /// Frees every block of an inode wholly at or beyond byte `from` (the inode is
    /// updated). Nothing is zeroed here: bytes beyond the end of a file are never read, and
    /// a freed block is zeroed on the disk only once the change is durable.
    pub(crate) fn free_blocks_from(&mut self, inode: &mut Inode, from: u64) -> FsResult<()> {
        let meta = Pool::of(inode) == Pool::Meta;
        let first_small = from.div_ceil(SMALL_BLOCK_BYTES) as usize;
        let mut small = Vec::new();
        for i in first_small..inode.small.len() {
            if inode.small[i] != 0 {
                small.push(inode.small[i] - 1);
                inode.small[i] = 0;
            }
        }
        self.free(Bitmap::Small, &small)?;
        if meta {
            self.retired.extend(small.iter().map(|b| (layout::small_block_addr(*b), SMALL_BLOCK_BYTES)));
        }
        if inode.large != 0 && from <= SMALL_LIMIT {
            let b = inode.large - 1;
            self.free(Bitmap::Large, &[b])?;
            if meta {
                self.retired.push((layout::large_block_addr(b), LARGE_BLOCK_BYTES));
            }
            inode.large = 0;
        }
        Ok(())
    }

    /// Frees a block that held metadata (an extended attribute block).
    pub(crate) fn free_meta_block(&mut self, bitmap: Bitmap, block: u64) -> FsResult<()> {
        self.free(bitmap, &[block])?;
        self.retired.push((layout::small_block_addr(block), SMALL_BLOCK_BYTES));
        Ok(())
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        for (name, mode) in self.held.drain(..).rev() {
            if name != LockName::Slot(self.fs.slot) {
                self.fs.locks.release(&name, mode);
            }
        }
    }
}

/// The metadata sectors of a directory or symlink, numbered within its data space.
pub(crate) struct MetaSectors<'t, 'a> {
    pub(crate) txn: &'t mut Txn<'a>,
    pub(crate) ino: u64,
    pub(crate) inode: &'t mut Inode,
    /// Set when a write allocated a block (the caller must write the inode).
    pub(crate) inode_changed: bool,
    /// The file system error behind a `DirError::Io`, so it keeps its errno.
    pub(crate) failed: Option<FsError>,
}

impl<'t, 'a> MetaSectors<'t, 'a> {
    pub(crate) fn new(txn: &'t mut Txn<'a>, ino: u64, inode: &'t mut Inode) -> MetaSectors<'t, 'a> {
        MetaSectors { txn, ino, inode, inode_changed: false, failed: None }
    }

    fn fail(&mut self, e: FsError) -> DirError {
        let msg = e.to_string();
        self.failed.get_or_insert(e);
        DirError::Io(msg)
    }

    /// Converts a directory error, preferring the file system error that caused it.
    pub(crate) fn error(&mut self, e: DirError) -> FsError {
        if let Some(f) = self.failed.take() {
            return f;
        }
        match e {
            DirError::Exists => FsError::Exists,
            DirError::NotFound => FsError::NotFound,
            DirError::NameTooLong => FsError::NameTooLong,
            DirError::InvalidName => FsError::Invalid("invalid name".into()),
            DirError::Corrupt(m) => FsError::Corrupt(format!("directory {}: {m}", self.ino)),
            DirError::Io(m) => FsError::Io(m),
        }
    }

    fn addr(&mut self, n: u64, allocate: bool) -> Result<Option<u64>, DirError> {
        let before = (self.inode.small, self.inode.large);
        let addr = match self.txn.map(self.ino, self.inode, n * SECTOR_BYTES as u64, allocate) {
            Ok(a) => a,
            Err(e) => return Err(self.fail(e)),
        };
        if (self.inode.small, self.inode.large) != before {
            self.inode_changed = true;
        }
        Ok(addr)
    }
}

impl DirSectors for MetaSectors<'_, '_> {
    fn read(&mut self, n: u64) -> Result<[u8; PAYLOAD_BYTES], DirError> {
        let mut out = [0u8; PAYLOAD_BYTES];
        if let Some(addr) = self.addr(n, false)? {
            let s = match self.txn.read(addr, &LockName::Inode(self.ino)) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(e)),
            };
            out.copy_from_slice(s.payload());
        }
        Ok(out)
    }

    fn write(&mut self, n: u64, payload: &[u8; PAYLOAD_BYTES]) -> Result<(), DirError> {
        let addr = self.addr(n, true)?.expect("allocated");
        let lock = LockName::Inode(self.ino);
        let result = self.txn.read(addr, &lock).and_then(|mut s| {
            s.payload_mut().copy_from_slice(payload);
            self.txn.write(addr, &lock, s)
        });
        result.map_err(|e| self.fail(e))
    }
}
