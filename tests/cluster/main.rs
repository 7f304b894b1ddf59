//! Cluster tests: real `synod` processes on loopback, real disks, kill -9.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod basics;
mod failover;
mod harness;
mod hot_reload;
mod load;
mod membership;
#[path = "../common/plugins.rs"]
mod plugins;
mod snapshot;
mod uploads;
