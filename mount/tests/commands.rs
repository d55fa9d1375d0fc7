//! The `frangipani` subcommands against in-memory mounts: status, umount (clean and
//! stale), bench, the cluster file, and `--help`.

mod common;

use common::{fuse_available, is_mounted, Mount};
use std::process::{Command, Output};

fn frangipani(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_frangipani")).args(args).output().expect("run frangipani")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn status_shows_each_local_mount_with_its_lease_cache_and_log() {
    if !fuse_available("status_shows_each_local_mount_with_its_lease_cache_and_log") {
        return;
    }
    let m = Mount::start_clients(2);
    std::fs::write(m.dir_of(0).join("f"), vec![7u8; 64 << 10]).unwrap();
    // Nothing listens on port 1: the cluster part reports it unreachable, quickly.
    let out = frangipani(&["status", "--petal", "1=127.0.0.1:1", "--locks", "1=127.0.0.1:1"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    for i in 0..2 {
        let dir = m.dir_of(i).canonicalize().unwrap();
        let at = s.find(&format!("  {} (pid {})", dir.display(), m.pid())).unwrap_or_else(|| panic!("{s}"));
        let block: Vec<&str> = s[at..].lines().take(3).collect();
        assert!(block[1].contains("lock service: session -, slot "), "{s}");
        assert!(
            block[2].contains("cache: ") && block[2].contains("log ") && block[2].contains("% used"),
            "{s}"
        );
    }
    assert!(s.contains("Petal group (1=127.0.0.1:1):") && s.contains("lock service (1=127.0.0.1:1):"), "{s}");
    m.stop();
}

#[test]
fn umount_lets_the_mount_process_write_back_and_exit() {
    if !fuse_available("umount_lets_the_mount_process_write_back_and_exit") {
        return;
    }
    let mut m = Mount::start();
    std::fs::write(m.dir().join("f"), b"x").unwrap();
    let dir = m.dir().to_str().unwrap().to_string();
    let out = frangipani(&["umount", &dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!is_mounted(m.dir()));
    assert!(m.wait().success(), "{}", m.log());
    assert!(m.log().contains("written back"), "{}", m.log());
    // Not mounted any more: umount says so and fails.
    let out = frangipani(&["umount", &dir]);
    assert!(!out.status.success() && text(&out).contains("not mounted"), "{}", text(&out));
}

#[test]
fn umount_detaches_a_stale_mount() {
    if !fuse_available("umount_detaches_a_stale_mount") {
        return;
    }
    let mut m = Mount::start();
    m.signal(libc::SIGKILL);
    assert!(!m.wait().success());
    assert!(is_mounted(m.dir()));
    let out = frangipani(&["umount", m.dir().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("stale"), "{}", text(&out));
    assert!(!is_mounted(m.dir()));
}

#[test]
fn umount_refuses_a_busy_mount_unless_lazy() {
    if !fuse_available("umount_refuses_a_busy_mount_unless_lazy") {
        return;
    }
    let mut m = Mount::start();
    std::fs::write(m.dir().join("held"), b"open").unwrap();
    let held = std::fs::File::open(m.dir().join("held")).unwrap();
    let dir = m.dir().to_str().unwrap().to_string();
    let out = frangipani(&["umount", &dir]);
    assert!(!out.status.success() && text(&out).contains("busy"), "{}", text(&out));
    assert!(is_mounted(m.dir()));
    let out = frangipani(&["umount", "--lazy", &dir]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!is_mounted(m.dir()));
    drop(held);
    assert!(m.wait().success(), "{}", m.log());
}

#[test]
fn bench_prints_every_row_of_its_table() {
    if !fuse_available("bench_prints_every_row_of_its_table") {
        return;
    }
    let m = Mount::start();
    let dir = m.dir().to_str().unwrap().to_string();
    let out = frangipani(&[
        "bench",
        &dir,
        "--big-file-size",
        "4M",
        "--block-size",
        "1M",
        "--small-files",
        "20",
        "--small-file-size",
        "16K",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    for (item, unit) in [
        ("Write big file", "MiB/s"),
        ("Read big file", "MiB/s"),
        ("Write small file", "files/s"),
        ("Read small file", "files/s"),
        ("Stat file", "files/s"),
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {item} ")))
            .unwrap_or_else(|| panic!("{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().is_ok_and(|v| v > 0.0), "{row}");
        assert_eq!(cells[3], unit, "{row}");
        assert!(cells[4].ends_with("/file"), "{row}");
    }
    // Progress went to stderr, one line per stage when not on a terminal.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().filter(|l| l.contains(" done in ")).count(), 5, "{stderr}");
    // The scratch directory is gone.
    assert_eq!(std::fs::read_dir(m.dir()).unwrap().count(), 0);
    m.stop();
}

#[test]
fn addresses_come_from_the_cluster_file_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cluster.toml");
    std::fs::write(&file, "petal = \"1=127.0.0.1:2\"\nlocks = \"1=127.0.0.1:3\"\ndisk = \"other\"\n")
        .unwrap();
    let f = file.to_str().unwrap();
    let s = text(&frangipani(&["status", "--cluster-file", f]));
    assert!(s.contains("Petal group (1=127.0.0.1:2):") && s.contains("lock service (1=127.0.0.1:3):"), "{s}");
    let s = text(&frangipani(&["status", "--cluster-file", f, "--locks", "1=127.0.0.1:4"]));
    assert!(s.contains("Petal group (1=127.0.0.1:2):") && s.contains("lock service (1=127.0.0.1:4):"), "{s}");
    std::fs::write(&file, "petal = \"1=127.0.0.1:2\"\nlockz = \"typo\"\n").unwrap();
    let out = frangipani(&["status", "--cluster-file", f]);
    assert!(!out.status.success() && text(&out).contains("lockz"), "{}", text(&out));
}

#[test]
fn every_subcommand_explains_itself() {
    for (cmd, says) in [
        ("up", "local cluster"),
        ("mkfs", "Formats"),
        ("mount", "Mounts the file system"),
        ("umount", "Unmounts"),
        ("fsck", "Checks the file system"),
        ("status", "this machine's mounts"),
        ("bench", "juicefs bench"),
    ] {
        let out = frangipani(&[cmd, "--help"]);
        let s = text(&out);
        assert!(out.status.success() && s.contains(says) && s.contains("Usage: frangipani"), "{cmd}: {s}");
    }
    let s = text(&frangipani(&["--help"]));
    for cmd in ["up", "mkfs", "mount", "umount", "fsck", "status", "bench"] {
        assert!(s.lines().any(|l| l.trim_start().starts_with(cmd)), "{cmd} missing from:\n{s}");
    }
}
