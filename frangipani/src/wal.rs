//! The metadata write-ahead log: one per client, in that client's slot of the shared disk,
//! so that any other client can replay it after a crash (Frangipani §4).
//!
//! A record is a redo record: a list of whole 512-byte metadata sectors (address and image,
//! the image opening with its version). Records are queued by [`Wal::append`] and made
//! durable together by [`Wal::flush`] (group commit). The write-ahead rule is the caller's:
//! a sector may be written back only once the record holding it is durable; after writing
//! back everything a prefix of the log covers, the caller calls [`Wal::trim_to`] and that
//! space is reused. Recovery ([`read_log`], [`replay`], [`reset`]) applies a record's image
//! only where it is newer than the sector on disk, so replaying too much is harmless.
//!
//! # On-disk format
//!
//! The slot is a circular buffer of 512-byte log blocks. A record is one or more
//! consecutive blocks; every block repeats the record's header, all little-endian:
//!
//! ```text
//! offset size field
//!      0    4 magic        b"FWAL"
//!      4    4 block_crc    crc32 of bytes 8..512 of this block
//!      8    8 seq          the record's sequence number (1, 2, ...; never reused in a slot)
//!     16    8 head         oldest record still needed when this block was written
//!     24    4 index        this block's position in its record, from 0
//!     28    4 count        blocks in the record
//!     32    4 payload_len  bytes of the record's payload
//!     36    4 record_crc   crc32 of the record's whole payload
//!     40  472 payload      the next 472 bytes of the payload, zero-padded in the last block
//! ```
//!
//! The payload is `update_count: u32`, then per update `addr: u64` (a 512-aligned byte
//! offset on the disk) and the 512-byte sector image.
//!
//! A record is never split across the end of the region: one that does not fit before the
//! end starts at block 0, and the blocks it skipped keep whatever they held.
//!
//! # Finding the log without a pointer
//!
//! As in the paper, nothing but the blocks themselves says where the log is. Sequence
//! numbers increase over the slot's whole life, across owners ([`Wal::open`] and [`reset`]
//! continue after the highest sequence number on any intact block), so a sequence number
//! names at most one record. Recovery takes the highest `head` found on any intact block,
//! then follows records `head, head + 1, ...` for as long as each is complete and its crc
//! checks, wherever it lies. So stale blocks from earlier laps or earlier owners (lower
//! sequence numbers) and the torn tail of an unfinished write are never taken as log.
//!
//! # Why a crash loses nothing acknowledged
//!
//! A record's space is reused only after [`Wal::trim_to`] passed it, that is after its
//! sectors were written back, and every block written over it carries a `head` past it.
//! Any block of such a write that reaches the disk thus moves recovery's start past what it
//! overwrote, while the records from that start up to the last acknowledged one are never
//! overwritten. This holds whether a write lands whole, not at all, or, should a layer below
//! split it, as any subset of whole blocks (a 512-byte block lands whole: sector atomicity).
//! Because recovery stops at the first missing record, a record is returned only with all
//! the records before it: recovery sees a prefix of what was flushed.
//!
//! A client whose lease has expired cannot write into the slot after another client took
//! over: every write carries the lease expiry, and the disk refuses it once that has passed.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};

use crate::disk::{DiskError, VirtualDisk};
use crate::sector::{Sector, SECTOR_BYTES};

/// Bytes of a log block, the unit in which the log is written and checked.
const BLOCK_BYTES: usize = 512;
/// Identifies a log block.
const MAGIC: [u8; 4] = *b"FWAL";
/// Bytes of the header every block starts with.
const HEADER_BYTES: usize = 40;
/// Bytes of payload per block.
const CHUNK_BYTES: usize = BLOCK_BYTES - HEADER_BYTES;
/// Bytes of one update in a payload: address, then image.
const UPDATE_BYTES: u64 = 8 + SECTOR_BYTES as u64;
/// The largest slot: recovery reads a whole slot into memory, and payload lengths are u32.
/// Layout caps a slot just under 2 GiB (256 slots in 511 GiB).
const REGION_BYTES_MAX: u64 = 1 << 31;
/// Bytes asked of the disk per read while scanning a slot, below any sane request bound.
const READ_CHUNK_BYTES: u64 = 1 << 20;

/// One logged metadata change: the whole new image of the sector at `addr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectorUpdate {
    /// Byte offset of the sector on the disk; a multiple of 512.
    pub addr: u64,
    /// The new contents, version first.
    pub image: Sector,
}

/// A record as recovery reads it back: its sequence number and its updates.
pub type Record = (u64, Vec<SectorUpdate>);

/// A client's log slot: bytes `[start, start + len)` of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRegion {
    /// First byte; a multiple of 512.
    pub start: u64,
    /// Bytes; a multiple of 512, at least one block and at most 2 GiB.
    pub len: u64,
}

impl LogRegion {
    /// Blocks in the region, once its shape is checked (it comes from the superblock, so it
    /// may be garbage).
    fn blocks(&self) -> Result<u64, WalError> {
        let block = BLOCK_BYTES as u64;
        let ok = self.start.is_multiple_of(block)
            && self.len.is_multiple_of(block)
            && self.len > 0
            && self.len <= REGION_BYTES_MAX
            && self.start.checked_add(self.len).is_some();
        if !ok {
            return Err(WalError::Corrupt(format!("unusable log region {self:?}")));
        }
        Ok(self.len / block)
    }

