// counter (JavaScript): the counter plugin of plugins/counter, on the
// JavaScript SDK. One integer, three operations:
//
// - command `increment` {"by": n, "note": "…"} (default 1; the note, if any,
//   is stored under `note`) → {"value": v}
// - command `reset` {} → {"value": 0}, emits `reset` {"previous": p}
// - query `get` → {"value": v}
//
// Interchangeable with the Rust counter: the same names, replies, events,
// error kinds and state encoding (the value as a JSON integer under
// `value`), so either can take over the other's state with a hot reload.
// The value is a 64-bit integer (BigInt past ±2^53); overflow is rejected.

import { command, query, state, events, fail, handler } from "@synod/sdk";

const KEY = "value";
const I64_MAX = 2n ** 63n - 1n;
const I64_MIN = -(2n ** 63n);

function describe(v) {
    if (v === null) return "null";
    if (Array.isArray(v)) return "a sequence";
    if (typeof v === "object") return "a map";
    if (typeof v === "string") return `string ${JSON.stringify(v)}`;
    if (typeof v === "number") return `floating point \`${v}\``;
    return `${typeof v} \`${v}\``;
}

function i64(v) {
    if (typeof v === "number" && Number.isInteger(v)) return BigInt(v);
    if (typeof v === "bigint") {
        if (v < I64_MIN || v > I64_MAX) throw fail.invalid(`invalid value: integer \`${v}\`, expected i64`);
        return v;
    }
    throw fail.invalid(`invalid type: ${describe(v)}, expected i64`);
}

/** A BigInt as JSON should carry it: a Number when that is exact. */
function exact(b) {
    return b >= -(2n ** 53n) && b <= 2n ** 53n ? Number(b) : b;
}

function current() {
    const v = state.get(KEY);
    if (v === undefined) return 0n;
    try {
        return i64(v);
    } catch (e) {
        throw fail.internal(`stored value at \`${KEY}\` is not valid: ${e.message}`);
    }
}

/** The payload, read as the Rust counter's `Increment` is read by serde. */
function increment(input) {
    if (input === undefined) return { by: 1n, note: null };
    const note = (v) => {
        if (v !== null && typeof v !== "string") throw fail.invalid(`invalid type: ${describe(v)}, expected a string`);
        return v;
    };
    if (Array.isArray(input)) {
        if (input.length > 2) throw fail.invalid("trailing characters: more than 2 fields");
        return { by: input.length > 0 ? i64(input[0]) : 1n, note: input.length > 1 ? note(input[1]) : null };
    }
    if (input === null || typeof input !== "object")
        throw fail.invalid(`invalid type: ${describe(input)}, expected struct Increment`);
    for (const k of Object.keys(input))
        if (k !== "by" && k !== "note") throw fail.invalid(`unknown field \`${k}\`, expected \`by\` or \`note\``);
    return { by: "by" in input ? i64(input.by) : 1n, note: "note" in input ? note(input.note) : null };
}

command("increment", (input) => {
    const { by, note } = increment(input);
    if (note !== null) state.set("note", note);
    const value = current() + by;
    if (value > I64_MAX || value < I64_MIN) throw fail.rejected(`adding ${by} would overflow the counter`);
    state.set(KEY, exact(value));
    return { value: exact(value) };
});

command("reset", () => {
    const previous = current();
    state.set(KEY, 0);
    events.emit("reset", { previous: exact(previous) });
    return { value: 0 };
});

query("get", () => ({ value: exact(current()) }));

export { handler };
