//! Transport stage: node-to-node requests over libp2p.
//!
//! In: opaque request bytes addressed to a [`PeerId`] on a [`Protocol`]
//! (from the consensus network and the blob fetcher), and requests from
//! peers on the wire. Out: the peer's response bytes to the caller, and
//! inbound requests to the node's [`InboundHandler`], whose bytes go back as
//! the response. This stage knows nothing of what the bytes mean.
//!
//! Connections are TCP + the private network handshake (a proof of the
//! cluster's shared key, see `psk`, when one is configured) + noise (authenticated by
//! the node key from [`identity::load_or_create`]) + yamux, under
//! connection limits, and are made or accepted only with peers on the
//! allowlist: a peer off the list never reaches the handler. A connected
//! peer's requests wait for identify to show it runs this node's protocol
//! and engine fingerprint ([`admission`]); one that does not is refused and
//! stays refused.
//! One task owns the libp2p swarm ([`swarm`]); [`P2p`] handles talk to it
//! over a channel, and each inbound request runs on its own task. Raft
//! traffic goes over one long-lived stream per peer ([`raft_stream`]),
//! plugin bytes over libp2p request-response.
//!
//! Besides requests, members gossip (module `gossip`): bytes published on a
//! [`GossipTopic`] with [`P2p::publish`] reach every member's
//! [`P2p::subscribe`] receivers, signed by their author, whose key must be
//! on the receiver's allowlist.

mod admission;
mod codec;
mod error;
mod gossip;
pub mod identity;
mod psk;
mod raft_stream;
mod swarm;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use error::P2pError;
pub use gossip::{Gossip, GossipTopic, MAX_GOSSIP_BYTES};

use swarm::{Command, SwarmTask};

/// Default cap on one `/synod/raft/1` message (request or response).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default cap on one `/synod/blob/1` message: a plugin component plus
/// framing.
pub const DEFAULT_MAX_BLOB_BYTES: usize = 80 * 1024 * 1024;
/// Default time a request may take, from sending to the whole answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection with no open stream is kept. Longer than Raft's
/// heartbeat interval, so a quiet cluster does not redial every beat.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The synod protocol version advertised over identify.
///
/// libp2p 0.57 fixes identify's own stream protocol at `/ipfs/id/1.0.0`;
/// this string travels inside it, followed by the engine fingerprint (see
/// [`P2pConfig::protocol_version`]), and a peer with a different one is
/// refused.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/synod/id/1.0.0";
/// Default cap on open connections, in and out together.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Default cap on connections with one peer.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// Default cap on incoming connections still in their handshake.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: u32 = 64;

/// The allowlist, with the address to dial each peer at if known. Shared
/// by the handles (which change it), the swarm task, the dialer and the
/// Raft streams, so a change is seen everywhere at once; clones share it.
#[derive(Clone, Debug, Default)]
struct Peers(Arc<RwLock<HashMap<PeerId, Option<Multiaddr>>>>);

impl Peers {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<PeerId, Option<Multiaddr>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<PeerId, Option<Multiaddr>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, peer: &PeerId) -> bool {
        self.read().contains_key(peer)
    }

    /// Where to dial `peer`, if it is allowed and its address is known.
    fn address(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.read().get(peer).cloned().flatten()
    }

    fn ids(&self) -> Vec<PeerId> {
        self.read().keys().copied().collect()
    }

    /// Allow `peer`; with `addr`, also record (or replace) its address.
    fn allow(&self, peer: PeerId, addr: Option<Multiaddr>) {
        let mut peers = self.write();
        let known = peers.entry(peer).or_default();
        if addr.is_some() {
            *known = addr;
        }
    }

    fn remove(&self, peer: &PeerId) {
        self.write().remove(peer);
    }
}

/// Which of the node's two protocols a message uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `/synod/raft/1`: Raft RPCs and forwarded client writes; small and
    /// latency-sensitive.
    Raft,
    /// `/synod/blob/1`: plugin bytes; large, under its own cap so a blob
    /// transfer limit does not also allow huge Raft messages.
    Blob,
}

impl Protocol {
    /// The protocol's name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Raft => "/synod/raft/1",
            Protocol::Blob => "/synod/blob/1",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to start the transport.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// The node key; its PeerId is how peers know this node.
    pub keypair: Keypair,
    /// Where to listen, e.g. `/ip4/127.0.0.1/tcp/0` (port 0 picks one).
    pub listen: Multiaddr,
    /// Peers allowed at start, with the address to dial each at if known
    /// (a peer without one can still connect to us, and be answered).
    pub allowed: Vec<(PeerId, Option<Multiaddr>)>,
    /// Cap on one `/synod/raft/1` request or response, both directions.
    pub max_message_bytes: usize,
    /// Cap on one `/synod/blob/1` request or response, both directions.
    pub max_blob_bytes: usize,
    /// How long a request may take, sending to whole answer, on either
    /// side: an inbound request whose handler is slower is dropped too.
    pub request_timeout: Duration,
    /// The cluster's private network key: with it every connection starts
    /// with the key-proof handshake, which a process without the key cannot
    /// complete. `None`: plain TCP + noise, open to anyone who can reach
    /// the port (the allowlist still applies).
    pub network_key: Option<[u8; 32]>,
    /// The engine fingerprint hash this node runs
    /// (`Runtime::fingerprint().hash`); a peer with another one is refused.
    pub engine: String,
    /// Most open connections, in and out together.
    pub max_connections: u32,
    /// Most connections with any one peer.
    pub max_connections_per_peer: u32,
    /// Most incoming connections still in their handshake.
    pub max_pending_connections: u32,
}

