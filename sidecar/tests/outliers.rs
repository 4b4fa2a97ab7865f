//! Outlier detection, panic mode and slow start against real servers: backends that
//! fail most requests, a probation probe, FAILING endpoints that panic mode still uses,
//! and a new endpoint ramping up. The catalog comes from a fake registry, so a test can
//! add endpoints and flip their state without Raft.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use switchyard_proto::v1 as pb;
use switchyard_sidecar::SidecarHandle;

const WAIT: Duration = Duration::from_secs(10);

/// An HTTP server that answers 503 to nine requests in ten (200 to every tenth).
struct Flaky {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn flaky() -> Flaky {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hits = counted.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let n = hits.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"flaky")));
                        if n % 10 != 9 {
                            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Flaky { addr, hits }
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

fn ejected(sidecar: &SidecarHandle, service: &str) -> Vec<String> {
    sidecar.table.get(service).map_or_else(Vec::new, |v| {
        v.endpoints
            .iter()
            .filter(|e| e.live.is_ejected())
            .map(|e| e.id.clone())
            .collect()
    })
}

/// Ten endpoints, five failing 90 % of requests: the failure-percentage check (with the
/// consecutive rule out of reach) ejects them worst first, but only up to the cap:
/// 10 % of ten is one. The other four keep their traffic; nothing panics.
#[tokio::test]
async fn failure_percentage_ejects_no_more_than_the_cap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut instances = Vec::new();
    for n in 0..5 {
        let b = Backend::start(&format!("good-{n}"), Duration::ZERO).await;
        instances.push(instance_at("web", &format!("good-{n}"), b.addr, "1", 100));
        good.push(b);
        let f = flaky().await;
        instances.push(instance_at("web", &format!("bad-{n}"), f.addr, "1", 100));
        bad.push(f);
    }
    fake.upsert(instances);
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    config.outlier.interval = Duration::from_millis(500);
    // Only the percentage rule may eject here, and a 503 is answered, not retried.
    config.resilience.eject_after = 1_000_000;
    config.resilience.retries = 0;
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 10).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();

    // Traffic until the check has run over intervals with enough volume (50 per
    // endpoint), then three intervals more: the cap must hold through all of them.
    let started = Instant::now();
    let mut first_ejection: Option<Instant> = None;
    while first_ejection.is_none_or(|t| t.elapsed() < Duration::from_millis(1_500)) {
        assert!(started.elapsed() < WAIT, "no ejection within {WAIT:?}");
        for _ in 0..50 {
            get(&http, proxy, "web").await;
        }
        if first_ejection.is_none() && !ejected(&sidecar, "web").is_empty() {
            first_ejection = Some(Instant::now());
        }
    }
    let out = ejected(&sidecar, "web");
    assert_eq!(out.len(), 1, "the cap is one of ten: {out:?}");
    assert!(out[0].starts_with("bad-"), "{out:?}");
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_sidecar_ejections_total",
            "kind=\"failure-percentage\""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_sidecar_ejections_total",
            "kind=\"consecutive\""
        ),
        0.0
    );
    assert_eq!(
        metric_sum(&text, "switchyard_sidecar_panic_mode", "service=\"web\""),
        0.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_sidecar_ejected_endpoints",
            "service=\"web\""
        ),
        1.0
    );
    // The ejected one gets nothing more; the other failing ones still get traffic.
    let index: usize = out[0]["bad-".len()..].parse().expect("index");
    let frozen = bad[index].hits.load(Ordering::Relaxed);
    let others: usize = (0..5)
        .filter(|&i| i != index)
        .map(|i| bad[i].hits.load(Ordering::Relaxed))
        .sum();
    for _ in 0..200 {
        get(&http, proxy, "web").await;
    }
    assert_eq!(bad[index].hits.load(Ordering::Relaxed), frozen);
    let later: usize = (0..5)
        .filter(|&i| i != index)
        .map(|i| bad[i].hits.load(Ordering::Relaxed))
        .sum();
    assert!(later > others, "{others} → {later}");
    assert!(good.iter().all(|g| g.hits() > 0));
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// Probation: an ejected endpoint is tried again by exactly one request once its
/// ejection time is up. A failed probe ejects it again (for longer); a good one brings
/// it back into rotation.
#[tokio::test]
async fn an_ejected_endpoint_returns_after_one_successful_probe() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let a = Backend::start("a", Duration::ZERO).await;
    let b = Backend::start("b", Duration::ZERO).await;
    let bad = Backend::start("bad", Duration::ZERO).await;
    bad.status.store(500, Ordering::Relaxed);
    fake.upsert(vec![
        instance_at("web", "a", a.addr, "1", 100),
        instance_at("web", "b", b.addr, "1", 100),
        instance_at("web", "bad", bad.addr, "1", 100),
    ]);
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    config.outlier.base_ejection = Duration::from_millis(300);
    config.outlier.max_ejection = Duration::from_secs(5);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 3).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();

    eventually(WAIT, || async {
        get(&http, proxy, "web").await;
        (!ejected(&sidecar, "web").is_empty()).then_some(())
    })
    .await;
    assert_eq!(bad.hits(), 5, "five 500s in a row eject it");
    // Its time runs out while traffic flows: one probe, which fails.
    eventually(WAIT, || async {
        get(&http, proxy, "web").await;
        (bad.hits() > 5).then_some(())
    })
    .await;
    assert_eq!(bad.hits(), 6, "exactly one probe");
    let live = sidecar
        .table
        .get("web")
        .and_then(|v| {
            v.endpoints
                .iter()
                .find(|e| e.id == "bad")
                .map(|e| e.live.clone())
        })
        .expect("endpoint");
    assert!(live.is_ejected(), "a failed probe ejects again");
    assert_eq!(live.ejections.load(Ordering::Relaxed), 2);
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_sidecar_ejections_total",
            "kind=\"probe-failed\""
        ),
        1.0,
        "{text}"
    );

    // Fixed: the next probe succeeds and it serves again.
    bad.status.store(200, Ordering::Relaxed);
    eventually(WAIT, || async {
        get(&http, proxy, "web").await;
        (!live.is_ejected()).then_some(())
    })
    .await;
    let back = bad.hits();
    for _ in 0..60 {
        let (status, _, _) = get(&http, proxy, "web").await;
        assert_eq!(status, 200);
    }
    assert!(
        bad.hits() > back + 5,
        "in rotation again: {back} → {}",
        bad.hits()
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// Panic mode: three of four endpoints FAILING (25 % usable, below 50 %) → traffic
/// spreads over all four, the metric and the explanation say so. With the service's
/// policy setting panic to 0 and none usable, the answer is 503 "no healthy upstream".
#[tokio::test]
async fn below_half_usable_traffic_spreads_over_all_and_panic_zero_refuses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let mut backends = Vec::new();
    let mut instances = Vec::new();
    for n in 0..4 {
        let b = Backend::start(&format!("e{n}"), Duration::ZERO).await;
        let mut i = instance_at("web", &format!("e{n}"), b.addr, "1", 100);
        if n > 0 {
            i.state = pb::State::Failing as i32;
        }
        instances.push(i);
        backends.push(b);
    }
    fake.upsert(instances.clone());
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "web", 4).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();
    for _ in 0..400 {
        let (status, _, _) = get(&http, proxy, "web").await;
        assert_eq!(status, 200);
    }
    for b in &backends {
        assert!(b.hits() > 50, "{}: {} of 400", b.name, b.hits());
    }
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_sum(&text, "switchyard_sidecar_panic_mode", "service=\"web\""),
        1.0,
        "{text}"
    );
    let req = hyper::Request::builder()
        .uri(format!("http://{proxy}/hello"))
        .header(hyper::header::HOST, "web")
        .header("x-switchyard-explain", "1")
        .body(http_body_util::Empty::new())
        .expect("request");
    let resp = http.request(req).await.expect("response");
    let why = resp.headers()["x-switchyard-explain"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(why.contains("panic: 1 of 4 endpoints usable"), "{why}");

    // Panic off for this service, and the last SERVING one FAILING too: refused.
    fake.set_policy(
        "web",
        Some(pb::Policy {
            resilience: Some(pb::Resilience {
                panic_below_percent: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let mut last = instances[0].clone();
    last.state = pb::State::Failing as i32;
    fake.upsert(vec![last]);
    eventually(WAIT, || async {
        let v = sidecar.table.get("web")?;
        (v.resilience.settings.panic_below_percent == 0 && v.pool.is_empty()).then_some(())
    })
    .await;
    let (status, body, _) = get(&http, proxy, "web").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no healthy upstream"), "{body}");
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// Slow start: an endpoint added to a serving service takes a growing share over its
/// 2 s window (shares per 500 ms grow; no exact numbers), while the gauge counts it.
#[tokio::test]
async fn a_new_endpoint_ramps_up_over_its_slow_start_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let old = Backend::start("old", Duration::ZERO).await;
    let new = Backend::start("new", Duration::ZERO).await;
    fake.upsert(vec![instance_at("web", "old", old.addr, "1", 100)]);
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    config.resilience.slow_start = Duration::from_secs(2);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();
    get(&http, proxy, "web").await;

    fake.upsert(vec![instance_at("web", "new", new.addr, "1", 100)]);
    wait_endpoints(&sidecar, "web", 2).await;
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_sidecar_slow_start_endpoints",
            "service=\"web\""
        ),
        1.0,
        "{text}"
    );
    // The new endpoint's share of each 500 ms of traffic, over 2.5 s.
    let mut shares = Vec::new();
    let started = Instant::now();
    for bucket in 1..=5u32 {
        let (old0, new0) = (old.hits(), new.hits());
        while started.elapsed() < Duration::from_millis(500) * bucket {
            get(&http, proxy, "web").await;
        }
        let (o, n) = (old.hits() - old0, new.hits() - new0);
        shares.push(n as f64 / (o + n).max(1) as f64);
    }
    assert!(
        shares[0] < 0.35,
        "the first half second is near the 10 % floor: {shares:?}"
    );
    assert!(
        shares[3] > shares[0] + 0.1,
        "the share grows over the window: {shares:?}"
    );
    assert!(shares[4] > 0.35, "after the window, about half: {shares:?}");
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_sidecar_slow_start_endpoints",
            "service=\"web\""
        ),
        0.0,
        "{text}"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// An endpoint that comes back to SERVING through the catalog (its own health check
/// passed again) is no longer ejected and ramps up like a new one.
#[tokio::test]
async fn serving_again_via_the_catalog_ends_an_ejection_and_ramps() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let a = Backend::start("a", Duration::ZERO).await;
    let bad = Backend::start("bad", Duration::ZERO).await;
    bad.status.store(500, Ordering::Relaxed);
    let good = instance_at("web", "a", a.addr, "1", 100);
    let flaky = instance_at("web", "bad", bad.addr, "1", 100);
    fake.upsert(vec![good, flaky.clone()]);
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    config.resilience.slow_start = Duration::from_secs(30);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 2).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();
    eventually(WAIT, || async {
        get(&http, proxy, "web").await;
        (!ejected(&sidecar, "web").is_empty()).then_some(())
    })
    .await;
    // Its health check fails (FAILING), then passes again (SERVING).
    bad.status.store(200, Ordering::Relaxed);
    fake.upsert(vec![pb::Instance {
        state: pb::State::Failing as i32,
        ..flaky.clone()
    }]);
    eventually(WAIT, || async {
        sidecar
            .table
            .get("web")
            .filter(|v| v.pool.usable.len() == 1)
            .map(|_| ())
    })
    .await;
    fake.upsert(vec![flaky]);
    let live = eventually(WAIT, || async {
        let v = sidecar.table.get("web")?;
        let e = v.endpoints.iter().find(|e| e.id == "bad")?;
        (e.state == switchyard_core::model::State::Serving).then(|| e.live.clone())
    })
    .await;
    assert!(!live.is_ejected(), "SERVING again: not an outlier any more");
    assert!(live.ramp_since_ms.load(Ordering::Relaxed) != 0, "ramping");
    let before = bad.hits();
    for _ in 0..200 {
        get(&http, proxy, "web").await;
    }
    assert!(bad.hits() > before, "it gets traffic again");
    sidecar.shutdown().await;
    fake.shutdown().await;
}
