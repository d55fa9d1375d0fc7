//! Three `petal serve` replicas as real processes on 127.0.0.1 with real fsync: SIGKILL
//! under write load, two down at once, snapshots, fencing, flipped bytes and a lost block
//! file. Every process a test starts is killed by its pid when the test ends, pass or fail.

use cluster_tests::process::{log_files, log_tails};
use cluster_tests::servers::Group as Servers;
use cluster_tests::tmpfs::Tmpfs;
use petal::{ClientConfig, PetalClient, PetalError};
use raft::NodeId;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The replicas: a group of `petal serve` processes (each killed by its pid when
/// dropped), with their data and logs in a temporary directory.
struct Group {
    servers: Servers,
    dir: tempfile::TempDir,
}

const DEADLINE: Duration = Duration::from_secs(30);

impl Group {
    /// A group of `n` replicas, none started yet.
    fn new(n: u64, snapshot_entries: u64) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let extra =
            vec!["--tick-ms".into(), "50".into(), "--snapshot-entries".into(), snapshot_entries.to_string()];
        let program = PathBuf::from(env!("CARGO_BIN_EXE_petal"));
        Group { servers: Servers::new(program, "replica", n, extra, dir.path()), dir }
    }

    fn start(n: u64, snapshot_entries: u64) -> Group {
        let mut g = Group::new(n, snapshot_entries);
        g.servers.start_all();
        g
    }

    fn peers(&self) -> BTreeMap<NodeId, String> {
        self.servers.addrs.iter().map(|(id, a)| (NodeId(*id), a.clone())).collect()
    }

    /// The replicas running.
    fn live(&self) -> Vec<NodeId> {
        self.servers.ids().into_iter().filter(|id| self.servers.running(*id)).map(NodeId).collect()
    }

    fn data_dir(&self, id: NodeId) -> PathBuf {
        self.servers.data_dir(id.0)
    }

    fn blocks_file(&self, id: NodeId) -> PathBuf {
        self.data_dir(id).join("store").join("blocks")
    }

    fn start_replica(&mut self, id: NodeId) {
        self.servers.start(id.0);
    }

    fn kill(&mut self, id: NodeId) {
        self.servers.kill(id.0);
    }

    fn client(&self) -> PetalClient {
        let mut cfg = ClientConfig::new(self.peers());
        cfg.deadline = DEADLINE;
        PetalClient::new(cfg).unwrap()
    }

    async fn statuses(&self) -> BTreeMap<NodeId, petal::proto::StatusReply> {
        self.client().status().await.into_iter().filter_map(|(id, s)| Some((id, s.ok()?))).collect()
    }

    async fn wait_leader(&self) -> NodeId {
        let start = Instant::now();
        loop {
            if let Some((id, _)) = self.statuses().await.into_iter().find(|(_, s)| s.role == "Leader") {
                return id;
            }
            assert!(start.elapsed() < DEADLINE, "no leader\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live replica has applied the leader's commit index.
    async fn wait_caught_up(&self) -> u64 {
        let start = Instant::now();
        loop {
            let s = self.statuses().await;
            let live = self.live().len();
            let commit = s.values().find(|s| s.role == "Leader").map(|s| s.commit);
            if let Some(commit) = commit {
                if s.len() == live && s.values().all(|s| s.applied == commit) {
                    return commit;
                }
            }
            assert!(start.elapsed() < DEADLINE, "replicas did not catch up: {s:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every live replica's digest, once all have applied the same index.
    async fn digests(&self) -> BTreeMap<NodeId, (u64, Vec<petal::proto::DiskDigest>)> {
        let client = self.client();
        let start = Instant::now();
        loop {
            self.wait_caught_up().await;
            let mut out = BTreeMap::new();
            for id in self.live() {
                if let Ok(d) = client.digest(id).await {
                    out.insert(id, (d.applied, d.disks));
                }
            }
            let live = self.live().len();
            let indexes: Vec<u64> = out.values().map(|(a, _)| *a).collect();
            if out.len() == live && indexes.windows(2).all(|w| w[0] == w[1]) {
                return out;
            }
            assert!(start.elapsed() < DEADLINE, "no consistent digests: {out:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        log_tails(self.dir.path(), 15)
    }

    /// Everything every replica logged.
    fn log_text(&self) -> String {
        log_files(self.dir.path()).iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8 + 1).collect()
}

/// Acknowledged writes: (offset, bytes).
type Acked = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Writers that each write unaligned ranges of their own region until stopped, recording
/// what was acknowledged. A write that fails fails the test.
fn start_writers(
    client: &PetalClient,
    n: u64,
    stop: &Arc<AtomicBool>,
) -> (Acked, Vec<tokio::task::JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..n {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                let offset = (w << 40) + i * 70_000 + (i % 7) * 513;
                let data = pattern(w * 1_000_000 + i, 1000 + (i as usize * 4099) % 60_000);
                client
                    .write("vol", offset, &data, None)
                    .await
                    .unwrap_or_else(|e| panic!("write {w}/{i}: {e}"));
                acked.lock().unwrap().push((offset, data));
                i += 1;
            }
        }));
    }
    (acked, tasks)
}

// Kill one replica (the leader) under write load: no client error; every acknowledged
// write reads back; the replica restarts, catches up (by a snapshot manifest and extents
// fetched from a peer, since the log was compacted meanwhile) and its contents then match
// the others byte for byte. Then two down: writes wait, and resume when one returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_under_load_then_two() {
    let mut g = Group::start(3, 200);
    g.wait_leader().await;
    let client = g.client();
    client.create("vol").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, writers) = start_writers(&client, 4, &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 20, "only {before} writes in 2 s\n{}", g.logs());

    let victim = g.wait_leader().await;
    g.kill(victim);
    let killed_at = Instant::now();
    while acked.lock().unwrap().len() < before + 300 {
        assert!(killed_at.elapsed() < DEADLINE, "writes did not resume\n{}", g.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} writes acknowledged while {victim} was down", acked.lock().unwrap().len() - before);
    g.start_replica(victim);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for (offset, data) in &acked {
        assert_eq!(
            &client.read("vol", *offset, data.len() as u64).await.unwrap(),
            data,
            "lost write at {offset}"
        );
    }
    let digests = g.digests().await;
    let first = digests.values().next().unwrap().clone();
    assert!(digests.values().all(|d| *d == first), "replicas differ: {digests:?}");
    let logs = g.log_text();
    assert!(logs.contains("installed a snapshot from peers"), "no snapshot install\n{}", g.logs());
    let fuzzy = logs.matches("fetching current contents").count();
    eprintln!(
        "snapshot installed; {fuzzy} extent batches fetched fuzzy (the rest exactly as of the manifest)"
    );
    eprintln!("{} acknowledged writes read back; 3 replicas identical at index {}", acked.len(), first.0);

    // Two of three down: a write waits (no wrong answer), and completes once one is back.
    let leader = g.wait_leader().await;
    let others: Vec<NodeId> = g.peers().into_keys().filter(|id| *id != leader).collect();
    g.kill(others[0]);
    g.kill(leader);
    let writer = {
        let client = client.clone();
        tokio::spawn(async move { client.write("vol", 5, b"after the outage", None).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "a write finished with two of three replicas down");
    g.start_replica(leader);
    writer.await.unwrap().unwrap();
    assert_eq!(client.read("vol", 5, 16).await.unwrap(), b"after the outage");
}

// Copy-on-write snapshots, fencing, and bad input, on one group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_fencing_and_bad_input() {
    let g = Group::start(3, 2000);
    let client = g.client();
    client.create("vol").await.unwrap();

    // Snapshot: write, snapshot, overwrite; the snapshot reads the old bytes.
    let old = pattern(1, 200_000);
    client.write("vol", 60_000, &old, None).await.unwrap();
    client.snapshot("vol", "vol@1").await.unwrap();
    let new = pattern(2, 70_000);
    client.write("vol", 100_000, &new, None).await.unwrap();
    client.decommit("vol", 200_000, 30_000, None).await.unwrap();
    assert_eq!(client.read("vol@1", 60_000, 200_000).await.unwrap(), old);
    let mut expect = old.clone();
    expect[40_000..110_000].copy_from_slice(&new);
    expect[140_000..170_000].fill(0);
    assert_eq!(client.read("vol", 60_000, 200_000).await.unwrap(), expect);
    let info = client.stat("vol@1").await.unwrap();
    assert!(info.read_only && info.origin == "vol", "{info:?}");
    assert!(matches!(client.write("vol@1", 0, b"x", None).await, Err(PetalError::ReadOnly(_))));
    assert_eq!(client.list().await.unwrap().len(), 2);

    // Fencing: an expired lease, or one inside the margin, is refused and never visible;
    // a live lease writes.
    let now = petal::unix_ms();
    for expiry in [now - 10_000, now + 500] {
        let e = client.write("vol", 0, b"fenced!", Some(expiry)).await.unwrap_err();
        assert!(matches!(e, PetalError::Fenced { .. }), "{e}");
    }
    assert_eq!(client.read("vol", 0, 7).await.unwrap(), vec![0; 7]);
    client.write("vol", 0, b"leased", Some(now + 60_000)).await.unwrap();
    assert_eq!(client.read("vol", 0, 6).await.unwrap(), b"leased");
    let fenced: u64 = g.statuses().await.values().map(|s| s.fenced_writes).sum();
    assert!(fenced >= 2, "fenced writes not counted");

    // Bad input: a clear error each, and the group serves on.
    let e = client.write("vol", u64::MAX - 2, b"four", None).await.unwrap_err();
    assert!(matches!(e, PetalError::OutOfRange(_)), "{e}");
    let e = client.read("vol", 0, 4 << 20).await.unwrap_err();
    assert!(matches!(e, PetalError::TooLarge { .. }), "{e}");
    for len in [(1 << 20) + 1, 3 << 20] {
        let e = client.write("vol", 0, &vec![7; len], None).await.unwrap_err();
        assert!(matches!(e, PetalError::TooLarge { .. }), "{len}: {e}");
    }
    let e = client.write("nope", 0, b"x", None).await.unwrap_err();
    assert!(matches!(e, PetalError::NotFound(_)), "{e}");
    let e = client.read("nope", 0, 1).await.unwrap_err();
    assert!(matches!(e, PetalError::NotFound(_)), "{e}");
    let e = client.create("vol").await.unwrap_err();
    assert!(matches!(e, PetalError::Exists(_)), "{e}");
    client.write("vol", u64::MAX - 3, b"last", None).await.unwrap();
    assert_eq!(client.read("vol", u64::MAX - 3, 4).await.unwrap(), b"last");
    // The blocking client, from a thread outside tokio (as FUSE's are).
    let peers = g.peers();
    std::thread::spawn(move || {
        let blocking = petal::BlockingClient::new(ClientConfig::new(peers)).unwrap();
        blocking.write("vol", 1 << 50, b"from a thread", None).unwrap();
        assert_eq!(blocking.read("vol", 1 << 50, 13).unwrap(), b"from a thread");
        assert!(blocking.list().unwrap().iter().any(|d| d.name == "vol@1"));
    })
    .join()
    .unwrap();

    client.delete("vol@1").await.unwrap();
    assert!(matches!(client.stat("vol@1").await, Err(PetalError::NotFound(_))));
    assert_eq!(client.read("vol", 60_000 + 40_000, 70_000).await.unwrap(), new);
}

// Flipped bytes in the leader's block file: the read is served from a healthy replica,
// the error is reported (log and status), and the bad block is rewritten from a peer.
// A follower that lost its block file altogether is repaired the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_missing_blocks_are_served_elsewhere_and_repaired() {
    // Small snapshots, so that the store's maps are persisted after a few writes.
    let mut g = Group::start(3, 10);
    let client = g.client();
    client.create("vol").await.unwrap();
    let data = pattern(3, 3 * 65536);
    for (i, chunk) in data.chunks(8192).enumerate() {
        client.write("vol", i as u64 * 8192, chunk, None).await.unwrap();
    }
    g.wait_caught_up().await;

    let leader = g.wait_leader().await;
    let path = g.blocks_file(leader);
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    for b in &mut bad[5000..5010] {
        *b ^= 0xff;
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&bad[5000..5010], 5000).unwrap();
    }
    // Served right, from a healthy copy.
    assert_eq!(client.read("vol", 0, data.len() as u64).await.unwrap(), data);
    let start = Instant::now();
    loop {
        let s = &g.statuses().await[&leader];
        if s.corrupt_blocks >= 1 && s.repaired_blocks >= 1 && s.damaged_blocks == 0 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "not repaired: {s:?}\n{}", g.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read(&path).unwrap(), good, "the block was not rewritten");
    assert!(g.log_text().contains("corrupt block"), "corruption not logged");

    // A follower loses its block file: at restart every block it held is damaged, and the
    // peers' copies repair them.
    let follower = g.peers().into_keys().find(|id| *id != leader).unwrap();
    assert!(g.statuses().await[&follower].persisted_index > 10);
    g.kill(follower);
    std::fs::remove_file(g.blocks_file(follower)).unwrap();
    g.start_replica(follower);
    let digests = g.digests().await;
    let first = digests.values().next().unwrap().clone();
    assert!(digests.values().all(|d| *d == first), "replicas differ: {digests:?}");
    assert_eq!(digests.len(), 3);
    let s = &g.statuses().await[&follower];
    assert!(s.repaired_blocks >= 1 && s.damaged_blocks == 0, "{s:?}");

    // Another follower's block file is cut short: the blocks past its end are damaged,
    // and repaired the same way.
    let other = g.peers().into_keys().find(|id| *id != leader && *id != follower).unwrap();
    g.kill(other);
    let file = std::fs::OpenOptions::new().write(true).open(g.blocks_file(other)).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();
    drop(file);
    g.start_replica(other);
    let digests = g.digests().await;
    assert!(digests.len() == 3 && digests.values().all(|d| d.1 == first.1), "replicas differ: {digests:?}");
    let s = &g.statuses().await[&other];
    assert!(s.repaired_blocks >= 1 && s.damaged_blocks == 0, "{s:?}");
    assert_eq!(client.read("vol", 0, data.len() as u64).await.unwrap(), data);
}

// One replica's store disk fills up: writes go on through the healthy majority without an
// error to the client, everything acknowledged reads back, the full replica reports its
// failure and serves no data; restarted with space, it replays its log and matches the
// others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_disk_on_one_replica() {
    let mut g = Group::new(3, 2000);
    let full = NodeId(3);
    let Ok(mount) = Tmpfs::mount(&g.data_dir(full).join("store"), "2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    for id in 1..=3 {
        g.start_replica(NodeId(id));
    }
    let client = g.client();
    client.create("vol").await.unwrap();
    let writes: Vec<(u64, Vec<u8>)> = (0..48).map(|i| (i * 65536 + 100, pattern(100 + i, 65536))).collect();
    for (offset, data) in &writes {
        client.write("vol", *offset, data, None).await.unwrap();
    }
    let start = Instant::now();
    loop {
        let s = g.statuses().await;
        if s.get(&full).is_some_and(|s| !s.failed.is_empty()) {
            assert!(s[&full].failed.contains("no space"), "{:?}", s[&full]);
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the full replica did not report it: {s:?}\n{}", g.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (offset, data) in &writes {
        assert_eq!(
            &client.read("vol", *offset, data.len() as u64).await.unwrap(),
            data,
            "lost write at {offset}"
        );
    }
    let e = client.digest(full).await.unwrap_err();
    assert!(matches!(e, PetalError::Unavailable(_)), "{e}");

    // Space again (the tmpfs goes away): the replica replays its log and catches up.
    g.kill(full);
    drop(mount);
    g.start_replica(full);
    let digests = g.digests().await;
    let first = digests.values().next().unwrap().clone();
    assert!(digests.len() == 3 && digests.values().all(|d| *d == first), "replicas differ: {digests:?}");
}
