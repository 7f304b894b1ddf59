"""synod — write a Synod command handler in Python.

A plugin is a module compiled by ``synod plugin build`` (componentize-py with
``--stub-wasi``: CPython, no WASI) into a component of the
``command-handler`` world in ``wit/plugin.wit``::

    from synod import Handler, command, query, state, events, fail

    @command
    def increment(input, ctx):
        value = state.get("value", 0) + (input or {}).get("by", 1)
        state.set("value", value)
        return {"value": value}

``Handler`` must be importable from the plugin's module (the import above
does it): it is the export componentize-py looks for.

Deterministic by construction: a handler runs on every node when its log
entry is applied, so before each call the SDK replaces everything that could
differ between nodes. ``time.time()`` (and ``time_ns``, ``datetime.now()``,
``datetime.utcnow()``, ``date.today()``) is the entry's timestamp
(``ctx.timestamp_ms``); the ``random`` module and ``os.urandom`` are reseeded
from the host's ``random`` interface (seeded from the entry, the same on
every node); ``print`` and ``sys.stdout``/``sys.stderr`` go to the plugin
log. Monotonic clocks stand still. Nothing else of the outside world is
reachable: the component imports only ``synod:plugin`` interfaces.

Inputs and outputs are JSON (``None`` input for an empty payload). Raise
``fail.invalid(...)``, ``fail.rejected(...)`` or ``fail.internal(...)`` to
refuse; any other exception becomes ``internal`` with its traceback.
"""

from __future__ import annotations

import datetime as _datetime
import json as _json
import os as _os
import random as _random
import sys as _sys
import time as _time
from typing import Any, Callable, Optional

from componentize_py_types import Err
from wit_world import exports as _exports
from wit_world.imports import devices as _devices
from wit_world.imports import events as _events
from wit_world.imports import log as _log
from wit_world.imports import random as _hostrandom
from wit_world.imports import state as _state
from wit_world.imports import types as _types

__all__ = [
    "Context",
    "Handler",
    "SynodError",
    "command",
    "devices",
    "events",
    "fail",
    "json",
    "log",
    "query",
    "state",
]

# ------------------------------------------------------------------ JSON --


class json:  # noqa: N801 - a namespace, like the JavaScript SDK's `json`
    """Compact JSON, as the Rust SDK (serde_json) writes it."""

    @staticmethod
    def dumps(value: Any) -> str:
        return _json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @staticmethod
    def loads(text: str | bytes) -> Any:
        return _json.loads(text)

    @staticmethod
    def encode(value: Any) -> bytes:
        return json.dumps(value).encode()

    @staticmethod
    def decode(data: bytes) -> Any:
        return _json.loads(data.decode())


# ---------------------------------------------------------------- errors --


class SynodError(Exception):
    """A typed refusal: the host reports its kind and message to the caller."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class fail:  # noqa: N801 - used as `raise fail.rejected("...")`
    """Typed errors: ``raise fail.rejected("setpoint too high")``."""

    @staticmethod
    def invalid(message: str) -> SynodError:
        """The payload could not be understood (HTTP 400)."""
        return SynodError("invalid-input", str(message))

    @staticmethod
    def rejected(message: str) -> SynodError:
        """Understood and refused by the plugin's rules (HTTP 422)."""
        return SynodError("rejected", str(message))

    @staticmethod
    def internal(message: str) -> SynodError:
        """The plugin could not do its job (HTTP 500)."""
        return SynodError("internal", str(message))


