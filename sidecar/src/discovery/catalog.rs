//! The sidecar's copy of the catalog, built only from watch events, and the views it
//! publishes to the endpoint table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use switchyard_core::convert::{instance_from_proto, intention_from_proto, policy_from_proto};
use switchyard_core::model::{Instance, Policy};
use switchyard_proto::v1 as pb;

use crate::metrics::Metrics;
use crate::table::{EndpointTable, IntentionMap, KvMap, LoadedFlags, ServiceView};

/// Services, their instances and their routing policies at one revision. Each instance
/// is one `Arc`, the same one the endpoint table, DNS and the disk cache hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalCatalog {
    pub revision: u64,
    /// Service -> its instances by id. Each service's map is shared (copy on write),
    /// so the copy the disk-cache writer takes each second costs a pointer per
    /// service, and a delta copies only the map of the service it changes, and only
    /// while a writer holds it.
    pub services: BTreeMap<String, Instances>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// The registry cluster this copy came from (`WatchEvent.cluster_id`): sent back on
    /// resume, so a revision is never trusted by another or a wiped cluster.
    pub cluster_id: String,
    /// The namespace's intentions by destination (enforced by the inbound listener).
    pub intentions: Arc<IntentionMap>,
    /// The mesh CA's roots, PEM, once the registry sent them.
    pub trust_bundle: Option<Arc<String>>,
    /// True once a snapshot from a registry was applied in this process: intentions are
    /// known only then (the cache file does not keep them), so until it is the inbound
    /// listener refuses every call and the watch asks for a snapshot, not a resume.
    pub intentions_known: bool,
    /// Services whose mTLS mode is strict.
    pub strict: BTreeSet<String>,
    /// The namespace's feature flags, compiled, as the last event (or the cache) gave
    /// them.
    pub flags: Option<Arc<LoadedFlags>>,
    /// The KV entries under the followed prefixes.
    pub kv: Arc<KvMap>,
}

/// One service's instances by id.
pub type Instances = Arc<BTreeMap<String, Arc<Instance>>>;

/// A flag document from the registry, compiled; one this sidecar cannot read (a newer
/// registry's rule) is left out, and the flags it had keep answering.
pub fn compile_flags(document: &str, revision: u64) -> Option<Arc<LoadedFlags>> {
    match switchyard_core::flags::FlagSet::parse(document) {
        Ok(set) => Some(Arc::new(LoadedFlags { set, revision })),
        Err(e) => {
            tracing::warn!(revision, error = %e, "the registry sent flags this sidecar cannot read; the previous ones keep answering");
            None
        }
    }
}

/// A destination's watched intentions. One this sidecar cannot read (a newer registry's
/// action, a malformed name) fails closed: the destination then denies every caller,
/// rather than dropping a deny it could not read.
fn intentions_of(
    d: &pb::DestinationIntentions,
) -> Arc<[switchyard_core::model::intention::Intention]> {
    use switchyard_core::model::intention::{Action, Intention};
    let read: Result<Vec<Intention>, _> = d.intentions.iter().map(intention_from_proto).collect();
    match read {
        Ok(rules) => rules.into(),
        Err(_) => {
            tracing::error!(destination = %d.destination, "the registry sent an intention this sidecar cannot read; denying every caller of this destination until it can");
            vec![Intention {
                source: "*".into(),
                destination: d.destination.clone(),
                action: Action::Deny,
                description: "an intention this sidecar cannot read".into(),
                revision: 0,
                updated_ms: 0,
            }]
            .into()
        }
    }
}

/// A wire instance as the catalog keeps it: validated by the same rules the registry
/// applies (a record that breaks them is left out, and said so, rather than routed to).
fn record(i: pb::Instance) -> Option<Arc<Instance>> {
    match instance_from_proto(i) {
        Ok(instance) => Some(Arc::new(instance)),
        Err(e) => {
            tracing::warn!(error = %e, "the registry sent an instance that breaks the rules; left out");
            None
        }
    }
}

/// A wire policy compiled into the model once per change.
fn policy(service: &str, p: pb::Policy) -> Option<Arc<Policy>> {
    match policy_from_proto(p) {
        Ok(policy) => Some(Arc::new(policy)),
        Err(e) => {
            tracing::warn!(service, error = %e, "the registry sent a policy this sidecar cannot read; routing without it");
            None
        }
    }
}

impl LocalCatalog {
    /// Applies one watch event; returns the services it touched (all, for a snapshot).
    /// Whether an event may be applied to this copy: a snapshot always may (it replaces
    /// everything); a delta only when it comes from the cluster this copy came from (or
    /// either side does not know its cluster yet).
    pub fn same_cluster(&self, event: &pb::WatchEvent) -> bool {
        matches!(event.kind, Some(pb::watch_event::Kind::Snapshot(_)))
            || event.cluster_id.is_empty()
            || self.cluster_id.is_empty()
            || event.cluster_id == self.cluster_id
    }

