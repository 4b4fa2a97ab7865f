//! The catalog's snapshot form: [`PersistedCatalog`] serializes compactly and rebuilds
//! exactly, dropping what is inconsistent rather than trusting it.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::apply::{Entry, Lease, Limits};
use super::legacy::PolicyRecordV1;
use super::Catalog;
use crate::model::acl::Token;
use crate::model::rollout::Rollout;
use crate::model::{Instance, LeaseId, PolicyRecord, Revision};

/// The catalog as written to a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalog {
    pub(super) applied_index: u64,
    pub(super) revision: Revision,
    pub(super) instances: Vec<(Instance, LeaseId)>,
    /// (id, ttl_seconds, granted_at)
    pub(super) leases: Vec<(LeaseId, u32, u64)>,
    pub(super) policies: Vec<((String, String), Vec<PolicyRecord>)>,
    /// Added after the first release: snapshots written before it decode through
    /// [`PersistedCatalogV0`] and get an empty id (the next leader commits one).
    pub(super) cluster_id: String,
    /// Added with rollouts: snapshots written before decode through
    /// [`PersistedCatalogV2`] and have none.
    pub(super) rollouts: Vec<((String, String), Vec<Rollout>)>,
    /// Added with ACLs: snapshots written before decode through [`PersistedCatalogV3`]
    /// (not bootstrapped, no tokens).
    pub(super) acl_bootstrapped: bool,
    pub(super) tokens: Vec<Token>,
    /// Added with the mesh CA, and the last field this form will get: named sections,
    /// each its own postcard encoding, so state added later (a section per feature)
    /// needs no new snapshot form. Snapshots written before decode through
    /// [`PersistedCatalogV4`] (no sections). Unknown sections are ignored.
    pub(super) sections: Vec<(String, Vec<u8>)>,
}

/// The section holding [`crate::model::mesh_ca::MeshCa`].
const SECTION_MESH_CA: &str = "mesh_ca";
/// The section holding each meshed instance's `mesh_port` (namespace, id, port), which
/// the instance's own serde form leaves out (see [`Instance::mesh_port`]).
const SECTION_MESH_PORTS: &str = "mesh_ports";
/// The section holding the services whose mTLS mode is strict.
const SECTION_MTLS_STRICT: &str = "mtls_strict";
/// The section holding when each superseded mesh root retires.
const SECTION_MESH_ROOT_RETIRE: &str = "mesh_root_retire";
/// The section holding when each rotated-in mesh root starts signing.
const SECTION_MESH_ROOT_ACTIVATE: &str = "mesh_root_activate";
/// The section holding every namespace's intentions and their history.
const SECTION_INTENTIONS: &str = "intentions";
/// The section holding every namespace's KV entries.
const SECTION_KV: &str = "kv";
/// The section holding every namespace's flag documents and their history.
const SECTION_FLAGS: &str = "flags";
/// The section holding the [`super::format::SnapshotFormat`]: the writer's format and the
/// cluster's. Releases before formats ignore it (unknown sections are skipped), which
/// is safe: they only ever see it from a cluster still at format 1.
const SECTION_FORMAT: &str = "format";

/// The snapshot form written before the mesh CA (ACLs, no sections).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalogV4 {
    applied_index: u64,
    revision: Revision,
    instances: Vec<(Instance, LeaseId)>,
    leases: Vec<(LeaseId, u32, u64)>,
    policies: Vec<((String, String), Vec<PolicyRecord>)>,
    cluster_id: String,
    rollouts: Vec<((String, String), Vec<Rollout>)>,
    acl_bootstrapped: bool,
    tokens: Vec<Token>,
}

impl From<PersistedCatalogV4> for PersistedCatalog {
    fn from(v: PersistedCatalogV4) -> Self {
        Self {
            applied_index: v.applied_index,
            revision: v.revision,
            instances: v.instances,
            leases: v.leases,
            policies: v.policies,
            cluster_id: v.cluster_id,
            rollouts: v.rollouts,
            acl_bootstrapped: v.acl_bootstrapped,
            tokens: v.tokens,
            sections: Vec::new(),
        }
    }
}

#[cfg(test)]
impl PersistedCatalogV4 {
    /// The old form of a current snapshot (what a release before the mesh CA wrote).
    pub fn from_current_for_test(p: &PersistedCatalog) -> Self {
        Self {
            applied_index: p.applied_index,
            revision: p.revision,
            instances: p.instances.clone(),
            leases: p.leases.clone(),
            policies: p.policies.clone(),
            cluster_id: p.cluster_id.clone(),
            rollouts: p.rollouts.clone(),
            acl_bootstrapped: p.acl_bootstrapped,
            tokens: p.tokens.clone(),
        }
    }
}

