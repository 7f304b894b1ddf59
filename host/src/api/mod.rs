//! HTTP API (axum): requests in from operators and tools.
//!
//! In: JSON over HTTP. Out: calls into the [`NodeInner`] — writes through
//! Raft, reads of the replicated state — and JSON answers. Every error is
//! JSON `{"error": "...", "kind": "..."}` with the status the design names:
//! 400 malformed, 404 unknown plugin or command, 413 too large, 422 rejected
//! by the handler, 503 no leader (with the leader's address when known).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::consensus::rpc::WriteError;
use crate::consensus::{NodeInfo, Op};
use crate::node::{NodeInner, UploadError};
use crate::runtime::{CommandError, Context, LoadError, PluginLimits};
use crate::state::parse_name;

/// An API error: a status and a JSON body.
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError { status, body: json!({ "error": message.to_string(), "kind": kind }) }
    }
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", message)
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        self.status.as_u16()
    }

    /// The JSON body.
    pub fn body(&self) -> &Value {
        &self.body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match &e {
            WriteError::NotLeader { leader_id, leader_http } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: json!({
                    "error": "no leader is available to take this request; retry shortly",
                    "kind": "no_leader", "leader_id": leader_id, "leader": leader_http,
                }),
            },
            WriteError::Failed(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
        }
    }
}

fn command_error(e: &CommandError) -> ApiError {
    let (status, kind) = match e {
        CommandError::UnknownPlugin { .. } => (StatusCode::NOT_FOUND, "unknown_plugin"),
        CommandError::UnknownCommand { .. } => (StatusCode::NOT_FOUND, "unknown_command"),
        CommandError::UnknownQuery { .. } => (StatusCode::NOT_FOUND, "unknown_query"),
        CommandError::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "invalid_input"),
        CommandError::Rejected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
        CommandError::Lifecycle { .. } => (StatusCode::CONFLICT, "lifecycle"),
        CommandError::Host { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "host_failure"),
        CommandError::Internal { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "plugin_error"),
        CommandError::OutOfFuel { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "out_of_fuel"),
        CommandError::OutOfMemory { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "out_of_memory"),
        CommandError::StackOverflow => (StatusCode::UNPROCESSABLE_ENTITY, "stack_overflow"),
        CommandError::Trap { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "trap"),
        CommandError::OutputTooLarge { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "output_too_large"),
    };
    ApiError::new(status, kind, e)
}

/// Plugin output in JSON: the value itself when it is JSON, else base64
/// under `result_base64` would be needed; outputs are JSON by convention, so
/// non-JSON output is returned as a string of its UTF-8 (lossy).
pub fn output_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

type ApiResult = Result<Response, ApiError>;

/// Build the router over a node.
pub fn router(node: Arc<NodeInner>) -> Router {
    let plugin_limit = node.config.limits.max_plugin_bytes;
    let payload_limit = node.config.limits.max_payload_bytes;
    Router::new()
        .route("/v1/commands/{plugin}/{command}", post(run_command).layer(DefaultBodyLimit::max(payload_limit + 1)))
        .route("/v1/queries/{plugin}/{query}", post(run_query).layer(DefaultBodyLimit::max(payload_limit + 1)))
        .route("/v1/state/{plugin}", get(read_state))
        .route("/v1/plugins", get(list_plugins))
        .route("/v1/plugins/{name}", post(upload_plugin).delete(remove_plugin).layer(DefaultBodyLimit::max(plugin_limit + 1)))
        .route("/v1/plugins/{name}/activate", post(activate_plugin))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/nodes", post(add_node))
        .route("/v1/cluster/nodes/{id}", delete(remove_node))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(node)
}

fn check_name(kind: &'static str, raw: &str) -> Result<(), ApiError> {
    parse_name(kind, raw.as_bytes()).map(|_| ()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_name", e))
}

/// The body, or a JSON 413/400 for one axum refused to read.
fn body_or(body: Result<Bytes, BytesRejection>, what: &str, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("{what} is over the limit of {limit} bytes"))
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.body_text())
        }
    })
}

