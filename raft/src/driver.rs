//! Runs one [`Raft`] core on tokio: ticks it, feeds it messages and requests, persists
//! each [`Ready`] (fsync) before sending the messages that depend on it, applies committed
//! entries to a [`StateMachine`] in order, and answers callers.
//!
//! One task owns the core and the state machine, so no lock is needed; the disk is a
//! thread of its own (the `writer` module), which persists each batch while the task goes on
//! taking requests and messages, and takes every batch that queued up meanwhile into one
//! fsync (group commit). What depends on a batch being durable waits for it: a leader
//! counts itself toward a commit, a follower acknowledges entries, and votes go out, only
//! once the writes are done. Committed entries are applied at once: they are durable on
//! a majority, this node included, by the time the core hands them out.

use crate::disk::{DiskError, NodeDisk};
use crate::writer::{Done, Job, Writer};
use crate::{
    ConfChange, ConfState, Config, EntryPayload, Index, Message, MessageBody, NodeId, ProposeError, Raft,
    Ready, Restored, Role, Status, Term,
};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// The application replicated by Raft.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command and returns the caller's answer. Called once per
    /// index, in index order.
    fn apply(&mut self, index: Index, command: &[u8]) -> Vec<u8>;
    /// Serializes the state through the last applied index; the log up to there is then
    /// dropped. A durable machine must make everything applied so far durable (fsync)
    /// before returning, and may return a small manifest instead of its whole state, as
    /// long as `restore` on another replica can rebuild the state from it (for example by
    /// fetching files from a peer; replaying the entries after the manifest's index must
    /// then be harmless, as overwrites are).
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot's, taken through `index`.
    fn restore(&mut self, index: Index, snapshot: &[u8]) -> Result<(), String>;
    /// The last index already reflected in a durable state machine's own files (those
    /// entries are not applied again after a restart); in-memory machines return 0.
    fn applied_index(&self) -> Index {
        Index(0)
    }
}

/// Where a node lives and how it behaves.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The core's knobs (id, timeouts, bounds).
    pub raft: Config,
    /// Where the log, term/vote and snapshot are kept.
    pub data_dir: PathBuf,
    /// Length of one tick.
    pub tick: Duration,
    /// The founding configuration, used only when `data_dir` holds no state yet.
    /// `None` makes a node that waits to be added to an existing group.
    pub bootstrap: Option<ConfState>,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_entries: u64,
    /// Most requests waiting in the node's queue.
    pub max_queued_requests: usize,
}

impl NodeConfig {
    /// Defaults: 100 ms ticks (1 s election timeout), snapshot every 10,000 entries.
    pub fn new(id: NodeId, data_dir: PathBuf, bootstrap: Option<ConfState>) -> NodeConfig {
        let mut raft = Config::new(id);
        raft.election_ticks = 10;
        raft.heartbeat_ticks = 1;
        NodeConfig {
            raft,
            data_dir,
            tick: Duration::from_millis(100),
            bootstrap,
            snapshot_entries: 10_000,
            max_queued_requests: 4096,
        }
    }
}

/// Why a request to a node failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Ask the leader instead.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// Leadership changed before the outcome was known: the command may or may not have
    /// been applied. Retry with the same request id.
    #[error("leadership changed; outcome unknown")]
    Unknown,
    /// The node is overloaded; retry later.
    #[error("node busy")]
    Busy,
    /// The request is invalid for the group's state.
    #[error("refused: {0}")]
    Refused(String),
    /// The node has stopped (shut down, or its disk failed).
    #[error("node stopped: {0}")]
    Stopped(String),
}

