//! Gossip: signed publish/subscribe among members, over libp2p gossipsub.
//!
//! In: bytes a [`super::P2p`] handle publishes on a [`GossipTopic`], and
//! gossipsub messages from connected peers. Out: those bytes on the wire to
//! every connected member subscribed to the topic, and each received
//! message, as [`Gossip`], to this node's subscribers of its topic. Like the
//! rest of this stage it knows nothing of what the bytes mean.
//!
//! Every message is signed with its author's node key and checked
//! ([`ValidationMode::Strict`]), so its `source` is the key that wrote it,
//! whoever relayed it. A message whose author is not on the allowlist is
//! rejected — neither delivered nor forwarded — so only members gossip, even
//! through a member that allows more peers than this node does. Messages are
//! named by their content: one relayed along two paths is delivered once.

use std::fmt;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::gossipsub::{
    self, ConfigBuilder, IdentTopic, Message, MessageAcceptance, MessageAuthenticity, MessageId, TopicHash,
    ValidationMode,
};
use libp2p::identity::Keypair;
use tokio::sync::broadcast;

use super::P2pError;

/// Largest gossipsub frame on the wire, both directions (gossipsub's
/// `max_transmit_size`).
pub const MAX_GOSSIP_FRAME_BYTES: usize = 64 * 1024;
/// Largest payload [`super::P2p::publish`] accepts: the frame less room for
/// the signature, the author's key, the sequence number and the topic.
pub const MAX_GOSSIP_BYTES: usize = MAX_GOSSIP_FRAME_BYTES - 1024;
/// Published messages waiting for the swarm task; past this, publishing
/// drops (gossip is advisory: the next message carries the news again).
pub(super) const PUBLISH_QUEUE: usize = 1024;
/// Received messages a subscriber may fall behind before it loses the
/// oldest (it sees `RecvError::Lagged`).
const SUBSCRIBER_BUFFER: usize = 1024;
/// How often gossipsub maintains its mesh. Shorter than the default (1 s)
/// so a node that joins or restarts is in the mesh within a second.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// What a gossip message is about; each is one gossipsub topic, and every
/// node subscribes to all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GossipTopic {
    /// `synod/telemetry/1`: device readings, from the owner's drivers.
    Telemetry,
    /// `synod/digest/1`: each node's state digest, for divergence checks.
    Digest,
}

impl GossipTopic {
    /// Every topic, in a fixed order.
    pub const ALL: [GossipTopic; 2] = [GossipTopic::Telemetry, GossipTopic::Digest];

    /// The topic's name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            GossipTopic::Telemetry => "synod/telemetry/1",
            GossipTopic::Digest => "synod/digest/1",
        }
    }

    fn index(self) -> usize {
        match self {
            GossipTopic::Telemetry => 0,
            GossipTopic::Digest => 1,
        }
    }

    fn topic(self) -> IdentTopic {
        IdentTopic::new(self.name())
    }

    fn from_hash(hash: &TopicHash) -> Option<GossipTopic> {
        GossipTopic::ALL.into_iter().find(|t| t.name() == hash.as_str())
    }
}

impl fmt::Display for GossipTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One message received on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gossip {
    /// The member whose key signed it (not the peer that relayed it).
    pub from: PeerId,
    /// The bytes it published.
    pub data: Vec<u8>,
}

/// A message on its way from a handle to the swarm task.
pub(super) struct Outgoing {
    /// Where it goes.
    pub(super) topic: GossipTopic,
    /// The payload, already checked against [`MAX_GOSSIP_BYTES`].
    pub(super) data: Vec<u8>,
}

/// Where received messages go: one broadcast channel per topic. Shared by
/// the handles (which hand out receivers) and the swarm task (which sends).
#[derive(Clone, Debug)]
pub(super) struct Subscribers([broadcast::Sender<Gossip>; 2]);

impl Subscribers {
    pub(super) fn new() -> Self {
        Self([broadcast::channel(SUBSCRIBER_BUFFER).0, broadcast::channel(SUBSCRIBER_BUFFER).0])
    }

    pub(super) fn subscribe(&self, topic: GossipTopic) -> broadcast::Receiver<Gossip> {
        self.0[topic.index()].subscribe()
    }

    fn deliver(&self, topic: GossipTopic, gossip: Gossip) {
        // An error only means nobody listens to this topic right now.
        let _ = self.0[topic.index()].send(gossip);
    }
}

