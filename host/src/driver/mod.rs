//! Device drivers: WebAssembly components of world `device-driver`, run on
//! the node that owns a device.
//!
//! In: a driver component's bytes, a device (id, profile, grants) and the
//! node's fence (its ownership lease). Out: a [`DriverInstance`] whose
//! `init`, `poll` and `actuate` each run within a deadline, and what the
//! driver said through its sink ([`SinkItem`]: telemetry, reports, log
//! lines).
//!
//! Drivers run on an engine of their own — epoch interruption, async host
//! calls, no fuel — never on the fingerprinted command-handler engine, whose
//! settings decide replicated results. A driver reaches nothing but the
//! capabilities the host opens from the device's grants (see [`io`]): the
//! world has no other imports, and an endpoint that is not granted is an
//! error value. Every host I/O has its own timeout and every call a
//! deadline enforced twice: epochs stop a guest that spins, and a timer
//! around the call stops one stuck in a host await (epochs do not bound
//! those). A call that misses its deadline or traps leaves the instance
//! unusable; the caller drops it and instantiates afresh.

pub mod io;

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

use crate::runtime::LoadError;
use io::{Fence, Grants};

/// Generated bindings for the `device-driver` world.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "synod:plugin/device-driver",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "synod:plugin/modbus.client": super::io::ModbusClient,
            "synod:plugin/tcp.connection": super::io::TcpConnection,
        },
    });
}

use bindings::DeviceDriver;
use bindings::exports::synod::plugin::driver::Device as WitDevice;

/// How often the epoch ticks: the resolution of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Linear memory a driver instance may use.
pub const DRIVER_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Interfaces a driver may import.
const ALLOWED_IMPORTS: [&str; 4] = ["io-types", "modbus", "tcp", "sink"];

/// Sink entries one call may leave (more are dropped and counted).
const MAX_SINK_ITEMS: usize = 10_000;

/// What a driver said during one call.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkItem {
    /// A reading, for NATS `synod.tel.<device>.<metric>`.
    Telemetry {
        /// Metric name.
        metric: String,
        /// Value.
        value: f64,
        /// When it was read (Unix ms, this node's clock).
        ts_ms: u64,
    },
    /// Reported fields (a JSON object).
    Report(serde_json::Map<String, serde_json::Value>),
    /// A log line.
    Log {
        /// `trace` … `error`.
        level: &'static str,
        /// The line (cut at 1 KiB).
        message: String,
    },
}

/// Store data of one driver instance.
pub struct DriverState {
    /// Open capability handles.
    pub(crate) table: ResourceTable,
    /// What the device may reach.
    pub(crate) grants: Arc<Grants>,
    /// Timeout of every host I/O.
    pub(crate) io_timeout: Duration,
    /// Whether this node may still write to the device.
    pub(crate) fence: Arc<Fence>,
    /// Sink entries of the current call.
    pub(crate) sink: Vec<SinkItem>,
    /// Sink entries dropped past the bound.
    pub(crate) dropped: u64,
    /// Memory bound.
    limits: StoreLimits,
}

/// The driver engine and the host interfaces, linked once per node.
pub struct DriverRuntime {
    engine: Engine,
    linker: Linker<DriverState>,
    ticker: Arc<Ticker>,
}

/// The epoch ticker's switch: it ticks only while some driver code may be
/// running (an instantiation or a call), and sleeps otherwise, so a node
/// without devices (or with idle ones) is not woken 200 times a second for
/// nothing. A deadline is counted in ticks from the moment it is set, which
/// is always inside a [`Busy`] span, so pausing between spans changes no
/// deadline.
struct Ticker {
    busy: std::sync::atomic::AtomicUsize,
    thread: std::sync::OnceLock<std::thread::Thread>,
    /// Ticks so far (for tests).
    ticks: std::sync::atomic::AtomicU64,
}

impl Ticker {
    /// Mark driver code as running until the guard drops; wakes the ticker.
    fn busy(self: &Arc<Self>) -> Busy {
        if self.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
        Busy(self.clone())
    }

    fn idle(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst) == 0
    }
}

/// See [`Ticker::busy`].
struct Busy(Arc<Ticker>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Why a driver call did not return normally.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The driver returned an error value.
    #[error("driver error: {0}")]
    Driver(String),
    /// The call ran past its deadline (spinning, or waiting on I/O).
    #[error("driver call `{call}` missed its deadline of {deadline:?}")]
    Deadline {
        /// Which export.
        call: &'static str,
        /// The deadline.
        deadline: Duration,
    },
    /// The driver trapped.
    #[error("driver trapped in `{call}`: {message}")]
    Trap {
        /// Which export.
        call: &'static str,
        /// wasmtime's description.
        message: String,
    },
}

impl CallError {
    /// Whether the instance is unusable after this error (a trap or a
    /// missed deadline); a driver error value leaves it usable.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CallError::Driver(_))
    }
}

