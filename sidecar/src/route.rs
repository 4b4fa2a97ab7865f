//! Version-aware routing: route match → subset (weighted split, sticky hash, pinning
//! from the previous hop) → least request inside the subset.
//!
//! Which instances a subset selects, how a split draws and the sticky hash are
//! `switchyard_core::select`'s (the code DNS answers use too). This module adds what only
//! the proxy needs: header matchers, each subset's usable endpoints ready for the
//! balancer, and per-version metric handles. A policy is compiled once per view update,
//! so a request only evaluates header matches and draws one number. Weighted splits sit
//! above the per-subset balancer, as in linkerd2-proxy.

use std::fmt::Write as _;

use http::header::{HeaderMap, HeaderName};
use switchyard_core::model::policy::MatchKind;
use switchyard_core::select::{self, compile_regex, same_name, NoChoice, Selection, SplitRule};

use crate::balance::{Pool, PoolSettings};
use crate::endpoint::Endpoint;
use crate::metrics::{Metrics, SubsetMetrics};

/// Header a sidecar stamps on each proxied request with the subset it chose. An app
/// that passes it on to its own calls pins the next hop to the same-named subset.
pub const SUBSET_HEADER: &str = "x-switchyard-subset";
/// Request header that asks for the routing decision in the response.
pub const EXPLAIN_HEADER: &str = "x-switchyard-explain";

/// A named set of endpoints of one service.
#[derive(Debug)]
pub struct CompiledSubset {
    pub name: String,
    /// Indices into the view's endpoints.
    pub members: Vec<usize>,
    /// The usable members, ready for the balancer.
    pub pool: Pool,
    /// Per-version metric handles for requests sent through this subset.
    pub metrics: Vec<(String, SubsetMetrics)>,
}

impl CompiledSubset {
    pub fn metrics_for(&self, version: &str) -> Option<&SubsetMetrics> {
        self.metrics
            .iter()
            .find(|(v, _)| v == version)
            .map(|(_, m)| m)
    }
}

#[derive(Debug)]
enum Matcher {
    Exact(HeaderName, String),
    Prefix(HeaderName, String),
    Regex(HeaderName, regex::Regex),
    Present(HeaderName),
}

impl Matcher {
    fn matches(&self, headers: &HeaderMap) -> bool {
        let value = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        match self {
            Matcher::Exact(n, want) => value(n) == Some(want.as_str()),
            Matcher::Prefix(n, want) => value(n).is_some_and(|v| v.starts_with(want.as_str())),
            Matcher::Regex(n, re) => value(n).is_some_and(|v| re.is_match(v)),
            Matcher::Present(n) => headers.contains_key(n),
        }
    }
}

/// A split with its sticky header parsed for the request path.
#[derive(Debug, Default)]
pub struct CompiledSplit {
    pub rule: SplitRule,
    pub sticky: Option<HeaderName>,
}

impl CompiledSplit {
    fn new(rule: &SplitRule) -> Self {
        Self {
            sticky: rule.sticky.as_deref().and_then(header),
            rule: rule.clone(),
        }
    }
}

#[derive(Debug)]
pub struct CompiledRoute {
    pub name: String,
    matchers: Vec<Matcher>,
    pub split: CompiledSplit,
    /// Marked safe to repeat whatever the method (see `Route::retryable`).
    pub retryable: bool,
}

/// A service's policy, ready for the request path. `subsets` are parallel to the
/// selection's subsets (declared, then the versions splits name), so split entries index
/// both.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub subsets: Vec<CompiledSubset>,
    pub routes: Vec<CompiledRoute>,
    pub default: CompiledSplit,
    pub fail_closed: bool,
}

fn header(name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes()).ok()
}

