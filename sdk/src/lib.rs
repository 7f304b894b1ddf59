//! Write Synod command handlers in Rust.
//!
//! A plugin is a type implementing [`Plugin`], exported with
//! [`export_plugin!`]. The host calls [`Plugin::handle`] once for every
//! committed command, on every node, in log order; the handler reads and
//! writes its own key-value namespace through [`state`], reads device
//! shadows and sets their desired state through [`devices`], emits
//! [`events`], and writes its [`log`]. Everything it sees comes from the log
//! entry, so every node computes the same result.
//!
//! Device drivers (the `device-driver` world) are written with the separate
//! crate `synod-driver-sdk` in `sdk/driver`: a separate crate, not a
//! feature, so that cargo's feature unification in a workspace never puts
//! the driver world into a command handler.
//!
//! ```ignore
//! use serde::{Deserialize, Serialize};
//! use synod_sdk::{export_plugin, reply, state, Command, Context, Error, Plugin};
//!
//! struct Counter;
//!
//! #[derive(Deserialize)]
//! struct Increment { by: i64 }
//!
//! #[derive(Serialize)]
//! struct Value { value: i64 }
//!
//! impl Plugin for Counter {
//!     const COMMANDS: &'static [&'static str] = &["increment"];
//!     const QUERIES: &'static [&'static str] = &["get"];
//!
//!     fn handle(_ctx: &Context, command: &Command) -> Result<Vec<u8>, Error> {
//!         match command.name.as_str() {
//!             "increment" => {
//!                 let Increment { by } = command.json()?;
//!                 let value = state::get::<i64>("value")?.unwrap_or(0) + by;
//!                 state::set("value", &value)?;
//!                 reply(&Value { value })
//!             }
//!             other => Err(Error::invalid(format!("unknown command {other}"))),
//!         }
//!     }
//!
//!     fn query(_ctx: &Context, name: &str, _payload: &[u8]) -> Result<Vec<u8>, Error> {
//!         match name {
//!             "get" => reply(&Value { value: state::get("value")?.unwrap_or(0) }),
//!             other => Err(Error::invalid(format!("unknown query {other}"))),
//!         }
//!     }
//! }
//!
//! export_plugin!(Counter);
//! ```
//!
//! Build it with `synod plugin build path/to/crate`, which compiles for
//! `wasm32-unknown-unknown` and wraps the module into a component.
//!
//! What a handler may rely on, and what it may not, is written down in
//! `wit/README.md`: no clock but [`Context::timestamp_ms`], no randomness
//! but [`random`], no files, no network, no memory kept between commands.

extern crate self as synod_sdk;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Generated bindings for the `command-handler` world (used by the macros).
#[doc(hidden)]
#[allow(clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "synod:plugin/command-handler",
        pub_export_macro: true,
        export_macro_name: "__export_command_handler",
        default_bindings_module: "synod_sdk::bindings",
        runtime_path: "synod_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::synod::plugin::types::{Command, CommandContext as Context, Error, HostError, PluginInfo};

/// A command handler.
pub trait Plugin {
    /// Command names [`Plugin::handle`] accepts; the host refuses any other
    /// before it reaches the log.
    const COMMANDS: &'static [&'static str];
    /// Query names [`Plugin::query`] accepts.
    const QUERIES: &'static [&'static str] = &[];

    /// Apply one committed command. State writes and events take effect
    /// only if this returns `Ok`.
    fn handle(ctx: &Context, command: &Command) -> Result<Vec<u8>, Error>;

    /// Answer a read-only query. Writes and events fail with
    /// [`HostError::ReadOnly`].
    fn query(_ctx: &Context, name: &str, _payload: &[u8]) -> Result<Vec<u8>, Error> {
        Err(Error::invalid(format!("unknown query `{name}`")))
    }
}

/// Export `$plugin` (a type implementing [`Plugin`]) as this component's
/// command handler. Use once per plugin crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        type __SynodExportedPlugin = $crate::Adapter<$plugin>;
        $crate::bindings::__export_command_handler!(
            __SynodExportedPlugin with_types_in $crate::bindings
        );
    };
}

/// Bridges a [`Plugin`] to the generated `Guest` trait.
#[doc(hidden)]
pub struct Adapter<P>(core::marker::PhantomData<P>);

impl<P: Plugin> bindings::exports::synod::plugin::handler::Guest for Adapter<P> {
    fn describe() -> PluginInfo {
        PluginInfo {
            commands: P::COMMANDS.iter().map(|s| s.to_string()).collect(),
            queries: P::QUERIES.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn handle(ctx: Context, command: Command) -> Result<Vec<u8>, Error> {
        install_panic_hook();
        P::handle(&ctx, &command)
    }

    fn query(ctx: Context, name: String, payload: Vec<u8>) -> Result<Vec<u8>, Error> {
        install_panic_hook();
        P::query(&ctx, &name, &payload)
    }
}

/// A panic aborts the instance with a bare `unreachable` trap; log the
/// message first so the host can report why (as "plugin panicked: …").
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
        bindings::synod::plugin::log::write(
            bindings::synod::plugin::log::Level::Error,
            &format!("panicked: {why}{at}"),
        );
    }));
}

impl Error {
    /// The payload could not be understood (HTTP 400).
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }

    /// The command was understood and refused (HTTP 422).
    pub fn rejected(message: impl Into<String>) -> Self {
        Error::Rejected(message.into())
    }

    /// The plugin failed for a reason of its own.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
}

