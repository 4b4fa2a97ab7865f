//! Starting and stopping a registry node: storage, writer, lease clock, gRPC and HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use switchyard_proto::v1::discovery_server::DiscoveryServer;
use switchyard_proto::v1::registry_server::RegistryServer;
use switchyard_proto::v1::routing_server::RoutingServer;

use crate::api::{DiscoveryApi, RegistryApi, RoutingApi};
use crate::catalog::{Catalog, Command, Limits};
use crate::lease::LeaseKeeper;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::watch::WatchHub;
use crate::writer::{self, Proposer};

/// Largest gRPC message the registry accepts (a registration is well under 8 KiB; a
/// `KeepAlive` message of 1,000 lease ids is about 10 KiB).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How a registry node behaves; every field has a default that suits one node.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Where the log and snapshots live.
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Changes a watcher may fall behind before it is resynced with a snapshot.
    pub watch_buffer: usize,
    /// Changes kept so a watcher can resume from a revision without a snapshot.
    pub watch_history: usize,
    /// Log entries between snapshots (which bound the log on disk).
    pub snapshot_every: u64,
    /// Most open Watch streams per node.
    pub max_watchers: usize,
}

impl RegistryConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            limits: Limits::default(),
            watch_buffer: 1_024,
            watch_history: 10_000,
            snapshot_every: 10_000,
            max_watchers: 10_000,
        }
    }

    /// Checks the configuration before any socket is used.
    pub fn validate(&self) -> Result<(), String> {
        if self.limits.max_instances == 0 {
            return Err("max_instances must be at least 1".into());
        }
        if self.watch_buffer == 0 || self.watch_buffer > 1_000_000 {
            return Err("watch_buffer must be 1-1000000".into());
        }
        if self.watch_history == 0 || self.watch_history > 10_000_000 {
            return Err("watch_history must be 1-10000000".into());
        }
        if self.snapshot_every == 0 {
            return Err("snapshot_every must be at least 1".into());
        }
        if self.max_watchers == 0 {
            return Err("max_watchers must be at least 1".into());
        }
        Ok(())
    }
}

/// Sockets bound by the caller (tests bind port 0 and read the real address back).
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the writer thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot read the listener address: {0}")]
    Addr(std::io::Error),
}

/// State shared by the writer, the API handlers and the background tasks.
pub struct Shared {
    /// Lock order: `catalog` before the hub's and the lease keeper's own locks. Nobody
    /// holds it across an `.await`.
    pub catalog: RwLock<Catalog>,
    pub hub: WatchHub,
    pub leases: LeaseKeeper,
    pub metrics: Metrics,
    pub config: RegistryConfig,
    /// Flips to `true` once when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// A running registry node.
pub struct RegistryHandle {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl RegistryHandle {
    /// Stops accepting work, ends every stream, waits for in-flight writes to land.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        tracing::info!(
            revision = self.shared.catalog.read().revision(),
            "registry stopped"
        );
    }

    /// False once a server task has ended on its own (e.g. the gRPC server failed).
    pub fn is_running(&self) -> bool {
        self.tasks.iter().all(|t| !t.is_finished())
    }
}

