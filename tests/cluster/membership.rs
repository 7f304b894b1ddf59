//! Adding a node: it joins as a learner, catches up, becomes a voter; then
//! it is removed again.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Cluster, Member, serial};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_fourth_node_then_remove_it() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    for _ in 0..10 {
        c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap();
    }

    // Node 4 trusts the three members and has the cluster's network key;
    // they learn its node key from the request.
    let (path, mut config) = c.new_node(4);
    config.peers = c.peer_configs(None);
    config.network_key = c.nodes[&1].config.network_key.clone();
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    let peer_id = synod::p2p::identity::load_or_create(&config.data_dir).unwrap().public().to_peer_id().to_string();
    let add = json!({"id": 4, "peer_id": peer_id, "p2p": config.p2p, "http": config.http.to_string(),
        "engine": synod::runtime::Runtime::new().unwrap().fingerprint().hash, "protocol": synod::node::PROTOCOL_VERSION});
    c.nodes.insert(4, Member::new(config, path));
    c.restart(4);

    let added = c.client(leader).post("/v1/cluster/nodes", serde_json::to_vec(&add).unwrap()).await.unwrap();
    assert_eq!(added["added"], json!(4));
    let view = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(view["members"]["4"]["voter"], json!(true));
    c.converged().await;
    assert_eq!(c.local_state(4, "counter").await, json!({"value": 10}));
    // The new voter takes writes like any member.
    let r = c.cmd(4, "counter", "increment", json!({"by": 5})).await.unwrap();
    assert_eq!(r["result"], json!({"value": 15}));

    let removed = c.client(leader).delete("/v1/cluster/nodes/4").await.unwrap();
    assert_eq!(removed["removed"], json!(4));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = c.client(leader).get("/v1/cluster").await.unwrap();
    assert!(view["members"].get("4").is_none(), "{view}");
    c.kill(4);
    c.nodes.remove(&4);
    c.cmd(leader, "counter", "increment", json!({"by": 1})).await.unwrap();
    c.converged().await;
}
