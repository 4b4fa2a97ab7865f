//! Feature flags: documents in flagd's flag-definition schema, their evaluation, and the
//! OpenFeature Remote Evaluation Protocol (OFREP) over them.
//!
//! Semantics are flagd's, pinned to its evaluator core `openfeature-flagd-core==2.0.0`
//! (PyPI): `tests/flags/flagd_vectors.py` computes ~1200 resolutions with that library and
//! the test in `vectors.rs` reproduces every one (variant, value, reason, error code).
//!
//! A tour, in the order a document flows:
//! - `document`: parsing and validation of `{"$schema"?, "flags", "$evaluators"?,
//!   "metadata"?}`, with the limits below; `$ref`s to `$evaluators` are resolved and every
//!   flag's targeting compiled once, so evaluation never re-parses.
//! - `ops`: flagd's JsonLogic operators (`fractional`, `starts_with`, `ends_with`,
//!   `sem_ver`) on the one datalogic engine; `hash`: the CBOR bytes `fractional` hashes and
//!   MurmurHash3.
//! - `eval`: [`FlagSet::evaluate`]: the context as flagd builds it (`$flagd`,
//!   `targetingKey`, our `$switchyard` facts) and flagd's order of answers.
//! - `edit`: [`set_flag`], [`remove_flag`], [`set_state`], [`import`] on document text, as
//!   the CLI and the registry change a namespace's document.
//! - [`ofrep`]: the OFREP single and bulk evaluation endpoints as pure functions from a
//!   request body to a status, body and ETag; the HTTP servers only route to them.
//!
//! Where this differs from flagd-core, and why:
//! - parsing is stricter (flagd-core accepts anything its evaluator can walk): it follows
//!   flagd's JSON schema (`flags.json`, `targeting.json`) and our limits, see `document`;
//! - JsonLogic's built-in operators are datalogic's (configured as close to flagd-core's
//!   panzi-json-logic as it allows), not re-implemented: on mixed-type operands the two
//!   libraries differ in places (`vectors.rs` lists the cases the vectors hit), as every
//!   flagd implementation's library does;
//! - numbers are datalogic's: a whole float is an integer (a `fractional` weight `50.0` is
//!   accepted where flagd-core refuses it; a rule returning `1.0` names variant `"1"`), and
//!   integers beyond i64 are floats.

mod document;
mod edit;
mod eval;
mod hash;
pub mod ofrep;
mod ops;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

pub use edit::{import, remove_flag, set_flag, set_state};

/// The largest namespace document, in bytes of JSON text.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// The most flags in one document.
pub const MAX_FLAGS: usize = 1000;
/// The longest flag key (and variant or evaluator name), in bytes. Keys are non-empty and
/// have no control characters: they travel in URL paths, logs and CLI output.
pub const MAX_FLAG_KEY: usize = 256;
/// The most variants of one flag.
pub const MAX_VARIANTS: usize = 256;
/// The deepest JSON nesting of one targeting rule, `$ref`s expanded (each object and array
/// is a level, so 32 is about 16 nested operations).
pub const MAX_TARGETING_DEPTH: usize = 32;
/// The most JSON values in one targeting rule, `$ref`s expanded: evaluators that refer to
/// each other twice over would otherwise grow a rule exponentially.
pub const MAX_TARGETING_NODES: usize = 10_000;
/// The most JSON values in all of a document's targeting rules together, `$ref`s expanded:
/// bounds what parsing compiles and keeps (a plain 1 MiB document has well under this).
pub const MAX_DOCUMENT_TARGETING_NODES: usize = 500_000;
/// The largest OFREP request body, in bytes.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;
/// A document with no flags: what a new namespace starts from.
pub const EMPTY_DOCUMENT: &str = r#"{"flags":{}}"#;

/// A validated flagd document: `{"$schema"?, "flags": {key: flag}, "$evaluators"?,
/// "metadata"?}`.
///
/// Cheap to clone and `Send + Sync`: the parsed flags, with their compiled targeting, sit
/// behind one `Arc`, so a registry or sidecar swaps whole sets in and readers never lock.
#[derive(Clone)]
pub struct FlagSet {
    inner: Arc<Inner>,
}

struct Inner {
    /// Canonical text: serde_json's rendering of the parsed document.
    document: String,
    /// The parsed document, for [`FlagSet::flag_json`] and the edits.
    root: Map<String, Value>,
    flags: BTreeMap<String, Flag>,
    /// The document's `metadata` (flag-set metadata).
    metadata: Map<String, Value>,
    /// SHA-256 of `document`, mixed into bulk ETags so two documents that happen to share
    /// a revision number never share an ETag.
    digest: [u8; 32],
}

/// One flag, ready to evaluate.
struct Flag {
    enabled: bool,
    variants: Map<String, Value>,
    /// `None`: defer to the caller's code default (`defaultVariant` null, `""` or absent).
    default_variant: Option<String>,
    /// `None` when there is no targeting (absent or `{}`).
    targeting: Option<Arc<datalogic_rs::Logic>>,
    /// Flag-set metadata overlaid with the flag's own, as flagd merges them.
    metadata: Map<String, Value>,
}

