//! Three `raft-kv` nodes as real processes on 127.0.0.1 with real fsync: SIGKILL the
//! leader under load, power-cycle the whole group, corrupt a log tail. Every process a
//! test starts is killed by its pid when the test ends, pass or fail.

use cluster_tests::process::log_tails;
use cluster_tests::servers::Group;
use raft::kv_service::KvClient;
use raft::NodeId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The nodes, as a group of `raft-kv serve` processes (each killed by its pid when
/// dropped), with their data and logs in a temporary directory.
struct Cluster {
    group: Group,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start(n: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let extra = ["--tick-ms", "50", "--snapshot-entries", "500"].map(String::from).to_vec();
        let program = PathBuf::from(env!("CARGO_BIN_EXE_raft-kv"));
        let mut group = Group::new(program, "node", n, extra, dir.path());
        group.start_all();
        Cluster { group, dir }
    }

    fn peers(&self) -> BTreeMap<NodeId, String> {
        self.group.addrs.iter().map(|(id, a)| (NodeId(*id), a.clone())).collect()
    }

    fn data_dir(&self, id: NodeId) -> PathBuf {
        self.group.data_dir(id.0)
    }

    fn start_node(&mut self, id: NodeId) {
        self.group.start(id.0);
    }

    fn kill(&mut self, id: NodeId) {
        self.group.kill(id.0);
    }

    fn client(&self) -> KvClient {
        let mut c = KvClient::new(self.peers());
        c.deadline = Duration::from_secs(20);
        c
    }

    async fn leader(&self) -> Option<NodeId> {
        let mut client = self.client();
        for (id, s) in client.status().await {
            if let Ok(s) = s {
                if s.role == "Leader" {
                    return Some(id);
                }
            }
        }
        None
    }

    async fn wait_leader(&self) -> NodeId {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no leader within 20 s\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        log_tails(self.dir.path(), 20)
    }
}

// A leader killed under load: writers see a pause, a new leader takes writes within a few
// election timeouts, and after a power cycle of every node no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leader_under_load_then_power_cycle() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;

    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut client = cluster.client();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (k, v) = (format!("w{w}-{i}"), format!("value-{w}-{i}"));
                client.put(&k, &v).await.expect("a put fails although a majority is up");
                acked.lock().unwrap().insert(k, v);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(before_kill > 50, "only {before_kill} puts in 2 s");

    cluster.kill(leader);
    let killed_at = Instant::now();
    // Writes resume under a new leader.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if acked.lock().unwrap().len() > before_kill + 20 {
            break;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(15), "writes did not resume\n{}", cluster.logs());
    }
    let resumed_after = killed_at.elapsed();
    let new_leader = cluster.wait_leader().await;
    assert_ne!(new_leader, leader);
    eprintln!("writes resumed {resumed_after:?} after the leader was killed");

    cluster.start_node(leader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Power loss: every node at once, then all back.
    for id in cluster.peers().into_keys().collect::<Vec<_>>() {
        cluster.kill(id);
    }
    for id in cluster.peers().into_keys().collect::<Vec<_>>() {
        cluster.start_node(id);
    }
    cluster.wait_leader().await;
    let mut client = cluster.client();
    for (k, v) in &acked {
        assert_eq!(client.get(k).await.unwrap().as_deref(), Some(v.as_str()), "acknowledged {k} lost");
    }
    eprintln!("{} acknowledged writes all present after a power cycle", acked.len());
}

/// The last segment file of a node's log.
fn last_segment(data: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

// A corrupt last record: the node cuts the tail at restart, says so, and catches up from
// the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_tail_is_cut_reported_and_caught_up() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let mut client = cluster.client();
    for i in 0..20 {
        client.put(&format!("k{i}"), "before").await.unwrap();
    }
    let victim = cluster.peers().into_keys().find(|id| *id != leader).unwrap();
    // Wait until the victim stored everything, then kill it and flip its last byte.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(victim);
    let seg = last_segment(&cluster.data_dir(victim));
    let mut bytes = std::fs::read(&seg).unwrap();
    assert!(!bytes.is_empty());
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    for i in 0..20 {
        client.put(&format!("k{i}"), "after").await.unwrap();
    }
    cluster.start_node(victim);
    // The victim reports the cut and catches up to the leader's commit index.
    let start = Instant::now();
    loop {
        let statuses = cluster.client().status().await;
        let commit = statuses
            .iter()
            .find_map(|(_, s)| s.as_ref().ok().filter(|s| s.role == "Leader").map(|s| s.commit));
        let mine = statuses
            .iter()
            .find(|(id, _)| *id == victim)
            .and_then(|(_, s)| s.as_ref().ok())
            .map(|s| s.applied);
        if commit.is_some() && commit == mine {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "victim did not catch up: {statuses:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(cluster.group.process(victim.0).unwrap().log()).unwrap();
    assert!(log.contains("tail cut"), "the cut was not reported:\n{log}");
    // Its data is right: make it the leader and read through it.
    assert_eq!(client.get("k19").await.unwrap().as_deref(), Some("after"));
}
