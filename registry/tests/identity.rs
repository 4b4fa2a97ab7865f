//! The mesh's built-in CA on real registries: the first leader makes a root; Certify
//! builds each leaf itself (a forged CSR asking for CA:true and another service's name
//! gets its own service's leaf), only a token that may register the service gets its
//! certificate, bad CSRs and floods are refused, and the root is the same on every node
//! and after a restart.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::acl_client::AclClient;
use switchyard_proto::v1::identity_client::IdentityClient;
use switchyard_testkit::*;
use switchyard_tls::rcgen;
use tonic::transport::Channel;
use tonic::Code;

async fn channel(addr: std::net::SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

fn with<T>(token: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    r
}

/// A CSR for a fresh key that asks for everything a leaf must not get.
fn forged_csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![
        "payments.default.svc.switchyard.local".to_string(),
        "*.switchyard.local".to_string(),
    ])
    .expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
        .into_bytes()
}

fn certify_req(service: &str, csr: Vec<u8>) -> pb::CertifyRequest {
    pb::CertifyRequest {
        csr,
        namespace: String::new(),
        service: service.into(),
    }
}

fn verifies(bundle: &str, leaf: &str, name: &str) -> bool {
    switchyard_tls::mesh_ca::verify_leaf(bundle, leaf, name).is_ok()
}

async fn roots(addr: std::net::SocketAddr, token: Option<&str>) -> pb::RootsResponse {
    eventually(Duration::from_secs(10), || async {
        IdentityClient::new(channel(addr).await)
            .roots(with(token, pb::RootsRequest {}))
            .await
            .ok()
            .map(|r| r.into_inner())
    })
    .await
}

#[tokio::test]
async fn a_forged_csr_gets_its_own_services_leaf_and_tokens_decide_whose() {
    let reg = TestRegistry::start().await;
    let addr = reg.handle.grpc_addr;
    let bundle = roots(addr, None).await;
    assert_eq!(bundle.trust_domain, "switchyard.local");
    assert_eq!(bundle.roots.len(), 1);
    assert!(bundle.roots[0].active);
    let mut id = IdentityClient::new(channel(addr).await);

    let issued = id
        .certify(certify_req("web", forged_csr()))
        .await
        .expect("certify")
        .into_inner();
    assert_eq!(
        issued.spiffe_id,
        "spiffe://switchyard.local/ns/default/svc/web"
    );
    assert_eq!(issued.chain, bundle.bundle);
    assert!(verifies(
        &issued.chain,
        &issued.leaf,
        "web.default.svc.switchyard.local"
    ));
    assert!(
        !verifies(
            &issued.chain,
            &issued.leaf,
            "payments.default.svc.switchyard.local"
        ),
        "the CSR's names were copied"
    );
    // A leaf is not a CA: nothing it signs verifies. (Its own CA flag is checked in the
    // tls crate's unit test.) Lifetime: 72 h by default.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let ttl = issued.valid_until.saturating_sub(now_ms);
    assert!(
        (71 * 3600 * 1000..=72 * 3600 * 1000 + 60_000).contains(&ttl),
        "{ttl} ms"
    );

    // Bad input: not a CSR, a bad service name.
    let e = id
        .certify(certify_req("web", b"not a csr".to_vec()))
        .await
        .expect_err("garbage");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = id
        .certify(certify_req("Not_A_Name", forged_csr()))
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // After bootstrap: a token for web gets web's leaf and not payments'.
    let (_op, web) = bootstrap_with_web(addr).await;
    id.certify(with(Some(&web), certify_req("web", forged_csr())))
        .await
        .expect("web's own leaf");
    let e = id
        .certify(with(Some(&web), certify_req("payments", forged_csr())))
        .await
        .expect_err("payments");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("register"), "{e}");
    let e = id
        .certify(certify_req("web", forged_csr()))
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = id
        .roots(pb::RootsRequest {})
        .await
        .expect_err("anonymous roots");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    id.roots(with(Some(&web), pb::RootsRequest {}))
        .await
        .expect("a token reads the bundle");
}

