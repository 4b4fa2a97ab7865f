//! [`Command`]: a change to the catalog, as written to the Raft log.

use super::rollouts::RolloutPolicy;
use crate::model::acl::Token;
use crate::model::rollout::Rollout;
use crate::model::{Instance, LeaseId, Policy, State};

/// A change to the catalog, as written to the log. Its bytes are read and written in
/// [`super::legacy`], which also reads the forms older releases wrote.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Adds or updates an instance. With `lease_id` the instance joins that lease;
    /// without it, it keeps its current lease or gets a new one with `ttl_seconds`.
    Register {
        instance: Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
    },
    Deregister {
        namespace: String,
        id: String,
    },
    SetState {
        namespace: String,
        id: String,
        state: State,
    },
    /// Proposed by the lease keeper: removes the leases and every instance they hold.
    /// Each lease is named with the index that last granted it (as the proposer saw it);
    /// one granted again since is left alone.
    ExpireLeases {
        leases: Vec<(LeaseId, u64)>,
    },
    /// The leader's slow, batched record of each lease's remaining TTL: (lease, the index
    /// that last granted it, remaining milliseconds). A new leader honours it instead of
    /// a full TTL, so repeated elections cannot keep a dead instance alive forever.
    CheckpointLeases {
        leases: Vec<(LeaseId, u64, u64)>,
    },
    /// Sets (or with `None` clears) a service's routing policy. `at_ms` is the proposer's
    /// wall clock, recorded in the history; apply never reads a clock itself.
    PutPolicy {
        namespace: String,
        service: String,
        policy: Option<Policy>,
        at_ms: u64,
    },
    /// Restores a kept policy revision (0: the one before the current) as a new change.
    RollbackPolicy {
        namespace: String,
        service: String,
        to_revision: u64,
        at_ms: u64,
    },
    /// Several commands in one log entry, applied in order exactly as if each had its
    /// own entry: the proposer's group commit (one replication round and one fsync for
    /// all of them). Never nested. Added last, so older logs still decode.
    Batch(Vec<Command>),
    /// Names the cluster, once: proposed by the first leader that finds the catalog
    /// without an id (at bootstrap, or the first election after an upgrade). Applied only
    /// while the catalog has none, so every replica keeps the first. Watchers compare it
    /// so that a revision from another (or a wiped) cluster is never trusted. Only a
    /// leader originates it. Added last, so older logs still decode.
    InitCluster {
        id: String,
    },
    /// A rollout transition (see [`super::rollouts`]): applied only while the service's
    /// newest rollout is at `expected_generation`; with `start` a new rollout is added.
    /// `policy` is written in the same apply. Proposed by the API (start, pause, abort,
    /// ...) and by the leader's rollout loop. Added last, so older logs still decode.
    PutRollout {
        rollout: Box<Rollout>,
        expected_generation: u64,
        start: bool,
        policy: RolloutPolicy,
        at_ms: u64,
    },
    /// The first operator token; from then on the default is deny. Applied once: a
    /// second is refused. Added last, so older logs still decode.
    AclBootstrap {
        token: Box<Token>,
    },
    /// Adds a token (its secret's hash only). Added last.
    PutToken {
        token: Box<Token>,
    },
    /// Removes a token: every node refuses it from the apply on. Added last.
    DeleteToken {
        accessor_id: String,
    },
    /// The mesh CA's first root, once: proposed by the first leader that finds none,
    /// applied only while there is none (like [`Command::InitCluster`]). Added last.
    InitMeshCa {
        ca: Box<crate::model::mesh_ca::MeshCa>,
    },
    /// Creates or replaces the intention for (source, destination) in `namespace`; its
    /// revision and time are set by apply (`at_ms` is the proposer's clock).
    PutIntention {
        namespace: String,
        intention: crate::model::intention::Intention,
        at_ms: u64,
    },
    DeleteIntention {
        namespace: String,
        source: String,
        destination: String,
        at_ms: u64,
    },
    /// A new active root for the mesh CA; every root it supersedes stays trusted until
    /// `retire_at_ms` (the proposer's clock plus two leaf lifetimes). Roots retired by
    /// `at_ms` are dropped.
    RotateMeshCa {
        root: Box<crate::model::mesh_ca::CaRoot>,
        /// When the new root starts signing (until then it is only trusted).
        activate_at_ms: u64,
        retire_at_ms: u64,
        at_ms: u64,
    },
    /// Sets a service's mTLS mode: strict (only mesh endpoints, over mTLS) or not.
    SetMtls {
        namespace: String,
        service: String,
        strict: bool,
    },
    /// Writes a KV entry. With `cas`, only if the key's modify revision is that number
    /// (0: only if the key is absent); otherwise the reply says not applied. Added last.
    KvPut {
        namespace: String,
        key: String,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    },
    /// Removes a key, or with `recurse` every key starting with it. `cas` as for KvPut
    /// (single keys only). Added last.
    KvDelete {
        namespace: String,
        key: String,
        recurse: bool,
        cas: Option<u64>,
    },
    /// Replaces a namespace's flag document (validated at the edge). With
    /// `expected_revision`, only while the current document is from that revision (0:
    /// none yet): the read-modify-write of `flags set` never loses a concurrent edit.
    PutFlags {
        namespace: String,
        document: String,
        expected_revision: Option<u64>,
        at_ms: u64,
    },
    /// Restores a kept flag document (0: the one before the current) as a new change.
    RollbackFlags {
        namespace: String,
        to_revision: u64,
        at_ms: u64,
    },
    /// Moves the cluster's log format up to `format` (never down): proposed by the
    /// leader once every member runs a release of that format (see
    /// [`super::format`]). The first kind of format 2: older nodes cannot decode it, so
    /// it is written only when none is left.
    SetClusterFormat {
        format: u32,
    },
}

impl Command {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Register { .. } => "register",
            Command::Deregister { .. } => "deregister",
            Command::SetState { .. } => "set_state",
            Command::ExpireLeases { .. } => "expire_leases",
            Command::CheckpointLeases { .. } => "checkpoint_leases",
            Command::PutPolicy { .. } => "put_policy",
            Command::RollbackPolicy { .. } => "rollback_policy",
            Command::Batch(_) => "batch",
            Command::InitCluster { .. } => "init_cluster",
            Command::PutRollout { .. } => "put_rollout",
            Command::AclBootstrap { .. } => "acl_bootstrap",
            Command::PutToken { .. } => "put_token",
            Command::DeleteToken { .. } => "delete_token",
            Command::InitMeshCa { .. } => "init_mesh_ca",
            Command::PutIntention { .. } => "put_intention",
            Command::DeleteIntention { .. } => "delete_intention",
            Command::RotateMeshCa { .. } => "rotate_mesh_ca",
            Command::SetMtls { .. } => "set_mtls",
            Command::KvPut { .. } => "kv_put",
            Command::KvDelete { .. } => "kv_delete",
            Command::PutFlags { .. } => "put_flags",
            Command::RollbackFlags { .. } => "rollback_flags",
            Command::SetClusterFormat { .. } => "set_cluster_format",
        }
    }
}
