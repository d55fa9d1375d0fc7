//! The lock table: named locks held shared by many or exclusive by one, each with a FIFO
//! queue of waiters. Pure logic, no time and no I/O: every change returns the grants and
//! revokes it causes as [`Effect`]s, which the state machine turns into events.
//!
//! Rules, per lock:
//! - A request is granted at once only if no one waits and it is compatible with every
//!   other holder; otherwise it joins the tail of the queue. So a stream of shared requests
//!   cannot starve an exclusive one.
//! - A holder that asks for a stronger mode (shared to exclusive) is an upgrade: it keeps
//!   its shared hold while it waits, and is granted in place.
//! - Whenever the head of the queue conflicts with holders, each conflicting holder is
//!   asked (once) to give way: a [`Effect::Revoke`] carrying the mode the head wants. A
//!   holder asked for `Shared` may downgrade; asked for `Exclusive` it must release.
//! - Releasing a hold does not cancel the same session's waiting request: a holder of a
//!   shared lock that waits to upgrade and is asked to release gives up its shared hold
//!   and keeps its place in the queue.
//!
//! Every operation is idempotent when repeated at once (acquiring a mode already held,
//! releasing a lock not held), which makes retries after an unknown outcome safe.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// How a lock is held. `Shared < Exclusive`: a stronger mode covers a weaker one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Many holders at once (readers).
    Shared,
    /// One holder (a writer).
    Exclusive,
}

impl Mode {
    /// Whether two holders in these modes may hold the same lock at once.
    pub fn compatible(self, other: Mode) -> bool {
        self == Mode::Shared && other == Mode::Shared
    }

    /// Whether holding `self` allows what `wanted` allows.
    pub fn covers(self, wanted: Mode) -> bool {
        self >= wanted
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        })
    }
}

/// A client session, as numbered by the state machine (never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// A fencing token: every grant gets the next one, so a later grant of a lock always
/// carries a larger token than an earlier one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Token(pub u64);

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// Bounds that keep one session from taking the whole table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most locks one session may hold or wait for at once.
    pub locks_per_session_max: usize,
    /// Most locks one session may wait for at once.
    pub waiters_per_session_max: usize,
    /// Longest lock name, in bytes.
    pub name_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { locks_per_session_max: 65_536, waiters_per_session_max: 4096, name_bytes_max: 1024 }
    }
}

/// Why a request was refused. These reach clients; they are their mistakes or bounds,
/// never the table's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TableError {
    /// The session holds or waits for as many locks as allowed.
    #[error("session holds or waits for {max} locks, the most allowed; release some first")]
    TooManyLocks {
        /// The bound.
        max: usize,
    },
    /// The session waits for as many locks as allowed.
    #[error("session waits for {max} locks, the most allowed")]
    TooManyWaiters {
        /// The bound.
        max: usize,
    },
    /// The lock name is empty or too long.
    #[error("bad lock name: {0}")]
    BadName(String),
}

/// A grant or revoke caused by a change to the table, for one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// `session` now holds `lock` in `mode` (a new grant or an upgrade).
    Grant {
        /// Who.
        session: SessionId,
        /// Which lock.
        lock: String,
        /// The mode now held.
        mode: Mode,
        /// The grant's fencing token.
        token: Token,
    },
    /// `session` should give way to a waiter that wants `wanted`: downgrade to shared if
    /// `wanted` is shared, release otherwise.
    Revoke {
        /// Who.
        session: SessionId,
        /// Which lock.
        lock: String,
        /// The mode the first waiter wants.
        wanted: Mode,
        /// The token of the hold to give up.
        token: Token,
    },
}

/// The outcome of an acquire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acquired {
    /// Held now in `mode` (which covers the mode asked for).
    Granted {
        /// The mode held.
        mode: Mode,
        /// The grant's fencing token.
        token: Token,
    },
    /// Queued; a [`Effect::Grant`] follows when it is granted.
    Queued,
}

/// One session's hold on a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The mode held.
    pub mode: Mode,
    /// The token of the grant (kept across a downgrade).
    pub token: Token,
    /// The mode a waiter wants, once the holder has been asked to give way.
    pub revoke: Option<Mode>,
}

/// A session waiting for a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    /// Who waits.
    pub session: SessionId,
    /// For what.
    pub mode: Mode,
}

