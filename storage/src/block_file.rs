//! A sparse file of fixed-size blocks, each guarded by a crc32 kept in a sidecar
//! file (Petal replicas, GFS chunks).
//!
//! Block `n` lives at byte `n * block_bytes` of the data file. Its entry in the
//! sidecar `<path>.crc` is the 8 bytes at `n * 8`: `crc32(data) u32 LE | flag u32
//! LE`. An all-zero entry, including one inside a hole or past the end of the
//! sidecar, means "never written", so a sparse data file costs a sparse sidecar.
//! Any other flag than [`WRITTEN`] is corruption.
//!
//! A write puts the data first and the entry second, with no fsync between: after
//! a crash, a block written since the last [`BlockFile::sync`] may read back as
//! [`StorageError::Corrupt`] (new data, old crc or the reverse), never as a mix
//! passed off as good. The caller rewrites it from its own log or a replica.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::atomic_file::{parent_dir, sync_dir, with_suffix};
use crate::error::{CorruptAt, IoContext, StorageError};

/// Bytes of one sidecar entry.
const ENTRY_BYTES: u64 = 8;
/// Flag of an entry whose block was written ("WRIT"). Not 1, so that stray bytes
/// rarely pass for a written entry.
const WRITTEN: u32 = 0x5752_4954;
/// Bytes of sidecar read at a time by [`BlockFile::written_blocks`]; a multiple of
/// [`ENTRY_BYTES`].
const SCAN_BUFFER_BYTES: usize = 64 * 1024;
/// The largest file offset the OS accepts (`off_t` is signed).
const OFFSET_MAX: u64 = i64::MAX as u64;

/// A sparse file of `block_bytes`-sized blocks with a crc32 per block.
///
/// Methods take `&self` and use positional I/O, so one `BlockFile` can be shared
/// across threads. Writes to different blocks may run in parallel; the caller must
/// not write, or discard, the same block from two threads at once.
///
/// The block size is not stored on disk: reopen with the size used to write.
#[derive(Debug)]
pub struct BlockFile {
    path: PathBuf,
    crc_path: PathBuf,
    data: File,
    crcs: File,
    block_bytes: usize,
}

/// A decoded sidecar entry.
enum Entry {
    Unwritten,
    Written { crc: u32 },
}

impl BlockFile {
    /// Opens the block file at `path` and its sidecar `<path>.crc`, creating both
    /// if missing. Panics if `block_bytes` is zero.
    pub fn open(path: &Path, block_bytes: usize) -> Result<BlockFile, StorageError> {
        assert!(block_bytes > 0, "a block must hold at least one byte");
        let crc_path = with_suffix(path, ".crc");
        let (data, data_created) = open_or_create(path)?;
        let (crcs, crcs_created) = open_or_create(&crc_path)?;
        if crcs_created && !data_created {
            let data_bytes = data.metadata().at("stat", path)?.len();
            if data_bytes > 0 {
                return Err(StorageError::Corrupt {
                    path: crc_path,
                    at: CorruptAt::Offset(0),
                    detail: format!("checksum file was missing while the data file holds {data_bytes} bytes"),
                });
            }
        }
        if data_created || crcs_created {
            sync_dir(parent_dir(path))?;
        }
        Ok(BlockFile { path: path.to_path_buf(), crc_path, data, crcs, block_bytes })
    }

