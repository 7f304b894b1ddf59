//! No input can halt the cluster: uploads that cannot load, bursts of large
//! commands, fuel-heavy commands, request-id reuse, membership changes
//! asked of a follower.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use synod::client::ClientError;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

fn status_of(e: &ClientError) -> u16 {
    match e {
        ClientError::Status { status, .. } => *status,
        other => panic!("expected an HTTP error status, got {other}"),
    }
}

fn term(v: &Value) -> u64 {
    v["term"].as_u64().unwrap()
}

/// The upload that once stopped every node for good (`?fuel=1`: the
/// counter's `describe` runs out of fuel) is refused with a 4xx before it
/// reaches the log; so are limits over the configured maxima and a second
/// install of a version with other limits. The cluster keeps working, also
/// after a full restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_cannot_load_are_refused_and_nothing_stops() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    let before = c.client(leader).get("/v1/cluster").await.unwrap();

    for via in [leader, follower] {
        let e = c.client(via).post("/v1/plugins/evil?version=1&fuel=1", component("counter")).await.unwrap_err();
        assert_eq!(status_of(&e), 422, "{e}");
        assert!(e.to_string().contains("describe") && e.to_string().contains("out of fuel"), "{e}");
    }
    let e = c
        .client(follower)
        .post("/v1/plugins/evil?version=1&fuel=1000000000000", component("counter"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 400, "{e}");
    assert!(e.to_string().contains("max_plugin_fuel"), "{e}");
    let e = c
        .client(leader)
        .post("/v1/plugins/evil?version=1&memory_bytes=999999999999", component("counter"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 400, "{e}");

    // Nothing of it entered the log: no plugin, no new entries.
    let plugins = c.client(follower).get("/v1/plugins").await.unwrap();
    assert_eq!(plugins["plugins"], json!({}));
    let after = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(after["applied_index"], before["applied_index"]);

    // A real install, then the same label with other limits: 409.
    c.push(follower, "counter", "1", component("counter")).await.unwrap();
    let e =
        c.client(follower).post("/v1/plugins/counter?version=1&fuel=5000000", component("counter")).await.unwrap_err();
    assert_eq!(status_of(&e), 409, "{e}");
    // The same bytes and limits again are accepted (idempotent).
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    assert_eq!(c.cmd(follower, "counter", "increment", json!({"by": 3})).await.unwrap()["result"], json!({"value": 3}));

    // Every node restarts and serves: no entry in the log stops a replay.
    for id in c.live() {
        c.kill(id);
    }
    for id in [1, 2, 3] {
        c.restart(id);
    }
    let leader = c.leader().await;
    assert_eq!(c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap()["result"], json!({"value": 4}));
    c.converged().await;
}

/// 40 concurrent commands of about 1 MiB each, spread over leader and
/// followers: entries are capped in bytes and an append too large for one
/// Raft message is split, so every command succeeds, the term stays, and
/// all nodes converge. (Before: each failed with 503 "no leader" while the
/// term climbed from 1 to 11.) One byte over the payload limit is 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_commands_replicates_without_elections() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let term_before = term(&c.client(leader).get("/v1/cluster").await.unwrap());

    let note = "n".repeat(1024 * 1024 - 64);
    let body = serde_json::to_vec(&json!({ "by": 1, "note": note })).unwrap();
    assert!(body.len() <= 1024 * 1024);
    let nodes = c.live();
    let sends = (0..40).map(|i| {
        let client = c.client(nodes[i % nodes.len()]);
        let body = body.clone();
        async move { client.post("/v1/commands/counter/increment", body).await }
    });
    let results = futures::future::join_all(sends).await;
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    assert!(failed.is_empty(), "{} of 40 failed: {:?}", failed.len(), failed.iter().take(3).collect::<Vec<_>>());

    let cluster = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(term(&cluster), term_before, "the burst caused an election");
    c.converged().await;
    for id in c.live() {
        assert_eq!(c.local_state(id, "counter").await["value"], json!(40), "node {id}");
    }
    let over = vec![b' '; 1024 * 1024 + 1];
    let e = c.client(nodes[1]).post("/v1/commands/counter/increment", over).await.unwrap_err();
    assert_eq!(status_of(&e), 413, "{e}");
}

