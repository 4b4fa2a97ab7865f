//! The moves a rollout can make, as pure functions from the rollout (and the current
//! policy) to the next rollout and the policy change that goes with it. The API's verbs
//! and the leader's loop both build their `PutRollout` commands from these, so a step
//! always writes its weight, and an abort always writes 100 % baseline, in the same
//! command as the state that needs it.

use crate::catalog::RolloutPolicy;
use crate::model::rollout::{split_policy, Counts, PauseReason, Phase, Rollout, RolloutStatus};
use crate::model::{Policy, WebhookKind};

/// A rollout's next state and the policy change it needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub rollout: Rollout,
    pub policy: RolloutPolicy,
}

impl Transition {
    fn keep(rollout: Rollout) -> Self {
        Self {
            rollout,
            policy: RolloutPolicy::Keep,
        }
    }
}

fn with_message(r: &Rollout, phase: Phase, message: String, now_ms: u64) -> Rollout {
    let mut next = r.clone();
    next.status.phase = phase;
    next.status.message = message;
    next.status.updated_at_ms = now_ms;
    if phase != Phase::Paused {
        next.status.pause_reason = None;
        next.status.waiting_for = None;
    }
    next
}

/// Enters step `step` (Progressing): writes its weight and starts its observation.
pub fn enter_step(r: &Rollout, step: u32, now_ms: u64, current: Option<&Policy>) -> Transition {
    let weight = r.step_weight(step);
    let mut next = with_message(
        r,
        Phase::Progressing,
        format!(
            "step {}/{}: {weight}% to {}, observing",
            step + 1,
            r.spec.steps.len(),
            r.spec.canary
        ),
        now_ms,
    );
    next.status.step = step;
    next.status.weight = weight;
    next.status.step_started_at_ms = now_ms;
    next.status.step_canary = Counts::default();
    next.status.step_baseline = Counts::default();
    next.status.step_done = false;
    let policy = split_policy(current, &r.spec.baseline, &r.spec.canary, weight);
    Transition {
        rollout: next,
        policy: RolloutPolicy::Put(Box::new(policy)),
    }
}

/// Pauses where the rollout is. With no canary endpoints the weight also goes back to
/// the baseline, so the split never points at nothing.
pub fn pause(
    r: &Rollout,
    reason: PauseReason,
    message: String,
    now_ms: u64,
    current: Option<&Policy>,
) -> Transition {
    let mut next = with_message(r, Phase::Paused, message, now_ms);
    next.status.pause_reason = Some(reason);
    if reason == PauseReason::NoCanaryEndpoints && r.status.weight > 0 {
        next.status.weight = 0;
        let policy = split_policy(current, &r.spec.baseline, &r.spec.canary, 0);
        return Transition {
            rollout: next,
            policy: RolloutPolicy::Put(Box::new(policy)),
        };
    }
    Transition::keep(next)
}

/// Waits (Paused) until the confirm hook `kind` says yes.
pub fn wait_for_gate(r: &Rollout, kind: WebhookKind, why: &str, now_ms: u64) -> Transition {
    let mut next = with_message(
        r,
        Phase::Paused,
        format!("waiting for the {kind} webhook: {why}"),
        now_ms,
    );
    next.status.pause_reason = Some(PauseReason::WaitingForGate);
    next.status.waiting_for = Some(kind);
    Transition::keep(next)
}

/// Ends the rollout at once with every request on the baseline (one policy revision).
pub fn abort(r: &Rollout, message: String, now_ms: u64, current: Option<&Policy>) -> Transition {
    let mut next = with_message(r, Phase::Aborted, message, now_ms);
    next.status.weight = 0;
    let policy = split_policy(current, &r.spec.baseline, &r.spec.canary, 0);
    Transition {
        rollout: next,
        policy: RolloutPolicy::Put(Box::new(policy)),
    }
}

/// Every step passed: promotion is next (the loop writes it).
pub fn promoting(r: &Rollout, message: String, now_ms: u64) -> Transition {
    Transition::keep(with_message(r, Phase::Promoting, message, now_ms))
}

