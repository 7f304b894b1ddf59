//! `register`: one integer register per key, for the fault battery's
//! linearizability check (issue 12's workload (a)).
//!
//! - command `put` `{"key": k, "value": v}` → `{"index": i, "at": ms}`
//! - command `cas` `{"key": k, "from": a, "to": b}` → `{"swapped": bool,
//!   "value": current, "index": i, "at": ms}`; swaps only when the key
//!   holds `a` (a key never written holds nothing and never matches), and
//!   logs a line when it does not
//! - query `get` `{"key": k}` → `{"value": v | null}`
//!
//! Every command reply carries the entry's index and the leader's timestamp
//! (`at`) so the battery can check that timestamps never go backwards in
//! log order, across leader changes and clock jumps.
//!
//! Built with `--features trap-on-odd`, `put` of an odd value traps: a v2
//! the replay gate must stop. Built with `--features v2`, command replies
//! also carry `"version": 2`: a compatible v2 whose outputs differ.

use serde::{Deserialize, Serialize};
use synod_sdk::{Command, Context, Error, Plugin, export_plugin, log, reply, state};

struct Register;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Put {
    key: String,
    value: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cas {
    key: String,
    from: i64,
    to: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Get {
    key: String,
}

#[derive(Serialize)]
struct Written {
    index: u64,
    at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

#[derive(Serialize)]
struct Swapped {
    swapped: bool,
    value: Option<i64>,
    index: u64,
    at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

/// `Some(2)` in the `v2` build.
const VERSION: Option<u32> = if cfg!(feature = "v2") { Some(2) } else { None };

#[derive(Serialize)]
struct Value {
    value: Option<i64>,
}

/// The state key of register `key`.
fn slot(key: &str) -> Result<String, Error> {
    if key.is_empty() || key.len() > 200 {
        return Err(Error::invalid("a key is 1 to 200 bytes"));
    }
    Ok(format!("r/{key}"))
}

impl Plugin for Register {
    const COMMANDS: &'static [&'static str] = &["put", "cas"];
    const QUERIES: &'static [&'static str] = &["get"];

    fn handle(ctx: &Context, command: &Command) -> Result<Vec<u8>, Error> {
        match command.name.as_str() {
            "put" => {
                let Put { key, value } = command.json()?;
                if cfg!(feature = "trap-on-odd") && value % 2 != 0 {
                    core::arch::wasm32::unreachable();
                }
                state::set(&slot(&key)?, &value)?;
                reply(&Written { index: ctx.index, at: ctx.timestamp_ms, version: VERSION })
            }
            "cas" => {
                let Cas { key, from, to } = command.json()?;
                let slot = slot(&key)?;
                let current = state::get::<i64>(&slot)?;
                let swapped = current == Some(from);
                if swapped {
                    state::set(&slot, &to)?;
                } else {
                    log::info(&format!("cas on {key} not swapped: expected {from}, holds {current:?}"));
                }
                let value = if swapped { Some(to) } else { current };
                reply(&Swapped { swapped, value, index: ctx.index, at: ctx.timestamp_ms, version: VERSION })
            }
            other => Err(Error::invalid(format!("unknown command `{other}`"))),
        }
    }

    fn query(_ctx: &Context, name: &str, payload: &[u8]) -> Result<Vec<u8>, Error> {
        match name {
            "get" => {
                let Get { key } = synod_sdk::json(payload)?;
                reply(&Value { value: state::get::<i64>(&slot(&key)?)? })
            }
            other => Err(Error::invalid(format!("unknown query `{other}`"))),
        }
    }
}

export_plugin!(Register);
