//! The catalog's state and its one way in: [`Catalog::apply`] dispatches each command to
//! the file of its concern and returns an [`ApplyResult`] (reply, change, lease
//! bookkeeping).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Command;
use crate::model::{Change, Instance, LeaseId, PolicyRecord, Revision};

/// Bounds the state machine enforces itself, so that a replica never grows without limit
/// whatever the log holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Instances across every namespace.
    pub max_instances: usize,
    /// Instances that may share one lease.
    pub max_instances_per_lease: usize,
    /// Services with a routing policy (or its kept history) per namespace: each keeps up
    /// to 50 revisions of up to 16 KiB, and every sidecar of the namespace holds them.
    pub max_policies_per_namespace: usize,
    /// Encoded bytes of the current policies of one namespace: what every sidecar that
    /// watches the namespace holds in memory and in its cache file. A put or rollback
    /// that would grow it past this is refused.
    #[serde(default = "default_max_policy_bytes_per_namespace")]
    pub max_policy_bytes_per_namespace: usize,
    /// Bytes of superseded policy records kept for history and rollback per namespace
    /// (registry memory and snapshots only; sidecars never hold history). Past it the
    /// namespace's oldest superseded records are dropped, never a current policy, so a
    /// put is never refused for its history.
    #[serde(default = "default_max_policy_history_bytes_per_namespace")]
    pub max_policy_history_bytes_per_namespace: usize,
    /// Bytes the KV store holds across every namespace (keys, values and 64 bytes per
    /// entry). A write past it is refused.
    #[serde(default = "default_max_kv_bytes")]
    pub max_kv_bytes: usize,
}

/// 64 MiB: Consul's own guidance is to keep KV data small; every replica holds it in
/// memory and in each snapshot.
pub const DEFAULT_MAX_KV_BYTES: usize = 64 * 1024 * 1024;

fn default_max_kv_bytes() -> usize {
    DEFAULT_MAX_KV_BYTES
}

/// 4 MiB: the count bound times the per-policy bound (1,000 × 16 KiB) is already 16 MiB,
/// so a 16 MiB cap would bound nothing; real policies encode to 0.2-2 KiB, and a sidecar
/// watching its namespace holds the current ones decoded (several times their encoded
/// size) against a memory goal of 25 MiB.
pub const DEFAULT_MAX_POLICY_BYTES_PER_NAMESPACE: usize = 4 * 1024 * 1024;
/// 16 MiB: without it a namespace could keep 1,000 × 50 × 16 KiB = 800 MiB of history in
/// every replica and snapshot; 16 MiB still keeps all 50 revisions of 300 services with
/// 1 KiB policies.
pub const DEFAULT_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE: usize = 16 * 1024 * 1024;

fn default_max_policy_bytes_per_namespace() -> usize {
    DEFAULT_MAX_POLICY_BYTES_PER_NAMESPACE
}

fn default_max_policy_history_bytes_per_namespace() -> usize {
    DEFAULT_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances: 1_000_000,
            max_instances_per_lease: 1_000,
            max_policies_per_namespace: 1_000,
            max_policy_bytes_per_namespace: DEFAULT_MAX_POLICY_BYTES_PER_NAMESPACE,
            max_policy_history_bytes_per_namespace: DEFAULT_MAX_POLICY_HISTORY_BYTES_PER_NAMESPACE,
            max_kv_bytes: DEFAULT_MAX_KV_BYTES,
        }
    }
}

