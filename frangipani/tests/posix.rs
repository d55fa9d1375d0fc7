//! One test per operation's POSIX semantics, error cases included.

mod common;

use common::Cluster;
use frangipani::{Caller, FsError, RenameFlags, SetAttr, XattrFlags, ROOT_INO};

const ME: Caller = Caller { uid: 1000, gid: 1000 };

fn file(c: &common::Client, parent: u64, name: &str) -> u64 {
    c.fs.create(parent, name.as_bytes(), 0o644, 0, ME).unwrap().ino
}

fn names(c: &common::Client, dir: u64) -> Vec<String> {
    let mut out: Vec<String> =
        c.fs.readdir(dir, 0, 100_000)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .filter(|n| n != "." && n != "..")
            .collect();
    out.sort();
    out
}

#[test]
fn create_lookup_and_exists() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let a = c.fs.create(ROOT_INO, b"a", 0o640, 0, ME).unwrap();
    assert_eq!(a.mode & 0o777, 0o640);
    assert_eq!((a.uid, a.gid, a.nlink, a.size), (1000, 1000, 1, 0));
    assert_eq!(c.fs.lookup(ROOT_INO, b"a").unwrap().ino, a.ino);
    assert_eq!(c.fs.create(ROOT_INO, b"a", 0o644, 0, ME), Err(FsError::Exists));
    assert_eq!(c.fs.lookup(ROOT_INO, b"missing"), Err(FsError::NotFound));
    assert_eq!(c.fs.lookup(a.ino, b"x"), Err(FsError::NotDir));
    assert_eq!(c.fs.create(a.ino, b"x", 0o644, 0, ME), Err(FsError::NotDir));
    let long = vec![b'n'; 256];
    assert_eq!(c.fs.create(ROOT_INO, &long, 0o644, 0, ME), Err(FsError::NameTooLong));
    assert_eq!(c.fs.lookup(ROOT_INO, &long), Err(FsError::NameTooLong));
    assert!(c.fs.create(ROOT_INO, &vec![b'n'; 255], 0o644, 0, ME).is_ok());
    assert!(matches!(c.fs.create(ROOT_INO, b"a/b", 0o644, 0, ME), Err(FsError::Invalid(_))));
    assert!(matches!(c.fs.create(ROOT_INO, b"", 0o644, 0, ME), Err(FsError::Invalid(_))));
    // Special files.
    let fifo = c.fs.create(ROOT_INO, b"fifo", 0o010644, 0, ME).unwrap();
    assert_eq!(fifo.mode & 0o170000, 0o010000);
    let dev = c.fs.create(ROOT_INO, b"dev", 0o020600, 0x0103, ME).unwrap();
    assert_eq!(dev.rdev, 0x0103);
    assert!(c.fs.fsck(false).unwrap().is_clean());
}

#[test]
fn mkdir_rmdir_and_link_counts() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let d = c.fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
    assert_eq!(d.nlink, 2);
    assert_eq!(c.fs.getattr(ROOT_INO).unwrap().nlink, 3);
    assert_eq!(c.fs.mkdir(ROOT_INO, b"d", 0o755, ME), Err(FsError::Exists));
    let sub = c.fs.mkdir(d.ino, b"sub", 0o700, ME).unwrap();
    assert_eq!(c.fs.getattr(d.ino).unwrap().nlink, 3);
    assert_eq!(c.fs.lookup(sub.ino, b"..").unwrap().ino, d.ino);
    assert_eq!(c.fs.lookup(sub.ino, b".").unwrap().ino, sub.ino);
    assert_eq!(c.fs.rmdir(ROOT_INO, b"d"), Err(FsError::NotEmpty));
    file(&c, ROOT_INO, "f");
    assert_eq!(c.fs.rmdir(ROOT_INO, b"f"), Err(FsError::NotDir));
    assert_eq!(c.fs.unlink(ROOT_INO, b"d"), Err(FsError::IsDir));
    assert_eq!(c.fs.rmdir(ROOT_INO, b"nope"), Err(FsError::NotFound));
    c.fs.rmdir(d.ino, b"sub").unwrap();
    c.fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(c.fs.getattr(ROOT_INO).unwrap().nlink, 2);
    assert_eq!(c.fs.lookup(ROOT_INO, b"d"), Err(FsError::NotFound));
    assert_eq!(names(&c, ROOT_INO), vec!["f"]);
    assert!(c.fs.fsck(false).unwrap().is_clean());
}

