//! Where everything lives on the virtual disk (the Frangipani paper's layout, scaled).
//!
//! ```text
//! 0        superblock (parameters)                       one sector, written by mkfs
//! 1 GiB    logs: 256 slots of `log_bytes` each           one per client
//! 512 GiB  per-slot orphan lists: 256 x 1 MiB            inodes unlinked while open
//! 1 TiB    bitmaps: inodes, small blocks, large blocks   in separately locked segments
//! 2 TiB    inodes, 512 bytes each (one per sector)
//! 4 TiB    small blocks, 4 KiB each: a file's first 64 KiB
//! 64 TiB   large blocks, 1 TiB of address space each: the rest of a big file
//! ```
//! The disk is sparse, so regions cost nothing until written, and a big file's large block
//! is addressed directly: no indirect blocks.

use crate::sector::{PAYLOAD_BYTES, SECTOR_BYTES};

/// Identifies a Frangipani superblock.
pub const MAGIC: [u8; 8] = *b"FRANGIPA";
/// The on-disk format this code reads and writes.
pub const FORMAT_VERSION: u32 = 2;

/// Number of log slots (one per client at a time).
pub const LOG_SLOTS: u32 = 256;
/// Base of the log region.
pub const LOG_BASE: u64 = 1 << 30;
/// Base of the per-slot orphan lists.
pub const ORPHAN_BASE: u64 = 1 << 39;
/// Bytes reserved for each slot's orphan list.
pub const ORPHAN_BYTES: u64 = 1 << 20;
/// Base of the bitmaps.
pub const BITMAP_BASE: u64 = 1 << 40;
/// Space reserved for each of the three bitmaps.
pub const BITMAP_BYTES: u64 = 1 << 37;
/// Base of the inode table.
pub const INODE_BASE: u64 = 1 << 41;
/// Base of the small blocks.
pub const SMALL_BASE: u64 = 1 << 42;
/// Bytes in a small block.
pub const SMALL_BLOCK_BYTES: u64 = 4096;
/// Small blocks per file: they cover its first 64 KiB.
pub const SMALL_BLOCKS_PER_FILE: usize = 16;
/// File offsets below this live in small blocks.
pub const SMALL_LIMIT: u64 = SMALL_BLOCK_BYTES * SMALL_BLOCKS_PER_FILE as u64;
/// Base of the large blocks.
pub const LARGE_BASE: u64 = 1 << 46;
/// Address space of one large block, and so the largest file.
pub const LARGE_BLOCK_BYTES: u64 = 1 << 40;
/// Sectors per bitmap segment (the unit of bitmap locking).
pub const SEGMENT_SECTORS: u64 = 8;
/// Bits (allocatable units) per bitmap sector.
pub const BITS_PER_SECTOR: u64 = PAYLOAD_BYTES as u64 * 8;
/// Bits per bitmap segment.
pub const BITS_PER_SEGMENT: u64 = BITS_PER_SECTOR * SEGMENT_SECTORS;
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

/// The three allocation bitmaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bitmap {
    /// Inode numbers.
    Inodes = 0,
    /// Small blocks.
    Small = 1,
    /// Large blocks.
    Large = 2,
}

/// The file system's parameters, fixed at mkfs and kept in the superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Inodes available (inode 0 is never used).
    pub inodes: u64,
    /// Small blocks available.
    pub small_blocks: u64,
    /// Large blocks available.
    pub large_blocks: u64,
    /// Bytes of each client's log.
    pub log_bytes: u64,
    /// A random id chosen at mkfs.
    pub fs_id: u64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            inodes: 1 << 24,
            small_blocks: 1 << 26,
            large_blocks: 1 << 16,
            log_bytes: 16 << 20,
            fs_id: 0,
        }
    }
}

/// Why a superblock cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No Frangipani file system here (e.g. the disk was never formatted).
    #[error("not a frangipani file system (bad magic)")]
    NotFrangipani,
    /// A file system of another format version.
    #[error("unsupported format version {found} (this build reads version {FORMAT_VERSION})")]
    WrongVersion {
        /// The version found.
        found: u32,
    },
    /// Parameters out of range.
    #[error("invalid parameters: {0}")]
    Invalid(String),
}

