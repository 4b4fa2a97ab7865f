//! The OpenFeature Remote Evaluation Protocol (OFREP, open-feature/protocol
//! `service/openapi.yaml`, API 0.3.0) as functions from a request body to a [`Reply`]; the
//! registry's and sidecar's HTTP servers route `POST /ofrep/v1/evaluate/flags/{key}` and
//! `POST /ofrep/v1/evaluate/flags` here and copy the reply out.
//!
//! Replies are shaped for what providers parse (PyPI `openfeature-provider-ofrep==0.3.0`
//! reads `value` if present, and `reason`, `variant`, `metadata`; on 400 it reads
//! `errorCode` and `errorDetails`; 404 is FLAG_NOT_FOUND whatever the body):
//!
//! - success, 200: `{"key", "value", "reason", "variant", "metadata"}`, `metadata` always
//!   (`{}` if none) and `variant` always (`null` when the flag resolved to no variant —
//!   disabled, or no default — in which case `value` is omitted: OFREP's `codeDefaultFlag`,
//!   the provider serves its code default, as flagd does);
//! - errors: `{"key", "errorCode", "errorDetails"}`, 404 for FLAG_NOT_FOUND, 400 for
//!   PARSE_ERROR (a body that is not a JSON object), INVALID_CONTEXT (`context` not an
//!   object, `targetingKey` not a string) and GENERAL (a rule failing);
//! - a body over [`MAX_CONTEXT_BYTES`] is 413, as flagd answers, with a GENERAL error body;
//! - an empty body, or one without `context` (or with `"context": null`), is an empty
//!   context: the spec marks `context` required, but flagd and the SDKs send `{}` for no
//!   context, and nothing is gained by refusing.
//!
//! Bulk answers `{"flags": [...], "metadata"}` with every flag, in key order, each a
//! success or its own error; a request-level failure has no `key`. Its ETag hashes the
//! document (its revision and a digest of its text), the request's context and the facts,
//! so it changes whenever any of them does; `If-None-Match` naming it gets 304 with an
//! empty body, before any flag is evaluated.

use std::io::Write;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{EvalError, Evaluation, FlagSet, MAX_CONTEXT_BYTES};

/// An HTTP answer: status, JSON body (empty for 304) and, for bulk 200/304, the ETag
/// (quoted, ready for the header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub etag: Option<String>,
}

/// `POST /ofrep/v1/evaluate/flags/{key}`.
pub fn evaluate_one(set: &FlagSet, key: &str, body: &[u8], facts: Option<&Value>) -> Reply {
    let context = match request_context(body) {
        Ok(context) => context,
        Err(e) => return e.reply(Some(key)),
    };
    match set.evaluate(key, &context, facts) {
        Ok(evaluation) => json(200, &Success::from(&evaluation), None),
        Err(e) => failure(key, &e),
    }
}

/// `POST /ofrep/v1/evaluate/flags`: every flag of `set`, which is at `revision`.
pub fn evaluate_bulk(
    set: &FlagSet,
    revision: u64,
    body: &[u8],
    if_none_match: Option<&str>,
    facts: Option<&Value>,
) -> Reply {
    let context = match request_context(body) {
        Ok(context) => context,
        Err(e) => return e.reply(None),
    };
    let etag = etag(set, revision, &context, facts);
    if if_none_match.is_some_and(|header| matches(header, &etag)) {
        return Reply {
            status: 304,
            body: Vec::new(),
            etag: Some(etag),
        };
    }
    let evaluations = match set.evaluate_all(&context, facts) {
        Ok(evaluations) => evaluations,
        Err(e) => return json(400, &Failure::new(None, e.code(), e.to_string()), None),
    };
    let flags: Vec<Item<'_>> = set
        .keys()
        .zip(&evaluations)
        .map(|(key, result)| match result {
            Ok(evaluation) => Item::Success(Success::from(evaluation)),
            Err(e) => Item::Failure(Failure::new(Some(key), e.code(), e.to_string())),
        })
        .collect();
    json(
        200,
        &Bulk {
            flags,
            metadata: set.metadata(),
        },
        Some(etag),
    )
}

/// What a request body can be refused for, before any flag is looked at.
#[derive(Debug)]
enum RequestError {
    TooLarge(usize),
    Parse(String),
    InvalidContext(String),
}

impl RequestError {
    fn reply(&self, key: Option<&str>) -> Reply {
        let (status, code, details) = match self {
            RequestError::TooLarge(n) => (
                413,
                "GENERAL",
                format!("request body too large: {n} bytes, the limit is {MAX_CONTEXT_BYTES}"),
            ),
            RequestError::Parse(details) => (400, "PARSE_ERROR", details.clone()),
            RequestError::InvalidContext(details) => (400, "INVALID_CONTEXT", details.clone()),
        };
        json(status, &Failure::new(key, code, details), None)
    }
}

