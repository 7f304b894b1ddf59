//! `synod plugin test <dir>`: run a plugin's `tests.json` against its built
//! component on a local runtime, the same apply stage a node runs.
//!
//! `tests.json` is `{"cases": [...]}`; a case is `{"command": name}` or
//! `{"query": name}`, an optional JSON `payload` (omitted: an empty
//! payload), and `expect`: `{"ok": <JSON reply>}` or `{"error": <kind>}`
//! (the HTTP API's error kinds: `invalid_input`, `rejected`,
//! `plugin_error`, `out_of_fuel`, ...). Commands apply in order at log
//! indexes 1, 2, … with a fixed clock, so a test is deterministic.

use std::path::Path;
use std::sync::Arc;

use crate::node::service::ServiceError;
use crate::replica::Replica;
use crate::runtime::{Context, PluginLimits, Runtime};

/// One case that did not do what it expected.
#[derive(Debug)]
pub struct Failure {
    /// Position in `cases` (from 1).
    pub case: usize,
    /// What was expected and what happened.
    pub message: String,
}

/// Run the cases in `tests` against `component`; the failures (empty when
/// every case passed) and how many cases ran.
pub fn run(component: &[u8], tests: &Path) -> anyhow::Result<(usize, Vec<Failure>)> {
    let text = std::fs::read_to_string(tests).map_err(|e| anyhow::anyhow!("{}: {e}", tests.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", tests.display()))?;
    let cases = doc["cases"].as_array().ok_or_else(|| anyhow::anyhow!("{}: no \"cases\" array", tests.display()))?;
    let runtime = Runtime::new()?;
    let plugin = runtime.load(component, PluginLimits::default())?;
    let mut replica = Replica::default();
    replica.activate("plugin", Arc::new(plugin));
    let mut failures = Vec::new();
    let mut index = 0;
    for (i, case) in cases.iter().enumerate() {
        let payload = match case.get("payload") {
            None => Vec::new(),
            Some(p) => serde_json::to_vec(p)?,
        };
        let (what, outcome) = if let Some(name) = case["command"].as_str() {
            index += 1;
            let ctx = Context { index, term: 1, timestamp_ms: 1_800_000_000_000 + index * 1000, caller: "test".into() };
            (format!("command {name}"), replica.apply_command(&ctx, "plugin", name, &payload)?)
        } else if let Some(name) = case["query"].as_str() {
            let ctx = Context { index, term: 1, timestamp_ms: 0, caller: "test".into() };
            (format!("query {name}"), replica.query(&ctx, "plugin", name, &payload))
        } else {
            anyhow::bail!("{}: case {} names neither a command nor a query", tests.display(), i + 1);
        };
        let got = match &outcome.result {
            Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(v) => serde_json::json!({ "ok": v }),
                Err(_) => serde_json::json!({ "ok_bytes": String::from_utf8_lossy(bytes) }),
            },
            Err(e) => serde_json::json!({ "error": ServiceError::command(e).kind, "message": e.to_string() }),
        };
        let expect = &case["expect"];
        let pass = match (expect.get("ok"), expect.get("error")) {
            (Some(ok), _) => got.get("ok") == Some(ok),
            (None, Some(kind)) => got.get("error") == Some(kind),
            (None, None) => true,
        };
        if !pass {
            failures.push(Failure { case: i + 1, message: format!("{what}: expected {expect}, got {got}") });
        }
    }
    Ok((cases.len(), failures))
}
