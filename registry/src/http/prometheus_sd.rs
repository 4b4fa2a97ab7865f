//! `GET /v1/prometheus/sd`: every instance as a Prometheus `http_sd_configs` target
//! group, so a Prometheus built without Consul discovery (Debian's) finds every app's
//! and sidecar's metrics port.
//!
//! Each instance gives a group `{"targets": ["addr:port"], "labels": {...}}` for the
//! app: its port, or the `metrics-port` label when the app serves metrics elsewhere;
//! and, when it carries `sidecar-admin-port` (the sidecar's admin listener, which serves
//! `/metrics`), a second group for the sidecar. Labels: `__meta_switchyard_service`,
//! `_version`, `_zone`, `_state`, `_namespace`, `_id`, `_role` (`app` or `sidecar`)
//! and each instance label as `__meta_switchyard_label_<key>` (key characters outside
//! `[A-Za-z0-9_]` become `_`). `?namespace=` and `?service=` narrow it down; only the
//! services the caller may read are listed.

use std::collections::BTreeMap;

use http::{Method, Request, StatusCode};
use serde::Serialize;

use super::HttpApi;
use crate::consul::{caller, json, text, token, HttpResponse};
use crate::model::acl::Right;
use crate::model::Instance;

/// Label naming the port an app serves `/metrics` on, when not its service port.
pub const METRICS_PORT_LABEL: &str = "metrics-port";
/// Label naming the sidecar admin port (its `/metrics`) beside the instance.
pub const SIDECAR_ADMIN_PORT_LABEL: &str = "sidecar-admin-port";

#[derive(Serialize)]
struct Group {
    targets: [String; 1],
    labels: BTreeMap<String, String>,
}

fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn target(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

fn groups(i: &Instance, out: &mut Vec<Group>) {
    let mut labels = BTreeMap::new();
    labels.insert("__meta_switchyard_service".into(), i.service.clone());
    labels.insert("__meta_switchyard_version".into(), i.version.clone());
    labels.insert("__meta_switchyard_zone".into(), i.zone.clone());
    labels.insert(
        "__meta_switchyard_state".into(),
        i.state.as_str().to_string(),
    );
    labels.insert("__meta_switchyard_namespace".into(), i.namespace.clone());
    labels.insert("__meta_switchyard_id".into(), i.id.clone());
    for (k, v) in &i.labels {
        labels.insert(
            format!("__meta_switchyard_label_{}", sanitize(k)),
            v.clone(),
        );
    }
    let port_of = |label: &str| {
        i.labels
            .get(label)
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p > 0)
    };
    if let Some(admin) = port_of(SIDECAR_ADMIN_PORT_LABEL) {
        let mut l = labels.clone();
        l.insert("__meta_switchyard_role".into(), "sidecar".into());
        out.push(Group {
            targets: [target(&i.address, admin)],
            labels: l,
        });
    }
    labels.insert("__meta_switchyard_role".into(), "app".into());
    out.push(Group {
        targets: [target(
            &i.address,
            port_of(METRICS_PORT_LABEL).unwrap_or(i.port),
        )],
        labels,
    });
}

pub fn serve(api: &HttpApi, req: &Request<hyper::body::Incoming>) -> HttpResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let (mut namespace, mut service) = (None, None);
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "namespace" => namespace = Some(v.into_owned()),
            "service" => service = Some(v.into_owned()),
            _ => {}
        }
    }
    let who = match caller(&api.shared, token(req.headers(), None).as_ref()) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let catalog = api.shared.catalog.read();
    let namespaces = match namespace {
        Some(ns) => vec![ns],
        None => catalog.namespace_names(),
    };
    let wanted: Vec<String> = service.into_iter().collect();
    let mut out = Vec::new();
    for ns in &namespaces {
        for s in catalog.snapshot(ns, &wanted) {
            if !who.may(Right::Read, &s.service) {
                continue;
            }
            for i in &s.instances {
                groups(i, &mut out);
            }
        }
    }
    json(StatusCode::OK, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_gives_an_app_group_and_a_sidecar_group_when_it_names_one() {
        let mut i = Instance {
            namespace: "default".into(),
            service: "web".into(),
            id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            version: "1.0.0".into(),
            labels: switchyard_core::model::Labels::from([
                ("team/owner".to_string(), "blue".to_string()),
                (METRICS_PORT_LABEL.to_string(), "9100".to_string()),
            ]),
            weight: 1,
            zone: "eu-1".into(),
            state: crate::model::State::Serving,
            mesh_port: 0,
        };
        let mut out = Vec::new();
        groups(&i, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].targets[0], "10.0.0.1:9100");
        assert_eq!(out[0].labels["__meta_switchyard_label_team_owner"], "blue");
        assert_eq!(out[0].labels["__meta_switchyard_state"], "SERVING");
        i.labels
            .insert(SIDECAR_ADMIN_PORT_LABEL.into(), "15000".into());
        i.address = "fd00::1".into();
        let mut out = Vec::new();
        groups(&i, &mut out);
        assert_eq!(out[0].targets[0], "[fd00::1]:15000");
        assert_eq!(out[0].labels["__meta_switchyard_role"], "sidecar");
        assert_eq!(out[1].labels["__meta_switchyard_role"], "app");
    }
}
