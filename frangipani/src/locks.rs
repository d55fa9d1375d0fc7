//! The locks the file system takes, and the lock service it takes them from.
//!
//! The file system sees a [`Locks`] client with the clerk's semantics: locks are sticky (a
//! granted lock stays cached after `release` until the service revokes it), local threads
//! share a cached lock as readers or take it alone as a writer, and before a revoked lock
//! leaves the client the file system's [`LockCallbacks::revoke`] writes back and drops what
//! the lock covers. [`MemLockService`] implements that in memory for tests with several
//! clients in one process; production uses the lock service's clerk.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};

/// Shared (read) or exclusive (write).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Many holders may read.
    Shared,
    /// One holder may write.
    Exclusive,
}

impl Mode {
    /// Whether holding `self` allows what `wanted` allows.
    pub fn covers(self, wanted: Mode) -> bool {
        self == Mode::Exclusive || wanted == Mode::Shared
    }
}

/// The named locks of the file system. Their order is the order operations take them in:
/// the rename lock, then inodes by number, then bitmap segments.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockName {
    /// Serializes renames that move a directory to another parent (the ancestry check).
    Rename,
    /// An inode: its attributes, data and directory entries.
    Inode(u64),
    /// A segment of an allocation bitmap: (bitmap, segment).
    Segment(u8, u64),
    /// A client's log slot.
    Slot(u32),
    /// The flock and POSIX record locks of an inode, held by a machine for its processes
    /// (taken by the FUSE mount, never inside a transaction; covers no cached data).
    FileLocks(u64),
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockName::Rename => write!(f, "rename"),
            LockName::Inode(i) => write!(f, "inode/{i}"),
            LockName::Segment(b, s) => write!(f, "bitmap/{b}/{s}"),
            LockName::Slot(s) => write!(f, "slot/{s}"),
            LockName::FileLocks(i) => write!(f, "filelocks/{i}"),
        }
    }
}

impl std::str::FromStr for LockName {
    type Err = String;

    /// Parses what `Display` writes.
    fn from_str(s: &str) -> Result<LockName, String> {
        let bad = || format!("not a lock name: {s:?}");
        let parts: Vec<&str> = s.split('/').collect();
        let num = |p: &str| p.parse::<u64>().map_err(|_| bad());
        match parts.as_slice() {
            ["rename"] => Ok(LockName::Rename),
            ["inode", i] => Ok(LockName::Inode(num(i)?)),
            ["bitmap", b, seg] => Ok(LockName::Segment(u8::try_from(num(b)?).map_err(|_| bad())?, num(seg)?)),
            ["slot", n] => Ok(LockName::Slot(u32::try_from(num(n)?).map_err(|_| bad())?)),
            ["filelocks", i] => Ok(LockName::FileLocks(num(i)?)),
            _ => Err(bad()),
        }
    }
}

/// Why a lock could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// The client's lease is lost: it must stop writing until remounted.
    #[error("lock service lease lost")]
    LeaseLost,
    /// The service could not be reached or refused.
    #[error("lock service: {0}")]
    Service(String),
}

/// A client of the lock service, as the file system uses it.
pub trait Locks: Send + Sync {
    /// Takes `name` in `mode` for the calling thread, waiting as needed.
    fn acquire(&self, name: &LockName, mode: Mode) -> Result<(), LockError>;
    /// The calling thread is done with `name` (the client keeps it cached).
    fn release(&self, name: &LockName, mode: Mode);
    /// The client's log slot, given by the service with its session.
    fn slot(&self) -> u32;
    /// When the client's lease expires (unix ms), carried by every disk write for Petal's
    /// fencing. `None` only from a service without leases (the in-memory one): a write
    /// without an expiry is never fenced, so a lost lease reports a time already past.
    fn lease_expiry_ms(&self) -> Option<u64>;
}

/// What the lock service asks of the file system.
pub trait LockCallbacks: Send + Sync {
    /// `name` is revoked (to `wanted` by another client): write back what it covers and
    /// drop it from the caches (keep clean copies if downgrading to shared).
    fn revoke(&self, name: &LockName, wanted: Mode);
    /// Replay the log of the dead client that held `slot`; the service frees the dead
    /// client's locks once this returns Ok.
    fn recover(&self, slot: u32) -> Result<(), String>;
    /// The lease is lost: refuse further writes.
    fn lease_lost(&self);
}

