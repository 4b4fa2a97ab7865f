//! The catalog outlives the registry: routing continues while it is down (a real
//! registry restarted on its address and data), a restarted sidecar routes from its disk
//! cache, the client fails over across registries and resumes from the last revision it
//! saw, and opens its stream anew after a large snapshot (fake registries: these need a
//! catalog, not Raft).

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn routing_continues_while_the_registry_is_down_and_resumes_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reg_dir = dir.path().join("reg");
    let registry = start_registry(&reg_dir).await;
    let grpc = registry.grpc_addr;
    let backend = Backend::start("one", Duration::ZERO).await;
    let mut client = registry_client(&registry).await;
    register_at(&mut client, "web", "one", backend.addr, "1", 100).await;
    let sidecar = start_sidecar(sidecar_config(vec![format!("http://{grpc}")], dir.path())).await;
    wait_endpoints(&sidecar, "web", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let (code, ready) = http_get(sidecar.admin_addr, "/ready").await;
    assert_eq!(code, 200, "{ready}");

    drop(client);
    registry.shutdown().await;
    eventually(Duration::from_secs(5), || async {
        (!sidecar.table.is_connected()).then_some(())
    })
    .await;
    let http = http_client();
    for _ in 0..20 {
        assert_eq!(get(&http, proxy, "web").await.1, "one");
    }
    // The catalog ages while no registry confirms it: poll until it is a second old.
    let doc = eventually(WAIT, || async {
        let (_, endpoints) = http_get(sidecar.admin_addr, "/endpoints").await;
        let doc: serde_json::Value = serde_json::from_str(&endpoints).expect("json");
        (doc["catalog_age_seconds"].as_f64() >= Some(1.0)).then_some(doc)
    })
    .await;
    assert_eq!(doc["registry_connected"], false);
    assert!(
        doc["catalog_age_seconds"].as_f64().expect("age") >= 1.0,
        "{doc}"
    );
    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("switchyard_sidecar_registry_connected 0"),
        "{metrics}"
    );

    // The registry comes back on the same address with its data: the sidecar reconnects.
    let registry = start_registry_on(&reg_dir, grpc).await;
    eventually(Duration::from_secs(10), || async {
        sidecar.table.is_connected().then_some(())
    })
    .await;
    let mut client = registry_client(&registry).await;
    let second = Backend::start("two", Duration::ZERO).await;
    register_at(&mut client, "web", "two", second.addr, "1", 100).await;
    wait_endpoints(&sidecar, "web", 2).await;
    sidecar.shutdown().await;
    registry.shutdown().await;
}

