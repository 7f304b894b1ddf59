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

pub mod schema;
pub mod tls;
mod watch;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument as _;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::consensus::NodeInfo;
use crate::node::replay::ReplayRequest;
use crate::node::service::{REQUEST_ID_HEADER, check_request_id, output_json};
use crate::node::{Consistency, LimitRequest, NodeInner, Principal, ServiceError};
use crate::replica::auth::Access;
use schema::{ApiDoc, ErrorBody, ReadParams};

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

/// What a node serves while it opens its state and log, before
/// [`router`] takes over: every request is answered 503 `starting` with
/// `Retry-After: 1`. Without it the port is bound but nothing accepts, so a
/// client, a load balancer or a probe waits on its connection for as long
/// as the node takes to start (seconds with a large state) instead of
/// asking another member.
pub fn starting_router() -> Router {
    Router::new().fallback(|| async {
        ApiError(ServiceError {
            retry_after: Some(1),
            ..ServiceError::new(
                503,
                "starting",
                "this node is starting (opening its state and log); retry in a moment or ask another member",
            )
        })
    })
}

/// Serve `app` on `listener`, through TLS when `tls` is set, until `stop`
/// resolves; then let the requests in flight finish.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    app: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    Ok(match tls {
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "http server failed");
            }
        }),
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config)?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                    tracing::error!(error = %e, "https server failed");
                }
            })
        }
    })
}

/// Build the router over a node.
pub fn router(node: Arc<NodeInner>) -> Router {
    let plugin_limit = node.config.limits.max_plugin_bytes;
    let payload_limit = node.config.limits.max_payload_bytes;
    let (routes, _) = api(plugin_limit, payload_limit).split_for_parts();
    routes
        .route_layer(axum::middleware::from_fn(measure))
        .fallback(|| async { ApiError(ServiceError::new(404, "not_found", "no such endpoint")) })
        .layer(axum::middleware::from_fn_with_state(node.clone(), authenticate))
        .with_state(node)
}

/// Every route, declared once: the router serves what these declare and
/// `GET /openapi.json` describes the same declarations.
fn api(plugin_limit: usize, payload_limit: usize) -> OpenApiRouter<Arc<NodeInner>> {
    // A route whose body may be larger than axum's default 2 MiB limit.
    let limited = |(schemas, paths, method): utoipa_axum::router::UtoipaMethodRouter<Arc<NodeInner>>, limit: usize| {
        (schemas, paths, method.layer(DefaultBodyLimit::max(limit + 1)))
    };
    let routes = OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(limited(routes!(run_command), payload_limit))
        .routes(limited(routes!(run_query), payload_limit))
        .routes(routes!(read_state))
        .routes(routes!(list_plugins))
        .routes(limited(routes!(upload_plugin, remove_plugin), plugin_limit))
        .routes(routes!(activate_plugin))
        .routes(routes!(replay_plugin))
        .routes(routes!(plugin_logs))
        .routes(routes!(list_devices))
        .routes(routes!(get_device, put_device, delete_device))
        .routes(routes!(patch_desired))
        .routes(routes!(get_delta))
        .routes(routes!(get_telemetry))
        .routes(routes!(cluster))
        .routes(routes!(digest_at))
        .routes(routes!(divergence))
        .routes(routes!(add_node))
        .routes(routes!(remove_node))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(audit))
        .routes(routes!(backup))
        .routes(routes!(metrics))
        .routes(routes!(watch::watch))
        .routes(routes!(dashboard))
        .routes(routes!(openapi))
        .routes(routes!(health))
        .routes(routes!(ready));
    // The fault battery's control: only in builds with the `faults` feature.
    #[cfg(feature = "faults")]
    let routes = routes.routes(routes!(get_faults, set_faults));
    routes
}

/// The OpenAPI 3.1 document of this build's API, as JSON.
pub fn openapi_document() -> &'static str {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut document = api(0, 0).into_openapi();
        schema::add_missing_examples(&mut document);
        document.to_pretty_json().unwrap_or_default()
    })
}

/// This API's OpenAPI 3.1 document (generated from the handlers' types).
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object,
        example = json!({ "openapi": "3.1.0", "info": { "title": "Synod", "version": "0.1.0" }, "paths": { "/healthz": { "get": { "responses": {} } } } }))))]
