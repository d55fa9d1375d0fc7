//! What the leading master does beyond applying the log (GFS §3.1, §4.3, §4.4, §4.5):
//! grants and revokes leases, bumping versions and telling replicas; takes heartbeats
//! and answers them with deletion orders (orphans, stale and corrupt replicas) and lease
//! extensions; copies shared chunks on their first mutation after a snapshot; and, in a
//! background loop, re-replicates chunks with too few copies (fewest copies first, a
//! bounded number at a time), trims and rebalances replicas, and purges the trash.
//!
//! Operations on one chunk (grant, revoke, clone, split, snapshot) are serialized by a
//! per-chunk lock held only in the leader's memory.
//!
//! Leases are safe across leader changes because they are in the log, stamped with the
//! granting leader's clock: a new leader knows every lease in force and waits for it
//! to end (or revokes it) before granting another. A primary counts its lease from when
//! it received the grant (or sent the heartbeat that extended it), shortened by a tenth,
//! so it gives up before any master thinks the lease over, provided the masters' clocks
//! agree within that margin (6 s of a 60 s lease).

// Errors here are tonic's `Status`, the answer of every RPC handler; boxing it would
// only add conversions.
#![allow(clippy::result_large_err)]

use super::machine::{decode, encode, Answer, ChunkMeta, Command, Lease, Machine, Outcome};
use super::servers::{ReplicaView, Servers};
use super::MasterConfig;
use crate::proto::{
    CloneRequest, CopyLocalRequest, DeleteOrder, Extension, HeartbeatReply, HeartbeatRequest, LeaseReply,
    Replica, RevokeRequest, SetVersionRequest,
};
use crate::rpc::{self, fs_status, raft_status, Conns};
use crate::types::{ChunkHandle, ChunkVersion, FsError, ServerId, FIRST_VERSION};
use raft::Node;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedMutexGuard;
use tonic::Status;

/// Deadline of a call from the master to a chunkserver (version, revoke, local copy).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at granting a lease before giving up for this request.
const GRANT_ATTEMPTS: usize = 3;
/// Background passes between two rebalancing moves.
const REBALANCE_EVERY_PASSES: u64 = 10;

/// The leader's wall clock, in ms since the Unix epoch: stamped on commands so that
/// applying them does not read a clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per-chunk locks, in memory.
#[derive(Default)]
struct ChunkLocks {
    map: Mutex<HashMap<ChunkHandle, Arc<tokio::sync::Mutex<()>>>>,
}

impl ChunkLocks {
    async fn lock(&self, handle: ChunkHandle) -> OwnedMutexGuard<()> {
        let m = lock(&self.map).entry(handle).or_default().clone();
        m.lock_owned().await
    }

    fn is_busy(&self, handle: ChunkHandle) -> bool {
        lock(&self.map).get(&handle).is_some_and(|m| m.try_lock().is_err())
    }

    /// Forgets locks nobody holds or waits for.
    fn prune(&self) {
        lock(&self.map).retain(|_, m| Arc::strong_count(m) > 1);
    }
}

/// Counters for `gfs status` and the tests.
#[derive(Default)]
pub struct Counters {
    /// Re-replications (clones) completed.
    pub clones_done: AtomicU64,
    /// Stale replicas found and ordered deleted.
    pub stale_found: AtomicU64,
    /// Chunks with fewer copies than wanted at the last pass.
    pub under_replicated: AtomicU64,
}

/// The master's shared core: the Raft node, its state machine, the chunkserver table.
pub struct Core {
    pub(super) cfg: MasterConfig,
    pub(super) node: Node<Machine>,
    pub(super) machine: Machine,
    pub(super) servers: Mutex<Servers>,
    pub(super) counters: Counters,
    locks: ChunkLocks,
    conns: Conns,
    /// Chunks being cloned now. Invariant: at most `cfg.clones_max` entries.
    cloning: Mutex<HashSet<ChunkHandle>>,
    /// Deletions to hand to a server with its next heartbeat answer.
    pending_deletes: Mutex<HashMap<ServerId, Vec<DeleteOrder>>>,
}

