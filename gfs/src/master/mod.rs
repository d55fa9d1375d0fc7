//! The master (GFS §2.6, §4): a Raft group of master processes whose replicated state
//! machine ([`machine`]) holds the namespace ([`namespace`]), each file's chunks and
//! each chunk's version and lease. The leader keeps chunk locations and chunkserver
//! liveness in memory ([`servers`]), hands out leases and keeps replicas healthy
//! ([`control`]); [`service`] is the gRPC face of it all.

pub mod control;
pub mod machine;
pub mod namespace;
pub mod servers;
pub mod service;

use crate::proto::master_server::MasterServer;
use crate::rpc::MAX_MESSAGE_BYTES;
use crate::types;
use raft::transport::{self, Router, Transport};
use raft::{ConfState, Node, NodeConfig, NodeId, Wiring};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The Raft group id of the master group.
const GROUP: u64 = 1;

/// How to run one master.
#[derive(Clone, Debug)]
pub struct MasterConfig {
    /// This master's id in the group.
    pub id: NodeId,
    /// Every founding member's address, this one's included.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the Raft log and snapshots live.
    pub data_dir: PathBuf,
    /// Raft tick (the election timeout is 10 to 20 ticks).
    pub tick: Duration,
    /// Checkpoint (Raft snapshot) after this many log entries.
    pub snapshot_entries: u64,
    /// Size of new chunks.
    pub chunk_bytes: u64,
    /// Copies of each chunk.
    pub replicas: usize,
    /// Lease length.
    pub lease: Duration,
    /// Chunkservers' heartbeat interval (also the housekeeping interval).
    pub heartbeat: Duration,
    /// A chunkserver unheard of for this long is taken for dead.
    pub dead_after: Duration,
    /// How long deleted files stay in the trash.
    pub gc_grace: Duration,
    /// Most re-replications at once (GFS §4.3: clone traffic is limited).
    pub clones_max: usize,
}

impl MasterConfig {
    /// The paper's defaults: 64 MiB chunks, 3 replicas, 60 s leases, 3 days in the trash.
    pub fn new(id: NodeId, peers: BTreeMap<NodeId, String>, data_dir: PathBuf) -> MasterConfig {
        MasterConfig {
            id,
            peers,
            data_dir,
            tick: Duration::from_millis(100),
            snapshot_entries: 10_000,
            chunk_bytes: types::DEFAULT_CHUNK_BYTES,
            replicas: types::DEFAULT_REPLICAS,
            lease: Duration::from_millis(types::DEFAULT_LEASE_MS),
            heartbeat: Duration::from_millis(types::DEFAULT_HEARTBEAT_MS),
            dead_after: Duration::from_millis(types::DEFAULT_DEAD_AFTER_MS),
            gc_grace: Duration::from_millis(types::DEFAULT_GC_GRACE_MS),
            clones_max: 2,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        types::check_chunk_bytes(self.chunk_bytes).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.replicas >= 1, "at least one replica");
        anyhow::ensure!(self.clones_max >= 1, "at least one clone at a time");
        anyhow::ensure!(self.peers.contains_key(&self.id), "the peers do not list this master ({})", self.id);
        anyhow::ensure!(
            !self.heartbeat.is_zero() && !self.tick.is_zero(),
            "the heartbeat and tick must be positive"
        );
        anyhow::ensure!(self.lease > self.heartbeat * 2, "the lease must outlast two heartbeats");
        Ok(())
    }
}

/// Runs a master on a bound listener (Raft peers and clients share it) until the
/// server fails.
pub async fn serve(cfg: MasterConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    cfg.validate()?;
    let router = Router::new();
    let (inbox_tx, inbox) = mpsc::channel(4096);
    router.register(GROUP, inbox_tx);
    let transport = Arc::new(Transport::new(GROUP, cfg.id, MAX_MESSAGE_BYTES));
    for (id, addr) in &cfg.peers {
        if *id != cfg.id {
            transport.set_peer(*id, addr.clone());
        }
    }
    let bootstrap = ConfState::with_voters(cfg.peers.keys().copied());
    let mut node_cfg = NodeConfig::new(cfg.id, cfg.data_dir.clone(), Some(bootstrap));
    node_cfg.tick = cfg.tick;
    node_cfg.snapshot_entries = cfg.snapshot_entries;
    let machine = machine::Machine::default();
    let sender = transport.clone();
    let node =
        Node::start(node_cfg, machine.clone(), Wiring { send: Box::new(move |m| sender.send(m)), inbox })?;
    let core = Arc::new(control::Core::new(cfg.clone(), node, machine));
    tokio::spawn(core.clone().housekeeping());
    tracing::info!(id = %cfg.id, listen = %listener.local_addr()?, "master serving");
    tonic::transport::Server::builder()
        .add_service(transport::service(router, MAX_MESSAGE_BYTES))
        .add_service(
            MasterServer::new(service::MasterService::new(core))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
                .map_err(|e| anyhow::anyhow!(e))?,
        )
        .await?;
    Ok(())
}