/// Writes 100 % canary and ends the rollout as Succeeded.
pub fn succeed(r: &Rollout, now_ms: u64, current: Option<&Policy>) -> Transition {
    let mut next = with_message(
        r,
        Phase::Succeeded,
        format!("{} promoted: it takes all traffic", r.spec.canary),
        now_ms,
    );
    next.status.weight = 100;
    next.status.step = r.spec.steps.len().saturating_sub(1) as u32;
    let policy = split_policy(current, &r.spec.baseline, &r.spec.canary, 100);
    Transition {
        rollout: next,
        policy: RolloutPolicy::Put(Box::new(policy)),
    }
}

/// The step after the current one, or promotion after the last.
pub fn advance(r: &Rollout, now_ms: u64, current: Option<&Policy>) -> Transition {
    let next = r.status.step + 1;
    if next as usize >= r.spec.steps.len() {
        promoting(r, "every step passed: promoting".into(), now_ms)
    } else {
        enter_step(r, next, now_ms, current)
    }
}

/// A status change that only records new evidence or a message.
pub fn observe(r: &Rollout, status: RolloutStatus) -> Transition {
    Transition::keep(Rollout {
        status,
        ..r.clone()
    })
}

/// An aborted rollout started again from its first step with fresh evidence.
pub fn retry(r: &Rollout, now_ms: u64) -> Transition {
    let mut status =
        RolloutStatus::pending(r.status.generation, now_ms, r.status.base_policy_revision);
    status.message = "retried: starting again from the first step".into();
    Transition::keep(Rollout {
        status,
        ..r.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rollout::RolloutSpec;

    fn rollout() -> Rollout {
        Rollout {
            namespace: "default".into(),
            service: "web".into(),
            spec: RolloutSpec {
                baseline: "1.0.0".into(),
                steps: vec![10, 50, 100],
                ..RolloutSpec::new("2.0.0")
            },
            status: RolloutStatus::pending(1, 0, 0),
        }
    }

    fn weights(t: &Transition) -> Vec<(String, u32)> {
        match &t.policy {
            RolloutPolicy::Put(p) => p
                .default_split
                .iter()
                .map(|s| (s.subset.clone(), s.weight))
                .collect(),
            other => panic!("no policy written: {other:?}"),
        }
    }

    #[test]
    fn steps_write_their_weight_and_aborts_write_the_baseline() {
        let r = rollout();
        let t = enter_step(&r, 0, 5, None);
        assert_eq!(t.rollout.status.weight, 10);
        assert_eq!(
            weights(&t),
            vec![("1.0.0".into(), 90), ("2.0.0".into(), 10)]
        );
        let t2 = advance(&t.rollout, 6, None);
        assert_eq!(t2.rollout.status.step, 1);
        assert_eq!(t2.rollout.status.weight, 50);
        let last = advance(&enter_step(&r, 2, 7, None).rollout, 8, None);
        assert_eq!(last.rollout.status.phase, Phase::Promoting);
        let a = abort(&t2.rollout, "bad".into(), 9, None);
        assert_eq!(a.rollout.status.phase, Phase::Aborted);
        assert_eq!(weights(&a), vec![("1.0.0".into(), 100)]);
        let s = succeed(&t2.rollout, 9, None);
        assert_eq!(weights(&s), vec![("2.0.0".into(), 100)]);
    }

    #[test]
    fn losing_the_canary_sends_its_share_back_to_the_baseline() {
        let t = enter_step(&rollout(), 1, 5, None);
        let p = pause(
            &t.rollout,
            PauseReason::NoCanaryEndpoints,
            "gone".into(),
            6,
            None,
        );
        assert_eq!(p.rollout.status.weight, 0);
        assert_eq!(weights(&p), vec![("1.0.0".into(), 100)]);
        let manual = pause(&t.rollout, PauseReason::Manual, "hold".into(), 6, None);
        assert_eq!(manual.policy, RolloutPolicy::Keep);
        assert_eq!(manual.rollout.status.weight, 50);
    }
}
