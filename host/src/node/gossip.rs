//! What members gossip about: device telemetry and state digests.
//!
//! In: readings from this node's drivers ([`Telemetry::share`]), and
//! messages from other members on the gossip topics of [`crate::p2p`]. Out:
//! this node's readings published on `synod/telemetry/1` — batched: every
//! [`TELEMETRY_FLUSH`] one message (or a few, each under
//! [`TELEMETRY_BATCH_BYTES`]) carries the latest reading of every (device,
//! metric) that changed, so a thousand devices cost a handful of messages a
//! second, not a thousand — the latest
//! reading per (device, metric) from every member in [`Telemetry`] (served
//! by `GET /v1/devices/{id}/telemetry`), and digest notices
//! ([`DigestNotice`]) for the divergence check in [`super`].
//!
//! Gossip is signed by the author's node key; a message also names a node
//! id, and is believed only when that id is bound to the signing key in the
//! current membership, so one member cannot speak for another.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::NodeInner;
use crate::consensus::NodeId;
use crate::p2p::{Gossip, GossipTopic, P2p};

/// Most (device, metric) readings a node keeps; past it, the one updated
/// longest ago goes.
pub const MAX_TELEMETRY_ENTRIES: usize = 100_000;

/// The latest value of one metric of one device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({ "v": 21.4, "ts_ms": 1795700000000_u64, "node": 2, "epoch": 3 }))]
pub struct Reading {
    /// The value.
    pub v: f64,
    /// When the driver read it (Unix ms, the owner's clock).
    pub ts_ms: u64,
    /// The node whose driver read it.
    pub node: NodeId,
    /// The owner epoch it was read at.
    pub epoch: u64,
}

impl Reading {
    /// Whether this reading is older than `held` (by time, then epoch).
    fn older_than(&self, held: &Reading) -> bool {
        (self.ts_ms, self.epoch) < (held.ts_ms, held.epoch)
    }
}

/// How often a node gossips the readings its drivers took.
pub const TELEMETRY_FLUSH: std::time::Duration = std::time::Duration::from_millis(250);

/// Largest telemetry message, bytes of JSON (under the gossip cap).
pub const TELEMETRY_BATCH_BYTES: usize = 48 * 1024;

/// One reading on `synod/telemetry/1`; a message is a JSON array of them:
/// `[{"device", "metric", "v", "ts_ms", "node", "epoch"}, …]`.
#[derive(Debug, Serialize, Deserialize)]
struct TelemetryMessage {
    device: String,
    metric: String,
    #[serde(flatten)]
    reading: Reading,
}

/// The latest reading of each (device, metric), from this node's drivers
/// and from every member's gossip. Bounded by [`MAX_TELEMETRY_ENTRIES`].
#[derive(Debug)]
pub struct Telemetry {
    /// Readings and their update order.
    inner: Mutex<Latest>,
    /// This node's readings not yet gossiped, latest per (device, metric).
    outgoing: Mutex<BTreeMap<(String, String), Reading>>,
    /// Entries kept at most.
    capacity: usize,
}

#[derive(Debug, Default)]
struct Latest {
    /// By device, then metric, so one device's metrics are one range.
    /// The number is the entry's place in `order`.
    readings: BTreeMap<(String, String), (Reading, u64)>,
    /// Keys by when they were last updated, oldest first.
    order: BTreeMap<u64, (String, String)>,
    /// The next update's place in `order`.
    next: u64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::with_capacity(MAX_TELEMETRY_ENTRIES)
    }
}

impl Telemetry {
    /// An empty cache that keeps at most `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { inner: Mutex::default(), outgoing: Mutex::default(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, Latest> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `reading` as the latest of `device`'s `metric`, unless the one
    /// held is newer. Returns whether it was kept.
    pub fn record(&self, device: &str, metric: &str, reading: Reading) -> bool {
        let mut latest = self.lock();
        let Latest { readings, order, next } = &mut *latest;
        let key = (device.to_owned(), metric.to_owned());
        if let Some((held, place)) = readings.get(&key) {
            if reading.older_than(held) {
                return false;
            }
            order.remove(place);
        }
        let place = *next;
        *next += 1;
        order.insert(place, key.clone());
        readings.insert(key, (reading, place));
        while readings.len() > self.capacity {
            let Some((_, oldest)) = order.pop_first() else { break };
            readings.remove(&oldest);
        }
        true
    }

    /// The latest reading of each metric of `device`, by metric name.
    pub fn device(&self, device: &str) -> BTreeMap<String, Reading> {
        let latest = self.lock();
        let from = (device.to_owned(), String::new());
        latest
            .readings
            .range(from..)
            .take_while(|((d, _), _)| d == device)
            .map(|((_, metric), (reading, _))| (metric.clone(), *reading))
            .collect()
    }

    /// How many (device, metric) entries are held.
    pub fn len(&self) -> usize {
        self.lock().readings.len()
    }

