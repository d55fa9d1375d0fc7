//! The durable block store of one replica: every virtual disk's bytes, in one
//! [`BlockFile`] of 4 KiB blocks with a crc32 each.
//!
//! A disk is a sparse 2^64-byte address space cut into 64 KiB extents. A committed
//! extent maps to a *slot*: 16 consecutive blocks of the block file (slot `s` is blocks
//! `16 s .. 16 s + 16`). The map (disk -> extent -> slot, plus a bitmap of the blocks
//! that hold data) lives in memory and is written, with the applied Raft index, to the
//! `meta` file by [`Store::persist`], after an fsync of the block file. Blocks outside
//! the bitmap read as zeros without touching the file.
//!
//! Snapshots share slots: a slot with more than one referrer is never written in place;
//! the first write to a shared extent copies it to a new slot (copy-on-write). Each
//! persist also *pins* every disk's extents as they are (one more referrer per slot)
//! until the next persist, so a replica that installs this persist's manifest fetches the
//! bytes exactly as of its index. Should the pin have moved on by then, the installer
//! takes the current bytes instead and replays the log over them; that converges for
//! writes and decommits, but a snapshot disk created by one of the replayed entries may
//! then hold, on that replica, bytes written after it.
//!
//! **Crash recovery** replays the Raft entries after the persisted index over the files
//! as they are. That gives the right state because every slot the persisted maps refer
//! to is pinned, so nothing writes it in place (the first write copies it) and nothing
//! frees it until the next `meta` is durable: the replay reads exactly what the first
//! run read. Slots allocated since are written again by the replay, in the same order
//! (allocation is deterministic given the persisted state). The cost is one copy of an
//! extent on its first write after each persist. A block that fails its crc while being
//! read for a partial write (a write torn by a crash) is marked *damaged* (kept in the
//! small `damaged` file, replaced atomically), read as zeros and refused to readers until
//! a peer's copy of the same version repairs it ([`Store::repair`]).

use crate::codec;
use crate::error::PetalError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use storage::{read_checked, write_atomic, BlockFile, StorageError};

/// Bytes of one block (the unit of the crc and of partial-write read-modify-write).
pub const BLOCK_BYTES: usize = 4096;
/// Bytes of one extent (the unit of allocation, sharing and decommit bookkeeping).
pub const EXTENT_BYTES: u64 = 64 * 1024;
/// Blocks per extent.
pub const EXTENT_BLOCKS: u64 = EXTENT_BYTES / BLOCK_BYTES as u64;
/// Longest disk name.
pub const DISK_NAME_BYTES_MAX: usize = 255;

const META_FILE: &str = "meta";
const DAMAGED_FILE: &str = "damaged";
const BLOCKS_FILE: &str = "blocks";
const RESTORE_FILE: &str = "blocks.restore";
const META_VERSION: u32 = 1;

/// One committed extent of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Where its blocks are.
    slot: u64,
    /// Bit `i`: block `i` holds data; the others read as zeros.
    written: u16,
    /// The Raft index of the last command that changed this extent's contents.
    modified: u64,
}

/// A virtual disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Disk {
    read_only: bool,
    /// For a snapshot: the disk it was taken of.
    origin: Option<String>,
    created_index: u64,
    extents: BTreeMap<u64, Extent>,
}

/// What `meta` holds, and what a Raft snapshot carries (the manifest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    version: u32,
    /// Every command through this index is in the block file (after its fsync).
    applied: u64,
    disks: BTreeMap<String, Disk>,
    /// Slots at or above this were never used.
    next_slot: u64,
    /// The state machine's own state (request-id sessions), persisted with the store.
    app: Vec<u8>,
    /// Every disk's extents as of the last persist, kept (their slots shared, so not
    /// written in place) until the next one: a replica installing that manifest fetches
    /// these, so it gets the bytes exactly as of the manifest's index.
    pinned: Option<Pin>,
}

/// The disks' extent maps as of one persisted index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Pin {
    index: u64,
    disks: BTreeMap<String, BTreeMap<u64, Extent>>,
}

/// What a disk looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Its name.
    pub name: String,
    /// Whether it is a snapshot.
    pub read_only: bool,
    /// For a snapshot, the disk it was taken of.
    pub origin: Option<String>,
    /// Committed extents.
    pub extents: u64,
    /// The Raft index that created it.
    pub created_index: u64,
}

/// One extent's contents, as shipped between replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentContent {
    /// Bit `i`: block `i` holds data.
    pub written: u16,
    /// The written blocks in order, [`BLOCK_BYTES`] each.
    pub data: Vec<u8>,
    /// The index of the last change to the extent.
    pub modified: u64,
}

/// Counters for the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Blocks found corrupt (crc, short file, known damage), since start.
    pub corrupt_blocks: u64,
    /// Blocks rewritten from a peer's copy, since start.
    pub repaired_blocks: u64,
    /// Blocks known bad now (that a disk can read).
    pub damaged_blocks: u64,
}

