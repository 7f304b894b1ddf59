//! A running node: transport, Raft, stores and the operations the API
//! offers, wired together.
//!
//! In: a [`NodeConfig`] and a bound HTTP listener. Out: a node serving the
//! HTTP API, taking part in consensus over libp2p, until shut down.
//! Client writes go to the leader (followers forward them over libp2p);
//! linearizable reads wait for a read index confirmed by the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use libp2p::{Multiaddr, PeerId};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, SnapshotPolicy};

use crate::apply::StateMachine;
use crate::artifacts::{ArtifactError, Artifacts};
use crate::config::NodeConfig;
use crate::consensus::network::Network;
use crate::consensus::rpc::{BlobReply, BlobRpc, NodeStatus, RaftReply, RaftRpc, WriteError};
use crate::consensus::{
    BlobSource, LogStore, NodeId, NodeInfo, Op, Request, Response, Shared, StateMachineStore,
    TypeConfig,
};
use crate::p2p::{InboundHandler, P2p, P2pConfig, Protocol};
use crate::runtime::{LoadError, PluginLimits, Runtime};

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
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The component is not acceptable (4xx).
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// Too few voters stored the bytes.
    #[error("only {stored} of {needed} voters stored the plugin bytes: {reason}")]
    NoQuorum {
        /// Voters that confirmed.
        stored: usize,
        /// A majority.
        needed: usize,
        /// The last failure.
        reason: String,
    },
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] ArtifactError),
    /// Proposing the install failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Everything a node's tasks and handlers share.
pub struct NodeInner {
    /// This node's id.
    pub id: NodeId,
    /// Its configuration.
    pub config: NodeConfig,
    /// The Raft instance.
    pub raft: Raft<TypeConfig>,
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
    seed_members: BTreeMap<NodeId, NodeInfo>,
    /// The NATS client, when a bus is configured.
    pub bus: OnceLock<async_nats::Client>,
    /// Writes waiting for the next batch (see [`batcher`]).
    batch: tokio::sync::mpsc::UnboundedSender<Queued>,
    /// Writes waiting to be forwarded to the leader (see [`forwarder`]).
    forward: tokio::sync::mpsc::UnboundedSender<Queued>,
}

/// Where a queued write's answer goes.
type Reply = tokio::sync::oneshot::Sender<Result<(u64, Response), WriteError>>;

/// A write waiting to be proposed, and where its answer goes.
struct Queued {
    request: Request,
    reply: Reply,
}

/// `first` and whatever else is already queued, up to one entry's worth.
fn take_batch(first: Queued, queue: &mut tokio::sync::mpsc::UnboundedReceiver<Queued>) -> (Vec<Request>, Vec<Reply>) {
    let (mut requests, mut replies) = (vec![first.request], vec![first.reply]);
    while requests.len() < crate::consensus::types::OPS_PER_ENTRY as usize {
        match queue.try_recv() {
            Ok(q) => {
                requests.push(q.request);
                replies.push(q.reply);
            }
            Err(_) => break,
        }
    }
    (requests, replies)
}

/// Propose queued writes as batches: one log entry (one append, one fsync
/// on each node) for every write that arrived while the previous proposal
/// was in flight. openraft 0.9 flushes each append before it takes the
/// next, so without this a leader does one fsync per client write.
async fn batcher(raft: Raft<TypeConfig>, mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = queue.recv().await {
        let (mut requests, replies) = take_batch(first, &mut queue);
        let now = now_ms();
        for r in &mut requests {
            r.timestamp_ms = now;
        }
        let entry = Request { timestamp_ms: now, caller: "synod".into(), request_id: None, op: Op::Batch(requests) };
        match raft.client_write(entry).await {
            Ok(r) => {
                let mut items = r.data.items.into_iter();
                for reply in replies {
                    let answer = match items.next() {
                        Some(item) => Ok((item.index, item)),
                        None => Err(WriteError::Failed("batch response is missing an item".into())),
                    };
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                let error = match e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                        WriteError::NotLeader { leader_id: None, leader_http: None }
                    }
                    e => WriteError::Failed(e.to_string()),
                };
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Forwarded batches a follower has in flight to the leader at once.
const FORWARDS_IN_FLIGHT: usize = 4;

/// Forward queued writes to the leader in batches: one RPC for every write
/// that arrived while the node waited for a free slot (at most
/// [`FORWARDS_IN_FLIGHT`] batches in flight). A write sent to a follower
/// (over HTTP, or from the NATS queue group, which spreads them over all
/// nodes) then costs the follower and the leader a share of one RPC, not
/// one each.
async fn forwarder(node: std::sync::Weak<NodeInner>, mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (requests, replies) = take_batch(first, &mut queue);
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            node.forward_batch(requests, replies).await;
            drop(slot);
        });
    }
}

