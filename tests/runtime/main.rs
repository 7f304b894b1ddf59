//! Runtime tests: real components built from `plugins/` by the project's
//! own plugin build, run through the library's apply stage.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod c_counter;
mod determinism;
mod harness;
mod isolation;
mod languages;
mod load_errors;
mod misbehave;
// Seeded randomness, shared with the fault battery.
#[path = "../common/plugins.rs"]
mod plugins;
#[allow(dead_code)]
#[path = "../common/rng.rs"]
mod rng;
mod snapshots;
