//! Domain types of the catalog: instances, their state, leases and revisions.
//!
//! Pure data and validation: nothing here imports tokio, tonic or redb, so the state
//! machine and the rules can be tested (and later replicated) without any transport.

pub mod acl;
pub mod intention;
pub mod kv;
pub mod labels;
pub mod mesh_ca;
pub mod policy;
pub mod resilience;
pub mod rollout;
mod validate;
pub mod webhook;

use std::sync::Arc;

pub use labels::Labels;
use serde::{Deserialize, Serialize};

pub use policy::{Policy, PolicyRecord};
pub use resilience::{Resilience, ResilienceSettings, RetryOn};
pub use validate::{
    validate_id, validate_instance, validate_name, validate_namespace, validate_ttl,
    validate_version, ValidationError, DEFAULT_TTL_SECONDS, DEFAULT_WEIGHT, MAX_ID_LEN, MAX_LABELS,
    MAX_LABEL_BYTES, MAX_TTL_SECONDS, MIN_TTL_SECONDS,
};
pub use webhook::{Webhook, WebhookKind};

/// The namespace used when a request leaves it empty.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Identifies a lease. Chosen by the state machine (the log index of the command that
/// created it), so every replica derives the same id.
pub type LeaseId = u64;

/// The index of the last applied change; one global, monotonically increasing number.
pub type Revision = u64;

/// Whether an instance should receive new traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Healthy and accepting traffic.
    Serving,
    /// Finishing in-flight work; gets no new traffic but stays registered.
    Draining,
    /// Failing its health checks; gets no new traffic.
    Failing,
}

impl State {
    /// The upper-case name used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Serving => "SERVING",
            State::Draining => "DRAINING",
            State::Failing => "FAILING",
        }
    }
}

/// One registered instance of a service, as validated at the edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub version: String,
    pub labels: Labels,
    pub weight: u32,
    pub zone: String,
    pub state: State,
    /// The sidecar's mesh inbound (mTLS) port beside `port`, 0 when the instance is not
    /// in the mesh. Sidecars dial it with mutual TLS; DNS and clients outside the mesh
    /// keep `port`.
    ///
    /// Not in the instance's serde form: the registry's log and snapshots have written
    /// instances in one postcard shape since the first release, and postcard cannot skip
    /// a field it does not know. The registry carries the port beside the instance
    /// instead (its own command variant and snapshot section), so an older node still
    /// reads every instance without one.
    #[serde(skip)]
    pub mesh_port: u16,
}

impl Instance {
    /// The reference a watcher receives when this instance is removed.
    pub fn to_ref(&self) -> InstanceRef {
        InstanceRef {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            id: self.id.clone(),
        }
    }
}

/// Names a removed instance in a watch delta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRef {
    pub namespace: String,
    pub service: String,
    pub id: String,
}

/// A service whose routing policy changed (`None`: cleared).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyChange {
    pub namespace: String,
    pub service: String,
    pub policy: Option<Arc<Policy>>,
}

/// What one applied command changed, as watchers see it. Instances are shared (`Arc`)
/// between the catalog, the watch history and every watcher, so fan-out copies pointers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Change {
    pub revision: Revision,
    pub upserted: Vec<Arc<Instance>>,
    pub removed: Vec<InstanceRef>,
    pub policies: Vec<PolicyChange>,
    /// Destinations whose intentions changed, each with all it has now.
    pub intentions: Vec<IntentionsChange>,
    /// The mesh CA's new trust bundle, when its roots changed.
    pub trust_bundle: Option<Arc<str>>,
    /// Services whose mTLS mode changed: (namespace, service, strict).
    pub mtls: Vec<(String, String, bool)>,
    /// Keys written or deleted (only watchers of a matching prefix get them).
    pub kv: Vec<kv::KvChange>,
    /// Namespaces whose flag document changed (only watchers that asked for flags).
    pub flags: Vec<FlagsChange>,
    /// The whole catalog was replaced: watchers must resync with a snapshot.
    pub reset: bool,
}

/// A namespace's flag document as it now stands (flagd schema, validated at the edge).
#[derive(Clone, Debug, PartialEq)]
pub struct FlagsChange {
    pub namespace: String,
    pub document: Arc<str>,
    /// The revision that wrote it.
    pub revision: Revision,
}

/// A destination whose intentions changed: every intention it has now (empty: none).
#[derive(Clone, Debug, PartialEq)]
pub struct IntentionsChange {
    pub namespace: String,
    pub destination: String,
    pub intentions: Arc<[intention::Intention]>,
}

impl Change {
    /// True when the change touches `service` in `namespace`.
    pub fn touches(&self, namespace: &str, services: &[String]) -> bool {
        let wanted = |ns: &str, svc: &str| {
            ns == namespace && (services.is_empty() || services.iter().any(|s| s == svc))
        };
        self.upserted
            .iter()
            .any(|i| wanted(&i.namespace, &i.service))
            || self
                .removed
                .iter()
                .any(|r| wanted(&r.namespace, &r.service))
            || self
                .policies
                .iter()
                .any(|p| wanted(&p.namespace, &p.service))
            || self.mtls.iter().any(|(ns, svc, _)| wanted(ns, svc))
            // Every watcher of the namespace gets its intentions and the roots.
            || self.intentions.iter().any(|i| i.namespace == namespace)
            || self.trust_bundle.is_some()
    }
}

/// All instances of one service, as served to snapshots and `Resolve`.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSnapshot {
    pub service: String,
    pub instances: Vec<Arc<Instance>>,
    pub policy: Option<Arc<Policy>>,
}

/// One line of `ListServices`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    pub instance_count: u32,
    pub versions: Vec<String>,
}
