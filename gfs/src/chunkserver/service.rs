//! The chunkserver's gRPC service and its background work.
//!
//! - Data flow (GFS §3.2): [`Push`](crate::proto::chunkserver_server::Chunkserver::push)
//!   keeps pushed data in a bounded [`PushBuffer`] and passes each piece on to the nearest
//!   server left in the chain while it is still receiving.
//! - Control flow (GFS §3.1, §3.3): as primary of a chunk it picks each record's offset,
//!   one after the other, writes locally and has every secondary apply the same mutation
//!   at the same offset; it answers only once all of them have written it durably. A
//!   record that does not fit pads the chunk on every replica. Offsets are handed out
//!   strictly in order, but the writes of different records proceed concurrently, on
//!   the primary and on the secondaries alike: records never overlap, so positional
//!   writes give the same chunk in any order, and concurrent writers share fsyncs.
//! - For the master: version bumps (persisted before answering) with the lease, lease
//!   revocation, cloning from another server, local copies for copy-on-write.
//! - In the background: heartbeats to every master, carrying the chunk report and lease
//!   extension requests, and obeying the leader's deletion orders; and a scrubber that
//!   verifies idle chunks (GFS §5.2).

// Errors here are tonic's `Status`, the answer of every RPC handler; boxing it would
// only add conversions.
#![allow(clippy::result_large_err)]