/// The block store of one replica. Not internally locked: the state machine applies
/// commands with `&mut`, readers share `&` (the server keeps it in an `RwLock`).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    blocks: BlockFile,
    meta: Meta,
    /// The last index applied in memory (>= `meta.applied`, the persisted one).
    applied: u64,
    /// Referrers of each used slot. Invariant: a slot is in exactly one of `refs`,
    /// `free` and `pending_free`, or at or above `meta.next_slot`.
    refs: HashMap<u64, u32>,
    free: BTreeSet<u64>,
    /// Freed since the last persist: not reused until then (see the module doc).
    pending_free: Vec<u64>,
    /// Blocks known bad, by slot (bit `i` = block `i`); persisted in `damaged`.
    damaged: BTreeMap<u64, u16>,
    stats: StoreStats,
    /// Set when an I/O call failed for another reason than corruption (e.g. a full
    /// disk): the store applies nothing more and serves nothing until restarted.
    failed: Option<String>,
}

/// Checks a disk name: 1 to 255 bytes, no control characters.
pub fn check_disk_name(name: &str) -> Result<(), PetalError> {
    if name.is_empty() || name.len() > DISK_NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(PetalError::Invalid(format!(
            "disk names are 1 to {DISK_NAME_BYTES_MAX} bytes without control characters: {name:?}"
        )));
    }
    Ok(())
}

/// Checks that `len` bytes at `offset` lie inside the 2^64-byte address space.
pub fn check_range(offset: u64, len: u64) -> Result<(), PetalError> {
    if offset as u128 + len as u128 > 1u128 << 64 {
        return Err(PetalError::OutOfRange(format!("{len} bytes at offset {offset} end past 2^64")));
    }
    Ok(())
}

/// One extent's part of a byte range: the extent, and the byte range inside it.
#[derive(Clone, Copy, Debug)]
struct Piece {
    extent: u64,
    start: usize,
    end: usize,
    /// Where the piece starts in the caller's buffer.
    at: usize,
}

/// Cuts `len` bytes at `offset` (already checked in range) into per-extent pieces.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let end = offset as u128 + len as u128;
    let mut pos = offset as u128;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let extent = (pos / EXTENT_BYTES as u128) as u64;
        let start = (pos % EXTENT_BYTES as u128) as usize;
        let stop = (end - (extent as u128 * EXTENT_BYTES as u128)).min(EXTENT_BYTES as u128) as usize;
        let piece = Piece { extent, start, end: stop, at: (pos - offset as u128) as usize };
        pos += (stop - start) as u128;
        Some(piece)
    })
}

fn block_of(slot: u64, i: u64) -> u64 {
    slot * EXTENT_BLOCKS + i
}

impl Store {
    /// Opens (or creates) the store in `dir`. A block file that is missing or cannot be
    /// opened while the metadata says it holds data is set aside and every written block
    /// is marked damaged, to be repaired from the peers.
    pub fn open(dir: &Path) -> Result<Store, PetalError> {
        std::fs::create_dir_all(dir).map_err(|e| io_failed("create", dir, e))?;
        let meta: Meta = match read_checked(&dir.join(META_FILE)).map_err(storage_failed)? {
            Some(bytes) => codec::decode(&bytes)
                .map_err(|e| PetalError::Unavailable(format!("{}: {e}", dir.join(META_FILE).display())))?,
            None => Meta { version: META_VERSION, ..Meta::default() },
        };
        let damaged: BTreeMap<u64, u16> =
            match read_checked(&dir.join(DAMAGED_FILE)).map_err(storage_failed)? {
                Some(bytes) => {
                    codec::decode(&bytes).map_err(|e| PetalError::Unavailable(format!("damaged: {e}")))?
                }
                None => BTreeMap::new(),
            };
        let path = dir.join(BLOCKS_FILE);
        let existed = path.exists();
        let (blocks, lost) = match BlockFile::open(&path, BLOCK_BYTES) {
            Ok(b) => (b, !existed),
            Err(StorageError::Corrupt { detail, .. }) => {
                tracing::error!(path = %path.display(), "block file unusable ({detail}); setting it aside");
                set_aside(&path)?;
                (BlockFile::open(&path, BLOCK_BYTES).map_err(storage_failed)?, true)
            }
            Err(e) => return Err(storage_failed(e)),
        };
        let mut store = Store {
            dir: dir.to_path_buf(),
            blocks,
            applied: meta.applied,
            meta,
            refs: HashMap::new(),
            free: BTreeSet::new(),
            pending_free: Vec::new(),
            damaged,
            stats: StoreStats::default(),
            failed: None,
        };
        store.rebuild_slots();
        // A truncated or lost data file: every written block past its end is damaged.
        let data_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut lost_blocks = BTreeMap::new();
        let pinned = store.meta.pinned.iter().flat_map(|p| p.disks.values());
        for extents in store.meta.disks.values().map(|d| &d.extents).chain(pinned) {
            for ext in extents.values() {
                for i in 0..EXTENT_BLOCKS {
                    let end = (block_of(ext.slot, i) + 1) * BLOCK_BYTES as u64;
                    if ext.written & (1 << i) != 0 && (lost || end > data_bytes) {
                        *lost_blocks.entry(ext.slot).or_insert(0u16) |= 1 << i;
                    }
                }
            }
        }
        if !lost_blocks.is_empty() {
            let n: u32 = lost_blocks.values().map(|b| b.count_ones()).sum();
            tracing::error!(dir = %dir.display(), blocks = n, "block file missing or truncated: blocks marked damaged");
            for (slot, bits) in lost_blocks {
                *store.damaged.entry(slot).or_insert(0) |= bits;
            }
            store.stats.corrupt_blocks += n as u64;
            store.save_damaged()?;
        }
        Ok(store)
    }

