//! Mounting and unmounting: stale mounts cleared first, one FUSE session per mount point,
//! and a clean unmount of every one on SIGINT, SIGTERM or SIGHUP.
//!
//! As root, fuser mounts with mount(2) directly and this module unmounts with umount(2);
//! `fusermount3` serves only unprivileged users: with `allow_other` (which needs
//! `user_allow_other` in `/etc/fuse.conf`) through `auto_unmount`, so that the mount goes
//! with the process; without it, fuser tries mount(2) and falls back to `fusermount3`
//! (which needs /dev/fuse to be open to the user). A mount whose process died (SIGKILL) is
//! left behind by the kernel as "Transport endpoint is not connected"; the next mount at
//! that path detaches it first.

use crate::filelock::FileLocks;
use crate::fuse::FrangipaniFs;
use crate::notify::{CoherentCallbacks, Invalidator, REVOKE_WAIT};
use crate::status::{Endpoint, Entry, Registry, SessionInfo};
use frangipani::disk::VirtualDisk;
use frangipani::locks::{LockCallbacks, Locks};
use frangipani::{Frangipani, FsError};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why mounting or serving failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A system call or helper failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: io::Error,
    },
    /// The file system failed (mounting it, or writing back at unmount).
    #[error("{what}")]
    Fs {
        /// What was being done.
        what: String,
        /// The failure.
        source: FsError,
    },
    /// A second signal cut the unmount short (everything was synced first).
    #[error("interrupted by a second signal while unmounting")]
    Interrupted,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    let what = what.into();
    move |source| MountError::Io { what, source }
}

/// How to mount.
#[derive(Clone)]
pub struct MountOptions {
    /// Shown as the source in the mount table.
    pub fsname: String,
    /// Request threads (each reads the FUSE device and answers what it reads).
    pub threads: usize,
    /// Let every user in (`allow_other`); Unix permissions are checked by the kernel
    /// (`default_permissions`) either way.
    pub allow_other: bool,
    /// The file system client's settings.
    pub config: frangipani::Config,
    /// What the lock client says of its session, for the status endpoint.
    pub session: Option<Arc<dyn SessionInfo>>,
}

impl std::fmt::Debug for MountOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountOptions")
            .field("fsname", &self.fsname)
            .field("threads", &self.threads)
            .field("allow_other", &self.allow_other)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            fsname: "frangipani".into(),
            threads: 8,
            allow_other: true,
            config: frangipani::Config::default(),
            session: None,
        }
    }
}

