//! The endpoint table: per service an immutable view, all swapped atomically.
//!
//! The request path does one atomic load and a hash lookup; it never takes a lock. The
//! discovery client builds a new map on every catalog change and swaps it in, reusing
//! each surviving endpoint's [`LiveState`] so in-flight counts carry over.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::balance::Pool;
use crate::endpoint::{Endpoint, LiveState, State};
use crate::metrics::Metrics;
use crate::route::CompiledPolicy;
use switchyard_proto::v1 as pb;
use switchyard_registry::model::{Instance as DnsInstance, Policy as DnsPolicy};

/// One instance as the catalog holds it (also the disk cache's record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub address: String,
    pub port: u16,
    pub version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    #[serde(default)]
    pub zone: String,
    pub state: State,
}

impl InstanceRecord {
    /// `host:port`, with IPv6 literals bracketed.
    pub fn authority(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// Everything the proxy needs about one service at one revision.
#[derive(Debug)]
pub struct ServiceView {
    pub name: String,
    pub revision: u64,
    pub endpoints: Vec<Endpoint>,
    /// The usable endpoints and the balancer's tables for them, computed once per
    /// update, not per request.
    pub pool: Pool,
    /// The service's routing policy, compiled against these endpoints.
    pub policy: Option<CompiledPolicy>,
    /// The same instances and policy in the registry's model, for the sidecar's DNS
    /// port (built once per update, not per query).
    pub dns_instances: Vec<Arc<DnsInstance>>,
    pub dns_policy: Option<Arc<DnsPolicy>>,
}

impl ServiceView {
    pub fn new(
        name: String,
        revision: u64,
        records: &BTreeMap<String, InstanceRecord>,
        policy: Option<&pb::Policy>,
        previous: Option<&ServiceView>,
        metrics: Option<&Metrics>,
    ) -> Self {
        let kept: HashMap<&str, &Arc<LiveState>> = previous
            .map(|p| {
                p.endpoints
                    .iter()
                    .map(|e| (e.id.as_str(), &e.live))
                    .collect()
            })
            .unwrap_or_default();
        let endpoints: Vec<Endpoint> = records
            .values()
            .map(|r| {
                let live = kept
                    .get(r.id.as_str())
                    .map_or_else(|| Arc::new(LiveState::default()), |l| Arc::clone(l));
                let authority = r.authority();
                Endpoint {
                    id: r.id.clone(),
                    uri_authority: authority.parse().ok(),
                    authority,
                    version: r.version.clone(),
                    labels: r.labels.clone(),
                    weight: r.weight.max(1),
                    zone: r.zone.clone(),
                    state: r.state,
                    live,
                }
            })
            .collect();
        let usable: Vec<usize> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_usable())
            .map(|(i, _)| i)
            .collect();
        let pool = Pool::new(&endpoints, usable);
        let dns_policy = policy
            .and_then(|p| switchyard_registry::api::policy_from_proto(p.clone()).ok())
            .map(Arc::new);
        let dns_instances = records
            .values()
            .map(|r| {
                Arc::new(DnsInstance {
                    namespace: String::new(),
                    service: name.clone(),
                    id: r.id.clone(),
                    address: r.address.clone(),
                    port: r.port,
                    version: r.version.clone(),
                    labels: r.labels.clone(),
                    weight: r.weight,
                    zone: r.zone.clone(),
                    state: match r.state {
                        State::Serving => switchyard_registry::model::State::Serving,
                        State::Draining => switchyard_registry::model::State::Draining,
                        State::Failing => switchyard_registry::model::State::Failing,
                    },
                })
            })
            .collect();
        let policy = policy.map(|p| CompiledPolicy::compile(&name, p, &endpoints, metrics));
        Self {
            name,
            revision,
            endpoints,
            pool,
            policy,
            dns_instances,
            dns_policy,
        }
    }
}

/// Map of service name to its current view.
pub type Views = HashMap<String, Arc<ServiceView>>;

/// The table shared by the proxy listeners, the admin port and the discovery client.
pub struct EndpointTable {
    views: ArcSwap<Views>,
    revision: AtomicU64,
    /// True once a catalog arrived (from the registry or the disk cache).
    loaded: AtomicBool,
    /// True while a watch stream to a registry is open.
    connected: AtomicBool,
    /// When a registry last confirmed the catalog (the stream was open at that time).
    confirmed: Mutex<Option<Instant>>,
}

impl Default for EndpointTable {
    fn default() -> Self {
        Self {
            views: ArcSwap::from_pointee(HashMap::new()),
            revision: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            confirmed: Mutex::new(None),
        }
    }
}

impl EndpointTable {
    /// The current view of a service: one atomic load, no lock.
    pub fn get(&self, service: &str) -> Option<Arc<ServiceView>> {
        self.views.load().get(service).cloned()
    }

    /// Every view, for the admin port.
    pub fn all(&self) -> Arc<Views> {
        self.views.load_full()
    }

    /// Replaces the whole table.
    pub fn store(&self, views: Views, revision: u64) {
        self.views.store(Arc::new(views));
        self.revision.store(revision, Ordering::Release);
        self.loaded.store(true, Ordering::Release);
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Records a watch stream opening or closing. The catalog counts as confirmed up to
    /// the moment an open stream closes; failed reconnects confirm nothing.
    pub fn set_connected(&self, connected: bool) {
        let mut confirmed = self.confirmed.lock();
        let was = self.connected.swap(connected, Ordering::AcqRel);
        if connected || was {
            *confirmed = Some(Instant::now());
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// How old the catalog is: zero while a registry stream is open, else the time since
    /// one last was; `None` if no registry ever confirmed it (loaded from disk only).
    pub fn age(&self) -> Option<Duration> {
        if self.is_connected() {
            return Some(Duration::ZERO);
        }
        self.confirmed.lock().map(|t| t.elapsed())
    }
}