    /// Disk address of log block `block`.
    fn block_addr(&self, block: u64) -> u64 {
        self.start + block * BLOCK_BYTES as u64
    }
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The disk failed or refused (fenced) a request.
    #[error("log I/O: {0}")]
    Disk(#[from] DiskError),
    /// No room for the record now: flush, write back the metadata, trim, and retry.
    #[error("log full")]
    Full,
    /// The record is larger than the whole log region.
    #[error("log record larger than the log region")]
    TooLarge,
    /// The region's shape is unusable, or an intact record does not decode.
    #[error("log corrupt: {0}")]
    Corrupt(String),
}

/// A client's own log: appends, group commits, trims.
#[derive(Debug)]
pub struct Wal {
    region: LogRegion,
    /// Blocks in the region.
    blocks: u64,
    /// Records still needed, oldest first: durable ones, then queued ones.
    /// Invariant: their seqs are exactly `head_seq..next_seq`.
    records: VecDeque<Placed>,
    /// The block just past the last record placed. Invariant: `tail_block <= blocks`.
    tail_block: u64,
    /// The seq the next appended record gets.
    next_seq: u64,
    /// Every record with a seq up to this is on disk. Invariant: `durable_seq < next_seq`.
    durable_seq: u64,
    /// The oldest record still needed; `next_seq` when none is.
    /// Invariant: `head_seq <= durable_seq + 1`, since only durable records are trimmed.
    head_seq: u64,
}

/// Where a record sits in the region.
#[derive(Debug)]
struct Placed {
    seq: u64,
    start_block: u64,
    blocks: u64,
    /// The encoded updates while the record is queued; dropped once it is durable.
    payload: Option<Vec<u8>>,
}

impl Wal {
    /// Opens the slot's log for appending once recovery has replayed it (or on a fresh
    /// slot): nothing in it is needed any more, and numbering continues after the highest
    /// sequence number on the disk so old blocks are never mistaken for new ones.
    pub fn open(disk: &dyn VirtualDisk, region: LogRegion) -> Result<Wal, WalError> {
        let scan = Scan::read(disk, region)?;
        let (next_seq, tail_block) = scan.resume()?;
        Ok(Wal {
            region,
            blocks: scan.blocks,
            records: VecDeque::new(),
            tail_block,
            next_seq,
            durable_seq: next_seq - 1,
            head_seq: next_seq,
        })
    }