impl P2pConfig {
    /// A config with the default caps and timeout and an empty allowlist.
    pub fn new(keypair: Keypair, listen: Multiaddr) -> Self {
        Self {
            keypair,
            listen,
            allowed: Vec::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            network_key: None,
            engine: "none".to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
        }
    }

    /// What this node says over identify, and what it requires a peer to
    /// say: the synod protocol version and the engine fingerprint, e.g.
    /// `/synod/id/1.0.0/engine/0123456789abcdef`.
    pub fn protocol_version(&self) -> String {
        format!("{IDENTIFY_PROTOCOL_VERSION}/engine/{}", self.engine)
    }
}

/// Answers requests from peers.
///
/// Inbound requests are handed to this; the returned bytes are the
/// response. Each call runs on its own task, so calls overlap and a slow
/// one delays nobody else. A handler that panics, or outlasts the request
/// timeout, resets the peer's stream: the peer sees a failed request.
pub trait InboundHandler: Send + Sync + 'static {
    /// Answers `request`, which `from` sent on `protocol`.
    fn handle(&self, from: PeerId, protocol: Protocol, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
}

/// A handle on the running transport; clones share it.
///
/// The swarm task stops on [`P2p::shutdown`], or once every handle is
/// dropped.
#[derive(Clone, Debug)]
pub struct P2p {
    /// Into the swarm task. Unbounded so [`P2p::allow`] and
    /// [`P2p::disallow`] need not be async; every request is awaited by
    /// its caller, which bounds how many are queued.
    commands: mpsc::UnboundedSender<Command>,
    /// This node's PeerId, kept here so reading it needs no round trip.
    local_peer_id: PeerId,
    /// Connected peers as last published by the swarm task.
    connected: watch::Receiver<Vec<PeerId>>,
    /// Cap on `/synod/raft/1` messages, checked before queueing.
    max_message_bytes: usize,
    /// Cap on `/synod/blob/1` messages, checked before queueing.
    max_blob_bytes: usize,
    /// The allowlist and addresses.
    peers: Peers,
    /// `/synod/raft/1` requests.
    raft: Arc<raft_stream::RaftStreams>,
    /// Gossip to publish, into the swarm task; bounded, see
    /// [`P2p::publish`].
    publishes: mpsc::Sender<gossip::Outgoing>,
    /// Received gossip, per topic.
    subscribers: gossip::Subscribers,
    /// Gossip dropped because the publish queue was full.
    gossip_dropped: Arc<AtomicU64>,
    /// Which connected peers are identified, and which are refused.
    admission: admission::Admission,
}

impl P2p {
    /// Binds `config.listen`, starts the swarm task and returns the handle
    /// with the address actually bound (port 0 resolved; without a
    /// `/p2p/` suffix).
    ///
    /// Must be called within a tokio runtime.
    pub async fn start(config: P2pConfig, handler: Arc<dyn InboundHandler>) -> Result<(P2p, Multiaddr), P2pError> {
        let local_peer_id = config.keypair.public().to_peer_id();
        let peers = Peers::default();
        for (peer, addr) in &config.allowed {
            peers.allow(*peer, addr.clone());
        }
        let admission = admission::Admission::new();
        let mut swarm = swarm::build(&config, peers.clone())?;
        let addr = swarm::listen(&mut swarm, &config.listen).await?;

        let mut control = swarm.behaviour().raft.new_control();
        let incoming = control
            .accept(raft_stream::RAFT_PROTOCOL)
            .map_err(|e| P2pError::Transport { reason: format!("cannot accept {}: {e:?}", Protocol::Raft) })?;
        raft_stream::serve(
            incoming,
            handler.clone(),
            peers.clone(),
            admission.clone(),
            config.max_message_bytes,
            config.request_timeout,
        );
        let raft = Arc::new(raft_stream::RaftStreams::new(control, config.max_message_bytes, config.request_timeout));

        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (publishes_tx, publishes) = mpsc::channel(gossip::PUBLISH_QUEUE);
        let subscribers = gossip::Subscribers::new();
        let (connected_tx, connected) = watch::channel(Vec::new());
        let task = SwarmTask::new(
            swarm,
            swarm::Shared { peers: peers.clone(), admission: admission.clone(), subscribers: subscribers.clone() },
            commands,
            publishes,
            handler,
            connected_tx,
            &config,
        );
        tokio::spawn(task.run());
        tracing::info!(
            peer_id = %local_peer_id, %addr, protocol = %config.protocol_version(),
            private_network = config.network_key.is_some(), "p2p transport listening"
        );

        let p2p = P2p {
            commands: commands_tx,
            local_peer_id,
            connected,
            max_message_bytes: config.max_message_bytes,
            max_blob_bytes: config.max_blob_bytes,
            peers,
            raft,
            publishes: publishes_tx,
            subscribers,
            gossip_dropped: Arc::default(),
            admission,
        };
        Ok((p2p, addr))
    }

    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Sends one request and awaits its response; dials `peer` at its known
    /// address if not connected.
    ///
    /// Fails without sending if `peer` is not allowed or the request is
    /// over the protocol's cap.
    pub async fn request(&self, peer: PeerId, protocol: Protocol, request: Vec<u8>) -> Result<Vec<u8>, P2pError> {
        let limit = match protocol {
            Protocol::Raft => self.max_message_bytes,
            Protocol::Blob => self.max_blob_bytes,
        };
        if request.len() > limit {
            return Err(P2pError::TooLarge { protocol, size: request.len(), limit });
        }
        if self.commands.is_closed() {
            return Err(P2pError::Stopped);
        }
        if !self.peers.contains(&peer) {
            return Err(P2pError::NotAllowed { peer });
        }
        if let Some(reason) = self.admission.refusal(&peer) {
            return Err(P2pError::Refused { peer, reason });
        }
        if protocol == Protocol::Raft {
            return self.raft.request(peer, request).await;
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Request { peer, request, reply }).map_err(|_| P2pError::Stopped)?;
        answer.await.map_err(|_| P2pError::Stopped)?
    }

