//! The sidecar's mesh identity against a real registry: it gets a leaf for its service
//! from the built-in CA, renews it before it expires, exports the seconds left, and
//! keeps its certificate while the registry is down; and it registers its mesh port
//! only once it can admit callers there.

mod support;

use std::time::Duration;

use support::*;
use switchyard_registry::RegistryConfig;

fn verifies(bundle: &str, leaf: &str, name: &str) -> bool {
    switchyard_tls::mesh_ca::verify_leaf(bundle, leaf, name).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_gets_renews_and_keeps_its_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rc = RegistryConfig::new(dir.path().join("reg"));
    // A short lifetime, so a renewal comes within the test (at about 7 s).
    rc.mesh.leaf_ttl = Duration::from_secs(10);
    let registry = start_in(rc).await;
    let url = format!("http://{}", registry.grpc_addr);
    let app = Backend::start("web", Duration::ZERO).await;
    let mut config = sidecar_config(vec![url.clone()], dir.path());
    config.registrar = Some(registrar_of("web", &url, app.addr, "web-1"));
    config.mesh_identity = true;
    let sidecar = start_sidecar(config).await;

    let first = eventually(Duration::from_secs(10), || async {
        sidecar.identity.current()
    })
    .await;
    assert_eq!(
        first.spiffe_id,
        "spiffe://switchyard.local/ns/default/svc/web"
    );
    assert!(verifies(
        &first.bundle_pem,
        &first.leaf_pem,
        "web.default.svc.switchyard.local"
    ));
    assert!(
        first.key_pem.contains("PRIVATE KEY"),
        "the key is kept in memory"
    );
    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    let left = metric(&metrics, "switchyard_sidecar_certificate_expiry_seconds");
    assert!(left.is_some_and(|s| s > 0.0 && s <= 10.0), "{left:?}");

    // Renewed (a new key and leaf) before the first expires.
    let renewed = eventually(Duration::from_secs(12), || {
        let first = first.clone();
        let identity = sidecar.identity.clone();
        async move { identity.current().filter(|c| c.leaf_pem != first.leaf_pem) }
    })
    .await;
    assert!(
        renewed.issued_at < first.not_after,
        "renewed only after expiry"
    );
    assert_ne!(renewed.key_pem, first.key_pem, "a renewal uses a new key");

    // The registry goes away: the current certificate stays in use.
    registry.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = sidecar
        .identity
        .current()
        .expect("kept while the registry is down");
    assert_eq!(kept.leaf_pem, renewed.leaf_pem);
    sidecar.shutdown().await;
}

/// The mesh port registered for `web-1` (None: not registered).
async fn mesh_port_of(url: &str) -> Option<u32> {
    let mut client =
        switchyard_proto::v1::discovery_client::DiscoveryClient::connect(url.to_string())
            .await
            .ok()?;
    resolve(&mut client, "web")
        .await
        .instances
        .iter()
        .find(|i| i.id == "web-1")
        .map(|i| i.mesh_port)
}

/// A sidecar that holds its certificate but not yet its intentions (its watch stream
/// has not delivered a snapshot) would answer 403 to every caller on its inbound port:
/// it registers without the mesh port until the intentions arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_port_is_registered_only_once_the_intentions_are_known() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let url = format!("http://{}", registry.grpc_addr);
    // The watch goes to a fake that refuses it; registration and certificates go to
    // the real registry.
    let discovery = FakeRegistry::start().await;
    discovery.upsert(vec![instance("api", "api-1", "1.0.0")]);
    discovery.refuse_watches();
    let app = Backend::start("web", Duration::ZERO).await;
    let mut config = sidecar_config(vec![discovery.url()], dir.path());
    config.registrar = Some(registrar_of("web", &url, app.addr, "web-1"));
    config.mesh_identity = true;
    let sidecar = start_sidecar(config).await;
    let inbound = sidecar.inbound_addr.expect("inbound served");
    eventually(Duration::from_secs(10), || async {
        sidecar.identity.current()
    })
    .await;
    eventually(Duration::from_secs(10), || mesh_port_of(&url)).await;
    // Three of the registrar's one-second looks with the certificate held: still 0.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(sidecar.table.intentions().is_none(), "no snapshot was sent");
    assert_eq!(
        mesh_port_of(&url).await,
        Some(0),
        "the mesh port was registered before the intentions arrived"
    );

    // The watch is accepted: its snapshot brings the (empty) intentions, and the port
    // is registered.
    discovery.accept_watches();
    eventually(Duration::from_secs(15), || async {
        (mesh_port_of(&url).await == Some(u32::from(inbound.port()))).then_some(())
    })
    .await;
    assert!(sidecar.table.intentions().is_some());
    sidecar.shutdown().await;
    discovery.shutdown().await;
}
