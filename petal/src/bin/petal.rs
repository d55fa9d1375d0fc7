//! `petal`: run a Petal replica, a local group, or talk to one.
//!
//! ```text
//! petal up DIR                                  # 3 replicas on 127.0.0.1:7101-7103
//! petal serve --id 1 --peers 1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103 --data DIR
//! petal create vol        petal list            petal stat vol
//! petal write vol 4096 --text hello             petal read vol 4096 5
//! petal snapshot vol vol@monday                 petal delete vol@monday
//! petal status                                  # leader, terms, applied index, replica lag
//! ```
//! Client subcommands take `--cluster ID=HOST:PORT,...` (default: what `up` starts).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use petal::{PetalClient, ServerConfig};
use raft::cluster::{parse_cluster, MemberArgs};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_CLUSTER: &str = "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103";

#[derive(Parser)]
#[command(name = "petal", about = "Petal: a replicated sparse virtual disk service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one replica.
    Serve {
        #[command(flatten)]
        member: MemberArgs,
        /// Where to listen; default: this replica's address in --peers.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Raft tick in milliseconds (the election timeout is 10 to 20 ticks).
        #[arg(long, default_value_t = 50)]
        tick_ms: u64,
        /// Persist the store and compact the log after this many entries.
        #[arg(long, default_value_t = 2000)]
        snapshot_entries: u64,
        /// Most bytes in one read or write.
        #[arg(long, default_value_t = petal::service::MAX_IO_BYTES_DEFAULT)]
        max_io_bytes: u64,
        /// Writes are refused this many ms before their writer's lease expires.
        #[arg(long, default_value_t = petal::service::FENCE_MARGIN_MS_DEFAULT)]
        fence_margin_ms: u64,
    },
    /// Run a local group of 3 replicas with data under DIR, until Ctrl-C.
    Up {
        /// Data directory (one subdirectory per replica).
        dir: PathBuf,
        /// Port of replica 1; the others take the next ports.
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
        /// Number of replicas (3 or 5).
        #[arg(long, default_value_t = 3)]
        replicas: u16,
    },
    /// Create an empty disk.
    Create {
        disk: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Delete a disk (or snapshot).
    Delete {
        disk: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// List the disks.
    List {
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Show one disk.
    Stat {
        disk: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Take a read-only copy-on-write snapshot of DISK named NAME.
    Snapshot {
        disk: String,
        name: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Write --text, or standard input, at OFFSET.
    Write {
        disk: String,
        offset: u64,
        #[arg(long)]
        text: Option<String>,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Read LEN bytes at OFFSET to standard output.
    Read {
        disk: String,
        offset: u64,
        len: u64,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Decommit LEN bytes at OFFSET.
    Decommit {
        disk: String,
        offset: u64,
        len: u64,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Show every replica: role, term, leader, applied index, lag, damage counters.
    Status {
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
}

fn client(cluster: &str) -> anyhow::Result<PetalClient> {
    let nodes = parse_cluster(cluster).map_err(anyhow::Error::msg).context("parse --cluster")?;
    let mut cfg = petal::ClientConfig::new(nodes);
    cfg.deadline = Duration::from_secs(15);
    Ok(PetalClient::new(cfg)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raft::logging::init("info");
    match Cli::parse().command {
        Command::Serve { member, listen, tick_ms, snapshot_entries, max_io_bytes, fence_margin_ms } => {
            let (id, peers) = member.members().map_err(anyhow::Error::msg)?;
            let mut cfg = ServerConfig::new(id, peers, member.data)?;
            if let Some(listen) = listen {
                cfg.listen = listen;
            }
            cfg.tick = Duration::from_millis(tick_ms);
            cfg.snapshot_entries = snapshot_entries;
            cfg.max_io_bytes = max_io_bytes;
            cfg.fence_margin_ms = fence_margin_ms;
            petal::serve(cfg).await
        }
        Command::Up { dir, base_port, replicas } => up(dir, base_port, replicas).await,
        Command::Create { disk, cluster } => Ok(client(&cluster)?.create(&disk).await?),
        Command::Delete { disk, cluster } => Ok(client(&cluster)?.delete(&disk).await?),
        Command::Snapshot { disk, name, cluster } => Ok(client(&cluster)?.snapshot(&disk, &name).await?),
        Command::List { cluster } => {
            for d in client(&cluster)?.list().await? {
                print_disk(&d);
            }
            Ok(())
        }
        Command::Stat { disk, cluster } => {
            print_disk(&client(&cluster)?.stat(&disk).await?);
            Ok(())
        }
        Command::Write { disk, offset, text, cluster } => {
            let data = match text {
                Some(t) => t.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).context("read standard input")?;
                    buf
                }
            };
            Ok(client(&cluster)?.write(&disk, offset, &data, None).await?)
        }
        Command::Read { disk, offset, len, cluster } => {
            let data = client(&cluster)?.read(&disk, offset, len).await?;
            std::io::stdout().write_all(&data).context("write standard output")?;
            Ok(())
        }
        Command::Decommit { disk, offset, len, cluster } => {
            Ok(client(&cluster)?.decommit(&disk, offset, len, None).await?)
        }
        Command::Status { cluster } => {
            for (id, s) in client(&cluster)?.status().await {
                match s {
                    Ok(s) => {
                        println!(
                            "{id}: {} term={} leader={} log={}..{} commit={} applied={} persisted={} disks={} corrupt={} repaired={} damaged={} fenced={}{}",
                            s.role, s.term, s.leader, s.first_index, s.last_index, s.commit, s.applied,
                            s.persisted_index, s.disks, s.corrupt_blocks, s.repaired_blocks, s.damaged_blocks,
                            s.fenced_writes,
                            if s.failed.is_empty() { String::new() } else { format!(" FAILED: {}", s.failed) }
                        );
                        for p in &s.peers {
                            println!(
                                "    replica {}: matched={} lag={} ({})",
                                p.id, p.matched, p.lag, p.state
                            );
                        }
                    }
                    Err(e) => println!("{id}: unreachable ({e})"),
                }
            }
            Ok(())
        }
    }
}

fn print_disk(d: &petal::client::DiskInfo) {
    let kind = if d.read_only { format!("snapshot of {}", d.origin) } else { "disk".to_string() };
    println!("{}\t{kind}\textents={}\tcreated_index={}", d.name, d.extents, d.created_index);
}

/// Starts the replicas as `serve` processes and stops them on Ctrl-C or SIGTERM.
async fn up(dir: PathBuf, base_port: u16, replicas: u16) -> anyhow::Result<()> {
    if replicas != 3 && replicas != 5 {
        bail!("a group has 3 or 5 replicas");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let peers: Vec<String> = (1..=replicas).map(|i| format!("{i}=127.0.0.1:{}", base_port + i - 1)).collect();
    let peers = peers.join(",");
    let exe = std::env::current_exe().context("find own executable")?;
    let mut children = Vec::new();
    for id in 1..=replicas {
        let child = tokio::process::Command::new(&exe)
            .args(["serve", "--id", &id.to_string(), "--peers", &peers, "--data"])
            .arg(dir.join(format!("replica{id}")))
            .kill_on_drop(true)
            .spawn()
            .context("start a replica")?;
        children.push(child);
    }
    println!("petal: {replicas} replicas up ({peers}), data in {}", dir.display());
    println!("try:  petal create vol --cluster {peers}");
    println!("      petal write vol 0 --text hello --cluster {peers}");
    println!("      petal read vol 0 5 --cluster {peers}");
    println!("      petal status --cluster {peers}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for c in &mut children {
        let _ = c.kill().await;
    }
    println!("petal: stopped");
    Ok(())
}
