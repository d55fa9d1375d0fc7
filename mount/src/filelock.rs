//! flock and POSIX record locks, held across machines through the lock service.
//!
//! The kernel is asked for `FUSE_POSIX_LOCKS` and `FUSE_FLOCK_LOCKS`, so every lock call of
//! every process on this machine comes here (`getlk`/`setlk`, and `flush`/`release` on
//! close). The kernel emulates flock with POSIX locks over the whole file, owned by the
//! open file rather than the process (so, as on NFS, flock and fcntl locks of one file
//! conflict with each other).
//!
//! **This machine.** Each mount keeps the lock table of its processes ([`Table`]): byte
//! ranges with their owner, read or write, split and merged the POSIX way. Conflicts
//! between processes of this machine are resolved here, at byte granularity, and F_GETLK
//! reports the conflicting range and its holder's pid.
//!
//! **Other machines.** Per inode there is one lock-service lock,
//! [`LockName::FileLocks`] (distinct from the inode's metadata lock). A machine holds it
//! shared while its processes hold only read locks on the file and exclusive while they
//! hold a write lock. Conflicts between machines are therefore per file, coarser than
//! ranges: two machines cannot write-lock disjoint ranges of one file at the same time
//! (one waits, or gets EAGAIN), but no conflicting pair is ever granted. F_GETLK reports a
//! lock held on another machine as a whole-file write lock with pid 0.
//!
//! The lock-service lock is taken (by a thread of its own, one per inode at a time),
//! noted here as the mode this machine may grant without asking ([`InodeLocks::service`]),
//! and its guard dropped at once: the clerk keeps it cached. When the service revokes it,
//! [`FileLocks::revoke`] waits until no lock of this machine's processes stands in the
//! way, so a held lock is never given away. F_SETLK waits at most [`TRY_WAIT`] for the
//! lock service, then fails with EAGAIN (the request stays queued at the service, and the
//! lock stays cached here when it comes). F_SETLKW waits on a thread of its own (the caller
//! of [`FileLocks::set`] runs it there), and gives up with EINTR as soon as the waiting
//! thread has a signal pending: fuser does not pass the kernel's INTERRUPT on, so the
//! waiter looks at `/proc/TID/status` itself; the kernel restarts the call if the signal's
//! handler asks for it.
//!
//! Not detected: deadlocks between machines (two machines holding read locks that both
//! want to write wait for each other until interrupted).

use frangipani::locks::{LockError, LockName, Locks, Mode};
use fuser::Errno;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long F_SETLK and F_GETLK wait for the lock service before answering that another
/// machine holds the file (long enough for a lock merely cached elsewhere to come back).
pub const TRY_WAIT: Duration = Duration::from_secs(1);
/// How often a blocked F_SETLKW looks for a pending signal.
const SIGNAL_POLL: Duration = Duration::from_millis(50);
/// Most F_SETLKW calls blocked at once; past it, ENOLCK.
pub const WAITERS_MAX: usize = 1024;
/// Most lock-service acquisitions in flight at once; past it, ENOLCK.
const ACQUIRERS_MAX: usize = 256;
/// The end of a range that runs to the end of the file (the kernel's OFFSET_MAX).
pub const OFFSET_MAX: u64 = i64::MAX as u64;

/// A held lock: a range of a file, one owner's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// The kernel's lock owner (a process's files, or an open file for flock and OFD locks).
    pub owner: u64,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive). Invariant: `start <= end`.
    pub end: u64,
    /// A write (exclusive) lock, else a read lock.
    pub write: bool,
    /// The holder's pid, for F_GETLK.
    pub pid: u32,
}

impl Range {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// What a lock call asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// The lock owner.
    pub owner: u64,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// Read, write or unlock.
    pub kind: Kind,
    /// The caller's pid.
    pub pid: u32,
}

/// The lock type of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// F_RDLCK.
    Read,
    /// F_WRLCK.
    Write,
    /// F_UNLCK.
    Unlock,
}

impl Want {
    /// From the kernel's fields; EINVAL for a bad type or range.
    pub fn from_kernel(owner: u64, start: u64, end: u64, typ: i32, pid: u32) -> Result<Want, Errno> {
        let kind = match typ {
            libc::F_RDLCK => Kind::Read,
            libc::F_WRLCK => Kind::Write,
            libc::F_UNLCK => Kind::Unlock,
            _ => return Err(Errno::EINVAL),
        };
        if start > end {
            return Err(Errno::EINVAL);
        }
        Ok(Want { owner, start, end, kind, pid })
    }