impl From<ProposeError> for ClientError {
    fn from(e: ProposeError) -> ClientError {
        match e {
            ProposeError::NotLeader { leader } => ClientError::NotLeader { leader },
            ProposeError::TransferInProgress | ProposeError::Backpressure => ClientError::Busy,
            other => ClientError::Refused(other.to_string()),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;
type ReadFn<S> = Box<dyn FnOnce(&S) + Send>;

enum Request<S> {
    Propose { data: Bytes, reply: Reply<Vec<u8>> },
    Read { read: ReadFn<S>, fail: Reply<()> },
    ChangeMembership { change: ConfChange, reply: Reply<()> },
    TransferLeader { to: NodeId, reply: Reply<()> },
    Status { reply: oneshot::Sender<Status> },
}

/// A handle to a running node; cheap to clone.
pub struct Node<S: StateMachine> {
    requests: mpsc::Sender<Request<S>>,
    status: watch::Receiver<NodeState>,
    stopped: watch::Receiver<Option<String>>,
}

impl<S: StateMachine> Clone for Node<S> {
    fn clone(&self) -> Self {
        Node { requests: self.requests.clone(), status: self.status.clone(), stopped: self.stopped.clone() }
    }
}

/// The node's role as last published (cheap to read without a round trip).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeState {
    /// Current term.
    pub term: Term,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// Whether this node leads.
    pub is_leader: bool,
    /// Highest applied index.
    pub applied: Index,
}

/// Everything a node needs from outside: where messages go and where they come from.
pub struct Wiring {
    /// Sends a message to a peer (best effort; Raft tolerates loss).
    pub send: Box<dyn Fn(Message) + Send>,
    /// Messages from peers.
    pub inbox: mpsc::Receiver<Message>,
}

impl<S: StateMachine> Node<S> {
    /// Opens the node's disk, restores the state machine, and starts the node's task.
    pub fn start(cfg: NodeConfig, mut sm: S, wiring: Wiring) -> Result<Node<S>, DiskError> {
        let (mut disk, loaded) = NodeDisk::open(&cfg.data_dir)?;
        let mut restored = loaded.restored;
        if loaded.fresh {
            if let Some(conf) = cfg.bootstrap.clone() {
                restored = Restored::bootstrap(conf);
                disk.bootstrap(&restored)?;
            }
        }
        if let Some(s) = &restored.snapshot {
            if sm.applied_index() < s.meta.index {
                sm.restore(s.meta.index, &s.data)
                    .map_err(|detail| DiskError::Decode { path: cfg.data_dir.join("snapshot"), detail })?;
            }
        }
        restored.applied = restored.applied.max(sm.applied_index());
        let applied = restored.applied;
        let raft = Raft::new(cfg.raft.clone(), restored)
            .map_err(|detail| DiskError::Decode { path: cfg.data_dir.clone(), detail })?;
        let writer = Writer::start(disk).map_err(|source| {
            DiskError::Storage(storage::StorageError::Io {
                context: "start the raft disk thread".into(),
                source,
            })
        })?;
        let (requests, rx) = mpsc::channel(cfg.max_queued_requests);
        let (status_tx, status) = watch::channel(NodeState { applied, ..NodeState::default() });
        let (stopped_tx, stopped) = watch::channel(None);
        let runner = Runner {
            raft,
            writer,
            sm,
            applied,
            last_snapshot: applied,
            cfg,
            send: wiring.send,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            waiting_reads: Vec::new(),
            next_read_ctx: 1,
            status: status_tx,
        };
        tokio::spawn(runner.run(rx, wiring.inbox, stopped_tx));
        Ok(Node { requests, status, stopped })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request<S>) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(make(tx)).await.is_err() {
            return Err(self.stopped_error());
        }
        rx.await.unwrap_or_else(|_| Err(self.stopped_error()))
    }

    fn stopped_error(&self) -> ClientError {
        ClientError::Stopped(self.stopped.borrow().clone().unwrap_or_else(|| "shut down".into()))
    }

    /// Replicates a command and returns the state machine's answer once it is applied.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let data = Bytes::from(command);
        self.call(|reply| Request::Propose { data, reply }).await
    }

