//! GFS mode as real processes on 127.0.0.1 (the issue's test list): concurrent appenders
//! in separate processes, records padding over chunk boundaries, a chunkserver and the
//! master leader killed mid-append, a stale replica coming back, flipped bytes in a chunk
//! file, snapshots with garbage collection, and `gfs up`.
//!
//! The tests run one at a time (each starts 6 or 7 processes on a 2-core machine).

use cluster_tests::gfs::{
    append_in_background, assert_each_once, flip_bytes, gfs_bin, join_all, read_all, record, wait_acked,
    Appenders, Cluster, Options, CHUNK_BYTES, DEAD_AFTER_MS, LEASE_MS,
};
use cluster_tests::process::free_ports;
use gfs::client::{Client, ClientConfig, GfsError};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One test at a time in this binary (an async lock: the guard lives across awaits).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A child killed (SIGKILL) and reaped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_fully_replicated(c: &Cluster, path: &str, copies: usize, excluded: Option<&str>) {
    c.wait_for(&format!("{copies} copies of every chunk of {path}"), Duration::from_secs(40), || async {
        let info = c.client().lookup(path).await.ok()?;
        let ok = info.chunks.iter().filter(|ch| ch.version > 1).all(|ch| {
            ch.replicas.len() == copies
                && ch.replicas.iter().all(|r| r.version >= ch.version && Some(r.addr.as_str()) != excluded)
        });
        ok.then_some(())
    })
    .await;
}

// Issue #8: N appenders in separate processes, M records each: every acknowledged record
// is read back intact; the reader yields each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appenders_in_separate_processes_each_record_read_once() {
    let _serial = serial().await;
    let c = Cluster::start(Options::default());
    c.wait_ready().await;
    assert!(c.gfs().args(["create", "/log"]).status().unwrap().success());
    const N: usize = 4;
    const M: usize = 250;
    let mut sent = HashSet::new();
    let mut children = Vec::new();
    for p in 0..N {
        // 1 to 2 KiB records: about 1.5 MB in all, so the appends cross chunk boundaries.
        let lines: Vec<Vec<u8>> =
            (0..M).map(|r| record(&format!("p{p}"), r, 1000 + (r * 37) % 1000)).collect();
        sent.extend(lines.iter().cloned());
        let mut child = c
            .gfs()
            .args(["append", "/log", "--echo", "--parallel", "4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(c.dir.path().join(format!("appender{p}.log"))).unwrap())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            for l in lines {
                stdin.write_all(&l).unwrap();
                stdin.write_all(b"\n").unwrap();
            }
        });
        children.push(Guard(child));
    }
    let mut acked = Vec::new();
    for mut g in children {
        let stdout = g.0.stdout.take().unwrap();
        let lines: Vec<Vec<u8>> = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout).split(b'\n').map(|l| l.unwrap()).collect()
        })
        .await
        .unwrap();
        let status = g.0.wait().unwrap();
        assert!(status.success(), "an appender failed\n{}", c.logs());
        assert_eq!(lines.len(), M, "an appender acknowledged {} of {M} records", lines.len());
        acked.extend(lines);
    }
    let out = c.gfs().args(["read", "/log"]).output().unwrap();
    assert!(out.status.success(), "gfs read failed: {}", String::from_utf8_lossy(&out.stderr));
    let read: Vec<Vec<u8>> =
        out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| l.to_vec()).collect();
    assert_each_once(&acked, &sent, &read);
    assert_eq!(read.len(), N * M);
    let info = c.lookup("/log").await;
    assert!(info.chunks.len() >= 2, "expected the log to span chunks, got {}", info.chunks.len());
    c.assert_no_unexpected_errors(&[]);
}

