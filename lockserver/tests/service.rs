//! The lock service end to end with real server processes and in-process clerks: the
//! revoke path (callback before release; downgrade keeps a shared copy), sticky locks,
//! upgrades, failover to a new leader, bounds, fencing tokens and lease expiry.

mod common;

use common::{connect, Call, Options, Recorder, Servers};
use lockserver::{ClerkError, Mode};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result in 15 s"))
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A holds a lock idle; B asks for it; A's revoke callback runs (and finishes) before A
/// releases, and then B is granted. Asked only to share, A downgrades and keeps a shared
/// copy that it takes again without asking the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_calls_back_before_release_and_downgrade_keeps_a_shared_copy() {
    let _serial = SERIAL.lock().await;
    let servers = Servers::start(Options::default()).await;
    let rec_a = Recorder::new();
    rec_a.revoke_ms.store(300, Relaxed);
    let a = connect(&servers, "a", rec_a.clone()).await;
    let b = connect(&servers, "b", Recorder::new()).await;

    let a_token = a.lock("inode/7", Mode::Exclusive).await.unwrap().token();
    assert_eq!(
        a.cached("inode/7"),
        Some((Mode::Exclusive, a_token)),
        "sticky: cached after the guard is gone"
    );
    let g = within("B's exclusive grant", b.lock("inode/7", Mode::Exclusive)).await.unwrap();
    let granted_at = Instant::now();
    let start = rec_a.when(&Call::RevokeStart("inode/7".into(), Mode::Exclusive)).expect("A was called back");
    let end = rec_a.when(&Call::RevokeEnd("inode/7".into(), Mode::Exclusive)).unwrap();
    assert!(start < end && end < granted_at, "callback ran, then A released, then B was granted");
    assert!(g.token() > a_token);
    // (A learns its release went through when the reply comes, maybe after B's grant;
    // meanwhile it hands the lock to no local user.)
    eventually("A's cache drops the lock", || a.cached("inode/7").is_none()).await;
    drop(g);

    // Shared wanted: A downgrades.
    let x = a.lock("inode/8", Mode::Exclusive).await.unwrap().token();
    let b_shared = within("B's shared grant", b.lock("inode/8", Mode::Shared)).await.unwrap();
    assert!(rec_a.when(&Call::RevokeEnd("inode/8".into(), Mode::Shared)).is_some());
    eventually("A keeps a shared copy", || a.cached("inode/8") == Some((Mode::Shared, x))).await;
    let a_shared = within("A's cached shared copy", a.lock("inode/8", Mode::Shared)).await.unwrap();
    assert_eq!(a_shared.token(), x, "taken from the cache");
    drop((a_shared, b_shared));
    assert!(servers.errors().is_empty(), "server errors: {:?}", servers.errors());
}

/// A cached lock is taken again with no RPC: even with every server gone, within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_lock_is_taken_again_without_the_service() {
    let _serial = SERIAL.lock().await;
    let mut servers = Servers::start(Options { lease_ms: 5000, ..Options::default() }).await;
    let rec = Recorder::new();
    let a = connect(&servers, "a", rec.clone()).await;
    let token = a.lock("dir/1", Mode::Exclusive).await.unwrap().token();
    for id in servers.public.keys().copied().collect::<Vec<_>>() {
        servers.kill(id);
    }
    let start = Instant::now();
    for _ in 0..10_000 {
        let g = a.lock("dir/1", Mode::Exclusive).await.unwrap();
        assert_eq!(g.token(), token);
    }
    let rate = 10_000.0 / start.elapsed().as_secs_f64();
    eprintln!("{rate:.0} cached acquire+release per second with no server up");
    // Without the service the lease runs out, and the user hears of it.
    rec.wait_for(&Call::LeaseLost, Duration::from_secs(10)).await;
    assert_eq!(a.lock("dir/1", Mode::Shared).await.err(), Some(ClerkError::LeaseLost));
}