/// Why a well-formed command could not be applied to the current state. Apply leaves the
/// catalog untouched when it returns one of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    #[error("lease {0} does not exist (it expired or was never granted): register without lease_id to get a new one")]
    LeaseNotFound(LeaseId),
    #[error("instance {id:?} is not registered in namespace {namespace:?}")]
    InstanceNotFound { namespace: String, id: String },
    #[error(
        "the registry holds its maximum of {0} instances: deregister some or raise --max-instances"
    )]
    TooManyInstances(usize),
    #[error("namespace {0:?} already has routing policies for its maximum of {1} services: clear some (route clear) or use another namespace")]
    TooManyPolicies(String, usize),
    #[error("the policy of {service:?} encodes to {bytes} bytes, at most {limit} allowed: use fewer or shorter subsets, routes and header matches")]
    PolicyTooLarge {
        service: String,
        bytes: usize,
        limit: usize,
    },
    #[error("namespace {namespace:?} would hold {would_hold} bytes of current routing policies, at most {limit} (--max-policy-bytes-per-namespace): make policies smaller, clear unused ones (route clear), use another namespace, or raise the limit on every registry node")]
    PolicyBytesExceeded {
        namespace: String,
        would_hold: usize,
        limit: usize,
    },
    #[error("service {0:?} has no routing policy to clear")]
    NoPolicyToClear(String),
    #[error("lease {0} already holds its maximum of {1} instances: register with another lease")]
    LeaseFull(LeaseId, usize),
    #[error("service {service:?} has no kept policy revision {revision}: see its history for the revisions to roll back to")]
    PolicyRevisionNotFound { service: String, revision: u64 },
    #[error("service {0:?} has no earlier policy to roll back to")]
    NoEarlierPolicy(String),
    #[error("a batch of commands must be applied one command at a time (batches do not nest)")]
    Batch,
    #[error("the rollout of {service:?} changed meanwhile (generation {actual}, not {expected}): look at it again (rollout get) and retry")]
    RolloutChanged {
        service: String,
        expected: u64,
        actual: u64,
    },
    #[error("service {0:?} has no rollout: start one with `switchyard rollout start`")]
    NoRollout(String),
    #[error(
        "service {service:?} is already rolling out {canary:?}: wait for it, or abort it first"
    )]
    RolloutActive { service: String, canary: String },
    #[error("namespace {0:?} already has rollouts for its maximum of {1} services: use another namespace")]
    TooManyRollouts(String, usize),
    #[error("{0}")]
    RolloutRefused(String),
    #[error("ACLs are already bootstrapped: a second bootstrap is refused; use the operator token from the first (or `switchyard acl token create` with it)")]
    AlreadyBootstrapped,
    #[error("token {0:?} already exists")]
    TokenExists(String),
    #[error("the registry holds its maximum of {0} tokens: delete unused ones (acl token delete)")]
    TooManyTokens(usize),
    #[error("no token has accessor id {0:?}: see `switchyard acl token list`")]
    TokenNotFound(String),
    #[error("namespace {0:?} already holds its maximum of {1} intentions: delete some, or use `*` sources and prefixes (web-*) instead of one intention per service")]
    TooManyIntentions(String, usize),
    #[error("namespace {0:?} already has {1} services with strict mTLS (at most --max-policies-per-namespace): set some back to permissive or use another namespace")]
    TooManyStrictServices(String, usize),
    #[error("the mesh CA has no root yet (the leader makes it): retry in a moment")]
    NoMeshCa,
    #[error("the mesh CA already trusts {0} roots: wait until the oldest retires (two leaf lifetimes after it was superseded)")]
    TooManyMeshRoots(usize),
    #[error("the mesh CA already has a root with id {0:?}")]
    MeshRootExists(String),
    #[error("destination {0:?} already has its maximum of {1} intentions: use prefixes (web-*) or `*` sources instead of one intention per caller")]
    TooManyIntentionsFor(String, usize),
    #[error("there is no intention from {from:?} to {to:?}: see `switchyard intention list`")]
    IntentionNotFound { from: String, to: String },
    #[error("the KV store would hold {would_hold} bytes, at most {limit} (--max-kv-bytes): delete unused keys (kv delete --recurse), store smaller values, or raise the limit on every registry node")]
    KvFull { would_hold: usize, limit: usize },
    #[error("{count} keys start with {prefix:?}, at most {limit} per recursive delete: delete narrower prefixes first")]
    KvRecurseTooLarge {
        prefix: String,
        count: usize,
        limit: usize,
    },
    #[error("the flags of namespace {namespace:?} changed meanwhile (now revision {actual}, not {expected}): read them again (flags list) and retry")]
    FlagsChanged {
        namespace: String,
        expected: u64,
        actual: u64,
    },
    #[error("namespace {namespace:?} has no kept flag revision {revision}: see `switchyard flags history` for the revisions to roll back to")]
    FlagRevisionNotFound { namespace: String, revision: u64 },
    #[error("the flag document is {bytes} bytes, at most {limit}: split flags across namespaces or shorten targeting rules")]
    FlagDocumentTooLarge { bytes: usize, limit: usize },
    /// Refused before the write: some node could not decode it (see `catalog::format`).
    #[error(transparent)]
    FormatTooNew(super::format::FormatTooNew),
}

