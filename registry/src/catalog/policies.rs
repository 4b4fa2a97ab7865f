//! Routing policies: each service's kept history of policy changes (the last is
//! current), put and rollback.

use std::sync::Arc;

use super::apply::{ApplyError, ApplyResult, Reply};
use super::Catalog;
use crate::model::policy::MAX_POLICY_HISTORY;
use crate::model::{Change, Policy, PolicyChange, PolicyRecord};

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

    pub(super) fn record_policy(
        &mut self,
        index: u64,
        namespace: &str,
        service: &str,
        policy: Option<Arc<Policy>>,
        at_ms: u64,
        reason: String,
    ) -> ApplyResult {
        let key = (namespace.to_string(), service.to_string());
        if policy.is_some() && !self.policies.contains_key(&key) {
            let held = self
                .policies
                .range((namespace.to_string(), String::new())..)
                .take_while(|((ns, _), _)| ns == namespace)
                .count();
            if held >= self.limits.max_policies_per_namespace {
                return ApplyResult::refused(ApplyError::TooManyPolicies(
                    namespace.to_string(),
                    self.limits.max_policies_per_namespace,
                ));
            }
        }
        let record = PolicyRecord {
            revision: index,
            at_ms,
            policy: policy.clone(),
            reason,
        };
        let history = self.policies.entry(key).or_default();
        history.push_back(record.clone());
        while history.len() > MAX_POLICY_HISTORY {
            history.pop_front();
        }
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
        Command::PutPolicy {
            namespace: "default".into(),
            service: service.into(),
            policy: Some(Policy {
                subsets: Vec::new(),
                routes: Vec::new(),
                default_split: Vec::new(),
                fallback: Fallback::Default,
                sticky_header: String::new(),
                resilience: Default::default(),
            }),
            at_ms: 1,
        }
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
