//! Runtime stage: runs command handlers, deterministically.
//!
//! In: component bytes (once per plugin version, [`Runtime::load`]), then per
//! committed entry its [`Context`], the command and a [`StateView`] of the
//! plugin's namespace. Out: an [`Outcome`] — output or a typed
//! [`CommandError`], fuel used, buffered writes and events — that the apply
//! stage commits (writes only on success) and folds into the state digest.
//!
//! Each command gets a fresh store and instance from a pre-linked
//! [`bindings::CommandHandlerPre`] on the pooling allocator, so no guest
//! memory survives from one command to the next; fuel, not time, bounds it.

mod bindings;
mod engine;
mod error;
mod host;

use std::collections::BTreeSet;

use sha2::Digest as _;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store, Trap};

pub use engine::{EngineFingerprint, MAX_MEMORY_CEILING, MAX_WASM_STACK, PluginLimits, WASMTIME_VERSION};
pub use error::{CommandError, LoadError};
pub use host::LogLine;

use crate::state::{Effects, Event, StateView, WriteSet};
use bindings::{CommandHandler, CommandHandlerPre, GuestError};
pub use host::DeviceMap;
use host::HostState;

/// The `synod:plugin` version this host implements. Components built
/// against any `0.1.x` load.
pub const WIT_VERSION: &str = "0.1.1";

/// Interfaces a command handler may import (`types` carries only types).
const ALLOWED_IMPORTS: [&str; 6] = ["types", "state", "events", "log", "random", "devices"];

/// Default largest component accepted, in bytes.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;

/// Where and when a command runs: all of it from the log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// Log index of the entry.
    pub index: u64,
    /// Raft term of the entry.
    pub term: u64,
    /// Leader-assigned Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// Who sent the command.
    pub caller: String,
}

/// What a plugin declared about itself in `describe`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PluginInfo {
    /// Commands `handle` accepts.
    pub commands: BTreeSet<String>,
    /// Names `query` accepts.
    pub queries: BTreeSet<String>,
}

/// The result of running one command or query.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The handler's output, or why there is none.
    pub result: Result<Vec<u8>, CommandError>,
    /// Fuel consumed, instantiation included.
    pub fuel_used: u64,
    /// Writes to commit; empty unless `result` is `Ok`.
    pub writes: WriteSet,
    /// Events to publish; empty unless `result` is `Ok`.
    pub events: Vec<Event>,
    /// Plugin log lines (kept even when the command failed: they explain it).
    pub logs: Vec<LogLine>,
    /// Log lines dropped past the per-command bound.
    pub logs_dropped: u32,
    /// Desired-state patches to commit (device id, JSON object); empty
    /// unless `result` is `Ok`.
    pub desired: Vec<(String, String)>,
}

impl Outcome {
    /// The part every node must agree on, for the digest.
    pub fn effects(&self) -> Effects {
        Effects {
            result: self.result.clone().map_err(|e| e.to_string()),
            writes: self.writes.clone(),
            events: self.events.clone(),
            fuel_used: self.fuel_used,
        }
    }
}

/// The engine and linker shared by every plugin on a node.
pub struct Runtime {
    /// Configured once for determinism (see [`engine`]).
    engine: Engine,
    /// Host interfaces, linked once; each plugin pre-instantiates against it.
    linker: Linker<HostState>,
    /// What this node tells peers about its engine.
    fingerprint: EngineFingerprint,
    /// Largest component `load` accepts.
    max_component_bytes: usize,
}

/// Why the runtime itself could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the wasm runtime: {reason}")]
pub struct RuntimeError {
    /// wasmtime's explanation (e.g. no virtual memory for the pool).
    pub reason: String,
}

impl Runtime {
    /// Build the engine and link the host interfaces.
    pub fn new() -> Result<Self, RuntimeError> {
        let err = |e: wasmtime::Error| RuntimeError { reason: format!("{e:?}") };
        let (engine, fingerprint) = engine::build_engine().map_err(err)?;
        let mut linker = Linker::new(&engine);
        CommandHandler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(err)?;
        Ok(Self { engine, linker, fingerprint, max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES })
    }

