use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Command;
use crate::model::policy::MAX_POLICY_HISTORY;
use crate::model::{
    Change, Instance, LeaseId, Policy, PolicyChange, PolicyRecord, Revision, ServiceSummary,
    ServiceView, State,
};

/// Bounds the state machine enforces itself, so that a replica never grows without limit
/// whatever the log holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Instances across every namespace.
    pub max_instances: usize,
    /// Instances that may share one lease.
    pub max_instances_per_lease: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_instances: 1_000_000,
            max_instances_per_lease: 1_000,
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
    #[error("lease {0} already holds its maximum of {1} instances: register with another lease")]
    LeaseFull(LeaseId, usize),
    #[error("service {service:?} has no kept policy revision {revision}: see its history for the revisions to roll back to")]
    PolicyRevisionNotFound { service: String, revision: u64 },
    #[error("service {0:?} has no earlier policy to roll back to")]
    NoEarlierPolicy(String),
    #[error("a batch of commands must be applied one command at a time (batches do not nest)")]
    Batch,
}

/// What the caller of a command gets back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    fn refused(err: ApplyError) -> Self {
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
struct Entry {
    instance: Arc<Instance>,
    lease: LeaseId,
}

#[derive(Clone, Debug, Default)]
struct Namespace {
    /// service -> id -> entry
    services: BTreeMap<String, BTreeMap<String, Entry>>,
    /// id -> service, so ids are unique within the namespace.
    ids: HashMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    ttl_seconds: u32,
    /// Index of the last command that granted or re-granted the lease. An expiry names
    /// the value it saw, so a Register that reused the lease after the leader's clock
    /// ran out (but before the expiry was applied) keeps it alive.
    granted_at: u64,
    /// (namespace, id) of every instance the lease keeps alive.
    owners: BTreeSet<(String, String)>,
}

/// The catalog: namespaces, services, instances and leases, plus the revision.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    limits: Limits,
    applied_index: u64,
    revision: Revision,
    namespaces: BTreeMap<String, Namespace>,
    leases: BTreeMap<LeaseId, Lease>,
    instance_count: usize,
    /// (namespace, service) -> recorded policy changes, oldest first; the last is current.
    policies: BTreeMap<(String, String), VecDeque<PolicyRecord>>,
}

/// The catalog as written to a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalog {
    applied_index: u64,
    revision: Revision,
    instances: Vec<(Instance, LeaseId)>,
    /// (id, ttl_seconds, granted_at)
    leases: Vec<(LeaseId, u32, u64)>,
    policies: Vec<((String, String), Vec<PolicyRecord>)>,
}

