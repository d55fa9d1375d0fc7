//! `frangipani bench DIR`: a quick measure of a directory, after `juicefs bench`.
//!
//! Five stages run one after the other in a scratch directory under DIR (removed at the
//! end): a big file written sequentially in blocks and made durable (fsync), read back,
//! small files written (each fsynced) and read back, and every file stat'ed. While a
//! stage runs a progress line is redrawn in place on a terminal (plain lines otherwise);
//! at the end a table gives each stage's throughput and its cost per operation.

use anyhow::Context;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What to run.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The directory to measure (a mount, or any directory to compare with).
    pub dir: PathBuf,
    /// Total size of the big file (K, M, G suffixes: powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub big_file_size: u64,
    /// Size of each write and read of the big file.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub block_size: u64,
    /// Number of small files.
    #[arg(long, default_value_t = 100)]
    pub small_files: u64,
    /// Size of each small file.
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    pub small_file_size: u64,
}

/// One line of the summary table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured.
    pub item: &'static str,
    /// Throughput.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// Time per operation, with its unit.
    pub cost: String,
}

/// Runs the benchmark on `args.dir` and prints the table.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.block_size > 0, "--block-size must be positive");
    let scratch = args.dir.join(format!(".frangipani-bench-{}", std::process::id()));
    std::fs::create_dir(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let result = stages(args, &scratch);
    let cleanup = std::fs::remove_dir_all(&scratch).with_context(|| format!("remove {}", scratch.display()));
    let rows = result?;
    cleanup?;
    print!("{}", table(&rows));
    Ok(())
}

