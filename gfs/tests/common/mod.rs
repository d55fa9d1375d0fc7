//! A GFS cluster of real `gfs` processes on 127.0.0.1 for the process tests: 3 masters
//! and N chunkservers with short timings (20 ms Raft ticks, 200 ms heartbeats, 2 s
//! leases, 1 MiB chunks). Every process is killed by its pid (SIGKILL) and reaped when
//! the test ends, pass or fail.

#![allow(dead_code)] // each test binary uses a part

use gfs::client::{Client, ClientConfig};
use gfs::proto::{LookupReply, MasterStatus, ReadRequest};
use gfs::rpc::Conns;
use raft::NodeId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CHUNK_BYTES: u64 = 1 << 20;
pub const LEASE_MS: u64 = 2000;
pub const HEARTBEAT_MS: u64 = 200;
pub const DEAD_AFTER_MS: u64 = 1500;

/// One process; killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Child,
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
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub fn gfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gfs")
}

/// Knobs a test may change before starting the cluster.
#[derive(Clone)]
pub struct Options {
    pub chunkservers: usize,
    /// How many of them start with the cluster (the rest wait for `start_chunkserver`).
    pub running: Option<usize>,
    pub gc_grace_ms: u64,
    pub scrub_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { chunkservers: 3, running: None, gc_grace_ms: 3_600_000, scrub_ms: 0 }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub masters: BTreeMap<NodeId, String>,
    pub chunkservers: Vec<String>,
    opts: Options,
    master_procs: BTreeMap<u64, Option<Proc>>,
    cs_procs: Vec<Option<Proc>>,
    starts: usize,
}

impl Cluster {
    pub fn start(opts: Options) -> Cluster {
        let ports = free_ports(3 + opts.chunkservers);
        let masters =
            (1..=3u64).map(|i| (NodeId(i), format!("127.0.0.1:{}", ports[i as usize - 1]))).collect();
        let chunkservers = ports[3..].iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            masters,
            chunkservers,
            opts: opts.clone(),
            master_procs: BTreeMap::new(),
            cs_procs: (0..opts.chunkservers).map(|_| None).collect(),
            starts: 0,
        };
        for id in 1..=3 {
            c.start_master(id);
        }
        for i in 0..opts.running.unwrap_or(opts.chunkservers) {
            c.start_chunkserver(i);
        }
        c
    }

    pub fn masters_arg(&self) -> String {
        self.masters.iter().map(|(id, a)| format!("{}={a}", id.0)).collect::<Vec<_>>().join(",")
    }

    fn tuning(&self) -> Vec<String> {
        vec![
            "--tick-ms=20".into(),
            format!("--chunk-bytes={CHUNK_BYTES}"),
            format!("--lease-ms={LEASE_MS}"),
            format!("--heartbeat-ms={HEARTBEAT_MS}"),
            format!("--dead-after-ms={DEAD_AFTER_MS}"),
            format!("--gc-grace-ms={}", self.opts.gc_grace_ms),
            format!("--scrub-ms={}", self.opts.scrub_ms),
        ]
    }

    fn log_file(&mut self, name: &str) -> std::fs::File {
        self.starts += 1;
        let path = self.dir.path().join(format!("{name}.{}.log", self.starts));
        std::fs::File::create(path).unwrap()
    }

    pub fn start_master(&mut self, id: u64) {
        let log = self.log_file(&format!("master{id}"));
        let child = Command::new(gfs_bin())
            .args(["master", "--id", &id.to_string(), "--peers", &self.masters_arg(), "--data"])
            .arg(self.dir.path().join(format!("master{id}")))
            .args(self.tuning())
            // Checkpoints often, so restarts and catch-ups go through Raft snapshots.
            .arg("--snapshot-entries=50")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start master");
        self.master_procs.insert(id, Some(Proc { child }));
    }

    pub fn kill_master(&mut self, id: u64) {
        self.master_procs.insert(id, None);
    }

    pub fn cs_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("cs{i}"))
    }

    pub fn start_chunkserver(&mut self, i: usize) {
        let log = self.log_file(&format!("cs{i}"));
        let child = Command::new(gfs_bin())
            .args([
                "chunkserver",
                "--masters",
                &self.masters_arg(),
                "--listen",
                &self.chunkservers[i],
                "--data",
            ])
            .arg(self.cs_dir(i))
            .args(self.tuning())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chunkserver");
        self.cs_procs[i] = Some(Proc { child });
    }

    pub fn kill_chunkserver(&mut self, i: usize) {
        self.cs_procs[i] = None;
    }

    /// The chunkserver index serving at `addr`.
    pub fn cs_index(&self, addr: &str) -> usize {
        self.chunkservers.iter().position(|a| a == addr).expect("a chunkserver of this cluster")
    }

    pub fn client(&self) -> Client {
        let mut cfg = ClientConfig::new(self.masters.clone());
        cfg.deadline = Duration::from_secs(30);
        Client::new(cfg)
    }

    /// A `gfs` command against this cluster.
    pub fn gfs(&self) -> Command {
        let mut c = Command::new(gfs_bin());
        c.env("GFS_MASTERS", self.masters_arg()).env("RUST_LOG", "warn");
        c
    }

    /// Waits until files can be created and appended to.
    pub async fn wait_ready(&self) {
        let client = self.client();
        let probe = format!("/.ready-{:x}", client.id());
        let r = async {
            client.create(&probe).await?;
            client.append(&probe, b"ready").await?;
            client.delete(&probe).await
        }
        .await;
        if let Err(e) = r {
            panic!("cluster not ready: {e}\n{}", self.logs());
        }
    }

    pub async fn statuses(&self) -> Vec<(NodeId, Result<MasterStatus, String>)> {
        self.client().status().await
    }

    pub async fn leader(&self) -> Option<u64> {
        self.statuses()
            .await
            .into_iter()
            .find_map(|(id, s)| s.ok().filter(|s| s.role == "Leader").map(|_| id.0))
    }

    pub async fn leader_status(&self) -> Option<MasterStatus> {
        self.statuses().await.into_iter().find_map(|(_, s)| s.ok().filter(|s| s.role == "Leader"))
    }

    pub async fn lookup(&self, path: &str) -> LookupReply {
        self.client().lookup(path).await.expect("lookup")
    }

    /// Polls `check` until it returns `Some`, or fails the test with `what` and the logs.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads a chunk straight from one chunkserver, bypassing the master.
    pub async fn read_direct(&self, addr: &str, handle: u64, version: u64) -> Result<Vec<u8>, tonic::Status> {
        let mut c = Conns::default().chunkserver(addr)?;
        let req = ReadRequest { handle, version, offset: 0, length: CHUNK_BYTES };
        Ok(c.read(req).await?.into_inner().data.to_vec())
    }

    /// The last lines of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out +=
                &format!("--- {}\n{}\n", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }

    /// Fails the test if any log has an ERROR line not matching one of `allowed`.
    pub fn assert_no_unexpected_errors(&self, allowed: &[&str]) {
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_none_or(|e| e != "log") {
                continue;
            }
            for line in std::fs::read_to_string(&p).unwrap_or_default().lines() {
                if line.contains(" ERROR ") && !allowed.iter().any(|a| line.contains(a)) {
                    panic!("unexpected error in {}: {line}", p.display());
                }
            }
        }
    }
}

/// Flips bytes of a file at `offset`.
pub fn flip_bytes(path: &Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}
