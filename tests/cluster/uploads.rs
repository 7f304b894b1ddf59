//! Bad uploads are refused with a reason and leave the log untouched; a
//! stranger's key cannot take part.

use std::time::Duration;

use serde_json::json;
use synod::client::ClientError;

use crate::harness::{Cluster, serial};
use crate::plugins::{component, core_module};

async fn applied(c: &Cluster) -> Vec<u64> {
    let mut out = Vec::new();
    for id in c.live() {
        let v = c.client(id).get("/readyz").await.unwrap();
        out.push(v["applied_index"].as_u64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_never_logged() {
    let _serial = serial().await;
    let c = Cluster::start(3, |config| config.limits.max_plugin_bytes = 120_000);
    let leader = c.leader().await;
    c.converged().await;
    let before = applied(&c).await;

    let counter = component("counter");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not wasm", b"hello, I am not a plugin".to_vec(), 400, "not a WebAssembly binary"),
        ("core module", core_module("counter"), 400, "core WebAssembly module, not a component"),
        ("truncated", counter[..counter.len() / 2].to_vec(), 400, "does not compile"),
        ("too large", component("thermostat"), 413, "over the limit of 120000"),
    ];
    for (what, bytes, want, text) in cases {
        match c.push(leader, "bad", "1", bytes).await {
            Err(ClientError::Status { status, body }) => {
                assert_eq!(status, want, "{what}: {body}");
                assert!(body["error"].as_str().unwrap().contains(text), "{what}: {body}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    match c.client(leader).post("/v1/plugins/bad", counter.clone()).await {
        Err(ClientError::Status { status: 400, body }) => assert!(body["error"].as_str().unwrap().contains("version")),
        other => panic!("missing version: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(applied(&c).await, before, "a refused upload reached the log");
    let plugins = c.client(leader).get("/v1/plugins").await.unwrap();
    assert_eq!(plugins["plugins"], json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_key_cannot_join() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let term = c.client(leader).get("/v1/cluster").await.unwrap()["term"].as_u64().unwrap();

    // A fourth process with its own key claims to be node 2, lists the real
    // members as its peers and tries to form a cluster with them.
    let stranger_dir = c.dir.path().join("stranger");
    let mut configs = synod::dev::prepare(&stranger_dir, 1).unwrap();
    let (path, mut config) = configs.remove(0);
    config.id = 2;
    config.bootstrap = true;
    config.peers = c.peer_configs(Some(2));
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let stranger_http = config.http;
    c.nodes.insert(99, crate::harness::Member::new(config, path));
    c.restart(99);

    tokio::time::sleep(Duration::from_secs(4)).await;
    // The stranger never got a vote: it has no leader, and the real cluster
    // kept its leader and term.
    let s = synod::client::Client::new(&stranger_http.to_string()).get("/readyz").await;
    match s {
        Err(ClientError::Status { status: 503, .. }) => {}
        other => panic!("the stranger found a leader: {other:?}"),
    }
    c.kill(99);
    c.nodes.remove(&99);
    assert_eq!(c.leader().await, leader);
    let view = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(view["term"].as_u64().unwrap(), term);
    assert_eq!(view["members"].as_object().unwrap().len(), 3);
}

/// `synod plugin push` streams the component with a progress bar on a
/// terminal (and nothing but the answer when its output is not one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_upload_progress_on_a_terminal_only() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let node = c.client(leader).base().to_owned();
    let file = crate::plugins::built()["counter"].component.clone();
    let token = c.admin_token().unwrap();
    let bin = crate::harness::synod_bin();
    let push = |version: &str| {
        format!("{} plugin push {} --name counter --version {version} --node {node}", bin.display(), file.display())
    };
    // On a pseudo-terminal (util-linux `script`).
    let out = std::process::Command::new("script")
        .args(["-qec", &push("1"), "/dev/null"])
        .env("SYNOD_TOKEN", &token)
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("uploading counter 1"), "no progress bar: {shown}");
    assert!(shown.contains("\"index\""), "no answer: {shown}");
    // Piped: the answer alone, as JSON.
    let out = std::process::Command::new(&bin)
        .args(["plugin", "push"])
        .arg(&file)
        .args(["--name", "counter", "--version", "2", "--node", &node])
        .env("SYNOD_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer["index"].as_u64().is_some(), "{answer}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("uploading"));
    let plugins = c.client(leader).get("/v1/plugins").await.unwrap();
    let versions = plugins["plugins"]["counter"]["versions"].as_object().unwrap();
    assert_eq!(versions.len(), 2, "{plugins}");
    // What was streamed is what was stored.
    let sha = versions["1"]["sha256"].as_str().unwrap();
    let expected = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&file).unwrap()));
    assert_eq!(sha, expected);
}
