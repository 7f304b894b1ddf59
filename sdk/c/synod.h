/*
 * synod.h — write Synod command handlers in C.
 *
 * A plugin is a table of commands and a table of queries, each a name and a
 * handler, exported with SYNOD_PLUGIN. The host calls a command's handler
 * once for every committed command, on every node, in log order; the
 * handler reads and writes the plugin's own key-value namespace
 * (synod_state_*), emits events (synod_events_emit), writes the plugin log
 * (synod_log) and draws randomness (synod_random_*). Everything it sees
 * comes from the log entry, so every node computes the same result.
 *
 *     static synod_status_t bump(const synod_context_t *ctx, synod_bytes_t payload,
 *                                synod_buf_t *reply) {
 *         int64_t by = 1;
 *         if (payload.len && synod_json_get_i64(payload, "by", &by) != SYNOD_FIELD_OK)
 *             return synod_fail_invalid("`%s` wants {\"by\": <integer>}", ctx->name);
 *         synod_buf_t old = SYNOD_BUF_INIT, now = SYNOD_BUF_INIT;
 *         int64_t value = 0;
 *         bool bad = synod_state_get("n", &old) && !synod_json_i64(synod_buf_bytes(&old), &value);
 *         synod_buf_free(&old);
 *         if (bad) return synod_fail_internal("stored n is not an integer");
 *         synod_buf_put_i64(&now, value + by);   // (overflow check left out)
 *         synod_status_t st = synod_state_set("n", now.ptr, now.len);
 *         if (st == SYNOD_OK) synod_buf_printf(reply, "{\"n\":%s}", (char *)now.ptr);
 *         synod_buf_free(&now);
 *         return st;
 *     }
 *     static const synod_entry_t commands[] = { { "bump", bump }, SYNOD_END };
 *     SYNOD_PLUGIN(commands, NULL);   // no queries
 *
 * plugins/counter-c is a complete plugin.
 *
 * Errors. A handler returns SYNOD_OK or the kind of its failure. A failing
 * SDK call (a refused state write, say) records its message and returns its
 * kind, so the usual shape is
 *
 *     synod_status_t st = synod_state_set("k", "1", 1);
 *     if (st != SYNOD_OK) return st;
 *
 * and a handler refuses with `return synod_fail_rejected("too big: %d", n);`.
 * The kinds are the WIT `error` variant: invalid-input (HTTP 400), rejected
 * (HTTP 422), internal. A refused write (host-error) is `rejected`, as in
 * the Rust SDK. A bug is SYNOD_PANIC(...): it logs "panicked: …" and traps,
 * which the host reports as "plugin panicked: …".
 *
 * Memory. Allocate with malloc; out of memory traps, like Rust's. The host
 * makes a fresh instance for every command, so nothing survives between
 * commands and a leak lasts one command; the SDK still frees what it owns.
 *
 * Determinism (wit/README.md): the only clock is ctx->timestamp_ms, the only
 * randomness synod_random_*. libc's time(), clock_gettime() or getentropy()
 * would import WASI, and a component that imports WASI is refused at upload
 * (plugin.mk checks for it at build time). libc's rand() imports nothing but
 * starts from the same seed in every instance, so it repeats in every
 * command: use synod_random_u64(). printf() and friends write to the plugin
 * log (sdk/c/wasi_stubs.c). Floating point is deterministic in the engine
 * (NaNs canonicalized), but the JSON helpers here are integer-only on
 * purpose: a plugin that needs floats parses and formats them itself.
 *
 * JSON. C has no JSON library here; the helpers below are deliberately
 * minimal: a strict validator (RFC 8259, as serde_json reads it), iteration
 * over one object or array, and readers for an integer (i64) and a string
 * value; for output, a growable buffer with a JSON string escaper. They do
 * not build trees and do not read floats.
 *
 * Build: sdk/c/README.md and sdk/c/plugin.mk. The bindings underneath are
 * sdk/c/gen/ (wit-bindgen 0.60.0, world synod:plugin/command-handler@0.1.1).
 */
