//! `synod:plugin/devices`: device shadows as of the entry, and buffered
//! desired-state patches committed with the command.

use super::HostState;
use crate::replica::devices::{Device, MAX_DEVICE_BYTES, list, parse_object};
use crate::runtime::bindings::{HostError, synod::plugin::devices::Host};

/// Most desired patches one command may buffer.
pub const MAX_DESIRED_PATCHES: usize = 1_000;

impl HostState {
    /// The shadow of `id` with this command's buffered patches merged in.
    fn device_now(&self, id: &str) -> Option<Device> {
        let mut device = (**self.devices.get(id)?).clone();
        for (_, patch) in self.desired.iter().filter(|(d, _)| d == id) {
            if let Ok(p) = parse_object("desired", patch) {
                merge_into(&mut device, &p);
            }
        }
        Some(device)
    }
}

/// Merge a patch into desired state (for reads within the command; the
/// replica redoes it with metadata at commit).
fn merge_into(device: &mut Device, patch: &serde_json::Map<String, serde_json::Value>) {
    for (k, v) in patch {
        if v.is_null() {
            device.desired.remove(k);
        } else {
            device.desired.insert(k.clone(), crate::replica::devices::canonical(v));
        }
    }
}

impl Host for HostState {
    fn get(&mut self, id: String) -> wasmtime::Result<Option<String>> {
        let doc = self.device_now(&id).map(|d| d.document().to_string());
        self.charge(id.len() + doc.as_ref().map_or(0, String::len), 0)?;
        Ok(doc)
    }

    fn list_ids(&mut self, prefix: String, limit: u32) -> wasmtime::Result<Vec<String>> {
        let limit = (limit as usize).min(super::MAX_SCAN_ENTRIES);
        let ids: Vec<String> = list(&self.devices, &prefix, limit).iter().map(|d| d.spec.id.clone()).collect();
        self.charge(prefix.len() + ids.iter().map(String::len).sum::<usize>(), ids.len())?;
        Ok(ids)
    }

    fn set_desired(&mut self, id: String, patch: String) -> wasmtime::Result<Result<(), HostError>> {
        self.charge(id.len() + patch.len(), 0)?;
        if self.read_only {
            return Ok(Err(HostError::ReadOnly));
        }
        if self.desired.len() >= MAX_DESIRED_PATCHES {
            return Ok(Err(HostError::LimitExceeded(format!(
                "a command may set desired state at most {MAX_DESIRED_PATCHES} times"
            ))));
        }
        let parsed = match parse_object("desired patch", &patch) {
            Ok(p) => p,
            Err(e) => return Ok(Err(HostError::LimitExceeded(e.to_string()))),
        };
        let Some(mut device) = self.device_now(&id) else {
            return Ok(Err(HostError::LimitExceeded(format!("no device `{id}`"))));
        };
        merge_into(&mut device, &parsed);
        let size = device.document_bytes().len();
        if size > MAX_DEVICE_BYTES {
            return Ok(Err(HostError::LimitExceeded(format!(
                "device {id} would be {size} bytes, over the cap of {MAX_DEVICE_BYTES}"
            ))));
        }
        self.desired.push((id, patch));
        Ok(Ok(()))
    }
}
