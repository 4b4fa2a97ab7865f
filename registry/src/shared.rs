//! [`Shared`]: the node's state that the API handlers, the HTTP endpoints, DNS and the
//! background loops all read: the catalog, the watch hub, the lease keeper, the metrics,
//! the shutdown flag, the committed index and whether the data dir can still be written.
//!
//! A leaf: it names the parts it holds and nothing that uses them, so every server and
//! loop can depend on it without a circle back to the node that starts them.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::catalog::{Catalog, Limits};
use crate::lease::LeaseKeeper;
use crate::metrics::Metrics;
use crate::storage_health::StorageHealth;
use crate::telemetry::{TelemetryLimits, TelemetryStore};
use crate::watch::budget::WatchBudget;
use crate::watch::WatchHub;

/// The part of the node's configuration that the shared state and its readers need
/// (see [`RegistryConfig`](crate::RegistryConfig) for what each field means).
#[derive(Clone, Debug)]
pub struct SharedConfig {
    pub limits: Limits,
    pub watch_buffer: usize,
    pub watch_history: usize,
    pub max_watchers: usize,
    pub max_watch_buffer_bytes: usize,
    pub max_keepalive_streams: usize,
    pub telemetry: TelemetryLimits,
    pub acl: crate::config::AclDefaults,
}

/// State shared by the API handlers, HTTP, DNS and the background loops (the Raft state
/// machine gets only its [`ApplyHandle`] slice of it).
pub struct Shared {
    /// Lock order: `catalog` before the hub's and the lease keeper's own locks. Nobody
    /// holds it across an `.await`.
    pub catalog: Arc<RwLock<Catalog>>,
    pub hub: Arc<WatchHub>,
    /// Bytes of watch events built and not yet sent, for the whole node.
    pub watch_budget: Arc<WatchBudget>,
    pub leases: Arc<LeaseKeeper>,
    pub metrics: Arc<Metrics>,
    pub config: SharedConfig,
    /// Flips to `true` once when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// The highest committed log index this node knows (saved by the log store).
    pub committed: Arc<std::sync::atomic::AtomicU64>,
    /// Healthy until a write or fsync of the data dir fails; failed for good after.
    pub storage: StorageHealth,
    /// Sidecars' per-version windows (in memory, never in the log): what this node was
    /// sent, and on the leader also what followers forwarded.
    pub telemetry: Arc<TelemetryStore>,
    /// The catalog's cluster format (see [`crate::catalog::format`]), mirrored by every
    /// apply so the write path checks it without the catalog's lock.
    pub cluster_format: Arc<std::sync::atomic::AtomicU32>,
}

impl Shared {
    /// Empty shared state for a node with this config and data dir (the catalog is
    /// filled by the state machine from its snapshot and the Raft log).
    pub fn new(
        config: SharedConfig,
        data_dir: PathBuf,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let catalog = Catalog::new(config.limits);
        let metrics = Arc::new(Metrics::default());
        Arc::new(Shared {
            watch_budget: Arc::new(WatchBudget::new(
                config.max_watch_buffer_bytes,
                metrics.watch_buffered_bytes.clone(),
            )),
            hub: Arc::new(WatchHub::new(
                config.watch_buffer,
                config.watch_history,
                catalog.revision(),
            )),
            catalog: Arc::new(RwLock::new(catalog)),
            // Leases get their clocks from the applies Raft replays and, in full, when
            // this node becomes leader (see `raft::leadership`).
            leases: Arc::new(LeaseKeeper::default()),
            storage: StorageHealth::new(data_dir, metrics.clone()),
            metrics,
            telemetry: Arc::new(TelemetryStore::new(config.telemetry)),
            config,
            shutdown,
            committed: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cluster_format: Arc::new(std::sync::atomic::AtomicU32::new(
                crate::catalog::format::UNVERSIONED,
            )),
        })
    }

    /// The parts the Raft state machine applies commands to.
    pub fn apply_handle(&self) -> ApplyHandle {
        ApplyHandle {
            catalog: self.catalog.clone(),
            hub: self.hub.clone(),
            leases: self.leases.clone(),
            metrics: self.metrics.clone(),
            limits: self.config.limits,
            cluster_format: self.cluster_format.clone(),
        }
    }
}

/// What applying a command touches, and nothing more: the catalog it changes, the lease
/// keeper whose clocks it mirrors, the hub it publishes the change to, and the metrics it
/// updates. The Raft state machine holds this instead of the whole [`Shared`].
#[derive(Clone)]
pub struct ApplyHandle {
    /// The same lock as [`Shared::catalog`], with the same lock order.
    pub catalog: Arc<RwLock<Catalog>>,
    pub hub: Arc<WatchHub>,
    pub leases: Arc<LeaseKeeper>,
    pub metrics: Arc<Metrics>,
    /// The catalog's bounds, for one rebuilt from a snapshot.
    pub limits: Limits,
    /// The same as [`Shared::cluster_format`].
    pub cluster_format: Arc<std::sync::atomic::AtomicU32>,
}

impl ApplyHandle {
    /// Mirrors what the write path and the metrics read of a just-changed catalog.
    pub fn publish(&self, catalog: &Catalog) {
        self.metrics.set_catalog_gauges(catalog);
        self.cluster_format.store(
            catalog.cluster_format(),
            std::sync::atomic::Ordering::Release,
        );
    }
}
