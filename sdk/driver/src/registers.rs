//! Register values as a profile describes them.
//!
//! In: the 16-bit words a Modbus read returns, or a value to write. Out: the
//! value in engineering units, or the words to write. How a device lays its
//! numbers out is in its manual; a profile spells it out per point, so one
//! driver works with any conforming server:
//!
//! | key | values | default |
//! |---|---|---|
//! | `type` | `u16`, `i16`, `u32`, `i32`, `f32` | `u16` |
//! | `word_order` | `big` (high word first), `little` (low word first) | `big` |
//! | `byte_order` | `big` (high byte first in each word), `little` (bytes swapped in each word) | `big` |
//! | `scale` | a number other than 0 | `1` |
//! | `offset` | a number | `0` |
//!
//! `value = raw × scale + offset`; writing inverts it and rounds to the
//! nearest raw integer. The four layouts of the 32-bit value `0xAABBCCDD`:
//! big/big `[AABB, CCDD]`, `word_order` little `[CCDD, AABB]`, `byte_order`
//! little `[BBAA, DDCC]`, both little `[DDCC, BBAA]`.
//!
//! Pure Rust with no host calls, so it has native unit tests.

use std::fmt;

use crate::profile::{ProfileError, Section};

/// The number type a point's registers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single precision.
    F32,
}

const KINDS: &[(&str, Kind)] =
    &[("u16", Kind::U16), ("i16", Kind::I16), ("u32", Kind::U32), ("i32", Kind::I32), ("f32", Kind::F32)];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = KINDS.iter().find(|(_, k)| k == self).map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// Which half comes first: of a 32-bit value's words, or of a word's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// The high half first (Modbus's own order).
    #[default]
    Big,
    /// The low half first.
    Little,
}

const ORDERS: &[(&str, Order)] = &[("big", Order::Big), ("little", Order::Little)];

/// How one point's value sits in its registers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    /// The number type.
    pub kind: Kind,
    /// The order of the two words of a 32-bit type (ignored for 16-bit).
    pub word_order: Order,
    /// The order of the bytes within each word.
    pub byte_order: Order,
    /// Engineering units per raw unit; never 0.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

impl Default for Encoding {
    /// One big-endian `u16`, unscaled.
    fn default() -> Self {
        Encoding { kind: Kind::U16, word_order: Order::Big, byte_order: Order::Big, scale: 1.0, offset: 0.0 }
    }
}

/// Why a value could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum RegisterError {
    /// [`Encoding::decode`] got another number of words than the type has.
    WordCount {
        /// Words the type has.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// The value, once offset and scale are undone, does not fit the type.
    OutOfRange {
        /// The value asked for.
        value: f64,
        /// The register type.
        kind: Kind,
    },
    /// An `f32` register holds NaN or an infinity, or a value to write is
    /// not a finite number.
    NotFinite,
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegisterError::WordCount { expected, got } => {
                write!(f, "expected {expected} register(s), got {got}")
            }
            RegisterError::OutOfRange { value, kind } => {
                write!(f, "{value} does not fit a {kind} register with this scale and offset")
            }
            RegisterError::NotFinite => f.write_str("not a finite number"),
        }
    }
}

impl std::error::Error for RegisterError {}

impl Encoding {
    /// Read `type`, `word_order`, `byte_order`, `scale` and `offset` from a
    /// point of the profile (other keys are the caller's), with the
    /// defaults in the module docs.
    pub fn from_profile(point: &Section<'_>) -> Result<Self, ProfileError> {
        let default = Encoding::default();
        let scale = point.number("scale")?.unwrap_or(default.scale);
        if scale == 0.0 {
            return Err(point.error("scale", "must not be 0"));
        }
        Ok(Encoding {
            kind: point.choice("type", KINDS)?.unwrap_or(default.kind),
            word_order: point.choice("word_order", ORDERS)?.unwrap_or(default.word_order),
            byte_order: point.choice("byte_order", ORDERS)?.unwrap_or(default.byte_order),
            scale,
            offset: point.number("offset")?.unwrap_or(default.offset),
        })
    }

    /// How many registers the value takes: 1 or 2.
    pub fn words(&self) -> u16 {
        match self.kind {
            Kind::U16 | Kind::I16 => 1,
            Kind::U32 | Kind::I32 | Kind::F32 => 2,
        }
    }

    /// The value in `words` (exactly [`Encoding::words`] of them, as read).
    pub fn decode(&self, words: &[u16]) -> Result<f64, RegisterError> {
        let raw = match (self.kind, words) {
            (Kind::U16, [w]) => f64::from(self.bytes(*w)),
            (Kind::I16, [w]) => f64::from(self.bytes(*w) as i16),
            (Kind::U32, [a, b]) => f64::from(self.join(*a, *b)),
            (Kind::I32, [a, b]) => f64::from(self.join(*a, *b) as i32),
            (Kind::F32, [a, b]) => {
                let f = f32::from_bits(self.join(*a, *b));
                if !f.is_finite() {
                    return Err(RegisterError::NotFinite);
                }
                return Ok(f64::from(f) * self.scale + self.offset);
            }
            _ => return Err(RegisterError::WordCount { expected: usize::from(self.words()), got: words.len() }),
        };
        Ok(self.tidy(raw * self.scale + self.offset))
    }

