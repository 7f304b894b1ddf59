//! The write path: client writes into log entries, on the leader or through
//! it.
//!
//! In: [`Request`]s from the service (HTTP, NATS) or forwarded by followers.
//! Out: each request's operation index and [`Response`], once its entry is
//! applied. On the leader the [`batcher`] packs every write that arrived
//! while the previous proposal was in flight into one entry — at most
//! [`OPS_PER_ENTRY`] operations and `max_entry_bytes` of them, so an entry
//! always fits a Raft message. On a follower the [`forwarder`] packs them
//! into one `WriteBatch` RPC to the leader, under the same caps.
//!
//! Every write and linearizable read is routed here too: run on the leader
//! if this node leads, else forwarded, retried through an election
//! ([`super::NodeInner::write_request`], [`super::NodeInner::read_barrier`]).
//!
//! Both queues are bounded (`limits.max_queued_writes`): a full queue is [`WriteError::Overloaded`]
//! (HTTP and NATS say 429 with `Retry-After`), never unbounded memory.

use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::mpsc;

use crate::consensus::rpc::{Forwarded, RaftReply, RaftRpc, WriteError};
use crate::consensus::types::OPS_PER_ENTRY;
use crate::consensus::{NodeId, Op, Request, Response, TypeConfig};
use crate::replica::auth::TokenHash;

/// Where a queued write's answer goes.
pub(super) type Reply = tokio::sync::oneshot::Sender<Result<(u64, Response), WriteError>>;

/// A write waiting to be proposed, and where its answer goes.
pub(super) struct Queued {
    pub(super) request: Request,
    /// The caller's token hash, for the leader to check when the write is
    /// forwarded (see [`Forwarded`]).
    pub(super) credential: Option<TokenHash>,
    pub(super) reply: Reply,
}

/// Bytes a request takes in an entry, roughly: its payload and names plus
/// postcard's framing.
pub fn request_bytes(request: &Request) -> usize {
    let op = match &request.op {
        Op::Command { plugin, command, payload } => plugin.len() + command.len() + payload.len(),
        Op::Batch(requests) => requests.iter().map(request_bytes).sum(),
        _ => 256,
    };
    op + request.caller.len() + request.request_id.as_ref().map_or(0, String::len) + 32
}

/// A bounded queue with a place for the one write that did not fit the
/// last batch.
pub(super) struct Queue {
    rx: mpsc::Receiver<Queued>,
    carry: Option<Queued>,
}

impl Queue {
    pub(super) fn new(rx: mpsc::Receiver<Queued>) -> Queue {
        Queue { rx, carry: None }
    }

    /// The next write, waiting for one.
    async fn next(&mut self) -> Option<Queued> {
        match self.carry.take() {
            Some(q) => Some(q),
            None => self.rx.recv().await,
        }
    }

    /// `first` and whatever else is already queued, up to one entry's worth:
    /// [`OPS_PER_ENTRY`] writes and `max_bytes` (a first write larger than
    /// that goes alone).
    fn take_batch(&mut self, first: Queued, max_bytes: usize) -> (Vec<Forwarded>, Vec<Reply>) {
        let mut bytes = request_bytes(&first.request);
        let (mut requests, mut replies) =
            (vec![Forwarded { request: first.request, credential: first.credential }], vec![first.reply]);
        while requests.len() < OPS_PER_ENTRY as usize {
            let Ok(q) = self.rx.try_recv() else { break };
            let size = request_bytes(&q.request);
            if bytes + size > max_bytes {
                self.carry = Some(q);
                break;
            }
            bytes += size;
            requests.push(Forwarded { request: q.request, credential: q.credential });
            replies.push(q.reply);
        }
        (requests, replies)
    }
}

/// Put a write on a bounded queue and wait for its answer.
pub(super) async fn enqueue(
    queue: &mpsc::Sender<Queued>,
    request: Request,
    credential: Option<TokenHash>,
) -> Result<(u64, Response), WriteError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    queue.try_send(Queued { request, credential, reply }).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => WriteError::Overloaded,
        mpsc::error::TrySendError::Closed(_) => WriteError::Failed("the node is shutting down".into()),
    })?;
    answer.await.unwrap_or_else(|_| Err(WriteError::Failed("the node is shutting down".into())))
}

