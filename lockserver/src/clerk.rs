//! The clerk: the lock service's client library, one per client machine (one session).
//!
//! - **Sticky locks.** A lock the service granted stays cached after its local users are
//!   done, until the service revokes it; taking it again costs no RPC. Each lock's state
//!   is what the service granted (`held`: mode and fencing token), who uses it locally
//!   (readers or one writer), whether an acquire is in flight (`want`), and whether the
//!   service asked the clerk to give way (`revoke`).
//! - **Revocation.** When the service asks, the clerk stops handing the lock out locally,
//!   waits for its local users to finish, calls [`Callbacks::revoke`] so that the user
//!   writes back and drops what the lock covers, and then releases the lock (or
//!   downgrades it, when the waiter only wants to share).
//! - **Recovery.** When the service asks, the clerk calls [`Callbacks::recover`] to
//!   replay a dead client's log slot, then reports it done.
//! - **Leases.** A background task renews the session's lease. The clerk counts the lease
//!   from the moment it *sent* its last successful keepalive, less a margin, so it
//!   always believes the lease lost before the service can expire it; it then calls
//!   [`Callbacks::lease_lost`] and refuses every further lock, and the user must stop
//!   writing. [`Clerk::lease_expiry`] gives the expiry time for Petal's fencing.
//! - **Failover.** Calls follow the leader; the event stream is resubscribed at the new
//!   leader, which first sends a view of everything the session holds and is asked to do,
//!   so events missed in between are made up.

use crate::cluster::Cluster;
use crate::machine::Slot;
use crate::service::proto::{self, event::Kind};
use crate::service::{mode_from_wire, mode_to_wire};
use crate::table::{Mode, SessionId, Token};
use raft::NodeId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Code, Status};

/// What the clerk calls back into its user (the file system) for.
#[async_trait::async_trait]
pub trait Callbacks: Send + Sync + 'static {
    /// The service wants `lock` for a waiter that wants `wanted`. Write back everything
    /// the lock covers (log first, then blocks); if `wanted` is exclusive also drop it
    /// from the cache (the lock is about to be released), if shared the clean cache may
    /// stay (the lock is about to be downgraded). No local user holds the lock in a
    /// conflicting mode while this runs. An error is logged and the call retried.
    async fn revoke(&self, lock: &str, wanted: Mode) -> Result<(), String>;

    /// Replay the log in `slot`, left by the dead session `dead`; return when done. The
    /// dead session's locks stay held until then. An error is logged and the call retried.
    async fn recover(&self, slot: Slot, dead: SessionId) -> Result<(), String>;

    /// The lease is lost: stop writing at once. Every further lock call fails; cached
    /// locks are void. Called once, from a clerk task; must not block.
    fn lease_lost(&self);
}

/// Callbacks that do nothing (a user with no cache, for tools and benchmarks).
pub struct NoCallbacks;

#[async_trait::async_trait]
impl Callbacks for NoCallbacks {
    async fn revoke(&self, _lock: &str, _wanted: Mode) -> Result<(), String> {
        Ok(())
    }
    async fn recover(&self, _slot: Slot, _dead: SessionId) -> Result<(), String> {
        Ok(())
    }
    fn lease_lost(&self) {}
}

/// Why a clerk call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClerkError {
    /// The lease is lost (or the session closed): the clerk is unusable.
    #[error("lease lost")]
    LeaseLost,
    /// No leader answered in time.
    #[error("lock service unavailable: {0}")]
    Unavailable(String),
    /// A bound of the service: all log slots taken, too many locks or waiters.
    #[error("lock service limit: {0}")]
    Limit(String),
    /// The service refused the request as malformed (a bad lock name).
    #[error("refused: {0}")]
    Refused(String),
}

impl ClerkError {
    fn from_status(status: &Status) -> ClerkError {
        let msg = status.message().to_string();
        match status.code() {
            Code::NotFound | Code::FailedPrecondition => ClerkError::LeaseLost,
            Code::ResourceExhausted => ClerkError::Limit(msg),
            c if crate::cluster::retryable(status) => ClerkError::Unavailable(format!("{c:?}: {msg}")),
            _ => ClerkError::Refused(msg),
        }
    }
}

