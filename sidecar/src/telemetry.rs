//! Per-version health for the registry: what each upstream attempt of the proxy saw,
//! counted per (service, version) of the endpoint that answered, and a reporter that
//! sends the deltas once per window (`switchyard.v1.Telemetry/Report`).
//!
//! Counted per attempt, not per request: a canary's 503 that a retry to stable hides
//! from the caller is still a canary error, which is what a rollout must see.
//!
//! Cost on the request path: one `ArcSwap` load and two hash lookups by `&str`, then a
//! few relaxed atomic adds. A (service, version) seen for the first time takes a mutex
//! to publish a new map (once per version, not per request). The map is bounded
//! ([`MAX_KEYS`]); beyond it attempts go uncounted (and counted as dropped).
//!
//! A window that cannot be sent is dropped: lost evidence, never a blocked proxy. Its
//! attempts are counted in `switchyard_sidecar_telemetry_dropped_total{reason="unsent"}`
//! (and those beyond the key bound under `reason="keys"`). On graceful shutdown the
//! last, partial window is sent once the proxies have drained, so the attempts of a
//! sidecar stopped right after traffic still reach the registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use switchyard_core::telemetry::{bucket_of, is_error_grpc, is_error_status, BUCKETS};
use switchyard_proto::v1::telemetry_client::TelemetryClient;
use switchyard_proto::v1::{VersionStats, WindowReport};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// Default length of a report window.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default latency above which an attempt counts as slow.
pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_secs(1);
/// Most (service, version) pairs counted at once.
pub const MAX_KEYS: usize = 4_096;
/// Entries per report message (the registry's limit); more go in further messages of
/// the same stream.
const MAX_VERSIONS_PER_REPORT: usize = 1_000;
/// Time one report may take before its window is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How the sidecar reports.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Window length; zero disables reporting (the counting stays, it is cheap).
    pub interval: Duration,
    /// An attempt slower than this (to its response head) counts as slow.
    pub slow_threshold: Duration,
    /// Names this sidecar in the registry's logs.
    pub sidecar_id: String,
    /// ACL token secret for the registry (`None`: none sent). Never logged.
    pub token: Option<String>,
    /// Plain TCP for `http://` registries, TLS with `--ca-file` for `https://`.
    pub transport: switchyard_tls::Transport,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            slow_threshold: DEFAULT_SLOW_THRESHOLD,
            sidecar_id: format!("sidecar-{}", std::process::id()),
            token: None,
            transport: switchyard_tls::Transport::plain(),
        }
    }
}

/// Totals since start for one (service, version); the reporter sends differences.
#[derive(Default)]
struct Counters {
    errors: AtomicU64,
    slow: AtomicU64,
    /// Non-cumulative counts per `core::telemetry` bucket; their sum is the requests.
    buckets: [AtomicU64; BUCKETS],
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Totals {
    errors: u64,
    slow: u64,
    buckets: [u64; BUCKETS],
}

impl Counters {
    fn read(&self) -> Totals {
        // Errors and slow first, buckets after: an attempt adds its bucket first, so a
        // counted error always has its request counted (the reporter clamps the rest).
        let errors = self.errors.load(Ordering::Relaxed);
        let slow = self.slow.load(Ordering::Relaxed);
        let mut buckets = [0; BUCKETS];
        for (b, c) in buckets.iter_mut().zip(&self.buckets) {
            *b = c.load(Ordering::Relaxed);
        }
        Totals {
            errors,
            slow,
            buckets,
        }
    }
}

/// Service -> version -> counters, read on every response. foldhash, not SipHash: the
/// keys are the registry's names (of services routed to), never a caller's.
type Map = HashMap<String, Versions, foldhash::fast::RandomState>;
type Versions = HashMap<String, Arc<Counters>, foldhash::fast::RandomState>;

/// The per-version counters the proxy writes to.
pub struct Recorder {
    namespace: String,
    slow_us: u64,
    map: ArcSwap<Map>,
    /// Serialises publishing a new map (first sight of a version).
    grow: Mutex<()>,
    /// Attempts not counted (over [`MAX_KEYS`]); shared with the metrics when given.
    dropped: Counter,
}

impl Recorder {
    pub fn new(namespace: &str, slow_threshold: Duration) -> Self {
        Self {
            namespace: namespace.to_string(),
            slow_us: u64::try_from(slow_threshold.as_micros()).unwrap_or(u64::MAX),
            map: ArcSwap::from_pointee(Map::default()),
            grow: Mutex::new(()),
            dropped: Counter::default(),
        }
    }

