//! Endpoints as the balancer sees them, and the live state that outlives catalog updates.
//!
//! An [`Endpoint`] holds its instance as the one shared `Arc<Instance>` the sidecar keeps
//! per instance (the discovery catalog, DNS answers and the disk cache hold the same
//! pointer), plus what the request path derives from it once per update.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use switchyard_core::model::{Instance, State};

use crate::metrics::EndpointMetrics;

/// Per-endpoint counters kept beside the immutable views, keyed by endpoint id, so a
/// catalog update that rebuilds a view keeps each endpoint's in-flight count.
#[derive(Debug, Default)]
pub struct LiveState {
    /// Requests (HTTP) or connections (TCP) in flight right now.
    pub active: AtomicU32,
    /// Consecutive failures (connect errors, timeouts, 5xx); reset by a success.
    pub consecutive_failures: AtomicU32,
    /// Outlier ejection: until when (ms on [`clock_ms`]) the balancer skips this
    /// endpoint; 0 when it is not ejected.
    pub ejected_until_ms: AtomicU64,
    /// How often it was ejected: each ejection lasts longer (Envoy's back-off).
    pub ejections: AtomicU32,
    /// Requests or connections sent here since the sidecar started.
    pub total: AtomicU64,
    /// Metric handles, made on the endpoint's first request: a sidecar that knows
    /// 10,000 endpoints but calls a few keeps series (and memory) for those few.
    pub metrics: OnceLock<EndpointMetrics>,
}

impl LiveState {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// One instance of a service, as the proxy routes to it. Derefs to its [`Instance`], so
/// `endpoint.id`, `.version`, `.labels` and `.state` read the shared instance.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub instance: Arc<Instance>,
    /// `host:port` parsed once per catalog update, so building each request's upstream
    /// URI copies a pointer instead of parsing text (`None` if it does not parse).
    pub uri_authority: Option<http::uri::Authority>,
    /// The instance's weight, at least 1 (the balancer divides by it).
    pub weight: u32,
    pub live: Arc<LiveState>,
}

impl Deref for Endpoint {
    type Target = Instance;

    fn deref(&self) -> &Instance {
        &self.instance
    }
}

/// Consecutive failures that eject an endpoint (Envoy's `consecutive_5xx` default).
pub const EJECT_AFTER_FAILURES: u32 = 5;
/// An ejection lasts this long times the number of ejections so far, up to the cap.
pub const BASE_EJECTION: Duration = Duration::from_secs(30);
/// The longest an ejection lasts.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Milliseconds since the first call: the clock ejection deadlines are kept on (1, not
/// 0, at the start, so 0 can mean "not ejected").
pub fn clock_ms() -> u64 {
    clock_ms_at(Instant::now())
}

/// [`clock_ms`] at `t`: lets the request path reuse the `Instant` it already read.
pub fn clock_ms_at(t: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX) + 1
}

impl LiveState {
    /// True while an outlier ejection lasts. Costs one atomic load for an endpoint that
    /// was never ejected (no clock read on the request path).
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && clock_ms() < until
    }
}

impl Endpoint {
    /// The endpoint for `instance`, keeping `live` (the state of the same id in the
    /// previous view) when there is one.
    pub fn new(instance: Arc<Instance>, live: Option<Arc<LiveState>>) -> Self {
        Self {
            uri_authority: authority(&instance).parse().ok(),
            weight: instance.weight.max(1),
            live: live.unwrap_or_default(),
            instance,
        }
    }

    /// Serving endpoints take new traffic; draining and failing ones do not.
    pub fn is_usable(&self) -> bool {
        self.instance.state == State::Serving
    }

    /// `host:port`, with IPv6 literals bracketed, ready for a connector.
    pub fn authority(&self) -> Cow<'_, str> {
        match &self.uri_authority {
            Some(a) => Cow::Borrowed(a.as_str()),
            None => Cow::Owned(authority(&self.instance)),
        }
    }
}

/// `host:port` of an instance, with IPv6 literals bracketed.
pub fn authority(i: &Instance) -> String {
    if i.address.contains(':') {
        format!("[{}]:{}", i.address, i.port)
    } else {
        format!("{}:{}", i.address, i.port)
    }
}

/// Counts one request or connection as active for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard {
    live: Arc<LiveState>,
}

impl ActiveGuard {
    pub fn new(live: Arc<LiveState>) -> Self {
        live.active.fetch_add(1, Ordering::Relaxed);
        live.total.fetch_add(1, Ordering::Relaxed);
        Self { live }
    }

    pub fn succeeded(&self) {
        self.live.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; returns true when this one ejected the endpoint.
    pub fn failed(&self) -> bool {
        let failures = self
            .live
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures < EJECT_AFTER_FAILURES || self.live.is_ejected() {
            return false;
        }
        self.live.consecutive_failures.store(0, Ordering::Relaxed);
        let times = self.live.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let lasts = BASE_EJECTION.saturating_mul(times).min(MAX_EJECTION);
        let lasts_ms = u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX);
        self.live
            .ejected_until_ms
            .store(clock_ms().saturating_add(lasts_ms), Ordering::Relaxed);
        true
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.live.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Instances for unit tests across the crate.
#[cfg(test)]
pub(crate) fn test_instance(id: &str, version: &str, weight: u32, state: State) -> Arc<Instance> {
    Arc::new(Instance {
        namespace: "default".into(),
        service: "svc".into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: 1000,
        version: version.into(),
        labels: std::collections::BTreeMap::from([("track".to_string(), version.to_string())]),
        weight,
        zone: String::new(),
        state,
    })
}
