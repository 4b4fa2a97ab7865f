//! Leases in the catalog: which instances each keeps alive and which index last granted
//! it; expiry (only of a lease not granted again since the proposer looked) and
//! checkpoints. The clocks themselves are the leader's, in [`crate::lease`].

use std::collections::BTreeSet;
use std::sync::Arc;

use super::apply::{ApplyResult, Reply};
use super::Catalog;
use crate::model::{Change, Instance, LeaseId};

impl Catalog {
    /// The services of the instances a lease keeps alive (what renewing it keeps up).
    pub fn lease_services(&self, id: LeaseId) -> Vec<String> {
        let Some(l) = self.leases.get(&id) else {
            return Vec::new();
        };
        let mut out: Vec<String> = l
            .owners
            .iter()
            .filter_map(|(ns, inst)| self.namespaces.get(ns)?.ids.get(inst).cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The instance `id` of `namespace` and the lease that keeps it alive.
    pub fn instance_and_lease(
        &self,
        namespace: &str,
        id: &str,
    ) -> Option<(Arc<Instance>, LeaseId)> {
        let ns = self.namespaces.get(namespace)?;
        let service = ns.ids.get(id)?;
        let e = ns.services.get(service)?.get(id)?;
        Some((e.instance.clone(), e.lease))
    }

    /// The service of instance `id` in `namespace`, if it is registered.
    pub fn service_of(&self, namespace: &str, id: &str) -> Option<&str> {
        self.namespaces
            .get(namespace)?
            .ids
            .get(id)
            .map(String::as_str)
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every lease and its TTL, for a new leader to start the clocks.
    pub fn leases(&self) -> impl Iterator<Item = (LeaseId, u32)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl_seconds))
    }

    /// A lease's own TTL, as granted.
    pub fn lease_ttl(&self, id: LeaseId) -> Option<u32> {
        self.leases.get(&id).map(|l| l.ttl_seconds)
    }

    pub fn has_lease(&self, id: LeaseId) -> bool {
        self.leases.contains_key(&id)
    }

    /// The index that last granted a lease, for an expiry to name.
    pub fn lease_granted_at(&self, id: LeaseId) -> Option<u64> {
        self.leases.get(&id).map(|l| l.granted_at)
    }

    /// Drops an owner from a lease, and the lease itself when it keeps nothing alive.
    pub(super) fn release(
        &mut self,
        lease: LeaseId,
        key: &(String, String),
        removed: &mut Vec<LeaseId>,
    ) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.owners.remove(key);
            if l.owners.is_empty() {
                self.leases.remove(&lease);
                removed.push(lease);
            }
        }
    }

    pub(super) fn expire(&mut self, index: u64, leases: &[(LeaseId, u64)]) -> ApplyResult {
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

    /// Keeps the checkpoints that still apply (the lease was not granted again since)
    /// for the lease keepers to record; changes nothing in the catalog.
    pub(super) fn checkpoint(&self, leases: &[(LeaseId, u64, u64)]) -> ApplyResult {
        ApplyResult {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::testing::{inst, reg, run, script};
    use crate::catalog::{Catalog, Command, Limits};

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
    fn per_lease_limit_is_enforced() {
        let mut c = Catalog::new(Limits {
            max_instances: 10,
            max_instances_per_lease: 2,
            ..Limits::default()
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
