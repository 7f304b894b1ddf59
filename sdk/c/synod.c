/*
 * synod.c — the C SDK over the generated bindings (gen/command_handler.h).
 *
 * In: the host's calls to the exported `handler` interface (describe,
 * handle, query). Out: the plugin's handler called through its table, its
 * reply or error handed back in the shapes the canonical ABI expects, and
 * thin wrappers that turn the imported interfaces' results into
 * synod_status_t. See synod.h for the contract.
 */
#include "synod.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gen/command_handler.h"

/* ------------------------------------------------------------------------ */
/* Buffers                                                                   */

/* Room for `extra` more bytes plus the NUL. Out of memory traps: the host
 * reports it as out-of-memory because its growth was refused. */
static void buf_reserve(synod_buf_t *buf, size_t extra) {
    if (extra > SIZE_MAX - buf->len - 1) __builtin_trap();
    size_t need = buf->len + extra + 1;
    if (need <= buf->cap) return;
    size_t cap = buf->cap ? buf->cap : 64;
    while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    uint8_t *ptr = realloc(buf->ptr, cap);
    if (!ptr) __builtin_trap();
    buf->ptr = ptr;
    buf->cap = cap;
}

void synod_buf_put(synod_buf_t *buf, const void *data, size_t len) {
    buf_reserve(buf, len);
    if (len) memcpy(buf->ptr + buf->len, data, len);
    buf->len += len;
    buf->ptr[buf->len] = 0;
}

void synod_buf_puts(synod_buf_t *buf, const char *text) {
    synod_buf_put(buf, text, strlen(text));
}

void synod_buf_put_u64(synod_buf_t *buf, uint64_t value) {
    char digits[20];
    size_t n = 0;
    do {
        digits[sizeof digits - ++n] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    synod_buf_put(buf, digits + sizeof digits - n, n);
}

void synod_buf_put_i64(synod_buf_t *buf, int64_t value) {
    if (value < 0) {
        synod_buf_put(buf, "-", 1);
        /* Negate in unsigned arithmetic: INT64_MIN has no positive twin. */
        synod_buf_put_u64(buf, (uint64_t)0 - (uint64_t)value);
    } else {
        synod_buf_put_u64(buf, (uint64_t)value);
    }
}

static void buf_vprintf(synod_buf_t *buf, const char *fmt, va_list ap) {
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, again);
    va_end(again);
    if (n <= 0) return;
    buf_reserve(buf, (size_t)n);
    vsnprintf((char *)buf->ptr + buf->len, (size_t)n + 1, fmt, ap);
    buf->len += (size_t)n;
}

void synod_buf_printf(synod_buf_t *buf, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(buf, fmt, ap);
    va_end(ap);
}

void synod_buf_put_json_string(synod_buf_t *buf, const void *utf8, size_t len) {
    static const char hex[] = "0123456789abcdef";
    const uint8_t *s = utf8;
    size_t start = 0;
    synod_buf_put(buf, "\"", 1);
    for (size_t i = 0; i < len; i++) {
        uint8_t c = s[i];
        char esc[6];
        size_t n = 2;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            if (c >= 0x20) continue;
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 0xf];
            n = 6;
        }
        synod_buf_put(buf, s + start, i - start);
        synod_buf_put(buf, esc, n);
        start = i + 1;
    }
    synod_buf_put(buf, s + start, len - start);
    synod_buf_put(buf, "\"", 1);
}

void synod_buf_clear(synod_buf_t *buf) {
    buf->len = 0;
    if (buf->ptr) buf->ptr[0] = 0;
}

void synod_buf_free(synod_buf_t *buf) {
    free(buf->ptr);
    buf->ptr = NULL;
    buf->len = 0;
    buf->cap = 0;
}

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                     */

/* Length of the well-formed UTF-8 sequence at `p` (1–4), or 0. Overlong
 * forms, surrogates and code points past U+10FFFF are not well-formed. */
