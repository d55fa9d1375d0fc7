//! The gRPC (tonic) transport between the nodes of Raft groups.
//!
//! - [`proto`]: the wire types of `proto/raft.proto`, and conversions to and from the
//!   core's [`Message`]. Conversion from the wire refuses what no correct peer sends
//!   (a missing body, node id 0) with an `Err(String)`; it never panics.
//! - [`Transport`]: the sending side of one node in one group. [`Transport::send`] never
//!   blocks: each peer has a bounded queue, drained by a task that keeps one long-lived
//!   client stream (`RaftTransport.Send`) open to the peer, so the peer receives the
//!   messages in order. When the queue is full or the link is down, messages are dropped
//!   and counted; Raft resends what matters.
//! - [`service`]: the receiving side. One server serves every group of a process
//!   (multi-raft): a [`Router`] hands each message to the inbox of its group.
//!
//! ```
//! use raft::transport::{self, Router, Transport};
//! use raft::{Index, Message, MessageBody, NodeId, Term};
//! use tokio_stream::wrappers::TcpListenerStream;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const MAX_MESSAGE_BYTES: usize = 1 << 20;
//!
//! // Node 2 serves group 7.
//! let router = Router::new();
//! let (inbox, mut messages) = tokio::sync::mpsc::channel(1024);
//! router.register(7, inbox);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(
//!     tonic::transport::Server::builder()
//!         .add_service(transport::service(router, MAX_MESSAGE_BYTES))
//!         .serve_with_incoming(TcpListenerStream::new(listener)),
//! );
//!
//! // Node 1 sends it a heartbeat.
//! let node1 = Transport::new(7, NodeId(1), MAX_MESSAGE_BYTES);
//! node1.set_peer(NodeId(2), addr.to_string());
//! let heartbeat = Message {
//!     from: NodeId(1),
//!     to: NodeId(2),
//!     term: Term(3),
//!     body: MessageBody::Heartbeat { commit: Index(5), ctx: 0 },
//! };
//! node1.send(heartbeat.clone());
//! assert_eq!(messages.recv().await, Some(heartbeat));
//! # Ok(())
//! # }
//! ```

use crate::message::{Message, MessageBody, RejectHint};
use crate::types::{ConfState, Entry, EntryPayload, Index, NodeId, SnapshotMeta, Term};
use prost::Message as _;
use proto::raft_transport_client::RaftTransportClient;
use proto::raft_transport_server::{RaftTransport, RaftTransportServer};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

/// The wire types generated from `proto/raft.proto`.
#[allow(missing_docs)] // Generated code; the .proto file documents every message and field.
pub mod proto {
    tonic::include_proto!("raft");
}

/// Messages waiting for one peer; beyond this, [`Transport::send`] drops them.
pub const PEER_QUEUE_MESSAGES_MAX: usize = 1024;

/// Messages handed to an open stream but not yet taken by HTTP/2; lost if the link breaks.
const STREAM_BUFFER_MESSAGES: usize = 16;

/// First wait before reconnecting a failed link; doubles on each further failure.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Longest wait before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 pings find a peer that vanished without closing its socket (a crash, a cut
/// cable), which a stream that only writes would not notice for minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the link counts as broken.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// Conversions between the core's types and the wire's
// ---------------------------------------------------------------------------------------

impl From<&Message> for proto::RaftMessage {
    /// The wire form of `msg`, with `group` 0: the sender sets the group.
    fn from(msg: &Message) -> Self {
        use proto::raft_message::Body;
        let body = match &msg.body {
            MessageBody::PreVote { last_index, last_term } => {
                Body::PreVote(proto::PreVote { last_index: last_index.0, last_term: last_term.0 })
            }
            MessageBody::PreVoteResp { reject } => Body::PreVoteResp(proto::PreVoteResp { reject: *reject }),
            MessageBody::Vote { last_index, last_term, transfer } => Body::Vote(proto::Vote {
                last_index: last_index.0,
                last_term: last_term.0,
                transfer: *transfer,
            }),
            MessageBody::VoteResp { reject } => Body::VoteResp(proto::VoteResp { reject: *reject }),
            MessageBody::Append { prev_index, prev_term, entries, commit } => Body::Append(proto::Append {
                prev_index: prev_index.0,
                prev_term: prev_term.0,
                entries: entries.iter().map(proto::Entry::from).collect(),
                commit: commit.0,
            }),
            MessageBody::AppendResp { index, reject } => Body::AppendResp(proto::AppendResp {
                index: index.0,
                reject: reject.as_ref().map(proto::RejectHint::from),
            }),
            MessageBody::Heartbeat { commit, ctx } => {
                Body::Heartbeat(proto::Heartbeat { commit: commit.0, ctx: *ctx })
            }
            MessageBody::HeartbeatResp { ctx } => Body::HeartbeatResp(proto::HeartbeatResp { ctx: *ctx }),
            MessageBody::Snapshot { meta, offset, data, done } => Body::Snapshot(proto::Snapshot {
                meta: Some(meta.into()),
                offset: *offset,
                data: data.clone(),
                done: *done,
            }),
            MessageBody::SnapshotResp { index, next_offset } => {
                Body::SnapshotResp(proto::SnapshotResp { index: index.0, next_offset: *next_offset })
            }
            MessageBody::TimeoutNow => Body::TimeoutNow(proto::TimeoutNow {}),
        };
        proto::RaftMessage { group: 0, from: msg.from.0, to: msg.to.0, term: msg.term.0, body: Some(body) }
    }
}

