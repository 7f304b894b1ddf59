//! What the Raft log carries, and what applying it returns.
//!
//! In: client requests (commands, plugin lifecycle) stamped by the leader.
//! Out: [`Response`]s from the state machine. The log entry type itself is
//! openraft's `Entry<TypeConfig>`; membership changes are openraft's own
//! entry payload.

use std::fmt;

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
        SnapshotData = super::snapshot_file::SnapshotBytes,
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
    /// The client's id for this request (`Synod-Request-Id`): a retry with
    /// the same id and payload is answered from the first application, not
    /// applied again (see `replica::dedup`).
    pub request_id: Option<String>,
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
        #[serde(with = "serde_bytes")]
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
    /// The leader confirmed the event stream holds every event up to this
    /// operation index: every node drops them from its outbox.
    EventsPublished {
        /// Last operation index whose events are in the stream.
        upto: u64,
    },
    /// Cluster-wide settings that replicated state depends on, so every
    /// node must use the same values: the leader proposes them from its
    /// configuration when they differ from the replicated ones.
    Settings(ClusterSettings),
    /// Several requests in one log entry, applied in order: how the leader
    /// turns many concurrent writes into one append and one fsync (openraft
    /// 0.9 flushes each append before taking the next). At most
    /// [`OPS_PER_ENTRY`] requests; no nesting.
    Batch(Vec<Request>),
    /// A device shadow operation (definitions, desired state, fenced
    /// reports, heartbeats, reassignment; see `replica::devices`).
    Device(crate::replica::devices::DeviceOp),
    /// Tokens and audit notes (see `replica::auth`).
    Auth(crate::replica::auth::AuthOp),
}

/// Settings every node applies alike, from the log (see [`Op::Settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({ "dedup_ttl_ms": 600000, "dedup_max_bytes": 67108864 }))]
pub struct ClusterSettings {
    /// How long a client request id is remembered, in ms of log time.
    pub dedup_ttl_ms: u64,
    /// Most bytes the request-id table holds (oldest forgotten first).
    pub dedup_max_bytes: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { dedup_ttl_ms: 10 * 60 * 1000, dedup_max_bytes: 64 * 1024 * 1024 }
    }
}

/// Operations one log entry may carry. An operation's index is
/// `log index × OPS_PER_ENTRY + position`: unique, increasing in log order,
/// the same on every node. It is what clients see as `index`, what seeds the
/// command's randomness, and what names its events.
pub const OPS_PER_ENTRY: u64 = 1000;

/// What applying one entry produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The output, or the deterministic error every node recorded.
    pub result: Option<Result<Vec<u8>, CommandError>>,
    /// Events the command emitted (published by the leader after commit).
    pub events: Vec<Event>,
    /// Fuel the command used.
    pub fuel_used: u64,
    /// For a retried request: the index it was first applied at (the
    /// result is the first one's).
    pub first_index: Option<u64>,
    /// The operation index (see [`OPS_PER_ENTRY`]).
    pub index: u64,
    /// For a batch: each request's response, in order.
    pub items: Vec<Response>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every response crosses nodes postcard-encoded (forwarded writes):
    /// each error variant must survive the trip.
    #[test]
    fn responses_round_trip_through_postcard() {
        let errors = vec![
            CommandError::UnknownPlugin { name: "p".into() },
            CommandError::Lifecycle { message: "m".into() },
            CommandError::UnknownCommand { name: "c".into() },
            CommandError::UnknownQuery { name: "q".into() },
            CommandError::InvalidInput { message: "i".into() },
            CommandError::Rejected { message: "r".into() },
            CommandError::Internal { message: "x".into() },
            CommandError::OutOfFuel { limit: 1 },
            CommandError::OutOfMemory { limit: 2 },
            CommandError::StackOverflow,
            CommandError::Trap { message: "t".into() },
            CommandError::OutputTooLarge { size: 3, limit: 4 },
            CommandError::Host { reason: "h".into() },
        ];
        for e in errors {
            let r = Response {
                result: Some(Err(e)),
                events: Vec::new(),
                fuel_used: 9,
                first_index: Some(3),
                index: 4,
                items: Vec::new(),
            };
            let bytes = postcard::to_allocvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<Response>(&bytes).unwrap(), r);
        }
        let req = Request {
            timestamp_ms: 1,
            caller: "c".into(),
            request_id: Some("id".into()),
            op: Op::InstallPlugin {
                name: "n".into(),
                version: "v".into(),
                sha256: "s".into(),
                size: 5,
                limits: PluginLimits::default(),
            },
        };
        assert_eq!(postcard::from_bytes::<Request>(&postcard::to_allocvec(&req).unwrap()).unwrap(), req);
    }
}
