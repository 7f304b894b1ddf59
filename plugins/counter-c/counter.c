/*
 * counter-c: the counter plugin (plugins/counter) written in C with the C
 * SDK (sdk/c). One integer, three operations:
 *
 * - command `increment` {"by": n, "note": "…"} (default 1; the note, if
 *   any, is stored under `note`) → {"value": v}
 * - command `reset` {} → {"value": 0}, emits `reset` {"previous": p}
 * - query `get` → {"value": v}
 *
 * It is meant to be interchangeable with the Rust counter: the same names
 * in `describe`, the same replies and events byte for byte, the same error
 * kinds, and the same state encoding (the value as a JSON integer under
 * `value`, the note as a JSON string under `note`), so either build can take
 * over the other's state. Its payload is read as serde would read the Rust
 * counter's `Increment` (deny_unknown_fields): an object with `by` (an
 * integer that fits in i64) and `note` (a string or null), or the same two
 * as an array; anything else is invalid input. Error messages name the same
 * problem but are not serde's text word for word. Overflow is rejected.
 *
 * Built with `make V2=1`, every reply also carries "version": 2, like the
 * Rust counter's `v2` feature.
 */
#include <stdbool.h>
#include <stdint.h>

#include "synod.h"

#define KEY "value"

#ifdef COUNTER_V2
#define VERSION_FIELD ",\"version\":2"
#else
#define VERSION_FIELD ""
#endif

static void reply_value(synod_buf_t *reply, int64_t value) {
    synod_buf_puts(reply, "{\"value\":");
    synod_buf_put_i64(reply, value);
    synod_buf_puts(reply, VERSION_FIELD "}");
}

/* Why `value` (valid JSON) is not an i64, in serde's words. */
static void not_i64(synod_buf_t *why, synod_bytes_t value) {
    const char *kind = synod_json_describe(value);
    if (kind[0] == 'i') /* an integer past INT64_MAX */
        synod_buf_printf(why, "invalid value: integer `%.*s`, expected i64", (int)value.len, value.ptr);
    else
        synod_buf_printf(why, "invalid type: %s, expected i64", kind);
}

/* The counter, 0 when nothing is stored yet. */
static synod_status_t current(int64_t *value) {
    synod_buf_t stored = SYNOD_BUF_INIT;
    synod_buf_t why = SYNOD_BUF_INIT;
    *value = 0;
    if (synod_state_get(KEY, &stored)) {
        synod_bytes_t bytes = synod_buf_bytes(&stored);
        synod_json_error_t e;
        if (!synod_json_validate(bytes, &e))
            synod_buf_printf(&why, "%s at line %zu column %zu", e.reason, e.line, e.column);
        else if (!synod_json_i64(bytes, value))
            not_i64(&why, bytes);
    }
    synod_status_t st = SYNOD_OK;
    if (why.len) st = synod_fail_internal("stored value at `" KEY "` is not valid: %s", (char *)why.ptr);
    synod_buf_free(&why);
    synod_buf_free(&stored);
    return st;
}

/* An `increment` payload. */
typedef struct increment {
    int64_t by;
    bool has_note;
    synod_buf_t note;
} increment_t;

/* `by`; false with the reason in `why` otherwise. */
static bool read_by(synod_bytes_t value, increment_t *inc, synod_buf_t *why) {
    if (synod_json_i64(value, &inc->by)) return true;
    not_i64(why, value);
    return false;
}

/* `note`: a string, or null for none. */
static bool read_note(synod_bytes_t value, increment_t *inc, synod_buf_t *why) {
    if (synod_json_type(value) == SYNOD_JSON_NULL) return true;
    if (synod_json_string(value, &inc->note)) {
        inc->has_note = true;
        return true;
    }
    synod_buf_printf(why, "invalid type: %s, expected a string", synod_json_describe(value));
    return false;
}

/* Read the payload as the Rust counter's `Increment` is read; the reason
 * in `why` when it cannot be. */
