//! A write a follower forwarded, whose answer was lost after the leader took
//! it, is applied once — not retried behind the client's back. The battery
//! found this: a compare-and-set through a follower during a network cut
//! was applied twice (its reply was the second application's "not swapped,
//! the value is my own").

use serde_json::json;

use crate::harness::{Cluster, serial};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_whose_answer_is_lost_is_applied_once() {
    let _serial = serial().await;
    let c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "counter", "1", component("counter")).await.unwrap();
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    let value = |reply: serde_json::Value| reply["result"]["value"].as_i64().unwrap();
    let before = value(c.cmd(follower, "counter", "increment", json!({})).await.unwrap());

    crate::fault(&c, follower, json!({ "lose_next_answer": true })).await;
    let lost = c.cmd(follower, "counter", "increment", json!({})).await;
    let after = value(c.client(leader).post("/v1/queries/counter/get", b"{}".to_vec()).await.unwrap());
    assert_eq!(after, before + 1, "one increment must be applied once; the follower answered {lost:?}");
    match lost {
        Err(synod::client::ClientError::Status { status: 503, body }) => {
            assert_eq!(body["kind"], "unavailable", "{body}");
            assert!(body["error"].as_str().unwrap().contains("may or may not"), "{body}");
        }
        other => panic!("the client must learn the outcome is unknown (503), not {other:?}"),
    }

    // With a request id the client's own retry is safe: the first result.
    crate::fault(&c, follower, json!({ "lose_next_answer": true })).await;
    let path = "/v1/commands/counter/increment";
    let headers = [("synod-request-id", "retry-me")];
    assert!(c.client(follower).post_with_headers(path, b"{}".to_vec(), &headers).await.is_err());
    let retried = c.client(follower).post_with_headers(path, b"{}".to_vec(), &headers).await.unwrap();
    assert_eq!(value(retried), before + 2);
    let now = value(c.client(leader).post("/v1/queries/counter/get", b"{}".to_vec()).await.unwrap());
    assert_eq!(now, before + 2);
}
