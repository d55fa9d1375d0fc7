//! Record framing for record append (GFS §3.3, §2.7.2): each record carries its length,
//! a unique id and checksums, so a reader can skip what record append leaves between
//! records (padding, pieces of failed appends, duplicates of retried ones) and hand each
//! record over exactly once.
//!
//! A frame, little-endian, starting at an 8-byte-aligned chunk offset:
//!
//! ```text
//! 0  magic "GFSR"   4  payload length u32   8  client id u64   16  seq u64
//! 24 payload crc32  28 header crc32 (of bytes 0..28)            32  payload, zero-padded to 8
//! ```
//!
//! Frames are a multiple of 8 bytes long and the primary places them back to back
//! from offset 0 (or from a 64 KiB boundary after a restart), so every frame starts at
//! an aligned offset and a scanner that lost its way tries the next aligned word.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// "GFSR" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"GFSR");
/// Bytes of a frame before the payload.
pub const HEADER_BYTES: usize = 32;
/// Frames start at multiples of this.
pub const ALIGN: usize = 8;

/// A record's unique id: the appending client and its sequence number. A retried
/// append reuses the id, which is how readers drop the duplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordId {
    /// The appending client (random, non-zero).
    pub client: u64,
    /// The client's sequence number for this record.
    pub seq: u64,
}

/// Bytes a frame of a `payload_bytes` payload takes in a chunk.
pub fn frame_bytes(payload_bytes: usize) -> usize {
    (HEADER_BYTES + payload_bytes).next_multiple_of(ALIGN)
}

/// Frames `payload` as record `id`.
pub fn frame(id: RecordId, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("records are bounded far below 4 GiB");
    let mut out = Vec::with_capacity(frame_bytes(payload.len()));
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&id.client.to_le_bytes());
    out.extend_from_slice(&id.seq.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..28]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(frame_bytes(payload.len()), 0);
    out
}

/// What lies at the start of a buffer of chunk bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A whole, intact record: its id, and where its payload lies in the buffer. The
    /// next frame starts `frame` bytes on.
    Record {
        /// The record's id.
        id: RecordId,
        /// Payload bytes, from the buffer's start.
        payload: std::ops::Range<usize>,
        /// Bytes of the whole frame.
        frame: usize,
    },
    /// Not a record (padding, a torn or damaged frame): skip this many bytes, a
    /// multiple of [`ALIGN`].
    Skip(usize),
    /// A header is intact but its frame runs past the buffer: read more of the chunk.
    NeedMore,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Looks at the start of `buf`, which begins at an aligned chunk offset. `at_end` says
/// the chunk ends where `buf` does, so a frame cut short there is torn, not pending.
/// Payloads longer than `max_payload` are taken for garbage.
pub fn step(buf: &[u8], at_end: bool, max_payload: usize) -> Step {
    if buf.len() < HEADER_BYTES {
        if !at_end {
            return Step::NeedMore;
        }
        return if buf.is_empty() { Step::Skip(0) } else { Step::Skip(ALIGN.min(buf.len())) };
    }
    if u32_at(buf, 0) != MAGIC {
        // Runs of zeros (padding, holes) are skipped in one step.
        let zeros = buf.chunks(ALIGN).take_while(|w| w.len() == ALIGN && w.iter().all(|b| *b == 0)).count();
        return Step::Skip(zeros.max(1) * ALIGN);
    }
    if crc32fast::hash(&buf[..28]) != u32_at(buf, 28) {
        return Step::Skip(ALIGN);
    }
    let len = u32_at(buf, 4) as usize;
    if len > max_payload {
        return Step::Skip(ALIGN);
    }
    let frame = frame_bytes(len);
    if buf.len() < frame {
        return if at_end { Step::Skip(ALIGN) } else { Step::NeedMore };
    }
    let payload = HEADER_BYTES..HEADER_BYTES + len;
    if crc32fast::hash(&buf[payload.clone()]) != u32_at(buf, 24) {
        return Step::Skip(ALIGN);
    }
    Step::Record { id: RecordId { client: u64_at(buf, 8), seq: u64_at(buf, 16) }, payload, frame }
}

/// Hands over each record once across a whole file: parses chunk bytes as they arrive,
/// skips what is not a record, and drops records whose id it has seen.
///
/// Memory: one id (16 bytes) per distinct record read, plus the unparsed tail of the
/// current chunk (at most one record).
#[derive(Debug, Default)]
pub struct Deduper {
    seen: HashSet<RecordId>,
    /// Records dropped as duplicates.
    pub duplicates: u64,
    /// Bytes skipped as padding or damage.
    pub skipped_bytes: u64,
}

