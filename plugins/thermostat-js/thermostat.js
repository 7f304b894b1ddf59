// thermostat (JavaScript): the thermostat plugin of plugins/thermostat on
// the JavaScript SDK — per-zone heating control with hysteresis. Commands
// `configure`, `set_setpoint`, `report`, `device_reported`; queries `zone`,
// `zones`. See plugins/thermostat/src/lib.rs for the rules; this file keeps
// the same replies, events, errors and state layout, so either build can
// take over the other's zones.

import { command, query, state, events, devices, fail, handler } from "@synod/sdk";

const RANGE_KEY = "range";
const ZONE_PREFIX = "zone/";
const DEFAULT_HYSTERESIS = 0.5;
const DEFAULT_RANGE = { min_setpoint: 5.0, max_setpoint: 30.0 };

/** An object with exactly the allowed fields (serde's deny_unknown_fields). */
function fields(input, what, required, optional = [], strict = true) {
    if (input === null || typeof input !== "object" || Array.isArray(input))
        throw fail.invalid(`invalid type: expected struct ${what}`);
    if (strict)
        for (const k of Object.keys(input))
            if (!required.includes(k) && !optional.includes(k)) throw fail.invalid(`unknown field \`${k}\``);
    for (const k of required) if (!(k in input)) throw fail.invalid(`missing field \`${k}\``);
    return input;
}

function f64(v, name) {
    if (typeof v === "number") return v;
    if (typeof v === "bigint") return Number(v);
    throw fail.invalid(`invalid type for \`${name}\`: expected f64`);
}

function str(v, name) {
    if (typeof v !== "string") throw fail.invalid(`invalid type for \`${name}\`: expected a string`);
    return v;
}

function checkZoneName(zone) {
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(zone))
        throw fail.invalid(`zone ${JSON.stringify(zone)} must be 1-64 letters, digits, '-' or '_'`);
}

/** A reading the rule may use: finite and physically plausible. */
function plausible(t) {
    return Number.isFinite(t) && t >= -100 && t <= 200;
}

function range() {
    return state.get(RANGE_KEY) ?? DEFAULT_RANGE;
}

function loadZone(zone) {
    return (
        state.get(ZONE_PREFIX + zone) ?? {
            setpoint: null,
            hysteresis: DEFAULT_HYSTERESIS,
            temperature: null,
            heater: false,
            updated_ms: 0,
        }
    );
}

/** Decide the heater from the zone's reading; true if it switched. */
function decide(name, zone, ctx) {
    const { setpoint, temperature } = zone;
    if (setpoint === null || temperature === null) return false;
    let want = zone.heater;
    if (temperature < setpoint - zone.hysteresis) want = true;
    else if (temperature > setpoint + zone.hysteresis) want = false;
    if (want === zone.heater) return false;
    zone.heater = want;
    events.emit(want ? "heater.on" : "heater.off", {
        zone: name,
        temperature,
        setpoint,
        at_ms: ctx.timestampMs,
    });
    return true;
}

/** Set the device's desired heater when it is not the zone's decision. */
function steer(device, zone, desired) {
    if (zone.setpoint === null || zone.temperature === null) return undefined;
    if (desired === zone.heater) return undefined;
    devices.setDesired(device, { heater: zone.heater });
    return zone.heater;
}

function zoneReply(name, zone, changed, heaterDesired) {
    const r = {
        zone: name,
        setpoint: zone.setpoint,
        hysteresis: zone.hysteresis,
        temperature: zone.temperature,
        heater: zone.heater,
        updated_ms: zone.updated_ms,
        changed,
    };
    if (heaterDesired !== undefined) r.heater_desired = heaterDesired;
    return r;
}

function save(name, zone, changed, heaterDesired) {
    state.set(ZONE_PREFIX + name, {
        setpoint: zone.setpoint,
        hysteresis: zone.hysteresis,
        temperature: zone.temperature,
        heater: zone.heater,
        updated_ms: zone.updated_ms,
    });
    return zoneReply(name, zone, changed, heaterDesired);
}

