//! A running node, wired together.
//!
//! In: a [`NodeConfig`] and a bound HTTP listener. Out: a node serving the
//! HTTP API and the NATS bus, taking part in consensus over libp2p, until
//! shut down — or until its storage fails, which [`RunningNode::fatal`]
//! reports so the process can say why and exit.
//!
//! - [`service`]: what the node offers clients, transport-neutral, with
//!   one error type ([`ServiceError`]) that `api/` and `bus/` map to HTTP
//!   and NATS status.
//! - [`write_path`]: client writes into log entries — the leader's batcher,
//!   a follower's forwarder — over bounded queues.
//! - [`peer`]: the peer protocol — one typed request helper out, the
//!   handlers for what peers ask in.
//! - [`gossip`]: what travels on gossipsub — digest notices (compared
//!   against ours, alarm on a mismatch) and device telemetry (the latest
//!   reading per device and metric, on every node).
//! - [`device_service`]: device shadows for clients.
//! - [`discovery`]: how a node that knows one member finds the others.
//!
//! This file holds the wiring: starting and stopping a node, membership
//! and leader lookups, and the background tasks (owned by a `JoinSet` that
//! shutdown stops).

pub mod auth;
pub mod device_service;
pub mod discovery;
pub mod divergence;
pub mod gossip;
pub mod peer;
pub mod replay;
pub mod service;
pub mod write_path;

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use openraft::{Raft, SnapshotPolicy};
use tokio::task::JoinSet;

use crate::artifacts::{ArtifactError, Artifacts};
use crate::config::NodeConfig;
use crate::consensus::network::Network;
use crate::consensus::rpc::{NodeStatus, WriteError};
use crate::consensus::{LogStore, NodeId, NodeInfo, Shared, StateMachineStore, TypeConfig};
use crate::driver::io::Fence;
use crate::driver::{DriverComponent, DriverRuntime};
use crate::p2p::{P2p, P2pConfig};
use crate::runtime::Runtime;
pub use auth::Principal;
pub use service::{ANONYMOUS, Consistency, LimitRequest, SYSTEM, ServiceError};
use write_path::{Queue, Queued};

/// The peer protocol version a node speaks (and a joining node must).
pub const PROTOCOL_VERSION: &str = crate::p2p::IDENTIFY_PROTOCOL_VERSION;

/// Largest message on `/synod/raft/1`, bytes. An entry is capped well below
/// it (`limits.max_entry_bytes`), so one always fits; an append of several
/// that does not is split (see `consensus::network`).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How often [`RunningNode::fatal`] looks whether Raft has stopped.
const FATAL_CHECK: Duration = Duration::from_millis(100);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data dir could not be used.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The transport failed to start.
    #[error(transparent)]
    P2p(#[from] crate::p2p::P2pError),
    /// The wasm runtime failed to start.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    /// The plugin store failed to open.
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    /// openraft refused to start, or stopped.
    #[error("raft: {0}")]
    Raft(String),
    /// The API's TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] crate::api::tls::TlsError),
    /// The data dir was last run by a binary with another engine.
    #[error(
        "data dir {path} was last run with engine {was}, and this synod runs engine {now}: nodes of one cluster \
         must apply plugins with one engine, and this node's log and state were made with the other. To move a \
         cluster to a new engine: take a backup (`synod backup`) with the old binary, `synod restore` it with the \
         new binary into a new data dir, start that node and add new nodes running the new binary (README, \
         \"Upgrading\"); or run the binary this data dir was made with"
    )]
    EngineChanged {
        /// The data dir.
        path: std::path::PathBuf,
        /// The engine it was last run with.
        was: String,
        /// This binary's.
        now: String,
    },
}

