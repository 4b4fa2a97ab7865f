//! Leases: keep-alive keeps instances, silence expires them promptly, unknown leases
//! answer found=false, re-registering is idempotent.

use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_testkit::*;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn keep_alive_holds_an_instance_past_three_ttls_and_silence_expires_it() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let lease = register(&mut registry, instance("web", "web-1", "1.0.0"), 1).await;
    assert_eq!(lease.ttl_seconds, 1);

    let mut discovery = reg.discovery().await;
    let mut watch = open_watch(&mut discovery, watch_of(&["web"], 0)).await;
    next_event(&mut watch, WAIT).await;

    let (tx, mut responses) = keep_alive(&mut registry, 4).await;
    let started = Instant::now();
    let mut last_renewal = Instant::now();
    while started.elapsed() < Duration::from_millis(3_500) {
        tx.send(pb::KeepAliveRequest {
            lease_ids: vec![lease.lease_id],
        })
        .await
        .expect("send");
        let resp = tokio::time::timeout(WAIT, responses.message())
            .await
            .expect("answer in time")
            .expect("ok")
            .expect("open");
        assert_eq!(resp.leases.len(), 1);
        assert!(resp.leases[0].found, "lease still known");
        assert_eq!(resp.leases[0].ttl_seconds, 1);
        last_renewal = Instant::now();
        // The renewer's pace: four renewals per 1 s TTL on the registry's real clock.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        resolve_ids(&mut reg.discovery().await, "web").await,
        vec!["web-1"]
    );

    // Stop renewing: the watcher sees the removal shortly after the TTL ends.
    drop(tx);
    let event = next_event(&mut watch, WAIT).await;
    let waited = last_renewal.elapsed();
    match event.kind {
        Some(pb::watch_event::Kind::Delta(d)) => {
            assert_eq!(d.removed.len(), 1);
            assert_eq!(d.removed[0].id, "web-1");
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(900),
        "not before the TTL: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(2_500),
        "promptly after the TTL: {waited:?}"
    );
    assert!(resolve_ids(&mut reg.discovery().await, "web")
        .await
        .is_empty());
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, "switchyard_registry_lease_expiries_total"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "switchyard_registry_instances"), Some(0.0));
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn unknown_and_expired_leases_answer_found_false_and_many_renew_at_once() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let a = register(&mut registry, instance("web", "web-a", "1.0.0"), 30).await;
    let b = register(&mut registry, instance("web", "web-b", "1.0.0"), 30).await;
    let (tx, mut responses) = keep_alive(&mut registry, 4).await;
    tx.send(pb::KeepAliveRequest {
        lease_ids: vec![a.lease_id, 424_242, b.lease_id],
    })
    .await
    .expect("send");
    let resp = responses.message().await.expect("ok").expect("open");
    let found: Vec<(u64, bool)> = resp.leases.iter().map(|l| (l.lease_id, l.found)).collect();
    assert_eq!(
        found,
        vec![(a.lease_id, true), (424_242, false), (b.lease_id, true)]
    );
    assert_eq!(resp.leases[1].ttl_seconds, 0);

    // Deregistering the only instance of a lease revokes the lease.
    registry
        .deregister(pb::DeregisterRequest {
            namespace: String::new(),
            id: "web-a".into(),
        })
        .await
        .expect("deregister");
    tx.send(pb::KeepAliveRequest {
        lease_ids: vec![a.lease_id],
    })
    .await
    .expect("send");
    let resp = responses.message().await.expect("ok").expect("open");
    assert!(!resp.leases[0].found);
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn re_registering_the_same_id_is_idempotent() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let first = register(&mut registry, instance("web", "web-1", "1.0.0"), 10).await;
    let again = register(&mut registry, instance("web", "web-1", "1.0.0"), 10).await;
    assert_eq!(again.lease_id, first.lease_id, "same lease");
    assert_eq!(
        again.revision, first.revision,
        "nothing changed, no new revision"
    );

    // A changed field updates the instance in place, still on the same lease.
    let updated = register(&mut registry, instance("web", "web-1", "1.1.0"), 10).await;
    assert_eq!(updated.lease_id, first.lease_id);
    assert!(updated.revision > first.revision);
    assert_eq!(
        resolve_ids(&mut reg.discovery().await, "web").await,
        vec!["web-1"]
    );
    let m = reg.metrics().await;
    assert_eq!(metric(&m, "switchyard_registry_instances"), Some(1.0));
    assert_eq!(metric(&m, "switchyard_registry_leases"), Some(1.0));
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn instances_can_share_a_lease_and_expire_together() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let first = register(&mut registry, instance("web", "web-1", "1.0.0"), 1).await;
    registry
        .register(pb::RegisterRequest {
            instance: Some(instance("api", "api-1", "1.0.0")),
            ttl_seconds: 0,
            lease_id: first.lease_id,
        })
        .await
        .expect("join the lease");
    let err = registry
        .register(pb::RegisterRequest {
            instance: Some(instance("api", "api-2", "1.0.0")),
            ttl_seconds: 0,
            lease_id: 999_999,
        })
        .await
        .expect_err("unknown lease");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("lease 999999"), "{}", err.message());

    eventually(WAIT, || async {
        (resolve_ids(&mut reg.discovery().await, "web")
            .await
            .is_empty()
            && resolve_ids(&mut reg.discovery().await, "api")
                .await
                .is_empty())
        .then_some(())
    })
    .await;
    reg.handle.shutdown().await;
}

