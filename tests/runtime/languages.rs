//! One behaviour, four languages: the counter in Rust, C, JavaScript and
//! Python and the thermostat in Rust, JavaScript and Python, each built from
//! `plugins/` by `synod plugin build`'s code, run through the same table of
//! cases. They must declare the same commands and answer every case alike:
//! the same reply, the same error kind, the same state writes and events.
//! Numbers are compared as numbers (a JavaScript build writes `21` where
//! serde writes `21.0`; both read back as the same f64).
//!
//! And per language (JavaScript, Python, C; Rust in determinism.rs),
//! determinism: a random sequence of 1,000+ commands that
//! reach for clocks, randomness, float math, iteration order, exceptions,
//! running out of fuel and memory, on two independent runtimes, gives
//! identical outputs, fuel, writes, events and digests.

use std::sync::Arc;

use serde_json::{Value, json};
use synod::runtime::{CommandError, Outcome, Runtime};

use crate::harness::{Node, Rng, component, test_seed};
use crate::plugins::built_dir;

fn kind(e: &CommandError) -> String {
    match e {
        CommandError::InvalidInput { .. } => "invalid".into(),
        CommandError::Rejected { .. } => "rejected".into(),
        CommandError::Internal { .. } => "internal".into(),
        other => format!("other: {other}"),
    }
}

/// A JSON value with every number as an f64: what a reader of the value
/// gets in any of the languages.
fn norm(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.into_iter().map(norm).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, norm(v))).collect()),
        other => other,
    }
}

fn parsed(bytes: &[u8]) -> Value {
    norm(serde_json::from_slice(bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(bytes) })))
}

/// What a case did, comparable across languages.
fn effects(o: &Outcome) -> Value {
    let result = match &o.result {
        Ok(bytes) => json!({ "ok": parsed(bytes) }),
        Err(e) => json!({ "error": kind(e) }),
    };
    let writes: Vec<Value> = o.writes.iter().map(|(k, v)| json!([k, v.map(parsed)])).collect();
    let events: Vec<Value> = o.events.iter().map(|e| json!([e.topic, parsed(&e.payload)])).collect();
    json!({ "result": result, "writes": writes, "events": events })
}

/// Run `cases` on every build; each must do what the first (Rust) did.
fn same_behaviour(plugin: &str, builds: &[(&str, Vec<u8>)], cases: &[(&str, &str, Value)]) {
    let runtime = Runtime::new().unwrap();
    let mut nodes = Vec::new();
    let mut info = None;
    for (lang, bytes) in builds {
        let loaded = Arc::new(runtime.load(bytes, Default::default()).unwrap());
        let info = info.get_or_insert_with(|| loaded.info().clone());
        assert_eq!(loaded.info(), &*info, "{plugin} in {lang} declares the same commands and queries");
        let mut node = Node::with_components(&[]);
        node.sm.activate(plugin, loaded);
        nodes.push((lang, node));
    }
    for (i, (kind, name, payload)) in cases.iter().enumerate() {
        let bytes = match payload {
            Value::Null => Vec::new(),
            Value::String(s) if s.starts_with("raw:") => s.as_bytes()[4..].to_vec(),
            v => serde_json::to_vec(v).unwrap(),
        };
        let mut first: Option<Value> = None;
        for (lang, node) in nodes.iter_mut() {
            let o = match *kind {
                "cmd" => node.cmd_raw(plugin, name, &bytes),
                _ => node.sm.query(
                    &synod::runtime::Context { index: 0, term: 0, timestamp_ms: 0, caller: "test".into() },
                    plugin,
                    name,
                    &bytes,
                ),
            };
            let got = effects(&o);
            match &first {
                None => first = Some(got),
                Some(want) => assert_eq!(
                    &got,
                    want,
                    "{plugin} case {i} ({kind} {name} {payload}): {lang} differs from rust (its error: {:?}, logs {:?})",
                    o.result.as_ref().err(),
                    o.logs
                ),
            }
        }
    }
}