impl TryFrom<proto::RaftMessage> for Message {
    type Error = String;

    /// The core's form of a message from the wire (its `group` is the router's business).
    fn try_from(wire: proto::RaftMessage) -> Result<Message, String> {
        use proto::raft_message::Body;
        let body = match wire.body.ok_or("message without a body")? {
            Body::PreVote(b) => {
                MessageBody::PreVote { last_index: Index(b.last_index), last_term: Term(b.last_term) }
            }
            Body::PreVoteResp(b) => MessageBody::PreVoteResp { reject: b.reject },
            Body::Vote(b) => MessageBody::Vote {
                last_index: Index(b.last_index),
                last_term: Term(b.last_term),
                transfer: b.transfer,
            },
            Body::VoteResp(b) => MessageBody::VoteResp { reject: b.reject },
            Body::Append(b) => MessageBody::Append {
                prev_index: Index(b.prev_index),
                prev_term: Term(b.prev_term),
                entries: b.entries.into_iter().map(Entry::try_from).collect::<Result<_, _>>()?,
                commit: Index(b.commit),
            },
            Body::AppendResp(b) => {
                MessageBody::AppendResp { index: Index(b.index), reject: b.reject.map(RejectHint::from) }
            }
            Body::Heartbeat(b) => MessageBody::Heartbeat { commit: Index(b.commit), ctx: b.ctx },
            Body::HeartbeatResp(b) => MessageBody::HeartbeatResp { ctx: b.ctx },
            Body::Snapshot(b) => MessageBody::Snapshot {
                meta: b.meta.ok_or("snapshot without meta")?.try_into()?,
                offset: b.offset,
                data: b.data,
                done: b.done,
            },
            Body::SnapshotResp(b) => {
                MessageBody::SnapshotResp { index: Index(b.index), next_offset: b.next_offset }
            }
            Body::TimeoutNow(proto::TimeoutNow {}) => MessageBody::TimeoutNow,
        };
        Ok(Message {
            from: node_id(wire.from, "from")?,
            to: node_id(wire.to, "to")?,
            term: Term(wire.term),
            body,
        })
    }
}

impl From<&Entry> for proto::Entry {
    fn from(entry: &Entry) -> Self {
        use proto::entry::Payload;
        let payload = match &entry.payload {
            EntryPayload::Noop => Payload::Noop(proto::Noop {}),
            EntryPayload::Normal(data) => Payload::Normal(data.clone()),
            EntryPayload::Config(conf) => Payload::Config(conf.into()),
        };
        proto::Entry { term: entry.term.0, index: entry.index.0, payload: Some(payload) }
    }
}

impl TryFrom<proto::Entry> for Entry {
    type Error = String;

    fn try_from(wire: proto::Entry) -> Result<Entry, String> {
        use proto::entry::Payload;
        let payload = match wire.payload {
            Some(Payload::Noop(proto::Noop {})) => EntryPayload::Noop,
            Some(Payload::Normal(data)) => EntryPayload::Normal(data),
            Some(Payload::Config(conf)) => EntryPayload::Config(conf.try_into()?),
            None => return Err(format!("entry {} without a payload", wire.index)),
        };
        Ok(Entry { term: Term(wire.term), index: Index(wire.index), payload })
    }
}

impl From<&SnapshotMeta> for proto::SnapshotMeta {
    fn from(meta: &SnapshotMeta) -> Self {
        proto::SnapshotMeta { index: meta.index.0, term: meta.term.0, conf: Some((&meta.conf).into()) }
    }
}

impl TryFrom<proto::SnapshotMeta> for SnapshotMeta {
    type Error = String;

    fn try_from(wire: proto::SnapshotMeta) -> Result<SnapshotMeta, String> {
        Ok(SnapshotMeta {
            index: Index(wire.index),
            term: Term(wire.term),
            conf: wire.conf.ok_or("snapshot meta without a configuration")?.try_into()?,
        })
    }
}

impl From<&ConfState> for proto::ConfState {
    fn from(conf: &ConfState) -> Self {
        proto::ConfState {
            voters: conf.voters.iter().map(|id| id.0).collect(),
            learners: conf.learners.iter().map(|id| id.0).collect(),
        }
    }
}

impl TryFrom<proto::ConfState> for ConfState {
    type Error = String;

    fn try_from(wire: proto::ConfState) -> Result<ConfState, String> {
        let conf = ConfState {
            voters: node_set(wire.voters, "voter")?,
            learners: node_set(wire.learners, "learner")?,
        };
        match conf.voters.intersection(&conf.learners).next() {
            Some(id) => Err(format!("{id} is both a voter and a learner")),
            None => Ok(conf),
        }
    }
}

