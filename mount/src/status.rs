//! The status endpoint of a mount process, and its client (`frangipani status`,
//! `frangipani umount`).
//!
//! Every mounting process serves a Unix socket `RUN_DIR/PID.sock` ([`run_dir`]:
//! `/run/frangipani` for root, else `$XDG_RUNTIME_DIR/frangipani` or
//! `/tmp/frangipani-UID`; `FRANGIPANI_RUN_DIR` overrides). A client connects and reads
//! to the end: one line per mount the process serves, tab-separated `key=value` fields
//! ([`MountStatus`]). A socket nobody answers on was left by a killed process and is
//! removed by the next client that finds it.

use frangipani::locks::Locks;
use frangipani::Frangipani;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a client waits for a mount process to answer.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// What the lock client can say of its session beyond the [`Locks`] trait.
pub trait SessionInfo: Send + Sync {
    /// The session at the lock service, as its status shows it.
    fn session(&self) -> String;
    /// Locks the client holds cached.
    fn cached_locks(&self) -> usize;
}

/// One mount, as its process reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MountStatus {
    /// The mount point.
    pub dir: PathBuf,
    /// The serving process.
    pub pid: u32,
    /// The lock-service session ("-" when unknown).
    pub session: String,
    /// The log slot.
    pub slot: u32,
    /// Milliseconds of lease left (None: no lease, an in-memory lock service).
    pub lease_left_ms: Option<u64>,
    /// Locks cached by the lock client (None: unknown).
    pub cached_locks: Option<usize>,
    /// Bytes cached (metadata sectors and data pages).
    pub cache_bytes: u64,
    /// Bytes cached and not yet written back.
    pub dirty_bytes: u64,
    /// Percent of the log slot in use.
    pub log_used_percent: f64,
    /// Files with flock or record locks held by this machine's processes.
    pub locked_files: usize,
}

impl MountStatus {
    fn to_line(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "dir={}\tpid={}\tsession={}\tslot={}\tlease_left_ms={}\tcached_locks={}\tcache_bytes={}\tdirty_bytes={}\tlog_used_percent={:.1}\tlocked_files={}",
            self.dir.display(),
            self.pid,
            self.session,
            self.slot,
            opt(self.lease_left_ms.map(|v| v.to_string())),
            opt(self.cached_locks.map(|v| v.to_string())),
            self.cache_bytes,
            self.dirty_bytes,
            self.log_used_percent,
            self.locked_files,
        )
    }

    fn parse(line: &str) -> Option<MountStatus> {
        let mut s = MountStatus::default();
        for field in line.split('\t') {
            let (k, v) = field.split_once('=')?;
            match k {
                "dir" => s.dir = PathBuf::from(v),
                "pid" => s.pid = v.parse().ok()?,
                "session" => s.session = v.to_string(),
                "slot" => s.slot = v.parse().ok()?,
                "lease_left_ms" => s.lease_left_ms = v.parse().ok(),
                "cached_locks" => s.cached_locks = v.parse().ok(),
                "cache_bytes" => s.cache_bytes = v.parse().ok()?,
                "dirty_bytes" => s.dirty_bytes = v.parse().ok()?,
                "log_used_percent" => s.log_used_percent = v.parse().ok()?,
                "locked_files" => s.locked_files = v.parse().ok()?,
                _ => {} // from a newer version
            }
        }
        (!s.dir.as_os_str().is_empty()).then_some(s)
    }
}

/// A mount as the endpoint sees it.
pub(crate) struct Entry {
    pub dir: PathBuf,
    pub fs: Weak<Frangipani>,
    pub locks: Arc<dyn Locks>,
    pub session: Option<Arc<dyn SessionInfo>>,
    pub file_locks: Arc<crate::filelock::FileLocks>,
}

impl Entry {
    fn status(&self) -> Option<MountStatus> {
        let fs = self.fs.upgrade()?;
        let stats = fs.stats();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let sector = frangipani::sector::SECTOR_BYTES as u64;
        let page = frangipani::cache::PAGE_BYTES as u64;
        Some(MountStatus {
            dir: self.dir.clone(),
            pid: std::process::id(),
            session: self.session.as_ref().map_or_else(|| "-".into(), |s| s.session()),
            slot: fs.slot(),
            lease_left_ms: self.locks.lease_expiry_ms().map(|e| e.saturating_sub(now_ms)),
            cached_locks: self.session.as_ref().map(|s| s.cached_locks()),
            cache_bytes: stats.meta_sectors as u64 * sector + stats.data_pages as u64 * page,
            dirty_bytes: stats.dirty_meta_sectors as u64 * sector + stats.dirty_data_pages as u64 * page,
            log_used_percent: stats.log_used_fraction * 100.0,
            locked_files: self.file_locks.counts().0,
        })
    }
}

/// The mounts a process serves, shared with its endpoint's thread.
pub(crate) type Registry = Arc<Mutex<Vec<Entry>>>;

/// The endpoint of this process; its socket goes when dropped.
pub(crate) struct Endpoint {
    path: PathBuf,
}

impl Endpoint {
    /// Serves `registry` on `RUN_DIR/PID.sock` from a thread of its own.
    pub fn start(registry: Registry) -> io::Result<Endpoint> {
        let dir = run_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path); // left by an earlier process with our pid
        let listener = UnixListener::bind(&path)?;
        std::thread::Builder::new().name("status".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let lines: Vec<String> = {
                    let entries = registry.lock().unwrap_or_else(|e| e.into_inner());
                    entries.iter().filter_map(Entry::status).map(|s| s.to_line()).collect()
                };
                let _ = conn.set_write_timeout(Some(ANSWER_WAIT));
                for l in lines {
                    if writeln!(conn, "{l}").is_err() {
                        break;
                    }
                }
            }
        })?;
        Ok(Endpoint { path })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the endpoints' sockets are.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FRANGIPANI_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/frangipani");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => Path::new(&d).join("frangipani"),
        None => PathBuf::from(format!("/tmp/frangipani-{uid}")),
    }
}

/// Every mount served on this machine (as far as this user can see), asking each
/// endpoint; sockets of dead processes are removed.
pub fn local_mounts() -> Vec<MountStatus> {
    let Ok(dir) = std::fs::read_dir(run_dir()) else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "sock") {
            continue;
        }
        match ask(&path) {
            Ok(mounts) => out.extend(mounts),
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                let _ = std::fs::remove_file(&path); // its process is gone
            }
            Err(e) => tracing::warn!(socket = %path.display(), "no status: {e}"),
        }
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

fn ask(socket: &Path) -> io::Result<Vec<MountStatus>> {
    let conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(ANSWER_WAIT))?;
    let mut out = Vec::new();
    for line in BufReader::new(conn).lines() {
        if let Some(s) = MountStatus::parse(&line?) {
            out.push(s);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_round_trip() {
        let s = MountStatus {
            dir: "/mnt/a b".into(),
            pid: 7,
            session: "s12".into(),
            slot: 3,
            lease_left_ms: Some(25_000),
            cached_locks: None,
            cache_bytes: 4096,
            dirty_bytes: 512,
            log_used_percent: 1.5,
            locked_files: 2,
        };
        assert_eq!(MountStatus::parse(&s.to_line()), Some(s));
        assert_eq!(MountStatus::parse("garbage"), None);
    }
}