async fn openapi() -> Response {
    let mut response = openapi_document().into_response();
    response.headers_mut().insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Routes anyone may call: a load balancer's and a joining node's checks.
/// The dashboard's page is open too: it holds no data, and asks for a token
/// before it fetches any.
const OPEN_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/", "/openapi.json"];

/// The dashboard: one page, embedded in the binary, that reads the same API
/// (`/v1/watch`, `/v1/plugins`, `/v1/devices`) with the token it is given.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard (HTML).
#[utoipa::path(get, path = "/", tag = "operations", security(()),
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String,
        example = "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Synod</title>\n…")))]
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
    let labels = crate::metrics::HttpLabels { route, method, status: response.status().as_u16() };
    m.http_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    m.http_requests.get_or_create(&labels).inc();
    response
}

/// `GET /metrics`: Prometheus (OpenMetrics) text; a reader's token.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics (OpenMetrics text); see the README's Monitoring table",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String,
        example = "# HELP synod_raft_term Raft term.\n# TYPE synod_raft_term gauge\nsynod_raft_term 3\n\
                   # HELP synod_raft_applied_index Last log index applied here.\n# TYPE synod_raft_applied_index gauge\n\
                   synod_raft_applied_index 42\n# EOF\n"), schema::Denied))]
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
    match node.authenticate_caught_up(header).await {
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

fn typed(value: impl serde::Serialize) -> ApiResult {
    Ok(Json(value).into_response())
}

/// Run a command: it is replicated, applied on every node at one log
/// index, and answered with its result once applied here.
#[utoipa::path(post, path = "/v1/commands/{plugin}/{command}", tag = "commands",
    params(("plugin" = String, Path, description = "The plugin's name"), ("command" = String, Path, description = "The command"),
        ("synod-request-id" = Option<String>, Header,
            description = "1–128 visible ASCII characters: a retry with the same id and payload is applied at most once")),
    request_body(description = "The command's payload: any bytes, JSON by convention",
        content((serde_json::Value = "application/json", example = json!({ "by": 2 })), (String = "application/octet-stream"))),
    responses((status = 200, description = "Applied", body = schema::Applied), schema::CommandFailures))]
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
    async move {
        let result = node.submit(&who, &plugin, &command, body.to_vec(), request_id).await;
        crate::telemetry::answered(&tracing::Span::current(), &result);
        let _reply = tracing::info_span!(target: "synod::trace", "reply").entered();
        let (index, out) = result?;
        typed(schema::Applied { result: output_json(&out), index })
    }
    .instrument(crate::telemetry::command_span("http"))
    .await
}

/// A plugin's keys and values.
#[utoipa::path(get, path = "/v1/state/{plugin}", tag = "commands", params(("plugin" = String, Path, description = "The plugin's name"), ReadParams),
    responses((status = 200, description = "The keys", body = schema::StateEntries), schema::ReadFailures))]
async fn read_state(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(plugin): Path<String>,
    Query(params): Query<ReadParams>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let limit = params.limit.unwrap_or(1000);
    let (entries, index) = node.read_state(&who, &plugin, &params.prefix, limit, consistency).await?;
    typed(schema::StateEntries { plugin, entries, applied_index: index })
}

/// Ask a plugin a question: runs on one node, writes nothing.
#[utoipa::path(post, path = "/v1/queries/{plugin}/{query}", tag = "commands",
    params(("plugin" = String, Path, description = "The plugin's name"), ("query" = String, Path, description = "The query"), ReadParams),
    request_body(description = "The query's payload",
        content((serde_json::Value = "application/json", example = json!({})), (String = "application/octet-stream"))),
    responses((status = 200, description = "The answer", body = schema::QueryAnswer), schema::ReadFailures))]
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
    typed(schema::QueryAnswer { result: output_json(&out) })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogParams {
    /// Only lines from operations after this index.
    after: Option<u64>,
    /// At most this many (the latest), default 100.
    limit: Option<usize>,
}

/// What a plugin logged while its commands were applied on this node (the
/// last 2,000 lines), oldest first.
#[utoipa::path(get, path = "/v1/plugins/{name}/logs", tag = "plugins", params(("name" = String, Path, description = "The plugin's name"), LogParams),
    responses((status = 200, description = "The lines", body = schema::PluginLogs), schema::Denied))]
