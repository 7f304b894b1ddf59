//! `GET /metrics`: scraped after known traffic, parsed with the Prometheus
//! project's own OpenMetrics parser (Python `prometheus_client`), and the
//! counters checked to have moved by exactly what the traffic did.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::harness::{Cluster, serial};
use crate::plugins::component;

/// One sample: its name, labels and value.
struct Sample {
    name: String,
    labels: Value,
    value: f64,
}

/// Every sample of an exposition, through `tests/cluster/openmetrics.py`
/// (which fails on anything the parser refuses).
fn parse(text: &str) -> Vec<Sample> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cluster/openmetrics.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Sample {
                name: v["name"].as_str().unwrap().to_owned(),
                labels: v["labels"].clone(),
                value: v["value"].as_f64().unwrap(),
            }
        })
        .collect()
}

async fn scrape(c: &Cluster, id: u64) -> Vec<Sample> {
    let text = c.client(id).get("/metrics").await.unwrap();
    parse(text.as_str().expect("metrics are text"))
}

/// The value of `name` with (at least) `labels`; 0 when absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels[*k].as_str() == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_the_traffic_sent() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.converged().await;
    let before: Vec<(u64, Vec<Sample>)> = {
        let mut all = Vec::new();
        for id in c.live() {
            all.push((id, scrape(&c, id).await));
        }
        all
    };

    // Known traffic through the leader: 5 increments, 2 the plugin refuses
    // as invalid input (they reach the log and fail there, on every node).
    for _ in 0..5 {
        c.cmd(leader, "counter", "increment", json!({ "by": 2 })).await.unwrap();
    }
    for _ in 0..2 {
        assert!(c.cmd(leader, "counter", "increment", json!({ "by": "two" })).await.is_err());
    }
    // A command sent twice with one request id: applied once, the retry
    // answered from the request-id table on every node.
    for _ in 0..2 {
        let headers = [("Synod-Request-Id", "metrics-1")];
        let body = br#"{"by": 2}"#.to_vec();
        c.client(leader).post_with_headers("/v1/commands/counter/increment", body, &headers).await.unwrap();
    }
    // One scrape without a token.
    assert!(synod::client::Client::new(c.client(leader).base()).get("/metrics").await.is_err());
    c.converged().await;

    let route = [("route", "/v1/commands/{plugin}/{command}"), ("method", "POST")];
    let ok = [("plugin", "counter"), ("command", "increment"), ("result", "ok")];
    let failed = [("plugin", "counter"), ("command", "increment"), ("result", "error")];
    let mut leaders = 0.0;
    for (id, before) in &before {
        let after = scrape(&c, *id).await;
        let moved = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(before, name, labels);
        // Applied on every node, each command once.
        assert_eq!(moved("synod_commands_total", &ok), 6.0, "node {id}");
        assert_eq!(moved("synod_dedup_hits_total", &[]), 1.0, "node {id}");
        assert_eq!(moved("synod_commands_total", &failed), 2.0, "node {id}");
        assert_eq!(moved("synod_command_errors_total", &[("plugin", "counter"), ("kind", "invalid_input")]), 2.0);
        assert_eq!(moved("synod_command_fuel_count", &[("plugin", "counter"), ("command", "increment")]), 8.0);
        assert!(moved("synod_command_fuel_sum", &[("plugin", "counter")]) > 0.0);
        assert_eq!(moved("synod_command_apply_seconds_count", &[("plugin", "counter")]), 8.0);
        // A fresh instance for each command that ran (not for the retry).
        assert_eq!(moved("synod_plugin_instantiate_seconds_count", &[]), 8.0, "node {id}");
        assert!(moved("synod_log_fsync_seconds_count", &[]) >= 1.0, "node {id} synced its log");
        assert!(moved("synod_log_append_seconds_count", &[]) >= 1.0, "node {id} appended to its log");
        // Each node loaded the plugin once from its compile cache or by
        // compiling it (whichever came first after the bytes were stored);
        // every later load came from memory.
        let loads = |source| value(&after, "synod_plugin_loads_total", &[("source", source)]);
        assert_eq!(loads("disk") + loads("compiled"), 1.0, "node {id}");
        assert_eq!(value(&after, "synod_plugin_active", &[("plugin", "counter"), ("version", "1")]), 1.0);
        assert_eq!(value(&after, "synod_plugin_versions", &[("plugin", "counter")]), 1.0);
        assert_eq!(value(&after, "synod_divergence", &[]), 0.0);
        assert_eq!(value(&after, "synod_raft_leader", &[]), leader as f64);
        leaders += value(&after, "synod_raft_is_leader", &[]);
        let status = c.client(*id).get("/v1/cluster").await.unwrap();
        assert_eq!(value(&after, "synod_raft_term", &[]), status["term"].as_f64().unwrap());
        assert!(value(&after, "synod_raft_applied_index", &[]) >= value(before, "synod_raft_applied_index", &[]) + 7.0);
        assert!(value(&after, "synod_raft_commit_index", &[]) >= value(&after, "synod_raft_applied_index", &[]) - 1.0);
        if *id == leader {
            // The HTTP requests were all to the leader: 7 answered 200 (the
            // retry too), 2 answered 400; one scrape refused for want of a
            // token.
            assert_eq!(moved("synod_http_requests_total", &[route[0], route[1], ("status", "200")]), 7.0);
            assert_eq!(moved("synod_http_requests_total", &[route[0], route[1], ("status", "400")]), 2.0);
            assert_eq!(moved("synod_http_request_seconds_count", &route), 9.0);
            assert_eq!(moved("synod_http_request_seconds_count", &[route[0], route[1], ("status", "400")]), 2.0);
            assert_eq!(moved("synod_http_unauthenticated_total", &[]), 1.0);
            assert!(moved("synod_proposal_batch_requests_count", &[]) >= 1.0);
            assert!(moved("synod_proposal_batch_requests_sum", &[]) >= 9.0);
        } else {
            assert_eq!(moved("synod_http_requests_total", &[route[0]]), 0.0, "node {id} served no command");
        }
    }
    assert_eq!(leaders, 1.0, "exactly one node reports itself leader");
}
