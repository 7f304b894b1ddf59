// @synod/sdk — write a Synod command handler in JavaScript.
//
// A plugin is an ES module compiled by `synod plugin build` (componentize-qjs:
// QuickJS, no WASI) into a component of the `command-handler` world in
// `wit/plugin.wit`. It registers its commands and queries and exports the
// handler:
//
//     import { command, query, state, fail, handler } from "@synod/sdk";
//     command("increment", (input, ctx) => { ... return { value }; });
//     query("get", () => ({ value: state.get("value") ?? 0 }));
//     export { handler };
//
// Deterministic by construction: a handler runs on every node when its log
// entry is applied, so the SDK replaces everything that could differ between
// nodes before each call. `Date.now()` and `new Date()` are the entry's
// timestamp (`ctx.timestampMs`); `Math.random()` and
// `crypto.getRandomValues` draw from the host's `random` interface (seeded
// from the entry, the same on every node); `console.*` goes to the plugin
// log. Nothing else of the outside world is reachable: the component imports
// only `synod:plugin` interfaces.
//
// Inputs and outputs are JSON. Integers outside ±2^53 are parsed as BigInt
// (and BigInts are written back as JSON integers), so an i64 counter keeps
// every digit.

import stateApi from "synod:plugin/state@0.1.1";
import eventsApi from "synod:plugin/events@0.1.1";
import logApi from "synod:plugin/log@0.1.1";
import randomApi from "synod:plugin/random@0.1.1";
import devicesApi from "synod:plugin/devices@0.1.1";

// ---------------------------------------------------------------- UTF-8 --

/** The UTF-8 bytes of a string (QuickJS has no TextEncoder). */
export function utf8Encode(text) {
    const out = [];
    for (let i = 0; i < text.length; i++) {
        let c = text.charCodeAt(i);
        if (c >= 0xd800 && c < 0xdc00 && i + 1 < text.length) {
            const d = text.charCodeAt(i + 1);
            if (d >= 0xdc00 && d < 0xe000) {
                c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
                i++;
            }
        }
        if (c >= 0xd800 && c < 0xe000) c = 0xfffd; // a lone surrogate
        if (c < 0x80) out.push(c);
        else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
        else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
        else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    }
    return new Uint8Array(out);
}

/** A string from UTF-8 bytes; throws `fail.invalid` on malformed input. */
export function utf8Decode(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; ) {
        const b = bytes[i];
        let c, n;
        if (b < 0x80) (c = b), (n = 0);
        else if (b >= 0xc2 && b < 0xe0) (c = b & 31), (n = 1);
        else if (b >= 0xe0 && b < 0xf0) (c = b & 15), (n = 2);
        else if (b >= 0xf0 && b < 0xf5) (c = b & 7), (n = 3);
        else throw fail.invalid(`invalid UTF-8 at byte ${i}`);
        if (n && i + n >= bytes.length) throw fail.invalid(`invalid UTF-8 at byte ${i}`);
        for (let k = 1; k <= n; k++) {
            const x = bytes[i + k];
            if ((x & 0xc0) !== 0x80) throw fail.invalid(`invalid UTF-8 at byte ${i + k}`);
            c = (c << 6) | (x & 63);
        }
        if ((n === 2 && (c < 0x800 || (c >= 0xd800 && c < 0xe000))) || (n === 3 && (c < 0x10000 || c > 0x10ffff)))
            throw fail.invalid(`invalid UTF-8 at byte ${i}`);
        s += String.fromCodePoint(c);
        i += n + 1;
    }
    return s;
}

// ----------------------------------------------------------------- JSON --

const MAX_DEPTH = 128;

/** Parse JSON text; integers outside ±2^53 become BigInt. Throws a
 * `SyntaxError` naming the position on bad input. */
