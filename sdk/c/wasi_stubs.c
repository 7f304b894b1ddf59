/*
 * wasi_stubs.c — the WASI calls wasi-libc makes for stdio, answered inside
 * the plugin so the component imports no WASI at all.
 *
 * The host refuses any import outside synod:plugin. wasi-libc reaches
 * WASI through one undefined symbol per call,
 * `__imported_wasi_snapshot_preview1_<name>`; a definition here resolves it
 * at link time, so the import never appears. Only stdio is answered:
 *
 * - fd_write to stdout or stderr becomes plugin log lines (info for stdout,
 *   warn for stderr), one per line of text; printf() works as a log.
 * - fd_fdstat_get says stdout and stderr are terminals, so musl
 *   line-buffers stdout and a printf() line reaches the log when it ends
 *   (there is no exit to flush a full buffer at).
 * - fd_seek, fd_close: nothing to seek or close.
 * - proc_exit (exit()): logs "panicked: exit(<code>) called in a plugin"
 *   and traps, which the host reports as a plugin panic.
 *
 * Everything else is deliberately not stubbed: a plugin that calls time(),
 * clock_gettime(), getentropy() or opens a file links an import of
 * wasi_snapshot_preview1, and plugin.mk stops the build naming it (the host
 * would refuse it anyway). Time and randomness must come from the entry:
 * ctx->timestamp_ms and synod_random_*.
 *
 * The signatures are the wasm-level ones of wasi-libc's
 * libc-bottom-half/sources/__wasilibc_real.c (pointers as int32_t); a
 * mismatch is a link error, not a silent bug.
 */
#include <stdint.h>
#include <string.h>

#include "synod.h"

/* wasi errno values (wasi/api.h). */
#define WASI_ESUCCESS 0
#define WASI_EBADF 8
#define WASI_ESPIPE 70

#define WASI_FILETYPE_CHARACTER_DEVICE 2
#define WASI_RIGHT_FD_WRITE (1u << 6)

#define STDOUT 1
#define STDERR 2

/* The layout of __wasi_ciovec_t on wasm32. */
typedef struct {
    const uint8_t *buf;
    uint32_t len;
} ciovec_t;

/* The layout of __wasi_fdstat_t on wasm32 (24 bytes). */
typedef struct {
    uint8_t filetype;
    uint16_t flags;
    uint64_t rights_base;
    uint64_t rights_inheriting;
} fdstat_t;

/* One log line per line of `len` bytes; the final newline ends the last
 * line rather than starting an empty one. */
static void log_lines(synod_log_level_t level, const uint8_t *text, size_t len) {
    while (len) {
        const uint8_t *nl = memchr(text, '\n', len);
        size_t n = nl ? (size_t)(nl - text) : len;
        synod_log_bytes(level, text, n);
        if (!nl) break;
        text += n + 1;
        len -= n + 1;
    }
}

int32_t __imported_wasi_snapshot_preview1_fd_write(int32_t fd, int32_t iovs, int32_t iovs_len, int32_t nwritten) {
    if (fd != STDOUT && fd != STDERR) return WASI_EBADF;
    const ciovec_t *iov = (const ciovec_t *)(uintptr_t)iovs;
    synod_buf_t text = SYNOD_BUF_INIT;
    for (int32_t i = 0; i < iovs_len; i++) synod_buf_put(&text, iov[i].buf, iov[i].len);
    log_lines(fd == STDOUT ? SYNOD_LOG_INFO : SYNOD_LOG_WARN, text.ptr, text.len);
    *(uint32_t *)(uintptr_t)nwritten = (uint32_t)text.len;
    synod_buf_free(&text);
    return WASI_ESUCCESS;
}

int32_t __imported_wasi_snapshot_preview1_fd_fdstat_get(int32_t fd, int32_t stat) {
    if (fd != STDOUT && fd != STDERR) return WASI_EBADF;
    fdstat_t *st = (fdstat_t *)(uintptr_t)stat;
    memset(st, 0, sizeof *st);
    st->filetype = WASI_FILETYPE_CHARACTER_DEVICE;
    st->rights_base = WASI_RIGHT_FD_WRITE;
    return WASI_ESUCCESS;
}

int32_t __imported_wasi_snapshot_preview1_fd_seek(int32_t fd, int64_t offset, int32_t whence, int32_t newoffset) {
    (void)offset;
    (void)whence;
    (void)newoffset;
    return fd == STDOUT || fd == STDERR ? WASI_ESPIPE : WASI_EBADF;
}

int32_t __imported_wasi_snapshot_preview1_fd_close(int32_t fd) {
    (void)fd;
    return WASI_ESUCCESS;
}

_Noreturn void __imported_wasi_snapshot_preview1_proc_exit(int32_t code) {
    synod_log(SYNOD_LOG_ERROR, "panicked: exit(%d) called in a plugin", (int)code);
    __builtin_trap();
}