    /// Queues a record (not yet durable) and returns its sequence number.
    ///
    /// `Err(Full)` when it does not fit beside the records still needed: the caller flushes,
    /// writes back, trims and retries. `Err(TooLarge)` when it would not fit even in an
    /// empty region.
    ///
    /// Panics if an address is not 512-aligned (a bug in the caller).
    pub fn append(&mut self, updates: Vec<SectorUpdate>) -> Result<u64, WalError> {
        for u in &updates {
            assert!(
                u.addr.is_multiple_of(SECTOR_BYTES as u64),
                "logged sector address {:#x} is not 512-aligned",
                u.addr
            );
        }
        let blocks = blocks_for(4 + updates.len() as u64 * UPDATE_BYTES);
        if blocks > self.blocks {
            return Err(WalError::TooLarge);
        }
        let start_block = self.place(blocks).ok_or(WalError::Full)?;
        let seq = self.next_seq;
        self.records.push_back(Placed { seq, start_block, blocks, payload: Some(encode_updates(&updates)) });
        self.tail_block = start_block + blocks;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Group commit: writes every queued record, each contiguous run of blocks in one write
    /// (one run, or two when the queue wraps past the region's end). Once it returns
    /// `Ok(seq)`, every record up to `seq` is durable. On error the records not written stay
    /// queued, and a later flush writes them again at the same place.
    pub fn flush(&mut self, disk: &dyn VirtualDisk, lease_expiry_ms: Option<u64>) -> Result<u64, WalError> {
        let mut first = self.records.len() - (self.next_seq - 1 - self.durable_seq) as usize;
        let mut runs = 0;
        while first < self.records.len() {
            let mut end = first + 1;
            while end < self.records.len() && self.records[end].start_block == self.records[end - 1].tail() {
                end += 1;
            }
            let run = self.records.range(first..end);
            let mut bytes = Vec::with_capacity(run.clone().map(|r| r.blocks as usize * BLOCK_BYTES).sum());
            for r in run {
                let payload = r.payload.as_deref().expect("a queued record keeps its payload");
                encode_record(r.seq, self.head_seq, payload, &mut bytes);
            }
            disk.write(self.region.block_addr(self.records[first].start_block), &bytes, lease_expiry_ms)?;
            for r in self.records.range_mut(first..end) {
                r.payload = None;
            }
            self.durable_seq = self.records[end - 1].seq;
            runs += 1;
            first = end;
        }
        debug_assert!(runs <= 2, "the queue wraps at most once");
        Ok(self.durable_seq)
    }

    /// The fraction of the region that records still needed occupy (queued ones included,
    /// and the blocks skipped at the end when one wrapped).
    pub fn used_fraction(&self) -> f64 {
        self.used_blocks() as f64 / self.blocks as f64
    }

    /// The caller has written back every sector covered by records up to `seq`: they are no
    /// longer needed and their space is reused. The new head reaches the disk with the next
    /// record written, and until then recovery may replay them again, harmlessly.
    ///
    /// Panics if `seq` is past [`Wal::durable_seq`]: writing back a sector before its record
    /// is durable breaks the write-ahead rule.
    pub fn trim_to(&mut self, seq: u64) {
        assert!(seq <= self.durable_seq, "trim_to({seq}) past the durable log ({})", self.durable_seq);
        if seq < self.head_seq {
            return;
        }
        self.head_seq = seq + 1;
        while self.records.front().is_some_and(|r| r.seq <= seq) {
            self.records.pop_front();
        }
    }

    /// The last record known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The oldest record still needed; the next record's seq when none is.
    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    /// Blocks from the oldest needed record to the tail, circularly.
    fn used_blocks(&self) -> u64 {
        let Some(front) = self.records.front() else { return 0 };
        let (f, t) = (front.start_block, self.tail_block);
        if t > f {
            t - f
        } else {
            self.blocks - f + t // wrapped; t == f means full
        }
    }

    /// Where a record of `len` blocks would start, if it fits now: at the tail, or at
    /// block 0 when it would cross the region's end.
    fn place(&self, len: u64) -> Option<u64> {
        let at = if self.tail_block + len <= self.blocks { self.tail_block } else { 0 };
        let Some(front) = self.records.front() else { return Some(at) };
        let (f, t) = (front.start_block, self.tail_block);
        let fits = if t > f {
            // Needed blocks are [f, t): free are [t, end) and [0, f).
            at == t || len <= f
        } else {
            // Wrapped: free are [t, f) (none when t == f).
            at == t && t + len <= f
        };
        fits.then_some(at)
    }
}

impl Placed {
    /// The block just past this record.
    fn tail(&self) -> u64 {
        self.start_block + self.blocks
    }
}

/// Recovery: reads the whole region and returns the log's records from its head on, in
/// sequence order: each complete, with a valid crc, one seq after the previous; it stops at
/// the first missing, torn or corrupt record. Garbage yields an empty log, or `Corrupt` when
/// the region's shape itself is unusable.
pub fn read_log(disk: &dyn VirtualDisk, region: LogRegion) -> Result<Vec<Record>, WalError> {
    let scan = Scan::read(disk, region)?;
    let mut log = Vec::new();
    let mut seq = scan.head;
    while let Some(&start) = scan.records.get(&seq) {
        let updates = decode_updates(&scan.payload(start))
            .map_err(|e| WalError::Corrupt(format!("log record {seq} at block {start}: {e}")))?;
        log.push((seq, updates));
        let Some(next) = seq.checked_add(1) else { break };
        seq = next;
    }
    if let Some((&later, _)) = scan.records.range(seq..).next() {
        tracing::warn!(missing = seq, later, "log record missing or damaged: ignoring the records after it");
    }
    Ok(log)
}

/// Applies records to the disk: each sector's newest image among them is written only if
/// its version is newer than the version on disk at that address. Returns how many sectors
/// were written. Idempotent.
pub fn replay(
    disk: &dyn VirtualDisk,
    records: &[Record],
    lease_expiry_ms: Option<u64>,
) -> Result<usize, WalError> {
    let mut newest: BTreeMap<u64, &Sector> = BTreeMap::new();
    for u in records.iter().flat_map(|(_, updates)| updates) {
        let image = newest.entry(u.addr).or_insert(&u.image);
        if u.image.version() >= image.version() {
            *image = &u.image;
        }
    }
    let mut written = 0;
    for (addr, image) in newest {
        let on_disk = Sector::from_bytes(&read_exact(disk, addr, SECTOR_BYTES as u64)?);
        if image.version() > on_disk.version() {
            disk.write(addr, image.bytes(), lease_expiry_ms)?;
            written += 1;
        }
    }
    Ok(written)
}

/// After recovery, hides the replayed log from later recoveries, so a crash of the next
/// owner before it logs anything does not replay it again. Writes one empty record whose
/// seq is past every seq in the slot and whose head is past itself.
///
/// Not needed for safety: replay applies only newer versions, so replaying an old log
/// again writes nothing, and the first record the next owner writes hides it anyway (its
/// head is past every old seq). It keeps recovery from redoing work, and from depending,
/// for as long as the old log lies there, on freed metadata sectors never being reused as
/// unversioned file data. The region is not decommitted: decommit carries no
/// lease, so a recovering client whose lease ran out could wipe the next owner's log.
pub fn reset(
    disk: &dyn VirtualDisk,
    region: LogRegion,
    lease_expiry_ms: Option<u64>,
) -> Result<(), WalError> {
    let scan = Scan::read(disk, region)?;
    if scan.max_seq == 0 {
        return Ok(()); // nothing in the slot can be taken for a record
    }
    let (seq, tail_block) = scan.resume()?;
    let head =
        seq.checked_add(1).ok_or_else(|| WalError::Corrupt("log sequence numbers exhausted".into()))?;
    let at = if tail_block < scan.blocks { tail_block } else { 0 };
    let mut block = Vec::with_capacity(BLOCK_BYTES);
    encode_record(seq, head, &encode_updates(&[]), &mut block);
    disk.write(region.block_addr(at), &block, lease_expiry_ms)?;
    Ok(())
}

/// Blocks that a payload of `payload_len` bytes takes.
fn blocks_for(payload_len: u64) -> u64 {
    payload_len.div_ceil(CHUNK_BYTES as u64).max(1)
}

/// The payload of a record.
fn encode_updates(updates: &[SectorUpdate]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + updates.len() * UPDATE_BYTES as usize);
    p.extend_from_slice(&(updates.len() as u32).to_le_bytes());
    for u in updates {
        p.extend_from_slice(&u.addr.to_le_bytes());
        p.extend_from_slice(u.image.bytes());
    }
    p
}

/// The updates of a payload whose crc checked.
fn decode_updates(p: &[u8]) -> Result<Vec<SectorUpdate>, String> {
    let count =
        u32::from_le_bytes(p.get(..4).ok_or("payload shorter than its count")?.try_into().expect("4 bytes"));
    if p.len() as u64 != 4 + count as u64 * UPDATE_BYTES {
        return Err(format!("{} payload bytes for {count} updates", p.len()));
    }
    p[4..]
        .chunks_exact(UPDATE_BYTES as usize)
        .map(|u| {
            let addr = le_u64(u, 0);
            if !addr.is_multiple_of(SECTOR_BYTES as u64) {
                return Err(format!("sector address {addr:#x} is not 512-aligned"));
            }
            Ok(SectorUpdate { addr, image: Sector::from_bytes(&u[8..]) })
        })
        .collect()
}

/// A block's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockHeader {
    seq: u64,
    head: u64,
    index: u32,
    count: u32,
    payload_len: u32,
    record_crc: u32,
}

impl BlockHeader {
    /// Whether `other` is a block of the same record (heads may differ: a rewrite after a
    /// failed flush carries a later head).
    fn same_record(&self, other: &BlockHeader) -> bool {
        (self.seq, self.count, self.payload_len, self.record_crc)
            == (other.seq, other.count, other.payload_len, other.record_crc)
    }
}

