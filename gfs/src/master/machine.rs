//! The master's replicated state (GFS §2.6): the namespace, each file's chunks, and each
//! chunk's version, reference count and lease, as a Raft [`StateMachine`]. The Raft log
//! is the operation log and Raft snapshots are its checkpoints (GFS §2.6.3).
//!
//! Chunk locations are not here: the leader learns them from heartbeats (GFS §2.6.2).
//! Every command carries what would otherwise make apply depend on the node applying it,
//! the leader's clock reading in particular, so all replicas reach the same state.

use super::namespace::{DirEntry, FileMeta, Namespace, TrashEntry};
use crate::types::{ChunkHandle, ChunkVersion, FsError, ServerId, FIRST_VERSION};
use raft::{Index, StateMachine};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

/// Most chunks in one file (64 TiB of 64 MiB chunks).
pub const FILE_CHUNKS_MAX: u64 = 1 << 20;

/// A primary's lease on a chunk (GFS §3.1), as the master granted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The replica that orders mutations.
    pub primary: ServerId,
    /// Every replica that must apply each mutation, the primary included.
    pub replicas: Vec<ServerId>,
    /// Leader time (ms since the Unix epoch) at which the lease ends unless extended.
    pub expires_ms: u64,
}

/// What the master keeps of a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// The current version; replicas with an older one are stale.
    pub version: ChunkVersion,
    /// Files (live or in the trash) referring to it; above 1 after a snapshot, which
    /// makes the next mutation copy it first (GFS §3.4).
    pub refs: u32,
    /// The lease, if one was granted and not ended (it may have expired since).
    pub lease: Option<Lease>,
}

impl ChunkMeta {
    /// The lease, if it is still in force at `now_ms`.
    pub fn live_lease(&self, now_ms: u64) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| l.expires_ms > now_ms)
    }
}

/// A change to the master's state: an entry of the operation log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Make an empty file.
    Create {
        /// Its path.
        path: String,
        /// Request id (a retry is recognised by it).
        op: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// Move a file to the trash (lazy deletion, GFS §4.4).
    Delete {
        /// Its path.
        path: String,
        /// Request id.
        op: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// Copy a file's metadata to `dst`, sharing its chunks copy-on-write (GFS §3.4).
    /// Refused while a chunk of `src` is leased: the leader revokes the leases first.
    Snapshot {
        /// The file copied.
        src: String,
        /// The new file.
        dst: String,
        /// Request id.
        op: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// Give `path` chunk number `index`, unless it has one (so a retry is harmless).
    AddChunk {
        /// The file.
        path: String,
        /// The chunk number it must have.
        index: u64,
    },
    /// Give `path` its own copy of its shared chunk `index` (which is `old`): the copy
    /// on each chunkserver is made by the leader right after (GFS §3.4).
    SplitChunk {
        /// The file.
        path: String,
        /// Chunk number.
        index: u64,
        /// The shared chunk.
        old: ChunkHandle,
    },
    /// Grant a lease and bump the version, if the chunk is still at `expect`.
    GrantLease {
        /// The chunk.
        handle: ChunkHandle,
        /// The version the leader saw.
        expect: ChunkVersion,
        /// The new primary.
        primary: ServerId,
        /// Every replica (primary included) that gets the new version.
        replicas: Vec<ServerId>,
        /// Leader time.
        now_ms: u64,
        /// Lease length.
        lease_ms: u64,
    },
    /// Extend the leases that `primary` still holds on `handles` (GFS §3.1: requested in
    /// heartbeats).
    ExtendLeases {
        /// The asking chunkserver.
        primary: ServerId,
        /// The chunks.
        handles: Vec<ChunkHandle>,
        /// Leader time.
        now_ms: u64,
        /// New lease length from `now_ms`.
        lease_ms: u64,
    },
    /// Forget the lease of a chunk at `version` (the leader revoked it from its primary).
    EndLease {
        /// The chunk.
        handle: ChunkHandle,
        /// The version the lease was for.
        version: ChunkVersion,
    },
    /// Reclaim the files deleted before `before_ms`, and the chunks only they referred to.
    Purge {
        /// Leader time minus the grace period.
        before_ms: u64,
    },
}

/// A command's successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Done; nothing to report.
    Done,
    /// The chunk asked for (added, existing, or the new copy of a split).
    Chunk(ChunkHandle),
    /// The chunk's new version after a grant.
    Version(ChunkVersion),
    /// The chunks whose leases were extended.
    Extended(Vec<ChunkHandle>),
    /// What a purge reclaimed.
    Purged {
        /// Files removed from the trash.
        files: u64,
        /// Chunks no longer referenced by anything.
        chunks: u64,
    },
}

/// The answer of a command, as the state machine returns it through Raft.
pub type Outcome = Result<Answer, FsError>;

/// Most bytes a command or snapshot may decode from.
const DECODE_LIMIT_BYTES: u64 = 1 << 31;

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(DECODE_LIMIT_BYTES)
}

