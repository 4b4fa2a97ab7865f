//! Per-version health end to end: a sidecar proxies to two versions of a service, a
//! real registry takes its windows, and `Telemetry/Top` shows per attempt what each
//! version's backends saw, including a canary's errors a retry hid from the caller.

mod support;

use std::time::Duration;

use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::telemetry_client::TelemetryClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    _dir: tempfile::TempDir,
    registry: switchyard_registry::RegistryHandle,
    sidecar: switchyard_sidecar::SidecarHandle,
    stable: Backend,
    canary: Backend,
}

/// `web` 1.0 answers 200, `web` 2.0 answers 503; the sidecar reports every 200 ms.
async fn setup(retries: u32) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let url = format!("http://{}", registry.grpc_addr);
    let mut client = registry_client(&registry).await;
    let stable = Backend::start("stable", Duration::ZERO).await;
    let canary = Backend::start("canary", Duration::ZERO).await;
    canary
        .status
        .store(503, std::sync::atomic::Ordering::Relaxed);
    register_at(&mut client, "web", "stable", stable.addr, "1.0", 100).await;
    register_at(&mut client, "web", "canary", canary.addr, "2.0", 100).await;
    let mut config = sidecar_config(vec![url], dir.path());
    config.telemetry.interval = Duration::from_millis(200);
    config.resilience.retries = retries;
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 2).await;
    Setup {
        _dir: dir,
        registry,
        sidecar,
        stable,
        canary,
    }
}

async fn top(s: &Setup) -> Vec<pb::VersionTop> {
    top_of(&s.registry, "web").await
}

async fn top_of(
    registry: &switchyard_registry::RegistryHandle,
    service: &str,
) -> Vec<pb::VersionTop> {
    let mut c = TelemetryClient::connect(format!("http://{}", registry.grpc_addr))
        .await
        .expect("connect");
    c.top(pb::TopRequest {
        namespace: String::new(),
        service: service.into(),
        window_seconds: 0,
    })
    .await
    .expect("top")
    .into_inner()
    .versions
}

/// (requests, errors) of `version` in `top`, zeros when absent.
fn of(top: &[pb::VersionTop], version: &str) -> (u64, u64) {
    top.iter()
        .find(|v| v.version == version)
        .map_or((0, 0), |v| (v.requests, v.errors))
}

#[tokio::test]
async fn top_shows_per_version_requests_and_errors_as_the_backends_saw_them() {
    let s = setup(0).await;
    let http = http_client();
    let mut seen_503 = 0u64;
    for _ in 0..40 {
        let (status, _, _) = get(&http, s.sidecar.http_proxy_addr.expect("proxy"), "web").await;
        if status == 503 {
            seen_503 += 1;
        }
    }
    let (stable, canary) = (s.stable.hits() as u64, s.canary.hits() as u64);
    assert!(
        canary >= 1 && stable >= 1,
        "both versions were tried: {stable}, {canary}"
    );
    // No retries: the caller saw each canary error.
    assert_eq!(seen_503, canary);
    let t = eventually(Duration::from_secs(5), || async {
        let t = top(&s).await;
        (of(&t, "1.0") == (stable, 0) && of(&t, "2.0") == (canary, canary)).then_some(t)
    })
    .await;
    let c = t.iter().find(|v| v.version == "2.0").expect("canary row");
    assert!((c.error_rate - 1.0).abs() < 1e-9);
    assert!(c.p99_ms > 0.0 && c.p99_ms <= 1_000.0, "{}", c.p99_ms);
    // The registry exports the same counts to Prometheus.
    let m = http_get(s.registry.http_addr, "/metrics").await.1;
    assert!(
        m.contains(&format!(
            "switchyard_registry_telemetry_errors_total{{namespace=\"default\",service=\"web\",version=\"2.0\"}} {canary}"
        )),
        "{m}"
    );
    s.sidecar.shutdown().await;
}

#[tokio::test]
async fn a_canary_error_hidden_by_a_retry_to_stable_still_counts_against_the_canary() {
    let s = setup(1).await;
    let http = http_client();
    for _ in 0..40 {
        let (status, body, _) = get(&http, s.sidecar.http_proxy_addr.expect("proxy"), "web").await;
        // Every canary 503 was retried on stable: the caller never sees one.
        assert_eq!(status, 200, "{body}");
    }
    let (stable, canary) = (s.stable.hits() as u64, s.canary.hits() as u64);
    assert!(canary >= 1, "the canary was tried");
    // Per attempt: stable answered the 40 requests' last attempts, the canary's
    // attempts are all errors.
    assert_eq!(stable, 40);
    eventually(Duration::from_secs(5), || async {
        let t = top(&s).await;
        (of(&t, "1.0") == (stable, 0) && of(&t, "2.0") == (canary, canary)).then_some(())
    })
    .await;
    s.sidecar.shutdown().await;
}