/// A started node.
pub struct RunningNode {
    /// Shared state of the node.
    pub inner: Arc<NodeInner>,
    /// The HTTP server task.
    http: tokio::task::JoinHandle<()>,
    /// Signals the HTTP server to stop.
    stop: tokio::sync::watch::Sender<bool>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Inbound requests wait for the node to finish starting.
struct Inbound(Arc<OnceLock<Arc<NodeInner>>>);

impl InboundHandler for Inbound {
    fn handle(&self, from: PeerId, protocol: Protocol, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let cell = self.0.clone();
        Box::pin(async move {
            let Some(node) = cell.get().cloned() else {
                return encode(&RaftReply::Refused("node is starting".into()));
            };
            match protocol {
                Protocol::Raft => encode(&node.handle_raft(from, &request).await),
                Protocol::Blob => encode(&node.handle_blob(&request)),
            }
        })
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap_or_default()
}

/// Fetches plugin bytes from whichever member has them.
struct PeerBlobs(Arc<OnceLock<Arc<NodeInner>>>);

impl BlobSource for PeerBlobs {
    fn fetch(&self, sha256: String) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let cell = self.0.clone();
        Box::pin(async move {
            let node = cell.get().cloned().ok_or("node is starting")?;
            let mut last = String::from("no other member");
            for (id, info) in node.members() {
                if id == node.id {
                    continue;
                }
                let Ok(peer) = PeerId::from_str(&info.peer_id) else { continue };
                let req = encode(&BlobRpc::Fetch(sha256.clone()));
                match node.p2p.request(peer, Protocol::Blob, req).await {
                    Ok(bytes) => match postcard::from_bytes::<BlobReply>(&bytes) {
                        Ok(BlobReply::Bytes(b)) => return Ok(b),
                        Ok(other) => last = format!("node {id}: {other:?}"),
                        Err(e) => last = format!("node {id}: {e}"),
                    },
                    Err(e) => last = format!("node {id}: {e}"),
                }
            }
            Err(last)
        })
    }
}

impl RunningNode {
    /// Start a node serving HTTP on `http`.
    pub async fn start(config: NodeConfig, http: tokio::net::TcpListener) -> Result<RunningNode, NodeError> {
        config.validate()?;
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        let keypair = crate::p2p::identity::load_or_create(dir)?;
        let runtime = Arc::new(Runtime::new()?.with_max_component_bytes(config.limits.max_plugin_bytes));
        let artifacts = Arc::new(Artifacts::open(&dir.join("plugins"), runtime)?);
        let cell: Arc<OnceLock<Arc<NodeInner>>> = Arc::new(OnceLock::new());

        let mut seed_members = BTreeMap::new();
        let mut allowed = Vec::new();
        for p in &config.peers {
            seed_members.insert(p.id, NodeInfo { peer_id: p.peer_id.clone(), p2p_addr: p.p2p.clone(), http_addr: p.http.clone() });
            if let Ok(peer) = PeerId::from_str(&p.peer_id) {
                allowed.push((peer, p.p2p.parse().ok()));
            }
        }
        let listen: Multiaddr = config
            .p2p
            .parse()
            .map_err(|e| crate::config::ConfigError::Invalid(format!("p2p address {:?}: {e}", config.p2p)))?;
        let p2p_config = P2pConfig {
            keypair,
            listen,
            allowed,
            max_message_bytes: 16 * 1024 * 1024,
            max_blob_bytes: config.limits.max_plugin_bytes + 1024 * 1024,
            request_timeout: Duration::from_secs(10),
        };
        let (p2p, p2p_addr) = P2p::start(p2p_config, Arc::new(Inbound(cell.clone()))).await?;
        let http_addr = http.local_addr().map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        seed_members.insert(
            config.id,
            NodeInfo { peer_id: p2p.local_peer_id().to_string(), p2p_addr: p2p_addr.to_string(), http_addr: http_addr.to_string() },
        );

        let log = LogStore::open(dir).map_err(|source| NodeError::DataDir { path: dir.clone(), source })?;
        let sm = StateMachineStore::open(dir, artifacts.clone(), Arc::new(PeerBlobs(cell.clone())))
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let shared = sm.shared();
        let r = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "synod".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let raft = Raft::new(config.id, Arc::new(raft_config), Network { p2p: p2p.clone() }, log, sm)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let (batch, queue) = tokio::sync::mpsc::unbounded_channel();
        let (forward, forward_queue) = tokio::sync::mpsc::unbounded_channel();

        let inner = Arc::new(NodeInner {
            id: config.id,
            config,
            raft,
            shared,
            p2p,
            artifacts,
            p2p_addr,
            http_addr,
            seed_members,
            bus: OnceLock::new(),
            batch,
            forward,
        });
        tokio::spawn(batcher(inner.raft.clone(), queue));
        tokio::spawn(forwarder(Arc::downgrade(&inner), forward_queue));
        let _ = cell.set(inner.clone());
        tracing::info!(id = inner.id, peer_id = %inner.p2p.local_peer_id(), p2p = %inner.p2p_addr, http = %http_addr, "node started");

        if inner.config.bootstrap && !inner.raft.is_initialized().await.unwrap_or(true) {
            match inner.raft.initialize(inner.seed_members.clone()).await {
                Ok(()) => tracing::info!(members = ?inner.seed_members.keys().collect::<Vec<_>>(), "cluster initialized"),
                Err(e) => tracing::warn!(error = %e, "initialize skipped"),
            }
        }
        if inner.config.nats.url.is_some() {
            match crate::bus::start(inner.clone()).await {
                Ok(client) => {
                    let _ = inner.bus.set(client);
                }
                Err(e) => tracing::error!(error = %e, "NATS bus not started; HTTP and Raft carry on"),
            }
        }
        tokio::spawn(watch_membership(inner.clone()));
        tokio::spawn(compare_digests(inner.clone()));

        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let app = crate::api::router(inner.clone());
        let http = tokio::spawn(async move {
            let serve = axum::serve(http, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "http server failed");
            }
        });
        Ok(RunningNode { inner, http, stop })
    }

