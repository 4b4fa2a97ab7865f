//! A sidecar after ACL bootstrap: with a `service:web` identity token it registers its
//! service, keeps the lease, watches the catalog and reports telemetry; without one the
//! registry refuses its registration.

mod support;

use std::time::Duration;

use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::acl_client::AclClient;
use switchyard_proto::v1::discovery_client::DiscoveryClient;

fn with<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

#[tokio::test]
async fn a_sidecar_with_a_service_identity_token_registers_watches_and_renews() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let url = format!("http://{}", registry.grpc_addr);
    let mut acl = AclClient::connect(url.clone()).await.expect("connect");
    let op = acl
        .bootstrap(pb::BootstrapRequest::default())
        .await
        .expect("bootstrap")
        .into_inner()
        .secret;
    let web = acl
        .create_token(with(
            &op,
            pb::CreateTokenRequest {
                service_identity: "web".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("token")
        .into_inner()
        .secret;
    let app = Backend::start("app", Duration::ZERO).await;
    let mut config = sidecar_config(vec![url.clone()], dir.path());
    config.registrar = Some(registrar_of("web", &url, app.addr, "web-1"));
    config.set_token(Some(web));
    let sidecar = start_sidecar(config).await;
    // The sidecar's own watch sees its registration: register and read both work.
    wait_endpoints(&sidecar, "web", 1).await;
    // Held past two 1 s TTLs: the keep-alive carries the token too.
    // Wall time on purpose: the registry's lease clock must run past two TTLs.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let mut d = DiscoveryClient::connect(url.clone())
        .await
        .expect("connect");
    let found = d
        .resolve(with(
            &op,
            pb::ResolveRequest {
                namespace: String::new(),
                service: "web".into(),
                version: String::new(),
            },
        ))
        .await
        .expect("resolve")
        .into_inner()
        .instances;
    assert_eq!(found.len(), 1);
    sidecar.shutdown().await;

    // Without a token the registration is refused.
    let mut config = sidecar_config(vec![url.clone()], &dir.path().join("b"));
    config.registrar = Some(registrar_of("web", &url, app.addr, "web-2"));
    let sidecar = start_sidecar(config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let found = d
        .resolve(with(
            &op,
            pb::ResolveRequest {
                namespace: String::new(),
                service: "web".into(),
                version: String::new(),
            },
        ))
        .await
        .expect("resolve")
        .into_inner()
        .instances;
    assert!(found.iter().all(|i| i.id != "web-2"), "{found:?}");
    let m = http_get(registry.http_addr, "/metrics").await.1;
    assert!(
        m.contains("switchyard_registry_acl_denials_total{method=\"Register\"}"),
        "{m}"
    );
    sidecar.shutdown().await;
}
