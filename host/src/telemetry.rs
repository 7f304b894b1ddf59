//! Logs and traces: the node's `tracing` subscriber, and the optional OTLP
//! export of each command's trace (`[telemetry]`, off by default).
//!
//! A command's trace, on the node that took it:
//!
//! - `command` (the root): transport, plugin, command, caller, and the
//!   operation `index` and `status` once answered;
//!   - `propose`: from the write queue until the entry is applied here
//!     (`log_index`, `batch`: the writes in that entry; `leader`: where
//!     it was proposed);
//!     - `commit`: from the proposal to openraft until the entry was
//!       committed (the leader's append and fsync, replication, a quorum's
//!       fsyncs): when the state machine was handed it;
//!     - `apply`: the state machine applying the entry on this node;
//!   - `reply`: building the answer.
//!
//! `commit` and `apply` happen in openraft's tasks and the apply thread,
//! not in the request's; they are recorded with the times they were seen
//! (a ring of recent entries, [`record_proposed`] / [`record_applied`]) and
//! added to the request's trace when it is answered. On a follower that
//! forwarded the write, `propose` covers the round trip to the leader and
//! `apply` is this node's own apply of the entry, when it came first.
//!
//! Nothing here feeds back into apply: timing is read from the wall clock
//! on the side, never from or into the replicated state.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `[telemetry]`: where to send traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector's base URL (`http://127.0.0.1:4318`); traces
    /// go to `<url>/v1/traces`. None (the default): no export.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (the default) or `http/json`.
    pub protocol: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Share of commands traced, 0.0–1.0 (default 1.0).
    pub sample_ratio: f64,
    /// Headers to send with each export (an API key).
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            protocol: "http/protobuf".into(),
            service_name: "synod".into(),
            sample_ratio: 1.0,
            headers: Default::default(),
        }
    }
}

impl TelemetryConfig {
    /// Whether nothing is set (the section is then left out of a written
    /// config).
    pub fn is_default(&self) -> bool {
        *self == TelemetryConfig::default()
    }
}

/// Errors setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting that cannot work.
    #[error("[telemetry] {0}")]
    Config(String),
    /// The exporter could not be built.
    #[error("[telemetry] the OTLP exporter: {0}")]
    Exporter(String),
}

/// Flushes and stops the exporter when the node stops.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Send what is still buffered, and stop.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }
}

/// Whether traces are exported: the stage timings are kept only then.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Logs to stderr, filtered by `RUST_LOG`, for commands and tools.
pub fn init_logs() {
    let _ = tracing_subscriber::registry().with(log_layer()).try_init();
}

fn log_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(EnvFilter::from_default_env())
}

/// A node's subscriber: logs as [`init_logs`], and with an OTLP endpoint
/// configured, command traces exported to it. Call inside the runtime.
pub fn init_node(config: &TelemetryConfig, node_id: u64) -> Result<Telemetry, TelemetryError> {
    let Some(endpoint) = &config.otlp_endpoint else {
        init_logs();
        return Ok(Telemetry { provider: None });
    };
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    let protocol = match config.protocol.as_str() {
        "http/protobuf" => opentelemetry_otlp::Protocol::HttpBinary,
        "http/json" => opentelemetry_otlp::Protocol::HttpJson,
        other => return Err(TelemetryError::Config(format!("protocol {other:?}: use http/protobuf or http/json"))),
    };
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        return Err(TelemetryError::Config(format!("sample_ratio {} is not within 0.0–1.0", config.sample_ratio)));
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(TelemetryError::Config(format!("otlp_endpoint {endpoint:?} is not an http(s) URL")));
    }
    let client = TokioHttpClient::new().map_err(TelemetryError::Exporter)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_protocol(protocol)
        .with_timeout(Duration::from_secs(10))
        .with_headers(config.headers.clone().into_iter().collect())
        .with_http_client(client)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", node_id.to_string()))
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
        opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(config.sample_ratio),
    ));
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .with_sampler(sampler)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("synod");
    // Only the command path's spans: openraft's and libp2p's own would
    // bury them.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("synod::trace", tracing::Level::INFO));
    let _ = tracing_subscriber::registry().with(log_layer()).with(traces).try_init();
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(%endpoint, protocol = %config.protocol, "exporting command traces over OTLP");
    Ok(Telemetry { provider: Some(provider) })
}

/// The root span of one client command (fields filled in as it goes:
/// `plugin`, `command`, `caller` by the service; `index`, `status` when
/// answered).
pub fn command_span(transport: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: "synod::trace",
        "command",
        transport,
        plugin = tracing::field::Empty,
        command = tracing::field::Empty,
        caller = tracing::field::Empty,
        index = tracing::field::Empty,
        log_index = tracing::field::Empty,
        status = tracing::field::Empty,
    )
}