static size_t utf8_seq(const uint8_t *p, const uint8_t *end) {
    uint8_t c = p[0];
    if (c < 0x80) return 1;
    size_t n;
    uint8_t lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        return 0;
    }
    if ((size_t)(end - p) < n) return 0;
    if (p[1] < lo || p[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if ((p[i] & 0xc0) != 0x80) return 0;
    return n;
}

/* The host traps on a string that is not UTF-8 (the canonical ABI says
 * strings are). Text the plugin did not check itself (log lines, error
 * messages) is made valid instead: a bad byte and the continuation bytes
 * after it become one U+FFFD. */
static void utf8_repair(synod_buf_t *buf) {
    const uint8_t *p = buf->ptr, *end = buf->ptr + buf->len;
    while (p < end) {
        size_t n = utf8_seq(p, end);
        if (!n) break;
        p += n;
    }
    if (p == end) return;
    synod_buf_t fixed = SYNOD_BUF_INIT;
    synod_buf_put(&fixed, buf->ptr, (size_t)(p - buf->ptr));
    while (p < end) {
        size_t n = utf8_seq(p, end);
        if (n) {
            synod_buf_put(&fixed, p, n);
            p += n;
            continue;
        }
        synod_buf_put(&fixed, "\xef\xbf\xbd", 3);
        p++;
        while (p < end && (*p & 0xc0) == 0x80) p++;
    }
    synod_buf_free(buf);
    *buf = fixed;
}

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */

/* The message of the command's error: the last one recorded. Reset at the
 * start of every call, handed to the host (which frees it) at the end. */
static synod_buf_t error_message = SYNOD_BUF_INIT;
static bool error_recorded = false;

static synod_status_t record(synod_status_t kind, const char *fmt, va_list ap) {
    synod_buf_clear(&error_message);
    buf_vprintf(&error_message, fmt, ap);
    error_recorded = true;
    return kind;
}

static synod_status_t record_bytes(synod_status_t kind, const uint8_t *text, size_t len) {
    synod_buf_clear(&error_message);
    synod_buf_put(&error_message, text, len);
    error_recorded = true;
    return kind;
}

synod_status_t synod_fail_invalid(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    synod_status_t st = record(SYNOD_INVALID_INPUT, fmt, ap);
    va_end(ap);
    return st;
}

synod_status_t synod_fail_rejected(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    synod_status_t st = record(SYNOD_REJECTED, fmt, ap);
    va_end(ap);
    return st;
}

synod_status_t synod_fail_internal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    synod_status_t st = record(SYNOD_INTERNAL, fmt, ap);
    va_end(ap);
    return st;
}

/* A refused host call, as the Rust SDK's `From<HostError>`: the command's
 * fault either way, so `rejected`. Frees the host's message. */
static synod_status_t host_refused(synod_plugin_types_host_error_t *e, const char *read_only) {
    if (e->tag == SYNOD_PLUGIN_TYPES_HOST_ERROR_LIMIT_EXCEEDED) {
        synod_status_t st =
            record_bytes(SYNOD_REJECTED, e->val.limit_exceeded.ptr, e->val.limit_exceeded.len);
        command_handler_string_free(&e->val.limit_exceeded);
        return st;
    }
    return record_bytes(SYNOD_REJECTED, (const uint8_t *)read_only, strlen(read_only));
}

/* ------------------------------------------------------------------------ */
/* Log, panics                                                               */

void synod_log_bytes(synod_log_level_t level, const void *text, size_t len) {
    synod_buf_t line = SYNOD_BUF_INIT;
    synod_buf_put(&line, text, len);
    utf8_repair(&line);
    command_handler_string_t s = {line.ptr, line.len};
    synod_plugin_log_write((synod_plugin_log_level_t)level, &s);
    synod_buf_free(&line);
}

void synod_log(synod_log_level_t level, const char *fmt, ...) {
    synod_buf_t line = SYNOD_BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&line, fmt, ap);
    va_end(ap);
    synod_log_bytes(level, line.ptr, line.len);
    synod_buf_free(&line);
}

void synod_panic_at(const char *file, int line, const char *fmt, ...) {
    synod_buf_t why = SYNOD_BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&why, fmt, ap);
    va_end(ap);
    /* The host finds this prefix in the log and reports the trap as
     * "plugin panicked: …", as for a Rust panic. */
    synod_log(SYNOD_LOG_ERROR, "panicked: %s at %s:%d", why.ptr ? (char *)why.ptr : "", file, line);
    __builtin_trap();
}

/* libc's assert() ends here (wasi-libc would print to stderr and abort):
 * report it like a panic. */
SYNOD_NORETURN void __assert_fail(const char *expr, const char *file, int line, const char *func) {
    (void)func;
    synod_panic_at(file, line, "assertion failed: %s", expr);
}

/* ------------------------------------------------------------------------ */
/* Host interfaces                                                           */

static command_handler_string_t borrow(const char *text) {
    command_handler_string_t s = {(uint8_t *)text, strlen(text)};
    return s;
}

