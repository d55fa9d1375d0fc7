//! The `frangipani` command.
//!
//! ```text
//! frangipani up DIR                                  # a local cluster, mounted at DIR
//! frangipani mkfs  --petal CLUSTER [--disk fs]
//! frangipani mount DIR --petal CLUSTER --locks CLUSTER [--disk fs]
//! frangipani umount DIR [--lazy]
//! frangipani fsck  --petal CLUSTER --locks CLUSTER [--disk fs] [--repair]
//! frangipani status --petal CLUSTER --locks CLUSTER
//! frangipani bench DIR [--big-file-size 1G] [--small-files 100] ...
//! ```
//!
//! Every command that talks to a cluster takes its addresses from flags, or from a TOML
//! file (`--cluster-file FILE` with `petal = "..."`, `locks = "..."`, `disk = "..."`);
//! flags win, and without either the addresses `up` uses are assumed.

use anyhow::Context;
use clap::{Parser, Subcommand};
use frangipani::clerk_locks::{CallbackBridge, ClerkLocks};
use frangipani::disk::{MemDisk, VirtualDisk};
use frangipani::layout::Params;
use frangipani::locks::{LockCallbacks, LockError, LockName, Locks, MemLockService, Mode};
use frangipani::mkfs;
use frangipani::petal_disk::PetalDisk;
use frangipani::Frangipani;
use lockserver::{Clerk, ClerkConfig};
use mount::mounter::{MountOptions, Signals, Supervisor};
use mount::status::SessionInfo;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Weak};

#[derive(Parser)]
#[command(name = "frangipani", version, about = "The Frangipani distributed file system")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Where the cluster is (for every command that talks to one), as given.
#[derive(clap::Args, Clone)]
struct ClusterFlags {
    /// Petal replicas, ID=HOST:PORT,... [default: the cluster file's, else up's]
    #[arg(long)]
    petal: Option<String>,
    /// Lock servers, ID=HOST:PORT,... [default: the cluster file's, else up's]
    #[arg(long)]
    locks: Option<String>,
    /// The Petal virtual disk holding the file system [default: the cluster file's, else "fs"]
    #[arg(long)]
    disk: Option<String>,
    /// A TOML file with the addresses: petal = "1=HOST:PORT,...", locks = "...", disk = "fs".
    /// Flags override it.
    #[arg(long, value_name = "FILE")]
    cluster_file: Option<PathBuf>,
}

/// A cluster file's contents.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    petal: Option<String>,
    locks: Option<String>,
    disk: Option<String>,
}

impl ClusterFlags {
    /// The addresses: flags, else the cluster file, else `up`'s.
    fn resolve(self) -> anyhow::Result<ClusterArgs> {
        let file = match &self.cluster_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?
            }
            None => ClusterFile::default(),
        };
        Ok(ClusterArgs {
            petal: self.petal.or(file.petal).unwrap_or_else(|| UP_PETAL.into()),
            locks: self.locks.or(file.locks).unwrap_or_else(|| UP_LOCKS.into()),
            disk: self.disk.or(file.disk).unwrap_or_else(|| "fs".into()),
        })
    }
}

/// Where the cluster is.
#[derive(Clone)]
struct ClusterArgs {
    petal: String,
    locks: String,
    disk: String,
}

/// The addresses `up` uses, so the other commands find its cluster by default.
const UP_PETAL: &str = "1=127.0.0.1:7501,2=127.0.0.1:7502,3=127.0.0.1:7503";
const UP_LOCKS: &str = "1=127.0.0.1:7511,2=127.0.0.1:7512,3=127.0.0.1:7513";

