//! `GET /openapi.json`: the document is valid OpenAPI 3.1, every
//! operation it names answers on a live cluster, every method it does not
//! name is refused, and every answer — successes and errors alike — has the
//! status, content type and shape (no undocumented field) the document
//! gives for it.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{Value, json};
use synod_sim::modbus::SimConfig;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

/// One answer, for `openapi_check.py`.
struct Call<'a> {
    http: &'a reqwest::Client,
    base: String,
    token: Option<String>,
    seen: Vec<Value>,
}

impl Call<'_> {
    /// Send `method path` (a concrete path) for the documented `template`,
    /// record the answer, and return its status and body.
    async fn send(&mut self, method: &str, template: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.parse().unwrap(), &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = if content_type.starts_with("text/event-stream") {
            // A live feed: its headers are the answer; stop reading.
            Value::Null
        } else {
            let bytes = resp.bytes().await.unwrap();
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        self.seen.push(json!({
            "method": method, "path": template, "status": status, "content_type": content_type, "body": body,
        }));
        (status, body)
    }

    async fn upload(&mut self, name: &str, version: &str, bytes: Vec<u8>) -> (u16, Value) {
        let url = format!("{}/v1/plugins/{name}?version={version}", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(self.token.as_deref().unwrap())
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let body: Value = resp.json().await.unwrap();
        self.seen.push(json!({
            "method": "POST", "path": "/v1/plugins/{name}", "status": status, "content_type": content_type, "body": body,
        }));
        (status, body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_answers_as_documented() {
    let _serial = serial().await;
    let config = SimConfig { rooms: 1, seed: 5, ..SimConfig::default() };
    let sim = synod_sim::modbus::start("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
    let c = Cluster::start(3, |cfg| {
        cfg.devices.heartbeat_ms = 200;
    });
    let leader = c.leader().await;
    let http = reqwest::Client::new();
    let base = c.client(leader).base().to_owned();
    let mut call = Call { http: &http, base: base.clone(), token: c.admin_token(), seen: Vec::new() };

    // The document is open, like the health checks.
    let resp = http.get(format!("{base}/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let document: Value = resp.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    // Plugins.
    let (status, _) = call.upload("counter", "1", component("counter")).await;
    assert_eq!(status, 201);
    let (status, _) = call.upload("counter", "2", component("counter")).await;
    assert_eq!(status, 201);
    let (status, _) = call.upload("broken", "1", b"not wasm".to_vec()).await;
    assert_eq!(status, 400);
    call.send("GET", "/v1/plugins", "/v1/plugins", None).await;
    let (status, applied) =
        call.send("POST", "/v1/commands/{plugin}/{command}", "/v1/commands/counter/increment", Some(json!({}))).await;
    assert_eq!(status, 200, "{applied}");
    call.send("POST", "/v1/commands/{plugin}/{command}", "/v1/commands/counter/nonesuch", Some(json!({}))).await;
    call.send("POST", "/v1/commands/{plugin}/{command}", "/v1/commands/nonesuch/increment", Some(json!({}))).await;
    call.send("POST", "/v1/queries/{plugin}/{query}", "/v1/queries/counter/get", Some(json!({}))).await;
    call.send("POST", "/v1/queries/{plugin}/{query}", "/v1/queries/counter/get?consistency=sometimes", None).await;
    call.send("GET", "/v1/state/{plugin}", "/v1/state/counter", None).await;
    call.send("GET", "/v1/plugins/{name}/logs", "/v1/plugins/counter/logs", None).await;
    let replay = json!({ "version": "2", "commands": 10 });
    call.send("POST", "/v1/plugins/{name}/replay", "/v1/plugins/counter/replay", Some(replay)).await;
    let activate = json!({ "version": "2", "replay": 10, "require_replay": true });
    let (status, body) =
        call.send("POST", "/v1/plugins/{name}/activate", "/v1/plugins/counter/activate", Some(activate)).await;
    assert_eq!(status, 200, "{body}");
    call.send("POST", "/v1/plugins/{name}/activate", "/v1/plugins/counter/activate", Some(json!({ "version": "9" })))
        .await;

    // Devices, driven by the real driver against the Modbus simulator.
    let (status, _) = call.upload("modbus-room", "1", component("modbus-room")).await;
    assert_eq!(status, 201);
    let definition = json!({
        "driver": "modbus-room",
        "profile": {
            "temperature": { "table": "input", "address": 0, "type": "i16", "scale": 0.1 },
            "heater": { "table": "coil", "address": 0 },
            "poll_ms": 100,
        },
        "grants": [format!("modbus-tcp://{}/1", sim.addr())],
        "desired": { "mode": "auto" },
        "expected_version": 0,
    });
    let (status, body) = call.send("PUT", "/v1/devices/{id}", "/v1/devices/room-1", Some(definition)).await;
    assert_eq!(status, 200, "{body}");
    call.send("PUT", "/v1/devices/{id}", "/v1/devices/room-2", Some(json!({ "grants": [] }))).await;
    call.send("PATCH", "/v1/devices/{id}/desired", "/v1/devices/room-1/desired", Some(json!({ "setpoint": 21.5 })))
        .await;
    call.send(
        "PATCH",
        "/v1/devices/{id}/desired",
        "/v1/devices/room-1/desired?expected_version=1",
        Some(json!({ "setpoint": 1 })),
    )
    .await;
    // Wait for a reading, so the telemetry answer has one.
    let mut readings = Value::Null;
    for _ in 0..300 {
        let (status, body) = call.send("GET", "/v1/devices/{id}/telemetry", "/v1/devices/room-1/telemetry", None).await;
        if status == 200 && body["metrics"].as_object().is_some_and(|m| !m.is_empty()) {
            readings = body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if !readings["metrics"]["temperature"]["v"].is_number() {
        let device = c.client(leader).get("/v1/devices/room-1").await;
        panic!("no reading came: {readings}; the device: {device:?}");
    }
    call.send("GET", "/v1/devices/{id}", "/v1/devices/room-1", None).await;
    call.send("GET", "/v1/devices/{id}", "/v1/devices/nonesuch", None).await;
    call.send("GET", "/v1/devices/{id}/delta", "/v1/devices/room-1/delta?consistency=local", None).await;
    call.send("GET", "/v1/devices", "/v1/devices", None).await;
    call.send("GET", "/v1/devices/{id}/telemetry", "/v1/devices/nonesuch/telemetry", None).await;
    let (status, body) = call.send("DELETE", "/v1/devices/{id}", "/v1/devices/room-1", None).await;
    assert_eq!(status, 200, "{body}");

    // The cluster.
    call.send("GET", "/v1/cluster", "/v1/cluster", None).await;
    call.send("GET", "/v1/digest", "/v1/digest", None).await;
    call.send("GET", "/v1/digest", "/v1/digest?index=1", None).await;
    call.send("GET", "/v1/divergence", "/v1/divergence", None).await;
    call.send("POST", "/v1/cluster/nodes", "/v1/cluster/nodes", Some(json!({ "id": 9 }))).await;
    call.send("DELETE", "/v1/cluster/nodes/{id}", "/v1/cluster/nodes/99", None).await;
    let (status, _) = call.send("GET", "/v1/backup", "/v1/backup", None).await;
    assert_eq!(status, 200);
    call.send("GET", "/healthz", "/healthz", None).await;
    call.send("GET", "/readyz", "/readyz", None).await;
    call.send("GET", "/metrics", "/metrics", None).await;
    call.send("GET", "/v1/watch", "/v1/watch", None).await;
    call.send("GET", "/", "/", None).await;
    call.send("GET", "/openapi.json", "/openapi.json", None).await;

    // Security.
    let new = json!({ "principal": "probe", "roles": ["reader"] });
    let (status, created) = call.send("POST", "/v1/tokens", "/v1/tokens", Some(new)).await;
    assert_eq!(status, 201, "{created}");
    call.send("POST", "/v1/tokens", "/v1/tokens", Some(json!({ "principal": "probe", "roles": ["king"] }))).await;
    call.send("GET", "/v1/tokens", "/v1/tokens", None).await;
    call.send("GET", "/v1/audit", "/v1/audit", None).await;
    // A reader may not do an admin's work; no token at all is a 401.
    let admin = call.token.replace(created["token"].as_str().unwrap().to_owned());
    call.send("GET", "/v1/tokens", "/v1/tokens", None).await;
    call.token = None;
    call.send("GET", "/v1/cluster", "/v1/cluster", None).await;
    call.token = admin;
    let id = created["id"].as_str().unwrap();
    let (status, body) = call.send("DELETE", "/v1/tokens/{target}", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(status, 200, "{body}");
    if document["paths"]["/v1/faults"].is_object() {
        call.send("GET", "/v1/faults", "/v1/faults", None).await;
        call.send("POST", "/v1/faults", "/v1/faults", Some(json!({ "cut": [] }))).await;
    }
    let (status, body) = call.send("DELETE", "/v1/plugins/{name}", "/v1/plugins/counter", None).await;
    assert_eq!(status, 200, "{body}");

    // Every documented operation was called, and none hit the fallback.
    let called: BTreeSet<(String, String)> = call
        .seen
        .iter()
        .map(|s| (s["method"].as_str().unwrap().to_owned(), s["path"].as_str().unwrap().to_owned()))
        .collect();
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let untried: Vec<_> = documented.difference(&called).collect();
    assert!(untried.is_empty(), "documented operations the test did not call: {untried:?}");
    for s in &call.seen {
        assert_ne!(s["body"]["error"], "no such endpoint", "{s}");
    }

    // Methods the document does not name for a path are refused (405).
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path.replace("{plugin}", "counter").replace("{command}", "increment").replace("{query}", "get");
        let concrete = concrete.replace("{name}", "counter").replace("{id}", "1").replace("{target}", "x");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if documented.contains(&(method.to_owned(), path.clone())) {
                continue;
            }
            let resp = http
                .request(method.parse().unwrap(), format!("{base}{concrete}"))
                .bearer_auth(call.token.as_deref().unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 405, "{method} {concrete} is not documented but answered");
        }
    }

    // The document is valid, and every answer is one it describes.
    let dir = tempfile::tempdir().unwrap();
    let (doc_path, seen_path) = (dir.path().join("openapi.json"), dir.path().join("seen.json"));
    std::fs::write(&doc_path, document.to_string()).unwrap();
    std::fs::write(&seen_path, Value::Array(call.seen.clone()).to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cluster/openapi_check.py");
    let out = Command::new("python3").arg(script).arg(&doc_path).arg(&seen_path).output().unwrap();
    assert!(
        out.status.success(),
        "answers the document does not describe:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses: BTreeSet<u64> = call.seen.iter().map(|s| s["status"].as_u64().unwrap()).collect();
    for expected in [200, 201, 400, 401, 403, 404, 409] {
        assert!(statuses.contains(&expected), "no {expected} answer was checked: {statuses:?}");
    }
}