async fn plugin_logs(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(params): Query<LogParams>,
) -> ApiResult {
    who.require(Access::Read)?;
    let limit = params.limit.unwrap_or(100).min(crate::replica::trail::LOG_LINES_KEEP);
    let lines = node.with_replica(|r| r.plugin_logs(&name, params.after.unwrap_or(0), limit)).unwrap_or_default();
    typed(schema::PluginLogs { plugin: name, node: node.id, lines })
}

/// Installed plugins, their versions, the active one and its commands.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins",
    responses((status = 200, description = "The plugins", body = schema::PluginList), schema::Denied))]
async fn list_plugins(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Read)?;
    ok(node.plugins())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadParams {
    /// Version label (required): `1.0.0`, `v2`, a git hash.
    version: Option<String>,
    /// Fuel per command (default 100,000,000; at most `limits.max_plugin_fuel`).
    fuel: Option<u64>,
    /// Linear memory per command, bytes (default 64 MiB; at most
    /// `limits.max_plugin_memory_bytes`).
    memory_bytes: Option<usize>,
}

/// Upload a version of a plugin: validated, stored on a quorum, compiled,
/// then installed at one log index on every node (not activated).
#[utoipa::path(post, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "The plugin's name"), UploadParams),
    request_body(description = "The component", content((schema::WasmComponent = "application/wasm"))),
    responses((status = 201, description = "Installed", body = schema::Applied), schema::ChangeFailures))]
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
    Ok((StatusCode::CREATED, Json(schema::Applied { result: output_json(&out), index })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "version": "2.0.0", "replay": 10000, "require_replay": true }))]
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

/// Make a version the one commands run on, from one log index on every
/// node; optionally after replaying recent commands on it.
#[utoipa::path(post, path = "/v1/plugins/{name}/activate", tag = "plugins", params(("name" = String, Path, description = "The plugin's name")),
    request_body(content = Activate, content_type = "application/json"),
    responses((status = 200, description = "Activated", body = schema::Activated), schema::ChangeFailures))]
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
    typed(schema::Activated { result: output_json(&out), index, replay: report })
}

/// Run a candidate version on the plugin's recent commands, without
/// activating it: the replay gate's report.
#[utoipa::path(post, path = "/v1/plugins/{name}/replay", tag = "plugins", params(("name" = String, Path, description = "The plugin's name")),
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses((status = 200, description = "The report", body = crate::node::replay::ReplayReport), schema::ChangeFailures))]
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
    typed(node.replay(&who, &name, &request).await?)
}

/// Where this node's state parted from each member's, if it did.
#[utoipa::path(get, path = "/v1/divergence", tag = "cluster",
    responses((status = 200, description = "The report", body = schema::DivergenceReport), schema::Denied))]
async fn divergence(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    ok(node.divergence(&who).await?)
}

/// Remove a plugin, its versions and its state, at one log index.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "The plugin's name")),
    responses((status = 200, description = "Removed", body = schema::Applied), schema::ChangeFailures))]
async fn remove_plugin(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult {
    let (index, out) = node.remove(&who, &name).await?;
    typed(schema::Applied { result: output_json(&out), index })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DigestParams {
    /// An operation index (default: the last applied).
    index: Option<u64>,
}

/// This node's state digest after operation `index`, while it is among the
/// recent ones remembered: nodes at different positions compare here.
#[utoipa::path(get, path = "/v1/digest", tag = "cluster", params(DigestParams),
    responses((status = 200, description = "The digest", body = schema::DigestAt),
        (status = 404, description = "`not_found`: no digest remembered at that index", body = ErrorBody), schema::Denied))]
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
        Some((index, digest)) => typed(schema::DigestAt { index, digest, last_applied: last }),
        None => Err(ApiError(ServiceError::new(
            404,
            "not_found",
            format!("no digest remembered at index {:?} (last applied {last})", params.index),
        ))),
    }
}

/// The cluster as this node sees it: leader, term, members, each node's
/// applied index and digest, bus and event state, engine.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "The cluster", body = schema::ClusterView), schema::Denied))]
async fn cluster(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Read)?;
    ok(node.cluster().await)
}

/// The faults in force on this node (`faults` builds only).
#[cfg(feature = "faults")]
#[utoipa::path(get, path = "/v1/faults", tag = "operations",
    responses((status = 200, description = "The faults in force", body = crate::faults::FaultSettings), schema::Denied))]
async fn get_faults(Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Admin)?;
    ok(serde_json::json!(crate::faults::current()))
}

