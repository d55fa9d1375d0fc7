//! Messages between the nodes of one group.

use crate::types::{Entry, Index, NodeId, SnapshotMeta, Term};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One message from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The sender's term (for PreVote: the term it would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// Why a follower refused an append, and where the leader should look next
/// (the conflict term/index hint of Raft §5.3's optimisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectHint {
    /// The last index at which the follower's log may still match.
    pub index: Index,
    /// The follower's term at `index`.
    pub term: Term,
}

/// The kinds of message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// Would you vote for me in `term`? Changes nobody's term (PreVote, Raft thesis §9.6).
    PreVote {
        /// The candidate's last log index.
        last_index: Index,
        /// The candidate's last log term.
        last_term: Term,
    },
    /// Answer to `PreVote`.
    PreVoteResp {
        /// Whether the vote was refused.
        reject: bool,
    },
    /// RequestVote (Raft §5.2).
    Vote {
        /// The candidate's last log index.
        last_index: Index,
        /// The candidate's last log term.
        last_term: Term,
        /// Set when the election follows a leadership transfer: voters ignore their leader lease.
        transfer: bool,
    },
    /// Answer to `Vote`.
    VoteResp {
        /// Whether the vote was refused.
        reject: bool,
    },
    /// AppendEntries (Raft §5.3).
    Append {
        /// The index just before `entries`.
        prev_index: Index,
        /// The term of `prev_index`.
        prev_term: Term,
        /// Entries to store (possibly none).
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: Index,
    },
    /// Answer to `Append` (and to a completed snapshot install).
    AppendResp {
        /// On success, the follower's last index matching the leader; on refusal, the
        /// refused `prev_index`.
        index: Index,
        /// Set on refusal.
        reject: Option<RejectHint>,
    },
    /// The leader's heartbeat; `ctx` ties it to a ReadIndex round (0: none).
    Heartbeat {
        /// The commit index, capped at what the follower is known to hold.
        commit: Index,
        /// ReadIndex round.
        ctx: u64,
    },
    /// Answer to `Heartbeat`.
    HeartbeatResp {
        /// The heartbeat's `ctx`.
        ctx: u64,
    },
    /// One chunk of a snapshot (InstallSnapshot, Raft §7).
    Snapshot {
        /// Which snapshot.
        meta: SnapshotMeta,
        /// Where `data` starts in the snapshot's bytes.
        offset: u64,
        /// The chunk.
        data: Bytes,
        /// Whether this is the last chunk.
        done: bool,
    },
    /// Progress of a chunked install: the follower holds bytes `..next_offset` of the
    /// snapshot at `index`.
    SnapshotResp {
        /// The snapshot's index.
        index: Index,
        /// The first byte the follower still needs.
        next_offset: u64,
    },
    /// Start an election now (leadership transfer, Raft thesis §3.10).
    TimeoutNow,
}

impl MessageBody {
    /// A short name for logs and traces.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::PreVote { .. } => "PreVote",
            MessageBody::PreVoteResp { .. } => "PreVoteResp",
            MessageBody::Vote { .. } => "Vote",
            MessageBody::VoteResp { .. } => "VoteResp",
            MessageBody::Append { .. } => "Append",
            MessageBody::AppendResp { .. } => "AppendResp",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResp { .. } => "HeartbeatResp",
            MessageBody::Snapshot { .. } => "Snapshot",
            MessageBody::SnapshotResp { .. } => "SnapshotResp",
            MessageBody::TimeoutNow => "TimeoutNow",
        }
    }

    /// Bytes of entries or snapshot data the message carries.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            MessageBody::Append { entries, .. } => entries.iter().map(Entry::size_bytes).sum(),
            MessageBody::Snapshot { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}
