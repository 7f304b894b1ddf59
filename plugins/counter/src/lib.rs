//! `counter`: the smallest useful plugin. One integer, three operations.
//!
//! - command `increment` `{"by": n, "note": "…"}` (default 1; the note, if
//!   any, is stored under `note`) → `{"value": v}`
//! - command `reset` `{}` → `{"value": 0}`, emits `reset`
//! - query `get` → `{"value": v}`
//!
//! Non-numeric input is refused as invalid input; overflow is rejected.
//! Built with `--features v2`, every reply also carries `"version": 2`.

use serde::{Deserialize, Serialize};
use synod_sdk::{Command, Context, Error, Plugin, events, export_plugin, reply, state};

struct Counter;

const KEY: &str = "value";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Increment {
    #[serde(default = "one")]
    by: i64,
    /// Optional text stored with the increment (under `note`): lets a
    /// benchmark write a realistic value per command.
    #[serde(default)]
    note: Option<String>,
}

fn one() -> i64 {
    1
}

#[derive(Serialize)]
struct Value {
    value: i64,
    /// Present in the `v2` build only: which release answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

/// `Some(2)` in the `v2` build.
const VERSION: Option<u32> = if cfg!(feature = "v2") { Some(2) } else { None };

fn current() -> Result<i64, Error> {
    Ok(state::get::<i64>(KEY)?.unwrap_or(0))
}

impl Plugin for Counter {
    const COMMANDS: &'static [&'static str] = &["increment", "reset"];
    const QUERIES: &'static [&'static str] = &["get"];

    fn handle(_ctx: &Context, command: &Command) -> Result<Vec<u8>, Error> {
        match command.name.as_str() {
            "increment" => {
                let Increment { by, note } =
                    if command.payload.is_empty() { Increment { by: 1, note: None } } else { command.json()? };
                if let Some(note) = note {
                    state::set("note", &note)?;
                }
                let value = current()?
                    .checked_add(by)
                    .ok_or_else(|| Error::rejected(format!("adding {by} would overflow the counter")))?;
                state::set(KEY, &value)?;
                reply(&Value { value, version: VERSION })
            }
            "reset" => {
                let previous = current()?;
                state::set(KEY, &0i64)?;
                events::emit("reset", &serde_json::json!({ "previous": previous }))?;
                reply(&Value { value: 0, version: VERSION })
            }
            other => Err(Error::invalid(format!("unknown command `{other}`"))),
        }
    }

    fn query(_ctx: &Context, name: &str, _payload: &[u8]) -> Result<Vec<u8>, Error> {
        match name {
            "get" => reply(&Value { value: current()?, version: VERSION }),
            other => Err(Error::invalid(format!("unknown query `{other}`"))),
        }
    }
}

export_plugin!(Counter);
