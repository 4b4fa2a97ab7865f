//! The sidecar's mesh identity against a real registry: it gets a leaf for its service
//! from the built-in CA, renews it before it expires, exports the seconds left, and
//! keeps its certificate while the registry is down.

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