#[derive(Subcommand)]
enum Cmd {
    /// Starts a complete local cluster (3 Petal replicas, 3 lock servers) with its data
    /// under --data, formats it on first use, and mounts it at DIR until Ctrl-C or SIGTERM.
    Up {
        /// Mount point.
        dir: PathBuf,
        /// Where the cluster keeps its data (default: DIR's path with ".frangipani" added).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The lock service's lease: how long a crashed client's locks stay held before
        /// another client recovers its log.
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
        #[command(flatten)]
        mount: MountArgs,
    },
    /// Formats the Petal disk (creating it if needed). Destroys what was there.
    Mkfs {
        #[command(flatten)]
        cluster: ClusterFlags,
    },
    /// Mounts the file system at DIR until Ctrl-C, SIGTERM or `frangipani umount DIR`. A
    /// stale mount left at DIR by a killed process is cleared first, and its log recovered.
    Mount {
        /// Mount point.
        dir: PathBuf,
        #[command(flatten)]
        cluster: ClusterFlags,
        #[command(flatten)]
        mount: MountArgs,
    },
    /// Unmounts DIR: its mount process writes everything back and lets the mount go (and
    /// exits once it serves nothing else); a stale mount whose process is gone is detached.
    Umount {
        /// Mount point.
        dir: PathBuf,
        /// Detach even if busy (open files keep being served until closed).
        #[arg(long)]
        lazy: bool,
    },
    /// Checks the file system (run it on a quiet file system); --repair fixes what it can.
    Fsck {
        #[command(flatten)]
        cluster: ClusterFlags,
        /// Fix link counts, bitmaps and unreachable inodes.
        #[arg(long)]
        repair: bool,
    },
    /// Shows this machine's mounts (lock-service session and slot, lease left, cached
    /// locks, cache and dirty bytes, log use, locked files), then the health and leader of
    /// the Petal group and of the lock service.
    Status {
        #[command(flatten)]
        cluster: ClusterFlags,
    },
    /// Measures a directory (a mount, or any other for comparison), like `juicefs bench`:
    /// a big file written and read sequentially, small files written and read, and stats;
    /// shows progress while it runs and a table at the end.
    Bench(mount::bench::BenchArgs),
    /// Formats a file system in memory and mounts one client of it at each DIR (several
    /// DIRs act as several machines sharing the disk and the lock service), until Ctrl-C
    /// or SIGTERM. For development and tests: nothing survives the process.
    #[command(hide = true)]
    MountMemory {
        /// Mount points, one client each.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[command(flatten)]
        mount: MountArgs,
    },
}

/// How to mount (shared by every mounting command).
#[derive(clap::Args)]
struct MountArgs {
    /// Request threads per mount.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Only the mounting user may enter (no allow_other).
    #[arg(long)]
    private: bool,
}

impl MountArgs {
    fn options(&self, fsname: &str) -> MountOptions {
        MountOptions {
            fsname: fsname.into(),
            threads: self.threads,
            allow_other: !self.private,
            ..Default::default()
        }
    }
}

/// One machine's way to the shared disk and the lock service.
struct Client {
    disk: Arc<dyn VirtualDisk>,
    locks: Arc<dyn Locks>,
    /// The lock-service session, for status (none for the in-memory service).
    session: Option<Arc<dyn SessionInfo>>,
    /// Hands the lock client the callbacks it makes on revocation and recovery.
    install_callbacks: Box<dyn FnOnce(Weak<dyn LockCallbacks>)>,
}

/// Where disks and locks come from.
enum Backend {
    /// A disk and a lock service in this process.
    Memory { disk: Arc<MemDisk>, locks: Arc<MemLockService> },
    /// A Petal disk and the lock service, the way machines share them.
    Cluster { args: ClusterArgs, runtime: Arc<tokio::runtime::Runtime> },
}

impl Backend {
    /// A freshly formatted in-memory file system.
    fn memory() -> anyhow::Result<Backend> {
        let disk = Arc::new(MemDisk::new());
        mkfs::mkfs(disk.clone(), Params::default()).context("format the memory disk")?;
        Ok(Backend::Memory { disk, locks: MemLockService::new() })
    }

