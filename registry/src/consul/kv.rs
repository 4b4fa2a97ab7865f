//! Consul's KV endpoints, `/v1/kv/<key>`: GET (one key, `recurse`, `keys` with
//! `separator`, `raw`, blocking on `index`/`wait`), PUT (the body is the value; `flags`,
//! `cas`), DELETE (`recurse`, `cas`), on our replicated KV store.
//!
//! As in Consul: values are base64 in JSON (`null` when empty), a missing key is a 404
//! with an empty body, and writes answer `true` or `false` (a check-and-set that did not
//! match). `X-Consul-Index` is the largest modify index under the key (see
//! `Catalog::kv_max_revision`), so a blocking read wakes on any change under it.

use std::net::SocketAddr;

use http::{HeaderValue, Method, StatusCode};
use serde::Serialize;

use super::query::Query;
use super::{caller, json, read_body, respond, text, Consul, HttpResponse};
use crate::auth;
use crate::model::acl::Right;
use crate::model::kv::{
    validate_kv_key, validate_kv_prefix, KvEntry, MAX_KV_RECURSE, MAX_KV_VALUE_BYTES,
};

/// One entry in Consul's JSON shape.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvPair<'a> {
    lock_index: u64,
    key: &'a str,
    flags: u64,
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
}

fn pair(e: &KvEntry) -> KvPair<'_> {
    use base64::Engine as _;
    KvPair {
        lock_index: 0,
        key: &e.key,
        flags: e.flags,
        value: (!e.value.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&e.value)),
        create_index: e.create_revision,
        modify_index: e.modify_revision,
    }
}

/// `keys` with a separator: each key under `prefix` cut after the first separator that
/// follows the prefix (Consul's "folders"), deduplicated, in order.
fn rolled_up(keys: impl Iterator<Item = String>, prefix: &str, separator: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for key in keys {
        let cut = key[prefix.len()..]
            .find(separator)
            .map(|i| key[..prefix.len() + i + separator.len()].to_string())
            .unwrap_or(key);
        if out.last() != Some(&cut) {
            out.push(cut);
        }
    }
    out
}

impl Consul {
    /// The caller's `right` on `key`, or the 403 (or unknown-token answer) to send.
    fn may_kv(
        &self,
        token: Option<&HeaderValue>,
        method: &'static str,
        right: Right,
        key: &str,
    ) -> Result<(), HttpResponse> {
        let c = caller(&self.shared, token)?;
        if c.may(right, key) {
            return Ok(());
        }
        let s = auth::denied(&self.shared, &c, method, right, key);
        Err(text(
            StatusCode::FORBIDDEN,
            format!("Permission denied: {}", s.message()),
        ))
    }

    /// Serves `/v1/kv/<key>` (`key` percent-decoded, possibly empty for `recurse`/`keys`).
    pub(super) async fn kv(
        &self,
        req: http::Request<hyper::body::Incoming>,
        q: &Query,
        namespace: &str,
        key: &str,
        token: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> HttpResponse {
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD {
            self.kv_read(q, namespace, key, token, client).await
        } else if method == Method::PUT || method == Method::POST {
            self.kv_put(req, q, namespace, key, token).await
        } else if method == Method::DELETE {
            self.kv_delete(q, namespace, key, token).await
        } else {
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed on /v1/kv"),
            )
        }
    }

    async fn kv_read(
        &self,
        q: &Query,
        namespace: &str,
        key: &str,
        token: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> HttpResponse {
        let listing = q.recurse || q.keys;
        let checked = if listing {
            validate_kv_prefix("key", key)
        } else {
            validate_kv_key("key", key)
        };
        if let Err(e) = checked {
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
        if let Err(r) = self.may_kv(token, "ConsulKvGet", Right::KvRead, key) {
            return r;
        }
        let index = match self.kv_block(q, namespace, key, client).await {
            Ok(i) => i,
            Err(r) => return r,
        };
        let catalog = self.shared.catalog.read();
        let r = if q.keys {
            let entries = catalog.kv_list(namespace, key, MAX_KV_RECURSE);
            let keys = entries.iter().map(|e| e.key.clone());
            let keys = match q.separator.as_deref() {
                Some(sep) => rolled_up(keys, key, sep),
                None => keys.collect(),
            };
            if keys.is_empty() {
                respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "")
            } else {
                json(StatusCode::OK, &keys)
            }
        } else if q.recurse {
            let entries = catalog.kv_list(namespace, key, MAX_KV_RECURSE);
            if entries.is_empty() {
                respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "")
            } else {
                json(
                    StatusCode::OK,
                    &entries.iter().map(|e| pair(e)).collect::<Vec<_>>(),
                )
            }
        } else {
            match catalog.kv_get(namespace, key) {
                None => respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", ""),
                Some(e) if q.raw => {
                    respond(StatusCode::OK, "application/octet-stream", e.value.to_vec())
                }
                Some(e) => json(StatusCode::OK, &[pair(&e)]),
            }
        };
        Self::with_index(r, index.max(1))
    }

