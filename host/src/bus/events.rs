//! Events out: exactly once, in log order, through JetStream.
//!
//! In: the replicated outbox (events of committed commands, kept on every
//! node until the stream is known to hold them). Out: one stream message
//! per event on `synod.evt.<plugin>.<topic>`, with `Nats-Msg-Id` =
//! `<log index>-<ordinal>` so the stream drops any repeat within its
//! duplicate window. Only the leader publishes.
//!
//! Publishes are pipelined: up to [`WINDOW`] go out before their
//! acknowledgements are awaited. Each one but the first after a resume
//! carries its predecessor's id in `Nats-Expected-Last-Msg-Id`, so the
//! stream refuses it unless the one before it is the stream's last message:
//! a lost or refused publish takes every later one in flight with it, and
//! Synod's messages in the stream are always the log's events from the
//! start, in log order, without a gap. The stream checks a repeated id
//! before the expected last id, so re-publishing what it already holds is
//! answered as a duplicate, never refused.
//!
//! A new leader (or one whose publish failed or whose NATS came back) reads
//! the stream's last message and resumes right after it. If that message is
//! not Synod's (something else published into the stream), it resumes after
//! the last event this leadership saw acknowledged, else after what the
//! cluster has recorded as published, and lets the duplicate window drop
//! repeats. Every second it commits `EventsPublished` so every node can
//! forget what the stream holds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};

use crate::consensus::Op;
use crate::node::NodeInner;
use crate::replica::OutboxEntry;

/// How long the stream remembers message ids: longer than any leader
/// change or bus outage resume could repeat.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// Commands' worth of events read from the outbox per round.
const BATCH: usize = 1024;

/// Publishes awaiting their acknowledgement, at most.
const WINDOW: usize = 1024;

/// Payload bytes awaiting acknowledgement, at most (one event may exceed it
/// alone).
const WINDOW_BYTES: usize = 4 * 1024 * 1024;

/// An event's place in the log: (log index, ordinal within its command).
/// "Up to `p`" includes every event at or before `p`; `(i, usize::MAX)` is
/// all of index `i`.
type Position = (u64, usize);

/// The last log index all of whose events are at or before `at`, as far
/// as the position alone tells.
fn whole_commands_through((index, ordinal): Position) -> u64 {
    if ordinal == usize::MAX { index } else { index.saturating_sub(1) }
}

/// The position in the message id `<index>-<ordinal>`.
fn position_of(msg_id: &str) -> Option<Position> {
    let (index, ordinal) = msg_id.split_once('-')?;
    Some((index.parse().ok()?, ordinal.parse().ok()?))
}

fn message_id((index, ordinal): Position) -> String {
    format!("{index}-{ordinal}")
}

async fn ensure_stream(js: &jetstream::Context, name: &str) -> Result<stream::Stream, String> {
    js.get_or_create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec!["synod.evt.>".to_owned()],
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())
}

/// The stream's last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    /// The stream is empty.
    None,
    /// One of Synod's events, at this position.
    Synod(Position),
    /// A message someone else published (no Synod message id).
    Foreign,
}

async fn last_in_stream(stream: &mut stream::Stream) -> Result<Last, String> {
    let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
    if last == 0 {
        return Ok(Last::None);
    }
    let msg = stream.get_raw_message(last).await.map_err(|e| e.to_string())?;
    Ok(msg.headers.get("Nats-Msg-Id").and_then(|v| position_of(v.as_str())).map_or(Last::Foreign, Last::Synod))
}

/// Where to resume. What the cluster recorded as published is never sent
/// again. Beyond that the stream's last message decides; when it is someone
/// else's, the last event this leadership saw acknowledged does (the
/// events before a foreign message are not found without a scan, and the
/// duplicate window drops any repeat).
fn resume_after(last: Last, acknowledged: Option<Position>, published_upto: u64) -> Position {
    let recorded = if published_upto == 0 { (0, 0) } else { (published_upto, usize::MAX) };
    match last {
        Last::None => recorded,
        Last::Synod(at) => at.max(recorded),
        Last::Foreign => acknowledged.map_or(recorded, |at| at.max(recorded)),
    }
}