#[test]
fn unlink_and_hard_links() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let f = file(&c, ROOT_INO, "f");
    c.fs.write(f, 0, b"data").unwrap();
    let l = c.fs.link(f, ROOT_INO, b"g").unwrap();
    assert_eq!(l.nlink, 2);
    assert_eq!(c.fs.link(f, ROOT_INO, b"g"), Err(FsError::Exists));
    assert_eq!(c.fs.link(ROOT_INO, ROOT_INO, b"h"), Err(FsError::Perm));
    c.fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(c.fs.getattr(f).unwrap().nlink, 1);
    assert_eq!(c.fs.read(f, 0, 10).unwrap(), b"data");
    assert_eq!(c.fs.unlink(ROOT_INO, b"f"), Err(FsError::NotFound));
    c.fs.unlink(ROOT_INO, b"g").unwrap();
    assert_eq!(c.fs.getattr(f), Err(FsError::NotFound));
    assert!(c.fs.fsck(false).unwrap().is_clean());
}

#[test]
fn unlinked_open_file_lives_until_last_close() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let free_before = c.fs.statfs().unwrap().inodes_free;
    let f = file(&c, ROOT_INO, "open");
    c.fs.open(f).unwrap();
    c.fs.write(f, 0, &vec![7u8; 10_000]).unwrap();
    c.fs.unlink(ROOT_INO, b"open").unwrap();
    assert_eq!(c.fs.lookup(ROOT_INO, b"open"), Err(FsError::NotFound));
    assert_eq!(c.fs.read(f, 9_990, 100).unwrap(), vec![7u8; 10]);
    assert_eq!(c.fs.getattr(f).unwrap().nlink, 0);
    c.fs.release(f).unwrap();
    assert_eq!(c.fs.getattr(f), Err(FsError::NotFound));
    assert_eq!(c.fs.statfs().unwrap().inodes_free, free_before);
    assert!(c.fs.fsck(false).unwrap().is_clean());
}

