//! Rollouts in the catalog: each service's kept rollouts (the newest may be active), and
//! the one way they change, [`Command::PutRollout`](super::Command::PutRollout): a
//! compare-and-set on the service's rollout generation that may write the policy the
//! new state needs in the same apply, so a step's weight and the step itself never
//! disagree (and an abort is one policy revision).

use std::sync::Arc;

use super::apply::{ApplyError, ApplyResult, Reply};
use super::Catalog;
use crate::model::rollout::{Phase, Rollout, KEPT_ROLLOUTS};
use crate::model::Policy;

/// The policy change a rollout transition carries.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RolloutPolicy {
    /// The policy stays as it is.
    Keep,
    /// Write this policy as a new revision.
    Put(Box<Policy>),
    /// Restore a kept revision (0: the one before the current), as a new revision.
    Restore(u64),
}

impl Catalog {
    /// The newest rollout of a service.
    pub fn rollout(&self, namespace: &str, service: &str) -> Option<&Rollout> {
        self.rollouts
            .get(&(namespace.to_string(), service.to_string()))
            .and_then(|h| h.back())
    }

    /// The newest rollout of every service of a namespace that had one.
    pub fn rollouts(&self, namespace: &str) -> Vec<&Rollout> {
        self.rollouts
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .filter_map(|(_, h)| h.back())
            .collect()
    }

    /// Every active rollout, in every namespace (what the leader's loop moves).
    pub fn active_rollouts(&self) -> Vec<Rollout> {
        self.rollouts
            .values()
            .filter_map(|h| h.back())
            .filter(|r| r.status.phase.is_active())
            .cloned()
            .collect()
    }

    /// The generation of a service's newest rollout (0: none yet).
    pub fn rollout_generation(&self, namespace: &str, service: &str) -> u64 {
        self.rollout(namespace, service)
            .map_or(0, |r| r.status.generation)
    }

