//! The production [`Locks`]: the lock service's clerk. Lock names travel as their
//! `Display` strings; each local holder keeps the clerk's guard until it releases.

use crate::locks::{LockCallbacks, LockError, LockName, Locks, Mode};
use lockserver::{Callbacks, Clerk, ClerkError, LockGuard, SessionId, Slot};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

fn to_service(mode: Mode) -> lockserver::Mode {
    match mode {
        Mode::Shared => lockserver::Mode::Shared,
        Mode::Exclusive => lockserver::Mode::Exclusive,
    }
}

fn lock_error(e: ClerkError) -> LockError {
    match e {
        ClerkError::LeaseLost => LockError::LeaseLost,
        other => LockError::Service(other.to_string()),
    }
}

/// Locks from the lock service, for a mounted client.
pub struct ClerkLocks {
    clerk: Arc<Clerk>,
    /// Guards of local holders: released one at a time as holders finish.
    guards: Mutex<HashMap<(LockName, Mode), Vec<LockGuard>>>,
}

impl ClerkLocks {
    /// Wraps a connected clerk.
    pub fn new(clerk: Arc<Clerk>) -> ClerkLocks {
        ClerkLocks { clerk, guards: Mutex::new(HashMap::new()) }
    }

    /// The clerk underneath.
    pub fn clerk(&self) -> &Arc<Clerk> {
        &self.clerk
    }
}

impl Locks for ClerkLocks {
    fn acquire(&self, name: &LockName, mode: Mode) -> Result<(), LockError> {
        let guard = self.clerk.lock_blocking(&name.to_string(), to_service(mode)).map_err(lock_error)?;
        crate::fs::lock(&self.guards).entry((name.clone(), mode)).or_default().push(guard);
        Ok(())
    }

    fn release(&self, name: &LockName, mode: Mode) {
        let guard = crate::fs::lock(&self.guards).get_mut(&(name.clone(), mode)).and_then(Vec::pop);
        drop(guard);
    }

    fn slot(&self) -> u32 {
        self.clerk.slot().0 as u32
    }

    fn lease_expiry_ms(&self) -> Option<u64> {
        Some(fence_ms(self.clerk.lease_expiry()))
    }
}

/// The expiry a lost lease reports: a time long past, so Petal refuses every write that
/// carries it whatever the clocks say (0 would mean "not fenced").
const LOST_LEASE_EXPIRY_MS: u64 = 1;

/// The expiry to stamp on writes, given the clerk's (`None` once the lease is lost).
/// Never `None` itself: Petal does not fence a write without an expiry, and a client whose
/// lease is lost is exactly the one whose writes must be refused.
fn fence_ms(expiry: Option<SystemTime>) -> u64 {
    expiry
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(LOST_LEASE_EXPIRY_MS, |d| (d.as_millis() as u64).max(LOST_LEASE_EXPIRY_MS))
}

/// Hands the clerk's callbacks to the file system once it is mounted (the clerk must
/// exist first: the mount needs its log slot).
#[derive(Default)]
pub struct CallbackBridge {
    fs: OnceLock<Weak<dyn LockCallbacks>>,
}

impl CallbackBridge {
    /// A bridge with no file system yet: revocations only release.
    pub fn new() -> Arc<CallbackBridge> {
        Arc::new(CallbackBridge::default())
    }

    /// Connects the mounted file system.
    pub fn set(&self, fs: Weak<dyn LockCallbacks>) {
        let _ = self.fs.set(fs);
    }

    fn fs(&self) -> Option<Arc<dyn LockCallbacks>> {
        self.fs.get().and_then(Weak::upgrade)
    }
}

#[async_trait::async_trait]
impl Callbacks for CallbackBridge {
    async fn revoke(&self, lock: &str, wanted: lockserver::Mode) -> Result<(), String> {
        let Some(fs) = self.fs() else { return Ok(()) };
        let name: LockName = lock.parse()?;
        let wanted = match wanted {
            lockserver::Mode::Shared => Mode::Shared,
            lockserver::Mode::Exclusive => Mode::Exclusive,
        };
        // Write-back is blocking disk I/O: keep it off the clerk's runtime threads.
        tokio::task::spawn_blocking(move || fs.revoke(&name, wanted)).await.map_err(|e| e.to_string())
    }

    async fn recover(&self, slot: Slot, dead: SessionId) -> Result<(), String> {
        let fs = self.fs().ok_or("not mounted yet")?;
        tracing::info!(slot = slot.0, dead = dead.0, "recovering a dead client's log");
        tokio::task::spawn_blocking(move || fs.recover(slot.0 as u32)).await.map_err(|e| e.to_string())?
    }

    fn lease_lost(&self) {
        if let Some(fs) = self.fs() {
            fs.lease_lost();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lost_lease_still_fences_every_write() {
        // The clerk reports no expiry once the lease is lost; a write must then carry one
        // long past, never none (which Petal would not fence at all).
        assert_eq!(fence_ms(None), LOST_LEASE_EXPIRY_MS);
        assert_eq!(fence_ms(Some(UNIX_EPOCH)), LOST_LEASE_EXPIRY_MS);
        let live = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(fence_ms(Some(live)), 1_700_000_000_123);
    }
}
