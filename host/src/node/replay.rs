//! The replay gate: before a new version of a plugin goes live, run it on
//! the plugin's last N applied commands and see what it would have done.
//!
//! Both the active version and the candidate start from a scratch copy of
//! the plugin's current state (copy-on-write, never replicated, never
//! written back) and run the same commands in log order, each with the
//! context it had in the log, each committing its own writes to its own
//! copy. The report counts how the candidate fared — succeeded, failed,
//! trapped — and where its output differs from the active version's, with
//! the first few differences. It passes when the candidate never traps and
//! never fails a command the active version ran successfully; with
//! `identical`, also only when every output is the same.
//!
//! Runs on the node asked, off the apply path (a blocking task); every node
//! keeps the commands it applied (see [`crate::replica::trail`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::NodeInner;
use super::auth::Principal;
use super::service::ServiceError;
use crate::artifacts::Loaded;
use crate::replica::auth::Access;
use crate::runtime::{CommandError, Outcome, Plugin};

/// The most commands one replay may ask for.
pub const MAX_REPLAY: usize = crate::replica::trail::COMMANDS_KEEP;
/// Differences listed in a report.
const DIFFERENCES_SHOWN: usize = 5;
/// Payload and output bytes shown per difference.
const SHOWN_BYTES: usize = 200;

/// What to replay.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "version": "2.0.0", "commands": 1000, "identical": false }))]
pub struct ReplayRequest {
    /// The candidate version (installed, not necessarily active).
    pub version: String,
    /// How many of the last applied commands to run (at most
    /// [`MAX_REPLAY`]).
    #[serde(default = "default_commands")]
    pub commands: usize,
    /// Pass only when every output is identical to the active version's.
    #[serde(default)]
    pub identical: bool,
}

fn default_commands() -> usize {
    1000
}

/// How a candidate fared.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "plugin": "counter", "active": "1", "candidate": "2", "requested": 1000, "replayed": 812,
    "ok": 810, "failed": 2, "trapped": 0, "regressions": 0, "different": 1,
    "fuel_active": 3382000, "fuel_candidate": 3190500,
    "differences": [{
        "index": 41007, "command": "increment", "payload": "{\"by\":2}",
        "active": { "ok": "{\"value\":3}" }, "candidate": { "ok": "{\"value\":3,\"by\":2}" }
    }],
    "passed": true
}))]
pub struct ReplayReport {
    /// The plugin.
    pub plugin: String,
    /// The active version it was compared with.
    pub active: String,
    /// The candidate.
    pub candidate: String,
    /// Commands asked for.
    pub requested: usize,
    /// Commands run (fewer when this node keeps fewer).
    pub replayed: usize,
    /// The candidate succeeded.
    pub ok: usize,
    /// The candidate refused or failed (invalid input, rejected, internal).
    pub failed: usize,
    /// The candidate trapped (a trap, out of fuel, out of memory, stack
    /// overflow).
    pub trapped: usize,
    /// Ran successfully on the active version, not on the candidate.
    pub regressions: usize,
    /// Output (or error) not the same as the active version's.
    pub different: usize,
    /// Fuel the active version used over the replay.
    pub fuel_active: u64,
    /// Fuel the candidate used.
    pub fuel_candidate: u64,
    /// The first differences: index, command, payload, both results.
    #[schema(value_type = Vec<Object>)]
    pub differences: Vec<Value>,
    /// No trap, no regression (and, when asked, no difference).
    pub passed: bool,
}

impl ReplayReport {
    /// One line for an error message.
    pub fn summary(&self) -> String {
        format!(
            "replay of {} {} over {} commands: {} ok, {} failed, {} trapped, {} regressions, {} different",
            self.plugin,
            self.candidate,
            self.replayed,
            self.ok,
            self.failed,
            self.trapped,
            self.regressions,
            self.different
        )
    }
}

fn trapped(error: &CommandError) -> bool {
    matches!(
        error,
        CommandError::Trap { .. }
            | CommandError::OutOfFuel { .. }
            | CommandError::OutOfMemory { .. }
            | CommandError::StackOverflow
    )
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN_BYTES)]).into_owned()
}

