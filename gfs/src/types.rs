//! The nouns shared by the master, the chunkservers and the client: ids, versions,
//! the paper's default sizes and times, and the error a caller branches on.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A chunk's globally unique, immutable name, assigned by the master (GFS §2.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkHandle(pub u64);

/// A chunk's version number: bumped by the master on every lease grant, so a replica
/// that missed mutations while it was down is recognised as stale (GFS §4.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkVersion(pub u64);

/// A chunkserver's id: drawn at random when its data directory is first used, kept
/// there, so a chunkserver keeps its identity across restarts and address changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServerId(pub u64);

impl fmt::Display for ChunkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for ChunkVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cs-{:08x}", self.0 as u32)
    }
}

/// The version of a chunk that was allocated but never leased, so holds no data:
/// empty replicas of it may be created anywhere. The first grant makes it 2.
pub const FIRST_VERSION: ChunkVersion = ChunkVersion(1);

/// Chunk size (GFS §2.5: 64 MB).
pub const DEFAULT_CHUNK_BYTES: u64 = 64 << 20;
/// One checksum per 64 KB block of a chunk (GFS §5.2).
pub const CHECKSUM_BLOCK_BYTES: u64 = 64 << 10;
/// A primary's lease (GFS §3.1: 60 seconds).
pub const DEFAULT_LEASE_MS: u64 = 60_000;
/// How often chunkservers report to the masters.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1_000;
/// A chunkserver unheard of for this long is taken for dead.
pub const DEFAULT_DEAD_AFTER_MS: u64 = 10_000;
/// Copies of every chunk (GFS §4.2: three by default).
pub const DEFAULT_REPLICAS: usize = 3;
/// How long a deleted file stays in the trash before its chunks are reclaimed (GFS §4.4:
/// three days).
pub const DEFAULT_GC_GRACE_MS: u64 = 3 * 24 * 3600 * 1000;

/// The largest record is a quarter of a chunk (GFS §3.3), so padding wastes at most that.
pub fn max_record_bytes(chunk_bytes: u64) -> u64 {
    chunk_bytes / 4
}

/// Checks a chunk size: a whole number of checksum blocks, at least four of them (so a
/// quarter chunk holds a record), at most 1 GiB.
pub fn check_chunk_bytes(chunk_bytes: u64) -> Result<(), String> {
    if chunk_bytes < 4 * CHECKSUM_BLOCK_BYTES
        || !chunk_bytes.is_multiple_of(CHECKSUM_BLOCK_BYTES)
        || chunk_bytes > 1 << 30
    {
        return Err(format!(
            "chunk size {chunk_bytes} must be a multiple of {CHECKSUM_BLOCK_BYTES} between {} and {}",
            4 * CHECKSUM_BLOCK_BYTES,
            1u64 << 30
        ));
    }
    Ok(())
}

/// Why a file system operation failed, as callers branch on it. Travels in the Raft
/// log's answers (serde) and over gRPC (as a status code and message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FsError {
    /// No such file or directory.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// A path component names a file.
    #[error("{0}: not a directory")]
    NotADirectory(String),
    /// The path names a directory (files exist under it).
    #[error("{0}: is a directory")]
    IsADirectory(String),
    /// The path is malformed.
    #[error("invalid path {0:?}: {1}")]
    InvalidPath(String, String),
    /// The request no longer matches the state (a version moved, a chunk was split);
    /// look again and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// No replica can serve the chunk now; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
}
