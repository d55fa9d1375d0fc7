//! The replicated state: sessions with leases and log slots, the lock table, and the
//! recovery hand-off. Deterministic: [`LockState::apply`] depends on nothing but the
//! state and the command, so every replica computes the same thing.
//!
//! # Time
//!
//! The machine has no clock. The leader stamps the commands that involve time (ticks,
//! session opens, keepalives) with a [`Stamp`]: its own monotonic clock, named by a
//! random id drawn each time it takes office. The machine reads time only from stamps,
//! and compares stamps only of the same clock:
//!
//! - A stamp from a different clock than the last one starts an epoch: the machine takes
//!   that stamp as "now" and renews every live session's lease from it. So a new leader
//!   (or the same node elected again) gives every session a fresh lease period before it
//!   can expire any, whatever the offset between its clock and the old leader's. An epoch
//!   change only ever lengthens leases.
//! - Within an epoch, time only moves forward, and a session expires when
//!   `now >= renewed + lease`.
//!
//! This is safe for the clerk, which counts its lease from the moment it *sent* its last
//! successful keepalive: the stamp of that keepalive (or of the epoch start that replaced
//! it) was taken later, so the clerk always gives up before the machine can expire it.
//! A deposed leader's stamps cannot be applied after its successor's: in a Raft log, all
//! entries of an older term come before the entries of a newer one.
//!
//! # Recovery
//!
//! An expired session keeps its locks and its log slot. The machine asks a live session
//! to recover the slot ([`Event::Recover`]); only when that session reports
//! [`Command::RecoveryDone`] are the dead session's locks released and its slot freed. If
//! the recovering session dies too, another is asked; with no live session the recovery
//! waits for the next one to open.

use crate::table::{Acquired, Effect, Limits, LockTable, Mode, SessionId, TableError, Token};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Number of log slots, and so the most sessions (live or awaiting recovery) at once.
pub const SLOTS: usize = 256;

/// A log slot: where a client keeps its write-ahead log on the shared disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot(pub u8);

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

/// A reading of the proposing leader's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Which clock: drawn at random when the leader's process starts.
    pub clock: u64,
    /// Milliseconds on that clock.
    pub now_ms: u64,
}

/// A command in the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Time passes; sessions whose lease ran out expire.
    Tick {
        /// The leader's clock.
        at: Stamp,
    },
    /// Opens a session with a lease of `lease_ms`.
    OpenSession {
        /// The client's random nonce; a retry with the same nonce gets the same session.
        nonce: u64,
        /// For status output.
        name: String,
        /// The lease length.
        lease_ms: u64,
        /// The leader's clock.
        at: Stamp,
    },
    /// Renews a session's lease.
    KeepAlive {
        /// Whose.
        session: SessionId,
        /// The leader's clock.
        at: Stamp,
    },
    /// Releases everything a live session holds and frees its slot.
    CloseSession {
        /// Whose.
        session: SessionId,
    },
    /// Asks for a lock.
    Acquire {
        /// Who.
        session: SessionId,
        /// Which lock.
        lock: String,
        /// In what mode.
        mode: Mode,
    },
    /// Gives up the hold granted under `token` (a no-op for any other token).
    Release {
        /// Who.
        session: SessionId,
        /// Which lock.
        lock: String,
        /// The grant given up.
        token: Token,
    },
    /// Turns the exclusive hold granted under `token` into a shared one.
    Downgrade {
        /// Who.
        session: SessionId,
        /// Which lock.
        lock: String,
        /// The grant downgraded.
        token: Token,
    },
    /// The dead session's log in `slot` has been replayed.
    RecoveryDone {
        /// The recovering session.
        session: SessionId,
        /// The slot it was asked to recover.
        slot: Slot,
    },
}

/// Most bytes a command or snapshot may decode from (guards against hostile lengths).
const DECODE_LIMIT_BYTES: u64 = 1 << 30;

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(DECODE_LIMIT_BYTES)
}

/// Serializes a value for the log or a snapshot.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    use bincode::Options;
    codec().serialize(value).expect("in-memory values serialize")
}

/// Parses a value from the log or a snapshot.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    use bincode::Options;
    codec().deserialize(bytes).map_err(|e| e.to_string())
}

