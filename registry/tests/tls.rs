//! TLS on real registries: every port serves the configured certificate, the peer port
//! takes only clients with a certificate the cluster's CA signed (a three-node cluster
//! elects, replicates and forwards over mutual TLS), a client with the wrong CA is
//! refused, and a certificate reload serves new handshakes the new certificate while
//! an open watch stream keeps flowing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::internal::raft_internal_client::RaftInternalClient;
use switchyard_proto::internal::RaftMessage;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_registry::{RegistryConfig, RegistryHandle, TlsFiles};
use switchyard_testkit::*;
use switchyard_tls::generate::{self, quickstart};
use switchyard_tls::{ClientTls, Transport};
use tonic::transport::{Channel, Endpoint};

/// A fresh CA and registry certificate in `dir`.
fn certificates(dir: &Path) -> TlsFiles {
    let bundle = quickstart("test CA", &[], 1).expect("generate");
    generate::write(dir, &bundle, true).expect("write");
    TlsFiles {
        cert: dir.join(generate::CERT),
        key: dir.join(generate::KEY),
        ca: dir.join(generate::CA_CERT),
    }
}

fn endpoint(url: String) -> Endpoint {
    Endpoint::from_shared(url)
        .expect("url")
        .connect_timeout(Duration::from_secs(2))
}

async fn tls_channel(addr: std::net::SocketAddr, ca: &Path) -> Result<Channel, String> {
    let transport = Transport::from_ca_file(Some(ca)).map_err(|e| e.0)?;
    transport
        .connect(endpoint(format!("https://{addr}")))
        .await
        .map_err(|e| switchyard_tls::client::explain(&e))
}

fn register_req(service: &str, id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        instance: Some(instance(service, id, "1.0.0")),
        ttl_seconds: 30,
        lease_id: 0,
    }
}

async fn start_tls(dir: &Path, files: &TlsFiles) -> RegistryHandle {
    let mut config = RegistryConfig::new(dir.join("data"));
    config.tls = Some(files.clone());
    start_in(config).await
}

#[tokio::test]
async fn every_port_speaks_tls_and_a_wrong_ca_or_plaintext_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = certificates(&dir.path().join("a"));
    let other = certificates(&dir.path().join("b"));
    let node = start_tls(dir.path(), &files).await;

    // gRPC with the right CA: register and read back.
    let channel = tls_channel(node.grpc_addr, &files.ca).await.expect("tls");
    RegistryClient::new(channel.clone())
        .register(register_req("web", "w1"))
        .await
        .expect("register over TLS");
    let resolved = DiscoveryClient::new(channel)
        .resolve(pb::ResolveRequest {
            namespace: String::new(),
            service: "web".into(),
            version: String::new(),
        })
        .await
        .expect("resolve over TLS");
    assert_eq!(resolved.into_inner().instances.len(), 1);

    // The wrong CA: refused at the handshake, and the error says what to check.
    let e = tls_channel(node.grpc_addr, &other.ca)
        .await
        .expect_err("wrong CA");
    assert!(
        e.contains("invalid peer certificate") && e.contains("--ca-file"),
        "{e}"
    );

    // Plaintext gRPC to a TLS port gets no answer.
    let plain = Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .expect("url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    let refused = RegistryClient::new(plain)
        .register(register_req("web", "w2"))
        .await;
    assert!(refused.is_err(), "plaintext call to a TLS port answered");

    // HTTP (metrics, health) over TLS, HTTP/1.1, verified against the CA.
    let health = https_get(node.http_addr, &files.ca, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"serving\""), "{health}");
    // The refused handshake above is counted.
    let metrics = https_get(node.http_addr, &files.ca, "/metrics").await;
    assert!(
        failures_of(&metrics, "not_tls") >= 1,
        "plaintext is counted as not_tls: {metrics}"
    );

    // The peer port asks for a client certificate. With the node's own, a Raft RPC
    // reaches the Raft service (which refuses the empty message itself)...
    let own = ClientTls::load(&files.ca, Some((&files.cert, &files.key))).expect("client");
    let answer = peer_vote(node.peer_addr, Transport::tls(own)).await;
    assert!(
        answer.contains("status: InvalidArgument") || answer.contains("decode"),
        "{answer}"
    );
    // ...without one, or with one another CA signed, the handshake is refused.
    let none = ClientTls::load(&files.ca, None).expect("client");
    let answer = peer_vote(node.peer_addr, Transport::tls(none)).await;
    assert!(answer.contains("CertificateRequired"), "{answer}");
    let foreign = ClientTls::load(&files.ca, Some((&other.cert, &other.key))).expect("client");
    let answer = peer_vote(node.peer_addr, Transport::tls(foreign)).await;
    assert!(
        answer.contains("UnknownCA")
            || answer.contains("BadCertificate")
            || answer.contains("DecryptError"),
        "{answer}"
    );
    // Each refusal is counted under its reason.
    let metrics = https_get(node.http_addr, &files.ca, "/metrics").await;
    assert!(failures_of(&metrics, "no_client_cert") >= 1, "{metrics}");
    assert!(failures_of(&metrics, "unknown_ca") >= 1, "{metrics}");
    node.shutdown().await;
}