    /// Change the largest component [`Runtime::load`] accepts.
    pub fn with_max_component_bytes(mut self, bytes: usize) -> Self {
        self.max_component_bytes = bytes;
        self
    }

    /// The engine fingerprint peers compare.
    pub fn fingerprint(&self) -> &EngineFingerprint {
        &self.fingerprint
    }

    /// Validate and compile a command-handler component, ready to run.
    pub fn load(&self, bytes: &[u8], limits: PluginLimits) -> Result<Plugin, LoadError> {
        self.check_bytes(bytes, &limits)?;
        let component =
            Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile { reason: format!("{e:#}") })?;
        self.finish(component, sha2::Sha256::digest(bytes).into(), limits)
    }

    /// Validate and compile `bytes` to this engine's native artifact, for a
    /// compile cache ([`Runtime::load_precompiled`] loads it back).
    pub fn precompile(&self, bytes: &[u8], limits: &PluginLimits) -> Result<Vec<u8>, LoadError> {
        self.check_bytes(bytes, limits)?;
        let component =
            Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile { reason: format!("{e:#}") })?;
        self.check_world(&component)?;
        component.serialize().map_err(|e| LoadError::Compile { reason: format!("{e:#}") })
    }

    /// Load an artifact made by [`Runtime::precompile`] on an engine with
    /// this fingerprint; `sha256` is that of the original component.
    ///
    /// # Safety
    ///
    /// `artifact` must come from [`Runtime::precompile`] of a node with the
    /// same engine fingerprint and must not have been tampered with: wasmtime
    /// checks its header, not its code. Keep such artifacts in a directory
    /// only this node writes.
    pub unsafe fn load_precompiled(
        &self,
        artifact: &[u8],
        sha256: [u8; 32],
        limits: PluginLimits,
    ) -> Result<Plugin, LoadError> {
        check_limits(&limits)?;
        // SAFETY: the caller guarantees the artifact's origin (see above).
        let component = unsafe { Component::deserialize(&self.engine, artifact) }
            .map_err(|e| LoadError::Compile { reason: format!("{e:#}") })?;
        self.finish(component, sha256, limits)
    }

    /// The checks that need no compiling: size, magic, a component (not a
    /// core module), limits within the engine's ceilings.
    pub fn check_bytes(&self, bytes: &[u8], limits: &PluginLimits) -> Result<(), LoadError> {
        if bytes.len() > self.max_component_bytes {
            return Err(LoadError::TooLarge { size: bytes.len(), limit: self.max_component_bytes });
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm);
        }
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(LoadError::CoreModule);
        }
        check_limits(limits)
    }

    fn finish(&self, component: Component, sha256: [u8; 32], limits: PluginLimits) -> Result<Plugin, LoadError> {
        self.check_world(&component)?;
        let pre =
            self.linker.instantiate_pre(&component).map_err(|e| LoadError::Mismatch { reason: format!("{e:#}") })?;
        let pre = CommandHandlerPre::new(pre).map_err(|e| LoadError::Mismatch { reason: format!("{e:#}") })?;
        let mut plugin = Plugin { pre, engine: self.engine.clone(), limits, info: PluginInfo::default(), sha256 };
        plugin.info = plugin.describe().map_err(LoadError::Describe)?;
        for name in &plugin.info.commands {
            crate::state::check_name("command", name)?;
        }
        for name in &plugin.info.queries {
            crate::state::check_name("query", name)?;
        }
        Ok(plugin)
    }

    /// The component must export `synod:plugin/handler` of a compatible
    /// version and import nothing but the command-handler interfaces.
    fn check_world(&self, component: &Component) -> Result<(), LoadError> {
        let ty = component.component_type();
        let exports: Vec<&str> = ty.exports(&self.engine).map(|(name, _)| name).collect();
        let handler = exports.iter().find_map(|name| name.strip_prefix("synod:plugin/handler@"));
        match handler {
            None => {
                let exports = if exports.is_empty() { "nothing".into() } else { exports.join(", ") };
                return Err(LoadError::WrongWorld { exports });
            }
            Some(version) if !compatible(version) => {
                return Err(LoadError::IncompatibleVersion {
                    found: version.to_owned(),
                    supported: WIT_VERSION.to_owned(),
                });
            }
            Some(_) => {}
        }
        for (name, _) in ty.imports(&self.engine) {
            let allowed = name
                .strip_prefix("synod:plugin/")
                .and_then(|rest| rest.split_once('@'))
                .is_some_and(|(iface, version)| ALLOWED_IMPORTS.contains(&iface) && compatible(version));
            if !allowed {
                return Err(LoadError::UnsupportedImport { name: name.to_owned() });
            }
        }
        Ok(())
    }
}