    /// The `n`th client (machine) of this backend.
    fn client(&self, n: u32) -> anyhow::Result<Client> {
        match self {
            Backend::Memory { disk, locks } => {
                let lock_client = locks.client(n + 1);
                let for_callbacks = lock_client.clone();
                Ok(Client {
                    disk: disk.clone(),
                    locks: lock_client,
                    session: None,
                    install_callbacks: Box::new(move |cb| for_callbacks.set_callbacks(cb)),
                })
            }
            Backend::Cluster { args, runtime } => {
                let disk = petal_disk(args)?;
                let locks = runtime.block_on(lock_client(args, n))?;
                Ok(Client {
                    disk,
                    locks: locks.clone(),
                    session: Some(locks.clone()),
                    install_callbacks: Box::new(move |cb| locks.bridge.set(cb)),
                })
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Memory { .. } => "frangipani:memory",
            Backend::Cluster { .. } => "frangipani",
        }
    }
}

/// Mounts one client per directory and serves them until a signal.
fn serve(signals: Signals, backend: &Backend, dirs: &[PathBuf], args: &MountArgs) -> anyhow::Result<()> {
    let mut supervisor = Supervisor::new(signals).context("start the signal thread")?;
    for (n, dir) in dirs.iter().enumerate() {
        let client = backend.client(n as u32)?;
        let options = MountOptions { session: client.session, ..args.options(backend.name()) };
        supervisor.mount(client.disk, client.locks, client.install_callbacks, dir, &options)?;
    }
    supervisor.run()?;
    Ok(())
}

/// The clerk as the file system's lock client, with the bridge its callbacks go through.
struct ClusterLocks {
    locks: ClerkLocks,
    bridge: Arc<CallbackBridge>,
}

impl Locks for ClusterLocks {
    fn acquire(&self, name: &LockName, mode: Mode) -> Result<(), LockError> {
        self.locks.acquire(name, mode)
    }
    fn release(&self, name: &LockName, mode: Mode) {
        self.locks.release(name, mode)
    }
    fn slot(&self) -> u32 {
        self.locks.slot()
    }
    fn lease_expiry_ms(&self) -> Option<u64> {
        self.locks.lease_expiry_ms()
    }
}

impl SessionInfo for ClusterLocks {
    fn session(&self) -> String {
        self.locks.clerk().session().to_string()
    }
    fn cached_locks(&self) -> usize {
        self.locks.clerk().cached_count()
    }
}

fn cluster(s: &str) -> anyhow::Result<std::collections::BTreeMap<raft::NodeId, String>> {
    raft::cluster::parse_cluster(s).map_err(anyhow::Error::msg)
}

fn petal_disk(args: &ClusterArgs) -> anyhow::Result<Arc<dyn VirtualDisk>> {
    let client = petal::BlockingClient::new(petal::ClientConfig::new(cluster(&args.petal)?))?;
    Ok(Arc::new(PetalDisk::new(client, args.disk.clone())))
}

async fn lock_client(args: &ClusterArgs, n: u32) -> anyhow::Result<Arc<ClusterLocks>> {
    let bridge = CallbackBridge::new();
    let name = format!("{}:{}:{n}", hostname(), std::process::id());
    let clerk = Clerk::connect(ClerkConfig::new(cluster(&args.locks)?, name), bridge.clone())
        .await
        .context("open a lock service session")?;
    Ok(Arc::new(ClusterLocks { locks: ClerkLocks::new(Arc::new(clerk)), bridge }))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into())
}

fn runtime() -> anyhow::Result<Arc<tokio::runtime::Runtime>> {
    Ok(Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("start runtime")?,
    ))
}

/// Creates the disk if needed and formats it.
fn mkfs_cluster(args: &ClusterArgs) -> anyhow::Result<()> {
    let client = petal::BlockingClient::new(petal::ClientConfig::new(cluster(&args.petal)?))?;
    match client.create(&args.disk) {
        Ok(()) | Err(petal::PetalError::Exists(_)) => {}
        Err(e) => return Err(e).context("create the Petal disk"),
    }
    mkfs::mkfs(Arc::new(PetalDisk::new(client, args.disk.clone())), Params::default()).context("mkfs")?;
    Ok(())
}