function parseJson(text) {
    // The engine's parser is far cheaper; ours only when an integer may not
    // fit a double exactly (16 or more digits in a row).
    if (!/[0-9]{16}/.test(text)) return JSON.parse(text);
    let i = 0;
    const err = (what) => {
        throw new SyntaxError(`${what} at position ${i}`);
    };
    const ws = () => {
        while (i < text.length && " \t\n\r".includes(text[i])) i++;
    };
    const value = (depth) => {
        if (depth > MAX_DEPTH) err("nesting too deep");
        ws();
        const c = text[i];
        if (c === "{") {
            i++;
            const obj = {};
            ws();
            if (text[i] === "}") return i++, obj;
            for (;;) {
                ws();
                if (text[i] !== '"') err("expected a string key");
                const k = str();
                ws();
                if (text[i++] !== ":") err("expected ':'");
                Object.defineProperty(obj, k, { value: value(depth + 1), enumerable: true, writable: true, configurable: true });
                ws();
                if (text[i] === ",") i++;
                else if (text[i] === "}") return i++, obj;
                else err("expected ',' or '}'");
            }
        }
        if (c === "[") {
            i++;
            const arr = [];
            ws();
            if (text[i] === "]") return i++, arr;
            for (;;) {
                arr.push(value(depth + 1));
                ws();
                if (text[i] === ",") i++;
                else if (text[i] === "]") return i++, arr;
                else err("expected ',' or ']'");
            }
        }
        if (c === '"') return str();
        if (text.startsWith("true", i)) return (i += 4), true;
        if (text.startsWith("false", i)) return (i += 5), false;
        if (text.startsWith("null", i)) return (i += 4), null;
        const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(i, i + 400));
        if (!m || !m[0]) err("expected a JSON value");
        i += m[0].length;
        if (!m[2] && !m[3]) {
            const n = Number(m[0]);
            return Number.isSafeInteger(n) ? n : BigInt(m[0]);
        }
        return Number(m[0]);
    };
    const str = () => {
        i++; // the opening quote
        let s = "";
        for (;;) {
            const j = i;
            while (i < text.length && text[i] !== '"' && text[i] !== "\\" && text.charCodeAt(i) >= 0x20) i++;
            s += text.slice(j, i);
            if (i >= text.length) err("unterminated string");
            const c = text[i++];
            if (c === '"') return s;
            if (c !== "\\") err("control character in string");
            const e = text[i++];
            const simple = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" }[e];
            if (simple !== undefined) s += simple;
            else if (e === "u" && /^[0-9a-fA-F]{4}$/.test(text.slice(i, i + 4))) {
                s += String.fromCharCode(parseInt(text.slice(i, i + 4), 16));
                i += 4;
            } else err("invalid escape");
        }
    };
    const v = value(0);
    ws();
    if (i !== text.length) err("trailing characters");
    return v;
}

/** Compact JSON text, as serde_json writes it; BigInt as an integer. */
function stringifyJson(v) {
    try {
        return JSON.stringify(v);
    } catch (e) {
        if (!(e instanceof TypeError)) throw e;
    }
    return JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? { __synod_bigint: x.toString() } : x)).replace(
        /\{"__synod_bigint":"(-?[0-9]+)"\}/g,
        "$1",
    );
}

export const json = {
    parse: parseJson,
    stringify: stringifyJson,
    /** JSON bytes → value. */
    decode(bytes) {
        return parseJson(utf8Decode(bytes));
    },
    /** Value → JSON bytes. */
    encode(value) {
        return utf8Encode(stringifyJson(value));
    },
};

// --------------------------------------------------------------- errors --

/** A typed refusal: the host reports `kind` and `message` to the caller. */
export class SynodError extends Error {
    constructor(kind, message) {
        super(message);
        this.name = "SynodError";
        this.kind = kind;
    }
}

/** Construct (and `throw`) typed errors: `throw fail.rejected("...")`. */
export const fail = {
    /** The payload could not be understood (HTTP 400). */
    invalid: (message) => new SynodError("invalid-input", String(message)),
    /** Understood and refused by the plugin's rules (HTTP 422). */
    rejected: (message) => new SynodError("rejected", String(message)),
    /** The plugin could not do its job (HTTP 500). */
    internal: (message) => new SynodError("internal", String(message)),
};

function hostError(e) {
    // A host-error arrives as a thrown variant.
    const v = e && e.tag !== undefined ? e : e && e.payload && e.payload.tag !== undefined ? e.payload : null;
    if (v === null) return fail.internal(String(e));
    // As the Rust SDK maps them: both are the plugin's request refused.
    if (v.tag === "read-only") return fail.rejected("state is read-only in a query");
    return fail.rejected(String(v.val));
}

function hostCall(f) {
    try {
        return f();
    } catch (e) {
        throw hostError(e);
    }
}

// ------------------------------------------------------ host interfaces --

/** The plugin's own keys in the replicated state; values are JSON. */
export const state = {
    /** The value at `key` (`undefined` when absent). */
    get(key) {
        const raw = stateApi.get(key);
        if (raw === null || raw === undefined) return undefined;
        try {
            return json.decode(raw);
        } catch (e) {
            throw fail.internal(`stored value at \`${key}\` is not valid: ${e.message}`);
        }
    },
    /** Store `value` (as JSON) at `key`; durable when the handler succeeds. */
    set(key, value) {
        hostCall(() => stateApi.set(key, json.encode(value)));
    },
    /** Remove `key`. */
    delete(key) {
        hostCall(() => stateApi.delete(key));
    },
    /** Up to `limit` `[key, value]` pairs whose key starts with `prefix`, in key order. */
    scan(prefix, limit = 1000) {
        return stateApi.scan(prefix, limit).map(([k, v]) => [k, json.decode(v)]);
    },
    /** Raw bytes at `key` (`undefined` when absent). */
    getBytes(key) {
        const raw = stateApi.get(key);
        return raw === null || raw === undefined ? undefined : raw;
    },
    /** Store raw bytes at `key`. */
    setBytes(key, bytes) {
        hostCall(() => stateApi.set(key, bytes));
    },
};

