//! The lock server: a [`LockState`] replicated by a Raft [`Node`], served over gRPC next
//! to the Raft transport on one port.
//!
//! - Every call is answered by the leader; a follower answers `UNAVAILABLE` with the
//!   leader's id in the [`LEADER_METADATA`] key.
//! - The leader keeps the machine's time: it proposes a [`Command::Tick`] every
//!   `lease / 10` (clamped to 20 ms..1 s), stamped with its own monotonic clock, and
//!   stamps session opens and keepalives the same way (see [`crate::machine`]).
//! - Events reach clients on `Subscribe` streams. The state machine pushes the events
//!   each applied command causes into a [`Hub`] of subscribers; a subscription registers
//!   in the hub and reads the session's [`SessionView`] in one step on the state
//!   machine's task, so a subscriber sees every change exactly once: in its view or as
//!   an event after it. When the node stops leading it ends every stream, and clients
//!   resubscribe at the new leader.

// tonic's `Status` is the error of every gRPC call; boxing it here would only add noise.
#![allow(clippy::result_large_err)]

use crate::machine::{Answer, Command, Event, LockState, MachineError, Reply, SessionView, Slot, Stamp};
use crate::table::{Acquired, Limits, Mode, SessionId, TableError, Token};
use futures::Stream;
use proto::lock_service_server::{LockService, LockServiceServer};
use raft::driver::{ClientError, Node, NodeConfig, StateMachine};
use raft::group::start_member;
use raft::{Index, NodeId};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// The wire types of `proto/lockserver.proto`.
#[allow(missing_docs)] // Generated code; the .proto file documents every message and field.
pub mod proto {
    tonic::include_proto!("lockserver");
}

/// The Raft group id of the lock service.
const GROUP: u64 = 1;
/// Largest gRPC message between nodes or from clients.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The metadata key in which a follower names the leader (a node id; 0 if unknown).
pub const LEADER_METADATA: &str = "lockserver-leader";
/// Events queued for one subscriber; a subscriber that falls this far behind loses its
/// stream and catches up from a fresh view when it resubscribes.
pub const EVENTS_QUEUED_MAX: usize = 4096;
/// Default lease length.
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Most holds and waits listed per session in a status reply (the totals are given).
const STATUS_LOCKS_LISTED_MAX: usize = 100;
/// How often the leader's task looks at the node's role.
const ROLE_POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------
// The state machine and its subscribers
// ---------------------------------------------------------------------------------------

/// The subscribers of one node, by session: where the state machine pushes events.
#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<HashMap<SessionId, mpsc::Sender<Event>>>,
}

