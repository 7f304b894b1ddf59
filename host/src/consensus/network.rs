//! openraft's network, over the libp2p transport.
//!
//! In: openraft RPCs addressed to a node id. Out: the same RPCs, postcard-
//! encoded, on `/synod/raft/1` to the PeerId the membership binds that id
//! to; the peer's answer, or a network error openraft retries.

use std::str::FromStr;

use libp2p::PeerId;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use super::rpc::{RaftReply, RaftRpc};
use super::types::{NodeId, NodeInfo, TypeConfig};
use crate::p2p::{P2p, Protocol};

/// Makes connections to members.
#[derive(Clone)]
pub struct Network {
    /// The node's transport.
    pub p2p: P2p,
    /// Bytes of entries one append may carry when it carries more than
    /// one. openraft gives an append one heartbeat interval (50 ms) before
    /// it counts as lost and is sent again, so an append must be small
    /// enough for a follower to receive, decode and fsync well within it;
    /// a larger one is split (see [`entries_that_fit`]), never retried
    /// whole forever while followers time out and elections churn.
    pub max_append_bytes: usize,
}

/// openraft's handle on one member.
pub struct Connection {
    p2p: P2p,
    target: NodeId,
    /// `None` when the membership carries an unparsable PeerId.
    peer: Option<PeerId>,
    /// See [`Network::max_append_bytes`].
    max_append_bytes: usize,
}

/// Room the request's envelope (vote, ids, lengths) takes besides entries.
const ENVELOPE_BYTES: usize = 4096;

/// How many of `rpc`'s leading entries fit one append of `max` bytes (at
/// least one: a single entry is capped below a Raft message at proposal).
fn entries_that_fit(rpc: &AppendEntriesRequest<TypeConfig>, max: usize) -> u64 {
    let mut total = ENVELOPE_BYTES;
    let mut n = 0u64;
    for entry in &rpc.entries {
        total += postcard::experimental::serialized_size(entry).unwrap_or(usize::MAX / 2);
        if total > max {
            break;
        }
        n += 1;
    }
    n.max(1)
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Connection {
        // No allowlisting here: openraft asks for a client as soon as a
        // membership is appended, before it commits. The node allows a key
        // once the membership naming it is applied (`node::follow_membership`).
        let peer = PeerId::from_str(&node.peer_id).ok();
        Connection { p2p: self.p2p.clone(), target, peer, max_append_bytes: self.max_append_bytes }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl Connection {
    async fn call<E: std::error::Error>(
        &self,
        rpc: RaftRpc,
    ) -> Result<RaftReply, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        let Some(peer) = self.peer else {
            let e = std::io::Error::other(format!("node {} has no valid peer id", self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let bytes = postcard::to_allocvec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self
            .p2p
            .request(peer, Protocol::Raft, bytes)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        postcard::from_bytes(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    fn unexpected<E: std::error::Error>(&self, reply: RaftReply) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        reply_error(self.target, reply)
    }
}

/// Between two tries at a member that cannot be reached or refuses (see
/// [`reply_error`]).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// What openraft is told of a reply that does not answer its request.
///
/// A node still starting (opening a large snapshot, replaying its log)
/// refuses every request the same way until it is up. Reported as a
/// network error, openraft sent the next append at once: in a restart of
/// three nodes at 10M keys the leader asked a starting node about 1,500
/// times a second for four seconds, on the two cores the starting nodes
/// needed. As `Unreachable` it waits [`RETRY_AFTER`] first.
fn reply_error<E: std::error::Error>(
    target: NodeId,
    reply: RaftReply,
) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    let e = std::io::Error::other(format!("node {target} answered {reply:?}"));
    match reply {
        RaftReply::Refused(_) => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(RETRY_AFTER))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len();
        let size = if entries > 1 { postcard::experimental::serialized_size(&rpc).unwrap_or(usize::MAX) } else { 0 };
        if size > self.max_append_bytes {
            // openraft sends fewer entries next time instead of retrying an
            // append too large to finish within its timeout (or to pass the
            // transport), forever, while followers time out and elections
            // churn.
            let fit = entries_that_fit(&rpc, self.max_append_bytes);
            tracing::debug!(
                target = self.target,
                size,
                entries,
                fit,
                "append over the message cap; asking openraft to split it"
            );
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        match self.call(RaftRpc::Append(rpc)).await? {
            RaftReply::Append(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(RaftRpc::Snapshot(rpc)).await? {
            RaftReply::Snapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(RaftRpc::Vote(rpc)).await? {
            RaftReply::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Error = RPCError<NodeId, NodeInfo, RaftError<NodeId>>;

    /// A member that refuses because it is still starting is tried again
    /// after a pause (`Unreachable`, which openraft backs off from), not at
    /// once; any other reply that does not answer stays a network error.
    #[test]
    fn a_refusing_member_is_backed_off_from() {
        let refused: Error = reply_error(3, RaftReply::Refused("node is starting".into()));
        assert!(matches!(refused, RPCError::Unreachable(_)), "{refused:?}");
        let other: Error = reply_error(3, RaftReply::ReadIndex(Ok(5)));
        assert!(matches!(other, RPCError::Network(_)), "{other:?}");
    }
}
