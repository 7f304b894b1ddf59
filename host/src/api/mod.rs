//! HTTP API (axum): requests in from operators and tools.
//!
//! In: JSON over HTTP. Out: calls into the node's transport-neutral service
//! ([`crate::node::service`]) and JSON answers. Every error is JSON
//! `{"error": "...", "kind": "..."}` with the status the service names: 400
//! malformed, 404 unknown plugin or command, 409 conflict, 413 too large,
//! 422 rejected by the handler, 429 overloaded (with `Retry-After`), 503 no
//! leader (with the leader's address when known), 401 without a valid
//! bearer token, 403 when the token lacks the role (named in the error).
//!
//! Every route but `/healthz` and `/readyz` goes through [`authenticate`],
//! which turns the `Authorization: Bearer` header into the request's
//! [`Principal`]; the service checks what that principal may do.

pub mod tls;
mod watch;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::consensus::NodeInfo;
use crate::node::replay::ReplayRequest;
use crate::node::service::{REQUEST_ID_HEADER, check_request_id, output_json};
use crate::node::{Consistency, LimitRequest, NodeInner, Principal, ServiceError};
use crate::replica::auth::Access;

/// An API error: a [`ServiceError`] as an HTTP response.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.0.body())).into_response();
        if let Some(secs) = self.0.retry_after {
            response.headers_mut().insert("retry-after", HeaderValue::from(secs));
        }
        if self.0.status == 401 {
            response.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer realm=\"synod\""));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// Build the router over a node.
pub fn router(node: Arc<NodeInner>) -> Router {
    let plugin_limit = node.config.limits.max_plugin_bytes;
    let payload_limit = node.config.limits.max_payload_bytes;
    let routes = Router::new()
        .route("/v1/commands/{plugin}/{command}", post(run_command).layer(DefaultBodyLimit::max(payload_limit + 1)))
        .route("/v1/queries/{plugin}/{query}", post(run_query).layer(DefaultBodyLimit::max(payload_limit + 1)))
        .route("/v1/state/{plugin}", get(read_state))
        .route("/v1/plugins", get(list_plugins))
        .route(
            "/v1/plugins/{name}",
            post(upload_plugin).delete(remove_plugin).layer(DefaultBodyLimit::max(plugin_limit + 1)),
        )
        .route("/v1/plugins/{name}/activate", post(activate_plugin))
        .route("/v1/plugins/{name}/replay", post(replay_plugin))
        .route("/v1/plugins/{name}/logs", get(plugin_logs))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", get(get_device).put(put_device).delete(delete_device))
        .route("/v1/devices/{id}/desired", axum::routing::patch(patch_desired))
        .route("/v1/devices/{id}/delta", get(get_delta))
        .route("/v1/devices/{id}/telemetry", get(get_telemetry))
        .route("/v1/cluster", get(cluster))
        .route("/v1/digest", get(digest_at))
        .route("/v1/divergence", get(divergence))
        .route("/v1/cluster/nodes", post(add_node))
        .route("/v1/cluster/nodes/{id}", delete(remove_node))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{target}", delete(revoke_token))
        .route("/v1/audit", get(audit))
        .route("/metrics", get(metrics))
        .route("/v1/watch", get(watch::watch))
        .route("/", get(dashboard))
        .route("/healthz", get(health))
        .route("/readyz", get(ready));
    // The fault battery's control: only in builds with the `faults` feature.
    #[cfg(feature = "faults")]
    let routes = routes.route("/v1/faults", get(get_faults).post(set_faults));
    routes
        .route_layer(axum::middleware::from_fn(measure))
        .fallback(|| async { ApiError(ServiceError::new(404, "not_found", "no such endpoint")) })
        .layer(axum::middleware::from_fn_with_state(node.clone(), authenticate))
        .with_state(node)
}

/// Routes anyone may call: a load balancer's and a joining node's checks.
/// The dashboard's page is open too: it holds no data, and asks for a token
/// before it fetches any.
const OPEN_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/"];

/// The dashboard: one page, embedded in the binary, that reads the same API
/// (`/v1/watch`, `/v1/plugins`, `/v1/devices`) with the token it is given.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    let mut response = axum::response::Html(DASHBOARD).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    headers.insert(axum::http::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Count and time each routed request by its route's pattern (so the
/// label set stays as small as the router).
async fn measure(request: Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let m = crate::metrics::get();
    m.http_seconds
        .get_or_create(&crate::metrics::RouteLabels { route: route.clone(), method: method.clone() })
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&crate::metrics::HttpLabels { route, method, status: response.status().as_u16() })
        .inc();
    response
}

