//! Two independent runtimes fed the same random sequence of commands agree
//! on every output, every fuel count, the state and the digest — and the
//! counter agrees with a model kept by the test.

use serde_json::{Value, json};
use synod::runtime::CommandError;

use crate::harness::{Node, Rng, test_seed};

const PLUGINS: [(&str, &str); 3] = [("counter", "counter"), ("thermostat", "thermostat"), ("misbehave", "misbehave")];

fn random_command(rng: &mut Rng) -> (&'static str, &'static str, Vec<u8>) {
    let zone = ["kitchen", "hall", "attic"][rng.below(3) as usize];
    let json = |v: Value| serde_json::to_vec(&v).unwrap();
    match rng.below(100) {
        0..=39 => ("counter", "increment", json(json!({"by": rng.below(2001) as i64 - 1000}))),
        40..=41 => ("counter", "reset", json(json!({}))),
        42..=44 => ("counter", "increment", json(json!({"by": "x"}))),
        45..=59 => {
            ("thermostat", "set_setpoint", json(json!({"zone": zone, "setpoint": rng.below(400) as f64 / 10.0})))
        }
        60..=84 => {
            ("thermostat", "report", json(json!({"zone": zone, "temperature": 10.0 + rng.below(2000) as f64 / 100.0})))
        }
        85..=89 => ("misbehave", "random", Vec::new()),
        90..=93 => ("misbehave", "write", Vec::new()),
        94..=95 => ("misbehave", "fail", Vec::new()),
        96 => ("misbehave", "trap", Vec::new()),
        97 => ("misbehave", "panic", Vec::new()),
        98 => ("misbehave", "huge", Vec::new()),
        // The expensive ones (a whole fuel budget, 64 MiB, a full stack) are
        // rare but present.
        _ => ("misbehave", ["spin", "alloc", "recurse"][rng.below(3) as usize], Vec::new()),
    }
}

#[test]
fn two_runtimes_agree_on_a_random_sequence() {
    let seed = test_seed("determinism");
    let mut rng = Rng(seed);
    let mut a = Node::new(&PLUGINS);
    let mut b = Node::new(&PLUGINS);

    let mut model_counter: i64 = 0;
    let (mut ok, mut failed, mut events) = (0, 0, 0);
    for step in 0..1_200 {
        let (plugin, command, payload) = random_command(&mut rng);
        let x = a.cmd_raw(plugin, command, &payload);
        let y = b.cmd_raw(plugin, command, &payload);
        assert_eq!(x.result, y.result, "step {step}: {plugin}.{command}");
        assert_eq!(x.fuel_used, y.fuel_used, "step {step}: {plugin}.{command}");
        assert_eq!(x.writes, y.writes, "step {step}");
        assert_eq!(x.events, y.events, "step {step}");
        assert_eq!(a.sm.digest(), b.sm.digest(), "step {step}");
        assert!(x.result.as_ref().err().is_none_or(CommandError::is_deterministic));

        if plugin == "counter" && x.result.is_ok() {
            model_counter = match command {
                "reset" => 0,
                _ => model_counter + serde_json::from_slice::<Value>(&payload).unwrap()["by"].as_i64().unwrap(),
            };
        }
        if x.result.is_ok() {
            ok += 1
        } else {
            failed += 1
        }
        events += x.events.len();
    }
    eprintln!("{ok} succeeded, {failed} failed, {events} events");
    assert!(ok > 700 && failed > 30 && events > 0, "the sequence must exercise both paths");
    assert_eq!(a.sm.kv(), b.sm.kv());
    assert_eq!(a.sm.last_applied(), 1_200);
    let got = serde_json::from_slice::<Value>(a.query("counter", "get", json!(null)).result.as_ref().unwrap()).unwrap();
    assert_eq!(got, json!({"value": model_counter}));
}
