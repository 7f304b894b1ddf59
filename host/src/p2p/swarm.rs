//! The swarm task: the one owner of the libp2p [`Swarm`].
//!
//! In: [`Command`]s and gossip to publish from [`super::P2p`] handles, swarm
//! events, and answers from inbound-request tasks. Out: `/synod/blob/1`
//! requests on the wire, replies to the callers that made them, inbound
//! blob requests handed to the [`InboundHandler`] each on its own task,
//! gossip published and received (see [`super::gossip`]), dials to allowed
//! peers not connected yet, and the set of connected peers. Raft streams
//! (see [`super::raft_stream`]) are driven by the `raft` behaviour here but
//! read and written by their own tasks.
//!
//! Nothing here awaits a handler or a caller: the loop only moves messages,
//! so a slow handler never stalls anything else.
//!
//! Here, too, peers are judged: identify tells each peer's protocol version
//! and engine fingerprint, and one that differs from ours is refused (see
//! [`super::admission`]); a connection that fails the private network
//! handshake is logged for the operator.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, PortUse};
use libp2p::core::upgrade::Version;
use libp2p::core::{Endpoint, Transport as _};
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, ListenError, NetworkBehaviour, SwarmEvent, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, gossipsub, identify, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot, watch};

use super::admission::Admission;
use super::codec::FrameCodec;
use super::gossip::{self, Outgoing, Subscribers};
use super::{IDLE_CONNECTION_TIMEOUT, InboundHandler, P2pConfig, P2pError, Peers, Protocol};

/// Wire name of [`Protocol::Blob`].
const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new(Protocol::Blob.name());
/// How often allowed peers that are not connected are dialled. Raft only
/// connects a leader to its followers; gossip wants every pair of members
/// connected, so a message does not depend on one relay.
const DIAL_INTERVAL: Duration = Duration::from_secs(5);

/// Everything the node speaks on a connection.
#[derive(NetworkBehaviour)]
pub(super) struct SynodBehaviour {
    /// First on purpose: the derived behaviour asks its fields in order, so
    /// a peer off the list is refused before the other behaviours ever get
    /// a handler on its connection.
    allowed: allow_block_list::Behaviour<AllowedPeers>,
    /// Second, for the same reason: caps on connections in total, per peer
    /// and still in their handshake, so a flood of connections costs a
    /// bounded amount.
    limits: connection_limits::Behaviour,
    /// Where to dial a peer that is dialled by id alone.
    book: AddressBook,
    /// `/synod/raft/1`: long-lived streams for Raft RPCs and forwarded
    /// client writes (see [`super::raft_stream`]).
    pub(super) raft: libp2p_stream::Behaviour,
    /// `/synod/blob/1`: plugin bytes, request-response under a larger cap.
    blob: request_response::Behaviour<FrameCodec>,
    /// Tells peers our listen addresses, protocol version and engine
    /// fingerprint, and tells us theirs: a peer that differs is refused.
    identify: identify::Behaviour,
    /// Signed publish/subscribe among members (see [`super::gossip`]).
    gossip: gossipsub::Behaviour,
}

/// Gives libp2p the configured address of a peer it dials by id alone, as
/// the Raft streams do; it adds nothing to a connection.
pub(super) struct AddressBook {
    peers: Peers,
}

impl NetworkBehaviour for AddressBook {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.and_then(|p| self.peers.address(&p)).into_iter().collect())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}
}

/// What a [`super::P2p`] handle asks of the swarm task.
pub(super) enum Command {
    /// Send `request` to `peer` on `/synod/blob/1` and deliver the answer
    /// on `reply`.
    Request {
        /// The peer to ask.
        peer: PeerId,
        /// The request bytes, already checked against the cap.
        request: Vec<u8>,
        /// Where the caller waits.
        reply: oneshot::Sender<Result<Vec<u8>, P2pError>>,
    },
    /// Put `peer` on the allowlist (its address is in [`Peers`]).
    Allow {
        /// The peer to admit.
        peer: PeerId,
    },
    /// Take `peer` off the allowlist and close its connections.
    Disallow {
        /// The peer to refuse.
        peer: PeerId,
    },
    /// Cut this node off from exactly these peers (a fault the battery
    /// injects, see [`crate::faults`]): their connections are closed and
    /// refused until they leave the set.
    Cut {
        /// The peers to be unreachable.
        peers: HashSet<PeerId>,
    },
    /// Stop the task; `done` fires once the swarm is dropped.
    Shutdown {
        /// Fired after the swarm and its listener are gone.
        done: oneshot::Sender<()>,
    },
}

