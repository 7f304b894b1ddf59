//! Device shadows: the replicated half of devices and drivers.
//!
//! In: device operations from the log ([`DeviceOp`]: definitions, desired
//! patches, fenced reports, node heartbeats, owner reassignments, lease
//! settings) with the entry's leader timestamp, and the current membership.
//! Out: the shadows (desired, reported, delta, per-field metadata, owner and
//! owner epoch, document version), the liveness table, and for each
//! operation its deterministic result, the writes and events that go into
//! the digest and the outbox, and a controller command to run when reported
//! state changed.
//!
//! Everything here is a pure function of the log: the same operations give
//! the same shadows on every node. Field values are kept as canonical JSON
//! text (objects with sorted keys), so the state is plain data that
//! postcard can carry in snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::consensus::types::NodeId;
use crate::runtime::CommandError;
use crate::state::{Event, WriteSet};

/// Largest shadow document (its JSON rendering), in bytes.
pub const MAX_DEVICE_BYTES: usize = 64 * 1024;

/// Most grants and eligibility entries one device may list.
const MAX_LIST: usize = 64;

/// Where a device's reported changes go: a command of a plugin, run in the
/// same log entry as the report (see [`Reaction`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controller {
    /// The command-handler plugin.
    pub plugin: String,
    /// Its command.
    pub command: String,
}

/// A device definition, as an operator writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Device id: a NATS-subject-safe name.
    pub id: String,
    /// The driver plugin's name (its active version drives the device).
    pub driver: String,
    /// The driver's profile, canonical JSON.
    pub profile: String,
    /// Capabilities: `modbus-tcp://host:port/unit`, `tcp://host:port`.
    pub grants: Vec<String>,
    /// Node ids or labels that may own the device; empty = any node.
    pub eligible: Vec<String>,
    /// Plugin command told about reported changes.
    pub controller: Option<Controller>,
    /// Initial desired state (a JSON object), for a new device.
    pub desired: Option<String>,
}

/// When and at which document version a field last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMeta {
    /// Leader time of the change, Unix ms.
    pub ts_ms: u64,
    /// The document version it changed at.
    pub version: u64,
}

/// One device's shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The definition.
    pub spec: DeviceSpec,
    /// The node that runs its driver.
    pub owner: Option<NodeId>,
    /// Fencing token: raised on every change of owner.
    pub epoch: u64,
    /// Desired fields, canonical JSON text per field.
    pub desired: BTreeMap<String, String>,
    /// Reported fields, canonical JSON text per field.
    pub reported: BTreeMap<String, String>,
    /// Metadata of desired fields.
    pub desired_meta: BTreeMap<String, FieldMeta>,
    /// Metadata of reported fields.
    pub reported_meta: BTreeMap<String, FieldMeta>,
    /// Document version: raised by every change.
    pub version: u64,
    /// Version at which the definition last changed (owners restart their
    /// driver when it moves).
    pub definition_version: u64,
    /// Version at which desired state last changed.
    pub desired_version: u64,
    /// Highest desired version the owner has actuated.
    pub last_actuated_version: u64,
    /// Leader time of the last change.
    pub updated_ms: u64,
    /// The node and epoch of the last accepted report.
    pub reported_by: Option<(NodeId, u64)>,
}

/// A node's last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    /// Leader time of the heartbeat entry, Unix ms.
    pub at_ms: u64,
    /// The node's labels (matched against devices' eligibility).
    pub labels: Vec<String>,
}

/// How long ownership lasts without a heartbeat: every node must use the
/// same numbers, so they are replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSettings {
    /// A node heartbeats this often.
    pub heartbeat_ms: u64,
    /// An owner's lease runs this long after its last committed heartbeat
    /// was sent; it stops writing to its devices when it runs out.
    pub ttl_ms: u64,
    /// After `ttl_ms` plus this, the leader reassigns the owner's devices.
    pub grace_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings { heartbeat_ms: 1000, ttl_ms: 3000, grace_ms: 2000 }
    }
}

