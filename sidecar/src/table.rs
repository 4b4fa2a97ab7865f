//! The endpoint table: per service an immutable view, all swapped atomically.
//!
//! The request path does one atomic load and a hash lookup; it never takes a lock. The
//! discovery client builds a new map on every catalog change and swaps it in, reusing
//! each surviving endpoint's [`LiveState`] so in-flight counts carry over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use switchyard_core::dns::ServiceRecords;
use switchyard_core::model::intention::Intention;
use switchyard_core::model::resilience::ResilienceSettings;
use switchyard_core::model::{Instance, Policy, State};

use crate::balance::{Pool, PoolSettings};
use crate::endpoint::{clock_ms, Endpoint, LiveState};
use crate::limits::ServiceLimits;
use crate::metrics::Metrics;
use crate::outlier::{ejection_cap, millis, OutlierConfig, ServiceOutlier};
use crate::resilience::Resolved;
use crate::route::CompiledPolicy;

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
    /// The same instances (the same `Arc`s) and policy for the sidecar's DNS port, with
    /// the policy compiled for selection once per update, not per query.
    pub dns: Arc<ServiceRecords>,
    /// Timeouts, retries and limits: the sidecar's defaults with the policy's
    /// overrides, resolved once per update (shared with every service that has none).
    pub resilience: Arc<Resolved>,
    /// Circuit-breaker counters and the retry budget, carried over from the previous
    /// view like each endpoint's live state.
    pub limits: Arc<ServiceLimits>,
    /// Ejection counters shared by the service's endpoints, carried over too.
    pub outlier: Arc<ServiceOutlier>,
    /// The service takes only mutual TLS (`route mtls SVC strict`): its endpoints
    /// outside the mesh are left out of `endpoints`, and a sidecar without a mesh
    /// certificate answers 503.
    pub mtls_strict: bool,
    /// How many registered endpoints strict mode left out.
    pub outside_mesh: usize,
}

impl ServiceView {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        revision: u64,
        instances: &BTreeMap<String, Arc<Instance>>,
        policy: Option<&Arc<Policy>>,
        previous: Option<&ServiceView>,
        metrics: Option<&Metrics>,
        defaults: &Arc<Resolved>,
        timing: &OutlierConfig,
    ) -> Self {
        let resilience = match policy.map(|p| &p.resilience) {
            Some(r) if !r.is_empty() => Arc::new(defaults.with(r)),
            _ => defaults.clone(),
        };
        let settings = &resilience.settings;
        let outlier = previous.map_or_else(
            || Arc::new(ServiceOutlier::new(&name)),
            |p| p.outlier.clone(),
        );
        let slow_start_ms = millis(settings.slow_start);
        outlier
            .eject_after
            .store(settings.eject_after, Ordering::Relaxed);
        outlier.cap.store(
            ejection_cap(instances.len(), settings.max_ejection_percent),
            Ordering::Relaxed,
        );
        outlier
            .base_ejection_ms
            .store(millis(timing.base_ejection), Ordering::Relaxed);
        outlier
            .max_ejection_ms
            .store(millis(timing.max_ejection), Ordering::Relaxed);
        outlier
            .slow_start_ms
            .store(slow_start_ms, Ordering::Relaxed);

        let kept: HashMap<&str, &Endpoint> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.id.as_str(), e)).collect())
            .unwrap_or_default();
        let now = clock_ms();
        let endpoints: Vec<Endpoint> = instances
            .values()
            .map(|i| {
                let live = match kept.get(i.id.as_str()) {
                    Some(old) => {
                        if old.state != State::Serving && i.state == State::Serving {
                            // Back to SERVING (its own health check passed again): no
                            // longer an outlier, and it ramps up like a new endpoint.
                            if old.live.unject(now) {
                                tracing::info!(service = %name, endpoint = %i.id, "endpoint SERVING again: ejection ended");
                            }
                            old.live.start_ramp(now);
                        }
                        old.live.clone()
                    }
                    None => {
                        let live = Arc::new(LiveState::new(outlier.clone()));
                        // A new endpoint of a service that had endpoints ramps up; the
                        // first set of a service (or of a fresh sidecar) does not: if
                        // every endpoint is new, nobody's share moves anyway.
                        if previous.is_some_and(|p| !p.endpoints.is_empty()) {
                            live.start_ramp(now);
                        }
                        live
                    }
                };
                Endpoint::new(i.clone(), Some(live))
            })
            .collect();
        // Recounted here, so an ejected endpoint that left the catalog frees its place.
        let ejected = endpoints.iter().filter(|e| e.live.is_ejected()).count();
        outlier.ejected.store(
            u32::try_from(ejected).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
        outlier.changed();
        let pool_settings = |label: Arc<str>| PoolSettings {
            panic_below_percent: settings.panic_below_percent,
            slow_start_ms,
            outlier: outlier.clone(),
            label,
        };
        let members: Vec<usize> = (0..endpoints.len()).collect();
        let pool = Pool::of(&endpoints, &members, pool_settings(name.as_str().into()));
        let dns = Arc::new(ServiceRecords::new(
            instances.values().cloned().collect(),
            policy.cloned(),
        ));
        let limits: Arc<ServiceLimits> = previous.map_or_else(Arc::default, |p| p.limits.clone());
        limits
            .conns
            .set_limits(settings.max_connections, settings.max_pending);
        let policy = dns.selection.as_ref().map(|s| {
            CompiledPolicy::compile(&name, s, &endpoints, metrics, |subset| {
                pool_settings(format!("{name}/{subset}").into())
            })
        });
        Self {
            name,
            revision,
            endpoints,
            pool,
            policy,
            dns,
            resilience,
            limits,
            outlier,
            mtls_strict: false,
            outside_mesh: 0,
        }
    }

    /// Every pool of the service: its own and each subset's.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        std::iter::once(&self.pool).chain(
            self.policy
                .iter()
                .flat_map(|p| p.subsets.iter().map(|s| &s.pool)),
        )
    }
}

