//! The Petal server: a [`PetalMachine`] replicated by a Raft [`Node`], served over gRPC on
//! the same port as the Raft transport.
//!
//! - Writes, decommits and disk management go through the log ([`Node::propose`]); the
//!   leader refuses at once a write whose lease (less the margin) has expired, and stamps
//!   the rest with its clock for the check at apply.
//! - Reads are linearizable: ReadIndex on the leader ([`Node::read`]), then the local
//!   store. A block that fails its crc is reported (log and status counter), the range is
//!   read from a peer that has applied as far, and a background task rewrites the bad
//!   block from a peer's copy of the same version.
//! - Peers call `FetchExtents` to install a snapshot manifest and to repair blocks.
//! - A replica whose store failed (e.g. its data disk is full) serves no data, hands
//!   leadership to another replica, and stops its Raft node at its next snapshot point
//!   rather than compact its log; restarted with space, it replays the log.

use crate::error::PetalError;
use crate::machine::{Command, ExtentSource, Fence, MachineStats, Op, PetalMachine, Reply};
use crate::proto::petal_client::PetalClient as GrpcClient;
use crate::proto::petal_server::{Petal, PetalServer};
use crate::proto::{self, Code, Outcome};
use crate::store::{ExtentContent, Store};
use crate::{codec, unix_ms};
use raft::group::start_member;
use raft::{ClientError, Node, NodeConfig, NodeId, Role};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// The Raft group id of the (single) Petal group.
pub const GROUP: u64 = 1;
/// Default bound on one read or write.
pub const MAX_IO_BYTES_DEFAULT: u64 = 1 << 20;
/// Default fencing margin: a write is refused this long before its writer's lease ends.
pub const FENCE_MARGIN_MS_DEFAULT: u64 = 2000;
/// Largest Raft message between replicas (entries hold whole writes).
const RAFT_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// How long a peer call may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replica installing a snapshot keeps trying its peers.
const INSTALL_DEADLINE: Duration = Duration::from_secs(300);
/// How long `PeerRead` waits for the replica to reach the caller's index.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);
/// How often the repair task looks for damaged blocks without being woken.
const REPAIR_INTERVAL: Duration = Duration::from_millis(500);

/// How to run one replica.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This replica.
    pub id: NodeId,
    /// Every founding member's address (this replica's included).
    pub peers: BTreeMap<NodeId, String>,
    /// Where the replica keeps its Raft log (`raft/`) and block store (`store/`).
    pub data_dir: PathBuf,
    /// Where to listen (clients and peers alike).
    pub listen: SocketAddr,
    /// Raft tick length (the election timeout is 10 to 20 ticks).
    pub tick: Duration,
    /// Persist the store and compact the log after this many applied entries.
    pub snapshot_entries: u64,
    /// Most bytes in one read or write.
    pub max_io_bytes: u64,
    /// Writes are refused this long before their writer's lease expires.
    pub fence_margin_ms: u64,
}

impl ServerConfig {
    /// Defaults for replica `id` of `peers`, listening on its own address in `peers`.
    pub fn new(
        id: NodeId,
        peers: BTreeMap<NodeId, String>,
        data_dir: PathBuf,
    ) -> anyhow::Result<ServerConfig> {
        let listen =
            peers.get(&id).ok_or_else(|| anyhow::anyhow!("the peer list does not name replica {id}"))?;
        let listen = listen.parse().map_err(|e| anyhow::anyhow!("bad listen address {listen}: {e}"))?;
        Ok(ServerConfig {
            id,
            peers,
            data_dir,
            listen,
            tick: Duration::from_millis(50),
            snapshot_entries: 2000,
            max_io_bytes: MAX_IO_BYTES_DEFAULT,
            fence_margin_ms: FENCE_MARGIN_MS_DEFAULT,
        })
    }
}

/// Runs a replica until the server fails.
pub async fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    serve_on(cfg, listener).await
}

