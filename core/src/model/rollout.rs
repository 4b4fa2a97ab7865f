//! Rollouts: what to roll out and how to judge it ([`RolloutSpec`]), and where a rollout
//! is ([`RolloutStatus`]). Pure data kept in the Raft log; the registry leader's loop
//! moves a rollout along by proposing a new status (see `registry::rollout`).
//!
//! The states, as in Argo Rollouts and Flagger: Pending → Initializing (canary and
//! baseline each have a serving instance, confirm-rollout and pre-rollout hooks pass) →
//! Progressing (step i: the canary's weight is written as a policy revision, then
//! observed) → Promoting → Succeeded; Paused (manual, insufficient traffic, no canary
//! endpoints, waiting for a gate); Aborting → Aborted (100 % baseline written as one
//! policy revision); Superseded when a newer canary is started.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::{Fallback, Policy, Split};
use super::validate::{validate_version, ValidationError};
use super::webhook::{validate_webhooks, Webhook, WebhookKind};
use crate::gate::{Evidence, ALTERNATIVES};

pub const DEFAULT_STEPS: [u32; 4] = [5, 25, 50, 100];
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(60);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_ALPHA: f64 = 0.05;
pub const DEFAULT_TOLERANCE: f64 = 1.0;
pub const DEFAULT_MIN_REQUESTS: u64 = 100;
/// The step deadline, as a multiple of the pause, when none is given.
pub const DEFAULT_DEADLINE_PAUSES: u64 = 10;
pub const MAX_STEPS: usize = 32;
/// Failed webhook checks (pre-rollout, rollout) that abort a rollout: Flagger's
/// `threshold`, fixed here.
pub const MAX_FAILED_CHECKS: u32 = 5;
/// Rollouts kept per service (the newest is the one that may be active).
pub const KEPT_ROLLOUTS: usize = 5;
/// Longest pause, interval or deadline accepted: 7 days.
pub const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Shortest interval accepted (the telemetry ring's slots are 5 s; a shorter interval
/// just looks more often at the same slots).
pub const MIN_INTERVAL_MS: u64 = 100;

/// What to do when a step's deadline passes without `min_requests` canary requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnInsufficientTraffic {
    #[default]
    Pause,
    Promote,
    Abort,
}

impl std::str::FromStr for OnInsufficientTraffic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(Self::Pause),
            "promote" => Ok(Self::Promote),
            "abort" => Ok(Self::Abort),
            other => Err(format!(
                "{other:?} is not pause, promote or abort (what to do when a step lacks traffic)"
            )),
        }
    }
}

impl OnInsufficientTraffic {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Promote => "promote",
            Self::Abort => "abort",
        }
    }
}

/// What to roll out and how to judge it. [`RolloutSpec::with_defaults`] fills zeros.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub canary: String,
    /// Filled at start with the serving version when left empty.
    pub baseline: String,
    /// Canary weights in percent, ascending, the last 100.
    pub steps: Vec<u32>,
    pub pause_ms: u64,
    pub interval_ms: u64,
    pub alpha: f64,
    /// The tolerated ratio `r0` of the canary's error (and slow) rate to the baseline's.
    pub tolerance: f64,
    pub min_requests: u64,
    /// 0: slow means slower than the baseline's p95 of the previous window.
    pub latency_slo_ms: u64,
    pub step_deadline_ms: u64,
    pub manual_promotion: bool,
    pub on_insufficient_traffic: OnInsufficientTraffic,
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<u64>,
    pub webhooks: Vec<Webhook>,
}

impl RolloutSpec {
    /// A spec for `canary` with every default.
    pub fn new(canary: impl Into<String>) -> Self {
        Self {
            canary: canary.into(),
            baseline: String::new(),
            steps: Vec::new(),
            pause_ms: 0,
            interval_ms: 0,
            alpha: 0.0,
            tolerance: 0.0,
            min_requests: 0,
            latency_slo_ms: 0,
            step_deadline_ms: 0,
            manual_promotion: false,
            on_insufficient_traffic: OnInsufficientTraffic::Pause,
            max_error_rate: None,
            max_p99_ms: None,
            webhooks: Vec::new(),
        }
        .with_defaults()
    }