/// A 413 when `size` exceeds `limit`, naming `what`.
fn check_size(what: &str, size: usize, limit: usize) -> Result<(), ApiError> {
    if size > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} is {size} bytes, over the limit of {limit}"),
        ));
    }
    Ok(())
}

fn check_payload(node: &NodeInner, body: &Bytes) -> Result<(), ApiError> {
    check_size("payload", body.len(), node.config.limits.max_payload_bytes)?;
    if !body.is_empty() {
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", format!("body is not valid JSON: {e}")))?;
    }
    Ok(())
}

/// Header naming a client's request id: a retry with the same id is applied
/// at most once (within `apply::DEDUP_WINDOW` identified requests).
pub const REQUEST_ID_HEADER: &str = "synod-request-id";

async fn run_command(
    State(node): State<Arc<NodeInner>>,
    Path((plugin, command)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_or(body, "payload", node.config.limits.max_payload_bytes)?;
    let request_id = match headers.get(REQUEST_ID_HEADER) {
        None => None,
        Some(v) => Some(check_request_id(v.to_str().unwrap_or(""))?),
    };
    let (index, response) = submit_command(&node, plugin, command, body, request_id).await?;
    Ok(Json(json!({ "result": output_json(&response), "index": index })).into_response())
}

/// Check a client request id: 1–128 visible ASCII characters.
pub fn check_request_id(id: &str) -> Result<String, ApiError> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(id.to_owned())
    } else {
        Err(ApiError::new(StatusCode::BAD_REQUEST, "malformed", "Synod-Request-Id must be 1-128 visible ASCII characters"))
    }
}

/// Validate and run one command; shared by HTTP and the NATS bus so both
/// answer the same way. Returns the index and the plugin's output.
pub async fn submit_command(
    node: &NodeInner,
    plugin: String,
    command: String,
    body: Bytes,
    request_id: Option<String>,
) -> Result<(u64, Vec<u8>), ApiError> {
    check_name("plugin", &plugin)?;
    check_name("command", &command)?;
    check_payload(node, &body)?;
    // Refuse what cannot succeed before it reaches the log. This node may
    // lag the leader (a plugin installed a moment ago through another node):
    // before answering 404, catch up to everything committed and look again.
    let lookup = || node.with_state(|sm| sm.plugin(&plugin).map(|p| p.info().commands.contains(&command))).flatten();
    let mut known = lookup();
    if known != Some(true) && node.read_barrier().await.is_ok() {
        known = lookup();
    }
    match known {
        None => return Err(command_error(&CommandError::UnknownPlugin { name: plugin })),
        Some(false) => return Err(command_error(&CommandError::UnknownCommand { name: command })),
        Some(true) => {}
    }
    let op = Op::Command { plugin, command, payload: body.to_vec() };
    let (index, response) = node.write_request(op, "anonymous", request_id).await?;
    match applied(response) {
        Ok(out) => Ok((index, out)),
        // A command's failure was still applied: say where.
        Err(mut err) => {
            err.body["index"] = json!(index);
            Err(err)
        }
    }
}

/// What an applied operation produced: its output, or its error as the
/// API reports it.
fn applied(response: crate::consensus::Response) -> Result<Vec<u8>, ApiError> {
    match response.result {
        Some(Ok(out)) => Ok(out),
        Some(Err(e)) => Err(command_error(&e)),
        None => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "entry produced no result")),
    }
}

#[derive(Deserialize)]
struct ReadParams {
    /// Only keys with this prefix.
    #[serde(default)]
    prefix: String,
    /// `linearizable` (default) or `local`.
    consistency: Option<String>,
    /// At most this many keys (default 1000).
    limit: Option<usize>,
}

async fn barrier(node: &NodeInner, consistency: Option<&str>) -> Result<(), ApiError> {
    match consistency {
        None | Some("linearizable") => Ok(node.read_barrier().await?),
        Some("local") => Ok(()),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("consistency must be `linearizable` or `local`, not {other:?}"),
        )),
    }
}

