//! The Routing service: put, get, history, rollback; policies in watch streams;
//! validation naming the field; durability.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::routing_client::RoutingClient;
use switchyard_testkit::*;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

/// The shared canary policy, with a version range, a regex header match and a route
/// weight of 1, so the registry keeps every field as given.
fn policy(default: &[(&str, u32)]) -> pb::Policy {
    let mut p = canary_policy(default);
    p.subsets[1] = pb::Subset {
        name: "canary".into(),
        version_range: ">=2.0.0, <3".into(),
        ..Default::default()
    };
    let route = &mut p.routes[0];
    route.headers[0].r#match = Some(pb::header_match::Match::Regex("^(true|1)$".into()));
    route.split = split(&[("canary", 1)]);
    p
}

async fn put(
    client: &mut RoutingClient<Channel>,
    service: &str,
    p: Option<pb::Policy>,
) -> Result<u64, tonic::Status> {
    client
        .put_policy(pb::PutPolicyRequest {
            namespace: String::new(),
            service: service.into(),
            policy: p,
        })
        .await
        .map(|r| r.into_inner().revision)
}

async fn current(client: &mut RoutingClient<Channel>, service: &str) -> Option<pb::PolicyRecord> {
    client
        .get_policy(pb::GetPolicyRequest {
            namespace: String::new(),
            service: service.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .current
}

#[tokio::test]
async fn policies_are_recorded_watched_and_rolled_back() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    let mut discovery = reg.discovery().await;
    let mut watch = open_watch(&mut discovery, watch_of(&["web"], 0)).await;
    next_event(&mut watch, WAIT).await;

    let mut client = reg.routing().await;
    let first = put(&mut client, "web", Some(policy(&[("stable", 100)])))
        .await
        .expect("put");
    let event = next_event(&mut watch, WAIT).await;
    assert_eq!(event.revision, first);
    match event.kind {
        Some(pb::watch_event::Kind::Delta(d)) => {
            assert_eq!(d.policies.len(), 1);
            assert_eq!(d.policies[0].service, "web");
            assert_eq!(
                d.policies[0].policy.as_ref().map(|p| p.default_split.len()),
                Some(1)
            );
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    let second = put(
        &mut client,
        "web",
        Some(policy(&[("stable", 90), ("canary", 10)])),
    )
    .await
    .expect("put");
    assert!(second > first);
    assert_eq!(next_event(&mut watch, WAIT).await.revision, second);
    let got = current(&mut client, "web").await.expect("a policy");
    assert_eq!(got.revision, second);
    assert_eq!(got.reason, "put");
    assert!(
        got.updated_at_unix_ms > 1_700_000_000_000,
        "wall-clock time recorded"
    );

    // Resolve and a fresh snapshot carry the policy.
    let resolved = resolve(&mut discovery, "web").await;
    assert_eq!(resolved.policy.map(|p| p.default_split.len()), Some(2));

    // Rollback (to the previous) is itself a new recorded change.
    let rolled = client
        .rollback_policy(pb::RollbackPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            to_revision: 0,
        })
        .await
        .expect("rollback")
        .into_inner();
    assert!(rolled.revision > second);
    let restored = rolled.restored.expect("record");
    assert_eq!(restored.reason, format!("rollback to {first}"));
    assert_eq!(restored.policy, Some(policy(&[("stable", 100)])));
    let event = next_event(&mut watch, WAIT).await;
    assert_eq!(event.revision, rolled.revision);

    // Rollback to a named revision.
    let again = client
        .rollback_policy(pb::RollbackPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            to_revision: second,
        })
        .await
        .expect("rollback to a revision")
        .into_inner();
    assert_eq!(
        again.restored.and_then(|r| r.policy),
        Some(policy(&[("stable", 90), ("canary", 10)]))
    );
    let history = client
        .policy_history(pb::PolicyHistoryRequest {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("history")
        .into_inner()
        .records;
    let reasons: Vec<&str> = history.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "put".to_string(),
            "put".into(),
            format!("rollback to {first}"),
            format!("rollback to {second}")
        ]
    );

    let missing = client
        .rollback_policy(pb::RollbackPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
            to_revision: 99_999,
        })
        .await
        .expect_err("no such revision");
    assert_eq!(missing.code(), Code::NotFound);
    let none = client
        .rollback_policy(pb::RollbackPolicyRequest {
            namespace: String::new(),
            service: "api".into(),
            to_revision: 0,
        })
        .await
        .expect_err("nothing to roll back");
    assert_eq!(none.code(), Code::FailedPrecondition);

    // Clearing the policy is recorded too; get answers none.
    put(&mut client, "web", None).await.expect("clear");
    assert!(current(&mut client, "web").await.is_none());
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn history_is_bounded() {
    let reg = TestRegistry::start().await;
    let mut client = reg.routing().await;
    let mut registry = reg.registry().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    for n in 1..=55u32 {
        put(&mut client, "web", Some(policy(&[("stable", n)])))
            .await
            .expect("put");
    }
    let history = client
        .policy_history(pb::PolicyHistoryRequest {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("history")
        .into_inner()
        .records;
    assert_eq!(history.len(), 50);
    assert_eq!(
        history[0]
            .policy
            .as_ref()
            .map(|p| p.default_split[0].weight),
        Some(6)
    );
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn bad_policies_are_refused_naming_the_field_and_never_recorded() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    let mut client = reg.routing().await;
    let mut cases: Vec<(&str, pb::Policy)> = Vec::new();
    cases.push((
        "policy.default_split[1].subset",
        policy(&[("stable", 90), ("canry", 10)]),
    ));
    cases.push((
        "policy.default_split",
        policy(&[("stable", 0), ("canary", 0)]),
    ));
    let mut p = policy(&[("stable", 1)]);
    p.routes[0].headers[0].r#match = Some(pb::header_match::Match::Regex("(oops".into()));
    cases.push(("policy.routes[0].headers[0].regex", p));
    let mut p = policy(&[("stable", 1)]);
    p.routes[0].headers[0].r#match = None;
    cases.push(("policy.routes[0].headers[0]", p));
    let mut p = policy(&[("stable", 1)]);
    p.subsets[1].version_range = "bananas".into();
    cases.push(("policy.subsets[1].version_range", p));
    let mut p = policy(&[("stable", 1)]);
    p.fallback = 7;
    cases.push(("policy.fallback", p));
    let mut p = policy(&[("stable", 1)]);
    p.subsets = (0..40)
        .map(|n| pb::Subset {
            name: format!("s{n}"),
            version: "1.0.0".into(),
            ..Default::default()
        })
        .collect();
    cases.push(("policy.subsets", p));
    let mut p = policy(&[("stable", 1)]);
    p.routes[0].headers[0].r#match = Some(pb::header_match::Match::Exact("v".repeat(20_000)));
    cases.push(("policy", p));
    for (field, p) in cases {
        let err = put(&mut client, "web", Some(p)).await.expect_err("refused");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("invalid {field}")),
            "{field}: {}",
            err.message()
        );
    }
    // A version some instance has stands in for a subset.
    put(&mut client, "web", Some(policy(&[("1.0.0", 1)])))
        .await
        .expect("a version is a subset");
    let history = client
        .policy_history(pb::PolicyHistoryRequest {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("history")
        .into_inner()
        .records;
    assert_eq!(history.len(), 1, "refused policies left no trace");
    let err = put(&mut client, "Web", Some(policy(&[("stable", 1)])))
        .await
        .expect_err("bad service");
    assert!(err.message().contains("service"));
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn policies_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || switchyard_registry::RegistryConfig::new(dir.path().to_path_buf());
    let first = start_in(config()).await;
    let mut client = RoutingClient::connect(format!("http://{}", first.grpc_addr))
        .await
        .expect("connect");
    let mut registry = switchyard_proto::v1::registry_client::RegistryClient::connect(format!(
        "http://{}",
        first.grpc_addr
    ))
    .await
    .expect("connect");
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    put(&mut client, "web", Some(policy(&[("stable", 1)])))
        .await
        .expect("put");
    let rev = put(&mut client, "web", Some(policy(&[("stable", 2)])))
        .await
        .expect("put");
    first.shutdown().await;
    let second = start_in(config()).await;
    let mut client = RoutingClient::connect(format!("http://{}", second.grpc_addr))
        .await
        .expect("connect");
    let got = current(&mut client, "web").await.expect("kept");
    assert_eq!(got.revision, rev);
    let history = client
        .policy_history(pb::PolicyHistoryRequest {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("history")
        .into_inner()
        .records;
    assert_eq!(history.len(), 2);
    second.shutdown().await;
}
