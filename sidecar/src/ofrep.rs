//! OFREP on the admin port: `POST /ofrep/v1/evaluate/flags/{key}` and the bulk
//! `POST /ofrep/v1/evaluate/flags`, evaluated from the flags in memory (from the watch
//! stream, or the disk cache while no registry answers), so an app's OpenFeature SDK
//! with the OFREP provider gets answers in microseconds and through registry outages.
//!
//! The sidecar adds its own facts to every context under `$switchyard` (`service`,
//! `version`, `zone` of the service it registers), so a flag can target the canary:
//! `{"==": [{"var": "$switchyard.version"}, "2.0.0"]}`.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use switchyard_core::flags::{ofrep, FlagSet};

use crate::table::EndpointTable;

/// The path prefix every OFREP request starts with.
pub const PREFIX: &str = "/ofrep/v1/evaluate/flags";
/// Largest request body (an evaluation context).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The sidecar's own facts for `$switchyard` in every context.
pub fn facts(service: &str, version: &str, zone: &str) -> serde_json::Value {
    serde_json::json!({ "service": service, "version": version, "zone": zone })
}

fn reply(r: ofrep::Reply) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if resp.status() != StatusCode::NOT_MODIFIED {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(tag) = r.etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert(http::header::ETAG, tag);
    }
    resp
}

fn plain(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r
}

/// Serves one OFREP request against `flags` (revision 0 and an empty set before any
/// arrived, so every flag is FLAG_NOT_FOUND rather than an error page).
pub async fn serve(
    table: &EndpointTable,
    facts: Option<&serde_json::Value>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let key = match path.strip_prefix(PREFIX) {
        Some("") | Some("/") => None,
        Some(rest) if rest.starts_with('/') => {
            match percent_encoding::percent_decode_str(&rest[1..]).decode_utf8() {
                Ok(k) => Some(k.into_owned()),
                Err(_) => return plain(StatusCode::BAD_REQUEST, "the flag key is not UTF-8\n"),
            }
        }
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: POST /ofrep/v1/evaluate/flags[/KEY]\n",
            )
        }
    };
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let if_none_match = req
        .headers()
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the evaluation context is larger than 64 KiB\n",
            )
        }
    };
    let loaded = table.flags();
    let empty;
    let (set, revision) = match &loaded {
        Some(l) => (&l.set, l.revision),
        None => {
            empty = FlagSet::empty();
            (&empty, 0)
        }
    };
    reply(match key {
        Some(key) => ofrep::evaluate_one(set, &key, &body, facts),
        None => ofrep::evaluate_bulk(set, revision, &body, if_none_match.as_deref(), facts),
    })
}