/// What the caller of a command gets back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Registered {
        lease_id: LeaseId,
        ttl_seconds: u32,
        revision: Revision,
    },
    Done {
        revision: Revision,
    },
    Policy {
        record: PolicyRecord,
    },
    /// A KV write or delete: `applied` is false when its check-and-set did not match
    /// (Consul answers `false`, not an error); `revision` is the catalog's after it.
    Kv {
        applied: bool,
        revision: Revision,
    },
    /// The rollout as a transition left it.
    Rollout {
        rollout: Box<crate::model::rollout::Rollout>,
        /// The catalog's revision after it (a step's policy revision, if it wrote one).
        revision: Revision,
    },
}

/// Everything one apply produced: the reply, the change for watchers (if anything
/// visible changed) and the lease bookkeeping the leader's lease keeper must mirror.
#[derive(Debug)]
pub struct ApplyResult {
    pub reply: Result<Reply, ApplyError>,
    pub change: Option<Change>,
    /// Leases created or given a new TTL: (id, ttl_seconds).
    pub leases_granted: Vec<(LeaseId, u32)>,
    pub leases_removed: Vec<LeaseId>,
    /// Checkpoints that still apply (the lease was not granted again since): (lease,
    /// remaining milliseconds).
    pub leases_checkpointed: Vec<(LeaseId, u64)>,
}

