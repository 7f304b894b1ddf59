//! The running digest of applied effects.
//!
//! `digest[n] = blake3(digest[n-1] ‖ index ‖ plugin ‖ effects)`, with every
//! variable-length field length-prefixed so no two different effect sequences
//! encode to the same bytes. Two nodes that applied the same log with the
//! same plugins hold the same digest; the first entry where they differ is
//! where they diverged.

use std::fmt;

use super::Effects;

/// Domain separation: a digest is never confused with another blake3 use.
const CONTEXT: &str = "synod 2026-11 state digest v1";

/// A 32-byte running digest; [`Digest::ZERO`] before the first entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of an empty history.
    pub const ZERO: Digest = Digest([0; 32]);

    /// The digest after applying `effects` of `plugin` at log `index`.
    pub fn chain(&self, index: u64, plugin: &str, effects: &Effects) -> Digest {
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&self.0);
        h.update(&index.to_le_bytes());
        bytes(&mut h, plugin.as_bytes());
        match &effects.result {
            Ok(out) => {
                h.update(&[0]);
                bytes(&mut h, out);
            }
            Err(msg) => {
                h.update(&[1]);
                bytes(&mut h, msg.as_bytes());
            }
        }
        h.update(&effects.fuel_used.to_le_bytes());
        h.update(&(effects.writes.len() as u64).to_le_bytes());
        for (key, value) in effects.writes.iter() {
            bytes(&mut h, key.as_bytes());
            match value {
                Some(v) => {
                    h.update(&[1]);
                    bytes(&mut h, v);
                }
                None => {
                    h.update(&[0]);
                }
            }
        }
        h.update(&(effects.events.len() as u64).to_le_bytes());
        for event in &effects.events {
            bytes(&mut h, event.topic.as_bytes());
            bytes(&mut h, &event.payload);
        }
        Digest(*h.finalize().as_bytes())
    }

    /// Lower-case hex, as shown in the API.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

fn bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WriteSet;

    fn effects(result: Result<Vec<u8>, String>) -> Effects {
        Effects { result, writes: WriteSet::default(), events: Vec::new(), fuel_used: 7 }
    }

    #[test]
    fn any_field_changes_the_digest() {
        let base = Digest::ZERO.chain(1, "p", &effects(Ok(b"x".to_vec())));
        assert_eq!(base, Digest::ZERO.chain(1, "p", &effects(Ok(b"x".to_vec()))));
        assert_ne!(base, Digest::ZERO.chain(2, "p", &effects(Ok(b"x".to_vec()))));
        assert_ne!(base, Digest::ZERO.chain(1, "q", &effects(Ok(b"x".to_vec()))));
        assert_ne!(base, Digest::ZERO.chain(1, "p", &effects(Err("x".into()))));
        let mut w = effects(Ok(b"x".to_vec()));
        w.writes.set("k".into(), Vec::new());
        assert_ne!(base, Digest::ZERO.chain(1, "p", &w));
        // A delete and a write of an empty value are different effects.
        let mut d = effects(Ok(b"x".to_vec()));
        d.writes.delete("k".into());
        assert_ne!(Digest::ZERO.chain(1, "p", &w), Digest::ZERO.chain(1, "p", &d));
    }
}
