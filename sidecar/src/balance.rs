//! Least-request balancing with Envoy's semantics, outlier ejection, panic mode and
//! slow start, every pick O(1).
//!
//! - All usable endpoints share one weight: power of two choices. Sample `choice_count`
//!   endpoints at random; the one with fewer active requests wins.
//! - Weights differ: pick at random in proportion to the effective weight
//!   `weight / (active + 1)^bias`, so a loaded endpoint's share shrinks smoothly and
//!   `bias = 0` degrades to plain weighted random.
//! - Ejected endpoints are drawn like any other and then passed over (a draw costs one
//!   atomic load); one whose ejection time is up takes exactly one probe request
//!   (`endpoint::LiveState::admit`).
//! - Panic mode (Envoy's): when fewer than `panic_below_percent` of a pool's endpoints
//!   are usable (SERVING and not ejected), ejection and health are ignored and the pick
//!   is over all of them (SERVING and FAILING; DRAINING is an operator's choice and is
//!   never used). A few overloaded endpoints would fall over anyway; spread thin, the
//!   service may survive. 0 turns it off: then nothing usable means no pick (503 "no
//!   healthy upstream"). Whether a pool panics is recounted only when an ejection
//!   changes ([`crate::outlier::ServiceOutlier::epoch`]), never per pick.
//! - Slow start: a drawn endpoint that is ramping up is kept with probability
//!   `slow_start::share(t, window)`, which makes its chance proportional to its ramped
//!   weight on both paths; not at all when every endpoint of the pool is new.
//!
//! Draining endpoints are never picked (pools list only SERVING and FAILING ones). The
//! load signal (`active`) lives in each endpoint's `LiveState`, apart from the
//! selection, as in linkerd2-proxy.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use switchyard_core::model::State;

use crate::endpoint::{clock_ms, Admit, Endpoint};
use crate::outlier::ServiceOutlier;

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

/// Most draws one pick makes. Each draw of the weighted path is accepted with
/// probability `1 / (active + 1)^bias` (times the slow-start share), and draws of
/// ejected endpoints are passed over, so at low load and outside panic mode the first
/// few draws almost always win; the bound keeps a pick O(1) when every endpoint is busy.
const MAX_DRAWS: u32 = 16;

/// What a pool applies from its service's resolved settings.
#[derive(Clone, Debug, Default)]
pub struct PoolSettings {
    /// Below this share (percent) of usable endpoints, balance over all (0: never).
    pub panic_below_percent: u32,
    /// Slow-start window in ms (0: off).
    pub slow_start_ms: u64,
    /// The service's ejection counters; their epoch tells the pool to recount.
    pub outlier: Arc<ServiceOutlier>,
    /// `service` or `service/subset`, for the panic-mode log line.
    pub label: Arc<str>,
}

/// What a pool counted at the last ejection change.
#[derive(Debug)]
struct Health {
    /// The service epoch counted at (`u64::MAX`: not yet).
    epoch: AtomicU64,
    /// Usable endpoints (SERVING, not ejected) then.
    usable: AtomicUsize,
    panic: AtomicBool,
    /// Until when (ms on `clock_ms`) some endpoint ramps while another does not; 0
    /// when slow start has nothing to do (off, nobody ramping, or everyone new).
    ramp_until_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            epoch: AtomicU64::new(u64::MAX),
            usable: AtomicUsize::new(0),
            panic: AtomicBool::new(false),
            ramp_until_ms: AtomicU64::new(0),
        }
    }
}

/// The endpoints one pick chooses among (a service's endpoints, or one subset's), with
/// what the balancer needs precomputed: built once per catalog update so a pick never
/// scans the list.
#[derive(Debug, Default)]
pub struct Pool {
    /// Indices into the view's endpoints: the SERVING ones (ejected or not).
    pub usable: Vec<usize>,
    /// SERVING and FAILING: what panic mode balances over (and the denominator of the
    /// usable share).
    pub all: Vec<usize>,
    /// True when every SERVING endpoint has the same weight (power of two choices).
    pub equal_weights: bool,
    /// Draws a position in `usable` in proportion to weight (only when weights differ).
    alias: Alias,
    all_equal_weights: bool,
    /// True when `all` is `usable` (no FAILING member): `alias` serves both.
    all_is_usable: bool,
    /// The same over `all`, built only when it differs from `usable`.
    all_alias: Alias,
    settings: PoolSettings,
    health: Health,
}

