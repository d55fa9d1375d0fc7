//! The protocol's nouns: ids, terms, indexes, log entries, configurations, snapshots.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A node's id within one Raft group. Zero is never a valid id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// A Raft term (Raft §5.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Term(pub u64);

/// A position in the replicated log; the first entry has index 1, and 0 means "before the log".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Index(pub u64);

impl Index {
    /// The next index.
    pub fn next(self) -> Index {
        Index(self.0 + 1)
    }

    /// The previous index (saturating at 0).
    pub fn prev(self) -> Index {
        Index(self.0.saturating_sub(1))
    }
}

impl Term {
    /// The next term.
    pub fn next(self) -> Term {
        Term(self.0 + 1)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

/// The members of a group: voters decide elections and commits; learners only receive the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfState {
    /// Nodes that vote and count towards quorums.
    pub voters: BTreeSet<NodeId>,
    /// Nodes that receive the log but do not vote.
    pub learners: BTreeSet<NodeId>,
}

impl ConfState {
    /// A configuration of the given voters and no learners.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> ConfState {
        ConfState { voters: voters.into_iter().collect(), learners: BTreeSet::new() }
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Every member, voters first.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// Applies a single-server change, returning the new configuration or why it is refused.
    pub fn changed(&self, change: ConfChange) -> Result<ConfState, String> {
        let mut next = self.clone();
        match change {
            ConfChange::AddLearner(id) => {
                if self.contains(id) {
                    return Err(format!("{id} is already a member"));
                }
                next.learners.insert(id);
            }
            ConfChange::Promote(id) => {
                if !next.learners.remove(&id) {
                    return Err(format!("{id} is not a learner"));
                }
                next.voters.insert(id);
            }
            ConfChange::Remove(id) => {
                if !next.voters.remove(&id) && !next.learners.remove(&id) {
                    return Err(format!("{id} is not a member"));
                }
                if next.voters.is_empty() {
                    return Err("cannot remove the last voter".to_string());
                }
            }
        }
        Ok(next)
    }
}

/// A single-server membership change (Raft thesis §4.1), with learners (§4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChange {
    /// Add a node that receives the log but does not vote.
    AddLearner(NodeId),
    /// Make a learner a voter.
    Promote(NodeId),
    /// Remove a voter or learner.
    Remove(NodeId),
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// The empty entry a new leader appends to commit entries of earlier terms (Raft §5.4.2).
    Noop,
    /// An application command.
    Normal(Bytes),
    /// The group's configuration from this entry on (takes effect when applied).
    Config(ConfState),
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The leader's term when the entry was created.
    pub term: Term,
    /// The entry's position.
    pub index: Index,
    /// The entry's content.
    pub payload: EntryPayload,
}

impl Entry {
    /// Bytes the entry costs in a message or batch (payload plus a fixed header).
    pub fn size_bytes(&self) -> u64 {
        let payload = match &self.payload {
            EntryPayload::Noop => 0,
            EntryPayload::Normal(data) => data.len(),
            EntryPayload::Config(conf) => 8 * (conf.voters.len() + conf.learners.len()),
        };
        payload as u64 + 24
    }
}

/// The state every node must persist before answering messages (Raft Figure 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// Who this node voted for in `term`.
    pub vote: Option<NodeId>,
    /// The highest index known committed (saves replay work at restart; not needed for safety).
    pub commit: Index,
}

/// Where a snapshot ends and the configuration in force there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The last index the snapshot covers.
    pub index: Index,
    /// The term of that entry.
    pub term: Term,
    /// The configuration as of `index`.
    pub conf: ConfState,
}

/// A state machine snapshot: its position and the application's bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Position and configuration.
    pub meta: SnapshotMeta,
    /// The application's serialized state.
    pub data: Bytes,
}
