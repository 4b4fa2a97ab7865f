//! Group commit: concurrent registrations share fsyncs, and every one of them is durable
//! and acknowledged (nothing is lost or answered twice by batching).

use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_registry::RegistryConfig;
use switchyard_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_share_fsyncs_and_all_survive_a_restart() {
    let reg = TestRegistry::start().await;
    let before = reg.metrics().await;
    let batches_before =
        metric(&before, "switchyard_registry_commit_batch_size_count").unwrap_or(0.0);
    let entries_before =
        metric(&before, "switchyard_registry_commit_batch_size_sum").unwrap_or(0.0);

    const N: usize = 300;
    // One HTTP/2 connection carries all of them, so they reach the registry together.
    let client = reg.registry().await;
    let mut tasks = Vec::new();
    for n in 0..N {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            register(
                &mut client,
                instance("web", &format!("web-{n}"), "1.0.0"),
                600,
            )
            .await
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.expect("task").lease_id);
    }
    leases.sort_unstable();
    leases.dedup();
    assert_eq!(leases.len(), N, "every registration got its own lease");

    let after = reg.metrics().await;
    let batches = metric(&after, "switchyard_registry_commit_batch_size_count").expect("count")
        - batches_before;
    let entries =
        metric(&after, "switchyard_registry_commit_batch_size_sum").expect("sum") - entries_before;
    assert!(
        entries >= N as f64,
        "{entries} entries written for {N} registrations"
    );
    assert!(
        batches < entries,
        "{batches} fsyncs for {entries} entries: concurrent writes must share commits"
    );

    // Durable: a restart from the same data dir holds all of them.
    drop(client);
    let TestRegistry { handle, dir } = reg;
    handle.shutdown().await;
    let restarted = start_in(RegistryConfig::new(dir.path().to_path_buf())).await;
    let mut discovery = DiscoveryClient::connect(format!("http://{}", restarted.grpc_addr))
        .await
        .expect("connect");
    let resolved = resolve(&mut discovery, "web").await;
    assert_eq!(resolved.instances.len(), N);
    restarted.shutdown().await;
}
