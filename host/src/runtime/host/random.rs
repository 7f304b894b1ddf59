//! `synod:plugin/random`: a stream seeded from the entry's (index, term),
//! the same on every node and different for every entry.

use super::HostState;
use crate::runtime::bindings::synod::plugin::random::Host;

/// Most bytes one `fill` call returns.
const MAX_FILL: u32 = 4096;

/// The blake3 XOF keyed by the entry: a fixed, documented stream that does
/// not depend on any crate's RNG implementation.
pub(super) fn stream(index: u64, term: u64) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new_derive_key("synod 2026-11 command random v1");
    h.update(&index.to_le_bytes());
    h.update(&term.to_le_bytes());
    h.finalize_xof()
}

impl Host for HostState {
    fn next_u64(&mut self) -> wasmtime::Result<u64> {
        let mut b = [0u8; 8];
        self.rng.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn fill(&mut self, len: u32) -> wasmtime::Result<Vec<u8>> {
        let mut b = vec![0u8; len.min(MAX_FILL) as usize];
        self.rng.fill(&mut b);
        Ok(b)
    }
}
