//! Evaluating a flag, in flagd-core 2.0.0's order (`flagd_core.py` `_resolve`):
//!
//! 1. no such flag → [`EvalError::FlagNotFound`];
//! 2. `DISABLED` → reason `DISABLED`, no variant (the caller's code default);
//! 3. no targeting → the default variant, reason `STATIC`;
//! 4. targeting returns `null` → the default variant, reason `DEFAULT`;
//! 5. it returns a variant name (a boolean names `"true"`/`"false"`, a number its Python
//!    text) → that variant, `TARGETING_MATCH`; a name the flag lacks, or a rule that fails
//!    at run time → [`EvalError::General`].
//!
//! Wherever the default variant applies but the flag has none, the answer is reason
//! `DEFAULT` with no variant. The rule sees the caller's context with, as flagd sets them,
//! `$flagd` = `{flagKey, timestamp}` (unix seconds) and `targetingKey` replaced, and our
//! sidecar's facts under `$switchyard`.
//!
//! The context is converted once per request into datalogic values in an arena (no JSON
//! text in between), and only `$flagd` is added per flag, so a bulk evaluation of every
//! flag does not convert the context once per flag.

use std::time::{SystemTime, UNIX_EPOCH};

use datalogic_rs::bumpalo::collections::Vec as BumpVec;
use datalogic_rs::bumpalo::Bump;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::DataValue;
use serde_json::{Map, Value};

use super::{ops, EvalError, Evaluation, Flag, FlagSet, Reason};

impl FlagSet {
    /// Evaluates flag `key` for `context` (an OpenFeature evaluation context: attributes
    /// plus an optional string `targetingKey`).
    ///
    /// `facts` — the sidecar's own `{"service", "version", "zone"}` — stand in the context
    /// under `$switchyard`, replacing any the caller sent; with `None` a caller's
    /// `$switchyard` is left as sent.
    pub fn evaluate(
        &self,
        key: &str,
        context: &Map<String, Value>,
        facts: Option<&Value>,
    ) -> Result<Evaluation, EvalError> {
        self.evaluate_at(key, context, facts, unix_now())
    }

    /// [`FlagSet::evaluate`] with `$flagd.timestamp` given.
    pub(super) fn evaluate_at(
        &self,
        key: &str,
        context: &Map<String, Value>,
        facts: Option<&Value>,
        timestamp: i64,
    ) -> Result<Evaluation, EvalError> {
        let flag = self.inner.flags.get(key).ok_or(EvalError::FlagNotFound)?;
        targeting_key(context)?;
        if let Some(answer) = untargeted(key, flag) {
            return Ok(answer);
        }
        let arena = Bump::new();
        let data = Data::new(&arena, context, facts, timestamp)?;
        evaluate_flag(key, flag, &data, &arena)
    }

    /// Every flag, in key order, for one context (OFREP bulk evaluation).
    pub(super) fn evaluate_all(
        &self,
        context: &Map<String, Value>,
        facts: Option<&Value>,
    ) -> Result<Vec<Result<Evaluation, EvalError>>, EvalError> {
        let shared = Bump::new();
        let data = Data::new(&shared, context, facts, unix_now())?;
        let mut scratch = Bump::new();
        Ok(self
            .inner
            .flags
            .iter()
            .map(|(key, flag)| {
                // Each flag's `$flagd` and results go in a scratch arena, emptied in between.
                scratch.reset();
                evaluate_flag(key, flag, &data, &scratch)
            })
            .collect())
    }
}

/// The answer of a disabled flag or one without targeting, which no context changes.
fn untargeted(key: &str, flag: &Flag) -> Option<Evaluation> {
    if !flag.enabled {
        return Some(resolved(key, flag, None, Reason::Disabled));
    }
    flag.targeting
        .is_none()
        .then(|| default(key, flag, Reason::Static))
}

fn evaluate_flag(
    key: &str,
    flag: &Flag,
    data: &Data<'_>,
    arena: &Bump,
) -> Result<Evaluation, EvalError> {
    if let Some(answer) = untargeted(key, flag) {
        return Ok(answer);
    }
    let Some(logic) = &flag.targeting else {
        return Ok(default(key, flag, Reason::Static));
    };
    let root = data.root(arena, key);
    let result = ops::engine()
        .evaluate(logic, root, arena)
        .map_err(|e| EvalError::General(format!("targeting of {key:?} failed: {e}")))?;
    let name = match result {
        DataValue::Null => return Ok(default(key, flag, Reason::Default)),
        DataValue::String(s) => (*s).to_owned(),
        DataValue::Bool(b) => b.to_string(),
        DataValue::Number(n) => ops::python_number(n),
        other => {
            return Err(EvalError::General(format!(
                "targeting of {key:?} returned {}, not a variant name",
                if other.is_array() {
                    "an array"
                } else {
                    "an object"
                }
            )));
        }
    };
    if !flag.variants.contains_key(&name) {
        return Err(EvalError::General(format!(
            "targeting of {key:?} resolved variant {name:?}, which the flag does not have"
        )));
    }
    Ok(resolved(key, flag, Some(name), Reason::TargetingMatch))
}

