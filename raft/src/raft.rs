//! The consensus core: a plain struct that takes `step`, `tick`, `propose`, `read_index`
//! and hands back a [`Ready`] batch. No clock, thread, socket or file inside: the same
//! inputs always give the same outputs.

use crate::config::Config;
use crate::log::RaftLog;
use crate::message::{Message, MessageBody, RejectHint};
use crate::tracker::{ProgressState, ProgressTracker};
use crate::types::{
    ConfChange, ConfState, Entry, EntryPayload, HardState, Index, NodeId, Snapshot, SnapshotMeta, Term,
};
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A node's role (Raft §5.1, with the PreVote stage of the thesis §9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking whether an election could be won, without bumping the term.
    PreCandidate,
    /// Campaigning in a new term.
    Candidate,
    /// Leading the group.
    Leader,
}

/// Volatile state the driver may want to show or act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// This node's role.
    pub role: Role,
}

/// A linearizable read may be served once the state machine has applied `index`
/// (ReadIndex, Raft thesis §6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's id for the read.
    pub ctx: u64,
    /// The commit index the read must wait for.
    pub index: Index,
}

/// A batch of work for the driver, in this order: persist `snapshot`, `entries` (first
/// truncating the stored log from `entries[0].index`) and `hard_state` with fsync; then send
/// `messages`; then restore the state machine from `snapshot` and apply `committed`; serve
/// `read_states` once applied; then call [`Raft::advance`]. Or persist in the background:
/// see [`Raft::advance_async`].
#[derive(Debug, Default)]
pub struct Ready {
    /// Set when the leader or role changed.
    pub soft_state: Option<SoftState>,
    /// Set when term, vote or commit changed.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader that replaces the log and the state machine.
    pub snapshot: Option<Snapshot>,
    /// Entries to persist.
    pub entries: Vec<Entry>,
    /// Messages to send once the above is durable.
    pub messages: Vec<Message>,
    /// Committed entries to apply, in order.
    pub committed: Vec<Entry>,
    /// Reads that may be served once `index` is applied.
    pub read_states: Vec<ReadState>,
}

/// Why a proposal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Only the leader takes proposals.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// Who this node thinks leads.
        leader: Option<NodeId>,
    },
    /// A leadership transfer is under way.
    #[error("leadership transfer in progress")]
    TransferInProgress,
    /// The leader holds too many uncommitted bytes; retry later.
    #[error("too many uncommitted bytes")]
    Backpressure,
    /// Another membership change is not yet applied.
    #[error("a membership change is already pending")]
    ConfChangePending,
    /// The membership change does not apply to the current configuration.
    #[error("invalid membership change: {0}")]
    InvalidConfChange(String),
}

/// Why a message was refused (the message is dropped; the node is unharmed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The message is not addressed to this node, or claims an impossible sender.
    #[error("misaddressed message: {0}")]
    Misaddressed(String),
    /// The message contradicts the protocol (bad entry numbering, oversized snapshot...).
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Where a proposal landed: it is committed if the entry applied at `index` has `term`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposed {
    /// The entry's index.
    pub index: Index,
    /// The entry's term.
    pub term: Term,
}

/// What a node restarts from: its durable state.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// Term, vote and commit as last persisted.
    pub hard_state: HardState,
    /// The latest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// The stored log after the snapshot.
    pub entries: Vec<Entry>,
    /// The highest index the (durable) state machine has already applied; entries up to
    /// here are not handed out again.
    pub applied: Index,
}

impl Restored {
    /// The durable state of a brand-new member of a new group: the initial configuration
    /// as entry 1, committed, so every founding member starts from the same log.
    pub fn bootstrap(conf: ConfState) -> Restored {
        Restored {
            hard_state: HardState { term: Term(1), vote: None, commit: Index(1) },
            snapshot: None,
            entries: vec![Entry { term: Term(1), index: Index(1), payload: EntryPayload::Config(conf) }],
            applied: Index(0),
        }
    }
}

/// The replication state of one member, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The member.
    pub id: NodeId,
    /// Highest index known to match the leader's log.
    pub matched: Index,
    /// How the leader is replicating to it.
    pub state: ProgressState,
    /// Whether it is a learner.
    pub learner: bool,
}

/// A node's state for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current term.
    pub term: Term,
    /// Current role.
    pub role: Role,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// First index still in the log.
    pub first_index: Index,
    /// Last index in the log.
    pub last_index: Index,
    /// Commit index.
    pub commit: Index,
    /// Highest index handed out for apply.
    pub applied: Index,
    /// The configuration in force.
    pub conf: ConfState,
    /// Per-member progress (filled in on the leader only).
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CampaignKind {
    PreElection,
    Election { transfer: bool },
}

