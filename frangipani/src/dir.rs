//! Directories on disk: the names of one directory kept as a B+tree in the directory's own
//! metadata sectors, so that lookup and insert touch a handful of sectors even in a
//! directory of millions of names.
//!
//! # Keys, hash and readdir cookies
//!
//! Entries are ordered by the key `(hash(name), name)`. The hash is FNV-1a 64 over the
//! name's bytes followed by the MurmurHash3 `fmix64` finalizer (a bijection that spreads
//! FNV's low-bit differences into the top bits). It is part of the on-disk format and must
//! never change; a unit test pins it. The name breaks ties between equal hashes, so
//! correctness never depends on the hash; only speed does (see below).
//!
//! [`list`] hands out a cookie with each entry: the top 63 bits of its hash, and 1 instead of
//! 0 (0 means "from the start"), so cookies fit FUSE's positive `i64` offsets and increase
//! with the key order. A listing resumes at the first entry whose cookie is greater than
//! the one given. Because a cookie is a function of the name alone, it stays valid however
//! the tree changes between calls: an entry that is neither added nor removed during a
//! readdir loop is returned exactly once (POSIX readdir semantics).
//!
//! Limitation: names whose hashes agree in their top 63 bits (or are both below 4) share a
//! cookie; with n names this has probability about n²/2^64. [`list`] never ends a page
//! inside such a run (it ends before the run, or returns the whole run when the run alone
//! exceeds `max`), but a consumer that stops partway through a page (a full FUSE reply
//! buffer) and resumes at a shared cookie skips the rest of that run.
//!
//! # On-disk layout
//!
//! The directory is a sequence of sectors numbered 0, 1, 2, ... within the directory; the
//! file system maps them to disk addresses and handles versions, locks and logging. This
//! module sees only their 504-byte payloads ([`DirSectors`]). All integers are
//! little-endian; bytes not listed are zero.
//!
//! Sector 0, the header:
//!
//! | bytes  | field                                                             |
//! |--------|-------------------------------------------------------------------|
//! | 0..8   | magic `FGDIRHDR`                                                  |
//! | 8..12  | format version u32 (1)                                            |
//! | 12..16 | tree height u32: levels from root to leaf, 1 = the root is a leaf |
//! | 16..24 | root node sector u64                                              |
//! | 24..32 | entry count u64                                                   |
//! | 32..40 | next never-used sector u64 (the directory spans `0..` this)       |
//! | 40..48 | head of the free-sector list u64 (0 = empty)                      |
//! | 48..56 | sectors on the free list u64                                      |
//!
//! A leaf node holds entries sorted by key:
//!
//! | bytes | field                                                                  |
//! |-------|------------------------------------------------------------------------|
//! | 0..4  | magic `DIRL`                                                           |
//! | 4..6  | entry count u16                                                        |
//! | 8..   | entries: hash u64, ino u64, kind u8, name_len u8, name (1..=255 bytes) |
//!
//! An inner node holds `n` separator hashes and `n + 1` children (up to 30 and 31):
//!
//! | bytes | field                                         |
//! |-------|-----------------------------------------------|
//! | 0..4  | magic `DIRI`                                  |
//! | 4..6  | separator count u16                           |
//! | 8..16 | child 0 sector u64                            |
//! | 16..  | separators: hash u64, child i+1 sector u64    |
//!
//! Child `i` holds entries whose hash `h` has `sep[i-1] <= h <= sep[i]`: inclusive on both
//! sides, because a run of equal hashes may straddle two leaves. Separators are hashes
//! alone, never names, so an inner node always has room for 31 children and the height
//! stays logarithmic whatever the names. Between leaves whose hashes differ, the separator
//! is the left leaf's last hash plus one, so a search goes straight to the one leaf that
//! can hold its key. A search whose hash equals a separator (a run that straddles leaves)
//! starts at the leftmost leaf that may hold it and walks right along the run. So names
//! built to share one hash (FNV-1a is not a cryptographic hash) cost a walk along their
//! run, but never break the tree or deepen it.
//!
//! A free sector (freed by a remove, reused before the directory grows) holds the magic
//! `DIRF` in bytes 0..4 and the next free sector (0 = end) in bytes 8..16.
//!
//! Leaves are not chained: [`list`] walks the tree with its descent path as the cursor,
//! which reads each leaf once like a chain would, and lets a remove drop an empty leaf
//! without finding and rewriting its predecessor.
//!
//! # Shape
//!
//! A node that overflows on insert splits into two nodes of nearly equal bytes (three when
//! long names make two impossible), between different hashes when it can. A node that a
//! remove leaves under a quarter full merges with a neighbour when both fit in one sector;
//! an empty node leaves its parent and its sector goes on the free list; a root with a
//! single child gives way to it. So the directory shrinks back when names go, and
//! insert/remove churn reuses its sectors.
//!
//! # Atomicity and corruption
//!
//! One call may write several sectors (a split, a merge, the header). The caller applies
//! them as one unit, as one log record, and discards them if the call returns an error.
//! Bad disk contents (wrong magic, impossible lengths, keys out of order, pointers outside
//! the directory, a tree deeper than 32 levels) give [`DirError::Corrupt`], never a panic
//! or an endless loop.
//!
//! # Example
//!
//! ```
//! use std::collections::HashMap;
//! use frangipani::dir::{self, DirEntry, DirError, DirSectors};
//! use frangipani::sector::PAYLOAD_BYTES;
//!
//! #[derive(Default)]
//! struct Mem(HashMap<u64, [u8; PAYLOAD_BYTES]>);
//!
//! impl DirSectors for Mem {
//!     fn read(&mut self, n: u64) -> Result<[u8; PAYLOAD_BYTES], DirError> {
//!         Ok(self.0.get(&n).copied().unwrap_or([0; PAYLOAD_BYTES]))
//!     }
//!     fn write(&mut self, n: u64, payload: &[u8; PAYLOAD_BYTES]) -> Result<(), DirError> {
//!         self.0.insert(n, *payload);
//!         Ok(())
//!     }
//! }
//!
//! let mut io = Mem::default();
//! dir::init(&mut io)?;
//! dir::insert(&mut io, &DirEntry { name: b"hello".to_vec(), ino: 7, kind: 1 })?;
//! assert_eq!(dir::lookup(&mut io, b"hello")?.map(|e| e.ino), Some(7));
//! let page = dir::list(&mut io, 0, 100)?;
//! assert_eq!(page.len(), 1);
//! assert!(dir::list(&mut io, page[0].0, 100)?.is_empty()); // resumed after the last cookie
//! # Ok::<(), DirError>(())
//! ```

use std::collections::HashSet;
use std::ops::Range;

use crate::sector::PAYLOAD_BYTES;

/// The longest name, in bytes.
pub const NAME_MAX: usize = 255;

/// One name in a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name: 1..=255 bytes, no `/` or NUL, not `.` or `..`.
    pub name: Vec<u8>,
    /// The inode it names.
    pub ino: u64,
    /// The file type, as the file system encodes it; opaque here.
    pub kind: u8,
}

/// Why a directory operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirError {
    /// The name is already in the directory.
    #[error("name already exists")]
    Exists,
    /// The name is not in the directory.
    #[error("no such name")]
    NotFound,
    /// The name is longer than [`NAME_MAX`] bytes.
    #[error("name longer than 255 bytes")]
    NameTooLong,
    /// The name is empty, `.` or `..`, or contains `/` or NUL.
    #[error("invalid name")]
    InvalidName,
    /// The directory's sectors hold something this module never writes.
    #[error("corrupt directory: {0}")]
    Corrupt(String),
    /// Reading or writing a sector failed.
    #[error("directory I/O failed: {0}")]
    Io(String),
}

/// The directory's sectors, numbered from 0 within the directory, seen as payloads.
pub trait DirSectors {
    /// The payload of directory sector `n` (all zeros if never written).
    fn read(&mut self, n: u64) -> Result<[u8; PAYLOAD_BYTES], DirError>;
    /// Replaces the payload of sector `n` (the caller logs it and bumps its version).
    fn write(&mut self, n: u64, payload: &[u8; PAYLOAD_BYTES]) -> Result<(), DirError>;
}

/// Makes `io` a new, empty directory, whatever it held.
pub fn init(io: &mut impl DirSectors) -> Result<(), DirError> {
    Tree::create(io, name_hash)
}

/// The entry called `name`, if any.
pub fn lookup(io: &mut impl DirSectors, name: &[u8]) -> Result<Option<DirEntry>, DirError> {
    Tree::open(io, name_hash)?.lookup(name)
}

/// Adds `entry`; [`DirError::Exists`] if its name is present.
pub fn insert(io: &mut impl DirSectors, entry: &DirEntry) -> Result<(), DirError> {
    Tree::open(io, name_hash)?.insert(entry, false).map(|_| ())
}

/// Removes the entry called `name` and returns it; [`DirError::NotFound`] if absent.
pub fn remove(io: &mut impl DirSectors, name: &[u8]) -> Result<DirEntry, DirError> {
    Tree::open(io, name_hash)?.remove(name)
}