    /// The lock-service mode this request needs (none to unlock).
    fn mode(&self) -> Option<Mode> {
        match self.kind {
            Kind::Read => Some(Mode::Shared),
            Kind::Write => Some(Mode::Exclusive),
            Kind::Unlock => None,
        }
    }
}

/// The locks held on one file by this machine's processes, and what the lock service lets
/// this machine grant.
#[derive(Debug, Default)]
pub struct InodeLocks {
    /// Invariant: ranges of one owner never overlap, and those of one owner and type are
    /// never adjacent (they are merged).
    held: Vec<Range>,
    /// The mode this machine may grant in without asking the lock service: set when the
    /// service lock is taken, lowered by [`FileLocks::revoke`] before the clerk lets it go.
    /// Invariant: covers every lock in `held`.
    service: Option<Mode>,
    /// A thread is acquiring the service lock in this mode.
    acquiring: Option<Mode>,
    /// Failed acquisitions so far (waiters that saw one start give up when it fails).
    failures: u64,
}

impl InodeLocks {
    /// The first lock of another owner that conflicts with `want`.
    pub fn conflict(&self, want: &Want) -> Option<Range> {
        let write = want.kind == Kind::Write;
        self.held
            .iter()
            .find(|r| r.owner != want.owner && r.overlaps(want.start, want.end) && (write || r.write))
            .copied()
    }

    /// Sets, changes or removes `want.owner`'s lock over the range, the POSIX way: what the
    /// owner held there is replaced (split where the range cuts it), and the new lock is
    /// merged with the owner's adjacent locks of its type.
    pub fn apply(&mut self, want: &Want) {
        let mut out = Vec::with_capacity(self.held.len() + 2);
        for r in self.held.drain(..) {
            if r.owner != want.owner || !r.overlaps(want.start, want.end) {
                out.push(r);
                continue;
            }
            if r.start < want.start {
                out.push(Range { end: want.start - 1, ..r });
            }
            if r.end > want.end {
                out.push(Range { start: want.end + 1, ..r });
            }
        }
        if want.kind != Kind::Unlock {
            let mut new = Range {
                owner: want.owner,
                start: want.start,
                end: want.end,
                write: want.kind == Kind::Write,
                pid: want.pid,
            };
            out.retain(|r| {
                let adjacent =
                    r.end.checked_add(1) == Some(new.start) || new.end.checked_add(1) == Some(r.start);
                if r.owner == new.owner && r.write == new.write && adjacent {
                    new.start = new.start.min(r.start);
                    new.end = new.end.max(r.end);
                    false
                } else {
                    true
                }
            });
            out.push(new);
        }
        self.held = out;
    }

    /// Removes every lock of `owner`.
    pub fn remove_owner(&mut self, owner: u64) -> bool {
        let before = self.held.len();
        self.held.retain(|r| r.owner != owner);
        self.held.len() != before
    }

    /// The locks held.
    pub fn held(&self) -> &[Range] {
        &self.held
    }

    /// Whether a revoke to `wanted` must wait for this machine's locks.
    fn in_the_way_of(&self, wanted: Mode) -> bool {
        match wanted {
            Mode::Exclusive => !self.held.is_empty(),
            Mode::Shared => self.held.iter().any(|r| r.write),
        }
    }

    fn forgettable(&self) -> bool {
        self.held.is_empty() && self.service.is_none() && self.acquiring.is_none()
    }
}

/// The lock table of one mount.
#[derive(Default)]
struct Table {
    inodes: HashMap<u64, InodeLocks>,
    /// The lease is lost or the mount is going: nothing more is granted, and revokes no
    /// longer wait.
    closed: bool,
    waiters: usize,
    acquirers: usize,
}

/// What a lock call may wait for.
#[derive(Clone, Copy, Debug)]
pub enum Wait {
    /// F_GETLK or F_SETLK: for the lock service, up to [`TRY_WAIT`]; never for a lock.
    Try,
    /// F_SETLKW: for as long as it takes, unless thread `tid` of the caller gets a signal
    /// (0: no signal checks).
    Block {
        /// The calling thread, as FUSE names it.
        tid: u32,
    },
}

/// The file locks of one mount (see the module docs).
pub struct FileLocks {
    locks: Arc<dyn Locks>,
    table: Mutex<Table>,
    changed: Condvar,
}

fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the lock loop decided.
enum Step {
    Done(Result<Option<Range>, Errno>),
    Wait,
}

