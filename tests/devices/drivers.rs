//! Driver instances against the real Modbus simulator, in process: what a
//! driver can reach, timeouts, faults, deadlines, fencing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use synod::driver::io::Fence;
use synod::driver::{CallError, DeviceSetup, DriverInstance, DriverRuntime, SinkItem};
use synod_sim::modbus::{Fault, SimConfig, SimHandle};

use crate::plugins::component;

async fn sim(rooms: usize) -> SimHandle {
    let config = SimConfig { rooms, seed: 7, manual_clock: true, ..SimConfig::default() };
    synod_sim::modbus::start("127.0.0.1:0".parse().unwrap(), config).await.unwrap()
}

/// The modbus-room profile of room `k` of the simulator.
fn room_profile(k: u16) -> Value {
    json!({
        "temperature": { "table": "input", "address": 16 * k, "type": "i16", "scale": 0.1 },
        "heater": { "table": "coil", "address": 16 * k },
        "poll_ms": 100,
    })
}

fn setup(id: &str, profile: Value, grants: Vec<String>, io_timeout: Duration) -> DeviceSetup {
    DeviceSetup { id: id.into(), profile: profile.to_string(), grants, io_timeout }
}

fn grant(sim: &SimHandle) -> String {
    format!("modbus-tcp://{}/1", sim.addr())
}

fn fence(valid_for: Duration) -> Arc<Fence> {
    let f = Arc::new(Fence::default());
    f.renew(Instant::now() + valid_for);
    f
}

/// One driver engine for the whole test binary, as on a node.
fn runtime() -> &'static Arc<DriverRuntime> {
    static RUNTIME: std::sync::OnceLock<Arc<DriverRuntime>> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| DriverRuntime::new().unwrap())
}

async fn instance(driver: &str, setup: &DeviceSetup, fence: Arc<Fence>) -> DriverInstance {
    let component = runtime().compile(&component(driver)).unwrap();
    let mut i = component.instantiate(setup, fence).await.unwrap();
    i.init(setup, Duration::from_secs(5)).await.unwrap();
    i
}

fn reports(items: &[SinkItem]) -> Vec<Value> {
    items
        .iter()
        .filter_map(|i| match i {
            SinkItem::Report(m) => Some(Value::Object(m.clone())),
            _ => None,
        })
        .collect()
}

fn telemetry(items: &[SinkItem], metric: &str) -> Vec<f64> {
    items
        .iter()
        .filter_map(|i| match i {
            SinkItem::Telemetry { metric: m, value, .. } if m == metric => Some(*value),
            _ => None,
        })
        .collect()
}

/// The driver reads the room's temperature (scaled i16), reports and sends
/// telemetry; `actuate` writes the heater coil, reads it back and reports.
#[tokio::test]
async fn modbus_room_reads_and_actuates_a_simulated_room() {
    let sim = sim(2).await;
    sim.set_temperature(1, 18.3);
    let s = setup("room-2", room_profile(1), vec![grant(&sim)], Duration::from_secs(1));
    let mut d = instance("modbus-room", &s, fence(Duration::from_secs(60))).await;
    let _ = d.take_sink();
    d.poll(Duration::from_secs(2)).await.unwrap();
    let (items, _) = d.take_sink();
    let t = telemetry(&items, "temperature");
    assert_eq!(t.len(), 1, "{items:?}");
    assert!((t[0] - 18.3).abs() < 0.051, "read {t:?}, the room is at 18.3");
    let r = reports(&items);
    assert_eq!(r.last().unwrap()["heater"], json!(false), "{r:?}");
    assert_eq!(sim.heater(1), Some(false));

    d.actuate(3, &json!({"heater": true}).to_string(), Duration::from_secs(2)).await.unwrap();
    assert_eq!(sim.heater(1), Some(true), "the coil was written");
    assert_eq!(sim.heater(0), Some(false), "and only that room's");
    let (items, _) = d.take_sink();
    assert_eq!(reports(&items).last().unwrap()["heater"], json!(true), "read back and reported");
    sim.step(Duration::from_secs(2));
    d.poll(Duration::from_secs(2)).await.unwrap();
    let (items, _) = d.take_sink();
    let t = telemetry(&items, "temperature");
    assert!(t[0] > 18.3 + 0.5, "the heater warmed the room: {t:?}");
}

