//! A Modbus TCP server simulating thermostatic rooms, each with a heater.
//!
//! In: Modbus TCP requests (function codes 1–6, 15, 16; every unit id sees the
//! same map) and, from the owner of the [`SimHandle`], time steps, faults and
//! temperature overrides. Out: register values computed from a deterministic
//! room model, exceptions, and counters a test can assert on.
//!
//! [`start`] binds and returns a [`SimHandle`]; [`run`] is the foreground
//! version behind `synod sim modbus`. The pieces, along a request's path:
//! `service` (TCP, faults) → `registers` (the map) → `room` (the physics).
//!
//! # Register map
//!
//! Room `k` (0-based) owns the addresses `k * BLOCK .. (k + 1) * BLOCK` in each
//! of the four tables, with [`BLOCK`] = 16. Within a block only these offsets
//! exist:
//!
//! | table            | offset | meaning                                       | access |
//! |------------------|--------|-----------------------------------------------|--------|
//! | input register   | 0      | temperature × 10, `i16` two's complement      | read   |
//! | input register   | 2, 3   | temperature, IEEE-754 `f32`, high word first  | read   |
//! | holding register | 0      | temperature × 10, as input register 0         | read   |
//! | holding register | 1      | heater power, percent 0..=100 (default 100)   | r/w    |
//! | coil             | 0      | heater on/off                                 | r/w    |
//! | discrete input   | 0      | heater feedback (mirrors the coil)            | read   |
//!
//! So 21.5 °C reads as `215` at input register `16k`, `0x41AC 0x0000` at
//! `16k + 2`; −3.2 °C reads as `0xFFE0`.
//!
//! Exceptions, checked in the order of the Modbus specification:
//! - 1 (illegal function): any function code but 1, 2, 3, 4, 5, 6, 15, 16;
//! - 3 (illegal data value): a quantity of 0 or over the Modbus limits (read
//!   2000 bits / 125 registers, write 1968 coils / 123 registers);
//! - 2 (illegal data address): any address not in the table above, including
//!   every address of a room that does not exist and the gaps inside a block
//!   (input register 1, say), and a write to holding register 0, which is
//!   read-only: an address that cannot be written is not a legal address for
//!   a write;
//! - 3 (illegal data value): a heater power over 100.
//!
//! A rejected write changes nothing, even in part.
//!
//! tokio-modbus itself closes the connection, without an exception, on a
//! request it cannot decode — for example a single-coil write whose value is
//! neither `0xFF00` nor `0x0000`.
//!
//! # Physics
//!
//! Room `k` starts at `ambient + 5.0 + (h mod 100) / 10` °C, where `h` is the
//! first 8 bytes (little endian) of `blake3(seed LE ‖ k as u64 LE)`: 15.0 to
//! 24.9 °C at the default ambient of 10 °C. Over a step `dt`, a heated room
//! gains `heat_rate × power% × dt`; an unheated room moves toward ambient by
//! at most `cool_rate × dt` and stops there. Stepped by hand
//! ([`SimConfig::manual_clock`]), a trajectory is a pure function of the seed
//! and the steps taken.
//!
//! # Faults
//!
//! A request takes the [`Fault`] of the room its first address falls in;
//! `set_fault(None, …)` sets every room's fault and that of requests that
//! fall in no room. The latest setting wins.

mod registers;
mod room;
mod service;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::{ExceptionCode, Request, Response};

pub use registers::{BLOCK, HEATER, HEATER_POWER, MAX_ROOMS, TEMPERATURE_F32, TEMPERATURE_TENTHS};
use room::{Physics, Room};

/// How long [`SimHandle::shutdown`] waits for connection tasks to close their sockets.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What to simulate and how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Number of rooms, 1..=[`MAX_ROOMS`]; room `k` owns addresses `16k..16k+16`.
    pub rooms: usize,
    /// Seeds the rooms' initial temperatures: the same seed, the same rooms.
    pub seed: u64,
    /// Temperature an unheated room settles at, °C.
    pub ambient_c: f64,
    /// Heating rate at 100 % power, °C per second.
    pub heat_rate_c_per_s: f64,
    /// Rate at which an unheated room approaches ambient, °C per second.
    pub cool_rate_c_per_s: f64,
    /// Period of the real-time clock; ignored with `manual_clock`.
    pub tick: Duration,
    /// No real-time clock: time passes only through [`SimHandle::step`], so
    /// tests see exact, repeatable temperatures.
    pub manual_clock: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            rooms: 1,
            seed: 0,
            ambient_c: 10.0,
            heat_rate_c_per_s: 0.5,
            cool_rate_c_per_s: 0.25,
            tick: Duration::from_millis(100),
            manual_clock: false,
        }
    }
}

