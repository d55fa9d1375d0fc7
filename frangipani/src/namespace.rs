//! Names: lookup, create, mkdir, symlink, link, unlink, rmdir, rename, readdir.
//!
//! Operations over several inodes find the inodes they need with shared locks, then take
//! every lock they need exclusively in inode order, check that what they looked up has
//! not changed, and start over if it has.

use crate::dir::{self, DirEntry};
use crate::error::{FsError, FsResult};
use crate::fs::{lock, Frangipani};
use crate::inode::{Inode, Time, S_IFDIR, S_IFLNK, S_IFMT};
use crate::layout::{Bitmap, ROOT_INO};
use crate::locks::{LockName, Mode};
use crate::sector::PAYLOAD_BYTES;
use crate::txn::{MetaSectors, Pool, Txn};

/// Longest symlink target.
pub const SYMLINK_MAX: usize = 4095;
/// Most hard links to one inode.
pub const LINK_MAX: u32 = 65_000;
/// How many times an operation retries when what it looked up changed under it.
const RETRIES_MAX: usize = 1000;

/// An inode's attributes, as `stat` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Type and permissions.
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Bytes.
    pub size: u64,
    /// 512-byte units allocated (an estimate for sparse files).
    pub blocks: u64,
    /// Last access.
    pub atime: Time,
    /// Last modification.
    pub mtime: Time,
    /// Last status change.
    pub ctime: Time,
    /// Device number.
    pub rdev: u32,
    /// Generation of the inode number.
    pub generation: u64,
}

impl Attr {
    pub(crate) fn of(ino: u64, i: &Inode) -> Attr {
        let small = i.small.iter().filter(|b| **b != 0).count() as u64 * 8;
        let large =
            if i.large != 0 { i.size.saturating_sub(crate::layout::SMALL_LIMIT).div_ceil(512) } else { 0 };
        Attr {
            ino,
            mode: i.mode,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            size: i.size,
            blocks: small + large,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            rdev: i.rdev,
            generation: i.generation,
        }
    }
}

/// One directory entry as `readdir` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirItem {
    /// Where a later `readdir` resumes after this entry.
    pub cookie: u64,
    /// The name.
    pub name: Vec<u8>,
    /// The inode.
    pub ino: u64,
    /// The type bits (`S_IFDIR`...).
    pub kind: u32,
}

/// Flags of `rename`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with EEXIST if the target exists.
    pub noreplace: bool,
    /// Swap source and target (both must exist).
    pub exchange: bool,
}

/// Who is asking, for the owner of new files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn kind_byte(mode: u32) -> u8 {
    ((mode & S_IFMT) >> 12) as u8
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > dir::NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid(format!("bad name {:?}", String::from_utf8_lossy(name))));
    }
    Ok(())
}

/// Directory operations inside a transaction (the directory's lock is held).
pub(crate) fn dir_lookup(txn: &mut Txn<'_>, dir_ino: u64, name: &[u8]) -> FsResult<Option<DirEntry>> {
    let mut inode = txn.live_inode(dir_ino)?;
    if !inode.is_dir() {
        return Err(FsError::NotDir);
    }
    let mut ms = MetaSectors::new(txn, dir_ino, &mut inode);
    dir::lookup(&mut ms, name).map_err(|e| ms.error(e))
}

/// Runs a directory mutation, then writes the directory inode (its blocks, times, size).
fn dir_change<T>(
    txn: &mut Txn<'_>,
    dir_ino: u64,
    change: impl FnOnce(&mut MetaSectors<'_, '_>) -> Result<T, dir::DirError>,
    nlink_delta: i32,
) -> FsResult<T> {
    let mut inode = txn.live_inode(dir_ino)?;
    if !inode.is_dir() {
        return Err(FsError::NotDir);
    }
    let out = {
        let mut ms = MetaSectors::new(txn, dir_ino, &mut inode);
        match change(&mut ms) {
            Ok(v) => v,
            Err(e) => return Err(ms.error(e)),
        }
    };
    let now = Time::now();
    inode.mtime = now;
    inode.ctime = now;
    inode.nlink = (inode.nlink as i64 + nlink_delta as i64).max(0) as u32;
    {
        let mut ms = MetaSectors::new(txn, dir_ino, &mut inode);
        let n = dir::len(&mut ms).map_err(|e| ms.error(e))?;
        drop(ms);
        inode.size = n;
    }
    txn.write_inode(dir_ino, &inode)?;
    Ok(out)
}

