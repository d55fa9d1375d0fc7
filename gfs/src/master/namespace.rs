//! The master's namespace (GFS §4.1): a table from full path names to files, with no
//! per-directory data structure; directories exist as the prefixes of file paths. Deleted
//! files move to a trash table, stamped with the deletion time, until garbage collection
//! reclaims them (GFS §4.4.1).

use crate::types::{ChunkHandle, FsError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest path accepted, in bytes.
pub const PATH_BYTES_MAX: usize = 4096;
/// Longest path component accepted, in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// A file: its chunks in order, and when and by which request it was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Chunk `i` holds bytes `[i * chunk_bytes, (i + 1) * chunk_bytes)` of the file.
    pub chunks: Vec<ChunkHandle>,
    /// Leader time of creation (ms since the Unix epoch).
    pub created_ms: u64,
    /// The request that made it (a retried create is recognised by it).
    pub op: u64,
}

/// A deleted file waiting in the trash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashEntry {
    /// The name it had.
    pub path: String,
    /// Leader time of deletion (ms since the Unix epoch).
    pub deleted_ms: u64,
    /// Its chunks, still referenced until it is purged.
    pub chunks: Vec<ChunkHandle>,
    /// The request that deleted it.
    pub op: u64,
}

/// One name in a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name within the directory.
    pub name: String,
    /// Whether it is a directory (a prefix of longer paths).
    pub is_dir: bool,
    /// Chunks of the file (0 for directories).
    pub chunks: u64,
}

/// Checks that `path` is absolute, has no empty, `.` or `..` components and is within
/// the length limits; `/` alone is the root directory, not a file name.
pub fn check_path(path: &str) -> Result<(), FsError> {
    let bad = |why: &str| Err(FsError::InvalidPath(path.to_string(), why.to_string()));
    if !path.starts_with('/') {
        return bad("must start with /");
    }
    if path.len() > PATH_BYTES_MAX {
        return bad("too long");
    }
    if path == "/" {
        return bad("the root is a directory");
    }
    for name in path[1..].split('/') {
        match name {
            "" => return bad("empty component (// or trailing /)"),
            "." | ".." => return bad(". and .. are not allowed"),
            n if n.len() > NAME_BYTES_MAX => return bad("component too long"),
            n if n.contains('\0') => return bad("NUL in a name"),
            _ => {}
        }
    }
    Ok(())
}

/// The directory prefix of `dir` for range scans: `/` for the root, else `dir/`.
fn dir_prefix(dir: &str) -> String {
    if dir == "/" {
        "/".to_string()
    } else {
        format!("{}/", dir.trim_end_matches('/'))
    }
}

/// Files by full path, and the trash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    files: BTreeMap<String, FileMeta>,
    /// Keyed by (deletion time, path): the oldest first, for purging.
    trash: BTreeMap<(u64, String), TrashEntry>,
}

impl Namespace {
    /// The file at `path`.
    pub fn file(&self, path: &str) -> Option<&FileMeta> {
        self.files.get(path)
    }

    /// The file at `path`, to change its chunk list.
    pub fn file_mut(&mut self, path: &str) -> Option<&mut FileMeta> {
        self.files.get_mut(path)
    }

    /// Every file, by path.
    pub fn files(&self) -> impl Iterator<Item = (&String, &FileMeta)> {
        self.files.iter()
    }

    /// Every file in the trash, oldest first.
    pub fn trash(&self) -> impl Iterator<Item = &TrashEntry> {
        self.trash.values()
    }

    /// Makes an empty file at `path`. A retry of the same request (same `op`) succeeds.
    pub fn create(&mut self, path: &str, op: u64, now_ms: u64) -> Result<(), FsError> {
        self.check_free(path, op)?;
        if self.files.contains_key(path) {
            return Ok(()); // the same request, applied before
        }
        self.files.insert(path.to_string(), FileMeta { chunks: Vec::new(), created_ms: now_ms, op });
        Ok(())
    }

    /// Adds a file with the given chunks (a snapshot's copy). A retry succeeds.
    pub fn insert_copy(
        &mut self,
        path: &str,
        chunks: Vec<ChunkHandle>,
        op: u64,
        now_ms: u64,
    ) -> Result<bool, FsError> {
        self.check_free(path, op)?;
        if self.files.contains_key(path) {
            return Ok(false);
        }
        self.files.insert(path.to_string(), FileMeta { chunks, created_ms: now_ms, op });
        Ok(true)
    }

    /// Checks that `path` may be created by request `op`: valid, not a directory, no file
    /// on its way, and not taken (except by `op` itself).
    fn check_free(&self, path: &str, op: u64) -> Result<(), FsError> {
        check_path(path)?;
        if let Some(f) = self.files.get(path) {
            return if f.op == op { Ok(()) } else { Err(FsError::AlreadyExists(path.to_string())) };
        }
        if self.is_dir(path) {
            return Err(FsError::IsADirectory(path.to_string()));
        }
        // No prefix of the path may be a file.
        let mut end = 0;
        while let Some(i) = path[end + 1..].find('/') {
            end += 1 + i;
            if self.files.contains_key(&path[..end]) {
                return Err(FsError::NotADirectory(path[..end].to_string()));
            }
        }
        Ok(())
    }

