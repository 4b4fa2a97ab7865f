//! ACL tokens on real registries with real gRPC clients: allow until bootstrap, then
//! deny; a token for `web` cannot register `payments`, change a policy or renew another
//! service's lease; a read-only token cannot write; a deleted token stops working on
//! every node of a cluster; tokens survive a restart; DNS still answers.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::acl_client::AclClient;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_proto::v1::routing_client::RoutingClient;
use switchyard_testkit::*;
use tonic::transport::Channel;
use tonic::Code;

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

async fn channel(addr: std::net::SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

fn reg_req(service: &str, id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        instance: Some(instance(service, id, "1.0.0")),
        ttl_seconds: 30,
        lease_id: 0,
    }
}

/// Bootstraps ACLs; the operator token's secret.
async fn bootstrap(acl: &mut AclClient<Channel>) -> String {
    acl.bootstrap(pb::BootstrapRequest::default())
        .await
        .expect("bootstrap")
        .into_inner()
        .secret
}

async fn create(acl: &mut AclClient<Channel>, op: &str, req: pb::CreateTokenRequest) -> String {
    acl.create_token(with(Some(op), req))
        .await
        .expect("create token")
        .into_inner()
        .secret
}

#[tokio::test]
async fn tokens_decide_who_may_register_change_and_renew() {
    let reg = TestRegistry::start().await;
    let ch = channel(reg.handle.grpc_addr).await;
    let mut acl = AclClient::new(ch.clone());
    let mut r = RegistryClient::new(ch.clone());
    let mut routing = RoutingClient::new(ch.clone());
    let mut disc = DiscoveryClient::new(ch.clone());
    // Before bootstrap everything is allowed, without a token.
    let who = acl
        .who_am_i(with(None, pb::WhoAmIRequest {}))
        .await
        .expect("whoami");
    assert!(!who.into_inner().acl_enabled);
    r.register(with(None, reg_req("payments", "pay-1")))
        .await
        .expect("open before bootstrap");

    let boot = acl
        .bootstrap(pb::BootstrapRequest::default())
        .await
        .expect("bootstrap")
        .into_inner();
    let op = boot.secret.clone();
    assert_eq!(op.len(), 64, "32 random bytes, hex");
    let again = acl
        .bootstrap(pb::BootstrapRequest::default())
        .await
        .expect_err("once only");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again}");

    // Now deny by default; an unknown token is refused without echoing it.
    let e = r
        .register(with(None, reg_req("web", "web-1")))
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("register"), "{e}");
    let forged = "ab".repeat(32);
    let e = r
        .register(with(Some(&forged), reg_req("web", "web-1")))
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(!e.message().contains(&forged), "{e}");

    // A service identity for web: register web and read everything, nothing else.
    let web = create(
        &mut acl,
        &op,
        pb::CreateTokenRequest {
            description: "web's sidecar".into(),
            service_identity: "web".into(),
            ..Default::default()
        },
    )
    .await;
    let lease = r
        .register(with(Some(&web), reg_req("web", "web-1")))
        .await
        .expect("web registers web")
        .into_inner()
        .lease_id;
    let e = r
        .register(with(Some(&web), reg_req("payments", "fake-pay")))
        .await
        .expect_err("web cannot register payments");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("payments"), "{e}");
    let e = r
        .deregister(with(
            Some(&web),
            pb::DeregisterRequest {
                namespace: String::new(),
                id: "pay-1".into(),
            },
        ))
        .await
        .expect_err("nor deregister it");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = routing
        .put_policy(with(
            Some(&web),
            pb::PutPolicyRequest {
                namespace: String::new(),
                service: "payments".into(),
                policy: Some(canary_policy(&[("1.0.0", 100)])),
            },
        ))
        .await
        .expect_err("no policy right");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Renewing: its own lease yes, the lease of payments no.
    let pay_lease = r
        .register(with(Some(&op), reg_req("payments", "pay-2")))
        .await
        .expect("operator registers")
        .into_inner()
        .lease_id;
    let mut ka = r.clone();
    let own = ka
        .keep_alive(with(
            Some(&web),
            tokio_stream::iter(vec![pb::KeepAliveRequest {
                lease_ids: vec![lease],
            }]),
        ))
        .await
        .expect("keepalive")
        .into_inner()
        .message()
        .await
        .expect("answer")
        .expect("one");
    assert!(own.leases[0].found);
    let theirs = ka
        .keep_alive(with(
            Some(&web),
            tokio_stream::iter(vec![pb::KeepAliveRequest {
                lease_ids: vec![pay_lease],
            }]),
        ))
        .await
        .expect("stream opens")
        .into_inner()
        .message()
        .await
        .expect_err("refused");
    assert_eq!(theirs.code(), Code::PermissionDenied, "{theirs}");
    // Reads: web may resolve payments (service identity reads everything).
    disc.resolve(with(
        Some(&web),
        pb::ResolveRequest {
            namespace: String::new(),
            service: "payments".into(),
            version: String::new(),
        },
    ))
    .await
    .expect("read");

    // A read-only token cannot write; a list filtered by rules says so.
    let reader = create(
        &mut acl,
        &op,
        pb::CreateTokenRequest {
            rules: vec!["service:web:read".into()],
            ..Default::default()
        },
    )
    .await;
    let e = r
        .register(with(Some(&reader), reg_req("web", "web-9")))
        .await
        .expect_err("read only");
    assert_eq!(e.code(), Code::PermissionDenied);
    let listed = disc
        .list_services(with(Some(&reader), pb::ListServicesRequest::default()))
        .await
        .expect("list");
    assert_eq!(
        listed
            .metadata()
            .get("x-switchyard-filtered")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let names: Vec<String> = listed
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["web".to_string()]);
    // Only an operator manages tokens.
    let e = acl
        .list_tokens(with(Some(&web), pb::ListTokensRequest {}))
        .await
        .expect_err("not an operator");
    assert_eq!(e.code(), Code::PermissionDenied);

    // Bad rules are refused with INVALID_ARGUMENT.
    for bad in [
        "service:web:fly",
        "galaxy:web:read",
        "service:WEB:read",
        "service:web:",
    ] {
        let e = acl
            .create_token(with(
                Some(&op),
                pb::CreateTokenRequest {
                    rules: vec![bad.into()],
                    ..Default::default()
                },
            ))
            .await
            .expect_err(bad);
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e}");
    }
    // Bounded: at most 64 rules of at most 256 bytes each.
    let too_many: Vec<String> = (0..65).map(|i| format!("service:s{i}:read")).collect();
    let too_long = vec![format!("kv:{}:read", "k".repeat(300))];
    for rules in [too_many, too_long] {
        let e = acl
            .create_token(with(
                Some(&op),
                pb::CreateTokenRequest {
                    rules,
                    ..Default::default()
                },
            ))
            .await
            .expect_err("over the bounds");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    }

    // Listing never shows a secret; deleting a token stops it at once.
    let tokens = acl
        .list_tokens(with(Some(&op), pb::ListTokensRequest {}))
        .await
        .expect("list")
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 3);
    let text = format!("{tokens:?}");
    assert!(!text.contains(&web) && !text.contains(&op));
    let who = acl
        .who_am_i(with(Some(&reader), pb::WhoAmIRequest {}))
        .await
        .expect("whoami")
        .into_inner();
    acl.delete_token(with(
        Some(&op),
        pb::TokenRef {
            accessor_id: who.accessor_id,
        },
    ))
    .await
    .expect("delete");
    let e = disc
        .resolve(with(
            Some(&reader),
            pb::ResolveRequest {
                namespace: String::new(),
                service: "web".into(),
                version: String::new(),
            },
        ))
        .await
        .expect_err("deleted");
    assert_eq!(e.code(), Code::Unauthenticated);
    let m = reg.metrics().await;
    assert!(
        m.contains("switchyard_registry_acl_denials_total{method=\"Register\"}"),
        "{m}"
    );
    // DNS still answers after bootstrap.
    let dns = reg.handle.dns_addr.expect("dns");
    let answer = switchyard_testkit::dns::ask(
        dns,
        "web.service.switchyard.",
        hickory_proto::rr::RecordType::A,
    )
    .await;
    assert!(
        !switchyard_testkit::dns::ips(&answer).is_empty(),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_token_outlives_a_leader_change_and_a_delete_stops_it_on_every_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (nodes, addrs) = start_cluster(dir.path()).await;
    let mut acl = eventually(Duration::from_secs(10), || async {
        let mut c = AclClient::new(channel(addrs[1]).await);
        c.bootstrap(pb::BootstrapRequest::default())
            .await
            .ok()
            .map(|b| (c, b.into_inner().secret))
    })
    .await;
    let op = acl.1.clone();
    let web = create(
        &mut acl.0,
        &op,
        pb::CreateTokenRequest {
            service_identity: "web".into(),
            ..Default::default()
        },
    )
    .await;
    // Every node knows the token (applied state, no round trip).
    for a in addrs {
        eventually(Duration::from_secs(10), || async {
            let mut r = RegistryClient::new(channel(a).await);
            r.register(with(
                Some(&web),
                reg_req("web", &format!("web-{}", a.port())),
            ))
            .await
            .ok()
        })
        .await;
    }
    // The leader goes away: the token (in the replicated state) keeps working on the
    // nodes left, through the new leader.
    let leader_id = eventually(Duration::from_secs(10), || async {
        let mut c = ClusterClient::new(channel(addrs[0]).await);
        let m = c
            .members(with(Some(&op), pb::MembersRequest {}))
            .await
            .ok()?;
        let id = m.into_inner().leader_id;
        (id != 0).then_some(id)
    })
    .await;
    let mut alive = Vec::new();
    for (i, n) in nodes.into_iter().enumerate() {
        if i as u64 + 1 == leader_id {
            n.shutdown().await;
        } else {
            alive.push((n, addrs[i]));
        }
    }
    for (_, a) in &alive {
        let a = *a;
        eventually(Duration::from_secs(15), || async {
            let mut r = RegistryClient::new(channel(a).await);
            r.register(with(
                Some(&web),
                reg_req("web", &format!("web-new-leader-{}", a.port())),
            ))
            .await
            .ok()
        })
        .await;
    }
    let mut acl = AclClient::new(channel(alive[0].1).await);
    let who = acl
        .who_am_i(with(Some(&web), pb::WhoAmIRequest {}))
        .await
        .expect("whoami")
        .into_inner();
    acl.delete_token(with(
        Some(&op),
        pb::TokenRef {
            accessor_id: who.accessor_id,
        },
    ))
    .await
    .expect("delete");
    for (_, a) in &alive {
        let a = *a;
        eventually(Duration::from_secs(10), || async {
            let mut r = RegistryClient::new(channel(a).await);
            let e = r
                .register(with(Some(&web), reg_req("web", "web-late")))
                .await
                .err()?;
            (e.code() == Code::Unauthenticated).then_some(())
        })
        .await;
    }
    for (n, _) in alive {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn tokens_and_the_bootstrap_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || switchyard_registry::RegistryConfig::new(dir.path().to_path_buf());
    let reg = start_in(config()).await;
    let mut acl = AclClient::new(channel(reg.grpc_addr).await);
    let op = bootstrap(&mut acl).await;
    let web = create(
        &mut acl,
        &op,
        pb::CreateTokenRequest {
            service_identity: "web".into(),
            ..Default::default()
        },
    )
    .await;
    reg.shutdown().await;
    let reg = start_in(config()).await;
    let ch = channel(reg.grpc_addr).await;
    let mut r = RegistryClient::new(ch.clone());
    eventually(Duration::from_secs(10), || {
        let mut r = r.clone();
        let web = web.clone();
        async move {
            r.register(with(Some(&web), reg_req("web", "web-1")))
                .await
                .ok()
        }
    })
    .await;
    let e = r
        .register(with(None, reg_req("web", "web-2")))
        .await
        .expect_err("still deny by default");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = AclClient::new(ch)
        .bootstrap(pb::BootstrapRequest::default())
        .await
        .expect_err("still bootstrapped");
    assert_eq!(e.code(), Code::FailedPrecondition);
    reg.shutdown().await;
}

#[tokio::test]
async fn anonymous_and_dns_rules_decide_what_callers_without_a_token_see() {
    let reg = TestRegistry::start_with(|c| {
        c.acl = switchyard_registry::AclDefaults {
            anonymous: switchyard_core::model::acl::parse_anonymous_rules(&[
                "service:web:read".into()
            ])
            .expect("rule")
            .into(),
            dns: switchyard_core::model::acl::parse_dns_rules(&["service:web-*:read".into()])
                .expect("rule")
                .into(),
        };
    })
    .await;
    let ch = channel(reg.handle.grpc_addr).await;
    let mut acl = AclClient::new(ch.clone());
    let mut r = RegistryClient::new(ch.clone());
    let mut disc = DiscoveryClient::new(ch.clone());
    for (svc, id) in [("web", "w-1"), ("web-api", "wa-1"), ("payments", "p-1")] {
        r.register(with(None, reg_req(svc, id)))
            .await
            .expect("open before bootstrap");
    }
    let dns = reg.handle.dns_addr.expect("dns");
    let ask = |name: &'static str| async move {
        switchyard_testkit::dns::ask(dns, name, hickory_proto::rr::RecordType::A).await
    };
    // Before bootstrap DNS answers every service, whatever --dns-rule says.
    let before = ask("payments.service.switchyard.").await;
    assert!(
        !switchyard_testkit::dns::ips(&before).is_empty(),
        "{before:?}"
    );

    bootstrap(&mut acl).await;
    let resolve = |service: &str| pb::ResolveRequest {
        namespace: String::new(),
        service: service.into(),
        version: String::new(),
    };
    // The anonymous rule reads web, and nothing else; it never writes.
    let web = disc
        .resolve(with(None, resolve("web")))
        .await
        .expect("anonymous read of web")
        .into_inner();
    assert_eq!(web.instances.len(), 1);
    let e = disc
        .resolve(with(None, resolve("payments")))
        .await
        .expect_err("payments is outside the anonymous rules");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("service:payments:read"), "{e:?}");
    let e = r
        .register(with(None, reg_req("web", "w-2")))
        .await
        .expect_err("anonymous may not register");
    assert_eq!(e.code(), Code::PermissionDenied);
    let who = acl
        .who_am_i(with(None, pb::WhoAmIRequest {}))
        .await
        .expect("whoami")
        .into_inner();
    assert!(who.anonymous && who.acl_enabled);
    assert_eq!(who.rules, vec!["service:web:read".to_string()]);
    assert!(who.description.contains("service:web-*:read"), "{who:?}");

    // DNS answers by its own rule: web-* yes, payments REFUSED (not NXDOMAIN).
    let api = ask("web-api.service.switchyard.").await;
    assert!(!switchyard_testkit::dns::ips(&api).is_empty(), "{api:?}");
    let refused = ask("payments.service.switchyard.").await;
    assert_eq!(
        refused.metadata.response_code,
        hickory_proto::op::ResponseCode::Refused,
        "{refused:?}"
    );
    assert!(switchyard_testkit::dns::ips(&refused).is_empty());
    let unknown = ask("web-nope.service.switchyard.").await;
    assert_eq!(
        unknown.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
}