bool synod_state_get(const char *key, synod_buf_t *value) {
    command_handler_string_t k = borrow(key);
    command_handler_list_u8_t got;
    synod_buf_clear(value);
    if (!synod_plugin_state_get(&k, &got)) return false;
    synod_buf_put(value, got.ptr, got.len);
    command_handler_list_u8_free(&got);
    return true;
}

synod_status_t synod_state_set(const char *key, const void *value, size_t len) {
    command_handler_string_t k = borrow(key);
    command_handler_list_u8_t v = {(uint8_t *)value, len};
    synod_plugin_state_host_error_t e;
    if (synod_plugin_state_set(&k, &v, &e)) return SYNOD_OK;
    return host_refused(&e, "state is read-only in a query");
}

synod_status_t synod_state_delete(const char *key) {
    command_handler_string_t k = borrow(key);
    synod_plugin_state_host_error_t e;
    if (synod_plugin_state_delete(&k, &e)) return SYNOD_OK;
    return host_refused(&e, "state is read-only in a query");
}

size_t synod_state_scan(const char *prefix, uint32_t limit, synod_scan_fn each, void *user) {
    command_handler_string_t p = borrow(prefix);
    command_handler_list_tuple2_string_list_u8_t entries;
    synod_plugin_state_scan(&p, limit, &entries);
    synod_buf_t key = SYNOD_BUF_INIT;
    for (size_t i = 0; i < entries.len; i++) {
        command_handler_tuple2_string_list_u8_t *e = &entries.ptr[i];
        synod_buf_clear(&key);
        synod_buf_put(&key, e->f0.ptr, e->f0.len);
        synod_bytes_t value = {e->f1.len ? e->f1.ptr : (const uint8_t *)"", e->f1.len};
        each((const char *)key.ptr, key.len, value, user);
    }
    synod_buf_free(&key);
    size_t n = entries.len;
    command_handler_list_tuple2_string_list_u8_free(&entries);
    return n;
}

synod_status_t synod_events_emit(const char *topic, const void *payload, size_t len) {
    command_handler_string_t t = borrow(topic);
    command_handler_list_u8_t p = {(uint8_t *)payload, len};
    synod_plugin_events_host_error_t e;
    if (synod_plugin_events_emit(&t, &p, &e)) return SYNOD_OK;
    return host_refused(&e, "state is read-only in a query");
}

uint64_t synod_random_u64(void) {
    return synod_plugin_random_next_u64();
}

void synod_random_fill(void *out, size_t len) {
    uint8_t *dst = out;
    while (len) {
        uint32_t want = len > 4096 ? 4096 : (uint32_t)len;
        command_handler_list_u8_t got;
        synod_plugin_random_fill(want, &got);
        /* The host gives exactly `want` bytes; never read past what came. */
        size_t n = got.len < want ? got.len : want;
        if (!n) __builtin_trap();
        memcpy(dst, got.ptr, n);
        command_handler_list_u8_free(&got);
        dst += n;
        len -= n;
    }
}

bool synod_device_get(const char *id, synod_buf_t *doc) {
    command_handler_string_t i = borrow(id);
    command_handler_string_t got;
    synod_buf_clear(doc);
    if (!synod_plugin_devices_get(&i, &got)) return false;
    synod_buf_put(doc, got.ptr, got.len);
    command_handler_string_free(&got);
    return true;
}

size_t synod_device_list(const char *prefix, uint32_t limit, synod_id_fn each, void *user) {
    command_handler_string_t p = borrow(prefix);
    command_handler_list_string_t ids;
    synod_plugin_devices_list_ids(&p, limit, &ids);
    synod_buf_t id = SYNOD_BUF_INIT;
    for (size_t i = 0; i < ids.len; i++) {
        synod_buf_clear(&id);
        synod_buf_put(&id, ids.ptr[i].ptr, ids.ptr[i].len);
        each((const char *)id.ptr, id.len, user);
    }
    synod_buf_free(&id);
    size_t n = ids.len;
    command_handler_list_string_free(&ids);
    return n;
}

synod_status_t synod_device_set_desired(const char *id, const char *patch, size_t len) {
    command_handler_string_t i = borrow(id);
    command_handler_string_t p = {(uint8_t *)patch, len};
    synod_plugin_devices_host_error_t e;
    if (synod_plugin_devices_set_desired(&i, &p, &e)) return SYNOD_OK;
    return host_refused(&e, "desired state is read-only in a query");
}