/// What the log carries about devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceOp {
    /// Create or replace a definition (desired and reported are kept).
    Put {
        /// The definition.
        spec: DeviceSpec,
        /// Compare-and-set on the document version (0 = must not exist).
        expected_version: Option<u64>,
    },
    /// Remove a device.
    Delete {
        /// Device id.
        id: String,
        /// Compare-and-set on the document version.
        expected_version: Option<u64>,
    },
    /// Merge a JSON object into desired state (`null` removes a field).
    PatchDesired {
        /// Device id.
        id: String,
        /// The patch, JSON text.
        patch: String,
        /// Compare-and-set on the document version.
        expected_version: Option<u64>,
    },
    /// Reported fields from the owner's driver, fenced by its epoch.
    Report {
        /// Device id.
        id: String,
        /// The reporting node.
        node: NodeId,
        /// The epoch it believes it owns the device at.
        epoch: u64,
        /// A JSON object of fields (`null` removes one).
        fields: String,
        /// The desired version its driver actuated, if any.
        actuated: Option<u64>,
    },
    /// A node is alive (see [`LeaseSettings`]).
    Heartbeat {
        /// The node.
        node: NodeId,
        /// Its labels.
        labels: Vec<String>,
    },
    /// Move a device whose owner is silent, ineligible or gone to a live
    /// eligible node, chosen at apply (compare-and-set on the epoch).
    Reassign {
        /// Device id.
        id: String,
        /// The epoch the leader saw.
        epoch: u64,
    },
    /// Lease timing for every node.
    Settings(LeaseSettings),
}

/// A controller command to run right after a report changed reported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    /// The device that reported.
    pub device: String,
    /// Plugin.
    pub plugin: String,
    /// Command.
    pub command: String,
    /// `{"device", "reported", "changed", "desired"}`.
    pub payload: Vec<u8>,
}

/// The deterministic result of one device operation.
#[derive(Debug, Default)]
pub struct Applied {
    /// Result for the caller.
    pub result: Option<Result<Vec<u8>, CommandError>>,
    /// What changed, for the digest (device id → postcard of the shadow).
    pub writes: WriteSet,
    /// Events to publish under `synod.evt.device.`.
    pub events: Vec<Event>,
    /// A controller to run.
    pub reaction: Option<Reaction>,
}

impl Applied {
    fn err(e: CommandError) -> Self {
        Applied { result: Some(Err(e)), ..Applied::default() }
    }
}

/// The device part of the replicated state.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    /// Shadows by id; shared copy-on-write with readers (handlers' views,
    /// snapshots).
    map: Arc<BTreeMap<String, Arc<Device>>>,
    /// Last heartbeat per node.
    liveness: BTreeMap<NodeId, Liveness>,
    /// Lease timing.
    settings: LeaseSettings,
}

/// Devices as plain data, for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesImage {
    /// Every shadow.
    pub devices: Vec<Device>,
    /// Liveness table.
    pub liveness: Vec<(NodeId, Liveness)>,
    /// Lease timing.
    pub settings: Option<LeaseSettings>,
}

/// Why a piece of JSON is refused.
fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::InvalidInput { message: message.into() }
}

/// Parse `text` as a JSON object.
pub fn parse_object(what: &str, text: &str) -> Result<Map<String, Value>, CommandError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid(format!("{what} must be a JSON object"))),
        Err(e) => Err(invalid(format!("{what} is not JSON: {e}"))),
    }
}

/// Canonical JSON text of a value (object keys sorted: serde_json's map is
/// ordered).
pub fn canonical(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Check a device id: it is a NATS subject token and a URL segment.
pub fn check_id(id: &str) -> Result<(), CommandError> {
    crate::state::check_name("device id", id).map_err(|e| invalid(e.to_string()))
}

/// Check a grant: `modbus-tcp://host:port/unit` or `tcp://host:port`.
pub fn check_grant(grant: &str) -> Result<(), CommandError> {
    let bad = || invalid(format!("grant {grant:?} must be modbus-tcp://host:port/unit or tcp://host:port"));
    let (endpoint, unit) = if let Some(rest) = grant.strip_prefix("modbus-tcp://") {
        let (endpoint, unit) = rest.rsplit_once('/').ok_or_else(bad)?;
        (endpoint, Some(unit))
    } else if let Some(rest) = grant.strip_prefix("tcp://") {
        (rest, None)
    } else {
        return Err(bad());
    };
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() || unit.is_some_and(|u| u.parse::<u8>().is_err()) {
        return Err(bad());
    }
    Ok(())
}

impl DeviceSpec {
    /// Check everything about a definition that does not depend on state.
    pub fn check(&self) -> Result<(), CommandError> {
        check_id(&self.id)?;
        crate::state::check_name("driver", &self.driver).map_err(|e| invalid(e.to_string()))?;
        parse_object("profile", &self.profile)?;
        if self.grants.len() > MAX_LIST || self.eligible.len() > MAX_LIST {
            return Err(invalid(format!("at most {MAX_LIST} grants and {MAX_LIST} eligible entries")));
        }
        for g in &self.grants {
            check_grant(g)?;
        }
        if let Some(c) = &self.controller {
            crate::state::check_name("controller plugin", &c.plugin).map_err(|e| invalid(e.to_string()))?;
            crate::state::check_name("controller command", &c.command).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(d) = &self.desired {
            parse_object("desired", d)?;
        }
        Ok(())
    }
}

/// Merge `patch` into `fields`, recording metadata; returns the names of
/// fields whose value changed.
fn merge(
    fields: &mut BTreeMap<String, String>,
    meta: &mut BTreeMap<String, FieldMeta>,
    patch: &Map<String, Value>,
    at: FieldMeta,
) -> Vec<String> {
    let mut changed = Vec::new();
    for (name, value) in patch {
        if value.is_null() {
            if fields.remove(name).is_some() {
                meta.remove(name);
                changed.push(name.clone());
            }
            continue;
        }
        let text = canonical(value);
        if fields.get(name) != Some(&text) {
            fields.insert(name.clone(), text);
            meta.insert(name.clone(), at);
            changed.push(name.clone());
        }
    }
    changed
}

fn object(fields: &BTreeMap<String, String>) -> Value {
    Value::Object(fields.iter().map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or(Value::Null))).collect())
}

