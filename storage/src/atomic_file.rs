//! Small files replaced as a whole, atomically and durably (Raft's term and vote),
//! and the directory-level helpers that make file names durable.
//!
//! On disk: `crc32 u32 LE | len u32 LE | bytes`, where the crc covers the length
//! field and the bytes, so a damaged length is caught as well as damaged bytes.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{CorruptAt, IoContext, StorageError};

const HEADER_BYTES: u64 = 8;

/// Replaces the file at `path` with `bytes` so that after a crash it holds either the
/// old contents or the new, never a mix: writes `path.tmp`, fsyncs it, renames it
/// over `path` and fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let len = u32::try_from(bytes.len()).map_err(|_| StorageError::RecordTooLarge {
        bytes: bytes.len() as u64,
        max_bytes: u64::from(u32::MAX),
    })?;
    let mut framed = Vec::with_capacity(bytes.len() + HEADER_BYTES as usize);
    framed.extend_from_slice(&checksum(len, bytes).to_le_bytes());
    framed.extend_from_slice(&len.to_le_bytes());
    framed.extend_from_slice(bytes);

    let tmp = with_suffix(path, ".tmp");
    let mut file = File::create(&tmp).at("create", &tmp)?;
    file.write_all(&framed).at("write", &tmp)?;
    file.sync_data().at("sync", &tmp)?;
    drop(file);
    fs::rename(&tmp, path).at("rename into place", path)?;
    sync_dir(parent_dir(path))
}

/// Reads a file written by [`write_atomic`]. `Ok(None)` if it does not exist;
/// [`StorageError::Corrupt`] if its length or crc does not check out.
pub fn read_checked(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at("open", path),
    };
    let file_bytes = file.metadata().at("stat", path)?.len();
    let corrupt = |at: u64, detail: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        at: CorruptAt::Offset(at),
        detail,
    };
    if file_bytes < HEADER_BYTES {
        return Err(corrupt(
            0,
            format!("file is {file_bytes} bytes, shorter than its {HEADER_BYTES}-byte header"),
        ));
    }
    let body_bytes = file_bytes - HEADER_BYTES;
    if body_bytes > u64::from(u32::MAX) {
        return Err(corrupt(0, format!("file is {file_bytes} bytes, longer than any valid one")));
    }
    let mut raw = Vec::with_capacity(file_bytes as usize);
    file.take(file_bytes).read_to_end(&mut raw).at("read", path)?;
    if raw.len() as u64 != file_bytes {
        return Err(corrupt(
            raw.len() as u64,
            format!("file shrank to {} bytes while being read", raw.len()),
        ));
    }
    let stored_crc = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
    if u64::from(len) != body_bytes {
        return Err(corrupt(4, format!("header says {len} bytes follow, the file holds {body_bytes}")));
    }
    let body = raw.split_off(HEADER_BYTES as usize);
    let actual_crc = checksum(len, &body);
    if actual_crc != stored_crc {
        return Err(corrupt(
            0,
            format!("crc mismatch: stored {stored_crc:#010x}, computed {actual_crc:#010x}"),
        ));
    }
    Ok(Some(body))
}

fn checksum(len: u32, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(bytes);
    hasher.finalize()
}

/// Makes the creations, removals and renames of entries in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).at("sync directory", dir)
}

/// The directory holding `path` ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// `path` with `suffix` appended to its file name: `a/b.dat` + `.crc` = `a/b.dat.crc`.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hard_state");
        write_atomic(&path, b"term 1 vote 2").unwrap();
        assert_eq!(read_checked(&path).unwrap().unwrap(), b"term 1 vote 2");
        write_atomic(&path, b"").unwrap();
        assert_eq!(read_checked(&path).unwrap().unwrap(), b"");
        write_atomic(&path, b"term 3").unwrap();
        assert_eq!(read_checked(&path).unwrap().unwrap(), b"term 3");
        assert!(!with_suffix(&path, ".tmp").exists());
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_checked(&dir.path().join("nothing")).unwrap(), None);
    }

    #[test]
    fn flipped_byte_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hard_state");
        write_atomic(&path, b"term 7 vote 3").unwrap();
        let mut raw = fs::read(&path).unwrap();
        raw[10] ^= 0x01;
        fs::write(&path, &raw).unwrap();
        let err = read_checked(&path).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { ref detail, .. } if detail.contains("crc")), "{err}");
    }

    #[test]
    fn bad_length_or_short_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hard_state");
        write_atomic(&path, b"term 7").unwrap();
        let raw = fs::read(&path).unwrap();

        fs::write(&path, &raw[..raw.len() - 1]).unwrap();
        let err = read_checked(&path).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");

        fs::write(&path, &raw[..3]).unwrap();
        let err = read_checked(&path).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");

        let mut bad_len = raw.clone();
        bad_len[4] ^= 0x80;
        fs::write(&path, &bad_len).unwrap();
        let err = read_checked(&path).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { at: CorruptAt::Offset(4), .. }), "{err}");
    }

    #[test]
    fn leftover_tmp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hard_state");
        write_atomic(&path, b"old").unwrap();
        fs::write(with_suffix(&path, ".tmp"), b"half-written").unwrap();
        assert_eq!(read_checked(&path).unwrap().unwrap(), b"old");
        write_atomic(&path, b"new").unwrap();
        assert_eq!(read_checked(&path).unwrap().unwrap(), b"new");
    }

    #[test]
    fn suffix_and_parent_helpers() {
        assert_eq!(with_suffix(Path::new("a/b.dat"), ".crc"), PathBuf::from("a/b.dat.crc"));
        assert_eq!(parent_dir(Path::new("file")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/file")), Path::new("a"));
    }
}
