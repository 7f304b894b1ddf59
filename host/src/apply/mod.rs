//! Apply stage: the only writer of replicated state.
//!
//! In: committed operations in log order — commands, and plugin lifecycle
//! changes (install, activate, remove) — each with its [`Context`]. Out: the
//! operation's result for the caller, and the state after it — plugin
//! namespaces, the plugin registry, the running [`Digest`] and the last
//! applied index — identical on every node that applied the same entries.
//!
//! A failed command is still applied: its error is the deterministic result,
//! its writes are dropped, and the digest records it. Only a local fault
//! ([`ApplyError::Host`]) stops the entry from being applied at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::runtime::{CommandError, Context, Outcome, Plugin, PluginLimits};
use crate::state::{Digest, Effects, Event, KvState, WriteSet};

/// Client request ids remembered for deduplication: a retry with the same
/// id within the last this-many identified requests is answered with the
/// first result instead of being applied again.
pub const DEDUP_WINDOW: usize = 100_000;

/// Events kept for publishing while the bus is away; past this the oldest
/// are dropped (and counted) rather than growing without bound.
pub const OUTBOX_LIMIT: usize = 1_000_000;

/// The first result of an identified request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Log index where it was applied.
    pub index: u64,
    /// What it returned.
    pub result: Result<Vec<u8>, CommandError>,
}

/// Events of one applied command, waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The plugin that emitted them.
    pub plugin: String,
    /// In emission order.
    pub events: Vec<Event>,
}

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
}

/// One installed version of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// One plugin's namespace as plain data: (plugin, [(key, value)]).
pub type NamespaceImage = (String, Vec<(String, Vec<u8>)>);

/// The replicated state as plain data: what a snapshot carries (besides the
/// plugin bytes, which the consensus layer adds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Plugin namespaces: (plugin, [(key, value)]) in order.
    pub kv: Vec<NamespaceImage>,
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
}

/// The replicated state of one node, and the plugins that change it.
#[derive(Default)]
pub struct StateMachine {
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
    /// still compare at a common index.
    history: std::collections::VecDeque<(u64, Digest)>,
    /// Remembered request ids.
    dedup: BTreeMap<String, Remembered>,
    /// The same ids, oldest first, to bound the window.
    dedup_order: std::collections::VecDeque<String>,
    /// Unpublished events by log index.
    outbox: BTreeMap<u64, OutboxEntry>,
    /// Events up to this index are known to be in the stream.
    published_upto: u64,
    /// Events dropped because the outbox was full.
    outbox_dropped: u64,
}

/// How many recent digests to keep for comparison.
const HISTORY: usize = 4096;

