//! What the scenarios do to a mount, and how they check it afterwards.

use rand::{Rng, RngCore, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A file written and fsynced: its path under the mount and how to make its bytes.
#[derive(Clone, Debug)]
pub struct Acked {
    pub path: PathBuf,
    pub seed: u64,
    pub len: usize,
}

/// The bytes of a file written with `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// A thread writing new files under one directory of a mount, each fsynced before it
/// counts as acknowledged, until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl Writer {
    /// Writes `mnt/dir/N` files of up to `max_len` bytes (sizes from `seed`).
    pub fn start(mnt: &Path, dir: &str, seed: u64, max_len: usize) -> Writer {
        std::fs::create_dir_all(mnt.join(dir)).expect("writer directory");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (mnt, dir) = (mnt.to_path_buf(), PathBuf::from(dir));
        let (stop2, acked2) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let path = dir.join(n.to_string());
                let file_seed = seed.wrapping_mul(1_000_003).wrapping_add(n);
                let len = rng.gen_range(1..=max_len);
                let mut f = std::fs::File::create(mnt.join(&path))?;
                f.write_all(&content(file_seed, len))?;
                f.sync_all()?;
                acked2.lock().expect("acked").push(Acked { path, seed: file_seed, len });
                n += 1;
            }
            Ok(())
        });
        Writer { stop, acked, thread }
    }

    /// How many files it has acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits until it has acknowledged `n` files (or failed); false on a timeout.
    pub fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        cluster_tests::process::wait_for(timeout, || {
            (self.acked_count() >= n || self.thread.is_finished()).then_some(())
        })
        .is_some()
            && self.acked_count() >= n
    }

    /// Stops it; returns what it acknowledged and how it ended.
    pub fn finish(self) -> (Vec<Acked>, std::io::Result<()>) {
        self.stop.store(true, Ordering::Relaxed);
        let result = self.thread.join().expect("writer thread panicked");
        let acked = std::mem::take(&mut *self.acked.lock().expect("acked"));
        (acked, result)
    }

    /// Stops it without waiting (its mount is gone or frozen); returns what it
    /// acknowledged so far. The thread ends when its pending call fails.
    pub fn abandon(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut *self.acked.lock().expect("acked"))
    }
}

/// Reads every acknowledged file through `mnt`; an error names the first file that is
/// missing or differs.
pub fn verify(mnt: &Path, acked: &[Acked]) -> Result<u64, String> {
    for a in acked {
        let got = std::fs::read(mnt.join(&a.path)).map_err(|e| format!("{}: {e}", a.path.display()))?;
        if got != content(a.seed, a.len) {
            return Err(format!(
                "{}: {} bytes differ from the {} written",
                a.path.display(),
                got.len(),
                a.len
            ));
        }
    }
    Ok(acked.len() as u64)
}

/// Runs a shell command in `dir`; its output on failure.
pub fn sh(dir: &Path, script: &str) -> Result<String, String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{script}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}
