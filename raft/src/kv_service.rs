//! The key-value server: a [`KvStore`] replicated by a Raft [`Node`], served over gRPC next
//! to the Raft transport on one port; and [`KvClient`], which finds the leader and retries
//! safely. Used by the `raft-kv` command, the process tests and the benchmark.

use crate::driver::{ClientError, Node, NodeConfig, StateMachine};
use crate::group::start_member;
use crate::kv::{KvCommand, KvOp, KvResult, KvStore};
use crate::{Index, NodeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// The wire types of `proto/kv.proto`.
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("kv");
}

use proto::kv_client::KvClient as GrpcClient;
use proto::kv_server::{Kv, KvServer};

/// The Raft group id of the key-value service.
const GROUP: u64 = 1;
/// Largest gRPC message between nodes or from clients.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The replicated state machine: a [`KvStore`] whose answers are bincode [`KvResult`]s.
#[derive(Default)]
pub struct KvMachine {
    store: KvStore,
}

impl KvMachine {
    /// Reads a key from the local state (call through [`Node::read`] for linearizability).
    pub fn get(&self, key: &str) -> Option<String> {
        self.store.get(key)
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, _index: Index, command: &[u8]) -> Vec<u8> {
        let result = match KvCommand::decode(command) {
            Ok(cmd) => self.store.apply(&cmd),
            Err(e) => {
                // Committed garbage cannot be refused any more; it is skipped by every
                // replica alike, so they stay identical.
                tracing::warn!("skipping undecodable command: {e}");
                KvResult::Ok
            }
        };
        bincode::serialize(&result).expect("results serialize")
    }

    fn snapshot(&self) -> Vec<u8> {
        self.store.snapshot()
    }

    fn restore(&mut self, _index: Index, snapshot: &[u8]) -> Result<(), String> {
        self.store = KvStore::restore(snapshot)?;
        Ok(())
    }
}

/// How to run one key-value node.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This node.
    pub id: NodeId,
    /// Every founding member's address (including this node's own).
    pub peers: BTreeMap<NodeId, String>,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// Where to listen (clients and peers alike).
    pub listen: SocketAddr,
    /// Raft tick length.
    pub tick: Duration,
    /// Snapshot after this many applied entries.
    pub snapshot_entries: u64,
}

/// Runs a key-value node until the server fails.
pub async fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    serve_on(cfg, listener).await
}