/// The snapshot form written before ACLs existed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalogV3 {
    applied_index: u64,
    revision: Revision,
    instances: Vec<(Instance, LeaseId)>,
    leases: Vec<(LeaseId, u32, u64)>,
    policies: Vec<((String, String), Vec<PolicyRecord>)>,
    cluster_id: String,
    rollouts: Vec<((String, String), Vec<Rollout>)>,
}

impl From<PersistedCatalogV3> for PersistedCatalog {
    fn from(v: PersistedCatalogV3) -> Self {
        Self {
            applied_index: v.applied_index,
            revision: v.revision,
            instances: v.instances,
            leases: v.leases,
            policies: v.policies,
            cluster_id: v.cluster_id,
            rollouts: v.rollouts,
            acl_bootstrapped: false,
            tokens: Vec::new(),
            sections: Vec::new(),
        }
    }
}

#[cfg(test)]
impl PersistedCatalogV3 {
    /// The old form of a current snapshot (what a release before ACLs wrote).
    pub fn from_current_for_test(p: &PersistedCatalog) -> Self {
        Self {
            applied_index: p.applied_index,
            revision: p.revision,
            instances: p.instances.clone(),
            leases: p.leases.clone(),
            policies: p.policies.clone(),
            cluster_id: p.cluster_id.clone(),
            rollouts: p.rollouts.clone(),
        }
    }
}

/// The snapshot form written before rollouts existed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalogV2 {
    applied_index: u64,
    revision: Revision,
    instances: Vec<(Instance, LeaseId)>,
    leases: Vec<(LeaseId, u32, u64)>,
    policies: Vec<((String, String), Vec<PolicyRecord>)>,
    cluster_id: String,
}

impl From<PersistedCatalogV2> for PersistedCatalog {
    fn from(v: PersistedCatalogV2) -> Self {
        Self {
            applied_index: v.applied_index,
            revision: v.revision,
            instances: v.instances,
            leases: v.leases,
            policies: v.policies,
            cluster_id: v.cluster_id,
            rollouts: Vec::new(),
            acl_bootstrapped: false,
            tokens: Vec::new(),
            sections: Vec::new(),
        }
    }
}

#[cfg(test)]
impl PersistedCatalogV2 {
    /// The old form of a current snapshot (what a release before rollouts wrote).
    pub fn from_current_for_test(p: &PersistedCatalog) -> Self {
        Self {
            applied_index: p.applied_index,
            revision: p.revision,
            instances: p.instances.clone(),
            leases: p.leases.clone(),
            policies: p.policies.clone(),
            cluster_id: p.cluster_id.clone(),
        }
    }
}

/// The snapshot form written before policies carried resilience settings (read through
/// [`super::legacy`]'s mirrors of the old policy).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalogV1 {
    applied_index: u64,
    revision: Revision,
    instances: Vec<(Instance, LeaseId)>,
    leases: Vec<(LeaseId, u32, u64)>,
    policies: Vec<((String, String), Vec<PolicyRecordV1>)>,
    cluster_id: String,
}

/// The snapshot form written before the cluster id existed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedCatalogV0 {
    applied_index: u64,
    revision: Revision,
    instances: Vec<(Instance, LeaseId)>,
    leases: Vec<(LeaseId, u32, u64)>,
    policies: Vec<((String, String), Vec<PolicyRecordV1>)>,
}

#[cfg(test)]
fn old_policies(
    p: &[((String, String), Vec<PolicyRecord>)],
) -> Vec<((String, String), Vec<PolicyRecordV1>)> {
    p.iter()
        .map(|(k, h)| (k.clone(), h.iter().map(PolicyRecordV1::from).collect()))
        .collect()
}

fn new_policies(
    p: Vec<((String, String), Vec<PolicyRecordV1>)>,
) -> Vec<((String, String), Vec<PolicyRecord>)> {
    p.into_iter()
        .map(|(k, h)| (k, h.into_iter().map(PolicyRecord::from).collect()))
        .collect()
}

#[cfg(test)]
impl PersistedCatalogV0 {
    /// The old form of a current snapshot (what a release before the id wrote).
    pub fn from_current_for_test(p: &PersistedCatalog) -> Self {
        Self {
            applied_index: p.applied_index,
            revision: p.revision,
            instances: p.instances.clone(),
            leases: p.leases.clone(),
            policies: old_policies(&p.policies),
        }
    }
}

#[cfg(test)]
impl PersistedCatalogV1 {
    /// The old form of a current snapshot (what a release before resilience wrote).
    pub fn from_current_for_test(p: &PersistedCatalog) -> Self {
        Self {
            applied_index: p.applied_index,
            revision: p.revision,
            instances: p.instances.clone(),
            leases: p.leases.clone(),
            policies: old_policies(&p.policies),
            cluster_id: p.cluster_id.clone(),
        }
    }
}

