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

use crate::api::server::{serve_grpc, serve_peer};
use crate::config::{Listeners, RegistryConfig, StartError};
use crate::lease::checkpoint::checkpoint_loop;
use crate::lease::expiry::expiry_loop;
use crate::lease::preservation::Preservation;
use crate::raft::alias::Raft;
use crate::raft::leadership::leadership_loop;
use crate::raft::log_store::LogStore;
use crate::raft::membership::join_loop;
use crate::raft::network::Network;
use crate::raft::propose::Proposer;
use crate::raft::state_machine::StateMachine;
use crate::shared::Shared;
use crate::storage_health::{describe_io_error, describe_open_error, StorageFailure};

/// A running registry node.
pub struct RegistryHandle {
    pub grpc_addr: SocketAddr,
    /// The peer port (Raft, forwarding): what `--peers` and `--advertise` name.
    pub peer_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The DNS port (UDP and TCP), when served.
    pub dns_addr: Option<SocketAddr>,
    /// The second HTTP address (`--consul-http`, Consul's 8500), when served.
    pub consul_http_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    raft: Raft,
    shared: Arc<Shared>,
    /// Kept so shutdown can close the data dir itself, once every Raft task let go.
    db: Arc<redb::Database>,
}

impl RegistryHandle {
    /// Resolves once a write or fsync of the data dir failed (at once if one already
    /// did). The node then serves reads but no writes, says NOT_SERVING, and cannot
    /// recover in this process (see [`crate::storage_health`]): the embedder should
    /// [`shutdown`](Self::shutdown) and start it again, which the `switchyard registry`
    /// binary does by exiting non-zero for its supervisor.
    pub async fn failed(&self) -> Arc<StorageFailure> {
        self.shared.storage.failed().await
    }