impl Pool {
    /// A pool of exactly `usable` (tests and callers without settings: Envoy's defaults,
    /// a service of its own).
    pub fn new(endpoints: &[Endpoint], usable: Vec<usize>) -> Self {
        let settings = PoolSettings {
            panic_below_percent: 50,
            ..PoolSettings::default()
        };
        Self::build(endpoints, usable.clone(), usable, settings)
    }

    /// The pool of `members` (indices into `endpoints`): SERVING ones are usable,
    /// FAILING ones only in panic mode, DRAINING ones never.
    pub fn of(endpoints: &[Endpoint], members: &[usize], settings: PoolSettings) -> Self {
        let state = |i: usize| endpoints.get(i).map(|e| e.state);
        let usable = members
            .iter()
            .copied()
            .filter(|&i| state(i) == Some(State::Serving))
            .collect();
        let all = members
            .iter()
            .copied()
            .filter(|&i| matches!(state(i), Some(State::Serving | State::Failing)))
            .collect();
        Self::build(endpoints, usable, all, settings)
    }

    fn build(
        endpoints: &[Endpoint],
        usable: Vec<usize>,
        all: Vec<usize>,
        settings: PoolSettings,
    ) -> Self {
        let (equal_weights, alias) = tables(endpoints, &usable);
        let all_is_usable = all == usable;
        let (all_equal_weights, all_alias) = if all_is_usable {
            (equal_weights, Alias::default())
        } else {
            tables(endpoints, &all)
        };
        Self {
            usable,
            all,
            equal_weights,
            alias,
            all_equal_weights,
            all_is_usable,
            all_alias,
            settings,
            health: Health::default(),
        }
    }

    /// True when no endpoint is SERVING (a split sends such a subset's share elsewhere).
    pub fn is_empty(&self) -> bool {
        self.usable.is_empty()
    }

    /// True when the last recount put the pool in panic mode.
    pub fn in_panic(&self) -> bool {
        self.health.panic.load(Ordering::Relaxed)
    }

    /// Usable endpoints (SERVING, not ejected) at the last recount.
    pub fn usable_now(&self) -> usize {
        self.health.usable.load(Ordering::Relaxed)
    }

    /// Recounts if an ejection changed since the last time: returns (panic, ramp end).
    /// O(1) unless the service's epoch moved; then O(n) once, by whichever pick or
    /// scrape sees it first (two at once both count the same and store the same).
    pub fn refresh(&self, endpoints: &[Endpoint]) -> (bool, u64) {
        let epoch = self.settings.outlier.epoch.load(Ordering::Acquire);
        if self.health.epoch.load(Ordering::Acquire) == epoch {
            return (
                self.health.panic.load(Ordering::Relaxed),
                self.health.ramp_until_ms.load(Ordering::Relaxed),
            );
        }
        let now = clock_ms();
        let window = self.settings.slow_start_ms;
        let (mut usable, mut settled, mut ramp_until) = (0usize, false, 0u64);
        for e in self.usable.iter().filter_map(|&i| endpoints.get(i)) {
            if e.live.is_ejected() {
                continue;
            }
            usable += 1;
            if window > 0 && e.live.is_ramping(now, window) {
                let since = e.live.ramp_since_ms.load(Ordering::Relaxed);
                ramp_until = ramp_until.max(since.saturating_add(window));
            } else {
                settled = true;
            }
        }
        let pct = u64::from(self.settings.panic_below_percent);
        let total = self.all.len() as u64;
        let panic = pct > 0 && total > 0 && (usable as u64) * 100 < pct * total;
        let was = self.health.panic.swap(panic, Ordering::Relaxed);
        self.health.usable.store(usable, Ordering::Relaxed);
        // Everyone new (nobody settled): ramping them all equally changes nothing.
        self.health
            .ramp_until_ms
            .store(if settled { ramp_until } else { 0 }, Ordering::Relaxed);
        self.health.epoch.store(epoch, Ordering::Release);
        if panic != was && self.settings.outlier.may_log_panic(now) {
            if panic {
                tracing::warn!(
                    pool = %self.settings.label,
                    usable,
                    endpoints = total,
                    panic_below_percent = pct,
                    "panic mode: too few usable endpoints, balancing over all of them"
                );
            } else {
                tracing::info!(pool = %self.settings.label, usable, endpoints = total, "panic mode over");
            }
        }
        (panic, if settled { ramp_until } else { 0 })
    }
}

