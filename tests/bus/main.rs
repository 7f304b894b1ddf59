//! NATS bus tests: real nats-server, real three-node clusters.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod auth;
mod backpressure;
mod commands;
mod events;
// Shared with the cluster tests; not every helper is used here.
#[allow(dead_code)]
#[path = "../common/cluster.rs"]
mod harness;
#[path = "../common/nats.rs"]
mod nats;
#[path = "../common/plugins.rs"]
mod plugins;
