//! Watch: snapshot then deltas, service filters, resume from a revision, resync of a
//! watcher that falls behind.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_testkit::*;
use tonic::transport::Endpoint;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_watcher_sees_registrations_and_deregistrations() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;

    let mut stream = open_watch(&mut discovery, watch_all(0)).await;
    let mut view = View::default();
    view.apply(next_event(&mut stream, WAIT).await);
    assert_eq!(view.snapshots, 1, "the first event is a snapshot");
    assert!(view.instances.contains_key("web-1"));

    let r = register(&mut registry, instance("web", "web-2", "1.1.0"), 30).await;
    let event = next_event(&mut stream, WAIT).await;
    assert_eq!(event.revision, r.revision);
    view.apply(event);
    assert_eq!(view.instances["web-2"].version, "1.1.0");

    let d = registry
        .deregister(pb::DeregisterRequest {
            namespace: String::new(),
            id: "web-1".into(),
        })
        .await
        .expect("deregister")
        .into_inner();
    let event = next_event(&mut stream, WAIT).await;
    assert_eq!(event.revision, d.revision);
    view.apply(event);
    assert!(!view.instances.contains_key("web-1"));

    // Deregistering again is NOT_FOUND and changes nothing.
    let err = registry
        .deregister(pb::DeregisterRequest {
            namespace: String::new(),
            id: "web-1".into(),
        })
        .await
        .expect_err("already gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn set_state_reaches_watchers_and_resolve() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    register(&mut registry, instance("api", "api-1", "2.0.0"), 30).await;
    let mut stream = open_watch(&mut discovery, watch_all(0)).await;
    next_event(&mut stream, WAIT).await;
    registry
        .set_state(pb::SetStateRequest {
            namespace: String::new(),
            id: "api-1".into(),
            state: pb::State::Draining as i32,
        })
        .await
        .expect("set state");
    let mut view = View::default();
    view.apply(next_event(&mut stream, WAIT).await);
    assert_eq!(view.instances["api-1"].state, pb::State::Draining as i32);
    let resolved = resolve(&mut discovery, "api").await;
    assert_eq!(resolved.instances[0].state, pb::State::Draining as i32);
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn watch_filters_by_service_and_namespace() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    let mut stream = open_watch(&mut discovery, watch_of(&["payments"], 0)).await;
    let first = next_event(&mut stream, WAIT).await;
    assert!(
        matches!(first.kind, Some(pb::watch_event::Kind::Snapshot(ref s)) if s.services.is_empty())
    );

    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    let mut other_ns = instance("payments", "pay-staging", "1.0.0");
    other_ns.namespace = "staging".into();
    register(&mut registry, other_ns, 30).await;
    let r = register(&mut registry, instance("payments", "pay-1", "1.0.0"), 30).await;

    // The only event is the one for payments in the default namespace.
    let event = next_event(&mut stream, WAIT).await;
    assert_eq!(event.revision, r.revision);
    let mut view = View::default();
    view.apply(event);
    assert_eq!(view.instances.keys().collect::<Vec<_>>(), vec!["pay-1"]);

    let services = discovery
        .list_services(pb::ListServicesRequest {
            namespace: "staging".into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(services.services.len(), 1);
    assert_eq!(services.services[0].name, "payments");
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn a_watcher_resumes_from_a_revision_without_a_snapshot() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    let first = register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    let second = register(&mut registry, instance("web", "web-2", "1.0.0"), 30).await;
    let third = register(&mut registry, instance("web", "web-3", "1.0.0"), 30).await;

    let mut stream = open_watch(&mut discovery, watch_all(first.revision)).await;
    let mut revisions = Vec::new();
    for _ in 0..2 {
        let e = next_event(&mut stream, WAIT).await;
        assert!(
            matches!(e.kind, Some(pb::watch_event::Kind::Delta(_))),
            "a resumed watch sends deltas only"
        );
        revisions.push(e.revision);
    }
    assert_eq!(revisions, vec![second.revision, third.revision]);

    // Resuming from the current revision sends nothing until the next change.
    let mut caught_up = open_watch(&mut discovery, watch_all(third.revision)).await;
    let fourth = register(&mut registry, instance("web", "web-4", "1.0.0"), 30).await;
    assert_eq!(
        next_event(&mut caught_up, WAIT).await.revision,
        fourth.revision
    );
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn a_resume_older_than_the_history_gets_a_snapshot() {
    let reg = TestRegistry::start_with(|c| c.watch_history = 2).await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    let first = register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    for n in 2..=5 {
        register(
            &mut registry,
            instance("web", &format!("web-{n}"), "1.0.0"),
            30,
        )
        .await;
    }
    let mut stream = open_watch(&mut discovery, watch_all(first.revision)).await;
    let mut view = View::default();
    view.apply(next_event(&mut stream, WAIT).await);
    assert_eq!(view.snapshots, 1);
    assert_eq!(view.instances.len(), 5);
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn a_lagging_watcher_is_resynced_and_never_slows_registration() {
    const N: usize = 200;
    let reg = TestRegistry::start_with(|c| c.watch_buffer = 8).await;
    // A client that accepts only 1 KiB before it must read: it falls behind at once.
    let slow = Endpoint::from_shared(reg.url())
        .expect("url")
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    let mut discovery = switchyard_proto::v1::discovery_client::DiscoveryClient::new(slow);
    let mut stream = open_watch(&mut discovery, watch_all(0)).await;
    let mut view = View::default();
    view.apply(next_event(&mut stream, WAIT).await);

    // Every registration completes while the watcher reads nothing.
    let mut last = 0;
    let mut tasks = Vec::new();
    for worker in 0..10 {
        let mut registry = reg.registry().await;
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for n in 0..N / 10 {
                let id = format!("web-{worker}-{n}");
                last = last.max(
                    register(&mut registry, instance("web", &id, "1.0.0"), 60)
                        .await
                        .revision,
                );
            }
            last
        }));
    }
    for t in tasks {
        last = last.max(t.await.expect("registrations complete"));
    }

    // Now read: the watcher converges to the full catalog, via at least one resync.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while view.revision < last || view.instances.len() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher did not converge: {} of {N} at revision {}",
            view.instances.len(),
            view.revision
        );
        view.apply(next_event(&mut stream, WAIT).await);
    }
    assert_eq!(view.instances.len(), N);
    assert!(
        view.snapshots >= 2,
        "the watcher was resynced with a snapshot"
    );
    let resyncs = metric(
        &reg.metrics().await,
        "switchyard_registry_watch_resyncs_total",
    );
    assert!(
        resyncs.unwrap_or(0.0) >= 1.0,
        "resyncs are counted: {resyncs:?}"
    );
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_watch_streams() {
    let reg = TestRegistry::start().await;
    let mut discovery = reg.discovery().await;
    let mut stream = open_watch(&mut discovery, watch_all(0)).await;
    next_event(&mut stream, WAIT).await;
    tokio::time::timeout(WAIT, reg.handle.shutdown())
        .await
        .expect("graceful shutdown completes with a watch open");
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Ok(Some(_))), "no event after shutdown");
}

