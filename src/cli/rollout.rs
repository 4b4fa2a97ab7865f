//! `switchyard rollout …`: the client side of the registry's canary rollouts (the
//! `Rollouts` service): start one, show it with the gate's evidence, follow it until it
//! ends, and steer it (promote, pause, abort, retry, undo). The registry leader runs the
//! rollout itself; these verbs only ask it and print what it answers.
//!
//! `start` builds the spec with every default filled in and checks it with the same
//! rules as the registry (`switchyard_core::model::rollout::validate_spec`), so a bad
//! flag is refused (exit 64) before a round trip, and what is sent is exactly what was
//! checked.
//!
//! `status` exits like `kubectl argo rollouts status`, so scripts and CI can wait on it:
//! 0 when the rollout SUCCEEDED; [`EXIT_ROLLOUT_ABORTED`] (1, Argo's "degraded") when it
//! was aborted or superseded (it will not succeed by itself); [`EXIT_ROLLOUT_UNFINISHED`]
//! (3) when it is still under way (without `--watch`) or `--timeout` passed first.

use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use serde::Serialize;
use switchyard_core::model::rollout::{
    self as model, validate_spec, OnInsufficientTraffic, RolloutSpec, DEFAULT_DEADLINE_PAUSES,
    DEFAULT_STEPS, MAX_FAILED_CHECKS,
};
use switchyard_core::model::{ValidationError, Webhook};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::rollouts_client::RolloutsClient;
use tonic::transport::Channel;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::config::{parse_duration, rfc3339};
use super::{CliError, Output, EXIT_CONFIG};

/// Exit status of `rollout status` when the rollout was aborted (or is aborting) or was
/// superseded by a newer canary: it will not succeed by itself (Argo's "degraded", 1).
pub const EXIT_ROLLOUT_ABORTED: u8 = 1;
/// Exit status of `rollout status` when the rollout has not ended: still under way
/// without `--watch`, or `--timeout` passed first. Not 2, which clap uses for bad usage.
pub const EXIT_ROLLOUT_UNFINISHED: u8 = 3;

#[derive(Args, Debug)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub verb: RolloutVerb,
    #[command(flatten)]
    pub registry: RegistryFlag,
    /// Namespace of the service.
    #[arg(
        long,
        short = 'n',
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub namespace: String,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Subcommand, Debug)]
pub enum RolloutVerb {
    /// Start a canary rollout: `rollout start web --canary 2.0.0`. The registry steps the
    /// default split from the baseline to the canary and aborts as soon as the canary's
    /// error (or slow) rate is worse than the baseline's beyond chance.
    Start(Box<StartArgs>),
    /// Show the service's newest rollout and the gate's evidence.
    Get { service: String },
    /// List the newest rollout of every service of the namespace.
    List,
    /// Print the rollout's phase; exit 0 only when it SUCCEEDED, 1 when it was aborted or
    /// superseded, 3 while it is under way (or when --timeout passes with --watch).
    Status {
        service: String,
        /// Follow the rollout, printing every change, until it succeeds, is aborted or is
        /// superseded.
        #[arg(long, short = 'w', env = "SWITCHYARD_ROLLOUT_STATUS_WATCH")]
        watch: bool,
        /// With --watch: give up (exit 3) after this long; 0s waits until the rollout ends.
        #[arg(
            long,
            env = "SWITCHYARD_ROLLOUT_STATUS_TIMEOUT",
            default_value = "0s",
            value_parser = parse_duration
        )]
        timeout: Duration,
    },
    /// End a pause (or a step waiting for manual promotion) and go on.
    Promote {
        service: String,
        /// Skip the remaining steps: straight to 100% canary and promotion.
        #[arg(long, env = "SWITCHYARD_ROLLOUT_PROMOTE_FULL")]
        full: bool,
    },
    /// Pause an active rollout at its current weight (resume with `promote`).
    Pause { service: String },
    /// Send every request back to the baseline at once (one policy revision).
    Abort { service: String },
    /// Start an aborted rollout again from its first step, with fresh evidence.
    Retry { service: String },
    /// Restore a kept policy revision and end an active rollout as aborted.
    Undo {
        service: String,
        /// The policy revision to restore; 0 is the one in force when the rollout started.
        #[arg(long, env = "SWITCHYARD_ROLLOUT_UNDO_TO_REVISION", default_value_t = 0)]
        to_revision: u64,
    },
}