/// How a clerk behaves.
#[derive(Clone, Debug)]
pub struct ClerkConfig {
    /// The lock servers.
    pub cluster: BTreeMap<NodeId, String>,
    /// A name for the service's status output.
    pub name: String,
    /// How long one RPC attempt may take before the next node is tried.
    pub rpc_timeout: Duration,
    /// The clerk gives up its lease this long before the service could expire it, as a
    /// fraction of the lease (covers clock rate differences and the user's reaction).
    pub lease_margin_fraction: f64,
    /// Most locks kept cached; past this, idle ones are given back (after
    /// [`Callbacks::revoke`]).
    pub cached_locks_max: usize,
}

impl ClerkConfig {
    /// Defaults: 1 s per RPC attempt, a 10% lease margin, 10,000 cached locks.
    pub fn new(cluster: BTreeMap<NodeId, String>, name: impl Into<String>) -> ClerkConfig {
        ClerkConfig {
            cluster,
            name: name.into(),
            rpc_timeout: Duration::from_secs(1),
            lease_margin_fraction: 0.1,
            cached_locks_max: 10_000,
        }
    }
}

/// One lock as the clerk sees it.
struct Entry {
    /// What the service granted, as far as the clerk knows.
    held: Option<(Mode, Token)>,
    /// Tokens up to this one belong to grants already given back (late duplicates of
    /// their grant are ignored).
    released: Token,
    /// Local users in shared mode.
    readers: u32,
    /// Whether a local user holds it exclusive.
    writer: bool,
    /// The mode of the acquire in flight or queued at the service, and its number.
    want: Option<(Mode, u64)>,
    /// The last acquire that failed (by number), and why.
    failed: Option<(u64, ClerkError)>,
    /// The service asked to give way on the hold with this token to a waiter wanting this
    /// mode (or the user asked to give the lock back: exclusive).
    revoke: Option<(Mode, Token)>,
    /// A give-way task runs: no new local users until it ends.
    giving_way: bool,
    /// Woken on every change.
    notify: Arc<Notify>,
    last_used: Instant,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            held: None,
            released: Token(0),
            readers: 0,
            writer: false,
            want: None,
            failed: None,
            revoke: None,
            giving_way: false,
            notify: Arc::new(Notify::new()),
            last_used: Instant::now(),
        }
    }

    /// Whether a local user may take `mode` now, as far as local users go.
    fn locally_free(&self, mode: Mode) -> bool {
        match mode {
            Mode::Shared => !self.writer,
            Mode::Exclusive => !self.writer && self.readers == 0,
        }
    }

    fn idle(&self) -> bool {
        self.readers == 0 && !self.writer && self.want.is_none() && self.revoke.is_none() && !self.giving_way
    }

    fn wake(&self) {
        self.notify.notify_waiters();
    }
}

struct State {
    locks: HashMap<String, Entry>,
    lost: bool,
    /// The clerk believes its lease valid until then.
    lease_until: Instant,
    /// Slots being recovered.
    recovering: BTreeSet<Slot>,
    /// The number of the last acquire sent.
    attempts: u64,
}

struct Inner {
    cluster: Cluster,
    callbacks: Arc<dyn Callbacks>,
    cfg: ClerkConfig,
    session: SessionId,
    slot: Slot,
    lease: Duration,
    state: Mutex<State>,
    /// Set once the first subscription's view has been taken in.
    subscribed: Notify,
    is_subscribed: AtomicBool,
    runtime: tokio::runtime::Handle,
}

