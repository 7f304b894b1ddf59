//! Three nodes elect a leader, take commands through any node and agree.

use serde_json::json;
use synod::client::ClientError;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

fn status(e: ClientError) -> (u16, serde_json::Value) {
    match e {
        ClientError::Status { status, body } => (status, body),
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_through_a_follower_reach_every_node() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();

    let pushed = c.push(follower, "counter", "1", component("counter")).await.unwrap();
    assert_eq!(pushed["result"]["active"], json!(true));
    for i in 1..=20 {
        let r = c.cmd(follower, "counter", "increment", json!({"by": 1})).await.unwrap();
        assert_eq!(r["result"], json!({"value": i}));
        assert!(r["index"].as_u64().unwrap() > 0);
    }
    let (_, digest) = c.converged().await;
    assert_eq!(digest.len(), 64);
    for id in c.live() {
        assert_eq!(c.local_state(id, "counter").await, json!({"value": 20}), "node {id}");
    }
    // A linearizable read through a follower sees the last write.
    let read = c.client(follower).get("/v1/state/counter").await.unwrap();
    assert_eq!(read["entries"], json!({"value": 20}));
    let q = c.client(follower).post("/v1/queries/counter/get", Vec::new()).await.unwrap();
    assert_eq!(q["result"], json!({"value": 20}));

    // Errors a client can cause, each with its status and a clear message.
    let (s, body) = status(c.cmd(follower, "nope", "increment", json!({})).await.unwrap_err());
    assert_eq!((s, body["error"].as_str().unwrap()), (404, "unknown plugin `nope`"));
    let (s, _) = status(c.cmd(leader, "counter", "explode", json!({})).await.unwrap_err());
    assert_eq!(s, 404);
    let (s, body) =
        status(c.client(leader).post("/v1/commands/counter/increment", b"{nope".to_vec()).await.unwrap_err());
    assert_eq!(s, 400);
    assert!(body["error"].as_str().unwrap().starts_with("body is not valid JSON"), "{body}");
    let (s, body) = status(c.cmd(leader, "counter", "increment", json!({"by": "x"})).await.unwrap_err());
    assert_eq!((s, body["kind"].as_str().unwrap()), (400, "invalid_input"));
    let big = vec![b' '; 2 * 1024 * 1024];
    let (s, _) = status(c.client(leader).post("/v1/commands/counter/increment", big).await.unwrap_err());
    assert_eq!(s, 413);
    let (s, body) = status(c.cmd(leader, "counter", "increment", json!({"by": i64::MAX})).await.unwrap_err());
    assert_eq!((s, body["kind"].as_str().unwrap()), (422, "rejected"));
    let (s, _) = status(c.client(leader).post("/v1/commands/Bad.Name/x", Vec::new()).await.unwrap_err());
    assert_eq!(s, 400);

    // Every node still agrees, and the cluster view shows them all.
    let (_, digest_after) = c.converged().await;
    let view = c.client(leader).get("/v1/cluster").await.unwrap();
    assert_eq!(view["members"].as_object().unwrap().len(), 3);
    assert_eq!(view["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(view["divergence"], json!(false));
    for n in view["nodes"].as_array().unwrap() {
        assert_eq!(n["digest"].as_str().unwrap(), digest_after);
    }
}
