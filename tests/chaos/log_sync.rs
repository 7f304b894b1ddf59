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
