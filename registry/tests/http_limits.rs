//! The registry's HTTP port (the Consul API, /metrics, OFREP) against strangers: a
//! request head must arrive within the head timeout (slowloris), and past the
//! connection bound a new connection is closed at once instead of piling up; once the
//! held ones go, clients get through again.

use std::time::{Duration, Instant};

use switchyard_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the server closed `s` within `limit` (a read that ends or fails).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// GET `path`, or `None` when the connection is closed without an answer.
async fn try_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.starts_with("HTTP/1.1 200")
        .then(|| buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))
        .flatten()
}

#[tokio::test]
async fn the_http_port_bounds_connections_and_the_time_to_send_a_head() {
    let reg = TestRegistry::start_with(|c| {
        c.http.max_connections = 4;
        c.http.header_read_timeout = Duration::from_millis(400);
    })
    .await;
    let addr = reg.handle.http_addr;

    // Slowloris: half a head, then nothing. Closed after the head timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "a half-sent head is not held forever"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");

    // Four held sockets fill the port; the fifth is closed at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fifth = TcpStream::connect(addr)
        .await
        .expect("the kernel accepts it");
    let _ = fifth
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed_within(&mut fifth, Duration::from_millis(300)).await,
        "a connection past the bound is closed at once"
    );

    // The held ones send nothing, so the head timeout frees them; then clients get in
    // and the refusal was counted.
    let text = eventually(Duration::from_secs(10), || try_get(addr, "/metrics")).await;
    assert!(
        metric(&text, "switchyard_registry_http_connections_refused_total")
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(2)).await);
    }
}
