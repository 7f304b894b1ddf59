//! The shapes the HTTP API takes and answers with, as `GET /openapi.json`
//! states them.
//!
//! Answers the handlers build from typed values use these types directly.
//! A few answers are assembled from the replicated state as JSON (the
//! cluster view, a device's shadow, the divergence report); their types
//! here describe them, and `tests/cluster/openapi.rs` checks every answer a
//! live node gives against the document, with unknown fields refused, so
//! the description cannot drift from what is served.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

/// Every error: a message for people and a kind for programs, with the
/// fields some kinds add.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "error": "no leader is available to take this request; retry shortly",
    "kind": "no_leader", "leader_id": 2, "leader": "127.0.0.1:7002"
}))]
pub struct ErrorBody {
    /// What went wrong and what to do about it.
    pub error: String,
    /// `malformed`, `unauthenticated`, `forbidden`, `not_found`,
    /// `unknown_plugin`, `unknown_command`, `invalid_input`, `rejected`,
    /// `out_of_fuel`, `trap`, `too_large`, `overloaded`, `no_leader`,
    /// `replay_failed`, …
    pub kind: String,
    /// `no_leader`: the leader's id, when one is known.
    pub leader_id: Option<u64>,
    /// `no_leader`: the leader's HTTP address, when known.
    pub leader: Option<String>,
    /// A command that failed deterministically: the operation index it was
    /// applied (and failed) at.
    pub index: Option<u64>,
    /// `forbidden`: the role the request needs.
    pub needs: Option<String>,
    /// `engine_mismatch` / `protocol_mismatch`: this node's value.
    pub ours: Option<String>,
    /// `engine_mismatch` / `protocol_mismatch`: the joining node's value.
    pub theirs: Option<String>,
    /// `replay_failed`: the replay that failed.
    pub replay: Option<crate::node::replay::ReplayReport>,
}

/// A write that was applied: its result and where it sits in the log.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "result": { "value": 3 }, "index": 42001 }))]
pub struct Applied {
    /// The handler's output: JSON when it is JSON, else a string.
    pub result: Value,
    /// The operation index it was applied at (the same on every node).
    pub index: u64,
}

/// An activation, with the replay that preceded it when one was asked for.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "result": { "active": true, "plugin": "counter", "sha256": "5be1c0d2…", "version": "2" }, "index": 7000 }))]
pub struct Activated {
    /// The lifecycle output.
    pub result: Value,
    /// The operation index.
    pub index: u64,
    /// The replay's report (with `replay` in the request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<crate::node::replay::ReplayReport>,
}

/// A query's answer (nothing was written).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "result": { "value": 3 } }))]
pub struct QueryAnswer {
    /// The handler's output: JSON when it is JSON, else a string.
    pub result: Value,
}

/// A plugin's keys and values.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "plugin": "counter", "entries": { "count": 3 }, "applied_index": 42001 }))]
pub struct StateEntries {
    /// The plugin.
    pub plugin: String,
    /// Key → value (JSON when the value is JSON, else a string).
    pub entries: BTreeMap<String, Value>,
    /// The operation index the read saw.
    pub applied_index: u64,
}

/// What a plugin logged while its commands were applied on this node.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "plugin": "register", "node": 1, "lines": [{ "index": 42001, "at_ms": 1795700000000_u64, "command": "cas", "level": "info", "message": "cas on a not swapped" }] }))]
pub struct PluginLogs {
    /// The plugin.
    pub plugin: String,
    /// The node that kept them.
    pub node: u64,
    /// Oldest first.
    pub lines: Vec<crate::replica::trail::PluginLogLine>,
}

/// Installed plugins by name.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "plugins": { "counter": { "kind": "handler", "active": "1", "activated_at": 4000, "versions": { "1": { "sha256": "0aa8eae1…", "size": 88047, "installed_at": 4000, "limits": { "fuel": 100000000_u64, "memory_bytes": 67108864, "output_bytes": 1048576, "max_writes": 10000, "max_key_bytes": 1024, "max_value_bytes": 1048576, "max_write_bytes": 16777216, "max_events": 1000, "max_event_bytes": 65536, "max_log_lines": 100, "max_log_line_bytes": 1024 } } }, "commands": ["increment", "reset"], "queries": ["get"] } } }))]
pub struct PluginList {
    /// Name → what is installed.
    pub plugins: BTreeMap<String, PluginSummary>,
}

