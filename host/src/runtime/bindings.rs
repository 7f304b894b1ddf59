//! The one `bindgen!` for the command-handler world.
//!
//! Every import is trappable: an `Err` from a host function is a trap (a host
//! fault, or a guest breaking the contract); failures the guest should handle
//! are WIT `result` values (`host-error`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "synod:plugin/command-handler",
    imports: { default: trappable },
});

pub use self::exports::synod::plugin::handler::{Command, CommandContext, Error as GuestError};
pub use self::synod::plugin::types::HostError;