#ifndef SYNOD_H
#define SYNOD_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SYNOD_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define SYNOD_NORETURN __attribute__((noreturn))

/* ------------------------------------------------------------------------ */
/* Outcomes                                                                  */

/* What a handler (or a failing SDK call) returns. */
typedef enum synod_status {
    SYNOD_OK = 0,
    /* The payload could not be understood (WIT invalid-input, HTTP 400). */
    SYNOD_INVALID_INPUT = 1,
    /* Understood and refused by the plugin's rules (WIT rejected, HTTP 422). */
    SYNOD_REJECTED = 2,
    /* The plugin could not do its job for a reason of its own (WIT internal). */
    SYNOD_INTERNAL = 3,
} synod_status_t;

/* Record the message of the command's error and return its kind; printf
 * style (pass "%s" for text you did not write yourself). The last message
 * recorded is the one the caller sees. */
synod_status_t synod_fail_invalid(const char *fmt, ...) SYNOD_PRINTF(1, 2);
synod_status_t synod_fail_rejected(const char *fmt, ...) SYNOD_PRINTF(1, 2);
synod_status_t synod_fail_internal(const char *fmt, ...) SYNOD_PRINTF(1, 2);

/* A bug: log "panicked: <message> at <file>:<line>" and trap. The host
 * reports the command as "plugin panicked: …". assert() does the same. */
#define SYNOD_PANIC(...) synod_panic_at(__FILE__, __LINE__, __VA_ARGS__)
SYNOD_NORETURN void synod_panic_at(const char *file, int line, const char *fmt, ...) SYNOD_PRINTF(3, 4);

/* ------------------------------------------------------------------------ */
/* Bytes                                                                     */

/* A borrowed run of bytes (not NUL-terminated unless said so). */
typedef struct synod_bytes {
    const uint8_t *ptr;
    size_t len;
} synod_bytes_t;

/* A growable byte buffer owned by whoever declared it. `ptr` is NULL until
 * the first write and is always NUL-terminated after it (the NUL is not
 * counted in `len`), so text can be read as a C string. Start with
 * SYNOD_BUF_INIT; release with synod_buf_free. Growth traps when memory
 * runs out. */
typedef struct synod_buf {
    uint8_t *ptr;
    size_t len;
    size_t cap;
} synod_buf_t;

#define SYNOD_BUF_INIT {NULL, 0, 0}

void synod_buf_put(synod_buf_t *buf, const void *data, size_t len);
void synod_buf_puts(synod_buf_t *buf, const char *text);
void synod_buf_put_i64(synod_buf_t *buf, int64_t value);
void synod_buf_put_u64(synod_buf_t *buf, uint64_t value);
void synod_buf_printf(synod_buf_t *buf, const char *fmt, ...) SYNOD_PRINTF(2, 3);
/* Append `len` bytes of UTF-8 text as one JSON string, quotes included,
 * escaped exactly as serde_json writes it (`"` `\` and control characters;
 * everything else verbatim), so a value stored by a C plugin reads back
 * byte for byte like one stored by a Rust plugin. */
void synod_buf_put_json_string(synod_buf_t *buf, const void *utf8, size_t len);
/* Empty the buffer, keeping its memory. */
void synod_buf_clear(synod_buf_t *buf);
void synod_buf_free(synod_buf_t *buf);
static inline synod_bytes_t synod_buf_bytes(const synod_buf_t *buf) {
    synod_bytes_t b = {buf->ptr, buf->len};
    return b;
}

/* ------------------------------------------------------------------------ */
/* Handlers                                                                  */

/* Where and when a command runs; every field comes from the log entry. */
typedef struct synod_context {
    /* Log index and Raft term of the entry (both 0 for queries). */
    uint64_t index;
    uint64_t term;
    /* The leader's clock when it accepted the command: the only clock. */
    uint64_t timestamp_ms;
    /* Who sent it (the authenticated caller, or "anonymous"); NUL-terminated. */
    const char *caller;
    size_t caller_len;
    /* The command or query being run; NUL-terminated. */
    const char *name;
    size_t name_len;
} synod_context_t;