    /// Zero (unset) fields take their defaults.
    pub fn with_defaults(mut self) -> Self {
        if self.steps.is_empty() {
            self.steps = DEFAULT_STEPS.to_vec();
        }
        if self.pause_ms == 0 {
            self.pause_ms = DEFAULT_PAUSE.as_millis() as u64;
        }
        if self.interval_ms == 0 {
            self.interval_ms = DEFAULT_INTERVAL.as_millis() as u64;
        }
        if self.alpha == 0.0 {
            self.alpha = DEFAULT_ALPHA;
        }
        if self.tolerance == 0.0 {
            self.tolerance = DEFAULT_TOLERANCE;
        }
        if self.min_requests == 0 {
            self.min_requests = DEFAULT_MIN_REQUESTS;
        }
        if self.step_deadline_ms == 0 {
            self.step_deadline_ms = self.pause_ms.saturating_mul(DEFAULT_DEADLINE_PAUSES);
        }
        self
    }

    /// Steps from `--step-weight N --max-weight M`: N, 2N, ... up to M, then 100.
    pub fn steps_from_increment(step: u32, max: u32) -> Result<Vec<u32>, String> {
        if step == 0 || step > 100 || max == 0 || max > 100 {
            return Err("--step-weight and --max-weight must be 1-100".into());
        }
        let mut steps: Vec<u32> = (1..).map(|k| k * step).take_while(|w| *w <= max).collect();
        if steps.len() >= MAX_STEPS {
            return Err(format!(
                "--step-weight {step} up to {max} makes more than {MAX_STEPS} steps"
            ));
        }
        if steps.last() != Some(&100) {
            steps.push(100);
        }
        Ok(steps)
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ValidationError {
    ValidationError::new(format!("rollout.{field}"), reason)
}

fn check_duration(field: &str, ms: u64) -> Result<(), ValidationError> {
    if ms > MAX_DURATION_MS {
        return Err(bad(field, format!("{ms} ms, at most 7 days")));
    }
    Ok(())
}

/// Checks a spec with its defaults filled (what `Start` accepts).
pub fn validate_spec(s: &RolloutSpec) -> Result<(), ValidationError> {
    validate_version("rollout.canary", &s.canary)?;
    if !s.baseline.is_empty() {
        validate_version("rollout.baseline", &s.baseline)?;
        if s.baseline == s.canary {
            return Err(bad(
                "baseline",
                "is the canary: roll out a version other than the one serving",
            ));
        }
    }
    if s.steps.is_empty() || s.steps.len() > MAX_STEPS {
        return Err(bad("steps", format!("give 1-{MAX_STEPS} weights")));
    }
    if s.steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("steps", "weights must rise step by step"));
    }
    if s.steps.last() != Some(&100) {
        return Err(bad(
            "steps",
            "the last step must be 100 (the canary takes all)",
        ));
    }
    check_duration("pause", s.pause_ms)?;
    check_duration("interval", s.interval_ms)?;
    check_duration("step_deadline", s.step_deadline_ms)?;
    if s.interval_ms < MIN_INTERVAL_MS {
        return Err(bad("interval", format!("at least {MIN_INTERVAL_MS} ms")));
    }
    if s.step_deadline_ms < s.pause_ms {
        return Err(bad(
            "step_deadline",
            "shorter than the pause: a step could never advance",
        ));
    }
    if !(s.alpha > 0.0 && s.alpha < 1.0) {
        return Err(bad("alpha", "must be between 0 and 1 (e.g. 0.05)"));
    }
    if !(s.tolerance.is_finite() && s.tolerance >= 1.0 && s.tolerance <= 100.0) {
        return Err(bad(
            "tolerance",
            "must be 1-100 (the canary's tolerated error rate as a multiple of the baseline's)",
        ));
    }
    if s.min_requests > 1_000_000_000 {
        return Err(bad("min_requests", "at most 1,000,000,000"));
    }
    check_duration("latency_slo", s.latency_slo_ms)?;
    if let Some(r) = s.max_error_rate {
        if !(r > 0.0 && r <= 1.0) {
            return Err(bad(
                "max_error_rate",
                "must be a fraction in (0, 1], e.g. 0.01",
            ));
        }
    }
    if let Some(ms) = s.max_p99_ms {
        check_duration("max_p99", ms)?;
    }
    validate_webhooks(&s.webhooks)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Initializing,
    Progressing,
    Promoting,
    Succeeded,
    Paused,
    Aborting,
    Aborted,
    Superseded,
}

