//! The Consul-compatible HTTP API on a real registry, over real HTTP: reads in Consul's
//! shapes, blocking queries, registration with TTL and HTTP checks, ACL tokens, limits,
//! and replays of the exact requests Ocelot, Steeltoe, Spring Cloud Consul and
//! Prometheus send (from their source; see each test). py-consul itself runs in
//! `.ci/run` (tests/consul/py_consul_check.py), and Debian's Prometheus too.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use switchyard_proto::v1 as pb;
use switchyard_testkit::*;

/// One HTTP/1.1 request: (status, headers, body).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, ::http::HeaderMap, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = ::http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let r = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("answered in time")
        .expect("http");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, ::http::HeaderMap, Value) {
    let (s, h, b) = call(addr, "GET", path, &[], b"").await;
    let v = serde_json::from_str(&b).unwrap_or(Value::String(b));
    (s, h, v)
}

fn index(h: &::http::HeaderMap) -> u64 {
    h.get("x-consul-index")
        .expect("X-Consul-Index on every read")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a number")
}

/// An instance of `service` at `address`.
fn at(service: &str, id: &str, version: &str, address: &str) -> pb::Instance {
    let mut i = instance(service, id, version);
    i.address = address.into();
    i
}

fn with_labels(mut i: pb::Instance, labels: &[(&str, &str)], zone: &str) -> pb::Instance {
    i.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    i.zone = zone.into();
    i
}

