//! A deterministic simulator: seeded randomness, simulated time, a network that drops,
//! delays, duplicates and reorders messages and partitions nodes, and crashes that keep
//! only what was persisted. It runs the real [`Raft`] core and checks Raft's safety
//! properties after every step, plus linearizability of the key-value history at the end.
//!
//! A failure names its seed; `RAFT_SIM_SEED=<seed>` replays that seed alone, and
//! `RAFT_SIM_TRACE=1` prints every event of the replay.

mod checker;
mod linearizability;
mod network;
mod random;
mod scenarios;

use crate::kv::{KvCommand, KvOp, KvResult, KvStore};
use crate::{
    ConfChange, ConfState, Config, Entry, EntryPayload, HardState, Index, Message, MessageBody, NodeId,
    ProposeError, Raft, Restored, Role, Snapshot, Term,
};
use checker::Checker;
use linearizability::{KvInput, KvOutput, Operation};
use network::Network;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Simulated milliseconds between two ticks of a node.
pub(crate) const TICK_MS: u64 = 10;
/// A client gives up on a node after this long and retries elsewhere.
const CLIENT_TIMEOUT_MS: u64 = 400;

/// Knobs of one simulation.
#[derive(Clone, Debug)]
pub(crate) struct SimConfig {
    pub seed: u64,
    pub nodes: u64,
    pub drop: f64,
    pub duplicate: f64,
    pub delay_ms: (u64, u64),
    /// Compact a node's log once this many entries are applied past its snapshot (0: never).
    pub snapshot_every: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Clients that keep issuing operations (0: the test proposes by hand).
    pub clients: u64,
    pub keys: u64,
    /// Fraction of Gets served by ReadIndex instead of through the log.
    pub read_index_share: f64,
    pub max_msg_bytes: u64,
    pub max_inflight_msgs: usize,
    pub snapshot_chunk_bytes: u64,
}

impl SimConfig {
    pub(crate) fn new(seed: u64, nodes: u64) -> SimConfig {
        SimConfig {
            seed,
            nodes,
            drop: 0.0,
            duplicate: 0.0,
            delay_ms: (1, 5),
            snapshot_every: 0,
            pre_vote: true,
            check_quorum: true,
            clients: 0,
            keys: 3,
            read_index_share: 0.5,
            max_msg_bytes: 4096,
            max_inflight_msgs: 8,
            snapshot_chunk_bytes: 256,
        }
    }
}

/// What a node has fsynced.
#[derive(Clone, Debug, Default)]
struct Disk {
    hard: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

struct SimNode {
    raft: Option<Raft>,
    disk: Disk,
    kv: KvStore,
    applied: Index,
    next_tick_ms: u64,
    /// ReadIndex answers waiting for the state machine to catch up: (ctx, index).
    waiting_reads: Vec<(u64, Index)>,
}

#[derive(Clone, Debug)]
enum Attempt {
    Proposal { node: NodeId, index: Index, term: Term },
    Read { node: NodeId, ctx: u64, key: String },
}

struct PendingOp {
    cmd: KvCommand,
    history: usize,
    attempt: Option<Attempt>,
    deadline_ms: u64,
}

struct Client {
    id: u64,
    next_seq: u64,
    leader_hint: Option<NodeId>,
    pending: Option<PendingOp>,
    next_op_ms: u64,
}

/// Counters for the summary line of a run.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stats {
    pub delivered: u64,
    pub dropped: u64,
    pub crashes: u64,
    pub ops_done: u64,
    pub snapshots_sent: u64,
    pub append_rejections: u64,
    pub elections_won: u64,
}

/// The simulated cluster.
pub(crate) struct Sim {
    pub cfg: SimConfig,
    pub now_ms: u64,
    rng: SmallRng,
    nodes: BTreeMap<NodeId, SimNode>,
    pub net: Network,
    checker: Checker,
    clients: Vec<Client>,
    history: Vec<Operation>,
    next_ctx: u64,
    pub stats: Stats,
    trace_on: bool,
    trace: VecDeque<String>,
    /// Messages delivered, by kind name (tests use it to see what happened).
    pub delivered_kinds: BTreeMap<&'static str, u64>,
}

