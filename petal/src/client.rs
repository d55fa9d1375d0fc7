//! The client library: [`PetalClient`] (async, cheap to clone and share between tasks)
//! and [`BlockingClient`] (for threads outside tokio, such as FUSE's).
//!
//! It finds the leader by following the replicas' redirect hints, and retries with
//! backoff until its deadline. Every mutation carries a request id (client id, seq) and
//! the lowest seq still in flight, so a request retried after a leader change is applied
//! once. Each replica is reached over a small pool of HTTP/2 connections shared by all
//! clones; each call has a timeout.

use crate::error::PetalError;
use crate::proto::petal_client::PetalClient as GrpcClient;
use crate::proto::{self, Code, Outcome};
use crate::service::GROUP;
use raft::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Status;

/// How a client reaches the group and how long it keeps trying.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Every replica's address (`host:port`).
    pub nodes: BTreeMap<NodeId, String>,
    /// How long one request may keep retrying (leader changes, a replica down).
    pub deadline: Duration,
    /// How long one call to one replica may take.
    pub rpc_timeout: Duration,
    /// HTTP/2 connections per replica, shared round-robin by the client's calls.
    pub connections_per_node: usize,
    /// Largest message; at least the servers' bound on one request plus a little.
    pub max_message_bytes: usize,
}

impl ClientConfig {
    /// Defaults: 30 s deadline, 5 s per call, 2 connections per replica, 2 MiB messages.
    pub fn new(nodes: BTreeMap<NodeId, String>) -> ClientConfig {
        ClientConfig {
            nodes,
            deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(5),
            connections_per_node: 2,
            max_message_bytes: 2 << 20,
        }
    }
}

/// A disk as [`PetalClient::list`] and [`PetalClient::stat`] show it.
pub type DiskInfo = proto::DiskInfo;

/// An async client of one Petal group. Clones share connections, leader and request ids.
#[derive(Clone)]
pub struct PetalClient {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    next_seq: AtomicU64,
    /// Seqs of mutations not yet answered; the lowest is sent as `acked_below`.
    in_flight: Mutex<BTreeSet<u64>>,
    leader: Mutex<Option<NodeId>>,
    conns: BTreeMap<NodeId, Vec<GrpcClient<Channel>>>,
    next_conn: AtomicUsize,
    cfg: ClientConfig,
}

/// A request id, released from the in-flight set when the request is answered.
struct InFlight<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.inner.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.seq);
    }
}

impl PetalClient {
    /// A client of the replicas in `cfg` (connections open lazily, on first use).
    pub fn new(cfg: ClientConfig) -> Result<PetalClient, PetalError> {
        if cfg.nodes.is_empty() {
            return Err(PetalError::Invalid("no replicas given".into()));
        }
        let mut conns = BTreeMap::new();
        for (id, addr) in &cfg.nodes {
            let uri = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
            let endpoint = tonic::transport::Endpoint::from_shared(uri)
                .map_err(|e| PetalError::Invalid(format!("bad address {addr}: {e}")))?
                .connect_timeout(Duration::from_millis(500))
                .timeout(cfg.rpc_timeout)
                .tcp_nodelay(true);
            let pool = (0..cfg.connections_per_node.max(1))
                .map(|_| {
                    GrpcClient::new(endpoint.connect_lazy())
                        .max_decoding_message_size(cfg.max_message_bytes)
                        .max_encoding_message_size(cfg.max_message_bytes)
                })
                .collect();
            conns.insert(*id, pool);
        }
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let inner = Inner {
            id,
            next_seq: AtomicU64::new(1),
            in_flight: Mutex::new(BTreeSet::new()),
            leader: Mutex::new(None),
            conns,
            next_conn: AtomicUsize::new(0),
            cfg,
        };
        Ok(PetalClient { inner: Arc::new(inner) })
    }

