//! The HTTP proxy against hostile callers (issue 13, points 7, 8 and 11): idle and
//! half-sent connections are closed and cannot lock new clients out, a broken request
//! body is the caller's 400 and never ejects an endpoint, and the framing rules (one
//! Host; `Connection` cannot remove Host or X-Forwarded-For) hold.
//!
//! At shutdown, idle connections close at once and a request in flight is answered.
//!
//! Self-contained: the few lines of setup it needs are copied here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_registry::{Listeners, RegistryConfig, RegistryHandle};
use switchyard_sidecar::{SidecarConfig, SidecarHandle, SidecarListeners};
use switchyard_testkit::raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A registry, one backend registered as `web`, and a sidecar routing to it.
struct Setup {
    _dir: tempfile::TempDir,
    registry: RegistryHandle,
    sidecar: SidecarHandle,
    proxy: SocketAddr,
    backend: Backend,
}

impl Setup {
    async fn new(tune: impl FnOnce(&mut SidecarConfig)) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = switchyard_registry::start(
            RegistryConfig::new(dir.path().join("reg")),
            Listeners {
                grpc: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                peer: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                http: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                dns: None,
            },
        )
        .await
        .expect("registry starts");
        let backend = Backend::start().await;
        register(&registry, backend.addr).await;
        let mut config = SidecarConfig::new(vec![format!("http://{}", registry.grpc_addr)]);
        config.discovery.backoff_max = Duration::from_millis(500);
        tune(&mut config);
        let sidecar = start_sidecar(config, dir.path()).await;
        let proxy = sidecar.http_proxy_addr.expect("proxy");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sidecar.table.get("web").map_or(0, |v| v.endpoints.len()) != 1 {
            assert!(Instant::now() < deadline, "the sidecar never saw web");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Setup {
            _dir: dir,
            registry,
            sidecar,
            proxy,
            backend,
        }
    }

    async fn stop(self) {
        self.sidecar.shutdown().await;
        self.registry.shutdown().await;
    }
}

async fn start_sidecar(config: SidecarConfig, _dir: &Path) -> SidecarHandle {
    switchyard_sidecar::start(
        config,
        SidecarListeners {
            workers: Vec::new(),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            http_proxy: Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            upstreams: vec![],
            http_upstreams: vec![],
            dns: None,
            inbound: None,
        },
    )
    .await
    .expect("sidecar starts")
}

async fn register(registry: &RegistryHandle, addr: SocketAddr) {
    let mut client = RegistryClient::connect(format!("http://{}", registry.grpc_addr))
        .await
        .expect("connect registry");
    client
        .register(pb::RegisterRequest {
            instance: Some(pb::Instance {
                namespace: String::new(),
                service: "web".into(),
                id: "web-1".into(),
                address: addr.ip().to_string(),
                port: u32::from(addr.port()),
                version: "1".into(),
                labels: Default::default(),
                weight: 100,
                zone: String::new(),
                state: 0,
                mesh_port: 0,
            }),
            ttl_seconds: 60,
            lease_id: 0,
        })
        .await
        .expect("register");
}

