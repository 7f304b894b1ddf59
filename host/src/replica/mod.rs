//! Replica stage: the replicated state as one unit, and its only writer.
//!
//! In: committed log entries in order — batches of commands, plugin
//! lifecycle changes (install, activate, remove), event-stream marks and
//! membership changes — each applied whole by [`Replica::apply_entry`]. Out:
//! each entry's [`Response`] for the caller, and the state after it: plugin
//! namespaces, the plugin registry, the running [`Digest`], the request-id
//! table, the event outbox, the last applied log id and the membership —
//! identical on every node that applied the same entries.
//!
//! Everything a snapshot must carry lives in this one struct and changes
//! only through [`Replica::apply_entry`], so whoever holds the lock around
//! it sees the state between two entries, never inside one: a snapshot
//! captured under that lock is the state *at* its log id (see
//! [`Replica::capture`]).
//!
//! A failed command is still applied: its error is the deterministic result,
//! its writes are dropped, and the digest records it. So is a failed plugin
//! install or activation: every node running one engine fails to load the
//! same component the same way, so the failure is a lifecycle result in the
//! log, never a reason to stop. Only a local fault ([`ApplyError::Host`]: a
//! disk error, missing plugin bytes) stops the entry from being applied.

pub mod auth;
pub mod dedup;
pub mod devices;
pub mod trail;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use openraft::{EntryPayload, LogId, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::artifacts::{ArtifactError, Loaded};
use crate::consensus::types::{ClusterSettings, NodeId, NodeInfo, OPS_PER_ENTRY, Op, Request, Response, TypeConfig};
use crate::runtime::{CommandError, Context, LoadError, Outcome, Plugin, PluginLimits};
use crate::state::{Digest, Effects, Event, KvState, WriteSet};
pub use dedup::Remembered;
use dedup::{Dedup, Lookup};

/// Events kept for publishing while the bus is away; past this the oldest
/// are dropped (and counted) rather than growing without bound.
pub const OUTBOX_LIMIT: usize = 1_000_000;

/// Events of one applied operation, waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// In emission order, each with its subject family: the plugin that
    /// emitted it, or `device` for shadow changes
    /// (`synod.evt.<family>.<topic>`).
    pub events: Vec<(String, Event)>,
}

/// Subject family of device shadow events; no plugin may take the name.
pub const DEVICE_FAMILY: &str = "device";

/// A local fault while applying: this node cannot apply the entry and must
/// not pretend it did (other nodes may have applied it fine).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Storage or resource failure on this node.
    #[error("cannot apply entry {index}: {reason}")]
    Host {
        /// The entry.
        index: u64,
        /// What failed.
        reason: String,
    },
    /// Entries must be applied in order, each once.
    #[error("entry {index} is not after the last applied entry {last_applied}")]
    OutOfOrder {
        /// The entry offered.
        index: u64,
        /// The last one applied.
        last_applied: u64,
    },
    /// A snapshot's parts do not belong together.
    #[error("snapshot is inconsistent: {0}")]
    BadSnapshot(String),
}

/// One installed version of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({ "sha256": "0aa8eae1…", "size": 88047, "limits": PluginLimits::default(), "installed_at": 4000 }))]
pub struct VersionRecord {
    /// sha256 of the component bytes, hex: where to find them.
    pub sha256: String,
    /// Component size in bytes.
    pub size: u64,
    /// Per-command limits of this version.
    pub limits: PluginLimits,
    /// Log index of the install entry.
    pub installed_at: u64,
}

/// A plugin's versions and which one runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// Installed versions by label.
    pub versions: BTreeMap<String, VersionRecord>,
    /// The version commands run on.
    pub active: Option<String>,
    /// Log index where `active` became active.
    pub activated_at: u64,
}

/// Compiles the plugin a version record names. Its bytes must already be on
/// this node (the consensus adapter fetches them from peers first).
pub trait PluginLoader {
    /// The loaded plugin. [`ArtifactError::Load`] is deterministic (the
    /// component cannot load on this engine); anything else is local.
    fn load(&self, record: &VersionRecord) -> Result<Loaded, ArtifactError>;
}

impl PluginLoader for crate::artifacts::Artifacts {
    fn load(&self, record: &VersionRecord) -> Result<Loaded, ArtifactError> {
        crate::artifacts::Artifacts::load_any(self, &record.sha256, record.limits)
    }
}

/// One plugin's namespace as plain data: (plugin, [(key, value)]).
pub type NamespaceImage = (String, Vec<(String, Vec<u8>)>);

/// The replicated state as plain data: what a snapshot carries (besides the
/// plugin bytes, which the consensus layer adds).
///
/// `K` is how the namespaces are held: plain vectors by default, or the
/// state's own trees ([`KvState`]), which encode to the same bytes — a
/// snapshot is written from the trees and read back into them without a
/// plain copy in between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image<K = Vec<NamespaceImage>> {
    /// The last log entry this state includes.
    pub log_id: Option<LogId<NodeId>>,
    /// The last membership applied.
    pub membership: StoredMembership<NodeId, NodeInfo>,
    /// Plugin namespaces: (plugin, [(key, value)]) in order.
    pub kv: K,
    /// Running digest.
    pub digest: [u8; 32],
    /// Last applied operation index.
    pub last_applied: u64,
    /// The plugin registry.
    pub registry: BTreeMap<String, PluginRecord>,
    /// Remembered request ids, oldest first.
    pub dedup: Vec<(String, Remembered)>,
    /// Unpublished events by log index.
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Events up to this index are known to be in the stream.
    pub published_upto: u64,
    /// Events dropped because the outbox was full.
    pub outbox_dropped: u64,
    /// Cluster-wide settings.
    pub settings: ClusterSettings,
    /// Device shadows and node liveness.
    pub devices: devices::DevicesImage,
    /// Tokens and the audit trail.
    pub auth: auth::AuthImage,
    /// The latest timestamp given to an operation: no later one gets an
    /// earlier time, whatever the clock of the leader that stamped it.
    pub clock_ms: u64,
}

/// The replicated state, captured at one log id in O(number of namespaces):
/// namespaces are persistent trees shared with the live state, so capturing
/// copies no keys, and the writes that follow copy only the nodes they
/// touch. [`Captured::state`] is serialised straight from the trees, off the
/// apply path.
pub struct Captured {
    image: Image<KvState>,
}

