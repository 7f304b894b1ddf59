//! Upgrading: a binary with another engine refuses a data dir made with
//! the old one and says what to do; the procedure it names (backup with
//! the old engine, restore with the new) moves the cluster over.
//!
//! An engine change is made here the way `synod engine` shows one:
//! `SYNOD_FINGERPRINT_SALT` gives a build a different fingerprint.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Cluster, Member, log_path, serial, synod_bin};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_engine_refuses_the_old_data_dir_and_backup_restore_moves_the_cluster() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    for _ in 0..5 {
        c.cmd(leader, "counter", "increment", json!({})).await.unwrap();
    }
    c.converged().await;
    let token = c.admin_token().unwrap();

    // A follower restarted with the "new" engine refuses to start, saying why
    // and what to do.
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    c.kill(follower);
    c.nodes.get_mut(&follower).unwrap().env.push(("SYNOD_FINGERPRINT_SALT".into(), "new-engine".into()));
    c.restart(follower);
    let status = c.nodes.get_mut(&follower).unwrap().wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "the node started on another engine's data dir: {status:?}");
    let log = std::fs::read_to_string(log_path(&c.nodes[&follower].config_path)).unwrap();
    assert!(log.contains("was last run with engine") && log.contains("synod backup"), "{log}");
    // With its own binary it comes back and catches up.
    c.nodes.get_mut(&follower).unwrap().env.clear();
    c.restart(follower);
    c.cmd(leader, "counter", "increment", json!({})).await.unwrap();
    c.converged().await;

    // The procedure: back up with the old engine, restore with the new.
    let file = c.dir.path().join("move.backup");
    let node = c.client(leader).base().to_owned();
    let out = Command::new(synod_bin())
        .args(["backup", file.to_str().unwrap(), "--node", &node])
        .env("SYNOD_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let header: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (path, mut config) = synod::dev::prepare(&c.dir.path().join("new-engine"), 1).unwrap().remove(0);
    config.id = 9;
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let out = Command::new(synod_bin())
        .args(["restore", file.to_str().unwrap(), "--config", path.to_str().unwrap()])
        .env("SYNOD_FINGERPRINT_SALT", "new-engine")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(restored["from_engine"], header["engine"]);
    assert_ne!(restored["engine"], restored["from_engine"], "{restored}");
    for id in c.live() {
        c.kill(id);
    }
    let mut member = Member::new(config, path);
    member.env.push(("SYNOD_FINGERPRINT_SALT".into(), "new-engine".into()));
    c.nodes.insert(9, member);
    c.restart(9);
    let client = c.client_with(9, Some(&token));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.get("/readyz").await {
            Ok(v) if v["ready"] == true => break,
            other => assert!(tokio::time::Instant::now() < deadline, "not ready: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = client.get("/v1/cluster").await.unwrap();
    assert_eq!(view["engine"]["hash"], restored["engine"], "{view}");
    let r = client.post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
    assert_eq!(r["result"]["value"], json!(7), "nothing acknowledged was lost: {r}");
}
