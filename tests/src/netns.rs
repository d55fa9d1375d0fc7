//! Simulated hosts on one machine: each host is a network namespace joined to the root
//! namespace by a veth pair, so the link of one host can be cut (every packet to or from
//! it dropped, established connections included) and healed, as a real partition would.
//!
//! ```text
//!   host 0 (netns)              root namespace (the test)              host 1 (netns)
//!   198.18.a.2/30 ── veth ── 198.18.a.1/30   198.18.b.1/30 ── veth ── 198.18.b.2/30
//!                            └──── ip_forward between hosts ────┘
//! ```
//!
//! Addresses come from 198.18.0.0/15, the block RFC 2544 sets aside for network
//! benchmarks, so they do not collide with the machine's own networks. Each host's /30 is
//! claimed with a `blackhole` route of metric [`CLAIM_METRIC`] in the root namespace:
//! adding a route that already exists fails, so two Networks (in this process or any
//! other) never get the same subnet, and while a host's link is cut the claim also keeps
//! its packets from leaking out of the machine's default route.
//!
//! Processes on a host are started with [`Network::command`], which uses
//! `nsenter --net=...`: only the network namespace changes (`ip netns exec` would also
//! unshare the mount namespace and hide the test's FUSE mounts), and nsenter execs the
//! program, so the child's pid is the program's pid ([`crate::process::Proc`] kills it).
//!
//! Needs root (CAP_NET_ADMIN), `ip` (iproute2) and `nsenter` (util-linux); without them
//! [`Network::new`] says why, and the test skips loudly.
//!
//! ```no_run
//! use cluster_tests::netns::Network;
//! let net = match Network::new(2) {
//!     Ok(net) => net,
//!     Err(why) => return eprintln!("!!! SKIPPED: {why}"),
//! };
//! let _petal = net.command(0, "petal"); // runs inside host 0; listen on net.addr(0)
//! net.cut(0); // host 0 is partitioned from the test and from host 1
//! net.heal(0);
//! // dropping `net` deletes its namespaces, veths and subnet claims
//! ```

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// The metric of the `blackhole` routes that claim a host's subnet: higher than the
/// kernel's connected route (0), which wins while the link is up.
pub const CLAIM_METRIC: u32 = 4242;

/// The first address of the block the hosts' subnets come from (198.18.0.0/15).
const BLOCK_START: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// How many /30 subnets the block holds.
const BLOCK_SUBNETS: u32 = (1 << 17) / 4;
/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Hosts made by this process so far: with the pid, it makes every name unique.
static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// Simulated hosts, each a network namespace with one link to the root namespace, which
/// forwards between them. Dropping it deletes everything it made, and nothing else.
pub struct Network {
    hosts: Vec<Host>,
    /// What was made, in order; undone in reverse when dropped, even if `new` failed
    /// halfway or the test panicked.
    made: Vec<Made>,
}

/// One simulated host.
struct Host {
    /// The namespace's name: /run/netns/<ns>.
    ns: String,
    /// The root namespace's end of the veth pair; cutting the host sets it down.
    root_if: String,
    /// The root end's address: the host's default gateway.
    gateway: Ipv4Addr,
    /// The host's address, on its end of the veth pair.
    addr: Ipv4Addr,
}

/// Something a Network made, to be deleted when it is dropped.
enum Made {
    /// A `blackhole` route in the root namespace claiming a /30.
    Claim(String),
    /// A network namespace.
    Netns(String),
    /// A veth pair, by its root namespace end (deleting it deletes both ends).
    Veth(String),
}

