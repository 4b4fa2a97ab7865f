//! Telemetry across a 3-node cluster: a window a sidecar sends to a follower is filed
//! there and forwarded to the leader, so the leader's `Top` (where the rollout loop
//! looks) holds every node's windows, counted once, and a follower's client-port `Top`
//! answers with the leader's view. Windows that arrive on a peer port are never
//! forwarded again.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::cluster_client::ClusterClient;
use switchyard_proto::v1::telemetry_client::TelemetryClient;
use switchyard_registry::RegistryHandle;
use switchyard_testkit::*;
use tonic::transport::Channel;

fn report(service: &str, version: &str, requests: u64, errors: u64) -> pb::WindowReport {
    window_report(vec![version_stats(service, version, requests, errors)])
}

async fn client(addr: SocketAddr) -> TelemetryClient<Channel> {
    TelemetryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

async fn send(addr: SocketAddr, r: pb::WindowReport) {
    let accepted = client(addr)
        .await
        .report(tokio_stream::iter(vec![r]))
        .await
        .expect("report")
        .into_inner()
        .accepted;
    assert_eq!(accepted, 1);
}

/// (requests, errors) of `web` `version` in `addr`'s Top, zeros when absent.
async fn top(addr: SocketAddr, version: &str) -> (u64, u64) {
    let versions = client(addr)
        .await
        .top(pb::TopRequest {
            namespace: String::new(),
            service: "web".into(),
            window_seconds: 0,
        })
        .await
        .expect("top")
        .into_inner()
        .versions;
    versions
        .iter()
        .find(|v| v.version == version)
        .map_or((0, 0), |v| (v.requests, v.errors))
}

async fn metrics(h: &RegistryHandle) -> String {
    http_get(h.http_addr, "/metrics").await.1
}

#[tokio::test]
async fn a_report_sent_to_a_follower_reaches_the_leaders_top_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (nodes, addrs) = start_cluster(dir.path()).await;
    // Every node knows the same leader.
    let leader_id = eventually(Duration::from_secs(10), || async {
        let mut ids = Vec::new();
        for a in &addrs {
            let mut c = ClusterClient::connect(format!("http://{a}")).await.ok()?;
            ids.push(
                c.status(pb::StatusRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .leader_id,
            );
        }
        (ids[0] != 0 && ids.iter().all(|&i| i == ids[0])).then_some(ids[0])
    })
    .await;
    let leader = &nodes[leader_id as usize - 1];
    let followers: Vec<&RegistryHandle> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader_id)
        .map(|(_, n)| n)
        .collect();
    let (f, other) = (followers[0], followers[1]);

    // A window arriving on a follower's peer port counts as forwarded already: filed
    // there, never handed on. It is sent first, so if it were forwarded it would reach
    // the leader before the next one on the same queue.
    let mut on_peer = client(f.peer_addr).await;
    on_peer
        .report(tokio_stream::iter(vec![report("web", "1.0", 1000, 0)]))
        .await
        .expect("report on the peer port");

    send(f.grpc_addr, report("web", "1.0", 10, 1)).await;
    send(leader.grpc_addr, report("web", "1.0", 5, 0)).await;
    send(other.grpc_addr, report("web", "2.0", 3, 3)).await;
    // The leader's view: every node's window once; nothing of the peer-port one.
    eventually(Duration::from_secs(10), || async {
        (top(leader.grpc_addr, "1.0").await == (15, 1)
            && top(leader.grpc_addr, "2.0").await == (3, 3))
            .then_some(())
    })
    .await;
    // A follower's client-port Top is the leader's view too.
    assert_eq!(top(f.grpc_addr, "1.0").await, (15, 1));
    assert_eq!(top(other.grpc_addr, "2.0").await, (3, 3));
    // Its peer-port Top is what it filed itself (its own window and the peer-port one).
    assert_eq!(top(f.peer_addr, "1.0").await, (1010, 1));
    let m = metrics(f).await;
    assert!(
        m.contains("switchyard_registry_telemetry_forwarded_total 1\n"),
        "{m}"
    );
    assert!(
        m.contains("switchyard_registry_telemetry_forward_dropped_total 0\n"),
        "{m}"
    );
    let m = metrics(leader).await;
    assert!(
        m.contains("switchyard_registry_telemetry_forwarded_total 0\n"),
        "the leader forwards nothing: {m}"
    );

    // With the other two nodes gone, the follower cannot ask a leader: its Top falls
    // back to what it filed itself.
    let f_grpc = f.grpc_addr;
    let f_index = nodes
        .iter()
        .position(|n| n.grpc_addr == f_grpc)
        .expect("the follower");
    let mut kept = None;
    for (i, n) in nodes.into_iter().enumerate() {
        if i == f_index {
            kept = Some(n);
        } else {
            n.shutdown().await;
        }
    }
    eventually(Duration::from_secs(10), || async {
        (top(f_grpc, "1.0").await == (1010, 1)).then_some(())
    })
    .await;
    kept.expect("the follower").shutdown().await;
}