/// Same rule as cargo's for 0.x: major and minor must match.
pub(crate) fn compatible(version: &str) -> bool {
    let mine: Vec<&str> = WIT_VERSION.split('.').collect();
    let theirs: Vec<&str> = version.split('.').collect();
    theirs.len() == 3 && theirs[0] == mine[0] && theirs[1] == mine[1]
}

fn check_limits(limits: &PluginLimits) -> Result<(), LoadError> {
    if limits.memory_bytes > MAX_MEMORY_CEILING {
        return Err(LoadError::Limits {
            reason: format!("memory_bytes {} is over this node's ceiling of {MAX_MEMORY_CEILING}", limits.memory_bytes),
        });
    }
    if limits.fuel == 0 {
        return Err(LoadError::Limits { reason: "fuel must be greater than 0".into() });
    }
    Ok(())
}

/// One compiled plugin version, ready to run commands.
pub struct Plugin {
    /// Linked once; instantiated afresh for every command.
    pre: CommandHandlerPre<HostState>,
    /// The engine `pre` belongs to.
    engine: Engine,
    /// Bounds for every command of this plugin.
    limits: PluginLimits,
    /// What `describe` returned when it was loaded.
    info: PluginInfo,
    /// sha256 of the component bytes: its content address.
    sha256: [u8; 32],
}

impl Plugin {
    /// The commands and queries this plugin declared.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The limits every command runs under.
    pub fn limits(&self) -> &PluginLimits {
        &self.limits
    }

    /// sha256 of the component, lower-case hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Apply one committed command. Deterministic: the same inputs give the
    /// same [`Outcome`] on every node.
    pub fn handle(
        &self,
        ctx: &Context,
        command: &str,
        payload: &[u8],
        view: Box<dyn StateView>,
        devices: DeviceMap,
    ) -> Outcome {
        if !self.info.commands.contains(command) {
            return Outcome::failed(CommandError::UnknownCommand { name: command.to_owned() });
        }
        let cmd = bindings::Command { name: command.to_owned(), payload: payload.to_vec() };
        self.run(ctx, false, view, devices, move |guest, store| {
            guest.synod_plugin_handler().call_handle(store, &wit_ctx(ctx), &cmd)
        })
    }

    /// Answer a read-only query; writes and events are refused to the guest.
    pub fn query(
        &self,
        ctx: &Context,
        name: &str,
        payload: &[u8],
        view: Box<dyn StateView>,
        devices: DeviceMap,
    ) -> Outcome {
        if !self.info.queries.contains(name) {
            return Outcome::failed(CommandError::UnknownQuery { name: name.to_owned() });
        }
        self.run(ctx, true, view, devices, move |guest, store| {
            guest.synod_plugin_handler().call_query(store, &wit_ctx(ctx), name, payload)
        })
    }

    fn describe(&self) -> Result<PluginInfo, CommandError> {
        let ctx = Context { index: 0, term: 0, timestamp_ms: 0, caller: "synod".into() };
        let mut info = PluginInfo::default();
        let empty = DeviceMap::default();
        let outcome = self.run(&ctx, true, Box::new(crate::state::Namespace::default()), empty, |guest, store| {
            let described = guest.synod_plugin_handler().call_describe(store)?;
            info.commands = described.commands.into_iter().collect();
            info.queries = described.queries.into_iter().collect();
            Ok(Ok(Vec::new()))
        });
        outcome.result.map(|_| info)
    }

