//! What a master knows of the chunkservers, learned from their heartbeats and never
//! logged (GFS §2.6.2: "the master does not keep a persistent record of which
//! chunkservers have a replica of a given chunk"): addresses, liveness, and which
//! chunks each holds at which version.
//!
//! A master also notes what it just did (a version set, a clone) at once, so it need not
//! wait for the next heartbeat; a heartbeat built before that change cannot undo it.

use crate::proto::{HeartbeatRequest, ServerStatus};
use crate::types::{ChunkHandle, ChunkVersion, ServerId};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A replica of a chunk, as the table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaView {
    /// The server holding it.
    pub server: ServerId,
    /// Where to reach that server.
    pub addr: String,
    /// The version it holds.
    pub version: ChunkVersion,
    /// Its length.
    pub length: u64,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    version: ChunkVersion,
    length: u64,
    /// When the master itself recorded this (not a heartbeat).
    noted: Option<Instant>,
}

#[derive(Debug)]
struct ServerInfo {
    addr: String,
    last_heard: Instant,
    chunks: HashMap<ChunkHandle, Held>,
    corrupt: HashSet<ChunkHandle>,
    used_bytes: u64,
    /// A call to it just failed to connect: dead until it is heard from again.
    unreachable: bool,
}

/// The table.
#[derive(Debug)]
pub struct Servers {
    servers: HashMap<ServerId, ServerInfo>,
    /// Unheard of for this long, a server counts as dead.
    dead_after: Duration,
    /// How long the master's own notes outweigh heartbeats (which may have been built
    /// before the change).
    note_window: Duration,
}

impl Servers {
    /// An empty table.
    pub fn new(dead_after: Duration, heartbeat: Duration) -> Servers {
        Servers { servers: HashMap::new(), dead_after, note_window: heartbeat * 3 }
    }

    /// Takes in a heartbeat received at `now`.
    pub fn heartbeat(&mut self, hb: &HeartbeatRequest, now: Instant) {
        let info = self.servers.entry(ServerId(hb.server)).or_insert_with(|| ServerInfo {
            addr: hb.addr.clone(),
            last_heard: now,
            chunks: HashMap::new(),
            corrupt: HashSet::new(),
            used_bytes: 0,
            unreachable: false,
        });
        let mut chunks: HashMap<ChunkHandle, Held> = hb
            .chunks
            .iter()
            .map(|c| {
                (
                    ChunkHandle(c.handle),
                    Held { version: ChunkVersion(c.version), length: c.length, noted: None },
                )
            })
            .collect();
        let corrupt: HashSet<ChunkHandle> = hb.corrupt.iter().map(|h| ChunkHandle(*h)).collect();
        for (h, old) in &info.chunks {
            let recent = old.noted.is_some_and(|t| now.duration_since(t) < self.note_window);
            if !recent || corrupt.contains(h) {
                continue;
            }
            // Versions never go backwards on a chunkserver, so a lower one in the report
            // is a report older than the note.
            let keep = chunks.get(h).is_none_or(|c| c.version < old.version);
            if keep {
                chunks.insert(*h, *old);
            }
        }
        info.addr = hb.addr.clone();
        info.last_heard = now;
        info.chunks = chunks;
        info.corrupt = corrupt;
        info.used_bytes = hb.used_bytes;
        info.unreachable = false;
    }

    /// Takes `server` for dead until its next heartbeat: a call to it could not connect.
    pub fn mark_unreachable(&mut self, server: ServerId) {
        if let Some(s) = self.servers.get_mut(&server) {
            s.unreachable = true;
        }
    }

    /// Whether `server` was heard from within the dead-after time.
    pub fn is_alive(&self, server: ServerId, now: Instant) -> bool {
        self.servers
            .get(&server)
            .is_some_and(|s| !s.unreachable && now.duration_since(s.last_heard) < self.dead_after)
    }

    /// The live servers, least loaded (fewest chunks) first.
    pub fn live(&self, now: Instant) -> Vec<ServerId> {
        let mut out: Vec<(usize, ServerId)> = self
            .servers
            .iter()
            .filter(|(id, _)| self.is_alive(**id, now))
            .map(|(id, s)| (s.chunks.len(), *id))
            .collect();
        out.sort();
        out.into_iter().map(|(_, id)| id).collect()
    }

    /// Chunks held by `server`.
    pub fn load(&self, server: ServerId) -> usize {
        self.servers.get(&server).map_or(0, |s| s.chunks.len())
    }

    /// Where `server` is.
    pub fn addr(&self, server: ServerId) -> Option<String> {
        self.servers.get(&server).map(|s| s.addr.clone())
    }

