//! Consensus stage: a thin adapter between openraft and the rest — the
//! types the log carries, the durable log store, the state machine adapter
//! (snapshot files and the apply thread around [`crate::replica`]), the
//! Raft network over libp2p and the wire RPCs.
//!
//! In: proposals from the node's write path. Out: committed entries handed
//! in order to the replica on every node.

// openraft's traits fix the error type (`StorageError`, ~224 bytes); boxing
// it in our helpers would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
mod retire;
pub mod rpc;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use snapshot_file::SnapshotBytes;
pub use state_machine::{BlobSource, NoBlobSource, Shared, StateMachineStore};
pub use types::{NodeId, NodeInfo, Op, Request, Response, TypeConfig};
