//! Parsing and validating a flagd document.
//!
//! flagd-core 2.0.0 (`model/flag_store.py`, `model/flag.py`) accepts a flag when its
//! `state` is `ENABLED`/`DISABLED`, its `variants` a non-empty object and it has no unknown
//! field; it substitutes `{"$ref": NAME}` objects with `$evaluators.NAME` in the flags' JSON
//! text and finds everything else out at evaluation. Operators write these documents by
//! hand, so this refuses at parse, naming the path, what flagd's JSON schema
//! (flagd-schemas `json/flags.json`, `json/targeting.json`) refuses too, or what would only
//! ever fail at evaluation:
//!
//! - unknown top-level fields; `flags` missing or not an object;
//! - variants of mixed types, `null` or array variants (the schema's boolean, string,
//!   number and object flags), empty variant names;
//! - a `defaultVariant` that is not a string, `null` or absent, or names no variant;
//! - targeting that is not an object, operators outside flagd's set (every JsonLogic
//!   object has exactly one key), a `$ref` to no evaluator or a cycle of them;
//! - metadata values other than strings, numbers and booleans (`flagSetId`, `version`:
//!   strings);
//! - and Switchyard's limits ([`super::MAX_FLAGS`] and the others).
//!
//! `$ref`s are expanded structurally (not by text substitution) and only inside targeting,
//! where flagd's schema allows them; `source` and `selector`, which flagd's syncs add to a
//! flag, are kept and ignored as flagd-core does.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{
    ops, DocumentError, Flag, Inner, MAX_DOCUMENT_BYTES, MAX_DOCUMENT_TARGETING_NODES, MAX_FLAGS,
    MAX_FLAG_KEY, MAX_TARGETING_DEPTH, MAX_TARGETING_NODES, MAX_VARIANTS,
};

/// The operators of flagd's targeting schema: JsonLogic's (less `log` and the `?:` alias)
/// and flagd's own.
#[rustfmt::skip]
const OPERATORS: &[&str] = &[
    "var", "missing", "missing_some", "if", "==", "===", "!=", "!==", "!", "!!", "or", "and",
    ">", ">=", "<", "<=", "max", "min", "+", "-", "*", "/", "%", "map", "reduce", "filter",
    "all", "none", "some", "merge", "in", "cat", "substr",
    "fractional", "starts_with", "ends_with", "sem_ver",
];

const FLAG_FIELDS: &str = "state, variants, defaultVariant, targeting, metadata";