impl DriverRuntime {
    /// Build the driver engine and start its epoch ticker.
    pub fn new() -> Result<Arc<DriverRuntime>, crate::runtime::RuntimeError> {
        let err = |e: wasmtime::Error| crate::runtime::RuntimeError { reason: format!("{e:?}") };
        let mut config = Config::new();
        config.epoch_interruption(true).consume_fuel(false).max_wasm_stack(512 * 1024).wasm_backtrace_max_frames(None);
        let engine = Engine::new(&config).map_err(err)?;
        let mut linker = Linker::new(&engine);
        DeviceDriver::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(err)?;
        let weak = engine.weak();
        let ticker =
            Arc::new(Ticker { busy: Default::default(), thread: Default::default(), ticks: Default::default() });
        let switch = ticker.clone();
        let thread = std::thread::Builder::new()
            .name("synod-driver-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    if switch.idle() {
                        drop(engine);
                        // Woken by the next `busy`; the timeout only lets
                        // the thread notice that the engine is gone.
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                    engine.increment_epoch();
                    switch.ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| crate::runtime::RuntimeError { reason: format!("epoch thread: {e}") })?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(Arc::new(DriverRuntime { engine, linker, ticker }))
    }

    /// Compile and link a driver component. Refused like a command handler
    /// is: not a component, another world, an import outside the driver
    /// world.
    pub fn compile(&self, bytes: &[u8]) -> Result<DriverComponent, LoadError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm);
        }
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(LoadError::CoreModule);
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile { reason: format!("{e:#}") })?;
        check_world(&self.engine, &component)?;
        let pre =
            self.linker.instantiate_pre(&component).map_err(|e| LoadError::Mismatch { reason: format!("{e:#}") })?;
        let pre = bindings::DeviceDriverPre::new(pre).map_err(|e| LoadError::Mismatch { reason: format!("{e:#}") })?;
        Ok(DriverComponent { pre, engine: self.engine.clone(), ticker: self.ticker.clone() })
    }
}

