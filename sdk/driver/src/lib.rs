//! Write Synod device drivers in Rust.
//!
//! A driver runs on the one node that owns a device, on an engine of its
//! own, and talks to the device only through the endpoints the device was
//! granted. It is a type implementing [`Driver`], exported with
//! [`export_driver!`]. The host keeps one instance per device: it calls
//! [`Driver::init`] once with the [`Device`], then [`Driver::poll`] every
//! poll interval and [`Driver::actuate`] once per committed desired version,
//! one call at a time, each within a deadline. The instance's state lives
//! from one call to the next; a trap, a panic or a missed deadline drops it
//! and the host starts a new one (calling `init` again) with backoff.
//!
//! What goes out: [`telemetry`] for every reading (published at once, never
//! through the log), [`report`] for reported state (coalesced by the host
//! and committed through the log), [`log`] lines. What comes in: the
//! [`modbus`] and [`tcp`] capabilities, which open only granted endpoints
//! and fail with an [`IoError`] value, never a hang.
//!
//! ```no_run
//! use synod_driver_sdk::{Device, Driver, export_driver, grant, modbus, report, telemetry};
//!
//! struct Meter { client: modbus::Client }
//!
//! impl Driver for Meter {
//!     fn init(device: Device) -> Result<(Self, u32), String> {
//!         let (address, unit) = grant::modbus_tcp(&device.grants).map_err(|e| e.to_string())?;
//!         let client = modbus::open(&address, unit).map_err(|e| e.to_string())?;
//!         Ok((Meter { client }, 1000))
//!     }
//!
//!     fn poll(&mut self) -> Result<(), String> {
//!         let words = self.client.read_input_registers(0, 1).map_err(|e| e.to_string())?;
//!         let watts = f64::from(words.first().copied().unwrap_or(0));
//!         telemetry("power", watts);
//!         report(&serde_json::json!({ "power": watts }))
//!     }
//!
//!     fn actuate(&mut self, _version: u64, _delta: serde_json::Value) -> Result<(), String> {
//!         Ok(())
//!     }
//! }
//!
//! export_driver!(Meter);
//! ```
//!
//! Build it with `synod plugin build path/to/crate`, like a command handler.
//! The pure modules ([`registers`], [`profile`], [`grant`], [`io`]) compile
//! natively and have unit tests:
//! `cargo test --manifest-path plugins/Cargo.toml -p synod-driver-sdk`.
//!
//! This is a crate of its own, not a feature of `synod-sdk`: cargo unifies
//! features across a workspace, so a feature would put the driver world into
//! every command handler built beside a driver.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

extern crate self as synod_driver_sdk;

use std::cell::RefCell;
use std::thread::LocalKey;

use serde::Serialize;

pub mod grant;
pub mod io;
pub mod profile;
pub mod registers;

/// Generated bindings for the `device-driver` world (used by the macros).
#[doc(hidden)]
#[allow(clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "synod:plugin/device-driver",
        // The generated io-error prints as Debug; ours reads as a sentence.
        with: {
            "synod:plugin/io-types@0.1.1/io-error": synod_driver_sdk::io::IoError,
        },
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_device_driver",
        default_bindings_module: "synod_driver_sdk::bindings",
        runtime_path: "synod_driver_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::exports::synod::plugin::driver::Device;
pub use io::IoError;

/// A device driver: one instance per device, kept between calls.
pub trait Driver {
    /// Start driving `device`: check the profile, find the endpoint in the
    /// grants, open connections. Returns the instance and the poll interval
    /// in milliseconds. An `Err` is shown as the device's driver error and
    /// the host tries again later.
    fn init(device: Device) -> Result<(Self, u32), String>
    where
        Self: Sized;

    /// Read the device: [`telemetry`] every reading, [`report`] the fields.
    fn poll(&mut self) -> Result<(), String>;

    /// Bring the device to the desired state. `delta` is the JSON object of
    /// desired fields that differ from reported; `version` is the desired
    /// version it belongs to, actuated once. Write, read back, [`report`].
    fn actuate(&mut self, version: u64, delta: serde_json::Value) -> Result<(), String>;
}

/// Export `$driver` (a type implementing [`Driver`]) as this component's
/// device driver. Use once per driver crate.
#[macro_export]
macro_rules! export_driver {
    ($driver:ty) => {
        ::std::thread_local! {
            /// The instance between calls (wasm is single-threaded: this is
            /// one static).
            static __SYNOD_DRIVER: ::core::cell::RefCell<::core::option::Option<$driver>> =
                const { ::core::cell::RefCell::new(::core::option::Option::None) };
        }
        #[doc(hidden)]
        struct __SynodDriverSlot;
        impl $crate::Slot for __SynodDriverSlot {
            type Driver = $driver;
            fn key() -> &'static ::std::thread::LocalKey<
                ::core::cell::RefCell<::core::option::Option<$driver>>,
            > {
                &__SYNOD_DRIVER
            }
        }
        #[doc(hidden)]
        type __SynodExportedDriver = $crate::Adapter<__SynodDriverSlot>;
        $crate::bindings::__export_device_driver!(
            __SynodExportedDriver with_types_in $crate::bindings
        );
    };
}