/// `GET /metrics`: Prometheus (OpenMetrics) text; a reader's token.
async fn metrics(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Read)?;
    let mut response = node.metrics_text().into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

/// Who is asking: the request's [`Principal`] from its bearer token (401
/// when there is none or it is not valid), put in the request's extensions
/// for the handlers.
async fn authenticate(
    State(node): State<Arc<NodeInner>>,
    mut request: Request,
    next: axum::middleware::Next,
) -> Response {
    if OPEN_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let header = request.headers().get(axum::http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    match node.authenticate(header) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(e) => {
            crate::metrics::get().http_unauthenticated.inc();
            // The body was not read: hyper closes the connection after this
            // answer, so say so, or a client may send its next request on a
            // connection that is closing and see it fail.
            let mut response = ApiError(e).into_response();
            response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// The body, or a JSON 413/400 for one axum refused to read.
fn body_or(body: Result<Bytes, BytesRejection>, what: &str, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        ApiError(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServiceError::new(413, "too_large", format!("{what} is over the limit of {limit} bytes"))
        } else {
            ServiceError::bad_request(e.body_text())
        })
    })
}

fn ok(value: serde_json::Value) -> ApiResult {
    Ok(Json(value).into_response())
}

async fn run_command(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path((plugin, command)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_or(body, "payload", node.config.limits.max_payload_bytes)?;
    let request_id = match headers.get(REQUEST_ID_HEADER) {
        None => None,
        Some(v) => Some(check_request_id(v.to_str().unwrap_or(""))?),
    };
    let (index, out) = node.submit(&who, &plugin, &command, body.to_vec(), request_id).await?;
    ok(json!({ "result": output_json(&out), "index": index }))
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

async fn read_state(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(plugin): Path<String>,
    Query(params): Query<ReadParams>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let limit = params.limit.unwrap_or(1000);
    let (entries, index) = node.read_state(&who, &plugin, &params.prefix, limit, consistency).await?;
    ok(json!({ "plugin": plugin, "entries": entries, "applied_index": index }))
}

async fn run_query(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path((plugin, query)): Path<(String, String)>,
    Query(params): Query<ReadParams>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_or(body, "payload", node.config.limits.max_payload_bytes)?;
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let out = node.query(&who, &plugin, &query, body.to_vec(), consistency).await?;
    ok(json!({ "result": output_json(&out) }))
}

#[derive(Deserialize)]
struct LogParams {
    /// Only lines from operations after this index.
    after: Option<u64>,
    /// At most this many (the latest), default 100.
    limit: Option<usize>,
}

/// What a plugin logged while its commands were applied on this node (the
/// last 2,000 lines), oldest first.
async fn plugin_logs(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(params): Query<LogParams>,
) -> ApiResult {
    who.require(Access::Read)?;
    let limit = params.limit.unwrap_or(100).min(crate::replica::trail::LOG_LINES_KEEP);
    let lines = node.with_replica(|r| r.plugin_logs(&name, params.after.unwrap_or(0), limit)).unwrap_or_default();
    ok(json!({ "plugin": name, "node": node.id, "lines": lines }))
}

async fn list_plugins(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Read)?;
    ok(node.plugins())
}

#[derive(Deserialize)]
struct UploadParams {
    /// Version label (required): `1.0.0`, `v2`, a git hash.
    version: Option<String>,
    /// Fuel per command (default 100,000,000; at most `limits.max_plugin_fuel`).
    fuel: Option<u64>,
    /// Linear memory per command, bytes (default 64 MiB; at most
    /// `limits.max_plugin_memory_bytes`).
    memory_bytes: Option<usize>,
}

async fn upload_plugin(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(params): Query<UploadParams>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_or(body, "plugin", node.config.limits.max_plugin_bytes)?;
    let version = params.version.unwrap_or_default();
    let limits = LimitRequest { fuel: params.fuel, memory_bytes: params.memory_bytes };
    let (index, out) = node.upload(&who, &name, &version, body.to_vec(), limits).await?;
    Ok((StatusCode::CREATED, Json(json!({ "result": output_json(&out), "index": index }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Activate {
    version: String,
    /// Replay this many recent commands on the version first, and report.
    #[serde(default)]
    replay: Option<usize>,
    /// Refuse to activate unless the replay passes.
    #[serde(default)]
    require_replay: bool,
    /// With `require_replay`: pass only on identical outputs.
    #[serde(default)]
    identical: bool,
}

async fn activate_plugin(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin)?;
    let Activate { version, replay, require_replay, identical } = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!(
            "expected {{\"version\": \"...\", \"replay\": n, \"require_replay\": bool, \"identical\": bool}}: {e}"
        ))
    })?;
    if require_replay && replay.is_none() {
        return Err(ServiceError::bad_request("require_replay needs replay: how many commands to replay").into());
    }
    let report = match replay {
        Some(commands) => {
            let request = ReplayRequest { version: version.clone(), commands, identical };
            let report = node.replay(&who, &name, &request).await?;
            if require_replay && !report.passed {
                let mut error = ServiceError::new(
                    409,
                    "replay_failed",
                    format!("not activated: {}; see `replay` for the differences", report.summary()),
                );
                error.extra.insert("replay".into(), json!(report));
                return Err(error.into());
            }
            Some(report)
        }
        None => None,
    };
    let (index, out) = node.activate(&who, &name, &version).await?;
    let mut body = json!({ "result": output_json(&out), "index": index });
    if let Some(report) = report {
        body["replay"] = json!(report);
    }
    ok(body)
}

/// Run a candidate version on the plugin's recent commands, without
/// activating it: the replay gate's report.
async fn replay_plugin(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let request: ReplayRequest = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!(
            "expected {{\"version\": \"...\", \"commands\": n, \"identical\": bool}}: {e}"
        ))
    })?;
    ok(json!(node.replay(&who, &name, &request).await?))
}