#[tokio::test]
async fn too_many_ids_in_one_keep_alive_is_refused() {
    let reg = TestRegistry::start().await;
    let mut registry = reg.registry().await;
    let (tx, mut responses) = keep_alive(&mut registry, 1).await;
    tx.send(pb::KeepAliveRequest {
        lease_ids: (0..1_001).collect(),
    })
    .await
    .expect("send");
    let err = responses.message().await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("lease_ids"), "{}", err.message());
    reg.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_pauses_a_mass_expiry_until_renewals_recover() {
    let reg = TestRegistry::start_with(|c| {
        c.self_preservation_min_leases = 20;
        c.self_preservation_threshold = 0.5;
    })
    .await;
    let registry = reg.registry().await;
    // All 30 at once (one group commit), so their deadlines fall together.
    let mut tasks = Vec::new();
    for n in 0..30 {
        let mut client = registry.clone();
        tasks.push(tokio::spawn(async move {
            register(
                &mut client,
                instance("web", &format!("web-{n:02}"), "1.0.0"),
                2,
            )
            .await
            .lease_id
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.expect("registered"));
    }
    let mut registry = registry;
    // Nobody renews: all 30 run out together, which looks like a network problem.
    // Wall time on purpose: expiry must stay paused past the 2 s TTL of the real lease clock.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(
        resolve_ids(&mut reg.discovery().await, "web").await.len(),
        30,
        "expiry paused"
    );
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, "switchyard_registry_self_preservation"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "switchyard_registry_lease_expiries_total"),
        Some(0.0)
    );

    // Two thirds come back: the share of dead leases drops below the threshold, expiry
    // resumes and removes only the ten that stay silent.
    let (tx, mut responses) = keep_alive(&mut registry, 4).await;
    let alive: Vec<u64> = leases[..20].to_vec();
    let renewer = tokio::spawn(async move {
        for _ in 0..40 {
            if tx
                .send(pb::KeepAliveRequest {
                    lease_ids: alive.clone(),
                })
                .await
                .is_err()
            {
                return;
            }
            let _ = responses.message().await;
            // The renewer's pace: four renewals per 2 s TTL on the registry's real clock.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    eventually(Duration::from_secs(8), || async {
        (resolve_ids(&mut reg.discovery().await, "web").await.len() == 20).then_some(())
    })
    .await;
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, "switchyard_registry_self_preservation"),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "switchyard_registry_lease_expiries_total"),
        Some(10.0)
    );
    renewer.abort();
    reg.handle.shutdown().await;
}

/// A KeepAlive stream opened on a follower is relayed to the leader (which alone runs
/// the lease clocks) and renews: the leader serves Registry on its peer port for that.
/// Before, the relay met UNIMPLEMENTED there and a client on a follower lost its lease.
#[tokio::test]
async fn keep_alive_through_a_follower_renews_on_the_leader() {
    let dir = tempfile::tempdir().expect("dir");
    let (nodes, addrs) = start_cluster(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let follower = loop {
        let mut leader = None;
        for (i, n) in nodes.iter().enumerate() {
            let (_, body) = http_get(n.http_addr, "/api/v1/status").await;
            if body.contains("\"role\":\"leader\"") {
                leader = Some(i);
            }
        }
        if let Some(l) = leader {
            break addrs[(l + 1) % 3];
        }
        assert!(Instant::now() < deadline, "no leader in 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{follower}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = pb::registry_client::RegistryClient::new(channel);
    let lease = register(&mut client, instance("web", "web-1", "1.0.0"), 2)
        .await
        .lease_id;
    let (tx, mut answers) = keep_alive(&mut client, 4).await;
    // Renewed every 500 ms for 5 s: well past the 2 s TTL.
    for _ in 0..10 {
        tx.send(pb::KeepAliveRequest {
            lease_ids: vec![lease],
        })
        .await
        .expect("send");
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .expect("an answer in time")
            .expect("the relayed stream works")
            .expect("a message");
        assert!(answer.leases.iter().all(|l| l.found), "{answer:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut discovery = pb::discovery_client::DiscoveryClient::new(
        tonic::transport::Channel::from_shared(format!("http://{follower}"))
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    let found = discovery
        .resolve(pb::ResolveRequest {
            namespace: String::new(),
            service: "web".into(),
            version: String::new(),
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(found.instances.len(), 1);
}