/* ------------------------------------------------------------------------ */
/* The exported handler                                                      */

static size_t table_len(const synod_entry_t *table) {
    size_t n = 0;
    while (table && table[n].name) n++;
    return n;
}

static command_handler_list_string_t names_of(const synod_entry_t *table) {
    command_handler_list_string_t list = {NULL, table_len(table)};
    if (!list.len) return list;
    /* Owned copies: the generated post-return frees every string. */
    list.ptr = malloc(list.len * sizeof *list.ptr);
    if (!list.ptr) __builtin_trap();
    for (size_t i = 0; i < list.len; i++) command_handler_string_dup(&list.ptr[i], table[i].name);
    return list;
}

void exports_synod_plugin_handler_describe(exports_synod_plugin_handler_plugin_info_t *ret) {
    ret->commands = names_of(synod_plugin.commands);
    ret->queries = names_of(synod_plugin.queries);
}

/* `s` (owned, from the host) as a NUL-terminated C string, in place. */
static const char *c_string(command_handler_string_t *s) {
    if (!s->len) return "";
    uint8_t *p = realloc(s->ptr, s->len + 1);
    if (!p) __builtin_trap();
    p[s->len] = 0;
    s->ptr = p;
    return (const char *)p;
}

static synod_handler_fn find(const synod_entry_t *table, const command_handler_string_t *name) {
    for (size_t i = 0; table && table[i].name; i++)
        if (strlen(table[i].name) == name->len && !memcmp(table[i].name, name->ptr, name->len))
            return table[i].handler;
    return NULL;
}

/* Run one handle or query call: dispatch by name, then turn the status
 * into the WIT result. Takes ownership of every argument. */
static bool run(const synod_entry_t *table, const char *what, synod_plugin_types_command_context_t *wctx,
                command_handler_string_t *name, command_handler_list_u8_t *payload,
                command_handler_list_u8_t *ret, synod_plugin_types_error_t *err) {
    synod_buf_free(&error_message);
    error_recorded = false;

    synod_context_t ctx = {
        .index = wctx->index,
        .term = wctx->term,
        .timestamp_ms = wctx->timestamp_ms,
        .caller = c_string(&wctx->caller),
        .caller_len = wctx->caller.len,
        .name = c_string(name),
        .name_len = name->len,
    };
    synod_bytes_t body = {payload->len ? payload->ptr : (const uint8_t *)"", payload->len};
    synod_buf_t reply = SYNOD_BUF_INIT;

    synod_handler_fn handler = find(table, name);
    synod_status_t st;
    if (handler) {
        st = handler(&ctx, body, &reply);
    } else {
        /* The host refuses names outside `describe` before the log; this
         * is for a host that did not. */
        st = synod_fail_invalid("unknown %s `%s`", what, ctx.name);
    }

    synod_plugin_types_command_context_free(wctx);
    command_handler_string_free(name);
    command_handler_list_u8_free(payload);

    if (st == SYNOD_OK) {
        if (reply.len) {
            ret->ptr = reply.ptr;
            ret->len = reply.len;
        } else {
            synod_buf_free(&reply);
            ret->ptr = NULL;
            ret->len = 0;
        }
        return true;
    }
    synod_buf_free(&reply);

    if (!error_recorded) {
        synod_buf_clear(&error_message);
        synod_buf_puts(&error_message, "the handler failed without a message");
    }
    utf8_repair(&error_message);
    command_handler_string_t message = {error_message.ptr, error_message.len};
    error_message = (synod_buf_t)SYNOD_BUF_INIT; /* the host's now: post-return frees it */
    error_recorded = false;
    switch (st) {
    case SYNOD_INVALID_INPUT:
        err->tag = SYNOD_PLUGIN_TYPES_ERROR_INVALID_INPUT;
        err->val.invalid_input = message;
        break;
    case SYNOD_REJECTED:
        err->tag = SYNOD_PLUGIN_TYPES_ERROR_REJECTED;
        err->val.rejected = message;
        break;
    default:
        err->tag = SYNOD_PLUGIN_TYPES_ERROR_INTERNAL;
        err->val.internal = message;
        break;
    }
    return false;
}

bool exports_synod_plugin_handler_handle(exports_synod_plugin_handler_command_context_t *ctx,
                                         exports_synod_plugin_handler_command_t *command,
                                         command_handler_list_u8_t *ret, exports_synod_plugin_handler_error_t *err) {
    return run(synod_plugin.commands, "command", ctx, &command->name, &command->payload, ret, err);
}