/// `rollout start`'s flags. Defaults are the registry's (`switchyard_core::model::rollout`),
/// filled in here and sent explicitly.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// The service to roll out.
    pub service: String,
    /// The version to roll out.
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_CANARY")]
    pub canary: String,
    /// The version to compare it with and to go back to (default: the version that serves
    /// the service now, the one with most instances that is not the canary).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_BASELINE")]
    pub baseline: Option<String>,
    /// Canary weights in percent, ascending, ending at 100.
    #[arg(
        long,
        env = "SWITCHYARD_ROLLOUT_START_STEPS",
        default_value = "5,25,50,100",
        value_parser = parse_steps,
        conflicts_with_all = ["step_weight", "max_weight"]
    )]
    pub steps: Steps,
    /// Steps of this many percent (N, 2N, ... up to --max-weight, then 100), instead of
    /// --steps (default: unset, --steps applies).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_STEP_WEIGHT")]
    pub step_weight: Option<u32>,
    /// The last step below 100 that --step-weight makes.
    #[arg(
        long,
        env = "SWITCHYARD_ROLLOUT_START_MAX_WEIGHT",
        default_value_t = 100,
        requires = "step_weight"
    )]
    pub max_weight: u32,
    /// How long each step is observed at least.
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_PAUSE", default_value = "60s", value_parser = parse_duration)]
    pub pause: Duration,
    /// How often the gate looks at new evidence (at least 100ms).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub interval: Duration,
    /// The gate's false-abort rate: a canary as good as the baseline is aborted with at
    /// most this probability, however long the rollout runs.
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_ALPHA", default_value_t = model::DEFAULT_ALPHA)]
    pub alpha: f64,
    /// Tolerated ratio of the canary's error (and slow) rate to the baseline's (1-100).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_TOLERANCE", default_value_t = model::DEFAULT_TOLERANCE)]
    pub tolerance: f64,
    /// Canary requests a step needs before it may advance.
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_MIN_REQUESTS", default_value_t = model::DEFAULT_MIN_REQUESTS)]
    pub min_requests: u64,
    /// A request slower than this counts as slow; 0s: slower than the baseline's p95 of
    /// the previous window.
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_LATENCY_SLO", default_value = "0s", value_parser = parse_duration)]
    pub latency_slo: Duration,
    /// How long a step may wait for --min-requests before --on-insufficient-traffic
    /// applies (default: 10 x --pause).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_STEP_DEADLINE", value_parser = parse_duration)]
    pub step_deadline: Option<Duration>,
    /// Every step advance waits for `switchyard rollout promote`.
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_MANUAL_PROMOTION")]
    pub manual_promotion: bool,
    /// What to do when a step's deadline passes without --min-requests canary requests.
    #[arg(
        long,
        env = "SWITCHYARD_ROLLOUT_START_ON_INSUFFICIENT_TRAFFIC",
        default_value = "pause",
        value_parser = PossibleValuesParser::new(["pause", "promote", "abort"])
            .try_map(|s| s.parse::<OnInsufficientTraffic>())
    )]
    pub on_insufficient_traffic: OnInsufficientTraffic,
    /// Abort when the canary's error rate exceeds this fraction (e.g. 0.01), once a step
    /// has --min-requests (default: no absolute limit).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_MAX_ERROR_RATE")]
    pub max_error_rate: Option<f64>,
    /// Abort when the canary's p99 exceeds this, once a step has --min-requests (default:
    /// no absolute limit).
    #[arg(long, env = "SWITCHYARD_ROLLOUT_START_MAX_P99", value_parser = parse_duration)]
    pub max_p99: Option<Duration>,
    /// A Flagger-compatible webhook, TYPE=URL (e.g. pre-rollout=http://loadtester/);
    /// repeatable, the variable holds one (default: none).
    #[arg(
        long = "webhook",
        env = "SWITCHYARD_ROLLOUT_START_WEBHOOK",
        value_parser = Webhook::parse_flag
    )]
    pub webhooks: Vec<Webhook>,
}

/// Canary weights as given to `--steps` (checked for order by `validate_spec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps(pub Vec<u32>);

/// Parses `--steps 5,25,50,100` (spaces around the commas are fine).
fn parse_steps(s: &str) -> Result<Steps, String> {
    let steps = s
        .split(',')
        .map(|w| {
            let w = w.trim();
            match w.parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => Ok(n),
                _ => Err(format!(
                    "{w:?} is not a weight in percent (1-100): write ascending weights ending at 100, e.g. 5,25,50,100"
                )),
            }
        })
        .collect::<Result<Vec<u32>, String>>()?;
    Ok(Steps(steps))
}