/// Inject (or heal) faults on this node (`faults` builds only).
#[cfg(feature = "faults")]
#[utoipa::path(post, path = "/v1/faults", tag = "operations",
    request_body(content = crate::faults::FaultSettings, content_type = "application/json"),
    responses((status = 200, description = "The faults now in force", body = crate::faults::FaultSettings),
        (status = 400, description = "`malformed`", body = ErrorBody), schema::Denied))]
async fn set_faults(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin)?;
    let settings: crate::faults::FaultSettings = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!(
            "expected {{\"cut\": [ids], \"clock_offset_ms\": n, \"perturb_next_write\": bool, \"lose_next_answer\": bool, \"hold_appends\": bool, \"hold_log_sync\": bool, \"slow_log_sync_ms\": n, \"hold_snapshot_builds\": bool}}: {e}"
        ))
    })?;
    ok(serde_json::json!(node.inject_faults(&settings)))
}

/// Add a node (first as a learner that catches up, then as a voter); it
/// must run the same engine and peer protocol.
#[utoipa::path(post, path = "/v1/cluster/nodes", tag = "cluster",
    request_body(content = schema::AddNode, content_type = "application/json"),
    responses((status = 200, description = "Added", body = schema::NodeAdded), schema::ChangeFailures))]
async fn add_node(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>, body: Bytes) -> ApiResult {
    who.require(Access::Admin)?;
    let req: schema::AddNode = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!(
            "expected {{id, peer_id, p2p, http, engine, protocol}} (the new node's /healthz shows them): {e}"
        ))
    })?;
    node.check_admission(&req.engine, &req.protocol)?;
    let info = NodeInfo { peer_id: req.peer_id, p2p_addr: req.p2p, http_addr: req.http };
    let index = node.add_node(&who, req.id, info).await?;
    typed(schema::NodeAdded { added: req.id, index })
}

/// Remove a node from the cluster.
#[utoipa::path(delete, path = "/v1/cluster/nodes/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "The node id")),
    responses((status = 200, description = "Removed", body = schema::NodeRemoved), schema::ChangeFailures))]
async fn remove_node(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<u64>,
) -> ApiResult {
    let index = node.remove_node(&who, id).await?;
    typed(schema::NodeRemoved { removed: id, index })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
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

/// A device's shadow: desired, reported, delta, owner, version.
#[utoipa::path(get, path = "/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "The device id"), DeviceParams),
    responses((status = 200, description = "The shadow (`ETag`: its version)", body = schema::DeviceAnswer), schema::ReadFailures))]
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

/// Desired fields the device does not report yet.
#[utoipa::path(get, path = "/v1/devices/{id}/delta", tag = "devices", params(("id" = String, Path, description = "The device id"), DeviceParams),
    responses((status = 200, description = "The delta", body = schema::DeviceDelta), schema::ReadFailures))]
async fn get_delta(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<DeviceParams>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let doc = node.device_get(&who, &id, consistency).await?;
    typed(schema::DeviceDelta {
        id,
        delta: doc["delta"].clone(),
        version: doc["version"].as_u64().unwrap_or(0),
        desired_version: doc["desired_version"].as_u64().unwrap_or(0),
    })
}

/// Define a device, or change its definition.
#[utoipa::path(put, path = "/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "The device id")),
    request_body(content = schema::DeviceDefinition, content_type = "application/json"),
    responses((status = 200, description = "The shadow (`ETag`: its version)", body = schema::DeviceAnswer), schema::ChangeFailures))]
async fn put_device(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let (index, doc) = node.device_put(&who, &id, &body).await?;
    versioned(index, doc)
}

/// Remove a device.
#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "The device id"), DeviceParams, ("if-match" = Option<String>, Header, description = "The version the caller read, quoted")),
    responses((status = 200, description = "Removed", body = schema::Applied), schema::ChangeFailures))]
async fn delete_device(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(params): Query<DeviceParams>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    let expected = expected_version(&params, &headers)?;
    let (index, result) = node.device_delete(&who, &id, expected).await?;
    typed(schema::Applied { result, index })
}

