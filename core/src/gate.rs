//! The canary gate: a sequential test on the canary's share of errors that stays valid
//! however often it looks and however little traffic there is.
//!
//! Flagger and Argo compare error rates per tick, so a canary is judged on noise when
//! traffic is low and the false-abort rate grows with every look. Here, per evaluation
//! window j with canary/baseline requests `n_C`, `n_B` and errors `e_C`, `e_B`, the
//! errors are binomial given their total: each error is the canary's with probability
//!
//! ```text
//! ρ_j = n_C / (n_C + n_B),   q_j(r) = r·ρ_j / (r·ρ_j + 1 − ρ_j)
//! ```
//!
//! where `r` is the ratio of the canary's error rate to the baseline's. Against the
//! tolerated ratio `r0`, the likelihood ratio of an alternative `r` over all windows is
//!
//! ```text
//! Λ(r) = Π_j (q_j(r)/q_j(r0))^e_C · ((1 − q_j(r))/(1 − q_j(r0)))^e_B
//! ```
//!
//! and the evidence `E` is the mean of `Λ` over `r ∈ {1.5, 2, 3, 5, 10}·r0` (a mixture of
//! alternatives). Under the null (`r ≤ r0`) `E` is a nonnegative supermartingale with
//! mean 1, so by Ville's inequality it ever reaches `1/α` with probability at most `α`:
//! the gate may look after every window without inflating the false-abort rate. It aborts
//! as soon as `E ≥ 1/α`. A window where one side had no requests says nothing about the
//! ratio and is skipped. The same test runs on slow-request counts.

/// The alternatives the mixture averages over, as multiples of `r0`.
pub const ALTERNATIVES: [f64; 5] = [1.5, 2.0, 3.0, 5.0, 10.0];

/// One evaluation window's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub canary_requests: u64,
    pub baseline_requests: u64,
    pub canary_errors: u64,
    pub baseline_errors: u64,
}

impl Window {
    pub fn new(n_c: u64, n_b: u64, e_c: u64, e_b: u64) -> Self {
        Self {
            canary_requests: n_c,
            baseline_requests: n_b,
            canary_errors: e_c,
            baseline_errors: e_b,
        }
    }
}

/// The running evidence of one rollout: `ln Λ(r)` per alternative, updated window by
/// window (what a rollout keeps, so a new leader continues the same test).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evidence {
    /// The tolerated ratio of canary to baseline error rate (1.0: no worse).
    pub r0: f64,
    /// `ln Λ(r)` for each of [`ALTERNATIVES`].
    pub log_lambda: [f64; ALTERNATIVES.len()],
}

fn q(r: f64, rho: f64) -> f64 {
    r * rho / (r * rho + 1.0 - rho)
}

impl Evidence {
    /// No evidence yet (`E` = 1). `r0` must be positive and finite; anything else is
    /// read as 1.0.
    pub fn new(r0: f64) -> Self {
        let r0 = if r0.is_finite() && r0 > 0.0 { r0 } else { 1.0 };
        Self {
            r0,
            log_lambda: [0.0; ALTERNATIVES.len()],
        }
    }

    /// Adds one window. Errors above requests are clamped (a report cannot claim more
    /// errors than requests).
    pub fn observe(&mut self, w: Window) {
        let (n_c, n_b) = (w.canary_requests, w.baseline_requests);
        if n_c == 0 || n_b == 0 {
            return;
        }
        let e_c = w.canary_errors.min(n_c) as f64;
        let e_b = w.baseline_errors.min(n_b) as f64;
        if e_c == 0.0 && e_b == 0.0 {
            return;
        }
        let rho = n_c as f64 / (n_c as f64 + n_b as f64);
        let q0 = q(self.r0, rho);
        for (k, m) in ALTERNATIVES.iter().enumerate() {
            let qr = q(m * self.r0, rho);
            self.log_lambda[k] += e_c * (qr / q0).ln() + e_b * ((1.0 - qr) / (1.0 - q0)).ln();
        }
    }

    /// The evidence `E`: the mean of `Λ` over the alternatives (computed in log space,
    /// so long rollouts neither overflow nor underflow).
    pub fn e_value(&self) -> f64 {
        let max = self
            .log_lambda
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = self.log_lambda.iter().map(|l| (l - max).exp()).sum();
        (max + (sum / ALTERNATIVES.len() as f64).ln()).exp()
    }

    /// Whether the canary is shown worse than tolerated at level `alpha` (`E ≥ 1/α`).
    pub fn rejects(&self, alpha: f64) -> bool {
        alpha > 0.0 && self.e_value() >= 1.0 / alpha
    }
}

/// The evidence of a series of windows against `r0`.
pub fn e_value(windows: &[Window], r0: f64) -> f64 {
    let mut e = Evidence::new(r0);
    for w in windows {
        e.observe(*w);
    }
    e.e_value()
}

