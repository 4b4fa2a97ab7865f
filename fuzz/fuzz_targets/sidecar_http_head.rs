//! The sidecar proxy's handling of a request head, in the order `proxy::http::forward`
//! takes it: two Hosts refused, the service from `:authority` or `Host`, the service's
//! view, the routing decision on the headers (pinning, header routes, sticky splits),
//! the pick, the explanation header, the subset header, hop-by-hop headers stripped,
//! `X-Forwarded-For` appended, idempotency, and the upstream URI.
//!
//! Input: a raw HTTP/1 request head, parsed with httparse (what hyper parses with), then
//! made an `http::Request` leaving out what `http` refuses; a `2` after the head makes it
//! an HTTP/2 request.
//!
//! Never a panic; a named service is a valid name; a refusal is a 400; after stripping,
//! no hop-by-hop header is left, the protected ones (Host, X-Forwarded-For, the subset
//! header) are untouched and `TE` survives only as `trailers` on HTTP/2 gRPC; the
//! caller's address ends `X-Forwarded-For`; the upstream URI builds.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use switchyard_core::model::policy::{
    Fallback, HeaderMatch, MatchKind, Policy, Route, Split, Subset,
};
use switchyard_core::model::{Instance, State};
use switchyard_sidecar::balance::{pick_from, LbConfig};
use switchyard_sidecar::outlier::OutlierConfig;
use switchyard_sidecar::proxy::http::{
    add_forwarded_for, is_grpc, service_of_head, strip_hop_by_hop,
};
use switchyard_sidecar::resilience::is_idempotent;
use switchyard_sidecar::route::{decide, explain, EXPLAIN_HEADER, SUBSET_HEADER};
use switchyard_sidecar::table::ServiceView;

/// `ProxyCtx::host_suffix` for the default domain.
const SUFFIX: &str = ".service.switchyard";

fn instance(service: &str, id: &str, address: &str, version: &str) -> Arc<Instance> {
    Arc::new(Instance {
        namespace: "default".into(),
        service: service.into(),
        id: id.into(),
        address: address.into(),
        port: 8080,
        version: version.into(),
        labels: Default::default(),
        weight: 100,
        zone: String::new(),
        state: State::Serving,
        mesh_port: 0,
    })
}

fn subset(name: &str, version: &str) -> Subset {
    Subset {
        name: name.into(),
        version: version.into(),
        version_range: String::new(),
        labels: Default::default(),
    }
}

/// `web` with a canary policy (a header route, a regex route, a sticky 90/10 split) and
/// `db` with none.
fn views() -> &'static BTreeMap<&'static str, ServiceView> {
    static V: OnceLock<BTreeMap<&'static str, ServiceView>> = OnceLock::new();
    V.get_or_init(|| {
        let split = |s: &str, weight: u32| Split {
            subset: s.into(),
            weight,
        };
        let policy = Arc::new(Policy {
            subsets: vec![subset("stable", "1.0.0"), subset("canary", "2.0.0")],
            routes: vec![
                Route {
                    name: "testers".into(),
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        kind: MatchKind::Exact("true".into()),
                    }],
                    split: vec![split("canary", 1)],
                    sticky_header: String::new(),
                    retryable: true,
                },
                Route {
                    name: "beta".into(),
                    headers: vec![
                        HeaderMatch {
                            name: "user-agent".into(),
                            kind: MatchKind::Regex("^beta/[0-9]+".into()),
                        },
                        HeaderMatch {
                            name: "x-team".into(),
                            kind: MatchKind::Present,
                        },
                    ],
                    split: vec![split("canary", 50), split("stable", 50)],
                    sticky_header: "x-user".into(),
                    retryable: false,
                },
            ],
            default_split: vec![split("stable", 90), split("canary", 10)],
            fallback: Fallback::Default,
            sticky_header: "cookie".into(),
            resilience: Default::default(),
        });
        let records = |list: Vec<Arc<Instance>>| -> BTreeMap<String, Arc<Instance>> {
            list.into_iter().map(|i| (i.id.clone(), i)).collect()
        };
        let view = |name: &str, list, policy: Option<&Arc<Policy>>| {
            ServiceView::new(
                name.into(),
                1,
                &records(list),
                policy,
                None,
                None,
                &Default::default(),
                &OutlierConfig::default(),
            )
        };
        BTreeMap::from([
            (
                "web",
                view(
                    "web",
                    vec![
                        instance("web", "w1", "10.0.0.1", "1.0.0"),
                        instance("web", "w2", "fd00::2", "2.0.0"),
                        instance("web", "w3", "web-3.example", "1.0.0"),
                    ],
                    Some(&policy),
                ),
            ),
            (
                "db",
                view("db", vec![instance("db", "d1", "10.0.1.1", "5")], None),
            ),
        ])
    })
}