    /// Runs `f` on the state machine at a linearizable point (ReadIndex): it sees every
    /// command acknowledged before the call.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> R + Send + 'static,
    ) -> Result<R, ClientError> {
        let (out_tx, out_rx) = oneshot::channel();
        let read: ReadFn<S> = Box::new(move |sm| {
            let _ = out_tx.send(f(sm));
        });
        let (fail_tx, fail_rx) = oneshot::channel();
        if self.requests.send(Request::Read { read, fail: fail_tx }).await.is_err() {
            return Err(self.stopped_error());
        }
        // The read's closure is dropped unrun only after its failure was sent.
        match out_rx.await {
            Ok(out) => Ok(out),
            Err(_) => match fail_rx.await {
                Ok(Err(e)) => Err(e),
                _ => Err(self.stopped_error()),
            },
        }
    }

    /// Proposes a single-server membership change and waits until it is applied.
    pub async fn change_membership(&self, change: ConfChange) -> Result<(), ClientError> {
        self.call(|reply| Request::ChangeMembership { change, reply }).await
    }

    /// Asks the leader to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ClientError> {
        self.call(|reply| Request::TransferLeader { to, reply }).await
    }

    /// The core's full status.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(Request::Status { reply: tx }).await.map_err(|_| self.stopped_error())?;
        rx.await.map_err(|_| self.stopped_error())
    }

    /// The role as last published, without a round trip.
    pub fn state(&self) -> NodeState {
        *self.status.borrow()
    }

    /// Waits until the published state satisfies `f`.
    pub async fn wait_for(&self, mut f: impl FnMut(&NodeState) -> bool) -> Result<NodeState, ClientError> {
        let mut rx = self.status.clone();
        let state = rx.wait_for(|s| f(s)).await.map_err(|_| self.stopped_error())?;
        Ok(*state)
    }

    /// Why the node stopped, if it has.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }
}

/// Who waits for a proposal: a command's caller wants the machine's answer, a
/// membership change's caller only the outcome.
enum Waiter {
    Command(Reply<Vec<u8>>),
    Conf(Reply<()>),
}

impl Waiter {
    fn finish(self, outcome: Result<Vec<u8>, ClientError>) {
        match self {
            Waiter::Command(reply) => {
                let _ = reply.send(outcome);
            }
            Waiter::Conf(reply) => {
                let _ = reply.send(outcome.map(|_| ()));
            }
        }
    }
}

struct PendingProposal {
    term: Term,
    waiter: Waiter,
}

struct PendingRead<S> {
    read: ReadFn<S>,
    fail: Reply<()>,
}

struct Runner<S: StateMachine> {
    raft: Raft,
    /// The disk, on its own thread.
    writer: Writer,
    sm: S,
    applied: Index,
    last_snapshot: Index,
    cfg: NodeConfig,
    send: Box<dyn Fn(Message) + Send>,
    /// Proposals of this leadership by index.
    proposals: BTreeMap<Index, PendingProposal>,
    /// Reads waiting for the leader's quorum check, by ctx.
    reads: HashMap<u64, PendingRead<S>>,
    /// Reads waiting for the state machine to reach an index.
    waiting_reads: Vec<(Index, PendingRead<S>)>,
    next_read_ctx: u64,
    status: watch::Sender<NodeState>,
}

/// Most requests or messages taken into one batch.
const MAX_BATCH: usize = 1024;

