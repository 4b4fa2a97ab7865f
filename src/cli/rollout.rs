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
    /// superseded, 3 while it is under way (or when --timeout passes with --watch). With
    /// -o json: the rollout's document (with --watch, one per line per change).
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
    /// The highest weight --step-weight's steps may reach before the final 100.
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

/// The wire form of a checked spec (0 for the absolute gates that are off): the same
/// conversion the registry uses.
pub use switchyard_core::convert::rollout_spec_to_proto as spec_to_pb;

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

/// `rollout get`'s table of a rollout (the demo prints it too).
pub fn render(r: &pb::Rollout) -> String {
    render_get(&doc(r))
}

/// `rollout status`'s one line of a rollout.
pub fn one_line(r: &pb::Rollout) -> String {
    brief(&doc(r))
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

/// What `status --watch` makes of the stream, one rollout at a time (kept apart from the
/// stream so it can be tested without a registry).
struct Follower {
    output: Output,
    /// The canary of the followed rollout: a rollout of another canary means it was
    /// superseded. (The canary alone tells: while a rollout is active the registry refuses
    /// another of the same canary, and once it has ended the watch has stopped.)
    watched: Option<String>,
    /// What was printed last, so evidence updates (every interval) do not repeat a line.
    printed: String,
}

/// One rollout seen by [`Follower::observe`]: the line to print, if it changed, and the
/// verdict once the rollout has ended.
struct Observed {
    line: Option<String>,
    end: Option<Result<(), CliError>>,
}

impl Follower {
    fn new(output: Output) -> Self {
        Self {
            output,
            watched: None,
            printed: String::new(),
        }
    }

    fn observe(&mut self, r: &pb::Rollout) -> Observed {
        let d = doc(r);
        if let Some(prev) = self.watched.as_ref().filter(|prev| **prev != d.canary) {
            return Observed {
                line: None,
                end: Some(Err(CliError::new(
                    EXIT_ROLLOUT_ABORTED,
                    format!(
                        "the rollout of {} to {} was superseded by a rollout of {}: follow that one with `switchyard rollout status {} --watch`",
                        prev, d.service, d.canary, d.service
                    ),
                ))),
            };
        }
        self.watched = Some(d.canary.clone());
        let key = format!(
            "{}|{}|{}|{}",
            d.phase_text, d.step_index, d.weight, d.message
        );
        let line = if key == self.printed {
            None
        } else {
            self.printed = key;
            Some(match self.output {
                // One document per line (JSON Lines), so a script can read it as it comes.
                Output::Json => serde_json::to_string(&d)
                    .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode JSON: {e}\"}}")),
                Output::Table => brief(&d),
            })
        };
        Observed {
            line,
            end: is_terminal(r).then(|| outcome(r, &d, true)),
        }
    }
}

