//! Divergence bisection: one node's write perturbed on purpose (a test-only
//! fault) is found at exactly its operation index, with both sides'
//! effects.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Cluster, serial};
use crate::nats::NatsServer;
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_perturbed_write_is_found_at_its_index() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let c = Cluster::start(3, |config| config.nats.url = Some(url.clone()));
    let bus = async_nats::connect(nats.url()).await.unwrap();
    let mut alarms = bus.subscribe("synod.sys.divergence").await.unwrap();
    bus.flush().await.unwrap();
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let mut last = 0;
    for i in 0..60 {
        last = c.cmd(1 + i % 3, "counter", "increment", json!({ "by": 1 })).await.unwrap()["index"].as_u64().unwrap();
    }
    // Node 3 applies every write before the fault, or the fault would
    // perturb the last of them instead of the next.
    c.wait_applied(3, last).await;
    crate::fault(&c, 3, json!({ "perturb_next_write": true })).await;
    let perturbed = c.cmd(leader, "counter", "increment", json!({ "by": 1 })).await.unwrap();
    let index = perturbed["index"].as_u64().unwrap();
    for i in 0..40 {
        c.cmd(1 + i % 3, "counter", "increment", json!({ "by": 1 })).await.unwrap();
    }

    // The alarm is up within seconds (digests are gossiped each second).
    let raised = Instant::now();
    while c.client(1).get("/v1/cluster").await.unwrap()["divergence"] != json!(true) {
        assert!(raised.elapsed() < Duration::from_secs(5), "no divergence alarm on node 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("alarm raised {:?} after the last write", raised.elapsed());
    // And on the bus, naming the index where the digests were compared.
    let notice = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut alarms))
        .await
        .expect("no synod.sys.divergence notice")
        .unwrap();
    let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
    assert!(notice["index"].as_u64().unwrap() >= index, "{notice}");

    // From a healthy node: node 2 agrees, node 3 parted at `index`.
    let report = c.client(1).get("/v1/divergence").await.unwrap();
    eprintln!("{report:#}");
    assert_eq!(report["first_divergent_index"], json!(index), "{report:#}");
    let status = |report: &Value, node: u64| {
        report["peers"].as_array().unwrap().iter().find(|p| p["node"] == json!(node)).unwrap().clone()
    };
    assert_eq!(status(&report, 2)["status"], "agree");
    assert_eq!(status(&report, 3)["status"], "diverged");
    assert_eq!(status(&report, 3)["first_divergent_index"], json!(index));
    assert_eq!(report["operation"]["plugin"], "counter");
    assert_eq!(report["operation"]["command"], "increment");
    // Both sides' effects: the same command, different values written.
    let ours = &report["effects"]["1"][0];
    let theirs = &report["effects"]["3"][0];
    assert_eq!(ours["payload_blake3"], theirs["payload_blake3"]);
    assert_eq!(ours["writes"][0]["key"], theirs["writes"][0]["key"]);
    assert_ne!(ours["writes"][0]["value_blake3"], theirs["writes"][0]["value_blake3"]);
    assert_ne!(ours["digest"], theirs["digest"]);

    // From the perturbed node: both others parted at the same index.
    let report = c.client(3).get("/v1/divergence").await.unwrap();
    assert_eq!(report["first_divergent_index"], json!(index), "{report:#}");
    assert_eq!(status(&report, 1)["status"], "diverged");
    assert_eq!(status(&report, 2)["status"], "diverged");

    // The CLI says the same.
    let http = c.nodes[&2].config.http.to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synod"))
        .args(["divergence", "--node", &http, "--token", &c.admin_token().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["first_divergent_index"], json!(index));
}