impl SimConfig {
    /// Checks the values a simulation cannot run with.
    fn validate(&self) -> Result<(), SimError> {
        let invalid = |reason: String| Err(SimError::InvalidConfig { reason });
        if self.rooms == 0 || self.rooms > MAX_ROOMS {
            return invalid(format!("rooms must be 1..={MAX_ROOMS}, not {}", self.rooms));
        }
        if !self.ambient_c.is_finite() {
            return invalid(format!("ambient temperature must be finite, not {}", self.ambient_c));
        }
        for (name, rate) in [("heat", self.heat_rate_c_per_s), ("cool", self.cool_rate_c_per_s)] {
            if !(rate.is_finite() && rate >= 0.0) {
                return invalid(format!("{name} rate must be a finite number >= 0, not {rate}"));
            }
        }
        if !self.manual_clock && self.tick.is_zero() {
            return invalid("tick must be longer than zero (or use the manual clock)".to_owned());
        }
        Ok(())
    }
}

/// What happens to a request instead of (or before) being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serve normally.
    #[default]
    None,
    /// Answer after this long; the request takes effect when answered.
    /// Later requests on the same connection wait behind it.
    Delay(Duration),
    /// Discard the request unapplied and never answer; the connection stays
    /// open and serves later requests.
    Drop,
    /// Answer with this exception code (e.g. 4 = server device failure),
    /// without applying the request.
    Exception(u8),
    /// Close the connection without answering or applying the request.
    Disconnect,
}

/// Why the simulator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("modbus simulator: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A [`SimConfig`] value the simulation cannot run with.
    #[error("modbus simulator: invalid configuration: {reason}")]
    InvalidConfig {
        /// Which value, and why.
        reason: String,
    },
    /// Ctrl-C / SIGTERM handlers could not be installed.
    #[error("modbus simulator: cannot wait for Ctrl-C/SIGTERM: {source}")]
    Signal {
        /// The operating system's reason.
        source: io::Error,
    },
}

/// Binds `listen` (port 0 picks a free port), starts serving, and, unless
/// `config.manual_clock`, starts a clock that advances the rooms by the real
/// time elapsed every `config.tick`. Returns once listening.
///
/// Must be called within a tokio runtime. The simulator runs until
/// [`SimHandle::shutdown`]; dropping the handles does not stop it.
pub async fn start(listen: SocketAddr, config: SimConfig) -> Result<SimHandle, SimError> {
    config.validate()?;
    let bind_error = |source| SimError::Bind { addr: listen, source };
    let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    // Each connection holds a clone of `open_tx`; `open_rx` sees the channel
    // close once shutdown has dropped the original and every connection is gone.
    let (open_tx, open_rx) = mpsc::channel(1);
    let sim = Arc::new(Simulation {
        addr,
        physics: Physics::from(&config),
        state: Mutex::new(State {
            rooms: (0..config.rooms).map(|k| Room::new(config.seed, k, config.ambient_c)).collect(),
            unaddressed_fault: Fault::None,
        }),
        requests: AtomicU64::new(0),
        tasks: Mutex::new(Vec::new()),
        open_tx: Mutex::new(Some(open_tx)),
        open_rx: Mutex::new(Some(open_rx)),
    });
    let mut tasks = vec![tokio::spawn(service::serve(listener, Arc::clone(&sim)))];
    if !config.manual_clock {
        tasks.push(tokio::spawn(run_clock(Arc::clone(&sim), config.tick)));
    }
    *lock(&sim.tasks) = tasks;
    tracing::info!(%addr, rooms = config.rooms, "modbus simulator listening");
    Ok(SimHandle { sim })
}

/// Starts a simulator, prints one line saying where it listens and how to
/// read it, and serves until Ctrl-C or SIGTERM.
pub async fn run(listen: SocketAddr, config: SimConfig) -> Result<(), SimError> {
    let rooms = config.rooms;
    let sim = start(listen, config).await?;
    println!(
        "modbus simulator: {rooms} room{} on {} (room k: input/holding register {BLOCK}k = temperature ×10, \
         coil {BLOCK}k = heater)",
        if rooms == 1 { "" } else { "s" },
        sim.addr(),
    );
    let signalled = wait_for_signal().await;
    sim.shutdown().await;
    signalled
}

#[cfg(unix)]
async fn wait_for_signal() -> Result<(), SimError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(|source| SimError::Signal { source })?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.map_err(|source| SimError::Signal { source }),
        _ = terminate.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> Result<(), SimError> {
    tokio::signal::ctrl_c().await.map_err(|source| SimError::Signal { source })
}

/// Advances the rooms by the real time elapsed, every `period`.
async fn run_clock(sim: Arc<Simulation>, period: Duration) {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        interval.tick().await;
        let now = Instant::now();
        sim.step(now - last);
        last = now;
    }
}

