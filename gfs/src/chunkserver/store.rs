//! A chunkserver's chunks on its local disk (GFS §5.2): one checksummed [`BlockFile`] per
//! chunk with a crc32 per 64 KiB block, verified on every read, and a small metadata file
//! holding the chunk's version, persisted before the version is acknowledged to the
//! master (GFS §4.5).
//!
//! Files in the store's directory, per chunk: `<handle>.meta` (version and chunk size,
//! replaced atomically; its presence is what makes a chunk exist), `<handle>.chunk` and
//! `<handle>.chunk.crc` (the blocks and their checksums). Data files without a meta file
//! are leftovers of an interrupted create, clone or delete, and are removed on open.
//!
//! A chunk's length is kept exactly in memory. After a restart it is recovered as the
//! end of the last written block, which is never shorter than the acknowledged data, so
//! a primary that picks offsets from it never overwrites an acknowledged record; it
//! only leaves a stretch of zeros that readers skip.

use crate::types::{ChunkHandle, ChunkVersion, CHECKSUM_BLOCK_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use storage::{read_checked, write_atomic, BlockFile, StorageError};

const BLOCK: u64 = CHECKSUM_BLOCK_BYTES;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// This server has no such chunk.
    #[error("no chunk {0} here")]
    NoChunk(ChunkHandle),
    /// The chunk is at another version than the request needs (stale here, or the
    /// request is).
    #[error("chunk {handle} is at {have} here, the request is for {want}")]
    Version {
        /// The chunk.
        handle: ChunkHandle,
        /// Its version here.
        have: ChunkVersion,
        /// The version the request named.
        want: ChunkVersion,
    },
    /// A checksum failed: the chunk is refused until the master replaces it.
    #[error("chunk {0} is corrupt here: {1}")]
    Corrupt(ChunkHandle, String),
    /// An offset or length outside the chunk, or a malformed request.
    #[error("{0}")]
    Invalid(String),
    /// The disk failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What the meta file holds.
#[derive(Serialize, Deserialize)]
struct MetaFile {
    version: ChunkVersion,
    chunk_bytes: u64,
}

/// A chunk as reported to the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkReport {
    /// The chunk.
    pub handle: ChunkHandle,
    /// Its version here.
    pub version: ChunkVersion,
    /// Bytes up to the end of the last write here.
    pub length: u64,
    /// Whether a checksum failed (the copy is refused and awaits replacement).
    pub corrupt: bool,
}

struct ChunkState {
    version: ChunkVersion,
    /// Invariant: length <= chunk_bytes, and every byte written lies below it.
    length: u64,
}

struct Chunk {
    handle: ChunkHandle,
    file: BlockFile,
    meta_path: PathBuf,
    chunk_bytes: u64,
    /// Writers hold it exclusively for their block writes, readers shared, so a read
    /// never sees a block between its data and its checksum.
    state: RwLock<ChunkState>,
    corrupt: AtomicBool,
    /// Group commit: writes are numbered; a sync covers every write numbered before it.
    written_gen: AtomicU64,
    synced_gen: Mutex<u64>,
}

impl Chunk {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, ChunkState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, ChunkState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Turns a checksum failure into [`StoreError::Corrupt`] and marks the chunk.
    fn check<T>(&self, r: Result<T, StorageError>) -> Result<T, StoreError> {
        match r {
            Err(StorageError::Corrupt { path, at, detail }) => {
                self.corrupt.store(true, Ordering::SeqCst);
                tracing::error!(chunk = %self.handle, "checksum failure in {} at {at}: {detail}", path.display());
                Err(StoreError::Corrupt(self.handle, format!("{at}: {detail}")))
            }
            other => Ok(other?),
        }
    }

