//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text
//! format (`prometheus-client`).
//!
//! Counters and histograms are recorded where things happen (the HTTP and
//! NATS intake, the log store, the batcher, apply, snapshots, plugin loads,
//! device drivers) into one process-wide set: a node is one process. Gauges
//! of state (Raft positions, plugins, bus, divergence) are read from the
//! node when a scrape asks. Nothing here feeds back into apply: metrics are
//! observations only, so determinism is untouched.

use std::sync::LazyLock;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::runtime::CommandError;

/// One HTTP route (its pattern, not the path), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route's pattern, e.g. `/v1/commands/{plugin}/{command}`.
    pub route: String,
    /// GET, POST, ...
    pub method: String,
    /// The response status.
    pub status: u16,
}

/// A NATS subject family (`cmd`, `dev`) and the answer's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NatsLabels {
    /// `cmd` for `synod.cmd.>`, `dev` for `synod.dev.>`.
    pub family: String,
    /// The `Synod-Status` answered.
    pub status: u16,
}

/// A plugin and one of its commands.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The plugin's name.
    pub plugin: String,
    /// The command.
    pub command: String,
}

/// A plugin, a command and whether it succeeded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The plugin's name.
    pub plugin: String,
    /// The command.
    pub command: String,
    /// `ok` or `error`.
    pub result: String,
}

/// A plugin and the kind of error a command of it ended with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The plugin's name.
    pub plugin: String,
    /// `out_of_fuel`, `out_of_memory`, `stack_overflow`, `trap`, ...
    pub kind: String,
}

/// A plugin name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin's name.
    pub plugin: String,
}

/// A plugin and its active version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActiveLabels {
    /// The plugin's name.
    pub plugin: String,
    /// The version label that is live.
    pub version: String,
}

/// Where a plugin load found its compiled code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    /// `memory` (already loaded), `disk` (the compile cache) or `compiled`.
    pub source: String,
}

/// The bus connection's state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BusLabels {
    /// `connected`, `connecting`, `disconnected` or `disabled` (no NATS
    /// configured).
    pub state: String,
}

/// A device driver call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverLabels {
    /// `poll`, `actuate` or `report`.
    pub op: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 100 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

