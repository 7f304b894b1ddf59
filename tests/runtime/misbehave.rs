//! Every misbehaviour ends in its typed error, drops the command's writes,
//! and leaves the runtime serving normal commands.

use serde_json::json;
use synod::runtime::{CommandError, PluginLimits};

use crate::harness::{Node, ok_json};

fn expect(command: &str, check: impl Fn(&CommandError) -> bool) {
    let mut node = Node::new(&[("misbehave", "misbehave"), ("counter", "counter")]);
    assert_eq!(ok_json(&node.cmd("misbehave", "write", json!(null))), json!("written"));
    let digest_before = node.sm.digest();

    let out = node.cmd("misbehave", command, json!(null));
    let err = out.result.as_ref().expect_err(command);
    assert!(check(err), "`{command}` ended in {err:?}");
    assert!(err.is_deterministic());
    assert!(out.writes.is_empty() && out.events.is_empty(), "`{command}` kept its effects");
    // The failure is applied (and hashed) like any result.
    assert_ne!(node.sm.digest(), digest_before);
    assert_eq!(node.sm.last_applied(), 2);

    // The write the command made before failing is gone.
    assert_eq!(ok_json(&node.query("misbehave", "read", json!(null))), json!("write"));
    // The same runtime still serves normal commands.
    assert_eq!(ok_json(&node.cmd("counter", "increment", json!({"by": 2}))), json!({"value": 2}));
    assert_eq!(ok_json(&node.cmd("misbehave", "write", json!(null))), json!("written"));
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let limit = PluginLimits::default().fuel;
    expect("spin", |e| *e == CommandError::OutOfFuel { limit });
}

#[test]
fn memory_bomb_runs_out_of_memory() {
    let limit = PluginLimits::default().memory_bytes;
    expect("alloc", |e| *e == CommandError::OutOfMemory { limit });
}

#[test]
fn unreachable_is_a_trap() {
    expect("trap", |e| matches!(e, CommandError::Trap { message } if message.contains("unreachable")));
}

#[test]
fn panic_is_a_trap_with_its_message() {
    expect("panic", |e| {
        matches!(e, CommandError::Trap { message }
            if message.starts_with("plugin panicked: deliberate panic for panic at "))
    });
}

#[test]
fn huge_output_is_capped() {
    let limit = PluginLimits::default().output_bytes;
    expect("huge", |e| *e == CommandError::OutputTooLarge { size: 2 * 1024 * 1024, limit });
}

#[test]
fn deep_recursion_overflows_the_stack() {
    expect("recurse", |e| *e == CommandError::StackOverflow);
}

#[test]
fn handler_error_drops_writes() {
    expect("fail", |e| *e == CommandError::Rejected { message: "failing after a write, on purpose".into() });
}

#[test]
fn fuel_is_accounted_and_bounded() {
    let mut node = Node::new(&[("misbehave", "misbehave")]);
    let spin = node.cmd("misbehave", "spin", json!(null));
    assert_eq!(spin.fuel_used, PluginLimits::default().fuel);
    let write = node.cmd("misbehave", "write", json!(null));
    assert!(write.fuel_used > 0 && write.fuel_used < 1_000_000, "{}", write.fuel_used);
}

/// `scan("", u32::MAX)` over 100,000 keys: a hard ceiling on the entries one
/// call returns, and host calls pay fuel for the bytes they move, so with a
/// small budget the same scan stops as out of fuel instead of copying the
/// namespace for free.
#[test]
fn a_scan_of_everything_is_bounded() {
    let mut node = Node::new(&[("misbehave", "misbehave")]);
    for batch in 0..20u64 {
        let filled = node.cmd("misbehave", "fill", json!({ "from": batch * 5_000, "count": 5_000 }));
        assert_eq!(ok_json(&filled), json!(5_000));
    }
    let all = node.cmd("misbehave", "scan_all", json!(null));
    assert_eq!(ok_json(&all), json!(65_536), "one scan returns at most 65,536 entries");
    let query = node.query("misbehave", "scan_all", json!(null));
    assert_eq!(ok_json(&query), json!(65_536));

    let limits = PluginLimits { fuel: 1_000_000, ..PluginLimits::default() };
    let mut small = Node::with_limits(&[("misbehave", "misbehave")], limits);
    // Writes cost fuel too: fill in slices that fit the small budget.
    for slice in 0..500u64 {
        let filled = small.cmd("misbehave", "fill", json!({ "from": slice * 200, "count": 200 }));
        assert!(filled.result.is_ok(), "{:?}", filled.result);
    }
    let scan = small.cmd("misbehave", "scan_all", json!(null));
    assert_eq!(scan.result, Err(CommandError::OutOfFuel { limit: 1_000_000 }));
    assert_eq!(scan.fuel_used, 1_000_000);
}
