//! A log of records numbered by consecutive sequence numbers (Raft's log).
//!
//! The records live in segment files in one directory, each named after the
//! sequence number of its first record (`{first_seq:020}.seg`) and holding frames
//! `len u32 LE | crc32(payload) u32 LE | payload`. Only the last segment is written
//! to; it rolls over to a new one once the next record would take it past
//! [`LogOptions::segment_bytes`].
//!
//! Crash safety rests on one rule checked at [`RecordLog::open`]: the log is the
//! longest run of whole, checksummed records whose segments follow one another
//! without a gap; whatever comes after is cut. Every operation below orders its
//! writes, fsyncs and removals so that a crash at any point leaves a directory that
//! this rule reads as a prefix of what was appended, holding at least what was
//! synced. [`RecordLog::reset`], which replaces the whole log, is the exception: it
//! goes through a marker file that `open` finishes.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::atomic_file::{read_checked, sync_dir, write_atomic};
use crate::error::{CorruptAt, IoContext, StorageError};

/// Bytes of a frame header: `len u32 | crc u32`.
const HEADER_BYTES: u64 = 8;
const SEGMENT_SUFFIX: &str = ".seg";
/// Digits of the zero-padded first sequence number in a segment's name.
const SEGMENT_DIGITS: usize = 20;
/// Marker holding the `next_seq` of a [`RecordLog::reset`] in progress.
const RESET_MARKER: &str = "RESET";
/// Appended frames gather in memory and go to the file once this many are pending
/// (and at every sync), so small appends cost no system call each.
const PENDING_BYTES_MAX: usize = 256 * 1024;
/// Read buffer for scanning segments.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Tuning for a [`RecordLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A segment rolls over to a new file once the next record would take it past
    /// this size. A segment always takes at least one record, however large.
    pub segment_bytes: u64,
    /// The largest payload accepted by `append`; on open, a frame claiming more is
    /// treated as corrupt, so a damaged length field never drives an allocation.
    pub max_record_bytes: u32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes: 64 << 20, max_record_bytes: 64 << 20 }
    }
}

/// What [`RecordLog::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records kept: `next_seq() - first_seq()`.
    pub records: u64,
    /// Set when a torn or corrupt tail was cut off.
    pub cut: Option<CutTail>,
}

/// Where [`RecordLog::open`] cut the log, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutTail {
    /// The segment file where the first bad byte was found.
    pub segment: PathBuf,
    /// Byte offset in that file where the log now ends.
    pub offset: u64,
    /// Bytes dropped: the rest of that file plus every later segment file.
    pub bytes_dropped: u64,
    /// Which check failed.
    pub reason: String,
}

impl fmt::Display for CutTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log cut at {} offset {}, {} bytes dropped: {}",
            self.segment.display(),
            self.offset,
            self.bytes_dropped,
            self.reason
        )
    }
}

/// One segment file as the log knows it.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    records: u64,
    /// Bytes of whole frames, including any still pending in memory.
    bytes: u64,
}

impl Segment {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.records
    }
}

/// A durable, checksummed log of records with consecutive sequence numbers.
///
/// Appends are buffered; [`RecordLog::sync`] makes them durable. If a write or sync
/// fails the log is poisoned: every later call returns
/// [`StorageError::Poisoned`] until it is reopened.
pub struct RecordLog {
    dir: PathBuf,
    opts: LogOptions,
    /// Invariant: not empty; each segment starts at the previous one's `next_seq`;
    /// the last one is the active segment.
    segments: Vec<Segment>,
    /// The active segment, opened for appending.
    active: File,
    /// Frames appended to the active segment but not yet written to its file.
    /// Invariant: `pending.len() <= active segment's bytes`.
    pending: Vec<u8>,
    /// Bytes went to the active file since it was last synced.
    data_unsynced: bool,
    /// A segment file was created since the directory was last synced.
    dir_unsynced: bool,
    /// A write or sync failed; memory and disk may disagree.
    poisoned: bool,
}