    /// Adds `peer` to the allowlist; with `addr`, also records (or
    /// replaces) where to dial it. A peer with a known address is dialled
    /// now and whenever it is not connected (every few seconds), so members
    /// gossip directly.
    pub fn allow(&self, peer: PeerId, addr: Option<Multiaddr>) {
        self.peers.allow(peer, addr);
        self.send(Command::Allow { peer });
    }

    /// Removes `peer` from the allowlist and closes its connections; a
    /// refusal of it is forgotten, so if it is allowed again later it is
    /// judged afresh.
    pub fn disallow(&self, peer: PeerId) {
        self.peers.remove(&peer);
        self.admission.forget(&peer);
        self.send(Command::Disallow { peer });
    }

    /// Cut this node off from exactly `peers` (the fault battery's network
    /// partition, see [`crate::faults`]); an empty set heals.
    pub fn cut(&self, peers: std::collections::HashSet<PeerId>) {
        self.send(Command::Cut { peers });
    }

    /// The peers on the allowlist.
    pub fn allowed_peers(&self) -> Vec<PeerId> {
        self.peers.ids()
    }

    /// The peers this node refuses because they identified themselves with
    /// another protocol version or engine fingerprint, with the reason
    /// (theirs against ours), sorted. They stay refused until they leave
    /// the allowlist.
    pub fn refused_peers(&self) -> Vec<(PeerId, String)> {
        self.admission.refused()
    }

