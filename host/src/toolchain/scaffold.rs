//! `synod plugin new <name> --lang rust|js|python|c`: a plugin that builds
//! and passes its own test.
//!
//! Every language gets the same small plugin — a tally: command `add`
//! `{"by": n}` → `{"total": t}` (emits `added`), query `total` — and the
//! same `tests.json`, which `synod plugin test <dir>` runs against the built
//! component on a local runtime (see [`super::plugin_test`]).

use std::path::{Path, PathBuf};

use super::Language;

/// Why a scaffold could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a plugin name.
    #[error("plugin name {0:?} must be 1-64 lowercase letters, digits or '-', starting with a letter")]
    BadName(String),
    /// The target directory exists and is not empty.
    #[error("{0} already exists and is not empty")]
    Exists(PathBuf),
    /// The Rust SDK is not where this `synod` was built from.
    #[error("a Rust plugin needs the synod-sdk crate; it is not at {0} (build `synod` from its repository)")]
    NoRustSdk(PathBuf),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The behaviour every scaffold is held to (run by `synod plugin test`).
const TESTS_JSON: &str = r#"{
  "cases": [
    { "command": "add", "payload": { "by": 2 }, "expect": { "ok": { "total": 2 } } },
    { "command": "add", "payload": {}, "expect": { "ok": { "total": 3 } } },
    { "command": "add", "payload": { "by": "two" }, "expect": { "error": "invalid_input" } },
    { "command": "add", "payload": { "by": -10 }, "expect": { "error": "rejected" } },
    { "query": "total", "expect": { "ok": { "total": 3 } } }
  ]
}
"#;

fn files(lang: Language, name: &str) -> Result<Vec<(String, String)>, ScaffoldError> {
    let module = name.replace('-', "_");
    let f = |path: &str, text: &str| (path.to_owned(), text.replace("{{name}}", name).replace("{{module}}", &module));
    Ok(match lang {
        Language::Rust => {
            let sdk = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk");
            let sdk = sdk.canonicalize().map_err(|_| ScaffoldError::NoRustSdk(sdk.clone()))?;
            vec![f("Cargo.toml", &RUST_CARGO.replace("{{sdk}}", &sdk.display().to_string())), f("src/lib.rs", RUST_LIB)]
        }
        Language::JavaScript => vec![f("package.json", JS_PACKAGE), f("plugin.js", JS_PLUGIN)],
        Language::Python => vec![f("pyproject.toml", PY_PROJECT), f(&format!("{module}.py"), PY_PLUGIN)],
        Language::C => vec![f("Makefile", C_MAKEFILE), f("plugin.c", C_PLUGIN), f(".gitignore", "build/\n*.wasm\n")],
    })
}

/// Write a new plugin called `name` in `lang` into `dir`.
pub fn new_plugin(dir: &Path, name: &str, lang: Language) -> Result<Vec<PathBuf>, ScaffoldError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(ScaffoldError::BadName(name.to_owned()));
    }
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(ScaffoldError::Exists(dir.to_owned()));
    }
    let mut written = Vec::new();
    let mut all = files(lang, name)?;
    all.push(("tests.json".to_owned(), TESTS_JSON.to_owned()));
    all.push(("README.md".to_owned(), README.replace("{{name}}", name).replace("{{lang}}", lang.name())));
    for (rel, text) in all {
        let path = dir.join(rel);
        let io = |source| ScaffoldError::Io { path: path.clone(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, text).map_err(io)?;
        written.push(path);
    }
    Ok(written)
}

const README: &str = "# {{name}}

A Synod command handler in {{lang}}, made by `synod plugin new`.

- command `add` `{\"by\": n}` (default 1) adds to a running total and emits
  `added`; a total below zero is rejected.
- query `total`.

```sh
synod plugin build .          # the component, path printed
synod plugin test .           # builds, then runs tests.json on a local runtime
synod plugin push <component> --name {{name}} --version 1
```
";

const RUST_CARGO: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
synod-sdk = { path = "{{sdk}}" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

# A plugin is a workspace of its own (its target is wasm32, not the host's).
[workspace]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
"#;

const RUST_LIB: &str = r#"//! {{name}}: a running total.

use serde::Deserialize;
use synod_sdk::{Command, Context, Error, Plugin, events, export_plugin, reply, state};

struct Tally;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    #[serde(default = "one")]
    by: i64,
}

fn one() -> i64 {
    1
}

fn total() -> Result<i64, Error> {
    Ok(state::get::<i64>("total")?.unwrap_or(0))
}

impl Plugin for Tally {
    const COMMANDS: &'static [&'static str] = &["add"];
    const QUERIES: &'static [&'static str] = &["total"];

    fn handle(_ctx: &Context, command: &Command) -> Result<Vec<u8>, Error> {
        match command.name.as_str() {
            "add" => {
                let Add { by } = command.json()?;
                let total = total()?.checked_add(by).ok_or_else(|| Error::rejected("the total would overflow"))?;
                if total < 0 {
                    return Err(Error::rejected(format!("the total would fall below zero ({total})")));
                }
                state::set("total", &total)?;
                events::emit("added", &serde_json::json!({ "by": by, "total": total }))?;
                reply(&serde_json::json!({ "total": total }))
            }
            other => Err(Error::invalid(format!("unknown command `{other}`"))),
        }
    }

    fn query(_ctx: &Context, name: &str, _payload: &[u8]) -> Result<Vec<u8>, Error> {
        match name {
            "total" => reply(&serde_json::json!({ "total": total()? })),
            other => Err(Error::invalid(format!("unknown query `{other}`"))),
        }
    }
}

