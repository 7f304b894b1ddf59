//! Members gossip their digests (`synod/digest/1`): a cluster that agrees
//! raises no alarm; a member's key that gossips a different digest for an
//! operation everyone applied does; and a key that claims another node's
//! id is ignored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use libp2p::{Multiaddr, PeerId};
use serde_json::{Value, json};
use synod::p2p::{GossipTopic, InboundHandler, P2p, P2pConfig, Protocol};

use crate::harness::{Cluster, serial};
use crate::plugins::component;

/// A peer that answers every request with nothing.
struct Mute;

impl InboundHandler for Mute {
    fn handle(&self, _: PeerId, _: Protocol, _: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        Box::pin(async { Vec::new() })
    }
}

fn log(c: &Cluster, id: u64) -> String {
    std::fs::read_to_string(c.nodes[&id].config.data_dir.join("node.log")).unwrap_or_default()
}

async fn divergence(c: &Cluster, id: u64) -> Value {
    c.client(id).get("/v1/cluster").await.unwrap()["divergence"].clone()
}

/// Gossips `notice` from `p2p` every 200 ms, each time with a new
/// `sent_ms`, until `done` holds; at most 20 s.
async fn gossip_until(p2p: &P2p, mut notice: Value, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 0u64.. {
        notice["sent_ms"] = json!(n);
        p2p.publish(GossipTopic::Digest, serde_json::to_vec(&notice).unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if done().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

/// Three nodes take commands and keep gossiping digests: no alarm. Then a
/// follower is killed and its key, in this test process, gossips: first a
/// false digest in another member's name (ignored, with a warning), then
/// one in its own name (the alarm, on both live nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_are_gossiped_and_only_a_member_s_own_can_raise_the_alarm() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    for via in [1, 2, 3, 1, 2, 3] {
        c.cmd(via, "counter", "increment", json!({"by": 1})).await.unwrap();
    }
    let (index, digest) = c.converged().await;
    // A few rounds of gossip at the same index.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in c.live() {
        assert_eq!(divergence(&c, id).await, json!(false), "node {id}");
        let log = log(&c, id);
        assert!(!log.contains("STATE DIVERGENCE"), "node {id} raised the alarm on an agreeing cluster");
        assert!(!log.contains("ignored gossip"), "node {id} ignored a member's own gossip");
    }

    // The follower's key, without its state.
    let victim = c.live().into_iter().find(|id| *id != leader).unwrap();
    let live: Vec<u64> = c.live().into_iter().filter(|id| *id != victim).collect();
    c.kill(victim);
    let key = synod::p2p::identity::load_or_create(&c.nodes[&victim].config.data_dir).unwrap();
    let members = c
        .peer_configs(Some(victim))
        .into_iter()
        .map(|p| (p.peer_id.parse::<PeerId>().unwrap(), Some(p.p2p.parse::<Multiaddr>().unwrap())))
        .collect();
    // A stolen node has its network key and runs the cluster's engine too.
    let network_key = c.nodes[&victim].config.network_key().unwrap();
    let engine = c.client(leader).get("/v1/cluster").await.unwrap()["engine"]["hash"].as_str().unwrap().to_owned();
    let config = P2pConfig {
        allowed: members,
        network_key,
        engine,
        ..P2pConfig::new(key, "/ip4/127.0.0.1/tcp/0".parse().unwrap())
    };
    let (impostor, _) = P2p::start(config, Arc::new(Mute)).await.unwrap();
    let false_digest = "00".repeat(32);
    assert_ne!(digest, false_digest);

    // In another member's name: every live node hears it and ignores it.
    let other = live[0];
    let claim = json!({"node": other, "digest_index": index, "digest": false_digest});
    gossip_until(&impostor, claim, "the claim to be ignored", async || {
        live.iter().all(|id| log(&c, *id).contains("ignored gossip claiming a node id"))
    })
    .await;
    for id in &live {
        assert_eq!(divergence(&c, *id).await, json!(false), "node {id} believed a false claim");
        assert!(!log(&c, *id).contains("STATE DIVERGENCE"), "node {id}");
    }

    // In its own name: the alarm, on every live node.
    let own = json!({"node": victim, "digest_index": index, "digest": false_digest});
    gossip_until(&impostor, own, "the divergence alarm", async || {
        let mut all = true;
        for id in &live {
            all &= divergence(&c, *id).await == json!(true);
        }
        all
    })
    .await;
    for id in &live {
        let log = log(&c, *id);
        let line = log.lines().find(|l| l.contains("STATE DIVERGENCE")).expect("no alarm in the log");
        assert!(line.contains(&format!("peer={victim}")) && line.contains(&format!("index={index}")), "{line}");
    }
    impostor.shutdown().await;
}