impl Captured {
    /// The last log entry the capture includes.
    pub fn log_id(&self) -> Option<LogId<NodeId>> {
        self.image.log_id
    }

    /// The plugin registry at that entry.
    pub fn registry(&self) -> &BTreeMap<String, PluginRecord> {
        &self.image.registry
    }

    /// The whole state, encodable as an [`Image`] (the same bytes).
    pub fn state(&self) -> &Image<KvState> {
        &self.image
    }

    /// The captured state, owned.
    pub fn into_state(self) -> Image<KvState> {
        self.image
    }

    /// The whole state as plain data (a copy of every key).
    pub fn image(self) -> Image {
        self.image.map_kv(|kv| kv.image())
    }
}

impl<K> Image<K> {
    /// The same image with its namespaces held another way.
    pub fn map_kv<L>(self, f: impl FnOnce(K) -> L) -> Image<L> {
        Image {
            log_id: self.log_id,
            membership: self.membership,
            kv: f(self.kv),
            digest: self.digest,
            last_applied: self.last_applied,
            registry: self.registry,
            dedup: self.dedup,
            outbox: self.outbox,
            published_upto: self.published_upto,
            outbox_dropped: self.outbox_dropped,
            settings: self.settings,
            devices: self.devices,
            auth: self.auth,
            clock_ms: self.clock_ms,
        }
    }
}

/// The replicated state of one node, and the plugins that change it.
#[derive(Default)]
pub struct Replica {
    /// The last log entry applied (of any kind).
    log_id: Option<LogId<NodeId>>,
    /// The last membership applied.
    membership: StoredMembership<NodeId, NodeInfo>,
    /// Which versions exist and which is active, per plugin name.
    registry: BTreeMap<String, PluginRecord>,
    /// Compiled active version of each plugin by name.
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// Plugin key-value data.
    kv: KvState,
    /// Running digest of every applied operation's effects.
    digest: Digest,
    /// Index of the last applied operation (0 before the first).
    last_applied: u64,
    /// Recent (index, digest) pairs, so nodes at different positions can
    /// still compare at a common index. Not replicated: rebuilt as entries
    /// are applied.
    history: VecDeque<(u64, Digest)>,
    /// Remembered request ids.
    dedup: Dedup,
    /// Unpublished events by log index.
    outbox: BTreeMap<u64, OutboxEntry>,
    /// Events up to this index are known to be in the stream.
    published_upto: u64,
    /// Events dropped because the outbox was full.
    outbox_dropped: u64,
    /// Cluster-wide settings (request-id retention), from the log.
    settings: ClusterSettings,
    /// Device shadows and node liveness.
    devices: devices::Devices,
    /// Devices changed since the adapter last took the list (not
    /// replicated: it tells owners what to look at).
    device_changes: Vec<String>,
    /// Tokens and the audit trail.
    auth: auth::Auth,
    /// Whether the token table changed since the adapter last looked (not
    /// replicated: it tells request handlers to take the new table).
    auth_changed: bool,
    /// The timestamp of the operation being applied, or of the last one:
    /// never lower than an earlier operation's (see [`Image::clock_ms`]).
    clock_ms: u64,
    /// Who sent the operation being applied (for the trail).
    op_caller: String,
    /// Recent effect summaries and commands (not replicated).
    trail: trail::Trail,
    /// The commands, by plugin, whose last run changed at least
    /// [`BULK_COMMAND_CHANGES`] keys (not replicated: the leader's intake
    /// holds these first when snapshots fall behind).
    bulk: BTreeMap<String, BTreeSet<String>>,
    /// Whether `bulk` changed since the adapter last looked.
    bulk_changed: bool,
}

/// A command whose last run changed at least this many keys is a bulk
/// command: when the changes since the last snapshot near their most, the
/// leader holds it before the others (see
/// [`crate::consensus::state_machine::Shared::hold_writes`]).
pub const BULK_COMMAND_CHANGES: usize = 128;

/// How many recent digests to keep for comparison and divergence
/// bisection (40 bytes each).
pub const HISTORY: usize = 100_000;

