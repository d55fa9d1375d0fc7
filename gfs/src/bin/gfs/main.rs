//! `gfs`: run GFS mode and use it.
//!
//! ```text
//! gfs up DIR                          # 3 masters (7401-7403) + 3 chunkservers (7411-7413)
//! gfs create /logs/a
//! seq 1000 | gfs append /logs/a       # one record per line
//! gfs append /logs/a --file x.bin     # a whole file as one record
//! gfs read /logs/a                    # each record once, one per line
//! gfs ls /logs ; gfs stat /logs/a ; gfs snapshot /logs/a /logs/a.snap ; gfs rm /logs/a
//! gfs status                          # masters' roles, chunkservers, replication
//! gfs master --id 1 --peers 1=HOST:PORT,2=...,3=... --data DIR
//! gfs chunkserver --masters 1=HOST:PORT,... --data DIR --listen HOST:PORT
//! gfs bench                           # record-append and read throughput vs a local file
//! ```

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use gfs::chunkserver::{self, ChunkserverConfig};
use gfs::client::{Client, ClientConfig};
use gfs::master::{self, MasterConfig};
use raft::NodeId;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod bench;

/// The master group `gfs up` starts, and the default everywhere else.
const DEFAULT_MASTERS: &str = "1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403";

#[derive(Parser)]
#[command(name = "gfs", about = "GFS mode: a Raft-replicated master, chunkservers and record append")]
struct Cli {
    /// The master group, as ID=HOST:PORT pairs.
    #[arg(long, global = true, env = "GFS_MASTERS", default_value = DEFAULT_MASTERS)]
    masters: String,
    /// Let a follower answer metadata reads (possibly stale, like GFS's shadow masters).
    #[arg(long, global = true)]
    stale: bool,
    /// How long a command keeps retrying, in seconds.
    #[arg(long, global = true, default_value_t = 60)]
    deadline_secs: u64,
    #[command(subcommand)]
    command: Command,
}

/// Knobs shared by the servers (and passed on by `up` and `bench`).
#[derive(Args, Clone, Debug)]
struct Tuning {
    /// Raft tick of the masters, in ms (elections take 10 to 20 ticks).
    #[arg(long, default_value_t = 100)]
    tick_ms: u64,
    /// Chunk size (a multiple of 64K; K, M and G suffixes allowed).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    chunk_bytes: u64,
    /// Copies of each chunk.
    #[arg(long, default_value_t = gfs::types::DEFAULT_REPLICAS)]
    replicas: usize,
    /// Lease length, in ms.
    #[arg(long, default_value_t = gfs::types::DEFAULT_LEASE_MS)]
    lease_ms: u64,
    /// Chunkserver heartbeat interval, in ms.
    #[arg(long, default_value_t = gfs::types::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// A chunkserver unheard of for this long is dead, in ms.
    #[arg(long, default_value_t = gfs::types::DEFAULT_DEAD_AFTER_MS)]
    dead_after_ms: u64,
    /// How long deleted files stay in the trash, in ms (default 3 days).
    #[arg(long, default_value_t = gfs::types::DEFAULT_GC_GRACE_MS)]
    gc_grace_ms: u64,
    /// Most re-replications at once.
    #[arg(long, default_value_t = 2)]
    clones_max: usize,
    /// Interval of the chunkserver's scrubber (one idle chunk verified each), in ms; 0: off.
    #[arg(long, default_value_t = 10_000)]
    scrub_ms: u64,
}

