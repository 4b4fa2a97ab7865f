//! The catalog as a deterministic state machine: `apply(index, Command)`.
//!
//! No clock reads and no I/O happen here; everything apply needs travels inside the
//! command, and iteration is over ordered maps. Two replicas that apply the same commands
//! in the same order hold the same catalog, which is what lets the cluster feed this
//! through Raft unchanged.
//!
//! A tour, in the order data flows:
//! - `command.rs`: [`Command`], the change as the log carries it.
//! - `apply.rs`: the [`Catalog`]'s state, its [`Limits`], and `apply`, which hands each
//!   command to its concern and returns an [`ApplyResult`] (the [`Reply`] or
//!   [`ApplyError`], the change for watchers, the lease bookkeeping).
//! - `instances.rs`: register, deregister, set a state.
//! - `leases.rs`: which instances each lease keeps alive; expiry and checkpoints.
//! - `policies.rs`: routing policies and their kept history; put and rollback.
//! - `rollouts.rs`: each service's kept rollouts and their compare-and-set transitions.
//! - `acl.rs`: bootstrapped or not, and the ACL tokens (hashes of their secrets).
//! - `intentions.rs`: who may call whom over the mesh, per namespace, with history.
//! - `kv.rs`: the KV store (configuration entries), check-and-set, its byte bound.
//! - `flags.rs`: each namespace's feature-flag document, with history and rollback.
//! - `queries.rs`: reads of the applied state (snapshots, resolve, service lists).
//! - `persist.rs`: the snapshot form, [`PersistedCatalog`], and the rebuild from it.
//! - `format.rs`: format versions: what this release reads, what a cluster of mixed
//!   releases may write, and the clear refusal of a command from a newer release.
//! - `legacy.rs`: the bytes of a [`Command`], and mirrors of what older releases wrote
//!   (log entries and snapshots), so an upgraded node still opens its data dir.

mod acl;
mod apply;
mod command;
mod flags;
pub mod format;
mod instances;
mod intentions;
mod kv;
mod leases;
mod legacy;
mod persist;
mod policies;
mod queries;
mod rollouts;
#[cfg(test)]
pub(crate) mod testing;

pub use acl::MAX_TOKENS;
pub use apply::{
    ApplyError, ApplyResult, Catalog, Limits, Reply, DEFAULT_MAX_KV_BYTES,
    DEFAULT_MAX_POLICY_BYTES_PER_NAMESPACE, DEFAULT_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE,
};
pub use command::Command;
pub use flags::{FlagsRecord, MAX_FLAG_DOCUMENT_BYTES, MAX_FLAG_HISTORY};
pub use persist::{
    PersistedCatalog, PersistedCatalogV0, PersistedCatalogV1, PersistedCatalogV2,
    PersistedCatalogV3, PersistedCatalogV4,
};
pub use policies::policy_bytes;
pub use rollouts::RolloutPolicy;
