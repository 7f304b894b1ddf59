"""thermostat (Python): the thermostat plugin of plugins/thermostat on the
Python SDK — per-zone heating control with hysteresis.

Commands ``configure``, ``set_setpoint``, ``report``, ``device_reported``;
queries ``zone``, ``zones``. See plugins/thermostat/src/lib.rs for the rules;
this module keeps the same replies, events, errors and state layout, so
either build can take over the other's zones.
"""

import math
import re

from synod import Handler, command, devices, events, fail, query, state  # noqa: F401 - Handler is the export

RANGE_KEY = "range"
ZONE_PREFIX = "zone/"
DEFAULT_HYSTERESIS = 0.5
DEFAULT_RANGE = {"min_setpoint": 5.0, "max_setpoint": 30.0}
ZONE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _fields(payload, what, required, optional=(), strict=True):
    """An object with exactly the allowed fields (serde's deny_unknown_fields)."""
    if not isinstance(payload, dict):
        raise fail.invalid(f"invalid type: expected struct {what}")
    if strict:
        for k in payload:
            if k not in required and k not in optional:
                raise fail.invalid(f"unknown field `{k}`")
    for k in required:
        if k not in payload:
            raise fail.invalid(f"missing field `{k}`")
    return payload


def _f64(v, name):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise fail.invalid(f"invalid type for `{name}`: expected f64")


def _str(v, name):
    if not isinstance(v, str):
        raise fail.invalid(f"invalid type for `{name}`: expected a string")
    return v



def _check_zone_name(zone):
    if not ZONE_NAME.fullmatch(zone):
        raise fail.invalid(f"zone {zone!r} must be 1-64 letters, digits, '-' or '_'")


def _plausible(t):
    return math.isfinite(t) and -100.0 <= t <= 200.0


def _fmt(x):
    """A number as Rust's `{}` prints an f64 (21 for 21.0, 21.5 for 21.5)."""
    return str(int(x)) if x == int(x) and abs(x) < 1e16 else repr(x)


def _range():
    return state.get(RANGE_KEY, DEFAULT_RANGE)


def _load_zone(zone):
    return state.get(
        ZONE_PREFIX + zone,
        {"setpoint": None, "hysteresis": DEFAULT_HYSTERESIS, "temperature": None, "heater": False, "updated_ms": 0},
    )


def _decide(name, zone, ctx):
    """Decide the heater from the zone's reading; True if it switched."""
    setpoint, temperature = zone["setpoint"], zone["temperature"]
    if setpoint is None or temperature is None:
        return False
    want = zone["heater"]
    if temperature < setpoint - zone["hysteresis"]:
        want = True
    elif temperature > setpoint + zone["hysteresis"]:
        want = False
    if want == zone["heater"]:
        return False
    zone["heater"] = want
    events.emit(
        "heater.on" if want else "heater.off",
        {"zone": name, "temperature": temperature, "setpoint": setpoint, "at_ms": ctx.timestamp_ms},
    )
    return True


def _steer(device, zone, desired):
    """Set the device's desired heater when it is not the zone's decision."""
    if zone["setpoint"] is None or zone["temperature"] is None:
        return None
    if desired is zone["heater"]:
        return None
    devices.set_desired(device, {"heater": zone["heater"]})
    return zone["heater"]


def _reply(name, zone, changed, heater_desired):
    r = {"zone": name, **{k: zone[k] for k in ("setpoint", "hysteresis", "temperature", "heater", "updated_ms")}}
    r["changed"] = changed
    if heater_desired is not None:
        r["heater_desired"] = heater_desired
    return r


def _save(name, zone, changed, heater_desired):
    keep = {k: zone[k] for k in ("setpoint", "hysteresis", "temperature", "heater", "updated_ms")}
    state.set(ZONE_PREFIX + name, keep)
    return _reply(name, zone, changed, heater_desired)


def _floats(zone):
    """Stored numbers as floats, as the Rust build keeps them."""
    for k in ("setpoint", "hysteresis", "temperature"):
        if zone[k] is not None:
            zone[k] = float(zone[k])
    return zone