    /// Size of every block in bytes.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Reads block `block` into `buf` (exactly `block_bytes` long). A block never
    /// written reads as zeros. A crc mismatch, or a data file too short to hold a
    /// written block, is [`StorageError::Corrupt`] naming the block; `buf` is then
    /// zeroed rather than left holding bad bytes.
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        assert_eq!(buf.len(), self.block_bytes, "buffer must be one block long");
        let (data_offset, _) = self.offsets(block)?;
        let Entry::Written { crc } = self.read_entry(block)? else {
            buf.fill(0);
            return Ok(());
        };
        let read = read_full_at(&self.data, buf, data_offset).at("read block", &self.path)?;
        let detail = if read < buf.len() {
            format!("data file ends {read} bytes into the block")
        } else {
            let actual = crc32fast::hash(buf);
            if actual == crc {
                return Ok(());
            }
            format!("crc mismatch: stored {crc:#010x}, computed {actual:#010x}")
        };
        buf.fill(0);
        Err(StorageError::Corrupt { path: self.path.clone(), at: CorruptAt::Block(block), detail })
    }

    /// Writes `data` (exactly `block_bytes` long) as block `block`: the data, then
    /// its crc entry. Not durable until [`BlockFile::sync`].
    pub fn write_block(&self, block: u64, data: &[u8]) -> Result<(), StorageError> {
        assert_eq!(data.len(), self.block_bytes, "data must be one block long");
        self.write_blocks(block, data)
    }

    /// Writes `data` (a whole number of blocks, at least one) as the consecutive blocks
    /// from `first`: all the data in one write, then all their crc entries in another.
    /// Not durable until [`BlockFile::sync`]; a crash before it may leave any of the
    /// blocks reading as [`StorageError::Corrupt`], as for [`BlockFile::write_block`].
    pub fn write_blocks(&self, first: u64, data: &[u8]) -> Result<(), StorageError> {
        assert!(
            !data.is_empty() && data.len().is_multiple_of(self.block_bytes),
            "data must be a whole number of blocks"
        );
        let count = (data.len() / self.block_bytes) as u64;
        let last = first.checked_add(count - 1).ok_or_else(|| StorageError::OutOfRange {
            detail: format!("{count} blocks from block {first} run past the last block number"),
        })?;
        self.offsets(last)?; // the whole run lies within the largest offset
        let (data_offset, entry_offset) = self.offsets(first)?;
        let mut entries = Vec::with_capacity(count as usize * ENTRY_BYTES as usize);
        for block in data.chunks(self.block_bytes) {
            entries.extend_from_slice(&crc32fast::hash(block).to_le_bytes());
            entries.extend_from_slice(&WRITTEN.to_le_bytes());
        }
        self.data.write_all_at(data, data_offset).at("write block", &self.path)?;
        self.crcs.write_all_at(&entries, entry_offset).at("write crc entry", &self.crc_path)
    }

    /// Marks block `block` never written, so it reads as zeros, and punches a hole
    /// in the data file to free its space where the file system supports that.
    pub fn discard_block(&self, block: u64) -> Result<(), StorageError> {
        let (data_offset, entry_offset) = self.offsets(block)?;
        let crc_bytes = self.crcs.metadata().at("stat", &self.crc_path)?.len();
        if entry_offset >= crc_bytes {
            return Ok(()); // never written, and no need to grow the sidecar to say so
        }
        // The entry first: a crash before the hole is punched leaves an unwritten
        // block over stale bytes, which still reads as zeros.
        self.crcs
            .write_all_at(&[0u8; ENTRY_BYTES as usize], entry_offset)
            .at("write crc entry", &self.crc_path)?;
        punch_hole(&self.data, data_offset, self.block_bytes as u64).at("punch hole in", &self.path)
    }

    /// Whether block `block` holds written data (its crc is not checked here).
    pub fn is_written(&self, block: u64) -> Result<bool, StorageError> {
        Ok(matches!(self.read_entry(block)?, Entry::Written { .. }))
    }

    /// Every written block, in ascending order, from a scan of the sidecar that
    /// skips its holes.
    pub fn written_blocks(&self) -> Result<Vec<u64>, StorageError> {
        let crc_bytes = self.crcs.metadata().at("stat", &self.crc_path)?.len();
        let mut blocks = Vec::new();
        let mut buf = vec![0u8; SCAN_BUFFER_BYTES];
        let mut pos = 0;
        while pos < crc_bytes {
            let Some((start, end)) = data_region(&self.crcs, pos, crc_bytes).at("seek in", &self.crc_path)?
            else {
                break;
            };
            let mut offset = start - start % ENTRY_BYTES;
            let end = end.next_multiple_of(ENTRY_BYTES).min(crc_bytes);
            while offset < end {
                let want = (end - offset).min(SCAN_BUFFER_BYTES as u64) as usize;
                let read = read_full_at(&self.crcs, &mut buf[..want], offset)
                    .at("read crc entries", &self.crc_path)?;
                for (i, raw) in buf[..read].chunks(ENTRY_BYTES as usize).enumerate() {
                    let block = offset / ENTRY_BYTES + i as u64;
                    if let Entry::Written { .. } = self.decode_entry(block, raw)? {
                        blocks.push(block);
                    }
                }
                if read < want {
                    break; // the sidecar shrank under us
                }
                offset += read as u64;
            }
            pos = end;
        }
        Ok(blocks)
    }

    /// Makes every write and discard so far durable (fdatasync of both files).
    pub fn sync(&self) -> Result<(), StorageError> {
        self.data.sync_data().at("sync", &self.path)?;
        self.crcs.sync_data().at("sync", &self.crc_path)
    }

    /// Byte offsets of block `block` in the data file and of its sidecar entry.
    fn offsets(&self, block: u64) -> Result<(u64, u64), StorageError> {
        let block_bytes = self.block_bytes as u64;
        let data = block
            .checked_mul(block_bytes)
            .filter(|o| o.checked_add(block_bytes).is_some_and(|end| end <= OFFSET_MAX));
        let entry = block
            .checked_mul(ENTRY_BYTES)
            .filter(|o| o.checked_add(ENTRY_BYTES).is_some_and(|end| end <= OFFSET_MAX));
        match (data, entry) {
            (Some(data), Some(entry)) => Ok((data, entry)),
            _ => Err(StorageError::OutOfRange {
                detail: format!("block {block} of {block_bytes} bytes lies past the largest file offset"),
            }),
        }
    }

    fn read_entry(&self, block: u64) -> Result<Entry, StorageError> {
        let (_, entry_offset) = self.offsets(block)?;
        let mut raw = [0u8; ENTRY_BYTES as usize];
        let read = read_full_at(&self.crcs, &mut raw, entry_offset).at("read crc entry", &self.crc_path)?;
        if read == 0 {
            return Ok(Entry::Unwritten); // past the end of the sidecar
        }
        self.decode_entry(block, &raw[..read])
    }

    /// Decodes block `block`'s sidecar entry from `raw` (short if the sidecar ends
    /// inside it).
    fn decode_entry(&self, block: u64, raw: &[u8]) -> Result<Entry, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            path: self.crc_path.clone(),
            at: CorruptAt::Block(block),
            detail,
        };
        let raw: [u8; ENTRY_BYTES as usize] = raw
            .try_into()
            .map_err(|_| corrupt(format!("crc entry cut short: {} of {ENTRY_BYTES} bytes", raw.len())))?;
        let crc = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let flag = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        match (flag, crc) {
            (0, 0) => Ok(Entry::Unwritten),
            (WRITTEN, crc) => Ok(Entry::Written { crc }),
            _ => Err(corrupt(format!("invalid crc entry: flag {flag:#010x}, crc {crc:#010x}"))),
        }
    }
}

