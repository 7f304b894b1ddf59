//! A closed-loop writer that records every write the cluster acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use synod::client::Client;

/// Writes `set_setpoint` for zones `z<n>` one at a time, round-robin over
/// `targets`, until stopped; returns the zones acknowledged and how many
/// attempts failed.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<u64>, u64)>,
}

impl Writer {
    pub fn start(targets: Vec<Client>, first: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut acked, mut failed, mut n) = (Vec::new(), 0u64, first);
            while !flag.load(Ordering::Relaxed) {
                let client = &targets[n as usize % targets.len()];
                let body = serde_json::to_vec(&json!({"zone": format!("z{n}"), "setpoint": 20})).unwrap();
                let call = client.post("/v1/commands/thermostat/set_setpoint", body);
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(_)) => acked.push(n),
                    _ => failed += 1,
                }
                n += 1;
            }
            (acked, failed)
        });
        Writer { stop, task }
    }

    pub async fn stop(self) -> (Vec<u64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Every acknowledged zone is in `entries` (a `/v1/state/thermostat` map).
pub fn assert_all_present(entries: &serde_json::Value, acked: &[u64], node: u64) {
    let missing: Vec<u64> = acked.iter().copied().filter(|n| entries.get(format!("zone/z{n}")).is_none()).collect();
    assert!(missing.is_empty(), "node {node} lost acknowledged writes: {missing:?}");
}
