//! The HTTP proxy end to end: real backends and a real sidecar, fed its catalog by a
//! fake registry (the proxy needs a catalog, not Raft).

mod support;

use std::time::{Duration, Instant};

use support::*;
use switchyard_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_balanced_and_a_slow_backend_gets_fewer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let fast_a = Backend::start("fast-a", Duration::ZERO).await;
    let fast_b = Backend::start("fast-b", Duration::ZERO).await;
    let slow = Backend::start("slow", Duration::from_millis(40)).await;
    fake.upsert(
        [&fast_a, &fast_b, &slow]
            .iter()
            .map(|b| instance_at("web", &b.name, b.addr, "1.0.0", 100))
            .collect(),
    );
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "web", 3).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");

    // 8 concurrent clients, 50 requests each.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let http = http_client();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let (status, _, _) = get(&http, proxy, "web").await;
                assert_eq!(status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let fast = (fast_a.hits() + fast_b.hits()) / 2;
    assert_eq!(fast_a.hits() + fast_b.hits() + slow.hits(), 400);
    assert!(
        slow.hits() * 2 < fast,
        "slow {} vs fast {fast}",
        slow.hits()
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn host_forms_headers_and_http2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let backend = Backend::start("one", Duration::ZERO).await;
    fake.upsert(vec![instance_at("web", "one", backend.addr, "1.0.0", 100)]);
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "web", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();
    for host in [
        "web",
        "web:15001",
        "web.service.switchyard",
        "WEB.service.switchyard:80",
    ] {
        let (status, body, headers) = get(&http, proxy, host).await;
        assert_eq!((status, body.as_str()), (200, "one"), "{host}");
        assert_eq!(
            headers["x-seen-forwarded-for"], "127.0.0.1",
            "x-forwarded-for added"
        );
    }
    let (status, body, upstream) = h2_get(proxy, "web.service.switchyard").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "one"),
        "h2c on the same port"
    );
    // Only gRPC needs HTTP/2 upstream; other h2c requests reach plain HTTP/1.1 services.
    assert_eq!(
        upstream, "http/1.1",
        "a non-gRPC h2c request goes upstream as HTTP/1.1"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn errors_are_answered_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let slow = Backend::start("slow", Duration::from_millis(2_000)).await;
    let gone = Backend::start("gone", Duration::ZERO).await;
    let gone_addr = gone.addr;
    gone.stop();
    drop(gone);
    fake.upsert(vec![
        instance_at("slow", "slow-1", slow.addr, "1", 100),
        instance_at("down", "down-1", gone_addr, "1", 100),
        pb::Instance {
            state: pb::State::Draining as i32,
            ..instance_at("drained", "d-1", slow.addr, "1", 100)
        },
    ]);
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    config.resilience.timeout = Duration::from_millis(300);
    let sidecar = start_sidecar(config).await;
    wait_endpoints(&sidecar, "drained", 1).await;
    eventually(Duration::from_secs(5), || async {
        sidecar
            .table
            .get("drained")
            .filter(|v| v.pool.is_empty())
            .map(|_| ())
    })
    .await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();

    let (status, body, _) = get(&http, proxy, "nosuch").await;
    assert_eq!(status, 503);
    assert!(body.contains("\"nosuch\""), "{body}");
    let (status, body, _) = get(&http, proxy, "drained").await;
    assert_eq!(status, 503);
    assert!(body.contains("no usable endpoint"), "{body}");
    let (status, body, _) = get(&http, proxy, "Not_A_Service").await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = get(&http, proxy, "example.com").await;
    assert_eq!(status, 400);
    let (status, body, _) = get(&http, proxy, "down").await;
    assert_eq!(status, 502);
    assert!(body.contains("cannot connect"), "{body}");
    let started = Instant::now();
    let (status, body, _) = get(&http, proxy, "slow").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < Duration::from_millis(1_500));

    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(metrics.contains("switchyard_sidecar_local_replies_total{service=\"nosuch\",endpoint=\"\",class=\"5xx\"} 1"), "{metrics}");
    sidecar.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn a_deregistered_backend_stops_getting_traffic_within_a_second() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let a = Backend::start("a", Duration::ZERO).await;
    let b = Backend::start("b", Duration::ZERO).await;
    fake.upsert(vec![
        instance_at("web", "a", a.addr, "1", 100),
        instance_at("web", "b", b.addr, "1", 100),
    ]);
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "web", 2).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();

    fake.remove("web", "b");
    let deregistered = Instant::now();
    // Within a second, a run of 50 requests all land on a.
    loop {
        let before = b.hits();
        for _ in 0..50 {
            assert_eq!(get(&http, proxy, "web").await.0, 200);
        }
        if b.hits() == before {
            break;
        }
        assert!(
            deregistered.elapsed() < Duration::from_secs(1),
            "b still gets traffic"
        );
    }
    println!(
        "deregistered backend out of rotation after {:?}",
        deregistered.elapsed()
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn grpc_calls_work_through_the_sidecar() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    // A real tonic server: the standard health service.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("payments", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    fake.upsert(vec![instance_at("payments", "pay-1", grpc_addr, "1", 100)]);
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "payments", 1).await;

    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .expect("url")
        .origin(
            "http://payments.service.switchyard"
                .parse()
                .expect("origin"),
        )
        .connect()
        .await
        .expect("connect to the sidecar");
    let mut health_client = HealthClient::new(channel);
    for _ in 0..3 {
        let resp = health_client
            .check(HealthCheckRequest {
                service: "payments".into(),
            })
            .await
            .expect("gRPC through the sidecar");
        assert_eq!(
            resp.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    let missing = health_client
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect_err("gRPC status passes through");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// Outlier ejection: an endpoint that answers 5xx five times in a row is passed over
/// (its 5xx still reach the client), the other endpoint takes the traffic, and the
/// ejection is counted in /metrics.
#[tokio::test]
async fn an_endpoint_failing_five_times_in_a_row_is_ejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let good = Backend::start("good", Duration::ZERO).await;
    let bad = Backend::start("bad", Duration::ZERO).await;
    bad.status.store(500, std::sync::atomic::Ordering::Relaxed);
    fake.upsert(vec![
        instance_at("web", "good-1", good.addr, "1", 100),
        instance_at("web", "bad-1", bad.addr, "1", 100),
    ]);
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "web", 2).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();
    let mut fives = 0;
    for _ in 0..200 {
        let (status, _, _) = get(&http, proxy, "web").await;
        if status == 500 {
            fives += 1;
        }
    }
    assert_eq!(bad.hits(), 5, "five 5xx in a row, then no more traffic");
    assert_eq!(fives, 5, "the 5xx themselves reach the client");
    assert_eq!(good.hits(), 195);
    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(
        metrics
            .contains("switchyard_sidecar_ejections_total{service=\"web\",endpoint=\"bad-1\",kind=\"consecutive\"} 1"),
        "{metrics}"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// `--worker-threads 2`: two proxy workers, each with its own `SO_REUSEPORT` socket on
/// the Host-routed and the fixed-upstream address. Connections spread over both (40
/// connections from different source ports all landing on one socket has odds of
/// 2^-39), and every request is answered by whichever worker took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxy_workers_share_each_port_and_both_serve() {
    use switchyard_sidecar::workers::{bind_group, WorkerListeners};

    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let backend = Backend::start("one", Duration::ZERO).await;
    fake.upsert(vec![instance_at("web", "one", backend.addr, "1.0.0", 100)]);
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut by_host = bind_group(any, 2).expect("bind").into_iter();
    let mut fixed = bind_group(any, 2).expect("bind").into_iter();
    let first = |l: Option<std::net::TcpListener>| {
        tokio::net::TcpListener::from_std(l.expect("socket")).expect("tokio listener")
    };
    let (host_first, fixed_first) = (first(by_host.next()), first(fixed.next()));
    let sidecar = switchyard_sidecar::start(
        sidecar_config(vec![fake.url()], dir.path()),
        switchyard_sidecar::SidecarListeners {
            admin: tokio::net::TcpListener::bind(any).await.expect("bind"),
            http_proxy: Some(host_first),
            upstreams: vec![],
            http_upstreams: vec![("web".to_string(), fixed_first)],
            dns: None,
            inbound: None,
            workers: vec![WorkerListeners {
                http_proxy: by_host.next(),
                http_upstreams: vec![("web".to_string(), fixed.next().expect("socket"))],
            }],
        },
    )
    .await
    .expect("sidecar starts");
    wait_endpoints(&sidecar, "web", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let upstream = sidecar.http_upstream_addrs[0].1;

    for (addr, host) in [(proxy, "web"), (upstream, "anything")] {
        for i in 0..40 {
            let head = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let (status, body) = raw(addr, &head).await;
            assert_eq!(
                (status, body.as_str()),
                (200, "one"),
                "connection {i} to {addr}"
            );
        }
    }
    assert_eq!(backend.hits(), 80);
    let (_, text) = http_get(sidecar.admin_addr, "/metrics").await;
    let accepted = |w: &str| {
        let name = format!("switchyard_sidecar_downstream_connections_total{{worker=\"{w}\"}}");
        metric(&text, &name).unwrap_or(0.0)
    };
    assert_eq!(accepted("0") + accepted("1"), 80.0, "{text}");
    assert!(
        accepted("0") > 0.0 && accepted("1") > 0.0,
        "worker 0 took {}, worker 1 {}",
        accepted("0"),
        accepted("1")
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// A keep-alive HTTP/1.1 server on a raw socket that counts the connections it
/// accepted and, with `close_each`, closes every connection right after answering
/// (without saying `Connection: close`, as a server whose keep-alive timeout fires
/// does).
async fn raw_backend(
    close_each: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request: a head, then as many body bytes as it announces.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + length);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(reply).await.is_err() || close_each {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A POST through the proxy on a fresh connection: its status.
async fn post(proxy: std::net::SocketAddr, host: &str) -> u16 {
    let req = format!(
        "POST /orders HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    raw(proxy, &req).await.0
}

/// The sidecar's HTTP/1.1 pool: one upstream connection carries request after request
/// (its body drives it and gives it back), and a connection the server closed while
/// idle is never used for the next request, which gets a new one: a POST (never
/// retried) still succeeds every time.
#[tokio::test]
async fn upstream_connections_are_reused_and_a_closed_idle_one_is_never_taken() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let (keeps, keeps_accepted) = raw_backend(false).await;
    let (closes, closes_accepted) = raw_backend(true).await;
    fake.upsert(vec![
        instance_at("keeps", "k-1", keeps, "1.0.0", 100),
        instance_at("closes", "c-1", closes, "1.0.0", 100),
    ]);
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "keeps", 1).await;
    wait_endpoints(&sidecar, "closes", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");

    for i in 0..20 {
        assert_eq!(post(proxy, "keeps").await, 200, "request {i}");
    }
    assert_eq!(
        keeps_accepted.load(Ordering::Relaxed),
        1,
        "20 requests in turn on one upstream connection"
    );

    for i in 0..10 {
        assert_eq!(post(proxy, "closes").await, 200, "request {i}");
        // Time for the server's FIN to arrive before the next request.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        closes_accepted.load(Ordering::Relaxed),
        10,
        "a new connection each time"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}
