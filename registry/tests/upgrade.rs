//! Rolling upgrades and overload, against real registries on loopback:
//!
//! - a cluster whose members all run this release moves to its log format (and says so
//!   in its metrics); a node that answers like a release before formats is then refused
//!   as a member, naming both formats;
//! - a command of a kind from a newer release is refused by name on the peer port (as
//!   `Forward` and inside `AppendEntries`), and nothing is applied;
//! - a leader with more writes than it may queue refuses the excess with
//!   RESOURCE_EXHAUSTED and a `grpc-retry-pushback-ms` hint, and every acknowledged
//!   write is there.
//!
//! The mixed-version test with the previous release built from its tag is
//! `tests/upgrade/rolling.sh` (it builds 0.1.0, so it runs in `.ci/run`, not here).

use std::time::Duration;

use switchyard_proto::internal::raft_internal_client::RaftInternalClient;
use switchyard_proto::internal::RaftMessage;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_registry::catalog::format::{FORMAT, KINDS};
use switchyard_registry::catalog::Command;
use switchyard_testkit::*;

async fn cluster_format(http: std::net::SocketAddr) -> Option<f64> {
    let (_, text) = http_get(http, "/metrics").await;
    metric(&text, "switchyard_registry_cluster_format")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_this_release_moves_to_its_format_and_then_refuses_an_older_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, addrs) = start_cluster(dir.path()).await;
    for n in &nodes {
        let http = n.http_addr;
        assert_eventually(
            Duration::from_secs(20),
            "every member reports the cluster at this release's format",
            || async move { cluster_format(http).await == Some(f64::from(FORMAT)) },
        )
        .await;
        let (_, text) = http_get(http, "/metrics").await;
        assert_eq!(
            metric(&text, "switchyard_registry_node_format"),
            Some(f64::from(FORMAT))
        );
    }

    // A gRPC server without the internal service answers `Hello` UNIMPLEMENTED, as a
    // node of a release before formats does.
    let old = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let old_addr = old.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(old)),
    );
    let mut cluster = ClusterClient::connect(format!("http://{}", addrs[0]))
        .await
        .expect("connect");
    let refused = cluster
        .add_member(pb::AddMemberRequest {
            id: 9,
            address: old_addr.to_string(),
        })
        .await
        .expect_err("an older node may not join a cluster at a newer format");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    let m = refused.message();
    assert!(
        m.contains("log format 1")
            && m.contains(&format!("log format {FORMAT}"))
            && m.contains("downgrades are not supported"),
        "{m}"
    );
    let members = cluster
        .members(pb::MembersRequest {})
        .await
        .expect("members")
        .into_inner();
    assert_eq!(members.members.len(), 3, "nothing was added: {members:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_from_a_newer_release_is_refused_by_name_and_nothing_is_applied() {
    let reg = TestRegistry::start().await;
    let before = reg.metrics().await;
    let mut peer = RaftInternalClient::connect(format!("http://{}", reg.handle.peer_addr))
        .await
        .expect("connect");

    // As a forwarded command: the kind is the first byte.
    let unknown = u8::try_from(KINDS).expect("a one-byte kind");
    let refused = peer
        .forward(RaftMessage {
            data: vec![unknown, 1, 2, 3],
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused
            .message()
            .contains(&format!("command kind {unknown}"))
            && refused.message().contains("newer release"),
        "{}",
        refused.message()
    );

    // Inside AppendEntries, as a newer leader would send it: this node's own entry with
    // the kind of its command changed (the marker format 0x7777 is 0xF7 0xEE 0x01).
    let entry = openraft::Entry::<switchyard_registry::raft::TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 1_000),
        payload: openraft::EntryPayload::Normal(Command::SetClusterFormat { format: 0x7777 }),
    };
    let request = openraft::raft::AppendEntriesRequest::<switchyard_registry::raft::TypeConfig> {
        vote: openraft::Vote::new_committed(1, 1),
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: None,
    };
    let mut data = switchyard_registry::raft::encode(&request).expect("encode");
    let at = data
        .windows(4)
        .position(|w| w == [24, 0xF7, 0xEE, 0x01])
        .expect("the marker");
    data[at] = unknown;
    let refused = peer
        .append_entries(RaftMessage { data })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("upgrade it"),
        "{}",
        refused.message()
    );

    let after = reg.metrics().await;
    assert_eq!(
        metric(&before, "switchyard_registry_revision"),
        metric(&after, "switchyard_registry_revision"),
        "nothing was applied"
    );
    // And the node still takes writes.
    let mut client = reg.registry().await;
    register(&mut client, instance("web", "web-1", "1.0.0"), 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_leader_refuses_the_excess_with_a_retry_hint_and_loses_nothing() {
    let reg = TestRegistry::start_with(|c| c.max_pending_writes = 16).await;
    const N: usize = 600;
    let mut tasks = Vec::new();
    // Several connections, so that the writes reach the leader together.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(reg.registry().await);
    }
    for n in 0..N {
        let mut client = clients[n % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("web-{n}");
            let r = client
                .register(pb::RegisterRequest {
                    instance: Some(instance("web", &id, "1.0.0")),
                    ttl_seconds: 600,
                    lease_id: 0,
                })
                .await;
            (id, r)
        }));
    }
    let mut acknowledged = Vec::new();
    let mut hints = Vec::new();
    for t in tasks {
        let (id, r) = t.await.expect("task");
        match r {
            Ok(_) => acknowledged.push(id),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s}");
                assert!(s.message().contains("--max-pending-writes"), "{s}");
                let hint: u64 = s
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .expect("a retry hint in grpc-retry-pushback-ms");
                hints.push(hint);
            }
        }
    }
    assert!(
        !hints.is_empty(),
        "600 concurrent writes against a queue of 16 must overflow it"
    );
    assert!(
        hints.iter().all(|h| (20..=5_000).contains(h)),
        "hints within their bounds: {hints:?}"
    );
    let (_, text) = http_get(reg.handle.http_addr, "/metrics").await;
    assert_eq!(
        metric(&text, "switchyard_registry_writes_overloaded_total"),
        Some(hints.len() as f64)
    );
    assert!(
        acknowledged.len() >= 16,
        "the queue's worth got through: {}",
        acknowledged.len()
    );
    let mut discovery = reg.discovery().await;
    let mut present = resolve_ids(&mut discovery, "web").await;
    present.sort();
    acknowledged.sort();
    assert_eq!(
        present, acknowledged,
        "every acknowledged write, and only those"
    );
}