/// One lock's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// Invariant: empty, or one exclusive holder, or only shared holders.
    pub holders: BTreeMap<SessionId, Hold>,
    /// FIFO. Invariant: a session appears at most once; a waiter that also holds waits
    /// for a stronger mode than it holds.
    pub waiters: VecDeque<Waiter>,
}

impl Lock {
    /// Whether `session` could be granted `mode` now, ignoring the queue.
    fn compatible(&self, session: SessionId, mode: Mode) -> bool {
        self.holders.iter().all(|(s, h)| *s == session || h.mode.compatible(mode))
    }
}

/// What one session holds and waits for (an index into the table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SessionLocks {
    held: BTreeSet<String>,
    waiting: BTreeSet<String>,
}

/// The table of every lock that is held or waited for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    /// Invariant: no lock without holders and waiters is kept.
    locks: BTreeMap<String, Lock>,
    /// Invariant: mirrors `locks` exactly; no session with neither holds nor waits.
    sessions: BTreeMap<SessionId, SessionLocks>,
    /// The last token handed out.
    last_token: Token,
    limits: Limits,
}

impl LockTable {
    /// An empty table with these bounds.
    pub fn new(limits: Limits) -> LockTable {
        LockTable { locks: BTreeMap::new(), sessions: BTreeMap::new(), last_token: Token(0), limits }
    }

    /// The bounds in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Asks for `lock` in `mode` for `session`.
    pub fn acquire(
        &mut self,
        session: SessionId,
        lock: &str,
        mode: Mode,
        effects: &mut Vec<Effect>,
    ) -> Result<Acquired, TableError> {
        if lock.is_empty() || lock.len() > self.limits.name_bytes_max {
            return Err(TableError::BadName(format!(
                "{} bytes; names are 1..={} bytes",
                lock.len(),
                self.limits.name_bytes_max
            )));
        }
        let entry = self.locks.get(lock);
        if let Some(hold) = entry.and_then(|l| l.holders.get(&session)) {
            if hold.mode.covers(mode) {
                return Ok(Acquired::Granted { mode: hold.mode, token: hold.token });
            }
        }
        if let Some(w) = entry.and_then(|l| l.waiters.iter().position(|w| w.session == session)) {
            let l = self.locks.get_mut(lock).expect("entry exists");
            l.waiters[w].mode = l.waiters[w].mode.max(mode);
            self.pump(lock, effects);
            return Ok(self.outcome(session, lock, mode));
        }
        let mine = self.sessions.get(&session).cloned().unwrap_or_default();
        let holds_it = mine.held.contains(lock);
        if !holds_it && mine.held.len() + mine.waiting.len() >= self.limits.locks_per_session_max {
            return Err(TableError::TooManyLocks { max: self.limits.locks_per_session_max });
        }
        let l = self.locks.entry(lock.to_string()).or_default();
        if l.waiters.is_empty() && l.compatible(session, mode) {
            self.grant(session, lock, mode, effects);
        } else {
            if mine.waiting.len() >= self.limits.waiters_per_session_max {
                self.gc(lock);
                return Err(TableError::TooManyWaiters { max: self.limits.waiters_per_session_max });
            }
            l.waiters.push_back(Waiter { session, mode });
            self.sessions.entry(session).or_default().waiting.insert(lock.to_string());
            self.pump(lock, effects);
        }
        Ok(self.outcome(session, lock, mode))
    }

    /// `Granted` if `session` now holds `lock` in a mode covering `mode`, else `Queued`.
    fn outcome(&self, session: SessionId, lock: &str, mode: Mode) -> Acquired {
        match self.hold(session, lock) {
            Some(h) if h.mode.covers(mode) => Acquired::Granted { mode: h.mode, token: h.token },
            _ => Acquired::Queued,
        }
    }

    /// Gives up `session`'s hold on `lock` granted under `token` (its waiting request, if
    /// any, stays). Returns whether it held the lock under that token: a release of an
    /// older grant, such as a retry that arrives after a new grant, changes nothing.
    pub fn release(
        &mut self,
        session: SessionId,
        lock: &str,
        token: Token,
        effects: &mut Vec<Effect>,
    ) -> bool {
        match self.hold(session, lock) {
            Some(h) if h.token == token => self.drop_hold(session, lock, effects),
            _ => false,
        }
    }