/// The terminating signals, blocked so that one thread can wait for them.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread it starts later.
    /// Call it first thing in `main`, before any thread exists.
    pub fn block() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(Signals { set })
        }
    }

    /// Waits for one of the signals.
    fn wait(&self) -> io::Result<i32> {
        let mut sig = 0;
        // SAFETY: `set` was built by `block`; `sig` is a valid out pointer.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

/// What the supervisor waits for.
enum Event {
    Signal(i32),
    /// A session ended (unmounted by us or by someone else).
    Ended(usize, io::Result<()>),
}

/// One mounted client.
struct Mounted {
    dir: PathBuf,
    /// Taken once written back.
    fs: Option<Arc<Frangipani>>,
    /// Held so the lock client's weak reference stays good while mounted.
    _callbacks: Arc<CoherentCallbacks>,
    session: Option<JoinHandle<()>>,
    /// Unmounts through the session, so it does not try again when it ends.
    unmounter: fuser::SessionUnmounter,
    ended: bool,
}

/// Mounts clients and serves them until a signal, then unmounts them all cleanly.
pub struct Supervisor {
    events: Sender<Event>,
    inbox: Receiver<Event>,
    mounts: Vec<Mounted>,
    /// What the status endpoint reports.
    registry: Registry,
    /// Started with the first mount.
    endpoint: Option<Endpoint>,
    /// The first write-back that failed.
    failed: Option<MountError>,
}

impl Supervisor {
    /// Starts waiting for `signals` (from [`Signals::block`]).
    pub fn new(signals: Signals) -> io::Result<Supervisor> {
        let (events, inbox) = mpsc::channel();
        let tx = events.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            match signals.wait() {
                Ok(sig) => {
                    if tx.send(Event::Signal(sig)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("sigwait: {e}");
                    return;
                }
            }
        })?;
        Ok(Supervisor {
            events,
            inbox,
            mounts: Vec::new(),
            registry: Registry::default(),
            endpoint: None,
            failed: None,
        })
    }

    /// Mounts a client of the file system on `disk` at `dir`, taking locks from `locks`,
    /// and starts serving it. `install_callbacks` hands the lock client the callbacks that
    /// keep Frangipani's and the kernel's caches coherent.
    pub fn mount(
        &mut self,
        disk: Arc<dyn VirtualDisk>,
        locks: Arc<dyn Locks>,
        install_callbacks: impl FnOnce(Weak<dyn LockCallbacks>),
        dir: &Path,
        opts: &MountOptions,
    ) -> Result<(), MountError> {
        clear_stale(dir)?;
        let dir = &dir.canonicalize().map_err(io_err(format!("mount point {}", dir.display())))?;
        let inval = Invalidator::start(REVOKE_WAIT).map_err(io_err("start the invalidation threads"))?;
        let file_locks = FileLocks::new(locks.clone());
        let raw_locks = locks.clone();
        let locks = Arc::new(inval.track(locks));
        let fs = Frangipani::mount(disk, locks, opts.config.clone()).map_err(|source| MountError::Fs {
            what: format!("mount the file system for {}", dir.display()),
            source,
        })?;
        let fs = Arc::new(fs);
        let callbacks = Arc::new(CoherentCallbacks::new(fs.callbacks(), inval.clone(), file_locks.clone()));
        let weak: Weak<CoherentCallbacks> = Arc::downgrade(&callbacks);
        install_callbacks(weak);

        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(opts.fsname.clone()),
            fuser::MountOption::Subtype("frangipani".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::RW,
        ];
        config.acl = if opts.allow_other { fuser::SessionACL::All } else { fuser::SessionACL::Owner };
        if !is_root() && opts.allow_other {
            // Through fusermount3, which also unmounts if this process dies. (Root mounts
            // with mount(2) itself; fuser refuses auto_unmount without allow_other.)
            config.mount_options.push(fuser::MountOption::AutoUnmount);
        }
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let mut session = match fuser::Session::new(
            FrangipaniFs::new(fs.clone(), inval.clone(), file_locks.clone()),
            dir,
            &config,
        ) {
            Ok(s) => s,
            Err(e) => {
                if let Ok(fs) = Arc::try_unwrap(fs) {
                    let _ = fs.unmount();
                }
                return Err(MountError::Io { what: format!("mount {}", dir.display()), source: e });
            }
        };
        inval.set_notifier(session.notifier());
        let unmounter = session.unmount_callable();
        tracing::info!(dir = %dir.display(), slot = fs.slot(), "mounted");

        let index = self.mounts.len();
        let events = self.events.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fuse-session-{index}"))
            .spawn(move || {
                let result = session.run();
                let _ = events.send(Event::Ended(index, result));
            })
            .map_err(io_err("start the session thread"))?;
        lock(&self.registry).push(Entry {
            dir: dir.to_path_buf(),
            fs: Arc::downgrade(&fs),
            locks: raw_locks,
            session: opts.session.clone(),
            file_locks,
        });
        if self.endpoint.is_none() {
            match Endpoint::start(self.registry.clone()) {
                Ok(e) => self.endpoint = Some(e),
                Err(e) => tracing::warn!("no status endpoint: {e}"),
            }
        }
        self.mounts.push(Mounted {
            dir: dir.to_path_buf(),
            fs: Some(fs),
            _callbacks: callbacks,
            session: Some(thread),
            unmounter,
            ended: false,
        });
        Ok(())
    }

    /// Serves until a signal (then unmounts everything) or until every mount has been
    /// unmounted from outside; then writes every client back. A second signal while
    /// waiting for busy mounts syncs everything and returns at once.
    pub fn run(mut self) -> Result<(), MountError> {
        let mut unmounting = false;
        while self.mounts.iter().any(|m| !m.ended) {
            let Ok(event) = self.inbox.recv() else { break };
            match event {
                Event::Signal(sig) if !unmounting => {
                    tracing::info!(sig, "signal received: unmounting");
                    unmounting = true;
                    self.unmount_all();
                }
                Event::Signal(sig) => {
                    tracing::warn!(sig, "second signal: syncing and exiting without waiting for busy mounts");
                    let _ = self.finish();
                    return Err(MountError::Interrupted);
                }
                Event::Ended(i, result) => self.ended(i, result),
            }
        }
        self.finish()
    }

    fn unmount_all(&mut self) {
        for m in self.mounts.iter_mut().filter(|m| !m.ended) {
            let result = match m.unmounter.unmount() {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(dir = %m.dir.display(), "busy: detaching lazily");
                    detach(&m.dir)
                }
                other => other,
            };
            if let Err(e) = result {
                tracing::error!(dir = %m.dir.display(), "unmount: {e}");
            }
        }
    }

    /// A session ended: the client is written back at once (and leaves the status).
    fn ended(&mut self, i: usize, result: io::Result<()>) {
        let m = &mut self.mounts[i];
        m.ended = true;
        match result {
            Ok(()) => tracing::info!(dir = %m.dir.display(), "unmounted"),
            Err(e) => tracing::error!(dir = %m.dir.display(), "session failed: {e}"),
        }
        if let Err(e) = self.write_back(i) {
            self.failed.get_or_insert(e);
        }
    }

    /// Writes client `i` back: fully if its session ended (joined first), by a sync if
    /// it still serves (busy, detached).
    fn write_back(&mut self, i: usize) -> Result<(), MountError> {
        let m = &mut self.mounts[i];
        let Some(fs) = m.fs.take() else { return Ok(()) };
        let result = if m.ended {
            if let Some(t) = m.session.take() {
                let _ = t.join();
            }
            lock(&self.registry).retain(|e| e.dir != m.dir);
            match Arc::try_unwrap(fs) {
                Ok(fs) => fs.unmount(),
                Err(fs) => {
                    tracing::warn!(dir = %m.dir.display(), "file system still referenced: syncing only");
                    fs.sync()
                }
            }
        } else {
            fs.sync()
        };
        match result {
            Ok(()) => {
                tracing::info!(dir = %m.dir.display(), "written back");
                Ok(())
            }
            Err(source) => {
                tracing::error!(dir = %m.dir.display(), "write-back at unmount: {source}");
                Err(MountError::Fs { what: format!("write back {} at unmount", m.dir.display()), source })
            }
        }
    }

    /// Writes every client back that is not yet, and reports the first failure.
    fn finish(&mut self) -> Result<(), MountError> {
        for i in 0..self.mounts.len() {
            if let Err(e) = self.write_back(i) {
                self.failed.get_or_insert(e);
            }
        }
        self.mounts.clear();
        self.endpoint = None;
        self.failed.take().map_or(Ok(()), Err)
    }
}

