//! Scenarios 1-6: a Frangipani cluster (3 Petal replicas, 3 lock servers, 2 mounts as
//! processes) under crashes, partitions, power loss and a full disk.

use crate::workload::{content, sh, verify, Acked, Writer};
use crate::Run;
use cluster_tests::frangipani::{Cluster, Options};
use cluster_tests::process::Proc;
use cluster_tests::servers::Group;
use rand::Rng;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The cluster's shape for this run.
fn options(run: &Run) -> Options {
    Options { hosts: run.hosts, ..Options::default() }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Panics with the cluster's logs unless `r` is Ok.
fn ok<T>(c: &Cluster, what: &str, r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", c.logs()))
}

/// Unmounts everything, then `frangipani fsck` must find the file system clean.
fn fsck_clean(c: &mut Cluster, run: &mut Run) {
    let (clean, report) = c.fsck();
    assert!(clean, "fsck found problems:\n{report}\n{}", c.logs());
    run.checked(1);
}

/// Both machines mounted: a file written on one reads back on the other.
fn mounts_work(c: &Cluster, run: &mut Run) {
    let data = content(run.seed ^ 0xfeed, 5000);
    ok(c, "write on mount 0", std::fs::write(c.mnt(0).join("works"), &data).map_err(|e| e.to_string()));
    let back = ok(c, "read on mount 1", std::fs::read(c.mnt(1).join("works")).map_err(|e| e.to_string()));
    assert!(back == data, "a file written on mount 0 reads differently on mount 1");
    run.checked(1);
}

/// Checks the files `acked` through `mnt`, counting them.
fn verify_acked(c: &Cluster, run: &mut Run, mnt: &Path, acked: &[Acked]) {
    let n = ok(c, "an acknowledged file", verify(mnt, acked));
    run.checked(n);
}

/// A tarball of some of this repository's sources (a few hundred files).
fn source_tarball(c: &Cluster) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tarball = c.scratch().join("src.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .args(["raft/src", "frangipani/src", "petal/src", "lockserver/src", "gfs/src"])
        .status()
        .expect("run tar");
    assert!(status.success(), "tar of the sources failed");
    tarball
}

/// Scenario 1: Kill a client mid-untar: another client recovers its log once the lease expires;
/// fsck clean; every file fsynced before the kill is intact.
pub fn kill_client_mid_untar(run: &mut Run) {
    let mut c = Cluster::start(&options(run));
    let tarball = source_tarball(&c);
    let (a, b) = (c.mnt(0).to_path_buf(), c.mnt(1).to_path_buf());
    std::fs::create_dir(a.join("untar")).expect("mkdir untar");
    let writer = Writer::start(&a, "fsynced", run.seed, 64 << 10);
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(a.join("untar")).arg("-xf").arg(&tarball);
    let tar = Proc::spawn("tar", tar, &c.dir().join("tar.log"));
    assert!(writer.wait_acked(3, Duration::from_secs(30)), "no fsync went through\n{}", c.logs());
    let delay = run.rng().gen_range(100..1500);
    sleep_ms(delay);
    c.kill_mount(0);
    run.fault(format!("SIGKILL mount 0 {delay} ms into an untar"));
    let acked = writer.abandon();
    drop(tar);

    // Mount 1 reads what mount 0 fsynced: it waits for mount 0's lease to run out and
    // replays its log.
    verify_acked(&c, run, &b, &acked);
    ok(&c, "read the partial untar on mount 1", sh(&b, "find untar -type f -exec cat {} + > /dev/null"));
    // Mount 0 comes back at the same path (the stale mount cleared).
    c.mount(0);
    mounts_work(&c, run);
    fsck_clean(&mut c, run);
}

/// Scenario 2: Cut a client off from the lock service while it holds dirty data: its lease
/// expires, it answers further writes with EIO, the others recover its log, and the
/// writes it still sends afterwards are fenced by Petal and never visible.
pub fn cut_client_from_locks(run: &mut Run) {
    let opts = options(run);
    let mut c = Cluster::start(&opts);
    let (a, b) = (c.mnt(0).to_path_buf(), c.mnt(1).to_path_buf());
    let before = content(run.seed, 20_000);
    let mut f = std::fs::File::create(b.join("f")).expect("create f on mount 1");
    f.write_all(&before).expect("write f");
    f.sync_all().expect("fsync f");
    drop(f);
    // Mount 0 takes the file over and leaves dirty data in its cache.
    let dirty = content(run.seed + 1, 30_000);
    std::fs::write(a.join("f"), &dirty).expect("overwrite f on mount 0");
    std::fs::write(a.join("unsynced"), b"never fsynced").expect("write on mount 0");
    // Cut off and frozen before it writes anything back.
    c.cut_off(0, true);
    c.mount_process(0).expect("mount 0").stop();
    run.fault(if run.hosts {
        "cut mount 0's host off; SIGSTOP it"
    } else {
        "cut mount 0 off the lock service; SIGSTOP it"
    });
    let lease = opts.lease_ms + run.rng().gen_range(500..1500);
    sleep_ms(lease);

    // Mount 1 gets the file once mount 0's lease is gone, after replaying its log.
    let seen = ok(&c, "read f on mount 1", std::fs::read(b.join("f")).map_err(|e| e.to_string()));
    assert!(seen == before || seen == dirty, "f on mount 1 is neither version ({} bytes)", seen.len());
    let last = content(run.seed + 2, 25_000);
    let mut f = std::fs::File::create(b.join("f")).expect("create f on mount 1");
    f.write_all(&last).expect("write f");
    f.sync_all().expect("fsync f");
    drop(f);

    // Mount 0 wakes up with its dirty data and a lease long gone.
    c.mount_process(0).expect("mount 0").resume();
    run.fault(format!("SIGCONT mount 0 after {lease} ms"));
    sleep_ms(1500);
    let write = std::fs::File::create(a.join("after-the-lease")).and_then(|mut f| {
        f.write_all(b"late")?;
        f.sync_all()
    });
    match write {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => run.checked(1),
        other => {
            panic!("a write on mount 0 after its lease expired answered {other:?}, not EIO\n{}", c.logs())
        }
    }
    c.cut_off(0, false);
    let fenced: u64 = c.petal_statuses().values().map(|s| s.fenced_writes).sum();
    run.fault(format!("healed (Petal fenced {fenced} late writes)"));

    // What mount 1 wrote stands, on a fresh mount too: nothing mount 0 sent late landed.
    let now = ok(&c, "read f on mount 1", std::fs::read(b.join("f")).map_err(|e| e.to_string()));
    assert!(now == last, "f changed under mount 1 after mount 0 woke up");
    fsck_clean(&mut c, run);
    c.mount(0);
    c.mount(1);
    let now = ok(&c, "read f after remounting", std::fs::read(a.join("f")).map_err(|e| e.to_string()));
    assert!(now == last, "f on disk is not what mount 1 fsynced last");
    assert!(!a.join("after-the-lease").exists(), "a file created after the lease expired is visible");
    run.checked(2);
    mounts_work(&c, run);
}

/// SIGKILLs member `id` of `group` and restarts it `down_ms` later.
fn bounce(run: &mut Run, group: &mut Group, id: u64, what: &str, down_ms: u64) {
    group.kill(id);
    run.fault(format!("SIGKILL {what} {id}"));
    sleep_ms(down_ms);
    group.start(id);
    run.fault(format!("restart it {down_ms} ms later"));
}

/// Starts a writer on each machine, each in a directory of its own.
fn writers(c: &Cluster, run: &Run, max_len: usize) -> Vec<Writer> {
    let w: Vec<Writer> = (0..c.machines())
        .map(|i| Writer::start(c.mnt(i), &format!("w{i}"), run.seed + i as u64, max_len))
        .collect();
    for wr in &w {
        assert!(wr.wait_acked(2, Duration::from_secs(30)), "no fsync went through\n{}", c.logs());
    }
    w
}

/// Scenario 3: Kill the Petal leader under a write-heavy workload: the application sees a pause,
/// no error, no loss.
pub fn kill_petal_leader(run: &mut Run) {
    let mut c = Cluster::start(&options(run));
    let w = writers(&c, run, 256 << 10);
    sleep_ms(run.rng().gen_range(100..1000));
    let leader = c.petal_leader();
    let before: usize = w.iter().map(Writer::acked_count).sum();
    bounce(run, &mut c.petal, leader, "Petal leader", 2000);
    sleep_ms(1500);
    let mut acked = Vec::new();
    for (i, wr) in w.into_iter().enumerate() {
        let (files, result) = wr.finish();
        ok(&c, &format!("writer on mount {i}"), result.map_err(|e| e.to_string()));
        acked.push(files);
    }
    let after: usize = acked.iter().map(Vec::len).sum();
    assert!(after > before, "no write completed after the leader died\n{}", c.logs());
    // Each machine's files, read on the other.
    verify_acked(&c, run, c.mnt(1), &acked[0]);
    verify_acked(&c, run, c.mnt(0), &acked[1]);
    fsck_clean(&mut c, run);
    assert!(
        c.petal_digests_agree().is_some(),
        "the restarted replica does not match the others\n{}",
        c.logs()
    );
    run.checked(1);
}

/// What a contender expects in the shared directory: name -> content seed and length.
type Expected = BTreeMap<String, (u64, usize)>;

/// Creates, renames and removes its own files in `mnt/shared` until stopped.
fn contend(mnt: PathBuf, who: usize, seed: u64, stop: Arc<AtomicBool>) -> Result<Expected, String> {
    let dir = mnt.join("shared");
    let mut rng: rand::rngs::SmallRng = rand::SeedableRng::seed_from_u64(seed);
    let mut expected = Expected::new();
    let mut n = 0u64;
    let err = |what: &str, e: std::io::Error| format!("mount {who}: {what}: {e}");
    while !stop.load(Ordering::Relaxed) {
        let name = format!("m{who}-{n}");
        let (s, len) = (seed.wrapping_mul(31).wrapping_add(n), rng.gen_range(1..4096));
        let mut f = std::fs::File::create(dir.join(&name)).map_err(|e| err("create", e))?;
        f.write_all(&content(s, len)).map_err(|e| err("write", e))?;
        f.sync_all().map_err(|e| err("fsync", e))?;
        expected.insert(name.clone(), (s, len));
        if rng.gen_bool(0.4) {
            let renamed = format!("{name}.r");
            std::fs::rename(dir.join(&name), dir.join(&renamed)).map_err(|e| err("rename", e))?;
            let v = expected.remove(&name).expect("just created");
            expected.insert(renamed, v);
        }
        if rng.gen_bool(0.3) {
            let victim = expected.keys().next().cloned().expect("not empty");
            std::fs::remove_file(dir.join(&victim)).map_err(|e| err("unlink", e))?;
            expected.remove(&victim);
        }
        n += 1;
    }
    Ok(expected)
}

/// Scenario 4: Kill the lock-service leader while clients contend for the same directory: no
/// conflicting grant (the directory holds exactly what each client did), work resumes.
pub fn kill_locks_leader(run: &mut Run) {
    let mut c = Cluster::start(&options(run));
    std::fs::create_dir(c.mnt(0).join("shared")).expect("mkdir shared");
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..c.machines())
        .map(|i| {
            let (mnt, stop, seed) = (c.mnt(i).to_path_buf(), stop.clone(), run.seed + i as u64);
            std::thread::spawn(move || contend(mnt, i, seed, stop))
        })
        .collect();
    sleep_ms(run.rng().gen_range(500..1500));
    let leader = c.locks_leader();
    bounce(run, &mut c.locks, leader, "lock service leader", 1500);
    sleep_ms(2000);
    stop.store(true, Ordering::Relaxed);
    let mut all = Expected::new();
    for w in workers {
        let expected = ok(&c, "a contending client", w.join().expect("worker panicked"));
        all.extend(expected);
    }
    for i in 0..c.machines() {
        let listed: Vec<String> =
            ok(&c, "ls shared", sh(c.mnt(i), "ls shared")).lines().map(String::from).collect();
        let want: Vec<&String> = all.keys().collect();
        assert!(
            listed.iter().eq(want.iter().copied()),
            "mount {i} lists {} names, the clients left {}: {listed:?} vs {want:?}",
            listed.len(),
            want.len()
        );
    }
    let acked: Vec<Acked> = all
        .iter()
        .map(|(name, (seed, len))| Acked { path: Path::new("shared").join(name), seed: *seed, len: *len })
        .collect();
    verify_acked(&c, run, c.mnt(1), &acked);
    fsck_clean(&mut c, run);
}

