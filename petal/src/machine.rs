//! The replicated state machine: commands through the Raft log, applied to the
//! [`Store`] in log order on every replica.
//!
//! - **Request ids.** A command carries (client, seq) and the lowest seq its client still
//!   waits for. The machine remembers each client's answers from that seq on, so a
//!   command retried after a leader change is applied once and answered as the first
//!   time. A client idle for [`SESSION_IDLE_MS`] (by the leaders' clocks stamped in the
//!   commands) is forgotten.
//! - **Fencing.** A write or decommit may carry its writer's lease deadline (lease
//!   expiry less the margin, computed by the leader that took the request). The leader
//!   stamps each command with its wall clock when proposing; apply refuses with
//!   [`PetalError::Fenced`] when the stamp is at or past the deadline. Both numbers are
//!   in the command, so every replica decides alike.
//! - **Snapshots** (Raft's, for log compaction) are small manifests: [`Store::persist`]
//!   makes the store durable and returns its maps (disks, extents, sessions); a replica
//!   that installs one fetches the extents from a peer through an [`ExtentSource`],
//!   exactly as of the manifest's index from the replica that made it (which pins them
//!   until its next persist), or else as they are now (a fuzzy snapshot: the entries
//!   after the manifest are overwrites and replay over them).

use crate::codec;
use crate::error::PetalError;
use crate::store::{ExtentContent, Store};
use raft::{Index, StateMachine};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A client idle this long (by the stamps of later commands) loses its session.
pub const SESSION_IDLE_MS: u64 = 60 * 60 * 1000;
/// Most answers kept per client (its requests in flight at once).
pub const REPLIES_PER_CLIENT_MAX: usize = 4096;
/// Most clients remembered; past it, the one idle longest is forgotten.
pub const SESSIONS_MAX: usize = 100_000;

/// What a command does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create an empty disk.
    Create {
        /// Its name.
        disk: String,
    },
    /// Delete a disk.
    Delete {
        /// Its name.
        disk: String,
    },
    /// Write bytes.
    Write {
        /// The disk.
        disk: String,
        /// Where.
        offset: u64,
        /// What.
        data: bytes::Bytes,
        /// Refuse unless `stamp_ms` is before this (lease expiry less the margin).
        fence: Option<Fence>,
    },
    /// Decommit a range (it reads as zeros, its space is freed).
    Decommit {
        /// The disk.
        disk: String,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// As for writes.
        fence: Option<Fence>,
    },
    /// Take a read-only copy-on-write snapshot.
    Snapshot {
        /// The disk.
        disk: String,
        /// The snapshot's name.
        name: String,
    },
}

/// A writer's lease, as the leader judged it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The lease expiry the client sent (unix ms).
    pub lease_expiry_ms: u64,
    /// The margin the leader subtracted.
    pub margin_ms: u64,
}

impl Fence {
    /// Whether a command stamped at `stamp_ms` comes too late.
    pub fn expired_at(&self, stamp_ms: u64) -> bool {
        stamp_ms.saturating_add(self.margin_ms) >= self.lease_expiry_ms
    }

    fn error(&self) -> PetalError {
        PetalError::Fenced { lease_expiry_ms: self.lease_expiry_ms, margin_ms: self.margin_ms }
    }
}

/// A command as it travels through the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The issuing client; 0 = anonymous (no duplicate detection).
    pub client: u64,
    /// The client's sequence number; a retry reuses it.
    pub seq: u64,
    /// The client has all answers below this seq.
    pub acked_below: u64,
    /// The proposing leader's wall clock (unix ms).
    pub stamp_ms: u64,
    /// What to do.
    pub op: Op,
}

impl Command {
    /// Serializes the command for a log entry.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Parses a log entry's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        codec::decode(bytes)
    }
}

/// The answer to a command.
pub type Reply = Result<(), PetalError>;