/// Change what operators want of a device (a JSON merge patch on
/// `desired`); its driver acts on the delta.
#[utoipa::path(patch, path = "/v1/devices/{id}/desired", tag = "devices",
    params(("id" = String, Path, description = "The device id"), DeviceParams, ("if-match" = Option<String>, Header, description = "The version the caller read, quoted")),
    request_body(description = "Fields to set (null removes one)", content((Object = "application/json")),
        example = json!({ "setpoint": 22.5 })),
    responses((status = 200, description = "The shadow (`ETag`: its version)", body = schema::DeviceAnswer), schema::ChangeFailures))]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListDevices {
    /// Only ids with this prefix.
    #[serde(default)]
    prefix: String,
    /// At most this many (default 1000).
    limit: Option<usize>,
    /// `linearizable` (default) or `local`.
    consistency: Option<String>,
}

/// Device shadows by id.
#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(ListDevices),
    responses((status = 200, description = "The shadows", body = schema::DeviceList), schema::ReadFailures))]
async fn list_devices(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Query(params): Query<ListDevices>,
) -> ApiResult {
    let consistency = Consistency::parse(params.consistency.as_deref())?;
    let (devices, index) = node.device_list(&who, &params.prefix, params.limit.unwrap_or(1000), consistency).await?;
    ok(json!({ "devices": devices, "applied_index": index }))
}

/// Whether this node can serve (503 until it knows a leader).
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, description = "Ready", body = schema::Readiness),
        (status = 503, description = "Not ready (no leader, failed storage, or no first token yet)", body = schema::Readiness)))]
async fn ready(State(node): State<Arc<NodeInner>>) -> Response {
    let (ready, body) = node.ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// The latest reading of each of a device's metrics this node has heard of,
/// from its own drivers or a member's gossip: `{"device", "metrics":
/// {"<metric>": {"v", "ts_ms", "node", "epoch"}}}`. 404 for a device with
/// no readings that this node's state does not know either.
#[utoipa::path(get, path = "/v1/devices/{id}/telemetry", tag = "devices", params(("id" = String, Path, description = "The device id")),
    responses((status = 200, description = "The readings", body = schema::DeviceTelemetry), schema::ReadFailures))]
async fn get_telemetry(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    who.require(Access::Read)?;
    let metrics = node.telemetry.device(&id);
    if metrics.is_empty() {
        // No readings yet: a 404 only for a device the cluster does not
        // know, not one defined a moment ago that this node has yet to apply.
        node.device_get(&who, &id, Consistency::Linearizable).await?;
    }
    typed(schema::DeviceTelemetry { device: id, metrics })
}

/// Liveness, and who this node is: what `POST /v1/cluster/nodes` needs to
/// add it (its id, key, addresses, engine fingerprint and protocol).
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "Alive", body = schema::Health)))]
async fn health(State(node): State<Arc<NodeInner>>) -> ApiResult {
    typed(schema::Health {
        status: "ok".into(),
        id: node.id,
        peer_id: node.p2p.local_peer_id().to_string(),
        p2p: node.p2p_addr.to_string(),
        http: node.http_addr.to_string(),
        engine: node.artifacts.runtime().fingerprint().hash.clone(),
        protocol: crate::node::PROTOCOL_VERSION.to_string(),
    })
}

/// Create a token; its secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "security",
    request_body(content = schema::NewToken, content_type = "application/json"),
    responses((status = 201, description = "Created", body = schema::CreatedToken), schema::ChangeFailures))]
async fn create_token(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    who.require(Access::Admin)?;
    let req: schema::NewToken = serde_json::from_slice(&body).map_err(|e| {
        ServiceError::bad_request(format!("expected {{\"principal\": \"...\", \"roles\": [...]}}: {e}"))
    })?;
    let (index, mut record) = node.token_create(&who, &req.principal, &req.roles).await?;
    record["index"] = json!(index);
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

/// Every token's public record (never a hash or a secret).
#[utoipa::path(get, path = "/v1/tokens", tag = "security",
    responses((status = 200, description = "The tokens", body = schema::TokenList), schema::Denied))]
async fn list_tokens(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    ok(node.token_list(&who)?)
}

/// Revoke a token by id, or every token of a principal.
#[utoipa::path(delete, path = "/v1/tokens/{target}", tag = "security",
    params(("target" = String, Path, description = "A token id or a principal")),
    responses((status = 200, description = "Revoked", body = schema::Revoked), schema::ChangeFailures))]
async fn revoke_token(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Path(target): Path<String>,
) -> ApiResult {
    let (index, mut out) = node.token_revoke(&who, &target).await?;
    out["index"] = json!(index);
    ok(out)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// Only records after this operation index.
    #[serde(default)]
    after: u64,
    /// At most this many (default 1000).
    limit: Option<usize>,
}