#[test]
fn the_counter_behaves_alike_in_rust_c_javascript_and_python() {
    let builds = vec![
        ("rust", component("counter")),
        ("c", built_dir("counter-c")),
        ("javascript", built_dir("counter-js")),
        ("python", built_dir("counter-py")),
    ];
    let cases: Vec<(&str, &str, Value)> = vec![
        ("query", "get", Value::Null),
        ("cmd", "increment", json!({"by": 2})),
        ("cmd", "increment", Value::Null),
        ("cmd", "increment", json!({"by": -5, "note": "a \"quoted\" note é ✓"})),
        ("cmd", "increment", json!({"by": "x"})),
        ("cmd", "increment", json!({"by": 1.5})),
        ("cmd", "increment", json!({"by": 1, "extra": true})),
        ("cmd", "increment", json!("raw:not json")),
        ("cmd", "increment", json!("raw:null")),
        ("cmd", "increment", json!([3, "as an array"])),
        ("cmd", "increment", json!({"by": 9_223_372_036_854_775_807_i64})),
        ("cmd", "increment", json!({"by": 1})),
        ("cmd", "increment", json!({"by": -9_223_372_036_854_775_807_i64})),
        ("query", "get", Value::Null),
        ("cmd", "increment", json!({"by": 9_223_372_036_854_775_807_i64})),
        ("cmd", "increment", json!({"by": 1})),
        ("cmd", "reset", json!({})),
        ("cmd", "increment", json!({"by": 40})),
        ("cmd", "nope", json!({})),
        ("query", "get", Value::Null),
        ("query", "nope", Value::Null),
    ];
    same_behaviour("counter", &builds, &cases);
}

#[test]
fn the_thermostat_behaves_alike_in_rust_javascript_and_python() {
    let builds = vec![
        ("rust", component("thermostat")),
        ("javascript", built_dir("thermostat-js")),
        ("python", built_dir("thermostat-py")),
    ];
    let cases: Vec<(&str, &str, Value)> = vec![
        ("query", "zones", Value::Null),
        ("cmd", "set_setpoint", json!({"zone": "kitchen", "setpoint": 21})),
        ("cmd", "report", json!({"zone": "kitchen", "temperature": 19.2})),
        ("cmd", "report", json!({"zone": "kitchen", "temperature": 21.2})),
        ("cmd", "report", json!({"zone": "kitchen", "temperature": 21.6})),
        ("cmd", "set_setpoint", json!({"zone": "kitchen", "setpoint": 23.5, "hysteresis": 1})),
        ("cmd", "set_setpoint", json!({"zone": "kitchen", "setpoint": 40})),
        ("cmd", "set_setpoint", json!({"zone": "kitchen", "setpoint": 20, "hysteresis": 0})),
        ("cmd", "set_setpoint", json!({"zone": "bad zone", "setpoint": 20})),
        ("cmd", "set_setpoint", json!({"zone": "hall", "setpoint": "warm"})),
        ("cmd", "set_setpoint", json!({"zone": "hall", "setpoint": 20, "colour": "red"})),
        ("cmd", "report", json!({"zone": "hall", "temperature": 500})),
        ("cmd", "report", json!({"zone": "hall"})),
        ("cmd", "report", json!({"zone": "hall", "temperature": 15})),
        ("cmd", "configure", json!({"min_setpoint": 10, "max_setpoint": 25})),
        ("cmd", "configure", json!({"min_setpoint": 25, "max_setpoint": 10})),
        ("cmd", "set_setpoint", json!({"zone": "hall", "setpoint": 26})),
        ("cmd", "set_setpoint", json!({"zone": "hall", "setpoint": 18})),
        ("cmd", "device_reported", json!({"device": "attic", "reported": {"temperature": 12.5}, "desired": {}})),
        ("cmd", "device_reported", json!({"device": "attic", "reported": {"temperature": "cold"}})),
        (
            "cmd",
            "device_reported",
            json!({"device": "hall", "reported": {"temperature": 14}, "desired": {"heater": true}}),
        ),
        (
            "cmd",
            "device_reported",
            json!({"device": "hall", "reported": {"temperature": 22}, "desired": {"heater": true}}),
        ),
        ("cmd", "report", json!("raw:{")),
        ("query", "zone", json!({"zone": "kitchen"})),
        ("query", "zone", json!({"zone": "cellar"})),
        ("query", "zone", json!({"zone": "no such zone!"})),
        ("query", "zones", Value::Null),
    ];
    same_behaviour("thermostat", &builds, &cases);
}

