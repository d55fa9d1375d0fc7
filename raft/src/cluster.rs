//! Naming the members of a group on a command line: `1=127.0.0.1:7001,2=...`.

use crate::NodeId;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The flags every `serve` of a Raft-replicated program starts with: who this member is,
/// who founded the group, where it keeps its data. Flattened into each program's command.
#[derive(clap::Args, Clone, Debug)]
pub struct MemberArgs {
    /// This member's id (as in --peers).
    #[arg(long)]
    pub id: u64,
    /// Every founding member as ID=HOST:PORT, comma-separated (this one included).
    #[arg(long)]
    pub peers: String,
    /// Data directory.
    #[arg(long)]
    pub data: PathBuf,
}

impl MemberArgs {
    /// This member's id and every founding member's address.
    pub fn members(&self) -> Result<(NodeId, BTreeMap<NodeId, String>), String> {
        let peers = parse_cluster(&self.peers).map_err(|e| format!("--peers: {e}"))?;
        let id = NodeId(self.id);
        if !peers.contains_key(&id) {
            return Err(format!("--peers does not list this member ({id})"));
        }
        Ok((id, peers))
    }
}

/// Parses `ID=HOST:PORT` pairs separated by commas into each member's address.
pub fn parse_cluster(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| format!("expected ID=HOST:PORT, got {part:?}"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("bad node id {id:?} in {part:?}"))?;
        if id == 0 {
            return Err("node id 0 is reserved".into());
        }
        if addr.trim().is_empty() {
            return Err(format!("no address for node {id}"));
        }
        if out.insert(NodeId(id), addr.trim().to_string()).is_some() {
            return Err(format!("node {id} listed twice"));
        }
    }
    if out.is_empty() {
        return Err("no nodes given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c = parse_cluster("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(c[&NodeId(2)], "127.0.0.1:7002");
        assert!(parse_cluster("").is_err());
        assert!(parse_cluster("0=a:1").is_err());
        assert!(parse_cluster("x=a:1").is_err());
        assert!(parse_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_cluster("1a:1").is_err());
    }
}