impl ApplyResult {
    pub(super) fn refused(err: ApplyError) -> Self {
        Self {
            reply: Err(err),
            change: None,
            leases_granted: Vec::new(),
            leases_removed: Vec::new(),
            leases_checkpointed: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) instance: Arc<Instance>,
    pub(super) lease: LeaseId,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Namespace {
    /// service -> id -> entry
    pub(super) services: BTreeMap<String, BTreeMap<String, Entry>>,
    /// id -> service, so ids are unique within the namespace.
    pub(super) ids: HashMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lease {
    pub(super) ttl_seconds: u32,
    /// Index of the last command that granted or re-granted the lease. An expiry names
    /// the value it saw, so a Register that reused the lease after the leader's clock
    /// ran out (but before the expiry was applied) keeps it alive.
    pub(super) granted_at: u64,
    /// (namespace, id) of every instance the lease keeps alive.
    pub(super) owners: BTreeSet<(String, String)>,
}

/// The catalog: namespaces, services, instances and leases, plus the revision.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub(super) limits: Limits,
    pub(super) applied_index: u64,
    pub(super) revision: Revision,
    pub(super) namespaces: BTreeMap<String, Namespace>,
    pub(super) leases: BTreeMap<LeaseId, Lease>,
    pub(super) instance_count: usize,
    /// (namespace, service) -> recorded policy changes, oldest first; the last is current.
    pub(super) policies: BTreeMap<(String, String), VecDeque<PolicyRecord>>,
    /// Per namespace, the bytes its policies hold (derived from `policies`, kept in step
    /// by `policies.rs` and rebuilt with the catalog from a snapshot).
    pub(super) policy_bytes: BTreeMap<String, super::policies::PolicyBytes>,
    /// Set once by [`Command::InitCluster`]; empty until the first leader commits it.
    pub(super) cluster_id: String,
    /// (namespace, service) -> kept rollouts, oldest first; only the last may be active.
    pub(super) rollouts: BTreeMap<(String, String), VecDeque<crate::model::rollout::Rollout>>,
    /// Bootstrapped or not, and every token.
    pub(super) acl: super::acl::AclState,
    /// Set once by [`Command::InitMeshCa`].
    pub(super) mesh_ca: Option<crate::model::mesh_ca::MeshCa>,
    /// Root id -> when it stops being trusted (Unix ms), for roots a rotation superseded.
    pub(super) mesh_root_retire: BTreeMap<String, u64>,
    /// Root id -> when it starts signing (Unix ms), for roots a rotation brought in.
    pub(super) mesh_root_activate: BTreeMap<String, u64>,
    /// (namespace, service) of every service whose mTLS mode is strict.
    pub(super) mtls_strict: BTreeSet<(String, String)>,
    /// namespace -> its intentions and their history.
    pub(super) intentions: BTreeMap<String, super::intentions::NamespaceIntentions>,
    /// Every namespace's KV entries.
    pub(super) kv: super::kv::KvStore,
    /// namespace -> its flag documents, oldest first (the last is current).
    pub(super) flags: super::flags::FlagStore,
    /// The cluster's log format, raised by [`Command::SetClusterFormat`]; 0 until then
    /// (read as [`super::format::UNVERSIONED`]).
    pub(super) format: u32,
}

impl Catalog {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// The mesh CA as stored (every root it still holds, retired or not), once the
    /// first leader made it.
    pub fn mesh_ca(&self) -> Option<&crate::model::mesh_ca::MeshCa> {
        self.mesh_ca.as_ref()
    }

    /// The mesh CA with only the roots still trusted at `now_ms`: what leaves are
    /// issued with, `Roots` answers and watchers get.
    pub fn trusted_mesh_ca(&self, now_ms: u64) -> Option<crate::model::mesh_ca::MeshCa> {
        self.mesh_ca
            .as_ref()
            .map(|ca| ca.trusted_at(&self.mesh_root_retire, now_ms))
    }

    /// Whether `service`'s mTLS mode is strict.
    pub fn mtls_strict(&self, namespace: &str, service: &str) -> bool {
        self.mtls_strict
            .contains(&(namespace.to_string(), service.to_string()))
    }

    /// The strict services of `namespace` among `services` (every one when empty).
    pub fn strict_services(&self, namespace: &str, services: &[String]) -> Vec<String> {
        self.mtls_strict
            .iter()
            .filter(|(ns, svc)| {
                ns == namespace && (services.is_empty() || services.iter().any(|s| s == svc))
            })
            .map(|(_, svc)| svc.clone())
            .collect()
    }

    fn set_mtls(
        &mut self,
        index: u64,
        namespace: &str,
        service: &str,
        strict: bool,
    ) -> ApplyResult {
        let key = (namespace.to_string(), service.to_string());
        if strict && !self.mtls_strict.contains(&key) {
            let in_namespace = self
                .mtls_strict
                .iter()
                .filter(|(ns, _)| ns == namespace)
                .count();
            let max = self.limits.max_policies_per_namespace;
            if in_namespace >= max {
                return ApplyResult::refused(ApplyError::TooManyStrictServices(
                    namespace.to_string(),
                    max,
                ));
            }
        }
        if strict {
            self.mtls_strict.insert(key);
        } else {
            self.mtls_strict.remove(&key);
        }
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(Change {
                revision: index,
                mtls: vec![(namespace.to_string(), service.to_string(), strict)],
                ..Change::default()
            }),
            ..ApplyResult::refused(ApplyError::Batch)
        }
    }

    /// When each superseded root stops being trusted (Unix ms).
    pub fn mesh_root_retirements(&self) -> &BTreeMap<String, u64> {
        &self.mesh_root_retire
    }

    /// When each rotated-in root starts signing (Unix ms).
    pub fn mesh_root_activations(&self) -> &BTreeMap<String, u64> {
        &self.mesh_root_activate
    }

    fn rotate_mesh_ca(
        &mut self,
        index: u64,
        root: &crate::model::mesh_ca::CaRoot,
        activate_at_ms: u64,
        retire_at_ms: u64,
        at_ms: u64,
    ) -> ApplyResult {
        use crate::model::mesh_ca::MAX_MESH_ROOTS;
        let Some(ca) = self.mesh_ca.as_mut() else {
            return ApplyResult::refused(ApplyError::NoMeshCa);
        };
        if ca.roots.iter().any(|r| r.id == root.id) {
            return ApplyResult::refused(ApplyError::MeshRootExists(root.id.clone()));
        }
        let retire = &self.mesh_root_retire;
        let kept = ca
            .roots
            .iter()
            .filter(|r| retire.get(&r.id).is_none_or(|&t| t > at_ms))
            .count();
        if kept >= MAX_MESH_ROOTS {
            return ApplyResult::refused(ApplyError::TooManyMeshRoots(kept));
        }
        // Retired roots go; the rest stay trusted until their time (or this one's).
        ca.roots
            .retain(|r| retire.get(&r.id).is_none_or(|&t| t > at_ms));
        let ids: Vec<String> = ca.roots.iter().map(|r| r.id.clone()).collect();
        self.mesh_root_retire.retain(|id, _| ids.contains(id));
        self.mesh_root_activate.retain(|id, _| ids.contains(id));
        self.mesh_root_activate
            .insert(root.id.clone(), activate_at_ms);
        for id in ids {
            self.mesh_root_retire.entry(id).or_insert(retire_at_ms);
        }
        ca.roots.push(root.clone());
        self.revision = index;
        let bundle = ca.trusted_at(&self.mesh_root_retire, at_ms).bundle_pem();
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(Change {
                revision: index,
                trust_bundle: Some(bundle.into()),
                ..Change::default()
            }),
            ..ApplyResult::refused(ApplyError::Batch)
        }
    }