    /// The peers with at least one open connection, sorted.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.connected.borrow().clone()
    }

    /// Publishes `bytes` on `topic` to every connected member subscribed to
    /// it; without waiting, and without confirmation that anyone got it.
    ///
    /// Fails without sending if `bytes` is over [`MAX_GOSSIP_BYTES`], if the
    /// transport has stopped, or if the queue into the swarm task is full
    /// (then the message is dropped and counted in [`P2p::gossip_dropped`]).
    /// This node's own subscribers do not receive what it publishes.
    pub fn publish(&self, topic: GossipTopic, bytes: Vec<u8>) -> Result<(), P2pError> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(P2pError::GossipTooLarge { topic, size: bytes.len(), limit: MAX_GOSSIP_BYTES });
        }
        match self.publishes.try_send(gossip::Outgoing { topic, data: bytes }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.gossip_dropped.fetch_add(1, Ordering::Relaxed);
                Err(P2pError::GossipFull { topic })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(P2pError::Stopped),
        }
    }

    /// Messages other members publish on `topic` from now on, signed by
    /// members on this node's allowlist. A receiver that falls more than a
    /// thousand messages behind loses the oldest (`RecvError::Lagged`).
    pub fn subscribe(&self, topic: GossipTopic) -> broadcast::Receiver<Gossip> {
        self.subscribers.subscribe(topic)
    }

    /// How many messages [`P2p::publish`] dropped because the swarm task
    /// was behind, since start.
    pub fn gossip_dropped(&self) -> u64 {
        self.gossip_dropped.load(Ordering::Relaxed)
    }

    /// Stops the swarm task: closes the listener and every connection, and
    /// fails requests still waiting with [`P2pError::Stopped`]. Returns once
    /// the swarm is gone; calling it again is harmless.
    pub async fn shutdown(&self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Shutdown { done }).is_ok() {
            // An error means the task ended for another shutdown call.
            let _ = stopped.await;
        }
    }

    fn send(&self, command: Command) {
        if let Err(e) = self.commands.send(command) {
            tracing::debug!(command = ?e.0, "p2p transport stopped; command ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::Notify;
    use tokio::time::timeout;

    use super::*;

    /// Upper bound on any single wait in these tests; all run on loopback,
    /// but on a busy machine with an unoptimised libp2p stack.
    const WAIT: Duration = Duration::from_secs(10);

    /// Records every request and answers `re:` + the request; a request of
    /// exactly `b"wait"` is held until `gate` is notified.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(PeerId, Protocol, Vec<u8>)>>,
        gate: Notify,
    }

    impl Recorder {
        fn seen(&self) -> Vec<(PeerId, Protocol, Vec<u8>)> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl InboundHandler for Arc<Recorder> {
        fn handle(&self, from: PeerId, protocol: Protocol, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
            self.seen.lock().unwrap().push((from, protocol, request.clone()));
            let this = Arc::clone(self);
            Box::pin(async move {
                if request == b"wait" {
                    this.gate.notified().await;
                }
                let mut response = b"re:".to_vec();
                response.extend_from_slice(&request);
                response
            })
        }
    }

    struct Node {
        p2p: P2p,
        addr: Multiaddr,
        recorder: Arc<Recorder>,
    }

    impl Node {
        fn id(&self) -> PeerId {
            self.p2p.local_peer_id()
        }
    }

    fn config(keypair: Keypair, allowed: Vec<(PeerId, Option<Multiaddr>)>) -> P2pConfig {
        P2pConfig {
            allowed,
            request_timeout: Duration::from_secs(5),
            ..P2pConfig::new(keypair, "/ip4/127.0.0.1/tcp/0".parse().unwrap())
        }
    }

    async fn start(config: P2pConfig) -> Node {
        let recorder = Arc::new(Recorder::default());
        let (p2p, addr) = P2p::start(config, Arc::new(Arc::clone(&recorder))).await.unwrap();
        Node { p2p, addr, recorder }
    }

    /// B, then A, each allowing the other; A knows B's address.
    async fn pair(tweak_a: impl FnOnce(&mut P2pConfig), tweak_b: impl FnOnce(&mut P2pConfig)) -> (Node, Node) {
        let ka = Keypair::generate_ed25519();
        let kb = Keypair::generate_ed25519();
        let pa = ka.public().to_peer_id();
        let pb = kb.public().to_peer_id();
        let mut cb = config(kb, vec![(pa, None)]);
        tweak_b(&mut cb);
        let b = start(cb).await;
        let mut ca = config(ka, vec![(pb, Some(b.addr.clone()))]);
        tweak_a(&mut ca);
        let a = start(ca).await;
        (a, b)
    }

    async fn request(from: &Node, to: PeerId, protocol: Protocol, bytes: &[u8]) -> Result<Vec<u8>, P2pError> {
        timeout(WAIT, from.p2p.request(to, protocol, bytes.to_vec())).await.expect("request hung")
    }

    #[tokio::test]
    async fn listen_address_has_the_real_port() {
        let node = start(config(Keypair::generate_ed25519(), vec![])).await;
        let text = node.addr.to_string();
        assert!(text.starts_with("/ip4/127.0.0.1/tcp/"), "{text}");
        assert!(!text.ends_with("/tcp/0"), "port 0 not resolved: {text}");
        node.p2p.shutdown().await;
    }

    #[tokio::test]
    async fn raft_request_reaches_the_handler_and_the_answer_comes_back() {
        let (a, b) = pair(|_| {}, |_| {}).await;

        let answer = request(&a, b.id(), Protocol::Raft, b"append entries").await.unwrap();

        assert_eq!(answer, b"re:append entries");
        assert_eq!(b.recorder.seen(), vec![(a.id(), Protocol::Raft, b"append entries".to_vec())]);
        assert!(a.recorder.seen().is_empty());
        assert_eq!(a.p2p.connected_peers(), vec![b.id()]);

        // B answers back over the connection A made, without knowing A's address.
        let answer = request(&b, a.id(), Protocol::Raft, b"vote").await.unwrap();
        assert_eq!(answer, b"re:vote");
        assert_eq!(a.recorder.seen(), vec![(b.id(), Protocol::Raft, b"vote".to_vec())]);
    }

    /// Raft requests share one stream per peer: many at once each get
    /// their own answer, whatever order the peer finishes them in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_raft_requests_each_get_their_own_answer() {
        let (a, b) = pair(|_| {}, |_| {}).await;
        let asks = (0..300u32).map(|i| {
            let p2p = a.p2p.clone();
            let to = b.id();
            // Sizes vary so frames of different lengths interleave.
            let body: Vec<u8> =
                format!("{i}:").bytes().chain(std::iter::repeat_n(b'x', (i as usize * 37) % 5000)).collect();
            async move { (body.clone(), p2p.request(to, Protocol::Raft, body).await) }
        });
        for (body, answer) in futures::future::join_all(asks).await {
            let mut want = b"re:".to_vec();
            want.extend_from_slice(&body);
            assert!(answer.unwrap() == want, "answer does not match its request");
        }
        assert_eq!(b.recorder.seen().len(), 300);
    }

    #[tokio::test]
    async fn blob_carries_a_multi_megabyte_payload() {
        let (a, b) = pair(|_| {}, |_| {}).await;
        // Not a repeating byte, so a misplaced chunk would show.
        let blob: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();

        let answer = request(&a, b.id(), Protocol::Blob, &blob).await.unwrap();

        assert_eq!(answer.len(), blob.len() + 3);
        assert_eq!(&answer[..3], b"re:");
        assert!(answer[3..] == blob[..]);
        let seen = b.recorder.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].0, seen[0].1), (a.id(), Protocol::Blob));
        assert!(seen[0].2 == blob);
    }

    #[tokio::test]
    async fn raft_cap_is_separate_from_the_blob_cap() {
        // Both sides: B must accept the blob, A must accept its echo.
        let cap = |c: &mut P2pConfig| c.max_message_bytes = 64 * 1024;
        let (a, b) = pair(cap, cap).await;
        let big = vec![7u8; 64 * 1024 + 1];

        let err = request(&a, b.id(), Protocol::Raft, &big).await.unwrap_err();
        assert!(matches!(err, P2pError::TooLarge { protocol: Protocol::Raft, limit: 65536, .. }), "{err:?}");
        assert_eq!(err.to_string(), "a /synod/raft/1 message of 65537 bytes is over the limit of 65536 bytes");
        assert!(b.recorder.seen().is_empty());
        // The same bytes fit the blob protocol.
        let answer = request(&a, b.id(), Protocol::Blob, &big).await.unwrap();
        assert_eq!(answer.len(), big.len() + 3);
    }

    #[tokio::test]
    async fn oversized_request_fails_and_the_peer_keeps_working() {
        // A may send 1 MiB; B accepts 1 KiB. A's own cap is 64 KiB on blobs.
        let (a, b) = pair(|c| c.max_blob_bytes = 64 * 1024, |c| c.max_message_bytes = 1024).await;

        // Refused locally: never sent.
        let err = request(&a, b.id(), Protocol::Blob, &vec![1; 64 * 1024 + 1]).await.unwrap_err();
        assert!(matches!(err, P2pError::TooLarge { protocol: Protocol::Blob, limit: 65536, .. }), "{err:?}");

        // Refused by B's codec from the length prefix.
        let err = request(&a, b.id(), Protocol::Raft, &[2; 4096]).await.unwrap_err();
        assert!(matches!(&err, P2pError::Request { peer, .. } if *peer == b.id()), "{err:?}");
        assert!(err.to_string().contains("size limit"), "{err}");
        assert!(b.recorder.seen().is_empty(), "oversized request reached the handler");

        // The same peer still answers normal requests.
        let answer = request(&a, b.id(), Protocol::Raft, b"small").await.unwrap();
        assert_eq!(answer, b"re:small");
        assert_eq!(b.recorder.seen(), vec![(a.id(), Protocol::Raft, b"small".to_vec())]);
    }

    #[tokio::test]
    async fn oversized_response_fails_the_request() {
        // B answers `re:` + request, so 1000 bytes in is 1003 out, over A's 1002.
        let (a, b) = pair(|c| c.max_message_bytes = 1002, |_| {}).await;
        let err = request(&a, b.id(), Protocol::Raft, &[3; 1000]).await.unwrap_err();
        assert!(err.to_string().contains("over the limit of 1002 bytes"), "{err}");
        assert_eq!(request(&a, b.id(), Protocol::Raft, b"ok").await.unwrap(), b"re:ok");
    }

    #[tokio::test]
    async fn slow_handler_does_not_block_other_requests() {
        let (a, b) = pair(|_| {}, |_| {}).await;

        let slow = tokio::spawn({
            let p2p = a.p2p.clone();
            let to = b.id();
            async move { p2p.request(to, Protocol::Raft, b"wait".to_vec()).await }
        });
        // Wait until B's handler holds the slow request.
        timeout(WAIT, async {
            while b.recorder.seen().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();

        // If the swarm loop awaited the slow handler, this would hang.
        let fast = request(&a, b.id(), Protocol::Raft, b"fast").await.unwrap();
        assert_eq!(fast, b"re:fast");
        assert!(!slow.is_finished());

        b.recorder.gate.notify_one();
        let slow = timeout(WAIT, slow).await.unwrap().unwrap().unwrap();
        assert_eq!(slow, b"re:wait");
    }

    #[tokio::test]
    async fn unanswered_request_times_out_and_the_peer_keeps_working() {
        // Only A's is short: were B's as short, B might give up on the
        // stream first and A would see it closed rather than time out.
        let (a, b) = pair(|c| c.request_timeout = Duration::from_millis(300), |_| {}).await;

        // B's handler never releases `wait`.
        let err = request(&a, b.id(), Protocol::Raft, b"wait").await.unwrap_err();
        assert!(
            matches!(&err, P2pError::Timeout { peer, after } if *peer == b.id() && *after == Duration::from_millis(300)),
            "{err:?}"
        );
        assert!(err.to_string().contains("did not answer within 300ms"), "{err}");

        assert_eq!(request(&a, b.id(), Protocol::Raft, b"next").await.unwrap(), b"re:next");
    }

    #[tokio::test]
    async fn unknown_peer_is_refused() {
        let (a, b) = pair(|_| {}, |_| {}).await;
        // C knows and allows A; A has never heard of C.
        let kc = Keypair::generate_ed25519();
        let c = start(config(kc, vec![(a.id(), Some(a.addr.clone()))])).await;

        let err = request(&c, a.id(), Protocol::Raft, b"let me in").await.unwrap_err();
        assert!(matches!(&err, P2pError::Request { .. } | P2pError::Dial { .. } | P2pError::Lost { .. }), "{err:?}");
        let err = request(&c, a.id(), Protocol::Blob, b"let me in").await.unwrap_err();
        assert!(matches!(&err, P2pError::Request { .. } | P2pError::Dial { .. }), "{err:?}");

        // A refuses to talk to C too, without trying.
        let err = request(&a, c.id(), Protocol::Raft, b"hello?").await.unwrap_err();
        assert!(matches!(&err, P2pError::NotAllowed { peer } if *peer == c.id()), "{err:?}");
        assert_eq!(err.to_string(), format!("peer {} is not on this node's allowlist", c.id()));

        assert!(a.recorder.seen().is_empty(), "A's handler saw {:?}", a.recorder.seen());
        assert!(!a.p2p.connected_peers().contains(&c.id()));
        // A still works with the peer it does allow.
        assert_eq!(request(&a, b.id(), Protocol::Raft, b"hi").await.unwrap(), b"re:hi");
    }

    #[tokio::test]
    async fn allow_at_runtime_lets_a_refused_peer_in_and_disallow_shuts_it_out() {
        let a = start(config(Keypair::generate_ed25519(), vec![])).await;
        let c = start(config(Keypair::generate_ed25519(), vec![(a.id(), Some(a.addr.clone()))])).await;

        assert!(request(&c, a.id(), Protocol::Raft, b"first").await.is_err());
        assert!(a.recorder.seen().is_empty());

        a.p2p.allow(c.id(), None);
        let answer = request(&c, a.id(), Protocol::Raft, b"second").await.unwrap();
        assert_eq!(answer, b"re:second");
        assert_eq!(a.recorder.seen(), vec![(c.id(), Protocol::Raft, b"second".to_vec())]);

        a.p2p.disallow(c.id());
        let err = request(&a, c.id(), Protocol::Raft, b"x").await.unwrap_err();
        assert!(matches!(err, P2pError::NotAllowed { .. }), "{err:?}");
        assert!(request(&c, a.id(), Protocol::Raft, b"third").await.is_err());
        assert_eq!(a.recorder.seen().len(), 1, "a disallowed peer reached the handler");
    }

    /// Peers on each other's allowlists still need the same network key.
    #[tokio::test]
    async fn only_peers_with_the_network_key_connect() {
        let key = Some([7; 32]);
        let (a, b) = pair(|c| c.network_key = key, |c| c.network_key = key).await;
        assert_eq!(request(&a, b.id(), Protocol::Raft, b"same key").await.unwrap(), b"re:same key");

        for other in [Some([8; 32]), None] {
            let kc = Keypair::generate_ed25519();
            a.p2p.allow(kc.public().to_peer_id(), None);
            let c = start(P2pConfig { network_key: other, ..config(kc, vec![(a.id(), Some(a.addr.clone()))]) }).await;
            let err = request(&c, a.id(), Protocol::Raft, b"let me in").await.unwrap_err();
            // A handshake with the wrong key fails or, reading noise as
            // garbage, never finishes: either way no request gets through.
            assert!(
                matches!(&err, P2pError::Dial { .. } | P2pError::Request { .. } | P2pError::Timeout { .. }),
                "{err:?}"
            );
            assert!(!a.p2p.connected_peers().contains(&c.id()));
        }
        assert_eq!(a.recorder.seen().len(), 0);
        assert_eq!(b.recorder.seen().len(), 1);
    }

    /// A peer that identifies with another engine fingerprint is refused
    /// on both sides, and stays refused when the membership allows it
    /// again; only leaving the allowlist clears that.
    #[tokio::test]
    async fn a_peer_with_another_engine_is_refused_and_stays_refused() {
        let (a, b) = pair(|c| c.engine = "aaaa".into(), |c| c.engine = "bbbb".into()).await;
        let err = request(&a, b.id(), Protocol::Raft, b"append").await.unwrap_err();
        assert!(!matches!(err, P2pError::NotAllowed { .. }), "{err:?}");
        assert!(b.recorder.seen().is_empty(), "a refused peer reached the handler");

        let reason = format!(
            "it runs {IDENTIFY_PROTOCOL_VERSION}/engine/aaaa, this node {IDENTIFY_PROTOCOL_VERSION}/engine/bbbb"
        );
        timeout(WAIT, async {
            while b.p2p.refused_peers().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(b.p2p.refused_peers(), vec![(a.id(), reason)]);

        // Allowed again (as every membership change does): still refused.
        b.p2p.allow(a.id(), None);
        let err = request(&b, a.id(), Protocol::Raft, b"x").await.unwrap_err();
        assert!(matches!(&err, P2pError::Refused { peer, .. } if *peer == a.id()), "{err:?}");
        assert!(err.to_string().contains("engine/aaaa"), "{err}");
        assert!(request(&a, b.id(), Protocol::Blob, b"x").await.is_err());
        assert!(b.recorder.seen().is_empty() && a.recorder.seen().is_empty());

        b.p2p.disallow(a.id());
        b.p2p.allow(a.id(), None);
        assert!(b.p2p.refused_peers().is_empty());
    }

    #[tokio::test]
    async fn peer_without_an_address_cannot_be_dialled() {
        let a = start(config(Keypair::generate_ed25519(), vec![])).await;
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        a.p2p.allow(stranger, None);
        let err = request(&a, stranger, Protocol::Raft, b"x").await.unwrap_err();
        assert!(matches!(&err, P2pError::Dial { peer, .. } if *peer == stranger), "{err:?}");
    }

    #[tokio::test]
    async fn shutdown_stops_the_node() {
        let (a, b) = pair(|_| {}, |_| {}).await;
        assert_eq!(request(&a, b.id(), Protocol::Raft, b"up").await.unwrap(), b"re:up");

        b.p2p.shutdown().await;
        b.p2p.shutdown().await;
        let err = request(&b, a.id(), Protocol::Raft, b"x").await.unwrap_err();
        assert!(matches!(err, P2pError::Stopped), "{err:?}");
        assert!(b.p2p.connected_peers().is_empty());

        // B's listener and connections are gone, so A cannot reach it.
        assert!(request(&a, b.id(), Protocol::Raft, b"anyone?").await.is_err());
        assert_eq!(b.recorder.seen().len(), 1);
    }

    /// A node that allows `allowed`, dialling each at its address if given.
    async fn member(key: Keypair, allowed: Vec<(PeerId, Option<Multiaddr>)>) -> Node {
        start(config(key, allowed)).await
    }

    /// Publishes `tag:<n>` from `from` every 100 ms until `to` receives one
    /// (gossip flows once the peers are connected and have told each other
    /// their subscriptions); returns what `to` got.
    async fn gossip_until(from: &Node, topic: GossipTopic, to: &mut broadcast::Receiver<Gossip>, tag: &str) -> Gossip {
        timeout(WAIT, async {
            for n in 0.. {
                from.p2p.publish(topic, format!("{tag}:{n}").into_bytes()).unwrap();
                let wait = tokio::time::sleep(Duration::from_millis(100));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        got = to.recv() => {
                            let got = got.unwrap();
                            if got.data.starts_with(format!("{tag}:").as_bytes()) {
                                return got;
                            }
                        }
                        _ = &mut wait => break,
                    }
                }
            }
            unreachable!()
        })
        .await
        .expect("gossip never arrived")
    }

    /// Everything `rx` holds now.
    fn drain(rx: &mut broadcast::Receiver<Gossip>) -> Vec<Gossip> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_reaches_every_member_on_its_topic_only() {
        let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
        let ids: Vec<PeerId> = keys.iter().map(|k| k.public().to_peer_id()).collect();
        // A knows nobody's address, B knows A's, C knows A's and B's: the
        // dialler connects them all.
        let a = member(keys[0].clone(), vec![(ids[1], None), (ids[2], None)]).await;
        let b = member(keys[1].clone(), vec![(ids[0], Some(a.addr.clone())), (ids[2], None)]).await;
        let c = member(keys[2].clone(), vec![(ids[0], Some(a.addr.clone())), (ids[1], Some(b.addr.clone()))]).await;
        let mut a_tel = a.p2p.subscribe(GossipTopic::Telemetry);
        let mut b_tel = b.p2p.subscribe(GossipTopic::Telemetry);
        let mut b_dig = b.p2p.subscribe(GossipTopic::Digest);
        let mut c_tel = c.p2p.subscribe(GossipTopic::Telemetry);
        let mut c_dig = c.p2p.subscribe(GossipTopic::Digest);

        let got = gossip_until(&a, GossipTopic::Telemetry, &mut b_tel, "a").await;
        assert_eq!(got.from, a.id());
        let got = gossip_until(&a, GossipTopic::Telemetry, &mut c_tel, "a").await;
        assert_eq!(got.from, a.id());
        let got = gossip_until(&c, GossipTopic::Digest, &mut b_dig, "c").await;
        assert_eq!(got.from, c.id());
        assert_eq!(gossip_until(&b, GossipTopic::Telemetry, &mut a_tel, "b").await.from, b.id());

        // Once the mesh is up, one message reaches each other member once,
        // on its topic only, and not the publisher itself.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for rx in [&mut a_tel, &mut b_tel, &mut b_dig, &mut c_tel, &mut c_dig] {
            drain(rx);
        }
        b.p2p.publish(GossipTopic::Digest, b"digest 7".to_vec()).unwrap();
        let got = timeout(WAIT, c_dig.recv()).await.unwrap().unwrap();
        assert_eq!(got, Gossip { from: b.id(), data: b"digest 7".to_vec() });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Only this message counts: one of the messages published above
        // until the mesh was up may still arrive late (gossipsub's lazy
        // push), on its own topic, which is no fault.
        let copies = |rx: &mut broadcast::Receiver<Gossip>| drain(rx).iter().filter(|g| g.data == b"digest 7").count();
        assert_eq!(copies(&mut c_dig), 0, "delivered twice");
        assert_eq!(copies(&mut b_dig), 0, "delivered to its publisher");
        assert_eq!(copies(&mut a_tel) + copies(&mut c_tel), 0, "delivered on the wrong topic");
        assert_eq!(b.p2p.gossip_dropped(), 0);
    }

    /// B allows everyone; A allows B and D; C is a member only for B. A
    /// hears D through B, but never C, though B relays both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_from_a_non_member_is_not_delivered_even_through_a_member() {
        let keys: Vec<Keypair> = (0..4).map(|_| Keypair::generate_ed25519()).collect();
        let [pa, pb, pc, pd] = [0, 1, 2, 3].map(|i| keys[i].public().to_peer_id());
        let b = member(keys[1].clone(), vec![(pa, None), (pc, None), (pd, None)]).await;
        let to_b = Some(b.addr.clone());
        let a = member(keys[0].clone(), vec![(pb, to_b.clone()), (pd, None)]).await;
        let c = member(keys[2].clone(), vec![(pb, to_b.clone())]).await;
        let d = member(keys[3].clone(), vec![(pb, to_b.clone()), (pa, None)]).await;
        let mut a_rx = a.p2p.subscribe(GossipTopic::Telemetry);
        let mut b_rx = b.p2p.subscribe(GossipTopic::Telemetry);

        // B takes C's messages; A takes D's, which only B can have relayed.
        assert_eq!(gossip_until(&c, GossipTopic::Telemetry, &mut b_rx, "c").await.from, pc);
        assert_eq!(gossip_until(&d, GossipTopic::Telemetry, &mut a_rx, "d").await.from, pd);
        assert!(!a.p2p.connected_peers().contains(&pd), "A and D are connected; nothing was relayed");

        // Now both publish; A gets every message of D and none of C.
        drain(&mut a_rx);
        for n in 0..5 {
            c.p2p.publish(GossipTopic::Telemetry, format!("c-late:{n}").into_bytes()).unwrap();
            d.p2p.publish(GossipTopic::Telemetry, format!("d-late:{n}").into_bytes()).unwrap();
        }
        let mut from_d = 0;
        timeout(WAIT, async {
            while from_d < 5 {
                let got = a_rx.recv().await.unwrap();
                assert_eq!(got.from, pd, "A delivered {:?}", String::from_utf8_lossy(&got.data));
                from_d += 1;
            }
        })
        .await
        .expect("D's messages did not all reach A");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let late = drain(&mut a_rx);
        assert!(late.iter().all(|g| g.from != pc), "A delivered a non-member's message: {late:?}");
        assert!(!a.p2p.connected_peers().contains(&pc));
    }

    #[tokio::test]
    async fn gossip_over_the_cap_or_after_shutdown_is_refused() {
        let a = start(config(Keypair::generate_ed25519(), vec![])).await;
        let err = a.p2p.publish(GossipTopic::Digest, vec![0; MAX_GOSSIP_BYTES + 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "a synod/digest/1 gossip message of {} bytes is over the limit of {MAX_GOSSIP_BYTES} bytes",
                MAX_GOSSIP_BYTES + 1
            )
        );
        // Alone, there is nobody to publish to, which is not an error.
        a.p2p.publish(GossipTopic::Digest, vec![0; MAX_GOSSIP_BYTES]).unwrap();
        a.p2p.shutdown().await;
        assert!(matches!(a.p2p.publish(GossipTopic::Digest, b"x".to_vec()), Err(P2pError::Stopped)));
    }

    #[tokio::test]
    async fn dropping_every_handle_stops_the_task() {
        let (a, b) = pair(|_| {}, |_| {}).await;
        assert!(request(&a, b.id(), Protocol::Raft, b"up").await.is_ok());
        let mut connected = a.p2p.connected.clone();
        let b_id = b.id();
        drop(b);
        // A sees the connection close once B's swarm is dropped.
        timeout(WAIT, connected.wait_for(|peers| !peers.contains(&b_id))).await.unwrap().unwrap();
    }
}
