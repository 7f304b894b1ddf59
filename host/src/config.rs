//! Node configuration: `synod.toml`, then command-line overrides.
//!
//! In: TOML text (every field documented below; unknown fields are an
//! error, so a typo does not silently fall back to a default). Out: a
//! validated [`NodeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown fields.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's explanation, with line and column.
        reason: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One node's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Numeric id of this node, unique in the cluster (> 0). Bound to the
    /// node's key: peers refuse this id from any other key.
    pub id: u64,
    /// Where the node keeps its key (`node.key`), Raft log, snapshots and
    /// plugin store. Created if missing.
    pub data_dir: PathBuf,
    /// HTTP API listen address.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// libp2p listen address (multiaddr); port 0 picks a free port.
    #[serde(default = "default_p2p")]
    pub p2p: String,
    /// Initialize a new cluster of this node and `peers` on first start.
    /// Set on exactly one node of a new cluster; ignored once initialized.
    #[serde(default)]
    pub bootstrap: bool,
    /// The cluster's private network key: 64 hex characters (32 random
    /// bytes), the same on every member. Every libp2p connection starts
    /// with a handshake proving this key before noise, so a
    /// process without it cannot complete a connection or even learn which
    /// protocols a member speaks; its attempts are logged by the member.
    /// Without it any process that reaches the p2p port may handshake
    /// (only the allowlist stops it), and the node warns at start. `synod
    /// dev` generates one. Keep it secret, like the node keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_key: Option<String>,
    /// The other members this node trusts: only these keys may connect.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Raft timing and log compaction.
    #[serde(default)]
    pub raft: RaftConfig,
    /// Limits on what clients may send.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The NATS bus (command intake, events, notifications). Without a
    /// `url` the node runs without it; HTTP and Raft never depend on it.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Devices and drivers.
    #[serde(default)]
    pub devices: DevicesConfig,
    /// Whether every API and bus request must carry a bearer token: `on`
    /// (the default) or `off`, for experiments only — allowed only with
    /// the HTTP API bound to loopback, and logged loudly at start. Tokens
    /// are kept (and can be made) either way.
    #[serde(default)]
    pub auth: AuthMode,
    /// Serve the HTTP API over TLS only (plain HTTP is refused).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Export command traces over OTLP (off unless an endpoint is set).
    #[serde(default, skip_serializing_if = "crate::telemetry::TelemetryConfig::is_default")]
    pub telemetry: crate::telemetry::TelemetryConfig,
}

/// `[tls]`: the API's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `auth = "on" | "off"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every request but `/healthz` and `/readyz` needs a valid token.
    #[default]
    On,
    /// Requests without a token run as "anonymous" with every right.
    Off,
}

/// `[devices]`: this node's labels, the ownership lease (replicated from
/// the leader's config), and how drivers are run here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// Labels devices' `eligible` lists may name (besides the node id).
    pub labels: Vec<String>,
    /// How often a node heartbeats through the log, ms.
    pub heartbeat_ms: u64,
    /// An owner's lease: it stops writing to its devices this long after
    /// its last committed heartbeat was sent, ms.
    pub lease_ttl_ms: u64,
    /// The leader reassigns an owner's devices after TTL plus this, ms.
    pub lease_grace_ms: u64,
    /// Timeout of every driver I/O (a Modbus request, a TCP read), ms.
    pub io_timeout_ms: u64,
    /// Deadline of a driver's `poll` and `actuate`, ms.
    pub call_deadline_ms: u64,
    /// Deadline of a driver's `init`, ms.
    pub init_deadline_ms: u64,
    /// Longest wait before re-instantiating a failed driver, ms.
    pub max_backoff_ms: u64,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            labels: Vec::new(),
            heartbeat_ms: 1000,
            lease_ttl_ms: 3000,
            lease_grace_ms: 2000,
            io_timeout_ms: 1000,
            call_deadline_ms: 2000,
            init_deadline_ms: 5000,
            max_backoff_ms: 10_000,
        }
    }
}

