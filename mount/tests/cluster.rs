//! A real cluster: `frangipani up` (3 Petal replicas, 3 lock servers and the first mount)
//! and `frangipani mount` processes as further machines.
//!
//! `up` listens on fixed ports, so these tests take turns: a mutex within this binary and
//! a file lock between processes.

mod common;

use common::{fuse_available, sh, Mount};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Short, so a killed machine's locks come back within a test's patience.
const LEASE_MS: u64 = 6_000;

static UP_PORTS: Mutex<()> = Mutex::new(());

/// The right to use `up`'s ports, held until dropped.
struct Ports {
    _turn: MutexGuard<'static, ()>,
    _lock: fs::File,
}

fn take_ports() -> Ports {
    let turn = UP_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("frangipani-up-ports.lock"))
        .expect("open the ports lock file");
    // SAFETY: flock(2) on a file we opened.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0, "flock the ports lock file");
    Ports { _turn: turn, _lock: lock }
}

/// `frangipani up` with its data in the mount's scratch directory.
fn up() -> Mount {
    Mount::command(|dir, tmp| {
        vec![
            "up".into(),
            dir.into(),
            OsString::from("--data"),
            tmp.join("data").into_os_string(),
            OsString::from("--lease-ms"),
            OsString::from(LEASE_MS.to_string()),
        ]
    })
}

/// `frangipani mount` of `up`'s cluster (default addresses).
fn machine() -> Mount {
    Mount::command(|dir, _| vec!["mount".into(), dir.into()])
}

fn frangipani(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_frangipani")).args(args).output().expect("run frangipani")
}

#[test]
fn two_mount_processes_of_one_cluster_stay_coherent() {
    if !fuse_available("two_mount_processes_of_one_cluster_stay_coherent") {
        return;
    }
    let _ports = take_ports();
    let a = up();
    let b = machine();
    let (da, db) = (a.dir().to_path_buf(), b.dir().to_path_buf());

    // echo > A/f; cat B/f
    fs::write(da.join("f"), "written on A\n").unwrap();
    assert_eq!(fs::read_to_string(db.join("f")).unwrap(), "written on A\n");
    // mv on A is seen by ls on B.
    sh(&da, "mkdir d && mv f d/g");
    assert_eq!(sh(&db, "ls d"), "g\n");
    assert!(!db.join("f").exists());
    // Appends from both land.
    for i in 0..20 {
        let (dir, who) = if i % 2 == 0 { (&da, "A") } else { (&db, "B") };
        sh(dir, &format!("echo '{who} {i}' >> log"));
    }
    let log = fs::read_to_string(da.join("log")).unwrap();
    assert_eq!(log.lines().count(), 20, "{log}");
    assert!(log.lines().enumerate().all(|(i, l)| l == format!("{} {i}", if i % 2 == 0 { "A" } else { "B" })));
    // A source tree unpacked on A is identical on B.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let tarball = a.scratch().join("src.tar");
    sh(&a.scratch(), &format!("tar -C {} -cf {} .", src.display(), tarball.display()));
    sh(&da, &format!("mkdir tree && tar -C tree -xf {}", tarball.display()));
    sh(&db, &format!("diff -r {} tree", src.display()));
    // An edit on A while B holds the file open is read by B.
    let mut held = fs::File::open(db.join("d/g")).unwrap();
    fs::write(da.join("d/g"), "edited on A\n").unwrap();
    let mut now = String::new();
    std::io::Read::read_to_string(&mut held, &mut now).unwrap();
    assert_eq!(now, "edited on A\n");
    drop(held);

    b.stop_checking(false);
    a.stop_checking(false);
}

#[test]
fn file_locks_hold_across_two_mount_processes() {
    if !fuse_available("file_locks_hold_across_two_mount_processes") {
        return;
    }
    let _ports = take_ports();
    let a = up();
    let b = machine();
    common::file_locks_hold_across_machines(a.dir(), b.dir(), &a.scratch());
    b.stop_checking(false);
    a.stop_checking(false);
}

