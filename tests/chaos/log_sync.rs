//! The leader replicates while its own append is being synced: a write
//! costs the larger of the leader's and a follower's sync, not their sum.
//! Shown with a leader whose disk does not finish a flush: its followers'
//! syncs alone make a quorum, so a write is acknowledged while the
//! leader's copy is still unsynced. Unpatched openraft 0.9 awaits the
//! leader's sync before it replicates, so the write waits out the hold.

use std::time::Duration;

use serde_json::json;

use crate::harness::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_commits_on_the_followers_syncs_while_the_leaders_sync_hangs() {
    let _serial = serial().await;
    let c = crate::register_cluster_led_by_node_1().await;

    crate::fault(&c, 1, json!({ "hold_log_sync": true })).await;
    let write = c.cmd(1, "register", "put", json!({ "key": "k", "value": 1 }));
    let reply = tokio::time::timeout(Duration::from_secs(10), write).await;
    // Release the hold before any assertion, so a failure leaves no node
    // stuck for the 30 s the hold lasts at most.
    crate::fault(&c, 1, json!({ "hold_log_sync": false })).await;
    let reply = reply.expect("the write waited for the leader's own sync (held): replication did not overlap it");
    reply.unwrap();

    // The followers hold the write; once the leader's sync completes it
    // goes on as before.
    for id in [2, 3] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = c.local_state(id, "register").await;
            if state["r/k"] == json!(1) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "node {id} did not apply the write: {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for value in 2..=20 {
        c.cmd(1, "register", "put", json!({ "key": "k", "value": value })).await.unwrap();
    }
    let reply = c
        .client(2)
        .post("/v1/queries/register/get", serde_json::to_vec(&json!({ "key": "k" })).unwrap())
        .await
        .unwrap();
    assert_eq!(reply["result"]["value"], json!(20));
    c.same_digest().await;
}

/// A follower whose disk takes longer than a heartbeat interval to sync is
/// slow, not gone: with the other follower down it still makes the quorum,
/// and the leader waits for its answers instead of timing them out and
/// sending the same entries again. Unpatched openraft 0.9 gives an
/// AppendEntries one heartbeat interval (50 ms here): every write then
/// logged two or three replication errors and resent its entry behind the
/// sync the follower was still making (about 50 errors in 20 writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_syncing_slower_than_a_heartbeat_is_waited_for() {
    let _serial = serial().await;
    let mut c = crate::register_cluster_led_by_node_1().await;
    let heartbeat = c.nodes[&1].config.raft.heartbeat_ms;
    let slow = heartbeat * 3;
    assert!(slow < c.nodes[&1].config.raft.election_timeout_min_ms, "slow, not past an election timeout");
    crate::fault(&c, 3, json!({ "slow_log_sync_ms": slow })).await;
    c.kill(2);
    let log = crate::harness::log_path(&c.nodes[&1].config_path);
    let before = std::fs::read_to_string(&log).unwrap().matches("error replication to target=3").count();
    let started = std::time::Instant::now();
    let mut latencies = Vec::new();
    for value in 1..=20 {
        let at = std::time::Instant::now();
        let write = c.cmd(1, "register", "put", json!({ "key": "k", "value": value }));
        let reply = tokio::time::timeout(Duration::from_secs(20), write).await;
        reply.expect("a write on the leader and the slow follower did not commit").unwrap();
        latencies.push(at.elapsed().as_millis());
    }
    let elapsed = started.elapsed();
    crate::fault(&c, 3, json!({ "slow_log_sync_ms": 0 })).await;
    let errors = std::fs::read_to_string(&log).unwrap().matches("error replication to target=3").count() - before;
    eprintln!("20 writes in {elapsed:?}, latencies {latencies:?}, {errors} replication errors to node 3");
    assert_eq!(errors, 0, "the leader timed out appends to a follower that was only slow");
    c.restart(2);
    c.same_digest().await;
}
