//! A real registry (one Raft member) on ephemeral loopback ports with a temp data dir,
//! and real tonic clients to talk to it.

use std::net::SocketAddr;
use std::path::Path;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use switchyard_proto::v1::registry_client::RegistryClient;
use switchyard_proto::v1::routing_client::RoutingClient;
use switchyard_registry::{Listeners, RegistryConfig, RegistryHandle};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

use crate::proto::instance_at;

/// A registry and the temp dir holding its data (removed when this is dropped).
pub struct TestRegistry {
    pub handle: RegistryHandle,
    pub dir: tempfile::TempDir,
}

/// Starts a registry with `config`, gRPC, peer, HTTP and DNS all on `127.0.0.1:0`.
pub async fn start_in(config: RegistryConfig) -> RegistryHandle {
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let peer = TcpListener::bind("127.0.0.1:0").await.expect("bind peer");
    start_on(config, grpc, peer).await
}

/// Starts a registry with `config` on given gRPC and peer addresses (a cluster member
/// whose peers must be known beforehand, or a restart on the addresses its clients and
/// peers already know); HTTP and DNS on `127.0.0.1:0`.
pub async fn start_at(
    config: RegistryConfig,
    grpc: SocketAddr,
    peer: SocketAddr,
) -> RegistryHandle {
    let grpc = TcpListener::bind(grpc).await.expect("bind grpc");
    let peer = TcpListener::bind(peer).await.expect("bind peer");
    start_on(config, grpc, peer).await
}

/// A free loopback port (bound and released: a member's address must be known before
/// any member starts).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Starts a three-member cluster with data dirs `n1`..`n3` under `dir`, on free client
/// and peer ports; returns the members (node ids 1-3, in order) and their client
/// addresses.
pub async fn start_cluster(dir: &Path) -> ([RegistryHandle; 3], [SocketAddr; 3]) {
    start_cluster_with(dir, |_| {}).await
}

/// [`start_cluster`] with each member's config changed by `tune` (TLS, limits).
pub async fn start_cluster_with(
    dir: &Path,
    tune: impl Fn(&mut RegistryConfig),
) -> ([RegistryHandle; 3], [SocketAddr; 3]) {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let peer_addrs = [free_addr(), free_addr(), free_addr()];
    let peers: std::collections::BTreeMap<u64, String> = peer_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.to_string()))
        .collect();
    let config = |id: u64| {
        let mut c = RegistryConfig::new(dir.join(format!("n{id}")));
        c.node_id = id;
        c.peers = peers.clone();
        tune(&mut c);
        c
    };
    let (n1, n2, n3) = tokio::join!(
        start_at(config(1), addrs[0], peer_addrs[0]),
        start_at(config(2), addrs[1], peer_addrs[1]),
        start_at(config(3), addrs[2], peer_addrs[2]),
    );
    ([n1, n2, n3], addrs)
}

async fn start_on(config: RegistryConfig, grpc: TcpListener, peer: TcpListener) -> RegistryHandle {
    let listeners = Listeners {
        grpc,
        peer,
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

    /// Starts with the default config changed by `tune`.
    pub async fn start_with(tune: impl FnOnce(&mut RegistryConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = RegistryConfig::new(dir.path().to_path_buf());
        tune(&mut config);
        let handle = start_in(config).await;
        let reg = Self { handle, dir };
        reg.wait_for_mesh_ca().await;
        reg
    }

    /// Waits (10 s at most) until the first leader has made the mesh CA: that is a
    /// change every watcher sees, so a test that counts watch events starts after it.
    pub async fn wait_for_mesh_ca(&self) {
        let url = self.url();
        crate::wait::eventually(std::time::Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let mut id = switchyard_proto::v1::identity_client::IdentityClient::connect(url)
                    .await
                    .ok()?;
                id.roots(switchyard_proto::v1::RootsRequest {})
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await
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

    pub async fn routing(&self) -> RoutingClient<Channel> {
        RoutingClient::new(self.channel().await)
    }

    /// The Prometheus text from the HTTP port.
    pub async fn metrics(&self) -> String {
        crate::http::http_get(self.handle.http_addr, "/metrics")
            .await
            .1
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Registers `instance` with a fresh lease of `ttl_seconds`.
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

/// Registers `addr` as an instance of `service` (TTL 60 s); returns its revision.
pub async fn register_at(
    client: &mut RegistryClient<Channel>,
    service: &str,
    id: &str,
    addr: SocketAddr,
    version: &str,
    weight: u32,
) -> u64 {
    register(client, instance_at(service, id, addr, version, weight), 60)
        .await
        .revision
}

/// Opens a KeepAlive stream: the sender to renew through (holding `buffer` requests)
/// and the registry's answers.
pub async fn keep_alive(
    client: &mut RegistryClient<Channel>,
    buffer: usize,
) -> (
    tokio::sync::mpsc::Sender<pb::KeepAliveRequest>,
    tonic::Streaming<pb::KeepAliveResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(buffer);
    let responses = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("keep-alive")
        .into_inner();
    (tx, responses)
}
