//! The lock service of Frangipani (Thekkath, Mann, Lee, SOSP 1997 §6): named locks held
//! shared by many or exclusive by one, kept by a Raft-replicated state machine, with
//! leases, and a client library (the clerk) that caches locks until they are revoked.
//!
//! - [`table`]: the lock table. Modes, holders, FIFO waiters, upgrade and downgrade,
//!   revokes; pure logic.
//! - [`machine`]: the replicated state. Sessions with leases and log slots (0..255),
//!   time taken only from the leader's stamps, fencing tokens, and the recovery hand-off:
//!   an expired session's locks are freed only after a live session has recovered its log.
//! - [`service`]: the gRPC server on a Raft [`raft::Node`]; events (grants, revokes,
//!   recovery requests, lease loss) reach each session on one server-streaming call.
//! - [`clerk`]: the client library. Sticky locks, revoke and recovery callbacks into the
//!   file system, lease renewal, reconnection to a new leader; async and blocking calls.
//! - [`cluster`]: reaching the leader (addresses, redirects, retries).
//!
//! The state machine can be driven by hand, which is how its tests work:
//!
//! ```
//! use lockserver::machine::{Command, Event, LockState, Reply, Stamp};
//! use lockserver::table::{Acquired, Mode};
//!
//! let mut state = LockState::default();
//! let mut events = Vec::new();
//! let at = |now_ms| Stamp { clock: 1, now_ms };
//! let open = |nonce| Command::OpenSession { nonce, name: "host".into(), lease_ms: 1000, at: at(0) };
//! let Ok(Reply::Opened { session: a, slot, .. }) = state.apply(open(1), &mut events) else { panic!() };
//! let Ok(Reply::Opened { session: b, .. }) = state.apply(open(2), &mut events) else { panic!() };
//!
//! // A takes a lock; B's request queues and A is asked to give way.
//! let acquire = |session, mode| Command::Acquire { session, lock: "inode/1".into(), mode };
//! assert!(matches!(state.apply(acquire(a, Mode::Exclusive), &mut events), Ok(Reply::Acquired(Acquired::Granted { .. }))));
//! assert_eq!(state.apply(acquire(b, Mode::Shared), &mut events), Ok(Reply::Acquired(Acquired::Queued)));
//! assert!(matches!(events.last(), Some((s, Event::Revoke { wanted: Mode::Shared, .. })) if *s == a));
//!
//! // A stops renewing its lease: B is asked to recover A's log slot, and gets the lock
//! // only once it says it is done.
//! state.apply(Command::KeepAlive { session: b, at: at(900) }, &mut events).unwrap();
//! state.apply(Command::Tick { at: at(1000) }, &mut events).unwrap();
//! assert!(events.contains(&(b, Event::Recover { slot, dead: a })));
//! events.clear();
//! state.apply(Command::RecoveryDone { session: b, slot }, &mut events).unwrap();
//! assert!(matches!(&events[..], [(s, Event::Grant { mode: Mode::Shared, .. })] if *s == b));
//! ```
//!
//! A file system uses a [`Clerk`]:
//!
//! ```no_run
//! use lockserver::{Callbacks, Clerk, ClerkConfig, Mode, SessionId, Slot};
//! use std::sync::Arc;
//!
//! struct Fs;
//!
//! #[async_trait::async_trait]
//! impl Callbacks for Fs {
//!     async fn revoke(&self, lock: &str, wanted: Mode) -> Result<(), String> {
//!         // Write back what `lock` covers (log first); drop it unless `wanted` is shared.
//!         Ok(())
//!     }
//!     async fn recover(&self, slot: Slot, dead: SessionId) -> Result<(), String> {
//!         // Replay the log in `slot`.
//!         Ok(())
//!     }
//!     fn lease_lost(&self) {
//!         // Stop writing; fail every call until remounted.
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = lockserver::cluster::parse_cluster("1=127.0.0.1:7301,2=127.0.0.1:7302,3=127.0.0.1:7303")?;
//! let clerk = Clerk::connect(ClerkConfig::new(cluster, "host-a"), Arc::new(Fs)).await?;
//! println!("my log is in {}", clerk.slot());
//! {
//!     let guard = clerk.lock("inode/42", Mode::Exclusive).await?; // one RPC
//!     let _fencing = (guard.token(), clerk.lease_expiry()); // for writes to Petal
//! }
//! let _again = clerk.lock("inode/42", Mode::Exclusive).await?; // cached: no RPC
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod clerk;
pub mod cluster;
pub mod machine;
pub mod service;
pub mod table;

pub use clerk::{Callbacks, Clerk, ClerkConfig, ClerkError, LockGuard, NoCallbacks};
pub use machine::Slot;
pub use table::{Mode, SessionId, Token};
