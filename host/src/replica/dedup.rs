//! The replicated request-id table: at most once per identified request.
//!
//! In: applied commands that carry a client request id, with the entry's
//! timestamp. Out: for a retry, the first application's result; for an id
//! reused with another payload, a refusal. Entries are keyed by (caller,
//! plugin, command, id) — one client's id never answers another's request —
//! and carry a hash of the payload. They are kept for `dedup_ttl_ms` of log
//! time (the leader's timestamps, never this node's clock, so every node
//! evicts the same entries at the same index) *and* for the next
//! [`MIN_KEPT_OPS`] operations (so a leader's skewed clock cannot make them
//! forgotten at once), and at most `dedup_max_bytes`
//! in total, oldest first — both [`ClusterSettings`], replicated through the
//! log so that every node uses the same values (default 10 minutes and
//! 64 MiB; `limits.dedup_ttl_secs` and `limits.dedup_max_bytes` in the
//! leader's config).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use crate::consensus::types::ClusterSettings;
use crate::runtime::CommandError;

/// Whatever the clocks say, an identified request is remembered until at
/// least this many operations follow it (unless the byte cap forces it
/// out): about ten seconds at the highest write rate measured here, and
/// far longer at a plant's usual rates.
pub const MIN_KEPT_OPS: u64 = 100_000;

/// Bookkeeping counted per entry on top of its key and result.
const ENTRY_OVERHEAD: usize = 96;

/// The first result of an identified request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Operation index where it was applied.
    pub index: u64,
    /// What it returned.
    pub result: Result<Vec<u8>, CommandError>,
    /// blake3 of the payload, to tell a retry from a reuse of the id.
    pub payload_hash: [u8; 32],
    /// Log time (ms) of the first application.
    pub at_ms: u64,
}

impl Remembered {
    fn bytes(&self, key: &str) -> usize {
        let result = match &self.result {
            Ok(out) => out.len(),
            Err(e) => e.to_string().len(),
        };
        key.len() + result + ENTRY_OVERHEAD
    }
}

/// What the table says about an identified request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Not seen (or forgotten): apply it.
    New,
    /// The same request again: answer with the first result.
    Retry(&'a Remembered),
    /// The same id with another payload: refuse.
    Reused,
}

/// The key an identified request is remembered under.
pub fn key(caller: &str, plugin: &str, command: &str, id: &str) -> String {
    // NUL cannot occur in any of the parts (names and ids are checked).
    format!("{caller}\0{plugin}\0{command}\0{id}")
}

/// blake3 of a payload, as remembered.
pub fn payload_hash(payload: &[u8]) -> [u8; 32] {
    *blake3::hash(payload).as_bytes()
}

/// The table itself.
#[derive(Debug, Clone, Default)]
pub struct Dedup {
    /// Remembered requests by key.
    entries: BTreeMap<String, Remembered>,
    /// The same keys in insertion order (log order), for eviction.
    order: VecDeque<String>,
    /// Bytes held, as counted by [`Remembered::bytes`].
    bytes: usize,
}

