//! Discovery: a new node that knows one member finds the others.
//!
//! In: the seed peers of this node's config file, and what they answer to
//! [`RaftRpc::Members`]. Out: every member they name on this node's
//! allowlist, with its address, and in `NodeInner::discovered` (so the
//! leader's Raft messages are bound to its node id), until this node has
//! applied a membership that names it — from then on `follow_membership`
//! keeps the allowlist and the membership names the members.
//!
//! Why: a member accepts connections only from keys on its allowlist, and
//! so does a new node. When the leader adds a node, the leader (not the
//! seed) opens the connection that replicates the log to it; without
//! discovery the new node would refuse it unless its config listed every
//! member. With it, one reachable member is enough: once that member has
//! applied the change that adds the new node, it answers the new node's
//! question, and the new node admits the leader.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use super::NodeInner;
use crate::consensus::NodeId;
use crate::consensus::rpc::{RaftReply, RaftRpc};

/// How often the seeds are asked.
const INTERVAL: Duration = Duration::from_secs(1);

/// Asks the seed peers for the membership every [`INTERVAL`] and allows
/// every member they name, until this node has applied a membership that
/// includes it. Never disallows: that is `follow_membership`'s job once the
/// membership is applied here.
pub async fn discover(node: Arc<NodeInner>) {
    let seeds: Vec<NodeId> = node.seed_members.keys().copied().filter(|id| *id != node.id).collect();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if node.shared.membership.borrow().nodes().any(|(id, _)| *id == node.id) {
            tracing::debug!("this node has applied a membership that names it; discovery stops");
            return;
        }
        for seed in &seeds {
            let reply = tokio::time::timeout(INTERVAL, node.ask(*seed, &RaftRpc::Members)).await;
            let members = match reply {
                Ok(Ok(RaftReply::Members(members))) => members,
                Ok(Ok(other)) => {
                    tracing::debug!(seed, reply = ?other, "seed did not answer with its members");
                    continue;
                }
                // Expected until the seed has applied the change that adds
                // this node: until then it refuses this node's key.
                Ok(Err(e)) => {
                    tracing::debug!(seed, error = %e, "cannot ask seed for its members yet");
                    continue;
                }
                Err(_) => continue,
            };
            let allowed = node.p2p.allowed_peers();
            for (id, info) in members {
                if id == node.id {
                    continue;
                }
                let Ok(peer) = PeerId::from_str(&info.peer_id) else {
                    tracing::warn!(seed, member = id, peer_id = %info.peer_id, "seed named a member with an unusable key");
                    continue;
                };
                if !allowed.contains(&peer) {
                    tracing::info!(seed, member = id, %peer, addr = %info.p2p_addr, "discovered a member");
                }
                node.p2p.allow(peer, info.p2p_addr.parse().ok());
                if let Ok(mut discovered) = node.discovered.write() {
                    discovered.insert(id, info);
                }
            }
        }
    }
}