/// An HTTP/1.1 + h2c backend that reads the whole request body, then answers with
/// the Host and X-Forwarded-For it saw; `/slow` answers after 700 ms.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let counted = counted.clone();
                        async move {
                            counted.fetch_add(1, Ordering::Relaxed);
                            let seen = |name: &str| {
                                req.headers()
                                    .get_all(name)
                                    .iter()
                                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                    .collect::<Vec<_>>()
                                    .join(" | ")
                            };
                            let text =
                                format!("host={};xff={}", seen("host"), seen("x-forwarded-for"));
                            let slow = req.uri().path() == "/slow";
                            let dated = req.uri().path() == "/dated";
                            let ok = req.into_body().collect().await.is_ok();
                            if slow {
                                tokio::time::sleep(Duration::from_millis(700)).await;
                            }
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
                            if !ok {
                                *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
                            }
                            if dated {
                                resp.headers_mut().insert(
                                    "date",
                                    hyper::header::HeaderValue::from_static(APP_DATE),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    // No `Date` unless a handler sets one (`/dated`), so what the
                    // proxy adds shows.
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http1().auto_date_header(false);
                    builder.http2().auto_date_header(false);
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Backend { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

/// The `Date` the backend sends on `/dated` (and only there).
const APP_DATE: &str = "Mon, 01 Jan 2001 00:00:00 GMT";

fn get(extra_headers: &str) -> String {
    format!("GET /hello HTTP/1.1\r\n{extra_headers}Connection: close\r\n\r\n")
}

/// An h2c (prior knowledge) connection to `proxy`, driven by its own task.
async fn h2c(
    proxy: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

/// One `GET /hello` to `web` on an h2c connection, its body read: the status.
async fn h2_get(sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>) -> u16 {
    let req = hyper::Request::builder()
        .uri("http://web/hello")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await.expect("body");
    status
}

/// How long until the peer closes `s` (reads return 0 or fail), at most `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            s.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A kept-alive HTTP/1.1 connection through `proxy` that has had one answer (200).
async fn kept_alive(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

// Point 7: the limit is lowered to 50 and 300 sockets that never send a byte are
// opened; a real client still gets through (the oldest idle sockets make room), and
// most of the idle ones are closed.
#[tokio::test]
async fn a_flood_of_idle_sockets_does_not_lock_new_clients_out() {
    let setup = Setup::new(|c| {
        c.max_connections = 50;
        // Long timeouts: only eviction can make room here.
        c.idle_timeout = Duration::from_secs(60);
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(setup.proxy).await.expect("connect"));
    }
    // Until the proxy has accepted them all (the last ones evict earlier ones).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = raw(setup.proxy, &get("Host: web\r\n")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(setup.backend.hits(), 1);
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(50)).await.is_some() {
            closed += 1;
        }
    }
    assert!(
        closed >= 240,
        "only {closed} of 300 idle sockets were closed at a limit of 50"
    );
    // A connection with a request in flight is never the one evicted.
    let slow = tokio::spawn(raw(
        setup.proxy,
        "GET /slow HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..100 {
        idle.push(TcpStream::connect(setup.proxy).await.expect("connect"));
    }
    let (code, body) = slow.await.expect("slow request");
    assert_eq!(code, 200, "{body}");
    drop(idle);
    setup.stop().await;
}

// Point 7: the HTTP/1 header-read timeout closes a connection that sends half a
// request head (the idle timeout is long, so it is not what closes it), also one whose
// head starts like the HTTP/2 preface (`PRI` is an HTTP/1 method) and then trickles.
#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let setup = Setup::new(|c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let openings: [&[&[u8]]; 2] = [
        &[b"GET /hello HTTP/1.1\r\nHost: web\r\nX-Slow: "],
        &[b"PRI", b" /hello HTTP/1.1\r\nHost: web\r\nX-Slow: "],
    ];
    for writes in openings {
        let started = Instant::now();
        let mut s = TcpStream::connect(setup.proxy).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        for w in writes {
            s.write_all(w).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed_within(&mut s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{writes:?}: not closed within 5 s"));
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(250),
            "{writes:?}: closed after {after:?}"
        );
    }
    assert_eq!(setup.backend.hits(), 0);
    setup.stop().await;
}

// Point 7: with no request in flight for the idle timeout, a connection is closed:
// a socket that never sends a byte, a kept-alive HTTP/1.1 connection and an h2c
// connection; a request in flight longer than the idle timeout is not cut.
#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let setup = Setup::new(|c| {
        c.idle_timeout = Duration::from_millis(300);
        // Long, so the HTTP/1 closes below are the idle timeout's.
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let limit = Duration::from_secs(5);

    let mut silent = TcpStream::connect(setup.proxy).await.expect("connect");
    let after = closed_within(&mut silent, limit)
        .await
        .expect("a silent socket is closed");
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );

    // HTTP/1.1 keep-alive: one request, then nothing.
    let mut h1 = kept_alive(setup.proxy).await;
    assert!(
        closed_within(&mut h1, limit).await.is_some(),
        "an idle HTTP/1.1 connection is closed"
    );

    // h2c: one request, then nothing; the connection ends (GOAWAY, then close).
    let (mut sender, conn) = h2c(setup.proxy).await;
    assert_eq!(h2_get(&mut sender).await, 200);
    tokio::time::timeout(limit, conn)
        .await
        .expect("an idle h2c connection is closed")
        .expect("join")
        .ok();

    // A request slower than the idle timeout is not an idle connection.
    let (code, body) = raw(
        setup.proxy,
        "GET /slow HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    setup.stop().await;
}

// Point 8: a request body with a bad chunk header is the caller's error: 400, never
// counted against the endpoint (six of them would have ejected it), and the next good
// request is served by the same endpoint.
#[tokio::test]
async fn a_malformed_request_body_is_a_400_and_does_not_eject_the_endpoint() {
    let setup = Setup::new(|_| {}).await;
    let bad = "POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\
               Connection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    for i in 0..6 {
        let (code, body) = raw(setup.proxy, bad).await;
        assert_eq!(code, 400, "request {i}: {body}");
        assert!(body.contains("request body"), "request {i}: {body}");
    }
    let view = setup.sidecar.table.get("web").expect("web");
    let live = &view.endpoints[0].live;
    assert!(
        !live.is_ejected(),
        "a bad caller ejected a healthy endpoint"
    );
    assert_eq!(live.consecutive_failures.load(Ordering::Relaxed), 0);
    let hits = setup.backend.hits();
    let (code, body) = raw(setup.proxy, &get("Host: web\r\n")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        setup.backend.hits(),
        hits + 1,
        "the good request reached web"
    );
    setup.stop().await;
}

// Point 11: two Host headers are a 400 (RFC 9112 §3.2), whichever names a service.
#[tokio::test]
async fn two_host_headers_are_a_400() {
    let setup = Setup::new(|_| {}).await;
    for hosts in ["Host: web\r\nHost: other\r\n", "Host: web\r\nHost: web\r\n"] {
        let (code, body) = raw(setup.proxy, &get(hosts)).await;
        assert_eq!(code, 400, "{hosts:?}: {body}");
        assert!(body.contains("2 Host headers"), "{body}");
    }
    assert_eq!(setup.backend.hits(), 0, "nothing reached the app");
    let (code, body) = raw(setup.proxy, &get("Host: web\r\n")).await;
    assert_eq!((code, body.as_str()), (200, "host=web;xff=127.0.0.1"));
    setup.stop().await;
}

// Point 11: `Connection` may name hop-by-hop headers, but not Host or X-Forwarded-For.
#[tokio::test]
async fn connection_cannot_remove_host_or_the_forwarded_for_chain() {
    let setup = Setup::new(|_| {}).await;
    let (code, body) = raw(
        setup.proxy,
        "GET /hello HTTP/1.1\r\nHost: web\r\nConnection: close, host\r\n\r\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "host=web;xff=127.0.0.1"));
    let (code, body) = raw(
        setup.proxy,
        "GET /hello HTTP/1.1\r\nHost: web\r\nX-Forwarded-For: 10.0.0.1\r\n\
         Connection: close, X-Forwarded-For\r\n\r\n",
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (200, "host=web;xff=10.0.0.1, 127.0.0.1")
    );
    setup.stop().await;
}

// Shutdown: a kept-alive HTTP/1.1 connection with nothing in flight is closed at once
// (not after the idle timeout or the shutdown grace), and a request in flight is
// answered before its connection is closed.
#[tokio::test]
async fn at_shutdown_idle_connections_close_and_a_request_in_flight_is_answered() {
    let setup = Setup::new(|c| {
        c.idle_timeout = Duration::from_secs(60);
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let limit = Duration::from_secs(5);
    let mut idle = kept_alive(setup.proxy).await;
    let mut busy = TcpStream::connect(setup.proxy).await.expect("connect");
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .expect("write");
    // In flight at the backend (which answers /slow after 700 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let Setup {
        registry, sidecar, ..
    } = setup;
    let stopping = tokio::spawn(sidecar.shutdown());
    let closed = closed_within(&mut idle, limit).await;
    assert!(
        closed.is_some_and(|d| d < Duration::from_millis(600)),
        "the idle connection was closed after {closed:?}, not at once"
    );
    let mut answer = Vec::new();
    let read = tokio::time::timeout(limit, busy.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the busy connection was not closed after its answer"
    );
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    tokio::time::timeout(limit, stopping)
        .await
        .expect("shutdown ends once the request in flight is answered")
        .expect("join");
    registry.shutdown().await;
}

// hyper's header-read timer is replaced by the listener's own, which holds HTTP/1
// connections waiting for a head to the header-read timeout and HTTP/2 ones only to
// the idle timeout: an idle h2c connection outlives the header-read timeout and
// serves another request.
#[tokio::test]
async fn the_header_read_timeout_holds_http1_not_an_idle_h2c_connection() {
    let setup = Setup::new(|c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let mut h1 = kept_alive(setup.proxy).await;
    let after = closed_within(&mut h1, Duration::from_secs(5))
        .await
        .expect("a kept-alive HTTP/1.1 connection waits for a head only so long");
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );

    let (mut sender, conn) = h2c(setup.proxy).await;
    for round in 0..2 {
        assert_eq!(h2_get(&mut sender).await, 200, "round {round}");
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(1_200)).await;
            assert!(
                !conn.is_finished(),
                "an idle h2c connection was closed by the header-read timeout"
            );
        }
    }
    conn.abort();
    setup.stop().await;
}

/// The head of the response to `request` (sent with `Connection: close`), lower-cased
/// names: each header's values in order.
async fn response_head(proxy: SocketAddr, request: &str) -> (u16, Vec<(String, String)>) {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answered and closed in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let head = text
        .split_once("\r\n\r\n")
        .map_or(text.as_str(), |(h, _)| h);
    let mut lines = head.split("\r\n");
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, headers)
}

/// The values of `name` in a head from [`response_head`].
fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

// RFC 9110 §6.6.1: the app's own `Date` is passed on as it is, once; a response
// without one, and the sidecar's own answers, get a current one (hyper's automatic
// date is off: it read the clock for every response).
#[tokio::test]
async fn responses_carry_the_apps_date_or_a_current_one() {
    let setup = Setup::new(|_| {}).await;
    let current = |headers: &[(String, String)], what: &str| {
        let dates = values(headers, "date");
        assert_eq!(dates.len(), 1, "{what}: {headers:?}");
        let at = httpdate::parse_http_date(dates[0]).expect("an HTTP date");
        let off = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        assert!(off < Duration::from_secs(5), "{what}: {dates:?}");
    };

    let (code, headers) = response_head(
        setup.proxy,
        "GET /dated HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(values(&headers, "date"), vec![APP_DATE], "{headers:?}");

    let (code, headers) = response_head(setup.proxy, &get("Host: web\r\n")).await;
    assert_eq!(code, 200);
    current(&headers, "an app's response without a Date");

    let (code, headers) = response_head(setup.proxy, &get("Host: nothing-here\r\n")).await;
    assert_eq!(code, 503);
    current(&headers, "the sidecar's own answer");
    setup.stop().await;
}