    /// Holds a blocking read until something under `prefix` changes past the client's
    /// index (or the wait ends); the index to answer with.
    async fn kv_block(
        &self,
        q: &Query,
        namespace: &str,
        prefix: &str,
        client: SocketAddr,
    ) -> Result<u64, HttpResponse> {
        let now = || {
            self.shared
                .catalog
                .read()
                .kv_max_revision(namespace, prefix)
        };
        // Subscribe before reading, so no change falls between the two.
        let mut changes = self.shared.hub.subscribe();
        let current = now();
        let Some(seen) = q.index.filter(|seen| current <= *seen) else {
            return Ok(current);
        };
        let _held = self.blocking.take(client.ip()).map_err(|e| {
            self.shared.metrics.consul_blocking_refused.inc();
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, e);
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        })?;
        self.shared.metrics.consul_blocked.inc();
        let deadline = tokio::time::Instant::now() + q.hold();
        let mut stop = self.shared.shutdown.clone();
        loop {
            let next = tokio::select! {
                c = tokio::time::timeout_at(deadline, changes.recv()) => c,
                _ = stop.wait_for(|s| *s) => break,
            };
            match next {
                // The wait is over: answer with what there is.
                Err(_) => break,
                Ok(Ok(change)) => {
                    let touched = change.reset
                        || change
                            .kv
                            .iter()
                            .any(|k| k.namespace == namespace && k.key.starts_with(prefix));
                    if touched && now() > seen {
                        break;
                    }
                }
                // Fell behind the hub: look at the store itself.
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    if now() > seen {
                        break;
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
            }
        }
        self.shared.metrics.consul_blocked.dec();
        Ok(now())
    }

    async fn kv_put(
        &self,
        req: http::Request<hyper::body::Incoming>,
        q: &Query,
        namespace: &str,
        key: &str,
        token: Option<&HeaderValue>,
    ) -> HttpResponse {
        if let Err(r) = self.may_kv(token, "ConsulKvPut", Right::KvWrite, key) {
            return r;
        }
        let body = match read_body(req, MAX_KV_VALUE_BYTES).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let command = match crate::api::kv_put_command(
            namespace.to_string(),
            key,
            body.to_vec(),
            q.flags.unwrap_or(0),
            q.cas,
        ) {
            Ok(c) => c,
            Err(s) => return text(StatusCode::BAD_REQUEST, s.message().to_string()),
        };
        self.kv_write(command).await
    }

    async fn kv_delete(
        &self,
        q: &Query,
        namespace: &str,
        key: &str,
        token: Option<&HeaderValue>,
    ) -> HttpResponse {
        if let Err(r) = self.may_kv(token, "ConsulKvDelete", Right::KvWrite, key) {
            return r;
        }
        let command =
            match crate::api::kv_delete_command(namespace.to_string(), key, q.recurse, q.cas) {
                Ok(c) => c,
                Err(s) => return text(StatusCode::BAD_REQUEST, s.message().to_string()),
            };
        self.kv_write(command).await
    }

    async fn kv_write(&self, command: crate::catalog::Command) -> HttpResponse {
        match self.proposer.propose(command).await {
            Ok(reply) => {
                let (applied, _) = crate::api::kv_outcome(reply);
                json(StatusCode::OK, &applied)
            }
            Err(e) => super::propose_refusal(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rolled_up;

    #[test]
    fn keys_roll_up_at_the_separator_after_the_prefix() {
        let keys = ["app/a", "app/b/x", "app/b/y", "app/c/"]
            .iter()
            .map(|s| s.to_string());
        assert_eq!(
            rolled_up(keys, "app/", "/"),
            vec!["app/a", "app/b/", "app/c/"]
        );
        let keys = ["a/b", "c"].iter().map(|s| s.to_string());
        assert_eq!(rolled_up(keys, "", "/"), vec!["a/", "c"]);
    }
}
