//! The discovery client: one `Watch` stream to a registry, kept alive across failures.
//!
//! States, as in linkerd2-proxy's reconnect wrapper: connecting → streaming → backoff →
//! connecting to the next registry in the list. While no registry answers, the last
//! catalog keeps serving; it is also written to disk, so a restart without a registry
//! still routes. A reconnect resumes from the last revision seen, so the registry sends
//! only the deltas since (or a snapshot when it no longer holds them).

pub mod cache;
pub mod catalog;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::discovery_client::DiscoveryClient;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::metrics::Metrics;
use crate::table::EndpointTable;
use catalog::LocalCatalog;

/// Largest Watch message accepted (a snapshot of a very large catalog).
const MAX_EVENT_BYTES: usize = 256 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Registry gRPC URLs, tried in turn.
    pub registries: Vec<String>,
    pub namespace: String,
    /// Where the last catalog is kept; `None` disables the disk cache.
    pub cache_file: Option<PathBuf>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// ACL token secret for the registry (`None`: none sent). Never logged.
    pub token: Option<String>,
    /// Plain TCP for `http://` registries, TLS with `--ca-file` for `https://`.
    pub transport: switchyard_tls::Transport,
    /// KV prefixes followed over the watch stream (none: no KV).
    pub kv_prefixes: Vec<String>,
}

/// Jittered exponential backoff: the n-th wait is uniform in [d/2, d] with
/// d = min(max, min·2ⁿ), so a fleet of sidecars does not reconnect in lockstep.
pub fn backoff(cfg: &DiscoveryConfig, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
    let base = cfg
        .backoff_min
        .saturating_mul(1u32 << attempt.min(20))
        .min(cfg.backoff_max);
    base.mul_f64(0.5 + rng.f64() * 0.5)
}

/// Loads the disk cache into the table, if there is one.
pub fn load_cache(cfg: &DiscoveryConfig, table: &EndpointTable, metrics: &Metrics) -> LocalCatalog {
    let Some(path) = &cfg.cache_file else {
        return LocalCatalog::default();
    };
    match cache::load(path, &cfg.namespace) {
        Ok(Some(catalog)) => {
            tracing::info!(path = %path.display(), revision = catalog.revision, services = catalog.services.len(), "loaded the catalog from the disk cache; routing on it until a registry answers");
            catalog.publish(&catalog::Touched::All, table, Some(metrics));
            catalog
        }
        Ok(None) => LocalCatalog::default(),
        Err(e) => {
            tracing::warn!("{e}");
            LocalCatalog::default()
        }
    }
}

