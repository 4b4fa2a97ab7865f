//! The leader's rollout loop: every tick, each active rollout is looked at once and
//! moved by at most one `PutRollout` (compare-and-set on its generation, so a verb a
//! user sent meanwhile wins and the loop looks again next tick).
//!
//! Only the leader runs it, as it runs lease expiry. What it keeps in memory is only how
//! far it has read the telemetry ring (slot numbers are this node's own clock); a new
//! leader starts reading at its current slot and continues from the evidence totals
//! and `ln Λ` the log holds. Webhooks are called from here only, one at a time, each
//! bounded by the caller's timeout.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::evidence::{abort_reason, enough_traffic, fold};
use super::now_ms;
use super::transitions::{self, Transition};
use crate::catalog::Command;
use crate::model::rollout::{
    OnInsufficientTraffic, PauseReason, Phase, Rollout, MAX_FAILED_CHECKS,
};
use crate::model::{Policy, State, WebhookKind};
use crate::raft::propose::Proposer;
use crate::rollout_hooks::{HookCaller, HookPayload, DEFAULT_HOOK_TIMEOUT};
use crate::shared::Shared;

/// How often the loop looks at every active rollout.
pub const TICK: Duration = Duration::from_millis(250);

/// What the loop remembers of one rollout between ticks (never replicated).
struct Tracked {
    /// Telemetry slots below this one are already folded into the rollout's evidence.
    next_slot: u64,
    last_eval: Option<Instant>,
    /// When a waiting gate or the rollback hooks were last called.
    last_hooks: Option<Instant>,
}

/// What one tick learned about a rollout's service.
struct Seen {
    canary_serving: usize,
    baseline_serving: usize,
    policy: Option<Arc<Policy>>,
}

pub async fn rollout_loop(
    shared: Arc<Shared>,
    proposer: Proposer,
    mut shutdown: watch::Receiver<bool>,
) {
    let hooks = HookCaller::new(DEFAULT_HOOK_TIMEOUT);
    let mut tracked: HashMap<(String, String), Tracked> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if !proposer.is_leader() {
            tracked.clear();
            continue;
        }
        let active = shared.catalog.read().active_rollouts();
        tracked.retain(|k, _| {
            active
                .iter()
                .any(|r| r.namespace == k.0 && r.service == k.1)
        });
        for r in active {
            let key = (r.namespace.clone(), r.service.clone());
            let slot = shared.telemetry.current_slot(shared.telemetry.now_ms());
            let t = tracked.entry(key).or_insert(Tracked {
                next_slot: slot,
                last_eval: None,
                last_hooks: None,
            });
            let (transition, next_slot) = decide(&shared, &hooks, &r, t).await;
            let Some(transition) = transition else {
                t.next_slot = next_slot;
                continue;
            };
            let phase = transition.rollout.status.phase;
            let command = Command::PutRollout {
                rollout: Box::new(transition.rollout),
                expected_generation: r.status.generation,
                start: false,
                policy: transition.policy,
                at_ms: now_ms(),
            };
            match proposer.propose(command).await {
                Ok(reply) => {
                    t.next_slot = next_slot;
                    shared.metrics.rollout_transition(phase.as_str());
                    if let crate::catalog::Reply::Rollout { rollout, .. } = &reply {
                        shared.metrics.set_rollout(rollout);
                    }
                    if phase != r.status.phase {
                        tracing::info!(
                            namespace = %r.namespace,
                            service = %r.service,
                            canary = %r.spec.canary,
                            from = r.status.phase.as_str(),
                            to = phase.as_str(),
                            "rollout moved"
                        );
                    }
                    if matches!(phase, Phase::Succeeded | Phase::Aborted) {
                        call_all(&hooks, &r, WebhookKind::PostRollout, phase).await;
                    }
                }
                // A user's verb or another leader changed it first: look again next tick.
                Err(e) => {
                    tracing::debug!(service = %r.service, error = %e, "rollout transition not applied")
                }
            }
        }
    }
}

