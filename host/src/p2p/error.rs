//! Errors of the transport stage: why the node key cannot be used, why the
//! swarm cannot start, why one request got no answer (a refused peer
//! among them), and why gossip was not sent.

use std::path::PathBuf;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use super::{GossipTopic, Protocol};

/// Why the transport could not do what was asked.
///
/// Every variant names the file, address or peer involved, so an operator
/// can act on the message alone.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The node key file or its directory could not be read or written.
    #[error("cannot access the node key at {}: {source}", .path.display())]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The node key file exists but does not hold a usable key.
    #[error(
        "the node key {} is unusable: {reason} (restore it from a backup, or move it away to \
         give this node a new identity; its PeerId will then change and the cluster \
         membership must be updated)",
        .path.display()
    )]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The swarm could not bind its listen address.
    #[error("cannot listen for peers on {addr}: {reason}")]
    Listen {
        /// The address asked for.
        addr: Multiaddr,
        /// Why binding failed.
        reason: String,
    },
    /// The libp2p transport (TCP + noise + yamux) could not be built.
    #[error("cannot set up the libp2p transport: {reason}")]
    Transport {
        /// libp2p's explanation.
        reason: String,
    },
    /// The peer is not on this node's allowlist, so no connection to it is
    /// made or accepted.
    #[error("peer {peer} is not on this node's allowlist")]
    NotAllowed {
        /// The refused peer.
        peer: PeerId,
    },
    /// The peer identified itself with another synod protocol version or
    /// engine fingerprint, so this node refuses it (until it leaves the
    /// membership and is added again, or this node restarts).
    #[error("peer {peer} is refused: {reason}")]
    Refused {
        /// The refused peer.
        peer: PeerId,
        /// What it runs against what this node runs.
        reason: String,
    },
    /// No connection to the peer could be made.
    #[error("cannot connect to peer {peer}: {reason}")]
    Dial {
        /// The peer dialled.
        peer: PeerId,
        /// The last dial error libp2p reported for it.
        reason: String,
    },
    /// The peer did not answer in time; it may or may not have acted on the
    /// request.
    #[error("peer {peer} did not answer within {after:?}; it may or may not have acted on the request")]
    Timeout {
        /// The peer asked.
        peer: PeerId,
        /// The configured request timeout.
        after: Duration,
    },
    /// The request reached a connection but got no answer (stream reset,
    /// connection closed, protocol not spoken, the peer refused the bytes).
    #[error("request to peer {peer} failed: {reason}")]
    Request {
        /// The peer asked.
        peer: PeerId,
        /// What went wrong.
        reason: String,
    },
    /// The request was sent on an open stream, and the stream closed before
    /// the answer came: the peer may or may not have acted on it.
    #[error("request to peer {peer} got no answer: {reason}; it may or may not have acted on the request")]
    Lost {
        /// The peer asked.
        peer: PeerId,
        /// What went wrong.
        reason: String,
    },
    /// The request is bigger than the protocol allows; it was not sent.
    #[error("a {protocol} message of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The protocol it was meant for.
        protocol: Protocol,
        /// Size of the message.
        size: usize,
        /// The protocol's cap.
        limit: usize,
    },
    /// A gossip payload is bigger than gossip allows; it was not sent.
    #[error("a {topic} gossip message of {size} bytes is over the limit of {limit} bytes")]
    GossipTooLarge {
        /// The topic it was meant for.
        topic: GossipTopic,
        /// Size of the payload.
        size: usize,
        /// The cap on one payload.
        limit: usize,
    },
    /// The queue of gossip waiting to be sent is full; the message was
    /// dropped.
    #[error("gossip on {topic} dropped: the p2p transport is behind")]
    GossipFull {
        /// The topic it was meant for.
        topic: GossipTopic,
    },
    /// The transport has shut down; no more requests can be made.
    #[error("the p2p transport has stopped")]
    Stopped,
}