// ---------------------------------------------------------------------------------------
// In-memory lock service for tests
// ---------------------------------------------------------------------------------------

/// A lock service in memory, shared by the clients of one test.
#[derive(Default)]
pub struct MemLockService {
    holders: Mutex<HashMap<LockName, HashMap<u64, Mode>>>,
    /// One grant at a time per lock, so a revocation and a re-grant cannot interleave.
    granting: Mutex<HashMap<LockName, Arc<Mutex<()>>>>,
    clients: Mutex<HashMap<u64, Weak<MemLockClient>>>,
    next_client: Mutex<u64>,
}

/// One client's lock state in a [`MemLockService`].
pub struct MemLockClient {
    id: u64,
    slot: u32,
    service: Arc<MemLockService>,
    local: Mutex<HashMap<LockName, Local>>,
    changed: Condvar,
    callbacks: OnceLock<Weak<dyn LockCallbacks>>,
    /// Set once the lease is lost: nothing more is granted.
    lost: AtomicBool,
}

#[derive(Default, Debug)]
struct Local {
    readers: u32,
    writer: bool,
    /// What this client holds from the service.
    held: Option<Mode>,
    revoking: bool,
    acquiring: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemLockService {
    /// A new service.
    pub fn new() -> Arc<MemLockService> {
        Arc::new(MemLockService::default())
    }

    /// A new client using log slot `slot`.
    pub fn client(self: &Arc<Self>, slot: u32) -> Arc<MemLockClient> {
        let id = {
            let mut n = lock(&self.next_client);
            *n += 1;
            *n
        };
        let c = Arc::new(MemLockClient {
            id,
            slot,
            service: self.clone(),
            local: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            callbacks: OnceLock::new(),
            lost: AtomicBool::new(false),
        });
        lock(&self.clients).insert(id, Arc::downgrade(&c));
        c
    }

    /// A client died: its locks stay held (nobody may see its half-written state) until
    /// [`MemLockService::free_dead`] after its log is recovered.
    pub fn crash(&self, client: &MemLockClient) {
        lock(&self.clients).remove(&client.id);
    }

    /// A client's lease ran out (it was cut off from the service). As after a crash, its
    /// locks stay held until [`MemLockService::free_dead`] after its log is recovered; but
    /// the client lives on: it is told ([`LockCallbacks::lease_lost`]) and its requests fail.
    pub fn expire(&self, client: &MemLockClient) {
        self.crash(client);
        {
            // Under the client's lock, so no waiter misses it.
            let _local = lock(&client.local);
            client.lost.store(true, Ordering::SeqCst);
            client.changed.notify_all();
        }
        if let Some(cb) = client.callbacks.get().and_then(Weak::upgrade) {
            cb.lease_lost();
        }
    }

    /// Frees the locks of a dead client whose log has been recovered.
    pub fn free_dead(&self, client_id: u64) {
        let mut holders = lock(&self.holders);
        for h in holders.values_mut() {
            h.remove(&client_id);
        }
    }

    /// Grants `name` in `mode` to `client`, revoking it from conflicting holders first.
    /// `granted` runs before any other grant of `name` can revoke it again, so the client
    /// records what it holds before it can be asked to give it back.
    fn grant(
        &self,
        client: u64,
        name: &LockName,
        mode: Mode,
        granted: impl FnOnce(),
    ) -> Result<(), LockError> {
        let guard = lock(&self.granting).entry(name.clone()).or_default().clone();
        let _one_at_a_time = lock(&guard);
        loop {
            let conflict = {
                let mut holders = lock(&self.holders);
                let h = holders.entry(name.clone()).or_default();
                let conflict = h
                    .iter()
                    .find(|(id, m)| **id != client && (mode == Mode::Exclusive || **m == Mode::Exclusive))
                    .map(|(id, _)| *id);
                match conflict {
                    None => {
                        h.insert(client, mode);
                        drop(holders);
                        granted();
                        return Ok(());
                    }
                    Some(id) => id,
                }
            };
            let holder = lock(&self.clients).get(&conflict).and_then(Weak::upgrade);
            match holder {
                Some(holder) => {
                    let kept = holder.revoke(name, mode);
                    let mut holders = lock(&self.holders);
                    let h = holders.entry(name.clone()).or_default();
                    match kept {
                        Some(m) => h.insert(conflict, m),
                        None => h.remove(&conflict),
                    };
                }
                None => {
                    // A dead client's locks wait for its recovery.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    }
}

impl MemLockClient {
    /// This client's id in the service.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sets the file system to call back on revocation.
    pub fn set_callbacks(&self, callbacks: Weak<dyn LockCallbacks>) {
        let _ = self.callbacks.set(callbacks);
    }

    /// Gives up `name` down to what `wanted` allows others; returns what this client keeps.
    fn revoke(&self, name: &LockName, wanted: Mode) -> Option<Mode> {
        let mut local = lock(&self.local);
        let keep = if wanted == Mode::Shared { Some(Mode::Shared) } else { None };
        loop {
            let st = local.entry(name.clone()).or_default();
            match st.held {
                None => return None,
                Some(Mode::Shared) if wanted == Mode::Shared => return Some(Mode::Shared),
                _ => {}
            }
            if st.revoking || st.writer || (keep.is_none() && st.readers > 0) {
                local = self.changed.wait(local).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.revoking = true;
            break;
        }
        drop(local);
        if let Some(cb) = self.callbacks.get().and_then(Weak::upgrade) {
            cb.revoke(name, wanted);
        }
        let mut local = lock(&self.local);
        let st = local.entry(name.clone()).or_default();
        st.held = keep;
        st.revoking = false;
        self.changed.notify_all();
        keep
    }
}

impl Locks for MemLockClient {
    fn acquire(&self, name: &LockName, mode: Mode) -> Result<(), LockError> {
        let mut local = lock(&self.local);
        loop {
            if self.lost.load(Ordering::SeqCst) {
                return Err(LockError::LeaseLost);
            }
            let st = local.entry(name.clone()).or_default();
            let free = match mode {
                Mode::Shared => !st.writer,
                Mode::Exclusive => !st.writer && st.readers == 0,
            };
            if st.revoking || st.acquiring || !free {
                local = self.changed.wait(local).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if st.held.is_some_and(|h| h.covers(mode)) {
                match mode {
                    Mode::Shared => st.readers += 1,
                    Mode::Exclusive => st.writer = true,
                }
                return Ok(());
            }
            st.acquiring = true;
            drop(local);
            // Recorded inside the grant: once it returns, another client's grant may
            // revoke the lock, and the revocation must see it held.
            let granted = self.service.grant(self.id, name, mode, || {
                let mut local = lock(&self.local);
                let st = local.entry(name.clone()).or_default();
                st.held = Some(st.held.map_or(mode, |h| h.max(mode)));
            });
            local = lock(&self.local);
            let st = local.entry(name.clone()).or_default();
            st.acquiring = false;
            self.changed.notify_all();
            granted?;
        }
    }

    fn release(&self, name: &LockName, mode: Mode) {
        let mut local = lock(&self.local);
        if let Some(st) = local.get_mut(name) {
            match mode {
                Mode::Shared => st.readers = st.readers.saturating_sub(1),
                Mode::Exclusive => st.writer = false,
            }
        }
        self.changed.notify_all();
    }

    fn slot(&self) -> u32 {
        self.slot
    }

    fn lease_expiry_ms(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_round_trip_through_strings() {
        for name in [
            LockName::Rename,
            LockName::Inode(42),
            LockName::Segment(2, 7),
            LockName::Slot(255),
            LockName::FileLocks(9),
        ] {
            assert_eq!(name.to_string().parse::<LockName>(), Ok(name));
        }
        for bad in ["", "inode", "inode/x", "bitmap/300/1", "slot/-1", "other/1"] {
            assert!(bad.parse::<LockName>().is_err(), "{bad}");
        }
    }
}