/// The one-sided upper confidence bound (Clopper-Pearson) on an error rate after
/// `errors` of `requests`: what `rollout get` prints as "at most this bad" (≈ 3/n with
/// no errors at 95 %). 1.0 without requests.
pub fn error_rate_upper_bound(requests: u64, errors: u64, confidence: f64) -> f64 {
    if requests == 0 || errors >= requests {
        return 1.0;
    }
    let tail = 1.0 - confidence.clamp(0.5, 0.999_999);
    if errors == 0 {
        return 1.0 - tail.powf(1.0 / requests as f64);
    }
    // The p at which P(X ≤ errors) = tail, by bisection on the binomial CDF (monotone
    // decreasing in p).
    let (mut lo, mut hi) = (errors as f64 / requests as f64, 1.0);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if binomial_cdf(requests, errors, mid) > tail {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// P(X ≤ k) for X ~ Binomial(n, p), summed in log space.
fn binomial_cdf(n: u64, k: u64, p: f64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln C(n, i) built up term by term.
    let mut ln_c = 0.0;
    let mut total = 0.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        total += (ln_c + i as f64 * lp + (n - i) as f64 * lq).exp();
    }
    total.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() / b < 0.001
    }

    /// Windows as (n_C, n_B, e_C, e_B), the E they give, and whether the gate aborts.
    type Vector = (&'static [(u64, u64, u64, u64)], f64, bool);

    /// The vectors the rollout issue gives (r0 = 1, α = 0.05 → abort at 20).
    #[test]
    fn the_issue_vectors() {
        let cases: [Vector; 5] = [
            (&[(100, 1000, 3, 2)], 19.29, false),
            (&[(100, 1000, 5, 2)], 395.5, true),
            (&[(50, 950, 2, 0)], 15.63, false),
            (&[(50, 950, 3, 0)], 86.14, true),
            (
                &[(50, 950, 1, 2), (100, 900, 2, 2), (250, 750, 4, 3)],
                45.12,
                true,
            ),
        ];
        for (windows, want, abort) in cases {
            let windows: Vec<Window> = windows
                .iter()
                .map(|&(a, b, c, d)| Window::new(a, b, c, d))
                .collect();
            let mut ev = Evidence::new(1.0);
            windows.iter().for_each(|w| ev.observe(*w));
            let e = ev.e_value();
            assert!(close(e, want), "{windows:?}: E = {e}, want ≈ {want}");
            assert_eq!(ev.rejects(0.05), abort, "{windows:?}: E = {e}");
            assert!(close(e_value(&windows, 1.0), want));
        }
    }

    #[test]
    fn windows_without_information_change_nothing() {
        let mut ev = Evidence::new(1.0);
        ev.observe(Window::new(0, 100, 0, 5));
        ev.observe(Window::new(100, 0, 5, 0));
        ev.observe(Window::new(100, 100, 0, 0));
        assert_eq!(ev.e_value(), 1.0);
        // Errors are clamped to requests, and a bad r0 is read as 1.
        let mut clamped = Evidence::new(f64::NAN);
        clamped.observe(Window::new(10, 100, 1_000, 0));
        assert!(clamped.e_value().is_finite());
        assert_eq!(clamped.r0, 1.0);
    }

    #[test]
    fn a_tolerated_ratio_lowers_the_evidence() {
        let w = [Window::new(100, 1000, 5, 2)];
        assert!(e_value(&w, 2.0) < e_value(&w, 1.0));
    }

    /// Many looks under no regression: the canary and the baseline fail at the same
    /// rate, the gate looks after every window, and aborts stay below α (Ville's
    /// inequality; seeded, so the test is exact and fast).
    #[test]
    fn false_aborts_stay_below_alpha_under_continuous_monitoring() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (runs, windows, alpha, p) = (400, 60, 0.05, 0.03);
        let mut aborted = 0;
        for _ in 0..runs {
            let mut ev = Evidence::new(1.0);
            for _ in 0..windows {
                let (n_c, n_b) = (rng.u64(5..40), rng.u64(100..400));
                let errors = |n: u64, rng: &mut fastrand::Rng| {
                    (0..n).filter(|_| rng.f64() < p).count() as u64
                };
                let w = Window::new(n_c, n_b, errors(n_c, &mut rng), errors(n_b, &mut rng));
                ev.observe(w);
                if ev.rejects(alpha) {
                    aborted += 1;
                    break;
                }
            }
        }
        let rate = aborted as f64 / runs as f64;
        assert!(rate < alpha, "false-abort rate {rate} over {runs} runs");
    }

    /// And it does find a real regression: the canary fails at 3× the baseline.
    #[test]
    fn a_canary_three_times_worse_is_aborted() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut ev = Evidence::new(1.0);
        let mut looks = 0;
        while !ev.rejects(0.05) && looks < 200 {
            let errors = |n: u64, p: f64, rng: &mut fastrand::Rng| {
                (0..n).filter(|_| rng.f64() < p).count() as u64
            };
            ev.observe(Window::new(
                50,
                450,
                errors(50, 0.06, &mut rng),
                errors(450, 0.02, &mut rng),
            ));
            looks += 1;
        }
        assert!(ev.rejects(0.05), "not aborted after {looks} windows");
    }

    #[test]
    fn the_upper_bound_is_about_three_over_n_with_no_errors() {
        let b = error_rate_upper_bound(100, 0, 0.95);
        assert!((b - 0.0295).abs() < 0.001, "{b}");
        // Clopper-Pearson, 1 of 100 at 95 % one-sided: 0.0466.
        let b = error_rate_upper_bound(100, 1, 0.95);
        assert!((b - 0.0466).abs() < 0.001, "{b}");
        assert_eq!(error_rate_upper_bound(0, 0, 0.95), 1.0);
    }
}