/// Shows sizes, not request bytes, which may be megabytes.
impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Request { peer, request, .. } => {
                write!(f, "Request({peer}, {} bytes)", request.len())
            }
            Command::Allow { peer } => write!(f, "Allow({peer})"),
            Command::Disallow { peer } => write!(f, "Disallow({peer})"),
            Command::Cut { peers } => write!(f, "Cut({} peers)", peers.len()),
            Command::Shutdown { .. } => f.write_str("Shutdown"),
        }
    }
}

/// A handler's response on its way back to the swarm task.
struct Answer {
    /// libp2p's handle on the waiting inbound stream.
    channel: ResponseChannel<Vec<u8>>,
    /// The handler's bytes.
    response: Vec<u8>,
}

/// A caller waiting for an outbound request.
struct Pending {
    /// The peer asked, for error messages.
    peer: PeerId,
    /// Where the caller waits.
    reply: oneshot::Sender<Result<Vec<u8>, P2pError>>,
}

/// Concurrent blob request streams (inbound + outbound).
const MAX_CONCURRENT_STREAMS: usize = 2048;

/// TCP, then the private network handshake when there is a key (see
/// [`super::psk`]), then noise and yamux. The key goes first so that a
/// process without it cannot get as far as noise or protocol negotiation.
fn transport(
    keypair: &libp2p::identity::Keypair,
    network_key: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError> {
    let noise = noise::Config::new(keypair).map_err(|e| P2pError::Transport { reason: e.to_string() })?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default());
    // V1Lazy as libp2p's own TCP builder: the protocol proposal goes out
    // with the first bytes.
    Ok(match network_key {
        Some(key) => tcp
            .and_then(move |socket, _| super::psk::handshake(key, socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    })
}

/// Builds the swarm: TCP + network-key proof + noise + yamux, and [`SynodBehaviour`].
pub(super) fn build(config: &P2pConfig, peers: Peers) -> Result<Swarm<SynodBehaviour>, P2pError> {
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let blob = request_response::Behaviour::with_codec(
        FrameCodec::new(config.max_blob_bytes),
        [(BLOB_PROTOCOL, ProtocolSupport::Full)],
        rr_config,
    );
    let gossip = gossip::behaviour(&config.keypair)?;
    let transport = transport(&config.keypair, config.network_key)?;
    let limits = ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_pending_connections));
    let swarm = SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| match e {})?
        .with_behaviour(|key| SynodBehaviour {
            allowed: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            book: AddressBook { peers },
            raft: libp2p_stream::Behaviour::new(),
            blob,
            identify: identify::Behaviour::new(
                identify::Config::new(config.protocol_version(), key.public())
                    .with_agent_version(format!("synod/{}", env!("CARGO_PKG_VERSION"))),
            ),
            gossip,
        })
        .map_err(|e| match e {})?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
                // Send the first bytes with the protocol proposal instead of
                // waiting a round trip for the peer to accept it: every
                // Synod node speaks both protocols.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// Starts listening on `addr` and waits until the listener has an address
/// (port 0 resolved).
pub(super) async fn listen(swarm: &mut Swarm<SynodBehaviour>, addr: &Multiaddr) -> Result<Multiaddr, P2pError> {
    let listen_err = |reason: String| P2pError::Listen { addr: addr.clone(), reason };
    let id = swarm.listen_on(addr.clone()).map_err(|e| listen_err(e.to_string()))?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { listener_id, address } if listener_id == id => return Ok(address),
            SwarmEvent::ListenerError { listener_id, error } if listener_id == id => {
                return Err(listen_err(error.to_string()));
            }
            SwarmEvent::ListenerClosed { listener_id, reason, .. } if listener_id == id => {
                return Err(listen_err(match reason {
                    Ok(()) => "the listener closed".to_owned(),
                    Err(e) => e.to_string(),
                }));
            }
            // Nothing can connect before there is an address to connect to.
            other => tracing::trace!(?other, "swarm event while starting to listen"),
        }
    }
}

/// What the swarm task shares with the [`super::P2p`] handles and the Raft
/// streams.
pub(super) struct Shared {
    /// The allowlist and where to dial each peer.
    pub(super) peers: Peers,
    /// Identified and refused peers.
    pub(super) admission: Admission,
    /// Where received gossip goes.
    pub(super) subscribers: Subscribers,
}