/// A refused spec field as the flag that sets it (`rollout.step_deadline` ->
/// `--step-deadline`), so the operator knows what to change.
fn flag_error(e: &ValidationError) -> CliError {
    let field = e.field.strip_prefix("rollout.").unwrap_or(&e.field);
    let flag = if field.starts_with("webhooks") {
        "--webhook".to_string()
    } else if field == "steps" {
        "--steps (or --step-weight/--max-weight)".to_string()
    } else {
        format!("--{}", field.replace('_', "-"))
    };
    CliError::new(EXIT_CONFIG, format!("{flag}: {}", e.reason))
}

/// Whole milliseconds of a duration flag; `zero_ok` is false where 0 on the wire would
/// mean "the registry's default", which is not what the operator asked for.
fn millis(flag: &str, d: Duration, zero_ok: bool) -> Result<u64, CliError> {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 && !zero_ok {
        return Err(CliError::new(
            EXIT_CONFIG,
            format!(
                "{flag} {}: give at least 1ms (0 would mean the registry's default)",
                humantime::format_duration(d)
            ),
        ));
    }
    Ok(ms)
}

/// The spec `start` sends, every default filled in, checked by the registry's rules.
pub fn build_spec(a: &StartArgs) -> Result<RolloutSpec, CliError> {
    let steps = match a.step_weight {
        Some(step) => RolloutSpec::steps_from_increment(step, a.max_weight)
            .map_err(|e| CliError::new(EXIT_CONFIG, e))?,
        None => a.steps.0.clone(),
    };
    let pause_ms = millis("--pause", a.pause, false)?;
    let step_deadline_ms = match a.step_deadline {
        Some(d) => millis("--step-deadline", d, false)?,
        None => pause_ms.saturating_mul(DEFAULT_DEADLINE_PAUSES),
    };
    if a.min_requests == 0 {
        return Err(CliError::new(
            EXIT_CONFIG,
            "--min-requests: at least 1 (a step needs canary requests to be judged)",
        ));
    }
    let max_p99_ms = match a.max_p99 {
        Some(d) => Some(millis("--max-p99", d, false)?),
        None => None,
    };
    let spec = RolloutSpec {
        canary: a.canary.clone(),
        baseline: a.baseline.clone().unwrap_or_default(),
        steps,
        pause_ms,
        interval_ms: millis("--interval", a.interval, true)?,
        alpha: a.alpha,
        tolerance: a.tolerance,
        min_requests: a.min_requests,
        latency_slo_ms: millis("--latency-slo", a.latency_slo, true)?,
        step_deadline_ms,
        manual_promotion: a.manual_promotion,
        on_insufficient_traffic: a.on_insufficient_traffic,
        max_error_rate: a.max_error_rate,
        max_p99_ms,
        webhooks: a.webhooks.clone(),
    };
    validate_spec(&spec).map_err(|e| flag_error(&e))?;
    Ok(spec)
}

/// The wire form of a checked spec (0 for the absolute gates that are off).
pub fn spec_to_pb(s: &RolloutSpec) -> pb::RolloutSpec {
    pb::RolloutSpec {
        canary: s.canary.clone(),
        baseline: s.baseline.clone(),
        steps: s.steps.clone(),
        pause_ms: s.pause_ms,
        interval_ms: s.interval_ms,
        alpha: s.alpha,
        tolerance: s.tolerance,
        min_requests: s.min_requests,
        latency_slo_ms: s.latency_slo_ms,
        step_deadline_ms: s.step_deadline_ms,
        manual_promotion: s.manual_promotion,
        on_insufficient_traffic: match s.on_insufficient_traffic {
            OnInsufficientTraffic::Pause => pb::InsufficientTraffic::Pause,
            OnInsufficientTraffic::Promote => pb::InsufficientTraffic::Promote,
            OnInsufficientTraffic::Abort => pb::InsufficientTraffic::Abort,
        } as i32,
        max_error_rate: s.max_error_rate.unwrap_or(0.0),
        max_p99_ms: s.max_p99_ms.unwrap_or(0),
        webhooks: s
            .webhooks
            .iter()
            .map(|w| pb::Webhook {
                r#type: w.kind.as_str().to_string(),
                url: w.url.clone(),
            })
            .collect(),
    }
}