    /// Makes every write numbered up to `gen` durable, with one fsync for all the
    /// writes that queued behind the one in progress.
    fn sync_through(&self, gen: u64) -> Result<(), StoreError> {
        let mut synced = self.synced_gen.lock().unwrap_or_else(PoisonError::into_inner);
        if *synced >= gen {
            return Ok(());
        }
        let target = self.written_gen.load(Ordering::SeqCst);
        if let Err(e) = self.file.sync() {
            // After a failed fsync the kernel may have dropped the dirty pages: the copy
            // can no longer be trusted.
            self.corrupt.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        *synced = target;
        Ok(())
    }

    fn refuse_if_corrupt(&self) -> Result<(), StoreError> {
        if self.corrupt.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt(self.handle, "a checksum failed earlier".into()));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, verifying every block touched.
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let mut block_buf = vec![0u8; BLOCK as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (block, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(buf.len() - done);
            self.check(self.file.read_block(block, &mut block_buf))?;
            buf[done..done + n].copy_from_slice(&block_buf[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`: whole blocks directly, partial ones by read (verified),
    /// modify, write. The caller holds the state lock exclusively.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut block_buf = vec![0u8; BLOCK as usize];
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let (block, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(data.len() - done);
            if n == BLOCK as usize {
                self.file.write_block(block, &data[done..done + n])?;
            } else {
                self.check(self.file.read_block(block, &mut block_buf))?;
                block_buf[within..within + n].copy_from_slice(&data[done..done + n]);
                self.file.write_block(block, &block_buf)?;
            }
            done += n;
        }
        Ok(())
    }
}

/// The chunks of one chunkserver.
pub struct ChunkStore {
    dir: PathBuf,
    chunks: RwLock<HashMap<ChunkHandle, Arc<Chunk>>>,
}

/// A chunk being copied in from another server (re-replication), invisible until
/// [`ChunkStore::commit`].
pub struct Staged {
    handle: ChunkHandle,
    file: BlockFile,
    chunk_bytes: u64,
    length: u64,
}

impl Staged {
    /// Writes bytes at `offset`, a multiple of the block size; `data` is padded with
    /// zeros to whole blocks. Blocks of zeros are left unwritten (sparse), except the
    /// last one of the chunk, which marks a padded chunk as full after a restart.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        if !offset.is_multiple_of(BLOCK) || offset + data.len() as u64 > self.chunk_bytes {
            return Err(StoreError::Invalid(format!("clone write of {} bytes at {offset}", data.len())));
        }
        let last_block = self.chunk_bytes / BLOCK - 1;
        for (i, piece) in data.chunks(BLOCK as usize).enumerate() {
            let block = offset / BLOCK + i as u64;
            if piece.iter().all(|b| *b == 0) && block != last_block {
                continue;
            }
            let mut buf = piece.to_vec();
            buf.resize(BLOCK as usize, 0);
            self.file.write_block(block, &buf)?;
        }
        self.length = self.length.max(offset + data.len() as u64);
        Ok(())
    }
}

fn file_name(handle: ChunkHandle, ext: &str) -> String {
    format!("{:016x}.{ext}", handle.0)
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `dir`, loading every chunk and removing
    /// leftovers of interrupted operations.
    pub fn open(dir: &Path) -> Result<ChunkStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
        let mut chunks = HashMap::new();
        let mut leftovers = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| io_error("list", dir, e))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some((stem, ext)) = name.split_once('.') else { continue };
            let Ok(handle) = u64::from_str_radix(stem, 16).map(ChunkHandle) else { continue };
            if ext == "meta" {
                match Self::load(dir, handle) {
                    Ok(chunk) => {
                        chunks.insert(handle, Arc::new(chunk));
                    }
                    Err(e) => {
                        // A replica that cannot be opened is as good as lost: the master
                        // sees it missing and makes another copy.
                        tracing::error!(chunk = %handle, "dropping unreadable chunk: {e}");
                        leftovers.push(handle);
                    }
                }
            } else if !dir.join(file_name(handle, "meta")).exists() {
                leftovers.push(handle);
            }
        }
        for handle in leftovers {
            remove_files(dir, handle)?;
        }
        Ok(ChunkStore { dir: dir.to_path_buf(), chunks: RwLock::new(chunks) })
    }

    fn load(dir: &Path, handle: ChunkHandle) -> Result<Chunk, StoreError> {
        let meta_path = dir.join(file_name(handle, "meta"));
        let bytes = read_checked(&meta_path)?.ok_or(StoreError::NoChunk(handle))?;
        let meta: MetaFile = crate::master::machine::decode(&bytes)
            .map_err(|e| StoreError::Invalid(format!("bad meta file {}: {e}", meta_path.display())))?;
        if crate::types::check_chunk_bytes(meta.chunk_bytes).is_err() {
            return Err(StoreError::Invalid(format!(
                "bad chunk size {} in {}",
                meta.chunk_bytes,
                meta_path.display()
            )));
        }
        let file = BlockFile::open(&dir.join(file_name(handle, "chunk")), BLOCK as usize)?;
        let length = file.written_blocks()?.last().map_or(0, |b| (b + 1) * BLOCK).min(meta.chunk_bytes);
        Ok(Self::chunk(handle, file, meta_path, meta.chunk_bytes, meta.version, length))
    }

    fn chunk(
        handle: ChunkHandle,
        file: BlockFile,
        meta_path: PathBuf,
        chunk_bytes: u64,
        version: ChunkVersion,
        length: u64,
    ) -> Chunk {
        Chunk {
            handle,
            file,
            meta_path,
            chunk_bytes,
            state: RwLock::new(ChunkState { version, length }),
            corrupt: AtomicBool::new(false),
            written_gen: AtomicU64::new(0),
            synced_gen: Mutex::new(0),
        }
    }

    fn get(&self, handle: ChunkHandle) -> Result<Arc<Chunk>, StoreError> {
        self.chunks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&handle)
            .cloned()
            .ok_or(StoreError::NoChunk(handle))
    }

    fn write_meta(path: &Path, version: ChunkVersion, chunk_bytes: u64) -> Result<(), StoreError> {
        Ok(write_atomic(path, &crate::master::machine::encode(&MetaFile { version, chunk_bytes }))?)
    }

    /// Creates an empty chunk; a repeat at the same version succeeds.
    pub fn create(
        &self,
        handle: ChunkHandle,
        version: ChunkVersion,
        chunk_bytes: u64,
    ) -> Result<(), StoreError> {
        crate::types::check_chunk_bytes(chunk_bytes).map_err(StoreError::Invalid)?;
        let mut chunks = self.chunks.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = chunks.get(&handle) {
            let have = c.read_state().version;
            return if have == version {
                Ok(())
            } else {
                Err(StoreError::Version { handle, have, want: version })
            };
        }
        let meta_path = self.dir.join(file_name(handle, "meta"));
        Self::write_meta(&meta_path, version, chunk_bytes)?;
        let file = BlockFile::open(&self.dir.join(file_name(handle, "chunk")), BLOCK as usize)?;
        chunks.insert(handle, Arc::new(Self::chunk(handle, file, meta_path, chunk_bytes, version, 0)));
        Ok(())
    }

    /// Raises a chunk's version, durably (GFS §4.5). Returns the chunk's length.
    pub fn set_version(&self, handle: ChunkHandle, version: ChunkVersion) -> Result<u64, StoreError> {
        let chunk = self.get(handle)?;
        chunk.refuse_if_corrupt()?;
        let mut st = chunk.write_state();
        if version < st.version {
            return Err(StoreError::Version { handle, have: st.version, want: version });
        }
        if version > st.version {
            Self::write_meta(&chunk.meta_path, version, chunk.chunk_bytes)?;
            st.version = version;
        }
        Ok(st.length)
    }

    /// A chunk's version, length and size, if it is here.
    pub fn info(&self, handle: ChunkHandle) -> Option<(ChunkVersion, u64, u64)> {
        let chunk = self.get(handle).ok()?;
        let st = chunk.read_state();
        Some((st.version, st.length, chunk.chunk_bytes))
    }

    /// Writes `data` at `offset` of a chunk at exactly `version`, and makes it durable
    /// (fsync, shared with concurrent writers) before returning.
    pub fn write(
        &self,
        handle: ChunkHandle,
        version: ChunkVersion,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let chunk = self.get(handle)?;
        chunk.refuse_if_corrupt()?;
        let gen = {
            let mut st = chunk.write_state();
            if st.version != version {
                return Err(StoreError::Version { handle, have: st.version, want: version });
            }
            let end = offset.checked_add(data.len() as u64).filter(|e| *e <= chunk.chunk_bytes);
            let Some(end) = end else {
                return Err(StoreError::Invalid(format!(
                    "write of {} bytes at {offset} runs past the chunk's {} bytes",
                    data.len(),
                    chunk.chunk_bytes
                )));
            };
            chunk.write_at(offset, data)?;
            st.length = st.length.max(end);
            chunk.written_gen.fetch_add(1, Ordering::SeqCst) + 1
        };
        chunk.sync_through(gen)
    }

    /// Pads a chunk to its full size (GFS §3.3: a record that does not fit), durably: its
    /// last block is written (with zeros, if no record reached it), so the chunk is still
    /// full after a restart.
    pub fn pad(&self, handle: ChunkHandle, version: ChunkVersion) -> Result<(), StoreError> {
        let chunk = self.get(handle)?;
        chunk.refuse_if_corrupt()?;
        let gen = {
            let mut st = chunk.write_state();
            if st.version != version {
                return Err(StoreError::Version { handle, have: st.version, want: version });
            }
            let last = chunk.chunk_bytes / BLOCK - 1;
            if !chunk.file.is_written(last)? {
                chunk.file.write_block(last, &vec![0u8; BLOCK as usize])?;
            }
            st.length = chunk.chunk_bytes;
            chunk.written_gen.fetch_add(1, Ordering::SeqCst) + 1
        };
        chunk.sync_through(gen)
    }

    /// Reads up to `len` bytes at `offset` from a chunk at `min_version` or newer,
    /// verifying the checksum of every block touched (GFS §5.2). Returns the bytes (cut
    /// at the chunk's length) and the length.
    pub fn read(
        &self,
        handle: ChunkHandle,
        min_version: ChunkVersion,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let chunk = self.get(handle)?;
        chunk.refuse_if_corrupt()?;
        let st = chunk.read_state();
        if st.version < min_version {
            return Err(StoreError::Version { handle, have: st.version, want: min_version });
        }
        let end = offset.saturating_add(len).min(st.length);
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        chunk.read_into(offset, &mut buf)?;
        Ok((buf, st.length))
    }

    /// Reads every written block of a chunk (the scrubber's idle-time check, GFS §5.2);
    /// a failure marks the chunk corrupt.
    pub fn verify(&self, handle: ChunkHandle) -> Result<(), StoreError> {
        let chunk = self.get(handle)?;
        chunk.refuse_if_corrupt()?;
        let _st = chunk.read_state();
        let mut buf = vec![0u8; BLOCK as usize];
        for block in chunk.file.written_blocks()? {
            chunk.check(chunk.file.read_block(block, &mut buf))?;
        }
        Ok(())
    }

    /// Deletes a chunk if its version here is below `below` (pass `ChunkVersion(u64::MAX)`
    /// to delete whatever is here). Says whether it was deleted.
    pub fn delete(&self, handle: ChunkHandle, below: ChunkVersion) -> Result<bool, StoreError> {
        let mut chunks = self.chunks.write().unwrap_or_else(PoisonError::into_inner);
        let Some(chunk) = chunks.get(&handle) else { return Ok(false) };
        if chunk.read_state().version >= below {
            return Ok(false);
        }
        chunks.remove(&handle);
        drop(chunks);
        remove_files(&self.dir, handle)?;
        Ok(true)
    }

    /// Every chunk here.
    pub fn report(&self) -> Vec<ChunkReport> {
        let chunks = self.chunks.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<ChunkReport> = chunks
            .values()
            .map(|c| {
                let st = c.read_state();
                ChunkReport {
                    handle: c.handle,
                    version: st.version,
                    length: st.length,
                    corrupt: c.corrupt.load(Ordering::SeqCst),
                }
            })
            .collect();
        out.sort_by_key(|r| r.handle);
        out
    }

    /// Starts receiving a copy of `handle` from another server, replacing any copy here
    /// (a stale or corrupt one).
    pub fn stage(&self, handle: ChunkHandle, chunk_bytes: u64) -> Result<Staged, StoreError> {
        crate::types::check_chunk_bytes(chunk_bytes).map_err(StoreError::Invalid)?;
        self.delete(handle, ChunkVersion(u64::MAX))?;
        remove_files(&self.dir, handle)?;
        let file = BlockFile::open(&self.dir.join(file_name(handle, "chunk")), BLOCK as usize)?;
        Ok(Staged { handle, file, chunk_bytes, length: 0 })
    }

    /// Makes a staged copy durable and visible at `version`.
    pub fn commit(&self, staged: Staged, version: ChunkVersion) -> Result<(), StoreError> {
        staged.file.sync()?;
        let meta_path = self.dir.join(file_name(staged.handle, "meta"));
        Self::write_meta(&meta_path, version, staged.chunk_bytes)?;
        let chunk =
            Self::chunk(staged.handle, staged.file, meta_path, staged.chunk_bytes, version, staged.length);
        self.chunks.write().unwrap_or_else(PoisonError::into_inner).insert(staged.handle, Arc::new(chunk));
        Ok(())
    }

    /// Copies chunk `from` to a new chunk `to` on this server (copy-on-write after a
    /// snapshot, GFS §3.4: local, so no data crosses the network). A repeat succeeds.
    pub fn copy_local(
        &self,
        from: ChunkHandle,
        to: ChunkHandle,
        version: ChunkVersion,
    ) -> Result<(), StoreError> {
        if let Some((have, _, _)) = self.info(to) {
            return if have >= version {
                Ok(())
            } else {
                Err(StoreError::Version { handle: to, have, want: version })
            };
        }
        let src = self.get(from)?;
        src.refuse_if_corrupt()?;
        let mut staged = self.stage(to, src.chunk_bytes)?;
        {
            let st = src.read_state();
            if st.version < version {
                return Err(StoreError::Version { handle: from, have: st.version, want: version });
            }
            let mut buf = vec![0u8; BLOCK as usize];
            for block in src.file.written_blocks()? {
                src.check(src.file.read_block(block, &mut buf))?;
                staged.file.write_block(block, &buf)?;
            }
            staged.length = st.length;
        }
        self.commit(staged, version)
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Storage(StorageError::Io { context: format!("{what} {}", path.display()), source: e })
}

/// Removes a chunk's files, the meta file first (it is what makes the chunk exist).
fn remove_files(dir: &Path, handle: ChunkHandle) -> Result<(), StoreError> {
    for ext in ["meta", "chunk", "chunk.crc"] {
        let path = dir.join(file_name(handle, ext));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &path, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const CHUNK: u64 = 1 << 20;
    const H: ChunkHandle = ChunkHandle(0xab);
    const V1: ChunkVersion = ChunkVersion(1);
    const V2: ChunkVersion = ChunkVersion(2);

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn write_read_and_recover_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        store.create(H, V1, CHUNK).unwrap();
        store.create(H, V1, CHUNK).unwrap(); // idempotent
        let a = bytes(1000, 1);
        let b = bytes(100_000, 2); // spans blocks
        store.write(H, V1, 0, &a).unwrap();
        store.write(H, V1, 1000, &b).unwrap();
        let (got, len) = store.read(H, V1, 0, 200_000).unwrap();
        assert_eq!(len, 101_000);
        assert_eq!(&got[..1000], &a[..]);
        assert_eq!(&got[1000..], &b[..]);
        // A write at another version is refused.
        assert!(matches!(store.write(H, V2, 0, b"x"), Err(StoreError::Version { .. })));
        assert!(matches!(store.write(H, V1, CHUNK - 1, b"xy"), Err(StoreError::Invalid(_))));
        assert_eq!(store.set_version(H, V2).unwrap(), 101_000);
        assert!(matches!(store.set_version(H, V1), Err(StoreError::Version { .. })));
        drop(store);

        let store = ChunkStore::open(dir.path()).unwrap();
        let report = store.report();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].version, V2);
        // The length comes back rounded up to the end of the last written block.
        assert_eq!(report[0].length, 2 * BLOCK);
        let (got, _) = store.read(H, V2, 1000, 100_000).unwrap();
        assert_eq!(got, b);
        // A reader asking for a newer version than this replica has finds it stale.
        assert!(matches!(store.read(H, ChunkVersion(3), 0, 1), Err(StoreError::Version { .. })));
    }

    #[test]
    fn flipped_bytes_are_detected_and_the_chunk_refused() {
        // GFS §5.2: checksums are verified on every read.
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        store.create(H, V1, CHUNK).unwrap();
        store.write(H, V1, 0, &bytes(3 * BLOCK as usize, 5)).unwrap();
        let data =
            std::fs::OpenOptions::new().write(true).open(dir.path().join(file_name(H, "chunk"))).unwrap();
        data.write_all_at(&[0xff, 0x00, 0xff], BLOCK + 17).unwrap();
        // Block 0 still reads; block 1 fails, and from then on the whole chunk is refused.
        store.read(H, V1, 0, 100).unwrap();
        assert!(matches!(store.read(H, V1, BLOCK, 100), Err(StoreError::Corrupt(..))));
        assert!(matches!(store.read(H, V1, 0, 100), Err(StoreError::Corrupt(..))));
        assert!(store.report()[0].corrupt);
        // Deleting it makes room for a fresh copy.
        assert!(store.delete(H, ChunkVersion(u64::MAX)).unwrap());
        assert!(store.report().is_empty());
    }

    #[test]
    fn scrubbing_finds_damage_in_idle_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        store.create(H, V1, CHUNK).unwrap();
        store.write(H, V1, 0, &bytes(5000, 9)).unwrap();
        store.verify(H).unwrap();
        let crc =
            std::fs::OpenOptions::new().write(true).open(dir.path().join(file_name(H, "chunk.crc"))).unwrap();
        crc.write_all_at(&[1, 2, 3, 4], 0).unwrap();
        assert!(matches!(store.verify(H), Err(StoreError::Corrupt(..))));
        assert!(store.report()[0].corrupt);
    }

    #[test]
    fn pad_fills_the_chunk_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        store.create(H, V1, CHUNK).unwrap();
        store.write(H, V1, 0, b"abcdefgh").unwrap();
        store.pad(H, V1).unwrap();
        assert_eq!(store.info(H).unwrap().1, CHUNK);
        drop(store);
        let store = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(store.info(H).unwrap().1, CHUNK);
        let (got, _) = store.read(H, V1, 0, 16).unwrap();
        assert_eq!(&got[..8], b"abcdefgh");
        assert_eq!(&got[8..], &[0u8; 8]);
    }

    #[test]
    fn conditional_delete_spares_newer_copies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        store.create(H, V2, CHUNK).unwrap();
        assert!(!store.delete(H, V2).unwrap(), "not below v2");
        assert!(store.delete(H, ChunkVersion(3)).unwrap());
        assert!(!store.delete(H, ChunkVersion(3)).unwrap(), "already gone");
    }

    #[test]
    fn clone_and_local_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let src = bytes(200_000, 3);
        let mut staged = store.stage(H, CHUNK).unwrap();
        staged.write(0, &src[..131_072]).unwrap();
        staged.write(131_072, &src[131_072..]).unwrap();
        assert!(matches!(staged.write(5, b"x"), Err(StoreError::Invalid(_))));
        assert!(store.info(H).is_none(), "invisible until committed");
        store.commit(staged, V2).unwrap();
        assert_eq!(store.read(H, V2, 0, CHUNK).unwrap(), (src.clone(), 200_000));

        let copy = ChunkHandle(0xac);
        store.copy_local(H, copy, V2).unwrap();
        store.copy_local(H, copy, V2).unwrap(); // a repeat succeeds
        assert_eq!(store.read(copy, V2, 0, CHUNK).unwrap().0, src);
        // The copy is independent.
        store.write(copy, V2, 200_000, b"more").unwrap();
        assert_eq!(store.info(H).unwrap().1, 200_000);
        drop(store);
        // Leftovers of an interrupted clone (data without meta) are removed on open.
        std::fs::write(dir.path().join(file_name(ChunkHandle(0xad), "chunk")), b"partial").unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(store.report().len(), 2);
        assert!(!dir.path().join(file_name(ChunkHandle(0xad), "chunk")).exists());
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_never_tear_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path()).unwrap());
        store.create(H, V1, CHUNK).unwrap();
        let records = 64u64;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let store = &store;
                s.spawn(move || {
                    for i in 0..records / 4 {
                        let slot = i * 4 + t;
                        store.write(H, V1, slot * 1000, &vec![slot as u8 + 1; 1000]).unwrap();
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..50 {
                    store.read(H, V1, 0, CHUNK).unwrap();
                }
            });
        });
        let (got, _) = store.read(H, V1, 0, CHUNK).unwrap();
        for slot in 0..records as usize {
            assert!(got[slot * 1000..(slot + 1) * 1000].iter().all(|b| *b == slot as u8 + 1));
        }
    }
}