/// Opens the data dir, replays it, and serves gRPC and HTTP on the given listeners.
pub async fn start(
    config: RegistryConfig,
    listeners: Listeners,
) -> Result<RegistryHandle, StartError> {
    config.validate().map_err(StartError::Config)?;
    let grpc_addr = listeners.grpc.local_addr().map_err(StartError::Addr)?;
    let http_addr = listeners.http.local_addr().map_err(StartError::Addr)?;

    let dir = config.data_dir.clone();
    let limits = config.limits;
    let (store, catalog) = tokio::task::spawn_blocking(move || Store::open(&dir, limits))
        .await
        .map_err(|e| StartError::Thread(std::io::Error::other(e)))??;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let hub = WatchHub::new(
        config.watch_buffer,
        config.watch_history,
        catalog.revision(),
    );
    let leases = LeaseKeeper::default();
    // Every lease restarts with its full TTL, so instances have time to renew.
    for (id, ttl) in catalog.leases() {
        leases.grant(id, ttl);
    }
    let metrics = Metrics::default();
    metrics.instances.set(catalog.instance_count() as i64);
    metrics.leases.set(catalog.lease_count() as i64);
    metrics.revision.set(catalog.revision() as i64);
    tracing::info!(
        data_dir = %config.data_dir.display(),
        revision = catalog.revision(),
        instances = catalog.instance_count(),
        leases = catalog.lease_count(),
        "catalog loaded"
    );
    let snapshot_every = config.snapshot_every;
    let shared = Arc::new(Shared {
        catalog: RwLock::new(catalog),
        hub,
        leases,
        metrics,
        config,
        shutdown: shutdown_rx.clone(),
    });
    let (proposer, writer) =
        writer::spawn(store, shared.clone(), snapshot_every).map_err(StartError::Thread)?;

    let tasks = vec![
        tokio::spawn(expiry_loop(
            shared.clone(),
            proposer.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(serve_grpc(
            shared.clone(),
            proposer,
            listeners.grpc,
            shutdown_rx.clone(),
        )),
        tokio::spawn(crate::http::serve(
            shared.clone(),
            listeners.http,
            shutdown_rx,
        )),
    ];
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "registry serving");
    Ok(RegistryHandle {
        grpc_addr,
        http_addr,
        shutdown: shutdown_tx,
        tasks,
        writer: Some(writer),
        shared,
    })
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How long shutdown waits for open gRPC streams before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn serve_grpc(
    shared: Arc<Shared>,
    proposer: Proposer,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer<RegistryApi>>().await;
    health.set_serving::<DiscoveryServer<DiscoveryApi>>().await;
    health.set_serving::<RoutingServer<RoutingApi>>().await;
    let routing = RoutingServer::new(RoutingApi::new(shared.clone(), proposer.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let registry = RegistryServer::new(RegistryApi::new(shared.clone(), proposer))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let discovery = DiscoveryServer::new(DiscoveryApi::new(shared))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(registry)
        .add_service(discovery)
        .add_service(routing)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), wait_for(shutdown.clone()));
    tokio::pin!(server);
    // Streams we do not own (a client's grpc.health.v1 Watch) never end by themselves:
    // after the grace period the server is dropped, closing them.
    let grace = async {
        wait_for(shutdown).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = &mut server => {
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }
        _ = grace => tracing::warn!("gRPC streams still open {SHUTDOWN_GRACE:?} after shutdown; closing them"),
    }
}

/// Proposes `ExpireLeases` for leases whose deadline passed, promptly after it passes.
async fn expiry_loop(shared: Arc<Shared>, proposer: Proposer, mut shutdown: watch::Receiver<bool>) {
    let mut retry = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = tokio::time::Instant::now();
        let expired = shared.leases.take_expired(now);
        if !expired.is_empty() {
            tracing::info!(
                leases = expired.len(),
                "leases expired; removing their instances"
            );
            let leases: Vec<(u64, u64)> = {
                let catalog = shared.catalog.read();
                expired
                    .iter()
                    .filter_map(|id| catalog.lease_granted_at(*id).map(|g| (*id, g)))
                    .collect()
            };
            if let Err(e) = proposer.propose(Command::ExpireLeases { leases }).await {
                // Nothing was removed: put the clocks back (unless a Register already
                // re-granted a lease) and retry after a pause, still listening for
                // shutdown.
                tracing::warn!(error = %e, ?retry, "could not expire leases; will retry");
                for id in expired {
                    if !shared.leases.contains(id) && shared.catalog.read().has_lease(id) {
                        shared.leases.grant(id, 1);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                retry = (retry * 2).min(Duration::from_secs(5));
            } else {
                retry = Duration::from_millis(100);
            }
            continue;
        }
        let next = shared
            .leases
            .next_deadline()
            .unwrap_or(now + Duration::from_secs(1))
            .min(now + Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.leases.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
