//! Least-request balancing with Envoy's semantics.
//!
//! - All usable endpoints share one weight: power of two choices. Sample `choice_count`
//!   endpoints at random; the one with fewer active requests wins.
//! - Weights differ: pick at random in proportion to the effective weight
//!   `weight / (active + 1)^bias`, so a loaded endpoint's share shrinks smoothly and
//!   `bias = 0` degrades to plain weighted random.
//!
//! Draining and failing endpoints are never picked (the view lists only usable ones).
//! Ejected outliers (see `endpoint::ActiveGuard::failed`) are passed over while the
//! draws find another endpoint; when nearly all are ejected, one serves anyway (panic
//! mode, so a bad moment never turns into no endpoint at all).
//! The load signal (`active`) lives in each endpoint's `LiveState`, apart from the
//! selection, as in linkerd2-proxy.

use crate::endpoint::Endpoint;

/// Balancer settings; both have Envoy's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LbConfig {
    /// Endpoints sampled per pick when weights are equal (2 = power of two choices).
    pub choice_count: u32,
    /// Exponent on `active + 1` when weights differ; 1.0 = divide by in-flight + 1.
    pub active_request_bias: f64,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            choice_count: 2,
            active_request_bias: 1.0,
        }
    }
}

impl LbConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=100).contains(&self.choice_count) {
            return Err(format!(
                "choice_count must be 1-100, got {}",
                self.choice_count
            ));
        }
        if !(0.0..=10.0).contains(&self.active_request_bias) {
            return Err(format!(
                "active_request_bias must be 0.0-10.0, got {}",
                self.active_request_bias
            ));
        }
        Ok(())
    }
}

/// Most draws one weighted pick makes before it settles for the least loaded endpoint
/// it drew. Each draw is accepted with probability `1 / (active + 1)^bias`, so at low
/// load the first draw almost always wins; the bound keeps a pick O(1) when every
/// endpoint is busy.
const MAX_WEIGHTED_DRAWS: u32 = 16;

/// The endpoints one pick chooses among (a service's usable endpoints, or one subset's),
/// with what the balancer needs precomputed: built once per catalog update so a pick
/// never scans the list.
#[derive(Debug, Default)]
pub struct Pool {
    /// Indices into the view's endpoints.
    pub usable: Vec<usize>,
    /// True when every usable endpoint has the same weight (power of two choices).
    pub equal_weights: bool,
    /// Draws a position in `usable` in proportion to weight (only when weights differ).
    alias: Alias,
}

impl Pool {
    pub fn new(endpoints: &[Endpoint], usable: Vec<usize>) -> Self {
        let equal_weights = usable
            .windows(2)
            .all(|w| endpoints[w[0]].weight == endpoints[w[1]].weight);
        let alias = if equal_weights {
            Alias::default()
        } else {
            Alias::new(usable.iter().map(|&i| endpoints[i].weight))
        };
        Self {
            usable,
            equal_weights,
            alias,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.usable.is_empty()
    }
}

/// Walker's alias table (Vose's construction): an O(1) draw in proportion to fixed
/// weights, one uniform index and one coin per draw.
#[derive(Debug, Default)]
struct Alias {
    /// Per slot, the chance (scaled to 2^32) that the slot keeps its own index.
    keep: Vec<u64>,
    /// Per slot, the index drawn when the slot does not keep its own.
    other: Vec<u32>,
}

impl Alias {
    fn new(weights: impl ExactSizeIterator<Item = u32>) -> Self {
        let n = weights.len();
        let weights: Vec<u64> = weights.map(u64::from).collect();
        let total: u64 = weights.iter().sum();
        if n == 0 || total == 0 {
            return Self::default();
        }
        // Scaled so the average slot is exactly 2^32: slot i holds n * w_i / total.
        const ONE: u128 = 1 << 32;
        let mut scaled: Vec<u128> = weights
            .iter()
            .map(|&w| u128::from(w) * n as u128 * ONE / u128::from(total))
            .collect();
        let mut keep = vec![ONE as u64; n];
        let mut other: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < ONE);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = scaled[s] as u64;
            other[s] = l as u32;
            scaled[l] = (scaled[l] + scaled[s]).saturating_sub(ONE);
            if scaled[l] < ONE {
                large.pop();
                small.push(l);
            }
        }
        // Whatever is left (rounding) keeps its own index: keep[i] stays 2^32.
        Self { keep, other }
    }

    /// A position in `0..n`, or `None` for an empty table.
    fn draw(&self, rng: &mut fastrand::Rng) -> Option<usize> {
        let n = self.keep.len();
        if n == 0 {
            return None;
        }
        let slot = rng.usize(..n);
        if u64::from(rng.u32(..)) < self.keep[slot] {
            Some(slot)
        } else {
            self.other.get(slot).map(|&o| o as usize)
        }
    }
}