/// One plugin: its versions and the one that runs.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "kind": "handler", "active": "2", "activated_at": 7000,
    "versions": {
        "1": { "sha256": "0aa8eae1…", "size": 88047, "installed_at": 4000, "limits": crate::runtime::PluginLimits::default() },
        "2": { "sha256": "5be1c0d2…", "size": 88112, "installed_at": 5000, "limits": crate::runtime::PluginLimits::default() }
    },
    "commands": ["increment", "reset"], "queries": ["get"]
}))]
pub struct PluginSummary {
    /// `handler` (runs commands) or `driver` (drives devices).
    pub kind: String,
    /// The version commands run on.
    pub active: Option<String>,
    /// Operation index where it became active.
    pub activated_at: u64,
    /// Installed versions by label.
    pub versions: BTreeMap<String, crate::replica::VersionRecord>,
    /// Commands the active version accepts.
    pub commands: Vec<String>,
    /// Queries the active version answers.
    pub queries: Vec<String>,
}

/// The state digest a node had after one operation.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "index": 42001, "digest": "9f2c…", "last_applied": 42001 }))]
pub struct DigestAt {
    /// The operation index.
    pub index: u64,
    /// BLAKE3 digest of the whole replicated state, hex.
    pub digest: String,
    /// This node's last applied operation.
    pub last_applied: u64,
}

/// The cluster as one node sees it.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "id": 1, "leader": 1, "leader_http": "10.0.0.1:7001", "term": 3, "state": "Leader",
    "members": {
        "1": { "voter": true, "peer_id": "12D3KooWJe7G…", "p2p": "/ip4/10.0.0.1/tcp/7101", "http": "10.0.0.1:7001" },
        "2": { "voter": true, "peer_id": "12D3KooWNh7J…", "p2p": "/ip4/10.0.0.2/tcp/7101", "http": "10.0.0.2:7001" },
        "3": { "voter": true, "peer_id": "12D3KooWGkAp…", "p2p": "/ip4/10.0.0.3/tcp/7101", "http": "10.0.0.3:7001" }
    },
    "applied_index": 42,
    "nodes": [
        { "id": 1, "applied_index": 42, "digest_index": 42001, "digest": "9f2c…", "engine": "1d29afb0e93fac85" },
        { "id": 2, "applied_index": 42, "digest_index": 42001, "digest": "9f2c…", "engine": "1d29afb0e93fac85" },
        { "id": 3, "applied_index": 41, "digest_index": 41007, "digest": "77d0…", "engine": "1d29afb0e93fac85" }
    ],
    "divergence": false, "bus": "connected",
    "events": { "published_upto": 42001, "pending_commands": 0, "dropped": 0 },
    "engine": example::engine(),
    "settings": { "dedup_ttl_ms": 600000, "dedup_max_bytes": 67108864 },
    "allowed_peers": [],
    "refused_peers": { "12D3KooWQx9R…": "it runs /synod/id/1.0.0/engine/5c1e0f3a9b7d2e41, this node /synod/id/1.0.0/engine/1d29afb0e93fac85" }
}))]
pub struct ClusterView {
    /// The node answering.
    pub id: u64,
    /// The leader's id, when known.
    pub leader: Option<u64>,
    /// The leader's HTTP address, when known.
    pub leader_http: Option<String>,
    /// The Raft term.
    pub term: u64,
    /// `Leader`, `Follower`, `Candidate`, `Learner`.
    pub state: String,
    /// Member id → its addresses and whether it votes.
    pub members: BTreeMap<String, Member>,
    /// This node's last applied log index.
    pub applied_index: Option<u64>,
    /// Each reachable member's position and digest (this node first).
    pub nodes: Vec<crate::consensus::rpc::NodeStatus>,
    /// Whether members' digests disagreed at one index.
    pub divergence: bool,
    /// `connected`, `disconnected`, `connecting` or `disabled`.
    pub bus: String,
    /// The events outbox.
    pub events: Option<EventsState>,
    /// The engine every plugin runs on.
    pub engine: crate::runtime::EngineFingerprint,
    /// Settings every node applies alike.
    pub settings: Option<crate::consensus::types::ClusterSettings>,
    /// Peer ids allowed to connect (empty: any with the network key).
    pub allowed_peers: Vec<String>,
    /// Peers refused lately, and why.
    pub refused_peers: BTreeMap<String, String>,
}

