//! Configuration entries (the KV store): keys, entries and the rules that bound them.
//!
//! A key is a path of printable segments (`config/web/timeout`), as in Consul's KV and
//! etcd: no control characters or whitespace, no empty or `.`/`..` segments, no leading
//! `/`. A trailing `/` is allowed (Consul's "folder" keys). Values are opaque bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ValidationError;

/// Longest key, in bytes.
pub const MAX_KV_KEY_BYTES: usize = 512;
/// Largest value, in bytes (Consul's own limit).
pub const MAX_KV_VALUE_BYTES: usize = 512 * 1024;
/// Entries one recurse delete or list may touch before it is refused: the rest of the
/// registry keeps answering while one apply runs.
pub const MAX_KV_RECURSE: usize = 10_000;

/// One stored entry. `create_revision` and `modify_revision` are the catalog revisions
/// of the command that created it and of the last one that wrote it (Consul's
/// CreateIndex and ModifyIndex); check-and-set compares `modify_revision`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    #[serde(with = "serde_bytes_arc")]
    pub value: Arc<[u8]>,
    pub flags: u64,
    pub create_revision: u64,
    pub modify_revision: u64,
}

impl KvEntry {
    /// Bytes the entry counts against the store's bound.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// A key written or removed, as watchers see it (`entry: None`: deleted).
#[derive(Clone, Debug, PartialEq)]
pub struct KvChange {
    pub namespace: String,
    pub key: String,
    pub entry: Option<Arc<KvEntry>>,
}

mod serde_bytes_arc {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        let v: Vec<u8> = Deserialize::deserialize(d)?;
        Ok(v.into())
    }
}

/// Checks a key (see the module doc); `field` names it in the error.
pub fn validate_kv_key(field: &str, key: &str) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    validate_kv_prefix(field, key)
}

/// Checks a prefix: a key or the start of one (empty means every key).
pub fn validate_kv_prefix(field: &str, prefix: &str) -> Result<(), ValidationError> {
    if prefix.len() > MAX_KV_KEY_BYTES {
        return Err(ValidationError::new(
            field,
            format!("{} bytes, at most {MAX_KV_KEY_BYTES}", prefix.len()),
        ));
    }
    if prefix.starts_with('/') {
        return Err(ValidationError::new(
            field,
            "must not start with '/' (keys are relative paths, e.g. config/web/timeout)",
        ));
    }
    if let Some(c) = prefix.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::new(
            field,
            format!("holds {c:?}: keys are printable, without spaces or control characters"),
        ));
    }
    let segments: Vec<&str> = prefix.split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        // The last segment of a folder key ("config/") is empty, and that of a prefix
        // may be any start of a segment.
        if s.is_empty() && i != last {
            return Err(ValidationError::new(
                field,
                "has an empty path segment (//)",
            ));
        }
        if (*s == "." || *s == "..") && i != last {
            return Err(ValidationError::new(
                field,
                "has a '.' or '..' segment: keys are plain paths",
            ));
        }
    }
    if matches!(segments[last], "." | "..") {
        return Err(ValidationError::new(
            field,
            "has a '.' or '..' segment: keys are plain paths",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_paths() {
        for ok in [
            "InternalConfiguration",
            "config/web/timeout",
            "config/",
            "a.b-c_d:e@f",
            "é/ü",
        ] {
            assert!(validate_kv_key("key", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc",
            "a//b",
            "a/../b",
            "a/.",
            "with space",
            "tab\there",
            "nl\n",
        ] {
            assert!(validate_kv_key("key", bad).is_err(), "{bad:?}");
        }
        let long = "k".repeat(MAX_KV_KEY_BYTES + 1);
        let err = validate_kv_key("key", &long).expect_err("too long");
        assert!(err.to_string().contains("512"), "{err}");
        assert!(validate_kv_prefix("prefix", "").is_ok());
        assert!(validate_kv_prefix("prefix", "conf").is_ok());
    }
}
