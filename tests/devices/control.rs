//! The closed loop on real clusters: three `synod` processes, a real
//! `nats-server`, the Modbus simulator on loopback, the `modbus-room`
//! driver and the `thermostat` handler, both built from source.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use synod_sim::modbus::{SimConfig, SimHandle};

use crate::harness::{Cluster, serial};
use crate::nats::NatsServer;
use crate::plugins::component;

/// Lease timing for these tests: short, so failover is quick.
const HEARTBEAT_MS: u64 = 200;
const TTL_MS: u64 = 1000;
const GRACE_MS: u64 = 700;

struct Plant {
    c: Cluster,
    sim: SimHandle,
    _nats: Option<NatsServer>,
}

async fn plant(nats: Option<NatsServer>) -> Plant {
    let config =
        SimConfig { rooms: 2, seed: 3, heat_rate_c_per_s: 0.5, cool_rate_c_per_s: 0.25, ..SimConfig::default() };
    let sim = synod_sim::modbus::start("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
    sim.set_temperature(0, 17.0);
    let url = nats.as_ref().map(NatsServer::url);
    let c = Cluster::start(3, |cfg| {
        cfg.nats.url = url.clone();
        cfg.devices.heartbeat_ms = HEARTBEAT_MS;
        cfg.devices.lease_ttl_ms = TTL_MS;
        cfg.devices.lease_grace_ms = GRACE_MS;
        cfg.devices.io_timeout_ms = 500;
        cfg.devices.call_deadline_ms = 1500;
        cfg.devices.max_backoff_ms = 1000;
    });
    let leader = c.leader().await;
    c.push(leader, "modbus-room", "1", component("modbus-room")).await.unwrap();
    c.push(leader, "thermostat", "1", component("thermostat")).await.unwrap();
    Plant { c, sim, _nats: nats }
}

fn definition(sim: &SimHandle, controller: bool) -> Value {
    let mut d = json!({
        "driver": "modbus-room",
        "profile": {
            "temperature": { "table": "input", "address": 0, "type": "i16", "scale": 0.1 },
            "heater": { "table": "coil", "address": 0 },
            "poll_ms": 100,
            "report": { "min_interval_ms": 200, "deadband": { "temperature": 0.01 } },
        },
        "grants": [format!("modbus-tcp://{}/1", sim.addr())],
        "expected_version": 0,
    });
    if controller {
        d["controller"] = json!({ "plugin": "thermostat", "command": "device_reported" });
    }
    d
}

async fn device(c: &Cluster, via: u64) -> Value {
    c.client(via).get("/v1/devices/room-1?consistency=local").await.unwrap()["device"].clone()
}

/// What the nodes say about `room-1`, and what their logs say about its
/// driver: printed when a wait times out.
async fn diagnose(c: &Cluster, ask: &[u64]) {
    for &id in ask {
        match c.client(id).get("/v1/devices/room-1?consistency=local").await {
            Ok(v) => eprintln!("node {id}: {}", v["device"]),
            Err(e) => eprintln!("node {id}: {e}"),
        }
    }
    for (id, m) in &c.nodes {
        let log = std::fs::read_to_string(m.config.data_dir.join("node.log")).unwrap_or_default();
        for line in log.lines().filter(|l| {
            [
                "driving device",
                "driver failed",
                "actuate failed",
                "report fenced",
                "reassigned",
                "synod::driver",
                "heartbeat",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            eprintln!("node {id}: {line}");
        }
    }
}

/// Poll `check` every 50 ms until it returns `Some`, for at most `limit`.
async fn wait_for<T>(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reported temperature → the thermostat's rule → desired heater →
/// actuate → coil → temperature moves → reported: the room settles at the
/// setpoint ± hysteresis. Telemetry reaches NATS; every node holds the same
/// shadow and digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thermostat_loop_converges_and_every_node_agrees() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let bus = async_nats::connect(nats.url()).await.unwrap();
    let mut telemetry = bus.subscribe("synod.tel.room-1.>").await.unwrap();
    let p = plant(Some(nats)).await;
    let (c, sim) = (&p.c, &p.sim);
    let put = c.client(2).put("/v1/devices/room-1", definition(sim, true).to_string().into_bytes()).await.unwrap();
    assert_eq!(put["device"]["version"], 1, "{put}");
    let setpoint = 21.0;
    let hysteresis = 0.5;
    c.cmd(3, "thermostat", "set_setpoint", json!({"zone": "room-1", "setpoint": setpoint, "hysteresis": hysteresis}))
        .await
        .unwrap();

    // An owner is assigned and the driver reports.
    let owned = wait_for(Duration::from_secs(15), "an owner reporting", async || {
        let d = device(c, 1).await;
        (d["owner"].is_u64() && d["reported"]["temperature"].is_number()).then_some(d)
    })
    .await;
    assert_eq!(owned["epoch"], 1);

    // From 17 °C the heater goes on, the room warms past the upper bound,
    // the heater goes off; then the room stays in the band.
    wait_for(Duration::from_secs(40), "the heater on", async || sim.heater(0).unwrap().then_some(())).await;
    wait_for(Duration::from_secs(40), "the room above the lower bound", async || {
        (sim.temperature(0).unwrap() > setpoint - hysteresis).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(40), "the heater off", async || (!sim.heater(0).unwrap()).then_some(())).await;
    let (mut low, mut high, mut switches, mut last) = (f64::MAX, f64::MIN, 0, false);
    let watch_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch_until {
        let t = sim.temperature(0).unwrap();
        low = low.min(t);
        high = high.max(t);
        let h = sim.heater(0).unwrap();
        if h != last {
            switches += 1;
            last = h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Overshoot is bounded by the loop's lag (poll 100 ms + report + commit
    // + actuate) times the heating rate: well under 1 °C here.
    let slack = 1.0;
    assert!(
        low > setpoint - hysteresis - slack && high < setpoint + hysteresis + slack,
        "the room left the band: {low:.2}..{high:.2} °C"
    );
    assert!(switches >= 1, "the loop kept switching the heater ({switches} switches in 12 s)");

    // The shadow agrees with the plant.
    let d = device(c, 2).await;
    let reported = d["reported"]["temperature"].as_f64().unwrap();
    assert!((reported - sim.temperature(0).unwrap()).abs() < 1.0, "{d}");
    assert!(d["last_actuated_version"].as_u64().unwrap() >= 2, "actuated at least twice: {d}");
    assert!(d["metadata"]["reported"]["temperature"]["ts_ms"].as_u64().unwrap() > 0);
    let zone = c.client(1).post("/v1/queries/thermostat/zone", br#"{"zone": "room-1"}"#.to_vec()).await.unwrap();
    assert_eq!(zone["result"]["setpoint"], json!(setpoint), "{zone}");

    // Telemetry went to NATS, never through the log: many readings, far
    // more than the reports the log took.
    let mut readings = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(200), telemetry.next()).await {
            Ok(Some(msg)) => {
                let v: Value = serde_json::from_slice(&msg.payload).unwrap();
                assert!(v["v"].is_number() && v["ts_ms"].is_u64() && v["node"] == owned["owner"], "{v}");
                assert_eq!(v["epoch"], 1);
                readings += 1;
            }
            _ => continue,
        }
    }
    assert!(readings >= 10, "{readings} readings in 2 s at a 100 ms poll");

    // Every node applied the same shadows: same digest at a common index,
    // and the same document at the same version.
    c.same_digest().await;
    let version = d["version"].as_u64().unwrap();
    for id in [1, 3] {
        let other = wait_for(Duration::from_secs(5), "a node to catch up", async || {
            let o = device(c, id).await;
            (o["version"].as_u64().unwrap() >= version).then_some(o)
        })
        .await;
        if other["version"] == d["version"] {
            assert_eq!(other, d, "node {id} holds another shadow at the same version");
        }
    }
}

/// kill -9 the owner: within TTL + grace (plus an election if it led) its
/// device moves to a live node at epoch + 1, and the loop carries on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_s_devices_move_on_within_ttl_and_grace() {
    let _serial = serial().await;
    let mut p = plant(None).await;
    let sim = p.sim.clone();
    p.c.client(1).put("/v1/devices/room-1", definition(&sim, true).to_string().into_bytes()).await.unwrap();
    p.c.cmd(1, "thermostat", "set_setpoint", json!({"zone": "room-1", "setpoint": 21.0})).await.unwrap();
    let before = wait_for(Duration::from_secs(15), "an owner reporting", async || {
        let d = device(&p.c, 1).await;
        (d["owner"].is_u64() && d["reported"]["temperature"].is_number()).then_some(d)
    })
    .await;
    wait_for(Duration::from_secs(20), "the heater on", async || sim.heater(0).unwrap().then_some(())).await;
    let owner = before["owner"].as_u64().unwrap();
    let epoch = before["epoch"].as_u64().unwrap();
    let survivor = [1, 2, 3].into_iter().find(|id| *id != owner).unwrap();

    p.c.kill(owner);
    let killed = Instant::now();
    // A linearizable read: a lagging node's own view may still be older
    // than the device's first assignment.
    let after = wait_for(Duration::from_secs(20), "the device to move", async || {
        let d = p.c.client(survivor).get("/v1/devices/room-1").await.ok()?["device"].clone();
        (d["epoch"].as_u64() > Some(epoch)).then_some(d)
    })
    .await;
    let took = killed.elapsed();
    assert_eq!(after["epoch"].as_u64().unwrap(), epoch + 1, "{after}");
    assert!(after["owner"].is_u64() && after["owner"].as_u64() != Some(owner), "moved to a live node: {after}");
    // TTL + grace after the last heartbeat, plus an election when the owner
    // also led (at most ~1 s here) and the leader's 250 ms check.
    let bound = Duration::from_millis(TTL_MS + GRACE_MS + 3000);
    assert!(took < bound, "reassigned after {took:?} (bound {bound:?})");

    // The loop continues on the new owner: a higher setpoint keeps the
    // heater on, a low one turns it off.
    let new_owner = after["owner"].as_u64().unwrap();
    let via = [1, 2, 3].into_iter().find(|id| *id != owner).unwrap();
    let set = p.c.cmd(via, "thermostat", "set_setpoint", json!({"zone": "room-1", "setpoint": 6.0})).await.unwrap();
    let off = Instant::now() + Duration::from_secs(15);
    while sim.heater(0).unwrap() {
        if Instant::now() > off {
            eprintln!("set_setpoint: {set}");
            diagnose(&p.c, &p.c.live()).await;
            panic!("the heater stayed on through the new owner {new_owner}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = wait_for(Duration::from_secs(10), "a report from the new owner", async || {
        let d = device(&p.c, via).await;
        (d["reported_by"]["node"].as_u64() == Some(new_owner) && d["reported"]["heater"] == json!(false)).then_some(d)
    })
    .await;
    assert_eq!(d["reported_by"]["epoch"].as_u64(), Some(epoch + 1));
}

/// SIGSTOP the owner past its lease, SIGCONT: it has stopped writing to the
/// device when its lease ran out (the host refuses its writes), its device
/// was reassigned, and what it reports late is refused as fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_and_writes_nothing_after_its_lease() {
    let _serial = serial().await;
    let p = plant(None).await;
    let sim = p.sim.clone();
    // No controller: the test alone decides desired state, so every coil
    // write is accounted for.
    p.c.client(1).put("/v1/devices/room-1", definition(&sim, false).to_string().into_bytes()).await.unwrap();
    let d = wait_for(Duration::from_secs(15), "an owner reporting", async || {
        let d = device(&p.c, 1).await;
        (d["owner"].is_u64() && d["reported"]["temperature"].is_number()).then_some(d)
    })
    .await;
    let owner = d["owner"].as_u64().unwrap();
    let epoch = d["epoch"].as_u64().unwrap();
    let other = [1, 2, 3].into_iter().find(|id| *id != owner).unwrap();
    p.c.client(other).patch("/v1/devices/room-1/desired", br#"{"heater": true}"#.to_vec()).await.unwrap();
    wait_for(Duration::from_secs(10), "the heater on", async || sim.heater(0).unwrap().then_some(())).await;

    let pid = p.c.nodes[&owner].pid().unwrap().to_string();
    let status = std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(status.success());
    let paused = Instant::now();
    // While it sleeps: a new desired state, which the paused owner has in its
    // log the moment it wakes (and must not act on), and the reassignment.
    let leader = wait_for(Duration::from_secs(10), "a leader among the others", async || {
        let v = p.c.client(other).get("/readyz").await.ok()?;
        v["leader"].as_u64().filter(|l| *l != owner)
    })
    .await;
    p.c.client(leader).patch("/v1/devices/room-1/desired", br#"{"heater": false}"#.to_vec()).await.unwrap();
    let moved = wait_for(Duration::from_secs(20), "the device to move", async || {
        let d = device(&p.c, leader).await;
        (d["epoch"].as_u64() == Some(epoch + 1)).then_some(d)
    })
    .await;
    assert_ne!(moved["owner"].as_u64(), Some(owner));
    let off = Instant::now() + Duration::from_secs(15);
    while sim.heater(0).unwrap() {
        if Instant::now() > off {
            let awake: Vec<u64> = p.c.live().into_iter().filter(|id| *id != owner).collect();
            diagnose(&p.c, &awake).await;
            panic!("the new owner did not turn the heater off: {moved}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(paused.elapsed() > Duration::from_millis(TTL_MS), "paused past the lease");
    let writes = sim.coil_writes(0);

    let status = std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(status.success());
    // For three seconds after it wakes: the coil is not written by anyone
    // (the new owner has nothing new to do, the old one is fenced), and no
    // report from the old epoch is ever accepted.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let d = device(&p.c, leader).await;
        if let Some(by) = d["reported_by"].as_object() {
            assert_ne!(by["epoch"].as_u64(), Some(epoch), "a report from the old epoch was accepted: {d}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sim.coil_writes(0), writes, "a coil write after the old owner woke up");
    assert_eq!(sim.heater(0), Some(false));
    // The old owner caught up and agrees.
    let d = wait_for(Duration::from_secs(10), "the old owner to catch up", async || {
        let d = device(&p.c, owner).await;
        (d["epoch"].as_u64() == Some(epoch + 1)).then_some(d)
    })
    .await;
    assert_ne!(d["owner"].as_u64(), Some(owner));
    let log = std::fs::read_to_string(p.c.nodes[&owner].config.data_dir.join("node.log")).unwrap_or_default();
    eprintln!(
        "old owner: {} late report(s) refused as fenced",
        log.lines().filter(|l| l.contains("report fenced")).count()
    );
    p.c.same_digest().await;
}

/// Telemetry reaches every member over gossip: a node that does not own
/// the device serves the owner's readings at
/// `GET /v1/devices/{id}/telemetry`, fresh, and following the plant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_own_the_device_serves_its_fresh_telemetry() {
    let _serial = serial().await;
    let p = plant(None).await;
    let (c, sim) = (&p.c, &p.sim);
    c.client(1).put("/v1/devices/room-1", definition(sim, false).to_string().into_bytes()).await.unwrap();
    let d = wait_for(Duration::from_secs(15), "an owner reporting", async || {
        let d = device(c, 1).await;
        (d["owner"].is_u64() && d["reported"]["temperature"].is_number()).then_some(d)
    })
    .await;
    let (owner, epoch) = (d["owner"].as_u64().unwrap(), d["epoch"].as_u64().unwrap());
    // A node that has not applied the definition yet answers 404 until the
    // first reading reaches it.
    let telemetry = async |id: u64| c.client(id).get("/v1/devices/room-1/telemetry").await.unwrap_or_default();
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;

    for id in [1, 2, 3].into_iter().filter(|id| *id != owner) {
        let t = wait_for(Duration::from_secs(10), "the owner's readings on another node", async || {
            let t = telemetry(id).await;
            t["metrics"]["temperature"].is_object().then_some(t)
        })
        .await;
        assert_eq!(t["device"], "room-1", "{t}");
        for metric in ["temperature", "heater"] {
            let m = &t["metrics"][metric];
            assert!(m["v"].is_number(), "node {id}: {t}");
            assert_eq!((m["node"].as_u64(), m["epoch"].as_u64()), (Some(owner), Some(epoch)), "node {id}: {t}");
        }
        // Fresh: readings keep coming at the 100 ms poll, stamped just now.
        let first = t["metrics"]["temperature"]["ts_ms"].as_u64().unwrap();
        let later = wait_for(Duration::from_secs(5), "a newer reading", async || {
            let ts = telemetry(id).await["metrics"]["temperature"]["ts_ms"].as_u64()?;
            (ts > first).then_some(ts)
        })
        .await;
        assert!(now_ms().abs_diff(later) < 3000, "node {id}: a reading from {later}, now is {}", now_ms());
    }

    // The plant moves; a non-owner sees it within a few polls.
    let other = [1, 2, 3].into_iter().find(|id| *id != owner).unwrap();
    sim.set_temperature(0, 30.0);
    wait_for(Duration::from_secs(10), "the new temperature on another node", async || {
        let v = telemetry(other).await["metrics"]["temperature"]["v"].as_f64()?;
        (v > 28.0 && (v - sim.temperature(0).unwrap()).abs() < 0.5).then_some(())
    })
    .await;

    let e = c.client(other).get("/v1/devices/no-such-room/telemetry").await.unwrap_err();
    assert!(matches!(&e, synod::client::ClientError::Status { status: 404, .. }), "{e}");
}
