//! flagd's custom JsonLogic operators (`fractional`, `starts_with`, `ends_with`, `sem_ver`)
//! on one shared datalogic [`Engine`], ported from flagd-core 2.0.0's
//! `targeting/custom_ops.py` rule for rule.
//!
//! Each operator gets its arguments already evaluated and answers `null` for anything it
//! cannot use, as flagd's do: the evaluator then serves the default variant. datalogic's own
//! `flagd` feature is deliberately not used: its `fractional` hashes the UTF-8 of
//! `flagKey + targetingKey` (flagd Go's rule), not the CBOR encoding flagd-core 2.0.0 hashes.

use std::cmp::Ordering;
use std::sync::{Arc, OnceLock};

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::datavalue::{NumberValue, OwnedDataValue};
use datalogic_rs::operator::EvalContext;
use datalogic_rs::{
    ArenaExt, CustomOperator, DataValue, DivisionByZeroHandling, Engine, EvaluationConfig,
    TruthyEvaluator,
};

use super::hash;

/// The engine every flag's targeting is compiled for and evaluated on. It holds no state
/// between evaluations (each brings its own arena), so one instance serves all threads.
pub(super) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        // Closest to panzi-json-logic, which flagd-core evaluates with: a division by zero
        // raises there (an evaluation error here, GENERAL either way); `==` across types
        // never raises; and truthiness is its `to_bool`, where an empty object is truthy.
        let config = EvaluationConfig::default()
            .with_division_by_zero(DivisionByZeroHandling::ThrowError)
            .with_loose_equality_errors(false)
            .with_truthy_evaluator(TruthyEvaluator::Custom(Arc::new(python_truthy)));
        Engine::builder()
            .with_config(config)
            .add_operator("fractional", Fractional)
            .add_operator(
                "starts_with",
                StringCompare(|s, affix| s.starts_with(affix)),
            )
            .add_operator("ends_with", StringCompare(|s, affix| s.ends_with(affix)))
            .add_operator("sem_ver", SemVer)
            .build()
    })
}

/// panzi-json-logic's `to_bool`: JsonLogic truthiness, except that any object is truthy.
fn python_truthy(value: &OwnedDataValue) -> bool {
    match value {
        OwnedDataValue::Null => false,
        OwnedDataValue::Bool(b) => *b,
        OwnedDataValue::Number(NumberValue::Integer(i)) => *i != 0,
        OwnedDataValue::Number(NumberValue::Float(f)) => *f != 0.0 && !f.is_nan(),
        OwnedDataValue::String(s) => !s.is_empty(),
        OwnedDataValue::Array(items) => !items.is_empty(),
        OwnedDataValue::Object(_) => true,
    }
}

/// `fractional`: a sticky weighted split.
///
/// - The first argument, if it is not an array, is the bucketing value (`null` → no
///   split); otherwise every argument is a bucket and the value is `[flagKey,
///   targetingKey]`, which needs a non-empty string `targetingKey` (else no split).
/// - Buckets are `[variant]` or `[variant, weight]` with an integer weight (default 1,
///   negatives clamped to 0); any other shape, a total over `i32::MAX` or a total of 0
///   means no split. (A whole float weight such as `50.0` reaches us as an integer and
///   counts; flagd-core refuses it, flagd Go accepts it.)
/// - `bucket = (murmur3(cbor(value)) × total) >> 32`, the first bucket whose running
///   weight exceeds it wins. This is flagd's "high-precision" bucketing (flagd Go
///   core/v0.15.0 on, flagd-testbed `@fractional-v2`) over flagd-core 2.0.0's CBOR hash
///   input (testbed `@fractional-v3`); see [`super::hash`].
struct Fractional;

impl CustomOperator for Fractional {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        Ok(fractional(args, ctx.root_input()).unwrap_or_else(|| arena.null()))
    }
}

fn fractional<'a>(
    args: &[&'a DataValue<'a>],
    root: &'a DataValue<'a>,
) -> Option<&'a DataValue<'a>> {
    let first = args.first()?;
    let mut input = Vec::with_capacity(64);
    let buckets = if first.is_array() {
        let targeting_key = field(root, "targetingKey")
            .and_then(DataValue::as_str)
            .filter(|k| !k.is_empty())?;
        let flag_key = field(root, "$flagd")
            .and_then(|f| field(f, "flagKey"))
            .and_then(DataValue::as_str)
            .unwrap_or("");
        hash::cbor_pair(flag_key, targeting_key, &mut input);
        args
    } else {
        if first.is_null() {
            return None;
        }
        hash::cbor(first, &mut input);
        &args[1..]
    };
    let mut parsed: Vec<(&'a DataValue<'a>, i64)> = Vec::with_capacity(buckets.len());
    let mut total: i128 = 0;
    for bucket in buckets {
        let (variant, weight) = match bucket.as_array()? {
            [variant] => (variant, 1),
            // Only an integer: flagd-core refuses a float or boolean weight.
            [variant, DataValue::Number(NumberValue::Integer(w))] => (variant, (*w).max(0)),
            _ => return None,
        };
        total += i128::from(weight);
        parsed.push((variant, weight));
    }
    if total <= 0 || total > i128::from(i32::MAX) {
        return None;
    }
    let hash = hash::murmur3_x86_32(&input, 0);
    let bucket = (u64::from(hash) * total as u64) >> 32;
    let mut end = 0u64;
    for (variant, weight) in parsed {
        end += weight as u64;
        if bucket < end {
            return Some(variant);
        }
    }
    None
}