impl Command {
    /// Serializes the command for a log entry.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Parses a log entry's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        decode(bytes).map_err(|e| format!("bad lock command: {e}"))
    }
}

/// A successful command's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The session opened (or was already open under this nonce).
    Opened {
        /// Its id.
        session: SessionId,
        /// Its log slot.
        slot: Slot,
        /// Its lease length.
        lease_ms: u64,
    },
    /// The lease was renewed.
    Renewed {
        /// The lease length.
        lease_ms: u64,
    },
    /// An acquire's outcome.
    Acquired(Acquired),
    /// Done.
    Done,
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MachineError {
    /// Every log slot is taken by a live session or one awaiting recovery.
    #[error("all {SLOTS} log slots are taken")]
    NoFreeSlot,
    /// No such session: it never existed, closed, or expired and was recovered.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// The session's lease has expired.
    #[error("the lease of session {0} has expired")]
    Expired(SessionId),
    /// The lock table refused.
    #[error(transparent)]
    Table(#[from] TableError),
    /// Recovery reported for a slot the session was not asked to recover.
    #[error("session {session} was not asked to recover {slot}")]
    NotAssigned {
        /// Who reported.
        session: SessionId,
        /// The slot.
        slot: Slot,
    },
    /// The command could not be decoded.
    #[error("bad command: {0}")]
    BadCommand(String),
}

/// What a command returns.
pub type Answer = Result<Reply, MachineError>;

/// Something one session must hear about, pushed on its event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The session now holds `lock` in `mode`.
    Grant {
        /// Which lock.
        lock: String,
        /// The mode held.
        mode: Mode,
        /// The grant's fencing token.
        token: Token,
    },
    /// The session should give way on `lock` to a waiter that wants `wanted`.
    Revoke {
        /// Which lock.
        lock: String,
        /// The mode wanted.
        wanted: Mode,
        /// The token of the hold to give way on.
        token: Token,
    },
    /// The session should replay the log in `slot`, left by `dead`, then report done.
    Recover {
        /// The slot.
        slot: Slot,
        /// Whose log it is.
        dead: SessionId,
    },
    /// The session's lease has expired.
    LeaseLost,
}

/// One client session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// Its log slot; taken until the session closes or its log is recovered.
    pub slot: Slot,
    /// For status output.
    pub name: String,
    /// The nonce it was opened with.
    pub nonce: u64,
    /// Lease length.
    pub lease_ms: u64,
    /// When the lease was last renewed, on the current epoch's clock.
    pub renewed_ms: u64,
    /// Whether the lease has run out (then the session awaits recovery).
    pub expired: bool,
}

/// A dead session's log waiting to be recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// Whose log.
    pub dead: SessionId,
    /// The live session asked to recover it, if any.
    pub by: Option<SessionId>,
}

/// Everything one session holds and is asked to do: sent first on each subscription, so
/// a client that missed events (a new leader, a broken stream) catches up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionView {
    /// Locks held: name, mode, token.
    pub holds: Vec<(String, Mode, Token)>,
    /// Holds the session is asked to give way on: name, wanted mode, the hold's token.
    pub revokes: Vec<(String, Mode, Token)>,
    /// Slots the session is asked to recover, with the dead session.
    pub recoveries: Vec<(Slot, SessionId)>,
}

/// One session as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    /// The session.
    pub session: Session,
    /// Lease left on the machine's clock (0 once expired).
    pub lease_left_ms: u64,
    /// Locks held.
    pub holds: Vec<(String, Mode, Token)>,
    /// Locks waited for.
    pub waiting: Vec<(String, Mode)>,
}

/// The whole service as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Every session.
    pub sessions: Vec<SessionStatus>,
    /// Pending recoveries by slot.
    pub recoveries: Vec<(Slot, Recovery)>,
    /// Number of locks held or waited for.
    pub locks: usize,
    /// The last fencing token handed out.
    pub last_token: Token,
}

