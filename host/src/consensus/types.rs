//! What the Raft log carries, and what applying it returns.
//!
//! In: client requests (commands, plugin lifecycle) stamped by the leader.
//! Out: [`Response`]s from the state machine. The log entry type itself is
//! openraft's `Entry<TypeConfig>`; membership changes are openraft's own
//! entry payload.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::runtime::{CommandError, PluginLimits};
use crate::state::Event;

/// A node's numeric id in the cluster (configured, bound to its PeerId).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft types of a Synod cluster.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// How to reach a member: carried in the membership config, so every node
/// knows every other's key and addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// libp2p PeerId (base58): the only key this node id may speak with.
    pub peer_id: String,
    /// libp2p multiaddr of the node (`/ip4/127.0.0.1/tcp/7101`).
    pub p2p_addr: String,
    /// HTTP API address (`127.0.0.1:7001`), for clients told to go elsewhere.
    pub http_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {} (http {})", self.peer_id, self.p2p_addr, self.http_addr)
    }
}

/// One client request, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unix milliseconds assigned by the leader: the handler's clock.
    pub timestamp_ms: u64,
    /// Who asked (authenticated caller, or "anonymous").
    pub caller: String,
    /// What to do.
    pub op: Op,
}

/// The operations the replicated state machine knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Run `command` of the active version of `plugin`.
    Command {
        /// Plugin name.
        plugin: String,
        /// Command name.
        command: String,
        /// Opaque payload (JSON by convention).
        payload: Vec<u8>,
    },
    /// Record a new version of a plugin. Its bytes travel outside the log
    /// (content-addressed, over the blob protocol); the entry carries their
    /// hash. The first version of a plugin becomes active at once.
    InstallPlugin {
        /// Plugin name.
        name: String,
        /// Version label chosen by the uploader.
        version: String,
        /// sha256 of the component bytes, hex.
        sha256: String,
        /// Size of the component in bytes.
        size: u64,
        /// Per-command limits for this version.
        limits: PluginLimits,
    },
    /// Make `version` the active version of `name` from this entry on.
    ActivatePlugin {
        /// Plugin name.
        name: String,
        /// A version installed earlier.
        version: String,
    },
    /// Remove a plugin and all its versions (its state namespace is kept).
    RemovePlugin {
        /// Plugin name.
        name: String,
    },
}

/// What applying one entry produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The output, or the deterministic error every node recorded.
    pub result: Option<Result<Vec<u8>, CommandError>>,
    /// Events the command emitted (published by the leader after commit).
    pub events: Vec<Event>,
    /// Fuel the command used.
    pub fuel_used: u64,
}