/// Appends the blocks of record `seq` to `out`.
fn encode_record(seq: u64, head: u64, payload: &[u8], out: &mut Vec<u8>) {
    let count = blocks_for(payload.len() as u64) as u32;
    let record_crc = crc32fast::hash(payload);
    for index in 0..count {
        let from = (index as usize * CHUNK_BYTES).min(payload.len());
        let chunk = &payload[from..(from + CHUNK_BYTES).min(payload.len())];
        let header = BlockHeader { seq, head, index, count, payload_len: payload.len() as u32, record_crc };
        encode_block(&header, chunk, out);
    }
}

/// Appends one block: `header`, then `chunk` of the payload, zero-padded.
fn encode_block(header: &BlockHeader, chunk: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + BLOCK_BYTES, 0);
    let b = &mut out[at..];
    b[0..4].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&header.seq.to_le_bytes());
    b[16..24].copy_from_slice(&header.head.to_le_bytes());
    b[24..28].copy_from_slice(&header.index.to_le_bytes());
    b[28..32].copy_from_slice(&header.count.to_le_bytes());
    b[32..36].copy_from_slice(&header.payload_len.to_le_bytes());
    b[36..40].copy_from_slice(&header.record_crc.to_le_bytes());
    b[HEADER_BYTES..HEADER_BYTES + chunk.len()].copy_from_slice(chunk);
    let crc = crc32fast::hash(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(decode_block(b), Some(*header), "a block reads back as written");
}

