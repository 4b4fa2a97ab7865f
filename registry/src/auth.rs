//! Who is calling, and may they: the bearer token of a request checked against this
//! node's applied ACL state (no round trip), and the rule that decides.
//!
//! Until `acl bootstrap` every request is allowed (a quick start needs no token); after
//! it, a request without a token is anonymous and gets the node's anonymous rules
//! (`--anonymous-rule`, none by default; read rights at most), a token that is
//! unknown, deleted or expired is refused as UNAUTHENTICATED, and a right the token's
//! rules lack is PERMISSION_DENIED naming it. Secrets never appear in an error, a log
//! line or a metric.

use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::model::acl::{allows, missing, Right, Rule, Token};
use crate::rollout::now_ms;
use crate::shared::Shared;

/// The caller of one request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// ACLs are off (not bootstrapped): everything is allowed.
    Open,
    /// No token, after bootstrap: the anonymous rules (`--anonymous-rule`).
    Anonymous(Arc<[Rule]>),
    /// Shared with the catalog: no copy of the rules per request.
    Token(Arc<Token>),
}

impl Caller {
    pub fn rules(&self) -> &[Rule] {
        match self {
            Caller::Token(t) => &t.rules,
            Caller::Anonymous(rules) => rules,
            Caller::Open => &[],
        }
    }

    /// Whether the caller has `right` on `resource` (a service name or kv key).
    pub fn may(&self, right: Right, resource: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Anonymous(rules) => allows(rules, right, resource),
            Caller::Token(t) => allows(&t.rules, right, resource),
        }
    }
}

/// The secret of `authorization: Bearer <secret>`, if the request carries one.
fn bearer(metadata: &MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        Status::unauthenticated(
            "the authorization header is not ASCII: send `authorization: Bearer <secret>`",
        )
    })?;
    match text.strip_prefix("Bearer ").or_else(|| text.strip_prefix("bearer ")) {
        Some(secret) if !secret.trim().is_empty() && secret.len() <= 256 => {
            Ok(Some(secret.trim().to_string()))
        }
        _ => Err(Status::unauthenticated(
            "the authorization header is not `Bearer <secret>`: pass the token's secret with --token or SWITCHYARD_TOKEN",
        )),
    }
}

/// The caller of a request, from its metadata and this node's ACL state.
pub fn caller(shared: &Shared, metadata: &MetadataMap) -> Result<Caller, Status> {
    let catalog = shared.catalog.read();
    if !catalog.acl_enabled() {
        return Ok(Caller::Open);
    }
    let Some(secret) = bearer(metadata)? else {
        return Ok(Caller::Anonymous(shared.config.acl.anonymous.clone()));
    };
    let Some(token) = catalog.token_by_secret(&secret) else {
        shared.metrics.acl_denied("unknown_token");
        return Err(Status::unauthenticated(
            "the token is not known to the registry (deleted, or never created): ask an operator for a token",
        ));
    };
    if token.is_expired(now_ms()) {
        shared.metrics.acl_denied("expired_token");
        return Err(Status::unauthenticated(format!(
            "token {} has expired: ask an operator for a new one",
            token.accessor_id
        )));
    }
    Ok(Caller::Token(token.clone()))
}

/// The service of instance `id` in `namespace` (empty: the default), or "" when it is
/// not registered: what a token needs `register` on to deregister the instance or
/// change its state ("" is matched only by `*`).
pub fn service_of_instance(shared: &Shared, namespace: &str, id: &str) -> String {
    let ns = if namespace.is_empty() {
        crate::model::DEFAULT_NAMESPACE
    } else {
        namespace
    };
    shared
        .catalog
        .read()
        .service_of(ns, id)
        .map(str::to_string)
        .unwrap_or_default()
}

/// Refuses unless the caller of `metadata` has `right` on `resource`.
pub fn check(
    shared: &Shared,
    metadata: &MetadataMap,
    method: &'static str,
    right: Right,
    resource: &str,
) -> Result<Caller, Status> {
    let c = caller(shared, metadata)?;
    if c.may(right, resource) {
        return Ok(c);
    }
    Err(denied(shared, &c, method, right, resource))
}

/// PERMISSION_DENIED naming the missing right, counted by method.
pub fn denied(
    shared: &Shared,
    c: &Caller,
    method: &'static str,
    right: Right,
    resource: &str,
) -> Status {
    shared.metrics.acl_denied(method);
    let who = match c {
        Caller::Token(t) => format!("token {}", t.accessor_id),
        _ => "a request without a token".to_string(),
    };
    Status::permission_denied(format!(
        "{who} may not do this: it lacks {}",
        missing(right, resource)
    ))
}