// Issue #8: records near the chunk boundary pad and continue on the next chunk; a record
// above a quarter chunk is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_near_the_chunk_boundary_pad_and_continue() {
    let _serial = serial().await;
    let c = Cluster::start(Options::default());
    c.wait_ready().await;
    let client = c.client();
    client.create("/big").await.unwrap();
    // Frames of 240 KiB + 32 bytes: four fit in a 1 MiB chunk, the fifth does not.
    let payloads: Vec<Vec<u8>> = (0..6).map(|i| vec![b'0' + i as u8; 240 << 10]).collect();
    let mut acks = Vec::new();
    for p in &payloads {
        acks.push(client.append("/big", p).await.unwrap());
    }
    let chunks: Vec<u64> = acks.iter().map(|a| a.chunk_index).collect();
    assert_eq!(chunks, vec![0, 0, 0, 0, 1, 1]);
    assert_eq!(acks[4].offset, 0, "the record that did not fit starts the next chunk");
    assert!(acks[..4].windows(2).all(|w| w[0].offset < w[1].offset));
    // Every replica of chunk 0 was padded to the full chunk.
    c.wait_for("chunk 0 padded on every replica", Duration::from_secs(10), || async {
        let info = c.client().lookup("/big").await.ok()?;
        let ch = &info.chunks[0];
        (ch.replicas.len() == 3 && ch.replicas.iter().all(|r| r.length == CHUNK_BYTES)).then_some(())
    })
    .await;
    let mut read = Vec::new();
    let stats = client.read("/big", |_, p| read.push(p.to_vec())).await.unwrap();
    assert_eq!(read, payloads, "records come back whole, once, in order");
    let padding = CHUNK_BYTES - 4 * gfs::record::frame_bytes(240 << 10) as u64;
    assert_eq!(stats.skipped_bytes, padding, "the padding was skipped, and nothing else");
    match client.append("/big", &vec![0u8; 256 << 10]).await {
        Err(GfsError::TooLarge(..)) => {}
        other => panic!("a record over a quarter chunk was not refused: {other:?}"),
    }
    c.assert_no_unexpected_errors(&[]);
}

// Issue #8: kill a chunkserver mid-append: appends continue; the master re-replicates
// until every chunk has 3 copies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunkserver_killed_mid_append_then_re_replicated() {
    let _serial = serial().await;
    let mut c = Cluster::start(Options { chunkservers: 4, ..Options::default() });
    c.wait_ready().await;
    let client = Arc::new(c.client());
    client.create("/f").await.unwrap();
    let Appenders { tasks: set, acked, sent } = append_in_background(client.clone(), "/f", 4, 250, 2000);
    wait_acked(&c, &acked, 150).await;
    // The victim: the primary of the chunk being appended to, the hardest case.
    let info = c.lookup("/f").await;
    let last = info.chunks.last().unwrap();
    let victim =
        last.replicas.iter().find(|r| r.server == last.primary).unwrap_or(&last.replicas[0]).addr.clone();
    c.kill_chunkserver(c.cs_index(&victim));
    join_all(&c, set).await;
    wait_fully_replicated(&c, "/f", 3, Some(&victim)).await;
    let status = c.leader_status().await.unwrap();
    assert!(status.clones_done >= 1, "nothing was re-replicated");
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 1000);
    assert_each_once(&acked, &sent, &read_all(&c, "/f").await);
    c.assert_no_unexpected_errors(&[]);
}

// Issue #8: kill the master leader: a new leader takes over; clients continue. Followers
// answer metadata reads marked possibly stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_leader_killed_clients_continue() {
    let _serial = serial().await;
    let mut c = Cluster::start(Options::default());
    c.wait_ready().await;
    let client = Arc::new(c.client());
    client.create("/m").await.unwrap();
    let Appenders { tasks: set, acked, sent } = append_in_background(client.clone(), "/m", 4, 150, 1000);
    wait_acked(&c, &acked, 100).await;
    let old = c.leader().await.expect("a leader");
    c.kill_master(old);
    join_all(&c, set).await;
    let new = c
        .wait_for("a new leader", Duration::from_secs(20), || async {
            c.leader().await.filter(|l| *l != old)
        })
        .await;
    assert_ne!(new, old);
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 600);
    assert_each_once(&acked, &sent, &read_all(&c, "/m").await);

    // Enough changes while it is down that the leader checkpoints (a Raft snapshot,
    // every 50 entries in these tests) past what the old leader has.
    for i in 0..60 {
        client.create(&format!("/many/{i}")).await.unwrap();
    }
    // The old leader comes back as a follower, catches up from the checkpoint, and can
    // answer, marked stale.
    c.start_master(old);
    let follower: BTreeMap<_, _> =
        c.masters.iter().filter(|(id, _)| id.0 == old).map(|(i, a)| (*i, a.clone())).collect();
    let mut cfg = ClientConfig::new(follower);
    cfg.allow_stale = true;
    cfg.deadline = Duration::from_secs(20);
    let shadow = Client::new(cfg);
    let chunks = c.lookup("/m").await.chunks.len();
    let info = c
        .wait_for("the old leader to catch up", Duration::from_secs(20), || async {
            let (names, _) = shadow.list("/many").await.ok()?;
            shadow.lookup("/m").await.ok().filter(|i| i.chunks.len() == chunks && names.len() == 60)
        })
        .await;
    assert!(info.stale, "a follower's answer is marked possibly stale");
    assert!(
        c.dir.path().join(format!("master{old}")).join("snapshot").exists(),
        "no checkpoint was installed"
    );
    c.assert_no_unexpected_errors(&[]);
}

