//! Per-upstream listeners, as apps configure them in Consul Connect: TCP with
//! least-connections per connection, and HTTP with no Host header needed. The catalog
//! comes from a fake registry.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A TCP server that answers every read with `name:` + the bytes read.
async fn echo(name: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_upstream_balances_connections_by_least_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    for name in ["e1", "e2", "e3"] {
        fake.upsert(vec![instance_at("echo", name, echo(name).await, "1", 100)]);
    }
    let mut config = sidecar_config(vec![fake.url()], dir.path());
    // Sample (nearly) every endpoint per pick: plain least-connections, no luck involved.
    config.lb.choice_count = 50;
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sidecar = start_sidecar_with(
        config,
        Upstreams {
            tcp: vec![("echo".into(), tcp)],
            http: vec![],
        },
    )
    .await;
    wait_endpoints(&sidecar, "echo", 3).await;
    let listen = sidecar.upstream_addrs[0].1;

    let mut conns = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (name, rest) = reply.split_once(':').expect("name:payload");
        assert_eq!(rest, "ping");
        *seen.entry(name.to_string()).or_insert(0) += 1;
        conns.push(s);
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{seen:?}"
    );
    drop(conns);
    sidecar.shutdown().await;
    fake.shutdown().await;
}

#[tokio::test]
async fn http_upstream_needs_no_host_header() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let backend = Backend::start("pay", Duration::ZERO).await;
    fake.upsert(vec![instance_at(
        "payments",
        "pay-1",
        backend.addr,
        "1",
        100,
    )]);
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sidecar = start_sidecar_with(
        sidecar_config(vec![fake.url()], dir.path()),
        Upstreams {
            tcp: vec![],
            http: vec![("payments".into(), http)],
        },
    )
    .await;
    wait_endpoints(&sidecar, "payments", 1).await;
    let listen = sidecar.http_upstream_addrs[0].1;
    // Host names something else entirely: the listener decides the service.
    let (status, body) = http_get(listen, "/anything").await;
    assert_eq!((status, body.as_str()), (200, "pay"));
    let (status, body, _) = h2_get(listen, "localhost:9191").await;
    assert_eq!((status, body.as_str()), (200, "pay"));

    let (_, endpoints) = http_get(sidecar.admin_addr, "/endpoints").await;
    let doc: serde_json::Value = serde_json::from_str(&endpoints).expect("json");
    assert_eq!(doc["services"][0]["endpoints"][0]["total"], 2);
    assert_eq!(doc["services"][0]["endpoints"][0]["active"], 0);
    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("switchyard_sidecar_requests_total{service=\"payments\",endpoint=\"pay-1\",class=\"2xx\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("switchyard_sidecar_request_duration_seconds_count{service=\"payments\",endpoint=\"pay-1\"} 2"));
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// An address nothing listens on: bound, then closed, so connecting is refused.
async fn refusing_addr() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

async fn tcp_sidecar(
    fake: &FakeRegistry,
    dir: &std::path::Path,
    service: &str,
    tune: impl FnOnce(&mut switchyard_sidecar::SidecarConfig),
) -> switchyard_sidecar::SidecarHandle {
    let mut config = sidecar_config(vec![fake.url()], dir);
    tune(&mut config);
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_sidecar_with(
        config,
        Upstreams {
            tcp: vec![(service.into(), tcp)],
            http: vec![],
        },
    )
    .await
}

async fn echo_through(listen: std::net::SocketAddr, msg: &[u8]) -> std::io::Result<String> {
    let mut c = tokio::net::TcpStream::connect(listen).await?;
    c.write_all(msg).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A refused connect never reached the app: the connection is retried on another
/// endpoint, so every client connection works; after five refusals in a row the dead
/// endpoint is ejected and no longer tried.
#[tokio::test]
async fn a_tcp_listener_retries_a_refused_connect_on_another_endpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    fake.upsert(vec![
        instance_at("db", "dead", refusing_addr().await, "1", 100),
        instance_at("db", "live", echo("live").await, "1", 100),
    ]);
    let sidecar = tcp_sidecar(&fake, dir.path(), "db", |_| {}).await;
    wait_endpoints(&sidecar, "db", 2).await;
    let listen = sidecar.upstream_addrs[0].1;
    for n in 0..30 {
        let got = echo_through(listen, b"ping").await.expect("echoed");
        assert_eq!(got, "live:ping", "connection {n}");
    }
    let (_, text) = http_get(sidecar.admin_addr, "/metrics").await;
    let retried: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("switchyard_sidecar_retries_total") && l.contains("connect-failure")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(retried >= 1.0, "{text}");
    assert!(
        text.contains("endpoint=\"dead\",kind=\"consecutive\"} 1"),
        "ejected after five refusals: {text}"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// The service's `max_connections` bounds TCP connections too: over it a connection is
/// closed at once (and counted), and a place freed is usable again.
#[tokio::test]
async fn a_tcp_listener_holds_to_the_services_max_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    fake.upsert(vec![instance_at("db", "e1", echo("e1").await, "1", 100)]);
    let sidecar = tcp_sidecar(&fake, dir.path(), "db", |c| {
        c.resilience.max_connections = 2;
    })
    .await;
    wait_endpoints(&sidecar, "db", 1).await;
    let listen = sidecar.upstream_addrs[0].1;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        c.write_all(b"hi").await.expect("write");
        let mut buf = [0u8; 16];
        let n = c.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"e1:hi");
        held.push(c);
    }
    let mut third = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect");
    let _ = third.write_all(b"hi").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed, not hung")
        .unwrap_or(0);
    assert_eq!(n, 0, "over the limit: closed");
    let (_, text) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(
        text.contains(
            "switchyard_sidecar_overflows_total{service=\"db\",limit=\"max_connections\"} 1"
        ),
        "{text}"
    );
    drop(held);
    eventually(Duration::from_secs(5), || async {
        echo_through(listen, b"again")
            .await
            .ok()
            .filter(|s| s == "e1:again")
    })
    .await;
    sidecar.shutdown().await;
    fake.shutdown().await;
}