/// Scenario 5: Power loss: SIGKILL every process at once, restart everything: fsck clean,
/// fsynced data intact, mounts work.
pub fn power_loss(run: &mut Run) {
    let mut c = Cluster::start(&options(run));
    let w = writers(&c, run, 128 << 10);
    sleep_ms(run.rng().gen_range(100..1500));
    c.power_loss();
    run.fault("SIGKILL all 8 processes at once");
    let acked: Vec<Vec<Acked>> = w.into_iter().map(Writer::abandon).collect();
    c.petal.start_all();
    c.locks.start_all();
    c.mount(0);
    c.mount(1);
    run.fault("restart everything");
    verify_acked(&c, run, c.mnt(1), &acked[0]);
    verify_acked(&c, run, c.mnt(0), &acked[1]);
    mounts_work(&c, run);
    fsck_clean(&mut c, run);
}

/// Scenario 6: A Petal replica's disk fills: a clear error in its log and status, the others keep
/// serving, nothing corrupt once space returns.
pub fn petal_disk_fills(run: &mut Run) {
    let full = 3;
    let opts = Options { small_petal_disk: Some((full, "24m".into())), ..options(run) };
    let mut c = Cluster::start(&opts);
    let writer = Writer::start(c.mnt(0), "big", run.seed, 1 << 20);
    // Until the replica says its disk is full; the writer must not notice.
    let failed = cluster_tests::process::wait_for(Duration::from_secs(60), || {
        let s = c.petal_statuses();
        s.get(&full).filter(|s| !s.failed.is_empty()).map(|s| s.failed.clone())
    });
    let failed = failed.unwrap_or_else(|| panic!("replica {full} never reported a full disk\n{}", c.logs()));
    run.fault(format!("replica {full}'s 24 MiB disk filled: {failed}"));
    assert!(failed.to_lowercase().contains("space"), "the status does not say the disk is full: {failed}");
    let logged = c
        .errors(&[])
        .iter()
        .any(|l| l.contains(&format!("petal{full}")) && l.to_lowercase().contains("space"));
    assert!(logged, "replica {full}'s log has no error about space\n{}", c.logs());
    sleep_ms(1000);
    let (acked, result) = writer.finish();
    ok(&c, "the writer while a replica was full", result.map_err(|e| e.to_string()));

    // Space returns; the replica restarts, catches up and matches the others.
    c.resize_small_disk("1g");
    c.petal.kill(full);
    c.petal.start(full);
    run.fault(format!("grow the disk, restart replica {full}"));
    verify_acked(&c, run, c.mnt(1), &acked);
    fsck_clean(&mut c, run);
    assert!(c.petal_digests_agree().is_some(), "replica {full} does not match the others\n{}", c.logs());
    run.checked(1);
}
