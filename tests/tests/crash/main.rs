//! Crash, partition and power-loss scenarios across real processes (issue 7).
//!
//! Every scenario starts a whole cluster of processes (`petal`, `lockserver`,
//! `frangipani mount`, or `gfs`), injects faults (SIGKILL, SIGSTOP, a cut link, a full
//! disk), and then checks what users would: every acknowledged (fsynced) write reads
//! back, `frangipani fsck` finds the file system clean, and the mounts still work.
//!
//! Each scenario runs with a few random seeds; the run ends with a table of scenario,
//! seed, faults injected, operations checked and outcome.
//!
//! ```text
//! CRASH_SEEDS=N        seeds per scenario (default 2)
//! CRASH_SEED=S         run exactly seed S (to replay a failure)
//! CRASH_SCENARIOS=1,5  run only these scenarios
//! CRASH_HOSTS=1        every process on a simulated host of its own (network namespaces;
//!                      a cut isolates the machine), instead of 127.0.0.1 and proxies
//! ```

mod frangipani;
mod gfs;
mod workload;

use cluster_tests::report::{Row, Table};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::Instant;

/// What one run of a scenario did, for the table.
pub struct Run {
    pub seed: u64,
    /// Every process on a simulated host of its own (`CRASH_HOSTS=1`).
    pub hosts: bool,
    start: Instant,
    faults: Vec<String>,
    checked: u64,
}

impl Run {
    /// Notes a fault injected.
    pub fn fault(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("crash: seed {} at {:.1} s: {what}", self.seed, self.start.elapsed().as_secs_f64());
        self.faults.push(what);
    }

    /// Counts operations whose outcome was checked.
    pub fn checked(&mut self, n: u64) {
        self.checked += n;
        eprintln!(
            "crash: seed {} at {:.1} s: {} checked",
            self.seed,
            self.start.elapsed().as_secs_f64(),
            self.checked
        );
    }

    /// A random number generator for this seed.
    pub fn rng(&self) -> rand::rngs::SmallRng {
        rand::SeedableRng::seed_from_u64(self.seed)
    }
}

struct Scenario {
    number: u32,
    name: &'static str,
    needs_fuse: bool,
    run: fn(&mut Run),
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        number: 1,
        name: "kill a client mid-untar",
        needs_fuse: true,
        run: frangipani::kill_client_mid_untar,
    },
    Scenario {
        number: 2,
        name: "cut a client off the lock service",
        needs_fuse: true,
        run: frangipani::cut_client_from_locks,
    },
    Scenario {
        number: 3,
        name: "kill the Petal leader",
        needs_fuse: true,
        run: frangipani::kill_petal_leader,
    },
    Scenario {
        number: 4,
        name: "kill the lock service leader",
        needs_fuse: true,
        run: frangipani::kill_locks_leader,
    },
    Scenario { number: 5, name: "power loss", needs_fuse: true, run: frangipani::power_loss },
    Scenario {
        number: 6,
        name: "a Petal replica's disk fills",
        needs_fuse: true,
        run: frangipani::petal_disk_fills,
    },
    Scenario {
        number: 7,
        name: "GFS: kill a chunkserver, the master leader",
        needs_fuse: false,
        run: gfs::kill_mid_append,
    },
];

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

fn main() -> ExitCode {
    let seeds: Vec<u64> = match env_u64("CRASH_SEED") {
        Some(s) => vec![s],
        None => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1);
            (0..env_u64("CRASH_SEEDS").unwrap_or(2))
                .map(|i| base.wrapping_add(i * 7919) % 1_000_000)
                .collect()
        }
    };
    let only: Option<Vec<u32>> = std::env::var("CRASH_SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(|n| n.trim().parse().expect("CRASH_SCENARIOS: numbers")).collect());
    let hosts = std::env::var("CRASH_HOSTS").is_ok_and(|v| v == "1");
    let fuse = cluster_tests::fuse::fuse_available("the Frangipani crash scenarios (1-6)");

    let mut rows = Vec::new();
    for s in SCENARIOS {
        if only.as_ref().is_some_and(|o| !o.contains(&s.number)) || (s.needs_fuse && !fuse) {
            continue;
        }
        for &seed in &seeds {
            eprintln!("crash: scenario {} ({}), seed {seed}", s.number, s.name);
            let start = Instant::now();
            let mut run = Run { seed, hosts, start, faults: Vec::new(), checked: 0 };
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (s.run)(&mut run))).map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into())
            });
            rows.push(Row {
                scenario: format!("{}. {}", s.number, s.name),
                seed,
                faults: run.faults,
                checked: run.checked,
                elapsed: start.elapsed(),
                outcome,
            });
        }
    }
    let table = Table(rows);
    println!("\n{table}");
    if table.failed() > 0 {
        println!(
            "{} of {} runs FAILED (replay one with CRASH_SEED=<seed> CRASH_SCENARIOS=<n>)",
            table.failed(),
            table.0.len()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
