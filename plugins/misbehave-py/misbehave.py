"""misbehave-py: a test plugin that reaches for everything in Python that
could make two nodes disagree. Each command returns what it saw; the
determinism test runs a random sequence of them on two runtimes and requires
identical outputs, fuel, writes, events and digests."""

import datetime
import math
import os
import random
import time
import uuid

from synod import Handler, command, events, fail, query, state  # noqa: F401 - Handler is the export


@command
def clock(payload, ctx):
    return {
        "now": time.time(),
        "ns": time.time_ns(),
        "iso": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "naive": datetime.datetime.now().isoformat(),
        "today": datetime.date.today().isoformat(),
        "entry": ctx.timestamp_ms,
        "mono": time.monotonic(),
    }


@command("random")
def random_(payload, ctx):
    return {
        "a": random.random(),
        "b": random.randint(0, 10**12),
        "choice": random.choice("abcdefgh"),
        "urandom": list(os.urandom(8)),
        "uuid4": str(uuid.uuid4()),
    }


@command
def floats(payload, ctx):
    x = (payload or {}).get("x", 1) / 7
    return {
        "sin": math.sin(x),
        "exp": math.exp(x),
        "pow": x**0.3,
        "sqrt": math.sqrt(x),
        "atan2": math.atan2(x, 3),
        "sum": sum([0.1, 0.2, 0.3]),
        "fsum": math.fsum([0.1, 0.2, 0.3]),
        "repr": repr(x * 1e6),
    }


@command
def order(payload, ctx):
    # Dicts keep insertion order; a set of strings iterates in hash order,
    # which depends on the hash seed (fixed when the component was built).
    d, s = {}, set()
    for k in (payload or {}).get("keys", []):
        d[k] = len(k)
        s.add(k)
        if len(k) % 3 == 0:
            del d[k]
            s.discard(k)
    return {"dict": list(d), "set": list(s), "sorted": sorted(s), "hashes": [hash(k) for k in sorted(s)][:3]}


@command
def write(payload, ctx):
    n = state.get("writes", 0) + 1
    state.set("writes", n)
    state.set(f"w/{ctx.index % 7}", {"n": n, "r": random.random(), "at": time.time()})
    events.emit("wrote", {"n": n})
    return {"n": n}


@command("throw")
def throw(payload, ctx):
    return {}["missing"]  # KeyError: uncaught, reported as internal with its traceback


@command("fail")
def fail_(payload, ctx):
    raise fail.invalid("bad input") if (payload or {}).get("kind") == "invalid" else fail.rejected("refused by rule")


@command
def spin(payload, ctx):
    i = 0
    while True:  # runs out of fuel at the same instruction everywhere
        i += 1


@command
def alloc(payload, ctx):
    chunks = []
    for i in range(10**9):
        chunks.append(bytearray(1 << 20))  # out of memory
    return len(chunks)


@query
def writes(payload, ctx):
    return {"writes": state.get("writes", 0)}
