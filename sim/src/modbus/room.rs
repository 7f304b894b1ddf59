//! The room model: the physics of one thermostatic room and how its
//! temperature is encoded into registers.
//!
//! In: a seed and room index (initial state), elapsed time (physics).
//! Out: the room's temperature, as `f64` and as register words.

use std::time::Duration;

use super::{Fault, SimConfig};

/// Heater power (percent) a room starts with: full power.
pub(crate) const FULL_POWER: u16 = 100;

/// One simulated room: its physical state plus what the server tracks about it.
#[derive(Debug, Clone)]
pub(crate) struct Room {
    /// Air temperature in °C.
    pub(crate) temperature: f64,
    /// Whether the heater (coil) is on.
    pub(crate) heater: bool,
    /// Heater power in percent (0..=100), scaling the heat rate.
    pub(crate) power: u16,
    /// The fault applied to requests whose first address is in this room.
    pub(crate) fault: Fault,
    /// Write requests addressed to this room's heater coil, counted on arrival
    /// so that a fenced writer shows up even when a fault swallowed its write.
    pub(crate) coil_writes: u64,
}

/// The constants of the physics, copied out of [`SimConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Physics {
    /// Temperature an unheated room settles at, °C.
    pub(crate) ambient_c: f64,
    /// Heating rate at full power, °C per second.
    pub(crate) heat_rate_c_per_s: f64,
    /// Rate at which an unheated room approaches ambient, °C per second.
    pub(crate) cool_rate_c_per_s: f64,
}

impl From<&SimConfig> for Physics {
    fn from(config: &SimConfig) -> Self {
        Self {
            ambient_c: config.ambient_c,
            heat_rate_c_per_s: config.heat_rate_c_per_s,
            cool_rate_c_per_s: config.cool_rate_c_per_s,
        }
    }
}

impl Room {
    /// Room `index` of a simulation seeded with `seed`: heater off, full power,
    /// no fault, and a temperature of `ambient + 5.0 + (h mod 100) / 10` where
    /// `h` is the first 8 bytes (little endian) of
    /// `blake3(seed as u64 LE ‖ index as u64 LE)`.
    pub(crate) fn new(seed: u64, index: usize, ambient_c: f64) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&seed.to_le_bytes());
        hasher.update(&(index as u64).to_le_bytes());
        let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = *hasher.finalize().as_bytes();
        let h = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        Self {
            temperature: ambient_c + 5.0 + (h % 100) as f64 / 10.0,
            heater: false,
            power: FULL_POWER,
            fault: Fault::None,
            coil_writes: 0,
        }
    }

    /// Advances the room by `dt`: a heated room warms at `heat_rate × power%`;
    /// an unheated one moves toward ambient at `cool_rate`, never past it.
    pub(crate) fn step(&mut self, physics: &Physics, dt: Duration) {
        let dt = dt.as_secs_f64();
        let t = self.temperature;
        self.temperature = if self.heater {
            t + physics.heat_rate_c_per_s * f64::from(self.power) / 100.0 * dt
        } else if t > physics.ambient_c {
            // `max` rather than `t - min(..)`: it lands exactly on ambient.
            (t - physics.cool_rate_c_per_s * dt).max(physics.ambient_c)
        } else {
            (t + physics.cool_rate_c_per_s * dt).min(physics.ambient_c)
        };
    }

    /// Temperature × 10, rounded, as an `i16` in two's complement (saturating).
    pub(crate) fn temperature_tenths(&self) -> u16 {
        let tenths = (self.temperature * 10.0).round().clamp(f64::from(i16::MIN), f64::from(i16::MAX));
        (tenths as i16) as u16
    }

    /// Temperature as an IEEE-754 `f32`, high word first ("ABCD").
    pub(crate) fn temperature_f32_words(&self) -> [u16; 2] {
        let bits = (self.temperature as f32).to_bits();
        [(bits >> 16) as u16, bits as u16]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn physics() -> Physics {
        Physics::from(&SimConfig::default())
    }

    #[test]
    fn initial_temperature_is_in_range_and_seeded() {
        let temps: Vec<f64> = (0..200).map(|k| Room::new(7, k, 10.0).temperature).collect();
        assert!(temps.iter().all(|t| (15.0..=24.9 + 1e-9).contains(t)), "{temps:?}");
        let again: Vec<f64> = (0..200).map(|k| Room::new(7, k, 10.0).temperature).collect();
        assert_eq!(temps, again);
        let other: Vec<f64> = (0..200).map(|k| Room::new(8, k, 10.0).temperature).collect();
        assert_ne!(temps, other);
    }

    #[test]
    fn encodes_tenths_as_twos_complement() {
        let mut room = Room::new(0, 0, 10.0);
        room.temperature = 21.5;
        assert_eq!(room.temperature_tenths(), 215);
        room.temperature = -3.2;
        assert_eq!(room.temperature_tenths(), 0xFFE0);
        room.temperature = 1e9;
        assert_eq!(room.temperature_tenths(), i16::MAX as u16);
    }

    #[test]
    fn encodes_f32_high_word_first() {
        let mut room = Room::new(0, 0, 10.0);
        room.temperature = 21.5;
        // 21.5f32 = 0x41AC0000
        assert_eq!(room.temperature_f32_words(), [0x41AC, 0x0000]);
    }

    #[test]
    fn heats_scaled_by_power_and_cools_to_ambient() {
        let physics = physics();
        let mut room = Room::new(0, 0, 10.0);
        room.temperature = 20.0;
        room.heater = true;
        room.power = 50;
        room.step(&physics, Duration::from_secs(2));
        assert!((room.temperature - 20.5).abs() < 1e-12);
        room.heater = false;
        room.step(&physics, Duration::from_secs(2));
        assert!((room.temperature - 20.0).abs() < 1e-12);
        room.step(&physics, Duration::from_secs(3600));
        assert_eq!(room.temperature, 10.0);
        room.temperature = 9.0;
        room.step(&physics, Duration::from_secs(2));
        assert!((room.temperature - 9.5).abs() < 1e-12);
        room.step(&physics, Duration::from_secs(60));
        assert_eq!(room.temperature, 10.0);
    }
}
