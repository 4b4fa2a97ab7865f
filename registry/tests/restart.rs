//! Durability: registrations, the revision and leases survive a restart on the same
//! data dir, from the log alone and from a snapshot plus the log after it.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_registry::RegistryConfig;
use switchyard_testkit::*;

async fn state(url: String) -> (u64, Vec<(String, String)>) {
    let mut discovery = switchyard_proto::v1::discovery_client::DiscoveryClient::connect(url)
        .await
        .expect("connect");
    let mut ids = Vec::new();
    let mut revision = 0;
    for svc in ["web", "api"] {
        let r = resolve(&mut discovery, svc).await;
        revision = r.revision;
        ids.extend(r.instances.into_iter().map(|i| (i.id, i.version)));
    }
    (revision, ids)
}

/// The cluster id a watcher is told (waits for the first leader to commit it).
async fn cluster_id(url: String) -> String {
    eventually(Duration::from_secs(5), || {
        let url = url.clone();
        async move {
            let mut d = switchyard_proto::v1::discovery_client::DiscoveryClient::connect(url)
                .await
                .ok()?;
            let mut s = d
                .watch(pb::WatchRequest::default())
                .await
                .ok()?
                .into_inner();
            let event = s.message().await.ok()??;
            (!event.cluster_id.is_empty()).then_some(event.cluster_id)
        }
    })
    .await
}

async fn restart_keeps(snapshot_every: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || {
        let mut c = RegistryConfig::new(dir.path().to_path_buf());
        c.snapshot_every = snapshot_every;
        c
    };
    let first = start_in(config()).await;
    let url = format!("http://{}", first.grpc_addr);
    let mut registry = switchyard_proto::v1::registry_client::RegistryClient::connect(url.clone())
        .await
        .expect("connect");
    let kept = register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    register(&mut registry, instance("web", "web-2", "1.1.0"), 30).await;
    register(&mut registry, instance("api", "api-1", "2.0.0"), 30).await;
    registry
        .deregister(pb::DeregisterRequest {
            namespace: String::new(),
            id: "web-2".into(),
        })
        .await
        .expect("deregister");
    let before = state(url.clone()).await;
    let id = cluster_id(url).await;
    first.shutdown().await;

    let second = start_in(config()).await;
    let url = format!("http://{}", second.grpc_addr);
    let after = state(url.clone()).await;
    assert_eq!(after, before, "same instances at the same revision");
    assert_eq!(cluster_id(url.clone()).await, id, "the cluster id is kept");
    assert!(after.0 >= 4);

    // The lease came back, with its full TTL, and renews.
    let mut registry = switchyard_proto::v1::registry_client::RegistryClient::connect(url)
        .await
        .expect("connect");
    let (tx, mut responses) = keep_alive(&mut registry, 1).await;
    tx.send(pb::KeepAliveRequest {
        lease_ids: vec![kept.lease_id],
    })
    .await
    .expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert!(resp.leases[0].found);
    assert_eq!(resp.leases[0].ttl_seconds, 30);

    // New writes continue from the old revision.
    let next = register(&mut registry, instance("web", "web-3", "1.0.0"), 30).await;
    assert!(next.revision > after.0);
    second.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_registrations_from_the_log() {
    restart_keeps(10_000).await;
}

#[tokio::test]
async fn restart_keeps_registrations_from_a_snapshot_and_the_log() {
    restart_keeps(2).await;
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused_clearly() {
    let reg = TestRegistry::start().await;
    let listeners = switchyard_registry::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        peer: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        http: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        dns: None,
    };
    let err =
        switchyard_registry::start(RegistryConfig::new(reg.data_dir().to_path_buf()), listeners)
            .await
            .err()
            .expect("refused");
    assert!(err.to_string().contains("--data-dir"), "{err}");
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn health_and_metrics_are_served_over_http() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    let (code, body) = http_get(reg.handle.http_addr, "/health").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"serving\""), "{body}");
    let m = reg.metrics().await;
    assert_eq!(metric(&m, "switchyard_registry_instances"), Some(1.0));
    assert!(
        m.contains("switchyard_registry_grpc_requests_total{method=\"Register\",code=\"OK\"} 1"),
        "{m}"
    );
    assert_eq!(http_get(reg.handle.http_addr, "/nope").await.0, 404);
    reg.handle.shutdown().await;
}
