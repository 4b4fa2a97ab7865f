//! A real registry on ephemeral loopback ports with a temp data dir, and real tonic
//! clients to talk to it.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_registry::{Listeners, RegistryConfig, RegistryHandle};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

pub struct TestRegistry {
    pub handle: RegistryHandle,
    pub dir: tempfile::TempDir,
}

pub async fn start_in(config: RegistryConfig) -> RegistryHandle {
    let listeners = Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await.expect("bind grpc"),
        http: TcpListener::bind("127.0.0.1:0").await.expect("bind http"),
        dns: Some(
            switchyard_core::dns::bind("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("bind dns"),
        ),
    };
    switchyard_registry::start(config, listeners)
        .await
        .expect("registry starts")
}

impl TestRegistry {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut RegistryConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = RegistryConfig::new(dir.path().to_path_buf());
        tune(&mut config);
        let handle = start_in(config).await;
        Self { handle, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.handle.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn registry(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channel().await)
    }

    pub async fn discovery(&self) -> DiscoveryClient<Channel> {
        DiscoveryClient::new(self.channel().await)
    }

    /// The Prometheus text from the HTTP port, read with a plain TCP socket.
    pub async fn metrics(&self) -> String {
        http_get(self.handle.http_addr, "/metrics").await.1
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A minimal HTTP/1.1 GET over a TCP socket: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The value of an unlabelled metric line, e.g. `switchyard_registry_instances 3`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn instance(service: &str, id: &str, version: &str) -> pb::Instance {
    pb::Instance {
        namespace: String::new(),
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        version: version.into(),
        labels: Default::default(),
        weight: 0,
        zone: String::new(),
        state: 0,
    }
}

pub async fn register(
    client: &mut RegistryClient<Channel>,
    instance: pb::Instance,
    ttl_seconds: u32,
) -> pb::RegisterResponse {
    client
        .register(pb::RegisterRequest {
            instance: Some(instance),
            ttl_seconds,
            lease_id: 0,
        })
        .await
        .expect("register")
        .into_inner()
}

/// Polls `check` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event of a watch stream, failing the test after `limit`.
pub async fn next_event(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    limit: Duration,
) -> pb::WatchEvent {
    tokio::time::timeout(limit, stream.message())
        .await
        .expect("a watch event in time")
        .expect("stream healthy")
        .expect("stream open")
}

/// A watcher's view of the catalog, built only from the events it received.
#[derive(Default, Debug)]
pub struct View {
    pub revision: u64,
    pub instances: std::collections::BTreeMap<String, pb::Instance>,
    pub snapshots: usize,
}

impl View {
    pub fn apply(&mut self, event: pb::WatchEvent) {
        self.revision = event.revision;
        match event.kind {
            Some(pb::watch_event::Kind::Snapshot(s)) => {
                self.snapshots += 1;
                self.instances.clear();
                for svc in s.services {
                    for i in svc.instances {
                        self.instances.insert(i.id.clone(), i);
                    }
                }
            }
            Some(pb::watch_event::Kind::Delta(d)) => {
                for i in d.upserted {
                    self.instances.insert(i.id.clone(), i);
                }
                for r in d.removed {
                    self.instances.remove(&r.id);
                }
            }
            None => panic!("event without kind"),
        }
    }
}