fn meta_object(meta: &BTreeMap<String, FieldMeta>) -> Value {
    Value::Object(
        meta.iter().map(|(k, m)| (k.clone(), serde_json::json!({ "ts_ms": m.ts_ms, "version": m.version }))).collect(),
    )
}

impl Device {
    /// Desired fields whose value differs from the reported one (AWS IoT's
    /// definition of the delta), canonical JSON text per field.
    pub fn delta(&self) -> BTreeMap<String, String> {
        self.desired
            .iter()
            .filter(|(k, v)| self.reported.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The delta as a JSON object.
    pub fn delta_json(&self) -> Value {
        object(&self.delta())
    }

    /// The shadow as JSON: what the API returns and handlers read.
    pub fn document(&self) -> Value {
        serde_json::json!({
            "id": self.spec.id,
            "driver": self.spec.driver,
            "profile": serde_json::from_str::<Value>(&self.spec.profile).unwrap_or(Value::Null),
            "grants": self.spec.grants,
            "eligible": self.spec.eligible,
            "controller": self.spec.controller.as_ref().map(|c| serde_json::json!({
                "plugin": c.plugin, "command": c.command,
            })),
            "owner": self.owner,
            "epoch": self.epoch,
            "desired": object(&self.desired),
            "reported": object(&self.reported),
            "delta": self.delta_json(),
            "metadata": { "desired": meta_object(&self.desired_meta), "reported": meta_object(&self.reported_meta) },
            "version": self.version,
            "definition_version": self.definition_version,
            "desired_version": self.desired_version,
            "last_actuated_version": self.last_actuated_version,
            "updated_ms": self.updated_ms,
            "reported_by": self.reported_by.map(|(node, epoch)| serde_json::json!({ "node": node, "epoch": epoch })),
        })
    }

    /// The document as JSON bytes.
    pub fn document_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.document()).unwrap_or_default()
    }

    fn check_size(&self) -> Result<(), CommandError> {
        let size = self.document_bytes().len();
        if size > MAX_DEVICE_BYTES {
            return Err(CommandError::Rejected {
                message: format!("device {} would be {size} bytes, over the cap of {MAX_DEVICE_BYTES}", self.spec.id),
            });
        }
        Ok(())
    }

    /// Whether `node` (with `labels`) may own this device.
    pub fn eligible(&self, node: NodeId, labels: &[String]) -> bool {
        self.spec.eligible.is_empty()
            || self.spec.eligible.iter().any(|e| e == &node.to_string() || labels.iter().any(|l| l == e))
    }
}

fn check_version(id: &str, expected: Option<u64>, current: u64) -> Result<(), CommandError> {
    match expected {
        Some(v) if v != current => Err(CommandError::Conflict {
            message: format!("device {id} is at version {current}, not the expected {v}"),
        }),
        _ => Ok(()),
    }
}

fn not_found(id: &str) -> CommandError {
    CommandError::NotFound { message: format!("no device `{id}`") }
}

/// Rendezvous choice: among `candidates`, the node with the highest
/// blake3(device id, node id). Deterministic, and moving one node moves
/// only the devices it held.
pub fn choose_owner(id: &str, candidates: impl IntoIterator<Item = NodeId>) -> Option<NodeId> {
    candidates.into_iter().max_by_key(|node| {
        let mut h = blake3::Hasher::new_derive_key("synod 2026-11 device owner v1");
        h.update(&(id.len() as u64).to_le_bytes());
        h.update(id.as_bytes());
        h.update(&node.to_le_bytes());
        (*h.finalize().as_bytes(), *node)
    })
}

