//! Metadata sectors: every 512-byte metadata block starts with a version number, so that
//! log replay applies a record only if it is newer than what the disk holds.

/// Bytes in a sector, the unit of metadata versioning and logging.
pub const SECTOR_BYTES: usize = 512;
/// Bytes of the version that opens every metadata sector.
pub const VERSION_BYTES: usize = 8;
/// Bytes of a metadata sector after its version.
pub const PAYLOAD_BYTES: usize = SECTOR_BYTES - VERSION_BYTES;

/// One metadata sector: a little-endian u64 version, then the payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Sector(pub Box<[u8; SECTOR_BYTES]>);

impl Sector {
    /// An all-zero sector (version 0), as unwritten disk reads.
    pub fn zeroed() -> Sector {
        Sector(Box::new([0; SECTOR_BYTES]))
    }

    /// A sector from 512 bytes read from disk.
    pub fn from_bytes(bytes: &[u8]) -> Sector {
        let mut s = Sector::zeroed();
        s.0.copy_from_slice(&bytes[..SECTOR_BYTES]);
        s
    }

    /// The version.
    pub fn version(&self) -> u64 {
        u64::from_le_bytes(self.0[..VERSION_BYTES].try_into().expect("8 bytes"))
    }

    /// Sets the version.
    pub fn set_version(&mut self, v: u64) {
        self.0[..VERSION_BYTES].copy_from_slice(&v.to_le_bytes());
    }

    /// The payload after the version.
    pub fn payload(&self) -> &[u8] {
        &self.0[VERSION_BYTES..]
    }

    /// The payload, for writing.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.0[VERSION_BYTES..]
    }

    /// The whole sector.
    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

impl std::fmt::Debug for Sector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sector(v{})", self.version())
    }
}
