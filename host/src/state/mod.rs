//! The deterministic data model: what a command may change, and how every
//! node proves it changed the same thing.
//!
//! In: the effects of one applied command ([`Effects`]: its result, buffered
//! writes and events). Out: the plugin namespaces after those writes, and a
//! running [`Digest`] that two nodes compare to detect divergence.
//!
//! Everything here is a pure function of its inputs: ordered maps only, no
//! clocks, no randomness, no hashing with per-process seeds.

mod base;
mod digest;
mod entry;
mod kv;
mod name;

pub use base::{Mapping, Tap, counting_raw, decode_mapped, writing_raw};
pub use digest::Digest;
pub use kv::{Changes, ChangesImage, ChangesSince, KvState, Namespace, Scanned, StateReadError, StateView, WriteSet};
pub use name::{MAX_NAME_BYTES, NameError, check_name, parse_name};

use serde::{Deserialize, Serialize};

/// One event a handler emitted, published after its command commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Dot-separated topic, relative to the plugin (`heater.on`).
    pub topic: String,
    /// Opaque payload (JSON by convention).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Everything one command changed or produced that every node must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effects {
    /// The handler's output on success, or the deterministic error text.
    pub result: Result<Vec<u8>, String>,
    /// State writes to commit (empty when the command failed).
    pub writes: WriteSet,
    /// Events to publish (empty when the command failed).
    pub events: Vec<Event>,
    /// Fuel the command consumed: part of the contract, so part of the digest.
    pub fuel_used: u64,
}