def _host(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Err as e:
        v = e.value
        # As the Rust SDK maps them: both are the plugin's request refused.
        if isinstance(v, _types.HostError_ReadOnly):
            raise fail.rejected("state is read-only in a query") from None
        raise fail.rejected(str(v.value)) from None


# ------------------------------------------------------- host interfaces --

_MISSING = object()


class state:  # noqa: N801
    """The plugin's own keys in the replicated state; values are JSON."""

    @staticmethod
    def get(key: str, default: Any = None) -> Any:
        raw = _state.get(key)
        if raw is None:
            return default
        try:
            return json.decode(raw)
        except ValueError as e:
            raise fail.internal(f"stored value at `{key}` is not valid: {e}") from None

    @staticmethod
    def set(key: str, value: Any) -> None:
        data = json.encode(value)
        _host(lambda: _state.set(key, data))

    @staticmethod
    def delete(key: str) -> None:
        _host(lambda: _state.delete(key))

    @staticmethod
    def scan(prefix: str, limit: int = 1000) -> list[tuple[str, Any]]:
        return [(k, json.decode(v)) for k, v in _state.scan(prefix, limit)]

    @staticmethod
    def get_bytes(key: str) -> Optional[bytes]:
        return _state.get(key)

    @staticmethod
    def set_bytes(key: str, value: bytes) -> None:
        _host(lambda: _state.set(key, bytes(value)))


class events:  # noqa: N801
    """Events for subscribers outside the cluster, published after commit."""

    @staticmethod
    def emit(topic: str, payload: Any) -> None:
        data = json.encode(payload)
        _host(lambda: _events.emit(topic, data))


class devices:  # noqa: N801
    """Device shadows (``wit/plugin.wit``, interface ``devices``)."""

    @staticmethod
    def get(id: str) -> Optional[dict]:
        doc = _devices.get(id)
        return None if doc is None else _json.loads(doc)

    @staticmethod
    def list_ids(prefix: str = "", limit: int = 1000) -> list[str]:
        return list(_devices.list_ids(prefix, limit))

    @staticmethod
    def set_desired(id: str, patch: dict) -> None:
        text = json.dumps(patch)
        _host(lambda: _devices.set_desired(id, text))


class log:  # noqa: N801
    """The plugin log (kept by the node, bounded, never replicated)."""

    @staticmethod
    def trace(msg: str) -> None:
        _log.write(_log.Level.TRACE, str(msg))

    @staticmethod
    def debug(msg: str) -> None:
        _log.write(_log.Level.DEBUG, str(msg))

    @staticmethod
    def info(msg: str) -> None:
        _log.write(_log.Level.INFO, str(msg))

    @staticmethod
    def warn(msg: str) -> None:
        _log.write(_log.Level.WARN, str(msg))

    @staticmethod
    def error(msg: str) -> None:
        _log.write(_log.Level.ERROR, str(msg))


# ---------------------------------------------------- determinism shims --

_now_ms = 0


def _entry_time() -> float:
    return _now_ms / 1000.0


def _entry_time_ns() -> int:
    return _now_ms * 1_000_000


_time.time = _entry_time
_time.time_ns = _entry_time_ns
for _name in ("monotonic", "perf_counter", "process_time", "thread_time"):
    setattr(_time, _name, lambda: 0.0)
    setattr(_time, _name + "_ns", lambda: 0)


def _gmtime(secs: Optional[float] = None, _orig=_time.gmtime):
    return _orig(_entry_time() if secs is None else secs)


_time.gmtime = _gmtime
_time.localtime = _gmtime  # no time zones on a node-independent clock


class _EntryDatetime(_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        if tz is None:
            return cls._naive()
        return cls.fromtimestamp(_entry_time(), tz)

    @classmethod
    def _naive(cls):
        aware = _datetime.datetime.fromtimestamp(_entry_time(), _datetime.timezone.utc)
        return cls(*aware.timetuple()[:6], aware.microsecond)

    @classmethod
    def utcnow(cls):
        return cls._naive()

    @classmethod
    def today(cls):
        return cls._naive()


class _EntryDate(_datetime.date):
    @classmethod
    def today(cls):
        d = _EntryDatetime._naive()
        return cls(d.year, d.month, d.day)


_datetime.datetime = _EntryDatetime
_datetime.date = _EntryDate


def _urandom(n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += bytes(_hostrandom.fill(min(4096, n - len(out))))
    return out


_os.urandom = _urandom


class _LogStream:
    def __init__(self, level):
        self.level = level
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            _log.write(self.level, line)
        return len(text)

    def flush(self) -> None:
        if self.buf:
            _log.write(self.level, self.buf)
            self.buf = ""


_sys.stdout = _LogStream(_log.Level.INFO)
_sys.stderr = _LogStream(_log.Level.WARN)

# -------------------------------------------------------------- registry --


class Context:
    """Where and when a command runs; every field comes from the log entry."""

    __slots__ = ("index", "term", "timestamp_ms", "caller", "payload")

    def __init__(self, ctx: _types.CommandContext, payload: bytes):
        self.index = ctx.index
        self.term = ctx.term
        self.timestamp_ms = ctx.timestamp_ms
        self.caller = ctx.caller
        #: The raw payload (the handler's input is its JSON; ``None`` both
        #: for an empty payload and for ``null``, which this tells apart).
        self.payload = payload


_commands: dict[str, Callable[[Any, Context], Any]] = {}
_queries: dict[str, Callable[[Any, Context], Any]] = {}


def _register(table: dict, name_or_fn: Any):
    if callable(name_or_fn):
        table[name_or_fn.__name__] = name_or_fn
        return name_or_fn

    def deco(fn):
        table[name_or_fn] = fn
        return fn

    return deco


def command(name_or_fn: Any):
    """Register a command: ``@command`` (named after the function) or
    ``@command("name")``. The function gets ``(input, ctx)``: the parsed JSON
    payload (``None`` when empty) and a :class:`Context`; what it returns is
    the reply (as JSON; ``bytes`` as they are)."""
    return _register(_commands, name_or_fn)


def query(name_or_fn: Any):
    """Register a query, like :func:`command`; it runs read-only."""
    return _register(_queries, name_or_fn)


_ERRORS = {
    "invalid-input": _types.Error_InvalidInput,
    "rejected": _types.Error_Rejected,
    "internal": _types.Error_Internal,
}


def _describe(e: BaseException) -> str:
    """The exception and where it was raised, innermost call last. Source
    lines are left out: reading them would open files, which a handler
    cannot."""
    where = []
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not code.co_filename.endswith("synod/__init__.py"):
            where.append(f"\n  {code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    return f"{type(e).__name__}: {e}{''.join(where)}"


def _run(table: dict, kind: str, name: str, payload: bytes, ctx: _types.CommandContext) -> bytes:
    global _now_ms
    _now_ms = ctx.timestamp_ms
    _random.seed(bytes(_hostrandom.fill(32)))
    try:
        fn = table.get(name)
        if fn is None:
            raise fail.invalid(f"unknown {kind} `{name}`")
        value = None
        if payload:
            try:
                value = json.decode(payload)
            except ValueError as e:
                raise fail.invalid(f"payload is not JSON: {e}") from None
        out = fn(value, Context(ctx, payload))
        return bytes(out) if isinstance(out, (bytes, bytearray)) else json.encode(out)
    except SynodError as e:
        raise Err(_ERRORS[e.kind](e.message)) from None
    except Exception as e:  # noqa: BLE001 - every other failure is `internal`
        raise Err(_types.Error_Internal(f"uncaught exception: {_describe(e)}")) from None
    finally:
        _sys.stdout.flush()
        _sys.stderr.flush()


class Handler(_exports.Handler):
    """The ``handler`` export componentize-py instantiates."""

    def describe(self) -> _types.PluginInfo:
        return _types.PluginInfo(commands=list(_commands), queries=list(_queries))

    def handle(self, ctx: _types.CommandContext, command: _types.Command) -> bytes:
        return _run(_commands, "command", command.name, command.payload, ctx)

    def query(self, ctx: _types.CommandContext, name: str, payload: bytes) -> bytes:
        return _run(_queries, "query", name, payload, ctx)
