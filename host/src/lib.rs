//! Synod: a WASM-pluggable distributed control platform.
//!
//! A command's path through a node, and the module that holds each stage:
//!
//! - [`runtime`] runs a command-handler component deterministically: a fresh
//!   wasmtime instance per command, fuel and memory bounds, the plugin's
//!   key-value namespace behind the `synod:plugin/state` interface, writes
//!   buffered until the handler returns `ok`.
//! - [`replica`] is the replicated state as one unit and its only writer:
//!   it applies each committed entry whole — commands on the plugin's
//!   active version, plugin lifecycle, membership — and chains every
//!   outcome into the state digest.
//! - [`state`] is the deterministic data model those writes change, and the
//!   running digest every node keeps of what it applied.
//! - [`toolchain`] builds plugins from source: a Rust guest crate to
//!   `wasm32-unknown-unknown`, then to a component.
//!
//! - [`api`] takes requests in over HTTP and [`bus`] over NATS; both call
//!   the transport-neutral service of [`node`], which also holds the write
//!   path (batcher, forwarder), the peer protocol and the wiring of a
//!   running node: the libp2p transport ([`p2p`]), Raft ([`consensus`]: a
//!   thin openraft adapter — types, the segment log store, snapshot files,
//!   the network) and the plugin store ([`artifacts`]).
//! - [`bus`] is the NATS side: command intake by request/reply, committed
//!   events to JetStream exactly once, notices on `synod.sys.>`.
//! - [`dev`] runs a local three-node cluster; [`client`] is the CLI's HTTP
//!   client; [`config`] is `synod.toml`.
//!
//! `main.rs` only parses the command line and calls into these.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod artifacts;
pub mod backup;
pub mod bus;
pub mod chaos;
pub mod client;
pub mod config;
pub mod consensus;
pub mod dev;
pub mod devices;
pub mod driver;
pub mod faults;
pub mod metrics;
pub mod node;
pub mod p2p;
pub mod recover;
pub mod replica;
pub mod runtime;
pub mod state;
pub mod telemetry;
pub mod toolchain;

/// Unit tests count what they allocate (see [`test_alloc`]).
#[cfg(test)]
pub(crate) mod test_alloc;
