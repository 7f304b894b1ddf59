//! `[telemetry]`: a command's trace (intake → propose → commit → apply →
//! reply, with its log index) reaches an OTLP/HTTP collector, decoded here
//! with OpenTelemetry's own protobuf definitions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message as _;
use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Seen {
    node: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    start: u64,
    end: u64,
    attrs: BTreeMap<String, String>,
}

fn text(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Any::StringValue(s)) => s.clone(),
                Some(Any::IntValue(i)) => i.to_string(),
                Some(Any::BoolValue(b)) => b.to_string(),
                Some(Any::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// A collector: `POST /v1/traces` with protobuf bodies, every span kept.
async fn collector() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let store = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut store = store.lock().unwrap();
                for resource in request.resource_spans {
                    let res = text(&resource.resource.map(|r| r.attributes).unwrap_or_default());
                    assert_eq!(res.get("service.name").map(String::as_str), Some("synod"), "{res:?}");
                    let node = res["service.instance.id"].clone();
                    for scope in resource.scope_spans {
                        for s in scope.spans {
                            store.push(Seen {
                                node: node.clone(),
                                name: s.name,
                                trace: s.trace_id,
                                id: s.span_id,
                                parent: s.parent_span_id,
                                start: s.start_time_unix_nano,
                                end: s.end_time_unix_nano,
                                attrs: text(&s.attributes),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::default()
                        .encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// The spans of the trace whose `command` span has operation `index`, on
/// `node`, once they are all in (up to 20 s).
async fn trace_of(seen: &Mutex<Vec<Seen>>, node: u64, index: u64, names: &[&str]) -> Vec<Seen> {
    for _ in 0..200 {
        {
            let spans = seen.lock().unwrap();
            let root = spans.iter().find(|s| {
                s.node == node.to_string() && s.name == "command" && s.attrs.get("index") == Some(&index.to_string())
            });
            if let Some(root) = root {
                let trace: Vec<Seen> = spans.iter().filter(|s| s.trace == root.trace).cloned().collect();
                if names.iter().all(|n| trace.iter().any(|s| s.name == *n)) {
                    return trace;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = seen.lock().unwrap();
    panic!(
        "no complete trace for index {index} on node {node}; spans seen: {:#?}",
        &spans[spans.len().saturating_sub(20)..]
    );
}

fn one<'a>(trace: &'a [Seen], name: &str) -> &'a Seen {
    let found: Vec<&Seen> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "{name}: {trace:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_traced_from_intake_to_reply_over_otlp() {
    let _serial = serial().await;
    let (url, seen) = collector().await;
    let c = Cluster::start_env(3, &[("OTEL_BSP_SCHEDULE_DELAY", "100")], |cfg| {
        cfg.telemetry.otlp_endpoint = Some(url.clone());
    });
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();

    // Through the leader: every stage, in order, with the log index.
    let answer = c.cmd(leader, "counter", "increment", json!({})).await.unwrap();
    let index = answer["index"].as_u64().unwrap();
    let log_index = (index / 1000).to_string();
    let trace = trace_of(&seen, leader, index, &["command", "propose", "commit", "apply", "reply"]).await;
    let command = one(&trace, "command");
    assert!(command.parent.is_empty(), "the command span is the root");
    assert_eq!(command.attrs["transport"], "http");
    assert_eq!(command.attrs["plugin"], "counter");
    assert_eq!(command.attrs["command"], "increment");
    assert_eq!(command.attrs["status"], "200");
    assert_eq!(command.attrs["log_index"], log_index);
    let propose = one(&trace, "propose");
    assert_eq!(propose.parent, command.id);
    assert_eq!(propose.attrs["log_index"], log_index);
    assert_eq!(propose.attrs["leader"], leader.to_string());
    let (commit, apply, reply) = (one(&trace, "commit"), one(&trace, "apply"), one(&trace, "reply"));
    for stage in [commit, apply] {
        assert_eq!(stage.parent, propose.id, "{stage:?}");
        assert_eq!(stage.attrs["log_index"], log_index);
    }
    assert_eq!(reply.parent, command.id);
    // Each stage within its parent, one after the other.
    assert!(command.start <= propose.start && propose.end <= command.end, "{trace:#?}");
    assert!(propose.start <= commit.start && commit.start < commit.end, "{trace:#?}");
    assert!(commit.end <= apply.start && apply.start <= apply.end && apply.end <= propose.end, "{trace:#?}");
    assert!(propose.end <= reply.start && reply.end <= command.end, "{trace:#?}");

    // Through a follower: the forward to the leader, named.
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    let answer = c.cmd(follower, "counter", "increment", json!({})).await.unwrap();
    let index = answer["index"].as_u64().unwrap();
    let trace = trace_of(&seen, follower, index, &["command", "propose", "reply"]).await;
    assert_eq!(one(&trace, "propose").attrs["leader"], leader.to_string());
    assert_eq!(one(&trace, "propose").attrs["log_index"], (index / 1000).to_string());

    // A refused command is traced with its status, and nothing is proposed.
    let refused = c.cmd(leader, "counter", "nonesuch", json!({})).await.unwrap_err();
    assert!(refused.to_string().contains("unknown_command"), "{refused}");
    // Spans are exported in batches: wait for the refused command's (then
    // half a second more, for any second one to show).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.name == "command" && s.attrs.get("status").map(String::as_str) == Some("404"))
    {
        assert!(std::time::Instant::now() < deadline, "the refused command's span was not exported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = seen.lock().unwrap();
    let failed: Vec<&Seen> = spans
        .iter()
        .filter(|s| s.name == "command" && s.attrs.get("status").map(String::as_str) == Some("404"))
        .collect();
    assert_eq!(failed.len(), 1, "{spans:#?}");
    assert!(!spans.iter().any(|s| s.trace == failed[0].trace && s.name == "propose"));
    // The node's own writes (heartbeats, settings) are not traced.
    assert!(spans.iter().all(|s| ["command", "propose", "commit", "apply", "reply"].contains(&s.name.as_str())));
}
