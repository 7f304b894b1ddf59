//! Activating a new version under continuous load: nothing fails, and the
//! switch happens at one log index on every node.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::plugins::{component, counter_v2};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_v2_under_load_then_roll_back() {
    let _serial = serial().await;
    let v2 = counter_v2();
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let pushed = c.push(leader, "counter", "2", v2).await.unwrap();
    assert_eq!(pushed["result"]["active"], json!(false), "a second version waits for activation");

    let clients: Vec<_> = c.live().into_iter().map(|id| c.client(id)).collect();
    let load = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut failures = 0;
        for i in 0..300usize {
            let body = serde_json::to_vec(&json!({"by": 1})).unwrap();
            match clients[i % clients.len()].post("/v1/commands/counter/increment", body).await {
                Ok(r) => seen.push((r["index"].as_u64().unwrap(), r["result"].clone())),
                Err(e) => {
                    eprintln!("failed: {e}");
                    failures += 1;
                }
            }
        }
        (seen, failures)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let switched = c.client(leader).post("/v1/plugins/counter/activate", br#"{"version":"2"}"#.to_vec()).await.unwrap();
    let switch_index = switched["index"].as_u64().unwrap();
    let (seen, failures) = load.await.unwrap();

    assert_eq!(failures, 0, "commands failed across the switch");
    let before = seen.iter().filter(|(i, _)| *i < switch_index).count();
    let after = seen.iter().filter(|(i, _)| *i > switch_index).count();
    assert!(before > 0 && after > 0, "the switch was not under load ({before} before, {after} after)");
    for (index, result) in &seen {
        let expected = if *index < switch_index { None } else { Some(2) };
        assert_eq!(result["version"].as_u64(), expected, "entry {index} (switch at {switch_index}): {result}");
    }
    // The value carried across versions: one increment per command.
    assert_eq!(seen.iter().map(|(_, r)| r["value"].as_i64().unwrap()).max(), Some(300));

    // Roll back: v1 answers again, on every node from the same index.
    c.client(leader).post("/v1/plugins/counter/activate", br#"{"version":"1"}"#.to_vec()).await.unwrap();
    let r = c.cmd(leader, "counter", "increment", json!({})).await.unwrap();
    assert_eq!(r["result"], json!({"value": 301}));
    c.converged().await;
    let plugins = c.client(leader).get("/v1/plugins").await.unwrap();
    assert_eq!(plugins["plugins"]["counter"]["active"], json!("1"));
}