/// The phase as people read it (the table) and as scripts match it (JSON).
fn phase_names(p: pb::RolloutPhase) -> (&'static str, &'static str) {
    use pb::RolloutPhase as P;
    match p {
        P::Unspecified => ("Unknown", "unknown"),
        P::Pending => ("Pending", "pending"),
        P::Initializing => ("Initializing", "initializing"),
        P::Progressing => ("Progressing", "progressing"),
        P::Promoting => ("Promoting", "promoting"),
        P::Succeeded => ("Succeeded", "succeeded"),
        P::Paused => ("Paused", "paused"),
        P::Aborting => ("Aborting", "aborting"),
        P::Aborted => ("Aborted", "aborted"),
        P::Superseded => ("Superseded", "superseded"),
    }
}

fn pause_names(r: pb::PauseReason) -> Option<(&'static str, &'static str)> {
    use pb::PauseReason as R;
    match r {
        R::Unspecified => None,
        R::Manual => Some(("manual", "manual")),
        R::InsufficientTraffic => Some(("insufficient traffic", "insufficient_traffic")),
        R::NoCanaryEndpoints => Some(("no canary endpoints", "no_canary_endpoints")),
        R::WaitingForGate => Some(("waiting for a gate", "waiting_for_gate")),
    }
}

/// A rollout as `get`, `list` and the control verbs print it. Field names are a stable
/// JSON document; the `*_text` fields only feed the table.
#[derive(Serialize, Debug)]
struct RolloutDoc {
    namespace: String,
    service: String,
    canary: String,
    baseline: String,
    phase: &'static str,
    /// Set while paused.
    pause_reason: Option<&'static str>,
    /// Index into `spec.steps` (0-based, as the API); the table prints it 1-based.
    step_index: u32,
    step_count: u32,
    /// The canary's weight now written in the policy, percent.
    weight: u32,
    message: String,
    generation: u64,
    started_at: String,
    updated_at: String,
    step_started_at: String,
    base_policy_revision: u64,
    spec: SpecDoc,
    evidence: EvidenceDoc,
    #[serde(skip)]
    phase_text: String,
}

#[derive(Serialize, Debug)]
struct SpecDoc {
    steps: Vec<u32>,
    pause_ms: u64,
    interval_ms: u64,
    alpha: f64,
    tolerance: f64,
    min_requests: u64,
    /// 0: slow means slower than the baseline's p95.
    latency_slo_ms: u64,
    step_deadline_ms: u64,
    manual_promotion: bool,
    on_insufficient_traffic: &'static str,
    max_error_rate: Option<f64>,
    max_p99_ms: Option<u64>,
    webhooks: Vec<WebhookDoc>,
}

#[derive(Serialize, Debug)]
struct WebhookDoc {
    r#type: String,
    url: String,
}

#[derive(Serialize, Debug, Clone, Copy)]
struct CountsDoc {
    requests: u64,
    errors: u64,
    slow: u64,
    error_rate: f64,
    slow_rate: f64,
}

impl From<Option<pb::RolloutCounts>> for CountsDoc {
    fn from(c: Option<pb::RolloutCounts>) -> Self {
        let c = c.unwrap_or_default();
        let rate = |n: u64| {
            if c.requests == 0 {
                0.0
            } else {
                n as f64 / c.requests as f64
            }
        };
        Self {
            requests: c.requests,
            errors: c.errors,
            slow: c.slow,
            error_rate: rate(c.errors),
            slow_rate: rate(c.slow),
        }
    }
}

#[derive(Serialize, Debug)]
struct EvidenceDoc {
    canary: CountsDoc,
    baseline: CountsDoc,
    step_canary: CountsDoc,
    step_baseline: CountsDoc,
    /// Canary requests the current step needs before it may advance.
    min_requests: u64,
    /// The sequential test's evidence on errors and on slow requests.
    error_e: f64,
    slow_e: f64,
    /// The gate aborts when either E reaches this (1/alpha).
    abort_threshold: f64,
    canary_error_rate_upper_95: f64,
    canary_p99_ms: f64,
    baseline_p99_ms: f64,
    failed_checks: u32,
    /// Failed webhook checks that abort.
    max_failed_checks: u32,
}