/// The events of `batch` after `after`, in log order, each with its
/// position and whether it is the last of its command.
fn events_after(
    batch: &[(u64, OutboxEntry)],
    after: Position,
) -> impl Iterator<Item = (Position, bool, &str, &crate::state::Event)> {
    batch.iter().flat_map(move |(index, entry)| {
        let count = entry.events.len();
        entry
            .events
            .iter()
            .enumerate()
            .filter(move |(ordinal, _)| (*index, *ordinal) > after)
            .map(move |(ordinal, (family, event))| ((*index, ordinal), ordinal + 1 == count, family.as_str(), event))
    })
}

/// Why a run of publishes stopped.
struct Stopped {
    message: String,
    /// The stream refused a publish because its last message was not the
    /// one before: expected after a lost publish, or when something else
    /// publishes into the stream.
    out_of_turn: bool,
}

impl Stopped {
    fn failed(message: String) -> Stopped {
        Stopped { message, out_of_turn: false }
    }
}

/// One publish awaiting its acknowledgement.
struct InFlight {
    at: Position,
    last_of_command: bool,
    bytes: usize,
    ack: PublishAckFuture,
}

/// The leader's publishing state within one leadership.
#[derive(Default)]
struct Publisher {
    /// Where this run stands: everything up to here is stored or in flight
    /// in order. `None` until resumed from the stream.
    cursor: Option<Position>,
    /// Id of the run's previous publish: the next one's expected last id.
    previous: Option<String>,
    /// The furthest event the stream has acknowledged (stored or duplicate).
    acknowledged: Option<Position>,
    /// Every event of log indexes up to here is acknowledged.
    complete_upto: u64,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
}

impl Publisher {
    /// Await the oldest publish's acknowledgement.
    async fn settle_one(&mut self) -> Result<(), Stopped> {
        let Some(f) = self.in_flight.pop_front() else { return Ok(()) };
        self.in_flight_bytes -= f.bytes;
        let ack = f.ack.await.map_err(|e| Stopped {
            out_of_turn: e.kind() == async_nats::jetstream::context::PublishErrorKind::WrongLastMessageId,
            message: format!("event {} not acknowledged: {e}", message_id(f.at)),
        })?;
        let m = crate::metrics::get();
        if ack.duplicate { &m.events_duplicate } else { &m.events_published }.inc();
        self.acknowledged = Some(f.at);
        if f.last_of_command {
            self.complete_upto = f.at.0;
        }
        Ok(())
    }

    async fn settle_all(&mut self) -> Result<(), Stopped> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Start a new run after a failure: nothing in flight counts any more.
    fn restart(&mut self) {
        // Dropped acknowledgements are awaited (and their permits released)
        // by the client's acker task.
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.cursor = None;
        self.previous = None;
    }

    /// Publish `batch`'s events after the cursor, pipelined, and await every
    /// acknowledgement.
    async fn publish(&mut self, js: &jetstream::Context, batch: &[(u64, OutboxEntry)]) -> Result<(), Stopped> {
        let Some(after) = self.cursor else { return Ok(()) };
        // Resumed after the last event of a command: that command is done.
        if let Some((index, entry)) = batch.first()
            && *index == after.0
            && after.1 != usize::MAX
            && after.1 + 1 >= entry.events.len()
        {
            self.complete_upto = self.complete_upto.max(after.0);
        }
        for (at, last_of_command, family, event) in events_after(batch, after) {
            while !self.in_flight.is_empty()
                && (self.in_flight.len() >= WINDOW || self.in_flight_bytes + event.payload.len() > WINDOW_BYTES)
            {
                self.settle_one().await?;
            }
            let id = message_id(at);
            let mut message = PublishMessage::build()
                .payload(event.payload.clone().into())
                .message_id(&id)
                .header("Synod-Index", at.0.to_string().as_str());
            if let Some(previous) = &self.previous {
                message = message.expected_last_message_id(previous);
            }
            let subject = format!("synod.evt.{family}.{}", event.topic);
            let ack = js
                .send_publish(subject, message)
                .await
                .map_err(|e| Stopped::failed(format!("event {id} not sent: {e}")))?;
            self.in_flight.push_back(InFlight { at, last_of_command, bytes: event.payload.len(), ack });
            self.in_flight_bytes += event.payload.len();
            self.previous = Some(id);
            // After a command's last event, all of it: the next round reads
            // from the command after.
            self.cursor = Some(if last_of_command { (at.0, usize::MAX) } else { at });
        }
        self.settle_all().await
    }
}

