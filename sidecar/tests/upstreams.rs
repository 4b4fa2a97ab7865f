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