fn seen(shared: &Shared, r: &Rollout) -> Seen {
    let catalog = shared.catalog.read();
    let serving = |version: &str| {
        catalog
            .resolve(&r.namespace, &r.service, version)
            .iter()
            .filter(|i| i.state == State::Serving)
            .count()
    };
    Seen {
        canary_serving: serving(&r.spec.canary),
        baseline_serving: serving(&r.spec.baseline),
        policy: catalog.current_policy(&r.namespace, &r.service),
    }
}

fn payload<'a>(
    r: &'a Rollout,
    checksum: &'a str,
    kind: WebhookKind,
    phase: Phase,
) -> HookPayload<'a> {
    HookPayload {
        name: &r.service,
        namespace: &r.namespace,
        phase: phase.as_str(),
        checksum,
        kind,
        metadata: BTreeMap::from([
            ("canary".to_string(), r.spec.canary.clone()),
            ("baseline".to_string(), r.spec.baseline.clone()),
            ("weight".to_string(), r.status.weight.to_string()),
            ("step".to_string(), r.status.step.to_string()),
        ]),
    }
}

/// Calls every hook of `kind`; the first refusal, if any.
async fn call_all(
    hooks: &HookCaller,
    r: &Rollout,
    kind: WebhookKind,
    phase: Phase,
) -> Option<String> {
    let checksum = format!("{}-{}", r.spec.canary, r.status.started_at_ms);
    for hook in r.spec.webhooks.iter().filter(|h| h.kind == kind) {
        if let Err(e) = hooks.call(hook, &payload(r, &checksum, kind, phase)).await {
            if kind != WebhookKind::Rollback {
                tracing::warn!(service = %r.service, hook = %kind, error = %e, "rollout webhook refused");
            }
            return Some(e.to_string());
        }
    }
    None
}

/// Whether any rollback hook answered 2xx ("roll back now").
async fn rollback_asked(hooks: &HookCaller, r: &Rollout) -> bool {
    let checksum = format!("{}-{}", r.spec.canary, r.status.started_at_ms);
    for hook in r
        .spec
        .webhooks
        .iter()
        .filter(|h| h.kind == WebhookKind::Rollback)
    {
        let p = payload(r, &checksum, WebhookKind::Rollback, r.status.phase);
        if hooks.call(hook, &p).await.is_ok() {
            return true;
        }
    }
    false
}

fn failed_check(r: &Rollout, why: String, now: u64, policy: Option<&Policy>) -> Transition {
    let mut next = r.clone();
    next.status.failed_checks += 1;
    if next.status.failed_checks >= MAX_FAILED_CHECKS {
        return transitions::abort(
            &next,
            format!("{MAX_FAILED_CHECKS} webhook checks failed, the last: {why}"),
            now,
            policy,
        );
    }
    next.status.message = format!(
        "webhook check {} of {MAX_FAILED_CHECKS} failed: {why}",
        next.status.failed_checks
    );
    transitions::observe(r, next.status)
}

/// The move a step whose observation is complete makes next.
async fn complete_step(
    hooks: &HookCaller,
    r: &Rollout,
    now: u64,
    policy: Option<&Policy>,
) -> Transition {
    let last = r.status.step as usize + 1 >= r.spec.steps.len();
    if last {
        if let Some(why) = call_all(hooks, r, WebhookKind::ConfirmPromotion, Phase::Promoting).await
        {
            return transitions::wait_for_gate(r, WebhookKind::ConfirmPromotion, &why, now);
        }
        return transitions::promoting(r, "every step passed: promoting".into(), now);
    }
    if r.spec.manual_promotion {
        let mut t = transitions::pause(
            r,
            PauseReason::Manual,
            format!(
                "step {}/{} passed: run `switchyard rollout promote {}` to go on",
                r.status.step + 1,
                r.spec.steps.len(),
                r.service
            ),
            now,
            policy,
        );
        t.rollout.status.step_done = true;
        return t;
    }
    if let Some(why) = call_all(
        hooks,
        r,
        WebhookKind::ConfirmTrafficIncrease,
        Phase::Progressing,
    )
    .await
    {
        return transitions::wait_for_gate(r, WebhookKind::ConfirmTrafficIncrease, &why, now);
    }
    transitions::advance(r, now, policy)
}