impl<S: StateMachine> Runner<S> {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request<S>>,
        mut inbox: mpsc::Receiver<Message>,
        stopped: watch::Sender<Option<String>>,
    ) {
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let written = self.writer.wake();
        let result = loop {
            tokio::select! {
                _ = ticker.tick() => self.raft.tick(),
                _ = written.notified() => {}
                m = inbox.recv() => {
                    let Some(m) = m else { break Ok(()) };
                    self.step(m);
                }
                r = requests.recv() => {
                    let Some(r) = r else { break Ok(()) };
                    self.handle(r);
                }
            }
            // Whatever else waits in either queue joins the same batch: one fsync and one
            // Append per peer for the acks and proposals that arrived meanwhile.
            for _ in 0..MAX_BATCH {
                let Ok(m) = inbox.try_recv() else { break };
                self.step(m);
            }
            for _ in 0..MAX_BATCH {
                let Ok(r) = requests.try_recv() else { break };
                self.handle(r);
            }
            if let Err(e) = self.take_done() {
                break Err(e);
            }
            if let Err(e) = self.drain_ready() {
                break Err(e);
            }
        };
        let reason = match result {
            Ok(()) => "shut down".to_string(),
            Err(e) => {
                tracing::error!(node = %self.raft.id(), "raft node stops: disk failure: {e}");
                format!("disk failure: {e}")
            }
        };
        let _ = stopped.send(Some(reason.clone()));
        self.fail_all(ClientError::Stopped(reason));
    }

    fn step(&mut self, m: Message) {
        let from = m.from;
        if let Err(e) = self.raft.step(m) {
            tracing::warn!(node = %self.raft.id(), %from, "dropped message: {e}");
        }
    }

    fn handle(&mut self, r: Request<S>) {
        match r {
            Request::Propose { data, reply } => match self.raft.propose(data) {
                Ok(p) => {
                    self.proposals
                        .insert(p.index, PendingProposal { term: p.term, waiter: Waiter::Command(reply) });
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Request::Read { read, fail } => {
                let ctx = self.next_read_ctx;
                self.next_read_ctx += 1;
                match self.raft.read_index(ctx) {
                    Ok(()) => {
                        self.reads.insert(ctx, PendingRead { read, fail });
                    }
                    Err(e) => {
                        let _ = fail.send(Err(e.into()));
                    }
                }
            }
            Request::ChangeMembership { change, reply } => match self.raft.propose_conf_change(change) {
                Ok(p) => {
                    self.proposals
                        .insert(p.index, PendingProposal { term: p.term, waiter: Waiter::Conf(reply) });
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Request::TransferLeader { to, reply } => {
                let _ = reply.send(self.raft.transfer_leader(to).map_err(ClientError::from));
            }
            Request::Status { reply } => {
                let _ = reply.send(self.raft.status());
            }
        }
    }

    fn drain_ready(&mut self) -> Result<(), DiskError> {
        while self.raft.has_ready() {
            let rd = self.raft.ready();
            self.handle_ready(&rd)?;
            self.raft.advance_async(&rd);
            self.serve_reads();
            self.maybe_snapshot()?;
        }
        self.publish();
        Ok(())
    }

    fn handle_ready(&mut self, rd: &Ready) -> Result<(), DiskError> {
        if let Some(soft) = rd.soft_state {
            if soft.role != Role::Leader {
                // Whatever this leadership proposed may still commit under the next leader,
                // or not: the callers must retry (commands carry ids, so a retry is safe).
                self.fail_all(ClientError::Unknown);
            }
        }
        // A leader's appends and heartbeats (and a pre-candidate's pre-votes) depend on
        // nothing this batch persists, so they go out while the disk syncs (Raft thesis
        // §10.2.1); votes and replies wait until their state is durable.
        let (early, late): (Vec<&Message>, Vec<&Message>) = rd.messages.iter().partition(|m| {
            matches!(
                m.body,
                MessageBody::Append { .. }
                    | MessageBody::Heartbeat { .. }
                    | MessageBody::Snapshot { .. }
                    | MessageBody::TimeoutNow
                    | MessageBody::PreVote { .. }
            )
        });
        for m in early {
            (self.send)(m.clone());
        }
        let late: Vec<Message> = late.into_iter().cloned().collect();
        let conf_committed: Vec<_> =
            rd.committed.iter().filter(|e| matches!(e.payload, EntryPayload::Config(_))).cloned().collect();
        let to_disk = rd.snapshot.is_some()
            || !rd.entries.is_empty()
            || rd.hard_state.is_some()
            || !conf_committed.is_empty();
        if to_disk || (!late.is_empty() && self.writer.in_flight() > 0) {
            let job = Ready {
                snapshot: rd.snapshot.clone(),
                entries: rd.entries.clone(),
                hard_state: rd.hard_state,
                committed: conf_committed,
                ..Ready::default()
            };
            self.writer.submit(Job::Persist { rd: job, late })?;
        } else {
            // Nothing to wait for: no write of this batch, none before it in flight.
            for m in late {
                (self.send)(m);
            }
        }
        if let Some(s) = &rd.snapshot {
            // The state machine takes the snapshot only once it, and all before it, is on disk.
            while let Some(done) = tokio::task::block_in_place(|| self.writer.wait_done()) {
                self.finish(done?);
            }
            if let Err(e) = self.sm.restore(s.meta.index, &s.data) {
                return Err(DiskError::Decode { path: self.cfg.data_dir.join("snapshot"), detail: e });
            }
            self.applied = s.meta.index;
            self.last_snapshot = s.meta.index;
        }
        // The committed entries of a Ready are durable here already (at most the log's
        // stable index), whatever is still being written.
        self.apply_committed(rd);
        for rs in &rd.read_states {
            if let Some(read) = self.reads.remove(&rs.ctx) {
                self.waiting_reads.push((rs.index, read));
            }
        }
        Ok(())
    }

    /// Takes back every job the disk thread has done.
    fn take_done(&mut self) -> Result<(), DiskError> {
        while let Some(done) = self.writer.try_done() {
            self.finish(done?);
        }
        Ok(())
    }

    /// What follows a job being durable: the core learns it, the messages that waited go.
    fn finish(&mut self, done: Done) {
        if let Some((index, term)) = done.last {
            self.raft.persisted(index, term);
        }
        for m in done.late {
            (self.send)(m);
        }
    }

    /// Applies a Ready's committed entries and answers whoever waits for them.
    fn apply_committed(&mut self, rd: &Ready) {
        for e in &rd.committed {
            if e.index <= self.applied {
                continue; // already in the durable state machine
            }
            let answer = match &e.payload {
                EntryPayload::Normal(data) => self.sm.apply(e.index, data),
                _ => Vec::new(),
            };
            self.applied = e.index;
            if let Some(p) = self.proposals.remove(&e.index) {
                p.waiter.finish(if p.term == e.term { Ok(answer) } else { Err(ClientError::Unknown) });
            }
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting_reads).into_iter().partition(|(i, _)| *i <= applied);
        self.waiting_reads = waiting;
        for (_, r) in ready {
            (r.read)(&self.sm);
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), DiskError> {
        if self.applied.0 < self.last_snapshot.0 + self.cfg.snapshot_entries {
            return Ok(());
        }
        let data = Bytes::from(self.sm.snapshot());
        if let Err(e) = self.raft.compact(self.applied, data.clone()) {
            tracing::warn!("compaction skipped: {e}");
            return Ok(());
        }
        let snapshot = crate::Snapshot { meta: self.raft.snapshot_meta().clone(), data };
        self.writer.submit(Job::Compact(snapshot))?;
        self.last_snapshot = self.applied;
        Ok(())
    }

    fn publish(&self) {
        let s = NodeState {
            term: self.raft.term(),
            leader: self.raft.leader(),
            is_leader: self.raft.role() == Role::Leader,
            applied: self.applied,
        };
        self.status.send_if_modified(|old| {
            let changed = *old != s;
            *old = s;
            changed
        });
    }

    fn fail_all(&mut self, e: ClientError) {
        for (_, p) in std::mem::take(&mut self.proposals) {
            p.waiter.finish(Err(e.clone()));
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            let _ = r.fail.send(Err(e.clone()));
        }
        for (_, r) in std::mem::take(&mut self.waiting_reads) {
            let _ = r.fail.send(Err(e.clone()));
        }
    }
}