impl From<HostError> for Error {
    /// A refused write is the command's fault (a limit) or a query that
    /// tried to write; either way the command is rejected.
    fn from(e: HostError) -> Self {
        match e {
            HostError::ReadOnly => Error::Rejected("state is read-only in a query".into()),
            HostError::LimitExceeded(m) => Error::Rejected(m),
        }
    }
}

impl Command {
    /// Decode the payload as JSON into `T`; an [`Error::InvalidInput`] that
    /// names the command and serde's reason otherwise.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| Error::invalid(format!("invalid `{}` payload: {e}", self.name)))
    }
}

/// Decode a JSON payload (for queries, which get raw bytes).
pub fn json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(payload).map_err(|e| Error::invalid(format!("invalid payload: {e}")))
}

/// Encode `value` as the JSON output of a command or query.
pub fn reply<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("cannot encode reply: {e}")))
}

/// The plugin's own key-value namespace, values as JSON.
pub mod state {
    use super::{DeserializeOwned, Error, Serialize};
    use crate::bindings::synod::plugin::state as raw;

    /// The value at `key` decoded from JSON, seeing this command's writes.
    pub fn get<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
        match raw::get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::internal(format!("stored value at `{key}` is not valid: {e}"))),
        }
    }

    /// Store `value` as JSON at `key` (committed only if the command succeeds).
    pub fn set<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
        let bytes =
            serde_json::to_vec(value).map_err(|e| Error::internal(format!("cannot encode value for `{key}`: {e}")))?;
        raw::set(key, &bytes).map_err(Error::from)
    }

    /// Remove `key`.
    pub fn delete(key: &str) -> Result<(), Error> {
        raw::delete(key).map_err(Error::from)
    }

    /// Up to `limit` entries under `prefix`, in key order, decoded from JSON.
    pub fn scan<T: DeserializeOwned>(prefix: &str, limit: u32) -> Result<Vec<(String, T)>, Error> {
        raw::scan(prefix, limit)
            .into_iter()
            .map(|(k, v)| {
                let value = serde_json::from_slice(&v)
                    .map_err(|e| Error::internal(format!("stored value at `{k}` is not valid: {e}")))?;
                Ok((k, value))
            })
            .collect()
    }

    /// Raw bytes access, for plugins that do not store JSON.
    pub use raw::{get as get_raw, set as set_raw};
}

/// Events, published to subscribers after the command commits.
pub mod events {
    use super::{Error, Serialize};
    use crate::bindings::synod::plugin::events as raw;

    /// Emit `payload` as JSON on `topic` (dot-separated words).
    pub fn emit<T: Serialize + ?Sized>(topic: &str, payload: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(payload).map_err(|e| Error::internal(format!("cannot encode event: {e}")))?;
        raw::emit(topic, &bytes).map_err(Error::from)
    }
}

/// The device shadows in the replicated state, as of the entry being
/// applied. Reads see this command's own [`devices::set_desired`] calls;
/// desired-state writes are buffered and committed with the command's
/// state writes, so every node makes the same ones.
pub mod devices {
    use super::{Error, Serialize};
    use crate::bindings::synod::plugin::devices as raw;
    use crate::bindings::synod::plugin::types::HostError;

    /// The shadow of device `id` as a JSON document (`id`, `driver`,
    /// `desired`, `reported`, `delta`, `version`, `owner`, `epoch`, ...), or
    /// `None` if there is no such device.
    pub fn get(id: &str) -> Result<Option<serde_json::Value>, Error> {
        match raw::get(id) {
            None => Ok(None),
            Some(doc) => serde_json::from_str(&doc)
                .map(Some)
                .map_err(|e| Error::internal(format!("the host's shadow of device `{id}` is not JSON: {e}"))),
        }
    }

    /// Up to `limit` device ids starting with `prefix`, in byte order.
    pub fn list(prefix: &str, limit: u32) -> Vec<String> {
        raw::list_ids(prefix, limit)
    }

    /// Merge `patch` (which must encode as a JSON object) into the desired
    /// state of device `id`; a field set to `null` is removed. The driver on
    /// the device's owner node actuates the change once it commits. A
    /// missing device, a patch that is not an object, a shadow past its size
    /// cap or a call from a query is [`Error::Rejected`].
    pub fn set_desired<T: Serialize + ?Sized>(id: &str, patch: &T) -> Result<(), Error> {
        let json = serde_json::to_string(patch)
            .map_err(|e| Error::internal(format!("cannot encode desired state for device `{id}`: {e}")))?;
        raw::set_desired(id, &json).map_err(|e| match e {
            HostError::ReadOnly => Error::rejected("desired state is read-only in a query"),
            HostError::LimitExceeded(m) => Error::rejected(m),
        })
    }
}

/// The plugin log (kept by the node, bounded, not replicated).
pub mod log {
    use crate::bindings::synod::plugin::log::{Level, write};

    /// Log at debug level.
    pub fn debug(message: &str) {
        write(Level::Debug, message);
    }
    /// Log at info level.
    pub fn info(message: &str) {
        write(Level::Info, message);
    }
    /// Log at warn level.
    pub fn warn(message: &str) {
        write(Level::Warn, message);
    }
    /// Log at error level.
    pub fn error(message: &str) {
        write(Level::Error, message);
    }
}

/// Deterministic randomness seeded from the entry (the same on every node).
pub mod random {
    use crate::bindings::synod::plugin::random as raw;

    /// 64 random bits.
    pub fn u64() -> u64 {
        raw::next_u64()
    }

    /// `len` random bytes (at most 4096 per call).
    pub fn bytes(len: u32) -> Vec<u8> {
        raw::fill(len)
    }
}
