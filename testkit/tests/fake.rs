//! The fake registry itself: what a watcher, Resolve and ListServices see of the pushes.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_testkit::*;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn pushes_reach_watchers_resolve_and_list_services() {
    let fake = FakeRegistry::start().await;
    fake.push(proto::snapshot_of(
        3,
        vec![
            instance("web", "web-1", "1.0.0"),
            instance("web", "web-2", "2.0.0"),
        ],
    ));
    let mut client = DiscoveryClient::connect(fake.url()).await.expect("connect");
    let mut stream = open_watch(&mut client, watch_all(0)).await;
    let mut view = View::default();
    view.apply(next_event(&mut stream, WAIT).await);
    assert_eq!((view.revision, view.snapshots), (3, 1));
    assert_eq!(view.instances.len(), 2);

    assert_eq!(fake.remove("web", "web-1"), 4);
    fake.set_policy("web", Some(canary_policy(&[("stable", 100)])));
    view.apply(next_event(&mut stream, WAIT).await);
    view.apply(next_event(&mut stream, WAIT).await);
    assert_eq!(view.revision, 5);
    assert_eq!(view.instances.keys().collect::<Vec<_>>(), ["web-2"]);

    let resolved = resolve(&mut client, "web").await;
    assert_eq!(resolved.revision, 5);
    assert_eq!(resolved.instances.len(), 1);
    assert!(resolved.policy.is_some());
    let listed = client
        .list_services(pb::ListServicesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.services.len(), 1);
    assert_eq!(listed.services[0].versions, ["2.0.0"]);
    assert_eq!(fake.nth_watch(1, WAIT).await.since_revision, 0);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_resume_at_the_current_revision_gets_nothing_and_dropped_streams_end() {
    let fake = FakeRegistry::start().await;
    let rev = fake.upsert(vec![instance("web", "web-1", "1.0.0")]);
    let mut client = DiscoveryClient::connect(fake.url()).await.expect("connect");
    let mut stream = open_watch(&mut client, watch_all(rev)).await;
    assert_eq!(fake.watchers(), 1);
    // Nothing is sent for a resume at the current revision: the next message is the
    // end of the stream once the fake drops it.
    fake.drop_streams();
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("in time")
        .expect("a clean end");
    assert!(
        end.is_none(),
        "no snapshot for an up-to-date watcher: {end:?}"
    );

    fake.refuse_watches();
    let refused = client.watch(watch_all(rev)).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(fake.requests().len(), 2);
    fake.shutdown().await;
}