/* A command or query handler. `payload` is the caller's bytes (JSON by
 * convention, possibly empty). On SYNOD_OK, what the handler wrote to
 * `reply` is the output; on any other status the output is the recorded
 * error and the command's writes and events are dropped. */
typedef synod_status_t (*synod_handler_fn)(const synod_context_t *ctx, synod_bytes_t payload,
                                           synod_buf_t *reply);

/* One row of a command or query table. */
typedef struct synod_entry {
    /* 1–64 characters of a-z 0-9 _ -, starting with a letter (the host
     * refuses other names: they appear in URLs and NATS subjects). */
    const char *name;
    synod_handler_fn handler;
} synod_entry_t;

/* Ends a table. */
#define SYNOD_END {NULL, NULL}

/* What a plugin exports: its tables (each ended by SYNOD_END). */
typedef struct synod_plugin {
    const synod_entry_t *commands;
    /* May be NULL: no queries. */
    const synod_entry_t *queries;
} synod_plugin_t;

/* Defined once per plugin, with SYNOD_PLUGIN; `describe` lists these names,
 * `handle` and `query` dispatch on them. */
extern const synod_plugin_t synod_plugin;

#define SYNOD_PLUGIN(commands_, queries_) const synod_plugin_t synod_plugin = {(commands_), (queries_)}

/* ------------------------------------------------------------------------ */
/* Host interfaces                                                           */

/* state: the plugin's own key-value namespace. Keys are NUL-terminated
 * UTF-8; values are bytes (the Rust SDK stores JSON; do the same to share
 * state with Rust builds of a plugin). */

/* The value at `key` into `value` (emptied first), seeing this command's
 * own writes; false if there is none. */
bool synod_state_get(const char *key, synod_buf_t *value);
/* Store `len` bytes at `key`; committed only if the handler returns
 * SYNOD_OK. SYNOD_REJECTED in a query or past a limit. */
synod_status_t synod_state_set(const char *key, const void *value, size_t len);
/* Remove `key` (a missing key is fine). SYNOD_REJECTED as for set. */
synod_status_t synod_state_delete(const char *key);
/* Called by synod_state_scan for each entry; the arguments live until it
 * returns. `key` is NUL-terminated. */
typedef void (*synod_scan_fn)(const char *key, size_t key_len, synod_bytes_t value, void *user);
/* Up to `limit` entries whose key starts with `prefix`, in byte order of
 * the key; returns how many were visited. */
size_t synod_state_scan(const char *prefix, uint32_t limit, synod_scan_fn each, void *user);

/* events: emit `len` bytes (JSON by convention) on `topic` (dot-separated
 * words), published after the command commits. SYNOD_REJECTED in a query or
 * past a limit. */
synod_status_t synod_events_emit(const char *topic, const void *payload, size_t len);

/* log: bounded lines kept by the node, never replicated. */
typedef enum synod_log_level {
    SYNOD_LOG_TRACE = 0,
    SYNOD_LOG_DEBUG = 1,
    SYNOD_LOG_INFO = 2,
    SYNOD_LOG_WARN = 3,
    SYNOD_LOG_ERROR = 4,
} synod_log_level_t;

/* One log line, printf style. */
void synod_log(synod_log_level_t level, const char *fmt, ...) SYNOD_PRINTF(2, 3);
/* One log line of `len` bytes, as is. */
void synod_log_bytes(synod_log_level_t level, const void *text, size_t len);

/* random: this command's deterministic stream (seeded from the entry's
 * index and term, the same on every node; not secret). */
uint64_t synod_random_u64(void);
/* Fill `len` bytes (any length: asked for in 4096-byte pieces). */
void synod_random_fill(void *out, size_t len);

/* devices: the device shadows as of the entry being applied. */

/* The shadow of device `id` as a JSON document into `doc` (emptied first);
 * false if there is no such device. */
bool synod_device_get(const char *id, synod_buf_t *doc);
/* Called by synod_device_list for each id (NUL-terminated). */
typedef void (*synod_id_fn)(const char *id, size_t id_len, void *user);
/* Up to `limit` device ids starting with `prefix`, in byte order; returns
 * how many were visited. */
