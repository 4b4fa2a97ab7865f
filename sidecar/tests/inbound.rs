//! The mesh inbound port: mutual TLS only (clear text and a client without a mesh
//! certificate are refused), each request reaches the local app with the caller's
//! verified identity in `x-switchyard-peer-identity`, and a forged one is replaced.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::identity_client::IdentityClient;
use switchyard_tls::{rcgen, rustls, tokio_rustls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A leaf for `service` from the registry at `url`, and its key (as a caller sidecar
/// would hold them).
async fn leaf_for(url: &str, service: &str) -> (String, String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .der()
        .to_vec();
    let r = IdentityClient::connect(url.to_string())
        .await
        .expect("connect")
        .certify(pb::CertifyRequest {
            csr,
            namespace: String::new(),
            service: service.into(),
        })
        .await
        .expect("certify")
        .into_inner();
    (r.leaf, key.serialize_pem(), r.chain)
}

/// GET / over TLS with `config`, naming the server `name`; the raw response, or the
/// error.
async fn get(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    name: &str,
    extra: &str,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET / HTTP/1.1\r\nhost: web\r\n{extra}connection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_port_takes_mtls_only_and_tells_the_app_who_called() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = start_registry(&dir.path().join("reg")).await;
    let url = format!("http://{}", registry.grpc_addr);
    let app = Backend::start("web", Duration::ZERO).await;
    let mut config = sidecar_config(vec![url.clone()], dir.path());
    config.registrar = Some(registrar_of("web", &url, app.addr, "web-1"));
    config.mesh_identity = true;
    let sidecar = start_sidecar(config).await;
    let inbound = sidecar.inbound_addr.expect("inbound served");
    eventually(Duration::from_secs(10), || async {
        sidecar.identity.current()
    })
    .await;

    // A caller with a leaf for `frontend`: the app sees frontend's identity, and a
    // header the caller forged is replaced.
    let (leaf, key, bundle) = leaf_for(&url, "frontend").await;
    let caller = switchyard_tls::mesh_ca::mesh_client_config(&leaf, &key, &bundle, &[b"http/1.1"])
        .expect("client config");
    let reply = get(
        inbound,
        caller.clone(),
        "web.default.svc.switchyard.local",
        "x-switchyard-peer-identity: spiffe://switchyard.local/ns/default/svc/payments\r\n",
    )
    .await
    .expect("mTLS request");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains("x-seen-peer-identity: spiffe://switchyard.local/ns/default/svc/frontend"),
        "{reply}"
    );
    assert!(
        !reply.contains("svc/payments"),
        "the forged identity reached the app: {reply}"
    );
    // The server is who it should be: `payments` is not its name.
    let wrong = get(inbound, caller, "payments.default.svc.switchyard.local", "").await;
    assert!(wrong.is_err(), "the inbound answered as another service");

    // Without a client certificate: refused.
    let roots = switchyard_tls::files::roots_from_pem(bundle.as_bytes()).expect("roots");
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let refused = get(inbound, anonymous, "web.default.svc.switchyard.local", "").await;
    assert!(
        refused.is_err(),
        "served without a client certificate: {refused:?}"
    );

    // Clear text: no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(inbound)
        .await
        .expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
        "clear text was served"
    );

    let (_, metrics) = http_get(sidecar.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("switchyard_sidecar_inbound_requests_total{peer=\"spiffe://switchyard.local/ns/default/svc/frontend\"} 1"),
        "{metrics}"
    );
    // Each refusal under its reason: the caller that refused this sidecar's name, the
    // one without a certificate, the clear-text one.
    // (The server counts a refusal just after the client sees it: poll.)
    let admin = sidecar.admin_addr;
    switchyard_testkit::wait::assert_eventually(
        Duration::from_secs(5),
        "handshake failures by reason",
        || async move {
            let (_, metrics) = http_get(admin, "/metrics").await;
            ["client_rejected", "no_client_cert", "not_tls"]
                .iter()
                .all(|reason| {
                    let series = format!(
                        "switchyard_sidecar_inbound_handshake_failures_total{{reason=\"{reason}\"}}"
                    );
                    metric(&metrics, &series).is_some_and(|n| n >= 1.0)
                })
        },
    )
    .await;
    sidecar.shutdown().await;
}
