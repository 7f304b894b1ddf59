//! `modbus-room`: a device driver for a thermostatic room over Modbus TCP —
//! a temperature sensor and a heater relay — that works with any
//! conforming server, because the profile says where the values live.
//!
//! The endpoint is the device's first grant of the form
//! `modbus-tcp://host:port/unit`. The profile (unknown keys are ignored, so
//! it can carry settings the host reads, such as `report` deadbands):
//!
//! ```json
//! {
//!   "temperature": {"table": "input", "address": 0, "type": "i16", "scale": 0.1},
//!   "heater": {"table": "coil", "address": 0},
//!   "poll_ms": 1000
//! }
//! ```
//!
//! | field | meaning | default |
//! |---|---|---|
//! | `temperature.table` | `input` (function 4) or `holding` (function 3) | required |
//! | `temperature.address` | first register, 0-65535 | required |
//! | `temperature.type`, `.word_order`, `.byte_order`, `.scale`, `.offset` | how the value sits in the registers (`synod_driver_sdk::registers`) | `u16`, `big`, `big`, 1, 0 |
//! | `heater.table` | `coil`, the only choice | `coil` |
//! | `heater.address` | the heater's coil, 0-65535 | required |
//! | `poll_ms` | poll interval, 50-86400000 ms | 1000 |
//!
//! - `poll` reads the temperature and the heater coil, sends telemetry
//!   `temperature` and `heater` (0 or 1) and reports
//!   `{"temperature": t, "heater": bool}`. A failed read reports nothing and
//!   returns the I/O error.
//! - `actuate` writes a boolean `heater` from the delta to the coil, reads it
//!   back and reports `{"heater": readback}`; a readback that differs is an
//!   error. Other delta fields are logged and ignored.
//! - A connection or timeout error drops the client; the next call opens a
//!   new one. `init` fails only on a bad profile or grant (or an endpoint
//!   the host refuses), not on a device that is down.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use serde_json::{Value, json};
use synod_driver_sdk::profile::{self, ProfileError, Section};
use synod_driver_sdk::registers::Encoding;
use synod_driver_sdk::{Device, Driver, IoError, export_driver, grant, log, modbus, report, telemetry};

/// Where the temperature registers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// Input registers (function 4): read-only values.
    Input,
    /// Holding registers (function 3).
    Holding,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Input => "input",
            Table::Holding => "holding",
        }
    }
}

/// The profile, checked.
#[derive(Debug)]
struct Profile {
    temperature_table: Table,
    temperature_address: u16,
    temperature: Encoding,
    heater_address: u16,
    poll_ms: u32,
}

const DEFAULT_POLL_MS: u64 = 1000;
/// Faster polling would load the device more than a room needs.
const MIN_POLL_MS: u64 = 50;
const MAX_POLL_MS: u64 = 86_400_000;

