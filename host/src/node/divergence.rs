//! Divergence bisection: where did two nodes' states part?
//!
//! Every node keeps the running digest after each of its last
//! [`crate::replica::HISTORY`] operations and a summary of what each of its
//! last [`crate::replica::trail::EFFECTS_KEEP`] operations did. Digests
//! chain, so once two nodes differ they differ at every later index: the
//! first divergent index is found by searching the common window of
//! indices, asking the peer for its digests at a few evenly spaced indices
//! per round trip. The report shows that operation and each node's effects
//! for it.

use serde_json::{Value, json};

use super::NodeInner;
use super::auth::Principal;
use super::service::ServiceError;
use crate::consensus::NodeId;
use crate::consensus::rpc::{DigestSample, RaftReply, RaftRpc};
use crate::replica::auth::Access;

/// Indices asked per round trip of the search: a window of 100,000
/// operations takes four.
const PROBES: usize = 32;

/// How one peer compares with this node.
enum Comparison {
    /// Same digest at the last common index.
    Agree { upto: u64 },
    /// They part at `index`: same digest before it, different after.
    Diverged { index: u64 },
    /// Different already at the first common index: the first divergent
    /// operation is at or before it, older than either history.
    DivergedBefore { index: u64 },
    /// No index both remember (one just installed a snapshot).
    NoCommonHistory,
    /// The peer did not answer.
    Unreachable(String),
}

impl NodeInner {
    /// This node's digests at `indices`, and the span it remembers.
    pub(super) fn digest_sample(&self, indices: &[u64]) -> DigestSample {
        self.with_replica(|r| DigestSample {
            bounds: r.history_bounds(),
            digests: indices.iter().map(|i| r.digest_at(*i).map(|d| d.0)).collect(),
        })
        .unwrap_or(DigestSample { bounds: None, digests: Vec::new() })
    }

    /// Find where each member's state parted from this node's, and what the
    /// first divergent operation did on each side (`GET /v1/divergence`).
    pub async fn divergence(&self, who: &Principal) -> Result<Value, ServiceError> {
        who.require(Access::Read)?;
        let alarm = self.shared.divergence.load(std::sync::atomic::Ordering::Relaxed);
        let peers: Vec<NodeId> = self.members().into_keys().filter(|id| *id != self.id).collect();
        let mut report = Vec::new();
        let mut first: Option<u64> = None;
        let mut before: Option<u64> = None;
        for &peer in &peers {
            let comparison = self.compare_with(peer).await;
            let entry = match &comparison {
                Comparison::Agree { upto } => json!({ "node": peer, "status": "agree", "compared_upto": upto }),
                Comparison::Diverged { index } => {
                    first = Some(first.map_or(*index, |f| f.min(*index)));
                    json!({ "node": peer, "status": "diverged", "first_divergent_index": index })
                }
                Comparison::DivergedBefore { index } => {
                    before = Some(before.map_or(*index, |b| b.min(*index)));
                    json!({ "node": peer, "status": "diverged_before_history", "at_or_before": index })
                }
                Comparison::NoCommonHistory => json!({ "node": peer, "status": "no_common_history" }),
                Comparison::Unreachable(e) => json!({ "node": peer, "status": "unreachable", "error": e }),
            };
            report.push(entry);
        }
        let mut out = json!({
            "node": self.id,
            "alarm": alarm,
            "history": self.with_replica(|r| r.history_bounds()).flatten().map(|(from, to)| json!({ "from": from, "to": to })),
            "peers": report,
            "first_divergent_index": first,
        });
        if let Some(index) = first {
            let mut effects = serde_json::Map::new();
            let ours = self.with_replica(|r| r.effects_at(index)).unwrap_or_default();
            if let Some(op) = ours.first() {
                out["operation"] = json!({
                    "index": index, "plugin": op.plugin, "command": op.command, "caller": op.caller,
                    "timestamp_ms": op.timestamp_ms, "payload_blake3": hex::encode(op.payload_blake3),
                    "payload_bytes": op.payload_bytes,
                });
            }
            effects.insert(self.id.to_string(), ours.iter().map(|e| e.to_json()).collect());
            for &peer in &peers {
                let theirs = match self.ask(peer, &RaftRpc::Effects(index)).await {
                    Ok(RaftReply::Effects(e)) => e.iter().map(|e| e.to_json()).collect(),
                    Ok(_) | Err(_) => Value::Null,
                };
                effects.insert(peer.to_string(), theirs);
            }
            out["effects"] = Value::Object(effects);
        } else if let Some(index) = before {
            out["diverged_at_or_before"] = json!(index);
        }
        Ok(out)
    }