bool exports_synod_plugin_handler_query(exports_synod_plugin_handler_command_context_t *ctx,
                                        command_handler_string_t *name, command_handler_list_u8_t *payload,
                                        command_handler_list_u8_t *ret, exports_synod_plugin_handler_error_t *err) {
    return run(synod_plugin.queries, "query", ctx, name, payload, ret, err);
}

/* ------------------------------------------------------------------------ */
/* JSON                                                                      */

static bool is_ws(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static const uint8_t *skip_ws(const uint8_t *p, const uint8_t *end) {
    while (p < end && is_ws(*p)) p++;
    return p;
}

static synod_bytes_t trim(synod_bytes_t v) {
    const uint8_t *p = v.ptr, *end = v.ptr + v.len;
    if (!p) return v;
    p = skip_ws(p, end);
    while (end > p && is_ws(end[-1])) end--;
    synod_bytes_t t = {p, (size_t)(end - p)};
    return t;
}

static int hex_value(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A validator's position and, once it fails, why and where. */
typedef struct scan {
    const uint8_t *end;
    const char *why;
    const uint8_t *at;
} scan_t;

static const uint8_t *fail_at(scan_t *s, const uint8_t *at, const char *why) {
    s->why = why;
    s->at = at;
    return NULL;
}

/* Four hex digits at `p` into `*cp`. */
static const uint8_t *scan_hex4(scan_t *s, const uint8_t *p, unsigned *cp) {
    if (s->end - p < 4) return fail_at(s, s->end, "EOF while parsing a string");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hex_value(p[i]);
        if (d < 0) return fail_at(s, p + i, "invalid escape");
        v = v << 4 | (unsigned)d;
    }
    *cp = v;
    return p + 4;
}

/* One escape after a backslash at `p`; its code point (or byte) in *cp. */
static const uint8_t *scan_escape(scan_t *s, const uint8_t *p, unsigned *cp) {
    if (p >= s->end) return fail_at(s, p, "EOF while parsing a string");
    switch (*p) {
    case '"': *cp = '"'; return p + 1;
    case '\\': *cp = '\\'; return p + 1;
    case '/': *cp = '/'; return p + 1;
    case 'b': *cp = '\b'; return p + 1;
    case 'f': *cp = '\f'; return p + 1;
    case 'n': *cp = '\n'; return p + 1;
    case 'r': *cp = '\r'; return p + 1;
    case 't': *cp = '\t'; return p + 1;
    case 'u': break;
    default: return fail_at(s, p, "invalid escape");
    }
    unsigned hi;
    if (!(p = scan_hex4(s, p + 1, &hi))) return NULL;
    if (hi >= 0xdc00 && hi <= 0xdfff) return fail_at(s, p, "lone leading surrogate in hex escape");
    if (hi < 0xd800 || hi > 0xdbff) {
        *cp = hi;
        return p;
    }
    if (p >= s->end) return fail_at(s, p, "EOF while parsing a string");
    if (*p != '\\') return fail_at(s, p, "unexpected end of hex escape");
    if (p + 1 >= s->end) return fail_at(s, p + 1, "EOF while parsing a string");
    if (p[1] != 'u') return fail_at(s, p + 1, "unexpected end of hex escape");
    unsigned lo;
    if (!(p = scan_hex4(s, p + 2, &lo))) return NULL;
    if (lo < 0xdc00 || lo > 0xdfff) return fail_at(s, p, "lone leading surrogate in hex escape");
    *cp = 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00);
    return p;
}

