//! `switchyard.v1.Rollouts` at the edge: each rule refuses bad input with a clear status
//! and changes nothing; at most one rollout per service is active; a newer canary
//! supersedes the running one; retry and undo. A real registry on loopback, a real
//! gRPC client.

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::rollouts_client::RolloutsClient;
use switchyard_testkit::*;
use tonic::transport::Channel;
use tonic::Code;

async fn rollouts(r: &TestRegistry) -> RolloutsClient<Channel> {
    RolloutsClient::new(r.channel().await)
}

fn start(canary: &str, tune: impl FnOnce(&mut pb::RolloutSpec)) -> pb::StartRolloutRequest {
    let mut spec = pb::RolloutSpec {
        canary: canary.into(),
        pause_ms: 600_000,
        ..Default::default()
    };
    tune(&mut spec);
    pb::StartRolloutRequest {
        namespace: String::new(),
        service: "web".into(),
        spec: Some(spec),
    }
}

fn web() -> pb::RolloutRef {
    pb::RolloutRef {
        namespace: String::new(),
        service: "web".into(),
    }
}

fn phase(r: &pb::RolloutResponse) -> pb::RolloutPhase {
    r.rollout
        .as_ref()
        .and_then(|r| r.status.as_ref())
        .map_or(pb::RolloutPhase::Unspecified, |s| s.phase())
}

async fn serving(reg: &TestRegistry) {
    let mut c = reg.registry().await;
    register(&mut c, instance("web", "web-1", "1.0.0"), 60).await;
    register(&mut c, instance("web", "web-2", "2.0.0"), 60).await;
    register(&mut c, instance("web", "web-3", "3.0.0"), 60).await;
}

