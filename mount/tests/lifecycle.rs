//! Mounting and unmounting: signals, busy mounts, and stale mounts left by a killed process.

mod common;

use common::{fuse_available, is_mounted, Mount};
use std::time::{Duration, Instant};

#[test]
fn sigterm_unmounts_cleanly_and_writes_back() {
    if !fuse_available("sigterm_unmounts_cleanly_and_writes_back") {
        return;
    }
    let m = Mount::start();
    std::fs::write(m.dir().join("f"), b"data").unwrap();
    let dir = m.dir().to_path_buf();
    m.stop(); // asserts exit 0, unmounted, no error or warning logged
    assert!(!is_mounted(&dir));
}

#[test]
fn sigint_unmounts_too() {
    if !fuse_available("sigint_unmounts_too") {
        return;
    }
    let mut m = Mount::start();
    m.signal(libc::SIGINT);
    assert!(m.wait().success(), "{}", m.log());
    assert!(!is_mounted(m.dir()));
    assert!(m.log().contains("written back"), "{}", m.log());
}

#[test]
fn a_busy_mount_is_detached_and_served_until_its_last_user_leaves() {
    if !fuse_available("a_busy_mount_is_detached_and_served_until_its_last_user_leaves") {
        return;
    }
    let mut m = Mount::start();
    std::fs::write(m.dir().join("held"), b"still readable").unwrap();
    let held = std::fs::File::open(m.dir().join("held")).unwrap();
    m.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(m.dir()) {
        assert!(Instant::now() < deadline, "busy mount not detached:\n{}", m.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Detached from the namespace, but the open file is still served.
    let mut s = String::new();
    std::io::Read::read_to_string(&mut &held, &mut s).unwrap();
    assert_eq!(s, "still readable");
    drop(held);
    assert!(m.wait().success(), "{}", m.log());
    assert!(m.log().contains("detaching lazily"), "{}", m.log());
}

#[test]
fn sigkill_leaves_a_stale_mount_that_the_next_mount_clears() {
    if !fuse_available("sigkill_leaves_a_stale_mount_that_the_next_mount_clears") {
        return;
    }
    let mut m = Mount::start();
    std::fs::write(m.dir().join("f"), b"gone with the process").unwrap();
    m.signal(libc::SIGKILL);
    assert!(!m.wait().success());
    assert!(is_mounted(m.dir()), "a killed FUSE server leaves its mount behind");
    let err = std::fs::metadata(m.dir()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    // The next mount at the same path clears it and serves a fresh file system.
    m.spawn();
    assert!(m.log().contains("clearing a stale mount"), "{}", m.log());
    std::fs::write(m.dir().join("g"), b"new").unwrap();
    assert_eq!(std::fs::read(m.dir().join("g")).unwrap(), b"new");
    assert!(!m.dir().join("f").exists(), "memory file systems do not survive their process");
    // Clearing the stale mount is expected to log a warning: check the rest by hand.
    m.signal(libc::SIGTERM);
    assert!(m.wait().success(), "{}", m.log());
    assert!(!is_mounted(m.dir()));
    assert!(!m.log().lines().any(|l| l.contains(" ERROR ") && !common::benign(l)), "{}", m.log());
}
