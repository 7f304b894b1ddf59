//! What a node remembers of recently applied operations besides the state:
//! a summary of each one's effects (for divergence bisection) and the
//! recent commands of each plugin (for the replay gate).
//!
//! Not replicated and not in snapshots: each node records what it applies
//! itself, from the moment it starts or installs a snapshot. Bounded in
//! count and bytes, oldest first out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::runtime::Context;
use crate::state::{Digest, Effects};

/// How many operations' effect summaries a node keeps.
pub const EFFECTS_KEEP: usize = 20_000;
/// How many recent commands a node keeps per plugin for replays.
pub const COMMANDS_KEEP: usize = 10_000;
/// How many payload bytes of recent commands a node keeps per plugin.
pub const COMMAND_BYTES_KEEP: usize = 16 << 20;
/// Writes and events listed one by one in a summary; past this, only
/// counted (the digest covers them all).
const LISTED: usize = 16;

/// Log lines kept per plugin (what `synod logs` shows).
pub const LOG_LINES_KEEP: usize = 2_000;
/// Output bytes kept in a summary.
const OUTPUT_KEPT: usize = 256;

/// One write of an operation: its key and a hash of the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSummary {
    /// The key.
    pub key: String,
    /// BLAKE3 of the value; `None` for a delete.
    pub value_blake3: Option<[u8; 32]>,
    /// Length of the value.
    pub value_bytes: u64,
}

/// What one applied operation did on this node: enough to see why two
/// nodes' digests parted at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectSummary {
    /// The operation index.
    pub index: u64,
    /// The plugin (or the system family: `device`, `audit`, a lifecycle
    /// change's plugin name).
    pub plugin: String,
    /// The command (`install`/`activate`/`remove` and the like for
    /// lifecycle operations).
    pub command: String,
    /// Who sent it.
    pub caller: String,
    /// The leader's timestamp.
    pub timestamp_ms: u64,
    /// BLAKE3 of the payload.
    pub payload_blake3: [u8; 32],
    /// Length of the payload.
    pub payload_bytes: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// The output (first bytes, lossy UTF-8) or the error.
    pub output: String,
    /// BLAKE3 of the whole output or error.
    pub output_blake3: [u8; 32],
    /// Fuel used.
    pub fuel: u64,
    /// The first writes.
    pub writes: Vec<WriteSummary>,
    /// How many writes in all.
    pub writes_total: u64,
    /// The first events' topics.
    pub events: Vec<String>,
    /// How many events in all.
    pub events_total: u64,
    /// The digest right after it.
    pub digest: [u8; 32],
}

impl EffectSummary {
    /// Summarise `effects` of an operation.
    pub fn new(ctx: Context, plugin: &str, command: &str, payload: &[u8], effects: &Effects, digest: Digest) -> Self {
        let (ok, output): (bool, &[u8]) = match &effects.result {
            Ok(out) => (true, out),
            Err(e) => (false, e.as_bytes()),
        };
        let kept = &output[..output.len().min(OUTPUT_KEPT)];
        EffectSummary {
            index: ctx.index,
            plugin: plugin.to_owned(),
            command: command.to_owned(),
            caller: ctx.caller,
            timestamp_ms: ctx.timestamp_ms,
            payload_blake3: *blake3::hash(payload).as_bytes(),
            payload_bytes: payload.len() as u64,
            ok,
            output: String::from_utf8_lossy(kept).into_owned(),
            output_blake3: *blake3::hash(output).as_bytes(),
            fuel: effects.fuel_used,
            writes: effects
                .writes
                .iter()
                .take(LISTED)
                .map(|(key, value)| WriteSummary {
                    key: key.to_owned(),
                    value_blake3: value.map(|v| *blake3::hash(v).as_bytes()),
                    value_bytes: value.map_or(0, |v| v.len() as u64),
                })
                .collect(),
            writes_total: effects.writes.len() as u64,
            events: effects.events.iter().take(LISTED).map(|e| e.topic.clone()).collect(),
            events_total: effects.events.len() as u64,
            digest: digest.0,
        }
    }

