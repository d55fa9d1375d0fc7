//! Bincode with a bound on what one decode may allocate, for everything Petal keeps on
//! disk or puts in the Raft log (commands, replies, the store's metadata).

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Most bytes one decode may allocate (guards against hostile or damaged lengths).
const DECODE_LIMIT_BYTES: u64 = 1 << 32;

fn options() -> impl Options {
    bincode::DefaultOptions::new().with_limit(DECODE_LIMIT_BYTES)
}

/// Serializes `value` (Petal's own types always serialize).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    options().serialize(value).expect("petal types serialize")
}

/// Parses bytes written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    options().deserialize(bytes).map_err(|e| e.to_string())
}