/// Record how a command ended on its root span.
pub fn answered(span: &tracing::Span, result: &Result<(u64, Vec<u8>), crate::node::ServiceError>) {
    match result {
        Ok((index, _)) => {
            span.record("index", index);
            span.record("log_index", index / crate::consensus::types::OPS_PER_ENTRY);
            span.record("status", 200);
        }
        Err(e) => {
            span.record("status", e.status);
        }
    }
}

/// When one log entry was proposed, committed and applied on this node.
#[derive(Debug, Clone, Copy, Default)]
struct EntryTimes {
    log_index: u64,
    proposed: Option<SystemTime>,
    committed: Option<SystemTime>,
    applied: Option<SystemTime>,
}

/// Entries remembered: far more than are ever in flight at once.
const KEEP: usize = 4096;

static TIMES: Mutex<VecDeque<EntryTimes>> = Mutex::new(VecDeque::new());

fn with_entry(log_index: u64, f: impl FnOnce(&mut EntryTimes)) {
    let Ok(mut times) = TIMES.lock() else { return };
    if let Some(e) = times.iter_mut().rev().take(64).find(|e| e.log_index == log_index) {
        f(e);
        return;
    }
    if times.len() >= KEEP {
        times.pop_front();
    }
    let mut e = EntryTimes { log_index, ..Default::default() };
    f(&mut e);
    times.push_back(e);
}

/// The leader proposed the entry at `log_index` at `at`.
pub fn record_proposed(log_index: u64, at: SystemTime) {
    if EXPORTING.load(Ordering::Relaxed) {
        with_entry(log_index, |e| e.proposed = Some(at));
    }
}

/// The state machine was handed the entries `log_indices` (committed) at
/// `committed` and had applied them at `applied`.
pub fn record_applied(log_indices: impl IntoIterator<Item = u64>, committed: SystemTime, applied: SystemTime) {
    if EXPORTING.load(Ordering::Relaxed) {
        for i in log_indices {
            with_entry(i, |e| {
                e.committed = Some(committed);
                e.applied = Some(applied);
            });
        }
    }
}

/// Whether traces are exported (so stage times are worth taking).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Add the `commit` and `apply` stages of the entry at `log_index` to the
/// trace of `parent` (a `propose` span), with the times they happened.
pub fn add_stages(parent: &tracing::Span, log_index: u64) {
    if !exporting() {
        return;
    }
    let Some(times) = TIMES.lock().ok().and_then(|t| t.iter().rev().find(|e| e.log_index == log_index).copied()) else {
        return;
    };
    use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = parent.context();
    if !cx.span().span_context().is_sampled() {
        return;
    }
    let tracer = opentelemetry::global::tracer("synod");
    let attrs = vec![opentelemetry::KeyValue::new("log_index", log_index as i64)];
    let stage = |name: &'static str, from: Option<SystemTime>, to: Option<SystemTime>| {
        if let (Some(from), Some(to)) = (from, to) {
            let mut span = tracer
                .span_builder(name)
                .with_start_time(from)
                .with_attributes(attrs.clone())
                .start_with_context(&tracer, &cx);
            span.end_with_timestamp(to.max(from));
        }
    };
    stage("commit", times.proposed, times.committed);
    stage("apply", times.committed, times.applied);
}

/// An OTLP HTTP client over the node's own reqwest and tokio runtime: the
/// SDK's batch exporter runs on a thread of its own, so each export is
/// handed to the runtime and its answer awaited there.
#[derive(Debug)]
struct TokioHttpClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl TokioHttpClient {
    fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let http = crate::client::Client::builder().build().map_err(|e| e.to_string())?;
        Ok(TokioHttpClient { http, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for TokioHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let http = self.http.clone();
        let (parts, body) = request.into_parts();
        let (tx, rx) = futures::channel::oneshot::channel();
        self.runtime.spawn(async move {
            let answer = async {
                let mut req = http.request(parts.method, parts.uri.to_string()).body(body);
                for (name, value) in &parts.headers {
                    req = req.header(name, value);
                }
                let resp = req.send().await?;
                let status = resp.status();
                let bytes = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, bytes))
            }
            .await;
            let _ = tx.send(answer);
        });
        let (status, body) = rx.await.map_err(|e| Box::new(e) as opentelemetry_http::HttpError)??;
        let mut response = http::Response::new(body);
        *response.status_mut() = status;
        Ok(response)
    }
}
