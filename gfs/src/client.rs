//! The client library (GFS §2.4, §3): talks to the master for metadata, caching leases
//! and file layouts, and to chunkservers for data.
//!
//! - [`Client::append`] is record append (GFS §3.3): frame the record (see [`record`]),
//!   push it along a chain of the chunk's replicas nearest first, ask the primary to
//!   append it; if the chunk was full, move on to the next chunk; on any failure, tell
//!   the master (which replaces the lease) and try again with the same record id. So a
//!   record is appended at least once, and whole.
//! - [`Client::read`] reads a file's chunks in order from the nearest replica at the
//!   current version, switching replicas on failure (a checksum error included), and
//!   hands each intact record over exactly once.
//!
//! [`record`]: crate::record

// Errors here are tonic's `Status`, the answer of every RPC handler; boxing it would
// only add conversions.
#![allow(clippy::result_large_err)]

use crate::proto::master_client::MasterClient;
use crate::proto::{
    AddChunkRequest, AppendRequest, ChunkInfo, CreateRequest, DataId, DeleteRequest, Empty, GetLeaseRequest,
    LeaseReply, ListEntry, ListRequest, LookupReply, LookupRequest, MasterStatus, PushHeader, PushPiece,
    ReadRequest, SnapshotRequest,
};
use crate::record::{frame, Deduper, RecordId};
use crate::rpc::{self, is_not_leader, leader_hint, status_fs, Conns};
use crate::types::{max_record_bytes, FsError, FIRST_VERSION};
use bytes::Bytes;
use raft::NodeId;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// Size of the pieces a push is cut into.
const PUSH_PIECE_BYTES: usize = 64 << 10;
/// Deadline of one call to a chunkserver.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of one call to a master.
const MASTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest record of any chunk size (a quarter of the largest chunk); the chunk's own
/// limit is checked once its size is known.
const RECORD_BYTES_MAX: u64 = 256 << 20;
/// Longest pause between retries.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GfsError {
    /// The master refused the operation.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Retries went on until the deadline; the last error is given.
    #[error("gave up after {0:?}: {1}")]
    Timeout(Duration, String),
    /// A record larger than a quarter chunk.
    #[error("a record of {0} bytes (framed) exceeds the limit of {1} bytes")]
    TooLarge(usize, u64),
    /// A server refused the request for a reason retrying cannot fix.
    #[error("{0}")]
    Refused(String),
}

/// How a client behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The master group.
    pub masters: BTreeMap<NodeId, String>,
    /// How long one operation may keep retrying.
    pub deadline: Duration,
    /// Size of one read from a chunkserver.
    pub read_piece_bytes: u64,
    /// Let followers answer metadata reads (possibly stale, as GFS's shadow masters).
    pub allow_stale: bool,
    /// How long a lease learned from the master is used without asking again.
    pub lease_cache: Duration,
}

impl ClientConfig {
    /// Defaults: 60 s deadline, 1 MiB reads, linearizable metadata, leases cached 10 s.
    pub fn new(masters: BTreeMap<NodeId, String>) -> ClientConfig {
        ClientConfig {
            masters,
            deadline: Duration::from_secs(60),
            read_piece_bytes: 1 << 20,
            allow_stale: false,
            lease_cache: Duration::from_secs(10),
        }
    }
}

/// Where an acknowledged record went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's id.
    pub id: RecordId,
    /// The chunk number within the file.
    pub chunk_index: u64,
    /// The offset within the chunk, chosen by the primary.
    pub offset: u64,
}

/// What a read saw besides the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Records handed over.
    pub records: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Bytes skipped as padding or damage.
    pub skipped_bytes: u64,
    /// The file's layout came from a follower and may be stale.
    pub stale: bool,
}

/// A GFS client. Share it between tasks: appends from one client get distinct ids.
pub struct Client {
    id: u64,
    seq: AtomicU64,
    cfg: ClientConfig,
    conns: Conns,
    leader: Mutex<Option<NodeId>>,
    /// (path, chunk index) -> lease and when it was learned.
    leases: Mutex<HashMap<(String, u64), (LeaseReply, Instant)>>,
    /// path -> the last chunk index known to exist.
    last_chunk: Mutex<HashMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nonzero_random() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Whether a failed call is worth retrying elsewhere or later.
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
    )
}

impl Client {
    /// A client of the master group in `cfg`.
    pub fn new(cfg: ClientConfig) -> Client {
        Client {
            id: nonzero_random(),
            seq: AtomicU64::new(0),
            cfg,
            conns: Conns::default(),
            leader: Mutex::new(None),
            leases: Mutex::new(HashMap::new()),
            last_chunk: Mutex::new(HashMap::new()),
        }
    }

