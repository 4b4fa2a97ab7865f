//! Mutual TLS between sidecars and intentions, with real processes: a registry, the
//! sidecar of `payments` (its inbound port in front of an app that echoes the caller's
//! identity), the sidecar of `ledger` (the same app declared TCP) and the sidecar of
//! `web` calling payments through its HTTP proxy and ledger through a TCP upstream. Traffic between the sidecars is TLS (the inbound port refuses clear text;
//! the app sees web's verified SPIFFE id), a deny intention blocks HTTP and TCP within a
//! watch update and an allow re-opens them, leaves renew under load without a failed
//! request, and with the registry gone the mTLS traffic goes on.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// An app that answers every request with the `x-switchyard-peer-identity` it got
/// ("none" without one).
fn identity_echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok).take(100_000) {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_lowercase();
                let peer = text
                    .lines()
                    .find_map(|l| l.strip_prefix("x-switchyard-peer-identity:"))
                    .map_or("none".to_string(), |v| v.trim().to_string());
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{peer}",
                    peer.len()
                );
            });
        }
    });
    addr
}

/// A sidecar of the registry at `url` with its admin on a free loopback port and no DNS,
/// plus `extra` flags; the process and its "sidecar serving" line.
fn sidecar(url: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "sidecar",
        "--registry",
        url,
        "--admin",
        "127.0.0.1:0",
        "--dns",
        "off",
    ];
    args.extend_from_slice(extra);
    let (proc, line, _) = start_until(&args, "sidecar serving");
    (proc, line)
}

