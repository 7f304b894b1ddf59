/*
 * misbehave-c: a test plugin that reaches for everything in C that could
 * make two nodes disagree — the clock, randomness, float math (libm and
 * printf of doubles), memory exhaustion, a panic, an endless loop. Each
 * command returns what it saw; the determinism test runs a random sequence
 * of them on two runtimes and requires identical outputs, fuel, writes,
 * events and digests. The commands match misbehave-js and misbehave-py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "synod.h"

static synod_status_t clock_(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)payload;
    synod_buf_printf(reply, "{\"now\":%llu,\"entry\":%llu}", (unsigned long long)ctx->timestamp_ms,
                     (unsigned long long)ctx->timestamp_ms);
    return SYNOD_OK;
}

static synod_status_t random_(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    uint8_t bytes[8];
    synod_random_fill(bytes, sizeof bytes);
    uint64_t a = synod_random_u64();
    synod_buf_printf(reply, "{\"a\":%.17g,\"bytes\":[%u,%u,%u,%u,%u,%u,%u,%u]}", (double)(a >> 11) / 9007199254740992.0,
                     bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7]);
    return SYNOD_OK;
}

/* The number at `key` of a JSON object, or `fallback`. */
static double number_at(synod_bytes_t payload, const char *key, double fallback) {
    synod_json_iter_t it;
    synod_bytes_t k, v;
    if (!payload.len || !synod_json_iter(payload, &it) || !it.object) return fallback;
    while (synod_json_next(&it, &k, &v)) {
        if (synod_json_key_is(k, key) && synod_json_type(v) == SYNOD_JSON_NUMBER) {
            char text[64];
            size_t n = v.len < sizeof text - 1 ? v.len : sizeof text - 1;
            memcpy(text, v.ptr, n);
            text[n] = 0;
            return strtod(text, NULL);
        }
    }
    return fallback;
}

static synod_status_t floats(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    double x = number_at(payload, "x", 1.0) / 7.0;
    synod_buf_printf(reply, "{\"sin\":%.17g,\"exp\":%.17g,\"pow\":%.17g,\"sqrt\":%.17g,\"atan2\":%.17g,\"sum\":%.17g}",
                     sin(x), exp(x), pow(x, 0.3), sqrt(x), atan2(x, 3.0), 0.1 + 0.2 + 0.3);
    return SYNOD_OK;
}

/* The keys in the order given and sorted (qsort is not stable: equal keys
 * must still come out the same on every node). */
static int by_text(const void *a, const void *b) {
    const synod_bytes_t *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->ptr, y->ptr, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

static synod_status_t order(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    synod_bytes_t keys[64];
    size_t n = 0;
    synod_json_iter_t it, arr;
    synod_bytes_t k, v, key, item;
    if (payload.len && synod_json_iter(payload, &it) && it.object) {
        while (synod_json_next(&it, &k, &v)) {
            if (!synod_json_key_is(k, "keys") || !synod_json_iter(v, &arr) || arr.object) continue;
            while (n < 64 && synod_json_next(&arr, &key, &item)) keys[n++] = item;
        }
    }
    synod_buf_puts(reply, "{\"given\":[");
    for (size_t i = 0; i < n; i++) synod_buf_printf(reply, "%s%.*s", i ? "," : "", (int)keys[i].len, keys[i].ptr);
    qsort(keys, n, sizeof keys[0], by_text);
    synod_buf_puts(reply, "],\"sorted\":[");
    for (size_t i = 0; i < n; i++) synod_buf_printf(reply, "%s%.*s", i ? "," : "", (int)keys[i].len, keys[i].ptr);
    synod_buf_puts(reply, "]}");
    return SYNOD_OK;
}

static synod_status_t write_(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)payload;
    int64_t n = 0;
    synod_buf_t stored = SYNOD_BUF_INIT, text = SYNOD_BUF_INIT;
    if (synod_state_get("writes", &stored)) synod_json_i64(synod_buf_bytes(&stored), &n);
    synod_buf_free(&stored);
    n++;
    synod_buf_put_i64(&text, n);
    synod_status_t st = synod_state_set("writes", text.ptr, text.len);
    synod_buf_clear(&text);
    char key[16];
    key[0] = 'w', key[1] = '/', key[2] = (char)('0' + ctx->index % 7), key[3] = 0;
    synod_buf_printf(&text, "{\"n\":%lld,\"r\":%llu,\"at\":%llu}", (long long)n,
                     (unsigned long long)(synod_random_u64() >> 12), (unsigned long long)ctx->timestamp_ms);
    if (st == SYNOD_OK) st = synod_state_set(key, text.ptr, text.len);
    synod_buf_clear(&text);
    synod_buf_printf(&text, "{\"n\":%lld}", (long long)n);
    if (st == SYNOD_OK) st = synod_events_emit("wrote", text.ptr, text.len);
    synod_buf_free(&text);
    if (st != SYNOD_OK) return st;
    synod_buf_printf(reply, "{\"n\":%lld}", (long long)n);
    return SYNOD_OK;
}

static synod_status_t throw_(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)payload;
    (void)reply;
    SYNOD_PANIC("thrown at index %llu", (unsigned long long)ctx->index);
}

static synod_status_t fail(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)reply;
    synod_json_iter_t it;
    synod_bytes_t k, v;
    if (payload.len && synod_json_iter(payload, &it) && it.object)
        while (synod_json_next(&it, &k, &v))
            if (synod_json_key_is(k, "kind") && v.len == 9 && !memcmp(v.ptr, "\"invalid\"", 9))
                return synod_fail_invalid("bad input");
    return synod_fail_rejected("refused by rule");
}

static synod_status_t spin(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    (void)reply;
    volatile uint64_t i = 0;
    for (;;) i++; /* runs out of fuel at the same instruction everywhere */
}

static synod_status_t alloc(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    (void)reply;
    size_t total = 0;
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p) return synod_fail_internal("out of memory after %zu MiB", total);
        memset(p, 1, 1 << 20); /* touch it: the pages are really used */
        total++;
    }
}

static synod_status_t writes(const synod_context_t *ctx, synod_bytes_t payload, synod_buf_t *reply) {
    (void)ctx;
    (void)payload;
    synod_buf_t stored = SYNOD_BUF_INIT;
    int64_t n = 0;
    if (synod_state_get("writes", &stored)) synod_json_i64(synod_buf_bytes(&stored), &n);
    synod_buf_free(&stored);
    synod_buf_printf(reply, "{\"writes\":%lld}", (long long)n);
    return SYNOD_OK;
}

static const synod_entry_t commands[] = {
    {"clock", clock_}, {"random", random_}, {"floats", floats}, {"order", order}, {"write", write_},
    {"throw", throw_}, {"fail", fail},      {"spin", spin},     {"alloc", alloc}, SYNOD_END,
};
static const synod_entry_t queries[] = {{"writes", writes}, SYNOD_END};
SYNOD_PLUGIN(commands, queries);