impl Deduper {
    /// Parses as much of `buf` as possible; calls `out` with each new record. Returns the
    /// bytes consumed: the rest (a frame still arriving) must be passed again with more
    /// bytes after it, unless `at_end`, in which case everything is consumed.
    pub fn feed(
        &mut self,
        buf: &[u8],
        at_end: bool,
        max_payload: usize,
        mut out: impl FnMut(RecordId, &[u8]),
    ) -> usize {
        let mut pos = 0;
        while pos < buf.len() {
            match step(&buf[pos..], at_end, max_payload) {
                Step::Record { id, payload, frame } => {
                    if self.seen.insert(id) {
                        out(id, &buf[pos + payload.start..pos + payload.end]);
                    } else {
                        self.duplicates += 1;
                    }
                    pos += frame;
                }
                Step::Skip(n) => {
                    let n = n.max(1).min(buf.len() - pos);
                    self.skipped_bytes += n as u64;
                    pos += n;
                }
                Step::NeedMore => break,
            }
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> RecordId {
        RecordId { client: 7, seq }
    }

    fn collect(chunks: &[(&[u8], bool)], max: usize) -> (Vec<(RecordId, Vec<u8>)>, Deduper) {
        let mut d = Deduper::default();
        let mut out = Vec::new();
        for (bytes, at_end) in chunks {
            let used = d.feed(bytes, *at_end, max, |id, p| out.push((id, p.to_vec())));
            assert!(used == bytes.len() || !at_end);
        }
        (out, d)
    }

    #[test]
    fn frames_are_aligned_and_round_trip() {
        for len in [0, 1, 7, 8, 9, 100, 4096] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = frame(id(len as u64), &payload);
            assert_eq!(f.len() % ALIGN, 0);
            assert_eq!(f.len(), frame_bytes(len));
            match step(&f, true, 1 << 20) {
                Step::Record { id: got, payload: range, frame } => {
                    assert_eq!(got, id(len as u64));
                    assert_eq!(&f[range], &payload[..]);
                    assert_eq!(frame, f.len());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn skips_padding_torn_records_and_duplicates() {
        let mut chunk = Vec::new();
        chunk.extend(frame(id(1), b"one"));
        chunk.extend(vec![0u8; 4096]); // a hole left by a failed append
        let mut torn = frame(id(2), b"two, torn");
        torn.truncate(HEADER_BYTES + 3);
        torn.resize(torn.len().next_multiple_of(ALIGN), 0);
        chunk.extend(torn);
        chunk.extend(frame(id(2), b"two, torn")); // the retry
        chunk.extend(frame(id(1), b"one")); // a duplicate of a retried append
        let mut damaged = frame(id(3), b"three");
        damaged[HEADER_BYTES] ^= 1;
        chunk.extend(damaged);
        chunk.extend(frame(id(4), b"four"));
        chunk.extend(vec![0u8; 1000]); // padding to the end of the chunk
        let (records, d) = collect(&[(&chunk, true)], 1 << 20);
        let ids: Vec<u64> = records.iter().map(|(i, _)| i.seq).collect();
        assert_eq!(ids, vec![1, 2, 4]);
        assert_eq!(records[1].1, b"two, torn");
        assert_eq!(d.duplicates, 1);
        assert!(d.skipped_bytes >= 4096 + 1000);
    }

    #[test]
    fn records_split_across_buffers_wait_for_more() {
        let a = frame(id(1), &[1u8; 300]);
        let b = frame(id(2), &[2u8; 300]);
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for cut in [0, 5, 31, 32, 100, a.len(), a.len() + 40] {
            let mut d = Deduper::default();
            let mut out = Vec::new();
            let used = d.feed(&all[..cut], false, 1 << 20, |id, _| out.push(id.seq));
            let rest = &all[used..];
            let used2 = d.feed(rest, true, 1 << 20, |id, _| out.push(id.seq));
            assert_eq!(used2, rest.len());
            assert_eq!(out, vec![1, 2], "cut at {cut}");
        }
    }

    #[test]
    fn oversized_lengths_and_garbage_are_skipped() {
        let big = frame(id(1), &[0u8; 2000]);
        let (records, _) = collect(&[(&big, true)], 1000);
        assert!(records.is_empty());
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let (records, d) = collect(&[(&garbage, true)], 1 << 20);
        assert!(records.is_empty());
        assert_eq!(d.skipped_bytes, 4096);
        // A header cut off by the end of the chunk is torn, not pending.
        let (records, _) = collect(&[(&big[..20], true)], 1 << 20);
        assert!(records.is_empty());
    }
}
