//! Instances: register (joining, keeping or creating a lease), deregister, set a state,
//! look one up.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::apply::{ApplyError, ApplyResult, Entry, Lease, Reply};
use super::Catalog;
use crate::model::{Change, Instance, LeaseId, State};

impl Catalog {
    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    /// The registered instance with this id, if any.
    pub fn get(&self, namespace: &str, id: &str) -> Option<&Arc<Instance>> {
        let ns = self.namespaces.get(namespace)?;
        let service = ns.ids.get(id)?;
        ns.services.get(service)?.get(id).map(|e| &e.instance)
    }

    pub(super) fn register(
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

    pub(super) fn deregister(&mut self, index: u64, namespace: &str, id: &str) -> ApplyResult {
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

    pub(super) fn set_state(
        &mut self,
        index: u64,
        namespace: &str,
        id: &str,
        state: State,
    ) -> ApplyResult {
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

    pub(super) fn lease_of(&self, namespace: &str, id: &str) -> Option<LeaseId> {
        let ns = self.namespaces.get(namespace)?;
        let service = ns.ids.get(id)?;
        ns.services.get(service)?.get(id).map(|e| e.lease)
    }

    /// Removes an instance from the maps; returns its entry.
    pub(super) fn remove_entry(
        &mut self,
        namespace: &str,
        service: &str,
        id: &str,
    ) -> Option<Entry> {
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
}

#[cfg(test)]
mod tests {
    use crate::catalog::testing::{inst, reg, run, script};
    use crate::model::DEFAULT_NAMESPACE;

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
}