#[derive(Debug)]
struct ReadRequest {
    ctx: u64,
    index: Index,
    acks: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct IncomingSnapshot {
    meta: SnapshotMeta,
    buf: Vec<u8>,
}

/// One Raft node's protocol state.
#[derive(Debug)]
pub struct Raft {
    id: NodeId,
    cfg: Config,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    tracker: ProgressTracker,
    /// Votes received in the current (pre-)election: true = granted.
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_ticks: u32,
    rng: SmallRng,
    msgs: Vec<Message>,
    /// Leader: new entries or a new commit index wait to be sent to every peer. Sent by
    /// the next [`Raft::ready`], so the proposals and acks of one batch go out as one
    /// Append per peer rather than one each.
    bcast_pending: bool,
    /// ReadIndex requests that arrived before this leader committed an entry of its term.
    reads_before_commit: Vec<u64>,
    /// ReadIndex requests waiting for a heartbeat quorum, oldest first.
    reads: VecDeque<ReadRequest>,
    read_states: Vec<ReadState>,
    transferee: Option<NodeId>,
    /// Leader: index of the latest membership change; no other is accepted until applied.
    pending_conf_index: Index,
    incoming_snapshot: Option<IncomingSnapshot>,
    installed_snapshot: Option<Snapshot>,
    prev_hard: HardState,
    prev_soft: SoftState,
}

impl Raft {
    /// A node restarting from `restored` (use [`Restored::bootstrap`] for a new group and
    /// `Restored::default()` for a node about to join one).
    pub fn new(cfg: Config, restored: Restored) -> Result<Raft, String> {
        cfg.validate()?;
        let snapshot_conf = restored.snapshot.as_ref().map(|s| s.meta.conf.clone()).unwrap_or_default();
        let mut log = RaftLog::new(restored.snapshot, restored.entries);
        log.committed = log.committed.max(restored.hard_state.commit.min(log.last_index()));
        log.applied = log.applied.max(restored.applied.min(log.committed));
        let conf = Self::conf_through(&log, snapshot_conf, log.applied);
        let tracker = ProgressTracker::new(conf, cfg.max_inflight_msgs, cfg.max_inflight_bytes);
        let soft = SoftState { leader: None, role: Role::Follower };
        let mut raft = Raft {
            id: cfg.id,
            term: restored.hard_state.term,
            vote: restored.hard_state.vote,
            role: Role::Follower,
            leader: None,
            tracker,
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_ticks: cfg.election_ticks,
            rng: SmallRng::seed_from_u64(cfg.seed),
            msgs: Vec::new(),
            bcast_pending: false,
            reads_before_commit: Vec::new(),
            reads: VecDeque::new(),
            read_states: Vec::new(),
            transferee: None,
            pending_conf_index: Index(0),
            incoming_snapshot: None,
            installed_snapshot: None,
            prev_hard: HardState {
                term: restored.hard_state.term,
                vote: restored.hard_state.vote,
                commit: log.committed,
            },
            prev_soft: soft,
            log,
            cfg,
        };
        raft.become_follower(raft.term, None);
        Ok(raft)
    }

    /// The configuration in force once entries through `upto` are applied, starting from
    /// the snapshot's.
    fn conf_through(log: &RaftLog, mut conf: ConfState, upto: Index) -> ConfState {
        let mut i = log.first_index();
        while i <= upto {
            if let Some(Entry { payload: EntryPayload::Config(c), .. }) = log.entry(i) {
                conf = c.clone();
            }
            i = i.next();
        }
        conf
    }

    // ---- accessors ----

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Commit index.
    pub fn commit_index(&self) -> Index {
        self.log.committed
    }

    /// The configuration in force.
    pub fn conf(&self) -> &ConfState {
        &self.tracker.conf
    }

    /// A snapshot of the node's state.
    pub fn status(&self) -> Status {
        let peers = if self.role == Role::Leader {
            self.tracker
                .progress
                .iter()
                .map(|(id, p)| PeerStatus { id: *id, matched: p.matched, state: p.state, learner: p.learner })
                .collect()
        } else {
            Vec::new()
        };
        Status {
            id: self.id,
            term: self.term,
            role: self.role,
            leader: self.leader,
            first_index: self.log.first_index(),
            last_index: self.log.last_index(),
            commit: self.log.committed,
            applied: self.log.applied,
            conf: self.tracker.conf.clone(),
            peers,
        }
    }

    // ---- inputs ----

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => self.tick_election(),
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        if self.promotable() && self.election_elapsed >= self.randomized_election_ticks {
            self.election_elapsed = 0;
            let kind = if self.cfg.pre_vote {
                CampaignKind::PreElection
            } else {
                CampaignKind::Election { transfer: false }
            };
            self.campaign(kind);
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum {
                // Raft thesis §6.2: a leader that cannot reach a majority steps down.
                let active: Vec<NodeId> = self
                    .tracker
                    .progress
                    .iter()
                    .filter(|(id, p)| **id == self.id || p.recent_active)
                    .map(|(id, _)| *id)
                    .collect();
                if !self.tracker.has_quorum(active.iter()) {
                    self.become_follower(self.term, None);
                    return;
                }
                let me = self.id;
                for (id, p) in self.tracker.progress.iter_mut() {
                    p.recent_active = *id == me;
                }
            }
            // A transfer that did not finish within an election timeout is abandoned.
            self.transferee = None;
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            let ctx = self.reads.back().map_or(0, |r| r.ctx);
            self.bcast_heartbeat(ctx);
        }
    }

    /// A node may campaign if it is a voter and no membership change is committed but
    /// unapplied (it could be voting with a stale configuration).
    fn promotable(&self) -> bool {
        if !self.tracker.is_voter(self.id) {
            return false;
        }
        let mut i = self.log.applied.next();
        while i <= self.log.committed {
            if matches!(self.log.entry(i), Some(Entry { payload: EntryPayload::Config(_), .. })) {
                return false;
            }
            i = i.next();
        }
        true
    }

    /// Proposes an application command. Only the leader accepts.
    pub fn propose(&mut self, data: Bytes) -> Result<Proposed, ProposeError> {
        self.check_can_propose()?;
        let entry_bytes = data.len() as u64 + 24;
        let uncommitted = self.log.uncommitted_bytes();
        if uncommitted > 0 && uncommitted + entry_bytes > self.cfg.max_uncommitted_bytes {
            return Err(ProposeError::Backpressure);
        }
        Ok(self.append_payload(EntryPayload::Normal(data)))
    }