/// Shared to exclusive in place; fencing tokens grow with every grant; the lease expiry
/// is exposed for Petal's fencing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_fencing_tokens_and_lease_expiry() {
    let _serial = SERIAL.lock().await;
    let servers = Servers::start(Options::default()).await;
    let a = connect(&servers, "a", Recorder::new()).await;
    let s = a.lock("bitmap/3", Mode::Shared).await.unwrap().token();
    let x = a.lock("bitmap/3", Mode::Exclusive).await.unwrap().token();
    assert!(x > s, "the upgrade is a new grant");
    let other = a.lock("bitmap/4", Mode::Shared).await.unwrap().token();
    assert!(other > x, "tokens grow across locks");
    // The blocking call, from a thread outside the runtime (as FUSE's are), hits the cache.
    let a = Arc::new(a);
    let a2 = a.clone();
    let thread = std::thread::spawn(move || a2.lock_blocking("bitmap/4", Mode::Shared).map(|g| g.token()));
    let blocking = tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap().unwrap();
    assert_eq!(blocking, other);
    let expiry = a.lease_expiry().unwrap();
    let now = SystemTime::now();
    assert!(expiry > now && expiry <= now + a.lease(), "expiry {expiry:?} is within one lease from now");
    // The lease keeps being renewed.
    tokio::time::sleep(a.lease() * 2).await;
    assert!(a.lease_expiry().unwrap() > SystemTime::now());
}

/// The leader dies while A holds a lock idle: both clerks find the new leader, A is asked
/// to give the lock up there, and B gets it; no lease is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerks_follow_a_new_leader() {
    let _serial = SERIAL.lock().await;
    let mut servers = Servers::start(Options { lease_ms: 4000, ..Options::default() }).await;
    let rec_a = Recorder::new();
    let rec_b = Recorder::new();
    let a = connect(&servers, "a", rec_a.clone()).await;
    let b = Arc::new(connect(&servers, "b", rec_b.clone()).await);
    let a_token = a.lock("inode/1", Mode::Exclusive).await.unwrap().token();
    let (leader, _) = servers.leader().await;
    servers.kill(leader);
    let g = within("B's grant under the new leader", b.lock("inode/1", Mode::Exclusive)).await.unwrap();
    assert!(g.token() > a_token);
    assert!(rec_a.when(&Call::RevokeEnd("inode/1".into(), Mode::Exclusive)).is_some());
    let (new_leader, _) = servers.leader().await;
    assert_ne!(new_leader, leader);
    assert!(rec_a.when(&Call::LeaseLost).is_none() && rec_b.when(&Call::LeaseLost).is_none());
    drop(g);
    // And back again, through the new leader's event stream.
    drop(within("A's grant back", a.lock("inode/1", Mode::Exclusive)).await.unwrap());
}

