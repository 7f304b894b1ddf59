//! Backup and restore: a backup taken while writes go on holds the state at
//! one index (its digest is the one the cluster had there); restored into a
//! new data dir it starts a new cluster with every plugin, device and token,
//! and takes commands. Damaged backups and used data dirs are refused.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use synod_sim::modbus::SimConfig;

use crate::harness::{Cluster, Member, serial, synod_bin};
use crate::plugins::component;

fn synod(args: &[&str], token: &str) -> (bool, String, String) {
    let out = Command::new(synod_bin()).args(args).env("SYNOD_TOKEN", token).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_new_cluster() {
    let _serial = serial().await;
    let sim = synod_sim::modbus::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig { rooms: 1, seed: 9, ..SimConfig::default() },
    )
    .await
    .unwrap();
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let token = c.admin_token().unwrap();
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.push(leader, "modbus-room", "1", component("modbus-room")).await.unwrap();
    let definition = json!({
        "driver": "modbus-room",
        "profile": { "temperature": { "table": "input", "address": 0, "type": "i16", "scale": 0.1 },
                     "heater": { "table": "coil", "address": 0 }, "poll_ms": 100 },
        "grants": [format!("modbus-tcp://{}/1", sim.addr())],
        "desired": { "mode": "auto" },
    });
    c.client(leader).put("/v1/devices/room-1", definition.to_string().into_bytes()).await.unwrap();
    let reader =
        c.client(leader).post("/v1/tokens", br#"{"principal": "hmi", "roles": ["reader"]}"#.to_vec()).await.unwrap();
    let reader_token = reader["token"].as_str().unwrap().to_owned();

    // Writes go on while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, stop, done) = (c.client(leader), stop.clone(), done.clone());
        tokio::spawn(async move {
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                client.post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let file = c.dir.path().join("cluster.backup");
    let file_arg = file.to_str().unwrap().to_owned();
    let node = c.client(leader).base().to_owned();
    let before = done.load(Ordering::Relaxed);
    let (ok, out, err) = synod(&["backup", &file_arg, "--node", &node], &token);
    let after = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(ok, "backup failed: {out}{err}");
    assert!(after > before, "no write completed while the backup was taken ({before} → {after})");
    let header: Value = serde_json::from_str(&out).unwrap();
    let index = header["operation_index"].as_u64().unwrap();
    // The image is the cluster's state at its index.
    let then = c.client(leader).get(&format!("/v1/digest?index={index}")).await.unwrap();
    assert_eq!(then["digest"], header["digest"], "{header}");
    assert_eq!(header["plugins"], json!(["counter", "modbus-room"]));
    assert_eq!(header["devices"], json!(1));
    let audit = c.client(leader).get("/v1/audit").await.unwrap();
    assert!(audit["records"].as_array().unwrap().iter().any(|r| r["action"] == "backup"), "{audit}");
    // Only an admin may take one.
    let denied = c.dir.path().join("denied.backup");
    let (ok, _, err) = synod(&["backup", denied.to_str().unwrap(), "--node", &node], &reader_token);
    assert!(!ok && err.contains("403") && err.contains("admin"), "{err}");
    assert!(!denied.exists() && !denied.with_extension("partial").exists());

    // A damaged copy and a used data dir are refused.
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    let damaged = c.dir.path().join("damaged.backup");
    std::fs::write(&damaged, &bytes).unwrap();
    let (path, config) = c.new_node(7);
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let config_arg = path.to_str().unwrap().to_owned();
    let (ok, _, err) = synod(&["restore", damaged.to_str().unwrap(), "--config", &config_arg], &token);
    assert!(!ok && err.contains("checksum"), "{err}");
    let used = c.nodes[&leader].config_path.to_str().unwrap().to_owned();
    let (ok, _, err) = synod(&["restore", &file_arg, "--config", &used], &token);
    assert!(!ok && err.contains("already holds a node's data"), "{err}");
    // A restore is a new cluster: the old cluster's network key is refused
    // unless asked for, and nothing is written.
    let (same_path, mut same) = c.new_node(6);
    same.network_key = c.nodes[&leader].config.network_key.clone();
    std::fs::write(&same_path, same.to_toml().unwrap()).unwrap();
    let (ok, _, err) = synod(&["restore", &file_arg, "--config", same_path.to_str().unwrap()], &token);
    assert!(!ok && err.contains("--same-network-key"), "{err}");
    assert!(!same.data_dir.join("snapshot.bin").exists());

    // Restored: a new cluster (its own network key) of one node.
    let (ok, out, err) = synod(&["restore", &file_arg, "--config", &config_arg], &token);
    assert!(ok, "restore failed: {out}{err}");
    let restored: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(restored["operation_index"], json!(index));
    assert_ne!(restored["cluster"], restored["from_cluster"]);
    let value_then = {
        let (ok, _, _) = synod(&["restore", &file_arg, "--config", &config_arg], &token);
        assert!(!ok, "a second restore into the same dir must be refused");
        c.kill(1);
        c.kill(2);
        c.kill(3);
        c.nodes.insert(7, Member::new(config, path));
        c.restart(7);
        let client = c.client_with(7, Some(&token));
        crate::dev::ready(&client, 20).await;
        // Its digest at the restored index is the cluster's.
        let there = client.get(&format!("/v1/digest?index={index}")).await.unwrap();
        assert_eq!(there["digest"], header["digest"]);
        let view = client.get("/v1/cluster").await.unwrap();
        assert_eq!(view["leader"], json!(7), "{view}");
        assert_eq!(view["members"].as_object().unwrap().len(), 1, "{view}");
        let plugins = client.get("/v1/plugins").await.unwrap();
        assert!(plugins["plugins"]["counter"]["active"] == json!("1"), "{plugins}");
        assert!(plugins["plugins"]["modbus-room"].is_object(), "{plugins}");
        let device = client.get("/v1/devices/room-1").await.unwrap();
        assert_eq!(device["device"]["desired"], json!({ "mode": "auto" }), "{device}");
        // Tokens came along: the reader's works, and only for reading.
        let as_reader = c.client_with(7, Some(&reader_token));
        as_reader.get("/v1/cluster").await.unwrap();
        assert!(as_reader.post("/v1/commands/counter/increment", b"{}".to_vec()).await.is_err());
        client.get("/v1/state/counter").await.unwrap()["entries"]["value"].as_u64().unwrap()
    };
    // Commands work, from the restored value on.
    assert!(value_then >= before, "the backup lost acknowledged writes: {value_then} < {before}");
    let client = c.client_with(7, Some(&token));
    let r = client.post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
    assert_eq!(r["result"]["value"], json!(value_then + 1));
    // More nodes join as usual, take the restored state and agree on it.
    c.add_fresh(8, 7).await;
    let r = c.client(8).post("/v1/commands/counter/increment", b"{}".to_vec()).await.unwrap();
    assert_eq!(r["result"]["value"], json!(value_then + 2));
    c.converged().await;
    c.same_digest().await;
    assert_eq!(c.local_state(8, "counter").await, json!({ "value": value_then + 2 }));
    assert_eq!(c.client(8).get("/v1/devices/room-1").await.unwrap()["device"]["desired"], json!({ "mode": "auto" }));
}