/// Adds `entry`, or overwrites the entry of the same name and returns it (rename over an
/// existing name).
pub fn replace(io: &mut impl DirSectors, entry: &DirEntry) -> Result<Option<DirEntry>, DirError> {
    Tree::open(io, name_hash)?.insert(entry, true)
}

/// Up to `max` entries whose cookies are greater than `after_cookie` (0 = from the start),
/// with their cookies, in cookie order. Pass the last cookie back to continue; an empty
/// page means the end. A page ends before a run of entries sharing one cookie rather than
/// inside it, and holds more than `max` entries only when such a run alone exceeds `max`.
pub fn list(
    io: &mut impl DirSectors,
    after_cookie: u64,
    max: usize,
) -> Result<Vec<(u64, DirEntry)>, DirError> {
    Tree::open(io, name_hash)?.list(after_cookie, max)
}

/// Entries in the directory.
pub fn len(io: &mut impl DirSectors) -> Result<u64, DirError> {
    Ok(Tree::open(io, name_hash)?.header.entries)
}

/// Sectors holding the header or a tree node. The directory spans more sectors than this
/// when some are on its free list.
pub fn sectors_in_use(io: &mut impl DirSectors) -> Result<u64, DirError> {
    let header = Tree::open(io, name_hash)?.header;
    Ok(header.next_unused - header.free_count)
}

/// Walks the whole directory (for fsck): every node decodes, keys are in order and inside
/// their parents' ranges, every leaf is at the same depth, the entry count is right, and
/// every sector is either in the tree or on the free list, once.
pub fn check(io: &mut impl DirSectors) -> Result<(), DirError> {
    Tree::open(io, name_hash)?.check()
}

// ---------------------------------------------------------------------------------------
// Hash and cookies

/// The stable hash of a name: FNV-1a 64, then MurmurHash3's fmix64 finalizer.
fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The readdir cookie of entries whose name hashes to `hash`, in `1..=i64::MAX`; it never
/// decreases as the hash grows, so cookie order is key order.
fn cookie(hash: u64) -> u64 {
    (hash >> 1).max(1)
}

/// The smallest hash whose cookie is greater than `cookie`, if any.
fn first_hash_after(cookie: u64) -> Option<u64> {
    match cookie {
        0 => Some(0),
        c if c >= i64::MAX as u64 => None,
        c => Some((c + 1) << 1),
    }
}

