//! Switchyard's own JSON API, documented in the README and kept stable (the web console
//! will read it): `GET /api/v1/services`, `/api/v1/services/:name` (instances, versions,
//! policy, rollout), `/api/v1/status` (leader, term, members, revision); `?namespace=`.
//! Reads need `read` on the service, as on gRPC; errors are `{"error": "..."}`.

use http::{Method, Request, StatusCode};
use serde::Serialize;

use super::HttpApi;
use crate::consul::{caller, json, token, HttpResponse};
use crate::model::acl::Right;
use crate::model::validate_namespace;

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(code: StatusCode, message: impl Into<String>) -> HttpResponse {
    json(
        code,
        &ErrorBody {
            error: message.into(),
        },
    )
}

#[derive(Serialize)]
struct ServiceSummary<'a> {
    name: &'a str,
    instance_count: u32,
    versions: &'a [String],
}

#[derive(Serialize)]
struct Services<'a> {
    namespace: &'a str,
    revision: u64,
    services: Vec<ServiceSummary<'a>>,
}

#[derive(Serialize)]
struct InstanceView<'a> {
    id: &'a str,
    address: &'a str,
    port: u16,
    mesh_port: u16,
    version: &'a str,
    zone: &'a str,
    weight: u32,
    state: &'static str,
    labels: &'a switchyard_core::model::Labels,
}

#[derive(Serialize)]
struct Service<'a> {
    namespace: &'a str,
    name: &'a str,
    revision: u64,
    instances: Vec<InstanceView<'a>>,
    versions: Vec<&'a str>,
    policy_revision: Option<u64>,
    policy: Option<&'a crate::model::Policy>,
    rollout: Option<&'a crate::model::rollout::Rollout>,
}

#[derive(Serialize)]
struct Member {
    id: u64,
    address: String,
    voter: bool,
}

#[derive(Serialize)]
struct Status {
    node_id: u64,
    role: &'static str,
    leader_id: Option<u64>,
    leader_address: Option<String>,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    revision: u64,
    members: Vec<Member>,
}

pub fn serve(api: &HttpApi, req: &Request<hyper::body::Incoming>) -> HttpResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let mut namespace = String::new();
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        if k == "namespace" {
            namespace = v.into_owned();
        }
    }
    let namespace = match validate_namespace("namespace", &namespace) {
        Ok(ns) => ns,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let who = match caller(&api.shared, token(req.headers(), None).as_ref()) {
        Ok(c) => c,
        Err(_) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "the token is not known to the registry (deleted, expired or never created): send `Authorization: Bearer <secret>` with a valid token",
            )
        }
    };
    let path = req.uri().path();
    match path.strip_prefix("/api/v1/") {
        Some("services") => {
            let catalog = api.shared.catalog.read();
            let list = catalog.list_services(&namespace);
            let body = Services {
                namespace: &namespace,
                revision: catalog.revision(),
                services: list
                    .iter()
                    .filter(|s| who.may(Right::Read, &s.name))
                    .map(|s| ServiceSummary {
                        name: &s.name,
                        instance_count: s.instance_count,
                        versions: &s.versions,
                    })
                    .collect(),
            };
            json(StatusCode::OK, &body)
        }
        Some("status") => json(StatusCode::OK, &status(api)),
        Some(rest) if rest.starts_with("services/") => {
            let name = &rest["services/".len()..];
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            if let Err(e) = crate::model::validate_name("name", &name) {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
            if !who.may(Right::Read, &name) {
                return error(
                    StatusCode::FORBIDDEN,
                    format!("the token lacks read on service {name:?}"),
                );
            }
            let catalog = api.shared.catalog.read();
            let instances = catalog.resolve(&namespace, &name, "");
            let record = catalog.policy(&namespace, &name);
            let rollout = catalog.rollout(&namespace, &name);
            if instances.is_empty() && record.and_then(|r| r.policy.as_ref()).is_none() && rollout.is_none() {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("service {name:?} has no instances, policy or rollout in namespace {namespace:?}"),
                );
            }
            let mut versions: Vec<&str> = instances.iter().map(|i| i.version.as_str()).collect();
            versions.sort();
            versions.dedup();
            let body = Service {
                namespace: &namespace,
                name: &name,
                revision: catalog.revision(),
                instances: instances
                    .iter()
                    .map(|i| InstanceView {
                        id: &i.id,
                        address: &i.address,
                        port: i.port,
                        mesh_port: i.mesh_port,
                        version: &i.version,
                        zone: &i.zone,
                        weight: i.weight,
                        state: i.state.as_str(),
                        labels: &i.labels,
                    })
                    .collect(),
                versions,
                policy_revision: record.filter(|r| r.policy.is_some()).map(|r| r.revision),
                policy: record.and_then(|r| r.policy.as_deref()),
                rollout,
            };
            json(StatusCode::OK, &body)
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not found: the JSON API has /api/v1/services, /api/v1/services/:name and /api/v1/status",
        ),
    }
}

fn status(api: &HttpApi) -> Status {
    let m = api.proposer.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    Status {
        node_id: m.id,
        role: crate::api::cluster::role(m.state),
        leader_id: m.current_leader,
        leader_address: api.proposer.leader().map(|(_, a)| a),
        term: m.current_term,
        commit_index: api
            .shared
            .committed
            .load(std::sync::atomic::Ordering::Acquire),
        applied_index: m.last_applied.map_or(0, |l| l.index),
        revision: api.shared.catalog.read().revision(),
        members: membership
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                address: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect(),
    }
}