impl Dedup {
    /// What to do with a request under `key` whose payload hashes to `hash`.
    pub fn lookup(&self, key: &str, hash: &[u8; 32]) -> Lookup<'_> {
        match self.entries.get(key) {
            None => Lookup::New,
            Some(r) if &r.payload_hash == hash => Lookup::Retry(r),
            Some(_) => Lookup::Reused,
        }
    }

    /// Forget what is older than `ttl_ms` at log time `now_ms` *and* more
    /// than [`MIN_KEPT_OPS`] operations before `now_index`.
    ///
    /// Log time is the leaders' wall clocks: one leader whose clock runs
    /// 40 minutes ahead moves it 40 minutes at once, and by time alone
    /// every remembered id would be forgotten on the spot — a client
    /// retrying an unanswered request a moment later would have it applied
    /// twice (the fault battery found this with a skewed clock). The count
    /// does not depend on any clock, so a retry among the last
    /// [`MIN_KEPT_OPS`] operations is always recognised.
    pub fn expire(&mut self, now_ms: u64, now_index: u64, ttl_ms: u64) {
        while let Some(oldest) = self.order.front() {
            let expired = self.entries.get(oldest).is_none_or(|r| {
                r.at_ms.saturating_add(ttl_ms) < now_ms && r.index.saturating_add(MIN_KEPT_OPS) < now_index
            });
            if !expired {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Remember `key` (evicting the oldest past `max_bytes`).
    pub fn remember(&mut self, key: String, remembered: Remembered, max_bytes: u64) {
        let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        self.bytes += remembered.bytes(&key);
        if let Some(old) = self.entries.insert(key.clone(), remembered) {
            self.bytes = self.bytes.saturating_sub(old.bytes(&key));
        } else {
            self.order.push_back(key);
        }
        while self.bytes > max_bytes && self.order.len() > 1 {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(key) = self.order.pop_front()
            && let Some(r) = self.entries.remove(&key)
        {
            self.bytes = self.bytes.saturating_sub(r.bytes(&key));
        }
    }

    /// Number of remembered requests.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, oldest first (for a snapshot).
    pub fn image(&self) -> Vec<(String, Remembered)> {
        self.order.iter().filter_map(|k| self.entries.get(k).map(|r| (k.clone(), r.clone()))).collect()
    }

    /// Rebuild from [`Dedup::image`].
    pub fn from_image(image: Vec<(String, Remembered)>) -> Dedup {
        let mut dedup = Dedup::default();
        for (key, r) in image {
            dedup.remember(key, r, u64::MAX);
        }
        dedup
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 10 * 60 * 1000;
    const MAX: u64 = 64 * 1024 * 1024;

    fn r(at_ms: u64, payload: &[u8]) -> Remembered {
        Remembered { index: at_ms, result: Ok(b"{}".to_vec()), payload_hash: payload_hash(payload), at_ms }
    }

    #[test]
    fn retry_reuse_and_scope() {
        let mut d = Dedup::default();
        let k = key("alice", "counter", "increment", "order-1");
        d.remember(k.clone(), r(1, b"a"), MAX);
        assert!(matches!(d.lookup(&k, &payload_hash(b"a")), Lookup::Retry(_)));
        assert_eq!(d.lookup(&k, &payload_hash(b"b")), Lookup::Reused);
        // Another caller, plugin or command with the same id is a new request.
        assert_eq!(d.lookup(&key("bob", "counter", "increment", "order-1"), &payload_hash(b"a")), Lookup::New);
        assert_eq!(d.lookup(&key("alice", "counter", "reset", "order-1"), &payload_hash(b"a")), Lookup::New);
    }

    #[test]
    fn kept_for_the_ttl_not_a_count() {
        let mut d = Dedup::default();
        // Far more than the old 100,000-entry window, all within the TTL.
        for i in 0..150_000u64 {
            d.remember(key("c", "p", "x", &i.to_string()), r(i / 1000, b"x"), MAX);
        }
        d.expire(150, 150_000, TTL);
        assert_eq!(d.len(), 150_000);
        assert!(matches!(d.lookup(&key("c", "p", "x", "0"), &payload_hash(b"x")), Lookup::Retry(_)));
        // Past the TTL of the oldest and the count, they go, oldest first.
        d.expire(TTL + 50, 150_000 + MIN_KEPT_OPS, TTL);
        assert_eq!(d.lookup(&key("c", "p", "x", "0"), &payload_hash(b"x")), Lookup::New);
        assert!(matches!(d.lookup(&key("c", "p", "x", "149999"), &payload_hash(b"x")), Lookup::Retry(_)));
        let rebuilt = Dedup::from_image(d.image());
        assert_eq!(rebuilt.image(), d.image());
        assert_eq!(rebuilt.bytes, d.bytes);
    }

    /// A leader whose clock is 46 minutes ahead stamps the next entry 46
    /// minutes later. Before, that forgot every id at once and the retry of
    /// an unanswered increment was applied a second time.
    #[test]
    fn a_clock_jump_does_not_forget_recent_requests() {
        let mut d = Dedup::default();
        let k = key("c", "counter", "increment", "chaos-1-7");
        d.remember(k.clone(), Remembered { index: 5_000, ..r(1_000, b"{}") }, MAX);
        d.expire(1_000 + 46 * 60 * 1000, 5_003, TTL);
        assert!(matches!(d.lookup(&k, &payload_hash(b"{}")), Lookup::Retry(_)));
        // Once both the TTL and the count have passed, it goes.
        d.expire(1_000 + 46 * 60 * 1000, 5_001 + MIN_KEPT_OPS, TTL);
        assert_eq!(d.lookup(&k, &payload_hash(b"{}")), Lookup::New);
    }

    #[test]
    fn byte_cap_evicts_oldest() {
        let mut d = Dedup::default();
        let big = Remembered { result: Ok(vec![0; 1024 * 1024]), ..r(0, b"x") };
        for i in 0..70 {
            d.remember(key("c", "p", "x", &i.to_string()), big.clone(), MAX);
        }
        assert!(d.bytes as u64 <= MAX);
        assert_eq!(d.lookup(&key("c", "p", "x", "0"), &payload_hash(b"x")), Lookup::New);
        assert!(matches!(d.lookup(&key("c", "p", "x", "69"), &payload_hash(b"x")), Lookup::Retry(_)));
    }
}