/// The header of an intact block; `None` for anything else.
fn decode_block(b: &[u8]) -> Option<BlockHeader> {
    if b[0..4] != MAGIC || crc32fast::hash(&b[8..]) != le_u32(b, 4) {
        return None;
    }
    let h = BlockHeader {
        seq: le_u64(b, 8),
        head: le_u64(b, 16),
        index: le_u32(b, 24),
        count: le_u32(b, 28),
        payload_len: le_u32(b, 32),
        record_crc: le_u32(b, 36),
    };
    // A head is never past the record after the one it is written with.
    let sane = h.seq >= 1
        && h.head <= h.seq.saturating_add(1)
        && h.index < h.count
        && blocks_for(h.payload_len as u64) == h.count as u64;
    sane.then_some(h)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads exactly `len` bytes, treating a short answer as a disk failure.
fn read_exact(disk: &dyn VirtualDisk, offset: u64, len: u64) -> Result<Vec<u8>, WalError> {
    let bytes = disk.read(offset, len as usize)?;
    if bytes.len() as u64 != len {
        return Err(
            DiskError::Io(format!("short read at {offset:#x}: {} of {len} bytes", bytes.len())).into()
        );
    }
    Ok(bytes)
}

/// What one pass over a whole slot found.
struct Scan {
    /// Blocks in the region.
    blocks: u64,
    /// The region's bytes.
    bytes: Vec<u8>,
    /// The header of every intact block, by block.
    headers: Vec<Option<BlockHeader>>,
    /// First block of every complete record with a valid crc, by seq.
    records: BTreeMap<u64, u64>,
    /// The highest seq on any intact block, of a complete record or not; 0 if none.
    max_seq: u64,
    /// The highest head on any intact block: where the log starts.
    head: u64,
}

impl Scan {
    /// Reads the whole region and indexes its intact blocks and complete records.
    fn read(disk: &dyn VirtualDisk, region: LogRegion) -> Result<Scan, WalError> {
        let blocks = region.blocks()?;
        let mut bytes = Vec::with_capacity(region.len as usize);
        while (bytes.len() as u64) < region.len {
            let at = bytes.len() as u64;
            bytes.extend(read_exact(disk, region.start + at, READ_CHUNK_BYTES.min(region.len - at))?);
        }
        let headers: Vec<_> = bytes.chunks_exact(BLOCK_BYTES).map(decode_block).collect();
        let mut scan = Scan { blocks, bytes, headers, records: BTreeMap::new(), max_seq: 0, head: 0 };
        for h in scan.headers.iter().flatten() {
            scan.max_seq = scan.max_seq.max(h.seq);
            scan.head = scan.head.max(h.head);
        }
        for start in 0..blocks {
            let Some(first) = scan.headers[start as usize].filter(|h| h.index == 0) else { continue };
            if !scan.complete(start, &first) {
                continue;
            }
            match scan.records.entry(first.seq) {
                Entry::Vacant(v) => {
                    v.insert(start);
                }
                // Cannot happen while seqs are never reused; keep the first found.
                Entry::Occupied(o) => {
                    tracing::warn!(seq = first.seq, start, other = o.get(), "two log records with one seq")
                }
            }
        }
        Ok(scan)
    }

    /// Whether every block of the record starting at `start` is there and the crc checks.
    fn complete(&self, start: u64, first: &BlockHeader) -> bool {
        let end = start + first.count as u64;
        if end > self.blocks {
            return false; // records never cross the region's end
        }
        let all_there = (start..end).all(|b| {
            let h = self.headers[b as usize];
            h.is_some_and(|h| h.same_record(first) && (h.index as u64) == b - start)
        });
        all_there && crc32fast::hash(&self.payload(start)) == first.record_crc
    }

    /// The payload of the record starting at `start`, whose blocks are all there.
    fn payload(&self, start: u64) -> Vec<u8> {
        let first = self.headers[start as usize].expect("a record starts with an intact block");
        let mut payload = Vec::with_capacity(first.payload_len as usize);
        for b in start..start + first.count as u64 {
            let take = (first.payload_len as usize - payload.len()).min(CHUNK_BYTES);
            let at = b as usize * BLOCK_BYTES + HEADER_BYTES;
            payload.extend_from_slice(&self.bytes[at..at + take]);
        }
        payload
    }

    /// Where a new owner continues: the seq after every seq in the slot, and the block after
    /// the newest complete record (any place would do: nothing in the slot is needed).
    fn resume(&self) -> Result<(u64, u64), WalError> {
        let next_seq = self
            .max_seq
            .checked_add(1)
            .ok_or_else(|| WalError::Corrupt("log sequence numbers exhausted".into()))?;
        let tail_block = self.records.last_key_value().map_or(0, |(_, &start)| {
            start + self.headers[start as usize].expect("a record starts with an intact block").count as u64
        });
        Ok((next_seq, tail_block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemDisk;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::Mutex;

    /// Where the metadata sectors of these tests live, away from the log.
    const DATA_BASE: u64 = 1 << 30;

    fn region(blocks: u64) -> LogRegion {
        LogRegion { start: 1 << 20, len: blocks * BLOCK_BYTES as u64 }
    }

    /// An image of sector `n` at `version`, its payload derived from both.
    fn update(n: u64, version: u64) -> SectorUpdate {
        let mut image = Sector::zeroed();
        image.set_version(version);
        image.payload_mut().fill((n * 31 + version) as u8);
        SectorUpdate { addr: DATA_BASE + n * SECTOR_BYTES as u64, image }
    }

    /// 1 to 3 updates of random sectors, versions from a counter as a file system would.
    fn random_updates(rng: &mut StdRng, version: &mut u64) -> Vec<SectorUpdate> {
        (0..rng.gen_range(1..=3))
            .map(|_| {
                *version += 1;
                update(rng.gen_range(0..20), *version)
            })
            .collect()
    }

    fn seqs(log: &[Record]) -> Vec<u64> {
        log.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn wal_round_trip_and_durable_head() {
        let disk = MemDisk::new();
        let region = region(64);
        let mut wal = Wal::open(&disk, region).unwrap();
        assert_eq!((wal.durable_seq(), wal.head_seq()), (0, 1));
        let records: Vec<_> = (0..3u64).map(|i| vec![update(i, 1), update(i + 10, 1)]).collect();
        for (i, r) in records.iter().enumerate() {
            assert_eq!(wal.append(r.clone()).unwrap(), i as u64 + 1);
        }
        assert_eq!(wal.append(vec![]).unwrap(), 4); // an empty record is one block
        assert!(read_log(&disk, region).unwrap().is_empty(), "nothing is durable before flush");
        assert_eq!(wal.flush(&disk, None).unwrap(), 4);
        let log = read_log(&disk, region).unwrap();
        assert_eq!(seqs(&log), [1, 2, 3, 4]);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(&log[i].1, r);
        }
        assert!(log[3].1.is_empty());

        // A trim reaches the disk with the next record written: until then recovery replays
        // the trimmed records again, which versions make harmless.
        wal.trim_to(2);
        assert_eq!(wal.head_seq(), 3);
        assert_eq!(seqs(&read_log(&disk, region).unwrap()), [1, 2, 3, 4]);
        wal.append(vec![update(7, 2)]).unwrap();
        wal.flush(&disk, None).unwrap();
        assert_eq!(seqs(&read_log(&disk, region).unwrap()), [3, 4, 5]);
    }

    #[test]
    fn wal_group_commit_is_one_write_or_two_when_wrapping() {
        let disk = MemDisk::new();
        let region = region(32);
        let mut wal = Wal::open(&disk, region).unwrap();
        for i in 0..10 {
            wal.append(vec![update(i, 1)]).unwrap(); // two blocks each
        }
        let before = disk.writes();
        assert_eq!(wal.flush(&disk, None).unwrap(), 10);
        assert_eq!(disk.writes() - before, 1);
        assert_eq!(wal.flush(&disk, None).unwrap(), 10);
        assert_eq!(disk.writes() - before, 1, "nothing queued, nothing written");

        // The tail is at block 20: six records fill blocks 20..32, two more wrap to 0..4.
        wal.trim_to(10);
        for i in 0..8 {
            wal.append(vec![update(i, 2)]).unwrap();
        }
        let before = disk.writes();
        assert_eq!(wal.flush(&disk, None).unwrap(), 18);
        assert_eq!(disk.writes() - before, 2);
        assert_eq!(seqs(&read_log(&disk, region).unwrap()), (11..=18).collect::<Vec<_>>());
    }

    #[test]
    fn wal_wraps_many_times_and_reads_exactly_the_untrimmed_records() {
        let disk = MemDisk::new();
        let region = region(64);
        let mut wal = Wal::open(&disk, region).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut version = 0;
        let mut model = BTreeMap::new();
        let mut blocks_logged = 0;
        for _ in 0..500 {
            for _ in 0..rng.gen_range(1..=4) {
                let updates = random_updates(&mut rng, &mut version);
                blocks_logged += blocks_for(4 + updates.len() as u64 * UPDATE_BYTES);
                let seq = match wal.append(updates.clone()) {
                    Ok(seq) => seq,
                    Err(WalError::Full) => {
                        // Reclaim: make everything durable, "write it back", trim it all.
                        let durable = wal.flush(&disk, None).unwrap();
                        wal.trim_to(durable);
                        wal.append(updates.clone()).unwrap()
                    }
                    Err(e) => panic!("append: {e}"),
                };
                model.insert(seq, updates);
            }
            // Reclaim at three quarters full, as the file system does; sometimes trim less.
            if wal.used_fraction() >= 0.75 {
                wal.trim_to(wal.durable_seq());
            } else if rng.gen_bool(0.3) {
                wal.trim_to(rng.gen_range(wal.head_seq() - 1..=wal.durable_seq()));
            }
            wal.flush(&disk, None).unwrap();
            assert!(wal.used_fraction() <= 1.0);
            model.retain(|&seq, _| seq >= wal.head_seq());
            // Stale records of earlier laps lie all around; none may come back.
            let log = read_log(&disk, region).unwrap();
            let expected: Vec<_> = model.iter().map(|(&s, u)| (s, u.clone())).collect();
            assert_eq!(log, expected);
        }
        assert!(blocks_logged > 20 * 64, "only {blocks_logged} blocks logged: too few laps");
    }

    #[test]
    fn wal_replay_applies_only_newer_versions_and_is_idempotent() {
        let disk = MemDisk::new();
        let on_disk = |n: u64| Sector::from_bytes(&disk.read(update(n, 0).addr, SECTOR_BYTES).unwrap());
        for (n, version) in [(0, 5), (2, 7)] {
            let u = update(n, version);
            disk.write(u.addr, u.image.bytes(), None).unwrap();
        }
        let records = vec![
            (1, vec![update(0, 3), update(1, 2)]), // sector 0 on disk is newer (v5)
            (2, vec![update(2, 7), update(3, 1)]), // sector 2 on disk is as new (v7)
            (3, vec![update(3, 2)]),               // sector 3: a later record wins
        ];
        assert_eq!(replay(&disk, &records, None).unwrap(), 2);
        assert_eq!(on_disk(0), update(0, 5).image);
        assert_eq!(on_disk(1), update(1, 2).image);
        assert_eq!(on_disk(2), update(2, 7).image);
        assert_eq!(on_disk(3), update(3, 2).image);
        let writes = disk.writes();
        assert_eq!(replay(&disk, &records, None).unwrap(), 0);
        assert_eq!(disk.writes(), writes);
    }

    #[test]
    fn wal_torn_or_damaged_record_ends_the_log() {
        for zero in [true, false] {
            for damaged in 0..6 {
                let disk = MemDisk::new();
                let region = region(64);
                let mut wal = Wal::open(&disk, region).unwrap();
                let r1 = vec![update(1, 1)]; // blocks 0..2
                let r2 = vec![update(2, 1)]; // blocks 2..4
                wal.append(r1.clone()).unwrap();
                wal.append(r2.clone()).unwrap();
                wal.flush(&disk, None).unwrap();
                let r3: Vec<_> = (3..8).map(|n| update(n, 1)).collect(); // 6 blocks: 4..10
                assert_eq!(blocks_for(4 + 5 * UPDATE_BYTES), 6);
                wal.append(r3).unwrap();
                wal.append(vec![update(9, 1)]).unwrap(); // blocks 10..12, intact
                wal.flush(&disk, None).unwrap();
                assert_eq!(read_log(&disk, region).unwrap().len(), 4);

                // As if only some of record 3's blocks had reached the disk, or one rotted.
                let addr = region.block_addr(4 + damaged);
                let mut block = disk.read(addr, BLOCK_BYTES).unwrap();
                if zero {
                    block.fill(0);
                } else {
                    block[100] ^= 0x40;
                }
                disk.write(addr, &block, None).unwrap();
                assert_eq!(read_log(&disk, region).unwrap(), vec![(1, r1.clone()), (2, r2.clone())]);
            }
        }
    }

    /// How much of the write that a crash interrupts reaches the disk.
    #[derive(Clone, Copy, Debug)]
    enum Tear {
        /// All of it (its acknowledgement is lost) or none.
        Whole,
        /// Its first k blocks.
        Prefix,
        /// Any of its blocks: a layer below split it and sent the pieces in parallel.
        Subset,
        /// Exactly its first k blocks.
        First(usize),
    }

    /// A disk whose writer crashes at a chosen write: from then on the `MemDisk` is frozen,
    /// keeping only what reached it.
    struct CrashDisk {
        disk: MemDisk,
        crash: Mutex<(u64, Tear, StdRng)>,
    }

    impl VirtualDisk for CrashDisk {
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
            self.disk.read(offset, len)
        }

        fn write(&self, offset: u64, data: &[u8], lease_expiry_ms: Option<u64>) -> Result<(), DiskError> {
            let mut crash = self.crash.lock().unwrap();
            let (writes_left, tear, rng) = &mut *crash;
            if *writes_left > 0 {
                *writes_left -= 1;
                return self.disk.write(offset, data, lease_expiry_ms);
            }
            let blocks = data.len() / BLOCK_BYTES;
            let landed: Vec<bool> = match tear {
                Tear::Whole => vec![rng.gen_bool(0.5); blocks],
                Tear::Prefix => {
                    let k = rng.gen_range(0..=blocks);
                    (0..blocks).map(|b| b < k).collect()
                }
                Tear::Subset => (0..blocks).map(|_| rng.gen_bool(0.5)).collect(),
                Tear::First(k) => (0..blocks).map(|b| b < *k).collect(),
            };
            for (b, _) in landed.iter().enumerate().filter(|(_, &l)| l) {
                let at = b * BLOCK_BYTES;
                self.disk.write(offset + at as u64, &data[at..at + BLOCK_BYTES], lease_expiry_ms)?;
            }
            self.disk.freeze(true);
            Err(DiskError::Io("crashed".into()))
        }

        fn decommit(&self, offset: u64, len: u64, lease: Option<u64>) -> Result<(), DiskError> {
            self.disk.decommit(offset, len, lease)
        }
    }

    /// A client appends, flushes and trims at random until its disk crashes; then another
    /// client recovers its log, and a third takes the slot over.
    fn crash_and_recover(seed: u64, tear: Tear) {
        let mut rng = StdRng::seed_from_u64(seed);
        let region = region(48);
        let crash_at = rng.gen_range(0..80);
        let disk = CrashDisk {
            disk: MemDisk::new(),
            crash: Mutex::new((crash_at, tear, StdRng::seed_from_u64(!seed))),
        };
        let mut wal = Wal::open(&disk, region).unwrap();
        let mut appended: Vec<Vec<SectorUpdate>> = Vec::new(); // record seq s at s - 1
        let mut flushed_up_to = 0; // the last record any flush tried to write
        let mut version = 0;
        'client: for _ in 0..300 {
            match rng.gen_range(0..10) {
                0..=6 => {
                    let updates = random_updates(&mut rng, &mut version);
                    let seq = match wal.append(updates.clone()) {
                        Ok(seq) => seq,
                        Err(WalError::Full) => {
                            // Reclaim as the file system does: flush, write back, trim, retry.
                            flushed_up_to = appended.len() as u64;
                            match wal.flush(&disk, None) {
                                Ok(durable) => wal.trim_to(durable),
                                Err(_) => break 'client,
                            }
                            wal.append(updates.clone()).unwrap()
                        }
                        Err(e) => panic!("seed {seed}: append: {e}"),
                    };
                    assert_eq!(seq, appended.len() as u64 + 1);
                    appended.push(updates);
                }
                7..=8 => {
                    flushed_up_to = appended.len() as u64;
                    if wal.flush(&disk, None).is_err() {
                        break 'client;
                    }
                }
                _ => wal.trim_to(rng.gen_range(wal.head_seq() - 1..=wal.durable_seq())),
            }
        }
        let (needed_from, acked) = (wal.head_seq(), wal.durable_seq());
        drop(wal);
        disk.disk.freeze(false);

        // Recovery sees a prefix of what was flushed: all that is still needed and was
        // acknowledged, maybe more of what was flushed, maybe trimmed records before it.
        let log = read_log(&disk.disk, region).unwrap();
        let ctx =
            format!("seed {seed} {tear:?}: crash at write {crash_at}, head {needed_from}, acked {acked}");
        for (i, (seq, updates)) in log.iter().enumerate() {
            assert_eq!(*seq, log[0].0 + i as u64, "{ctx}: not consecutive: {:?}", seqs(&log));
            assert!(*seq <= flushed_up_to, "{ctx}: record {seq} was never flushed");
            assert_eq!(updates, &appended[*seq as usize - 1], "{ctx}: record {seq} differs");
        }
        if needed_from <= acked {
            let (first, last) = (log.first().map_or(u64::MAX, |r| r.0), log.last().map_or(0, |r| r.0));
            assert!(first <= needed_from && last >= acked, "{ctx}: got {:?}", seqs(&log));
        }

        // Replay leaves every sector at its newest logged version.
        replay(&disk.disk, &log, None).unwrap();
        let mut newest = BTreeMap::new();
        for u in log.iter().flat_map(|(_, u)| u) {
            newest.insert(u.addr, u.image.version().max(newest.get(&u.addr).copied().unwrap_or(0)));
        }
        for (addr, version) in newest {
            let on_disk = Sector::from_bytes(&disk.disk.read(addr, SECTOR_BYTES).unwrap());
            assert!(on_disk.version() >= version, "{ctx}: sector {addr:#x} not replayed");
        }

        // The slot's next owner: the old log never comes back.
        reset(&disk.disk, region, None).unwrap();
        assert!(read_log(&disk.disk, region).unwrap().is_empty(), "{ctx}: log survived reset");
        let mut next = Wal::open(&disk.disk, region).unwrap();
        let updates = random_updates(&mut rng, &mut version);
        let seq = next.append(updates.clone()).unwrap();
        assert!(seq > log.last().map_or(0, |r| r.0), "{ctx}: seq {seq} reused");
        next.flush(&disk.disk, None).unwrap();
        assert_eq!(read_log(&disk.disk, region).unwrap(), vec![(seq, updates)], "{ctx}");
    }

    #[test]
    fn wal_torn_write_over_records_trimmed_but_not_durably_loses_nothing() {
        // The log is full. The client writes back records 1..=5 and trims them, but no record
        // has carried the new head to the disk yet: the disk's newest record still names
        // record 1 as the head. The next write goes over records 1..=3; whatever part of it
        // lands, records 6..=8 (durable, not written back) must survive.
        let region = region(16);
        for tear in (0..=6).map(Tear::First).chain([Tear::Subset; 50]) {
            let disk =
                CrashDisk { disk: MemDisk::new(), crash: Mutex::new((1, tear, StdRng::seed_from_u64(5))) };
            let mut wal = Wal::open(&disk, region).unwrap();
            let records: Vec<_> = (1..12).map(|i| vec![update(i, 1)]).collect(); // 2 blocks each
            for r in &records[..8] {
                wal.append(r.clone()).unwrap();
            }
            assert_eq!(wal.flush(&disk, None).unwrap(), 8);
            assert_eq!(wal.used_fraction(), 1.0);
            wal.trim_to(5);
            for r in &records[8..] {
                wal.append(r.clone()).unwrap();
            }
            assert!(wal.flush(&disk, None).is_err());
            disk.disk.freeze(false);

            let log = read_log(&disk.disk, region).unwrap();
            let got = seqs(&log);
            assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{tear:?}: {got:?}");
            assert!(got.contains(&6) && got.contains(&8), "{tear:?}: lost a needed record: {got:?}");
            for (seq, updates) in &log {
                assert_eq!(updates, &records[*seq as usize - 1], "{tear:?}");
            }
            if let Tear::First(k) = tear {
                assert_eq!(got.last(), Some(&(8 + k as u64 / 2)), "{tear:?}: the complete new records");
            }
        }
    }

    #[test]
    fn wal_crash_at_random_points_keeps_every_acknowledged_record() {
        for seed in 0..500 {
            for tear in [Tear::Whole, Tear::Prefix, Tear::Subset] {
                crash_and_recover(seed, tear);
            }
        }
    }

    #[test]
    fn wal_new_owner_without_reset_still_hides_the_replayed_log() {
        let disk = MemDisk::new();
        let region = region(64);
        let mut a = Wal::open(&disk, region).unwrap();
        for i in 0..5 {
            a.append(vec![update(i, 1)]).unwrap();
        }
        a.flush(&disk, None).unwrap();
        a.append(vec![update(9, 1)]).unwrap(); // never flushed: lost with A
        drop(a);
        let log = read_log(&disk, region).unwrap();
        assert_eq!(seqs(&log), [1, 2, 3, 4, 5]);
        assert_eq!(replay(&disk, &log, None).unwrap(), 5);

        // No reset: C still starts past A's records, and its first record's head hides them.
        let mut c = Wal::open(&disk, region).unwrap();
        assert_eq!((c.durable_seq(), c.head_seq()), (5, 6));
        let mine = vec![update(1, 2)];
        c.append(mine.clone()).unwrap();
        c.flush(&disk, None).unwrap();
        assert_eq!(read_log(&disk, region).unwrap(), vec![(6, mine)]);
    }

    #[test]
    fn wal_reset_hides_the_log_and_the_next_owner_continues_past_it() {
        let disk = MemDisk::new();
        let region = region(16);
        let mut a = Wal::open(&disk, region).unwrap();
        // Several laps, so the slot is full of stale blocks.
        for i in 0..30 {
            a.append(vec![update(i, 1)]).unwrap();
            let durable = a.flush(&disk, None).unwrap();
            a.trim_to(durable.saturating_sub(2));
        }
        drop(a);
        let log = read_log(&disk, region).unwrap();
        assert_eq!(seqs(&log), [28, 29, 30]);
        replay(&disk, &log, None).unwrap();
        reset(&disk, region, None).unwrap();
        assert!(read_log(&disk, region).unwrap().is_empty());
        reset(&disk, region, None).unwrap(); // idempotent in effect

        let mut c = Wal::open(&disk, region).unwrap();
        assert!(c.head_seq() > 31, "seqs continue past the old log and the reset marks");
        assert!(read_log(&disk, region).unwrap().is_empty(), "opening writes nothing");
        let mine: Vec<_> = (0..3).map(|i| vec![update(i, 2)]).collect();
        let first = c.append(mine[0].clone()).unwrap();
        c.append(mine[1].clone()).unwrap();
        c.append(mine[2].clone()).unwrap();
        c.flush(&disk, None).unwrap();
        let expected: Vec<_> = mine.into_iter().enumerate().map(|(i, m)| (first + i as u64, m)).collect();
        assert_eq!(read_log(&disk, region).unwrap(), expected);
    }

    #[test]
    fn wal_append_reports_too_large_and_full() {
        let disk = MemDisk::new();
        let region = region(16);
        let mut wal = Wal::open(&disk, region).unwrap();
        let many = |n: u64| (0..n).map(|i| update(i, 1)).collect::<Vec<_>>();
        assert!(matches!(wal.append(many(15)), Err(WalError::TooLarge))); // 17 blocks
        for _ in 0..8 {
            wal.append(vec![update(0, 1)]).unwrap(); // 2 blocks each: 16 in all
        }
        assert_eq!(wal.used_fraction(), 1.0);
        assert!(matches!(wal.append(vec![]), Err(WalError::Full)));
        wal.trim_to(0); // queued records cannot be trimmed: nothing changes
        assert!(matches!(wal.append(vec![]), Err(WalError::Full)));
        let durable = wal.flush(&disk, None).unwrap();
        wal.trim_to(durable);
        assert_eq!(wal.used_fraction(), 0.0);
        assert_eq!(wal.append(many(14)).unwrap(), 9); // exactly 16 blocks: the whole region
        wal.flush(&disk, None).unwrap();
        assert_eq!(seqs(&read_log(&disk, region).unwrap()), [9]);
    }

    #[test]
    #[should_panic(expected = "past the durable log")]
    fn wal_trimming_an_undurable_record_is_a_bug() {
        let disk = MemDisk::new();
        let mut wal = Wal::open(&disk, region(16)).unwrap();
        wal.append(vec![update(0, 1)]).unwrap();
        wal.trim_to(1);
    }

    #[test]
    fn wal_garbage_region_reads_as_empty_without_panicking() {
        let region = region(64);
        for seed in 0..50 {
            let disk = MemDisk::new();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut bytes = vec![0u8; region.len as usize];
            rng.fill(&mut bytes[..]);
            if seed % 2 == 0 {
                // Garbage that looks like log blocks, short of the crc.
                for block in bytes.chunks_exact_mut(BLOCK_BYTES) {
                    block[..4].copy_from_slice(&MAGIC);
                }
            }
            disk.write(region.start, &bytes, None).unwrap();
            assert!(read_log(&disk, region).unwrap().is_empty());
            let mut wal = Wal::open(&disk, region).unwrap();
            wal.append(vec![update(1, 1)]).unwrap();
            wal.flush(&disk, None).unwrap();
            assert_eq!(seqs(&read_log(&disk, region).unwrap()), [1]);
        }
        let bad = LogRegion { start: 100, len: 512 };
        assert!(matches!(read_log(&MemDisk::new(), bad), Err(WalError::Corrupt(_))));
        assert!(matches!(
            Wal::open(&MemDisk::new(), LogRegion { start: 0, len: 0 }),
            Err(WalError::Corrupt(_))
        ));
    }

    #[test]
    fn wal_damaged_log_yields_consecutive_true_records() {
        let region = region(32);
        for seed in 0..200 {
            let disk = MemDisk::new();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut wal = Wal::open(&disk, region).unwrap();
            let mut appended = Vec::new();
            let mut version = 0;
            for _ in 0..40 {
                let updates = random_updates(&mut rng, &mut version);
                if wal.append(updates.clone()).is_err() {
                    let durable = wal.flush(&disk, None).unwrap();
                    wal.trim_to(durable);
                    continue;
                }
                appended.push(updates);
                let durable = wal.flush(&disk, None).unwrap();
                wal.trim_to(durable.saturating_sub(3));
            }
            for _ in 0..rng.gen_range(1..20) {
                let at = region.start + rng.gen_range(0..region.len);
                let byte = disk.read(at, 1).unwrap()[0] ^ rng.gen_range(1..=255u8);
                disk.write(at, &[byte], None).unwrap();
            }
            let log = read_log(&disk, region).unwrap();
            for (i, (seq, updates)) in log.iter().enumerate() {
                assert_eq!(*seq, log[0].0 + i as u64, "seed {seed}");
                assert_eq!(updates, &appended[*seq as usize - 1], "seed {seed}");
            }
        }
    }
}
