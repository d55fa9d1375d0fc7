//! Local durability for the rest of the workspace.
//!
//! - [`RecordLog`]: a log of checksummed records with consecutive sequence numbers
//!   in segment files (Raft's log). Appends are buffered until [`RecordLog::sync`];
//!   open cuts a torn or corrupt tail and says so in an [`OpenReport`].
//! - [`BlockFile`]: a sparse file of fixed-size blocks with a crc32 per block in a
//!   sidecar file (Petal replicas, GFS chunks). Unwritten blocks read as zeros; a
//!   block whose crc fails is an error, never silent garbage.
//! - [`write_atomic`] and [`read_checked`]: a small checksummed file replaced
//!   atomically (Raft's term and vote).
//!
//! Nothing read from disk can make this crate panic; bad bytes come back as
//! [`StorageError::Corrupt`].
//!
//! ```
//! use storage::{BlockFile, LogOptions, RecordLog, read_checked, write_atomic};
//!
//! let dir = tempfile::tempdir()?;
//!
//! // A record log: append, sync, read back, reopen.
//! let (mut log, report) = RecordLog::open(&dir.path().join("log"), LogOptions::default())?;
//! assert_eq!((report.records, log.next_seq()), (0, 1));
//! let seq = log.append(b"set x = 1")?;
//! log.append(b"set y = 2")?;
//! log.sync()?;
//! assert_eq!(log.read_from(seq + 1)?, vec![(2, b"set y = 2".to_vec())]);
//! drop(log);
//! let (log, report) = RecordLog::open(&dir.path().join("log"), LogOptions::default())?;
//! assert_eq!((report.records, report.cut, log.next_seq()), (2, None, 3));
//!
//! // A block file: unwritten blocks read as zeros.
//! let blocks = BlockFile::open(&dir.path().join("chunk"), 4096)?;
//! blocks.write_block(7, &[0xab; 4096])?;
//! let mut buf = vec![0; 4096];
//! blocks.read_block(7, &mut buf)?;
//! assert_eq!(buf, vec![0xab; 4096]);
//! blocks.read_block(8, &mut buf)?;
//! assert_eq!(buf, vec![0; 4096]);
//! blocks.sync()?;
//!
//! // A small file replaced atomically.
//! let hard_state = dir.path().join("hard_state");
//! assert_eq!(read_checked(&hard_state)?, None);
//! write_atomic(&hard_state, b"term 3 vote 1")?;
//! assert_eq!(read_checked(&hard_state)?, Some(b"term 3 vote 1".to_vec()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod atomic_file;
mod block_file;
mod error;
mod record_log;

pub use atomic_file::{read_checked, write_atomic};
pub use block_file::BlockFile;
pub use error::{CorruptAt, StorageError};
pub use record_log::{CutTail, LogOptions, OpenReport, RecordLog};
