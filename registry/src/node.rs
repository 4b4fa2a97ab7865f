//! Starting and stopping a registry node: storage, Raft, the background loops (lease
//! expiry and checkpoints in [`crate::lease`], leadership and membership in
//! [`crate::raft`]), and the gRPC, HTTP and DNS servers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use switchyard_proto::v1::discovery_server::DiscoveryServer;
use switchyard_proto::v1::registry_server::RegistryServer;
use switchyard_proto::v1::routing_server::RoutingServer;

use switchyard_proto::internal::raft_internal_server::RaftInternalServer;
use switchyard_proto::v1::cluster_server::ClusterServer;

use crate::api::{ClusterApi, DiscoveryApi, RegistryApi, RoutingApi};
use crate::config::{Listeners, RegistryConfig, StartError, MAX_REQUEST_BYTES};
use crate::lease::checkpoint::checkpoint_loop;
use crate::lease::expiry::expiry_loop;
use crate::lease::preservation::Preservation;
use crate::raft::alias::Raft;
use crate::raft::leadership::leadership_loop;
use crate::raft::log_store::LogStore;
use crate::raft::membership::join_loop;
use crate::raft::network::{Network, MAX_RAFT_MESSAGE};
use crate::raft::propose::Proposer;
use crate::raft::service::RaftService;
use crate::raft::state_machine::StateMachine;
use crate::shared::Shared;

/// A running registry node.
pub struct RegistryHandle {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The DNS port (UDP and TCP), when served.
    pub dns_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    raft: Raft,
    shared: Arc<Shared>,
    /// Kept so shutdown can close the data dir itself, once every Raft task let go.
    db: Arc<redb::Database>,
}

