//! The registrar: registers the local service, follows its health, re-registers when
//! the registry forgets it, and drains it on shutdown while in-flight requests finish.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use switchyard_proto::v1 as pb;
use switchyard_sidecar::health::{Check, HealthConfig};
use switchyard_sidecar::{LocalService, RegistrarConfig};

async fn state_of(
    client: &mut switchyard_proto::v1::discovery_client::DiscoveryClient<tonic::transport::Channel>,
) -> Option<i32> {
    resolve(client, "app")
        .await
        .instances
        .first()
        .map(|i| i.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_service_is_registered_health_checked_and_drained() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let url = format!("http://{}", registry.grpc_addr);
    let app = Backend::start("app", Duration::ZERO).await;
    let mut config = sidecar_config(vec![url.clone()], dir.path());
    config.registrar = Some(RegistrarConfig {
        token: None,
        transport: Default::default(),
        service: LocalService {
            namespace: "default".into(),
            name: "app".into(),
            id: "app-1".into(),
            address: "127.0.0.1".into(),
            port: app.addr.port(),
            version: "1.2.0".into(),
            labels: Default::default(),
            weight: 100,
            zone: String::new(),
            ttl_seconds: 1,
            mesh_port: 0,
        },
        health: HealthConfig {
            check: Check::Http {
                path: "/health".into(),
            },
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        },
        drain: Duration::from_millis(500),
        registries: vec![url.clone()],
        probe_target: app.addr,
    });
    let sidecar = start_sidecar(config).await;
    let mut discovery =
        switchyard_proto::v1::discovery_client::DiscoveryClient::connect(url.clone())
            .await
            .expect("connect");
    let serving = pb::State::Serving as i32;
    let failing = pb::State::Failing as i32;
    eventually(Duration::from_secs(5), || {
        let mut d = discovery.clone();
        async move { (state_of(&mut d).await == Some(serving)).then_some(()) }
    })
    .await;

    // Held past two TTLs by the registrar's keep-alive.
    // Wall time on purpose: the real registry's lease clock must run past two TTLs.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(state_of(&mut discovery).await, Some(serving));

    // Failing health checks mark it FAILING; recovery marks it SERVING again.
    app.status.store(500, Ordering::Relaxed);
    eventually(Duration::from_secs(5), || {
        let mut d = discovery.clone();
        async move { (state_of(&mut d).await == Some(failing)).then_some(()) }
    })
    .await;
    app.status.store(200, Ordering::Relaxed);
    eventually(Duration::from_secs(5), || {
        let mut d = discovery.clone();
        async move { (state_of(&mut d).await == Some(serving)).then_some(()) }
    })
    .await;

    // The registry forgets it (lease revoked): the registrar hears found=false and
    // registers again.
    let mut reg = registry_client(&registry).await;
    reg.deregister(pb::DeregisterRequest {
        namespace: String::new(),
        id: "app-1".into(),
    })
    .await
    .expect("deregister");
    eventually(Duration::from_secs(5), || {
        let mut d = discovery.clone();
        async move { (state_of(&mut d).await == Some(serving)).then_some(()) }
    })
    .await;

    // Shutdown with a request in flight: DRAINING, then gone, and the request completes.
    let slow = Backend::start("slow", Duration::from_millis(1_000)).await;
    register_at(&mut reg, "slow", "slow-1", slow.addr, "1", 100).await;
    wait_endpoints(&sidecar, "slow", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let in_flight = tokio::spawn(async move { get(&http_client(), proxy, "slow").await });
    eventually(Duration::from_secs(5), || async {
        (slow.hits() == 1).then_some(())
    })
    .await;
    let stopping = tokio::spawn(sidecar.shutdown());
    let draining = pb::State::Draining as i32;
    eventually(Duration::from_secs(5), || {
        let mut d = discovery.clone();
        async move { (state_of(&mut d).await == Some(draining)).then_some(()) }
    })
    .await;
    let (status, body, _) = in_flight.await.expect("request task");
    assert_eq!(
        (status, body.as_str()),
        (200, "slow"),
        "the in-flight request completed"
    );
    stopping.await.expect("shutdown");
    assert_eq!(
        state_of(&mut discovery).await,
        None,
        "deregistered after the drain"
    );
    registry.shutdown().await;
}

#[tokio::test]
async fn tcp_and_grpc_probes_tell_up_from_down() {
    use switchyard_sidecar::health::Prober;
    let cfg = |check| HealthConfig {
        check,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    };
    // TCP: a listener is up; a closed port is down.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up = listener.local_addr().expect("addr");
    assert!(Prober::new(up, cfg(Check::Tcp)).probe().await.is_ok());
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let err = Prober::new(closed, cfg(Check::Tcp))
        .probe()
        .await
        .expect_err("down");
    assert!(err.contains("TCP connect"), "{err}");

    // gRPC: a real tonic health service, serving then not serving.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_addr = grpc.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    let prober = Prober::new(grpc_addr, cfg(Check::Grpc));
    assert!(prober.probe().await.is_ok());
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let err = prober.probe().await.expect_err("not serving");
    assert!(err.contains("NOT_SERVING"), "{err}");
    drop(listener);
}

/// A TCP relay to `target` that can be turned into a black hole: bytes stop flowing
/// both ways but no socket is closed (what a partitioned or paused registry looks like
/// to a client).
struct BlackHole {
    addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BlackHole {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = open.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(ri, wo, flag.clone()));
                tokio::spawn(pipe(ro, wi, flag.clone()));
            }
        });
        Self { addr, open }
    }
}

/// Copies until the flag drops; then holds both sockets open and moves nothing.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if !open.load(Ordering::Relaxed) {
            // Swallow everything from now on, keeping both sockets open.
            let _keep = to;
            while from.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Found by the chaos test: a registry that stops answering without closing its
/// sockets (cut off, or paused) held the registrar's KeepAlive stream until HTTP/2
/// pings noticed, 10 s later, and the lease expired meanwhile. An unanswered renewal
/// now gives the stream up within 2 s and the lease is renewed through the next node:
/// here a 6 s lease survives 10 s of black hole on the first address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stops_answering_is_left_before_the_lease_runs_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let direct = format!("http://{}", registry.grpc_addr);
    let hole = BlackHole::start(registry.grpc_addr).await;
    let app = Backend::start("app", Duration::ZERO).await;
    let mut config = sidecar_config(vec![direct.clone()], dir.path());
    let mut registrar = registrar_of("app", &format!("http://{}", hole.addr), app.addr, "app-1");
    registrar.service.ttl_seconds = 6;
    registrar.registries = vec![format!("http://{}", hole.addr), direct.clone()];
    config.registrar = Some(registrar);
    let sidecar = start_sidecar(config).await;
    let mut discovery = pb::discovery_client::DiscoveryClient::connect(direct.clone())
        .await
        .expect("connect");
    assert_eventually(Duration::from_secs(10), "app-1 registered", || {
        let mut d = discovery.clone();
        async move { resolve_ids(&mut d, "app").await == vec!["app-1".to_string()] }
    })
    .await;

    hole.open.store(false, Ordering::Relaxed);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        assert_eq!(
            resolve_ids(&mut discovery, "app").await,
            vec!["app-1".to_string()],
            "the lease ran out while the first registry address was a black hole"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sidecar.shutdown().await;
}