/// Bootstraps ACLs; the operator's secret and that of a token with web's service identity.
async fn bootstrap_with_web(addr: std::net::SocketAddr) -> (String, String) {
    let mut acl = AclClient::new(channel(addr).await);
    let op = acl
        .bootstrap(pb::BootstrapRequest::default())
        .await
        .expect("bootstrap")
        .into_inner()
        .secret;
    let web = acl
        .create_token(with(
            Some(&op),
            pb::CreateTokenRequest {
                service_identity: "web".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("token")
        .into_inner()
        .secret;
    (op, web)
}

/// A leaf for `service`'s fresh key, PEM.
async fn leaf(id: &mut IdentityClient<Channel>, token: Option<&str>, service: &str) -> String {
    id.certify(with(token, certify_req(service, forged_csr())))
        .await
        .expect("certify")
        .into_inner()
        .leaf
}

#[tokio::test]
async fn rotating_the_root_signs_with_the_new_one_and_keeps_the_old_one_trusted() {
    let reg = TestRegistry::start_with(|c| {
        c.mesh.leaf_ttl = Duration::from_secs(3600);
        c.mesh.root_propagation = Duration::from_secs(1);
    })
    .await;
    let addr = reg.handle.grpc_addr;
    let mut id = IdentityClient::new(channel(addr).await);
    let before = roots(addr, None).await;
    let old_leaf = leaf(&mut id, None, "web").await;
    // Only an operator token with `ca` may rotate, once ACLs are on.
    let (op, web) = bootstrap_with_web(addr).await;
    let e = id
        .rotate_root(with(Some(&web), pb::RotateRootRequest {}))
        .await
        .expect_err("web may not rotate");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let rotated = id
        .rotate_root(with(Some(&op), pb::RotateRootRequest {}))
        .await
        .expect("rotate")
        .into_inner();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    // It signs after the propagation window; the old roots retire two leaf lifetimes
    // after that (within a minute of slack).
    assert!(rotated.activate_at_ms.abs_diff(started + 1_000) < 60_000);
    assert!(rotated.retire_at_ms.abs_diff(started + 1_000 + 7_200_000) < 60_000);
    // Within the window the old root still signs: a peer may not trust the new one yet.
    let early = leaf(&mut id, Some(&web), "web").await;
    let name = "web.default.svc.switchyard.local";
    switchyard_tls::mesh_ca::verify_leaf(&before.roots[0].cert_pem, &early, name)
        .expect("signed by the old root during the window");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let after = id
        .roots(with(Some(&op), pb::RootsRequest {}))
        .await
        .expect("roots")
        .into_inner();
    assert_eq!(after.roots.len(), 2);
    let old = &after.roots[0];
    let new = &after.roots[1];
    assert_eq!(old.id, before.roots[0].id);
    assert!(!old.active && old.retire_at_ms == rotated.retire_at_ms);
    assert!(new.active && new.id == rotated.root_id && new.retire_at_ms == 0);
    assert_eq!(new.activate_at_ms, rotated.activate_at_ms);
    // New leaves come from the new root; the old leaf still verifies with the bundle.
    let new_leaf = leaf(&mut id, Some(&web), "web").await;
    switchyard_tls::mesh_ca::verify_leaf(&new.cert_pem, &new_leaf, name).expect("new root");
    assert!(switchyard_tls::mesh_ca::verify_leaf(&old.cert_pem, &new_leaf, name).is_err());
    switchyard_tls::mesh_ca::verify_leaf(&after.bundle, &old_leaf, name).expect("old leaf");
    switchyard_tls::mesh_ca::verify_leaf(&after.bundle, &new_leaf, name).expect("new leaf");
    // A watcher gets the bundle with both roots in its snapshot.
    let mut discovery =
        switchyard_proto::v1::discovery_client::DiscoveryClient::new(channel(addr).await);
    let mut stream = discovery
        .watch(with(
            Some(&web),
            pb::WatchRequest {
                namespace: String::new(),
                services: Vec::new(),
                since_revision: 0,
                cluster_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("event").expect("open");
    assert_eq!(first.trust_bundle, after.bundle);
}

#[tokio::test]
async fn signing_floods_are_refused() {
    let reg = TestRegistry::start_with(|c| c.mesh.csr_per_second = 1).await;
    let addr = reg.handle.grpc_addr;
    roots(addr, None).await;
    let mut id = IdentityClient::new(channel(addr).await);
    let mut refused = 0;
    for _ in 0..5 {
        if let Err(e) = id.certify(certify_req("web", forged_csr())).await {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
            assert!(e.message().contains("retry"), "{e}");
            refused += 1;
        }
    }
    assert!(refused >= 2, "a burst of 5 at 1/s: {refused} refused");
}

#[tokio::test]
async fn every_node_signs_with_the_same_root_and_it_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (nodes, addrs) = start_cluster(dir.path()).await;
    let first = roots(addrs[0], None).await;
    for a in addrs {
        let r = roots(a, None).await;
        assert_eq!(r.bundle, first.bundle, "one root for the cluster");
        let issued = IdentityClient::new(channel(a).await)
            .certify(certify_req("web", forged_csr()))
            .await
            .expect("every node signs")
            .into_inner();
        assert!(verifies(
            &first.bundle,
            &issued.leaf,
            "web.default.svc.switchyard.local"
        ));
    }
    for n in nodes {
        n.shutdown().await;
    }
    // A restarted node keeps its root (it is in the replicated state and snapshots).
    let data = dir.path().join("single");
    let node = start_in(switchyard_registry::RegistryConfig::new(data.clone())).await;
    let before = roots(node.grpc_addr, None).await;
    node.shutdown().await;
    let node = start_in(switchyard_registry::RegistryConfig::new(data)).await;
    let after = roots(node.grpc_addr, None).await;
    assert_eq!(after.bundle, before.bundle, "the root survives a restart");
    node.shutdown().await;
}

#[tokio::test]
async fn a_root_from_files_signs_the_leaves() {
    use switchyard_tls::generate;
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = generate::quickstart("file CA", &[], 30).expect("generate");
    generate::write(dir.path(), &bundle, false).expect("write");
    let reg = TestRegistry::start_with(|c| {
        c.mesh.ca_cert = Some(dir.path().join(generate::CA_CERT));
        c.mesh.ca_key = Some(dir.path().join(generate::CA_KEY));
    })
    .await;
    let addr = reg.handle.grpc_addr;
    let r = roots(addr, None).await;
    assert_eq!(r.bundle.trim(), bundle.ca_cert.trim());
    let issued = IdentityClient::new(channel(addr).await)
        .certify(certify_req("web", forged_csr()))
        .await
        .expect("signed with the file's key")
        .into_inner();
    assert!(verifies(
        &bundle.ca_cert,
        &issued.leaf,
        "web.default.svc.switchyard.local"
    ));
    // A root from files is rotated with new files, not by the registry.
    let e = IdentityClient::new(channel(addr).await)
        .rotate_root(pb::RotateRootRequest {})
        .await
        .expect_err("files");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("--mesh-ca-key"), "{e}");
}

#[tokio::test]
async fn the_mesh_ca_may_not_be_the_peer_ports_ca() {
    use switchyard_tls::generate;
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = generate::quickstart("one CA", &[], 30).expect("generate");
    generate::write(dir.path(), &bundle, false).expect("write");
    let mut config = switchyard_registry::RegistryConfig::new(dir.path().join("data"));
    config.tls = Some(switchyard_registry::TlsFiles {
        cert: dir.path().join(generate::CERT),
        key: dir.path().join(generate::KEY),
        ca: dir.path().join(generate::CA_CERT),
    });
    config.mesh.ca_cert = Some(dir.path().join(generate::CA_CERT));
    config.mesh.ca_key = Some(dir.path().join(generate::CA_KEY));
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    };
    let listeners = switchyard_registry::Listeners {
        grpc: bind().await,
        peer: bind().await,
        http: bind().await,
        dns: None,
    };
    let e = switchyard_registry::start(config, listeners)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("peer port"), "{e}");
}