/// A backup: the replicated state at one log index (every write
/// acknowledged before this request is in it), with every plugin's bytes,
/// the device shadows and the tokens, in the format `synod restore` reads
/// (see the README's "Backup and restore"). Writes go on while it is taken.
#[utoipa::path(get, path = "/v1/backup", tag = "cluster",
    responses((status = 200, description = "The backup file (`Synod-Backup-Index`, `Synod-Backup-Digest`: its operation index and digest)",
        content_type = "application/octet-stream", body = String), schema::ReadFailures))]
async fn backup(State(node): State<Arc<NodeInner>>, Extension(who): Extension<Principal>) -> ApiResult {
    who.require(Access::Admin)?;
    node.read_barrier().await.map_err(ServiceError::from)?;
    let image = crate::consensus::state_machine::backup_image(&node.shared, &node.artifacts)
        .await
        .map_err(|e| ServiceError::new(500, "internal", format!("taking the backup: {e}")))?;
    let header = crate::backup::BackupHeader {
        format: 1,
        cluster: crate::backup::cluster_id(node.config.network_key.as_deref()),
        node: node.id,
        log_index: image.log_id.map_or(0, |l| l.index),
        operation_index: image.operation_index,
        digest: hex::encode(image.digest),
        engine: node.artifacts.runtime().fingerprint().hash.clone(),
        created_at_ms: crate::node::now_ms(),
        plugins: image.plugins,
        devices: image.devices,
        state_bytes: image.size,
    };
    let (index, digest) = (header.operation_index, header.digest.clone());
    // Streamed as the state is encoded, never a whole copy of it.
    let stream = backup_stream(crate::backup::preamble(&header), image.size, image.pieces);
    let mut response = axum::body::Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"synod-{index}.backup\"")) {
        headers.insert(axum::http::header::CONTENT_DISPOSITION, v);
    }
    headers.insert("synod-backup-index", HeaderValue::from(index));
    if let Ok(v) = HeaderValue::from_str(&digest) {
        headers.insert("synod-backup-digest", v);
    }
    node.audit_note(&who, "backup", &index.to_string()).await;
    Ok(response)
}

/// A backup's bytes: the preamble, the state's pieces as they are encoded
/// (`size` bytes in all), then the checksum line over both, hashed as the
/// pieces go. An encoding error, or a state of another size, ends the
/// body with an error (the client sees it cut short).
fn backup_stream(
    preamble: Vec<u8>,
    size: u64,
    pieces: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use futures::StreamExt as _;
    struct Sending {
        pieces: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
        /// None once the body has ended.
        hasher: Option<blake3::Hasher>,
        left: u64,
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&preamble);
    let state = Sending { pieces, hasher: Some(hasher), left: size };
    let rest = futures::stream::unfold(state, move |mut s| async move {
        let hasher = s.hasher.as_mut()?;
        let item = match s.pieces.recv().await {
            Some(Ok(piece)) if piece.len() as u64 <= s.left => {
                s.left -= piece.len() as u64;
                hasher.update(&piece);
                return Some((Ok(piece), s));
            }
            Some(Ok(_)) => Err(std::io::Error::other(format!("the state outgrew its announced {size} bytes"))),
            Some(Err(e)) => Err(e),
            None if s.left == 0 => Ok(Bytes::from(crate::backup::trailer(&hasher.finalize()))),
            None => Err(std::io::Error::other(format!("the state ended {} bytes short", s.left))),
        };
        if let Err(e) = &item {
            tracing::warn!(error = %e, "a backup was cut short");
        }
        s.hasher = None;
        Some((item, s))
    });
    futures::stream::once(std::future::ready(Ok(Bytes::from(preamble)))).chain(rest)
}

/// The audit trail: who changed what, when.
#[utoipa::path(get, path = "/v1/audit", tag = "security", params(AuditParams),
    responses((status = 200, description = "The records", body = schema::AuditTrail), schema::ReadFailures))]