/// A client of the lock service: one session, its cached locks, its lease.
///
/// Dropping the clerk stops its tasks without closing the session (as a crash would:
/// after the lease expires another client recovers its log); call [`Clerk::close`] for a
/// clean exit.
pub struct Clerk {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Clerk {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A local hold on a lock; dropping it leaves the lock cached for the next user.
#[must_use = "the lock is held only while the guard lives"]
pub struct LockGuard {
    inner: Arc<Inner>,
    name: String,
    mode: Mode,
    token: Token,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mode this guard holds.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The fencing token of the grant the lock is cached under: larger than every earlier
    /// grant's of any lock.
    pub fn token(&self) -> Token {
        self.token
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if let Some(e) = st.locks.get_mut(&self.name) {
            match self.mode {
                Mode::Shared => e.readers -= 1,
                Mode::Exclusive => e.writer = false,
            }
            e.last_used = Instant::now();
            e.wake();
        }
    }
}

impl Clerk {
    /// Opens a session and starts the clerk's tasks (lease renewal, the event stream).
    /// Must be called within a tokio runtime, which then runs the clerk.
    pub async fn connect(cfg: ClerkConfig, callbacks: Arc<dyn Callbacks>) -> Result<Clerk, ClerkError> {
        let cluster = Cluster::new(cfg.cluster.clone());
        let nonce: u64 = rand::random();
        let request = proto::OpenSessionRequest { nonce, name: cfg.name.clone() };
        let sent = Instant::now();
        // Opening is retried with the same nonce, so it opens one session at most.
        let deadline = sent + Duration::from_secs(30);
        let (reply, _) = cluster
            .call(deadline, cfg.rpc_timeout, |mut c| {
                let request = request.clone();
                async move { c.open_session(request).await }
            })
            .await
            .map_err(|s| match ClerkError::from_status(&s) {
                // Open never finds an expired session of its own.
                ClerkError::LeaseLost => ClerkError::Refused(s.message().to_string()),
                e => e,
            })?;
        let slot =
            Slot(u8::try_from(reply.slot).map_err(|_| ClerkError::Refused("slot out of range".into()))?);
        let lease = Duration::from_millis(reply.lease_ms);
        let inner = Arc::new(Inner {
            cluster,
            callbacks,
            session: SessionId(reply.session),
            slot,
            lease,
            state: Mutex::new(State {
                locks: HashMap::new(),
                lost: false,
                lease_until: sent + lease.mul_f64(1.0 - cfg.lease_margin_fraction),
                recovering: BTreeSet::new(),
                attempts: 0,
            }),
            cfg,
            subscribed: Notify::new(),
            is_subscribed: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        });
        tracing::info!(session = %inner.session, slot = %inner.slot, ?lease, "clerk opened a session");
        let tasks = vec![tokio::spawn(keep_lease(inner.clone())), tokio::spawn(follow_events(inner.clone()))];
        // Wait (a little) for the event stream, so that nothing the service says is late.
        {
            let subscribed = inner.subscribed.notified();
            if !inner.is_subscribed.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(inner.cfg.rpc_timeout * 5, subscribed).await;
            }
        }
        Ok(Clerk { inner, tasks })
    }

    /// The session's id.
    pub fn session(&self) -> SessionId {
        self.inner.session
    }

    /// The session's log slot.
    pub fn slot(&self) -> Slot {
        self.inner.slot
    }

    /// The lease length the service gave.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// Until when the clerk holds its lease, on this process's monotonic clock (`None`
    /// once lost).
    pub fn lease_deadline(&self) -> Option<Instant> {
        let st = self.inner.state();
        (!st.lost).then_some(st.lease_until)
    }

    /// The same expiry as wall-clock time, for fencing writes at Petal (`None` once lost).
    pub fn lease_expiry(&self) -> Option<SystemTime> {
        let until = self.lease_deadline()?;
        let left = until.saturating_duration_since(Instant::now());
        Some(SystemTime::now() + left)
    }

    /// Whether the lease is lost.
    pub fn is_lost(&self) -> bool {
        self.inner.state().lost
    }

    /// The mode and token a lock is cached under, if it is.
    pub fn cached(&self, lock: &str) -> Option<(Mode, Token)> {
        self.inner.state().locks.get(lock).and_then(|e| e.held)
    }

    /// Number of locks cached.
    pub fn cached_count(&self) -> usize {
        self.inner.state().locks.values().filter(|e| e.held.is_some()).count()
    }

