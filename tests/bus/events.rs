//! Events reach the JetStream stream exactly once, in log order — across a
//! leader kill and across a NATS outage.

use std::collections::BTreeSet;
use std::ops::Range;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::nats::NatsServer;
use crate::plugins::component;

/// Every message Synod published to the stream: (Nats-Msg-Id,
/// Synod-Index); messages without `Synod-Index` are someone else's.
async fn stream_messages(url: &str) -> Vec<(String, u64)> {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream("SYNOD_EVENTS").await else { return Vec::new() };
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await
            && let Some(index) = m.headers.get("Synod-Index")
        {
            let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
            out.push((id, index.as_str().parse().unwrap()));
        }
    }
    out
}

/// Wait until the stream holds an event for every index in `acked`, then
/// check exactly-once and order.
async fn assert_exactly_once(url: &str, acked: &BTreeSet<u64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msgs = stream_messages(url).await;
        let indexes: BTreeSet<u64> = msgs.iter().map(|(_, i)| *i).collect();
        if acked.is_subset(&indexes) {
            eprintln!(
                "stream: {} events for {} acknowledged toggles; first {:?}, last {:?}",
                msgs.len(),
                acked.len(),
                msgs.first(),
                msgs.last()
            );
            let ids: BTreeSet<&String> = msgs.iter().map(|(id, _)| id).collect();
            assert_eq!(ids.len(), msgs.len(), "an event is in the stream twice");
            // In log order: by index, then by ordinal within a command.
            let order: Vec<(u64, u64)> = msgs
                .iter()
                .map(|(id, _)| {
                    let (i, o) = id.split_once('-').unwrap();
                    (i.parse().unwrap(), o.parse().unwrap())
                })
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "events out of log order");
            return;
        }
        let missing: Vec<_> = acked.difference(&indexes).take(10).collect();
        assert!(tokio::time::Instant::now() < deadline, "events never published for {missing:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reports alternating 10 °C / 30 °C against a 20 °C setpoint: every one
/// switches the heater and so emits exactly one event.
async fn toggle(c: &Cluster, via: u64, i: u64) -> Option<u64> {
    let t = if i.is_multiple_of(2) { 10.0 } else { 30.0 };
    let call = c.cmd(via, "thermostat", "report", json!({"zone": "hall", "temperature": t}));
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(r)) if r["result"]["changed"] == json!(true) => r["index"].as_u64(),
        _ => None,
    }
}

/// Three nodes on the bus at `url`, the thermostat at 20 °C in the hall.
async fn thermostat_cluster(url: &str) -> (Cluster, u64) {
    let c = Cluster::start(3, |config| config.nats.url = Some(url.to_owned()));
    let leader = c.leader().await;
    c.push(leader, "thermostat", "1", component("thermostat")).await.unwrap();
    c.cmd(leader, "thermostat", "set_setpoint", json!({"zone": "hall", "setpoint": 20})).await.unwrap();
    (c, leader)
}

/// Toggles `range` while NATS is down: their events wait in the outbox and
/// go out in long pipelined runs once NATS is back (restarted on return).
async fn backlog(c: &Cluster, via: u64, nats: &mut NatsServer, range: Range<u64>, acked: &mut BTreeSet<u64>) {
    nats.stop();
    for i in range {
        acked.insert(toggle(c, via, i).await.expect("a command failed while NATS was down"));
    }
    nats.restart();
}