    /// The words that hold `value`, in the order to write them.
    pub fn encode(&self, value: f64) -> Result<Vec<u16>, RegisterError> {
        if !value.is_finite() {
            return Err(RegisterError::NotFinite);
        }
        let raw = (value - self.offset) / self.scale;
        let out_of_range = || RegisterError::OutOfRange { value, kind: self.kind };
        let fits = |lo: f64, hi: f64| {
            let r = raw.round();
            if (lo..=hi).contains(&r) { Ok(r) } else { Err(out_of_range()) }
        };
        Ok(match self.kind {
            Kind::U16 => vec![self.bytes(fits(0.0, f64::from(u16::MAX))? as u16)],
            Kind::I16 => vec![self.bytes(fits(f64::from(i16::MIN), f64::from(i16::MAX))? as i16 as u16)],
            Kind::U32 => self.split(fits(0.0, f64::from(u32::MAX))? as u32),
            Kind::I32 => self.split(fits(f64::from(i32::MIN), f64::from(i32::MAX))? as i32 as u32),
            Kind::F32 => {
                let f = raw as f32;
                if !f.is_finite() {
                    return Err(out_of_range());
                }
                self.split(f.to_bits())
            }
        })
    }

    /// A word as read, or to be written, in this byte order (the swap is
    /// its own inverse).
    fn bytes(&self, word: u16) -> u16 {
        match self.byte_order {
            Order::Big => word,
            Order::Little => word.swap_bytes(),
        }
    }

    fn join(&self, first: u16, second: u16) -> u32 {
        let (high, low) = match self.word_order {
            Order::Big => (first, second),
            Order::Little => (second, first),
        };
        (u32::from(self.bytes(high)) << 16) | u32::from(self.bytes(low))
    }

    fn split(&self, bits: u32) -> Vec<u16> {
        let (high, low) = ((bits >> 16) as u16, bits as u16);
        let (first, second) = match self.word_order {
            Order::Big => (high, low),
            Order::Little => (low, high),
        };
        vec![self.bytes(first), self.bytes(second)]
    }

    /// An integer register scaled by a decimal has an exact decimal value,
    /// but binary floating point lands beside it (3 × 0.1 is
    /// 0.30000000000000004). Round to the decimals `scale` and `offset`
    /// have, so reports, deadbands and readers see 0.3.
    fn tidy(&self, value: f64) -> f64 {
        let places = decimals(self.scale).max(decimals(self.offset));
        if places == 0 || places > 15 {
            return value;
        }
        let factor = 10f64.powi(places);
        let scaled = value * factor;
        // Past 2^53 the product is no longer an exact integer count.
        if scaled.abs() >= 9_007_199_254_740_992.0 {
            return value;
        }
        scaled.round() / factor
    }
}

/// Decimal places of `x` written in the shortest form that reads back as
/// `x` (Rust's `Display` for `f64`, which never uses an exponent).
fn decimals(x: f64) -> i32 {
    let text = x.abs().to_string();
    text.split_once('.').map_or(0, |(_, fraction)| i32::try_from(fraction.len()).unwrap_or(i32::MAX))
}

#[cfg(test)]
mod tests {
    use super::{Encoding, Kind, Order, RegisterError};
    use crate::profile::{Section, parse};

    fn enc(kind: Kind, word_order: Order, byte_order: Order) -> Encoding {
        Encoding { kind, word_order, byte_order, ..Encoding::default() }
    }

    use Order::{Big, Little};

    #[test]
    fn sixteen_bit_types() {
        assert_eq!(enc(Kind::U16, Big, Big).decode(&[0x1234]), Ok(4660.0));
        assert_eq!(enc(Kind::U16, Big, Little).decode(&[0x3412]), Ok(4660.0));
        assert_eq!(enc(Kind::I16, Big, Big).decode(&[0xFF38]), Ok(-200.0));
        assert_eq!(enc(Kind::I16, Big, Little).decode(&[0x38FF]), Ok(-200.0));
        assert_eq!(enc(Kind::U16, Big, Big).decode(&[0xFF38]), Ok(65336.0));
        // word_order means nothing for one register.
        assert_eq!(enc(Kind::I16, Little, Big).decode(&[0xFF38]), Ok(-200.0));
    }

