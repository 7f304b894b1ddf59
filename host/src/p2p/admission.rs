//! Admission: which connected peers run this node's protocol and engine.
//!
//! In: what the swarm task learns from identify (a peer's protocol version,
//! which carries its engine fingerprint) and when a peer's last connection
//! closes. Out: the answer the inbound paths wait for before they hand a
//! peer's request to the handler — admitted, or refused with the reason —
//! and the refused peers for operators.
//!
//! A key on the allowlist is not enough: a member that runs another engine
//! build (or another synod protocol) would apply the same log to a
//! different state. Identify runs on every new connection, so a peer is
//! admitted per connection and forgotten when its last connection closes
//! (it may come back as a different binary). A refused peer stays refused
//! until it leaves the allowlist, so reconnecting does not get it in.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::watch;

use super::P2pError;

/// What is known of each connected peer. Clones share it.
#[derive(Clone, Debug)]
pub(super) struct Admission(Arc<watch::Sender<State>>);

#[derive(Debug, Default)]
struct State {
    /// Peers whose identify matched ours on their current connections.
    identified: HashSet<PeerId>,
    /// Peers refused, with why.
    refused: HashMap<PeerId, String>,
}

impl Admission {
    pub(super) fn new() -> Self {
        Admission(Arc::new(watch::Sender::new(State::default())))
    }

    /// `peer` identified itself with our protocol version and engine.
    pub(super) fn identified(&self, peer: PeerId) {
        self.0.send_if_modified(|s| !s.refused.contains_key(&peer) && s.identified.insert(peer));
    }

    /// Refuse `peer` from now on, for `reason`.
    pub(super) fn refuse(&self, peer: PeerId, reason: String) {
        self.0.send_modify(|s| {
            s.identified.remove(&peer);
            s.refused.insert(peer, reason);
        });
    }

    /// `peer` has no connection left: it must identify itself again.
    pub(super) fn disconnected(&self, peer: &PeerId) {
        self.0.send_if_modified(|s| s.identified.remove(peer));
    }

    /// `peer` left the allowlist: if it is allowed again it starts afresh.
    pub(super) fn forget(&self, peer: &PeerId) {
        self.0.send_if_modified(|s| s.refused.remove(peer).is_some());
    }

    /// Why `peer` is refused, if it is.
    pub(super) fn refusal(&self, peer: &PeerId) -> Option<String> {
        self.0.borrow().refused.get(peer).cloned()
    }

    /// Every refused peer with its reason.
    pub(super) fn refused(&self) -> Vec<(PeerId, String)> {
        let mut all: Vec<(PeerId, String)> = self.0.borrow().refused.iter().map(|(p, r)| (*p, r.clone())).collect();
        all.sort();
        all
    }

    /// Waits until `peer` is identified (then `Ok`) or refused, at most
    /// `within`. Identify takes one round trip after the connection is up,
    /// so a peer that says nothing that long is not a synod node.
    pub(super) async fn admitted(&self, peer: PeerId, within: Duration) -> Result<(), P2pError> {
        let mut state = self.0.subscribe();
        let verdict = tokio::time::timeout(within, async {
            // Decided inside the closure: the borrow must not outlive it.
            let mut verdict = None;
            let _ = state
                .wait_for(|s| {
                    verdict = match s.refused.get(&peer) {
                        Some(reason) => Some(Err(reason.clone())),
                        None if s.identified.contains(&peer) => Some(Ok(())),
                        None => None,
                    };
                    verdict.is_some()
                })
                .await;
            verdict
        })
        .await;
        match verdict {
            Ok(Some(Ok(()))) => Ok(()),
            Ok(Some(Err(reason))) => Err(P2pError::Refused { peer, reason }),
            // The sender lives as long as `self`; this cannot happen.
            Ok(None) => Err(P2pError::Stopped),
            Err(_) => {
                Err(P2pError::Request { peer, reason: format!("the peer did not identify itself within {within:?}") })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[tokio::test]
    async fn a_peer_is_admitted_once_identified_and_refused_until_forgotten() {
        let a = Admission::new();
        let p = peer();
        let wait = tokio::spawn({
            let a = a.clone();
            async move { a.admitted(p, Duration::from_secs(5)).await }
        });
        a.identified(p);
        assert!(wait.await.unwrap().is_ok());

        a.disconnected(&p);
        let err = a.admitted(p, Duration::from_millis(50)).await.unwrap_err();
        assert!(err.to_string().contains("did not identify itself"), "{err}");

        a.refuse(p, "engine abc, ours def".into());
        a.identified(p);
        let err = a.admitted(p, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(&err, P2pError::Refused { reason, .. } if reason == "engine abc, ours def"), "{err:?}");
        assert_eq!(a.refused(), vec![(p, "engine abc, ours def".to_owned())]);

        a.forget(&p);
        assert_eq!(a.refusal(&p), None);
        a.identified(p);
        assert!(a.admitted(p, Duration::from_secs(5)).await.is_ok());
    }
}