/// The replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    table: LockTable,
    /// Live sessions and expired ones awaiting recovery.
    sessions: BTreeMap<SessionId, Session>,
    /// Invariant: exactly the slots of `sessions`.
    slots: BTreeMap<Slot, SessionId>,
    /// Invariant: one per expired session, by its slot; `by` is a live session.
    recoveries: BTreeMap<Slot, Recovery>,
    last_session: SessionId,
    /// The clock of the current epoch (None before the first stamp).
    clock: Option<u64>,
    /// Now, on the current epoch's clock. Invariant: never decreases within an epoch.
    now_ms: u64,
}

impl Default for LockState {
    fn default() -> LockState {
        LockState::new(Limits::default())
    }
}

impl LockState {
    /// An empty state with these lock table bounds.
    pub fn new(limits: Limits) -> LockState {
        LockState {
            table: LockTable::new(limits),
            sessions: BTreeMap::new(),
            slots: BTreeMap::new(),
            recoveries: BTreeMap::new(),
            last_session: SessionId(0),
            clock: None,
            now_ms: 0,
        }
    }

    /// Applies one command; events for sessions are appended to `events`.
    pub fn apply(&mut self, cmd: Command, events: &mut Vec<(SessionId, Event)>) -> Answer {
        let answer = match cmd {
            Command::Tick { at } => {
                self.observe(at, events);
                Ok(Reply::Done)
            }
            Command::OpenSession { nonce, name, lease_ms, at } => {
                self.observe(at, events);
                self.open(nonce, name, lease_ms, events)
            }
            Command::KeepAlive { session, at } => {
                self.observe(at, events);
                let now = self.now_ms;
                let s = self.live(session)?;
                s.renewed_ms = s.renewed_ms.max(now);
                Ok(Reply::Renewed { lease_ms: s.lease_ms })
            }
            Command::CloseSession { session } => self.close(session, events),
            Command::Acquire { session, lock, mode } => {
                self.live(session)?;
                let mut effects = Vec::new();
                let r = self.table.acquire(session, &lock, mode, &mut effects);
                self.deliver(effects, events);
                Ok(Reply::Acquired(r?))
            }
            Command::Release { session, lock, token } => {
                self.live(session)?;
                let mut effects = Vec::new();
                self.table.release(session, &lock, token, &mut effects);
                self.deliver(effects, events);
                Ok(Reply::Done)
            }
            Command::Downgrade { session, lock, token } => {
                self.live(session)?;
                let mut effects = Vec::new();
                self.table.downgrade(session, &lock, token, &mut effects);
                self.deliver(effects, events);
                Ok(Reply::Done)
            }
            Command::RecoveryDone { session, slot } => self.recovery_done(session, slot, events),
        };
        #[cfg(debug_assertions)]
        self.check_invariants();
        answer
    }

    /// The live session `id`, or why it is not.
    fn live(&mut self, id: SessionId) -> Result<&mut Session, MachineError> {
        match self.sessions.get_mut(&id) {
            None => Err(MachineError::UnknownSession(id)),
            Some(s) if s.expired => Err(MachineError::Expired(id)),
            Some(s) => Ok(s),
        }
    }

