//! Simulated hosts: a server on host 0 is reachable from the test and from host 1; cutting
//! host 0's link makes it unreachable (established connections included) and healing it
//! brings it back; dropping the Network deletes its namespaces, veths and routes.
//!
//! The processes on the hosts are this test binary again, run with NETNS_TEST_ROLE set
//! (see [`helper_process`]), so the test needs nothing but `ip` and `nsenter`.

use cluster_tests::netns::Network;
use cluster_tests::process::{wait_for, Proc};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// The echo server's port on host 0 (the namespace is its own, so no port can clash).
const ECHO_PORT: u16 = 7000;
/// How long one echo may take before it counts as unreachable.
const ECHO_TIMEOUT: Duration = Duration::from_secs(1);

/// Not a test: the body of the processes run on the hosts. NETNS_TEST_ROLE=serve runs an
/// echo server on NETNS_TEST_ADDR until killed; =echo exits 0 if one line comes back from
/// NETNS_TEST_ADDR, and fails otherwise. Without the variable it does nothing.
#[test]
fn helper_process() {
    let Ok(role) = std::env::var("NETNS_TEST_ROLE") else { return };
    let addr: SocketAddr =
        std::env::var("NETNS_TEST_ADDR").expect("NETNS_TEST_ADDR").parse().expect("address");
    match role.as_str() {
        "serve" => serve_echo(TcpListener::bind(addr).expect("bind the echo server")),
        "echo" => echo(addr, "from a host").unwrap_or_else(|e| panic!("echo from {addr}: {e}")),
        other => panic!("unknown NETNS_TEST_ROLE {other}"),
    }
}

#[test]
fn hosts_reach_each_other_until_cut() {
    let net = match Network::new(2) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("!!! SKIPPED hosts_reach_each_other_until_cut: no simulated hosts: {why}");
            return;
        }
    };
    let names = [net.ns_name(0).to_string(), net.ns_name(1).to_string()];
    let listed = netns_list();
    assert!(names.iter().all(|n| listed.contains(n)), "{names:?} not in `ip netns list`: {listed}");

    let dir = tempfile::tempdir().expect("temporary directory");
    let server_addr = SocketAddr::from((net.addr(0), ECHO_PORT));
    let mut serve = net.command(0, std::env::current_exe().expect("test binary"));
    helper_args(&mut serve, "serve", server_addr);
    let mut server = Proc::spawn("echo-server", serve, &dir.path().join("echo-server.log"));

    // An echo server in the root namespace, on host 0's gateway, for host 0 to reach.
    let root_listener = TcpListener::bind((net.gateway(0), 0)).expect("bind the root echo server");
    let root_addr = root_listener.local_addr().expect("root echo address");
    std::thread::spawn(move || serve_echo(root_listener));

    // Reachable: test -> host 0, host 1 -> host 0, host 0 -> test.
    wait_for(Duration::from_secs(10), || echo(server_addr, "hello").ok())
        .unwrap_or_else(|| panic!("echo server on host 0 never answered the test\n{}", log(&server)));
    let mut held = Held::connect(server_addr);
    held.echo("before the cut").expect("echo on an established connection");
    echo_from(&net, 1, server_addr).expect("host 1 reaches host 0");
    echo_from(&net, 0, root_addr).expect("host 0 reaches the test");

    // Cut: nothing gets through, in either direction, established connections included.
    net.cut(0);
    let started = Instant::now();
    assert!(echo(server_addr, "cut").is_err(), "the test reached host 0 through a cut link");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a new connection took {:?} to fail",
        started.elapsed()
    );
    held.send("during the cut");
    assert!(held.receive().is_err(), "an established connection to host 0 still carried traffic");
    let started = Instant::now();
    assert!(echo_from(&net, 1, server_addr).is_err(), "host 1 reached host 0 through a cut link");
    assert!(started.elapsed() < Duration::from_secs(5), "host 1 took {:?} to give up", started.elapsed());
    assert!(echo_from(&net, 0, root_addr).is_err(), "host 0 reached the test through a cut link");
    assert!(server.exited().is_none(), "the echo server died\n{}", log(&server));

    // Heal: everything is reachable again, and the stalled connection resumes (TCP
    // retransmits what it sent during the cut).
    net.heal(0);
    wait_for(Duration::from_secs(5), || echo(server_addr, "healed").ok())
        .expect("host 0 is reachable after heal");
    echo_from(&net, 1, server_addr).expect("host 1 reaches host 0 after heal");
    echo_from(&net, 0, root_addr).expect("host 0 reaches the test after heal");
    held.stream.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    assert_eq!(held.receive().expect("the stalled connection resumes"), "during the cut");

    // Drop deletes the namespaces, the veths and the subnet claims.
    let links = [net.ns_name(0).replace('h', "r"), net.ns_name(1).replace('h', "r")];
    let subnets: Vec<String> = (0..2).map(|h| subnet_of(net.addr(h))).collect();
    assert!(ip_out(&["route", "show", "table", "all"]).contains(&subnets[0]), "no route to host 0's subnet");
    drop(held);
    drop(server);
    drop(net);
    let listed = netns_list();
    assert!(names.iter().all(|n| !listed.contains(n)), "{names:?} still in `ip netns list`: {listed}");
    let all_links = ip_out(&["-o", "link", "show"]);
    assert!(
        links.iter().all(|l| !all_links.contains(&format!(" {l}@"))),
        "veths {links:?} left: {all_links}"
    );
    let routes = ip_out(&["route", "show", "table", "all"]);
    assert!(subnets.iter().all(|s| !routes.contains(s)), "routes to {subnets:?} left: {routes}");
}

