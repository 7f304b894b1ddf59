//! Disaster recovery: two of three nodes lost for good (kill -9, data dirs
//! deleted); `synod recover --force-new-cluster` on the survivor's data dir
//! brings it back as a one-node cluster that keeps everything it had, and
//! two fresh nodes join it.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Cluster, serial, synod_bin};
use crate::plugins::component;

fn recover(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(synod_bin()).arg("recover").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_lost_for_good_and_the_survivor_recovers() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let mut acknowledged = 0;
    for _ in 0..40 {
        c.cmd(leader, "counter", "increment", json!({})).await.unwrap();
        acknowledged += 1;
    }
    c.converged().await;
    // The survivor is a follower; the leader and the other follower die.
    let survivor = c.live().into_iter().find(|id| *id != leader).unwrap();
    let lost: Vec<u64> = c.live().into_iter().filter(|id| *id != survivor).collect();

    // While it runs, recovery is refused: the node holds its data dir.
    let dir = c.nodes[&survivor].config.data_dir.clone();
    let dir_arg = dir.to_str().unwrap().to_owned();
    let (ok, _, err) = recover(&["--force-new-cluster", "--data-dir", &dir_arg]);
    assert!(!ok && err.contains("a node is running on this data dir"), "{err}");
    // And it must be asked for by name.
    let (ok, _, err) = recover(&["--data-dir", &dir_arg]);
    assert!(!ok && err.contains("--force-new-cluster"), "{err}");

    // The operator keeps the admin token (node 1 wrote it) somewhere safe.
    if survivor != 1 {
        let token = synod::node::auth::admin_token_path(&c.nodes[&1].config.data_dir);
        std::fs::copy(&token, synod::node::auth::admin_token_path(&dir)).unwrap();
    }
    // They die under load: writes are in flight to the leader when it goes.
    let stop = Arc::new(AtomicBool::new(false));
    let invoked = Arc::new(AtomicU64::new(acknowledged));
    let load = {
        let (client, stop, invoked) = (c.client(leader), stop.clone(), invoked.clone());
        tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                invoked.fetch_add(1, Ordering::Relaxed);
                let sent = client.post("/v1/commands/counter/increment", b"{}".to_vec());
                if !matches!(tokio::time::timeout(Duration::from_secs(2), sent).await, Ok(Ok(_))) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    for id in &lost {
        c.kill(*id);
        std::fs::remove_dir_all(&c.nodes[id].config.data_dir).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let invoked = invoked.load(Ordering::Relaxed);
    // Alone, the survivor cannot commit: a write times out or is refused.
    let stuck = tokio::time::timeout(Duration::from_secs(3), c.cmd(survivor, "counter", "increment", json!({}))).await;
    assert!(!matches!(stuck, Ok(Ok(_))), "a lone node of three committed a write: {stuck:?}");
    // What it had applied: its state and digest.
    let before = c.local_state(survivor, "counter").await;
    let digest_before = c.client(survivor).get("/v1/digest").await.unwrap();
    let applied_before = digest_before["index"].as_u64().unwrap();
    let value_before = before["value"].as_u64().unwrap();
    assert!(value_before > acknowledged, "no write under load reached the survivor: {before}");
    assert!(value_before <= invoked, "{value_before} increments applied of {invoked} sent");
    c.kill(survivor);

    // Recover, offline.
    let (ok, out, err) = recover(&["--force-new-cluster", "--data-dir", &dir_arg]);
    assert!(ok, "recover failed: {out}{err}");
    let recovered: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(recovered["node"], json!(survivor));
    let mut removed: Vec<u64> = serde_json::from_value(recovered["removed"].clone()).unwrap();
    removed.sort();
    assert_eq!(removed, lost);
    assert!(recovered["lost_above_operation_index"].as_u64().unwrap() >= applied_before, "{recovered}");
    assert!(err.contains("is now the only voter"), "{err}");
    for id in &lost {
        c.nodes.remove(id);
    }

    // Started again, it leads alone, with everything it had.
    c.restart(survivor);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let view = loop {
        let view = c.client(survivor).get("/v1/cluster").await;
        if let Ok(v) = &view
            && v["leader"] == json!(survivor)
        {
            break v.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "the survivor did not take the lead: {view:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(view["members"].as_object().unwrap().len(), 1, "{view}");
    // Everything it had applied is there, unchanged at that index; entries
    // it held in its log but had not seen committed may commit now.
    let digest_after = c.client(survivor).get(&format!("/v1/digest?index={applied_before}")).await.unwrap();
    assert_eq!(digest_after["digest"], digest_before["digest"], "the state at {applied_before} changed");
    // A linearizable read: it waits for the entries that commit now.
    let value = c.client(survivor).post("/v1/queries/counter/get", Vec::new()).await.unwrap()["result"]["value"]
        .as_u64()
        .unwrap();
    assert!((value_before..=invoked).contains(&value), "{value_before} before recovery, {value} after, {invoked} sent");
    let r = c.cmd(survivor, "counter", "increment", json!({})).await.unwrap();
    assert_eq!(r["result"]["value"], json!(value + 1));

    // Two fresh nodes join and catch up; the three agree and serve.
    c.add_fresh(4, survivor).await;
    c.add_fresh(5, survivor).await;
    let view = c.client(survivor).get("/v1/cluster").await.unwrap();
    for id in [survivor, 4, 5] {
        assert_eq!(view["members"][id.to_string()]["voter"], json!(true), "{view}");
    }
    for _ in 0..5 {
        c.cmd(5, "counter", "increment", json!({})).await.unwrap();
    }
    c.converged().await;
    c.same_digest().await;
    for id in [survivor, 4, 5] {
        assert_eq!(c.local_state(id, "counter").await, json!({ "value": value + 6 }), "node {id}");
    }
    // A majority of the new three is enough again: one may fail.
    c.kill(4);
    let r = c.cmd(survivor, "counter", "increment", json!({})).await.unwrap();
    assert_eq!(r["result"]["value"], json!(value + 7));
}
