//! The bytes `fractional` hashes, and the hash.
//!
//! flagd-core 2.0.0 hashes the *canonical CBOR encoding* of the bucketing value (flagd's ADR
//! "Harden Hashing Consistency And Add Support For Non-string Attributes in Fractional
//! Evaluation"), not its UTF-8 text: a string `s` is hashed as CBOR text `s`, the shorthand
//! form as the CBOR array `[flagKey, targetingKey]`, and numbers, booleans and objects as
//! themselves. The encoding is RFC 8949 §4.2.1 core deterministic encoding as Python's
//! `cbor2.dumps(value, canonical=True)` writes it, after flagd's number normalisation
//! (integral floats in [-2^63, 2^64) become integers, so `1.0`, `1` and `-0.0`/`0` hash alike).
//!
//! MurmurHash3 x86_32 with seed 0 is written out here rather than taken from a crate: it is a
//! fixed, ~30-line hash (not a protocol), and the test vectors below pin it against the
//! SMHasher reference values and Python's `mmh3`, which flagd-core uses.

use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::DataValue;

/// MurmurHash3 x86_32 (Austin Appleby's `MurmurHash3_x86_32`): little-endian 4-byte blocks,
/// the tail, then the finaliser.
pub(super) fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mix = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        h = (h ^ mix(k))
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let k = tail
            .iter()
            .rev()
            .fold(0u32, |k, &byte| (k << 8) | u32::from(byte));
        h ^= mix(k);
    }
    // The length is mixed in modulo 2^32, as the reference does.
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Appends the canonical CBOR encoding of `value` to `out`.
pub(super) fn cbor(value: &DataValue<'_>, out: &mut Vec<u8>) {
    match value {
        DataValue::Null => out.push(0xf6),
        DataValue::Bool(false) => out.push(0xf4),
        DataValue::Bool(true) => out.push(0xf5),
        DataValue::Number(NumberValue::Integer(i)) => integer(i128::from(*i), out),
        DataValue::Number(NumberValue::Float(f)) => float(*f, out),
        DataValue::String(s) => text(s, out),
        DataValue::Array(items) => {
            head(4, items.len() as u64, out);
            for item in items.iter() {
                cbor(item, out);
            }
        }
        DataValue::Object(pairs) => {
            // Keys sorted by their encodings: shorter first, then bytewise (cbor2's
            // canonical order; for text keys it equals RFC 8949's bytewise order).
            let mut keyed: Vec<(Vec<u8>, &DataValue<'_>)> = pairs
                .iter()
                .map(|(k, v)| {
                    let mut key = Vec::with_capacity(k.len() + 2);
                    text(k, &mut key);
                    (key, v)
                })
                .collect();
            keyed.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then_with(|| a.0.cmp(&b.0)));
            head(5, keyed.len() as u64, out);
            for (key, v) in keyed {
                out.extend_from_slice(&key);
                cbor(v, out);
            }
        }
    }
}

/// The CBOR array `[flag_key, targeting_key]`: what the shorthand form hashes.
pub(super) fn cbor_pair(flag_key: &str, targeting_key: &str, out: &mut Vec<u8>) {
    head(4, 2, out);
    text(flag_key, out);
    text(targeting_key, out);
}

