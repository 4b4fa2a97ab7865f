//! What a rollout learns from one evaluation window of telemetry, and what it concludes.
//!
//! Counts are per attempt and attributed to the endpoint that answered (the sidecars
//! report them so). Slow means slower than the spec's latency SLO or, without one, than
//! the baseline's p95 of the previous window; both versions are counted against the same
//! threshold, rounded up to a histogram bucket edge, so under "no regression" a slow
//! attempt is the canary's with probability ρ and the sequential test stays valid.

use switchyard_core::telemetry::LATENCY_BUCKETS_MS;

use crate::model::rollout::{Counts, Rollout, RolloutStatus};
use crate::telemetry::VersionTotals;
use switchyard_core::gate::Window;

/// Attempts in buckets wholly above `threshold_ms` (rounded up to a bucket edge); 0 when
/// there is no threshold.
pub fn slow_count(t: &VersionTotals, threshold_ms: f64) -> u64 {
    if threshold_ms.is_nan() || threshold_ms <= 0.0 {
        return 0;
    }
    // The first bucket edge at or above the threshold; attempts above it are slow.
    let Some(edge) = LATENCY_BUCKETS_MS
        .iter()
        .position(|&b| b as f64 >= threshold_ms)
    else {
        return 0;
    };
    t.buckets.iter().skip(edge + 1).sum()
}

/// The slow threshold of the next window, in milliseconds (0: none yet).
pub fn slow_threshold(r: &Rollout) -> f64 {
    if r.spec.latency_slo_ms > 0 {
        r.spec.latency_slo_ms as f64
    } else {
        r.status.baseline_p95_ms
    }
}

/// The status after one window's totals of the canary and the baseline.
pub fn fold(r: &Rollout, canary: &VersionTotals, baseline: &VersionTotals) -> RolloutStatus {
    let threshold = slow_threshold(r);
    let c = Counts {
        requests: canary.requests,
        errors: canary.errors.min(canary.requests),
        slow: slow_count(canary, threshold),
    };
    let b = Counts {
        requests: baseline.requests,
        errors: baseline.errors.min(baseline.requests),
        slow: slow_count(baseline, threshold),
    };
    let mut s = r.status.clone();
    s.canary.add(c);
    s.baseline.add(b);
    s.step_canary.add(c);
    s.step_baseline.add(b);
    let mut errors = r.error_evidence();
    errors.observe(Window::new(c.requests, b.requests, c.errors, b.errors));
    s.error_log_lambda = errors.log_lambda;
    if threshold > 0.0 {
        let mut slow = r.slow_evidence();
        slow.observe(Window::new(c.requests, b.requests, c.slow, b.slow));
        s.slow_log_lambda = slow.log_lambda;
    }
    if let Some(p) = canary.p99_ms() {
        s.canary_p99_ms = p;
    }
    if let Some(p) = baseline.p99_ms() {
        s.baseline_p99_ms = p;
    }
    if let Some(p) = baseline.quantile(0.95) {
        s.baseline_p95_ms = p;
    }
    s
}

/// Why the evidence says to abort, if it does: a sequential test that rejected, or
/// an absolute gate broken once the step's floor of canary requests is met.
pub fn abort_reason(r: &Rollout) -> Option<String> {
    let alpha = r.spec.alpha;
    let errors = r.error_evidence();
    if errors.rejects(alpha) {
        return Some(format!(
            "the canary's errors are worse than the baseline's: E = {:.1} >= 1/alpha = {:.0} ({} of {} canary requests failed, {} of {} baseline)",
            errors.e_value(),
            1.0 / alpha,
            r.status.canary.errors,
            r.status.canary.requests,
            r.status.baseline.errors,
            r.status.baseline.requests
        ));
    }
    let slow = r.slow_evidence();
    if slow.rejects(alpha) {
        return Some(format!(
            "the canary is slower than the baseline: E = {:.1} >= 1/alpha = {:.0} ({} of {} canary requests slow, {} of {} baseline)",
            slow.e_value(),
            1.0 / alpha,
            r.status.canary.slow,
            r.status.canary.requests,
            r.status.baseline.slow,
            r.status.baseline.requests
        ));
    }
    if r.status.step_canary.requests >= r.spec.min_requests {
        if let Some(max) = r.spec.max_error_rate {
            let rate = r.status.step_canary.error_rate();
            if rate > max {
                return Some(format!(
                    "the canary's error rate {:.2}% is above --max-error-rate {:.2}%",
                    rate * 100.0,
                    max * 100.0
                ));
            }
        }
        if let Some(max) = r.spec.max_p99_ms {
            if r.status.canary_p99_ms > max as f64 {
                return Some(format!(
                    "the canary's p99 {:.0} ms is above --max-p99 {max} ms",
                    r.status.canary_p99_ms
                ));
            }
        }
    }
    None
}