// Issue #8: a replica that was down while a lease was granted comes back stale: it is
// detected and never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_replica_is_detected_and_never_served() {
    let _serial = serial().await;
    let mut c = Cluster::start(Options::default());
    c.wait_ready().await;
    let client = c.client();
    client.create("/s").await.unwrap();
    let mut all = Vec::new();
    for i in 0..20 {
        let r = record("before", i, 500);
        client.append("/s", &r).await.unwrap();
        all.push(r);
    }
    let info = c.lookup("/s").await;
    let ch = info.chunks[0].clone();
    assert_eq!(ch.replicas.len(), 3);
    // A secondary goes down; the next appends get a new lease without it.
    let victim = ch.replicas.iter().find(|r| r.server != ch.primary).unwrap().addr.clone();
    c.kill_chunkserver(c.cs_index(&victim));
    for i in 0..20 {
        let r = record("after", i, 500);
        client.append("/s", &r).await.unwrap();
        all.push(r);
    }
    let now = c.lookup("/s").await.chunks[0].clone();
    assert!(now.version > ch.version, "a new lease bumps the version ({} -> {})", ch.version, now.version);
    assert!(now.replicas.iter().all(|r| r.addr != victim));

    // It comes back holding the old version: never listed until it is a fresh copy.
    c.start_chunkserver(c.cs_index(&victim));
    c.wait_for("the stale replica replaced by a current one", Duration::from_secs(30), || async {
        let info = c.client().lookup("/s").await.ok()?;
        let ch = &info.chunks[0];
        for r in &ch.replicas {
            assert!(r.version >= now.version, "the master listed a stale replica: {r:?}");
        }
        ch.replicas.iter().any(|r| r.addr == victim).then_some(())
    })
    .await;
    let status = c.leader_status().await.unwrap();
    assert!(status.stale_found >= 1, "the stale replica was not detected");
    // Read straight from it: the current version, the same bytes as another replica.
    let healthy = now.replicas[0].addr.clone();
    let fresh = c.read_direct(&victim, now.handle, now.version).await.unwrap();
    assert_eq!(fresh, c.read_direct(&healthy, now.handle, now.version).await.unwrap());
    assert_each_once(&all, &all.iter().cloned().collect(), &read_all(&c, "/s").await);
    c.assert_no_unexpected_errors(&[]);
}

// Issue #8: flip bytes in a chunk file: detected, served from another replica, repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_detected_served_elsewhere_and_repaired() {
    let _serial = serial().await;
    let c = Cluster::start(Options::default());
    c.wait_ready().await;
    let client = c.client();
    client.create("/c").await.unwrap();
    let records: Vec<Vec<u8>> = (0..60).map(|i| record("c", i, 3000)).collect();
    for r in &records {
        client.append("/c", r).await.unwrap();
    }
    let ch = c.lookup("/c").await.chunks[0].clone();
    let victim = ch.replicas[0].addr.clone();
    let file = c.cs_dir(c.cs_index(&victim)).join("chunks").join(format!("{:016x}.chunk", ch.handle));
    flip_bytes(&file, 70_000, 16); // in the second 64 KiB block

    let err = c.read_direct(&victim, ch.handle, ch.version).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    // Readers get every record from the other replicas meanwhile.
    assert_each_once(&records, &records.iter().cloned().collect(), &read_all(&c, "/c").await);
    let healthy = ch.replicas[1].addr.clone();
    let good = c.read_direct(&healthy, ch.handle, ch.version).await.unwrap();
    c.wait_for("the corrupt replica repaired", Duration::from_secs(30), || async {
        let data = c.read_direct(&victim, ch.handle, ch.version).await.ok()?;
        (data == good).then_some(())
    })
    .await;
    wait_fully_replicated(&c, "/c", 3, None).await;
    c.assert_no_unexpected_errors(&["checksum failure"]);
}