fn fuel() -> Histogram {
    // 1,000 to about 4 billion units.
    Histogram::new(exponential_buckets(1_000.0, 4.0, 12))
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP request latency by route, method and status.
    pub http_seconds: Histograms<HttpLabels>,
    /// Requests refused before routing for want of a valid token.
    pub http_unauthenticated: Counter,
    /// NATS requests by subject family and status.
    pub nats_requests: Family<NatsLabels, Counter>,
    /// NATS request latency by subject family and status.
    pub nats_seconds: Histograms<NatsLabels>,
    /// Raft term.
    pub raft_term: Gauge,
    /// The leader's id (0: none known).
    pub raft_leader: Gauge,
    /// 1 on the leader.
    pub raft_is_leader: Gauge,
    /// The commit index this node knows of.
    pub raft_commit_index: Gauge,
    /// The last entry applied here.
    pub raft_applied_index: Gauge,
    /// The last entry in this node's log.
    pub raft_last_log_index: Gauge,
    /// Entries in the log (after the last purge).
    pub raft_log_entries: Gauge,
    /// The last snapshot's index.
    pub raft_snapshot_index: Gauge,
    /// Keys in the plugins' state.
    pub state_keys: Gauge,
    /// Key and value bytes in the plugins' state.
    pub state_bytes: Gauge,
    /// This node's `limits.state_quota_bytes` (0: off).
    pub state_quota_bytes: Gauge,
    /// Changes in the state since the last snapshot this node finished.
    pub state_unsnapshotted_changes: Gauge,
    /// The most of them before the leader holds writes (0: no limit).
    pub state_unsnapshotted_max: Gauge,
    /// Time the leader held a client command for snapshots to catch up.
    pub write_hold_seconds: Histogram,
    /// Writing a batch of entries to the log, including its fsync.
    pub log_append_seconds: Histogram,
    /// The fsync alone.
    pub log_fsync_seconds: Histogram,
    /// Requests per proposal (one log entry).
    pub proposal_batch: Histogram,
    /// Snapshots built.
    pub snapshots: Counter,
    /// Size of the last snapshot built or installed.
    pub snapshot_bytes: Gauge,
    /// Time to build a snapshot (capture, serialise, write, fsync).
    pub snapshot_seconds: Histogram,
    /// Commands applied, by plugin, command and result.
    pub commands: Family<ResultLabels, Counter>,
    /// Fuel per command.
    pub command_fuel: Histograms<CommandLabels>,
    /// Time to apply one command (instantiate, run, apply its writes).
    pub command_seconds: Histograms<PluginLabels>,
    /// Commands that ended in an error, by kind (traps among them).
    pub command_errors: Family<ErrorLabels, Counter>,
    /// Retries answered from the request-id table.
    pub dedup_hits: Counter,
    /// Time to instantiate a plugin for one call.
    pub instantiate_seconds: Histogram,
    /// Versions stored per plugin.
    pub plugin_versions: Family<PluginLabels, Gauge>,
    /// 1 for each plugin's active version.
    pub plugin_active: Family<ActiveLabels, Gauge>,
    /// Plugin loads by where the compiled code came from.
    pub plugin_loads: Family<LoadLabels, Counter>,
    /// 1 while connected to NATS.
    pub bus_connected: Gauge,
    /// 1 for the bus's state, 0 for the others.
    pub bus_state: Family<BusLabels, Gauge>,
    /// Committed commands whose events are not yet in the stream.
    pub events_outbox: Gauge,
    /// Events published to JetStream by this node.
    pub events_published: Counter,
    /// Events JetStream acknowledged as duplicates (published again after
    /// a retry or a leader change; its `Nats-Msg-Id` dropped them).
    pub events_duplicate: Counter,
    /// 1 while this node's digest disagrees with another's.
    pub divergence: Gauge,
    /// Devices whose driver runs on this node.
    pub devices_owned: Gauge,
    /// Driver call latency.
    pub driver_seconds: Histograms<DriverLabels>,
    /// Driver calls that failed.
    pub driver_errors: Family<DriverLabels, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("synod");
        let m = Metrics {
            registry: Registry::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency),
            http_unauthenticated: Counter::default(),
            nats_requests: Family::default(),
            nats_seconds: Family::new_with_constructor(latency),
            raft_term: Gauge::default(),
            raft_leader: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_commit_index: Gauge::default(),
            state_keys: Gauge::default(),
            state_bytes: Gauge::default(),
            state_quota_bytes: Gauge::default(),
            state_unsnapshotted_changes: Gauge::default(),
            state_unsnapshotted_max: Gauge::default(),
            write_hold_seconds: latency(),
            raft_applied_index: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_log_entries: Gauge::default(),
            raft_snapshot_index: Gauge::default(),
            log_append_seconds: latency(),
            log_fsync_seconds: latency(),
            proposal_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            snapshots: Counter::default(),
            snapshot_bytes: Gauge::default(),
            snapshot_seconds: latency(),
            commands: Family::default(),
            command_fuel: Family::new_with_constructor(fuel),
            command_seconds: Family::new_with_constructor(latency),
            command_errors: Family::default(),
            dedup_hits: Counter::default(),
            instantiate_seconds: latency(),
            plugin_versions: Family::default(),
            plugin_active: Family::default(),
            plugin_loads: Family::default(),
            bus_connected: Gauge::default(),
            bus_state: Family::default(),
            events_outbox: Gauge::default(),
            events_published: Counter::default(),
            events_duplicate: Counter::default(),
            divergence: Gauge::default(),
            devices_owned: Gauge::default(),
            driver_seconds: Family::new_with_constructor(latency),
            driver_errors: Family::default(),
        };
        let s = Unit::Seconds;
        r.register("http_requests", "HTTP requests by route, method and status", m.http_requests.clone());
        r.register_with_unit("http_request", "HTTP request latency", s.clone(), m.http_seconds.clone());
        r.register(
            "http_unauthenticated",
            "Requests refused for want of a valid token",
            m.http_unauthenticated.clone(),
        );
        r.register("nats_requests", "NATS requests by subject family and status", m.nats_requests.clone());
        r.register_with_unit("nats_request", "NATS request latency", s.clone(), m.nats_seconds.clone());
        r.register("raft_term", "Raft term", m.raft_term.clone());
        r.register("raft_leader", "The leader's node id (0: none known)", m.raft_leader.clone());
        r.register("raft_is_leader", "1 on the leader", m.raft_is_leader.clone());
        r.register("raft_commit_index", "Commit index as this node knows it", m.raft_commit_index.clone());
        r.register("state_keys", "Keys in the plugins' state", m.state_keys.clone());
        r.register_with_unit("state", "Key and value bytes in the plugins' state", Unit::Bytes, m.state_bytes.clone());
        r.register_with_unit(
            "state_quota",
            "limits.state_quota_bytes: past it commands are refused (0: off)",
            Unit::Bytes,
            m.state_quota_bytes.clone(),
        );
        r.register(
            "state_unsnapshotted_changes",
            "Changes in the state since the last snapshot this node finished",
            m.state_unsnapshotted_changes.clone(),
        );
        r.register(
            "state_unsnapshotted_max",
            "Changes since the last snapshot past which the leader holds writes (0: no limit)",
            m.state_unsnapshotted_max.clone(),
        );
        r.register_with_unit(
            "write_hold",
            "Time the leader held a client command for snapshots to catch up",
            s.clone(),
            m.write_hold_seconds.clone(),
        );
        r.register("raft_applied_index", "Last log index applied here", m.raft_applied_index.clone());
        r.register("raft_last_log_index", "Last log index in this node's log", m.raft_last_log_index.clone());
        r.register("raft_log_entries", "Entries in the log after the last purge", m.raft_log_entries.clone());
        r.register("raft_snapshot_index", "Index of the last snapshot", m.raft_snapshot_index.clone());
        r.register_with_unit(
            "log_append",
            "Log append of one batch, fsync included",
            s.clone(),
            m.log_append_seconds.clone(),
        );
        r.register_with_unit("log_fsync", "Log fsync", s.clone(), m.log_fsync_seconds.clone());
        r.register("proposal_batch_requests", "Requests per log entry proposed", m.proposal_batch.clone());
        r.register("snapshots", "Snapshots built", m.snapshots.clone());
        r.register_with_unit("snapshot", "Size of the last snapshot", Unit::Bytes, m.snapshot_bytes.clone());
        r.register_with_unit("snapshot_build", "Snapshot build time", s.clone(), m.snapshot_seconds.clone());
        r.register("commands", "Commands applied by plugin, command and result", m.commands.clone());
        r.register("command_fuel", "Fuel used per command", m.command_fuel.clone());
        r.register_with_unit("command_apply", "Time to apply one command", s.clone(), m.command_seconds.clone());
        r.register(
            "command_errors",
            "Commands ended in an error, by kind (traps among them)",
            m.command_errors.clone(),
        );
        r.register("dedup_hits", "Retries answered from the request-id table", m.dedup_hits.clone());
        r.register_with_unit(
            "plugin_instantiate",
            "Plugin instantiation per call",
            s.clone(),
            m.instantiate_seconds.clone(),
        );
        r.register("plugin_versions", "Versions stored per plugin", m.plugin_versions.clone());
        r.register("plugin_active", "1 for each plugin's active version", m.plugin_active.clone());
        r.register("plugin_loads", "Plugin loads by where the compiled code came from", m.plugin_loads.clone());
        r.register("bus_connected", "1 while connected to NATS", m.bus_connected.clone());
        r.register("bus_state", "1 for the NATS connection's state, 0 for the others", m.bus_state.clone());
        r.register(
            "events_outbox_commands",
            "Committed commands whose events are not yet published",
            m.events_outbox.clone(),
        );
        r.register("events_published", "Events this node published to JetStream", m.events_published.clone());
        r.register(
            "events_duplicate",
            "Events JetStream dropped as duplicates of ones it already held (by Nats-Msg-Id)",
            m.events_duplicate.clone(),
        );
        r.register("divergence", "1 while this node's digest disagrees with another node's", m.divergence.clone());
        r.register("devices_owned", "Devices whose driver runs on this node", m.devices_owned.clone());
        r.register_with_unit("driver_call", "Device driver call latency", s, m.driver_seconds.clone());
        r.register("driver_errors", "Device driver calls that failed", m.driver_errors.clone());
        Metrics { registry: r, ..m }
    }

    /// The exposition: every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count one applied command and its effects.
    pub fn command(
        &self,
        plugin: &str,
        command: &str,
        result: &Result<Vec<u8>, CommandError>,
        fuel: u64,
        took: Duration,
    ) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.commands
            .get_or_create(&ResultLabels { plugin: plugin.into(), command: command.into(), result: outcome.into() })
            .inc();
        self.command_fuel
            .get_or_create(&CommandLabels { plugin: plugin.into(), command: command.into() })
            .observe(fuel as f64);
        self.command_seconds.get_or_create(&PluginLabels { plugin: plugin.into() }).observe(took.as_secs_f64());
        if let Err(e) = result {
            self.command_errors.get_or_create(&ErrorLabels { plugin: plugin.into(), kind: error_kind(e).into() }).inc();
        }
    }
}

