//! Inodes: one 512-byte metadata sector each (a version, then the fields below).

use crate::layout::SMALL_BLOCKS_PER_FILE;
use crate::sector::Sector;

/// File type bits of `mode` (as in `st_mode`).
pub const S_IFMT: u32 = 0o170000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Directory.
pub const S_IFDIR: u32 = 0o040000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Named pipe.
pub const S_IFIFO: u32 = 0o010000;
/// Socket.
pub const S_IFSOCK: u32 = 0o140000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Block device.
pub const S_IFBLK: u32 = 0o060000;

/// A point in time as stored: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl Time {
    /// The current wall-clock time.
    pub fn now() -> Time {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Time { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
    }
}

/// An inode's fields. A free inode has `mode == 0`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inode {
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links.
    pub nlink: u32,
    /// Bytes (for directories: entries, as a hint).
    pub size: u64,
    /// Last access.
    pub atime: Time,
    /// Last data change.
    pub mtime: Time,
    /// Last inode change.
    pub ctime: Time,
    /// Device number of a device node.
    pub rdev: u32,
    /// Bumped each time the inode number is reused.
    pub generation: u64,
    /// A directory's parent (for `..`).
    pub parent: u64,
    /// Large block holding the file beyond 64 KiB, plus one (0: none).
    pub large: u64,
    /// Small block holding extended attributes, plus one (0: none).
    pub xattr: u64,
    /// Small blocks holding the first 64 KiB, each plus one (0: a hole).
    pub small: [u64; SMALL_BLOCKS_PER_FILE],
}

const MAGIC: u32 = 0x1e0d_e5a1;

impl Inode {
    /// The file type bits.
    pub fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == S_IFDIR
    }

    /// Whether the inode is in use.
    pub fn in_use(&self) -> bool {
        self.mode != 0
    }

    /// Decodes an inode sector (all zeros: a free inode).
    pub fn decode(s: &Sector) -> Result<Inode, String> {
        let p = s.payload();
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic == 0 {
            return Ok(Inode::default());
        }
        if magic != MAGIC {
            return Err(format!("bad inode magic {magic:#x}"));
        }
        let time_at = |o: usize| Time { secs: u64_at(o) as i64, nanos: u32_at(o + 8) };
        let mut small = [0u64; SMALL_BLOCKS_PER_FILE];
        for (i, b) in small.iter_mut().enumerate() {
            *b = u64_at(120 + i * 8);
        }
        Ok(Inode {
            mode: u32_at(4),
            uid: u32_at(8),
            gid: u32_at(12),
            nlink: u32_at(16),
            size: u64_at(20),
            atime: time_at(28),
            mtime: time_at(40),
            ctime: time_at(52),
            rdev: u32_at(64),
            generation: u64_at(68),
            parent: u64_at(76),
            large: u64_at(84),
            xattr: u64_at(92),
            small,
        })
    }

    /// Encodes into an inode sector's payload (the version is left alone).
    pub fn encode_into(&self, s: &mut Sector) {
        let p = s.payload_mut();
        p.fill(0);
        if *self == Inode::default() {
            return;
        }
        let mut put = |o: usize, b: &[u8]| p[o..o + b.len()].copy_from_slice(b);
        put(0, &MAGIC.to_le_bytes());
        put(4, &self.mode.to_le_bytes());
        put(8, &self.uid.to_le_bytes());
        put(12, &self.gid.to_le_bytes());
        put(16, &self.nlink.to_le_bytes());
        put(20, &self.size.to_le_bytes());
        for (o, t) in [(28, self.atime), (40, self.mtime), (52, self.ctime)] {
            put(o, &(t.secs as u64).to_le_bytes());
            put(o + 8, &t.nanos.to_le_bytes());
        }
        put(64, &self.rdev.to_le_bytes());
        put(68, &self.generation.to_le_bytes());
        put(76, &self.parent.to_le_bytes());
        put(84, &self.large.to_le_bytes());
        put(92, &self.xattr.to_le_bytes());
        for (i, b) in self.small.iter().enumerate() {
            put(120 + i * 8, &b.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut ino = Inode {
            mode: S_IFREG | 0o644,
            uid: 1000,
            gid: 100,
            nlink: 2,
            size: 123_456_789,
            atime: Time { secs: -5, nanos: 7 },
            mtime: Time { secs: 1_700_000_000, nanos: 999_999_999 },
            ctime: Time { secs: 3, nanos: 0 },
            rdev: 0x0801,
            generation: 9,
            parent: 77,
            large: 5,
            xattr: 12,
            small: [0; SMALL_BLOCKS_PER_FILE],
        };
        ino.small[3] = 42;
        ino.small[15] = u64::MAX;
        let mut s = Sector::zeroed();
        s.set_version(17);
        ino.encode_into(&mut s);
        assert_eq!(s.version(), 17);
        assert_eq!(Inode::decode(&s).unwrap(), ino);
        assert_eq!(Inode::decode(&Sector::zeroed()).unwrap(), Inode::default());
        let mut bad = Sector::zeroed();
        bad.payload_mut()[0] = 1;
        assert!(Inode::decode(&bad).is_err());
    }
}
