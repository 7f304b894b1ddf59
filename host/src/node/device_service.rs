//! What a node offers clients about devices, transport-neutral (HTTP in
//! `api/`, NATS request/reply in `bus/`).
//!
//! In: definitions, desired-state patches and reads from callers. Out:
//! device operations through the log, and shadow documents (`{id, driver,
//! profile, grants, eligible, controller, owner, epoch, desired, reported,
//! delta, metadata, version, ...}`) from the replicated state.

use serde::Deserialize;
use serde_json::{Value, json};

use super::NodeInner;
use super::auth::Principal;
use super::service::{Consistency, ServiceError};
use crate::consensus::Op;
use crate::replica::auth::Access;
use crate::replica::devices::{Controller, DeviceOp, DeviceSpec, canonical, check_id};

/// A definition as a client writes it (`PUT /v1/devices/{id}`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionBody {
    /// The driver plugin's name.
    pub driver: String,
    /// The driver's profile (any JSON object).
    #[serde(default)]
    pub profile: Option<Value>,
    /// Capabilities: `modbus-tcp://host:port/unit`, `tcp://host:port`.
    #[serde(default)]
    pub grants: Vec<String>,
    /// Node ids or labels that may own it (empty: any node).
    #[serde(default)]
    pub eligible: Vec<Value>,
    /// A command told about reported changes: `{"plugin", "command"}`.
    #[serde(default)]
    pub controller: Option<ControllerBody>,
    /// Initial desired state of a new device.
    #[serde(default)]
    pub desired: Option<Value>,
    /// Compare-and-set: the version the caller read (0: must not exist).
    #[serde(default)]
    pub expected_version: Option<u64>,
}

/// `{"plugin": "thermostat", "command": "device_reported"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerBody {
    /// Command-handler plugin.
    pub plugin: String,
    /// Its command.
    pub command: String,
}

fn id_ok(id: &str) -> Result<(), ServiceError> {
    check_id(id).map_err(|e| ServiceError::command(&e))
}

impl NodeInner {
    /// Apply one device operation through the log; the shadow document (or
    /// `{"deleted": id}`) and the operation index.
    async fn device_write(&self, who: &Principal, op: DeviceOp) -> Result<(u64, Value), ServiceError> {
        let (index, bytes) = self.write_applied(Op::Device(op), who, None).await?;
        Ok((index, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// Create or replace the definition of `id`.
    pub async fn device_put(&self, who: &Principal, id: &str, body: &[u8]) -> Result<(u64, Value), ServiceError> {
        who.require(Access::Admin)?;
        id_ok(id)?;
        self.check_device_body(body)?;
        let def: DefinitionBody = serde_json::from_slice(body).map_err(|e| {
            ServiceError::bad_request(format!(
                "expected {{driver, profile, grants, eligible, controller, desired, expected_version}}: {e}"
            ))
        })?;
        let profile = def.profile.unwrap_or_else(|| json!({}));
        let eligible = def
            .eligible
            .iter()
            .map(|e| match e {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) if n.is_u64() => Ok(n.to_string()),
                other => Err(ServiceError::bad_request(format!("eligible entry {other} must be a node id or a label"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = DeviceSpec {
            id: id.to_owned(),
            driver: def.driver,
            profile: canonical(&profile),
            grants: def.grants,
            eligible,
            controller: def.controller.map(|c| Controller { plugin: c.plugin, command: c.command }),
            desired: def.desired.as_ref().map(canonical),
        };
        spec.check().map_err(|e| ServiceError::command(&e))?;
        self.device_write(who, DeviceOp::Put { spec, expected_version: def.expected_version }).await
    }

    /// Remove `id`.
    pub async fn device_delete(
        &self,
        who: &Principal,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<(u64, Value), ServiceError> {
        who.require(Access::Admin)?;
        id_ok(id)?;
        self.device_write(who, DeviceOp::Delete { id: id.to_owned(), expected_version }).await
    }

    /// Merge `body` (a JSON object; `null` removes a field) into the desired
    /// state of `id`.
    pub async fn device_patch_desired(
        &self,
        who: &Principal,
        id: &str,
        body: &[u8],
        expected_version: Option<u64>,
    ) -> Result<(u64, Value), ServiceError> {
        who.require(Access::Desired)?;
        id_ok(id)?;
        self.check_device_body(body)?;
        let patch: Value =
            serde_json::from_slice(body).map_err(|e| ServiceError::bad_request(format!("body is not JSON: {e}")))?;
        if !patch.is_object() {
            return Err(ServiceError::bad_request("desired state must be a JSON object"));
        }
        let op = DeviceOp::PatchDesired { id: id.to_owned(), patch: canonical(&patch), expected_version };
        self.device_write(who, op).await
    }

    fn check_device_body(&self, body: &[u8]) -> Result<(), ServiceError> {
        let limit = crate::replica::devices::MAX_DEVICE_BYTES;
        if body.len() > limit {
            return Err(ServiceError::too_large("device document", body.len(), limit));
        }
        Ok(())
    }

    /// The shadow of `id`.
    pub async fn device_get(&self, who: &Principal, id: &str, consistency: Consistency) -> Result<Value, ServiceError> {
        who.require(Access::Read)?;
        id_ok(id)?;
        self.consistent(consistency).await?;
        self.with_replica(|r| r.devices().get(id).map(|d| d.document()))
            .flatten()
            .ok_or_else(|| ServiceError::new(404, "not_found", format!("no device `{id}`")))
    }

    /// Up to `limit` shadows whose id starts with `prefix`.
    pub async fn device_list(
        &self,
        who: &Principal,
        prefix: &str,
        limit: usize,
        consistency: Consistency,
    ) -> Result<(Vec<Value>, u64), ServiceError> {
        who.require(Access::Read)?;
        self.consistent(consistency).await?;
        Ok(self
            .with_replica(|r| {
                (r.devices().list(prefix, limit.min(10_000)).iter().map(|d| d.document()).collect(), r.last_applied())
            })
            .unwrap_or_default())
    }
}
