//! A GFS cluster of real `gfs` processes on 127.0.0.1: 3 masters and N chunkservers with
//! short timings (20 ms Raft ticks, 200 ms heartbeats, 2 s leases, 1 MiB chunks). Every
//! process is killed by its pid (SIGKILL) and reaped when the cluster is dropped.

use crate::bins::bin;
use crate::process::{free_addrs, log_errors, log_tails, Proc};
use gfs::client::{Client, ClientConfig, GfsError};
use gfs::proto::{LookupReply, MasterStatus, ReadRequest};
use gfs::rpc::Conns;
use raft::NodeId;
use std::collections::BTreeMap;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `gfs` program.
pub fn gfs_bin() -> PathBuf {
    bin("gfs")
}

pub const CHUNK_BYTES: u64 = 1 << 20;
pub const LEASE_MS: u64 = 2000;
pub const HEARTBEAT_MS: u64 = 200;
pub const DEAD_AFTER_MS: u64 = 1500;

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
        let mut addrs = free_addrs(3 + opts.chunkservers);
        let chunkservers = addrs.split_off(3);
        let masters = (1..=3u64).map(NodeId).zip(addrs).collect();
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

    fn log_file(&mut self, name: &str) -> PathBuf {
        self.starts += 1;
        self.dir.path().join(format!("{name}.{}.log", self.starts))
    }

    pub fn start_master(&mut self, id: u64) {
        let log = self.log_file(&format!("master{id}"));
        let mut cmd = Command::new(gfs_bin());
        cmd.args(["master", "--id", &id.to_string(), "--peers", &self.masters_arg(), "--data"])
            .arg(self.dir.path().join(format!("master{id}")))
            .args(self.tuning())
            // Checkpoints often, so restarts and catch-ups go through Raft snapshots.
            .arg("--snapshot-entries=50")
            .env("RUST_LOG", "info");
        self.master_procs.insert(id, Some(Proc::spawn(format!("master{id}"), cmd, &log)));
    }

    pub fn kill_master(&mut self, id: u64) {
        self.master_procs.insert(id, None);
    }

    pub fn cs_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("cs{i}"))
    }

    pub fn start_chunkserver(&mut self, i: usize) {
        let log = self.log_file(&format!("cs{i}"));
        let mut cmd = Command::new(gfs_bin());
        cmd.args([
            "chunkserver",
            "--masters",
            &self.masters_arg(),
            "--listen",
            &self.chunkservers[i],
            "--data",
        ])
        .arg(self.cs_dir(i))
        .args(self.tuning())
        .env("RUST_LOG", "info");
        self.cs_procs[i] = Some(Proc::spawn(format!("cs{i}"), cmd, &log));
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
        log_tails(self.dir.path(), 15)
    }

    /// Fails the test if any log has an ERROR line (or a panic) not matching one of `allowed`.
    pub fn assert_no_unexpected_errors(&self, allowed: &[&str]) {
        let errors = log_errors(self.dir.path(), allowed);
        assert!(errors.is_empty(), "unexpected errors:\n{}", errors.join("\n"));
    }
}

/// A record of `len` bytes, tagged so that it can be told apart.
pub fn record(tag: &str, i: usize, len: usize) -> Vec<u8> {
    let mut r = format!("{tag}-{i}-").into_bytes();
    r.resize(len, b'a' + (i % 26) as u8);
    r
}

/// Reads a whole file through the client; panics on an error.
pub async fn read_all(c: &Cluster, path: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Err(e) = c.client().read(path, |_, p| out.push(p.to_vec())).await {
        panic!("read {path}: {e}\n{}", c.logs());
    }
    out
}

/// Asserts that every acknowledged record was read exactly once, and that everything
/// read was something appended (intact).
pub fn assert_each_once(acked: &[Vec<u8>], sent: &HashSet<Vec<u8>>, read: &[Vec<u8>]) {
    let mut counts: HashMap<&[u8], usize> = HashMap::new();
    for r in read {
        assert!(
            sent.contains(r),
            "read a record never appended: {:?}",
            String::from_utf8_lossy(&r[..r.len().min(40)])
        );
        *counts.entry(r).or_default() += 1;
    }
    for (r, n) in &counts {
        assert_eq!(*n, 1, "record {:?} read {n} times", String::from_utf8_lossy(&r[..r.len().min(40)]));
    }
    for a in acked {
        assert!(
            counts.contains_key(a.as_slice()),
            "acknowledged record lost: {:?}",
            String::from_utf8_lossy(&a[..a.len().min(40)])
        );
    }
}

/// Appends running in the background.
pub struct Appenders {
    pub tasks: tokio::task::JoinSet<Result<(), GfsError>>,
    /// The records acknowledged so far.
    pub acked: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Every record the tasks will append.
    pub sent: HashSet<Vec<u8>>,
}

/// `tasks` concurrent tasks appending `per_task` records each.
pub fn append_in_background(
    client: Arc<Client>,
    path: &str,
    tasks: usize,
    per_task: usize,
    len: usize,
) -> Appenders {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut sent = HashSet::new();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let records: Vec<Vec<u8>> = (0..per_task).map(|i| record(&format!("t{t}"), i, len)).collect();
        sent.extend(records.iter().cloned());
        let (client, acked, path) = (client.clone(), acked.clone(), path.to_string());
        set.spawn(async move {
            for r in records {
                client.append(&path, &r).await?;
                acked.lock().unwrap().push(r);
            }
            Ok(())
        });
    }
    Appenders { tasks: set, acked, sent }
}

pub async fn join_all(c: &Cluster, mut set: tokio::task::JoinSet<Result<(), GfsError>>) {
    while let Some(r) = set.join_next().await {
        if let Err(e) = r.unwrap() {
            panic!("append failed: {e}\n{}", c.logs());
        }
    }
}

pub async fn wait_acked(c: &Cluster, acked: &Arc<Mutex<Vec<Vec<u8>>>>, n: usize) {
    c.wait_for(&format!("{n} acknowledged appends"), Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= n).then_some(())
    })
    .await;
}

/// Waits until every chunk of `path` that holds data has `copies` live replicas at its
/// current version, none of them on `excluded`.
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
