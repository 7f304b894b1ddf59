// misbehave-js: a test plugin that reaches for everything in JavaScript that
// could make two nodes disagree. Each command returns what it saw; the
// determinism test runs a random sequence of them on two runtimes and
// requires identical outputs, fuel, writes, events and digests.

import { command, query, state, events, fail, handler } from "@synod/sdk";

command("clock", (_input, ctx) => ({
    now: Date.now(),
    iso: new Date().toISOString(),
    entry: ctx.timestampMs,
    perf: performance.now(),
}));

command("random", () => {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return { a: Math.random(), b: Math.random(), bytes: Array.from(bytes) };
});

command("floats", (input) => {
    const x = (input?.x ?? 1) / 7;
    return {
        sin: Math.sin(x),
        exp: Math.exp(x),
        pow: Math.pow(x, 0.3),
        sqrt: Math.sqrt(x),
        atan2: Math.atan2(x, 3),
        sum: [0.1, 0.2, 0.3].reduce((a, b) => a + b),
        nan: String(0 / 0),
        fixed: (x * 1e6).toFixed(3),
    };
});

command("order", (input) => {
    // Objects, Maps and Sets keep insertion order; integer-like keys sort.
    const obj = {};
    const set = new Set();
    const map = new Map();
    for (const k of input?.keys ?? []) {
        obj[k] = k.length;
        set.add(k);
        map.set(k, k.length);
        if (k.length % 3 === 0) {
            delete obj[k];
            set.delete(k);
        }
    }
    const sorted = [...set].sort();
    return { obj: Object.keys(obj), set: [...set], map: [...map.keys()], sorted, json: JSON.stringify(obj) };
});

command("write", (input, ctx) => {
    const n = (state.get("writes") ?? 0) + 1;
    state.set("writes", n);
    state.set(`w/${ctx.index % 7}`, { n, r: Math.random(), at: Date.now() });
    events.emit("wrote", { n });
    return { n };
});

command("throw", () => {
    const o = null;
    return o.field; // TypeError: uncaught, reported as internal with its stack
});

command("fail", (input) => {
    throw input?.kind === "invalid" ? fail.invalid("bad input") : fail.rejected("refused by rule");
});

command("spin", () => {
    let i = 0;
    for (;;) i++; // runs out of fuel at the same instruction everywhere
});

command("alloc", () => {
    const chunks = [];
    for (let i = 0; i < 1e9; i++) chunks.push(new Array(65536).fill(i)); // out of memory
    return chunks.length;
});

query("writes", () => ({ writes: state.get("writes") ?? 0 }));

export { handler };
