#!/usr/bin/env python3
"""The disk's own floor under the state bench: how long a small append and
`fdatasync` take on this disk with nothing else running, and beside a
snapshot-sized file rewritten the way a Synod node writes a snapshot (over
the spare, 1 MiB at a time, each step handed to the disk and waited for with
`sync_file_range`, then a rest three times as long as the step took; then
`fsync`, rename over the last, directory sync).

Three appender threads stand for three nodes' Raft logs (a 700-byte append
and `fdatasync`, then 1 ms of sleep, each). Phases alternate; each line of
the table is one phase kind across its rounds. Slow syncs (over 50 ms) are
listed with the writer's steps that were in flight around them.

    python3 host/benches/disk_floor.py --dir /var/tmp/floor --rounds 2 --seconds 60
    options: --phases alone,writer  --file-mb 1100  --rate-mb 170 (0: as fast
             as the pacing lets it; 170 MB/s is about three nodes' 10M builds)

No Synod process is involved: a stall this shows is the disk's, and Synod's
log syncs on the same disk can do no better.
"""

import argparse
import ctypes
import os
import threading
import time

SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
STEP = 1 << 20
SLOW = 0.050

libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def appender(path, stop, phase, lat, lock):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    record, n = os.urandom(700), 0
    while not stop.is_set():
        started = time.perf_counter()
        os.write(fd, record)
        os.fdatasync(fd)
        took = time.perf_counter() - started
        with lock:
            lat.setdefault(phase[0], []).append((time.time(), took))
        n += 1
        if n % 20_000 == 0:
            os.ftruncate(fd, 0)
        time.sleep(0.001)
    os.close(fd)


def writer(d, size, rate, running, events):
    """Rewrite `snap.bin` over the spare until `running` is cleared; every
    step and every final call goes in `events` as (name, start, seconds)."""
    block = os.urandom(STEP)
    spare, tmp, snap = (os.path.join(d, n) for n in ("snap.spare", "snap.tmp", "snap.bin"))

    def timed(name, f):
        started = time.time()
        f()
        events.append((name, started, time.time() - started))

    while running.is_set():
        if os.path.exists(spare):
            os.rename(spare, tmp)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
        off, began = 0, time.time()
        while off < size and running.is_set():
            step_started = time.time()
            os.pwrite(fd, block, off)
            flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
            libc.sync_file_range(fd, off, STEP, flags)
            took = time.time() - step_started
            events.append(("step", step_started, took))
            off += STEP
            time.sleep(min(took * 3, 0.1))
            if rate and began + off / rate > time.time():
                time.sleep(began + off / rate - time.time())
        timed("truncate", lambda: os.ftruncate(fd, off))
        timed("fsync", lambda: os.fsync(fd))
        os.close(fd)
        if os.path.exists(snap):
            os.rename(snap, spare)
        timed("rename", lambda: os.rename(tmp, snap))

        def dir_sync():
            dfd = os.open(d, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

        timed("dir sync", dir_sync)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="a directory on the disk to measure (files of --file-mb are written)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60, help="per phase")
    ap.add_argument("--phases", default="alone,writer")
    ap.add_argument("--file-mb", type=int, default=1100)
    ap.add_argument("--rate-mb", type=float, default=0)
    o = ap.parse_args()
    os.makedirs(o.dir, exist_ok=True)
    stop, phase, lat, lock, events = threading.Event(), ["alone"], {}, threading.Lock(), []
    logs = [
        threading.Thread(target=appender, args=(os.path.join(o.dir, f"log{i}"), stop, phase, lat, lock), daemon=True)
        for i in range(3)
    ]
    for t in logs:
        t.start()
    for _ in range(o.rounds):
        for p in o.phases.split(","):
            with lock:
                phase[0] = p
            running = threading.Event()
            w = None
            if p == "writer":
                running.set()
                w = threading.Thread(
                    target=writer, args=(o.dir, o.file_mb << 20, o.rate_mb * 1e6, running, events), daemon=True
                )
                w.start()
            time.sleep(o.seconds)
            if w:
                running.clear()
                w.join()
    stop.set()
    for t in logs:
        t.join()

    print("| phase | syncs | p50 ms | p99 ms | max ms | over 50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for p, v in lat.items():
        xs = sorted(x for _, x in v)
        n = len(xs)
        print(
            f"| {p} | {n} | {xs[n // 2] * 1e3:.2f} | {xs[int(n * 0.99)] * 1e3:.2f} | {xs[-1] * 1e3:.1f} "
            f"| {sum(x > SLOW for x in xs)} |"
        )
    steps = sorted(e[2] for e in events if e[0] == "step")
    if steps:
        print(f"\nwriter: {len(steps)} steps of 1 MiB, p50 {steps[len(steps) // 2] * 1e3:.2f} ms, max {steps[-1] * 1e3:.1f} ms")
        for name in ("truncate", "fsync", "rename", "dir sync"):
            took = [e[2] for e in events if e[0] == name]
            if took:
                print(f"writer: {name} x{len(took)}, max {max(took) * 1e3:.1f} ms")
    slow = sorted({round(t, 2) for v in lat.values() for t, x in v if x > SLOW})
    for t in slow:
        worst = max(x for v in lat.values() for u, x in v if round(u, 2) == t)
        near = [
            f"{name} {(start - t) * 1e3:+.0f} ms took {took * 1e3:.1f} ms"
            for name, start, took in events
            if start - 0.3 < t < start + took + 0.3 and (name != "step" or took > 0.005)
        ]
        print(f"slow sync at {t:.2f}: {worst * 1e3:.0f} ms; writer then: {'; '.join(near[:6]) or 'nothing'}")


if __name__ == "__main__":
    main()
