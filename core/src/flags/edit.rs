//! Edits on document text, as the CLI and the registry change a namespace's flags.
//!
//! Each takes the current document, applies one change to its JSON and returns the
//! canonical text of the result only if the result is a valid document; errors name the
//! path as [`FlagSet::parse`] does.

use serde_json::{Map, Value};

use super::document::{self, path_key};
use super::{DocumentError, FlagSet, MAX_DOCUMENT_BYTES};

/// Puts `flag` (the JSON object that stands under `flags.KEY`) in place of flag `key`, or
/// adds it.
pub fn set_flag(document: &str, key: &str, flag: &str) -> Result<String, DocumentError> {
    let mut root = current(document)?;
    let path = path_key("flags", key);
    if flag.len() > MAX_DOCUMENT_BYTES {
        return Err(DocumentError::new(
            path,
            "the flag is larger than a whole document may be",
        ));
    }
    let flag: Value = serde_json::from_str(flag)
        .map_err(|e| DocumentError::new(path, format!("not valid JSON: {e}")))?;
    flags_mut(&mut root)?.insert(key.to_string(), flag);
    finish(root)
}

/// Removes flag `key`; an error if there is none.
pub fn remove_flag(document: &str, key: &str) -> Result<String, DocumentError> {
    let mut root = current(document)?;
    if flags_mut(&mut root)?.remove(key).is_none() {
        return Err(DocumentError::new(path_key("flags", key), "no such flag"));
    }
    finish(root)
}

/// Sets flag `key`'s `state` to `ENABLED` or `DISABLED`; an error if there is no such flag.
pub fn set_state(document: &str, key: &str, enabled: bool) -> Result<String, DocumentError> {
    let mut root = current(document)?;
    let Some(Value::Object(flag)) = flags_mut(&mut root)?.get_mut(key) else {
        return Err(DocumentError::new(path_key("flags", key), "no such flag"));
    };
    let state = if enabled { "ENABLED" } else { "DISABLED" };
    flag.insert("state".into(), Value::String(state.into()));
    finish(root)
}

/// Merges a whole flagd document into `document`: its flags replace same-named ones, its
/// `$evaluators` are merged in (its own win on a name clash, since its flags were written
/// against them), and its `metadata` fills in keys `document` lacks (the namespace keeps
/// its own `flagSetId`, `version`…). The imported document must be valid by itself; errors
/// about it are prefixed `import: `.
pub fn import(document: &str, imported: &str) -> Result<String, DocumentError> {
    let mut root = current(document)?;
    let theirs = FlagSet::parse(imported).map_err(|e| DocumentError {
        path: if e.path.is_empty() {
            "import".into()
        } else {
            format!("import: {}", e.path)
        },
        message: e.message,
    })?;
    let theirs = &theirs.inner.root;
    for (field, value) in theirs {
        let Value::Object(incoming) = value else {
            if field == "$schema" {
                root.entry(field.clone()).or_insert_with(|| value.clone());
            }
            continue;
        };
        let ours = root
            .entry(field.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(ours) = ours else {
            // The current document parsed, so its flags, $evaluators and metadata are objects.
            return Err(DocumentError::new(field.clone(), "must be an object"));
        };
        for (name, v) in incoming {
            if field == "metadata" {
                ours.entry(name.clone()).or_insert_with(|| v.clone());
            } else {
                ours.insert(name.clone(), v.clone());
            }
        }
    }
    finish(root)
}

fn current(document: &str) -> Result<Map<String, Value>, DocumentError> {
    // The current document must itself be valid: an edit never launders a broken one.
    Ok(FlagSet::parse(document)?.inner.root.clone())
}

fn flags_mut(root: &mut Map<String, Value>) -> Result<&mut Map<String, Value>, DocumentError> {
    match root.get_mut("flags") {
        Some(Value::Object(flags)) => Ok(flags),
        _ => Err(DocumentError::new("flags", "missing")),
    }
}

fn finish(root: Map<String, Value>) -> Result<String, DocumentError> {
    let inner = document::from_root(root)?;
    if inner.document.len() > MAX_DOCUMENT_BYTES {
        return Err(DocumentError::new(
            "",
            format!(
                "the document would be {} bytes, over the limit of {MAX_DOCUMENT_BYTES}",
                inner.document.len()
            ),
        ));
    }
    Ok(inner.document)
}