impl FlagSet {
    /// The set with no flags ([`EMPTY_DOCUMENT`]).
    pub fn empty() -> FlagSet {
        FlagSet {
            inner: Arc::new(Inner {
                document: EMPTY_DOCUMENT.to_string(),
                root: Map::from_iter([("flags".to_string(), Value::Object(Map::new()))]),
                flags: BTreeMap::new(),
                metadata: Map::new(),
                digest: document::digest(EMPTY_DOCUMENT),
            }),
        }
    }

    /// Parses and validates a flagd document. Errors name the JSON path, e.g.
    /// `flags.new-ui.defaultVariant: "blue" is not one of the variants (green, red)`.
    pub fn parse(document: &str) -> Result<FlagSet, DocumentError> {
        Ok(FlagSet {
            inner: Arc::new(document::parse(document)?),
        })
    }

    /// The canonical JSON text of the document (serde_json's rendering of what was parsed:
    /// stable, so `parse(set.document())` gives the same text again).
    pub fn document(&self) -> &str {
        &self.inner.document
    }

    /// How many flags the document defines.
    pub fn len(&self) -> usize {
        self.inner.flags.len()
    }

    /// Whether the document defines no flag.
    pub fn is_empty(&self) -> bool {
        self.inner.flags.is_empty()
    }

    /// The flag keys, in sorted order (the order bulk evaluation answers in).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.inner.flags.keys().map(String::as_str)
    }

    /// The object that stands under `flags.KEY`, as written (`$ref`s unexpanded).
    pub fn flag_json(&self, key: &str) -> Option<Value> {
        self.inner.root.get("flags")?.get(key).cloned()
    }

    /// Whether the flag's state is `ENABLED`; `None` if there is no such flag.
    pub fn is_enabled(&self, key: &str) -> Option<bool> {
        self.inner.flags.get(key).map(|f| f.enabled)
    }

    /// The document's flag-set `metadata`.
    pub fn metadata(&self) -> &Map<String, Value> {
        &self.inner.metadata
    }
}

impl fmt::Debug for FlagSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlagSet")
            .field("flags", &self.inner.flags.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for FlagSet {
    fn default() -> FlagSet {
        FlagSet::empty()
    }
}

/// Why a flag resolved as it did: flagd's resolution reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No targeting: the default variant.
    Static,
    /// Targeting named a variant.
    TargetingMatch,
    /// Targeting returned `null` (or there is no default variant): the default.
    Default,
    /// The flag is `DISABLED`: the caller's code default.
    Disabled,
}

impl Reason {
    /// The OpenFeature / OFREP spelling: `STATIC`, `TARGETING_MATCH`, `DEFAULT`, `DISABLED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resolved flag.
///
/// A flag can resolve to *no* variant: when it is disabled, or when it has no default
/// variant and targeting did not pick one. flagd then hands back the caller's code default;
/// here `variant` is `""` and `value` is `Null` (variant names are never empty and variant
/// values never null, so neither is ambiguous), and OFREP omits the value.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The flag key.
    pub key: String,
    /// The variant's value; `Null` when the caller's code default applies.
    pub value: Value,
    /// The variant name; `""` when the caller's code default applies.
    pub variant: String,
    /// Why this variant (flagd's reason).
    pub reason: Reason,
    /// Flag-set metadata overlaid with the flag's.
    pub metadata: Map<String, Value>,
}

impl Evaluation {
    /// Whether no variant was chosen, so the caller's code default applies.
    pub fn uses_code_default(&self) -> bool {
        self.variant.is_empty()
    }
}

/// Why a flag could not be resolved, as OpenFeature error codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("flag not found")]
    FlagNotFound,
    /// An OFREP request body that is not JSON. Evaluation itself never returns it: rules
    /// are checked, and refused, when the document is parsed.
    #[error("parse error: {0}")]
    ParseError(String),
    /// Kept for the OFREP code table: flagd's rules never require a targeting key (a
    /// `fractional` without one serves the default), so evaluation never returns it.
    #[error("targeting key missing")]
    TargetingKeyMissing,
    /// The evaluation context is unusable (e.g. a `targetingKey` that is not a string).
    #[error("invalid context: {0}")]
    InvalidContext(String),
    /// Targeting failed at run time, or named a variant the flag does not have.
    #[error("{0}")]
    General(String),
}

impl EvalError {
    /// The OpenFeature / OFREP error code.
    pub fn code(&self) -> &'static str {
        match self {
            EvalError::FlagNotFound => "FLAG_NOT_FOUND",
            EvalError::ParseError(_) => "PARSE_ERROR",
            EvalError::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            EvalError::InvalidContext(_) => "INVALID_CONTEXT",
            EvalError::General(_) => "GENERAL",
        }
    }
}

/// A document refused, with the JSON path of the offending value (`""` for the document
/// as a whole): `flags.new-ui.variants: …`, `$evaluators.beta.in[1]: …`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DocumentError {
    pub path: String,
    pub message: String,
}

impl DocumentError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> DocumentError {
        DocumentError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}