/// Least request among a pool of `endpoints`, e.g. one subset's members.
pub fn pick_from<'a>(
    endpoints: &'a [Endpoint],
    pool: &Pool,
    cfg: &LbConfig,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    let usable = &pool.usable;
    match usable.len() {
        0 => None,
        1 => endpoints.get(usable[0]),
        n if pool.equal_weights => {
            let mut best: Option<&Endpoint> = None;
            for _ in 0..cfg.choice_count.max(1) {
                let candidate = endpoints.get(usable[rng.usize(..n)])?;
                if best.is_none_or(|b| candidate.live.active() < b.live.active()) {
                    best = Some(candidate);
                }
            }
            // An ejected outlier is passed over while a few more draws find another;
            // when every draw lands on one (most are ejected), it serves anyway.
            if best.is_some_and(|b| b.live.is_ejected()) {
                for _ in 0..MAX_WEIGHTED_DRAWS {
                    let candidate = endpoints.get(usable[rng.usize(..n)])?;
                    if !candidate.live.is_ejected() {
                        return Some(candidate);
                    }
                }
            }
            best
        }
        _ => weighted(endpoints, pool, cfg.active_request_bias, rng),
    }
}

/// The share of its weight an endpoint keeps under load: `1 / (active + 1)^bias`.
fn load_factor(e: &Endpoint, bias: f64) -> f64 {
    let active = e.live.active();
    if active == 0 || bias == 0.0 {
        return 1.0;
    }
    let load = f64::from(active) + 1.0;
    if bias == 1.0 {
        1.0 / load
    } else {
        load.powf(-bias)
    }
}

