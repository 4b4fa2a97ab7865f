//! What sidecars and the registry agree on about per-version health reports: the fixed
//! latency buckets, what counts as an error, and how a quantile is read back from the
//! bucket counts.
//!
//! The buckets are fixed (not negotiated per report) so windows from every sidecar add
//! up bucket by bucket, and a report is a handful of integers per version.

/// Upper bounds of the latency buckets, in milliseconds; one more bucket (the last)
/// counts everything above the final bound. Also written in `telemetry.proto`.
pub const LATENCY_BUCKETS_MS: [u64; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Number of buckets in a report: the bounded ones and the overflow bucket.
pub const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// The bucket an attempt of this latency falls in.
pub fn bucket_of(latency_us: u64) -> usize {
    // Bounds are inclusive: 1000 µs falls in the 1 ms bucket.
    LATENCY_BUCKETS_MS
        .iter()
        .position(|&b| latency_us <= b.saturating_mul(1000))
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// An HTTP answer that counts as an error of the endpoint: 5xx only. A 4xx is the
/// caller's mistake, and counting it would blame a canary for bad requests.
pub fn is_error_status(status: u16) -> bool {
    (500..=599).contains(&status)
}

/// gRPC codes that count as an error of the endpoint: UNKNOWN (2), DEADLINE_EXCEEDED
/// (4), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15). Codes such as NOT_FOUND or
/// INVALID_ARGUMENT are answers about the request, not failures of the server.
pub fn is_error_grpc(code: i32) -> bool {
    matches!(code, 2 | 4 | 13 | 14 | 15)
}

/// Estimates the `q` quantile (0..=1) in milliseconds from non-cumulative bucket counts,
/// interpolating linearly inside the bucket that holds it (as Prometheus'
/// `histogram_quantile` does). The overflow bucket answers its lower bound (10 s): the
/// histogram cannot say more. `None` when there are no counts.
pub fn quantile_ms(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().fold(0u64, |a, &b| a.saturating_add(b));
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &count) in buckets.iter().enumerate().take(BUCKETS) {
        let below = seen;
        seen = seen.saturating_add(count);
        if count > 0 && seen as f64 >= rank {
            let lower = if i == 0 { 0 } else { LATENCY_BUCKETS_MS[i - 1] } as f64;
            let Some(&upper) = LATENCY_BUCKETS_MS.get(i) else {
                return Some(lower);
            };
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(lower + (upper as f64 - lower) * within);
        }
    }
    LATENCY_BUCKETS_MS.last().map(|&b| b as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_and_overflow_last() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1_000), 0);
        assert_eq!(bucket_of(1_001), 1);
        assert_eq!(bucket_of(10_000_000), 12);
        assert_eq!(bucket_of(10_000_001), 13);
        assert_eq!(bucket_of(u64::MAX), 13);
    }

    #[test]
    fn errors_are_5xx_and_server_side_grpc_codes() {
        assert!(is_error_status(500) && is_error_status(503) && is_error_status(599));
        assert!(!is_error_status(404) && !is_error_status(429) && !is_error_status(200));
        for c in [2, 4, 13, 14, 15] {
            assert!(is_error_grpc(c), "{c}");
        }
        for c in [0, 1, 3, 5, 7, 8, 9, 12, 16] {
            assert!(!is_error_grpc(c), "{c}");
        }
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket() {
        assert_eq!(quantile_ms(&[0; BUCKETS], 0.5), None);
        // 100 attempts in (50, 100] ms: the median is halfway.
        let mut b = [0u64; BUCKETS];
        b[6] = 100;
        assert_eq!(quantile_ms(&b, 0.5), Some(75.0));
        assert_eq!(quantile_ms(&b, 1.0), Some(100.0));
        // 99 fast, 1 in overflow: p99 is still fast, p100 is the overflow's bound.
        let mut b = [0u64; BUCKETS];
        b[0] = 99;
        b[13] = 1;
        assert!(quantile_ms(&b, 0.99).is_some_and(|v| v <= 1.0));
        assert_eq!(quantile_ms(&b, 1.0), Some(10_000.0));
        // Fewer buckets than BUCKETS are fine.
        assert_eq!(quantile_ms(&[2], 0.5), Some(0.5));
    }
}
