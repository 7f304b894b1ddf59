#!/usr/bin/env python3
"""Self-test of lossyfs.py (the power-loss simulating FUSE filesystem).

Usage:
    python3 lossyfs_selftest.py            # run every check; exit 1 on failure
    python3 lossyfs_selftest.py --bench [N] [DIR]
        # also time N (default 2000) cycles of a 200-byte O_APPEND write +
        # fdatasync through the mount and directly on the backing dir
        # (temp dirs under DIR, default the system temp dir)

Needs root, /dev/fuse, libfuse2 and fusepy (see lossyfs.py). Mounts in temp
dirs; a "crash" is SIGKILL of the daemon + `umount -l`, then a fresh daemon
is mounted over the same backing dir. Every wait is bounded, a watchdog
aborts the whole run after WATCHDOG_S seconds, and every mount is lazily
unmounted on exit, failure or not.
"""

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
LOSSYFS = os.path.join(HERE, "lossyfs.py")
MOUNT_TIMEOUT_S = 20
WATCHDOG_S = 300

_daemons = []      # every Popen started
_mountpoints = []  # every mountpoint used


def _umount_lazy(mnt):
    subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)


def _is_mounted(mnt):
    mnt = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and parts[1] == mnt:
                return True
    return False


def cleanup_all():
    for p in _daemons:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=10)
            except Exception:
                pass
    for m in _mountpoints:
        try:
            if _is_mounted(m):
                _umount_lazy(m)
        except Exception:
            pass


def _watchdog():
    sys.stderr.write("FAIL: watchdog: self-test did not finish in %ds\n" % WATCHDOG_S)
    sys.stderr.flush()
    cleanup_all()
    os._exit(1)


class Mount:
    """One lossyfs daemon serving `backing` on `mnt`."""

    def __init__(self, backing, mnt, extra=()):
        self.backing, self.mnt, self.extra = backing, mnt, list(extra)
        self.proc = None
        if mnt not in _mountpoints:
            _mountpoints.append(mnt)

    def start(self):
        assert not _is_mounted(self.mnt), "%s already mounted" % self.mnt
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, LOSSYFS] + self.extra + [self.backing, self.mnt],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL)
        _daemons.append(self.proc)
        got = []

        def reader():
            got.append(self.proc.stdout.readline())

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(MOUNT_TIMEOUT_S)
        want = "lossyfs: mounted %s on %s\n" % (self.backing, self.mnt)
        if not got or got[0].decode() != want:
            self.proc.kill()
            raise AssertionError("mount did not come up: stdout=%r stderr=%r"
                                 % (got, self._err()))
        if not _is_mounted(self.mnt):
            raise AssertionError("init printed but %s not in /proc/self/mounts" % self.mnt)
        return self

    def _err(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def crash(self):
        """Power loss: SIGKILL the daemon, lazily unmount."""
        self.proc.kill()
        self.proc.wait(timeout=20)
        _umount_lazy(self.mnt)
        if _is_mounted(self.mnt):
            raise AssertionError("%s still mounted after umount -l" % self.mnt)

    def stop(self, sig=signal.SIGTERM):
        """Clean shutdown."""
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        finally:
            if _is_mounted(self.mnt):
                _umount_lazy(self.mnt)

    def check_stderr_clean(self):
        err = self._err()
        bad = [l for l in err.splitlines() if "ERROR" in l or "Traceback" in l or "CRITICAL" in l]
        if bad:
            raise AssertionError("daemon logged errors:\n" + err)


class Env:
    def __init__(self, root, name):
        self.backing = os.path.join(root, name + "-backing")
        self.mnt = os.path.join(root, name + "-mnt")
        os.makedirs(self.backing)
        os.makedirs(self.mnt)
        self.m = Mount(self.backing, self.mnt).start()

    def p(self, *parts):
        return os.path.join(self.mnt, *parts)

    def b(self, *parts):
        return os.path.join(self.backing, *parts)

    def crash_and_remount(self):
        self.m.check_stderr_clean()
        self.m.crash()
        self.m = Mount(self.backing, self.mnt).start()

    def close(self):
        self.m.check_stderr_clean()
        self.m.crash()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data, sync=False, flags=os.O_CREAT | os.O_WRONLY | os.O_TRUNC):
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def eq(got, want, what):
    if got != want:
        g, w = got, want
        if isinstance(g, (bytes, bytearray)) and len(g) > 80:
            g = "%d bytes %r..." % (len(g), bytes(g[:40]))
        if isinstance(w, (bytes, bytearray)) and len(w) > 80:
            w = "%d bytes %r..." % (len(w), bytes(w[:40]))
        raise AssertionError("%s: got %r, want %r" % (what, g, w))