    /// The index of the last applied command (changing or not).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The index of the last command that changed the catalog.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Applies one command of the log entry at `log_index`, numbered with the larger of
    /// the applied index plus one and the log index. An entry with one command keeps
    /// its log index, as before batching, so data written by older versions replays to
    /// the same lease ids and revisions; the commands of a batch get consecutive numbers
    /// after it. Every replica applies the same entries in the same order, so every
    /// replica numbers the same.
    /// The cluster's id (empty until the first leader committed one).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The cluster's log format: what every node can decode (see [`super::format`]).
    pub fn cluster_format(&self) -> u32 {
        self.format.max(super::format::UNVERSIONED)
    }

    pub fn apply_next(&mut self, log_index: u64, command: &Command) -> ApplyResult {
        self.apply(log_index.max(self.applied_index + 1), command)
    }

    /// Applies one command at `index`. Never panics on any input; on error the catalog is
    /// unchanged apart from the applied index.
    pub fn apply(&mut self, index: u64, command: &Command) -> ApplyResult {
        self.applied_index = self.applied_index.max(index);
        match command {
            Command::Register {
                instance,
                ttl_seconds,
                lease_id,
            } => self.register(index, instance, *ttl_seconds, *lease_id),
            Command::Deregister { namespace, id } => self.deregister(index, namespace, id),
            Command::SetState {
                namespace,
                id,
                state,
            } => self.set_state(index, namespace, id, *state),
            Command::ExpireLeases { leases } => self.expire(index, leases),
            Command::CheckpointLeases { leases } => self.checkpoint(leases),
            Command::PutPolicy {
                namespace,
                service,
                policy,
                at_ms,
            } => self.record_policy(
                index,
                namespace,
                service,
                policy.clone().map(Arc::new),
                *at_ms,
                "put".to_string(),
            ),
            Command::RollbackPolicy {
                namespace,
                service,
                to_revision,
                at_ms,
            } => self.rollback_policy(index, namespace, service, *to_revision, *at_ms),
            Command::InitCluster { id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id.clone_from(id);
                }
                ApplyResult {
                    reply: Ok(Reply::Done {
                        revision: self.revision,
                    }),
                    ..ApplyResult::refused(ApplyError::Batch)
                }
            }
            Command::SetClusterFormat { format } => {
                // Only up: a stale or repeated proposal changes nothing.
                self.format = self.format.max(*format);
                ApplyResult {
                    reply: Ok(Reply::Done {
                        revision: self.revision,
                    }),
                    ..ApplyResult::refused(ApplyError::Batch)
                }
            }
            Command::PutRollout {
                rollout,
                expected_generation,
                start,
                policy,
                at_ms,
            } => self.put_rollout(index, rollout, *expected_generation, *start, policy, *at_ms),
            Command::AclBootstrap { token } => self.acl_bootstrap(token),
            Command::PutToken { token } => self.put_token(token),
            Command::DeleteToken { accessor_id } => self.delete_token(accessor_id),
            Command::InitMeshCa { ca } => {
                // The first root is a change watchers see: its bundle reaches every
                // sidecar that was watching before the CA existed.
                let mut change = None;
                if self.mesh_ca.is_none() {
                    self.mesh_ca = Some((**ca).clone());
                    self.revision = index;
                    change = Some(Change {
                        revision: index,
                        trust_bundle: Some(ca.bundle_pem().into()),
                        ..Change::default()
                    });
                }
                ApplyResult {
                    reply: Ok(Reply::Done {
                        revision: self.revision,
                    }),
                    change,
                    ..ApplyResult::refused(ApplyError::Batch)
                }
            }
            Command::PutIntention {
                namespace,
                intention,
                at_ms,
            } => self.put_intention(index, namespace, intention, *at_ms),
            Command::DeleteIntention {
                namespace,
                source,
                destination,
                at_ms,
            } => self.delete_intention(index, namespace, source, destination, *at_ms),
            Command::RotateMeshCa {
                root,
                activate_at_ms,
                retire_at_ms,
                at_ms,
            } => self.rotate_mesh_ca(index, root, *activate_at_ms, *retire_at_ms, *at_ms),
            Command::SetMtls {
                namespace,
                service,
                strict,
            } => self.set_mtls(index, namespace, service, *strict),
            Command::KvPut {
                namespace,
                key,
                value,
                flags,
                cas,
            } => self.kv_put(index, namespace, key, value, *flags, *cas),
            Command::KvDelete {
                namespace,
                key,
                recurse,
                cas,
            } => self.kv_delete(index, namespace, key, *recurse, *cas),
            Command::PutFlags {
                namespace,
                document,
                expected_revision,
                at_ms,
            } => self.put_flags(index, namespace, document, *expected_revision, *at_ms),
            Command::RollbackFlags {
                namespace,
                to_revision,
                at_ms,
            } => self.rollback_flags(index, namespace, *to_revision, *at_ms),
            // The state machine unpacks batches; one reaching here is refused whole.
            Command::Batch(_) => ApplyResult {
                reply: Err(ApplyError::Batch),
                change: None,
                leases_granted: Vec::new(),
                leases_removed: Vec::new(),
                leases_checkpointed: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::{fingerprint, inst, run, script};
    use crate::model::{State, DEFAULT_NAMESPACE};

    #[test]
    fn a_services_mtls_mode_is_set_kept_in_snapshots_and_bounded() {
        let set = |svc: &str, strict: bool| Command::SetMtls {
            namespace: DEFAULT_NAMESPACE.into(),
            service: svc.into(),
            strict,
        };
        let mut c = Catalog::new(Limits {
            max_policies_per_namespace: 2,
            ..Limits::default()
        });
        let r = c.apply(1, &set("payments", true));
        assert_eq!(r.reply, Ok(Reply::Done { revision: 1 }));
        assert_eq!(
            r.change.map(|ch| ch.mtls),
            Some(vec![(
                DEFAULT_NAMESPACE.to_string(),
                "payments".to_string(),
                true
            )])
        );
        assert!(c.mtls_strict(DEFAULT_NAMESPACE, "payments"));
        assert!(!c.mtls_strict(DEFAULT_NAMESPACE, "web"));
        c.apply(2, &set("ledger", true));
        assert_eq!(
            c.apply(3, &set("third", true)).reply,
            Err(ApplyError::TooManyStrictServices(
                DEFAULT_NAMESPACE.into(),
                2
            ))
        );
        assert_eq!(
            c.strict_services(DEFAULT_NAMESPACE, &[]),
            vec!["ledger", "payments"]
        );
        assert_eq!(
            c.strict_services(DEFAULT_NAMESPACE, &["payments".to_string()]),
            vec!["payments"]
        );
        let back = Catalog::from_persisted(Limits::default(), c.to_persisted());
        assert!(back.mtls_strict(DEFAULT_NAMESPACE, "ledger"));
        c.apply(4, &set("ledger", false));
        assert!(!c.mtls_strict(DEFAULT_NAMESPACE, "ledger"));
        // Setting back to permissive never hits the bound.
        assert!(c.apply(5, &set("nobody", false)).reply.is_ok());
    }

    #[test]
    fn a_rotation_keeps_superseded_roots_trusted_until_they_retire() {
        use crate::model::mesh_ca::{CaRoot, MeshCa, MAX_MESH_ROOTS};
        let root = |id: &str| CaRoot {
            id: id.into(),
            cert_pem: format!("-----BEGIN CERTIFICATE-----{id}"),
            key_pem: Some("key".into()),
            created_ms: 0,
        };
        let rotate = |id: &str, at_ms: u64, retire_at_ms: u64| Command::RotateMeshCa {
            root: Box::new(root(id)),
            activate_at_ms: at_ms + 10,
            retire_at_ms,
            at_ms,
        };
        let mut c = Catalog::new(Limits::default());
        let r = c.apply(1, &rotate("r0", 0, 0));
        assert_eq!(r.reply, Err(ApplyError::NoMeshCa));
        c.apply(
            2,
            &Command::InitMeshCa {
                ca: Box::new(MeshCa {
                    trust_domain: "example.org".into(),
                    roots: vec![root("r1")],
                }),
            },
        );
        let r = c.apply(3, &rotate("r2", 1_000, 5_000));
        let bundle = r.change.and_then(|ch| ch.trust_bundle).expect("a bundle");
        assert!(bundle.contains("r1") && bundle.contains("r2"));
        let ids = |c: &Catalog, now: u64| -> Vec<String> {
            c.trusted_mesh_ca(now)
                .map(|ca| ca.roots.into_iter().map(|r| r.id).collect())
                .unwrap_or_default()
        };
        assert_eq!(ids(&c, 4_999), vec!["r1", "r2"]);
        assert_eq!(
            ids(&c, 5_000),
            vec!["r2"],
            "r1 retired; the active root never"
        );
        assert_eq!(
            c.mesh_ca()
                .and_then(|ca| ca.newest())
                .map(|r| r.id.as_str()),
            Some("r2")
        );
        // A second rotation keeps r1's time and gives r2 its own.
        c.apply(4, &rotate("r3", 2_000, 6_000));
        assert_eq!(c.mesh_root_retirements().get("r1"), Some(&5_000));
        assert_eq!(c.mesh_root_retirements().get("r2"), Some(&6_000));
        assert_eq!(
            c.apply(5, &rotate("r3", 2_500, 7_000)).reply,
            Err(ApplyError::MeshRootExists("r3".into()))
        );
        // A snapshot keeps the retirements.
        let back = Catalog::from_persisted(Limits::default(), c.to_persisted());
        assert_eq!(back.mesh_root_retirements(), c.mesh_root_retirements());
        // Past their time, retired roots are dropped by the next rotation.
        c.apply(6, &rotate("r4", 6_000, 9_000));
        assert_eq!(ids(&c, 6_000), vec!["r3", "r4"]);
        assert_eq!(c.mesh_ca().map(|ca| ca.roots.len()), Some(2));
        // At most MAX_MESH_ROOTS trusted at once.
        c.apply(7, &rotate("r5", 6_100, 9_000));
        c.apply(8, &rotate("r6", 6_200, 9_000));
        assert_eq!(ids(&c, 6_300).len(), MAX_MESH_ROOTS);
        assert_eq!(
            c.apply(9, &rotate("r7", 6_300, 9_000)).reply,
            Err(ApplyError::TooManyMeshRoots(MAX_MESH_ROOTS))
        );
    }

    #[test]
    fn the_same_commands_give_the_same_catalog() {
        let a = run(&script());
        let b = run(&script());
        assert_eq!(fingerprint(&a), fingerprint(&b));
        // Lease 1 (a and d) and lease 3 (c) expired; b moved to api on its own lease.
        let ids: Vec<_> = a
            .snapshot(DEFAULT_NAMESPACE, &[])
            .into_iter()
            .flat_map(|s| s.instances)
            .map(|i| (i.service.clone(), i.id.clone()))
            .collect();
        assert_eq!(ids, vec![("api".to_string(), "b".to_string())]);
        assert_eq!(a.instance_count(), 1);
        assert_eq!(a.lease_count(), 1);
    }

    /// A batch is unpacked by the state machine; handed to the catalog whole it is
    /// refused and changes nothing. `apply_next` keeps a lone command's log index and
    /// numbers a batch's commands one after another.
    #[test]
    fn a_batch_is_refused_whole_and_apply_next_counts_each_command() {
        let mut c = Catalog::new(Limits::default());
        let reg = |id: &str| Command::Register {
            instance: inst("web", id, "1.0.0"),
            ttl_seconds: 30,
            lease_id: None,
        };
        let r = c.apply_next(1, &Command::Batch(vec![reg("a"), reg("b")]));
        assert_eq!(r.reply, Err(ApplyError::Batch));
        assert!(r.change.is_none());
        assert_eq!(c.instance_count(), 0);
        // Two commands of one entry at log index 2: numbered 2 and 3.
        let first = c.apply_next(2, &reg("a"));
        let second = c.apply_next(2, &reg("b"));
        let lease = |r: &ApplyResult| match &r.reply {
            Ok(Reply::Registered { lease_id, .. }) => *lease_id,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!((lease(&first), lease(&second)), (2, 3));
        // The next entry's own index wins when it is ahead (a blank entry was skipped).
        let third = c.apply_next(7, &reg("c"));
        assert_eq!(lease(&third), 7);
        assert_eq!(c.applied_index(), 7);
    }

    #[test]
    fn refused_commands_change_nothing_but_the_applied_index() {
        let mut c = run(&script()[..3]);
        let before = c.to_persisted();
        for cmd in [
            Command::Register {
                instance: inst("web", "z", "1"),
                ttl_seconds: 10,
                lease_id: Some(777),
            },
            Command::Deregister {
                namespace: DEFAULT_NAMESPACE.into(),
                id: "zz".into(),
            },
            Command::SetState {
                namespace: "other".into(),
                id: "a".into(),
                state: State::Failing,
            },
        ] {
            let r = c.apply(c.applied_index() + 1, &cmd);
            assert!(r.reply.is_err());
            assert!(r.change.is_none());
            assert!(r.leases_granted.is_empty() && r.leases_removed.is_empty());
        }
        let after = c.to_persisted();
        assert_eq!(before.revision, after.revision);
        assert_eq!(
            format!("{:?}", before.instances),
            format!("{:?}", after.instances)
        );
        assert_eq!(before.leases, after.leases);
    }
}
