//! `thermostat`: per-zone heating control with hysteresis.
//!
//! - command `configure` `{"min_setpoint": 5, "max_setpoint": 30}`: the
//!   range setpoints must fall in (default 5..30 °C).
//! - command `set_setpoint` `{"zone": "kitchen", "setpoint": 21, "hysteresis": 0.5}`
//! - command `report` `{"zone": "kitchen", "temperature": 19.2}`: records a
//!   reading and decides the heater: on below `setpoint - hysteresis`, off
//!   above `setpoint + hysteresis`, unchanged in between. A change emits
//!   `heater.on` or `heater.off`.
//! - query `zone` `{"zone": "kitchen"}`, query `zones`.
//!
//! The loop can also close through a device shadow, when a zone is named
//! after a device (`room-1`) whose definition names this plugin and its
//! `device_reported` command as the controller:
//!
//! - command `device_reported`
//!   `{"device": "room-1", "reported": {...}, "changed": [...], "desired": {...}}`,
//!   run by the host when the device's reported state changes: the zone is
//!   the device id; `reported.temperature` (if there) becomes the zone's
//!   temperature and the same rule decides. When the decision differs from
//!   `desired.heater`, the plugin sets the device's desired state to
//!   `{"heater": <decision>}`, and the driver on the owner node switches the
//!   heater.
//! - `set_setpoint` on a zone that is also a device decides with the
//!   device's reported temperature (if it has one) and sets desired state the
//!   same way.
//!
//! Both emit the same `heater.on` / `heater.off` events as `report` when the
//! decision changes, and reply with the zone plus `heater_desired` when they
//! set the device's desired heater. A decision needs a setpoint and a
//! temperature; until both are known, desired state is left alone.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use synod_sdk::{Command, Context, Error, Plugin, devices, events, export_plugin, json, reply, state};

struct Thermostat;

const RANGE_KEY: &str = "range";
const ZONE_PREFIX: &str = "zone/";
const DEFAULT_HYSTERESIS: f64 = 0.5;

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Range {
    min_setpoint: f64,
    max_setpoint: f64,
}

const DEFAULT_RANGE: Range = Range { min_setpoint: 5.0, max_setpoint: 30.0 };

#[derive(Serialize, Deserialize, Default, Clone)]
struct Zone {
    setpoint: Option<f64>,
    hysteresis: f64,
    temperature: Option<f64>,
    heater: bool,
    /// Leader time of the last change, from the log entry.
    updated_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSetpoint {
    zone: String,
    setpoint: f64,
    hysteresis: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Report {
    zone: String,
    temperature: f64,
}

/// What the host sends when a controlled device's reported state changes.
/// Other fields (`changed`, and any the host adds) are not needed.
#[derive(Deserialize)]
struct DeviceReported {
    device: String,
    #[serde(default)]
    reported: Map<String, Value>,
    #[serde(default)]
    desired: Map<String, Value>,
}

#[derive(Deserialize)]
struct ZoneQuery {
    zone: String,
}

#[derive(Serialize)]
struct ZoneReply<'a> {
    zone: &'a str,
    #[serde(flatten)]
    state: &'a Zone,
    changed: bool,
    /// The heater value this command set as the device's desired state;
    /// absent when it set none (and always for zones without a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    heater_desired: Option<bool>,
}

fn check_zone_name(zone: &str) -> Result<(), Error> {
    let ok = !zone.is_empty()
        && zone.len() <= 64
        && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(Error::invalid(format!("zone {zone:?} must be 1-64 letters, digits, '-' or '_'"))) }
}

/// A reading the rule may use: finite and physically plausible.
fn plausible(temperature: f64) -> bool {
    temperature.is_finite() && (-100.0..=200.0).contains(&temperature)
}

fn range() -> Result<Range, Error> {
    Ok(state::get(RANGE_KEY)?.unwrap_or(DEFAULT_RANGE))
}

fn load_zone(zone: &str) -> Result<Zone, Error> {
    Ok(state::get(&format!("{ZONE_PREFIX}{zone}"))?
        .unwrap_or(Zone { hysteresis: DEFAULT_HYSTERESIS, ..Zone::default() }))
}

/// Decide the heater from the zone's reading; true if it switched (and the
/// event was emitted).
fn decide(zone_name: &str, zone: &mut Zone, ctx: &Context) -> Result<bool, Error> {
    let (Some(setpoint), Some(temperature)) = (zone.setpoint, zone.temperature) else {
        return Ok(false);
    };
    let want = if temperature < setpoint - zone.hysteresis {
        true
    } else if temperature > setpoint + zone.hysteresis {
        false
    } else {
        zone.heater
    };
    if want == zone.heater {
        return Ok(false);
    }
    zone.heater = want;
    let topic = if want { "heater.on" } else { "heater.off" };
    events::emit(
        topic,
        &serde_json::json!({
            "zone": zone_name,
            "temperature": temperature,
            "setpoint": setpoint,
            "at_ms": ctx.timestamp_ms,
        }),
    )?;
    Ok(true)
}

/// Close the loop through the device: when the zone has a decision and the
/// device's desired heater (`desired`) is not it, set desired state. Returns
/// the value set, if any.
fn steer(device: &str, zone: &Zone, desired: Option<&Value>) -> Result<Option<bool>, Error> {
    if zone.setpoint.is_none() || zone.temperature.is_none() {
        return Ok(None);
    }
    let want = zone.heater;
    if desired.and_then(Value::as_bool) == Some(want) {
        return Ok(None);
    }
    devices::set_desired(device, &serde_json::json!({ "heater": want }))?;
    Ok(Some(want))
}

