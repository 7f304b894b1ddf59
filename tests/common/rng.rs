//! Seeded randomness for tests: a failing run prints its seed, and
//! `SYNOD_TEST_SEED` repeats it.

use std::time::Duration;

/// splitmix64: a tiny, dependency-free generator.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration of `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The seed of a random test: `$SYNOD_TEST_SEED`, else the clock; printed
/// with `what` so a failure can be rerun.
pub fn test_seed(what: &str) -> u64 {
    let seed = std::env::var("SYNOD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{what} seed: {seed} (rerun with SYNOD_TEST_SEED={seed})");
    seed
}
