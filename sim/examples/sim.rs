//! Runs the Modbus room simulator in the foreground, for trying it with any
//! Modbus client (e.g. `mbpoll`).
//!
//! In: `[LISTEN_ADDR] [ROOMS] [SEED]` (defaults `127.0.0.1:5020 3 0`).
//! Out: one line on stdout saying where it listens; serves until Ctrl-C.
//!
//! `cargo run -p synod-sim --example sim -- 127.0.0.1:5020 3`

use std::net::SocketAddr;

use anyhow::Context as _;
use synod_sim::modbus::{self, SimConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:5020").parse().context("LISTEN_ADDR")?;
    let rooms = args.next().map(|rooms| rooms.parse()).transpose().context("ROOMS")?.unwrap_or(3);
    let seed = args.next().map(|seed| seed.parse()).transpose().context("SEED")?.unwrap_or(0);
    modbus::run(listen, SimConfig { rooms, seed, ..SimConfig::default() }).await?;
    Ok(())
}