impl From<PersistedCatalogV0> for PersistedCatalog {
    fn from(v: PersistedCatalogV0) -> Self {
        Self {
            applied_index: v.applied_index,
            revision: v.revision,
            instances: v.instances,
            leases: v.leases,
            policies: new_policies(v.policies),
            cluster_id: String::new(),
            rollouts: Vec::new(),
            acl_bootstrapped: false,
            tokens: Vec::new(),
            sections: Vec::new(),
        }
    }
}

impl From<PersistedCatalogV1> for PersistedCatalog {
    fn from(v: PersistedCatalogV1) -> Self {
        Self {
            applied_index: v.applied_index,
            revision: v.revision,
            instances: v.instances,
            leases: v.leases,
            policies: new_policies(v.policies),
            cluster_id: v.cluster_id,
            rollouts: Vec::new(),
            acl_bootstrapped: false,
            tokens: Vec::new(),
            sections: Vec::new(),
        }
    }
}

impl Catalog {
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
            cluster_id: self.cluster_id.clone(),
            rollouts: self
                .rollouts
                .iter()
                .map(|(k, h)| (k.clone(), h.iter().cloned().collect()))
                .collect(),
            acl_bootstrapped: self.acl.bootstrapped,
            tokens: self.acl.tokens.values().map(|t| (**t).clone()).collect(),
            sections: self.sections(),
        }
    }

    fn sections(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mesh_ports: Vec<(&str, &str, u16)> = self
            .namespaces
            .values()
            .flat_map(|ns| ns.services.values())
            .flat_map(|svc| svc.values())
            .filter(|e| e.instance.mesh_port != 0)
            .map(|e| {
                (
                    e.instance.namespace.as_str(),
                    e.instance.id.as_str(),
                    e.instance.mesh_port,
                )
            })
            .collect();
        section(
            &mut out,
            SECTION_MESH_PORTS,
            &mesh_ports,
            mesh_ports.is_empty(),
        );
        section(
            &mut out,
            SECTION_MTLS_STRICT,
            &self.mtls_strict,
            self.mtls_strict.is_empty(),
        );
        section(
            &mut out,
            SECTION_MESH_ROOT_ACTIVATE,
            &self.mesh_root_activate,
            self.mesh_root_activate.is_empty(),
        );
        section(
            &mut out,
            SECTION_MESH_ROOT_RETIRE,
            &self.mesh_root_retire,
            self.mesh_root_retire.is_empty(),
        );
        section(
            &mut out,
            SECTION_INTENTIONS,
            &self.intentions,
            self.intentions.is_empty(),
        );
        section(&mut out, SECTION_KV, &self.kv, self.kv.is_empty());
        section(&mut out, SECTION_FLAGS, &self.flags, self.flags.is_empty());
        section(
            &mut out,
            SECTION_FORMAT,
            &super::format::SnapshotFormat {
                writer: super::format::FORMAT,
                cluster: self.cluster_format(),
            },
            false,
        );
        if let Some(ca) = &self.mesh_ca {
            section(&mut out, SECTION_MESH_CA, ca, false);
        }
        out
    }

    fn load_sections(&mut self, sections: Vec<(String, Vec<u8>)>) {
        for (name, bytes) in sections {
            let name = name.as_str();
            match name {
                SECTION_MESH_CA => {
                    if let Some(ca) = decoded(name, &bytes, "the next leader makes a new CA") {
                        self.mesh_ca = Some(ca);
                    }
                }
                SECTION_FORMAT => {
                    if let Some(f) = decoded::<super::format::SnapshotFormat>(
                        name,
                        &bytes,
                        "the cluster format is 1 until the leader raises it again",
                    ) {
                        self.format = f.cluster;
                    }
                }
                SECTION_MTLS_STRICT => {
                    if let Some(strict) =
                        decoded(name, &bytes, "every service is permissive until set again")
                    {
                        self.mtls_strict = strict;
                    }
                }
                SECTION_MESH_ROOT_ACTIVATE => {
                    if let Some(activate) = decoded(name, &bytes, "rotated-in roots sign at once") {
                        self.mesh_root_activate = activate;
                    }
                }
                SECTION_MESH_ROOT_RETIRE => {
                    if let Some(retire) = decoded(
                        name,
                        &bytes,
                        "superseded roots stay trusted until the next rotation",
                    ) {
                        self.mesh_root_retire = retire;
                    }
                }
                SECTION_INTENTIONS => {
                    if let Some(intentions) = decoded(
                        name,
                        &bytes,
                        "this node enforces none until they are set again",
                    ) {
                        self.intentions = intentions;
                    }
                }
                SECTION_KV => {
                    if let Some(kv) = decoded(name, &bytes, "this node holds no KV entries") {
                        self.kv = kv;
                        self.kv.recount();
                    }
                }
                SECTION_FLAGS => {
                    if let Some(flags) = decoded(name, &bytes, "this node holds no flags") {
                        self.flags = flags;
                    }
                }
                SECTION_MESH_PORTS => {
                    if let Some(ports) = decoded(
                        name,
                        &bytes,
                        "meshed instances are dialled in clear text until they register again",
                    ) {
                        self.set_mesh_ports(ports);
                    }
                }
                other => tracing::warn!(
                    section = other,
                    "snapshot section unknown to this release; ignored"
                ),
            }
        }
    }

    /// Puts back the mesh ports a snapshot kept beside its instances.
    fn set_mesh_ports(&mut self, ports: Vec<(String, String, u16)>) {
        for (namespace, id, port) in ports {
            let Some(ns) = self.namespaces.get_mut(&namespace) else {
                continue;
            };
            let Some(service) = ns.ids.get(&id) else {
                continue;
            };
            if let Some(e) = ns.services.get_mut(service).and_then(|s| s.get_mut(&id)) {
                Arc::make_mut(&mut e.instance).mesh_port = port;
            }
        }
    }

    /// Rebuilds a catalog from a snapshot. Inconsistent entries (an instance naming a
    /// lease the snapshot lacks) are dropped rather than trusted.
    pub fn from_persisted(limits: Limits, p: PersistedCatalog) -> Self {
        let mut c = Catalog::new(limits);
        c.applied_index = p.applied_index;
        c.revision = p.revision;
        c.cluster_id = p.cluster_id;
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
        c.recount_policy_bytes();
        c.rollouts = p
            .rollouts
            .into_iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(k, h)| (k, h.into_iter().collect()))
            .collect();
        c.acl = super::acl::AclState::rebuild(p.acl_bootstrapped, p.tokens);
        c.load_sections(p.sections);
        c
    }
}