fn doc(r: &pb::Rollout) -> RolloutDoc {
    let spec = r.spec.clone().unwrap_or_default();
    let status = r.status.clone().unwrap_or_default();
    let ev = status.evidence.unwrap_or_default();
    let (phase_text, phase) = phase_names(status.phase());
    let reason = if status.phase() == pb::RolloutPhase::Paused {
        pause_names(status.pause_reason())
    } else {
        None
    };
    let phase_text = match reason {
        Some((text, _)) => format!("{phase_text} ({text})"),
        None => phase_text.to_string(),
    };
    // Zeros on the wire are the registry's defaults; show what applies.
    let alpha = if spec.alpha > 0.0 {
        spec.alpha
    } else {
        model::DEFAULT_ALPHA
    };
    let min_requests = if spec.min_requests > 0 {
        spec.min_requests
    } else {
        model::DEFAULT_MIN_REQUESTS
    };
    let steps = if spec.steps.is_empty() {
        DEFAULT_STEPS.to_vec()
    } else {
        spec.steps.clone()
    };
    let time = |ms: u64| if ms == 0 { String::new() } else { rfc3339(ms) };
    RolloutDoc {
        namespace: r.namespace.clone(),
        service: r.service.clone(),
        canary: spec.canary.clone(),
        baseline: spec.baseline.clone(),
        phase,
        pause_reason: reason.map(|(_, json)| json),
        step_index: status.step,
        step_count: u32::try_from(steps.len()).unwrap_or(u32::MAX),
        weight: status.weight,
        message: status.message.clone(),
        generation: status.generation,
        started_at: time(status.started_at_ms),
        updated_at: time(status.updated_at_ms),
        step_started_at: time(status.step_started_at_ms),
        base_policy_revision: status.base_policy_revision,
        spec: SpecDoc {
            steps,
            pause_ms: spec.pause_ms,
            interval_ms: spec.interval_ms,
            alpha,
            tolerance: spec.tolerance,
            min_requests,
            latency_slo_ms: spec.latency_slo_ms,
            step_deadline_ms: spec.step_deadline_ms,
            manual_promotion: spec.manual_promotion,
            on_insufficient_traffic: match spec.on_insufficient_traffic() {
                pb::InsufficientTraffic::Unspecified | pb::InsufficientTraffic::Pause => "pause",
                pb::InsufficientTraffic::Promote => "promote",
                pb::InsufficientTraffic::Abort => "abort",
            },
            max_error_rate: (spec.max_error_rate > 0.0).then_some(spec.max_error_rate),
            max_p99_ms: (spec.max_p99_ms > 0).then_some(spec.max_p99_ms),
            webhooks: spec
                .webhooks
                .iter()
                .map(|w| WebhookDoc {
                    r#type: w.r#type.clone(),
                    url: w.url.clone(),
                })
                .collect(),
        },
        evidence: EvidenceDoc {
            canary: ev.canary.into(),
            baseline: ev.baseline.into(),
            step_canary: ev.step_canary.into(),
            step_baseline: ev.step_baseline.into(),
            min_requests,
            error_e: ev.error_e,
            slow_e: ev.slow_e,
            abort_threshold: 1.0 / alpha,
            canary_error_rate_upper_95: ev.canary_error_rate_upper_95,
            canary_p99_ms: ev.canary_p99_ms,
            baseline_p99_ms: ev.baseline_p99_ms,
            failed_checks: ev.failed_checks,
            max_failed_checks: MAX_FAILED_CHECKS,
        },
        phase_text,
    }
}

fn percent(f: f64) -> String {
    format!("{:.2}%", f * 100.0)
}

/// `Progressing, step 2/4 at 25% canary: <message>` (one line, for status and the
/// control verbs).
fn brief(d: &RolloutDoc) -> String {
    let mut s = format!(
        "{}: {}, step {}/{} at {}% canary",
        d.service,
        d.phase_text,
        d.step_index.saturating_add(1).min(d.step_count),
        d.step_count,
        d.weight
    );
    if !d.message.is_empty() {
        s.push_str(": ");
        s.push_str(&d.message);
    }
    s
}

