//! The state quota: past `limits.state_quota_bytes` the cluster is
//! read-only for commands — 507 `quota_exceeded` through any node — while
//! reads go on, an admin may still run commands (to delete data), and the
//! metrics show the state's size against the quota.

use serde_json::json;

use crate::auth::{body_of, status_of, token};
use crate::harness::{Cluster, serial};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_quota_commands_are_refused_except_an_admins() {
    let _serial = serial().await;
    const QUOTA: u64 = 50_000;
    let c = Cluster::start(3, |config| config.limits.state_quota_bytes = QUOTA);
    let leader = c.leader().await;
    let follower = c.live().into_iter().find(|id| *id != leader).unwrap();
    c.push(leader, "misbehave", "1", component("misbehave")).await.unwrap();
    let alice = token(&c, leader, "alice", &["operator"]).await;

    // 100 keys of about 110 bytes a command, through a follower: the
    // leader takes them until the state is past the quota.
    let mut refused = None;
    for round in 0..20u64 {
        let fill = json!({ "from": round * 100, "count": 100, "value_bytes": 100 });
        let r = c
            .client_with(follower, Some(&alice))
            .post("/v1/commands/misbehave/fill", fill.to_string().into_bytes())
            .await;
        match status_of(&r) {
            200 => {}
            507 => {
                let body = body_of(&r);
                assert_eq!(body["kind"], json!("quota_exceeded"), "{body}");
                let message = body["error"].as_str().unwrap();
                assert!(message.contains("read-only: quota exceeded"), "{message}");
                assert!(message.contains("limits.state_quota_bytes"), "{message}");
                refused = Some(round);
                break;
            }
            other => panic!("round {round}: status {other}: {}", body_of(&r)),
        }
    }
    // 5 × 100 keys × (10 + 100) bytes = 55,000 > 50,000: the sixth is refused.
    assert_eq!(refused, Some(5), "refused once past the quota, not before");

    // Reads go on; an admin's command still goes through (to delete data).
    let keys =
        c.client_with(follower, Some(&alice)).post("/v1/queries/misbehave/scan_all", b"{}".to_vec()).await.unwrap();
    // 500 filled keys, and `victim` (every misbehave command writes it).
    assert_eq!(keys["result"], json!(501));
    let fill = json!({ "from": 10_000, "count": 1, "value_bytes": 100 });
    c.client(follower).post("/v1/commands/misbehave/fill", fill.to_string().into_bytes()).await.unwrap();

    // The metrics show it on every node.
    c.converged().await;
    for id in c.live() {
        assert_eq!(c.metric(id, "synod_state_keys").await, 502.0, "node {id}");
        // 501 keys of 10 + 100 bytes, and `victim` = "\"fill\"".
        assert_eq!(c.metric(id, "synod_state_bytes").await, 501.0 * 110.0 + 12.0, "node {id}");
        assert_eq!(c.metric(id, "synod_state_quota_bytes").await, QUOTA as f64, "node {id}");
    }
}
