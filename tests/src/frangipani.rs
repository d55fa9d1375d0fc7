//! A whole Frangipani cluster as processes: 3 Petal replicas, 3 lock servers and a
//! number of `frangipani mount` processes (the machines). On 127.0.0.1, each mount
//! reaches the lock service through proxies of its own, so a test can cut one machine off
//! from it; with [`Options::hosts`], every process runs on a simulated host of its own
//! ([`crate::netns`]) and a machine's whole link is cut. Dropping the cluster kills every
//! process by its pid, detaches every mount and removes the hosts.

use crate::bins::bin;
use crate::fuse::{detach, is_mounted, statfs_ok};
use crate::netns::Network;
use crate::process::{log_errors, log_tails, wait_for, Proc};
use crate::proxy::Proxy;
use crate::servers::{format_cluster, Group};
use crate::tmpfs::Tmpfs;
use raft::NodeId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// How long a mount may take to appear, a leader to be elected, a process to exit.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The shape and timings of a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Mount processes (machines).
    pub mounts: usize,
    /// The lock service's lease.
    pub lease_ms: u64,
    /// Raft tick of both groups.
    pub tick_ms: u64,
    /// Put this Petal replica's data directory on a tmpfs of this size ("32m"), a data
    /// disk that fills up.
    pub small_petal_disk: Option<(u64, String)>,
    /// Every process on a simulated host of its own (needs root; see [`crate::netns`]).
    pub hosts: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { mounts: 2, lease_ms: 5000, tick_ms: 50, small_petal_disk: None, hosts: false }
    }
}

/// One machine: its mount point, its process, its way to the lock servers (proxies of
/// its own on 127.0.0.1, or its host).
struct Machine {
    dir: PathBuf,
    proc: Option<Proc>,
    lock_proxies: BTreeMap<u64, Proxy>,
    host: Option<usize>,
    starts: u64,
}

/// The simulated hosts: Petal replica `id` on host `id - 1`, lock server `id` on host
/// `id + 2`, machine `i` on host `6 + i`.
const PETAL_HOST: usize = 0;
const LOCKS_HOST: usize = 3;
const MACHINE_HOST: usize = 6;

pub struct Cluster {
    // Field order is drop order: mounts first, then the servers, the runtime, the files.
    machines: Vec<Machine>,
    pub petal: Group,
    pub locks: Group,
    small_disk: Option<Tmpfs>,
    network: Option<Arc<Network>>,
    runtime: tokio::runtime::Runtime,
    tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts the servers, formats the file system and mounts every machine.
    pub fn start(opts: &Options) -> Cluster {
        let tmp = tempfile::Builder::new().prefix("frangipani-cluster-").tempdir().expect("tempdir");
        set_mode(tmp.path(), 0o755);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let network = opts.hosts.then(|| {
            let n = MACHINE_HOST + opts.mounts;
            Arc::new(Network::new(n).unwrap_or_else(|why| panic!("no simulated hosts: {why}")))
        });
        let tick = opts.tick_ms.to_string();
        let group = |program: &str, kind: &str, first_host: usize, extra: Vec<String>| match &network {
            None => Group::new(bin(program), kind, 3, extra, tmp.path()),
            Some(net) => {
                let host = move |id: u64| first_host + id as usize - 1;
                let addrs = (1..=3u64).map(|id| (id, format!("{}:7000", net.addr(host(id))))).collect();
                let (net, program) = (net.clone(), bin(program));
                let launch = Box::new(move |id: u64| net.command(host(id), &program));
                Group::launched(launch, kind, addrs, extra, tmp.path())
            }
        };
        let petal = group(
            "petal",
            "petal",
            PETAL_HOST,
            vec!["--tick-ms".into(), tick.clone(), "--fence-margin-ms".into(), "500".into()],
        );
        let locks = group(
            "lockserver",
            "locks",
            LOCKS_HOST,
            vec!["--tick-ms".into(), tick, "--lease-ms".into(), opts.lease_ms.to_string()],
        );
        let mut machines = Vec::new();
        for i in 0..opts.mounts {
            let dir = tmp.path().join(format!("mnt{i}"));
            std::fs::create_dir(&dir).expect("mount point");
            let lock_proxies = match network {
                Some(_) => BTreeMap::new(),
                None => runtime.block_on(async {
                    let mut proxies = BTreeMap::new();
                    for (id, addr) in &locks.addrs {
                        proxies.insert(*id, Proxy::start(addr.clone()).await);
                    }
                    proxies
                }),
            };
            let host = network.as_ref().map(|_| MACHINE_HOST + i);
            machines.push(Machine { dir, proc: None, lock_proxies, host, starts: 0 });
        }
        let small_disk = opts
            .small_petal_disk
            .as_ref()
            .map(|(id, size)| Tmpfs::mount(&petal.data_dir(*id), size).unwrap_or_else(|e| panic!("{e}")));
        let mut c = Cluster { machines, petal, locks, small_disk, network, runtime, tmp };
        c.petal.start_all();
        c.locks.start_all();
        c.frangipani_ok(&["mkfs"]);
        for i in 0..opts.mounts {
            c.mount(i);
        }
        c
    }

