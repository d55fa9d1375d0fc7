//! Test harness: lock servers as real processes on 127.0.0.1 (killed by pid when
//! dropped), each optionally behind a TCP proxy (`cluster_tests::proxy`) that can cut
//! connections or partition a node, callbacks that record what the clerk asks of its
//! user, and the checker of grant/release histories.
#![allow(dead_code)] // each test file uses part of it

pub use cluster_tests::process::free_ports;
pub use cluster_tests::proxy::Proxy;
use lockserver::cluster::{format_cluster, Cluster};
use lockserver::service::proto;
use lockserver::{Callbacks, Clerk, ClerkConfig, Mode, SessionId, Slot};
use raft::NodeId;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// CLOCK_MONOTONIC in nanoseconds, as `lock-stress` logs it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A child process; SIGKILLed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u64,
    pub lease_ms: u64,
    pub tick_ms: u64,
    /// Put a [`Proxy`] in front of every node, for clients and peers alike.
    pub proxied: bool,
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options { nodes: 3, lease_ms: 2000, tick_ms: 50, proxied: false, extra_args: Vec::new() }
    }
}

/// Lock servers as processes.
pub struct Servers {
    pub dir: tempfile::TempDir,
    pub opts: Options,
    /// Where each node listens.
    pub listen: BTreeMap<NodeId, String>,
    /// Where each node is reached (its proxy, if proxied).
    pub public: BTreeMap<NodeId, String>,
    pub proxies: BTreeMap<NodeId, Arc<Proxy>>,
    pub procs: BTreeMap<NodeId, Option<Proc>>,
    starts: u64,
}

impl Servers {
    pub async fn start(opts: Options) -> Servers {
        let n = opts.nodes as usize;
        let ports = free_ports(n);
        let listen: BTreeMap<NodeId, String> =
            (1..=opts.nodes).map(|i| (NodeId(i), format!("127.0.0.1:{}", ports[i as usize - 1]))).collect();
        let mut proxies = BTreeMap::new();
        let mut public = listen.clone();
        if opts.proxied {
            for (id, addr) in &listen {
                let p = Proxy::start(addr.clone()).await;
                public.insert(*id, p.addr.clone());
                proxies.insert(*id, Arc::new(p));
            }
        }
        let mut s = Servers {
            dir: tempfile::tempdir().unwrap(),
            opts,
            listen,
            public,
            proxies,
            procs: BTreeMap::new(),
            starts: 0,
        };
        for id in s.listen.keys().copied().collect::<Vec<_>>() {
            s.start_node(id);
        }
        s
    }

    /// The cluster as clients see it.
    pub fn cluster(&self) -> BTreeMap<NodeId, String> {
        self.public.clone()
    }

    pub fn cluster_arg(&self) -> String {
        format_cluster(&self.public)
    }