impl From<&RejectHint> for proto::RejectHint {
    fn from(hint: &RejectHint) -> Self {
        proto::RejectHint { index: hint.index.0, term: hint.term.0 }
    }
}

impl From<proto::RejectHint> for RejectHint {
    fn from(wire: proto::RejectHint) -> Self {
        RejectHint { index: Index(wire.index), term: Term(wire.term) }
    }
}

/// A node id from the wire, where 0 means the field was missing.
fn node_id(id: u64, field: &str) -> Result<NodeId, String> {
    match id {
        0 => Err(format!("{field}: node id 0")),
        id => Ok(NodeId(id)),
    }
}

/// Distinct node ids from the wire.
fn node_set(ids: Vec<u64>, field: &str) -> Result<BTreeSet<NodeId>, String> {
    let mut set = BTreeSet::new();
    for id in ids {
        if !set.insert(node_id(id, field)?) {
            return Err(format!("{field} {id} listed twice"));
        }
    }
    Ok(set)
}

// ---------------------------------------------------------------------------------------
// The sending side
// ---------------------------------------------------------------------------------------

/// Sends one node's messages of one Raft group to its peers.
///
/// Each peer has a bounded queue ([`PEER_QUEUE_MESSAGES_MAX`]) and a tokio task that
/// connects when there is something to send, streams the queue over one HTTP/2 stream,
/// and after a failure drops what was waiting and reconnects with jittered exponential
/// backoff (20 ms doubling to 1 s). Dropping the `Transport` stops every peer's task.
#[derive(Debug)]
pub struct Transport {
    group: u64,
    self_id: NodeId,
    max_message_bytes: usize,
    runtime: Handle,
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// Messages addressed to a node that is not a peer.
    unknown_peer: AtomicU64,
}

/// What [`Transport::stats`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Each current peer's counters.
    pub peers: BTreeMap<NodeId, PeerStats>,
    /// Messages dropped because they were addressed to a node that is not a peer.
    pub unknown_peer: u64,
}

/// Counters of one peer link, since the peer was first set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages handed to an open stream (a few may still be lost if it breaks).
    pub sent: u64,
    /// Messages dropped because the queue was full or the link was down.
    pub dropped: u64,
    /// Messages refused because they were larger than the transport's bound.
    pub refused: u64,
    /// Connections made.
    pub connects: u64,
}

/// One peer as the [`Transport`] sees it.
#[derive(Debug)]
struct Peer {
    /// The peer's URI (`http://host:port`).
    uri: String,
    queue: mpsc::Sender<proto::RaftMessage>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Also ends a task that is waiting to reconnect; its queued messages are dropped.
        self.task.abort();
    }
}

/// [`PeerStats`], shared between the sender and the peer's task.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    connects: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> PeerStats {
        PeerStats {
            sent: self.sent.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            refused: self.refused.load(Relaxed),
            connects: self.connects.load(Relaxed),
        }
    }
}

impl Transport {
    /// A transport with no peers for node `self_id` of `group`, which refuses to send any
    /// message whose encoding is larger than `max_message_bytes`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime: the peers' tasks run on the current runtime, whichever
    /// thread later calls [`Transport::send`].
    pub fn new(group: u64, self_id: NodeId, max_message_bytes: usize) -> Transport {
        Transport {
            group,
            self_id,
            max_message_bytes,
            runtime: Handle::current(),
            peers: Mutex::new(HashMap::new()),
            unknown_peer: AtomicU64::new(0),
        }
    }

