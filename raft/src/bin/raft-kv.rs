//! `raft-kv`: a replicated key-value store on the raft crate (the demo, and the load
//! target of the tests and benchmark).
//!
//! ```text
//! raft-kv up DIR                       # 3 nodes on 127.0.0.1:7001-7003, data in DIR
//! raft-kv put KEY VALUE [--cluster ..] # default cluster: the one `up` starts
//! raft-kv get KEY
//! raft-kv status
//! raft-kv serve --id 1 --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data DIR
//! ```

use anyhow::Context;
use clap::{Parser, Subcommand};
use raft::cluster::MemberArgs;
use raft::kv_service::{serve, KvClient, ServerConfig};
use raft::NodeId;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_CLUSTER: &str = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003";

#[derive(Parser)]
#[command(name = "raft-kv", about = "A replicated key-value store on Raft")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Serve {
        #[command(flatten)]
        member: MemberArgs,
        /// Raft tick length in milliseconds (election timeout is 10-20 ticks).
        #[arg(long, default_value_t = 50)]
        tick_ms: u64,
        /// Snapshot after this many applied entries.
        #[arg(long, default_value_t = 100_000)]
        snapshot_entries: u64,
    },
    /// Run a local 3-node cluster with its data under DIR, until Ctrl-C.
    Up {
        /// Data directory (one subdirectory per node).
        dir: PathBuf,
        /// Port of node 1; nodes 2 and 3 take the next ports.
        #[arg(long, default_value_t = 7001)]
        base_port: u16,
    },
    /// Set KEY to VALUE.
    Put {
        key: String,
        value: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Append VALUE to KEY.
    Append {
        key: String,
        value: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Read KEY (linearizable).
    Get {
        key: String,
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
    /// Show every node's Raft state.
    Status {
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
    },
}

fn parse_cluster(s: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    raft::cluster::parse_cluster(s).map_err(anyhow::Error::msg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raft::logging::init("info");
    match Cli::parse().command {
        Command::Serve { member, tick_ms, snapshot_entries } => {
            let (id, peers) = member.members().map_err(anyhow::Error::msg)?;
            let listen = &peers[&id];
            let listen = listen.parse().with_context(|| format!("bad listen address {listen}"))?;
            serve(ServerConfig {
                id,
                peers,
                data_dir: member.data,
                listen,
                tick: Duration::from_millis(tick_ms),
                snapshot_entries,
            })
            .await
        }
        Command::Up { dir, base_port } => up(dir, base_port).await,
        Command::Put { key, value, cluster } => {
            KvClient::new(parse_cluster(&cluster)?).put(&key, &value).await?;
            println!("ok");
            Ok(())
        }
        Command::Append { key, value, cluster } => {
            KvClient::new(parse_cluster(&cluster)?).append(&key, &value).await?;
            println!("ok");
            Ok(())
        }
        Command::Get { key, cluster } => {
            match KvClient::new(parse_cluster(&cluster)?).get(&key).await? {
                Some(v) => println!("{v}"),
                None => {
                    eprintln!("{key}: not found");
                    std::process::exit(1);
                }
            }
            Ok(())
        }
        Command::Status { cluster } => {
            for (id, s) in KvClient::new(parse_cluster(&cluster)?).status().await {
                match s {
                    Ok(s) => println!(
                        "{id}: {} term={} leader={} log={}..{} commit={} applied={} voters={:?}",
                        s.role, s.term, s.leader, s.first_index, s.last_index, s.commit, s.applied, s.voters
                    ),
                    Err(e) => println!("{id}: unreachable ({e})"),
                }
            }
            Ok(())
        }
    }
}

/// Starts three `serve` processes and stops them on Ctrl-C or SIGTERM.
async fn up(dir: PathBuf, base_port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let peers: Vec<String> = (1..=3u16).map(|i| format!("{i}=127.0.0.1:{}", base_port + i - 1)).collect();
    let peers = peers.join(",");
    let exe = std::env::current_exe().context("find own executable")?;
    let mut children = Vec::new();
    for id in 1..=3 {
        let child = tokio::process::Command::new(&exe)
            .args(["serve", "--id", &id.to_string(), "--peers", &peers, "--data"])
            .arg(dir.join(format!("node{id}")))
            .kill_on_drop(true)
            .spawn()
            .context("start a node")?;
        children.push(child);
    }
    println!("raft-kv: 3 nodes up ({peers}), data in {}", dir.display());
    println!("try:  raft-kv put greeting hello --cluster {peers}");
    println!("      raft-kv get greeting --cluster {peers}");
    println!("      raft-kv status --cluster {peers}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for c in &mut children {
        let _ = c.kill().await;
    }
    println!("raft-kv: stopped");
    Ok(())
}
