//! Every data-model rule is enforced at the edge with INVALID_ARGUMENT naming the field,
//! and a refused request changes nothing.

use switchyard_proto::v1 as pb;
use switchyard_testkit::*;
use tonic::Code;

async fn refused(reg: &TestRegistry, req: pb::RegisterRequest) -> tonic::Status {
    let mut registry = reg.registry().await;
    registry.register(req).await.expect_err("must be refused")
}

fn req(i: pb::Instance) -> pb::RegisterRequest {
    pb::RegisterRequest {
        instance: Some(i),
        ttl_seconds: 10,
        lease_id: 0,
    }
}

fn with(f: impl FnOnce(&mut pb::Instance)) -> pb::RegisterRequest {
    let mut i = instance("web", "web-1", "1.0.0");
    f(&mut i);
    req(i)
}

#[tokio::test]
async fn each_register_rule_names_its_field() {
    let reg = TestRegistry::start().await;
    // The first leader made the mesh CA (a change of its own; `start` waits for it): the
    // revision below moves only if a refused request changed something.
    let revision_before = {
        reg.discovery()
            .await
            .list_services(pb::ListServicesRequest {
                namespace: String::new(),
            })
            .await
            .expect("list")
            .into_inner()
            .revision
    };
    let cases: Vec<(&str, pb::RegisterRequest)> = vec![
        (
            "instance",
            pb::RegisterRequest {
                instance: None,
                ttl_seconds: 10,
                lease_id: 0,
            },
        ),
        ("instance.service", with(|i| i.service = "Web_Front".into())),
        ("instance.service", with(|i| i.service = String::new())),
        ("instance.service", with(|i| i.service = "a".repeat(64))),
        ("instance.namespace", with(|i| i.namespace = "-prod".into())),
        ("instance.id", with(|i| i.id = String::new())),
        ("instance.id", with(|i| i.id = "x".repeat(129))),
        ("instance.id", with(|i| i.id = "has space".into())),
        ("instance.address", with(|i| i.address = String::new())),
        ("instance.address", with(|i| i.address = "bad host!".into())),
        ("instance.address", with(|i| i.address = "0.0.0.0".into())),
        ("instance.port", with(|i| i.port = 0)),
        ("instance.port", with(|i| i.port = 70_000)),
        ("instance.version", with(|i| i.version = String::new())),
        ("instance.version", with(|i| i.version = "1.0/beta".into())),
        ("instance.version", with(|i| i.version = "v".repeat(65))),
        (
            "instance.labels",
            with(|i| {
                for n in 0..65 {
                    i.labels.insert(format!("k{n}"), "v".into());
                }
            }),
        ),
        (
            "instance.labels",
            with(|i| {
                i.labels.insert("big".into(), "v".repeat(4_100));
            }),
        ),
        (
            "instance.labels[",
            with(|i| {
                i.labels.insert("no spaces".into(), "v".into());
            }),
        ),
        ("instance.weight", with(|i| i.weight = 10_001)),
        ("instance.zone", with(|i| i.zone = "eu west".into())),
        ("instance.state", with(|i| i.state = 42)),
        (
            "ttl_seconds",
            pb::RegisterRequest {
                instance: Some(instance("web", "web-1", "1.0.0")),
                ttl_seconds: 3_601,
                lease_id: 0,
            },
        ),
    ];
    for (field, request) in cases {
        let status = refused(&reg, request).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{field}: {}",
            status.message()
        );
        assert!(
            status.message().starts_with(&format!("invalid {field}")),
            "message names {field}: {}",
            status.message()
        );
    }
    // Nothing of it reached the catalog.
    let mut discovery = reg.discovery().await;
    let list = discovery
        .list_services(pb::ListServicesRequest {
            namespace: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(list.services.is_empty());
    assert_eq!(list.revision, revision_before);
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn other_requests_validate_their_fields() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    let check = |s: tonic::Status, field: &str| {
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {}", s.message());
        assert!(s.message().contains(field), "{field}: {}", s.message());
    };
    check(
        registry
            .deregister(pb::DeregisterRequest {
                namespace: "Bad".into(),
                id: "x".into(),
            })
            .await
            .expect_err("bad namespace"),
        "namespace",
    );
    check(
        registry
            .deregister(pb::DeregisterRequest {
                namespace: String::new(),
                id: String::new(),
            })
            .await
            .expect_err("empty id"),
        "id",
    );
    check(
        registry
            .set_state(pb::SetStateRequest {
                namespace: String::new(),
                id: "x".into(),
                state: 0,
            })
            .await
            .expect_err("unspecified state"),
        "state",
    );
    check(
        discovery
            .resolve(pb::ResolveRequest {
                namespace: String::new(),
                service: "UPPER".into(),
                version: String::new(),
            })
            .await
            .expect_err("bad service"),
        "service",
    );
    check(
        discovery
            .resolve(pb::ResolveRequest {
                namespace: String::new(),
                service: "web".into(),
                version: "a b".into(),
            })
            .await
            .expect_err("bad version"),
        "version",
    );
    check(
        discovery
            .watch(pb::WatchRequest {
                namespace: String::new(),
                services: vec!["ok".into(), "NOT_OK".into()],
                since_revision: 0,
                cluster_id: String::new(),
                ..Default::default()
            })
            .await
            .expect_err("bad service filter"),
        "services[1]",
    );
    check(
        discovery
            .watch(pb::WatchRequest {
                namespace: String::new(),
                services: (0..257).map(|n| format!("s{n}")).collect(),
                since_revision: 0,
                cluster_id: String::new(),
                ..Default::default()
            })
            .await
            .expect_err("too many services"),
        "services",
    );
    check(
        discovery
            .list_services(pb::ListServicesRequest {
                namespace: "a_b".into(),
            })
            .await
            .expect_err("bad namespace"),
        "namespace",
    );
    let missing = registry
        .set_state(pb::SetStateRequest {
            namespace: String::new(),
            id: "nobody".into(),
            state: pb::State::Draining as i32,
        })
        .await
        .expect_err("unknown instance");
    assert_eq!(missing.code(), Code::NotFound);
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn oversized_messages_are_refused_before_decoding() {
    let reg = TestRegistry::start().await;
    let status = refused(
        &reg,
        with(|i| {
            i.labels.insert("huge".into(), "v".repeat(2 * 1024 * 1024));
        }),
    )
    .await;
    // gRPC's code for "too large" (tonic says OUT_OF_RANGE; the registry rewrites it).
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(status.message().contains("1 MiB"), "{}", status.message());
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn the_instance_limit_refuses_without_half_applying() {
    let reg = TestRegistry::start_with(|c| c.limits.max_instances = 2).await;
    let mut registry = reg.registry().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 10).await;
    let second = register(&mut registry, instance("web", "web-2", "1.0.0"), 10).await;
    let status = registry
        .register(req(instance("web", "web-3", "1.0.0")))
        .await
        .expect_err("over the limit");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    // An update of an existing instance is still allowed at the limit.
    register(&mut registry, instance("web", "web-2", "1.0.1"), 10).await;
    let m = reg.metrics().await;
    assert_eq!(metric(&m, "switchyard_registry_instances"), Some(2.0));
    assert_eq!(
        metric(&m, "switchyard_registry_leases"),
        Some(2.0),
        "the refused register left no lease behind"
    );
    assert!(second.revision > 0);
    reg.handle.shutdown().await;
}
