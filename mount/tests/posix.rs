//! Ordinary tools and system calls against a real mount of one client.

mod common;

use common::{cpath, errno, fuse_available, have, sh, sh_output, Mount};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

macro_rules! mount_or_skip {
    ($name:expr) => {{
        if !fuse_available($name) {
            return;
        }
        Mount::start()
    }};
}

#[test]
fn shell_tools_create_move_link_and_change_files() {
    let m = mount_or_skip!("shell_tools_create_move_link_and_change_files");
    let d = m.dir();
    sh(d, "echo hello > a && test \"$(cat a)\" = hello");
    sh(d, "mkdir -p x/y/z && test -d x/y/z && ls x/y | grep -qx z");
    sh(d, "mv a x/y/b && test ! -e a && test \"$(cat x/y/b)\" = hello");
    sh(d, "ln x/y/b hard && test \"$(stat -c %h hard)\" = 2 && test \"$(stat -c %i hard)\" = \"$(stat -c %i x/y/b)\"");
    sh(d, "ln -s x/y/b soft && test \"$(readlink soft)\" = x/y/b && test \"$(cat soft)\" = hello");
    sh(d, "chmod 0640 hard && test \"$(stat -c %a x/y/b)\" = 640");
    sh(d, "chown 123:456 hard && test \"$(stat -c %u:%g x/y/b)\" = 123:456");
    sh(d, "truncate -s 100000 hard && test \"$(stat -c %s hard)\" = 100000");
    sh(d, "truncate -s 3 hard && test \"$(cat hard)\" = hel");
    sh(d, "touch -d '2001-02-03 04:05:06' hard && test \"$(stat -c %Y hard)\" = \"$(date -d '2001-02-03 04:05:06' +%s)\"");
    sh(d, "rm soft hard x/y/b && rmdir x/y/z x/y x && test -z \"$(ls -A)\"");
    // A name in use, a missing name, a non-empty directory.
    sh(
        d,
        "mkdir e && touch e/f && ! rmdir e 2>/dev/null && ! cat missing 2>/dev/null && ! mkdir e 2>/dev/null",
    );
    let names: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["e".to_string()]);
    m.stop();
}

#[test]
fn two_appenders_lose_no_line() {
    let m = mount_or_skip!("two_appenders_lose_no_line");
    let d = m.dir();
    let writer = |tag: &str| {
        let script = format!("for i in $(seq 1 300); do echo \"{tag} $i\" >> log; done");
        std::process::Command::new("sh").arg("-c").arg(script).current_dir(d).spawn().unwrap()
    };
    let (mut a, mut b) = (writer("A"), writer("B"));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let log = std::fs::read_to_string(d.join("log")).unwrap();
    for tag in ["A", "B"] {
        let seen: Vec<u32> = log
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{tag} ")))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(seen, (1..=300).collect::<Vec<_>>(), "writer {tag}");
    }
    assert_eq!(log.lines().count(), 600);
    m.stop();
}

/// Deterministic bytes (xorshift), so a copy can be checked without a rand dependency.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_copied_tree_diffs_clean() {
    let m = mount_or_skip!("a_copied_tree_diffs_clean");
    let src = m.scratch().join("src");
    std::fs::create_dir_all(src.join("deep/er/still")).unwrap();
    let sizes = [0usize, 1, 511, 4095, 4096, 4097, 65535, 65536, 65537, 300_000, 2_000_000];
    for (i, len) in sizes.iter().enumerate() {
        std::fs::write(src.join(format!("f{i}")), bytes(i as u64 + 1, *len)).unwrap();
        std::fs::write(src.join(format!("deep/er/still/g{i}")), bytes(i as u64 + 100, *len / 3)).unwrap();
    }
    std::os::unix::fs::symlink("../f3", src.join("deep/link")).unwrap();
    std::fs::create_dir(src.join("empty")).unwrap();
    for i in 0..200 {
        std::fs::write(src.join("deep/er").join(format!("many-{i:03}")), format!("{i}\n")).unwrap();
    }
    let dst = m.dir().join("dst");
    sh(m.dir(), &format!("cp -a {} {}", src.display(), dst.display()));
    sh(m.dir(), &format!("diff -r {} {}", src.display(), dst.display()));
    // And back out, through the kernel's page cache and fresh reads.
    let back = m.scratch().join("back");
    sh(
        m.dir(),
        &format!(
            "cp -a {} {} && diff -r {} {}",
            dst.display(),
            back.display(),
            src.display(),
            back.display()
        ),
    );
    sh(m.dir(), "rm -rf dst && test -z \"$(ls -A)\"");
    m.stop();
}

