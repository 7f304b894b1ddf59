//! The store data of one command, and the host side of each WIT interface
//! (one file per interface).
//!
//! In: a [`StateView`] of the plugin's namespace and the entry's context.
//! Out: what the guest did through the host: buffered writes, events, log
//! lines, and whether it hit the memory limit.

mod devices;
pub use devices::MAX_DESIRED_PATCHES;
mod events;
mod log;
mod random;
mod state;

use wasmtime::ResourceLimiter;

use super::engine::PluginLimits;
use crate::state::{Event, StateView, WriteSet};

pub use log::LogLine;

/// Everything a running command can reach. Dropped with its store after the
/// command, so nothing survives into the next one.
pub struct HostState {
    /// Bounds for this plugin.
    pub(super) limits: PluginLimits,
    /// Queries may read but not write or emit.
    pub(super) read_only: bool,
    /// The plugin's namespace as of the entry being applied.
    pub(super) view: Box<dyn StateView>,
    /// Writes buffered until the handler returns `ok`.
    pub(super) writes: WriteSet,
    /// Key + value bytes written so far (bounded by `max_write_bytes`).
    pub(super) write_bytes: usize,
    /// Events emitted so far.
    pub(super) events: Vec<Event>,
    /// Plugin log lines kept so far.
    pub(super) logs: Vec<LogLine>,
    /// Lines past `max_log_lines`, counted so the operator knows.
    pub(super) logs_dropped: u32,
    /// The entry's deterministic random stream.
    pub(super) rng: blake3::OutputReader,
    /// Memory bound; remembers a denied growth to name out-of-memory traps.
    pub(super) memory: MemoryLimiter,
    /// A local fault during a host call (storage); makes the outcome
    /// non-deterministic so it is not committed.
    pub(super) host_failure: Option<String>,
    /// Fuel host calls charged for the bytes they moved (see
    /// [`HOST_CALL_FUEL`]); added to the wasm fuel used, within one budget.
    pub(super) host_fuel: u64,
    /// A host call found the budget spent: the trap that follows is out of
    /// fuel.
    pub(super) host_out_of_fuel: bool,
    /// Device shadows as of the entry.
    pub(super) devices: DeviceMap,
    /// Desired-state patches buffered until the handler returns `ok`:
    /// (device id, JSON object).
    pub(super) desired: Vec<(String, String)>,
}

/// Every device shadow, shared with the replica (copy-on-write).
pub type DeviceMap =
    std::sync::Arc<std::collections::BTreeMap<String, std::sync::Arc<crate::replica::devices::Device>>>;

/// Fuel every host call costs besides its bytes.
pub const HOST_CALL_FUEL: u64 = 64;
/// Fuel per byte a host call moves between the guest and the state (keys,
/// values, event payloads, in and out).
pub const HOST_BYTE_FUEL: u64 = 1;
/// Fuel per entry a `scan` returns, besides its bytes.
pub const SCAN_ENTRY_FUEL: u64 = 16;
/// Most entries one `scan` call returns, whatever `limit` it asks for.
pub const MAX_SCAN_ENTRIES: usize = 65_536;

impl HostState {
    /// Fuel still unspent by host calls (wasm fuel is metered separately
    /// and the two are summed against the one budget afterwards).
    pub(super) fn host_fuel_left(&self) -> u64 {
        self.limits.fuel.saturating_sub(self.host_fuel)
    }

    /// Charge a host call for `bytes` moved (and `entries` returned):
    /// traps as out of fuel once host calls alone spent the budget, so no
    /// host call can do unbounded work for free.
    pub(super) fn charge(&mut self, bytes: usize, entries: usize) -> wasmtime::Result<()> {
        let cost = HOST_CALL_FUEL
            .saturating_add((bytes as u64).saturating_mul(HOST_BYTE_FUEL))
            .saturating_add((entries as u64).saturating_mul(SCAN_ENTRY_FUEL));
        self.host_fuel = self.host_fuel.saturating_add(cost);
        if self.host_fuel > self.limits.fuel {
            self.host_out_of_fuel = true;
            return Err(wasmtime::Error::msg("out of fuel in a host call"));
        }
        Ok(())
    }
}

impl HostState {
    pub(super) fn new(
        limits: PluginLimits,
        read_only: bool,
        view: Box<dyn StateView>,
        devices: DeviceMap,
        seed: (u64, u64),
    ) -> Self {
        Self {
            limits,
            read_only,
            view,
            writes: WriteSet::default(),
            write_bytes: 0,
            events: Vec::new(),
            logs: Vec::new(),
            logs_dropped: 0,
            rng: random::stream(seed.0, seed.1),
            memory: MemoryLimiter { limit: limits.memory_bytes, denied: false },
            host_failure: None,
            host_fuel: 0,
            host_out_of_fuel: false,
            devices,
            desired: Vec::new(),
        }
    }
}

impl super::bindings::synod::plugin::types::Host for HostState {}

/// Caps linear memory at the plugin's limit.
pub struct MemoryLimiter {
    /// Bytes an instance's memory may reach.
    limit: usize,
    /// A growth was refused: a trap that follows is reported as out of
    /// memory rather than as the guest's own abort.
    pub(super) denied: bool,
}

/// Table elements an instance may have; generous, tables hold functions.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub(super) fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