    /// Applies a rollout transition: refused unless the service's newest rollout is at
    /// `expected_generation`; `start` adds a new rollout (superseding an active one of
    /// another canary) instead of replacing the newest. The new rollout's generation is
    /// `expected_generation + 1`. Nothing changes when anything is refused.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_rollout(
        &mut self,
        index: u64,
        rollout: &Rollout,
        expected_generation: u64,
        start: bool,
        policy: &RolloutPolicy,
        at_ms: u64,
    ) -> ApplyResult {
        let (namespace, service) = (rollout.namespace.as_str(), rollout.service.as_str());
        let key = (namespace.to_string(), service.to_string());
        let current = self.rollout(namespace, service);
        let actual = current.map_or(0, |r| r.status.generation);
        if actual != expected_generation {
            return ApplyResult::refused(ApplyError::RolloutChanged {
                service: service.to_string(),
                expected: expected_generation,
                actual,
            });
        }
        match (current, start) {
            (None, false) => {
                return ApplyResult::refused(ApplyError::NoRollout(service.to_string()));
            }
            (Some(c), true)
                if c.status.phase.is_active() && c.spec.canary == rollout.spec.canary =>
            {
                return ApplyResult::refused(ApplyError::RolloutActive {
                    service: service.to_string(),
                    canary: c.spec.canary.clone(),
                });
            }
            (None, true) => {
                let services = self
                    .rollouts
                    .range((namespace.to_string(), String::new())..)
                    .take_while(|((ns, _), _)| ns == namespace)
                    .count();
                if services >= self.limits.max_policies_per_namespace {
                    return ApplyResult::refused(ApplyError::TooManyRollouts(
                        namespace.to_string(),
                        self.limits.max_policies_per_namespace,
                    ));
                }
            }
            _ => {}
        }
        // The policy first: it is the part that can still be refused.
        let mut result = match policy {
            RolloutPolicy::Keep => ApplyResult {
                reply: Ok(Reply::Done {
                    revision: self.revision,
                }),
                ..ApplyResult::refused(ApplyError::Batch)
            },
            RolloutPolicy::Put(p) => self.record_policy(
                index,
                namespace,
                service,
                Some(Arc::new((**p).clone())),
                at_ms,
                format!(
                    "rollout of {}: {} at {}%",
                    rollout.spec.canary,
                    rollout.status.phase.as_str(),
                    rollout.status.weight
                ),
            ),
            RolloutPolicy::Restore(to) => {
                self.rollback_policy(index, namespace, service, *to, at_ms)
            }
        };
        if result.reply.is_err() {
            return result;
        }
        let mut next = rollout.clone();
        next.status.generation = expected_generation + 1;
        next.status.updated_at_ms = at_ms;
        let history = self.rollouts.entry(key).or_default();
        if start {
            if let Some(old) = history.back_mut() {
                if old.status.phase.is_active() {
                    old.status.phase = Phase::Superseded;
                    old.status.pause_reason = None;
                    old.status.message =
                        format!("superseded by the rollout of {}", next.spec.canary);
                    old.status.updated_at_ms = at_ms;
                }
            }
            history.push_back(next.clone());
            while history.len() > KEPT_ROLLOUTS {
                history.pop_front();
            }
        } else if let Some(last) = history.back_mut() {
            *last = next.clone();
        }
        result.reply = Ok(Reply::Rollout {
            rollout: Box::new(next),
            revision: self.revision,
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Command, Limits};
    use crate::model::rollout::{split_policy, RolloutSpec, RolloutStatus};

    fn rollout(canary: &str) -> Rollout {
        Rollout {
            namespace: "default".into(),
            service: "web".into(),
            spec: RolloutSpec {
                baseline: "1.0.0".into(),
                ..RolloutSpec::new(canary)
            },
            status: RolloutStatus::pending(0, 1, 0),
        }
    }

    fn put(r: &Rollout, expected: u64, start: bool, policy: RolloutPolicy) -> Command {
        Command::PutRollout {
            rollout: Box::new(r.clone()),
            expected_generation: expected,
            start,
            policy,
            at_ms: 10,
        }
    }

    fn generation(reply: &Result<Reply, ApplyError>) -> u64 {
        match reply {
            Ok(Reply::Rollout { rollout, .. }) => rollout.status.generation,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn transitions_are_compare_and_set_and_write_their_policy_in_the_same_apply() {
        let mut c = Catalog::new(Limits::default());
        let r = rollout("2.0.0");
        let first = c.apply(1, &put(&r, 0, true, RolloutPolicy::Keep));
        assert_eq!(generation(&first.reply), 1);
        assert!(first.change.is_none(), "no policy, nothing for watchers");
        // A stale generation is refused and changes nothing.
        let stale = c.apply(2, &put(&r, 0, false, RolloutPolicy::Keep));
        assert!(matches!(
            stale.reply,
            Err(ApplyError::RolloutChanged { actual: 1, .. })
        ));
        // A step writes its weight as a policy revision with the rollout.
        let mut step = c.rollout("default", "web").cloned().expect("kept");
        step.status.phase = Phase::Progressing;
        step.status.weight = 5;
        let p = split_policy(None, "1.0.0", "2.0.0", 5);
        let r3 = c.apply(
            3,
            &put(&step, 1, false, RolloutPolicy::Put(Box::new(p.clone()))),
        );
        assert_eq!(generation(&r3.reply), 2);
        assert!(r3.change.is_some(), "the policy reaches watchers");
        assert_eq!(c.current_policy("default", "web").as_deref(), Some(&p));
        assert_eq!(
            c.rollout("default", "web").map(|r| r.status.weight),
            Some(5)
        );
        // Starting the same canary again while active is refused.
        let again = c.apply(4, &put(&r, 2, true, RolloutPolicy::Keep));
        assert!(matches!(again.reply, Err(ApplyError::RolloutActive { .. })));
        // A new canary supersedes it.
        let newer = c.apply(5, &put(&rollout("3.0.0"), 2, true, RolloutPolicy::Keep));
        assert_eq!(generation(&newer.reply), 3);
        let kept = &c.rollouts[&("default".to_string(), "web".to_string())];
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].status.phase, Phase::Superseded);
        assert_eq!(c.active_rollouts().len(), 1);
    }

    #[test]
    fn a_refused_policy_leaves_the_rollout_as_it_was() {
        let mut c = Catalog::new(Limits::default());
        c.apply(1, &put(&rollout("2.0.0"), 0, true, RolloutPolicy::Keep));
        let mut r = c.rollout("default", "web").cloned().expect("kept");
        r.status.phase = Phase::Aborted;
        // No policy revision 99 to restore: refused whole.
        let res = c.apply(2, &put(&r, 1, false, RolloutPolicy::Restore(99)));
        assert!(res.reply.is_err());
        assert_eq!(c.rollout_generation("default", "web"), 1);
        assert_eq!(
            c.rollout("default", "web").map(|r| r.status.phase),
            Some(Phase::Pending)
        );
        // Nothing to update without a rollout.
        let mut other = rollout("2.0.0");
        other.service = "api".into();
        let res = c.apply(3, &put(&other, 0, false, RolloutPolicy::Keep));
        assert!(matches!(res.reply, Err(ApplyError::NoRollout(_))));
    }

    #[test]
    fn rollouts_per_namespace_are_bounded() {
        let mut c = Catalog::new(Limits {
            max_policies_per_namespace: 2,
            ..Limits::default()
        });
        for (i, svc) in ["a", "b", "c"].into_iter().enumerate() {
            let mut r = rollout("2.0.0");
            r.service = svc.into();
            let res = c.apply(i as u64 + 1, &put(&r, 0, true, RolloutPolicy::Keep));
            assert_eq!(res.reply.is_ok(), i < 2, "{svc}");
        }
    }
}
