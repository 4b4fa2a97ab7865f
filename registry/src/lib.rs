//! The Switchyard registry as a library.
//!
//! A tour, in the order a write travels and its effects flow out:
//! - [`config`]: [`RegistryConfig`] (validated before any socket is used), the caller's
//!   bound [`Listeners`], and [`StartError`].
//! - [`api`]: the gRPC services (`Registry`, `Discovery`, `Routing`, `Cluster`,
//!   `Telemetry`); validate
//!   at the edge, convert wire types to [`model`] types, propose commands.
//! - [`raft`]: openraft glue: [`raft::propose`] writes commands (group commit on the
//!   leader, forwarding from followers), [`raft::log_store`] keeps the log in redb
//!   (fsync'd batches), [`raft::state_machine`] applies committed commands to the
//!   [`catalog`], [`raft::network`] and [`raft::service`] carry peer traffic,
//!   [`raft::leadership`] and [`raft::membership`] follow the role and join a cluster.
//! - [`catalog`]: the deterministic state machine, `apply(index, Command)`, one file per
//!   concern.
//! - [`watch`]: the hub that fans applied changes out to Watch streams.
//! - [`lease`]: the leader's in-memory lease deadlines, its expiry and checkpoint loops,
//!   and self-preservation.
//! - [`shared`]: the state every reader and loop shares (catalog, hub, lease keeper,
//!   metrics, shutdown flag), and the narrower slice the state machine applies to.
//! - [`dns_source`]: the catalog as a source of `switchyard_core::dns` answers.
//! - [`storage_health`]: whether the data dir can still be written; a failed write
//!   makes the node unhealthy for good (it must restart), and the words for disk errors.
//! - [`telemetry`]: sidecars' per-version windows (requests, errors, slow, latency
//!   buckets) in a bounded in-memory ring per version, for `Top` and `/metrics`;
//!   [`telemetry_forward`] hands a follower's windows on to the leader, whose store
//!   is the cluster's view.
//! - [`rollout_hooks`]: calls a rollout's Flagger-compatible webhooks (JSON POST, one
//!   timeout per call, redacted URLs in errors) for the leader's rollout loop.
//! - [`http`] and [`metrics`]: `/metrics`, `/health`, the JSON API `/api/v1/...` and
//!   Prometheus discovery; [`consul`]: the Consul-compatible `/v1/...` on the same port.
//! - [`node`]: wires it together; [`start`] takes a config and bound listeners and
//!   returns a handle with the real addresses and a graceful `shutdown`.

pub mod api;
pub mod auth;
pub mod auth_backoff;
pub mod catalog;
pub mod config;
pub mod consul;
pub mod dns_source;
pub mod http;
pub mod identity;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod rollout;
pub mod rollout_hooks;
pub mod shared;
pub mod storage_health;
pub mod telemetry;
pub mod telemetry_forward;
pub mod watch;

/// The domain model lives in `switchyard-core` (the sidecar shares it); the registry
/// names it `crate::model` like any module of its own.
pub(crate) use switchyard_core::model;

pub use catalog::{
    Limits, DEFAULT_MAX_KV_BYTES, DEFAULT_MAX_POLICY_BYTES_PER_NAMESPACE,
    DEFAULT_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE,
};
pub use config::{AclDefaults, Listeners, MeshConfig, RegistryConfig, StartError, TlsFiles};
pub use node::{start, RegistryHandle};
pub use storage_health::StorageFailure;
pub use watch::budget::DEFAULT_MAX_WATCH_BUFFER_BYTES;
