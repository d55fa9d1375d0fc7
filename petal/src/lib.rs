//! Petal (Lee & Thekkath, ASPLOS 1996): the shared virtual disk under every Frangipani
//! client, its replicas agreeing through Raft.
//!
//! - Virtual disks by name, each a sparse 2^64-byte address space in 64 KiB extents;
//!   unwritten bytes read as zeros; each write (up to a bound, 1 MiB by default) is
//!   atomic; decommit frees a range; read-only copy-on-write snapshots.
//! - [`store`]: one replica's durable block store (a crc32 per 4 KiB block).
//! - [`machine`]: the replicated state machine: commands with request ids (applied
//!   once) and lease fencing, snapshot manifests that a lagging replica fills in from a
//!   peer.
//! - [`service`]: the replica's gRPC server, sharing its port with the Raft transport.
//! - [`client`]: the async and blocking clients; the `petal` command is built on them.
//!
//! ```
//! use petal::{PetalClient, ServerConfig};
//! use raft::NodeId;
//! use std::collections::BTreeMap;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A group of one replica, on any free port.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let peers = BTreeMap::from([(NodeId(1), listener.local_addr()?.to_string())]);
//! let dir = tempfile::tempdir()?;
//! let cfg = ServerConfig::new(NodeId(1), peers.clone(), dir.path().to_path_buf())?;
//! tokio::spawn(petal::serve_on(cfg, listener));
//!
//! let client = PetalClient::connect(peers)?;
//! client.create("vol").await?;
//! client.write("vol", (1 << 40) + 3, b"hello", None).await?;
//! assert_eq!(client.read("vol", (1 << 40) + 1, 8).await?, b"\0\0hello\0");
//! client.snapshot("vol", "vol@1").await?;
//! client.write("vol", (1 << 40) + 3, b"HELLO", None).await?;
//! assert_eq!(client.read("vol@1", (1 << 40) + 3, 5).await?, b"hello");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod client;
mod codec;
mod error;
pub mod machine;
pub mod service;
pub mod store;

/// The wire types generated from `proto/petal.proto`.
#[allow(missing_docs)] // Generated code; the .proto file documents the messages.
pub mod proto {
    tonic::include_proto!("petal");
}

pub use client::{BlockingClient, ClientConfig, PetalClient};
pub use error::PetalError;
pub use service::{serve, serve_on, ServerConfig};

/// The wall clock in unix milliseconds (what leases and fencing stamps are in).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