/// Whether `idx`'s endpoints share one weight, and the alias table when they do not.
fn tables(endpoints: &[Endpoint], idx: &[usize]) -> (bool, Alias) {
    let weight = |i: usize| endpoints.get(i).map_or(1, |e| e.weight);
    let equal = idx.windows(2).all(|w| weight(w[0]) == weight(w[1]));
    let alias = if equal {
        Alias::default()
    } else {
        Alias::new(idx.iter().map(|&i| weight(i)))
    };
    (equal, alias)
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

/// Least request among a pool of `endpoints`, e.g. one subset's members; `None` when
/// nothing may take the request (no usable endpoint and no panic mode).
pub fn pick_from<'a>(
    endpoints: &'a [Endpoint],
    pool: &Pool,
    cfg: &LbConfig,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    let (panic, ramp_until) = pool.refresh(endpoints);
    if panic {
        // Every SERVING and FAILING endpoint, ejected or not, by plain least request.
        let table = Table {
            idx: &pool.all,
            equal: pool.all_equal_weights,
            alias: if pool.all_is_usable {
                &pool.alias
            } else {
                &pool.all_alias
            },
        };
        return choose(endpoints, &table, cfg, None, rng);
    }
    if pool.usable.is_empty() {
        return None;
    }
    let ramp = (ramp_until != 0)
        .then(clock_ms)
        .filter(|&now| now < ramp_until)
        .map(|now| (now, pool.settings.slow_start_ms));
    let table = Table {
        idx: &pool.usable,
        equal: pool.equal_weights,
        alias: &pool.alias,
    };
    choose(endpoints, &table, cfg, Some(ramp), rng).or_else(|| {
        // Every draw passed over (many ejected: possible only with panic mode off or
        // low): the first endpoint not ejected from a random place, if any.
        let n = pool.usable.len();
        let start = rng.usize(..n);
        (0..n)
            .filter_map(|k| endpoints.get(pool.usable[(start + k) % n]))
            .find(|e| e.live.admit() != Admit::Skip)
    })
}

/// The endpoints one pick draws from.
struct Table<'p> {
    idx: &'p [usize],
    equal: bool,
    alias: &'p Alias,
}