/// One member of the cluster.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "voter": true, "peer_id": "12D3KooW…", "p2p": "/ip4/10.0.0.1/tcp/7101", "http": "10.0.0.1:7001" }))]
pub struct Member {
    /// Whether it votes (else a learner).
    pub voter: bool,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Its peer address (multiaddr).
    pub p2p: String,
    /// Its HTTP address.
    pub http: String,
}

/// Where event publishing stands.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "published_upto": 42001, "pending_commands": 0, "dropped": 0 }))]
pub struct EventsState {
    /// Events are published up to this operation index.
    pub published_upto: u64,
    /// Commands whose events wait to be published.
    pub pending_commands: u64,
    /// Events dropped past the outbox bound.
    pub dropped: u64,
}

/// Where this node's state parted from each member's.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "node": 1, "alarm": true, "history": { "from": 22000, "to": 42001 },
    "peers": [
        { "node": 2, "status": "agree", "compared_upto": 42001 },
        { "node": 3, "status": "diverged", "first_divergent_index": 41007 }
    ],
    "first_divergent_index": 41007,
    "operation": {
        "index": 41007, "plugin": "counter", "command": "increment", "caller": "line-3-hmi",
        "timestamp_ms": 1795700000000_u64, "payload_blake3": "af13…", "payload_bytes": 2
    },
    "effects": {
        "1": [example::effect("{\"value\":3}", "9f2c…")],
        "2": [example::effect("{\"value\":3}", "9f2c…")],
        "3": [example::effect("{\"value\":4}", "77d0…")]
    }
}))]
pub struct DivergenceReport {
    /// The node answering.
    pub node: u64,
    /// Whether the divergence alarm is raised.
    pub alarm: bool,
    /// The operations this node remembers digests for.
    pub history: Option<IndexSpan>,
    /// One comparison per other member.
    pub peers: Vec<PeerComparison>,
    /// The first operation whose digest differs from any member's.
    pub first_divergent_index: Option<u64>,
    /// That operation, as this node applied it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<DivergentOperation>,
    /// Node id → what that operation did there (its writes' hashes,
    /// events, output, digest after); null for a node that did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, Option<Vec<Object>>>>)]
    pub effects: Option<Value>,
    /// When the states parted before the common history: at or before
    /// this index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged_at_or_before: Option<u64>,
}

/// A span of operation indices.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "from": 1000, "to": 42001 }))]
pub struct IndexSpan {
    /// First.
    pub from: u64,
    /// Last.
    pub to: u64,
}

/// How one member's digests compare with this node's.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "node": 3, "status": "diverged", "compared_upto": null, "first_divergent_index": 41007, "at_or_before": null, "error": null }))]
pub struct PeerComparison {
    /// The member.
    pub node: u64,
    /// `agree`, `diverged`, `diverged_before_history`, `no_common_history`
    /// or `unreachable`.
    pub status: String,
    /// `agree`: up to this index.
    pub compared_upto: Option<u64>,
    /// `diverged`: the first index whose digests differ.
    pub first_divergent_index: Option<u64>,
    /// `diverged_before_history`: at or before this index.
    pub at_or_before: Option<u64>,
    /// `unreachable`: why.
    pub error: Option<String>,
}

/// The first divergent operation.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "index": 41007, "plugin": "counter", "command": "increment", "caller": "line-3-hmi", "timestamp_ms": 1795700000000_u64, "payload_blake3": "af13…", "payload_bytes": 2 }))]
pub struct DivergentOperation {
    /// Its index.
    pub index: u64,
    /// The plugin (or lifecycle) it ran.
    pub plugin: String,
    /// The command.
    pub command: String,
    /// Who sent it.
    pub caller: String,
    /// Its log timestamp.
    pub timestamp_ms: u64,
    /// BLAKE3 of its payload, hex.
    pub payload_blake3: String,
    /// Its payload's size.
    pub payload_bytes: u64,
}

/// A node that joined.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "added": 4, "index": 9000 }))]
pub struct NodeAdded {
    /// Its id.
    pub added: u64,
    /// The log index of the membership change.
    pub index: u64,
}