impl Devices {
    /// The shadow of `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Device>> {
        self.map.get(id)
    }

    /// Every shadow, shared (O(1)).
    pub fn view(&self) -> Arc<BTreeMap<String, Arc<Device>>> {
        self.map.clone()
    }

    /// Up to `limit` ids starting with `prefix`, in order.
    pub fn list(&self, prefix: &str, limit: usize) -> Vec<Arc<Device>> {
        list(&self.map, prefix, limit)
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Lease timing in force.
    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    /// Last heartbeat per node.
    pub fn liveness(&self) -> &BTreeMap<NodeId, Liveness> {
        &self.liveness
    }

    /// Nodes that may take `device` at time `now_ms`: members, heartbeat
    /// within the TTL, eligible.
    pub fn candidates(&self, device: &Device, now_ms: u64, members: &BTreeSet<NodeId>) -> Vec<NodeId> {
        self.liveness
            .iter()
            .filter(|(n, l)| {
                members.contains(n)
                    && l.at_ms.saturating_add(self.settings.ttl_ms) >= now_ms
                    && device.eligible(**n, &l.labels)
            })
            .map(|(n, _)| *n)
            .collect()
    }

    /// Whether the leader should reassign `device` at `now_ms`: no owner
    /// while some node could take it, or an owner silent past TTL + grace,
    /// no longer a member or no longer eligible.
    pub fn needs_owner(&self, device: &Device, now_ms: u64, members: &BTreeSet<NodeId>) -> bool {
        match device.owner {
            None => !self.candidates(device, now_ms, members).is_empty(),
            Some(owner) => match self.liveness.get(&owner) {
                None => true,
                Some(l) => {
                    !members.contains(&owner)
                        || !device.eligible(owner, &l.labels)
                        || l.at_ms.saturating_add(self.settings.ttl_ms).saturating_add(self.settings.grace_ms) < now_ms
                }
            },
        }
    }

    fn store(&mut self, device: Device) -> Arc<Device> {
        let device = Arc::new(device);
        Arc::make_mut(&mut self.map).insert(device.spec.id.clone(), device.clone());
        device
    }

    /// Apply one operation at leader time `now_ms`.
    pub fn apply(&mut self, op: DeviceOp, now_ms: u64, members: &BTreeSet<NodeId>) -> Applied {
        match op {
            DeviceOp::Put { spec, expected_version } => self.put(spec, expected_version, now_ms, members),
            DeviceOp::Delete { id, expected_version } => self.delete(&id, expected_version),
            DeviceOp::PatchDesired { id, patch, expected_version } => {
                let patch = match parse_object("desired", &patch) {
                    Ok(p) => p,
                    Err(e) => return Applied::err(e),
                };
                self.patch_desired(&id, &patch, expected_version, now_ms)
            }
            DeviceOp::Report { id, node, epoch, fields, actuated } => {
                self.report(&id, node, epoch, &fields, actuated, now_ms)
            }
            DeviceOp::Heartbeat { node, labels } => {
                let mut writes = WriteSet::default();
                writes.set(format!("node/{node}"), now_ms.to_le_bytes().to_vec());
                self.liveness.insert(node, Liveness { at_ms: now_ms, labels });
                Applied { result: Some(Ok(Vec::new())), writes, ..Applied::default() }
            }
            DeviceOp::Reassign { id, epoch } => self.reassign(&id, epoch, now_ms, members),
            DeviceOp::Settings(settings) => {
                if settings.heartbeat_ms == 0 || settings.ttl_ms <= settings.heartbeat_ms {
                    return Applied::err(invalid("lease ttl must be longer than the heartbeat interval"));
                }
                self.settings = settings;
                let mut writes = WriteSet::default();
                writes.set("lease".into(), postcard::to_allocvec(&settings).unwrap_or_default());
                Applied { result: Some(Ok(Vec::new())), writes, ..Applied::default() }
            }
        }
    }

    /// The outcome of a change to `device`: its document as the result, its
    /// bytes in the digest, an event per kind of change.
    fn changed(device: &Device, kinds: &[&str]) -> Applied {
        let mut writes = WriteSet::default();
        writes.set(device.spec.id.clone(), postcard::to_allocvec(device).unwrap_or_default());
        let document = device.document_bytes();
        let events = kinds
            .iter()
            .map(|kind| Event { topic: format!("{}.{kind}", device.spec.id), payload: document.clone() })
            .collect();
        Applied { result: Some(Ok(document)), writes, events, reaction: None }
    }

    fn put(&mut self, spec: DeviceSpec, expected: Option<u64>, now_ms: u64, members: &BTreeSet<NodeId>) -> Applied {
        if let Err(e) = spec.check() {
            return Applied::err(e);
        }
        let current = self.map.get(&spec.id).cloned();
        if let Err(e) = check_version(&spec.id, expected, current.as_ref().map_or(0, |d| d.version)) {
            return Applied::err(e);
        }
        let mut kinds = vec!["definition"];
        let device = match current {
            Some(existing) => {
                let mut d = (*existing).clone();
                d.version += 1;
                d.definition_version = d.version;
                d.updated_ms = now_ms;
                d.spec = DeviceSpec { desired: None, ..spec };
                d
            }
            None => {
                let mut d = Device {
                    spec: DeviceSpec { desired: None, ..spec.clone() },
                    owner: None,
                    epoch: 0,
                    desired: BTreeMap::new(),
                    reported: BTreeMap::new(),
                    desired_meta: BTreeMap::new(),
                    reported_meta: BTreeMap::new(),
                    version: 1,
                    definition_version: 1,
                    desired_version: 0,
                    last_actuated_version: 0,
                    updated_ms: now_ms,
                    reported_by: None,
                };
                if let Some(desired) = &spec.desired {
                    let patch = parse_object("desired", desired).unwrap_or_default();
                    let at = FieldMeta { ts_ms: now_ms, version: 1 };
                    if !merge(&mut d.desired, &mut d.desired_meta, &patch, at).is_empty() {
                        d.desired_version = 1;
                        kinds.push("desired");
                    }
                }
                if let Some(owner) = choose_owner(&d.spec.id, self.candidates(&d, now_ms, members)) {
                    d.owner = Some(owner);
                    d.epoch = 1;
                    kinds.push("owner");
                }
                d
            }
        };
        if let Err(e) = device.check_size() {
            return Applied::err(e);
        }
        let device = self.store(device);
        Self::changed(&device, &kinds)
    }

    fn delete(&mut self, id: &str, expected: Option<u64>) -> Applied {
        let Some(current) = self.map.get(id) else { return Applied::err(not_found(id)) };
        if let Err(e) = check_version(id, expected, current.version) {
            return Applied::err(e);
        }
        Arc::make_mut(&mut self.map).remove(id);
        let mut writes = WriteSet::default();
        writes.delete(id.to_owned());
        let payload = serde_json::to_vec(&serde_json::json!({ "deleted": id })).unwrap_or_default();
        let events = vec![Event { topic: format!("{id}.deleted"), payload: payload.clone() }];
        Applied { result: Some(Ok(payload)), writes, events, reaction: None }
    }

    /// Merge `patch` into the desired state of `id`.
    pub fn patch_desired(
        &mut self,
        id: &str,
        patch: &Map<String, Value>,
        expected: Option<u64>,
        now_ms: u64,
    ) -> Applied {
        let Some(current) = self.map.get(id) else { return Applied::err(not_found(id)) };
        if let Err(e) = check_version(id, expected, current.version) {
            return Applied::err(e);
        }
        let mut d = (**current).clone();
        let at = FieldMeta { ts_ms: now_ms, version: d.version + 1 };
        if merge(&mut d.desired, &mut d.desired_meta, patch, at).is_empty() {
            // Nothing changed: no new version, nothing to actuate.
            let mut applied = Self::changed(current, &[]);
            applied.writes = WriteSet::default();
            return applied;
        }
        d.version += 1;
        d.desired_version = d.version;
        d.updated_ms = now_ms;
        if let Err(e) = d.check_size() {
            return Applied::err(e);
        }
        let device = self.store(d);
        Self::changed(&device, &["desired"])
    }

    fn report(
        &mut self,
        id: &str,
        node: NodeId,
        epoch: u64,
        fields: &str,
        actuated: Option<u64>,
        now_ms: u64,
    ) -> Applied {
        let Some(current) = self.map.get(id) else { return Applied::err(not_found(id)) };
        if current.owner != Some(node) || current.epoch != epoch {
            return Applied::err(CommandError::Fenced {
                message: format!(
                    "report for {id} from node {node} at epoch {epoch} refused: the owner is {} at epoch {}",
                    current.owner.map_or("nobody".to_owned(), |o| format!("node {o}")),
                    current.epoch
                ),
            });
        }
        let patch = match parse_object("reported", fields) {
            Ok(p) => p,
            Err(e) => return Applied::err(e),
        };
        let mut d = (**current).clone();
        let at = FieldMeta { ts_ms: now_ms, version: d.version + 1 };
        let changed = merge(&mut d.reported, &mut d.reported_meta, &patch, at);
        let actuated = actuated.map(|v| v.min(d.desired_version)).filter(|v| *v > d.last_actuated_version);
        if changed.is_empty() && actuated.is_none() {
            let mut applied = Self::changed(current, &[]);
            applied.writes = WriteSet::default();
            return applied;
        }
        if let Some(v) = actuated {
            d.last_actuated_version = v;
        }
        d.reported_by = Some((node, epoch));
        d.version += 1;
        d.updated_ms = now_ms;
        if let Err(e) = d.check_size() {
            return Applied::err(e);
        }
        let device = self.store(d);
        let mut applied = Self::changed(&device, if changed.is_empty() { &[] } else { &["reported"] });
        if let Some(c) = &device.spec.controller
            && !changed.is_empty()
        {
            let payload = serde_json::json!({
                "device": id,
                "reported": object(&device.reported),
                "changed": changed,
                "desired": object(&device.desired),
            });
            applied.reaction = Some(Reaction {
                device: id.to_owned(),
                plugin: c.plugin.clone(),
                command: c.command.clone(),
                payload: serde_json::to_vec(&payload).unwrap_or_default(),
            });
        }
        applied
    }

    fn reassign(&mut self, id: &str, epoch: u64, now_ms: u64, members: &BTreeSet<NodeId>) -> Applied {
        let Some(current) = self.map.get(id).cloned() else { return Applied::err(not_found(id)) };
        if current.epoch != epoch {
            return Applied::err(CommandError::Conflict {
                message: format!("device {id} is at epoch {}, not {epoch}", current.epoch),
            });
        }
        if !self.needs_owner(&current, now_ms, members) {
            return Applied::err(CommandError::Conflict {
                message: format!("device {id} keeps its owner: it is alive and eligible"),
            });
        }
        let candidates: Vec<NodeId> =
            self.candidates(&current, now_ms, members).into_iter().filter(|n| Some(*n) != current.owner).collect();
        let owner = choose_owner(id, candidates);
        if owner.is_none() && current.owner.is_none() {
            return Applied::err(CommandError::Conflict { message: format!("no live eligible node for device {id}") });
        }
        let mut d = (*current).clone();
        d.owner = owner;
        d.epoch += 1;
        d.version += 1;
        d.updated_ms = now_ms;
        let device = self.store(d);
        Self::changed(&device, &["owner"])
    }

    /// Apply desired patches a command handler buffered (already checked
    /// by the host interface against the same state).
    pub fn apply_patches(&mut self, patches: &[(String, String)], now_ms: u64) -> Vec<Applied> {
        patches
            .iter()
            .map(|(id, patch)| match parse_object("desired", patch) {
                Ok(p) => self.patch_desired(id, &p, None, now_ms),
                Err(e) => Applied::err(e),
            })
            .collect()
    }

    /// As plain data.
    pub fn image(&self) -> DevicesImage {
        DevicesImage {
            devices: self.map.values().map(|d| (**d).clone()).collect(),
            liveness: self.liveness.iter().map(|(n, l)| (*n, l.clone())).collect(),
            settings: Some(self.settings),
        }
    }

    /// Back from plain data.
    pub fn from_image(image: DevicesImage) -> Devices {
        Devices {
            map: Arc::new(image.devices.into_iter().map(|d| (d.spec.id.clone(), Arc::new(d))).collect()),
            liveness: image.liveness.into_iter().collect(),
            settings: image.settings.unwrap_or_default(),
        }
    }
}