# ---------------------------------------------------------------- checks

def check_fsync_survives(e):
    write_file(e.p("synced"), b"durable data", sync=True)
    e.crash_and_remount()
    eq(read(e.p("synced")), b"durable data", "fsynced file after crash")
    return "write+fsync survives a crash"


def check_unsynced_lost(e):
    write_file(e.p("never"), b"this is never synced")
    eq(read(e.p("never")), b"this is never synced", "read-your-writes before crash")
    eq(os.path.getsize(e.b("never")), 0, "backing file before sync")
    write_file(e.p("over"), b"AAA", sync=True)
    fd = os.open(e.p("over"), os.O_WRONLY)
    os.write(fd, b"BBBBBB")
    os.close(fd)
    eq(read(e.p("over")), b"BBBBBB", "overwrite visible before crash")
    e.crash_and_remount()
    eq(os.path.exists(e.p("never")), True, "created-never-synced file exists")
    eq(read(e.p("never")), b"", "created-never-synced file content")
    eq(read(e.p("over")), b"AAA", "unsynced overwrite after crash")
    return "unsynced writes are lost (created-never-synced file is empty)"


def check_append_and_stat(e):
    p = e.p("app")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    os.write(fd, b"one,")
    os.write(fd, b"two,")
    eq(os.fstat(fd).st_size, 8, "fstat size with pending appends")
    eq(os.stat(p).st_size, 8, "stat size with pending appends")
    eq(read(p), b"one,two,", "read pending appends")
    os.fsync(fd)
    os.write(fd, b"three,")
    os.write(fd, b"four")
    eq(os.stat(p).st_size, 18, "stat size after more appends")
    os.close(fd)
    # reopen with O_APPEND: appends go after the pending size
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+five")
    os.close(fd)
    eq(read(p), b"one,two,three,four+five", "reopen+append sees pending size")
    eq(os.path.getsize(e.b("app")), 8, "backing holds only the synced prefix")
    e.crash_and_remount()
    eq(read(p), b"one,two,", "appends after crash")
    return "O_APPEND appends, stat/fstat size with pending data, crash keeps synced prefix"


def check_pwrite_offsets(e):
    p = e.p("pw")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"XYZ", 1000)
    eq(os.fstat(fd).st_size, 1003, "size after sparse pwrite")
    eq(os.pread(fd, 1003, 0), b"\0" * 1000 + b"XYZ", "sparse read")
    os.pwrite(fd, b"ab", 998)       # adjacent before
    os.pwrite(fd, b"cd", 1003)      # adjacent after
    os.pwrite(fd, b"Q", 1001)       # inside
    eq(os.pread(fd, 20, 995), b"\0\0\0abXQZcd", "merged extents")
    os.fsync(fd)
    os.pwrite(fd, b"unsynced", 10)
    os.pwrite(fd, b"tail", 2000)
    eq(os.pread(fd, 8, 10), b"unsynced", "pending overlay on synced data")
    os.close(fd)
    e.crash_and_remount()
    eq(read(p), b"\0" * 998 + b"abXQZcd", "pwrite data after crash")
    return "pwrite at offsets (sparse, adjacent, overlapping), overlay on synced data"