impl Params {
    /// Encodes the superblock sector.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        for (i, v) in
            [self.inodes, self.small_blocks, self.large_blocks, self.log_bytes, self.fs_id].iter().enumerate()
        {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..508]);
        b[508..512].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a superblock sector.
    pub fn decode(b: &[u8]) -> Result<Params, LayoutError> {
        if b.len() < SECTOR_BYTES || b[0..8] != MAGIC {
            return Err(LayoutError::NotFrangipani);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(LayoutError::WrongVersion { found: version });
        }
        let crc = u32::from_le_bytes(b[508..512].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&b[..508]) {
            return Err(LayoutError::Invalid("superblock checksum mismatch".into()));
        }
        let field = |i: usize| u64::from_le_bytes(b[16 + i * 8..24 + i * 8].try_into().expect("8 bytes"));
        let p = Params {
            inodes: field(0),
            small_blocks: field(1),
            large_blocks: field(2),
            log_bytes: field(3),
            fs_id: field(4),
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks the parameters fit the layout.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let bad = |m: &str| Err(LayoutError::Invalid(m.to_string()));
        if self.inodes < 2 || self.inodes > (INODE_BASE / SECTOR_BYTES as u64) {
            return bad("inode count out of range");
        }
        if self.small_blocks < 1 || self.small_blocks > (LARGE_BASE - SMALL_BASE) / SMALL_BLOCK_BYTES {
            return bad("small block count out of range");
        }
        if self.large_blocks > (u64::MAX - LARGE_BASE) / LARGE_BLOCK_BYTES {
            return bad("large block count out of range");
        }
        if self.log_bytes < 64 * 1024 || !self.log_bytes.is_multiple_of(SECTOR_BYTES as u64) {
            return bad("log size must be a multiple of 512 and at least 64 KiB");
        }
        if self.log_bytes * LOG_SLOTS as u64 > ORPHAN_BASE - LOG_BASE {
            return bad("log size too large for 256 slots");
        }
        for b in [Bitmap::Inodes, Bitmap::Small, Bitmap::Large] {
            if self.bits(b).div_ceil(8) > BITMAP_BYTES {
                return bad("bitmap too large");
            }
        }
        Ok(())
    }

    /// Units a bitmap tracks.
    pub fn bits(&self, b: Bitmap) -> u64 {
        match b {
            Bitmap::Inodes => self.inodes,
            Bitmap::Small => self.small_blocks,
            Bitmap::Large => self.large_blocks,
        }
    }

    /// Segments of a bitmap.
    pub fn segments(&self, b: Bitmap) -> u64 {
        self.bits(b).div_ceil(BITS_PER_SEGMENT)
    }

    /// The byte region of a slot's log.
    pub fn log_region(&self, slot: u32) -> (u64, u64) {
        (LOG_BASE + slot as u64 * self.log_bytes, self.log_bytes)
    }
}

/// Address of the sector holding bit `bit` of a bitmap, and the bit's index within its
/// payload.
pub fn bitmap_sector(b: Bitmap, bit: u64) -> (u64, usize) {
    let sector = bit / BITS_PER_SECTOR;
    (BITMAP_BASE + b as u64 * BITMAP_BYTES + sector * SECTOR_BYTES as u64, (bit % BITS_PER_SECTOR) as usize)
}

/// The segment a bit belongs to.
pub fn segment_of(bit: u64) -> u64 {
    bit / BITS_PER_SEGMENT
}

/// Address of inode `ino`.
pub fn inode_addr(ino: u64) -> u64 {
    INODE_BASE + ino * SECTOR_BYTES as u64
}

/// Address of small block `n`.
pub fn small_block_addr(n: u64) -> u64 {
    SMALL_BASE + n * SMALL_BLOCK_BYTES
}

/// Address of large block `n`.
pub fn large_block_addr(n: u64) -> u64 {
    LARGE_BASE + n * LARGE_BLOCK_BYTES
}

/// Address of sector `i` of a slot's orphan list.
pub fn orphan_sector(slot: u32, i: u64) -> u64 {
    ORPHAN_BASE + slot as u64 * ORPHAN_BYTES + i * SECTOR_BYTES as u64
}
