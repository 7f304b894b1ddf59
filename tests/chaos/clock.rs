//! Clock jumps: a leader whose clock is behind the previous leader's must
//! not give entries earlier timestamps than those already in the log.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_never_runs_backwards_across_leaders() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "register", "1", component("register")).await.unwrap();
    // Every other node's clock an hour behind the leader's.
    for id in c.live().into_iter().filter(|id| *id != leader) {
        crate::fault(&c, id, json!({ "clock_offset_ms": -3_600_000 })).await;
    }
    let first = c.cmd(leader, "register", "put", json!({ "key": "t", "value": 1 })).await.unwrap();
    let (at1, index1) = (first["result"]["at"].as_u64().unwrap(), first["result"]["index"].as_u64().unwrap());

    // One of the slow-clocked nodes takes over.
    c.kill(leader);
    let new = c.leader().await;
    let second = c.cmd(new, "register", "put", json!({ "key": "t", "value": 2 })).await.unwrap();
    let (at2, index2) = (second["result"]["at"].as_u64().unwrap(), second["result"]["index"].as_u64().unwrap());
    assert!(index2 > index1);
    assert!(
        at2 >= at1,
        "time ran backwards across leaders: operation {index1} at {at1} ms, then {index2} at {at2} ms \
         (the new leader's clock is an hour behind)"
    );
    // It stays forward for later entries too, and the old leader agrees
    // once back.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = c.cmd(new, "register", "put", json!({ "key": "t", "value": 3 })).await.unwrap();
    assert!(third["result"]["at"].as_u64().unwrap() >= at2);
    c.restart(leader);
    c.same_digest().await;
}