fn result_json(result: &Result<Vec<u8>, CommandError>) -> Value {
    match result {
        Ok(out) => json!({ "ok": shown(out) }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

impl NodeInner {
    /// Replay `request.commands` recent commands of `name` on
    /// `request.version` (`POST /v1/plugins/{name}/replay`).
    pub async fn replay(
        &self,
        who: &Principal,
        name: &str,
        request: &ReplayRequest,
    ) -> Result<ReplayReport, ServiceError> {
        who.require(Access::Admin)?;
        if request.commands == 0 || request.commands > MAX_REPLAY {
            return Err(ServiceError::bad_request(format!("commands must be 1 to {MAX_REPLAY}")));
        }
        // The recent commands and versions as of now, not as of where this
        // node's apply has got to: a version installed a moment ago, through
        // another node, is known, and no recent command is left out.
        self.read_barrier().await?;
        let found = self.with_replica(|r| {
            let active = r.registry().get(name).and_then(|p| p.active.clone());
            let record = r.version(name, &request.version).cloned();
            (active, record, r.query_view(name), r.recent_commands(name, request.commands))
        });
        let Some((active, record, view, commands)) = found else {
            return Err(ServiceError::new(500, "internal", "state unavailable"));
        };
        let Some(record) = record else {
            return Err(ServiceError::new(
                404,
                "unknown_version",
                format!("plugin `{name}` has no version `{}`; upload it first", request.version),
            ));
        };
        let (Some(active), Some((current, namespace, devices))) = (active, view) else {
            return Err(ServiceError::new(
                409,
                "nothing_to_compare",
                format!("plugin `{name}` has no active command handler to compare with"),
            ));
        };
        let artifacts = self.artifacts.clone();
        let mut report = ReplayReport {
            plugin: name.to_owned(),
            active,
            candidate: request.version.clone(),
            requested: request.commands,
            ..ReplayReport::default()
        };
        let identical = request.identical;
        tokio::task::spawn_blocking(move || {
            let candidate: Arc<Plugin> = match artifacts.load_any(&record.sha256, record.limits) {
                Ok(Loaded::Handler(p)) => p,
                Ok(Loaded::Driver) => {
                    return Err(ServiceError::bad_request("that version is a device driver, not a command handler"));
                }
                Err(e) => return Err(ServiceError::new(500, "internal", format!("loading the candidate: {e}"))),
            };
            let (mut old_state, mut new_state) = (namespace.clone(), namespace);
            for recorded in &commands {
                let run = |plugin: &Plugin, state: &crate::state::Namespace| -> Outcome {
                    plugin.handle(
                        &recorded.ctx,
                        &recorded.command,
                        &recorded.payload,
                        Box::new(state.clone()),
                        devices.clone(),
                    )
                };
                let old = run(&current, &old_state);
                let new = run(&candidate, &new_state);
                for outcome in [&old, &new] {
                    if let Err(CommandError::Host { reason }) = &outcome.result {
                        return Err(ServiceError::new(503, "unavailable", format!("replay interrupted: {reason}")));
                    }
                }
                old_state.apply(&old.writes);
                new_state.apply(&new.writes);
                report.replayed += 1;
                report.fuel_active += old.fuel_used;
                report.fuel_candidate += new.fuel_used;
                match &new.result {
                    Ok(_) => report.ok += 1,
                    Err(e) if trapped(e) => report.trapped += 1,
                    Err(_) => report.failed += 1,
                }
                if old.result.is_ok() && new.result.is_err() {
                    report.regressions += 1;
                }
                if old.result != new.result {
                    report.different += 1;
                    if report.differences.len() < DIFFERENCES_SHOWN {
                        report.differences.push(json!({
                            "index": recorded.ctx.index,
                            "command": recorded.command,
                            "payload": shown(&recorded.payload),
                            "active": result_json(&old.result),
                            "candidate": result_json(&new.result),
                        }));
                    }
                }
            }
            report.passed = report.trapped == 0 && report.regressions == 0 && (!identical || report.different == 0);
            Ok(report)
        })
        .await
        .map_err(|e| ServiceError::new(500, "internal", format!("replay task failed: {e}")))?
    }
}
