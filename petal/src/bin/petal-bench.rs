//! `petal-bench`: load on a Petal group through the client, beside the same pattern on a
//! local file with an fsync per request, measured in the same run
//! (`scripts/bench-petal.sh` starts the group and runs this).
//!
//! ```text
//! petal-bench --cluster 1=127.0.0.1:7301,2=127.0.0.1:7302,3=127.0.0.1:7303 --local-dir target/bench-tmp
//! ```
//!
//! Patterns: 64 KiB sequential writes, 4 KiB random writes, 4 KiB random reads (of data
//! written before), each with every `--clients` count (`--patterns` picks some). The local
//! writes sync with fdatasync, as Petal's log does: a full fsync would also write the
//! file's times each time and make the baseline slower than it need be. Each client has its own
//! connections (Petal) or its own thread (local file) and works in a region of its own.
//! One line per pattern and client count:
//!
//! ```text
//! pattern=seq-write-64k clients=16 petal_ops_per_s=900.0 petal_mib_per_s=56.25 petal_p50_ms=15.1 petal_p99_ms=30.2 local_ops_per_s=800.0 local_mib_per_s=50.00 ratio=1.12
//! ```

use anyhow::{ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use petal::{ClientConfig, PetalClient};
use raft::cluster::parse_cluster;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of each client's region of the disk (and of the local file).
const REGION_BYTES: u64 = 1 << 30;
/// Latencies above this are clamped into the histogram's top bucket.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(Parser)]
#[command(name = "petal-bench", about = "Petal throughput beside a local file with fsync per request")]
struct Args {
    /// Petal replicas as ID=HOST:PORT, comma-separated.
    #[arg(long)]
    cluster: String,
    /// Directory (on a real disk) for the local-file baseline.
    #[arg(long)]
    local_dir: PathBuf,
    /// Client counts, comma-separated.
    #[arg(long, default_value = "1,16")]
    clients: String,
    /// Measured seconds per pattern (after a 1 s warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The disk to use (created if missing).
    #[arg(long, default_value = "bench")]
    disk: String,
    /// Patterns to run, comma-separated (random reads read what the sequential writes
    /// of the same run wrote).
    #[arg(long, default_value = "seq-write-64k,rand-write-4k,rand-read-4k")]
    patterns: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    SeqWrite64k,
    RandWrite4k,
    RandRead4k,
}

impl Pattern {
    const ALL: [Pattern; 3] = [Pattern::SeqWrite64k, Pattern::RandWrite4k, Pattern::RandRead4k];

    fn name(self) -> &'static str {
        match self {
            Pattern::SeqWrite64k => "seq-write-64k",
            Pattern::RandWrite4k => "rand-write-4k",
            Pattern::RandRead4k => "rand-read-4k",
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Pattern::SeqWrite64k => 64 << 10,
            _ => 4 << 10,
        }
    }

    /// The offset of request `i` of client `c`: sequential, or random over what the
    /// sequential pattern wrote (`written` bytes of the region).
    fn offset(self, c: u64, i: u64, rng: &mut rand::rngs::SmallRng, written: u64) -> u64 {
        let base = c * REGION_BYTES;
        match self {
            Pattern::SeqWrite64k => base + (i * self.bytes()) % REGION_BYTES,
            _ => base + rng.gen_range(0..(written.max(self.bytes()) / 4096)) * 4096,
        }
    }
}

/// What one run measured.
struct Measured {
    ops: u64,
    seconds: f64,
    latency: Histogram<u64>,
    /// Per client: bytes of its region written sequentially (for the reads that follow).
    written: Vec<u64>,
}

impl Measured {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
}

/// Runs `pattern` with `clients` Petal clients for the warm-up plus `seconds`.
async fn run_petal(
    args: &Args,
    nodes: &std::collections::BTreeMap<raft::NodeId, String>,
    pattern: Pattern,
    clients: usize,
    written: &[u64],
) -> anyhow::Result<Measured> {
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(args.seconds);
    let start = Instant::now();
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut cfg = ClientConfig::new(nodes.clone());
        cfg.connections_per_node = 1;
        cfg.deadline = Duration::from_secs(10);
        let client = PetalClient::new(cfg)?;
        let disk = args.disk.clone();
        let latency = latency.clone();
        let region_written = written.get(c).copied().unwrap_or(0);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(c as u64);
            let data = vec![c as u8 ^ 0x5a; pattern.bytes() as usize];
            let (mut ops, mut i, mut seq_bytes) = (0u64, 0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= start + warmup + measure {
                    break;
                }
                let offset = pattern.offset(c as u64, i, &mut rng, region_written);
                let r = match pattern {
                    Pattern::RandRead4k => client.read(&disk, offset, pattern.bytes()).await.map(|_| ()),
                    _ => client.write(&disk, offset, &data, None).await,
                };
                r.with_context(|| format!("{} at {offset}", pattern.name()))?;
                i += 1;
                if pattern == Pattern::SeqWrite64k {
                    seq_bytes = (seq_bytes + pattern.bytes()).min(REGION_BYTES);
                }
                let t1 = Instant::now();
                if t0 >= start + warmup && t1 <= start + warmup + measure {
                    ops += 1;
                    let us = (t1 - t0).as_micros() as u64;
                    latency.lock().unwrap().record(us.clamp(1, LATENCY_US_MAX))?;
                }
            }
            anyhow::Ok((ops, seq_bytes))
        }));
    }
    let mut ops = 0;
    let mut written = Vec::new();
    for t in tasks {
        let (n, w) = t.await??;
        ops += n;
        written.push(w);
    }
    let latency = latency.lock().unwrap().clone();
    Ok(Measured { ops, seconds: measure.as_secs_f64(), latency, written })
}

