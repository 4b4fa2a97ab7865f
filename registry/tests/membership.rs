//! Membership changes are checked: a node that never catches up is not made a voter (the
//! hostile probe promoted `127.0.0.1:1`, leaving the cluster one failure from stopping),
//! and a removal that would leave no live majority is refused unless forced.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_testkit::*;
use tonic::Code;

#[tokio::test]
async fn a_node_that_never_catches_up_is_not_made_a_voter() {
    let reg = TestRegistry::start().await;
    let mut cluster = ClusterClient::new(reg.channel().await);
    let err = cluster
        .add_member(pb::AddMemberRequest {
            id: 2,
            address: "127.0.0.1:1".into(),
        })
        .await
        .expect_err("nothing answers on port 1");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("did not catch up"),
        "{}",
        err.message()
    );
    let members = cluster
        .members(pb::MembersRequest {})
        .await
        .expect("members")
        .into_inner()
        .members;
    assert_eq!(
        members.iter().map(|m| (m.id, m.voter)).collect::<Vec<_>>(),
        vec![(1, true)],
        "the learner was taken out again"
    );
    let mut registry = reg.registry().await;
    register(&mut registry, instance("web", "web-1", "1.0.0"), 10).await;
}

#[tokio::test]
async fn a_removal_that_leaves_no_live_majority_is_refused_unless_forced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ([n1, n2, n3], addrs) = start_cluster(dir.path()).await;
    let url = |a: SocketAddr| format!("http://{a}");
    // Three voters, one of them then stopped: removing a live one would leave two voters
    // of which one answers.
    eventually(Duration::from_secs(10), || async {
        let mut c = ClusterClient::connect(url(addrs[0])).await.ok()?;
        let s = c.status(pb::StatusRequest {}).await.ok()?.into_inner();
        (s.leader_id != 0 && s.members.iter().filter(|m| m.voter).count() == 3).then_some(())
    })
    .await;
    n3.shutdown().await;
    let err = eventually(Duration::from_secs(15), || async {
        let mut c = ClusterClient::connect(url(addrs[0])).await.ok()?;
        match c
            .remove_member(pb::RemoveMemberRequest {
                id: 2,
                force: false,
            })
            .await
        {
            Err(e) if e.code() == Code::FailedPrecondition => Some(e),
            _ => None,
        }
    })
    .await;
    assert!(err.message().contains("--force"), "{}", err.message());
    let mut c = ClusterClient::connect(url(addrs[0]))
        .await
        .expect("connect");
    let voters = c
        .members(pb::MembersRequest {})
        .await
        .expect("members")
        .into_inner()
        .members
        .iter()
        .filter(|m| m.voter)
        .count();
    assert_eq!(voters, 3, "nothing was removed");
    n1.shutdown().await;
    n2.shutdown().await;
}
