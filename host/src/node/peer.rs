//! The peer protocol: what this node asks other members, and how it
//! answers them.
//!
//! In: requests from peers on `/synod/raft/1` ([`RaftRpc`]) and
//! `/synod/blob/1` ([`BlobRpc`]). Out: openraft's handling of Raft RPCs,
//! forwarded client commands proposed here, read indexes, status, the
//! applied membership, plugin bytes. Outbound, [`NodeInner::ask`] is the
//! one typed request helper every caller uses: encode, send, decode, with
//! the error a caller can act on.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::PeerId;

use super::NodeInner;
use crate::artifacts::Prepared;
use crate::consensus::rpc::{BlobReply, BlobRpc, NodeStatus, RaftReply, RaftRpc, WriteError};
use crate::consensus::{BlobSource, NodeId, Op};
use crate::p2p::{InboundHandler, P2pError, Protocol};
use crate::replica::auth::Access;

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Inbound requests wait for the node to finish starting.
pub(super) struct Inbound(pub(super) Arc<OnceLock<Arc<NodeInner>>>);

impl InboundHandler for Inbound {
    fn handle(&self, from: PeerId, protocol: Protocol, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let cell = self.0.clone();
        Box::pin(async move {
            let Some(node) = cell.get().cloned() else {
                return encode(&RaftReply::Refused("node is starting".into()));
            };
            match protocol {
                Protocol::Raft => encode(&node.handle_raft(from, &request).await),
                Protocol::Blob => encode(&node.handle_blob(&request)),
            }
        })
    }
}

/// Fetches plugin bytes from whichever member has them.
pub(super) struct PeerBlobs(pub(super) Arc<OnceLock<Arc<NodeInner>>>);

impl BlobSource for PeerBlobs {
    fn fetch(&self, sha256: String) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let cell = self.0.clone();
        Box::pin(async move {
            let node = cell.get().cloned().ok_or("node is starting")?;
            node.fetch_blob(&sha256).await
        })
    }
}

