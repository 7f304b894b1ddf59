//! NATS bus: requests in from clients and devices, events and notices out.
//!
//! In: `synod.cmd.<plugin>.<command>` and `synod.dev.…` requests, served by
//! the leader alone (it subscribes to the queue group while it leads, see
//! [`serve_commands`]), with an optional `Synod-Request-Id` header. Out: the same
//! `{result, index}` or error JSON as the HTTP API (status in the
//! `Synod-Status` header); committed events on the JetStream stream
//! (`synod.evt.<plugin>.<topic>`, see [`events`]); notices on `synod.sys.>`.
//! `synod.tel.<device>.<metric>` is reserved for device telemetry.
//!
//! The connection retries in the background forever: Raft and HTTP never
//! wait for NATS.

pub mod events;

use std::sync::Arc;

use async_nats::{Client, ConnectOptions, HeaderMap};
use futures::StreamExt;
use serde_json::json;
use tracing::Instrument as _;

use crate::config::NatsConfig;
use crate::node::service::{REQUEST_ID_HEADER, check_request_id, output_json};
use crate::node::{NodeInner, ServiceError};

/// Subjects of command requests.
pub const COMMAND_SUBJECTS: &str = "synod.cmd.>";

/// Subjects of device requests: `synod.dev.<id>.<get|put|delete|desired|delta>`.
pub const DEVICE_SUBJECTS: &str = "synod.dev.*.*";

/// Why the bus could not be set up (the node runs on without it).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A credentials or TLS file could not be read.
    #[error("nats credentials: {0}")]
    Credentials(std::io::Error),
    /// The client refused the options.
    #[error("nats: {0}")]
    Connect(String),
}

/// Connect (in the background) with the configured credentials and TLS.
pub async fn connect(config: &NatsConfig, url: &str, name: String) -> Result<Client, BusError> {
    let mut options = ConnectOptions::new().name(name).retry_on_initial_connect().max_reconnects(None);
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &config.creds_file {
        options = options.credentials_file(path).await.map_err(BusError::Credentials)?;
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    let servers: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    options.connect(servers).await.map_err(|e| BusError::Connect(e.to_string()))
}

/// Start the bus for `node`: connect, serve command requests, publish
/// events while leader (both tasks in `tasks`). Returns the client (also
/// stored on the node).
pub async fn start(node: Arc<NodeInner>, tasks: &mut tokio::task::JoinSet<()>) -> Result<Client, BusError> {
    let config = node.config.nats.clone();
    let Some(url) = config.url.clone() else {
        return Err(BusError::Connect("no nats.url configured".into()));
    };
    let client = connect(&config, &url, format!("synod-node-{}", node.id)).await?;
    tasks.spawn(serve_commands(node.clone(), client.clone(), config.queue_group.clone(), COMMAND_SUBJECTS));
    tasks.spawn(serve_commands(node.clone(), client.clone(), config.queue_group.clone(), DEVICE_SUBJECTS));
    tasks.spawn(events::publish_loop(node.clone(), client.clone(), config.stream.clone()));
    Ok(client)
}

/// Every state [`state`] names.
pub const STATES: [&str; 4] = ["connected", "connecting", "disconnected", "disabled"];

/// The bus state as shown in `/readyz` and `synod status`.
pub fn state(client: Option<&Client>) -> &'static str {
    match client.map(Client::connection_state) {
        None => "disabled",
        Some(async_nats::connection::State::Connected) => "connected",
        Some(async_nats::connection::State::Disconnected) => "disconnected",
        Some(async_nats::connection::State::Pending) => "connecting",
    }
}

/// Serve `subjects` in the queue group while this node leads, so a request
/// reaches the node that proposes it without a hop through a follower.
///
/// On leading, the node subscribes; on losing the lead it drains its
/// subscription: NATS stops sending it requests, and those already
/// delivered are still answered (forwarded to the new leader like any
/// follower's), so none is lost or answered twice. While no node leads (an
/// election, about half a second) nobody is subscribed and a request gets
/// NATS's immediate "no responders" — a refusal that nothing was taken,
/// safe to retry with the same `Synod-Request-Id`.
async fn serve_commands(node: Arc<NodeInner>, client: Client, group: String, subjects: &'static str) {
    // Requests this node works on at once; past this a request is answered
    // 429 at once rather than queued without bound.
    let slots = Arc::new(tokio::sync::Semaphore::new(node.config.limits.max_queued_writes));
    // Raft's server metrics change only with the leader, the state, the
    // vote or the membership; its full metrics change with every append
    // and commit, and would wake this loop thousands of times a second.
    let mut metrics = node.raft.server_metrics();
    type ServerMetrics =
        openraft::metrics::RaftServerMetrics<crate::consensus::types::NodeId, crate::consensus::types::NodeInfo>;
    let leading = |m: &ServerMetrics| m.current_leader == Some(node.id) && m.state.is_leader();
    let take = |msg: async_nats::Message| {
        let (node, client) = (node.clone(), client.clone());
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(async move {
                    answer(&node, &client, msg).await;
                    drop(slot);
                });
            }
            Err(_) => {
                let busy = ServiceError::from(crate::consensus::rpc::WriteError::Overloaded);
                tokio::spawn(async move { reply(&client, &msg, Err(busy)).await });
            }
        }
    };
    loop {
        while !leading(&metrics.borrow_and_update()) {
            if metrics.changed().await.is_err() {
                return;
            }
        }
        let mut sub = match client.queue_subscribe(subjects, group.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to {subjects}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::debug!(subjects, "leading: serving the bus intake");
        loop {
            tokio::select! {
                msg = sub.next() => match msg {
                    Some(msg) => take(msg),
                    None => break,
                },
                changed = metrics.changed() => {
                    if changed.is_ok() && leading(&metrics.borrow_and_update()) {
                        continue;
                    }
                    tracing::debug!(subjects, "no longer leading: draining the bus intake");
                    if let Err(e) = sub.drain().await {
                        tracing::warn!(error = %e, "cannot drain the bus subscription; unsubscribing");
                        let _ = sub.unsubscribe().await;
                    }
                    while let Some(msg) = sub.next().await {
                        take(msg);
                    }
                    break;
                }
            }
        }
    }
}

