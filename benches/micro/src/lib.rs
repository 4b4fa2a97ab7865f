//! Fixtures shared by the micro-benchmarks in `benches/`: tables and catalogs shaped like
//! a real deployment, built through the same public constructors the servers use.
//!
//! Run with `cargo bench -p switchyard-benches`; results and their meaning are in
//! `benches/RESULTS.md`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchyard_core::model::{Instance, State};
use switchyard_proto::v1 as pb;
use switchyard_sidecar::table::ServiceView;

/// How instance weights are spread in a fixture.
#[derive(Clone, Copy, Debug)]
pub enum Weights {
    /// Every instance at the default 100: the power-of-two-choices path.
    Equal,
    /// Weights from 50 to 149: the weighted (alias table) path.
    Unequal,
}

/// A sidecar view of `n` endpoints of service `web`: 90% on version 1.4.2, 10% on 2.0.0,
/// each with 0-3 requests in flight (a busy sidecar), optionally with a canary policy.
pub fn sidecar_view(n: usize, weights: Weights, with_policy: bool) -> ServiceView {
    let records: BTreeMap<String, Arc<Instance>> = (0..n)
        .map(|i| {
            let id = format!("web-{i:05}");
            let record = Instance {
                namespace: "default".into(),
                service: "web".into(),
                id: id.clone(),
                address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                port: 8080,
                version: if i % 10 == 0 { "2.0.0" } else { "1.4.2" }.to_string(),
                labels: Default::default(),
                weight: match weights {
                    Weights::Equal => 100,
                    Weights::Unequal => 50 + (i % 100) as u32,
                },
                zone: String::new(),
                state: State::Serving,
                mesh_port: 0,
            };
            (id, Arc::new(record))
        })
        .collect();
    let policy = with_policy.then(|| {
        Arc::new(
            switchyard_core::convert::policy_from_proto(canary_policy())
                .expect("the canary policy is valid"),
        )
    });
    let view = ServiceView::new(
        "web".into(),
        1,
        &records,
        policy.as_ref(),
        None,
        None,
        &Default::default(),
        &Default::default(),
    );
    let mut rng = fastrand::Rng::with_seed(1);
    for e in &view.endpoints {
        e.live.active.store(rng.u32(0..4), Ordering::Relaxed);
    }
    view
}

/// A canary policy: `x-canary: true` goes to 2.0.0, everyone else splits 90/10.
pub fn canary_policy() -> pb::Policy {
    let share = |subset: &str, weight: u32| pb::WeightedSubset {
        subset: subset.into(),
        weight,
    };
    pb::Policy {
        subsets: vec![],
        routes: vec![pb::Route {
            name: "testers".into(),
            headers: vec![pb::HeaderMatch {
                name: "x-canary".into(),
                r#match: Some(pb::header_match::Match::Exact("true".into())),
            }],
            split: vec![share("2.0.0", 100)],
            sticky_header: String::new(),
            retryable: false,
        }],
        default_split: vec![share("1.4.2", 90), share("2.0.0", 10)],
        fallback: pb::Fallback::Default as i32,
        sticky_header: String::new(),
        resilience: None,
    }
}

/// Request headers as a browser-ish client sends them, with or without the canary header.
pub fn request_headers(canary: bool) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(http::header::HOST, http::HeaderValue::from_static("web"));
    h.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("bench/1.0"),
    );
    h.insert(http::header::ACCEPT, http::HeaderValue::from_static("*/*"));
    if canary {
        h.insert("x-canary", http::HeaderValue::from_static("true"));
    }
    h
}

/// Instance `i` of service `svc-<i / per_service>` as the registry stores it.
pub fn instance(i: usize, per_service: usize) -> Instance {
    Instance {
        namespace: "default".into(),
        service: format!("svc-{:04}", i / per_service),
        id: format!("inst-{i:07}"),
        address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        port: 8080,
        version: "1.4.2".into(),
        labels: [("zone".to_string(), "a".to_string())].into(),
        weight: 100,
        zone: "a".into(),
        state: State::Serving,
        mesh_port: 0,
    }
}
