//! A follower that fell behind the leader's purged log catches up by
//! installing the leader's snapshot, onto its lossy disk. The snapshot is
//! received into a file unlinked at once, and on a filesystem that cannot
//! `fstat` such a file (FUSE without a path for it, as `lossyfs.py`) the
//! install asked for its length that way and failed: the node stopped.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::battery::Rig;
use crate::harness::{log_path, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_installs_a_snapshot() {
    let _serial = serial().await;
    let mut rig = Rig::start().await;
    let leader = rig.c.leader().await;
    let behind = rig.c.nodes.keys().copied().find(|n| *n != leader).unwrap();
    rig.c.kill(behind);
    // Past two snapshots (every 400 entries here) and the 1,000 entries
    // kept behind them: the follower's next entry is purged. One writer,
    // so each write is an entry of its own.
    let client = rig.client(leader);
    let applied =
        |v: serde_json::Value| v["last_applied"].as_u64().unwrap_or(0) / synod::consensus::types::OPS_PER_ENTRY;
    let mut written = 0;
    while applied(client.get("/v1/digest").await.unwrap()) < 2_000 {
        assert!(written < 5_000, "2,000 entries not reached in {written} writes");
        let body = json!({ "key": format!("k{}", written % 50), "value": written });
        client.post("/v1/commands/register/put", serde_json::to_vec(&body).unwrap()).await.unwrap();
        written += 1;
    }
    let target = applied(client.get("/v1/digest").await.unwrap());
    rig.c.restart(behind);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rig.client(behind).get("/v1/digest").await.map(applied).unwrap_or(0) < target {
        assert!(Instant::now() < deadline, "node {behind} did not catch up to entry {target}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (index, _) = rig.c.same_digest().await;
    let log = std::fs::read_to_string(log_path(&rig.c.nodes[&behind].config_path)).unwrap();
    assert!(
        log.contains("snapshot installed from the leader"),
        "node {behind} caught up to {index} without a snapshot"
    );
    assert!(!log.contains("stopping"), "node {behind} stopped:\n{log}");
}