/** Events for subscribers outside the cluster, published after commit. */
export const events = {
    /** Emit `payload` (as JSON) on `topic`. */
    emit(topic, payload) {
        hostCall(() => eventsApi.emit(topic, json.encode(payload)));
    },
};

/** Device shadows (see `wit/plugin.wit`, interface `devices`). */
export const devices = {
    /** The shadow of device `id` as an object, or `undefined`. */
    get(id) {
        const doc = devicesApi.get(id);
        return doc === null || doc === undefined ? undefined : parseJson(doc);
    },
    /** Up to `limit` device ids starting with `prefix`. */
    listIds(prefix = "", limit = 1000) {
        return devicesApi.listIds(prefix, limit);
    },
    /** Merge `patch` into the device's desired state. */
    setDesired(id, patch) {
        hostCall(() => devicesApi.setDesired(id, stringifyJson(patch)));
    },
};

function line(args) {
    return args.map((a) => (typeof a === "string" ? a : safeString(a))).join(" ");
}

function safeString(a) {
    try {
        return a instanceof Error ? String(a) : stringifyJson(a);
    } catch {
        return String(a);
    }
}

/** The plugin log (kept by the node, bounded, never replicated). */
export const log = {
    trace: (...a) => logApi.write("trace", line(a)),
    debug: (...a) => logApi.write("debug", line(a)),
    info: (...a) => logApi.write("info", line(a)),
    warn: (...a) => logApi.write("warn", line(a)),
    error: (...a) => logApi.write("error", line(a)),
};

// --------------------------------------------------- determinism shims --

let nowMs = 0;
let pool = [];
let poolAt = 0;

function randomByte() {
    if (poolAt >= pool.length) {
        pool = randomApi.fill(256);
        poolAt = 0;
    }
    return pool[poolAt++];
}

/** Deterministic randomness from the host (the same on every node). */
export const random = {
    /** A float in [0, 1) from 53 random bits. */
    float() {
        let x = 0;
        for (let k = 0; k < 7; k++) x = x * 256 + randomByte();
        return Math.floor(x / 8) / 9007199254740992; // 56 bits → 53
    },
    /** An integer in [0, n). */
    int(n) {
        return Math.floor(random.float() * n);
    },
    /** `len` random bytes. */
    bytes(len) {
        const out = new Uint8Array(len);
        for (let k = 0; k < len; k++) out[k] = randomByte();
        return out;
    },
};

const HostDate = globalThis.Date;
class EntryDate extends HostDate {
    constructor(...args) {
        if (args.length === 0) super(nowMs);
        else super(...args);
    }
    static now() {
        return nowMs;
    }
}
globalThis.Date = EntryDate;
Math.random = random.float;
globalThis.crypto = {
    getRandomValues(array) {
        const bytes = random.bytes(array.byteLength);
        new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(bytes);
        return array;
    },
};
globalThis.performance = { now: () => 0 };
globalThis.console = { log: log.info, info: log.info, debug: log.debug, warn: log.warn, error: log.error, trace: log.trace };

// ------------------------------------------------------------- registry --

const commands = new Map();
const queries = new Map();

/** Register command `name`: `fn(input, ctx)` runs when its entry is
 * applied, with `input` the parsed JSON payload (`undefined` when empty). What it
 * returns is the reply (as JSON; a `Uint8Array` as raw bytes). */
export function command(name, fn) {
    commands.set(name, fn);
}

/** Register query `name`: `fn(input, ctx)` answers read-only. */
export function query(name, fn) {
    queries.set(name, fn);
}

function context(ctx) {
    return {
        index: ctx.index,
        term: ctx.term,
        timestampMs: ctx.timestampMs,
        caller: ctx.caller,
    };
}

function run(fns, kind, name, payload, ctx) {
    nowMs = Number(ctx.timestampMs);
    pool = [];
    poolAt = 0;
    const fn = fns.get(name);
    try {
        if (fn === undefined) throw fail.invalid(`unknown ${kind} \`${name}\``);
        let input = undefined;
        if (payload.length > 0) {
            try {
                input = json.decode(payload);
            } catch (e) {
                throw e instanceof SynodError ? e : fail.invalid(`payload is not JSON: ${e.message}`);
            }
        }
        const out = fn(input, context(ctx));
        return out instanceof Uint8Array ? out : json.encode(out === undefined ? null : out);
    } catch (e) {
        if (e instanceof SynodError) throw { tag: e.kind, val: e.message };
        const text = e instanceof Error ? `${e.name}: ${e.message}\n${e.stack ?? ""}`.trimEnd() : String(e);
        throw { tag: "internal", val: `uncaught exception: ${text}` };
    }
}

/** The `handler` export: `export { handler } from "@synod/sdk"`. */
export const handler = {
    describe() {
        return { commands: [...commands.keys()], queries: [...queries.keys()] };
    },
    handle(ctx, cmd) {
        return run(commands, "command", cmd.name, cmd.payload, ctx);
    },
    query(ctx, name, payload) {
        return run(queries, "query", name, payload, ctx);
    },
};