/// `rollout get` as a table.
fn render_get(d: &RolloutDoc) -> String {
    let e = &d.evidence;
    let baseline = if d.baseline.is_empty() {
        "(the serving version)"
    } else {
        &d.baseline
    };
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "service:   {} (namespace {})",
        d.service, d.namespace
    ));
    line(format!("canary:    {}", d.canary));
    line(format!("baseline:  {baseline}"));
    line(format!("phase:     {}", d.phase_text));
    line(format!(
        "step:      {}/{} at {}% canary (steps {})",
        d.step_index.saturating_add(1).min(d.step_count),
        d.step_count,
        d.weight,
        d.spec
            .steps
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    ));
    if !d.message.is_empty() {
        line(format!("message:   {}", d.message));
    }
    line(format!(
        "started:   {}  updated: {}  (generation {})",
        d.started_at, d.updated_at, d.generation
    ));
    line("evidence:".to_string());
    line(format!(
        "  {:<9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "", "REQUESTS", "ERRORS", "ERROR%", "SLOW", "SLOW%", "P99"
    ));
    for (name, c, p99) in [
        ("canary", e.canary, e.canary_p99_ms),
        ("baseline", e.baseline, e.baseline_p99_ms),
    ] {
        line(format!(
            "  {:<9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10}",
            name,
            c.requests,
            c.errors,
            percent(c.error_rate),
            c.slow,
            percent(c.slow_rate),
            format!("{p99:.1}ms")
        ));
    }
    line(format!(
        "  this step: canary {} of {} requests needed ({} errors, {} slow); baseline {}",
        e.step_canary.requests,
        e.min_requests,
        e.step_canary.errors,
        e.step_canary.slow,
        e.step_baseline.requests
    ));
    line(format!(
        "  error E:   {:.3}  slow E: {:.3}  (aborts at E >= {:.0} = 1/alpha)",
        e.error_e, e.slow_e, e.abort_threshold
    ));
    line(format!(
        "  canary error rate, 95% upper bound: {}",
        percent(e.canary_error_rate_upper_95)
    ));
    line(format!(
        "  failed checks: {} of {}",
        e.failed_checks, e.max_failed_checks
    ));
    out
}

fn list_rows(docs: &[RolloutDoc]) -> Vec<Vec<String>> {
    docs.iter()
        .map(|d| {
            vec![
                d.service.clone(),
                d.canary.clone(),
                d.baseline.clone(),
                d.phase_text.clone(),
                format!(
                    "{}/{}",
                    d.step_index.saturating_add(1).min(d.step_count),
                    d.step_count
                ),
                format!("{}%", d.weight),
                format!(
                    "{:.2}/{:.0}",
                    d.evidence.error_e, d.evidence.abort_threshold
                ),
                format!("{:.2}/{:.0}", d.evidence.slow_e, d.evidence.abort_threshold),
                d.updated_at.clone(),
            ]
        })
        .collect()
}

const LIST_HEADER: [&str; 9] = [
    "SERVICE", "CANARY", "BASELINE", "PHASE", "STEP", "WEIGHT", "ERROR E", "SLOW E", "UPDATED",
];

/// What `status` concludes from a phase: `Ok` only for SUCCEEDED.
fn outcome(r: &pb::Rollout, d: &RolloutDoc, watching: bool) -> Result<(), CliError> {
    use pb::RolloutPhase as P;
    let phase = r.status.as_ref().map_or(P::Unspecified, |s| s.phase());
    let svc = &d.service;
    match phase {
        P::Succeeded => Ok(()),
        P::Aborted | P::Aborting => Err(CliError::new(
            EXIT_ROLLOUT_ABORTED,
            format!(
                "the rollout of {} to {svc} was aborted: requests go to the baseline; fix the canary and run `switchyard rollout retry {svc}`, or start another canary",
                d.canary
            ),
        )),
        P::Superseded => Err(CliError::new(
            EXIT_ROLLOUT_ABORTED,
            format!(
                "the rollout of {} to {svc} was superseded by a newer canary: see `switchyard rollout get {svc}`",
                d.canary
            ),
        )),
        P::Paused if !watching => Err(CliError::new(
            EXIT_ROLLOUT_UNFINISHED,
            format!(
                "the rollout of {} to {svc} is paused: `switchyard rollout promote {svc}` goes on, `switchyard rollout abort {svc}` goes back",
                d.canary
            ),
        )),
        _ => Err(CliError::new(
            EXIT_ROLLOUT_UNFINISHED,
            format!(
                "the rollout of {} to {svc} is {} and has not ended: wait with `switchyard rollout status {svc} --watch`",
                d.canary, d.phase_text
            ),
        )),
    }
}

fn is_terminal(r: &pb::Rollout) -> bool {
    use pb::RolloutPhase as P;
    matches!(
        r.status.as_ref().map_or(P::Unspecified, |s| s.phase()),
        P::Succeeded | P::Aborted | P::Superseded
    )
}

/// Errors a watch survives by reconnecting (a registry restarting, a leader change).
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