/// A short name for an error's kind, for a label.
pub fn error_kind(e: &CommandError) -> &'static str {
    match e {
        CommandError::UnknownPlugin { .. } => "unknown_plugin",
        CommandError::Lifecycle { .. } => "lifecycle",
        CommandError::UnknownCommand { .. } => "unknown_command",
        CommandError::UnknownQuery { .. } => "unknown_query",
        CommandError::InvalidInput { .. } => "invalid_input",
        CommandError::Rejected { .. } => "rejected",
        CommandError::Internal { .. } => "internal",
        CommandError::OutOfFuel { .. } => "out_of_fuel",
        CommandError::OutOfMemory { .. } => "out_of_memory",
        CommandError::StackOverflow => "stack_overflow",
        CommandError::Trap { .. } => "trap",
        CommandError::OutputTooLarge { .. } => "output_too_large",
        CommandError::RequestIdReused { .. } => "request_id_reused",
        CommandError::Host { .. } => "host",
        CommandError::NotFound { .. } => "not_found",
        CommandError::Conflict { .. } => "conflict",
        CommandError::Fenced { .. } => "fenced",
    }
}

/// A raft log sync, an applied batch of entries or a stall of the async
/// worker this long or longer is logged as a warning: writes waited for it.
pub const SLOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Warn whenever this thread's async runtime gets to a timer [`SLOW`] or
/// more late: something blocked its worker, and every request on it
/// waited. Runs until the runtime stops.
pub async fn watch_worker() {
    const TICK: std::time::Duration = std::time::Duration::from_millis(50);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(TICK).await;
        let now = tokio::time::Instant::now();
        let late = now.duration_since(last).saturating_sub(TICK);
        if late >= SLOW {
            tracing::warn!(ms = late.as_millis() as u64, "the async worker was blocked");
        }
        last = now;
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Set a gauge from an unsigned value (saturating).
pub fn set(gauge: &Gauge<i64, AtomicI64>, value: u64) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family is in the exposition under the name the README lists,
    /// with its type, even before anything was recorded.
    #[test]
    fn every_documented_family_is_exported() {
        // Families appear once they hold a series: give each one.
        let m = get();
        m.command("p", "c", &Err(CommandError::StackOverflow), 1, Duration::ZERO);
        let route = HttpLabels { route: "/r".into(), method: "GET".into(), status: 200 };
        m.http_seconds.get_or_create(&route).observe(0.0);
        m.http_requests.get_or_create(&route).inc();
        let family = NatsLabels { family: "cmd".into(), status: 200 };
        m.nats_requests.get_or_create(&family).inc();
        m.nats_seconds.get_or_create(&family).observe(0.0);
        m.bus_state.get_or_create(&BusLabels { state: "disabled".into() }).set(1);
        m.plugin_versions.get_or_create(&PluginLabels { plugin: "p".into() }).set(1);
        m.plugin_active.get_or_create(&ActiveLabels { plugin: "p".into(), version: "1".into() }).set(1);
        m.plugin_loads.get_or_create(&LoadLabels { source: "disk".into() }).inc();
        m.driver_seconds.get_or_create(&DriverLabels { op: "poll".into() }).observe(0.0);
        m.driver_errors.get_or_create(&DriverLabels { op: "poll".into() }).inc();
        let text = m.encode();
        let readme = include_str!("../../README.md");
        let types: Vec<(&str, &str)> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
        assert!(types.len() >= 30, "{text}");
        let missing: Vec<String> = types
            .iter()
            .map(|(name, kind)| {
                let shown = if *kind == "counter" { format!("{name}_total") } else { (*name).to_owned() };
                format!("| `{shown}` | {kind} |")
            })
            .filter(|row| !readme.contains(row.as_str()))
            .collect();
        assert!(missing.is_empty(), "README's Monitoring table lacks rows:\n{}", missing.join("\n"));
    }
}