static void put_code_point(synod_buf_t *out, unsigned cp) {
    uint8_t b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (uint8_t)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (uint8_t)(0xc0 | cp >> 6);
        b[1] = (uint8_t)(0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (uint8_t)(0xe0 | cp >> 12);
        b[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
        b[2] = (uint8_t)(0x80 | (cp & 0x3f));
        n = 3;
    } else {
        b[0] = (uint8_t)(0xf0 | cp >> 18);
        b[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3f));
        b[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
        b[3] = (uint8_t)(0x80 | (cp & 0x3f));
        n = 4;
    }
    synod_buf_put(out, b, n);
}

/* The string token whose opening quote is at `p`; decoded into `out` if
 * not NULL. Returns the byte after the closing quote. */
static const uint8_t *scan_string(scan_t *s, const uint8_t *p, synod_buf_t *out) {
    p++;
    const uint8_t *run = p;
    for (;;) {
        if (p >= s->end) return fail_at(s, s->end, "EOF while parsing a string");
        uint8_t c = *p;
        if (c == '"') {
            if (out) synod_buf_put(out, run, (size_t)(p - run));
            return p + 1;
        }
        if (c == '\\') {
            if (out) synod_buf_put(out, run, (size_t)(p - run));
            unsigned cp;
            if (!(p = scan_escape(s, p + 1, &cp))) return NULL;
            if (out) put_code_point(out, cp);
            run = p;
        } else if (c < 0x20) {
            return fail_at(s, p, "control character (\\u0000-\\u001F) found while parsing a string");
        } else {
            size_t n = utf8_seq(p, s->end);
            if (!n) return fail_at(s, p, "invalid unicode code point");
            p += n;
        }
    }
}

static bool is_digit(uint8_t c) {
    return c >= '0' && c <= '9';
}

static const uint8_t *scan_number(scan_t *s, const uint8_t *p) {
    if (*p == '-') p++;
    if (p >= s->end) return fail_at(s, p, "EOF while parsing a value");
    if (*p == '0') {
        p++;
        if (p < s->end && is_digit(*p)) return fail_at(s, p, "invalid number");
    } else if (is_digit(*p)) {
        while (p < s->end && is_digit(*p)) p++;
    } else {
        return fail_at(s, p, "invalid number");
    }
    if (p < s->end && *p == '.') {
        p++;
        if (p >= s->end) return fail_at(s, p, "EOF while parsing a value");
        if (!is_digit(*p)) return fail_at(s, p, "invalid number");
        while (p < s->end && is_digit(*p)) p++;
    }
    if (p < s->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < s->end && (*p == '+' || *p == '-')) p++;
        if (p >= s->end) return fail_at(s, p, "EOF while parsing a value");
        if (!is_digit(*p)) return fail_at(s, p, "invalid number");
        while (p < s->end && is_digit(*p)) p++;
    }
    return p;
}

static const uint8_t *scan_literal(scan_t *s, const uint8_t *p, const char *word) {
    for (size_t i = 0; word[i]; i++, p++) {
        if (p >= s->end) return fail_at(s, p, "EOF while parsing a value");
        if (*p != (uint8_t)word[i]) return fail_at(s, p, "expected ident");
    }
    return p;
}

/* serde_json refuses the 128th level of nesting. */
#define MAX_DEPTH 127

/* One whole value starting at (or after whitespace from) `p`, without
 * recursion: `open` holds the containers we are inside. */
static const uint8_t *scan_value(scan_t *s, const uint8_t *p) {
    uint8_t open[MAX_DEPTH];
    size_t depth = 0;

value:
    p = skip_ws(p, s->end);
    if (p >= s->end) return fail_at(s, p, "EOF while parsing a value");
    switch (*p) {
    case '{':
        if (depth == MAX_DEPTH) return fail_at(s, p, "recursion limit exceeded");
        open[depth++] = '{';
        p = skip_ws(p + 1, s->end);
        if (p >= s->end) return fail_at(s, p, "EOF while parsing an object");
        if (*p == '}') {
            p++;
            depth--;
            goto after;
        }
        goto key;
    case '[':
        if (depth == MAX_DEPTH) return fail_at(s, p, "recursion limit exceeded");
        open[depth++] = '[';
        p = skip_ws(p + 1, s->end);
        if (p >= s->end) return fail_at(s, p, "EOF while parsing a list");
        if (*p == ']') {
            p++;
            depth--;
            goto after;
        }
        goto value;
    case '"':
        if (!(p = scan_string(s, p, NULL))) return NULL;
        goto after;
    case 't':
        if (!(p = scan_literal(s, p, "true"))) return NULL;
        goto after;
    case 'f':
        if (!(p = scan_literal(s, p, "false"))) return NULL;
        goto after;
    case 'n':
        if (!(p = scan_literal(s, p, "null"))) return NULL;
        goto after;
    default:
        if (*p == '-' || is_digit(*p)) {
            if (!(p = scan_number(s, p))) return NULL;
            goto after;
        }
        return fail_at(s, p, "expected value");
    }

key: /* at the first byte of a member, whitespace skipped */
    if (*p != '"') return fail_at(s, p, "key must be a string");
    if (!(p = scan_string(s, p, NULL))) return NULL;
    p = skip_ws(p, s->end);
    if (p >= s->end) return fail_at(s, p, "EOF while parsing an object");
    if (*p != ':') return fail_at(s, p, "expected `:`");
    p++;
    goto value;

after: /* a value just ended */
    if (depth == 0) return p;
    p = skip_ws(p, s->end);
    if (open[depth - 1] == '{') {
        if (p >= s->end) return fail_at(s, p, "EOF while parsing an object");
        if (*p == '}') {
            p++;
            depth--;
            goto after;
        }
        if (*p != ',') return fail_at(s, p, "expected `,` or `}`");
        p = skip_ws(p + 1, s->end);
        if (p >= s->end) return fail_at(s, p, "EOF while parsing a value");
        if (*p == '}') return fail_at(s, p, "trailing comma");
        goto key;
    }
    if (p >= s->end) return fail_at(s, p, "EOF while parsing a list");
    if (*p == ']') {
        p++;
        depth--;
        goto after;
    }
    if (*p != ',') return fail_at(s, p, "expected `,` or `]`");
    p = skip_ws(p + 1, s->end);
    if (p < s->end && *p == ']') return fail_at(s, p, "trailing comma");
    goto value;
}

