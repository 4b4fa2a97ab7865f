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
        let record = PolicyRecord {
            revision: index,
            at_ms,
            policy: policy.clone(),
            reason,
        };
        let history = self
            .policies
            .entry((namespace.to_string(), service.to_string()))
            .or_default();
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