impl Tuning {
    /// The same knobs as command-line arguments, for child processes.
    fn args(&self) -> Vec<String> {
        vec![
            format!("--tick-ms={}", self.tick_ms),
            format!("--chunk-bytes={}", self.chunk_bytes),
            format!("--replicas={}", self.replicas),
            format!("--lease-ms={}", self.lease_ms),
            format!("--heartbeat-ms={}", self.heartbeat_ms),
            format!("--dead-after-ms={}", self.dead_after_ms),
            format!("--gc-grace-ms={}", self.gc_grace_ms),
            format!("--clones-max={}", self.clones_max),
            format!("--scrub-ms={}", self.scrub_ms),
        ]
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a local cluster (3 masters, 3 chunkservers) with its data under DIR, until
    /// Ctrl-C or SIGTERM.
    Up {
        /// Data directory (one subdirectory per server, logs in DIR/logs).
        dir: PathBuf,
        /// Port of master 1; masters take 3 ports from it, chunkservers from it + 10.
        #[arg(long, default_value_t = 7401)]
        base_port: u16,
        /// Number of chunkservers.
        #[arg(long, default_value_t = 3)]
        chunkservers: usize,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Run one master.
    Master {
        /// This master's id (as in --peers).
        #[arg(long)]
        id: u64,
        /// Every master as ID=HOST:PORT (this one included).
        #[arg(long)]
        peers: String,
        /// Data directory.
        #[arg(long)]
        data: PathBuf,
        /// Checkpoint the log after this many entries.
        #[arg(long, default_value_t = 10_000)]
        snapshot_entries: u64,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Run one chunkserver.
    Chunkserver {
        /// Data directory.
        #[arg(long)]
        data: PathBuf,
        /// Where to listen (port 0: any).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The address others reach this server at (default: the bound address).
        #[arg(long, default_value = "")]
        advertise: String,
        /// Push buffer size.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        buffer_bytes: u64,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Create an empty file.
    Create { path: String },
    /// Append records: each line of stdin (without its newline), or each --file whole.
    Append {
        path: String,
        /// Append these files, each as one record, instead of reading stdin.
        #[arg(long = "file")]
        files: Vec<PathBuf>,
        /// Appends in flight at once.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Echo each record to stdout once it is acknowledged.
        #[arg(long)]
        echo: bool,
    },
    /// Print every record of a file once, one per line.
    Read {
        path: String,
        /// End records with NUL instead of newline.
        #[arg(long)]
        null: bool,
        /// Print only how many records there are.
        #[arg(long)]
        count: bool,
    },
    /// List a directory.
    Ls {
        #[arg(default_value = "/")]
        dir: String,
    },
    /// Show a file's chunks: versions, leases, replicas.
    Stat { path: String },
    /// Delete a file (its chunks are reclaimed after the grace period).
    Rm { path: String },
    /// Make DST a copy-on-write snapshot of SRC.
    Snapshot { src: String, dst: String },
    /// Show the masters' roles and the chunkservers they know.
    Status,
    /// Benchmark record append and sequential reads against a local file.
    Bench(bench::BenchArgs),
}

/// Parses `64M`, `1m`, `65536`, `64K`, `1G` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "" => 1,
                other => return Err(format!("unknown size suffix {other:?}")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

fn parse_cluster(s: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    raft::cluster::parse_cluster(s).map_err(anyhow::Error::msg)
}

fn master_config(id: NodeId, peers: BTreeMap<NodeId, String>, data: PathBuf, t: &Tuning) -> MasterConfig {
    let mut cfg = MasterConfig::new(id, peers, data);
    cfg.tick = Duration::from_millis(t.tick_ms);
    cfg.chunk_bytes = t.chunk_bytes;
    cfg.replicas = t.replicas;
    cfg.lease = Duration::from_millis(t.lease_ms);
    cfg.heartbeat = Duration::from_millis(t.heartbeat_ms);
    cfg.dead_after = Duration::from_millis(t.dead_after_ms);
    cfg.gc_grace = Duration::from_millis(t.gc_grace_ms);
    cfg.clones_max = t.clones_max;
    cfg
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raft::logging::init("info");
    let cli = Cli::parse();
    let client_cfg = || -> anyhow::Result<ClientConfig> {
        let mut cfg = ClientConfig::new(parse_cluster(&cli.masters)?);
        cfg.allow_stale = cli.stale;
        cfg.deadline = Duration::from_secs(cli.deadline_secs);
        Ok(cfg)
    };
    match &cli.command {
        Command::Up { dir, base_port, chunkservers, tuning } => {
            up(dir, *base_port, *chunkservers, tuning).await
        }
        Command::Master { id, peers, data, snapshot_entries, tuning } => {
            let peers = parse_cluster(peers)?;
            let id = NodeId(*id);
            let listen = peers.get(&id).with_context(|| format!("--peers does not list master {}", id.0))?;
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
            let mut cfg = master_config(id, peers, data.clone(), tuning);
            cfg.snapshot_entries = *snapshot_entries;
            master::serve(cfg, listener).await
        }
        Command::Chunkserver { data, listen, advertise, buffer_bytes, tuning } => {
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
            let mut cfg = ChunkserverConfig::new(data.clone(), parse_cluster(&cli.masters)?);
            cfg.advertise = advertise.clone();
            cfg.heartbeat = Duration::from_millis(tuning.heartbeat_ms);
            cfg.buffer_bytes = *buffer_bytes;
            cfg.scrub_interval = Duration::from_millis(tuning.scrub_ms);
            chunkserver::serve(cfg, listener).await
        }
        Command::Create { path } => {
            Client::new(client_cfg()?).create(path).await?;
            Ok(())
        }
        Command::Append { path, files, parallel, echo } => {
            append(client_cfg()?, path, files, *parallel, *echo).await
        }
        Command::Read { path, null, count } => {
            let client = Client::new(client_cfg()?);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut write_error = None;
            let stats = client
                .read(path, |_, payload| {
                    if *count || write_error.is_some() {
                        return;
                    }
                    let r =
                        out.write_all(payload).and_then(|_| out.write_all(if *null { b"\0" } else { b"\n" }));
                    if let Err(e) = r {
                        write_error = Some(e);
                    }
                })
                .await?;
            if let Some(e) = write_error {
                return Err(e).context("write stdout");
            }
            if *count {
                writeln!(out, "{}", stats.records)?;
            }
            out.flush()?;
            eprintln!(
                "gfs: {} records, {} duplicates dropped, {} bytes of padding or damage skipped{}",
                stats.records,
                stats.duplicates,
                stats.skipped_bytes,
                if stats.stale { " (from a follower: possibly stale)" } else { "" }
            );
            Ok(())
        }
        Command::Ls { dir } => {
            let (entries, stale) = Client::new(client_cfg()?).list(dir).await?;
            for e in entries {
                if e.is_dir {
                    println!("{}/", e.name);
                } else {
                    println!("{}\t{} chunks", e.name, e.chunks);
                }
            }
            if stale {
                eprintln!("gfs: answered by a follower: possibly stale");
            }
            Ok(())
        }
        Command::Stat { path } => {
            let info = Client::new(client_cfg()?).lookup(path).await?;
            println!(
                "{}: {} chunks of {} bytes{}",
                info.path,
                info.chunks.len(),
                info.chunk_bytes,
                if info.stale { " (possibly stale)" } else { "" }
            );
            for c in &info.chunks {
                let replicas: Vec<String> =
                    c.replicas.iter().map(|r| format!("{}(v{},{}B)", r.addr, r.version, r.length)).collect();
                let primary = c
                    .replicas
                    .iter()
                    .find(|r| r.server == c.primary && c.primary != 0)
                    .map_or("-".to_string(), |r| r.addr.clone());
                println!(
                    "chunk {} handle {:016x} version {} refs {} primary {} replicas {}",
                    c.index,
                    c.handle,
                    c.version,
                    c.refs,
                    primary,
                    replicas.join(" ")
                );
            }
            Ok(())
        }
        Command::Rm { path } => {
            Client::new(client_cfg()?).delete(path).await?;
            Ok(())
        }
        Command::Snapshot { src, dst } => {
            Client::new(client_cfg()?).snapshot(src, dst).await?;
            Ok(())
        }
        Command::Status => status(client_cfg()?).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

/// `gfs append`: records from stdin lines or whole files, up to `parallel` in flight.
async fn append(
    cfg: ClientConfig,
    path: &str,
    files: &[PathBuf],
    parallel: usize,
    echo: bool,
) -> anyhow::Result<()> {
    let client = std::sync::Arc::new(Client::new(cfg));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(parallel.max(1) * 2);
    let files = files.to_vec();
    // Reading stdin blocks; it runs on its own thread.
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if files.is_empty() {
            for line in std::io::stdin().lock().split(b'\n') {
                if tx.blocking_send(line.context("read stdin")?).is_err() {
                    break;
                }
            }
        } else {
            for f in files {
                let data = std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
                if tx.blocking_send(data).is_err() {
                    break;
                }
            }
        }
        Ok(())
    });
    let mut inflight = tokio::task::JoinSet::new();
    let mut appended = 0u64;
    let mut finish = |r: Result<anyhow::Result<Vec<u8>>, tokio::task::JoinError>| -> anyhow::Result<()> {
        let record = r??;
        appended += 1;
        if echo {
            let mut out = std::io::stdout().lock();
            out.write_all(&record)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        Ok(())
    };
    while let Some(record) = rx.recv().await {
        while inflight.len() >= parallel.max(1) {
            if let Some(r) = inflight.join_next().await {
                finish(r)?;
            }
        }
        let client = client.clone();
        let path = path.to_string();
        inflight.spawn(async move {
            client.append(&path, &record).await.with_context(|| format!("append to {path}"))?;
            Ok(record)
        });
    }
    while let Some(r) = inflight.join_next().await {
        finish(r)?;
    }
    reader.await??;
    eprintln!("gfs: appended {appended} records to {path}");
    Ok(())
}

/// `gfs status`.
async fn status(cfg: ClientConfig) -> anyhow::Result<()> {
    let client = Client::new(cfg);
    let mut leader_servers = None;
    for (id, s) in client.status().await {
        match s {
            Ok(s) => {
                println!(
                    "master {}: {} term={} leader={} commit={} applied={} files={} chunks={} under-replicated={} clones={} stale-found={}",
                    id.0, s.role, s.term, s.leader, s.commit, s.applied, s.files, s.chunks, s.under_replicated,
                    s.clones_done, s.stale_found
                );
                if s.role == "Leader" {
                    leader_servers = Some(s.servers);
                }
            }
            Err(e) => println!("master {}: unreachable ({e})", id.0),
        }
    }
    match leader_servers {
        Some(servers) => {
            for s in servers {
                println!(
                    "chunkserver {:016x} {} {} chunks={} used={}B last-heard={}ms",
                    s.server,
                    s.addr,
                    if s.alive { "alive" } else { "DEAD" },
                    s.chunks,
                    s.used_bytes,
                    s.last_heard_ms
                );
            }
        }
        None => println!("no leader"),
    }
    Ok(())
}

/// The child processes of a local cluster; killed (SIGKILL) and reaped when dropped.
struct LocalCluster {
    children: Vec<(String, tokio::process::Child)>,
    /// The masters, as `--masters` takes them.
    masters: String,
    /// The chunkservers' addresses.
    chunkservers: Vec<String>,
}

impl LocalCluster {
    /// Starts 3 masters on `base_port..base_port+3` and `chunkservers` chunkservers from
    /// `base_port + 10`, with data and logs under `dir`.
    fn start(
        dir: &Path,
        base_port: u16,
        chunkservers: usize,
        tuning: &Tuning,
    ) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("create {}", dir.display()))?;
        let exe = std::env::current_exe().context("find own executable")?;
        let masters: Vec<String> =
            (0..3u16).map(|i| format!("{}=127.0.0.1:{}", i + 1, base_port + i)).collect();
        let masters = masters.join(",");
        let mut cluster =
            LocalCluster { children: Vec::new(), masters: masters.clone(), chunkservers: Vec::new() };
        let log = |name: &str| -> anyhow::Result<std::fs::File> {
            let path = dir.join("logs").join(format!("{name}.log"));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))
        };
        for id in 1..=3u16 {
            let name = format!("master{id}");
            let child = tokio::process::Command::new(&exe)
                .args(["master", "--id", &id.to_string(), "--peers", &masters, "--data"])
                .arg(dir.join(&name))
                .args(tuning.args())
                .stdout(std::process::Stdio::null())
                .stderr(log(&name)?)
                .kill_on_drop(true)
                .spawn()
                .context("start a master")?;
            cluster.children.push((name, child));
        }
        for i in 0..chunkservers {
            let name = format!("cs{}", i + 1);
            let addr = format!("127.0.0.1:{}", base_port as usize + 10 + i);
            let child = tokio::process::Command::new(&exe)
                .args(["chunkserver", "--masters", &masters, "--listen", &addr, "--data"])
                .arg(dir.join(&name))
                .args(tuning.args())
                .stdout(std::process::Stdio::null())
                .stderr(log(&name)?)
                .kill_on_drop(true)
                .spawn()
                .context("start a chunkserver")?;
            cluster.children.push((name, child));
            cluster.chunkservers.push(addr);
        }
        Ok(cluster)
    }

    /// Waits until a file can be created and appended to (a leader, live chunkservers).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut cfg = ClientConfig::new(parse_cluster(&self.masters)?);
        cfg.deadline = timeout;
        let client = Client::new(cfg);
        let probe = format!("/.ready-{:x}", client.id());
        client.create(&probe).await.context("no master leader")?;
        client.append(&probe, b"ready").await.context("no chunkservers")?;
        client.delete(&probe).await?;
        Ok(())
    }

    /// Reports (once) the children that exited.
    fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.children.retain_mut(|(name, child)| match child.try_wait() {
            Ok(Some(status)) => {
                out.push(format!("{name} exited ({status})"));
                false
            }
            _ => true,
        });
        out
    }