impl CompiledPolicy {
    /// Compiles a selection against a view's endpoints. The registry validated the
    /// policy; anything that still fails to compile here (a regex this build rejects)
    /// is skipped with a warning rather than taking the service down.
    pub fn compile(
        service: &str,
        selection: &Selection,
        endpoints: &[Endpoint],
        metrics: Option<&Metrics>,
        pool_settings: impl Fn(&str) -> PoolSettings,
    ) -> Self {
        let subsets: Vec<CompiledSubset> = selection
            .subsets
            .iter()
            .map(|s| {
                let members: Vec<usize> = endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| s.selector.selects_instance(e))
                    .map(|(i, _)| i)
                    .collect();
                let mut versions: Vec<&str> = members
                    .iter()
                    .map(|&i| endpoints[i].version.as_str())
                    .collect();
                versions.sort_unstable();
                versions.dedup();
                let metrics = metrics
                    .map(|m| {
                        versions
                            .iter()
                            .map(|v| (v.to_string(), m.subset(service, &s.name, v)))
                            .collect()
                    })
                    .unwrap_or_default();
                CompiledSubset {
                    name: s.name.clone(),
                    pool: Pool::of(endpoints, &members, pool_settings(&s.name)),
                    members,
                    metrics,
                }
            })
            .collect();
        let mut routes = Vec::new();
        'routes: for r in &selection.routes {
            let mut matchers = Vec::new();
            for h in &r.headers {
                let Some(name) = header(&h.name) else {
                    tracing::warn!(service, route = %r.name, header = %h.name, "bad header name; route skipped");
                    continue 'routes;
                };
                matchers.push(match &h.kind {
                    MatchKind::Exact(v) => Matcher::Exact(name, v.clone()),
                    MatchKind::Prefix(v) => Matcher::Prefix(name, v.clone()),
                    MatchKind::Regex(v) => match compile_regex(v) {
                        Ok(re) => Matcher::Regex(name, re),
                        Err(e) => {
                            tracing::warn!(service, route = %r.name, error = %e, "bad regex; route skipped");
                            continue 'routes;
                        }
                    },
                    MatchKind::Present => Matcher::Present(name),
                });
            }
            routes.push(CompiledRoute {
                name: r.name.clone(),
                matchers,
                split: CompiledSplit::new(&r.split),
                retryable: r.retryable,
            });
        }
        let compiled = Self {
            subsets,
            routes,
            default: CompiledSplit::new(&selection.default),
            fail_closed: selection.fail_closed,
        };
        for (i, s) in compiled.subsets.iter().enumerate() {
            if s.pool.is_empty() && selection.in_a_split(i) {
                if compiled.fail_closed {
                    tracing::warn!(service, subset = %s.name, "subset has no healthy endpoint; its requests fail with 503 (fallback = fail)");
                } else {
                    tracing::warn!(service, subset = %s.name, "subset has no healthy endpoint; its share goes to the subsets that have some");
                }
            }
        }
        compiled
    }
}

/// Why a subset was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// The service has no policy: every usable endpoint.
    NoPolicy,
    /// The previous hop's `x-switchyard-subset` named a subset this service has.
    Pinned,
    /// The weighted split (of a route or the default) drew it.
    Split,
    /// The sticky header's hash chose it.
    Sticky,
    /// The drawn subset had no healthy endpoint; this one took its share.
    Fallback { wanted: String },
}

/// The routing decision for one request.
#[derive(Debug)]
pub struct Decision<'a> {
    /// The matched route's name; `None` for the default split.
    pub route: Option<&'a str>,
    /// The matched route is marked retryable: its requests retry like idempotent ones.
    pub retryable: bool,
    pub subset: Option<&'a CompiledSubset>,
    pub why: Why,
}

/// The request cannot be routed: answered with 503 and this text.
#[derive(Debug)]
pub struct NoRoute(pub String);

