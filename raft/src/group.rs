//! Starting one member of a fixed Raft group served over the tonic transport: the wiring
//! every replicated service (the key-value demo, Petal, the lock service, the GFS master)
//! shares.

use crate::driver::{Node, NodeConfig, StateMachine, Wiring};
use crate::transport::{self, Router, Transport};
use crate::{ConfState, DiskError, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Messages queued for a node before the transport holds back its peers.
const INBOX_MESSAGES_MAX: usize = 4096;

/// A started member: its node, and the transport service to add to the server.
pub struct GroupMember<S: StateMachine> {
    /// The running node.
    pub node: Node<S>,
    /// The `RaftTransport` gRPC service delivering peers' messages to the node.
    pub service: transport::proto::raft_transport_server::RaftTransportServer<transport::Inbound>,
}

/// Starts member `cfg.raft.id` of `group`, whose founding members are `peers` (every
/// member's address, this one's included). `cfg.bootstrap` is set to those members.
pub fn start_member<S: StateMachine>(
    group: u64,
    peers: &BTreeMap<NodeId, String>,
    mut cfg: NodeConfig,
    machine: S,
    max_message_bytes: usize,
) -> Result<GroupMember<S>, DiskError> {
    let id = cfg.raft.id;
    let router = Router::new();
    let (inbox_tx, inbox) = mpsc::channel(INBOX_MESSAGES_MAX);
    router.register(group, inbox_tx);
    let transport = Arc::new(Transport::new(group, id, max_message_bytes));
    for (peer, addr) in peers {
        if *peer != id {
            transport.set_peer(*peer, addr.clone());
        }
    }
    cfg.bootstrap = Some(ConfState::with_voters(peers.keys().copied()));
    let node = Node::start(cfg, machine, Wiring { send: Box::new(move |m| transport.send(m)), inbox })?;
    Ok(GroupMember { node, service: transport::service(router, max_message_bytes) })
}
