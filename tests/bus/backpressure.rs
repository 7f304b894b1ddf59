//! A flood of requests gets an answer for every one — a result or 429 with
//! `Retry-After` — while memory stays bounded and the cluster commits on.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::nats::NatsServer;
use crate::plugins::component;

/// Peak resident memory of a process, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Memory each node may reach under the flood.
const RSS_BOUND: u64 = 400 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_50k_requests_is_answered_and_bounded() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let c = Cluster::start(3, |config| {
        config.nats.url = Some(url.clone());
        // Small queues, so the flood overruns them.
        config.limits.max_queued_writes = 256;
    });
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.converged().await;
    let before = c.client(leader).get("/v1/cluster").await.unwrap()["applied_index"].as_u64().unwrap();

    let client =
        async_nats::ConnectOptions::new().request_timeout(Some(Duration::from_secs(60))).connect(&url).await.unwrap();
    let token = c.admin_token().unwrap();
    let token = token.as_str();
    const TOTAL: usize = 50_000;
    let answers = futures::stream::iter(0..TOTAL)
        .map(|_| {
            let client = client.clone();
            async move {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Authorization", format!("Bearer {token}").as_str());
                let msg = client
                    .request_with_headers("synod.cmd.counter.increment", headers, br#"{"by": 1}"#.to_vec().into())
                    .await;
                let msg = msg.map_err(|e| e.to_string())?;
                let headers = msg.headers.as_ref().ok_or("no headers")?;
                let status: u16 =
                    headers.get("Synod-Status").ok_or("no status")?.as_str().parse().map_err(|_| "bad status")?;
                if status == 429 && headers.get("Retry-After").is_none() {
                    return Err("429 without Retry-After".to_owned());
                }
                Ok::<u16, String>(status)
            }
        })
        .buffer_unordered(4000)
        .collect::<Vec<_>>()
        .await;
    let mut ok = 0;
    let mut busy = 0;
    for answer in &answers {
        match answer {
            Ok(200) => ok += 1,
            Ok(429) => busy += 1,
            other => panic!("a request got {other:?}"),
        }
    }
    eprintln!("{ok} applied, {busy} told to retry (429)");
    assert_eq!(ok + busy, TOTAL, "every request gets an answer");
    assert!(busy > 0, "the flood never overran a queue of 256; the test does not test backpressure");
    assert!(ok > 0);

    // The cluster committed through it and still does; the count matches.
    let leader = c.leader().await;
    let after = c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap();
    assert_eq!(after["result"]["value"], json!(ok + 1));
    assert!(after["index"].as_u64().unwrap() > before * 1000);
    for id in c.live() {
        let rss = peak_rss(c.nodes[&id].pid().unwrap());
        eprintln!("node {id}: peak RSS {} MiB", rss / (1024 * 1024));
        assert!(rss < RSS_BOUND, "node {id} peaked at {rss} bytes");
    }
}
