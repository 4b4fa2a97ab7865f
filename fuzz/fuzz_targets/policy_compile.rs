//! The routing policy compiler: a policy as the sidecar receives it (protobuf, through
//! `policy_from_proto` only, as the watch stream and the disk cache hand it over, so not
//! necessarily one the registry would have accepted) compiled into a service view
//! (`ServiceView::new`: core's `Selection`, the sidecar's `CompiledPolicy`, pools,
//! resilience), then a few routing decisions and picks for request headers taken from
//! the input.
//!
//! Input: a 2-byte big-endian length, that many bytes of `switchyard.v1.Policy`, then
//! request headers as `name: value` lines.
//!
//! Never a panic (libFuzzer's -timeout bounds the time); a decision's subset is one of the
//! policy's and a picked endpoint belongs to it; the request path's deadlines (now plus
//! the timeout, plus the per-try timeout) can be represented; a policy that also passes
//! the registry's `validate_policy` routes every request without a "no weight" refusal.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_core::convert::policy_from_proto;
use switchyard_core::model::policy::validate_policy;
use switchyard_core::model::{Instance, State};
use switchyard_proto::v1 as pb;
use switchyard_sidecar::balance::{pick_from, LbConfig};
use switchyard_sidecar::outlier::OutlierConfig;
use switchyard_sidecar::resilience::Resolved;
use switchyard_sidecar::route::{decide, explain, NoRoute};
use switchyard_sidecar::table::ServiceView;

fn instance(
    id: &str,
    address: &str,
    version: &str,
    state: State,
    labels: &[(&str, &str)],
) -> Arc<Instance> {
    Arc::new(Instance {
        namespace: "default".into(),
        service: "web".into(),
        id: id.into(),
        address: address.into(),
        port: 8080,
        version: version.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        weight: 50 + 25 * (id.len() as u32 % 4),
        zone: "eu-1".into(),
        state,
        mesh_port: if id.ends_with('m') { 15006 } else { 0 },
    })
}

/// `web`'s instances: stable versions, a canary, a failing and a draining one, labels.
fn instances() -> &'static BTreeMap<String, Arc<Instance>> {
    static I: OnceLock<BTreeMap<String, Arc<Instance>>> = OnceLock::new();
    I.get_or_init(|| {
        [
            instance(
                "s1",
                "10.0.0.1",
                "1.4.2",
                State::Serving,
                &[("track", "stable")],
            ),
            instance(
                "s2",
                "10.0.0.2",
                "1.4.3",
                State::Serving,
                &[("track", "stable")],
            ),
            instance(
                "s3m",
                "fd00::3",
                "1.4.3",
                State::Failing,
                &[("track", "stable")],
            ),
            instance(
                "c1",
                "10.0.0.4",
                "2.0.0",
                State::Serving,
                &[("track", "canary")],
            ),
            instance("c2", "10.0.0.5", "2.0.0-rc.1", State::Draining, &[]),
            instance(
                "x1",
                "x-1.example",
                "canary",
                State::Serving,
                &[("team", "a/b")],
            ),
        ]
        .into_iter()
        .map(|i| (i.id.clone(), i))
        .collect()
    })
}

fn defaults() -> &'static Arc<Resolved> {
    static D: OnceLock<Arc<Resolved>> = OnceLock::new();
    D.get_or_init(Arc::default)
}

/// `name: value` lines; what `http` refuses is left out, as hyper would refuse it.
fn headers(text: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in text.split(|&b| b == b'\n').take(64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
    let (policy, rest) = data[2..].split_at(len);
    let Ok(wire) = pb::Policy::decode(policy) else {
        return;
    };
    let Ok(policy) = policy_from_proto(wire) else {
        return;
    };
    let versions: BTreeSet<String> = instances().values().map(|i| i.version.clone()).collect();
    let valid = validate_policy(&policy, &versions).is_ok();
    let policy = Arc::new(policy);
    let view = ServiceView::new(
        "web".into(),
        1,
        instances(),
        Some(&policy),
        None,
        None,
        defaults(),
        &OutlierConfig::default(),
    );
    let compiled = view.policy.as_ref().expect("a policy compiles to one");
    assert_eq!(
        compiled.subsets.len(),
        view.dns.selection.as_ref().map_or(0, |s| s.subsets.len()),
        "the proxy's subsets are the selection's"
    );

    // What `forward` computes from the resolved settings before it sends anything.
    let settings = &view.resilience.settings;
    let now = Instant::now();
    assert!(
        now.checked_add(settings.timeout).is_some(),
        "the request deadline overflows: timeout {:?}",
        settings.timeout
    );
    if let Some(per_try) = settings.per_try_timeout {
        assert!(
            now.checked_add(per_try).is_some(),
            "the per-try deadline overflows: {per_try:?}"
        );
    }

    let headers = headers(rest);
    let lb = LbConfig::default();
    for seed in 0..4u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let decision = match decide("web", view.policy.as_ref(), &headers, &mut rng) {
            Ok(d) => d,
            Err(NoRoute(reason)) => {
                assert!(
                    !(valid && reason.contains("no weight")),
                    "a valid policy refused a request: {reason}"
                );
                continue;
            }
        };
        if let Some(s) = decision.subset {
            assert!(
                compiled.subsets.iter().any(|c| std::ptr::eq(c, s)),
                "the decision's subset is the policy's"
            );
        }
        let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
        let picked = pick_from(&view.endpoints, pool, &lb, &mut rng);
        if let (Some(e), Some(s)) = (picked, decision.subset) {
            assert!(
                s.members.iter().any(|&i| view.endpoints[i].id == e.id),
                "{} is not in subset {}",
                e.id,
                s.name
            );
        }
        let line = explain(&decision, &view.endpoints, pool, picked);
        assert!(line.starts_with("route="));
    }
});
