//! fsck: walks the tree from the root and checks bitmaps against reachable blocks, link
//! counts, directory structure and inode sanity; with `repair`, fixes what it can
//! (link counts, bitmaps, unreachable inodes are freed). Run it on a quiet file system:
//! changes made by other clients during the walk show up as problems.

use crate::dir;
use crate::error::{FsError, FsResult};
use crate::fs::Frangipani;
use crate::inode::{Inode, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use crate::layout::{Bitmap, ROOT_INO};
use crate::locks::{LockName, Mode};
use crate::txn::{MetaSectors, Txn};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// What fsck found.
#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    /// Reachable inodes.
    pub inodes: u64,
    /// Of which directories.
    pub directories: u64,
    /// Small blocks in use.
    pub small_blocks: u64,
    /// Large blocks in use.
    pub large_blocks: u64,
    /// Every problem, one line each.
    pub problems: Vec<String>,
    /// Problems fixed (with `repair`).
    pub repaired: u64,
}

impl FsckReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for FsckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} inodes ({} directories), {} small blocks, {} large blocks",
            self.inodes, self.directories, self.small_blocks, self.large_blocks
        )?;
        if self.problems.is_empty() {
            return write!(f, "clean");
        }
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        write!(f, "{} problems, {} repaired", self.problems.len(), self.repaired)
    }
}

fn bit(bits: &[u8], i: u64) -> bool {
    bits.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// The set bits of a bitmap below `total` (unit 0 is never used), skipping empty bytes:
/// a bitmap has tens of millions of bits and few are set.
fn set_bits(bits: &[u8], total: u64) -> impl Iterator<Item = u64> + '_ {
    bits.iter()
        .enumerate()
        .filter(|(_, b)| **b != 0)
        .flat_map(|(i, b)| (0..8).filter(move |k| b & (1 << k) != 0).map(move |k| i as u64 * 8 + k))
        .filter(move |i| (1..total).contains(i))
}

impl Frangipani {
    /// Checks the file system; fixes what it can when `repair` is set.
    pub fn fsck(&self, repair: bool) -> FsResult<FsckReport> {
        self.sync()?;
        let mut r = FsckReport::default();
        // Entries pointing at each inode, and each directory's parent and subdirectories.
        let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<u64, u32> = BTreeMap::new();
        let mut seen_parent: BTreeMap<u64, u64> = BTreeMap::new();
        let mut inodes: BTreeMap<u64, Inode> = BTreeMap::new();
        let mut small_owner: BTreeMap<u64, u64> = BTreeMap::new();
        let mut large_owner: BTreeMap<u64, u64> = BTreeMap::new();
        let mut queue = VecDeque::from([ROOT_INO]);
        let mut visited = BTreeSet::new();
        while let Some(ino) = queue.pop_front() {
            if !visited.insert(ino) {
                continue;
            }
            let mut txn = Txn::new(&self.inner);
            txn.lock(LockName::Inode(ino), Mode::Shared)?;
            let mut inode = match txn.live_inode(ino) {
                Ok(i) => i,
                Err(e) => {
                    r.problems.push(format!("inode {ino}: referenced but unreadable or free ({e})"));
                    continue;
                }
            };
            self.check_inode(ino, &inode, &mut r);
            for (i, b) in inode.small.iter().enumerate() {
                if *b != 0 {
                    if let Some(other) = small_owner.insert(*b - 1, ino) {
                        r.problems.push(format!("small block {} used by inodes {other} and {ino}", *b - 1));
                    }
                    let _ = i;
                }
            }
            if inode.xattr != 0 {
                if let Some(other) = small_owner.insert(inode.xattr - 1, ino) {
                    r.problems
                        .push(format!("small block {} used by inodes {other} and {ino}", inode.xattr - 1));
                }
            }
            if inode.large != 0 {
                if let Some(other) = large_owner.insert(inode.large - 1, ino) {
                    r.problems
                        .push(format!("large block {} used by inodes {other} and {ino}", inode.large - 1));
                }
            }
            if inode.is_dir() {
                r.directories += 1;
                let mut cookie = 0;
                loop {
                    let mut ms = MetaSectors::new(&mut txn, ino, &mut inode);
                    let page = match dir::list(&mut ms, cookie, 512) {
                        Ok(p) => p,
                        Err(e) => {
                            let e = ms.error(e);
                            r.problems.push(format!("directory {ino}: {e}"));
                            break;
                        }
                    };
                    let Some(last) = page.last() else { break };
                    cookie = last.0;
                    for (_, e) in page {
                        *refs.entry(e.ino).or_default() += 1;
                        if (e.kind as u32) << 12 == S_IFDIR {
                            *subdirs.entry(ino).or_default() += 1;
                            if let Some(p) = seen_parent.insert(e.ino, ino) {
                                r.problems.push(format!("directory {} appears in {p} and {ino}", e.ino));
                            }
                        }
                        queue.push_back(e.ino);
                    }
                }
            }
            inodes.insert(ino, inode);
        }
        r.inodes = inodes.len() as u64;
        r.small_blocks = small_owner.len() as u64;
        r.large_blocks = large_owner.len() as u64;

        // Link counts, directory kinds and parents.
        let mut fix_links = Vec::new();
        for (ino, inode) in &inodes {
            let want = if inode.is_dir() {
                2 + subdirs.get(ino).copied().unwrap_or(0)
            } else {
                refs.get(ino).copied().unwrap_or(0)
            };
            if inode.nlink != want {
                r.problems.push(format!("inode {ino}: link count {} but {want} found", inode.nlink));
                fix_links.push((*ino, want));
            }
            if inode.is_dir() && *ino != ROOT_INO {
                let p = seen_parent.get(ino).copied().unwrap_or(0);
                if inode.parent != p {
                    r.problems
                        .push(format!("directory {ino}: parent is {} but it is listed in {p}", inode.parent));
                }
            }
        }

        // Bitmaps against what is reachable. Shared locks on every segment make other
        // clients write back their allocations first.
        let p = self.inner.params.clone();
        let (inode_bits, small_bits, large_bits) = {
            let mut txn = Txn::new(&self.inner);
            let segments = [Bitmap::Inodes, Bitmap::Small, Bitmap::Large]
                .into_iter()
                .flat_map(|b| (0..p.segments(b)).map(move |seg| LockName::Segment(b as u8, seg)))
                .collect();
            txn.lock_many(segments, Mode::Shared)?;
            (
                self.inner.bitmap_snapshot(Bitmap::Inodes)?,
                self.inner.bitmap_snapshot(Bitmap::Small)?,
                self.inner.bitmap_snapshot(Bitmap::Large)?,
            )
        };
        let mut unreachable = Vec::new();
        let mut bitmap_fixes: Vec<(Bitmap, u64, bool)> = Vec::new();
        for i in set_bits(&inode_bits, p.inodes) {
            if !inodes.contains_key(&i) {
                r.problems.push(format!("inode {i}: allocated but unreachable"));
                unreachable.push(i);
            }
        }
        for &i in inodes.range(1..p.inodes).map(|(i, _)| i) {
            if !bit(&inode_bits, i) {
                r.problems.push(format!("inode {i}: in use but free in the bitmap"));
                bitmap_fixes.push((Bitmap::Inodes, i, true));
            }
        }
        for (b, bits, owners, total) in [
            (Bitmap::Small, &small_bits, &small_owner, p.small_blocks),
            (Bitmap::Large, &large_bits, &large_owner, p.large_blocks),
        ] {
            for i in set_bits(bits, total) {
                if !owners.contains_key(&i) {
                    r.problems.push(format!("{b:?} block {i}: allocated but unreferenced"));
                    bitmap_fixes.push((b, i, false));
                }
            }
            for &i in owners.range(1..total).map(|(i, _)| i) {
                if !bit(bits, i) {
                    r.problems.push(format!("{b:?} block {i}: referenced but free in the bitmap"));
                    bitmap_fixes.push((b, i, true));
                }
            }
        }
        if repair && !r.problems.is_empty() {
            r.repaired = self.repair(&fix_links, &unreachable, &bitmap_fixes)?;
        }
        Ok(r)
    }

