//! `frangipani-bench`: the file system through the library, one client on a Petal disk,
//! beside a plain local directory measured in the same run, as ratios.
//!
//! ```text
//! frangipani-bench --petal 1=127.0.0.1:7401,2=...,3=... --local-dir /tmp/x [--files 10000] [--big-mib 1024]
//! ```
//! (`scripts/bench-frangipani.sh` starts the Petal replicas and runs it.)

use anyhow::Context;
use clap::Parser;
use frangipani::disk::VirtualDisk;
use frangipani::layout::Params;
use frangipani::locks::MemLockService;
use frangipani::petal_disk::PetalDisk;
use frangipani::{Caller, Config, Frangipani, ROOT_INO};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Petal replicas, ID=HOST:PORT,...
    #[arg(long)]
    petal: String,
    /// Petal disk to format and use.
    #[arg(long, default_value = "bench")]
    disk: String,
    /// A local directory for the baseline (created, then removed).
    #[arg(long)]
    local_dir: PathBuf,
    /// Files to create, stat and unlink.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// 4 KiB files to write and read.
    #[arg(long, default_value_t = 2_000)]
    small_files: usize,
    /// MiB written and read sequentially.
    #[arg(long, default_value_t = 1024)]
    big_mib: usize,
}

const ME: Caller = Caller { uid: 0, gid: 0 };

fn mount(disk: Arc<dyn VirtualDisk>) -> anyhow::Result<Frangipani> {
    let locks = MemLockService::new().client(1);
    let fs = Frangipani::mount(disk, locks.clone(), Config::default())?;
    locks.set_callbacks(fs.callbacks());
    Ok(fs)
}

/// Runs `f`, returning units per second.
fn rate(units: usize, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(units as f64 / t.elapsed().as_secs_f64())
}

struct Row {
    name: String,
    unit: &'static str,
    ours: f64,
    local: f64,
}

fn local_phases(dir: &Path, a: &Args) -> anyhow::Result<Vec<f64>> {
    std::fs::create_dir_all(dir.join("many"))?;
    let many = dir.join("many");
    let mut out = Vec::new();
    out.push(rate(a.files, || {
        for i in 0..a.files {
            std::fs::File::create(many.join(format!("f{i}")))?;
        }
        Ok(())
    })?);
    out.push(rate(a.files, || {
        for i in 0..a.files {
            std::fs::metadata(many.join(format!("f{i}")))?;
        }
        Ok(())
    })?);
    out.push(rate(a.files, || {
        for i in 0..a.files {
            std::fs::remove_file(many.join(format!("f{i}")))?;
        }
        Ok(())
    })?);
    let small = dir.join("small");
    std::fs::create_dir_all(&small)?;
    let block = vec![7u8; 4096];
    out.push(rate(a.small_files, || {
        for i in 0..a.small_files {
            std::fs::write(small.join(format!("s{i}")), &block)?;
        }
        nix_sync();
        Ok(())
    })?);
    out.push(rate(a.small_files, || {
        for i in 0..a.small_files {
            anyhow::ensure!(std::fs::read(small.join(format!("s{i}")))?.len() == 4096);
        }
        Ok(())
    })?);
    let chunk = vec![1u8; 1 << 20];
    let big = dir.join("big");
    out.push(rate(a.big_mib, || {
        let mut f = std::fs::File::create(&big)?;
        for _ in 0..a.big_mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        Ok(())
    })?);
    out.push(rate(a.big_mib, || {
        let mut f = std::fs::File::open(&big)?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..a.big_mib {
            f.read_exact(&mut buf)?;
        }
        Ok(())
    })?);
    std::fs::remove_dir_all(dir)?;
    Ok(out)
}

