//! Knobs of one Raft node.

use crate::types::NodeId;

/// Configuration of one node. Times are in ticks; the driver decides how long a tick is.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id (non-zero).
    pub id: NodeId,
    /// Ticks without hearing from a leader before campaigning; the actual timeout is
    /// drawn at random from `[election_ticks, 2 * election_ticks)` (Raft §5.2).
    pub election_ticks: u32,
    /// Ticks between a leader's heartbeats. Must be less than `election_ticks`.
    pub heartbeat_ticks: u32,
    /// Run a pre-election before bumping the term (Raft thesis §9.6).
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a majority within an election timeout,
    /// and voters ignore vote requests while they follow a live leader (Raft thesis §6.2).
    pub check_quorum: bool,
    /// Most entry bytes in one Append message.
    pub max_msg_bytes: u64,
    /// Most Append messages in flight to one follower (pipelining window).
    pub max_inflight_msgs: usize,
    /// Most entry bytes in flight to one follower.
    pub max_inflight_bytes: u64,
    /// Most entry bytes handed out for apply in one Ready.
    pub max_apply_bytes: u64,
    /// Size of one InstallSnapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// Largest snapshot a follower accepts (bounds memory taken by a peer).
    pub max_snapshot_bytes: u64,
    /// Most uncommitted entry bytes a leader accepts before refusing proposals.
    pub max_uncommitted_bytes: u64,
    /// Seed for the election-timeout randomness (the simulator passes its own).
    pub seed: u64,
}

impl Config {
    /// Defaults for node `id`.
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_ticks: 10,
            heartbeat_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            max_msg_bytes: 1 << 20,
            max_inflight_msgs: 256,
            max_inflight_bytes: 32 << 20,
            max_apply_bytes: 16 << 20,
            snapshot_chunk_bytes: 1 << 20,
            max_snapshot_bytes: 4 << 30,
            max_uncommitted_bytes: 256 << 20,
            seed: id.0,
        }
    }

    /// Checks the knobs against each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.0 == 0 {
            return Err("node id 0 is reserved".into());
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks {
            return Err("heartbeat_ticks must be in 1..election_ticks".into());
        }
        if self.max_inflight_msgs == 0 || self.max_msg_bytes == 0 || self.snapshot_chunk_bytes == 0 {
            return Err("message and window bounds must be positive".into());
        }
        Ok(())
    }
}
