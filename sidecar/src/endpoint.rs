//! Endpoints as the balancer sees them, and the live state that outlives catalog updates.
//!
//! An [`Endpoint`] holds its instance as the one shared `Arc<Instance>` the sidecar keeps
//! per instance (the discovery catalog, DNS answers and the disk cache hold the same
//! pointer), plus what the request path derives from it once per update.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use switchyard_core::model::{Instance, State};

use crate::metrics::EndpointMetrics;
use crate::outlier::{EjectKind, ServiceOutlier};

/// Per-endpoint counters kept beside the immutable views, keyed by endpoint id, so a
/// catalog update that rebuilds a view keeps each endpoint's in-flight count, its
/// ejection and its slow start.
#[derive(Debug, Default)]
pub struct LiveState {
    /// Requests (HTTP) or connections (TCP) in flight right now.
    pub active: AtomicU32,
    /// Consecutive failures (connect errors, timeouts, 5xx); reset by a success.
    pub consecutive_failures: AtomicU32,
    /// Outlier ejection: until when (ms on [`clock_ms`]) the balancer skips this
    /// endpoint; 0 when it is not ejected. Once that time has passed the endpoint is on
    /// probation: it stays ejected until one probe request succeeds.
    pub ejected_until_ms: AtomicU64,
    /// When the probe of a probation was handed out (0: none yet), so exactly one
    /// request at a time is the probe; a claim older than [`PROBE_TIMEOUT_MS`] (its
    /// request vanished without an outcome) may be taken again.
    pub probe_claimed_ms: AtomicU64,
    /// How often it was ejected: each ejection lasts longer (Envoy's back-off).
    pub ejections: AtomicU32,
    /// Slow start: since when (ms on [`clock_ms`]) the endpoint ramps up; 0 when it
    /// takes its full share.
    pub ramp_since_ms: AtomicU64,
    /// Outcomes since the failure-percentage check last looked (it swaps them to 0).
    pub interval_requests: AtomicU32,
    pub interval_failures: AtomicU32,
    /// Requests or connections sent here since the sidecar started.
    pub total: AtomicU64,
    /// The service's shared ejection counters (the cap, the epoch pools watch).
    pub outlier: Arc<ServiceOutlier>,
    /// Metric handles, made on the endpoint's first request: a sidecar that knows
    /// 10,000 endpoints but calls a few keeps series (and memory) for those few. Boxed:
    /// a pointer in every endpoint instead of the handles (48 bytes) in every endpoint.
    pub metrics: OnceLock<Box<EndpointMetrics>>,
}

/// A probe that has not ended this long after it was handed out no longer holds the
/// probation: its request was dropped without an outcome (a caller that went away).
pub const PROBE_TIMEOUT_MS: u64 = 10_000;

/// Whether the balancer may send a request to an endpoint, as far as ejection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Not ejected.
    Serve,
    /// Ejected, or on probation with its probe out.
    Skip,
    /// On probation: this request is its one probe.
    Probe,
}

impl LiveState {
    /// Live state of a new endpoint of the service whose counters are `outlier`.
    pub fn new(outlier: Arc<ServiceOutlier>) -> Self {
        Self {
            outlier,
            ..Self::default()
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// True while ejected or on probation: not usable, for the balancer and panic mode.
    /// One atomic load, no clock read.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether a request may go here. Costs one atomic load for an endpoint that is not
    /// ejected; reads the clock only for an ejected one, and hands out a probation's
    /// probe with one compare-and-swap, so exactly one request is the probe.
    pub fn admit(&self) -> Admit {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return Admit::Serve;
        }
        let now = clock_ms();
        if now < until {
            return Admit::Skip;
        }
        let claimed = self.probe_claimed_ms.load(Ordering::Acquire);
        if claimed != 0 && now.saturating_sub(claimed) < PROBE_TIMEOUT_MS {
            return Admit::Skip;
        }
        match self.probe_claimed_ms.compare_exchange(
            claimed,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Admit::Probe,
            Err(_) => Admit::Skip,
        }
    }

    /// True when the ejection's time is up (the next outcome decides).
    fn on_probation(&self, now: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Acquire);
        until != 0 && now >= until
    }