/// Chooses the subset for a request.
pub fn decide<'a>(
    service: &str,
    policy: Option<&'a CompiledPolicy>,
    headers: &HeaderMap,
    rng: &mut fastrand::Rng,
) -> Result<Decision<'a>, NoRoute> {
    let Some(policy) = policy else {
        return Ok(Decision {
            route: None,
            retryable: false,
            subset: None,
            why: Why::NoPolicy,
        });
    };
    // Pinning across hops: the caller's subset, when this service has one of that name
    // with healthy endpoints; otherwise this service's own policy decides.
    if let Some(pinned) = headers.get(SUBSET_HEADER).and_then(|v| v.to_str().ok()) {
        if let Some(s) = policy
            .subsets
            .iter()
            .find(|s| same_name(&s.name, pinned) && !s.pool.is_empty())
        {
            return Ok(Decision {
                route: None,
                retryable: false,
                subset: Some(s),
                why: Why::Pinned,
            });
        }
    }
    let (route, split, retryable) = match policy
        .routes
        .iter()
        .find(|r| r.matchers.iter().all(|m| m.matches(headers)))
    {
        Some(r) => (Some(r.name.as_str()), &r.split, r.retryable),
        None => (None, &policy.default, false),
    };
    if split.rule.entries.is_empty() {
        return Ok(Decision {
            route,
            retryable,
            subset: None,
            why: Why::NoPolicy,
        });
    }
    let key = split
        .sticky
        .as_ref()
        .and_then(|h| headers.get(h))
        .map(|v| v.as_bytes());
    let healthy = |i: usize| policy.subsets.get(i).is_some_and(|s| !s.pool.is_empty());
    let name = |i: usize| policy.subsets.get(i).map_or("?", |s| s.name.as_str());
    match select::choose(&split.rule, key, rng, policy.fail_closed, healthy) {
        Ok(chosen) => Ok(Decision {
            route,
            retryable,
            subset: policy.subsets.get(chosen.subset),
            why: match chosen.instead_of {
                Some(wanted) => Why::Fallback {
                    wanted: name(wanted).to_string(),
                },
                None if key.is_some() => Why::Sticky,
                None => Why::Split,
            },
        }),
        Err(NoChoice::NoWeight) => Err(NoRoute(format!(
            "service {service:?}: the split has no weight"
        ))),
        Err(NoChoice::Empty { subset }) => Err(NoRoute(format!(
            "subset {:?} of service {service:?} has no healthy endpoint (fallback = fail)",
            name(subset)
        ))),
        Err(NoChoice::NoneHealthy) => Err(NoRoute(format!(
            "no subset of service {service:?} in this split has a healthy endpoint"
        ))),
    }
}