/// Why asking a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// No member with that id, or its key is unparsable.
    #[error("node {0} is not a member with a usable key")]
    UnknownPeer(NodeId),
    /// The transport gave no answer.
    #[error(transparent)]
    Transport(#[from] P2pError),
    /// The answer did not decode.
    #[error("undecodable answer: {0}")]
    Decode(#[from] postcard::Error),
}

impl NodeInner {
    /// Send `rpc` to member `id` and decode its answer.
    pub async fn ask(&self, id: NodeId, rpc: &RaftRpc) -> Result<RaftReply, AskError> {
        let peer = self.peer_of(id).ok_or(AskError::UnknownPeer(id))?;
        let bytes = self.p2p.request(peer, Protocol::Raft, encode(rpc)).await?;
        Ok(postcard::from_bytes(&bytes)?)
    }

    /// Send `rpc` to member `id` on the blob protocol.
    pub async fn ask_blob(&self, id: NodeId, rpc: BlobRpc) -> Result<BlobReply, AskError> {
        let peer = self.peer_of(id).ok_or(AskError::UnknownPeer(id))?;
        let bytes = self.p2p.request(peer, Protocol::Blob, encode(&rpc)).await?;
        Ok(postcard::from_bytes(&bytes)?)
    }

    /// The bytes of `sha256` from whichever other member has them.
    pub(super) async fn fetch_blob(&self, sha256: &str) -> Result<Vec<u8>, String> {
        let mut last = String::from("no other member");
        for (id, _) in self.members() {
            if id == self.id {
                continue;
            }
            match self.ask_blob(id, BlobRpc::Fetch(sha256.to_owned())).await {
                Ok(BlobReply::Bytes(b)) => return Ok(b),
                Ok(other) => last = format!("node {id}: {other:?}"),
                Err(e) => last = format!("node {id}: {e}"),
            }
        }
        Err(last)
    }

    /// The key member `id` must speak with.
    pub(super) fn peer_of(&self, id: NodeId) -> Option<PeerId> {
        self.members().get(&id).and_then(|n| PeerId::from_str(&n.peer_id).ok())
    }

    /// Forward `rpc` to the leader. A failure that proves the request never
    /// reached it reads as "no leader", so the caller retries through an
    /// election; one after it was sent (a lost answer, a timeout) is a
    /// failure the client must see, since the leader may have acted.
    pub(super) async fn forward(&self, leader: NodeId, rpc: &RaftRpc) -> Result<RaftReply, WriteError> {
        let mut answer = self.ask(leader, rpc).await;
        if answer.is_ok()
            && matches!(rpc, RaftRpc::WriteBatch(_))
            && crate::faults::take_lost_answer()
            && let Some(peer) = self.peer_of(leader)
        {
            let reason = "the answer was dropped by an injected fault".to_owned();
            answer = Err(AskError::Transport(P2pError::Lost { peer, reason }));
        }
        match answer {
            Ok(reply) => Ok(reply),
            // Never reached the leader: safe to retry (elsewhere).
            Err(
                AskError::UnknownPeer(_)
                | AskError::Transport(
                    P2pError::Dial { .. }
                    | P2pError::NotAllowed { .. }
                    | P2pError::Refused { .. }
                    | P2pError::Request { .. },
                ),
            ) => Err(self.not_leader()),
            // Sent, and no answer: the leader may have proposed it. Retrying
            // would apply it twice (the fault battery caught a compare-and-set
            // applied twice after a network cut); the client decides, and a
            // request id makes its retry safe.
            Err(e) => Err(WriteError::Failed(format!("the leader may or may not have taken this request: {e}"))),
        }
    }

    pub(super) async fn handle_raft(&self, from: PeerId, request: &[u8]) -> RaftReply {
        let rpc: RaftRpc = match postcard::from_bytes(request) {
            Ok(r) => r,
            Err(e) => return RaftReply::Refused(format!("undecodable request: {e}")),
        };
        // A Raft message speaks for a node id: only that node's key may send it.
        let claimed = match &rpc {
            RaftRpc::Append(r) => Some(r.vote.leader_id().voted_for()),
            RaftRpc::Vote(r) => Some(r.vote.leader_id().voted_for()),
            RaftRpc::Snapshot(r) => Some(r.vote.leader_id().voted_for()),
            _ => None,
        };
        if let Some(Some(id)) = claimed
            && self.peer_of(id) != Some(from)
        {
            tracing::warn!(%from, claimed = id, "refused a Raft message from a key not bound to its node id");
            return RaftReply::Refused(format!("peer {from} is not node {id}"));
        }
        match rpc {
            RaftRpc::Append(r) => {
                if !r.entries.is_empty() {
                    crate::faults::hold_append().await;
                }
                RaftReply::Append(self.raft.append_entries(r).await)
            }
            RaftRpc::Vote(r) => RaftReply::Vote(self.raft.vote(r).await),
            RaftRpc::Snapshot(r) => RaftReply::Snapshot(self.raft.install_snapshot(r).await),
            RaftRpc::WriteBatch(writes) => {
                // All queue at once, so they share this node's next proposal.
                let sender =
                    self.members().into_iter().find(|(id, _)| self.peer_of(*id) == Some(from)).map(|(id, _)| id);
                let answers = writes.into_iter().map(|w| async move {
                    if let Some(access) = forwarded_access(&w.request, sender)? {
                        self.check_credential(&w.request.caller, w.credential, access)?;
                    }
                    self.admit(&w.request, w.credential)?;
                    self.write_local(w.request).await
                });
                RaftReply::WriteBatch(futures::future::join_all(answers).await)
            }
            RaftRpc::Lifecycle(f) => {
                RaftReply::Lifecycle(match self.check_credential(&f.request.caller, f.credential, Access::Admin) {
                    Ok(()) => self.lifecycle_local(f.request).await,
                    Err(e) => Err(e),
                })
            }
            RaftRpc::ReadIndex => RaftReply::ReadIndex(self.read_index_local().await),
            RaftRpc::Status => RaftReply::Status(self.status()),
            RaftRpc::Members => RaftReply::Members(
                self.shared.membership.borrow().nodes().map(|(id, info)| (*id, info.clone())).collect(),
            ),
            RaftRpc::Digests(indices) => RaftReply::Digests(self.digest_sample(&indices)),
            RaftRpc::Effects(index) => {
                RaftReply::Effects(self.with_replica(|r| r.effects_at(index)).unwrap_or_default())
            }
        }
    }

    pub(super) fn handle_blob(&self, request: &[u8]) -> BlobReply {
        match postcard::from_bytes::<BlobRpc>(request) {
            Ok(BlobRpc::Push(bytes)) => match self.artifacts.put(&bytes) {
                Ok(sha) => {
                    // Compile now, off the apply path: the install follows.
                    self.artifacts.prepare(&sha);
                    BlobReply::Stored(sha)
                }
                Err(e) => BlobReply::Failed(e.to_string()),
            },
            Ok(BlobRpc::Prepare(sha)) => match self.artifacts.prepare(&sha) {
                Prepared::Ready => BlobReply::Prepared,
                Prepared::Running => BlobReply::Preparing,
                Prepared::Failed(e) => BlobReply::Failed(e),
                Prepared::Missing => BlobReply::NotFound,
            },
            Ok(BlobRpc::Fetch(sha)) => match self.artifacts.get(&sha) {
                Ok(Some(b)) => BlobReply::Bytes(b),
                Ok(None) => BlobReply::NotFound,
                Err(e) => BlobReply::Failed(e.to_string()),
            },
            Err(e) => BlobReply::Failed(format!("undecodable request: {e}")),
        }
    }

    /// Every other member's status (`None` for one that did not answer).
    pub async fn peer_statuses(&self) -> Vec<Option<NodeStatus>> {
        let ids: Vec<NodeId> = self.members().into_keys().filter(|id| *id != self.id).collect();
        let asks = ids.into_iter().map(|id| async move {
            match tokio::time::timeout(Duration::from_millis(500), self.ask(id, &RaftRpc::Status)).await {
                Ok(Ok(RaftReply::Status(s))) => Some(s),
                _ => None,
            }
        });
        futures::future::join_all(asks).await
    }
}

/// What a follower may forward in a `WriteBatch`, and what its caller
/// must be allowed to do: client commands, device writes and token changes
/// as the follower's callers sent them (`Some(access)`: the leader checks
/// the caller's credential itself), and the sender's own heartbeats and
/// device reports and a bootstrap token (`None`: speaking for the node the
/// sending key is bound to, `sender`, and no other). Never another internal
/// operation (an events mark, a plugin install, a reassignment, an audit
/// note — those have their own paths), and never a batch.
fn forwarded_access(
    request: &crate::consensus::Request,
    sender: Option<NodeId>,
) -> Result<Option<Access<'_>>, WriteError> {
    use crate::replica::auth::AuthOp;
    use crate::replica::devices::DeviceOp;
    let own = |node: Option<NodeId>| -> Result<Option<Access<'_>>, WriteError> {
        if node.is_some() && node != sender {
            return Err(WriteError::Refused(format!("a peer may report only for itself, not node {node:?}")));
        }
        if sender.is_none() || request.caller != super::SYSTEM {
            return Err(WriteError::Refused("a node's own operation is made by the node, from a member".into()));
        }
        Ok(None)
    };
    match &request.op {
        Op::Command { plugin, .. } => Ok(Some(Access::Command(plugin))),
        Op::Device(DeviceOp::Put { .. } | DeviceOp::Delete { .. }) => Ok(Some(Access::Admin)),
        Op::Device(DeviceOp::PatchDesired { .. }) => Ok(Some(Access::Desired)),
        Op::Auth(AuthOp::Create { .. } | AuthOp::Revoke { .. }) => Ok(Some(Access::Admin)),
        Op::Device(DeviceOp::Report { node, .. } | DeviceOp::Heartbeat { node, .. }) => own(Some(*node)),
        Op::Auth(AuthOp::Bootstrap { .. }) => own(None),
        _ => Err(WriteError::Refused("a forwarded batch may carry only client commands".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::Request;
    use crate::runtime::PluginLimits;

    fn request(caller: &str, op: Op) -> Request {
        Request { timestamp_ms: 0, caller: caller.into(), request_id: None, op }
    }

    /// A peer may forward client commands (whose caller's credential the
    /// leader checks); never an internal operation or a batch.
    #[test]
    fn forwarded_batches_carry_only_client_commands() {
        let command = Op::Command { plugin: "p".into(), command: "c".into(), payload: b"{}".to_vec() };
        let req = request(super::super::ANONYMOUS, command.clone());
        assert_eq!(forwarded_access(&req, Some(2)).unwrap(), Some(Access::Command("p")));
        let install = Op::InstallPlugin {
            name: "p".into(),
            version: "1".into(),
            sha256: "ab".repeat(32),
            size: 1,
            limits: PluginLimits::default(),
        };
        let note = Op::Auth(crate::replica::auth::AuthOp::Note { action: "membership.add".into(), target: "4".into() });
        for op in [
            install,
            note,
            Op::EventsPublished { upto: u64::MAX },
            Op::RemovePlugin { name: "p".into() },
            Op::ActivatePlugin { name: "p".into(), version: "1".into() },
            Op::Batch(vec![request(super::super::ANONYMOUS, command.clone())]),
        ] {
            let refused = forwarded_access(&request(super::super::ANONYMOUS, op), Some(2)).unwrap_err();
            assert!(matches!(refused, WriteError::Refused(_)), "{refused}");
        }
        let revoke = Op::Auth(crate::replica::auth::AuthOp::Revoke { target: "x".into() });
        assert_eq!(forwarded_access(&request("bob", revoke), Some(2)).unwrap(), Some(Access::Admin));
    }

    /// A node may forward its own heartbeats and device reports, never
    /// another node's, and never a reassignment.
    #[test]
    fn a_peer_speaks_only_for_its_own_devices() {
        use crate::replica::devices::DeviceOp;
        let report =
            |node| Op::Device(DeviceOp::Report { id: "d".into(), node, epoch: 1, fields: "{}".into(), actuated: None });
        assert!(forwarded_access(&request(super::super::SYSTEM, report(2)), Some(2)).unwrap().is_none());
        assert!(forwarded_access(&request(super::super::SYSTEM, report(3)), Some(2)).is_err());
        assert!(forwarded_access(&request(super::super::ANONYMOUS, report(2)), Some(2)).is_err());
        let beat = Op::Device(DeviceOp::Heartbeat { node: 3, labels: Vec::new() });
        assert!(forwarded_access(&request(super::super::SYSTEM, beat), Some(2)).is_err());
        let reassign = Op::Device(DeviceOp::Reassign { id: "d".into(), epoch: 1 });
        assert!(forwarded_access(&request(super::super::SYSTEM, reassign), Some(2)).is_err());
        let patch = Op::Device(DeviceOp::PatchDesired { id: "d".into(), patch: "{}".into(), expected_version: None });
        assert_eq!(forwarded_access(&request(super::super::ANONYMOUS, patch), Some(2)).unwrap(), Some(Access::Desired));
        let boot = Op::Auth(crate::replica::auth::AuthOp::Bootstrap { hash: [1; 32] });
        assert!(forwarded_access(&request(super::super::SYSTEM, boot.clone()), Some(2)).unwrap().is_none());
        assert!(forwarded_access(&request(super::super::SYSTEM, boot.clone()), None).is_err(), "from a non-member");
        assert!(forwarded_access(&request("admin", boot), Some(2)).is_err());
    }
}