async fn read_state(
    State(node): State<Arc<NodeInner>>,
    Path(plugin): Path<String>,
    Query(params): Query<ReadParams>,
) -> ApiResult {
    check_name("plugin", &plugin)?;
    barrier(&node, params.consistency.as_deref()).await?;
    let limit = params.limit.unwrap_or(1000);
    let (entries, index) = node
        .with_state(|sm| {
            use crate::state::StateView;
            let entries = sm.kv().view(&plugin).scan(&params.prefix, limit).unwrap_or_default();
            (entries, sm.last_applied())
        })
        .unwrap_or_default();
    let entries: BTreeMap<String, Value> = entries.into_iter().map(|(k, v)| (k, output_json(&v))).collect();
    Ok(Json(json!({ "plugin": plugin, "entries": entries, "applied_index": index })).into_response())
}

async fn run_query(
    State(node): State<Arc<NodeInner>>,
    Path((plugin, query)): Path<(String, String)>,
    Query(params): Query<ReadParams>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_or(body, "payload", node.config.limits.max_payload_bytes)?;
    check_name("plugin", &plugin)?;
    check_name("query", &query)?;
    check_payload(&node, &body)?;
    barrier(&node, params.consistency.as_deref()).await?;
    let outcome = node
        .with_state(|sm| {
            let ctx = Context { index: sm.last_applied(), term: 0, timestamp_ms: 0, caller: "anonymous".into() };
            sm.query(&ctx, &plugin, &query, &body)
        })
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "state unavailable"))?;
    match outcome.result {
        Ok(out) => Ok(Json(json!({ "result": output_json(&out) })).into_response()),
        Err(e) => Err(command_error(&e)),
    }
}

async fn list_plugins(State(node): State<Arc<NodeInner>>) -> ApiResult {
    let plugins = node
        .with_state(|sm| {
            sm.registry()
                .iter()
                .map(|(name, record)| {
                    let info = sm.plugin(name).map(|p| p.info().clone()).unwrap_or_default();
                    (name.clone(), json!({
                        "active": record.active, "activated_at": record.activated_at,
                        "versions": record.versions, "commands": info.commands, "queries": info.queries,
                    }))
                })
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    Ok(Json(json!({ "plugins": plugins })).into_response())
}

#[derive(Deserialize)]
struct UploadParams {
    /// Version label (required): `1.0.0`, `v2`, a git hash.
    version: Option<String>,
    /// Fuel per command (default 100,000,000).
    fuel: Option<u64>,
    /// Linear memory per command, bytes (default 64 MiB).
    memory_bytes: Option<usize>,
}

fn upload_error(e: UploadError) -> ApiError {
    match e {
        UploadError::Invalid(e) => {
            let (status, kind) = match &e {
                LoadError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                LoadError::NotWasm | LoadError::CoreModule | LoadError::Compile { .. } => {
                    (StatusCode::BAD_REQUEST, "invalid_plugin")
                }
                _ => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin"),
            };
            ApiError::new(status, kind, e)
        }
        UploadError::Write(e) => e.into(),
        e @ UploadError::NoQuorum { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", e),
        e @ UploadError::Store(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e),
    }
}

async fn upload_plugin(
    State(node): State<Arc<NodeInner>>,
    Path(name): Path<String>,
    Query(params): Query<UploadParams>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_or(body, "plugin", node.config.limits.max_plugin_bytes)?;
    check_name("plugin", &name)?;
    let version = params
        .version
        .filter(|v| !v.is_empty() && v.len() <= 64 && !v.chars().any(char::is_control))
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "malformed", "`version` query parameter required (1-64 characters)"))?;
    check_size("plugin", body.len(), node.config.limits.max_plugin_bytes)?;
    let defaults = PluginLimits::default();
    let limits = PluginLimits {
        fuel: params.fuel.unwrap_or(defaults.fuel),
        memory_bytes: params.memory_bytes.unwrap_or(defaults.memory_bytes),
        ..defaults
    };
    let (index, response) =
        node.upload(&name, &version, body.to_vec(), limits, "anonymous").await.map_err(upload_error)?;
    let out = applied(response)?;
    Ok((StatusCode::CREATED, Json(json!({ "result": output_json(&out), "index": index }))).into_response())
}

#[derive(Deserialize)]
struct Activate {
    version: String,
}

async fn activate_plugin(
    State(node): State<Arc<NodeInner>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    check_name("plugin", &name)?;
    let Activate { version } = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", format!("expected {{\"version\": \"...\"}}: {e}")))?;
    let response = lifecycle(&node, Op::ActivatePlugin { name: name.clone(), version: version.clone() }).await?;
    if let Some(client) = node.bus.get() {
        crate::bus::notify(client, "plugin.activated", json!({ "plugin": name, "version": version })).await;
    }
    Ok(response)
}