use super::buffer::{DataKey, PushBuffer};
use super::store::{ChunkStore, StoreError};
use crate::proto::chunkserver_server::{Chunkserver, ChunkserverServer};
use crate::proto::{
    AppendReply, AppendRequest, ApplyRequest, CloneRequest, CopyLocalRequest, DataId, Empty, HeartbeatReply,
    HeartbeatRequest, PushHeader, PushPiece, ReadReply, ReadRequest, ReportedChunk, RevokeRequest,
    SetVersionReply, SetVersionRequest,
};
use crate::rpc::{self, Conns, MAX_MESSAGE_BYTES};
use crate::types::{max_record_bytes, ChunkHandle, ChunkVersion, ServerId};
use anyhow::Context;
use bytes::{Bytes, BytesMut};
use raft::NodeId;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Largest single push (a record is at most a quarter of the largest chunk).
const PUSH_BYTES_MAX: u64 = 256 << 20;
/// Largest read answered at once.
pub const READ_BYTES_MAX: u64 = 8 << 20;
/// Piece size of a clone's reads.
const CLONE_PIECE_BYTES: u64 = 1 << 20;
/// Deadline of a call to another chunkserver (a push or an applied mutation).
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest lease accepted (an hour; the paper's is a minute).
const LEASE_MS_MAX: u64 = 3_600_000;
/// Deadline of one read of a clone.
const CLONE_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How to run a chunkserver.
#[derive(Clone, Debug)]
pub struct ChunkserverConfig {
    /// Where chunks and the server id live.
    pub data_dir: PathBuf,
    /// The address others reach this server at; the listener's address when empty.
    pub advertise: String,
    /// The master group.
    pub masters: BTreeMap<NodeId, String>,
    /// Time between heartbeats.
    pub heartbeat: Duration,
    /// Most bytes of pushed data held.
    pub buffer_bytes: u64,
    /// How long pushed data waits for its mutation.
    pub buffer_ttl: Duration,
    /// Time between the scrubber's checks of one idle chunk; zero turns it off.
    pub scrub_interval: Duration,
}

impl ChunkserverConfig {
    /// Defaults: heartbeat every second, 256 MiB push buffer kept 60 s, a chunk
    /// scrubbed every 10 s.
    pub fn new(data_dir: PathBuf, masters: BTreeMap<NodeId, String>) -> ChunkserverConfig {
        ChunkserverConfig {
            data_dir,
            advertise: String::new(),
            masters,
            heartbeat: Duration::from_millis(crate::types::DEFAULT_HEARTBEAT_MS),
            buffer_bytes: 256 << 20,
            buffer_ttl: Duration::from_secs(60),
            scrub_interval: Duration::from_secs(10),
        }
    }
}

/// What a primary holds of its lease.
struct Lease {
    version: ChunkVersion,
    chunk_bytes: u64,
    secondaries: Vec<String>,
    /// Length of the lease as granted, which sets when to ask for an extension.
    granted: Duration,
    /// Appends hold it shared; a revocation takes it exclusively, so it answers only
    /// once the appends in flight are done.
    gate: tokio::sync::RwLock<()>,
    state: Mutex<LeaseState>,
}

struct LeaseState {
    expires: Instant,
    /// Invariant: every offset handed out so far lies below it.
    next_offset: u64,
    full: bool,
    revoked: bool,
    last_mutation: Option<Instant>,
}

impl Lease {
    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a record goes, as the primary decided.
enum Slot {
    At(u64),
    /// It does not fit; `first` says this append found the chunk not yet padded.
    Full {
        first: bool,
    },
}

struct Inner {
    id: ServerId,
    addr: String,
    store: Arc<ChunkStore>,
    buffer: PushBuffer,
    leases: Mutex<HashMap<ChunkHandle, Arc<Lease>>>,
    conns: Conns,
    cfg: ChunkserverConfig,
}

/// The gRPC service (cheap to clone).
#[derive(Clone)]
pub struct ChunkserverService {
    inner: Arc<Inner>,
}

/// Runs a chunkserver on a bound listener until the server fails.
pub async fn serve(cfg: ChunkserverConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    anyhow::ensure!(!cfg.heartbeat.is_zero(), "the heartbeat interval must be positive");
    anyhow::ensure!(!cfg.masters.is_empty(), "no masters given");
    let local = listener.local_addr()?;
    let svc = ChunkserverService::open(cfg, local).await?;
    tracing::info!(id = %svc.inner.id, addr = %svc.inner.addr, "chunkserver serving");
    svc.spawn_background();
    tonic::transport::Server::builder()
        .add_service(
            ChunkserverServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
                .map_err(|e| anyhow::anyhow!(e))?,
        )
        .await?;
    Ok(())
}

/// Reads the server id kept in `dir`, drawing and keeping one on first use.
fn server_id(dir: &Path) -> anyhow::Result<ServerId> {
    let path = dir.join("server-id");
    if let Some(bytes) = storage::read_checked(&path)? {
        let raw: [u8; 8] = bytes.as_slice().try_into().context("server-id file is not 8 bytes")?;
        return Ok(ServerId(u64::from_le_bytes(raw)));
    }
    let id = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    storage::write_atomic(&path, &id.to_le_bytes())?;
    Ok(ServerId(id))
}

/// A store error as a status code (see the proto's list).
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NoChunk(_) => Status::not_found(e.to_string()),
        StoreError::Version { .. } => Status::failed_precondition(e.to_string()),
        StoreError::Corrupt(..) => Status::data_loss(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::Storage(storage::StorageError::NoSpace { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        StoreError::Storage(_) => Status::internal(e.to_string()),
    }
}

/// Runs blocking disk work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("disk task failed: {e}")))?
        .map_err(store_status)
}

/// A lease length from the master, bounded so that no value can overflow a clock.
fn lease_length(ms: u64) -> Duration {
    Duration::from_millis(ms.min(LEASE_MS_MAX))
}

fn data_key(id: Option<DataId>) -> Result<DataKey, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument("missing data id"))?;
    Ok(DataKey { client: id.client, nonce: id.nonce })
}

