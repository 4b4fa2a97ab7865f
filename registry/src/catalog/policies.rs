//! Routing policies: each service's kept history of policy changes (the last is
//! current), put and rollback, and the bounds on what a namespace's policies hold.
//!
//! Sizes are the policy's protobuf encoding (what `PutPolicy` carried and every watcher
//! is sent), computed from the model, so every replica measures the same.

use std::sync::Arc;

use prost::Message;

use super::apply::{ApplyError, ApplyResult, Reply};
use super::Catalog;
use crate::model::policy::{MAX_POLICY_BYTES, MAX_POLICY_HISTORY};
use crate::model::{Change, Policy, PolicyChange, PolicyRecord};

/// What one namespace's policies hold, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicyBytes {
    /// The current policies, encoded (bounded by `max_policy_bytes_per_namespace`).
    pub(crate) current: usize,
    /// Every superseded record (bounded by `max_policy_history_bytes_per_namespace`).
    pub(crate) history: usize,
}

/// Encoded size of a policy, the measure of every policy bound.
pub fn policy_bytes(p: &Policy) -> usize {
    switchyard_core::convert::policy_to_proto(p).encoded_len()
}

/// What a kept record costs as history: its policy plus its reason and two numbers.
fn record_bytes(r: &PolicyRecord) -> usize {
    r.policy.as_deref().map_or(0, policy_bytes) + r.reason.len() + 16
}

fn current_bytes(history: &std::collections::VecDeque<PolicyRecord>) -> usize {
    history
        .back()
        .and_then(|r| r.policy.as_deref())
        .map_or(0, policy_bytes)
}

impl Catalog {
    /// The current policy of a service, if it has one.
    pub fn policy(&self, namespace: &str, service: &str) -> Option<&PolicyRecord> {
        self.policies
            .get(&(namespace.to_string(), service.to_string()))
            .and_then(|h| h.back())
    }

