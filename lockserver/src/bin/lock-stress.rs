//! `lock-stress`: clerk processes for the lock service's process tests.
//!
//! ```text
//! lock-stress contend --cluster C --log FILE [--locks 3] [--tasks 4] [--duration-ms 10000] [--seed 1]
//! lock-stress hold --cluster C inode/1:X inode/2:S
//! ```
//!
//! `contend` runs tasks that take a few locks in random modes and logs every local hold
//! with its fencing token and CLOCK_MONOTONIC times (shared by all processes on a
//! machine), so a checker can merge the logs of several processes:
//!
//! ```text
//! <ns> acq <lock> <S|X> <token>      after the lock call returned
//! <ns> rel <lock> <S|X> <token>      before the guard is dropped
//! <ns> lost                          the lease was reported lost
//! ```
//!
//! `hold` takes the given locks, prints `holding session=N slot=M`, and waits to be killed.

use anyhow::Context;
use clap::{Parser, Subcommand};
use lockserver::cluster::parse_cluster;
use lockserver::{Callbacks, Clerk, ClerkConfig, ClerkError, Mode, NoCallbacks, SessionId, Slot};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Parser)]
#[command(name = "lock-stress", about = "Clerk processes for the lock service's tests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Contend on a few locks in random modes, logging every hold.
    Contend {
        #[arg(long)]
        cluster: String,
        /// Where to write the log.
        #[arg(long)]
        log: std::path::PathBuf,
        #[arg(long, default_value_t = 3)]
        locks: u32,
        #[arg(long, default_value_t = 4)]
        tasks: u32,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Take locks (NAME:S or NAME:X) and hold them until killed.
    Hold {
        #[arg(long)]
        cluster: String,
        locks: Vec<String>,
    },
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the machine.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The log, one flushed line per record (so a killed process leaves whole lines).
struct Log(Mutex<std::fs::File>);

impl Log {
    fn line(&self, text: std::fmt::Arguments<'_>) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{} {text}", monotonic_ns());
    }
}

struct StressCallbacks {
    log: Arc<Log>,
    lost: AtomicBool,
}

#[async_trait::async_trait]
impl Callbacks for StressCallbacks {
    async fn revoke(&self, _lock: &str, _wanted: Mode) -> Result<(), String> {
        // A little write-back work.
        let ms = rand::thread_rng().gen_range(0..3);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(())
    }
    async fn recover(&self, _slot: Slot, _dead: SessionId) -> Result<(), String> {
        Ok(())
    }
    fn lease_lost(&self) {
        self.log.line(format_args!("lost"));
        self.lost.store(true, Relaxed);
    }
}

fn mode_letter(mode: Mode) -> &'static str {
    match mode {
        Mode::Shared => "S",
        Mode::Exclusive => "X",
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    raft::logging::init("warn");
    match Cli::parse().command {
        Command::Contend { cluster, log, locks, tasks, duration_ms, seed } => {
            contend(&cluster, &log, locks, tasks, Duration::from_millis(duration_ms), seed).await
        }
        Command::Hold { cluster, locks } => hold(&cluster, &locks).await,
    }
}

async fn contend(
    cluster: &str,
    log: &std::path::Path,
    locks: u32,
    tasks: u32,
    duration: Duration,
    seed: u64,
) -> anyhow::Result<()> {
    let nodes = parse_cluster(cluster).map_err(anyhow::Error::msg)?;
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let log = Arc::new(Log(Mutex::new(file)));
    let callbacks = Arc::new(StressCallbacks { log: log.clone(), lost: AtomicBool::new(false) });
    let mut cfg = ClerkConfig::new(nodes, format!("stress-{}", std::process::id()));
    cfg.rpc_timeout = Duration::from_millis(500);
    let clerk = Arc::new(Clerk::connect(cfg, callbacks.clone()).await?);
    let deadline = Instant::now() + duration;
    let acquired = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (clerk, log, acquired, errors) = (clerk.clone(), log.clone(), acquired.clone(), errors.clone());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed * 1000 + u64::from(t));
        handles.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let lock = format!("l{}", rng.gen_range(0..locks));
                let mode = if rng.gen_bool(0.5) { Mode::Shared } else { Mode::Exclusive };
                match tokio::time::timeout(Duration::from_secs(30), clerk.lock(&lock, mode)).await {
                    Ok(Ok(guard)) => {
                        log.line(format_args!("acq {lock} {} {}", mode_letter(mode), guard.token().0));
                        acquired.fetch_add(1, Relaxed);
                        let hold_us = rng.gen_range(0..2000);
                        tokio::time::sleep(Duration::from_micros(hold_us)).await;
                        log.line(format_args!("rel {lock} {} {}", mode_letter(mode), guard.token().0));
                        drop(guard);
                    }
                    Ok(Err(ClerkError::LeaseLost)) => return,
                    Ok(Err(e)) => {
                        eprintln!("lock {lock}: {e}");
                        errors.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => {
                        eprintln!("lock {lock}: no grant in 30 s");
                        errors.fetch_add(1, Relaxed);
                    }
                }
                let pause_us = rng.gen_range(0..1000);
                tokio::time::sleep(Duration::from_micros(pause_us)).await;
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    let lost = callbacks.lost.load(Relaxed);
    println!("acquired={} errors={} lost={lost}", acquired.load(Relaxed), errors.load(Relaxed));
    if !lost {
        if let Ok(clerk) = Arc::try_unwrap(clerk) {
            clerk.close().await.context("close the session")?;
        }
    }
    Ok(())
}

async fn hold(cluster: &str, locks: &[String]) -> anyhow::Result<()> {
    let nodes = parse_cluster(cluster).map_err(anyhow::Error::msg)?;
    let clerk = Clerk::connect(ClerkConfig::new(nodes, "holder"), Arc::new(NoCallbacks)).await?;
    let mut guards = Vec::new();
    for spec in locks {
        let (name, mode) =
            spec.rsplit_once(':').with_context(|| format!("expected NAME:S or NAME:X, got {spec}"))?;
        let mode = match mode {
            "S" => Mode::Shared,
            "X" => Mode::Exclusive,
            other => anyhow::bail!("unknown mode {other}"),
        };
        guards.push(clerk.lock(name, mode).await?);
    }
    println!("holding session={} slot={}", clerk.session().0, clerk.slot().0);
    std::io::stdout().flush()?;
    // Hold until killed.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