#[test]
fn extended_attributes() {
    let m = mount_or_skip!("extended_attributes");
    let f = m.dir().join("f");
    std::fs::write(&f, b"x").unwrap();
    let p = cpath(&f);
    let set = |name: &str, value: &[u8], flags: i32| {
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid C strings and buffer.
        let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    };
    let get = |name: &str| {
        let n = std::ffi::CString::new(name).unwrap();
        let mut buf = vec![0u8; 1024];
        // SAFETY: valid C strings and buffer.
        let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if rc < 0 {
            return Err(errno());
        }
        buf.truncate(rc as usize);
        Ok(buf)
    };
    set("user.color", b"blue", 0).unwrap();
    set("user.empty", b"", 0).unwrap();
    assert_eq!(get("user.color"), Ok(b"blue".to_vec()));
    assert_eq!(get("user.empty"), Ok(Vec::new()));
    assert_eq!(set("user.color", b"red", libc::XATTR_CREATE), Err(libc::EEXIST));
    assert_eq!(set("user.shape", b"round", libc::XATTR_REPLACE), Err(libc::ENODATA));
    set("user.color", b"red", libc::XATTR_REPLACE).unwrap();
    assert_eq!(get("user.color"), Ok(b"red".to_vec()));
    assert_eq!(get("user.missing"), Err(libc::ENODATA));
    // Size query, and a buffer too small.
    let n = std::ffi::CString::new("user.color").unwrap();
    // SAFETY: a null buffer of size 0 asks for the size.
    let size = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(size, 3);
    let mut small = [0u8; 1];
    // SAFETY: valid buffer of the given size.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 1) };
    assert!(rc < 0 && errno() == libc::ERANGE);
    let mut list = vec![0u8; 256];
    // SAFETY: valid buffer of the given size.
    let len = unsafe { libc::listxattr(p.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(len > 0);
    let mut names: Vec<&[u8]> = list[..len as usize].split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    names.sort();
    assert_eq!(names, vec![&b"user.color"[..], &b"user.empty"[..]]);
    // SAFETY: valid C strings.
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }, 0);
    assert_eq!(get("user.color"), Err(libc::ENODATA));
    if have("setfattr") && have("getfattr") {
        sh(
            m.dir(),
            "setfattr -n user.tool -v works f && getfattr --only-values -n user.tool f | grep -qx works",
        );
    } else {
        eprintln!("note: setfattr/getfattr not installed (package attr); checked through libc only");
    }
    m.stop();
}

#[test]
fn statfs_reports_space_and_inodes() {
    let m = mount_or_skip!("statfs_reports_space_and_inodes");
    let statvfs = |p: &Path| {
        let c = cpath(p);
        // SAFETY: zeroed statvfs is a valid out parameter.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out pointer.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s
    };
    let before = statvfs(m.dir());
    assert_eq!(before.f_bsize, 4096);
    assert!(before.f_blocks > 0 && before.f_bfree <= before.f_blocks && before.f_bavail > 0);
    assert!(before.f_files > 0 && before.f_ffree < before.f_files);
    assert_eq!(before.f_namemax, 255);
    std::fs::write(m.dir().join("f"), vec![7u8; 40_000]).unwrap();
    std::fs::create_dir(m.dir().join("d")).unwrap();
    let after = statvfs(m.dir());
    assert_eq!(after.f_ffree, before.f_ffree - 2, "two inodes taken");
    assert!(after.f_bfree < before.f_bfree, "blocks taken");
    let df = sh(m.dir(), "df -P .");
    assert!(df.contains("frangipani"), "df shows the file system:\n{df}");
    m.stop();
}

