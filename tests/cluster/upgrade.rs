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
    let (path, config) = c.new_node(9);
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
    crate::dev::ready(&client, 30).await;
    let view = client.get("/v1/cluster").await.unwrap();
    assert_eq!(view["engine"]["hash"], restored["engine"], "{view}");
    let r = client.post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
    assert_eq!(r["result"]["value"], json!(7), "nothing acknowledged was lost: {r}");
}

/// The previous release's binary (`tests/upgrade/prev-binary.sh`, which
/// `./tests/run` runs and passes in `SYNOD_PREV_BIN`).
fn previous_release() -> Option<std::path::PathBuf> {
    std::env::var_os("SYNOD_PREV_BIN").map(std::path::PathBuf::from)
}

/// Whether node `id` runs this build (it serves `/openapi.json`, which the
/// previous release did not).
async fn runs_this_build(c: &Cluster, id: u64) -> bool {
    c.client(id).get("/openapi.json").await.is_ok()
}

/// A cluster of the previous release, upgraded to this build one node at a
/// time (followers first, the leader last) under steady writes: every
/// command succeeds (a client that loses its node retries the same request
/// id on another), none is applied twice, and the nodes agree throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_from_the_previous_release_fails_no_command() {
    let Some(prev) = previous_release() else {
        eprintln!("SKIPPED: SYNOD_PREV_BIN is not set (./tests/run builds the previous release and sets it)");
        return;
    };
    let _serial = serial().await;
    let mut c = Cluster::configure(3, &[], |_| {});
    for id in 1..=3 {
        c.nodes.get_mut(&id).unwrap().bin = Some(prev.clone());
        c.restart(id);
    }
    let leader = c.leader().await;
    for id in 1..=3 {
        assert!(!runs_this_build(&c, id).await, "node {id} should run the previous release");
    }
    c.push(leader, "counter", "1", component("counter")).await.unwrap();

    // Two clients write without pause, each command with its own request id,
    // retried (same id) on the next node when its node does not answer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|k| {
            let nodes: Vec<synod::client::Client> = (1..=3).map(|id| c.client(id)).collect();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut done, mut retries) = (0u64, 0u64);
                for n in 0..100_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("upgrade-{k}-{n}");
                    let mut attempt = 0usize;
                    loop {
                        let node = &nodes[(n as usize + attempt + k) % nodes.len()];
                        let headers = [("synod-request-id", id.as_str())];
                        let sent = node.post_with_headers("/v1/commands/counter/increment", b"{}".to_vec(), &headers);
                        match tokio::time::timeout(Duration::from_secs(5), sent).await {
                            Ok(Ok(_)) => break,
                            other => {
                                attempt += 1;
                                retries += 1;
                                assert!(attempt < 60, "command {id} failed 60 times: {other:?}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    done += 1;
                }
                (done, retries)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for id in followers.into_iter().chain([leader]) {
        c.stop(id);
        c.nodes.get_mut(&id).unwrap().bin = None;
        c.restart(id);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !runs_this_build(&c, id).await {
            assert!(tokio::time::Instant::now() < deadline, "node {id} did not come back on this build");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Caught up: at least where another node was once it was back
        // (writes go on, so the nodes are never all at one index).
        let other = (1..=3).find(|o| *o != id).unwrap();
        let applied = |v: serde_json::Value| v["applied_index"].as_u64().unwrap_or(0);
        let target = applied(c.client(other).get("/readyz").await.unwrap());
        while applied(c.client(id).get("/readyz").await.unwrap_or_default()) < target {
            assert!(tokio::time::Instant::now() < deadline, "node {id} did not catch up to {target}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The mixed-version cluster serves a while before the next node.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (done, retries) = client.await.unwrap();
        eprintln!("a client: {done} commands, {retries} retries");
        assert!(done > 0);
        total += done;
    }
    c.converged().await;
    c.same_digest().await;
    for id in 1..=3 {
        assert!(runs_this_build(&c, id).await);
        assert_eq!(c.local_state(id, "counter").await, json!({ "value": total }), "node {id}: each command once");
    }
}