impl Replica {
    /// Apply one committed log entry, whole. On `Err` nothing of the entry
    /// was applied and the node must stop: the fault is local.
    pub fn apply_entry(
        &mut self,
        log_id: LogId<NodeId>,
        payload: EntryPayload<TypeConfig>,
        loader: &dyn PluginLoader,
    ) -> Result<Response, ApplyError> {
        if let Some(last) = self.log_id
            && log_id.index <= last.index
        {
            return Err(ApplyError::OutOfOrder {
                index: log_id.index * OPS_PER_ENTRY,
                last_applied: self.last_applied,
            });
        }
        let response = match payload {
            EntryPayload::Blank => Response::default(),
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(log_id), m);
                Response::default()
            }
            EntryPayload::Normal(request) => self.apply_request(log_id, request, loader)?,
        };
        self.log_id = Some(log_id);
        Ok(response)
    }

    fn apply_request(
        &mut self,
        log_id: LogId<NodeId>,
        request: Request,
        loader: &dyn PluginLoader,
    ) -> Result<Response, ApplyError> {
        let base = log_id.index * OPS_PER_ENTRY;
        let term = log_id.leader_id.term;
        let Op::Batch(requests) = request.op else {
            return self.apply_op(term, base, request, loader);
        };
        // A bad batch is the leader's bug, but it is in the log now: refuse
        // it the same way on every node rather than stopping them all.
        if requests.len() as u64 > OPS_PER_ENTRY {
            let result = Err(CommandError::Lifecycle {
                message: format!("a batch of {} operations is over the limit of {OPS_PER_ENTRY}", requests.len()),
            });
            self.commit_lifecycle(base, "synod", &result);
            return Ok(Response { result: Some(result), index: base, ..Response::default() });
        }
        let mut items = Vec::with_capacity(requests.len());
        for (position, r) in requests.into_iter().enumerate() {
            let index = base + position as u64;
            let item = match r.op {
                Op::Batch(_) => {
                    let result = Err(CommandError::Lifecycle { message: "nested batch refused".into() });
                    self.commit_lifecycle(index, "synod", &result);
                    Response { result: Some(result), index, ..Response::default() }
                }
                _ => self.apply_op(term, index, r, loader)?,
            };
            items.push(item);
        }
        Ok(Response { index: base, items, ..Response::default() })
    }

    /// Apply one operation at operation index `index`.
    fn apply_op(
        &mut self,
        term: u64,
        index: u64,
        mut request: Request,
        loader: &dyn PluginLoader,
    ) -> Result<Response, ApplyError> {
        // Time never runs backwards in the log: a new leader whose clock is
        // behind the last one's stamps what the last one would have.
        request.timestamp_ms = request.timestamp_ms.max(self.clock_ms);
        self.clock_ms = request.timestamp_ms;
        self.op_caller.clone_from(&request.caller);
        let mut response = match request.op {
            Op::Batch(_) => return Err(ApplyError::Host { index, reason: "nested batch".into() }),
            Op::Command { plugin, command, payload } => {
                let ctx = Context { index, term, timestamp_ms: request.timestamp_ms, caller: request.caller };
                self.apply_identified(&ctx, request.request_id.as_deref(), &plugin, &command, &payload)?
            }
            Op::EventsPublished { upto } => {
                self.mark_published(upto);
                Response::default()
            }
            Op::Settings(settings) => {
                self.settings = settings;
                let result =
                    serde_json::to_vec(&settings).map_err(|e| CommandError::Lifecycle { message: e.to_string() });
                self.commit_lifecycle(index, "synod", &result);
                Response { result: Some(result), ..Response::default() }
            }
            Op::InstallPlugin { name, version, sha256, size, limits } => {
                let record = VersionRecord { sha256, size, limits, installed_at: index };
                let result = self.apply_install(index, &name, &version, record, loader)?;
                let target = format!("{name}@{version}");
                self.audit(index, request.timestamp_ms, &request.caller, "plugin.install", &target, &result);
                Response { result: Some(result), ..Response::default() }
            }
            Op::ActivatePlugin { name, version } => {
                let result = self.apply_activate(index, &name, &version, loader)?;
                let target = format!("{name}@{version}");
                self.audit(index, request.timestamp_ms, &request.caller, "plugin.activate", &target, &result);
                Response { result: Some(result), ..Response::default() }
            }
            Op::RemovePlugin { name } => {
                let result = self.apply_remove(index, &name)?;
                self.audit(index, request.timestamp_ms, &request.caller, "plugin.remove", &name, &result);
                Response { result: Some(result), ..Response::default() }
            }
            Op::Device(op) => {
                let admin = match &op {
                    devices::DeviceOp::Put { spec, .. } => Some(("device.put", spec.id.clone())),
                    devices::DeviceOp::Delete { id, .. } => Some(("device.delete", id.clone())),
                    _ => None,
                };
                let ctx = Context { index, term, timestamp_ms: request.timestamp_ms, caller: request.caller };
                let response = self.apply_device(&ctx, op)?;
                if let (Some((action, id)), Some(result)) = (admin, &response.result) {
                    self.audit(index, ctx.timestamp_ms, &ctx.caller, action, &id, result);
                }
                response
            }
            Op::Auth(op) => {
                self.check_order(index)?;
                let result = self
                    .auth
                    .apply(&op, index, request.timestamp_ms, &request.caller)
                    .map_err(|message| CommandError::Lifecycle { message });
                self.auth_changed |= !matches!(op, auth::AuthOp::Note { .. });
                self.commit_lifecycle(index, auth::AUDIT_FAMILY, &result);
                if let Some(record) = self.auth.last_audit().cloned() {
                    self.queue_audit_event(&record);
                }
                Response { result: Some(result), ..Response::default() }
            }
        };
        response.index = index;
        Ok(response)
    }

    /// A command, answered from the request-id table when it is a retry.
    fn apply_identified(
        &mut self,
        ctx: &Context,
        request_id: Option<&str>,
        plugin: &str,
        command: &str,
        payload: &[u8],
    ) -> Result<Response, ApplyError> {
        self.dedup.expire(ctx.timestamp_ms, ctx.index, self.settings.dedup_ttl_ms);
        let identified =
            request_id.map(|id| (dedup::key(&ctx.caller, plugin, command, id), dedup::payload_hash(payload)));
        if let Some((key, hash)) = &identified {
            match self.dedup.lookup(key, hash) {
                Lookup::New => {}
                Lookup::Retry(first) => {
                    crate::metrics::get().dedup_hits.inc();
                    return Ok(Response {
                        result: Some(first.result.clone()),
                        first_index: Some(first.index),
                        ..Response::default()
                    });
                }
                Lookup::Reused => {
                    let id = request_id.unwrap_or_default().to_owned();
                    return Ok(Response {
                        result: Some(Err(CommandError::RequestIdReused { id })),
                        ..Response::default()
                    });
                }
            }
        }
        let started = std::time::Instant::now();
        let outcome = self.apply_command(ctx, plugin, command, payload)?;
        crate::metrics::get().command(plugin, command, &outcome.result, outcome.fuel_used, started.elapsed());
        for line in &outcome.logs {
            tracing::debug!(target: "synod::plugin", plugin, index = ctx.index, level = line.level, "{}", line.message);
        }
        self.trail.log(plugin, ctx, command, &outcome.logs, u64::from(outcome.logs_dropped));
        if let Some((key, payload_hash)) = identified {
            let remembered =
                Remembered { index: ctx.index, result: outcome.result.clone(), payload_hash, at_ms: ctx.timestamp_ms };
            self.dedup.remember(key, remembered, self.settings.dedup_max_bytes);
        }
        self.queue_events(ctx.index, plugin, &outcome.events);
        self.apply_desired(ctx, &outcome.desired);
        Ok(Response {
            result: Some(outcome.result),
            events: outcome.events,
            fuel_used: outcome.fuel_used,
            ..Response::default()
        })
    }

    /// Run `loaded` as `name` from now on: a handler takes commands; a
    /// driver takes none (its instances run on devices' owners).
    fn set_running(&mut self, name: &str, loaded: Loaded) {
        // Another version: its commands are judged bulk or not anew.
        self.forget_bulk(name);
        match loaded {
            Loaded::Handler(p) => {
                self.plugins.insert(name.to_owned(), p);
            }
            Loaded::Driver => {
                self.plugins.remove(name);
            }
        }
    }

    /// Make `plugin` the active version of `name` for entries applied from
    /// now on, outside the log (tests and tools that have no cluster).
    pub fn activate(&mut self, name: &str, plugin: Arc<Plugin>) {
        self.plugins.insert(name.to_owned(), plugin);
    }

    /// The active version of `name`.
    pub fn plugin(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(name)
    }

    /// The plugin registry.
    pub fn registry(&self) -> &BTreeMap<String, PluginRecord> {
        &self.registry
    }

    /// The last log entry applied.
    pub fn log_id(&self) -> Option<LogId<NodeId>> {
        self.log_id
    }

    /// The last membership applied.
    pub fn membership(&self) -> &StoredMembership<NodeId, NodeInfo> {
        &self.membership
    }

    fn check_order(&self, index: u64) -> Result<(), ApplyError> {
        if index <= self.last_applied {
            return Err(ApplyError::OutOfOrder { index, last_applied: self.last_applied });
        }
        Ok(())
    }

    /// Record a lifecycle result under `name` in the digest.
    fn commit_lifecycle(&mut self, index: u64, name: &str, result: &Result<Vec<u8>, CommandError>) {
        let effects = Effects {
            result: result.clone().map_err(|e| e.to_string()),
            writes: WriteSet::default(),
            events: Vec::new(),
            fuel_used: 0,
        };
        self.chain(index, name, "lifecycle", &[], &effects);
        self.advance(index);
    }

    /// Chain an operation's effects into the digest and remember a summary
    /// of them.
    fn chain(&mut self, index: u64, plugin: &str, command: &str, payload: &[u8], effects: &Effects) {
        self.digest = self.digest.chain(index, plugin, effects);
        // An operation can chain more after its index was recorded (a
        // report's controller, a command's desired patches): the remembered
        // digest at that index is the one after all of it.
        if let Some((last, digest)) = self.history.back_mut()
            && *last == index
        {
            *digest = self.digest;
        }
        let ctx = Context { index, term: 0, timestamp_ms: self.clock_ms, caller: self.op_caller.clone() };
        self.trail.effect(trail::EffectSummary::new(ctx, plugin, command, payload, effects, self.digest));
    }

    /// The summaries of what operation `index` did here, if still kept
    /// (two for a device report that ran its controller).
    pub fn effects_at(&self, index: u64) -> Vec<trail::EffectSummary> {
        self.trail.effects_at(index)
    }

    /// Up to `limit` of the newest operations applied here after `after`,
    /// oldest first (the live log's tail).
    pub fn effects_after(&self, after: Option<u64>, limit: usize) -> (Vec<trail::EffectSummary>, Option<u64>) {
        self.trail.effects_after(after, limit)
    }

    /// Up to `limit` of `plugin`'s latest log lines (kept on this node,
    /// from commands it applied) after operation `after`, oldest first.
    pub fn plugin_logs(&self, plugin: &str, after: u64, limit: usize) -> Vec<trail::PluginLogLine> {
        self.trail.logs(plugin, after, limit)
    }

    /// The last `n` commands `plugin` applied here, oldest first.
    pub fn recent_commands(&self, plugin: &str, n: usize) -> Vec<Arc<trail::RecordedCommand>> {
        self.trail.recent_commands(plugin, n)
    }

    /// The operation indices in `lo..=hi` this node remembers digests for.
    pub fn history_indices(&self, lo: u64, hi: u64) -> Vec<u64> {
        let start = self.history.partition_point(|(i, _)| *i < lo);
        self.history.range(start..).map(|(i, _)| *i).take_while(|i| *i <= hi).collect()
    }

    /// The (index, digest) pairs this node remembers: the first and the
    /// last, if any.
    pub fn history_bounds(&self) -> Option<(u64, u64)> {
        Some((self.history.front()?.0, self.history.back()?.0))
    }

    fn advance(&mut self, index: u64) {
        self.last_applied = index;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((index, self.digest));
    }

    /// The digest right after operation `index`, if it is recent enough to
    /// be remembered (or is the current one).
    pub fn digest_at(&self, index: u64) -> Option<Digest> {
        if index == self.last_applied {
            return Some(self.digest);
        }
        let pos = self.history.binary_search_by_key(&index, |(i, _)| *i).ok()?;
        Some(self.history[pos].1)
    }

    /// Apply one committed command at `ctx.index`.
    pub fn apply_command(
        &mut self,
        ctx: &Context,
        plugin: &str,
        command: &str,
        payload: &[u8],
    ) -> Result<Outcome, ApplyError> {
        self.check_order(ctx.index)?;
        let known = self.plugins.get(plugin);
        let mut outcome = match known {
            Some(p) => p.handle(ctx, command, payload, Box::new(self.kv.view(plugin)), self.devices.view()),
            None => Outcome::failed(CommandError::UnknownPlugin { name: plugin.to_owned() }),
        };
        if let Err(CommandError::Host { reason }) = &outcome.result {
            return Err(ApplyError::Host { index: ctx.index, reason: reason.clone() });
        }
        if known.is_some() {
            let recorded =
                trail::RecordedCommand { ctx: ctx.clone(), command: command.to_owned(), payload: payload.to_vec() };
            self.trail.command(plugin, recorded);
        }
        if crate::faults::take_perturbation() {
            perturb(&mut outcome.writes);
            tracing::warn!(
                index = ctx.index,
                plugin,
                "FAULT INJECTION: this command's writes were perturbed here only"
            );
        }
        self.kv.apply(plugin, &outcome.writes);
        self.note_bulk(plugin, command, outcome.writes.len() >= BULK_COMMAND_CHANGES);
        self.chain(ctx.index, plugin, command, payload, &outcome.effects());
        self.advance(ctx.index);
        Ok(outcome)
    }

    /// Record whether `plugin`'s `command` just ran as a bulk command.
    fn note_bulk(&mut self, plugin: &str, command: &str, bulk: bool) {
        let known = self.bulk.get(plugin).is_some_and(|commands| commands.contains(command));
        if bulk == known {
            return;
        }
        if bulk {
            self.bulk.entry(plugin.to_owned()).or_default().insert(command.to_owned());
        } else if let Some(commands) = self.bulk.get_mut(plugin) {
            commands.remove(command);
            if commands.is_empty() {
                self.bulk.remove(plugin);
            }
        }
        self.bulk_changed = true;
    }

    /// Forget which of `plugin`'s commands are bulk commands.
    fn forget_bulk(&mut self, plugin: &str) {
        if self.bulk.remove(plugin).is_some() {
            self.bulk_changed = true;
        }
    }

    /// The bulk commands by plugin ([`BULK_COMMAND_CHANGES`]), if they
    /// changed since the last call.
    pub fn take_bulk_changed(&mut self) -> Option<BTreeMap<String, BTreeSet<String>>> {
        std::mem::take(&mut self.bulk_changed).then(|| self.bulk.clone())
    }

    /// Load `record`'s plugin: `Ok(Err(_))` is a deterministic refusal (the
    /// component cannot load on this engine, so it cannot on any node),
    /// `Err(_)` a local fault.
    fn load(
        index: u64,
        loader: &dyn PluginLoader,
        record: &VersionRecord,
    ) -> Result<Result<Loaded, CommandError>, ApplyError> {
        match loader.load(record) {
            Ok(plugin) => Ok(Ok(plugin)),
            // Pool exhaustion while running `describe` is this node's
            // problem, not the component's.
            Err(ArtifactError::Load(LoadError::Describe(CommandError::Host { reason }))) => {
                Err(ApplyError::Host { index, reason })
            }
            Err(ArtifactError::Load(e)) => {
                Ok(Err(CommandError::Lifecycle { message: format!("plugin {} does not load: {e}", record.sha256) }))
            }
            Err(e) => Err(ApplyError::Host { index, reason: e.to_string() }),
        }
    }

    /// Apply an install of `version` of `name`. The first version becomes
    /// active. Refused (a lifecycle result) when the label is taken by other
    /// bytes or other limits, or when the component does not load.
    pub fn apply_install(
        &mut self,
        index: u64,
        name: &str,
        version: &str,
        record: VersionRecord,
        loader: &dyn PluginLoader,
    ) -> Result<Result<Vec<u8>, CommandError>, ApplyError> {
        self.check_order(index)?;
        let existing = self.version(name, version).cloned();
        let result = match existing {
            Some(_) if let Some(message) = self.version_conflict(name, version, &record.sha256, &record.limits) => {
                Err(CommandError::Lifecycle { message })
            }
            Some(existing) => Ok(lifecycle_reply(name, version, &existing.sha256, self.is_active(name, version))),
            None => match Self::load(index, loader, &record)? {
                Err(e) => Err(e),
                Ok(plugin) => {
                    let sha256 = record.sha256.clone();
                    let entry = self.registry.entry(name.to_owned()).or_default();
                    entry.versions.insert(version.to_owned(), record);
                    let activated = entry.active.is_none();
                    if activated {
                        entry.active = Some(version.to_owned());
                        entry.activated_at = index;
                        self.set_running(name, plugin);
                    }
                    Ok(lifecycle_reply(name, version, &sha256, activated))
                }
            },
        };
        self.commit_lifecycle(index, name, &result);
        Ok(result)
    }

    fn is_active(&self, name: &str, version: &str) -> bool {
        self.registry.get(name).and_then(|r| r.active.as_deref()) == Some(version)
    }

    /// Why `version` of `name` cannot be installed with these bytes and
    /// limits: the label is taken by other ones. `None` when it is free or
    /// holds exactly these (a repeated install is idempotent).
    pub fn version_conflict(&self, name: &str, version: &str, sha256: &str, limits: &PluginLimits) -> Option<String> {
        let existing = self.version(name, version)?;
        (existing.sha256 != sha256 || &existing.limits != limits).then(|| {
            format!(
                "plugin `{name}` already has a version `{version}` with other bytes or limits \
                 (sha256 {}); choose a new version label",
                existing.sha256
            )
        })
    }

    /// The record of `version` of `name`, if installed.
    pub fn version(&self, name: &str, version: &str) -> Option<&VersionRecord> {
        self.registry.get(name).and_then(|r| r.versions.get(version))
    }

    /// Apply an activation: commands from the next entry on run `version`.
    pub fn apply_activate(
        &mut self,
        index: u64,
        name: &str,
        version: &str,
        loader: &dyn PluginLoader,
    ) -> Result<Result<Vec<u8>, CommandError>, ApplyError> {
        self.check_order(index)?;
        let result = match self.version(name, version).cloned() {
            None if !self.registry.contains_key(name) => Err(CommandError::UnknownPlugin { name: name.to_owned() }),
            None => Err(CommandError::Lifecycle { message: format!("plugin `{name}` has no version `{version}`") }),
            Some(record) => match Self::load(index, loader, &record)? {
                Err(e) => Err(e),
                Ok(plugin) => {
                    if let Some(entry) = self.registry.get_mut(name) {
                        entry.active = Some(version.to_owned());
                        entry.activated_at = index;
                    }
                    self.set_running(name, plugin);
                    Ok(lifecycle_reply(name, version, &record.sha256, true))
                }
            },
        };
        self.commit_lifecycle(index, name, &result);
        Ok(result)
    }

    /// Apply a removal of `name` and all its versions. Its state namespace
    /// stays: a later install under the same name sees it again.
    pub fn apply_remove(&mut self, index: u64, name: &str) -> Result<Result<Vec<u8>, CommandError>, ApplyError> {
        self.check_order(index)?;
        let result = match self.registry.remove(name) {
            Some(_) => {
                self.plugins.remove(name);
                self.trail.forget(name);
                self.forget_bulk(name);
                Ok(serde_json::to_vec(&serde_json::json!({ "removed": name })).unwrap_or_default())
            }
            None => Err(CommandError::UnknownPlugin { name: name.to_owned() }),
        };
        self.commit_lifecycle(index, name, &result);
        Ok(result)
    }

    /// The members of the last applied membership (voters and learners).
    pub fn members(&self) -> std::collections::BTreeSet<NodeId> {
        self.membership.membership().nodes().map(|(id, _)| *id).collect()
    }

    /// Apply a device operation; a report may run its controller's command
    /// in the same operation (same index, same entry).
    fn apply_device(&mut self, ctx: &Context, op: devices::DeviceOp) -> Result<Response, ApplyError> {
        self.check_order(ctx.index)?;
        let members = self.members();
        let mut applied = self.devices.apply(op, ctx.timestamp_ms, &members);
        let reaction = applied.reaction.take();
        let result = applied.result.clone().unwrap_or(Ok(Vec::new()));
        self.commit_device(ctx.index, applied);
        if let Some(r) = reaction {
            // The controller runs as the device, at the report's index: its
            // writes, events and desired patches are part of this operation.
            let rctx = Context { caller: format!("device:{}", r.device), ..ctx.clone() };
            let outcome = match self.plugins.get(&r.plugin) {
                Some(p) => {
                    p.handle(&rctx, &r.command, &r.payload, Box::new(self.kv.view(&r.plugin)), self.devices.view())
                }
                None => Outcome::failed(CommandError::UnknownPlugin { name: r.plugin.clone() }),
            };
            if let Err(CommandError::Host { reason }) = &outcome.result {
                return Err(ApplyError::Host { index: ctx.index, reason: reason.clone() });
            }
            if let Err(e) = &outcome.result {
                tracing::debug!(device = %r.device, plugin = %r.plugin, error = %e, "device controller refused");
            }
            self.kv.apply(&r.plugin, &outcome.writes);
            self.chain(ctx.index, &r.plugin, &r.command, &r.payload, &outcome.effects());
            self.queue_events(ctx.index, &r.plugin, &outcome.events);
            self.apply_desired(&rctx, &outcome.desired);
        }
        Ok(Response { result: Some(result), ..Response::default() })
    }

    /// Record one device operation: digest, events, owners told, and the
    /// operation index advanced.
    fn commit_device(&mut self, index: u64, applied: devices::Applied) {
        self.record_device(index, applied);
        self.advance(index);
    }

    /// Chain a device change into the digest at `index`, queue its events
    /// and tell owners which shadows changed (liveness and lease writes name
    /// no device).
    fn record_device(&mut self, index: u64, applied: devices::Applied) {
        let effects = Effects {
            result: applied.result.unwrap_or(Ok(Vec::new())).map_err(|e| e.to_string()),
            writes: applied.writes,
            events: applied.events,
            fuel_used: 0,
        };
        self.chain(index, DEVICE_FAMILY, "device", &[], &effects);
        self.queue_events(index, DEVICE_FAMILY, &effects.events);
        for (id, _) in effects.writes.iter() {
            if !id.starts_with("node/") && id != "lease" {
                self.device_changes.push(id.to_owned());
            }
        }
    }

    /// Desired-state patches a command buffered through `devices`, recorded
    /// at the command's own index.
    fn apply_desired(&mut self, ctx: &Context, patches: &[(String, String)]) {
        for applied in self.devices.apply_patches(patches, ctx.timestamp_ms) {
            self.record_device(ctx.index, applied);
        }
    }

    /// Keep an audit record of an admin operation applied at `index` and
    /// queue its `synod.evt.audit.<action>` event.
    fn audit(
        &mut self,
        index: u64,
        at_ms: u64,
        caller: &str,
        action: &str,
        target: &str,
        result: &Result<Vec<u8>, CommandError>,
    ) {
        let record = auth::AuditRecord {
            index,
            at_ms,
            principal: caller.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            ok: result.is_ok(),
            detail: match result {
                Ok(out) => String::from_utf8_lossy(out).into_owned(),
                Err(e) => e.to_string(),
            },
        };
        self.queue_audit_event(&record);
        self.auth.record(record);
    }

    fn queue_audit_event(&mut self, record: &auth::AuditRecord) {
        let event = Event { topic: record.action.clone(), payload: serde_json::to_vec(record).unwrap_or_default() };
        self.queue_events(record.index, auth::AUDIT_FAMILY, &[event]);
    }

    /// Tokens and the audit trail.
    pub fn auth(&self) -> &auth::Auth {
        &self.auth
    }

    /// Whether the token table changed since the last call.
    pub fn take_auth_changed(&mut self) -> bool {
        std::mem::take(&mut self.auth_changed)
    }

    /// The device shadows and liveness.
    pub fn devices(&self) -> &devices::Devices {
        &self.devices
    }

    /// Devices changed since the last call (for the owner's manager).
    pub fn take_device_changes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.device_changes)
    }

    /// Remembered request ids.
    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    /// The cluster-wide settings in force.
    pub fn settings(&self) -> ClusterSettings {
        self.settings
    }

    /// Queue a command's events for publishing.
    fn queue_events(&mut self, index: u64, family: &str, events: &[Event]) {
        if events.is_empty() || index <= self.published_upto {
            return;
        }
        let entry = self.outbox.entry(index).or_insert_with(|| OutboxEntry { events: Vec::new() });
        entry.events.extend(events.iter().map(|e| (family.to_owned(), e.clone())));
        while self.outbox.len() > OUTBOX_LIMIT {
            if let Some((_, dropped)) = self.outbox.pop_first() {
                self.outbox_dropped += dropped.events.len() as u64;
            }
        }
    }

    /// Events up to `upto` are in the stream: forget them.
    fn mark_published(&mut self, upto: u64) {
        if upto > self.published_upto {
            self.published_upto = upto;
            self.outbox = self.outbox.split_off(&(upto + 1));
        }
    }

    /// Unpublished events after `after`, at most `limit` commands' worth.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Vec<(u64, OutboxEntry)> {
        self.outbox.range(after + 1..).take(limit).map(|(i, e)| (*i, e.clone())).collect()
    }

    /// (published up to, unpublished commands, dropped events).
    pub fn outbox_state(&self) -> (u64, usize, u64) {
        (self.published_upto, self.outbox.len(), self.outbox_dropped)
    }

    /// Run a read-only query against the current state. Holding the
    /// replica while a query runs blocks apply: prefer [`Replica::query_view`]
    /// and run the query after letting go.
    pub fn query(&self, ctx: &Context, plugin: &str, name: &str, payload: &[u8]) -> Outcome {
        match self.query_view(plugin) {
            Some((p, view, devices)) => p.query(ctx, name, payload, Box::new(view), devices),
            None => Outcome::failed(CommandError::UnknownPlugin { name: plugin.to_owned() }),
        }
    }

    /// What a query of `plugin` needs, taken in O(1): the active plugin and
    /// a copy-on-write view of its namespace as of now.
    pub fn query_view(
        &self,
        plugin: &str,
    ) -> Option<(Arc<Plugin>, crate::state::Namespace, crate::runtime::DeviceMap)> {
        self.plugins.get(plugin).map(|p| (p.clone(), self.kv.view(plugin), self.devices.view()))
    }

    /// The plugin key-value data.
    pub fn kv(&self) -> &KvState {
        &self.kv
    }

    /// The running digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Index of the last applied operation.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// [`Replica::capture`] for a snapshot: the namespaces' writes since
    /// their base are frozen first, so that once the snapshot is written
    /// they can be read from its file instead ([`Replica::rebase`]).
    pub fn capture_for_snapshot(&mut self) -> Captured {
        self.kv.freeze_at(self.log_id.map(|l| l.index));
        self.capture()
    }

    /// `written` is the plugin data of `captured` (from
    /// [`Replica::capture_for_snapshot`]) decoded in place from the file it
    /// was written to: read it from there from now on (see
    /// [`KvState::rebase`]).
    pub fn rebase(&mut self, captured: &Captured, written: KvState) {
        self.kv.rebase(&captured.image.kv, written);
    }

    /// The whole state at this moment (between two entries), cheaply; see
    /// [`Captured`].
    pub fn capture(&self) -> Captured {
        Captured {
            image: Image {
                log_id: self.log_id,
                membership: self.membership.clone(),
                kv: self.kv.clone(),
                digest: self.digest.0,
                last_applied: self.last_applied,
                registry: self.registry.clone(),
                dedup: self.dedup.image(),
                outbox: self.outbox.iter().map(|(i, e)| (*i, e.clone())).collect(),
                published_upto: self.published_upto,
                outbox_dropped: self.outbox_dropped,
                settings: self.settings,
                devices: self.devices.image(),
                auth: self.auth.image(),
                clock_ms: self.clock_ms,
            },
        }
    }

    /// Rebuild from a snapshot's image, checking that its position and its
    /// state belong together; `loader` compiles each active version.
    pub fn restore<K: Into<KvState>>(image: Image<K>, loader: &dyn PluginLoader) -> Result<Replica, ApplyError> {
        let position = image.log_id.map(|l| l.index).unwrap_or(0);
        // The state may include operations of the entry at `position` and
        // before, never of a later one (the torn snapshot this check exists
        // for held part of entry N labelled N - 1).
        let highest = position * OPS_PER_ENTRY + OPS_PER_ENTRY - 1;
        if image.last_applied > highest {
            return Err(ApplyError::BadSnapshot(format!(
                "state at operation {} is labelled log entry {position}",
                image.last_applied
            )));
        }
        if image.membership.log_id().is_some_and(|m| Some(m) > image.log_id) {
            return Err(ApplyError::BadSnapshot("membership is newer than the snapshot".into()));
        }
        let mut plugins = BTreeMap::new();
        for (name, record) in &image.registry {
            if let Some(v) = record.active.as_ref().and_then(|a| record.versions.get(a)) {
                match Self::load(position * OPS_PER_ENTRY, loader, v)? {
                    Ok(Loaded::Handler(p)) => {
                        plugins.insert(name.clone(), p);
                    }
                    Ok(Loaded::Driver) => {}
                    Err(e) => return Err(ApplyError::BadSnapshot(format!("active plugin `{name}`: {e}"))),
                }
            }
        }
        Ok(Replica {
            log_id: image.log_id,
            membership: image.membership,
            registry: image.registry,
            plugins,
            kv: image.kv.into(),
            digest: Digest(image.digest),
            last_applied: image.last_applied,
            // The digest at the point restored from is known: a node that
            // starts from a snapshot (or a backup) can be compared there.
            history: VecDeque::from([(image.last_applied, Digest(image.digest))]),
            dedup: Dedup::from_image(image.dedup),
            outbox: image.outbox.into_iter().collect(),
            published_upto: image.published_upto,
            outbox_dropped: image.outbox_dropped,
            settings: image.settings,
            devices: devices::Devices::from_image(image.devices),
            device_changes: Vec::new(),
            auth: auth::Auth::from_image(image.auth),
            auth_changed: true,
            clock_ms: image.clock_ms,
            op_caller: String::new(),
            trail: trail::Trail::default(),
            bulk: BTreeMap::new(),
            bulk_changed: false,
        })
    }
}