fn renameat2(dir: &Path, from: &str, to: &str, flags: u32) -> Result<(), i32> {
    let (a, b) = (cpath(&dir.join(from)), cpath(&dir.join(to)));
    // SAFETY: valid paths; AT_FDCWD with absolute paths.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = mount_or_skip!("rename_noreplace_and_exchange");
    let d = m.dir();
    std::fs::write(d.join("a"), b"A").unwrap();
    std::fs::write(d.join("b"), b"B").unwrap();
    assert_eq!(renameat2(d, "a", "b", libc::RENAME_NOREPLACE), Err(libc::EEXIST));
    assert_eq!(std::fs::read(d.join("b")).unwrap(), b"B");
    renameat2(d, "a", "c", libc::RENAME_NOREPLACE).unwrap();
    assert!(!d.join("a").exists());
    renameat2(d, "c", "b", libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(std::fs::read(d.join("b")).unwrap(), b"A");
    assert_eq!(std::fs::read(d.join("c")).unwrap(), b"B");
    assert_eq!(renameat2(d, "c", "missing", libc::RENAME_EXCHANGE), Err(libc::ENOENT));
    // Exchange a file with a directory in another directory.
    std::fs::create_dir_all(d.join("p/q")).unwrap();
    std::fs::write(d.join("p/q/inside"), b"in").unwrap();
    renameat2(d, "c", "p/q", libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(std::fs::read(d.join("p/q")).unwrap(), b"B");
    assert_eq!(std::fs::read(d.join("c/inside")).unwrap(), b"in");
    assert_eq!(std::fs::metadata(d.join("p")).unwrap().nlink(), 2, "p lost its subdirectory");
    assert_eq!(std::fs::metadata(d).unwrap().nlink(), 4, "root gained c and has p");
    // Plain rename over an existing file, and into itself.
    std::fs::rename(d.join("b"), d.join("p/q")).unwrap();
    assert_eq!(std::fs::read(d.join("p/q")).unwrap(), b"A");
    assert_eq!(renameat2(d, "c", "c/sub", 0), Err(libc::EINVAL));
    m.stop();
}

#[test]
fn an_unlinked_open_file_lives_until_closed() {
    let m = mount_or_skip!("an_unlinked_open_file_lives_until_closed");
    let path = m.dir().join("doomed");
    let mut f =
        std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    f.write_all(&vec![9u8; 100_000]).unwrap();
    let inodes_free = |d: &Path| {
        let c = cpath(d);
        // SAFETY: zeroed statvfs is a valid out parameter.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and out pointer.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_ffree
    };
    let with_file = inodes_free(m.dir());
    std::fs::remove_file(&path).unwrap();
    assert!(!path.exists());
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    f.write_all(b"more").unwrap();
    f.seek(SeekFrom::Start(99_998)).unwrap();
    let mut tail = String::new();
    f.read_to_string(&mut tail).unwrap();
    assert_eq!(tail.as_bytes(), b"\x09\x09more");
    assert_eq!(inodes_free(m.dir()), with_file, "still allocated while open");
    drop(f);
    // The last close frees it (release reaches the file system asynchronously).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while inodes_free(m.dir()) != with_file + 1 {
        assert!(std::time::Instant::now() < deadline, "inode not freed after the last close");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    m.stop();
}

#[test]
fn special_files_fifo_socket_device() {
    let m = mount_or_skip!("special_files_fifo_socket_device");
    let d = m.dir();
    sh(d, "mkfifo fifo && test -p fifo");
    sh(d, "mknod chr c 1 3 && test -c chr && test \"$(stat -c %t:%T chr)\" = 1:3");
    sh(d, "mknod blk b 7 0 && test -b blk");
    let sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
    assert!(std::fs::symlink_metadata(d.join("sock")).unwrap().file_type().is_socket());
    drop(sock);
    // A FIFO on the mount carries data between two processes (the kernel's pipe).
    sh(d, "(echo through > fifo &) && test \"$(cat fifo)\" = through");
    sh(d, "rm fifo chr blk sock && test -z \"$(ls -A)\"");
    m.stop();
}

#[test]
fn fallocate_modes() {
    let m = mount_or_skip!("fallocate_modes");
    let path = m.dir().join("f");
    let f =
        std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let fallocate = |mode: i32, off: i64, len: i64| {
        // SAFETY: a valid open descriptor.
        let rc = unsafe { libc::fallocate(fd, mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    };
    fallocate(0, 0, 1 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    fallocate(libc::FALLOC_FL_KEEP_SIZE, 0, 2 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    std::fs::write(&path, vec![1u8; 10_000]).unwrap();
    fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 100, 5000).unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 10_000);
    assert!(data[..100].iter().all(|b| *b == 1) && data[100..5100].iter().all(|b| *b == 0));
    assert!(data[5100..].iter().all(|b| *b == 1));
    fallocate(libc::FALLOC_FL_ZERO_RANGE, 9_000, 2_000).unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 11_000);
    assert!(data[5100..9000].iter().all(|b| *b == 1) && data[9000..].iter().all(|b| *b == 0));
    assert_eq!(fallocate(libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096), Err(libc::EOPNOTSUPP));
    drop(f);
    m.stop();
}

#[test]
fn file_locks_hold_between_processes() {
    let m = mount_or_skip!("file_locks_hold_between_processes");
    let d = m.dir();
    std::fs::write(d.join("lockfile"), b"").unwrap();
    if have("flock") {
        // One process holds an exclusive flock; another cannot take it without waiting.
        let mut holder = std::process::Command::new("flock")
            .args(["lockfile", "-c", "touch held; sleep 3"])
            .current_dir(d)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !d.join("held").exists() {
            assert!(std::time::Instant::now() < deadline, "holder never took the lock");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!sh_output(d, "flock -n lockfile true").status.success(), "flock granted twice");
        assert!(holder.wait().unwrap().success());
        sh(d, "flock -n lockfile true");
    }
    // POSIX record locks on separate open file descriptions (OFD locks) conflict.
    let a = std::fs::OpenOptions::new().read(true).write(true).open(d.join("lockfile")).unwrap();
    let b = std::fs::OpenOptions::new().read(true).write(true).open(d.join("lockfile")).unwrap();
    let lock = |f: &std::fs::File, typ: i32, start: i64, len: i64| {
        // SAFETY: zeroed flock is valid; fields set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        // SAFETY: a valid descriptor and flock.
        let rc = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(f), libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    };
    lock(&a, libc::F_WRLCK, 0, 100).unwrap();
    assert_eq!(lock(&b, libc::F_WRLCK, 50, 10), Err(libc::EAGAIN));
    lock(&b, libc::F_WRLCK, 100, 10).unwrap();
    lock(&a, libc::F_UNLCK, 0, 100).unwrap();
    lock(&b, libc::F_RDLCK, 0, 10).unwrap();
    drop((a, b));
    m.stop();
}

#[test]
fn unix_permissions_hold_for_other_users() {
    let m = mount_or_skip!("unix_permissions_hold_for_other_users");
    if !have("setpriv") {
        eprintln!("!!! SKIPPED unix_permissions_hold_for_other_users: setpriv (util-linux) missing !!!");
        return;
    }
    let d = m.dir();
    sh(d, "echo public > public && chmod 644 public && echo secret > secret && chmod 600 secret");
    sh(d, "mkdir shared && chmod 1777 shared && mkdir closed && chmod 700 closed");
    let as_nobody = |script: &str| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
            .current_dir(d)
            .output()
            .unwrap()
    };
    let ok = |script: &str| {
        let out = as_nobody(script);
        assert!(out.status.success(), "as nobody: {script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let denied = |script: &str| {
        let out = as_nobody(script);
        assert!(!out.status.success(), "as nobody, should fail: {script}");
    };
    ok("test \"$(cat public)\" = public");
    denied("cat secret");
    denied("echo x >> public");
    denied("touch newfile");
    denied("ls closed");
    ok("echo mine > shared/mine && test \"$(stat -c %u:%g shared/mine)\" = 65534:65534");
    // The sticky bit: root's file in the shared directory cannot be removed by others.
    sh(d, "touch shared/roots");
    denied("rm -f shared/roots");
    denied("chmod 777 public");
    ok("chmod 600 shared/mine");
    assert_eq!(std::fs::metadata(d.join("shared/mine")).unwrap().permissions().mode() & 0o777, 0o600);
    m.stop();
}
