//! Kernel cache coherence: when the lock service takes an inode's lock away, the kernel's
//! cached pages, attributes and names for that inode go too.
//!
//! [`CoherentCallbacks`] wraps the file system's own [`LockCallbacks`]: on a revocation it
//! first lets Frangipani write back and drop what the lock covers, then asks the kernel to
//! forget the inode's pages and attributes and, for a directory, the names under it that
//! this mount has handed the kernel (kept in a bounded [`NameCache`]).
//!
//! The kernel must never be notified from inside a request handler: an invalidation waits
//! for pages that an in-flight read holds locked, and that read may itself wait for the
//! very lock being revoked. So notifications go through threads of their own, and a
//! revocation waits for its notification only up to a bound ([`REVOKE_WAIT`]): coherence
//! holds in the normal case, and a stuck kernel cannot wedge the lock service. The kernel's
//! time-to-live on attributes and names (`fuse::TTL`) is the backstop.
//!
//! The bound would be reached in one common case: a request of this mount waits for the
//! very lock being revoked (a read of the file, a lookup in the directory) while the kernel
//! holds the page or the directory that the invalidation needs, so the kernel waits for the
//! request and the request for the revocation. Handlers declare the inodes whose pages or
//! directory the kernel holds for them ([`Invalidator::hold`]), and the lock client
//! ([`TrackedLocks`]) counts such requests while they wait for a lock. A revocation does not
//! wait for the kernel while one does: that request reads fresh data once it has the lock
//! again, and the invalidation completes right after it.
//!
//! One race is left: a reply computed before a revocation but delivered to the kernel after
//! its invalidation would repopulate the kernel's cache with old data. Each invalidation
//! bumps an epoch for its inode; handlers read the epoch before asking Frangipani and, if it
//! moved by the time they have replied, queue the invalidation again
//! ([`Invalidator::recheck_inode`], [`Invalidator::recheck_entry`]).

use crate::filelock::FileLocks;
use frangipani::locks::{LockCallbacks, LockError, LockName, Locks, Mode};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How long a revocation waits for the kernel to drop its caches before letting the lock go.
pub const REVOKE_WAIT: Duration = Duration::from_secs(1);
/// Most names remembered for entry invalidation; past it the cache starts over (and the
/// forgotten names rely on their time-to-live alone).
pub const NAMES_MAX: usize = 1 << 16;
/// Most invalidations queued for the notification threads.
const QUEUE_MAX: usize = 4096;
/// Epoch and request counters, shared by inode number modulo this (a collision only costs a
/// spurious invalidation, or a revocation that does not wait).
const STRIPES: usize = 1024;
/// How often a waiting revocation looks again for requests that block the kernel.
const BLOCKED_POLL: Duration = Duration::from_millis(5);
/// Most inodes one request holds in the kernel (rename: both directories).
const HOLD_MAX: usize = 2;
/// Threads sending notifications: one stuck behind a busy page does not hold up the rest.
const NOTIFY_THREADS: usize = 4;

thread_local! {
    /// The inodes the kernel holds for the request this thread is answering.
    static HOLDING: Cell<([u64; HOLD_MAX], usize)> = const { Cell::new(([0; HOLD_MAX], 0)) };
}

