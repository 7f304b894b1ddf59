//! A leader restarted before anyone else stood for election takes up its
//! leadership again (openraft does). What it finds on disk as committed is a
//! hint written without fsync, so after a power loss it may be older than
//! what the leader acknowledged; a linearizable read must not be served
//! from that older point. The soak found it: two keys read as absent for
//! 20 ms after they had been written.

use std::time::Duration;

use serde_json::json;

use crate::harness::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_back_with_an_old_commit_hint_reads_what_it_acknowledged() {
    let _serial = serial().await;
    let mut c = crate::register_cluster_led_by_node_1().await;
    // The commit hint as it is now, before the writes below: what the disk
    // may hold after a power loss if the later overwrites were never
    // flushed.
    let hint = c.nodes[&1].config.data_dir.join("raft-log").join("committed");
    let old_hint = std::fs::read(&hint).unwrap();

    // Node 3 takes heartbeats but no entries; node 2 and the leader
    // acknowledge the writes.
    crate::fault(&c, 3, json!({ "hold_appends": true })).await;
    for value in 1..=20 {
        c.cmd(1, "register", "put", json!({ "key": "k", "value": value })).await.unwrap();
    }

    // Power loss on the leader: the hint reverts. Node 2 stops, so the
    // restarted leader's quorum is itself and node 3, which has not got the
    // writes yet and cannot take them while the hold lasts.
    c.kill(1);
    std::fs::write(&hint, &old_hint).unwrap();
    c.signal_pause(2, true);
    c.restart(1);

    // Reads through the restarted leader while it cannot commit: each is
    // either refused or the acknowledged value, never an older one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let (mut answered, mut refused) = (0, 0);
    while tokio::time::Instant::now() < deadline {
        match c.client(1).post("/v1/queries/register/get", serde_json::to_vec(&json!({ "key": "k" })).unwrap()).await {
            Ok(reply) => {
                answered += 1;
                assert_eq!(
                    reply["result"]["value"],
                    json!(20),
                    "a linearizable read after the leader's restart returned {reply} (20 was acknowledged)"
                );
            }
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("while the leader could not commit: {answered} reads answered, {refused} refused");

    // Once node 3 takes entries again the leader commits and reads succeed.
    // Node 3 first works through the appends it held, so the read-index
    // heartbeat (50 ms to answer) may miss it for a moment: a refusal then
    // is retried, and a stale value is still a failure.
    crate::fault(&c, 3, json!({ "hold_appends": false })).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reply = loop {
        match c.client(1).post("/v1/queries/register/get", serde_json::to_vec(&json!({ "key": "k" })).unwrap()).await {
            Ok(reply) => break reply,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "reads still refused 10 s after the heal: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(reply["result"]["value"], json!(20));
    c.signal_pause(2, false);
    c.same_digest().await;
}