impl DevicesConfig {
    /// The lease settings this node's config asks the cluster for.
    pub fn lease(&self) -> crate::replica::devices::LeaseSettings {
        crate::replica::devices::LeaseSettings {
            heartbeat_ms: self.heartbeat_ms,
            ttl_ms: self.lease_ttl_ms,
            grace_ms: self.lease_grace_ms,
        }
    }
}

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: Option<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// NKey seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// A `.creds` file (JWT + NKey).
    pub creds_file: Option<PathBuf>,
    /// CA certificate to verify the server (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM, with `tls_key`) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub tls_required: bool,
    /// JetStream stream for events (created if absent).
    pub stream: String,
    /// Queue group command subscribers share: one node takes each request.
    pub queue_group: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            stream: "SYNOD_EVENTS".to_owned(),
            queue_group: "synod".to_owned(),
        }
    }
}

/// A trusted member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: u64,
    /// Its libp2p PeerId (printed by `synod node` at start, derived from
    /// its `node.key`).
    pub peer_id: String,
    /// Its libp2p address.
    pub p2p: String,
    /// Its HTTP API address (sent to clients that must go to the leader).
    pub http: String,
}

/// Raft tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Election timeout range, ms: a follower that hears nothing for a
    /// random time in [min, max) stands for election. openraft 0.9 adds a
    /// leader lease of `election_timeout_max_ms` on top while the last
    /// leader's vote stands, so a lost leader is replaced after
    /// max + [min, max) ms of silence.
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout range, ms (also the leader lease).
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log before it) after this many
    /// entries since the last one, times the state's size in 64 MiB (at
    /// least 1, at most 16: a snapshot rewrites the whole state, so at
    /// 1 GiB of state it is taken every 32,000 entries at the default);
    /// sooner once the writes since hold 128 MiB of keys and values or
    /// change 200,000 keys. An entry is a batch of up to 1,000 commands.
    /// A restarting node resumes from its snapshot and its checkpoints
    /// (written every 200 entries between snapshots, at most once a
    /// second, each but the first after a snapshot as the changes since
    /// the one before) and replays the log after the last.
    pub snapshot_after_entries: u64,
    /// Changes to the state (keys set or deleted, counted per snapshot
    /// interval) since the last snapshot a node finished, past which the
    /// leader holds each client command (at most 5 s) until snapshots
    /// catch up: when its own state is past it, or so many members' are
    /// (by their gossip) that the rest are no quorum. A bulk command (one
    /// whose last run changed at least 128 keys) is held from seven eighths
    /// of it, so the rest stays free for small writes. A quorum of nodes
    /// killed right after a bulk load then comes back from a snapshot and
    /// one checkpoint each, not by replaying the load. 0 (the default):
    /// what one whole checkpoint holds, an eighth of the state's keys and
    /// at least 262,144; steady writes stay far below it, only a bulk load
    /// faster than snapshots are built meets it. Below about 228,000 it
    /// also makes snapshots more frequent (one once seven eighths of it
    /// are changed).
    /// Left out of a written config while 0, so a config written by this
    /// version still starts the previous one (a rolling upgrade's nodes).
    #[serde(skip_serializing_if = "is_zero")]
    pub max_unsnapshotted_changes: u64,
    /// Entries kept in the log behind a snapshot, for slightly lagging
    /// followers that need not a whole snapshot.
    pub keep_entries_after_snapshot: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_after_entries: 2_000,
            max_unsnapshotted_changes: 0,
            keep_entries_after_snapshot: 1_000,
        }
    }
}