/// A dead device (no answer), a slow one and one answering exceptions are
/// error values within the I/O timeout, not hangs — and a healthy device
/// polled at the same time is not held up by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_errors_and_other_devices_keep_polling() {
    let sim = sim(2).await;
    let io_timeout = Duration::from_millis(1500);
    let dead = setup("dead", room_profile(0), vec![grant(&sim)], io_timeout);
    let healthy = setup("healthy", room_profile(1), vec![grant(&sim)], io_timeout);
    let mut dead_driver = instance("modbus-room", &dead, fence(Duration::from_secs(60))).await;
    let mut healthy_driver = instance("modbus-room", &healthy, fence(Duration::from_secs(60))).await;
    sim.set_fault(Some(0), Fault::Drop);

    let stuck = tokio::spawn(async move {
        let mut errors = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let e = dead_driver.poll(Duration::from_secs(10)).await.unwrap_err();
            errors.push((e.to_string(), started.elapsed()));
            assert!(!e.is_fatal(), "an I/O timeout is the driver's error value, not a trap: {e}");
        }
        errors
    });
    let mut slowest = Duration::ZERO;
    let mut polls = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let started = Instant::now();
        healthy_driver.poll(Duration::from_secs(10)).await.unwrap();
        slowest = slowest.max(started.elapsed());
        polls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let errors = stuck.await.unwrap();
    for (e, took) in &errors {
        assert!(e.contains("timeout") || e.contains("timed out"), "{e}");
        assert!(*took >= io_timeout && *took < io_timeout * 3, "a dead device costs one I/O timeout: {took:?}");
    }
    assert!(polls > 20, "the healthy device kept polling: {polls} polls");
    assert!(slowest < io_timeout / 2, "the healthy device never waited on the dead one: slowest poll {slowest:?}");

    // A device answering exceptions: an error naming the exception.
    sim.set_fault(Some(1), Fault::Exception(4));
    let e = healthy_driver.poll(Duration::from_secs(5)).await.unwrap_err();
    assert!(e.to_string().contains('4') || e.to_string().to_lowercase().contains("failure"), "{e}");
    // A slow device (slower than the I/O timeout) is a timeout too.
    sim.set_fault(Some(1), Fault::Delay(Duration::from_secs(3)));
    let started = Instant::now();
    let e = healthy_driver.poll(Duration::from_secs(10)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{e} after {:?}", started.elapsed());
    sim.clear_faults();
    // And it recovers by itself once the device answers again.
    let mut recovered = false;
    for _ in 0..20 {
        if healthy_driver.poll(Duration::from_secs(5)).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the driver reconnects after the device comes back");
}

/// A driver that spins in `poll` is interrupted at its deadline (epochs),
/// one that panics traps; both leave the instance unusable, and a new
/// instance of a well-behaved driver works on the same engine.
#[tokio::test]
async fn a_spinning_driver_is_interrupted_within_its_deadline() {
    let s = setup("spin", json!({"mode": "spin-poll", "poll_ms": 100}), Vec::new(), Duration::from_secs(1));
    let mut d = instance("misbehave-driver", &s, fence(Duration::from_secs(60))).await;
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let e = d.poll(deadline).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, CallError::Deadline { .. }), "{e}");
    assert!(e.is_fatal());
    assert!(took >= deadline && took < deadline + Duration::from_millis(700), "interrupted after {took:?}");

    let s = setup("trap", json!({"mode": "trap-poll"}), Vec::new(), Duration::from_secs(1));
    let mut d = instance("misbehave-driver", &s, fence(Duration::from_secs(60))).await;
    let e = d.poll(deadline).await.unwrap_err();
    assert!(matches!(e, CallError::Trap { .. }) && e.is_fatal(), "{e}");

    let s = setup("ok", json!({"mode": "ok"}), Vec::new(), Duration::from_secs(1));
    let mut d = instance("misbehave-driver", &s, fence(Duration::from_secs(60))).await;
    d.poll(deadline).await.unwrap();
    let (items, _) = d.take_sink();
    assert_eq!(reports(&items), vec![json!({"polls": 1})]);

    let s = setup("spin-init", json!({"mode": "spin-init"}), Vec::new(), Duration::from_secs(1));
    let c = runtime().compile(&component("misbehave-driver")).unwrap();
    let mut d = c.instantiate(&s, fence(Duration::from_secs(60))).await.unwrap();
    let e = d.init(&s, deadline).await.unwrap_err();
    assert!(matches!(e, CallError::Deadline { .. }), "{e}");
}