    fn drop_hold(&mut self, session: SessionId, lock: &str, effects: &mut Vec<Effect>) -> bool {
        let Some(l) = self.locks.get_mut(lock) else { return false };
        if l.holders.remove(&session).is_none() {
            return false;
        }
        self.index(session).held.remove(lock);
        self.forget_if_idle(session);
        self.pump(lock, effects);
        true
    }

    /// Turns `session`'s exclusive hold on `lock` granted under `token` into a shared one,
    /// keeping the token. Returns whether it held the lock exclusive under that token.
    pub fn downgrade(
        &mut self,
        session: SessionId,
        lock: &str,
        token: Token,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(hold) = self.locks.get_mut(lock).and_then(|l| l.holders.get_mut(&session)) else {
            return false;
        };
        if hold.mode != Mode::Exclusive || hold.token != token {
            return false;
        }
        hold.mode = Mode::Shared;
        hold.revoke = None;
        self.pump(lock, effects);
        true
    }

    /// Withdraws every request `session` waits on (its holds stay).
    pub fn cancel_waits(&mut self, session: SessionId, effects: &mut Vec<Effect>) {
        let waiting = std::mem::take(&mut self.index(session).waiting);
        for lock in waiting {
            let l = self.locks.get_mut(&lock).expect("index mirrors the table");
            l.waiters.retain(|w| w.session != session);
            self.pump(&lock, effects);
        }
        self.forget_if_idle(session);
    }

    /// Withdraws every request of `session` and releases everything it holds.
    pub fn remove_session(&mut self, session: SessionId, effects: &mut Vec<Effect>) {
        self.cancel_waits(session, effects);
        let held = self.sessions.get(&session).map(|s| s.held.clone()).unwrap_or_default();
        for lock in held {
            self.drop_hold(session, &lock, effects);
        }
        self.sessions.remove(&session);
    }

    /// `session`'s hold on `lock`, if any.
    pub fn hold(&self, session: SessionId, lock: &str) -> Option<Hold> {
        self.locks.get(lock)?.holders.get(&session).copied()
    }

    /// Every hold of `session`, by lock name.
    pub fn holds(&self, session: SessionId) -> Vec<(String, Hold)> {
        let Some(s) = self.sessions.get(&session) else { return Vec::new() };
        s.held.iter().map(|lock| (lock.clone(), self.locks[lock].holders[&session])).collect()
    }

    /// Every lock `session` waits for, with the mode.
    pub fn waits(&self, session: SessionId) -> Vec<(String, Mode)> {
        let Some(s) = self.sessions.get(&session) else { return Vec::new() };
        s.waiting
            .iter()
            .map(|lock| {
                let w = self.locks[lock].waiters.iter().find(|w| w.session == session).expect("indexed");
                (lock.clone(), w.mode)
            })
            .collect()
    }

    /// Every lock that is held or waited for.
    pub fn locks(&self) -> impl Iterator<Item = (&String, &Lock)> {
        self.locks.iter()
    }

    /// The last fencing token handed out.
    pub fn last_token(&self) -> Token {
        self.last_token
    }

    /// Makes `session` a holder of `lock` in `mode` with a new token.
    fn grant(&mut self, session: SessionId, lock: &str, mode: Mode, effects: &mut Vec<Effect>) {
        self.last_token = Token(self.last_token.0 + 1);
        let token = self.last_token;
        let l = self.locks.get_mut(lock).expect("granted lock exists");
        l.holders.insert(session, Hold { mode, token, revoke: None });
        self.index(session).held.insert(lock.to_string());
        effects.push(Effect::Grant { session, lock: lock.to_string(), mode, token });
    }

    /// Grants from the head of `lock`'s queue while it can, then asks the holders that
    /// stand in the way of the new head to give way.
    fn pump(&mut self, lock: &str, effects: &mut Vec<Effect>) {
        loop {
            let Some(l) = self.locks.get_mut(lock) else { return };
            let Some(&head) = l.waiters.front() else { break };
            if !l.compatible(head.session, head.mode) {
                break;
            }
            l.waiters.pop_front();
            self.index(head.session).waiting.remove(lock);
            self.grant(head.session, lock, head.mode, effects);
        }
        let l = self.locks.get_mut(lock).expect("still there");
        let head = l.waiters.front().copied();
        for (session, hold) in l.holders.iter_mut() {
            let wanted =
                head.filter(|w| w.session != *session && !w.mode.compatible(hold.mode)).map(|w| w.mode);
            if let Some(w) = wanted.filter(|w| hold.revoke != Some(*w)) {
                effects.push(Effect::Revoke {
                    session: *session,
                    lock: lock.to_string(),
                    wanted: w,
                    token: hold.token,
                });
            }
            hold.revoke = wanted;
        }
        self.gc(lock);
    }