    /// The storage failure, if there was one.
    pub fn failure(&self) -> Option<Arc<StorageFailure>> {
        self.shared.storage.failure()
    }

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
    // Before the data dir is touched: a bad certificate must fail the start cleanly.
    let tls = load_tls(config.tls.as_ref())?;
    let mesh = load_mesh(&config.mesh)?;
    refuse_shared_ca(&config)?;
    let grpc_addr = listeners.grpc.local_addr().map_err(StartError::Addr)?;
    let peer_addr = listeners.peer.local_addr().map_err(StartError::Addr)?;
    let http_addr = listeners.http.local_addr().map_err(StartError::Addr)?;
    let dns_addr = match &listeners.dns {
        Some((udp, _)) => Some(udp.local_addr().map_err(StartError::Addr)?),
        None => None,
    };
    let consul_listener = match config.consul.listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            StartError::Config(format!(
                "cannot listen on {addr} (--consul-http): {e}; pick another address or leave it unset"
            ))
        })?),
        None => None,
    };
    let consul_http_addr = match &consul_listener {
        Some(l) => Some(l.local_addr().map_err(StartError::Addr)?),
        None => None,
    };

    let dir = config.data_dir.clone();
    let store_err = |reason: String| StartError::Store {
        dir: dir.clone(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| store_err(describe_io_error(&dir, &e)))?;
    let path = dir.join("registry.redb");
    let db = tokio::task::spawn_blocking(move || redb::Database::create(path))
        .await
        .map_err(|e| store_err(e.to_string()))?
        .map_err(|e| store_err(describe_open_error(&dir, &e)))?;
    let db = Arc::new(db);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let snapshot_every = config.snapshot_every;
    let shared = Shared::new(config.shared(), dir.clone(), shutdown_rx.clone());
    let log_store = LogStore::new(
        db.clone(),
        Some(shared.metrics.clone()),
        shared.committed.clone(),
        Some(shared.storage.clone()),
    )
    .map_err(|e| {
        store_err(match &e {
            redb::Error::Io(io) => describe_io_error(&dir, io),
            other => other.to_string(),
        })
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
    let network = Network::new(tls.peer_client.clone());
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
        if peer_addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", peer_addr.port())
        } else {
            peer_addr.to_string()
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
        crate::raft::propose::ProposerSettings {
            quorum_silence: config.heartbeat * 20,
            cluster_size_hint: cluster_size,
            max_pending: config.max_pending_writes,
        },
        Some(shared.metrics.clone()),
        shared.storage.clone(),
        shared.cluster_format.clone(),
    );

    let http_api = Arc::new(crate::http::HttpApi {
        shared: shared.clone(),
        proposer: proposer.clone(),
        consul: crate::consul::Consul::new(shared.clone(), proposer.clone(), config.consul.clone()),
        flags: Default::default(),
    });
    let (forwarder, forward_task) = crate::telemetry_forward::start(
        proposer.clone(),
        shared.metrics.clone(),
        shutdown_rx.clone(),
    );
    let mut tasks = vec![
        forward_task,
        tokio::spawn(crate::storage_health::watch_raft(
            raft.clone(),
            shared.storage.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(expiry_loop(
            shared.clone(),
            proposer.clone(),
            Preservation {
                threshold: config.self_preservation_threshold,
                min_leases: config.self_preservation_min_leases,
            },
            shutdown_rx.clone(),
        )),
        tokio::spawn(crate::rollout::driver::rollout_loop(
            shared.clone(),
            proposer.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(serve_grpc(
            shared.clone(),
            proposer.clone(),
            forwarder,
            listeners.grpc,
            tls.grpc.clone(),
            mesh.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(serve_peer(
            shared.clone(),
            proposer.clone(),
            listeners.peer,
            tls.peer.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(leadership_loop(
            shared.clone(),
            raft.clone(),
            proposer.clone(),
            mesh.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(checkpoint_loop(
            shared.clone(),
            proposer.clone(),
            config.lease_checkpoint_interval,
            shutdown_rx.clone(),
        )),
        tokio::spawn(crate::raft::upgrade::upgrade_loop(
            shared.clone(),
            proposer.clone(),
            node_id,
            shutdown_rx.clone(),
        )),
        tokio::spawn(join_loop(
            config.join.clone(),
            node_id,
            advertise.clone(),
            raft.clone(),
            proposer.network().clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(crate::http::serve(
            http_api.clone(),
            listeners.http,
            tls.http.clone(),
            config.http,
            shutdown_rx.clone(),
        )),
    ];
    tasks.extend(http_api.consul.spawn());
    if let Some(l) = consul_listener {
        tasks.push(tokio::spawn(crate::http::serve(
            http_api.clone(),
            l,
            tls.http.clone(),
            config.http,
            shutdown_rx.clone(),
        )));
    }
    if !tls.reloadable.is_empty() {
        let stop = wait_for_stop(shutdown_rx.clone());
        tasks.push(tokio::spawn(switchyard_tls::reload::watch(
            tls.reloadable.clone(),
            stop,
        )));
    }
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
        peer = %peer_addr,
        http = %http_addr,
        dns = %dns_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        "registry serving"
    );
    Ok(RegistryHandle {
        grpc_addr,
        peer_addr,
        http_addr,
        dns_addr,
        consul_http_addr,
        shutdown: shutdown_tx,
        tasks,
        raft,
        shared,
        db,
    })
}

/// The TLS configurations of a node's ports and of its calls to other nodes.
#[derive(Default)]
struct NodeTls {
    grpc: Option<Arc<switchyard_tls::ServerTls>>,
    http: Option<Arc<switchyard_tls::ServerTls>>,
    peer: Option<Arc<switchyard_tls::ServerTls>>,
    peer_client: switchyard_tls::Transport,
    reloadable: Vec<Arc<dyn switchyard_tls::reload::Reloadable>>,
}

fn load_tls(files: Option<&crate::config::TlsFiles>) -> Result<NodeTls, StartError> {
    use switchyard_tls::server::{ServerFiles, ALPN_GRPC, ALPN_HTTP1};
    use switchyard_tls::{ClientTls, ServerTls, Transport};
    let Some(files) = files else {
        return Ok(NodeTls::default());
    };
    let err = |e: switchyard_tls::TlsError| StartError::Tls(e.0);
    let public = ServerFiles {
        cert: files.cert.clone(),
        key: files.key.clone(),
        client_ca: None,
    };
    let mutual = ServerFiles {
        client_ca: Some(files.ca.clone()),
        ..public.clone()
    };
    let grpc = ServerTls::load(public.clone(), ALPN_GRPC).map_err(err)?;
    let http = ServerTls::load(public, ALPN_HTTP1).map_err(err)?;
    let peer = ServerTls::load(mutual, ALPN_GRPC).map_err(err)?;
    let client = ClientTls::load(&files.ca, Some((&files.cert, &files.key))).map_err(err)?;
    Ok(NodeTls {
        reloadable: vec![grpc.clone(), http.clone(), peer.clone(), client.clone()],
        grpc: Some(grpc),
        http: Some(http),
        peer: Some(peer),
        peer_client: Transport::tls(client),
    })
}

/// The peer port accepts any client certificate its CA signed: if the mesh CA (which
/// signs every sidecar's leaf) were that CA, a sidecar could vote and append.
fn refuse_shared_ca(config: &RegistryConfig) -> Result<(), StartError> {
    let (Some(tls), Some(mesh)) = (&config.tls, &config.mesh.ca_cert) else {
        return Ok(());
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let (peer_ca, mesh_ca) = (read(&tls.ca), read(mesh));
    if !peer_ca.trim().is_empty() && peer_ca.trim() == mesh_ca.trim() {
        return Err(StartError::Config(format!(
            "--mesh-ca-cert {} is the CA of --ca-file {}: the peer port would accept every sidecar's leaf as a registry node; give the mesh its own CA (or let the registry make one)",
            mesh.display(),
            tls.ca.display()
        )));
    }
    Ok(())
}

fn load_mesh(
    config: &crate::config::MeshConfig,
) -> Result<Arc<crate::identity::MeshSettings>, StartError> {
    let file_root = match (&config.ca_cert, &config.ca_key) {
        (Some(cert), Some(key)) => Some(
            switchyard_tls::mesh_ca::Root::from_files(cert, key)
                .map_err(|e| StartError::Config(format!("--mesh-ca-cert/--mesh-ca-key: {e}")))?,
        ),
        _ => None,
    };
    Ok(crate::identity::MeshSettings::new(
        config.trust_domain.clone(),
        config.leaf_ttl,
        file_root,
        config.csr_per_second,
        config.root_propagation,
    ))
}

async fn wait_for_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