impl Hub {
    fn subscribers(&self) -> MutexGuard<'_, HashMap<SessionId, mpsc::Sender<Event>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `tx` the session's subscriber (ending a previous subscription's stream).
    fn register(&self, session: SessionId, tx: mpsc::Sender<Event>) {
        self.subscribers().insert(session, tx);
    }

    /// Pushes events to their sessions' subscribers. A subscriber whose queue is full or
    /// gone is dropped: its stream ends and its client resubscribes.
    fn publish(&self, events: Vec<(SessionId, Event)>) {
        if events.is_empty() {
            return;
        }
        let mut subs = self.subscribers();
        for (session, event) in events {
            let Some(tx) = subs.get(&session) else { continue };
            let last = event == Event::LeaseLost;
            if tx.try_send(event).is_err() {
                tracing::warn!(%session, "subscriber too slow or gone; ending its stream");
                subs.remove(&session);
            } else if last {
                subs.remove(&session);
            }
        }
    }

    /// Ends every stream.
    fn clear(&self) {
        self.subscribers().clear();
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.subscribers().len()
    }

    /// Whether there are no subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Raft state machine: the [`LockState`], and the [`Hub`] its events go to (on every
/// replica; only the leader has subscribers).
pub struct LockMachine {
    state: LockState,
    hub: Arc<Hub>,
}

impl LockMachine {
    /// A machine with an empty state.
    pub fn new(limits: Limits, hub: Arc<Hub>) -> LockMachine {
        LockMachine { state: LockState::new(limits), hub }
    }

    /// The replicated state (read it through [`Node::read`] for linearizability).
    pub fn state(&self) -> &LockState {
        &self.state
    }

    /// Subscribes `tx` to `session`'s events and returns what the session holds now.
    fn subscribe(&self, session: SessionId, tx: mpsc::Sender<Event>) -> Result<SessionView, MachineError> {
        let view = self.state.view(session)?;
        self.hub.register(session, tx);
        Ok(view)
    }
}

impl StateMachine for LockMachine {
    fn apply(&mut self, _index: Index, command: &[u8]) -> Vec<u8> {
        let mut events = Vec::new();
        let answer: Answer = match Command::decode(command) {
            Ok(cmd) => self.state.apply(cmd, &mut events),
            // Committed garbage cannot be refused any more; every replica skips it alike.
            Err(e) => Err(MachineError::BadCommand(e)),
        };
        self.hub.publish(events);
        crate::machine::encode(&answer)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state.snapshot()
    }

    fn restore(&mut self, _index: Index, snapshot: &[u8]) -> Result<(), String> {
        self.state = LockState::restore(snapshot)?;
        // Whatever the subscribers were told may not hold in the new state.
        self.hub.clear();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------

/// This process's monotonic clock, named by a random id (see [`crate::machine`]). The
/// leader draws a new id each time it takes office, so every leadership term starts a
/// new epoch in the machine, even when the same node is elected again.
#[derive(Debug)]
pub struct Clock {
    id: AtomicU64,
    start: Instant,
}

impl Clock {
    /// A clock with a fresh random id.
    pub fn new() -> Clock {
        Clock { id: AtomicU64::new(rand::random()), start: Instant::now() }
    }

    /// Names the clock anew: the next stamp starts an epoch.
    pub fn new_epoch(&self) {
        self.id.store(rand::random(), Relaxed);
    }

    /// The time now.
    pub fn stamp(&self) -> Stamp {
        Stamp { clock: self.id.load(Relaxed), now_ms: self.start.elapsed().as_millis() as u64 }
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// How often the leader proposes a tick for a given lease.
pub fn tick_interval(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 10).clamp(20, 1000))
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

/// How to run one lock server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This node.
    pub id: NodeId,
    /// Every founding member's address (including this node's own).
    pub peers: BTreeMap<NodeId, String>,
    /// Where the node keeps its Raft state.
    pub data_dir: PathBuf,
    /// Raft tick length (the election timeout is 10 to 20 ticks).
    pub raft_tick: Duration,
    /// Lease length given to new sessions.
    pub lease_ms: u64,
    /// Snapshot after this many applied entries.
    pub snapshot_entries: u64,
    /// Bounds of the lock table; must be the same on every node.
    pub limits: Limits,
}

impl ServerConfig {
    /// Defaults: 100 ms Raft ticks, 30 s leases, a snapshot every 10,000 entries.
    pub fn new(id: NodeId, peers: BTreeMap<NodeId, String>, data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            id,
            peers,
            data_dir,
            raft_tick: Duration::from_millis(100),
            lease_ms: DEFAULT_LEASE_MS,
            snapshot_entries: 10_000,
            limits: Limits::default(),
        }
    }
}

/// Runs a lock server on `listen` until the server fails.
pub async fn serve(cfg: ServerConfig, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve_on(cfg, listener).await
}

/// Runs a lock server on a bound listener until the server fails.
pub async fn serve_on(cfg: ServerConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    anyhow::ensure!(cfg.lease_ms >= 100, "a lease of {} ms is too short", cfg.lease_ms);
    let mut node_cfg = NodeConfig::new(cfg.id, cfg.data_dir.clone(), None);
    node_cfg.tick = cfg.raft_tick;
    node_cfg.snapshot_entries = cfg.snapshot_entries;
    let hub = Arc::new(Hub::default());
    let member = start_member(
        GROUP,
        &cfg.peers,
        node_cfg,
        LockMachine::new(cfg.limits, hub.clone()),
        MAX_MESSAGE_BYTES,
    )?;
    let node = member.node;
    let clock = Arc::new(Clock::new());
    let keeper =
        tokio::spawn(keep_time(node.clone(), hub.clone(), clock.clone(), tick_interval(cfg.lease_ms)));
    tracing::info!(id = %cfg.id, listen = %listener.local_addr()?, lease_ms = cfg.lease_ms, "lock server serving");
    let service = Service { node, clock, lease_ms: cfg.lease_ms };
    let result = tonic::transport::Server::builder()
        .add_service(member.service)
        .add_service(
            LockServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(incoming(listener))
        .await;
    keeper.abort();
    result?;
    Ok(())
}

/// Accepted connections with Nagle's algorithm off: replies and events are small, and
/// without this each waits for the client's delayed ACK (some 40 ms).
fn incoming(listener: tokio::net::TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// The leader's time keeping: on taking office, names its clock anew and proposes a tick
/// at once (which starts a new epoch and so renews every lease), then every `interval`;
/// ends every event stream when the node stops leading.
async fn keep_time(node: Node<LockMachine>, hub: Arc<Hub>, clock: Arc<Clock>, interval: Duration) {
    let mut leading: Option<raft::Term> = None;
    let mut last_tick: Option<Instant> = None;
    loop {
        tokio::time::sleep(ROLE_POLL).await;
        let state = node.state();
        if !state.is_leader {
            if leading.is_some() {
                tracing::info!("no longer leading; ending every event stream");
                hub.clear();
            }
            leading = None;
            last_tick = None;
            continue;
        }
        if leading != Some(state.term) {
            tracing::info!(term = state.term.0, "leading; every lease gets a fresh period");
            clock.new_epoch();
            leading = Some(state.term);
            last_tick = None;
        }
        if last_tick.is_some_and(|t| t.elapsed() < interval) {
            continue;
        }
        last_tick = Some(Instant::now());
        let tick = Command::Tick { at: clock.stamp() };
        // One tick at a time: a leader that cannot commit must not pile them up.
        match tokio::time::timeout(interval.max(Duration::from_secs(1)), node.propose(tick.encode())).await {
            Ok(Ok(_)) => {}
            Ok(Err(ClientError::Stopped(reason))) => {
                tracing::warn!("node stopped ({reason}); time keeping ends");
                return;
            }
            Ok(Err(e)) => tracing::debug!("tick not committed: {e}"),
            Err(_) => tracing::debug!("tick not committed in time"),
        }
    }
}

struct Service {
    node: Node<LockMachine>,
    clock: Arc<Clock>,
    lease_ms: u64,
}

/// `UNAVAILABLE`, naming the leader if known.
fn not_leader(leader: Option<NodeId>) -> Status {
    let mut status = Status::unavailable(match leader {
        Some(l) => format!("not the leader; try {l}"),
        None => "not the leader; no leader known".to_string(),
    });
    if let Ok(v) = leader.map_or(0, |l| l.0).to_string().parse() {
        status.metadata_mut().insert(LEADER_METADATA, v);
    }
    status
}

fn client_error(e: ClientError) -> Status {
    match e {
        ClientError::NotLeader { leader } => not_leader(leader),
        ClientError::Unknown | ClientError::Busy | ClientError::Stopped(_) => {
            Status::unavailable(e.to_string())
        }
        ClientError::Refused(r) => Status::internal(r),
    }
}

/// The gRPC status that tells a client why the machine refused.
fn machine_error(e: MachineError) -> Status {
    let msg = e.to_string();
    match e {
        MachineError::NoFreeSlot => Status::resource_exhausted(msg),
        MachineError::Table(TableError::TooManyLocks { .. } | TableError::TooManyWaiters { .. }) => {
            Status::resource_exhausted(msg)
        }
        MachineError::Table(TableError::BadName(_)) => Status::invalid_argument(msg),
        MachineError::UnknownSession(_) => Status::not_found(msg),
        MachineError::Expired(_) => Status::failed_precondition(msg),
        MachineError::NotAssigned { .. } => Status::permission_denied(msg),
        MachineError::BadCommand(_) => Status::internal(msg),
    }
}

/// A mode from the wire.
pub(crate) fn mode_from_wire(mode: i32) -> Result<Mode, Status> {
    match proto::Mode::try_from(mode) {
        Ok(proto::Mode::Shared) => Ok(Mode::Shared),
        Ok(proto::Mode::Exclusive) => Ok(Mode::Exclusive),
        Err(_) => Err(Status::invalid_argument(format!("unknown mode {mode}"))),
    }
}

/// A mode for the wire.
pub(crate) fn mode_to_wire(mode: Mode) -> i32 {
    match mode {
        Mode::Shared => proto::Mode::Shared as i32,
        Mode::Exclusive => proto::Mode::Exclusive as i32,
    }
}

fn slot_from_wire(slot: u32) -> Result<Slot, Status> {
    u8::try_from(slot).map(Slot).map_err(|_| Status::invalid_argument(format!("no slot {slot}")))
}

fn event_to_wire(event: Event) -> proto::Event {
    use proto::event::Kind;
    let kind = match event {
        Event::Grant { lock, mode, token } => {
            Kind::Grant(proto::Grant { lock, mode: mode_to_wire(mode), token: token.0 })
        }
        Event::Revoke { lock, wanted, token } => {
            Kind::Revoke(proto::Revoke { lock, wanted: mode_to_wire(wanted), token: token.0 })
        }
        Event::Recover { slot, dead } => {
            Kind::Recover(proto::Recover { slot: u32::from(slot.0), dead_session: dead.0 })
        }
        Event::LeaseLost => Kind::LeaseLost(proto::LeaseLost {}),
    };
    proto::Event { kind: Some(kind) }
}

fn view_to_wire(view: SessionView) -> proto::Event {
    use proto::event::Kind;
    proto::Event {
        kind: Some(Kind::View(proto::View {
            holds: view
                .holds
                .into_iter()
                .map(|(lock, mode, token)| proto::Hold { lock, mode: mode_to_wire(mode), token: token.0 })
                .collect(),
            revokes: view
                .revokes
                .into_iter()
                .map(|(lock, wanted, token)| proto::Revoke {
                    lock,
                    wanted: mode_to_wire(wanted),
                    token: token.0,
                })
                .collect(),
            recoveries: view
                .recoveries
                .into_iter()
                .map(|(slot, dead)| proto::Recover { slot: u32::from(slot.0), dead_session: dead.0 })
                .collect(),
        })),
    }
}

impl Service {
    /// Redirects at once when this node knows it is not the leader.
    fn check_leader(&self) -> Result<(), Status> {
        let state = self.node.state();
        if state.is_leader {
            Ok(())
        } else {
            Err(not_leader(state.leader))
        }
    }

    /// Replicates a command and returns the machine's reply.
    async fn propose(&self, cmd: Command) -> Result<Reply, Status> {
        self.check_leader()?;
        let bytes = self.node.propose(cmd.encode()).await.map_err(client_error)?;
        let answer: Answer = crate::machine::decode(&bytes)
            .map_err(|e| Status::internal(format!("bad state machine answer: {e}")))?;
        answer.map_err(machine_error)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

#[tonic::async_trait]
impl LockService for Service {
    async fn open_session(
        &self,
        request: Request<proto::OpenSessionRequest>,
    ) -> Result<Response<proto::OpenSessionReply>, Status> {
        let r = request.into_inner();
        // The stamp is taken now, after the client sent its request.
        let cmd = Command::OpenSession {
            nonce: r.nonce,
            name: r.name,
            lease_ms: self.lease_ms,
            at: self.clock.stamp(),
        };
        match self.propose(cmd).await? {
            Reply::Opened { session, slot, lease_ms } => Ok(Response::new(proto::OpenSessionReply {
                session: session.0,
                slot: u32::from(slot.0),
                lease_ms,
            })),
            other => Err(Status::internal(format!("open answered {other:?}"))),
        }
    }

    async fn keep_alive(
        &self,
        request: Request<proto::SessionRequest>,
    ) -> Result<Response<proto::KeepAliveReply>, Status> {
        let session = SessionId(request.into_inner().session);
        match self.propose(Command::KeepAlive { session, at: self.clock.stamp() }).await? {
            Reply::Renewed { lease_ms } => Ok(Response::new(proto::KeepAliveReply { lease_ms })),
            other => Err(Status::internal(format!("keepalive answered {other:?}"))),
        }
    }

    async fn close_session(
        &self,
        request: Request<proto::SessionRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let session = SessionId(request.into_inner().session);
        self.propose(Command::CloseSession { session }).await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn acquire(
        &self,
        request: Request<proto::LockRequest>,
    ) -> Result<Response<proto::AcquireReply>, Status> {
        let r = request.into_inner();
        let cmd =
            Command::Acquire { session: SessionId(r.session), lock: r.lock, mode: mode_from_wire(r.mode)? };
        match self.propose(cmd).await? {
            Reply::Acquired(Acquired::Granted { mode, token }) => Ok(Response::new(proto::AcquireReply {
                granted: true,
                mode: mode_to_wire(mode),
                token: token.0,
            })),
            Reply::Acquired(Acquired::Queued) => Ok(Response::new(proto::AcquireReply::default())),
            other => Err(Status::internal(format!("acquire answered {other:?}"))),
        }
    }

    async fn release(&self, request: Request<proto::LockRequest>) -> Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.propose(Command::Release { session: SessionId(r.session), lock: r.lock, token: Token(r.token) })
            .await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn downgrade(
        &self,
        request: Request<proto::LockRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.propose(Command::Downgrade {
            session: SessionId(r.session),
            lock: r.lock,
            token: Token(r.token),
        })
        .await?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn recovery_done(
        &self,
        request: Request<proto::RecoveryDoneRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        let cmd = Command::RecoveryDone { session: SessionId(r.session), slot: slot_from_wire(r.slot)? };
        self.propose(cmd).await?;
        Ok(Response::new(proto::Empty {}))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<proto::SessionRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.check_leader()?;
        let session = SessionId(request.into_inner().session);
        let (tx, rx) = mpsc::channel(EVENTS_QUEUED_MAX);
        let view = self
            .node
            .read(move |m: &LockMachine| m.subscribe(session, tx))
            .await
            .map_err(client_error)?
            .map_err(machine_error)?;
        let first = futures::stream::once(async move { Ok(view_to_wire(view)) });
        let rest = ReceiverStream::new(rx).map(|e| Ok(event_to_wire(e)));
        Ok(Response::new(Box::pin(first.chain(rest))))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusReply>, Status> {
        let raft = self.node.status().await.map_err(client_error)?;
        let mut reply = proto::StatusReply {
            node: raft.id.0,
            term: raft.term.0,
            leader: raft.leader.map_or(0, |l| l.0),
            commit: raft.commit.0,
            applied: raft.applied.0,
            ..Default::default()
        };
        if !self.node.state().is_leader {
            return Ok(Response::new(reply));
        }
        let s = self.node.read(|m: &LockMachine| m.state.status()).await.map_err(client_error)?;
        reply.last_token = s.last_token.0;
        reply.locks = s.locks as u64;
        reply.sessions = s
            .sessions
            .into_iter()
            .map(|st| proto::SessionStatus {
                session: st.session.id.0,
                slot: u32::from(st.session.slot.0),
                name: st.session.name,
                expired: st.session.expired,
                lease_left_ms: st.lease_left_ms,
                lease_ms: st.session.lease_ms,
                holds_total: st.holds.len() as u64,
                waiting_total: st.waiting.len() as u64,
                holds: st
                    .holds
                    .into_iter()
                    .take(STATUS_LOCKS_LISTED_MAX)
                    .map(|(lock, mode, token)| proto::Hold { lock, mode: mode_to_wire(mode), token: token.0 })
                    .collect(),
                waiting: st
                    .waiting
                    .into_iter()
                    .take(STATUS_LOCKS_LISTED_MAX)
                    .map(|(lock, mode)| proto::Waiting { lock, mode: mode_to_wire(mode) })
                    .collect(),
            })
            .collect();
        reply.recoveries = s
            .recoveries
            .into_iter()
            .map(|(slot, r)| proto::RecoveryStatus {
                slot: u32::from(slot.0),
                dead_session: r.dead.0,
                assigned_to: r.by.map_or(0, |s| s.0),
            })
            .collect();
        Ok(Response::new(reply))
    }
}