/// Client limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest command payload, bytes (larger → 413). At most 15 MiB: one
    /// command must fit one Raft message (16 MiB) with room to spare.
    pub max_payload_bytes: usize,
    /// Largest plugin component, bytes (larger → 413).
    pub max_plugin_bytes: usize,
    /// Bytes of commands the leader packs into one log entry (and a
    /// follower into one forwarded batch; and of entries into one append
    /// to a follower); a single larger command goes alone. openraft allows
    /// an append one heartbeat interval before it sends it again, so this
    /// keeps each append small enough for a follower to write and fsync in
    /// time: a burst of large commands replicates in many small appends
    /// instead of stalling replication and churning elections.
    pub max_entry_bytes: usize,
    /// Most fuel per command an upload may ask for (`?fuel=`).
    pub max_plugin_fuel: u64,
    /// Most linear memory per command an upload may ask for
    /// (`?memory_bytes=`), at most the engine's ceiling (256 MiB).
    pub max_plugin_memory_bytes: usize,
    /// Writes a node holds waiting for the leader (its batch queue, its
    /// forward queue) and NATS requests it works on at once; past this a
    /// client is told 429 with `Retry-After` instead of being queued
    /// without bound.
    pub max_queued_writes: usize,
    /// How long a client request id is remembered (a retry within it is
    /// answered from the first application), seconds. A cluster-wide
    /// setting: the leader replicates its value through the log, so every
    /// node evicts alike.
    pub dedup_ttl_secs: u64,
    /// Most bytes the request-id table may hold (oldest forgotten first).
    /// Cluster-wide, like `dedup_ttl_secs`.
    pub dedup_max_bytes: u64,
    /// Most libp2p connections this node keeps open at once, in and out
    /// together; more are refused. A cluster needs about one per member,
    /// so this only bounds what a flood of connections can cost.
    pub max_connections: u32,
    /// Most libp2p connections with any one peer (members use one, two
    /// when they dial each other at the same moment).
    pub max_connections_per_peer: u32,
    /// Most incoming connections still in their handshake at once; past
    /// it new ones are refused, so slow or bogus handshakes cannot tie up
    /// the node.
    pub max_pending_connections: u32,
    /// Most key and value bytes the plugins' state may hold. Past it the
    /// cluster is read-only for commands — the leader refuses them with
    /// 507 `quota_exceeded`, except from an admin, who can run the
    /// commands that delete data — instead of growing until a node is
    /// killed for memory (etcd's `--quota-backend-bytes`). Give every node
    /// the same value: the leader's applies. 0 turns it off. Left out of a
    /// written config while at its default, so a config written by this
    /// version still starts the previous one (a rolling upgrade's nodes).
    #[serde(skip_serializing_if = "is_default_quota")]
    pub state_quota_bytes: u64,
}

/// The default `limits.state_quota_bytes`: 4 GiB of keys and values.
const DEFAULT_STATE_QUOTA: u64 = 4 << 30;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_default_quota(q: &u64) -> bool {
    *q == DEFAULT_STATE_QUOTA
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_plugin_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            max_plugin_fuel: 1_000_000_000,
            max_plugin_memory_bytes: crate::runtime::MAX_MEMORY_CEILING,
            max_queued_writes: 8192,
            dedup_ttl_secs: 600,
            dedup_max_bytes: 64 * 1024 * 1024,
            max_connections: 256,
            max_connections_per_peer: 8,
            max_pending_connections: 64,
            state_quota_bytes: DEFAULT_STATE_QUOTA,
        }
    }
}

/// Room left in a Raft message for everything but command payloads.
const MESSAGE_HEADROOM: usize = 1024 * 1024;

fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7001))
}

fn default_p2p() -> String {
    "/ip4/127.0.0.1/tcp/7101".to_owned()
}

impl LimitsConfig {
    /// The cluster-wide settings this config asks the leader to replicate.
    pub fn cluster_settings(&self) -> crate::consensus::types::ClusterSettings {
        crate::consensus::types::ClusterSettings {
            dedup_ttl_ms: self.dedup_ttl_secs.saturating_mul(1000),
            dedup_max_bytes: self.dedup_max_bytes,
        }
    }
}

