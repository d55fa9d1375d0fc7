//! Two clients of one file system, mounted at two directories as two machines would be:
//! the kernel's caches on each side must follow what the other side does, immediately
//! (through the invalidations sent on lock revocation), not only when a time-to-live ends.

mod common;

use common::{fuse_available, Mount};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;

/// Rounds of change-and-look; each takes a few milliseconds, far below the 1 s TTL, so
/// stale caches would show in almost every round.
const ROUNDS: usize = 40;

#[test]
fn file_data_written_on_one_client_is_read_on_the_other() {
    if !fuse_available("file_data_written_on_one_client_is_read_on_the_other") {
        return;
    }
    let m = Mount::start_clients(2);
    let (a, b) = (m.dir_of(0).join("f"), m.dir_of(1).join("f"));
    std::fs::write(&a, b"start").unwrap();
    // A reader on B keeps its file open (and its pages cached) the whole time.
    let mut reader = std::fs::File::open(&b).unwrap();
    for i in 0..ROUNDS {
        let (writer, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let text = format!("round {i} {}", "x".repeat(i * 97));
        std::fs::write(writer, &text).unwrap();
        let fresh = std::fs::read_to_string(other).unwrap();
        assert!(fresh == text, "round {i}: fresh open read {:?}", fresh.get(..12));
        let mut seen = String::new();
        reader.seek(SeekFrom::Start(0)).unwrap();
        reader.read_to_string(&mut seen).unwrap();
        assert!(seen == text, "round {i}: long-open reader read {:?}", seen.get(..12));
    }
    drop(reader);
    m.stop();
}

#[test]
fn names_and_attributes_follow_the_other_client() {
    if !fuse_available("names_and_attributes_follow_the_other_client") {
        return;
    }
    let m = Mount::start_clients(2);
    let (a, b) = (m.dir_of(0), m.dir_of(1));
    std::fs::create_dir(a.join("d")).unwrap();
    for i in 0..ROUNDS {
        let name = format!("n{i}");
        assert!(!b.join("d").join(&name).exists(), "round {i}: cached negative");
        std::fs::write(a.join("d").join(&name), b"x").unwrap();
        assert!(b.join("d").join(&name).exists(), "round {i}: created on A, missing on B");
        let mode = 0o600 + (i as u32 % 8) * 0o10;
        std::fs::set_permissions(b.join("d").join(&name), std::fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(
            std::fs::metadata(a.join("d").join(&name)).unwrap().mode() & 0o777,
            mode,
            "round {i}: chmod"
        );
        std::fs::rename(b.join("d").join(&name), b.join("d").join("moved")).unwrap();
        assert!(!a.join("d").join(&name).exists(), "round {i}: renamed on B, old name on A");
        assert!(a.join("d").join("moved").exists(), "round {i}: renamed on B, new name missing on A");
        std::fs::remove_file(a.join("d").join("moved")).unwrap();
        assert!(!b.join("d").join("moved").exists(), "round {i}: removed on A, still on B");
    }
    assert_eq!(std::fs::read_dir(b.join("d")).unwrap().count(), 0);
    std::fs::remove_dir(b.join("d")).unwrap();
    assert!(!a.join("d").exists());
    m.stop();
}

#[test]
fn sizes_follow_appends_on_the_other_client() {
    if !fuse_available("sizes_follow_appends_on_the_other_client") {
        return;
    }
    let m = Mount::start_clients(2);
    let (a, b) = (m.dir_of(0).join("log"), m.dir_of(1).join("log"));
    std::fs::write(&a, b"").unwrap();
    let held = std::fs::File::open(&b).unwrap();
    let mut expected = Vec::new();
    for i in 0..ROUNDS {
        // B looks first, so its kernel holds the size in its attribute cache.
        assert_eq!(std::fs::metadata(&b).unwrap().len(), expected.len() as u64, "round {i}: size before");
        let line = format!("line {i}\n");
        let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
        std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
        drop(f);
        expected.extend_from_slice(line.as_bytes());
        let len = std::fs::metadata(&b).unwrap().len();
        assert!(len == expected.len() as u64, "round {i}: size by path {len}:\n{}", m.log());
        assert_eq!(held.metadata().unwrap().len(), expected.len() as u64, "round {i}: size of an open file");
        assert_eq!(std::fs::read(&b).unwrap(), expected, "round {i}: content");
    }
    drop(held);
    m.stop();
}

#[test]
fn concurrent_writers_and_readers_on_both_clients_stay_coherent_without_stalls() {
    if !fuse_available("concurrent_writers_and_readers_on_both_clients_stay_coherent_without_stalls") {
        return;
    }
    let m = Mount::start_clients(2);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for (k, name) in ["f", "g", "h"].into_iter().enumerate() {
            let (a, b) = (m.dir_of(0).join(name), m.dir_of(1).join(name));
            s.spawn(move || {
                std::fs::write(&a, b"start").unwrap();
                for i in 0..ROUNDS {
                    let (writer, other) = if (i + k) % 2 == 0 { (&a, &b) } else { (&b, &a) };
                    let text = format!("{name} round {i} {}", "x".repeat(i * 97));
                    std::fs::write(writer, &text).unwrap();
                    let seen = std::fs::read_to_string(other).unwrap();
                    assert!(seen == text, "{name} round {i}: read {:?}", seen.get(..16));
                }
            });
        }
    });
    // A revocation that waited out its bound would log a warning (checked by stop) and
    // take a second; the whole run takes well under that per round.
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "took {:?}", started.elapsed());
    m.stop();
}
