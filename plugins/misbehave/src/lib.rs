//! `misbehave`: a plugin that does everything a plugin must not, for tests.
//! Each command first writes `victim` so tests can check the write is
//! dropped when the command fails.
//!
//! Commands: `spin` (endless loop), `alloc` (memory bomb), `trap`
//! (`unreachable`), `panic`, `huge` (2 MiB output), `recurse` (unbounded
//! recursion), `fail` (returns an error after writing), `write` (a normal
//! write), `random` (entry-seeded randomness and the context), `fill`
//! (`{"from": n, "count": k}` writes keys `k/<n>`…), `scan_all`
//! (`scan("", u32::MAX)`: the whole namespace in one host call).
//! Queries: `read` (the victim key), `try_write` (a write from a query),
//! `scan_all`.
#![allow(clippy::panic)]

use std::hint::black_box;

use synod_sdk::{Command, Context, Error, Plugin, export_plugin, random, reply, state};

struct Misbehave;

/// Recursion through an opaque function pointer: neither inlined nor turned
/// into a loop, so every level is a real wasm frame.
#[inline(never)]
fn deeper(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let next: fn(u64) -> u64 = black_box(deeper);
    next(n - 1).wrapping_mul(31).wrapping_add(n)
}

impl Plugin for Misbehave {
    const COMMANDS: &'static [&'static str] =
        &["spin", "alloc", "trap", "panic", "huge", "recurse", "fail", "write", "random", "fill", "scan_all"];
    const QUERIES: &'static [&'static str] = &["read", "try_write", "scan_all"];

    fn handle(ctx: &Context, command: &Command) -> Result<Vec<u8>, Error> {
        state::set("victim", &command.name)?;
        match command.name.as_str() {
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "trap" => core::arch::wasm32::unreachable(),
            "panic" => panic!("deliberate panic for {}", command.name),
            "huge" => Ok(vec![b'x'; 2 * 1024 * 1024]),
            "recurse" => reply(&deeper(black_box(u64::MAX))),
            "fail" => Err(Error::rejected("failing after a write, on purpose")),
            "write" => reply(&"written"),
            "random" => reply(&serde_json::json!({
                "u64": random::u64(),
                "bytes": random::bytes(16),
                "index": ctx.index,
                "term": ctx.term,
                "timestamp_ms": ctx.timestamp_ms,
                "caller": ctx.caller,
            })),
            "fill" => {
                // Also the state-scale benchmark's loader (`value_bytes`:
                // each value a JSON string of about that many bytes).
                #[derive(serde::Deserialize)]
                struct Fill {
                    from: u64,
                    count: u64,
                    #[serde(default)]
                    value_bytes: Option<usize>,
                }
                let Fill { from, count, value_bytes } = command.json()?;
                for i in from..from + count {
                    let key = format!("k/{i:08}");
                    match value_bytes {
                        Some(n) => {
                            let mut v = format!("{i:08}-{}-", ctx.index);
                            v.extend(std::iter::repeat_n('x', n.saturating_sub(v.len() + 2)));
                            state::set(&key, &v)?;
                        }
                        None => state::set(&key, &i)?,
                    }
                }
                reply(&count)
            }
            "scan_all" => reply(&state::scan::<serde_json::Value>("", u32::MAX)?.len()),
            other => Err(Error::invalid(format!("unknown command `{other}`"))),
        }
    }

    fn query(_ctx: &Context, name: &str, _payload: &[u8]) -> Result<Vec<u8>, Error> {
        match name {
            "read" => reply(&state::get::<String>("victim")?),
            "try_write" => match state::set("victim", &"from a query") {
                Ok(()) => reply(&"write accepted"),
                Err(e) => Err(e),
            },
            "scan_all" => reply(&state::scan::<serde_json::Value>("", u32::MAX)?.len()),
            other => Err(Error::invalid(format!("unknown query `{other}`"))),
        }
    }
}

export_plugin!(Misbehave);
