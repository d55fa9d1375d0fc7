//! `lockserver`: the lock service's server, status tool and benchmark.
//!
//! ```text
//! lockserver serve --id 1 --peers 1=127.0.0.1:7301,2=127.0.0.1:7302,3=127.0.0.1:7303 --data DIR [--lease-ms 30000]
//! lockserver status --cluster 1=127.0.0.1:7301,...
//! lockserver bench [--cluster ...]     # without --cluster: a local 3-node cluster of its own
//! ```

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use lockserver::cluster::{format_cluster, parse_cluster, Cluster};
use lockserver::service::{proto, serve, ServerConfig, DEFAULT_LEASE_MS};
use lockserver::table::Limits;
use lockserver::{Callbacks, Clerk, ClerkConfig, Mode, NoCallbacks, SessionId, Slot};
use raft::cluster::MemberArgs;
use raft::NodeId;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;
use tokio::time::Instant;

const DEFAULT_CLUSTER: &str = "1=127.0.0.1:7301,2=127.0.0.1:7302,3=127.0.0.1:7303";

#[derive(Parser)]
#[command(name = "lockserver", about = "The lock service: Raft-replicated locks with leases")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one lock server.
    Serve {
        #[command(flatten)]
        member: MemberArgs,
        /// Listen here instead of at this node's address in --peers (behind a proxy).
        #[arg(long)]
        listen: Option<String>,
        /// Lease length of new sessions.
        #[arg(long, default_value_t = DEFAULT_LEASE_MS)]
        lease_ms: u64,
        /// Raft tick length in milliseconds (the election timeout is 10-20 ticks).
        #[arg(long, default_value_t = 100)]
        tick_ms: u64,
        /// Snapshot after this many applied entries.
        #[arg(long, default_value_t = 10_000)]
        snapshot_entries: u64,
        /// Most locks one session may hold or wait for (the same on every node).
        #[arg(long, default_value_t = Limits::default().locks_per_session_max)]
        locks_per_session_max: usize,
        /// Most locks one session may wait for (the same on every node).
        #[arg(long, default_value_t = Limits::default().waiters_per_session_max)]
        waiters_per_session_max: usize,
    },
    /// Show each node's role, then the sessions (with lease time left), locks held,
    /// waiters and pending recoveries as the leader sees them.
    Status {
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Measure sticky and non-cached acquire+release and the hand-off latency of one
    /// exclusive lock between two clerk processes.
    Bench {
        /// An existing cluster; without it, a local 3-node cluster is started.
        #[arg(long)]
        cluster: Option<String>,
        /// Acquire+release pairs for the sticky figure.
        #[arg(long, default_value_t = 1_000_000)]
        sticky_ops: u64,
        /// Acquire+release pairs for the non-cached figure.
        #[arg(long, default_value_t = 2000)]
        cold_ops: u64,
        /// Concurrent clients of the non-cached figure (one clerk each).
        #[arg(long, default_value_t = 16)]
        cold_clients: usize,
        /// Hand-offs measured per ping-pong process.
        #[arg(long, default_value_t = 300)]
        rounds: u64,
    },
    /// One side of the ping-pong benchmark (started by `bench`): prints one hand-off
    /// latency in microseconds per line.
    #[command(hide = true)]
    Pingpong {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        rounds: u64,
        #[arg(long, default_value = "bench/ball")]
        lock: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raft::logging::init("info");
    match Cli::parse().command {
        Command::Serve {
            member,
            listen,
            lease_ms,
            tick_ms,
            snapshot_entries,
            locks_per_session_max,
            waiters_per_session_max,
        } => {
            let (id, peers) = member.members().map_err(anyhow::Error::msg)?;
            let listen = listen.unwrap_or_else(|| peers[&id].clone());
            let listen = listen.parse().with_context(|| format!("bad listen address {listen}"))?;
            let mut cfg = ServerConfig::new(id, peers, member.data);
            cfg.lease_ms = lease_ms;
            cfg.raft_tick = Duration::from_millis(tick_ms);
            cfg.snapshot_entries = snapshot_entries;
            cfg.limits.locks_per_session_max = locks_per_session_max;
            cfg.limits.waiters_per_session_max = waiters_per_session_max;
            serve(cfg, listen).await
        }
        Command::Status { cluster } => status(&cluster).await,
        Command::Bench { cluster, sticky_ops, cold_ops, cold_clients, rounds } => {
            bench(cluster, sticky_ops, cold_ops, cold_clients, rounds).await
        }
        Command::Pingpong { cluster, rounds, lock } => pingpong(&cluster, rounds, &lock).await,
    }
}

fn mode_name(mode: i32) -> &'static str {
    if mode == proto::Mode::Exclusive as i32 {
        "X"
    } else {
        "S"
    }
}

