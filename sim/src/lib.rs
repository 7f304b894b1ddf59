//! Device simulators for Synod: stand-ins for field devices, so drivers, the
//! CLI (`synod sim …`) and integration tests can run against real protocols
//! without hardware.
//!
//! In: a listen address and a simulation config. Out: a running server and a
//! handle to observe and steer it (temperatures, faults, request counters).
//!
//! - [`modbus`]: a Modbus TCP server simulating thermostatic rooms.

pub mod modbus;