impl StateMachine {
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
        self.digest = self.digest.chain(index, name, &effects);
        self.advance(index);
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
        let outcome = match self.plugins.get(plugin) {
            Some(p) => p.handle(ctx, command, payload, Box::new(self.kv.view(plugin))),
            None => Outcome::failed(CommandError::UnknownPlugin { name: plugin.to_owned() }),
        };
        if let Err(CommandError::Host { reason }) = &outcome.result {
            return Err(ApplyError::Host { index: ctx.index, reason: reason.clone() });
        }
        self.kv.apply(plugin, &outcome.writes);
        self.digest = self.digest.chain(ctx.index, plugin, &outcome.effects());
        self.advance(ctx.index);
        Ok(outcome)
    }

    /// Apply an install of `version` of `name`; `plugin` is the compiled
    /// component the record names. The first version becomes active.
    pub fn apply_install(
        &mut self,
        index: u64,
        name: &str,
        version: &str,
        record: VersionRecord,
        plugin: Arc<Plugin>,
    ) -> Result<Result<Vec<u8>, CommandError>, ApplyError> {
        self.check_order(index)?;
        let entry = self.registry.entry(name.to_owned()).or_default();
        let result = match entry.versions.get(version) {
            Some(existing) if existing.sha256 != record.sha256 => Err(CommandError::Lifecycle {
                message: format!(
                    "plugin `{name}` already has a version `{version}` with other bytes ({}); \
                     choose a new version label",
                    existing.sha256
                ),
            }),
            _ => {
                let sha256 = record.sha256.clone();
                entry.versions.insert(version.to_owned(), record);
                let activated = entry.active.is_none();
                if activated {
                    entry.active = Some(version.to_owned());
                    entry.activated_at = index;
                    self.plugins.insert(name.to_owned(), plugin);
                }
                Ok(lifecycle_reply(name, version, &sha256, activated))
            }
        };
        self.commit_lifecycle(index, name, &result);
        Ok(result)
    }

    /// The record of `version` of `name`, if installed.
    pub fn version(&self, name: &str, version: &str) -> Option<&VersionRecord> {
        self.registry.get(name).and_then(|r| r.versions.get(version))
    }

    /// Apply an activation: commands from the next entry on run `version`.
    /// `plugin` is `None` when the version is not installed (an error result).
    pub fn apply_activate(
        &mut self,
        index: u64,
        name: &str,
        version: &str,
        plugin: Option<Arc<Plugin>>,
    ) -> Result<Result<Vec<u8>, CommandError>, ApplyError> {
        self.check_order(index)?;
        let result = match (self.registry.get_mut(name), plugin) {
            (Some(record), Some(plugin)) if record.versions.contains_key(version) => {
                let sha256 = record.versions[version].sha256.clone();
                record.active = Some(version.to_owned());
                record.activated_at = index;
                self.plugins.insert(name.to_owned(), plugin);
                Ok(lifecycle_reply(name, version, &sha256, true))
            }
            (None, _) => Err(CommandError::UnknownPlugin { name: name.to_owned() }),
            _ => Err(CommandError::Lifecycle {
                message: format!("plugin `{name}` has no version `{version}`"),
            }),
        };
        self.commit_lifecycle(index, name, &result);
        Ok(result)
    }

    /// Apply a removal of `name` and all its versions. Its state namespace
    /// stays: a later install under the same name sees it again.
    pub fn apply_remove(
        &mut self,
        index: u64,
        name: &str,
    ) -> Result<Result<Vec<u8>, CommandError>, ApplyError> {
        self.check_order(index)?;
        let result = match self.registry.remove(name) {
            Some(_) => {
                self.plugins.remove(name);
                Ok(serde_json::to_vec(&serde_json::json!({ "removed": name })).unwrap_or_default())
            }
            None => Err(CommandError::UnknownPlugin { name: name.to_owned() }),
        };
        self.commit_lifecycle(index, name, &result);
        Ok(result)
    }

    /// The first result of request `id`, if it is in the window.
    pub fn remembered(&self, id: &str) -> Option<&Remembered> {
        self.dedup.get(id)
    }

    /// Remember the result of request `id` (evicting the oldest past
    /// [`DEDUP_WINDOW`]). Called in log order on every node.
    pub fn remember(&mut self, id: &str, remembered: Remembered) {
        if self.dedup.insert(id.to_owned(), remembered).is_none() {
            self.dedup_order.push_back(id.to_owned());
            while self.dedup_order.len() > DEDUP_WINDOW {
                if let Some(old) = self.dedup_order.pop_front() {
                    self.dedup.remove(&old);
                }
            }
        }
    }

    /// Queue a command's events for publishing.
    pub fn queue_events(&mut self, index: u64, plugin: &str, events: &[Event]) {
        if events.is_empty() || index <= self.published_upto {
            return;
        }
        self.outbox.insert(index, OutboxEntry { plugin: plugin.to_owned(), events: events.to_vec() });
        while self.outbox.len() > OUTBOX_LIMIT {
            if let Some((_, dropped)) = self.outbox.pop_first() {
                self.outbox_dropped += dropped.events.len() as u64;
            }
        }
    }

    /// Events up to `upto` are in the stream: forget them.
    pub fn mark_published(&mut self, upto: u64) {
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

    /// Run a read-only query against the current state.
    pub fn query(&self, ctx: &Context, plugin: &str, name: &str, payload: &[u8]) -> Outcome {
        match self.plugins.get(plugin) {
            Some(p) => p.query(ctx, name, payload, Box::new(self.kv.view(plugin))),
            None => Outcome::failed(CommandError::UnknownPlugin { name: plugin.to_owned() }),
        }
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

    /// The state as plain data, for a snapshot.
    pub fn image(&self) -> Image {
        Image {
            kv: self
                .kv
                .namespaces()
                .map(|(name, ns)| {
                    (name.to_owned(), ns.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect())
                })
                .collect(),
            digest: self.digest.0,
            last_applied: self.last_applied,
            registry: self.registry.clone(),
            dedup: self
                .dedup_order
                .iter()
                .filter_map(|id| self.dedup.get(id).map(|r| (id.clone(), r.clone())))
                .collect(),
            outbox: self.outbox.iter().map(|(i, e)| (*i, e.clone())).collect(),
            published_upto: self.published_upto,
            outbox_dropped: self.outbox_dropped,
        }
    }

    /// Rebuild from a snapshot's image; `load` compiles each active version.
    pub fn restore<E>(
        image: Image,
        mut load: impl FnMut(&VersionRecord) -> Result<Arc<Plugin>, E>,
    ) -> Result<StateMachine, E> {
        let mut plugins = BTreeMap::new();
        for (name, record) in &image.registry {
            if let Some(v) = record.active.as_ref().and_then(|a| record.versions.get(a)) {
                plugins.insert(name.clone(), load(v)?);
            }
        }
        Ok(StateMachine {
            registry: image.registry,
            plugins,
            kv: KvState::from_parts(image.kv),
            digest: Digest(image.digest),
            last_applied: image.last_applied,
            history: std::collections::VecDeque::new(),
            dedup_order: image.dedup.iter().map(|(id, _)| id.clone()).collect(),
            dedup: image.dedup.into_iter().collect(),
            outbox: image.outbox.into_iter().collect(),
            published_upto: image.published_upto,
            outbox_dropped: image.outbox_dropped,
        })
    }
}

fn lifecycle_reply(name: &str, version: &str, sha256: &str, active: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "plugin": name, "version": version, "sha256": sha256, "active": active,
    }))
    .unwrap_or_default()
}
