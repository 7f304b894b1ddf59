"""counter (Python): the counter plugin of plugins/counter, on the Python SDK.

- command ``increment`` {"by": n, "note": "…"} (default 1; the note, if any,
  is stored under ``note``) → {"value": v}
- command ``reset`` {} → {"value": 0}, emits ``reset`` {"previous": p}
- query ``get`` → {"value": v}

Interchangeable with the Rust counter: the same names, replies, events, error
kinds and state encoding, so either can take over the other's state with a
hot reload. The value is a 64-bit integer; overflow is rejected.
"""

from synod import Handler, command, events, fail, query, state  # noqa: F401 - Handler is the export

KEY = "value"
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def _describe(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, list):
        return "a sequence"
    if isinstance(v, dict):
        return "a map"
    if isinstance(v, str):
        return f'string "{v}"'
    return f"floating point `{v}`"


def _i64(v):
    if isinstance(v, int) and not isinstance(v, bool):
        if not I64_MIN <= v <= I64_MAX:
            raise fail.invalid(f"invalid value: integer `{v}`, expected i64")
        return v
    raise fail.invalid(f"invalid type: {_describe(v)}, expected i64")


def _note(v):
    if v is not None and not isinstance(v, str):
        raise fail.invalid(f"invalid type: {_describe(v)}, expected a string")
    return v


def _current():
    v = state.get(KEY, 0)
    try:
        return _i64(v)
    except Exception as e:
        raise fail.internal(f"stored value at `{KEY}` is not valid: {e}") from None


def _increment(payload, raw):
    """The payload, read as the Rust counter's `Increment` is read by serde."""
    if payload is None:
        if raw:
            raise fail.invalid("invalid type: null, expected struct Increment")
        return 1, None
    if isinstance(payload, list):
        if len(payload) > 2:
            raise fail.invalid("trailing characters: more than 2 fields")
        by = _i64(payload[0]) if payload else 1
        return by, _note(payload[1]) if len(payload) > 1 else None
    if not isinstance(payload, dict):
        raise fail.invalid(f"invalid type: {_describe(payload)}, expected struct Increment")
    for k in payload:
        if k not in ("by", "note"):
            raise fail.invalid(f"unknown field `{k}`, expected `by` or `note`")
    by = _i64(payload["by"]) if "by" in payload else 1
    return by, _note(payload.get("note"))


@command
def increment(payload, ctx):
    by, note = _increment(payload, ctx.payload)
    if note is not None:
        state.set("note", note)
    value = _current() + by
    if not I64_MIN <= value <= I64_MAX:
        raise fail.rejected(f"adding {by} would overflow the counter")
    state.set(KEY, value)
    return {"value": value}


@command
def reset(payload, ctx):
    previous = _current()
    state.set(KEY, 0)
    events.emit("reset", {"previous": previous})
    return {"value": 0}


@query
def get(payload, ctx):
    return {"value": _current()}