/// The request hyper would hand the service, and where the head ends: `None` when the
/// bytes are no HTTP/1 request head.
fn request(data: &[u8]) -> Option<(Request<()>, usize)> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(end) = head.parse(data).ok()? else {
        return None;
    };
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(head.method?.as_bytes()).ok()?;
    *req.uri_mut() = head.path?.parse::<Uri>().ok()?;
    *req.version_mut() = match head.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    for h in head.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            req.headers_mut().append(name, value);
        }
    }
    Some((req, end))
}

/// Hop-by-hop headers the proxy always removes.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
];

fn values(req: &Request<()>, name: &str) -> Vec<HeaderValue> {
    req.headers().get_all(name).iter().cloned().collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((mut req, end)) = request(data) else {
        return;
    };
    // A body starting with `2`: the same head came over HTTP/2 (where gRPC keeps
    // `TE: trailers`).
    if data.get(end) == Some(&b'2') {
        *req.version_mut() = Version::HTTP_2;
    }
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return; // 400, DuplicateHost.
    }
    let name = match service_of_head(req.uri(), req.headers(), SUFFIX) {
        Ok(name) => name.into_owned(),
        Err(e) => {
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{e}");
            return;
        }
    };
    let b = name.as_bytes();
    assert!(
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-',
        "{name:?} is no service name"
    );
    let Some(view) = views().get(name.as_str()) else {
        return; // 503, UnknownService.
    };
    let explain_wanted = req
        .headers()
        .get(EXPLAIN_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    let mut rng = fastrand::Rng::with_seed(7);
    let Ok(decision) = decide(&view.name, view.policy.as_ref(), req.headers(), &mut rng) else {
        return; // 503, NoRoute.
    };
    let pool = decision.subset.map_or(&view.pool, |s| &s.pool);
    let Some(endpoint) = pick_from(&view.endpoints, pool, &LbConfig::default(), &mut rng) else {
        return; // 503, NoEndpoint.
    };
    if explain_wanted {
        let text = explain(&decision, &view.endpoints, pool, Some(endpoint));
        let _ = HeaderValue::from_str(&text);
    }
    if let Some(s) = decision.subset {
        if let Ok(v) = HeaderValue::from_str(&s.name) {
            req.headers_mut()
                .insert(HeaderName::from_static(SUBSET_HEADER), v);
        }
    }
    let grpc = is_grpc(req.headers());
    let h2 = req.version() == Version::HTTP_2 && grpc;
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    let host = values(&req, "host");
    let forwarded = values(&req, "x-forwarded-for");
    let subset = values(&req, SUBSET_HEADER);
    strip_hop_by_hop(req.headers_mut(), h2);
    for hop in HOP_BY_HOP {
        assert!(!req.headers().contains_key(hop), "{hop} is left");
    }
    assert_eq!(values(&req, "host"), host, "Host is protected");
    assert_eq!(values(&req, "x-forwarded-for"), forwarded);
    assert_eq!(values(&req, SUBSET_HEADER), subset);
    if let Some(te) = req.headers().get(header::TE) {
        assert!(h2 && te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    }

    let caller = HeaderValue::from_static("192.0.2.1");
    add_forwarded_for(req.headers_mut(), Some(caller));
    let chain = req
        .headers()
        .get("x-forwarded-for")
        .expect("X-Forwarded-For is set");
    assert!(chain.as_bytes().ends_with(b"192.0.2.1"), "{chain:?}");

    let _ = decision.retryable || is_idempotent(req.method(), req.headers());

    let authority = endpoint.uri_authority.clone().expect("an authority");
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    let uri = Uri::from_parts(parts);
    assert!(uri.is_ok(), "the upstream URI does not build: {uri:?}");
});