fn random_command(rng: &mut Rng) -> (&'static str, &'static str, Vec<u8>) {
    let to = |v: Value| serde_json::to_vec(&v).unwrap();
    let words = ["ab", "abc", "kitchen", "hall", "x", "attic", "zone-9", "éé", "10", "2", "long-key-name"];
    match rng.below(100) {
        0..=24 => ("counter", "increment", to(json!({"by": rng.below(2001) as i64 - 1000}))),
        25..=26 => ("counter", "reset", to(json!({}))),
        27..=29 => ("counter", "increment", to(json!({"by": "x"}))),
        30..=37 => ("misbehave", "clock", Vec::new()),
        38..=47 => ("misbehave", "random", Vec::new()),
        48..=55 => ("misbehave", "floats", to(json!({"x": rng.below(10_000) as f64 / 3.0}))),
        56..=67 => {
            let keys: Vec<&str> = (0..rng.below(8)).map(|_| words[rng.below(words.len() as u64) as usize]).collect();
            ("misbehave", "order", to(json!({ "keys": keys })))
        }
        68..=85 => ("misbehave", "write", Vec::new()),
        86..=90 => ("misbehave", "throw", Vec::new()),
        91..=95 => {
            let kind = ["invalid", "rejected"][rng.below(2) as usize];
            ("misbehave", "fail", to(json!({ "kind": kind })))
        }
        // The expensive ones (a whole fuel budget, all the memory) are rare.
        96..=98 => ("misbehave", "spin", Vec::new()),
        _ => ("misbehave", "alloc", Vec::new()),
    }
}

/// `throw` is how the language's uncaught failure is reported: an exception
/// becomes `internal`, a C panic a trap.
fn two_runtimes_agree(lang: &str, counter: &str, misbehave: &str, steps: u32, throw: &str) {
    let seed = test_seed(&format!("{lang} determinism"));
    let (counter, misbehave) = (built_dir(counter), built_dir(misbehave));
    let installs: [(&str, &[u8]); 2] = [("counter", &counter), ("misbehave", &misbehave)];
    let mut a = Node::with_components(&installs);
    let mut b = Node::with_components(&installs);
    let mut rng = Rng(seed);
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    let mut outputs = std::collections::BTreeSet::new();
    for step in 0..steps {
        let (plugin, command, payload) = random_command(&mut rng);
        let x = a.cmd_raw(plugin, command, &payload);
        let y = b.cmd_raw(plugin, command, &payload);
        let what = format!("{lang} step {step}: {plugin}.{command}");
        assert_eq!(x.result, y.result, "{what}");
        assert_eq!(x.fuel_used, y.fuel_used, "{what}");
        assert_eq!(x.writes, y.writes, "{what}");
        assert_eq!(x.events, y.events, "{what}");
        assert_eq!(x.logs, y.logs, "{what}");
        assert_eq!(a.sm.digest(), b.sm.digest(), "{what}");
        assert!(x.result.as_ref().err().is_none_or(CommandError::is_deterministic), "{what}: {:?}", x.result);
        let outcome = match &x.result {
            Ok(bytes) => {
                if command == "random" || command == "clock" {
                    outputs.insert(bytes.clone());
                }
                "ok".to_owned()
            }
            Err(e) => format!("{e:?}").split([' ', '{', '(']).next().unwrap_or("").to_owned(),
        };
        *seen.entry(format!("{command}:{outcome}")).or_default() += 1;
    }
    eprintln!("{lang}: {seen:?}");
    // The sequence must have reached every path it is meant to test …
    for path in ["clock:ok", "random:ok", "floats:ok", "order:ok", "write:ok", throw, "spin:OutOfFuel", "increment:ok"]
    {
        assert!(seen.contains_key(path), "{lang}: the sequence never reached {path}: {seen:?}");
    }
    // Out of linear memory: a trap in JavaScript, a MemoryError (reported as
    // `internal`) in Python, out of fuel touching every page in C; either
    // way the same on both runtimes.
    assert!(seen.keys().any(|k| k.starts_with("alloc:") && !k.ends_with(":ok")), "{lang}: alloc must fail: {seen:?}");
    // … and clocks and randomness must actually vary between entries.
    assert!(outputs.len() as u32 > (seen["clock:ok"] + seen["random:ok"]) / 2, "{lang}: clock/random outputs repeat");
    assert_eq!(a.sm.kv(), b.sm.kv());
}

