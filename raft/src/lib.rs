//! Raft consensus (Ongaro & Ousterhout, 2014; Ongaro's thesis), in three layers:
//!
//! - [`Raft`]: the protocol core. A plain struct with no clock, thread, socket or file:
//!   feed it [`Raft::tick`], [`Raft::step`], [`Raft::propose`], [`Raft::read_index`] and
//!   take back a [`Ready`] batch of entries and hard state to persist, messages to send and
//!   committed entries to apply. The same inputs always give the same outputs, which is
//!   what lets the simulator in `sim` test it under seeded faults.
//! - `driver`: runs a core on tokio, persisting each batch with fsync before sending the
//!   messages that depend on it, and applying committed entries to a [`StateMachine`].
//! - `transport`: the tonic (gRPC) transport between nodes.
//!
//! ```
//! use raft::{Config, ConfState, NodeId, Raft, Restored};
//!
//! // A group of one elects itself after an election timeout.
//! let conf = ConfState::with_voters([NodeId(1)]);
//! let mut node = Raft::new(Config::new(NodeId(1)), Restored::bootstrap(conf)).unwrap();
//! let rd = node.ready(); // the bootstrap entry, committed: persist and apply it
//! node.advance(&rd);
//! for _ in 0..20 {
//!     node.tick();
//! }
//! assert_eq!(node.role(), raft::Role::Leader);
//! ```
#![deny(missing_docs)]

pub mod cluster;
mod config;
mod disk;
pub mod driver;
pub mod group;
pub mod kv;
pub mod kv_service;
mod log;
pub mod logging;
mod message;
mod raft;
mod tracker;
pub mod transport;
mod types;
mod writer;

#[cfg(test)]
mod sim;

pub use crate::config::Config;
pub use crate::disk::{DiskError, Loaded, NodeDisk};
pub use crate::driver::{ClientError, Node, NodeConfig, NodeState, StateMachine, Wiring};
pub use crate::message::{Message, MessageBody, RejectHint};
pub use crate::raft::{
    PeerStatus, ProposeError, Proposed, Raft, ReadState, Ready, Restored, Role, SoftState, Status, StepError,
};
pub use crate::tracker::ProgressState;
pub use crate::types::{
    ConfChange, ConfState, Entry, EntryPayload, HardState, Index, NodeId, Snapshot, SnapshotMeta, Term,
};
