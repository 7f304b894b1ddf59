//! The store data of one command, and the host side of each WIT interface
//! (one file per interface).
//!
//! In: a [`StateView`] of the plugin's namespace and the entry's context.
//! Out: what the guest did through the host: buffered writes, events, log
//! lines, and whether it hit the memory limit.

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
}

impl HostState {
    pub(super) fn new(
        limits: PluginLimits,
        read_only: bool,
        view: Box<dyn StateView>,
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
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
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
