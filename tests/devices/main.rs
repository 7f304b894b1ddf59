//! Devices and drivers: driver instances against the real Modbus
//! simulator in process, and real three-node clusters closing the
//! thermostat loop through device shadows, with failover and fencing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod control;
mod drivers;
// Shared with the cluster tests; not every helper is used here.
#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../common/nats.rs"]
mod nats;
#[allow(dead_code)]
#[path = "../common/plugins.rs"]
mod plugins;