async fn remove_plugin(State(node): State<Arc<NodeInner>>, Path(name): Path<String>) -> ApiResult {
    check_name("plugin", &name)?;
    lifecycle(&node, Op::RemovePlugin { name }).await
}

async fn lifecycle(node: &NodeInner, op: Op) -> ApiResult {
    let (index, response) = node.write(op, "anonymous").await?;
    let out = applied(response)?;
    Ok(Json(json!({ "result": output_json(&out), "index": index })).into_response())
}

async fn cluster(State(node): State<Arc<NodeInner>>) -> ApiResult {
    let metrics = node.raft.metrics().borrow().clone();
    let voters: Vec<u64> = metrics.membership_config.voter_ids().collect();
    let mut nodes = vec![serde_json::to_value(node.status()).unwrap_or_default()];
    for s in node.peer_statuses().await.into_iter().flatten() {
        nodes.push(serde_json::to_value(s).unwrap_or_default());
    }
    let members: BTreeMap<String, Value> = node
        .members()
        .into_iter()
        .map(|(id, info)| (id.to_string(), json!({ "voter": voters.contains(&id), "peer_id": info.peer_id, "p2p": info.p2p_addr, "http": info.http_addr })))
        .collect();
    let (leader_id, leader_http) = node.leader();
    Ok(Json(json!({
        "id": node.id,
        "leader": leader_id,
        "leader_http": leader_http,
        "term": metrics.current_term,
        "state": format!("{:?}", metrics.state),
        "members": members,
        "applied_index": metrics.last_applied.map(|l| l.index),
        "nodes": nodes,
        "divergence": node.shared.divergence.load(std::sync::atomic::Ordering::Relaxed),
        "bus": crate::bus::state(node.bus.get()),
        "events": node.with_state(|sm| {
            let (published_upto, pending, dropped) = sm.outbox_state();
            json!({ "published_upto": published_upto, "pending_commands": pending, "dropped": dropped })
        }),
        "engine": node.artifacts.runtime().fingerprint(),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct AddNode {
    id: u64,
    peer_id: String,
    p2p: String,
    http: String,
}

async fn add_node(State(node): State<Arc<NodeInner>>, body: Bytes) -> ApiResult {
    let req: AddNode = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", format!("expected {{id, peer_id, p2p, http}}: {e}")))?;
    let info = NodeInfo { peer_id: req.peer_id, p2p_addr: req.p2p, http_addr: req.http };
    let index = node.add_node(req.id, info).await?;
    Ok(Json(json!({ "added": req.id, "index": index })).into_response())
}

async fn remove_node(State(node): State<Arc<NodeInner>>, Path(id): Path<u64>) -> ApiResult {
    let index = node.remove_node(id).await?;
    Ok(Json(json!({ "removed": id, "index": index })).into_response())
}

async fn ready(State(node): State<Arc<NodeInner>>) -> Response {
    let metrics = node.raft.metrics().borrow().clone();
    let ready = metrics.current_leader.is_some();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let bus = crate::bus::state(node.bus.get());
    (status, Json(json!({ "ready": ready, "leader": metrics.current_leader, "applied_index": metrics.last_applied.map(|l| l.index), "bus": bus }))).into_response()
}