#[test]
fn rename_every_case() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let a = file(&c, ROOT_INO, "a");
    let b = file(&c, ROOT_INO, "b");
    // Replace a file.
    c.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RenameFlags::default()).unwrap();
    assert_eq!(c.fs.lookup(ROOT_INO, b"b").unwrap().ino, a);
    assert_eq!(c.fs.getattr(b), Err(FsError::NotFound));
    assert_eq!(c.fs.lookup(ROOT_INO, b"a"), Err(FsError::NotFound));
    // Into another directory, and back.
    let d = c.fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap().ino;
    c.fs.rename(ROOT_INO, b"b", d, b"moved", RenameFlags::default()).unwrap();
    assert_eq!(names(&c, d), vec!["moved"]);
    // A directory over an empty directory; over a non-empty one; file over dir; dir over file.
    let e = c.fs.mkdir(ROOT_INO, b"e", 0o755, ME).unwrap().ino;
    let x = c.fs.mkdir(ROOT_INO, b"x", 0o755, ME).unwrap().ino;
    c.fs.rename(ROOT_INO, b"x", ROOT_INO, b"e", RenameFlags::default()).unwrap();
    assert_eq!(c.fs.lookup(ROOT_INO, b"e").unwrap().ino, x);
    assert_eq!(c.fs.getattr(e), Err(FsError::NotFound));
    assert_eq!(c.fs.rename(ROOT_INO, b"e", ROOT_INO, b"d", RenameFlags::default()), Err(FsError::NotEmpty));
    let f = file(&c, ROOT_INO, "f");
    assert_eq!(c.fs.rename(ROOT_INO, b"f", ROOT_INO, b"e", RenameFlags::default()), Err(FsError::IsDir));
    assert_eq!(c.fs.rename(ROOT_INO, b"e", ROOT_INO, b"f", RenameFlags::default()), Err(FsError::NotDir));
    // A directory into itself or its descendant.
    let inner = c.fs.mkdir(x, b"inner", 0o755, ME).unwrap().ino;
    assert!(matches!(
        c.fs.rename(ROOT_INO, b"e", inner, b"loop", RenameFlags::default()),
        Err(FsError::Invalid(_))
    ));
    assert!(matches!(
        c.fs.rename(ROOT_INO, b"e", x, b"loop", RenameFlags::default()),
        Err(FsError::Invalid(_))
    ));
    // Moving a directory fixes `..` and link counts.
    c.fs.rename(x, b"inner", d, b"inner", RenameFlags::default()).unwrap();
    assert_eq!(c.fs.lookup(inner, b"..").unwrap().ino, d);
    assert_eq!(c.fs.getattr(x).unwrap().nlink, 2);
    assert_eq!(c.fs.getattr(d).unwrap().nlink, 3);
    // NOREPLACE and EXCHANGE.
    let flags = RenameFlags { noreplace: true, ..Default::default() };
    assert_eq!(c.fs.rename(ROOT_INO, b"f", d, b"moved", flags), Err(FsError::Exists));
    let flags = RenameFlags { exchange: true, ..Default::default() };
    c.fs.rename(ROOT_INO, b"f", d, b"moved", flags).unwrap();
    assert_eq!(c.fs.lookup(d, b"moved").unwrap().ino, f);
    assert_eq!(c.fs.lookup(ROOT_INO, b"f").unwrap().ino, a);
    assert_eq!(c.fs.rename(ROOT_INO, b"zz", d, b"moved", flags), Err(FsError::NotFound));
    // Missing source; hard links to one inode.
    assert_eq!(
        c.fs.rename(ROOT_INO, b"nope", ROOT_INO, b"q", RenameFlags::default()),
        Err(FsError::NotFound)
    );
    c.fs.link(a, ROOT_INO, b"a2").unwrap();
    c.fs.rename(ROOT_INO, b"f", ROOT_INO, b"a2", RenameFlags::default()).unwrap();
    assert!(c.fs.fsck(false).unwrap().is_clean(), "{}", c.fs.fsck(false).unwrap());
}

#[test]
fn write_read_truncate_and_holes() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let f = file(&c, ROOT_INO, "f");
    assert_eq!(c.fs.write(f, 0, b"hello world").unwrap(), 11);
    assert_eq!(c.fs.read(f, 6, 100).unwrap(), b"world");
    assert_eq!(c.fs.read(f, 100, 10).unwrap(), b"");
    // A hole, then data beyond 64 KiB (the large block), then a read across both.
    c.fs.write(f, 200_000, b"far").unwrap();
    assert_eq!(c.fs.getattr(f).unwrap().size, 200_003);
    let mid = c.fs.read(f, 60_000, 10_000).unwrap();
    assert_eq!(mid, vec![0u8; 10_000]);
    assert_eq!(c.fs.read(f, 199_999, 10).unwrap(), b"\0far");
    let across = (0..70_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>();
    c.fs.write(f, 1_000, &across).unwrap();
    assert_eq!(c.fs.read(f, 1_000, 70_000).unwrap(), across);
    // Shrink, then grow: the cut part reads as zeros.
    c.fs.setattr(f, SetAttr { size: Some(5), ..Default::default() }).unwrap();
    assert_eq!(c.fs.read(f, 0, 100).unwrap(), b"hello");
    c.fs.setattr(f, SetAttr { size: Some(100_000), ..Default::default() }).unwrap();
    let all = c.fs.read(f, 0, 200_000).unwrap();
    assert_eq!(all.len(), 100_000);
    assert_eq!(&all[..5], b"hello");
    assert!(all[5..].iter().all(|b| *b == 0));
    assert_eq!(c.fs.write(ROOT_INO, 0, b"x"), Err(FsError::IsDir));
    assert_eq!(c.fs.write(f, 1 << 40, b"x"), Err(FsError::TooBig));
    c.fs.fsync(f, false).unwrap();
    assert!(c.fs.fsck(false).unwrap().is_clean(), "{}", c.fs.fsck(false).unwrap());
}

