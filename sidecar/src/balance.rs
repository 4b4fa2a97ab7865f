//! Least-request balancing with Envoy's semantics.
//!
//! - All usable endpoints share one weight: power of two choices. Sample `choice_count`
//!   endpoints at random; the one with fewer active requests wins.
//! - Weights differ: pick at random in proportion to the effective weight
//!   `weight / (active + 1)^bias`, so a loaded endpoint's share shrinks smoothly and
//!   `bias = 0` degrades to plain weighted random.
//!
//! Draining and failing endpoints are never picked (the view lists only usable ones).
//! The load signal (`active`) lives in each endpoint's `LiveState`, apart from the
//! selection, as in linkerd2-proxy.

use crate::endpoint::Endpoint;
use crate::table::ServiceView;

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

/// Picks an endpoint for one request or connection; `None` when none is usable.
pub fn pick<'a>(
    view: &'a ServiceView,
    cfg: &LbConfig,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    pick_from(&view.endpoints, &view.usable, view.equal_weights, cfg, rng)
}

/// Least request among `usable` (indices into `endpoints`), e.g. one subset's members.
pub fn pick_from<'a>(
    endpoints: &'a [Endpoint],
    usable: &[usize],
    equal_weights: bool,
    cfg: &LbConfig,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    match usable.len() {
        0 => None,
        1 => endpoints.get(usable[0]),
        n if equal_weights => {
            let mut best: Option<&Endpoint> = None;
            for _ in 0..cfg.choice_count.max(1) {
                let candidate = endpoints.get(usable[rng.usize(..n)])?;
                if best.is_none_or(|b| candidate.live.active() < b.live.active()) {
                    best = Some(candidate);
                }
            }
            best
        }
        _ => weighted(endpoints, usable, cfg.active_request_bias, rng),
    }
}

fn effective_weight(e: &Endpoint, bias: f64) -> f64 {
    let weight = f64::from(e.weight);
    let load = f64::from(e.live.active()) + 1.0;
    if bias == 1.0 {
        weight / load
    } else if bias == 0.0 {
        weight
    } else {
        weight / load.powf(bias)
    }
}

fn weighted<'a>(
    endpoints: &'a [Endpoint],
    usable: &[usize],
    bias: f64,
    rng: &mut fastrand::Rng,
) -> Option<&'a Endpoint> {
    let total: f64 = usable
        .iter()
        .filter_map(|&i| endpoints.get(i))
        .map(|e| effective_weight(e, bias))
        .sum();
    let mut target = rng.f64() * total;
    let mut last = None;
    for e in usable.iter().filter_map(|&i| endpoints.get(i)) {
        let w = effective_weight(e, bias);
        if target < w {
            return Some(e);
        }
        target -= w;
        last = Some(e);
    }
    // Rounding can leave a sliver past the last endpoint.
    last
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::endpoint::State;
    use crate::table::InstanceRecord;

    fn view(specs: &[(u32, State)]) -> ServiceView {
        let records: BTreeMap<String, InstanceRecord> = specs
            .iter()
            .enumerate()
            .map(|(n, (weight, state))| {
                let id = format!("e{n}");
                (
                    id.clone(),
                    InstanceRecord {
                        id,
                        address: "127.0.0.1".into(),
                        port: 1000 + n as u16,
                        version: "1".into(),
                        labels: BTreeMap::new(),
                        weight: *weight,
                        zone: String::new(),
                        state: *state,
                    },
                )
            })
            .collect();
        ServiceView::new("svc".into(), 1, &records, None, None, None)
    }

    fn index(v: &ServiceView, e: &Endpoint) -> usize {
        v.endpoints
            .iter()
            .position(|x| x.id == e.id)
            .expect("from the view")
    }

    /// Discrete-time load: each tick `per_tick` requests arrive and each holds its
    /// endpoint for that endpoint's service time. Returns requests per endpoint.
    fn simulate(
        v: &ServiceView,
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
        assert!(v.equal_weights);
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
        assert!(!v.equal_weights);
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

    /// Property: over many random tables and loads, a pick is always a usable endpoint,
    /// and there is a pick exactly when some endpoint is usable.
    #[test]
    fn property_picks_are_usable_and_exist_iff_something_is_usable() {
        for seed in 0..500u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let n = rng.usize(0..12);
            let specs: Vec<(u32, State)> = (0..n)
                .map(|_| {
                    let state = [State::Serving, State::Draining, State::Failing][rng.usize(..3)];
                    (rng.u32(1..=10_000), state)
                })
                .collect();
            let v = view(&specs);
            for e in &v.endpoints {
                e.live.active.store(rng.u32(0..50), Ordering::Relaxed);
            }
            let cfg = LbConfig {
                choice_count: rng.u32(1..=5),
                active_request_bias: rng.f64() * 3.0,
            };
            for _ in 0..20 {
                match pick(&v, &cfg, &mut rng) {
                    Some(e) => assert!(e.is_usable(), "seed {seed}"),
                    None => assert!(v.usable.is_empty(), "seed {seed}"),
                }
            }
        }
    }

    #[test]
    fn live_state_survives_a_view_update() {
        let v1 = view(&[(100, State::Serving), (100, State::Serving)]);
        v1.endpoints[0].live.active.store(7, Ordering::Relaxed);
        let mut records = BTreeMap::new();
        for e in &v1.endpoints {
            records.insert(
                e.id.clone(),
                InstanceRecord {
                    id: e.id.clone(),
                    address: "127.0.0.1".into(),
                    port: 1,
                    version: "2".into(),
                    labels: BTreeMap::new(),
                    weight: 100,
                    zone: String::new(),
                    state: State::Serving,
                },
            );
        }
        let v2 = ServiceView::new("svc".into(), 2, &records, None, Some(&v1), None);
        assert_eq!(v2.endpoints[0].live.active(), 7);
        assert_eq!(v2.endpoints[0].version, "2");
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