/// Up to `limit` shadows with ids starting with `prefix`.
pub fn list(map: &BTreeMap<String, Arc<Device>>, prefix: &str, limit: usize) -> Vec<Arc<Device>> {
    map.range(prefix.to_owned()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .take(limit)
        .map(|(_, d)| d.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> DeviceSpec {
        DeviceSpec {
            id: id.into(),
            driver: "modbus-room".into(),
            profile: "{}".into(),
            grants: vec!["modbus-tcp://127.0.0.1:5020/1".into()],
            eligible: Vec::new(),
            controller: Some(Controller { plugin: "thermostat".into(), command: "device_reported".into() }),
            desired: None,
        }
    }

    fn members() -> BTreeSet<NodeId> {
        [1, 2, 3].into_iter().collect()
    }

    fn alive(devices: &mut Devices, now: u64) {
        for n in [1, 2, 3] {
            devices.apply(DeviceOp::Heartbeat { node: n, labels: vec![format!("rack{n}")] }, now, &members());
        }
    }

    fn ok(applied: &Applied) -> Value {
        match &applied.result {
            Some(Ok(bytes)) => serde_json::from_slice(bytes).unwrap(),
            other => panic!("expected ok, got {other:?}"),
        }
    }

    #[test]
    fn delta_is_desired_fields_that_differ_from_reported() {
        let mut devices = Devices::default();
        alive(&mut devices, 1_000);
        ok(&devices.apply(DeviceOp::Put { spec: spec("room-1"), expected_version: Some(0) }, 1_000, &members()));
        let owner = devices.get("room-1").unwrap().owner.unwrap();
        let epoch = devices.get("room-1").unwrap().epoch;
        let patch = r#"{"heater": true, "setpoint": 21.5, "mode": "auto"}"#.to_owned();
        let doc = ok(&devices.apply(
            DeviceOp::PatchDesired { id: "room-1".into(), patch, expected_version: None },
            1_001,
            &members(),
        ));
        assert_eq!(doc["delta"], serde_json::json!({"heater": true, "setpoint": 21.5, "mode": "auto"}));
        let report = DeviceOp::Report {
            id: "room-1".into(),
            node: owner,
            epoch,
            fields: r#"{"heater": true, "setpoint": 20, "temperature": 19.5}"#.into(),
            actuated: None,
        };
        let applied = devices.apply(report, 1_002, &members());
        let doc = ok(&applied);
        assert_eq!(doc["delta"], serde_json::json!({"setpoint": 21.5, "mode": "auto"}));
        assert_eq!(doc["metadata"]["reported"]["temperature"]["ts_ms"], 1_002);
        let reaction = applied.reaction.expect("the controller is told");
        let payload: Value = serde_json::from_slice(&reaction.payload).unwrap();
        assert_eq!(payload["changed"], serde_json::json!(["heater", "setpoint", "temperature"]));
        // null removes a desired field.
        let doc = ok(&devices.apply(
            DeviceOp::PatchDesired { id: "room-1".into(), patch: r#"{"mode": null}"#.into(), expected_version: None },
            1_003,
            &members(),
        ));
        assert_eq!(doc["delta"], serde_json::json!({"setpoint": 21.5}));
        assert!(doc["metadata"]["desired"].get("mode").is_none());
    }

    #[test]
    fn a_write_with_a_stale_version_is_a_conflict() {
        let mut devices = Devices::default();
        ok(&devices.apply(DeviceOp::Put { spec: spec("d"), expected_version: Some(0) }, 1, &members()));
        let again = devices.apply(DeviceOp::Put { spec: spec("d"), expected_version: Some(0) }, 2, &members());
        assert!(matches!(again.result, Some(Err(CommandError::Conflict { .. }))), "{:?}", again.result);
        let patch = DeviceOp::PatchDesired { id: "d".into(), patch: r#"{"a":1}"#.into(), expected_version: Some(7) };
        assert!(matches!(devices.apply(patch, 3, &members()).result, Some(Err(CommandError::Conflict { .. }))));
        let patch = DeviceOp::PatchDesired { id: "d".into(), patch: r#"{"a":1}"#.into(), expected_version: Some(1) };
        assert_eq!(ok(&devices.apply(patch, 4, &members()))["version"], 2);
        let delete = DeviceOp::Delete { id: "d".into(), expected_version: Some(1) };
        assert!(matches!(devices.apply(delete, 5, &members()).result, Some(Err(CommandError::Conflict { .. }))));
        let gone = DeviceOp::Delete { id: "nope".into(), expected_version: None };
        assert!(matches!(devices.apply(gone, 5, &members()).result, Some(Err(CommandError::NotFound { .. }))));
    }

    #[test]
    fn a_report_with_a_stale_epoch_is_fenced() {
        let mut devices = Devices::default();
        alive(&mut devices, 1_000);
        devices.apply(DeviceOp::Put { spec: spec("d"), expected_version: None }, 1_000, &members());
        let d = devices.get("d").unwrap().clone();
        let owner = d.owner.unwrap();
        let report = |node, epoch| DeviceOp::Report {
            id: "d".into(),
            node,
            epoch,
            fields: r#"{"t": 1}"#.into(),
            actuated: None,
        };
        assert!(matches!(
            devices.apply(report(owner, d.epoch + 1), 1_001, &members()).result,
            Some(Err(CommandError::Fenced { .. }))
        ));
        let other = if owner == 1 { 2 } else { 1 };
        assert!(matches!(
            devices.apply(report(other, d.epoch), 1_001, &members()).result,
            Some(Err(CommandError::Fenced { .. }))
        ));
        ok(&devices.apply(report(owner, d.epoch), 1_001, &members()));
        // The owner goes silent; past TTL + grace the leader reassigns and
        // the old owner's next report is fenced.
        let late = 1_000 + devices.settings().ttl_ms + devices.settings().grace_ms + 1;
        for n in [1, 2, 3].into_iter().filter(|n| *n != owner) {
            devices.apply(DeviceOp::Heartbeat { node: n, labels: Vec::new() }, late, &members());
        }
        assert!(devices.needs_owner(devices.get("d").unwrap(), late, &members()));
        let moved = ok(&devices.apply(DeviceOp::Reassign { id: "d".into(), epoch: d.epoch }, late, &members()));
        assert_eq!(moved["epoch"], d.epoch + 1);
        assert_ne!(moved["owner"], owner);
        assert!(matches!(
            devices.apply(report(owner, d.epoch), late, &members()).result,
            Some(Err(CommandError::Fenced { .. }))
        ));
    }

    #[test]
    fn reassignment_is_a_compare_and_set_on_the_epoch() {
        let mut devices = Devices::default();
        alive(&mut devices, 1_000);
        devices.apply(DeviceOp::Put { spec: spec("d"), expected_version: None }, 1_000, &members());
        let epoch = devices.get("d").unwrap().epoch;
        // A live, eligible owner keeps the device.
        let keep = devices.apply(DeviceOp::Reassign { id: "d".into(), epoch }, 1_500, &members());
        assert!(matches!(keep.result, Some(Err(CommandError::Conflict { .. }))));
        // Two leaders' proposals for the same dead owner: only the first moves it.
        let late = 1_000 + 10_000;
        alive(&mut devices, late);
        let owner = devices.get("d").unwrap().owner.unwrap();
        devices.apply(DeviceOp::Heartbeat { node: owner, labels: Vec::new() }, 0, &members());
        let mut m = members();
        m.remove(&owner);
        ok(&devices.apply(DeviceOp::Reassign { id: "d".into(), epoch }, late, &m));
        let second = devices.apply(DeviceOp::Reassign { id: "d".into(), epoch }, late, &m);
        assert!(matches!(second.result, Some(Err(CommandError::Conflict { .. }))));
        assert_eq!(devices.get("d").unwrap().epoch, epoch + 1);
    }

    #[test]
    fn owner_choice_is_deterministic_and_follows_eligibility() {
        let a = choose_owner("room-7", [1, 2, 3]);
        assert_eq!(a, choose_owner("room-7", [3, 1, 2]), "order of candidates does not matter");
        assert_eq!(choose_owner("room-7", []), None);
        // Spread: 300 devices over 3 nodes land on every node.
        let mut counts = BTreeMap::new();
        for i in 0..300 {
            *counts.entry(choose_owner(&format!("d{i}"), [1, 2, 3]).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|c| *c > 60), "{counts:?}");
        // Labels and ids restrict the choice.
        let mut devices = Devices::default();
        alive(&mut devices, 1_000);
        let mut s = spec("d");
        s.eligible = vec!["rack2".into()];
        devices.apply(DeviceOp::Put { spec: s, expected_version: None }, 1_000, &members());
        assert_eq!(devices.get("d").unwrap().owner, Some(2));
        let mut s = spec("e");
        s.eligible = vec!["3".into()];
        devices.apply(DeviceOp::Put { spec: s, expected_version: None }, 1_000, &members());
        assert_eq!(devices.get("e").unwrap().owner, Some(3));
    }

    #[test]
    fn actuation_is_recorded_up_to_the_desired_version() {
        let mut devices = Devices::default();
        alive(&mut devices, 1);
        devices.apply(DeviceOp::Put { spec: spec("d"), expected_version: None }, 1, &members());
        let patch =
            DeviceOp::PatchDesired { id: "d".into(), patch: r#"{"heater": true}"#.into(), expected_version: None };
        let desired_version = ok(&devices.apply(patch, 2, &members()))["desired_version"].as_u64().unwrap();
        let d = devices.get("d").unwrap().clone();
        let report = DeviceOp::Report {
            id: "d".into(),
            node: d.owner.unwrap(),
            epoch: d.epoch,
            fields: r#"{"heater": true}"#.into(),
            actuated: Some(desired_version + 5),
        };
        let doc = ok(&devices.apply(report, 3, &members()));
        assert_eq!(doc["last_actuated_version"], desired_version);
        assert_eq!(doc["delta"], serde_json::json!({}));
    }

    #[test]
    fn size_cap_and_bad_input_are_refused() {
        let mut devices = Devices::default();
        let mut s = spec("d");
        s.grants = vec!["http://x".into()];
        assert!(matches!(
            devices.apply(DeviceOp::Put { spec: s, expected_version: None }, 1, &members()).result,
            Some(Err(CommandError::InvalidInput { .. }))
        ));
        let mut s = spec("Bad.Id");
        s.id = "bad.id".into();
        assert!(matches!(
            devices.apply(DeviceOp::Put { spec: s, expected_version: None }, 1, &members()).result,
            Some(Err(CommandError::InvalidInput { .. }))
        ));
        devices.apply(DeviceOp::Put { spec: spec("d"), expected_version: None }, 1, &members());
        let big = serde_json::json!({ "blob": "x".repeat(MAX_DEVICE_BYTES) }).to_string();
        let patch = DeviceOp::PatchDesired { id: "d".into(), patch: big, expected_version: None };
        assert!(matches!(devices.apply(patch, 2, &members()).result, Some(Err(CommandError::Rejected { .. }))));
        let patch = DeviceOp::PatchDesired { id: "d".into(), patch: "[1]".into(), expected_version: None };
        assert!(matches!(devices.apply(patch, 2, &members()).result, Some(Err(CommandError::InvalidInput { .. }))));
        assert_eq!(devices.get("d").unwrap().version, 1, "refusals change nothing");
    }
}
