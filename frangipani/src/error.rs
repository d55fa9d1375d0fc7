//! The file system's errors, each with the errno a POSIX caller expects.

use crate::disk::DiskError;
use crate::locks::LockError;

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// No such file or directory.
    #[error("no such file or directory")]
    NotFound,
    /// The name exists already.
    #[error("file exists")]
    Exists,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A directory where a non-directory is needed.
    #[error("is a directory")]
    IsDir,
    /// A non-directory where a directory is needed.
    #[error("not a directory")]
    NotDir,
    /// An invalid argument (e.g. moving a directory into itself).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A name longer than 255 bytes, or a symlink target too long.
    #[error("name too long")]
    NameTooLong,
    /// No free inode or block.
    #[error("no space left on device")]
    NoSpace,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoData,
    /// An extended attribute does not fit, or a buffer is too small.
    #[error("result too large")]
    Range,
    /// Operation not permitted (e.g. hard link to a directory).
    #[error("operation not permitted")]
    Perm,
    /// The file would exceed the largest size.
    #[error("file too large")]
    TooBig,
    /// Too many links to one inode.
    #[error("too many links")]
    TooManyLinks,
    /// The lock lease is lost: no more writes until remounted.
    #[error("lease lost: remount to write again")]
    LeaseLost,
    /// The disk or lock service failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// On-disk structures are inconsistent.
    #[error("corrupt file system: {0}")]
    Corrupt(String),
}

impl FsError {
    /// The errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Perm => libc::EPERM,
            FsError::TooBig => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::LeaseLost | FsError::Io(_) | FsError::Corrupt(_) => libc::EIO,
        }
    }
}

impl From<DiskError> for FsError {
    fn from(e: DiskError) -> FsError {
        match e {
            DiskError::NoSpace => FsError::NoSpace,
            DiskError::Fenced => FsError::LeaseLost,
            DiskError::Io(m) => FsError::Io(m),
        }
    }
}

impl From<LockError> for FsError {
    fn from(e: LockError) -> FsError {
        match e {
            LockError::LeaseLost => FsError::LeaseLost,
            LockError::Service(m) => FsError::Io(format!("lock service: {m}")),
        }
    }
}

/// Results of file system operations.
pub type FsResult<T> = Result<T, FsError>;