    /// Reads the time from a stamp: a new clock starts an epoch that renews every lease;
    /// then sessions whose lease has run out expire.
    fn observe(&mut self, at: Stamp, events: &mut Vec<(SessionId, Event)>) {
        if self.clock != Some(at.clock) {
            self.clock = Some(at.clock);
            self.now_ms = at.now_ms;
            for s in self.sessions.values_mut().filter(|s| !s.expired) {
                s.renewed_ms = at.now_ms;
            }
            return;
        }
        self.now_ms = self.now_ms.max(at.now_ms);
        let now = self.now_ms;
        let expiring: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.expired && now >= s.renewed_ms.saturating_add(s.lease_ms))
            .map(|s| s.id)
            .collect();
        if expiring.is_empty() {
            return;
        }
        for id in expiring {
            let s = self.sessions.get_mut(&id).expect("listed");
            s.expired = true;
            let slot = s.slot;
            tracing::info!(session = %id, %slot, "lease expired; locks kept until the slot is recovered");
            events.push((id, Event::LeaseLost));
            // Its requests die with it; its holds stay until its log is recovered.
            let mut effects = Vec::new();
            self.table.cancel_waits(id, &mut effects);
            self.deliver(effects, events);
            self.recoveries.insert(slot, Recovery { dead: id, by: None });
            for r in self.recoveries.values_mut().filter(|r| r.by == Some(id)) {
                r.by = None;
            }
        }
        self.assign_recoveries(events);
    }

    fn open(
        &mut self,
        nonce: u64,
        name: String,
        lease_ms: u64,
        events: &mut Vec<(SessionId, Event)>,
    ) -> Answer {
        if let Some(s) = self.sessions.values().find(|s| s.nonce == nonce) {
            if s.expired {
                return Err(MachineError::Expired(s.id));
            }
            return Ok(Reply::Opened { session: s.id, slot: s.slot, lease_ms: s.lease_ms });
        }
        let slot = (0..SLOTS)
            .map(|i| Slot(i as u8))
            .find(|slot| !self.slots.contains_key(slot))
            .ok_or(MachineError::NoFreeSlot)?;
        self.last_session = SessionId(self.last_session.0 + 1);
        let id = self.last_session;
        let session = Session { id, slot, name, nonce, lease_ms, renewed_ms: self.now_ms, expired: false };
        self.sessions.insert(id, session);
        self.slots.insert(slot, id);
        self.assign_recoveries(events);
        Ok(Reply::Opened { session: id, slot, lease_ms })
    }

    fn close(&mut self, session: SessionId, events: &mut Vec<(SessionId, Event)>) -> Answer {
        match self.live(session) {
            Ok(_) => {}
            // A retried close whose first try went through.
            Err(MachineError::UnknownSession(_)) => return Ok(Reply::Done),
            Err(e) => return Err(e),
        }
        self.remove(session, events);
        for r in self.recoveries.values_mut().filter(|r| r.by == Some(session)) {
            r.by = None;
        }
        self.assign_recoveries(events);
        Ok(Reply::Done)
    }

    fn recovery_done(
        &mut self,
        session: SessionId,
        slot: Slot,
        events: &mut Vec<(SessionId, Event)>,
    ) -> Answer {
        self.live(session)?;
        let Some(r) = self.recoveries.get(&slot).copied() else {
            // A retried report whose first try went through.
            return Ok(Reply::Done);
        };
        if r.by != Some(session) {
            return Err(MachineError::NotAssigned { session, slot });
        }
        tracing::info!(dead = %r.dead, %slot, by = %session, "slot recovered; its locks are freed");
        self.recoveries.remove(&slot);
        self.remove(r.dead, events);
        Ok(Reply::Done)
    }

    /// Drops a session: releases its locks and frees its slot.
    fn remove(&mut self, id: SessionId, events: &mut Vec<(SessionId, Event)>) {
        let s = self.sessions.remove(&id).expect("removing a known session");
        self.slots.remove(&s.slot);
        let mut effects = Vec::new();
        self.table.remove_session(id, &mut effects);
        self.deliver(effects, events);
    }

    /// Gives every unassigned recovery to the live session with the fewest (lowest id
    /// first), and tells it.
    fn assign_recoveries(&mut self, events: &mut Vec<(SessionId, Event)>) {
        let live: Vec<SessionId> = self.sessions.values().filter(|s| !s.expired).map(|s| s.id).collect();
        if live.is_empty() {
            return;
        }
        let mut load: BTreeMap<SessionId, usize> = live.iter().map(|id| (*id, 0)).collect();
        for r in self.recoveries.values() {
            if let Some(by) = r.by {
                *load.get_mut(&by).expect("assigned to a live session") += 1;
            }
        }
        for (slot, r) in self.recoveries.iter_mut().filter(|(_, r)| r.by.is_none()) {
            let (&by, n) = load.iter_mut().min_by_key(|(id, n)| (**n, **id)).expect("some live session");
            *n += 1;
            r.by = Some(by);
            tracing::info!(dead = %r.dead, %slot, %by, "asking a live session to recover a slot");
            events.push((by, Event::Recover { slot: *slot, dead: r.dead }));
        }
    }

    /// Turns the table's effects into events for live sessions.
    fn deliver(&self, effects: Vec<Effect>, events: &mut Vec<(SessionId, Event)>) {
        for e in effects {
            let (session, event) = match e {
                Effect::Grant { session, lock, mode, token } => (session, Event::Grant { lock, mode, token }),
                Effect::Revoke { session, lock, wanted, token } => {
                    (session, Event::Revoke { lock, wanted, token })
                }
            };
            if self.sessions.get(&session).is_some_and(|s| !s.expired) {
                events.push((session, event));
            }
        }
    }

    /// Everything `session` holds and is asked to do.
    pub fn view(&self, session: SessionId) -> Result<SessionView, MachineError> {
        match self.sessions.get(&session) {
            None => return Err(MachineError::UnknownSession(session)),
            Some(s) if s.expired => return Err(MachineError::Expired(session)),
            Some(_) => {}
        }
        let holds = self.table.holds(session);
        Ok(SessionView {
            revokes: holds.iter().filter_map(|(l, h)| h.revoke.map(|w| (l.clone(), w, h.token))).collect(),
            holds: holds.into_iter().map(|(l, h)| (l, h.mode, h.token)).collect(),
            recoveries: self
                .recoveries
                .iter()
                .filter(|(_, r)| r.by == Some(session))
                .map(|(slot, r)| (*slot, r.dead))
                .collect(),
        })
    }

    /// The session `id`, if known.
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// The lock table.
    pub fn table(&self) -> &LockTable {
        &self.table
    }

    /// Sessions, locks and recoveries, for status output.
    pub fn status(&self) -> Status {
        Status {
            sessions: self
                .sessions
                .values()
                .map(|s| SessionStatus {
                    session: s.clone(),
                    lease_left_ms: if s.expired {
                        0
                    } else {
                        (s.renewed_ms + s.lease_ms).saturating_sub(self.now_ms)
                    },
                    holds: self.table.holds(s.id).into_iter().map(|(l, h)| (l, h.mode, h.token)).collect(),
                    waiting: self.table.waits(s.id),
                })
                .collect(),
            recoveries: self.recoveries.iter().map(|(s, r)| (*s, *r)).collect(),
            locks: self.table.locks().count(),
            last_token: self.table.last_token(),
        }
    }

    /// Serializes the whole state (a Raft snapshot).
    pub fn snapshot(&self) -> Vec<u8> {
        encode(self)
    }

    /// Rebuilds a state from [`LockState::snapshot`]'s bytes.
    pub fn restore(bytes: &[u8]) -> Result<LockState, String> {
        if bytes.is_empty() {
            return Ok(LockState::default());
        }
        decode(bytes).map_err(|e| format!("bad lock snapshot: {e}"))
    }

    /// Checks every invariant; panics on the first broken one.
    pub fn check_invariants(&self) {
        self.table.check_invariants();
        assert_eq!(self.slots.len(), self.sessions.len(), "slots out of step with sessions");
        for (slot, id) in &self.slots {
            assert_eq!(self.sessions[id].slot, *slot, "slot index wrong for {id}");
        }
        for s in self.sessions.values() {
            assert_eq!(s.expired, self.recoveries.get(&s.slot).is_some_and(|r| r.dead == s.id));
            if s.expired {
                assert!(self.table.waits(s.id).is_empty(), "{} is dead but waits", s.id);
            }
        }
        for (slot, r) in &self.recoveries {
            assert_eq!(self.slots.get(slot), Some(&r.dead), "recovery of a slot not held by the dead");
            if let Some(by) = r.by {
                assert!(self.sessions.get(&by).is_some_and(|s| !s.expired), "{slot} assigned to the dead");
            }
        }
        for (_, l) in self.table.locks() {
            for s in l.holders.keys().chain(l.waiters.iter().map(|w| &w.session)) {
                assert!(self.sessions.contains_key(s), "lock held by unknown {s}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Mode::{Exclusive as X, Shared as S};

    const CLOCK: u64 = 7;
    const LEASE: u64 = 1000;

    /// A state machine driven by hand, recording every event.
    struct Harness {
        state: LockState,
        events: Vec<(SessionId, Event)>,
    }

    impl Harness {
        fn new() -> Harness {
            Harness { state: LockState::default(), events: Vec::new() }
        }

        fn apply(&mut self, cmd: Command) -> Answer {
            // Every command goes through encoding, as in the log.
            let cmd = Command::decode(&cmd.encode()).unwrap();
            let r = self.state.apply(cmd, &mut self.events);
            self.state.check_invariants();
            r
        }

        fn take_events(&mut self) -> Vec<(SessionId, Event)> {
            std::mem::take(&mut self.events)
        }

        fn open_at(&mut self, nonce: u64, now_ms: u64) -> (SessionId, Slot) {
            let at = Stamp { clock: CLOCK, now_ms };
            match self.apply(Command::OpenSession { nonce, name: format!("c{nonce}"), lease_ms: LEASE, at }) {
                Ok(Reply::Opened { session, slot, .. }) => (session, slot),
                other => panic!("open failed: {other:?}"),
            }
        }

        fn tick(&mut self, now_ms: u64) {
            self.apply(Command::Tick { at: Stamp { clock: CLOCK, now_ms } }).unwrap();
        }

        fn keepalive(&mut self, session: SessionId, now_ms: u64) -> Answer {
            self.apply(Command::KeepAlive { session, at: Stamp { clock: CLOCK, now_ms } })
        }

        fn acquire(&mut self, session: SessionId, lock: &str, mode: Mode) -> Answer {
            self.apply(Command::Acquire { session, lock: lock.into(), mode })
        }
    }

    fn grant(lock: &str, mode: Mode, token: u64) -> Event {
        Event::Grant { lock: lock.into(), mode, token: Token(token) }
    }

    #[test]
    fn sessions_get_distinct_slots_and_a_retried_open_gets_the_same_session() {
        let mut h = Harness::new();
        let (a, slot_a) = h.open_at(1, 0);
        let (b, slot_b) = h.open_at(2, 0);
        assert_eq!((slot_a, slot_b), (Slot(0), Slot(1)));
        assert_eq!(h.open_at(1, 10), (a, slot_a), "same nonce, same session");
        assert_ne!(a, b);
    }

    #[test]
    fn all_slots_taken_is_a_clear_error_and_a_close_frees_one() {
        let mut h = Harness::new();
        for nonce in 0..SLOTS as u64 {
            h.open_at(nonce + 1, 0);
        }
        let at = Stamp { clock: CLOCK, now_ms: 0 };
        let r = h.apply(Command::OpenSession { nonce: 999, name: "x".into(), lease_ms: LEASE, at });
        assert_eq!(r, Err(MachineError::NoFreeSlot));
        h.apply(Command::CloseSession { session: SessionId(5) }).unwrap();
        assert_eq!(h.open_at(1000, 0).1, Slot(4), "the closed session's slot is free again");
    }

    #[test]
    fn keepalive_renews_and_missing_it_expires_the_session() {
        let mut h = Harness::new();
        let (a, _) = h.open_at(1, 0);
        h.tick(900);
        h.keepalive(a, 900).unwrap();
        h.tick(1899);
        assert!(!h.state.session(a).unwrap().expired, "renewed at 900, lease runs to 1900");
        h.tick(1900);
        assert!(h.state.session(a).unwrap().expired);
        assert_eq!(h.take_events(), vec![(a, Event::LeaseLost)]);
        assert_eq!(h.keepalive(a, 1901), Err(MachineError::Expired(a)));
        assert_eq!(h.acquire(a, "l", S), Err(MachineError::Expired(a)));
    }

    /// The recovery hand-off: the dead session's locks stay held until the live session
    /// asked to recover its slot says it is done.
    #[test]
    fn expired_sessions_locks_are_freed_only_after_recovery_done() {
        let mut h = Harness::new();
        let (a, slot_a) = h.open_at(1, 0);
        let (b, _) = h.open_at(2, 0);
        h.acquire(a, "inode/1", X).unwrap();
        assert_eq!(h.acquire(b, "inode/1", S), Ok(Reply::Acquired(Acquired::Queued)));
        h.take_events();
        // B keeps renewing; A does not.
        h.keepalive(b, 800).unwrap();
        h.tick(1000);
        assert_eq!(
            h.take_events(),
            vec![(a, Event::LeaseLost), (b, Event::Recover { slot: slot_a, dead: a })],
            "A's lease is lost and B is asked to recover A's slot"
        );
        // Until B is done, A's lock stays held and B keeps waiting, however long it takes.
        for now in (1500..20_000).step_by(500) {
            h.keepalive(b, now).unwrap();
            h.tick(now + 100);
        }
        assert!(h.state.table().hold(a, "inode/1").is_some());
        assert!(h.state.table().hold(b, "inode/1").is_none());
        // A recovery from the wrong session is refused.
        let (c, _) = h.open_at(3, 20_000);
        assert_eq!(
            h.apply(Command::RecoveryDone { session: c, slot: slot_a }),
            Err(MachineError::NotAssigned { session: c, slot: slot_a })
        );
        h.take_events();
        h.apply(Command::RecoveryDone { session: b, slot: slot_a }).unwrap();
        assert_eq!(h.take_events(), vec![(b, grant("inode/1", S, 2))]);
        assert!(h.state.session(a).is_none(), "the dead session is gone");
        assert_eq!(h.open_at(4, 20_000).1, slot_a, "and its slot is free");
        // A retried report is harmless.
        assert_eq!(h.apply(Command::RecoveryDone { session: b, slot: slot_a }), Ok(Reply::Done));
    }

    #[test]
    fn with_no_live_session_recovery_waits_for_the_next_one() {
        let mut h = Harness::new();
        let (a, slot_a) = h.open_at(1, 0);
        h.acquire(a, "l", X).unwrap();
        h.take_events();
        h.tick(1000);
        assert_eq!(h.take_events(), vec![(a, Event::LeaseLost)]);
        assert_eq!(h.state.status().recoveries, vec![(slot_a, Recovery { dead: a, by: None })]);
        let (b, slot_b) = h.open_at(2, 3000);
        assert_ne!(slot_a, slot_b, "the dead session's slot stays taken");
        assert_eq!(h.take_events(), vec![(b, Event::Recover { slot: slot_a, dead: a })]);
        assert_eq!(h.state.view(b).unwrap().recoveries, vec![(slot_a, a)], "the view repeats it");
    }

    #[test]
    fn a_recoverer_that_dies_hands_its_recovery_on() {
        let mut h = Harness::new();
        let (a, slot_a) = h.open_at(1, 0);
        let (b, slot_b) = h.open_at(2, 500);
        h.tick(1000); // A expires; B (renewed at 500) is asked.
        assert_eq!(
            h.take_events(),
            vec![(a, Event::LeaseLost), (b, Event::Recover { slot: slot_a, dead: a })]
        );
        let (c, _) = h.open_at(3, 1400);
        h.tick(1500); // B expires: C gets both slots.
        assert_eq!(
            h.take_events(),
            vec![
                (b, Event::LeaseLost),
                (c, Event::Recover { slot: slot_a, dead: a }),
                (c, Event::Recover { slot: slot_b, dead: b })
            ]
        );
    }

    /// A new leader (a new clock) gives every session a fresh lease before expiring any,
    /// even if its clock reads far ahead of the old leader's.
    #[test]
    fn a_new_clock_renews_every_lease() {
        let mut h = Harness::new();
        let (a, _) = h.open_at(1, 0);
        h.tick(999);
        let new_clock = |now_ms| Command::Tick { at: Stamp { clock: CLOCK + 1, now_ms } };
        h.apply(new_clock(1_000_000)).unwrap();
        assert!(!h.state.session(a).unwrap().expired, "the first stamp of a clock only starts an epoch");
        h.apply(new_clock(1_000_999)).unwrap();
        assert!(!h.state.session(a).unwrap().expired);
        h.apply(new_clock(1_001_000)).unwrap();
        assert!(h.state.session(a).unwrap().expired);
        // A clock that reads behind works the same way.
        let (b, _) = h.open_at(2, 5);
        h.apply(new_clock(3)).unwrap();
        assert!(!h.state.session(b).unwrap().expired);
    }

    #[test]
    fn time_never_goes_back_within_an_epoch() {
        let mut h = Harness::new();
        let (a, _) = h.open_at(1, 0);
        h.tick(1500); // expires
        h.tick(10); // an out-of-order stamp does not revive anything
        assert!(h.state.session(a).unwrap().expired);
    }

    #[test]
    fn grants_and_revokes_reach_live_sessions() {
        let mut h = Harness::new();
        let (a, _) = h.open_at(1, 0);
        let (b, _) = h.open_at(2, 0);
        assert_eq!(h.acquire(a, "l", X), Ok(Reply::Acquired(Acquired::Granted { mode: X, token: Token(1) })));
        h.acquire(b, "l", S).unwrap();
        assert_eq!(
            h.take_events(),
            vec![(a, grant("l", X, 1)), (a, Event::Revoke { lock: "l".into(), wanted: S, token: Token(1) })]
        );
        assert_eq!(h.state.view(a).unwrap().revokes, vec![("l".to_string(), S, Token(1))]);
        h.apply(Command::Downgrade { session: a, lock: "l".into(), token: Token(1) }).unwrap();
        assert_eq!(h.take_events(), vec![(b, grant("l", S, 2))]);
        assert_eq!(h.state.view(a).unwrap().holds, vec![("l".to_string(), S, Token(1))]);
    }

    #[test]
    fn closing_releases_everything() {
        let mut h = Harness::new();
        let (a, _) = h.open_at(1, 0);
        let (b, _) = h.open_at(2, 0);
        h.acquire(a, "l", X).unwrap();
        h.acquire(b, "l", X).unwrap();
        h.take_events();
        h.apply(Command::CloseSession { session: a }).unwrap();
        assert_eq!(h.take_events(), vec![(b, grant("l", X, 2))]);
        assert_eq!(h.apply(Command::CloseSession { session: a }), Ok(Reply::Done), "retry is harmless");
        assert_eq!(h.acquire(a, "l", X), Err(MachineError::UnknownSession(a)));
    }

    #[test]
    fn bounds_reach_the_client_as_errors() {
        let mut h = Harness {
            state: LockState::new(Limits { locks_per_session_max: 1, ..Limits::default() }),
            events: vec![],
        };
        let (a, _) = h.open_at(1, 0);
        h.acquire(a, "l", X).unwrap();
        assert_eq!(h.acquire(a, "m", X), Err(MachineError::Table(TableError::TooManyLocks { max: 1 })));
    }

    #[test]
    fn snapshot_round_trips() {
        let mut h = Harness::new();
        let (a, _) = h.open_at(1, 0);
        let (b, _) = h.open_at(2, 600);
        h.acquire(a, "l", X).unwrap();
        h.acquire(b, "l", S).unwrap();
        h.tick(1000);
        let restored = LockState::restore(&h.state.snapshot()).unwrap();
        assert_eq!(restored, h.state);
        assert_eq!(LockState::restore(&[]).unwrap(), LockState::default());
        assert!(LockState::restore(&[1, 2, 3]).is_err());
    }

    /// Two replicas fed the same random commands end in the same state (determinism), and
    /// invariants hold throughout.
    #[test]
    fn random_commands_are_deterministic_and_keep_invariants() {
        use rand::{Rng, SeedableRng};
        for seed in 0..50 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut r1 = Harness::new();
            let mut r2 = Harness::new();
            let mut now = 0;
            for _ in 0..400 {
                now += rng.gen_range(0..200);
                let session = SessionId(rng.gen_range(1..=6));
                let lock = ["a", "b", "c"][rng.gen_range(0..3)].to_string();
                let at = Stamp { clock: if rng.gen_bool(0.01) { rng.gen() } else { CLOCK }, now_ms: now };
                let cmd = match rng.gen_range(0..12) {
                    0 => Command::OpenSession {
                        nonce: rng.gen_range(0..8),
                        name: "n".into(),
                        lease_ms: LEASE,
                        at,
                    },
                    1..=2 => Command::KeepAlive { session, at },
                    3 => Command::Tick { at },
                    4..=6 => Command::Acquire { session, lock, mode: if rng.gen_bool(0.5) { S } else { X } },
                    7 => Command::Release { session, lock, token: Token(rng.gen_range(0..20)) },
                    8 => Command::Downgrade { session, lock, token: Token(rng.gen_range(0..20)) },
                    9 => Command::CloseSession { session },
                    _ => Command::RecoveryDone { session, slot: Slot(rng.gen_range(0..6)) },
                };
                assert_eq!(r1.apply(cmd.clone()), r2.apply(cmd));
            }
            assert_eq!(r1.state, r2.state);
            assert_eq!(r1.events, r2.events);
        }
    }
}