    /// Takes `lock` in `mode`: at once, without an RPC, when it is cached in a mode that
    /// covers `mode` and no local user conflicts; otherwise asks the service and waits.
    /// A task that holds a guard of `lock` and asks for a stronger mode waits for itself:
    /// drop the guard first (the cached lock is upgraded in place).
    pub async fn lock(&self, lock: &str, mode: Mode) -> Result<LockGuard, ClerkError> {
        self.inner.lock(lock, mode).await
    }

    /// [`Clerk::lock`] for threads outside the runtime (FUSE's). Panics when called from
    /// within an async context.
    pub fn lock_blocking(&self, lock: &str, mode: Mode) -> Result<LockGuard, ClerkError> {
        self.inner.runtime.block_on(self.inner.lock(lock, mode))
    }

    /// Gives `lock` back to the service now (after [`Callbacks::revoke`]), once its local
    /// users are done. Returns when it is released.
    pub async fn release(&self, lock: &str) -> Result<(), ClerkError> {
        loop {
            let notified = {
                let mut st = self.inner.state();
                if st.lost {
                    return Err(ClerkError::LeaseLost);
                }
                let Some(e) = st.locks.get_mut(lock) else { return Ok(()) };
                if e.held.is_none() && !e.giving_way {
                    return Ok(());
                }
                if let (None, false, Some((_, token))) = (e.revoke, e.giving_way, e.held) {
                    e.revoke = Some((Mode::Exclusive, token));
                    e.giving_way = true;
                    tokio::spawn(give_way(self.inner.clone(), lock.to_string()));
                }
                e.notify.clone().notified_owned()
            };
            notified.await;
        }
    }