    pub fn apply(&mut self, event: pb::WatchEvent) -> Touched {
        self.revision = event.revision;
        if !event.cluster_id.is_empty() {
            self.cluster_id = event.cluster_id;
        }
        if !event.trust_bundle.is_empty() {
            self.trust_bundle = Some(Arc::new(event.trust_bundle));
        }
        if event.kv_snapshot || !event.kv.is_empty() || !event.kv_removed.is_empty() {
            let kv = Arc::make_mut(&mut self.kv);
            if event.kv_snapshot {
                kv.clear();
            }
            for k in &event.kv_removed {
                kv.remove(k);
            }
            for e in &event.kv {
                kv.insert(
                    e.key.clone(),
                    Arc::new(switchyard_core::model::kv::KvEntry {
                        key: e.key.clone(),
                        value: e.value.as_slice().into(),
                        flags: e.flags,
                        create_revision: e.create_revision,
                        modify_revision: e.modify_revision,
                    }),
                );
            }
        }
        if let Some(f) = &event.flags {
            let newer = self
                .flags
                .as_ref()
                .is_none_or(|have| have.revision != f.revision);
            if newer {
                if let Some(compiled) = compile_flags(&f.document, f.revision) {
                    self.flags = Some(compiled);
                }
            }
        }
        let snapshot = matches!(event.kind, Some(pb::watch_event::Kind::Snapshot(_)));
        self.intentions_known |= snapshot;
        if snapshot {
            self.strict.clear();
        }
        let mut mtls_touched = Vec::new();
        for m in &event.mtls {
            if m.mode == pb::MtlsMode::Strict as i32 {
                self.strict.insert(m.service.clone());
            } else {
                self.strict.remove(&m.service);
            }
            mtls_touched.push(m.service.clone());
        }
        if snapshot || !event.intentions.is_empty() {
            let map = Arc::make_mut(&mut self.intentions);
            if snapshot {
                map.clear();
            }
            for d in &event.intentions {
                let rules = intentions_of(d);
                if rules.is_empty() {
                    map.remove(&d.destination);
                } else {
                    map.insert(d.destination.clone(), rules);
                }
            }
        }
        match event.kind {
            Some(pb::watch_event::Kind::Snapshot(s)) => {
                self.services.clear();
                self.policies.clear();
                for mut svc in s.services {
                    if let Some(p) = svc.policy.take().and_then(|p| policy(&svc.service, p)) {
                        self.policies.insert(svc.service.clone(), p);
                    }
                    if svc.instances.is_empty() {
                        continue;
                    }
                    let instances = svc
                        .instances
                        .into_iter()
                        .filter_map(|i| record(i).map(|r| (r.id.clone(), r)))
                        .collect();
                    self.services.insert(svc.service, Arc::new(instances));
                }
                Touched::All
            }
            Some(pb::watch_event::Kind::Delta(d)) => {
                let mut touched = BTreeSet::new();
                for r in d.removed {
                    if let Some(instances) = self.services.get_mut(&r.service) {
                        if instances.contains_key(&r.id) {
                            Arc::make_mut(instances).remove(&r.id);
                        }
                        if instances.is_empty() {
                            self.services.remove(&r.service);
                        }
                    }
                    touched.insert(r.service);
                }
                for i in d.upserted {
                    let service = i.service.clone();
                    if let Some(r) = record(i) {
                        Arc::make_mut(self.services.entry(service.clone()).or_default())
                            .insert(r.id.clone(), r);
                    }
                    touched.insert(service);
                }
                for p in d.policies {
                    match p.policy.and_then(|wire| policy(&p.service, wire)) {
                        Some(policy) => {
                            self.policies.insert(p.service.clone(), policy);
                        }
                        None => {
                            self.policies.remove(&p.service);
                        }
                    }
                    touched.insert(p.service);
                }
                touched.extend(mtls_touched);
                Touched::Some(touched)
            }
            None => Touched::Some(mtls_touched.into_iter().collect()),
        }
    }

    /// Publishes the touched services to the table; untouched views (and so every
    /// in-flight count) are carried over as they are, and are not copied.
    pub fn publish(&self, touched: &Touched, table: &EndpointTable, metrics: Option<&Metrics>) {
        let mut changes: Vec<(String, Option<Arc<ServiceView>>)> = Vec::new();
        let names: BTreeSet<&String> = match touched {
            Touched::All => self.services.keys().chain(self.policies.keys()).collect(),
            Touched::Some(set) => set.iter().collect(),
        };
        let empty = BTreeMap::new();
        for name in names {
            let records = self.services.get(name).map(|i| &**i);
            let policy = self.policies.get(name);
            if records.is_none() && policy.is_none() {
                changes.push((name.clone(), None));
                continue;
            }
            // Strict mTLS: endpoints outside the mesh are not routed to at all.
            let strict = self.strict.contains(name);
            let all = records.unwrap_or(&empty);
            let meshed: BTreeMap<String, Arc<Instance>>;
            let records = if strict {
                meshed = all
                    .iter()
                    .filter(|(_, i)| i.mesh_port != 0)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                &meshed
            } else {
                all
            };
            let previous = table.get(name);
            let mut view = ServiceView::new(
                name.clone(),
                self.revision,
                records,
                policy,
                previous.as_deref(),
                metrics,
                table.defaults(),
                table.outlier(),
            );
            view.mtls_strict = strict;
            view.outside_mesh = all.len() - records.len();
            changes.push((name.clone(), Some(Arc::new(view))));
        }
        table.apply(changes, matches!(touched, Touched::All), self.revision);
        if self.intentions_known
            && table
                .intentions()
                .is_none_or(|i| !Arc::ptr_eq(&i, &self.intentions))
        {
            table.store_intentions(self.intentions.clone());
        }
        if !Arc::ptr_eq(&table.kv(), &self.kv) {
            table.store_kv(self.kv.clone());
        }
        if let Some(flags) = &self.flags {
            if table.flags().is_none_or(|f| !Arc::ptr_eq(&f, flags)) {
                table.store_flags(flags.clone());
            }
        }
        if let Some(bundle) = &self.trust_bundle {
            if table
                .trust_bundle()
                .is_none_or(|b| !Arc::ptr_eq(&b, bundle))
            {
                table.store_trust_bundle(bundle.clone());
            }
        }
    }
}

/// Which services an event changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Touched {
    All,
    Some(BTreeSet<String>),
}