    /// Every kept policy change of a service, oldest first.
    pub fn policy_history(&self, namespace: &str, service: &str) -> Vec<PolicyRecord> {
        self.policies
            .get(&(namespace.to_string(), service.to_string()))
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn current_policy(&self, namespace: &str, service: &str) -> Option<Arc<Policy>> {
        self.policy(namespace, service)
            .and_then(|r| r.policy.clone())
    }

    /// Whether `policy` may become the current policy of `service`: the checks apply
    /// makes, also run by the node that receives a `PutPolicy` against its own state, so
    /// a request over a bound is refused with the same message before it reaches the
    /// log (apply still decides: the proposer's state may be behind). `None` clears.
    pub fn check_policy(
        &self,
        namespace: &str,
        service: &str,
        policy: Option<&Policy>,
    ) -> Result<(), ApplyError> {
        let key = (namespace.to_string(), service.to_string());
        let existing = self.policies.get(&key);
        let Some(policy) = policy else {
            // Clearing a service that never had a policy would record an entry for a
            // name nothing uses, past every bound.
            return match existing {
                Some(_) => Ok(()),
                None => Err(ApplyError::NoPolicyToClear(service.to_string())),
            };
        };
        let bytes = policy_bytes(policy);
        if bytes > MAX_POLICY_BYTES {
            return Err(ApplyError::PolicyTooLarge {
                service: service.to_string(),
                bytes,
                limit: MAX_POLICY_BYTES,
            });
        }
        if existing.is_none() {
            let held = self
                .policies
                .range((namespace.to_string(), String::new())..)
                .take_while(|((ns, _), _)| ns == namespace)
                .count();
            if held >= self.limits.max_policies_per_namespace {
                return Err(ApplyError::TooManyPolicies(
                    namespace.to_string(),
                    self.limits.max_policies_per_namespace,
                ));
            }
        }
        let replaced = existing.map_or(0, current_bytes);
        let held = self.policy_bytes.get(namespace).map_or(0, |b| b.current);
        let would_hold = held.saturating_sub(replaced) + bytes;
        // A change that does not grow the namespace is always allowed (e.g. shrinking a
        // policy after the limit was lowered).
        if bytes > replaced && would_hold > self.limits.max_policy_bytes_per_namespace {
            return Err(ApplyError::PolicyBytesExceeded {
                namespace: namespace.to_string(),
                would_hold,
                limit: self.limits.max_policy_bytes_per_namespace,
            });
        }
        Ok(())
    }

    /// What the namespace's policies hold now, in bytes.
    pub fn policy_bytes_held(&self, namespace: &str) -> (usize, usize) {
        self.policy_bytes
            .get(namespace)
            .map_or((0, 0), |b| (b.current, b.history))
    }

    pub(super) fn record_policy(
        &mut self,
        index: u64,
        namespace: &str,
        service: &str,
        policy: Option<Arc<Policy>>,
        at_ms: u64,
        reason: String,
    ) -> ApplyResult {
        if let Err(e) = self.check_policy(namespace, service, policy.as_deref()) {
            return ApplyResult::refused(e);
        }
        let key = (namespace.to_string(), service.to_string());
        let record = PolicyRecord {
            revision: index,
            at_ms,
            policy: policy.clone(),
            reason,
        };
        let history = self.policies.entry(key).or_default();
        let tally = self.policy_bytes.entry(namespace.to_string()).or_default();
        // The current record becomes history.
        if let Some(previous) = history.back() {
            tally.current = tally.current.saturating_sub(current_bytes(history));
            tally.history += record_bytes(previous);
        }
        tally.current += policy.as_deref().map_or(0, policy_bytes);
        history.push_back(record.clone());
        while history.len() > MAX_POLICY_HISTORY {
            if let Some(dropped) = history.pop_front() {
                tally.history = tally.history.saturating_sub(record_bytes(&dropped));
            }
        }
        self.trim_policy_history(namespace);
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Policy { record }),
            change: Some(Change {
                revision: index,
                policies: vec![PolicyChange {
                    namespace: namespace.to_string(),
                    service: service.to_string(),
                    policy,
                }],
                ..Change::default()
            }),
            leases_granted: Vec::new(),
            leases_removed: Vec::new(),
            leases_checkpointed: Vec::new(),
        }
    }

    /// Drops the namespace's oldest superseded records (lowest revision first, across
    /// its services; never a current one) until its history fits its bound.
    /// Deterministic: it depends on the catalog alone.
    fn trim_policy_history(&mut self, namespace: &str) {
        let limit = self.limits.max_policy_history_bytes_per_namespace;
        loop {
            let Some(tally) = self.policy_bytes.get(namespace) else {
                return;
            };
            if tally.history <= limit {
                return;
            }
            let oldest = self
                .policies
                .range_mut((namespace.to_string(), String::new())..)
                .take_while(|((ns, _), _)| ns == namespace)
                .filter(|(_, h)| h.len() > 1)
                .min_by_key(|(_, h)| h.front().map_or(u64::MAX, |r| r.revision))
                .and_then(|(_, h)| h.pop_front());
            let Some(dropped) = oldest else {
                return;
            };
            if let Some(tally) = self.policy_bytes.get_mut(namespace) {
                tally.history = tally.history.saturating_sub(record_bytes(&dropped));
            }
        }
    }

    /// Recomputes every namespace's policy bytes from the kept records (after a rebuild
    /// from a snapshot).
    pub(super) fn recount_policy_bytes(&mut self) {
        self.policy_bytes.clear();
        for ((ns, _), history) in &self.policies {
            let tally = self.policy_bytes.entry(ns.clone()).or_default();
            tally.current += current_bytes(history);
            let superseded = history.len().saturating_sub(1);
            tally.history += history
                .iter()
                .take(superseded)
                .map(record_bytes)
                .sum::<usize>();
        }
    }

    pub(super) fn rollback_policy(
        &mut self,
        index: u64,
        namespace: &str,
        service: &str,
        to_revision: u64,
        at_ms: u64,
    ) -> ApplyResult {
        let history = self
            .policies
            .get(&(namespace.to_string(), service.to_string()));
        let target = match history {
            None => None,
            Some(h) if to_revision == 0 => {
                if h.len() < 2 {
                    return ApplyResult::refused(ApplyError::NoEarlierPolicy(service.to_string()));
                }
                h.get(h.len() - 2).cloned()
            }
            Some(h) => h.iter().find(|r| r.revision == to_revision).cloned(),
        };
        let Some(target) = target else {
            if to_revision == 0 {
                return ApplyResult::refused(ApplyError::NoEarlierPolicy(service.to_string()));
            }
            return ApplyResult::refused(ApplyError::PolicyRevisionNotFound {
                service: service.to_string(),
                revision: to_revision,
            });
        };
        self.record_policy(
            index,
            namespace,
            service,
            target.policy,
            at_ms,
            format!("rollback to {}", target.revision),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::{inst, reg};
    use crate::catalog::{Command, Limits};
    use crate::model::policy::Fallback;

    fn put(service: &str) -> Command {
        put_sized(service, 0)
    }

    /// A policy whose sticky header is `pad` bytes long (its size grows with it).
    fn policy_sized(pad: usize) -> Policy {
        Policy {
            subsets: Vec::new(),
            routes: Vec::new(),
            default_split: Vec::new(),
            fallback: Fallback::Default,
            sticky_header: "h".repeat(pad),
            resilience: Default::default(),
        }
    }

    fn put_sized(service: &str, pad: usize) -> Command {
        Command::PutPolicy {
            namespace: "default".into(),
            service: service.into(),
            policy: Some(policy_sized(pad)),
            at_ms: 1,
        }
    }

    fn clear(service: &str) -> Command {
        Command::PutPolicy {
            namespace: "default".into(),
            service: service.into(),
            policy: None,
            at_ms: 1,
        }
    }

    fn history_revisions(c: &Catalog, service: &str) -> Vec<u64> {
        c.policy_history("default", service)
            .iter()
            .map(|r| r.revision)
            .collect()
    }

    /// A policy over 16 KiB is refused by apply too (the edge checks the request, but a
    /// forwarded or replayed command reaches apply without that check).
    #[test]
    fn apply_refuses_a_policy_over_the_per_policy_size() {
        let mut c = Catalog::new(Limits::default());
        let r = c.apply_next(1, &put_sized("web", MAX_POLICY_BYTES + 1));
        assert!(
            matches!(
                r.reply,
                Err(ApplyError::PolicyTooLarge {
                    limit: MAX_POLICY_BYTES,
                    ..
                })
            ),
            "{:?}",
            r.reply
        );
        assert!(r.change.is_none());
        assert!(c.policy_history("default", "web").is_empty());
        let message = r.reply.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("at most 16384"), "{message}");
    }

    /// The current policies of a namespace are bounded in bytes: a put that would grow
    /// them past the bound is refused whole (nothing recorded, the error names the flag),
    /// one that replaces a policy with one no larger is always allowed, and another
    /// namespace is not affected.
    #[test]
    fn current_policy_bytes_per_namespace_are_bounded() {
        let one = policy_bytes(&policy_sized(1_000));
        let mut c = Catalog::new(Limits {
            max_policy_bytes_per_namespace: 2 * one + 10,
            ..Limits::default()
        });
        assert!(c.apply_next(1, &put_sized("a", 1_000)).reply.is_ok());
        assert!(c.apply_next(2, &put_sized("b", 1_000)).reply.is_ok());
        assert_eq!(c.policy_bytes_held("default").0, 2 * one);
        let before = c.revision();
        let refused = c.apply_next(3, &put_sized("c", 1_000));
        let Err(ApplyError::PolicyBytesExceeded {
            would_hold, limit, ..
        }) = &refused.reply
        else {
            panic!("{:?}", refused.reply);
        };
        assert_eq!((*would_hold, *limit), (3 * one, 2 * one + 10));
        assert!(refused
            .reply
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
            .contains("--max-policy-bytes-per-namespace"));
        assert_eq!(c.revision(), before, "nothing applied");
        assert!(c.policy_history("default", "c").is_empty());
        // Growing an existing one past the bound is refused; the same size is fine.
        assert!(matches!(
            c.apply_next(4, &put_sized("b", 1_100)).reply,
            Err(ApplyError::PolicyBytesExceeded { .. })
        ));
        assert!(c.apply_next(5, &put_sized("b", 1_000)).reply.is_ok());
        // Clearing frees its bytes for another service.
        assert!(c.apply_next(6, &clear("a")).reply.is_ok());
        assert_eq!(c.policy_bytes_held("default").0, one);
        assert!(c.apply_next(7, &put_sized("c", 1_000)).reply.is_ok());
        // The same policy under another namespace counts there alone.
        let other = Command::PutPolicy {
            namespace: "other".into(),
            service: "a".into(),
            policy: Some(policy_sized(1_000)),
            at_ms: 1,
        };
        assert!(c.apply_next(8, &other).reply.is_ok());
    }

    /// Clearing a service that never had a policy is refused: it would record an entry
    /// for a name nothing uses, outside the count bound.
    #[test]
    fn clearing_a_policy_that_never_existed_is_refused() {
        let mut c = Catalog::new(Limits::default());
        let r = c.apply_next(1, &clear("ghost"));
        assert_eq!(r.reply, Err(ApplyError::NoPolicyToClear("ghost".into())));
        assert!(c.list_services("default").is_empty());
    }

    /// History bytes are bounded per namespace: past the bound the oldest superseded
    /// records of the namespace go first, whichever service they belong to; a current
    /// policy is never dropped and a put never fails for its history. A catalog rebuilt
    /// from its snapshot counts the same bytes.
    #[test]
    fn policy_history_bytes_per_namespace_are_bounded_oldest_first() {
        let record = policy_bytes(&policy_sized(1_000)) + "put".len() + 16;
        let mut c = Catalog::new(Limits {
            max_policy_history_bytes_per_namespace: 3 * record,
            ..Limits::default()
        });
        // a@1, b@2, a@3, b@4, a@5, b@6: superseded a1 b2 a3 b4 (4 records > 3).
        for (i, svc) in ["a", "b", "a", "b", "a", "b"].into_iter().enumerate() {
            let index = i as u64 + 1;
            assert!(c.apply_next(index, &put_sized(svc, 1_000)).reply.is_ok());
        }
        assert_eq!(history_revisions(&c, "a"), vec![3, 5], "a@1 went first");
        assert_eq!(history_revisions(&c, "b"), vec![2, 4, 6]);
        assert_eq!(c.policy_bytes_held("default").1, 3 * record);
        // Many more puts of one service: its own old records go, the other's current
        // stays.
        for index in 7..20 {
            assert!(c.apply_next(index, &put_sized("a", 1_000)).reply.is_ok());
        }
        assert!(c.policy_bytes_held("default").1 <= 3 * record);
        assert_eq!(history_revisions(&c, "b").last(), Some(&6));
        assert_eq!(history_revisions(&c, "a").last(), Some(&19));
        let rebuilt = Catalog::from_persisted(c.limits, c.to_persisted());
        assert_eq!(
            rebuilt.policy_bytes_held("default"),
            c.policy_bytes_held("default")
        );
    }

    /// The hostile probe put 6,000 policies on names nothing registered: every sidecar
    /// held them and ListServices showed none. Now a namespace holds a bounded number,
    /// refused clearly past it (nothing applied), and policy-only services are listed.
    #[test]
    fn policies_per_namespace_are_bounded_and_policy_only_services_are_listed() {
        let mut c = Catalog::new(Limits {
            max_policies_per_namespace: 2,
            ..Limits::default()
        });
        let _ = c.apply_next(1, &reg(inst("web", "web-1", "1.0.0")));
        assert!(c.apply_next(2, &put("web")).reply.is_ok());
        assert!(c.apply_next(3, &put("ghost")).reply.is_ok());
        let before = c.revision();
        let refused = c.apply_next(4, &put("another"));
        assert!(
            matches!(refused.reply, Err(ApplyError::TooManyPolicies(_, 2))),
            "{:?}",
            refused.reply
        );
        assert_eq!(c.revision(), before, "nothing applied");
        assert!(
            c.apply_next(5, &put("web")).reply.is_ok(),
            "changing one is fine"
        );
        let names: Vec<(String, u32)> = c
            .list_services("default")
            .into_iter()
            .map(|s| (s.name, s.instance_count))
            .collect();
        assert_eq!(names, vec![("ghost".into(), 0), ("web".into(), 1)]);
    }
}