#[tokio::test]
async fn a_sidecar_restarted_without_a_registry_routes_from_its_disk_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let url = fake.url();
    let backend = Backend::start("cached", Duration::ZERO).await;
    fake.upsert(vec![instance_at("web", "cached", backend.addr, "1", 100)]);
    let first = start_sidecar(sidecar_config(vec![url.clone()], dir.path())).await;
    wait_endpoints(&first, "web", 1).await;
    first.shutdown().await;
    fake.shutdown().await;
    assert!(dir.path().join("catalog.json").exists(), "cache written");

    let second = start_sidecar(sidecar_config(vec![url], dir.path())).await;
    assert!(second.table.is_loaded(), "ready from the cache at once");
    assert_eq!(http_get(second.admin_addr, "/ready").await.0, 200);
    let proxy = second.http_proxy_addr.expect("proxy");
    assert_eq!(get(&http_client(), proxy, "web").await.1, "cached");
    let (_, endpoints) = http_get(second.admin_addr, "/endpoints").await;
    let doc: serde_json::Value = serde_json::from_str(&endpoints).expect("json");
    assert!(
        doc["catalog_age_seconds"].is_null(),
        "no registry confirmed it yet: {doc}"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn the_client_fails_over_to_the_next_registry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let backend = Backend::start("b", Duration::ZERO).await;
    fake.upsert(vec![instance_at("web", "b", backend.addr, "1", 100)]);
    // The first registry in the list does not answer (nothing listens on port 1).
    let sidecar = start_sidecar(sidecar_config(
        vec!["http://127.0.0.1:1".into(), fake.url()],
        dir.path(),
    ))
    .await;
    assert_eq!(
        http_get(sidecar.admin_addr, "/ready").await.0,
        503,
        "not ready before a catalog"
    );
    wait_endpoints(&sidecar, "web", 1).await;
    assert_eq!(http_get(sidecar.admin_addr, "/ready").await.0, 200);
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// Only a fake registry shows this: after the stream drops, the sidecar watches again
/// from the last revision it applied, and the registry need send only what came after.
#[tokio::test]
async fn after_the_stream_drops_the_sidecar_resumes_from_the_last_revision_it_saw() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let a = Backend::start("a", Duration::ZERO).await;
    let b = Backend::start("b", Duration::ZERO).await;
    let c = Backend::start("c", Duration::ZERO).await;
    fake.push(proto::snapshot_of(
        7,
        vec![instance_at("web", "a", a.addr, "1", 100)],
    ));
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    assert_eq!(
        fake.nth_watch(1, WAIT).await.since_revision,
        0,
        "a fresh sidecar (no disk cache) asks for everything"
    );
    wait_endpoints(&sidecar, "web", 1).await;
    let rev = fake.upsert(vec![instance_at("web", "b", b.addr, "1", 100)]);
    assert_eq!(rev, 8);
    wait_endpoints(&sidecar, "web", 2).await;

    fake.drop_streams();
    let resumed = fake.nth_watch(2, WAIT).await;
    assert_eq!(
        resumed.since_revision, 8,
        "resumes after the last event applied"
    );
    // At revision 8 the fake sends nothing on connect: the next delta is all it gets.
    assert_eventually(WAIT, "the sidecar is watching again", || async {
        fake.watchers() == 1 && sidecar.table.is_connected()
    })
    .await;
    assert_eq!(sidecar.table.revision(), 8);
    fake.upsert(vec![instance_at("web", "c", c.addr, "1", 100)]);
    wait_endpoints(&sidecar, "web", 3).await;
    assert_eq!(sidecar.table.revision(), 9);
    let proxy = sidecar.http_proxy_addr.expect("proxy");
    let http = http_client();
    for _ in 0..30 {
        assert_eq!(get(&http, proxy, "web").await.0, 200);
    }
    assert!(
        c.hits() > 0,
        "the endpoint added after the resume gets traffic"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
}

/// While the registry fails the stream and refuses every new watch, the sidecar keeps
/// routing on its last catalog, keeps retrying from the revision it holds, and takes the
/// registry's changes again once it answers.
#[tokio::test]
async fn the_last_catalog_keeps_serving_while_the_registry_refuses_watches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let one = Backend::start("one", Duration::ZERO).await;
    let rev = fake.upsert(vec![instance_at("web", "one", one.addr, "1", 100)]);
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    wait_endpoints(&sidecar, "web", 1).await;
    let proxy = sidecar.http_proxy_addr.expect("proxy");

    fake.refuse_watches();
    fake.fail_streams(tonic::Status::unavailable("going away"));
    assert_eventually(WAIT, "the sidecar notices", || async {
        !sidecar.table.is_connected()
    })
    .await;
    // Two refused retries at least (the backoff is at most 500 ms here).
    fake.nth_watch(3, WAIT).await;
    let http = http_client();
    for _ in 0..20 {
        assert_eq!(get(&http, proxy, "web").await.1, "one");
    }
    assert!(!sidecar.table.is_connected());
    assert!(
        fake.requests()[1..].iter().all(|r| r.since_revision == rev),
        "every retry resumes from revision {rev}: {:?}",
        fake.requests()
    );

    fake.accept_watches();
    assert_eventually(
        Duration::from_secs(10),
        "the sidecar reconnects",
        || async { sidecar.table.is_connected() },
    )
    .await;
    let two = Backend::start("two", Duration::ZERO).await;
    fake.upsert(vec![instance_at("web", "two", two.addr, "1", 100)]);
    wait_endpoints(&sidecar, "web", 2).await;
    sidecar.shutdown().await;
    fake.shutdown().await;
}

#[test]
fn backoff_is_jittered_exponential_and_capped() {
    let cfg = switchyard_sidecar::DiscoveryConfig {
        token: None,
        transport: Default::default(),
        registries: vec![],
        namespace: "default".into(),
        cache_file: None,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(10),
        kv_prefixes: Vec::new(),
    };
    let mut rng = fastrand::Rng::with_seed(3);
    for attempt in 0..30u32 {
        let cap =
            Duration::from_millis(100u64.saturating_mul(1 << attempt.min(20))).min(cfg.backoff_max);
        let d = switchyard_sidecar::discovery::backoff(&cfg, attempt, &mut rng);
        assert!(
            d >= cap / 2 && d <= cap,
            "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]",
            cap / 2
        );
    }
}

