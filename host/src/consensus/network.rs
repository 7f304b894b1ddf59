//! openraft's network, over the libp2p transport.
//!
//! In: openraft RPCs addressed to a node id. Out: the same RPCs, postcard-
//! encoded, on `/synod/raft/1` to the PeerId the membership binds that id
//! to; the peer's answer, or a network error openraft retries.

use std::str::FromStr;

use libp2p::PeerId;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::rpc::{RaftReply, RaftRpc};
use super::types::{NodeId, NodeInfo, TypeConfig};
use crate::p2p::{P2p, Protocol};

/// Makes connections to members.
#[derive(Clone)]
pub struct Network {
    /// The node's transport.
    pub p2p: P2p,
}

/// openraft's handle on one member.
pub struct Connection {
    p2p: P2p,
    target: NodeId,
    /// `None` when the membership carries an unparsable PeerId.
    peer: Option<PeerId>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Connection {
        let peer = PeerId::from_str(&node.peer_id).ok();
        if let (Some(peer), Ok(addr)) = (peer, node.p2p_addr.parse()) {
            self.p2p.allow(peer, Some(addr));
        }
        Connection { p2p: self.p2p.clone(), target, peer }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl Connection {
    async fn call<E: std::error::Error>(&self, rpc: RaftRpc) -> Result<RaftReply, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
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
        let e = std::io::Error::other(format!("node {} answered {reply:?}", self.target));
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
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