impl FileLocks {
    /// File locks taken through `locks` (the mount's lock client).
    pub fn new(locks: Arc<dyn Locks>) -> Arc<FileLocks> {
        Arc::new(FileLocks { locks, table: Mutex::new(Table::default()), changed: Condvar::new() })
    }

    /// F_GETLK: the lock that would stop `want`, if any (from this machine, or a whole-file
    /// write lock with pid 0 standing for another machine's).
    pub fn test(self: &Arc<Self>, ino: u64, want: Want) -> Result<Option<Range>, Errno> {
        if want.kind == Kind::Unlock {
            return Err(Errno::EINVAL);
        }
        self.run(ino, want, Wait::Try, true)
    }

    /// F_SETLK or F_SETLKW (run the latter on a thread of its own).
    pub fn set(self: &Arc<Self>, ino: u64, want: Want, wait: Wait) -> Result<(), Errno> {
        if let Wait::Block { .. } = wait {
            let mut t = lock(&self.table);
            if t.waiters >= WAITERS_MAX {
                tracing::warn!(ino, "too many blocked lock calls");
                return Err(Errno::ENOLCK);
            }
            t.waiters += 1;
        }
        let result = self.run(ino, want, wait, false);
        if let Wait::Block { .. } = wait {
            lock(&self.table).waiters -= 1;
        }
        result.map(|_| ())
    }

    /// The owner is done with the file (a close for POSIX locks, the last close of an open
    /// file for flock): its locks go.
    pub fn release_owner(&self, ino: u64, owner: u64) {
        let mut t = lock(&self.table);
        if let Some(e) = t.inodes.get_mut(&ino) {
            if e.remove_owner(owner) {
                self.changed.notify_all();
            }
        }
    }