/// Checks a name that is to be stored or looked up.
fn validate_name(name: &[u8]) -> Result<(), DirError> {
    if name.len() > NAME_MAX {
        return Err(DirError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(DirError::InvalidName);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sector formats

const HEADER_MAGIC: [u8; 8] = *b"FGDIRHDR";
const FORMAT_VERSION: u32 = 1;
const LEAF_MAGIC: [u8; 4] = *b"DIRL";
const INNER_MAGIC: [u8; 4] = *b"DIRI";
const FREE_MAGIC: [u8; 4] = *b"DIRF";

/// The header's sector; also "none" in the free list, since no node can live there.
const HEADER_SECTOR: u64 = 0;
/// Bytes before a leaf's entries: magic, count, padding.
const LEAF_HEADER_BYTES: usize = 8;
/// Bytes of a leaf entry besides its name: hash, ino, kind, name length.
const SLOT_FIXED_BYTES: usize = 18;
/// Bytes before an inner node's separators: magic, count, padding, child 0.
const INNER_HEADER_BYTES: usize = 16;
/// Bytes of a separator with the child to its right.
const SEPARATOR_BYTES: usize = 16;
/// A node smaller than this after a remove tries to merge with a neighbour.
const MERGE_BELOW_BYTES: usize = PAYLOAD_BYTES / 4;
/// Deepest tree accepted. Inner nodes have at least two children, so this is never the
/// limit on size.
const MAX_HEIGHT: u32 = 32;

/// An entry's key. The derived order compares the hash, then the name bytewise.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    hash: u64,
    /// Empty only in a key sought by [`list`], where it sorts before every name.
    name: Vec<u8>,
}

/// One entry in a leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    key: Key,
    ino: u64,
    kind: u8,
}

impl Slot {
    /// Bytes it takes in a leaf.
    fn encoded_len(&self) -> usize {
        SLOT_FIXED_BYTES + self.key.name.len()
    }

    fn into_entry(self) -> DirEntry {
        DirEntry { name: self.key.name, ino: self.ino, kind: self.kind }
    }
}

/// The separator between neighbouring leaves whose last and first keys are `left` and
/// `right`: one past the left hash when the hashes differ, so that a search for either
/// hash goes straight to its own leaf; the shared hash when a run straddles the two.
fn separator(left: &Key, right: &Key) -> u64 {
    debug_assert!(left < right);
    if left.hash < right.hash {
        left.hash + 1
    } else {
        left.hash
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Inner {
    /// Separator hashes, non-decreasing (equal ones bound leaves inside a run of one hash).
    /// Invariant: `keys.len() + 1 == children.len()`, except transiently, in memory, when
    /// a remove has taken the last child away.
    keys: Vec<u64>,
    children: Vec<u64>,
}

impl Inner {
    /// The child to search first for `hash`: the leftmost whose range includes it.
    fn route(&self, hash: u64) -> usize {
        self.keys.partition_point(|&k| k < hash)
    }

    /// Drops child `i` and the separator beside it; the neighbour's range widens to cover.
    fn remove_child(&mut self, i: usize) {
        self.children.remove(i);
        if i > 0 {
            self.keys.remove(i - 1);
        } else if !self.keys.is_empty() {
            self.keys.remove(0);
        }
    }

    /// Child `i`, given this node's own bounds.
    fn child(&self, i: usize, bounds: Bounds) -> (u64, Bounds) {
        let lo = if i == 0 { bounds.lo } else { Some(self.keys[i - 1]) };
        (self.children[i], Bounds { lo, hi: self.keys.get(i).copied().or(bounds.hi) })
    }
}

/// The hashes a node's keys may have, `lo..=hi`, as its ancestors' separators say
/// (`None` = unbounded).
#[derive(Clone, Copy, Debug, Default)]
struct Bounds {
    lo: Option<u64>,
    hi: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    /// Invariant: sorted by key, strictly increasing; empty only in the root.
    Leaf(Vec<Slot>),
    Inner(Inner),
}

impl Node {
    fn encoded_len(&self) -> usize {
        match self {
            Node::Leaf(slots) => LEAF_HEADER_BYTES + slots.iter().map(Slot::encoded_len).sum::<usize>(),
            Node::Inner(inner) => INNER_HEADER_BYTES + SEPARATOR_BYTES * inner.keys.len(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Leaf(slots) => slots.is_empty(),
            Node::Inner(inner) => inner.children.is_empty(),
        }
    }

    /// The lowest and highest hash in the node (of entries or separators).
    fn hash_range(&self) -> Option<(u64, u64)> {
        match self {
            Node::Leaf(slots) => Some((slots.first()?.key.hash, slots.last()?.key.hash)),
            Node::Inner(inner) => Some((*inner.keys.first()?, *inner.keys.last()?)),
        }
    }

    /// Children of an inner node; 0 for a leaf.
    fn children_len(&self) -> usize {
        match self {
            Node::Leaf(_) => 0,
            Node::Inner(inner) => inner.children.len(),
        }
    }

    // The accessors below are used where the node's level fixes its kind, and
    // `Tree::read_node` has checked the kind against the level.

    fn slots(&self) -> &Vec<Slot> {
        match self {
            Node::Leaf(slots) => slots,
            Node::Inner(_) => panic!("expected a leaf"),
        }
    }

    fn slots_mut(&mut self) -> &mut Vec<Slot> {
        match self {
            Node::Leaf(slots) => slots,
            Node::Inner(_) => panic!("expected a leaf"),
        }
    }

    fn inner(&self) -> &Inner {
        match self {
            Node::Inner(inner) => inner,
            Node::Leaf(_) => panic!("expected an inner node"),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        match self {
            Node::Inner(inner) => inner,
            Node::Leaf(_) => panic!("expected an inner node"),
        }
    }

    fn encode(&self) -> [u8; PAYLOAD_BYTES] {
        assert!(self.encoded_len() <= PAYLOAD_BYTES, "node of {} bytes", self.encoded_len());
        let mut w = Writer::default();
        match self {
            Node::Leaf(slots) => {
                w.put(&LEAF_MAGIC);
                w.put(&(slots.len() as u16).to_le_bytes());
                w.pos = LEAF_HEADER_BYTES;
                for s in slots {
                    w.put(&s.key.hash.to_le_bytes());
                    w.put(&s.ino.to_le_bytes());
                    w.put(&[s.kind, s.key.name.len() as u8]);
                    w.put(&s.key.name);
                }
            }
            Node::Inner(inner) => {
                assert_eq!(inner.keys.len() + 1, inner.children.len());
                w.put(&INNER_MAGIC);
                w.put(&(inner.keys.len() as u16).to_le_bytes());
                w.pos = 8;
                w.put(&inner.children[0].to_le_bytes());
                for (key, child) in inner.keys.iter().zip(&inner.children[1..]) {
                    w.put(&key.to_le_bytes());
                    w.put(&child.to_le_bytes());
                }
            }
        }
        w.buf
    }

    /// Parses a node; the error says what is wrong with it.
    fn decode(buf: &[u8; PAYLOAD_BYTES]) -> Result<Node, String> {
        let mut r = Reader { buf, pos: 0 };
        let magic = r.bytes(4)?;
        let count = usize::from(r.u16()?);
        r.pos = 8;
        if magic == LEAF_MAGIC {
            let mut slots = Vec::with_capacity(count.min(PAYLOAD_BYTES / (SLOT_FIXED_BYTES + 1)));
            for _ in 0..count {
                let (hash, ino, kind, name_len) = (r.u64()?, r.u64()?, r.u8()?, r.u8()?);
                let name = r.bytes(usize::from(name_len))?.to_vec();
                validate_name(&name).map_err(|_| format!("invalid name {name:?} in a leaf"))?;
                slots.push(Slot { key: Key { hash, name }, ino, kind });
            }
            if slots.windows(2).any(|w| w[0].key >= w[1].key) {
                return Err("leaf entries out of order".into());
            }
            Ok(Node::Leaf(slots))
        } else if magic == INNER_MAGIC {
            let mut inner =
                Inner { keys: Vec::with_capacity(count.min(PAYLOAD_BYTES)), children: vec![r.u64()?] };
            for _ in 0..count {
                inner.keys.push(r.u64()?);
                inner.children.push(r.u64()?);
            }
            if inner.keys.windows(2).any(|w| w[0] > w[1]) {
                return Err("separators out of order".into());
            }
            Ok(Node::Inner(inner))
        } else if magic == FREE_MAGIC {
            Err("a free sector is linked into the tree".into())
        } else {
            Err(format!("bad node magic {magic:02x?}"))
        }
    }

    /// `left` and `right` (neighbours, `separator` between them in their parent) as one
    /// node, if that fits in a sector.
    fn merged(left: &Node, separator: u64, right: &Node) -> Option<Node> {
        let node = match (left, right) {
            (Node::Leaf(a), Node::Leaf(b)) => Node::Leaf([&a[..], &b[..]].concat()),
            (Node::Inner(a), Node::Inner(b)) => Node::Inner(Inner {
                keys: [&a.keys[..], &[separator], &b.keys[..]].concat(),
                children: [&a.children[..], &b.children[..]].concat(),
            }),
            _ => return None, // Neighbours sit at one level; read_node checked their kinds.
        };
        (node.encoded_len() <= PAYLOAD_BYTES).then_some(node)
    }

    /// Cuts an overflowing node into pieces that fit, with the separators between them.
    fn split(self) -> (Vec<Node>, Vec<u64>) {
        match self {
            Node::Leaf(slots) => {
                let sizes: Vec<usize> = slots.iter().map(Slot::encoded_len).collect();
                let straddles = |m: usize| slots[m - 1].key.hash == slots[m].key.hash;
                let pieces: Vec<Vec<Slot>> = plan_split(&sizes, LEAF_HEADER_BYTES, false, straddles)
                    .into_iter()
                    .map(|r| slots[r].to_vec())
                    .collect();
                let separators =
                    pieces.windows(2).map(|w| separator(&w[0][w[0].len() - 1].key, &w[1][0].key)).collect();
                (pieces.into_iter().map(Node::Leaf).collect(), separators)
            }
            Node::Inner(inner) => {
                // Separator j goes with child j + 1; a piece over separators `r` keeps
                // children r.start..=r.end, and separator r.end moves up to the parent.
                let sizes = vec![SEPARATOR_BYTES; inner.keys.len()];
                let ranges = plan_split(&sizes, INNER_HEADER_BYTES, true, |_| false);
                let separators = ranges[..ranges.len() - 1].iter().map(|r| inner.keys[r.end]).collect();
                let pieces = ranges
                    .into_iter()
                    .map(|r| {
                        let children = inner.children[r.start..=r.end].to_vec();
                        Node::Inner(Inner { keys: inner.keys[r].to_vec(), children })
                    })
                    .collect();
                (pieces, separators)
            }
        }
    }
}

/// How to cut the items of an overflowing node (of `sizes` bytes, after `header_bytes`)
/// into pieces that each fit in a sector: two pieces of nearly equal bytes when possible,
/// preferring a cut where `straddles(cut)` is false, else greedily (only long names need
/// three). With `promote` (inner nodes) the item between two pieces moves up to the
/// parent instead of staying in either.
fn plan_split(
    sizes: &[usize],
    header_bytes: usize,
    promote: bool,
    straddles: impl Fn(usize) -> bool,
) -> Vec<Range<usize>> {
    let n = sizes.len();
    let skip = usize::from(promote);
    let bytes = |r: Range<usize>| header_bytes + sizes[r].iter().sum::<usize>();
    let best = (1 - skip..n)
        .filter(|&m| bytes(0..m) <= PAYLOAD_BYTES && bytes(m + skip..n) <= PAYLOAD_BYTES)
        .min_by_key(|&m| (straddles(m), bytes(0..m).abs_diff(bytes(m + skip..n))));
    if let Some(m) = best {
        return vec![0..m, m + skip..n];
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    loop {
        let mut end = start;
        while end < n && bytes(start..end + 1) <= PAYLOAD_BYTES {
            end += 1;
        }
        assert!(end > start || start == n, "an item larger than a sector");
        pieces.push(start..end);
        if end == n {
            return pieces;
        }
        start = end + skip;
    }
}

/// The header's fields (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    /// Invariant: 1..=MAX_HEIGHT.
    height: u32,
    /// Invariant: 1..next_unused.
    root: u64,
    entries: u64,
    /// Invariant: >= 2 (the header and the root).
    next_unused: u64,
    /// Invariant: < next_unused; HEADER_SECTOR exactly when free_count is 0.
    free_head: u64,
    free_count: u64,
}

impl Header {
    fn encode(&self) -> [u8; PAYLOAD_BYTES] {
        let mut w = Writer::default();
        w.put(&HEADER_MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&self.height.to_le_bytes());
        for field in [self.root, self.entries, self.next_unused, self.free_head, self.free_count] {
            w.put(&field.to_le_bytes());
        }
        w.buf
    }

    fn decode(buf: &[u8; PAYLOAD_BYTES]) -> Result<Header, DirError> {
        let corrupt = |what: String| DirError::Corrupt(format!("directory header: {what}"));
        let mut r = Reader { buf, pos: 0 };
        let magic = r.bytes(8).map_err(corrupt)?;
        if magic != HEADER_MAGIC {
            return Err(corrupt(format!("bad magic {magic:02x?}")));
        }
        let version = r.u32().map_err(corrupt)?;
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("unknown format version {version}")));
        }
        let height = r.u32().map_err(corrupt)?;
        let mut field = || r.u64().map_err(corrupt);
        let h = Header {
            height,
            root: field()?,
            entries: field()?,
            next_unused: field()?,
            free_head: field()?,
            free_count: field()?,
        };
        let valid = (1..=MAX_HEIGHT).contains(&h.height)
            && h.next_unused >= 2
            && (1..h.next_unused).contains(&h.root)
            && h.free_head < h.next_unused
            && h.free_count < h.next_unused
            && (h.free_head == HEADER_SECTOR) == (h.free_count == 0);
        if !valid {
            return Err(corrupt(format!("impossible fields {h:?}")));
        }
        Ok(h)
    }
}

/// Reads little-endian fields off a payload, failing instead of running off its end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos + n;
        let bytes = self.buf.get(self.pos..end).ok_or("contents run past the end of the sector")?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }
}

/// Builds a payload; callers check sizes first, so running off the end is a bug.
struct Writer {
    buf: [u8; PAYLOAD_BYTES],
    pos: usize,
}

impl Default for Writer {
    fn default() -> Writer {
        Writer { buf: [0; PAYLOAD_BYTES], pos: 0 }
    }
}

impl Writer {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

// ---------------------------------------------------------------------------------------
// The tree

/// One node on a path from the root, and where the path goes on from it.
struct Frame {
    sector: u64,
    node: Node,
    /// In an inner node, the child the path takes; in a leaf, the position of the key
    /// sought (where it is or would go), or of the next entry for a listing cursor.
    idx: usize,
    bounds: Bounds,
}

impl Frame {
    /// Whether this leaf frame's position holds `key`.
    fn holds(&self, key: &Key) -> bool {
        self.node.slots().get(self.idx).is_some_and(|s| s.key == *key)
    }
}

/// One operation's view of a directory: its sectors, its hash and its header.
struct Tree<'a, S: DirSectors> {
    io: &'a mut S,
    /// `name_hash`, except in tests that force collisions.
    hash: fn(&[u8]) -> u64,
    header: Header,
}