/// Propose queued writes as batches: one log entry (one append, one fsync
/// on each node) for every write that arrived while the previous proposal
/// was in flight. openraft 0.9 flushes each append before it takes the
/// next, so without this a leader does one fsync per client write.
pub(super) async fn batcher(raft: Raft<TypeConfig>, mut queue: Queue, max_entry_bytes: usize) {
    while let Some(first) = queue.next().await {
        let (forwarded, replies) = queue.take_batch(first, max_entry_bytes);
        crate::metrics::get().proposal_batch.observe(forwarded.len() as f64);
        let mut requests: Vec<Request> = forwarded.into_iter().map(|f| f.request).collect();
        let now = super::now_ms();
        for r in &mut requests {
            r.timestamp_ms = now;
        }
        let entry = Request { timestamp_ms: now, caller: "synod".into(), request_id: None, op: Op::Batch(requests) };
        let proposed = std::time::SystemTime::now();
        match raft.client_write(entry).await {
            Ok(r) => {
                crate::telemetry::record_proposed(r.log_id.index, proposed);
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
pub(super) async fn forwarder(node: std::sync::Weak<super::NodeInner>, mut queue: Queue, max_batch_bytes: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
    while let Some(first) = queue.next().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (requests, replies) = queue.take_batch(first, max_batch_bytes);
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            node.forward_batch(requests, replies).await;
            drop(slot);
        });
    }
}

/// The longest the leader holds one client command for snapshots to
/// catch up ([`NodeInner::hold_for_snapshot`](super::NodeInner)): well
/// inside the 10 s a follower waits for the writes it forwards, and a
/// snapshot that cannot be finished (a failing disk) slows commands down
/// rather than stopping them.
const MAX_WRITE_HOLD: Duration = Duration::from_secs(5);

/// Since when client commands are being held, if they are (one log line
/// when a hold begins, one with its length when it ends).
static HOLD: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// How long a leader tries to confirm its leadership for a linearizable
/// read (a heartbeat round with a quorum and, in a new term, its first
/// entry committed and applied) before the read fails.
pub(crate) const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(5);

/// Routing: every write and linearizable read goes through the leader.
impl super::NodeInner {
    /// Propose on this node (it believes it leads) in the next batch; the
    /// batch stamps the time. Answers with the operation's index.
    pub(super) async fn write_local(&self, request: Request) -> Result<(u64, Response), WriteError> {
        if let Op::Command { plugin, command, .. } = &request.op {
            self.hold_for_snapshot(self.shared.is_bulk(plugin, command)).await;
        }
        match enqueue(&self.batch, request, None).await {
            Err(WriteError::NotLeader { .. }) => Err(self.not_leader()),
            other => other,
        }
    }

    /// Wait, before a client's command is queued, while the leader's state
    /// (or too many members' for a quorum) holds more changes since the
    /// last finished snapshot than a restart may have to read back
    /// ([`Shared::hold_writes`](crate::consensus::state_machine::Shared::hold_writes)),
    /// until snapshots catch up, this node no longer leads, or
    /// [`MAX_WRITE_HOLD`] passed. Only a bulk load faster than snapshots
    /// are built gets here; its commands then go at the pace of the
    /// snapshots. A `bulk` command (one that changed many keys the last
    /// time it ran) is held an eighth of the most sooner than the others,
    /// so small writes are not held behind a load. The node's own writes
    /// (device heartbeats, settings) and plugin changes are never held.
    async fn hold_for_snapshot(&self, bulk: bool) {
        let Some(why) = self.shared.hold_writes(self.id, bulk) else { return };
        let started = std::time::Instant::now();
        if let Ok(mut hold) = HOLD.lock()
            && hold.is_none()
        {
            *hold = Some(started);
            tracing::info!(?why, "holding client commands until snapshots hold the changes since the last ones");
        }
        loop {
            let changed = self.shared.backlog_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.shared.hold_writes(self.id, bulk).is_none()
                || started.elapsed() >= MAX_WRITE_HOLD
                || self.leader().0 != Some(self.id)
            {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
        }
        let held = started.elapsed();
        crate::metrics::get().write_hold_seconds.observe(held.as_secs_f64());
        if held >= MAX_WRITE_HOLD {
            tracing::warn!(
                seconds = held.as_secs(),
                "a client command goes past raft.max_unsnapshotted_changes: no snapshot caught up in time"
            );
        } else if let Some(since) = HOLD.lock().ok().and_then(|mut hold| hold.take()) {
            let ms = since.elapsed().as_millis() as u64;
            tracing::info!(ms, "client commands go on: snapshots caught up, or this node no longer leads");
        }
    }

    /// Whether the leader takes `request` given the state quota: while the
    /// plugins' state holds more than `limits.state_quota_bytes`, a client
    /// command is refused unless its caller is an admin (who can run the
    /// commands that delete data). Everything else — reads, the node's own
    /// writes, plugin and device changes — goes on.
    pub(super) fn admit(&self, request: &Request, credential: Option<TokenHash>) -> Result<(), WriteError> {
        let quota = self.config.limits.state_quota_bytes;
        if quota == 0 || !matches!(request.op, Op::Command { .. }) {
            return Ok(());
        }
        let bytes = self.shared.state_bytes.load(std::sync::atomic::Ordering::Relaxed);
        // Exempt only a real admin token: with authentication off everyone
        // is admin, and the quota would hold nobody back.
        if bytes <= quota
            || (credential.is_some()
                && self.check_credential(&request.caller, credential, crate::replica::auth::Access::Admin).is_ok())
        {
            return Ok(());
        }
        Err(WriteError::QuotaExceeded { bytes, quota })
    }

    /// Replicate the node's own `op` (a heartbeat, a report, a setting)
    /// through the leader, wherever it is; waits out an election (up to a
    /// few seconds) rather than failing at once.
    pub async fn write(&self, op: Op, caller: &str) -> Result<(u64, Response), WriteError> {
        self.write_with(op, caller, None, None).await
    }

    /// Replicate a client's `op` as the authenticated `who`, with a client
    /// request id for deduplication. For a retry, the index returned is the
    /// first application's.
    pub async fn write_as(
        &self,
        op: Op,
        who: &super::auth::Principal,
        request_id: Option<String>,
    ) -> Result<(u64, Response), WriteError> {
        self.write_with(op, &who.name, who.credential, request_id).await
    }

    async fn write_with(
        &self,
        op: Op,
        caller: &str,
        credential: Option<TokenHash>,
        request_id: Option<String>,
    ) -> Result<(u64, Response), WriteError> {
        let request = Request { timestamp_ms: 0, caller: caller.to_owned(), request_id, op };
        // A client's command is traced (see `crate::telemetry`); the node's
        // own writes are not.
        let traced = tracing::Span::current().metadata().is_some_and(|m| m.name() == "command");
        let span = if traced {
            tracing::info_span!(target: "synod::trace", "propose", leader = tracing::field::Empty, log_index = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let (index, response) = tracing::Instrument::instrument(
            self.on_leader(
                || {
                    tracing::Span::current().record("leader", self.id);
                    let admitted = self.admit(&request, credential);
                    let request = request.clone();
                    async move {
                        admitted?;
                        self.write_local(request).await
                    }
                },
                |l| {
                    tracing::Span::current().record("leader", l);
                    enqueue(&self.forward, request.clone(), credential)
                },
            ),
            span.clone(),
        )
        .await?;
        if traced {
            let log_index = index / OPS_PER_ENTRY;
            span.record("log_index", log_index);
            crate::telemetry::add_stages(&span, log_index);
        }
        Ok((response.first_index.unwrap_or(index), response))
    }

    /// Send one batch of queued writes to the leader and hand out the
    /// answers; when there is no other leader to send to, each write is told
    /// so and retries (see [`NodeInner::on_leader`]).
    pub(super) async fn forward_batch(&self, requests: Vec<Forwarded>, replies: Vec<Reply>) {
        let n = replies.len();
        let answers = match self.leader().0 {
            Some(l) if l != self.id => match self.forward(l, &RaftRpc::WriteBatch(requests)).await {
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
    pub(super) async fn on_leader<T, Fut, RemoteFut>(
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

    /// The index a linearizable read must wait for, as this node (the
    /// leader) sees it after confirming its leadership with a quorum.
    ///
    /// openraft's read index is the later of this term's first entry and
    /// the commit index. A leader restarted before anyone else stood for
    /// election resumes its term, and its commit index starts from the
    /// hint on disk, which is not fsynced: after a power loss it can be
    /// older than entries the leader had acknowledged, and until the
    /// leader hears from a follower that holds them it would serve reads
    /// from before them (the fault battery's soak saw two keys read as
    /// absent that way). So while a node leads in the term it started
    /// with, it reads from no earlier than the last entry it started with:
    /// every entry it acknowledged before the restart is in its log, and
    /// all of that log commits in this term. (A restarted node now starts
    /// in a later term than the one it led, and never leads the term it
    /// started with: `LogStore::step_down_after_restart`. The floor stays
    /// as a second guard.)
    ///
    /// openraft waits for a quorum's heartbeat answers and then, in a new
    /// term, for the term's first entry to commit and apply, with no bound:
    /// a leader whose followers answer heartbeats but take no entries
    /// would hold the read as long as that lasts. After
    /// [`READ_INDEX_TIMEOUT`] the read fails (503) instead.
    pub(super) async fn read_index_local(&self) -> Result<u64, WriteError> {
        let confirmed = tokio::time::timeout(READ_INDEX_TIMEOUT, self.raft.ensure_linearizable()).await;
        let Ok(confirmed) = confirmed else {
            return Err(WriteError::Failed(format!(
                "no linearizable read point within {} s: the leader could not confirm its leadership and \
                 commit with a quorum (is a majority of the members down, cut off or not taking entries?); \
                 retry shortly",
                READ_INDEX_TIMEOUT.as_secs()
            )));
        };
        match confirmed {
            Ok(id) => {
                let index = id.map(|i| i.index).unwrap_or(0);
                let (term, last) = self.resumed;
                let current = self.raft.metrics().borrow().current_term;
                Ok(if current == term { index.max(last) } else { index })
            }
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
                    match self.forward(l, &RaftRpc::ReadIndex).await? {
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

    /// Wait until this node has applied operation `index` — a change made
    /// through it — so it is in force here when its answer arrives: a token
    /// created through a follower authenticates there at once, a revoked
    /// one is refused there at once, an activated plugin answers its
    /// queries there. The leader has applied it already; a follower learns
    /// the commit with the next append, within a heartbeat. The change is
    /// committed whatever this wait says, so past [`SEEN_HERE_WAIT`] (a
    /// follower cut off since) it answers anyway, with a warning in the log.
    pub(crate) async fn seen_here(&self, index: u64) {
        let entry = index / OPS_PER_ENTRY;
        if let Err(e) =
            self.raft.wait(Some(SEEN_HERE_WAIT)).applied_index_at_least(Some(entry), "a change made here").await
        {
            tracing::warn!(index, error = %e, "answering before this node applied its own change");
        }
    }
}

/// How long a node's answer to a change it forwarded waits for the change
/// to apply here (see [`NodeInner::seen_here`]).
const SEEN_HERE_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn command(bytes: usize) -> Queued {
        let (reply, _) = tokio::sync::oneshot::channel();
        let op = Op::Command { plugin: "p".into(), command: "c".into(), payload: vec![0; bytes] };
        Queued {
            request: Request { timestamp_ms: 0, caller: "a".into(), request_id: None, op },
            credential: None,
            reply,
        }
    }

    /// A burst of 1 MiB commands becomes entries of at most the byte cap,
    /// and nothing is lost between them.
    #[tokio::test]
    async fn batches_are_capped_in_bytes() {
        let (tx, rx) = mpsc::channel(64);
        let mut queue = Queue::new(rx);
        for _ in 0..40 {
            tx.try_send(command(1 << 20)).unwrap();
        }
        drop(tx);
        let cap = 4 << 20;
        let mut total = 0;
        while let Some(first) = queue.next().await {
            let (requests, _) = queue.take_batch(first, cap);
            let bytes: usize = requests.iter().map(|f| request_bytes(&f.request)).sum();
            assert!(bytes <= cap, "a batch of {bytes} bytes is over the cap of {cap}");
            assert!(!requests.is_empty());
            total += requests.len();
        }
        assert_eq!(total, 40);
    }
}