/// Folds the telemetry slots completed since the last look, when an interval has
/// passed; the rollout with its new evidence and the next slot to read.
fn evaluate(shared: &Shared, r: &Rollout, t: &mut Tracked) -> (Rollout, u64, bool) {
    let due = t
        .last_eval
        .is_none_or(|at| at.elapsed() >= Duration::from_millis(r.spec.interval_ms));
    let slot = shared.telemetry.current_slot(shared.telemetry.now_ms());
    if !due || slot <= t.next_slot {
        return (r.clone(), t.next_slot, false);
    }
    t.last_eval = Some(Instant::now());
    let totals = |v: &str| {
        shared
            .telemetry
            .totals_since(&r.namespace, &r.service, v, t.next_slot, slot)
    };
    let (c, b) = (totals(&r.spec.canary), totals(&r.spec.baseline));
    if c.requests == 0 && b.requests == 0 {
        return (r.clone(), slot, false);
    }
    let mut next = r.clone();
    next.status = fold(r, &c, &b);
    (next, slot, true)
}

/// The transition one tick makes for `r` (if any) and the telemetry slot to read next.
async fn decide(
    shared: &Shared,
    hooks: &HookCaller,
    r: &Rollout,
    t: &mut Tracked,
) -> (Option<Transition>, u64) {
    let now = now_ms();
    let s = seen(shared, r);
    let policy = s.policy.as_deref();
    let hooks_due = t
        .last_hooks
        .is_none_or(|at| at.elapsed() >= Duration::from_millis(r.spec.interval_ms));
    match r.status.phase {
        Phase::Pending => {
            let msg = format!(
                "waiting for a serving instance of {} (canary) and of {} (baseline)",
                r.spec.canary, r.spec.baseline
            );
            let mut next = r.clone();
            next.status.phase = Phase::Initializing;
            next.status.message = msg;
            (Some(transitions::observe(r, next.status)), t.next_slot)
        }
        Phase::Initializing => {
            if s.canary_serving == 0 || s.baseline_serving == 0 || !hooks_due {
                return (None, t.next_slot);
            }
            t.last_hooks = Some(Instant::now());
            if let Some(why) =
                call_all(hooks, r, WebhookKind::ConfirmRollout, Phase::Initializing).await
            {
                return (
                    Some(transitions::wait_for_gate(
                        r,
                        WebhookKind::ConfirmRollout,
                        &why,
                        now,
                    )),
                    t.next_slot,
                );
            }
            if let Some(why) =
                call_all(hooks, r, WebhookKind::PreRollout, Phase::Initializing).await
            {
                return (Some(failed_check(r, why, now, policy)), t.next_slot);
            }
            // Evidence starts with the first step.
            let slot = shared.telemetry.current_slot(shared.telemetry.now_ms());
            (Some(transitions::enter_step(r, 0, now, policy)), slot)
        }
        Phase::Progressing | Phase::Paused => {
            if r.status.weight > 0 && s.canary_serving == 0 {
                let t2 = transitions::pause(
                    r,
                    PauseReason::NoCanaryEndpoints,
                    format!(
                        "no serving instance of {} is left: its share went back to {}; the rollout goes on when one serves again",
                        r.spec.canary, r.spec.baseline
                    ),
                    now,
                    policy,
                );
                return (Some(t2), t.next_slot);
            }
            if hooks_due
                && r.spec
                    .webhooks
                    .iter()
                    .any(|h| h.kind == WebhookKind::Rollback)
            {
                t.last_hooks = Some(Instant::now());
                if rollback_asked(hooks, r).await {
                    return (
                        Some(transitions::abort(
                            r,
                            "a rollback webhook asked for it".into(),
                            now,
                            policy,
                        )),
                        t.next_slot,
                    );
                }
            }
            let (observed, slot, changed) = evaluate(shared, r, t);
            if let Some(why) = abort_reason(&observed) {
                return (Some(transitions::abort(&observed, why, now, policy)), slot);
            }
            let next = if r.status.phase == Phase::Progressing {
                progress(hooks, &observed, changed, now, policy).await
            } else {
                resume(hooks, &observed, &s, hooks_due, now, policy).await
            };
            match next {
                Some(t2) => (Some(t2), slot),
                None if changed => (Some(transitions::observe(r, observed.status)), slot),
                None => (None, slot),
            }
        }
        Phase::Promoting => (Some(transitions::succeed(r, now, policy)), t.next_slot),
        Phase::Aborting => (
            Some(transitions::abort(r, r.status.message.clone(), now, policy)),
            t.next_slot,
        ),
        Phase::Succeeded | Phase::Aborted | Phase::Superseded => (None, t.next_slot),
    }
}