impl<'a, S: DirSectors> Tree<'a, S> {
    /// Writes an empty directory: the header and an empty root leaf.
    fn create(io: &'a mut S, hash: fn(&[u8]) -> u64) -> Result<(), DirError> {
        let header = Header {
            height: 1,
            root: 1,
            entries: 0,
            next_unused: 2,
            free_head: HEADER_SECTOR,
            free_count: 0,
        };
        let mut tree = Tree { io, hash, header };
        tree.write_node(header.root, &Node::Leaf(Vec::new()))?;
        tree.write_header()
    }

    fn open(io: &'a mut S, hash: fn(&[u8]) -> u64) -> Result<Tree<'a, S>, DirError> {
        let header = Header::decode(&io.read(HEADER_SECTOR)?)?;
        Ok(Tree { io, hash, header })
    }

    fn key(&self, name: &[u8]) -> Result<Key, DirError> {
        validate_name(name)?;
        Ok(Key { hash: (self.hash)(name), name: name.to_vec() })
    }

    fn lookup(&mut self, name: &[u8]) -> Result<Option<DirEntry>, DirError> {
        let key = self.key(name)?;
        let path = self.seek(&key)?;
        let leaf = path.last().expect("a path ends at a leaf");
        Ok(leaf.holds(&key).then(|| leaf.node.slots()[leaf.idx].clone().into_entry()))
    }

    /// Adds `entry`; if its name is present, overwrites it and returns the old entry when
    /// `overwrite`, else fails with `Exists`.
    fn insert(&mut self, entry: &DirEntry, overwrite: bool) -> Result<Option<DirEntry>, DirError> {
        let key = self.key(&entry.name)?;
        let mut path = self.seek(&key)?;
        let leaf = path.last_mut().expect("a path ends at a leaf");
        let slot = Slot { key, ino: entry.ino, kind: entry.kind };
        if leaf.holds(&slot.key) {
            if !overwrite {
                return Err(DirError::Exists);
            }
            // Same name, same size: the leaf cannot overflow.
            let old = std::mem::replace(&mut leaf.node.slots_mut()[leaf.idx], slot);
            self.write_node(leaf.sector, &leaf.node)?;
            return Ok(Some(old.into_entry()));
        }
        leaf.node.slots_mut().insert(leaf.idx, slot);
        self.header.entries =
            self.header.entries.checked_add(1).ok_or_else(|| corrupt("entry count overflows"))?;
        self.write_grown(path)?;
        self.write_header()?;
        Ok(None)
    }

    fn remove(&mut self, name: &[u8]) -> Result<DirEntry, DirError> {
        let key = self.key(name)?;
        let mut path = self.seek(&key)?;
        let leaf = path.last_mut().expect("a path ends at a leaf");
        if !leaf.holds(&key) {
            return Err(DirError::NotFound);
        }
        let old = leaf.node.slots_mut().remove(leaf.idx);
        self.header.entries = self
            .header
            .entries
            .checked_sub(1)
            .ok_or_else(|| corrupt("entry count is 0 but an entry exists"))?;
        self.write_shrunk(path)?;
        self.write_header()?;
        Ok(old.into_entry())
    }

    fn list(&mut self, after_cookie: u64, max: usize) -> Result<Vec<(u64, DirEntry)>, DirError> {
        let Some(start) = first_hash_after(after_cookie).filter(|_| max > 0) else {
            return Ok(Vec::new());
        };
        let mut cursor = self.seek(&Key { hash: start, name: Vec::new() })?;
        let mut page: Vec<(u64, DirEntry)> = Vec::new();
        let mut last: Option<Key> = None;
        while let Some(slot) = self.next_slot(&mut cursor)? {
            if last.as_ref().is_some_and(|last| *last >= slot.key) {
                return Err(corrupt("keys out of order between leaves"));
            }
            let cookie = cookie(slot.key.hash);
            if page.len() >= max && page[page.len() - 1].0 != cookie {
                break;
            }
            last = Some(slot.key.clone());
            page.push((cookie, slot.into_entry()));
        }
        if page.len() > max {
            // The page ran on through a run of entries sharing a cookie: end it before the
            // run, unless the run is all of it.
            let run_cookie = page[page.len() - 1].0;
            let run_start = page.iter().position(|(c, _)| *c == run_cookie).expect("the last one matches");
            if run_start > 0 {
                page.truncate(run_start);
            }
        }
        Ok(page)
    }

    fn check(&mut self) -> Result<(), DirError> {
        let mut seen = HashSet::from([HEADER_SECTOR]);
        let entries =
            self.check_subtree(self.header.root, self.header.height, Bounds::default(), &mut seen)?;
        if entries != self.header.entries {
            return Err(corrupt(format!(
                "header counts {} entries, the leaves hold {entries}",
                self.header.entries
            )));
        }
        let (mut sector, mut free) = (self.header.free_head, 0);
        while sector != HEADER_SECTOR {
            if free == self.header.free_count || !seen.insert(sector) {
                return Err(corrupt(format!("free sector {sector} is in the tree, or the free list loops")));
            }
            sector = self.read_free(sector)?;
            free += 1;
        }
        if free != self.header.free_count {
            return Err(corrupt(format!(
                "free list holds {free} sectors, header says {}",
                self.header.free_count
            )));
        }
        if seen.len() as u64 != self.header.next_unused {
            let lost = self.header.next_unused - seen.len() as u64;
            return Err(corrupt(format!("{lost} sectors are neither in the tree nor free")));
        }
        Ok(())
    }

    /// Checks the subtree at `sector` (its root at `level`), returning its entry count.
    fn check_subtree(
        &mut self,
        sector: u64,
        level: u32,
        bounds: Bounds,
        seen: &mut HashSet<u64>,
    ) -> Result<u64, DirError> {
        if !seen.insert(sector) {
            return Err(corrupt(format!("sector {sector} is reachable twice")));
        }
        match self.read_node(sector, level, bounds)? {
            Node::Leaf(slots) => Ok(slots.len() as u64),
            Node::Inner(inner) => {
                let mut entries = 0u64;
                for i in 0..inner.children.len() {
                    let (child, child_bounds) = inner.child(i, bounds);
                    entries =
                        entries.saturating_add(self.check_subtree(child, level - 1, child_bounds, seen)?);
                }
                Ok(entries)
            }
        }
    }

    /// The path to where `target` is or would go: its leaf, positioned at the first key not
    /// below it. The descent takes the leftmost leaf that may hold the target's hash; only
    /// when that hash equals the leaf's upper bound (a run of one hash straddling leaves)
    /// can smaller keys go on in the next leaf, and then the search walks on.
    fn seek(&mut self, target: &Key) -> Result<Vec<Frame>, DirError> {
        let mut path = Vec::with_capacity(self.header.height as usize);
        loop {
            self.enter(&mut path, Some(target))?;
            let leaf = &path[path.len() - 1];
            let Node::Leaf(slots) = &leaf.node else { continue };
            if leaf.idx < slots.len() || leaf.bounds.hi.is_none_or(|hi| target.hash < hi) {
                return Ok(path);
            }
            // Every key here is smaller, and the next leaf may hold this hash too. It
            // exists (there is a separator to the right); enter it from its parent.
            while path.last().is_some_and(|f| f.idx + 1 >= f.node.children_len()) {
                path.pop();
            }
            let Some(frame) = path.last_mut() else {
                return Err(corrupt("a leaf's upper bound has no leaf beyond it"));
            };
            frame.idx += 1;
        }
    }

    /// Extends `path` by one node: the root if `path` is empty, else the child that its last
    /// (inner) frame points at. The new frame points where `target` is or would go, or at
    /// its first child or entry.
    fn enter(&mut self, path: &mut Vec<Frame>, target: Option<&Key>) -> Result<(), DirError> {
        let (sector, bounds) = match path.last() {
            None => (self.header.root, Bounds::default()),
            Some(f) => f.node.inner().child(f.idx, f.bounds),
        };
        if path.iter().any(|f| f.sector == sector) {
            return Err(corrupt(format!("node {sector} is its own ancestor")));
        }
        // Inner nodes sit at level >= 2 (read_node checks), so this stays >= 1.
        let level = self.header.height - path.len() as u32;
        let node = self.read_node(sector, level, bounds)?;
        let idx = match (&node, target) {
            (_, None) => 0,
            (Node::Leaf(slots), Some(t)) => slots.partition_point(|s| s.key < *t),
            (Node::Inner(inner), Some(t)) => inner.route(t.hash),
        };
        path.push(Frame { sector, node, idx, bounds });
        Ok(())
    }

    /// The entry at the listing cursor `path`, moving the cursor past it; `None` after the
    /// last entry.
    fn next_slot(&mut self, path: &mut Vec<Frame>) -> Result<Option<Slot>, DirError> {
        loop {
            let leaf = path.last_mut().expect("a cursor ends at a leaf");
            if let Some(slot) = leaf.node.slots().get(leaf.idx) {
                let slot = slot.clone();
                leaf.idx += 1;
                return Ok(Some(slot));
            }
            // This leaf is done: climb to the nearest ancestor with a child further right,
            // then go down to the leftmost leaf under that child.
            path.pop();
            while path.last().is_some_and(|f| f.idx + 1 >= f.node.children_len()) {
                path.pop();
            }
            let Some(frame) = path.last_mut() else { return Ok(None) };
            frame.idx += 1;
            while let Some(Node::Inner(_)) = path.last().map(|f| &f.node) {
                self.enter(path, None)?;
            }
        }
    }

    /// Reads node `sector`, expected at `level` (1 = leaf) with its hashes in `bounds`.
    fn read_node(&mut self, sector: u64, level: u32, bounds: Bounds) -> Result<Node, DirError> {
        if sector == HEADER_SECTOR || sector >= self.header.next_unused {
            return Err(corrupt(format!("node pointer {sector} outside 1..{}", self.header.next_unused)));
        }
        let node =
            Node::decode(&self.io.read(sector)?).map_err(|e| corrupt(format!("sector {sector}: {e}")))?;
        let problem = match &node {
            Node::Leaf(_) if level != 1 => Some("a leaf above the leaf level"),
            Node::Inner(_) if level == 1 => Some("an inner node at the leaf level"),
            Node::Leaf(slots) if slots.is_empty() && level != self.header.height => Some("an empty leaf"),
            Node::Leaf(slots) if slots.iter().any(|s| (self.hash)(&s.key.name) != s.key.hash) => {
                Some("an entry whose hash does not match its name")
            }
            _ => match node.hash_range() {
                Some((first, last))
                    if bounds.lo.is_some_and(|lo| first < lo) || bounds.hi.is_some_and(|hi| last > hi) =>
                {
                    Some("hashes outside the range its parent gives")
                }
                _ => None,
            },
        };
        match problem {
            Some(problem) => Err(corrupt(format!("sector {sector}: {problem}"))),
            None => Ok(node),
        }
    }

    fn write_node(&mut self, sector: u64, node: &Node) -> Result<(), DirError> {
        self.io.write(sector, &node.encode())
    }

    fn write_header(&mut self) -> Result<(), DirError> {
        self.io.write(HEADER_SECTOR, &self.header.encode())
    }

    /// Writes the last node of `path`, which has grown by an entry, splitting it and then
    /// its ancestors as far as they overflow; a split root gets a new root above it.
    fn write_grown(&mut self, mut path: Vec<Frame>) -> Result<(), DirError> {
        let mut frame = path.pop().expect("a path ends at a leaf");
        loop {
            let new_siblings = self.write_split(frame.sector, frame.node)?;
            if new_siblings.is_empty() {
                return Ok(());
            }
            frame = match path.pop() {
                Some(parent) => parent,
                None => {
                    if self.header.height == MAX_HEIGHT {
                        return Err(corrupt(format!("directory tree would exceed {MAX_HEIGHT} levels")));
                    }
                    let sector = self.alloc()?;
                    let old_root = std::mem::replace(&mut self.header.root, sector);
                    self.header.height += 1;
                    let node = Node::Inner(Inner { keys: Vec::new(), children: vec![old_root] });
                    Frame { sector, node, idx: 0, bounds: Bounds::default() }
                }
            };
            let (inner, at) = (frame.node.inner_mut(), frame.idx);
            inner.keys.splice(at..at, new_siblings.iter().map(|&(key, _)| key));
            inner.children.splice(at + 1..at + 1, new_siblings.iter().map(|&(_, sector)| sector));
        }
    }

    /// Writes `node` at `sector`, split if it does not fit: the first piece stays at
    /// `sector`; the others, returned with their separators, go to new sectors.
    fn write_split(&mut self, sector: u64, node: Node) -> Result<Vec<(u64, u64)>, DirError> {
        if node.encoded_len() <= PAYLOAD_BYTES {
            self.write_node(sector, &node)?;
            return Ok(Vec::new());
        }
        let (pieces, separators) = node.split();
        let mut sectors = vec![sector];
        for _ in 1..pieces.len() {
            sectors.push(self.alloc()?);
        }
        for (&sector, piece) in sectors.iter().zip(&pieces) {
            self.write_node(sector, piece)?;
        }
        Ok(separators.into_iter().zip(sectors.into_iter().skip(1)).collect())
    }

    /// Writes the last node of `path`, which has lost an entry or a child. An empty node
    /// leaves its parent; one under a quarter full merges with a neighbour if they fit in
    /// one sector; either way the parent has changed and gets the same treatment. At the
    /// top, an inner root with one child gives way to it.
    fn write_shrunk(&mut self, mut path: Vec<Frame>) -> Result<(), DirError> {
        while path.len() > 1 {
            let frame = path.pop().expect("len > 1");
            let level = self.header.height - path.len() as u32;
            let parent = path.last_mut().expect("len > 1");
            if frame.node.is_empty() {
                self.free(frame.sector)?;
                parent.node.inner_mut().remove_child(parent.idx);
                continue;
            }
            if frame.node.encoded_len() < MERGE_BELOW_BYTES
                && self.merge_with_neighbour(parent, &frame, level)?
            {
                continue;
            }
            return self.write_node(frame.sector, &frame.node);
        }
        let Frame { mut sector, mut node, .. } = path.pop().expect("a path starts at the root");
        let mut changed = true;
        while let Node::Inner(inner) = &node {
            match inner.children[..] {
                [] => {
                    // The last leaf went: the directory is empty again.
                    node = Node::Leaf(Vec::new());
                    self.header.height = 1;
                    changed = true;
                }
                [only] => {
                    self.free(sector)?;
                    (sector, self.header.root, self.header.height) = (only, only, self.header.height - 1);
                    node = self.read_node(only, self.header.height, Bounds::default())?;
                    changed = false;
                }
                _ => break,
            }
        }
        if changed {
            self.write_node(sector, &node)?;
        }
        Ok(())
    }

    /// Merges `child` (at `level`, under `parent` at `parent.idx`) with a neighbour when the
    /// two fit in one sector: writes the merged node, frees the other sector and updates
    /// `parent` in memory. Returns whether it merged.
    fn merge_with_neighbour(
        &mut self,
        parent: &mut Frame,
        child: &Frame,
        level: u32,
    ) -> Result<bool, DirError> {
        let (i, inner) = (parent.idx, parent.node.inner());
        if inner.children.len() < 2 {
            return Ok(false);
        }
        let (left, right) = if i + 1 < inner.children.len() { (i, i + 1) } else { (i - 1, i) };
        let (neighbour, bounds) = inner.child(if left == i { right } else { left }, parent.bounds);
        if neighbour == child.sector {
            return Err(corrupt(format!("sector {neighbour} is two children of one node")));
        }
        let neighbour_node = self.read_node(neighbour, level, bounds)?;
        let (left_node, right_node) =
            if left == i { (&child.node, &neighbour_node) } else { (&neighbour_node, &child.node) };
        let Some(merged) = Node::merged(left_node, inner.keys[left], right_node) else {
            return Ok(false);
        };
        let (left_sector, right_sector) = (inner.children[left], inner.children[right]);
        self.write_node(left_sector, &merged)?;
        self.free(right_sector)?;
        parent.node.inner_mut().remove_child(right);
        Ok(true)
    }

    /// A sector for a new node: the head of the free list, or a never-used one.
    fn alloc(&mut self) -> Result<u64, DirError> {
        let sector = self.header.free_head;
        if sector == HEADER_SECTOR {
            let next =
                self.header.next_unused.checked_add(1).ok_or_else(|| corrupt("sector numbers run out"))?;
            return Ok(std::mem::replace(&mut self.header.next_unused, next));
        }
        self.header.free_head = self.read_free(sector)?;
        self.header.free_count -= 1;
        if (self.header.free_head == HEADER_SECTOR) != (self.header.free_count == 0) {
            return Err(corrupt("free list length disagrees with the header"));
        }
        Ok(sector)
    }

    /// Puts `sector` on the free list.
    fn free(&mut self, sector: u64) -> Result<(), DirError> {
        let mut w = Writer::default();
        w.put(&FREE_MAGIC);
        w.pos = 8;
        w.put(&self.header.free_head.to_le_bytes());
        self.io.write(sector, &w.buf)?;
        self.header.free_head = sector;
        self.header.free_count += 1;
        Ok(())
    }

    /// Reads free sector `sector`, returning the next one on the list.
    fn read_free(&mut self, sector: u64) -> Result<u64, DirError> {
        let buf = self.io.read(sector)?;
        let next = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        if buf[..4] != FREE_MAGIC || next >= self.header.next_unused || next == sector {
            return Err(corrupt(format!(
                "sector {sector} on the free list is not a well-formed free sector"
            )));
        }
        Ok(next)
    }
}

fn corrupt(what: impl Into<String>) -> DirError {
    DirError::Corrupt(what.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, HashMap};

    /// Sectors in memory, counting what was asked of them.
    #[derive(Clone, Default)]
    struct MemSectors {
        sectors: HashMap<u64, [u8; PAYLOAD_BYTES]>,
        reads: u64,
        writes: u64,
    }

    impl DirSectors for MemSectors {
        fn read(&mut self, n: u64) -> Result<[u8; PAYLOAD_BYTES], DirError> {
            self.reads += 1;
            Ok(self.sectors.get(&n).copied().unwrap_or([0; PAYLOAD_BYTES]))
        }

        fn write(&mut self, n: u64, payload: &[u8; PAYLOAD_BYTES]) -> Result<(), DirError> {
            self.writes += 1;
            self.sectors.insert(n, *payload);
            Ok(())
        }
    }

    /// A directory in memory under a chosen hash.
    struct TestDir {
        io: MemSectors,
        hash: fn(&[u8]) -> u64,
    }

    impl TestDir {
        fn new(hash: fn(&[u8]) -> u64) -> TestDir {
            let mut io = MemSectors::default();
            Tree::create(&mut io, hash).unwrap();
            TestDir { io, hash }
        }

        fn tree(&mut self) -> Result<Tree<'_, MemSectors>, DirError> {
            Tree::open(&mut self.io, self.hash)
        }

        fn insert(&mut self, name: &[u8], ino: u64) -> Result<(), DirError> {
            self.tree()?.insert(&entry(name, ino), false).map(|_| ())
        }

        fn replace(&mut self, name: &[u8], ino: u64) -> Result<Option<DirEntry>, DirError> {
            self.tree()?.insert(&entry(name, ino), true)
        }

        fn remove(&mut self, name: &[u8]) -> Result<DirEntry, DirError> {
            self.tree()?.remove(name)
        }

        fn lookup(&mut self, name: &[u8]) -> Result<Option<DirEntry>, DirError> {
            self.tree()?.lookup(name)
        }

        fn list(&mut self, after: u64, max: usize) -> Result<Vec<(u64, DirEntry)>, DirError> {
            self.tree()?.list(after, max)
        }

        fn list_all(&mut self, page_max: usize) -> Result<Vec<(u64, DirEntry)>, DirError> {
            let mut all: Vec<(u64, DirEntry)> = Vec::new();
            loop {
                let after = all.last().map_or(0, |(c, _)| *c);
                let page = self.list(after, page_max)?;
                if page.is_empty() {
                    return Ok(all);
                }
                assert!(page[0].0 > after, "a page starts after its cookie");
                all.extend(page);
            }
        }

        fn header(&mut self) -> Header {
            self.tree().unwrap().header
        }

        fn check(&mut self) -> Result<(), DirError> {
            self.tree()?.check()
        }
    }

