//! A real FUSE mount for tests: `frangipani mount-memory` as a child process, unmounted
//! and killed when the guard drops, whatever the test did.

#![allow(dead_code)]

pub use cluster_tests::frangipani::set_mode;
pub use cluster_tests::fuse::{detach, fuse_available, is_mounted, statfs_ok};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a mount may take to appear or a process to exit.
const PATIENCE: Duration = Duration::from_secs(20);

/// A `frangipani mount-memory` process and its mount points.
pub struct Mount {
    child: Option<Child>,
    dirs: Vec<PathBuf>,
    log: PathBuf,
    tmp: tempfile::TempDir,
    /// The `frangipani` arguments.
    args: Vec<std::ffi::OsString>,
}

impl Mount {
    /// Mounts one client.
    pub fn start() -> Mount {
        Mount::start_clients(1)
    }

    /// Mounts `n` clients of one in-memory file system (as `n` machines).
    pub fn start_clients(n: usize) -> Mount {
        let tmp = tempfile::Builder::new().prefix("frangipani-mount-").tempdir().expect("tempdir");
        // Other users must be able to reach the mount points (allow_other tests).
        set_mode(tmp.path(), 0o755);
        let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.path().join(format!("mnt{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir(d).expect("create mount point");
        }
        let log = tmp.path().join("mount.log");
        let mut args = vec![std::ffi::OsString::from("mount-memory")];
        args.extend(dirs.iter().map(|d| d.clone().into_os_string()));
        let mut m = Mount { child: None, dirs, log, tmp, args };
        m.spawn();
        m
    }

    /// Runs `frangipani` with the arguments `args(mount point, scratch dir)` gives, for a
    /// command that mounts one directory (`up`, `mount`). It runs in a process group of its
    /// own, so whatever it starts is stopped with it.
    pub fn command(args: impl FnOnce(&Path, &Path) -> Vec<std::ffi::OsString>) -> Mount {
        let tmp = tempfile::Builder::new().prefix("frangipani-mount-").tempdir().expect("tempdir");
        set_mode(tmp.path(), 0o755);
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).expect("create mount point");
        let args = args(&dir, tmp.path());
        let log = tmp.path().join("mount.log");
        let mut m = Mount { child: None, dirs: vec![dir], log, tmp, args };
        m.spawn();
        m
    }