    /// The lock service revokes `ino`'s file lock to `wanted`: waits until this machine's
    /// locks allow it, then stops granting beyond what stays.
    pub fn revoke(&self, ino: u64, wanted: Mode) {
        let mut t = lock(&self.table);
        loop {
            if t.closed {
                return;
            }
            let Some(e) = t.inodes.get_mut(&ino) else { return };
            if !e.in_the_way_of(wanted) {
                e.service = match wanted {
                    Mode::Shared => e.service.map(|_| Mode::Shared),
                    Mode::Exclusive => None,
                };
                if e.forgettable() {
                    t.inodes.remove(&ino);
                }
                self.changed.notify_all();
                return;
            }
            tracing::debug!(ino, ?wanted, "revoke waits for this machine's file locks");
            t = self.changed.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The lease is lost or the mount is going: fail every waiter and further lock, and let
    /// revocations through.
    pub fn close(&self) {
        lock(&self.table).closed = true;
        self.changed.notify_all();
    }

    /// The locks this machine's processes hold on `ino` (for tests and status).
    pub fn held(&self, ino: u64) -> Vec<Range> {
        lock(&self.table).inodes.get(&ino).map(|e| e.held.clone()).unwrap_or_default()
    }

    /// Files with locks held, and locks held.
    pub fn counts(&self) -> (usize, usize) {
        let t = lock(&self.table);
        let files = t.inodes.values().filter(|e| !e.held.is_empty()).count();
        (files, t.inodes.values().map(|e| e.held.len()).sum())
    }

    /// The lock loop: test (`test_only`) or set `want`, waiting as `wait` allows.
    fn run(
        self: &Arc<Self>,
        ino: u64,
        want: Want,
        wait: Wait,
        test_only: bool,
    ) -> Result<Option<Range>, Errno> {
        let deadline = Instant::now() + TRY_WAIT;
        let mut failures_seen = None;
        let mut t = lock(&self.table);
        loop {
            match self.step(&mut t, ino, &want, wait, test_only, deadline, &mut failures_seen) {
                Step::Done(result) => {
                    if let Some(e) = t.inodes.get(&ino) {
                        if e.forgettable() {
                            t.inodes.remove(&ino);
                        }
                    }
                    self.changed.notify_all();
                    return result;
                }
                Step::Wait => {}
            }
            let pause = match wait {
                Wait::Try => deadline.saturating_duration_since(Instant::now()),
                Wait::Block { .. } => SIGNAL_POLL,
            };
            t = self.changed.wait_timeout(t, pause).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        self: &Arc<Self>,
        t: &mut Table,
        ino: u64,
        want: &Want,
        wait: Wait,
        test_only: bool,
        deadline: Instant,
        failures_seen: &mut Option<u64>,
    ) -> Step {
        let Some(mode) = want.mode() else {
            if let Some(e) = t.inodes.get_mut(&ino) {
                e.apply(want);
            }
            return Step::Done(Ok(None));
        };
        if t.closed {
            return Step::Done(Err(Errno::ENOLCK));
        }
        if let Wait::Block { tid } = wait {
            if tid != 0 && signal_pending(tid) {
                return Step::Done(Err(Errno::EINTR));
            }
        }
        let acquirers = t.acquirers;
        let e = t.inodes.entry(ino).or_default();
        if let Some(conflict) = e.conflict(want) {
            return match wait {
                _ if test_only => Step::Done(Ok(Some(conflict))),
                Wait::Try => Step::Done(Err(Errno::EAGAIN)),
                Wait::Block { .. } => Step::Wait,
            };
        }
        if e.service.is_some_and(|m| m.covers(mode)) {
            if !test_only {
                e.apply(want);
            }
            return Step::Done(Ok(None));
        }
        // Another machine may hold it: ask the lock service (one acquisition at a time).
        if failures_seen.is_some_and(|n| n != e.failures) {
            return Step::Done(Err(Errno::ENOLCK));
        }
        if e.acquiring.is_none() {
            if acquirers >= ACQUIRERS_MAX {
                tracing::warn!(ino, "too many lock service acquisitions in flight");
                return Step::Done(Err(Errno::ENOLCK));
            }
            e.acquiring = Some(mode);
            *failures_seen = Some(e.failures);
            t.acquirers += 1;
            self.start_acquire(ino, mode);
        }
        if let Wait::Try = wait {
            if Instant::now() >= deadline {
                return Step::Done(if test_only { Ok(Some(another_machine())) } else { Err(Errno::EAGAIN) });
            }
        }
        Step::Wait
    }

    /// Takes the service lock of `ino` in `mode` on a thread of its own, notes it, and
    /// drops the guard (the clerk keeps the lock cached; revocations come to
    /// [`FileLocks::revoke`]).
    fn start_acquire(self: &Arc<Self>, ino: u64, mode: Mode) {
        let this = self.clone();
        let spawned = std::thread::Builder::new().name(format!("filelock-{ino}")).spawn(move || {
            let name = LockName::FileLocks(ino);
            let result = this.locks.acquire(&name, mode);
            {
                let mut t = lock(&this.table);
                t.acquirers -= 1;
                if let Err(LockError::LeaseLost) = result {
                    t.closed = true;
                }
                let e = t.inodes.entry(ino).or_default();
                e.acquiring = None;
                match &result {
                    Ok(()) => e.service = Some(e.service.map_or(mode, |m| m.max(mode))),
                    Err(err) => {
                        tracing::warn!(ino, "file lock: {err}");
                        e.failures += 1;
                    }
                }
                this.changed.notify_all();
            }
            if result.is_ok() {
                this.locks.release(&name, mode);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(ino, "start a file lock acquisition: {e}");
            let mut t = lock(&self.table);
            t.acquirers -= 1;
            let e = t.inodes.entry(ino).or_default();
            e.acquiring = None;
            e.failures += 1;
        }
    }
}

/// How a lock held on another machine is reported: the whole file, for writing, no pid.
fn another_machine() -> Range {
    Range { owner: 0, start: 0, end: OFFSET_MAX, write: true, pid: 0 }
}

/// Whether thread `tid` has a signal pending that it neither blocks nor ignores (then the
/// kernel would have interrupted the request).
pub fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return true; // gone: nobody waits for the answer
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    pending & !field("SigBlk:") & !field("SigIgn:") != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use frangipani::locks::MemLockService;

    fn want(owner: u64, start: u64, end: u64, kind: Kind) -> Want {
        Want { owner, start, end, kind, pid: owner as u32 }
    }

    fn ranges(e: &InodeLocks) -> Vec<(u64, u64, u64, bool)> {
        let mut v: Vec<_> = e.held().iter().map(|r| (r.owner, r.start, r.end, r.write)).collect();
        v.sort();
        v
    }

    #[test]
    fn posix_ranges_split_merge_and_conflict_by_owner() {
        let mut e = InodeLocks::default();
        e.apply(&want(1, 0, 99, Kind::Write));
        // An unlock in the middle splits the lock.
        e.apply(&want(1, 10, 19, Kind::Unlock));
        assert_eq!(ranges(&e), vec![(1, 0, 9, true), (1, 20, 99, true)]);
        // Relocking the hole merges the three back into one.
        e.apply(&want(1, 10, 19, Kind::Write));
        assert_eq!(ranges(&e), vec![(1, 0, 99, true)]);
        // A read lock inside a write lock converts that part only.
        e.apply(&want(1, 40, 49, Kind::Read));
        assert_eq!(ranges(&e), vec![(1, 0, 39, true), (1, 40, 49, false), (1, 50, 99, true)]);
        // Another owner: reads conflict with the write parts only.
        assert_eq!(e.conflict(&want(2, 40, 49, Kind::Read)), None);
        assert_eq!(e.conflict(&want(2, 45, 60, Kind::Read)).map(|r| r.start), Some(50));
        assert!(e.conflict(&want(2, 40, 40, Kind::Write)).is_some());
        assert_eq!(e.conflict(&want(2, 100, OFFSET_MAX, Kind::Write)), None);
        // The owner never conflicts with itself.
        assert_eq!(e.conflict(&want(1, 0, OFFSET_MAX, Kind::Write)), None);
        e.apply(&want(2, 100, OFFSET_MAX, Kind::Read));
        assert!(e.remove_owner(1));
        assert_eq!(ranges(&e), vec![(2, 100, OFFSET_MAX, false)]);
        e.apply(&want(2, 0, OFFSET_MAX, Kind::Unlock));
        assert!(e.held().is_empty());
    }

    #[test]
    fn bad_types_and_ranges_are_refused() {
        assert_eq!(Want::from_kernel(1, 5, 4, libc::F_RDLCK, 1), Err(Errno::EINVAL));
        assert_eq!(Want::from_kernel(1, 0, 4, 77, 1), Err(Errno::EINVAL));
        assert_eq!(Want::from_kernel(1, 0, 4, libc::F_WRLCK, 1).unwrap().kind, Kind::Write);
    }

    #[test]
    fn machines_conflict_per_file_through_the_lock_service() {
        let service = MemLockService::new();
        let (ca, cb) = (service.client(1), service.client(2));
        let (a, b) = (FileLocks::new(ca.clone()), FileLocks::new(cb.clone()));
        let callbacks: Vec<Arc<dyn frangipani::locks::LockCallbacks>> =
            vec![Arc::new(Revoker(a.clone())), Arc::new(Revoker(b.clone()))];
        ca.set_callbacks(Arc::downgrade(&callbacks[0]));
        cb.set_callbacks(Arc::downgrade(&callbacks[1]));
        // Readers on both machines share.
        a.set(7, want(1, 0, 9, Kind::Read), Wait::Try).unwrap();
        b.set(7, want(2, 100, 109, Kind::Read), Wait::Try).unwrap();
        // A writer on B, even on a disjoint range, must wait for A's reader (per file).
        assert_eq!(b.set(7, want(2, 200, 209, Kind::Write), Wait::Try), Err(Errno::EAGAIN));
        assert_eq!(b.test(7, want(2, 200, 209, Kind::Write)).unwrap(), Some(another_machine()));
        a.release_owner(7, 1);
        b.set(7, want(2, 200, 209, Kind::Write), Wait::Try).unwrap();
        assert_eq!(a.set(7, want(1, 0, 0, Kind::Read), Wait::Try), Err(Errno::EAGAIN));
        // A blocked writer on A goes through once B unlocks.
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.set(7, want(1, 0, OFFSET_MAX, Kind::Write), Wait::Block { tid: 0 }))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        b.set(7, want(2, 0, OFFSET_MAX, Kind::Unlock), Wait::Try).unwrap();
        waiter.join().unwrap().unwrap();
        assert_eq!(a.held(7).len(), 1);
        // Close lets everything through and grants nothing more.
        a.close();
        assert_eq!(a.set(8, want(1, 0, 0, Kind::Read), Wait::Try), Err(Errno::ENOLCK));
    }

    struct Revoker(Arc<FileLocks>);

    impl frangipani::locks::LockCallbacks for Revoker {
        fn revoke(&self, name: &LockName, wanted: Mode) {
            if let LockName::FileLocks(ino) = name {
                self.0.revoke(*ino, wanted);
            }
        }
        fn recover(&self, _slot: u32) -> Result<(), String> {
            Ok(())
        }
        fn lease_lost(&self) {
            self.0.close();
        }
    }

    #[test]
    fn a_pending_signal_is_seen_in_proc() {
        // This test thread has nothing pending.
        let tid = unsafe { libc::gettid() } as u32;
        assert!(!signal_pending(tid));
        assert!(signal_pending(u32::MAX)); // no such thread
    }
}
