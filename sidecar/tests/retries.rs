//! Retries, the retry budget, timeouts and circuit breaking against real failing
//! servers: a port that refuses connections (bound, then closed), backends that answer
//! 503, and one that hangs. The catalog comes from a fake registry.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;
use switchyard_proto::v1 as pb;
use switchyard_sidecar::SidecarHandle;

type BodyClient = Client<HttpConnector, Full<Bytes>>;

fn body_client() -> BodyClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends `method` with `body` through the proxy: (status, body, headers).
async fn send(
    client: &BodyClient,
    proxy: SocketAddr,
    host: &str,
    method: &str,
    body: &'static str,
    headers: &[(&str, &str)],
) -> (u16, String, hyper::HeaderMap) {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{proxy}/hello"))
        .header(hyper::header::HOST, host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// An address nothing listens on: bound, then closed, so connecting is refused.
async fn refusing_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

async fn failing(name: &str, status: u64) -> Backend {
    let b = Backend::start(name, Duration::ZERO).await;
    b.status.store(status, std::sync::atomic::Ordering::Relaxed);
    b
}

async fn metrics(sidecar: &SidecarHandle) -> String {
    http_get(sidecar.admin_addr, "/metrics").await.1
}

/// The sum of every line of metric `name` whose labels contain `labels`.
fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

struct Setup {
    fake: FakeRegistry,
    sidecar: SidecarHandle,
    proxy: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn setup(
    instances: Vec<pb::Instance>,
    configure: impl FnOnce(&mut switchyard_sidecar::SidecarConfig),
) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in &instances {
        *counts.entry(i.service.clone()).or_default() += 1;
    }
    fake.upsert(instances);
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    configure(&mut config);
    let sidecar = start_sidecar(config).await;
    for (service, n) in counts {
        wait_endpoints(&sidecar, &service, n).await;
    }
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    Setup {
        fake,
        sidecar,
        proxy,
        _dir: dir,
    }
}

impl Setup {
    async fn stop(self) {
        self.sidecar.shutdown().await;
        self.fake.shutdown().await;
    }
}

#[tokio::test]
async fn get_sees_no_errors_while_one_of_three_backends_fails() {
    let a = Backend::start("a", Duration::ZERO).await;
    let b = Backend::start("b", Duration::ZERO).await;
    let c = Backend::start("c", Duration::ZERO).await;
    let d = Backend::start("d", Duration::ZERO).await;
    let unavailable = failing("unavailable", 503).await;
    let refused = refusing_addr().await;
    let s = setup(
        vec![
            instance_at("refusing", "a", a.addr, "1", 100),
            instance_at("refusing", "b", b.addr, "1", 100),
            instance_at("refusing", "gone", refused, "1", 100),
            instance_at("answers503", "c", c.addr, "1", 100),
            instance_at("answers503", "d", d.addr, "1", 100),
            instance_at("answers503", "unavailable", unavailable.addr, "1", 100),
        ],
        |_| {},
    )
    .await;
    let http = http_client();
    let mut explained = None;
    for service in ["refusing", "answers503"] {
        for _ in 0..60 {
            let (status, body, headers) = get_explained(&http, s.proxy, service).await;
            assert_eq!(status, 200, "{service}: {body}");
            if let Some(e) = headers
                .get("x-switchyard-explain")
                .and_then(|v| v.to_str().ok())
                .filter(|e| e.contains("retry 1:"))
            {
                explained.get_or_insert_with(Vec::new).push(e.to_string());
            }
        }
    }
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(
            &m,
            "switchyard_sidecar_retries_total",
            "reason=\"connect-failure\""
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric_sum(&m, "switchyard_sidecar_retries_total", "reason=\"503\"") >= 1.0,
        "{m}"
    );
    assert!(unavailable.hits() >= 1, "the 503 backend was tried");
    let explained = explained.expect("a retry was explained");
    assert!(
        explained
            .iter()
            .any(|e| e.contains("connect-failure from gone")),
        "{explained:?}"
    );
    assert!(
        explained.iter().any(|e| e.contains("503 from unavailable")),
        "{explained:?}"
    );
    s.stop().await;
}

async fn get_explained(
    client: &HttpClient,
    proxy: SocketAddr,
    host: &str,
) -> (u16, String, hyper::HeaderMap) {
    let req = hyper::Request::builder()
        .uri(format!("http://{proxy}/hello"))
        .header(hyper::header::HOST, host)
        .header("x-switchyard-explain", "1")
        .body(http_body_util::Empty::new())
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

#[tokio::test]
async fn post_is_not_retried_on_503_but_is_on_a_refused_connection() {
    let ok = Backend::start("ok", Duration::ZERO).await;
    let ok2 = Backend::start("ok2", Duration::ZERO).await;
    let unavailable = failing("unavailable", 503).await;
    let refused = refusing_addr().await;
    let s = setup(
        vec![
            instance_at("answers503", "ok", ok.addr, "1", 100),
            instance_at("answers503", "unavailable", unavailable.addr, "1", 100),
            instance_at("refusing", "ok2", ok2.addr, "1", 100),
            instance_at("refusing", "gone", refused, "1", 100),
        ],
        |_| {},
    )
    .await;
    let client = body_client();
    let mut answered_503 = 0;
    for _ in 0..20 {
        let (status, body, _) = send(&client, s.proxy, "answers503", "POST", "order=1", &[]).await;
        match status {
            200 => assert_eq!(body, "ok"),
            503 => answered_503 += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(answered_503 >= 1, "some POSTs drew the 503 backend");
    assert_eq!(
        ok.hits() + unavailable.hits(),
        20,
        "no POST was sent twice after a 503"
    );
    assert_eq!(unavailable.hits(), answered_503);

    for _ in 0..20 {
        let (status, body, _) = send(&client, s.proxy, "refusing", "POST", "order=2", &[]).await;
        assert_eq!((status, body.as_str()), (200, "ok2"));
    }
    assert_eq!(ok2.hits(), 20);
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(
            &m,
            "switchyard_sidecar_retries_total",
            "service=\"refusing\""
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "switchyard_sidecar_retries_total",
            "service=\"answers503\""
        ),
        0.0,
        "{m}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_total_failure_retries_stay_within_the_budget() {
    let backends = [
        failing("x", 503).await,
        failing("y", 503).await,
        failing("z", 503).await,
    ];
    let s = setup(
        backends
            .iter()
            .map(|b| instance_at("down", &b.name, b.addr, "1", 100))
            .collect(),
        |_| {},
    )
    .await;
    // Two clients: never more retries at once than the floor of 3 concurrent (Envoy's
    // part of the budget), so what stops the retries here is the rate (Linkerd's).
    const CLIENTS: usize = 2;
    const EACH: usize = 200;
    let proxy = s.proxy;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let http = http_client();
            for _ in 0..EACH {
                assert_eq!(get(&http, proxy, "down").await.0, 503);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let requests = (CLIENTS * EACH) as f64;
    let hits: usize = backends.iter().map(Backend::hits).sum();
    // 20% of the requests plus 10 per second over the 10 s window.
    let floor = 10.0 * 10.0;
    assert!(
        hits as f64 <= 1.2 * requests + floor,
        "{hits} backend requests for {requests} client requests"
    );
    assert!(
        hits as f64 >= requests + floor,
        "the floor and some of the share were used: {hits}"
    );
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(&m, "switchyard_sidecar_retry_budget_exhausted_total", "") >= 1.0,
        "the budget said no: {m}"
    );

    // Many clients at once: the concurrent part of the budget holds as well.
    let before = hits;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(async move {
            let http = http_client();
            for _ in 0..10 {
                assert_eq!(get(&http, proxy, "down").await.0, 503);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let hits: usize = backends.iter().map(Backend::hits).sum::<usize>() - before;
    assert!(
        hits as f64 <= 1.2 * 160.0 + floor,
        "{hits} backend requests for 160 client requests"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_answers_503_with_the_header_at_the_limit_not_above_it() {
    let slow = Backend::start("slow", Duration::from_millis(1_500)).await;
    let s = setup(
        vec![instance_at("slow", "slow", slow.addr, "1", 100)],
        |_| {},
    )
    .await;
    // The limit comes from the service's policy, over the sidecar's default of 1024.
    s.fake.set_policy(
        "slow",
        Some(pb::Policy {
            resilience: Some(pb::Resilience {
                max_requests: Some(4),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    eventually(Duration::from_secs(5), || async {
        (s.sidecar
            .table
            .get("slow")?
            .resilience
            .settings
            .max_requests
            == 4)
            .then_some(())
    })
    .await;
    let proxy = s.proxy;
    let held: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let http = http_client();
                get(&http, proxy, "slow").await.0
            })
        })
        .collect();
    eventually(Duration::from_secs(5), || async {
        (slow.hits() == 4).then_some(())
    })
    .await;
    let started = Instant::now();
    let (status, body, headers) = get_explained(&http_client(), proxy, "slow").await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert!(body.contains("max_requests limit (4)"), "{body}");
    assert!(
        headers["x-switchyard-explain"]
            .to_str()
            .expect("ascii")
            .contains("limit=max_requests"),
        "{headers:?}"
    );
    for h in held {
        assert_eq!(
            h.await.expect("held"),
            200,
            "the 4 under the limit are served"
        );
    }
    assert_eq!(slow.hits(), 4, "the refused one never reached the backend");
    // Their places are given back.
    assert_eq!(get(&http_client(), proxy, "slow").await.0, 200);
    let m = metrics(&s.sidecar).await;
    assert_eq!(
        metric_sum(
            &m,
            "switchyard_sidecar_overflows_total",
            "limit=\"max_requests\""
        ),
        1.0,
        "{m}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_timed_out_request_leaves_the_endpoints_active_count_at_zero() {
    let hung = Backend::start("hung", Duration::from_secs(30)).await;
    let s = setup(
        vec![instance_at("hung", "hung", hung.addr, "1", 100)],
        |c| {
            c.resilience.timeout = Duration::from_millis(300);
        },
    )
    .await;
    let started = Instant::now();
    let (status, body, _) = get(&http_client(), s.proxy, "hung").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        body.contains("\"hung\"") && body.contains("300ms") && body.contains("request timeout"),
        "says which service and how long: {body}"
    );
    let view = s.sidecar.table.get("hung").expect("view");
    assert_eq!(
        view.endpoints[0].live.active(),
        0,
        "no leaked in-flight count"
    );
    assert_eq!(
        view.limits
            .active_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(hung.hits(), 1, "the request timeout is not retried");
    s.stop().await;
}

#[tokio::test]
async fn a_per_try_timeout_retries_a_get_on_another_endpoint() {
    let hung = Backend::start("hung", Duration::from_secs(30)).await;
    let fast = Backend::start("fast", Duration::ZERO).await;
    let s = setup(
        vec![
            instance_at("mixed", "hung", hung.addr, "1", 100),
            instance_at("mixed", "fast", fast.addr, "1", 100),
        ],
        |c| {
            c.resilience.per_try_timeout = Some(Duration::from_millis(200));
            c.resilience.timeout = Duration::from_secs(5);
        },
    )
    .await;
    let http = http_client();
    // At least 6 requests, and on until the balancer's random draw has picked the hung
    // endpoint once (6 alone missed it about once in 64 runs); bounded at 40.
    for n in 0..40 {
        if n >= 6 && hung.hits() >= 1 {
            break;
        }
        let started = Instant::now();
        let (status, body, _) = get(&http, s.proxy, "mixed").await;
        assert_eq!((status, body.as_str()), (200, "fast"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert!(hung.hits() >= 1, "the hung backend was tried");
    let view = s.sidecar.table.get("mixed").expect("view");
    assert!(view.endpoints.iter().all(|e| e.live.active() == 0));
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(&m, "switchyard_sidecar_retries_total", "per-try-timeout") >= 1.0,
        "{m}"
    );
    s.stop().await;
}

/// Envoy's connection limits: at `max_connections` open to the service a request that
/// needs another waits, among at most `max_pending` others; past both it is refused at
/// once (503, `x-envoy-overloaded`), counted against no endpoint and never retried.
#[tokio::test]
async fn connection_limits_queue_up_to_max_pending_and_refuse_the_rest_at_once() {
    let slow = Backend::start("slow", Duration::from_millis(1_500)).await;
    let s = setup(
        vec![instance_at("slow", "slow", slow.addr, "1", 100)],
        |c| {
            // A waiting request may wait this long for a connection to free up.
            c.connect_timeout = Duration::from_secs(5);
        },
    )
    .await;
    s.fake.set_policy(
        "slow",
        Some(pb::Policy {
            resilience: Some(pb::Resilience {
                max_connections: Some(2),
                max_pending: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    eventually(Duration::from_secs(5), || async {
        let view = s.sidecar.table.get("slow")?;
        (view.resilience.settings.max_connections == 2).then_some(())
    })
    .await;
    let proxy = s.proxy;
    let spawn_get = || {
        tokio::spawn(async move {
            let http = http_client();
            get(&http, proxy, "slow").await.0
        })
    };
    let held: Vec<_> = (0..2).map(|_| spawn_get()).collect();
    eventually(Duration::from_secs(5), || async {
        (slow.hits() == 2).then_some(())
    })
    .await;
    let waiting = spawn_get();
    let view = s.sidecar.table.get("slow").expect("view");
    eventually(Duration::from_secs(5), || async {
        (view.limits.conns.pending() == 1).then_some(())
    })
    .await;
    assert_eq!(view.limits.conns.open(), 2, "never above max_connections");
    let started = Instant::now();
    let (status, body, headers) = get_explained(&http_client(), proxy, "slow").await;
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert!(body.contains("max_pending limit (1)"), "{body}");
    assert!(
        headers["x-switchyard-explain"]
            .to_str()
            .expect("ascii")
            .contains("limit=max_pending"),
        "{headers:?}"
    );
    for h in held {
        assert_eq!(h.await.expect("held"), 200);
    }
    assert_eq!(
        waiting.await.expect("waiting"),
        200,
        "the waiting request got a connection once one was free"
    );
    assert_eq!(slow.hits(), 3, "the refused one never reached the backend");
    assert!(view.limits.conns.open() <= 2);
    let m = metrics(&s.sidecar).await;
    assert_eq!(
        metric_sum(
            &m,
            "switchyard_sidecar_overflows_total",
            "limit=\"max_pending\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "switchyard_sidecar_retries_total", ""),
        0.0,
        "an overflow is not retried: {m}"
    );
    s.stop().await;
}

/// A route the policy marks retryable retries a POST on 503 (the app says its requests
/// are safe to repeat); the same POST off that route is not retried.
#[tokio::test]
async fn a_retryable_route_retries_a_post_on_503() {
    let ok = Backend::start("ok", Duration::ZERO).await;
    let unavailable = failing("unavailable", 503).await;
    let s = setup(
        vec![
            instance_at("orders", "ok", ok.addr, "1", 100),
            instance_at("orders", "unavailable", unavailable.addr, "1", 100),
        ],
        |_| {},
    )
    .await;
    s.fake.set_policy(
        "orders",
        Some(pb::Policy {
            routes: vec![pb::Route {
                name: "safe".into(),
                headers: vec![pb::HeaderMatch {
                    name: "x-retry-safe".into(),
                    r#match: Some(pb::header_match::Match::Exact("yes".into())),
                }],
                split: vec![pb::WeightedSubset {
                    subset: "1".into(),
                    weight: 100,
                }],
                sticky_header: String::new(),
                retryable: true,
            }],
            ..Default::default()
        }),
    );
    eventually(Duration::from_secs(5), || async {
        s.sidecar.table.get("orders")?.policy.as_ref().map(|_| ())
    })
    .await;
    let client = body_client();
    // Off the route: POST until one draws the 503 endpoint and gets its 503 back (one
    // failure only, far from the five that eject it).
    let mut answered_503 = false;
    for _ in 0..40 {
        let (status, _, _) = send(&client, s.proxy, "orders", "POST", "order=2", &[]).await;
        if status == 503 {
            answered_503 = true;
            break;
        }
    }
    assert!(answered_503, "off the route a POST is not retried");
    let before = unavailable.hits();
    for _ in 0..20 {
        let (status, body, _) = send(
            &client,
            s.proxy,
            "orders",
            "POST",
            "order=1",
            &[("x-retry-safe", "yes")],
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "ok"), "retried on the route");
    }
    assert!(
        unavailable.hits() > before,
        "some POSTs on the route drew the 503 endpoint first"
    );
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(&m, "switchyard_sidecar_retries_total", "service=\"orders\"") >= 1.0,
        "{m}"
    );
    s.stop().await;
}

/// A backend that reads each request and then resets the connection (TCP RST):
/// `mid_response` first writes a response head and part of the body.
async fn resetting(mid_response: bool) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = l.accept().await {
            let hits = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // One read holds a whole small request head.
                if matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                    hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if mid_response {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                            .await;
                        let _ = stream.flush().await;
                    }
                }
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    });
    (addr, hits)
}

/// A connection reset before any answer is retried for a GET on another endpoint (0
/// errors); a reset in the middle of an answer cannot be (its head already went to the
/// caller), and counts against the endpoint.
#[tokio::test]
async fn a_reset_before_the_answer_is_retried_and_one_mid_response_is_not() {
    let ok = Backend::start("ok", Duration::ZERO).await;
    let (early, early_hits) = resetting(false).await;
    let ok2 = Backend::start("ok2", Duration::ZERO).await;
    let (late, late_hits) = resetting(true).await;
    let s = setup(
        vec![
            instance_at("early", "ok", ok.addr, "1", 100),
            instance_at("early", "resets", early, "1", 100),
            instance_at("late", "ok2", ok2.addr, "1", 100),
            instance_at("late", "resets", late, "1", 100),
        ],
        |_| {},
    )
    .await;
    let http = http_client();
    for _ in 0..30 {
        let (status, body, _) = get(&http, s.proxy, "early").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    assert!(
        early_hits.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "some GETs drew the resetting endpoint first"
    );
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(&m, "switchyard_sidecar_retries_total", "service=\"early\"") >= 1.0,
        "{m}"
    );

    // Mid-response: the caller sees a broken answer, never a second copy of it.
    let client = body_client();
    let mut broken = 0;
    for _ in 0..30 {
        let req = hyper::Request::builder()
            .uri(format!("http://{}/hello", s.proxy))
            .header(hyper::header::HOST, "late")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let Ok(resp) = client.request(req).await else {
            broken += 1;
            continue;
        };
        if resp.into_body().collect().await.is_err() {
            broken += 1;
        }
        if late_hits.load(std::sync::atomic::Ordering::Relaxed) >= 5 {
            break;
        }
    }
    let late_hits = late_hits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        late_hits >= 1,
        "some GETs drew the endpoint that breaks mid-answer"
    );
    assert_eq!(
        broken, late_hits,
        "each such answer broke, none was retried"
    );
    s.stop().await;
}

/// A body of unknown length (chunked, as gRPC and streaming clients send) that is all
/// there is kept for a retry too: a refused connection is retried on another endpoint.
#[tokio::test]
async fn a_small_chunked_post_is_retried_on_a_refused_connection() {
    let ok = Backend::start("ok", Duration::ZERO).await;
    let refused = refusing_addr().await;
    let s = setup(
        vec![
            instance_at("chunked", "ok", ok.addr, "1", 100),
            instance_at("chunked", "gone", refused, "1", 100),
        ],
        |_| {},
    )
    .await;
    type Chunked = http_body_util::StreamBody<
        tokio_stream::Iter<
            std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;
    let client: Client<HttpConnector, Chunked> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    for i in 0..20 {
        let frames = vec![
            Ok(hyper::body::Frame::data(Bytes::from_static(b"order="))),
            Ok(hyper::body::Frame::data(Bytes::from(i.to_string()))),
        ];
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{}/orders", s.proxy))
            .header(hyper::header::HOST, "chunked")
            .body(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
            .expect("request");
        let resp = client.request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "request {i}");
    }
    assert_eq!(ok.hits(), 20);
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(
            &m,
            "switchyard_sidecar_retries_total",
            "reason=\"connect-failure\""
        ) >= 1.0,
        "{m}"
    );
    s.stop().await;
}

/// An HTTP/2 server that refuses every stream (REFUSED_STREAM: the request was never
/// processed, RFC 9113 §8.7).
async fn refusing_streams() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = refused.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused)
}

/// A refused HTTP/2 stream never reached the app: a gRPC call (a POST) is retried on
/// another endpoint, whatever its method.
#[tokio::test]
async fn a_refused_stream_is_retried_for_a_post() {
    let ok = Backend::start("ok", Duration::ZERO).await;
    let (refusing, refused) = refusing_streams().await;
    let s = setup(
        vec![
            instance_at("h2", "ok", ok.addr, "1", 100),
            instance_at("h2", "refuses", refusing, "1", 100),
        ],
        |_| {},
    )
    .await;
    // h2c with :authority "h2" (the service), over a connection to the proxy.
    let tcp = tokio::net::TcpStream::connect(s.proxy)
        .await
        .expect("connect");
    let (mut h2c, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    for i in 0..20 {
        let req = hyper::Request::builder()
            .method("POST")
            .uri("http://h2/orders.Orders/Place")
            // gRPC goes upstream over HTTP/2 (other h2c requests as HTTP/1.1).
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        h2c = h2c.ready().await.expect("ready");
        let (resp, mut send) = h2c.send_request(req, false).expect("send");
        send.send_data(Bytes::from_static(b"order=1"), true)
            .expect("body");
        let resp = resp.await.expect("response");
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("chunk");
            let _ = body.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        assert_eq!(
            (status, String::from_utf8_lossy(&text).as_ref()),
            (200, "ok"),
            "request {i}"
        );
    }
    assert!(
        refused.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "some POSTs drew the refusing endpoint first"
    );
    let m = metrics(&s.sidecar).await;
    assert!(
        metric_sum(
            &m,
            "switchyard_sidecar_retries_total",
            "reason=\"refused-stream\""
        ) >= 1.0,
        "{m}"
    );
    s.stop().await;
}

/// An upstream connection left unused for `upstream_idle_timeout` is closed (the
/// service's open-connection count, which the pool's connector keeps, falls to 0).
#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    let ok = Backend::start("ok", Duration::ZERO).await;
    let s = setup(vec![instance_at("idle", "ok", ok.addr, "1", 100)], |c| {
        c.upstream_idle_timeout = Duration::from_millis(300);
    })
    .await;
    assert_eq!(get(&http_client(), s.proxy, "idle").await.0, 200);
    let view = s.sidecar.table.get("idle").expect("view");
    assert_eq!(view.limits.conns.open(), 1, "pooled after the request");
    eventually(Duration::from_secs(5), || async {
        (view.limits.conns.open() == 0).then_some(())
    })
    .await;
    s.stop().await;
}