/// A node that left.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "removed": 3, "index": 9001 }))]
pub struct NodeRemoved {
    /// Its id.
    pub removed: u64,
    /// The log index of the membership change.
    pub index: u64,
}

/// A node to add: what its `/healthz` shows.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "id": 4, "peer_id": "12D3KooW…", "p2p": "/ip4/10.0.0.4/tcp/7104", "http": "10.0.0.4:7004",
    "engine": "1d29afb0e93fac85", "protocol": "/synod/id/1.0.0"
}))]
pub struct AddNode {
    /// Its node id (unused in the cluster).
    pub id: u64,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Its peer address.
    pub p2p: String,
    /// Its HTTP address.
    pub http: String,
    /// Its engine fingerprint hash: a node whose engine differs would apply
    /// plugins differently, and is refused.
    pub engine: String,
    /// Its peer protocol version.
    pub protocol: String,
}

/// Liveness, and who this node is.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "status": "ok", "id": 1, "peer_id": "12D3KooW…", "p2p": "/ip4/10.0.0.1/tcp/7101", "http": "10.0.0.1:7001", "engine": "1d29afb0e93fac85", "protocol": "/synod/id/1.0.0" }))]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// Node id.
    pub id: u64,
    /// libp2p peer id.
    pub peer_id: String,
    /// Peer address.
    pub p2p: String,
    /// HTTP address.
    pub http: String,
    /// Engine fingerprint hash.
    pub engine: String,
    /// Peer protocol version.
    pub protocol: String,
}

/// Whether this node can serve.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "ready": true, "leader": 1, "auth": "ready", "applied_index": 42, "bus": "connected", "fatal": null }))]
pub struct Readiness {
    /// It knows a leader, its storage has not failed, and (with
    /// authentication) the cluster has its first token.
    pub ready: bool,
    /// The leader's id.
    pub leader: Option<u64>,
    /// `ready` or `bootstrapping`.
    pub auth: String,
    /// Last applied log index.
    pub applied_index: Option<u64>,
    /// The NATS connection's state.
    pub bus: String,
    /// The storage error that stopped this node, if one did.
    pub fatal: Option<String>,
}

/// A device's shadow.
#[derive(Serialize, ToSchema)]
#[schema(example = example::device)]
pub struct DeviceDocument {
    /// Its id.
    pub id: String,
    /// The driver plugin that drives it.
    pub driver: String,
    /// The driver's profile (any JSON).
    #[schema(value_type = Object)]
    pub profile: Value,
    /// Capabilities granted to its driver.
    pub grants: Vec<String>,
    /// Node ids (as strings) or labels that may own it (empty: any).
    pub eligible: Vec<String>,
    /// The command told about reported changes.
    pub controller: Option<Controller>,
    /// The node whose driver holds it.
    pub owner: Option<u64>,
    /// The owner's epoch (fences reports from an older owner).
    pub epoch: u64,
    /// What operators want.
    #[schema(value_type = Object)]
    pub desired: Value,
    /// What the driver last read.
    #[schema(value_type = Object)]
    pub reported: Value,
    /// Desired fields the device does not report yet.
    #[schema(value_type = Object)]
    pub delta: Value,
    /// Per field: when and at which version it last changed.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The document's version (compare-and-set with `expected_version` or
    /// `If-Match`).
    pub version: u64,
    /// Version of the last definition change.
    pub definition_version: u64,
    /// Version of the last desired change.
    pub desired_version: u64,
    /// The desired version the driver last acted on.
    pub last_actuated_version: u64,
    /// When it last changed (log time, ms).
    pub updated_ms: u64,
    /// Who reported last: `{"node", "epoch"}`.
    #[schema(value_type = Option<Object>)]
    pub reported_by: Option<Value>,
}

/// `{"plugin": "thermostat", "command": "device_reported"}`.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "plugin": "thermostat", "command": "device_reported" }))]
pub struct Controller {
    /// The plugin.
    pub plugin: String,
    /// The command.
    pub command: String,
}