    /// Bisect the common digest history with `peer`.
    async fn compare_with(&self, peer: NodeId) -> Comparison {
        let theirs = match self.sample(peer, Vec::new()).await {
            Ok(s) => s,
            Err(e) => return Comparison::Unreachable(e),
        };
        let (Some(ours), Some(theirs)) = (self.with_replica(|r| r.history_bounds()).flatten(), theirs.bounds) else {
            return Comparison::NoCommonHistory;
        };
        let (lo, hi) = (ours.0.max(theirs.0), ours.1.min(theirs.1));
        if lo > hi {
            return Comparison::NoCommonHistory;
        }
        // The operation indices both applied in [lo, hi] (they skip values:
        // each log entry owns a block of them).
        let indices = self.with_replica(|r| r.history_indices(lo, hi)).unwrap_or_default();
        let (Some(&low), Some(&high)) = (indices.first(), indices.last()) else {
            return Comparison::NoCommonHistory;
        };
        let ends = match self.differs(peer, &[low, high]).await {
            Ok(d) => d,
            Err(e) => return Comparison::Unreachable(e),
        };
        match ends[..] {
            [_, false] => return Comparison::Agree { upto: high },
            [true, true] => return Comparison::DivergedBefore { index: low },
            _ => {}
        }
        // Invariant: same at indices[l], different at indices[r].
        let (mut l, mut r) = (0, indices.len() - 1);
        while r - l > 1 {
            // Strictly increasing: the step is at least one.
            let step = ((r - l) as f64 / (PROBES + 1) as f64).max(1.0);
            let probes: Vec<usize> =
                (1..=PROBES).map(|k| l + (k as f64 * step) as usize).filter(|p| *p > l && *p < r).collect();
            let asked: Vec<u64> = probes.iter().map(|p| indices[*p]).collect();
            let differs = match self.differs(peer, &asked).await {
                Ok(d) => d,
                Err(e) => return Comparison::Unreachable(e),
            };
            match differs.iter().position(|d| *d) {
                Some(k) => {
                    r = probes[k];
                    if k > 0 {
                        l = probes[k - 1];
                    }
                }
                None => {
                    if let Some(last) = probes.last() {
                        l = *last;
                    }
                }
            }
        }
        Comparison::Diverged { index: indices[r] }
    }

    /// Whether `peer`'s digest differs from ours at each of `indices`.
    async fn differs(&self, peer: NodeId, indices: &[u64]) -> Result<Vec<bool>, String> {
        let theirs = self.sample(peer, indices.to_vec()).await?;
        let ours = self.digest_sample(indices);
        if theirs.digests.len() != indices.len() {
            return Err(format!("node {peer} answered {} digests for {} indices", theirs.digests.len(), indices.len()));
        }
        indices
            .iter()
            .zip(ours.digests.iter().zip(&theirs.digests))
            .map(|(index, pair)| match pair {
                (Some(a), Some(b)) => Ok(a != b),
                _ => Err(format!("operation {index} is no longer in both histories; retry")),
            })
            .collect()
    }

    async fn sample(&self, peer: NodeId, indices: Vec<u64>) -> Result<DigestSample, String> {
        let rpc = RaftRpc::Digests(indices);
        match tokio::time::timeout(std::time::Duration::from_secs(5), self.ask(peer, &rpc)).await {
            Ok(Ok(RaftReply::Digests(sample))) => Ok(sample),
            Ok(Ok(RaftReply::Refused(why))) => Err(format!("node {peer} refused: {why}")),
            Ok(Ok(_)) => Err(format!("node {peer} answered something else")),
            Ok(Err(e)) => Err(format!("node {peer}: {e}")),
            Err(_) => Err(format!("node {peer} did not answer within 5 s")),
        }
    }
}
