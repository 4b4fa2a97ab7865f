//! Per-version health from sidecars' reports: a bounded ring of recent time slots per
//! (namespace, service, version), in memory only.
//!
//! Why not the Raft log: the evidence is a stream of counters that is only worth
//! something for minutes, and losing a report costs evidence, never correctness; any
//! node can take reports. In a cluster a follower files what it was sent here (its
//! local view) and hands it on to the leader ([`crate::telemetry_forward`]), so the
//! leader's store holds the cluster's view, which the rollout loop reads
//! ([`TelemetryStore::totals_since`]) and a follower's client-port `Top` asks for.
//!
//! Windows are filed by the registry's clock when they arrive, not by the sidecar's
//! `window_start`: sidecar clocks drift, and a ring indexed by arrival can never be
//! filled from the far future or the far past.
//!
//! Bounds: [`TelemetryLimits`] caps the keys (a new key beyond the cap refuses the whole
//! report with RESOURCE_EXHAUSTED once stale keys are swept), the slots per key, and the
//! entries per report; the gRPC layer caps the message size.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use parking_lot::Mutex;
use switchyard_core::model::{validate_name, validate_namespace, validate_version};
use switchyard_core::telemetry::{quantile_ms, BUCKETS};
use switchyard_proto::v1::{VersionTop, WindowReport};

use crate::metrics::{Metrics, OutcomeLabels, VersionLabels};

/// Length of one slot of the ring.
pub const SLOT_MS: u64 = 5_000;
/// How far back the ring reaches (and the longest `Top` window).
pub const RING_SECONDS: u32 = 300;
/// `Top`'s window when the request names none.
pub const DEFAULT_TOP_SECONDS: u32 = 60;
/// Most (namespace, service, version) keys held at once.
pub const DEFAULT_MAX_KEYS: usize = 10_000;
/// Most entries in one report.
pub const MAX_VERSIONS_PER_REPORT: usize = 1_000;
/// Largest report message accepted (1,000 entries of names and 17 integers fit).
pub const MAX_REPORT_BYTES: usize = 512 * 1024;

/// How much the store may hold.
#[derive(Clone, Copy, Debug)]
pub struct TelemetryLimits {
    pub max_keys: usize,
}

