//! A node's durable state on the storage crate: the log as checksummed records (record
//! sequence number = Raft index), term and vote in an atomically replaced file, and the
//! latest snapshot in another.

use crate::{Entry, EntryPayload, HardState, Index, Ready, Restored, Snapshot};
use bincode::Options;
use std::path::{Path, PathBuf};
use storage::{read_checked, write_atomic, CutTail, LogOptions, RecordLog, StorageError};

/// Most bytes one stored record may decode to.
const DECODE_LIMIT_BYTES: u64 = 1 << 32;

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(DECODE_LIMIT_BYTES)
}

/// Why the node's disk could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The storage layer failed (I/O, full disk, corruption it could not cut).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A file decoded wrongly although its checksum held (a bug or a foreign file).
    #[error("{path}: {detail}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// The files of one node.
pub struct NodeDisk {
    dir: PathBuf,
    log: RecordLog,
    /// The hard state as last written.
    written_hard: HardState,
}

/// What [`NodeDisk::open`] found.
pub struct Loaded {
    /// The state to restart the core from.
    pub restored: Restored,
    /// Set when a torn or corrupt log tail was cut at open.
    pub cut: Option<CutTail>,
    /// Whether the directory held no state at all (a new node).
    pub fresh: bool,
}

impl NodeDisk {
    /// Opens (or creates) the node's directory and loads its state.
    pub fn open(dir: &Path) -> Result<(NodeDisk, Loaded), DiskError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StorageError::Io { context: format!("create {}", dir.display()), source })?;
        let (log, report) = RecordLog::open(&dir.join("log"), LogOptions::default())?;
        if let Some(cut) = &report.cut {
            tracing::warn!(dir = %dir.display(), "raft log tail cut at open: {cut}");
        }
        let hard_path = dir.join("hard_state");
        let hard: Option<HardState> =
            read_checked(&hard_path)?.map(|b| decode(&hard_path, &b)).transpose()?;
        let snap_path = dir.join("snapshot");
        let snapshot: Option<Snapshot> =
            read_checked(&snap_path)?.map(|b| decode(&snap_path, &b)).transpose()?;
        let mut entries = Vec::new();
        for (seq, bytes) in log.read_from(log.first_seq())? {
            let e: Entry = decode(&dir.join("log"), &bytes)?;
            if e.index.0 != seq {
                return Err(DiskError::Decode {
                    path: dir.join("log"),
                    detail: format!("record {seq} holds entry {}", e.index),
                });
            }
            entries.push(e);
        }
        let fresh = hard.is_none() && snapshot.is_none() && entries.is_empty();
        let hard = hard.unwrap_or_default();
        let applied = snapshot.as_ref().map_or(Index(0), |s| s.meta.index);
        let loaded = Loaded {
            restored: Restored { hard_state: hard, snapshot, entries, applied },
            cut: report.cut,
            fresh,
        };
        Ok((NodeDisk { dir: dir.to_path_buf(), log, written_hard: hard }, loaded))
    }

    /// Makes a Ready's snapshot, entries and term/vote durable (fsync) before its messages
    /// may be sent.
    pub fn persist(&mut self, rd: &Ready) -> Result<(), DiskError> {
        self.write(rd)?;
        self.sync()
    }

    /// Writes a Ready's snapshot, entries and term/vote; its entries are durable only after
    /// the next [`NodeDisk::sync`] (the rest already is). Several Readies may be written
    /// before one sync (group commit).
    pub fn write(&mut self, rd: &Ready) -> Result<(), DiskError> {
        if let Some(s) = &rd.snapshot {
            self.save_snapshot(s)?;
            self.log.reset(s.meta.index.0 + 1)?;
        }
        if let Some(first) = rd.entries.first() {
            if first.index.0 < self.log.next_seq() {
                self.log.truncate_from(first.index.0)?;
            }
            for e in &rd.entries {
                let seq = self.log.append(&codec().serialize(e).expect("entries serialize"))?;
                debug_assert_eq!(seq, e.index.0);
            }
        }
        // Term and vote must be durable when they change. The commit index is only a hint
        // (a lower bound), written along with them, and whenever a membership change is
        // applied, so that a restarted node knows the configuration it last used.
        let hs = rd.hard_state.unwrap_or(self.written_hard);
        let conf_applied = rd.committed.iter().rev().find(|e| matches!(e.payload, EntryPayload::Config(_)));
        let vote_changed = (hs.term, hs.vote) != (self.written_hard.term, self.written_hard.vote);
        let conf_changed = conf_applied.is_some_and(|e| e.index > self.written_hard.commit);
        if vote_changed || conf_changed {
            // The entries before the hard state, as they always were.
            self.log.sync()?;
            let commit =
                hs.commit.max(conf_applied.map_or(Index(0), |e| e.index)).max(self.written_hard.commit);
            let hs = HardState { commit, ..hs };
            write_atomic(&self.dir.join("hard_state"), &codec().serialize(&hs).expect("serializes"))?;
            self.written_hard = hs;
        }
        Ok(())
    }

    /// Makes every entry written so far durable (one fsync, if any is pending).
    pub fn sync(&mut self) -> Result<(), DiskError> {
        self.log.sync()?;
        Ok(())
    }

    /// Stores a snapshot the node took itself, then drops the log it covers.
    pub fn compact(&mut self, snapshot: &Snapshot) -> Result<(), DiskError> {
        self.save_snapshot(snapshot)?;
        self.log.compact_to(snapshot.meta.index.0 + 1)?;
        Ok(())
    }

    /// Writes the bootstrap state of a founding member.
    pub fn bootstrap(&mut self, restored: &Restored) -> Result<(), DiskError> {
        let rd = Ready {
            hard_state: Some(restored.hard_state),
            entries: restored.entries.clone(),
            ..Ready::default()
        };
        self.persist(&rd)
    }

    fn save_snapshot(&self, s: &Snapshot) -> Result<(), DiskError> {
        write_atomic(&self.dir.join("snapshot"), &codec().serialize(s).expect("serializes"))?;
        Ok(())
    }
}

fn decode<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, DiskError> {
    codec()
        .deserialize(bytes)
        .map_err(|e| DiskError::Decode { path: path.to_path_buf(), detail: e.to_string() })
}