    /// The cluster's scratch directory (logs, data, mount points).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A scratch directory outside every mount.
    pub fn scratch(&self) -> PathBuf {
        let p = self.tmp.path().join("scratch");
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    /// Machine `i`'s mount point.
    pub fn mnt(&self, i: usize) -> &Path {
        &self.machines[i].dir
    }

    pub fn machines(&self) -> usize {
        self.machines.len()
    }

    /// Runs `frangipani ARGS --petal .. --locks ..` (lock servers reached directly).
    pub fn frangipani(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("frangipani"))
            .args(args)
            .args(["--petal", &self.petal.cluster_arg(), "--locks", &self.locks.cluster_arg()])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run frangipani")
    }

    fn frangipani_ok(&self, args: &[&str]) -> String {
        let out = self.frangipani(args);
        assert!(
            out.status.success(),
            "frangipani {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Mounts machine `i` (again), clearing a stale mount a killed process left.
    pub fn mount(&mut self, i: usize) {
        let m = &mut self.machines[i];
        assert!(m.proc.is_none(), "machine {i} is mounted already");
        m.starts += 1;
        let locks = match m.host {
            Some(_) => self.locks.cluster_arg(),
            None => format_cluster(&m.lock_proxies.iter().map(|(id, p)| (*id, p.addr.clone())).collect()),
        };
        let mut cmd = match (&self.network, m.host) {
            (Some(net), Some(h)) => net.command(h, bin("frangipani")),
            _ => Command::new(bin("frangipani")),
        };
        cmd.arg("mount")
            .arg(&m.dir)
            .args(["--petal", &self.petal.cluster_arg(), "--locks", &locks, "--threads", "4"])
            .env("RUST_LOG", "info");
        let log = self.tmp.path().join(format!("mount{i}.{}.log", m.starts));
        let mut proc = Proc::spawn(format!("mount{i}"), cmd, &log);
        let dir = m.dir.clone();
        let up = wait_for(PATIENCE, || {
            if let Some(status) = proc.exited() {
                return Some(Err(status));
            }
            (is_mounted(&dir) && statfs_ok(&dir)).then_some(Ok(()))
        });
        match up {
            Some(Ok(())) => m.proc = Some(proc),
            Some(Err(status)) => panic!("mount {i} exited with {status}:\n{}", self.logs()),
            None => panic!("mount {i} not up after {PATIENCE:?}:\n{}", self.logs()),
        }
    }

    /// Machine `i`'s mount process, if running.
    pub fn mount_process(&mut self, i: usize) -> Option<&mut Proc> {
        self.machines[i].proc.as_mut()
    }

    /// SIGKILL machine `i`'s mount process: its mount stays behind, stale.
    pub fn kill_mount(&mut self, i: usize) {
        self.machines[i].proc = None;
    }

    /// SIGTERM machine `i`'s mount process; it must exit and unmount.
    pub fn unmount(&mut self, i: usize) {
        let m = &mut self.machines[i];
        let proc = m.proc.take().expect("mounted");
        let status = proc.terminate(PATIENCE);
        assert!(status.is_some(), "mount {i} did not exit on SIGTERM:\n{}", self.logs());
        let dir = self.machines[i].dir.clone();
        if is_mounted(&dir) {
            detach(&dir);
            panic!("mount {i} exited ({status:?}) but left {} mounted", dir.display());
        }
    }

    /// Clears what killed mount processes left behind.
    pub fn detach_stale(&mut self) {
        for m in &self.machines {
            if m.proc.is_none() && is_mounted(&m.dir) {
                detach(&m.dir);
            }
        }
    }

    /// Cuts machine `i` off from the lock service (connections break, new ones are
    /// refused), or heals the link. On simulated hosts the machine's whole link is cut
    /// (Petal too).
    pub fn cut_off(&self, i: usize, cut: bool) {
        let m = &self.machines[i];
        if let (Some(net), Some(h)) = (&self.network, m.host) {
            if cut {
                net.cut(h);
            } else {
                net.heal(h);
            }
        }
        for p in m.lock_proxies.values() {
            if cut {
                p.partition();
            } else {
                p.heal();
            }
        }
    }

    /// SIGKILL every process at once: the power fails.
    pub fn power_loss(&mut self) {
        for m in &self.machines {
            if let Some(p) = &m.proc {
                p.signal(libc::SIGKILL);
            }
        }
        self.petal.kill_all();
        self.locks.kill_all();
        for m in &mut self.machines {
            m.proc = None;
        }
        self.detach_stale();
    }

    /// Unmounts every machine still mounted, then runs `frangipani fsck`; returns whether
    /// it found the file system clean, and its report.
    pub fn fsck(&mut self) -> (bool, String) {
        for i in 0..self.machines.len() {
            if self.machines[i].proc.is_some() {
                self.unmount(i);
            }
        }
        self.detach_stale();
        let out = self.frangipani(&["fsck"]);
        let report =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), report)
    }