fn field<'a>(value: &'a DataValue<'a>, name: &str) -> Option<&'a DataValue<'a>> {
    value
        .as_object()?
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `starts_with` / `ends_with`: exactly two string arguments, else `null`.
struct StringCompare(fn(&str, &str) -> bool);

impl CustomOperator for StringCompare {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        Ok(match args {
            [DataValue::String(s), DataValue::String(affix)] => arena.bool((self.0)(s, affix)),
            _ => arena.null(),
        })
    }
}

/// `sem_ver`: `[version, op, version]` with op one of `=`, `!=`, `<`, `<=`, `>`, `>=`
/// (SemVer 2.0 precedence, build metadata ignored), `^` (same major) or `~` (same major and
/// minor). Each version is the text of the argument (numbers as Python prints them), one
/// leading `v`/`V` dropped and a missing minor/patch padded with `.0`; anything that then
/// is not SemVer 2.0, or another op or arity, gives `null`.
struct SemVer;

impl CustomOperator for SemVer {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        Ok(sem_ver(args).map_or_else(|| arena.null(), |b| arena.bool(b)))
    }
}

fn sem_ver(args: &[&DataValue<'_>]) -> Option<bool> {
    let [a, op, b] = args else { return None };
    let (a, b) = (version(a)?, version(b)?);
    let order = (a.major, a.minor, a.patch)
        .cmp(&(b.major, b.minor, b.patch))
        .then_with(|| a.pre.cmp(&b.pre));
    Some(match op.as_str()? {
        "=" => order == Ordering::Equal,
        "!=" => order != Ordering::Equal,
        "<" => order == Ordering::Less,
        "<=" => order != Ordering::Greater,
        ">" => order == Ordering::Greater,
        ">=" => order != Ordering::Less,
        "^" => a.major == b.major,
        "~" => a.major == b.major && a.minor == b.minor,
        _ => return None,
    })
}

/// flagd-core's `normalize_version`. Values other than strings and numbers print as
/// `True`, `None`, `[1, 2]`… in Python, none of which is a version.
fn version(value: &DataValue<'_>) -> Option<semver::Version> {
    let text = match value {
        DataValue::String(s) => (*s).to_owned(),
        DataValue::Number(n) => python_number(n),
        _ => return None,
    };
    let text = text
        .strip_prefix('v')
        .or_else(|| text.strip_prefix('V'))
        .unwrap_or(&text);
    let numeric_end = text.find(['-', '+']).unwrap_or(text.len());
    let (numeric, rest) = text.split_at(numeric_end);
    let dots = numeric.matches('.').count();
    let padded = format!(
        "{numeric}{}{rest}",
        ".0".repeat(2usize.saturating_sub(dots))
    );
    semver::Version::parse(&padded).ok()
}

/// A number as Python's `str()` prints it: integers plainly, floats as `repr` does
/// (shortest round-trip digits; positional for 1e-4 ≤ |x| < 1e16 with at least one
/// fractional digit, else `d.ddde±XX`). It names a variant when targeting returns a number,
/// and is the text `sem_ver` parses.
pub(super) fn python_number(n: &NumberValue) -> String {
    match *n {
        NumberValue::Integer(i) => i.to_string(),
        NumberValue::Float(f) => python_float(f),
    }
}

fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // `{:e}` gives the shortest round-trip digits as `d.ddde[-]X`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else {
            let point = point as usize;
            if digits.len() > point {
                format!("{sign}{}.{}", &digits[..point], &digits[point..])
            } else {
                format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
            }
        }
    } else {
        let (head, tail) = digits.split_at(1);
        let fraction = if tail.is_empty() {
            String::new()
        } else {
            format!(".{tail}")
        };
        let esign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{head}{fraction}e{esign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> DataValue<'_> {
        DataValue::String(v)
    }

    #[test]
    fn python_floats_print_as_python_does() {
        for (f, text) in [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (1.5, "1.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (1e300, "1e+300"),
            (123.456, "123.456"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(python_float(f), text, "{f:e}");
        }
    }

    #[test]
    fn sem_ver_normalises_and_compares_like_flagd() {
        let check = |a: &str, op: &str, b: &str| sem_ver(&[&s(a), &s(op), &s(b)]);
        assert_eq!(check("v1.2", "=", "1.2.0"), Some(true));
        assert_eq!(check("V1", "<", "1.0.1"), Some(true));
        assert_eq!(check("1.0.0+a", "=", "1.0.0+b"), Some(true));
        assert_eq!(check("1.0.0-alpha", "<", "1.0.0"), Some(true));
        assert_eq!(check("1.0.0-alpha.10", ">", "1.0.0-alpha.9"), Some(true));
        assert_eq!(check("1.2-beta", "=", "1.2.0-beta"), Some(true));
        assert_eq!(check("2.9.9", "^", "2.0.0"), Some(true));
        assert_eq!(check("2.1.9", "~", "2.2.0"), Some(false));
        assert_eq!(check("vv1.0.0", "=", "1.0.0"), None);
        assert_eq!(check("01.0.0", "=", "1.0.0"), None);
        assert_eq!(check("1.0.0-01", "=", "1.0.0"), None);
        assert_eq!(check("1.0.0", "==", "1.0.0"), None);
        let num = DataValue::Number(NumberValue::Float(1.5));
        assert_eq!(sem_ver(&[&num, &s(">"), &s("1.4.9")]), Some(true));
        assert_eq!(
            sem_ver(&[&DataValue::Bool(true), &s("="), &s("1.0.0")]),
            None
        );
        assert_eq!(sem_ver(&[&s("1.0.0"), &s("=")]), None);
    }
}
