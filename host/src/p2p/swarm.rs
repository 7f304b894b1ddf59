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

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, SwarmEvent, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, gossipsub, identify, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot, watch};

use super::codec::FrameCodec;
use super::gossip::{self, Outgoing, Subscribers};
use super::{IDENTIFY_PROTOCOL_VERSION, IDLE_CONNECTION_TIMEOUT, InboundHandler, P2pConfig, P2pError, Peers, Protocol};

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
    /// Where to dial a peer that is dialled by id alone.
    book: AddressBook,
    /// `/synod/raft/1`: long-lived streams for Raft RPCs and forwarded
    /// client writes (see [`super::raft_stream`]).
    pub(super) raft: libp2p_stream::Behaviour,
    /// `/synod/blob/1`: plugin bytes, request-response under a larger cap.
    blob: request_response::Behaviour<FrameCodec>,
    /// Tells peers our listen addresses and protocol version, and logs
    /// theirs, which is what an operator checks first when nodes disagree.
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

/// Builds the swarm: TCP + noise + yamux, and [`SynodBehaviour`].
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
    let swarm = SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .map_err(|e| P2pError::Transport { reason: e.to_string() })?
        .with_behaviour(|key| SynodBehaviour {
            allowed: allow_block_list::Behaviour::default(),
            book: AddressBook { peers },
            raft: libp2p_stream::Behaviour::new(),
            blob,
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
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
    /// When to dial allowed peers that are not connected.
    dial_tick: tokio::time::Interval,
}

impl SwarmTask {
    /// Wraps a listening swarm; `peers` seeds the allowlist.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mut swarm: Swarm<SynodBehaviour>,
        peers: Peers,
        commands: mpsc::UnboundedReceiver<Command>,
        publishes: mpsc::Receiver<Outgoing>,
        subscribers: Subscribers,
        handler: Arc<dyn InboundHandler>,
        connected: watch::Sender<Vec<PeerId>>,
        request_timeout: Duration,
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
            request_timeout,
            publishes,
            subscribers,
            dial_tick,
        }
    }

    /// Runs until [`Command::Shutdown`] or until every handle is dropped.
    pub(super) async fn run(mut self) {
        let done = loop {
            tokio::select! {
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
            Command::Allow { peer } => {
                self.swarm.behaviour_mut().allowed.allow_peer(peer);
                self.dial(peer);
            }
            Command::Disallow { peer } => {
                // Also closes the peer's open connections.
                self.swarm.behaviour_mut().allowed.disallow_peer(peer);
            }
            // Handled by `run`, which must leave its loop.
            Command::Shutdown { .. } => {}
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
        if peer == *self.swarm.local_peer_id() || self.peers.address(&peer).is_none() {
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
                let peers = &self.peers;
                gossip::on_event(
                    &mut self.swarm.behaviour_mut().gossip,
                    &self.subscribers,
                    |p| peers.contains(p),
                    event,
                );
            }
            SwarmEvent::Behaviour(SynodBehaviourEvent::Identify(identify::Event::Received {
                peer_id, info, ..
            })) => {
                if info.protocol_version != IDENTIFY_PROTOCOL_VERSION {
                    tracing::warn!(
                        peer = %peer_id,
                        theirs = %info.protocol_version,
                        ours = IDENTIFY_PROTOCOL_VERSION,
                        agent = %info.agent_version,
                        "peer runs a different synod protocol version"
                    );
                } else {
                    tracing::debug!(peer = %peer_id, agent = %info.agent_version, "identified peer");
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.dial_errors.remove(&peer_id);
                self.publish_connected();
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
                self.publish_connected();
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                tracing::debug!(%peer, %error, "dial failed");
                self.dial_errors.insert(peer, error.to_string());
            }
            SwarmEvent::IncomingConnectionError { peer_id, send_back_addr, error, .. } => {
                // A refused peer is worth an operator's attention: it is
                // usually a node missing from this node's membership.
                tracing::info!(peer = ?peer_id, addr = %send_back_addr, %error, "incoming connection refused");
            }
            other => tracing::trace!(?other, "swarm event"),
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
        let answer = self.handler.handle(peer, Protocol::Blob, request);
        let answers = self.answers_tx.clone();
        tokio::spawn(async move {
            let response = answer.await;
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
