//! A request-latency histogram of atomic buckets.
//!
//! `prometheus_client`'s `Histogram` keeps its buckets behind a mutex, and the proxy
//! observes two histograms per request (the endpoint's and the subset's): two lock
//! round trips on every request, and a contended cache line once several workers serve
//! one endpoint. This one is a fixed array of counters: an observation is three relaxed
//! `fetch_add`s and no lock. It has the same buckets as before (0.5 ms doubling to
//! 16.384 s, then +Inf) and encodes as the same OpenMetrics histogram, so dashboards and
//! alerts see no difference.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Finite buckets: upper bounds 0.5 ms × 2^i.
const BUCKETS: usize = 16;
/// The first upper bound, in nanoseconds.
const FIRST_NS: u64 = 500_000;

/// The upper bounds in seconds, as `exponential_buckets(0.0005, 2.0, 16)` makes them.
fn bounds() -> &'static [f64; BUCKETS] {
    static BOUNDS: std::sync::OnceLock<[f64; BUCKETS]> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut b = [0.0; BUCKETS];
        let mut v = 0.0005;
        for slot in &mut b {
            *slot = v;
            v *= 2.0;
        }
        b
    })
}

#[derive(Debug, Default)]
struct Inner {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; BUCKETS + 1],
    /// The sum of observations in nanoseconds (584 years before it wraps).
    sum_ns: AtomicU64,
}

/// A shared handle: clones observe into the same buckets (as `Histogram`'s do).
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    inner: Arc<Inner>,
}

/// The bucket `seconds` falls in: the first whose upper bound is at least it (+Inf for
/// anything past the last, and for NaN, as Prometheus's own clients do).
fn bucket_of(seconds: f64) -> usize {
    if seconds.is_nan() {
        return BUCKETS;
    }
    let bounds = bounds();
    // A first guess from the integer log2 of the value in half milliseconds, then
    // corrected against the exact bounds, so the result is the same as a linear search.
    let ns = (seconds.max(0.0) * 1e9) as u64;
    let units = ns.div_ceil(FIRST_NS).max(1);
    let mut i = (u64::BITS - (units - 1).leading_zeros()) as usize;
    i = i.min(BUCKETS);
    while i > 0 && seconds <= bounds[i - 1] {
        i -= 1;
    }
    while i < BUCKETS && seconds > bounds[i] {
        i += 1;
    }
    i
}

impl LatencyHistogram {
    /// Records one observation, in seconds.
    pub fn observe(&self, seconds: f64) {
        let i = bucket_of(seconds);
        self.inner.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = (seconds.max(0.0) * 1e9) as u64;
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records one observation.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// How many observations so far.
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = bounds();
        let mut buckets = [(0.0, 0u64); BUCKETS + 1];
        for (i, slot) in buckets.iter_mut().enumerate() {
            let upper = bounds.get(i).copied().unwrap_or(f64::INFINITY);
            *slot = (upper, self.inner.counts[i].load(Ordering::Relaxed));
        }
        // The count is the buckets' sum, so it always agrees with them even while
        // requests are being observed.
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
    use prometheus_client::registry::Registry;

    fn text(metric: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static) -> String {
        let mut registry = Registry::default();
        registry.register("latency", "request latency", metric);
        let mut out = String::new();
        encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn it_encodes_exactly_as_the_mutex_histogram_it_replaces() {
        let ours = LatencyHistogram::default();
        let theirs = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        // Values on and around every bound, below the first and past the last. Sums are
        // whole microseconds so the two sums print alike.
        let mut values = vec![0.0, 0.000_001, 0.000_499, 30.0, 1e6];
        for b in bounds() {
            values.extend([*b, b * 0.999, b * 1.001]);
        }
        for v in &values {
            ours.observe(*v);
            theirs.observe(*v);
        }
        let (ours, theirs) = (text(ours), text(theirs));
        let buckets = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.contains("_bucket") || l.contains("_count"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(buckets(&ours), buckets(&theirs), "{ours}\n{theirs}");
        assert!(ours.contains("# TYPE latency histogram"), "{ours}");
    }

    #[test]
    fn buckets_match_a_linear_search() {
        let bounds = bounds();
        for k in 0..200_000u64 {
            let v = k as f64 * 0.000_1 + (k % 7) as f64 * 1e-9;
            let want = bounds.iter().position(|b| v <= *b).unwrap_or(BUCKETS);
            assert_eq!(bucket_of(v), want, "{v}");
        }
        assert_eq!(bucket_of(f64::NAN), BUCKETS);
        assert_eq!(bucket_of(-1.0), 0);
        assert_eq!(bucket_of(f64::INFINITY), BUCKETS);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = LatencyHistogram::default();
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe((i % 100) as f64 * 0.001 + t as f64 * 0.000_1);
                    }
                });
            }
        });
        assert_eq!(h.count(), 40_000);
        let sum = h.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let want: f64 = (0..4)
            .map(|t| {
                (0..10_000u64)
                    .map(|i| (i % 100) as f64 * 0.001 + t as f64 * 0.000_1)
                    .sum::<f64>()
            })
            .sum();
        assert!((sum - want).abs() < 1e-3, "{sum} vs {want}");
    }
}
