//! The master's gRPC service: namespace operations go through the Raft log; metadata
//! reads are linearizable on the leader, or possibly stale on a follower when the caller
//! allows it (GFS §5.1.3's shadow masters); chunk locations come from the heartbeat
//! table of whichever master answers.

// Errors here are tonic's `Status`, the answer of every RPC handler; boxing it would
// only add conversions.
#![allow(clippy::result_large_err)]

use super::control::{now_ms, Core};
use super::machine::{Answer, Command, Machine, MasterState};
use crate::proto::master_server::Master;
use crate::proto::{
    AddChunkRequest, ChunkInfo, CreateRequest, DeleteRequest, Empty, GetLeaseRequest, HeartbeatReply,
    HeartbeatRequest, LeaseReply, ListEntry, ListReply, ListRequest, LookupReply, LookupRequest,
    MasterStatus, SnapshotRequest,
};
use crate::rpc::{fs_status, raft_status};
use crate::types::{ChunkHandle, FsError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// The service (cheap to clone).
#[derive(Clone)]
pub struct MasterService {
    core: Arc<Core>,
}

/// What a metadata read found, before chunk locations are added.
struct FileView {
    chunks: Vec<(ChunkHandle, crate::types::ChunkVersion, u32, Option<u64>)>,
    created_ms: u64,
}

fn file_view(st: &MasterState, path: &str) -> Result<FileView, FsError> {
    let file = st.file(path).ok_or_else(|| FsError::NotFound(path.to_string()))?;
    let now = now_ms();
    let chunks = file
        .chunks
        .iter()
        .map(|h| match st.chunk(*h) {
            Some(m) => (*h, m.version, m.refs, m.live_lease(now).map(|l| l.primary.0)),
            None => (*h, Default::default(), 0, None),
        })
        .collect();
    Ok(FileView { chunks, created_ms: file.created_ms })
}

impl MasterService {
    /// A service over a core.
    pub fn new(core: Arc<Core>) -> MasterService {
        MasterService { core }
    }

    /// Runs `f` on the state: linearizably through the leader, or on this node's copy
    /// (possibly stale) when `allow_stale` and this node does not lead. Says which.
    async fn read<R: Send + 'static>(
        &self,
        allow_stale: bool,
        f: impl FnOnce(&MasterState) -> R + Send + 'static,
    ) -> Result<(R, bool), Status> {
        let state = self.core.node.state();
        if !state.is_leader && allow_stale {
            return Ok((f(&self.core.machine.state()), true));
        }
        let r = self.core.node.read(move |m: &Machine| f(&m.state())).await.map_err(raft_status)?;
        Ok((r, false))
    }
}

#[tonic::async_trait]
impl Master for MasterService {
    async fn create(&self, request: Request<CreateRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.core.require_leader()?;
        self.core.propose(Command::Create { path: r.path, op: r.op, now_ms: now_ms() }).await?;
        Ok(Response::new(Empty {}))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.core.require_leader()?;
        self.core.propose(Command::Delete { path: r.path, op: r.op, now_ms: now_ms() }).await?;
        Ok(Response::new(Empty {}))
    }

    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.core.snapshot(&r.src, &r.dst, r.op).await?;
        Ok(Response::new(Empty {}))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        let r = request.into_inner();
        let dir = r.dir;
        let (entries, stale) = self.read(r.allow_stale, move |st| st.list(&dir)).await?;
        let entries = entries
            .map_err(fs_status)?
            .into_iter()
            .map(|e| ListEntry { name: e.name, is_dir: e.is_dir, chunks: e.chunks })
            .collect();
        Ok(Response::new(ListReply { entries, stale }))
    }

    async fn lookup(&self, request: Request<LookupRequest>) -> Result<Response<LookupReply>, Status> {
        let r = request.into_inner();
        let path = r.path.clone();
        let (view, stale) = self.read(r.allow_stale, move |st| file_view(st, &path)).await?;
        let view = view.map_err(fs_status)?;
        let chunks = view
            .chunks
            .into_iter()
            .enumerate()
            .map(|(i, (handle, version, refs, primary))| ChunkInfo {
                index: i as u64,
                handle: handle.0,
                version: version.0,
                replicas: self.core.replicas(handle, version),
                primary: primary.unwrap_or(0),
                refs,
            })
            .collect();
        Ok(Response::new(LookupReply {
            path: r.path,
            chunks,
            chunk_bytes: self.core.cfg.chunk_bytes,
            created_ms: view.created_ms,
            stale,
        }))
    }

    async fn add_chunk(&self, request: Request<AddChunkRequest>) -> Result<Response<ChunkInfo>, Status> {
        let r = request.into_inner();
        self.core.require_leader()?;
        let handle = match self.core.propose(Command::AddChunk { path: r.path, index: r.index }).await? {
            Answer::Chunk(h) => h,
            other => return Err(Status::internal(format!("unexpected answer {other:?}"))),
        };
        let (version, refs) =
            self.core.machine.state().chunk(handle).map(|m| (m.version, m.refs)).unwrap_or_default();
        Ok(Response::new(ChunkInfo {
            index: r.index,
            handle: handle.0,
            version: version.0,
            replicas: self.core.replicas(handle, version),
            primary: 0,
            refs,
        }))
    }

    async fn get_lease(&self, request: Request<GetLeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let r = request.into_inner();
        let failed = r.failed.then_some(r.failed_version);
        Ok(Response::new(self.core.get_lease(&r.path, r.index, failed).await?))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        Ok(Response::new(self.core.heartbeat(request.into_inner()).await))
    }

    async fn status(&self, _: Request<Empty>) -> Result<Response<MasterStatus>, Status> {
        let s = self.core.node.status().await.map_err(raft_status)?;
        let (files, chunks) = {
            let st = self.core.machine.state();
            (st.files().count() as u64, st.chunks().len() as u64)
        };
        let c = &self.core.counters;
        Ok(Response::new(MasterStatus {
            id: s.id.0,
            role: format!("{:?}", s.role),
            term: s.term.0,
            leader: s.leader.map_or(0, |l| l.0),
            commit: s.commit.0,
            applied: s.applied.0,
            servers: self
                .core
                .servers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .status(Instant::now()),
            files,
            chunks,
            under_replicated: c.under_replicated.load(Ordering::Relaxed),
            clones_done: c.clones_done.load(Ordering::Relaxed),
            stale_found: c.stale_found.load(Ordering::Relaxed),
        }))
    }
}