bool synod_json_validate(synod_bytes_t doc, synod_json_error_t *err) {
    const uint8_t *start = doc.len ? doc.ptr : (const uint8_t *)"";
    scan_t s = {start + doc.len, NULL, NULL};
    const uint8_t *p = scan_value(&s, start);
    if (p) {
        p = skip_ws(p, s.end);
        if (p == s.end) return true;
        fail_at(&s, p, "trailing characters");
    }
    if (err) {
        /* serde_json's position of a peeked byte: its line, and its column
         * counted in bytes from 1 (the end of input counts as the last). */
        size_t at = (size_t)(s.at - start);
        size_t upto = at + 1 < doc.len ? at + 1 : doc.len;
        size_t line = 1, line_start = 0;
        for (size_t i = 0; i < at && i < doc.len; i++)
            if (start[i] == '\n') {
                line++;
                line_start = i + 1;
            }
        err->reason = s.why;
        err->line = line;
        err->column = upto - line_start;
    }
    return false;
}

synod_json_type_t synod_json_type(synod_bytes_t value) {
    value = trim(value);
    if (!value.len) return SYNOD_JSON_NONE;
    switch (value.ptr[0]) {
    case 'n': return SYNOD_JSON_NULL;
    case 't':
    case 'f': return SYNOD_JSON_BOOL;
    case '"': return SYNOD_JSON_STRING;
    case '[': return SYNOD_JSON_ARRAY;
    case '{': return SYNOD_JSON_OBJECT;
    default: return value.ptr[0] == '-' || is_digit(value.ptr[0]) ? SYNOD_JSON_NUMBER : SYNOD_JSON_NONE;
    }
}

/* The end of the string token at `p` (a validated document: only quotes
 * and backslashes matter). */
static const uint8_t *skip_string(const uint8_t *p, const uint8_t *end) {
    for (p++; p < end; p++) {
        if (*p == '"') return p + 1;
        if (*p == '\\' && ++p == end) break;
    }
    return end;
}

/* The end of the (validated) value at `p`. */
static const uint8_t *skip_value(const uint8_t *p, const uint8_t *end) {
    size_t depth = 0;
    while (p < end) {
        uint8_t c = *p;
        if (c == '"') {
            p = skip_string(p, end);
        } else if (c == '{' || c == '[') {
            depth++;
            p++;
            continue;
        } else if (c == '}' || c == ']') {
            if (depth) depth--;
            p++;
        } else if (depth && (is_ws(c) || c == ',' || c == ':')) {
            p++;
            continue;
        } else {
            while (p < end && !is_ws(*p) && *p != ',' && *p != ':' && *p != '}' && *p != ']') p++;
        }
        if (depth == 0) return p;
    }
    return p;
}

bool synod_json_iter(synod_bytes_t value, synod_json_iter_t *it) {
    value = trim(value);
    it->done = true;
    if (!value.len || (value.ptr[0] != '{' && value.ptr[0] != '[')) return false;
    it->object = value.ptr[0] == '{';
    it->pos = value.ptr + 1;
    it->end = value.ptr + value.len;
    it->done = false;
    return true;
}