    /// Releases everything and closes the session, freeing its log slot: the user must
    /// have written back everything first, as no revoke callback runs.
    pub async fn close(self) -> Result<(), ClerkError> {
        {
            let mut st = self.inner.state();
            if st.lost {
                return Err(ClerkError::LeaseLost);
            }
            st.lost = true; // no more local grants; the tasks wind down
            for e in st.locks.values() {
                e.wake();
            }
        }
        let session = self.inner.session.0;
        self.inner
            .call(|mut c| async move { c.close_session(proto::SessionRequest { session }).await })
            .await?;
        Ok(())
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls the leader, retrying until the lease would be lost anyway.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClerkError>
    where
        F: FnMut(crate::cluster::Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.lease;
        match self.cluster.call(deadline, self.cfg.rpc_timeout, call).await {
            Ok((t, _)) => Ok(t),
            Err(status) => {
                let e = ClerkError::from_status(&status);
                if e == ClerkError::LeaseLost {
                    self.lose(&format!("the service says: {}", status.message()));
                }
                Err(e)
            }
        }
    }

    async fn lock(self: &Arc<Self>, name: &str, mode: Mode) -> Result<LockGuard, ClerkError> {
        let mut attempt = None;
        loop {
            let notified = {
                let mut st = self.state();
                if st.lost {
                    return Err(ClerkError::LeaseLost);
                }
                let st = &mut *st;
                if !st.locks.contains_key(name) {
                    st.locks.insert(name.to_string(), Entry::new());
                }
                let e = st.locks.get_mut(name).expect("just made sure");
                if let (Some(mine), Some((failed, err))) = (attempt, &e.failed) {
                    if mine == *failed {
                        let err = err.clone();
                        if e.held.is_none() && e.idle() {
                            st.locks.remove(name); // nothing to keep for a lock never granted
                        }
                        return Err(err);
                    }
                }
                let blocked = e.revoke.is_some() || e.giving_way;
                let covered = e.held.is_some_and(|(m, _)| m.covers(mode));
                if !blocked && covered && e.locally_free(mode) {
                    match mode {
                        Mode::Shared => e.readers += 1,
                        Mode::Exclusive => e.writer = true,
                    }
                    e.last_used = Instant::now();
                    let token = e.held.expect("covered").1;
                    return Ok(LockGuard { inner: self.clone(), name: name.to_string(), mode, token });
                }
                if !blocked && !covered && e.want.is_none() {
                    st.attempts += 1;
                    e.want = Some((mode, st.attempts));
                    tokio::spawn(acquire(self.clone(), name.to_string(), mode, st.attempts));
                }
                // Wait for the acquire in flight: its failure is this call's too.
                if let Some((_, n)) = e.want {
                    attempt = Some(n);
                }
                e.notify.clone().notified_owned()
            };
            notified.await;
        }
    }

    /// A grant, from the service's answer, an event or a view. Stale and duplicate
    /// grants are ignored: tokens only grow.
    fn granted(self: &Arc<Self>, name: &str, mode: Mode, token: Token) {
        let mut st = self.state();
        let e = st.locks.entry(name.to_string()).or_insert_with(Entry::new);
        if token <= e.released || e.held.is_some_and(|(_, t)| token <= t) {
            return;
        }
        e.held = Some((mode, token));
        if e.want.is_some_and(|(w, _)| mode.covers(w)) {
            e.want = None;
        }
        e.last_used = Instant::now();
        e.wake();
        self.evict_if_full(&mut st);
    }

    /// Gives back the least recently used idle locks while more than the bound are cached.
    fn evict_if_full(self: &Arc<Self>, st: &mut State) {
        let cached = st.locks.values().filter(|e| e.held.is_some()).count();
        let excess = cached.saturating_sub(self.cfg.cached_locks_max);
        if excess == 0 {
            return;
        }
        let mut idle: Vec<(Instant, String)> = st
            .locks
            .iter()
            .filter(|(_, e)| e.held.is_some() && e.idle())
            .map(|(n, e)| (e.last_used, n.clone()))
            .collect();
        idle.sort();
        for (_, name) in idle.into_iter().take(excess) {
            let e = st.locks.get_mut(&name).expect("listed");
            e.revoke = e.held.map(|(_, token)| (Mode::Exclusive, token));
            e.giving_way = true;
            tokio::spawn(give_way(self.clone(), name));
        }
    }

    /// The service asks to give way on the hold of `name` granted under `token`, to a
    /// waiter wanting `wanted`.
    fn revoked(self: &Arc<Self>, name: &str, wanted: Mode, token: Token) {
        let mut st = self.state();
        let Some(e) = st.locks.get_mut(name) else { return };
        match e.held {
            Some((held, t)) if t == token => {
                if wanted == Mode::Shared && held == Mode::Shared {
                    return; // nothing to give
                }
            }
            _ => return, // a hold already given back
        }
        e.revoke = Some(match e.revoke {
            Some((w, t)) if t == token => (w.max(wanted), token),
            _ => (wanted, token),
        });
        if !e.giving_way {
            e.giving_way = true;
            tokio::spawn(give_way(self.clone(), name.to_string()));
        }
        e.wake();
    }

    /// The service asks to recover `slot`.
    fn recover(self: &Arc<Self>, slot: Slot, dead: SessionId) {
        if self.state().recovering.insert(slot) {
            tokio::spawn(recover(self.clone(), slot, dead));
        }
    }

    /// Declares the lease lost (once): every waiter fails, the user is told.
    fn lose(&self, why: &str) {
        {
            let mut st = self.state();
            if st.lost {
                return;
            }
            st.lost = true;
            for e in st.locks.values() {
                e.wake();
            }
        }
        tracing::warn!(session = %self.session, "lease lost: {why}");
        self.callbacks.lease_lost();
    }

    fn take_view(self: &Arc<Self>, view: proto::View) {
        for h in view.holds {
            if let Ok(mode) = mode_from_wire(h.mode) {
                self.granted(&h.lock, mode, Token(h.token));
            }
        }
        for r in view.revokes {
            if let Ok(wanted) = mode_from_wire(r.wanted) {
                self.revoked(&r.lock, wanted, Token(r.token));
            }
        }
        for r in view.recoveries {
            if let Ok(slot) = u8::try_from(r.slot) {
                self.recover(Slot(slot), SessionId(r.dead_session));
            }
        }
    }
}

/// Sends one acquire and takes in the answer (a grant, or a place in the queue: the grant
/// then comes as an event).
async fn acquire(inner: Arc<Inner>, name: String, mode: Mode, attempt: u64) {
    let request = proto::LockRequest {
        session: inner.session.0,
        lock: name.clone(),
        mode: mode_to_wire(mode),
        token: 0,
    };
    let r = inner
        .call(|mut c| {
            let request = request.clone();
            async move { c.acquire(request).await }
        })
        .await;
    match r {
        Ok(reply) if reply.granted => match mode_from_wire(reply.mode) {
            Ok(mode) => inner.granted(&name, mode, Token(reply.token)),
            Err(e) => tracing::error!("acquire answered a bad mode: {e}"),
        },
        Ok(_) => {} // queued
        Err(err) => {
            let mut st = inner.state();
            if let Some(e) = st.locks.get_mut(&name) {
                if e.want.is_some_and(|(_, n)| n == attempt) {
                    e.want = None;
                    e.failed = Some((attempt, err));
                    e.wake();
                }
            }
        }
    }
}

/// Gives way on `name`: waits for local users to finish, calls the user's revoke
/// callback, then releases or downgrades the hold the revoke names; again while a
/// revoke for the current hold remains (a stronger one may come meanwhile).
async fn give_way(inner: Arc<Inner>, name: String) {
    loop {
        let Some((wanted, held, token)) = wait_for_local_users(&inner, &name).await else {
            finish_give_way(&inner, &name);
            return;
        };
        let mut backoff = Duration::from_millis(10);
        loop {
            match inner.callbacks.revoke(&name, wanted).await {
                Ok(()) => break,
                Err(e) => tracing::error!(lock = %name, "revoke callback failed, retrying: {e}"),
            }
            if inner.state().lost {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        let downgrade = wanted == Mode::Shared && held == Mode::Exclusive;
        let request =
            proto::LockRequest { session: inner.session.0, lock: name.clone(), mode: 0, token: token.0 };
        let r = if downgrade {
            inner
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.downgrade(request).await }
                })
                .await
        } else {
            inner
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.release(request).await }
                })
                .await
        };
        if let Err(e) = r {
            // The lease is gone (nothing more to do), or no leader answered for a whole
            // lease (and then the lease is gone too).
            tracing::warn!(lock = %name, "could not give the lock back: {e}");
            return;
        }
        let mut st = inner.state();
        let e = st.locks.get_mut(&name).expect("entries giving way are kept");
        // A newer grant (an upgrade that waited) may have come meanwhile; it stays.
        if e.held.is_some_and(|(_, t)| t == token) {
            e.held = if downgrade { Some((Mode::Shared, token)) } else { None };
        }
        if !downgrade {
            e.released = e.released.max(token);
        }
        e.wake();
    }
}