    /// This client's id (the first half of its records' ids).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Calls the master group: the leader as far as known, following redirects, trying
    /// each master in turn, until an answer or the deadline.
    async fn master<T, F, Fut>(&self, mut call: F) -> Result<T, GfsError>
    where
        F: FnMut(MasterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let start = Instant::now();
        let ids: Vec<NodeId> = self.cfg.masters.keys().copied().collect();
        if ids.is_empty() {
            return Err(GfsError::Refused("no masters configured".into()));
        }
        let mut next = (self.id as usize) % ids.len();
        let mut backoff = Duration::from_millis(20);
        let mut last;
        loop {
            let known = *lock(&self.leader);
            let target = known.unwrap_or_else(|| {
                next = (next + 1) % ids.len();
                ids[next]
            });
            let addr = &self.cfg.masters[&target];
            let result = match self.conns.master(addr) {
                Ok(c) => call(c).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => {
                    *lock(&self.leader) = Some(target);
                    return Ok(r.into_inner());
                }
                Err(s) if is_not_leader(&s) => {
                    let hint = leader_hint(&s).filter(|l| *l != target && self.cfg.masters.contains_key(l));
                    *lock(&self.leader) = hint;
                    last = format!("master {}: {}", target.0, s.message());
                    if hint.is_some() {
                        continue;
                    }
                }
                Err(s) => match status_fs(&s) {
                    Some(FsError::Unavailable(m)) => last = m,
                    Some(e) => return Err(GfsError::Fs(e)),
                    None if transient(&s) => {
                        *lock(&self.leader) = None;
                        last = format!("master {}: {}", target.0, s.message());
                    }
                    None => return Err(GfsError::Refused(s.message().to_string())),
                },
            }
            if start.elapsed() >= self.cfg.deadline {
                return Err(GfsError::Timeout(self.cfg.deadline, last));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Creates an empty file.
    pub async fn create(&self, path: &str) -> Result<(), GfsError> {
        let req = CreateRequest { path: path.into(), op: nonzero_random() };
        self.master(|mut c| {
            let req = req.clone();
            async move { c.create(rpc::request(req, MASTER_TIMEOUT)).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes a file (lazily: its chunks are reclaimed after the grace period).
    pub async fn delete(&self, path: &str) -> Result<(), GfsError> {
        let req = DeleteRequest { path: path.into(), op: nonzero_random() };
        self.master(|mut c| {
            let req = req.clone();
            async move { c.delete(rpc::request(req, MASTER_TIMEOUT)).await }
        })
        .await?;
        lock(&self.last_chunk).remove(path);
        lock(&self.leases).retain(|(p, _), _| p != path);
        Ok(())
    }

    /// Makes `dst` a copy-on-write snapshot of `src`.
    pub async fn snapshot(&self, src: &str, dst: &str) -> Result<(), GfsError> {
        let req = SnapshotRequest { src: src.into(), dst: dst.into(), op: nonzero_random() };
        self.master(|mut c| {
            let req = req.clone();
            async move { c.snapshot(rpc::request(req, MASTER_TIMEOUT * 3)).await }
        })
        .await?;
        Ok(())
    }

    /// Lists a directory; says whether the answer may be stale.
    pub async fn list(&self, dir: &str) -> Result<(Vec<ListEntry>, bool), GfsError> {
        let req = ListRequest { dir: dir.into(), allow_stale: self.cfg.allow_stale };
        let r = self
            .master(|mut c| {
                let req = req.clone();
                async move { c.list(rpc::request(req, MASTER_TIMEOUT)).await }
            })
            .await?;
        Ok((r.entries, r.stale))
    }

    /// A file's chunks with their versions and current replicas.
    pub async fn lookup(&self, path: &str) -> Result<LookupReply, GfsError> {
        let req = LookupRequest { path: path.into(), allow_stale: self.cfg.allow_stale };
        let r = self
            .master(|mut c| {
                let req = req.clone();
                async move { c.lookup(rpc::request(req, MASTER_TIMEOUT)).await }
            })
            .await?;
        if let Some(last) = r.chunks.len().checked_sub(1) {
            let mut known = lock(&self.last_chunk);
            let entry = known.entry(path.to_string()).or_insert(0);
            *entry = (*entry).max(last as u64);
        }
        Ok(r)
    }

    /// Every master's status (unreachable ones give their error).
    pub async fn status(&self) -> Vec<(NodeId, Result<MasterStatus, String>)> {
        let calls = self.cfg.masters.iter().map(|(id, addr)| async move {
            let r = match self.conns.master(addr) {
                Ok(mut c) => c
                    .status(rpc::request(Empty {}, Duration::from_secs(2)))
                    .await
                    .map(Response::into_inner)
                    .map_err(|e| e.message().to_string()),
                Err(e) => Err(e.message().to_string()),
            };
            (*id, r)
        });
        futures::future::join_all(calls).await
    }

    async fn add_chunk(&self, path: &str, index: u64) -> Result<ChunkInfo, GfsError> {
        let req = AddChunkRequest { path: path.into(), index };
        let info = self
            .master(|mut c| {
                let req = req.clone();
                async move { c.add_chunk(rpc::request(req, MASTER_TIMEOUT)).await }
            })
            .await?;
        let mut known = lock(&self.last_chunk);
        let entry = known.entry(path.to_string()).or_insert(0);
        *entry = (*entry).max(index);
        Ok(info)
    }

    /// The chunk appends go to: the last one known, making the first if there is none.
    async fn append_chunk(&self, path: &str) -> Result<u64, GfsError> {
        if let Some(i) = lock(&self.last_chunk).get(path) {
            return Ok(*i);
        }
        let info = self.lookup(path).await?;
        match info.chunks.len() {
            0 => Ok(self.add_chunk(path, 0).await?.index),
            n => Ok(n as u64 - 1),
        }
    }

    /// The lease of chunk `index` of `path`, from the cache unless the last mutation
    /// under it failed (`failed` names its version).
    async fn lease(&self, path: &str, index: u64, failed: Option<u64>) -> Result<LeaseReply, GfsError> {
        let key = (path.to_string(), index);
        if failed.is_none() {
            if let Some((l, at)) = lock(&self.leases).get(&key) {
                if at.elapsed() < self.cfg.lease_cache {
                    return Ok(l.clone());
                }
            }
        }
        let req = GetLeaseRequest {
            path: path.into(),
            index,
            failed: failed.is_some(),
            failed_version: failed.unwrap_or(0),
        };
        let lease = self
            .master(|mut c| {
                let req = req.clone();
                async move { c.get_lease(rpc::request(req, MASTER_TIMEOUT * 2)).await }
            })
            .await?;
        lock(&self.leases).insert(key, (lease.clone(), Instant::now()));
        Ok(lease)
    }

    /// Pushes `data` to every replica of the lease: to the nearest, which passes it on
    /// along the chain while receiving (GFS §3.2).
    async fn push(&self, lease: &LeaseReply, nonce: u64, data: &Bytes) -> Result<(), Status> {
        let addrs: Vec<String> = lease.replicas.iter().map(|r| r.addr.clone()).collect();
        let mut chain = rpc::nearest_first(&addrs, self.id ^ nonce);
        if chain.is_empty() {
            return Err(Status::unavailable("the lease names no replica"));
        }
        let first = chain.remove(0);
        let header = PushHeader {
            id: Some(DataId { client: self.id, nonce }),
            total_bytes: data.len() as u64,
            crc: crc32fast::hash(data),
            forward: chain,
        };
        let mut pieces = Vec::with_capacity(data.len() / PUSH_PIECE_BYTES + 1);
        let mut header = Some(header);
        let mut at = 0;
        loop {
            let end = (at + PUSH_PIECE_BYTES).min(data.len());
            pieces.push(PushPiece { header: header.take(), data: data.slice(at..end) });
            at = end;
            if at >= data.len() {
                break;
            }
        }
        let mut c = self.conns.chunkserver(&first)?;
        c.push(rpc::request(tokio_stream::iter(pieces), CALL_TIMEOUT)).await?;
        Ok(())
    }

    /// Appends one record to `path` at least once, atomically (GFS §3.3), and says
    /// where it went. Retries until the deadline.
    pub async fn append(&self, path: &str, payload: &[u8]) -> Result<Appended, GfsError> {
        let framed_bytes = crate::record::frame_bytes(payload.len());
        if framed_bytes as u64 > RECORD_BYTES_MAX {
            return Err(GfsError::TooLarge(framed_bytes, RECORD_BYTES_MAX));
        }
        let id = RecordId { client: self.id, seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1 };
        let data = Bytes::from(frame(id, payload));
        let start = Instant::now();
        let mut index = self.append_chunk(path).await?;
        let mut failed: Option<u64> = None;
        let mut backoff = Duration::from_millis(10);
        let mut last;
        loop {
            let lease = match self.lease(path, index, failed).await {
                Ok(l) => l,
                // The chunk is not there yet: another client saw the previous one full.
                Err(GfsError::Fs(FsError::Invalid(m))) if m.contains("has no chunk") => {
                    self.add_chunk(path, index).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let max = max_record_bytes(lease.chunk_bytes);
            if data.len() as u64 > max {
                return Err(GfsError::TooLarge(data.len(), max));
            }
            let nonce = rand::random();
            let attempt = async {
                self.push(&lease, nonce, &data).await?;
                let primary = lease.primary.as_ref().ok_or_else(|| Status::unavailable("no primary"))?;
                let req = AppendRequest {
                    handle: lease.handle,
                    version: lease.version,
                    data: Some(DataId { client: self.id, nonce }),
                };
                let mut c = self.conns.chunkserver(&primary.addr)?;
                c.append(rpc::request(req, CALL_TIMEOUT)).await.map(Response::into_inner)
            };
            match attempt.await {
                Ok(r) if r.chunk_full => {
                    // Padded (GFS §3.3): the record goes to the next chunk.
                    lock(&self.leases).remove(&(path.to_string(), index));
                    index += 1;
                    self.add_chunk(path, index).await?;
                    failed = None;
                    continue;
                }
                Ok(r) => return Ok(Appended { id, chunk_index: index, offset: r.offset }),
                Err(s) if s.code() == Code::InvalidArgument => {
                    return Err(GfsError::Refused(s.message().to_string()))
                }
                Err(s) => {
                    tracing::debug!(%path, index, "append attempt failed: {}", s.message());
                    last = s.message().to_string();
                    failed = Some(lease.version);
                    lock(&self.leases).remove(&(path.to_string(), index));
                }
            }
            if start.elapsed() >= self.cfg.deadline {
                return Err(GfsError::Timeout(self.cfg.deadline, last));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads every record of `path` once, in chunk order, calling `out` for each.
    pub async fn read(
        &self,
        path: &str,
        mut out: impl FnMut(RecordId, &[u8]),
    ) -> Result<ReadStats, GfsError> {
        let info = self.lookup(path).await?;
        let max_payload = max_record_bytes(info.chunk_bytes) as usize;
        let mut dedup = Deduper::default();
        let mut records = 0;
        for chunk in &info.chunks {
            self.read_chunk(path, chunk, &mut dedup, max_payload, &mut |id, p| {
                records += 1;
                out(id, p)
            })
            .await?;
        }
        Ok(ReadStats {
            records,
            duplicates: dedup.duplicates,
            skipped_bytes: dedup.skipped_bytes,
            stale: info.stale,
        })
    }

    /// Reads one chunk through `dedup`, from the nearest replica that answers.
    async fn read_chunk(
        &self,
        path: &str,
        chunk: &ChunkInfo,
        dedup: &mut Deduper,
        max_payload: usize,
        out: &mut dyn FnMut(RecordId, &[u8]),
    ) -> Result<(), GfsError> {
        if chunk.version == FIRST_VERSION.0 {
            return Ok(()); // allocated but never leased: nothing was written
        }
        let start = Instant::now();
        let mut chunk = chunk.clone();
        let mut replicas =
            rpc::nearest_first(&chunk.replicas.iter().map(|r| r.addr.clone()).collect::<Vec<_>>(), self.id);
        let mut tried = 0usize;
        let mut offset = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        let mut backoff = Duration::from_millis(50);
        let mut last = String::from("no live replica");
        loop {
            if let Some(addr) = replicas.get(tried % replicas.len().max(1)) {
                let req = ReadRequest {
                    handle: chunk.handle,
                    version: chunk.version,
                    offset,
                    length: self.cfg.read_piece_bytes,
                };
                let result = match self.conns.chunkserver(addr) {
                    Ok(mut c) => c.read(rpc::request(req, CALL_TIMEOUT)).await.map(Response::into_inner),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(r) => {
                        let n = r.data.len() as u64;
                        buf.extend_from_slice(&r.data);
                        offset += n;
                        let at_end = n == 0 || offset >= r.chunk_length;
                        let used = dedup.feed(&buf, at_end, max_payload, &mut *out);
                        buf.drain(..used);
                        if at_end {
                            return Ok(());
                        }
                        continue;
                    }
                    Err(s) => {
                        // A stale or corrupt replica, or a dead one: try the next.
                        tracing::debug!(chunk = chunk.handle, replica = %addr, "read failed: {}", s.message());
                        last = format!("{addr}: {}", s.message());
                        tried += 1;
                        if !tried.is_multiple_of(replicas.len()) {
                            continue;
                        }
                    }
                }
            }
            if start.elapsed() >= self.cfg.deadline {
                return Err(GfsError::Timeout(self.cfg.deadline, format!("chunk {}: {last}", chunk.handle)));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            // Every replica failed: ask the master where the chunk is now.
            let fresh = self.lookup(path).await?;
            if let Some(c) = fresh.chunks.into_iter().find(|c| c.index == chunk.index) {
                if c.handle == chunk.handle {
                    chunk = c;
                }
            }
            replicas = rpc::nearest_first(
                &chunk.replicas.iter().map(|r| r.addr.clone()).collect::<Vec<_>>(),
                self.id,
            );
            tried = 0;
        }
    }
}