command("configure", (input) => {
    fields(input, "Range", ["min_setpoint", "max_setpoint"], [], false);
    const r = { min_setpoint: f64(input.min_setpoint, "min_setpoint"), max_setpoint: f64(input.max_setpoint, "max_setpoint") };
    if (!(Number.isFinite(r.min_setpoint) && Number.isFinite(r.max_setpoint)) || r.min_setpoint >= r.max_setpoint)
        throw fail.invalid("min_setpoint and max_setpoint must be numbers with min < max");
    state.set(RANGE_KEY, r);
    return r;
});

command("set_setpoint", (input, ctx) => {
    fields(input, "SetSetpoint", ["zone", "setpoint"], ["hysteresis"]);
    const name = str(input.zone, "zone");
    const setpoint = f64(input.setpoint, "setpoint");
    const h = input.hysteresis === undefined || input.hysteresis === null ? null : f64(input.hysteresis, "hysteresis");
    checkZoneName(name);
    const r = range();
    if (!Number.isFinite(setpoint) || setpoint < r.min_setpoint || setpoint > r.max_setpoint)
        throw fail.rejected(`setpoint ${setpoint} is outside the allowed range ${r.min_setpoint}..${r.max_setpoint}`);
    const zone = loadZone(name);
    if (h !== null) {
        if (!(h > 0 && h <= 10)) throw fail.rejected(`hysteresis ${h} must be above 0 and at most 10`);
        zone.hysteresis = h;
    }
    zone.setpoint = setpoint;
    zone.updated_ms = ctx.timestampMs;
    // A zone that is a device decides with the device's latest reading.
    const device = devices.get(name);
    const t = device?.reported?.temperature;
    if (typeof t === "number" && plausible(t)) zone.temperature = t;
    const changed = decide(name, zone, ctx);
    const heaterDesired = device ? steer(name, zone, device.desired?.heater) : undefined;
    return save(name, zone, changed, heaterDesired);
});

command("report", (input, ctx) => {
    fields(input, "Report", ["zone", "temperature"]);
    const name = str(input.zone, "zone");
    const temperature = f64(input.temperature, "temperature");
    checkZoneName(name);
    if (!plausible(temperature))
        throw fail.invalid(`temperature ${temperature} is not a plausible reading (-100..200)`);
    const zone = loadZone(name);
    zone.temperature = temperature;
    zone.updated_ms = ctx.timestampMs;
    const changed = decide(name, zone, ctx);
    return save(name, zone, changed, undefined);
});

command("device_reported", (input, ctx) => {
    fields(input, "DeviceReported", ["device"], [], false);
    const name = str(input.device, "device");
    const reported = input.reported ?? {};
    const desired = input.desired ?? {};
    checkZoneName(name);
    const zone = loadZone(name);
    const t = reported.temperature;
    if (t !== undefined && t !== null) {
        if (typeof t !== "number" || !plausible(t))
            throw fail.invalid(`device ${name}: reported temperature ${JSON.stringify(t)} is not a plausible reading (-100..200)`);
        if (zone.temperature !== t) {
            zone.temperature = t;
            zone.updated_ms = ctx.timestampMs;
        }
    }
    const changed = decide(name, zone, ctx);
    const heaterDesired = steer(name, zone, desired.heater);
    return save(name, zone, changed, heaterDesired);
});

query("zone", (input) => {
    fields(input, "ZoneQuery", ["zone"], [], false);
    const name = str(input.zone, "zone");
    checkZoneName(name);
    const zone = state.get(ZONE_PREFIX + name);
    if (zone === undefined) throw fail.rejected(`no zone ${JSON.stringify(name)}`);
    return zoneReply(name, zone, false, undefined);
});

query("zones", () =>
    state.scan(ZONE_PREFIX, 10000).map(([k, z]) => zoneReply(k.slice(ZONE_PREFIX.length), z, false, undefined)),
);

export { handler };