    /// As JSON for operators, hashes in hex.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "index": self.index,
            "plugin": self.plugin,
            "command": self.command,
            "caller": self.caller,
            "timestamp_ms": self.timestamp_ms,
            "payload_blake3": hex::encode(self.payload_blake3),
            "payload_bytes": self.payload_bytes,
            "ok": self.ok,
            "output": self.output,
            "output_blake3": hex::encode(self.output_blake3),
            "fuel": self.fuel,
            "writes": self.writes.iter().map(|w| serde_json::json!({
                "key": w.key,
                "value_blake3": w.value_blake3.map(hex::encode),
                "value_bytes": w.value_bytes,
            })).collect::<Vec<_>>(),
            "writes_total": self.writes_total,
            "events": self.events,
            "events_total": self.events_total,
            "digest": hex::encode(self.digest),
        })
    }
}

/// A command as it was applied, to run again in a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCommand {
    /// Its context (index, term, timestamp, caller).
    pub ctx: Context,
    /// The command name.
    pub command: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The recent operations of one node.
#[derive(Default)]
pub struct Trail {
    /// Effect summaries by operation index, oldest first.
    effects: VecDeque<EffectSummary>,
    /// Recent commands per plugin, oldest first, and their payload bytes.
    commands: BTreeMap<String, (VecDeque<Arc<RecordedCommand>>, usize)>,
    /// Recent log lines per plugin, oldest first.
    logs: BTreeMap<String, VecDeque<PluginLogLine>>,
}

/// A line a plugin logged while one of its commands was applied here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({ "index": 42001, "at_ms": 1795700000000_u64, "command": "cas", "level": "info", "message": "cas on a not swapped" }))]
pub struct PluginLogLine {
    /// The operation index.
    pub index: u64,
    /// The operation's timestamp (ms).
    pub at_ms: u64,
    /// The command.
    pub command: String,
    /// `trace` … `error`.
    pub level: &'static str,
    /// The text.
    pub message: String,
}

impl Trail {
    /// Remember an operation's effects.
    pub fn effect(&mut self, summary: EffectSummary) {
        if self.effects.len() == EFFECTS_KEEP {
            self.effects.pop_front();
        }
        self.effects.push_back(summary);
    }

    /// The effects of operation `index`, if still kept: one, or two for a
    /// device report that ran its controller.
    pub fn effects_at(&self, index: u64) -> Vec<EffectSummary> {
        let start = self.effects.partition_point(|e| e.index < index);
        self.effects.range(start..).take_while(|e| e.index == index).cloned().collect()
    }

    /// Up to `limit` operations after index `after`, oldest first; with
    /// `after = None`, the newest `limit`. Also the oldest index still kept,
    /// so a reader can tell it fell behind.
    pub fn effects_after(&self, after: Option<u64>, limit: usize) -> (Vec<EffectSummary>, Option<u64>) {
        let start = match after {
            Some(after) => self.effects.partition_point(|e| e.index <= after),
            None => self.effects.len().saturating_sub(limit),
        };
        let ops = self.effects.range(start..).take(limit).cloned().collect();
        (ops, self.effects.front().map(|e| e.index))
    }

    /// Remember a command `plugin` applied.
    pub fn command(&mut self, plugin: &str, recorded: RecordedCommand) {
        let (queue, bytes) = self.commands.entry(plugin.to_owned()).or_default();
        *bytes += recorded.payload.len();
        queue.push_back(Arc::new(recorded));
        while queue.len() > COMMANDS_KEEP || (*bytes > COMMAND_BYTES_KEEP && queue.len() > 1) {
            if let Some(old) = queue.pop_front() {
                *bytes -= old.payload.len();
            }
        }
    }

    /// The last `n` commands `plugin` applied (fewer if fewer are kept),
    /// oldest first.
    pub fn recent_commands(&self, plugin: &str, n: usize) -> Vec<Arc<RecordedCommand>> {
        let Some((queue, _)) = self.commands.get(plugin) else { return Vec::new() };
        queue.iter().skip(queue.len().saturating_sub(n)).cloned().collect()
    }

    /// Forget `plugin`'s commands (it was removed); its log lines stay.
    pub fn forget(&mut self, plugin: &str) {
        self.commands.remove(plugin);
    }