/// A batch of fuel-heavy commands applies on each node's apply thread, not
/// on its (single, as in `synod dev`) async worker: health checks stay fast
/// and no election happens while it runs. A local read takes the replica's
/// lock, which apply holds for one entry at a time, so it may wait for the
/// entry being applied (here the whole batch: 0.2–0.4 s on the 2-core VM)
/// but not longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_heavy_commands_do_not_stall_the_node() {
    let _serial = serial().await;
    let c = Cluster::start_env(3, &[("TOKIO_WORKER_THREADS", "1")], |_| {});
    let leader = c.leader().await;
    c.push(leader, "misbehave", "1", component("misbehave")).await.unwrap();
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    c.converged().await;
    let term_before = term(&c.client(leader).get("/v1/cluster").await.unwrap());

    // Eight commands that each burn their whole 100M fuel, in one batch.
    let spins = (0..8).map(|_| c.cmd(leader, "misbehave", "spin", json!(null)));
    let spin_started = Instant::now();
    let spinning = async {
        let results = futures::future::join_all(spins).await;
        (results, spin_started.elapsed())
    };
    let probe = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (mut worst, mut worst_health) = (Duration::ZERO, Duration::ZERO);
        let mut probes = 0;
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            for id in c.live() {
                let started = Instant::now();
                c.client(id).get("/healthz").await.unwrap();
                worst_health = worst_health.max(started.elapsed());
                c.client(id).get("/v1/state/counter?consistency=local").await.unwrap();
                worst = worst.max(started.elapsed());
                probes += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (worst, worst_health, probes)
    };
    let ((results, spun), (worst, worst_health, probes)) = tokio::join!(spinning, probe);
    for r in results {
        let e = r.unwrap_err();
        assert_eq!(status_of(&e), 422, "{e}");
        assert!(e.to_string().contains("out of fuel"), "{e}");
    }
    eprintln!(
        "{probes} probes while spinning for {spun:?}; slowest /healthz: {worst_health:?}, /healthz + local read: {worst:?}"
    );
    assert!(worst_health < Duration::from_millis(250), "a node's worker stalled for {worst_health:?} while applying");
    assert!(
        worst < spun + Duration::from_millis(250),
        "a local read waited {worst:?}, longer than the batch ({spun:?})"
    );
    assert_eq!(term(&c.client(leader).get("/v1/cluster").await.unwrap()), term_before, "an election happened");
}

/// A request id names one request: a retry with the same payload gets the
/// first answer; the same id with another payload is refused with 409.
/// Ids are kept for the configured time, which the leader replicates, and
/// forgotten after it on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_for_another_payload_is_refused() {
    let _serial = serial().await;
    let c = Cluster::start(3, |config| config.limits.dedup_ttl_secs = 3);
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    let send = |via: u64, by: i64| {
        let client = c.client(via);
        async move {
            let body = serde_json::to_vec(&json!({ "by": by })).unwrap();
            client.post_with_headers("/v1/commands/counter/increment", body, &[("Synod-Request-Id", "order-7")]).await
        }
    };
    let first = send(leader, 5).await.unwrap();
    let retry = send(follower, 5).await.unwrap();
    assert_eq!(first, retry);
    let e = send(follower, 6).await.unwrap_err();
    assert_eq!(status_of(&e), 409, "{e}");
    assert!(e.to_string().contains("request_id_reused"), "{e}");
    c.converged().await;
    assert_eq!(c.local_state(leader, "counter").await["value"], json!(5));

    // The 3-second retention is replicated to every node...
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in c.live() {
        loop {
            let settings = c.client(id).get("/v1/cluster").await.unwrap()["settings"].clone();
            if settings["dedup_ttl_ms"] == json!(3000) {
                break;
            }
            assert!(Instant::now() < deadline, "node {id} never got the replicated TTL: {settings}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // ...but past it the id is still remembered while it is among the
    // last 100,000 operations (`dedup::MIN_KEPT_OPS`): log time is the
    // leaders' clocks, and one running far ahead must not make every id
    // forgotten at once. (Forgetting once both have passed is unit-tested.)
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let e = send(follower, 6).await.unwrap_err();
    assert_eq!(status_of(&e), 409, "{e}");
    assert_eq!(send(leader, 5).await.unwrap(), first);
}

/// The peer allowlist follows the committed membership: asking a follower
/// to add a node allows nothing, and a removed member's key is disallowed
/// on every remaining node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_follows_committed_membership() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    let stranger = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id().to_string();
    let body = serde_json::to_vec(
        &json!({ "id": 9, "peer_id": stranger, "p2p": "/ip4/127.0.0.1/tcp/9", "http": "127.0.0.1:9",
                 "engine": synod::runtime::Runtime::new().unwrap().fingerprint().hash,
                 "protocol": synod::node::PROTOCOL_VERSION }),
    )
    .unwrap();
    let e = c.client(follower).post("/v1/cluster/nodes", body).await.unwrap_err();
    assert_eq!(status_of(&e), 503, "{e}");
    let allowed = c.client(follower).get("/v1/cluster").await.unwrap()["allowed_peers"].clone();
    assert!(!allowed.as_array().unwrap().contains(&json!(stranger)), "a follower allowlisted {stranger}: {allowed}");

    let gone = follower;
    let gone_peer = c.client(leader).get("/v1/cluster").await.unwrap()["members"][gone.to_string()]["peer_id"].clone();
    c.client(leader).delete(&format!("/v1/cluster/nodes/{gone}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in c.live().into_iter().filter(|id| *id != gone) {
        loop {
            let allowed = c.client(id).get("/v1/cluster").await.unwrap()["allowed_peers"].clone();
            if !allowed.as_array().unwrap().contains(&gone_peer) {
                break;
            }
            assert!(Instant::now() < deadline, "node {id} still allows removed node {gone}: {allowed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