/// Map of service name to its current view.
pub type Views = HashMap<String, Arc<ServiceView>>;

/// One service's place in the table. A change to the service swaps the view in its
/// slot; only a service appearing or leaving changes the map of slots. So an update to
/// one service costs that service's view, not a copy of every service's entry.
type Slot = ArcSwap<ServiceView>;

/// The map the request path reads: name -> slot. Keys are `Arc<str>`, so the rare copy
/// (a service appearing or leaving) copies pointers, not names. Hashed with foldhash,
/// not SipHash, on every request: the keys are the registry's names, and a caller's
/// Host is only ever looked up, never inserted, so it cannot flood a bucket.
type Slots = HashMap<Arc<str>, Arc<Slot>, foldhash::fast::RandomState>;

/// The table shared by the proxy listeners, the admin port and the discovery client.
pub struct EndpointTable {
    views: ArcSwap<Slots>,
    revision: AtomicU64,
    /// True once a catalog arrived (from the registry or the disk cache).
    loaded: AtomicBool,
    /// True while a watch stream to a registry is open.
    connected: AtomicBool,
    /// When a registry last confirmed the catalog (the stream was open at that time).
    confirmed: Mutex<Option<Instant>>,
    /// The sidecar's resilience defaults, which views of services without overrides
    /// share.
    defaults: Arc<Resolved>,
    /// Ejection timing for every service.
    outlier: OutlierConfig,
    /// The namespace's intentions by destination, as the last watch event left them
    /// (read by the inbound listener; swapped whole). `None` until a registry's
    /// snapshot delivered them.
    intentions: arc_swap::ArcSwapOption<IntentionMap>,
    /// The mesh CA's trust bundle from the watch stream (`None`: not heard yet).
    trust_bundle: arc_swap::ArcSwapOption<String>,
    /// The namespace's feature flags, compiled (`None`: none heard yet, from a registry
    /// or the disk cache). Read by the admin port's OFREP endpoints.
    flags: arc_swap::ArcSwapOption<LoadedFlags>,
    /// The KV entries under the followed prefixes (`--kv-prefix`), swapped whole.
    kv: ArcSwap<KvMap>,
}

/// Key -> entry, for the followed KV prefixes.
pub type KvMap = BTreeMap<String, Arc<switchyard_core::model::kv::KvEntry>>;

/// A flag document as the sidecar evaluates it: compiled once per change.
#[derive(Debug)]
pub struct LoadedFlags {
    pub set: switchyard_core::flags::FlagSet,
    /// The revision that wrote it (the OFREP bulk ETag's base).
    pub revision: u64,
}

impl PartialEq for LoadedFlags {
    fn eq(&self, other: &Self) -> bool {
        self.revision == other.revision && self.set.document() == other.set.document()
    }
}

/// Destination -> every intention it has.
pub type IntentionMap = BTreeMap<String, Arc<[Intention]>>;