/// A revision is meaningful only in the cluster that issued it: a watcher that brings
/// another cluster's id (its registry was wiped, or its cache came from elsewhere) gets
/// a snapshot whatever `since_revision` says; one of this cluster resumes with deltas.
#[tokio::test]
async fn a_watcher_from_another_cluster_starts_over_with_a_snapshot() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let discovery = reg.discovery().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 30).await;
    register(&mut registry, instance("web", "web-2", "1.0.0"), 30).await;
    let ours = eventually(WAIT, || {
        let mut discovery = discovery.clone();
        async move {
            let mut s = discovery.watch(watch_all(0)).await.ok()?.into_inner();
            let e = next_event(&mut s, WAIT).await;
            (!e.cluster_id.is_empty()).then_some(e.cluster_id)
        }
    })
    .await;
    let first = |mut req: pb::WatchRequest, id: &str| {
        req.cluster_id = id.to_string();
        let mut discovery = discovery.clone();
        async move {
            let mut s = discovery.watch(req).await.expect("watch").into_inner();
            next_event(&mut s, WAIT).await
        }
    };
    let resumed = first(watch_all(1), &ours).await;
    assert!(
        matches!(resumed.kind, Some(pb::watch_event::Kind::Delta(_))),
        "same cluster: deltas since revision 1"
    );
    assert_eq!(resumed.cluster_id, ours, "every event carries the id");
    let other = first(watch_all(1), "0123456789abcdef0123456789abcdef").await;
    assert!(
        matches!(other.kind, Some(pb::watch_event::Kind::Snapshot(_))),
        "another cluster's revision is not trusted: {other:?}"
    );
    assert_eq!(other.cluster_id, ours);
}

/// Found by the chaos test: a watcher that resumed on a node behind the revision it had
/// seen (a node just restarted, or resumed after SIGSTOP) was sent that node's older
/// snapshot, so its revisions went backwards. It is now told UNAVAILABLE, naming both
/// revisions, and resumes elsewhere or a moment later.
#[tokio::test]
async fn a_watcher_ahead_of_this_node_is_sent_elsewhere_not_back_in_time() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let mut discovery = reg.discovery().await;
    let revision = register(&mut registry, instance("web", "web-1", "1.0.0"), 30)
        .await
        .revision;
    let mut s = discovery
        .watch(watch_all(0))
        .await
        .expect("watch")
        .into_inner();
    let ours = next_event(&mut s, WAIT).await.cluster_id;
    assert!(!ours.is_empty());
    let mut ahead = watch_all(revision + 50);
    ahead.cluster_id = ours;
    let refused = match discovery.watch(ahead).await {
        Err(status) => status,
        Ok(stream) => stream
            .into_inner()
            .message()
            .await
            .expect_err("no event from behind the watcher"),
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(
        refused.message().contains(&format!("revision {revision}"))
            && refused.message().contains("another node"),
        "{refused}"
    );
}