/// Each event in the stream was counted once as published, on the node
/// that published it; one JetStream dropped as a duplicate is not.
async fn assert_each_stored_event_counted_once(c: &Cluster, url: &str) {
    // JetStream stores an event before the publisher has its ack and
    // counts it: the count may trail the stream for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stored = stream_messages(url).await.len() as u64;
        let mut published = 0;
        for id in c.live() {
            published += c.metric(id, "synod_events_published_total").await as u64;
        }
        if published == stored || std::time::Instant::now() > deadline {
            assert_eq!(published, stored, "events counted as published against events in the stream");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_events_flow() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let (mut c, leader) = thermostat_cluster(&url).await;
    let via = c.live().into_iter().find(|id| *id != leader).unwrap();

    let mut acked = BTreeSet::new();
    for i in 0..60 {
        if i == 30 {
            c.kill(leader);
        }
        if let Some(index) = toggle(&c, via, i).await {
            acked.insert(index);
        }
    }
    assert!(acked.len() > 40, "only {} toggles acknowledged", acked.len());
    c.restart(leader);
    assert_exactly_once(&url, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_does_not_stop_the_cluster_or_lose_events() {
    let _serial = serial().await;
    let mut nats = NatsServer::start();
    let url = nats.url();
    let (c, leader) = thermostat_cluster(&url).await;
    let mut acked = BTreeSet::new();
    for i in 0..10 {
        acked.extend(toggle(&c, leader, i).await);
    }
    assert_exactly_once(&url, &acked).await;

    nats.stop();
    // HTTP and Raft carry on without the bus.
    for i in 10..30 {
        acked.insert(toggle(&c, leader, i).await.expect("a command failed while NATS was down"));
    }
    let ready = c.client(leader).get("/readyz").await.unwrap();
    assert_ne!(ready["bus"], json!("connected"));
    assert_eq!(c.metric(leader, r#"synod_bus_state{state="connected"}"#).await as u64, 0);
    assert_eq!(c.metric(leader, "synod_bus_connected").await as u64, 0);

    nats.restart();
    // The bus reconnects by itself and the events of the outage arrive.
    assert_exactly_once(&url, &acked).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.client(leader).get("/readyz").await.unwrap()["bus"] != json!("connected") {
        assert!(tokio::time::Instant::now() < deadline, "the bus did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.metric(leader, r#"synod_bus_state{state="connected"}"#).await as u64, 1);
    assert_eq!(c.metric(leader, r#"synod_bus_state{state="disconnected"}"#).await as u64, 0);
    assert_each_stored_event_counted_once(&c, &url).await;
}

/// Publishes are pipelined, each expecting its predecessor to be the
/// stream's last message. Messages someone else publishes into the stream
/// (no Synod id) break that chain at random points; the leader must resume
/// after its own last event each time, never stall, repeat or reorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_in_the_stream_neither_stall_nor_reorder_events() {
    let _serial = serial().await;
    let mut nats = NatsServer::start();
    let url = nats.url();
    let (c, leader) = thermostat_cluster(&url).await;
    let mut acked = BTreeSet::new();
    acked.extend(toggle(&c, leader, 0).await);
    assert_exactly_once(&url, &acked).await;

    backlog(&c, leader, &mut nats, 1..401, &mut acked).await;
    // Someone else's messages land in the stream while the backlog and
    // new events go out.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let foreign = tokio::spawn({
        let (url, stop) = (url.clone(), stop.clone());
        async move {
            let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 2_000 {
                if let Ok(ack) = js.publish("synod.evt.foreign.noise", "x".into()).await
                    && ack.await.is_ok()
                {
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        }
    });
    for i in 401..601 {
        acked.extend(toggle(&c, leader, i).await);
    }
    assert_exactly_once(&url, &acked).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = foreign.await.unwrap();
    assert!(sent > 0, "no foreign message was stored");
    assert_each_stored_event_counted_once(&c, &url).await;
}

/// NATS killed while a backlog goes out in pipelined runs: publishes in
/// flight are lost, and later ones may still reach the restarted server
/// from the client's reconnect buffer. Each carries its predecessor's id as
/// the expected last message, so none lands after a gap; the leader resumes
/// after the stream's last event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_pipeline_keeps_events_in_order() {
    let _serial = serial().await;
    let mut nats = NatsServer::start();
    let url = nats.url();
    let (c, leader) = thermostat_cluster(&url).await;
    let mut acked = BTreeSet::new();
    acked.extend(toggle(&c, leader, 0).await);
    assert_exactly_once(&url, &acked).await;

    for round in 0..3u64 {
        let before = c.metric(leader, "synod_events_published_total").await as u64;
        backlog(&c, leader, &mut nats, 1 + round * 700..701 + round * 700, &mut acked).await;
        // Kill NATS again as soon as the backlog has started to go out.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let published = c.metric(leader, "synod_events_published_total").await as u64;
            if published > before {
                eprintln!("round {round}: killed NATS after {} events of the backlog", published - before);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the backlog never started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        nats.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        nats.restart();
        assert_exactly_once(&url, &acked).await;
    }
}
