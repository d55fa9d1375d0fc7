//! Extended attributes: kept in one small block of the inode, as metadata (logged).
//!
//! The block's sector payloads, concatenated, hold `name_len: u8, value_len: u16 LE,
//! name, value` records, ended by a zero name length.

use crate::error::{FsError, FsResult};
use crate::fs::Frangipani;
use crate::inode::Time;
use crate::layout::{self, Bitmap};
use crate::locks::{LockName, Mode};
use crate::sector::{PAYLOAD_BYTES, SECTOR_BYTES};
use crate::txn::{Pool, Txn};

/// Sectors of the attribute block.
const SECTORS: usize = 8;
/// Bytes available for all of an inode's attributes.
pub const XATTR_SPACE: usize = SECTORS * PAYLOAD_BYTES;
/// Longest attribute name.
pub const XATTR_NAME_MAX: usize = 255;

/// How `setxattr` treats an existing attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XattrFlags {
    /// Create or replace.
    #[default]
    Any,
    /// Fail with EEXIST if it exists.
    Create,
    /// Fail with ENODATA if it does not exist.
    Replace,
}

fn decode(space: &[u8]) -> FsResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < space.len() && space[at] != 0 {
        let nlen = space[at] as usize;
        let vlen =
            u16::from_le_bytes([*space.get(at + 1).unwrap_or(&0), *space.get(at + 2).unwrap_or(&0)]) as usize;
        let end = at + 3 + nlen + vlen;
        if end > space.len() {
            return Err(FsError::Corrupt("extended attribute block overruns".into()));
        }
        out.push((space[at + 3..at + 3 + nlen].to_vec(), space[at + 3 + nlen..end].to_vec()));
        at = end;
    }
    Ok(out)
}

fn encode(attrs: &[(Vec<u8>, Vec<u8>)]) -> FsResult<Vec<u8>> {
    let mut space = Vec::new();
    for (n, v) in attrs {
        space.push(n.len() as u8);
        space.extend_from_slice(&(v.len() as u16).to_le_bytes());
        space.extend_from_slice(n);
        space.extend_from_slice(v);
    }
    if space.len() >= XATTR_SPACE {
        return Err(FsError::Range);
    }
    space.resize(XATTR_SPACE, 0);
    Ok(space)
}

impl Frangipani {
    fn read_xattrs(&self, txn: &mut Txn<'_>, ino: u64) -> FsResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let inode = txn.live_inode(ino)?;
        if inode.xattr == 0 {
            return Ok(Vec::new());
        }
        let base = layout::small_block_addr(inode.xattr - 1);
        let mut space = Vec::with_capacity(XATTR_SPACE);
        for i in 0..SECTORS {
            let s = txn.read(base + (i * SECTOR_BYTES) as u64, &LockName::Inode(ino))?;
            space.extend_from_slice(s.payload());
        }
        decode(&space)
    }

    /// An attribute's value.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        self.read_xattrs(&mut txn, ino)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoData)
    }

    /// Every attribute name.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Shared)?;
        Ok(self.read_xattrs(&mut txn, ino)?.into_iter().map(|(n, _)| n).collect())
    }

    /// Sets an attribute.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: XattrFlags) -> FsResult<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(FsError::Range);
        }
        if value.len() > u16::MAX as usize {
            return Err(FsError::Range);
        }
        self.change_xattrs(ino, |attrs| {
            let pos = attrs.iter().position(|(n, _)| n == name);
            match (pos, flags) {
                (Some(_), XattrFlags::Create) => return Err(FsError::Exists),
                (None, XattrFlags::Replace) => return Err(FsError::NoData),
                (Some(i), _) => attrs[i].1 = value.to_vec(),
                (None, _) => attrs.push((name.to_vec(), value.to_vec())),
            }
            Ok(())
        })
    }

    /// Removes an attribute.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.change_xattrs(ino, |attrs| {
            let before = attrs.len();
            attrs.retain(|(n, _)| n != name);
            if attrs.len() == before {
                return Err(FsError::NoData);
            }
            Ok(())
        })
    }

    fn change_xattrs(
        &self,
        ino: u64,
        change: impl FnOnce(&mut Vec<(Vec<u8>, Vec<u8>)>) -> FsResult<()>,
    ) -> FsResult<()> {
        let mut txn = Txn::new(&self.inner);
        txn.lock(LockName::Inode(ino), Mode::Exclusive)?;
        let mut attrs = self.read_xattrs(&mut txn, ino)?;
        change(&mut attrs)?;
        let space = encode(&attrs)?;
        let mut inode = txn.live_inode(ino)?;
        if inode.xattr == 0 {
            inode.xattr = txn.new_block(Bitmap::Small, Pool::Meta, ino)?;
        }
        let base = layout::small_block_addr(inode.xattr - 1);
        let lock_name = LockName::Inode(ino);
        for (i, chunk) in space.chunks(PAYLOAD_BYTES).enumerate() {
            let addr = base + (i * SECTOR_BYTES) as u64;
            let mut s = txn.read(addr, &lock_name)?;
            if s.payload() != chunk {
                s.payload_mut().copy_from_slice(chunk);
                txn.write(addr, &lock_name, s)?;
            }
        }
        inode.ctime = Time::now();
        txn.write_inode(ino, &inode)?;
        txn.commit()
    }
}