/// Envoy's unequal-weight least request without a scan: draw in proportion to `weight`
/// from the alias table and accept the draw with probability `1 / (active + 1)^bias`,
/// which makes each accepted pick's chance proportional to the effective weight
/// `weight / (active + 1)^bias` (exact while some draw is accepted, which is almost
/// always at a sidecar's usual load). After [`MAX_WEIGHTED_DRAWS`] refusals (every
/// endpoint busy, e.g. 20+ requests each) the least loaded endpoint drawn wins: still
/// least request, no longer the exact distribution.
fn weighted<'a>(
    endpoints: &'a [Endpoint],
    pool: &Pool,
    bias: f64,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    let mut best: Option<(&Endpoint, f64)> = None;
    let mut ejected = None;
    for _ in 0..MAX_WEIGHTED_DRAWS {
        let Some(e) = pool
            .alias
            .draw(rng)
            .and_then(|slot| pool.usable.get(slot))
            .and_then(|&i| endpoints.get(i))
        else {
            break;
        };
        if e.live.is_ejected() {
            ejected = Some(e);
            continue;
        }
        let factor = load_factor(e, bias);
        if factor >= 1.0 || rng.f64() < factor {
            return Some(e);
        }
        if best.is_none_or(|(_, f)| factor > f) {
            best = Some((e, factor));
        }
    }
    // Only ejected outliers drawn: one serves anyway rather than nothing.
    best.map(|(e, _)| e).or(ejected)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use switchyard_core::model::State;

    use super::*;
    use crate::endpoint::{test_instance, ActiveGuard, EJECT_AFTER_FAILURES};

    /// What a service view holds for the balancer.
    struct TestView {
        endpoints: Vec<Endpoint>,
        pool: Pool,
    }

    fn view(specs: &[(u32, State)]) -> TestView {
        let endpoints: Vec<Endpoint> = specs
            .iter()
            .enumerate()
            .map(|(n, (weight, state))| {
                Endpoint::new(test_instance(&format!("e{n}"), "1", *weight, *state), None)
            })
            .collect();
        let usable = (0..endpoints.len())
            .filter(|&i| endpoints[i].is_usable())
            .collect();
        let pool = Pool::new(&endpoints, usable);
        TestView { endpoints, pool }
    }

    fn pick<'a>(v: &'a TestView, cfg: &LbConfig, rng: &mut fastrand::Rng) -> Option<&'a Endpoint> {
        pick_from(&v.endpoints, &v.pool, cfg, rng)
    }

    fn index(v: &TestView, e: &Endpoint) -> usize {
        v.endpoints
            .iter()
            .position(|x| x.id == e.id)
            .expect("from the view")
    }

    /// Discrete-time load: each tick `per_tick` requests arrive and each holds its
    /// endpoint for that endpoint's service time. Returns requests per endpoint.
    fn simulate(
        v: &TestView,
        cfg: &LbConfig,
        service_ticks: &[u32],
        ticks: u32,
        per_tick: u32,
        seed: u64,
    ) -> Vec<u32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = vec![0u32; v.endpoints.len()];
        let mut in_flight: Vec<(u32, usize)> = Vec::new();
        for now in 0..ticks {
            in_flight.retain(|&(done, i)| {
                if done <= now {
                    v.endpoints[i].live.active.fetch_sub(1, Ordering::Relaxed);
                    false
                } else {
                    true
                }
            });
            for _ in 0..per_tick {
                let e = pick(v, cfg, &mut rng).expect("usable");
                let i = index(v, e);
                counts[i] += 1;
                e.live.active.fetch_add(1, Ordering::Relaxed);
                in_flight.push((now + service_ticks[i], i));
            }
        }
        counts
    }

    #[test]
    fn a_slow_endpoint_gets_clearly_fewer_requests_with_equal_weights() {
        let v = view(&[
            (100, State::Serving),
            (100, State::Serving),
            (100, State::Serving),
        ]);
        assert!(v.pool.equal_weights);
        let counts = simulate(&v, &LbConfig::default(), &[1, 1, 10], 2_000, 5, 7);
        let fast = (counts[0] + counts[1]) / 2;
        assert!(
            counts[2] * 2 < fast,
            "slow got {} vs fast {fast}: {counts:?}",
            counts[2]
        );
    }

    #[test]
    fn a_slow_endpoint_gets_clearly_fewer_requests_with_unequal_weights() {
        let v = view(&[
            (100, State::Serving),
            (150, State::Serving),
            (100, State::Serving),
        ]);
        assert!(!v.pool.equal_weights);
        let counts = simulate(&v, &LbConfig::default(), &[1, 1, 10], 2_000, 5, 11);
        assert!(
            counts[2] * 2 < counts[0],
            "slow got {} vs fast {}: {counts:?}",
            counts[2],
            counts[0]
        );
    }

    #[test]
    fn weights_one_to_three_under_equal_load_give_about_one_to_three() {
        let v = view(&[(100, State::Serving), (300, State::Serving)]);
        let mut rng = fastrand::Rng::with_seed(42);
        let mut counts = [0u32; 2];
        for _ in 0..40_000 {
            let e = pick(&v, &LbConfig::default(), &mut rng).expect("usable");
            counts[index(&v, e)] += 1;
        }
        let ratio = f64::from(counts[1]) / f64::from(counts[0]);
        // 40,000 draws: the standard error of the ratio is about 0.035.
        assert!((2.8..=3.2).contains(&ratio), "ratio {ratio}: {counts:?}");
    }

    /// Under a fixed, moderate load the weighted pick follows Envoy's effective weight
    /// `weight / (active + 1)` exactly (in distribution), not only roughly.
    #[test]
    fn unequal_weights_follow_weight_over_active_plus_one() {
        let v = view(&[
            (100, State::Serving),
            (300, State::Serving),
            (200, State::Serving),
        ]);
        // Effective weights 100/1, 300/4, 200/2: shares 100 : 75 : 100.
        v.endpoints[1].live.active.store(3, Ordering::Relaxed);
        v.endpoints[2].live.active.store(1, Ordering::Relaxed);
        let mut rng = fastrand::Rng::with_seed(9);
        let mut counts = [0u32; 3];
        for _ in 0..55_000 {
            let e = pick(&v, &LbConfig::default(), &mut rng).expect("usable");
            counts[index(&v, e)] += 1;
        }
        let share = |i: usize| f64::from(counts[i]) / 55_000.0;
        for (i, want) in [(0, 100.0 / 275.0), (1, 75.0 / 275.0), (2, 100.0 / 275.0)] {
            assert!(
                (share(i) - want).abs() < 0.01,
                "endpoint {i}: share {} want {want}: {counts:?}",
                share(i)
            );
        }
    }

    /// The alias table draws each slot in proportion to its weight, including weights
    /// of 1 beside 10,000 (the extremes an instance may register with).
    #[test]
    fn alias_table_draws_in_proportion_to_weight() {
        let weights = [1u32, 10_000, 250, 250, 7, 3_000];
        let alias = Alias::new(weights.iter().copied());
        let total: u32 = weights.iter().sum();
        let mut rng = fastrand::Rng::with_seed(3);
        let draws = 400_000u32;
        let mut counts = [0u32; 6];
        for _ in 0..draws {
            counts[alias.draw(&mut rng).expect("non-empty")] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let want = f64::from(*w) / f64::from(total);
            let got = f64::from(counts[i]) / f64::from(draws);
            assert!((got - want).abs() < 0.003, "slot {i}: {got} vs {want}");
        }
        assert!(Alias::new(std::iter::empty()).draw(&mut rng).is_none());
    }

    /// When every endpoint is far busier than the acceptance allows, a pick still ends
    /// (bounded draws) and takes the least loaded endpoint it drew.
    #[test]
    fn everything_busy_still_picks_the_least_loaded_drawn() {
        let v = view(&[(100, State::Serving), (200, State::Serving)]);
        v.endpoints[0].live.active.store(10_000, Ordering::Relaxed);
        v.endpoints[1].live.active.store(5_000, Ordering::Relaxed);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut counts = [0u32; 2];
        for _ in 0..1_000 {
            let e = pick(&v, &LbConfig::default(), &mut rng).expect("usable");
            counts[index(&v, e)] += 1;
        }
        assert!(counts[1] > 900, "{counts:?}");
    }

    /// Five consecutive failures eject an endpoint: it gets no picks while others can
    /// take them (equal and unequal weights), and still serves when it is the only one.
    #[test]
    fn an_ejected_outlier_is_passed_over_while_others_serve() {
        for weights in [[100, 100, 100], [100, 150, 200]] {
            let v = view(&[
                (weights[0], State::Serving),
                (weights[1], State::Serving),
                (weights[2], State::Serving),
            ]);
            let guard = ActiveGuard::new(v.endpoints[1].live.clone());
            let ejected: Vec<bool> = (0..EJECT_AFTER_FAILURES).map(|_| guard.failed()).collect();
            assert_eq!(ejected.iter().filter(|e| **e).count(), 1, "{ejected:?}");
            assert!(ejected[EJECT_AFTER_FAILURES as usize - 1]);
            drop(guard);
            assert!(v.endpoints[1].live.is_ejected());
            let mut rng = fastrand::Rng::with_seed(4);
            for _ in 0..2_000 {
                let e = pick(&v, &LbConfig::default(), &mut rng).expect("usable");
                assert_ne!(index(&v, e), 1, "weights {weights:?}");
            }
        }
        let alone = view(&[(100, State::Serving), (200, State::Serving)]);
        for e in &alone.endpoints {
            e.live.ejected_until_ms.store(u64::MAX, Ordering::Relaxed);
        }
        let mut rng = fastrand::Rng::with_seed(5);
        assert!(pick(&alone, &LbConfig::default(), &mut rng).is_some());
    }

    #[test]
    fn draining_and_failing_endpoints_are_never_picked() {
        let v = view(&[
            (100, State::Draining),
            (100, State::Serving),
            (100, State::Failing),
        ]);
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..1_000 {
            assert_eq!(
                pick(&v, &LbConfig::default(), &mut rng).map(|e| e.id.as_str()),
                Some("e1")
            );
        }
        let none = view(&[(100, State::Draining), (100, State::Failing)]);
        assert!(pick(&none, &LbConfig::default(), &mut rng).is_none());
        assert!(pick(&view(&[]), &LbConfig::default(), &mut rng).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Over random tables and loads, a pick is always a usable endpoint, and there is
        /// a pick exactly when some endpoint is usable.
        #[test]
        fn property_picks_are_usable_and_exist_iff_something_is_usable(
            specs in proptest::collection::vec((1..=10_000u32, 0..3usize, 0..50u32), 0..12),
            choice_count in 1..=5u32,
            bias in 0.0..3.0f64,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let states = [State::Serving, State::Draining, State::Failing];
            let v = view(
                &specs
                    .iter()
                    .map(|(w, s, _)| (*w, states[*s]))
                    .collect::<Vec<_>>(),
            );
            for (e, (_, _, active)) in v.endpoints.iter().zip(&specs) {
                e.live.active.store(*active, Ordering::Relaxed);
            }
            let cfg = LbConfig {
                choice_count,
                active_request_bias: bias,
            };
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..20 {
                match pick(&v, &cfg, &mut rng) {
                    Some(e) => proptest::prop_assert!(e.is_usable()),
                    None => proptest::prop_assert!(v.pool.is_empty()),
                }
            }
        }
    }

    #[test]
    fn config_is_validated() {
        assert!(LbConfig::default().validate().is_ok());
        assert!(LbConfig {
            choice_count: 0,
            ..LbConfig::default()
        }
        .validate()
        .is_err());
        assert!(LbConfig {
            active_request_bias: -1.0,
            ..LbConfig::default()
        }
        .validate()
        .is_err());
    }
}