fn text(s: &str, out: &mut Vec<u8>) {
    head(3, s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// Major type and argument in the shortest form (RFC 8949 §3; preferred serialisation).
fn head(major: u8, n: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Integers in [-2^64, 2^64): major type 0 or 1. Callers pass only values in i64 or in the
/// normalised float range [-2^63, 2^64), so the argument always fits a u64.
fn integer(i: i128, out: &mut Vec<u8>) {
    if i >= 0 {
        head(0, i as u64, out);
    } else {
        head(1, (-1 - i) as u64, out);
    }
}

/// flagd's number normalisation, then the shortest float that keeps the value.
fn float(f: f64, out: &mut Vec<u8>) {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if f.is_nan() {
        out.extend_from_slice(&[0xf9, 0x7e, 0x00]);
        return;
    }
    if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 {
            &[0xf9, 0x7c, 0x00]
        } else {
            &[0xf9, 0xfc, 0x00]
        });
        return;
    }
    if f.fract() == 0.0 && (-TWO_63..TWO_64).contains(&f) {
        // Exact: f is integral and within range (and -0.0 becomes 0).
        integer(f as i128, out);
        return;
    }
    let single = f as f32;
    if f64::from(single) != f {
        out.push(0xfb);
        out.extend_from_slice(&f.to_be_bytes());
    } else if let Some(half) = exact_half(single) {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
    } else {
        out.push(0xfa);
        out.extend_from_slice(&single.to_be_bytes());
    }
}

/// The IEEE 754 binary16 bits of a finite `f`, if `f` is exactly representable in it.
fn exact_half(f: f32) -> Option<u16> {
    let bits = f.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32;
    let mantissa = bits & 0x007f_ffff;
    if exponent == 0 {
        // Zero, or an f32 subnormal (< 2^-126): far below binary16's range unless zero.
        return (mantissa == 0).then_some(sign);
    }
    let e = exponent - 127;
    if e > 15 {
        return None;
    }
    if e >= -14 {
        // A binary16 normal: 10 mantissa bits, so the low 13 of the f32's must be zero.
        if mantissa & 0x1fff != 0 {
            return None;
        }
        return Some(sign | (((e + 15) as u16) << 10) | (mantissa >> 13) as u16);
    }
    // A binary16 subnormal: m × 2^-24 with m < 1024, so the significand × 2^(e-23) must be
    // an exact multiple of 2^-24.
    let significand = mantissa | 0x0080_0000;
    let shift = (-(e + 1)) as u32; // ≥ 14
    if shift >= 24 || significand & ((1 << shift) - 1) != 0 {
        return None;
    }
    Some(sign | (significand >> shift) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: &DataValue<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        cbor(value, &mut out);
        out
    }

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        // SMHasher's verification vectors and Python mmh3 5.3.1 (`mmh3.hash(b, 0, signed=False)`).
        assert_eq!(murmur3_x86_32(b"", 0), 0);
        assert_eq!(murmur3_x86_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_x86_32(b"hello", 0), 613_153_351);
        assert_eq!(murmur3_x86_32(b"hello", 1), 3_142_237_357);
        assert_eq!(
            murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0),
            776_992_547
        );
        // Every tail length.
        assert_eq!(murmur3_x86_32(b"a", 0), 1_009_084_850);
        assert_eq!(murmur3_x86_32(b"ab", 0), 2_613_040_991);
        assert_eq!(murmur3_x86_32(b"abc", 0), 3_017_643_002);
        assert_eq!(murmur3_x86_32(b"abcd", 0), 1_139_631_978);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(murmur3_x86_32(&all, 0), 3_825_864_278);
    }

    #[test]
    fn cbor_encodes_as_cbor2_canonical() {
        // Expected bytes from `cbor2.dumps(normalize_numbers(v), canonical=True)`.
        assert_eq!(encode(&DataValue::String("a")), [0x61, b'a']);
        assert_eq!(encode(&DataValue::Bool(true)), [0xf5]);
        assert_eq!(encode(&DataValue::Null), [0xf6]);
        let int = |i| DataValue::Number(NumberValue::Integer(i));
        let flt = |f| DataValue::Number(NumberValue::Float(f));
        assert_eq!(encode(&int(23)), [0x17]);
        assert_eq!(encode(&int(24)), [0x18, 24]);
        assert_eq!(encode(&int(-1)), [0x20]);
        assert_eq!(encode(&int(-500)), [0x39, 0x01, 0xf3]);
        assert_eq!(
            encode(&int(i64::MIN)),
            [0x3b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        // Integral floats are integers; -0.0 is 0.
        assert_eq!(encode(&flt(-0.0)), [0x00]);
        assert_eq!(encode(&flt(1.844674407370955e19)), {
            let mut v = vec![0x1b];
            v.extend_from_slice(&18_446_744_073_709_549_568u64.to_be_bytes());
            v
        });
        // Shortest float: half, single, double.
        assert_eq!(encode(&flt(0.5)), [0xf9, 0x38, 0x00]);
        assert_eq!(encode(&flt(5.960464477539063e-08)), [0xf9, 0x00, 0x01]);
        assert_eq!(encode(&flt(100000.5)), [0xfa, 0x47, 0xc3, 0x50, 0x40]);
        assert_eq!(
            encode(&flt(0.1)),
            [0xfb, 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a]
        );
        assert_eq!(encode(&flt(1e300))[0], 0xfb);
        // Map keys: shorter first, then bytewise, whatever the input order.
        let pairs = [("bb", int(1)), ("a", int(2)), ("ba", int(3))];
        assert_eq!(
            encode(&DataValue::Object(&pairs)),
            [0xa3, 0x61, b'a', 0x02, 0x62, b'b', b'a', 0x03, 0x62, b'b', b'b', 0x01]
        );
        let mut pair = Vec::new();
        cbor_pair("f", "k", &mut pair);
        assert_eq!(pair, [0x82, 0x61, b'f', 0x61, b'k']);
    }

    #[test]
    fn exact_half_is_exact() {
        assert_eq!(exact_half(1.0), Some(0x3c00));
        assert_eq!(exact_half(-2.0), Some(0xc000));
        assert_eq!(exact_half(65504.0), Some(0x7bff));
        assert_eq!(exact_half(65520.0), None);
        assert_eq!(exact_half(6.103_515_6e-5), Some(0x0400)); // smallest normal, 2^-14
        assert_eq!(exact_half(1.0 / 3.0), None);
        assert_eq!(exact_half(2.0f32.powi(-25)), None);
    }
}
