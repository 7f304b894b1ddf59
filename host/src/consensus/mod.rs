//! Consensus stage: openraft types, the durable log store, the replicated
//! state machine and the Raft network over libp2p.
//!
//! In: client requests (from the API, or forwarded by followers). Out:
//! committed entries applied in order on every node.

// openraft's traits fix the error type (`StorageError`, ~224 bytes); boxing
// it in our helpers would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod rpc;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::{BlobSource, NoBlobSource, Shared, StateMachineStore};
pub use types::{NodeId, NodeInfo, Op, Request, Response, TypeConfig};