/// Runs `pattern` on a local file: `clients` threads, each request a pwrite plus
/// fdatasync (writes) or a pread (reads).
fn run_local(
    path: &std::path::Path,
    seconds: u64,
    pattern: Pattern,
    clients: usize,
    written: &[u64],
) -> anyhow::Result<Measured> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(seconds);
    let start = Instant::now();
    let results: Vec<anyhow::Result<(u64, u64, Histogram<u64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let file = &file;
                let region_written = written.get(c).copied().unwrap_or(0);
                s.spawn(move || {
                    let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(c as u64);
                    let mut buf = vec![c as u8 ^ 0x5a; pattern.bytes() as usize];
                    let (mut ops, mut i, mut seq_bytes) = (0u64, 0u64, 0u64);
                    loop {
                        let t0 = Instant::now();
                        if t0 >= start + warmup + measure {
                            break;
                        }
                        let offset = pattern.offset(c as u64, i, &mut rng, region_written);
                        match pattern {
                            Pattern::RandRead4k => {
                                file.read_at(&mut buf, offset)?;
                            }
                            _ => {
                                file.write_all_at(&buf, offset)?;
                                file.sync_data()?;
                            }
                        }
                        i += 1;
                        if pattern == Pattern::SeqWrite64k {
                            seq_bytes = (seq_bytes + pattern.bytes()).min(REGION_BYTES);
                        }
                        let t1 = Instant::now();
                        if t0 >= start + warmup && t1 <= start + warmup + measure {
                            ops += 1;
                            hist.record(((t1 - t0).as_micros() as u64).clamp(1, LATENCY_US_MAX))?;
                        }
                    }
                    Ok((ops, seq_bytes, hist))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread panicked")).collect()
    });
    let mut latency = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
    let (mut ops, mut written) = (0, Vec::new());
    for r in results {
        let (n, w, h) = r?;
        ops += n;
        written.push(w);
        latency.add(h)?;
    }
    Ok(Measured { ops, seconds: measure.as_secs_f64(), latency, written })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nodes = parse_cluster(&args.cluster).map_err(anyhow::Error::msg)?;
    let counts: Vec<usize> = args
        .clients
        .split(',')
        .map(|c| c.trim().parse::<usize>().with_context(|| format!("bad client count {c:?}")))
        .collect::<Result<_, _>>()?;
    ensure!(counts.iter().all(|c| (1..=256).contains(c)), "client counts are 1 to 256");
    let patterns: Vec<Pattern> = args
        .patterns
        .split(',')
        .map(|p| {
            let p = p.trim();
            Pattern::ALL.into_iter().find(|x| x.name() == p).with_context(|| format!("unknown pattern {p:?}"))
        })
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(&args.local_dir)?;
    let local = args.local_dir.join("petal-bench-local.bin");
    let admin = PetalClient::connect(nodes.clone())?;
    match admin.create(&args.disk).await {
        Ok(()) | Err(petal::PetalError::Exists(_)) => {}
        Err(e) => return Err(e).context("create the bench disk"),
    }
    println!("# petal through the client (3 replicas, loopback) vs a local file with fdatasync per request");
    for clients in counts {
        let mut petal_written = Vec::new();
        let mut local_written = Vec::new();
        for &pattern in &patterns {
            let p = run_petal(&args, &nodes, pattern, clients, &petal_written).await?;
            let l = run_local(&local, args.seconds, pattern, clients, &local_written)?;
            if pattern == Pattern::SeqWrite64k {
                petal_written = p.written.clone();
                local_written = l.written.clone();
            }
            let mib = |m: &Measured| m.ops_per_s() * pattern.bytes() as f64 / (1 << 20) as f64;
            let ms = |m: &Measured, q: f64| m.latency.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "pattern={} clients={clients} petal_ops_per_s={:.1} petal_mib_per_s={:.2} petal_p50_ms={:.2} petal_p99_ms={:.2} local_ops_per_s={:.1} local_mib_per_s={:.2} local_p50_ms={:.2} ratio={:.2}",
                pattern.name(),
                p.ops_per_s(),
                mib(&p),
                ms(&p, 0.5),
                ms(&p, 0.99),
                l.ops_per_s(),
                mib(&l),
                ms(&l, 0.5),
                p.ops_per_s() / l.ops_per_s().max(1e-9),
            );
        }
    }
    let _ = std::fs::remove_file(&local);
    Ok(())
}