    /// Drops `lock`'s entry if nobody holds or waits for it.
    fn gc(&mut self, lock: &str) {
        if self.locks.get(lock).is_some_and(|l| l.holders.is_empty() && l.waiters.is_empty()) {
            self.locks.remove(lock);
        }
    }

    fn index(&mut self, session: SessionId) -> &mut SessionLocks {
        self.sessions.entry(session).or_default()
    }

    fn forget_if_idle(&mut self, session: SessionId) {
        if self.sessions.get(&session).is_some_and(|s| s.held.is_empty() && s.waiting.is_empty()) {
            self.sessions.remove(&session);
        }
    }

    /// Checks every invariant; panics with a description on the first broken one. For
    /// tests, and cheap enough for debug builds of the state machine.
    pub fn check_invariants(&self) {
        let mut seen: BTreeMap<SessionId, SessionLocks> = BTreeMap::new();
        for (name, l) in &self.locks {
            assert!(!l.holders.is_empty() || !l.waiters.is_empty(), "{name}: empty entry kept");
            let exclusive = l.holders.values().filter(|h| h.mode == Mode::Exclusive).count();
            assert!(exclusive == 0 || l.holders.len() == 1, "{name}: exclusive holder with company");
            for (s, h) in &l.holders {
                assert!(h.token <= self.last_token, "{name}: token from the future");
                seen.entry(*s).or_default().held.insert(name.clone());
            }
            let mut waiting = BTreeSet::new();
            for w in &l.waiters {
                assert!(waiting.insert(w.session), "{name}: {} queued twice", w.session);
                if let Some(h) = l.holders.get(&w.session) {
                    assert!(w.mode > h.mode, "{name}: {} waits for what it holds", w.session);
                }
                seen.entry(w.session).or_default().waiting.insert(name.clone());
            }
            if let Some(head) = l.waiters.front() {
                assert!(!l.compatible(head.session, head.mode), "{name}: grantable head left waiting");
            }
        }
        assert_eq!(seen, self.sessions, "session index out of step with the table");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mode::{Exclusive as X, Shared as S};

    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);
    const C: SessionId = SessionId(3);

    fn table() -> LockTable {
        LockTable::new(Limits::default())
    }

    /// Runs `op` and returns its result and effects, checking invariants after.
    fn run<R>(t: &mut LockTable, op: impl FnOnce(&mut LockTable, &mut Vec<Effect>) -> R) -> (R, Vec<Effect>) {
        let mut effects = Vec::new();
        let r = op(t, &mut effects);
        t.check_invariants();
        (r, effects)
    }

    fn acquire(t: &mut LockTable, s: SessionId, mode: Mode) -> (Acquired, Vec<Effect>) {
        let (r, e) = run(t, |t, e| t.acquire(s, "l", mode, e));
        (r.unwrap(), e)
    }

    fn grant(s: SessionId, mode: Mode, token: u64) -> Effect {
        Effect::Grant { session: s, lock: "l".into(), mode, token: Token(token) }
    }

    fn revoke(s: SessionId, wanted: Mode, token: u64) -> Effect {
        Effect::Revoke { session: s, lock: "l".into(), wanted, token: Token(token) }
    }

    /// Release and downgrade of whatever grant the session holds now.
    trait Held {
        fn release_held(&mut self, s: SessionId, lock: &str, e: &mut Vec<Effect>) -> bool;
        fn downgrade_held(&mut self, s: SessionId, lock: &str, e: &mut Vec<Effect>) -> bool;
    }

    impl Held for LockTable {
        fn release_held(&mut self, s: SessionId, lock: &str, e: &mut Vec<Effect>) -> bool {
            let token = self.hold(s, lock).map_or(Token(0), |h| h.token);
            self.release(s, lock, token, e)
        }
        fn downgrade_held(&mut self, s: SessionId, lock: &str, e: &mut Vec<Effect>) -> bool {
            let token = self.hold(s, lock).map_or(Token(0), |h| h.token);
            self.downgrade(s, lock, token, e)
        }
    }

