//! `synod:plugin/state`: the plugin's namespace, reads through buffered
//! writes.

use super::HostState;
use crate::runtime::bindings::{HostError, synod::plugin::state::Host};

impl HostState {
    fn check_write(&self, key: &str, value_len: usize) -> Result<(), HostError> {
        let l = &self.limits;
        if self.read_only {
            return Err(HostError::ReadOnly);
        }
        if key.len() > l.max_key_bytes {
            return Err(HostError::LimitExceeded(format!(
                "key is {} bytes, over the limit of {}",
                key.len(),
                l.max_key_bytes
            )));
        }
        if value_len > l.max_value_bytes {
            return Err(HostError::LimitExceeded(format!(
                "value is {value_len} bytes, over the limit of {}",
                l.max_value_bytes
            )));
        }
        if self.writes.lookup(key).is_none() && self.writes.len() >= l.max_writes {
            return Err(HostError::LimitExceeded(format!("a command may write at most {} keys", l.max_writes)));
        }
        if self.write_bytes + key.len() + value_len > l.max_write_bytes {
            return Err(HostError::LimitExceeded(format!("a command may write at most {} bytes", l.max_write_bytes)));
        }
        Ok(())
    }

    /// A storage fault: record it (the outcome becomes non-deterministic)
    /// and trap.
    fn storage_fault(&mut self, e: crate::state::StateReadError) -> wasmtime::Error {
        let msg = e.to_string();
        self.host_failure = Some(msg.clone());
        wasmtime::Error::msg(msg)
    }
}

impl Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let value = match self.writes.lookup(&key) {
            Some(buffered) => buffered.map(<[u8]>::to_vec),
            None => self.view.get(&key).map_err(|e| self.storage_fault(e))?,
        };
        self.charge(key.len() + value.as_ref().map_or(0, Vec::len), 0)?;
        Ok(value)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), HostError>> {
        self.charge(key.len() + value.len(), 0)?;
        if let Err(e) = self.check_write(&key, value.len()) {
            return Ok(Err(e));
        }
        self.write_bytes += key.len() + value.len();
        self.writes.set(key, value);
        Ok(Ok(()))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), HostError>> {
        self.charge(key.len(), 0)?;
        if let Err(e) = self.check_write(&key, 0) {
            return Ok(Err(e));
        }
        self.write_bytes += key.len();
        self.writes.delete(key);
        Ok(Ok(()))
    }

    fn scan(&mut self, prefix: String, limit: u32) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        // A hard ceiling whatever the guest asks for, and a byte budget of
        // the fuel left: `scan("", u32::MAX)` over a large namespace ends
        // in out-of-fuel or a bounded result, never unbounded copying.
        let limit = (limit as usize).min(super::MAX_SCAN_ENTRIES);
        self.charge(prefix.len(), 0)?;
        // Base entries this command deleted drop out of the result, so read
        // that many more from the base to still fill `limit`.
        let deleted = self.writes.range_prefix(&prefix).filter(|(_, v)| v.is_none()).count();
        let budget = usize::try_from(self.host_fuel_left()).unwrap_or(usize::MAX);
        let base = match self.view.scan(&prefix, limit.saturating_add(deleted), budget) {
            Ok((base, false)) => base,
            Ok((_, true)) => {
                self.host_out_of_fuel = true;
                return Err(wasmtime::Error::msg("out of fuel in a host call"));
            }
            Err(e) => return Err(self.storage_fault(e)),
        };
        let mut merged: std::collections::BTreeMap<String, Vec<u8>> = base.into_iter().collect();
        for (key, value) in self.writes.range_prefix(&prefix) {
            match value {
                Some(v) => {
                    merged.insert(key.to_owned(), v.to_vec());
                }
                None => {
                    merged.remove(key);
                }
            }
        }
        let out: Vec<(String, Vec<u8>)> = merged.into_iter().take(limit).collect();
        let bytes = out.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.charge(bytes, out.len())?;
        Ok(out)
    }
}