    fn check_inode(&self, ino: u64, inode: &Inode, r: &mut FsckReport) {
        let kind = inode.mode & S_IFMT;
        if ![S_IFREG, S_IFDIR, S_IFLNK, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].contains(&kind) {
            r.problems.push(format!("inode {ino}: bad type {kind:#o}"));
        }
        if inode.kind() == S_IFREG {
            let pages = inode.size.div_ceil(4096);
            for (i, b) in inode.small.iter().enumerate() {
                if *b != 0 && i as u64 >= pages {
                    r.problems.push(format!("inode {ino}: small block beyond its size"));
                }
            }
        }
        if inode.small.iter().any(|b| *b > self.inner.params.small_blocks)
            || inode.large > self.inner.params.large_blocks
        {
            r.problems.push(format!("inode {ino}: block number out of range"));
        }
    }

    fn repair(
        &self,
        links: &[(u64, u32)],
        unreachable: &[u64],
        bitmaps: &[(Bitmap, u64, bool)],
    ) -> FsResult<u64> {
        let mut fixed = 0;
        for (ino, nlink) in links {
            let mut txn = Txn::new(&self.inner);
            txn.lock(LockName::Inode(*ino), Mode::Exclusive)?;
            let mut inode = txn.live_inode(*ino)?;
            inode.nlink = *nlink;
            txn.write_inode(*ino, &inode)?;
            txn.commit()?;
            fixed += 1;
        }
        for ino in unreachable {
            let mut txn = Txn::new(&self.inner);
            txn.lock(LockName::Inode(*ino), Mode::Exclusive)?;
            let mut inode = txn.read_inode(*ino)?;
            if inode.in_use() {
                self.free_inode(&mut txn, *ino, &mut inode)?;
            } else {
                txn.free(Bitmap::Inodes, &[*ino])?;
            }
            txn.commit()?;
            fixed += 1;
        }
        for (b, unit, set) in bitmaps {
            let mut txn = Txn::new(&self.inner);
            if *set {
                txn.mark(*b, *unit)?;
            } else {
                match txn.free(*b, &[*unit]) {
                    Ok(()) | Err(FsError::Corrupt(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            txn.commit()?;
            fixed += 1;
        }
        self.sync()?;
        Ok(fixed)
    }
}