#[test]
fn javascript_plugins_are_deterministic() {
    two_runtimes_agree("javascript", "counter-js", "misbehave-js", 1_000, "throw:Internal");
}

#[test]
fn python_plugins_are_deterministic() {
    two_runtimes_agree("python", "counter-py", "misbehave-py", 1_000, "throw:Internal");
}

#[test]
fn c_plugins_are_deterministic() {
    two_runtimes_agree("c", "counter-c", "misbehave-c", 1_000, "throw:Trap");
}

/// The SDKs take the clock from the entry and randomness from the host's
/// stream, not from the build: two entries see different times and numbers.
#[test]
fn sdk_clocks_and_randomness_follow_the_entry() {
    for (lang, dir) in [("javascript", "misbehave-js"), ("python", "misbehave-py")] {
        let bytes = built_dir(dir);
        let mut node = Node::with_components(&[("m", &bytes)]);
        let one = crate::harness::ok_json(&node.cmd_raw("m", "clock", b""));
        let two = crate::harness::ok_json(&node.cmd_raw("m", "clock", b""));
        assert_eq!(one["entry"], json!(1_800_000_000_007_u64), "{lang}");
        let now = one["now"].as_f64().unwrap();
        let now_ms = if now > 1e11 { now } else { now * 1000.0 };
        assert!((now_ms - 1_800_000_000_007.0).abs() < 0.5, "{lang}: the clock is the entry's timestamp: {one}");
        assert_ne!(one["now"], two["now"], "{lang}");
        assert!(one["iso"].as_str().unwrap().starts_with("2027-01-15T08:00:00.007"), "{lang}: {one}");
        let r1 = crate::harness::ok_json(&node.cmd_raw("m", "random", b""));
        let r2 = crate::harness::ok_json(&node.cmd_raw("m", "random", b""));
        assert_ne!(r1["a"], r2["a"], "{lang}: a fresh seed per entry");
        let thrown = node.cmd_raw("m", "throw", b"");
        match &thrown.result {
            Err(CommandError::Internal { message }) => {
                assert!(message.contains("uncaught exception"), "{lang}: {message}");
                assert!(message.contains("misbehave"), "{lang}: the trace names the plugin's file: {message}");
            }
            other => panic!("{lang}: an uncaught exception is `internal`, got {other:?}"),
        }
    }
}

/// `synod plugin new` writes, in each language, a plugin that
/// `synod plugin build` builds and that passes its own `tests.json` (the
/// same code `synod plugin test` runs). Rust is left out here: its scaffold
/// builds a workspace of its own from nothing (minutes); the CLI does it the
/// same way.
#[test]
fn scaffolds_build_and_pass_their_own_tests() {
    use synod::toolchain::{BuildOptions, Language, plugin_test, scaffold};
    let root = tempfile::tempdir().unwrap();
    let target = std::env::var_os("SYNOD_PLUGIN_TARGET_DIR").map(std::path::PathBuf::from);
    for lang in [Language::JavaScript, Language::Python, Language::C] {
        let dir = root.path().join(format!("tally-{}", lang.name()));
        scaffold::new_plugin(&dir, &format!("tally-{}", lang.name()), lang).unwrap();
        assert_eq!(Language::detect(&dir), Some(lang));
        let options = BuildOptions { target_dir: target.clone(), ..Default::default() };
        let built = crate::plugins::serialized(|| synod::toolchain::build(&dir, &options))
            .unwrap_or_else(|e| panic!("{lang:?}: {e}"));
        let bytes = std::fs::read(&built[0].component).unwrap();
        let (cases, failures) = plugin_test::run(&bytes, &dir.join("tests.json")).unwrap();
        assert!(cases >= 5 && failures.is_empty(), "{lang:?}: {failures:?}");
        // A scaffold never overwrites a plugin that is already there.
        assert!(scaffold::new_plugin(&dir, "again", lang).is_err());
    }
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = synod::toolchain::build(&empty, &BuildOptions::default()).unwrap_err().to_string();
    assert!(err.contains("is not a plugin") && err.contains("synod plugin new"), "{err}");
    assert!(scaffold::new_plugin(&root.path().join("x"), "Bad Name", Language::JavaScript).is_err());
}