impl Network {
    /// Makes `hosts` hosts, each reachable from the test process and from every other host.
    /// Enables net.ipv4.ip_forward, which is global to the machine and left on.
    ///
    /// Err says why simulated hosts are impossible here: not root, no `ip` or `nsenter`,
    /// or no permission to make a namespace (root in an unprivileged container); callers
    /// skip. Any other failure is a bug and panics, after deleting whatever was made.
    pub fn new(hosts: usize) -> Result<Network, String> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(format!(
                "simulated hosts need root (network namespaces, veth); running as uid {uid}"
            ));
        }
        run(Command::new("ip").arg("-V")).map_err(|e| format!("`ip` (iproute2) is needed: {e}"))?;
        run(Command::new("nsenter").arg("--version"))
            .map_err(|e| format!("`nsenter` (util-linux) is needed: {e}"))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("enable net.ipv4.ip_forward: {e}"))?;

        let mut net = Network { hosts: Vec::with_capacity(hosts), made: Vec::new() };
        for _ in 0..hosts {
            // On Err or a panic, dropping `net` deletes the hosts made so far.
            if let Err(e) = net.add_host() {
                if e.contains("Operation not permitted") || e.contains("Permission denied") {
                    return Err(format!("no permission to make network namespaces: {e}"));
                }
                panic!("make a simulated host: {e}");
            }
        }
        Ok(net)
    }

    /// Makes one more host: claims a subnet, makes the namespace and the veth pair, and
    /// sets addresses, links and the default route.
    fn add_host(&mut self) -> Result<(), String> {
        let (ns, root_if, host_if) = fresh_names();
        let subnet = self.claim_subnet()?;
        let gateway = Ipv4Addr::from(subnet + 1);
        let addr = Ipv4Addr::from(subnet + 2);

        ip(&["netns", "add", &ns])?;
        self.made.push(Made::Netns(ns.clone()));
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", &host_if, "netns", &ns])?;
        self.made.push(Made::Veth(root_if.clone()));

        ip(&["addr", "add", &format!("{gateway}/30"), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/30"), "dev", &host_if])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "set", &host_if, "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &gateway.to_string()])?;
        self.hosts.push(Host { ns, root_if, gateway, addr });
        Ok(())
    }

    /// Claims a free /30 of the block and returns its first address. The search starts
    /// at a place picked from the pid so that concurrent test processes rarely contend.
    fn claim_subnet(&mut self) -> Result<u32, String> {
        let pid = std::process::id();
        let start = pid.wrapping_mul(2_654_435_761).wrapping_add(NEXT_HOST.load(Relaxed)) % BLOCK_SUBNETS;
        for i in 0..BLOCK_SUBNETS {
            let subnet = BLOCK_START + 4 * ((start + i) % BLOCK_SUBNETS);
            let prefix = format!("{}/30", Ipv4Addr::from(subnet));
            match ip(&["route", "add", "blackhole", &prefix, "metric", &CLAIM_METRIC.to_string()]) {
                Ok(()) => {
                    self.made.push(Made::Claim(prefix));
                    return Ok(subnet);
                }
                Err(e) if e.contains("File exists") => continue, // another Network's
                Err(e) => return Err(e),
            }
        }
        Err("no free /30 left in 198.18.0.0/15".into())
    }

    /// How many hosts there are.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// The host's address: where its servers listen and where others reach them.
    pub fn addr(&self, host: usize) -> Ipv4Addr {
        self.host(host).addr
    }

    /// The root namespace's address on the host's link: where a process on the host
    /// reaches a server of the test process (one listening on 0.0.0.0 or on this address).
    pub fn gateway(&self, host: usize) -> Ipv4Addr {
        self.host(host).gateway
    }

    /// The name of the host's network namespace (`ip netns list` shows it).
    pub fn ns_name(&self, host: usize) -> &str {
        &self.host(host).ns
    }

    /// A command that runs `program` inside the host's network namespace and nothing else
    /// (mounts, pids and the file system are the test's). Add arguments and spawn it as
    /// usual, e.g. with [`crate::process::Proc::spawn`]; its pid is the program's.
    pub fn command(&self, host: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.host(host).ns)).arg("--").arg(program);
        cmd
    }

    /// Isolates the host: its link to the root namespace goes down, so every packet to or
    /// from it is dropped, those of established TCP connections too (they stall, as over
    /// a cut cable, and resume after [`Network::heal`] if they have not timed out).
    /// Senders on other hosts see silence; the test process's own sends fail at once.
    pub fn cut(&self, host: usize) {
        let h = self.host(host);
        ip(&["link", "set", &h.root_if, "down"]).unwrap_or_else(|e| panic!("cut host {host}: {e}"));
    }

    /// Undoes [`Network::cut`]: the link comes up and the kernel restores its route.
    pub fn heal(&self, host: usize) {
        let h = self.host(host);
        ip(&["link", "set", &h.root_if, "up"]).unwrap_or_else(|e| panic!("heal host {host}: {e}"));
    }

    fn host(&self, host: usize) -> &Host {
        self.hosts.get(host).unwrap_or_else(|| panic!("host {host} of a network of {}", self.hosts.len()))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Reverse order: a host's veth, then its namespace, then its subnet claim. The
        // veth goes first because a namespace that still has processes in it outlives
        // `ip netns del`, and its end of the pair with it.
        for made in self.made.drain(..).rev() {
            let result = match &made {
                Made::Veth(root_if) => ip(&["link", "del", root_if]),
                Made::Netns(ns) => ip(&["netns", "del", ns]),
                Made::Claim(prefix) => {
                    ip(&["route", "del", "blackhole", prefix, "metric", &CLAIM_METRIC.to_string()])
                }
            };
            if let Err(e) = result {
                eprintln!("netns: cleaning up: {e}");
            }
        }
    }
}

/// Names for a new host: its namespace, the root end of its veth pair and its own end.
/// The pid and a counter make them unique among live processes; names left behind by a
/// killed process whose pid came back are skipped.
fn fresh_names() -> (String, String, String) {
    let pid = std::process::id();
    loop {
        let n = NEXT_HOST.fetch_add(1, Relaxed);
        let names = (format!("ct{pid}h{n}"), format!("ct{pid}r{n}"), format!("ct{pid}p{n}"));
        assert!(
            names.1.len() <= IFNAME_MAX && names.2.len() <= IFNAME_MAX,
            "interface name {} too long",
            names.1
        );
        let taken = std::path::Path::new("/run/netns").join(&names.0).exists()
            || std::path::Path::new("/sys/class/net").join(&names.1).exists()
            || std::path::Path::new("/sys/class/net").join(&names.2).exists();
        if !taken {
            return names;
        }
    }
}

/// Runs `ip ARGS`; Err holds the command and what it printed on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

/// Runs `cmd` to completion; Err says what it was and why it failed.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}