export_plugin!(Tally);
"#;

const JS_PACKAGE: &str = r#"{
  "name": "{{name}}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "main": "plugin.js"
}
"#;

const JS_PLUGIN: &str = r#"// {{name}}: a running total. `@synod/sdk` is supplied by `synod plugin build`.
import { command, query, state, events, fail, handler } from "@synod/sdk";

command("add", (input) => {
    const by = input?.by ?? 1;
    if (!Number.isInteger(by)) throw fail.invalid("`by` must be an integer");
    const total = (state.get("total") ?? 0) + by;
    if (total < 0) throw fail.rejected(`the total would fall below zero (${total})`);
    state.set("total", total);
    events.emit("added", { by, total });
    return { total };
});

query("total", () => ({ total: state.get("total") ?? 0 }));

export { handler };
"#;

const PY_PROJECT: &str = r#"[project]
name = "{{name}}"
version = "0.1.0"
requires-python = ">=3.11"

[tool.synod]
# The module compiled into the component (the `synod` SDK is supplied by
# `synod plugin build`).
module = "{{module}}"
"#;

const PY_PLUGIN: &str = r#""""{{name}}: a running total."""

from synod import Handler, command, events, fail, query, state  # noqa: F401 - Handler is the export


@command
def add(payload, ctx):
    by = (payload or {}).get("by", 1)
    if not isinstance(by, int) or isinstance(by, bool):
        raise fail.invalid("`by` must be an integer")
    total = state.get("total", 0) + by
    if total < 0:
        raise fail.rejected(f"the total would fall below zero ({total})")
    state.set("total", total)
    events.emit("added", {"by": by, "total": total})
    return {"total": total}


@query
def total(payload, ctx):
    return {"total": state.get("total", 0)}
"#;

const C_MAKEFILE: &str = r#"# {{name}}: `synod plugin build .` runs this with SYNOD_C_SDK set to the
# C SDK it carries (or set SYNOD_C_SDK to a checkout's sdk/c and run make).
PLUGIN := {{name}}
SRCS := plugin.c

ifndef SYNOD_C_SDK
$(error SYNOD_C_SDK is not set: build with `synod plugin build .`)
endif
include $(SYNOD_C_SDK)/plugin.mk
"#;

const C_PLUGIN: &str = r#"/* {{name}}: a running total. */
#include <stdbool.h>
#include <stdint.h>

#include "synod.h"

static synod_status_t total(int64_t *value) {
    synod_buf_t stored = SYNOD_BUF_INIT;
    *value = 0;
    bool ok = !synod_state_get("total", &stored) || synod_json_i64(synod_buf_bytes(&stored), value);
    synod_buf_free(&stored);
    return ok ? SYNOD_OK : synod_fail_internal("the stored total is not an integer");
}

static synod_status_t add(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    int64_t by = 1, sum;
    if (payload.len) {
        synod_field_t f = synod_json_get_i64(payload, "by", &by);
        if (f == SYNOD_FIELD_MALFORMED) return synod_fail_invalid("the payload must be a JSON object");
        if (f == SYNOD_FIELD_WRONG_TYPE) return synod_fail_invalid("`by` must be an integer");
    }
    synod_status_t st = total(&sum);
    if (st != SYNOD_OK) return st;
    if (__builtin_add_overflow(sum, by, &sum)) return synod_fail_rejected("the total would overflow");
    if (sum < 0) return synod_fail_rejected("the total would fall below zero (%lld)", (long long)sum);
    synod_buf_t text = SYNOD_BUF_INIT;
    synod_buf_put_i64(&text, sum);
    st = synod_state_set("total", text.ptr, text.len);
    synod_buf_free(&text);
    if (st != SYNOD_OK) return st;
    synod_buf_t event = SYNOD_BUF_INIT;
    synod_buf_puts(&event, "{\"by\":");
    synod_buf_put_i64(&event, by);
    synod_buf_puts(&event, ",\"total\":");
    synod_buf_put_i64(&event, sum);
    synod_buf_puts(&event, "}");
    st = synod_events_emit("added", event.ptr, event.len);
    synod_buf_free(&event);
    if (st != SYNOD_OK) return st;
    synod_buf_puts(reply, "{\"total\":");
    synod_buf_put_i64(reply, sum);
    synod_buf_puts(reply, "}");
    return SYNOD_OK;
}

static synod_status_t query_total(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    int64_t sum;
    synod_status_t st = total(&sum);
    if (st != SYNOD_OK) return st;
    synod_buf_puts(reply, "{\"total\":");
    synod_buf_put_i64(reply, sum);
    synod_buf_puts(reply, "}");
    return SYNOD_OK;
}

static const synod_entry_t commands[] = {{"add", add}, SYNOD_END};
static const synod_entry_t queries[] = {{"total", query_total}, SYNOD_END};
SYNOD_PLUGIN(commands, queries);
"#;