fn stages(args: &BenchArgs, scratch: &Path) -> anyhow::Result<Vec<Row>> {
    let mib = |bytes: u64, d: Duration| bytes as f64 / (1 << 20) as f64 / secs(d);
    let block = args.block_size as usize;
    let blocks = args.big_file_size.div_ceil(args.block_size);
    let big = scratch.join("big");
    let buf: Vec<u8> = (0..block).map(|i| (i * 31 % 251) as u8).collect();
    let mut rows = Vec::new();

    let mut p = Progress::new("Write big file", blocks);
    let t = Instant::now();
    let mut f = File::create(&big).with_context(|| format!("create {}", big.display()))?;
    let mut left = args.big_file_size;
    while left > 0 {
        let n = left.min(args.block_size) as usize;
        f.write_all(&buf[..n]).context("write the big file")?;
        left -= n as u64;
        p.step();
    }
    f.sync_all().context("fsync the big file")?;
    drop(f);
    let d = t.elapsed();
    p.done();
    rows.push(Row {
        item: "Write big file",
        value: mib(args.big_file_size, d),
        unit: "MiB/s",
        cost: format!("{:.2} s/file", secs(d)),
    });

    let mut p = Progress::new("Read big file", blocks);
    let t = Instant::now();
    let mut f = File::open(&big).context("open the big file")?;
    let mut rbuf = vec![0u8; block];
    let mut read = 0u64;
    loop {
        let n = f.read(&mut rbuf).context("read the big file")?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read.is_multiple_of(args.block_size) || read == args.big_file_size {
            p.step();
        }
    }
    let d = t.elapsed();
    p.done();
    anyhow::ensure!(
        read == args.big_file_size,
        "read {read} bytes of the big file, wrote {}",
        args.big_file_size
    );
    rows.push(Row {
        item: "Read big file",
        value: mib(read, d),
        unit: "MiB/s",
        cost: format!("{:.2} s/file", secs(d)),
    });
    std::fs::remove_file(&big).context("remove the big file")?;

    let small: Vec<PathBuf> = (0..args.small_files).map(|i| scratch.join(format!("small-{i}"))).collect();
    let data: Vec<u8> = (0..args.small_file_size).map(|i| (i % 253) as u8).collect();
    let per_file = |d: Duration| {
        let ms = secs(d) * 1000.0 / args.small_files.max(1) as f64;
        if ms < 0.1 {
            format!("{:.2} us/file", ms * 1000.0)
        } else {
            format!("{ms:.2} ms/file")
        }
    };
    let files_per_sec = |d: Duration| args.small_files as f64 / secs(d);

    let mut p = Progress::new("Write small file", args.small_files);
    let t = Instant::now();
    for path in &small {
        let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
        f.write_all(&data).context("write a small file")?;
        f.sync_all().context("fsync a small file")?;
        p.step();
    }
    let d = t.elapsed();
    p.done();
    rows.push(Row { item: "Write small file", value: files_per_sec(d), unit: "files/s", cost: per_file(d) });

    let mut p = Progress::new("Read small file", args.small_files);
    let t = Instant::now();
    for path in &small {
        let got = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        anyhow::ensure!(
            got.len() == data.len(),
            "{} has {} bytes, not {}",
            path.display(),
            got.len(),
            data.len()
        );
        p.step();
    }
    let d = t.elapsed();
    p.done();
    rows.push(Row { item: "Read small file", value: files_per_sec(d), unit: "files/s", cost: per_file(d) });

    let mut p = Progress::new("Stat file", args.small_files);
    let t = Instant::now();
    for path in &small {
        std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
        p.step();
    }
    let d = t.elapsed();
    p.done();
    rows.push(Row { item: "Stat file", value: files_per_sec(d), unit: "files/s", cost: per_file(d) });
    Ok(rows)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// The summary table.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 4]> =
        std::iter::once(["ITEM".into(), "VALUE".into(), "UNIT".into(), "COST".into()])
            .chain(
                rows.iter().map(|r| {
                    [r.item.to_string(), format!("{:.2}", r.value), r.unit.to_string(), r.cost.clone()]
                }),
            )
            .collect();
    let widths: Vec<usize> = (0..4).map(|c| cells.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let rule = format!("+{}+\n", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let mut out = rule.clone();
    for (i, r) in cells.iter().enumerate() {
        out.push('|');
        for (c, cell) in r.iter().enumerate() {
            // Numbers to the right, words to the left.
            if c == 1 && i > 0 {
                out.push_str(&format!(" {cell:>w$} |", w = widths[c]));
            } else {
                out.push_str(&format!(" {cell:<w$} |", w = widths[c]));
            }
        }
        out.push('\n');
        if i == 0 {
            out.push_str(&rule);
        }
    }
    out.push_str(&rule);
    out
}

/// A stage's progress: redrawn in place on a terminal, a line at the end otherwise.
struct Progress {
    stage: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    tty: bool,
    drawn: Instant,
}

/// How often the progress line is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

impl Progress {
    fn new(stage: &'static str, total: u64) -> Progress {
        let now = Instant::now();
        let p =
            Progress { stage, total, done: 0, start: now, tty: std::io::stderr().is_terminal(), drawn: now };
        if p.tty {
            p.draw();
        }
        p
    }

    fn step(&mut self) {
        self.done += 1;
        if self.tty && self.drawn.elapsed() >= REDRAW {
            self.drawn = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let width = 30usize;
        let filled = (pct as usize * width / 100).min(width);
        eprint!(
            "\r{:<17} [{}{}] {}/{} {:>3}% {:.1}s ",
            self.stage,
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.done,
            self.total,
            pct,
            self.start.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    }

    fn done(self) {
        if self.tty {
            self.draw();
            eprintln!();
        } else {
            eprintln!(
                "{}: {}/{} done in {:.2}s",
                self.stage,
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Parses a size: a number with an optional K, M, G or T suffix (powers of 1024; a
/// trailing "B" or "iB" is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("not a size: {s:?} (try 4K, 128K, 1M, 1G)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size too large: {s}"))
}

/// A byte count for people: "1.5 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 19), "1.5 MiB");
    }

    #[test]
    fn the_table_lines_up() {
        let rows = vec![
            Row { item: "Write big file", value: 123.456, unit: "MiB/s", cost: "1.00 s/file".into() },
            Row { item: "Stat file", value: 9.0, unit: "files/s", cost: "0.11 ms/file".into() },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
        assert!(t.contains("| Write big file | 123.46 | MiB/s   | 1.00 s/file  |"), "{t}");
    }

    #[test]
    fn a_small_run_measures_every_stage() {
        let dir = tempfile::tempdir().unwrap();
        let args = BenchArgs {
            dir: dir.path().into(),
            big_file_size: 3 << 20,
            block_size: 1 << 20,
            small_files: 5,
            small_file_size: 4096,
        };
        let scratch = dir.path().join("s");
        std::fs::create_dir(&scratch).unwrap();
        let rows = stages(&args, &scratch).unwrap();
        let items: Vec<&str> = rows.iter().map(|r| r.item).collect();
        assert_eq!(
            items,
            ["Write big file", "Read big file", "Write small file", "Read small file", "Stat file"]
        );
        assert!(rows.iter().all(|r| r.value > 0.0));
    }
}