/// How long a supervisor dropped without `run` waits for its sessions to end.
const DROP_WAIT: Duration = Duration::from_secs(5);

impl Drop for Supervisor {
    /// A supervisor dropped without `run` (a later mount failed) unmounts what it mounted.
    fn drop(&mut self) {
        if self.mounts.is_empty() {
            return;
        }
        self.unmount_all();
        let deadline = Instant::now() + DROP_WAIT;
        while self.mounts.iter().any(|m| !m.ended) {
            match self.inbox.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Ended(i, result)) => self.ended(i, result),
                Ok(Event::Signal(_)) => {}
                Err(_) => break,
            }
        }
        let _ = self.finish();
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn c_path(dir: &Path) -> io::Result<CString> {
    CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn umount2(dir: &Path, flags: i32) -> io::Result<()> {
    let path = c_path(dir)?;
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fusermount(args: &[&str], dir: &Path) -> io::Result<()> {
    let status = Command::new("fusermount3").args(args).arg(dir).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("fusermount3 {} {}: {status}", args.join(" "), dir.display())))
    }
}

/// Unmounts `dir` (EBUSY if it is in use); its FUSE session then ends, and the process
/// serving it writes back.
pub fn unmount(dir: &Path) -> io::Result<()> {
    if is_root() {
        umount2(dir, 0)
    } else {
        fusermount(&["-u"], dir)
    }
}

/// Detaches the mount at `dir` lazily: it leaves the namespace now, and the kernel ends
/// its session once the last user lets go.
pub fn detach(dir: &Path) -> io::Result<()> {
    if is_root() {
        umount2(dir, libc::MNT_DETACH)
    } else {
        fusermount(&["-u", "-z"], dir)
    }
}

/// Detaches a mount left behind by a dead process at `dir`, if there is one. Returns
/// whether there was. Asks with statfs(2), which the kernel always passes to the file
/// system (a stat may be answered from cached attributes).
pub fn clear_stale(dir: &Path) -> Result<bool, MountError> {
    match statfs(dir) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)) => {
            tracing::warn!(dir = %dir.display(), "clearing a stale mount ({e})");
            detach(dir).map_err(io_err(format!("detach stale mount {}", dir.display())))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn statfs(dir: &Path) -> io::Result<()> {
    let path = c_path(dir)?;
    // SAFETY: plain data, filled in by statfs(2).
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut buf) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
