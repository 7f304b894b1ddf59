//! What a node offers its clients, whatever the transport.
//!
//! In: validated-here requests from the HTTP API ([`crate::api`]) and the
//! NATS bus ([`crate::bus`]): commands, queries, state reads, plugin
//! uploads and lifecycle, membership. Out: results, or a [`ServiceError`]
//! whose `status` both transports report (HTTP status, NATS
//! `Synod-Status` header) and whose JSON body is the same on both.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::str::FromStr;

use super::NodeInner;
use super::auth::Principal;
use crate::consensus::rpc::WriteError;
use crate::consensus::{NodeInfo, Op, Response};
use crate::replica::auth::Access;
use crate::runtime::{CommandError, Context, LoadError, PluginLimits};
use crate::state::parse_name;

/// How long an upload waits for the other voters to compile a component
/// before it proposes the install.
pub const COMPILE_AHEAD_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long `POST /v1/cluster/nodes` waits for a new node to catch up
/// before it makes it a voter.
pub const LEARNER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a request was not served: a status shared by HTTP and NATS, a
/// machine-readable kind, and a message that says what to do.
#[derive(Debug, Clone)]
pub struct ServiceError {
    /// 400, 404, 409, 413, 422, 429, 500, 503 — as HTTP means them.
    pub status: u16,
    /// Machine-readable kind (`invalid_input`, `no_leader`, …).
    pub kind: &'static str,
    /// For people.
    pub message: String,
    /// Extra JSON fields (the leader's address, the index a failed command
    /// was applied at).
    pub extra: serde_json::Map<String, Value>,
    /// Seconds a client should wait before retrying (429).
    pub retry_after: Option<u64>,
}

impl ServiceError {
    /// An error with no extra fields.
    pub fn new(status: u16, kind: &'static str, message: impl std::fmt::Display) -> ServiceError {
        ServiceError { status, kind, message: message.to_string(), extra: Default::default(), retry_after: None }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl std::fmt::Display) -> ServiceError {
        ServiceError::new(400, "malformed", message)
    }

    /// A 413 naming what is too large.
    pub fn too_large(what: &str, size: usize, limit: usize) -> ServiceError {
        ServiceError::new(413, "too_large", format!("{what} is {size} bytes, over the limit of {limit}"))
    }

    /// Add a field to the JSON body.
    pub fn with(mut self, key: &str, value: Value) -> ServiceError {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// The JSON body: `{"error": …, "kind": …, …}`.
    pub fn body(&self) -> Value {
        let mut body = self.extra.clone();
        body.insert("error".into(), Value::String(self.message.clone()));
        body.insert("kind".into(), Value::String(self.kind.to_owned()));
        Value::Object(body)
    }

    /// The error a command's deterministic failure maps to.
    pub fn command(e: &CommandError) -> ServiceError {
        let (status, kind) = match e {
            CommandError::UnknownPlugin { .. } => (404, "unknown_plugin"),
            CommandError::UnknownCommand { .. } => (404, "unknown_command"),
            CommandError::UnknownQuery { .. } => (404, "unknown_query"),
            CommandError::InvalidInput { .. } => (400, "invalid_input"),
            CommandError::Rejected { .. } => (422, "rejected"),
            CommandError::Lifecycle { .. } => (409, "lifecycle"),
            CommandError::RequestIdReused { .. } => (409, "request_id_reused"),
            CommandError::Host { .. } => (500, "host_failure"),
            CommandError::NotFound { .. } => (404, "not_found"),
            CommandError::Conflict { .. } => (409, "version_conflict"),
            CommandError::Fenced { .. } => (409, "fenced"),
            CommandError::Internal { .. } => (422, "plugin_error"),
            CommandError::OutOfFuel { .. } => (422, "out_of_fuel"),
            CommandError::OutOfMemory { .. } => (422, "out_of_memory"),
            CommandError::StackOverflow => (422, "stack_overflow"),
            CommandError::Trap { .. } => (422, "trap"),
            CommandError::OutputTooLarge { .. } => (422, "output_too_large"),
        };
        ServiceError::new(status, kind, e)
    }

    /// The error a refused component maps to.
    pub fn load(e: &LoadError) -> ServiceError {
        let status = match e {
            LoadError::TooLarge { .. } => 413,
            LoadError::NotWasm | LoadError::CoreModule | LoadError::Compile { .. } | LoadError::Limits { .. } => 400,
            _ => 422,
        };
        ServiceError::new(status, if status == 413 { "too_large" } else { "invalid_plugin" }, e)
    }
}

impl From<WriteError> for ServiceError {
    fn from(e: WriteError) -> ServiceError {
        match &e {
            WriteError::NotLeader { leader_id, leader_http } => {
                ServiceError::new(503, "no_leader", "no leader is available to take this request; retry shortly")
                    .with("leader_id", json!(leader_id))
                    .with("leader", json!(leader_http))
            }
            WriteError::Overloaded => ServiceError { retry_after: Some(1), ..ServiceError::new(429, "overloaded", &e) },
            WriteError::Refused(m) => ServiceError::new(409, "refused", m),
            WriteError::Unauthenticated(m) => ServiceError::new(401, "unauthenticated", m),
            WriteError::Forbidden(m) => ServiceError::new(403, "forbidden", m),
            WriteError::Failed(m) => ServiceError::new(503, "unavailable", m),
            WriteError::QuotaExceeded { .. } => ServiceError::new(507, "quota_exceeded", &e),
        }
    }
}

/// The caller every request has until tokens exist.
pub const ANONYMOUS: &str = "anonymous";

/// The caller of what a node does on its own (heartbeats, device reports,
/// settings, reassignments).
pub const SYSTEM: &str = "synod";

/// Header naming a client's request id: a retry with the same id (and the
/// same payload) is applied at most once within the replicated
/// `dedup_ttl_ms` ([`crate::consensus::types::ClusterSettings`]).
pub const REQUEST_ID_HEADER: &str = "synod-request-id";

/// Check a client request id: 1–128 visible ASCII characters.
pub fn check_request_id(id: &str) -> Result<String, ServiceError> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(id.to_owned())
    } else {
        Err(ServiceError::bad_request("Synod-Request-Id must be 1-128 visible ASCII characters"))
    }
}