#[tokio::test]
async fn bad_specs_are_refused_with_the_field_and_change_nothing() {
    let reg = TestRegistry::start().await;
    serving(&reg).await;
    let mut c = rollouts(&reg).await;
    let cases: Vec<(pb::StartRolloutRequest, &str)> = vec![
        (
            start("2.0.0", |s| s.steps = vec![50, 25, 100]),
            "rollout.steps",
        ),
        (start("2.0.0", |s| s.steps = vec![5, 50]), "rollout.steps"),
        (start("2.0.0", |s| s.alpha = 2.0), "rollout.alpha"),
        (start("2.0.0", |s| s.tolerance = 0.5), "rollout.tolerance"),
        (
            start("2.0.0", |s| s.baseline = "2.0.0".into()),
            "rollout.baseline",
        ),
        (
            start("2.0.0", |s| s.step_deadline_ms = 1),
            "rollout.step_deadline",
        ),
        (
            start("2.0.0", |s| s.on_insufficient_traffic = 9),
            "rollout.on_insufficient_traffic",
        ),
        (
            start("2.0.0", |s| {
                s.webhooks = vec![pb::Webhook {
                    r#type: "pre-rollout".into(),
                    url: "https://secure.example/".into(),
                }]
            }),
            "rollout.webhooks[0].url",
        ),
        (
            start("2.0.0", |s| {
                s.webhooks = vec![pb::Webhook {
                    r#type: "after-party".into(),
                    url: "http://hooks.test/".into(),
                }]
            }),
            "rollout.webhooks[0].type",
        ),
        (start("", |_| {}), "rollout.canary"),
    ];
    for (req, field) in cases {
        let e = c.start(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let mut bad_name = start("2.0.0", |_| {});
    bad_name.service = "Not A Service".into();
    assert_eq!(
        c.start(bad_name).await.expect_err("name").code(),
        Code::InvalidArgument
    );
    // Nothing was created.
    assert_eq!(c.get(web()).await.expect_err("none").code(), Code::NotFound);
    let list = c
        .list(pb::ListRolloutsRequest::default())
        .await
        .expect("list");
    assert!(list.into_inner().rollouts.is_empty());
}

#[tokio::test]
async fn one_active_rollout_per_service_and_a_newer_canary_supersedes_it() {
    let reg = TestRegistry::start().await;
    let mut c = rollouts(&reg).await;
    // Without a serving version there is no baseline to fall back on.
    let e = c
        .start(start("2.0.0", |_| {}))
        .await
        .expect_err("no baseline");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    serving(&reg).await;
    let first = c
        .start(start("2.0.0", |s| s.baseline = "1.0.0".into()))
        .await
        .expect("start")
        .into_inner();
    assert_ne!(phase(&first), pb::RolloutPhase::Unspecified);
    let again = c
        .start(start("2.0.0", |s| s.baseline = "1.0.0".into()))
        .await
        .expect_err("same canary");
    assert_eq!(again.code(), Code::AlreadyExists, "{again}");
    // A newer canary supersedes the running rollout.
    let newer = c
        .start(start("3.0.0", |s| s.baseline = "1.0.0".into()))
        .await
        .expect("newer")
        .into_inner();
    let r = newer.rollout.as_ref().expect("rollout");
    assert_eq!(r.spec.as_ref().map(|s| s.canary.as_str()), Some("3.0.0"));
    // Retry needs an aborted rollout.
    let e = c.retry(web()).await.expect_err("not aborted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let aborted = c.abort(web()).await.expect("abort").into_inner();
    assert_eq!(phase(&aborted), pb::RolloutPhase::Aborted);
    let e = c.abort(web()).await.expect_err("already over");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let retried = c.retry(web()).await.expect("retry").into_inner();
    assert!(matches!(
        phase(&retried),
        pb::RolloutPhase::Pending | pb::RolloutPhase::Initializing | pb::RolloutPhase::Progressing
    ));
    // Undo of a rollout started with no policy before it: everything to the baseline.
    let undone = c
        .undo(pb::UndoRolloutRequest {
            namespace: String::new(),
            service: "web".into(),
            to_revision: 0,
        })
        .await
        .expect("undo")
        .into_inner();
    assert_eq!(phase(&undone), pb::RolloutPhase::Aborted);
    let policy = reg
        .routing()
        .await
        .get_policy(pb::GetPolicyRequest {
            namespace: String::new(),
            service: "web".into(),
        })
        .await
        .expect("policy")
        .into_inner()
        .current
        .and_then(|r| r.policy)
        .expect("a policy");
    assert_eq!(policy.default_split.len(), 1);
    assert_eq!(policy.default_split[0].subset, "1.0.0");
    // An unknown revision to undo to is refused and changes nothing.
    let e = c
        .undo(pb::UndoRolloutRequest {
            namespace: String::new(),
            service: "web".into(),
            to_revision: 999_999,
        })
        .await
        .expect_err("no such revision");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // Only the newest of each service is listed.
    let list = c
        .list(pb::ListRolloutsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.rollouts.len(), 1);
}

#[tokio::test]
async fn a_restart_keeps_the_rollout_its_state_and_its_evidence() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || switchyard_registry::RegistryConfig::new(dir.path().to_path_buf());
    let reg = start_in(config()).await;
    let url = format!("http://{}", reg.grpc_addr);
    let mut c = RolloutsClient::connect(url.clone()).await.expect("connect");
    let mut r = switchyard_proto::v1::registry_client::RegistryClient::connect(url)
        .await
        .expect("connect");
    register(&mut r, instance("web", "web-1", "1.0.0"), 60).await;
    register(&mut r, instance("web", "web-2", "2.0.0"), 60).await;
    c.start(start("2.0.0", |s| s.steps = vec![30, 100]))
        .await
        .expect("start");
    let before = eventually(std::time::Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = c.get(web()).await.ok()?.into_inner().rollout?;
            (r.status.as_ref()?.weight == 30).then_some(r)
        }
    })
    .await;
    reg.shutdown().await;
    let reg = start_in(config()).await;
    let c = RolloutsClient::connect(format!("http://{}", reg.grpc_addr))
        .await
        .expect("connect");
    // The log is replayed after the snapshot: wait for the rollout's generation.
    let want = before.status.as_ref().map_or(0, |s| s.generation);
    let after = eventually(std::time::Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = c.get(web()).await.ok()?.into_inner().rollout?;
            (r.status.as_ref()?.generation >= want).then_some(r)
        }
    })
    .await;
    let (b, a) = (
        before.status.as_ref().expect("status"),
        after.status.as_ref().expect("status"),
    );
    assert_eq!(a.generation, b.generation);
    assert_eq!(a.weight, 30);
    assert_eq!(a.phase(), pb::RolloutPhase::Progressing);
    assert_eq!(a.evidence, b.evidence);
    assert_eq!(after.spec, before.spec);
    reg.shutdown().await;
}