bool synod_json_next(synod_json_iter_t *it, synod_bytes_t *key, synod_bytes_t *value) {
    if (it->done) return false;
    const uint8_t *p = skip_ws(it->pos, it->end);
    if (p < it->end && *p == ',') p = skip_ws(p + 1, it->end);
    if (p >= it->end || *p == '}' || *p == ']') {
        it->done = true;
        return false;
    }
    synod_bytes_t k = {NULL, 0};
    if (it->object) {
        const uint8_t *after = skip_string(p, it->end);
        k.ptr = p;
        k.len = (size_t)(after - p);
        p = skip_ws(after, it->end);
        if (p < it->end && *p == ':') p++;
        p = skip_ws(p, it->end);
    }
    const uint8_t *after = skip_value(p, it->end);
    if (key) *key = k;
    if (value) {
        value->ptr = p;
        value->len = (size_t)(after - p);
    }
    it->pos = after;
    return true;
}

bool synod_json_string(synod_bytes_t value, synod_buf_t *out) {
    value = trim(value);
    synod_buf_clear(out);
    if (!value.len || value.ptr[0] != '"') return false;
    scan_t s = {value.ptr + value.len, NULL, NULL};
    const uint8_t *p = scan_string(&s, value.ptr, out);
    return p == s.end;
}

bool synod_json_key_is(synod_bytes_t key, const char *name) {
    size_t n = strlen(name);
    if (!key.len) return false;
    /* The common case, no escapes: compare in place. */
    if (key.len == n + 2 && !memchr(key.ptr, '\\', key.len))
        return key.ptr[0] == '"' && !memcmp(key.ptr + 1, name, n);
    if (!memchr(key.ptr, '\\', key.len)) return false;
    synod_buf_t decoded = SYNOD_BUF_INIT;
    bool same = synod_json_string(key, &decoded) && decoded.len == n && !memcmp(decoded.ptr, name, n);
    synod_buf_free(&decoded);
    return same;
}

/* The integer `value` as a sign and magnitude; false if it is not a plain
 * integer token or the magnitude does not fit in 64 bits. */
static bool integer_parts(synod_bytes_t value, bool *negative, uint64_t *magnitude) {
    value = trim(value);
    const uint8_t *p = value.ptr, *end = value.ptr + value.len;
    if (!value.len) return false;
    *negative = *p == '-';
    if (*negative) p++;
    if (p >= end || !is_digit(*p)) return false;
    if (*p == '0' && p + 1 < end) return false;
    uint64_t m = 0;
    for (; p < end; p++) {
        if (!is_digit(*p)) return false;
        unsigned d = (unsigned)(*p - '0');
        if (m > (UINT64_MAX - d) / 10) return false;
        m = m * 10 + d;
    }
    *magnitude = m;
    return true;
}

bool synod_json_i64(synod_bytes_t value, int64_t *out) {
    bool negative;
    uint64_t m;
    if (!integer_parts(value, &negative, &m)) return false;
    if (!negative) {
        if (m > (uint64_t)INT64_MAX) return false;
        *out = (int64_t)m;
        return true;
    }
    /* serde_json reads "-0" and anything below INT64_MIN as a float. */
    if (m == 0 || m > (uint64_t)INT64_MAX + 1) return false;
    *out = m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m;
    return true;
}

const char *synod_json_describe(synod_bytes_t value) {
    switch (synod_json_type(value)) {
    case SYNOD_JSON_NULL: return "null";
    case SYNOD_JSON_BOOL: return "boolean";
    case SYNOD_JSON_STRING: return "string";
    case SYNOD_JSON_ARRAY: return "sequence";
    case SYNOD_JSON_OBJECT: return "map";
    case SYNOD_JSON_NUMBER: {
        bool negative;
        uint64_t m;
        if (!integer_parts(value, &negative, &m)) return "floating point";
        if (negative && (m == 0 || m > (uint64_t)INT64_MAX + 1)) return "floating point";
        return "integer";
    }
    default: return "nothing";
    }
}

synod_field_t synod_json_get_i64(synod_bytes_t doc, const char *key, int64_t *out) {
    synod_json_iter_t it;
    if (!synod_json_validate(doc, NULL) || !synod_json_iter(doc, &it) || !it.object) return SYNOD_FIELD_MALFORMED;
    synod_bytes_t k, v;
    while (synod_json_next(&it, &k, &v))
        if (synod_json_key_is(k, key)) return synod_json_i64(v, out) ? SYNOD_FIELD_OK : SYNOD_FIELD_WRONG_TYPE;
    return SYNOD_FIELD_MISSING;
}
