//! Slow start: a new endpoint (or one back from ejection or FAILING) takes a growing
//! share of traffic over a window instead of its full share at once, so a cold cache or
//! an unwarmed JIT is not flooded the moment it appears.
//!
//! The share follows Envoy's formula: effective weight =
//! `weight × max(min_weight, (t / window)^(1 / aggression))`. The balancer applies it by
//! accepting a drawn endpoint with that probability, so a pick stays O(1) (see
//! `balance`), and not at all when every endpoint of a pool is new: ramping each of them
//! down equally would change nothing but the cost.

/// The least share an endpoint in slow start gets (Envoy's `min_weight_percent`, 10 %):
/// it still sees a little traffic at once, so a broken one shows it early.
pub const MIN_WEIGHT: f64 = 0.1;
/// Envoy's default `aggression`: 1.0 makes the ramp linear; above 1 it climbs faster
/// early on.
pub const AGGRESSION: f64 = 1.0;

/// The share of its weight an endpoint keeps `elapsed_ms` into a `window_ms` ramp.
/// 1.0 once the window is over (or when there is none); never below `min_weight`, never
/// above 1. A bad `aggression` (zero, negative, NaN) counts as 1.
pub fn factor(elapsed_ms: u64, window_ms: u64, aggression: f64, min_weight: f64) -> f64 {
    if window_ms == 0 || elapsed_ms >= window_ms {
        return 1.0;
    }
    let t = elapsed_ms as f64 / window_ms as f64;
    let ramp = if aggression == 1.0 || aggression.is_nan() || aggression <= 0.0 {
        t
    } else {
        t.powf(1.0 / aggression)
    };
    ramp.max(min_weight).min(1.0)
}

/// [`factor`] with Envoy's defaults.
pub fn share(elapsed_ms: u64, window_ms: u64) -> f64 {
    factor(elapsed_ms, window_ms, AGGRESSION, MIN_WEIGHT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_is_envoys_formula_with_a_ten_percent_floor() {
        // Linear with aggression 1: a quarter in, a quarter of the weight.
        assert_eq!(share(250, 1_000), 0.25);
        assert_eq!(share(500, 1_000), 0.5);
        // The floor: at first, and whenever the formula is below it.
        assert_eq!(share(0, 1_000), MIN_WEIGHT);
        assert_eq!(share(50, 1_000), MIN_WEIGHT);
        // Over (or off): the full weight.
        assert_eq!(share(1_000, 1_000), 1.0);
        assert_eq!(share(5_000, 1_000), 1.0);
        assert_eq!(share(0, 0), 1.0);
        // Aggression 2: (t/window)^(1/2), faster early on.
        assert!((factor(250, 1_000, 2.0, 0.1) - 0.5).abs() < 1e-12);
        assert!((factor(640, 1_000, 2.0, 0.1) - 0.8).abs() < 1e-12);
        // Aggression 0.5: (t/window)^2, slower; the floor holds.
        assert!((factor(500, 1_000, 0.5, 0.1) - 0.25).abs() < 1e-12);
        assert_eq!(factor(200, 1_000, 0.5, 0.1), 0.1);
        // Nonsense never panics nor leaves [min, 1].
        for a in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let f = factor(300, 1_000, a, 0.1);
            assert!((0.1..=1.0).contains(&f), "aggression {a}: {f}");
        }
    }

    #[test]
    fn the_ramp_never_falls_as_time_passes() {
        let mut last = 0.0;
        for t in (0..=2_000).step_by(10) {
            let f = share(t, 2_000);
            assert!(f >= last, "{t}: {f} < {last}");
            last = f;
        }
        assert_eq!(last, 1.0);
    }
}
