//! Reads of the applied catalog for the API, DNS and watch snapshots: a namespace's
//! services, one service's instances, service summaries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::Catalog;
use crate::model::{Instance, ServiceSnapshot, ServiceSummary};

impl Catalog {
    /// The services of a namespace (all, or only `services`), sorted by name: those with
    /// instances and those with only a policy.
    pub fn snapshot(&self, namespace: &str, services: &[String]) -> Vec<ServiceSnapshot> {
        let wanted = |name: &str| services.is_empty() || services.iter().any(|s| s == name);
        let mut out: BTreeMap<&str, ServiceSnapshot> = BTreeMap::new();
        if let Some(ns) = self.namespaces.get(namespace) {
            for (name, instances) in ns.services.iter().filter(|(n, _)| wanted(n)) {
                out.insert(
                    name,
                    ServiceSnapshot {
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
                .or_insert_with(|| ServiceSnapshot {
                    service: name.clone(),
                    instances: Vec::new(),
                    policy: None,
                })
                .policy = Some(policy);
        }
        out.into_values().collect()
    }

    /// Every namespace that holds instances, sorted.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .filter(|(_, ns)| !ns.services.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
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

    /// One summary per service of a namespace, sorted by name: those with instances, and
    /// those that have only a routing policy (instance count 0), so every policy a
    /// sidecar holds is visible.
    pub fn list_services(&self, namespace: &str) -> Vec<ServiceSummary> {
        let empty = Default::default();
        let services = self
            .namespaces
            .get(namespace)
            .map_or(&empty, |ns| &ns.services);
        let policy_only = self
            .policies
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .filter(|((_, svc), h)| {
                !services.contains_key(svc) && h.back().is_some_and(|r| r.policy.is_some())
            })
            .map(|((_, svc), _)| ServiceSummary {
                name: svc.clone(),
                instance_count: 0,
                versions: Vec::new(),
            });
        let mut all: Vec<ServiceSummary> = services
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
            .collect();
        all.extend(policy_only);
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}