impl Frangipani {
    fn txn(&self) -> Txn<'_> {
        Txn::new(&self.inner)
    }

    /// Runs `op` until it does not have to start over, restarting allocations from the
    /// first segment when lock order requires it.
    fn retrying<T>(&self, mut op: impl FnMut(&mut Txn<'_>) -> FsResult<Option<T>>) -> FsResult<T> {
        for _ in 0..RETRIES_MAX {
            let mut txn = self.txn();
            match op(&mut txn) {
                Ok(Some(v)) => {
                    txn.commit()?;
                    return Ok(v);
                }
                Ok(None) => continue,
                Err(FsError::NoSpace) if txn.restart_low => {
                    drop(txn);
                    self.inner.reset_segment_hints();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(FsError::Io("operation kept racing with other clients".into()))
    }

    /// Creates the root directory of a new file system (mkfs).
    pub(crate) fn init_root(&self) -> FsResult<()> {
        self.retrying(|txn| {
            txn.lock(LockName::Inode(ROOT_INO), Mode::Exclusive)?;
            let ino = txn.alloc(Bitmap::Inodes, Pool::Any)?;
            if ino != ROOT_INO {
                return Err(FsError::Corrupt(format!("root got inode {ino}")));
            }
            let now = Time::now();
            let mut root = Inode {
                mode: S_IFDIR | 0o755,
                nlink: 2,
                parent: ROOT_INO,
                atime: now,
                mtime: now,
                ctime: now,
                ..Inode::default()
            };
            {
                let mut ms = MetaSectors::new(txn, ROOT_INO, &mut root);
                dir::init(&mut ms).map_err(|e| ms.error(e))?;
            }
            txn.write_inode(ROOT_INO, &root)?;
            Ok(Some(()))
        })
    }

    /// An inode's attributes.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let mut txn = self.txn();
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        let inode = txn.live_inode(ino)?;
        Ok(Attr::of(ino, &inode))
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > dir::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let ino = {
            let mut txn = self.txn();
            txn.lock(LockName::Inode(parent), Mode::Shared)?;
            if name == b"." {
                parent
            } else if name == b".." {
                txn.live_inode(parent)?.parent
            } else {
                dir_lookup(&mut txn, parent, name)?.ok_or(FsError::NotFound)?.ino
            }
        };
        self.getattr(ino)
    }

    /// Creates a non-directory node (`mode` carries the type: regular, fifo, socket,
    /// device, but not directory or symlink).
    pub fn create(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, caller: Caller) -> FsResult<Attr> {
        match mode & S_IFMT {
            S_IFDIR => return self.mkdir(parent, name, mode, caller),
            S_IFLNK => return Err(FsError::Invalid("use symlink".into())),
            0 => return self.create(parent, name, mode | crate::inode::S_IFREG, rdev, caller),
            _ => {}
        }
        self.make_node(parent, name, mode, rdev, caller, None)
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Attr> {
        self.make_node(parent, name, S_IFDIR | (mode & 0o7777), 0, caller, None)
    }

    /// Creates a symbolic link to `target`.
    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], caller: Caller) -> FsResult<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong);
        }
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        self.make_node(parent, name, S_IFLNK | 0o777, 0, caller, Some(target))
    }

    fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        self.retrying(|txn| {
            txn.lock(LockName::Inode(parent), Mode::Exclusive)?;
            if dir_lookup(txn, parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            let parent_inode = txn.live_inode(parent)?;
            if parent_inode.nlink == 0 {
                return Err(FsError::NotFound); // a removed directory
            }
            let ino = txn.alloc(Bitmap::Inodes, Pool::Any)?;
            // A free inode takes part in no other operation, so taking its lock now,
            // after a segment lock, cannot deadlock.
            txn.lock(LockName::Inode(ino), Mode::Exclusive)?;
            let old = txn.read_inode(ino)?;
            if old.in_use() {
                return Err(FsError::Corrupt(format!("allocated inode {ino} is in use")));
            }
            let now = Time::now();
            let is_dir = mode & S_IFMT == S_IFDIR;
            let gid = if parent_inode.mode & 0o2000 != 0 { parent_inode.gid } else { caller.gid };
            let mode = if is_dir && parent_inode.mode & 0o2000 != 0 { mode | 0o2000 } else { mode };
            let mut inode = Inode {
                mode,
                uid: caller.uid,
                gid,
                nlink: if is_dir { 2 } else { 1 },
                atime: now,
                mtime: now,
                ctime: now,
                rdev,
                generation: old.generation + 1,
                parent: if is_dir { parent } else { 0 },
                ..Inode::default()
            };
            if is_dir {
                let mut ms = MetaSectors::new(txn, ino, &mut inode);
                dir::init(&mut ms).map_err(|e| ms.error(e))?;
            }
            if let Some(target) = target {
                write_symlink(txn, ino, &mut inode, target)?;
            }
            txn.write_inode(ino, &inode)?;
            let entry = DirEntry { name: name.to_vec(), ino, kind: kind_byte(mode) };
            dir_change(txn, parent, |ms| dir::insert(ms, &entry), if is_dir { 1 } else { 0 })?;
            Ok(Some(Attr::of(ino, &inode)))
        })
    }

    /// Reads a symbolic link's target.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let mut txn = self.txn();
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        let mut inode = txn.live_inode(ino)?;
        if inode.kind() != S_IFLNK {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        let len = inode.size as usize;
        let mut out = Vec::with_capacity(len);
        let mut ms = MetaSectors::new(&mut txn, ino, &mut inode);
        let mut n = 0;
        while out.len() < len {
            let payload = crate::dir::DirSectors::read(&mut ms, n).map_err(|e| ms.error(e))?;
            let take = (len - out.len()).min(PAYLOAD_BYTES);
            out.extend_from_slice(&payload[..take]);
            n += 1;
        }
        Ok(out)
    }

    /// Adds a hard link `name` in `parent` to `ino`.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        self.retrying(|txn| {
            txn.lock_inodes(&[ino, parent], Mode::Exclusive)?;
            let mut inode = txn.live_inode(ino)?;
            if inode.is_dir() {
                return Err(FsError::Perm);
            }
            if inode.nlink >= LINK_MAX {
                return Err(FsError::TooManyLinks);
            }
            if inode.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if dir_lookup(txn, parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            if txn.live_inode(parent)?.nlink == 0 {
                return Err(FsError::NotFound);
            }
            let entry = DirEntry { name: name.to_vec(), ino, kind: kind_byte(inode.mode) };
            dir_change(txn, parent, |ms| dir::insert(ms, &entry), 0)?;
            inode.nlink += 1;
            inode.ctime = Time::now();
            txn.write_inode(ino, &inode)?;
            Ok(Some(Attr::of(ino, &inode)))
        })
    }

    /// Looks a name up under a shared lock, for an operation that then locks more.
    fn peek(&self, parent: u64, name: &[u8]) -> FsResult<Option<DirEntry>> {
        let mut txn = self.txn();
        txn.lock(LockName::Inode(parent), Mode::Shared)?;
        dir_lookup(&mut txn, parent, name)
    }

    /// Removes a non-directory name.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid("rmdir .".into()));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], want_dir: bool) -> FsResult<()> {
        if name.len() > dir::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        self.retrying(|txn| {
            let Some(found) = self.peek(parent, name)? else { return Err(FsError::NotFound) };
            txn.lock_inodes(&[parent, found.ino], Mode::Exclusive)?;
            match dir_lookup(txn, parent, name)? {
                Some(e) if e.ino == found.ino => {}
                _ => return Ok(None), // changed meanwhile: start over
            }
            let mut inode = txn.live_inode(found.ino)?;
            if want_dir && !inode.is_dir() {
                return Err(FsError::NotDir);
            }
            if !want_dir && inode.is_dir() {
                return Err(FsError::IsDir);
            }
            if want_dir {
                let mut ms = MetaSectors::new(txn, found.ino, &mut inode);
                if dir::len(&mut ms).map_err(|e| ms.error(e))? != 0 {
                    return Err(FsError::NotEmpty);
                }
            }
            dir_change(txn, parent, |ms| dir::remove(ms, name), if want_dir { -1 } else { 0 })?;
            self.drop_link(txn, found.ino, &mut inode)?;
            Ok(Some(()))
        })
    }

    /// Takes one link away from an inode whose lock is held; frees it when none is left
    /// and it is not open here.
    fn drop_link(&self, txn: &mut Txn<'_>, ino: u64, inode: &mut Inode) -> FsResult<()> {
        inode.nlink = if inode.is_dir() { 0 } else { inode.nlink.saturating_sub(1) };
        inode.ctime = Time::now();
        if inode.nlink == 0 && !self.is_open(ino) {
            return self.free_inode(txn, ino, inode);
        }
        if inode.nlink == 0 {
            txn.add_orphan(ino)?;
        }
        txn.write_inode(ino, inode)
    }

    /// Frees an inode and its blocks (its lock is held).
    pub(crate) fn free_inode(&self, txn: &mut Txn<'_>, ino: u64, inode: &mut Inode) -> FsResult<()> {
        txn.free_blocks_from(inode, 0)?;
        if inode.xattr != 0 {
            txn.free_meta_block(Bitmap::Small, inode.xattr - 1)?;
        }
        txn.free(Bitmap::Inodes, &[ino])?;
        let freed = Inode { generation: inode.generation, ..Inode::default() };
        txn.write_inode(ino, &freed)?;
        lock(&self.inner.cache).truncate_pages(ino, 0);
        Ok(())
    }

    fn is_open(&self, ino: u64) -> bool {
        lock(&self.inner.open).get(&ino).is_some_and(|n| *n > 0)
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        if name.len() > dir::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        check_name(new_name)?;
        if name == b"." || name == b".." {
            return Err(FsError::Invalid("rename of . or ..".into()));
        }
        self.retrying(|txn| {
            let Some(src) = self.peek(parent, name)? else { return Err(FsError::NotFound) };
            let dst = self.peek(new_parent, new_name)?;
            let src_is_dir = src.kind == kind_byte(S_IFDIR);
            let dst_is_dir = dst.as_ref().is_some_and(|d| d.kind == kind_byte(S_IFDIR));
            let moves_dir = (src_is_dir || (flags.exchange && dst_is_dir)) && parent != new_parent;
            if moves_dir {
                // Cross-directory renames of directories are serialized so the ancestry
                // check below stays true until commit.
                txn.lock(LockName::Rename, Mode::Exclusive)?;
                if src_is_dir && self.is_ancestor(src.ino, new_parent)? {
                    return Err(FsError::Invalid("cannot move a directory into itself".into()));
                }
                if flags.exchange && dst_is_dir {
                    if let Some(d) = &dst {
                        if self.is_ancestor(d.ino, parent)? {
                            return Err(FsError::Invalid("cannot move a directory into itself".into()));
                        }
                    }
                }
            }
            let mut inos = vec![parent, new_parent, src.ino];
            if let Some(d) = &dst {
                inos.push(d.ino);
            }
            txn.lock_inodes(&inos, Mode::Exclusive)?;
            // Check that nothing changed since the lookups.
            let src_now = dir_lookup(txn, parent, name)?;
            let dst_now = dir_lookup(txn, new_parent, new_name)?;
            if src_now.as_ref().map(|e| e.ino) != Some(src.ino)
                || dst_now.as_ref().map(|e| e.ino) != dst.as_ref().map(|e| e.ino)
            {
                return Ok(None);
            }
            if txn.live_inode(new_parent)?.nlink == 0 {
                return Err(FsError::NotFound);
            }
            self.rename_locked(txn, parent, name, new_parent, new_name, src, dst, flags)?;
            Ok(Some(()))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_locked(
        &self,
        txn: &mut Txn<'_>,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        src: DirEntry,
        dst: Option<DirEntry>,
        flags: RenameFlags,
    ) -> FsResult<()> {
        let mut src_inode = txn.live_inode(src.ino)?;
        let now = Time::now();
        if flags.exchange {
            let Some(dst) = dst else { return Err(FsError::NotFound) };
            let mut dst_inode = txn.live_inode(dst.ino)?;
            let a = DirEntry { name: new_name.to_vec(), ..src.clone() };
            let b = DirEntry { name: name.to_vec(), ..dst.clone() };
            let (sd, dd) = (src_inode.is_dir(), dst_inode.is_dir());
            let delta = |moving_in: bool, moving_out: bool| (moving_in as i32) - (moving_out as i32);
            if parent == new_parent {
                dir_change(txn, parent, |ms| dir::replace(ms, &a).and_then(|_| dir::replace(ms, &b)), 0)?;
            } else {
                dir_change(txn, new_parent, |ms| dir::replace(ms, &a), delta(sd, dd))?;
                dir_change(txn, parent, |ms| dir::replace(ms, &b), delta(dd, sd))?;
                if sd {
                    src_inode.parent = new_parent;
                }
                if dd {
                    dst_inode.parent = parent;
                }
            }
            src_inode.ctime = now;
            dst_inode.ctime = now;
            txn.write_inode(src.ino, &src_inode)?;
            txn.write_inode(dst.ino, &dst_inode)?;
            return Ok(());
        }
        if let Some(d) = &dst {
            if flags.noreplace {
                return Err(FsError::Exists);
            }
            if d.ino == src.ino {
                return Ok(()); // two links to one inode: nothing to do (POSIX)
            }
        }
        let mut dst_inode = match &dst {
            Some(d) => {
                let di = txn.live_inode(d.ino)?;
                match (src_inode.is_dir(), di.is_dir()) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) => {
                        let mut di2 = di.clone();
                        let mut ms = MetaSectors::new(txn, d.ino, &mut di2);
                        if dir::len(&mut ms).map_err(|e| ms.error(e))? != 0 {
                            return Err(FsError::NotEmpty);
                        }
                    }
                    _ => {}
                }
                Some(di)
            }
            None => None,
        };
        let src_dir = src_inode.is_dir();
        let replaced_dir = dst_inode.as_ref().is_some_and(Inode::is_dir);
        let entry = DirEntry { name: new_name.to_vec(), ..src.clone() };
        if parent == new_parent {
            dir_change(
                txn,
                parent,
                |ms| dir::remove(ms, name).and_then(|_| dir::replace(ms, &entry)),
                -(replaced_dir as i32),
            )?;
        } else {
            let into = (src_dir as i32) - (replaced_dir as i32);
            dir_change(txn, new_parent, |ms| dir::replace(ms, &entry), into)?;
            dir_change(txn, parent, |ms| dir::remove(ms, name), -(src_dir as i32))?;
            if src_dir {
                src_inode.parent = new_parent;
            }
        }
        src_inode.ctime = now;
        txn.write_inode(src.ino, &src_inode)?;
        if let (Some(d), Some(di)) = (&dst, dst_inode.as_mut()) {
            self.drop_link(txn, d.ino, di)?;
        }
        Ok(())
    }

    /// Whether `ancestor` is `ino` or one of its ancestors (walking `..`).
    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> FsResult<bool> {
        for _ in 0..4096 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            let mut txn = self.txn();
            txn.lock(LockName::Inode(ino), Mode::Shared)?;
            ino = txn.live_inode(ino)?.parent;
        }
        Err(FsError::Corrupt("directory ancestry too deep or cyclic".into()))
    }

    /// Lists a directory after `cookie` (0: from the start, with `.` and `..`).
    pub fn readdir(&self, ino: u64, cookie: u64, max: usize) -> FsResult<Vec<DirItem>> {
        let mut txn = self.txn();
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        let mut inode = txn.live_inode(ino)?;
        if !inode.is_dir() {
            return Err(FsError::NotDir);
        }
        let mut out = Vec::new();
        if cookie == 0 {
            out.push(DirItem { cookie: 1, name: b".".to_vec(), ino, kind: S_IFDIR });
        }
        if cookie <= 1 {
            out.push(DirItem { cookie: 2, name: b"..".to_vec(), ino: inode.parent, kind: S_IFDIR });
        }
        let after = cookie.saturating_sub(2);
        let mut ms = MetaSectors::new(&mut txn, ino, &mut inode);
        let entries =
            dir::list(&mut ms, after, max.saturating_sub(out.len()).max(1)).map_err(|e| ms.error(e))?;
        out.extend(entries.into_iter().map(|(c, e)| DirItem {
            // Past `.` and `..`, and still within an i64 (FUSE offsets are signed).
            cookie: c.saturating_add(2).min(i64::MAX as u64),
            name: e.name,
            ino: e.ino,
            kind: (e.kind as u32) << 12,
        }));
        Ok(out)
    }
}

/// Stores a symlink target in the link's metadata sectors.
fn write_symlink(txn: &mut Txn<'_>, ino: u64, inode: &mut Inode, target: &[u8]) -> FsResult<()> {
    let mut ms = MetaSectors::new(txn, ino, inode);
    for (n, chunk) in target.chunks(PAYLOAD_BYTES).enumerate() {
        let mut payload = [0u8; PAYLOAD_BYTES];
        payload[..chunk.len()].copy_from_slice(chunk);
        crate::dir::DirSectors::write(&mut ms, n as u64, &payload).map_err(|e| ms.error(e))?;
    }
    drop(ms);
    inode.size = target.len() as u64;
    Ok(())
}