    /// Stop serving and leave Raft cleanly.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.http.await;
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.inner.p2p.shutdown().await;
    }
}

/// Keep the transport's allowlist equal to the membership (plus the seed
/// peers): a member's key may connect, anyone else's may not.
async fn watch_membership(node: Arc<NodeInner>) {
    let mut metrics = node.raft.metrics();
    loop {
        for (_, info) in node.members() {
            if let (Ok(peer), Ok(addr)) = (PeerId::from_str(&info.peer_id), info.p2p_addr.parse()) {
                node.p2p.allow(peer, Some(addr));
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Every second, ask each member for its digest and alarm when one differs
/// from ours at the same applied operation.
async fn compare_digests(node: Arc<NodeInner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for status in node.peer_statuses().await.into_iter().flatten() {
            let ours = node.shared.sm.read().ok().and_then(|sm| sm.digest_at(status.digest_index));
            if let Some(ours) = ours
                && ours.to_hex() != status.digest {
                    tracing::error!(
                        peer = status.id, index = status.digest_index, ours = %ours, theirs = %status.digest,
                        "STATE DIVERGENCE: a member applied the same entries to a different state"
                    );
                    node.shared.divergence.store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Some(client) = node.bus.get() {
                        let body = serde_json::json!({ "node": node.id, "peer": status.id, "index": status.digest_index });
                        crate::bus::notify(client, "divergence", body).await;
                    }
                }
        }
    }
}

impl NodeInner {
    /// Current members (from the applied membership, else the config).
    pub fn members(&self) -> BTreeMap<NodeId, NodeInfo> {
        let metrics = self.raft.metrics().borrow().clone();
        let nodes: BTreeMap<NodeId, NodeInfo> =
            metrics.membership_config.nodes().map(|(id, n)| (*id, n.clone())).collect();
        if nodes.is_empty() { self.seed_members.clone() } else { nodes }
    }

    /// Voter ids of the current membership.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = metrics.membership_config.voter_ids().collect();
        if voters.is_empty() { self.seed_members.keys().copied().collect() } else { voters }
    }

    fn peer_of(&self, id: NodeId) -> Option<PeerId> {
        self.members().get(&id).and_then(|n| PeerId::from_str(&n.peer_id).ok())
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

    async fn handle_raft(&self, from: PeerId, request: &[u8]) -> RaftReply {
        let rpc: RaftRpc = match postcard::from_bytes(request) {
            Ok(r) => r,
            Err(e) => return RaftReply::Refused(format!("undecodable request: {e}")),
        };
        // A Raft message speaks for a node id: only that node's key may send it.
        let claimed = match &rpc {
            RaftRpc::Append(r) => Some(r.vote.leader_id().voted_for()),
            RaftRpc::Vote(r) => Some(r.vote.leader_id().voted_for()),
            RaftRpc::Snapshot(r) => Some(r.vote.leader_id().voted_for()),
            _ => None,
        };
        if let Some(Some(id)) = claimed
            && self.peer_of(id) != Some(from) {
                tracing::warn!(%from, claimed = id, "refused a Raft message from a key not bound to its node id");
                return RaftReply::Refused(format!("peer {from} is not node {id}"));
            }
        match rpc {
            RaftRpc::Append(r) => RaftReply::Append(self.raft.append_entries(r).await),
            RaftRpc::Vote(r) => RaftReply::Vote(self.raft.vote(r).await),
            RaftRpc::Snapshot(r) => RaftReply::Snapshot(self.raft.install_snapshot(r).await),
            RaftRpc::WriteBatch(writes) => {
                // All queue at once, so they share this node's next proposal.
                RaftReply::WriteBatch(futures::future::join_all(writes.into_iter().map(|w| self.write_local(w))).await)
            }
            RaftRpc::ReadIndex => RaftReply::ReadIndex(self.read_index_local().await),
            RaftRpc::Status => RaftReply::Status(self.status()),
        }
    }

    fn handle_blob(&self, request: &[u8]) -> BlobReply {
        match postcard::from_bytes::<BlobRpc>(request) {
            Ok(BlobRpc::Push(bytes)) => match self.artifacts.put(&bytes) {
                Ok(sha) => BlobReply::Stored(sha),
                Err(e) => BlobReply::Failed(e.to_string()),
            },
            Ok(BlobRpc::Fetch(sha)) => match self.artifacts.get(&sha) {
                Ok(Some(b)) => BlobReply::Bytes(b),
                Ok(None) => BlobReply::NotFound,
                Err(e) => BlobReply::Failed(e.to_string()),
            },
            Err(e) => BlobReply::Failed(format!("undecodable request: {e}")),
        }
    }

    /// Propose on this node (it believes it leads) in the next batch; the
    /// batch stamps the time. Answers with the operation's index.
    async fn write_local(&self, request: Request) -> Result<(u64, Response), WriteError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.batch
            .send(Queued { request, reply })
            .map_err(|_| WriteError::Failed("the node is shutting down".into()))?;
        match answer.await {
            Ok(Err(WriteError::NotLeader { .. })) => Err(self.not_leader()),
            Ok(result) => result,
            Err(_) => Err(WriteError::Failed("the node is shutting down".into())),
        }
    }

    /// Replicate `op` through the leader, wherever it is; waits out an
    /// election (up to a few seconds) rather than failing at once.
    pub async fn write(&self, op: Op, caller: &str) -> Result<(u64, Response), WriteError> {
        self.write_request(op, caller, None).await
    }

    /// [`NodeInner::write`] with a client request id for deduplication. For
    /// a retry, the index returned is the first application's.
    pub async fn write_request(
        &self,
        op: Op,
        caller: &str,
        request_id: Option<String>,
    ) -> Result<(u64, Response), WriteError> {
        let request = Request { timestamp_ms: 0, caller: caller.to_owned(), request_id, op };
        let (index, response) = self
            .on_leader(|| self.write_local(request.clone()), |_| self.forward_write(request.clone()))
            .await?;
        Ok((response.first_index.unwrap_or(index), response))
    }

    /// Queue a write for the [`forwarder`] and wait for the leader's answer.
    async fn forward_write(&self, request: Request) -> Result<(u64, Response), WriteError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.forward
            .send(Queued { request, reply })
            .map_err(|_| WriteError::Failed("the node is shutting down".into()))?;
        answer.await.unwrap_or_else(|_| Err(WriteError::Failed("the node is shutting down".into())))
    }

    /// Send one batch of queued writes to the leader and hand out the
    /// answers; when there is no other leader to send to, each write is told
    /// so and retries (see [`NodeInner::on_leader`]).
    async fn forward_batch(&self, requests: Vec<Request>, replies: Vec<Reply>) {
        let n = replies.len();
        let answers = match self.leader().0 {
            Some(l) if l != self.id => match self.forward(l, RaftRpc::WriteBatch(requests)).await {
                Ok(RaftReply::WriteBatch(answers)) if answers.len() == n => answers,
                Ok(RaftReply::Refused(why)) => vec![Err(WriteError::Failed(format!("the leader refused: {why}"))); n],
                Ok(_) => vec![Err(WriteError::Failed("the leader's answer does not match the batch".into())); n],
                Err(e) => vec![Err(e); n],
            },
            _ => vec![Err(self.not_leader()); n],
        };
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }

    /// Run an operation on the leader: locally if this node leads, else
    /// forwarded over libp2p. While no leader is known (an election), wait
    /// and retry for up to five seconds rather than failing at once.
    async fn on_leader<T, Fut, RemoteFut>(
        &self,
        local: impl Fn() -> Fut,
        remote: impl Fn(NodeId) -> RemoteFut,
    ) -> Result<T, WriteError>
    where
        Fut: std::future::Future<Output = Result<T, WriteError>>,
        RemoteFut: std::future::Future<Output = Result<T, WriteError>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let result = match self.leader().0 {
                Some(l) if l == self.id => local().await,
                Some(l) => remote(l).await,
                None => Err(self.not_leader()),
            };
            match result {
                Err(WriteError::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn forward(&self, leader: NodeId, rpc: RaftRpc) -> Result<RaftReply, WriteError> {
        let peer = self.peer_of(leader).ok_or_else(|| self.not_leader())?;
        let bytes = self
            .p2p
            .request(peer, Protocol::Raft, encode(&rpc))
            .await
            .map_err(|_| self.not_leader())?;
        postcard::from_bytes(&bytes).map_err(|e| WriteError::Failed(format!("bad reply from leader: {e}")))
    }

    async fn read_index_local(&self) -> Result<u64, WriteError> {
        match self.raft.ensure_linearizable().await {
            Ok(id) => Ok(id.map(|i| i.index).unwrap_or(0)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_))) => Err(self.not_leader()),
            Err(e) => Err(WriteError::Failed(e.to_string())),
        }
    }

    /// Wait until this node has applied everything committed before now, as
    /// confirmed by the leader: what makes a following read linearizable.
    pub async fn read_barrier(&self) -> Result<(), WriteError> {
        let index = self
            .on_leader(
                || self.read_index_local(),
                |l| async move {
                    match self.forward(l, RaftRpc::ReadIndex).await? {
                        RaftReply::ReadIndex(i) => i,
                        other => Err(WriteError::Failed(format!("leader answered {other:?}"))),
                    }
                },
            )
            .await?;
        self.raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| WriteError::Failed(format!("waiting to apply index {index}: {e}")))
    }

    /// This node's position and digest.
    pub fn status(&self) -> NodeStatus {
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        let (digest_index, digest) = match self.shared.sm.read() {
            Ok(sm) => (sm.last_applied(), sm.digest().to_hex()),
            Err(_) => (0, String::new()),
        };
        NodeStatus { id: self.id, applied_index: applied, digest_index, digest, engine: self.artifacts.runtime().fingerprint().hash.clone() }
    }

    /// Every other member's status (`None` for one that did not answer).
    pub async fn peer_statuses(&self) -> Vec<Option<NodeStatus>> {
        let mut out = Vec::new();
        for (id, _) in self.members() {
            if id == self.id {
                continue;
            }
            let status = match self.peer_of(id) {
                Some(peer) => {
                    let ask = self.p2p.request(peer, Protocol::Raft, encode(&RaftRpc::Status));
                    match tokio::time::timeout(Duration::from_millis(500), ask).await {
                        Ok(Ok(bytes)) => match postcard::from_bytes(&bytes) {
                            Ok(RaftReply::Status(s)) => Some(s),
                            _ => None,
                        },
                        _ => None,
                    }
                }
                None => None,
            };
            out.push(status);
        }
        out
    }

    /// Validate, store, spread to a quorum of voters, then propose the
    /// install. Nothing enters the log unless all of that succeeded.
    pub async fn upload(
        &self,
        name: &str,
        version: &str,
        bytes: Vec<u8>,
        limits: PluginLimits,
        caller: &str,
    ) -> Result<(u64, Response), UploadError> {
        self.artifacts.runtime().precompile(&bytes, &limits)?;
        let sha256 = self.artifacts.put(&bytes)?;
        let voters = self.voters();
        let needed = voters.len() / 2 + 1;
        let mut stored = usize::from(voters.contains(&self.id));
        let mut reason = String::new();
        let push = encode(&BlobRpc::Push(bytes.clone()));
        let mut pending = Vec::new();
        for id in voters.iter().copied().filter(|id| *id != self.id) {
            if let Some(peer) = self.peer_of(id) {
                let p2p = self.p2p.clone();
                let push = push.clone();
                pending.push(async move { (id, p2p.request(peer, Protocol::Blob, push).await) });
            }
        }
        for (id, result) in futures::future::join_all(pending).await {
            match result.map(|b| postcard::from_bytes::<BlobReply>(&b)) {
                Ok(Ok(BlobReply::Stored(s))) if s == sha256 => stored += 1,
                Ok(Ok(other)) => reason = format!("node {id}: {other:?}"),
                Ok(Err(e)) => reason = format!("node {id}: {e}"),
                Err(e) => reason = format!("node {id}: {e}"),
            }
        }
        if stored < needed {
            return Err(UploadError::NoQuorum { stored, needed, reason });
        }
        let op = Op::InstallPlugin {
            name: name.to_owned(),
            version: version.to_owned(),
            sha256,
            size: bytes.len() as u64,
            limits,
        };
        Ok(self.write(op, caller).await?)
    }

    /// Add a node: first as a learner (it catches up), then as a voter.
    pub async fn add_node(&self, id: NodeId, info: NodeInfo) -> Result<u64, WriteError> {
        if let (Ok(peer), Ok(addr)) = (PeerId::from_str(&info.peer_id), info.p2p_addr.parse()) {
            self.p2p.allow(peer, Some(addr));
        }
        let fail = |e: String| WriteError::Failed(e);
        if self.leader().0 != Some(self.id) {
            return Err(self.not_leader());
        }
        self.raft.add_learner(id, info, true).await.map_err(|e| fail(e.to_string()))?;
        let r = self
            .raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(r.log_id.index)
    }

    /// Remove a node from the membership.
    pub async fn remove_node(&self, id: NodeId) -> Result<u64, WriteError> {
        if self.leader().0 != Some(self.id) {
            return Err(self.not_leader());
        }
        let r = self
            .raft
            .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(|e| WriteError::Failed(e.to_string()))?;
        Ok(r.log_id.index)
    }

    /// Run `f` with read access to the replicated state.
    pub fn with_state<T>(&self, f: impl FnOnce(&StateMachine) -> T) -> Option<T> {
        self.shared.sm.read().ok().map(|sm| f(&sm))
    }
}