#[tokio::test]
async fn an_address_that_keeps_failing_authentication_backs_off() {
    let reg = TestRegistry::start().await;
    let ch = channel(reg.handle.grpc_addr).await;
    let mut acl = AclClient::new(ch.clone());
    let op = bootstrap(&mut acl).await;
    let mut disc = DiscoveryClient::new(ch.clone());
    let list = || pb::ListServicesRequest::default();
    let bogus = "0".repeat(64);
    let max = switchyard_registry::auth_backoff::MAX_FAILURES;
    for i in 0..max {
        let e = disc
            .list_services(with(Some(&bogus), list()))
            .await
            .expect_err("unknown token");
        assert_eq!(e.code(), Code::Unauthenticated, "attempt {i}: {e:?}");
    }
    // Now this address backs off, even with a good token.
    let e = disc
        .list_services(with(Some(&op), list()))
        .await
        .expect_err("backing off");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("retry in"), "{e:?}");
    assert!(!e.message().contains(&op) && !e.message().contains(&bogus));
    // Another address is not affected.
    let other = tonic::transport::Endpoint::from_shared(format!("http://{}", reg.handle.grpc_addr))
        .expect("url")
        .local_address(Some("127.0.0.2".parse().expect("ip")))
        .connect()
        .await
        .expect("connect from 127.0.0.2");
    DiscoveryClient::new(other)
        .list_services(with(Some(&op), list()))
        .await
        .expect("a different address is not backed off");
    // Health probes are never backed off.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is exempt");
    // The first back-off is one second.
    switchyard_testkit::wait::assert_eventually(
        Duration::from_secs(5),
        "the back-off ends",
        || {
            let mut disc = disc.clone();
            let op = op.clone();
            async move { disc.list_services(with(Some(&op), list())).await.is_ok() }
        },
    )
    .await;
    let m = reg.metrics().await;
    assert!(
        m.contains(&format!(
            "switchyard_registry_acl_auth_failures_total {max}"
        )),
        "{m}"
    );
    assert!(
        m.contains("switchyard_registry_acl_auth_backoff_refused_total "),
        "{m}"
    );
}
