//! `gfs bench`: record-append throughput with 1, 4 and 16 concurrent clients for 1 KiB
//! and 64 KiB records, and sequential read throughput, on a local cluster of real
//! processes (3 masters, 3 chunkservers, every append fsynced on all three replicas);
//! beside a plain local file with the same bytes appended (one fdatasync per record,
//! the same number of writers) and read back in the same run, as a ratio.
//!
//! The paper's figure for one client was 6.0 MB/s over 100 Mbps links (GFS §6.1.3).

use super::{parse_size, LocalCluster, Tuning};
use anyhow::Context;
use clap::Args;
use gfs::client::{Client, ClientConfig};
use gfs::record::{frame, Deduper, RecordId};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `gfs bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Where the cluster and the local file live (default: ./gfs-bench.tmp, removed after).
    /// Put it on a real disk: on tmpfs fsync costs nothing.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measured seconds per append pattern.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Record sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1K,64K", value_parser = parse_size)]
    record_bytes: Vec<u64>,
    /// Chunk size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    chunk_bytes: u64,
    /// First port of the cluster (masters from it, chunkservers from it + 10).
    #[arg(long, default_value_t = 7501)]
    base_port: u16,
}

struct Row {
    pattern: String,
    gfs_bytes_per_s: f64,
    local_bytes_per_s: f64,
    records: u64,
}

fn mb(bytes_per_s: f64) -> f64 {
    bytes_per_s / 1e6
}

/// Runs the benchmark and prints the table.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (PathBuf::from("gfs-bench.tmp"), true),
    };
    if dir.exists() && remove {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let result = bench(args, &dir).await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn bench(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    let tuning = Tuning {
        tick_ms: 50,
        chunk_bytes: args.chunk_bytes,
        replicas: 3,
        lease_ms: gfs::types::DEFAULT_LEASE_MS,
        heartbeat_ms: 500,
        dead_after_ms: 5_000,
        gc_grace_ms: gfs::types::DEFAULT_GC_GRACE_MS,
        clones_max: 2,
        scrub_ms: 0,
    };
    let mut cluster = LocalCluster::start(&dir.join("cluster"), args.base_port, 3, &tuning)?;
    let outcome = async {
        cluster.wait_ready(Duration::from_secs(30)).await.context("cluster did not come up")?;
        eprintln!(
            "gfs bench: 3 masters + 3 chunkservers on 127.0.0.1, {} MiB chunks, data in {}",
            args.chunk_bytes >> 20,
            dir.display()
        );
        let masters = raft::cluster::parse_cluster(&cluster.masters).map_err(anyhow::Error::msg)?;
        let mut rows = Vec::new();
        let mut largest: Option<(String, PathBuf, u64)> = None;
        for &size in &args.record_bytes {
            for &clients in &args.clients {
                let path = format!("/bench/r{size}-c{clients}");
                let (bytes, records, secs) =
                    gfs_appends(&masters, &path, size as usize, clients, args.seconds).await?;
                let local_path = dir.join(format!("local-r{size}-c{clients}"));
                let local_secs = local_appends(&local_path, size as usize, clients, records)?;
                let row = Row {
                    pattern: format!("append {} x {clients}", human(size)),
                    gfs_bytes_per_s: bytes as f64 / secs,
                    local_bytes_per_s: bytes as f64 / local_secs,
                    records,
                };
                eprintln!(
                    "  {}: gfs {:.2} MB/s, local {:.2} MB/s",
                    row.pattern,
                    mb(row.gfs_bytes_per_s),
                    mb(row.local_bytes_per_s)
                );
                rows.push(row);
                if largest.as_ref().is_none_or(|l| l.2 < bytes) {
                    largest = Some((path, local_path, bytes));
                }
            }
        }
        if let Some((path, local_path, bytes)) = largest {
            let client = Client::new(ClientConfig::new(masters.clone()));
            let start = Instant::now();
            let mut read_bytes = 0u64;
            let stats = client.read(&path, |_, p| read_bytes += p.len() as u64).await?;
            let gfs_secs = start.elapsed().as_secs_f64();
            let local_secs = local_read(&local_path, args.chunk_bytes)?;
            rows.push(Row {
                pattern: format!("read sequential {} MB", bytes / 1_000_000),
                gfs_bytes_per_s: read_bytes as f64 / gfs_secs,
                local_bytes_per_s: read_bytes as f64 / local_secs,
                records: stats.records,
            });
        }
        print_table(args, &rows);
        anyhow::Ok(())
    }
    .await;
    cluster.stop().await;
    outcome
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn print_table(args: &BenchArgs, rows: &[Row]) {
    println!();
    println!(
        "GFS record append: 3 replicas, fsync on each before the ack; {} s per pattern; {} chunks",
        args.seconds,
        human(args.chunk_bytes)
    );
    println!("local: one file, O_APPEND write + fdatasync per record, same writers, same bytes");
    println!("{:<28} {:>10} {:>12} {:>8} {:>10}", "pattern", "gfs MB/s", "local MB/s", "ratio", "records");
    for r in rows {
        println!(
            "{:<28} {:>10.2} {:>12.2} {:>8.3} {:>10}",
            r.pattern,
            mb(r.gfs_bytes_per_s),
            mb(r.local_bytes_per_s),
            r.gfs_bytes_per_s / r.local_bytes_per_s,
            r.records
        );
    }
    println!("(the GFS paper: 6.0 MB/s record append for one client over 100 Mbps links)");
}

/// `clients` clients append `size`-byte records to `path` for `seconds`; returns the
/// acknowledged payload bytes, records and the elapsed seconds.
async fn gfs_appends(
    masters: &std::collections::BTreeMap<raft::NodeId, String>,
    path: &str,
    size: usize,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<(u64, u64, f64)> {
    Client::new(ClientConfig::new(masters.clone())).create(path).await?;
    let bytes = Arc::new(AtomicU64::new(0));
    let records = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (bytes, records) = (bytes.clone(), records.clone());
        let client = Client::new(ClientConfig::new(masters.clone()));
        let path = path.to_string();
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + c) as u8).collect();
        tasks.spawn(async move {
            while Instant::now() < end {
                client.append(&path, &payload).await?;
                bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                records.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((bytes.load(Ordering::Relaxed), records.load(Ordering::Relaxed), start.elapsed().as_secs_f64()))
}

/// `writers` threads append `records` framed records of `size` bytes in all to one local
/// file, each write followed by fdatasync; returns the seconds taken.
fn local_appends(path: &Path, size: usize, writers: usize, records: u64) -> anyhow::Result<f64> {
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?,
    );
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..writers.max(1))
            .map(|w| {
                let (file, next) = (file.clone(), next.clone());
                s.spawn(move || -> std::io::Result<()> {
                    let payload: Vec<u8> = (0..size).map(|i| (i * 7 + w) as u8).collect();
                    loop {
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        if seq >= records {
                            return Ok(());
                        }
                        let framed = frame(RecordId { client: w as u64 + 1, seq }, &payload);
                        (&*file).write_all(&framed)?;
                        file.sync_data()?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64().max(1e-9))
}

/// Reads the local file sequentially in chunk-sized pieces through the same record
/// parser as the GFS reader; returns the seconds taken.
fn local_read(path: &Path, chunk_bytes: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut dedup = Deduper::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut pending: Vec<u8> = Vec::new();
    let max = gfs::types::max_record_bytes(chunk_bytes) as usize;
    loop {
        let n = file.read(&mut buf)?;
        pending.extend_from_slice(&buf[..n]);
        let used = dedup.feed(&pending, n == 0, max, |_, _| {});
        pending.drain(..used);
        if n == 0 {
            break;
        }
    }
    Ok(start.elapsed().as_secs_f64().max(1e-9))
}