fn save(zone_name: &str, zone: &Zone, changed: bool, heater_desired: Option<bool>) -> Result<Vec<u8>, Error> {
    state::set(&format!("{ZONE_PREFIX}{zone_name}"), zone)?;
    reply(&ZoneReply { zone: zone_name, state: zone, changed, heater_desired })
}

impl Plugin for Thermostat {
    const COMMANDS: &'static [&'static str] = &["configure", "set_setpoint", "report", "device_reported"];
    const QUERIES: &'static [&'static str] = &["zone", "zones"];

    fn handle(ctx: &Context, command: &Command) -> Result<Vec<u8>, Error> {
        match command.name.as_str() {
            "configure" => {
                let r: Range = command.json()?;
                if !(r.min_setpoint.is_finite() && r.max_setpoint.is_finite()) || r.min_setpoint >= r.max_setpoint {
                    return Err(Error::invalid("min_setpoint and max_setpoint must be numbers with min < max"));
                }
                state::set(RANGE_KEY, &r)?;
                reply(&r)
            }
            "set_setpoint" => {
                let req: SetSetpoint = command.json()?;
                check_zone_name(&req.zone)?;
                let r = range()?;
                if !req.setpoint.is_finite() || req.setpoint < r.min_setpoint || req.setpoint > r.max_setpoint {
                    return Err(Error::rejected(format!(
                        "setpoint {} is outside the allowed range {}..{}",
                        req.setpoint, r.min_setpoint, r.max_setpoint
                    )));
                }
                let mut zone = load_zone(&req.zone)?;
                if let Some(h) = req.hysteresis {
                    if !(h > 0.0 && h <= 10.0) {
                        return Err(Error::rejected(format!("hysteresis {h} must be above 0 and at most 10")));
                    }
                    zone.hysteresis = h;
                }
                zone.setpoint = Some(req.setpoint);
                zone.updated_ms = ctx.timestamp_ms;
                // A zone that is a device decides with the device's latest
                // reading; a missing or implausible one leaves the zone's.
                let device = devices::get(&req.zone)?;
                if let Some(t) = device.as_ref().and_then(|d| d["reported"]["temperature"].as_f64())
                    && plausible(t)
                {
                    zone.temperature = Some(t);
                }
                let changed = decide(&req.zone, &mut zone, ctx)?;
                let heater_desired = match &device {
                    Some(d) => steer(&req.zone, &zone, d["desired"].get("heater"))?,
                    None => None,
                };
                save(&req.zone, &zone, changed, heater_desired)
            }
            "report" => {
                let req: Report = command.json()?;
                check_zone_name(&req.zone)?;
                if !plausible(req.temperature) {
                    return Err(Error::invalid(format!(
                        "temperature {} is not a plausible reading (-100..200)",
                        req.temperature
                    )));
                }
                let mut zone = load_zone(&req.zone)?;
                zone.temperature = Some(req.temperature);
                zone.updated_ms = ctx.timestamp_ms;
                let changed = decide(&req.zone, &mut zone, ctx)?;
                save(&req.zone, &zone, changed, None)
            }
            "device_reported" => {
                let req: DeviceReported = command.json()?;
                check_zone_name(&req.device)?;
                let mut zone = load_zone(&req.device)?;
                match req.reported.get("temperature") {
                    None | Some(Value::Null) => {}
                    Some(t) => {
                        let t = t.as_f64().filter(|t| plausible(*t)).ok_or_else(|| {
                            Error::invalid(format!(
                                "device {}: reported temperature {t} is not a plausible reading (-100..200)",
                                req.device
                            ))
                        })?;
                        if zone.temperature != Some(t) {
                            zone.temperature = Some(t);
                            zone.updated_ms = ctx.timestamp_ms;
                        }
                    }
                }
                let changed = decide(&req.device, &mut zone, ctx)?;
                let heater_desired = steer(&req.device, &zone, req.desired.get("heater"))?;
                save(&req.device, &zone, changed, heater_desired)
            }
            other => Err(Error::invalid(format!("unknown command `{other}`"))),
        }
    }

    fn query(_ctx: &Context, name: &str, payload: &[u8]) -> Result<Vec<u8>, Error> {
        match name {
            "zone" => {
                let q: ZoneQuery = json(payload)?;
                check_zone_name(&q.zone)?;
                let zone: Option<Zone> = state::get(&format!("{ZONE_PREFIX}{}", q.zone))?;
                match zone {
                    Some(z) => reply(&ZoneReply { zone: &q.zone, state: &z, changed: false, heater_desired: None }),
                    None => Err(Error::rejected(format!("no zone {:?}", q.zone))),
                }
            }
            "zones" => {
                let zones: Vec<(String, Zone)> = state::scan(ZONE_PREFIX, 10_000)?;
                let list: Vec<ZoneReply<'_>> = zones
                    .iter()
                    .map(|(k, z)| ZoneReply {
                        zone: k.strip_prefix(ZONE_PREFIX).unwrap_or(k),
                        state: z,
                        changed: false,
                        heater_desired: None,
                    })
                    .collect();
                reply(&list)
            }
            other => Err(Error::invalid(format!("unknown query `{other}`"))),
        }
    }
}

export_plugin!(Thermostat);
