//! A small replicated key-value state machine: the example application used by the
//! simulator, the tests, the benchmark and the demo server.
//!
//! Commands carry a client id and sequence number so that a command retried after a
//! leader change is applied once: the store remembers each client's latest result.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One key-value operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Append to a key's value (an absent key counts as empty).
    Append {
        /// The key.
        key: String,
        /// What to append.
        value: String,
    },
}

/// A command as it travels through the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCommand {
    /// The issuing client (non-zero).
    pub client: u64,
    /// The client's sequence number; a retry reuses it.
    pub seq: u64,
    /// What to do.
    pub op: KvOp,
}

/// The outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    /// A Get's answer.
    Value(Option<String>),
    /// A Put or Append took effect.
    Ok,
}

/// Most bytes a command or snapshot may decode from (guards against hostile lengths).
const DECODE_LIMIT_BYTES: u64 = 1 << 30;

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(DECODE_LIMIT_BYTES)
}

impl KvCommand {
    /// Serializes the command for a log entry.
    pub fn encode(&self) -> Vec<u8> {
        use bincode::Options;
        codec().serialize(self).expect("commands serialize")
    }

    /// Parses a log entry's bytes.
    pub fn decode(bytes: &[u8]) -> Result<KvCommand, String> {
        use bincode::Options;
        codec().deserialize(bytes).map_err(|e| format!("bad kv command: {e}"))
    }
}

/// The replicated state: data plus each client's latest result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStore {
    data: BTreeMap<String, String>,
    /// client -> (latest seq applied, its result)
    sessions: BTreeMap<u64, (u64, KvResult)>,
}

impl KvStore {
    /// Applies a command once: a repeated (client, seq) returns the remembered result.
    pub fn apply(&mut self, cmd: &KvCommand) -> KvResult {
        if let Some((seq, result)) = self.sessions.get(&cmd.client) {
            if *seq == cmd.seq {
                return result.clone();
            }
            if *seq > cmd.seq {
                // An older retry overtaken by the client's later command: its caller is gone.
                return KvResult::Ok;
            }
        }
        let result = match &cmd.op {
            KvOp::Get { key } => KvResult::Value(self.data.get(key).cloned()),
            KvOp::Put { key, value } => {
                self.data.insert(key.clone(), value.clone());
                KvResult::Ok
            }
            KvOp::Append { key, value } => {
                self.data.entry(key.clone()).or_default().push_str(value);
                KvResult::Ok
            }
        };
        self.sessions.insert(cmd.client, (cmd.seq, result.clone()));
        result
    }

    /// Reads a key directly (for linearizable reads after ReadIndex).
    pub fn get(&self, key: &str) -> Option<String> {
        self.data.get(key).cloned()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Serializes the whole state.
    pub fn snapshot(&self) -> Vec<u8> {
        use bincode::Options;
        codec().serialize(self).expect("store serializes")
    }

    /// Replaces the state with a snapshot's.
    pub fn restore(bytes: &[u8]) -> Result<KvStore, String> {
        use bincode::Options;
        if bytes.is_empty() {
            return Ok(KvStore::default());
        }
        codec().deserialize(bytes).map_err(|e| format!("bad kv snapshot: {e}"))
    }
}
