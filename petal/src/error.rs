//! The one error type of Petal, shared by the store, the state machine, the server and the
//! client, with a variant per kind of failure a caller may branch on. Each maps to a wire
//! [`Code`] and back, so a client sees the same variant the server produced.

use crate::proto::{Code, Outcome};
use serde::{Deserialize, Serialize};

/// Everything that can go wrong in a Petal request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PetalError {
    /// No virtual disk by that name.
    #[error("no disk named {0:?}")]
    NotFound(String),
    /// A disk by that name exists already.
    #[error("disk {0:?} exists")]
    Exists(String),
    /// The disk is a snapshot, which cannot be written.
    #[error("disk {0:?} is a read-only snapshot")]
    ReadOnly(String),
    /// Offset plus length lies past the end of the 2^64-byte address space, or an
    /// argument is empty where it may not be.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The request is longer than the service's bound on one read or write.
    #[error("{bytes} bytes is more than the {max_bytes}-byte bound on one request")]
    TooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// The bound.
        max_bytes: u64,
    },
    /// The writer's lease, less the safety margin, had expired when the write reached
    /// the group: it was not applied and never becomes visible.
    #[error("fenced: the writer's lease expired (lease expiry {lease_expiry_ms} ms, margin {margin_ms} ms)")]
    Fenced {
        /// The lease expiry the write carried (unix ms).
        lease_expiry_ms: u64,
        /// The margin the server subtracts.
        margin_ms: u64,
    },
    /// A malformed request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A block failed its checksum (or is known damaged) and no healthy copy was found.
    #[error("corrupt block: disk {disk:?} extent {extent} block {block} on replica {replica}: {detail}")]
    Corrupt {
        /// The virtual disk.
        disk: String,
        /// The 64 KiB extent of the disk.
        extent: u64,
        /// The 4 KiB block within the extent.
        block: u64,
        /// The replica (node id) whose copy is bad; 0 when not yet known.
        replica: u64,
        /// What the check found.
        detail: String,
    },
    /// This replica cannot serve: its store failed (e.g. a full data disk), or it has
    /// not caught up. Another replica may.
    #[error("replica unavailable: {0}")]
    Unavailable(String),
    /// The request id is below what the client said it was done with.
    #[error("stale request: client {client} seq {seq} is below {acked_below}")]
    Stale {
        /// The client.
        client: u64,
        /// The request's sequence number.
        seq: u64,
        /// What the client had acknowledged.
        acked_below: u64,
    },
    /// No replica gave an answer before the client's deadline.
    #[error("no answer within {0} ms (is a majority of replicas up?)")]
    Timeout(u64),
}

impl PetalError {
    /// The wire form of this error.
    pub fn to_outcome(&self) -> Outcome {
        let code = match self {
            PetalError::NotFound(_) => Code::NotFound,
            PetalError::Exists(_) => Code::Exists,
            PetalError::ReadOnly(_) => Code::ReadOnly,
            PetalError::OutOfRange(_) => Code::OutOfRange,
            PetalError::TooLarge { .. } => Code::TooLarge,
            PetalError::Fenced { .. } => Code::Fenced,
            PetalError::Invalid(_) => Code::Invalid,
            PetalError::Corrupt { .. } => Code::Corrupt,
            PetalError::Unavailable(_) => Code::Unavailable,
            PetalError::Stale { .. } => Code::Stale,
            PetalError::Timeout(_) => Code::Retry,
        };
        let error = crate::codec::encode(self);
        Outcome { code: code as i32, message: self.to_string(), leader: 0, error: error.into() }
    }

    /// The error a wire outcome stands for: `None` for OK and for the codes the client's
    /// retry loop handles itself (NOT_LEADER, RETRY).
    pub fn from_outcome(o: &Outcome) -> Option<PetalError> {
        match Code::try_from(o.code) {
            Ok(Code::Ok) | Ok(Code::NotLeader) | Ok(Code::Retry) => None,
            _ => Some(
                crate::codec::decode::<PetalError>(&o.error)
                    .unwrap_or_else(|_| PetalError::Invalid(o.message.clone())),
            ),
        }
    }
}