/// The sidecar of `service` (its app on `port`, version 1.0.0) with a mesh inbound port
/// on a free loopback port.
fn meshed_sidecar(url: &str, service: &str, port: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "--service",
        service,
        "--port",
        port,
        "--version",
        "1.0.0",
        "--inbound",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    sidecar(url, &args)
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// GET / through `proxy` for `host` (extra header lines allowed): status line, the
/// response head and body.
fn get(proxy: &str, host: &str, extra: &str) -> String {
    let Ok(mut s) = TcpStream::connect(proxy) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Polls `check` every 100 ms for at most 15 s; panics with the last answer.
fn until(what: &str, mut check: impl FnMut() -> (bool, String)) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, seen) = check();
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: last saw {seen:?}");
        // Poll interval of a wait bounded by its deadline (real processes).
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric_sum(admin: &str, name: &str) -> f64 {
    let mut s = TcpStream::connect(admin).expect("admin");
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .filter(|l| l.starts_with(&format!("switchyard_sidecar_{name}")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A gRPC health check of `payments` through the sidecar proxy at `proxy` (h2c to the
/// proxy, which routes by :authority): the status, if the call failed.
fn grpc_to_payments(proxy: &str) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
            .expect("url")
            .origin("http://payments".parse().expect("uri"))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
    })
}

fn intention(url: &str, args: &[&str]) -> String {
    let mut all = vec!["intention"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--registry", url]);
    let out = run(&all);
    assert!(
        out.status.success(),
        "intention {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_sidecars_speak_mutual_tls_and_enforce_intentions() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A short leaf lifetime: the sidecars renew within the test (at about 7 s).
    let (registry, url) = start_registry(dir.path(), &["--leaf-ttl", "10s"]);

    let app = identity_echo();
    let app_port = app.port().to_string();
    let (_payments, line) = meshed_sidecar(&url, "payments", &app_port, &["--http-proxy", "off"]);
    let inbound = field(&line, "inbound=").to_string();
    let payments_admin = field(&line, "admin=").to_string();
    let (_ledger, line) = meshed_sidecar(
        &url,
        "ledger",
        &app_port,
        &[
            "--http-proxy",
            "off",
            "--app-protocol",
            "tcp",
            "--health-tcp",
        ],
    );
    let ledger_admin = field(&line, "admin=").to_string();

    let web_app = hello_server().port().to_string();
    let tcp_port = free_port();
    let tcp_upstream = format!("ledger=127.0.0.1:{tcp_port}");
    // A TCP upstream to the HTTP service: its inbound port must not take raw bytes (they
    // could carry a forged identity header nothing would remove).
    let raw_port = free_port();
    let raw_upstream = format!("payments=127.0.0.1:{raw_port}");
    let (_web, line) = meshed_sidecar(
        &url,
        "web",
        &web_app,
        &[
            "--http-proxy",
            "127.0.0.1:0",
            "--upstream",
            &tcp_upstream,
            "--upstream",
            &raw_upstream,
        ],
    );
    let proxy = field(&line, "http_proxy=").to_string();
    let admin = field(&line, "admin=").to_string();
    let tcp = format!("127.0.0.1:{tcp_port}");
    let raw = format!("127.0.0.1:{raw_port}");

    // payments is registered with its mesh port beside the app port, once its sidecar
    // holds a certificate to serve it with.
    let inbound_port = inbound.rsplit(':').next().unwrap_or_default().to_string();
    until("payments registers its mesh port", || {
        let listed = instances_json(&url, "payments");
        let ok = listed[0]["port"] == app.port()
            && listed[0]["mesh_port"].as_u64().map(|p| p.to_string()) == Some(inbound_port.clone());
        (ok, listed.to_string())
    });

    // web's call reaches the app over mTLS: the app sees web's verified identity.
    until("web reaches payments over mTLS", || {
        let r = get(&proxy, "payments", "");
        (r.ends_with("/ns/default/svc/web"), r)
    });
    let r = get(&proxy, "payments", "x-switchyard-explain: 1\r\n");
    let explain = r
        .lines()
        .find(|l| l.to_lowercase().starts_with("x-switchyard-explain:"))
        .unwrap_or_default()
        .to_string();
    assert!(explain.contains("mtls=on expected=spiffe://"), "{explain}");
    assert!(
        explain.contains("/svc/payments; seen=spiffe://"),
        "{explain}"
    );
    // A caller cannot forge the identity header: it is replaced.
    let r = get(
        &proxy,
        "payments",
        "x-switchyard-peer-identity: spiffe://evil/ns/default/svc/admin\r\n",
    );
    assert!(r.ends_with("/ns/default/svc/web"), "{r}");
    // The TCP upstream is mTLS too, and carries bytes as they are (no header added).
    until("web's TCP upstream reaches ledger", || {
        let r = get(&tcp, "ledger", "");
        (r.starts_with("HTTP/1.1 200") && r.ends_with("none"), r)
    });
    // Raw bytes to the HTTP service are refused, forged header or not.
    let r = get(
        &raw,
        "payments",
        "x-switchyard-peer-identity: spiffe://evil/ns/default/svc/admin\r\n",
    );
    assert!(!r.starts_with("HTTP/"), "an HTTP app took raw bytes: {r}");
    // The inbound port takes no clear text.
    let plain = get(&inbound, "payments", "");
    assert!(!plain.starts_with("HTTP/"), "clear text answered: {plain}");

    // A deny of every destination blocks within a watch update: 403 for HTTP, a closed
    // connection for TCP.
    intention(&url, &["deny", "web", "*", "--description", "test"]);
    until("the deny takes effect", || {
        let r = get(&proxy, "payments", "");
        (r.starts_with("HTTP/1.1 403"), r)
    });
    assert!(get(&proxy, "payments", "").contains("deny web -> *"));
    // gRPC gets PERMISSION_DENIED, with the reason.
    match grpc_to_payments(&proxy) {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            assert!(s.message().contains("deny web -> *"), "{s:?}")
        }
        other => panic!("a denied gRPC call got {other:?}"),
    }
    until("the deny closes TCP", || {
        let r = get(&tcp, "ledger", "");
        (!r.starts_with("HTTP/"), r)
    });
    assert!(metric_sum(&payments_admin, "inbound_denied_total") >= 2.0);
    assert!(metric_sum(&ledger_admin, "inbound_denied_total") >= 1.0);
    let checked = intention(&url, &["check", "web", "payments"]);
    assert!(
        checked.starts_with("denied: web -> payments by `deny web *`"),
        "{checked}"
    );

    // An allow (the same pair, so it replaces the deny) re-opens both.
    intention(&url, &["allow", "web", "*"]);
    until("the allow takes effect", || {
        let r = get(&proxy, "payments", "");
        (r.ends_with("/ns/default/svc/web"), r)
    });
    until("TCP re-opens", || {
        let r = get(&tcp, "ledger", "");
        (r.ends_with("none"), r)
    });
    let listed: serde_json::Value =
        serde_json::from_str(&intention(&url, &["list", "-o", "json"])).expect("json");
    assert_eq!(listed[0]["action"], "allow");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let history = intention(&url, &["list", "--history"]);
    assert!(
        history.contains("deny") && history.contains("allow"),
        "{history}"
    );

    // mtls: strict. An instance of payments outside the mesh (registered by the app
    // itself) gets clear text while the service is permissive, and is not used once it
    // is strict; a sidecar without a mesh certificate then gets 503.
    let outside = identity_echo();
    let mut outside_registration =
        hold_registration(&url, "payments", &outside.port().to_string(), "1.0.0");
    until("the instance outside the mesh is used (permissive)", || {
        let r = get(&proxy, "payments", "");
        (r.ends_with("\r\n\r\nnone"), r)
    });
    let out = run(&["route", "mtls", "payments", "strict", "--registry", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until("strict takes effect", || {
        let r = get(&proxy, "payments", "x-switchyard-explain: 1\r\n");
        (
            r.contains("mtls=strict (1 endpoints outside the mesh not used)"),
            r,
        )
    });
    for i in 0..20 {
        let r = get(&proxy, "payments", "");
        assert!(
            r.ends_with("/ns/default/svc/web"),
            "request {i} under strict: {r}"
        );
    }
    let shown = run(&["route", "mtls", "payments", "--registry", &url]);
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout).trim(),
        "payments: mtls strict"
    );
    let (_plain_client, line) = sidecar(&url, &["--http-proxy", "127.0.0.1:0"]);
    let plain_proxy = field(&line, "http_proxy=").to_string();
    until("a sidecar without a certificate is refused", || {
        let r = get(&plain_proxy, "payments", "");
        (
            r.starts_with("HTTP/1.1 503") && r.contains("takes only mutual TLS"),
            r,
        )
    });
    let out = run(&[
        "route",
        "mtls",
        "payments",
        "permissive",
        "--registry",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until("permissive again", || {
        let r = get(&plain_proxy, "payments", "");
        (r.starts_with("HTTP/1.1 200"), r)
    });
    // The app outside the mesh leaves (deregisters on Ctrl-C).
    outside_registration.signal("-INT");
    outside_registration.wait(Duration::from_secs(10));
    until("the instance outside the mesh is gone", || {
        let listed = instances_json(&url, "payments");
        (
            listed.as_array().map(Vec::len) == Some(1),
            listed.to_string(),
        )
    });

    // Leaves renew (10 s lifetime) while requests keep flowing: none fails.
    let renewed_before = metric_sum(&admin, "certificate_requests_total{reason=\"ok\"}");
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(12) {
        let r = get(&proxy, "payments", "");
        assert!(
            r.ends_with("/ns/default/svc/web"),
            "request {sent} failed: {r}"
        );
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let renewed = metric_sum(&admin, "certificate_requests_total{reason=\"ok\"}");
    assert!(
        renewed > renewed_before,
        "no renewal in 12 s ({renewed_before} -> {renewed})"
    );

    // The CA rotates its root under traffic: no request fails, the old root stays
    // trusted beside the new one, and the sidecars take the new bundle from the watch
    // stream and have their leaves re-issued.
    let rotated = run(&["tls", "rotate-mesh-root", "--registry", &url, "-o", "json"]);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let rotated: serde_json::Value = serde_json::from_slice(&rotated.stdout).expect("json");
    let roots = run(&["tls", "mesh-roots", "--registry", &url, "-o", "json"]);
    let roots: serde_json::Value = serde_json::from_slice(&roots.stdout).expect("json");
    let roots = roots["roots"].as_array().cloned().unwrap_or_default();
    assert_eq!(roots.len(), 2, "{roots:?}");
    // The new root is trusted at once and signs after the propagation window.
    let new_root: Vec<_> = roots
        .iter()
        .filter(|r| r["id"] == rotated["root_id"])
        .collect();
    assert!(
        new_root[0]["activate_at_ms"].as_u64() > Some(0),
        "{roots:?}"
    );
    assert!(roots.iter().any(|r| r["retire_at_ms"].as_u64() > Some(0)));
    // 18 s: the new root signs after 10 s, and the sidecars re-issue 11-15 s after the
    // bundle arrived, all under traffic.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(18) {
        let r = get(&proxy, "payments", "");
        assert!(
            r.ends_with("/ns/default/svc/web"),
            "request after the rotation failed: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for admin in [&admin, &payments_admin] {
        assert!(
            metric_sum(admin, "trust_bundle_updates_total") >= 1.0,
            "{admin} saw no new root"
        );
    }

    // The registry goes away: mTLS traffic between the sidecars goes on (each keeps its
    // certificate, the intentions and the endpoints it has).
    drop(registry);
    for i in 0..20 {
        let r = get(&proxy, "payments", "");
        assert!(
            r.ends_with("/ns/default/svc/web"),
            "request {i} without the registry: {r}"
        );
    }
}