    #[test]
    fn thirty_two_bit_types_in_all_four_layouts() {
        // 21.5f32 is 0x41AC0000.
        let layouts = [
            (Big, Big, [0x41AC, 0x0000]),
            (Little, Big, [0x0000, 0x41AC]),
            (Big, Little, [0xAC41, 0x0000]),
            (Little, Little, [0x0000, 0xAC41]),
        ];
        for (w, b, words) in layouts {
            assert_eq!(enc(Kind::F32, w, b).decode(&words), Ok(21.5), "{w:?}/{b:?}");
            assert_eq!(enc(Kind::F32, w, b).encode(21.5), Ok(words.to_vec()), "{w:?}/{b:?}");
        }
        assert_eq!(enc(Kind::U32, Big, Big).decode(&[0x0001, 0x0002]), Ok(65538.0));
        assert_eq!(enc(Kind::U32, Little, Big).decode(&[0x0002, 0x0001]), Ok(65538.0));
        assert_eq!(enc(Kind::U32, Big, Little).decode(&[0x0100, 0x0200]), Ok(65538.0));
        assert_eq!(enc(Kind::I32, Big, Big).decode(&[0xFFFF, 0xFFFE]), Ok(-2.0));
        assert_eq!(enc(Kind::I32, Little, Little).decode(&[0xFEFF, 0xFFFF]), Ok(-2.0));
        assert_eq!(enc(Kind::U32, Big, Big).decode(&[0xFFFF, 0xFFFF]), Ok(4_294_967_295.0));
    }

    #[test]
    fn scale_and_offset_give_exact_decimals() {
        let tenths = Encoding { kind: Kind::I16, scale: 0.1, ..Encoding::default() };
        assert_eq!(tenths.decode(&[215]), Ok(21.5));
        assert_eq!(tenths.decode(&[3]), Ok(0.3));
        assert_eq!(tenths.decode(&[(-75i16) as u16]), Ok(-7.5));
        let offset = Encoding { scale: 0.01, offset: -40.0, ..Encoding::default() };
        assert_eq!(offset.decode(&[1000]), Ok(-30.0));
        assert_eq!(offset.decode(&[6333]), Ok(23.33));
        assert_eq!(offset.encode(23.33), Ok(vec![6333]));
        assert_eq!(tenths.encode(-7.5), Ok(vec![(-75i16) as u16]));
        assert_eq!(tenths.encode(21.54), Ok(vec![215]));
    }

    #[test]
    fn every_type_round_trips() {
        for kind in [Kind::U16, Kind::I16, Kind::U32, Kind::I32, Kind::F32] {
            for (w, b) in [(Big, Big), (Big, Little), (Little, Big), (Little, Little)] {
                let e = Encoding { kind, word_order: w, byte_order: b, scale: 0.5, offset: 1.0 };
                let words = e.encode(101.5).unwrap();
                assert_eq!(words.len(), usize::from(e.words()));
                assert_eq!(e.decode(&words), Ok(101.5), "{kind} {w:?}/{b:?}");
            }
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let u16 = Encoding::default();
        assert_eq!(u16.encode(-1.0), Err(RegisterError::OutOfRange { value: -1.0, kind: Kind::U16 }));
        assert_eq!(u16.encode(65535.4), Ok(vec![65535]));
        assert_eq!(u16.encode(f64::NAN), Err(RegisterError::NotFinite));
        let i16 = enc(Kind::I16, Big, Big);
        assert_eq!(
            i16.encode(40000.0).map_err(|e| e.to_string()),
            Err("40000 does not fit a i16 register with this scale and offset".into())
        );
        assert_eq!(
            enc(Kind::F32, Big, Big).encode(1e300),
            Err(RegisterError::OutOfRange { value: 1e300, kind: Kind::F32 })
        );
        assert_eq!(enc(Kind::F32, Big, Big).decode(&[0x7FC0, 0]), Err(RegisterError::NotFinite));
        assert_eq!(
            enc(Kind::U32, Big, Big).decode(&[1]).map_err(|e| e.to_string()),
            Err("expected 2 register(s), got 1".into())
        );
        assert_eq!(u16.decode(&[]), Err(RegisterError::WordCount { expected: 1, got: 0 }));
    }

    #[test]
    fn reads_the_profile_with_defaults() {
        let profile =
            parse(r#"{"t": {"table": "input", "address": 0, "type": "i16", "scale": 0.1}, "p": {}}"#).unwrap();
        let root = Section::root(&profile).unwrap();
        let t = Encoding::from_profile(&root.section("t").unwrap()).unwrap();
        assert_eq!(t, Encoding { kind: Kind::I16, scale: 0.1, ..Encoding::default() });
        assert_eq!(Encoding::from_profile(&root.section("p").unwrap()), Ok(Encoding::default()));

        let bad = |json: &str| {
            let v = parse(json).unwrap();
            let root = Section::root(&v).unwrap();
            Encoding::from_profile(&root.section("x").unwrap()).unwrap_err().to_string()
        };
        assert_eq!(
            bad(r#"{"x": {"type": "int"}}"#),
            r#"profile field `x.type` must be one of "u16", "i16", "u32", "i32", "f32" (got "int")"#
        );
        assert_eq!(bad(r#"{"x": {"scale": 0}}"#), "profile field `x.scale` must not be 0");
        assert_eq!(
            bad(r#"{"x": {"word_order": "middle"}}"#),
            r#"profile field `x.word_order` must be one of "big", "little" (got "middle")"#
        );
        assert_eq!(bad(r#"{"x": {"byte_order": 1}}"#), "profile field `x.byte_order` must be a string (got 1)");
    }
}
