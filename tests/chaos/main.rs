//! The fault battery (issue 12): real `synod` processes on loopback, their
//! data dirs on a filesystem that loses unsynced writes at power loss,
//! clients recording histories through every node while nemeses kill,
//! power-cycle, pause, partition, jump clocks and upgrade; histories
//! checked for linearizability and loss. Also divergence bisection and the
//! replay gate.
//!
//! Needs the `faults` feature (`POST /v1/faults`): `cargo test --features
//! faults --test chaos` (`./tests/run` does). `./tests/run --soak` runs the
//! long soak.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod backlog;
mod battery;
mod clock;
mod divergence;
mod forwarding;
// The shared test kit; not every helper is used here.
#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod harness;
mod install;
mod log_sync;
mod lossy;
#[allow(dead_code)]
#[path = "../common/nats.rs"]
mod nats;
#[allow(dead_code)]
#[path = "../common/plugins.rs"]
mod plugins;
mod replay;
mod restart;
#[allow(dead_code)]
#[path = "../common/rng.rs"]
mod rng;

use std::time::{Duration, Instant};

use battery::{Nemesis, Rig, Tally};
use harness::serial;
use rng::{Rng, test_seed};

/// Put faults in force on node `id` (`POST /v1/faults`).
async fn fault(c: &harness::Cluster, id: u64, settings: serde_json::Value) {
    c.client(id).post("/v1/faults", serde_json::to_vec(&settings).unwrap()).await.unwrap();
}

/// Three nodes led by node 1 ([`harness::led_by_node_1`]), with the
/// register plugin and `k` = 0.
async fn register_cluster_led_by_node_1() -> harness::Cluster {
    let c = harness::Cluster::start(3, harness::led_by_node_1);
    assert_eq!(c.leader().await, 1);
    c.push(1, "register", "1", plugins::component("register")).await.unwrap();
    c.cmd(1, "register", "put", serde_json::json!({ "key": "k", "value": 0 })).await.unwrap();
    c
}

/// Every nemesis, equally likely.
const EVERY: [(Nemesis, u32); 8] = [
    (Nemesis::Kill, 1),
    (Nemesis::PowerLoss, 1),
    (Nemesis::DiskFull, 1),
    (Nemesis::Pause, 1),
    (Nemesis::IsolateLeader, 1),
    (Nemesis::Bridge, 1),
    (Nemesis::ClockJump, 1),
    (Nemesis::Upgrade, 1),
];

/// The short battery CI runs: one round of every nemesis, about a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_battery() {
    let _serial = serial().await;
    let seed = test_seed("chaos");
    let mut rng = Rng(seed);
    let mut rig = Rig::start().await;
    let mut tally = Tally::default();
    let schedule = battery::Schedule { seconds: 60, mix: &EVERY, gap_ms: (200, 1000) };
    battery::round(&mut rig, 0, &schedule, &mut rng, &mut tally).await;
    eprintln!("short battery: {}", tally.summary());
    for (nemesis, _) in EVERY {
        assert!(tally.cycles_of(nemesis) >= 1, "{nemesis:?} never ran");
    }
}

/// The soak: rounds of two minutes, crash-heavy, until at least 1,000
/// crash cycles (100 of them power losses) and 40 partitions, or
/// `SYNOD_SOAK_MINUTES` (default 120). `./tests/run --soak`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: ./tests/run --soak"]
async fn soak() {
    let _serial = serial().await;
    let seed = test_seed("chaos soak");
    let minutes: u64 = std::env::var("SYNOD_SOAK_MINUTES").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    let mix = [
        (Nemesis::Kill, 12),
        (Nemesis::PowerLoss, 3),
        (Nemesis::DiskFull, 1),
        (Nemesis::Pause, 1),
        (Nemesis::IsolateLeader, 1),
        (Nemesis::Bridge, 1),
        (Nemesis::ClockJump, 1),
        (Nemesis::Upgrade, 1),
    ];
    // Shorter gaps than CI's: more cycles per minute.
    let schedule = battery::Schedule { seconds: 120, mix: &mix, gap_ms: (100, 400) };
    let mut rng = Rng(seed);
    let mut rig = Rig::start().await;
    let mut tally = Tally::default();
    let started = Instant::now();
    let goals = |t: &Tally| {
        let power = t.cycles_of(Nemesis::PowerLoss) + t.cycles_of(Nemesis::DiskFull);
        let crashes = t.cycles_of(Nemesis::Kill) + power;
        let partitions = t.cycles_of(Nemesis::IsolateLeader) + t.cycles_of(Nemesis::Bridge);
        crashes >= 1000 && power >= 100 && partitions >= 40
    };
    let mut round = 0;
    while !goals(&tally) && started.elapsed() < Duration::from_secs(minutes * 60) {
        battery::round(&mut rig, round, &schedule, &mut rng, &mut tally).await;
        round += 1;
        eprintln!("soak after {:?}: {}", started.elapsed(), tally.summary());
    }
    let summary = format!("soak ({:.0} min, seed {seed}): {}", started.elapsed().as_secs_f64() / 60.0, tally.summary());
    eprintln!("{summary}");
    if let Ok(path) = std::env::var("SYNOD_SOAK_REPORT") {
        std::fs::write(path, format!("{summary}\n")).unwrap();
    }
    assert!(goals(&tally), "the soak ended before its goals: {}", tally.summary());
}