/// A device definition (`PUT /v1/devices/{id}`).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "driver": "modbus", "profile": { "registers": { "temp": 0 } },
    "grants": ["modbus-tcp://127.0.0.1:5020/1"], "desired": { "setpoint": 21 }
}))]
pub struct DeviceDefinition {
    /// The driver plugin's name.
    pub driver: String,
    /// The driver's profile (any JSON object).
    #[schema(value_type = Option<Object>)]
    pub profile: Option<Value>,
    /// Capabilities: `modbus-tcp://host:port/unit`, `tcp://host:port`.
    pub grants: Option<Vec<String>>,
    /// Node ids or labels that may own it (empty: any node).
    #[schema(value_type = Option<Vec<Eligible>>)]
    pub eligible: Option<Vec<Value>>,
    /// A command told about reported changes.
    pub controller: Option<Controller>,
    /// Initial desired state of a new device.
    #[schema(value_type = Option<Object>)]
    pub desired: Option<Value>,
    /// Compare-and-set: the version the caller read (0: must not exist).
    pub expected_version: Option<u64>,
}

/// One entry of a definition's `eligible`: a node id, or a label a node
/// was started with.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[schema(example = "zone-a")]
pub enum Eligible {
    /// A node id.
    Node(u64),
    /// A node label.
    Label(String),
}

/// A device after a change, with the operation that made it.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "device": example::device(), "index": 41003 }))]
pub struct DeviceAnswer {
    /// The shadow.
    pub device: DeviceDocument,
    /// The operation index (0 for a read).
    pub index: u64,
}

/// Shadows by id.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "devices": [example::device()], "applied_index": 42001 }))]
pub struct DeviceList {
    /// The shadows.
    pub devices: Vec<DeviceDocument>,
    /// The operation index the read saw.
    pub applied_index: u64,
}

/// Desired fields the device does not report yet.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "id": "room-1", "delta": { "setpoint": 22.5 }, "version": 14, "desired_version": 14 }))]
pub struct DeviceDelta {
    /// The device.
    pub id: String,
    /// Field → desired value.
    #[schema(value_type = Object)]
    pub delta: Value,
    /// The document's version.
    pub version: u64,
    /// The version of the last desired change.
    pub desired_version: u64,
}

/// The latest reading of each of a device's metrics.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "device": "room-1", "metrics": { "temperature": { "v": 21.4, "ts_ms": 1795700000000_u64, "node": 2, "epoch": 3 } } }))]
pub struct DeviceTelemetry {
    /// The device.
    pub device: String,
    /// Metric → its latest reading.
    pub metrics: BTreeMap<String, crate::node::gossip::Reading>,
}

/// A request for a token.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "principal": "line-3-hmi", "roles": ["operator:counter", "reader"] }))]
pub struct NewToken {
    /// Who will hold it.
    pub principal: String,
    /// `admin`, `operator`, `reader`, `operator:<plugin>`, `reader:<plugin>`.
    pub roles: Vec<String>,
}

/// A token's public record.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "id": "36236cc0f974", "principal": "line-3-hmi", "roles": ["operator:counter"], "created_at_ms": 1795700000000_u64, "created_by": "admin", "created_index": 9000 }))]
pub struct TokenRecord {
    /// Its id (what to revoke).
    pub id: String,
    /// Its holder.
    pub principal: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// When it was created (log time, ms).
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// The operation index of its creation.
    pub created_index: u64,
}

/// A new token: the secret is shown only here.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "id": "36236cc0f974", "principal": "line-3-hmi", "roles": ["operator:counter"], "created_at_ms": 1795700000000_u64, "created_by": "admin", "created_index": 9000, "token": "synod_571bcdfe…", "index": 9000 }))]
pub struct CreatedToken {
    /// Its id.
    pub id: String,
    /// Its holder.
    pub principal: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// When it was created (log time, ms).
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// The operation index of its creation.
    pub created_index: u64,
    /// The secret to send as `Authorization: Bearer …`.
    pub token: String,
    /// The operation index.
    pub index: u64,
}

/// Every token's public record (never a hash or a secret).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "tokens": [
    { "id": "0808282f01f9", "principal": "admin", "roles": ["admin"], "created_at_ms": 1795600000000_u64, "created_by": "synod", "created_index": 2000 },
    { "id": "36236cc0f974", "principal": "line-3-hmi", "roles": ["operator:counter", "reader"], "created_at_ms": 1795700000000_u64, "created_by": "admin", "created_index": 9000 }
] }))]
pub struct TokenList {
    /// The tokens.
    pub tokens: Vec<TokenRecord>,
}