/// A sidecar that fails over to a registry of another cluster (here: one whose data was
/// wiped and whose new history has passed the sidecar's revision) must not apply that
/// registry's deltas on top of its old catalog: the cluster id makes it start over with
/// a snapshot. Before cluster ids it kept the old endpoints and missed the new ones.
#[tokio::test]
async fn failing_over_to_another_cluster_replaces_the_catalog() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = start_registry(&dir.path().join("old")).await;
    let new = start_registry(&dir.path().join("new")).await;
    let addr = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 2], port));
    let mut old_client = registry_client(&old).await;
    for i in 0..3 {
        register_at(
            &mut old_client,
            "web",
            &format!("old-{i}"),
            addr(9000 + i),
            "1",
            100,
        )
        .await;
    }
    let mut new_client = registry_client(&new).await;
    for i in 0..12 {
        register_at(
            &mut new_client,
            "web",
            &format!("new-{i}"),
            addr(9100 + i),
            "2",
            100,
        )
        .await;
    }
    let sidecar = start_sidecar(sidecar_config(
        vec![
            format!("http://{}", old.grpc_addr),
            format!("http://{}", new.grpc_addr),
        ],
        dir.path(),
    ))
    .await;
    wait_endpoints(&sidecar, "web", 3).await;
    old.shutdown().await;
    let ids = |sidecar: &switchyard_sidecar::SidecarHandle| -> Vec<String> {
        let mut ids: Vec<String> = sidecar
            .table
            .get("web")
            .map(|v| v.endpoints.iter().map(|e| e.id.clone()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    };
    let mut want: Vec<String> = (0..12).map(|i| format!("new-{i}")).collect();
    want.sort();
    eventually(Duration::from_secs(10), || {
        let got = ids(&sidecar);
        let want = want.clone();
        async move { (got == want).then_some(()) }
    })
    .await;
    sidecar.shutdown().await;
    new.shutdown().await;
}

/// A cache file left by a sidecar of another cluster, at the very revision this registry
/// is at, used to be trusted for ever (the resume found no deltas to send). Its cluster
/// id now makes the registry send a snapshot, which replaces the foreign endpoints.
#[tokio::test]
async fn a_cache_file_from_another_cluster_is_replaced_by_a_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let mut client = registry_client(&registry).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 2], 9000));
    let revision = register_at(&mut client, "web", "ours", addr, "1", 100).await;
    let foreign = format!(
        r#"{{"revision":{revision},"cluster_id":"0123456789abcdef0123456789abcdef","services":{{"web":{{"theirs":{{"id":"theirs","address":"127.0.0.3","port":9000,"version":"1","weight":100,"state":"SERVING"}}}}}},"policies":{{}}}}"#
    );
    std::fs::write(dir.path().join("catalog.json"), foreign).expect("write cache");
    let sidecar = start_sidecar(sidecar_config(
        vec![format!("http://{}", registry.grpc_addr)],
        dir.path(),
    ))
    .await;
    eventually(Duration::from_secs(10), || {
        let ids: Vec<String> = sidecar
            .table
            .get("web")
            .map(|v| v.endpoints.iter().map(|e| e.id.clone()).collect())
            .unwrap_or_default();
        async move { (ids == ["ours"]).then_some(()) }
    })
    .await;
    sidecar.shutdown().await;
    registry.shutdown().await;
}

/// `n` instances, ten per service (`svc0` …), all on `backend`.
fn many_instances(backend: std::net::SocketAddr, n: usize) -> Vec<switchyard_proto::v1::Instance> {
    (0..n)
        .map(|i| {
            instance_at(
                &format!("svc{}", i / 10),
                &format!("svc{}-{i}", i / 10),
                backend,
                "1.0.0",
                100,
            )
        })
        .collect()
}

/// tonic keeps a stream's read buffer at the size of the largest message it read, so a
/// large snapshot would stay in memory for the life of the stream: after one, the
/// sidecar opens the watch again on the same connection, from the snapshot's revision,
/// and goes on from there. Once only, and not after a small snapshot.
#[tokio::test]
async fn after_a_large_snapshot_the_watch_is_opened_anew_from_its_revision() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeRegistry::start().await;
    let backend = Backend::start("b", Duration::ZERO).await;
    let revision = fake.upsert(many_instances(backend.addr, 10_000));
    let sidecar = start_sidecar(sidecar_config(vec![fake.url()], dir.path())).await;
    let first = fake.nth_watch(1, Duration::from_secs(10)).await;
    assert_eq!(first.since_revision, 0);
    let second = fake.nth_watch(2, Duration::from_secs(10)).await;
    assert_eq!(
        second.since_revision, revision,
        "renewed from the snapshot's revision"
    );
    wait_endpoints(&sidecar, "svc999", 10).await;
    // Changes after it come on the renewed stream.
    fake.upsert(vec![instance_at(
        "late",
        "late-1",
        backend.addr,
        "1.0.0",
        100,
    )]);
    wait_endpoints(&sidecar, "late", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.requests().len(), 2, "one renewal, no more");
    assert_eq!(fake.watchers(), 1, "the first stream was closed");
    sidecar.shutdown().await;

    // A small snapshot: the first stream is kept.
    let small = FakeRegistry::start().await;
    small.upsert(many_instances(backend.addr, 100));
    let dir = tempfile::tempdir().expect("temp dir");
    let sidecar = start_sidecar(sidecar_config(vec![small.url()], dir.path())).await;
    wait_endpoints(&sidecar, "svc9", 10).await;
    small.upsert(vec![instance_at(
        "late",
        "late-1",
        backend.addr,
        "1.0.0",
        100,
    )]);
    wait_endpoints(&sidecar, "late", 1).await;
    assert_eq!(
        small.requests().len(),
        1,
        "a small snapshot keeps its stream"
    );
    sidecar.shutdown().await;
    fake.shutdown().await;
    small.shutdown().await;
}
