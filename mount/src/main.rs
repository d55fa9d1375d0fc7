//! The `frangipani` command.
//!
//! For now only the hidden development command `mount-memory`; `up`, `mkfs`, `mount`,
//! `status`, `fsck` and `bench` join it as further [`Backend`]s and subcommands once the
//! Petal client and the lock service's clerk can be wired in.

use anyhow::Context;
use clap::{Parser, Subcommand};
use frangipani::disk::{MemDisk, VirtualDisk};
use frangipani::layout::Params;
use frangipani::locks::{LockCallbacks, Locks, MemLockService};
use frangipani::mkfs;
use mount::mounter::{MountOptions, Signals, Supervisor};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Weak};

#[derive(Parser)]
#[command(name = "frangipani", version, about = "The Frangipani distributed file system")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Hands the lock client the callbacks it makes on revocation and recovery.
    install_callbacks: Box<dyn FnOnce(Weak<dyn LockCallbacks>)>,
}

/// Where disks and locks come from. TODO(lead): `Petal { .. }` (the blocking Petal client)
/// and the lock service's clerk, for `mount` and `up`.
enum Backend {
    /// A disk and a lock service in this process.
    Memory { disk: Arc<MemDisk>, locks: Arc<MemLockService> },
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
                    install_callbacks: Box::new(move |cb| for_callbacks.set_callbacks(cb)),
                })
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Memory { .. } => "frangipani:memory",
        }
    }
}

/// Mounts one client per directory and serves them until a signal.
fn serve(signals: Signals, backend: &Backend, dirs: &[PathBuf], args: &MountArgs) -> anyhow::Result<()> {
    let mut supervisor = Supervisor::new(signals).context("start the signal thread")?;
    for (n, dir) in dirs.iter().enumerate() {
        let client = backend.client(n as u32)?;
        supervisor.mount(
            client.disk,
            client.locks,
            client.install_callbacks,
            dir,
            &args.options(backend.name()),
        )?;
    }
    supervisor.run()?;
    Ok(())
}

fn run(cli: Cli, signals: Signals) -> anyhow::Result<()> {
    match cli.command {
        Cmd::MountMemory { dirs, mount } => serve(signals, &Backend::memory()?, &dirs, &mount),
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