    /// Whether `dir` is a directory: the root, or a prefix of some file's path.
    pub fn is_dir(&self, dir: &str) -> bool {
        let prefix = dir_prefix(dir);
        dir == "/" || self.files.range(prefix.clone()..).next().is_some_and(|(p, _)| p.starts_with(&prefix))
    }

    /// Moves the file at `path` to the trash. A retry of the same request succeeds.
    pub fn delete(&mut self, path: &str, op: u64, now_ms: u64) -> Result<(), FsError> {
        check_path(path)?;
        let Some(file) = self.files.remove(path) else {
            if self.trash.values().any(|t| t.op == op && t.path == path) {
                return Ok(());
            }
            return Err(if self.is_dir(path) {
                FsError::IsADirectory(path.to_string())
            } else {
                FsError::NotFound(path.to_string())
            });
        };
        let entry = TrashEntry { path: path.to_string(), deleted_ms: now_ms, chunks: file.chunks, op };
        self.trash.insert((now_ms, path.to_string()), entry);
        Ok(())
    }

    /// Removes from the trash every file deleted before `before_ms` and returns them.
    pub fn purge(&mut self, before_ms: u64) -> Vec<TrashEntry> {
        let keep = self.trash.split_off(&(before_ms, String::new()));
        std::mem::replace(&mut self.trash, keep).into_values().collect()
    }

    /// The names directly under `dir`, sorted.
    pub fn list(&self, dir: &str) -> Result<Vec<DirEntry>, FsError> {
        if dir != "/" {
            check_path(dir.trim_end_matches('/'))?;
        }
        let dir = if dir == "/" { dir } else { dir.trim_end_matches('/') };
        if let Some(f) = self.files.get(dir) {
            let name = dir.rsplit('/').next().unwrap_or(dir).to_string();
            return Ok(vec![DirEntry { name, is_dir: false, chunks: f.chunks.len() as u64 }]);
        }
        if !self.is_dir(dir) {
            return Err(FsError::NotFound(dir.to_string()));
        }
        let prefix = dir_prefix(dir);
        let mut out: Vec<DirEntry> = Vec::new();
        for (path, f) in self.files.range(prefix.clone()..) {
            let Some(rest) = path.strip_prefix(&prefix) else { break };
            match rest.split_once('/') {
                Some((name, _)) => {
                    if out.last().is_none_or(|e| e.name != name) {
                        out.push(DirEntry { name: name.to_string(), is_dir: true, chunks: 0 });
                    }
                }
                None => out.push(DirEntry {
                    name: rest.to_string(),
                    is_dir: false,
                    chunks: f.chunks.len() as u64,
                }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for ok in ["/a", "/a/b", "/a b/c.log"] {
            check_path(ok).unwrap();
        }
        for bad in ["", "a", "/", "/a/", "//a", "/a/./b", "/a/../b", "/a\0"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_delete_list() {
        let mut ns = Namespace::default();
        ns.create("/logs/a", 1, 10).unwrap();
        ns.create("/logs/b", 2, 10).unwrap();
        ns.create("/logs/deep/c", 3, 10).unwrap();
        ns.create("/top", 4, 10).unwrap();
        // A retry of the same request succeeds; another request for the name fails.
        ns.create("/logs/a", 1, 11).unwrap();
        assert_eq!(ns.create("/logs/a", 9, 11), Err(FsError::AlreadyExists("/logs/a".into())));
        assert_eq!(ns.create("/logs", 9, 11), Err(FsError::IsADirectory("/logs".into())));
        assert_eq!(ns.create("/top/x", 9, 11), Err(FsError::NotADirectory("/top".into())));

        let names = |v: Vec<DirEntry>| v.into_iter().map(|e| (e.name, e.is_dir)).collect::<Vec<_>>();
        assert_eq!(
            names(ns.list("/logs").unwrap()),
            vec![("a".into(), false), ("b".into(), false), ("deep".into(), true)]
        );
        assert_eq!(names(ns.list("/").unwrap()), vec![("logs".into(), true), ("top".into(), false)]);
        assert_eq!(names(ns.list("/top").unwrap()), vec![("top".into(), false)]);
        assert!(matches!(ns.list("/nothing"), Err(FsError::NotFound(_))));

        ns.delete("/logs/a", 5, 20).unwrap();
        ns.delete("/logs/a", 5, 21).unwrap(); // retried
        assert_eq!(ns.delete("/logs/a", 6, 21), Err(FsError::NotFound("/logs/a".into())));
        assert!(ns.file("/logs/a").is_none());
        ns.delete("/top", 7, 30).unwrap();
        assert_eq!(ns.trash().count(), 2);
        let purged = ns.purge(25);
        assert_eq!(purged.len(), 1);
        assert_eq!(purged[0].path, "/logs/a");
        assert_eq!(ns.trash().count(), 1);
        // The name is free again.
        ns.create("/logs/a", 8, 40).unwrap();
    }
}