/// Runs until shutdown: watch, apply, publish, persist, reconnect.
pub async fn run(
    cfg: DiscoveryConfig,
    table: Arc<EndpointTable>,
    metrics: Arc<Metrics>,
    mut catalog: LocalCatalog,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rng = fastrand::Rng::new();
    let mut attempt: u32 = 0;
    let mut next = 0usize;
    let mut dirty = false;
    loop {
        let url = &cfg.registries[next % cfg.registries.len()];
        next += 1;
        let stopped = stream_from(
            url,
            &cfg,
            &table,
            &metrics,
            &mut catalog,
            &mut dirty,
            &mut attempt,
            &mut shutdown,
        )
        .await;
        table.set_connected(false);
        persist(&cfg, &catalog, &mut dirty).await;
        if stopped {
            return;
        }
        let wait = backoff(&cfg, attempt, &mut rng);
        attempt = attempt.saturating_add(1);
        tracing::debug!(
            ?wait,
            "watch stream down; backing off before the next registry"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
    }
}

/// A snapshot whose message is larger than this is followed by a fresh watch stream
/// (see [`is_large_snapshot`]).
const LARGE_SNAPSHOT_BYTES: usize = 256 * 1024;
/// How long a renewed watch may take to open before the connection is given up.
const RENEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `event` is a snapshot large enough that the stream's read buffer, which
/// tonic keeps at the size of the largest message it read (about 120 bytes per
/// endpoint: 1.2 MB at 10,000), is worth giving back by opening the stream anew.
fn is_large_snapshot(event: &pb::WatchEvent) -> bool {
    use prost::Message;
    matches!(event.kind, Some(pb::watch_event::Kind::Snapshot(_)))
        && event.encoded_len() > LARGE_SNAPSHOT_BYTES
}

/// Opens a Watch of the namespace on `client`, from what `catalog` holds.
async fn open_watch(
    client: &mut DiscoveryClient<tonic::transport::Channel>,
    cfg: &DiscoveryConfig,
    catalog: &LocalCatalog,
) -> Result<tonic::Streaming<pb::WatchEvent>, String> {
    client
        .watch(crate::authorized(
            pb::WatchRequest {
                namespace: cfg.namespace.clone(),
                services: Vec::new(),
                // A catalog from the cache file lacks the intentions: a snapshot
                // brings them (and every change since the cache was written).
                since_revision: if catalog.intentions_known {
                    catalog.revision
                } else {
                    0
                },
                cluster_id: catalog.cluster_id.clone(),
                // The namespace's flags, for the admin port's OFREP endpoints.
                flags: true,
                kv_prefixes: cfg.kv_prefixes.clone(),
            },
            cfg.token.as_deref(),
        ))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}

/// One connection's life. Returns true when the sidecar is shutting down.
#[allow(clippy::too_many_arguments)]
async fn stream_from(
    url: &str,
    cfg: &DiscoveryConfig,
    table: &EndpointTable,
    metrics: &Metrics,
    catalog: &mut LocalCatalog,
    dirty: &mut bool,
    attempt: &mut u32,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let endpoint = match Endpoint::from_shared(url.to_string()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true),
        Err(e) => {
            tracing::error!(url, error = %e, "invalid registry URL");
            return false;
        }
    };
    let connect = async {
        cfg.transport.check(url).map_err(|e| e.0)?;
        let channel = cfg
            .transport
            .connect(endpoint)
            .await
            .map_err(|e| switchyard_tls::client::explain(&e))?;
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_EVENT_BYTES);
        let stream = open_watch(&mut client, cfg, catalog).await?;
        Ok::<_, String>((client, stream))
    };
    let (mut client, mut stream) = tokio::select! {
        r = connect => match r {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(registry = url, error = %e, "cannot watch this registry; routing on the last known catalog");
                return false;
            }
        },
        _ = crate::stopped(shutdown) => return true,
    };
    tracing::info!(
        registry = url,
        since = catalog.revision,
        "watching the registry"
    );
    metrics.watch_reconnects.inc();
    table.set_connected(true);
    *attempt = 0;
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    let mut renewed = false;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(event)) => {
                    if !catalog.same_cluster(&event) {
                        // The registry checks the id before it sends deltas; a delta
                        // from another cluster is never applied. Start over with a
                        // snapshot (the table keeps routing on what it has meanwhile).
                        tracing::warn!(registry = url, ours = %catalog.cluster_id, theirs = %event.cluster_id, "the registry belongs to another cluster; asking for a snapshot");
                        catalog.revision = 0;
                        catalog.cluster_id.clear();
                        return false;
                    }
                    let large = is_large_snapshot(&event);
                    let touched = catalog.apply(event);
                    catalog.publish(&touched, table, Some(metrics));
                    *dirty = true;
                    if large && !renewed {
                        // tonic keeps a stream's read buffer at its largest message for
                        // the stream's life: a new stream on the same connection, from
                        // the revision just applied, gives that memory back. Once per
                        // connection, so a registry that answers with snapshots again
                        // cannot make a loop of it.
                        renewed = true;
                        let reopen = open_watch(&mut client, cfg, catalog);
                        match tokio::time::timeout(RENEW_TIMEOUT, reopen).await {
                            Ok(Ok(s)) => {
                                stream = s;
                                tracing::debug!(registry = url, since = catalog.revision, "watch stream renewed after a large snapshot");
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(registry = url, error = %e, "cannot renew the watch after a snapshot; reconnecting");
                                return false;
                            }
                            Err(_) => {
                                tracing::warn!(registry = url, "the registry did not answer a renewed watch within {RENEW_TIMEOUT:?}; reconnecting");
                                return false;
                            }
                        }
                    }
                }
                Ok(None) => {
                    tracing::warn!(registry = url, "the registry ended the watch; reconnecting");
                    return false;
                }
                Err(s) => {
                    tracing::warn!(registry = url, error = %s.message(), "watch stream failed; reconnecting");
                    return false;
                }
            },
            _ = flush.tick() => persist(cfg, catalog, dirty).await,
            _ = crate::stopped(shutdown) => return true,
        }
    }
}

/// Writes the catalog to the disk cache when it changed since the last write.
async fn persist(cfg: &DiscoveryConfig, catalog: &LocalCatalog, dirty: &mut bool) {
    let Some(path) = cfg.cache_file.clone() else {
        return;
    };
    if !*dirty {
        return;
    }
    let snapshot = catalog.clone();
    match tokio::task::spawn_blocking(move || cache::store(&path, &snapshot)).await {
        Ok(Ok(())) => *dirty = false,
        Ok(Err(e)) => tracing::warn!("{e}"),
        Err(e) => tracing::warn!(error = %e, "cache writer failed"),
    }
}