/// The gossipsub behaviour, subscribed to every [`GossipTopic`].
///
/// Tuned for clusters of a handful of nodes that all know each other:
/// a mesh as small as one peer is a mesh (`mesh_n_low` 1), and publishing
/// floods to every subscribed peer (gossipsub's default), so each member
/// hears a message straight from its author when they are connected, and
/// through the mesh when they are not.
pub(super) fn behaviour(keypair: &Keypair) -> Result<gossipsub::Behaviour, P2pError> {
    let config = ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        // Nothing is forwarded before the swarm task has checked its author.
        .validate_messages()
        .message_id_fn(content_id)
        .max_transmit_size(MAX_GOSSIP_FRAME_BYTES)
        .mesh_n_low(1)
        .mesh_n(3)
        .mesh_n_high(6)
        // The outbound quota guards open networks against eclipse attacks;
        // here every peer is allowlisted, and which side dialled is chance.
        .mesh_outbound_min(0)
        .heartbeat_interval(HEARTBEAT)
        .heartbeat_initial_delay(Duration::from_millis(100))
        .build()
        .map_err(|e| P2pError::Transport { reason: format!("gossipsub config: {e}") })?;
    let mut gossip = gossipsub::Behaviour::new(MessageAuthenticity::Signed(keypair.clone()), config)
        .map_err(|e| P2pError::Transport { reason: format!("gossipsub: {e}") })?;
    for topic in GossipTopic::ALL {
        gossip
            .subscribe(&topic.topic())
            .map_err(|e| P2pError::Transport { reason: format!("cannot subscribe to {topic}: {e}") })?;
    }
    Ok(gossip)
}

/// A message's id: a hash of its author, topic and bytes, so the same
/// message relayed by several peers is seen once. Two identical payloads
/// from one author within gossipsub's duplicate window (a minute) are one
/// message, so a payload that repeats should carry a time or a counter.
fn content_id(message: &Message) -> MessageId {
    let mut hash = blake3::Hasher::new();
    let source = message.source.map(|p| p.to_bytes()).unwrap_or_default();
    for part in [source.as_slice(), message.topic.as_str().as_bytes()] {
        hash.update(&(part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.update(&message.data);
    MessageId::new(hash.finalize().as_bytes())
}

/// Sends `outgoing` into the mesh. Errors are expected and only logged: a
/// lone node has nobody to publish to.
pub(super) fn publish(gossip: &mut gossipsub::Behaviour, Outgoing { topic, data }: Outgoing) {
    let size = data.len();
    match gossip.publish(topic.topic(), data) {
        Ok(_) => tracing::trace!(%topic, size, "gossip published"),
        Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
            tracing::trace!(%topic, "gossip not published: no connected peer is subscribed yet");
        }
        Err(e) => tracing::debug!(%topic, size, error = %e, "gossip not published"),
    }
}

/// Handles one gossipsub event. A received message is delivered to
/// `subscribers` and forwarded only if its author is on the allowlist
/// (`allowed`); otherwise gossipsub is told to drop it.
pub(super) fn on_event(
    gossip: &mut gossipsub::Behaviour,
    subscribers: &Subscribers,
    allowed: impl Fn(&PeerId) -> bool,
    event: gossipsub::Event,
) {
    match event {
        gossipsub::Event::Message { propagation_source, message_id, message } => {
            let topic = GossipTopic::from_hash(&message.topic);
            let verdict = match (message.source, topic) {
                (Some(author), Some(topic)) if allowed(&author) => {
                    subscribers.deliver(topic, Gossip { from: author, data: message.data });
                    MessageAcceptance::Accept
                }
                (author, Some(topic)) => {
                    tracing::info!(
                        author = ?author, via = %propagation_source, %topic,
                        "rejected gossip from a peer not on the allowlist"
                    );
                    MessageAcceptance::Reject
                }
                (_, None) => MessageAcceptance::Ignore,
            };
            gossip.report_message_validation_result(&message_id, &propagation_source, verdict);
        }
        gossipsub::Event::Subscribed { peer_id, topic, .. } => {
            tracing::debug!(peer = %peer_id, %topic, "peer subscribed to gossip");
        }
        gossipsub::Event::Unsubscribed { peer_id, topic } => {
            tracing::debug!(peer = %peer_id, %topic, "peer unsubscribed from gossip");
        }
        gossipsub::Event::GossipsubNotSupported { peer_id } => {
            tracing::debug!(peer = %peer_id, "peer does not speak gossipsub");
        }
        gossipsub::Event::SlowPeer { peer_id, failed_messages } => {
            tracing::debug!(peer = %peer_id, ?failed_messages, "gossip to a slow peer was dropped");
        }
    }
}