fn print_doc(d: &RolloutDoc, output: Output) -> Result<(), CliError> {
    match output {
        Output::Json => print_json(d),
        Output::Table => {
            println!("{}", brief(d));
            Ok(())
        }
    }
}

/// `status --watch`: prints every change of phase, step, weight or message until the
/// rollout ends. `last` keeps the newest rollout seen, for the timeout's message.
async fn follow(
    client: &mut RolloutsClient<Channel>,
    req: pb::RolloutRef,
    output: Output,
    last: &mut Option<pb::Rollout>,
) -> Result<(), CliError> {
    // Which rollout is followed: a newer one of the same service means it was superseded.
    let mut watched: Option<(String, u64)> = None;
    let mut printed = String::new();
    let mut backoff = Duration::from_millis(500);
    loop {
        let why = match client.watch(req.clone()).await {
            Err(s) if transient(&s) => s.message().to_string(),
            Err(s) => {
                return Err(rpc_error(
                    &format!("rollout of {}", req.service),
                    &req.service,
                    s,
                ))
            }
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            let Some(r) = resp.rollout else { continue };
                            backoff = Duration::from_millis(500);
                            let d = doc(&r);
                            let id = (
                                d.canary.clone(),
                                r.status.as_ref().map_or(0, |s| s.started_at_ms),
                            );
                            if let Some(prev) = &watched {
                                if *prev != id {
                                    return Err(CliError::new(
                                        EXIT_ROLLOUT_ABORTED,
                                        format!(
                                            "the rollout of {} to {} was superseded by a rollout of {}: follow that one with `switchyard rollout status {} --watch`",
                                            prev.0, d.service, d.canary, d.service
                                        ),
                                    ));
                                }
                            }
                            watched = Some(id);
                            let line = match output {
                                Output::Json => serde_json::to_string(&d).map_err(|e| {
                                    CliError::new(1, format!("cannot encode JSON: {e}"))
                                })?,
                                Output::Table => brief(&d),
                            };
                            // Evidence changes every interval; print what people follow.
                            let key = format!(
                                "{}|{}|{}|{}",
                                d.phase_text, d.step_index, d.weight, d.message
                            );
                            if key != printed {
                                println!("{line}");
                                printed = key;
                            }
                            let ended = is_terminal(&r).then(|| outcome(&r, &d, true));
                            *last = Some(r);
                            if let Some(result) = ended {
                                return result;
                            }
                        }
                        Ok(None) => break "the registry ended the stream".to_string(),
                        Err(s) if transient(&s) => break s.message().to_string(),
                        Err(s) => {
                            return Err(rpc_error(
                                &format!("rollout of {}", req.service),
                                &req.service,
                                s,
                            ))
                        }
                    }
                }
            }
        };
        eprintln!(
            "watch of {} interrupted ({why}); reconnecting in {backoff:?}",
            req.service
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A refused call through [`status_error`], with what to do for the answers this verb
/// group adds: a registry without rollouts, a canary already rolling out.
fn rpc_error(what: &str, service: &str, s: tonic::Status) -> CliError {
    let code = s.code();
    let mut e = status_error(what, s);
    match code {
        tonic::Code::Unimplemented => e.message.push_str(
            "; this registry does not run rollouts: upgrade it to a version with the Rollouts service",
        ),
        tonic::Code::AlreadyExists => e.message.push_str(&format!(
            "; follow it with `switchyard rollout status {service} --watch`"
        )),
        tonic::Code::NotFound => e.message.push_str(&format!(
            "; start one with `switchyard rollout start {service} --canary VERSION`"
        )),
        _ => {}
    }
    e
}

fn rollout_of(resp: pb::RolloutResponse, service: &str) -> Result<pb::Rollout, CliError> {
    resp.rollout.ok_or_else(|| {
        CliError::new(
            1,
            format!(
                "the registry answered without a rollout of {service}: is it older than this CLI?"
            ),
        )
    })
}

pub async fn run(args: RolloutArgs) -> Result<(), CliError> {
    // Checked before connecting: a bad flag needs no registry to be refused.
    let spec = match &args.verb {
        RolloutVerb::Start(a) => Some(build_spec(a)?),
        _ => None,
    };
    let mut client = RolloutsClient::new(channel(&args.registry.registry).await?);
    let ns = args.namespace.clone();
    let reference = |service: &str| pb::RolloutRef {
        namespace: ns.clone(),
        service: service.to_string(),
    };
    let what = |service: &str| format!("rollout of {service}");
    let output = args.output.output;
    let (service, resp) = match &args.verb {
        RolloutVerb::Start(a) => {
            let spec = spec.as_ref().map(spec_to_pb);
            let resp = client
                .start(pb::StartRolloutRequest {
                    namespace: ns.clone(),
                    service: a.service.clone(),
                    spec,
                })
                .await
                .map_err(|s| {
                    rpc_error(
                        &format!("cannot start the {}", what(&a.service)),
                        &a.service,
                        s,
                    )
                })?;
            eprintln!(
                "rollout of {} to {} started; follow it with `switchyard rollout status {} --watch`",
                a.canary, a.service, a.service
            );
            (a.service.clone(), resp)
        }
        RolloutVerb::Get { service } => {
            let r = client
                .get(reference(service))
                .await
                .map_err(|s| rpc_error(&what(service), service, s))?;
            let r = rollout_of(r.into_inner(), service)?;
            let d = doc(&r);
            return match output {
                Output::Json => print_json(&d),
                Output::Table => {
                    print!("{}", render_get(&d));
                    Ok(())
                }
            };
        }
        RolloutVerb::List => {
            let rollouts = client
                .list(pb::ListRolloutsRequest {
                    namespace: ns.clone(),
                })
                .await
                .map_err(|s| status_error("cannot list rollouts", s))?
                .into_inner()
                .rollouts;
            let docs: Vec<RolloutDoc> = rollouts.iter().map(doc).collect();
            return match output {
                Output::Json => print_json(&docs),
                Output::Table if docs.is_empty() => {
                    println!(
                        "no rollouts in namespace {ns:?}: start one with `switchyard rollout start SVC --canary VERSION`"
                    );
                    Ok(())
                }
                Output::Table => {
                    print_table(&LIST_HEADER, &list_rows(&docs));
                    Ok(())
                }
            };
        }
        RolloutVerb::Status {
            service,
            watch,
            timeout,
        } => {
            if !*watch {
                let r = client
                    .get(reference(service))
                    .await
                    .map_err(|s| rpc_error(&what(service), service, s))?;
                let r = rollout_of(r.into_inner(), service)?;
                let d = doc(&r);
                print_doc(&d, output)?;
                return outcome(&r, &d, false);
            }
            let mut last = None;
            let follow = follow(&mut client, reference(service), output, &mut last);
            if timeout.is_zero() {
                return follow.await;
            }
            return match tokio::time::timeout(*timeout, follow).await {
                Ok(result) => result,
                Err(_) => {
                    let now = last
                        .as_ref()
                        .map_or("not seen yet".to_string(), |r| doc(r).phase_text);
                    Err(CliError::new(
                        EXIT_ROLLOUT_UNFINISHED,
                        format!(
                            "the rollout of {service} has not ended after --timeout {}: it is {now}",
                            humantime::format_duration(*timeout)
                        ),
                    ))
                }
            };
        }
        RolloutVerb::Promote { service, full } => {
            let r = client
                .promote(pb::PromoteRolloutRequest {
                    namespace: ns.clone(),
                    service: service.clone(),
                    full: *full,
                })
                .await
                .map_err(|s| {
                    rpc_error(&format!("cannot promote the {}", what(service)), service, s)
                })?;
            (service.clone(), r)
        }
        RolloutVerb::Pause { service } => {
            let r = client.pause(reference(service)).await.map_err(|s| {
                rpc_error(&format!("cannot pause the {}", what(service)), service, s)
            })?;
            (service.clone(), r)
        }
        RolloutVerb::Abort { service } => {
            let r = client.abort(reference(service)).await.map_err(|s| {
                rpc_error(&format!("cannot abort the {}", what(service)), service, s)
            })?;
            (service.clone(), r)
        }
        RolloutVerb::Retry { service } => {
            let r = client.retry(reference(service)).await.map_err(|s| {
                rpc_error(&format!("cannot retry the {}", what(service)), service, s)
            })?;
            (service.clone(), r)
        }
        RolloutVerb::Undo {
            service,
            to_revision,
        } => {
            let r = client
                .undo(pb::UndoRolloutRequest {
                    namespace: ns.clone(),
                    service: service.clone(),
                    to_revision: *to_revision,
                })
                .await
                .map_err(|s| {
                    rpc_error(&format!("cannot undo the {}", what(service)), service, s)
                })?;
            (service.clone(), r)
        }
    };
    let r = rollout_of(resp.into_inner(), &service)?;
    print_doc(&doc(&r), output)
}