/// The battery's perturbed write (see [`crate::faults`]): the first write's
/// value gets one more byte, or a write appears where there was none.
fn perturb(writes: &mut WriteSet) {
    let first = writes.iter().next().map(|(k, v)| (k.to_owned(), v.map(<[u8]>::to_vec)));
    match first {
        Some((key, value)) => {
            let mut value = value.unwrap_or_default();
            value.push(0xff);
            writes.set(key, value);
        }
        None => writes.set("synod-fault".into(), b"perturbed".to_vec()),
    }
}

fn lifecycle_reply(name: &str, version: &str, sha256: &str, active: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "plugin": name, "version": version, "sha256": sha256, "active": active,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;
    use std::collections::BTreeSet;

    /// A loader whose component never loads, the same way on every node.
    struct Refusing;
    impl PluginLoader for Refusing {
        fn load(&self, _: &VersionRecord) -> Result<Loaded, ArtifactError> {
            Err(ArtifactError::Load(LoadError::Describe(CommandError::OutOfFuel { limit: 1 })))
        }
    }

    /// A loader whose disk fails: local to this node.
    struct Broken;
    impl PluginLoader for Broken {
        fn load(&self, record: &VersionRecord) -> Result<Loaded, ArtifactError> {
            Err(ArtifactError::Missing(record.sha256.clone()))
        }
    }

    fn install(index: u64, fuel: u64) -> (LogId<NodeId>, EntryPayload<TypeConfig>) {
        let op = Op::InstallPlugin {
            name: "evil".into(),
            version: "1".into(),
            sha256: "ab".repeat(32),
            size: 10,
            limits: PluginLimits { fuel, ..PluginLimits::default() },
        };
        let request = Request { timestamp_ms: 5, caller: "anonymous".into(), request_id: None, op };
        (LogId::new(CommittedLeaderId::new(1, 1), index), EntryPayload::Normal(request))
    }

    /// The `?fuel=1` upload that stopped every node: a component that does
    /// not load is a lifecycle result recorded in the log and the digest,
    /// and the replica moves on.
    #[test]
    fn a_plugin_that_does_not_load_is_a_result_not_a_halt() {
        let mut replica = Replica::default();
        let (log_id, payload) = install(7, 1);
        let response = replica.apply_entry(log_id, payload, &Refusing).expect("a deterministic refusal is applied");
        match response.result {
            Some(Err(CommandError::Lifecycle { message })) => assert!(message.contains("does not load"), "{message}"),
            other => panic!("expected a lifecycle error, got {other:?}"),
        }
        assert!(replica.registry().is_empty());
        assert_eq!(replica.log_id(), Some(log_id));
        assert_eq!(replica.last_applied(), 7 * OPS_PER_ENTRY);
        assert_ne!(replica.digest(), Digest::ZERO, "the refusal is in the digest");
        // And the next entry applies.
        let (next, payload) = install(8, 1);
        replica.apply_entry(next, payload, &Refusing).unwrap();
        assert_eq!(replica.log_id(), Some(next));
    }

    /// A local fault is not a result: nothing of the entry is applied.
    #[test]
    fn a_local_fault_applies_nothing() {
        let mut replica = Replica::default();
        let (log_id, payload) = install(3, 1000);
        assert!(matches!(replica.apply_entry(log_id, payload, &Broken), Err(ApplyError::Host { .. })));
        assert_eq!(replica.log_id(), None);
        assert_eq!(replica.digest(), Digest::ZERO);
    }

    fn device_op(index: u64, op: devices::DeviceOp) -> (LogId<NodeId>, EntryPayload<TypeConfig>) {
        let request =
            Request { timestamp_ms: 1_000 + index, caller: "synod".into(), request_id: None, op: Op::Device(op) };
        (LogId::new(CommittedLeaderId::new(1, 1), index), EntryPayload::Normal(request))
    }

    /// A report whose controller runs chains the controller's effects at
    /// the report's own index: a node that has moved past it remembers the
    /// digest after the controller, the one a node still at it reports (the
    /// thermostat test once saw "digests differ" between them).
    #[test]
    fn the_digest_remembered_at_a_report_includes_its_controller() {
        let mut replica = Replica::default();
        let info = NodeInfo { peer_id: "p".into(), p2p_addr: "/ip4/127.0.0.1/tcp/1".into(), http_addr: "h".into() };
        let members = openraft::Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, info)]));
        replica
            .apply_entry(LogId::new(CommittedLeaderId::new(1, 1), 1), EntryPayload::Membership(members), &Refusing)
            .unwrap();
        let beat = || devices::DeviceOp::Heartbeat { node: 1, labels: Vec::new() };
        let (id, p) = device_op(2, beat());
        replica.apply_entry(id, p, &Refusing).unwrap();
        let spec = devices::DeviceSpec {
            id: "room".into(),
            driver: "modbus-room".into(),
            profile: "{}".into(),
            grants: Vec::new(),
            eligible: Vec::new(),
            // Not installed: the controller's refusal is its effect.
            controller: Some(devices::Controller { plugin: "thermostat".into(), command: "reported".into() }),
            desired: None,
        };
        let (id, p) = device_op(3, devices::DeviceOp::Put { spec, expected_version: Some(0) });
        replica.apply_entry(id, p, &Refusing).unwrap();
        let epoch = replica.devices.get("room").expect("put").epoch;
        let report = devices::DeviceOp::Report {
            id: "room".into(),
            node: 1,
            epoch,
            fields: r#"{"temperature": 19.5}"#.into(),
            actuated: None,
        };
        let (id, p) = device_op(4, report);
        replica.apply_entry(id, p, &Refusing).unwrap();
        let at = replica.last_applied();
        assert_eq!(replica.effects_at(at).len(), 2, "the report ran its controller");
        let after_report = replica.digest();
        assert_eq!(replica.digest_at(at), Some(after_report));
        let (id, p) = device_op(5, beat());
        replica.apply_entry(id, p, &Refusing).unwrap();
        assert!(replica.last_applied() > at);
        assert_eq!(replica.digest_at(at), Some(after_report), "remembered after the controller");
    }

    fn identified(index: u64, at_ms: u64, id: &str) -> (LogId<NodeId>, EntryPayload<TypeConfig>) {
        let op = Op::Command { plugin: "gone".into(), command: "c".into(), payload: b"{}".to_vec() };
        let request = Request { timestamp_ms: at_ms, caller: "anonymous".into(), request_id: Some(id.into()), op };
        (LogId::new(CommittedLeaderId::new(1, 1), index), EntryPayload::Normal(request))
    }

    /// Request ids are kept for the replicated TTL: a retry inside it gets
    /// the first answer; after the leader shortens it through the log, the
    /// same id is a new request on every node at the same index.
    #[test]
    fn request_ids_follow_the_replicated_ttl() {
        let mut replica = Replica::default();
        let (id, p) = identified(1, 1_000, "a");
        replica.apply_entry(id, p, &Refusing).unwrap();
        let (id, p) = identified(2, 500_000, "a");
        assert_eq!(replica.apply_entry(id, p, &Refusing).unwrap().first_index, Some(OPS_PER_ENTRY));
        let settings = ClusterSettings { dedup_ttl_ms: 60_000, ..ClusterSettings::default() };
        let request =
            Request { timestamp_ms: 500_001, caller: "synod".into(), request_id: None, op: Op::Settings(settings) };
        replica
            .apply_entry(LogId::new(CommittedLeaderId::new(1, 1), 3), EntryPayload::Normal(request), &Refusing)
            .unwrap();
        assert_eq!(replica.settings(), settings);
        // Past the new TTL but within the last MIN_KEPT_OPS operations: kept.
        let (id, p) = identified(4, 500_002, "a");
        assert_eq!(replica.apply_entry(id, p, &Refusing).unwrap().first_index, Some(OPS_PER_ENTRY));
        let far = 2 + dedup::MIN_KEPT_OPS / OPS_PER_ENTRY;
        let (id, p) = identified(far, 500_003, "a");
        assert_eq!(replica.apply_entry(id, p, &Refusing).unwrap().first_index, None, "forgotten after the new TTL");
        let restored = Replica::restore(replica.capture().image(), &Refusing).unwrap();
        assert_eq!(restored.settings(), settings);
    }

    /// A snapshot whose state runs past its label is refused on restore.
    #[test]
    fn restore_checks_the_label_against_the_state() {
        let mut replica = Replica::default();
        let (log_id, payload) = install(4, 1);
        replica.apply_entry(log_id, payload, &Refusing).unwrap();
        let mut image = replica.capture().image();
        image.log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), 3));
        assert!(matches!(Replica::restore(image, &Refusing), Err(ApplyError::BadSnapshot(_))));
        let image = replica.capture().image();
        let restored = Replica::restore(image, &Refusing).unwrap();
        assert_eq!(restored.digest(), replica.digest());
    }
}
