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

use serde::{Deserialize, Serialize};
use synod_sdk::{Command, Context, Error, Plugin, events, export_plugin, json, reply, state};

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
}

fn check_zone_name(zone: &str) -> Result<(), Error> {
    let ok = !zone.is_empty()
        && zone.len() <= 64
        && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(Error::invalid(format!("zone {zone:?} must be 1-64 letters, digits, '-' or '_'"))) }
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

fn save(zone_name: &str, zone: &Zone, changed: bool) -> Result<Vec<u8>, Error> {
    state::set(&format!("{ZONE_PREFIX}{zone_name}"), zone)?;
    reply(&ZoneReply { zone: zone_name, state: zone, changed })
}

impl Plugin for Thermostat {
    const COMMANDS: &'static [&'static str] = &["configure", "set_setpoint", "report"];
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
                let changed = decide(&req.zone, &mut zone, ctx)?;
                save(&req.zone, &zone, changed)
            }
            "report" => {
                let req: Report = command.json()?;
                check_zone_name(&req.zone)?;
                if !req.temperature.is_finite() || !(-100.0..=200.0).contains(&req.temperature) {
                    return Err(Error::invalid(format!(
                        "temperature {} is not a plausible reading (-100..200)",
                        req.temperature
                    )));
                }
                let mut zone = load_zone(&req.zone)?;
                zone.temperature = Some(req.temperature);
                zone.updated_ms = ctx.timestamp_ms;
                let changed = decide(&req.zone, &mut zone, ctx)?;
                save(&req.zone, &zone, changed)
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
                    Some(z) => reply(&ZoneReply { zone: &q.zone, state: &z, changed: false }),
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
                    })
                    .collect();
                reply(&list)
            }
            other => Err(Error::invalid(format!("unknown query `{other}`"))),
        }
    }
}

export_plugin!(Thermostat);
