//! The replay gate: a candidate version runs the plugin's recent commands on
//! a scratch copy of its state before it may go live.

use serde_json::{Value, json};

use crate::harness::{Cluster, serial};
use crate::plugins::{component, with_feature};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_gate_stops_a_version_that_traps() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "register", "1", component("register")).await.unwrap();
    for v in 0..40i64 {
        c.cmd(1 + (v as u64) % 3, "register", "put", json!({ "key": format!("k{}", v % 5), "value": v }))
            .await
            .unwrap();
    }
    for v in 0..10i64 {
        c.cmd(leader, "register", "cas", json!({ "key": "k0", "from": 35, "to": 100 + v })).await.unwrap();
    }
    // Two candidates: one traps on odd values, one only says it is v2.
    c.push(leader, "register", "2", with_feature("register", "trap-on-odd")).await.unwrap();
    c.push(leader, "register", "3", with_feature("register", "v2")).await.unwrap();
    let replay = |node: u64, version: &str, commands: u64| {
        let client = c.client(node);
        let body = serde_json::to_vec(&json!({ "version": version, "commands": commands })).unwrap();
        async move { client.post("/v1/plugins/register/replay", body).await.unwrap() }
    };

    let trapping = replay(2, "2", 1000).await;
    eprintln!("{trapping:#}");
    assert_eq!(trapping["replayed"], 50, "every applied command, from a follower too");
    assert_eq!(trapping["trapped"], 20, "the 20 odd puts trap");
    assert_eq!(trapping["regressions"], 20);
    assert_eq!(trapping["passed"], false);
    let first = &trapping["differences"][0];
    assert_eq!(first["command"], "put");
    assert!(first["candidate"]["error"].as_str().unwrap().contains("trap"), "{first}");
    // The last 10 commands only: the cas commands, which v2 runs fine.
    assert_eq!(replay(1, "2", 10).await["passed"], true);

    // Activation that requires the replay refuses it; v1 stays active.
    let body = serde_json::to_vec(&json!({ "version": "2", "replay": 1000, "require_replay": true })).unwrap();
    match c.client(leader).post("/v1/plugins/register/activate", body).await {
        Err(synod::client::ClientError::Status { status: 409, body }) => {
            assert_eq!(body["kind"], "replay_failed");
            assert_eq!(body["replay"]["trapped"], 20);
        }
        other => panic!("expected 409 replay_failed, got {other:?}"),
    }
    let active = |plugins: Value| plugins["plugins"]["register"]["active"].clone();
    assert_eq!(active(c.client(leader).get("/v1/plugins").await.unwrap()), "1");

    // The compatible one passes (its outputs differ: each says version 2),
    // unless identical outputs are required.
    let compatible = replay(3, "3", 1000).await;
    assert_eq!((compatible["trapped"].clone(), compatible["regressions"].clone()), (json!(0), json!(0)));
    assert_eq!(compatible["different"], 50);
    assert_eq!(compatible["passed"], true);
    let strict = serde_json::to_vec(&json!({ "version": "3", "commands": 1000, "identical": true })).unwrap();
    assert_eq!(c.client(1).post("/v1/plugins/register/replay", strict).await.unwrap()["passed"], false);

    // The CLI gate exits non-zero on the trapping one.
    let http = c.nodes[&1].config.http.to_string();
    let token = c.admin_token().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synod"))
        .args(["plugin", "replay", "register", "2", "--commands", "1000", "--node", &http, "--token", &token])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synod"))
        .args(["plugin", "activate", "register", "3", "--replay", "1000", "--require-replay"])
        .args(["--node", &http, "--token", &token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let activated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(activated["replay"]["passed"], true);
    assert_eq!(active(c.client(leader).get("/v1/plugins").await.unwrap()), "3");
    let reply = c.cmd(2, "register", "put", json!({ "key": "k9", "value": 1 })).await.unwrap();
    assert_eq!(reply["result"]["version"], 2);
}
