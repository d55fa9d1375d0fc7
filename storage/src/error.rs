//! The one error type of this crate, with a variant per kind of failure a caller
//! may want to branch on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Where in a file a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptAt {
    /// A byte offset from the start of the file.
    Offset(u64),
    /// A block number of a [`crate::BlockFile`].
    Block(u64),
}

impl fmt::Display for CorruptAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptAt::Offset(offset) => write!(f, "offset {offset}"),
            CorruptAt::Block(block) => write!(f, "block {block}"),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O call failed; `context` names the call and the path.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "write segment /data/log/00000000000000000001.seg".
        context: String,
        /// The error the operating system gave.
        #[source]
        source: io::Error,
    },
    /// The file system is full (ENOSPC or EDQUOT).
    #[error("no space left on device writing {}", path.display())]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// Bytes read back from disk failed a check (crc, length, framing); they are
    /// never handed to the caller.
    #[error("corrupt data in {} at {at}: {detail}", path.display())]
    Corrupt {
        /// The file holding the bad bytes.
        path: PathBuf,
        /// Where in that file.
        at: CorruptAt,
        /// What check failed.
        detail: String,
    },
    /// A sequence number, block number or offset that the structure cannot hold or
    /// no longer has.
    #[error("out of range: {detail}")]
    OutOfRange {
        /// What was asked for and what the limits are.
        detail: String,
    },
    /// A record or file body larger than the configured limit.
    #[error("record of {bytes} bytes exceeds the limit of {max_bytes} bytes")]
    RecordTooLarge {
        /// Size of the rejected record.
        bytes: u64,
        /// The limit it broke.
        max_bytes: u64,
    },
    /// An earlier write or sync of this record log failed, so memory and disk may
    /// disagree. Every call fails until the log is reopened, which finds the last
    /// whole record on disk.
    #[error(
        "record log in {} is unusable after a failed write or sync; reopen it",
        dir.display()
    )]
    Poisoned {
        /// The log's directory.
        dir: PathBuf,
    },
}

/// Turns an `io::Error` into a [`StorageError`], naming the action and the path.
pub(crate) trait IoContext<T> {
    /// `what` is a short verb phrase such as "write block".
    fn at(self, what: &str, path: &Path) -> Result<T, StorageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, what: &str, path: &Path) -> Result<T, StorageError> {
        self.map_err(|source| io_error(what, path, source))
    }
}

/// See [`IoContext::at`]; a full disk gets its own variant so callers can shed load.
pub(crate) fn io_error(what: &str, path: &Path, source: io::Error) -> StorageError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::NoSpace { path: path.to_path_buf() },
        _ => StorageError::Io { context: format!("{what} {}", path.display()), source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space() {
        let err = io_error("write block", Path::new("/x"), io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(err, StorageError::NoSpace { ref path } if path == Path::new("/x")));
        let err = io_error("write block", Path::new("/x"), io::Error::from_raw_os_error(libc::EIO));
        assert!(err.to_string().starts_with("write block /x: "), "{err}");
    }
}