impl Catalog {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
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

    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every lease and its TTL, for a new leader to start the clocks.
    pub fn leases(&self) -> impl Iterator<Item = (LeaseId, u32)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl_seconds))
    }

    pub fn has_lease(&self, id: LeaseId) -> bool {
        self.leases.contains_key(&id)
    }

    /// The registered instance with this id, if any.
    pub fn get(&self, namespace: &str, id: &str) -> Option<&Arc<Instance>> {
        let ns = self.namespaces.get(namespace)?;
        let service = ns.ids.get(id)?;
        ns.services.get(service)?.get(id).map(|e| &e.instance)
    }

    /// Applies one command of the log entry at `log_index`, numbered with the larger of
    /// the applied index plus one and the log index. An entry with one command keeps
    /// its log index, as before batching, so data written by older versions replays to
    /// the same lease ids and revisions; the commands of a batch get consecutive numbers
    /// after it. Every replica applies the same entries in the same order, so every
    /// replica numbers the same.
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
            Command::CheckpointLeases { leases } => ApplyResult {
                reply: Ok(Reply::Done {
                    revision: self.revision,
                }),
                change: None,
                leases_granted: Vec::new(),
                leases_removed: Vec::new(),
                leases_checkpointed: leases
                    .iter()
                    .filter(|(id, granted_at, _)| {
                        self.leases
                            .get(id)
                            .is_some_and(|l| l.granted_at == *granted_at)
                    })
                    .map(|(id, _, remaining)| (*id, *remaining))
                    .collect(),
            },
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

    /// The current policy of a service, if it has one.
    pub fn policy(&self, namespace: &str, service: &str) -> Option<&PolicyRecord> {
        self.policies
            .get(&(namespace.to_string(), service.to_string()))
            .and_then(|h| h.back())
    }

    /// Every kept policy change of a service, oldest first.
    pub fn policy_history(&self, namespace: &str, service: &str) -> Vec<PolicyRecord> {
        self.policies
            .get(&(namespace.to_string(), service.to_string()))
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn current_policy(&self, namespace: &str, service: &str) -> Option<Arc<Policy>> {
        self.policy(namespace, service)
            .and_then(|r| r.policy.clone())
    }

    fn record_policy(
        &mut self,
        index: u64,
        namespace: &str,
        service: &str,
        policy: Option<Arc<Policy>>,
        at_ms: u64,
        reason: String,
    ) -> ApplyResult {
        let record = PolicyRecord {
            revision: index,
            at_ms,
            policy: policy.clone(),
            reason,
        };
        let history = self
            .policies
            .entry((namespace.to_string(), service.to_string()))
            .or_default();
        history.push_back(record.clone());
        while history.len() > MAX_POLICY_HISTORY {
            history.pop_front();
        }
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Policy { record }),
            change: Some(Change {
                revision: index,
                policies: vec![PolicyChange {
                    namespace: namespace.to_string(),
                    service: service.to_string(),
                    policy,
                }],
                ..Change::default()
            }),
            leases_granted: Vec::new(),
            leases_removed: Vec::new(),
            leases_checkpointed: Vec::new(),
        }
    }

    fn rollback_policy(
        &mut self,
        index: u64,
        namespace: &str,
        service: &str,
        to_revision: u64,
        at_ms: u64,
    ) -> ApplyResult {
        let history = self
            .policies
            .get(&(namespace.to_string(), service.to_string()));
        let target = match history {
            None => None,
            Some(h) if to_revision == 0 => {
                if h.len() < 2 {
                    return ApplyResult::refused(ApplyError::NoEarlierPolicy(service.to_string()));
                }
                h.get(h.len() - 2).cloned()
            }
            Some(h) => h.iter().find(|r| r.revision == to_revision).cloned(),
        };
        let Some(target) = target else {
            if to_revision == 0 {
                return ApplyResult::refused(ApplyError::NoEarlierPolicy(service.to_string()));
            }
            return ApplyResult::refused(ApplyError::PolicyRevisionNotFound {
                service: service.to_string(),
                revision: to_revision,
            });
        };
        self.record_policy(
            index,
            namespace,
            service,
            target.policy,
            at_ms,
            format!("rollback to {}", target.revision),
        )
    }

    fn register(
        &mut self,
        index: u64,
        instance: &Instance,
        ttl_seconds: u32,
        lease_id: Option<LeaseId>,
    ) -> ApplyResult {
        let key = (instance.namespace.clone(), instance.id.clone());
        let existing = self
            .get(&instance.namespace, &instance.id)
            .map(|i| (i.clone(), self.lease_of(&instance.namespace, &instance.id)));

        // Decide the lease first: every check happens before anything is changed.
        let (lease, new_lease, ttl) = match (lease_id, &existing) {
            (Some(id), _) => match self.leases.get(&id) {
                None => return ApplyResult::refused(ApplyError::LeaseNotFound(id)),
                Some(l) => {
                    let joins = !l.owners.contains(&key);
                    if joins && l.owners.len() >= self.limits.max_instances_per_lease {
                        return ApplyResult::refused(ApplyError::LeaseFull(
                            id,
                            self.limits.max_instances_per_lease,
                        ));
                    }
                    (id, false, l.ttl_seconds)
                }
            },
            (None, Some((_, Some(current)))) => (*current, false, ttl_seconds),
            (None, _) => (index, true, ttl_seconds),
        };
        if existing.is_none() && self.instance_count >= self.limits.max_instances {
            return ApplyResult::refused(ApplyError::TooManyInstances(self.limits.max_instances));
        }

        let mut result = ApplyResult {
            reply: Err(ApplyError::LeaseNotFound(lease)),
            change: None,
            leases_granted: Vec::new(),
            leases_removed: Vec::new(),
            leases_checkpointed: Vec::new(),
        };
        let mut change = Change::default();

        // Move the instance off a lease it leaves.
        if let Some((_, Some(old))) = &existing {
            if *old != lease {
                self.release(*old, &key, &mut result.leases_removed);
            }
        }
        if new_lease {
            self.leases.insert(
                lease,
                Lease {
                    ttl_seconds: ttl,
                    granted_at: index,
                    owners: BTreeSet::new(),
                },
            );
        }
        if let Some(l) = self.leases.get_mut(&lease) {
            l.owners.insert(key.clone());
            l.granted_at = index;
            if lease_id.is_none() {
                l.ttl_seconds = ttl;
            }
            result.leases_granted.push((lease, l.ttl_seconds));
        }

        let unchanged = existing
            .as_ref()
            .is_some_and(|(old, old_lease)| **old == *instance && *old_lease == Some(lease));
        if !unchanged {
            if let Some((old, _)) = &existing {
                if old.service != instance.service {
                    self.remove_entry(&old.namespace, &old.service, &old.id);
                    change.removed.push(old.to_ref());
                }
            }
            let arc = Arc::new(instance.clone());
            let ns = self
                .namespaces
                .entry(instance.namespace.clone())
                .or_default();
            ns.ids.insert(instance.id.clone(), instance.service.clone());
            let previous = ns
                .services
                .entry(instance.service.clone())
                .or_default()
                .insert(
                    instance.id.clone(),
                    Entry {
                        instance: arc.clone(),
                        lease,
                    },
                );
            // New, or moved from another service (whose entry was removed above).
            if previous.is_none() {
                self.instance_count += 1;
            }
            self.revision = index;
            change.revision = index;
            change.upserted.push(arc);
            result.change = Some(change);
        }
        result.reply = Ok(Reply::Registered {
            lease_id: lease,
            ttl_seconds: result.leases_granted.last().map_or(ttl, |g| g.1),
            revision: self.revision,
        });
        result
    }

    fn lease_of(&self, namespace: &str, id: &str) -> Option<LeaseId> {
        let ns = self.namespaces.get(namespace)?;
        let service = ns.ids.get(id)?;
        ns.services.get(service)?.get(id).map(|e| e.lease)
    }

    /// Drops an owner from a lease, and the lease itself when it keeps nothing alive.
    fn release(&mut self, lease: LeaseId, key: &(String, String), removed: &mut Vec<LeaseId>) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.owners.remove(key);
            if l.owners.is_empty() {
                self.leases.remove(&lease);
                removed.push(lease);
            }
        }
    }

    /// Removes an instance from the maps; returns its entry.
    fn remove_entry(&mut self, namespace: &str, service: &str, id: &str) -> Option<Entry> {
        let ns = self.namespaces.get_mut(namespace)?;
        let instances = ns.services.get_mut(service)?;
        let entry = instances.remove(id)?;
        if instances.is_empty() {
            ns.services.remove(service);
        }
        ns.ids.remove(id);
        if ns.ids.is_empty() {
            self.namespaces.remove(namespace);
        }
        self.instance_count -= 1;
        Some(entry)
    }

    fn deregister(&mut self, index: u64, namespace: &str, id: &str) -> ApplyResult {
        let Some(instance) = self.get(namespace, id).cloned() else {
            return ApplyResult::refused(ApplyError::InstanceNotFound {
                namespace: namespace.to_string(),
                id: id.to_string(),
            });
        };
        let mut leases_removed = Vec::new();
        if let Some(entry) = self.remove_entry(namespace, &instance.service, id) {
            self.release(
                entry.lease,
                &(namespace.to_string(), id.to_string()),
                &mut leases_removed,
            );
        }
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(Change {
                revision: index,
                removed: vec![instance.to_ref()],
                ..Change::default()
            }),
            leases_granted: Vec::new(),
            leases_removed,
            leases_checkpointed: Vec::new(),
        }
    }

    fn set_state(&mut self, index: u64, namespace: &str, id: &str, state: State) -> ApplyResult {
        let entry = self.namespaces.get_mut(namespace).and_then(|ns| {
            let service = ns.ids.get(id)?;
            ns.services.get_mut(service)?.get_mut(id)
        });
        let Some(entry) = entry else {
            return ApplyResult::refused(ApplyError::InstanceNotFound {
                namespace: namespace.to_string(),
                id: id.to_string(),
            });
        };
        if entry.instance.state == state {
            return ApplyResult {
                reply: Ok(Reply::Done {
                    revision: self.revision,
                }),
                change: None,
                leases_granted: Vec::new(),
                leases_removed: Vec::new(),
                leases_checkpointed: Vec::new(),
            };
        }
        let mut updated = (*entry.instance).clone();
        updated.state = state;
        let arc = Arc::new(updated);
        entry.instance = arc.clone();
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(Change {
                revision: index,
                upserted: vec![arc],
                ..Change::default()
            }),
            leases_granted: Vec::new(),
            leases_removed: Vec::new(),
            leases_checkpointed: Vec::new(),
        }
    }

    /// The index that last granted a lease, for an expiry to name.
    pub fn lease_granted_at(&self, id: LeaseId) -> Option<u64> {
        self.leases.get(&id).map(|l| l.granted_at)
    }

    fn expire(&mut self, index: u64, leases: &[(LeaseId, u64)]) -> ApplyResult {
        let wanted: BTreeSet<LeaseId> = leases
            .iter()
            .filter(|(id, granted_at)| {
                self.leases
                    .get(id)
                    .is_some_and(|l| l.granted_at == *granted_at)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut change = Change {
            revision: index,
            ..Change::default()
        };
        let mut leases_removed = Vec::new();
        for id in wanted {
            let Some(lease) = self.leases.remove(&id) else {
                continue;
            };
            leases_removed.push(id);
            for (namespace, instance_id) in &lease.owners {
                let service = self
                    .namespaces
                    .get(namespace)
                    .and_then(|ns| ns.ids.get(instance_id))
                    .cloned();
                if let Some(service) = service {
                    if let Some(entry) = self.remove_entry(namespace, &service, instance_id) {
                        change.removed.push(entry.instance.to_ref());
                    }
                }
            }
        }
        let changed = !change.removed.is_empty();
        if changed {
            self.revision = index;
        }
        ApplyResult {
            reply: Ok(Reply::Done {
                revision: self.revision,
            }),
            change: changed.then_some(change),
            leases_granted: Vec::new(),
            leases_removed,
            leases_checkpointed: Vec::new(),
        }
    }

    /// The services of a namespace (all, or only `services`), sorted by name: those with
    /// instances and those with only a policy.
    pub fn snapshot(&self, namespace: &str, services: &[String]) -> Vec<ServiceView> {
        let wanted = |name: &str| services.is_empty() || services.iter().any(|s| s == name);
        let mut out: BTreeMap<&str, ServiceView> = BTreeMap::new();
        if let Some(ns) = self.namespaces.get(namespace) {
            for (name, instances) in ns.services.iter().filter(|(n, _)| wanted(n)) {
                out.insert(
                    name,
                    ServiceView {
                        service: name.clone(),
                        instances: instances.values().map(|e| e.instance.clone()).collect(),
                        policy: None,
                    },
                );
            }
        }
        for ((ns, name), history) in &self.policies {
            if ns != namespace || !wanted(name) {
                continue;
            }
            let Some(policy) = history.back().and_then(|r| r.policy.clone()) else {
                continue;
            };
            out.entry(name)
                .or_insert_with(|| ServiceView {
                    service: name.clone(),
                    instances: Vec::new(),
                    policy: None,
                })
                .policy = Some(policy);
        }
        out.into_values().collect()
    }

    /// The instances of one service, optionally of one version.
    pub fn resolve(&self, namespace: &str, service: &str, version: &str) -> Vec<Arc<Instance>> {
        self.namespaces
            .get(namespace)
            .and_then(|ns| ns.services.get(service))
            .map(|instances| {
                instances
                    .values()
                    .filter(|e| version.is_empty() || e.instance.version == version)
                    .map(|e| e.instance.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One summary per service of a namespace, sorted by name.
    pub fn list_services(&self, namespace: &str) -> Vec<ServiceSummary> {
        let Some(ns) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        ns.services
            .iter()
            .map(|(name, instances)| {
                let versions: BTreeSet<&str> = instances
                    .values()
                    .map(|e| e.instance.version.as_str())
                    .collect();
                ServiceSummary {
                    name: name.clone(),
                    instance_count: u32::try_from(instances.len()).unwrap_or(u32::MAX),
                    versions: versions.into_iter().map(str::to_string).collect(),
                }
            })
            .collect()
    }

    /// The catalog in a form that serializes compactly and rebuilds exactly.
    pub fn to_persisted(&self) -> PersistedCatalog {
        let instances = self
            .namespaces
            .values()
            .flat_map(|ns| ns.services.values())
            .flat_map(|svc| svc.values())
            .map(|e| ((*e.instance).clone(), e.lease))
            .collect();
        PersistedCatalog {
            applied_index: self.applied_index,
            revision: self.revision,
            instances,
            leases: self
                .leases
                .iter()
                .map(|(id, l)| (*id, l.ttl_seconds, l.granted_at))
                .collect(),
            policies: self
                .policies
                .iter()
                .map(|(k, h)| (k.clone(), h.iter().cloned().collect()))
                .collect(),
        }
    }

    /// Rebuilds a catalog from a snapshot. Inconsistent entries (an instance naming a
    /// lease the snapshot lacks) are dropped rather than trusted.
    pub fn from_persisted(limits: Limits, p: PersistedCatalog) -> Self {
        let mut c = Catalog::new(limits);
        c.applied_index = p.applied_index;
        c.revision = p.revision;
        for (id, ttl, granted_at) in p.leases {
            c.leases.insert(
                id,
                Lease {
                    ttl_seconds: ttl,
                    granted_at,
                    owners: BTreeSet::new(),
                },
            );
        }
        for (instance, lease) in p.instances {
            let Some(l) = c.leases.get_mut(&lease) else {
                continue;
            };
            l.owners
                .insert((instance.namespace.clone(), instance.id.clone()));
            let ns = c.namespaces.entry(instance.namespace.clone()).or_default();
            ns.ids.insert(instance.id.clone(), instance.service.clone());
            ns.services
                .entry(instance.service.clone())
                .or_default()
                .insert(
                    instance.id.clone(),
                    Entry {
                        instance: Arc::new(instance),
                        lease,
                    },
                );
            c.instance_count += 1;
        }
        c.leases.retain(|_, l| !l.owners.is_empty());
        c.policies = p
            .policies
            .into_iter()
            .map(|(k, h)| (k, h.into_iter().collect()))
            .collect();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DEFAULT_NAMESPACE;

    fn inst(service: &str, id: &str, version: &str) -> Instance {
        Instance {
            namespace: DEFAULT_NAMESPACE.into(),
            service: service.into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 80,
            version: version.into(),
            labels: Default::default(),
            weight: 100,
            zone: String::new(),
            state: State::Serving,
        }
    }

    fn reg(i: Instance) -> Command {
        Command::Register {
            instance: i,
            ttl_seconds: 10,
            lease_id: None,
        }
    }

    /// A fixed script touching every command, including refused ones.
    fn script() -> Vec<Command> {
        vec![
            reg(inst("web", "a", "1")),
            reg(inst("web", "b", "2")),
            reg(inst("api", "c", "1")),
            Command::Register {
                instance: inst("api", "d", "1"),
                ttl_seconds: 5,
                lease_id: Some(1),
            },
            Command::SetState {
                namespace: DEFAULT_NAMESPACE.into(),
                id: "b".into(),
                state: State::Draining,
            },
            Command::Deregister {
                namespace: DEFAULT_NAMESPACE.into(),
                id: "nobody".into(),
            },
            reg(inst("api", "b", "3")),
            Command::ExpireLeases {
                // Lease 1 was last granted by the Register at index 4.
                leases: vec![(3, 3), (1, 4), (3, 3)],
            },
        ]
    }

    fn run(commands: &[Command]) -> Catalog {
        let mut c = Catalog::new(Limits::default());
        for (i, cmd) in commands.iter().enumerate() {
            let _ = c.apply(i as u64 + 1, cmd);
        }
        c
    }

    fn fingerprint(c: &Catalog) -> String {
        format!("{:?}", c.to_persisted())
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

    #[test]
    fn a_snapshot_rebuilds_the_same_catalog() {
        let a = run(&script()[..5]);
        let b = Catalog::from_persisted(Limits::default(), a.to_persisted());
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(a.instance_count(), b.instance_count());
        assert_eq!(
            a.list_services(DEFAULT_NAMESPACE),
            b.list_services(DEFAULT_NAMESPACE)
        );
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

    #[test]
    fn an_expiry_spares_a_lease_granted_again_since() {
        let mut c = run(&script()[..1]);
        // The leader saw lease 1 granted at index 1; a Register reuses it at index 2.
        let _ = c.apply(2, &reg(inst("web", "a", "2")));
        let r = c.apply(
            3,
            &Command::ExpireLeases {
                leases: vec![(1, 1)],
            },
        );
        assert!(r.change.is_none() && r.leases_removed.is_empty());
        assert_eq!(c.instance_count(), 1);
        let r = c.apply(
            4,
            &Command::ExpireLeases {
                leases: vec![(1, 2)],
            },
        );
        assert_eq!(r.leases_removed, vec![1]);
        assert_eq!(c.instance_count(), 0);
    }

    #[test]
    fn moving_an_instance_to_another_service_removes_it_from_the_first() {
        let mut c = run(&script()[..2]);
        let r = c.apply(10, &reg(inst("api", "a", "1")));
        let change = r.change.expect("a change");
        assert_eq!(change.removed.len(), 1);
        assert_eq!(change.removed[0].service, "web");
        assert_eq!(change.upserted[0].service, "api");
        assert_eq!(c.instance_count(), 2);
        assert_eq!(c.resolve(DEFAULT_NAMESPACE, "web", "").len(), 1);
    }

    #[test]
    fn per_lease_limit_is_enforced() {
        let mut c = Catalog::new(Limits {
            max_instances: 10,
            max_instances_per_lease: 2,
        });
        let _ = c.apply(1, &reg(inst("web", "a", "1")));
        for (n, id) in ["b", "c"].iter().enumerate() {
            let r = c.apply(
                n as u64 + 2,
                &Command::Register {
                    instance: inst("web", id, "1"),
                    ttl_seconds: 10,
                    lease_id: Some(1),
                },
            );
            assert_eq!(r.reply.is_ok(), *id == "b", "{id}");
        }
        assert_eq!(c.instance_count(), 2);
    }
}