    /// A client of `nodes` with the default configuration.
    pub fn connect(nodes: BTreeMap<NodeId, String>) -> Result<PetalClient, PetalError> {
        PetalClient::new(ClientConfig::new(nodes))
    }

    /// Creates an empty disk.
    pub async fn create(&self, disk: &str) -> Result<(), PetalError> {
        self.mutate(|id| {
            move |mut c: Conn| {
                let req = proto::DiskRequest { group: GROUP, disk: disk.to_string(), id: Some(id) };
                async move { c.create(req).await.map(|r| (r.into_inner().outcome, ())) }
            }
        })
        .await
    }

    /// Deletes a disk.
    pub async fn delete(&self, disk: &str) -> Result<(), PetalError> {
        self.mutate(|id| {
            move |mut c: Conn| {
                let req = proto::DiskRequest { group: GROUP, disk: disk.to_string(), id: Some(id) };
                async move { c.delete(req).await.map(|r| (r.into_inner().outcome, ())) }
            }
        })
        .await
    }

    /// Takes a read-only copy-on-write snapshot of `disk` named `name`.
    pub async fn snapshot(&self, disk: &str, name: &str) -> Result<(), PetalError> {
        self.mutate(|id| {
            move |mut c: Conn| {
                let req = proto::SnapshotRequest {
                    group: GROUP,
                    disk: disk.to_string(),
                    name: name.to_string(),
                    id: Some(id),
                };
                async move { c.snapshot(req).await.map(|r| (r.into_inner().outcome, ())) }
            }
        })
        .await
    }

    /// Every disk (linearizable).
    pub async fn list(&self) -> Result<Vec<DiskInfo>, PetalError> {
        self.call(|mut c| async move {
            c.list(proto::ListRequest { group: GROUP }).await.map(|r| {
                let r = r.into_inner();
                (r.outcome, r.disks)
            })
        })
        .await
    }

    /// One disk (linearizable).
    pub async fn stat(&self, disk: &str) -> Result<DiskInfo, PetalError> {
        let info = self
            .call(|mut c| {
                let req = proto::DiskRequest { group: GROUP, disk: disk.to_string(), id: None };
                async move {
                    c.stat(req).await.map(|r| {
                        let r = r.into_inner();
                        (r.outcome, r.disk)
                    })
                }
            })
            .await?;
        info.ok_or_else(|| PetalError::NotFound(disk.to_string()))
    }

    /// Writes `data` at `offset` of `disk`, atomically. With `lease_expiry_ms` (unix ms),
    /// the write is refused with [`PetalError::Fenced`] if it reaches the group after the
    /// lease, less the servers' margin, has expired.
    pub async fn write(
        &self,
        disk: &str,
        offset: u64,
        data: &[u8],
        lease_expiry_ms: Option<u64>,
    ) -> Result<(), PetalError> {
        // Leave room in the message for the request's other fields.
        let max_bytes = self.inner.cfg.max_message_bytes.saturating_sub(MESSAGE_OVERHEAD_BYTES) as u64;
        if data.len() as u64 > max_bytes {
            return Err(PetalError::TooLarge { bytes: data.len() as u64, max_bytes });
        }
        let data = bytes::Bytes::copy_from_slice(data);
        self.mutate(|id| {
            move |mut c: Conn| {
                let req = proto::WriteRequest {
                    group: GROUP,
                    disk: disk.to_string(),
                    offset,
                    data: data.clone(),
                    lease_expiry_ms: lease_expiry_ms.unwrap_or(0),
                    id: Some(id),
                };
                async move { c.write(req).await.map(|r| (r.into_inner().outcome, ())) }
            }
        })
        .await
    }