/// A running simulator: observe and steer it. Clones share the simulator.
#[derive(Clone)]
pub struct SimHandle {
    /// The state every connection and handle shares.
    sim: Arc<Simulation>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle").field("addr", &self.sim.addr).finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The address the simulator listens on (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.sim.addr
    }

    /// Number of rooms.
    pub fn rooms(&self) -> usize {
        self.sim.state().rooms.len()
    }

    /// Room `room`'s temperature in °C, or `None` if there is no such room.
    pub fn temperature(&self, room: usize) -> Option<f64> {
        self.sim.state().rooms.get(room).map(|r| r.temperature)
    }

    /// Sets room `room`'s temperature; `false` if there is no such room or
    /// `celsius` is not finite.
    pub fn set_temperature(&self, room: usize, celsius: f64) -> bool {
        if !celsius.is_finite() {
            return false;
        }
        self.sim.state().rooms.get_mut(room).map(|r| r.temperature = celsius).is_some()
    }

    /// Whether room `room`'s heater is on, or `None` if there is no such room.
    pub fn heater(&self, room: usize) -> Option<bool> {
        self.sim.state().rooms.get(room).map(|r| r.heater)
    }

    /// Room `room`'s heater power in percent (holding register `16k + 1`).
    pub fn heater_power(&self, room: usize) -> Option<u16> {
        self.sim.state().rooms.get(room).map(|r| r.power)
    }

    /// Advances every room by `dt`, on top of the real-time clock if one runs.
    pub fn step(&self, dt: Duration) {
        self.sim.step(dt);
    }

    /// Applies `fault` to requests touching room `room` first, or with `None`
    /// to every room and to requests that touch no room. `false` if there is
    /// no such room.
    pub fn set_fault(&self, room: Option<usize>, fault: Fault) -> bool {
        let mut state = self.sim.state();
        match room {
            Some(index) => state.rooms.get_mut(index).map(|r| r.fault = fault).is_some(),
            None => {
                state.unaddressed_fault = fault;
                state.rooms.iter_mut().for_each(|r| r.fault = fault);
                true
            }
        }
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.set_fault(None, Fault::None);
    }

    /// Requests received so far, whatever became of them (exceptions and
    /// faults included); requests a client queued behind a `Disconnect` are
    /// not counted.
    pub fn requests(&self) -> u64 {
        self.sim.requests.load(Ordering::Relaxed)
    }

    /// Write requests (function codes 5 and 15) addressed to room `room`'s
    /// heater coil so far, counted on arrival: a write that a fault or an
    /// exception stopped still counts. 0 for a room that does not exist.
    pub fn coil_writes(&self, room: usize) -> u64 {
        self.sim.state().rooms.get(room).map_or(0, |r| r.coil_writes)
    }

    /// Stops listening and the clock, closes every connection, and returns once
    /// they are closed (or after a grace period of a few seconds). Handles stay
    /// usable for reading the final state.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *lock(&self.sim.tasks));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Aborting drops tokio-modbus's serve future, which cancels its connection tasks.
            if let Err(err) = task.await
                && err.is_panic()
            {
                tracing::warn!(%err, "modbus simulator: a task panicked");
            }
        }
        drop(lock(&self.sim.open_tx).take());
        let open_rx = lock(&self.sim.open_rx).take();
        if let Some(mut open_rx) = open_rx
            && tokio::time::timeout(SHUTDOWN_GRACE, open_rx.recv()).await.is_err()
        {
            tracing::warn!("modbus simulator: connections still open after shutdown");
        }
        tracing::info!(addr = %self.sim.addr, "modbus simulator stopped");
    }
}

/// The state shared by the handles, the clock and every connection.
pub(crate) struct Simulation {
    /// The bound address.
    addr: SocketAddr,
    /// Rates and ambient temperature.
    physics: Physics,
    /// Rooms and faults, behind one lock so a request sees one consistent instant.
    state: Mutex<State>,
    /// Requests received, for [`SimHandle::requests`].
    requests: AtomicU64,
    /// The server and clock tasks, aborted by shutdown.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Cloned into each connection; taken by shutdown.
    open_tx: Mutex<Option<mpsc::Sender<()>>>,
    /// Closes when every clone of `open_tx` is gone; taken by shutdown.
    open_rx: Mutex<Option<mpsc::Receiver<()>>>,
}

/// The rooms and faults.
pub(crate) struct State {
    /// Room `k` at index `k`.
    rooms: Vec<Room>,
    /// The fault of requests that fall in no room (no address, or past the last room).
    unaddressed_fault: Fault,
}

impl State {
    /// The fault for a request whose first address falls in `room`.
    fn fault_for(&self, room: Option<usize>) -> Fault {
        room.and_then(|k| self.rooms.get(k)).map_or(self.unaddressed_fault, |r| r.fault)
    }
}

impl Simulation {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn step(&self, dt: Duration) {
        let physics = self.physics;
        self.state().rooms.iter_mut().for_each(|room| room.step(&physics, dt));
    }

    fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Serves `request` against the rooms.
    fn apply(&self, request: &Request<'_>) -> Result<Response, ExceptionCode> {
        registers::handle(&mut self.state().rooms, request)
    }

    /// A token a connection holds while open, or `None` once shutting down.
    fn connection_guard(&self) -> Option<mpsc::Sender<()>> {
        lock(&self.open_tx).clone()
    }
}

/// Locks `mutex`, carrying on past a panic elsewhere: any prefix of an update
/// under these locks leaves valid rooms, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