/// Appends section `name` holding `value`, unless `empty` (a snapshot without the
/// feature's state then reads like one from before it).
fn section<T: Serialize + ?Sized>(
    out: &mut Vec<(String, Vec<u8>)>,
    name: &str,
    value: &T,
    empty: bool,
) {
    // Encoding plain data into a Vec cannot fail.
    if !empty {
        if let Ok(bytes) = postcard::to_stdvec(value) {
            out.push((name.to_string(), bytes));
        }
    }
}

/// Section `name`'s state, or `None` with a line saying what is lost without it.
impl PersistedCatalog {
    /// The snapshot's `format` section; `None` in one written before formats (format 1).
    pub fn format(&self) -> Option<super::format::SnapshotFormat> {
        self.sections
            .iter()
            .find(|(name, _)| name == SECTION_FORMAT)
            .and_then(|(_, bytes)| postcard::from_bytes(bytes).ok())
    }

    /// Refuses a snapshot of a cluster at a format this release cannot read, before any
    /// of it is installed.
    pub fn check_format(&self) -> Result<(), super::format::SnapshotTooNew> {
        match self.format() {
            Some(f) if f.cluster > super::format::FORMAT => Err(super::format::SnapshotTooNew {
                writer: f.writer,
                cluster: f.cluster,
            }),
            _ => Ok(()),
        }
    }
}

fn decoded<T: serde::de::DeserializeOwned>(name: &str, bytes: &[u8], without: &str) -> Option<T> {
    match postcard::from_bytes(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, section = name, "a snapshot section does not decode; {without}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::testing::{fingerprint, run, script};
    use crate::catalog::{Catalog, Limits};
    use crate::model::DEFAULT_NAMESPACE;

    #[test]
    fn a_snapshot_rebuilds_the_same_catalog() {
        let a = run(&script()[..5]);
        let b = Catalog::from_persisted(Limits::default(), a.to_persisted());
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(a.instance_count(), b.instance_count());
        // What the instance's own serde form leaves out comes back from its section.
        assert!(a
            .snapshot(DEFAULT_NAMESPACE, &[])
            .iter()
            .flat_map(|s| &s.instances)
            .any(|i| i.mesh_port != 0));
        assert_eq!(
            a.snapshot(DEFAULT_NAMESPACE, &[]),
            b.snapshot(DEFAULT_NAMESPACE, &[])
        );
        assert_eq!(
            a.list_services(DEFAULT_NAMESPACE),
            b.list_services(DEFAULT_NAMESPACE)
        );
    }
}
