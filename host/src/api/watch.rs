//! `GET /v1/watch`: a live feed for the dashboard and `synod watch`, as
//! Server-Sent Events.
//!
//! - `cluster`: the `/v1/cluster` document, once a second.
//! - `op`: each operation this node applies, as it applies it (plugin,
//!   command, caller, result, fuel, event topics; lifecycle changes too),
//!   starting with the last `?tail=` (default 50) it still remembers.
//!
//! The feed reads the node's trail of recent operations (the last 20,000),
//! so a slow reader never holds up apply; one that falls more than that far
//! behind gets a `gap` event and carries on from the oldest still kept.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;

use crate::node::{NodeInner, Principal};
use crate::replica::auth::Access;

use super::ApiError;

/// Operations sent per look at the trail.
const BATCH: usize = 500;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct WatchParams {
    /// How many of the latest operations to send first.
    tail: Option<usize>,
}

struct Feed {
    node: Arc<NodeInner>,
    /// The last operation index sent.
    last: Option<u64>,
    tail: usize,
    next_cluster: tokio::time::Instant,
    queue: VecDeque<Event>,
}

fn event(kind: &str, body: &serde_json::Value) -> Event {
    Event::default().event(kind).data(body.to_string())
}

impl Feed {
    /// Fill the queue with what is new; false when nothing is.
    async fn fill(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.next_cluster {
            self.next_cluster = now + Duration::from_secs(1);
            self.queue.push_back(event("cluster", &self.node.cluster().await));
        }
        let limit = if self.last.is_none() { self.tail } else { BATCH };
        let (ops, oldest, applied) = self
            .node
            .with_replica(|r| {
                let (ops, oldest) = r.effects_after(self.last, limit);
                (ops, oldest, r.last_applied())
            })
            .unwrap_or_default();
        match self.last {
            // The operations after `last` are no longer all kept.
            Some(last) if oldest.is_some_and(|o| o > last) && last > 0 => {
                self.queue.push_back(event("gap", &serde_json::json!({ "after": last, "oldest_kept": oldest })));
            }
            // Later operations start after what is applied now.
            None => self.last = Some(applied),
            _ => {}
        }
        for op in ops {
            self.last = Some(self.last.unwrap_or(0).max(op.index));
            self.queue.push_back(event("op", &op.to_json()));
        }
        !self.queue.is_empty()
    }
}

/// The feed, to a reader.
/// A live feed (Server-Sent Events): `cluster` (the `/v1/cluster`
/// document, each second), `op` (each operation as this node applies it)
/// and `gap` (operations too old to send).
#[utoipa::path(get, path = "/v1/watch", tag = "operations", params(WatchParams),
    responses((status = 200, description = "The event stream", content_type = "text/event-stream", body = String,
        example = "event: op\ndata: {\"index\":42001,\"plugin\":\"counter\",\"command\":\"increment\",\"caller\":\"line-3-hmi\",…}\n\n\
                   event: cluster\ndata: {\"id\":1,\"leader\":1,\"term\":3,\"state\":\"Leader\",…}\n\n"),
        super::schema::Denied))]
pub(super) async fn watch(
    State(node): State<Arc<NodeInner>>,
    Extension(who): Extension<Principal>,
    Query(params): Query<WatchParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    who.require(Access::Read)?;
    let feed = Feed {
        node,
        last: None,
        tail: params.tail.unwrap_or(50).min(BATCH),
        next_cluster: tokio::time::Instant::now(),
        queue: VecDeque::new(),
    };
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        loop {
            if let Some(e) = feed.queue.pop_front() {
                return Some((Ok(e), feed));
            }
            if !feed.fill().await {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