    /// Starts the process again at the same mount points (after a kill).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_frangipani"))
            .args(&self.args)
            .process_group(0)
            .env("RUST_LOG", std::env::var("FRANGIPANI_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start frangipani mount-memory");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        // Mounted, and served (a stale mount left by a killed process is listed too, and
        // a stat may be answered from cached attributes; statfs always asks the server).
        while !self.dirs.iter().all(|d| is_mounted(d) && statfs_ok(d)) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("mount-memory exited with {status} before mounting:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "not mounted after {PATIENCE:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first mount point.
    pub fn dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// Mount point `i`.
    pub fn dir_of(&self, i: usize) -> &Path {
        &self.dirs[i]
    }

    /// A scratch directory outside the mount.
    pub fn scratch(&self) -> PathBuf {
        let p = self.tmp.path().join("scratch");
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// What the process logged.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mount process did not exit within {PATIENCE:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then checks it exited cleanly, unmounted everything and logged no error.
    pub fn stop(self) {
        self.stop_checking(true)
    }

    /// SIGTERM, then checks it exited cleanly and unmounted everything; with
    /// `strict`, also that it logged no ERROR or WARN.
    pub fn stop_checking(mut self, strict: bool) {
        self.signal(libc::SIGTERM);
        let status = self.wait();
        let log = self.log();
        assert!(status.success(), "mount process exited with {status}:\n{log}");
        for d in &self.dirs {
            assert!(!is_mounted(d), "{} still mounted after SIGTERM", d.display());
        }
        let unexpected = log.lines().any(|l| (l.contains(" ERROR ") || l.contains(" WARN ")) && !benign(l));
        assert!(!strict || !unexpected, "unexpected ERROR or WARN in the log:\n{log}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The child leads a process group of its own: signal all of it.
            // SAFETY: kill(2) on the process group of our own child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
        for d in &self.dirs {
            if is_mounted(d) {
                detach(d);
            }
        }
    }
}

/// Log lines that are expected: the kernel drops requests still queued when the file system
/// is unmounted (a close's RELEASE, say), and fuser reports that their replies found nobody.
pub fn benign(line: &str) -> bool {
    line.contains("fuser::reply: Failed to send FUSE reply: No such file or directory")
}

/// Runs a shell script in `dir`; panics unless it succeeds; returns its stdout.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = sh_output(dir, script);
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell script in `dir`.
pub fn sh_output(dir: &Path, script: &str) -> Output {
    Command::new("sh").arg("-c").arg(script).current_dir(dir).output().expect("run sh")
}

/// Whether a command is on the PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A C string of a path.
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path")
}

/// The last OS error's number.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A `flock` command holding a lock on `file` until dropped (its stdin closes), started
/// with `args` (`-x`, `-s`); returns once it holds the lock.
pub struct FlockHolder {
    child: Child,
}

impl FlockHolder {
    /// Starts `flock ARGS FILE` holding until dropped; waits until it holds the lock.
    pub fn start(args: &[&str], file: &Path, scratch: &Path) -> FlockHolder {
        let ready = scratch.join(format!("flock-ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        let child = Command::new("flock")
            .args(args)
            .arg(file)
            .arg("-c")
            .arg(format!("touch {} && cat >/dev/null", ready.display()))
            .stdin(Stdio::piped())
            .spawn()
            .expect("start flock");
        let mut holder = FlockHolder { child };
        let deadline = Instant::now() + PATIENCE;
        while !ready.exists() {
            if let Some(status) = holder.child.try_wait().expect("wait") {
                panic!("flock {args:?} {} exited with {status}", file.display());
            }
            assert!(Instant::now() < deadline, "flock did not take the lock");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&ready);
        holder
    }

    /// Lets the lock go and checks that the holder exited cleanly.
    pub fn release(mut self) {
        drop(self.child.stdin.take());
        let status = wait_for(&mut self.child, PATIENCE).expect("flock holder did not exit");
        assert!(status.success(), "flock holder exited with {status}");
    }
}

impl Drop for FlockHolder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if wait_for(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits up to `patience` for `child` to exit.
pub fn wait_for(child: &mut Child, patience: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (by its pid) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// fcntl(fd, cmd, lock) with a whole-file lock of type `typ`; returns the lock as the
/// kernel left it, or the errno.
pub fn fcntl_lock(file: &std::fs::File, cmd: i32, typ: i32) -> Result<libc::flock, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain data, every field set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: a valid fd and a valid flock struct.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc == 0 {
        Ok(fl)
    } else {
        Err(errno())
    }
}

/// flock and POSIX record locks on `a` and `b`, the same file system mounted on two
/// machines: each machine's locks hold against the other's, a blocked waiter proceeds
/// when the holder lets go, and a signal ends a blocked wait.
pub fn file_locks_hold_across_machines(a: &Path, b: &Path, scratch: &Path) {
    std::fs::write(a.join("f"), b"locked").unwrap();
    let try_flock = |dir: &Path| {
        Command::new("flock").args(["-n", "-x"]).arg(dir.join("f")).arg("true").status().unwrap().success()
    };

    // flock -x on A: flock -n fails on B, and on A for another open file.
    let holder = FlockHolder::start(&["-x"], &a.join("f"), scratch);
    assert!(!try_flock(b), "B took an exclusive flock A holds");
    assert!(!try_flock(a), "a second open file on A took an exclusive flock A holds");
    holder.release();
    assert!(try_flock(b), "B could not take the flock A let go");
    assert!(try_flock(a), "A could not take the flock back");

    // Shared flocks on both machines at once.
    let sa = FlockHolder::start(&["-s"], &a.join("f"), scratch);
    let sb = FlockHolder::start(&["-s"], &b.join("f"), scratch);
    assert!(!try_flock(a));
    sa.release();
    sb.release();

    // A blocked waiter on B proceeds when A lets go.
    let holder = FlockHolder::start(&["-x"], &a.join("f"), scratch);
    let got = scratch.join("waiter-got-it");
    let _ = std::fs::remove_file(&got);
    let mut waiter = Killed(
        Command::new("flock")
            .arg("-x")
            .arg(b.join("f"))
            .arg("-c")
            .arg(format!("touch {}", got.display()))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(700));
    assert!(!got.exists() && waiter.0.try_wait().unwrap().is_none(), "the waiter did not wait");
    holder.release();
    let status = wait_for(&mut waiter.0, PATIENCE).expect("the waiter still waits after A let go");
    assert!(status.success() && got.exists(), "waiter: {status}");

    // A signal ends a blocked wait (the kernel would otherwise wait for the lock).
    let holder = FlockHolder::start(&["-x"], &a.join("f"), scratch);
    let mut waiter = Killed(Command::new("flock").arg("-x").arg(b.join("f")).arg("true").spawn().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(waiter.0.try_wait().unwrap().is_none(), "the waiter did not wait");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(waiter.0.id() as i32, libc::SIGTERM) };
    let status = wait_for(&mut waiter.0, Duration::from_secs(5)).expect("a signalled waiter still waits");
    assert!(!status.success());
    holder.release();

    // fcntl: a write lock on A; F_SETLK on B fails with EAGAIN, F_GETLK reports a lock.
    let fa = std::fs::OpenOptions::new().read(true).write(true).open(a.join("f")).unwrap();
    let fb = std::fs::OpenOptions::new().read(true).write(true).open(b.join("f")).unwrap();
    fcntl_lock(&fa, libc::F_SETLK, libc::F_WRLCK).expect("F_SETLK on A");
    assert_eq!(fcntl_lock(&fb, libc::F_SETLK, libc::F_WRLCK).err(), Some(libc::EAGAIN));
    assert_eq!(fcntl_lock(&fb, libc::F_SETLK, libc::F_RDLCK).err(), Some(libc::EAGAIN));
    let seen = fcntl_lock(&fb, libc::F_GETLK, libc::F_RDLCK).expect("F_GETLK on B");
    assert_eq!(seen.l_type, libc::F_WRLCK as i16, "F_GETLK on B did not report A's lock");
    // Unlocked on A (by F_UNLCK), B takes it; closing B's file lets A take it again.
    fcntl_lock(&fa, libc::F_SETLK, libc::F_UNLCK).expect("F_UNLCK on A");
    fcntl_lock(&fb, libc::F_SETLK, libc::F_WRLCK).expect("F_SETLK on B after A unlocked");
    let seen = fcntl_lock(&fa, libc::F_GETLK, libc::F_WRLCK).expect("F_GETLK on A");
    assert_ne!(seen.l_type, libc::F_UNLCK as i16);
    drop(fb);
    fcntl_lock(&fa, libc::F_SETLK, libc::F_WRLCK).expect("F_SETLK on A after B closed");
    drop(fa);
}
