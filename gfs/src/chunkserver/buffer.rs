//! Pushed data waiting for its mutation (GFS §3.2: "each chunkserver will store the data
//! in an internal LRU buffer cache until the data is used or aged out"). Bounded in bytes:
//! a push that would overflow it is refused, after expired entries are dropped.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Names pushed data: the pushing client and a nonce it drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DataKey {
    /// The client.
    pub client: u64,
    /// Unique per push of that client.
    pub nonce: u64,
}

struct Inner {
    entries: HashMap<DataKey, (Bytes, Instant)>,
    /// Bytes held plus bytes reserved by pushes in progress.
    /// Invariant: bytes <= max_bytes.
    bytes: u64,
}

/// The buffer of one chunkserver.
pub struct PushBuffer {
    inner: Mutex<Inner>,
    max_bytes: u64,
    ttl: Duration,
}

impl PushBuffer {
    /// A buffer of at most `max_bytes` whose entries expire `ttl` after arriving.
    pub fn new(max_bytes: u64, ttl: Duration) -> PushBuffer {
        PushBuffer { inner: Mutex::new(Inner { entries: HashMap::new(), bytes: 0 }), max_bytes, ttl }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves room for a push of `bytes`; false if there is none even after dropping
    /// expired entries.
    pub fn reserve(&self, bytes: u64) -> bool {
        let mut inner = self.lock();
        if inner.bytes + bytes > self.max_bytes {
            let now = Instant::now();
            let expired: Vec<DataKey> = inner
                .entries
                .iter()
                .filter(|(_, (_, at))| now.duration_since(*at) > self.ttl)
                .map(|(k, _)| *k)
                .collect();
            for k in expired {
                if let Some((data, _)) = inner.entries.remove(&k) {
                    inner.bytes = inner.bytes.saturating_sub(data.len() as u64);
                }
            }
        }
        if inner.bytes + bytes > self.max_bytes {
            return false;
        }
        inner.bytes += bytes;
        true
    }

    /// Gives back a reservation whose push failed.
    pub fn release(&self, bytes: u64) {
        let mut inner = self.lock();
        inner.bytes = inner.bytes.saturating_sub(bytes);
    }

    /// Stores the data of a completed push, under a reservation of `data.len()` bytes.
    pub fn insert(&self, key: DataKey, data: Bytes) {
        let mut inner = self.lock();
        if let Some((old, _)) = inner.entries.insert(key, (data, Instant::now())) {
            inner.bytes = inner.bytes.saturating_sub(old.len() as u64); // a repeated push replaces the first
        }
    }

    /// The data pushed under `key`, unless it expired.
    pub fn get(&self, key: &DataKey) -> Option<Bytes> {
        let inner = self.lock();
        let (data, at) = inner.entries.get(key)?;
        (at.elapsed() <= self.ttl).then(|| data.clone())
    }

    /// Drops the data of `key` (its mutation is done).
    pub fn remove(&self, key: &DataKey) {
        let mut inner = self.lock();
        if let Some((data, _)) = inner.entries.remove(key) {
            inner.bytes = inner.bytes.saturating_sub(data.len() as u64);
        }
    }

    /// Bytes held or reserved.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        let buf = PushBuffer::new(100, Duration::from_millis(50));
        let k = |n| DataKey { client: 1, nonce: n };
        assert!(buf.reserve(60));
        buf.insert(k(1), Bytes::from(vec![1u8; 60]));
        assert!(!buf.reserve(60), "over the bound");
        assert_eq!(buf.get(&k(1)).unwrap().len(), 60);
        std::thread::sleep(Duration::from_millis(80));
        assert!(buf.get(&k(1)).is_none(), "expired");
        assert!(buf.reserve(60), "expired entries make room");
        buf.release(60);
        assert_eq!(buf.bytes(), 0);
        assert!(buf.reserve(10));
        buf.insert(k(2), Bytes::from(vec![2u8; 10]));
        buf.remove(&k(2));
        assert_eq!(buf.bytes(), 0);
    }
}