impl Core {
    /// A core over a started node.
    pub fn new(cfg: MasterConfig, node: Node<Machine>, machine: Machine) -> Core {
        let servers = Servers::new(cfg.dead_after, cfg.heartbeat);
        Core {
            cfg,
            node,
            machine,
            servers: Mutex::new(servers),
            counters: Counters::default(),
            locks: ChunkLocks::default(),
            conns: Conns::default(),
            cloning: Mutex::new(HashSet::new()),
            pending_deletes: Mutex::new(HashMap::new()),
        }
    }

    /// Fails with a redirect unless this node leads.
    pub fn require_leader(&self) -> Result<(), Status> {
        let s = self.node.state();
        if s.is_leader {
            Ok(())
        } else {
            Err(rpc::not_leader(s.leader))
        }
    }

    /// Replicates a command and returns its answer.
    pub async fn propose(&self, cmd: Command) -> Result<Answer, Status> {
        let bytes = self.node.propose(encode(&cmd)).await.map_err(raft_status)?;
        let outcome: Outcome = decode(&bytes).map_err(|e| Status::internal(format!("bad answer: {e}")))?;
        outcome.map_err(fs_status)
    }

    fn servers(&self) -> MutexGuard<'_, Servers> {
        lock(&self.servers)
    }

    /// The lease's length as handed to a primary: shortened by a margin for the time the
    /// grant takes to reach it and for clock drift, so the primary's lease always ends
    /// before the master's.
    fn lease_for_primary(&self, granted_at_ms: u64) -> u64 {
        let lease = self.cfg.lease.as_millis() as u64;
        let margin = lease / 10;
        lease.saturating_sub(margin).saturating_sub(now_ms().saturating_sub(granted_at_ms))
    }

    /// A call to `server` failed; if it could not even connect, take the server for
    /// dead until its next heartbeat, so the next choice of replicas avoids it.
    fn note_failure(&self, server: ServerId, e: &Status) {
        if e.code() == tonic::Code::Unavailable {
            self.servers().mark_unreachable(server);
        }
    }

    fn chunk_meta(&self, handle: ChunkHandle) -> Result<ChunkMeta, Status> {
        self.machine
            .state()
            .chunk(handle)
            .cloned()
            .ok_or_else(|| fs_status(FsError::NotFound(format!("chunk {handle}"))))
    }

    fn file_chunk(&self, path: &str, index: u64) -> Result<ChunkHandle, Status> {
        let st = self.machine.state();
        let file = st.file(path).ok_or_else(|| fs_status(FsError::NotFound(path.to_string())))?;
        file.chunks
            .get(index as usize)
            .copied()
            .ok_or_else(|| fs_status(FsError::Invalid(format!("{path} has no chunk {index}"))))
    }

    /// Replicas of `handle` at its current `version`, as the wire shows them.
    pub fn replicas(&self, handle: ChunkHandle, version: ChunkVersion) -> Vec<Replica> {
        self.servers().replicas(handle, version, Instant::now()).into_iter().map(replica).collect()
    }

    // ------------------------------------------------------------ leases

    /// The lease of chunk `index` of `path`, granting one if none is in force (GFS §3.1).
    /// `failed_version`: the client's last mutation under that lease failed, so replace
    /// it unless it was replaced already.
    pub async fn get_lease(
        &self,
        path: &str,
        index: u64,
        failed_version: Option<u64>,
    ) -> Result<LeaseReply, Status> {
        self.require_leader()?;
        for _ in 0..GRANT_ATTEMPTS {
            let handle = self.file_chunk(path, index)?;
            let meta = self.chunk_meta(handle)?;
            if meta.refs > 1 {
                self.split(path, index, handle).await?;
                continue;
            }
            if let Some(reply) = self.current_lease(handle, &meta, failed_version) {
                return Ok(reply);
            }
            let _guard = self.locks.lock(handle).await;
            let meta = self.chunk_meta(handle)?;
            if meta.refs > 1 {
                continue;
            }
            if let Some(reply) = self.current_lease(handle, &meta, failed_version) {
                return Ok(reply); // granted by another request while this one waited
            }
            if let Some(lease) = meta.live_lease(now_ms()).cloned() {
                if !self.revoke(handle, meta.version, &lease).await {
                    return Err(fs_status(FsError::Unavailable(format!(
                        "chunk {handle}: its primary cannot be reached; its lease ends in {} ms",
                        lease.expires_ms.saturating_sub(now_ms())
                    ))));
                }
            }
            return self.grant(handle).await;
        }
        Err(fs_status(FsError::Unavailable(format!("chunk {index} of {path} keeps changing; retry"))))
    }

    /// The lease in force, if it can be handed out as is: every replica that took it
    /// (holds the current version) alive, and not the lease a client just failed with.
    fn current_lease(
        &self,
        handle: ChunkHandle,
        meta: &ChunkMeta,
        failed_version: Option<u64>,
    ) -> Option<LeaseReply> {
        let lease = meta.live_lease(now_ms())?;
        if failed_version == Some(meta.version.0) {
            return None;
        }
        let now = Instant::now();
        let servers = self.servers();
        let mut took_it =
            lease.replicas.iter().filter(|r| servers.version_of(**r, handle) == Some(meta.version));
        if !took_it.all(|r| servers.is_alive(*r, now)) {
            return None;
        }
        let current = servers.replicas(handle, meta.version, now);
        let primary = current.iter().find(|r| r.server == lease.primary)?.clone();
        let replicas =
            current.into_iter().filter(|r| lease.replicas.contains(&r.server)).map(replica).collect();
        Some(LeaseReply {
            handle: handle.0,
            version: meta.version.0,
            primary: Some(replica(primary)),
            replicas,
            chunk_bytes: self.cfg.chunk_bytes,
        })
    }

    /// Takes the lease back from its primary, which answers once its appends in flight
    /// are done, and records that in the log. False if the primary cannot be reached:
    /// then the lease holds until it expires.
    async fn revoke(&self, handle: ChunkHandle, version: ChunkVersion, lease: &Lease) -> bool {
        let addr = {
            let servers = self.servers();
            if !servers.is_alive(lease.primary, Instant::now()) {
                return false;
            }
            servers.addr(lease.primary)
        };
        let Some(addr) = addr else { return false };
        let revoked = match self.conns.chunkserver(&addr) {
            Ok(mut c) => c.revoke(rpc::request(RevokeRequest { handle: handle.0 }, CALL_TIMEOUT)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = revoked {
            tracing::warn!(chunk = %handle, primary = %addr, "revoke failed: {}", e.message());
            self.note_failure(lease.primary, &e);
            return false;
        }
        tracing::debug!(chunk = %handle, "lease revoked");
        self.propose(Command::EndLease { handle, version }).await.is_ok()
    }

    /// Grants a lease on `handle` (whose lock the caller holds): bumps the version in
    /// the log, then tells the secondaries and last the primary, so that no secondary
    /// refuses the primary's first mutation. Replicas that miss the new version are
    /// stale from then on (GFS §4.5).
    async fn grant(&self, handle: ChunkHandle) -> Result<LeaseReply, Status> {
        let mut last_error = String::from("no attempt");
        for _ in 0..GRANT_ATTEMPTS {
            let meta = self.chunk_meta(handle)?;
            let version = meta.version;
            let create = version == FIRST_VERSION;
            let now = Instant::now();
            let mut candidates = self.servers().replicas(handle, version, now);
            if create {
                // Never leased, so no data anywhere: any server may take an empty copy.
                let servers = self.servers();
                for id in servers.live(now) {
                    if candidates.len() >= self.cfg.replicas {
                        break;
                    }
                    if !candidates.iter().any(|c| c.server == id) {
                        let addr = servers.addr(id).unwrap_or_default();
                        candidates.push(ReplicaView { server: id, addr, version, length: 0 });
                    }
                }
            }
            if candidates.is_empty() {
                return Err(fs_status(FsError::Unavailable(format!(
                    "chunk {handle}: no live replica at {version}"
                ))));
            }
            // Keep the old primary when it can: it knows where the chunk ends.
            let previous = meta.lease.as_ref().map(|l| l.primary);
            let pos = candidates.iter().position(|c| Some(c.server) == previous).unwrap_or(0);
            let primary = candidates.remove(pos);
            let granted_at_ms = now_ms();
            let cmd = Command::GrantLease {
                handle,
                expect: version,
                primary: primary.server,
                replicas: std::iter::once(primary.server)
                    .chain(candidates.iter().map(|c| c.server))
                    .collect(),
                now_ms: granted_at_ms,
                lease_ms: self.cfg.lease.as_millis() as u64,
            };
            let new_version = match self.propose(cmd).await {
                Ok(Answer::Version(v)) => v,
                Ok(other) => return Err(Status::internal(format!("unexpected answer {other:?}"))),
                Err(s) if rpc::status_fs(&s).is_some_and(|e| matches!(e, FsError::Conflict(_))) => {
                    last_error = s.message().to_string();
                    continue;
                }
                Err(s) => return Err(s),
            };
            let set = |r: &ReplicaView, lease_ms: u64, secondaries: Vec<String>| {
                let req = SetVersionRequest {
                    handle: handle.0,
                    version: new_version.0,
                    create,
                    chunk_bytes: self.cfg.chunk_bytes,
                    lease_ms,
                    secondaries,
                };
                let addr = r.addr.clone();
                async move {
                    let mut c = self.conns.chunkserver(&addr)?;
                    c.set_version(rpc::request(req, CALL_TIMEOUT)).await.map(|r| r.into_inner().length)
                }
            };
            let results = futures::future::join_all(candidates.iter().map(|c| set(c, 0, Vec::new()))).await;
            let mut secondaries = Vec::new();
            for (c, r) in candidates.iter().zip(results) {
                match r {
                    Ok(length) => {
                        self.servers().note(c.server, handle, new_version, length, Instant::now());
                        secondaries.push(c.clone());
                    }
                    Err(e) => {
                        tracing::warn!(chunk = %handle, server = %c.addr, "set version failed: {}", e.message());
                        self.note_failure(c.server, &e);
                    }
                }
            }
            let addrs = secondaries.iter().map(|s| s.addr.clone()).collect();
            match set(&primary, self.lease_for_primary(granted_at_ms).max(1), addrs).await {
                Ok(length) => {
                    self.servers().note(primary.server, handle, new_version, length, Instant::now());
                    tracing::debug!(chunk = %handle, version = %new_version, primary = %primary.addr, "lease granted");
                    let primary = ReplicaView { version: new_version, length, ..primary };
                    let replicas = std::iter::once(primary.clone())
                        .chain(secondaries.into_iter().map(|s| ReplicaView { version: new_version, ..s }))
                        .map(replica)
                        .collect();
                    return Ok(LeaseReply {
                        handle: handle.0,
                        version: new_version.0,
                        primary: Some(replica(primary)),
                        replicas,
                        chunk_bytes: self.cfg.chunk_bytes,
                    });
                }
                Err(e) => {
                    // The next attempt picks a primary among the secondaries just set.
                    self.note_failure(primary.server, &e);
                    last_error = format!("primary {}: {}", primary.addr, e.message());
                    tracing::warn!(chunk = %handle, "grant failed at the primary: {last_error}");
                }
            }
        }
        Err(fs_status(FsError::Unavailable(format!("chunk {handle}: could not grant a lease: {last_error}"))))
    }

    /// Gives `path` its own copy of the shared chunk `index` (GFS §3.4): a new handle in
    /// the log, then a local copy on each live replica, so no data crosses the network.
    async fn split(&self, path: &str, index: u64, old: ChunkHandle) -> Result<(), Status> {
        let _guard = self.locks.lock(old).await;
        let meta = self.chunk_meta(old)?;
        if meta.refs <= 1 || self.file_chunk(path, index)? != old {
            return Ok(()); // split by another request meanwhile
        }
        let sources = self.servers().replicas(old, meta.version, Instant::now());
        if sources.is_empty() {
            return Err(fs_status(FsError::Unavailable(format!(
                "shared chunk {old} has no live replica to copy"
            ))));
        }
        let new = match self.propose(Command::SplitChunk { path: path.to_string(), index, old }).await? {
            Answer::Chunk(h) => h,
            other => return Err(Status::internal(format!("unexpected answer {other:?}"))),
        };
        if new == old {
            return Ok(());
        }
        let copies = sources.iter().map(|s| {
            let req = CopyLocalRequest { from: old.0, to: new.0, version: meta.version.0 };
            let addr = s.addr.clone();
            async move {
                let mut c = self.conns.chunkserver(&addr)?;
                c.copy_local(rpc::request(req, CALL_TIMEOUT * 6)).await
            }
        });
        let mut copied = 0;
        for (s, r) in sources.iter().zip(futures::future::join_all(copies).await) {
            match r {
                Ok(_) => {
                    copied += 1;
                    self.servers().note(s.server, new, meta.version, s.length, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(chunk = %old, server = %s.addr, "copy-on-write failed: {}", e.message())
                }
            }
        }
        tracing::info!(%path, index, %old, %new, copies = copied, "split a shared chunk");
        if copied == 0 {
            return Err(fs_status(FsError::Unavailable(format!("chunk {new}: no replica could copy {old}"))));
        }
        Ok(())
    }

    /// Snapshots `src` as `dst` (GFS §3.4): revokes the leases on `src`'s chunks, so
    /// that no append reaches a chunk once it is shared, then duplicates the metadata.
    pub async fn snapshot(&self, src: &str, dst: &str, op: u64) -> Result<(), Status> {
        self.require_leader()?;
        for _ in 0..GRANT_ATTEMPTS {
            let chunks: BTreeSet<ChunkHandle> = {
                let st = self.machine.state();
                let file = st.file(src).ok_or_else(|| fs_status(FsError::NotFound(src.to_string())))?;
                file.chunks.iter().copied().collect()
            };
            let mut guards = Vec::new();
            for h in &chunks {
                guards.push(self.locks.lock(*h).await);
            }
            for h in &chunks {
                let meta = self.chunk_meta(*h)?;
                if let Some(lease) = meta.live_lease(now_ms()).cloned() {
                    if !self.revoke(*h, meta.version, &lease).await {
                        // An unreachable primary keeps its lease until it expires.
                        let wait = lease.expires_ms.saturating_sub(now_ms()) + 1;
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                }
            }
            let cmd = Command::Snapshot { src: src.into(), dst: dst.into(), op, now_ms: now_ms() };
            match self.propose(cmd).await {
                Err(s) if rpc::status_fs(&s).is_some_and(|e| matches!(e, FsError::Conflict(_))) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(fs_status(FsError::Unavailable(format!("{src} keeps changing; retry"))))
    }

    // ------------------------------------------------------------ heartbeats

    /// Takes a heartbeat; the leader answers with orders (GFS §4.4.2: "the master
    /// replies with the identity of all chunks that are no longer present in the
    /// master's metadata"), followers only note what it says.
    pub async fn heartbeat(&self, hb: HeartbeatRequest) -> HeartbeatReply {
        let server = ServerId(hb.server);
        let now = Instant::now();
        self.servers().heartbeat(&hb, now);
        if !self.node.state().is_leader {
            return HeartbeatReply { leader: false, ..Default::default() };
        }
        let mut delete = lock(&self.pending_deletes).remove(&server).unwrap_or_default();
        {
            let st = self.machine.state();
            for c in &hb.chunks {
                let handle = ChunkHandle(c.handle);
                match st.chunk(handle) {
                    None if st.was_allocated(handle) => {
                        tracing::info!(chunk = %handle, server = %hb.addr, "orphan replica: deleting");
                        delete.push(DeleteOrder { handle: c.handle, below_version: u64::MAX });
                    }
                    Some(meta) if c.version < meta.version.0 && !self.locks.is_busy(handle) => {
                        tracing::info!(
                            chunk = %handle, server = %hb.addr, have = c.version, current = meta.version.0,
                            "stale replica: deleting"
                        );
                        self.counters.stale_found.fetch_add(1, Ordering::Relaxed);
                        self.servers().forget(server, handle);
                        delete.push(DeleteOrder { handle: c.handle, below_version: meta.version.0 });
                    }
                    _ => {}
                }
            }
            for h in &hb.corrupt {
                let handle = ChunkHandle(*h);
                let good_elsewhere = st.chunk(handle).is_none_or(|meta| {
                    self.servers().replicas(handle, meta.version, now).iter().any(|r| r.server != server)
                });
                // The last copy is kept, damaged as it is: its other blocks still read.
                if good_elsewhere {
                    tracing::warn!(chunk = %handle, server = %hb.addr, "corrupt replica: deleting");
                    delete.push(DeleteOrder { handle: *h, below_version: u64::MAX });
                }
            }
        }
        let mut extended = Vec::new();
        if !hb.extend.is_empty() {
            let granted_at_ms = now_ms();
            let cmd = Command::ExtendLeases {
                primary: server,
                handles: hb.extend.iter().map(|h| ChunkHandle(*h)).collect(),
                now_ms: granted_at_ms,
                lease_ms: self.cfg.lease.as_millis() as u64,
            };
            if let Ok(Answer::Extended(handles)) = self.propose(cmd).await {
                let lease_ms = self.lease_for_primary(granted_at_ms);
                let st = self.machine.state();
                for h in handles {
                    if let Some(meta) = st.chunk(h) {
                        extended.push(Extension { handle: h.0, version: meta.version.0, lease_ms });
                    }
                }
            }
        }
        HeartbeatReply { delete, extended, leader: true }
    }

    // ------------------------------------------------------------ background

    /// The leader's housekeeping, forever: once per heartbeat interval, after a new
    /// leader has heard from every live chunkserver.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.cfg.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading_since: Option<Instant> = None;
        let mut passes = 0u64;
        loop {
            ticker.tick().await;
            if !self.node.state().is_leader {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(Instant::now);
            // Until every live chunkserver has reported, the table undercounts replicas.
            if since.elapsed() < self.cfg.dead_after + self.cfg.heartbeat {
                continue;
            }
            passes += 1;
            self.re_replicate();
            self.trim_excess();
            if passes.is_multiple_of(REBALANCE_EVERY_PASSES) {
                self.rebalance();
            }
            if let Err(e) = self.collect_garbage().await {
                tracing::warn!("garbage collection: {}", e.message());
            }
            self.locks.prune();
        }
    }

    /// Queues clones for chunks with fewer copies than wanted, fewest copies first
    /// (GFS §4.3), at most `clones_max` at a time.
    fn re_replicate(self: &Arc<Self>) {
        let now = Instant::now();
        let mut needy: Vec<(usize, ChunkHandle)> = {
            let st = self.machine.state();
            let servers = self.servers();
            let target = self.cfg.replicas.min(servers.live(now).len());
            st.chunks()
                .iter()
                .filter(|(_, m)| m.version != FIRST_VERSION) // never leased: no data yet
                .filter_map(|(h, m)| {
                    let copies = servers.replicas(*h, m.version, now).len();
                    (copies > 0 && copies < target).then_some((copies, *h))
                })
                .collect()
        };
        needy.sort();
        self.counters.under_replicated.store(needy.len() as u64, Ordering::Relaxed);
        for (_, handle) in needy {
            let mut cloning = lock(&self.cloning);
            if cloning.len() >= self.cfg.clones_max {
                break;
            }
            if !cloning.insert(handle) {
                continue;
            }
            drop(cloning);
            let core = self.clone();
            tokio::spawn(async move {
                if let Err(e) = core.clone_chunk(handle, None).await {
                    tracing::warn!(chunk = %handle, "re-replication: {}", e.message());
                }
                lock(&core.cloning).remove(&handle);
            });
        }
    }

    /// Copies `handle` to one more server (`target`, or the least loaded live server
    /// without a copy), from the least loaded current replica. A lease in force is
    /// revoked first, so the copy misses no acknowledged append.
    async fn clone_chunk(&self, handle: ChunkHandle, target: Option<ServerId>) -> Result<(), Status> {
        let _guard = self.locks.lock(handle).await;
        let meta = self.chunk_meta(handle)?;
        if let Some(lease) = meta.live_lease(now_ms()).cloned() {
            if !self.revoke(handle, meta.version, &lease).await {
                return Err(Status::unavailable("its primary holds a lease and cannot be reached; later"));
            }
        }
        let now = Instant::now();
        let (source, target, target_addr) = {
            let servers = self.servers();
            let sources = servers.replicas(handle, meta.version, now);
            let Some(source) = sources.first().cloned() else {
                return Err(Status::unavailable("no current replica to copy from"));
            };
            let target = match target {
                Some(t) => t,
                // Not onto a server still holding a copy, stale or corrupt: its deletion
                // order may yet be carried out, after the clone.
                None => servers
                    .live(now)
                    .into_iter()
                    .find(|id| !servers.holds(*id, handle))
                    .ok_or_else(|| Status::unavailable("no server to copy to"))?,
            };
            let addr = servers.addr(target).ok_or_else(|| Status::unavailable("target unknown"))?;
            (source, target, addr)
        };
        let req = CloneRequest { handle: handle.0, version: meta.version.0, source: source.addr.clone() };
        // Generous: a whole chunk crosses the network.
        let timeout = CALL_TIMEOUT + Duration::from_millis(self.cfg.chunk_bytes / 1000);
        let mut c = self.conns.chunkserver(&target_addr)?;
        if let Err(e) = c.clone_chunk(rpc::request(req, timeout)).await {
            self.note_failure(target, &e);
            return Err(e);
        }
        self.servers().note(target, handle, meta.version, source.length, Instant::now());
        self.counters.clones_done.fetch_add(1, Ordering::Relaxed);
        tracing::info!(chunk = %handle, version = %meta.version, from = %source.addr, to = %target_addr, "re-replicated");
        Ok(())
    }

    /// Orders surplus copies deleted (a server came back, or a rebalancing move
    /// finished), from the most loaded servers, for chunks not under a lease.
    fn trim_excess(&self) {
        let now = Instant::now();
        let now_ms = now_ms();
        let st = self.machine.state();
        let mut servers = self.servers();
        let mut pending = lock(&self.pending_deletes);
        for (h, meta) in st.chunks() {
            if meta.live_lease(now_ms).is_some() || self.locks.is_busy(*h) {
                continue;
            }
            let mut copies = servers.replicas(*h, meta.version, now);
            if copies.len() <= self.cfg.replicas {
                continue;
            }
            copies.sort_by_key(|c| std::cmp::Reverse(servers.load(c.server)));
            for extra in copies.iter().take(copies.len() - self.cfg.replicas) {
                tracing::info!(chunk = %h, server = %extra.addr, "surplus replica: deleting");
                let order = DeleteOrder { handle: h.0, below_version: meta.version.0 + 1 };
                pending.entry(extra.server).or_default().push(order);
                servers.forget(extra.server, *h);
            }
        }
    }

    /// Moves one chunk from the most to the least loaded live server when their loads
    /// differ by more than a tenth of the average plus one (GFS §4.3); the surplus copy
    /// left behind is trimmed by a later pass.
    fn rebalance(self: &Arc<Self>) {
        let now = Instant::now();
        let (handle, target) = {
            let st = self.machine.state();
            let servers = self.servers();
            let live = servers.live(now);
            let (Some(&least), Some(&most)) = (live.first(), live.last()) else { return };
            let (low, high) = (servers.load(least), servers.load(most));
            let average = live.iter().map(|s| servers.load(*s)).sum::<usize>() / live.len();
            if high <= low + 1 + average / 10 {
                return;
            }
            let now_ms = now_ms();
            let pick = servers.chunks_of(most).into_iter().find(|h| {
                !servers.holds(least, *h)
                    && st.chunk(*h).is_some_and(|m| {
                        m.live_lease(now_ms).is_none()
                            && m.version != FIRST_VERSION
                            && servers.replicas(*h, m.version, now).iter().any(|r| r.server == most)
                    })
            });
            match pick {
                Some(h) => (h, least),
                None => return,
            }
        };
        if !lock(&self.cloning).insert(handle) {
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            if let Err(e) = core.clone_chunk(handle, Some(target)).await {
                tracing::warn!(chunk = %handle, "rebalancing: {}", e.message());
            }
            lock(&core.cloning).remove(&handle);
        });
    }

    /// Purges files deleted more than the grace period ago (GFS §4.4.1); their chunks
    /// become orphans, which heartbeats then delete.
    async fn collect_garbage(&self) -> Result<(), Status> {
        let grace = self.cfg.gc_grace.as_millis() as u64;
        let before_ms = now_ms().saturating_sub(grace);
        let due = self.machine.state().trash().next().is_some_and(|t| t.deleted_ms < before_ms);
        if due {
            if let Answer::Purged { files, chunks } = self.propose(Command::Purge { before_ms }).await? {
                tracing::info!(files, chunks, "purged deleted files");
            }
        }
        Ok(())
    }
}

fn replica(r: ReplicaView) -> Replica {
    Replica { server: r.server.0, addr: r.addr, version: r.version.0, length: r.length }
}