/// Run one bus request and reply — never dropping it, whatever is wrong.
async fn answer(node: &NodeInner, client: &Client, msg: async_nats::Message) {
    let started = std::time::Instant::now();
    async {
        let result = run(node, &msg).await;
        crate::telemetry::answered(&tracing::Span::current(), &result);
        let family = msg.subject.split('.').nth(1).filter(|f| matches!(*f, "cmd" | "dev")).unwrap_or("other");
        let status = result.as_ref().map_or_else(|e| e.status, |_| 200);
        let m = crate::metrics::get();
        let labels = crate::metrics::NatsLabels { family: family.into(), status };
        m.nats_requests.get_or_create(&labels).inc();
        m.nats_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        reply(client, &msg, result).instrument(tracing::info_span!(target: "synod::trace", "reply")).await;
    }
    .instrument(crate::telemetry::command_span("nats"))
    .await
}

/// Answer `msg` with the HTTP API's JSON, the status in `Synod-Status`
/// (and `Retry-After` with a 429).
async fn reply(client: &Client, msg: &async_nats::Message, result: Result<(u64, Vec<u8>), ServiceError>) {
    let Some(reply) = msg.reply.clone() else {
        tracing::debug!(subject = %msg.subject, "command without a reply subject ignored");
        return;
    };
    let mut headers = HeaderMap::new();
    let (status, body) = match result {
        Ok((index, out)) => (200, json!({ "result": output_json(&out), "index": index })),
        Err(e) => {
            if let Some(secs) = e.retry_after {
                headers.insert("Retry-After", secs.to_string().as_str());
            }
            (e.status, e.body())
        }
    };
    headers.insert("Synod-Status", status.to_string().as_str());
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    if let Err(e) = client.publish_with_headers(reply, headers, bytes.into()).await {
        tracing::warn!(error = %e, "cannot send a bus reply");
    }
}

async fn run(node: &NodeInner, msg: &async_nats::Message) -> Result<(u64, Vec<u8>), ServiceError> {
    // The same bearer tokens as HTTP, in an `Authorization` header.
    let authorization = msg.headers.as_ref().and_then(|h| h.get("Authorization")).map(|v| v.as_str());
    let who = node.authenticate_caught_up(authorization).await?;
    let parts: Vec<&str> = msg.subject.split('.').collect();
    if let [_, "dev", id, verb] = parts.as_slice() {
        return run_device(node, &who, msg, id, verb).await;
    }
    let [_, _, plugin, command] = parts.as_slice() else {
        return Err(ServiceError::bad_request(format!(
            "subject {:?} is not synod.cmd.<plugin>.<command>",
            msg.subject.as_str()
        )));
    };
    let request_id =
        match msg.headers.as_ref().and_then(|h| h.get(REQUEST_ID_HEADER).or_else(|| h.get("Synod-Request-Id"))) {
            Some(v) => Some(check_request_id(v.as_str())?),
            None => None,
        };
    node.submit(&who, plugin, command, msg.payload.to_vec(), request_id).await
}

/// One device request: the HTTP API's device document as `result`.
async fn run_device(
    node: &NodeInner,
    who: &crate::node::Principal,
    msg: &async_nats::Message,
    id: &str,
    verb: &str,
) -> Result<(u64, Vec<u8>), ServiceError> {
    let expected = match msg.headers.as_ref().and_then(|h| h.get("Synod-Expected-Version")) {
        Some(v) => Some(v.as_str().trim().parse::<u64>().map_err(|_| {
            ServiceError::bad_request(format!("Synod-Expected-Version {:?} is not a version", v.as_str()))
        })?),
        None => None,
    };
    let consistency = crate::node::Consistency::Linearizable;
    let (index, doc) = match verb {
        "get" => (0, node.device_get(who, id, consistency).await?),
        "delta" => {
            let doc = node.device_get(who, id, consistency).await?;
            (0, json!({ "id": id, "delta": doc["delta"], "version": doc["version"] }))
        }
        "put" => node.device_put(who, id, &msg.payload).await?,
        "desired" => node.device_patch_desired(who, id, &msg.payload, expected).await?,
        "delete" => node.device_delete(who, id, expected).await?,
        other => {
            return Err(ServiceError::bad_request(format!(
                "device verb {other:?} is not one of get, put, delete, desired, delta"
            )));
        }
    };
    Ok((index, serde_json::to_vec(&doc).unwrap_or_default()))
}

/// Publish a best-effort notice on `synod.sys.<what>`.
pub async fn notify(client: &Client, what: &str, body: serde_json::Value) {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    if let Err(e) = client.publish(format!("synod.sys.{what}"), bytes.into()).await {
        tracing::debug!(error = %e, what, "cannot publish a notice");
    }
}