impl NodeConfig {
    /// Read and validate a TOML file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config: NodeConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        Ok(config)
    }

    /// Check values that TOML types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.id == 0 {
            return bad("id must be greater than 0".into());
        }
        if self.peers.iter().any(|p| p.id == self.id) {
            return bad(format!("peers lists this node's own id {}", self.id));
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("peers lists an id twice".into());
        }
        if self.auth == AuthMode::Off && !self.http.ip().is_loopback() {
            return bad(format!(
                "auth = \"off\" is allowed only with the HTTP API on a loopback address, not {}",
                self.http
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return bad("election_timeout_min_ms must exceed twice heartbeat_ms (> 0)".into());
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad("election_timeout_max_ms must exceed election_timeout_min_ms".into());
        }
        if r.snapshot_after_entries == 0 {
            return bad("snapshot_after_entries must be greater than 0".into());
        }
        let d = &self.devices;
        if d.heartbeat_ms == 0 || d.lease_ttl_ms < 2 * d.heartbeat_ms {
            return bad("devices.lease_ttl_ms must be at least twice devices.heartbeat_ms (> 0)".into());
        }
        if d.io_timeout_ms == 0 || d.call_deadline_ms == 0 || d.init_deadline_ms == 0 || d.max_backoff_ms == 0 {
            return bad(
                "devices.io_timeout_ms, call_deadline_ms, init_deadline_ms and max_backoff_ms must be > 0".into()
            );
        }
        for label in &d.labels {
            if label.is_empty() || label.bytes().all(|b| b.is_ascii_digit()) {
                return bad(format!("devices.labels: {label:?} must be non-empty and not a node id"));
            }
        }
        let l = &self.limits;
        let message = crate::node::MAX_RAFT_MESSAGE_BYTES;
        if l.max_payload_bytes + MESSAGE_HEADROOM > message {
            return bad(format!(
                "limits.max_payload_bytes {} cannot fit a Raft message of {message} bytes; at most {}",
                l.max_payload_bytes,
                message - MESSAGE_HEADROOM
            ));
        }
        if l.max_entry_bytes == 0 || l.max_entry_bytes + MESSAGE_HEADROOM > message {
            return bad(format!(
                "limits.max_entry_bytes {} must be between 1 and {}",
                l.max_entry_bytes,
                message - MESSAGE_HEADROOM
            ));
        }
        if l.dedup_ttl_secs == 0 || l.dedup_max_bytes == 0 {
            return bad("limits.dedup_ttl_secs and limits.dedup_max_bytes must be greater than 0".into());
        }
        if l.max_queued_writes == 0 {
            return bad("limits.max_queued_writes must be greater than 0".into());
        }
        if l.max_connections == 0 || l.max_connections_per_peer == 0 || l.max_pending_connections == 0 {
            return bad(
                "limits.max_connections, max_connections_per_peer and max_pending_connections must be greater than 0"
                    .into(),
            );
        }
        self.network_key()?;
        if l.max_plugin_fuel == 0 {
            return bad("limits.max_plugin_fuel must be greater than 0".into());
        }
        if l.max_plugin_memory_bytes > crate::runtime::MAX_MEMORY_CEILING {
            return bad(format!(
                "limits.max_plugin_memory_bytes {} is over the engine's ceiling of {}",
                l.max_plugin_memory_bytes,
                crate::runtime::MAX_MEMORY_CEILING
            ));
        }
        Ok(())
    }

    /// The 32 bytes of `network_key`, if one is set.
    pub fn network_key(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let Some(text) = &self.network_key else { return Ok(None) };
        let mut key = [0u8; 32];
        // Never echo the key itself into an error message or a log.
        hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
            ConfigError::Invalid(format!(
                "network_key must be 64 hex characters (32 bytes; `synod dev` generates one), \
                 not {} characters of something else",
                text.trim().len()
            ))
        })?;
        Ok(Some(key))
    }

    /// TOML text of this configuration (for `synod dev`).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults_and_typos_are_errors() {
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"").unwrap();
        c.validate().unwrap();
        assert_eq!(c.http, default_http());
        assert_eq!(c.raft, RaftConfig::default());
        let e = toml::from_str::<NodeConfig>("id = 1\ndata_dir = \"d\"\nhttp_addr = \"x\"").unwrap_err();
        assert!(e.to_string().contains("unknown field `http_addr`"), "{e}");
        let c: NodeConfig = toml::from_str("id = 0\ndata_dir = \"d\"").unwrap();
        assert!(c.validate().is_err());
    }

    /// Authentication is on unless switched off, and off only on loopback.
    #[test]
    fn auth_is_on_by_default_and_off_only_on_loopback() {
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"").unwrap();
        assert_eq!(c.auth, AuthMode::On);
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"\nauth = \"off\"").unwrap();
        c.validate().unwrap();
        let c: NodeConfig =
            toml::from_str("id = 1\ndata_dir = \"d\"\nauth = \"off\"\nhttp = \"0.0.0.0:7001\"").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("only with the HTTP API on a loopback address"), "{e}");
        assert!(toml::from_str::<NodeConfig>("id = 1\ndata_dir = \"d\"\nauth = \"maybe\"").is_err());
    }

    /// A payload limit no Raft message can carry is refused at load, not
    /// discovered as a replication stall.
    #[test]
    fn payload_limit_must_fit_a_message() {
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"\n[limits]\nmax_payload_bytes = 33554432").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_payload_bytes 33554432 cannot fit a Raft message"), "{e}");
    }

    #[test]
    fn network_key_is_64_hex_characters() {
        let key = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
        let c: NodeConfig = toml::from_str(&format!("id = 1\ndata_dir = \"d\"\nnetwork_key = \"{key}\"")).unwrap();
        c.validate().unwrap();
        let bytes = c.network_key().unwrap().unwrap();
        assert_eq!(bytes[0], 0x01);
        assert_eq!(bytes[31], 0x89);
        // Written back out and read again, it is the same key.
        let again: NodeConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.network_key, c.network_key);

        for bad in [&key[..62], "zz".repeat(32).as_str(), &format!("{key}00"), ""] {
            let c: NodeConfig = toml::from_str(&format!("id = 1\ndata_dir = \"d\"\nnetwork_key = \"{bad}\"")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("network_key must be 64 hex characters"), "{e}");
            assert!(bad.is_empty() || !e.contains(bad), "the error echoes the key: {e}");
        }
        // Without one the node runs (and warns at start).
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"").unwrap();
        assert_eq!(c.network_key().unwrap(), None);
        assert!(!c.to_toml().unwrap().contains("network_key"));
    }

    #[test]
    fn a_default_unsnapshotted_limit_is_left_out_of_a_written_config() {
        // The previous release refuses a key it does not know: a config
        // this version writes must still start it (a rolling upgrade).
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"").unwrap();
        assert_eq!(c.raft.max_unsnapshotted_changes, 0);
        assert!(!c.to_toml().unwrap().contains("max_unsnapshotted_changes"));
        let c: NodeConfig =
            toml::from_str("id = 1\ndata_dir = \"d\"\n[raft]\nmax_unsnapshotted_changes = 500000").unwrap();
        let again: NodeConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.raft.max_unsnapshotted_changes, 500_000);
    }

    #[test]
    fn connection_limits_must_be_positive() {
        let c: NodeConfig = toml::from_str("id = 1\ndata_dir = \"d\"").unwrap();
        assert_eq!((c.limits.max_connections, c.limits.max_connections_per_peer), (256, 8));
        for field in ["max_connections", "max_connections_per_peer", "max_pending_connections"] {
            let c: NodeConfig = toml::from_str(&format!("id = 1\ndata_dir = \"d\"\n[limits]\n{field} = 0")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("must be greater than 0") && e.contains(field), "{e}");
        }
    }
}
