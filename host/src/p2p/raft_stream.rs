//! `/synod/raft/1`: Raft traffic over one long-lived stream per peer.
//!
//! In: request bytes for a peer, and the streams peers open to this node.
//! Out: the peer's answer to the caller; inbound requests to the node's
//! [`InboundHandler`], whose bytes go back on the same stream.
//!
//! Raft messages are small and frequent (appends, heartbeats, forwarded
//! writes). A substream per message, as libp2p request-response does, pays
//! a yamux stream, a timer and protocol negotiation every time; under load
//! that was a sixth of a leader's CPU. Instead each node opens one stream
//! to each peer on first use, multiplexes requests over it by id, and opens
//! a new one when it breaks. Every request runs on its own task at the
//! peer, so answers come back in any order and a slow one holds up nobody.
//!
//! ```text
//! frame = len u32 BE (of what follows) | id u64 BE | kind u8 | body
//! kind  = 0: a request, or its answer
//!         1: the peer refused the request; body is the reason (UTF-8)
//! ```
//!
//! Each side checks every frame's length against its own cap before it
//! reads the body; an oversized body is read off and dropped, so the stream
//! stays usable.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use libp2p_stream::{Control, IncomingStreams, OpenStreamError};
use tokio::sync::{mpsc, oneshot};

use super::admission::Admission;
use super::{InboundHandler, P2pError, Peers, Protocol};

/// Wire name of [`Protocol::Raft`].
pub(super) const RAFT_PROTOCOL: StreamProtocol = StreamProtocol::new(Protocol::Raft.name());

/// `id` and `kind`, counted in a frame's length.
const ID_KIND: usize = 9;
const OK: u8 = 0;
const REFUSED: u8 = 1;

type Answer = Result<Vec<u8>, P2pError>;
type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One frame read off a stream.
struct Frame {
    id: u64,
    kind: u8,
    /// The body, or its size when it was over the cap (and dropped).
    body: Result<Vec<u8>, usize>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max_body: usize) -> io::Result<Frame> {
    let mut head = [0u8; 4 + ID_KIND];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let size = len
        .checked_sub(ID_KIND)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "raft frame shorter than its header"))?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&head[4..12]);
    let (id, kind) = (u64::from_be_bytes(id), head[12]);
    if size > max_body {
        // Read it off in pieces, never holding more than one.
        let mut left = size;
        let mut sink = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = left.min(sink.len());
            r.read_exact(&mut sink[..n]).await?;
            left -= n;
        }
        return Ok(Frame { id, kind, body: Err(size) });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).await?;
    Ok(Frame { id, kind, body: Ok(body) })
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, id: u64, kind: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len() + ID_KIND)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "raft frame over 4 GiB"))?;
    // One buffer, so the frame goes out as one write (one noise frame when small).
    let mut buf = Vec::with_capacity(4 + ID_KIND + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&id.to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// A frame to write: id, kind, body.
type Outgoing = (u64, u8, Vec<u8>);

/// Runs one stream, either side, until it breaks: writes what `queue`
/// holds and hands every frame read to `on_frame`.
async fn pump(
    stream: Stream,
    queue: &mut mpsc::UnboundedReceiver<Outgoing>,
    max_bytes: usize,
    mut on_frame: impl FnMut(Frame),
) -> io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    let writing = async {
        while let Some((id, kind, body)) = queue.recv().await {
            write_frame(&mut writer, id, kind, &body).await?;
        }
        Ok(())
    };
    let reading = async {
        loop {
            on_frame(read_frame(&mut reader, max_bytes).await?);
        }
    };
    tokio::select! { r = writing => r, r = reading => r }
}

/// An open stream to a peer: where requests queue, and who waits.
#[derive(Clone)]
struct Link {
    frames: mpsc::UnboundedSender<Outgoing>,
    waiters: Waiters,
}

/// The outbound side: one [`Link`] per peer, opened on demand.
pub(super) struct RaftStreams {
    control: Control,
    links: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<Option<Link>>>>>,
    next_id: AtomicU64,
    max_bytes: usize,
    timeout: Duration,
}

impl std::fmt::Debug for RaftStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStreams").field("peers", &lock(&self.links).len()).finish()
    }
}

impl RaftStreams {
    pub(super) fn new(control: Control, max_bytes: usize, timeout: Duration) -> Self {
        Self { control, links: Mutex::new(HashMap::new()), next_id: AtomicU64::new(0), max_bytes, timeout }
    }

    /// Sends `request` to `peer` and waits for the answer, all within the
    /// request timeout (opening the stream included).
    pub(super) async fn request(&self, peer: PeerId, request: Vec<u8>) -> Answer {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = || P2pError::Timeout { peer, after: self.timeout };
        let link = tokio::time::timeout_at(deadline, self.link(peer)).await.map_err(|_| timed_out())??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&link.waiters).insert(id, tx);
        if link.frames.send((id, OK, request)).is_err() {
            // Never written: the link's writer had already stopped.
            lock(&link.waiters).remove(&id);
            return Err(P2pError::Request { peer, reason: CLOSED.to_owned() });
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(P2pError::Lost { peer, reason: CLOSED.to_owned() }),
            Err(_) => {
                // A late answer finds no waiter and is dropped.
                lock(&link.waiters).remove(&id);
                Err(timed_out())
            }
        }
    }

    /// The open link to `peer`, or a new one. Concurrent callers for one
    /// peer wait for the same open.
    async fn link(&self, peer: PeerId) -> Result<Link, P2pError> {
        let slot = lock(&self.links).entry(peer).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(link) = slot.as_ref()
            && !link.frames.is_closed()
        {
            return Ok(link.clone());
        }
        let stream = self.control.clone().open_stream(peer, RAFT_PROTOCOL).await.map_err(|e| match e {
            OpenStreamError::UnsupportedProtocol(p) => P2pError::Request {
                peer,
                reason: format!("the peer does not speak {p} (is it a synod node of a compatible version?)"),
            },
            OpenStreamError::Io(e) if e.kind() == io::ErrorKind::NotConnected => {
                P2pError::Dial { peer, reason: e.to_string() }
            }
            e => P2pError::Request {
                peer,
                reason: format!("{e} (the peer may be down, or may not have this node on its allowlist)"),
            },
        })?;
        let link = spawn_link(peer, stream, self.max_bytes);
        *slot = Some(link.clone());
        Ok(link)
    }
}

