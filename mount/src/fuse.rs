//! The FUSE file system: fuser's requests answered by the Frangipani library.
//!
//! Each operation is a small helper returning `Result<T, Errno>`; only the handler touches
//! the reply. What is not supported answers ENOSYS (or EOPNOTSUPP where the kernel expects
//! it) explicitly. Permissions are the kernel's job (`default_permissions`); the caller's
//! uid and gid only name the owner of what it creates.
//!
//! Requests are answered by several threads (fuser's `n_threads`, each with its own clone
//! of the FUSE device), so a request waiting for a lock held elsewhere does not hold up the
//! others. Handlers whose request keeps pages or a directory locked in the kernel declare
//! them ([`Invalidator::hold`]) so that revocations do not wait on them, and handlers whose
//! reply may be cached by the kernel note the epoch first (see [`crate::notify`]).
//!
//! File locks (flock and POSIX record locks) are negotiated with the kernel and kept by
//! [`crate::filelock`], across machines through the lock service; a blocking `setlk` waits
//! on a thread of its own, so it never ties up a request thread.

use crate::filelock::{self, FileLocks, Want};
use crate::notify::Invalidator;
use frangipani::inode::{Time, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use frangipani::{Attr, Caller, Frangipani, FsError, SetAttr, XattrFlags, ROOT_INO};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents,
    PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyPoll,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust attributes and names without asking again: a backstop to
/// the invalidations sent on revocation.
pub const TTL: Duration = Duration::from_secs(1);
/// The root directory.
pub const ROOT: INodeNo = INodeNo(ROOT_INO);
const _: () = assert!(ROOT.0 == INodeNo::ROOT.0, "Frangipani's root must be FUSE's root");
/// Entries asked of Frangipani per `readdir` request (the reply buffer bounds what is sent).
const READDIR_BATCH: usize = 128;
/// Bytes written per call when zeroing a range (fallocate).
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Block size reported to `stat`.
const BLKSIZE: u32 = 4096;

type Res<T> = Result<T, Errno>;

/// A Frangipani client as a fuser file system.
pub struct FrangipaniFs {
    fs: Arc<Frangipani>,
    inval: Arc<Invalidator>,
    file_locks: Arc<FileLocks>,
    /// File handles are only counted (Frangipani keys open files by inode).
    next_fh: AtomicU64,
}

impl FrangipaniFs {
    /// Serves `fs`, noting in `inval` the names handed to the kernel and keeping file locks
    /// in `file_locks`.
    pub fn new(fs: Arc<Frangipani>, inval: Arc<Invalidator>, file_locks: Arc<FileLocks>) -> FrangipaniFs {
        FrangipaniFs { fs, inval, file_locks, next_fh: AtomicU64::new(1) }
    }

    fn fh(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed))
    }

    /// Replies with a new or found entry, remembering its name for invalidation.
    fn reply_entry(&self, parent: u64, name: &OsStr, epoch: u64, res: Res<Attr>, reply: ReplyEntry) {
        match res.and_then(|a| Ok((file_attr(&a)?, a.generation))) {
            Ok((attr, generation)) => {
                self.inval.note_entry(parent, name);
                reply.entry(&TTL, &attr, Generation(generation));
                self.inval.recheck_entry(parent, name, epoch);
            }
            Err(e) => reply.error(e),
        }
    }

    fn do_setattr(&self, ino: u64, set: SetAttr) -> Res<FileAttr> {
        file_attr(&self.fs.setattr(ino, set).map_err(|e| errno("setattr", e))?)
    }

    fn do_mknod(&self, req: &Request, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Res<Attr> {
        match mode & S_IFMT {
            S_IFREG | S_IFIFO | S_IFSOCK | S_IFCHR | S_IFBLK | 0 => {}
            _ => return Err(Errno::EINVAL),
        }
        self.fs.create(parent, name.as_bytes(), mode, rdev, caller(req)).map_err(|e| errno("mknod", e))
    }

    fn do_create(&self, req: &Request, parent: u64, name: &OsStr, mode: u32, flags: i32) -> Res<Attr> {
        let mode = if mode & S_IFMT == 0 { mode | S_IFREG } else { mode };
        let attr = match self.fs.create(parent, name.as_bytes(), mode, 0, caller(req)) {
            // Created by someone else since the kernel looked: open it, as open(2) would.
            Err(FsError::Exists) if flags & libc::O_EXCL == 0 => {
                let attr = self.fs.lookup(parent, name.as_bytes()).map_err(|e| errno("create", e))?;
                match attr.mode & S_IFMT {
                    S_IFDIR => return Err(Errno::EISDIR),
                    S_IFREG if flags & libc::O_TRUNC != 0 => {
                        self.fs.setattr(attr.ino, SetAttr { size: Some(0), ..SetAttr::default() })
                    }
                    _ => Ok(attr),
                }
                .map_err(|e| errno("create", e))?
            }
            other => other.map_err(|e| errno("create", e))?,
        };
        self.fs.open(attr.ino).map_err(|e| errno("open", e))
    }

    fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.contains(RenameFlags::RENAME_WHITEOUT)
            || flags.contains(RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE)
        {
            return Err(Errno::EINVAL);
        }
        let flags = frangipani::RenameFlags {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        self.fs
            .rename(parent, name.as_bytes(), newparent, newname.as_bytes(), flags)
            .map_err(|e| errno("rename", e))
    }

    fn do_readdir(&self, ino: u64, offset: u64, reply: &mut ReplyDirectory) -> Res<()> {
        let items = self.fs.readdir(ino, offset, READDIR_BATCH).map_err(|e| errno("readdir", e))?;
        for item in items {
            let Some(kind) = file_type(item.kind) else {
                tracing::warn!(
                    dir = ino,
                    ino = item.ino,
                    kind = item.kind,
                    "directory entry of unknown type skipped"
                );
                continue;
            };
            if reply.add(INodeNo(item.ino), item.cookie, kind, OsStr::from_bytes(&item.name)) {
                break; // the buffer is full: the kernel asks again from the last cookie sent
            }
        }
        Ok(())
    }

    fn do_statfs(&self) -> Res<frangipani::StatFs> {
        self.fs.statfs().map_err(|e| errno("statfs", e))
    }

    fn do_setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32, position: u32) -> Res<()> {
        if position != 0 {
            return Err(Errno::EINVAL);
        }
        let flags = match flags {
            0 => XattrFlags::Any,
            libc::XATTR_CREATE => XattrFlags::Create,
            libc::XATTR_REPLACE => XattrFlags::Replace,
            _ => return Err(Errno::EINVAL),
        };
        self.fs.setxattr(ino, name.as_bytes(), value, flags).map_err(|e| errno("setxattr", e))
    }

    fn do_listxattr(&self, ino: u64) -> Res<Vec<u8>> {
        let names = self.fs.listxattr(ino).map_err(|e| errno("listxattr", e))?;
        let mut out = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    fn do_access(&self, req: &Request, ino: u64, mask: AccessFlags) -> Res<()> {
        let attr = self.fs.getattr(ino).map_err(|e| errno("access", e))?;
        if permits(&attr, req.uid(), req.gid(), mask.bits()) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    /// fallocate: mode 0 and KEEP_SIZE reserve nothing on the thin-provisioned disk (a
    /// write may still find it full) but set the size as asked; PUNCH_HOLE and ZERO_RANGE
    /// write zeros. The kernel holds the inode's lock against this machine's writers; a
    /// writer on another machine could race with the size change.
    fn do_fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        let supported = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let attr = self.fs.getattr(ino).map_err(|e| errno("fallocate", e))?;
        if attr.mode & S_IFMT != S_IFREG {
            return Err(Errno::ENODEV);
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            self.zero(ino, offset, end.min(attr.size))?;
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > attr.size {
            self.fs
                .setattr(ino, SetAttr { size: Some(end), ..SetAttr::default() })
                .map_err(|e| errno("fallocate", e))?;
        }
        Ok(())
    }

    /// Writes zeros over `[from, to)`.
    fn zero(&self, ino: u64, from: u64, to: u64) -> Res<()> {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.fs.write(ino, at, &zeros[..n]).map_err(|e| errno("fallocate", e))?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Filesystem for FrangipaniFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Cached pages go when a file's mtime or size changes under them; symlink targets
        // are cached (invalidated like data); lookups in one directory run in parallel; file
        // locks come here to be held across machines.
        for flag in [
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::info!(?flag, "kernel lacks this FUSE capability");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.file_locks.close();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _held = self.inval.hold([parent.0]);
        let epoch = self.inval.epoch(parent.0);
        let res = self.fs.lookup(parent.0, name.as_bytes()).map_err(|e| errno("lookup", e));
        self.reply_entry(parent.0, name, epoch, res, reply);
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        // Inodes are named by number on the disk: nothing is kept per lookup.
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let epoch = self.inval.epoch(ino.0);
        match self.fs.getattr(ino.0).map_err(|e| errno("getattr", e)).and_then(|a| file_attr(&a)) {
            Ok(attr) => {
                reply.attr(&TTL, &attr);
                self.inval.recheck_inode(ino.0, epoch);
            }
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _held = self.inval.hold([ino.0]);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_or_now),
            mtime: mtime.map(time_or_now),
            ctime: ctime.map(to_time),
        };
        match self.do_setattr(ino.0, set) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _held = self.inval.hold([parent.0]);
        let epoch = self.inval.epoch(parent.0);
        let res = self.do_mknod(req, parent.0, name, mode, rdev);
        self.reply_entry(parent.0, name, epoch, res, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let _held = self.inval.hold([parent.0]);
        let epoch = self.inval.epoch(parent.0);
        let res = self.fs.mkdir(parent.0, name.as_bytes(), mode, caller(req)).map_err(|e| errno("mkdir", e));
        self.reply_entry(parent.0, name, epoch, res, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _held = self.inval.hold([parent.0]);
        match self.fs.unlink(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _held = self.inval.hold([parent.0]);
        match self.fs.rmdir(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let _held = self.inval.hold([parent.0]);
        let epoch = self.inval.epoch(parent.0);
        let res = self
            .fs
            .symlink(parent.0, link_name.as_bytes(), target.as_os_str().as_bytes(), caller(req))
            .map_err(|e| errno("symlink", e));
        self.reply_entry(parent.0, link_name, epoch, res, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _held = self.inval.hold([parent.0, newparent.0]);
        match self.do_rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => {
                // The kernel moves its entry to the new name (and, for an exchange, the
                // other one back): both may now be cached.
                self.inval.note_entry(newparent.0, newname);
                self.inval.note_entry(parent.0, name);
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let _held = self.inval.hold([newparent.0]);
        let epoch = self.inval.epoch(newparent.0);
        let res = self.fs.link(ino.0, newparent.0, newname.as_bytes()).map_err(|e| errno("link", e));
        self.reply_entry(newparent.0, newname, epoch, res, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Pages stay cached across opens: revocations invalidate them.
        match self.fs.open(ino.0) {
            Ok(_) => reply.opened(self.fh(), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno("open", e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _held = self.inval.hold([ino.0]);
        let epoch = self.inval.epoch(ino.0);
        match self.fs.read(ino.0, offset, size as usize) {
            Ok(data) => {
                reply.data(&data);
                self.inval.recheck_inode(ino.0, epoch);
            }
            Err(e) => reply.error(errno("read", e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _held = self.inval.hold([ino.0]);
        match self.fs.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // Close does not make data durable (fsync does); it drops the closer's POSIX locks.
        self.file_locks.release_owner(ino.0, lock_owner.0);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The last close of an open file drops its flock.
        if let Some(owner) = lock_owner {
            self.file_locks.release_owner(ino.0, owner.0);
        }
        match self.fs.release(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("release", e)),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(ino.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Counted as open, so a directory removed while open stays readable (and empty).
        match self.fs.open(ino.0) {
            Ok(a) if a.mode & S_IFMT != S_IFDIR => {
                let _ = self.fs.release(ino.0);
                reply.error(Errno::ENOTDIR);
            }
            Ok(_) => reply.opened(self.fh(), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _held = self.inval.hold([ino.0]);
        match self.do_readdir(ino.0, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        // Not negotiated (FUSE_DO_READDIRPLUS): plain readdir and lookups serve instead.
        reply.error(Errno::ENOSYS);
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        match self.fs.release(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("releasedir", e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(ino.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsyncdir", e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.do_statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_free,
                s.inodes,
                s.inodes_free,
                s.block_bytes,
                s.name_max,
                s.block_bytes,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        match self.do_setxattr(ino.0, name, value, flags, position) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => reply_xattr(&v, size, reply),
            Err(e) => reply.error(errno("getxattr", e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.do_listxattr(ino.0) {
            Ok(list) => reply_xattr(&list, size, reply),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.removexattr(ino.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("removexattr", e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only asked without default_permissions; answered from the mode bits alone.
        match self.do_access(req, ino.0, mask) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _held = self.inval.hold([parent.0]);
        let epoch = self.inval.epoch(parent.0);
        match self.do_create(req, parent.0, name, mode, flags).and_then(|a| Ok((file_attr(&a)?, a))) {
            Ok((attr, a)) => {
                self.inval.note_entry(parent.0, name);
                reply.created(&TTL, &attr, Generation(a.generation), self.fh(), FopenFlags::FOPEN_KEEP_CACHE);
                self.inval.recheck_entry(parent.0, name, epoch);
            }
            Err(e) => reply.error(e),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let res = Want::from_kernel(lock_owner.0, start, end, typ, pid)
            .and_then(|want| self.file_locks.test(ino.0, want));
        match res {
            Ok(Some(r)) => {
                let typ = if r.write { libc::F_WRLCK } else { libc::F_RDLCK };
                reply.locked(r.start, r.end, typ, r.pid);
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(e),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let want = match Want::from_kernel(lock_owner.0, start, end, typ, pid) {
            Ok(w) => w,
            Err(e) => return reply.error(e),
        };
        if !sleep {
            return match self.file_locks.set(ino.0, want, filelock::Wait::Try) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        // F_SETLKW may wait for long: on a thread of its own, which owns the reply.
        let (locks, tid) = (self.file_locks.clone(), req.pid());
        let spawned = std::thread::Builder::new().name("setlkw".into()).spawn(move || {
            match locks.set(ino.0, want, filelock::Wait::Block { tid }) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
        if let Err(e) = spawned {
            // The reply went with the closure: dropping it answers EIO.
            tracing::error!("start a thread for a blocking lock: {e}");
        }
    }

    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // ENOSYS makes the kernel treat files as always ready, as local file systems are.
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _held = self.inval.hold([ino.0]);
        match self.do_fallocate(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        // ENOSYS: the kernel answers SEEK_DATA/SEEK_HOLE itself (all data, hole at the end).
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // ENOSYS: the kernel copies through read and write instead.
        reply.error(Errno::ENOSYS);
    }
}

/// The errno for a file system error, logged when it is an I/O failure (the errors a
/// caller cannot explain by what it asked).
fn errno(op: &str, e: FsError) -> Errno {
    let code = e.errno();
    if code == libc::EIO {
        tracing::error!(op, "{e}");
    }
    Errno::from_i32(code)
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn reply_xattr(bytes: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(bytes.len() as u32);
    } else if bytes.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(bytes);
    }
}

/// Whether the mode bits let `uid`/`gid` do `mask` (R_OK, W_OK, X_OK).
fn permits(attr: &Attr, uid: u32, gid: u32, mask: i32) -> bool {
    let want = (mask & 0o7) as u32;
    if uid == 0 {
        // Root may do anything but execute a file that nobody may execute.
        let executable = attr.mode & S_IFMT == S_IFDIR || attr.mode & 0o111 != 0;
        return want & libc::X_OK as u32 == 0 || executable;
    }
    let bits = if uid == attr.uid {
        attr.mode >> 6
    } else if gid == attr.gid {
        attr.mode >> 3
    } else {
        attr.mode
    } & 0o7;
    want & !bits == 0
}

fn file_type(mode: u32) -> Option<FileType> {
    Some(match mode & S_IFMT {
        S_IFREG => FileType::RegularFile,
        S_IFDIR => FileType::Directory,
        S_IFLNK => FileType::Symlink,
        S_IFIFO => FileType::NamedPipe,
        S_IFSOCK => FileType::Socket,
        S_IFCHR => FileType::CharDevice,
        S_IFBLK => FileType::BlockDevice,
        _ => return None,
    })
}

/// Frangipani's attributes as the kernel wants them.
fn file_attr(a: &Attr) -> Res<FileAttr> {
    let Some(kind) = file_type(a.mode) else {
        tracing::error!(ino = a.ino, mode = a.mode, "inode of unknown type");
        return Err(Errno::EIO);
    };
    Ok(FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.ctime),
        kind,
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    })
}

fn to_system_time(t: Time) -> SystemTime {
    let whole = Duration::from_secs(t.secs.unsigned_abs());
    let at = if t.secs >= 0 { UNIX_EPOCH.checked_add(whole) } else { UNIX_EPOCH.checked_sub(whole) };
    at.and_then(|s| s.checked_add(Duration::from_nanos(t.nanos.into()))).unwrap_or(UNIX_EPOCH)
}

fn to_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
        Err(before) => {
            let d = before.duration();
            match d.subsec_nanos() {
                0 => Time { secs: -(d.as_secs() as i64), nanos: 0 },
                n => Time { secs: -(d.as_secs() as i64) - 1, nanos: 1_000_000_000 - n },
            }
        }
    }
}

fn time_or_now(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::SpecificTime(t) => to_time(t),
        TimeOrNow::Now => Time::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_both_sides_of_the_epoch() {
        for t in [
            Time { secs: 0, nanos: 0 },
            Time { secs: 1_700_000_000, nanos: 123 },
            Time { secs: -1, nanos: 500_000_000 },
            Time { secs: -100, nanos: 0 },
        ] {
            assert_eq!(to_time(to_system_time(t)), t);
        }
    }

    #[test]
    fn mode_bits_decide_access() {
        let attr = Attr {
            ino: 2,
            mode: S_IFREG | 0o640,
            nlink: 1,
            uid: 10,
            gid: 20,
            size: 0,
            blocks: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
            rdev: 0,
            generation: 1,
        };
        assert!(permits(&attr, 10, 0, libc::R_OK | libc::W_OK));
        assert!(permits(&attr, 11, 20, libc::R_OK));
        assert!(!permits(&attr, 11, 20, libc::W_OK));
        assert!(!permits(&attr, 11, 21, libc::R_OK));
        assert!(permits(&attr, 0, 0, libc::R_OK | libc::W_OK));
        assert!(!permits(&attr, 0, 0, libc::X_OK));
        assert_eq!(file_type(attr.mode), Some(FileType::RegularFile));
        assert_eq!(file_type(0), None);
    }
}