impl Default for TelemetryLimits {
    fn default() -> Self {
        Self {
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// Why a report was refused; the API maps it to a status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    /// A field breaks a rule (INVALID_ARGUMENT).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// New keys would exceed the limit (RESOURCE_EXHAUSTED).
    #[error("the registry already tracks {max} (namespace, service, version) keys; this report adds {new} more")]
    Full { max: usize, new: usize },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ReportError {
    ReportError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

type Key = (String, String, String);

/// Attempts of one version added up over some slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionTotals {
    pub requests: u64,
    pub errors: u64,
    pub slow: u64,
    /// Non-cumulative counts per `core::telemetry` bucket; they sum to `requests`.
    pub buckets: [u64; BUCKETS],
}

impl VersionTotals {
    fn add(&mut self, s: &Slot) {
        self.requests = self.requests.saturating_add(s.requests);
        self.errors = self.errors.saturating_add(s.errors);
        self.slow = self.slow.saturating_add(s.slow);
        for (b, n) in self.buckets.iter_mut().zip(s.buckets) {
            *b = b.saturating_add(n);
        }
    }

    /// The `q` quantile of the latency in milliseconds (linear inside a bucket); `None`
    /// without attempts.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile_ms(&self.buckets, q)
    }

    pub fn p99_ms(&self) -> Option<f64> {
        self.quantile(0.99)
    }
}

/// Counts of one slot of the ring (all reports that arrived in it, added up).
#[derive(Clone, Debug, Default)]
struct Slot {
    index: u64,
    requests: u64,
    errors: u64,
    slow: u64,
    buckets: [u64; BUCKETS],
}

/// One checked entry of a report, ready to add.
struct Entry {
    key: Key,
    requests: u64,
    errors: u64,
    slow: u64,
    buckets: [u64; BUCKETS],
}

/// The ring of every key. One mutex: reports arrive every few seconds per sidecar, and
/// no lock is held across an `.await`.
pub struct TelemetryStore {
    limits: TelemetryLimits,
    epoch: Instant,
    rings: Mutex<HashMap<Key, VecDeque<Slot>>>,
}

impl TelemetryStore {
    pub fn new(limits: TelemetryLimits) -> Self {
        Self {
            limits,
            epoch: Instant::now(),
            rings: Mutex::new(HashMap::new()),
        }
    }

    /// Milliseconds on the store's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The ring slot `now_ms` (on [`Self::now_ms`]'s clock) falls in.
    pub fn current_slot(&self, now_ms: u64) -> u64 {
        now_ms / SLOT_MS
    }

    /// One version's totals over the slots `from_slot <= index < to_slot` (those the
    /// ring still holds; zeros for an unknown version).
    pub fn totals_since(
        &self,
        namespace: &str,
        service: &str,
        version: &str,
        from_slot: u64,
        to_slot: u64,
    ) -> VersionTotals {
        let key = (
            namespace.to_string(),
            service.to_string(),
            version.to_string(),
        );
        let mut sum = VersionTotals::default();
        if let Some(ring) = self.rings.lock().get(&key) {
            for s in ring
                .iter()
                .filter(|s| s.index >= from_slot && s.index < to_slot)
            {
                sum.add(s);
            }
        }
        sum
    }

    /// Checks a whole report, then files it at `now_ms`: all of it or nothing.
    pub fn record(
        &self,
        report: &WindowReport,
        now_ms: u64,
        metrics: &Metrics,
    ) -> Result<(), ReportError> {
        let entries = match check(report) {
            Ok(e) => e,
            Err(e) => {
                count(metrics, "invalid");
                return Err(e);
            }
        };
        let index = now_ms / SLOT_MS;
        let mut rings = self.rings.lock();
        let mut new: Vec<&Key> = entries
            .iter()
            .map(|e| &e.key)
            .filter(|k| !rings.contains_key(*k))
            .collect();
        new.sort();
        new.dedup();
        if rings.len() + new.len() > self.limits.max_keys {
            sweep(&mut rings, index, metrics);
            if rings.len() + new.len() > self.limits.max_keys {
                count(metrics, "full");
                return Err(ReportError::Full {
                    max: self.limits.max_keys,
                    new: new.len(),
                });
            }
        }
        for e in entries {
            let labels = VersionLabels {
                namespace: e.key.0.clone(),
                service: e.key.1.clone(),
                version: e.key.2.clone(),
            };
            metrics
                .telemetry_requests
                .get_or_create(&labels)
                .inc_by(e.requests);
            metrics
                .telemetry_errors
                .get_or_create(&labels)
                .inc_by(e.errors);
            metrics.telemetry_slow.get_or_create(&labels).inc_by(e.slow);
            let ring = rings.entry(e.key).or_default();
            if ring.back().is_none_or(|s| s.index != index) {
                ring.push_back(Slot {
                    index,
                    ..Slot::default()
                });
            }
            while ring.len() > ring_slots() {
                ring.pop_front();
            }
            if let Some(slot) = ring.back_mut() {
                slot.requests = slot.requests.saturating_add(e.requests);
                slot.errors = slot.errors.saturating_add(e.errors);
                slot.slow = slot.slow.saturating_add(e.slow);
                for (b, n) in slot.buckets.iter_mut().zip(e.buckets) {
                    *b = b.saturating_add(n);
                }
            }
        }
        count(metrics, "accepted");
        Ok(())
    }

    /// Per-version totals over the last `window_seconds` (0: the default; at most
    /// [`RING_SECONDS`]), for one namespace and optionally one service, sorted by
    /// service then version. Versions with no attempts in the window are left out.
    pub fn top(
        &self,
        namespace: &str,
        service: Option<&str>,
        window_seconds: u32,
        now_ms: u64,
    ) -> (u32, Vec<VersionTop>) {
        let window = match window_seconds {
            0 => DEFAULT_TOP_SECONDS,
            w => w.min(RING_SECONDS),
        };
        // Slots that started within the window; the current slot is partly filled, so
        // the window reaches back by whole slots from it.
        let slots = u64::from(window).saturating_mul(1000).div_ceil(SLOT_MS);
        let current = now_ms / SLOT_MS;
        let oldest = current.saturating_sub(slots.saturating_sub(1));
        let rings = self.rings.lock();
        let mut out: Vec<VersionTop> = rings
            .iter()
            .filter(|((ns, svc, _), _)| ns == namespace && service.is_none_or(|s| s == svc))
            .filter_map(|((ns, svc, version), ring)| {
                let mut sum = VersionTotals::default();
                for s in ring.iter().filter(|s| s.index >= oldest) {
                    sum.add(s);
                }
                (sum.requests > 0).then(|| VersionTop {
                    namespace: ns.clone(),
                    service: svc.clone(),
                    version: version.clone(),
                    requests: sum.requests,
                    errors: sum.errors,
                    slow: sum.slow,
                    requests_per_second: sum.requests as f64 / f64::from(window),
                    error_rate: sum.errors as f64 / sum.requests as f64,
                    p50_ms: sum.quantile(0.5).unwrap_or(0.0),
                    p99_ms: sum.p99_ms().unwrap_or(0.0),
                })
            })
            .collect();
        drop(rings);
        out.sort_by(|a, b| (&a.service, &a.version).cmp(&(&b.service, &b.version)));
        (window, out)
    }

    /// Keys held (for tests and limits).
    pub fn keys(&self) -> usize {
        self.rings.lock().len()
    }
}

fn ring_slots() -> usize {
    (u64::from(RING_SECONDS) * 1000).div_ceil(SLOT_MS) as usize
}

fn count(metrics: &Metrics, outcome: &'static str) {
    metrics
        .telemetry_reports
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// Forgets keys with nothing inside the ring's reach, and their metric series.
fn sweep(rings: &mut HashMap<Key, VecDeque<Slot>>, index: u64, metrics: &Metrics) {
    let slots = ring_slots() as u64;
    rings.retain(|(ns, svc, version), ring| {
        let keep = ring
            .back()
            .is_some_and(|s| s.index.saturating_add(slots) > index);
        if !keep {
            let labels = VersionLabels {
                namespace: ns.clone(),
                service: svc.clone(),
                version: version.clone(),
            };
            metrics.telemetry_requests.remove(&labels);
            metrics.telemetry_errors.remove(&labels);
            metrics.telemetry_slow.remove(&labels);
        }
        keep
    });
}

/// Every rule a report must meet, checked before any of it is filed.
fn check(report: &WindowReport) -> Result<Vec<Entry>, ReportError> {
    if !(1..=3600).contains(&report.window_seconds) {
        return Err(invalid(
            "window_seconds",
            format!("{} is not 1-3600", report.window_seconds),
        ));
    }
    if report.versions.len() > MAX_VERSIONS_PER_REPORT {
        return Err(invalid(
            "versions",
            format!(
                "{} entries, at most {MAX_VERSIONS_PER_REPORT} per report",
                report.versions.len()
            ),
        ));
    }
    let mut entries = Vec::with_capacity(report.versions.len());
    for (i, v) in report.versions.iter().enumerate() {
        let field = |f: &str| format!("versions[{i}].{f}");
        let namespace = validate_namespace(&field("namespace"), &v.namespace)
            .map_err(|e| invalid(e.field, e.reason))?;
        validate_name(&field("service"), &v.service).map_err(|e| invalid(e.field, e.reason))?;
        validate_version(&field("version"), &v.version).map_err(|e| invalid(e.field, e.reason))?;
        if v.errors > v.requests {
            return Err(invalid(
                field("errors"),
                format!("{} errors is more than {} requests", v.errors, v.requests),
            ));
        }
        if v.slow > v.requests {
            return Err(invalid(
                field("slow"),
                format!("{} slow is more than {} requests", v.slow, v.requests),
            ));
        }
        if v.latency_buckets.len() > BUCKETS {
            return Err(invalid(
                field("latency_buckets"),
                format!("{} buckets, at most {BUCKETS}", v.latency_buckets.len()),
            ));
        }
        let mut buckets = [0u64; BUCKETS];
        let mut sum: u64 = 0;
        for (b, &n) in buckets.iter_mut().zip(&v.latency_buckets) {
            *b = n;
            sum = sum
                .checked_add(n)
                .ok_or_else(|| invalid(field("latency_buckets"), "the counts overflow"))?;
        }
        if sum != v.requests {
            return Err(invalid(
                field("latency_buckets"),
                format!(
                    "the buckets add up to {sum}, not to {} requests",
                    v.requests
                ),
            ));
        }
        entries.push(Entry {
            key: (namespace, v.service.clone(), v.version.clone()),
            requests: v.requests,
            errors: v.errors,
            slow: v.slow,
            buckets,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::VersionStats;

    fn stats(service: &str, version: &str, requests: u64, errors: u64) -> VersionStats {
        let mut latency_buckets = vec![0; BUCKETS];
        latency_buckets[3] = requests;
        VersionStats {
            namespace: String::new(),
            service: service.into(),
            version: version.into(),
            requests,
            errors,
            slow: 0,
            latency_buckets,
        }
    }

    fn report(versions: Vec<VersionStats>) -> WindowReport {
        WindowReport {
            sidecar_id: "t".into(),
            window_start_unix_ms: 0,
            window_seconds: 10,
            versions,
        }
    }

    fn field_of(e: ReportError) -> String {
        match e {
            ReportError::Invalid { field, .. } => field,
            ReportError::Full { .. } => "full".into(),
        }
    }

    #[test]
    fn windows_add_up_per_version_within_the_window() {
        let m = Metrics::default();
        let s = TelemetryStore::new(TelemetryLimits::default());
        s.record(
            &report(vec![
                stats("web", "1.0", 100, 1),
                stats("web", "2.0", 10, 5),
            ]),
            1_000,
            &m,
        )
        .expect("accepted");
        s.record(&report(vec![stats("web", "1.0", 100, 1)]), 12_000, &m)
            .expect("accepted");
        let (w, top) = s.top("default", Some("web"), 0, 13_000);
        assert_eq!(w, 60);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (top[0].version.as_str(), top[0].requests, top[0].errors),
            ("1.0", 200, 2)
        );
        assert_eq!(
            (top[1].version.as_str(), top[1].requests, top[1].errors),
            ("2.0", 10, 5)
        );
        assert!((top[1].error_rate - 0.5).abs() < 1e-9);
        assert!((top[0].p50_ms - 7.5).abs() < 1e-9, "{}", top[0].p50_ms);
        // A 5 s window at 13 s sees only the slot [10 s, 15 s).
        let (_, top) = s.top("default", Some("web"), 5, 13_000);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].requests, 100);
        // Out of reach after the ring's horizon.
        let (_, top) = s.top("default", None, 300, 400_000);
        assert!(top.is_empty());
        assert!(m.encode().contains("switchyard_registry_telemetry_errors_total{namespace=\"default\",service=\"web\",version=\"2.0\"} 5"));
    }

    #[test]
    fn each_rule_refuses_the_whole_report() {
        let m = Metrics::default();
        let s = TelemetryStore::new(TelemetryLimits::default());
        let good = stats("web", "1.0", 10, 1);
        let cases: Vec<(VersionStats, &str)> = vec![
            (stats("web", "1.0", 10, 11), "versions[1].errors"),
            (
                VersionStats {
                    slow: 11,
                    ..stats("web", "1.0", 10, 0)
                },
                "versions[1].slow",
            ),
            (stats("Web_", "1.0", 1, 0), "versions[1].service"),
            (stats("web", "bad version", 1, 0), "versions[1].version"),
            (
                VersionStats {
                    namespace: "-x".into(),
                    ..stats("web", "1.0", 1, 0)
                },
                "versions[1].namespace",
            ),
            (
                VersionStats {
                    latency_buckets: vec![1; BUCKETS + 1],
                    ..stats("web", "1.0", 1, 0)
                },
                "versions[1].latency_buckets",
            ),
            (
                VersionStats {
                    latency_buckets: vec![1],
                    ..stats("web", "1.0", 10, 0)
                },
                "versions[1].latency_buckets",
            ),
            (
                VersionStats {
                    latency_buckets: vec![u64::MAX, 1],
                    ..stats("web", "1.0", 10, 0)
                },
                "versions[1].latency_buckets",
            ),
        ];
        for (bad, field) in cases {
            let e = s
                .record(&report(vec![good.clone(), bad]), 0, &m)
                .expect_err("refused");
            assert_eq!(field_of(e), field);
        }
        let mut r = report(vec![good.clone()]);
        r.window_seconds = 0;
        assert_eq!(
            field_of(s.record(&r, 0, &m).expect_err("refused")),
            "window_seconds"
        );
        let r = report(vec![good; MAX_VERSIONS_PER_REPORT + 1]);
        assert_eq!(
            field_of(s.record(&r, 0, &m).expect_err("refused")),
            "versions"
        );
        // Nothing was half-applied.
        assert_eq!(s.keys(), 0);
    }

    #[test]
    fn totals_since_adds_up_the_slots_of_a_half_open_range() {
        let m = Metrics::default();
        let s = TelemetryStore::new(TelemetryLimits::default());
        assert_eq!(s.current_slot(12_345), 2);
        // Slots 0, 2 and 3; another version in slot 2.
        s.record(&report(vec![stats("web", "1.0", 10, 1)]), 1_000, &m)
            .expect("accepted");
        s.record(
            &report(vec![stats("web", "1.0", 20, 2), stats("web", "2.0", 7, 7)]),
            12_000,
            &m,
        )
        .expect("accepted");
        s.record(&report(vec![stats("web", "1.0", 40, 4)]), 16_000, &m)
            .expect("accepted");
        let t = s.totals_since("default", "web", "1.0", 0, 4);
        assert_eq!((t.requests, t.errors, t.slow), (70, 7, 0));
        assert_eq!(t.buckets[3], 70);
        assert_eq!(t.buckets.iter().sum::<u64>(), t.requests);
        // The end is excluded, the start included.
        let t = s.totals_since("default", "web", "1.0", 2, 3);
        assert_eq!((t.requests, t.errors), (20, 2));
        assert_eq!(
            s.totals_since("default", "web", "1.0", 1, 2),
            VersionTotals::default()
        );
        assert_eq!(s.totals_since("default", "web", "2.0", 0, 10).requests, 7);
        assert_eq!(
            s.totals_since("default", "web", "3.0", 0, 10),
            VersionTotals::default()
        );
        // Every attempt was in bucket 3 (5-10 ms): the p99 lies inside it.
        let p99 = t.p99_ms().expect("attempts");
        assert!(p99 > 5.0 && p99 <= 10.0, "{p99}");
        assert_eq!(VersionTotals::default().quantile(0.5), None);
    }

    #[test]
    fn too_many_keys_is_refused_until_stale_ones_are_swept() {
        let m = Metrics::default();
        let s = TelemetryStore::new(TelemetryLimits { max_keys: 2 });
        s.record(
            &report(vec![stats("a", "1", 1, 0), stats("b", "1", 1, 0)]),
            0,
            &m,
        )
        .expect("accepted");
        // A known key is fine, a third one is not.
        s.record(&report(vec![stats("a", "1", 1, 0)]), 1, &m)
            .expect("accepted");
        let e = s
            .record(&report(vec![stats("c", "1", 1, 0)]), 2, &m)
            .expect_err("refused");
        assert_eq!(e, ReportError::Full { max: 2, new: 1 });
        // Once the old keys are out of the ring's reach, they make room (and their
        // series go).
        s.record(&report(vec![stats("c", "1", 1, 0)]), 400_000, &m)
            .expect("accepted");
        assert_eq!(s.keys(), 1);
        assert!(!m.encode().contains("service=\"a\""));
    }
}