/// Where this node's state parted from each member's, if it did.
async fn divergence(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    ok(node.divergence(&who).await?)
}

async fn remove_plugin(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult {
    let (index, out) = node.remove(&who, &name).await?;
    ok(json!({ "result": output_json(&out), "index": index }))
}

#[derive(Deserialize)]
struct DigestParams {
    /// An operation index (default: the last applied).
    index: Option<u64>,
}

/// This node's state digest after operation `index`, while it is among the
/// recent ones remembered: nodes at different positions compare here.
async fn digest_at(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Query(params): Query<DigestParams>,
) -> ApiResult {
    who.require(Access::Read)?;
    let (last, digest) = node
        .with_replica(|r| {
            let index = params.index.unwrap_or(r.last_applied());
            (r.last_applied(), r.digest_at(index).map(|d| (index, d.to_hex())))
        })
        .unwrap_or((0, None));
    match digest {
        Some((index, digest)) => ok(json!({ "index": index, "digest": digest, "last_applied": last })),
        None => Err(ApiError(ServiceError::new(
            404,
            "not_found",
            format!("no digest remembered at index {:?} (last applied {last})", params.index),
        ))),
    }
}

async fn cluster(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Read)?;
    ok(node.cluster().await)
}

/// The faults in force on this node (`faults` builds only).
#[cfg(feature = "faults")]
async fn get_faults(Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Admin)?;
    ok(serde_json::json!(crate::faults::current()))
}

/// Inject (or heal) faults on this node (`faults` builds only).
#[cfg(feature = "faults")]
async fn set_faults(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin)?;
    let settings: crate::faults::FaultSettings = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!(
            "expected {{\"cut\": [ids], \"clock_offset_ms\": n, \"perturb_next_write\": bool, \"lose_next_answer\": bool, \"hold_appends\": bool}}: {e}"
        ))
    })?;
    ok(serde_json::json!(node.inject_faults(&settings)))
}

#[derive(Deserialize)]
struct AddNode {
    id: u64,
    peer_id: String,
    p2p: String,
    http: String,
    /// The joining node's engine fingerprint hash (its `/healthz` shows
    /// it): a node whose engine differs would apply plugins differently.
    engine: String,
    /// Its peer protocol version (also in its `/healthz`).
    protocol: String,
}

async fn add_node(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>, body: Bytes) -> ApiResult {
    who.require(Access::Admin)?;
    let req: AddNode = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!(
            "expected {{id, peer_id, p2p, http, engine, protocol}} (the new node's /healthz shows them): {e}"
        ))
    })?;
    node.check_admission(&req.engine, &req.protocol)?;
    let info = NodeInfo { peer_id: req.peer_id, p2p_addr: req.p2p, http_addr: req.http };
    let index = node.add_node(&who, req.id, info).await?;
    ok(json!({ "added": req.id, "index": index }))
}

async fn remove_node(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<u64>,
) -> ApiResult {
    let index = node.remove_node(&who, id).await?;
    ok(json!({ "removed": id, "index": index }))
}

#[derive(Deserialize)]
struct DeviceParams {
    /// `linearizable` (default) or `local`.
    consistency: Option<String>,
    /// Compare-and-set on the document version (also `If-Match`).
    expected_version: Option<u64>,
}