impl Sim {
    /// A cluster of `cfg.nodes` founding voters, each with the bootstrap entry on disk.
    pub(crate) fn new(cfg: SimConfig) -> Sim {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let net = Network::new(rng.gen(), cfg.drop, cfg.duplicate, cfg.delay_ms);
        let mut sim = Sim {
            now_ms: 0,
            nodes: BTreeMap::new(),
            net,
            checker: Checker::default(),
            clients: Vec::new(),
            history: Vec::new(),
            next_ctx: 1,
            stats: Stats::default(),
            trace_on: std::env::var_os("RAFT_SIM_TRACE").is_some(),
            trace: VecDeque::new(),
            delivered_kinds: BTreeMap::new(),
            rng,
            cfg,
        };
        let conf = ConfState::with_voters((1..=sim.cfg.nodes).map(NodeId));
        for id in 1..=sim.cfg.nodes {
            let restored = Restored::bootstrap(conf.clone());
            let disk = Disk { hard: restored.hard_state, snapshot: None, entries: restored.entries };
            sim.add_node(NodeId(id), disk);
        }
        for c in 1..=sim.cfg.clients {
            sim.clients.push(Client { id: c, next_seq: 1, leader_hint: None, pending: None, next_op_ms: 0 });
        }
        sim
    }

    fn raft_config(&self, id: NodeId) -> Config {
        let mut c = Config::new(id);
        c.pre_vote = self.cfg.pre_vote;
        c.check_quorum = self.cfg.check_quorum;
        c.max_msg_bytes = self.cfg.max_msg_bytes;
        c.max_inflight_msgs = self.cfg.max_inflight_msgs;
        c.snapshot_chunk_bytes = self.cfg.snapshot_chunk_bytes;
        c.seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(id.0 * 7919 + self.stats.crashes);
        c
    }

    /// Adds a node (a founding member or one about to join) with the given disk, running.
    fn add_node(&mut self, id: NodeId, disk: Disk) {
        let phase = self.rng.gen_range(0..TICK_MS);
        self.nodes.insert(
            id,
            SimNode {
                raft: None,
                disk,
                kv: KvStore::default(),
                applied: Index(0),
                next_tick_ms: self.now_ms + phase,
                waiting_reads: Vec::new(),
            },
        );
        self.restart(id);
    }

    /// Adds an empty node that will join the group (via AddLearner).
    pub(crate) fn add_empty_node(&mut self, id: NodeId) {
        self.add_node(id, Disk::default());
    }

    pub(crate) fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub(crate) fn raft(&self, id: NodeId) -> Option<&Raft> {
        self.nodes.get(&id).and_then(|n| n.raft.as_ref())
    }

    pub(crate) fn raft_mut(&mut self, id: NodeId) -> Option<&mut Raft> {
        self.nodes.get_mut(&id).and_then(|n| n.raft.as_mut())
    }

    pub(crate) fn is_up(&self, id: NodeId) -> bool {
        self.raft(id).is_some()
    }

    pub(crate) fn kv(&self, id: NodeId) -> &KvStore {
        &self.nodes[&id].kv
    }

    pub(crate) fn applied(&self, id: NodeId) -> Index {
        self.nodes[&id].applied
    }