fn default(key: &str, flag: &Flag, reason: Reason) -> Evaluation {
    match &flag.default_variant {
        Some(variant) => resolved(key, flag, Some(variant.clone()), reason),
        // flagd-core: with no default variant the reason is DEFAULT, even where STATIC was due.
        None => resolved(key, flag, None, Reason::Default),
    }
}

fn resolved(key: &str, flag: &Flag, variant: Option<String>, reason: Reason) -> Evaluation {
    let value = variant
        .as_ref()
        .and_then(|v| flag.variants.get(v))
        .cloned()
        .unwrap_or(Value::Null);
    Evaluation {
        key: key.to_string(),
        value,
        variant: variant.unwrap_or_default(),
        reason,
        metadata: flag.metadata.clone(),
    }
}

/// A request's context as rule data: every top-level key but `$flagd`, sorted (datalogic
/// probes wide sorted objects instead of scanning them); [`Data::root`] adds `$flagd`.
struct Data<'a> {
    pairs: &'a [(&'a str, DataValue<'a>)],
    /// Where `$flagd` goes in `pairs` to keep them sorted.
    flagd_at: usize,
    timestamp: i64,
}

impl<'a> Data<'a> {
    fn new(
        arena: &'a Bump,
        context: &'a Map<String, Value>,
        facts: Option<&'a Value>,
        timestamp: i64,
    ) -> Result<Data<'a>, EvalError> {
        let targeting_key = targeting_key(context)?;
        let mut pairs = BumpVec::with_capacity_in(context.len() + 2, arena);
        for (k, v) in context {
            let ours =
                k == "$flagd" || k == "targetingKey" || (k == "$switchyard" && facts.is_some());
            // A null attribute is left out: to flagd-core's JsonLogic a null attribute is
            // missing (`missing`, `var` with a default), to datalogic only an absent one is.
            if !ours && !v.is_null() {
                pairs.push((k.as_str(), data(arena, v)));
            }
        }
        // flagd-core sets `targetingKey` to null when there is none; absent is the same to
        // `var` and, to datalogic, what `missing` counts as missing.
        if let Some(targeting_key) = targeting_key {
            pairs.push(("targetingKey", DataValue::String(targeting_key)));
        }
        if let Some(facts) = facts {
            pairs.push(("$switchyard", data(arena, facts)));
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let flagd_at = pairs.partition_point(|(k, _)| *k < "$flagd");
        Ok(Data {
            pairs: pairs.into_bump_slice(),
            flagd_at,
            timestamp,
        })
    }

    /// The data flag `key`'s rule sees: the context and `$flagd`, in `arena`.
    fn root<'s>(&self, arena: &'s Bump, key: &'s str) -> DataValue<'s>
    where
        'a: 's,
    {
        let flagd = arena.alloc_slice_fill_iter([
            ("flagKey", DataValue::String(key)),
            (
                "timestamp",
                DataValue::Number(NumberValue::Integer(self.timestamp)),
            ),
        ]);
        let flagd = ("$flagd", DataValue::Object(flagd));
        let pairs =
            arena.alloc_slice_fill_with(self.pairs.len() + 1, |i| match i.cmp(&self.flagd_at) {
                std::cmp::Ordering::Less => self.pairs[i],
                std::cmp::Ordering::Equal => flagd,
                std::cmp::Ordering::Greater => self.pairs[i - 1],
            });
        DataValue::Object(pairs)
    }
}

/// The context's `targetingKey`: a string, or absent/`null`. OpenFeature defines it as a
/// string, and bucketing on anything else would silently serve defaults.
fn targeting_key(context: &Map<String, Value>) -> Result<Option<&str>, EvalError> {
    match context.get("targetingKey") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(EvalError::InvalidContext(format!(
            "targetingKey must be a string, not {}",
            super::document::kind(other)
        ))),
    }
}

/// A JSON value as a datalogic value borrowing the JSON's strings. Numbers as datalogic's
/// own parser reads them: integers in i64, else f64 (whole floats become integers).
fn data<'a>(arena: &'a Bump, value: &'a Value) -> DataValue<'a> {
    match value {
        Value::Null => DataValue::Null,
        Value::Bool(b) => DataValue::Bool(*b),
        Value::Number(n) => DataValue::Number(match n.as_i64() {
            Some(i) => NumberValue::Integer(i),
            None => NumberValue::from_f64(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(s) => DataValue::String(s),
        Value::Array(items) => {
            DataValue::Array(arena.alloc_slice_fill_iter(items.iter().map(|v| data(arena, v))))
        }
        Value::Object(fields) => DataValue::Object(
            arena.alloc_slice_fill_iter(fields.iter().map(|(k, v)| (k.as_str(), data(arena, v)))),
        ),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