fn stripe_of(ino: u64) -> usize {
    (ino % STRIPES as u64) as usize
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The names this mount has given the kernel, by parent directory: what the kernel may
/// have in its entry cache.
#[derive(Default)]
pub struct NameCache {
    dirs: HashMap<u64, HashSet<OsString>>,
    /// Invariant: the sum of the sets' sizes.
    names: usize,
}

impl NameCache {
    /// Remembers that the kernel may cache `name` in `parent`.
    pub fn note(&mut self, parent: u64, name: &OsStr) {
        if self.dirs.get(&parent).is_some_and(|s| s.contains(name)) {
            return;
        }
        if self.names >= NAMES_MAX {
            self.dirs.clear();
            self.names = 0;
        }
        self.dirs.entry(parent).or_default().insert(name.to_os_string());
        self.names += 1;
    }

    /// Forgets and returns the names under `parent`.
    pub fn take(&mut self, parent: u64) -> Vec<OsString> {
        let names: Vec<OsString> =
            self.dirs.remove(&parent).map(|s| s.into_iter().collect()).unwrap_or_default();
        self.names -= names.len();
        names
    }

    /// Names remembered.
    pub fn len(&self) -> usize {
        self.names
    }

    /// Whether no name is remembered.
    pub fn is_empty(&self) -> bool {
        self.names == 0
    }
}

/// One invalidation for the notification thread.
struct Job {
    /// The inode whose pages and attributes go.
    ino: u64,
    /// Names under `ino` (a directory) that go.
    names: Vec<OsString>,
    /// Whether the inode itself goes too (false: names only).
    inode: bool,
    /// Told when done, if someone waits.
    done: Option<SyncSender<()>>,
}

/// Sends the kernel cache invalidations, from threads of their own.
pub struct Invalidator {
    notifier: Arc<OnceLock<fuser::Notifier>>,
    queue: SyncSender<Job>,
    names: Mutex<NameCache>,
    epochs: Vec<AtomicU64>,
    /// Requests waiting for a lock while the kernel holds each inode for them (by stripe).
    blocked: Arc<Vec<AtomicU32>>,
    wait: Duration,
}

impl Invalidator {
    /// Starts the notification threads. Nothing is sent until [`Invalidator::set_notifier`]:
    /// before the kernel has a session it has nothing cached.
    pub fn start(wait: Duration) -> std::io::Result<Arc<Invalidator>> {
        let (queue, jobs) = mpsc::sync_channel(QUEUE_MAX);
        let jobs = Arc::new(Mutex::new(jobs));
        let notifier = Arc::new(OnceLock::new());
        for i in 0..NOTIFY_THREADS {
            let (notifier, jobs) = (notifier.clone(), jobs.clone());
            std::thread::Builder::new()
                .name(format!("fuse-invalidate-{i}"))
                .spawn(move || notify_loop(&notifier, &jobs))?;
        }
        Ok(Arc::new(Invalidator {
            notifier,
            queue,
            names: Mutex::new(NameCache::default()),
            epochs: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            blocked: Arc::new((0..STRIPES).map(|_| AtomicU32::new(0)).collect()),
            wait,
        }))
    }

    /// Starts sending to the kernel through `notifier` (once the session exists).
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Remembers that the kernel may now cache `name` in `parent`.
    pub fn note_entry(&self, parent: u64, name: &OsStr) {
        lock(&self.names).note(parent, name);
    }

    /// Names remembered (for tests and status).
    pub fn names_cached(&self) -> usize {
        lock(&self.names).len()
    }

    fn stripe(&self, ino: u64) -> &AtomicU64 {
        &self.epochs[stripe_of(ino)]
    }

    /// Declares, for the request this thread answers, the inodes whose pages or directory
    /// the kernel holds until the reply: those a revocation must not wait on while this
    /// request waits for a lock. Drop the guard after replying.
    pub fn hold<const N: usize>(&self, inos: [u64; N]) -> Hold {
        const { assert!(N <= HOLD_MAX) };
        let mut held = [0; HOLD_MAX];
        held[..N].copy_from_slice(&inos);
        Hold { before: HOLDING.replace((held, N)) }
    }

    /// The lock client the file system should use, so that [`Invalidator::hold`] works.
    pub fn track(&self, locks: Arc<dyn Locks>) -> TrackedLocks {
        TrackedLocks { inner: locks, blocked: self.blocked.clone() }
    }

    /// The invalidation epoch of `ino`, to read before asking the file system for what a
    /// reply will carry.
    pub fn epoch(&self, ino: u64) -> u64 {
        self.stripe(ino).load(Ordering::SeqCst)
    }

    /// After replying with `ino`'s data or attributes read at `epoch`: if `ino` was
    /// invalidated meanwhile, the kernel may now hold the old copy, so invalidate again.
    pub fn recheck_inode(&self, ino: u64, epoch: u64) {
        if self.epoch(ino) != epoch {
            self.enqueue(Job { ino, names: Vec::new(), inode: true, done: None });
        }
    }

    /// After replying with the entry `name` in `parent` read at `epoch` (of `parent`): if
    /// `parent` was invalidated meanwhile, drop the entry again.
    pub fn recheck_entry(&self, parent: u64, name: &OsStr, epoch: u64) {
        if self.epoch(parent) != epoch {
            self.enqueue(Job { ino: parent, names: vec![name.to_os_string()], inode: false, done: None });
        }
    }

    /// Drops everything the kernel caches for `ino`: pages, attributes and (for a
    /// directory) the names under it. Waits for the kernel up to the bound given at start,
    /// unless a request in flight here keeps the kernel from finishing (see the module docs).
    pub fn invalidate(&self, ino: u64) {
        self.stripe(ino).fetch_add(1, Ordering::SeqCst);
        if self.notifier.get().is_none() {
            return; // no session yet: the kernel caches nothing
        }
        let names = lock(&self.names).take(ino);
        let (done, finished) = mpsc::sync_channel(1);
        if !self.enqueue(Job { ino, names, inode: true, done: Some(done) }) {
            return;
        }
        // A request for `ino` may also arrive while we wait, and block on the lock.
        let deadline = Instant::now() + self.wait;
        loop {
            if self.blocked[stripe_of(ino)].load(Ordering::SeqCst) != 0 {
                tracing::debug!(ino, "a request the kernel waits for waits for a lock: not waiting");
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    ino,
                    "kernel cache invalidation still pending after {:?}; letting the lock go",
                    self.wait
                );
                return;
            }
            if finished.recv_timeout(BLOCKED_POLL.min(deadline - now)).is_ok() {
                tracing::debug!(ino, "invalidated");
                return;
            }
        }
    }

    /// Queues a job; false if it could not be queued.
    fn enqueue(&self, job: Job) -> bool {
        if self.notifier.get().is_none() {
            return false;
        }
        match self.queue.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(job)) => {
                tracing::warn!(ino = job.ino, "invalidation queue full; relying on the cache time-to-live");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

fn notify_loop(notifier: &OnceLock<fuser::Notifier>, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let Ok(job) = lock(jobs).recv() else { return };
        let Some(n) = notifier.get() else { continue };
        let ino = fuser::INodeNo(job.ino);
        if job.inode {
            // Offset 0, length 0: every page, and the attributes.
            if let Err(e) = n.inval_inode(ino, 0, 0) {
                tracing::debug!(ino = job.ino, "inval_inode: {e}");
            }
        }
        for name in &job.names {
            if let Err(e) = n.inval_entry(ino, name) {
                tracing::debug!(parent = job.ino, ?name, "inval_entry: {e}");
            }
        }
        if let Some(done) = job.done {
            let _ = done.try_send(());
        }
    }
}

/// The inodes the kernel holds for the request being answered (see [`Invalidator::hold`]).
pub struct Hold {
    before: ([u64; HOLD_MAX], usize),
}

impl Drop for Hold {
    fn drop(&mut self) {
        HOLDING.set(self.before);
    }
}

/// The file system's lock client, counting the requests that wait for a lock while the
/// kernel holds inodes for them (see the module docs).
pub struct TrackedLocks {
    inner: Arc<dyn Locks>,
    blocked: Arc<Vec<AtomicU32>>,
}

impl Locks for TrackedLocks {
    fn acquire(&self, name: &LockName, mode: Mode) -> Result<(), LockError> {
        let (held, n) = HOLDING.get();
        for ino in &held[..n] {
            self.blocked[stripe_of(*ino)].fetch_add(1, Ordering::SeqCst);
        }
        let result = self.inner.acquire(name, mode);
        for ino in &held[..n] {
            self.blocked[stripe_of(*ino)].fetch_sub(1, Ordering::SeqCst);
        }
        result
    }

    fn release(&self, name: &LockName, mode: Mode) {
        self.inner.release(name, mode)
    }

    fn slot(&self) -> u32 {
        self.inner.slot()
    }

    fn lease_expiry_ms(&self) -> Option<u64> {
        self.inner.lease_expiry_ms()
    }
}

/// The lock service's callbacks for a mounted client: the file system's own, then the
/// kernel's caches.
pub struct CoherentCallbacks {
    fs: Weak<dyn LockCallbacks>,
    invalidator: Arc<Invalidator>,
    file_locks: Arc<FileLocks>,
}

impl CoherentCallbacks {
    /// Wraps the file system's callbacks (`Frangipani::callbacks()`); the revocations of
    /// file locks go to `file_locks` instead.
    pub fn new(
        fs: Weak<dyn LockCallbacks>,
        invalidator: Arc<Invalidator>,
        file_locks: Arc<FileLocks>,
    ) -> CoherentCallbacks {
        CoherentCallbacks { fs, invalidator, file_locks }
    }
}

impl LockCallbacks for CoherentCallbacks {
    fn revoke(&self, name: &LockName, wanted: Mode) {
        if let LockName::FileLocks(ino) = name {
            // Covers no cached data: only this machine's processes' locks stand in the way.
            self.file_locks.revoke(*ino, wanted);
            return;
        }
        if let Some(fs) = self.fs.upgrade() {
            fs.revoke(name, wanted);
        }
        // A downgrade to shared keeps what is cached valid: nobody else may write.
        if let (LockName::Inode(ino), Mode::Exclusive) = (name, wanted) {
            self.invalidator.invalidate(*ino);
        }
    }

    fn recover(&self, slot: u32) -> Result<(), String> {
        match self.fs.upgrade() {
            Some(fs) => fs.recover(slot),
            None => Err("file system unmounted".into()),
        }
    }

    fn lease_lost(&self) {
        self.file_locks.close();
        if let Some(fs) = self.fs.upgrade() {
            fs.lease_lost();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_cache_is_bounded_and_takes_by_parent() {
        let mut c = NameCache::default();
        c.note(1, OsStr::new("a"));
        c.note(1, OsStr::new("a"));
        c.note(1, OsStr::new("b"));
        c.note(2, OsStr::new("a"));
        assert_eq!(c.len(), 3);
        let mut names = c.take(1);
        names.sort();
        assert_eq!(names, vec![OsString::from("a"), OsString::from("b")]);
        assert_eq!(c.len(), 1);
        for i in 0..NAMES_MAX + 10 {
            c.note(3, OsStr::new(&format!("n{i}")));
        }
        assert!(c.len() <= NAMES_MAX);
    }

    #[test]
    fn a_request_holding_an_inode_counts_while_it_waits_for_a_lock() {
        use frangipani::locks::MemLockService;
        let inv = Invalidator::start(Duration::from_millis(10)).unwrap();
        let service = MemLockService::new();
        let (a, b) = (service.client(1), service.client(2));
        let b = Arc::new(inv.track(b));
        let name = LockName::Inode(5);
        a.acquire(&name, Mode::Exclusive).unwrap(); // A writes: B must wait
        let waiter = {
            let (b, name) = (b.clone(), name.clone());
            let inv = inv.clone();
            std::thread::spawn(move || {
                let _held = inv.hold([5]);
                b.acquire(&name, Mode::Shared).unwrap();
                b.release(&name, Mode::Shared);
            })
        };
        let blocked = || inv.blocked[stripe_of(5)].load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while blocked() == 0 {
            assert!(Instant::now() < deadline, "the waiting request was not counted");
            std::thread::sleep(Duration::from_millis(1));
        }
        a.release(&name, Mode::Exclusive);
        waiter.join().unwrap();
        assert_eq!(blocked(), 0);
        // Outside a request nothing is counted.
        b.acquire(&LockName::Inode(6), Mode::Shared).unwrap();
        assert_eq!(inv.blocked[stripe_of(6)].load(Ordering::SeqCst), 0);
    }

    #[test]
    fn epochs_move_on_invalidation_even_without_a_session() {
        let inv = Invalidator::start(Duration::from_millis(10)).unwrap();
        let e = inv.epoch(7);
        inv.invalidate(7);
        assert_ne!(inv.epoch(7), e);
        // Without a session nothing is queued and nothing waits.
        inv.recheck_inode(7, e);
    }
}
