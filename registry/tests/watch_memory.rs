//! Watch streams that are never read hold bounded memory (issue 13, point 4: 2,000 of
//! them on a 0.8 MB catalog took a registry from 24 MB to 1,674 MB, a whole snapshot
//! each). The registry counts every byte of watch events it has built and its
//! connections have not yet taken (`switchyard_registry_watch_buffered_bytes`); past
//! `max_watch_buffer_bytes` a watcher whose next event does not fit is closed with
//! RESOURCE_EXHAUSTED, and a watcher that keeps up still gets every change.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_testkit::*;
use tonic::transport::Endpoint;

/// Generous: the test machine is shared and busy; nothing here measures time.
const WAIT: Duration = Duration::from_secs(30);
const BUDGET: usize = 8 * 1024 * 1024;
const IDLE_WATCHERS: usize = 200;
/// What a watcher that keeps up may hold beyond the budget: one small delta.
const SLACK: f64 = 64.0 * 1024.0;

/// An instance with about 3.3 KiB of labels, so 240 of them make a ~0.8 MB catalog.
fn large_instance(n: usize) -> pb::Instance {
    let mut i = instance("big", &format!("big-{n}"), "1.0.0");
    i.labels = (0..16)
        .map(|k| (format!("label-{k}"), format!("{n}-{}", "v".repeat(200))))
        .collect();
    i
}

async fn gauge(reg: &TestRegistry, name: &str) -> f64 {
    metric(&reg.metrics().await, name).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_read_watchers_hold_bounded_bytes_and_a_reader_still_gets_every_change() {
    let reg = TestRegistry::start_with(|c| c.max_watch_buffer_bytes = BUDGET).await;
    let mut registry = reg.registry().await;
    for n in 0..240 {
        register(&mut registry, large_instance(n), 300).await;
    }

    // A watcher that reads everything.
    let mut reader_client = reg.discovery().await;
    let mut reader = open_watch(&mut reader_client, watch_all(0)).await;
    let snapshot = next_event(&mut reader, WAIT).await;
    let Some(pb::watch_event::Kind::Snapshot(s)) = &snapshot.kind else {
        panic!("first event is a snapshot: {snapshot:?}");
    };
    assert_eq!(
        s.services.iter().map(|s| s.instances.len()).sum::<usize>(),
        240
    );

    // Watchers that never read, on one connection with small flow-control windows, so
    // what they do not take stays in the registry (a client's default windows would
    // swallow the first few snapshots).
    let idle = Endpoint::from_shared(reg.url())
        .expect("url")
        .initial_stream_window_size(Some(64 * 1024))
        .initial_connection_window_size(Some(64 * 1024))
        .connect()
        .await
        .expect("connect");
    let mut idle_client = DiscoveryClient::new(idle);
    let mut idle_streams = Vec::new();
    let mut refused_at_open = 0;
    for _ in 0..IDLE_WATCHERS {
        match idle_client.watch(watch_all(0)).await {
            // Kept open and never read.
            Ok(stream) => idle_streams.push(stream),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("max_watch_buffer_bytes"),
                    "{status:?}"
                );
                refused_at_open += 1;
            }
        }
        let held = gauge(&reg, "switchyard_registry_watch_buffered_bytes").await;
        assert!(
            (0.0..=BUDGET as f64 + SLACK).contains(&held),
            "watch bytes held {held}, budget {BUDGET}"
        );
    }
    // Most of them did not fit: each was refused at open or closed at its first
    // snapshot; the registry keeps only what fits in its budget (~10 snapshots).
    eprintln!(
        "idle watchers: {refused_at_open} refused at open, {} closed, {} bytes held",
        gauge(&reg, "switchyard_registry_watch_buffer_closes_total").await,
        gauge(&reg, "switchyard_registry_watch_buffered_bytes").await
    );
    let most = IDLE_WATCHERS - 20;
    assert_eventually(WAIT, "over-budget watchers are closed", || async {
        let closed = gauge(&reg, "switchyard_registry_watch_buffer_closes_total").await;
        closed as usize + refused_at_open >= most
    })
    .await;
    assert_eventually(WAIT, "closed watchers are gone", || async {
        let open = gauge(&reg, "switchyard_registry_watchers").await;
        (open as usize) <= IDLE_WATCHERS - most + 1
    })
    .await;

    // The reader keeps getting every change while the budget is full.
    let mut revisions = Vec::new();
    for n in 0..20 {
        let r = register(
            &mut registry,
            instance("small", &format!("s-{n}"), "1.0.0"),
            300,
        )
        .await;
        revisions.push(r.revision);
    }
    let mut seen = Vec::new();
    while seen.last() != revisions.last() {
        let event = next_event(&mut reader, WAIT).await;
        assert!(
            matches!(event.kind, Some(pb::watch_event::Kind::Delta(_))),
            "the reader keeps up: deltas, no resync: {event:?}"
        );
        seen.push(event.revision);
    }
    assert_eq!(seen, revisions, "every change, once, in order");
    let held = gauge(&reg, "switchyard_registry_watch_buffered_bytes").await;
    assert!(held <= BUDGET as f64 + SLACK, "{held}");

    // Gone with their connection: the bytes they held are released.
    drop(idle_streams);
    drop(idle_client);
    assert_eventually(WAIT, "idle watchers' bytes released", || async {
        gauge(&reg, "switchyard_registry_watch_buffered_bytes").await <= SLACK
    })
    .await;
    // And a new watcher fits again.
    let mut again = reg.discovery().await;
    let mut stream = open_watch(&mut again, watch_all(0)).await;
    let first = next_event(&mut stream, WAIT).await;
    assert!(matches!(
        first.kind,
        Some(pb::watch_event::Kind::Snapshot(_))
    ));
    reg.handle.shutdown().await;
}