impl Phase {
    /// Whether the leader's loop still moves it (only one such rollout per service).
    pub fn is_active(self) -> bool {
        !matches!(self, Phase::Succeeded | Phase::Aborted | Phase::Superseded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Initializing => "Initializing",
            Phase::Progressing => "Progressing",
            Phase::Promoting => "Promoting",
            Phase::Succeeded => "Succeeded",
            Phase::Paused => "Paused",
            Phase::Aborting => "Aborting",
            Phase::Aborted => "Aborted",
            Phase::Superseded => "Superseded",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseReason {
    Manual,
    InsufficientTraffic,
    NoCanaryEndpoints,
    WaitingForGate,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Manual => "manual",
            PauseReason::InsufficientTraffic => "insufficient traffic",
            PauseReason::NoCanaryEndpoints => "no canary endpoints",
            PauseReason::WaitingForGate => "waiting for a gate",
        }
    }
}

/// Attempts of one version, added up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub slow: u64,
}

impl Counts {
    pub fn add(&mut self, o: Counts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.slow = self.slow.saturating_add(o.slow);
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// Where a rollout is, and the evidence so far. Every change is a new generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub generation: u64,
    pub phase: Phase,
    pub pause_reason: Option<PauseReason>,
    /// Index into the spec's steps.
    pub step: u32,
    /// The canary's weight written in the policy now, percent.
    pub weight: u32,
    pub message: String,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    pub step_started_at_ms: u64,
    /// The step's observation is complete; the next advance waits for `promote`.
    pub step_done: bool,
    pub canary: Counts,
    pub baseline: Counts,
    pub step_canary: Counts,
    pub step_baseline: Counts,
    /// `ln Λ(r)` of the error test per alternative (see [`crate::gate`]).
    pub error_log_lambda: [f64; ALTERNATIVES.len()],
    /// The same on slow requests.
    pub slow_log_lambda: [f64; ALTERNATIVES.len()],
    pub canary_p99_ms: f64,
    pub baseline_p99_ms: f64,
    /// The baseline's p95 of the last window: the slow threshold of the next one when
    /// the spec has no latency SLO (0: none yet).
    pub baseline_p95_ms: f64,
    pub failed_checks: u32,
    /// The policy revision in force when the rollout started (what undo restores).
    pub base_policy_revision: u64,
    /// While paused waiting for a gate: the confirm hook that has not said yes yet
    /// (confirm-rollout, confirm-traffic-increase or confirm-promotion), which says
    /// where the rollout goes on once it does.
    pub waiting_for: Option<WebhookKind>,
}

impl RolloutStatus {
    /// A rollout that has just been started.
    pub fn pending(generation: u64, at_ms: u64, base_policy_revision: u64) -> Self {
        Self {
            generation,
            phase: Phase::Pending,
            pause_reason: None,
            step: 0,
            weight: 0,
            message: "waiting for the registry leader to pick it up".into(),
            started_at_ms: at_ms,
            updated_at_ms: at_ms,
            step_started_at_ms: at_ms,
            step_done: false,
            canary: Counts::default(),
            baseline: Counts::default(),
            step_canary: Counts::default(),
            step_baseline: Counts::default(),
            error_log_lambda: [0.0; ALTERNATIVES.len()],
            slow_log_lambda: [0.0; ALTERNATIVES.len()],
            canary_p99_ms: 0.0,
            baseline_p99_ms: 0.0,
            baseline_p95_ms: 0.0,
            failed_checks: 0,
            base_policy_revision,
            waiting_for: None,
        }
    }
}

/// One rollout of one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub namespace: String,
    pub service: String,
    pub spec: RolloutSpec,
    pub status: RolloutStatus,
}

impl Rollout {
    /// The error test's evidence so far.
    pub fn error_evidence(&self) -> Evidence {
        Evidence {
            log_lambda: self.status.error_log_lambda,
            ..Evidence::new(self.spec.tolerance)
        }
    }

