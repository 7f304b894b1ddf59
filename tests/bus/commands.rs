//! Command intake over NATS: same answers as HTTP, retries applied once,
//! bad requests answered with errors.

use serde_json::{Value, json};

use crate::harness::{Cluster, serial};
use crate::nats::NatsServer;
use crate::plugins::component;

/// The client and the bearer token it sends.
type Bus<'a> = (&'a async_nats::Client, &'a str);

async fn request((client, token): Bus<'_>, subject: &str, payload: &[u8], id: Option<&str>) -> (u16, Value) {
    let mut headers = async_nats::HeaderMap::new();
    if !token.is_empty() {
        headers.insert("Authorization", format!("Bearer {token}").as_str());
    }
    if let Some(id) = id {
        headers.insert("Synod-Request-Id", id);
    }
    let msg = client.request_with_headers(subject.to_owned(), headers, payload.to_vec().into()).await.unwrap();
    let status = msg.headers.as_ref().and_then(|h| h.get("Synod-Status")).unwrap().as_str().parse().unwrap();
    (status, serde_json::from_slice(&msg.payload).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_nats_match_http_and_retries_apply_once() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let c = Cluster::start(3, |config| {
        config.nats.url = Some(url.clone());
        config.limits.max_payload_bytes = 1000;
    });
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let nats_client = async_nats::connect(&url).await.unwrap();
    let token = c.admin_token().unwrap();
    let client = (&nats_client, token.as_str());

    let (status, body) = request(client, "synod.cmd.counter.increment", br#"{"by": 2}"#, None).await;
    assert_eq!((status, &body["result"]), (200, &json!({"value": 2})));
    let over_http = c.cmd(leader, "counter", "increment", json!({"by": 2})).await.unwrap();
    assert_eq!(over_http["result"], json!({"value": 4}));
    assert!(over_http["index"].as_u64() > body["index"].as_u64());

    // The same request id twice: applied once, answered twice alike.
    let (_, first) = request(client, "synod.cmd.counter.increment", br#"{"by": 10}"#, Some("req-1")).await;
    let (_, retry) = request(client, "synod.cmd.counter.increment", br#"{"by": 10}"#, Some("req-1")).await;
    assert_eq!(first, retry);
    assert_eq!(first["result"], json!({"value": 14}));
    // ...also when the retry arrives over HTTP at another node.
    let other = c.live().into_iter().find(|id| *id != leader).unwrap();
    let via_http = c
        .client(other)
        .post_with_headers(
            "/v1/commands/counter/increment",
            br#"{"by": 10}"#.to_vec(),
            &[("Synod-Request-Id", "req-1")],
        )
        .await
        .unwrap();
    assert_eq!(via_http["index"], first["index"]);
    c.converged().await;
    for id in c.live() {
        assert_eq!(c.local_state(id, "counter").await, json!({"value": 14}), "node {id}");
    }

    // Bad requests get error replies, never silence.
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("synod.cmd.counter.increment", b"{nope".to_vec(), 400, "body is not valid JSON"),
        ("synod.cmd.nope.increment", b"{}".to_vec(), 404, "unknown plugin `nope`"),
        ("synod.cmd.counter.explode", b"{}".to_vec(), 404, "unknown command `explode`"),
        ("synod.cmd.counter", b"{}".to_vec(), 400, "is not synod.cmd.<plugin>.<command>"),
        ("synod.cmd.counter.increment", vec![b' '; 2000], 413, "over the limit of 1000"),
        ("synod.cmd.counter.increment", br#"{"by": "x"}"#.to_vec(), 400, "invalid `increment` payload"),
    ];
    for (subject, payload, want, text) in cases {
        let (status, body) = request(client, subject, &payload, None).await;
        assert_eq!(status, want, "{subject}: {body}");
        assert!(body["error"].as_str().unwrap().contains(text), "{subject}: {body}");
    }
    let ready = c.client(leader).get("/readyz").await.unwrap();
    assert_eq!(ready["bus"], json!("connected"));
}

/// Requests answered over NATS by `node`, from its `/metrics`.
async fn answered(c: &Cluster, node: u64) -> u64 {
    let text = c.client(node).get("/metrics").await.unwrap();
    text.as_str()
        .expect("metrics are text")
        .lines()
        .filter(|l| l.starts_with("synod_nats_requests_total{") && l.contains("family=\"cmd\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Only the leader serves the intake, so no request takes a hop through a
/// follower (before, followers took two thirds of them and forwarded
/// each). When the leader dies the new one takes over, and a client that
/// retries with its request id has every increment applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_serves_the_intake_and_the_next_leader_takes_over() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let mut c = Cluster::start(3, |config| config.nats.url = Some(url.clone()));
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let nats_client = async_nats::connect(&url).await.unwrap();
    let token = c.admin_token().unwrap();

    // Retries (same id) through "no responders" and errors, bounded.
    let increment = |id: String| {
        let (nats_client, token) = (nats_client.clone(), token.clone());
        async move {
            for _ in 0..100 {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Authorization", format!("Bearer {token}").as_str());
                headers.insert("Synod-Request-Id", id.as_str());
                let sent = nats_client.request_with_headers(
                    "synod.cmd.counter.increment",
                    headers,
                    br#"{"by": 1}"#.to_vec().into(),
                );
                if let Ok(Ok(msg)) = tokio::time::timeout(std::time::Duration::from_secs(5), sent).await
                    && msg.headers.as_ref().and_then(|h| h.get("Synod-Status")).map(|s| s.as_str()) == Some("200")
                {
                    return serde_json::from_slice::<Value>(&msg.payload).unwrap();
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("increment {id} was never answered");
        }
    };
    for i in 0..30 {
        increment(format!("a-{i}")).await;
    }
    assert_eq!(answered(&c, leader).await, 30, "the leader answered every request");
    for id in c.live().into_iter().filter(|id| *id != leader) {
        assert_eq!(answered(&c, id).await, 0, "follower {id} took requests off the bus");
    }

    // The leader dies; requests sent meanwhile are retried until the new
    // leader (which subscribes when it takes over) answers them.
    c.kill(leader);
    let mut last = 0;
    for i in 0..30 {
        let reply = increment(format!("b-{i}")).await;
        last = reply["result"]["value"].as_i64().unwrap();
    }
    assert_eq!(last, 60, "every increment applied exactly once");
    let next = c.leader().await;
    assert_ne!(next, leader);
    assert!(answered(&c, next).await >= 30);
    c.converged().await;
    for id in c.live() {
        assert_eq!(c.local_state(id, "counter").await, json!({"value": 60}), "node {id}");
    }
}