#[tokio::test]
async fn a_tcp_upstream_counts_each_connection_and_a_refused_connect_as_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let mut client = registry_client(&registry).await;
    let live = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let live_addr = live.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = live.accept().await {
            let _ = s.write_all(b"hi").await;
        }
    });
    // Bound, then closed: connecting is refused.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gone_addr = gone.local_addr().expect("addr");
    drop(gone);
    register_at(&mut client, "db", "live", live_addr, "1", 100).await;
    register_at(&mut client, "db", "gone", gone_addr, "2", 100).await;
    let mut config = sidecar_config(vec![format!("http://{}", registry.grpc_addr)], dir.path());
    config.telemetry.interval = Duration::from_millis(200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sidecar = start_sidecar_with(
        config,
        Upstreams {
            tcp: vec![("db".into(), listener)],
            http: vec![],
        },
    )
    .await;
    wait_endpoints(&sidecar, "db", 2).await;
    let addr = sidecar.upstream_addrs[0].1;
    let mut answered = 0u64;
    for _ in 0..10 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        if buf == b"hi" {
            answered += 1;
        }
    }
    // A refused connect is retried on the live endpoint, so every connection is
    // answered; each refused attempt still counts as an error of version 2.
    assert_eq!(answered, 10);
    eventually(Duration::from_secs(5), || async {
        let t = top_of(&registry, "db").await;
        let (ok, ok_errors) = of(&t, "1");
        let (bad, bad_errors) = of(&t, "2");
        (ok == answered && ok_errors == 0 && bad >= 1 && bad_errors == bad).then_some(())
    })
    .await;
    sidecar.shutdown().await;
}

#[tokio::test]
async fn reports_fail_over_to_the_next_registry_when_one_is_down() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let mut client = registry_client(&registry).await;
    let stable = Backend::start("stable", Duration::ZERO).await;
    register_at(&mut client, "web", "stable", stable.addr, "1.0", 100).await;
    // The first registry in the list refuses connections.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gone_url = format!("http://{}", gone.local_addr().expect("addr"));
    drop(gone);
    let mut config = sidecar_config(
        vec![gone_url, format!("http://{}", registry.grpc_addr)],
        dir.path(),
    );
    config.telemetry.interval = Duration::from_millis(200);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 1).await;
    let http = http_client();
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    // Traffic in more than one window: a window sent to the dead registry is lost
    // (evidence, not correctness), the next ones reach the live one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = get(&http, proxy, "web").await;
        assert_eq!(status, 200);
        let t = top_of(&registry, "web").await;
        if of(&t, "1.0").0 > 0 {
            assert!(of(&t, "1.0").0 <= stable.hits() as u64);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no window reached the live registry"
        );
        // Pace of the traffic while waiting for a window (the sidecar's 200 ms clock).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first window went to the dead registry: its attempts are counted as dropped.
    let m = http_get(sidecar.admin_addr, "/metrics").await.1;
    let unsent: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("switchyard_sidecar_telemetry_dropped_total{reason=\"unsent\"} ")
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        unsent >= 1
            && unsent + of(&top_of(&registry, "web").await, "1.0").0 <= stable.hits() as u64,
        "{m}"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_sidecar_shut_down_right_after_traffic_still_reports_its_last_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let mut client = registry_client(&registry).await;
    let stable = Backend::start("stable", Duration::ZERO).await;
    register_at(&mut client, "web", "stable", stable.addr, "1.0", 100).await;
    let mut config = sidecar_config(vec![format!("http://{}", registry.grpc_addr)], dir.path());
    // No window would end during the test: only the flush at shutdown can deliver.
    config.telemetry.interval = Duration::from_secs(3600);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "web", 1).await;
    let http = http_client();
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    for _ in 0..7 {
        let (status, _, _) = get(&http, proxy, "web").await;
        assert_eq!(status, 200);
    }
    assert_eq!(of(&top_of(&registry, "web").await, "1.0"), (0, 0));
    sidecar.shutdown().await;
    // Shutdown returns once the last window was sent (and acknowledged).
    assert_eq!(of(&top_of(&registry, "web").await, "1.0"), (7, 0));
}

/// An h2c server answering every request as gRPC: one message, then `grpc-status` =
/// the code asked for in the `x-code` request header, in the trailers.
async fn grpc_trailers_server() -> std::net::SocketAddr {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let code = req
                            .headers()
                            .get("x-code")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("0")
                            .to_string();
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", code.parse().expect("header value"));
                        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                            Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(tokio_stream::iter(frames));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .expect("response"),
                        )
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_grpc_status_in_the_trailers_counts_when_it_is_a_server_error() {
    use http_body_util::{BodyExt, Empty};
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let mut client = registry_client(&registry).await;
    let server = grpc_trailers_server().await;
    register_at(&mut client, "rpc", "rpc-1", server, "1", 100).await;
    let mut config = sidecar_config(vec![format!("http://{}", registry.grpc_addr)], dir.path());
    config.telemetry.interval = Duration::from_millis(200);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "rpc", 1).await;
    let stream = tokio::net::TcpStream::connect(sidecar.http_proxy_addr.expect("proxy"))
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    // INTERNAL and UNAVAILABLE are errors of the server; NOT_FOUND and OK are not.
    for code in ["13", "5", "0", "14"] {
        let req = hyper::Request::builder()
            .method("POST")
            .uri("http://rpc/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-code", code)
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let body = resp.into_body().collect().await.expect("body");
        let seen = body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(seen.as_deref(), Some(code), "the trailers reach the caller");
    }
    eventually(Duration::from_secs(5), || async {
        (of(&top_of(&registry, "rpc").await, "1") == (4, 2)).then_some(())
    })
    .await;
    sidecar.shutdown().await;
}
