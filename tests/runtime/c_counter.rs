//! The counter written in C (`plugins/counter-c`, on `sdk/c`) behaves
//! exactly like the Rust counter: the same `describe`, and for the same
//! commands the same replies, error kinds, fuel-independent effects (state
//! writes, events). The C build goes through clang-19, wasi-libc and
//! `wasm-tools component new` (see `sdk/c/plugin.mk`); `./tests/run`
//! installs them.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde_json::json;
use synod::runtime::{CommandError, PluginLimits, Runtime};

use crate::harness::{Node, component};

/// `plugins/counter-c` built with its Makefile, once per test process.
fn c_counter() -> Vec<u8> {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/counter-c");
            let cargo_bin = std::env::var("HOME").map(|h| format!("{h}/.cargo/bin")).unwrap_or_default();
            let path = format!("{cargo_bin}:{}", std::env::var("PATH").unwrap_or_default());
            let status = std::process::Command::new("make")
                .arg("-C")
                .arg(&dir)
                .arg("--no-print-directory")
                .env("PATH", path)
                .status()
                .expect("make must be installed");
            assert!(status.success(), "building plugins/counter-c failed (see sdk/c/README.md for the toolchain)");
            std::fs::read(dir.join("counter-c.wasm")).unwrap()
        })
        .clone()
}

fn with_c_counter() -> Node {
    let mut node = Node::new(&[]);
    let plugin = Runtime::new().unwrap().load(&c_counter(), PluginLimits::default()).unwrap();
    node.sm.activate("counter", Arc::new(plugin));
    node
}

fn kind(e: &CommandError) -> &'static str {
    match e {
        CommandError::InvalidInput { .. } => "invalid",
        CommandError::Rejected { .. } => "rejected",
        CommandError::Internal { .. } => "internal",
        _ => "other",
    }
}

#[test]
fn the_c_counter_does_what_the_rust_counter_does() {
    let runtime = Runtime::new().unwrap();
    let c = runtime.load(&c_counter(), PluginLimits::default()).unwrap();
    let rust = runtime.load(&component("counter"), PluginLimits::default()).unwrap();
    assert_eq!(c.info(), rust.info(), "the same commands and queries");

    let mut a = Node::new(&[("counter", "counter")]);
    let mut b = with_c_counter();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("increment", br#"{"by": 2}"#.to_vec()),
        ("increment", Vec::new()),
        ("increment", br#"{"by": -5, "note": "a \"quoted\" note \u00e9"}"#.to_vec()),
        ("increment", br#"{"by": "x"}"#.to_vec()),
        ("increment", br#"{"by": 1.5}"#.to_vec()),
        ("increment", br#"{"by": 1, "extra": true}"#.to_vec()),
        ("increment", b"not json".to_vec()),
        ("increment", br#"{"by": 9223372036854775807}"#.to_vec()),
        ("increment", br#"{"by": 1}"#.to_vec()),
        ("reset", b"{}".to_vec()),
        ("increment", br#"{"by": 40}"#.to_vec()),
    ];
    for (command, payload) in cases {
        let (x, y) = (a.cmd_raw("counter", command, &payload), b.cmd_raw("counter", command, &payload));
        let what = format!("{command} {}", String::from_utf8_lossy(&payload));
        match (&x.result, &y.result) {
            (Ok(rx), Ok(ry)) => {
                let rx: serde_json::Value = serde_json::from_slice(rx).unwrap();
                let ry: serde_json::Value = serde_json::from_slice(ry).unwrap();
                assert_eq!(rx, ry, "{what}");
            }
            (Err(ex), Err(ey)) => assert_eq!(kind(ex), kind(ey), "{what}: rust {ex}, c {ey}"),
            (rx, ry) => panic!("{what}: rust {rx:?}, c {ry:?}"),
        }
        assert_eq!(x.writes, y.writes, "{what}: the same state writes");
        assert_eq!(x.events, y.events, "{what}: the same events");
    }
    assert_eq!(a.query("counter", "get", json!(null)).result, b.query("counter", "get", json!(null)).result);
}