/// Plugin output in JSON: the value itself when it is JSON (outputs are
/// JSON by convention), else a string of its UTF-8 (lossy).
pub fn output_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn check_name(kind: &'static str, raw: &str) -> Result<(), ServiceError> {
    parse_name(kind, raw.as_bytes()).map(|_| ()).map_err(|e| ServiceError::new(400, "bad_name", e))
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Everything committed before the read started is visible (default).
    Linearizable,
    /// This node's state as it is.
    Local,
}

impl Consistency {
    /// Parse `linearizable` / `local` (absent: linearizable).
    pub fn parse(raw: Option<&str>) -> Result<Consistency, ServiceError> {
        match raw {
            None | Some("linearizable") => Ok(Consistency::Linearizable),
            Some("local") => Ok(Consistency::Local),
            Some(other) => {
                Err(ServiceError::bad_request(format!("consistency must be `linearizable` or `local`, not {other:?}")))
            }
        }
    }
}

/// Per-version limits an uploader may ask for; absent fields take the
/// defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitRequest {
    /// Fuel per command.
    pub fuel: Option<u64>,
    /// Linear memory per command, bytes.
    pub memory_bytes: Option<usize>,
}

/// What an applied operation produced: its output, or its error.
fn applied(response: Response) -> Result<Vec<u8>, ServiceError> {
    match response.result {
        Some(Ok(out)) => Ok(out),
        Some(Err(e)) => Err(ServiceError::command(&e)),
        None => Err(ServiceError::new(500, "internal", "entry produced no result")),
    }
}

impl NodeInner {
    /// Validate and run one command. Returns the operation index and the
    /// plugin's output; a failed command's error carries the index it was
    /// applied at.
    pub async fn submit(
        &self,
        who: &Principal,
        plugin: &str,
        command: &str,
        payload: Vec<u8>,
        request_id: Option<String>,
    ) -> Result<(u64, Vec<u8>), ServiceError> {
        check_name("plugin", plugin)?;
        check_name("command", command)?;
        let span = tracing::Span::current();
        span.record("plugin", plugin);
        span.record("command", command);
        span.record("caller", who.name.as_str());
        who.require(Access::Command(plugin))?;
        self.check_payload(&payload)?;
        // Refuse what cannot succeed before it reaches the log. This node may
        // lag the leader (a plugin installed a moment ago through another
        // node): before answering 404, catch up and look again.
        let lookup = || self.with_replica(|r| r.plugin(plugin).map(|p| p.info().commands.contains(command))).flatten();
        let mut known = lookup();
        if known != Some(true) && self.read_barrier().await.is_ok() {
            known = lookup();
        }
        match known {
            None if self.with_replica(|r| r.registry().contains_key(plugin)) == Some(true) => {
                return Err(ServiceError::new(
                    404,
                    "unknown_plugin",
                    format!(
                        "plugin `{plugin}` is a device driver: it takes no commands (define a device that uses it)"
                    ),
                ));
            }
            None => return Err(ServiceError::command(&CommandError::UnknownPlugin { name: plugin.to_owned() })),
            Some(false) => {
                return Err(ServiceError::command(&CommandError::UnknownCommand { name: command.to_owned() }));
            }
            Some(true) => {}
        }
        let op = Op::Command { plugin: plugin.to_owned(), command: command.to_owned(), payload };
        self.write_applied(op, who, request_id).await
    }