    pub fn start_node(&mut self, id: NodeId) {
        // A node reaches its peers as clients do (through their proxies).
        let mut peers = self.public.clone();
        peers.insert(id, self.listen[&id].clone());
        self.starts += 1;
        let log = self.dir.path().join(format!("node{}.{}.log", id.0, self.starts));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lockserver"))
            .args(["serve", "--id", &id.0.to_string(), "--peers", &format_cluster(&peers)])
            .args(["--listen", &self.listen[&id]])
            .args([
                "--lease-ms",
                &self.opts.lease_ms.to_string(),
                "--tick-ms",
                &self.opts.tick_ms.to_string(),
            ])
            .args(&self.opts.extra_args)
            .arg("--data")
            .arg(self.dir.path().join(format!("node{}", id.0)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start lockserver");
        self.procs.insert(id, Some(Proc(child)));
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: NodeId) {
        self.procs.insert(id, None);
    }

    /// Each node's status, as it answers.
    pub async fn statuses(&self) -> BTreeMap<NodeId, proto::StatusReply> {
        let c = Cluster::new(self.public.clone());
        let mut out = BTreeMap::new();
        for id in self.public.keys() {
            if self.procs.get(id).is_some_and(|p| p.is_none()) {
                continue;
            }
            let Ok(mut client) = c.client(*id) else { continue };
            let mut request = tonic::Request::new(proto::StatusRequest {});
            request.set_timeout(Duration::from_secs(1));
            if let Ok(r) = client.status(request).await {
                out.insert(*id, r.into_inner());
            }
        }
        out
    }

    /// The leader's status, waiting for one to be elected.
    pub async fn leader(&self) -> (NodeId, proto::StatusReply) {
        let start = Instant::now();
        loop {
            for (id, s) in self.statuses().await {
                if s.leader == id.0 {
                    return (id, s);
                }
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no leader within 20 s\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tails of every node's log.
    pub fn logs(&self) -> String {
        cluster_tests::process::log_tails(self.dir.path(), 15)
    }

    /// ERROR lines and panics in every node's log.
    pub fn errors(&self) -> Vec<String> {
        cluster_tests::process::log_errors(self.dir.path(), &[])
    }

    pub fn clerk_config(&self, name: &str) -> ClerkConfig {
        let mut cfg = ClerkConfig::new(self.cluster(), name);
        cfg.rpc_timeout = Duration::from_millis(500);
        cfg
    }
}

// ---------------------------------------------------------------------------------------
// Callbacks that record
// ---------------------------------------------------------------------------------------

/// What a clerk asked of its user, with when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    RevokeStart(String, Mode),
    RevokeEnd(String, Mode),
    RecoverStart(Slot, SessionId),
    RecoverEnd(Slot, SessionId),
    LeaseLost,
}

/// Records every callback; revoke and recover take the configured time.
#[derive(Default)]
pub struct Recorder {
    pub calls: Mutex<Vec<(Instant, Call)>>,
    pub revoke_ms: AtomicU64,
    pub recover_ms: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    fn push(&self, call: Call) {
        self.calls.lock().unwrap().push((Instant::now(), call));
    }

    pub fn calls(&self) -> Vec<(Instant, Call)> {
        self.calls.lock().unwrap().clone()
    }

    /// When `call` was first recorded.
    pub fn when(&self, call: &Call) -> Option<Instant> {
        self.calls.lock().unwrap().iter().find(|(_, c)| c == call).map(|(t, _)| *t)
    }

    /// Waits for `call`.
    pub async fn wait_for(&self, call: &Call, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if let Some(t) = self.when(call) {
                return t;
            }
            assert!(Instant::now() < deadline, "no {call:?} within {within:?}; calls: {:?}", self.calls());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait::async_trait]
impl Callbacks for Recorder {
    async fn revoke(&self, lock: &str, wanted: Mode) -> Result<(), String> {
        self.push(Call::RevokeStart(lock.to_string(), wanted));
        tokio::time::sleep(Duration::from_millis(self.revoke_ms.load(Relaxed))).await;
        self.push(Call::RevokeEnd(lock.to_string(), wanted));
        Ok(())
    }
    async fn recover(&self, slot: Slot, dead: SessionId) -> Result<(), String> {
        self.push(Call::RecoverStart(slot, dead));
        tokio::time::sleep(Duration::from_millis(self.recover_ms.load(Relaxed))).await;
        self.push(Call::RecoverEnd(slot, dead));
        Ok(())
    }
    fn lease_lost(&self) {
        self.push(Call::LeaseLost);
    }
}

pub async fn connect(servers: &Servers, name: &str, callbacks: Arc<Recorder>) -> Clerk {
    Clerk::connect(servers.clerk_config(name), callbacks).await.expect("connect a clerk")
}

// ---------------------------------------------------------------------------------------
// History checker
// ---------------------------------------------------------------------------------------

/// One local hold of a lock, from a `lock-stress` log.
#[derive(Clone, Debug)]
pub struct Hold {
    pub process: usize,
    pub lock: String,
    pub mode: char,
    pub token: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Reads the holds in `lock-stress` logs. A hold open when its process reported its
/// lease lost ends there (the user must stop then); one never closed ends at the log's
/// last line.
pub fn read_holds(logs: &[PathBuf]) -> Vec<Hold> {
    let mut holds = Vec::new();
    for (process, path) in logs.iter().enumerate() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut open: BTreeMap<(String, char, u64), Vec<u64>> = BTreeMap::new();
        let mut lost_ns = None;
        let mut last_ns = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(ns) = f.first().and_then(|t| t.parse::<u64>().ok()) else { continue };
            last_ns = ns;
            match f.get(1) {
                Some(&"lost") => lost_ns = lost_ns.or(Some(ns)),
                Some(&kind @ ("acq" | "rel")) if f.len() == 5 => {
                    let key = (f[2].to_string(), f[3].chars().next().unwrap(), f[4].parse::<u64>().unwrap());
                    if kind == "acq" {
                        open.entry(key).or_default().push(ns);
                    } else {
                        let start_ns =
                            open.get_mut(&key).and_then(|v| v.pop()).expect("release without acquire");
                        let end_ns = lost_ns.map_or(ns, |l| l.min(ns));
                        holds.push(Hold {
                            process,
                            lock: key.0,
                            mode: key.1,
                            token: key.2,
                            start_ns,
                            end_ns,
                        });
                    }
                }
                _ => {}
            }
        }
        for (key, starts) in open {
            for start_ns in starts {
                let end_ns = lost_ns.unwrap_or(last_ns).max(start_ns);
                holds.push(Hold {
                    process,
                    lock: key.0.clone(),
                    mode: key.1,
                    token: key.2,
                    start_ns,
                    end_ns,
                });
            }
        }
    }
    holds
}

/// Checks that no exclusive hold of a lock overlaps another hold of it, in time and in
/// fencing-token order: a hold under a smaller token ends before an exclusive hold under
/// a larger one starts, and an exclusive hold under a smaller token ends before any hold
/// under a larger one starts. Returns the violations found.
pub fn check_holds(holds: &[Hold]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut by_lock: BTreeMap<&str, Vec<&Hold>> = BTreeMap::new();
    for h in holds {
        by_lock.entry(&h.lock).or_default().push(h);
    }
    for (lock, mut hs) in by_lock {
        // In time: each hold against every hold that started before it.
        hs.sort_by_key(|h| (h.start_ns, h.end_ns));
        let groups: Vec<Vec<&Hold>> = hs.iter().map(|h| vec![*h]).collect();
        sweep(lock, "in time", &groups, &mut violations);
        // In token order: each hold against every hold under a smaller token.
        hs.sort_by_key(|h| (h.token, h.start_ns));
        let mut groups: Vec<Vec<&Hold>> = Vec::new();
        for h in hs {
            match groups.last_mut() {
                Some(g) if g[0].token == h.token => g.push(h),
                _ => groups.push(vec![h]),
            }
        }
        sweep(lock, "in token order", &groups, &mut violations);
    }
    violations
}

/// Compares each group's holds with every hold of the groups before it: a conflicting
/// earlier hold must have ended before the later one started.
fn sweep(lock: &str, order: &str, groups: &[Vec<&Hold>], violations: &mut Vec<String>) {
    let (mut last_any, mut last_x): (Option<&Hold>, Option<&Hold>) = (None, None);
    for g in groups {
        for h in g {
            let earlier = if h.mode == 'X' { last_any } else { last_x };
            if let Some(e) = earlier.filter(|e| e.end_ns > h.start_ns) {
                violations.push(format!("{lock} ({order}): {h:?} overlaps {e:?}"));
            }
        }
        // Keep the holds that end last.
        let later = |kept: Option<&Hold>, h: &Hold| !matches!(kept, Some(e) if e.end_ns >= h.end_ns);
        for h in g {
            if later(last_any, h) {
                last_any = Some(h);
            }
            if h.mode == 'X' && later(last_x, h) {
                last_x = Some(h);
            }
        }
    }
}
