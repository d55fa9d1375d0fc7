//! The chunkserver: chunks on local disk, and the service that pushes, appends, reads,
//! clones and reports them.
pub mod buffer;
pub mod service;
pub mod store;

pub use service::{serve, ChunkserverConfig, ChunkserverService};