/// Runs a key-value node on a bound listener.
pub async fn serve_on(cfg: ServerConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let mut node_cfg = NodeConfig::new(cfg.id, cfg.data_dir.clone(), None);
    node_cfg.tick = cfg.tick;
    node_cfg.snapshot_entries = cfg.snapshot_entries;
    let member = start_member(GROUP, &cfg.peers, node_cfg, KvMachine::default(), MAX_MESSAGE_BYTES)?;
    let node = member.node;
    tracing::info!(id = %cfg.id, listen = %listener.local_addr()?, "kv node serving");
    tonic::transport::Server::builder()
        .add_service(member.service)
        .add_service(
            KvServer::new(KvService { node })
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

struct KvService {
    node: Node<KvMachine>,
}

fn error_reply(e: ClientError) -> proto::Reply {
    match e {
        ClientError::NotLeader { leader } => proto::Reply {
            error: e.to_string(),
            not_leader: true,
            leader: leader.map_or(0, |l| l.0),
            ..Default::default()
        },
        ClientError::Unknown | ClientError::Busy => {
            proto::Reply { error: e.to_string(), retry: true, ..Default::default() }
        }
        other => proto::Reply { error: other.to_string(), ..Default::default() },
    }
}

fn value_reply(value: Option<String>) -> proto::Reply {
    proto::Reply { found: value.is_some(), value: value.unwrap_or_default(), ..Default::default() }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn execute(&self, request: Request<proto::Command>) -> Result<Response<proto::Reply>, Status> {
        let c = request.into_inner();
        if c.client == 0 {
            return Err(Status::invalid_argument("client id 0 is reserved"));
        }
        let op = match proto::Op::try_from(c.op) {
            Ok(proto::Op::Get) => KvOp::Get { key: c.key },
            Ok(proto::Op::Put) => KvOp::Put { key: c.key, value: c.value },
            Ok(proto::Op::Append) => KvOp::Append { key: c.key, value: c.value },
            Err(_) => return Err(Status::invalid_argument(format!("unknown op {}", c.op))),
        };
        let cmd = KvCommand { client: c.client, seq: c.seq, op };
        let reply = match self.node.propose(cmd.encode()).await {
            Ok(bytes) => match bincode::deserialize::<KvResult>(&bytes) {
                Ok(KvResult::Value(v)) => value_reply(v),
                Ok(KvResult::Ok) => proto::Reply::default(),
                Err(e) => return Err(Status::internal(format!("bad state machine answer: {e}"))),
            },
            Err(e) => error_reply(e),
        };
        Ok(Response::new(reply))
    }

    async fn read(&self, request: Request<proto::ReadRequest>) -> Result<Response<proto::Reply>, Status> {
        let key = request.into_inner().key;
        let reply = match self.node.read(move |m: &KvMachine| m.get(&key)).await {
            Ok(v) => value_reply(v),
            Err(e) => error_reply(e),
        };
        Ok(Response::new(reply))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusReply>, Status> {
        let s = self.node.status().await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(proto::StatusReply {
            id: s.id.0,
            term: s.term.0,
            role: format!("{:?}", s.role),
            leader: s.leader.map_or(0, |l| l.0),
            first_index: s.first_index.0,
            last_index: s.last_index.0,
            commit: s.commit.0,
            applied: s.applied.0,
            voters: s.conf.voters.iter().map(|v| v.0).collect(),
            learners: s.conf.learners.iter().map(|v| v.0).collect(),
            peers: s
                .peers
                .iter()
                .map(|p| proto::PeerProgress {
                    id: p.id.0,
                    matched: p.matched.0,
                    state: format!("{:?}", p.state),
                    learner: p.learner,
                })
                .collect(),
        }))
    }
}

/// Why a client request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// No node answered within the deadline.
    #[error("no leader answered within {0:?}")]
    Timeout(Duration),
    /// A node refused the request for a reason retrying cannot fix.
    #[error("refused: {0}")]
    Refused(String),
}

/// A client of a key-value group: finds the leader, follows redirects, and retries a
/// command with the same (client, seq) so it is applied once.
pub struct KvClient {
    id: u64,
    seq: u64,
    nodes: BTreeMap<NodeId, String>,
    leader: Option<NodeId>,
    conns: BTreeMap<NodeId, GrpcClient<tonic::transport::Channel>>,
    /// How long one request may keep retrying.
    pub deadline: Duration,
}

impl KvClient {
    /// A client of the group whose members are at `nodes`.
    pub fn new(nodes: BTreeMap<NodeId, String>) -> KvClient {
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        KvClient {
            id,
            seq: 0,
            nodes,
            leader: None,
            conns: BTreeMap::new(),
            deadline: Duration::from_secs(30),
        }
    }

    /// Sets a key.
    pub async fn put(&mut self, key: &str, value: &str) -> Result<(), KvError> {
        self.execute(proto::Op::Put, key, value).await.map(|_| ())
    }

    /// Appends to a key.
    pub async fn append(&mut self, key: &str, value: &str) -> Result<(), KvError> {
        self.execute(proto::Op::Append, key, value).await.map(|_| ())
    }

    /// Reads a key linearizably (ReadIndex on the leader).
    pub async fn get(&mut self, key: &str) -> Result<Option<String>, KvError> {
        let key = key.to_string();
        let reply = self
            .with_leader(|mut c| {
                let key = key.clone();
                async move { c.read(proto::ReadRequest { key }).await }
            })
            .await?;
        Ok(reply.found.then_some(reply.value))
    }

    /// The status of every node that answers.
    pub async fn status(&mut self) -> Vec<(NodeId, Result<proto::StatusReply, String>)> {
        let mut out = Vec::new();
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            let r = match self.conn(id).await {
                Ok(mut c) => c
                    .status(proto::StatusRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| e.message().to_string()),
                Err(e) => Err(e),
            };
            out.push((id, r));
        }
        out
    }

    async fn execute(&mut self, op: proto::Op, key: &str, value: &str) -> Result<proto::Reply, KvError> {
        self.seq += 1;
        let cmd = proto::Command {
            client: self.id,
            seq: self.seq,
            op: op as i32,
            key: key.into(),
            value: value.into(),
        };
        self.with_leader(|mut c| {
            let cmd = cmd.clone();
            async move { c.execute(cmd).await }
        })
        .await
    }

    async fn conn(&mut self, id: NodeId) -> Result<GrpcClient<tonic::transport::Channel>, String> {
        if let Some(c) = self.conns.get(&id) {
            return Ok(c.clone());
        }
        let addr = self.nodes.get(&id).ok_or_else(|| format!("unknown node {id}"))?;
        let uri = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = GrpcClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.conns.insert(id, c.clone());
        Ok(c)
    }

    /// Sends a request to the leader (as far as known), following hints and trying every
    /// node in turn, until an answer or the deadline.
    async fn with_leader<F, Fut>(&mut self, mut call: F) -> Result<proto::Reply, KvError>
    where
        F: FnMut(GrpcClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<proto::Reply>, Status>>,
    {
        let start = Instant::now();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut next = 0;
        let mut backoff = Duration::from_millis(10);
        while start.elapsed() < self.deadline {
            let target = self.leader.unwrap_or_else(|| {
                next += 1;
                ids[next % ids.len()]
            });
            let conn = match self.conn(target).await {
                Ok(c) => c,
                Err(e) => return Err(KvError::Refused(e)),
            };
            match call(conn).await.map(Response::into_inner) {
                Ok(r) if r.error.is_empty() => {
                    self.leader = Some(target);
                    return Ok(r);
                }
                Ok(r) if r.not_leader => {
                    self.leader = (r.leader != 0).then_some(NodeId(r.leader)).filter(|l| *l != target);
                }
                Ok(r) if r.retry => {}
                Ok(r) => return Err(KvError::Refused(r.error)),
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    return Err(KvError::Refused(status.message().to_string()))
                }
                Err(_) => self.leader = None,
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Err(KvError::Timeout(self.deadline))
    }
}