/// A progressing step: the `rollout` hooks on each new window, then whether the step is
/// complete, or out of time.
async fn progress(
    hooks: &HookCaller,
    r: &Rollout,
    new_window: bool,
    now: u64,
    policy: Option<&Policy>,
) -> Option<Transition> {
    if new_window {
        if let Some(why) = call_all(hooks, r, WebhookKind::Rollout, Phase::Progressing).await {
            return Some(failed_check(r, why, now, policy));
        }
    }
    let elapsed = now.saturating_sub(r.status.step_started_at_ms);
    let enough = enough_traffic(r);
    if elapsed >= r.spec.pause_ms && enough {
        return Some(complete_step(hooks, r, now, policy).await);
    }
    if elapsed >= r.spec.step_deadline_ms && !enough {
        let why = format!(
            "step {}/{} saw {} canary requests in {} s, {} needed",
            r.status.step + 1,
            r.spec.steps.len(),
            r.status.step_canary.requests,
            elapsed / 1000,
            r.spec.min_requests
        );
        return Some(match r.spec.on_insufficient_traffic {
            OnInsufficientTraffic::Pause => transitions::pause(
                r,
                PauseReason::InsufficientTraffic,
                format!("{why}: paused (promote or abort it, or send traffic and retry)"),
                now,
                policy,
            ),
            OnInsufficientTraffic::Abort => {
                transitions::abort(r, format!("{why}: aborted as asked"), now, policy)
            }
            OnInsufficientTraffic::Promote => complete_step(hooks, r, now, policy).await,
        });
    }
    None
}

/// A paused rollout: goes on by itself only when what it waits for arrived (a canary
/// endpoint, a gate's yes); manual and insufficient-traffic pauses wait for a verb.
async fn resume(
    hooks: &HookCaller,
    r: &Rollout,
    s: &Seen,
    hooks_due: bool,
    now: u64,
    policy: Option<&Policy>,
) -> Option<Transition> {
    match r.status.pause_reason {
        Some(PauseReason::NoCanaryEndpoints) if s.canary_serving > 0 => {
            Some(transitions::enter_step(r, r.status.step, now, policy))
        }
        Some(PauseReason::WaitingForGate) if hooks_due => {
            let kind = r.status.waiting_for?;
            let phase = match kind {
                WebhookKind::ConfirmRollout => Phase::Initializing,
                WebhookKind::ConfirmPromotion => Phase::Promoting,
                _ => Phase::Progressing,
            };
            if call_all(hooks, r, kind, phase).await.is_some() {
                return None;
            }
            Some(match kind {
                WebhookKind::ConfirmRollout => {
                    let mut next = r.clone();
                    next.status.phase = Phase::Initializing;
                    next.status.pause_reason = None;
                    next.status.waiting_for = None;
                    next.status.message = "confirm-rollout said yes".into();
                    transitions::observe(r, next.status)
                }
                WebhookKind::ConfirmPromotion => {
                    transitions::promoting(r, "confirm-promotion said yes: promoting".into(), now)
                }
                _ => transitions::advance(r, now, policy),
            })
        }
        _ => None,
    }
}