/// Echoes every line of every connection, one thread per connection.
fn serve_echo(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut out = conn.try_clone().expect("clone a connection");
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                if writeln!(out, "{line}").is_err() {
                    return;
                }
            }
        });
    }
}

/// Connects to `addr`, sends `line` and waits for it to come back, within [`ECHO_TIMEOUT`]
/// for each step.
fn echo(addr: SocketAddr, line: &str) -> Result<(), String> {
    let stream = TcpStream::connect_timeout(&addr, ECHO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let mut held = Held::new(stream);
    held.echo(line)
}

/// Runs an echo client on `host` against `addr`; Ok if it got its line back.
fn echo_from(net: &Network, host: usize, addr: SocketAddr) -> Result<(), String> {
    let mut cmd = net.command(host, std::env::current_exe().expect("test binary"));
    helper_args(&mut cmd, "echo", addr);
    let out = cmd.output().map_err(|e| format!("run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "echo from host {host} to {addr}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Makes `cmd` (this test binary) run [`helper_process`] as `role` against `addr`.
fn helper_args(cmd: &mut Command, role: &str, addr: SocketAddr) {
    cmd.args(["--exact", "helper_process", "--nocapture", "--test-threads=1"])
        .env("NETNS_TEST_ROLE", role)
        .env("NETNS_TEST_ADDR", addr.to_string());
}

/// A connection held open across a cut.
struct Held {
    stream: TcpStream,
    lines: BufReader<TcpStream>,
}

impl Held {
    fn connect(addr: SocketAddr) -> Held {
        Held::new(TcpStream::connect_timeout(&addr, ECHO_TIMEOUT).expect("connect"))
    }

    fn new(stream: TcpStream) -> Held {
        stream.set_read_timeout(Some(ECHO_TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(ECHO_TIMEOUT)).expect("write timeout");
        let lines = BufReader::new(stream.try_clone().expect("clone a connection"));
        Held { stream, lines }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stream, "{line}").expect("send a line (it goes into the socket buffer)");
    }

    fn receive(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("receive: {e}")),
        }
    }

    fn echo(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stream, "{line}").map_err(|e| format!("send: {e}"))?;
        let back = self.receive()?;
        if back == line {
            Ok(())
        } else {
            Err(format!("sent {line:?}, got {back:?} back"))
        }
    }
}

/// `ip netns list`.
fn netns_list() -> String {
    ip_out(&["netns", "list"])
}

/// What `ip ARGS` prints.
fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The /30 holding `addr`, as `ip route` prints it.
fn subnet_of(addr: std::net::Ipv4Addr) -> String {
    format!("{}/30", std::net::Ipv4Addr::from(u32::from(addr) & !3))
}

/// A process's log, for failure messages.
fn log(p: &Proc) -> String {
    std::fs::read_to_string(p.log()).unwrap_or_default()
}