#[test]
fn setattr_modes_owners_times() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let f = file(&c, ROOT_INO, "f");
    let t = frangipani::inode::Time { secs: 1_000_000, nanos: 5 };
    let a =
        c.fs.setattr(f, SetAttr { mode: Some(0o4711), atime: Some(t), mtime: Some(t), ..Default::default() })
            .unwrap();
    assert_eq!(a.mode & 0o7777, 0o4711);
    assert_eq!((a.atime, a.mtime), (t, t));
    // A change of owner clears set-user-id, as on a local file system.
    let a = c.fs.setattr(f, SetAttr { uid: Some(7), gid: Some(8), ..Default::default() }).unwrap();
    assert_eq!((a.uid, a.gid, a.mode & 0o7777), (7, 8, 0o711));
    assert_eq!(c.fs.getattr(f).unwrap(), a);
    assert_eq!(c.fs.setattr(ROOT_INO, SetAttr { size: Some(0), ..Default::default() }), Err(FsError::IsDir));
}

#[test]
fn symlinks() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let l = c.fs.symlink(ROOT_INO, b"l", b"/some/where", ME).unwrap();
    assert_eq!(l.mode & 0o170000, 0o120000);
    assert_eq!(c.fs.readlink(l.ino).unwrap(), b"/some/where");
    let long = vec![b'x'; 4095];
    let l2 = c.fs.symlink(ROOT_INO, b"long", &long, ME).unwrap();
    assert_eq!(c.fs.readlink(l2.ino).unwrap(), long);
    assert_eq!(c.fs.symlink(ROOT_INO, b"toolong", &vec![b'x'; 4096], ME), Err(FsError::NameTooLong));
    assert_eq!(c.fs.symlink(ROOT_INO, b"l", b"x", ME), Err(FsError::Exists));
    assert!(c.fs.fsck(false).unwrap().is_clean());
}

#[test]
fn extended_attributes() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let f = file(&c, ROOT_INO, "f");
    assert_eq!(c.fs.getxattr(f, b"user.a"), Err(FsError::NoData));
    c.fs.setxattr(f, b"user.a", b"1", XattrFlags::Any).unwrap();
    c.fs.setxattr(f, b"user.b", b"two", XattrFlags::Create).unwrap();
    assert_eq!(c.fs.setxattr(f, b"user.b", b"x", XattrFlags::Create), Err(FsError::Exists));
    assert_eq!(c.fs.setxattr(f, b"user.c", b"x", XattrFlags::Replace), Err(FsError::NoData));
    c.fs.setxattr(f, b"user.a", b"one", XattrFlags::Replace).unwrap();
    assert_eq!(c.fs.getxattr(f, b"user.a").unwrap(), b"one");
    let mut names = c.fs.listxattr(f).unwrap();
    names.sort();
    assert_eq!(names, vec![b"user.a".to_vec(), b"user.b".to_vec()]);
    c.fs.removexattr(f, b"user.a").unwrap();
    assert_eq!(c.fs.removexattr(f, b"user.a"), Err(FsError::NoData));
    assert_eq!(c.fs.setxattr(f, b"user.big", &vec![0; 5000], XattrFlags::Any), Err(FsError::Range));
    assert!(c.fs.fsck(false).unwrap().is_clean());
}

