//! What nodes say to each other (postcard-encoded, over libp2p).
//!
//! `/synod/raft/1` carries [`RaftRpc`]: openraft's three RPCs, client writes
//! forwarded by followers, read-index requests, status for digest
//! comparison, and the membership for a node discovering its peers. `/synod/blob/1` carries [`BlobRpc`]: plugin bytes.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::NodeInfo;
use super::types::{NodeId, Request, Response, TypeConfig};

/// A request on `/synod/raft/1`.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// openraft: replicate entries / heartbeat.
    Append(AppendEntriesRequest<TypeConfig>),
    /// openraft: request a vote.
    Vote(VoteRequest<NodeId>),
    /// openraft: one chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Client writes a follower received, for the leader to propose (in
    /// its next batch). The leader stamps the timestamp. Client commands
    /// and the sender's own reports only: the leader refuses anything else
    /// in a forwarded batch, and checks each client's credential itself.
    WriteBatch(Vec<Forwarded>),
    /// A plugin lifecycle change (install, activate, remove) a follower
    /// received; the leader validates it (and the caller's credential)
    /// itself before proposing it.
    Lifecycle(Forwarded),
    /// Confirm leadership for a linearizable read; the answer is the index
    /// the reader must have applied before it reads.
    ReadIndex,
    /// This node's applied index and digest.
    Status,
    /// The members of the membership this node has applied, so a node
    /// configured with one member can learn (and allow) the others.
    Members,
    /// This node's digests right after these operation indices (divergence
    /// bisection), and which indices it remembers.
    Digests(Vec<u64>),
    /// What this node's operation at this index did (divergence report).
    Effects(u64),
}

/// A request a follower forwards to the leader, with the credential its
/// caller presented: the SHA-256 of the bearer token (never the token), so
/// the leader authenticates the caller itself against its own table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forwarded {
    /// The request as it will enter the log.
    pub request: Request,
    /// The caller's token hash; `None` for an anonymous caller (a cluster
    /// with authentication off) or the node's own operations.
    pub credential: Option<crate::replica::auth::TokenHash>,
}

/// A response on `/synod/raft/1`.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To [`RaftRpc::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRpc::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRpc::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To [`RaftRpc::WriteBatch`], one per write in order: the log index
    /// and what applying it produced.
    WriteBatch(Vec<Result<(u64, Response), WriteError>>),
    /// To [`RaftRpc::Lifecycle`].
    Lifecycle(Result<(u64, Response), WriteError>),
    /// To [`RaftRpc::ReadIndex`].
    ReadIndex(Result<u64, WriteError>),
    /// To [`RaftRpc::Status`].
    Status(NodeStatus),
    /// To [`RaftRpc::Members`]: every node of the applied membership
    /// (voters and learners), empty before one is applied.
    Members(BTreeMap<NodeId, NodeInfo>),
    /// To [`RaftRpc::Digests`].
    Digests(DigestSample),
    /// To [`RaftRpc::Effects`]: empty when no longer kept.
    Effects(Vec<crate::replica::trail::EffectSummary>),
    /// The request was refused (sender not bound to the id it claims,
    /// undecodable request).
    Refused(String),
}

/// Why a write or read could not be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader.
    #[error("not the leader (leader: {leader_id:?} at {leader_http:?})")]
    NotLeader {
        /// The leader's id, when known.
        leader_id: Option<NodeId>,
        /// The leader's HTTP address, when known.
        leader_http: Option<String>,
    },
    /// The node's write queue is full: retry after a short pause (429).
    #[error("overloaded: too many writes are waiting; retry shortly")]
    Overloaded,
    /// The request is not one this path takes (a peer forwarded an
    /// internal operation, or a lifecycle change failed validation).
    #[error("{0}")]
    Refused(String),
    /// Anything else (the leader stepped down mid-request, storage fault).
    #[error("{0}")]
    Failed(String),
    /// The leader does not know the caller's token (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's token lacks a role on the leader (403).
    #[error("{0}")]
    Forbidden(String),
    /// The plugins' state is over `limits.state_quota_bytes`: read-only
    /// for commands until data is deleted (507).
    #[error(
        "read-only: quota exceeded — the plugins' state holds {bytes} bytes, over its quota of {quota} \
         (limits.state_quota_bytes); an admin can run the commands that delete data, or raise the quota"
    )]
    QuotaExceeded {
        /// Key and value bytes held.
        bytes: u64,
        /// The leader's quota.
        quota: u64,
    },
}

/// A node's digests at some operation indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestSample {
    /// The first and last operation index it remembers digests for.
    pub bounds: Option<(u64, u64)>,
    /// The digest after each index asked for; `None` where not remembered.
    pub digests: Vec<Option<[u8; 32]>>,
}

/// A node's position, for digest comparison and `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({ "id": 1, "applied_index": 42, "digest_index": 42001, "digest": "9f2c…", "engine": "1d29afb0e93fac85" }))]
pub struct NodeStatus {
    /// Node id.
    pub id: NodeId,
    /// Last applied log index.
    pub applied_index: u64,
    /// Index of the last applied operation that changed the digest.
    pub digest_index: u64,
    /// The state digest at `digest_index`, hex.
    pub digest: String,
    /// Engine fingerprint hash.
    pub engine: String,
}

/// A request on `/synod/blob/1`.
#[derive(Debug, Serialize, Deserialize)]
pub enum BlobRpc {
    /// Store these component bytes (the receiver hashes them itself).
    Push(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Send the bytes with this sha256 if you have them.
    Fetch(String),
    /// Have the stored component with this sha256 compiled for your engine
    /// (into your compile cache), so that applying its install does not
    /// compile; answers `Prepared` once it is, `Preparing` meanwhile.
    Prepare(String),
}

/// A response on `/synod/blob/1`.
#[derive(Debug, Serialize, Deserialize)]
pub enum BlobReply {
    /// Stored durably under this sha256.
    Stored(String),
    /// The bytes asked for.
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Not here.
    NotFound,
    /// The request failed (refused sender, disk fault, a component that
    /// does not compile).
    Failed(String),
    /// Compiled and in the compile cache (or a driver, which needs none).
    Prepared,
    /// Being compiled.
    Preparing,
}