    /// The live leader with the highest term, if any.
    pub(crate) fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.raft.as_ref().map(|r| (*id, r)))
            .filter(|(_, r)| r.role() == Role::Leader)
            .max_by_key(|(_, r)| r.term())
            .map(|(id, _)| id)
    }

    pub(crate) fn trace(&mut self, line: impl FnOnce() -> String) {
        if self.trace_on {
            let l = format!("[{:>6}ms] {}", self.now_ms, line());
            eprintln!("{l}");
            self.trace.push_back(l);
        }
    }

    // ---- faults ----

    /// Stops a node at once: only its disk survives.
    pub(crate) fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.raft.take().is_some() {
            self.stats.crashes += 1;
            node.waiting_reads.clear();
            self.trace(|| format!("{id} crashes"));
        }
    }

    /// Crashes a node in the middle of persisting its next batch: a prefix of its new
    /// entries (and maybe its hard state) reach the disk, no message leaves.
    pub(crate) fn crash_mid_write(&mut self, id: NodeId) {
        let keep_hard = self.rng.gen_bool(0.5);
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(raft) = node.raft.as_mut() {
            if raft.has_ready() {
                let rd = raft.ready();
                let keep = if rd.entries.is_empty() { 0 } else { self.rng.gen_range(0..=rd.entries.len()) };
                if let Some(first) = rd.entries.first() {
                    if keep > 0 {
                        node.disk.entries.retain(|e| e.index < first.index);
                        node.disk.entries.extend(rd.entries[..keep].iter().cloned());
                    }
                }
                if keep_hard && rd.snapshot.is_none() {
                    if let Some(hs) = rd.hard_state {
                        node.disk.hard = hs;
                    }
                }
            }
        }
        self.crash(id);
    }

    /// Starts a crashed node from its disk.
    pub(crate) fn restart(&mut self, id: NodeId) {
        let cfg = self.raft_config(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.raft.is_some() {
            return;
        }
        let (kv, applied) = match &node.disk.snapshot {
            Some(s) => (KvStore::restore(&s.data).expect("own snapshot decodes"), s.meta.index),
            None => (KvStore::default(), Index(0)),
        };
        let restored = Restored {
            hard_state: node.disk.hard,
            snapshot: node.disk.snapshot.clone(),
            entries: node.disk.entries.clone(),
            applied,
        };
        node.kv = kv;
        node.applied = applied;
        node.raft = Some(Raft::new(cfg, restored).expect("valid config"));
        node.next_tick_ms = self.now_ms + 1;
        self.trace(|| format!("{id} restarts"));
        self.process_ready(id);
    }

    /// Cuts every link between `a` and the other nodes (both ways).
    pub(crate) fn isolate(&mut self, a: NodeId) {
        for b in self.ids() {
            if b != a {
                self.net.cut(a, b);
            }
        }
        self.trace(|| format!("{a} isolated"));
    }

    /// Splits the nodes into two sides that cannot talk.
    pub(crate) fn partition(&mut self, side: &[NodeId]) {
        let side: BTreeSet<NodeId> = side.iter().copied().collect();
        for a in self.ids() {
            for b in self.ids() {
                if side.contains(&a) != side.contains(&b) {
                    self.net.cut(a, b);
                }
            }
        }
        self.trace(|| format!("partition {side:?} | rest"));
    }

    pub(crate) fn heal(&mut self) {
        self.net.heal_all();
        self.trace(|| "network healed".to_string());
    }

    // ---- the event loop ----

    /// Runs for `ms` simulated milliseconds.
    pub(crate) fn run_ms(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.step_ms();
        }
    }

    /// Runs until `done` holds, or panics after `limit_ms`.
    pub(crate) fn run_until(&mut self, limit_ms: u64, what: &str, mut done: impl FnMut(&Sim) -> bool) {
        let end = self.now_ms + limit_ms;
        while !done(self) {
            if self.now_ms >= end {
                self.fail(&format!("timed out after {limit_ms}ms waiting for: {what}"));
            }
            self.step_ms();
        }
    }

    /// One simulated millisecond: deliver what is due, tick who is due, run clients.
    fn step_ms(&mut self) {
        if self.net.in_flight() > 100_000 {
            self.fail("message storm: over 100000 messages in flight");
        }
        while let Some(m) = self.net.pop_due(self.now_ms) {
            self.deliver(m);
        }
        for id in self.ids() {
            let due = {
                let n = &self.nodes[&id];
                n.raft.is_some() && n.next_tick_ms <= self.now_ms
            };
            if due {
                self.nodes.get_mut(&id).unwrap().next_tick_ms += TICK_MS;
                self.raft_mut(id).unwrap().tick();
                self.process_ready(id);
            }
        }
        self.run_clients();
        self.now_ms += 1;
    }

    fn deliver(&mut self, m: Message) {
        let to = m.to;
        if self.raft(to).is_none() {
            return;
        }
        self.stats.delivered += 1;
        *self.delivered_kinds.entry(m.body.name()).or_default() += 1;
        if let MessageBody::AppendResp { reject: Some(_), .. } = m.body {
            self.stats.append_rejections += 1;
        }
        if let MessageBody::Snapshot { done: true, .. } = m.body {
            self.stats.snapshots_sent += 1;
        }
        self.trace(|| format!("deliver {} -> {} {}: {:?}", m.from, m.to, m.term, short(&m.body)));
        if let Err(e) = self.raft_mut(to).unwrap().step(m) {
            self.fail(&format!("correct peer's message refused: {e}"));
        }
        self.process_ready(to);
    }

    /// Drains a node's Ready batches: persist, send, apply, advance; then checks safety.
    pub(crate) fn process_ready(&mut self, id: NodeId) {
        loop {
            let Some(raft) = self.raft_mut(id) else { return };
            if !raft.has_ready() {
                break;
            }
            let rd = raft.ready();
            let was_leader = rd.soft_state.is_some_and(|s| s.role == Role::Leader);
            let node = self.nodes.get_mut(&id).unwrap();
            // Persist.
            if let Some(s) = &rd.snapshot {
                node.disk.snapshot = Some(s.clone());
                node.disk.entries.clear();
            }
            if let Some(first) = rd.entries.first() {
                node.disk.entries.retain(|e| e.index < first.index);
                node.disk.entries.extend(rd.entries.iter().cloned());
            }
            if let Some(hs) = rd.hard_state {
                node.disk.hard = hs;
            }
            // Send.
            for m in &rd.messages {
                let (from, to) = (m.from, m.to);
                if !self.net.send(self.now_ms, m.clone()) {
                    self.stats.dropped += 1;
                    self.trace(|| format!("drop {from} -> {to} {}", m.body.name()));
                }
            }
            // Apply.
            if let Some(s) = &rd.snapshot {
                let node = self.nodes.get_mut(&id).unwrap();
                node.kv = KvStore::restore(&s.data).expect("leader's snapshot decodes");
                node.applied = s.meta.index;
                self.trace(|| format!("{id} installs snapshot at {}", s.meta.index));
            }
            for e in &rd.committed {
                self.apply(id, e);
            }
            let node = self.nodes.get_mut(&id).unwrap();
            node.waiting_reads.extend(rd.read_states.iter().map(|r| (r.ctx, r.index)));
            let raft = node.raft.as_mut().unwrap();
            raft.advance(&rd);
            if was_leader {
                self.stats.elections_won += 1;
                let term = self.raft(id).unwrap().term();
                self.trace(|| format!("{id} becomes leader in {term}"));
            }
            self.serve_reads(id);
            self.maybe_compact(id);
        }
        self.check(id);
    }

    fn apply(&mut self, id: NodeId, e: &Entry) {
        let term_now = self.raft(id).unwrap().term();
        if let Err(msg) = self.checker.on_apply(id, e, term_now) {
            self.fail(&msg);
        }
        let node = self.nodes.get_mut(&id).unwrap();
        if e.index <= node.applied {
            self.fail(&format!("{id} applies {} twice", e.index));
        }
        node.applied = e.index;
        let result = match &e.payload {
            EntryPayload::Normal(data) => {
                let cmd = KvCommand::decode(data).expect("sim commands decode");
                Some((cmd.client, cmd.seq, node.kv.apply(&cmd)))
            }
            _ => None,
        };
        // Answer the client whose proposal this is, or tell it the proposal was lost.
        for c in &mut self.clients {
            let Some(p) = &c.pending else { continue };
            let Some(Attempt::Proposal { node: n, index, term }) = &p.attempt else { continue };
            if *n != id || *index != e.index {
                continue;
            }
            match &result {
                Some((client, seq, r)) if *term == e.term && *client == c.id && *seq == p.cmd.seq => {
                    let output = match r {
                        KvResult::Value(v) => KvOutput::Value(v.clone()),
                        KvResult::Ok => KvOutput::Ok,
                    };
                    let h = p.history;
                    self.history[h].ret = Some(self.now_ms);
                    self.history[h].output = Some(output);
                    c.pending = None;
                    self.stats.ops_done += 1;
                }
                _ => {
                    // Another entry took the slot: the proposal was lost; retry at once.
                    let p = c.pending.as_mut().unwrap();
                    p.attempt = None;
                    p.deadline_ms = 0;
                }
            }
        }
    }

    fn serve_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        let applied = node.applied;
        let ready: Vec<u64> =
            node.waiting_reads.iter().filter(|(_, i)| *i <= applied).map(|(ctx, _)| *ctx).collect();
        node.waiting_reads.retain(|(_, i)| *i > applied);
        for ctx in ready {
            for c in &mut self.clients {
                let Some(p) = &c.pending else { continue };
                let Some(Attempt::Read { node: n, ctx: want, key }) = &p.attempt else { continue };
                if *n == id && *want == ctx {
                    let value = self.nodes[&id].kv.get(key);
                    let h = p.history;
                    self.history[h].ret = Some(self.now_ms);
                    self.history[h].output = Some(KvOutput::Value(value));
                    c.pending = None;
                    self.stats.ops_done += 1;
                }
            }
        }
    }

    fn maybe_compact(&mut self, id: NodeId) {
        let every = self.cfg.snapshot_every;
        let node = self.nodes.get_mut(&id).unwrap();
        let raft = node.raft.as_mut().unwrap();
        if every == 0 || node.applied.0 < raft.snapshot_meta().index.0 + every {
            return;
        }
        let data = bytes::Bytes::from(node.kv.snapshot());
        raft.compact(node.applied, data.clone()).expect("compact at applied");
        let meta = raft.snapshot_meta().clone();
        node.disk.entries.retain(|e| e.index > meta.index);
        node.disk.snapshot = Some(Snapshot { meta, data });
    }

    fn check(&mut self, id: NodeId) {
        let Some(raft) = self.nodes.get(&id).and_then(|n| n.raft.as_ref()) else { return };
        let others: Vec<&Raft> =
            self.nodes.iter().filter(|(o, _)| **o != id).filter_map(|(_, n)| n.raft.as_ref()).collect();
        if let Err(msg) = self.checker.check_node(raft, &others) {
            self.fail(&msg);
        }
    }

    pub(crate) fn fail(&self, msg: &str) -> ! {
        let tail: Vec<&String> =
            self.trace.iter().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
        let tail: String = tail.iter().map(|l| format!("  {l}\n")).collect();
        let nodes: String = self
            .nodes
            .iter()
            .map(|(id, n)| match &n.raft {
                Some(r) => {
                    let s = r.status();
                    format!(
                        "  {id}: {:?} {} leader={:?} log={}..{} commit={} applied={} voters={:?} learners={:?} peers={:?}\n",
                        s.role, s.term, s.leader, s.first_index, s.last_index, s.commit, n.applied,
                        s.conf.voters, s.conf.learners, s.peers.iter().map(|p| (p.id, p.matched, p.state)).collect::<Vec<_>>()
                    )
                }
                None => format!("  {id}: down\n"),
            })
            .collect();
        panic!(
            "raft simulation failed at {}ms (seed {}): {msg}\n{nodes}replay: RAFT_SIM_SEED={} RAFT_SIM_TRACE=1 cargo test -p raft sim::\n{}",
            self.now_ms, self.cfg.seed, self.cfg.seed, tail
        );
    }

    // ---- clients ----

    /// Proposes a raw command on `id` (for scenario tests); panics if it is not leader.
    pub(crate) fn propose_on(
        &mut self,
        id: NodeId,
        key: &str,
        value: &str,
    ) -> Result<crate::Proposed, ProposeError> {
        let cmd = KvCommand {
            client: 1_000_000,
            seq: self.next_ctx,
            op: KvOp::Put { key: key.into(), value: value.into() },
        };
        self.next_ctx += 1;
        let r = self.raft_mut(id).expect("node up").propose(bytes::Bytes::from(cmd.encode()));
        self.process_ready(id);
        r
    }

    /// Proposes a membership change on the current leader.
    pub(crate) fn conf_change(&mut self, change: ConfChange) -> Result<(), ProposeError> {
        let leader = self.leader().ok_or(ProposeError::NotLeader { leader: None })?;
        self.raft_mut(leader).unwrap().propose_conf_change(change)?;
        self.trace(|| format!("{leader} proposes {change:?}"));
        self.process_ready(leader);
        Ok(())
    }

    fn run_clients(&mut self) {
        for i in 0..self.clients.len() {
            self.run_client(i);
        }
    }

    fn run_client(&mut self, i: usize) {
        let now = self.now_ms;
        let c = &mut self.clients[i];
        if c.pending.is_none() {
            if now < c.next_op_ms {
                return;
            }
            let key = format!("k{}", self.rng.gen_range(0..self.cfg.keys));
            let seq = c.next_seq;
            c.next_seq += 1;
            let value = format!("c{}.{};", c.id, seq);
            let op = match self.rng.gen_range(0..10) {
                0..=3 => KvOp::Get { key },
                4..=6 => KvOp::Put { key, value },
                _ => KvOp::Append { key, value },
            };
            let input = match &op {
                KvOp::Get { key } => KvInput::Get { key: key.clone() },
                KvOp::Put { key, value } => KvInput::Put { key: key.clone(), value: value.clone() },
                KvOp::Append { key, value } => KvInput::Append { key: key.clone(), value: value.clone() },
            };
            self.history.push(Operation { client: c.id, input, call: now, ret: None, output: None });
            c.pending = Some(PendingOp {
                cmd: KvCommand { client: c.id, seq, op },
                history: self.history.len() - 1,
                attempt: None,
                deadline_ms: now,
            });
        }
        let c = &mut self.clients[i];
        let p = c.pending.as_mut().unwrap();
        if now < p.deadline_ms {
            return;
        }
        // (Re)try: the hinted leader, else a random node.
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let target = match c.leader_hint {
            Some(l) if self.rng.gen_bool(0.9) => l,
            _ => ids[self.rng.gen_range(0..ids.len())],
        };
        let use_read_index =
            matches!(p.cmd.op, KvOp::Get { .. }) && self.rng.gen_bool(self.cfg.read_index_share);
        let cmd = p.cmd.clone();
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let Some(raft) = self.nodes.get_mut(&target).and_then(|n| n.raft.as_mut()) else {
            let c = &mut self.clients[i];
            c.leader_hint = None;
            c.pending.as_mut().unwrap().deadline_ms = now + 20;
            c.pending.as_mut().unwrap().attempt = None;
            return;
        };
        let outcome = if use_read_index {
            let KvOp::Get { key } = &cmd.op else { unreachable!() };
            raft.read_index(ctx).map(|_| Attempt::Read { node: target, ctx, key: key.clone() })
        } else {
            raft.propose(bytes::Bytes::from(cmd.encode())).map(|p| Attempt::Proposal {
                node: target,
                index: p.index,
                term: p.term,
            })
        };
        let c = &mut self.clients[i];
        let p = c.pending.as_mut().unwrap();
        match outcome {
            Ok(attempt) => {
                c.leader_hint = Some(target);
                p.attempt = Some(attempt);
                p.deadline_ms = now + CLIENT_TIMEOUT_MS;
                self.process_ready(target);
            }
            Err(ProposeError::NotLeader { leader }) => {
                c.leader_hint = leader;
                p.attempt = None;
                p.deadline_ms = now + if leader.is_some() { 1 } else { 20 };
            }
            Err(_) => {
                p.attempt = None;
                p.deadline_ms = now + 20;
            }
        }
    }

    /// Lets every client finish its operation and stop issuing new ones.
    pub(crate) fn quiesce_clients(&mut self, limit_ms: u64) {
        for c in &mut self.clients {
            c.next_op_ms = u64::MAX;
        }
        let end = self.now_ms + limit_ms;
        while self.now_ms < end && self.clients.iter().any(|c| c.pending.is_some()) {
            self.step_ms();
        }
    }

    /// Checks the client history for linearizability.
    pub(crate) fn check_linearizable(&self) {
        match linearizability::check_kv(&self.history, std::time::Duration::from_secs(20)) {
            linearizability::CheckResult::Ok => {}
            linearizability::CheckResult::Illegal { key, detail } => {
                self.fail(&format!("history not linearizable on key {key}: {detail}"))
            }
            linearizability::CheckResult::Timeout { key } => {
                self.fail(&format!("linearizability check timed out on key {key}"))
            }
        }
    }

    /// Operations completed by clients.
    pub(crate) fn ops_completed(&self) -> usize {
        self.history.iter().filter(|o| o.ret.is_some()).count()
    }

    /// Heals the network, restarts every node, and waits until all nodes have applied the
    /// same commit index with identical state.
    pub(crate) fn converge(&mut self, limit_ms: u64) {
        self.heal();
        for id in self.ids() {
            self.restart(id);
        }
        self.run_until(limit_ms, "every node applies the same state", |s| {
            let Some(l) = s.leader() else { return false };
            let commit = s.raft(l).unwrap().commit_index();
            let members = s.raft(l).unwrap().conf().clone();
            let all = members
                .members()
                .all(|id| s.raft(id).is_some_and(|r| r.commit_index() == commit) && s.applied(id) == commit);
            all
        });
        let l = self.leader().unwrap();
        let members: Vec<NodeId> = self.raft(l).unwrap().conf().members().collect();
        for id in &members {
            if self.kv(*id) != self.kv(l) {
                self.fail(&format!("{id} and {l} applied the same index but hold different state"));
            }
        }
    }
}

fn short(body: &MessageBody) -> String {
    match body {
        MessageBody::Append { prev_index, prev_term, entries, commit } => format!(
            "Append prev={prev_index}@{prev_term} n={} last={:?} commit={commit}",
            entries.len(),
            entries.last().map(|e| e.index)
        ),
        MessageBody::Snapshot { meta, offset, data, done } => {
            format!("Snapshot {}@{} off={offset} len={} done={done}", meta.index, meta.term, data.len())
        }
        other => format!("{other:?}"),
    }
}