impl fmt::Debug for RecordLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordLog")
            .field("dir", &self.dir)
            .field("first_seq", &self.first_seq())
            .field("next_seq", &self.next_seq())
            .field("segments", &self.segments.len())
            .field("pending_bytes", &self.pending.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl RecordLog {
    /// Opens the log in `dir`, creating the directory if missing. Recovers to the
    /// last whole record: a torn or corrupt tail, or segments after a gap, are cut
    /// off durably and described in [`OpenReport::cut`]. A brand-new log's first
    /// record gets sequence number 1.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<(RecordLog, OpenReport), StorageError> {
        fs::create_dir_all(dir).at("create log directory", dir)?;
        let marker = dir.join(RESET_MARKER);
        remove_if_exists(&dir.join(format!("{RESET_MARKER}.tmp")))?;
        if let Some(raw) = read_checked(&marker)? {
            let next_seq = <[u8; 8]>::try_from(raw.as_slice()).map_err(|_| StorageError::Corrupt {
                path: marker.clone(),
                at: CorruptAt::Offset(0),
                detail: format!("reset marker holds {} bytes, expected 8", raw.len()),
            })?;
            finish_reset(dir, u64::from_le_bytes(next_seq))?;
        }

        let mut found = list_segments(dir)?;
        if found.is_empty() {
            let path = create_segment(dir, 1)?;
            sync_dir(dir)?;
            found.push((1, path));
        }

        let mut segments: Vec<Segment> = Vec::with_capacity(found.len());
        let mut cut = None;
        for (i, (first_seq, path)) in found.iter().enumerate() {
            if let Some(prev) = segments.last() {
                if *first_seq != prev.next_seq() {
                    let reason = format!(
                        "segment starts at seq {first_seq} but the previous one ends before seq {}",
                        prev.next_seq()
                    );
                    let dropped = remove_segments_newest_first(dir, &found[i..])?;
                    cut = Some(CutTail { segment: path.clone(), offset: 0, bytes_dropped: dropped, reason });
                    break;
                }
            }
            let scan = scan_segment(path, *first_seq, opts.max_record_bytes)?;
            segments.push(Segment {
                path: path.clone(),
                first_seq: *first_seq,
                records: scan.records,
                bytes: scan.valid_bytes,
            });
            if let Some(reason) = scan.bad {
                let later = remove_segments_newest_first(dir, &found[i + 1..])?;
                let file = OpenOptions::new().write(true).open(path).at("open segment", path)?;
                file.set_len(scan.valid_bytes).at("truncate segment", path)?;
                file.sync_data().at("sync segment", path)?;
                cut = Some(CutTail {
                    segment: path.clone(),
                    offset: scan.valid_bytes,
                    bytes_dropped: scan.file_bytes - scan.valid_bytes + later,
                    reason,
                });
                break;
            }
        }
        if let Some(cut) = &cut {
            tracing::warn!(dir = %dir.display(), "{cut}");
        }

        let active_path = &segments.last().expect("the first segment is always kept").path;
        let active = open_append(active_path)?;
        let log = RecordLog {
            dir: dir.to_path_buf(),
            opts,
            segments,
            active,
            pending: Vec::new(),
            data_unsynced: false,
            dir_unsynced: false,
            poisoned: false,
        };
        let report = OpenReport { records: log.next_seq() - log.first_seq(), cut };
        Ok((log, report))
    }

    /// Sequence number of the first record kept (equal to `next_seq()` when empty).
    pub fn first_seq(&self) -> u64 {
        self.segments[0].first_seq
    }

    /// Sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.active_segment().next_seq()
    }

    /// Appends a record and returns its sequence number. Buffered: readable at once
    /// through [`RecordLog::read_from`], durable only after [`RecordLog::sync`].
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StorageError> {
        self.check_poisoned()?;
        let payload_bytes = payload.len() as u64;
        if payload_bytes > u64::from(self.opts.max_record_bytes) {
            return Err(StorageError::RecordTooLarge {
                bytes: payload_bytes,
                max_bytes: u64::from(self.opts.max_record_bytes),
            });
        }
        let seq = self.next_seq();
        if seq == u64::MAX {
            return Err(StorageError::OutOfRange { detail: "sequence numbers exhausted".to_string() });
        }
        let frame_bytes = HEADER_BYTES + payload_bytes;
        let active = self.active_segment();
        if active.records > 0 && active.bytes + frame_bytes > self.opts.segment_bytes {
            self.mutate(RecordLog::roll_over)?;
        }
        // Fits in u32: checked against max_record_bytes above.
        self.pending.extend_from_slice(&(payload_bytes as u32).to_le_bytes());
        self.pending.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.pending.extend_from_slice(payload);
        let active = self.segments.last_mut().expect("segments is never empty");
        active.records += 1;
        active.bytes += frame_bytes;
        if self.pending.len() >= PENDING_BYTES_MAX {
            self.mutate(RecordLog::flush_pending)?;
        }
        Ok(seq)
    }

    /// Makes every appended record durable: writes out pending records, fdatasyncs
    /// the active segment, and fsyncs the directory if a segment was created.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.mutate(|log| {
            log.flush_pending()?;
            if log.data_unsynced {
                let path = &log.active_segment().path;
                log.active.sync_data().at("sync segment", path)?;
                log.data_unsynced = false;
            }
            if log.dir_unsynced {
                sync_dir(&log.dir)?;
                log.dir_unsynced = false;
            }
            Ok(())
        })
    }

    /// Drops the records numbered `seq` and above, durably: later segments are
    /// removed and the segment holding `seq` is cut at that record's frame. A no-op
    /// if `seq >= next_seq()`; [`StorageError::OutOfRange`] if `seq < first_seq()`.
    /// Records below `seq` are durable afterwards too.
    pub fn truncate_from(&mut self, seq: u64) -> Result<(), StorageError> {
        self.check_poisoned()?;
        if seq >= self.next_seq() {
            return Ok(());
        }
        if seq < self.first_seq() {
            return Err(StorageError::OutOfRange {
                detail: format!("cannot truncate from seq {seq}: the log starts at seq {}", self.first_seq()),
            });
        }
        self.mutate(|log| log.truncate_inner(seq))
    }

    /// Says that records below `seq` are no longer needed: removes, durably and
    /// oldest first, every segment that holds only such records. The active segment
    /// is always kept, so `first_seq()` may stay below `seq`.
    pub fn compact_to(&mut self, seq: u64) -> Result<(), StorageError> {
        self.mutate(|log| {
            while log.segments.len() > 1 && log.segments[0].next_seq() <= seq {
                // One removal at a time, each made durable before the next, so a
                // crash cannot leave a gap at the front that open would cut at.
                remove_segment(&log.dir, &log.segments[0].path)?;
                log.segments.remove(0);
            }
            Ok(())
        })
    }

    /// Removes every record, durably; the next append gets `next_seq`, which also
    /// holds after a reopen. Atomic across crashes: a marker file records the
    /// intent and [`RecordLog::open`] finishes an interrupted reset.
    pub fn reset(&mut self, next_seq: u64) -> Result<(), StorageError> {
        self.mutate(|log| {
            log.pending.clear();
            let marker = log.dir.join(RESET_MARKER);
            write_atomic(&marker, &next_seq.to_le_bytes())?;
            let path = finish_reset(&log.dir, next_seq)?;
            log.active = open_append(&path)?;
            log.segments = vec![Segment { path, first_seq: next_seq, records: 0, bytes: 0 }];
            log.data_unsynced = false;
            log.dir_unsynced = false;
            Ok(())
        })
    }

    /// Every record numbered `max(seq, first_seq())` and above, in order, including
    /// appended records not yet synced. Each is checked against its crc again; a
    /// mismatch is [`StorageError::Corrupt`].
    pub fn read_from(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.check_poisoned()?;
        let start = seq.max(self.first_seq());
        let mut records = Vec::new();
        let last = self.segments.len() - 1;
        for (i, segment) in self.segments.iter().enumerate() {
            if segment.next_seq() <= start {
                continue;
            }
            let pending: &[u8] = if i == last { &self.pending } else { &[] };
            read_segment(segment, pending, self.opts.max_record_bytes, |seq, _offset, payload| {
                if seq >= start {
                    records.push((seq, payload));
                }
                ControlFlow::Continue(())
            })?;
        }
        Ok(records)
    }

    fn active_segment(&self) -> &Segment {
        self.segments.last().expect("segments is never empty")
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned { dir: self.dir.clone() });
        }
        Ok(())
    }

    /// Runs an operation that changes the files; if it fails part way, memory and
    /// disk may disagree, so the log refuses further work until reopened.
    fn mutate<T>(
        &mut self,
        op: impl FnOnce(&mut RecordLog) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        self.check_poisoned()?;
        let result = op(self);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn flush_pending(&mut self) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = &self.segments.last().expect("segments is never empty").path;
        self.active.write_all(&self.pending).at("write segment", path)?;
        self.pending.clear();
        self.data_unsynced = true;
        Ok(())
    }

    fn roll_over(&mut self) -> Result<(), StorageError> {
        self.flush_pending()?;
        // The old segment's records must be durable before any record of the new
        // one can be, or a crash could keep the later records and lose the earlier.
        if self.data_unsynced {
            let path = &self.active_segment().path;
            self.active.sync_data().at("sync segment", path)?;
            self.data_unsynced = false;
        }
        let first_seq = self.next_seq();
        let path = create_segment(&self.dir, first_seq)?;
        self.active = open_append(&path)?;
        self.segments.push(Segment { path, first_seq, records: 0, bytes: 0 });
        self.dir_unsynced = true;
        Ok(())
    }

    /// Precondition: `first_seq() <= seq < next_seq()`.
    fn truncate_inner(&mut self, seq: u64) -> Result<(), StorageError> {
        self.flush_pending()?;
        let index = self.segments.iter().rposition(|s| s.first_seq <= seq).expect("first_seq() <= seq");
        let offset = self.frame_offset(index, seq)?;
        // Newest first, so a crash part way leaves a prefix of the old log.
        while self.segments.len() > index + 1 {
            let segment = self.segments.pop().expect("len > index + 1");
            remove_segment(&self.dir, &segment.path)?;
        }
        let segment = &mut self.segments[index];
        let file = open_append(&segment.path)?;
        file.set_len(offset).at("truncate segment", &segment.path)?;
        file.sync_data().at("sync segment", &segment.path)?;
        segment.records = seq - segment.first_seq;
        segment.bytes = offset;
        self.active = file;
        self.data_unsynced = false;
        if self.dir_unsynced {
            sync_dir(&self.dir)?;
            self.dir_unsynced = false;
        }
        Ok(())
    }

    /// Byte offset of record `seq`'s frame in segment `index` (whose pending bytes
    /// have been flushed).
    fn frame_offset(&self, index: usize, seq: u64) -> Result<u64, StorageError> {
        let segment = &self.segments[index];
        if seq == segment.first_seq {
            return Ok(0);
        }
        let mut found = segment.bytes;
        read_segment(segment, &[], self.opts.max_record_bytes, |record_seq, offset, _payload| {
            if record_seq == seq {
                found = offset;
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(found)
    }
}

impl Drop for RecordLog {
    /// Hands pending records to the OS (not durable: a later crash may lose them),
    /// so a clean shutdown without `sync` loses nothing. Errors are ignored: open
    /// cuts any torn tail.
    fn drop(&mut self) {
        if !self.poisoned && !self.pending.is_empty() {
            let _ = self.active.write_all(&self.pending);
        }
    }
}

/// The outcome of reading one frame.
enum Frame {
    Record(Vec<u8>),
    /// Clean end: no bytes left.
    End,
    /// The frame at the current offset is torn or corrupt; says why.
    Bad(String),
}

/// Reads frames from `len` bytes of `inner`, checking each against its length
/// limit, the bytes left and its crc before handing it out.
struct FrameReader<R> {
    inner: R,
    /// Offset of the next frame.
    offset: u64,
    len: u64,
    max_record_bytes: u32,
}

impl<R: Read> FrameReader<R> {
    fn new(inner: R, len: u64, max_record_bytes: u32) -> Self {
        FrameReader { inner, offset: 0, len, max_record_bytes }
    }

    fn next_frame(&mut self) -> io::Result<Frame> {
        let left = self.len - self.offset;
        if left == 0 {
            return Ok(Frame::End);
        }
        if left < HEADER_BYTES {
            return Ok(Frame::Bad(format!("torn header: {left} bytes left, a header takes {HEADER_BYTES}")));
        }
        let mut header = [0u8; HEADER_BYTES as usize];
        self.inner.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let stored_crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > self.max_record_bytes {
            return Ok(Frame::Bad(format!(
                "record length {len} exceeds the limit of {}",
                self.max_record_bytes
            )));
        }
        // Checked before allocating, so a garbage length costs nothing.
        if u64::from(len) > left - HEADER_BYTES {
            return Ok(Frame::Bad(format!(
                "torn record: header says {len} bytes, {} left",
                left - HEADER_BYTES
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.inner.read_exact(&mut payload)?;
        let actual_crc = crc32fast::hash(&payload);
        if actual_crc != stored_crc {
            return Ok(Frame::Bad(format!(
                "crc mismatch: stored {stored_crc:#010x}, computed {actual_crc:#010x}"
            )));
        }
        self.offset += HEADER_BYTES + u64::from(len);
        Ok(Frame::Record(payload))
    }
}

/// What [`scan_segment`] found in one segment file.
struct Scan {
    records: u64,
    /// Bytes of whole, valid frames from the start of the file.
    valid_bytes: u64,
    file_bytes: u64,
    /// Why the frame at `valid_bytes` is bad, if the file does not end there.
    bad: Option<String>,
}

/// Reads a segment at open, to the first bad frame or the end of the file.
fn scan_segment(path: &Path, first_seq: u64, max_record_bytes: u32) -> Result<Scan, StorageError> {
    let file = File::open(path).at("open segment", path)?;
    let file_bytes = file.metadata().at("stat segment", path)?.len();
    let mut reader =
        FrameReader::new(BufReader::with_capacity(READ_BUFFER_BYTES, file), file_bytes, max_record_bytes);
    let mut records = 0u64;
    loop {
        let valid_bytes = reader.offset;
        let bad = match reader.next_frame().at("read segment", path)? {
            Frame::Record(_) if first_seq.checked_add(records + 1).is_none() => {
                Some("sequence number overflows u64".to_string())
            }
            Frame::Record(_) => {
                records += 1;
                continue;
            }
            Frame::End => None,
            Frame::Bad(reason) => Some(reason),
        };
        return Ok(Scan { records, valid_bytes, file_bytes, bad });
    }
}

/// Reads the records of `segment`, whose last `pending` bytes are still in memory,
/// calling `visit(seq, frame_offset, payload)` for each in order until it breaks.
/// Anything short of the records open found there is [`StorageError::Corrupt`].
fn read_segment(
    segment: &Segment,
    pending: &[u8],
    max_record_bytes: u32,
    mut visit: impl FnMut(u64, u64, Vec<u8>) -> ControlFlow<()>,
) -> Result<(), StorageError> {
    let path = &segment.path;
    let flushed = segment.bytes - pending.len() as u64;
    let file = File::open(path).at("open segment", path)?;
    let file_bytes = file.metadata().at("stat segment", path)?.len();
    if file_bytes < flushed {
        return Err(StorageError::Corrupt {
            path: path.clone(),
            at: CorruptAt::Offset(file_bytes),
            detail: format!("segment shrank to {file_bytes} bytes, {flushed} expected"),
        });
    }
    let source = BufReader::with_capacity(READ_BUFFER_BYTES, file).take(flushed).chain(pending);
    let mut reader = FrameReader::new(source, segment.bytes, max_record_bytes);
    for i in 0..segment.records {
        let offset = reader.offset;
        let detail = match reader.next_frame().at("read segment", path)? {
            Frame::Record(payload) => {
                if visit(segment.first_seq + i, offset, payload).is_break() {
                    return Ok(());
                }
                continue;
            }
            Frame::End => format!("segment ends after {i} of {} records", segment.records),
            Frame::Bad(reason) => reason,
        };
        return Err(StorageError::Corrupt { path: path.clone(), at: CorruptAt::Offset(offset), detail });
    }
    Ok(())
}

/// Segment files in `dir`, sorted by first sequence number.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).at("list log directory", dir)? {
        let entry = entry.at("list log directory", dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        match stem.parse::<u64>() {
            Ok(first_seq) if stem.len() == SEGMENT_DIGITS && stem.bytes().all(|b| b.is_ascii_digit()) => {
                segments.push((first_seq, entry.path()));
            }
            _ => {
                tracing::warn!(path = %entry.path().display(), "ignoring file with a malformed segment name")
            }
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:0width$}{SEGMENT_SUFFIX}", width = SEGMENT_DIGITS))
}

/// Creates an empty segment file (emptying any stale one of that name) and syncs
/// it; the caller syncs the directory.
fn create_segment(dir: &Path, first_seq: u64) -> Result<PathBuf, StorageError> {
    let path = segment_path(dir, first_seq);
    let file =
        OpenOptions::new().write(true).create(true).truncate(true).open(&path).at("create segment", &path)?;
    file.sync_all().at("sync segment", &path)?;
    Ok(path)
}

fn open_append(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new().append(true).open(path).at("open segment", path)
}

/// Removes one segment file and makes the removal durable.
fn remove_segment(dir: &Path, path: &Path) -> Result<(), StorageError> {
    fs::remove_file(path).at("remove segment", path)?;
    sync_dir(dir)
}

/// Removes `segments` newest first, each durably; returns the bytes they held.
fn remove_segments_newest_first(dir: &Path, segments: &[(u64, PathBuf)]) -> Result<u64, StorageError> {
    let mut bytes = 0;
    for (_, path) in segments.iter().rev() {
        bytes += fs::metadata(path).at("stat segment", path)?.len();
        remove_segment(dir, path)?;
    }
    Ok(bytes)
}

/// Second half of a reset, once the marker is durable: removes every segment,
/// creates the empty one starting at `next_seq`, then removes the marker. Safe to
/// repeat after a crash at any point.
fn finish_reset(dir: &Path, next_seq: u64) -> Result<PathBuf, StorageError> {
    for (_, path) in list_segments(dir)? {
        fs::remove_file(&path).at("remove segment", &path)?;
    }
    let path = create_segment(dir, next_seq)?;
    sync_dir(dir)?;
    let marker = dir.join(RESET_MARKER);
    fs::remove_file(&marker).at("remove reset marker", &marker)?;
    sync_dir(dir)?;
    tracing::debug!(dir = %dir.display(), next_seq, "record log reset");
    Ok(path)
}

fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at("remove", path),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small(segment_bytes: u64) -> LogOptions {
        LogOptions { segment_bytes, max_record_bytes: 1024 }
    }

    fn open(dir: &Path, opts: LogOptions) -> (RecordLog, OpenReport) {
        RecordLog::open(dir, opts).unwrap()
    }

    fn payload(seq: u64) -> Vec<u8> {
        format!("record {seq}").into_bytes()
    }

    /// Appends records `next_seq()..` until `next_seq() == end`, each with `payload(seq)`.
    fn append_until(log: &mut RecordLog, end: u64) {
        while log.next_seq() < end {
            let seq = log.next_seq();
            assert_eq!(log.append(&payload(seq)).unwrap(), seq);
        }
    }

    fn expect_records(log: &RecordLog, from: u64, to: u64) {
        let expected: Vec<_> = (from..to).map(|s| (s, payload(s))).collect();
        assert_eq!(log.read_from(0).unwrap(), expected);
        assert_eq!((log.first_seq(), log.next_seq()), (from, to));
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        list_segments(dir).unwrap().into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn new_log_is_empty_and_starts_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let (log, report) = open(&dir.path().join("log"), LogOptions::default());
        assert_eq!(report, OpenReport { records: 0, cut: None });
        assert_eq!((log.first_seq(), log.next_seq()), (1, 1));
        assert!(log.read_from(1).unwrap().is_empty());
    }

    #[test]
    fn append_sync_reopen_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), LogOptions::default());
        assert_eq!(log.append(b"").unwrap(), 1);
        append_until(&mut log, 10);
        log.sync().unwrap();
        let read = log.read_from(2).unwrap();
        assert_eq!(read.len(), 8);
        assert_eq!(read[0], (2, payload(2)));
        assert_eq!(log.read_from(1).unwrap()[0], (1, vec![]));
        assert!(log.read_from(10).unwrap().is_empty());
        assert!(log.read_from(1000).unwrap().is_empty());
        drop(log);

        let (log, report) = open(dir.path(), LogOptions::default());
        assert_eq!(report, OpenReport { records: 9, cut: None });
        assert_eq!(log.read_from(0).unwrap(), read_with_first(&read));
    }

    fn read_with_first(rest: &[(u64, Vec<u8>)]) -> Vec<(u64, Vec<u8>)> {
        let mut all = vec![(1, vec![])];
        all.extend_from_slice(rest);
        all
    }

    #[test]
    fn unsynced_appends_are_readable_and_survive_a_clean_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), LogOptions::default());
        append_until(&mut log, 4);
        assert!(!log.pending.is_empty());
        expect_records(&log, 1, 4);
        drop(log);
        let (log, _) = open(dir.path(), LogOptions::default());
        expect_records(&log, 1, 4);
    }

    #[test]
    fn rollover_spreads_records_over_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Frames are 8 + 8..9 bytes, so 64-byte segments hold three or four each.
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.sync().unwrap();
        let files = segment_files(dir.path());
        assert!(files.len() >= 7, "{files:?}");
        assert_eq!(files[0], 1);
        for segment in &log.segments {
            assert!(segment.bytes <= 64);
            assert_eq!(fs::metadata(&segment.path).unwrap().len(), segment.bytes);
        }
        expect_records(&log, 1, 30);
        assert_eq!(log.read_from(17).unwrap()[0], (17, payload(17)));
        drop(log);
        let (log, report) = open(dir.path(), small(64));
        assert_eq!(report.cut, None);
        expect_records(&log, 1, 30);
    }

    #[test]
    fn oversized_record_gets_a_segment_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        log.append(b"a").unwrap();
        log.append(&[7u8; 200]).unwrap();
        log.append(b"c").unwrap();
        assert_eq!(segment_files(dir.path()), vec![1, 2, 3]);
        assert_eq!(log.read_from(2).unwrap()[0], (2, vec![7u8; 200]));
    }

    #[test]
    fn record_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        let err = log.append(&[0u8; 1025]).unwrap_err();
        assert!(matches!(err, StorageError::RecordTooLarge { bytes: 1025, max_bytes: 1024 }), "{err}");
        // A refused record does not poison the log.
        assert_eq!(log.append(&[0u8; 1024]).unwrap(), 1);
    }

    #[test]
    fn truncate_in_the_middle_of_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), LogOptions::default());
        append_until(&mut log, 11);
        log.truncate_from(6).unwrap();
        expect_records(&log, 1, 6);
        assert_eq!(log.append(b"new 6").unwrap(), 6);
        log.sync().unwrap();
        drop(log);
        let (log, report) = open(dir.path(), LogOptions::default());
        assert_eq!(report, OpenReport { records: 6, cut: None });
        assert_eq!(log.read_from(5).unwrap(), vec![(5, payload(5)), (6, b"new 6".to_vec())]);
    }

    #[test]
    fn truncate_is_durable_without_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), LogOptions::default());
        append_until(&mut log, 11);
        log.truncate_from(4).unwrap();
        drop(log);
        let (log, _) = open(dir.path(), LogOptions::default());
        expect_records(&log, 1, 4);
    }

    #[test]
    fn truncate_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.sync().unwrap();
        let before = segment_files(dir.path());
        log.truncate_from(9).unwrap();
        let after = segment_files(dir.path());
        assert!(after.len() < before.len());
        assert!(*after.last().unwrap() <= 9);
        expect_records(&log, 1, 9);
        append_until(&mut log, 20);
        log.sync().unwrap();
        drop(log);
        let (log, report) = open(dir.path(), small(64));
        assert_eq!(report.cut, None);
        expect_records(&log, 1, 20);
    }

    #[test]
    fn truncate_at_a_segment_boundary_and_to_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        let second = log.segments[1].first_seq;
        log.truncate_from(second).unwrap();
        expect_records(&log, 1, second);
        log.truncate_from(1).unwrap();
        expect_records(&log, 1, 1);
        assert_eq!(segment_files(dir.path()), vec![1]);
        drop(log);
        let (mut log, _) = open(dir.path(), small(64));
        expect_records(&log, 1, 1);
        append_until(&mut log, 3);
        expect_records(&log, 1, 3);
    }

    #[test]
    fn truncate_outside_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.truncate_from(30).unwrap();
        log.truncate_from(100).unwrap();
        expect_records(&log, 1, 30);
        log.compact_to(20).unwrap();
        let first = log.first_seq();
        assert!(first > 1);
        let err = log.truncate_from(first - 1).unwrap_err();
        assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
        // Refusal does not poison the log.
        expect_records(&log, first, 30);
    }

    #[test]
    fn compact_removes_only_whole_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.sync().unwrap();
        let starts: Vec<u64> = log.segments.iter().map(|s| s.first_seq).collect();

        // A seq inside the first segment removes nothing.
        log.compact_to(starts[1] - 1).unwrap();
        assert_eq!(log.first_seq(), 1);
        // Up to the start of the third segment removes exactly the first two.
        log.compact_to(starts[2]).unwrap();
        assert_eq!(log.first_seq(), starts[2]);
        assert_eq!(segment_files(dir.path()), starts[2..].to_vec());
        expect_records(&log, starts[2], 30);

        // Past the end: everything but the active segment goes.
        log.compact_to(1000).unwrap();
        assert_eq!(log.first_seq(), *starts.last().unwrap());
        assert_eq!(log.next_seq(), 30);
        drop(log);
        let (mut log, report) = open(dir.path(), small(64));
        assert_eq!(report.cut, None);
        expect_records(&log, *starts.last().unwrap(), 30);
        append_until(&mut log, 31);
    }

    #[test]
    fn reset_then_reopen_keeps_the_next_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.reset(500).unwrap();
        assert_eq!((log.first_seq(), log.next_seq()), (500, 500));
        assert!(log.read_from(0).unwrap().is_empty());
        assert_eq!(segment_files(dir.path()), vec![500]);
        drop(log);

        let (mut log, report) = open(dir.path(), small(64));
        assert_eq!(report, OpenReport { records: 0, cut: None });
        assert_eq!((log.first_seq(), log.next_seq()), (500, 500));
        append_until(&mut log, 503);
        // Reset to a lower number works too.
        log.reset(7).unwrap();
        drop(log);
        let (log, _) = open(dir.path(), small(64));
        assert_eq!((log.first_seq(), log.next_seq()), (7, 7));
    }

    #[test]
    fn interrupted_reset_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.sync().unwrap();
        drop(log);
        // As if reset(200) crashed right after writing its marker.
        write_atomic(&dir.path().join(RESET_MARKER), &200u64.to_le_bytes()).unwrap();
        let (log, report) = open(dir.path(), small(64));
        assert_eq!(report, OpenReport { records: 0, cut: None });
        assert_eq!((log.first_seq(), log.next_seq()), (200, 200));
        assert!(!dir.path().join(RESET_MARKER).exists());
        assert_eq!(segment_files(dir.path()), vec![200]);
    }

    /// Writes 5 records to a fresh log and returns the offsets of their frames.
    fn five_records(dir: &Path) -> Vec<u64> {
        let (mut log, _) = open(dir, LogOptions::default());
        append_until(&mut log, 6);
        log.sync().unwrap();
        let mut offsets = Vec::new();
        read_segment(&log.segments[0], &[], 1024, |_, offset, _| {
            offsets.push(offset);
            ControlFlow::Continue(())
        })
        .unwrap();
        offsets
    }

    #[test]
    fn torn_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = five_records(dir.path());
        let seg = segment_path(dir.path(), 1);
        let full = fs::metadata(&seg).unwrap().len();
        // Cut inside the payload of record 5, then inside the header of record 4.
        for (cut_at, kept, reason) in [(full - 3, 4, "torn record"), (offsets[3] + 5, 3, "torn header")] {
            let file = OpenOptions::new().write(true).open(&seg).unwrap();
            file.set_len(cut_at).unwrap();
            drop(file);
            let (log, report) = open(dir.path(), LogOptions::default());
            let cut = report.cut.expect("a cut");
            assert_eq!(report.records, kept);
            assert_eq!(cut.segment, seg);
            assert_eq!(cut.offset, offsets[kept as usize]);
            assert_eq!(cut.bytes_dropped, cut_at - offsets[kept as usize]);
            assert!(cut.reason.contains(reason), "{cut}");
            assert!(cut.to_string().contains("bytes dropped"), "{cut}");
            assert_eq!(fs::metadata(&seg).unwrap().len(), offsets[kept as usize]);
            expect_records(&log, 1, kept + 1);
        }
        // Once cut, the log opens cleanly.
        let (_, report) = open(dir.path(), LogOptions::default());
        assert_eq!(report.cut, None);
    }

    #[test]
    fn flipped_byte_in_last_record_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = five_records(dir.path());
        let seg = segment_path(dir.path(), 1);
        let mut raw = fs::read(&seg).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x20;
        fs::write(&seg, &raw).unwrap();
        let (mut log, report) = open(dir.path(), LogOptions::default());
        let cut = report.cut.expect("a cut");
        assert_eq!(report.records, 4);
        assert_eq!(cut.offset, offsets[4]);
        assert!(cut.reason.contains("crc mismatch"), "{cut}");
        expect_records(&log, 1, 5);
        assert_eq!(log.append(b"again").unwrap(), 5);
    }

    #[test]
    fn garbage_length_is_cut_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        five_records(dir.path());
        let seg = segment_path(dir.path(), 1);
        let good = fs::read(&seg).unwrap();
        // A limit of u32::MAX lets the length pass the limit check; the bytes-left
        // check must stop it before a 4 GiB allocation.
        for (max_record_bytes, reason) in [(1024, "exceeds the limit"), (u32::MAX, "torn record")] {
            let mut raw = good.clone();
            raw.extend_from_slice(&u32::MAX.to_le_bytes());
            raw.extend_from_slice(&[0u8; 12]);
            fs::write(&seg, &raw).unwrap();
            let opts = LogOptions { segment_bytes: 1 << 20, max_record_bytes };
            let (log, report) = open(dir.path(), opts);
            let cut = report.cut.expect("a cut");
            assert!(cut.reason.contains(reason), "{cut}");
            assert_eq!(cut.bytes_dropped, 16);
            expect_records(&log, 1, 6);
        }
    }

    #[test]
    fn corruption_in_an_early_segment_drops_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.sync().unwrap();
        let second = log.segments[1].first_seq;
        let seg = log.segments[1].path.clone();
        drop(log);
        let mut raw = fs::read(&seg).unwrap();
        raw[9] ^= 0xff; // first payload byte of the segment's first record
        fs::write(&seg, &raw).unwrap();
        let (log, report) = open(dir.path(), small(64));
        let cut = report.cut.expect("a cut");
        assert_eq!((cut.segment.clone(), cut.offset), (seg, 0));
        assert!(cut.bytes_dropped > 64, "{cut}");
        expect_records(&log, 1, second);
        assert_eq!(segment_files(dir.path()).len(), 2);
    }

    #[test]
    fn gap_between_segments_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), small(64));
        append_until(&mut log, 30);
        log.sync().unwrap();
        let starts: Vec<u64> = log.segments.iter().map(|s| s.first_seq).collect();
        drop(log);
        fs::remove_file(segment_path(dir.path(), starts[2])).unwrap();
        let (log, report) = open(dir.path(), small(64));
        let cut = report.cut.expect("a cut");
        assert_eq!(cut.segment, segment_path(dir.path(), starts[3]));
        assert!(cut.reason.contains("previous one ends"), "{cut}");
        expect_records(&log, 1, starts[2]);
        assert_eq!(segment_files(dir.path()), starts[..2].to_vec());
    }

    #[test]
    fn stray_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), LogOptions::default());
        append_until(&mut log, 3);
        drop(log);
        fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
        fs::write(dir.path().join("12.seg"), b"hi").unwrap();
        let (log, report) = open(dir.path(), LogOptions::default());
        assert_eq!(report.cut, None);
        expect_records(&log, 1, 3);
    }

    #[test]
    fn poisoned_log_refuses_work() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), LogOptions::default());
        log.append(b"x").unwrap();
        // Swap the active file for a read-only handle so the flush fails.
        log.active = File::open(&log.segments[0].path).unwrap();
        assert!(matches!(log.sync(), Err(StorageError::Io { .. })));
        assert!(matches!(log.append(b"y"), Err(StorageError::Poisoned { .. })));
        assert!(matches!(log.read_from(1), Err(StorageError::Poisoned { .. })));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<u8>),
        Sync,
        /// Truncate at `first + k % (len + 1)`.
        Truncate(u64),
        /// Compact to `first + k`.
        Compact(u64),
        Reset(u64),
        Reopen,
        /// Lose pending records, then tear the unsynced tail of the active segment
        /// at this fraction (in 1/256ths) of its length.
        Crash(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Op::Append),
            2 => Just(Op::Sync),
            1 => any::<u64>().prop_map(Op::Truncate),
            1 => (0u64..20).prop_map(Op::Compact),
            1 => (1u64..200).prop_map(Op::Reset),
            1 => Just(Op::Reopen),
            1 => any::<u8>().prop_map(Op::Crash),
        ]
    }

    /// The plain model: the records, and how many of them a crash must keep.
    struct Model {
        first: u64,
        records: Vec<Vec<u8>>,
        /// Records below this seq are durable.
        synced_next: u64,
    }

    impl Model {
        fn next(&self) -> u64 {
            self.first + self.records.len() as u64
        }

        fn truncate(&mut self, seq: u64) {
            self.records.truncate((seq - self.first) as usize);
        }

        fn check(&self, log: &RecordLog) {
            assert_eq!(log.first_seq(), self.first);
            assert_eq!(log.next_seq(), self.next());
            let expected: Vec<_> = (self.first..).zip(self.records.iter().cloned()).collect();
            assert_eq!(log.read_from(0).unwrap(), expected);
        }
    }

    /// Length of the active segment up to which it is durable, by path.
    fn durable_point(log: &RecordLog) -> (PathBuf, u64) {
        let active = log.active_segment();
        (active.path.clone(), active.bytes)
    }

    fn run_model(ops: Vec<Op>) {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { segment_bytes: 100, max_record_bytes: 64 };
        let (mut log, _) = open(dir.path(), opts);
        let mut model = Model { first: 1, records: Vec::new(), synced_next: 1 };
        let mut durable = durable_point(&log);
        for op in ops {
            match op {
                Op::Append(payload) => {
                    assert_eq!(log.append(&payload).unwrap(), model.next());
                    model.records.push(payload);
                }
                Op::Sync => {
                    log.sync().unwrap();
                    model.synced_next = model.next();
                    durable = durable_point(&log);
                }
                Op::Truncate(k) => {
                    let seq = model.first + k % (model.records.len() as u64 + 1);
                    log.truncate_from(seq).unwrap();
                    if seq < model.next() {
                        model.truncate(seq);
                        model.synced_next = seq;
                        durable = durable_point(&log);
                    }
                }
                Op::Compact(k) => {
                    log.compact_to(model.first + k).unwrap();
                    let first = log.first_seq();
                    assert!(first >= model.first && first <= (model.first + k).max(model.first));
                    model.records.drain(..(first - model.first) as usize);
                    model.first = first;
                }
                Op::Reset(next) => {
                    log.reset(next).unwrap();
                    model = Model { first: next, records: Vec::new(), synced_next: next };
                    durable = durable_point(&log);
                }
                Op::Reopen => {
                    drop(log);
                    let (reopened, report) = open(dir.path(), opts);
                    assert_eq!(report.cut, None);
                    log = reopened;
                }
                Op::Crash(fraction) => {
                    log.pending.clear();
                    let active = log.active_segment().path.clone();
                    drop(log);
                    let len = fs::metadata(&active).unwrap().len();
                    let floor = if active == durable.0 { durable.1 } else { 0 };
                    let cut = floor + (len - floor) * u64::from(fraction) / 256;
                    OpenOptions::new().write(true).open(&active).unwrap().set_len(cut).unwrap();
                    let (reopened, _) = open(dir.path(), opts);
                    log = reopened;
                    let next = log.next_seq();
                    assert!(
                        next >= model.synced_next && next <= model.next(),
                        "after crash next_seq {next}, synced {}, appended {}",
                        model.synced_next,
                        model.next()
                    );
                    model.truncate(next);
                    model.synced_next = next;
                    durable = durable_point(&log);
                }
            }
            model.check(&log);
        }
        drop(log);
        let (log, report) = open(dir.path(), opts);
        assert_eq!(report.cut, None);
        model.check(&log);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_a_vec_model(ops in proptest::collection::vec(op(), 1..80)) {
            run_model(ops);
        }
    }
}