    /// Adds peer `id` at `addr` (`"127.0.0.1:7001"` or `"http://127.0.0.1:7001"`), or
    /// moves it to a new address. The link connects when it first has a message to send.
    /// An address that is not a valid URI is logged and leaves the peer as it was.
    pub fn set_peer(&self, id: NodeId, addr: String) {
        let uri = if addr.contains("://") { addr } else { format!("http://{addr}") };
        let endpoint = match Endpoint::from_shared(uri.clone()) {
            Ok(endpoint) => endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true),
            Err(e) => {
                warn!(group = self.group, peer = %id, %uri, "ignoring peer with a bad address: {e}");
                return;
            }
        };
        let mut peers = self.peers();
        if peers.get(&id).is_some_and(|peer| peer.uri == uri) {
            return;
        }
        // A moved peer keeps its counters; its old link stops when the old `Peer` drops.
        let counters = peers.remove(&id).map(|old| old.counters.clone()).unwrap_or_default();
        let (queue, queued) = mpsc::channel(PEER_QUEUE_MESSAGES_MAX);
        let link = Link {
            group: self.group,
            peer: id,
            endpoint,
            max_message_bytes: self.max_message_bytes,
            counters: counters.clone(),
        };
        let task = self.runtime.spawn(link.run(queued));
        peers.insert(id, Peer { uri, queue, counters, task });
    }

    /// Removes peer `id`, closing its link and dropping what was queued for it.
    pub fn remove_peer(&self, id: NodeId) {
        self.peers().remove(&id);
    }

    /// Queues `msg` for its receiver without blocking. A message to a node that is not a
    /// peer, a message larger than the bound, and a message that finds the peer's queue
    /// full are dropped and counted.
    pub fn send(&self, msg: Message) {
        debug_assert_eq!(msg.from, self.self_id, "sending another node's message");
        let mut wire = proto::RaftMessage::from(&msg);
        wire.group = self.group;
        let peers = self.peers();
        let Some(peer) = peers.get(&msg.to) else {
            self.unknown_peer.fetch_add(1, Relaxed);
            debug!(group = self.group, to = %msg.to, "dropping {}: not a peer", msg.body.name());
            return;
        };
        let size_bytes = wire.encoded_len();
        if size_bytes > self.max_message_bytes {
            // The core should have split it (entries per append, snapshot chunk size).
            peer.counters.refused.fetch_add(1, Relaxed);
            warn!(
                group = self.group,
                to = %msg.to,
                size_bytes,
                max_message_bytes = self.max_message_bytes,
                "refusing an oversized {}",
                msg.body.name()
            );
            return;
        }
        if peer.queue.try_send(wire).is_err() {
            peer.counters.dropped.fetch_add(1, Relaxed);
            debug!(group = self.group, to = %msg.to, "dropping {}: queue full", msg.body.name());
        }
    }

    /// Counters of every current peer.
    pub fn stats(&self) -> TransportStats {
        TransportStats {
            peers: self.peers().iter().map(|(id, peer)| (*id, peer.counters.snapshot())).collect(),
            unknown_peer: self.unknown_peer.load(Relaxed),
        }
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<NodeId, Peer>> {
        // The map stays whole even if a holder panicked: no code under the lock can panic
        // halfway through a change.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The task behind one peer: connects, streams the peer's queue, reconnects.
struct Link {
    group: u64,
    peer: NodeId,
    endpoint: Endpoint,
    max_message_bytes: usize,
    counters: Arc<Counters>,
}

/// Why a link broke.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Stream(#[from] Status),
    #[error("stream closed by the peer")]
    Closed,
}

impl Link {
    /// Runs until the peer's queue closes (or the task is aborted).
    async fn run(self, mut queue: mpsc::Receiver<proto::RaftMessage>) {
        let mut backoff = Backoff::default();
        // Connect lazily: only once there is something to send.
        while let Some(first) = queue.recv().await {
            let error = match self.connect().await {
                Ok(client) => {
                    self.counters.connects.fetch_add(1, Relaxed);
                    debug!(group = self.group, peer = %self.peer, uri = %self.endpoint.uri(), "connected");
                    backoff.reset();
                    match self.stream(client, first, &mut queue).await {
                        Ok(()) => return,
                        Err(e) => e,
                    }
                }
                Err(e) => {
                    self.counters.dropped.fetch_add(1, Relaxed);
                    LinkError::from(e)
                }
            };
            // What waited for the broken link is stale by now; Raft resends what matters.
            let mut lost = 0;
            while queue.try_recv().is_ok() {
                lost += 1;
            }
            self.counters.dropped.fetch_add(lost, Relaxed);
            let delay = backoff.next_delay();
            // Say so once when a link breaks, not every time a dead peer refuses again.
            if backoff.failures == 1 {
                warn!(group = self.group, peer = %self.peer, uri = %self.endpoint.uri(), lost, ?delay, "link down: {error}");
            } else {
                debug!(group = self.group, peer = %self.peer, uri = %self.endpoint.uri(), lost, ?delay, "link still down: {error}");
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn connect(&self) -> Result<RaftTransportClient<Channel>, tonic::transport::Error> {
        let channel = self.endpoint.connect().await?;
        Ok(RaftTransportClient::new(channel)
            .max_encoding_message_size(self.max_message_bytes)
            .max_decoding_message_size(self.max_message_bytes))
    }

    /// Streams `first`, then the queue, over one `Send` call, until the call fails
    /// (`Err`) or the queue closes (`Ok`).
    async fn stream(
        &self,
        mut client: RaftTransportClient<Channel>,
        first: proto::RaftMessage,
        queue: &mut mpsc::Receiver<proto::RaftMessage>,
    ) -> Result<(), LinkError> {
        // The request body reads from a small channel of its own rather than from the
        // queue, so this task keeps the queue however long a dead connection keeps the body.
        let (body, body_rx) = mpsc::channel(STREAM_BUFFER_MESSAGES);
        self.counters.sent.fetch_add(1, Relaxed);
        let call = client.send(tokio_stream::once(first).chain(ReceiverStream::new(body_rx)));
        tokio::pin!(call);
        let queue_closed = tokio::select! {
            biased;
            ended = &mut call => return Err(ended.map_or_else(LinkError::Stream, |_| LinkError::Closed)),
            queue_closed = self.forward(queue, &body) => queue_closed,
        };
        if queue_closed {
            return Ok(());
        }
        // The connection let go of the body: the call is failing; wait briefly for why.
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, call).await {
            Ok(Err(status)) => Err(LinkError::Stream(status)),
            _ => Err(LinkError::Closed),
        }
    }

    /// Moves messages from the queue into the stream's body, in order, until the queue
    /// closes (`true`) or the body does (`false`).
    async fn forward(
        &self,
        queue: &mut mpsc::Receiver<proto::RaftMessage>,
        body: &mpsc::Sender<proto::RaftMessage>,
    ) -> bool {
        while let Some(msg) = queue.recv().await {
            self.counters.sent.fetch_add(1, Relaxed);
            if body.send(msg).await.is_err() {
                self.counters.sent.fetch_sub(1, Relaxed);
                self.counters.dropped.fetch_add(1, Relaxed);
                return false;
            }
        }
        true
    }
}

/// Jittered exponential backoff between reconnection attempts.
#[derive(Debug, Default)]
struct Backoff {
    /// Failures since the last successful connection.
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure and says how long to wait: BACKOFF_MIN doubling up to
    /// BACKOFF_MAX, less up to half at random so that peers do not retry in lockstep.
    fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN.saturating_mul(1 << self.failures.min(16)).min(BACKOFF_MAX);
        self.failures += 1;
        rand::thread_rng().gen_range(ceiling / 2..=ceiling)
    }
}

// ---------------------------------------------------------------------------------------
// The receiving side
// ---------------------------------------------------------------------------------------

/// Maps a group id to the inbox of the local node of that group. Clones share the map.
#[derive(Clone, Debug, Default)]
pub struct Router {
    groups: Arc<RwLock<HashMap<u64, mpsc::Sender<Message>>>>,
}

impl Router {
    /// A router with no groups.
    pub fn new() -> Router {
        Router::default()
    }

    /// Delivers messages of `group` to `inbox` from now on, replacing any earlier inbox.
    pub fn register(&self, group: u64, inbox: mpsc::Sender<Message>) {
        self.groups.write().unwrap_or_else(PoisonError::into_inner).insert(group, inbox);
    }

    /// Stops delivering messages of `group`; they are dropped from now on.
    pub fn unregister(&self, group: u64) {
        self.groups.write().unwrap_or_else(PoisonError::into_inner).remove(&group);
    }

    fn inbox(&self, group: u64) -> Option<mpsc::Sender<Message>> {
        self.groups.read().unwrap_or_else(PoisonError::into_inner).get(&group).cloned()
    }
}

/// The `RaftTransport` service: hands each message to the inbox of its group.
#[derive(Debug)]
pub struct Inbound {
    router: Router,
}

/// The receiving side, to add to a `tonic::transport::Server`. It refuses (as tonic
/// does, ending the stream) any message whose encoding is larger than `max_message_bytes`.
pub fn service(router: Router, max_message_bytes: usize) -> RaftTransportServer<Inbound> {
    RaftTransportServer::new(Inbound { router })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

impl Inbound {
    /// Hands one message to its group's inbox. Waits while the inbox is full, which holds
    /// back the sender's stream (HTTP/2 flow control) instead of dropping here: each
    /// stream carries one group, so this delays no other group.
    async fn deliver(&self, wire: proto::RaftMessage) -> Result<(), Status> {
        let group = wire.group;
        let msg = Message::try_from(wire)
            .map_err(|e| Status::invalid_argument(format!("malformed message for group {group}: {e}")))?;
        let inbox =
            self.router.inbox(group).ok_or_else(|| Status::not_found(format!("unknown group {group}")))?;
        inbox.send(msg).await.map_err(|_| Status::unavailable(format!("group {group} is shutting down")))
    }
}

#[tonic::async_trait]
impl RaftTransport for Inbound {
    async fn send(
        &self,
        request: Request<Streaming<proto::RaftMessage>>,
    ) -> Result<Response<proto::SendAck>, Status> {
        let remote = request.remote_addr();
        let mut stream = request.into_inner();
        let mut received = 0;
        loop {
            match stream.message().await {
                Ok(Some(wire)) => match self.deliver(wire).await {
                    Ok(()) => received += 1,
                    // A stopped group refuses every message: end the stream (the sender
                    // reconnects when it has work) rather than log each one.
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        debug!(?remote, "ending a stream: {}", status.message());
                        return Err(status);
                    }
                    Err(status) => warn!(?remote, "dropping a message: {}", status.message()),
                },
                Ok(None) => return Ok(Response::new(proto::SendAck { received })),
                Err(status) => {
                    // Usually the sender went away; it reconnects if it still has work.
                    debug!(?remote, received, "stream ended: {status}");
                    return Err(status);
                }
            }
        }
    }

    async fn send_one(
        &self,
        request: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::SendAck>, Status> {
        self.deliver(request.into_inner()).await?;
        Ok(Response::new(proto::SendAck { received: 1 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::collection::{btree_set, vec};
    use proptest::prelude::*;
    use std::future::Future;
    use std::net::SocketAddr;
    use tokio_stream::wrappers::TcpListenerStream;

    const GROUP: u64 = 7;
    const MAX_MESSAGE_BYTES: usize = 64 * 1024;
    const DEADLINE: Duration = Duration::from_secs(10);

    // --- conversions -------------------------------------------------------------------

    fn node() -> impl Strategy<Value = NodeId> {
        (1..=9u64).prop_map(NodeId)
    }

    fn data() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..48).prop_map(Bytes::from)
    }

    fn conf_state() -> impl Strategy<Value = ConfState> {
        (btree_set(node(), 0..5), btree_set(node(), 0..5)).prop_map(|(voters, learners)| {
            let learners = learners.difference(&voters).copied().collect();
            ConfState { voters, learners }
        })
    }

    fn entry() -> impl Strategy<Value = Entry> {
        let payload = prop_oneof![
            Just(EntryPayload::Noop),
            data().prop_map(EntryPayload::Normal),
            conf_state().prop_map(EntryPayload::Config),
        ];
        (any::<u64>(), any::<u64>(), payload).prop_map(|(term, index, payload)| Entry {
            term: Term(term),
            index: Index(index),
            payload,
        })
    }

    fn body() -> impl Strategy<Value = MessageBody> {
        let index = || any::<u64>().prop_map(Index);
        let term = || any::<u64>().prop_map(Term);
        prop_oneof![
            (index(), term())
                .prop_map(|(last_index, last_term)| MessageBody::PreVote { last_index, last_term }),
            any::<bool>().prop_map(|reject| MessageBody::PreVoteResp { reject }),
            (index(), term(), any::<bool>()).prop_map(|(last_index, last_term, transfer)| {
                MessageBody::Vote { last_index, last_term, transfer }
            }),
            any::<bool>().prop_map(|reject| MessageBody::VoteResp { reject }),
            (index(), term(), vec(entry(), 0..4), index()).prop_map(
                |(prev_index, prev_term, entries, commit)| {
                    MessageBody::Append { prev_index, prev_term, entries, commit }
                }
            ),
            (index(), proptest::option::of((index(), term()))).prop_map(|(index, hint)| {
                MessageBody::AppendResp {
                    index,
                    reject: hint.map(|(index, term)| RejectHint { index, term }),
                }
            }),
            (index(), any::<u64>()).prop_map(|(commit, ctx)| MessageBody::Heartbeat { commit, ctx }),
            any::<u64>().prop_map(|ctx| MessageBody::HeartbeatResp { ctx }),
            (index(), term(), conf_state(), any::<u64>(), data(), any::<bool>()).prop_map(
                |(index, term, conf, offset, data, done)| MessageBody::Snapshot {
                    meta: SnapshotMeta { index, term, conf },
                    offset,
                    data,
                    done,
                }
            ),
            (index(), any::<u64>())
                .prop_map(|(index, next_offset)| MessageBody::SnapshotResp { index, next_offset }),
            Just(MessageBody::TimeoutNow),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        (node(), node(), any::<u64>(), body()).prop_map(|(from, to, term, body)| Message {
            from,
            to,
            term: Term(term),
            body,
        })
    }

    proptest! {
        /// Every message survives conversion to protobuf bytes and back.
        #[test]
        fn protobuf_round_trip(msg in message(), group in any::<u64>()) {
            let mut wire = proto::RaftMessage::from(&msg);
            wire.group = group;
            let decoded = proto::RaftMessage::decode(wire.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(decoded.group, group);
            prop_assert_eq!(Message::try_from(decoded), Ok(msg));
        }
    }

    /// One message of every kind, from node 1 to node 2.
    fn every_kind() -> Vec<Message> {
        let conf = ConfState { voters: [NodeId(1), NodeId(2)].into(), learners: [NodeId(3)].into() };
        let entries = vec![
            Entry { term: Term(2), index: Index(5), payload: EntryPayload::Noop },
            Entry { term: Term(2), index: Index(6), payload: EntryPayload::Normal(Bytes::new()) },
            Entry {
                term: Term(2),
                index: Index(7),
                payload: EntryPayload::Normal(Bytes::from_static(b"put x 1")),
            },
            Entry { term: Term(2), index: Index(8), payload: EntryPayload::Config(conf.clone()) },
        ];
        let bodies = vec![
            MessageBody::PreVote { last_index: Index(4), last_term: Term(1) },
            MessageBody::PreVoteResp { reject: true },
            MessageBody::Vote { last_index: Index(4), last_term: Term(1), transfer: true },
            MessageBody::VoteResp { reject: false },
            MessageBody::Append { prev_index: Index(4), prev_term: Term(1), entries, commit: Index(3) },
            MessageBody::AppendResp { index: Index(8), reject: None },
            MessageBody::AppendResp {
                index: Index(9),
                reject: Some(RejectHint { index: Index(6), term: Term(1) }),
            },
            MessageBody::Heartbeat { commit: Index(8), ctx: 0 },
            MessageBody::HeartbeatResp { ctx: 17 },
            MessageBody::Snapshot {
                meta: SnapshotMeta { index: Index(8), term: Term(2), conf: ConfState::default() },
                offset: 0,
                data: Bytes::from_static(b"chunk"),
                done: false,
            },
            MessageBody::Snapshot {
                meta: SnapshotMeta { index: Index(8), term: Term(2), conf },
                offset: 5,
                data: Bytes::new(),
                done: true,
            },
            MessageBody::SnapshotResp { index: Index(8), next_offset: 5 },
            MessageBody::TimeoutNow,
        ];
        bodies
            .into_iter()
            .map(|body| Message { from: NodeId(1), to: NodeId(2), term: Term(2), body })
            .collect()
    }

    #[test]
    fn every_kind_round_trips() {
        for msg in every_kind() {
            assert_eq!(Message::try_from(proto::RaftMessage::from(&msg)), Ok(msg));
        }
    }

    fn heartbeat(ctx: u64) -> Message {
        Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(1),
            body: MessageBody::Heartbeat { commit: Index(0), ctx },
        }
    }

    fn wire(msg: &Message, group: u64) -> proto::RaftMessage {
        proto::RaftMessage { group, ..msg.into() }
    }

    /// Messages no correct peer sends, each with the error it must give.
    fn malformed() -> Vec<(proto::RaftMessage, &'static str)> {
        use proto::raft_message::Body;
        let good = wire(&heartbeat(0), GROUP);
        let append = |entries| proto::RaftMessage {
            body: Some(Body::Append(proto::Append { entries, ..Default::default() })),
            ..good.clone()
        };
        let config = |voters, learners| proto::Entry {
            payload: Some(proto::entry::Payload::Config(proto::ConfState { voters, learners })),
            ..Default::default()
        };
        vec![
            (proto::RaftMessage { body: None, ..good.clone() }, "message without a body"),
            (proto::RaftMessage { from: 0, ..good.clone() }, "from: node id 0"),
            (proto::RaftMessage { to: 0, ..good.clone() }, "to: node id 0"),
            (append(vec![proto::Entry { index: 3, ..Default::default() }]), "entry 3 without a payload"),
            (append(vec![config(vec![1, 1], vec![])]), "voter 1 listed twice"),
            (append(vec![config(vec![1], vec![0])]), "learner: node id 0"),
            (append(vec![config(vec![1, 2], vec![2])]), "n2 is both a voter and a learner"),
            (
                proto::RaftMessage { body: Some(Body::Snapshot(proto::Snapshot::default())), ..good.clone() },
                "snapshot without meta",
            ),
            (
                proto::RaftMessage {
                    body: Some(Body::Snapshot(proto::Snapshot {
                        meta: Some(proto::SnapshotMeta::default()),
                        ..Default::default()
                    })),
                    ..good.clone()
                },
                "snapshot meta without a configuration",
            ),
        ]
    }

    #[test]
    fn malformed_messages_are_errors() {
        for (wire, error) in malformed() {
            assert_eq!(Message::try_from(wire), Err(error.to_string()));
        }
    }

    // --- over the network --------------------------------------------------------------

    /// A receiving node on a runtime of its own, so that stopping it closes its
    /// connections at once, as a crash would.
    struct Receiver {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Receiver {
        /// Serves `router` on `addr` (port 0: any free port).
        fn start(addr: SocketAddr, router: Router) -> Receiver {
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                    bound_tx.send(listener.local_addr().unwrap()).unwrap();
                    let server = tonic::transport::Server::builder()
                        .add_service(service(router, MAX_MESSAGE_BYTES))
                        .serve_with_incoming(TcpListenerStream::new(listener));
                    tokio::select! {
                        served = server => served.unwrap(),
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task with it.
            });
            let addr = bound_rx.recv().unwrap();
            Receiver { addr, stop: Some(stop), thread: Some(thread) }
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.thread.take().unwrap().join().unwrap();
        }
    }

    /// A router with an inbox for [`GROUP`].
    fn router() -> (Router, mpsc::Receiver<Message>) {
        let router = Router::new();
        let (inbox, messages) = mpsc::channel(PEER_QUEUE_MESSAGES_MAX);
        router.register(GROUP, inbox);
        (router, messages)
    }

    async fn next(messages: &mut mpsc::Receiver<Message>) -> Message {
        tokio::time::timeout(DEADLINE, messages.recv())
            .await
            .expect("no message in time")
            .expect("inbox closed")
    }

    async fn eventually<F: Future<Output = bool>>(mut condition: impl FnMut() -> F) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !condition().await {
            assert!(tokio::time::Instant::now() < deadline, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn peer_stats(transport: &Transport) -> PeerStats {
        transport.stats().peers[&NodeId(2)]
    }

    #[tokio::test]
    async fn messages_arrive_in_order() {
        let (router, mut messages) = router();
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), router);
        let transport = Transport::new(GROUP, NodeId(1), MAX_MESSAGE_BYTES);
        transport.set_peer(NodeId(2), format!("http://{}", receiver.addr));

        let mut sent = every_kind();
        sent.extend((1..=500).map(heartbeat));
        for msg in &sent {
            transport.send(msg.clone());
        }
        for msg in &sent {
            assert_eq!(&next(&mut messages).await, msg);
        }
        eventually(|| async { peer_stats(&transport).sent == sent.len() as u64 }).await;
        assert_eq!(
            peer_stats(&transport),
            PeerStats { sent: sent.len() as u64, dropped: 0, refused: 0, connects: 1 }
        );

        transport.send(Message { to: NodeId(9), ..heartbeat(0) });
        assert_eq!(transport.stats().unknown_peer, 1);
    }

    #[tokio::test]
    async fn oversized_message_is_refused_and_the_link_lives_on() {
        let (router, mut messages) = router();
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), router);
        let transport = Transport::new(GROUP, NodeId(1), MAX_MESSAGE_BYTES);
        transport.set_peer(NodeId(2), receiver.addr.to_string());

        let huge = Entry {
            term: Term(1),
            index: Index(1),
            payload: EntryPayload::Normal(Bytes::from(vec![0; MAX_MESSAGE_BYTES])),
        };
        let oversized = Message {
            body: MessageBody::Append {
                prev_index: Index(0),
                prev_term: Term(0),
                entries: vec![huge],
                commit: Index(0),
            },
            ..heartbeat(0)
        };
        transport.send(heartbeat(1));
        transport.send(oversized);
        transport.send(heartbeat(2));
        assert_eq!(next(&mut messages).await, heartbeat(1));
        assert_eq!(next(&mut messages).await, heartbeat(2));
        let stats = peer_stats(&transport);
        assert_eq!((stats.refused, stats.dropped, stats.connects), (1, 0, 1));
    }

    #[tokio::test]
    async fn sender_reconnects_after_receiver_restarts() {
        let (router, mut messages) = router();
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), router.clone());
        let addr = receiver.addr;
        let transport = Transport::new(GROUP, NodeId(1), MAX_MESSAGE_BYTES);
        transport.set_peer(NodeId(2), addr.to_string());
        transport.send(heartbeat(1));
        assert_eq!(next(&mut messages).await, heartbeat(1));

        // A crash: the receiver's connections close; what is sent meanwhile is lost.
        drop(receiver);
        for ctx in 2..5 {
            transport.send(heartbeat(ctx));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // Wait until the link has let go of all four, so that none waits for the new receiver.
        eventually(|| async {
            let stats = peer_stats(&transport);
            stats.sent + stats.dropped == 4
        })
        .await;
        assert!(peer_stats(&transport).dropped > 0);

        // Back on the same port: the sender reconnects by itself.
        let _receiver = Receiver::start(addr, router);
        let mut ctx = 100;
        let delivered = loop {
            transport.send(heartbeat(ctx));
            if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(50), messages.recv()).await {
                break msg;
            }
            ctx += 1;
            assert!(ctx < 100 + 200, "no message delivered after the restart");
        };
        let MessageBody::Heartbeat { ctx: first, .. } = delivered.body else { panic!("{delivered:?}") };
        assert!(first >= 100, "a message from before the restart arrived: {first}");
        // Later messages follow in order on the new link.
        transport.send(heartbeat(1000));
        loop {
            let MessageBody::Heartbeat { ctx: got, .. } = next(&mut messages).await.body else {
                unreachable!()
            };
            if got == 1000 {
                break;
            }
            assert!(got > first && got < 1000, "out of order: {got}");
        }
        assert_eq!(peer_stats(&transport).connects, 2);
    }

    #[tokio::test]
    async fn malformed_messages_are_dropped_and_the_stream_goes_on() {
        let (router, mut messages) = router();
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), router);
        let mut client = RaftTransportClient::connect(format!("http://{}", receiver.addr)).await.unwrap();

        let mut stream = vec![wire(&heartbeat(1), GROUP), wire(&heartbeat(2), GROUP + 1)];
        stream.extend(malformed().into_iter().map(|(wire, _)| wire));
        stream.push(wire(&heartbeat(3), GROUP));
        let ack = client.send(tokio_stream::iter(stream)).await.unwrap().into_inner();
        assert_eq!(ack.received, 2);
        assert_eq!(next(&mut messages).await, heartbeat(1));
        assert_eq!(next(&mut messages).await, heartbeat(3));

        // A single message that cannot be delivered fails its call, and says why.
        let no_body = proto::RaftMessage { body: None, ..wire(&heartbeat(4), GROUP) };
        assert_eq!(client.send_one(no_body).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(
            client.send_one(wire(&heartbeat(5), GROUP + 1)).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        // A message over the bound is refused by the server's decoder, which ends only its own call.
        let oversized = Message {
            body: MessageBody::Snapshot {
                meta: SnapshotMeta::default(),
                offset: 0,
                data: Bytes::from(vec![0; MAX_MESSAGE_BYTES]),
                done: true,
            },
            ..heartbeat(0)
        };
        assert!(client.send_one(wire(&oversized, GROUP)).await.is_err());
        client.send_one(wire(&heartbeat(6), GROUP)).await.unwrap();
        assert_eq!(next(&mut messages).await, heartbeat(6));
        assert!(messages.try_recv().is_err(), "a dropped message was delivered");
    }
}