/// One client's remembered answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    acked_below: u64,
    replies: BTreeMap<u64, Reply>,
    last_ms: u64,
}

/// Every client's session. Part of the replicated state (persisted with the store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    clients: BTreeMap<u64, Session>,
}

impl Sessions {
    /// The remembered answer for (client, seq), if the command was applied before.
    fn lookup(&mut self, cmd: &Command) -> Option<Reply> {
        if cmd.client == 0 {
            return None;
        }
        if !self.clients.contains_key(&cmd.client) && self.clients.len() >= SESSIONS_MAX {
            // Deterministic on every replica: the smallest (last active, client id).
            let idle = self.clients.iter().min_by_key(|(id, s)| (s.last_ms, **id)).map(|(id, _)| *id);
            if let Some(id) = idle {
                self.clients.remove(&id);
            }
        }
        let s = self.clients.entry(cmd.client).or_default();
        s.last_ms = s.last_ms.max(cmd.stamp_ms);
        if cmd.acked_below > s.acked_below {
            s.acked_below = cmd.acked_below;
            s.replies = s.replies.split_off(&cmd.acked_below);
        }
        if cmd.seq < s.acked_below {
            return Some(Err(PetalError::Stale {
                client: cmd.client,
                seq: cmd.seq,
                acked_below: s.acked_below,
            }));
        }
        s.replies.get(&cmd.seq).cloned()
    }

    fn record(&mut self, cmd: &Command, reply: &Reply) {
        if cmd.client == 0 {
            return;
        }
        let s = self.clients.entry(cmd.client).or_default();
        s.replies.insert(cmd.seq, reply.clone());
        while s.replies.len() > REPLIES_PER_CLIENT_MAX {
            s.replies.pop_first();
        }
    }

    /// Forgets clients idle since before `now_ms - SESSION_IDLE_MS`.
    fn expire(&mut self, now_ms: u64) {
        self.clients.retain(|_, s| s.last_ms + SESSION_IDLE_MS >= now_ms);
    }

    /// Number of clients remembered.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is remembered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// Where a replica installing a snapshot gets extents: another replica that has applied
/// at least `min_index`. For each (disk, extent): `None` if the peer has no such disk,
/// else its contents. Called inside the Raft driver, so it blocks.
pub trait ExtentSource: Send + 'static {
    /// Fetches a batch of extents.
    fn fetch(&self, min_index: u64, extents: &[(String, u64)]) -> Result<Vec<Option<ExtentContent>>, String>;
}

/// Counters the machine keeps for the status page.
#[derive(Debug, Default)]
pub struct MachineStats {
    /// Writes and decommits refused by fencing at apply.
    pub fenced: AtomicU64,
}

/// The state machine of one replica: the store (shared with the server's readers), the
/// sessions, and where to fetch extents from.
pub struct PetalMachine {
    store: Arc<RwLock<Store>>,
    sessions: Sessions,
    source: Box<dyn ExtentSource>,
    stats: Arc<MachineStats>,
}

/// Apply checks for idle sessions every this many entries.
const EXPIRE_EVERY_ENTRIES: u64 = 1024;

impl PetalMachine {
    /// A machine over `store` (its sessions are read from the store's persisted state).
    pub fn new(store: Arc<RwLock<Store>>, source: Box<dyn ExtentSource>) -> Result<PetalMachine, PetalError> {
        let app = read(&store).app_state().to_vec();
        let sessions = if app.is_empty() {
            Sessions::default()
        } else {
            codec::decode(&app).map_err(|e| PetalError::Invalid(format!("bad sessions in store: {e}")))?
        };
        Ok(PetalMachine { store, sessions, source, stats: Arc::default() })
    }

    /// The machine's counters (shared).
    pub fn stats(&self) -> Arc<MachineStats> {
        self.stats.clone()
    }

    /// The store (shared with readers).
    pub fn store(&self) -> &Arc<RwLock<Store>> {
        &self.store
    }