/// `expected_version` from the query, or an `If-Match: "<version>"` header.
fn expected_version(params: &DeviceParams, headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    if let Some(v) = params.expected_version {
        return Ok(Some(v));
    }
    match headers.get("if-match") {
        None => Ok(None),
        Some(v) => {
            let text = v.to_str().unwrap_or("").trim().trim_matches('"');
            text.parse().map(Some).map_err(|_| {
                ApiError(ServiceError::bad_request(format!("If-Match {text:?} is not a document version")))
            })
        }
    }
}

fn versioned(index: u64, doc: serde_json::Value) -> ApiResult {
    let etag = doc.get("version").and_then(serde_json::Value::as_u64);
    let mut response = Json(json!({ "device": doc, "index": index })).into_response();
    if let Some(v) = etag
        && let Ok(h) = HeaderValue::from_str(&format!("\"{v}\""))
    {
        response.headers_mut().insert("etag", h);
    }
    Ok(response)
}

async fn get_device(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<DeviceParams>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let doc = node.device_get(&who, &id, consistency).await?;
    versioned(0, doc)
}

async fn get_delta(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<DeviceParams>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let doc = node.device_get(&who, &id, consistency).await?;
    ok(json!({ "id": id, "delta": doc["delta"], "version": doc["version"], "desired_version": doc["desired_version"] }))
}

async fn put_device(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let (index, doc) = node.device_put(&who, &id, &body).await?;
    versioned(index, doc)
}

async fn delete_device(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<DeviceParams>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    let expected = expected_version(&params, &headers)?;
    let (index, out) = node.device_delete(&who, &id, expected).await?;
    ok(json!({ "result": out, "index": index }))
}

async fn patch_desired(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<DeviceParams>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult {
    let expected = expected_version(&params, &headers)?;
    let (index, doc) = node.device_patch_desired(&who, &id, &body, expected).await?;
    versioned(index, doc)
}

#[derive(Deserialize)]
struct ListDevices {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
    consistency: Option<String>,
}

async fn list_devices(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Query(params): Query<ListDevices>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let (devices, index) = node.device_list(&who, &params.prefix, params.limit.unwrap_or(1000), consistency).await?;
    ok(json!({ "devices": devices, "applied_index": index }))
}

async fn ready(State(node): State<Arc<NodeInner>>) -> Response {
    let (ready, body) = node.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// The latest reading of each of a device's metrics this node has heard of,
/// from its own drivers or a member's gossip: `{"device", "metrics":
/// {"<metric>": {"v", "ts_ms", "node", "epoch"}}}`. 404 for a device with
/// no readings that this node's state does not know either.
async fn get_telemetry(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require(Access::Read)?;
    let metrics = node.telemetry.device(&id);
    if metrics.is_empty() {
        node.device_get(&who, &id, Consistency::Local).await?;
    }
    ok(json!({ "device": id, "metrics": metrics }))
}

/// Liveness, and who this node is: what `POST /v1/cluster/nodes` needs to
/// add it (its id, key, addresses, engine fingerprint and protocol).
async fn health(State(node): State<Arc<NodeInner>>) -> ApiResult {
    ok(json!({
        "status": "ok",
        "id": node.id,
        "peer_id": node.p2p.local_peer_id().to_string(),
        "p2p": node.p2p_addr.to_string(),
        "http": node.http_addr.to_string(),
        "engine": node.artifacts.runtime().fingerprint().hash,
        "protocol": crate::node::PROTOCOL_VERSION,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Who will hold it.
    principal: String,
    /// `admin`, `operator`, `reader`, `operator:<plugin>`, `reader:<plugin>`.
    roles: Vec<String>,
}

async fn create_token(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin)?;
    let req: NewToken = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!("expected {{\"principal\": \"...\", \"roles\": [...]}}: {e}"))
    })?;
    let (index, mut record) = node.token_create(&who, &req.principal, &req.roles).await?;
    record["index"] = json!(index);
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

async fn list_tokens(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    ok(node.token_list(&who)?)
}

async fn revoke_token(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(target): Path<String>,
) -> ApiResult {
    let (index, mut out) = node.token_revoke(&who, &target).await?;
    out["index"] = json!(index);
    ok(out)
}

#[derive(Deserialize)]
struct AuditParams {
    /// Only records after this operation index.
    #[serde(default)]
    after: u64,
    /// At most this many (default 1000).
    limit: Option<usize>,
}

async fn audit(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Query(params): Query<AuditParams>,
) -> ApiResult {
    ok(node.audit(&who, params.after, params.limit.unwrap_or(1000)).await?)
}