    fn granted(mode: Mode, token: u64) -> Acquired {
        Acquired::Granted { mode, token: Token(token) }
    }

    #[test]
    fn mode_compatibility_matrix() {
        assert!(S.compatible(S));
        assert!(!S.compatible(X));
        assert!(!X.compatible(S));
        assert!(!X.compatible(X));
        assert!(X.covers(S) && X.covers(X) && S.covers(S) && !S.covers(X));
    }

    #[test]
    fn free_lock_is_granted_at_once_with_a_new_token() {
        let mut t = table();
        assert_eq!(acquire(&mut t, A, X), (granted(X, 1), vec![grant(A, X, 1)]));
        assert_eq!(t.hold(A, "l").unwrap().token, Token(1));
    }

    #[test]
    fn shared_holders_share() {
        let mut t = table();
        acquire(&mut t, A, S);
        assert_eq!(acquire(&mut t, B, S), (granted(S, 2), vec![grant(B, S, 2)]));
    }

    #[test]
    fn acquiring_what_is_held_is_a_no_op() {
        let mut t = table();
        acquire(&mut t, A, X);
        assert_eq!(acquire(&mut t, A, X), (granted(X, 1), vec![]));
        assert_eq!(acquire(&mut t, A, S), (granted(X, 1), vec![]), "exclusive covers shared");
    }

    #[test]
    fn conflicting_request_queues_and_revokes_the_holder() {
        let mut t = table();
        acquire(&mut t, A, X);
        assert_eq!(acquire(&mut t, B, X), (Acquired::Queued, vec![revoke(A, X, 1)]));
        // A second identical request neither queues twice nor revokes twice.
        assert_eq!(acquire(&mut t, B, X), (Acquired::Queued, vec![]));
        let (released, e) = run(&mut t, |t, e| t.release_held(A, "l", e));
        assert!(released);
        assert_eq!(e, vec![grant(B, X, 2)]);
    }

    #[test]
    fn shared_request_revokes_exclusive_holder_to_shared_and_downgrade_grants_it() {
        let mut t = table();
        acquire(&mut t, A, X);
        assert_eq!(acquire(&mut t, B, S), (Acquired::Queued, vec![revoke(A, S, 1)]));
        let (ok, e) = run(&mut t, |t, e| t.downgrade_held(A, "l", e));
        assert!(ok);
        assert_eq!(e, vec![grant(B, S, 2)]);
        assert_eq!(t.hold(A, "l").unwrap(), Hold { mode: S, token: Token(1), revoke: None });
    }

    #[test]
    fn fifo_shared_waits_behind_queued_exclusive() {
        let mut t = table();
        acquire(&mut t, A, S);
        assert_eq!(acquire(&mut t, B, X), (Acquired::Queued, vec![revoke(A, X, 1)]));
        // C's shared request is compatible with A but must not overtake B.
        assert_eq!(acquire(&mut t, C, S), (Acquired::Queued, vec![]));
        let (_, e) = run(&mut t, |t, e| t.release_held(A, "l", e));
        // B is granted; C now heads the queue, so B is asked to downgrade.
        assert_eq!(e, vec![grant(B, X, 2), revoke(B, S, 2)]);
        let (_, e) = run(&mut t, |t, e| t.acquire(A, "l", S, e));
        assert_eq!(e, vec![], "A queues behind C; B is not asked twice");
        let (_, e) = run(&mut t, |t, e| t.downgrade_held(B, "l", e));
        assert_eq!(e, vec![grant(C, S, 3), grant(A, S, 4)], "consecutive shared waiters granted together");
    }

    #[test]
    fn sole_shared_holder_upgrades_in_place() {
        let mut t = table();
        acquire(&mut t, A, S);
        assert_eq!(acquire(&mut t, A, X), (granted(X, 2), vec![grant(A, X, 2)]));
        assert_eq!(t.holds(A).len(), 1);
    }

    #[test]
    fn upgrade_waits_for_other_readers_and_keeps_its_shared_hold() {
        let mut t = table();
        acquire(&mut t, A, S);
        acquire(&mut t, B, S);
        assert_eq!(acquire(&mut t, A, X), (Acquired::Queued, vec![revoke(B, X, 2)]));
        assert_eq!(t.hold(A, "l").unwrap().mode, S);
        let (_, e) = run(&mut t, |t, e| t.release_held(B, "l", e));
        assert_eq!(e, vec![grant(A, X, 3)]);
    }