/// Serializes a value for the log or a snapshot.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    use bincode::Options;
    codec().serialize(value).expect("master types serialize")
}

/// Parses what [`encode`] made; bad bytes are an error, never a panic.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    use bincode::Options;
    codec().deserialize(bytes).map_err(|e| e.to_string())
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterState {
    ns: Namespace,
    chunks: BTreeMap<ChunkHandle, ChunkMeta>,
    /// The next handle to allocate. Invariant: every handle in `chunks` is below it, and
    /// handles are never reused, so a chunkserver reporting a handle below it that is not
    /// in `chunks` holds an orphan.
    next_handle: u64,
}

impl MasterState {
    /// Applies one command.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::Create { path, op, now_ms } => self.ns.create(path, *op, *now_ms).map(|_| Answer::Done),
            Command::Delete { path, op, now_ms } => self.ns.delete(path, *op, *now_ms).map(|_| Answer::Done),
            Command::Snapshot { src, dst, op, now_ms } => self.snapshot_file(src, dst, *op, *now_ms),
            Command::AddChunk { path, index } => self.add_chunk(path, *index),
            Command::SplitChunk { path, index, old } => self.split_chunk(path, *index, *old),
            Command::GrantLease { handle, expect, primary, replicas, now_ms, lease_ms } => {
                let chunk = self.chunk_mut(*handle)?;
                if chunk.version != *expect {
                    return Err(FsError::Conflict(format!(
                        "chunk {handle} is at {}, not {expect}",
                        chunk.version
                    )));
                }
                if chunk.refs > 1 {
                    return Err(FsError::Conflict(format!("chunk {handle} is shared: split it first")));
                }
                if !replicas.contains(primary) {
                    return Err(FsError::Invalid("the primary must be one of the replicas".into()));
                }
                chunk.version = ChunkVersion(chunk.version.0 + 1);
                chunk.lease = Some(Lease {
                    primary: *primary,
                    replicas: replicas.clone(),
                    expires_ms: now_ms.saturating_add(*lease_ms),
                });
                Ok(Answer::Version(chunk.version))
            }
            Command::ExtendLeases { primary, handles, now_ms, lease_ms } => {
                let mut extended = Vec::new();
                for h in handles {
                    let Some(chunk) = self.chunks.get_mut(h) else { continue };
                    if let Some(lease) = chunk.lease.as_mut() {
                        // An expired lease is not revived: the master may have promised
                        // the chunk to another primary since.
                        if lease.primary == *primary && lease.expires_ms > *now_ms {
                            lease.expires_ms = lease.expires_ms.max(now_ms.saturating_add(*lease_ms));
                            extended.push(*h);
                        }
                    }
                }
                Ok(Answer::Extended(extended))
            }
            Command::EndLease { handle, version } => {
                let chunk = self.chunk_mut(*handle)?;
                if chunk.version == *version {
                    chunk.lease = None;
                }
                Ok(Answer::Done)
            }
            Command::Purge { before_ms } => {
                let purged = self.ns.purge(*before_ms);
                let mut chunks = 0;
                for entry in &purged {
                    for h in &entry.chunks {
                        chunks += u64::from(self.unref(*h));
                    }
                }
                Ok(Answer::Purged { files: purged.len() as u64, chunks })
            }
        }
    }

    fn chunk_mut(&mut self, handle: ChunkHandle) -> Result<&mut ChunkMeta, FsError> {
        self.chunks.get_mut(&handle).ok_or_else(|| FsError::NotFound(format!("chunk {handle}")))
    }

    fn file_mut(&mut self, path: &str) -> Result<&mut FileMeta, FsError> {
        self.ns.file_mut(path).ok_or_else(|| FsError::NotFound(path.to_string()))
    }

    /// Drops one reference to `handle`; says whether the chunk went with it.
    fn unref(&mut self, handle: ChunkHandle) -> bool {
        let Some(c) = self.chunks.get_mut(&handle) else { return false };
        c.refs = c.refs.saturating_sub(1);
        if c.refs == 0 {
            self.chunks.remove(&handle);
            return true;
        }
        false
    }

    fn allocate(&mut self, version: ChunkVersion) -> ChunkHandle {
        // Handle 0 is never used, so a zero in a request is always an error.
        self.next_handle = self.next_handle.max(1);
        let handle = ChunkHandle(self.next_handle);
        self.next_handle += 1;
        self.chunks.insert(handle, ChunkMeta { version, refs: 1, lease: None });
        handle
    }

    fn add_chunk(&mut self, path: &str, index: u64) -> Outcome {
        let file = self.file_mut(path)?;
        let have = file.chunks.len() as u64;
        if index < have {
            return Ok(Answer::Chunk(file.chunks[index as usize]));
        }
        if index > have {
            return Err(FsError::Invalid(format!("{path} has {have} chunks; cannot add chunk {index}")));
        }
        if have >= FILE_CHUNKS_MAX {
            return Err(FsError::Invalid(format!("{path} has the most chunks a file may have")));
        }
        let handle = self.allocate(FIRST_VERSION);
        self.file_mut(path)?.chunks.push(handle);
        Ok(Answer::Chunk(handle))
    }

    fn split_chunk(&mut self, path: &str, index: u64, old: ChunkHandle) -> Outcome {
        let file = self.file_mut(path)?;
        let Some(&current) = file.chunks.get(index as usize) else {
            return Err(FsError::Invalid(format!("{path} has no chunk {index}")));
        };
        if current != old {
            return Ok(Answer::Chunk(current)); // split already (a retry)
        }
        let Some(meta) = self.chunks.get(&old).cloned() else {
            return Err(FsError::NotFound(format!("chunk {old}")));
        };
        if meta.refs <= 1 {
            return Ok(Answer::Chunk(old)); // no longer shared
        }
        let new = self.allocate(meta.version);
        self.file_mut(path)?.chunks[index as usize] = new;
        self.unref(old);
        Ok(Answer::Chunk(new))
    }

    fn snapshot_file(&mut self, src: &str, dst: &str, op: u64, now_ms: u64) -> Outcome {
        let chunks = self.ns.file(src).ok_or_else(|| FsError::NotFound(src.to_string()))?.chunks.clone();
        if self.ns.file(dst).is_some_and(|f| f.op == op) {
            return Ok(Answer::Done); // a retry
        }
        // A primary still holding a lease could append to a chunk after it is shared.
        if let Some(h) =
            chunks.iter().find(|h| self.chunks.get(h).is_some_and(|c| c.live_lease(now_ms).is_some()))
        {
            return Err(FsError::Conflict(format!("chunk {h} of {src} is leased: revoke it first")));
        }
        if self.ns.insert_copy(dst, chunks.clone(), op, now_ms)? {
            for h in &chunks {
                if let Some(c) = self.chunks.get_mut(h) {
                    c.refs += 1;
                }
            }
        }
        Ok(Answer::Done)
    }

    /// The file at `path`.
    pub fn file(&self, path: &str) -> Option<&FileMeta> {
        self.ns.file(path)
    }

    /// Lists a directory (or names a file).
    pub fn list(&self, dir: &str) -> Result<Vec<DirEntry>, FsError> {
        self.ns.list(dir)
    }

    /// A chunk's metadata.
    pub fn chunk(&self, handle: ChunkHandle) -> Option<&ChunkMeta> {
        self.chunks.get(&handle)
    }

    /// Every chunk still referenced.
    pub fn chunks(&self) -> &BTreeMap<ChunkHandle, ChunkMeta> {
        &self.chunks
    }

    /// Whether `handle` was ever allocated (so one unknown to [`MasterState::chunk`] is an
    /// orphan rather than one from the future of a lagging replica).
    pub fn was_allocated(&self, handle: ChunkHandle) -> bool {
        handle.0 > 0 && handle.0 < self.next_handle
    }

    /// Files in the trash, oldest first.
    pub fn trash(&self) -> impl Iterator<Item = &TrashEntry> {
        self.ns.trash()
    }

    /// Every live file.
    pub fn files(&self) -> impl Iterator<Item = (&String, &FileMeta)> {
        self.ns.files()
    }
}

