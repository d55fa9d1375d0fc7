//! GFS mode (Ghemawat, Gobioff, Leung, SOSP 2003): a master group, chunkservers and a
//! client library for record-append workloads, on the workspace's `raft` and `storage`
//! crates.
//!
//! - [`master`]: the namespace, files' chunks, chunk versions and leases in a Raft state
//!   machine (the Raft log is the operation log, Raft snapshots its checkpoints); chunk
//!   locations learned from heartbeats; lease grants, re-replication, rebalancing and
//!   garbage collection on the leader. Followers answer metadata reads marked possibly
//!   stale, as shadow masters did.
//! - [`chunkserver`]: chunks in checksummed block files (a crc32 per 64 KiB, verified on
//!   every read), chained data pushes, record append ordered by the primary.
//! - [`client`]: record append (at least once, atomic per record) and a reader that
//!   hands each record over once, over the framing of [`record`].
//! - The `gfs` command (`src/bin/gfs.rs`): `up`, `master`, `chunkserver`, `create`,
//!   `append`, `read`, `ls`, `stat`, `rm`, `snapshot`, `status`, `bench`.
//!
//! A whole cluster in one process, one master and three chunkservers on loopback:
//!
//! ```
//! use gfs::chunkserver::{self, ChunkserverConfig};
//! use gfs::client::{Client, ClientConfig};
//! use gfs::master::{self, MasterConfig};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let masters = [(raft::NodeId(1), listener.local_addr()?.to_string())].into_iter().collect();
//! let mut cfg = MasterConfig::new(raft::NodeId(1), masters, dir.path().join("master"));
//! cfg.tick = Duration::from_millis(10);
//! cfg.chunk_bytes = 1 << 20; // small chunks, as in tests
//! cfg.heartbeat = Duration::from_millis(100);
//! tokio::spawn(master::serve(cfg.clone(), listener));
//! for i in 0..3 {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//!     let mut cs = ChunkserverConfig::new(dir.path().join(format!("cs{i}")), cfg.peers.clone());
//!     cs.heartbeat = Duration::from_millis(100);
//!     tokio::spawn(chunkserver::serve(cs, listener));
//! }
//!
//! let client = Client::new(ClientConfig::new(cfg.peers.clone()));
//! client.create("/logs/clicks").await?;
//! for word in ["alpha", "beta", "gamma"] {
//!     client.append("/logs/clicks", word.as_bytes()).await?;
//! }
//! let mut records = Vec::new();
//! client.read("/logs/clicks", |_id, payload| records.push(payload.to_vec())).await?;
//! assert_eq!(records, [b"alpha".to_vec(), b"beta".to_vec(), b"gamma".to_vec()]);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod chunkserver;
pub mod client;
pub mod master;
pub mod record;
pub mod rpc;
pub mod types;

/// The wire types of `proto/gfs.proto`.
#[allow(missing_docs)] // Generated code; the .proto file documents every message.
pub mod proto {
    tonic::include_proto!("gfs");
}