/// Waits until no local user stands in the way of the revoke of `name`, and returns the
/// mode wanted, the mode held and the hold's token; `None` when there is nothing to give
/// (the revoke names a hold already given back, or asks a reader to share) or the lease
/// is lost.
async fn wait_for_local_users(inner: &Inner, name: &str) -> Option<(Mode, Mode, Token)> {
    loop {
        let notified = {
            let st = inner.state();
            if st.lost {
                return None;
            }
            let e = &st.locks[name];
            let (Some((wanted, revoked)), Some((held, token))) = (e.revoke, e.held) else { return None };
            if revoked != token || (wanted == Mode::Shared && held == Mode::Shared) {
                return None;
            }
            // Giving way to a reader only requires that no local user writes.
            let in_the_way = if held == Mode::Exclusive { wanted } else { Mode::Exclusive };
            if e.locally_free(in_the_way) {
                return Some((wanted, held, token));
            }
            e.notify.clone().notified_owned()
        };
        notified.await;
    }
}

fn finish_give_way(inner: &Inner, name: &str) {
    let mut st = inner.state();
    let e = st.locks.get_mut(name).expect("entries giving way are kept");
    e.revoke = None;
    e.giving_way = false;
    e.wake();
    if e.held.is_none() && e.idle() {
        st.locks.remove(name);
    }
}

