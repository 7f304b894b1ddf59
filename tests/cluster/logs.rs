//! `synod logs <plugin>` / `GET /v1/plugins/{name}/logs`: what a plugin
//! logged while its commands were applied, kept on every node that applied
//! them.

use serde_json::json;

use crate::harness::{Cluster, serial, synod_bin};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_log_lines_are_kept_on_every_node() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "register", "1", component("register")).await.unwrap();
    c.cmd(leader, "register", "put", json!({ "key": "a", "value": 1 })).await.unwrap();
    // A compare-and-set that does not swap logs a line.
    let missed = c.cmd(leader, "register", "cas", json!({ "key": "a", "from": 7, "to": 8 })).await.unwrap();
    let index = missed["result"]["index"].as_u64().unwrap();
    c.converged().await;
    for id in c.live() {
        let body = c.client(id).get("/v1/plugins/register/logs").await.unwrap();
        let lines = body["lines"].as_array().unwrap();
        assert_eq!(lines.len(), 1, "node {id}: {body}");
        assert_eq!(lines[0]["index"].as_u64(), Some(index));
        assert_eq!(lines[0]["command"], "cas");
        assert_eq!(lines[0]["level"], "info");
        assert_eq!(lines[0]["message"], "cas on a not swapped: expected 7, holds Some(1)");
        // Nothing after that index.
        let later = c.client(id).get(&format!("/v1/plugins/register/logs?after={index}")).await.unwrap();
        assert_eq!(later["lines"], json!([]));
    }
    // The CLI prints it as a line.
    let node = c.client(leader).base().to_owned();
    let out = std::process::Command::new(synod_bin())
        .args(["logs", "register", "--node", &node])
        .env("SYNOD_TOKEN", c.admin_token().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("{index}")) && text.contains("cas on a not swapped"), "{text}");
}
