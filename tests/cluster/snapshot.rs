//! A node that missed everything — including the plugin upload — catches up
//! by snapshot after the log it would need was compacted away.

use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_by_snapshot_with_plugin_bytes() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |config| {
        config.raft.snapshot_after_entries = 50;
        config.raft.keep_entries_after_snapshot = 5;
    });
    let leader = c.leader().await;
    let absent = c.live().into_iter().find(|id| *id != leader).unwrap();
    c.kill(absent);

    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    for _ in 0..150 {
        c.cmd(leader, "counter", "increment", json!({"by": 2})).await.unwrap();
    }
    let snapshot = c.nodes[&leader].config.data_dir.join("snapshot.bin");
    assert!(snapshot.exists(), "the leader built no snapshot");

    c.restart(absent);
    let (_, digest) = c.converged().await;
    assert_eq!(c.local_state(absent, "counter").await, json!({"value": 300}));
    // It got the plugin bytes from the snapshot, and runs commands with them.
    let data = &c.nodes[&absent].config.data_dir;
    assert_eq!(std::fs::read_dir(data.join("plugins/blobs")).unwrap().count(), 1);
    // ...and compiled them once into the cache keyed by engine fingerprint.
    let compiled: Vec<_> = std::fs::read_dir(data.join("plugins/compiled")).unwrap().collect();
    assert_eq!(compiled.len(), 1);
    let r = c.cmd(absent, "counter", "increment", json!({"by": 1})).await.unwrap();
    assert_eq!(r["result"], json!({"value": 301}));
    let (_, after) = c.converged().await;
    assert_ne!(digest, after);
}