    /// Derives `refs` and `free` from the disks' maps.
    fn rebuild_slots(&mut self) {
        self.refs.clear();
        let pinned = self.meta.pinned.iter().flat_map(|p| p.disks.values());
        for extents in self.meta.disks.values().map(|d| &d.extents).chain(pinned) {
            for ext in extents.values() {
                *self.refs.entry(ext.slot).or_insert(0) += 1;
            }
        }
        self.free = (0..self.meta.next_slot).filter(|s| !self.refs.contains_key(s)).collect();
        self.pending_free.clear();
        self.damaged.retain(|slot, _| self.refs.contains_key(slot));
    }

    /// The last index applied (in memory).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The applied index as of the last [`Store::persist`].
    pub fn persisted(&self) -> u64 {
        self.meta.applied
    }

    /// Records that every command through `index` has been applied.
    pub fn set_applied(&mut self, index: u64) {
        self.applied = self.applied.max(index);
    }

    /// The state machine's bytes as last persisted.
    pub fn app_state(&self) -> &[u8] {
        &self.meta.app
    }

    /// Why the store stopped serving, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The store's counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats { damaged_blocks: self.damaged_blocks(), ..self.stats }
    }

    /// Every disk, by name.
    pub fn list(&self) -> Vec<DiskInfo> {
        self.meta.disks.keys().filter_map(|n| self.stat(n).ok()).collect()
    }

    /// One disk.
    pub fn stat(&self, name: &str) -> Result<DiskInfo, PetalError> {
        let d = self.disk(name)?;
        Ok(DiskInfo {
            name: name.to_string(),
            read_only: d.read_only,
            origin: d.origin.clone(),
            extents: d.extents.len() as u64,
            created_index: d.created_index,
        })
    }

    fn disk(&self, name: &str) -> Result<&Disk, PetalError> {
        self.meta.disks.get(name).ok_or_else(|| PetalError::NotFound(name.to_string()))
    }

    fn check_healthy(&self) -> Result<(), PetalError> {
        match &self.failed {
            Some(why) => Err(PetalError::Unavailable(format!("store failed: {why}"))),
            None => Ok(()),
        }
    }

    // --- commands (called by the state machine, in log order) ----------------------------

    /// Creates an empty disk.
    pub fn create(&mut self, name: &str, index: u64) -> Result<(), PetalError> {
        check_disk_name(name)?;
        if self.meta.disks.contains_key(name) {
            return Err(PetalError::Exists(name.to_string()));
        }
        let disk = Disk { read_only: false, origin: None, created_index: index, extents: BTreeMap::new() };
        self.meta.disks.insert(name.to_string(), disk);
        Ok(())
    }

    /// Deletes a disk and frees the slots only it used.
    pub fn delete(&mut self, name: &str) -> Result<(), PetalError> {
        let disk = self.meta.disks.remove(name).ok_or_else(|| PetalError::NotFound(name.to_string()))?;
        for ext in disk.extents.values() {
            self.unref(ext.slot);
        }
        Ok(())
    }

    /// Makes `name` a read-only copy of `disk` as it is now, sharing every extent.
    pub fn snapshot(&mut self, disk: &str, name: &str, index: u64) -> Result<(), PetalError> {
        check_disk_name(name)?;
        let src = self.disk(disk)?;
        if self.meta.disks.contains_key(name) {
            return Err(PetalError::Exists(name.to_string()));
        }
        let copy = Disk {
            read_only: true,
            origin: Some(disk.to_string()),
            created_index: index,
            extents: src.extents.clone(),
        };
        for ext in copy.extents.values() {
            *self.refs.get_mut(&ext.slot).expect("a used slot has referrers") += 1;
        }
        self.meta.disks.insert(name.to_string(), copy);
        Ok(())
    }

    /// Writes `data` at `offset` of `disk`. Errors that leave the store unchanged come
    /// first (unknown disk, read-only, range); after that the write cannot fail but by
    /// an I/O error, which fails the store.
    pub fn write(&mut self, disk: &str, offset: u64, data: &[u8], index: u64) -> Result<(), PetalError> {
        self.check_healthy()?;
        check_range(offset, data.len() as u64)?;
        let d = self.disk(disk)?;
        if d.read_only {
            return Err(PetalError::ReadOnly(disk.to_string()));
        }
        let result = self.write_pieces(disk, offset, data, index);
        self.fail_on_io(result)
    }

    fn write_pieces(&mut self, disk: &str, offset: u64, data: &[u8], index: u64) -> Result<(), StorageError> {
        let mut run = Vec::new();
        for p in pieces(offset, data.len() as u64) {
            let mut ext = self.owned_extent(disk, p.extent)?;
            let first = p.start / BLOCK_BYTES;
            let last = (p.end - 1) / BLOCK_BYTES;
            let src = &data[p.at..p.at + (p.end - p.start)];
            let covered = |i: usize| p.start <= i * BLOCK_BYTES && (i + 1) * BLOCK_BYTES <= p.end;
            // The piece's blocks go to the file in one write: whole blocks straight from
            // the caller's buffer, else merged over the partly covered ones at either end.
            if covered(first) && covered(last) {
                self.blocks.write_blocks(block_of(ext.slot, first as u64), src)?;
            } else {
                run.clear();
                run.resize((last + 1 - first) * BLOCK_BYTES, 0);
                for i in std::iter::once(first).chain((last != first).then_some(last)) {
                    if !covered(i) {
                        let at = (i - first) * BLOCK_BYTES;
                        self.read_for_update(&ext, i as u64, &mut run[at..at + BLOCK_BYTES])?;
                    }
                }
                let at = p.start - first * BLOCK_BYTES;
                run[at..at + src.len()].copy_from_slice(src);
                self.blocks.write_blocks(block_of(ext.slot, first as u64), &run)?;
            }
            for i in first..=last {
                if covered(i) {
                    self.clear_damaged(ext.slot, i as u64);
                }
                ext.written |= 1 << i;
            }
            ext.modified = index;
            self.meta.disks.get_mut(disk).expect("checked").extents.insert(p.extent, ext);
        }
        Ok(())
    }

    /// Reads block `i` of `ext` for a partial update: zeros if unwritten; a corrupt
    /// block is marked damaged and read as zeros (a peer's copy repairs it later).
    fn read_for_update(&mut self, ext: &Extent, i: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        if ext.written & (1 << i) == 0 {
            buf.fill(0);
            return Ok(());
        }
        match self.blocks.read_block(block_of(ext.slot, i), buf) {
            Ok(()) => Ok(()),
            Err(StorageError::Corrupt { detail, .. }) => {
                tracing::error!(slot = ext.slot, block = i, "corrupt block under a partial write: {detail}");
                self.stats.corrupt_blocks += 1;
                self.mark_damaged(ext.slot, 1 << i).map_err(|e| StorageError::Io {
                    context: e.to_string(),
                    source: std::io::Error::other("save damaged"),
                })?;
                buf.fill(0);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The extent `extent` of `disk`, in a slot of its own (allocated if the extent is
    /// new, copied if its slot is shared), ready to be written in place.
    fn owned_extent(&mut self, disk: &str, extent: u64) -> Result<Extent, StorageError> {
        let current = self.meta.disks[disk].extents.get(&extent).copied();
        match current {
            None => {
                let slot = self.allocate();
                Ok(Extent { slot, written: 0, modified: 0 })
            }
            Some(ext) if self.refs[&ext.slot] == 1 => Ok(ext),
            Some(ext) => {
                let slot = self.allocate();
                // Each run of written blocks is copied in one write.
                let mut run = vec![0u8; EXTENT_BYTES as usize];
                let mut i = 0;
                while i < EXTENT_BLOCKS {
                    if ext.written & (1 << i) == 0 {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < EXTENT_BLOCKS && ext.written & (1 << i) != 0 {
                        let at = (i - start) as usize * BLOCK_BYTES;
                        self.read_for_update(&ext, i, &mut run[at..at + BLOCK_BYTES])?;
                        i += 1;
                    }
                    let bytes = (i - start) as usize * BLOCK_BYTES;
                    self.blocks.write_blocks(block_of(slot, start), &run[..bytes])?;
                }
                if let Some(bits) = self.damaged.get(&ext.slot).copied() {
                    self.damaged.insert(slot, bits);
                }
                *self.refs.get_mut(&ext.slot).expect("shared") -= 1;
                Ok(Extent { slot, ..ext })
            }
        }
    }

    /// Decommits `len` bytes at `offset` of `disk`: they read as zeros, and whole
    /// extents and blocks give their space back.
    pub fn decommit(&mut self, disk: &str, offset: u64, len: u64, index: u64) -> Result<(), PetalError> {
        self.check_healthy()?;
        check_range(offset, len)?;
        let d = self.disk(disk)?;
        if d.read_only {
            return Err(PetalError::ReadOnly(disk.to_string()));
        }
        let result = self.decommit_pieces(disk, offset, len, index);
        self.fail_on_io(result)
    }

    fn decommit_pieces(&mut self, disk: &str, offset: u64, len: u64, index: u64) -> Result<(), StorageError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset as u128 + len as u128;
        let first = offset / EXTENT_BYTES;
        let last = ((end - 1) / EXTENT_BYTES as u128) as u64;
        // Only committed extents are visited, so decommitting all 2^64 bytes is cheap.
        let present: Vec<u64> = self.meta.disks[disk].extents.range(first..=last).map(|(e, _)| *e).collect();
        let mut buf = vec![0u8; BLOCK_BYTES];
        for extent in present {
            let ext_start = extent as u128 * EXTENT_BYTES as u128;
            let start = (offset as u128).max(ext_start) - ext_start;
            let stop = end.min(ext_start + EXTENT_BYTES as u128) - ext_start;
            let (start, stop) = (start as usize, stop as usize);
            if start == 0 && stop == EXTENT_BYTES as usize {
                let ext =
                    self.meta.disks.get_mut(disk).expect("checked").extents.remove(&extent).expect("present");
                self.unref(ext.slot);
                continue;
            }
            let mut ext = self.owned_extent(disk, extent)?;
            for i in start / BLOCK_BYTES..=(stop - 1) / BLOCK_BYTES {
                if ext.written & (1 << i) == 0 {
                    continue;
                }
                let b_start = (i * BLOCK_BYTES).max(start);
                let b_end = ((i + 1) * BLOCK_BYTES).min(stop);
                if b_end - b_start == BLOCK_BYTES {
                    ext.written &= !(1 << i);
                    self.clear_damaged(ext.slot, i as u64);
                    self.blocks.discard_block(block_of(ext.slot, i as u64))?;
                } else {
                    self.read_for_update(&ext, i as u64, &mut buf)?;
                    buf[b_start - i * BLOCK_BYTES..b_end - i * BLOCK_BYTES].fill(0);
                    self.blocks.write_block(block_of(ext.slot, i as u64), &buf)?;
                }
            }
            ext.modified = index;
            let extents = &mut self.meta.disks.get_mut(disk).expect("checked").extents;
            if ext.written == 0 {
                extents.remove(&extent);
                self.unref(ext.slot);
            } else {
                extents.insert(extent, ext);
            }
        }
        Ok(())
    }

    fn allocate(&mut self) -> u64 {
        let slot = self.free.pop_first().unwrap_or_else(|| {
            self.meta.next_slot += 1;
            self.meta.next_slot - 1
        });
        self.refs.insert(slot, 1);
        slot
    }

    fn unref(&mut self, slot: u64) {
        let n = self.refs.get_mut(&slot).expect("a used slot has referrers");
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&slot);
            self.pending_free.push(slot);
            if self.damaged.remove(&slot).is_some() {
                let _ = self.save_damaged();
            }
        }
    }

    /// Turns an I/O error into a failed store (corruption is handled where it is read).
    fn fail_on_io(&mut self, result: Result<(), StorageError>) -> Result<(), PetalError> {
        result.map_err(|e| {
            tracing::error!(dir = %self.dir.display(), "block store failed, serving nothing more: {e}");
            self.failed = Some(e.to_string());
            PetalError::Unavailable(format!("store failed: {e}"))
        })
    }

    // --- reads ----------------------------------------------------------------------------

    /// Reads `len` bytes at `offset` of `disk`; unwritten bytes are zeros. A corrupt or
    /// damaged block is [`PetalError::Corrupt`] naming the disk, extent and block.
    pub fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Vec<u8>, PetalError> {
        self.check_healthy()?;
        check_range(offset, len)?;
        let d = self.disk(disk)?;
        let mut out = vec![0u8; len as usize];
        let mut buf = vec![0u8; BLOCK_BYTES];
        for p in pieces(offset, len) {
            let Some(ext) = d.extents.get(&p.extent) else { continue };
            for i in p.start / BLOCK_BYTES..=(p.end - 1) / BLOCK_BYTES {
                if ext.written & (1 << i) == 0 {
                    continue;
                }
                self.read_block(disk, p.extent, ext, i as u64, &mut buf)?;
                let b_start = (i * BLOCK_BYTES).max(p.start);
                let b_end = ((i + 1) * BLOCK_BYTES).min(p.end);
                out[p.at + b_start - p.start..p.at + b_end - p.start]
                    .copy_from_slice(&buf[b_start - i * BLOCK_BYTES..b_end - i * BLOCK_BYTES]);
            }
        }
        Ok(out)
    }

    /// Reads one written block, checking its crc and the damaged set.
    fn read_block(
        &self,
        disk: &str,
        extent: u64,
        ext: &Extent,
        i: u64,
        buf: &mut [u8],
    ) -> Result<(), PetalError> {
        let corrupt = |detail: String| PetalError::Corrupt {
            disk: disk.to_string(),
            extent,
            block: i,
            replica: 0,
            detail,
        };
        if self.damaged.get(&ext.slot).is_some_and(|bits| bits & (1 << i) != 0) {
            return Err(corrupt("known damaged, awaiting repair".into()));
        }
        match self.blocks.read_block(block_of(ext.slot, i), buf) {
            Ok(()) => Ok(()),
            Err(StorageError::Corrupt { path, detail, .. }) => {
                Err(corrupt(format!("{}: {detail}", path.display())))
            }
            Err(e) => Err(PetalError::Unavailable(e.to_string())),
        }
    }

    /// The contents of extent `extent` of `disk` (for a peer), or `None` if the disk does
    /// not exist. A corrupt block is an error.
    pub fn extent_content(&self, disk: &str, extent: u64) -> Result<Option<ExtentContent>, PetalError> {
        self.check_healthy()?;
        let Some(d) = self.meta.disks.get(disk) else { return Ok(None) };
        Ok(Some(self.content(disk, extent, d.extents.get(&extent))?))
    }

    fn content(&self, disk: &str, extent: u64, ext: Option<&Extent>) -> Result<ExtentContent, PetalError> {
        let Some(ext) = ext else {
            return Ok(ExtentContent { written: 0, data: Vec::new(), modified: 0 });
        };
        let mut data = Vec::with_capacity(ext.written.count_ones() as usize * BLOCK_BYTES);
        let mut buf = vec![0u8; BLOCK_BYTES];
        for i in 0..EXTENT_BLOCKS {
            if ext.written & (1 << i) != 0 {
                self.read_block(disk, extent, ext, i, &mut buf)?;
                data.extend_from_slice(&buf);
            }
        }
        Ok(ExtentContent { written: ext.written, data, modified: ext.modified })
    }

    /// A crc32 of each disk's logical contents (every committed extent's number and 64
    /// KiB), reading and checking every block. Equal on replicas at the same index.
    pub fn digest(&self) -> Result<Vec<(String, u32, u64)>, PetalError> {
        self.check_healthy()?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; BLOCK_BYTES];
        for (name, d) in &self.meta.disks {
            let mut h = crc32fast::Hasher::new();
            for (e, ext) in &d.extents {
                h.update(&e.to_le_bytes());
                for i in 0..EXTENT_BLOCKS {
                    if ext.written & (1 << i) != 0 {
                        self.read_block(name, *e, ext, i, &mut buf)?;
                    } else {
                        buf.fill(0);
                    }
                    h.update(&buf);
                }
            }
            out.push((name.clone(), h.finalize(), d.extents.len() as u64));
        }
        Ok(out)
    }

    // --- damage and repair ----------------------------------------------------------------

    /// Records that block `block` of extent `extent` of `disk` failed a check on read.
    /// Returns whether this was news.
    pub fn report_corrupt(&mut self, disk: &str, extent: u64, block: u64) -> Result<bool, PetalError> {
        let Some(ext) = self.meta.disks.get(disk).and_then(|d| d.extents.get(&extent)).copied() else {
            return Ok(false);
        };
        if self.damaged.get(&ext.slot).is_some_and(|b| b & (1 << block) != 0) {
            return Ok(false);
        }
        self.stats.corrupt_blocks += 1;
        self.mark_damaged(ext.slot, 1 << block)?;
        Ok(true)
    }

    fn mark_damaged(&mut self, slot: u64, bits: u16) -> Result<(), PetalError> {
        *self.damaged.entry(slot).or_insert(0) |= bits;
        self.save_damaged()
    }

    fn clear_damaged(&mut self, slot: u64, i: u64) {
        if let Some(bits) = self.damaged.get_mut(&slot) {
            if *bits & (1 << i) != 0 {
                *bits &= !(1 << i);
                if *bits == 0 {
                    self.damaged.remove(&slot);
                }
                let _ = self.save_damaged();
            }
        }
    }

    fn save_damaged(&mut self) -> Result<(), PetalError> {
        write_atomic(&self.dir.join(DAMAGED_FILE), &codec::encode(&self.damaged)).map_err(storage_failed)
    }

    /// Counts the damaged blocks that a disk can read. (A slot only the pin holds is not
    /// repaired: a peer asking for the pinned state is refused, and takes current bytes.)
    fn damaged_blocks(&self) -> u64 {
        let reachable: BTreeSet<u64> =
            self.meta.disks.values().flat_map(|d| d.extents.values().map(|e| e.slot)).collect();
        self.damaged
            .iter()
            .filter(|(slot, _)| reachable.contains(slot))
            .map(|(_, b)| b.count_ones() as u64)
            .sum()
    }

    /// Damaged extents, each named by one of its referrers (disk, extent).
    pub fn damaged_extents(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for slot in self.damaged.keys() {
            'find: for (name, d) in &self.meta.disks {
                for (e, ext) in &d.extents {
                    if ext.slot == *slot {
                        out.push((name.clone(), *e));
                        break 'find;
                    }
                }
            }
        }
        out
    }

    /// Rewrites the damaged blocks of extent `extent` of `disk` from a peer's copy, if
    /// that copy is of the same version (same last-modified index). Returns the blocks
    /// repaired, or `None` when the versions differ (one side must catch up first).
    pub fn repair(
        &mut self,
        disk: &str,
        extent: u64,
        peer: &ExtentContent,
    ) -> Result<Option<u64>, PetalError> {
        let Some(ext) = self.meta.disks.get(disk).and_then(|d| d.extents.get(&extent)).copied() else {
            return Ok(Some(0));
        };
        if ext.modified != peer.modified || ext.written != peer.written {
            return Ok(None);
        }
        let bits = self.damaged.get(&ext.slot).copied().unwrap_or(0);
        let mut repaired = 0;
        let mut k = 0;
        for i in 0..EXTENT_BLOCKS {
            if ext.written & (1 << i) == 0 {
                continue;
            }
            if bits & (1 << i) != 0 {
                let src = &peer.data[k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES];
                let result = self.blocks.write_block(block_of(ext.slot, i), src);
                self.fail_on_io(result)?;
                repaired += 1;
            }
            k += 1;
        }
        if repaired > 0 {
            let result = self.blocks.sync();
            self.fail_on_io(result)?;
            self.damaged.remove(&ext.slot);
            self.stats.repaired_blocks += repaired;
            self.save_damaged()?;
            tracing::info!(disk, extent, blocks = repaired, "repaired from a peer's copy");
        }
        Ok(Some(repaired))
    }

    // --- durability and snapshots ----------------------------------------------------------

    /// Makes everything applied so far durable: fsyncs the block file, then replaces
    /// `meta` with the maps, the applied index, `app`, and a new pin of every disk's
    /// extents (releasing the last pin). Only then are the slots released since the last
    /// persist freed for reuse and their blocks discarded: until the new `meta` is
    /// durable, a restart replays from the old one, which may still refer to them.
    /// Returns the manifest (the maps without the pin), from which
    /// [`Store::prepare_install`] on another replica rebuilds this state.
    pub fn persist(&mut self, app: Vec<u8>) -> Result<Vec<u8>, PetalError> {
        self.check_healthy()?;
        let result = self.blocks.sync();
        self.fail_on_io(result)?;
        if let Some(old) = self.meta.pinned.take() {
            for ext in old.disks.values().flat_map(|e| e.values()) {
                self.unref(ext.slot);
            }
        }
        self.meta.applied = self.applied;
        self.meta.app = app;
        let manifest = codec::encode(&self.meta);
        let pin = Pin {
            index: self.applied,
            disks: self.meta.disks.iter().map(|(name, d)| (name.clone(), d.extents.clone())).collect(),
        };
        for ext in pin.disks.values().flat_map(|e| e.values()) {
            *self.refs.get_mut(&ext.slot).expect("a used slot has referrers") += 1;
        }
        self.meta.pinned = Some(pin);
        if let Err(e) = write_atomic(&self.dir.join(META_FILE), &codec::encode(&self.meta)) {
            let result = Err(e);
            self.fail_on_io(result)?;
        }
        let released = std::mem::take(&mut self.pending_free);
        let result = (|| {
            for slot in &released {
                for i in 0..EXTENT_BLOCKS {
                    self.blocks.discard_block(block_of(*slot, i))?;
                }
            }
            Ok(())
        })();
        self.fail_on_io(result)?;
        self.free.extend(released);
        Ok(manifest)
    }

    /// The index of the pinned state (see [`Store::pinned_extent_content`]).
    pub fn pinned_index(&self) -> Option<u64> {
        self.meta.pinned.as_ref().map(|p| p.index)
    }

    /// Extent `extent` of `disk` exactly as of the last persist, if that was at `index`
    /// (else [`PetalError::Unavailable`]); `None` if the disk did not exist then.
    pub fn pinned_extent_content(
        &self,
        index: u64,
        disk: &str,
        extent: u64,
    ) -> Result<Option<ExtentContent>, PetalError> {
        self.check_healthy()?;
        let pin = self.meta.pinned.as_ref().filter(|p| p.index == index).ok_or_else(|| {
            PetalError::Unavailable(format!(
                "no state pinned at index {index} (have {:?})",
                self.pinned_index()
            ))
        })?;
        let Some(extents) = pin.disks.get(disk) else { return Ok(None) };
        Ok(Some(self.content(disk, extent, extents.get(&extent))?))
    }

    /// The index a manifest was taken at.
    pub fn manifest_index(manifest: &[u8]) -> Result<u64, PetalError> {
        let meta: Meta =
            codec::decode(manifest).map_err(|e| PetalError::Invalid(format!("bad manifest: {e}")))?;
        Ok(meta.applied)
    }

    /// Builds, beside the store in `dir`, the block file of `manifest`'s state (from
    /// [`Store::persist`] on a peer), fetching extents with `fetch`, which gets the
    /// manifest's index (the peer must have applied it) and a batch of (disk, extent),
    /// and returns, for each, `None` if the peer has no such disk any more, else its
    /// current contents. Contents newer than the manifest are fine: the log entries after
    /// it are replayed over them. Needs no access to the store itself, so readers go on
    /// meanwhile; [`Store::finish_install`] then swaps the new state in.
    pub fn prepare_install(
        dir: &Path,
        manifest: &[u8],
        applied: u64,
        fetch: &mut FetchFn<'_>,
    ) -> Result<Prepared, PetalError> {
        let mut meta: Meta =
            codec::decode(manifest).map_err(|e| PetalError::Invalid(format!("bad manifest: {e}")))?;
        meta.pinned = None;
        let tmp = dir.join(RESTORE_FILE);
        remove_block_file(&tmp)?;
        let blocks = BlockFile::open(&tmp, BLOCK_BYTES).map_err(storage_failed)?;
        // Each used slot once, with every (disk, extent) that refers to it, snapshots first:
        // they do not change, so their contents now are their contents at the manifest.
        let mut referrers: BTreeMap<u64, Vec<(bool, String, u64)>> = BTreeMap::new();
        for (name, d) in &meta.disks {
            for (e, ext) in &d.extents {
                referrers.entry(ext.slot).or_default().push((!d.read_only, name.clone(), *e));
            }
        }
        let mut wanted: Vec<(u64, Referrers)> = referrers
            .into_iter()
            .map(|(slot, mut r)| {
                r.sort();
                (slot, r)
            })
            .collect();
        let mut contents: HashMap<u64, ExtentContent> = HashMap::new();
        let mut attempt = 0;
        while !wanted.is_empty() {
            let mut next = Vec::new();
            for batch in wanted.chunks(FETCH_BATCH_EXTENTS) {
                let asks: Vec<(String, u64)> =
                    batch.iter().map(|(_, r)| (r[attempt].1.clone(), r[attempt].2)).collect();
                let got = fetch(meta.applied, &asks).map_err(PetalError::Unavailable)?;
                if got.len() != asks.len() {
                    return Err(PetalError::Unavailable("peer answered the wrong number of extents".into()));
                }
                for ((slot, r), content) in batch.iter().zip(got) {
                    match content {
                        Some(c) => {
                            contents.insert(*slot, c);
                        }
                        None if attempt + 1 < r.len() => next.push((*slot, r.clone())),
                        None => {} // every referrer is gone on the peer: replay deletes them here too
                    }
                }
            }
            wanted = next;
            attempt += 1;
        }
        let result = (|| {
            for (slot, c) in &contents {
                let mut k = 0;
                for i in 0..EXTENT_BLOCKS {
                    if c.written & (1 << i) != 0 {
                        blocks.write_block(
                            block_of(*slot, i),
                            &c.data[k * BLOCK_BYTES..(k + 1) * BLOCK_BYTES],
                        )?;
                        k += 1;
                    }
                }
            }
            blocks.sync()
        })();
        result.map_err(storage_failed)?;
        for d in meta.disks.values_mut() {
            for ext in d.extents.values_mut() {
                match contents.get(&ext.slot) {
                    Some(c) => {
                        ext.written = c.written;
                        ext.modified = c.modified;
                    }
                    None => ext.written = 0,
                }
            }
        }
        meta.applied = applied.max(meta.applied);
        Ok(Prepared { meta, extents: contents.len() })
    }

    /// Replaces this store with a prepared install: renames the new block file over the
    /// old one, then writes `meta`. A crash part-way leaves the old `meta`, whose index
    /// is below the snapshot's, so the install runs again at restart.
    pub fn finish_install(&mut self, prepared: Prepared) -> Result<(), PetalError> {
        let tmp = self.dir.join(RESTORE_FILE);
        let path = self.dir.join(BLOCKS_FILE);
        for (from, to) in [(tmp.clone(), path.clone()), (with_crc(&tmp), with_crc(&path))] {
            std::fs::rename(&from, &to).map_err(|e| io_failed("rename", &from, e))?;
        }
        write_atomic(&self.dir.join(META_FILE), &codec::encode(&prepared.meta)).map_err(storage_failed)?;
        self.damaged.clear();
        self.save_damaged()?;
        let mut fresh = Store::open(&self.dir)?;
        fresh.stats = self.stats;
        *self = fresh;
        tracing::info!(
            dir = %self.dir.display(),
            applied = self.applied,
            extents = prepared.extents,
            "installed a snapshot from peers"
        );
        Ok(())
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A snapshot install built by [`Store::prepare_install`], ready to swap in.
#[derive(Debug)]
pub struct Prepared {
    meta: Meta,
    extents: usize,
}

/// Fetches extents for [`Store::prepare_install`]: (manifest index, [(disk, extent)]) ->
/// for each, `None` if the peer has no such disk, else its contents.
pub type FetchFn<'a> = dyn FnMut(u64, &[(String, u64)]) -> Result<Vec<Option<ExtentContent>>, String> + 'a;

/// The (writable?, disk, extent) that refer to one slot.
type Referrers = Vec<(bool, String, u64)>;

/// Extents asked of a peer in one fetch call.
const FETCH_BATCH_EXTENTS: usize = 64;

fn with_crc(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".crc");
    PathBuf::from(s)
}

fn remove_block_file(path: &Path) -> Result<(), PetalError> {
    for p in [path.to_path_buf(), with_crc(path)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failed("remove", &p, e)),
        }
    }
    Ok(())
}

/// Moves a bad block file and its sidecar out of the way (kept for inspection).
fn set_aside(path: &Path) -> Result<(), PetalError> {
    for p in [path.to_path_buf(), with_crc(path)] {
        if p.exists() {
            let mut bad = p.as_os_str().to_owned();
            bad.push(".bad");
            std::fs::rename(&p, PathBuf::from(bad)).map_err(|e| io_failed("set aside", &p, e))?;
        }
    }
    Ok(())
}

fn io_failed(what: &str, path: &Path, e: std::io::Error) -> PetalError {
    PetalError::Unavailable(format!("{what} {}: {e}", path.display()))
}

fn storage_failed(e: StorageError) -> PetalError {
    PetalError::Unavailable(e.to_string())
}