    /// Proposes a single-server membership change.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Proposed, ProposeError> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.applied {
            return Err(ProposeError::ConfChangePending);
        }
        let next = self.tracker.conf.changed(change).map_err(ProposeError::InvalidConfChange)?;
        let proposed = self.append_payload(EntryPayload::Config(next));
        self.pending_conf_index = proposed.index;
        Ok(proposed)
    }

    fn check_can_propose(&self) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        Ok(())
    }

    fn append_payload(&mut self, payload: EntryPayload) -> Proposed {
        let index = self.log.last_index().next();
        self.log.append(vec![Entry { term: self.term, index, payload }]);
        self.bcast_append();
        Proposed { index, term: self.term }
    }

    /// Asks for a linearizable read point; the answer comes back as a [`ReadState`] with the
    /// same `ctx` (non-zero, unique among outstanding reads).
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        assert_ne!(ctx, 0, "read ctx 0 is reserved");
        // Raft thesis §6.4: the leader's commit index is current only once it has committed
        // an entry of its own term.
        if self.log.term(self.log.committed) != Some(self.term) {
            self.reads_before_commit.push(ctx);
            return Ok(());
        }
        self.start_read(ctx);
        Ok(())
    }

    fn start_read(&mut self, ctx: u64) {
        let index = self.log.committed;
        if self.tracker.quorum() == 1 && self.tracker.is_voter(self.id) {
            self.read_states.push(ReadState { ctx, index });
            return;
        }
        self.reads.push_back(ReadRequest { ctx, index, acks: BTreeSet::from([self.id]) });
        self.bcast_heartbeat(ctx);
    }

    /// Hands leadership to `to` (Raft thesis §3.10): catch it up, then tell it to campaign.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if to == self.id {
            return Ok(());
        }
        if !self.tracker.is_voter(to) {
            return Err(ProposeError::InvalidConfChange(format!("{to} is not a voter")));
        }
        self.transferee = Some(to);
        self.election_elapsed = 0;
        let caught_up = self.tracker.progress.get(&to).is_some_and(|p| p.matched == self.log.last_index());
        if caught_up {
            self.send(to, MessageBody::TimeoutNow);
        } else {
            self.send_append_all(to, true);
        }
        Ok(())
    }

    /// The application has a snapshot of its state through `index` (at most the applied
    /// index): drop the log up to there, keeping the bytes for followers that fall behind.
    pub fn compact(&mut self, index: Index, data: Bytes) -> Result<(), String> {
        if index > self.log.applied {
            return Err(format!("cannot compact to {index}: only {} is applied", self.log.applied));
        }
        if index <= self.log.snapshot.index {
            return Ok(());
        }
        let term = self.log.term(index).ok_or_else(|| format!("no term for {index}"))?;
        let conf = Self::conf_through(&self.log, self.log.snapshot.conf.clone(), index);
        self.log.compact(SnapshotMeta { index, term, conf }, data);
        Ok(())
    }

    /// The latest snapshot's position.
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.log.snapshot
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        if m.to != self.id {
            return Err(StepError::Misaddressed(format!("for {} delivered to {}", m.to, self.id)));
        }
        if m.from.0 == 0 || m.from == self.id {
            return Err(StepError::Misaddressed(format!("from {}", m.from)));
        }
        Self::validate(&m, self.cfg.max_snapshot_bytes)?;

        if m.term > self.term {
            match &m.body {
                MessageBody::PreVote { .. } | MessageBody::Vote { .. } => {
                    let transfer = matches!(m.body, MessageBody::Vote { transfer: true, .. });
                    let in_lease = self.cfg.check_quorum
                        && self.leader.is_some()
                        && self.election_elapsed < self.cfg.election_ticks;
                    if in_lease && !transfer {
                        // Raft thesis §4.2.3: a node that hears from a live leader ignores
                        // disruptive candidates.
                        return Ok(());
                    }
                }
                _ => {}
            }
            match &m.body {
                MessageBody::PreVote { .. } => {}
                MessageBody::PreVoteResp { reject: false } => {}
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } | MessageBody::Snapshot { .. } => {
                    self.become_follower(m.term, Some(m.from))
                }
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match &m.body {
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } | MessageBody::Snapshot { .. }
                    if self.cfg.check_quorum || self.cfg.pre_vote =>
                {
                    // Tell the stale leader about the newer term so it steps down.
                    self.send(m.from, MessageBody::AppendResp { index: Index(0), reject: None });
                }
                MessageBody::PreVote { .. } => self.send(m.from, MessageBody::PreVoteResp { reject: true }),
                _ => {}
            }
            return Ok(());
        }

        match m.body {
            MessageBody::PreVote { last_index, last_term } => {
                self.handle_vote_request(m.from, m.term, last_index, last_term, true)
            }
            MessageBody::Vote { last_index, last_term, .. } => {
                self.handle_vote_request(m.from, m.term, last_index, last_term, false)
            }
            MessageBody::PreVoteResp { reject } if self.role == Role::PreCandidate => {
                self.poll(m.from, !reject)
            }
            MessageBody::VoteResp { reject } if self.role == Role::Candidate => self.poll(m.from, !reject),
            MessageBody::PreVoteResp { .. } | MessageBody::VoteResp { .. } => {}
            MessageBody::Append { prev_index, prev_term, entries, commit } => {
                self.follow(m.from);
                self.handle_append(m.from, prev_index, prev_term, entries, commit)?;
            }
            MessageBody::Heartbeat { commit, ctx } => {
                self.follow(m.from);
                self.log.commit_to(commit.min(self.log.last_index()));
                self.send(m.from, MessageBody::HeartbeatResp { ctx });
            }
            MessageBody::Snapshot { meta, offset, data, done } => {
                self.follow(m.from);
                self.handle_snapshot(m.from, meta, offset, data, done)?;
            }
            MessageBody::AppendResp { index, reject } if self.role == Role::Leader => {
                self.handle_append_resp(m.from, index, reject)
            }
            MessageBody::HeartbeatResp { ctx } if self.role == Role::Leader => {
                self.handle_heartbeat_resp(m.from, ctx)
            }
            MessageBody::SnapshotResp { index, next_offset } if self.role == Role::Leader => {
                self.handle_snapshot_resp(m.from, index, next_offset)
            }
            MessageBody::AppendResp { .. }
            | MessageBody::HeartbeatResp { .. }
            | MessageBody::SnapshotResp { .. } => {}
            MessageBody::TimeoutNow => {
                if self.promotable() {
                    self.campaign(CampaignKind::Election { transfer: true });
                }
            }
        }
        Ok(())
    }

    /// Rejects messages no correct peer sends.
    fn validate(m: &Message, max_snapshot_bytes: u64) -> Result<(), StepError> {
        match &m.body {
            MessageBody::Append { prev_index, prev_term, entries, .. } => {
                let mut expect = prev_index.next();
                let mut term = *prev_term;
                for e in entries {
                    if e.index != expect || e.term < term || e.term > m.term {
                        return Err(StepError::Malformed(format!(
                            "append entry {}@{} after {}@{} in a message of {}",
                            e.index, e.term, prev_index, prev_term, m.term
                        )));
                    }
                    expect = expect.next();
                    term = e.term;
                }
            }
            MessageBody::Snapshot { meta, offset, data, .. } => {
                if meta.index.0 == 0 || meta.term > m.term {
                    return Err(StepError::Malformed(format!("snapshot {}@{}", meta.index, meta.term)));
                }
                if offset.saturating_add(data.len() as u64) > max_snapshot_bytes {
                    return Err(StepError::Malformed(format!(
                        "snapshot larger than {max_snapshot_bytes} bytes"
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn follow(&mut self, leader: NodeId) {
        if self.role != Role::Follower {
            self.become_follower(self.term, Some(leader));
        }
        self.leader = Some(leader);
        self.election_elapsed = 0;
    }

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        last_index: Index,
        last_term: Term,
        pre: bool,
    ) {
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre && term > self.term);
        let granted = can_vote && self.log.is_up_to_date(last_index, last_term);
        // A granted PreVote answers in the asked-for term so the candidate counts it.
        let reply_term = if granted { term } else { self.term };
        let body = if pre {
            MessageBody::PreVoteResp { reject: !granted }
        } else {
            MessageBody::VoteResp { reject: !granted }
        };
        self.msgs.push(Message { from: self.id, to: from, term: reply_term, body });
        if granted && !pre {
            self.election_elapsed = 0;
            self.vote = Some(from);
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    ) -> Result<(), StepError> {
        if prev_index < self.log.committed {
            self.send(from, MessageBody::AppendResp { index: self.log.committed, reject: None });
            return Ok(());
        }
        match self.log.maybe_append(prev_index, prev_term, entries) {
            Some(last_new) => {
                self.log.commit_to(commit.min(last_new));
                self.send(from, MessageBody::AppendResp { index: last_new, reject: None });
            }
            None => {
                let hint_index = prev_index.min(self.log.last_index());
                let (index, term) = self.log.find_conflict_by_term(hint_index, prev_term);
                self.send(
                    from,
                    MessageBody::AppendResp { index: prev_index, reject: Some(RejectHint { index, term }) },
                );
            }
        }
        Ok(())
    }

    fn handle_snapshot(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Bytes,
        done: bool,
    ) -> Result<(), StepError> {
        if meta.index <= self.log.committed {
            self.incoming_snapshot = None;
            self.send(from, MessageBody::AppendResp { index: self.log.committed, reject: None });
            return Ok(());
        }
        if offset == 0 {
            self.incoming_snapshot = Some(IncomingSnapshot { meta: meta.clone(), buf: Vec::new() });
        }
        let have = match &mut self.incoming_snapshot {
            Some(inc) if inc.meta == meta && inc.buf.len() as u64 == offset => {
                inc.buf.extend_from_slice(&data);
                inc.buf.len() as u64
            }
            Some(inc) if inc.meta == meta => {
                // Out of order or duplicate chunk: say where to resume.
                let next_offset = inc.buf.len() as u64;
                self.send(from, MessageBody::SnapshotResp { index: meta.index, next_offset });
                return Ok(());
            }
            _ => {
                self.send(from, MessageBody::SnapshotResp { index: meta.index, next_offset: 0 });
                return Ok(());
            }
        };
        if !done {
            self.send(from, MessageBody::SnapshotResp { index: meta.index, next_offset: have });
            return Ok(());
        }
        let inc = self.incoming_snapshot.take().expect("checked above");
        if self.log.match_term(meta.index, meta.term) {
            // We already hold the snapshot's last entry: just fast-forward the commit.
            self.log.commit_to(meta.index);
        } else {
            let snapshot = Snapshot { meta: inc.meta, data: Bytes::from(inc.buf) };
            self.log.restore(snapshot.clone());
            self.tracker.set_conf(snapshot.meta.conf.clone(), self.log.last_index().next());
            self.installed_snapshot = Some(snapshot);
        }
        self.send(from, MessageBody::AppendResp { index: meta.index, reject: None });
        Ok(())
    }

    fn handle_append_resp(&mut self, from: NodeId, index: Index, reject: Option<RejectHint>) {
        let last_index = self.log.last_index();
        let Some(pr) = self.tracker.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        if let Some(hint) = reject {
            // Fast backtracking: skip every entry of a term the follower cannot match.
            let next_probe = if hint.term.0 > 0 {
                self.log.find_conflict_by_term(hint.index, hint.term).0
            } else {
                hint.index
            };
            if pr.maybe_decr_to(index, next_probe) {
                self.send_append_all(from, true);
            }
            return;
        }
        if index > last_index {
            return; // a reply from a previous leadership of ours; cannot match
        }
        if pr.maybe_update(index) {
            match pr.state {
                ProgressState::Probe => pr.become_replicate(),
                ProgressState::Snapshot { index: snap, .. } if pr.matched >= snap => {
                    pr.become_probe();
                    pr.become_replicate();
                }
                ProgressState::Replicate => pr.inflights.free_to(index),
                ProgressState::Snapshot { .. } => {}
            }
            if self.maybe_commit() {
                self.bcast_append();
            } else {
                self.send_append_all(from, false);
            }
            if self.transferee == Some(from)
                && self.tracker.progress.get(&from).is_some_and(|p| p.matched == last_index)
            {
                self.send(from, MessageBody::TimeoutNow);
            }
        } else if pr.state == ProgressState::Replicate {
            pr.inflights.free_to(index);
            self.send_append_all(from, false);
        }
    }

    fn handle_heartbeat_resp(&mut self, from: NodeId, ctx: u64) {
        let last_index = self.log.last_index();
        let Some(pr) = self.tracker.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        pr.probe_sent = false;
        if pr.state == ProgressState::Replicate && pr.inflights.full() {
            pr.inflights.free_first();
        }
        match pr.state {
            ProgressState::Snapshot { .. } => self.send_snapshot_chunk(from),
            _ if pr.matched < last_index => self.send_append_all(from, true),
            _ => {}
        }
        if ctx != 0 {
            self.ack_read(from, ctx);
        }
    }

    fn handle_snapshot_resp(&mut self, from: NodeId, index: Index, next_offset: u64) {
        let Some(pr) = self.tracker.progress.get_mut(&from) else { return };
        pr.recent_active = true;
        if let ProgressState::Snapshot { index: snap, .. } = pr.state {
            if snap == index {
                pr.state = ProgressState::Snapshot { index, next_offset };
                self.send_snapshot_chunk(from);
            }
        }
    }

    fn ack_read(&mut self, from: NodeId, ctx: u64) {
        let Some(pos) = self.reads.iter().position(|r| r.ctx == ctx) else { return };
        self.reads[pos].acks.insert(from);
        if !self.tracker.has_quorum(self.reads[pos].acks.iter()) {
            return;
        }
        // A quorum confirmed leadership after every earlier request arrived: release them too.
        for r in self.reads.drain(..=pos) {
            self.read_states.push(ReadState { ctx: r.ctx, index: r.index });
        }
    }

    // ---- elections ----

    fn campaign(&mut self, kind: CampaignKind) {
        let (term, transfer) = match kind {
            CampaignKind::PreElection => {
                self.become_pre_candidate();
                (self.term.next(), false)
            }
            CampaignKind::Election { transfer } => {
                self.become_candidate();
                (self.term, transfer)
            }
        };
        self.votes.insert(self.id, true);
        if self.tracker.has_quorum([self.id].iter()) {
            // A group of one wins at once.
            self.on_election_won();
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let voters: Vec<NodeId> =
            self.tracker.conf.voters.iter().copied().filter(|id| *id != self.id).collect();
        for to in voters {
            let body = match kind {
                CampaignKind::PreElection => MessageBody::PreVote { last_index, last_term },
                CampaignKind::Election { .. } => MessageBody::Vote { last_index, last_term, transfer },
            };
            self.msgs.push(Message { from: self.id, to, term, body });
        }
    }

    fn on_election_won(&mut self) {
        match self.role {
            Role::PreCandidate => self.campaign(CampaignKind::Election { transfer: false }),
            Role::Candidate => self.become_leader(),
            _ => {}
        }
    }

    /// Records a vote and acts once the outcome is known.
    fn poll(&mut self, from: NodeId, granted: bool) {
        self.votes.entry(from).or_insert(granted);
        let yes: Vec<NodeId> = self.votes.iter().filter(|(_, g)| **g).map(|(id, _)| *id).collect();
        let no: Vec<NodeId> = self.votes.iter().filter(|(_, g)| !**g).map(|(id, _)| *id).collect();
        if self.tracker.has_quorum(yes.iter()) {
            self.on_election_won();
        } else if self.tracker.has_quorum(no.iter()) {
            self.become_follower(self.term, None);
        }
    }

    fn reset(&mut self, term: Term) {
        if term != self.term {
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.randomized_election_ticks =
            self.cfg.election_ticks + self.rng.gen_range(0..self.cfg.election_ticks);
        self.votes.clear();
        self.transferee = None;
        self.bcast_pending = false;
        self.reads.clear();
        self.reads_before_commit.clear();
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        // PreVote changes neither term nor vote.
        self.votes.clear();
        self.leader = None;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        self.reset(self.term.next());
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        self.reset(self.term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let last = self.log.last_index();
        self.tracker.reset_all(last.next());
        let stable = self.log.stable;
        if let Some(me) = self.tracker.progress.get_mut(&self.id) {
            me.matched = stable;
            me.become_replicate();
        }
        // Any configuration entry in the uncommitted tail counts as pending.
        self.pending_conf_index = last;
        // Raft §5.4.2 / §8: commit something of our own term at once.
        self.append_payload(EntryPayload::Noop);
    }

    // ---- replication ----

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.msgs.push(Message { from: self.id, to, term: self.term, body });
    }

    /// Asks for an Append to every peer (new entries, or the new commit index), sent by
    /// the next [`Raft::ready`].
    fn bcast_append(&mut self) {
        self.bcast_pending = true;
    }

    /// Sends the Appends asked for by [`Raft::bcast_append`].
    fn flush_bcast_append(&mut self) {
        if !std::mem::take(&mut self.bcast_pending) || self.role != Role::Leader {
            return;
        }
        let peers: Vec<NodeId> = self.tracker.progress.keys().copied().filter(|id| *id != self.id).collect();
        for id in peers {
            self.send_append_all(id, true);
        }
    }

    fn bcast_heartbeat(&mut self, ctx: u64) {
        let peers: Vec<(NodeId, Index)> = self
            .tracker
            .progress
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, p)| (*id, p.matched))
            .collect();
        for (id, matched) in peers {
            let commit = matched.min(self.log.committed);
            self.send(id, MessageBody::Heartbeat { commit, ctx });
        }
    }

    /// Sends as many Appends to `to` as its window allows; with `allow_empty`, at least one
    /// (a probe, or a commit update) even when no entry is pending.
    fn send_append_all(&mut self, to: NodeId, allow_empty: bool) {
        let mut allow_empty = allow_empty;
        while self.send_append(to, allow_empty) {
            allow_empty = false;
        }
    }

    /// Sends one Append (or snapshot chunk); returns whether more could follow.
    fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let last_index = self.log.last_index();
        let Some(pr) = self.tracker.progress.get(&to) else { return false };
        if pr.is_paused() {
            return false;
        }
        let next = pr.next;
        let prev = next.prev();
        let Some(prev_term) = self.log.term(prev) else {
            let snap = self.log.snapshot.index;
            self.tracker.progress.get_mut(&to).expect("checked").become_snapshot(snap);
            self.send_snapshot_chunk(to);
            return false;
        };
        let entries = self.log.slice(next, last_index.next(), self.cfg.max_msg_bytes);
        if entries.is_empty() && !allow_empty {
            return false;
        }
        let bytes: u64 = entries.iter().map(Entry::size_bytes).sum();
        let last = entries.last().map(|e| e.index);
        let pr = self.tracker.progress.get_mut(&to).expect("checked");
        let more = match pr.state {
            ProgressState::Replicate => match last {
                Some(last) => {
                    pr.next = last.next();
                    pr.inflights.add(last, bytes);
                    last < last_index
                }
                None => false,
            },
            _ => {
                pr.probe_sent = true;
                false
            }
        };
        let commit = self.log.committed;
        self.send(to, MessageBody::Append { prev_index: prev, prev_term, entries, commit });
        more
    }

    fn send_snapshot_chunk(&mut self, to: NodeId) {
        let snap_index = self.log.snapshot.index;
        let Some(pr) = self.tracker.progress.get_mut(&to) else { return };
        let ProgressState::Snapshot { index, next_offset } = pr.state else { return };
        // A newer snapshot replaced the one being sent: start over with it.
        let offset = if index == snap_index { next_offset } else { 0 };
        pr.state = ProgressState::Snapshot { index: snap_index, next_offset: offset };
        let data = &self.log.snapshot_data;
        let start = (offset as usize).min(data.len());
        let end = (start + self.cfg.snapshot_chunk_bytes as usize).min(data.len());
        let chunk = data.slice(start..end);
        let meta = self.log.snapshot.clone();
        self.send(
            to,
            MessageBody::Snapshot { meta, offset: start as u64, data: chunk, done: end == data.len() },
        );
    }

    /// Advances the commit index to what a quorum holds; true if it moved.
    fn maybe_commit(&mut self) -> bool {
        let index = self.tracker.committed_index();
        if !self.log.maybe_commit(index, self.term) {
            return false;
        }
        if !self.reads_before_commit.is_empty() {
            for ctx in std::mem::take(&mut self.reads_before_commit) {
                self.start_read(ctx);
            }
        }
        true
    }

    // ---- output ----

    fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed }
    }

    fn soft_state(&self) -> SoftState {
        SoftState { leader: self.leader, role: self.role }
    }

    /// Whether [`Raft::ready`] has work.
    pub fn has_ready(&self) -> bool {
        !self.msgs.is_empty()
            || self.bcast_pending
            || self.hard_state() != self.prev_hard
            || self.soft_state() != self.prev_soft
            || self.installed_snapshot.is_some()
            || !self.log.unstable().is_empty()
            || !self.read_states.is_empty()
            || self.log.committed.min(self.log.stable) > self.log.applied
    }

    /// Takes the pending work. Call [`Raft::advance`] with it once it is done, before the
    /// next `ready`.
    pub fn ready(&mut self) -> Ready {
        self.flush_bcast_append();
        let soft = self.soft_state();
        let hard = self.hard_state();
        let rd = Ready {
            soft_state: (soft != self.prev_soft).then_some(soft),
            hard_state: (hard != self.prev_hard).then_some(hard),
            snapshot: self.installed_snapshot.take(),
            entries: self.log.unstable().to_vec(),
            messages: std::mem::take(&mut self.msgs),
            committed: self.log.next_committed(self.cfg.max_apply_bytes),
            read_states: std::mem::take(&mut self.read_states),
        };
        self.prev_soft = soft;
        self.prev_hard = hard;
        rd
    }

    /// Records that a [`Ready`] was persisted and its committed entries applied.
    pub fn advance(&mut self, rd: &Ready) {
        if let Some(last) = rd.entries.last() {
            self.log.in_progress_to(last.index, last.term);
            self.persisted(last.index, last.term);
        }
        self.advance_applied(rd);
    }

    /// Records that a [`Ready`] was handed to storage, which persists its entries, hard
    /// state and snapshot in the order the Readies came, and that its committed entries
    /// were applied. Its messages other than a leader's appends and heartbeats (votes,
    /// acknowledgements) must wait until storage has made it durable. The next `ready`
    /// may come at once: it holds only what came after this one. Once storage is done,
    /// call [`Raft::persisted`] with its last entry.
    pub fn advance_async(&mut self, rd: &Ready) {
        if let Some(last) = rd.entries.last() {
            self.log.in_progress_to(last.index, last.term);
        }
        self.advance_applied(rd);
    }

    /// Records that the entries through `index`, whose term is `term`, are durable on this
    /// node (those of a Ready handed over by [`Raft::advance_async`]). Ignored if the entry
    /// has since been replaced. A leader counts itself toward a commit only from here.
    pub fn persisted(&mut self, index: Index, term: Term) {
        self.log.stable_to(index, term);
        if self.role == Role::Leader {
            let stable = self.log.stable;
            if let Some(me) = self.tracker.progress.get_mut(&self.id) {
                me.maybe_update(stable);
            }
            if self.maybe_commit() {
                self.bcast_append();
            }
        }
    }

    fn advance_applied(&mut self, rd: &Ready) {
        for e in &rd.committed {
            if e.index <= self.log.applied {
                continue; // replaced by an installed snapshot meanwhile
            }
            self.log.applied = e.index;
            if let EntryPayload::Config(conf) = &e.payload {
                self.apply_conf(conf.clone());
            }
        }
    }

    fn apply_conf(&mut self, conf: ConfState) {
        let next = self.log.last_index().next();
        self.tracker.set_conf(conf, next);
        if self.role == Role::Leader {
            if !self.tracker.is_voter(self.id) {
                // A removed leader steps down; the others elect a new one.
                self.become_follower(self.term, None);
                return;
            }
            // The quorum may have shrunk: commit what it now allows, and feed new members.
            self.maybe_commit();
            self.bcast_append();
        }
    }
}

#[cfg(test)]
impl Raft {
    /// The in-memory log, for the simulator's checkers.
    pub(crate) fn raft_log(&self) -> &RaftLog {
        &self.log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follower() -> Raft {
        let conf = ConfState::with_voters([NodeId(1), NodeId(2), NodeId(3)]);
        let mut r = Raft::new(Config::new(NodeId(1)), Restored::bootstrap(conf)).unwrap();
        let rd = r.ready();
        r.advance(&rd);
        r
    }

    fn msg(from: u64, term: u64, body: MessageBody) -> Message {
        Message { from: NodeId(from), to: NodeId(1), term: Term(term), body }
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            term: Term(term),
            index: Index(index),
            payload: EntryPayload::Normal(Bytes::from_static(b"x")),
        }
    }

    fn append(prev: (u64, u64), entries: Vec<Entry>, commit: u64) -> MessageBody {
        MessageBody::Append {
            prev_index: Index(prev.0),
            prev_term: Term(prev.1),
            entries,
            commit: Index(commit),
        }
    }

    #[test]
    fn misaddressed_messages_are_refused() {
        let mut r = follower();
        let mut m = msg(2, 2, MessageBody::TimeoutNow);
        m.to = NodeId(7);
        assert!(matches!(r.step(m), Err(StepError::Misaddressed(_))));
        assert!(matches!(r.step(msg(0, 2, MessageBody::TimeoutNow)), Err(StepError::Misaddressed(_))));
        assert!(matches!(r.step(msg(1, 2, MessageBody::TimeoutNow)), Err(StepError::Misaddressed(_))));
        assert_eq!(r.term(), Term(1), "a refused message changes nothing");
    }

    #[test]
    fn malformed_appends_are_refused_and_change_nothing() {
        let mut r = follower();
        // A gap in the numbering.
        let gap = append((1, 1), vec![entry(2, 2), entry(2, 4)], 0);
        assert!(matches!(r.step(msg(2, 2, gap)), Err(StepError::Malformed(_))));
        // An entry from a term newer than the message's.
        let future = append((1, 1), vec![entry(5, 2)], 0);
        assert!(matches!(r.step(msg(2, 2, future)), Err(StepError::Malformed(_))));
        // Terms going backwards.
        let backwards = append((1, 1), vec![entry(2, 2), entry(1, 3)], 0);
        assert!(matches!(r.step(msg(2, 2, backwards)), Err(StepError::Malformed(_))));
        assert_eq!(r.status().last_index, Index(1));
        // A good one still works afterwards.
        r.step(msg(2, 2, append((1, 1), vec![entry(2, 2)], 2))).unwrap();
        assert_eq!(r.status().last_index, Index(2));
        assert_eq!(r.commit_index(), Index(2));
        // An append that would rewrite a committed entry is answered with the commit index
        // and changes nothing.
        r.step(msg(3, 3, append((1, 1), vec![entry(3, 2)], 2))).unwrap();
        assert_eq!(r.raft_log().entry(Index(2)).unwrap().term, Term(2));
        let rd = r.ready();
        assert!(rd
            .messages
            .iter()
            .any(|m| m.body == MessageBody::AppendResp { index: Index(2), reject: None }));
    }

    /// Node 1 elected leader of 1, 2, 3 (without PreVote), its first Ready handed out.
    fn leader_with_ready() -> (Raft, Ready) {
        let conf = ConfState::with_voters([NodeId(1), NodeId(2), NodeId(3)]);
        let cfg = Config { pre_vote: false, ..Config::new(NodeId(1)) };
        let mut r = Raft::new(cfg, Restored::bootstrap(conf)).unwrap();
        let rd = r.ready();
        r.advance(&rd);
        while r.role() != Role::Candidate {
            r.tick();
        }
        let rd = r.ready();
        r.advance(&rd);
        r.step(msg(2, r.term().0, MessageBody::VoteResp { reject: false })).unwrap();
        assert_eq!(r.role(), Role::Leader);
        let rd = r.ready();
        (r, rd)
    }

    #[test]
    fn async_leader_counts_itself_only_once_its_log_is_durable() {
        let (mut r, rd) = leader_with_ready();
        let term = r.term();
        let noop = rd.entries.last().expect("the new leader's no-op").clone();
        assert_eq!(noop.index, Index(2));
        r.advance_async(&rd);
        // Handed out once: the next Ready does not hold the entry again.
        r.propose(Bytes::from_static(b"a")).unwrap();
        let rd = r.ready();
        assert_eq!(rd.entries.iter().map(|e| e.index).collect::<Vec<_>>(), vec![Index(3)]);
        r.advance_async(&rd);
        // One follower has both entries; the leader's own copies are not durable yet.
        r.step(msg(2, term.0, MessageBody::AppendResp { index: Index(3), reject: None })).unwrap();
        assert_eq!(r.commit_index(), Index(1));
        r.persisted(Index(2), term);
        assert_eq!(r.commit_index(), Index(2));
        r.persisted(Index(3), term);
        assert_eq!(r.commit_index(), Index(3));
        let rd = r.ready();
        assert_eq!(rd.committed.last().map(|e| e.index), Some(Index(3)));
    }

    #[test]
    fn async_entries_replaced_while_being_written_are_not_taken_as_durable() {
        let mut r = follower();
        r.step(msg(2, 2, append((1, 1), vec![entry(2, 2), entry(2, 3)], 1))).unwrap();
        let rd = r.ready();
        assert_eq!(rd.entries.len(), 2);
        r.advance_async(&rd);
        // A new leader replaces entry 3 while the first write is in flight.
        r.step(msg(3, 3, append((2, 2), vec![entry(3, 3)], 1))).unwrap();
        let rd = r.ready();
        assert_eq!(
            rd.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(Index(3), Term(3))]
        );
        r.advance_async(&rd);
        // The first write finishing says nothing of the new entry 3.
        r.persisted(Index(3), Term(2));
        assert_eq!(r.raft_log().stable, Index(1));
        r.persisted(Index(3), Term(3));
        assert_eq!(r.raft_log().stable, Index(3));
    }

    #[test]
    fn oversized_snapshot_is_refused() {
        let mut cfg = Config::new(NodeId(1));
        cfg.max_snapshot_bytes = 16;
        let conf = ConfState::with_voters([NodeId(1), NodeId(2), NodeId(3)]);
        let mut r = Raft::new(cfg, Restored::bootstrap(conf.clone())).unwrap();
        let body = MessageBody::Snapshot {
            meta: SnapshotMeta { index: Index(10), term: Term(2), conf },
            offset: 8,
            data: Bytes::from(vec![0; 9]),
            done: true,
        };
        assert!(matches!(r.step(msg(2, 2, body)), Err(StepError::Malformed(_))));
        assert_eq!(r.status().last_index, Index(1));
    }

    // Raft §5.1: a message from an older term is ignored; an old leader is told the term.
    #[test]
    fn older_term_is_ignored_and_answered_with_the_current_term() {
        let mut r = follower();
        r.step(msg(2, 5, append((1, 1), vec![], 1))).unwrap();
        let rd = r.ready();
        r.advance(&rd);
        r.step(msg(3, 4, append((1, 1), vec![entry(4, 2)], 1))).unwrap();
        assert_eq!(r.status().last_index, Index(1), "the stale leader's entry is not taken");
        let rd = r.ready();
        let reply = rd.messages.iter().find(|m| m.to == NodeId(3)).expect("a reply to the stale leader");
        assert_eq!(reply.term, Term(5));
    }

    #[test]
    fn replies_from_unknown_nodes_are_ignored() {
        let conf = ConfState::with_voters([NodeId(1)]);
        let mut r = Raft::new(Config::new(NodeId(1)), Restored::bootstrap(conf)).unwrap();
        let rd = r.ready();
        r.advance(&rd);
        for _ in 0..30 {
            r.tick();
        }
        assert_eq!(r.role(), Role::Leader);
        let term = r.term().0;
        r.step(msg(9, term, MessageBody::AppendResp { index: Index(100), reject: None })).unwrap();
        r.step(msg(9, term, MessageBody::HeartbeatResp { ctx: 3 })).unwrap();
        assert_eq!(r.role(), Role::Leader);
        assert!(r.commit_index() < Index(100));
    }
}