impl Default for EndpointTable {
    fn default() -> Self {
        Self::new(ResilienceSettings::default())
    }
}

impl EndpointTable {
    /// An empty table whose views resolve resilience over `defaults`.
    pub fn new(defaults: ResilienceSettings) -> Self {
        Self {
            views: ArcSwap::from_pointee(Slots::default()),
            revision: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            confirmed: Mutex::new(None),
            defaults: Arc::new(Resolved::new(defaults)),
            outlier: OutlierConfig::default(),
            intentions: arc_swap::ArcSwapOption::empty(),
            trust_bundle: arc_swap::ArcSwapOption::empty(),
            flags: arc_swap::ArcSwapOption::empty(),
            kv: ArcSwap::from_pointee(BTreeMap::new()),
        }
    }

    /// The KV entries under the followed prefixes.
    pub fn kv(&self) -> Arc<KvMap> {
        self.kv.load_full()
    }

    pub fn store_kv(&self, kv: Arc<KvMap>) {
        self.kv.store(kv);
    }

    /// The feature flags the registry (or the cache) last gave.
    pub fn flags(&self) -> Option<Arc<LoadedFlags>> {
        self.flags.load_full()
    }

    pub fn store_flags(&self, flags: Arc<LoadedFlags>) {
        self.flags.store(Some(flags));
    }

    /// The namespace's intentions by destination (`None`: not known yet).
    pub fn intentions(&self) -> Option<Arc<IntentionMap>> {
        self.intentions.load_full()
    }

    /// The same without touching the reference count: for the per-request check.
    pub fn intentions_guard(&self) -> arc_swap::Guard<Option<Arc<IntentionMap>>> {
        self.intentions.load()
    }

    pub fn store_intentions(&self, intentions: Arc<IntentionMap>) {
        self.intentions.store(Some(intentions));
    }

    /// The trust bundle the registry last sent.
    pub fn trust_bundle(&self) -> Option<Arc<String>> {
        self.trust_bundle.load_full()
    }

    pub fn store_trust_bundle(&self, bundle: Arc<String>) {
        self.trust_bundle.store(Some(bundle));
    }

    /// This table with `outlier` timing for the views it is given.
    pub fn with_outlier(mut self, outlier: OutlierConfig) -> Self {
        self.outlier = outlier;
        self
    }

    /// Ejection timing for the views built for this table.
    pub fn outlier(&self) -> &OutlierConfig {
        &self.outlier
    }

    /// The sidecar's resilience defaults, resolved.
    pub fn defaults(&self) -> &Arc<Resolved> {
        &self.defaults
    }

    /// The current view of a service: two atomic loads (the map, the slot), no lock.
    pub fn get(&self, service: &str) -> Option<Arc<ServiceView>> {
        self.views.load().get(service).map(|slot| slot.load_full())
    }

    /// Every view, for the admin port and the outlier sweep (not the request path).
    pub fn all(&self) -> Vec<Arc<ServiceView>> {
        self.views
            .load()
            .values()
            .map(|slot| slot.load_full())
            .collect()
    }

    /// How many services the table holds.
    pub fn len(&self) -> usize {
        self.views.load().len()
    }

    /// True when the table holds no service.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the whole table with `views`: services not in it leave.
    pub fn store(&self, views: Views, revision: u64) {
        self.apply(views.into_iter().map(|(k, v)| (k, Some(v))), true, revision);
    }