    /// Remember what `plugin` logged for one command.
    pub fn log(&mut self, plugin: &str, ctx: &Context, command: &str, lines: &[crate::runtime::LogLine], dropped: u64) {
        if lines.is_empty() && dropped == 0 {
            return;
        }
        let kept = self.logs.entry(plugin.to_owned()).or_default();
        let line = |level: &'static str, message: String| PluginLogLine {
            index: ctx.index,
            at_ms: ctx.timestamp_ms,
            command: command.to_owned(),
            level,
            message,
        };
        kept.extend(lines.iter().map(|l| line(l.level, l.message.clone())));
        if dropped > 0 {
            kept.push_back(line("warn", format!("({dropped} more lines past the plugin's limit were dropped)")));
        }
        while kept.len() > LOG_LINES_KEEP {
            kept.pop_front();
        }
    }

    /// Up to `limit` of `plugin`'s latest log lines from operations after
    /// `after`, oldest first.
    pub fn logs(&self, plugin: &str, after: u64, limit: usize) -> Vec<PluginLogLine> {
        let Some(kept) = self.logs.get(plugin) else { return Vec::new() };
        let start = kept.partition_point(|l| l.index <= after);
        let skip = (kept.len() - start).saturating_sub(limit);
        kept.range(start + skip..).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WriteSet;

    fn ctx(index: u64) -> Context {
        Context { index, term: 1, timestamp_ms: 5, caller: "c".into() }
    }

    #[test]
    fn effects_are_found_by_index_and_bounded() {
        let mut trail = Trail::default();
        let mut writes = WriteSet::default();
        writes.set("k".into(), b"v".to_vec());
        let effects = Effects { result: Ok(b"out".to_vec()), writes, events: Vec::new(), fuel_used: 7 };
        for i in 1..=(EFFECTS_KEEP as u64 + 10) {
            trail.effect(EffectSummary::new(ctx(i * 3), "p", "c", b"x", &effects, Digest::ZERO));
        }
        assert!(trail.effects_at(3).is_empty(), "the oldest are gone");
        let kept = trail.effects_at(3 * (EFFECTS_KEEP as u64 + 10));
        assert_eq!((kept[0].fuel, kept[0].writes_total, kept[0].writes[0].key.as_str()), (7, 1, "k"));
        assert!(trail.effects_at(4).is_empty());
    }

    /// The live tail: the newest few first, then everything after a
    /// point in order, and where the kept history now starts.
    #[test]
    fn effects_after_tails_in_order() {
        let mut trail = Trail::default();
        let effects = Effects { result: Ok(Vec::new()), writes: WriteSet::default(), events: Vec::new(), fuel_used: 0 };
        for i in 1..=10 {
            trail.effect(EffectSummary::new(ctx(i * 1000), "p", "c", b"", &effects, Digest::ZERO));
        }
        let index = |ops: &[EffectSummary]| ops.iter().map(|e| e.index / 1000).collect::<Vec<_>>();
        let (newest, oldest) = trail.effects_after(None, 3);
        assert_eq!((index(&newest), oldest), (vec![8, 9, 10], Some(1000)));
        assert_eq!(index(&trail.effects_after(Some(4000), 3).0), vec![5, 6, 7]);
        assert_eq!(index(&trail.effects_after(Some(4500), 100).0), vec![5, 6, 7, 8, 9, 10]);
        assert!(trail.effects_after(Some(10_000), 5).0.is_empty());
    }

    #[test]
    fn recent_commands_are_bounded_by_count_and_bytes() {
        let mut trail = Trail::default();
        for i in 0..(COMMANDS_KEEP as u64 + 5) {
            let recorded = RecordedCommand { ctx: ctx(i), command: "c".into(), payload: vec![0; 10] };
            trail.command("p", recorded);
        }
        let recent = trail.recent_commands("p", usize::MAX);
        assert_eq!(recent.len(), COMMANDS_KEEP);
        assert_eq!(recent.last().unwrap().ctx.index, COMMANDS_KEEP as u64 + 4);
        assert_eq!(trail.recent_commands("p", 3).len(), 3);
        let big = RecordedCommand { ctx: ctx(1), command: "c".into(), payload: vec![0; COMMAND_BYTES_KEEP] };
        trail.command("q", big.clone());
        trail.command("q", big);
        assert_eq!(trail.recent_commands("q", 10).len(), 1, "the byte bound drops the oldest");
        trail.forget("p");
        assert!(trail.recent_commands("p", 10).is_empty());
    }
}