/// One pick over `table`. With `gate` (outside panic mode) ejected endpoints are
/// passed over, a probation's probe is taken at once, and a ramping endpoint
/// (`Some((now, window))`) is kept with its slow-start share.
fn choose<'a>(
    endpoints: &'a [Endpoint],
    table: &Table<'_>,
    cfg: &LbConfig,
    gate: Option<Option<(u64, u64)>>,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    let n = table.idx.len();
    if n == 0 {
        return None;
    }
    // The endpoint itself may serve: Some(true) probe, Some(false) serve, None pass.
    let admit = |e: &Endpoint, rng: &mut fastrand::Rng| -> Option<bool> {
        let Some(ramp) = gate else {
            return Some(false);
        };
        match e.live.admit() {
            Admit::Skip => None,
            Admit::Probe => Some(true),
            Admit::Serve => match ramp {
                Some((now, window)) => {
                    let share = e.live.ramp(now, window);
                    (share >= 1.0 || rng.f64() < share).then_some(false)
                }
                None => Some(false),
            },
        }
    };
    if n == 1 {
        let e = endpoints.get(table.idx[0])?;
        // A lone endpoint needs no ramp: there is nobody to shift its traffic to.
        return match gate {
            Some(_) if e.live.admit() == Admit::Skip => None,
            _ => Some(e),
        };
    }
    if table.equal {
        let mut best: Option<&Endpoint> = None;
        let mut kept = 0;
        for _ in 0..MAX_DRAWS {
            let candidate = endpoints.get(table.idx[rng.usize(..n)])?;
            match admit(candidate, rng) {
                None => continue,
                Some(true) => return Some(candidate),
                Some(false) => {}
            }
            if best.is_none_or(|b| candidate.live.active() < b.live.active()) {
                best = Some(candidate);
            }
            kept += 1;
            if kept >= cfg.choice_count.max(1) {
                break;
            }
        }
        return best;
    }
    weighted(endpoints, table, cfg.active_request_bias, admit, rng)
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
/// always at a sidecar's usual load). A ramping endpoint's slow-start share multiplies
/// in (`admit` draws it). After [`MAX_DRAWS`] refusals (every endpoint busy, e.g. 20+
/// requests each) the least loaded endpoint drawn wins: still least request, no longer
/// the exact distribution.
fn weighted<'a>(
    endpoints: &'a [Endpoint],
    table: &Table<'_>,
    bias: f64,
    admit: impl Fn(&Endpoint, &mut fastrand::Rng) -> Option<bool>,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    let mut best: Option<(&Endpoint, f64)> = None;
    for _ in 0..MAX_DRAWS {
        let Some(e) = table
            .alias
            .draw(rng)
            .and_then(|slot| table.idx.get(slot))
            .and_then(|&i| endpoints.get(i))
        else {
            break;
        };
        match admit(e, rng) {
            None => continue,
            Some(true) => return Some(e),
            Some(false) => {}
        }
        let factor = load_factor(e, bias);
        if factor >= 1.0 || rng.f64() < factor {
            return Some(e);
        }
        if best.is_none_or(|(_, f)| factor > f) {
            best = Some((e, factor));
        }
    }
    best.map(|(e, _)| e)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use switchyard_core::model::State;

    use super::*;
    use crate::endpoint::{test_instance, ActiveGuard, LiveState};
    use crate::outlier::{ejection_cap, EjectKind};

    /// What a service view holds for the balancer.
    struct TestView {
        endpoints: Vec<Endpoint>,
        pool: Pool,
        outlier: Arc<ServiceOutlier>,
    }

    /// Endpoints sharing one service's outlier counters (cap from 10 %), in a pool with
    /// Envoy's panic threshold and no slow start.
    fn view(specs: &[(u32, State)]) -> TestView {
        view_with(specs, 50, 0)
    }

    fn view_with(specs: &[(u32, State)], panic_below_percent: u32, slow_start_ms: u64) -> TestView {
        let outlier = Arc::new(ServiceOutlier::new("svc"));
        outlier
            .cap
            .store(ejection_cap(specs.len(), 10), Ordering::Relaxed);
        outlier
            .slow_start_ms
            .store(slow_start_ms, Ordering::Relaxed);
        let endpoints: Vec<Endpoint> = specs
            .iter()
            .enumerate()
            .map(|(n, (weight, state))| {
                let id = format!("e{n}");
                let live = Arc::new(LiveState::new(outlier.clone()));
                Endpoint::new(test_instance(&id, "1", *weight, *state), Some(live))
            })
            .collect();
        let members: Vec<usize> = (0..endpoints.len()).collect();
        let pool = Pool::of(
            &endpoints,
            &members,
            PoolSettings {
                panic_below_percent,
                slow_start_ms,
                outlier: outlier.clone(),
                label: "svc".into(),
            },
        );
        TestView {
            endpoints,
            pool,
            outlier,
        }
    }

    /// Ejects endpoint `i` now, past the cap (a test sets up the state it needs).
    fn eject(v: &TestView, i: usize) {
        v.outlier.cap.store(u32::MAX, Ordering::Relaxed);
        assert!(v.endpoints[i].live.eject(EjectKind::Consecutive));
    }

    /// Share of `n` picks per endpoint.
    fn shares(v: &TestView, n: u32, seed: u64) -> Vec<f64> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = vec![0u32; v.endpoints.len()];
        for _ in 0..n {
            let e = pick(v, &LbConfig::default(), &mut rng).expect("a pick");
            counts[index(v, e)] += 1;
        }
        counts
            .iter()
            .map(|&c| f64::from(c) / f64::from(n))
            .collect()
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
    /// take them (equal and unequal weights).
    #[test]
    fn an_ejected_outlier_is_passed_over_while_others_serve() {
        for weights in [[100, 100, 100], [100, 150, 200]] {
            let v = view(&[
                (weights[0], State::Serving),
                (weights[1], State::Serving),
                (weights[2], State::Serving),
            ]);
            let ejected: Vec<Option<EjectKind>> = (0..5)
                .map(|_| ActiveGuard::new(v.endpoints[1].live.clone()).failed())
                .collect();
            assert_eq!(ejected[..4], [None; 4], "{ejected:?}");
            assert_eq!(ejected[4], Some(EjectKind::Consecutive));
            assert!(v.endpoints[1].live.is_ejected());
            let mut rng = fastrand::Rng::with_seed(4);
            for _ in 0..2_000 {
                let e = pick(&v, &LbConfig::default(), &mut rng).expect("usable");
                assert_ne!(index(&v, e), 1, "weights {weights:?}");
            }
            assert!(!v.pool.in_panic(), "2 of 3 usable is above 50 %");
        }
    }

    /// The cap: of ten endpoints failing in a row, 10 % (one) is ejected; the others
    /// keep serving. A success in between resets the count.
    #[test]
    fn consecutive_failures_eject_at_most_the_cap() {
        let v = view(&[(100, State::Serving); 10]);
        assert_eq!(v.outlier.cap.load(Ordering::Relaxed), 1);
        for e in &v.endpoints {
            for _ in 0..5 {
                let _ = ActiveGuard::new(e.live.clone()).failed();
            }
        }
        let ejected = v.endpoints.iter().filter(|e| e.live.is_ejected()).count();
        assert_eq!(ejected, 1);
        let e = &v.endpoints[9].live;
        e.consecutive_failures.store(0, Ordering::Relaxed);
        for _ in 0..4 {
            let _ = ActiveGuard::new(e.clone()).failed();
        }
        ActiveGuard::new(e.clone()).succeeded("e");
        assert_eq!(e.consecutive_failures.load(Ordering::Relaxed), 0);
    }

    /// Panic mode: with 3 of 4 ejected (25 % usable, below 50 %) the pick spreads over
    /// all four; with panic off it keeps to the healthy one, and with none healthy there
    /// is no pick at all.
    #[test]
    fn below_the_panic_threshold_the_pick_spreads_over_every_endpoint() {
        let v = view(&[(100, State::Serving); 4]);
        for i in 1..4 {
            eject(&v, i);
        }
        let s = shares(&v, 8_000, 1);
        assert!(v.pool.in_panic());
        assert!(s.iter().all(|&x| (0.2..0.3).contains(&x)), "{s:?}");

        let off = view_with(&[(100, State::Serving); 4], 0, 0);
        for i in 1..4 {
            eject(&off, i);
        }
        let s = shares(&off, 2_000, 2);
        assert!(!off.pool.in_panic());
        assert_eq!(s[0], 1.0, "{s:?}");
        eject(&off, 0);
        let mut rng = fastrand::Rng::with_seed(3);
        assert!(pick(&off, &LbConfig::default(), &mut rng).is_none());
    }

    /// FAILING endpoints count in the denominator and serve in panic mode (Envoy);
    /// DRAINING ones never serve.
    #[test]
    fn failing_endpoints_serve_only_in_panic_mode_and_draining_never() {
        let v = view(&[
            (100, State::Draining),
            (100, State::Serving),
            (100, State::Failing),
            (100, State::Failing),
        ]);
        let s = shares(&v, 6_000, 5);
        assert!(v.pool.in_panic(), "1 of 3 usable");
        assert_eq!(s[0], 0.0, "draining: never");
        for share in &s[1..] {
            assert!((0.28..0.39).contains(share), "{s:?}");
        }
        let calm = view(&[
            (100, State::Serving),
            (100, State::Serving),
            (100, State::Failing),
        ]);
        let s = shares(&calm, 2_000, 6);
        assert!(!calm.pool.in_panic(), "2 of 3 usable");
        assert_eq!(s[2], 0.0, "{s:?}");
        let none = view_with(&[(100, State::Draining), (100, State::Failing)], 0, 0);
        let mut rng = fastrand::Rng::with_seed(1);
        assert!(
            pick(&none, &LbConfig::default(), &mut rng).is_none(),
            "panic off"
        );
        assert!(pick(&view(&[]), &LbConfig::default(), &mut rng).is_none());
    }

    /// Probation: once the ejection time is up exactly one pick is the probe; while it
    /// is out nobody else goes there; its success ends the ejection (and starts slow
    /// start), its failure ejects again for longer.
    #[test]
    fn a_probation_hands_out_one_probe_and_its_outcome_decides() {
        let v = view_with(&[(100, State::Serving); 3], 50, 60_000);
        eject(&v, 2);
        let live = &v.endpoints[2].live;
        let mut rng = fastrand::Rng::with_seed(7);
        let on_two = |rng: &mut fastrand::Rng| {
            (0..300)
                .filter(|_| index(&v, pick(&v, &LbConfig::default(), rng).expect("pick")) == 2)
                .count()
        };
        assert_eq!(on_two(&mut rng), 0, "ejected");
        live.ejected_until_ms.store(clock_ms(), Ordering::Relaxed);
        assert_eq!(on_two(&mut rng), 1, "exactly one probe");
        let probe = ActiveGuard::new(live.clone());
        assert_eq!(on_two(&mut rng), 0, "the probe is out");
        // A probe that fails: ejected again, for twice as long.
        let first = live.ejected_until_ms.load(Ordering::Relaxed);
        assert_eq!(probe.failed(), Some(EjectKind::ProbeFailed));
        drop(probe);
        let again = live.ejected_until_ms.load(Ordering::Relaxed);
        assert!(again >= first + 59_000, "{first} → {again}");
        assert_eq!(live.ejections.load(Ordering::Relaxed), 2);
        // The next probation's probe succeeds: back, ramping, counted out of the cap.
        live.ejected_until_ms.store(clock_ms(), Ordering::Relaxed);
        assert_eq!(on_two(&mut rng), 1);
        ActiveGuard::new(live.clone()).succeeded("e");
        assert!(!live.is_ejected());
        assert!(live.is_ramping(clock_ms(), 60_000));
        assert_eq!(v.outlier.ejected.load(Ordering::Relaxed), 0);
        assert!(on_two(&mut rng) > 0, "in rotation again");
    }

    /// A probe whose request vanished (guard dropped without an outcome) gives the
    /// probation back at once.
    #[test]
    fn an_abandoned_probe_frees_the_probation() {
        let v = view(&[(100, State::Serving); 3]);
        eject(&v, 0);
        let live = &v.endpoints[0].live;
        live.ejected_until_ms.store(clock_ms(), Ordering::Relaxed);
        assert_eq!(live.admit(), Admit::Probe);
        assert_eq!(live.admit(), Admit::Skip);
        drop(ActiveGuard::new(live.clone()));
        assert_eq!(live.admit(), Admit::Probe);
    }

    /// Slow start, both paths: an endpoint just starting its ramp takes the floor of
    /// its share (0.1 / 1.1 = 9 % beside one settled endpoint of the same weight,
    /// 0.1 × 300 / (100 + 30) = 23 % with weights 100 and 300); when every endpoint is
    /// new nothing changes. (The ramp's growth over time is `slow_start`'s unit test
    /// and the `slow_start` integration test.)
    #[test]
    fn a_ramping_endpoint_takes_its_ramped_share_on_both_paths() {
        const WINDOW: u64 = 1_000_000;
        let v = view_with(&[(100, State::Serving), (100, State::Serving)], 50, WINDOW);
        v.endpoints[1].live.start_ramp(clock_ms());
        v.outlier.changed();
        let s = shares(&v, 20_000, 8);
        assert!((s[1] - 0.1 / 1.1).abs() < 0.012, "{s:?}");

        let w = view_with(&[(100, State::Serving), (300, State::Serving)], 50, WINDOW);
        w.endpoints[1].live.start_ramp(clock_ms());
        w.outlier.changed();
        let s = shares(&w, 20_000, 9);
        assert!((s[1] - 30.0 / 130.0).abs() < 0.015, "{s:?}");

        let all_new = view_with(&[(100, State::Serving), (100, State::Serving)], 50, WINDOW);
        for e in &all_new.endpoints {
            e.live.ramp_since_ms.store(clock_ms(), Ordering::Relaxed);
        }
        all_new.outlier.changed();
        let s = shares(&all_new, 20_000, 10);
        assert!((s[0] - 0.5).abs() < 0.015, "{s:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Over random tables and loads, a pick is always a usable endpoint (or, in panic
        /// mode, a FAILING one; never a DRAINING one), and there is a pick exactly when
        /// some endpoint is SERVING or FAILING (panic mode covers the latter).
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
                    Some(e) => proptest::prop_assert!(
                        e.is_usable() || (e.state == State::Failing && v.pool.in_panic())
                    ),
                    None => proptest::prop_assert!(v.pool.all.is_empty()),
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
