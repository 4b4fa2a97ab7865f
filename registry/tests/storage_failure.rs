//! A registry (the library, so the node stays up after the failure) whose data dir fills
//! up: every way a client or a probe looks at it says it cannot write any more, and
//! why, until the embedder shuts it down. Needs root to mount a tmpfs; skipped without.

use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_registry::{Listeners, RegistryConfig};
use switchyard_testkit::{http_get, instance, keep_alive, metric, resolve_ids, start_in, Tmpfs};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(channel: Channel, service: &str) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_makes_the_node_say_so_everywhere() {
    let Some(fs) = Tmpfs::mount("8m") else {
        eprintln!("skipped: needs root to mount tmpfs");
        return;
    };
    let data_dir = fs.path().join("data");
    let handle = start_in(RegistryConfig::new(data_dir.clone())).await;
    assert!(handle.failure().is_none());
    let channel = Endpoint::from_shared(format!("http://{}", handle.grpc_addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut registry = pb::registry_client::RegistryClient::new(channel.clone());
    let lease = registry
        .register(pb::RegisterRequest {
            instance: Some(instance("web", "web-0", "1.0.0")),
            ttl_seconds: 600,
            lease_id: 0,
        })
        .await
        .expect("register")
        .into_inner()
        .lease_id;
    let (renew, mut renewed) = keep_alive(&mut registry, 4).await;
    renew
        .send(pb::KeepAliveRequest {
            lease_ids: vec![lease],
        })
        .await
        .expect("send");
    let first = renewed
        .message()
        .await
        .expect("renewal")
        .expect("an answer");
    assert!(first.leases[0].found);

    fs.fill();
    let mut refused = None;
    for i in 1..5_000 {
        let request = pb::RegisterRequest {
            instance: Some(instance("web", &format!("web-{i}"), "1.0.0")),
            ttl_seconds: 600,
            lease_id: 0,
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), registry.register(request))
            .await
            .expect("Register answers within 10 s");
        if let Err(status) = answer {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("a write fails once the disk is full");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let failure = tokio::time::timeout(Duration::from_secs(5), handle.failed())
        .await
        .expect("the handle reports the failure");
    assert_eq!(failure.dir, data_dir);
    assert_eq!(failure.os_error(), Some(28), "{failure}");

    // Later writes say the same, not "shutting down".
    let again = registry
        .register(pb::RegisterRequest {
            instance: Some(instance("web", "late", "1.0.0")),
            ttl_seconds: 600,
            lease_id: 0,
        })
        .await
        .expect_err("no writes after the failure");
    assert_eq!(again.code(), tonic::Code::Unavailable);
    assert!(
        again.message().contains(&data_dir.display().to_string())
            && again
                .message()
                .contains("No space left on device (os error 28)"),
        "{}",
        again.message()
    );

    let (code, body) = http_get(handle.http_addr, "/health").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("\"status\":\"storage_failed\"")
            && body.contains("\"errno\":28")
            && body.contains(&data_dir.display().to_string()),
        "{body}"
    );
    let (_, metrics) = http_get(handle.http_addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "switchyard_registry_storage_failed"),
        Some(1.0),
        "{metrics}"
    );
    for service in ["", "switchyard.v1.Registry", "switchyard.v1.Discovery"] {
        assert_eq!(
            health(channel.clone(), service).await,
            ServingStatus::NotServing as i32,
            "health of {service:?}"
        );
    }

    // The open KeepAlive stream ends with UNAVAILABLE instead of renewing in a node
    // whose lease clocks are dead; a new one is refused.
    let ended = tokio::time::timeout(Duration::from_secs(5), renewed.message())
        .await
        .expect("the KeepAlive stream ends");
    let status = ended.expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        registry.keep_alive(tokio_stream::iter(vec![pb::KeepAliveRequest {
            lease_ids: vec![lease],
        }])),
    )
    .await
    .expect("KeepAlive answers");
    match refused {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(stream) => {
            let status = stream
                .into_inner()
                .message()
                .await
                .expect_err("a new KeepAlive is refused");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
    }

    // Reads are still served from memory until the node stops.
    let mut discovery = pb::discovery_client::DiscoveryClient::new(channel);
    assert!(resolve_ids(&mut discovery, "web")
        .await
        .contains(&"web-0".to_string()));

    tokio::time::timeout(Duration::from_secs(20), handle.shutdown())
        .await
        .expect("a node whose storage failed still shuts down");
}

/// A data dir that cannot be created says why in the operator's terms and does not
/// blame another process. (Root ignores permission bits, so the case here is a parent
/// that is a regular file, ENOTDIR; EACCES and ENOSPC are covered on the mapping
/// function in `storage_health`.)
#[tokio::test]
async fn a_data_dir_that_cannot_be_created_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let data = file.join("data");
    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        peer: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        http: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        dns: None,
    };
    let said = match switchyard_registry::start(RegistryConfig::new(data.clone()), listeners).await
    {
        Ok(_) => panic!("a data dir under a file cannot be used"),
        Err(e) => e.to_string(),
    };
    assert!(
        said.contains(&data.display().to_string())
            && said.contains("Not a directory (os error 20)")
            && said.contains("not a directory: choose another --data-dir"),
        "{said}"
    );
    assert!(!said.contains("another switchyard process"), "{said}");
}