    #[test]
    fn two_upgraders_do_not_deadlock() {
        let mut t = table();
        acquire(&mut t, A, S);
        acquire(&mut t, B, S);
        assert_eq!(acquire(&mut t, A, X), (Acquired::Queued, vec![revoke(B, X, 2)]));
        assert_eq!(acquire(&mut t, B, X), (Acquired::Queued, vec![]));
        // B gives up its shared hold as asked, but stays queued.
        let (_, e) = run(&mut t, |t, e| t.release_held(B, "l", e));
        assert_eq!(e, vec![grant(A, X, 3), revoke(A, X, 3)]);
        let (_, e) = run(&mut t, |t, e| t.release_held(A, "l", e));
        assert_eq!(e, vec![grant(B, X, 4)]);
    }

    #[test]
    fn release_and_downgrade_of_what_is_not_held_are_no_ops() {
        let mut t = table();
        let (r, e) = run(&mut t, |t, e| t.release_held(A, "l", e));
        assert!(!r && e.is_empty());
        acquire(&mut t, A, S);
        let (r, e) = run(&mut t, |t, e| t.downgrade_held(A, "l", e));
        assert!(!r && e.is_empty());
        let (r, e) = run(&mut t, |t, e| t.downgrade_held(B, "l", e));
        assert!(!r && e.is_empty());
    }

    /// A retried release that arrives after the lock was granted again (an upgrade that
    /// waited while the shared hold was given up) must not release the new grant.
    #[test]
    fn a_release_of_an_older_grant_changes_nothing() {
        let mut t = table();
        acquire(&mut t, A, S);
        acquire(&mut t, B, X); // B queued, A asked to release
        acquire(&mut t, A, X); // A queues an upgrade behind B
        let (_, e) = run(&mut t, |t, e| t.release(A, "l", Token(1), e));
        assert_eq!(e, vec![grant(B, X, 2), revoke(B, X, 2)]);
        let (_, e) = run(&mut t, |t, e| t.release(B, "l", Token(2), e));
        assert_eq!(e, vec![grant(A, X, 3)]);
        // The retry of A's first release, and a downgrade for an old token: no effect.
        let (r, e) = run(&mut t, |t, e| t.release(A, "l", Token(1), e));
        assert!(!r && e.is_empty());
        let (r, e) = run(&mut t, |t, e| t.downgrade(A, "l", Token(1), e));
        assert!(!r && e.is_empty());
        assert_eq!(t.hold(A, "l").unwrap().mode, X);
    }

    #[test]
    fn revoke_follows_the_head_as_it_changes() {
        let mut t = table();
        acquire(&mut t, A, X);
        acquire(&mut t, B, S);
        // B raises its request to exclusive: A is asked again, for more.
        assert_eq!(acquire(&mut t, B, X), (Acquired::Queued, vec![revoke(A, X, 1)]));
    }

    #[test]
    fn cancelled_head_lets_the_next_in() {
        let mut t = table();
        acquire(&mut t, A, S);
        acquire(&mut t, B, X);
        acquire(&mut t, C, S);
        let (_, e) = run(&mut t, |t, e| t.cancel_waits(B, e));
        assert_eq!(e, vec![grant(C, S, 2)]);
        assert_eq!(t.hold(A, "l").unwrap().revoke, None, "no one needs A to give way now");
    }

    #[test]
    fn removing_a_session_frees_everything_it_held() {
        let mut t = table();
        run(&mut t, |t, e| t.acquire(A, "l", X, e).unwrap());
        run(&mut t, |t, e| t.acquire(A, "m", S, e).unwrap());
        run(&mut t, |t, e| t.acquire(B, "l", S, e).unwrap());
        run(&mut t, |t, e| t.acquire(A, "n", X, e).unwrap());
        run(&mut t, |t, e| t.acquire(B, "n", X, e).unwrap());
        run(&mut t, |t, e| t.acquire(A, "x", X, e).unwrap());
        run(&mut t, |t, e| t.acquire(B, "x", X, e).unwrap());
        run(&mut t, |t, e| t.release_held(A, "x", e)); // A's hold is gone...
        run(&mut t, |t, e| t.acquire(A, "x", X, e).unwrap()); // ...and A waits behind B.
        let (_, e) = run(&mut t, |t, e| t.remove_session(A, e));
        assert_eq!(
            e,
            vec![
                Effect::Grant { session: B, lock: "l".into(), mode: S, token: Token(6) },
                Effect::Grant { session: B, lock: "n".into(), mode: X, token: Token(7) },
            ]
        );
        assert!(t.holds(A).is_empty() && t.waits(A).is_empty());
        assert_eq!(t.locks().count(), 3, "m is gone; l, n, x are B's");
    }