/// `status --watch`: prints every change of phase, step, weight or message until the
/// rollout ends, reconnecting when the stream breaks (a registry restarting, a leader
/// change). `last` keeps the newest rollout seen, for the timeout's message.
async fn follow(
    client: &mut RolloutsClient<super::client::AuthChannel>,
    req: pb::RolloutRef,
    output: Output,
    last: &mut Option<pb::Rollout>,
) -> Result<(), CliError> {
    let what = format!("rollout of {}", req.service);
    let mut follower = Follower::new(output);
    let mut backoff = Duration::from_millis(500);
    loop {
        let why = match client.watch(req.clone()).await {
            Err(s) if transient(&s) => s.message().to_string(),
            Err(s) => return Err(rpc_error(&what, &req.service, s)),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            let Some(r) = resp.rollout else { continue };
                            backoff = Duration::from_millis(500);
                            let seen = follower.observe(&r);
                            if let Some(line) = seen.line {
                                println!("{line}");
                            }
                            *last = Some(r);
                            if let Some(result) = seen.end {
                                return result;
                            }
                        }
                        Ok(None) => break "the registry ended the stream".to_string(),
                        Err(s) if transient(&s) => break s.message().to_string(),
                        Err(s) => return Err(rpc_error(&what, &req.service, s)),
                    }
                }
            }
        };
        eprintln!(
            "watch of {} interrupted ({why}); reconnecting in {}",
            req.service,
            humantime::format_duration(backoff)
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A refused call through [`status_error`], with what to do for the answers this verb
/// group adds: a registry without rollouts, a canary already rolling out.
fn rpc_error(what: &str, service: &str, s: tonic::Status) -> CliError {
    let code = s.code();
    // A status without a message (e.g. a route the registry does not serve) still says
    // what went wrong.
    let s = if s.message().is_empty() {
        tonic::Status::new(code, format!("{code:?}: {}", code.description()))
    } else {
        s
    };
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
                .map_err(|s| rpc_error("cannot list rollouts", "SVC", s))?
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: RolloutArgs,
    }

    fn parse(argv: &[&str]) -> Result<RolloutArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("rollout").chain(argv.iter().copied())).map(|c| c.args)
    }

    /// `rollout start web --canary 2.0.0 <extra>`'s flags.
    fn start(extra: &[&str]) -> Result<StartArgs, clap::Error> {
        let mut argv = vec!["start", "web", "--canary", "2.0.0"];
        argv.extend_from_slice(extra);
        match parse(&argv)?.verb {
            RolloutVerb::Start(a) => Ok(*a),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn spec(extra: &[&str]) -> Result<RolloutSpec, CliError> {
        build_spec(&start(extra).expect("flags parse"))
    }

    fn refused(extra: &[&str]) -> String {
        let e = spec(extra).expect_err("refused");
        assert_eq!(e.code, EXIT_CONFIG, "{}", e.message);
        e.message
    }

    #[test]
    fn start_without_flags_sends_the_registry_defaults() {
        let s = spec(&[]).expect("valid");
        assert_eq!(s, RolloutSpec::new("2.0.0"));
        let p = spec_to_pb(&s);
        assert_eq!(p.steps, vec![5, 25, 50, 100]);
        assert_eq!((p.pause_ms, p.interval_ms), (60_000, 10_000));
        assert_eq!((p.alpha, p.tolerance, p.min_requests), (0.05, 1.0, 100));
        assert_eq!(p.step_deadline_ms, 600_000);
        assert_eq!(
            p.on_insufficient_traffic,
            pb::InsufficientTraffic::Pause as i32
        );
        assert_eq!(
            (p.max_error_rate, p.max_p99_ms, p.latency_slo_ms),
            (0.0, 0, 0)
        );
        assert!(p.baseline.is_empty() && p.webhooks.is_empty() && !p.manual_promotion);
    }

    #[test]
    fn every_start_flag_reaches_the_wire() {
        let s = spec(&[
            "--baseline",
            "1.4.2",
            "--steps",
            "10, 20,100",
            "--pause",
            "30s",
            "--interval",
            "500ms",
            "--alpha",
            "0.01",
            "--tolerance",
            "1.5",
            "--min-requests",
            "50",
            "--latency-slo",
            "250ms",
            "--step-deadline",
            "2m",
            "--manual-promotion",
            "--on-insufficient-traffic",
            "abort",
            "--max-error-rate",
            "0.02",
            "--max-p99",
            "1s",
            "--webhook",
            "pre-rollout=http://loadtester.test/",
            "--webhook",
            "rollback=http://gate.test/rollback",
        ])
        .expect("valid");
        let p = spec_to_pb(&s);
        assert_eq!(p.baseline, "1.4.2");
        assert_eq!(p.steps, vec![10, 20, 100]);
        assert_eq!(
            (p.pause_ms, p.interval_ms, p.step_deadline_ms),
            (30_000, 500, 120_000)
        );
        assert_eq!((p.alpha, p.tolerance, p.min_requests), (0.01, 1.5, 50));
        assert_eq!(
            (p.latency_slo_ms, p.max_p99_ms, p.max_error_rate),
            (250, 1_000, 0.02)
        );
        assert!(p.manual_promotion);
        assert_eq!(
            p.on_insufficient_traffic,
            pb::InsufficientTraffic::Abort as i32
        );
        let hooks: Vec<_> = p
            .webhooks
            .iter()
            .map(|w| (w.r#type.as_str(), w.url.as_str()))
            .collect();
        assert_eq!(
            hooks,
            vec![
                ("pre-rollout", "http://loadtester.test/"),
                ("rollback", "http://gate.test/rollback")
            ]
        );
    }

    #[test]
    fn steps_parse_as_percent_weights() {
        assert_eq!(parse_steps("5,25,50,100"), Ok(Steps(vec![5, 25, 50, 100])));
        assert_eq!(parse_steps(" 50 , 100 "), Ok(Steps(vec![50, 100])));
        for bad in ["", "5,,100", "0,100", "5,101", "x", "5;100", "-5,100"] {
            let e = parse_steps(bad).expect_err(bad);
            assert!(e.contains("1-100"), "{bad}: {e}");
        }
        assert!(start(&["--steps", "5,x"]).is_err());
        // Order and the final 100 are the registry's rules, checked before the call.
        assert!(refused(&["--steps", "50,25,100"]).starts_with("--steps"));
        assert!(refused(&["--steps", "5,50"]).contains("must be 100"));
    }

    #[test]
    fn step_weight_makes_steps_and_conflicts_with_steps() {
        assert_eq!(
            spec(&["--step-weight", "20", "--max-weight", "60"])
                .expect("valid")
                .steps,
            vec![20, 40, 60, 100]
        );
        assert_eq!(
            spec(&["--step-weight", "30"]).expect("valid").steps,
            vec![30, 60, 90, 100]
        );
        assert_eq!(
            spec(&["--step-weight", "50", "--max-weight", "100"])
                .expect("valid")
                .steps,
            vec![50, 100]
        );
        let e = start(&["--steps", "5,100", "--step-weight", "10"]).expect_err("conflict");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = start(&["--steps", "5,100", "--max-weight", "50"]).expect_err("conflict");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = start(&["--max-weight", "50"]).expect_err("needs --step-weight");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(refused(&["--step-weight", "0"]).contains("1-100"));
        assert!(refused(&["--step-weight", "1", "--max-weight", "99"]).contains("more than"));
    }

    #[test]
    fn bad_webhooks_are_refused_while_parsing() {
        for (flag, says) in [
            ("nope", "TYPE=URL"),
            ("deploy=http://x.test/", "unknown webhook type"),
            ("pre-rollout=https://x.test/", "https"),
            ("pre-rollout=http://user:pw@x.test/", "userinfo"),
            ("rollout=ftp://x.test/", "http://"),
            ("rollout=http:///path", "no host"),
        ] {
            let e = start(&["--webhook", flag]).expect_err(flag);
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag}");
            assert!(e.to_string().contains(says), "{flag}: {e}");
        }
        let too_many: Vec<&str> = std::iter::repeat_n(["--webhook", "rollout=http://x.test/"], 17)
            .flatten()
            .collect();
        assert!(refused(&too_many).starts_with("--webhook"));
    }

    #[test]
    fn durations_take_the_repository_formats_and_zero_is_refused_where_it_means_default() {
        assert_eq!(spec(&["--pause", "90"]).expect("valid").pause_ms, 90_000);
        let s = spec(&["--pause", "1m 30s"]).expect("valid");
        assert_eq!((s.pause_ms, s.step_deadline_ms), (90_000, 900_000));
        assert!(start(&["--pause", "soon"]).is_err());
        assert!(start(&["--interval", "-5s"]).is_err());
        assert!(refused(&["--pause", "0s"]).contains("at least 1ms"));
        assert!(refused(&["--step-deadline", "0s"]).starts_with("--step-deadline"));
        assert!(refused(&["--max-p99", "0s"]).starts_with("--max-p99"));
        assert!(refused(&["--interval", "50ms"]).starts_with("--interval"));
        assert!(refused(&["--pause", "1m", "--step-deadline", "30s"])
            .contains("shorter than the pause"));
        assert!(refused(&["--pause", "8d"]).starts_with("--pause"));
        assert_eq!(
            spec(&["--latency-slo", "0s"])
                .expect("0 means p95")
                .latency_slo_ms,
            0
        );
    }

    #[test]
    fn other_bad_values_name_their_flag() {
        assert!(refused(&["--alpha", "0"]).starts_with("--alpha"));
        assert!(refused(&["--alpha", "1.5"]).starts_with("--alpha"));
        assert!(refused(&["--alpha", "NaN"]).starts_with("--alpha"));
        assert!(refused(&["--tolerance", "0.5"]).starts_with("--tolerance"));
        assert!(refused(&["--min-requests", "0"]).starts_with("--min-requests"));
        assert!(refused(&["--max-error-rate", "2"]).starts_with("--max-error-rate"));
        assert!(refused(&["--baseline", "2.0.0"]).starts_with("--baseline"));
        assert!(refused(&["--baseline", "bad version!"]).starts_with("--baseline"));
        assert!(start(&["--on-insufficient-traffic", "wait"]).is_err());
        assert_eq!(
            spec(&["--on-insufficient-traffic", "promote"])
                .expect("valid")
                .on_insufficient_traffic,
            OnInsufficientTraffic::Promote
        );
        let argv = ["start", "web", "--canary", "bad version!"];
        let RolloutVerb::Start(a) = parse(&argv).expect("flags").verb else {
            panic!("not start")
        };
        let e = build_spec(&a).expect_err("bad canary");
        assert!(e.message.starts_with("--canary"), "{}", e.message);
    }

    #[test]
    fn control_verbs_parse() {
        let a = parse(&[
            "undo",
            "web",
            "--to-revision",
            "7",
            "-n",
            "shop",
            "-o",
            "json",
        ])
        .expect("valid");
        assert!(matches!(a.verb, RolloutVerb::Undo { to_revision: 7, .. }));
        assert_eq!(
            (a.namespace.as_str(), a.output.output),
            ("shop", Output::Json)
        );
        assert!(matches!(
            parse(&["undo", "web"]).expect("valid").verb,
            RolloutVerb::Undo { to_revision: 0, .. }
        ));
        assert!(matches!(
            parse(&["promote", "web", "--full"]).expect("valid").verb,
            RolloutVerb::Promote { full: true, .. }
        ));
        let a = parse(&["status", "web", "--watch", "--timeout", "5m"]).expect("valid");
        let RolloutVerb::Status { watch, timeout, .. } = a.verb else {
            panic!("not status")
        };
        assert!(watch);
        assert_eq!(timeout, Duration::from_secs(300));
        let RolloutVerb::Status { watch, timeout, .. } =
            parse(&["status", "web"]).expect("valid").verb
        else {
            panic!("not status")
        };
        assert!(!watch && timeout.is_zero());
        for verb in [
            "get", "pause", "abort", "retry", "status", "promote", "undo",
        ] {
            assert!(parse(&[verb]).is_err(), "{verb} needs SVC");
        }
        assert!(parse(&["list"]).is_ok());
    }

    /// Every flag of every rollout verb has a `SWITCHYARD_*` variable, and its default is
    /// shown by `--help` (clap's `[default: …]`, or "default:" in the text where the
    /// default is not a value, such as "10 x --pause"); switches default to off.
    #[test]
    fn every_flag_has_a_variable_and_shows_its_default() {
        let mut cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || id == "help" {
                    continue;
                }
                let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
                assert!(
                    env.starts_with("SWITCHYARD_"),
                    "{} --{id} has no variable",
                    sub.get_name()
                );
                if !arg.is_global_set() {
                    let prefix = format!("SWITCHYARD_ROLLOUT_{}_", sub.get_name().to_uppercase());
                    assert!(env.starts_with(&prefix), "{} --{id}: {env}", sub.get_name());
                }
                // A required flag has no default; a switch defaults to off.
                let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    switch
                        || arg.is_required_set()
                        || !arg.get_default_values().is_empty()
                        || help.contains("default:"),
                    "{} --{id} does not show its default",
                    sub.get_name()
                );
            }
        }
        let help = cmd
            .find_subcommand_mut("start")
            .expect("start")
            .render_long_help()
            .to_string();
        for shown in [
            "[default: 5,25,50,100]",
            "[default: 60s]",
            "[default: 10s]",
            "[default: 0.05]",
            "[default: 1]",
            "[default: 100]",
            "(default: 10 x --pause)",
            "[default: pause]",
            "[env: SWITCHYARD_ROLLOUT_START_STEPS=]",
        ] {
            assert!(help.contains(shown), "start --help lacks {shown}:\n{help}");
        }
    }

    fn counts(requests: u64, errors: u64, slow: u64) -> Option<pb::RolloutCounts> {
        Some(pb::RolloutCounts {
            requests,
            errors,
            slow,
        })
    }

    /// A rollout of web 2.0.0 paused for traffic at step 2 of 4, with evidence.
    fn sample(phase: pb::RolloutPhase) -> pb::Rollout {
        pb::Rollout {
            namespace: "default".into(),
            service: "web".into(),
            spec: Some(spec_to_pb(&RolloutSpec::new("2.0.0"))),
            status: Some(pb::RolloutStatus {
                phase: phase as i32,
                pause_reason: pb::PauseReason::InsufficientTraffic as i32,
                step: 1,
                weight: 25,
                message: "step 2 has 40 of 100 canary requests".into(),
                generation: 9,
                started_at_ms: 1_795_700_000_000,
                updated_at_ms: 1_795_700_060_000,
                step_started_at_ms: 1_795_700_030_000,
                evidence: Some(pb::RolloutEvidence {
                    canary: counts(1_000, 5, 20),
                    baseline: counts(20_000, 60, 300),
                    step_canary: counts(40, 1, 2),
                    step_baseline: counts(900, 3, 10),
                    error_e: 4.2,
                    slow_e: 0.75,
                    canary_error_rate_upper_95: 0.0109,
                    canary_p99_ms: 48.5,
                    baseline_p99_ms: 41.0,
                    failed_checks: 1,
                }),
                base_policy_revision: 12,
            }),
        }
    }

    #[test]
    fn get_prints_the_phase_the_step_and_the_evidence() {
        let d = doc(&sample(pb::RolloutPhase::Paused));
        let text = render_get(&d);
        for shown in [
            "service:   web (namespace default)",
            "canary:    2.0.0",
            "baseline:  (the serving version)",
            "phase:     Paused (insufficient traffic)",
            "step:      2/4 at 25% canary (steps 5,25,50,100)",
            "message:   step 2 has 40 of 100 canary requests",
            "2026-11-26T13:33:20Z",
            "canary 40 of 100 requests needed",
            "0.50%",
            "0.30%",
            "48.5ms",
            "41.0ms",
            "error E:   4.200  slow E: 0.750  (aborts at E >= 20 = 1/alpha)",
            "95% upper bound: 1.09%",
            "failed checks: 1 of 5",
        ] {
            assert!(text.contains(shown), "lacks {shown:?}:\n{text}");
        }
        assert_eq!(
            brief(&d),
            "web: Paused (insufficient traffic), step 2/4 at 25% canary: step 2 has 40 of 100 canary requests"
        );
        // The pause reason belongs to PAUSED only.
        let d = doc(&sample(pb::RolloutPhase::Progressing));
        assert_eq!(d.phase_text, "Progressing");
        assert_eq!(d.pause_reason, None);
    }

    #[test]
    fn json_is_a_stable_snake_case_document() {
        let v = serde_json::to_value(doc(&sample(pb::RolloutPhase::Paused))).expect("json");
        assert_eq!(v["service"], "web");
        assert_eq!(v["canary"], "2.0.0");
        assert_eq!(v["phase"], "paused");
        assert_eq!(v["pause_reason"], "insufficient_traffic");
        assert_eq!(
            (
                v["step_index"].clone(),
                v["step_count"].clone(),
                v["weight"].clone()
            ),
            (1.into(), 4.into(), 25.into())
        );
        assert_eq!(v["updated_at"], "2026-11-26T13:34:20Z");
        assert_eq!(v["base_policy_revision"], 12);
        assert_eq!(v["spec"]["steps"], serde_json::json!([5, 25, 50, 100]));
        assert_eq!(v["spec"]["on_insufficient_traffic"], "pause");
        assert_eq!(v["spec"]["max_error_rate"], serde_json::Value::Null);
        let e = &v["evidence"];
        assert_eq!(e["canary"]["requests"], 1_000);
        assert_eq!(e["canary"]["error_rate"], 0.005);
        assert_eq!(e["baseline"]["slow"], 300);
        assert_eq!(e["step_canary"]["requests"], 40);
        assert_eq!(e["min_requests"], 100);
        assert_eq!(e["error_e"], 4.2);
        assert_eq!(e["slow_e"], 0.75);
        assert_eq!(e["abort_threshold"], 20.0);
        assert_eq!(e["canary_error_rate_upper_95"], 0.0109);
        assert_eq!(
            (e["canary_p99_ms"].clone(), e["baseline_p99_ms"].clone()),
            (48.5.into(), 41.0.into())
        );
        assert_eq!(
            (e["failed_checks"].clone(), e["max_failed_checks"].clone()),
            (1.into(), 5.into())
        );
        assert!(v.get("phase_text").is_none(), "table-only fields stay out");
        // A rollout the registry sent without a status or spec still renders.
        let empty = doc(&pb::Rollout::default());
        assert_eq!(empty.phase, "unknown");
        assert_eq!(empty.evidence.abort_threshold, 20.0);
        render_get(&empty);
    }

    #[test]
    fn list_has_one_row_per_rollout() {
        let docs = vec![doc(&sample(pb::RolloutPhase::Progressing))];
        let rows = list_rows(&docs);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].len(), LIST_HEADER.len());
        assert_eq!(
            rows[0],
            vec![
                "web",
                "2.0.0",
                "",
                "Progressing",
                "2/4",
                "25%",
                "4.20/20",
                "0.75/20",
                "2026-11-26T13:34:20Z"
            ]
        );
    }

    #[test]
    fn status_exits_zero_only_when_succeeded() {
        let code = |phase, watching| {
            let r = sample(phase);
            outcome(&r, &doc(&r), watching).err().map(|e| e.code)
        };
        use pb::RolloutPhase as P;
        assert_eq!(code(P::Succeeded, false), None);
        assert_eq!(code(P::Aborted, false), Some(EXIT_ROLLOUT_ABORTED));
        assert_eq!(code(P::Aborting, false), Some(EXIT_ROLLOUT_ABORTED));
        assert_eq!(code(P::Superseded, false), Some(EXIT_ROLLOUT_ABORTED));
        for p in [
            P::Pending,
            P::Initializing,
            P::Progressing,
            P::Promoting,
            P::Paused,
            P::Unspecified,
        ] {
            assert_eq!(code(p, false), Some(EXIT_ROLLOUT_UNFINISHED), "{p:?}");
        }
        assert_ne!(EXIT_ROLLOUT_ABORTED, EXIT_ROLLOUT_UNFINISHED);
        assert!(
            ![0, 2, EXIT_CONFIG, super::super::EXIT_UNAVAILABLE].contains(&EXIT_ROLLOUT_UNFINISHED)
        );
    }

    #[test]
    fn watch_prints_changes_and_ends_on_a_terminal_phase() {
        use pb::RolloutPhase as P;
        let mut f = Follower::new(Output::Table);
        let mut r = sample(P::Progressing);
        let seen = f.observe(&r);
        assert!(seen
            .line
            .expect("first line")
            .starts_with("web: Progressing, step 2/4"));
        assert!(seen.end.is_none());
        // New evidence alone prints nothing.
        if let Some(s) = r.status.as_mut() {
            s.evidence = None;
            s.generation += 1;
        }
        let seen = f.observe(&r);
        assert!(seen.line.is_none() && seen.end.is_none());
        if let Some(s) = r.status.as_mut() {
            s.phase = P::Paused as i32;
        }
        assert!(f.observe(&r).end.is_none(), "a pause is waited out");
        if let Some(s) = r.status.as_mut() {
            s.phase = P::Succeeded as i32;
            s.step = 3;
            s.weight = 100;
            s.message = "promoted".into();
        }
        let seen = f.observe(&r);
        assert_eq!(
            seen.line.as_deref(),
            Some("web: Succeeded, step 4/4 at 100% canary: promoted")
        );
        assert!(matches!(seen.end, Some(Ok(()))));

        let mut f = Follower::new(Output::Table);
        let seen = f.observe(&sample(P::Aborted));
        assert_eq!(
            seen.end.and_then(|r| r.err()).map(|e| e.code),
            Some(EXIT_ROLLOUT_ABORTED)
        );
    }

    #[test]
    fn watch_notices_a_newer_rollout_and_prints_json_lines() {
        let mut f = Follower::new(Output::Json);
        let first = f.observe(&sample(pb::RolloutPhase::Progressing));
        let line = first.line.expect("a line");
        assert!(!line.contains('\n'), "one document per line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["phase"], "progressing");
        let mut newer = sample(pb::RolloutPhase::Pending);
        if let Some(s) = newer.spec.as_mut() {
            s.canary = "3.0.0".into();
        }
        let e = f
            .observe(&newer)
            .end
            .and_then(|r| r.err())
            .expect("superseded");
        assert_eq!(e.code, EXIT_ROLLOUT_ABORTED);
        assert!(
            e.message.contains("superseded by a rollout of 3.0.0"),
            "{}",
            e.message
        );
    }

    #[test]
    fn refusals_tell_what_to_do() {
        let e = rpc_error(
            "rollout of web",
            "web",
            tonic::Status::not_found("no rollout of web"),
        );
        assert_eq!(e.code, EXIT_CONFIG);
        assert!(
            e.message.contains("rollout start web --canary"),
            "{}",
            e.message
        );
        let e = rpc_error("x", "web", tonic::Status::unimplemented(""));
        assert!(e.message.contains("does not run rollouts"), "{}", e.message);
        let e = rpc_error(
            "x",
            "web",
            tonic::Status::already_exists("2.0.0 is rolling out"),
        );
        assert!(e.message.contains("status web --watch"), "{}", e.message);
        assert!(transient(&tonic::Status::unavailable("leader changed")));
        assert!(!transient(&tonic::Status::not_found("gone")));
    }

    /// A fake `Rollouts` server (a test double in the way of `switchyard_testkit::fake`,
    /// not the registry's): `get` answers one rollout, each `watch` plays the next
    /// script, then ends the stream or stays open.
    mod fake {
        use std::collections::VecDeque;
        use std::pin::Pin;
        use std::sync::{Arc, Mutex};

        use switchyard_proto::v1 as pb;
        use switchyard_proto::v1::rollouts_server::{Rollouts, RolloutsServer};
        use tokio_stream::{Stream, StreamExt};
        use tonic::transport::server::TcpIncoming;
        use tonic::{Request, Response, Status};

        pub struct Script {
            pub items: Vec<Result<pb::Rollout, Status>>,
            /// Stay open after the items (a watch that sees no further change).
            pub hang: bool,
        }

        #[derive(Default)]
        pub struct Fake {
            pub rollout: Mutex<Option<pb::Rollout>>,
            pub scripts: Mutex<VecDeque<Script>>,
            pub watches: Mutex<u32>,
            pub requests: Mutex<Vec<String>>,
            pub started: Mutex<Vec<pb::StartRolloutRequest>>,
        }

        impl Fake {
            fn answer(&self, what: String) -> Result<Response<pb::RolloutResponse>, Status> {
                self.requests.lock().expect("lock").push(what);
                match self.rollout.lock().expect("lock").clone() {
                    Some(r) => Ok(Response::new(pb::RolloutResponse { rollout: Some(r) })),
                    None => Err(Status::not_found("no rollout of web")),
                }
            }
        }

        type Watch = Pin<Box<dyn Stream<Item = Result<pb::RolloutResponse, Status>> + Send>>;

        #[tonic::async_trait]
        impl Rollouts for Fake {
            async fn start(
                &self,
                r: Request<pb::StartRolloutRequest>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.started.lock().expect("lock").push(r.into_inner());
                self.answer("start".into())
            }
            async fn get(
                &self,
                r: Request<pb::RolloutRef>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.answer(format!("get {}", r.into_inner().service))
            }
            async fn list(
                &self,
                _: Request<pb::ListRolloutsRequest>,
            ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
                let rollouts = self
                    .rollout
                    .lock()
                    .expect("lock")
                    .clone()
                    .into_iter()
                    .collect();
                Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
            }
            type WatchStream = Watch;
            async fn watch(&self, _: Request<pb::RolloutRef>) -> Result<Response<Watch>, Status> {
                *self.watches.lock().expect("lock") += 1;
                let script = self.scripts.lock().expect("lock").pop_front();
                let Some(script) = script else {
                    return Err(Status::not_found("no rollout of web"));
                };
                let items = tokio_stream::iter(
                    script
                        .items
                        .into_iter()
                        .map(|r| r.map(|r| pb::RolloutResponse { rollout: Some(r) })),
                );
                let stream: Watch = if script.hang {
                    Box::pin(items.chain(tokio_stream::pending()))
                } else {
                    Box::pin(items)
                };
                Ok(Response::new(stream))
            }
            async fn promote(
                &self,
                r: Request<pb::PromoteRolloutRequest>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.answer(format!("promote full={}", r.into_inner().full))
            }
            async fn pause(
                &self,
                _: Request<pb::RolloutRef>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.answer("pause".into())
            }
            async fn abort(
                &self,
                _: Request<pb::RolloutRef>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.answer("abort".into())
            }
            async fn retry(
                &self,
                _: Request<pb::RolloutRef>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.answer("retry".into())
            }
            async fn undo(
                &self,
                r: Request<pb::UndoRolloutRequest>,
            ) -> Result<Response<pb::RolloutResponse>, Status> {
                self.answer(format!("undo {}", r.into_inner().to_revision))
            }
        }

        /// Serves `fake` on `127.0.0.1:0` until the test's runtime ends; its URL.
        pub async fn serve(fake: Arc<Fake>) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the fake");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(RolloutsServer::from_arc(fake))
                    .serve_with_incoming(TcpIncoming::from(listener))
                    .await;
            });
            format!("http://{addr}")
        }
    }

    async fn run_against(fake: &std::sync::Arc<fake::Fake>, argv: &[&str]) -> Result<(), CliError> {
        let url = fake::serve(fake.clone()).await;
        let mut full = argv.to_vec();
        full.extend(["--registry", url.as_str()]);
        run(parse(&full).expect("flags")).await
    }

    fn with_phase(phase: pb::RolloutPhase) -> Option<pb::Rollout> {
        Some(sample(phase))
    }

    #[tokio::test]
    async fn start_sends_the_checked_spec_and_bad_flags_need_no_registry() {
        let f = std::sync::Arc::new(fake::Fake::default());
        *f.rollout.lock().expect("lock") = with_phase(pb::RolloutPhase::Pending);
        run_against(&f, &["start", "web", "--canary", "2.0.0", "-n", "shop"])
            .await
            .expect("started");
        let started = f.started.lock().expect("lock").clone();
        assert_eq!(started.len(), 1);
        assert_eq!(
            (started[0].namespace.as_str(), started[0].service.as_str()),
            ("shop", "web")
        );
        assert_eq!(
            started[0].spec,
            Some(spec_to_pb(&RolloutSpec::new("2.0.0")))
        );
        // Refused before any call: nothing listens at this registry.
        let args = parse(&[
            "start",
            "web",
            "--canary",
            "2.0.0",
            "--alpha",
            "2",
            "--registry",
            "http://127.0.0.1:1",
        ])
        .expect("flags");
        assert_eq!(run(args).await.expect_err("refused").code, EXIT_CONFIG);
    }

    #[tokio::test]
    async fn control_verbs_call_their_rpc() {
        let f = std::sync::Arc::new(fake::Fake::default());
        *f.rollout.lock().expect("lock") = with_phase(pb::RolloutPhase::Paused);
        for argv in [
            &["promote", "web", "--full"][..],
            &["pause", "web"],
            &["abort", "web"],
            &["retry", "web"],
            &["undo", "web", "--to-revision", "4"],
            &["get", "web", "-o", "json"],
            &["list"],
        ] {
            run_against(&f, argv).await.expect("answered");
        }
        assert_eq!(
            *f.requests.lock().expect("lock"),
            vec![
                "promote full=true",
                "pause",
                "abort",
                "retry",
                "undo 4",
                "get web"
            ]
        );
        *f.rollout.lock().expect("lock") = None;
        let e = run_against(&f, &["get", "web"]).await.expect_err("none");
        assert_eq!(e.code, EXIT_CONFIG);
        assert!(e.message.contains("rollout start web"), "{}", e.message);
    }

    #[tokio::test]
    async fn status_without_watch_exits_by_phase() {
        let f = std::sync::Arc::new(fake::Fake::default());
        for (phase, code) in [
            (pb::RolloutPhase::Succeeded, None),
            (pb::RolloutPhase::Aborted, Some(EXIT_ROLLOUT_ABORTED)),
            (pb::RolloutPhase::Progressing, Some(EXIT_ROLLOUT_UNFINISHED)),
        ] {
            *f.rollout.lock().expect("lock") = with_phase(phase);
            let got = run_against(&f, &["status", "web"])
                .await
                .err()
                .map(|e| e.code);
            assert_eq!(got, code, "{phase:?}");
        }
    }

    #[tokio::test]
    async fn watch_reconnects_after_a_broken_stream_and_ends_on_success() {
        use pb::RolloutPhase as P;
        let f = std::sync::Arc::new(fake::Fake::default());
        let mut done = sample(P::Succeeded);
        if let Some(s) = done.status.as_mut() {
            (s.step, s.weight) = (3, 100);
        }
        f.scripts.lock().expect("lock").extend([
            fake::Script {
                items: vec![
                    Ok(sample(P::Progressing)),
                    Err(tonic::Status::unavailable("leader changed")),
                ],
                hang: false,
            },
            fake::Script {
                items: vec![Ok(sample(P::Progressing))],
                hang: false,
            },
            fake::Script {
                items: vec![Ok(sample(P::Paused)), Ok(done)],
                hang: true,
            },
        ]);
        run_against(&f, &["status", "web", "--watch", "--timeout", "30s"])
            .await
            .expect("succeeded");
        assert_eq!(*f.watches.lock().expect("lock"), 3);
    }

    #[tokio::test]
    async fn watch_gives_up_at_the_timeout_and_on_a_refusal() {
        let f = std::sync::Arc::new(fake::Fake::default());
        f.scripts.lock().expect("lock").push_back(fake::Script {
            items: vec![Ok(sample(pb::RolloutPhase::Progressing))],
            hang: true,
        });
        let e = run_against(&f, &["status", "web", "--watch", "--timeout", "300ms"])
            .await
            .expect_err("timed out");
        assert_eq!(e.code, EXIT_ROLLOUT_UNFINISHED);
        assert!(
            e.message
                .contains("after --timeout 300ms: it is Progressing"),
            "{}",
            e.message
        );
        // No script left: the fake refuses with NOT_FOUND, which is not retried.
        let e = run_against(&f, &["status", "web", "--watch"])
            .await
            .expect_err("refused");
        assert_eq!(e.code, EXIT_CONFIG);
        f.scripts.lock().expect("lock").push_back(fake::Script {
            items: vec![Ok(sample(pb::RolloutPhase::Aborted))],
            hang: true,
        });
        let e = run_against(&f, &["status", "web", "-w"])
            .await
            .expect_err("aborted");
        assert_eq!(e.code, EXIT_ROLLOUT_ABORTED);
    }
}