/// Whether `bytes` is a driver (exports `synod:plugin/driver`), judged from
/// the component's export names without compiling it.
pub fn is_driver(bytes: &[u8]) -> bool {
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(wasmparser::Payload::ModuleSection { .. } | wasmparser::Payload::ComponentSection { .. }) => depth += 1,
            Ok(wasmparser::Payload::End(_)) => depth = depth.saturating_sub(1),
            Ok(wasmparser::Payload::ComponentExportSection(exports)) if depth == 0 => {
                for export in exports.into_iter().flatten() {
                    if export.name.name.starts_with("synod:plugin/driver@") {
                        return true;
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

fn check_world(engine: &Engine, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    match exports.iter().find_map(|name| name.strip_prefix("synod:plugin/driver@")) {
        None => {
            let exports = if exports.is_empty() { "nothing".into() } else { exports.join(", ") };
            return Err(LoadError::WrongWorld { exports });
        }
        Some(version) if !crate::runtime::compatible(version) => {
            return Err(LoadError::IncompatibleVersion {
                found: version.to_owned(),
                supported: crate::runtime::WIT_VERSION.to_owned(),
            });
        }
        Some(_) => {}
    }
    for (name, _) in ty.imports(engine) {
        let allowed = name
            .strip_prefix("synod:plugin/")
            .and_then(|rest| rest.split_once('@'))
            .is_some_and(|(iface, version)| ALLOWED_IMPORTS.contains(&iface) && crate::runtime::compatible(version));
        if !allowed {
            return Err(LoadError::UnsupportedImport { name: name.to_owned() });
        }
    }
    Ok(())
}

/// A compiled, linked driver.
pub struct DriverComponent {
    pre: bindings::DeviceDriverPre<DriverState>,
    engine: Engine,
    ticker: Arc<Ticker>,
}

/// What a driver instance needs from its device.
#[derive(Debug, Clone)]
pub struct DeviceSetup {
    /// Device id.
    pub id: String,
    /// Profile JSON.
    pub profile: String,
    /// Grants, as written in the definition.
    pub grants: Vec<String>,
    /// Timeout of every host I/O.
    pub io_timeout: Duration,
}

/// One live driver instance for one device. Calls take `&mut self`: one
/// request in flight per device.
pub struct DriverInstance {
    store: Store<DriverState>,
    guest: DeviceDriver,
    ticker: Arc<Ticker>,
}

impl DriverComponent {
    /// A fresh instance for `device` (nothing called yet).
    pub async fn instantiate(&self, device: &DeviceSetup, fence: Arc<Fence>) -> Result<DriverInstance, CallError> {
        let state = DriverState {
            table: ResourceTable::new(),
            grants: Arc::new(Grants::parse(&device.grants)),
            io_timeout: device.io_timeout,
            fence,
            sink: Vec::new(),
            dropped: 0,
            limits: StoreLimitsBuilder::new().memory_size(DRIVER_MEMORY_BYTES).instances(64).build(),
        };
        let _busy = self.ticker.busy();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(Duration::from_secs(5)));
        let guest = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| CallError::Trap { call: "instantiate", message: format!("{e:#}") })?;
        Ok(DriverInstance { store, guest, ticker: self.ticker.clone() })
    }
}

fn ticks(deadline: Duration) -> u64 {
    (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

impl DriverInstance {
    /// Run one export within `deadline`.
    async fn call<T>(
        &mut self,
        call: &'static str,
        deadline: Duration,
        f: impl AsyncFnOnce(&DeviceDriver, &mut Store<DriverState>) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, CallError> {
        let _busy = self.ticker.busy();
        self.store.set_epoch_deadline(ticks(deadline));
        let started = Instant::now();
        let DriverInstance { store, guest, .. } = self;
        let result = match tokio::time::timeout(deadline, f(guest, store)).await {
            Err(_) => Err(CallError::Deadline { call, deadline }),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(CallError::Driver(e)),
            Ok(Err(trap)) => {
                if trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                    tracing::debug!(elapsed = ?started.elapsed(), "driver interrupted");
                    Err(CallError::Deadline { call, deadline })
                } else {
                    Err(CallError::Trap { call, message: format!("{trap:#}") })
                }
            }
        };
        let m = crate::metrics::get();
        let op = crate::metrics::DriverLabels { op: call.into() };
        m.driver_seconds.get_or_create(&op).observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            m.driver_errors.get_or_create(&op).inc();
        }
        result
    }

    /// `init(device)`: the poll interval the driver asks for.
    pub async fn init(&mut self, device: &DeviceSetup, deadline: Duration) -> Result<Duration, CallError> {
        let wit = WitDevice { id: device.id.clone(), profile: device.profile.clone(), grants: device.grants.clone() };
        let ms = self.call("init", deadline, async |g, s| g.synod_plugin_driver().call_init(s, &wit).await).await?;
        Ok(Duration::from_millis(u64::from(ms)))
    }

    /// `poll()`.
    pub async fn poll(&mut self, deadline: Duration) -> Result<(), CallError> {
        self.call("poll", deadline, async |g, s| g.synod_plugin_driver().call_poll(s).await).await
    }

    /// `actuate(version, delta)`.
    pub async fn actuate(&mut self, version: u64, delta: &str, deadline: Duration) -> Result<(), CallError> {
        self.call("actuate", deadline, async |g, s| g.synod_plugin_driver().call_actuate(s, version, delta).await).await
    }

    /// What the driver said since the last call, and how many entries were
    /// dropped past the bound.
    pub fn take_sink(&mut self) -> (Vec<SinkItem>, u64) {
        let data = self.store.data_mut();
        (std::mem::take(&mut data.sink), std::mem::take(&mut data.dropped))
    }
}

impl DriverState {
    fn push(&mut self, item: SinkItem) {
        if self.sink.len() >= MAX_SINK_ITEMS {
            self.dropped += 1;
        } else {
            self.sink.push(item);
        }
    }
}

impl bindings::synod::plugin::sink::Host for DriverState {
    async fn telemetry(&mut self, metric: String, value: f64) -> wasmtime::Result<()> {
        let ok = !metric.is_empty()
            && metric.len() <= 64
            && metric.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok && value.is_finite() {
            self.push(SinkItem::Telemetry { metric, value, ts_ms: crate::node::now_ms() });
        } else {
            self.push(SinkItem::Log {
                level: "warn",
                message: format!(
                    "telemetry {metric:?} = {value} refused: a metric is 1-64 of a-z A-Z 0-9 _ - and a finite value"
                ),
            });
        }
        Ok(())
    }

    async fn report(&mut self, fields: String) -> wasmtime::Result<()> {
        match serde_json::from_str::<serde_json::Value>(&fields) {
            Ok(serde_json::Value::Object(m)) => self.push(SinkItem::Report(m)),
            _ => self.push(SinkItem::Log { level: "warn", message: "report refused: not a JSON object".into() }),
        }
        Ok(())
    }

    async fn log(&mut self, level: bindings::synod::plugin::sink::LogLevel, message: String) -> wasmtime::Result<()> {
        use bindings::synod::plugin::sink::LogLevel as L;
        let level = match level {
            L::Trace => "trace",
            L::Debug => "debug",
            L::Info => "info",
            L::Warn => "warn",
            L::Error => "error",
        };
        let mut message = message;
        if message.len() > 1024 {
            let mut cut = 1024;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        self.push(SinkItem::Log { level, message });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// The epoch ticker sleeps while no driver code runs, ticks while some
    /// does, and sleeps again after.
    #[test]
    fn the_epoch_ticks_only_while_driver_code_runs() {
        let runtime = DriverRuntime::new().expect("driver runtime");
        let ticker = runtime.ticker.clone();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ticker.ticks.load(Ordering::Relaxed), 0, "ticked with no driver code running");
        let busy = ticker.busy();
        std::thread::sleep(Duration::from_millis(200));
        let during = ticker.ticks.load(Ordering::Relaxed);
        assert!(during >= 5, "only {during} ticks in 200 ms of driver code");
        drop(busy);
        std::thread::sleep(Duration::from_millis(50));
        let after = ticker.ticks.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ticker.ticks.load(Ordering::Relaxed), after, "kept ticking after driver code stopped");
    }
}