    /// Decommits `len` bytes at `offset`: they read as zeros and their space is freed.
    pub async fn decommit(
        &self,
        disk: &str,
        offset: u64,
        len: u64,
        lease_expiry_ms: Option<u64>,
    ) -> Result<(), PetalError> {
        self.mutate(|id| {
            move |mut c: Conn| {
                let req = proto::DecommitRequest {
                    group: GROUP,
                    disk: disk.to_string(),
                    offset,
                    len,
                    lease_expiry_ms: lease_expiry_ms.unwrap_or(0),
                    id: Some(id),
                };
                async move { c.decommit(req).await.map(|r| (r.into_inner().outcome, ())) }
            }
        })
        .await
    }

    /// Reads `len` bytes at `offset` of `disk` (linearizable); unwritten bytes are zeros.
    pub async fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Vec<u8>, PetalError> {
        self.call(|mut c| {
            let req = proto::ReadRequest { group: GROUP, disk: disk.to_string(), offset, len };
            async move {
                c.read(req).await.map(|r| {
                    let r = r.into_inner();
                    (r.outcome, r.data.to_vec())
                })
            }
        })
        .await
    }

    /// Every replica's status, or why it did not answer.
    pub async fn status(&self) -> Vec<(NodeId, Result<proto::StatusReply, String>)> {
        let mut out = Vec::new();
        for id in self.inner.conns.keys().copied() {
            let r = self.conn(id).status(proto::StatusRequest { group: GROUP }).await;
            out.push((id, r.map(|r| r.into_inner()).map_err(|s| s.message().to_string())));
        }
        out
    }

    /// One replica's digest of its contents (for comparing replicas).
    pub async fn digest(&self, id: NodeId) -> Result<proto::DigestReply, PetalError> {
        let r = self
            .conn(id)
            .digest(proto::DigestRequest { group: GROUP })
            .await
            .map_err(|s| PetalError::Unavailable(s.message().to_string()))?
            .into_inner();
        match r.outcome.as_ref().and_then(PetalError::from_outcome) {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }

    fn conn(&self, id: NodeId) -> Conn {
        let pool = &self.inner.conns[&id];
        pool[self.inner.next_conn.fetch_add(1, Relaxed) % pool.len()].clone()
    }

    /// Runs a mutation with a fresh request id, retried with that id until answered.
    async fn mutate<F, C, Fut>(&self, make: F) -> Result<(), PetalError>
    where
        F: FnOnce(proto::RequestId) -> C,
        C: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<(Option<Outcome>, ()), Status>>,
    {
        let inner = &*self.inner;
        let seq = inner.next_seq.fetch_add(1, Relaxed);
        let acked_below = {
            let mut in_flight = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            in_flight.insert(seq);
            *in_flight.first().expect("just inserted")
        };
        let _guard = InFlight { inner, seq };
        self.call(make(proto::RequestId { client: inner.id, seq, acked_below })).await
    }

    /// Sends a call to the leader as far as known, following redirects and trying every
    /// replica in turn, until an answer or the deadline.
    async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, PetalError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<(Option<Outcome>, T), Status>>,
    {
        let inner = &*self.inner;
        let start = Instant::now();
        let ids: Vec<NodeId> = inner.conns.keys().copied().collect();
        let mut next = rand::random::<usize>();
        let mut backoff = Duration::from_millis(5);
        // Redirects followed without a pause; past the group's size, hints are going round
        // in circles (an election is on) and the loop backs off instead.
        let mut redirects = 0;
        loop {
            if start.elapsed() > inner.cfg.deadline {
                return Err(PetalError::Timeout(inner.cfg.deadline.as_millis() as u64));
            }
            let known = *inner.leader.lock().unwrap_or_else(|e| e.into_inner());
            let target = known.unwrap_or_else(|| {
                next = next.wrapping_add(1);
                ids[next % ids.len()]
            });
            let mut redirected = false;
            match call(self.conn(target)).await {
                Ok((outcome, value)) => {
                    let outcome = outcome.unwrap_or_default();
                    match Code::try_from(outcome.code) {
                        Ok(Code::Ok) => {
                            self.set_leader(Some(target));
                            return Ok(value);
                        }
                        Ok(Code::NotLeader) => {
                            let hint = Some(NodeId(outcome.leader))
                                .filter(|l| l.0 != 0 && *l != target && inner.conns.contains_key(l));
                            redirected = hint.is_some() && redirects < ids.len();
                            redirects += 1;
                            self.set_leader(hint);
                        }
                        Ok(Code::Retry) => {}
                        Ok(Code::Unavailable) => self.set_leader(None),
                        _ => {
                            return Err(PetalError::from_outcome(&outcome)
                                .unwrap_or(PetalError::Invalid(outcome.message)))
                        }
                    }
                }
                // Refused by the gRPC layer itself (malformed, or a message over a bound):
                // sending it again cannot help.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::OutOfRange
                            | tonic::Code::ResourceExhausted
                    ) =>
                {
                    return Err(PetalError::Invalid(status.message().to_string()))
                }
                Err(_) => self.set_leader(None),
            }
            if !redirected {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }

    fn set_leader(&self, leader: Option<NodeId>) {
        *self.inner.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    }
}

type Conn = GrpcClient<Channel>;

/// Bytes of a write request besides its data (names, ids, framing), at most.
const MESSAGE_OVERHEAD_BYTES: usize = 4096;

/// A blocking client for threads outside tokio (FUSE's): the same calls as
/// [`PetalClient`], run on a small runtime of its own. Share it between threads by
/// reference or `Arc`.
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: PetalClient,
}

impl BlockingClient {
    /// A client of the replicas in `cfg`, with a 2-thread runtime of its own.
    pub fn new(cfg: ClientConfig) -> Result<BlockingClient, PetalError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("petal-client")
            .enable_all()
            .build()
            .map_err(|e| PetalError::Unavailable(format!("start the client runtime: {e}")))?;
        let client = {
            let _guard = runtime.enter();
            PetalClient::new(cfg)?
        };
        Ok(BlockingClient { runtime, client })
    }

