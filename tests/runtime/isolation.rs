//! What a handler can reach: its own namespace, read-only in queries.

use serde_json::json;
use synod::runtime::CommandError;
use synod::state::StateView;

use crate::harness::{Node, ok_json};

#[test]
fn query_cannot_write() {
    let mut node = Node::new(&[("misbehave", "misbehave")]);
    ok_json(&node.cmd("misbehave", "write", json!(null)));
    let out = node.query("misbehave", "try_write", json!(null));
    assert_eq!(out.result, Err(CommandError::Rejected { message: "state is read-only in a query".into() }));
    assert!(out.writes.is_empty());
    assert_eq!(ok_json(&node.query("misbehave", "read", json!(null))), json!("write"));
}

#[test]
fn plugins_cannot_reach_each_others_namespace() {
    // The same component installed twice: two names, two namespaces.
    let mut node = Node::new(&[("a", "counter"), ("b", "counter"), ("misbehave", "misbehave")]);
    assert_eq!(ok_json(&node.cmd("a", "increment", json!({"by": 5}))), json!({"value": 5}));
    assert_eq!(ok_json(&node.query("b", "get", json!(null))), json!({"value": 0}));
    assert_eq!(ok_json(&node.cmd("b", "increment", json!({"by": 1}))), json!({"value": 1}));
    assert_eq!(ok_json(&node.query("a", "get", json!(null))), json!({"value": 5}));

    ok_json(&node.cmd("misbehave", "write", json!(null)));
    let kv = node.sm.kv();
    let keys = |ns: &str| -> Vec<String> { kv.view(ns).iter().map(|(k, _)| k.to_owned()).collect() };
    assert_eq!(keys("a"), ["value"]);
    assert_eq!(keys("b"), ["value"]);
    assert_eq!(keys("misbehave"), ["victim"]);
    assert_eq!(kv.view("a").get("victim").unwrap(), None);
}

#[test]
fn unknown_plugin_command_and_query_are_typed_errors() {
    let mut node = Node::new(&[("counter", "counter")]);
    assert_eq!(
        node.cmd("nope", "increment", json!(null)).result,
        Err(CommandError::UnknownPlugin { name: "nope".into() })
    );
    assert_eq!(
        node.cmd("counter", "explode", json!(null)).result,
        Err(CommandError::UnknownCommand { name: "explode".into() })
    );
    assert_eq!(
        node.query("counter", "explode", json!(null)).result,
        Err(CommandError::UnknownQuery { name: "explode".into() })
    );
}

#[test]
fn counter_rejects_non_numeric_input() {
    let mut node = Node::new(&[("counter", "counter")]);
    let out = node.cmd("counter", "increment", json!({"by": "three"}));
    match out.result {
        Err(CommandError::InvalidInput { message }) => {
            assert!(message.starts_with("invalid `increment` payload: invalid type: string"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let out = node.cmd_raw("counter", "increment", b"{not json");
    assert!(matches!(out.result, Err(CommandError::InvalidInput { .. })), "{:?}", out.result);
    ok_json(&node.cmd("counter", "increment", json!({"by": i64::MAX})));
    assert_eq!(
        node.cmd("counter", "increment", json!({"by": 1})).result,
        Err(CommandError::Rejected { message: "adding 1 would overflow the counter".into() })
    );
}

#[test]
fn thermostat_decides_and_emits() {
    let mut node = Node::new(&[("thermostat", "thermostat")]);
    let out = node.cmd("thermostat", "set_setpoint", json!({"zone": "kitchen", "setpoint": 21.0}));
    assert_eq!(ok_json(&out)["heater"], json!(false));
    let out = node.cmd("thermostat", "report", json!({"zone": "kitchen", "temperature": 19.0}));
    assert_eq!(ok_json(&out)["heater"], json!(true));
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].topic, "heater.on");
    // Inside the hysteresis band: no change, no event.
    let out = node.cmd("thermostat", "report", json!({"zone": "kitchen", "temperature": 21.4}));
    assert_eq!(ok_json(&out)["heater"], json!(true));
    assert!(out.events.is_empty());
    let out = node.cmd("thermostat", "report", json!({"zone": "kitchen", "temperature": 21.6}));
    assert_eq!(out.events[0].topic, "heater.off");

    let out = node.cmd("thermostat", "set_setpoint", json!({"zone": "kitchen", "setpoint": 45}));
    assert_eq!(
        out.result,
        Err(CommandError::Rejected { message: "setpoint 45 is outside the allowed range 5..30".into() })
    );
    ok_json(&node.cmd("thermostat", "configure", json!({"min_setpoint": 10, "max_setpoint": 50})));
    ok_json(&node.cmd("thermostat", "set_setpoint", json!({"zone": "kitchen", "setpoint": 45})));
    let zones = ok_json(&node.query("thermostat", "zones", json!(null)));
    assert_eq!(zones[0]["zone"], json!("kitchen"));
    assert_eq!(zones[0]["setpoint"], json!(45.0));
}

#[test]
fn randomness_and_clock_come_from_the_entry() {
    let mut a = Node::new(&[("misbehave", "misbehave")]);
    let mut b = Node::new(&[("misbehave", "misbehave")]);
    let first_a = ok_json(&a.cmd("misbehave", "random", json!(null)));
    let first_b = ok_json(&b.cmd("misbehave", "random", json!(null)));
    assert_eq!(first_a, first_b);
    assert_eq!(first_a["index"], json!(1));
    assert_eq!(first_a["timestamp_ms"], json!(1_800_000_000_007u64));
    let second = ok_json(&a.cmd("misbehave", "random", json!(null)));
    assert_ne!(first_a["u64"], second["u64"]);
    assert_ne!(first_a["bytes"], second["bytes"]);
}