    /// Counts attempts dropped over the key bound in `counter` (a metric's).
    pub fn with_dropped_counter(mut self, counter: Counter) -> Self {
        self.dropped = counter;
        self
    }

    /// Books one attempt against the version of the endpoint that answered it.
    pub fn attempt(&self, service: &str, version: &str, error: bool, latency: Duration) {
        let Some(c) = self.counters(service, version) else {
            self.dropped.inc();
            return;
        };
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = c.buckets.get(bucket_of(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        if error {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        if us > self.slow_us {
            c.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Books an HTTP answer: an error when 5xx, or when a gRPC status in the head (a
    /// trailers-only answer) is one of the server-side codes. A gRPC status sent in
    /// trailers after messages is booked by a [`LateStatus`] the body holds.
    pub fn response(
        &self,
        service: &str,
        version: &str,
        status: u16,
        headers: &http::HeaderMap,
        latency: Duration,
    ) {
        // A static name: a `&str` key would be parsed and lower-cased per response.
        static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
        let grpc_error = headers
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i32>().ok())
            .is_some_and(is_error_grpc);
        self.attempt(
            service,
            version,
            is_error_status(status) || grpc_error,
            latency,
        );
    }

    /// For a gRPC answer whose status comes in trailers (after messages): a handle
    /// that books one more error when those trailers carry a server-side code. The
    /// attempt itself was booked by [`Recorder::response`] with its head.
    pub fn late_status(&self, service: &str, version: &str) -> Option<LateStatus> {
        self.counters(service, version).map(LateStatus)
    }

    /// Attempts that went uncounted because [`MAX_KEYS`] versions are counted already.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    fn counters(&self, service: &str, version: &str) -> Option<Arc<Counters>> {
        if let Some(c) = self.map.load().get(service).and_then(|m| m.get(version)) {
            return Some(c.clone());
        }
        let _grow = self.grow.lock();
        let current = self.map.load_full();
        if let Some(c) = current.get(service).and_then(|m| m.get(version)) {
            return Some(c.clone());
        }
        let keys: usize = current.values().map(HashMap::len).sum();
        if keys >= MAX_KEYS {
            return None;
        }
        let mut next = Map::clone(&current);
        let c = Arc::new(Counters::default());
        next.entry(service.to_string())
            .or_default()
            .insert(version.to_string(), c.clone());
        self.map.store(Arc::new(next));
        Some(c)
    }

    /// The differences since `last` (which is updated), as report entries; versions
    /// with no attempts are left out.
    fn deltas(&self, last: &mut HashMap<(String, String), Totals>) -> Vec<VersionStats> {
        let map = self.map.load();
        let mut out = Vec::new();
        for (service, versions) in map.iter() {
            for (version, c) in versions {
                let now = c.read();
                let before = last.insert((service.clone(), version.clone()), now);
                let before = before.unwrap_or_default();
                let mut buckets = vec![0u64; BUCKETS];
                for (d, (n, b)) in buckets
                    .iter_mut()
                    .zip(now.buckets.iter().zip(before.buckets))
                {
                    *d = n.saturating_sub(b);
                }
                let requests: u64 = buckets.iter().sum();
                if requests == 0 {
                    continue;
                }
                out.push(VersionStats {
                    namespace: self.namespace.clone(),
                    service: service.clone(),
                    version: version.clone(),
                    requests,
                    errors: now.errors.saturating_sub(before.errors).min(requests),
                    slow: now.slow.saturating_sub(before.slow).min(requests),
                    latency_buckets: buckets,
                });
            }
        }
        out
    }
}

/// See [`Recorder::late_status`]; held by the response body until its trailers.
pub struct LateStatus(Arc<Counters>);

impl LateStatus {
    /// Reads `grpc-status` from the trailers; an error code counts against the version.
    pub fn trailers(self, trailers: &http::HeaderMap) {
        let error = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i32>().ok())
            .is_some_and(is_error_grpc);
        if error {
            self.0.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends one report per window until `stop`, to the registries in turn: a failed send
/// drops that window (its attempts counted in `unsent`) and moves to the next registry
/// for the next one. On `stop` the last, partial window is sent (once, bounded by the
/// send timeout): the caller sets it after the proxies drained.
pub async fn run(
    config: TelemetryConfig,
    registries: Vec<String>,
    recorder: Arc<Recorder>,
    unsent: Counter,
    mut stop: watch::Receiver<bool>,
) {
    if config.interval.is_zero() || registries.is_empty() {
        return;
    }
    let window_seconds = u32::try_from(config.interval.as_secs().max(1)).unwrap_or(3600);
    let mut last = HashMap::new();
    let mut next = 0usize;
    let mut channel: Option<Channel> = None;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut window_start = unix_ms();
    loop {
        let last_window = tokio::select! {
            _ = tick.tick() => false,
            _ = crate::stopped(&mut stop) => true,
        };
        let versions = recorder.deltas(&mut last);
        let start = std::mem::replace(&mut window_start, unix_ms());
        if versions.is_empty() {
            if last_window {
                return;
            }
            continue;
        }
        let attempts: u64 = versions.iter().map(|v| v.requests).sum();
        let reports: Vec<WindowReport> = versions
            .chunks(MAX_VERSIONS_PER_REPORT)
            .map(|chunk| WindowReport {
                sidecar_id: config.sidecar_id.clone(),
                window_start_unix_ms: start,
                window_seconds,
                versions: chunk.to_vec(),
            })
            .collect();
        let url = &registries[next % registries.len()];
        let sent =
            tokio::time::timeout(SEND_TIMEOUT, send(url, &mut channel, reports, &config)).await;
        let failure = match sent {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {SEND_TIMEOUT:?}")),
        };
        if let Some(e) = failure {
            tracing::debug!(registry = %url, error = %e, attempts, "telemetry window dropped");
            unsent.inc_by(attempts);
            channel = None;
            next = next.wrapping_add(1);
        }
        if last_window {
            return;
        }
    }
}

async fn send(
    url: &str,
    channel: &mut Option<Channel>,
    reports: Vec<WindowReport>,
    config: &TelemetryConfig,
) -> Result<(), String> {
    let token = config.token.as_deref();
    let ch = match channel {
        Some(c) => c.clone(),
        None => {
            config.transport.check(url).map_err(|e| e.0)?;
            let endpoint = Endpoint::from_shared(url.to_string())
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2));
            let c = config
                .transport
                .connect(endpoint)
                .await
                .map_err(|e| switchyard_tls::client::explain(&e))?;
            *channel = Some(c.clone());
            c
        }
    };
    let mut client = TelemetryClient::new(ch);
    client
        .report(crate::authorized(tokio_stream::iter(reports), token))
        .await
        .map(|_| ())
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_per_version_and_per_window() {
        let r = Recorder::new("default", Duration::from_millis(100));
        r.attempt("web", "1.0", false, Duration::from_millis(3));
        r.attempt("web", "2.0", true, Duration::from_millis(300));
        let mut h = http::HeaderMap::new();
        r.response("web", "2.0", 404, &h, Duration::ZERO);
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        r.response("web", "2.0", 200, &h, Duration::ZERO);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        r.response("web", "2.0", 200, &h, Duration::ZERO);
        let mut last = HashMap::new();
        let mut d = r.deltas(&mut last);
        d.sort_by(|a, b| a.version.cmp(&b.version));
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].requests, d[0].errors, d[0].slow), (1, 0, 0));
        assert_eq!(d[0].latency_buckets[2], 1);
        // A 404 and NOT_FOUND are not errors; UNAVAILABLE and the 300 ms attempt are.
        assert_eq!((d[1].requests, d[1].errors, d[1].slow), (4, 2, 1));
        // Nothing new: nothing to report.
        assert!(r.deltas(&mut last).is_empty());
        r.attempt("web", "1.0", true, Duration::from_millis(3));
        let d = r.deltas(&mut last);
        assert_eq!((d.len(), d[0].requests, d[0].errors), (1, 1, 1));
    }

    #[test]
    fn versions_beyond_the_bound_are_dropped_not_counted() {
        let r = Recorder::new("default", Duration::from_secs(1));
        for i in 0..MAX_KEYS + 3 {
            r.attempt("web", &format!("v{i}"), false, Duration::ZERO);
        }
        assert_eq!(r.dropped(), 3);
    }
}