    /// Ejects the endpoint if the cap allows; a failed probe (`ProbeFailed`) ejects
    /// again, for longer, in the place it already holds. Returns true when it did.
    pub fn eject(&self, kind: EjectKind) -> bool {
        let o = &self.outlier;
        let times = self.ejections.load(Ordering::Relaxed).saturating_add(1);
        let until = clock_ms().saturating_add(o.ejection_ms(times));
        if kind == EjectKind::ProbeFailed {
            let current = self.ejected_until_ms.load(Ordering::Acquire);
            if current == 0
                || self
                    .ejected_until_ms
                    .compare_exchange(current, until, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                return false;
            }
        } else {
            if self.is_ejected() || !o.try_take() {
                return false;
            }
            // Two failures racing to eject: one wins, the other gives its place back.
            if self
                .ejected_until_ms
                .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                o.give_back();
                return false;
            }
        }
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ramp_since_ms.store(0, Ordering::Relaxed);
        self.probe_claimed_ms.store(0, Ordering::Release);
        o.changed();
        true
    }

    /// Ends an ejection (a probe succeeded, or the catalog says SERVING again) and
    /// starts slow start. Returns true when it was ejected.
    pub fn unject(&self, now: u64) -> bool {
        let until = self.ejected_until_ms.swap(0, Ordering::AcqRel);
        if until == 0 {
            return false;
        }
        self.probe_claimed_ms.store(0, Ordering::Release);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.outlier.give_back();
        self.start_ramp(now);
        self.outlier.changed();
        true
    }

    /// Starts slow start at `now` when the service has a window.
    pub fn start_ramp(&self, now: u64) {
        if self.outlier.slow_start_ms.load(Ordering::Relaxed) > 0 {
            self.ramp_since_ms.store(now.max(1), Ordering::Relaxed);
        }
    }

    /// The share of its weight the endpoint takes at `now` over a `window_ms` ramp (1.0
    /// when it is not ramping; a finished ramp is forgotten).
    pub fn ramp(&self, now: u64, window_ms: u64) -> f64 {
        let since = self.ramp_since_ms.load(Ordering::Relaxed);
        if since == 0 {
            return 1.0;
        }
        let elapsed = now.saturating_sub(since);
        if elapsed >= window_ms {
            let _ =
                self.ramp_since_ms
                    .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed);
            return 1.0;
        }
        crate::slow_start::share(elapsed, window_ms)
    }

    /// True while ramping at `now` over `window_ms`.
    pub fn is_ramping(&self, now: u64, window_ms: u64) -> bool {
        let since = self.ramp_since_ms.load(Ordering::Relaxed);
        since != 0 && now.saturating_sub(since) < window_ms
    }

    /// Counts a success: ends a probation. `id` is the endpoint's, for the log line
    /// (not kept here: a copy of every endpoint's id in its live state was 32 bytes
    /// each for the one line that needs it).
    fn success(&self, id: &str) {
        self.interval_requests.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            let now = clock_ms();
            if self.on_probation(now) && self.unject(now) {
                tracing::info!(
                    service = %self.outlier.service,
                    endpoint = %id,
                    ejections = self.ejections.load(Ordering::Relaxed),
                    "probe succeeded: endpoint back from ejection"
                );
            }
        }
    }

    /// Counts a failure; returns the ejection it caused, if any.
    fn failure(&self) -> Option<EjectKind> {
        self.interval_requests.fetch_add(1, Ordering::Relaxed);
        self.interval_failures.fetch_add(1, Ordering::Relaxed);
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            // Ejected: only a failed probe matters (it ejects again, for longer).
            return (self.on_probation(clock_ms()) && self.eject(EjectKind::ProbeFailed))
                .then_some(EjectKind::ProbeFailed);
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.outlier.eject_after.load(Ordering::Relaxed).max(1) {
            return None;
        }
        self.eject(EjectKind::Consecutive)
            .then_some(EjectKind::Consecutive)
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
    /// `host:mesh_port` when the instance is in the mesh (the sidecar beside it serves
    /// mutual TLS there), parsed once per update like `uri_authority`. Boxed: most
    /// endpoints of a large catalog have none, and a pointer is a quarter of the size.
    pub mesh_authority: Option<Box<http::uri::Authority>>,
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

impl Endpoint {
    /// The endpoint for `instance`, keeping `live` (the state of the same id in the
    /// previous view) when there is one.
    pub fn new(instance: Arc<Instance>, live: Option<Arc<LiveState>>) -> Self {
        Self {
            uri_authority: authority(&instance).parse().ok(),
            mesh_authority: (instance.mesh_port != 0)
                .then(|| {
                    host_port(&instance.address, instance.mesh_port)
                        .parse()
                        .ok()
                        .map(Box::new)
                })
                .flatten(),
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
    host_port(&i.address, i.port)
}

/// `host:port`, with an IPv6 literal bracketed.
pub fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// Counts one request or connection as active for as long as it lives, and books its
/// outcome (consecutive failures, the failure-percentage interval, probation).
#[derive(Debug)]
pub struct ActiveGuard {
    live: Arc<LiveState>,
    /// Set once an outcome is booked: a guard dropped without one (the caller went
    /// away) gives a probation's probe back, so the next request can probe.
    booked: AtomicBool,
}

impl ActiveGuard {
    pub fn new(live: Arc<LiveState>) -> Self {
        live.active.fetch_add(1, Ordering::Relaxed);
        live.total.fetch_add(1, Ordering::Relaxed);
        Self {
            live,
            booked: AtomicBool::new(false),
        }
    }

    /// Books a success of endpoint `id`: resets the consecutive failures; a probe's
    /// success ends the ejection.
    pub fn succeeded(&self, id: &str) {
        if !self.booked.swap(true, Ordering::Relaxed) {
            self.live.success(id);
        }
    }

    /// Books a failure; returns the ejection it caused (the caller counts it).
    pub fn failed(&self) -> Option<EjectKind> {
        if self.booked.swap(true, Ordering::Relaxed) {
            return None;
        }
        self.live.failure()
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.live.active.fetch_sub(1, Ordering::Relaxed);
        if !*self.booked.get_mut() && self.live.probe_claimed_ms.load(Ordering::Relaxed) != 0 {
            self.live.probe_claimed_ms.store(0, Ordering::Release);
        }
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
        labels: switchyard_core::model::Labels::from([("track".to_string(), version.to_string())]),
        weight,
        zone: String::new(),
        state,
        mesh_port: 0,
    })
}
