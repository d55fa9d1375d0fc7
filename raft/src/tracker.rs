//! The leader's view of each follower: how far its log matches, and what is in flight.

use crate::types::{ConfState, Index, NodeId};
use std::collections::{BTreeMap, VecDeque};

/// How the leader is currently replicating to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Finding where the logs match: one Append at a time.
    Probe,
    /// Logs match: Appends are pipelined up to the inflight window.
    Replicate,
    /// Sending a snapshot; `next_offset` bytes of it are acknowledged.
    Snapshot {
        /// The snapshot's index.
        index: Index,
        /// Bytes the follower has acknowledged.
        next_offset: u64,
    },
}

/// A window of Append messages in flight to one follower, bounded in count and bytes.
#[derive(Debug)]
pub(crate) struct Inflights {
    /// (last index of the message, bytes), oldest first.
    queue: VecDeque<(Index, u64)>,
    bytes: u64,
    max_msgs: usize,
    max_bytes: u64,
}

impl Inflights {
    pub(crate) fn new(max_msgs: usize, max_bytes: u64) -> Inflights {
        Inflights { queue: VecDeque::new(), bytes: 0, max_msgs, max_bytes }
    }

    pub(crate) fn full(&self) -> bool {
        self.queue.len() >= self.max_msgs || self.bytes >= self.max_bytes
    }

    pub(crate) fn add(&mut self, last: Index, bytes: u64) {
        self.queue.push_back((last, bytes));
        self.bytes += bytes;
    }

    /// Frees every message whose last index is at or below `index`.
    pub(crate) fn free_to(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.queue.front() {
            if last > index {
                break;
            }
            self.queue.pop_front();
            self.bytes -= bytes;
        }
    }

    pub(crate) fn free_first(&mut self) {
        if let Some((_, bytes)) = self.queue.pop_front() {
            self.bytes -= bytes;
        }
    }

    pub(crate) fn reset(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }
}

/// The leader's record of one follower (etcd's `tracker.Progress`).
///
/// Invariant: `matched < next`.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) matched: Index,
    pub(crate) next: Index,
    pub(crate) state: ProgressState,
    /// In Probe: an Append is out and unanswered; wait for a reply or the next heartbeat.
    pub(crate) probe_sent: bool,
    /// Heard from since the last CheckQuorum round.
    pub(crate) recent_active: bool,
    pub(crate) inflights: Inflights,
    pub(crate) learner: bool,
}

impl Progress {
    pub(crate) fn new(next: Index, learner: bool, max_msgs: usize, max_bytes: u64) -> Progress {
        Progress {
            matched: Index(0),
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            recent_active: true,
            inflights: Inflights::new(max_msgs, max_bytes),
            learner,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        if let ProgressState::Snapshot { index, .. } = self.state {
            self.next = self.matched.max(index).next();
        } else {
            self.next = self.matched.next();
        }
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next = self.matched.next();
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub(crate) fn become_snapshot(&mut self, index: Index) {
        self.state = ProgressState::Snapshot { index, next_offset: 0 };
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Records a successful append up to `index`; returns whether it was news.
    pub(crate) fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.matched;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next = self.next.max(index.next());
        updated
    }

    /// Handles a refusal of the Append whose prev index was `rejected`, with `next_probe` the
    /// leader's guess of the last matching index; moves back to Probe. Returns false for a
    /// stale refusal.
    pub(crate) fn maybe_decr_to(&mut self, rejected: Index, next_probe: Index) -> bool {
        match self.state {
            // A refusal of something already matched is stale.
            ProgressState::Replicate if rejected <= self.matched => return false,
            // Probe: only the answer to the latest probe counts.
            ProgressState::Probe if self.next.prev() != rejected => return false,
            ProgressState::Snapshot { .. } => return false,
            _ => {}
        }
        self.state = ProgressState::Probe;
        self.inflights.reset();
        self.next = next_probe.min(rejected).next();
        // A follower whose log lost acknowledged entries (a corrupt tail cut at restart)
        // answers the current probe from below its old match: believe it and resend.
        // Lowering `matched` never un-commits anything; it only costs a resend.
        self.matched = self.matched.min(self.next.prev());
        self.probe_sent = false;
        true
    }

    /// Whether the leader should hold back Appends to this follower.
    pub(crate) fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot { .. } => true,
        }
    }
}

/// The configuration and every member's progress.
#[derive(Debug)]
pub(crate) struct ProgressTracker {
    pub(crate) conf: ConfState,
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    max_msgs: usize,
    max_bytes: u64,
}

impl ProgressTracker {
    pub(crate) fn new(conf: ConfState, max_msgs: usize, max_bytes: u64) -> ProgressTracker {
        let mut t =
            ProgressTracker { conf: ConfState::default(), progress: BTreeMap::new(), max_msgs, max_bytes };
        t.set_conf(conf, Index(1));
        t
    }

    /// Installs a configuration, keeping the progress of members that stay.
    pub(crate) fn set_conf(&mut self, conf: ConfState, next: Index) {
        self.progress.retain(|id, _| conf.contains(*id));
        for id in conf.members() {
            let learner = conf.learners.contains(&id);
            let (max_msgs, max_bytes) = (self.max_msgs, self.max_bytes);
            self.progress
                .entry(id)
                .and_modify(|p| p.learner = learner)
                .or_insert_with(|| Progress::new(next, learner, max_msgs, max_bytes));
        }
        self.conf = conf;
    }

    pub(crate) fn reset_all(&mut self, next: Index) {
        for p in self.progress.values_mut() {
            *p = Progress::new(next, p.learner, self.max_msgs, self.max_bytes);
        }
    }

    pub(crate) fn is_voter(&self, id: NodeId) -> bool {
        self.conf.voters.contains(&id)
    }

    pub(crate) fn quorum(&self) -> usize {
        self.conf.voters.len() / 2 + 1
    }

    /// The highest index a majority of voters hold (Raft §5.3/§5.4).
    pub(crate) fn committed_index(&self) -> Index {
        let mut matched: Vec<Index> =
            self.conf.voters.iter().map(|id| self.progress.get(id).map_or(Index(0), |p| p.matched)).collect();
        if matched.is_empty() {
            return Index(0);
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        matched[self.quorum() - 1]
    }

    /// Whether the voters in `yes` form a majority.
    pub(crate) fn has_quorum<'a>(&self, yes: impl IntoIterator<Item = &'a NodeId>) -> bool {
        yes.into_iter().filter(|id| self.is_voter(**id)).count() >= self.quorum()
    }
}