/// The evaluation context of a request body.
fn request_context(body: &[u8]) -> Result<Map<String, Value>, RequestError> {
    if body.len() > MAX_CONTEXT_BYTES {
        return Err(RequestError::TooLarge(body.len()));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| RequestError::Parse(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(mut request) = request else {
        return Err(RequestError::Parse(format!(
            "the request body must be a JSON object, not {}",
            super::document::kind(&request)
        )));
    };
    let context = match request.remove("context") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(context)) => context,
        Some(other) => {
            return Err(RequestError::InvalidContext(format!(
                "context must be an object, not {}",
                super::document::kind(&other)
            )));
        }
    };
    match context.get("targetingKey") {
        None | Some(Value::Null | Value::String(_)) => Ok(context),
        Some(other) => Err(RequestError::InvalidContext(format!(
            "targetingKey must be a string, not {}",
            super::document::kind(other)
        ))),
    }
}

fn failure(key: &str, e: &EvalError) -> Reply {
    let status = if *e == EvalError::FlagNotFound {
        404
    } else {
        400
    };
    let details = match e {
        EvalError::FlagNotFound => format!("flag {key:?} was not found"),
        other => other.to_string(),
    };
    json(status, &Failure::new(Some(key), e.code(), details), None)
}

#[derive(Serialize)]
struct Success<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a Value>,
    reason: &'static str,
    variant: Option<&'a str>,
    metadata: &'a Map<String, Value>,
}

impl<'a> From<&'a Evaluation> for Success<'a> {
    fn from(e: &'a Evaluation) -> Success<'a> {
        let chosen = !e.uses_code_default();
        Success {
            key: &e.key,
            value: chosen.then_some(&e.value),
            reason: e.reason.as_str(),
            variant: chosen.then_some(e.variant.as_str()),
            metadata: &e.metadata,
        }
    }
}

#[derive(Serialize)]
struct Failure<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(rename = "errorCode")]
    error_code: &'static str,
    #[serde(rename = "errorDetails")]
    error_details: String,
}

impl<'a> Failure<'a> {
    fn new(key: Option<&'a str>, error_code: &'static str, error_details: String) -> Failure<'a> {
        Failure {
            key,
            error_code,
            error_details,
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Item<'a> {
    Success(Success<'a>),
    Failure(Failure<'a>),
}

#[derive(Serialize)]
struct Bulk<'a> {
    flags: Vec<Item<'a>>,
    metadata: &'a Map<String, Value>,
}

fn json<T: Serialize>(status: u16, body: &T, etag: Option<String>) -> Reply {
    match serde_json::to_vec(body) {
        Ok(body) => Reply { status, body, etag },
        // Our own types of strings and JSON values always serialise; kept as a 500.
        Err(e) => Reply {
            status: 500,
            body: format!(r#"{{"errorDetails":{:?}}}"#, e.to_string()).into_bytes(),
            etag: None,
        },
    }
}

/// `"<revision>-<16 hex digits>"`: the revision for people reading headers, then SHA-256
/// over the document's digest, the revision, the context and the facts (streamed: the
/// context is not re-serialised into a buffer).
fn etag(
    set: &FlagSet,
    revision: u64,
    context: &Map<String, Value>,
    facts: Option<&Value>,
) -> String {
    let mut hasher = Sha256Writer(ring::digest::Context::new(&ring::digest::SHA256));
    hasher.0.update(b"switchyard-ofrep-bulk\0");
    hasher.0.update(&set.inner.digest);
    hasher.0.update(&revision.to_be_bytes());
    // Writing into a hasher cannot fail; a failure would only weaken the tag, not break it.
    let _ = serde_json::to_writer(&mut hasher, context);
    hasher.0.update(b"\0");
    let _ = serde_json::to_writer(&mut hasher, &facts);
    let digest = hasher.0.finish();
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("\"{revision}-{hex}\"")
}

struct Sha256Writer(ring::digest::Context);

impl Write for Sha256Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// RFC 9110 §13.1.2: `*`, or a list of entity tags compared weakly (a `W/` prefix is
/// ignored). A tag sent without its quotes is accepted too.
fn matches(header: &str, etag: &str) -> bool {
    let bare = etag.trim_matches('"');
    header.split(',').map(str::trim).any(|tag| {
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag == etag || tag == bare
    })
}