/// Tokens revoked.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "revoked": ["36236cc0f974"], "index": 9100 }))]
pub struct Revoked {
    /// Ids of the tokens revoked.
    pub revoked: Vec<String>,
    /// The operation index.
    pub index: u64,
}

/// The audit trail.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({ "records": [{ "index": 9000, "at_ms": 1795700000000_u64, "principal": "admin", "action": "token.create", "target": "36236cc0f974", "ok": true, "detail": "{\"created_at_ms\":1795700000000,\"created_by\":\"admin\",\"created_index\":9000,\"id\":\"36236cc0f974\",\"principal\":\"line-3-hmi\",\"roles\":[\"operator:counter\"]}" }] }))]
pub struct AuditTrail {
    /// Oldest first.
    pub records: Vec<crate::replica::auth::AuditRecord>,
}

/// Query parameters of reads.
#[derive(serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Only keys with this prefix.
    #[serde(default)]
    pub prefix: String,
    /// `linearizable` (default) or `local` (this node's state, maybe stale).
    pub consistency: Option<String>,
    /// At most this many keys (default 1000).
    pub limit: Option<usize>,
}

/// The `ErrorBody` answers with these statuses and meanings.
fn errors(list: &[(u16, &str)]) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    list.iter()
        .map(|(status, meaning)| {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
            let response = ResponseBuilder::new().description(*meaning).content("application/json", content).build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

const UNAUTHENTICATED: (u16, &str) = (401, "`unauthenticated`: no token, or not a valid one");
const FORBIDDEN: (u16, &str) = (403, "`forbidden`: the token lacks the role (`needs` names it)");
const NO_LEADER: (u16, &str) = (503, "`no_leader`: no leader right now (`leader` names it when known); retry");

macro_rules! failures {
    ($(#[$doc:meta])* $name:ident: $($entry:expr),* $(,)?) => {
        $(#[$doc])*
        pub struct $name;
        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                errors(&[$($entry),*])
            }
        }
    };
}

failures!(
    /// How a request may be refused before it does anything.
    Denied: UNAUTHENTICATED, FORBIDDEN
);
failures!(
    /// How a command may fail.
    CommandFailures:
    (400, "`malformed` request, or `invalid_input` refused by the handler"),
    UNAUTHENTICATED, FORBIDDEN,
    (404, "`unknown_plugin` or `unknown_command`"),
    (409, "`request_id_reused` with another payload, or a `lifecycle` conflict"),
    (413, "`too_large`: the payload is over `limits.max_payload_bytes`"),
    (422, "`rejected` by the handler, or it failed: `out_of_fuel`, `out_of_memory`, `trap`, `stack_overflow`, …"),
    (429, "`overloaded`: too many writes queued; retry after `Retry-After` seconds"),
    NO_LEADER,
    (507, "`quota_exceeded`: the plugins' state is over `limits.state_quota_bytes`; commands are refused, except an admin's"),
);
failures!(
    /// How a read may fail.
    ReadFailures:
    (400, "`malformed` parameters (an unknown `consistency`, …)"),
    UNAUTHENTICATED, FORBIDDEN,
    (404, "`not_found`: no such plugin, query or device"),
    NO_LEADER,
);
failures!(
    /// How an administrative change may fail.
    ChangeFailures:
    (400, "`malformed` request, or refused input (`invalid_plugin`, `invalid_limits`, `bad_name`, …)"),
    UNAUTHENTICATED, FORBIDDEN,
    (404, "`not_found`: no such plugin, version, device, token or node"),
    (409, "a conflict: `version_conflict`, `lifecycle`, `replay_failed`, `engine_mismatch`, `fenced`, …"),
    (413, "`too_large`: over the configured limit"),
    (422, "`rejected` or `invalid_plugin`: the change cannot apply"),
    (429, "`overloaded`: retry after `Retry-After` seconds"),
    NO_LEADER,
);

/// A WebAssembly component's bytes (`application/wasm`): the `\0asm`
/// magic, the component layer's version, then its sections.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary, example = "\u{0}asm\u{d}\u{0}\u{1}\u{0}…")]
pub struct WasmComponent(pub Vec<u8>);

/// Examples the document shows in more than one place.
pub(crate) mod example {
    use serde_json::{Value, json};

    /// A thermostat's shadow: a setpoint asked for and not reported yet.
    pub(super) fn device() -> Value {
        let at = |ts_ms: u64, version: u64| json!({ "ts_ms": ts_ms, "version": version });
        json!({
            "id": "room-1",
            "driver": "modbus-room",
            "profile": {
                "temperature": { "table": "input", "address": 0, "type": "i16", "scale": 0.1 },
                "heater": { "table": "coil", "address": 0 },
                "poll_ms": 1000
            },
            "grants": ["modbus-tcp://10.0.1.20:502/1"],
            "eligible": ["1", "2"],
            "controller": { "plugin": "thermostat", "command": "device_reported" },
            "owner": 2,
            "epoch": 3,
            "desired": { "mode": "auto", "setpoint": 22.5 },
            "reported": { "heater": true, "temperature": 21.4 },
            "delta": { "mode": "auto", "setpoint": 22.5 },
            "metadata": {
                "desired": { "mode": at(1795600000000, 1), "setpoint": at(1795700000000, 14) },
                "reported": { "heater": at(1795699990000, 13), "temperature": at(1795699990000, 13) }
            },
            "version": 14,
            "definition_version": 1,
            "desired_version": 14,
            "last_actuated_version": 12,
            "updated_ms": 1795700000000_u64,
            "reported_by": { "node": 2, "epoch": 3 }
        })
    }

    /// The engine fingerprint of a 48.0.8 build on x86_64.
    pub(crate) fn engine() -> Value {
        json!({
            "wasmtime": "48.0.8",
            "arch": "x86_64",
            "settings": [
                "strategy=cranelift", "nan_canonicalization=true", "relaxed_simd=false", "threads=false",
                "consume_fuel=true", "epoch_interruption=false", "signals_based_traps=false", "memory_guard_size=0",
                "max_wasm_stack=524288", "max_memory_ceiling=268435456",
                "per_component=core_instances:64,memories:4,tables:8", "fuel_costs=0437c9cdf231ba1a",
                "host_fuel=call:64,byte:1,scan_entry:16,scan_max:65536", "wit=0.1.1",
                "devices=max_document:65536,max_desired_patches:1000",
                "default_limits=PluginLimits { fuel: 100000000, memory_bytes: 67108864, … }"
            ],
            "hash": "1d29afb0e93fac85"
        })
    }

    /// What `counter increment` did on one node (`output` and `digest`
    /// differ where the node diverged).
    pub(super) fn effect(output: &str, digest: &str) -> Value {
        json!({
            "index": 41007, "plugin": "counter", "command": "increment", "caller": "line-3-hmi",
            "timestamp_ms": 1795700000000_u64, "payload_blake3": "af13…", "payload_bytes": 2,
            "ok": true, "output": output, "output_blake3": "4d1e…", "fuel": 4165,
            "writes": [{ "key": "value", "value_blake3": "c2b7…", "value_bytes": 1 }], "writes_total": 1,
            "events": ["counter.changed"], "events_total": 1, "digest": digest
        })
    }
}

/// The example of utoipa's own `u64` schema (node ids), which no
/// attribute can give. Only fills in a missing one.
pub fn add_missing_examples(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::Schema;
    let Some(components) = openapi.components.as_mut() else { return };
    if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut("u64")
        && o.example.is_none()
        && o.examples.is_empty()
    {
        o.example = Some(json!(3));
    }
}

/// Adds the bearer-token scheme every route but the open ones needs.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `synod token create` (the first admin token is in the \
                         bootstrap node's data dir). Not needed when authentication is off.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document's header; the paths come from the router
/// ([`super::router`]).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Synod",
        description = "A WASM-pluggable distributed control platform: a replicated command log whose \
                       commands are WebAssembly components, and devices driven by WebAssembly drivers. \
                       Every error is `ErrorBody` with the status its kind names.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "commands", description = "Commands, queries and plugin state"),
        (name = "plugins", description = "Uploading, activating and replaying plugins"),
        (name = "devices", description = "Device shadows and telemetry"),
        (name = "cluster", description = "Membership, digests and divergence"),
        (name = "security", description = "Tokens and the audit trail"),
        (name = "operations", description = "Health, metrics, the live feed, the dashboard"),
    )
)]
pub struct ApiDoc;