    /// Kills every child and waits for it.
    pub async fn stop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill().await;
        }
        self.children.clear();
    }
}

/// `gfs up`.
async fn up(dir: &Path, base_port: u16, chunkservers: usize, tuning: &Tuning) -> anyhow::Result<()> {
    if chunkservers == 0 {
        bail!("need at least one chunkserver");
    }
    let mut cluster = LocalCluster::start(dir, base_port, chunkservers, tuning)?;
    println!("gfs: 3 masters and {chunkservers} chunkservers, data in {}", dir.display());
    println!("  masters:      {}", cluster.masters);
    println!("  chunkservers: {}", cluster.chunkservers.join(" "));
    println!("  logs:         {}", dir.join("logs").display());
    let masters_flag = if cluster.masters == DEFAULT_MASTERS {
        String::new()
    } else {
        format!(" --masters {}", cluster.masters)
    };
    println!("try:  gfs create /logs/a{masters_flag}");
    println!("      seq 100 | gfs append /logs/a{masters_flag}");
    println!("      gfs read /logs/a{masters_flag}");
    println!("      gfs stat /logs/a{masters_flag}");
    println!("      gfs status{masters_flag}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = check.tick() => {
                for msg in cluster.exited() {
                    eprintln!("gfs: {msg}; see {}", dir.join("logs").display());
                }
            }
        }
    }
    cluster.stop().await;
    println!("gfs: stopped");
    Ok(())
}