    /// The async client underneath.
    pub fn client(&self) -> &PetalClient {
        &self.client
    }

    /// See [`PetalClient::create`].
    pub fn create(&self, disk: &str) -> Result<(), PetalError> {
        self.runtime.block_on(self.client.create(disk))
    }

    /// See [`PetalClient::delete`].
    pub fn delete(&self, disk: &str) -> Result<(), PetalError> {
        self.runtime.block_on(self.client.delete(disk))
    }

    /// See [`PetalClient::snapshot`].
    pub fn snapshot(&self, disk: &str, name: &str) -> Result<(), PetalError> {
        self.runtime.block_on(self.client.snapshot(disk, name))
    }

    /// See [`PetalClient::list`].
    pub fn list(&self) -> Result<Vec<DiskInfo>, PetalError> {
        self.runtime.block_on(self.client.list())
    }

    /// See [`PetalClient::stat`].
    pub fn stat(&self, disk: &str) -> Result<DiskInfo, PetalError> {
        self.runtime.block_on(self.client.stat(disk))
    }

    /// See [`PetalClient::write`].
    pub fn write(
        &self,
        disk: &str,
        offset: u64,
        data: &[u8],
        lease_expiry_ms: Option<u64>,
    ) -> Result<(), PetalError> {
        self.runtime.block_on(self.client.write(disk, offset, data, lease_expiry_ms))
    }

    /// See [`PetalClient::decommit`].
    pub fn decommit(
        &self,
        disk: &str,
        offset: u64,
        len: u64,
        lease_expiry_ms: Option<u64>,
    ) -> Result<(), PetalError> {
        self.runtime.block_on(self.client.decommit(disk, offset, len, lease_expiry_ms))
    }

    /// See [`PetalClient::read`].
    pub fn read(&self, disk: &str, offset: u64, len: u64) -> Result<Vec<u8>, PetalError> {
        self.runtime.block_on(self.client.read(disk, offset, len))
    }
}
