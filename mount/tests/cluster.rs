//! Two mounts of one real cluster, as two processes: `frangipani up` (3 Petal replicas,
//! 3 lock servers and the first mount) and `frangipani mount` (a second machine).

mod common;

use common::{fuse_available, sh, Mount};
use std::ffi::OsString;
use std::fs;

#[test]
fn two_mount_processes_of_one_cluster_stay_coherent() {
    if !fuse_available("two_mount_processes_of_one_cluster_stay_coherent") {
        return;
    }
    let a = Mount::command(|dir, tmp| {
        vec!["up".into(), dir.into(), OsString::from("--data"), tmp.join("data").into_os_string()]
    });
    let b = Mount::command(|dir, _| vec!["mount".into(), dir.into()]);
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