/// Opens `path` for reading and writing, creating it if missing; says whether it
/// was created.
fn open_or_create(path: &Path) -> Result<(File, bool), StorageError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    match options.clone().create_new(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Ok((options.open(path).at("open", path)?, false))
        }
        Err(e) => Err(e).at("create", path),
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the
/// number of bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Frees `len` bytes at `offset` without changing the file size. File systems that
/// cannot punch holes keep the bytes, which is harmless: the block is already
/// marked unwritten.
#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Callers checked offset + len <= OFFSET_MAX, so both fit in off_t.
    let (offset, len) = (offset as libc::off_t, len as libc::off_t);
    loop {
        // SAFETY: fallocate reads no memory of ours; the descriptor is open for
        // as long as `file` is borrowed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(()),
            _ => return Err(err),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

/// The next stretch `(start, end)` at or after `pos` that may hold data, or `None`
/// if only holes remain before `file_bytes`. Falls back to "all of it" where the
/// file system cannot tell.
#[cfg(target_os = "linux")]
fn data_region(file: &File, pos: u64, file_bytes: u64) -> io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek touches no memory of ours. It moves the shared file offset,
    // which nothing here uses: all reads and writes are positional.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) => Ok(Some((pos, file_bytes))),
            _ => Err(err),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end <= start || (start as u64) < pos {
        return Ok(Some((pos, file_bytes))); // SEEK_HOLE failed or made no sense
    }
    Ok(Some((start as u64, (end as u64).min(file_bytes))))
}