    /// Applies one command (also used by tests that drive the machine without Raft).
    pub fn apply_command(&mut self, index: u64, cmd: &Command) -> Reply {
        if let Some(reply) = self.sessions.lookup(cmd) {
            write(&self.store).set_applied(index);
            return reply;
        }
        let mut store = write(&self.store);
        let reply = match &cmd.op {
            Op::Create { disk } => store.create(disk, index),
            Op::Delete { disk } => store.delete(disk),
            Op::Snapshot { disk, name } => store.snapshot(disk, name, index),
            Op::Write { fence: Some(f), .. } | Op::Decommit { fence: Some(f), .. }
                if f.expired_at(cmd.stamp_ms) =>
            {
                self.stats.fenced.fetch_add(1, Relaxed);
                Err(f.error())
            }
            Op::Write { disk, offset, data, .. } => store.write(disk, *offset, data, index),
            Op::Decommit { disk, offset, len, .. } => store.decommit(disk, *offset, *len, index),
        };
        store.set_applied(index);
        drop(store);
        // A failed store did nothing: the answer must not be remembered as if it had.
        if !matches!(reply, Err(PetalError::Unavailable(_))) {
            self.sessions.record(cmd, &reply);
        }
        if index.is_multiple_of(EXPIRE_EVERY_ENTRIES) {
            self.sessions.expire(cmd.stamp_ms);
        }
        reply
    }
}

fn read(store: &RwLock<Store>) -> RwLockReadGuard<'_, Store> {
    store.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(store: &RwLock<Store>) -> RwLockWriteGuard<'_, Store> {
    store.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StateMachine for PetalMachine {
    fn apply(&mut self, index: Index, command: &[u8]) -> Vec<u8> {
        let reply = match Command::decode(command) {
            Ok(cmd) => self.apply_command(index.0, &cmd),
            Err(e) => {
                // Committed garbage cannot be refused any more; every replica skips it alike.
                tracing::warn!(%index, "skipping undecodable command: {e}");
                write(&self.store).set_applied(index.0);
                Err(PetalError::Invalid(e))
            }
        };
        codec::encode(&reply)
    }

    fn snapshot(&self) -> Vec<u8> {
        let app = codec::encode(&self.sessions);
        match write(&self.store).persist(app) {
            Ok(manifest) => manifest,
            // The store failed (a full or broken data disk) and holds less than the log
            // says was applied. Compacting the log now would lose those entries on this
            // replica, so its Raft node stops here instead (fail-stop); restarted with a
            // working disk, it replays them from its log.
            Err(e) => panic!("petal store cannot persist, stopping this replica's Raft node: {e}"),
        }
    }

    fn restore(&mut self, index: Index, snapshot: &[u8]) -> Result<(), String> {
        let at = Store::manifest_index(snapshot).map_err(|e| e.to_string())?;
        let dir = {
            let mut store = write(&self.store);
            if at == store.applied() && store.failed().is_none() && store.stats().damaged_blocks == 0 {
                // Already at the manifest's state: a restart after a compaction whose last
                // entries carried no command, or this replica's own snapshot.
                store.set_applied(index.0);
                return Ok(());
            }
            store.dir().to_path_buf()
        };
        // Fetch without holding the store, so that readers (and the peers' calls) go on.
        let source = &self.source;
        let mut fetch = |min_index: u64, extents: &[(String, u64)]| source.fetch(min_index, extents);
        let prepared =
            Store::prepare_install(&dir, snapshot, index.0, &mut fetch).map_err(|e| e.to_string())?;
        let mut store = write(&self.store);
        store.finish_install(prepared).map_err(|e| e.to_string())?;
        let app = store.app_state().to_vec();
        drop(store);
        self.sessions = if app.is_empty() { Sessions::default() } else { codec::decode(&app)? };
        Ok(())
    }

    fn applied_index(&self) -> Index {
        Index(read(&self.store).persisted())
    }
}