    pub fn slow_evidence(&self) -> Evidence {
        Evidence {
            log_lambda: self.status.slow_log_lambda,
            ..Evidence::new(self.spec.tolerance)
        }
    }

    /// The canary's weight at step `i` (100 past the last).
    pub fn step_weight(&self, i: u32) -> u32 {
        self.spec.steps.get(i as usize).copied().unwrap_or(100)
    }
}

/// `current` (or an empty policy) with its default split set to `weight` % canary and
/// the rest baseline, naming versions directly (a split name that is no subset is that
/// exact version). Header routes and resilience settings are kept: an A/B header route
/// plus a rollout is how A/B testing is done. Zero weights are left out.
pub fn split_policy(current: Option<&Policy>, baseline: &str, canary: &str, weight: u32) -> Policy {
    let mut p = current.cloned().unwrap_or(Policy {
        subsets: Vec::new(),
        routes: Vec::new(),
        default_split: Vec::new(),
        fallback: Fallback::Default,
        sticky_header: String::new(),
        resilience: Default::default(),
    });
    let weight = weight.min(100);
    p.default_split = [(baseline, 100 - weight), (canary, weight)]
        .into_iter()
        .filter(|(_, w)| *w > 0)
        .map(|(v, w)| Split {
            subset: v.to_string(),
            weight: w,
        })
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_and_validate() {
        let s = RolloutSpec::new("2.0.0");
        assert_eq!(s.steps, vec![5, 25, 50, 100]);
        assert_eq!(s.step_deadline_ms, 600_000);
        validate_spec(&s).expect("defaults are valid");
    }

    type Mutation = Box<dyn Fn(&mut RolloutSpec)>;

    #[test]
    fn each_rule_refuses_with_its_field() {
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.steps = vec![50, 25, 100]), "rollout.steps"),
            (Box::new(|s| s.steps = vec![5, 50]), "rollout.steps"),
            (Box::new(|s| s.steps = (1..=40).collect()), "rollout.steps"),
            (Box::new(|s| s.alpha = 1.5), "rollout.alpha"),
            (Box::new(|s| s.tolerance = 0.5), "rollout.tolerance"),
            (Box::new(|s| s.tolerance = f64::NAN), "rollout.tolerance"),
            (
                Box::new(|s| s.baseline = "2.0.0".into()),
                "rollout.baseline",
            ),
            (
                Box::new(|s| s.pause_ms = MAX_DURATION_MS + 1),
                "rollout.pause",
            ),
            (
                Box::new(|s| s.step_deadline_ms = 1),
                "rollout.step_deadline",
            ),
            (Box::new(|s| s.interval_ms = 5), "rollout.interval"),
            (
                Box::new(|s| s.max_error_rate = Some(2.0)),
                "rollout.max_error_rate",
            ),
            (
                Box::new(|s| s.canary = "bad version!".into()),
                "rollout.canary",
            ),
        ];
        for (mutate, field) in cases {
            let mut s = RolloutSpec::new("2.0.0");
            mutate(&mut s);
            let err = validate_spec(&s).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn increments_make_steps_that_end_at_100() {
        assert_eq!(
            RolloutSpec::steps_from_increment(20, 60).expect("20 up to 60"),
            vec![20, 40, 60, 100]
        );
        assert_eq!(
            RolloutSpec::steps_from_increment(50, 100).expect("50 up to 100"),
            vec![50, 100]
        );
        assert!(RolloutSpec::steps_from_increment(0, 50).is_err());
        assert!(RolloutSpec::steps_from_increment(1, 99).is_err());
    }

    #[test]
    fn the_split_keeps_routes_and_drops_zero_weights() {
        let p = split_policy(None, "1.0.0", "2.0.0", 0);
        assert_eq!(p.default_split.len(), 1);
        assert_eq!(p.default_split[0].subset, "1.0.0");
        let p = split_policy(Some(&p), "1.0.0", "2.0.0", 25);
        let w: Vec<_> = p
            .default_split
            .iter()
            .map(|s| (s.subset.as_str(), s.weight))
            .collect();
        assert_eq!(w, vec![("1.0.0", 75), ("2.0.0", 25)]);
        let p = split_policy(Some(&p), "1.0.0", "2.0.0", 100);
        assert_eq!(p.default_split[0].subset, "2.0.0");
    }
}