/// Bootstraps ACLs and creates a token with `rules`: (the operator's secret, the token's).
async fn bootstrap_with_token(reg: &TestRegistry, rules: &[&str]) -> (String, String) {
    let mut acl = switchyard_proto::v1::acl_client::AclClient::new(reg.channel().await);
    let operator = acl
        .bootstrap(pb::BootstrapRequest::default())
        .await
        .expect("bootstrap")
        .into_inner()
        .secret;
    let mut req = tonic::Request::new(pb::CreateTokenRequest {
        rules: rules.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {operator}").parse().expect("header"),
    );
    let token = acl
        .create_token(req)
        .await
        .expect("token")
        .into_inner()
        .secret;
    (operator, token)
}

async fn set_state(reg: &TestRegistry, id: &str, state: pb::State) {
    reg.registry()
        .await
        .set_state(pb::SetStateRequest {
            namespace: String::new(),
            id: id.into(),
            state: state as i32,
        })
        .await
        .expect("set state");
}

/// A catalog of `web` (two of 1.0.0, one failing, one draining 2.0.0 with labels) and
/// `payments`.
async fn catalog(reg: &TestRegistry) {
    let mut c = reg.registry().await;
    let a = at("web", "web-1", "1.0.0", "10.0.0.1");
    register(&mut c, with_labels(a, &[("team", "blue")], "eu-1"), 60).await;
    let b = at("web", "web-2", "1.0.0", "10.0.0.2");
    register(&mut c, b, 60).await;
    let mut d = at("web", "web-3", "2.0.0", "10.0.0.3");
    d.weight = 7;
    register(
        &mut c,
        with_labels(d, &[("team", "blue"), ("tier", "canary")], "eu-2"),
        60,
    )
    .await;
    let e = at("web", "web-4", "2.0.0", "10.0.0.4");
    register(&mut c, e, 60).await;
    let p = at("payments", "pay-1", "3.0.0", "10.0.1.1");
    register(&mut c, p, 60).await;
    set_state(reg, "web-2", pb::State::Failing).await;
    set_state(reg, "web-4", pb::State::Draining).await;
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            e["Service"]["ID"]
                .as_str()
                .or(e["ServiceID"].as_str())
                .expect("an id")
                .to_string()
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn reads_show_instances_as_consul_does() {
    let reg = TestRegistry::start().await;
    catalog(&reg).await;
    let http = reg.handle.http_addr;

    let (s, h, all) = get(http, "/v1/health/service/web").await;
    assert_eq!(s, 200);
    assert!(index(&h) >= 1);
    assert_eq!(h["x-consul-knownleader"], "true");
    assert_eq!(h["x-consul-lastcontact"], "0");
    assert_eq!(ids(&all), ["web-1", "web-2", "web-3", "web-4"]);
    // `passing` in every spelling; false means off.
    for q in ["passing", "passing=", "passing=1", "passing=true"] {
        let (_, _, v) = get(http, &format!("/v1/health/service/web?{q}")).await;
        assert_eq!(ids(&v), ["web-1", "web-3"], "{q}");
    }
    for q in ["passing=false", "passing=0"] {
        let (_, _, v) = get(http, &format!("/v1/health/service/web?{q}")).await;
        assert_eq!(ids(&v).len(), 4, "{q}");
    }
    // Repeated tags are ANDed; node-meta matches the zone.
    let (_, _, v) = get(http, "/v1/health/service/web?tag=team%3Dblue").await;
    assert_eq!(ids(&v), ["web-1", "web-3"]);
    let (_, _, v) = get(
        http,
        "/v1/health/service/web?tag=team%3Dblue&tag=version-2.0.0",
    )
    .await;
    assert_eq!(ids(&v), ["web-3"]);
    let (_, _, v) = get(http, "/v1/health/service/web?node-meta=zone:eu-2").await;
    assert_eq!(ids(&v), ["web-3"]);
    // dc: ours is fine, another is Consul's own error; ns picks the namespace.
    assert_eq!(get(http, "/v1/health/service/web?dc=dc1").await.0, 200);
    let (s, _, b) = get(http, "/v1/health/service/web?dc=eu-west").await;
    assert_eq!(
        (s, b),
        (500, Value::String("No path to datacenter\n".into()))
    );
    let (_, _, v) = get(http, "/v1/health/service/web?ns=other").await;
    assert_eq!(v, serde_json::json!([]));
    // Unknown service: 200 [] with an index, as Consul.
    let (s, h, v) = get(http, "/v1/health/service/nosuch").await;
    assert_eq!((s, v), (200, serde_json::json!([])));
    assert!(index(&h) >= 1);

    // The mapping, field by field.
    let (_, _, v) = get(http, "/v1/health/service/web?tag=tier%3Dcanary").await;
    let e = &v[0];
    assert_eq!(e["Node"]["Node"], "10.0.0.3");
    assert_eq!(e["Node"]["Address"], "10.0.0.3");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Node"]["TaggedAddresses"]["lan"], "10.0.0.3");
    assert_eq!(e["Service"]["ID"], "web-3");
    assert_eq!(e["Service"]["Service"], "web");
    assert_eq!(e["Service"]["Port"], 8080);
    assert_eq!(e["Service"]["Kind"], "");
    assert_eq!(e["Service"]["Namespace"], "default");
    assert_eq!(e["Service"]["EnableTagOverride"], false);
    assert_eq!(e["Service"]["Weights"]["Passing"], 7);
    assert_eq!(
        e["Service"]["Tags"],
        serde_json::json!(["version-2.0.0", "team=blue", "tier=canary"])
    );
    assert_eq!(
        e["Service"]["Meta"],
        serde_json::json!({"version": "2.0.0", "zone": "eu-2", "team": "blue", "tier": "canary"})
    );
    assert_eq!(e["Checks"][0]["CheckID"], "service:web-3");
    assert_eq!(e["Checks"][0]["Status"], "passing");
    // FAILING is critical; DRAINING has Consul's maintenance check.
    let (_, _, checks) = get(http, "/v1/health/checks/web").await;
    let status_of = |id: &str| {
        checks
            .as_array()
            .expect("as expected")
            .iter()
            .filter(|c| c["ServiceID"] == id)
            .map(|c| {
                (
                    c["CheckID"].as_str().expect("as expected").to_string(),
                    c["Status"].as_str().expect("as expected").to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        status_of("web-2"),
        [("service:web-2".to_string(), "critical".to_string())]
    );
    let maint = status_of("web-4");
    assert!(
        maint.contains(&(
            "_service_maintenance:web-4".to_string(),
            "critical".to_string()
        )),
        "{maint:?}"
    );
    assert!(checks
        .as_array()
        .expect("as expected")
        .iter()
        .any(|c| c["Name"] == "Service Maintenance Mode" && c["ServiceID"] == "web-4"));

    // The catalog endpoints.
    let (s, h, v) = get(http, "/v1/catalog/services").await;
    assert_eq!(s, 200);
    assert!(index(&h) >= 1);
    assert_eq!(v["payments"], serde_json::json!(["version-3.0.0"]));
    assert!(v["web"]
        .as_array()
        .expect("as expected")
        .contains(&Value::String("tier=canary".into())));
    let (_, _, v) = get(http, "/v1/catalog/service/web").await;
    assert_eq!(ids(&v), ["web-1", "web-2", "web-3", "web-4"]);
    let flat = v
        .as_array()
        .expect("as expected")
        .iter()
        .find(|e| e["ServiceID"] == "web-1")
        .expect("as expected");
    assert_eq!(flat["Node"], "10.0.0.1");
    assert_eq!(flat["ServiceAddress"], "10.0.0.1");
    assert_eq!(flat["ServicePort"], 8080);
    assert_eq!(flat["ServiceMeta"]["team"], "blue");
    let (_, _, v) = get(http, "/v1/catalog/nodes").await;
    let nodes: Vec<&str> = v
        .as_array()
        .expect("as expected")
        .iter()
        .map(|n| n["Node"].as_str().expect("as expected"))
        .collect();
    assert_eq!(
        nodes,
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.1.1"]
    );

    // agent/self: every top-level value an object, Config.Datacenter a string.
    let (_, _, v) = get(http, "/v1/agent/self").await;
    for (k, val) in v.as_object().expect("as expected") {
        assert!(val.is_object(), "{k} is not an object: {val}");
    }
    assert_eq!(v["Config"]["Datacenter"], "dc1");
    // status/leader: a JSON string.
    let (_, _, v) = get(http, "/v1/status/leader").await;
    assert!(v.as_str().is_some_and(|s| s.contains(':')), "{v}");

    // Unknown endpoints and methods are clear.
    let (s, _, b) = call(http, "GET", "/v1/acl/tokens", &[], b"").await;
    assert_eq!(s, 404);
    assert!(b.contains("README"), "{b}");
    assert_eq!(
        call(http, "DELETE", "/v1/catalog/services", &[], b"")
            .await
            .0,
        405
    );
    assert_eq!(
        get(http, "/v1/health/service/web?passing=maybe").await.0,
        400
    );
    assert_eq!(
        get(http, "/v1/health/service/web?wait=soon&index=1")
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn blocking_queries_wake_on_their_service_only_and_are_bounded() {
    let reg = TestRegistry::start_with(|c| {
        c.consul.max_blocking_per_client = 2;
    })
    .await;
    catalog(&reg).await;
    let http = reg.handle.http_addr;
    let (_, h, _) = get(http, "/v1/health/service/web").await;
    let web = index(&h);
    let (_, h, _) = get(http, "/v1/health/service/payments").await;
    let payments = index(&h);

    // A write to payments leaves web's index alone (and never lowers anything).
    let mut c = reg.registry().await;
    let p = at("payments", "pay-2", "3.0.0", "10.0.1.2");
    register(&mut c, p, 60).await;
    let (_, h, _) = get(http, "/v1/health/service/web").await;
    assert_eq!(index(&h), web);
    let (_, h, _) = get(http, "/v1/health/service/payments").await;
    assert!(index(&h) > payments);

    // A blocked read of web does not wake for payments, and wakes for web.
    let blocked = tokio::spawn(async move {
        let started = Instant::now();
        let r = get(
            http,
            &format!("/v1/health/service/web?index={web}&wait=30s"),
        )
        .await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = at("payments", "pay-3", "3.0.0", "10.0.1.3");
    register(&mut c, p, 60).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !blocked.is_finished(),
        "an unrelated write woke a blocked read"
    );
    let w = at("web", "web-5", "1.0.0", "10.0.0.5");
    register(&mut c, w, 60).await;
    let ((s, h, v), took) = blocked.await.expect("join");
    assert_eq!(s, 200);
    assert!(index(&h) > web);
    assert!(ids(&v).contains(&"web-5".to_string()));
    assert!(
        took < Duration::from_secs(20),
        "woke only at the deadline: {took:?}"
    );

    // `wait` in Go's spellings ends the hold with the same index.
    let (_, h, _) = get(http, "/v1/health/service/web").await;
    let now = index(&h);
    for wait in ["1s", "1000ms", "0m1s", "1.0s"] {
        let started = Instant::now();
        let (s, h, _) = get(
            http,
            &format!("/v1/health/service/web?index={now}&wait={wait}"),
        )
        .await;
        assert_eq!((s, index(&h)), (200, now), "{wait}");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{wait} did not hold"
        );
    }
    // An index behind the current one answers at once.
    let started = Instant::now();
    let (_, h, _) = get(http, "/v1/catalog/services?index=1&wait=10s").await;
    assert!(index(&h) > 1);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Two held per client here: the third is 503 with Retry-After.
    let path = format!("/v1/health/service/web?index={now}&wait=5s");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { get(http, &path).await.0 })
        })
        .collect();
    assert_eventually(Duration::from_secs(5), "two held", || async {
        metric(
            &reg.metrics().await,
            "switchyard_registry_consul_blocked_queries",
        ) == Some(2.0)
    })
    .await;
    let (s, h, b) = call(http, "GET", &path, &[], b"").await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(h["retry-after"], "5");
    assert!(b.contains("--consul-max-blocking-per-client"), "{b}");
    for h in held {
        assert_eq!(h.await.expect("join"), 200);
    }
    assert_eq!(
        metric(
            &reg.metrics().await,
            "switchyard_registry_consul_blocking_refused_total"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn registration_with_a_ttl_check_maps_onto_a_lease() {
    let reg = TestRegistry::start().await;
    let http = reg.handle.http_addr;
    // py-consul's lowercase keys.
    let body = br#"{"name":"web","id":"web-1","address":"127.0.0.1","port":8080,"tags":["edge","version-1.4.0"],"meta":{"team":"blue"},"check":{"ttl":"2s"}}"#;
    let (s, _, b) = call(http, "PUT", "/v1/agent/service/register", &[], body).await;
    assert_eq!(s, 200, "{b}");
    // A TTL check starts critical, as in Consul.
    let (_, _, v) = get(http, "/v1/health/service/web?passing").await;
    assert_eq!(v, serde_json::json!([]));
    let (_, _, v) = get(http, "/v1/health/service/web").await;
    assert_eq!(v[0]["Checks"][0]["Status"], "critical");
    assert_eq!(
        v[0]["Service"]["Tags"],
        serde_json::json!(["version-1.4.0", "team=blue", "edge"])
    );
    let mut resolve = reg.discovery().await;
    let state = |r: pb::ResolveResponse| r.instances.first().map(|i| i.state);
    let res = || pb::ResolveRequest {
        namespace: String::new(),
        service: "web".into(),
        version: String::new(),
    };

    // pass → passing; warn → warning (out of `passing`, still SERVING for our routing);
    // fail → critical (FAILING); update with a status and output.
    let put = |path: &'static str| async move { call(http, "PUT", path, &[], b"").await.0 };
    assert_eq!(put("/v1/agent/check/pass/service:web-1").await, 200);
    let (_, _, v) = get(http, "/v1/health/service/web?passing").await;
    assert_eq!(ids(&v), ["web-1"]);
    assert_eq!(
        put("/v1/agent/check/warn/service:web-1?note=slow").await,
        200
    );
    let (_, _, v) = get(http, "/v1/health/service/web?passing").await;
    assert_eq!(v, serde_json::json!([]));
    let (_, _, v) = get(http, "/v1/health/service/web").await;
    assert_eq!(v[0]["Checks"][0]["Status"], "warning");
    assert_eq!(v[0]["Checks"][0]["Output"], "slow");
    let r = resolve
        .resolve(res())
        .await
        .expect("as expected")
        .into_inner();
    assert_eq!(state(r), Some(pb::State::Serving as i32));
    assert_eq!(put("/v1/agent/check/fail/service:web-1").await, 200);
    let r = resolve
        .resolve(res())
        .await
        .expect("as expected")
        .into_inner();
    assert_eq!(state(r), Some(pb::State::Failing as i32));
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/check/update/service:web-1",
        &[],
        br#"{"Status":"passing","Output":"all good"}"#,
    )
    .await;
    assert_eq!(s, 200);
    let (_, _, v) = get(http, "/v1/health/service/web?passing").await;
    assert_eq!(v[0]["Checks"][0]["Output"], "all good");
    let (s, _, b) = call(
        http,
        "PUT",
        "/v1/agent/check/update/service:web-1",
        &[],
        br#"{"Status":"sideways"}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(b.contains("Status"), "{b}");

    // Maintenance: DRAINING, with Consul's check; off again: back to passing.
    assert_eq!(
        put("/v1/agent/service/maintenance/web-1?enable=true&reason=deploy").await,
        200
    );
    let r = resolve
        .resolve(res())
        .await
        .expect("as expected")
        .into_inner();
    assert_eq!(state(r), Some(pb::State::Draining as i32));
    let (_, _, v) = get(http, "/v1/health/checks/web").await;
    assert!(v
        .as_array()
        .expect("as expected")
        .iter()
        .any(|c| c["Name"] == "Service Maintenance Mode"));
    assert_eq!(
        put("/v1/agent/service/maintenance/web-1?enable=false").await,
        200
    );
    let (_, _, v) = get(http, "/v1/health/service/web?passing").await;
    assert_eq!(ids(&v), ["web-1"]);
    assert_eq!(put("/v1/agent/service/maintenance/web-1").await, 400);

    // No pass within the TTL: the lease runs out, the instance goes, and the next pass
    // is 404 so the client registers again.
    assert_eventually(Duration::from_secs(10), "the TTL ran out", || async {
        get(http, "/v1/health/service/web").await.2 == serde_json::json!([])
    })
    .await;
    assert_eq!(put("/v1/agent/check/pass/service:web-1").await, 404);
    assert_eq!(put("/v1/agent/check/pass/service:nosuch").await, 404);

    // Register again, then deregister; an unknown id is 404.
    let (s, _, _) = call(http, "PUT", "/v1/agent/service/register", &[], body).await;
    assert_eq!(s, 200);
    assert_eq!(put("/v1/agent/service/deregister/web-1").await, 200);
    assert_eq!(
        get(http, "/v1/health/service/web").await.2,
        serde_json::json!([])
    );
    assert_eq!(put("/v1/agent/service/deregister/web-1").await, 404);
}

/// A tiny HTTP app whose health answer the test flips.
async fn health_app(healthy: std::sync::Arc<std::sync::atomic::AtomicU16>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let code = healthy.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        let mut r = ::http::Response::new(Full::new(Bytes::from_static(b"ok")));
                        *r.status_mut() = ::http::StatusCode::from_u16(code).expect("code");
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn http_and_tcp_checks_run_on_the_node_that_took_the_registration() {
    let reg = TestRegistry::start().await;
    let http = reg.handle.http_addr;
    let code = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
    let app = health_app(code.clone()).await;
    // Spring Cloud Consul's default registration: an HTTP check, text/plain body.
    let body = format!(
        r#"{{"ID":"web-8080","Name":"web","Tags":[],"Address":"127.0.0.1","Meta":{{"secure":"false"}},"Port":{},"Check":{{"Interval":"1s","Timeout":"1s","HTTP":"http://{app}/actuator/health","Header":{{}},"DeregisterCriticalServiceAfter":"3s"}}}}"#,
        app.port()
    );
    let (s, _, b) = call(
        http,
        "PUT",
        "/v1/agent/service/register",
        &[("content-type", "text/plain; charset=UTF-8")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let status = || async {
        let (_, _, v) = get(http, "/v1/health/service/web").await;
        v[0]["Checks"][0]["Status"]
            .as_str()
            .unwrap_or("gone")
            .to_string()
    };
    assert_eventually(Duration::from_secs(10), "the HTTP check passes", || async {
        status().await == "passing"
    })
    .await;
    let (_, _, v) = get(http, "/v1/health/service/web").await;
    assert!(
        v[0]["Checks"][0]["Output"]
            .as_str()
            .expect("as expected")
            .contains("200"),
        "{v}"
    );
    code.store(429, std::sync::atomic::Ordering::SeqCst);
    assert_eventually(Duration::from_secs(10), "429 is warning", || async {
        status().await == "warning"
    })
    .await;
    code.store(500, std::sync::atomic::Ordering::SeqCst);
    assert_eventually(Duration::from_secs(10), "500 is critical", || async {
        status().await == "critical"
    })
    .await;
    // Critical past DeregisterCriticalServiceAfter (3 s): deregistered.
    assert_eventually(Duration::from_secs(15), "deregistered", || async {
        status().await == "gone"
    })
    .await;

    // A TCP check on a port nobody listens on stays critical; on the app's, passes.
    let dead = free_addr();
    let body = format!(
        r#"{{"Name":"db","ID":"db-1","Address":"127.0.0.1","Port":{},"Checks":[{{"TCP":"{app}","Interval":"1s"}},{{"TCP":"{dead}","Interval":"1s"}}]}}"#,
        app.port()
    );
    assert_eq!(
        call(
            http,
            "PUT",
            "/v1/agent/service/register",
            &[],
            body.as_bytes()
        )
        .await
        .0,
        200
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, _, v) = get(http, "/v1/health/service/db").await;
    assert_eq!(v[0]["Checks"][0]["Status"], "critical", "{v}");
    // A service without a TTL check lives as long as this node renews it.
    let body = br#"{"Name":"cache","Port":6379,"Address":"127.0.0.1"}"#;
    assert_eq!(
        call(http, "PUT", "/v1/agent/service/register", &[], body)
            .await
            .0,
        200
    );
    let (_, _, v) = get(http, "/v1/health/service/cache?passing").await;
    assert_eq!(ids(&v), ["cache"]);
}

#[tokio::test]
async fn bad_registrations_and_bodies_are_refused_naming_the_field() {
    let reg = TestRegistry::start().await;
    let http = reg.handle.http_addr;
    let reg_put = |body: Vec<u8>| async move {
        call(http, "PUT", "/v1/agent/service/register", &[], &body).await
    };
    let (s, _, b) = reg_put(b"{\"Name\": ".to_vec()).await;
    assert_eq!(s, 400);
    assert!(b.contains("invalid body"), "{b}");
    let (s, _, b) = reg_put(br#"{"Name":"web","Port":"80"}"#.to_vec()).await;
    assert_eq!(s, 400);
    assert!(b.contains("invalid Port"), "{b}");
    let (s, _, b) =
        reg_put(br#"{"Name":"web","Port":80,"Check":{"TTL":"forever"}}"#.to_vec()).await;
    assert_eq!(s, 400);
    assert!(b.contains("invalid Check.TTL"), "{b}");
    let (s, _, b) = reg_put(br#"{"Name":"Web Service","Port":80}"#.to_vec()).await;
    assert_eq!(s, 400);
    assert!(b.contains("invalid Name"), "{b}");
    // The body is bounded: 413, and nothing was registered.
    let big = format!(
        r#"{{"Name":"web","Port":80,"Meta":{{"x":"{}"}}}}"#,
        "a".repeat(70 * 1024)
    );
    let (s, _, _) = reg_put(big.into_bytes()).await;
    assert_eq!(s, 413);
    assert_eq!(
        get(http, "/v1/catalog/services").await.2,
        serde_json::json!({})
    );
    // A long query string is refused before it is parsed.
    let long = format!("/v1/health/service/web?tag={}", "t".repeat(9000));
    assert_eq!(get(http, &long).await.0, 400);
}

#[tokio::test]
async fn tokens_apply_from_the_header_the_bearer_and_the_query() {
    let reg = TestRegistry::start().await;
    let http = reg.handle.http_addr;
    catalog(&reg).await;
    let (_operator, web) =
        bootstrap_with_token(&reg, &["service:web:register", "service:web:read"]).await;
    let body = br#"{"Name":"web","ID":"web-9","Port":80,"Address":"10.0.0.9"}"#;
    // Anonymous: refused; bad token: refused; the right token by any of the three ways.
    let (s, _, _) = call(http, "PUT", "/v1/agent/service/register", &[], body).await;
    assert_eq!(s, 403);
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/service/register",
        &[("x-consul-token", "nope")],
        body,
    )
    .await;
    assert_eq!(s, 403);
    let (s, _, b) = call(
        http,
        "PUT",
        "/v1/agent/service/register",
        &[("x-consul-token", &web)],
        body,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let bearer = format!("Bearer {web}");
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/check/pass/service:web-9",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = call(
        http,
        "PUT",
        &format!("/v1/agent/service/deregister/web-9?token={web}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    // The web token may not register payments, and reads only what it may.
    let body = br#"{"Name":"payments","Port":80,"Address":"10.0.0.9"}"#;
    let (s, _, b) = call(
        http,
        "PUT",
        "/v1/agent/service/register",
        &[("x-consul-token", &web)],
        body,
    )
    .await;
    assert_eq!(s, 403);
    assert!(b.contains("payments"), "{b}");
    let (_, h, v) = call(
        http,
        "GET",
        "/v1/catalog/services",
        &[("x-consul-token", &web)],
        b"",
    )
    .await;
    let v: Value = serde_json::from_str(&v).expect("as expected");
    assert!(v.get("web").is_some() && v.get("payments").is_none(), "{v}");
    assert_eq!(h["x-consul-results-filtered-by-acls"], "true");
    let (_, _, v) = call(
        http,
        "GET",
        "/v1/health/service/payments",
        &[("x-consul-token", &web)],
        b"",
    )
    .await;
    assert_eq!(v, "[]");
}

/// Ocelot.Provider.Consul 24.x (`Consul.GetAsync` through consuldotnet 1.7.14):
/// `GET /v1/health/service/NAME?passing=1` beside `GET /v1/catalog/nodes`, headers
/// `Accept: application/json`, `Keep-Alive: true`, `X-Consul-Token` when set. Ocelot
/// keeps an entry only with a non-empty `Service.Address` not starting with http and
/// `Port > 0`, and dials `Node.Node` (DefaultConsulServiceBuilder); consuldotnet needs
/// `Port` an int, `EnableTagOverride` a bool, every `Checks[].Status` one of Consul's
/// three, `TaggedAddresses` strings.
#[tokio::test]
async fn ocelot_finds_the_passing_instances_and_dials_the_node_name() {
    let reg = TestRegistry::start().await;
    catalog(&reg).await;
    let http = reg.handle.http_addr;
    let headers = [("accept", "application/json"), ("keep-alive", "true")];
    let (s, h, body) = call(
        http,
        "GET",
        "/v1/health/service/web?passing=1",
        &headers,
        b"",
    )
    .await;
    assert_eq!(s, 200);
    index(&h);
    let (s, _, nodes) = call(http, "GET", "/v1/catalog/nodes", &headers, b"").await;
    assert_eq!(s, 200);
    let nodes: Value = serde_json::from_str(&nodes).expect("as expected");
    let entries: Value = serde_json::from_str(&body).expect("as expected");
    let mut hosts = Vec::new();
    for e in entries.as_array().expect("as expected") {
        let addr = e["Service"]["Address"].as_str().expect("as expected");
        assert!(!addr.is_empty() && !addr.starts_with("http"));
        assert!(e["Service"]["Port"].as_u64().expect("as expected") > 0);
        assert!(e["Service"]["EnableTagOverride"].is_boolean());
        for c in e["Checks"].as_array().expect("as expected") {
            assert!(["passing", "warning", "critical"]
                .contains(&c["Status"].as_str().expect("as expected")));
        }
        for v in e["Node"]["TaggedAddresses"]
            .as_object()
            .expect("as expected")
            .values()
        {
            assert!(v.is_string());
        }
        // Ocelot's version: the first tag starting with version-.
        let version = e["Service"]["Tags"]
            .as_array()
            .expect("as expected")
            .iter()
            .find_map(|t| t.as_str().expect("as expected").strip_prefix("version-"))
            .expect("as expected");
        assert!(["1.0.0", "2.0.0"].contains(&version));
        // The node Ocelot dials is the instance's address, and catalog/nodes has it.
        let host = e["Node"]["Node"].as_str().expect("as expected");
        assert_eq!(host, addr);
        assert!(nodes
            .as_array()
            .expect("as expected")
            .iter()
            .any(|n| n["Node"] == host && n["Address"] == host));
        hosts.push(format!("{host}:{}", e["Service"]["Port"]));
    }
    hosts.sort();
    assert_eq!(hosts, ["10.0.0.1:8080", "10.0.0.3:8080"]);
}

/// Steeltoe Discovery Consul 4.x through consuldotnet: registration (PascalCase, no
/// Content-Type, `Check` with `TTL` 30s and `DeregisterCriticalServiceAfter` "30m0s",
/// `Meta.secure`), the heartbeat `PUT /v1/agent/check/pass/service:ID?note=ttl`,
/// maintenance with a reason, `GET /v1/health/checks/NAME` reading `ServiceID` and
/// `Name == "Service Maintenance Mode"`, discovery with `passing=1`,
/// `GET /v1/catalog/services`, `GET /v1/status/leader` (a JSON string) and
/// deregistration.
#[tokio::test]
async fn steeltoe_registers_heartbeats_and_finds_services() {
    let reg = TestRegistry::start().await;
    let http = reg.handle.http_addr;
    let body = br#"{"ID":"myapp-12345678","Name":"myapp","Tags":[],"Port":5000,"Address":"127.0.0.1","EnableTagOverride":false,"Check":{"TTL":"30s","TLSSkipVerify":false,"GRPCUseTLS":false,"DeregisterCriticalServiceAfter":"30m0s"},"Meta":{"secure":"false"}}"#;
    let (s, _, b) = call(http, "PUT", "/v1/agent/service/register", &[], body).await;
    assert_eq!(s, 200, "{b}");
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/check/pass/service:myapp-12345678?note=ttl",
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let (_, _, v) = get(http, "/v1/health/service/myapp?passing=1").await;
    assert_eq!(ids(&v), ["myapp-12345678"]);
    assert_eq!(v[0]["Service"]["Meta"]["secure"], "false");
    assert_eq!(v[0]["Service"]["Meta"]["version"], "unknown");
    assert_eq!(v[0]["Checks"][0]["Output"], "ttl");
    let (_, _, v) = get(http, "/v1/catalog/services").await;
    assert!(v.get("myapp").is_some());
    let (_, _, v) = get(http, "/v1/status/leader").await;
    assert!(v.is_string());
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/service/maintenance/myapp-12345678?enable=true&reason=OUT_OF_SERVICE",
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let (_, _, v) = get(http, "/v1/health/checks/myapp").await;
    assert!(v
        .as_array()
        .expect("as expected")
        .iter()
        .any(|c| c["ServiceID"] == "myapp-12345678" && c["Name"] == "Service Maintenance Mode"));
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/service/maintenance/myapp-12345678?enable=false",
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/service/deregister/myapp-12345678",
        &[],
        b"",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        get(http, "/v1/health/service/myapp?passing=1").await.2,
        serde_json::json!([])
    );
}

/// Spring Cloud Consul 4.3 through Ecwid consul-api 1.4.5: registration with
/// `Content-Type: text/plain; charset=UTF-8` and the token as `?token=`, a TTL
/// heartbeat `PUT /v1/agent/check/pass/service:ID` (non-200 makes it register again),
/// discovery `?passing=false` and `?tag=a&passing=true&stale&token=`, and
/// ConsulCatalogWatch's `GET /v1/catalog/services?wait=2s` then `&index=N`;
/// consul-api parses `X-Consul-Index` as an unsigned long and
/// `X-Consul-Knownleader` as exactly true/false.
#[tokio::test]
async fn spring_cloud_consul_registers_heartbeats_and_watches_the_catalog() {
    let reg = TestRegistry::start().await;
    let http = reg.handle.http_addr;
    let text = [("content-type", "text/plain; charset=UTF-8")];
    let body = br#"{"ID":"myapp-8080","Name":"myapp","Tags":["secure=false","edge"],"Address":"127.0.0.1","Meta":{"secure":"false"},"Port":8080,"Check":{"TTL":"30s"}}"#;
    let (s, _, b) = call(
        http,
        "PUT",
        "/v1/agent/service/register?token=",
        &text,
        body,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/check/pass/service:myapp-8080",
        &text,
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let (s, h, v) = get(http, "/v1/health/service/myapp?passing=false").await;
    assert_eq!(s, 200);
    assert_eq!(ids(&v), ["myapp-8080"]);
    assert!(h["x-consul-index"]
        .to_str()
        .expect("as expected")
        .parse::<u64>()
        .is_ok());
    assert!(["true", "false"].contains(&h["x-consul-knownleader"].to_str().expect("as expected")));
    let (_, _, v) = get(
        http,
        "/v1/health/service/myapp?tag=edge&passing=true&stale&token=",
    )
    .await;
    assert_eq!(ids(&v), ["myapp-8080"]);
    assert_eq!(v[0]["Service"]["Address"], "127.0.0.1");
    assert_eq!(v[0]["Service"]["Port"], 8080);
    // The catalog watch: a first read, then a blocking one that a change wakes.
    let (_, h, _) = get(http, "/v1/catalog/services?wait=2s").await;
    let idx = index(&h);
    let watch = tokio::spawn(async move {
        get(http, &format!("/v1/catalog/services?wait=2s&index={idx}")).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = br#"{"ID":"other-1","Name":"other","Port":81,"Address":"127.0.0.1"}"#;
    assert_eq!(
        call(http, "PUT", "/v1/agent/service/register", &text, other)
            .await
            .0,
        200
    );
    let (_, h, v) = watch.await.expect("as expected");
    assert!(index(&h) > idx);
    assert!(v.get("other").is_some(), "{v}");
    // An expired or unknown check is 404, which Spring's ReregistrationPredicate reads
    // as "register again".
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/check/pass/service:myapp-9090",
        &text,
        b"",
    )
    .await;
    assert_eq!(s, 404);
    let (s, _, _) = call(
        http,
        "PUT",
        "/v1/agent/service/deregister/myapp-8080?token=",
        &text,
        b"",
    )
    .await;
    assert_eq!(s, 200);
}

/// Prometheus's `consul_sd_configs` (discovery/consul/consul.go, consul/api 1.33):
/// `GET /v1/agent/self` for `Config.Datacenter`, `GET /v1/catalog/services?stale=&wait=120000ms`
/// (then with `index=`), and per service `GET /v1/health/service/NAME?index=N&stale=&tag=..&wait=120000ms`;
/// it stops at an `X-Consul-Index` that does not move, builds `__address__` from
/// `Service.Address` and `Service.Port`, and aggregates `Checks` into
/// `__meta_consul_health` (maintenance, critical, warning, passing).
#[tokio::test]
async fn prometheus_consul_discovery_sees_targets_and_their_health() {
    let reg = TestRegistry::start().await;
    catalog(&reg).await;
    let http = reg.handle.http_addr;
    let (_, _, me) = get(http, "/v1/agent/self").await;
    assert!(me["Config"]["Datacenter"].is_string());
    let (_, h, services) = get(http, "/v1/catalog/services?stale=&wait=120000ms").await;
    let catalog_index = index(&h);
    assert!(catalog_index > 0);
    let mut targets = Vec::new();
    for name in services.as_object().expect("as expected").keys() {
        let (_, h, entries) = get(
            http,
            &format!("/v1/health/service/{name}?stale=&wait=120000ms"),
        )
        .await;
        assert!(index(&h) > 0);
        for e in entries.as_array().expect("as expected") {
            // AggregatedStatus, as consul/api computes it.
            let checks = e["Checks"].as_array().expect("as expected");
            let health = if checks.iter().any(|c| {
                c["CheckID"]
                    .as_str()
                    .expect("as expected")
                    .starts_with("_service_maintenance:")
            }) {
                "maintenance"
            } else if checks.iter().any(|c| c["Status"] == "critical") {
                "critical"
            } else if checks.iter().any(|c| c["Status"] == "warning") {
                "warning"
            } else {
                "passing"
            };
            assert!(e["Service"]["Meta"]
                .as_object()
                .expect("as expected")
                .values()
                .all(Value::is_string));
            targets.push(format!(
                "{}:{} {} {}",
                e["Service"]["Address"].as_str().expect("as expected"),
                e["Service"]["Port"],
                e["Service"]["ID"].as_str().expect("as expected"),
                health
            ));
        }
    }
    targets.sort();
    assert_eq!(
        targets,
        [
            "10.0.0.1:8080 web-1 passing",
            "10.0.0.2:8080 web-2 critical",
            "10.0.0.3:8080 web-3 passing",
            "10.0.0.4:8080 web-4 maintenance",
            "10.0.1.1:8080 pay-1 passing",
        ]
    );
    // The next blocking call with the same index holds, and a tag filter applies.
    let started = Instant::now();
    let (_, h, _) = get(
        http,
        &format!("/v1/catalog/services?index={catalog_index}&stale=&wait=1000ms"),
    )
    .await;
    assert_eq!(index(&h), catalog_index);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let (_, _, v) = get(
        http,
        "/v1/health/service/web?stale=&tag=tier%3Dcanary&wait=120000ms",
    )
    .await;
    assert_eq!(ids(&v), ["web-3"]);
}

#[tokio::test]
async fn the_json_api_and_prometheus_discovery_list_the_catalog() {
    let reg = TestRegistry::start().await;
    catalog(&reg).await;
    let http = reg.handle.http_addr;
    let (s, _, v) = get(http, "/api/v1/services").await;
    assert_eq!(s, 200);
    assert_eq!(v["namespace"], "default");
    assert!(v["revision"].as_u64().expect("as expected") > 0);
    let web = v["services"]
        .as_array()
        .expect("as expected")
        .iter()
        .find(|s| s["name"] == "web")
        .expect("as expected");
    assert_eq!(web["instance_count"], 4);
    assert_eq!(web["versions"], serde_json::json!(["1.0.0", "2.0.0"]));
    let mut routing = reg.routing().await;
    routing
        .put_policy(pb::PutPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            policy: Some(canary_policy(&[("stable", 0), ("canary", 100)])),
        })
        .await
        .expect("policy");
    let (s, _, v) = get(http, "/api/v1/services/web").await;
    assert_eq!(s, 200);
    assert_eq!(v["instances"].as_array().expect("as expected").len(), 4);
    assert_eq!(v["versions"], serde_json::json!(["1.0.0", "2.0.0"]));
    assert!(v["policy_revision"].as_u64().is_some());
    assert_eq!(v["policy"]["default_split"][1]["weight"], 100);
    assert!(v["rollout"].is_null());
    assert_eq!(get(http, "/api/v1/services/nosuch").await.0, 404);
    assert_eq!(
        get(http, "/api/v1/services/web?namespace=Bad!").await.0,
        400
    );
    let (s, _, v) = get(http, "/api/v1/status").await;
    assert_eq!(s, 200);
    assert_eq!(v["role"], "leader");
    assert_eq!(v["members"].as_array().expect("as expected").len(), 1);
    assert!(v["term"].as_u64().expect("as expected") >= 1);

    // ?split=1 follows the split: 100 % canary (2.0.0, of which only web-3 passes).
    for _ in 0..5 {
        let (_, _, v) = get(http, "/v1/health/service/web?passing&split=1").await;
        assert_eq!(ids(&v), ["web-3"]);
    }
    let (_, _, v) = get(http, "/v1/health/service/web?passing").await;
    assert_eq!(ids(&v), ["web-1", "web-3"]);

    // Prometheus http_sd: one group per instance, with our labels.
    let (s, _, v) = get(http, "/v1/prometheus/sd").await;
    assert_eq!(s, 200);
    let groups = v.as_array().expect("as expected");
    assert_eq!(groups.len(), 5);
    let g = groups
        .iter()
        .find(|g| g["labels"]["__meta_switchyard_id"] == "web-3")
        .expect("as expected");
    assert_eq!(g["targets"], serde_json::json!(["10.0.0.3:8080"]));
    assert_eq!(g["labels"]["__meta_switchyard_service"], "web");
    assert_eq!(g["labels"]["__meta_switchyard_version"], "2.0.0");
    assert_eq!(g["labels"]["__meta_switchyard_zone"], "eu-2");
    assert_eq!(g["labels"]["__meta_switchyard_state"], "SERVING");
    assert_eq!(g["labels"]["__meta_switchyard_namespace"], "default");
    assert_eq!(g["labels"]["__meta_switchyard_label_tier"], "canary");
    let (_, _, v) = get(http, "/v1/prometheus/sd?service=payments").await;
    assert_eq!(v.as_array().expect("as expected").len(), 1);
}

#[tokio::test]
async fn the_consul_port_serves_the_same_api() {
    let reg = TestRegistry::start_with(|c| {
        c.consul.listen = Some("127.0.0.1:0".parse().expect("as expected"));
        c.consul.datacenter = "eu-west".into();
    })
    .await;
    catalog(&reg).await;
    let consul = reg.handle.consul_http_addr.expect("the consul port");
    let (_, _, v) = get(consul, "/v1/health/service/web?passing&dc=eu-west").await;
    assert_eq!(ids(&v), ["web-1", "web-3"]);
    assert_eq!(v[0]["Node"]["Datacenter"], "eu-west");
    assert_eq!(get(consul, "/health").await.0, 200);
}

/// In a three-node cluster, any node takes a registration and a TTL pass (a follower
/// relays the renewal to the leader, which runs the lease clocks), and every node
/// answers reads from its applied state.
#[tokio::test]
async fn any_node_of_a_cluster_registers_passes_and_reads() {
    let dir = tempfile::tempdir().expect("dir");
    let (nodes, _) = start_cluster(dir.path()).await;
    let https: Vec<SocketAddr> = nodes.iter().map(|n| n.http_addr).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let followers = loop {
        let mut followers = Vec::new();
        let mut leaders = 0;
        for h in &https {
            let (_, _, v) = get(*h, "/api/v1/status").await;
            match v["role"].as_str() {
                Some("leader") => leaders += 1,
                Some("follower") => followers.push(*h),
                _ => {}
            }
        }
        if leaders == 1 && followers.len() == 2 {
            break followers;
        }
        assert!(Instant::now() < deadline, "no leader in 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (one, other) = (followers[0], followers[1]);
    let body =
        br#"{"Name":"web","ID":"web-1","Address":"10.0.0.1","Port":80,"Check":{"TTL":"3s"}}"#;
    let (s, _, b) = call(one, "PUT", "/v1/agent/service/register", &[], body).await;
    assert_eq!(s, 200, "{b}");
    for h in &https {
        let h = *h;
        assert_eventually(Duration::from_secs(5), "every node has it", || async move {
            ids(&get(h, "/v1/health/service/web").await.2) == ["web-1"]
        })
        .await;
    }
    // Passing through the other follower every second keeps it past its TTL, passing
    // on every node.
    for _ in 0..6 {
        let (s, _, b) = call(other, "PUT", "/v1/agent/check/pass/service:web-1", &[], b"").await;
        assert_eq!(s, 200, "{b}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for h in &https {
        let h = *h;
        assert_eventually(
            Duration::from_secs(5),
            "passing everywhere",
            || async move { ids(&get(h, "/v1/health/service/web?passing").await.2) == ["web-1"] },
        )
        .await;
    }
}

/// The KV endpoints as Consul answers them: base64 values (null when empty), a JSON
/// array for one key, 404 with no body for a missing one, `true`/`false` for writes,
/// `cas`, `flags`, `raw`, `keys` with `separator`, `recurse` reads and deletes.
#[tokio::test]
async fn kv_reads_and_writes_as_consul_does() {
    use base64::Engine as _;
    let reg = TestRegistry::start().await;
    let h = reg.handle.http_addr;
    let (s, hd, b) = call(h, "GET", "/v1/kv/config/web/timeout", &[], b"").await;
    assert_eq!((s, b.as_str()), (404, ""));
    index(&hd);
    let (s, _, b) = call(h, "PUT", "/v1/kv/config/web/timeout?flags=42", &[], b"5s").await;
    assert_eq!((s, b.trim()), (200, "true"));
    let (s, hd, v) = get(h, "/v1/kv/config/web/timeout").await;
    assert_eq!(s, 200);
    let e = &v[0];
    assert_eq!(e["Key"], "config/web/timeout");
    assert_eq!(e["Flags"], 42);
    assert_eq!(e["LockIndex"], 0);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(e["Value"].as_str().expect("base64 value"))
        .expect("base64");
    assert_eq!(raw, b"5s");
    let modify = e["ModifyIndex"].as_u64().expect("ModifyIndex");
    assert_eq!(e["CreateIndex"].as_u64(), Some(modify));
    assert_eq!(index(&hd), modify);
    // ?raw gives the bytes themselves.
    let (s, _, b) = call(h, "GET", "/v1/kv/config/web/timeout?raw", &[], b"").await;
    assert_eq!((s, b.as_str()), (200, "5s"));
    // cas: a stale index is refused with false and changes nothing; the right one wins.
    let stale = format!("/v1/kv/config/web/timeout?cas={}", modify - 1);
    let (s, _, b) = call(h, "PUT", &stale, &[], b"9s").await;
    assert_eq!((s, b.trim()), (200, "false"));
    let (s, _, b) = call(h, "PUT", "/v1/kv/config/web/timeout?cas=0", &[], b"9s").await;
    assert_eq!((s, b.trim()), (200, "false"), "cas=0 only creates");
    let fresh = format!("/v1/kv/config/web/timeout?cas={modify}");
    let (s, _, b) = call(h, "PUT", &fresh, &[], b"7s").await;
    assert_eq!((s, b.trim()), (200, "true"));
    let (_, _, v) = get(h, "/v1/kv/config/web/timeout").await;
    assert_eq!(
        v[0]["CreateIndex"].as_u64(),
        Some(modify),
        "create index kept"
    );
    assert!(v[0]["ModifyIndex"].as_u64() > Some(modify));
    // An empty value reads back as null.
    let (s, _, _) = call(h, "PUT", "/v1/kv/config/web/empty", &[], b"").await;
    assert_eq!(s, 200);
    let (_, _, v) = get(h, "/v1/kv/config/web/empty").await;
    assert!(v[0]["Value"].is_null(), "{v}");
    for k in ["config/api/a", "config/api/b/c", "other"] {
        let (s, _, _) = call(h, "PUT", &format!("/v1/kv/{k}"), &[], b"x").await;
        assert_eq!(s, 200);
    }
    let (_, _, v) = get(h, "/v1/kv/config/?keys&separator=/").await;
    assert_eq!(v, serde_json::json!(["config/api/", "config/web/"]));
    let (_, _, v) = get(h, "/v1/kv/config/api/?keys").await;
    assert_eq!(v, serde_json::json!(["config/api/a", "config/api/b/c"]));
    let (_, _, v) = get(h, "/v1/kv/config/?recurse").await;
    assert_eq!(v.as_array().map(Vec::len), Some(4), "{v}");
    let (s, _, b) = call(h, "DELETE", "/v1/kv/config/?recurse", &[], b"").await;
    assert_eq!((s, b.trim()), (200, "true"));
    let (s, _, _) = call(h, "GET", "/v1/kv/config/?recurse", &[], b"").await;
    assert_eq!(s, 404);
    let (_, _, v) = get(h, "/v1/kv/?keys").await;
    assert_eq!(v, serde_json::json!(["other"]));
    // Bad input: a bad key, a value over 512 KiB, a bad cas; nothing written.
    let (s, _, b) = call(h, "PUT", "/v1/kv/a//b", &[], b"x").await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("empty path segment"), "{b}");
    let big = vec![b'x'; 512 * 1024 + 1];
    let (s, _, _) = call(h, "PUT", "/v1/kv/big", &[], &big).await;
    assert_eq!(s, 413);
    let (s, _, b) = call(h, "PUT", "/v1/kv/x?cas=abc", &[], b"x").await;
    assert_eq!(s, 400, "{b}");
    let (s, _, _) = call(h, "GET", "/v1/kv/big", &[], b"").await;
    assert_eq!(s, 404);
}

/// A blocking KV read holds until something under its key changes, then answers with
/// the new index; a change elsewhere does not wake it.
#[tokio::test]
async fn kv_blocking_reads_wake_on_a_change_under_their_key() {
    let reg = TestRegistry::start().await;
    let h = reg.handle.http_addr;
    let (s, _, _) = call(h, "PUT", "/v1/kv/app/flag", &[], b"off").await;
    assert_eq!(s, 200);
    let (_, hd, _) = get(h, "/v1/kv/app/flag").await;
    let seen = index(&hd);
    let path = format!("/v1/kv/app/flag?index={seen}&wait=10s");
    let started = Instant::now();
    let blocked = tokio::spawn(async move { get(h, &path).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Elsewhere: no wake-up.
    let (s, _, _) = call(h, "PUT", "/v1/kv/other", &[], b"x").await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "woke for another key");
    let (s, _, _) = call(h, "PUT", "/v1/kv/app/flag", &[], b"on").await;
    assert_eq!(s, 200);
    let (s, hd, v) = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("woke")
        .expect("task");
    assert_eq!(s, 200);
    assert!(index(&hd) > seen);
    assert_eq!(v[0]["Value"], "b24=", "{v}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Without a change, the wait runs out and the index stays.
    let (_, hd, _) = get(h, "/v1/kv/app/flag").await;
    let now = index(&hd);
    let started = Instant::now();
    let (s, hd, _) = get(h, &format!("/v1/kv/app/flag?index={now}&wait=1s")).await;
    assert_eq!((s, index(&hd)), (200, now));
    assert!(started.elapsed() >= Duration::from_secs(1));
    // A delete under the prefix wakes a recurse watcher, and the index does not go back.
    let path = format!("/v1/kv/app/?recurse&index={now}&wait=10s");
    let blocked = tokio::spawn(async move { call(h, "GET", &path, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _, _) = call(h, "DELETE", "/v1/kv/app/flag", &[], b"").await;
    assert_eq!(s, 200);
    let (s, hd, _) = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("woke")
        .expect("task");
    assert_eq!(s, 404);
    assert!(index(&hd) > now);
}

/// Ocelot's Consul configuration store (Ocelot.Provider.Consul,
/// `ConsulFileConfigurationRepository`): `Set` serializes the FileConfiguration with
/// Newtonsoft.Json (indented) and calls consuldotnet's `KV.Put(new KVPair(key) { Value =
/// bytes })`, i.e. `PUT /v1/kv/InternalConfiguration` with the raw bytes as the body and
/// no `flags` (Flags is 0); `Get` calls `KV.Get(key)` = `GET /v1/kv/InternalConfiguration`
/// and reads `Response.Value` (base64 in the JSON array's first element), treating a 404
/// (null response) as "no configuration yet".
#[tokio::test]
async fn ocelot_stores_and_reads_its_configuration() {
    use base64::Engine as _;
    let reg = TestRegistry::start().await;
    let h = reg.handle.http_addr;
    // First start: no configuration yet (consuldotnet turns the 404 into a null response).
    let (s, _, _) = call(h, "GET", "/v1/kv/InternalConfiguration", &[], b"").await;
    assert_eq!(s, 404);
    let config = r#"{
  "Routes": [
    {
      "DownstreamPathTemplate": "/api/{everything}",
      "DownstreamScheme": "http",
      "UpstreamPathTemplate": "/web/{everything}",
      "ServiceName": "web",
      "LoadBalancerOptions": { "Type": "LeastConnection" }
    }
  ],
  "GlobalConfiguration": {
    "ServiceDiscoveryProvider": { "Scheme": "http", "Host": "localhost", "Port": 8500, "Type": "Consul", "ConfigurationKey": "InternalConfiguration" }
  }
}"#;
    // consuldotnet sends the bytes with Content-Type application/octet-stream.
    let (s, _, b) = call(
        h,
        "PUT",
        "/v1/kv/InternalConfiguration",
        &[("content-type", "application/octet-stream")],
        config.as_bytes(),
    )
    .await;
    assert_eq!((s, b.trim()), (200, "true"));
    let (s, _, v) = get(h, "/v1/kv/InternalConfiguration").await;
    assert_eq!(s, 200);
    let pair = &v[0];
    assert_eq!(pair["Key"], "InternalConfiguration");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(pair["Value"].as_str().expect("Value"))
        .expect("base64");
    let back: Value = serde_json::from_slice(&bytes).expect("Ocelot's JSON back");
    assert_eq!(back["Routes"][0]["ServiceName"], "web");
    assert_eq!(String::from_utf8(bytes).expect("utf-8"), config);
}

/// KV rights: a token with `kv:app/:read` reads under app/ only and writes nowhere.
#[tokio::test]
async fn kv_needs_kv_rights_once_acls_are_on() {
    let reg = TestRegistry::start().await;
    let h = reg.handle.http_addr;
    let (s, _, _) = call(h, "PUT", "/v1/kv/app/a", &[], b"1").await;
    assert_eq!(s, 200);
    let (operator, reader) = bootstrap_with_token(&reg, &["kv:app/:read"]).await;
    let as_reader = [("x-consul-token", reader.as_str())];
    let (s, _, _) = call(h, "GET", "/v1/kv/app/a", &as_reader, b"").await;
    assert_eq!(s, 200);
    let (s, _, b) = call(h, "PUT", "/v1/kv/app/a", &as_reader, b"2").await;
    assert_eq!(s, 403, "{b}");
    let (s, _, _) = call(h, "GET", "/v1/kv/other", &as_reader, b"").await;
    assert_eq!(s, 403);
    let (s, _, _) = call(h, "GET", "/v1/kv/app/a", &[], b"").await;
    assert_eq!(s, 403, "anonymous is denied once bootstrapped");
    let bearer = format!("Bearer {operator}");
    let (s, _, _) = call(
        h,
        "PUT",
        "/v1/kv/app/a",
        &[("authorization", &bearer)],
        b"2",
    )
    .await;
    assert_eq!(s, 200);
}
