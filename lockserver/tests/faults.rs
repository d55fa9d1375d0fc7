//! The lock service under faults, with real processes: mutual exclusion while leaders are
//! SIGKILLed and connections cut; a SIGKILLed clerk's locks freed only after a live clerk
//! recovered its log; a lease lost through a partition reported before the locks move.
//! The tests run one at a time (they share two cores with their servers).

mod common;

use common::{check_holds, connect, monotonic_ns, read_holds, Call, Hold, Options, Proc, Recorder, Servers};
use lockserver::{Clerk, ClerkError, Mode, SessionId, Slot};
use raft::NodeId;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Clerks in three processes contend on three locks in random modes for 14 s, while the
/// leader is SIGKILLed twice (and restarted) and connections between everyone are cut at
/// random. Merged by fencing token, the histories show no two conflicting holders at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_under_leader_kills_and_cut_connections() {
    let _serial = SERIAL.lock().await;
    // Small snapshots, so restarted nodes catch up from one (and the log is compacted).
    let extra_args = vec!["--snapshot-entries".to_string(), "300".to_string()];
    let mut servers =
        Servers::start(Options { proxied: true, lease_ms: 3000, extra_args, ..Options::default() }).await;
    servers.leader().await;
    let logs_dir = tempfile::tempdir().unwrap();
    let mut clerks = Vec::new();
    let mut logs = Vec::new();
    for p in 0..3 {
        let log = logs_dir.path().join(format!("clerk{p}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_lock-stress"))
            .args(["contend", "--cluster", &servers.cluster_arg(), "--locks", "3", "--tasks", "4"])
            .args(["--duration-ms", "14000", "--seed", &p.to_string()])
            .arg("--log")
            .arg(&log)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs_dir.path().join(format!("clerk{p}.err"))).unwrap())
            .spawn()
            .unwrap();
        clerks.push(Proc(child));
        logs.push(log);
    }
    // Cut a random connection through some node's proxy every 200 ms.
    let proxies: Vec<_> = servers.proxies.values().cloned().collect();
    let chaos = tokio::spawn(async move {
        let mut cuts = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            proxies[cuts as usize % proxies.len()].cut_one();
            cuts += 1;
        }
    });
    let mut kills = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (leader, _) = servers.leader().await;
        servers.kill(leader);
        kills.push((leader, monotonic_ns()));
        eprintln!("killed leader {leader}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        servers.start_node(leader);
    }
    // Wait for every clerk process to finish its run.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut outputs = Vec::new();
    for (p, clerk) in clerks.iter_mut().enumerate() {
        let status = loop {
            if let Some(status) = clerk.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "clerk {p} did not finish\n{}", servers.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut out = String::new();
        std::io::Read::read_to_string(clerk.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        let err = std::fs::read_to_string(logs_dir.path().join(format!("clerk{p}.err"))).unwrap_or_default();
        assert!(status.success(), "clerk {p} failed: {status}\n{out}\n{err}");
        outputs.push(out.trim().to_string());
    }
    chaos.abort();
    let holds = read_holds(&logs);
    let violations = check_holds(&holds);
    assert!(
        violations.is_empty(),
        "{} violations, first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let exclusive = holds.iter().filter(|h| h.mode == 'X').count();
    let after_last_kill = holds.iter().filter(|h| h.start_ns > kills[1].1).count();
    let tokens: std::collections::BTreeSet<u64> = holds.iter().map(|h| h.token).collect();
    eprintln!(
        "{} holds ({exclusive} exclusive) under {} grants, {after_last_kill} after the last leader kill; clerks: {outputs:?}",
        holds.len(),
        tokens.len()
    );
    assert!(holds.len() > 300, "too little progress: {} holds", holds.len());
    assert!(tokens.len() > 50, "too few grants moved between clerks: {}", tokens.len());
    assert!(after_last_kill > 50, "too little progress after the last leader kill: {after_last_kill}");
    assert!(servers.errors().is_empty(), "server errors: {:?}", servers.errors());
}

/// The checker itself finds a planted overlap, in time and in token order.
#[test]
fn checker_finds_conflicting_holders() {
    let hold = |process, mode, token, start_ns, end_ns| Hold {
        process,
        lock: "l".into(),
        mode,
        token,
        start_ns,
        end_ns,
    };
    assert!(check_holds(&[hold(0, 'S', 1, 0, 10), hold(1, 'S', 2, 5, 15)]).is_empty(), "readers share");
    assert!(check_holds(&[hold(0, 'X', 1, 0, 10), hold(1, 'X', 2, 10, 15)]).is_empty(), "back to back");
    assert!(!check_holds(&[hold(0, 'X', 1, 0, 10), hold(1, 'S', 2, 9, 15)]).is_empty(), "overlap in time");
    assert!(!check_holds(&[hold(0, 'S', 1, 0, 10), hold(0, 'X', 1, 5, 6)]).is_empty(), "local overlap");
    // Token order contradicting time order.
    assert!(!check_holds(&[hold(0, 'X', 2, 0, 10), hold(1, 'S', 1, 20, 30)]).is_empty());
}

/// Reads `holding session=N slot=M` from a `lock-stress hold` process.
fn read_holding(child: &mut std::process::Child) -> (SessionId, Slot) {
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .parse()
            .unwrap()
    };
    (SessionId(field("session=")), Slot(field("slot=") as u8))
}

/// A process holding locks is SIGKILLed. After its lease expires a live clerk is asked
/// to recover its log slot; its locks stay held (and `lockserver status` shows the
/// pending recovery) until that clerk reports done, and only then are they granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_holder_then_its_locks_are_freed_only_after_recovery() {
    let _serial = SERIAL.lock().await;
    let lease = Duration::from_millis(2000);
    let servers = Servers::start(Options { lease_ms: lease.as_millis() as u64, ..Options::default() }).await;
    servers.leader().await;
    let mut holder = Proc(
        Command::new(env!("CARGO_BIN_EXE_lock-stress"))
            .args(["hold", "--cluster", &servers.cluster_arg(), "inode/1:X", "inode/2:S"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (dead, dead_slot) = tokio::task::block_in_place(|| read_holding(&mut holder.0));
    let rec = Recorder::new();
    rec.recover_ms.store(1500, Relaxed);
    let b = Arc::new(connect(&servers, "b", rec.clone()).await);
    assert_ne!(b.slot(), dead_slot);

    drop(holder); // SIGKILL
    let killed_at = Instant::now();
    let b2 = b.clone();
    let wants_x = tokio::spawn(async move {
        let g = b2.lock("inode/1", Mode::Exclusive).await.expect("granted after recovery");
        (Instant::now(), g.token())
    });

    let recover_start = rec.wait_for(&Call::RecoverStart(dead_slot, dead), Duration::from_secs(15)).await;
    let waited = recover_start - killed_at;
    assert!(waited >= lease / 2, "recovery asked {waited:?} after the kill, before the lease could expire");
    // While B recovers, the dead session keeps its locks.
    let status = Command::new(env!("CARGO_BIN_EXE_lockserver"))
        .args(["status", "--cluster", &servers.cluster_arg()])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    eprintln!("{status}");
    for expected in [
        "EXPIRED".to_string(),
        "holds inode/1 X".to_string(),
        "holds inode/2 S".to_string(),
        format!("recovery of slot {} (dead session {}): by session {}", dead_slot.0, dead.0, b.session().0),
        "waits inode/1 X".to_string(),
    ] {
        assert!(status.contains(&expected), "status lacks {expected:?}:\n{status}");
    }
    assert!(!wants_x.is_finished(), "granted while the dead client's log was being recovered");
    let recover_end = rec.wait_for(&Call::RecoverEnd(dead_slot, dead), Duration::from_secs(10)).await;
    let (granted_at, _) =
        tokio::time::timeout(Duration::from_secs(10), wants_x).await.expect("granted").unwrap();
    assert!(granted_at > recover_end, "granted before recovery was done");
    eprintln!(
        "recovery asked {waited:?} after the kill; granted {:?} after recovery ended",
        granted_at - recover_end
    );
    // The slot is free again, and so is the dead client's shared lock.
    let g = tokio::time::timeout(Duration::from_secs(5), b.lock("inode/2", Mode::Exclusive))
        .await
        .unwrap()
        .unwrap();
    drop(g);
    assert!(servers.errors().is_empty(), "server errors: {:?}", servers.errors());
}

/// A clerk cut off from the service reports its lease lost to its user before the service
/// can give its locks to another clerk (which first recovers its log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lost_through_a_partition_is_reported_before_the_locks_move() {
    let _serial = SERIAL.lock().await;
    let lease = Duration::from_millis(2000);
    let servers = Servers::start(Options { lease_ms: lease.as_millis() as u64, ..Options::default() }).await;
    servers.leader().await;
    // A reaches the servers through proxies that the test can cut.
    let mut proxies = Vec::new();
    let mut a_cluster = std::collections::BTreeMap::new();
    for (id, addr) in servers.cluster() {
        let p = common::Proxy::start(addr).await;
        a_cluster.insert(id, p.addr.clone());
        proxies.push(p);
    }
    let rec_a = Recorder::new();
    let mut cfg = servers.clerk_config("a");
    cfg.cluster = a_cluster;
    let a = Clerk::connect(cfg, rec_a.clone()).await.unwrap();
    let a_token = a.lock("file", Mode::Exclusive).await.unwrap().token();
    let rec_b = Recorder::new();
    let b = Arc::new(connect(&servers, "b", rec_b.clone()).await);

    for p in &proxies {
        p.set_down(true);
        p.cut();
    }
    let partitioned_at = Instant::now();
    let b2 = b.clone();
    let wants = tokio::spawn(async move {
        let g = b2.lock("file", Mode::Exclusive).await.expect("granted");
        (Instant::now(), g.token())
    });
    let lost_at = rec_a.wait_for(&Call::LeaseLost, Duration::from_secs(10)).await;
    let recover_at =
        rec_b.wait_for(&Call::RecoverStart(a.slot(), a.session()), Duration::from_secs(15)).await;
    let (granted_at, b_token) = tokio::time::timeout(Duration::from_secs(10), wants).await.unwrap().unwrap();
    eprintln!(
        "partition -> lease lost {:?} -> recovery asked {:?} -> granted {:?}",
        lost_at - partitioned_at,
        recover_at - lost_at,
        granted_at - recover_at
    );
    assert!(lost_at - partitioned_at < lease, "the clerk noticed too late");
    assert!(lost_at < recover_at, "the service expired the session before the clerk knew");
    assert!(recover_at < granted_at);
    assert!(b_token > a_token, "fencing tokens only grow");
    assert!(a.is_lost() && a.lease_expiry().is_none());
    assert_eq!(a.lock("file", Mode::Shared).await.err(), Some(ClerkError::LeaseLost));
    assert!(servers.errors().is_empty(), "server errors: {:?}", servers.errors());
    let _ = NodeId(0);
}