/// Bounds on locks and waiters per session come back as clear errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_are_clear_errors() {
    let _serial = SERIAL.lock().await;
    let extra_args =
        ["--locks-per-session-max", "3", "--waiters-per-session-max", "1"].map(String::from).to_vec();
    let servers = Servers::start(Options { extra_args, ..Options::default() }).await;
    let a = Arc::new(connect(&servers, "a", Recorder::new()).await);
    let b = connect(&servers, "b", Recorder::new()).await;
    let _held: Vec<_> =
        vec![b.lock("w1", Mode::Exclusive).await.unwrap(), b.lock("w2", Mode::Exclusive).await.unwrap()];
    // A waits for w1 (one waiter allowed); a second wait is refused.
    let a2 = a.clone();
    let waiting = tokio::spawn(async move { a2.lock("w1", Mode::Shared).await.map(|g| g.token()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    match within("second wait", a.lock("w2", Mode::Shared)).await {
        Err(ClerkError::Limit(msg)) => assert!(msg.contains("waits for 1 locks"), "{msg}"),
        other => panic!("expected a limit error, got {:?}", other.map(|g| g.token())),
    }
    // Three locks held or waited for at most.
    let _x = a.lock("x", Mode::Shared).await.unwrap();
    let _y = a.lock("y", Mode::Shared).await.unwrap();
    match within("fourth lock", a.lock("z", Mode::Shared)).await {
        Err(ClerkError::Limit(msg)) => assert!(msg.contains("3 locks"), "{msg}"),
        other => panic!("expected a limit error, got {:?}", other.map(|g| g.token())),
    }
    match within("bad name", a.lock("", Mode::Shared)).await {
        Err(ClerkError::Refused(msg)) => assert!(msg.contains("bad lock name"), "{msg}"),
        other => panic!("expected a refusal, got {:?}", other.map(|g| g.token())),
    }
    waiting.abort();
}

/// Every server is killed and restarted: sessions and locks come back from the log and
/// snapshots, the new leader gives every lease a fresh period, and the clerks carry on
/// with their cached locks, without losing their leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_locks_survive_a_restart_of_every_server() {
    let _serial = SERIAL.lock().await;
    let extra_args = vec!["--snapshot-entries".to_string(), "5".to_string()];
    let mut servers = Servers::start(Options { lease_ms: 6000, extra_args, ..Options::default() }).await;
    let rec_a = Recorder::new();
    let rec_b = Recorder::new();
    let a = connect(&servers, "a", rec_a.clone()).await;
    let b = connect(&servers, "b", rec_b.clone()).await;
    let a_token = a.lock("inode/9", Mode::Exclusive).await.unwrap().token();
    // Enough ticks and keepalives for a few snapshots.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids: Vec<_> = servers.public.keys().copied().collect();
    // (raft keeps its latest snapshot in DATA/snapshot.)
    let snapshots =
        ids.iter().filter(|id| servers.dir.path().join(format!("node{}/snapshot", id.0)).exists());
    assert!(snapshots.count() > 0, "no snapshot was taken");
    for id in &ids {
        servers.kill(*id);
    }
    for id in &ids {
        servers.start_node(*id);
    }
    let g = within("B's grant after the restart", b.lock("inode/9", Mode::Exclusive)).await.unwrap();
    assert!(g.token() > a_token, "tokens keep growing across the restart");
    assert!(rec_a.when(&Call::RevokeEnd("inode/9".into(), Mode::Exclusive)).is_some(), "A kept its lock");
    let (_, status) = servers.leader().await;
    assert_eq!(status.sessions.len(), 2, "both sessions restored: {status:?}");
    assert!(rec_a.when(&Call::LeaseLost).is_none() && rec_b.when(&Call::LeaseLost).is_none());
    assert!(servers.errors().is_empty(), "server errors: {:?}", servers.errors());
}

/// Past its bound the clerk gives back the least recently used idle locks, and the user
/// can give one back at will; both after the revoke callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_bound_and_explicit_release_give_locks_back() {
    let _serial = SERIAL.lock().await;
    let servers = Servers::start(Options::default()).await;
    let rec = Recorder::new();
    let mut cfg = servers.clerk_config("a");
    cfg.cached_locks_max = 2;
    let a = lockserver::Clerk::connect(cfg, rec.clone()).await.unwrap();
    for name in ["l1", "l2", "l3"] {
        drop(a.lock(name, Mode::Exclusive).await.unwrap());
    }
    rec.wait_for(&Call::RevokeEnd("l1".into(), Mode::Exclusive), Duration::from_secs(10)).await;
    eventually("l1 evicted", || a.cached("l1").is_none() && a.cached_count() == 2).await;
    a.release("l2").await.unwrap();
    assert_eq!(a.cached("l2"), None);
    assert!(rec.when(&Call::RevokeEnd("l2".into(), Mode::Exclusive)).is_some());
    let (_, status) = servers.leader().await;
    let holds: Vec<&str> = status.sessions[0].holds.iter().map(|h| h.lock.as_str()).collect();
    assert_eq!(holds, vec!["l3"]);
}
