//! Heap allocations on the proxy's request path, counted on the thread that does the
//! work (`allocation-counter` counts per thread).
//!
//! The sidecar runs on this test's own current-thread runtime, like one proxy worker;
//! the client and the backend are plain threads with blocking sockets, so what this
//! thread allocates while requests flow is the sidecar's work alone: ours and hyper's.
//! The header work of ours is held to zero; the whole request to a budget that is
//! hyper's own allocations (head parsing on both sides, its client's callback, its
//! response body's channel; see benches/RESULTS.md) and no more.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ::http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, USER_AGENT};
use ::http::HeaderMap;
use support::*;
use switchyard_sidecar::proxy::heads;
use switchyard_sidecar::proxy::http::strip_hop_by_hop;

#[test]
fn removing_hop_by_hop_headers_allocates_nothing() {
    let mut h = HeaderMap::new();
    h.insert(HOST, HeaderValue::from_static("web"));
    h.insert(USER_AGENT, HeaderValue::from_static("curl/8"));
    h.append(CONNECTION, HeaderValue::from_static("keep-alive, X-Trace"));
    h.append(CONNECTION, HeaderValue::from_static("host"));
    h.insert(
        HeaderName::from_static("keep-alive"),
        HeaderValue::from_static("timeout=5"),
    );
    h.insert(
        HeaderName::from_static("x-trace"),
        HeaderValue::from_static("1"),
    );
    h.insert(TE, HeaderValue::from_static("gzip"));
    let info = allocation_counter::measure(|| strip_hop_by_hop(&mut h, false));
    assert_eq!(info.count_total, 0, "{info:?}");
    let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    left.sort_unstable();
    // `Connection: host` cannot remove Host.
    assert_eq!(left, ["host", "user-agent"]);
}

#[test]
fn more_connection_lines_than_looked_at_at_once_still_all_count() {
    let mut h = HeaderMap::new();
    for i in 0..7 {
        h.append(
            CONNECTION,
            HeaderValue::from_str(&format!("x-{i}")).expect("value"),
        );
        h.insert(
            HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("name"),
            HeaderValue::from_static("v"),
        );
    }
    h.append(CONNECTION, HeaderValue::from_static("connection"));
    h.insert(HOST, HeaderValue::from_static("web"));
    strip_hop_by_hop(&mut h, false);
    let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(left, ["host"]);
}

#[test]
fn a_head_kept_for_a_retry_is_copied_without_allocating() {
    let mut original = HeaderMap::new();
    original.insert(HOST, HeaderValue::from_static("web"));
    original.insert(USER_AGENT, HeaderValue::from_static("curl/8"));
    original.insert(
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_static("abc"),
    );
    // A map this thread used before (the previous request's original).
    heads::give_back(HeaderMap::with_capacity(16));
    let (copy, info) = {
        let mut copy = None;
        let info = allocation_counter::measure(|| copy = Some(heads::copy_of(&original)));
        (copy.expect("a copy"), info)
    };
    assert_eq!(info.count_total, 0, "{info:?}");
    assert_eq!(copy, original);
    // The request is done: its original goes back, and the next copy reuses it.
    let info = allocation_counter::measure(|| {
        heads::give_back(original);
        drop(heads::copy_of(&copy));
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

/// hyper's own allocations per proxied HTTP/1.1 request (heaptrack,
/// benches/compare/sidecar-allocs.sh, names the sites): the read buffers of the two
/// connections, made shared when a head is split off them and grown again (about 4),
/// its client's response callback (1) and the response body's channel (1); 5.92
/// measured here with this backend's one-header responses (no `Date`: the sidecar adds
/// one, made once a second). Ours on top must be none: with the retry head cloned per
/// request this was 8.85, and with hyper's header-read timer (a boxed timer per
/// request, replaced by the listener's own) 6.85. The half allocation of room is for
/// the sidecar's own timers and reports, which run on this thread too while the
/// requests flow.
const HYPER_PER_REQUEST: f64 = 6.5;

#[test]
fn a_proxied_request_allocates_no_more_than_hyper_does() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let backend = raw_backend();
    let dir = tempfile::tempdir().expect("temp dir");
    let (sidecar, _fake) = rt.block_on(async {
        let fake = FakeRegistry::start().await;
        fake.upsert(vec![instance_at("web", "one", backend, "1.0.0", 100)]);
        let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
        wait_endpoints(&sidecar, "web", 1).await;
        (sidecar, fake)
    });
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    // Warm-up: connections, pools and per-endpoint series are made once.
    run_client(&rt, proxy, 300);
    const N: u64 = 4_000;
    let mut rate = 0.0;
    let info = allocation_counter::measure(|| rate = run_client(&rt, proxy, N));
    let per = info.count_total as f64 / N as f64;
    eprintln!("{per:.2} allocations per proxied request ({rate:.0} requests/s)");
    assert!(
        per <= HYPER_PER_REQUEST,
        "{per:.2} allocations per proxied request (hyper's own: about {HYPER_PER_REQUEST}): {info:?}"
    );
    rt.block_on(sidecar.shutdown());
}

/// Sends `n` GETs through `proxy` on one keep-alive connection from another thread,
/// while this thread's runtime serves them; the requests per second, so the closure
/// has a result.
fn run_client(rt: &tokio::runtime::Runtime, proxy: SocketAddr, n: u64) -> f64 {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let client = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut stream = TcpStream::connect(proxy).expect("connect to the proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        for _ in 0..n {
            stream
                .write_all(b"GET /hello HTTP/1.1\r\nHost: web\r\nUser-Agent: t\r\n\r\n")
                .expect("write");
            assert_eq!(read_response(&mut reader), "ok");
        }
        let _ = done_tx.send(n as f64 / started.elapsed().as_secs_f64());
    });
    let rate = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), done_rx)
            .await
            .expect("the client finished in time")
            .expect("the client reported")
    });
    client.join().expect("client thread");
    rate
}

/// One HTTP/1.1 response with a Content-Length: its body.
fn read_response(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().expect("a length");
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    String::from_utf8(body).expect("text")
}

/// A keep-alive backend on its own threads answering every request `200 ok`.
fn raw_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if writer.write_all(answer).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}