#[test]
fn status_shows_the_mounts_sessions_and_the_groups_leaders() {
    if !fuse_available("status_shows_the_mounts_sessions_and_the_groups_leaders") {
        return;
    }
    let _ports = take_ports();
    let a = up();
    let b = machine();
    fs::write(b.dir().join("f"), b"cached").unwrap();
    let out = frangipani(&["status"]);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{s}{}", String::from_utf8_lossy(&out.stderr));
    for m in [&a, &b] {
        let dir = m.dir().canonicalize().unwrap();
        let at = s.find(&format!("  {} (pid {})", dir.display(), m.pid())).unwrap_or_else(|| panic!("{s}"));
        let lines: Vec<&str> = s[at..].lines().take(3).collect();
        // A real session: its id, a lease counting down, cached locks counted.
        assert!(lines[1].contains("lock service: session ") && !lines[1].contains("session -,"), "{s}");
        assert!(lines[1].contains("lease left ") && lines[1].contains(" s, cached locks "), "{s}");
        assert!(lines[2].contains("cache: ") && lines[2].contains("% used"), "{s}");
    }
    // Both groups, each with a leader.
    let petal = s.find("Petal group").unwrap_or_else(|| panic!("{s}"));
    let locks = s.find("lock service (").unwrap_or_else(|| panic!("{s}"));
    assert!(s[petal..locks].contains("leader"), "{s}");
    assert!(s[locks..].contains("leader"), "{s}");
    b.stop_checking(false);
    a.stop_checking(false);
}

#[test]
fn a_machine_killed_mid_write_mounts_again_and_fsck_is_clean() {
    if !fuse_available("a_machine_killed_mid_write_mounts_again_and_fsck_is_clean") {
        return;
    }
    let _ports = take_ports();
    let a = up();
    fs::create_dir(a.dir().join("d")).unwrap();
    let mut b = machine();
    let d = b.dir().join("d");
    // Acknowledged durable before the crash.
    let mut durable = fs::File::create(d.join("durable")).unwrap();
    durable.write_all(b"fsynced before the crash\n").unwrap();
    durable.sync_all().unwrap();
    drop(durable);
    // Logged (the log is group-committed every second) but not necessarily written back.
    fs::create_dir(d.join("logged")).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // A writer running in B's mount when B dies.
    let mut writer = common::Killed(
        Command::new("sh")
            .arg("-c")
            .arg("i=0; while echo \"line $i\" >> w; do i=$((i+1)); done")
            .current_dir(&d)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::metadata(d.join("w")).map(|m| m.len()).unwrap_or(0) < 10_000 {
        assert!(Instant::now() < deadline, "the writer wrote nothing:\n{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    b.signal(libc::SIGKILL);
    assert!(!b.wait().success());
    assert!(
        common::wait_for(&mut writer.0, Duration::from_secs(20)).is_some(),
        "the writer outlived its mount"
    );
    assert!(common::is_mounted(b.dir()), "a killed mount process leaves its mount behind");

    // Mount again at the same path: the stale mount is cleared, and once the lease is
    // over the dead session's log is recovered and its locks come back.
    b.spawn();
    assert!(b.log().contains("clearing a stale mount"), "{}", b.log());
    let d = b.dir().join("d");
    assert_eq!(fs::read_to_string(d.join("durable")).unwrap(), "fsynced before the crash\n");
    assert!(d.join("logged").is_dir(), "a logged mkdir was lost");
    // What the writer did last may not have been logged yet (and file data is not logged
    // at all: what was not written back may read as zeros).
    let w = fs::read(d.join("w")).unwrap_or_default();
    for line in String::from_utf8_lossy(&w).lines().map(|l| l.trim_matches('\0')).filter(|l| !l.is_empty()) {
        assert!(line.starts_with("line "), "{line:?}");
    }
    fs::write(d.join("after"), b"written after the remount").unwrap();
    assert_eq!(fs::read(a.dir().join("d/after")).unwrap(), b"written after the remount");
    let logs = format!("{}{}", a.log(), b.log());
    assert!(logs.contains("recovering a dead client's log"), "{logs}");

    b.stop_checking(false);
    let out = frangipani(&["fsck"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && report.trim_end().ends_with("clean"),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.stop_checking(false);
}