/// Recovers a dead session's slot through the user's callback, then reports it.
async fn recover(inner: Arc<Inner>, slot: Slot, dead: SessionId) {
    tracing::info!(%slot, %dead, "recovering a dead client's log");
    let mut backoff = Duration::from_millis(10);
    loop {
        match inner.callbacks.recover(slot, dead).await {
            Ok(()) => break,
            Err(e) => tracing::error!(%slot, "recovery failed, retrying: {e}"),
        }
        if inner.state().lost {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    let request = proto::RecoveryDoneRequest { session: inner.session.0, slot: u32::from(slot.0) };
    let r = inner.call(|mut c| async move { c.recovery_done(request).await }).await;
    if let Err(e) = &r {
        tracing::warn!(%slot, "could not report recovery done: {e}");
    }
    inner.state().recovering.remove(&slot);
}

/// Renews the lease every fifth of it; declares it lost when no renewal succeeded in time.
async fn keep_lease(inner: Arc<Inner>) {
    let interval = inner.lease / 5;
    let valid_for = inner.lease.mul_f64(1.0 - inner.cfg.lease_margin_fraction);
    let mut next = Instant::now() + interval;
    loop {
        let until = {
            let st = inner.state();
            if st.lost {
                return;
            }
            st.lease_until
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {
                if inner.state().lease_until <= Instant::now() {
                    inner.lose("no keepalive succeeded in time");
                    return;
                }
            }
            _ = tokio::time::sleep_until(next) => {
                // The lease counts from before the request left.
                let sent = Instant::now();
                let session = inner.session.0;
                let left = until.saturating_duration_since(sent);
                let r = inner.cluster.call(sent + left, inner.cfg.rpc_timeout, |mut c| async move {
                    c.keep_alive(proto::SessionRequest { session }).await
                }).await;
                match r {
                    Ok(_) => {
                        let mut st = inner.state();
                        st.lease_until = st.lease_until.max(sent + valid_for);
                        next = sent + interval;
                    }
                    Err(status) if ClerkError::from_status(&status) == ClerkError::LeaseLost => {
                        inner.lose(&format!("the service says: {}", status.message()));
                        return;
                    }
                    Err(status) => {
                        tracing::debug!("keepalive failed: {status}");
                        next = Instant::now() + Duration::from_millis(50);
                    }
                }
            }
        }
    }
}

/// Keeps a subscription to the session's events at the leader, and takes them in.
async fn follow_events(inner: Arc<Inner>) {
    let session = inner.session.0;
    loop {
        if inner.state().lost {
            return;
        }
        let deadline = Instant::now() + inner.lease;
        let r = inner
            .cluster
            .call(deadline, inner.cfg.rpc_timeout, |mut c| async move {
                c.subscribe(proto::SessionRequest { session }).await
            })
            .await;
        let (mut stream, node) = match r {
            Ok(ok) => ok,
            Err(status) if ClerkError::from_status(&status) == ClerkError::LeaseLost => {
                inner.lose(&format!("the service says: {}", status.message()));
                return;
            }
            Err(status) => {
                tracing::debug!("subscribe failed: {status}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tracing::debug!(%node, "subscribed to events");
        loop {
            match stream.message().await {
                Ok(Some(proto::Event { kind: Some(kind) })) => match kind {
                    Kind::View(view) => {
                        inner.take_view(view);
                        inner.is_subscribed.store(true, Ordering::Release);
                        inner.subscribed.notify_waiters();
                    }
                    Kind::Grant(g) => {
                        if let Ok(mode) = mode_from_wire(g.mode) {
                            inner.granted(&g.lock, mode, Token(g.token));
                        }
                    }
                    Kind::Revoke(r) => {
                        if let Ok(wanted) = mode_from_wire(r.wanted) {
                            inner.revoked(&r.lock, wanted, Token(r.token));
                        }
                    }
                    Kind::Recover(r) => {
                        if let Ok(slot) = u8::try_from(r.slot) {
                            inner.recover(Slot(slot), SessionId(r.dead_session));
                        }
                    }
                    Kind::LeaseLost(_) => {
                        inner.lose("the service expired the session");
                        return;
                    }
                },
                Ok(Some(_)) => tracing::warn!("event without a kind"),
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%node, "event stream broke: {status}");
                    break;
                }
            }
        }
    }
}