    #[test]
    fn bounds_give_clear_errors() {
        let mut t = LockTable::new(Limits {
            locks_per_session_max: 2,
            waiters_per_session_max: 1,
            name_bytes_max: 4,
        });
        let mut e = Vec::new();
        assert!(matches!(t.acquire(A, "", S, &mut e), Err(TableError::BadName(_))));
        assert!(matches!(t.acquire(A, "12345", S, &mut e), Err(TableError::BadName(_))));
        t.acquire(B, "w1", X, &mut e).unwrap();
        t.acquire(B, "w2", X, &mut e).unwrap();
        assert_eq!(t.acquire(A, "w1", S, &mut e), Ok(Acquired::Queued));
        assert_eq!(t.acquire(A, "w2", S, &mut e), Err(TableError::TooManyWaiters { max: 1 }));
        t.check_invariants();
        t.acquire(A, "a", S, &mut e).unwrap();
        assert_eq!(t.acquire(A, "b", S, &mut e), Err(TableError::TooManyLocks { max: 2 }));
        // What is already held can still be asked for again or upgraded.
        assert!(t.acquire(A, "a", X, &mut e).is_ok());
        t.check_invariants();
        assert!(TableError::TooManyLocks { max: 2 }.to_string().contains("2 locks"));
    }

    /// Random operations by a few sessions on a few locks against a simple model of the
    /// rules: invariants hold after each step, every grant is compatible with the other
    /// holders at that moment, and every waiter is eventually granted once holders obey
    /// their revokes (no starvation).
    #[test]
    fn random_operations_keep_invariants_and_never_starve() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut t = table();
            let names = ["a", "b", "c"];
            for _ in 0..300 {
                let s = SessionId(rng.gen_range(1..=4));
                let lock = names[rng.gen_range(0..names.len())];
                let mode = if rng.gen_bool(0.5) { S } else { X };
                let mut e = Vec::new();
                match rng.gen_range(0..10) {
                    0..=4 => {
                        t.acquire(s, lock, mode, &mut e).unwrap();
                    }
                    5..=6 => {
                        t.release_held(s, lock, &mut e);
                    }
                    7 => {
                        t.downgrade_held(s, lock, &mut e);
                    }
                    8 => t.cancel_waits(s, &mut e),
                    _ => t.remove_session(s, &mut e),
                }
                t.check_invariants();
                check_grants_compatible(&t, &e);
            }
            // Drain: holders obey revokes until no one waits.
            for _ in 0..1000 {
                let mut e = Vec::new();
                let Some((lock, session, hold)) = t.locks().find_map(|(name, l)| {
                    l.holders.iter().find(|(_, h)| h.revoke.is_some()).map(|(s, h)| (name.clone(), *s, *h))
                }) else {
                    break;
                };
                if hold.revoke == Some(S) && hold.mode == X {
                    t.downgrade_held(session, &lock, &mut e);
                } else {
                    t.release_held(session, &lock, &mut e);
                }
                t.check_invariants();
                check_grants_compatible(&t, &e);
            }
            for (name, l) in t.locks() {
                assert!(l.waiters.is_empty(), "seed {seed}: {name} starves {:?}", l.waiters);
            }
        }
    }

    fn check_grants_compatible(t: &LockTable, effects: &[Effect]) {
        for e in effects {
            if let Effect::Grant { session, lock, mode, token } = e {
                let l = t.locks().find(|(n, _)| *n == lock).map(|(_, l)| l.clone()).unwrap_or_default();
                if let Some(h) = l.holders.get(session).filter(|h| h.token == *token) {
                    assert_eq!(h.mode, *mode);
                    assert!(l.compatible(*session, *mode), "grant of {lock} to {session} conflicts");
                }
            }
        }
    }
}