// Copy-on-write snapshots (GFS §3.4) and lazy deletion with garbage collection of the
// orphaned chunks (GFS §4.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_copy_on_write_and_deleted_chunks_are_collected() {
    let _serial = serial().await;
    let c = Cluster::start(Options { gc_grace_ms: 1000, ..Options::default() });
    c.wait_ready().await;
    let client = c.client();
    client.create("/a").await.unwrap();
    let first: Vec<Vec<u8>> = (0..10).map(|i| record("first", i, 100)).collect();
    for r in &first {
        client.append("/a", r).await.unwrap();
    }
    client.snapshot("/a", "/b").await.unwrap();
    let shared = c.lookup("/b").await.chunks[0].clone();
    assert_eq!(shared.refs, 2);
    let second: Vec<Vec<u8>> = (0..10).map(|i| record("second", i, 100)).collect();
    for r in &second {
        client.append("/a", r).await.unwrap();
    }
    assert_eq!(read_all(&c, "/b").await, first, "the snapshot does not see later appends");
    let mut both = first.clone();
    both.extend(second.iter().cloned());
    assert_eq!(read_all(&c, "/a").await, both);
    let a = c.lookup("/a").await.chunks[0].clone();
    assert_ne!(a.handle, shared.handle, "the first append after the snapshot copied the chunk");
    assert_eq!(c.lookup("/b").await.chunks[0].refs, 1);

    client.delete("/a").await.unwrap();
    let (entries, _) = client.list("/").await.unwrap();
    assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
    // After the grace period the trash is purged and the chunkservers delete /a's copy.
    let meta = format!("{:016x}.meta", a.handle);
    c.wait_for("the deleted file's chunk collected", Duration::from_secs(30), || async {
        (0..3).all(|i| !c.cs_dir(i).join("chunks").join(&meta).exists()).then_some(())
    })
    .await;
    assert_eq!(read_all(&c, "/b").await, first, "the snapshot survives the original");
    c.assert_no_unexpected_errors(&[]);
}

// Rebalancing (GFS §4.3): a new, empty chunkserver receives chunks until the loads even
// out, and the surplus copies left behind are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_fills_a_new_chunkserver() {
    let _serial = serial().await;
    let mut c = Cluster::start(Options { chunkservers: 4, running: Some(3), ..Options::default() });
    c.wait_ready().await;
    let client = c.client();
    client.create("/r").await.unwrap();
    let mut all = Vec::new();
    for i in 0..24 {
        let r = record("r", i, 200 << 10); // 5 records a chunk: 5 chunks
        client.append("/r", &r).await.unwrap();
        all.push(r);
    }
    c.start_chunkserver(3);
    let newcomer = c.chunkservers[3].clone();
    c.wait_for("chunks moved to the new chunkserver", Duration::from_secs(60), || async {
        let status = c.leader_status().await?;
        let loads: Vec<u64> = status.servers.iter().filter(|s| s.alive).map(|s| s.chunks).collect();
        let theirs = status.servers.iter().find(|s| s.addr == newcomer)?.chunks;
        let (min, max) = (*loads.iter().min()?, *loads.iter().max()?);
        (loads.len() == 4 && theirs >= 2 && max - min <= 2).then_some(())
    })
    .await;
    wait_fully_replicated(&c, "/r", 3, None).await;
    assert_each_once(&all, &all.iter().cloned().collect(), &read_all(&c, "/r").await);
    c.assert_no_unexpected_errors(&[]);
}

/// A base port with `base..base+3` and `base+10..base+13` free.
fn free_port_block() -> u16 {
    for _ in 0..50 {
        let base = free_ports(1)[0].clamp(20_000, 60_000);
        let ok = [0u16, 1, 2, 10, 11, 12]
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no free block of ports");
}

// `gfs up` starts a working cluster and stops all of it on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gfs_up_runs_a_cluster_and_stops_it() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_block();
    let up = std::process::Command::new(gfs_bin())
        .args([
            "up",
            "--base-port",
            &base.to_string(),
            "--tick-ms=20",
            "--chunk-bytes=1M",
            "--heartbeat-ms=200",
        ])
        .arg(format!("--lease-ms={LEASE_MS}"))
        .arg(format!("--dead-after-ms={DEAD_AFTER_MS}"))
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Guard(up);
    let masters = format!("1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}", base, base + 1, base + 2);
    let gfs = move |args: &[&str], stdin: &[u8]| {
        let mut child = std::process::Command::new(gfs_bin())
            .args(args)
            .args(["--masters", &masters, "--deadline-secs", "30"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "gfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    tokio::task::spawn_blocking(move || {
        gfs(&["create", "/x"], b"");
        gfs(&["append", "/x"], b"alpha\nbeta\n");
        assert_eq!(gfs(&["read", "/x"], b""), "alpha\nbeta\n");
        assert!(gfs(&["ls", "/"], b"").starts_with("x\t1 chunks"));
        assert!(gfs(&["stat", "/x"], b"").contains("chunk 0 handle"));
        assert!(gfs(&["status"], b"").contains("Leader"));
    })
    .await
    .unwrap();
    let pid = up.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || up.0.wait().unwrap()).await.unwrap();
    assert!(status.success(), "gfs up did not exit cleanly: {status}");
    // Its children are gone: their ports can be bound again.
    let freed = Arc::new(AtomicUsize::new(0));
    for p in [base, base + 1, base + 2, base + 10, base + 11, base + 12] {
        for _ in 0..50 {
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                freed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(freed.load(Ordering::Relaxed), 6, "a child of gfs up outlived it");
}