    /// Whether no reading is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a reading of this node's own driver and gossips it to the
    /// other members. Never waits: gossip that cannot be queued is dropped
    /// (the next reading replaces it anyway).
    pub fn share(&self, device: &str, metric: &str, reading: Reading) {
        self.record(device, metric, reading);
        let mut out = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        if out.len() < self.capacity {
            out.insert((device.to_owned(), metric.to_owned()), reading);
        }
    }

    /// Gossip what [`Telemetry::share`] collected since the last flush.
    pub fn flush(&self, p2p: &P2p) {
        let out = std::mem::take(&mut *self.outgoing.lock().unwrap_or_else(|e| e.into_inner()));
        for batch in batches(out, TELEMETRY_BATCH_BYTES) {
            if let Err(e) = p2p.publish(GossipTopic::Telemetry, batch) {
                tracing::debug!(error = %e, "telemetry not gossiped");
            }
        }
    }
}

/// Readings as JSON arrays of at most `limit` bytes each (a single reading
/// is far smaller than any sensible limit).
fn batches(readings: BTreeMap<(String, String), Reading>, limit: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut batch: Vec<u8> = Vec::new();
    for ((device, metric), reading) in readings {
        let Ok(item) = serde_json::to_vec(&TelemetryMessage { device, metric, reading }) else { continue };
        if !batch.is_empty() && batch.len() + item.len() + 2 > limit {
            batch.push(b']');
            out.push(std::mem::take(&mut batch));
        }
        batch.push(if batch.is_empty() { b'[' } else { b',' });
        batch.extend_from_slice(&item);
    }
    if !batch.is_empty() {
        batch.push(b']');
        out.push(batch);
    }
    out
}

/// Keeps [`NodeInner::telemetry`] up to date with other members' readings,
/// until the transport stops.
pub async fn telemetry(node: Arc<NodeInner>) {
    let mut inbox = node.p2p.subscribe(GossipTopic::Telemetry);
    let mut flush = tokio::time::interval(TELEMETRY_FLUSH);
    loop {
        let received = tokio::select! {
            r = inbox.recv() => r,
            _ = flush.tick() => {
                node.telemetry.flush(&node.p2p);
                continue;
            }
        };
        let gossip = match received {
            Ok(gossip) => gossip,
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "telemetry gossip came faster than it was recorded; skipped some");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let messages: Vec<TelemetryMessage> = match serde_json::from_slice(&gossip.data) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(from = %gossip.from, error = %e, "undecodable telemetry gossip");
                continue;
            }
        };
        for message in messages {
            if speaks_for(&node, &gossip, message.reading.node) {
                node.telemetry.record(&message.device, &message.metric, message.reading);
            }
        }
    }
}

/// A node's digest after an applied operation, on `synod/digest/1` as
/// JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestNotice {
    /// The node it is about.
    pub node: NodeId,
    /// The last operation it had applied.
    pub digest_index: u64,
    /// Its digest right after that operation, hex.
    pub digest: String,
    /// When it was sent (Unix ms): gossip drops a message identical to
    /// one seen in the last minute, and an idle node's digest repeats.
    pub sent_ms: u64,
    /// Changes to its state since the last snapshot it finished (0 from a
    /// node that does not say): the leader holds writes while too many
    /// members are past their most.
    #[serde(default)]
    pub unsnapshotted_changes: u64,
    /// The most it lets stand (`raft.max_unsnapshotted_changes` or its
    /// default; 0: no limit).
    #[serde(default)]
    pub unsnapshotted_max: u64,
}

impl DigestNotice {
    /// This node's notice for its current digest, if the state is readable.
    pub fn ours(node: &NodeInner) -> Option<DigestNotice> {
        let (digest_index, digest) = node.with_replica(|r| (r.last_applied(), r.digest().to_hex()))?;
        let (unsnapshotted_changes, unsnapshotted_max) = node.shared.unsnapshotted();
        Some(DigestNotice {
            node: node.id,
            digest_index,
            digest,
            sent_ms: super::now_ms(),
            unsnapshotted_changes,
            unsnapshotted_max,
        })
    }

    /// Gossips this notice; a notice that cannot be queued is dropped (the
    /// next one follows in a second).
    pub fn publish(&self, p2p: &P2p) {
        match serde_json::to_vec(self) {
            Ok(bytes) => {
                if let Err(e) = p2p.publish(GossipTopic::Digest, bytes) {
                    tracing::debug!(error = %e, "digest not gossiped");
                }
            }
            Err(e) => tracing::debug!(error = %e, "digest not encoded"),
        }
    }

    /// The notice in `gossip`, if it decodes and its signer is the key of
    /// the node it names.
    pub fn received(node: &NodeInner, gossip: &Gossip) -> Option<DigestNotice> {
        let notice: DigestNotice = match serde_json::from_slice(&gossip.data) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(from = %gossip.from, error = %e, "undecodable digest gossip");
                return None;
            }
        };
        speaks_for(node, gossip, notice.node).then_some(notice)
    }
}