    /// Applies per-service changes (`None`: the service leaves). With `whole`, the
    /// changes are the whole table and every other service leaves too. One writer at a
    /// time: the discovery client (or a test).
    ///
    /// A service that stays gets its new view stored in its slot; the map of slots is
    /// copied only when a service appears or leaves, and then as pointers. A reader may
    /// see one service at the new revision and another still at the old one for the
    /// moment between two stores, as it could see a view change between two requests.
    pub fn apply(
        &self,
        changes: impl IntoIterator<Item = (String, Option<Arc<ServiceView>>)>,
        whole: bool,
        revision: u64,
    ) {
        let old = self.views.load_full();
        let mut stayed: HashSet<&str> = HashSet::new();
        let mut added: Vec<(Arc<str>, Arc<Slot>)> = Vec::new();
        let mut removed: Vec<&str> = Vec::new();
        for (name, view) in changes {
            match (old.get_key_value(name.as_str()), view) {
                (Some((key, slot)), Some(view)) => {
                    slot.store(view);
                    if whole {
                        stayed.insert(key);
                    }
                }
                (Some((key, _)), None) => removed.push(key),
                (None, Some(view)) => added.push((Arc::from(name), Arc::new(ArcSwap::new(view)))),
                (None, None) => {}
            }
        }
        if whole {
            removed.extend(old.keys().map(|k| &**k).filter(|k| !stayed.contains(k)));
        }
        if !added.is_empty() || !removed.is_empty() {
            let mut map = (*old).clone();
            for name in removed {
                map.remove(name);
            }
            map.extend(added);
            self.views.store(Arc::new(map));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::test_instance;

    #[test]
    fn live_state_survives_a_view_update() {
        let one = |version: &str| -> BTreeMap<String, Arc<Instance>> {
            ["e0", "e1"]
                .iter()
                .map(|id| {
                    (
                        id.to_string(),
                        test_instance(id, version, 100, State::Serving),
                    )
                })
                .collect()
        };
        let defaults = Arc::new(Resolved::new(ResilienceSettings::default()));
        let v1 = ServiceView::new(
            "svc".into(),
            1,
            &one("1"),
            None,
            None,
            None,
            &defaults,
            &OutlierConfig::default(),
        );
        v1.endpoints[0].live.active.store(7, Ordering::Relaxed);
        let v2 = ServiceView::new(
            "svc".into(),
            2,
            &one("2"),
            None,
            Some(&v1),
            None,
            &defaults,
            &OutlierConfig::default(),
        );
        assert_eq!(v2.endpoints[0].live.active(), 7);
        assert_eq!(v2.endpoints[0].version, "2");
        assert!(
            Arc::ptr_eq(&v2.endpoints[1].instance, &v2.dns.instances[1]),
            "DNS and the proxy share one Arc per instance"
        );
    }

    fn view(name: &str, revision: u64) -> Arc<ServiceView> {
        let instances: BTreeMap<String, Arc<Instance>> = [(
            format!("{name}-0"),
            test_instance(&format!("{name}-0"), "1", 100, State::Serving),
        )]
        .into_iter()
        .collect();
        Arc::new(ServiceView::new(
            name.into(),
            revision,
            &instances,
            None,
            None,
            None,
            &Arc::new(Resolved::new(ResilienceSettings::default())),
            &OutlierConfig::default(),
        ))
    }

    #[test]
    fn an_update_to_one_service_swaps_its_slot_and_copies_no_map() {
        let table = EndpointTable::default();
        let names: Vec<String> = (0..1_000).map(|i| format!("svc{i}")).collect();
        table.store(names.iter().map(|n| (n.clone(), view(n, 1))).collect(), 1);
        assert_eq!(table.len(), 1_000);
        let map = table.views.load_full();
        let other = table.get("svc2").expect("svc2");

        // One service changes: its slot gets the new view, the map is the same one.
        table.apply([("svc1".to_string(), Some(view("svc1", 2)))], false, 2);
        assert!(
            Arc::ptr_eq(&map, &table.views.load_full()),
            "the map was copied"
        );
        assert_eq!(table.get("svc1").expect("svc1").revision, 2);
        assert!(Arc::ptr_eq(&other, &table.get("svc2").expect("svc2")));
        assert_eq!(table.revision(), 2);

        // The whole table again with the same services: still no copy.
        table.store(names.iter().map(|n| (n.clone(), view(n, 3))).collect(), 3);
        assert!(Arc::ptr_eq(&map, &table.views.load_full()));
        assert_eq!(table.get("svc999").expect("svc999").revision, 3);

        // A service leaving and one appearing change the map, once each.
        table.apply(
            [
                ("svc0".to_string(), None),
                ("new".to_string(), Some(view("new", 4))),
            ],
            false,
            4,
        );
        assert!(!Arc::ptr_eq(&map, &table.views.load_full()));
        assert!(table.get("svc0").is_none());
        assert_eq!(table.get("new").expect("new").revision, 4);
        assert_eq!(table.len(), 1_000);
        assert_eq!(table.get("svc2").expect("svc2").revision, 3);

        // A whole table without some services removes them.
        table.store(
            [("svc5".to_string(), view("svc5", 5))]
                .into_iter()
                .collect(),
            5,
        );
        assert_eq!(table.len(), 1);
        assert_eq!(table.all().len(), 1);
        assert!(table.get("new").is_none());
        // Removing a service the table does not hold changes nothing.
        let map = table.views.load_full();
        table.apply([("nosuch".to_string(), None)], false, 6);
        assert!(Arc::ptr_eq(&map, &table.views.load_full()));
    }
}