fn nix_sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn frangipani_phases(disk: Arc<dyn VirtualDisk>, a: &Args) -> anyhow::Result<Vec<f64>> {
    frangipani::mkfs::mkfs(disk.clone(), Params::default()).context("mkfs")?;
    let fs = mount(disk.clone())?;
    let many = fs.mkdir(ROOT_INO, b"many", 0o755, ME)?.ino;
    let mut out = Vec::new();
    out.push(rate(a.files, || {
        for i in 0..a.files {
            fs.create(many, format!("f{i}").as_bytes(), 0o644, 0, ME)?;
        }
        Ok(())
    })?);
    out.push(rate(a.files, || {
        for i in 0..a.files {
            fs.lookup(many, format!("f{i}").as_bytes())?;
        }
        Ok(())
    })?);
    out.push(rate(a.files, || {
        for i in 0..a.files {
            fs.unlink(many, format!("f{i}").as_bytes())?;
        }
        Ok(())
    })?);
    let small = fs.mkdir(ROOT_INO, b"small", 0o755, ME)?.ino;
    let block = vec![7u8; 4096];
    out.push(rate(a.small_files, || {
        for i in 0..a.small_files {
            let f = fs.create(small, format!("s{i}").as_bytes(), 0o644, 0, ME)?.ino;
            fs.write(f, 0, &block)?;
        }
        fs.sync()?;
        Ok(())
    })?);
    out.push(rate(a.small_files, || {
        for i in 0..a.small_files {
            let f = fs.lookup(small, format!("s{i}").as_bytes())?.ino;
            anyhow::ensure!(fs.read(f, 0, 4096)?.len() == 4096);
        }
        Ok(())
    })?);
    let chunk = vec![1u8; 1 << 20];
    let big = fs.create(ROOT_INO, b"big", 0o644, 0, ME)?.ino;
    out.push(rate(a.big_mib, || {
        for i in 0..a.big_mib {
            fs.write(big, (i as u64) << 20, &chunk)?;
        }
        fs.fsync(big, false)?;
        Ok(())
    })?);
    fs.unmount()?;
    // Read back from a fresh mount: nothing cached.
    let fs = mount(disk)?;
    out.push(rate(a.big_mib, || {
        for i in 0..a.big_mib {
            anyhow::ensure!(fs.read(big, (i as u64) << 20, 1 << 20)?.len() == 1 << 20);
        }
        Ok(())
    })?);
    fs.unmount()?;
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let nodes = raft::cluster::parse_cluster(&a.petal).map_err(anyhow::Error::msg)?;
    let client = petal::BlockingClient::new(petal::ClientConfig::new(nodes))?;
    match client.create(&a.disk) {
        Ok(()) | Err(petal::PetalError::Exists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let disk: Arc<dyn VirtualDisk> = Arc::new(PetalDisk::new(client, a.disk.clone()));
    eprintln!("frangipani-bench: frangipani on petal disk {:?}", a.disk);
    let ours = frangipani_phases(disk, &a)?;
    eprintln!("frangipani-bench: local directory {}", a.local_dir.display());
    let local = local_phases(&a.local_dir, &a)?;
    let names = [
        (format!("create {} files", a.files), "ops/s"),
        (format!("stat {} files", a.files), "ops/s"),
        (format!("unlink {} files", a.files), "ops/s"),
        (format!("write {} x 4 KiB files + sync", a.small_files), "files/s"),
        (format!("read {} x 4 KiB files", a.small_files), "files/s"),
        (format!("write {} MiB sequentially + fsync", a.big_mib), "MiB/s"),
        (format!("read {} MiB sequentially (cold on frangipani)", a.big_mib), "MiB/s"),
    ];
    let rows: Vec<Row> = names
        .into_iter()
        .zip(ours.iter().zip(local.iter()))
        .map(|((name, unit), (o, l))| Row { name, unit, ours: *o, local: *l })
        .collect();
    println!(
        "{:<46} | {:>7} | {:>12} | {:>12} | {:>7}",
        "workload", "unit", "frangipani", "local dir", "ratio"
    );
    println!("{:-<46}-+-{:-<7}-+-{:-<12}-+-{:-<12}-+-{:-<7}", "", "", "", "", "");
    for r in rows {
        println!(
            "{:<46} | {:>7} | {:>12.1} | {:>12.1} | {:>6.3}x",
            r.name,
            r.unit,
            r.ours,
            r.local,
            r.ours / r.local
        );
    }
    Ok(())
}