@command
def configure(payload, ctx):
    _fields(payload, "Range", ("min_setpoint", "max_setpoint"), strict=False)
    r = {"min_setpoint": _f64(payload["min_setpoint"], "min_setpoint"), "max_setpoint": _f64(payload["max_setpoint"], "max_setpoint")}
    if not (math.isfinite(r["min_setpoint"]) and math.isfinite(r["max_setpoint"])) or r["min_setpoint"] >= r["max_setpoint"]:
        raise fail.invalid("min_setpoint and max_setpoint must be numbers with min < max")
    state.set(RANGE_KEY, r)
    return r


@command
def set_setpoint(payload, ctx):
    _fields(payload, "SetSetpoint", ("zone", "setpoint"), ("hysteresis",))
    name = _str(payload["zone"], "zone")
    setpoint = _f64(payload["setpoint"], "setpoint")
    h = payload.get("hysteresis")
    h = None if h is None else _f64(h, "hysteresis")
    _check_zone_name(name)
    r = _range()
    lo, hi = float(r["min_setpoint"]), float(r["max_setpoint"])
    if not math.isfinite(setpoint) or setpoint < lo or setpoint > hi:
        raise fail.rejected(f"setpoint {_fmt(setpoint)} is outside the allowed range {_fmt(lo)}..{_fmt(hi)}")
    zone = _floats(_load_zone(name))
    if h is not None:
        if not (0.0 < h <= 10.0):
            raise fail.rejected(f"hysteresis {_fmt(h)} must be above 0 and at most 10")
        zone["hysteresis"] = h
    zone["setpoint"] = setpoint
    zone["updated_ms"] = ctx.timestamp_ms
    # A zone that is a device decides with the device's latest reading.
    device = devices.get(name)
    t = ((device or {}).get("reported") or {}).get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and _plausible(float(t)):
        zone["temperature"] = float(t)
    changed = _decide(name, zone, ctx)
    heater_desired = _steer(name, zone, (device.get("desired") or {}).get("heater")) if device else None
    return _save(name, zone, changed, heater_desired)


@command
def report(payload, ctx):
    _fields(payload, "Report", ("zone", "temperature"))
    name = _str(payload["zone"], "zone")
    temperature = _f64(payload["temperature"], "temperature")
    _check_zone_name(name)
    if not _plausible(temperature):
        raise fail.invalid(f"temperature {_fmt(temperature)} is not a plausible reading (-100..200)")
    zone = _floats(_load_zone(name))
    zone["temperature"] = temperature
    zone["updated_ms"] = ctx.timestamp_ms
    changed = _decide(name, zone, ctx)
    return _save(name, zone, changed, None)


@command
def device_reported(payload, ctx):
    _fields(payload, "DeviceReported", ("device",), strict=False)
    name = _str(payload["device"], "device")
    reported = payload.get("reported") or {}
    desired = payload.get("desired") or {}
    _check_zone_name(name)
    zone = _floats(_load_zone(name))
    t = reported.get("temperature")
    if t is not None:
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not _plausible(float(t)):
            raise fail.invalid(f"device {name}: reported temperature {t} is not a plausible reading (-100..200)")
        t = float(t)
        if zone["temperature"] != t:
            zone["temperature"] = t
            zone["updated_ms"] = ctx.timestamp_ms
    changed = _decide(name, zone, ctx)
    heater_desired = _steer(name, zone, desired.get("heater"))
    return _save(name, zone, changed, heater_desired)


@query
def zone(payload, ctx):
    _fields(payload, "ZoneQuery", ("zone",), strict=False)
    name = _str(payload["zone"], "zone")
    _check_zone_name(name)
    z = state.get(ZONE_PREFIX + name)
    if z is None:
        raise fail.rejected(f"no zone {name!r}")
    return _reply(name, _floats(z), False, None)


@query
def zones(payload, ctx):
    return [_reply(k[len(ZONE_PREFIX):], _floats(z), False, None) for k, z in state.scan(ZONE_PREFIX, 10000)]