/// The swarm task's state.
pub(super) struct SwarmTask {
    /// The swarm; owned here alone.
    swarm: Swarm<SynodBehaviour>,
    /// Commands from the handles; closed when every handle is dropped.
    commands: mpsc::UnboundedReceiver<Command>,
    /// Where inbound requests go.
    handler: Arc<dyn InboundHandler>,
    /// Cloned into each inbound-request task to send its answer back.
    answers_tx: mpsc::UnboundedSender<Answer>,
    /// Answers of inbound-request tasks.
    answers: mpsc::UnboundedReceiver<Answer>,
    /// The allowlist and where to dial each peer. Addresses are passed with
    /// every request rather than given to libp2p once, because libp2p
    /// forgets an address after a failed dial and a restarting peer would
    /// then never be found again.
    peers: Peers,
    /// Callers waiting for outbound requests, by request id.
    pending: HashMap<OutboundRequestId, Pending>,
    /// The last dial error per peer: libp2p's request failure only says
    /// "dial failure", the operator needs the reason.
    dial_errors: HashMap<PeerId, String>,
    /// Published connected peers, read by [`super::P2p::connected_peers`].
    connected: watch::Sender<Vec<PeerId>>,
    /// The configured request timeout, for error messages.
    request_timeout: Duration,
    /// Gossip to publish, from the handles; bounded, unlike `commands`, so
    /// a burst of telemetry cannot grow memory without bound.
    publishes: mpsc::Receiver<Outgoing>,
    /// Where received gossip goes.
    subscribers: Subscribers,
    /// Peers cut off by a fault: not dialled, not allowed, until healed.
    cut: HashSet<PeerId>,
    /// When to dial allowed peers that are not connected.
    dial_tick: tokio::time::Interval,
    /// Identified and refused peers; refused ones are neither dialled nor
    /// let back onto the allowlist.
    admission: Admission,
    /// What a peer must say over identify: our protocol and engine.
    protocol_version: String,
    /// Whether connections start with the network-key handshake, so a failed
    /// incoming handshake most likely means a missing or wrong key.
    private_network: bool,
    /// Refused peers whose connections close at the given time (see
    /// [`REFUSAL_GRACE`]).
    closing: Vec<(tokio::time::Instant, PeerId)>,
}

/// How long a refused peer's connection stays open (carrying nothing to
/// the handlers: admission already refuses it) before it is closed, so
/// that our identify reaches it too and it refuses us in turn. Closed at
/// once, the side that identified first was often the only one to know:
/// the other kept dialling, and a leader adding such a node never learned
/// why it did not catch up.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);

