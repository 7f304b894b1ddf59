//! `misbehave-driver`: a device driver that misbehaves on request, for host
//! tests of the driver runtime. The profile's `mode` picks the behaviour:
//!
//! | `mode` | behaviour |
//! |---|---|
//! | `ok` (default) | every poll reports `{"polls": n}` and sends telemetry `polls` |
//! | `spin-poll` | `poll` never returns (an endless loop) |
//! | `spin-init` | `init` never returns |
//! | `trap-poll` | `poll` panics (a trap, after the panic message is logged) |
//! | `ungranted` | `poll` tries `modbus::open("127.0.0.1:1", 1)` and `tcp::connect("10.0.0.1:80")` and reports `{"modbus": "<error text or ok>", "tcp": "<error text or ok>"}` |
//! | `slow-poll` | `poll` first counts to `iterations` (default 100000000): slow but finite; then as `ok` |
//!
//! `poll_ms` (default 1000) is the poll interval. In every mode `actuate`
//! reports the delta back as reported state (so the delta empties) and
//! sends telemetry `actuated` with the desired version.
#![allow(clippy::panic)]

use std::hint::black_box;

use serde_json::{Value, json};
use synod_driver_sdk::profile::{self, Section};
use synod_driver_sdk::{Device, Driver, export_driver, log, modbus, report, tcp, telemetry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    SpinPoll,
    SpinInit,
    TrapPoll,
    Ungranted,
    SlowPoll,
}

const MODES: &[(&str, Mode)] = &[
    ("ok", Mode::Ok),
    ("spin-poll", Mode::SpinPoll),
    ("spin-init", Mode::SpinInit),
    ("trap-poll", Mode::TrapPoll),
    ("ungranted", Mode::Ungranted),
    ("slow-poll", Mode::SlowPoll),
];

struct Misbehave {
    mode: Mode,
    /// Polls so far in this instance (a new instance starts again at 0).
    polls: u64,
    /// How far `slow-poll` counts.
    iterations: u64,
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn outcome<T>(result: Result<T, synod_driver_sdk::IoError>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    }
}

impl Driver for Misbehave {
    fn init(device: Device) -> Result<(Self, u32), String> {
        let read = || {
            let value = profile::parse(&device.profile)?;
            let root = Section::root(&value)?;
            Ok::<_, profile::ProfileError>((
                root.choice("mode", MODES)?.unwrap_or(Mode::Ok),
                root.integer("poll_ms", 1..=u64::from(u32::MAX))?.unwrap_or(1000),
                root.integer("iterations", 0..=u64::MAX)?.unwrap_or(100_000_000),
            ))
        };
        let (mode, poll_ms, iterations) = read().map_err(|e| e.to_string())?;
        if mode == Mode::SpinInit {
            spin();
        }
        log::info(&format!("{}: mode {mode:?}, every {poll_ms} ms", device.id));
        Ok((Misbehave { mode, polls: 0, iterations }, u32::try_from(poll_ms).unwrap_or(u32::MAX)))
    }

    fn poll(&mut self) -> Result<(), String> {
        match self.mode {
            Mode::SpinPoll => spin(),
            Mode::TrapPoll => panic!("deliberate panic in poll"),
            Mode::Ungranted => {
                let modbus = outcome(modbus::open("127.0.0.1:1", 1));
                let tcp = outcome(tcp::connect("10.0.0.1:80"));
                return report(&json!({ "modbus": modbus, "tcp": tcp }));
            }
            Mode::SlowPoll => {
                let mut n: u64 = 0;
                while black_box(n) < self.iterations {
                    n += 1;
                }
            }
            Mode::Ok | Mode::SpinInit => {}
        }
        self.polls += 1;
        telemetry("polls", self.polls as f64);
        report(&json!({ "polls": self.polls }))
    }

    fn actuate(&mut self, version: u64, delta: Value) -> Result<(), String> {
        log::info(&format!("actuating desired version {version}: {delta}"));
        telemetry("actuated", version as f64);
        report(&delta)
    }
}

export_driver!(Misbehave);