    /// A client's write through the log as `who`: its operation index and
    /// output; the error of a failed operation carries the index it was
    /// applied at.
    pub(super) async fn write_applied(
        &self,
        op: Op,
        who: &Principal,
        request_id: Option<String>,
    ) -> Result<(u64, Vec<u8>), ServiceError> {
        let (index, response) = self.write_as(op, who, request_id).await?;
        applied(response).map(|out| (index, out)).map_err(|e| e.with("index", json!(index)))
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), ServiceError> {
        let limit = self.config.limits.max_payload_bytes;
        if payload.len() > limit {
            return Err(ServiceError::too_large("payload", payload.len(), limit));
        }
        if !payload.is_empty() {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map_err(|e| ServiceError::bad_request(format!("body is not valid JSON: {e}")))?;
        }
        Ok(())
    }

    /// Wait until a read at `consistency` may be served.
    pub async fn consistent(&self, consistency: Consistency) -> Result<(), ServiceError> {
        self.barrier(consistency).await
    }

    async fn barrier(&self, consistency: Consistency) -> Result<(), ServiceError> {
        match consistency {
            Consistency::Linearizable => Ok(self.read_barrier().await?),
            Consistency::Local => Ok(()),
        }
    }

    /// Run a read-only plugin query. The wasm runs on the blocking pool
    /// over a copy-on-write view of the namespace, never holding the
    /// replica's lock, so it delays neither apply nor other reads.
    pub async fn query(
        &self,
        who: &Principal,
        plugin: &str,
        query: &str,
        payload: Vec<u8>,
        consistency: Consistency,
    ) -> Result<Vec<u8>, ServiceError> {
        check_name("plugin", plugin)?;
        check_name("query", query)?;
        who.require(Access::ReadPlugin(plugin))?;
        self.check_payload(&payload)?;
        self.barrier(consistency).await?;
        let (view, index) = self
            .with_replica(|r| (r.query_view(plugin), r.last_applied()))
            .ok_or_else(|| ServiceError::new(500, "internal", "state unavailable"))?;
        let Some((p, namespace, devices)) = view else {
            return Err(ServiceError::command(&CommandError::UnknownPlugin { name: plugin.to_owned() }));
        };
        let query = query.to_owned();
        let caller = who.name.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let ctx = Context { index, term: 0, timestamp_ms: 0, caller };
            p.query(&ctx, &query, &payload, Box::new(namespace), devices)
        })
        .await
        .map_err(|e| ServiceError::new(500, "internal", format!("query task failed: {e}")))?;
        outcome.result.map_err(|e| ServiceError::command(&e))
    }

    /// Up to `limit` keys of `plugin`'s state with `prefix`, and the index
    /// they are as of.
    pub async fn read_state(
        &self,
        who: &Principal,
        plugin: &str,
        prefix: &str,
        limit: usize,
        consistency: Consistency,
    ) -> Result<(BTreeMap<String, Value>, u64), ServiceError> {
        check_name("plugin", plugin)?;
        who.require(Access::ReadPlugin(plugin))?;
        self.barrier(consistency).await?;
        let (namespace, index) = self
            .with_replica(|r| (r.kv().view(plugin), r.last_applied()))
            .ok_or_else(|| ServiceError::new(500, "internal", "state unavailable"))?;
        let prefix = prefix.to_owned();
        let entries = tokio::task::spawn_blocking(move || {
            use crate::state::StateView;
            namespace.scan(&prefix, limit, usize::MAX).map(|(e, _)| e).unwrap_or_default()
        })
        .await
        .map_err(|e| ServiceError::new(500, "internal", format!("read task failed: {e}")))?;
        Ok((entries.into_iter().map(|(k, v)| (k, output_json(&v))).collect(), index))
    }

    /// Plugins, their versions, the active one and its commands.
    pub fn plugins(&self) -> Value {
        let plugins = self
            .with_replica(|r| {
                r.registry()
                    .iter()
                    .map(|(name, record)| {
                        let handler = r.plugin(name);
                        let info = handler.map(|p| p.info().clone()).unwrap_or_default();
                        let kind = if handler.is_none() && record.active.is_some() { "driver" } else { "handler" };
                        (
                            name.clone(),
                            json!({
                                "kind": kind, "active": record.active, "activated_at": record.activated_at,
                                "versions": record.versions, "commands": info.commands, "queries": info.queries,
                            }),
                        )
                    })
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        json!({ "plugins": plugins })
    }

    /// The limits a new version gets: the uploader's, within this node's
    /// configured maxima.
    fn plugin_limits(&self, asked: LimitRequest) -> Result<PluginLimits, ServiceError> {
        let defaults = PluginLimits::default();
        let max = &self.config.limits;
        let limits = PluginLimits {
            fuel: asked.fuel.unwrap_or(defaults.fuel),
            memory_bytes: asked.memory_bytes.unwrap_or(defaults.memory_bytes),
            ..defaults
        };
        let within = |what: &str, asked: u64, max: u64, key: &str| {
            if asked > max {
                let message = format!("{what} {asked} is over this cluster's maximum of {max} (limits.{key})");
                return Err(ServiceError::new(400, "invalid_limits", message));
            }
            Ok(())
        };
        within("fuel", limits.fuel, max.max_plugin_fuel, "max_plugin_fuel")?;
        within(
            "memory_bytes",
            limits.memory_bytes as u64,
            max.max_plugin_memory_bytes as u64,
            "max_plugin_memory_bytes",
        )?;
        Ok(limits)
    }

    /// Validate, store, spread to a quorum of voters, then have the leader
    /// validate again and propose the install. Nothing enters the log unless
    /// all of that succeeded; an upload answers only once the component is
    /// known to load (with these limits) on this engine.
    pub async fn upload(
        &self,
        who: &Principal,
        name: &str,
        version: &str,
        bytes: Vec<u8>,
        asked: LimitRequest,
    ) -> Result<(u64, Vec<u8>), ServiceError> {
        check_name("plugin", name)?;
        who.require(Access::Admin)?;
        for reserved in [crate::replica::DEVICE_FAMILY, crate::replica::auth::AUDIT_FAMILY] {
            if name == reserved {
                return Err(ServiceError::new(
                    400,
                    "bad_name",
                    format!(
                        "the plugin name `{reserved}` is reserved: the node publishes its own events as synod.evt.{reserved}.>"
                    ),
                ));
            }
        }
        if version.is_empty() || version.len() > 64 || version.chars().any(char::is_control) {
            return Err(ServiceError::bad_request("`version` query parameter required (1-64 characters)"));
        }
        let limit = self.config.limits.max_plugin_bytes;
        if bytes.len() > limit {
            return Err(ServiceError::too_large("plugin", bytes.len(), limit));
        }
        let limits = self.plugin_limits(asked)?;
        let sha256 = self.validate_component(&bytes, limits).await?;
        self.check_version_free(name, version, &sha256, &limits)?;
        self.spread(&bytes, &sha256).await?;
        self.await_compiled(&sha256).await;
        let op = Op::InstallPlugin {
            name: name.to_owned(),
            version: version.to_owned(),
            sha256,
            size: bytes.len() as u64,
            limits,
        };
        let (index, response) = self.lifecycle(op, who).await?;
        Ok((index, applied(response)?))
    }

    /// The one validation path, used at upload and by the leader before it
    /// proposes: store the bytes and load them fully — compile, link,
    /// `describe` within the version's fuel, check the names — exactly as
    /// apply will. Compiling is CPU work: it runs on the blocking pool.
    async fn validate_component(&self, bytes: &[u8], limits: PluginLimits) -> Result<String, ServiceError> {
        let artifacts = self.artifacts.clone();
        let bytes = bytes.to_vec();
        let sha256 = tokio::task::spawn_blocking(move || {
            artifacts.runtime().check_bytes(&bytes, &limits).map_err(|e| ServiceError::load(&e))?;
            artifacts.put(&bytes).map_err(|e| ServiceError::new(500, "store", e))
        })
        .await
        .map_err(|e| ServiceError::new(500, "internal", format!("validation task failed: {e}")))??;
        self.validate_stored(&sha256, limits).await?;
        Ok(sha256)
    }

    /// Load the stored bytes `sha256` with `limits` as apply will (from the
    /// plugin cache when this node already loaded them so).
    async fn validate_stored(&self, sha256: &str, limits: PluginLimits) -> Result<(), ServiceError> {
        let artifacts = self.artifacts.clone();
        let sha256 = sha256.to_owned();
        tokio::task::spawn_blocking(move || match artifacts.load_any(&sha256, limits) {
            Ok(_) => Ok(()),
            Err(crate::artifacts::ArtifactError::Load(e)) => Err(ServiceError::load(&e)),
            Err(e) => Err(ServiceError::new(500, "store", e)),
        })
        .await
        .map_err(|e| ServiceError::new(500, "internal", format!("validation task failed: {e}")))?
    }

    /// 409 when `version` of `name` exists with other bytes or limits.
    fn check_version_free(
        &self,
        name: &str,
        version: &str,
        sha256: &str,
        limits: &PluginLimits,
    ) -> Result<(), ServiceError> {
        match self.with_replica(|r| r.version_conflict(name, version, sha256, limits)).flatten() {
            Some(message) => Err(ServiceError::new(409, "lifecycle", message)),
            None => Ok(()),
        }
    }

    /// Store the bytes on a majority of voters (this node counts if it is
    /// one), so apply on any node can fetch them.
    async fn spread(&self, bytes: &[u8], sha256: &str) -> Result<(), ServiceError> {
        use crate::consensus::rpc::{BlobReply, BlobRpc};
        let voters = self.voters();
        let needed = voters.len() / 2 + 1;
        let mut stored = usize::from(voters.contains(&self.id));
        let mut reason = String::new();
        let pushes = voters
            .iter()
            .copied()
            .filter(|id| *id != self.id)
            .map(|id| async move { (id, self.ask_blob(id, BlobRpc::Push(bytes.to_vec())).await) });
        for (id, result) in futures::future::join_all(pushes).await {
            match result {
                Ok(BlobReply::Stored(s)) if s == sha256 => stored += 1,
                Ok(other) => reason = format!("node {id}: {other:?}"),
                Err(e) => reason = format!("node {id}: {e}"),
            }
        }
        if stored < needed {
            return Err(ServiceError::new(
                503,
                "no_quorum",
                format!("only {stored} of {needed} voters stored the plugin bytes: {reason}"),
            ));
        }
        Ok(())
    }

    /// Wait (up to [`COMPILE_AHEAD_WAIT`]) until every other voter has
    /// compiled the component `sha256` (see [`crate::artifacts::Artifacts::prepare`]),
    /// so that no node compiles on its apply thread when the install is
    /// applied: a Python plugin takes seconds to compile, and apply, queries
    /// and the node's place in the cluster would wait for it. A voter that
    /// does not answer or cannot compile is not waited for (it compiles at
    /// apply, or refuses the install there like every node).
    async fn await_compiled(&self, sha256: &str) {
        use crate::consensus::rpc::{BlobReply, BlobRpc};
        let deadline = tokio::time::Instant::now() + COMPILE_AHEAD_WAIT;
        let mut waiting: Vec<u64> = self.voters().into_iter().filter(|id| *id != self.id).collect();
        while !waiting.is_empty() && tokio::time::Instant::now() < deadline {
            let asks = waiting
                .iter()
                .map(|&id| async move { (id, self.ask_blob(id, BlobRpc::Prepare(sha256.to_owned())).await) });
            let mut still = Vec::new();
            for (id, reply) in futures::future::join_all(asks).await {
                match reply {
                    Ok(BlobReply::Preparing) => still.push(id),
                    Ok(BlobReply::Prepared) => {}
                    other => {
                        tracing::warn!(node = id, sha256, reply = ?other, "a voter did not compile the plugin ahead of its install")
                    }
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        if !waiting.is_empty() {
            tracing::warn!(?waiting, sha256, "voters still compiling the plugin; installing anyway");
        }
    }

    /// Make `version` the active version of `name`.
    pub async fn activate(&self, who: &Principal, name: &str, version: &str) -> Result<(u64, Vec<u8>), ServiceError> {
        check_name("plugin", name)?;
        who.require(Access::Admin)?;
        let (index, response) =
            self.lifecycle(Op::ActivatePlugin { name: name.to_owned(), version: version.to_owned() }, who).await?;
        let out = applied(response)?;
        if let Some(client) = self.bus.get() {
            crate::bus::notify(client, "plugin.activated", json!({ "plugin": name, "version": version })).await;
        }
        Ok((index, out))
    }

    /// Remove a plugin (its state is kept).
    pub async fn remove(&self, who: &Principal, name: &str) -> Result<(u64, Vec<u8>), ServiceError> {
        check_name("plugin", name)?;
        who.require(Access::Admin)?;
        let (index, response) = self.lifecycle(Op::RemovePlugin { name: name.to_owned() }, who).await?;
        Ok((index, applied(response)?))
    }

    /// A lifecycle change through the leader, which validates it itself.
    async fn lifecycle(&self, op: Op, who: &Principal) -> Result<(u64, Response), ServiceError> {
        let request = crate::consensus::Request { timestamp_ms: 0, caller: who.name.clone(), request_id: None, op };
        let forwarded = crate::consensus::rpc::Forwarded { request: request.clone(), credential: who.credential };
        let result = self
            .on_leader(
                || self.lifecycle_local(request.clone()),
                |l| {
                    let rpc = crate::consensus::rpc::RaftRpc::Lifecycle(forwarded.clone());
                    async move {
                        match self.forward(l, &rpc).await? {
                            crate::consensus::rpc::RaftReply::Lifecycle(r) => r,
                            crate::consensus::rpc::RaftReply::Refused(why) => Err(WriteError::Refused(why)),
                            other => Err(WriteError::Failed(format!("leader answered {other:?}"))),
                        }
                    }
                },
            )
            .await;
        let (index, response) = result?;
        self.seen_here(index).await;
        Ok((index, response))
    }

    /// On the leader: validate a lifecycle change (an install's component
    /// must load here, from bytes this node has or fetches) and propose it.
    pub(super) async fn lifecycle_local(
        &self,
        request: crate::consensus::Request,
    ) -> Result<(u64, Response), WriteError> {
        match &request.op {
            Op::InstallPlugin { sha256, limits, name, version, .. } => {
                if !crate::artifacts::is_sha256(sha256) {
                    return Err(WriteError::Refused(format!("{sha256:?} is not a sha256")));
                }
                // The uploader pushed the bytes to a quorum; the leader may
                // not be in it. Loading is the validation; a component
                // loaded before (the upload itself, on this node) is cached.
                let stored = if self.artifacts.has(sha256) {
                    self.validate_stored(sha256, *limits).await.map(|()| sha256.clone())
                } else {
                    let bytes = self.fetch_blob(sha256).await.map_err(WriteError::Failed)?;
                    self.validate_component(&bytes, *limits).await
                }
                .map_err(|e| WriteError::Refused(e.message))?;
                if &stored != sha256 {
                    return Err(WriteError::Refused(format!("bytes fetched for {sha256} hash to {stored}")));
                }
                self.check_version_free(name, version, sha256, limits).map_err(|e| WriteError::Refused(e.message))?;
            }
            Op::ActivatePlugin { .. } | Op::RemovePlugin { .. } => {}
            _ => return Err(WriteError::Refused("not a plugin lifecycle change".into())),
        }
        // The caller is an admin: checked by the service that took the
        // request here, or against the forwarded credential (`peer.rs`).
        self.write_local(request).await
    }

    /// Add a node: first as a learner (it catches up), then as a voter. Its
    /// key is allowed to connect once the membership naming it commits.
    pub async fn add_node(&self, who: &Principal, id: u64, info: NodeInfo) -> Result<u64, ServiceError> {
        who.require(Access::Admin)?;
        if id == 0 {
            return Err(ServiceError::bad_request("node id must be greater than 0"));
        }
        if <libp2p::PeerId as std::str::FromStr>::from_str(&info.peer_id).is_err() {
            return Err(ServiceError::bad_request(format!("peer_id {:?} is not a libp2p PeerId", info.peer_id)));
        }
        if info.p2p_addr.parse::<libp2p::Multiaddr>().is_err() {
            return Err(ServiceError::bad_request(format!("p2p {:?} is not a multiaddr", info.p2p_addr)));
        }
        if self.leader().0 != Some(self.id) {
            return Err(self.not_leader().into());
        }
        let fail = |e: String| ServiceError::new(503, "unavailable", e);
        let peer_id = info.peer_id.clone();
        self.raft.add_learner(id, info, true).await.map_err(|e| fail(e.to_string()))?;
        if let Err(e) = self.await_learner(id, &peer_id).await {
            // Never promote a node that cannot follow: as a voter it would
            // count toward every quorum without ever holding the log.
            if let Err(undo) =
                self.raft.change_membership(openraft::ChangeMembers::RemoveNodes([id].into()), false).await
            {
                tracing::warn!(node = id, error = %undo, "cannot take back a learner that did not catch up");
            }
            return Err(e);
        }
        let r = self
            .raft
            .change_membership(openraft::ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.audit_note(who, "membership.add", &id.to_string()).await;
        Ok(r.log_id.index)
    }

    /// Wait until learner `id` has every entry this leader had when it was
    /// added. openraft 0.9's blocking `add_learner` returns as soon as a
    /// learner is within `replication_lag_threshold` (5,000) entries — at
    /// once on a short log, even for a node that never connected — so the
    /// caller checks itself: a node this one refused at connection (another
    /// engine fingerprint) fails at once with the reason, one that never
    /// catches up fails after [`LEARNER_CATCH_UP`].
    async fn await_learner(&self, id: u64, peer_id: &str) -> Result<(), ServiceError> {
        let target = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let deadline = tokio::time::Instant::now() + LEARNER_CATCH_UP;
        loop {
            let matched = self
                .raft
                .metrics()
                .borrow()
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|m| m >= target) {
                return Ok(());
            }
            if let Some((_, reason)) = self.p2p.refused_peers().into_iter().find(|(p, _)| p.to_string() == peer_id) {
                return Err(ServiceError::new(409, "refused_peer", format!("node {id} was refused: {reason}")));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ServiceError::new(
                    503,
                    "not_caught_up",
                    format!(
                        "node {id} did not catch up within {LEARNER_CATCH_UP:?} (it holds {matched:?} of {target}); \
                         check that it runs, has the cluster's network_key and can reach the leader"
                    ),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Record an admin action that is openraft's own entry (a membership
    /// change) in the audit trail, as `who`.
    pub(crate) async fn audit_note(&self, who: &Principal, action: &str, target: &str) {
        use crate::replica::auth::AuthOp;
        let op = Op::Auth(AuthOp::Note { action: action.to_owned(), target: target.to_owned() });
        if let Err(e) = self.write_as(op, who, None).await {
            tracing::warn!(error = %e, action, target, principal = %who.name, "cannot record an admin action in the audit trail");
        }
    }

    /// 409 unless a joining node's engine fingerprint and peer protocol
    /// are this node's: a node with another engine would apply the same
    /// plugins differently (and be refused when it connects anyway).
    pub fn check_admission(&self, engine: &str, protocol: &str) -> Result<(), ServiceError> {
        let ours = &self.artifacts.runtime().fingerprint().hash;
        if engine != ours {
            return Err(ServiceError::new(
                409,
                "engine_mismatch",
                format!(
                    "the joining node's engine fingerprint is {engine} but this cluster's is {ours}: it would run \
                     plugins differently; run the same synod build on it (`synod engine` prints the fingerprint)"
                ),
            )
            .with("ours", json!(ours))
            .with("theirs", json!(engine)));
        }
        if protocol != super::PROTOCOL_VERSION {
            return Err(ServiceError::new(
                409,
                "protocol_mismatch",
                format!(
                    "the joining node speaks peer protocol {protocol:?} but this cluster speaks {:?}",
                    super::PROTOCOL_VERSION
                ),
            )
            .with("ours", json!(super::PROTOCOL_VERSION))
            .with("theirs", json!(protocol)));
        }
        Ok(())
    }

    /// Remove a node from the membership; its key is disallowed once the
    /// change is applied.
    pub async fn remove_node(&self, who: &Principal, id: u64) -> Result<u64, ServiceError> {
        who.require(Access::Admin)?;
        if self.leader().0 != Some(self.id) {
            return Err(self.not_leader().into());
        }
        let r = self
            .raft
            .change_membership(openraft::ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(|e| ServiceError::new(503, "unavailable", e))?;
        self.audit_note(who, "membership.remove", &id.to_string()).await;
        Ok(r.log_id.index)
    }

    /// Leader, term, members, each node's applied index and digest, bus and
    /// event state, engine.
    pub async fn cluster(&self) -> Value {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: Vec<u64> = metrics.membership_config.voter_ids().collect();
        let mut nodes = vec![serde_json::to_value(self.status()).unwrap_or_default()];
        for s in self.peer_statuses().await.into_iter().flatten() {
            nodes.push(serde_json::to_value(s).unwrap_or_default());
        }
        let members: BTreeMap<String, Value> = self
            .members()
            .into_iter()
            .map(|(id, info)| (id.to_string(), json!({ "voter": voters.contains(&id), "peer_id": info.peer_id, "p2p": info.p2p_addr, "http": info.http_addr })))
            .collect();
        let (leader_id, leader_http) = self.leader();
        json!({
            "id": self.id,
            "leader": leader_id,
            "leader_http": leader_http,
            "term": metrics.current_term,
            "state": format!("{:?}", metrics.state),
            "members": members,
            "applied_index": metrics.last_applied.map(|l| l.index),
            "nodes": nodes,
            "divergence": self.shared.divergence.load(std::sync::atomic::Ordering::Relaxed),
            "bus": crate::bus::state(self.bus.get()),
            "events": self.with_replica(|r| {
                let (published_upto, pending, dropped) = r.outbox_state();
                json!({ "published_upto": published_upto, "pending_commands": pending, "dropped": dropped })
            }),
            "engine": self.artifacts.runtime().fingerprint(),
            "settings": self.with_replica(|r| r.settings()),
            "allowed_peers": self.p2p.allowed_peers().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "refused_peers": self.p2p.refused_peers().into_iter().map(|(p, why)| (p.to_string(), why)).collect::<BTreeMap<_, _>>(),
        })
    }

    /// The Prometheus exposition: the gauges of state read now, with the
    /// counters and histograms recorded as things happened.
    pub fn metrics_text(&self) -> String {
        use crate::metrics::{ActiveLabels, PluginLabels, set};
        let m = crate::metrics::get();
        let raft = self.raft.metrics().borrow().clone();
        set(&m.raft_term, raft.current_term);
        set(&m.raft_leader, raft.current_leader.unwrap_or(0));
        set(&m.raft_is_leader, u64::from(raft.current_leader == Some(self.id)));
        set(&m.raft_applied_index, raft.last_applied.map_or(0, |l| l.index));
        let last = raft.last_log_index.unwrap_or(0);
        set(&m.raft_last_log_index, last);
        set(&m.raft_log_entries, last.saturating_sub(raft.purged.map_or(0, |p| p.index)));
        set(&m.raft_snapshot_index, raft.snapshot.map_or(0, |s| s.index));
        set(&m.state_quota_bytes, self.config.limits.state_quota_bytes);
        let bus = crate::bus::state(self.bus.get());
        set(&m.bus_connected, u64::from(bus == "connected"));
        for state in crate::bus::STATES {
            let labels = crate::metrics::BusLabels { state: state.into() };
            set(&m.bus_state.get_or_create(&labels), u64::from(bus == state));
        }
        set(&m.divergence, u64::from(self.shared.divergence.load(std::sync::atomic::Ordering::Relaxed)));
        // Rebuilt whole, so a removed plugin's series go.
        m.plugin_versions.clear();
        m.plugin_active.clear();
        self.with_replica(|r| {
            set(&m.events_outbox, r.outbox_state().1 as u64);
            for (name, record) in r.registry() {
                set(
                    &m.plugin_versions.get_or_create(&PluginLabels { plugin: name.clone() }),
                    record.versions.len() as u64,
                );
                if let Some(version) = &record.active {
                    m.plugin_active
                        .get_or_create(&ActiveLabels { plugin: name.clone(), version: version.clone() })
                        .set(1);
                }
            }
        });
        m.encode()
    }

    /// Whether this node can serve: it knows a leader and its storage has
    /// not failed. With the JSON `/readyz` shows.
    pub fn ready(&self) -> (bool, Value) {
        let metrics = self.raft.metrics().borrow().clone();
        let fatal = metrics.running_state.as_ref().err().map(|e| e.to_string());
        // With authentication on, nothing can be served before the cluster
        // has its first token.
        let auth = self.shared.auth_bootstrapped.load(std::sync::atomic::Ordering::Acquire);
        let ready = metrics.current_leader.is_some() && fatal.is_none() && (auth || !self.auth_on());
        let body = json!({
            "ready": ready, "leader": metrics.current_leader, "auth": if auth { "ready" } else { "bootstrapping" },
            "applied_index": metrics.last_applied.map(|l| l.index),
            "bus": crate::bus::state(self.bus.get()), "fatal": fatal,
        });
        (ready, body)
    }

    /// Put `settings` in force on this node (the fault battery's control;
    /// see [`crate::faults`]): a cut names member ids, which become the
    /// peers whose connections the transport closes and refuses.
    pub fn inject_faults(&self, settings: &crate::faults::FaultSettings) -> crate::faults::FaultSettings {
        crate::faults::set(settings);
        if settings.cut.is_some() {
            let cut = crate::faults::cut();
            let peers = self
                .members()
                .into_iter()
                .filter(|(id, _)| cut.contains(id))
                .filter_map(|(_, info)| libp2p::PeerId::from_str(&info.peer_id).ok())
                .collect();
            self.p2p.cut(peers);
        }
        let now = crate::faults::current();
        tracing::warn!(?now, "FAULT INJECTION: faults in force changed");
        now
    }

    /// Run `f` with read access to the replicated state (briefly: apply
    /// waits while it runs).
    pub fn with_replica<T>(&self, f: impl FnOnce(&crate::replica::Replica) -> T) -> Option<T> {
        self.shared.replica.read().ok().map(|r| f(&r))
    }
}
