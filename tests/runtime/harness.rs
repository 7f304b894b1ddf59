//! Builds the example plugins once per test process and gives each test its
//! own node: a runtime and a state machine of its own.

use std::path::PathBuf;
use std::sync::Arc;

use synod::replica::Replica;
use synod::runtime::{Context, Outcome, PluginLimits, Runtime};

pub use crate::plugins::{component, core_module};

/// The `wit/` directory.
pub fn wit_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../wit")
}

/// One node's runtime stage: what a cluster member runs for every entry.
pub struct Node {
    pub sm: Replica,
    next_index: u64,
}

impl Node {
    /// A node with `installs` = (name, example plugin) active.
    pub fn new(installs: &[(&str, &str)]) -> Node {
        Node::with_limits(installs, PluginLimits::default())
    }

    /// [`Node::new`] with every plugin installed under `limits`.
    pub fn with_limits(installs: &[(&str, &str)], limits: PluginLimits) -> Node {
        let runtime = Runtime::new().unwrap();
        let mut sm = Replica::default();
        for (name, plugin) in installs {
            let p = runtime.load(&component(plugin), limits).unwrap();
            sm.activate(name, Arc::new(p));
        }
        Node { sm, next_index: 1 }
    }

    /// The context of the next entry: index-derived, like a leader's.
    fn next_ctx(&mut self) -> Context {
        let index = self.next_index;
        self.next_index += 1;
        Context { index, term: 1 + index / 100, timestamp_ms: 1_800_000_000_000 + index * 7, caller: "test".into() }
    }

    /// Apply a command with a JSON payload as the next log entry.
    pub fn cmd(&mut self, plugin: &str, command: &str, payload: serde_json::Value) -> Outcome {
        let bytes = serde_json::to_vec(&payload).unwrap();
        self.cmd_raw(plugin, command, &bytes)
    }

    /// Apply a command with raw payload bytes as the next log entry.
    pub fn cmd_raw(&mut self, plugin: &str, command: &str, payload: &[u8]) -> Outcome {
        let ctx = self.next_ctx();
        self.sm.apply_command(&ctx, plugin, command, payload).unwrap()
    }

    /// Run a query against the current state.
    pub fn query(&self, plugin: &str, name: &str, payload: serde_json::Value) -> Outcome {
        let ctx = Context { index: self.sm.last_applied(), term: 1, timestamp_ms: 0, caller: "test".into() };
        self.sm.query(&ctx, plugin, name, &serde_json::to_vec(&payload).unwrap())
    }
}

/// The JSON output of a successful outcome.
pub fn ok_json(outcome: &Outcome) -> serde_json::Value {
    match &outcome.result {
        Ok(bytes) => serde_json::from_slice(bytes).unwrap(),
        Err(e) => panic!("expected success, got {e:?} (logs: {:?})", outcome.logs),
    }
}

impl Node {
    /// A node with `installs` = (name, component bytes) active.
    pub fn with_components(installs: &[(&str, &[u8])]) -> Node {
        let runtime = Runtime::new().unwrap();
        let mut sm = Replica::default();
        for (name, bytes) in installs {
            let p = runtime.load(bytes, PluginLimits::default()).unwrap();
            sm.activate(name, Arc::new(p));
        }
        Node { sm, next_index: 1 }
    }
}

pub use crate::rng::{Rng, test_seed};