    /// Gives the small Petal disk of [`Options::small_petal_disk`] a new size.
    pub fn resize_small_disk(&self, size: &str) {
        self.small_disk.as_ref().expect("a small Petal disk").resize(size);
    }

    /// The Petal group's leader, waiting for one.
    pub fn petal_leader(&self) -> u64 {
        let nodes = self.node_map(&self.petal);
        let _runtime = self.runtime.enter();
        let found = wait_for(PATIENCE, || {
            let client = petal::PetalClient::connect(nodes.clone()).ok()?;
            let statuses = self.runtime.block_on(client.status());
            statuses.into_iter().find_map(|(id, s)| s.ok().filter(|s| s.leader == id.0).map(|_| id.0))
        });
        found.unwrap_or_else(|| panic!("no Petal leader within {PATIENCE:?}\n{}", self.logs()))
    }

    /// Each running Petal replica's status.
    pub fn petal_statuses(&self) -> BTreeMap<u64, petal::proto::StatusReply> {
        let _runtime = self.runtime.enter();
        let Ok(client) = petal::PetalClient::connect(self.node_map(&self.petal)) else {
            return BTreeMap::new();
        };
        self.runtime
            .block_on(client.status())
            .into_iter()
            .filter_map(|(id, s)| Some((id.0, s.ok()?)))
            .collect()
    }

    /// Each Petal replica's digest of its disks, once every running one has applied the
    /// same index; `None` if they do not agree within [`PATIENCE`].
    pub fn petal_digests_agree(&self) -> Option<u64> {
        let _runtime = self.runtime.enter();
        let client = petal::PetalClient::connect(self.node_map(&self.petal)).ok()?;
        let ids: Vec<u64> = self.petal.ids().into_iter().filter(|id| self.petal.running(*id)).collect();
        wait_for(PATIENCE, || {
            let digests: Vec<_> = self.runtime.block_on(async {
                let mut out = Vec::new();
                for id in &ids {
                    out.push(client.digest(NodeId(*id)).await.ok().map(|d| (d.applied, d.disks)));
                }
                out
            });
            let first = digests.first()?.clone()?;
            digests.iter().all(|d| d.as_ref() == Some(&first)).then_some(first.0)
        })
    }

    /// The lock service's leader, waiting for one.
    pub fn locks_leader(&self) -> u64 {
        let _runtime = self.runtime.enter();
        let cluster = lockserver::cluster::Cluster::new(self.node_map(&self.locks));
        let found = wait_for(PATIENCE, || {
            self.runtime.block_on(async {
                for id in self.locks.ids() {
                    let Ok(mut client) = cluster.client(NodeId(id)) else { continue };
                    let mut request = tonic::Request::new(lockserver::service::proto::StatusRequest {});
                    request.set_timeout(Duration::from_secs(1));
                    if let Ok(r) = client.status(request).await {
                        if r.into_inner().leader == id {
                            return Some(id);
                        }
                    }
                }
                None
            })
        });
        found.unwrap_or_else(|| panic!("no lock service leader within {PATIENCE:?}\n{}", self.logs()))
    }

    fn node_map(&self, group: &Group) -> BTreeMap<NodeId, String> {
        group.addrs.iter().map(|(id, a)| (NodeId(*id), a.clone())).collect()
    }

    /// The last lines of every process's log.
    pub fn logs(&self) -> String {
        log_tails(self.tmp.path(), 20)
    }

    /// ERROR lines and panics in every log, except those matching `allowed`.
    pub fn errors(&self, allowed: &[&str]) -> Vec<String> {
        log_errors(self.tmp.path(), allowed)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.machines {
            // Killed, then the mount (stale now) detached.
            m.proc = None;
            if is_mounted(&m.dir) {
                detach(&m.dir);
            }
        }
    }
}

/// Sets a path's permission bits.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