    /// Live replicas of `handle` at `version` or newer (so never a stale one), least
    /// loaded first.
    pub fn replicas(&self, handle: ChunkHandle, version: ChunkVersion, now: Instant) -> Vec<ReplicaView> {
        let mut out: Vec<(usize, ReplicaView)> = self
            .servers
            .iter()
            .filter(|(id, _)| self.is_alive(**id, now))
            .filter_map(|(id, s)| {
                let held = s.chunks.get(&handle).filter(|h| h.version >= version)?;
                let view = ReplicaView {
                    server: *id,
                    addr: s.addr.clone(),
                    version: held.version,
                    length: held.length,
                };
                Some((s.chunks.len(), view))
            })
            .collect();
        out.sort_by_key(|(load, v)| (*load, v.server));
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// The version of `handle` that `server` holds, alive or not.
    pub fn version_of(&self, server: ServerId, handle: ChunkHandle) -> Option<ChunkVersion> {
        self.servers.get(&server)?.chunks.get(&handle).map(|h| h.version)
    }

    /// Whether `server` holds any copy of `handle` (any version, or a corrupt one).
    pub fn holds(&self, server: ServerId, handle: ChunkHandle) -> bool {
        self.servers
            .get(&server)
            .is_some_and(|s| s.chunks.contains_key(&handle) || s.corrupt.contains(&handle))
    }

    /// Records that `server` now holds `handle` at `version` (the master just made it so).
    pub fn note(
        &mut self,
        server: ServerId,
        handle: ChunkHandle,
        version: ChunkVersion,
        length: u64,
        now: Instant,
    ) {
        if let Some(s) = self.servers.get_mut(&server) {
            s.chunks.insert(handle, Held { version, length, noted: Some(now) });
        }
    }

    /// Records that `server` no longer holds `handle` (the master ordered it deleted).
    pub fn forget(&mut self, server: ServerId, handle: ChunkHandle) {
        if let Some(s) = self.servers.get_mut(&server) {
            s.chunks.remove(&handle);
        }
    }

    /// Every live server's chunks (for rebalancing).
    pub fn chunks_of(&self, server: ServerId) -> Vec<ChunkHandle> {
        let mut v: Vec<ChunkHandle> =
            self.servers.get(&server).map_or(Vec::new(), |s| s.chunks.keys().copied().collect());
        v.sort();
        v
    }

    /// The table for `gfs status`.
    pub fn status(&self, now: Instant) -> Vec<ServerStatus> {
        let mut out: Vec<ServerStatus> = self
            .servers
            .iter()
            .map(|(id, s)| ServerStatus {
                server: id.0,
                addr: s.addr.clone(),
                alive: self.is_alive(*id, now),
                chunks: s.chunks.len() as u64,
                used_bytes: s.used_bytes,
                last_heard_ms: now.duration_since(s.last_heard).as_millis() as u64,
            })
            .collect();
        out.sort_by(|a, b| a.addr.cmp(&b.addr));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ReportedChunk;

    fn hb(server: u64, chunks: &[(u64, u64)]) -> HeartbeatRequest {
        HeartbeatRequest {
            server,
            addr: format!("127.0.0.1:{server}"),
            chunks: chunks
                .iter()
                .map(|(h, v)| ReportedChunk { handle: *h, version: *v, length: 10 })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn stale_replicas_and_dead_servers_are_not_listed() {
        let t0 = Instant::now();
        let mut s = Servers::new(Duration::from_secs(10), Duration::from_secs(1));
        s.heartbeat(&hb(1, &[(7, 3)]), t0);
        s.heartbeat(&hb(2, &[(7, 2)]), t0);
        s.heartbeat(&hb(3, &[(7, 3)]), t0);
        let ids = |v: Vec<ReplicaView>| v.into_iter().map(|r| r.server.0).collect::<Vec<_>>();
        assert_eq!(ids(s.replicas(ChunkHandle(7), ChunkVersion(3), t0)), vec![1, 3]);
        let later = t0 + Duration::from_secs(11);
        s.heartbeat(&hb(1, &[(7, 3)]), later);
        assert_eq!(ids(s.replicas(ChunkHandle(7), ChunkVersion(3), later)), vec![1]);
        assert_eq!(s.live(later), vec![ServerId(1)]);
        s.mark_unreachable(ServerId(1));
        assert!(s.live(later).is_empty());
        s.heartbeat(&hb(1, &[(7, 3)]), later);
        assert_eq!(s.live(later), vec![ServerId(1)]);
    }

    #[test]
    fn notes_outweigh_older_heartbeats_for_a_while() {
        let t0 = Instant::now();
        let mut s = Servers::new(Duration::from_secs(10), Duration::from_secs(1));
        s.heartbeat(&hb(1, &[(7, 2)]), t0);
        s.note(ServerId(1), ChunkHandle(7), ChunkVersion(3), 0, t0);
        s.note(ServerId(1), ChunkHandle(8), ChunkVersion(1), 0, t0);
        // A heartbeat built before the notes.
        s.heartbeat(&hb(1, &[(7, 2)]), t0 + Duration::from_millis(500));
        assert_eq!(s.replicas(ChunkHandle(7), ChunkVersion(3), t0).len(), 1);
        assert!(s.holds(ServerId(1), ChunkHandle(8)));
        // Later heartbeats are the truth again.
        s.heartbeat(&hb(1, &[(7, 2)]), t0 + Duration::from_secs(5));
        assert!(s.replicas(ChunkHandle(7), ChunkVersion(3), t0).is_empty());
        assert!(!s.holds(ServerId(1), ChunkHandle(8)));
    }
}