impl ChunkserverService {
    /// Opens the store and the server id; `local` is the listener's address.
    pub async fn open(
        cfg: ChunkserverConfig,
        local: std::net::SocketAddr,
    ) -> anyhow::Result<ChunkserverService> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create {}", cfg.data_dir.display()))?;
        let id = server_id(&cfg.data_dir).context("read server id")?;
        let chunks_dir = cfg.data_dir.join("chunks");
        let store = tokio::task::spawn_blocking(move || ChunkStore::open(&chunks_dir))
            .await?
            .context("open chunk store")?;
        let addr = if cfg.advertise.is_empty() { local.to_string() } else { cfg.advertise.clone() };
        Ok(ChunkserverService {
            inner: Arc::new(Inner {
                id,
                addr,
                store: Arc::new(store),
                buffer: PushBuffer::new(cfg.buffer_bytes, cfg.buffer_ttl),
                leases: Mutex::new(HashMap::new()),
                conns: Conns::default(),
                cfg,
            }),
        })
    }

    /// This server's id.
    pub fn id(&self) -> ServerId {
        self.inner.id
    }

    /// Starts the heartbeat and scrubber tasks.
    pub fn spawn_background(&self) {
        for master in self.inner.cfg.masters.values() {
            tokio::spawn(self.clone().heartbeats(master.clone()));
        }
        if !self.inner.cfg.scrub_interval.is_zero() {
            tokio::spawn(self.clone().scrub());
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkHandle, Arc<Lease>>> {
        self.inner.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease(&self, handle: ChunkHandle) -> Option<Arc<Lease>> {
        self.leases().get(&handle).cloned()
    }

    /// Applies a mutation (`data` at `offset`, or padding when `data` is `None`) here and
    /// on every secondary, at the same offset; succeeds only if all of them made it
    /// durable.
    async fn mutate_all(
        &self,
        lease: &Lease,
        handle: ChunkHandle,
        key: DataKey,
        data: Option<Bytes>,
        offset: u64,
    ) -> Result<(), Status> {
        let store = self.inner.store.clone();
        let version = lease.version;
        let pad = data.is_none();
        let local = blocking(move || match data {
            Some(d) => store.write(handle, version, offset, &d),
            None => store.pad(handle, version),
        });
        let remote = lease.secondaries.iter().map(|addr| {
            let req = ApplyRequest {
                handle: handle.0,
                version: version.0,
                data: Some(DataId { client: key.client, nonce: key.nonce }),
                offset,
                pad,
            };
            async move {
                let mut c = self.inner.conns.chunkserver(addr)?;
                c.apply(rpc::request(req, PEER_TIMEOUT)).await.map(|_| ())
            }
        });
        let (local, remote) = tokio::join!(local, futures::future::join_all(remote));
        let mut failures = Vec::new();
        if let Err(s) = local {
            failures.push(format!("{} (primary): {}", self.inner.addr, s.message()));
        }
        for (addr, r) in lease.secondaries.iter().zip(remote) {
            if let Err(s) = r {
                failures.push(format!("{addr}: {}", s.message()));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Status::aborted(format!("mutation of chunk {handle} failed on {}", failures.join("; "))))
        }
    }

    /// Receives a push (the first piece already taken) and forwards it along the chain.
    async fn receive(
        &self,
        header: PushHeader,
        key: DataKey,
        first: Bytes,
        mut stream: Streaming<PushPiece>,
    ) -> Result<(), Status> {
        // The next hop is the nearest server left in the chain (GFS §3.2).
        let mut chain = rpc::nearest_first(&header.forward, key.nonce);
        let downstream = if chain.is_empty() {
            None
        } else {
            let next = chain.remove(0);
            let (tx, rx) = mpsc::channel::<PushPiece>(16);
            let mut client = self.inner.conns.chunkserver(&next)?;
            let call = tokio::spawn(async move {
                client.push(rpc::request(ReceiverStream::new(rx), PEER_TIMEOUT)).await
            });
            let head = PushHeader { forward: chain, ..header.clone() };
            let _ = tx.send(PushPiece { header: Some(head), data: Bytes::new() }).await;
            Some((next, tx, call))
        };
        let total = header.total_bytes as usize;
        let mut data = BytesMut::with_capacity(total);
        let mut piece = first;
        loop {
            if data.len() + piece.len() > total {
                return Err(Status::invalid_argument("push longer than its header says"));
            }
            data.extend_from_slice(&piece);
            if let Some((_, tx, _)) = &downstream {
                if !piece.is_empty() {
                    // A failed downstream shows in its call's result below.
                    let _ = tx.send(PushPiece { header: None, data: piece }).await;
                }
            }
            match stream.message().await? {
                Some(p) => piece = p.data,
                None => break,
            }
        }
        if data.len() != total {
            return Err(Status::invalid_argument(format!(
                "push ended after {} of {total} bytes",
                data.len()
            )));
        }
        if crc32fast::hash(&data) != header.crc {
            return Err(Status::data_loss("pushed data failed its checksum"));
        }
        if let Some((next, tx, call)) = downstream {
            drop(tx);
            match call.await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    return Err(Status::unavailable(format!("push to {next} failed: {}", s.message())))
                }
                Err(e) => return Err(Status::internal(format!("push to {next} failed: {e}"))),
            }
        }
        // Kept only once the rest of the chain has it too: a failed push holds no space.
        self.inner.buffer.insert(key, data.freeze());
        Ok(())
    }

    /// Heartbeats to one master, forever. Each master has its own loop, so a master
    /// that is down or slow delays nobody's heartbeats but its own.
    async fn heartbeats(self, master: String) {
        let mut ticker = tokio::time::interval(self.inner.cfg.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = (self.inner.cfg.heartbeat * 2).min(Duration::from_secs(5));
        loop {
            ticker.tick().await;
            let req = self.heartbeat_request();
            let sent_at = Instant::now();
            let reply = match self.inner.conns.master(&master) {
                Ok(mut c) => c.heartbeat(rpc::request(req, timeout)).await.map(Response::into_inner),
                Err(e) => Err(e),
            };
            if let Ok(reply) = reply {
                if reply.leader {
                    self.obey(reply, sent_at).await;
                }
            }
        }
    }

    fn heartbeat_request(&self) -> HeartbeatRequest {
        let report = self.inner.store.report();
        let now = Instant::now();
        let extend = self
            .leases()
            .iter()
            .filter(|(_, l)| {
                let st = l.state();
                // Ask while mutations go on and the lease is past its middle (GFS §3.1).
                !st.revoked
                    && st.expires > now
                    && st.expires - now < l.granted / 2
                    && st.last_mutation.is_some_and(|m| now.duration_since(m) < l.granted)
            })
            .map(|(h, _)| h.0)
            .collect();
        HeartbeatRequest {
            server: self.inner.id.0,
            addr: self.inner.addr.clone(),
            used_bytes: report.iter().map(|r| r.length).sum(),
            chunks: report
                .iter()
                .filter(|r| !r.corrupt)
                .map(|r| ReportedChunk { handle: r.handle.0, version: r.version.0, length: r.length })
                .collect(),
            corrupt: report.iter().filter(|r| r.corrupt).map(|r| r.handle.0).collect(),
            extend,
        }
    }

    /// Carries out the leader's answer to a heartbeat sent at `sent_at`.
    async fn obey(&self, reply: HeartbeatReply, sent_at: Instant) {
        for ext in reply.extended {
            if let Some(lease) = self.lease(ChunkHandle(ext.handle)) {
                if lease.version.0 == ext.version {
                    let mut st = lease.state();
                    // Counted from the sending, which is before the master's clock reading.
                    st.expires = st.expires.max(sent_at + lease_length(ext.lease_ms));
                }
            }
        }
        for order in reply.delete {
            let (handle, below) = (ChunkHandle(order.handle), ChunkVersion(order.below_version));
            let store = self.inner.store.clone();
            match blocking(move || store.delete(handle, below)).await {
                Ok(true) => {
                    tracing::info!(chunk = %handle, "deleted on the master's order (below {below})");
                    self.leases().remove(&handle);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(chunk = %handle, "delete failed: {}", e.message()),
            }
        }
    }

    /// Verifies one idle chunk per interval, round robin (GFS §5.2).
    async fn scrub(self) {
        let mut ticker = tokio::time::interval(self.inner.cfg.scrub_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = ChunkHandle(0);
        loop {
            ticker.tick().await;
            let report = self.inner.store.report();
            let leased: Vec<ChunkHandle> = self.leases().keys().copied().collect();
            let candidates = report.iter().filter(|r| !r.corrupt && !leased.contains(&r.handle));
            let next = candidates.clone().find(|r| r.handle > last).or_else(|| candidates.clone().next());
            let Some(next) = next else { continue };
            last = next.handle;
            let store = self.inner.store.clone();
            let handle = next.handle;
            if let Err(e) = blocking(move || store.verify(handle)).await {
                if e.code() != tonic::Code::NotFound {
                    tracing::warn!(chunk = %handle, "scrub: {}", e.message());
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Chunkserver for ChunkserverService {
    async fn push(&self, request: Request<Streaming<PushPiece>>) -> Result<Response<Empty>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty push"))?;
        let header = first.header.ok_or_else(|| Status::invalid_argument("a push starts with its header"))?;
        let key = data_key(header.id)?;
        if header.total_bytes > PUSH_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "push of {} bytes is too large",
                header.total_bytes
            )));
        }
        if !self.inner.buffer.reserve(header.total_bytes) {
            return Err(Status::resource_exhausted("push buffer full"));
        }
        let total = header.total_bytes;
        let result = self.receive(header, key, first.data, stream).await;
        if result.is_err() {
            self.inner.buffer.release(total);
        }
        result.map(|_| Response::new(Empty {}))
    }

    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendReply>, Status> {
        let r = request.into_inner();
        let handle = ChunkHandle(r.handle);
        let key = data_key(r.data)?;
        let lease = self
            .lease(handle)
            .ok_or_else(|| Status::failed_precondition(format!("not the primary of chunk {handle}")))?;
        if lease.version.0 != r.version {
            return Err(Status::failed_precondition(format!(
                "lease of chunk {handle} is for {}, not v{}",
                lease.version, r.version
            )));
        }
        let _in_flight = lease.gate.read().await;
        let data = self
            .inner
            .buffer
            .get(&key)
            .ok_or_else(|| Status::not_found("no pushed data under that id (push again)"))?;
        let len = data.len() as u64;
        if len > max_record_bytes(lease.chunk_bytes) {
            return Err(Status::invalid_argument(format!("a record of {len} bytes exceeds a quarter chunk")));
        }
        let slot = {
            let mut st = lease.state();
            let now = Instant::now();
            if st.revoked || st.expires <= now {
                return Err(Status::failed_precondition(format!(
                    "lease of chunk {handle} expired or revoked"
                )));
            }
            st.last_mutation = Some(now);
            // Records start at aligned offsets, whatever a client sends (see `record`).
            let offset = st.next_offset.next_multiple_of(crate::record::ALIGN as u64);
            if st.full || offset + len > lease.chunk_bytes {
                let first = !st.full;
                st.full = true;
                Slot::Full { first }
            } else {
                st.next_offset = offset + len;
                Slot::At(offset)
            }
        };
        match slot {
            Slot::Full { first } => {
                if first {
                    if let Err(e) = self.mutate_all(&lease, handle, key, None, 0).await {
                        // Replicas left unpadded are only shorter; readers stop at their end.
                        tracing::warn!("padding: {}", e.message());
                    }
                }
                Ok(Response::new(AppendReply { chunk_full: true, offset: 0 }))
            }
            Slot::At(offset) => {
                self.mutate_all(&lease, handle, key, Some(data), offset).await?;
                self.inner.buffer.remove(&key);
                Ok(Response::new(AppendReply { chunk_full: false, offset }))
            }
        }
    }

    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let (handle, version) = (ChunkHandle(r.handle), ChunkVersion(r.version));
        let store = self.inner.store.clone();
        if r.pad {
            blocking(move || store.pad(handle, version)).await?;
        } else {
            let key = data_key(r.data)?;
            let data = self
                .inner
                .buffer
                .get(&key)
                .ok_or_else(|| Status::not_found("no pushed data under that id (push again)"))?;
            blocking(move || store.write(handle, version, r.offset, &data)).await?;
            self.inner.buffer.remove(&key);
        }
        Ok(Response::new(Empty {}))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let r = request.into_inner();
        let handle = ChunkHandle(r.handle);
        let store = self.inner.store.clone();
        let len = r.length.min(READ_BYTES_MAX);
        let (data, chunk_length) =
            blocking(move || store.read(handle, ChunkVersion(r.version), r.offset, len)).await?;
        let (version, _, chunk_bytes) = self.inner.store.info(handle).unwrap_or_default();
        Ok(Response::new(ReadReply { data: data.into(), chunk_length, version: version.0, chunk_bytes }))
    }

    async fn set_version(
        &self,
        request: Request<SetVersionRequest>,
    ) -> Result<Response<SetVersionReply>, Status> {
        let r = request.into_inner();
        let received = Instant::now();
        let (handle, version) = (ChunkHandle(r.handle), ChunkVersion(r.version));
        let store = self.inner.store.clone();
        let create = r.create;
        let chunk_bytes = r.chunk_bytes;
        let length = blocking(move || {
            if create && store.info(handle).is_none() {
                store.create(handle, version, chunk_bytes)?;
            }
            store.set_version(handle, version)
        })
        .await?;
        let mut leases = self.leases();
        if r.lease_ms > 0 {
            let chunk_bytes = self.inner.store.info(handle).map_or(r.chunk_bytes, |i| i.2);
            let granted = lease_length(r.lease_ms);
            let lease = Lease {
                version,
                chunk_bytes,
                secondaries: r.secondaries,
                granted,
                gate: tokio::sync::RwLock::new(()),
                state: Mutex::new(LeaseState {
                    expires: received + granted,
                    next_offset: length,
                    full: length >= chunk_bytes,
                    revoked: false,
                    last_mutation: None,
                }),
            };
            tracing::debug!(chunk = %handle, %version, "lease granted");
            leases.insert(handle, Arc::new(lease));
        } else {
            leases.remove(&handle);
        }
        Ok(Response::new(SetVersionReply { length }))
    }

    async fn revoke(&self, request: Request<RevokeRequest>) -> Result<Response<Empty>, Status> {
        let handle = ChunkHandle(request.into_inner().handle);
        if let Some(lease) = self.lease(handle) {
            let _no_appends = lease.gate.write().await;
            lease.state().revoked = true;
            let mut leases = self.leases();
            if leases.get(&handle).is_some_and(|l| Arc::ptr_eq(l, &lease)) {
                leases.remove(&handle);
            }
        }
        Ok(Response::new(Empty {}))
    }

    async fn clone_chunk(&self, request: Request<CloneRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let (handle, version) = (ChunkHandle(r.handle), ChunkVersion(r.version));
        let mut source = self.inner.conns.chunkserver(&r.source)?;
        let mut staged = None;
        let mut offset = 0u64;
        loop {
            let req = ReadRequest { handle: handle.0, version: version.0, offset, length: CLONE_PIECE_BYTES };
            let reply = source.read(rpc::request(req, CLONE_READ_TIMEOUT)).await?.into_inner();
            if reply.version != version.0 {
                return Err(Status::failed_precondition(format!(
                    "source has chunk {handle} at v{}, not {version}",
                    reply.version
                )));
            }
            let mut s = match staged.take() {
                Some(s) => s,
                None => {
                    let store = self.inner.store.clone();
                    blocking(move || store.stage(handle, reply.chunk_bytes)).await?
                }
            };
            let n = reply.data.len() as u64;
            let data = reply.data;
            s = blocking(move || s.write(offset, &data).map(|_| s)).await?;
            staged = Some(s);
            offset += n;
            if n == 0 || offset >= reply.chunk_length {
                break;
            }
        }
        let store = self.inner.store.clone();
        let staged = staged.ok_or_else(|| Status::internal("clone read nothing"))?;
        blocking(move || store.commit(staged, version)).await?;
        tracing::info!(chunk = %handle, %version, from = %r.source, bytes = offset, "cloned");
        Ok(Response::new(Empty {}))
    }

    async fn copy_local(&self, request: Request<CopyLocalRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let store = self.inner.store.clone();
        blocking(move || store.copy_local(ChunkHandle(r.from), ChunkHandle(r.to), ChunkVersion(r.version)))
            .await?;
        Ok(Response::new(Empty {}))
    }
}
