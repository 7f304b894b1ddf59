//! Cluster tests: real `synod` processes on loopback, real disks, kill -9.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admission;
mod auth;
mod backup;
mod basics;
mod cli;
mod dashboard;
mod dev;
mod failover;
mod gossip;
// The shared test kit; not every helper is used here.
#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod harness;
mod hosts;
mod hot_reload;
mod load;
mod logs;
mod membership;
mod metrics;
mod openapi;
#[path = "../common/plugins.rs"]
mod plugins;
mod quota;
mod recover;
mod safety;
mod snapshot;
mod storage;
mod telemetry;
mod upgrade;
mod uploads;