/// The Raft state machine: a [`MasterState`] behind a lock that the gRPC service shares,
/// so that followers can serve possibly stale reads as GFS's shadow masters did (§5.1.3).
#[derive(Clone, Default)]
pub struct Machine {
    state: Arc<RwLock<MasterState>>,
}

impl Machine {
    /// Reads the state (a follower's may be stale; go through [`raft::Node::read`] for a
    /// linearizable read).
    pub fn state(&self) -> RwLockReadGuard<'_, MasterState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StateMachine for Machine {
    fn apply(&mut self, _index: Index, command: &[u8]) -> Vec<u8> {
        let outcome: Outcome = match decode::<Command>(command) {
            Ok(cmd) => self.state.write().unwrap_or_else(PoisonError::into_inner).apply(&cmd),
            // Committed garbage cannot be refused any more; every replica skips it alike.
            Err(e) => {
                tracing::warn!("skipping undecodable command: {e}");
                Err(FsError::Invalid(format!("undecodable command: {e}")))
            }
        };
        encode(&outcome)
    }

    fn snapshot(&self) -> Vec<u8> {
        encode(&*self.state())
    }

    fn restore(&mut self, _index: Index, snapshot: &[u8]) -> Result<(), String> {
        let restored = if snapshot.is_empty() { MasterState::default() } else { decode(snapshot)? };
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: ServerId = ServerId(1);
    const S2: ServerId = ServerId(2);
    const S3: ServerId = ServerId(3);

    fn create(path: &str, op: u64) -> Command {
        Command::Create { path: path.into(), op, now_ms: 1000 }
    }

    fn add(path: &str, index: u64) -> Command {
        Command::AddChunk { path: path.into(), index }
    }

    fn grant(handle: ChunkHandle, expect: u64, primary: ServerId, now_ms: u64) -> Command {
        Command::GrantLease {
            handle,
            expect: ChunkVersion(expect),
            primary,
            replicas: vec![S1, S2, S3],
            now_ms,
            lease_ms: 60_000,
        }
    }

    fn chunk_of(outcome: Outcome) -> ChunkHandle {
        match outcome {
            Ok(Answer::Chunk(h)) => h,
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    /// Applies commands through the StateMachine interface (encoded, as from the log).
    fn run(m: &mut Machine, cmds: &[Command]) -> Vec<Outcome> {
        cmds.iter()
            .enumerate()
            .map(|(i, c)| decode(&m.apply(Index(i as u64 + 1), &encode(c))).unwrap())
            .collect()
    }

    #[test]
    fn add_chunk_is_idempotent_and_ordered() {
        let mut s = MasterState::default();
        s.apply(&create("/f", 1)).unwrap();
        let h0 = chunk_of(s.apply(&add("/f", 0)));
        assert_eq!(chunk_of(s.apply(&add("/f", 0))), h0, "a retried add returns the same chunk");
        let h1 = chunk_of(s.apply(&add("/f", 1)));
        assert!(h1 > h0);
        assert!(matches!(s.apply(&add("/f", 5)), Err(FsError::Invalid(_))));
        assert!(matches!(s.apply(&add("/nope", 0)), Err(FsError::NotFound(_))));
        assert_eq!(s.file("/f").unwrap().chunks, vec![h0, h1]);
        assert_eq!(s.chunk(h0).unwrap().version, FIRST_VERSION);
        assert!(
            s.was_allocated(h1)
                && !s.was_allocated(ChunkHandle(h1.0 + 1))
                && !s.was_allocated(ChunkHandle(0))
        );
    }

    #[test]
    fn grants_bump_the_version_and_conflict_when_stale() {
        // GFS §4.5: every grant increases the version.
        let mut s = MasterState::default();
        s.apply(&create("/f", 1)).unwrap();
        let h = chunk_of(s.apply(&add("/f", 0)));
        assert_eq!(s.apply(&grant(h, 1, S1, 1000)), Ok(Answer::Version(ChunkVersion(2))));
        // A retried grant (same expected version) conflicts instead of bumping twice.
        assert!(matches!(s.apply(&grant(h, 1, S1, 1000)), Err(FsError::Conflict(_))));
        let c = s.chunk(h).unwrap();
        assert_eq!(c.live_lease(1000 + 59_999).map(|l| l.primary), Some(S1));
        assert!(c.live_lease(1000 + 60_000).is_none());
        // The primary must be a replica.
        let bad = Command::GrantLease {
            handle: h,
            expect: ChunkVersion(2),
            primary: ServerId(9),
            replicas: vec![S1],
            now_ms: 0,
            lease_ms: 1,
        };
        assert!(matches!(s.apply(&bad), Err(FsError::Invalid(_))));
    }

    #[test]
    fn extensions_only_for_the_live_primary() {
        let mut s = MasterState::default();
        s.apply(&create("/f", 1)).unwrap();
        let h = chunk_of(s.apply(&add("/f", 0)));
        s.apply(&grant(h, 1, S1, 0)).unwrap();
        let extend =
            |primary, now_ms| Command::ExtendLeases { primary, handles: vec![h], now_ms, lease_ms: 60_000 };
        assert_eq!(s.apply(&extend(S2, 10_000)), Ok(Answer::Extended(vec![])));
        assert_eq!(s.apply(&extend(S1, 10_000)), Ok(Answer::Extended(vec![h])));
        assert_eq!(s.chunk(h).unwrap().lease.as_ref().unwrap().expires_ms, 70_000);
        // Once expired, a lease is not revived.
        assert_eq!(s.apply(&extend(S1, 70_000)), Ok(Answer::Extended(vec![])));
        // Ending a lease of an older version does nothing.
        s.apply(&Command::EndLease { handle: h, version: ChunkVersion(1) }).unwrap();
        assert!(s.chunk(h).unwrap().lease.is_some());
        s.apply(&Command::EndLease { handle: h, version: ChunkVersion(2) }).unwrap();
        assert!(s.chunk(h).unwrap().lease.is_none());
    }

    #[test]
    fn snapshot_shares_chunks_until_split() {
        // GFS §3.4: a snapshot duplicates metadata; the next write to a shared chunk copies it.
        let mut s = MasterState::default();
        s.apply(&create("/src", 1)).unwrap();
        let h0 = chunk_of(s.apply(&add("/src", 0)));
        let h1 = chunk_of(s.apply(&add("/src", 1)));
        s.apply(&grant(h1, 1, S1, 0)).unwrap();
        let snap = Command::Snapshot { src: "/src".into(), dst: "/dst".into(), op: 7, now_ms: 5 };
        assert!(matches!(s.apply(&snap), Err(FsError::Conflict(_))), "a leased chunk must be revoked first");
        s.apply(&Command::EndLease { handle: h1, version: ChunkVersion(2) }).unwrap();
        s.apply(&snap).unwrap();
        s.apply(&snap).unwrap(); // a retry does not add references twice
        assert_eq!(s.file("/dst").unwrap().chunks, vec![h0, h1]);
        assert_eq!(s.chunk(h1).unwrap().refs, 2);
        assert!(matches!(s.apply(&grant(h1, 2, S1, 10)), Err(FsError::Conflict(_))));

        let split = Command::SplitChunk { path: "/src".into(), index: 1, old: h1 };
        let new = chunk_of(s.apply(&split));
        assert_ne!(new, h1);
        assert_eq!(chunk_of(s.apply(&split)), new, "a retried split returns the copy");
        assert_eq!(s.chunk(new).unwrap().version, s.chunk(h1).unwrap().version);
        assert_eq!(s.chunk(h1).unwrap().refs, 1);
        assert_eq!(s.file("/src").unwrap().chunks, vec![h0, new]);
        assert_eq!(s.file("/dst").unwrap().chunks, vec![h0, h1]);
        // dst's chunk is no longer shared: splitting it returns it unchanged.
        let split_dst = Command::SplitChunk { path: "/dst".into(), index: 1, old: h1 };
        assert_eq!(chunk_of(s.apply(&split_dst)), h1);
    }

    #[test]
    fn delete_then_purge_reclaims_unshared_chunks() {
        // GFS §4.4: deletion is lazy; chunks go when the trash is purged.
        let mut s = MasterState::default();
        s.apply(&create("/a", 1)).unwrap();
        let h0 = chunk_of(s.apply(&add("/a", 0)));
        s.apply(&Command::Snapshot { src: "/a".into(), dst: "/b".into(), op: 2, now_ms: 1 }).unwrap();
        let h1 = chunk_of(s.apply(&add("/a", 1)));
        s.apply(&Command::Delete { path: "/a".into(), op: 3, now_ms: 100 }).unwrap();
        assert!(s.chunk(h1).is_some(), "chunks stay while the file is in the trash");
        assert_eq!(s.apply(&Command::Purge { before_ms: 100 }), Ok(Answer::Purged { files: 0, chunks: 0 }));
        assert_eq!(s.apply(&Command::Purge { before_ms: 101 }), Ok(Answer::Purged { files: 1, chunks: 1 }));
        assert!(s.chunk(h1).is_none());
        assert_eq!(s.chunk(h0).unwrap().refs, 1, "the snapshot still holds h0");
        assert!(s.was_allocated(h1), "an orphan is recognisable");
    }

    #[test]
    fn replicas_agree_and_snapshots_round_trip() {
        // State machine safety: the same commands give the same state on every replica.
        let cmds = vec![
            create("/x", 1),
            add("/x", 0),
            grant(ChunkHandle(1), 1, S2, 50),
            Command::Snapshot { src: "/x".into(), dst: "/y".into(), op: 2, now_ms: 60 },
            Command::Snapshot { src: "/x".into(), dst: "/y".into(), op: 2, now_ms: 60_051 },
            Command::SplitChunk { path: "/x".into(), index: 0, old: ChunkHandle(1) },
            Command::Delete { path: "/y".into(), op: 3, now_ms: 70 },
            Command::Purge { before_ms: 71 },
        ];
        let (mut a, mut b) = (Machine::default(), Machine::default());
        let out_a = run(&mut a, &cmds);
        let out_b = run(&mut b, &cmds);
        assert_eq!(out_a, out_b);
        assert_eq!(*a.state(), *b.state());
        let mut c = Machine::default();
        c.restore(Index(7), &a.snapshot()).unwrap();
        assert_eq!(*c.state(), *a.state());
        // Garbage in the log is answered, not a panic.
        let answer: Outcome = decode(&c.apply(Index(8), b"\xff\xff garbage")).unwrap();
        assert!(matches!(answer, Err(FsError::Invalid(_))));
        assert!(c.restore(Index(9), b"\xff\xff garbage").is_err());
    }
}