/// The decision in one line, for `x-switchyard-explain` and `/explain`. Made after the
/// pick, so it says when panic mode decided it (the candidates are then every SERVING
/// and FAILING endpoint), and marks ejected candidates.
pub fn explain(
    decision: &Decision<'_>,
    endpoints: &[Endpoint],
    pool: &Pool,
    picked: Option<&Endpoint>,
) -> String {
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        "route={}; subset={}; why=",
        decision.route.unwrap_or("default"),
        decision.subset.map_or("all", |s| s.name.as_str())
    );
    let _ = match &decision.why {
        Why::NoPolicy => write!(out, "no split, least request over every endpoint"),
        Why::Pinned => write!(out, "pinned by {SUBSET_HEADER}"),
        Why::Split => write!(out, "weighted split"),
        Why::Sticky => write!(out, "sticky hash"),
        Why::Fallback { wanted } => write!(out, "fallback: {wanted} has no healthy endpoint"),
    };
    let panic = pool.in_panic();
    if panic {
        let _ = write!(
            out,
            "; panic: {} of {} endpoints usable, balanced over all",
            pool.usable_now(),
            pool.all.len()
        );
    }
    let candidates = if panic { &pool.all } else { &pool.usable };
    out.push_str("; candidates=");
    for (n, &i) in candidates.iter().take(16).enumerate() {
        if let Some(e) = endpoints.get(i) {
            if n > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{}", e.id, e.live.active());
            if e.live.is_ejected() {
                out.push_str("(ejected)");
            }
        }
    }
    if candidates.len() > 16 {
        let _ = write!(out, ",+{}", candidates.len() - 16);
    }
    if let Some(p) = picked {
        let _ = write!(out, "; picked={}", p.id);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::HeaderValue;

    use std::sync::Arc;

    use switchyard_core::model::{Instance, State};
    use switchyard_proto::v1 as pb;

    use super::*;
    use switchyard_testkit::proto::{canary_policy, split};

    use crate::endpoint::test_instance;
    use crate::table::ServiceView;

    fn record(id: &str, version: &str, state: State) -> (String, Arc<Instance>) {
        (id.to_string(), test_instance(id, version, 100, state))
    }

    /// The shared canary policy, with `stable` as a semver range (`^1.4`) instead of one
    /// version, so both kinds of subset are exercised.
    fn policy(default: &[(&str, u32)]) -> pb::Policy {
        let mut p = canary_policy(default);
        p.subsets[0] = pb::Subset {
            name: "stable".into(),
            version_range: "^1.4".into(),
            ..Default::default()
        };
        p
    }

    fn view(p: &pb::Policy, canary_state: State) -> ServiceView {
        let records: BTreeMap<String, Arc<Instance>> = [
            record("s1", "1.4.2", State::Serving),
            record("s2", "1.4.3", State::Serving),
            record("c1", "2.0.0", canary_state),
        ]
        .into_iter()
        .collect();
        let policy = Arc::new(
            switchyard_core::convert::policy_from_proto(p.clone()).expect("a valid policy"),
        );
        ServiceView::new(
            "web".into(),
            1,
            &records,
            Some(&policy),
            None,
            None,
            &Default::default(),
            &Default::default(),
        )
    }

    fn subset_of(v: &ServiceView, headers: &HeaderMap, rng: &mut fastrand::Rng) -> String {
        decide("web", v.policy.as_ref(), headers, rng)
            .expect("routed")
            .subset
            .map_or("all".into(), |s| s.name.clone())
    }

    #[test]
    fn subsets_select_by_exact_version_and_semver_range() {
        let v = view(&policy(&[("stable", 1)]), State::Serving);
        let p = v.policy.as_ref().expect("policy");
        let ids = |name: &str| -> Vec<&str> {
            let s = p.subsets.iter().find(|s| s.name == name).expect("subset");
            s.members
                .iter()
                .map(|&i| v.endpoints[i].id.as_str())
                .collect()
        };
        assert_eq!(ids("stable"), vec!["s1", "s2"]);
        assert_eq!(ids("canary"), vec!["c1"]);
    }

    #[test]
    fn a_90_10_split_over_10000_requests_lands_within_two_points() {
        let v = view(&policy(&[("stable", 90), ("canary", 10)]), State::Serving);
        let mut rng = fastrand::Rng::with_seed(2026);
        let canary = (0..10_000)
            .filter(|_| subset_of(&v, &HeaderMap::new(), &mut rng) == "canary")
            .count();
        // Binomial(10000, 0.1): the standard deviation is 30 requests; 2 points is 200.
        assert!(
            (800..=1_200).contains(&canary),
            "canary got {canary} of 10000"
        );
    }

    #[test]
    fn header_matched_requests_all_go_to_their_subset() {
        let v = view(&policy(&[("stable", 100)]), State::Serving);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("true"));
        for _ in 0..1_000 {
            assert_eq!(subset_of(&v, &h, &mut rng), "canary");
        }
        h.insert("x-canary", HeaderValue::from_static("false"));
        for _ in 0..1_000 {
            assert_eq!(subset_of(&v, &h, &mut rng), "stable");
        }
    }

    #[test]
    fn sticky_users_stay_put_and_few_move_when_weights_change() {
        let mut p = policy(&[("stable", 50), ("canary", 50)]);
        p.sticky_header = "x-user".into();
        let v = view(&p, State::Serving);
        let mut rng = fastrand::Rng::with_seed(9);
        let choose = |v: &ServiceView, user: u32, rng: &mut fastrand::Rng| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-user",
                HeaderValue::from_str(&format!("user-{user}")).expect("value"),
            );
            subset_of(v, &h, rng)
        };
        let first: Vec<String> = (0..1_000).map(|u| choose(&v, u, &mut rng)).collect();
        for _ in 0..3 {
            for u in 0..1_000 {
                assert_eq!(choose(&v, u, &mut rng), first[u as usize], "user {u} moved");
            }
        }
        let canary = first.iter().filter(|s| *s == "canary").count();
        assert!(
            (400..=600).contains(&canary),
            "{canary} of 1000 on canary at 50/50"
        );
        // 50/50 → 60/40: only users between the old and new boundary move (about 10%).
        let mut p2 = policy(&[("stable", 60), ("canary", 40)]);
        p2.sticky_header = "x-user".into();
        let v2 = view(&p2, State::Serving);
        let moved = (0..1_000)
            .filter(|&u| choose(&v2, u, &mut rng) != first[u as usize])
            .count();
        assert!(
            moved <= 150,
            "{moved} of 1000 users moved for a 10-point change"
        );
        assert!(moved > 0);
    }

    #[test]
    fn a_subset_with_no_healthy_endpoint_gets_nothing_and_it_is_said() {
        let v = view(&policy(&[("stable", 90), ("canary", 10)]), State::Failing);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut fallbacks = 0;
        for _ in 0..2_000 {
            let d = decide("web", v.policy.as_ref(), &HeaderMap::new(), &mut rng).expect("routed");
            assert_eq!(d.subset.map(|s| s.name.as_str()), Some("stable"));
            if matches!(d.why, Why::Fallback { ref wanted } if wanted == "canary") {
                fallbacks += 1;
            }
        }
        assert!(
            fallbacks > 100,
            "the redirected share is visible: {fallbacks}"
        );
    }

    #[test]
    fn fallback_fail_answers_503_for_the_empty_subset() {
        let mut p = policy(&[("stable", 50), ("canary", 50)]);
        p.fallback = pb::Fallback::Fail as i32;
        let v = view(&p, State::Draining);
        let mut rng = fastrand::Rng::with_seed(5);
        let outcomes: Vec<bool> = (0..200)
            .map(|_| decide("web", v.policy.as_ref(), &HeaderMap::new(), &mut rng).is_ok())
            .collect();
        assert!(
            outcomes.iter().any(|ok| !ok),
            "some requests drew canary and failed"
        );
        assert!(outcomes.iter().any(|ok| *ok), "stable still served");
        let err = (0..200)
            .find_map(|_| decide("web", v.policy.as_ref(), &HeaderMap::new(), &mut rng).err())
            .expect("a failure");
        assert!(
            err.0.contains("canary") && err.0.contains("fallback = fail"),
            "{}",
            err.0
        );
    }

    #[test]
    fn the_subset_header_pins_the_next_hop_when_the_subset_exists() {
        let v = view(&policy(&[("stable", 100)]), State::Serving);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut h = HeaderMap::new();
        h.insert(SUBSET_HEADER, HeaderValue::from_static("canary"));
        for _ in 0..100 {
            let d = decide("web", v.policy.as_ref(), &h, &mut rng).expect("routed");
            assert_eq!(d.subset.map(|s| s.name.as_str()), Some("canary"));
            assert_eq!(d.why, Why::Pinned);
        }
        // A subset this service lacks: its own policy decides.
        h.insert(SUBSET_HEADER, HeaderValue::from_static("blue"));
        assert_eq!(subset_of(&v, &h, &mut rng), "stable");
    }

    #[test]
    fn versions_named_in_a_split_are_implicit_subsets() {
        let mut p = policy(&[]);
        p.subsets.clear();
        p.routes.clear();
        p.default_split = split(&[("1.4.3", 100)]);
        let v = view(&p, State::Serving);
        let mut rng = fastrand::Rng::with_seed(3);
        let d = decide("web", v.policy.as_ref(), &HeaderMap::new(), &mut rng).expect("routed");
        let s = d.subset.expect("a subset");
        assert_eq!(
            s.members
                .iter()
                .map(|&i| v.endpoints[i].id.as_str())
                .collect::<Vec<_>>(),
            vec!["s2"]
        );
        let line = explain(
            &d,
            &v.endpoints,
            &s.pool,
            Some(&v.endpoints[s.pool.usable[0]]),
        );
        assert_eq!(
            line,
            "route=default; subset=1.4.3; why=weighted split; candidates=s2:0; picked=s2"
        );
    }
}