/// Whether the current step has the traffic it needs (a step at weight 0 sends the
/// canary nothing, so it needs none).
pub fn enough_traffic(r: &Rollout) -> bool {
    r.status.weight == 0 || r.status.step_canary.requests >= r.spec.min_requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rollout::{RolloutSpec, RolloutStatus};

    fn totals(requests: u64, errors: u64, slow_bucket: usize, slow: u64) -> VersionTotals {
        let mut t = VersionTotals {
            requests,
            errors,
            ..Default::default()
        };
        t.buckets[3] = requests - slow;
        t.buckets[slow_bucket] += slow;
        t
    }

    fn rollout() -> Rollout {
        Rollout {
            namespace: "default".into(),
            service: "web".into(),
            spec: RolloutSpec {
                baseline: "1.0.0".into(),
                latency_slo_ms: 100,
                ..RolloutSpec::new("2.0.0")
            },
            status: RolloutStatus::pending(1, 0, 0),
        }
    }

    #[test]
    fn slow_counts_use_the_bucket_edge_at_or_above_the_threshold() {
        // Buckets: ..., 7 is (100, 250] ms. A 100 ms SLO counts buckets above 100 ms.
        let t = totals(100, 0, 7, 10);
        assert_eq!(slow_count(&t, 100.0), 10);
        assert_eq!(slow_count(&t, 90.0), 10);
        assert_eq!(slow_count(&t, 250.0), 0);
        assert_eq!(slow_count(&t, 0.0), 0);
    }

    /// The vector (100, 1000, 5, 2) aborts; (100, 1000, 3, 2) does not.
    #[test]
    fn the_gate_vectors_decide_through_fold() {
        let r = rollout();
        let mut pass = r.clone();
        pass.status = fold(&r, &totals(100, 3, 3, 0), &totals(1000, 2, 3, 0));
        assert!(abort_reason(&pass).is_none());
        assert!((pass.error_evidence().e_value() - 19.29).abs() < 0.05);
        let mut fail = r.clone();
        fail.status = fold(&r, &totals(100, 5, 3, 0), &totals(1000, 2, 3, 0));
        let why = abort_reason(&fail).expect("aborts");
        assert!(why.contains("errors are worse"), "{why}");
    }

    #[test]
    fn slow_canaries_abort_and_absolute_gates_wait_for_the_floor() {
        let r = rollout();
        let mut slow = r.clone();
        slow.status = fold(&r, &totals(200, 0, 7, 40), &totals(2000, 0, 7, 20));
        assert!(abort_reason(&slow).expect("slow").contains("slower"));

        let mut gated = rollout();
        gated.spec.max_error_rate = Some(0.01);
        gated.spec.tolerance = 100.0;
        let mut under = gated.clone();
        under.status = fold(&gated, &totals(50, 2, 3, 0), &totals(50, 1, 3, 0));
        assert!(abort_reason(&under).is_none(), "below the floor of 100");
        let mut over = gated.clone();
        over.status = fold(&gated, &totals(150, 3, 3, 0), &totals(150, 2, 3, 0));
        assert!(abort_reason(&over)
            .expect("gate")
            .contains("max-error-rate"));
    }
}
