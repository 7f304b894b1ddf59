//! Losing the leader, and a node killed over and over, lose nothing that
//! was acknowledged.

use std::time::{Duration, Instant};

use crate::harness::{Cluster, serial};
use crate::load::{Writer, assert_all_present};
use crate::plugins::component;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "thermostat", "1", component("thermostat")).await.unwrap();
    let others: Vec<u64> = c.live().into_iter().filter(|id| *id != leader).collect();

    let writer = Writer::start(others.iter().map(|id| c.client(*id)).collect(), 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill(leader);
    let killed_at = Instant::now();
    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    // Service is back once a write succeeds again.
    while c
        .cmd(others[0], "thermostat", "set_setpoint", serde_json::json!({"zone": "probe", "setpoint": 20}))
        .await
        .is_err()
    {
        assert!(killed_at.elapsed() < Duration::from_secs(15), "no write succeeded after the leader died");
    }
    eprintln!("leader {leader} killed: service back in {:?}", killed_at.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acked, failed) = writer.stop().await;
    assert!(acked.len() > 20, "only {} writes acknowledged", acked.len());
    eprintln!("{} acknowledged, {failed} failed during the failover", acked.len());

    // The old leader comes back and catches up.
    c.restart(leader);
    c.converged().await;
    for id in c.live() {
        assert_all_present(&c.local_state(id, "thermostat").await, &acked, id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_a_node_repeatedly() {
    let _serial = serial().await;
    let mut c = Cluster::start(3, |_| {});
    let leader = c.leader().await;
    c.push(leader, "thermostat", "1", component("thermostat")).await.unwrap();
    let mut acked_all = Vec::new();
    let mut next = 0;
    // 20 cycles in CI; SYNOD_SOAK_CYCLES=500 for a longer soak.
    let cycles: u64 = std::env::var("SYNOD_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    for cycle in 0..cycles {
        // Alternate between killing the leader and a follower.
        let leader = c.leader().await;
        let victim = if cycle % 2 == 0 { leader } else { c.live().into_iter().find(|id| *id != leader).unwrap() };
        let others: Vec<u64> = c.live().into_iter().filter(|id| *id != victim).collect();
        let writer = Writer::start(others.iter().map(|id| c.client(*id)).collect(), next);
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.kill(victim);
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.restart(victim);
        let (acked, _) = writer.stop().await;
        next += 100_000;
        acked_all.extend(acked);
        c.leader().await;
    }
    assert!(acked_all.len() > 40, "only {} writes acknowledged", acked_all.len());
    c.converged().await;
    for id in c.live() {
        assert_all_present(&c.local_state(id, "thermostat").await, &acked_all, id);
    }
}