def check_random_model(e):
    """Random writes/truncates/reads against an in-memory model, with syncs and crashes."""
    rng = random.Random(1234)
    p = e.p("model")
    write_file(p, b"")
    durable = bytearray()
    cur = bytearray()
    for rnd in range(4):
        fd = os.open(p, os.O_RDWR)
        for i in range(400):
            op = rng.random()
            if op < 0.55:
                off = rng.randrange(0, 70000)
                n = rng.choice([1, 7, 100, 4096, 5000, 20000])
                data = bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1)
                data = data[:n]
                os.pwrite(fd, data, off)
                if off > len(cur):
                    cur.extend(b"\0" * (off - len(cur)))
                cur[off:off + n] = data
            elif op < 0.65:
                n = rng.randrange(0, 80000)
                os.ftruncate(fd, n)
                if n < len(cur):
                    del cur[n:]
                else:
                    cur.extend(b"\0" * (n - len(cur)))
            elif op < 0.9:
                off = rng.randrange(0, 80000)
                n = rng.randrange(0, 30000)
                eq(os.pread(fd, n, off), bytes(cur[off:off + n]), "model read r%d i%d" % (rnd, i))
                eq(os.fstat(fd).st_size, len(cur), "model size")
            elif op < 0.95:
                (os.fdatasync if rng.random() < 0.5 else os.fsync)(fd)
                durable = bytearray(cur)
            else:
                os.close(fd)
                eq(read(p), bytes(cur), "model reopen")
                fd = os.open(p, os.O_RDWR)
        eq(read(p), bytes(cur), "model full read r%d" % rnd)
        os.close(fd)
        e.crash_and_remount()
        eq(read(p), bytes(durable), "model after crash r%d" % rnd)
        cur = bytearray(durable)
    return "random pwrite/ftruncate/read/fsync vs a model, 4 crashes"


def check_truncate(e):
    p = e.p("tr")
    write_file(p, b"0123456789", sync=True)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 4)
    eq(os.stat(p).st_size, 4, "stat after ftruncate")
    eq(os.pread(fd, 100, 0), b"0123", "read after ftruncate")
    os.close(fd)
    e.crash_and_remount()
    eq(read(p), b"0123456789", "unsynced ftruncate after crash")

    write_file(p, b"new")  # O_TRUNC, no sync
    eq(read(p), b"new", "read after O_TRUNC rewrite")
    os.truncate(p, 6)      # path truncate extends with zeros
    eq(read(p), b"new\0\0\0", "path truncate extend")
    e.crash_and_remount()
    eq(read(p), b"0123456789", "unsynced O_TRUNC after crash")

    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 2)
    os.ftruncate(fd, 8)    # must not resurrect old bytes
    eq(os.pread(fd, 100, 0), b"01" + b"\0" * 6, "truncate down then up")
    os.fsync(fd)
    os.close(fd)
    e.crash_and_remount()
    eq(read(p), b"01" + b"\0" * 6, "synced truncate down+up after crash")
    return "ftruncate/truncate/O_TRUNC pending until fsync; shrink+grow reads zeros"


