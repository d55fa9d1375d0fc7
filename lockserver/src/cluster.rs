//! Reaching the lock service's leader: cluster addresses, one lazily connected gRPC
//! client per node, and a retry loop that follows leader hints and tries every node in
//! turn. Shared by the clerk and the `lockserver` command.

// tonic's `Status` is the error of every gRPC call; boxing it here would only add noise.
#![allow(clippy::result_large_err)]

use crate::service::proto::lock_service_client::LockServiceClient;
use crate::service::{LEADER_METADATA, MAX_MESSAGE_BYTES};
use raft::NodeId;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

/// A gRPC client of one lock server.
pub type Client = LockServiceClient<Channel>;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 pings find a server that vanished without closing its socket.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection counts as broken.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// First pause between failed attempts; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between failed attempts.
const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Parses `1=host:port,2=host:port`.
pub fn parse_cluster(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    raft::cluster::parse_cluster(s)
}

/// Formats a cluster the way [`parse_cluster`] reads it.
pub fn format_cluster(nodes: &BTreeMap<NodeId, String>) -> String {
    nodes.iter().map(|(id, a)| format!("{}={a}", id.0)).collect::<Vec<_>>().join(",")
}

/// Whether a failed call may succeed at another node or later: the node is not the
/// leader, the outcome is unknown, or the node could not be reached.
pub fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted
    )
}

/// The lock service's nodes, with a guess at the leader.
pub struct Cluster {
    nodes: BTreeMap<NodeId, String>,
    clients: Mutex<BTreeMap<NodeId, Client>>,
    /// The node that last answered as leader (0: unknown).
    leader: AtomicU64,
    /// Round-robin position for when the leader is unknown.
    next: AtomicU64,
}

impl Cluster {
    /// The cluster of these nodes (every address `host:port` or a URI).
    pub fn new(nodes: BTreeMap<NodeId, String>) -> Cluster {
        assert!(!nodes.is_empty(), "a cluster needs nodes");
        Cluster {
            nodes,
            clients: Mutex::new(BTreeMap::new()),
            leader: AtomicU64::new(0),
            next: AtomicU64::new(0),
        }
    }

    /// The nodes.
    pub fn nodes(&self) -> &BTreeMap<NodeId, String> {
        &self.nodes
    }

    /// The client of node `id`; the connection is made on first use and remade after a
    /// failure.
    pub fn client(&self, id: NodeId) -> Result<Client, Status> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&id) {
            return Ok(c.clone());
        }
        let addr =
            self.nodes.get(&id).ok_or_else(|| Status::invalid_argument(format!("unknown node {id}")))?;
        let uri = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Status::invalid_argument(format!("bad address {addr}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy();
        let client = LockServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        clients.insert(id, client.clone());
        Ok(client)
    }

    /// The node to try next: the known leader, else the next in turn.
    fn target(&self) -> NodeId {
        match self.leader.load(Relaxed) {
            0 => {
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                ids[(self.next.fetch_add(1, Relaxed) as usize) % ids.len()]
            }
            id => NodeId(id),
        }
    }

    /// Calls the leader: each attempt may take `attempt_timeout`; after a retryable
    /// failure the next attempt goes to the hinted leader or the next node, until
    /// `deadline`. Returns the answer and the node that gave it.
    pub async fn call<T, F, Fut>(
        &self,
        deadline: Instant,
        attempt_timeout: Duration,
        mut call: F,
    ) -> Result<(T, NodeId), Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut backoff = BACKOFF_MIN;
        loop {
            let target = self.target();
            let client = self.client(target)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(attempt_timeout.min(left), call(client)).await {
                Ok(Ok(response)) => {
                    self.leader.store(target.0, Relaxed);
                    return Ok((response.into_inner(), target));
                }
                Ok(Err(status)) if !retryable(&status) => return Err(status),
                Ok(Err(status)) => status,
                Err(_) => {
                    Status::deadline_exceeded(format!("{target} did not answer in {attempt_timeout:?}"))
                }
            };
            // Follow the hint when there is one, else try the next node.
            let hint = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|id| *id != target.0 && self.nodes.contains_key(&NodeId(*id)));
            let _ = self.leader.compare_exchange(target.0, hint.unwrap_or(0), Relaxed, Relaxed);
            if Instant::now() + backoff >= deadline {
                return Err(status);
            }
            // A hint is worth following at once; a failure without one waits longer each time.
            let pause = if hint.is_some() { BACKOFF_MIN / 4 } else { backoff };
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_strings_parse_and_format() {
        let c = parse_cluster("1=127.0.0.1:7301, 2=127.0.0.1:7302,").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(format_cluster(&c), "1=127.0.0.1:7301,2=127.0.0.1:7302");
        assert!(parse_cluster("").is_err());
        assert!(parse_cluster("0=a:1").is_err());
        assert!(parse_cluster("x=a:1").is_err());
        assert!(parse_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_cluster("a:1").is_err());
    }
}