    fn run(
        &self,
        ctx: &Context,
        read_only: bool,
        view: Box<dyn StateView>,
        devices: DeviceMap,
        call: impl FnOnce(&CommandHandler, &mut Store<HostState>) -> wasmtime::Result<Result<Vec<u8>, GuestError>>,
    ) -> Outcome {
        let state = HostState::new(self.limits, read_only, view, devices, (ctx.index, ctx.term));
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        let started = std::time::Instant::now();
        let returned =
            store.set_fuel(self.limits.fuel).and_then(|()| self.pre.instantiate(&mut store)).and_then(|guest| {
                crate::metrics::get().instantiate_seconds.observe(started.elapsed().as_secs_f64());
                call(&guest, &mut store)
            });
        let wasm_fuel = self.limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let data = store.into_data();
        // One budget for both: what the wasm ran and what host calls moved.
        let spent = wasm_fuel.saturating_add(data.host_fuel);
        let fuel_used = spent.min(self.limits.fuel);
        let result = match returned {
            Ok(_) if spent > self.limits.fuel => Err(CommandError::OutOfFuel { limit: self.limits.fuel }),
            Ok(Ok(output)) => self.check_size(output),
            Ok(Err(guest)) => Err(self.guest_error(guest)),
            Err(trap) => Err(self.classify(trap, &data)),
        };
        let ok = result.is_ok();
        Outcome {
            result,
            fuel_used,
            writes: if ok { data.writes } else { WriteSet::default() },
            events: if ok { data.events } else { Vec::new() },
            logs: data.logs,
            logs_dropped: data.logs_dropped,
            desired: if ok { data.desired } else { Vec::new() },
        }
    }

    fn check_size(&self, output: Vec<u8>) -> Result<Vec<u8>, CommandError> {
        if output.len() > self.limits.output_bytes {
            return Err(CommandError::OutputTooLarge { size: output.len(), limit: self.limits.output_bytes });
        }
        Ok(output)
    }

    fn guest_error(&self, error: GuestError) -> CommandError {
        let message = match &error {
            GuestError::InvalidInput(m) | GuestError::Rejected(m) | GuestError::Internal(m) => m,
        };
        if message.len() > self.limits.output_bytes {
            return CommandError::OutputTooLarge { size: message.len(), limit: self.limits.output_bytes };
        }
        match error {
            GuestError::InvalidInput(message) => CommandError::InvalidInput { message },
            GuestError::Rejected(message) => CommandError::Rejected { message },
            GuestError::Internal(message) => CommandError::Internal { message },
        }
    }

    /// Name a failed call. Only storage faults and pool exhaustion are local
    /// to this node; everything else happened identically everywhere.
    fn classify(&self, error: wasmtime::Error, data: &HostState) -> CommandError {
        if let Some(reason) = &data.host_failure {
            return CommandError::Host { reason: reason.clone() };
        }
        if error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
            return CommandError::Host { reason: format!("{error:#}") };
        }
        if data.host_out_of_fuel {
            return CommandError::OutOfFuel { limit: self.limits.fuel };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => CommandError::OutOfFuel { limit: self.limits.fuel },
            Some(Trap::StackOverflow) => CommandError::StackOverflow,
            _ if data.memory.denied => CommandError::OutOfMemory { limit: self.limits.memory_bytes },
            Some(trap) => {
                // A Rust plugin's panic aborts with `unreachable`; the SDK's
                // panic hook logged why just before.
                let panic = data.logs.iter().rev().find_map(|l| l.message.strip_prefix("panicked: "));
                match panic {
                    Some(why) => CommandError::Trap { message: format!("plugin panicked: {why}") },
                    None => CommandError::Trap { message: trap.to_string() },
                }
            }
            // Not a wasm trap but the guest broke the canonical ABI (invalid
            // UTF-8 in a string, bad variant tag): still deterministic.
            None => CommandError::Trap { message: format!("{error:#}") },
        }
    }
}

impl Outcome {
    /// An outcome that never reached the guest.
    pub fn failed(error: CommandError) -> Self {
        Outcome {
            result: Err(error),
            fuel_used: 0,
            writes: WriteSet::default(),
            events: Vec::new(),
            logs: Vec::new(),
            logs_dropped: 0,
            desired: Vec::new(),
        }
    }
}

fn wit_ctx(ctx: &Context) -> bindings::CommandContext {
    bindings::CommandContext {
        index: ctx.index,
        term: ctx.term,
        timestamp_ms: ctx.timestamp_ms,
        caller: ctx.caller.clone(),
    }
}
