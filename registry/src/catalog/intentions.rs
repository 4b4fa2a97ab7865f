//! Intentions (who may call whom) per namespace, with their recorded changes: put and
//! delete, each a new revision that watchers get as the destination's whole set.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::apply::{ApplyError, ApplyResult, Catalog, Reply};
use crate::model::intention::{
    Intention, IntentionRecord, MAX_INTENTIONS_PER_DESTINATION, MAX_INTENTIONS_PER_NAMESPACE,
    MAX_INTENTION_HISTORY,
};
use crate::model::{Change, IntentionsChange};

/// One namespace's intentions and history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct NamespaceIntentions {
    /// (destination, source) -> intention.
    pub(super) rules: BTreeMap<(String, String), Intention>,
    /// Oldest first, at most [`MAX_INTENTION_HISTORY`].
    pub(super) history: VecDeque<IntentionRecord>,
}

impl Catalog {
    /// Every intention of `namespace`, by destination then source.
    pub fn intentions(&self, namespace: &str) -> Vec<Intention> {
        self.intentions
            .get(namespace)
            .map(|n| n.rules.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The recorded changes of `namespace`'s intentions, oldest first.
    pub fn intention_history(&self, namespace: &str) -> Vec<IntentionRecord> {
        self.intentions
            .get(namespace)
            .map(|n| n.history.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `namespace`'s intentions grouped by destination, for a watch snapshot.
    pub fn intentions_by_destination(&self, namespace: &str) -> Vec<(String, Vec<Intention>)> {
        let mut out: Vec<(String, Vec<Intention>)> = Vec::new();
        if let Some(n) = self.intentions.get(namespace) {
            for ((dst, _), rule) in &n.rules {
                match out.last_mut() {
                    Some((d, rules)) if d == dst => rules.push(rule.clone()),
                    _ => out.push((dst.clone(), vec![rule.clone()])),
                }
            }
        }
        out
    }

    fn destination_change(&self, index: u64, namespace: &str, destination: &str) -> Change {
        let intentions: Arc<[Intention]> = self
            .intentions
            .get(namespace)
            .map(|n| {
                n.rules
                    .range((destination.to_string(), String::new())..)
                    .take_while(|((d, _), _)| d == destination)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default();
        Change {
            revision: index,
            intentions: vec![IntentionsChange {
                namespace: namespace.to_string(),
                destination: destination.to_string(),
                intentions,
            }],
            ..Change::default()
        }
    }

    fn record_intention(&mut self, namespace: &str, record: IntentionRecord) {
        let n = self.intentions.entry(namespace.to_string()).or_default();
        n.history.push_back(record);
        while n.history.len() > MAX_INTENTION_HISTORY {
            n.history.pop_front();
        }
    }

    pub(super) fn put_intention(
        &mut self,
        index: u64,
        namespace: &str,
        intention: &Intention,
        at_ms: u64,
    ) -> ApplyResult {
        let key = (intention.destination.clone(), intention.source.clone());
        let n = self.intentions.entry(namespace.to_string()).or_default();
        if !n.rules.contains_key(&key) {
            if n.rules.len() >= MAX_INTENTIONS_PER_NAMESPACE {
                return ApplyResult::refused(ApplyError::TooManyIntentions(
                    namespace.to_string(),
                    MAX_INTENTIONS_PER_NAMESPACE,
                ));
            }
            let for_destination = n
                .rules
                .range((intention.destination.clone(), String::new())..)
                .take_while(|((d, _), _)| *d == intention.destination)
                .count();
            if for_destination >= MAX_INTENTIONS_PER_DESTINATION {
                return ApplyResult::refused(ApplyError::TooManyIntentionsFor(
                    intention.destination.clone(),
                    MAX_INTENTIONS_PER_DESTINATION,
                ));
            }
        }
        let stored = Intention {
            revision: index,
            updated_ms: at_ms,
            ..intention.clone()
        };
        n.rules.insert(key, stored);
        self.record_intention(
            namespace,
            IntentionRecord {
                revision: index,
                at_ms,
                source: intention.source.clone(),
                destination: intention.destination.clone(),
                action: Some(intention.action),
                description: intention.description.clone(),
            },
        );
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(self.destination_change(index, namespace, &intention.destination)),
            ..ApplyResult::refused(ApplyError::Batch)
        }
    }

    pub(super) fn delete_intention(
        &mut self,
        index: u64,
        namespace: &str,
        source: &str,
        destination: &str,
        at_ms: u64,
    ) -> ApplyResult {
        let key = (destination.to_string(), source.to_string());
        let removed = self
            .intentions
            .get_mut(namespace)
            .and_then(|n| n.rules.remove(&key));
        let Some(removed) = removed else {
            return ApplyResult::refused(ApplyError::IntentionNotFound {
                from: source.to_string(),
                to: destination.to_string(),
            });
        };
        self.record_intention(
            namespace,
            IntentionRecord {
                revision: index,
                at_ms,
                source: removed.source,
                destination: removed.destination,
                action: None,
                description: String::new(),
            },
        );
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(self.destination_change(index, namespace, destination)),
            ..ApplyResult::refused(ApplyError::Batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Command, Limits};
    use crate::model::intention::{decide, Action};

    fn put(source: &str, destination: &str, action: Action) -> Command {
        Command::PutIntention {
            namespace: "default".into(),
            intention: Intention {
                source: source.into(),
                destination: destination.into(),
                action,
                description: "test".into(),
                revision: 0,
                updated_ms: 0,
            },
            at_ms: 5,
        }
    }

    #[test]
    fn put_and_delete_change_the_destination_and_are_recorded() {
        let mut c = Catalog::new(Limits::default());
        let r = c.apply(1, &put("web", "payments", Action::Allow));
        assert_eq!(r.reply, Ok(Reply::Done { revision: 1 }));
        let change = r.change.expect("a change");
        assert_eq!(change.intentions.len(), 1);
        assert_eq!(change.intentions[0].destination, "payments");
        assert_eq!(change.intentions[0].intentions[0].revision, 1);
        c.apply(2, &put("batch", "payments", Action::Deny));
        c.apply(3, &put("*", "search", Action::Deny));
        let rules = c.intentions("default");
        assert_eq!(rules.len(), 3);
        assert!(decide(&rules, Some("web"), "payments").allowed);
        assert!(!decide(&rules, Some("batch"), "payments").allowed);
        // Replacing keeps one rule per pair.
        let r = c.apply(4, &put("web", "payments", Action::Deny));
        assert_eq!(r.change.expect("change").intentions[0].intentions.len(), 2);
        assert!(!decide(&c.intentions("default"), Some("web"), "payments").allowed);
        let del = |s: &str, d: &str| Command::DeleteIntention {
            namespace: "default".into(),
            source: s.into(),
            destination: d.into(),
            at_ms: 9,
        };
        let r = c.apply(5, &del("web", "payments"));
        assert_eq!(r.reply, Ok(Reply::Done { revision: 5 }));
        // Deleting what is not there changes nothing.
        let before = c.to_persisted();
        let r = c.apply(6, &del("web", "payments"));
        assert!(matches!(r.reply, Err(ApplyError::IntentionNotFound { .. })));
        assert!(r.change.is_none());
        assert_eq!(
            format!("{:?}", before.sections),
            format!("{:?}", c.to_persisted().sections)
        );
        let history = c.intention_history("default");
        assert_eq!(history.len(), 5);
        assert_eq!(history[4].action, None);
        assert_eq!(
            c.intentions_by_destination("default")
                .iter()
                .map(|(d, r)| (d.as_str(), r.len()))
                .collect::<Vec<_>>(),
            vec![("payments", 1), ("search", 1)]
        );
        // A snapshot keeps them and their history.
        let back = Catalog::from_persisted(Limits::default(), c.to_persisted());
        assert_eq!(back.intentions("default"), c.intentions("default"));
        assert_eq!(back.intention_history("default"), history);
    }

    #[test]
    fn a_namespace_and_a_destination_hold_a_bounded_number_of_intentions() {
        let mut c = Catalog::new(Limits::default());
        let mut index = 0;
        let per = MAX_INTENTIONS_PER_DESTINATION;
        for d in 0..MAX_INTENTIONS_PER_NAMESPACE / per {
            for i in 0..per {
                index += 1;
                let r = c.apply(
                    index,
                    &put(&format!("s{i}"), &format!("d{d}"), Action::Allow),
                );
                assert!(r.reply.is_ok(), "{:?}", r.reply);
            }
        }
        index += 1;
        let r = c.apply(index, &put("one-more", "d0", Action::Allow));
        assert!(matches!(r.reply, Err(ApplyError::TooManyIntentions(..))));
        // Replacing an existing one is still allowed at the bound.
        index += 1;
        assert!(c.apply(index, &put("s1", "d0", Action::Deny)).reply.is_ok());
        assert_eq!(c.intention_history("default").len(), MAX_INTENTION_HISTORY);
        // One destination's own bound, in a namespace with room.
        let mut c = Catalog::new(Limits::default());
        for i in 0..per {
            c.apply(
                i as u64 + 1,
                &put(&format!("s{i}"), "payments", Action::Allow),
            );
        }
        let r = c.apply(per as u64 + 1, &put("one-more", "payments", Action::Allow));
        assert!(matches!(r.reply, Err(ApplyError::TooManyIntentionsFor(..))));
    }
}