#[cfg(not(target_os = "linux"))]
fn data_region(_file: &File, pos: u64, file_bytes: u64) -> io::Result<Option<(u64, u64)>> {
    Ok(Some((pos, file_bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::fs;

    const BLOCK: usize = 512;

    fn block_of(byte: u8) -> Vec<u8> {
        (0..BLOCK).map(|i| byte.wrapping_add(i as u8)).collect()
    }

    fn read(file: &BlockFile, block: u64) -> Result<Vec<u8>, StorageError> {
        let mut buf = vec![0xee; file.block_bytes()];
        file.read_block(block, &mut buf).map(|()| buf)
    }

    fn expect_corrupt(err: StorageError, path: &Path, block: u64, needle: &str) {
        match &err {
            StorageError::Corrupt { path: p, at: CorruptAt::Block(b), detail }
                if p == path && *b == block && detail.contains(needle) => {}
            _ => panic!("expected corrupt block {block} in {path:?} ({needle}), got {err}"),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = BlockFile::open(&dir.path().join("chunk"), BLOCK).unwrap();
        assert_eq!(file.block_bytes(), BLOCK);
        file.write_block(0, &block_of(1)).unwrap();
        file.write_block(5, &block_of(2)).unwrap();
        file.write_block(0, &block_of(3)).unwrap();
        assert_eq!(read(&file, 0).unwrap(), block_of(3));
        assert_eq!(read(&file, 5).unwrap(), block_of(2));
        assert_eq!(file.written_blocks().unwrap(), vec![0, 5]);
        file.sync().unwrap();
    }

    #[test]
    fn write_blocks_writes_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let file = BlockFile::open(&dir.path().join("chunk"), BLOCK).unwrap();
        let run: Vec<u8> = (3..7).flat_map(|b| block_of(b as u8)).collect();
        file.write_blocks(3, &run).unwrap();
        file.write_blocks(5, &block_of(9)).unwrap();
        for block in [3u64, 4, 6] {
            assert_eq!(read(&file, block).unwrap(), block_of(block as u8));
        }
        assert_eq!(read(&file, 5).unwrap(), block_of(9));
        assert_eq!(read(&file, 2).unwrap(), vec![0; BLOCK]);
        assert_eq!(file.written_blocks().unwrap(), vec![3, 4, 5, 6]);
        // A run that ends past the largest offset writes nothing.
        let last = OFFSET_MAX / BLOCK as u64 - 1;
        let err = file.write_blocks(last, &run[..2 * BLOCK]).unwrap_err();
        assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
        let err = file.write_blocks(u64::MAX, &run[..2 * BLOCK]).unwrap_err();
        assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn unwritten_blocks_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let file = BlockFile::open(&dir.path().join("chunk"), BLOCK).unwrap();
        assert_eq!(read(&file, 3).unwrap(), vec![0; BLOCK]);
        file.write_block(10, &block_of(9)).unwrap();
        // Inside the sparse part of both files, and past their ends.
        assert_eq!(read(&file, 3).unwrap(), vec![0; BLOCK]);
        assert_eq!(read(&file, 11).unwrap(), vec![0; BLOCK]);
        assert!(!file.is_written(3).unwrap());
        assert!(file.is_written(10).unwrap());
        assert!(!file.is_written(1 << 40).unwrap());
    }

    #[test]
    fn reopen_keeps_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        let file = BlockFile::open(&path, BLOCK).unwrap();
        file.write_block(2, &block_of(7)).unwrap();
        file.write_block(4, &block_of(8)).unwrap();
        file.sync().unwrap();
        drop(file);
        let file = BlockFile::open(&path, BLOCK).unwrap();
        assert_eq!(read(&file, 2).unwrap(), block_of(7));
        assert_eq!(read(&file, 4).unwrap(), block_of(8));
        assert_eq!(read(&file, 3).unwrap(), vec![0; BLOCK]);
        assert_eq!(file.written_blocks().unwrap(), vec![2, 4]);
    }

    #[test]
    fn flipped_data_byte_is_corrupt_with_the_block_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        let file = BlockFile::open(&path, BLOCK).unwrap();
        for block in 0..4 {
            file.write_block(block, &block_of(block as u8)).unwrap();
        }
        let mut raw = fs::read(&path).unwrap();
        raw[2 * BLOCK + 17] ^= 0x04;
        fs::write(&path, &raw).unwrap();
        let mut buf = vec![0xee; BLOCK];
        let err = file.read_block(2, &mut buf).unwrap_err();
        expect_corrupt(err, &path, 2, "crc mismatch");
        assert_eq!(buf, vec![0; BLOCK], "no bad bytes handed out");
        assert_eq!(read(&file, 1).unwrap(), block_of(1));
        assert_eq!(read(&file, 3).unwrap(), block_of(3));
        // Rewriting the block repairs it.
        file.write_block(2, &block_of(2)).unwrap();
        assert_eq!(read(&file, 2).unwrap(), block_of(2));
    }

    #[test]
    fn truncated_data_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        let file = BlockFile::open(&path, BLOCK).unwrap();
        file.write_block(0, &block_of(0)).unwrap();
        file.write_block(1, &block_of(1)).unwrap();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(BLOCK as u64 + 100).unwrap();
        expect_corrupt(read(&file, 1).unwrap_err(), &path, 1, "data file ends 100 bytes");
        assert_eq!(read(&file, 0).unwrap(), block_of(0));
    }

    #[test]
    fn damaged_sidecar_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        let crc_path = with_suffix(&path, ".crc");
        let file = BlockFile::open(&path, BLOCK).unwrap();
        file.write_block(0, &block_of(0)).unwrap();
        file.write_block(1, &block_of(1)).unwrap();
        let mut raw = fs::read(&crc_path).unwrap();
        raw[12] ^= 0x01; // flag of block 1
        fs::write(&crc_path, &raw).unwrap();
        expect_corrupt(read(&file, 1).unwrap_err(), &crc_path, 1, "invalid crc entry");
        expect_corrupt(file.written_blocks().unwrap_err(), &crc_path, 1, "invalid");
        fs::write(&crc_path, &raw[..13]).unwrap();
        expect_corrupt(read(&file, 1).unwrap_err(), &crc_path, 1, "cut short");
        assert_eq!(read(&file, 0).unwrap(), block_of(0));
    }

    #[test]
    fn missing_sidecar_beside_data_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        let file = BlockFile::open(&path, BLOCK).unwrap();
        file.write_block(0, &block_of(0)).unwrap();
        drop(file);
        fs::remove_file(with_suffix(&path, ".crc")).unwrap();
        let err = BlockFile::open(&path, BLOCK).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn discard_then_read_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunk");
        let file = BlockFile::open(&path, 4096).unwrap();
        for block in 0..3 {
            file.write_block(block, &[block as u8 + 1; 4096]).unwrap();
        }
        file.discard_block(1).unwrap();
        file.discard_block(99).unwrap(); // never written: a no-op
        let mut buf = vec![0xee; 4096];
        file.read_block(1, &mut buf).unwrap();
        assert_eq!(buf, vec![0; 4096]);
        assert!(!file.is_written(1).unwrap());
        assert_eq!(file.written_blocks().unwrap(), vec![0, 2]);
        file.read_block(2, &mut buf).unwrap();
        assert_eq!(buf, vec![3; 4096]);
        // The sidecar did not grow for block 99.
        assert_eq!(fs::metadata(with_suffix(&path, ".crc")).unwrap().len(), 24);
        file.sync().unwrap();
        drop(file);
        let file = BlockFile::open(&path, 4096).unwrap();
        assert_eq!(file.written_blocks().unwrap(), vec![0, 2]);
    }

    #[test]
    fn far_sparse_blocks_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let file = BlockFile::open(&dir.path().join("chunk"), BLOCK).unwrap();
        let far = [3u64, 1 << 20, (1 << 30) + 5];
        for &block in &far {
            file.write_block(block, &block_of(block as u8)).unwrap();
        }
        assert_eq!(file.written_blocks().unwrap(), far.to_vec());
        for &block in &far {
            assert_eq!(read(&file, block).unwrap(), block_of(block as u8));
        }
    }

    #[test]
    fn block_past_the_largest_offset_is_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let file = BlockFile::open(&dir.path().join("chunk"), BLOCK).unwrap();
        for block in [u64::MAX, OFFSET_MAX / BLOCK as u64] {
            let err = file.write_block(block, &block_of(0)).unwrap_err();
            assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
            assert!(matches!(read(&file, block), Err(StorageError::OutOfRange { .. })));
        }
    }

    #[test]
    fn shared_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let file = BlockFile::open(&dir.path().join("chunk"), BLOCK).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let file = &file;
                s.spawn(move || {
                    for i in 0..50 {
                        let block = i * 4 + t;
                        file.write_block(block, &block_of(block as u8)).unwrap();
                    }
                });
            }
        });
        for block in 0..200 {
            assert_eq!(read(&file, block).unwrap(), block_of(block as u8));
        }
        assert_eq!(file.written_blocks().unwrap(), (0..200).collect::<Vec<_>>());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u8),
        WriteRun(u64, u8, u64),
        Read(u64),
        Discard(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let block = prop_oneof![4 => 0u64..32, 1 => 0u64..100_000];
        prop_oneof![
            4 => (block.clone(), any::<u8>()).prop_map(|(b, v)| Op::Write(b, v)),
            2 => (block.clone(), any::<u8>(), 1u64..20).prop_map(|(b, v, n)| Op::WriteRun(b, v, n)),
            3 => block.clone().prop_map(Op::Read),
            2 => block.prop_map(Op::Discard),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_a_map_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("chunk");
            let mut file = BlockFile::open(&path, BLOCK).unwrap();
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Write(block, byte) => {
                        file.write_block(block, &block_of(byte)).unwrap();
                        model.insert(block, block_of(byte));
                    }
                    Op::WriteRun(first, byte, n) => {
                        let blocks: Vec<Vec<u8>> = (0..n).map(|i| block_of(byte.wrapping_add(i as u8))).collect();
                        file.write_blocks(first, &blocks.concat()).unwrap();
                        for (i, b) in blocks.into_iter().enumerate() {
                            model.insert(first + i as u64, b);
                        }
                    }
                    Op::Read(block) => {
                        let expected = model.get(&block).cloned().unwrap_or(vec![0; BLOCK]);
                        prop_assert_eq!(read(&file, block).unwrap(), expected);
                        prop_assert_eq!(file.is_written(block).unwrap(), model.contains_key(&block));
                    }
                    Op::Discard(block) => {
                        file.discard_block(block).unwrap();
                        model.remove(&block);
                    }
                    Op::Reopen => {
                        file.sync().unwrap();
                        drop(file);
                        file = BlockFile::open(&path, BLOCK).unwrap();
                    }
                }
            }
            prop_assert_eq!(file.written_blocks().unwrap(), model.keys().copied().collect::<Vec<_>>());
            for (block, data) in &model {
                prop_assert_eq!(&read(&file, *block).unwrap(), data);
            }
        }
    }
}