impl Profile {
    fn parse(text: &str) -> Result<Self, ProfileError> {
        let value = profile::parse(text)?;
        let root = Section::root(&value)?;

        let t = root.section("temperature")?;
        let temperature_table = t
            .choice("table", &[("input", Table::Input), ("holding", Table::Holding)])?
            .ok_or_else(|| t.error("table", r#"is missing ("input" or "holding")"#))?;
        let temperature = Encoding::from_profile(&t)?;
        // A two-register value must end within the address space.
        let last = 65535 - u64::from(temperature.words() - 1);
        let temperature_address = t.integer("address", 0..=last)?.ok_or_else(|| t.error("address", "is missing"))?;

        let h = root.section("heater")?;
        h.choice("table", &[("coil", ())])?;
        let heater_address = h.integer("address", 0..=65535)?.ok_or_else(|| h.error("address", "is missing"))?;

        let poll_ms = root.integer("poll_ms", MIN_POLL_MS..=MAX_POLL_MS)?.unwrap_or(DEFAULT_POLL_MS);
        Ok(Profile {
            temperature_table,
            temperature_address: u16::try_from(temperature_address).unwrap_or(u16::MAX),
            temperature,
            heater_address: u16::try_from(heater_address).unwrap_or(u16::MAX),
            poll_ms: u32::try_from(poll_ms).unwrap_or(u32::MAX),
        })
    }
}

struct Room {
    /// `host:port` from the grant.
    address: String,
    /// Modbus unit id from the grant.
    unit: u8,
    profile: Profile,
    /// `None` after a lost connection: the next call opens a new one.
    client: Option<modbus::Client>,
}

impl Room {
    /// The open client, opening one if the last was dropped.
    fn client(&mut self) -> Result<&modbus::Client, String> {
        let client = match self.client.take() {
            Some(c) => c,
            None => modbus::open(&self.address, self.unit)
                .map_err(|e| format!("cannot open {} unit {}: {e}", self.address, self.unit))?,
        };
        Ok(self.client.insert(client))
    }

    /// The message for a failed request; forget the client if the
    /// connection is gone.
    fn failed(&mut self, what: &str, e: IoError) -> String {
        if e.is_connection_lost() {
            self.client = None;
        }
        format!("{what}: {e}")
    }

    fn read_temperature(&mut self) -> Result<f64, String> {
        let (table, address, encoding) =
            (self.profile.temperature_table, self.profile.temperature_address, self.profile.temperature);
        let what = format!("reading temperature ({} register {address})", table.name());
        let client = self.client()?;
        let words = match table {
            Table::Input => client.read_input_registers(address, encoding.words()),
            Table::Holding => client.read_holding_registers(address, encoding.words()),
        };
        let words = words.map_err(|e| self.failed(&what, e))?;
        encoding.decode(&words).map_err(|e| format!("{what}: {e}"))
    }

    fn read_heater(&mut self) -> Result<bool, String> {
        let address = self.profile.heater_address;
        let what = format!("reading heater (coil {address})");
        let coils = self.client()?.read_coils(address, 1).map_err(|e| self.failed(&what, e))?;
        coils.first().copied().ok_or_else(|| format!("{what}: the device returned no coil"))
    }

    fn write_heater(&mut self, on: bool) -> Result<(), String> {
        let address = self.profile.heater_address;
        let what = format!("writing heater (coil {address}) {on}");
        self.client()?.write_coil(address, on).map_err(|e| self.failed(&what, e))
    }
}

fn on_off(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

impl Driver for Room {
    fn init(device: Device) -> Result<(Self, u32), String> {
        let profile = Profile::parse(&device.profile).map_err(|e| e.to_string())?;
        let (address, unit) = grant::modbus_tcp(&device.grants).map_err(|e| e.to_string())?;
        // A device that is down now may be up at the next poll; only a
        // refusal by the host is the definition's fault.
        let client = match modbus::open(&address, unit) {
            Ok(c) => Some(c),
            Err(e) if e.is_connection_lost() => {
                log::warn(&format!("{address} unit {unit}: {e}; trying again at the next poll"));
                None
            }
            Err(e) => return Err(format!("cannot open {address} unit {unit}: {e}")),
        };
        log::info(&format!(
            "{}: temperature in {} register {} ({}), heater in coil {}, via {address} unit {unit} every {} ms",
            device.id,
            profile.temperature_table.name(),
            profile.temperature_address,
            profile.temperature.kind,
            profile.heater_address,
            profile.poll_ms,
        ));
        let poll_ms = profile.poll_ms;
        Ok((Room { address, unit, profile, client }, poll_ms))
    }

    fn poll(&mut self) -> Result<(), String> {
        // Both reads before anything goes out: a half reading is not sent.
        let temperature = self.read_temperature()?;
        let heater = self.read_heater()?;
        telemetry("temperature", temperature);
        telemetry("heater", on_off(heater));
        report(&json!({ "temperature": temperature, "heater": heater }))
    }

    fn actuate(&mut self, version: u64, delta: Value) -> Result<(), String> {
        let Value::Object(fields) = delta else {
            return Err(format!("desired version {version}: the delta is not a JSON object: {delta}"));
        };
        for (key, value) in &fields {
            match (key.as_str(), value) {
                ("heater", Value::Bool(_)) => {}
                ("heater", other) => {
                    log::warn(&format!("desired version {version}: ignoring heater {other}: not true or false"));
                }
                (other, _) => {
                    log::info(&format!("desired version {version}: ignoring `{other}`: only `heater` is actuated"));
                }
            }
        }
        let Some(want) = fields.get("heater").and_then(Value::as_bool) else {
            return Ok(());
        };
        self.write_heater(want)?;
        let readback = self.read_heater()?;
        telemetry("heater", on_off(readback));
        report(&json!({ "heater": readback }))?;
        if readback != want {
            return Err(format!(
                "desired version {version}: heater coil {} reads back {readback} after writing {want}",
                self.profile.heater_address
            ));
        }
        log::info(&format!("desired version {version}: heater {want}"));
        Ok(())
    }
}

export_driver!(Room);

#[cfg(test)]
mod tests {
    use super::{Profile, Table};
    use synod_driver_sdk::registers::{Kind, Order};

    fn error(profile: &str) -> String {
        Profile::parse(profile).unwrap_err().to_string()
    }

    #[test]
    fn reads_a_full_profile_and_ignores_other_keys() {
        let p = Profile::parse(
            r#"{"temperature": {"table": "holding", "address": 10, "type": "f32", "word_order": "little",
                "byte_order": "big", "scale": 1, "offset": -273.15},
                "heater": {"table": "coil", "address": 3}, "poll_ms": 250, "report": {"temperature": 0.2}}"#,
        );
        let p = p.unwrap();
        assert_eq!((p.temperature_table, p.temperature_address), (Table::Holding, 10));
        assert_eq!(
            (p.temperature.kind, p.temperature.word_order, p.temperature.offset),
            (Kind::F32, Order::Little, -273.15)
        );
        assert_eq!((p.heater_address, p.poll_ms), (3, 250));
    }

    #[test]
    fn defaults() {
        let p = Profile::parse(r#"{"temperature": {"table": "input", "address": 0}, "heater": {"address": 0}}"#);
        let p = p.unwrap();
        assert_eq!((p.temperature.kind, p.temperature.scale, p.poll_ms), (Kind::U16, 1.0, 1000));
    }

    #[test]
    fn errors_name_the_bad_field() {
        assert_eq!(error(r#"{"heater": {"address": 0}}"#), "profile field `temperature` is missing");
        assert_eq!(
            error(r#"{"temperature": {"address": 0}, "heater": {"address": 0}}"#),
            r#"profile field `temperature.table` is missing ("input" or "holding")"#
        );
        assert_eq!(
            error(r#"{"temperature": {"table": "coil", "address": 0}, "heater": {"address": 0}}"#),
            r#"profile field `temperature.table` must be one of "input", "holding" (got "coil")"#
        );
        assert_eq!(
            error(r#"{"temperature": {"table": "input", "address": 65535, "type": "i32"}, "heater": {"address": 0}}"#),
            "profile field `temperature.address` must be a whole number 0-65534 (got 65535)"
        );
        assert_eq!(
            error(r#"{"temperature": {"table": "input", "address": 0}, "heater": {"table": "input", "address": 0}}"#),
            r#"profile field `heater.table` must be one of "coil" (got "input")"#
        );
        assert_eq!(
            error(r#"{"temperature": {"table": "input", "address": 0}, "heater": {}}"#),
            "profile field `heater.address` is missing"
        );
        assert_eq!(
            error(r#"{"temperature": {"table": "input", "address": 0}, "heater": {"address": 0}, "poll_ms": 10}"#),
            "profile field `poll_ms` must be a whole number 50-86400000 (got 10)"
        );
        assert!(error("not json").starts_with("profile is not valid JSON"));
    }
}