impl RegistryHandle {
    /// Stops accepting work, ends every stream, waits for in-flight writes to land.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not stop cleanly");
        }
        // openraft's workers drop the stores on their own threads after `shutdown`
        // returns. Wait (bounded) until only this handle holds the database, then close
        // it here, so the data dir is released (redb's lock, its clean-shutdown write)
        // when this returns and a restart in the same process can open it at once.
        for _ in 0..500 {
            if Arc::strong_count(&self.db) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&self.db) > 1 {
            tracing::warn!("the data dir is still in use 5 s after shutdown");
        }
        tracing::info!(
            revision = self.shared.catalog.read().revision(),
            "registry stopped"
        );
        let db = self.db;
        let _ = tokio::task::spawn_blocking(move || drop(db)).await;
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
    let dns_addr = match &listeners.dns {
        Some((udp, _)) => Some(udp.local_addr().map_err(StartError::Addr)?),
        None => None,
    };

    let dir = config.data_dir.clone();
    let store_err = |reason: String| StartError::Store {
        dir: dir.clone(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| store_err(e.to_string()))?;
    let path = dir.join("registry.redb");
    let db = tokio::task::spawn_blocking(move || redb::Database::create(path))
        .await
        .map_err(|e| store_err(e.to_string()))?
        .map_err(|e| {
            store_err(format!(
                "{e} (is another switchyard process using this --data-dir?)"
            ))
        })?;
    let db = Arc::new(db);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let snapshot_every = config.snapshot_every;
    let shared = Shared::new(config.shared(), shutdown_rx.clone());
    let log_store = LogStore::new(
        db.clone(),
        Some(shared.metrics.clone()),
        shared.committed.clone(),
    )
    .map_err(|e| StartError::Store {
        dir: config.data_dir.clone(),
        reason: e.to_string(),
    })?;
    let state_machine = StateMachine::open(shared.apply_handle(), db.clone())
        .map_err(|e| StartError::Raft(e.to_string()))?;
    {
        let catalog = shared.catalog.read();
        shared.metrics.set_catalog_gauges(&catalog);
        // Changes before the snapshot are not in the history: a resume from before it
        // gets a snapshot.
        shared.hub.reset(catalog.revision());
        tracing::info!(
            data_dir = %config.data_dir.display(),
            revision = catalog.revision(),
            instances = catalog.instance_count(),
            "snapshot loaded; Raft replays the log after it"
        );
    }
    let heartbeat = config.heartbeat.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: "switchyard".into(),
        heartbeat_interval: heartbeat,
        election_timeout_min: heartbeat * 5,
        election_timeout_max: heartbeat * 10,
        install_snapshot_timeout: 5_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: 1_000,
        purge_batch_size: 256,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let network = Network::default();
    let node_id = config.node_id;
    let raft = openraft::Raft::new(
        node_id,
        Arc::new(raft_config),
        network.clone(),
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let advertise = config.advertise.clone().unwrap_or_else(|| {
        if grpc_addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", grpc_addr.port())
        } else {
            grpc_addr.to_string()
        }
    });
    let members: BTreeMap<u64, openraft::BasicNode> = if config.peers.is_empty() {
        BTreeMap::from([(node_id, openraft::BasicNode::new(advertise.clone()))])
    } else {
        config
            .peers
            .iter()
            .map(|(id, addr)| (*id, openraft::BasicNode::new(addr.clone())))
            .collect()
    };
    let cluster_size = members.len();
    // Pristine nodes start the group. A joining node waits to be added instead (see `raft::membership`).
    // Asking an initialized group to initialize makes openraft log an ERROR on every
    // normal restart; ask only a pristine node.
    let pristine = !raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if config.join.is_none() && pristine {
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(
                node_id,
                members = cluster_size,
                "initialized a new Raft group"
            ),
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => {}
            Err(e) => return Err(StartError::Raft(e.to_string())),
        }
    }
    if cluster_size == 1 && config.join.is_none() {
        // A group of one elects itself within an election timeout: be the leader before
        // saying "serving", so the first write does not race the election.
        let _ = raft
            .wait(Some(Duration::from_secs(5)))
            .current_leader(node_id, "this single node to lead")
            .await;
    }
    let proposer = Proposer::new(
        raft.clone(),
        network,
        config.heartbeat * 20,
        cluster_size,
        Some(shared.metrics.clone()),
    );

    let mut tasks = vec![
        tokio::spawn(expiry_loop(
            shared.clone(),
            proposer.clone(),
            Preservation {
                threshold: config.self_preservation_threshold,
                min_leases: config.self_preservation_min_leases,
            },
            shutdown_rx.clone(),
        )),
        tokio::spawn(serve_grpc(
            shared.clone(),
            proposer.clone(),
            listeners.grpc,
            shutdown_rx.clone(),
        )),
        tokio::spawn(leadership_loop(
            shared.clone(),
            raft.clone(),
            proposer.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(checkpoint_loop(
            shared.clone(),
            proposer.clone(),
            config.lease_checkpoint_interval,
            shutdown_rx.clone(),
        )),
        tokio::spawn(join_loop(
            config.join.clone(),
            node_id,
            advertise.clone(),
            raft.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(crate::http::serve(
            shared.clone(),
            listeners.http,
            shutdown_rx.clone(),
        )),
    ];
    if let Some((udp, tcp)) = listeners.dns {
        let handler = switchyard_core::dns::DnsHandler::new(
            crate::dns_source::CatalogSource(shared.clone()),
            &config.dns,
        )
        .map_err(StartError::Config)?;
        tasks.push(tokio::spawn(switchyard_core::dns::serve(
            handler,
            udp,
            tcp,
            shutdown_rx.clone(),
        )));
    }
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        dns = %dns_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        "registry serving"
    );
    Ok(RegistryHandle {
        grpc_addr,
        http_addr,
        dns_addr,
        shutdown: shutdown_tx,
        tasks,
        raft,
        shared,
        db,
    })
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How long shutdown waits for open gRPC streams before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// HTTP/2 streams one client connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// tonic answers a message over the size limit with OUT_OF_RANGE; gRPC's convention (and
/// what clients retry on differently) is RESOURCE_EXHAUSTED. Rewrites the status of such
/// answers, in the headers (trailers-only responses) or the trailers, and says what the
/// limit is.
fn oversized_is_resource_exhausted(
    resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let mut resp = resp;
    rewrite_oversized(resp.headers_mut());
    resp.map(|body| {
        tonic::body::Body::new(body.map_frame(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                rewrite_oversized(&mut trailers);
                http_body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        }))
    })
}

fn rewrite_oversized(headers: &mut http::HeaderMap) {
    let oversized = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"11")
        && headers
            .get("grpc-message")
            // Percent-encoded (tonic encodes spaces).
            .is_some_and(|m| m.as_bytes().windows(11).any(|w| w == b"too%20large"));
    if oversized {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "the request message is larger than 1 MiB, the registry's limit per message",
            ),
        );
    }
}

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
    let cluster = ClusterServer::new(ClusterApi::new(shared.clone(), proposer.clone()));
    let internal =
        RaftInternalServer::new(RaftService::new(proposer.raft().clone(), proposer.clone()))
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let registry = RegistryServer::new(RegistryApi::new(shared.clone(), proposer))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let discovery = DiscoveryServer::new(DiscoveryApi::new(shared))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Streams per connection (KeepAlive and Watch streams a client never reads hold
        // memory): a bound per connection, on top of max_watchers.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted,
        ))
        .add_service(health_service)
        .add_service(registry)
        .add_service(discovery)
        .add_service(routing)
        .add_service(cluster)
        .add_service(internal)
        .serve_with_incoming_shutdown(
            // tonic ignores its own TCP_NODELAY setting for a listener handed in: set it
            // here, or Nagle holds a watch event back until the client's delayed ACK
            // (40 ms) whenever little else is being sent.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            wait_for(shutdown.clone()),
        );
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