def check_rename(e):
    # create + sync empty, write pending data, rename: data follows the inode
    write_file(e.p("a.tmp"), b"", sync=True)
    write_file(e.p("a.tmp"), b"pending data", flags=os.O_WRONLY)
    os.rename(e.p("a.tmp"), e.p("a"))
    eq(read(e.p("a")), b"pending data", "pending data after rename")
    eq(os.stat(e.p("a")).st_size, 12, "pending size after rename")
    # the log_store pattern: write tmp, fdatasync, rename, fsync dir
    fd = os.open(e.p("b.tmp"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.pwrite(fd, b"replaced whole", 0)
    os.fdatasync(fd)
    os.close(fd)
    os.rename(e.p("b.tmp"), e.p("b"))
    dfd = os.open(e.mnt, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    # rename over a file that has pending data: its pending data goes away
    write_file(e.p("c"), b"old", sync=True)
    write_file(e.p("c"), b"old-pending", flags=os.O_WRONLY)
    write_file(e.p("c.new"), b"newer", sync=True)
    os.rename(e.p("c.new"), e.p("c"))
    eq(read(e.p("c")), b"newer", "renamed-over target")
    e.crash_and_remount()
    eq(sorted(x for x in os.listdir(e.mnt) if x[0] in "abc"), ["a", "b", "c"], "names after crash")
    eq(read(e.p("a")), b"", "renamed never-synced data lost, rename kept")
    eq(read(e.p("b")), b"replaced whole", "write+fdatasync+rename after crash")
    eq(read(e.p("c")), b"newer", "rename-over after crash")
    # rename, then fsync through the new name
    write_file(e.p("d.tmp"), b"via new name", flags=os.O_CREAT | os.O_WRONLY)
    os.rename(e.p("d.tmp"), e.p("d"))
    fd = os.open(e.p("d"), os.O_RDONLY)  # fsync on a read-only fd syncs the inode
    os.fsync(fd)
    os.close(fd)
    e.crash_and_remount()
    eq(read(e.p("d")), b"via new name", "fsync via new name after crash")
    return "rename keeps pending data with the inode; lost after crash unless synced; rename durable"


def check_fdatasync_and_dirsync(e):
    fd = os.open(e.p("fds"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"datasync")
    os.fdatasync(fd)
    os.write(fd, b"-lost")
    os.close(fd)
    os.mkdir(e.p("dd"))
    dfd = os.open(e.p("dd"), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.fdatasync(dfd)
    os.close(dfd)
    dfd = os.open(e.mnt, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    e.crash_and_remount()
    eq(read(e.p("fds")), b"datasync", "fdatasync'd data after crash")
    return "os.fdatasync works like fsync; fsync/fdatasync of a directory fd works"


def check_o_dsync(e):
    fd = os.open(e.p("dsync"), os.O_CREAT | os.O_WRONLY | os.O_DSYNC, 0o644)
    os.write(fd, b"dsync write")
    os.close(fd)
    e.crash_and_remount()
    eq(read(e.p("dsync")), b"dsync write", "O_DSYNC write after crash")
    return "O_DSYNC writes are durable (kernel sends fsync)"


def check_reopen_and_readers(e):
    p = e.p("reopen")
    write_file(p, b"v1", sync=True)
    write_file(p, b"version-2")
    eq(read(p), b"version-2", "reopen sees pending data")
    fd1 = os.open(p, os.O_RDONLY)
    fd2 = os.open(p, os.O_WRONLY)
    os.pwrite(fd2, b"V", 0)
    eq(os.pread(fd1, 100, 0), b"Version-2", "other fd sees pending write")
    os.close(fd1)
    os.close(fd2)
    e.crash_and_remount()
    eq(read(p), b"v1", "after crash")
    return "pending data of a closed+reopened file stays visible; shared between fds"


def check_metadata(e):
    os.mkdir(e.p("dir"))
    os.mkdir(e.p("dir", "sub"))
    write_file(e.p("dir", "f"), b"x", sync=True)
    eq(sorted(os.listdir(e.p("dir"))), ["f", "sub"], "readdir")
    os.rmdir(e.p("dir", "sub"))
    os.chmod(e.p("dir", "f"), 0o600)
    os.utime(e.p("dir", "f"), ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(e.p("dir", "f"))
    eq(stat.S_IMODE(st.st_mode), 0o600, "chmod")
    eq(st.st_mtime_ns, 2_000_000_000_456, "utime mtime")
    eq(st.st_atime_ns, 1_000_000_000_123, "utime atime")
    sv = os.statvfs(e.mnt)
    if sv.f_blocks <= 0 or sv.f_bsize <= 0:
        raise AssertionError("statvfs: %r" % (sv,))
    # hard link shares pending data
    os.link(e.p("dir", "f"), e.p("dir", "hl"))
    write_file(e.p("dir", "hl"), b"via link")
    eq(read(e.p("dir", "f")), b"via link", "hard link shares pending data")
    eq(os.stat(e.p("dir", "f")).st_nlink, 2, "nlink")
    os.symlink("f", e.p("dir", "sl"))
    eq(os.readlink(e.p("dir", "sl")), "f", "readlink")
    eq(read(e.p("dir", "sl")), b"via link", "read through symlink")
    # unlink with pending data, recreate: the new file must not inherit it
    write_file(e.p("u"), b"")
    write_file(e.p("u"), b"pending-before-unlink", flags=os.O_WRONLY)
    os.unlink(e.p("u"))
    eq(os.path.exists(e.p("u")), False, "unlinked")
    write_file(e.p("u"), b"", sync=True)
    eq(read(e.p("u")), b"", "recreated file does not inherit pending data")
    # unlink a file that is still open: keeps working, no .fuse_hidden files
    fd = os.open(e.p("openrm"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"still here")
    os.unlink(e.p("openrm"))
    eq(os.pread(fd, 100, 0), b"still here", "read unlinked open file")
    os.pwrite(fd, b"!", 10)
    os.fsync(fd)
    eq(os.pread(fd, 100, 0), b"still here!", "write+fsync unlinked open file")
    os.close(fd)
    eq([x for x in os.listdir(e.backing) if x.startswith(".fuse_hidden")], [], "no .fuse_hidden files")
    e.crash_and_remount()
    eq(sorted(os.listdir(e.p("dir"))), ["f", "hl", "sl"], "readdir after crash")
    eq(read(e.p("dir", "f")), b"x", "linked file after crash")
    st = os.stat(e.p("dir", "f"))
    eq(stat.S_IMODE(st.st_mode), 0o600, "chmod after crash")
    eq(st.st_mtime_ns, 2_000_000_000_456, "utime after crash")
    eq(os.readlink(e.p("dir", "sl")), "f", "symlink after crash")
    eq(read(e.p("u")), b"", "recreated file after crash")
    os.unlink(e.p("dir", "hl"))
    os.unlink(e.p("dir", "sl"))
    os.unlink(e.p("dir", "f"))
    os.rmdir(e.p("dir"))
    eq(os.path.exists(e.b("dir")), False, "rmdir reaches backing")
    return "mkdir/rmdir/readdir/chmod/utime/statfs/link/symlink/unlink (incl. open+unlinked), durable at once"


def check_concurrency(e):
    errors = []
    n = 300

    def worker(name):
        try:
            fd = os.open(e.p(name), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            for i in range(n):
                os.write(fd, b"%s-%05d\n" % (name.encode(), i))
                if i % 3 == 0:
                    os.fdatasync(fd)
            os.close(fd)
        except Exception as ex:  # pragma: no cover
            errors.append("%s: %r" % (name, ex))

    ts = [threading.Thread(target=worker, args=("t%d" % k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
        if t.is_alive():
            raise AssertionError("worker thread hung")
    if errors:
        raise AssertionError("; ".join(errors))
    for k in range(2):
        full = b"".join(b"t%d-%05d\n" % (k, i) for i in range(n))
        eq(read(e.p("t%d" % k)), full, "concurrent file t%d before crash" % k)
    e.crash_and_remount()
    last_synced = max(i for i in range(n) if i % 3 == 0)
    for k in range(2):
        want = b"".join(b"t%d-%05d\n" % (k, i) for i in range(last_synced + 1))
        eq(read(e.p("t%d" % k)), want, "concurrent file t%d after crash" % k)
    return "two threads appending+fdatasyncing different files"


def check_big_file(e):
    # like log_store's zero_filled segment: 16 MiB of zeros in 1 MiB writes, fsync;
    # then framed records written in place, each fdatasync'd, last one not.
    p = e.p("seg")
    size = 16 << 20
    fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    z = b"\0" * (1 << 20)
    for off in range(0, size, 1 << 20):
        os.pwrite(fd, z, off)
    os.fsync(fd)
    at = 0
    recs = []
    for i in range(50):
        r = (b"record-%03d|" % i) * 20
        os.pwrite(fd, r, at)
        recs.append((at, r))
        at += len(r)
        if i < 49:
            os.fdatasync(fd)
    big = os.urandom(3 << 20)
    os.pwrite(fd, big, 8 << 20)  # unsynced 3 MiB
    eq(os.pread(fd, len(big), 8 << 20), big, "big pending read")
    os.close(fd)
    e.crash_and_remount()
    eq(os.path.getsize(p), size, "segment size after crash")
    with open(p, "rb") as f:
        data = f.read()
    want = bytearray(size)
    for a, r in recs[:-1]:
        want[a:a + len(r)] = r
    eq(data, bytes(want), "segment after crash")
    return "16 MiB zero-filled segment + in-place records, last unsynced record and 3 MiB lost"


def check_clean_exit(root):
    backing = os.path.join(root, "clean-backing")
    mnt = os.path.join(root, "clean-mnt")
    os.makedirs(backing)
    os.makedirs(mnt)
    m = Mount(backing, mnt).start()
    write_file(os.path.join(mnt, "f"), b"unsynced but clean exit")
    m.stop(signal.SIGTERM)
    eq(read(os.path.join(backing, "f")), b"unsynced but clean exit", "SIGTERM writes pending data back")
    m = Mount(backing, mnt, extra=["--discard-on-exit"]).start()
    write_file(os.path.join(mnt, "f"), b"discarded")
    m.stop(signal.SIGTERM)
    eq(read(os.path.join(backing, "f")), b"unsynced but clean exit", "--discard-on-exit")
    return "clean exit (SIGTERM) writes pending data back; --discard-on-exit drops it"


# ---------------------------------------------------------------- bench

def bench_dir(d, n, rec=200):
    p = os.path.join(d, "bench.log")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_TRUNC, 0o644)
    buf = b"r" * rec
    t0 = time.perf_counter()
    for _ in range(n):
        os.write(fd, buf)
        os.fdatasync(fd)
    dt = time.perf_counter() - t0
    os.close(fd)
    eq(os.path.getsize(p), n * rec, "bench file size")
    return n / dt


def run_bench(n, base):
    root = tempfile.mkdtemp(prefix="lossyfs-bench-", dir=base)
    try:
        direct = os.path.join(root, "direct")
        os.makedirs(direct)
        e = Env(root, "bench")
        try:
            r_fuse = bench_dir(e.mnt, n)
        finally:
            e.close()
        r_direct = bench_dir(direct, n)
        print("bench: %d x (200-byte O_APPEND write + fdatasync) under %s" % (n, root))
        print("bench:   through lossyfs: %8.0f ops/s" % r_fuse)
        print("bench:   backing direct:  %8.0f ops/s" % r_direct)
    finally:
        cleanup_all()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- main

CHECKS = [
    check_fsync_survives,
    check_unsynced_lost,
    check_append_and_stat,
    check_pwrite_offsets,
    check_truncate,
    check_rename,
    check_fdatasync_and_dirsync,
    check_o_dsync,
    check_reopen_and_readers,
    check_metadata,
    check_concurrency,
    check_big_file,
    check_random_model,
]


def main(argv):
    if os.geteuid() != 0:
        print("lossyfs_selftest: needs root")
        return 1
    bench_n = None
    bench_base = None
    if "--bench" in argv:
        i = argv.index("--bench")
        rest = argv[i + 1:]
        bench_n = int(rest[0]) if rest and rest[0].isdigit() else 2000
        rest = rest[1:] if rest and rest[0].isdigit() else rest
        bench_base = rest[0] if rest else None
    wd = threading.Timer(WATCHDOG_S, _watchdog)
    wd.daemon = True
    wd.start()
    root = tempfile.mkdtemp(prefix="lossyfs-selftest-")
    passed = failed = 0
    try:
        for chk in CHECKS:
            name = chk.__name__[len("check_"):]
            e = None
            t0 = time.monotonic()
            try:
                e = Env(root, name)
                what = chk(e)
                e.close()
                e = None
                passed += 1
                print("ok   %-22s %5.2fs  %s" % (name, time.monotonic() - t0, what), flush=True)
            except Exception:
                failed += 1
                print("FAIL %s\n%s" % (name, traceback.format_exc()), flush=True)
                if e is not None:
                    print("daemon stderr:\n" + e.m._err(), flush=True)
            finally:
                cleanup_all()
        t0 = time.monotonic()
        try:
            what = check_clean_exit(root)
            passed += 1
            print("ok   %-22s %5.2fs  %s" % ("clean_exit", time.monotonic() - t0, what), flush=True)
        except Exception:
            failed += 1
            print("FAIL clean_exit\n%s" % traceback.format_exc(), flush=True)
        finally:
            cleanup_all()
        if bench_n:
            run_bench(bench_n, bench_base)
    finally:
        cleanup_all()
        wd.cancel()
        leftover = [m for m in _mountpoints if _is_mounted(m)]
        if leftover:
            print("FAIL: still mounted: %s" % leftover)
            failed += 1
        shutil.rmtree(root, ignore_errors=True)
    print("lossyfs selftest: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