async fn audit(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Query(params): Query<AuditParams>,
) -> ApiResult {
    ok(node.audit(&who, params.after, params.limit.unwrap_or(1000)).await?)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// What the router serves, from its own account of itself (axum's
    /// `Debug` output: each route id's path and allowed methods), without
    /// `HEAD` (axum answers it for every `GET`).
    fn served(router: &axum::Router<std::sync::Arc<crate::node::NodeInner>>) -> BTreeSet<(String, String)> {
        let text = format!("{router:?}");
        // The routes, not the fallback router after them.
        let text = text.split(", fallback_router:").next().unwrap_or("");
        let mut methods = BTreeMap::new();
        for part in text.split("RouteId(").skip(1) {
            let Some((id, rest)) = part.split_once(')') else { continue };
            if let Some(rest) = rest.strip_prefix(": MethodRouter(")
                && let Some(allow) = rest.split("allow_header: Bytes(b\"").nth(1)
                && let Some((allow, _)) = allow.split_once('"')
            {
                methods.insert(id.to_owned(), allow.to_owned());
            }
        }
        let mut routes = BTreeSet::new();
        for part in text.split("RouteId(").skip(1) {
            let Some((id, rest)) = part.split_once(')') else { continue };
            if let Some(path) = rest.strip_prefix(": \"").and_then(|r| r.split_once('"')).map(|(p, _)| p) {
                for method in methods.get(id).map(String::as_str).unwrap_or("").split(',') {
                    if !method.is_empty() && method != "HEAD" {
                        routes.insert((method.to_owned(), path.to_owned()));
                    }
                }
            }
        }
        routes
    }

    /// Every route the router serves is in `/openapi.json`, with the same
    /// methods, and the document names no route the router lacks.
    #[test]
    fn the_document_describes_exactly_the_routes_served() {
        let (router, _) = super::api(1, 1).split_for_parts();
        let served = served(&router);
        let document: serde_json::Value = serde_json::from_str(super::openapi_document()).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch", "options", "head", "trace"].contains(&method.as_str()) {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        assert!(served.len() >= 30, "could not read the router's routes: {served:?}");
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(missing.is_empty(), "served but not documented: {missing:?}");
        assert!(extra.is_empty(), "documented but not served: {extra:?}");
    }

    /// A route added to the router outside the documented declarations is
    /// caught by the comparison above.
    #[test]
    fn an_undocumented_route_is_noticed() {
        let (router, _) = super::api(1, 1).split_for_parts();
        let router = router.route("/v1/secret", axum::routing::get(|| async { "" }));
        assert!(served(&router).contains(&("GET".to_owned(), "/v1/secret".to_owned())));
    }

    /// Every schema the document names has an example, and so has every
    /// request and response body but a binary one, on its media type, its
    /// schema or the schema its `$ref` names. (`tests/cluster/openapi.rs`
    /// checks that each example fits its schema.)
    #[test]
    fn every_schema_and_body_has_an_example() {
        use serde_json::Value;
        let document: Value = serde_json::from_str(super::openapi_document()).unwrap();
        let has = |v: &Value| {
            v.get("example").is_some()
                || v["examples"].as_array().is_some_and(|e| !e.is_empty())
                || v["examples"].as_object().is_some_and(|e| !e.is_empty())
        };
        let schemas = document["components"]["schemas"].as_object().unwrap();
        assert!(schemas.len() >= 40, "could not read the schemas: {schemas:?}");
        let mut missing: Vec<String> =
            schemas.iter().filter(|(_, s)| !has(s)).map(|(name, _)| format!("the schema {name}")).collect();
        let mut bodies = 0;
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let mut each = vec![("request".to_owned(), &operation["requestBody"])];
                for (status, response) in operation["responses"].as_object().into_iter().flatten() {
                    each.push((format!("response {status}"), response));
                }
                for (which, body) in each {
                    for (media, content) in body["content"].as_object().into_iter().flatten() {
                        bodies += 1;
                        let schema = &content["schema"];
                        let named = schema["$ref"]
                            .as_str()
                            .and_then(|r| r.strip_prefix("#/components/schemas/"))
                            .and_then(|name| schemas.get(name));
                        let mime = media.split(';').next().unwrap_or("").trim();
                        let binary = matches!(mime, "application/octet-stream" | "application/wasm")
                            || schema["format"] == "binary";
                        if !(has(content) || has(schema) || named.is_some_and(has) || binary) {
                            missing.push(format!("{} {path} {which} ({media})", method.to_uppercase()));
                        }
                    }
                }
            }
        }
        assert!(bodies >= 100, "could not read the bodies ({bodies})");
        assert!(missing.is_empty(), "without an example: {missing:#?}");
    }
}
