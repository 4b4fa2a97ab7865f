//! OFREP on the registry's HTTP port, for apps without a sidecar: the same evaluation
//! as a sidecar's admin port (`switchyard_core::flags::ofrep`), from this node's applied
//! flags, with `?namespace=` (default `default`). Needs `kv` read rights on `flags/`
//! once ACLs are on (token as `Authorization: Bearer`, the OFREP providers' header).
//!
//! Each namespace's document is compiled once per revision and kept, so an evaluation
//! parses only its context.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use parking_lot::Mutex;

use switchyard_core::flags::{ofrep, FlagSet};

use super::HttpApi;
use crate::model::acl::Right;

/// The path prefix of every OFREP request.
pub const PREFIX: &str = "/ofrep/v1/evaluate/flags";
/// Largest request body (an evaluation context).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Namespaces whose compiled flags are kept at once (past it the cache starts over).
const MAX_CACHED_NAMESPACES: usize = 256;

/// Compiled flag documents by namespace, each with the revision it was compiled from.
#[derive(Default)]
pub struct FlagCache {
    compiled: Mutex<HashMap<String, (u64, Arc<FlagSet>)>>,
}

impl FlagCache {
    fn get(&self, api: &HttpApi, namespace: &str) -> (Arc<FlagSet>, u64) {
        let (document, revision) = {
            let catalog = api.shared.catalog.read();
            match catalog.flags(namespace) {
                Some(r) => (r.document.clone(), r.revision),
                None => return (Arc::new(FlagSet::empty()), 0),
            }
        };
        if let Some((rev, set)) = self.compiled.lock().get(namespace) {
            if *rev == revision {
                return (set.clone(), revision);
            }
        }
        // Validated before it was written; a failure here means a newer release's rule.
        let set = Arc::new(FlagSet::parse(&document).unwrap_or_else(|e| {
            tracing::warn!(namespace, error = %e, "stored flags do not compile on this node");
            FlagSet::empty()
        }));
        let mut compiled = self.compiled.lock();
        if compiled.len() >= MAX_CACHED_NAMESPACES {
            compiled.clear();
        }
        compiled.insert(namespace.to_string(), (revision, set.clone()));
        (set, revision)
    }
}

fn plain(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r
}

pub async fn serve(api: &HttpApi, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let key = match path.strip_prefix(PREFIX) {
        Some("") | Some("/") => None,
        Some(rest) if rest.starts_with('/') => {
            match percent_encoding::percent_decode_str(&rest[1..]).decode_utf8() {
                Ok(k) => Some(k.into_owned()),
                Err(_) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        "the flag key is not UTF-8\n".into(),
                    )
                }
            }
        }
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: POST /ofrep/v1/evaluate/flags[/KEY]\n".into(),
            )
        }
    };
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
    }
    let namespace = req
        .uri()
        .query()
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "namespace")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    let namespace = match crate::model::validate_namespace("namespace", &namespace) {
        Ok(ns) => ns,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let token = crate::consul::token(req.headers(), None);
    let caller = match crate::consul::caller(&api.shared, token.as_ref()) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let resource = match &key {
        Some(k) => crate::api::flag_resource(k),
        None => crate::api::flag_resource(""),
    };
    if !caller.may(Right::KvRead, &resource) {
        let s = crate::auth::denied(&api.shared, &caller, "Ofrep", Right::KvRead, &resource);
        return plain(StatusCode::FORBIDDEN, format!("{}\n", s.message()));
    }
    let if_none_match = req
        .headers()
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match crate::consul::read_body(req, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (set, revision) = api.flags.get(api, &namespace);
    let r = match key {
        Some(key) => ofrep::evaluate_one(&set, &key, &body, None),
        None => ofrep::evaluate_bulk(&set, revision, &body, if_none_match.as_deref(), None),
    };
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