/// Whether `gossip`'s signer is the key bound to node `claimed` in the
/// current membership; warns when it is not.
fn speaks_for(node: &NodeInner, gossip: &Gossip, claimed: NodeId) -> bool {
    if node.peer_of(claimed) == Some(gossip.from) {
        return true;
    }
    tracing::warn!(
        from = %gossip.from, claimed,
        "ignored gossip claiming a node id that is not bound to the key that signed it"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(v: f64, ts_ms: u64, epoch: u64) -> Reading {
        Reading { v, ts_ms, node: 1, epoch }
    }

    #[test]
    fn an_older_reading_does_not_replace_a_newer_one() {
        let t = Telemetry::default();
        assert!(t.record("room-1", "temperature", reading(20.0, 1000, 3)));
        assert!(!t.record("room-1", "temperature", reading(19.0, 999, 9)), "older by time");
        assert!(!t.record("room-1", "temperature", reading(19.0, 1000, 2)), "same time, older epoch");
        assert_eq!(t.device("room-1")["temperature"], reading(20.0, 1000, 3));
        assert!(t.record("room-1", "temperature", reading(21.0, 1000, 4)), "same time, newer epoch");
        assert!(t.record("room-1", "temperature", reading(22.0, 1001, 1)), "newer time, older epoch");
        assert_eq!(t.device("room-1")["temperature"], reading(22.0, 1001, 1));
    }

    #[test]
    fn a_device_shows_its_own_metrics_only() {
        let t = Telemetry::default();
        t.record("room-1", "temperature", reading(20.0, 1, 1));
        t.record("room-1", "humidity", reading(40.0, 1, 1));
        t.record("room-10", "temperature", reading(30.0, 1, 1));
        t.record("room-", "temperature", reading(10.0, 1, 1));
        let metrics = t.device("room-1");
        assert_eq!(metrics.keys().collect::<Vec<_>>(), ["humidity", "temperature"]);
        assert_eq!(metrics["temperature"].v, 20.0);
        assert!(t.device("room-2").is_empty());
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn past_capacity_the_least_recently_updated_entry_goes() {
        let t = Telemetry::with_capacity(3);
        t.record("a", "m", reading(1.0, 1, 1));
        t.record("b", "m", reading(1.0, 1, 1));
        t.record("c", "m", reading(1.0, 1, 1));
        // `a` is updated, so `b` is now the oldest.
        t.record("a", "m", reading(2.0, 2, 1));
        t.record("d", "m", reading(1.0, 1, 1));
        assert_eq!(t.len(), 3);
        assert!(t.device("b").is_empty());
        assert_eq!(t.device("a")["m"].v, 2.0);
        assert!(!t.device("c").is_empty() && !t.device("d").is_empty());
        // A refused (older) reading does not count as an update.
        assert!(!t.record("c", "m", reading(0.0, 0, 0)));
        t.record("e", "m", reading(1.0, 1, 1));
        assert!(t.device("c").is_empty());
    }

    #[test]
    fn telemetry_and_digest_messages_have_the_documented_json() {
        let message = TelemetryMessage {
            device: "room-1".into(),
            metric: "temperature".into(),
            reading: Reading { v: 21.5, ts_ms: 1700, node: 2, epoch: 7 },
        };
        let json = serde_json::to_value(&message).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"device": "room-1", "metric": "temperature", "v": 21.5, "ts_ms": 1700, "node": 2, "epoch": 7})
        );
        let back: TelemetryMessage = serde_json::from_value(json).unwrap();
        assert_eq!(back.reading, message.reading);

        let many: BTreeMap<(String, String), Reading> = (0..1000)
            .map(|i| {
                ((format!("room-{i}"), "temperature".to_owned()), Reading { v: 20.0, ts_ms: i, node: 1, epoch: 1 })
            })
            .collect();
        let out = batches(many, 4096);
        assert!(out.len() > 10 && out.iter().all(|b| b.len() <= 4096), "{} batches", out.len());
        let decoded: usize =
            out.iter().map(|b| serde_json::from_slice::<Vec<TelemetryMessage>>(b).unwrap().len()).sum();
        assert_eq!(decoded, 1000, "every reading in exactly one batch");
        assert!(batches(BTreeMap::new(), 4096).is_empty());

        let notice = DigestNotice {
            node: 3,
            digest_index: 42,
            digest: "ab".into(),
            sent_ms: 5,
            unsnapshotted_changes: 7,
            unsnapshotted_max: 262_144,
        };
        let json = serde_json::to_value(&notice).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"node": 3, "digest_index": 42, "digest": "ab", "sent_ms": 5,
                "unsnapshotted_changes": 7, "unsnapshotted_max": 262_144})
        );
        // From a node that does not tell its backlog: none.
        let old: DigestNotice =
            serde_json::from_value(serde_json::json!({"node": 3, "digest_index": 42, "digest": "ab", "sent_ms": 5}))
                .unwrap();
        assert_eq!((old.unsnapshotted_changes, old.unsnapshotted_max), (0, 0));
    }
}