size_t synod_device_list(const char *prefix, uint32_t limit, synod_id_fn each, void *user);
/* Merge the JSON object `patch` into the desired state of device `id` (a
 * field set to null is removed). SYNOD_REJECTED for a missing device, a
 * patch that is not an object, a shadow past its size cap, or a query. */
synod_status_t synod_device_set_desired(const char *id, const char *patch, size_t len);

/* ------------------------------------------------------------------------ */
/* Minimal JSON reading                                                      */

/* Why a document is not JSON: serde_json's wording, and where (1-based;
 * the column counts bytes). */
typedef struct synod_json_error {
    const char *reason;
    size_t line;
    size_t column;
} synod_json_error_t;

/* True if `doc` is exactly one JSON value (whitespace around it allowed),
 * checked the way serde_json reads it: strict numbers, escapes, paired
 * surrogates, valid UTF-8 in strings, no control characters in strings,
 * nesting at most 128 deep. Otherwise false and `err` (if not NULL) says why.
 * The functions below expect a document that passed this check. */
bool synod_json_validate(synod_bytes_t doc, synod_json_error_t *err);

typedef enum synod_json_type {
    SYNOD_JSON_NONE = 0, /* empty or not JSON */
    SYNOD_JSON_NULL,
    SYNOD_JSON_BOOL,
    SYNOD_JSON_NUMBER,
    SYNOD_JSON_STRING,
    SYNOD_JSON_ARRAY,
    SYNOD_JSON_OBJECT,
} synod_json_type_t;

/* The type of a (validated) value, from its first byte. */
synod_json_type_t synod_json_type(synod_bytes_t value);

/* Walks the members of one object or the elements of one array. */
typedef struct synod_json_iter {
    const uint8_t *pos;
    const uint8_t *end;
    bool object;
    bool done;
} synod_json_iter_t;

/* Start walking the (validated) object or array `value`; false if it is
 * neither. */
bool synod_json_iter(synod_bytes_t value, synod_json_iter_t *it);
/* The next member: for an object its key (the raw string token, quotes
 * included: compare it with synod_json_key_is) and value; for an array
 * key = {NULL, 0} and the element. Values are raw JSON tokens. False at
 * the end. */
bool synod_json_next(synod_json_iter_t *it, synod_bytes_t *key, synod_bytes_t *value);
/* True if the raw key token decodes to exactly `name` (escapes decoded, so
 * "b\u0079" is "by", as serde_json sees it). */
bool synod_json_key_is(synod_bytes_t key, const char *name);

/* Read an integer that fits in int64_t. The JSON number must be an integer
 * as serde_json reads i64: no fraction, no exponent, not "-0", in range.
 * False otherwise (a float, a string, out of range, ...). */
bool synod_json_i64(synod_bytes_t value, int64_t *out);
/* Decode a JSON string value into `out` (emptied first): UTF-8, escapes
 * decoded, may contain NUL bytes. False if `value` is not a string. */
bool synod_json_string(synod_bytes_t value, synod_buf_t *out);
/* serde's name for what a value is, for error messages: "null",
 * "boolean", "integer", "floating point", "string", "sequence", "map". */
const char *synod_json_describe(synod_bytes_t value);

/* The minimal field reader: the integer at `key` of the flat JSON object
 * `doc`. The first member named `key` wins; other members are not
 * looked at beyond being valid JSON. */
typedef enum synod_field {
    SYNOD_FIELD_OK = 0,
    /* `doc` is a JSON object without a member `key`. */
    SYNOD_FIELD_MISSING,
    /* `doc` is not valid JSON, or not an object. */
    SYNOD_FIELD_MALFORMED,
    /* The member is there but not an integer that fits in int64_t. */
    SYNOD_FIELD_WRONG_TYPE,
} synod_field_t;

synod_field_t synod_json_get_i64(synod_bytes_t doc, const char *key, int64_t *out);

#ifdef __cplusplus
}
#endif

#endif /* SYNOD_H */