/// Publish the outbox while this node leads; forever.
pub async fn publish_loop(node: Arc<NodeInner>, client: Client, stream_name: String) {
    let js = jetstream::new(client.clone());
    let mut was_leader = false;
    let mut p = Publisher::default();
    let mut proposed = 0u64;
    let mut last_proposal = tokio::time::Instant::now();
    let mut idle = true;
    loop {
        if idle {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        idle = true;
        let leader = node.leader().0 == Some(node.id);
        if leader && !was_leader {
            let term = node.raft.metrics().borrow().current_term;
            super::notify(&client, "leader", serde_json::json!({ "leader": node.id, "term": term })).await;
        }
        if !leader {
            p = Publisher::default();
        }
        was_leader = leader;
        if !leader || client.connection_state() != async_nats::connection::State::Connected {
            p.restart();
            continue;
        }
        if p.cursor.is_none() {
            let last = match ensure_stream(&js, &stream_name).await {
                Ok(mut s) => last_in_stream(&mut s).await,
                Err(e) => Err(e),
            };
            match last {
                Ok(last) => {
                    let published = node.with_replica(|r| r.outbox_state().0).unwrap_or(0);
                    let after = resume_after(last, p.acknowledged, published);
                    p.cursor = Some(after);
                    p.complete_upto = p.complete_upto.max(whole_commands_through(after));
                    tracing::info!(resume_after = %message_id(after), "publishing events");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event stream unavailable; will retry");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let Some(after) = p.cursor else { continue };
        // The command at `after` may still have events after it.
        let batch = node.with_replica(|r| r.outbox_after(whole_commands_through(after), BATCH)).unwrap_or_default();
        if let Err(e) = p.publish(&js, &batch).await {
            if e.out_of_turn {
                tracing::info!(error = %e.message, "the stream's last message is not the event before; resuming after it");
            } else {
                tracing::warn!(error = %e.message, "event publishing stopped; resuming from the stream");
            }
            p.restart();
            continue;
        }
        idle = batch.len() < BATCH;
        // Tell every node what the stream holds, at most once a second.
        if p.complete_upto > proposed && last_proposal.elapsed() > Duration::from_secs(1) {
            last_proposal = tokio::time::Instant::now();
            match node.write(Op::EventsPublished { upto: p.complete_upto }, "synod").await {
                Ok(_) => proposed = p.complete_upto,
                Err(e) => tracing::debug!(error = %e, "cannot record published events"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids() {
        assert_eq!(position_of("42-0"), Some((42, 0)));
        assert_eq!(position_of("7-13"), Some((7, 13)));
        assert_eq!(position_of("nope"), None);
        assert_eq!(position_of("7-x"), None);
        assert_eq!(message_id((7, 13)), "7-13");
    }

    #[test]
    fn resume_after_the_known_position() {
        // A fresh stream and cluster: from the start.
        assert_eq!(resume_after(Last::None, None, 0), (0, 0));
        // The stream's last message decides, to the ordinal; what this
        // leadership saw acknowledged does not (the stream may have been
        // recreated).
        assert_eq!(resume_after(Last::Synod((9, 2)), Some((12, 0)), 5), (9, 2));
        // An empty stream: after what the cluster recorded as published.
        assert_eq!(resume_after(Last::None, Some((8, 1)), 5), (5, usize::MAX));
        // Someone else's message last: after what this leadership saw
        // acknowledged, else every event of the recorded index.
        assert_eq!(resume_after(Last::Foreign, Some((8, 1)), 5), (8, 1));
        assert_eq!(resume_after(Last::Foreign, None, 5), (5, usize::MAX));
        // What the cluster recorded is never sent again.
        assert_eq!(resume_after(Last::Synod((5, 0)), None, 5), (5, usize::MAX));
        assert_eq!(resume_after(Last::Foreign, Some((4, 3)), 5), (5, usize::MAX));
    }
}