async fn status(cluster: &str) -> anyhow::Result<()> {
    let nodes = parse_cluster(cluster).map_err(anyhow::Error::msg)?;
    let c = Cluster::new(nodes.clone());
    let mut leader = None;
    for id in nodes.keys() {
        let mut client = c.client(*id)?;
        let mut request = tonic::Request::new(proto::StatusRequest {});
        request.set_timeout(Duration::from_secs(2));
        match client.status(request).await {
            Ok(r) => {
                let r = r.into_inner();
                let role = if r.leader == r.node { "leader" } else { "follower" };
                println!(
                    "node {}: {role} term={} leader={} commit={} applied={}",
                    r.node, r.term, r.leader, r.commit, r.applied
                );
                if r.leader == r.node {
                    leader = Some(r);
                }
            }
            Err(e) => println!("node {}: unreachable ({})", id.0, e.message()),
        }
    }
    let Some(s) = leader else { bail!("no leader answered") };
    println!("\n{} sessions, {} locks, last fencing token {}", s.sessions.len(), s.locks, s.last_token);
    for st in &s.sessions {
        let lease = if st.expired {
            "EXPIRED (awaiting recovery)".to_string()
        } else {
            format!("lease {:.1}s left of {:.1}s", st.lease_left_ms as f64 / 1e3, st.lease_ms as f64 / 1e3)
        };
        println!("session {} slot {} {:?}: {lease}", st.session, st.slot, st.name);
        for h in &st.holds {
            println!("    holds {} {} (token {})", h.lock, mode_name(h.mode), h.token);
        }
        for w in &st.waiting {
            println!("    waits {} {}", w.lock, mode_name(w.mode));
        }
        let unlisted = (st.holds_total + st.waiting_total) as usize - st.holds.len() - st.waiting.len();
        if unlisted > 0 {
            println!("    ... {} holds and {} waits in all", st.holds_total, st.waiting_total);
        }
    }
    for r in &s.recoveries {
        let by = if r.assigned_to == 0 {
            "waiting for a live session".to_string()
        } else {
            format!("by session {}", r.assigned_to)
        };
        println!("recovery of slot {} (dead session {}): {by}", r.slot, r.dead_session);
    }
    Ok(())
}

/// A local cluster of `serve` child processes, killed when dropped.
struct LocalCluster {
    _dir: tempfile::TempDir,
    children: Vec<tokio::process::Child>,
    cluster: String,
}