/// The engine fingerprint hash a data dir was last run with (`engine` in
/// it); recorded on first start, checked on every start after.
fn check_engine(dir: &std::path::Path, now: &str) -> Result<(), NodeError> {
    let path = dir.join("engine");
    let io = |source| NodeError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(was) if was.trim() == now => Ok(()),
        Ok(was) => {
            Err(NodeError::EngineChanged { path: dir.to_owned(), was: was.trim().to_owned(), now: now.to_owned() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = dir.join("engine.tmp");
            std::fs::write(&tmp, format!("{now}\n")).map_err(io)?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// Everything a node's tasks and handlers share.
pub struct NodeInner {
    /// This node's id.
    pub id: NodeId,
    /// Its configuration.
    pub config: NodeConfig,
    /// The Raft instance.
    pub raft: Raft<TypeConfig>,
    /// The term of this node's saved vote and its last log index when it
    /// started: the floor of its read index while it leads in that term
    /// (see [`NodeInner::read_index_local`]).
    resumed: (u64, u64),
    /// Replicated state, for reads.
    pub shared: Arc<Shared>,
    /// Transport.
    pub p2p: P2p,
    /// Plugin bytes and compiled plugins.
    pub artifacts: Arc<Artifacts>,
    /// The address peers reach this node at.
    pub p2p_addr: Multiaddr,
    /// The HTTP address clients reach this node at.
    pub http_addr: std::net::SocketAddr,
    /// Members from the config file, until the membership carries them.
    pub(crate) seed_members: BTreeMap<NodeId, NodeInfo>,
    /// Members the seeds named (see [`discovery`]), until the membership
    /// carries them: the leader's Raft messages are checked against them
    /// before this node has a membership of its own.
    pub(crate) discovered: std::sync::RwLock<BTreeMap<NodeId, NodeInfo>>,
    /// The NATS client, when a bus is configured.
    pub bus: OnceLock<async_nats::Client>,
    /// Writes waiting for the next batch (see [`write_path::batcher`]).
    batch: tokio::sync::mpsc::Sender<Queued>,
    /// Writes waiting to be forwarded to the leader (see
    /// [`write_path::forwarder`]).
    forward: tokio::sync::mpsc::Sender<Queued>,
    /// The driver engine (not the fingerprinted command-handler engine).
    pub drivers: Arc<DriverRuntime>,
    /// Compiled drivers by sha256, each compiled once however many devices
    /// ask at the same time.
    driver_cache: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::OnceCell<Arc<DriverComponent>>>>>,
    /// This node's ownership lease: device writes stop when it runs out.
    pub fence: Arc<Fence>,
    /// The latest reading of each device metric, from every member's gossip.
    pub telemetry: gossip::Telemetry,
    /// Held while this node catches up to look for a token it does not
    /// know (see [`NodeInner::authenticate_caught_up`]): one read barrier
    /// at a time, however many unknown tokens arrive; when the last one
    /// that succeeded started.
    token_catch_up: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

/// A started node.
pub struct RunningNode {
    /// Shared state of the node.
    pub inner: Arc<NodeInner>,
    /// The HTTP server task.
    http: tokio::task::JoinHandle<()>,
    /// Every background task (write path, bus, membership, digests).
    tasks: JoinSet<()>,
    /// Signals the HTTP server to stop.
    stop: tokio::sync::watch::Sender<bool>,
    /// The data dir's lock, held while the node runs.
    _lock: crate::recover::DataDirLock,
}

/// The wall clock in Unix milliseconds, as this node stamps entries with it
/// (shifted by a clock-jump fault when the battery injects one).
pub fn now_ms() -> u64 {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    wall.saturating_add_signed(crate::faults::clock_offset_ms())
}

impl RunningNode {
    /// Start a node serving HTTP on `http`.
    pub async fn start(config: NodeConfig, http: tokio::net::TcpListener) -> Result<RunningNode, NodeError> {
        config.validate()?;
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        // One node per data dir, and no offline tool (recovery) under it.
        let lock = crate::recover::DataDirLock::take(dir).map_err(|e| NodeError::DataDir {
            path: dir.clone(),
            source: std::io::Error::other(match e {
                crate::recover::RecoverError::Running(_) => "another node is running on this data dir".to_owned(),
                other => other.to_string(),
            }),
        })?;
        // Until the node serves its API, its port answers 503 `starting`
        // (opening a large state and its log takes seconds).
        let tls = match &config.tls {
            Some(tls) => Some(crate::api::tls::server_config(&tls.cert, &tls.key)?),
            None => None,
        };
        let starting =
            while_starting(&http, tls.clone()).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        let keypair = crate::p2p::identity::load_or_create(dir)?;
        let runtime = Arc::new(Runtime::new()?.with_max_component_bytes(config.limits.max_plugin_bytes));
        check_engine(dir, &runtime.fingerprint().hash)?;
        let artifacts = Arc::new(Artifacts::open(&dir.join("plugins"), runtime)?);
        let cell: Arc<OnceLock<Arc<NodeInner>>> = Arc::new(OnceLock::new());

        let mut seed_members = BTreeMap::new();
        let mut allowed = Vec::new();
        for p in &config.peers {
            seed_members.insert(
                p.id,
                NodeInfo { peer_id: p.peer_id.clone(), p2p_addr: p.p2p.clone(), http_addr: p.http.clone() },
            );
            if let Ok(peer) = PeerId::from_str(&p.peer_id) {
                allowed.push((peer, p.p2p.parse().ok()));
            }
        }
        let network_key = config.network_key()?;
        if network_key.is_none() {
            tracing::warn!(
                "NO PRIVATE NETWORK KEY: network_key is not set in this node's config, so any process that \
                 reaches the p2p port {} can complete a handshake with this node (only the allowlist stops \
                 it). Set the same 64-hex-character network_key on every member.",
                config.p2p
            );
        }
        let runtime_fingerprint = artifacts.runtime().fingerprint().hash.clone();
        let listen: Multiaddr = config
            .p2p
            .parse()
            .map_err(|e| crate::config::ConfigError::Invalid(format!("p2p address {:?}: {e}", config.p2p)))?;
        let p2p_config = P2pConfig {
            keypair,
            listen,
            allowed,
            max_message_bytes: MAX_RAFT_MESSAGE_BYTES,
            max_blob_bytes: config.limits.max_plugin_bytes + 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            network_key,
            engine: runtime_fingerprint,
            max_connections: config.limits.max_connections,
            max_connections_per_peer: config.limits.max_connections_per_peer,
            max_pending_connections: config.limits.max_pending_connections,
        };
        let (p2p, p2p_addr) = P2p::start(p2p_config, Arc::new(peer::Inbound(cell.clone()))).await?;
        let http_addr = http.local_addr().map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        seed_members.insert(
            config.id,
            NodeInfo {
                peer_id: p2p.local_peer_id().to_string(),
                p2p_addr: p2p_addr.to_string(),
                http_addr: http_addr.to_string(),
            },
        );

        let log = LogStore::open(dir).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        let stepped_down = log
            .step_down_after_restart(config.id)
            .map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        if let Some(term) = stepped_down {
            tracing::info!(
                term,
                "led before it stopped: stands for election in a later term, not as the leader it was"
            );
        }
        let resumed = log.resume_point().map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        let sm = StateMachineStore::open(dir, artifacts.clone(), Arc::new(peer::PeerBlobs(cell.clone())))
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let shared = sm.shared();
        let r = &config.raft;
        shared.snapshot_after_entries.store(r.snapshot_after_entries, std::sync::atomic::Ordering::Relaxed);
        shared.max_unsnapshotted_changes.store(
            usize::try_from(r.max_unsnapshotted_changes).unwrap_or(usize::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        let raft_config = openraft::Config {
            cluster_name: "synod".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            // The node asks for snapshots itself (`snapshot_when_due`).
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let network = Network { p2p: p2p.clone(), max_append_bytes: config.limits.max_entry_bytes };
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let capacity = config.limits.max_queued_writes;
        let (batch, batch_queue) = tokio::sync::mpsc::channel(capacity);
        let (forward, forward_queue) = tokio::sync::mpsc::channel(capacity);

        let max_entry_bytes = config.limits.max_entry_bytes;
        let drivers = artifacts.drivers().clone();
        let inner = Arc::new(NodeInner {
            id: config.id,
            config,
            raft,
            resumed,
            shared,
            p2p,
            artifacts,
            p2p_addr,
            http_addr,
            seed_members,
            discovered: Default::default(),
            bus: OnceLock::new(),
            batch,
            forward,
            drivers,
            driver_cache: Default::default(),
            token_catch_up: Default::default(),
            fence: Arc::new(Fence::default()),
            telemetry: gossip::Telemetry::default(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(write_path::batcher(inner.raft.clone(), Queue::new(batch_queue), max_entry_bytes));
        tasks.spawn(snapshot_when_due(inner.raft.clone(), inner.shared.clone()));
        tasks.spawn(write_path::forwarder(Arc::downgrade(&inner), Queue::new(forward_queue), max_entry_bytes));
        let _ = cell.set(inner.clone());
        tracing::info!(id = inner.id, peer_id = %inner.p2p.local_peer_id(), p2p = %inner.p2p_addr, http = %http_addr, "node started");
        // The leader before the restart stands again at once rather than
        // after an election timeout: the followers' lease on it does not
        // hold it off (see vendor/openraft/SYNOD-PATCH.md), so a restarted
        // cluster has its leader back as soon as a quorum answers.
        if stepped_down.is_some() {
            let raft = inner.raft.clone();
            tasks.spawn(async move {
                if let Err(e) = raft.trigger().elect().await {
                    tracing::debug!(error = %e, "could not stand for election at start");
                }
            });
        }

        if inner.config.bootstrap && !inner.raft.is_initialized().await.unwrap_or(true) {
            match inner.raft.initialize(inner.seed_members.clone()).await {
                Ok(()) => {
                    tracing::info!(members = ?inner.seed_members.keys().collect::<Vec<_>>(), "cluster initialized")
                }
                Err(e) => tracing::warn!(error = %e, "initialize skipped"),
            }
        }
        if inner.config.nats.url.is_some() {
            match crate::bus::start(inner.clone(), &mut tasks).await {
                Ok(client) => {
                    let _ = inner.bus.set(client);
                }
                Err(e) => tracing::error!(error = %e, "NATS bus not started; HTTP and Raft carry on"),
            }
        }
        if inner.config.bootstrap {
            tasks.spawn(auth::bootstrap(inner.clone()));
        }
        if !inner.auth_on() {
            tracing::warn!(
                http = %http_addr,
                "AUTHENTICATION IS OFF (auth = \"off\"): anyone who reaches this node's HTTP API or its NATS subjects may \
                 upload plugins, change the membership and run any command, as \"anonymous\""
            );
        }
        tasks.spawn(follow_membership(inner.clone()));
        tasks.spawn(discovery::discover(inner.clone()));
        tasks.spawn(replicate_settings(inner.clone()));
        tasks.spawn(compare_digests(inner.clone()));
        tasks.spawn(gossip::telemetry(inner.clone()));
        tasks.spawn(crate::devices::heartbeat(inner.clone(), inner.fence.clone()));
        tasks.spawn(crate::devices::reassign(inner.clone()));
        tasks.spawn(crate::devices::manager(inner.clone(), inner.fence.clone()));
        tasks.spawn(crate::metrics::watch_worker());

        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let app = crate::api::router(inner.clone());
        let stopping = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        if let Some(tls) = &inner.config.tls {
            tracing::info!(cert = %tls.cert.display(), "the HTTP API speaks TLS only");
        }
        // The starting answers stop as the node's own take over.
        drop(starting);
        let http = crate::api::serve(http, tls, app, stopping).map_err(|source| NodeError::DataDir {
            path: inner.config.tls.as_ref().map_or_else(|| inner.config.data_dir.clone(), |t| t.cert.clone()),
            source,
        })?;
        Ok(RunningNode { inner, http, tasks, stop, _lock: lock })
    }

    /// Resolves when Raft has stopped on a fatal error (a storage fault:
    /// the disk is full or failing). The node can no longer apply or vote;
    /// the caller should report the error and exit rather than linger as a
    /// member that answers but never moves.
    ///
    /// It looks every [`FATAL_CHECK`] rather than on each change of Raft's
    /// metrics: those change with every append and commit (thousands of
    /// times a second under load), and the caller usually awaits this on the
    /// process's main thread, which each change would wake.
    pub async fn fatal(&self) -> NodeError {
        let metrics = self.inner.raft.metrics();
        let mut every = tokio::time::interval(FATAL_CHECK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(e) = &metrics.borrow().running_state {
                return NodeError::Raft(format!("raft stopped: {e}"));
            }
            if metrics.has_changed().is_err() {
                return NodeError::Raft("raft stopped".into());
            }
        }
    }

    /// Stop serving, stop the background tasks and leave Raft cleanly.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        // In-flight requests get a moment to be answered.
        if tokio::time::timeout(Duration::from_secs(2), &mut self.http).await.is_err() {
            self.http.abort();
        }
        self.tasks.shutdown().await;
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.inner.p2p.shutdown().await;
    }
}

/// Answer every request on `http` with 503 `starting`
/// ([`crate::api::starting_router`]) until the returned sender is dropped.
/// It serves a second handle to the same socket, so the node's own server
/// takes the port over without a moment in which it is closed.
fn while_starting(
    http: &tokio::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<tokio::sync::oneshot::Sender<()>> {
    use std::os::fd::AsFd as _;
    let early = std::net::TcpListener::from(http.as_fd().try_clone_to_owned()?);
    early.set_nonblocking(true)?;
    let (started, starting) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = starting.await;
    };
    crate::api::serve(tokio::net::TcpListener::from_std(early)?, tls, crate::api::starting_router(), stop)?;
    Ok(started)
}

/// Ask openraft for a snapshot whenever one is due
/// ([`crate::consensus::state_machine::Shared::snapshot_due`], which the
/// apply thread checks after each batch): a no-op while one is being
/// built, and at most one ask a second. Looked at again when woken, so an
/// ask left over from while a build ran does not start another. Also
/// every second while the changes since the last snapshot are past the
/// most for bulk commands: the leader then holds those, so no entry may
/// come to be applied and ask (a build that ended still past it, or
/// failed).
async fn snapshot_when_due(raft: Raft<TypeConfig>, shared: Arc<Shared>) {
    loop {
        let woken = tokio::time::timeout(Duration::from_secs(1), shared.snapshot_wanted.notified()).await.is_ok();
        if !woken && shared.past_unsnapshotted_max(true).is_none() {
            continue;
        }
        let due = shared.replica.read().ok().and_then(|replica| shared.snapshot_due(&replica));
        let Some(why) = due else { continue };
        tracing::debug!(why, "asking for a snapshot");
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keep the transport's allowlist equal to the applied membership: a key
/// may connect once the membership change that names it has committed and
/// been applied here, and not after the change that removes it. Until this
/// node has applied a membership, the peers of its config file are the
/// allowlist.
async fn follow_membership(node: Arc<NodeInner>) {
    let mut membership = node.shared.membership.subscribe();
    loop {
        let members: BTreeMap<NodeId, NodeInfo> =
            membership.borrow_and_update().nodes().map(|(id, n)| (*id, n.clone())).collect();
        if !members.is_empty() {
            let mut keep = BTreeSet::new();
            for info in members.values() {
                if let Ok(peer) = PeerId::from_str(&info.peer_id) {
                    keep.insert(peer);
                    node.p2p.allow(peer, info.p2p_addr.parse().ok());
                }
            }
            for peer in node.p2p.allowed_peers() {
                if !keep.contains(&peer) && peer != node.p2p.local_peer_id() {
                    tracing::info!(%peer, "peer left the membership; disallowing it");
                    node.p2p.disallow(peer);
                }
            }
        }
        if membership.changed().await.is_err() {
            return;
        }
    }
}

/// While this node leads, make the replicated cluster settings what its
/// config asks for (checked every second; a no-op once they agree).
async fn replicate_settings(node: Arc<NodeInner>) {
    let wanted = node.config.limits.cluster_settings();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if node.leader().0 != Some(node.id) || node.with_replica(|r| r.settings()) == Some(wanted) {
            continue;
        }
        let request = crate::consensus::Request {
            timestamp_ms: 0,
            caller: "synod".into(),
            request_id: None,
            op: crate::consensus::Op::Settings(wanted),
        };
        match node.write_local(request).await {
            Ok(_) => tracing::info!(?wanted, "cluster settings replicated"),
            Err(e) => tracing::debug!(error = %e, "cannot replicate cluster settings yet"),
        }
    }
}

/// Every second, gossip our digest; and alarm when a member's digest differs
/// from ours at the same applied operation.
async fn compare_digests(node: Arc<NodeInner>) {
    let mut inbox = node.p2p.subscribe(crate::p2p::GossipTopic::Digest);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let gossip = tokio::select! {
            _ = tick.tick() => {
                if let Some(notice) = gossip::DigestNotice::ours(&node) {
                    notice.publish(&node.p2p);
                }
                continue;
            }
            received = inbox.recv() => match received {
                Ok(gossip) => gossip,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "digest gossip came faster than it was compared; skipped some");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        let Some(status) = gossip::DigestNotice::received(&node, &gossip) else { continue };
        node.shared.note_peer_unsnapshotted(status.node, status.unsnapshotted_changes, status.unsnapshotted_max);
        let ours = node.with_replica(|r| r.digest_at(status.digest_index)).flatten();
        if let Some(ours) = ours
            && ours.to_hex() != status.digest
        {
            tracing::error!(
                peer = status.node, index = status.digest_index, ours = %ours, theirs = %status.digest,
                "STATE DIVERGENCE: a member applied the same entries to a different state"
            );
            node.shared.divergence.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(client) = node.bus.get() {
                let body = serde_json::json!({ "node": node.id, "peer": status.node, "index": status.digest_index });
                crate::bus::notify(client, "divergence", body).await;
            }
        }
    }
}

impl NodeInner {
    /// The compiled driver with this sha256 (compiled once per node, off
    /// the async workers).
    pub async fn driver_component(&self, sha256: &str) -> Result<Arc<DriverComponent>, String> {
        let cell = match self.driver_cache.lock() {
            Ok(mut m) => m.entry(sha256.to_owned()).or_default().clone(),
            Err(_) => return Err("driver cache lock poisoned".into()),
        };
        cell.get_or_try_init(|| async {
            let bytes = match self.artifacts.get(sha256) {
                Ok(Some(b)) => b,
                Ok(None) => self.fetch_blob(sha256).await?,
                Err(e) => return Err(e.to_string()),
            };
            let drivers = self.drivers.clone();
            let component = tokio::task::spawn_blocking(move || drivers.compile(&bytes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(component))
        })
        .await
        .cloned()
    }

    /// Current members (from the latest membership, else the config and
    /// what discovery learned from it).
    pub fn members(&self) -> BTreeMap<NodeId, NodeInfo> {
        let metrics = self.raft.metrics().borrow().clone();
        let nodes: BTreeMap<NodeId, NodeInfo> =
            metrics.membership_config.nodes().map(|(id, n)| (*id, n.clone())).collect();
        if !nodes.is_empty() {
            return nodes;
        }
        let mut nodes = self.discovered.read().map(|d| d.clone()).unwrap_or_default();
        // The config wins over what a seed said about the same id.
        nodes.extend(self.seed_members.clone());
        nodes
    }

    /// Voter ids of the current membership.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = metrics.membership_config.voter_ids().collect();
        if voters.is_empty() { self.seed_members.keys().copied().collect() } else { voters }
    }

    /// The leader's id and HTTP address, if known.
    pub fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let leader = self.raft.metrics().borrow().current_leader;
        (leader, leader.and_then(|l| self.members().get(&l).map(|n| n.http_addr.clone())))
    }

    fn not_leader(&self) -> WriteError {
        let (leader_id, leader_http) = self.leader();
        WriteError::NotLeader { leader_id, leader_http }
    }

    /// This node's position and digest.
    pub fn status(&self) -> NodeStatus {
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        let (digest_index, digest) = self.with_replica(|r| (r.last_applied(), r.digest().to_hex())).unwrap_or_default();
        NodeStatus {
            id: self.id,
            applied_index: applied,
            digest_index,
            digest,
            engine: self.artifacts.runtime().fingerprint().hash.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// While a node starts, its port answers at once with 503 `starting`
    /// (a client learns to ask another member instead of waiting on a
    /// connection nobody accepts), and the node's own server then takes
    /// the same port over: every new connection reaches it.
    #[tokio::test]
    async fn a_starting_node_answers_at_once_then_hands_its_port_over() {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/readyz", http.local_addr().unwrap());
        // A new connection per request: a kept-alive one would only show
        // which server accepted it first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = || reqwest::Client::builder().timeout(Duration::from_secs(5)).pool_max_idle_per_host(0).build();
        let starting = super::while_starting(&http, None).unwrap();
        for _ in 0..3 {
            let r = client().unwrap().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 503);
            assert_eq!(r.headers()["retry-after"], "1");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["kind"], "starting", "{body}");
        }

        drop(starting);
        let app = axum::Router::new().route("/readyz", axum::routing::get(|| async { "ready" }));
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        crate::api::serve(http, None, app, async move {
            let _ = stopped.await;
        })
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = client().unwrap().get(&url).send().await.unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the node's own server never took the port over");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..20 {
            let r = client().unwrap().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "a starting answer after the node's own server took over");
            assert_eq!(r.text().await.unwrap(), "ready");
        }
    }
}