/// `switchyard_registry_tls_handshake_failures_total{reason="…"}` (0 when absent).
fn failures_of(metrics: &str, reason: &str) -> u64 {
    let prefix =
        format!("switchyard_registry_tls_handshake_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A vote with an empty message to the peer port; the outcome as text (an error's
/// causes included).
async fn peer_vote(addr: std::net::SocketAddr, transport: Transport) -> String {
    let ch = match transport.connect(endpoint(format!("https://{addr}"))).await {
        Ok(ch) => ch,
        Err(e) => return switchyard_tls::client::explain(&e),
    };
    match RaftInternalClient::new(ch)
        .vote(RaftMessage { data: vec![] })
        .await
    {
        Ok(_) => "answered".into(),
        Err(s) => format!(
            "status: {:?} {}",
            s.code(),
            switchyard_tls::client::explain(&s)
        ),
    }
}

/// GET `path` over TLS (HTTP/1.1), returning the raw response.
async fn https_get(addr: std::net::SocketAddr, ca: &Path, path: &str) -> String {
    use switchyard_tls::rustls;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let roots = switchyard_tls::files::read_roots(ca).expect("roots");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = switchyard_tls::tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("https handshake");
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tls.read_to_string(&mut out).await.ok();
    out
}

#[tokio::test]
async fn a_cluster_elects_replicates_and_forwards_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = certificates(&dir.path().join("tls"));
    let ([n1, n2, n3], addrs) =
        start_cluster_with(dir.path(), |c| c.tls = Some(files.clone())).await;
    // A write on every node (followers forward it to the leader over the peer port),
    // then every node has all three.
    for (i, addr) in addrs.iter().enumerate() {
        let id = format!("w{i}");
        eventually(Duration::from_secs(15), || {
            let id = id.clone();
            let ca = files.ca.clone();
            async move {
                let ch = tls_channel(*addr, &ca).await.ok()?;
                RegistryClient::new(ch)
                    .register(register_req("web", &id))
                    .await
                    .ok()
            }
        })
        .await;
    }
    for addr in addrs {
        eventually(Duration::from_secs(10), || {
            let ca = files.ca.clone();
            async move {
                let ch = tls_channel(addr, &ca).await.ok()?;
                let r = DiscoveryClient::new(ch)
                    .resolve(pb::ResolveRequest {
                        namespace: String::new(),
                        service: "web".into(),
                        version: String::new(),
                    })
                    .await
                    .ok()?;
                (r.into_inner().instances.len() == 3).then_some(())
            }
        })
        .await;
    }
    n1.shutdown().await;
    n2.shutdown().await;
    n3.shutdown().await;
}

#[tokio::test]
async fn a_certificate_reload_serves_the_new_one_and_keeps_open_streams() {
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("live");
    let files = certificates(&live);
    let old_ca = dir.path().join("old-ca.pem");
    std::fs::copy(&files.ca, &old_ca).expect("keep the old CA");
    let node = start_tls(dir.path(), &files).await;

    // A watch stream opened with the old certificate.
    let old = tls_channel(node.grpc_addr, &old_ca).await.expect("tls");
    let mut watch = DiscoveryClient::new(old.clone())
        .watch(pb::WatchRequest {
            namespace: String::new(),
            services: vec![],
            since_revision: 0,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("first event in time");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");

    // New CA and certificate in place (as a Secret update or cert-manager would).
    let fresh = certificates(&dir.path().join("fresh"));
    for (from, to) in [
        (&fresh.ca, &files.ca),
        (&fresh.cert, &files.cert),
        (&fresh.key, &files.key),
    ] {
        let text = std::fs::read_to_string(from).expect("read");
        generate::write_file(to, &text, false).expect("replace");
    }
    // New handshakes get the new certificate within a check interval or two...
    eventually(Duration::from_secs(10), || {
        let ca = fresh.ca.clone();
        async move { tls_channel(node.grpc_addr, &ca).await.ok() }
    })
    .await;
    let e = tls_channel(node.grpc_addr, &old_ca)
        .await
        .expect_err("the old CA no longer verifies new handshakes");
    assert!(e.contains("invalid peer certificate"), "{e}");

    // ...while the stream opened before the reload still carries changes.
    let ch = tls_channel(node.grpc_addr, &fresh.ca).await.expect("tls");
    RegistryClient::new(ch)
        .register(register_req("web", "after-reload"))
        .await
        .expect("register");
    let saw = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(event)) = watch.next().await {
            if format!("{event:?}").contains("after-reload") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        saw,
        Ok(true),
        "the pre-reload watch stream missed the change"
    );
    // And the pre-reload connection still serves unary calls.
    RegistryClient::new(old)
        .register(register_req("web", "old-conn"))
        .await
        .expect("the old connection still works");

    // A broken file is refused and the certificate in force stays.
    generate::write_file(&files.cert, "not a certificate", false).expect("break");
    tokio::time::sleep(switchyard_tls::reload::CHECK_INTERVAL * 2).await;
    tls_channel(node.grpc_addr, &fresh.ca)
        .await
        .expect("the last good certificate is still served");
    node.shutdown().await;
}
