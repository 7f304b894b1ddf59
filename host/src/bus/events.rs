//! Events out: exactly once, in log order, through JetStream.
//!
//! In: the replicated outbox (events of committed commands, kept on every
//! node until the stream is known to hold them). Out: one stream message
//! per event on `synod.evt.<plugin>.<topic>`, with `Nats-Msg-Id` =
//! `<log index>-<ordinal>` so the stream drops any repeat within its
//! duplicate window. Only the leader publishes. A new leader (or a
//! reconnected one) reads the last message in the stream and resumes from
//! its index; it then commits `EventsPublished` so every node can forget
//! what the stream holds.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};

use crate::consensus::Op;
use crate::node::NodeInner;

/// How long the stream remembers message ids: longer than any leader
/// change or bus outage resume could repeat.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// Commands' worth of events published per round.
const BATCH: usize = 256;

/// Index of the message id `<index>-<ordinal>`.
fn index_of(msg_id: &str) -> Option<u64> {
    msg_id.split_once('-').and_then(|(i, _)| i.parse().ok())
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

/// The highest log index whose events the stream may already hold.
async fn last_in_stream(stream: &mut stream::Stream) -> Result<u64, String> {
    let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
    if last == 0 {
        return Ok(0);
    }
    let msg = stream.get_raw_message(last).await.map_err(|e| e.to_string())?;
    Ok(msg.headers.get("Nats-Msg-Id").and_then(|v| index_of(v.as_str())).unwrap_or(0))
}

/// Publish the outbox while this node leads; forever.
pub async fn publish_loop(node: Arc<NodeInner>, client: Client, stream_name: String) {
    let js = jetstream::new(client.clone());
    let mut was_leader = false;
    // Events up to `cursor` are acknowledged by the stream (this leadership).
    let mut cursor: Option<u64> = None;
    let mut proposed = 0u64;
    let mut last_proposal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let leader = node.leader().0 == Some(node.id);
        if leader && !was_leader {
            let term = node.raft.metrics().borrow().current_term;
            super::notify(&client, "leader", serde_json::json!({ "leader": node.id, "term": term })).await;
        }
        was_leader = leader;
        if !leader || client.connection_state() != async_nats::connection::State::Connected {
            cursor = None;
            continue;
        }
        if cursor.is_none() {
            // Resume: re-publish from the last index the stream holds (its
            // later ordinals may be missing; earlier ones are dropped as
            // duplicates).
            let resumed = match ensure_stream(&js, &stream_name).await {
                Ok(mut s) => last_in_stream(&mut s).await,
                Err(e) => Err(e),
            };
            match resumed {
                Ok(last) => {
                    let published = node.with_replica(|r| r.outbox_state().0).unwrap_or(0);
                    cursor = Some(last.saturating_sub(1).max(published));
                    tracing::info!(resume_after = cursor, "publishing events");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event stream unavailable; will retry");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let Some(after) = cursor else { continue };
        let batch = node.with_replica(|r| r.outbox_after(after, BATCH)).unwrap_or_default();
        for (index, entry) in batch {
            let mut ok = true;
            for (ordinal, (family, event)) in entry.events.iter().enumerate() {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{index}-{ordinal}").as_str());
                headers.insert("Synod-Index", index.to_string().as_str());
                let subject = format!("synod.evt.{family}.{}", event.topic);
                let acked = match js.publish_with_headers(subject, headers, event.payload.clone().into()).await {
                    Ok(ack) => ack.await.map(|ack| ack.duplicate).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Ok(duplicate) = acked {
                    let m = crate::metrics::get();
                    if duplicate { &m.events_duplicate } else { &m.events_published }.inc();
                }
                if let Err(e) = acked {
                    tracing::warn!(error = %e, index, "event not acknowledged; will retry");
                    ok = false;
                    break;
                }
            }
            if !ok {
                cursor = None;
                break;
            }
            cursor = Some(index);
        }
        // Tell every node what the stream holds, at most once a second.
        if let Some(upto) = cursor
            && upto > proposed
            && last_proposal.elapsed() > Duration::from_secs(1)
        {
            last_proposal = tokio::time::Instant::now();
            match node.write(Op::EventsPublished { upto }, "synod").await {
                Ok(_) => proposed = upto,
                Err(e) => tracing::debug!(error = %e, "cannot record published events"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_ids() {
        assert_eq!(super::index_of("42-0"), Some(42));
        assert_eq!(super::index_of("7-13"), Some(7));
        assert_eq!(super::index_of("nope"), None);
    }
}