impl SwarmTask {
    /// Wraps a listening swarm; `peers` seeds the allowlist.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mut swarm: Swarm<SynodBehaviour>,
        Shared { peers, admission, subscribers }: Shared,
        commands: mpsc::UnboundedReceiver<Command>,
        publishes: mpsc::Receiver<Outgoing>,
        handler: Arc<dyn InboundHandler>,
        connected: watch::Sender<Vec<PeerId>>,
        config: &P2pConfig,
    ) -> Self {
        for peer in peers.ids() {
            swarm.behaviour_mut().allowed.allow_peer(peer);
        }
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let mut dial_tick = tokio::time::interval(DIAL_INTERVAL);
        dial_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            swarm,
            commands,
            handler,
            answers_tx,
            answers,
            peers,
            pending: HashMap::new(),
            dial_errors: HashMap::new(),
            connected,
            request_timeout: config.request_timeout,
            publishes,
            subscribers,
            dial_tick,
            admission,
            protocol_version: config.protocol_version(),
            private_network: config.network_key.is_some(),
            closing: Vec::new(),
            cut: HashSet::new(),
        }
    }

    /// Runs until [`Command::Shutdown`] or until every handle is dropped.
    pub(super) async fn run(mut self) {
        let done = loop {
            let close_at = self.closing.iter().map(|(at, _)| *at).min();
            tokio::select! {
                _ = async {
                    match close_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.close_refused(),
                command = self.commands.recv() => match command {
                    None => break None,
                    Some(Command::Shutdown { done }) => break Some(done),
                    Some(command) => self.on_command(command),
                },
                // Never `None`: this task holds a sender.
                Some(answer) = self.answers.recv() => self.on_answer(answer),
                // `None` once every handle is gone, which `commands` sees too.
                Some(outgoing) = self.publishes.recv() => {
                    gossip::publish(&mut self.swarm.behaviour_mut().gossip, outgoing);
                }
                _ = self.dial_tick.tick() => self.dial_disconnected(),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        };
        let SwarmTask { swarm, commands, pending, connected, .. } = self;
        // Dropping the swarm closes the listener and every connection;
        // dropping `pending` tells waiting callers the transport stopped,
        // and dropping `commands` tells handles (the Raft streams look).
        drop(swarm);
        drop(commands);
        drop(pending);
        connected.send_replace(Vec::new());
        tracing::debug!("p2p swarm task stopped");
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request { peer, request, reply } => self.send_request(peer, request, reply),
            // Membership changes re-allow every member; a refused one stays
            // out until it leaves the membership.
            Command::Allow { peer } => self.admit(peer),
            Command::Disallow { peer } => {
                // Also closes the peer's open connections.
                self.swarm.behaviour_mut().allowed.disallow_peer(peer);
            }
            Command::Cut { peers } => {
                let healed: Vec<PeerId> = self.cut.difference(&peers).copied().collect();
                for peer in &peers {
                    // Also closes the peer's open connections.
                    self.swarm.behaviour_mut().allowed.disallow_peer(*peer);
                }
                self.cut = peers;
                let members = self.peers.ids();
                for peer in healed.into_iter().filter(|p| members.contains(p)) {
                    self.admit(peer);
                }
            }
            // Handled by `run`, which must leave its loop.
            Command::Shutdown { .. } => {}
        }
    }

    /// Put `peer` on the allowlist and dial it, unless it is refused or cut
    /// off by a fault.
    fn admit(&mut self, peer: PeerId) {
        if self.admission.refusal(&peer).is_none() && !self.cut.contains(&peer) {
            self.swarm.behaviour_mut().allowed.allow_peer(peer);
            self.dial(peer);
        }
    }

    /// Dials every allowed peer with a known address that is not connected.
    fn dial_disconnected(&mut self) {
        for peer in self.peers.ids() {
            self.dial(peer);
        }
    }

    /// Dials `peer` if it is allowed, has a known address, is not this node
    /// and is neither connected nor being dialled. The address comes from
    /// the [`AddressBook`].
    fn dial(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id()
            || self.peers.address(&peer).is_none()
            || self.admission.refusal(&peer).is_some()
            || self.cut.contains(&peer)
        {
            return;
        }
        let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::trace!(%peer, error = %e, "not dialled");
        }
    }

    fn send_request(&mut self, peer: PeerId, request: Vec<u8>, reply: oneshot::Sender<Result<Vec<u8>, P2pError>>) {
        let addresses = self.peers.address(&peer).into_iter().collect();
        let id = self.swarm.behaviour_mut().blob.send_request_with_addresses(&peer, request, addresses);
        self.pending.insert(id, Pending { peer, reply });
    }

    fn on_answer(&mut self, Answer { channel, response }: Answer) {
        if self.swarm.behaviour_mut().blob.send_response(channel, response).is_err() {
            // The requester timed out or its connection closed meanwhile;
            // the behaviour reports that as an inbound failure.
            tracing::debug!("blob response dropped: the request is no longer waiting");
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<SynodBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(SynodBehaviourEvent::Blob(event)) => self.on_request_response(event),
            SwarmEvent::Behaviour(SynodBehaviourEvent::Gossip(event)) => {
                let (peers, admission) = (&self.peers, &self.admission);
                gossip::on_event(
                    &mut self.swarm.behaviour_mut().gossip,
                    &self.subscribers,
                    |p| peers.contains(p) && admission.refusal(p).is_none(),
                    event,
                );
            }
            SwarmEvent::Behaviour(SynodBehaviourEvent::Identify(identify::Event::Received {
                peer_id, info, ..
            })) => self.on_identified(peer_id, &info),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.dial_errors.remove(&peer_id);
                self.publish_connected();
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
                if num_established == 0 {
                    self.admission.disconnected(&peer_id);
                }
                self.publish_connected();
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                tracing::debug!(%peer, %error, "dial failed");
                self.dial_errors.insert(peer, error.to_string());
            }
            SwarmEvent::IncomingConnectionError { peer_id, send_back_addr, error, .. } => {
                if self.private_network && matches!(error, ListenError::Transport(_)) {
                    // The handshake itself failed. With the key proof first, a
                    // process without the key (or with another) fails here
                    // whatever else it does, and it is the likeliest cause.
                    tracing::warn!(
                        addr = %send_back_addr, %error,
                        "refused an incoming connection that failed the handshake: the remote most likely \
                         does not have this cluster's private network key (network_key)"
                    );
                } else {
                    // A refused peer is worth an operator's attention: it
                    // is usually a node missing from this node's membership.
                    tracing::info!(peer = ?peer_id, addr = %send_back_addr, %error, "incoming connection refused");
                }
            }
            other => tracing::trace!(?other, "swarm event"),
        }
    }

    /// Admits `peer` if it runs our protocol version and engine; else
    /// refuses it for good and closes its connections.
    fn on_identified(&mut self, peer: PeerId, info: &identify::Info) {
        if info.protocol_version == self.protocol_version {
            tracing::debug!(%peer, agent = %info.agent_version, "identified peer");
            self.admission.identified(peer);
            return;
        }
        let (ours, theirs) = (&self.protocol_version, &info.protocol_version);
        tracing::error!(
            %peer, %ours, %theirs, agent = %info.agent_version,
            "REFUSED PEER: it runs a different synod protocol or engine fingerprint ({theirs}, this node \
             {ours}); it would apply the log to a different state, so its connections are closed and it \
             stays refused until it is removed from the membership (or this node restarts)"
        );
        self.admission.refuse(peer, format!("it runs {theirs}, this node {ours}"));
        self.closing.push((tokio::time::Instant::now() + REFUSAL_GRACE, peer));
    }

    /// Close the connections of refused peers whose grace is over, and
    /// refuse new ones (unless the refusal was lifted meanwhile).
    fn close_refused(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.closing.drain(..).partition(|(at, _)| *at <= now);
        self.closing = later;
        for (_, peer) in due {
            if self.admission.refusal(&peer).is_some() {
                self.swarm.behaviour_mut().allowed.disallow_peer(peer);
            }
        }
    }

    fn on_request_response(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        let protocol = Protocol::Blob;
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.on_inbound_request(peer, request, channel);
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(pending) = self.pending.remove(&request_id) {
                        let _ = pending.reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some(pending) = self.pending.remove(&request_id) {
                    let _ = pending.reply.send(Err(self.outbound_error(pending.peer, error)));
                } else {
                    tracing::debug!(%peer, %protocol, %error, "outbound failure for an unknown request");
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %protocol, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_inbound_request(&mut self, peer: PeerId, request: Vec<u8>, channel: ResponseChannel<Vec<u8>>) {
        // A disallowed peer's connection is closed asynchronously, so a
        // request already in flight may still arrive; it must not reach the
        // handler. Dropping the channel resets the stream.
        if !self.peers.contains(&peer) {
            tracing::info!(%peer, "dropped a blob request from a peer not on the allowlist");
            return;
        }
        let handler = self.handler.clone();
        let admission = self.admission.clone();
        let within = self.request_timeout;
        let answers = self.answers_tx.clone();
        tokio::spawn(async move {
            // Not before identify has shown the peer runs our engine;
            // dropping the channel resets the stream.
            if let Err(e) = admission.admitted(peer, within).await {
                tracing::info!(%peer, error = %e, "dropped a blob request from a peer not admitted");
                return;
            }
            let response = handler.handle(peer, Protocol::Blob, request).await;
            // Fails only if the swarm task has stopped; nobody is left to
            // answer then.
            let _ = answers.send(Answer { channel, response });
        });
    }

    fn outbound_error(&mut self, peer: PeerId, error: OutboundFailure) -> P2pError {
        match error {
            OutboundFailure::DialFailure => P2pError::Dial {
                peer,
                reason: self.dial_errors.remove(&peer).unwrap_or_else(|| {
                    if self.peers.address(&peer).is_some() {
                        "dial failed".to_owned()
                    } else {
                        "no known address for the peer".to_owned()
                    }
                }),
            },
            OutboundFailure::Timeout => P2pError::Timeout { peer, after: self.request_timeout },
            OutboundFailure::ConnectionClosed => P2pError::Request {
                peer,
                reason: "the connection closed before the answer came (the peer may have shut down, \
                         or may not have this node on its allowlist)"
                    .to_owned(),
            },
            OutboundFailure::UnsupportedProtocols => P2pError::Request {
                peer,
                reason: "the peer does not speak this protocol (is it a synod node of a compatible \
                         version?)"
                    .to_owned(),
            },
            OutboundFailure::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => P2pError::Request {
                peer,
                reason: format!(
                    "the peer closed the stream without answering ({e}); it may have refused a message \
                     over its size limit, or its handler failed or outlasted its request timeout"
                ),
            },
            OutboundFailure::Io(e) => P2pError::Request { peer, reason: e.to_string() },
        }
    }

    fn publish_connected(&self) {
        let mut peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        peers.sort();
        self.connected.send_replace(peers);
    }
}