/// Runs a replica on a bound listener. Needs a multi-threaded tokio runtime (installing a
/// snapshot fetches from peers inside the Raft driver).
pub async fn serve_on(cfg: ServerConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let max_message_bytes = cfg.max_io_bytes as usize + (1 << 20);
    let peers = Arc::new(Peers::new(cfg.id, &cfg.peers, max_message_bytes)?);
    let store = Arc::new(RwLock::new(Store::open(&cfg.data_dir.join("store"))?));
    let source = PeerSource { peers: peers.clone(), runtime: tokio::runtime::Handle::current() };
    let machine = PetalMachine::new(store.clone(), Box::new(source))?;
    let machine_stats = machine.stats();

    let mut node_cfg = NodeConfig::new(cfg.id, cfg.data_dir.join("raft"), None);
    node_cfg.tick = cfg.tick;
    node_cfg.snapshot_entries = cfg.snapshot_entries;
    node_cfg.raft.max_msg_bytes = 4 << 20;
    node_cfg.raft.max_inflight_bytes = 64 << 20;
    node_cfg.raft.snapshot_chunk_bytes = 1 << 20;
    let member = start_member(GROUP, &cfg.peers, node_cfg, machine, RAFT_MESSAGE_BYTES_MAX)?;
    let node = member.node;

    let repair = Arc::new(Notify::new());
    tokio::spawn(repair_task(store.clone(), peers.clone(), repair.clone()));
    tokio::spawn(failed_store_watch(node.clone(), store.clone(), cfg.peers.keys().copied().collect()));
    let service = PetalService {
        id: cfg.id,
        node,
        store,
        peers,
        machine_stats,
        max_io_bytes: cfg.max_io_bytes,
        fence_margin_ms: cfg.fence_margin_ms,
        repair,
    };
    tracing::info!(id = %cfg.id, listen = %listener.local_addr()?, "petal replica serving");
    tonic::transport::Server::builder()
        .add_service(member.service)
        .add_service(
            PetalServer::new(service)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        // TCP_NODELAY on accepted sockets: without it, a reply written in two pieces waits
        // for the client's delayed ACK (40 ms).
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
                .map_err(|e| anyhow::anyhow!("listen: {e}"))?,
        )
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Peers: the other replicas, as seen by this one
// ---------------------------------------------------------------------------------------

/// gRPC clients of the other replicas.
struct Peers {
    conns: Vec<(NodeId, GrpcClient<Channel>)>,
}

impl Peers {
    fn new(me: NodeId, peers: &BTreeMap<NodeId, String>, max_message_bytes: usize) -> anyhow::Result<Peers> {
        let mut conns = Vec::new();
        for (id, addr) in peers {
            if *id != me {
                conns.push((*id, connect(addr, max_message_bytes)?));
            }
        }
        Ok(Peers { conns })
    }

    /// Fetches extents from the first peer that has healthy copies of them all, as of
    /// `min_index` exactly (`exact`), or as they are now on a peer that has applied it.
    async fn fetch(
        &self,
        min_index: u64,
        extents: &[(String, u64)],
        exact: bool,
    ) -> Result<Vec<Option<ExtentContent>>, String> {
        let mut errors = Vec::new();
        for (id, conn) in &self.conns {
            match fetch_from(conn.clone(), min_index, extents, exact).await {
                Ok(got) => return Ok(got),
                Err(e) => errors.push(format!("{id}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    /// Reads a range from the first peer that has applied `min_index` and a healthy copy.
    async fn read(&self, min_index: u64, disk: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut errors = Vec::new();
        for (id, conn) in &self.conns {
            let req = proto::PeerReadRequest { group: GROUP, min_index, disk: disk.to_string(), offset, len };
            match conn.clone().peer_read(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    match r.outcome.as_ref().and_then(PetalError::from_outcome) {
                        None => return Ok(r.data.to_vec()),
                        Some(e) => errors.push(format!("{id}: {e}")),
                    }
                }
                Err(s) => errors.push(format!("{id}: {}", s.message())),
            }
        }
        Err(errors.join("; "))
    }
}

/// A lazily connecting gRPC client of a replica at `addr` (`host:port` or a URI).
pub(crate) fn connect(addr: &str, max_message_bytes: usize) -> anyhow::Result<GrpcClient<Channel>> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let channel = Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(PEER_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(GrpcClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

async fn fetch_from(
    mut conn: GrpcClient<Channel>,
    min_index: u64,
    extents: &[(String, u64)],
    exact: bool,
) -> Result<Vec<Option<ExtentContent>>, String> {
    let req = proto::FetchRequest {
        group: GROUP,
        min_index,
        exact,
        extents: extents
            .iter()
            .map(|(disk, extent)| proto::ExtentRef { disk: disk.clone(), extent: *extent })
            .collect(),
    };
    let mut stream = conn.fetch_extents(req).await.map_err(|s| s.message().to_string())?.into_inner();
    let mut out = Vec::with_capacity(extents.len());
    while let Some(x) = stream.message().await.map_err(|s| s.message().to_string())? {
        let i = out.len();
        if i >= extents.len() || x.disk != extents[i].0 || x.extent != extents[i].1 {
            return Err("peer sent extents out of order".into());
        }
        if x.corrupt {
            return Err(format!("peer's copy of {}:{} is corrupt", x.disk, x.extent));
        }
        out.push(x.found.then(|| ExtentContent {
            written: x.written as u16,
            data: x.data.to_vec(),
            modified: x.modified_index,
        }));
    }
    if out.len() != extents.len() {
        return Err(format!("peer sent {} of {} extents", out.len(), extents.len()));
    }
    Ok(out)
}

/// The [`ExtentSource`] of a replica: its peers over gRPC. `fetch` is called inside the
/// Raft driver and blocks it (the replica has nothing else to do until it has the data).
///
/// It asks first for the extents exactly as of the manifest's index, which the replica
/// that made the manifest keeps pinned until its next persist; failing that (the pin has
/// moved on), for their current contents, which the entries after the manifest replay
/// over (a fuzzy snapshot: see the `store` module for what that leaves uncovered).
struct PeerSource {
    peers: Arc<Peers>,
    runtime: tokio::runtime::Handle,
}

impl ExtentSource for PeerSource {
    fn fetch(&self, min_index: u64, extents: &[(String, u64)]) -> Result<Vec<Option<ExtentContent>>, String> {
        let start = Instant::now();
        tokio::task::block_in_place(|| {
            self.runtime.block_on(async {
                loop {
                    let exact = self.peers.fetch(min_index, extents, true).await;
                    let got = match exact {
                        Ok(got) => Ok(got),
                        Err(e) => {
                            tracing::warn!("no peer has the state pinned at {min_index} ({e}); fetching current contents");
                            self.peers.fetch(min_index, extents, false).await
                        }
                    };
                    match got {
                        Ok(got) => return Ok(got),
                        Err(e) if start.elapsed() > INSTALL_DEADLINE => return Err(e),
                        Err(e) => {
                            tracing::warn!("snapshot fetch: no peer could serve yet: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
        })
    }
}

/// Rewrites damaged blocks from a peer's copy of the same version, when woken and every
/// [`REPAIR_INTERVAL`].
async fn repair_task(store: Arc<RwLock<Store>>, peers: Arc<Peers>, wake: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(REPAIR_INTERVAL) => {}
        }
        let damaged = read_store(&store).damaged_extents();
        for (disk, extent) in damaged {
            for (id, conn) in &peers.conns {
                let want = [(disk.clone(), extent)];
                let Ok(mut got) = fetch_from(conn.clone(), 0, &want, false).await else { continue };
                let Some(Some(content)) = got.pop() else { continue };
                match write_store(&store).repair(&disk, extent, &content) {
                    Ok(Some(_)) => break,
                    Ok(None) => tracing::debug!(%id, disk, extent, "repair: versions differ, retrying later"),
                    Err(e) => tracing::warn!(%id, disk, extent, "repair failed: {e}"),
                }
            }
        }
    }
}

/// Hands leadership away from a replica whose store failed.
async fn failed_store_watch(node: Node<PetalMachine>, store: Arc<RwLock<Store>>, voters: Vec<NodeId>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if read_store(&store).failed().is_none() || !node.state().is_leader {
            continue;
        }
        let me = node.state().leader;
        if let Some(to) = voters.iter().copied().find(|v| Some(*v) != me) {
            tracing::warn!(%to, "store failed: handing leadership over");
            let _ = node.transfer_leader(to).await;
        }
    }
}

fn read_store(store: &RwLock<Store>) -> std::sync::RwLockReadGuard<'_, Store> {
    store.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_store(store: &RwLock<Store>) -> std::sync::RwLockWriteGuard<'_, Store> {
    store.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// The gRPC service
// ---------------------------------------------------------------------------------------

struct PetalService {
    id: NodeId,
    node: Node<PetalMachine>,
    store: Arc<RwLock<Store>>,
    peers: Arc<Peers>,
    machine_stats: Arc<MachineStats>,
    max_io_bytes: u64,
    fence_margin_ms: u64,
    repair: Arc<Notify>,
}

fn ok() -> Option<Outcome> {
    Some(Outcome::default())
}

fn failed(e: &PetalError) -> Option<Outcome> {
    Some(e.to_outcome())
}

/// The wire outcome of a failed call to the Raft node.
fn node_error(e: ClientError) -> Option<Outcome> {
    let (code, leader) = match &e {
        ClientError::NotLeader { leader } => (Code::NotLeader, leader.map_or(0, |l| l.0)),
        ClientError::Unknown | ClientError::Busy => (Code::Retry, 0),
        ClientError::Refused(_) => (Code::Invalid, 0),
        ClientError::Stopped(_) => (Code::Unavailable, 0),
    };
    Some(Outcome { code: code as i32, message: e.to_string(), leader, error: Default::default() })
}

impl PetalService {
    #[allow(clippy::result_large_err)] // tonic's handlers answer with a Status
    fn check_group(&self, group: u64) -> Result<(), Status> {
        match group {
            0 | GROUP => Ok(()),
            g => Err(Status::not_found(format!("unknown group {g}"))),
        }
    }

    fn check_size(&self, bytes: u64) -> Result<(), PetalError> {
        if bytes > self.max_io_bytes {
            return Err(PetalError::TooLarge { bytes, max_bytes: self.max_io_bytes });
        }
        Ok(())
    }

    /// Proposes `op` and waits for its answer.
    async fn execute(&self, id: Option<proto::RequestId>, op: Op) -> proto::Reply {
        let now = unix_ms();
        if let Op::Write { fence: Some(f), .. } | Op::Decommit { fence: Some(f), .. } = &op {
            if f.expired_at(now) {
                self.machine_stats.fenced.fetch_add(1, Relaxed);
                let e = PetalError::Fenced { lease_expiry_ms: f.lease_expiry_ms, margin_ms: f.margin_ms };
                return proto::Reply { outcome: failed(&e) };
            }
        }
        let id = id.unwrap_or_default();
        let cmd = Command { client: id.client, seq: id.seq, acked_below: id.acked_below, stamp_ms: now, op };
        let outcome = match self.node.propose(cmd.encode()).await {
            Ok(bytes) => match codec::decode::<Reply>(&bytes) {
                Ok(Ok(())) => ok(),
                Ok(Err(e)) => failed(&e),
                Err(e) => failed(&PetalError::Invalid(format!("bad state machine answer: {e}"))),
            },
            Err(e) => node_error(e),
        };
        proto::Reply { outcome }
    }

    fn fence(&self, lease_expiry_ms: u64) -> Option<Fence> {
        (lease_expiry_ms != 0).then_some(Fence { lease_expiry_ms, margin_ms: self.fence_margin_ms })
    }

    /// Waits for a linearizable read point (ReadIndex): the store then reflects every
    /// write acknowledged before the call.
    async fn read_point(&self) -> Result<(), Option<Outcome>> {
        self.node.read(|_| ()).await.map_err(node_error)
    }

    /// Serves a read whose local copy failed: reports a corrupt block, then reads the
    /// range from a peer that has applied as far as this replica.
    async fn read_elsewhere(&self, disk: &str, offset: u64, len: u64, e: PetalError) -> proto::ReadReply {
        let e = match e {
            PetalError::Corrupt { disk: d, extent, block, detail, .. } => {
                tracing::error!(replica = self.id.0, disk = d, extent, block, "corrupt block: {detail}");
                if let Err(e) = write_store(&self.store).report_corrupt(&d, extent, block) {
                    tracing::warn!("could not record the damage: {e}");
                }
                self.repair.notify_one();
                PetalError::Corrupt { disk: d, extent, block, replica: self.id.0, detail }
            }
            other => other,
        };
        let min_index = read_store(&self.store).applied();
        match self.peers.read(min_index, disk, offset, len).await {
            Ok(data) => proto::ReadReply { outcome: ok(), data: data.into() },
            Err(peer_errors) => {
                tracing::error!(
                    "no healthy copy of {disk} [{offset}, +{len}): local: {e}; peers: {peer_errors}"
                );
                proto::ReadReply { outcome: failed(&e), data: Default::default() }
            }
        }
    }
}

type ExtentStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::ExtentData, Status>> + Send>>;

#[tonic::async_trait]
impl Petal for PetalService {
    async fn create(&self, request: Request<proto::DiskRequest>) -> Result<Response<proto::Reply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        Ok(Response::new(self.execute(r.id, Op::Create { disk: r.disk }).await))
    }

    async fn delete(&self, request: Request<proto::DiskRequest>) -> Result<Response<proto::Reply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        Ok(Response::new(self.execute(r.id, Op::Delete { disk: r.disk }).await))
    }

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::Reply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        Ok(Response::new(self.execute(r.id, Op::Snapshot { disk: r.disk, name: r.name }).await))
    }

    async fn list(&self, request: Request<proto::ListRequest>) -> Result<Response<proto::ListReply>, Status> {
        self.check_group(request.into_inner().group)?;
        if let Err(outcome) = self.read_point().await {
            return Ok(Response::new(proto::ListReply { outcome, disks: Vec::new() }));
        }
        let disks = read_store(&self.store).list().into_iter().map(disk_info).collect();
        Ok(Response::new(proto::ListReply { outcome: ok(), disks }))
    }

    async fn stat(&self, request: Request<proto::DiskRequest>) -> Result<Response<proto::StatReply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        if let Err(outcome) = self.read_point().await {
            return Ok(Response::new(proto::StatReply { outcome, disk: None }));
        }
        let reply = match read_store(&self.store).stat(&r.disk) {
            Ok(info) => proto::StatReply { outcome: ok(), disk: Some(disk_info(info)) },
            Err(e) => proto::StatReply { outcome: failed(&e), disk: None },
        };
        Ok(Response::new(reply))
    }

    async fn write(&self, request: Request<proto::WriteRequest>) -> Result<Response<proto::Reply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        let checked = self
            .check_size(r.data.len() as u64)
            .and_then(|()| crate::store::check_range(r.offset, r.data.len() as u64));
        if let Err(e) = checked {
            return Ok(Response::new(proto::Reply { outcome: failed(&e) }));
        }
        let op =
            Op::Write { disk: r.disk, offset: r.offset, data: r.data, fence: self.fence(r.lease_expiry_ms) };
        Ok(Response::new(self.execute(r.id, op).await))
    }

    async fn decommit(
        &self,
        request: Request<proto::DecommitRequest>,
    ) -> Result<Response<proto::Reply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        if let Err(e) = crate::store::check_range(r.offset, r.len) {
            return Ok(Response::new(proto::Reply { outcome: failed(&e) }));
        }
        let op =
            Op::Decommit { disk: r.disk, offset: r.offset, len: r.len, fence: self.fence(r.lease_expiry_ms) };
        Ok(Response::new(self.execute(r.id, op).await))
    }

    async fn read(&self, request: Request<proto::ReadRequest>) -> Result<Response<proto::ReadReply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        let checked = self.check_size(r.len).and_then(|()| crate::store::check_range(r.offset, r.len));
        if let Err(e) = checked {
            return Ok(Response::new(proto::ReadReply { outcome: failed(&e), data: Default::default() }));
        }
        if let Err(outcome) = self.read_point().await {
            return Ok(Response::new(proto::ReadReply { outcome, data: Default::default() }));
        }
        let local = read_store(&self.store).read(&r.disk, r.offset, r.len);
        let reply = match local {
            Ok(data) => proto::ReadReply { outcome: ok(), data: data.into() },
            Err(e @ (PetalError::Corrupt { .. } | PetalError::Unavailable(_))) => {
                self.read_elsewhere(&r.disk, r.offset, r.len, e).await
            }
            Err(e) => proto::ReadReply { outcome: failed(&e), data: Default::default() },
        };
        Ok(Response::new(reply))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        self.check_group(request.into_inner().group)?;
        let store_stats = || {
            let store = read_store(&self.store);
            (store.stats(), store.persisted(), store.list().len() as u64, store.failed().map(str::to_string))
        };
        let s = match self.node.status().await {
            Ok(s) => s,
            // The Raft node stopped (its log's disk failed): say so, with the reason.
            Err(e) => {
                let (stats, persisted_index, disks, failed) = store_stats();
                return Ok(Response::new(proto::StatusReply {
                    id: self.id.0,
                    role: "Stopped".into(),
                    persisted_index,
                    disks,
                    corrupt_blocks: stats.corrupt_blocks,
                    repaired_blocks: stats.repaired_blocks,
                    damaged_blocks: stats.damaged_blocks,
                    fenced_writes: self.machine_stats.fenced.load(Relaxed),
                    failed: failed.unwrap_or_else(|| e.to_string()),
                    ..Default::default()
                }));
            }
        };
        let (stats, persisted_index, disks, failed) = store_stats();
        Ok(Response::new(proto::StatusReply {
            id: s.id.0,
            term: s.term.0,
            role: format!("{:?}", s.role),
            leader: s.leader.map_or(0, |l| l.0),
            first_index: s.first_index.0,
            last_index: s.last_index.0,
            commit: s.commit.0,
            applied: s.applied.0,
            persisted_index,
            voters: s.conf.voters.iter().map(|v| v.0).collect(),
            peers: s
                .peers
                .iter()
                .map(|p| proto::PeerProgress {
                    id: p.id.0,
                    matched: p.matched.0,
                    lag: if s.role == Role::Leader { s.last_index.0.saturating_sub(p.matched.0) } else { 0 },
                    state: format!("{:?}", p.state),
                })
                .collect(),
            disks,
            corrupt_blocks: stats.corrupt_blocks,
            repaired_blocks: stats.repaired_blocks,
            damaged_blocks: stats.damaged_blocks,
            fenced_writes: self.machine_stats.fenced.load(Relaxed),
            failed: failed.unwrap_or_default(),
        }))
    }

    type FetchExtentsStream = ExtentStream;

    async fn fetch_extents(
        &self,
        request: Request<proto::FetchRequest>,
    ) -> Result<Response<Self::FetchExtentsStream>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        let applied = read_store(&self.store).applied();
        if applied < r.min_index {
            return Err(Status::unavailable(format!("applied {applied}, asked for {}", r.min_index)));
        }
        let mut out = Vec::with_capacity(r.extents.len());
        for x in r.extents {
            let content = if r.exact {
                read_store(&self.store).pinned_extent_content(r.min_index, &x.disk, x.extent)
            } else {
                read_store(&self.store).extent_content(&x.disk, x.extent)
            };
            let mut data = proto::ExtentData { disk: x.disk, extent: x.extent, ..Default::default() };
            match content {
                Ok(None) => {}
                Ok(Some(c)) => {
                    data.found = true;
                    data.written = c.written as u32;
                    data.data = c.data.into();
                    data.modified_index = c.modified;
                }
                Err(PetalError::Corrupt { disk, extent, block, detail, .. }) => {
                    tracing::error!(disk, extent, block, "corrupt block asked for by a peer: {detail}");
                    let _ = write_store(&self.store).report_corrupt(&disk, extent, block);
                    self.repair.notify_one();
                    data.corrupt = true;
                }
                Err(e) => return Err(Status::unavailable(e.to_string())),
            }
            out.push(Ok(data));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn peer_read(
        &self,
        request: Request<proto::PeerReadRequest>,
    ) -> Result<Response<proto::ReadReply>, Status> {
        let r = request.into_inner();
        self.check_group(r.group)?;
        if let Err(e) = self.check_size(r.len).and_then(|()| crate::store::check_range(r.offset, r.len)) {
            return Ok(Response::new(proto::ReadReply { outcome: failed(&e), data: Default::default() }));
        }
        let start = Instant::now();
        while read_store(&self.store).applied() < r.min_index {
            if start.elapsed() > CATCH_UP_WAIT {
                let e = PetalError::Unavailable(format!("has not applied index {} yet", r.min_index));
                return Ok(Response::new(proto::ReadReply { outcome: failed(&e), data: Default::default() }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let local = read_store(&self.store).read(&r.disk, r.offset, r.len);
        let reply = match local {
            Ok(data) => proto::ReadReply { outcome: ok(), data: data.into() },
            Err(PetalError::Corrupt { disk, extent, block, detail, .. }) => {
                tracing::error!(disk, extent, block, "corrupt block asked for by a peer: {detail}");
                let _ = write_store(&self.store).report_corrupt(&disk, extent, block);
                self.repair.notify_one();
                let e = PetalError::Corrupt { disk, extent, block, replica: self.id.0, detail };
                proto::ReadReply { outcome: failed(&e), data: Default::default() }
            }
            Err(e) => proto::ReadReply { outcome: failed(&e), data: Default::default() },
        };
        Ok(Response::new(reply))
    }

    async fn digest(
        &self,
        request: Request<proto::DigestRequest>,
    ) -> Result<Response<proto::DigestReply>, Status> {
        self.check_group(request.into_inner().group)?;
        let store = read_store(&self.store);
        let applied = store.applied();
        let reply = match store.digest() {
            Ok(disks) => proto::DigestReply {
                outcome: ok(),
                applied,
                disks: disks
                    .into_iter()
                    .map(|(name, crc, extents)| proto::DiskDigest { name, crc, extents })
                    .collect(),
            },
            Err(e) => {
                drop(store);
                if let PetalError::Corrupt { disk, extent, block, .. } = &e {
                    let _ = write_store(&self.store).report_corrupt(disk, *extent, *block);
                    self.repair.notify_one();
                }
                proto::DigestReply { outcome: failed(&e), applied, disks: Vec::new() }
            }
        };
        Ok(Response::new(reply))
    }
}

fn disk_info(d: crate::store::DiskInfo) -> proto::DiskInfo {
    proto::DiskInfo {
        name: d.name,
        read_only: d.read_only,
        origin: d.origin.unwrap_or_default(),
        extents: d.extents,
        created_index: d.created_index,
    }
}