/// Where [`export_driver!`] keeps the instance (a generic type cannot own a
/// static, so the macro declares it in the driver's crate).
#[doc(hidden)]
pub trait Slot {
    /// The driver type.
    type Driver: Driver + 'static;
    /// The static holding the instance.
    fn key() -> &'static LocalKey<RefCell<Option<Self::Driver>>>;
}

/// Bridges a [`Driver`] to the generated `Guest` trait.
#[doc(hidden)]
pub struct Adapter<S>(core::marker::PhantomData<S>);

impl<S: Slot> bindings::exports::synod::plugin::driver::Guest for Adapter<S> {
    fn init(device: Device) -> Result<u32, String> {
        install_panic_hook();
        // A second init replaces the instance; drop the old one first so its
        // connections close before new ones open.
        S::key().with(|slot| slot.try_borrow_mut().map(|mut s| *s = None)).map_err(|_| REENTERED.to_string())?;
        let (driver, poll_ms) = S::Driver::init(device)?;
        S::key()
            .with(|slot| slot.try_borrow_mut().map(|mut s| *s = Some(driver)))
            .map_err(|_| REENTERED.to_string())?;
        Ok(poll_ms)
    }

    fn poll() -> Result<(), String> {
        with_driver::<S, _>(|d| d.poll())
    }

    fn actuate(desired_version: u64, delta: String) -> Result<(), String> {
        let delta = serde_json::from_str(&delta).map_err(|e| format!("the host's delta is not JSON: {e}"))?;
        with_driver::<S, _>(|d| d.actuate(desired_version, delta))
    }
}

/// The host makes one call at a time per instance; a nested one would be a
/// host bug, reported instead of a panic.
const REENTERED: &str = "driver called while a call was running";

fn with_driver<S: Slot, R>(f: impl FnOnce(&mut S::Driver) -> Result<R, String>) -> Result<R, String> {
    S::key().with(|slot| {
        let mut slot = slot.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
        match slot.as_mut() {
            Some(driver) => f(driver),
            None => Err("driver not initialized: `init` has not succeeded".to_string()),
        }
    })
}

/// A panic aborts the instance with a bare `unreachable` trap; log the
/// message first so the driver log says why. Installed by `init`, which
/// every instance runs first.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let why = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown panic payload".to_string()
        };
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        log::error(&format!("panicked: {why}{at}"));
    }));
}

/// One reading, published at once on NATS `synod.tel.<device>.<metric>`
/// (never through the log). Send every reading; the host does not coalesce
/// telemetry.
pub fn telemetry(metric: &str, value: f64) {
    bindings::synod::plugin::sink::telemetry(metric, value);
}

/// Reported state: `fields` must encode as a JSON object of fields. The host
/// keeps the latest value per field, commits changes through the log at a
/// minimum interval (and past a deadband per field, if the profile sets
/// one), fenced by this node's ownership.
pub fn report<T: Serialize + ?Sized>(fields: &T) -> Result<(), String> {
    let value = serde_json::to_value(fields).map_err(|e| format!("cannot encode report: {e}"))?;
    if !value.is_object() {
        return Err(format!("a report must be a JSON object of fields, not {value}"));
    }
    bindings::synod::plugin::sink::report(&value.to_string());
    Ok(())
}

/// The driver log (bounded, kept by the owner node).
pub mod log {
    use crate::bindings::synod::plugin::sink::{LogLevel, log};

    /// Log at trace level.
    pub fn trace(message: &str) {
        log(LogLevel::Trace, message);
    }
    /// Log at debug level.
    pub fn debug(message: &str) {
        log(LogLevel::Debug, message);
    }
    /// Log at info level.
    pub fn info(message: &str) {
        log(LogLevel::Info, message);
    }
    /// Log at warn level.
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message);
    }
    /// Log at error level.
    pub fn error(message: &str) {
        log(LogLevel::Error, message);
    }
}

/// Modbus TCP, to the endpoints in the device's `modbus-tcp://` grants.
pub mod modbus {
    use crate::IoError;
    use crate::bindings::synod::plugin::modbus as raw;

    /// A connection to one endpoint and unit: `read_coils`,
    /// `read_discrete_inputs`, `read_holding_registers`,
    /// `read_input_registers`, `write_coil`, `write_register`, `write_coils`,
    /// `write_registers`. Dropping it closes the connection.
    pub use raw::Client;

    /// Open a connection to `address` (`host:port`) for `unit`. Anything
    /// not in the device's grants is [`IoError::NotGranted`].
    pub fn open(address: &str, unit: u8) -> Result<Client, IoError> {
        raw::open(address, unit)
    }
}

/// Raw TCP byte streams, to the endpoints in the device's `tcp://` grants.
pub mod tcp {
    use crate::IoError;
    use crate::bindings::synod::plugin::tcp as raw;

    /// A connected byte stream: `write(bytes)`, `read(max)` (empty at end
    /// of stream). Dropping it closes the connection.
    pub use raw::Connection;

    /// Connect to `address` (`host:port`). Anything not in the device's
    /// grants is [`IoError::NotGranted`].
    pub fn connect(address: &str) -> Result<Connection, IoError> {
        raw::connect(address)
    }
}