/// Whether the disk holds a file system already.
fn formatted(args: &ClusterArgs) -> anyhow::Result<bool> {
    let client = petal::BlockingClient::new(petal::ClientConfig::new(cluster(&args.petal)?))?;
    match client.create(&args.disk) {
        Ok(()) => return Ok(false),
        Err(petal::PetalError::Exists(_)) => {}
        Err(e) => return Err(e).context("create the Petal disk"),
    }
    Ok(mkfs::read_params(&PetalDisk::new(client, args.disk.clone())).is_ok())
}

fn fsck(args: &ClusterArgs, repair: bool) -> anyhow::Result<bool> {
    let runtime = runtime()?;
    let locks = runtime.block_on(lock_client(args, 0))?;
    let fs = Frangipani::mount(petal_disk(args)?, locks.clone(), frangipani::Config::default())?;
    locks.bridge.set(fs.callbacks());
    let report = fs.fsck(repair)?;
    println!("{report}");
    fs.unmount()?;
    Ok(report.is_clean())
}

fn status(args: &ClusterArgs) -> anyhow::Result<()> {
    let mounts = mount::status::local_mounts();
    println!("mounts on this machine ({}):", mount::status::run_dir().display());
    if mounts.is_empty() {
        println!("  none");
    }
    for m in &mounts {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!("  {} (pid {})", m.dir.display(), m.pid);
        println!(
            "    lock service: session {}, slot {}, lease left {}, cached locks {}",
            m.session,
            m.slot,
            or_dash(m.lease_left_ms.map(|ms| format!("{:.1} s", ms as f64 / 1000.0))),
            or_dash(m.cached_locks.map(|n| n.to_string())),
        );
        println!(
            "    cache: {} ({} dirty); log {:.1}% used; files with locks held: {}",
            mount::bench::human_bytes(m.cache_bytes),
            mount::bench::human_bytes(m.dirty_bytes),
            m.log_used_percent,
            m.locked_files,
        );
    }
    // The services' own status commands say it best: run them.
    for (program, title, addrs) in
        [("petal", "Petal group", &args.petal), ("lockserver", "lock service", &args.locks)]
    {
        println!("{title} ({addrs}):");
        let out = std::process::Command::new(sibling(program)?)
            .args(["status", "--cluster", addrs])
            .output()
            .with_context(|| format!("run {program} status"))?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// Unmounts `dir` (see `Cmd::Umount`), then waits for its process to write back.
fn umount(dir: &std::path::Path, lazy: bool) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
    if mount::mounter::clear_stale(&dir)? {
        println!("frangipani: {} was stale (its process is gone): detached", dir.display());
        return Ok(());
    }
    let dir = dir.canonicalize().with_context(|| format!("resolve {}", dir.display()))?;
    let server = mount::status::local_mounts().into_iter().find(|m| m.dir == dir).map(|m| m.pid);
    match mount::mounter::unmount(&dir) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && lazy => {
            mount::mounter::detach(&dir).with_context(|| format!("detach {}", dir.display()))?;
            println!("frangipani: {} is busy: detached (served until its files are closed)", dir.display());
            return Ok(());
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            anyhow::bail!("{} is busy (--lazy detaches it anyway)", dir.display())
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => anyhow::bail!("{} is not mounted", dir.display()),
        other => other.with_context(|| format!("unmount {}", dir.display()))?,
    }
    // The mount process writes back once its session ends; wait until it says it is done.
    if let Some(pid) = server {
        let deadline = std::time::Instant::now() + UMOUNT_WAIT;
        while mount::status::local_mounts().iter().any(|m| m.dir == dir && m.pid == pid) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "unmounted {}, but process {pid} has not written back within {UMOUNT_WAIT:?}",
                    dir.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    println!("frangipani: unmounted {}", dir.display());
    Ok(())
}

/// How long `umount` waits for the mount process to write back.
const UMOUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A program installed beside this one (the workspace's binaries share a directory).
fn sibling(program: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find own executable")?;
    Ok(exe.parent().context("executable directory")?.join(program))
}

/// Child processes of `up`, killed (SIGTERM, then SIGKILL) and reaped when dropped.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Starts 3 Petal replicas and 3 lock servers beside this executable's siblings.
fn start_cluster(data: &std::path::Path, lease_ms: u64) -> anyhow::Result<Children> {
    std::fs::create_dir_all(data).with_context(|| format!("create {}", data.display()))?;
    let mut children = Children(Vec::new());
    for (program, peers, kind) in [("petal", UP_PETAL, "petal"), ("lockserver", UP_LOCKS, "locks")] {
        for id in 1..=3 {
            let log = std::fs::File::create(data.join(format!("{kind}{id}.log")))?;
            let mut command = std::process::Command::new(sibling(program)?);
            command
                .args(["serve", "--id", &id.to_string(), "--peers", peers, "--data"])
                .arg(data.join(format!("{kind}{id}")));
            if program == "lockserver" {
                command.args(["--lease-ms", &lease_ms.to_string()]);
            }
            let child = command
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {program} (built beside frangipani?)"))?;
            children.0.push(child);
        }
    }
    Ok(children)
}

fn up(
    signals: Signals,
    dir: PathBuf,
    data: Option<PathBuf>,
    lease_ms: u64,
    mount: MountArgs,
) -> anyhow::Result<()> {
    let data = data.unwrap_or_else(|| {
        let mut d = dir.clone().into_os_string();
        d.push(".frangipani");
        PathBuf::from(d)
    });
    let children = start_cluster(&data, lease_ms)?;
    let args = ClusterArgs { petal: UP_PETAL.into(), locks: UP_LOCKS.into(), disk: "fs".into() };
    // The groups elect leaders within a few seconds; the clients retry until then.
    if !formatted(&args)? {
        mkfs_cluster(&args)?;
        println!("frangipani: formatted a new file system");
    }
    println!("frangipani: petal {UP_PETAL}, locks {UP_LOCKS}, data in {}", data.display());
    println!("frangipani: mounted at {} (Ctrl-C to stop)", dir.display());
    let backend = Backend::Cluster { args, runtime: runtime()? };
    let result = serve(signals, &backend, std::slice::from_ref(&dir), &mount);
    drop(backend);
    drop(children);
    result
}

fn run(cli: Cli, signals: Signals) -> anyhow::Result<()> {
    match cli.command {
        Cmd::MountMemory { dirs, mount } => serve(signals, &Backend::memory()?, &dirs, &mount),
        Cmd::Up { dir, data, lease_ms, mount } => up(signals, dir, data, lease_ms, mount),
        Cmd::Mkfs { cluster } => mkfs_cluster(&cluster.resolve()?),
        Cmd::Mount { dir, cluster, mount } => {
            let backend = Backend::Cluster { args: cluster.resolve()?, runtime: runtime()? };
            serve(signals, &backend, &[dir], &mount)
        }
        Cmd::Umount { dir, lazy } => umount(&dir, lazy),
        Cmd::Fsck { cluster, repair } => {
            if fsck(&cluster.resolve()?, repair)? || repair {
                Ok(())
            } else {
                anyhow::bail!("the file system has problems (run with --repair to fix them)")
            }
        }
        Cmd::Status { cluster } => status(&cluster.resolve()?),
        Cmd::Bench(args) => mount::bench::run(&args),
    }
}

fn main() -> ExitCode {
    // Before any thread starts, so that only the signal thread ever takes them.
    let signals = match Signals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("frangipani: block signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli, signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
