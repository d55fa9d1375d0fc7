//! Child processes that never outlive their test, ports, and their logs.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process with its own process group and its output in a log file. Dropping it
/// SIGKILLs the process (by its pid) and reaps it, whatever the test did.
pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log: &Path) -> Proc {
        let name = name.into();
        let out = File::options().create(true).append(true).open(log).expect("open the process log");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Proc { child, name, log: log.to_path_buf(), stopped: false }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGSTOP: the process freezes, its sockets stay open.
    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stopped = true;
    }

    /// SIGCONT after [`Proc::stop`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then waits up to `patience` for it to exit (SIGKILL after that).
    pub fn terminate(mut self, patience: Duration) -> Option<ExitStatus> {
        if self.stopped {
            self.resume();
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ports the OS picks: bind to port 0, note the port, release it.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address").port()).collect()
}

/// `n` addresses on 127.0.0.1 with ports the OS picked.
pub fn free_addrs(n: usize) -> Vec<String> {
    free_ports(n).into_iter().map(|p| format!("127.0.0.1:{p}")).collect()
}

/// The `*.log` files in `dir`, sorted by name.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
}

/// The last `lines` lines of every log in `dir`, for failure messages.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for p in log_files(dir) {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        out += &format!("--- {}\n{}\n", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    out
}

/// The lines of the logs in `dir` that report an ERROR or a panic and match none of
/// `allowed`, each prefixed with its file name.
pub fn log_errors(dir: &Path, allowed: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for p in log_files(dir) {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for line in std::fs::read_to_string(&p).unwrap_or_default().lines() {
            let bad = line.contains(" ERROR ") || line.contains("panicked");
            if bad && !allowed.iter().any(|a| line.contains(a)) {
                out.push(format!("{name}: {line}"));
            }
        }
    }
    out
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