/// A driver reaches only its grants: another Modbus endpoint or any TCP
/// endpoint not granted is an error value, never a connection.
#[tokio::test]
async fn a_driver_reaches_only_what_it_was_granted() {
    let sim = sim(1).await;
    let s = setup("nosy", json!({"mode": "ungranted"}), vec![grant(&sim)], Duration::from_secs(1));
    let mut d = instance("misbehave-driver", &s, fence(Duration::from_secs(60))).await;
    d.poll(Duration::from_secs(2)).await.unwrap();
    let (items, _) = d.take_sink();
    let r = reports(&items);
    let r = r.last().unwrap();
    assert!(r["modbus"].as_str().unwrap().contains("not granted"), "{r}");
    assert!(r["tcp"].as_str().unwrap().contains("not granted"), "{r}");
    assert_eq!(sim.requests(), 0, "nothing reached the device");

    // The driver world has no other imports: a command handler is refused
    // as a driver, and a driver as a command handler.
    assert!(runtime().compile(&component("counter")).is_err());
    assert!(synod::driver::is_driver(&component("modbus-room")));
    assert!(!synod::driver::is_driver(&component("counter")));
}

/// Once the lease runs out the host refuses every device write (`fenced`),
/// whatever the driver does: the coil is never written.
#[tokio::test]
async fn writes_stop_when_the_lease_runs_out() {
    let sim = sim(1).await;
    let s = setup("room-1", room_profile(0), vec![grant(&sim)], Duration::from_secs(1));
    let lease = fence(Duration::from_millis(400));
    let mut d = instance("modbus-room", &s, lease.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!lease.valid());
    let writes_before = sim.coil_writes(0);
    let e = d.actuate(1, &json!({"heater": true}).to_string(), Duration::from_secs(2)).await.unwrap_err();
    assert!(e.to_string().contains("fenced"), "{e}");
    assert_eq!(sim.heater(0), Some(false));
    assert_eq!(sim.coil_writes(0), writes_before, "no write reached the device");
    // Reads still work (a fenced node may look, not touch).
    d.poll(Duration::from_secs(2)).await.unwrap();
    // Renewed, it writes again.
    lease.renew(Instant::now() + Duration::from_secs(60));
    d.actuate(2, &json!({"heater": true}).to_string(), Duration::from_secs(2)).await.unwrap();
    assert_eq!(sim.heater(0), Some(true));
}

/// The driver is profile-driven, not written for our simulator: against
/// another Modbus TCP server (pymodbus) keeping the temperature as a float
/// in little word order in holding registers and the heater in coil 5, it
/// reads and actuates with nothing but a different profile.
#[tokio::test]
async fn modbus_room_drives_another_vendor_s_server() {
    let port = synod::dev::free_port().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/devices/pymodbus_server.py");
    let mut server = std::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let _server = Kill(server);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "pymodbus must be installed (pip install pymodbus==3.6.9)");

    let profile = json!({
        "temperature": { "table": "holding", "address": 100, "type": "f32", "word_order": "little" },
        "heater": { "table": "coil", "address": 5 },
    });
    let s = setup("vendor", profile, vec![format!("modbus-tcp://127.0.0.1:{port}/1")], Duration::from_secs(2));
    let mut d = instance("modbus-room", &s, fence(Duration::from_secs(60))).await;
    d.poll(Duration::from_secs(5)).await.unwrap();
    let (items, _) = d.take_sink();
    assert_eq!(telemetry(&items, "temperature"), vec![21.5], "{items:?}");
    assert_eq!(reports(&items).last().unwrap()["heater"], json!(false));
    d.actuate(1, &json!({"heater": true}).to_string(), Duration::from_secs(5)).await.unwrap();
    d.poll(Duration::from_secs(5)).await.unwrap();
    let (items, _) = d.take_sink();
    assert_eq!(reports(&items).last().unwrap()["heater"], json!(true), "written and read back: {items:?}");
}