pub(super) fn parse(text: &str) -> Result<Inner, DocumentError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(DocumentError::new(
            "",
            format!(
                "the document is {} bytes, over the limit of {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DocumentError::new("", format!("not valid JSON: {e}")))?;
    let Value::Object(root) = value else {
        return Err(DocumentError::new(
            "",
            format!("the document must be a JSON object, not {}", kind(&value)),
        ));
    };
    from_root(root)
}

/// Validates an already parsed document (the edits build one without a text round trip).
pub(super) fn from_root(root: Map<String, Value>) -> Result<Inner, DocumentError> {
    for (field, value) in &root {
        match field.as_str() {
            "$schema" if !value.is_string() => {
                return Err(DocumentError::new("$schema", "must be a string"));
            }
            "$schema" | "flags" | "$evaluators" | "metadata" => {}
            other => {
                return Err(DocumentError::new(
                    path_key("", other),
                    "unknown field (a flagd document has $schema, flags, $evaluators, metadata)",
                ));
            }
        }
    }
    let metadata = match root.get("metadata") {
        None => Map::new(),
        Some(m) => metadata(m, "metadata", true)?,
    };
    let evaluators = match root.get("$evaluators") {
        None => Map::new(),
        Some(Value::Object(e)) => e.clone(),
        Some(other) => {
            return Err(DocumentError::new(
                "$evaluators",
                format!("must be an object of named rules, not {}", kind(other)),
            ));
        }
    };
    // Each evaluator must be a valid rule on its own, so its errors name its own path.
    for (name, rule) in &evaluators {
        let path = path_key("$evaluators", name);
        check_name(&path, name, "evaluator name")?;
        if !rule.is_object() {
            return Err(DocumentError::new(
                path,
                format!("must be a targeting rule (an object), not {}", kind(rule)),
            ));
        }
        let mut expander = Expander::new(&evaluators, name);
        expander.expand(rule, &path, 0)?;
    }
    let flags_value = match root.get("flags") {
        Some(Value::Object(flags)) => flags,
        Some(other) => {
            return Err(DocumentError::new(
                "flags",
                format!("must be an object of flags by key, not {}", kind(other)),
            ));
        }
        None => return Err(DocumentError::new("flags", "missing (it may be {})")),
    };
    if flags_value.len() > MAX_FLAGS {
        return Err(DocumentError::new(
            "flags",
            format!("{} flags, over the limit of {MAX_FLAGS}", flags_value.len()),
        ));
    }
    let mut flags = BTreeMap::new();
    let mut budget = MAX_DOCUMENT_TARGETING_NODES;
    for (key, value) in flags_value {
        let path = path_key("flags", key);
        check_name(&path, key, "flag key")?;
        let flag = flag(&path, key, value, &evaluators, &metadata, &mut budget)?;
        flags.insert(key.clone(), flag);
    }
    let root = Value::Object(root);
    let document = root.to_string();
    let digest = digest(&document);
    let Value::Object(root) = root else {
        return Err(DocumentError::new("", "the document is not an object"));
    };
    Ok(Inner {
        document,
        root,
        flags,
        metadata,
        digest,
    })
}

pub(super) fn digest(document: &str) -> [u8; 32] {
    let hash = ring::digest::digest(&ring::digest::SHA256, document.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.as_ref());
    out
}

fn flag(
    path: &str,
    key: &str,
    value: &Value,
    evaluators: &Map<String, Value>,
    set_metadata: &Map<String, Value>,
    budget: &mut usize,
) -> Result<Flag, DocumentError> {
    let Value::Object(fields) = value else {
        return Err(DocumentError::new(
            path,
            format!("a flag must be an object, not {}", kind(value)),
        ));
    };
    for field in fields.keys() {
        if !matches!(
            field.as_str(),
            "state"
                | "variants"
                | "defaultVariant"
                | "targeting"
                | "metadata"
                | "source"
                | "selector"
        ) {
            return Err(DocumentError::new(
                path_key(path, field),
                format!("unknown field (a flag has {FLAG_FIELDS})"),
            ));
        }
    }
    let enabled = match fields.get("state") {
        Some(Value::String(s)) if s == "ENABLED" => true,
        Some(Value::String(s)) if s == "DISABLED" => false,
        Some(other) => {
            return Err(DocumentError::new(
                format!("{path}.state"),
                format!("{other} is neither \"ENABLED\" nor \"DISABLED\""),
            ));
        }
        None => {
            return Err(DocumentError::new(
                format!("{path}.state"),
                "missing (\"ENABLED\" or \"DISABLED\")",
            ));
        }
    };
    let variants = variants(&format!("{path}.variants"), fields.get("variants"))?;
    let default_variant = match fields.get("defaultVariant") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if variants.contains_key(s) => Some(s.clone()),
        Some(Value::String(s)) => {
            let names: Vec<&str> = variants.keys().map(String::as_str).collect();
            return Err(DocumentError::new(
                format!("{path}.defaultVariant"),
                format!("{:?} is not one of the variants ({})", s, names.join(", ")),
            ));
        }
        Some(other) => {
            return Err(DocumentError::new(
                format!("{path}.defaultVariant"),
                format!("must be a variant name or null, not {}", kind(other)),
            ));
        }
    };
    let mut metadata = set_metadata.clone();
    if let Some(m) = fields.get("metadata") {
        metadata.extend(self::metadata(m, &format!("{path}.metadata"), false)?);
    }
    let targeting = match fields.get("targeting") {
        None => None,
        Some(Value::Object(rule)) if rule.is_empty() => None,
        Some(rule @ Value::Object(_)) => Some(compile(
            &format!("{path}.targeting"),
            key,
            rule,
            evaluators,
            budget,
        )?),
        Some(other) => {
            return Err(DocumentError::new(
                format!("{path}.targeting"),
                format!("must be a targeting rule (an object), not {}", kind(other)),
            ));
        }
    };
    Ok(Flag {
        enabled,
        variants,
        default_variant,
        targeting,
        metadata,
    })
}

fn variants(path: &str, value: Option<&Value>) -> Result<Map<String, Value>, DocumentError> {
    let variants = match value {
        Some(Value::Object(v)) if !v.is_empty() => v,
        Some(Value::Object(_)) => {
            return Err(DocumentError::new(
                path,
                "a flag needs at least one variant",
            ));
        }
        Some(other) => {
            return Err(DocumentError::new(
                path,
                format!(
                    "must be an object of values by variant name, not {}",
                    kind(other)
                ),
            ));
        }
        None => return Err(DocumentError::new(path, "missing")),
    };
    if variants.len() > MAX_VARIANTS {
        return Err(DocumentError::new(
            path,
            format!(
                "{} variants, over the limit of {MAX_VARIANTS}",
                variants.len()
            ),
        ));
    }
    // flagd's schema has boolean, string, number and object flags: one type for all.
    let mut first: Option<(&str, &'static str)> = None;
    for (name, value) in variants {
        let vpath = path_key(path, name);
        check_name(&vpath, name, "variant name")?;
        let this = match value {
            Value::Bool(_) => "boolean",
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Object(_) => "object",
            Value::Null | Value::Array(_) => {
                return Err(DocumentError::new(
                    vpath,
                    format!(
                        "a variant is a boolean, string, number or object, not {}",
                        kind(value)
                    ),
                ));
            }
        };
        match first {
            None => first = Some((name, this)),
            Some((other, expected)) if expected != this => {
                return Err(DocumentError::new(
                    vpath,
                    format!(
                        "is {} {this}, but variant {other:?} is {} {expected}: all variants of a flag have one type",
                        article(this),
                        article(expected)
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(variants.clone())
}

fn metadata(
    value: &Value,
    path: &str,
    flag_set: bool,
) -> Result<Map<String, Value>, DocumentError> {
    let Value::Object(entries) = value else {
        return Err(DocumentError::new(
            path,
            format!("must be an object, not {}", kind(value)),
        ));
    };
    for (key, v) in entries {
        let vpath = path_key(path, key);
        if key.is_empty() {
            return Err(DocumentError::new(
                vpath,
                "a metadata key must not be empty",
            ));
        }
        match v {
            Value::String(_) => {}
            Value::Bool(_) | Value::Number(_)
                if !(flag_set && (key == "flagSetId" || key == "version")) => {}
            _ => {
                let allowed = if flag_set && (key == "flagSetId" || key == "version") {
                    "a string"
                } else {
                    "a string, number or boolean"
                };
                return Err(DocumentError::new(
                    vpath,
                    format!("must be {allowed}, not {}", kind(v)),
                ));
            }
        }
    }
    Ok(entries.clone())
}

/// Expands and checks a targeting rule, then compiles it for the shared engine.
fn compile(
    path: &str,
    key: &str,
    rule: &Value,
    evaluators: &Map<String, Value>,
    budget: &mut usize,
) -> Result<Arc<datalogic_rs::Logic>, DocumentError> {
    let mut expander = Expander::new(evaluators, "");
    let expanded = expander.expand(rule, path, 0)?;
    *budget = budget.checked_sub(expander.nodes).ok_or_else(|| {
        DocumentError::new(
            path,
            format!(
                "the document's targeting rules have more than {MAX_DOCUMENT_TARGETING_NODES} values together ($refs expanded)"
            ),
        )
    })?;
    let logic = ops::engine()
        .compile(expanded.to_string().as_str())
        .map_err(|e| {
            DocumentError::new(path, format!("targeting of {key:?} does not compile: {e}"))
        })?;
    Ok(Arc::new(logic))
}

/// Walks a rule, replacing `{"$ref": NAME}` with the named evaluator's (expanded) rule and
/// enforcing the operator set, [`MAX_TARGETING_DEPTH`] and [`MAX_TARGETING_NODES`].
struct Expander<'e> {
    evaluators: &'e Map<String, Value>,
    /// The evaluators being expanded, innermost last: a `$ref` back into one is a cycle.
    stack: Vec<&'e str>,
    nodes: usize,
}

impl<'e> Expander<'e> {
    fn new(evaluators: &'e Map<String, Value>, root: &'e str) -> Expander<'e> {
        let stack = if root.is_empty() {
            Vec::new()
        } else {
            vec![root]
        };
        Expander {
            evaluators,
            stack,
            nodes: 0,
        }
    }

    fn expand(&mut self, value: &Value, path: &str, depth: usize) -> Result<Value, DocumentError> {
        self.nodes += 1;
        if self.nodes > MAX_TARGETING_NODES {
            return Err(DocumentError::new(
                path,
                format!("the rule has more than {MAX_TARGETING_NODES} values ($refs expanded)"),
            ));
        }
        match value {
            Value::Array(items) => {
                self.deeper(path, depth)?;
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.expand(item, &format!("{path}[{i}]"), depth + 1)?);
                }
                Ok(Value::Array(out))
            }
            Value::Object(fields) => {
                if let Some(target) = fields.get("$ref") {
                    return self.reference(fields.len(), target, path, depth);
                }
                self.deeper(path, depth)?;
                let mut entries = fields.iter();
                let (Some((op, args)), None) = (entries.next(), entries.next()) else {
                    return Err(DocumentError::new(
                        path,
                        format!(
                            "an operation is an object with exactly one key, the operator; this one has {}",
                            fields.len()
                        ),
                    ));
                };
                if !OPERATORS.contains(&op.as_str()) {
                    return Err(DocumentError::new(
                        path,
                        format!("{op:?} is not a flagd targeting operator"),
                    ));
                }
                let args = self.expand(args, &path_key(path, op), depth + 1)?;
                Ok(Value::Object(Map::from_iter([(op.clone(), args)])))
            }
            scalar => Ok(scalar.clone()),
        }
    }

    fn reference(
        &mut self,
        fields: usize,
        target: &Value,
        path: &str,
        depth: usize,
    ) -> Result<Value, DocumentError> {
        let Value::String(name) = target else {
            return Err(DocumentError::new(
                format!("{path}.$ref"),
                format!("must name an evaluator (a string), not {}", kind(target)),
            ));
        };
        if fields != 1 {
            return Err(DocumentError::new(path, "a $ref object has no other key"));
        }
        let Some((name, rule)) = self.evaluators.get_key_value(name.as_str()) else {
            let known: Vec<&str> = self.evaluators.keys().map(String::as_str).collect();
            return Err(DocumentError::new(
                format!("{path}.$ref"),
                format!(
                    "no evaluator {name:?} in $evaluators ({})",
                    known.join(", ")
                ),
            ));
        };
        if self.stack.contains(&name.as_str()) {
            let mut cycle: Vec<&str> = self.stack.clone();
            cycle.push(name);
            return Err(DocumentError::new(
                format!("{path}.$ref"),
                format!(
                    "evaluators refer to each other in a cycle: {}",
                    cycle.join(" -> ")
                ),
            ));
        }
        self.stack.push(name);
        // The expansion stands where the $ref stood: same depth.
        self.nodes -= 1;
        let expanded = self.expand(rule, path, depth);
        self.stack.pop();
        expanded
    }

    fn deeper(&self, path: &str, depth: usize) -> Result<(), DocumentError> {
        if depth >= MAX_TARGETING_DEPTH {
            return Err(DocumentError::new(
                path,
                format!("the rule nests deeper than {MAX_TARGETING_DEPTH} levels ($refs expanded)"),
            ));
        }
        Ok(())
    }
}

/// Flag keys, variant and evaluator names: non-empty, at most [`MAX_FLAG_KEY`] bytes, no
/// control characters.
fn check_name(path: &str, name: &str, what: &str) -> Result<(), DocumentError> {
    if name.is_empty() {
        return Err(DocumentError::new(
            path,
            format!("a {what} must not be empty"),
        ));
    }
    if name.len() > MAX_FLAG_KEY {
        return Err(DocumentError::new(
            path,
            format!(
                "the {what} is {} bytes, over the limit of {MAX_FLAG_KEY}",
                name.len()
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(DocumentError::new(
            path,
            format!("a {what} must not contain control characters"),
        ));
    }
    Ok(())
}

/// `parent.key`, shortened so a hostile key cannot make error messages huge.
pub(super) fn path_key(parent: &str, key: &str) -> String {
    let key: String = if key.len() > 64 {
        let mut end = 64;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &key[..end])
    } else {
        key.to_string()
    };
    let key = key.escape_debug().to_string();
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn article(kind: &str) -> &'static str {
    if kind.starts_with('o') {
        "an"
    } else {
        "a"
    }
}