/// Why a stream's request got no answer.
const CLOSED: &str = "the stream to the peer closed before the answer came (the peer may have restarted, \
                      shut down, or dropped this node from its allowlist)";

/// Runs one outbound stream: writes queued requests, hands answers to
/// their waiters. When the stream breaks, every request still on it fails
/// at once, and the next request opens a new stream.
fn spawn_link(peer: PeerId, stream: Stream, max_bytes: usize) -> Link {
    let (frames, mut queue) = mpsc::unbounded_channel();
    let waiters: Waiters = Arc::default();
    let link = Link { frames, waiters: waiters.clone() };
    tokio::spawn(async move {
        let why = pump(stream, &mut queue, max_bytes, |frame| {
            let answer = match (frame.kind, frame.body) {
                (_, Err(size)) => Err(P2pError::TooLarge { protocol: Protocol::Raft, size, limit: max_bytes }),
                (OK, Ok(body)) => Ok(body),
                (_, Ok(reason)) => {
                    Err(P2pError::Request { peer, reason: String::from_utf8_lossy(&reason).into_owned() })
                }
            };
            if let Some(waiter) = lock(&waiters).remove(&frame.id) {
                let _ = waiter.send(answer);
            }
        })
        .await;
        tracing::debug!(%peer, result = ?why, "raft stream closed");
        // No new request gets onto this link; those queued or waiting fail
        // now (dropping their senders) rather than at their timeout.
        queue.close();
        while queue.try_recv().is_ok() {}
        lock(&waiters).clear();
    });
    link
}

/// Requests one peer may have in progress on this node at once. A peer's
/// Raft traffic is a handful at a time; forwarded writes are bounded by the
/// peer's own queue. Past this the peer is told "overloaded" at once.
pub(super) const MAX_INBOUND_IN_FLIGHT: usize = 16_384;

/// The inbound side: answers every stream peers open on `/synod/raft/1`.
pub(super) fn serve(
    mut incoming: IncomingStreams,
    handler: Arc<dyn InboundHandler>,
    peers: Peers,
    admission: Admission,
    max_bytes: usize,
    timeout: Duration,
) {
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let (handler, peers, admission) = (handler.clone(), peers.clone(), admission.clone());
            tokio::spawn(async move {
                // Nothing from a peer reaches the handler before identify
                // has shown it runs our protocol and engine: a stream opened
                // earlier waits (its requests wait with it), and one from a
                // refused peer is dropped, which resets it.
                if let Err(e) = admission.admitted(peer, timeout).await {
                    tracing::info!(%peer, error = %e, "dropped a raft stream from a peer not admitted");
                    return;
                }
                serve_stream(peer, stream, handler, peers, max_bytes, timeout).await;
            });
        }
    });
}

async fn serve_stream(
    peer: PeerId,
    stream: Stream,
    handler: Arc<dyn InboundHandler>,
    peers: Peers,
    max_bytes: usize,
    timeout: Duration,
) {
    let (answers, mut queue) = mpsc::unbounded_channel();
    // Requests from this peer being handled at once; past it a request is
    // refused at once rather than piling up tasks without bound.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_IN_FLIGHT));
    let why = pump(stream, &mut queue, max_bytes, |frame| {
        let refuse = |reason: String| {
            let _ = answers.send((frame.id, REFUSED, reason.into_bytes()));
        };
        let body = match frame.body {
            Err(size) => {
                return refuse(format!("a request of {size} bytes is over the peer's size limit of {max_bytes} bytes"));
            }
            Ok(body) => body,
        };
        // A disallowed peer's connection closes asynchronously; what it
        // still sends must not reach the handler.
        if !peers.contains(&peer) {
            tracing::info!(%peer, "refused a raft request from a peer not on the allowlist");
            return refuse("this node does not have the sender on its allowlist".to_owned());
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "refused a raft request: {MAX_INBOUND_IN_FLIGHT} from this peer are in progress");
            return refuse(format!("overloaded: {MAX_INBOUND_IN_FLIGHT} requests from this peer are in progress"));
        };
        let work = handler.handle(peer, Protocol::Raft, body);
        let answers = answers.clone();
        let id = frame.id;
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(timeout, work).await {
                Ok(answer) if answer.len() > max_bytes => {
                    let reason = format!("the answer of {} bytes is over the limit of {max_bytes} bytes", answer.len());
                    let _ = answers.send((id, REFUSED, reason.into_bytes()));
                }
                Ok(answer) => {
                    let _ = answers.send((id, OK, answer));
                }
                // The requester gives up at the same timeout.
                Err(_) => tracing::debug!(%peer, "raft request outlasted the request timeout"),
            }
        });
    })
    .await;
    tracing::debug!(%peer, result = ?why, "inbound raft stream closed");
}