#[test]
fn out_of_inodes_and_blocks_is_enospc() {
    let mut params = common::small_params();
    params.inodes = 40;
    params.small_blocks = 100;
    params.large_blocks = 2;
    let cl = Cluster::with_params(params);
    let c = cl.client(1);
    let mut made = 0;
    loop {
        match c.fs.create(ROOT_INO, format!("f{made}").as_bytes(), 0o644, 0, ME) {
            Ok(_) => made += 1,
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(made >= 30, "only {made} inodes");
    c.fs.unlink(ROOT_INO, b"f0").unwrap();
    let f = c.fs.create(ROOT_INO, b"again", 0o644, 0, ME).unwrap().ino;
    // Blocks: small ones run out.
    let mut err = None;
    for i in 0..200u64 {
        let g = c.fs.lookup(ROOT_INO, format!("f{}", 1 + i % 20).as_bytes()).unwrap().ino;
        if let Err(e) = c.fs.write(g, (i / 20) * 4096, &[1u8; 4096]) {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err, Some(FsError::NoSpace));
    let _ = f;
    assert!(c.fs.fsck(false).unwrap().is_clean(), "{}", c.fs.fsck(false).unwrap());
}

#[test]
fn statfs_counts() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let before = c.fs.statfs().unwrap();
    let f = file(&c, ROOT_INO, "f");
    c.fs.write(f, 0, &[1u8; 8192]).unwrap();
    let after = c.fs.statfs().unwrap();
    assert_eq!(before.inodes_free - 1, after.inodes_free);
    assert_eq!(before.blocks_free - 2, after.blocks_free);
    assert_eq!(after.name_max, 255);
}

#[test]
fn superblock_of_another_format_is_refused() {
    use frangipani::disk::VirtualDisk;
    let cl = Cluster::new();
    let mut sb = cl.disk.read(0, 512).unwrap();
    sb[8] = 99; // format version
    cl.disk.write(0, &sb, None).unwrap();
    let locks = cl.locks.client(1);
    let err =
        frangipani::Frangipani::mount(cl.disk.clone(), locks, frangipani::Config::default()).err().unwrap();
    assert!(err.to_string().contains("format version"), "{err}");
    let blank = std::sync::Arc::new(frangipani::disk::MemDisk::new());
    let err = frangipani::Frangipani::mount(blank, cl.locks.client(2), frangipani::Config::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a frangipani"), "{err}");
}

#[test]
fn an_open_unlinked_file_of_a_crashed_client_is_freed_by_the_next_owner_of_its_slot() {
    let cl = Cluster::new();
    let a = cl.client(1);
    let free_before = a.fs.statfs().unwrap().inodes_free;
    let f = file(&a, ROOT_INO, "doomed");
    a.fs.open(f).unwrap();
    a.fs.write(f, 0, &[9u8; 5000]).unwrap();
    a.fs.unlink(ROOT_INO, b"doomed").unwrap();
    a.fs.sync().unwrap();
    // A dies with the file still open.
    cl.locks.crash(&a.locks);
    let a_id = a.locks.id();
    a.fs.crash();
    cl.locks.free_dead(a_id);
    let again = cl.client(1);
    assert_eq!(again.fs.getattr(f), Err(FsError::NotFound), "the orphan was freed at mount");
    assert_eq!(again.fs.statfs().unwrap().inodes_free, free_before);
    let report = again.fs.fsck(false).unwrap();
    assert!(report.is_clean(), "{report}");
}

#[test]
fn a_client_that_lost_its_lease_refuses_writes() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let f = file(&c, ROOT_INO, "f");
    c.fs.callbacks().upgrade().unwrap().lease_lost();
    assert!(c.fs.is_lease_lost());
    assert_eq!(c.fs.write(f, 0, b"x"), Err(FsError::LeaseLost));
    assert_eq!(c.fs.create(ROOT_INO, b"g", 0o644, 0, ME).map(|_| ()), Err(FsError::LeaseLost));
    assert_eq!(FsError::LeaseLost.errno(), libc::EIO);
}

#[test]
fn an_overwrite_in_place_updates_the_modification_time() {
    let cl = Cluster::new();
    let c = cl.client(1);
    let f = file(&c, ROOT_INO, "f");
    c.fs.write(f, 0, b"abcdefghij").unwrap();
    let before = c.fs.getattr(f).unwrap().mtime;
    std::thread::sleep(std::time::Duration::from_millis(20));
    c.fs.write(f, 2, b"XY").unwrap();
    let after = c.fs.getattr(f).unwrap();
    assert!(after.mtime > before, "mtime {:?} did not move past {:?}", after.mtime, before);
    assert_eq!(after.size, 10);
}