    fn entry(name: &[u8], ino: u64) -> DirEntry {
        DirEntry { name: name.to_vec(), ino, kind: (ino % 7) as u8 }
    }

    /// Ten hashes, in pairs that share a cookie: collisions of both kinds everywhere.
    fn few_hashes(name: &[u8]) -> u64 {
        let h = name_hash(name);
        (h % 5).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h & 1)
    }

    /// Every name collides.
    fn one_hash(_: &[u8]) -> u64 {
        42
    }

    fn is_corrupt<T: std::fmt::Debug>(r: Result<T, DirError>) -> bool {
        matches!(r, Err(DirError::Corrupt(_)))
    }

    #[test]
    fn hash_is_stable() {
        // The hash is on disk. These values were computed independently (FNV-1a 64 with
        // offset 0xcbf29ce484222325 and prime 0x100000001b3, then fmix64).
        assert_eq!(name_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(name_hash(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(name_hash(b"hello.txt"), 0x2598_1a84_9d7b_07e0);
        let all_bytes: Vec<u8> = (1..=255).collect();
        assert_eq!(name_hash(&all_bytes), 0xd4df_aa42_d46e_dbc8);
    }

    #[test]
    fn cookies_fit_fuse_offsets_and_follow_hash_order() {
        assert_eq!(cookie(0), 1);
        assert_eq!(cookie(u64::MAX), i64::MAX as u64);
        for c in [0, 1, 2, 77, i64::MAX as u64 - 1] {
            let h = first_hash_after(c).unwrap();
            assert!(cookie(h) > c);
            assert!(h == 0 || cookie(h - 1) <= c);
        }
        assert_eq!(first_hash_after(i64::MAX as u64), None);
        assert_eq!(first_hash_after(u64::MAX), None);
    }

    #[test]
    fn names_are_validated() {
        let mut d = TestDir::new(name_hash);
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert_eq!(d.insert(bad, 1), Err(DirError::InvalidName), "{bad:?}");
            assert_eq!(d.lookup(bad), Err(DirError::InvalidName));
            assert_eq!(d.remove(bad), Err(DirError::InvalidName));
        }
        assert_eq!(d.insert(&[b'x'; NAME_MAX + 1], 1), Err(DirError::NameTooLong));
        assert_eq!(d.insert(&[b'/'; NAME_MAX + 1], 1), Err(DirError::NameTooLong));
        d.insert(&[b'x'; NAME_MAX], 1).unwrap();
        d.insert(b"...", 2).unwrap();
        d.insert(&[0xff, 0x80, b' '], 3).unwrap();
        assert_eq!(d.list_all(10).unwrap().len(), 3);
        assert_eq!(d.insert(b"...", 4), Err(DirError::Exists));
        assert_eq!(d.remove(b"....."), Err(DirError::NotFound));
        d.check().unwrap();
    }

    #[test]
    fn public_functions_work_together() {
        let mut io = MemSectors::default();
        init(&mut io).unwrap();
        assert_eq!(len(&mut io), Ok(0));
        insert(&mut io, &entry(b"a", 1)).unwrap();
        assert_eq!(insert(&mut io, &entry(b"a", 2)), Err(DirError::Exists));
        assert_eq!(replace(&mut io, &entry(b"a", 3)), Ok(Some(entry(b"a", 1))));
        assert_eq!(replace(&mut io, &entry(b"b", 4)), Ok(None));
        assert_eq!(lookup(&mut io, b"a"), Ok(Some(entry(b"a", 3))));
        assert_eq!(len(&mut io), Ok(2));
        assert_eq!(list(&mut io, 0, 10).unwrap().len(), 2);
        assert_eq!(remove(&mut io, b"a"), Ok(entry(b"a", 3)));
        assert_eq!(remove(&mut io, b"a"), Err(DirError::NotFound));
        assert_eq!(sectors_in_use(&mut io), Ok(2));
        check(&mut io).unwrap();
    }

    #[test]
    fn split_plans_fit() {
        let never = |_| false;
        // Three long entries that cannot go two ways.
        assert_eq!(plan_split(&[240, 273, 260], LEAF_HEADER_BYTES, false, never), vec![0..1, 1..2, 2..3]);
        // Balanced when it can be.
        let sizes = [30; 20];
        assert_eq!(plan_split(&sizes, LEAF_HEADER_BYTES, false, never), vec![0..10, 10..20]);
        assert_eq!(plan_split(&sizes, INNER_HEADER_BYTES, true, never), vec![0..9, 10..20]);
        // Off balance rather than through a run of one hash, when that fits.
        assert_eq!(plan_split(&sizes, LEAF_HEADER_BYTES, false, |m| m != 7), vec![0..7, 7..20]);
        // A full inner node splits evenly.
        let full = [SEPARATOR_BYTES; 31];
        assert_eq!(plan_split(&full, INNER_HEADER_BYTES, true, never), vec![0..15, 16..31]);
    }

    #[test]
    fn separators_send_each_hash_to_its_leaf() {
        let k = |hash, name: &[u8]| Key { hash, name: name.to_vec() };
        assert_eq!(separator(&k(1, b"zzz"), &k(9, b"aaa")), 2);
        assert_eq!(separator(&k(5, b"abc"), &k(5, b"abd")), 5);
        let inner = Inner { keys: vec![2, 5, 5, 9], children: vec![10, 11, 12, 13, 14] };
        assert_eq!(inner.route(1), 0);
        assert_eq!(inner.route(2), 0); // hash 2 may sit in child 0 or 1 (a straddle)
        assert_eq!(inner.route(3), 1);
        assert_eq!(inner.route(5), 1); // the run of 5 starts in child 1
        assert_eq!(inner.route(u64::MAX), 4);
    }

    // -----------------------------------------------------------------------------------
    // Against a model

    #[derive(Clone, Debug)]
    enum Op {
        Insert(Vec<u8>, u64),
        Remove(Vec<u8>),
        Replace(Vec<u8>, u64),
        Lookup(Vec<u8>),
        /// A page after the cookie of this name (present or not).
        PageAt(Vec<u8>, usize),
        /// A page after any cookie.
        Page(u64, usize),
    }

    fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
        let long = (0u8..6, 200usize..=NAME_MAX).prop_map(|(i, len)| {
            let mut name = vec![b'x'; len];
            name[len - 1] = b'0' + i;
            name
        });
        let bytes = proptest::collection::vec(1u8..=255, 1..=NAME_MAX)
            .prop_map(|n| n.into_iter().map(|b| if b == b'/' { b'_' } else { b }).collect::<Vec<u8>>())
            .prop_filter("not . or ..", |n| n != b"." && n != b"..");
        prop_oneof![
            3 => "[ab]{1,3}".prop_map(String::into_bytes),
            5 => "[a-e]{1,4}".prop_map(String::into_bytes),
            2 => long,
            1 => bytes,
        ]
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (name_strategy(), any::<u64>()).prop_map(|(n, i)| Op::Insert(n, i)),
            6 => name_strategy().prop_map(Op::Remove),
            3 => (name_strategy(), any::<u64>()).prop_map(|(n, i)| Op::Replace(n, i)),
            2 => name_strategy().prop_map(Op::Lookup),
            1 => (name_strategy(), 0usize..12).prop_map(|(n, m)| Op::PageAt(n, m)),
            1 => (any::<u64>(), 0usize..12).prop_map(|(c, m)| Op::Page(c, m)),
        ]
    }

    type Model = BTreeMap<Vec<u8>, u64>;

    /// The model's listing: every entry in (hash, name) order, with its cookie.
    fn model_listing(model: &Model, hash: fn(&[u8]) -> u64) -> Vec<(u64, DirEntry)> {
        let mut all: Vec<(u64, Vec<u8>, u64)> = model.iter().map(|(n, &i)| (hash(n), n.clone(), i)).collect();
        all.sort();
        all.into_iter().map(|(h, n, i)| (cookie(h), entry(&n, i))).collect()
    }

    /// The model's page: up to `max` entries after `after`, not ending inside a run of one
    /// cookie unless that run is the whole page.
    fn model_page(model: &Model, hash: fn(&[u8]) -> u64, after: u64, max: usize) -> Vec<(u64, DirEntry)> {
        let rest: Vec<_> = model_listing(model, hash).into_iter().filter(|(c, _)| *c > after).collect();
        let mut n = rest.len().min(max);
        if n > 0 && n < rest.len() && rest[n].0 == rest[n - 1].0 {
            let run = rest[n - 1].0;
            let run_start = rest.iter().position(|(c, _)| *c == run).unwrap();
            n = if run_start > 0 { run_start } else { rest.iter().take_while(|(c, _)| *c == run).count() };
        }
        rest[..n].to_vec()
    }

    fn run_against_model(ops: &[Op], hash: fn(&[u8]) -> u64) {
        let mut d = TestDir::new(hash);
        let mut model = Model::new();
        for op in ops {
            let name = match op {
                Op::Insert(name, ino) => {
                    let want = if model.contains_key(name) { Err(DirError::Exists) } else { Ok(()) };
                    if want.is_ok() {
                        model.insert(name.clone(), *ino);
                    }
                    assert_eq!(d.insert(name, *ino), want, "{op:?}");
                    name
                }
                Op::Remove(name) => {
                    let want = model.remove(name).map(|i| entry(name, i)).ok_or(DirError::NotFound);
                    assert_eq!(d.remove(name), want, "{op:?}");
                    name
                }
                Op::Replace(name, ino) => {
                    let want = model.insert(name.clone(), *ino).map(|i| entry(name, i));
                    assert_eq!(d.replace(name, *ino), Ok(want), "{op:?}");
                    name
                }
                Op::Lookup(name) => name,
                Op::PageAt(name, max) => {
                    let after = cookie(hash(name));
                    assert_eq!(d.list(after, *max).unwrap(), model_page(&model, hash, after, *max), "{op:?}");
                    name
                }
                Op::Page(after, max) => {
                    assert_eq!(
                        d.list(*after, *max).unwrap(),
                        model_page(&model, hash, *after, *max),
                        "{op:?}"
                    );
                    continue;
                }
            };
            assert_eq!(d.lookup(name).unwrap(), model.get(name).map(|&i| entry(name, i)), "after {op:?}");
            assert_eq!(d.list_all(7).unwrap(), model_listing(&model, hash), "after {op:?}");
            assert_eq!(d.header().entries, model.len() as u64);
            d.check().unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_model(ops in proptest::collection::vec(op_strategy(), 1..400)) {
            run_against_model(&ops, name_hash);
        }

        #[test]
        fn matches_model_with_colliding_hashes(ops in proptest::collection::vec(op_strategy(), 1..400)) {
            run_against_model(&ops, few_hashes);
        }

        #[test]
        fn matches_model_when_every_hash_is_equal(ops in proptest::collection::vec(op_strategy(), 1..250)) {
            run_against_model(&ops, one_hash);
        }
    }

    #[test]
    fn forced_collisions_stay_correct() {
        // Under one_hash every operation walks the one run: keep it smaller.
        for (hash, n) in [(few_hashes as fn(&[u8]) -> u64, 3000), (one_hash, 1000)] {
            let mut d = TestDir::new(hash);
            let names: Vec<Vec<u8>> = (0..n).map(|i| format!("n{i}").into_bytes()).collect();
            for (i, n) in names.iter().enumerate() {
                d.insert(n, i as u64).unwrap();
            }
            // Long names in one run: leaves of one or two entries, all straddles.
            for i in 0..300u64 {
                let mut n = vec![b'p'; 250];
                n.extend(format!("{i:03}").bytes());
                d.insert(&n, i).unwrap();
                assert_eq!(d.lookup(&n).unwrap().map(|e| e.ino), Some(i));
            }
            d.check().unwrap();
            for (i, n) in names.iter().enumerate() {
                assert_eq!(d.lookup(n).unwrap(), Some(entry(n, i as u64)));
            }
            assert_eq!(d.list_all(50).unwrap().len(), n + 300);
            for n in names.iter().step_by(2) {
                d.remove(n).unwrap();
            }
            d.check().unwrap();
            for (i, n) in names.iter().enumerate() {
                assert_eq!(d.lookup(n).unwrap().is_some(), i % 2 == 1);
            }
            assert_eq!(d.list_all(50).unwrap().len(), n / 2 + 300);
            assert!(d.header().height <= 4, "collisions do not deepen the tree");
        }
    }

    // -----------------------------------------------------------------------------------
    // Size and cost

    #[test]
    fn large_directory_reads_few_sectors_per_operation() {
        const N: u64 = 100_000;
        let mut d = TestDir::new(name_hash);
        let name = |i: u64| format!("file-{i:06}").into_bytes();
        let (mut insert_reads_max, mut insert_writes_max, mut insert_reads) = (0, 0, 0);
        for i in 0..N {
            let (reads, writes) = (d.io.reads, d.io.writes);
            d.insert(&name(i), i).unwrap();
            insert_reads_max = insert_reads_max.max(d.io.reads - reads);
            insert_writes_max = insert_writes_max.max(d.io.writes - writes);
            insert_reads += d.io.reads - reads;
        }
        let header = d.header();
        let (mut lookup_reads_max, mut lookup_reads) = (0, 0);
        for i in (0..N).chain(N..N + 1000) {
            let reads = d.io.reads;
            assert_eq!(d.lookup(&name(i)).unwrap().map(|e| e.ino), (i < N).then_some(i));
            lookup_reads_max = lookup_reads_max.max(d.io.reads - reads);
            lookup_reads += d.io.reads - reads;
        }
        let (mut remove_reads_max, mut remove_writes_max) = (0, 0);
        for i in (0..N).step_by(3) {
            let (reads, writes) = (d.io.reads, d.io.writes);
            d.remove(&name(i)).unwrap();
            remove_reads_max = remove_reads_max.max(d.io.reads - reads);
            remove_writes_max = remove_writes_max.max(d.io.writes - writes);
        }
        println!(
            "100k entries: height {}, {} sectors; per insert: reads max {insert_reads_max} mean {:.2}, \
             writes max {insert_writes_max}; per lookup: reads max {lookup_reads_max} mean {:.2}; \
             per remove: reads max {remove_reads_max}, writes max {remove_writes_max}",
            header.height,
            header.next_unused,
            insert_reads as f64 / N as f64,
            lookup_reads as f64 / (N + 1000) as f64,
        );
        assert!(header.height <= 4, "height {}", header.height);
        assert_eq!(lookup_reads_max, 1 + u64::from(header.height));
        assert!(insert_reads_max < 8 && lookup_reads_max < 8 && remove_reads_max < 12);
        d.check().unwrap();
    }

    #[test]
    fn paged_listing_returns_unchanged_entries_once_under_churn() {
        // Under few_hashes many names share a cookie, so only pages strictly increase.
        for (hash, distinct_cookies) in [(name_hash as fn(&[u8]) -> u64, true), (few_hashes, false)] {
            let mut d = TestDir::new(hash);
            let mut rng = SmallRng::seed_from_u64(7);
            for i in 0..2000 {
                d.insert(format!("keep-{i}").as_bytes(), i).unwrap();
            }
            let mut churn: Vec<Vec<u8>> = (0..1000).map(|i| format!("churn-{i}").into_bytes()).collect();
            for n in &churn {
                d.insert(n, 0).unwrap();
            }
            let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
            let (mut after, mut next_churn, mut pages) = (0, 1000, 0);
            loop {
                let page = d.list(after, 50).unwrap();
                if page.is_empty() {
                    break;
                }
                pages += 1;
                assert!(page[0].0 > after);
                for w in page.windows(2) {
                    if distinct_cookies {
                        assert!(w[0].0 < w[1].0, "cookies strictly increase");
                    } else {
                        assert!(w[0].0 <= w[1].0);
                    }
                }
                for (_, e) in &page {
                    *seen.entry(e.name.clone()).or_default() += 1;
                }
                after = page[page.len() - 1].0;
                // Other names come and go between pages.
                for _ in 0..20 {
                    let n = format!("churn-{next_churn}").into_bytes();
                    next_churn += 1;
                    d.insert(&n, 0).unwrap();
                    churn.push(n);
                    let victim = churn.swap_remove(rng.gen_range(0..churn.len()));
                    d.remove(&victim).unwrap();
                }
            }
            assert!(pages >= 5);
            for i in 0..2000 {
                assert_eq!(seen.get(format!("keep-{i}").as_bytes()), Some(&1), "keep-{i}");
            }
            assert!(seen.values().all(|&n| n == 1), "no name is returned twice");
            d.check().unwrap();
        }
    }

    #[test]
    fn insert_remove_churn_reuses_sectors() {
        let mut d = TestDir::new(name_hash);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut first_peak = 0;
        for round in 0..5 {
            let mut names: Vec<Vec<u8>> = (0..5000).map(|i| format!("r{round}-{i}").into_bytes()).collect();
            for n in &names {
                d.insert(n, 1).unwrap();
            }
            let header = d.header();
            let in_use = sectors_in_use(&mut d.io).unwrap();
            if round == 0 {
                first_peak = header.next_unused;
            }
            println!("round {round}: {in_use} sectors in use, directory spans {}", header.next_unused);
            assert!(header.next_unused <= first_peak + first_peak / 10, "round {round} grew the directory");
            names.shuffle(&mut rng);
            for n in &names {
                d.remove(n).unwrap();
            }
            assert_eq!(sectors_in_use(&mut d.io).unwrap(), 2, "header and an empty root leaf");
            assert_eq!(d.header().height, 1);
            d.check().unwrap();
        }

        // Steady churn around 1000 live names: the tree stays near its packed size.
        let mut live: Vec<Vec<u8>> = Vec::new();
        let mut max_in_use = 0;
        for i in 0..30_000u64 {
            if live.len() < 500 || (live.len() < 1500 && rng.gen_bool(0.5)) {
                let n = format!("steady-{i}").into_bytes();
                d.insert(&n, i).unwrap();
                live.push(n);
            } else {
                let victim = live.swap_remove(rng.gen_range(0..live.len()));
                d.remove(&victim).unwrap();
            }
            max_in_use = max_in_use.max(sectors_in_use(&mut d.io).unwrap());
        }
        let packed = 1500 * (18 + 12) / (PAYLOAD_BYTES - LEAF_HEADER_BYTES) as u64;
        println!("steady churn: at most {max_in_use} sectors in use; 1500 entries pack into {packed}");
        assert!(max_in_use < 2 * packed, "{max_in_use} sectors in use");
        d.check().unwrap();
    }

    // -----------------------------------------------------------------------------------
    // Corruption

    fn sample_dir() -> (TestDir, Vec<Vec<u8>>) {
        let mut d = TestDir::new(name_hash);
        let mut names: Vec<Vec<u8>> = (0..3000).map(|i| format!("f{i}").into_bytes()).collect();
        names.extend((0..40).map(|i| [vec![b'L'; 240], format!("{i}").into_bytes()].concat()));
        for (i, n) in names.iter().enumerate() {
            d.insert(n, i as u64).unwrap();
        }
        for (i, n) in names.iter().enumerate().take(3000) {
            if i % 3 != 0 {
                d.remove(n).unwrap(); // leaves merge: sectors go on the free list
            }
        }
        d.check().unwrap();
        assert!(d.header().free_count > 0);
        (d, names)
    }

    /// Runs every operation; any may fail, but only with `Corrupt`, and none may panic
    /// or hang.
    fn exercise(d: &mut TestDir, names: &[Vec<u8>]) -> bool {
        let mut corrupt_seen = false;
        let mut note = |r: Result<(), DirError>| match r {
            Ok(()) => {}
            Err(DirError::Corrupt(_)) => corrupt_seen = true,
            Err(DirError::Exists | DirError::NotFound) => {}
            Err(e) => panic!("unexpected {e:?}"),
        };
        note(d.check());
        for n in names.iter().step_by(13) {
            note(d.lookup(n).map(|_| ()));
        }
        let mut after = 0;
        for _ in 0..10_000 {
            match d.list(after, 200) {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    assert!(page[0].0 > after, "listing makes progress");
                    after = page[page.len() - 1].0;
                }
                Err(e) => {
                    note(Err(e));
                    break;
                }
            }
        }
        for (i, n) in names.iter().enumerate().step_by(31) {
            note(d.remove(n).map(|_| ()));
            note(d.insert(format!("new{i}").as_bytes(), 1));
            note(d.replace(n, 2).map(|_| ()));
        }
        note(d.check());
        corrupt_seen
    }

    #[test]
    fn random_bytes_in_a_node_give_corrupt_errors_not_panics() {
        let (d, names) = sample_dir();
        let next_unused = d.io.sectors.len() as u64;
        let mut rng = SmallRng::seed_from_u64(99);
        for round in 0..300 {
            let mut io = d.io.clone();
            let sector = rng.gen_range(1..next_unused);
            let payload = io.sectors.get_mut(&sector).unwrap();
            match round % 3 {
                0 => rng.fill(&mut payload[..]),
                1 => rng.fill(&mut payload[4..]), // past the magic: lengths, keys, pointers
                _ => {
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(0..PAYLOAD_BYTES);
                        payload[at] = if rng.gen_bool(0.5) { rng.gen() } else { rng.gen_range(0..4) };
                    }
                }
            }
            let mut broken = TestDir { io, hash: name_hash };
            let detected = exercise(&mut broken, &names);
            if round % 3 != 2 {
                assert!(detected, "round {round}: random sector {sector} went unnoticed");
            }
        }
    }

    #[test]
    fn structural_damage_is_detected() {
        let (d, names) = sample_dir();
        let header = TestDir { io: d.io.clone(), hash: name_hash }.header();
        assert!(header.height >= 3);
        let root = Node::decode(&d.io.sectors[&header.root]).unwrap();

        let damage = |f: &dyn Fn(&mut MemSectors)| {
            let mut broken = TestDir { io: d.io.clone(), hash: name_hash };
            f(&mut broken.io);
            assert!(exercise(&mut broken, &names), "damage went unnoticed");
            assert!(is_corrupt(broken.check()));
        };
        let set_root = |io: &mut MemSectors, node: &Node| {
            io.sectors.insert(header.root, node.encode());
        };

        // A child pointing back at its parent, at the header, past the end.
        for bad_child in [header.root, 0, header.next_unused, u64::MAX] {
            let mut node = root.clone();
            node.inner_mut().children[0] = bad_child;
            damage(&|io| set_root(io, &node));
        }
        // Two children that are the same sector.
        let mut node = root.clone();
        node.inner_mut().children[1] = node.inner().children[0];
        damage(&|io| set_root(io, &node));
        // The tree claims one level more or fewer than it has.
        for height in [header.height + 1, header.height - 1] {
            damage(&|io| {
                let h = Header { height, ..header };
                io.sectors.insert(HEADER_SECTOR, h.encode());
            });
        }
        // The entry count is off; the free list loops.
        damage(&|io| {
            io.sectors.insert(HEADER_SECTOR, Header { entries: header.entries + 1, ..header }.encode());
        });
        damage(&|io| {
            let mut free = io.sectors[&header.free_head];
            free[8..16].copy_from_slice(&header.free_head.to_le_bytes());
            io.sectors.insert(header.free_head, free);
        });
        // A leaf with a zero-length name; a leaf whose count runs past the sector.
        let leaf_sector = (1..header.next_unused)
            .find(|s| matches!(Node::decode(&d.io.sectors[s]), Ok(Node::Leaf(_))))
            .unwrap();
        for (at, value) in [(8 + 17, 0u8), (4, 0xff)] {
            damage(&|io| {
                io.sectors.get_mut(&leaf_sector).unwrap()[at] = value;
            });
        }
    }

    #[test]
    fn bad_header_is_corrupt_for_every_operation() {
        let (d, _) = sample_dir();
        for damage in [0usize, 8, 12] {
            let mut io = d.io.clone();
            io.sectors.get_mut(&HEADER_SECTOR).unwrap()[damage] ^= 0x5a;
            assert!(is_corrupt(lookup(&mut io, b"f1")));
            assert!(is_corrupt(insert(&mut io, &entry(b"g", 1))));
            assert!(is_corrupt(remove(&mut io, b"f1")));
            assert!(is_corrupt(replace(&mut io, &entry(b"f1", 1))));
            assert!(is_corrupt(list(&mut io, 0, 10)));
            assert!(is_corrupt(len(&mut io)));
            assert!(is_corrupt(sectors_in_use(&mut io)));
            assert!(is_corrupt(check(&mut io)));
        }
        // A directory that was never initialized reads as zeros.
        assert!(is_corrupt(lookup(&mut MemSectors::default(), b"a")));
    }
}