impl LocalCluster {
    async fn start() -> anyhow::Result<LocalCluster> {
        let dir = tempfile::tempdir().context("make a temporary directory")?;
        let listeners: Vec<std::net::TcpListener> =
            (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
        let nodes: BTreeMap<NodeId, String> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| Ok((NodeId(i as u64 + 1), l.local_addr()?.to_string())))
            .collect::<std::io::Result<_>>()?;
        drop(listeners);
        let cluster = format_cluster(&nodes);
        let exe = std::env::current_exe().context("find own executable")?;
        let mut children = Vec::new();
        for id in nodes.keys() {
            let child = tokio::process::Command::new(&exe)
                .args(["serve", "--id", &id.0.to_string(), "--peers", &cluster, "--data"])
                .arg(dir.path().join(format!("node{}", id.0)))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start a lock server")?;
            children.push(child);
        }
        Ok(LocalCluster { _dir: dir, children, cluster })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

async fn bench(
    cluster: Option<String>,
    sticky_ops: u64,
    cold_ops: u64,
    cold_clients: usize,
    rounds: u64,
) -> anyhow::Result<()> {
    let local = match &cluster {
        Some(_) => None,
        None => Some(LocalCluster::start().await?),
    };
    let cluster = cluster.unwrap_or_else(|| local.as_ref().expect("started").cluster.clone());
    let nodes = parse_cluster(&cluster).map_err(anyhow::Error::msg)?;
    println!(
        "lock service benchmark ({}; cluster {cluster})",
        if local.is_some() { "local 3-node cluster, fsync on" } else { "given cluster" }
    );
    let clerk = Clerk::connect(ClerkConfig::new(nodes.clone(), "bench"), Arc::new(NoCallbacks)).await?;

    // 1. A sticky lock: cached after the first grant, so no RPC.
    drop(clerk.lock("bench/sticky", Mode::Exclusive).await?);
    let start = Instant::now();
    for _ in 0..sticky_ops {
        drop(clerk.lock("bench/sticky", Mode::Exclusive).await?);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sticky acquire+release (cached, no RPC):    {:>12.0} ops/s  ({sticky_ops} ops)",
        sticky_ops as f64 / secs
    );

    // 2. Non-cached: every acquire and every release goes through Raft.
    let start = Instant::now();
    for i in 0..cold_ops.min(500) {
        let name = format!("bench/cold/{i}");
        drop(clerk.lock(&name, Mode::Exclusive).await?);
        clerk.release(&name).await?;
    }
    let n = cold_ops.min(500);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "non-cached acquire+release, 1 client:       {:>12.0} ops/s  ({:.2} ms each)",
        n as f64 / secs,
        secs * 1e3 / n as f64
    );
    let mut clerks = Vec::new();
    for i in 0..cold_clients {
        clerks.push(Arc::new(
            Clerk::connect(ClerkConfig::new(nodes.clone(), format!("bench-{i}")), Arc::new(NoCallbacks))
                .await?,
        ));
    }
    let start = Instant::now();
    let per_client = cold_ops / cold_clients as u64;
    let mut tasks = Vec::new();
    for (c, clerk) in clerks.iter().enumerate() {
        let clerk = clerk.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let name = format!("bench/cold/{c}/{i}");
                drop(clerk.lock(&name, Mode::Exclusive).await?);
                clerk.release(&name).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = per_client * cold_clients as u64;
    println!(
        "non-cached acquire+release, {cold_clients} clients:     {:>12.0} ops/s  ({total} ops)",
        total as f64 / secs
    );

    // 3. Ping-pong between two processes.
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Vec<u64>>(2);
    for _ in 0..2 {
        let mut child = tokio::process::Command::new(&exe)
            .args(["pingpong", "--cluster", &cluster, "--rounds", &rounds.to_string()])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut out = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "done" {
                    break;
                }
                if let Ok(us) = line.trim().parse::<u64>() {
                    out.push(us);
                }
            }
            let _ = done_tx.send(out).await;
        });
        children.push(child);
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for _ in 0..2 {
        let samples = tokio::time::timeout(Duration::from_secs(300), done_rx.recv())
            .await
            .context("ping-pong took too long")?
            .context("ping-pong side vanished")?;
        for us in samples {
            hist.record(us)?;
        }
    }
    for mut child in children {
        drop(child.stdin.take()); // both sides are done: let them close
        let status = child.wait().await?;
        if !status.success() {
            bail!("a ping-pong process failed: {status}");
        }
    }
    println!(
        "hand-off of one exclusive lock between 2 processes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} hand-offs)",
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
        hist.len()
    );
    for c in clerks {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await?;
        }
    }
    clerk.close().await?;
    Ok(())
}

/// Wakes the ping-pong loop when the lock has been taken away.
struct Revoked(Notify);

#[async_trait::async_trait]
impl Callbacks for Revoked {
    async fn revoke(&self, _lock: &str, _wanted: Mode) -> Result<(), String> {
        self.0.notify_one();
        Ok(())
    }
    async fn recover(&self, _slot: Slot, _dead: SessionId) -> Result<(), String> {
        Ok(())
    }
    fn lease_lost(&self) {}
}

/// Takes `lock` exclusive again and again, each time while the other side holds it cached
/// and idle, until stdin closes. Prints the first `rounds` latencies (request -> revoke
/// -> the holder's release -> grant) in microseconds, then `done`.
async fn pingpong(cluster: &str, rounds: u64, lock: &str) -> anyhow::Result<()> {
    let nodes = parse_cluster(cluster).map_err(anyhow::Error::msg)?;
    let revoked = Arc::new(Revoked(Notify::new()));
    let clerk = Clerk::connect(ClerkConfig::new(nodes, "pingpong"), revoked.clone()).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_on_eof = stop.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
        stop_on_eof.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let mut measured = 0;
    let mut first = true;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
        let start = Instant::now();
        let guard = clerk.lock(lock, Mode::Exclusive).await?;
        let took = start.elapsed();
        drop(guard);
        // The first acquire finds the lock free; every later one takes it from the other.
        if !first && measured < rounds {
            println!("{}", took.as_micros());
            measured += 1;
            if measured == rounds {
                println!("done");
            }
        }
        first = false;
        // Wait until the other side takes it, then give it time to settle in its cache.
        if tokio::time::timeout(Duration::from_secs(1), revoked.0.notified()).await.is_err() {
            continue; // the other side is done or slow
        }
        while clerk.cached(lock).is_some() && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    clerk.close().await?;
    Ok(())
}
