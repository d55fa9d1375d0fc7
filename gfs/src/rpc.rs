//! What every party's gRPC code shares: cached connections, the mapping of errors to
//! status codes and back, leader hints, and the choice of the nearest server.

// Errors here are tonic's `Status`, the answer of every RPC handler; boxing it would
// only add conversions.
#![allow(clippy::result_large_err)]

use crate::proto::chunkserver_client::ChunkserverClient;
use crate::proto::master_client::MasterClient;
use crate::types::FsError;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Largest gRPC message (a read piece, a heartbeat, a Raft batch).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Metadata key of the leader hint on a "not the leader" answer.
const LEADER_KEY: &str = "gfs-leader";

/// Channels by address, made once and shared (a tonic channel multiplexes calls).
#[derive(Default)]
pub struct Conns {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Conns {
    /// The channel to `addr` (`host:port`), connecting lazily.
    pub fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .connect_lazy();
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// A client of the chunkserver at `addr`.
    pub fn chunkserver(&self, addr: &str) -> Result<ChunkserverClient<Channel>, Status> {
        Ok(ChunkserverClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A client of the master at `addr`.
    pub fn master(&self, addr: &str) -> Result<MasterClient<Channel>, Status> {
        Ok(MasterClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// A request with a deadline.
pub fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// An [`FsError`] as a status: a code for generic callers, the error itself (bincode) in
/// the details for ours.
pub fn fs_status(e: FsError) -> Status {
    let code = match &e {
        FsError::NotFound(_) => Code::NotFound,
        FsError::AlreadyExists(_) => Code::AlreadyExists,
        FsError::NotADirectory(_) | FsError::IsADirectory(_) | FsError::Conflict(_) => {
            Code::FailedPrecondition
        }
        FsError::InvalidPath(..) | FsError::Invalid(_) => Code::InvalidArgument,
        FsError::Unavailable(_) => Code::Unavailable,
    };
    let details = crate::master::machine::encode(&e);
    Status::with_details(code, e.to_string(), details.into())
}

/// The [`FsError`] a status carries, if it came from [`fs_status`].
pub fn status_fs(s: &Status) -> Option<FsError> {
    if s.details().is_empty() {
        return None;
    }
    crate::master::machine::decode(s.details()).ok()
}

/// "Not the leader", naming the leader when known.
pub fn not_leader(leader: Option<raft::NodeId>) -> Status {
    let mut s = Status::unavailable(match leader {
        Some(l) => format!("not the leader; try master {}", l.0),
        None => "not the leader; no leader known".to_string(),
    });
    if let Some(l) = leader {
        if let Ok(v) = l.0.to_string().parse() {
            s.metadata_mut().insert(LEADER_KEY, v);
        }
    }
    s
}

/// The leader named by a [`not_leader`] status.
pub fn leader_hint(s: &Status) -> Option<raft::NodeId> {
    let v = s.metadata().get(LEADER_KEY)?.to_str().ok()?.parse().ok()?;
    Some(raft::NodeId(v))
}

/// Whether a status is a [`not_leader`] answer.
pub fn is_not_leader(s: &Status) -> bool {
    s.code() == Code::Unavailable && s.message().starts_with("not the leader")
}

/// A [`raft::ClientError`] as a status.
pub fn raft_status(e: raft::ClientError) -> Status {
    match e {
        raft::ClientError::NotLeader { leader } => not_leader(leader),
        other => Status::unavailable(other.to_string()),
    }
}

/// How far `addr` is from this machine, for ordering a data push (GFS §3.2: IP
/// addresses stand in for the network topology): 0 for this machine, else the bits in
/// which its address differs from the local address that routes to it. Finding the
/// local address sends no packet.
pub fn distance(addr: &str) -> u32 {
    let Ok(target) = addr.parse::<SocketAddr>() else { return 64 };
    if target.ip().is_loopback() {
        return 0;
    }
    let local = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .and_then(|s| s.connect(target).and_then(|_| s.local_addr()));
    match (local.map(|l| l.ip()), target.ip()) {
        (Ok(IpAddr::V4(l)), IpAddr::V4(t)) => 32 - (u32::from(l) ^ u32::from(t)).leading_zeros(),
        (Ok(IpAddr::V6(l)), IpAddr::V6(t)) => (128 - (u128::from(l) ^ u128::from(t)).leading_zeros()).min(64),
        _ => 64,
    }
}

/// `addrs` nearest first; ties are broken by `salt`, so that different clients starting
/// equally near spread their pushes over the replicas.
pub fn nearest_first(addrs: &[String], salt: u64) -> Vec<String> {
    let mut keyed: Vec<(u32, u64, &String)> = addrs
        .iter()
        .map(|a| {
            let mut h = crc32fast::Hasher::new();
            h.update(&salt.to_le_bytes());
            h.update(a.as_bytes());
            (distance(a), u64::from(h.finalize()), a)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, _, a)| a.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        let e = FsError::NotADirectory("/a".into());
        let s = fs_status(e.clone());
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(status_fs(&s), Some(e));
        assert_eq!(status_fs(&Status::internal("x")), None);
        let s = not_leader(Some(raft::NodeId(3)));
        assert!(is_not_leader(&s));
        assert_eq!(leader_hint(&s), Some(raft::NodeId(3)));
        assert_eq!(leader_hint(&not_leader(None)), None);
    }

    #[test]
    fn nearest_first_prefers_this_machine() {
        assert_eq!(distance("127.0.0.1:7000"), 0);
        assert_eq!(distance("not an address"), 64);
        let addrs = vec!["203.0.113.9:1".to_string(), "127.0.0.1:2".to_string()];
        assert_eq!(nearest_first(&addrs, 1)[0], "127.0.0.1:2");
        // Equal distances: the order depends on the salt, and covers every address.
        let local: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
        let firsts: std::collections::HashSet<String> =
            (0..50).map(|s| nearest_first(&local, s)[0].clone()).collect();
        assert!(firsts.len() > 1);
    }
}