static void read_increment(synod_bytes_t payload, increment_t *inc, synod_buf_t *why) {
    synod_json_error_t e;
    if (!synod_json_validate(payload, &e)) {
        synod_buf_printf(why, "%s at line %zu column %zu", e.reason, e.line, e.column);
        return;
    }
    synod_json_iter_t it;
    if (!synod_json_iter(payload, &it)) {
        synod_buf_printf(why, "invalid type: %s, expected struct Increment", synod_json_describe(payload));
        return;
    }
    synod_bytes_t key, value;
    if (!it.object) {
        /* serde also reads a struct from an array of its fields in order. */
        size_t i = 0;
        while (synod_json_next(&it, &key, &value)) {
            bool ok = i == 0   ? read_by(value, inc, why)
                      : i == 1 ? read_note(value, inc, why)
                               : (synod_buf_puts(why, "trailing characters: more than 2 fields"), false);
            if (!ok) return;
            i++;
        }
        return;
    }
    bool seen_by = false, seen_note = false;
    while (synod_json_next(&it, &key, &value)) {
        if (synod_json_key_is(key, "by")) {
            if (seen_by) {
                synod_buf_puts(why, "duplicate field `by`");
                return;
            }
            seen_by = true;
            if (!read_by(value, inc, why)) return;
        } else if (synod_json_key_is(key, "note")) {
            if (seen_note) {
                synod_buf_puts(why, "duplicate field `note`");
                return;
            }
            seen_note = true;
            if (!read_note(value, inc, why)) return;
        } else {
            synod_buf_t name = SYNOD_BUF_INIT;
            synod_json_string(key, &name);
            synod_buf_printf(why, "unknown field `%s`, expected `by` or `note`", name.ptr ? (char *)name.ptr : "");
            synod_buf_free(&name);
            return;
        }
    }
}

static synod_status_t increment(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    increment_t inc = {.by = 1, .has_note = false, .note = SYNOD_BUF_INIT};
    synod_status_t st = SYNOD_OK;
    if (payload.len) {
        synod_buf_t why = SYNOD_BUF_INIT;
        read_increment(payload, &inc, &why);
        if (why.len) st = synod_fail_invalid("invalid `%s` payload: %s", ctx->name, (char *)why.ptr);
        synod_buf_free(&why);
    }
    if (st == SYNOD_OK && inc.has_note) {
        synod_buf_t json = SYNOD_BUF_INIT;
        synod_buf_put_json_string(&json, inc.note.ptr, inc.note.len);
        st = synod_state_set("note", json.ptr, json.len);
        synod_buf_free(&json);
    }
    synod_buf_free(&inc.note);
    if (st != SYNOD_OK) return st;

    int64_t value;
    if ((st = current(&value)) != SYNOD_OK) return st;
    if (__builtin_add_overflow(value, inc.by, &value))
        return synod_fail_rejected("adding %lld would overflow the counter", (long long)inc.by);

    synod_buf_t stored = SYNOD_BUF_INIT;
    synod_buf_put_i64(&stored, value);
    st = synod_state_set(KEY, stored.ptr, stored.len);
    synod_buf_free(&stored);
    if (st != SYNOD_OK) return st;
    reply_value(reply, value);
    return SYNOD_OK;
}

static synod_status_t reset(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    int64_t previous;
    synod_status_t st;
    if ((st = current(&previous)) != SYNOD_OK) return st;
    if ((st = synod_state_set(KEY, "0", 1)) != SYNOD_OK) return st;

    synod_buf_t event = SYNOD_BUF_INIT;
    synod_buf_puts(&event, "{\"previous\":");
    synod_buf_put_i64(&event, previous);
    synod_buf_puts(&event, "}");
    st = synod_events_emit("reset", event.ptr, event.len);
    synod_buf_free(&event);
    if (st != SYNOD_OK) return st;

    reply_value(reply, 0);
    return SYNOD_OK;
}

static synod_status_t get(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    int64_t value;
    synod_status_t st;
    if ((st = current(&value)) != SYNOD_OK) return st;
    reply_value(reply, value);
    return SYNOD_OK;
}

static const synod_entry_t commands[] = {
    {"increment", increment},
    {"reset", reset},
    SYNOD_END,
};

static const synod_entry_t queries[] = {
    {"get", get},
    SYNOD_END,
};

SYNOD_PLUGIN(commands, queries);
