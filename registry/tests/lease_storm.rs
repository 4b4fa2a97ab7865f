//! 10,000 leases whose clients all reconnect at once after a leader change: the new
//! leader restarts every lease clock before anything may expire (and honours the old
//! leader's checkpoints), then takes the whole burst of renewals; not one lease expires.
//! Three real registry nodes in this process, on loopback.

use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_testkit::*;
use tonic::transport::Channel;

const LEASES: usize = 10_000;
/// Streams the clients renew through, and leases per stream (as a fleet of processes,
/// each holding a few leases, would).
const STREAMS: usize = 100;
const PER_STREAM: usize = LEASES / STREAMS;
const TTL: u32 = 5;

async fn connect(addr: std::net::SocketAddr) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// The node that says it leads, among `alive` (15 s at most).
async fn leader_among(nodes: &[Option<switchyard_registry::RegistryHandle>]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if let Some(n) = n {
                let (_, body) = http_get(n.http_addr, "/api/v1/status").await;
                if body.contains("\"role\":\"leader\"") {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader in 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Renews every lease once over `STREAMS` fresh streams, all at the same moment;
/// returns how many answered found.
async fn renew_all_at_once(addr: std::net::SocketAddr, leases: &[u64]) -> usize {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(addr).await);
    }
    let mut tasks = Vec::new();
    for (n, chunk) in leases.chunks(PER_STREAM).enumerate() {
        let mut client = clients[n % clients.len()].clone();
        let ids = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            let (tx, mut answers) = keep_alive(&mut client, 2).await;
            tx.send(pb::KeepAliveRequest { lease_ids: ids })
                .await
                .expect("send");
            let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
                .await
                .expect("an answer within 10 s")
                .expect("the stream works")
                .expect("a message");
            answer.leases.iter().filter(|l| l.found).count()
        }));
    }
    let mut found = 0;
    for t in tasks {
        found += t.await.expect("task");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_leases_reconnecting_at_once_after_a_leader_change_expire_none() {
    let dir = tempfile::tempdir().expect("dir");
    let (nodes, _) = start_cluster_with(dir.path(), |c| {
        c.lease_checkpoint_interval = Duration::from_millis(500);
    })
    .await;
    let mut nodes: Vec<Option<_>> = nodes.into_iter().map(Some).collect();
    let first = leader_among(&nodes).await;
    let leader_addr = nodes[first].as_ref().expect("alive").grpc_addr;

    // 10,000 registrations, each with its own lease, 500 in flight at a time.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(leader_addr).await);
    }
    let mut leases = Vec::with_capacity(LEASES);
    for wave in 0..LEASES / 500 {
        let mut tasks = Vec::new();
        for k in 0..500 {
            let n = wave * 500 + k;
            let mut client = clients[n % clients.len()].clone();
            tasks.push(tokio::spawn(async move {
                register(
                    &mut client,
                    instance("fleet", &format!("fleet-{n}"), "1.0.0"),
                    TTL,
                )
                .await
                .lease_id
            }));
        }
        for t in tasks {
            leases.push(t.await.expect("task"));
        }
    }
    let registered_in = started.elapsed();
    // The registrations took a while: renew all before the leader goes.
    assert_eq!(renew_all_at_once(leader_addr, &leases).await, LEASES);
    // Let a checkpoint carry the renewed clocks to the followers.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The leader goes; its clients all come back at once to whoever leads next.
    let change = Instant::now();
    if let Some(old) = nodes[first].take() {
        old.shutdown().await;
    }
    let second = leader_among(&nodes).await;
    let elected_in = change.elapsed();
    let new_leader = nodes[second].as_ref().expect("alive");
    let found = renew_all_at_once(new_leader.grpc_addr, &leases).await;
    let renewed_in = change.elapsed();
    assert_eq!(
        found, LEASES,
        "every lease is still known to the new leader (elected in {elected_in:?})"
    );

    // Two more TTLs of renewals once a second, then every instance is still there and
    // the new leader expired nothing.
    let until = Instant::now() + Duration::from_secs(u64::from(TTL) * 2);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            renew_all_at_once(new_leader.grpc_addr, &leases).await,
            LEASES,
            "a lease was lost after the change"
        );
    }
    let (_, text) = http_get(new_leader.http_addr, "/metrics").await;
    assert_eq!(
        metric(&text, "switchyard_registry_lease_expiries_total"),
        Some(0.0),
        "no lease expired because of the election"
    );
    assert_eq!(
        metric(&text, "switchyard_registry_instances"),
        Some(LEASES as f64)
    );
    println!(
        "lease storm: {LEASES} leases registered in {registered_in:?}; new leader in {elected_in:?}; all {LEASES} renewed at once by {renewed_in:?} after the change; 0 expired"
    );
}
