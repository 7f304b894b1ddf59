//! Faults the fault battery injects into a running node: a network cut to
//! named members, a jump of the node's clock, one perturbed write (a
//! divergence on purpose), one lost answer from the leader, and held
//! appends (a follower that takes heartbeats but no entries, like a slow
//! disk), held log syncs (a disk whose flushes do not return), slow log
//! syncs (a disk whose every flush takes a while) and held snapshot builds
//! (a node whose snapshots fall behind its writes).
//!
//! The state lives here in every build, so the code paths that consult it
//! are the ones production runs; only the way to set it — `POST
//! /v1/faults` — is compiled in with the `faults` cargo feature, which the
//! test suite enables and release builds do not. Without it every fault
//! stays off: no cut, a zero offset, no perturbation.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::consensus::NodeId;

/// Added to the wall clock this node stamps entries with (milliseconds).
static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Perturb the next command's writes as it is applied on this node.
static PERTURB_NEXT_WRITE: AtomicBool = AtomicBool::new(false);

/// Drop the answer to the next write this node forwards to the leader, as
/// a connection lost after the leader took it would.
static LOSE_NEXT_ANSWER: AtomicBool = AtomicBool::new(false);

/// Hold every incoming append that carries entries until this is cleared
/// (heartbeats pass).
static HOLD_APPENDS: AtomicBool = AtomicBool::new(false);

/// Hold this node's Raft log syncs (its `fdatasync` after each append)
/// until this is cleared: written entries are not durable yet.
static HOLD_LOG_SYNC: AtomicBool = AtomicBool::new(false);

/// Hold this node's snapshot builds, before they capture the state, until
/// this is cleared.
static HOLD_SNAPSHOT_BUILDS: AtomicBool = AtomicBool::new(false);

/// Milliseconds added to each of this node's Raft log syncs (0: none).
static SLOW_LOG_SYNC_MS: AtomicU64 = AtomicU64::new(0);

/// The longest one append is held, so a forgotten hold cannot wedge a test.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

/// Members this node neither connects to nor accepts connections from.
static CUT: Mutex<BTreeSet<NodeId>> = Mutex::new(BTreeSet::new());

/// What `POST /v1/faults` sets; absent fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "cut": [3], "clock_offset_ms": -5000 }))]
pub struct FaultSettings {
    /// Members to cut this node off from (both ways: their connections are
    /// closed and refused). `[]` heals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<BTreeSet<NodeId>>,
    /// Shift of the wall clock, in milliseconds (negative: back in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
    /// Perturb the writes of the next command this node applies (one value
    /// changed), so its digest departs from the others'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perturb_next_write: Option<bool>,
    /// Lose the leader's answer to the next write this node forwards (the
    /// leader has acted on it), as a connection cut at that moment would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lose_next_answer: Option<bool>,
    /// Hold the appends this node receives that carry entries (heartbeats
    /// pass) until set back to false, or 30 s: a follower whose log falls
    /// behind while it still answers its leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_appends: Option<bool>,
    /// Hold this node's Raft log syncs (a disk whose flushes hang): its
    /// appended entries are written but not flushed until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_log_sync: Option<bool>,
    /// Make each of this node's Raft log syncs take this many milliseconds
    /// longer (a slow disk; at most 10,000); 0 restores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_log_sync_ms: Option<u64>,
    /// Hold this node's snapshot builds before they capture the state, until
    /// set back to false or 30 s (a node whose snapshots fall behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_snapshot_builds: Option<bool>,
}

/// The faults in force.
pub fn current() -> FaultSettings {
    FaultSettings {
        cut: Some(cut()),
        clock_offset_ms: Some(clock_offset_ms()),
        perturb_next_write: Some(PERTURB_NEXT_WRITE.load(Ordering::Relaxed)),
        lose_next_answer: Some(LOSE_NEXT_ANSWER.load(Ordering::Relaxed)),
        hold_appends: Some(HOLD_APPENDS.load(Ordering::Relaxed)),
        hold_log_sync: Some(HOLD_LOG_SYNC.load(Ordering::Relaxed)),
        slow_log_sync_ms: Some(SLOW_LOG_SYNC_MS.load(Ordering::Relaxed)),
        hold_snapshot_builds: Some(HOLD_SNAPSHOT_BUILDS.load(Ordering::Relaxed)),
    }
}

/// Put `settings` in force (absent fields unchanged).
pub fn set(settings: &FaultSettings) {
    if let Some(offset) = settings.clock_offset_ms {
        CLOCK_OFFSET_MS.store(offset, Ordering::Relaxed);
    }
    if let Some(perturb) = settings.perturb_next_write {
        PERTURB_NEXT_WRITE.store(perturb, Ordering::Relaxed);
    }
    if let Some(lose) = settings.lose_next_answer {
        LOSE_NEXT_ANSWER.store(lose, Ordering::Relaxed);
    }
    if let Some(hold) = settings.hold_appends {
        HOLD_APPENDS.store(hold, Ordering::Relaxed);
    }
    if let Some(hold) = settings.hold_log_sync {
        HOLD_LOG_SYNC.store(hold, Ordering::Relaxed);
    }
    if let Some(ms) = settings.slow_log_sync_ms {
        SLOW_LOG_SYNC_MS.store(ms.min(10_000), Ordering::Relaxed);
    }
    if let Some(hold) = settings.hold_snapshot_builds {
        HOLD_SNAPSHOT_BUILDS.store(hold, Ordering::Relaxed);
    }
    if let Some(wanted) = &settings.cut {
        *CUT.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
    }
}

/// The clock shift in force (0 unless a fault set one).
pub fn clock_offset_ms() -> i64 {
    CLOCK_OFFSET_MS.load(Ordering::Relaxed)
}

/// Whether the next applied command's writes are to be perturbed; true at
/// most once per setting.
pub fn take_perturbation() -> bool {
    PERTURB_NEXT_WRITE.load(Ordering::Relaxed) && PERTURB_NEXT_WRITE.swap(false, Ordering::Relaxed)
}

/// Whether to lose the answer to this forwarded write; true at most once per
/// setting.
pub fn take_lost_answer() -> bool {
    LOSE_NEXT_ANSWER.load(Ordering::Relaxed) && LOSE_NEXT_ANSWER.swap(false, Ordering::Relaxed)
}

/// Wait while appends are held (returns at once when they are not).
pub async fn hold_append() {
    let deadline = tokio::time::Instant::now() + MAX_HOLD;
    while HOLD_APPENDS.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Wait while snapshot builds are held, at most [`MAX_HOLD`] (returns at
/// once when they are not).
pub async fn hold_snapshot_build() {
    let deadline = tokio::time::Instant::now() + MAX_HOLD;
    while HOLD_SNAPSHOT_BUILDS.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Block the calling thread (the log's sync thread) while log syncs are
/// held, at most [`MAX_HOLD`], then for the slow-sync delay, if any.
pub fn hold_log_sync() {
    let deadline = std::time::Instant::now() + MAX_HOLD;
    while HOLD_LOG_SYNC.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let slow = SLOW_LOG_SYNC_MS.load(Ordering::Relaxed);
    if slow > 0 {
        std::thread::sleep(std::time::Duration::from_millis(slow));
    }
}

/// The members this node is cut off from.
pub fn cut() -> BTreeSet<NodeId> {
    CUT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
