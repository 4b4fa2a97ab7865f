//! Feature-flag documents per namespace (the flagd flag-definition schema, validated at
//! the edge before a command is proposed), with their history and rollback like
//! policies. Apply treats a document as text: it checks the compare-and-set revision and
//! the size, records, and publishes, so no JSON is parsed on the state machine's path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::apply::{ApplyError, ApplyResult, Catalog, Reply};
use crate::model::{Change, FlagsChange};

/// Largest flag document of one namespace, in bytes (the edge parses and bounds it
/// again with its own rules; this one keeps a forwarded command honest).
pub const MAX_FLAG_DOCUMENT_BYTES: usize = 1 << 20;
/// Records kept per namespace for history and rollback (the current one included).
pub const MAX_FLAG_HISTORY: usize = 20;
/// Bytes of superseded documents kept per namespace; past it the oldest go.
pub const MAX_FLAG_HISTORY_BYTES: usize = 4 << 20;

/// One recorded flag document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagsRecord {
    pub revision: u64,
    pub at_ms: u64,
    pub document: Arc<str>,
    /// What wrote it: "put", or "rollback to N".
    pub action: String,
}

/// namespace -> its records, oldest first; the last is current.
pub(super) type FlagStore = BTreeMap<String, VecDeque<FlagsRecord>>;

impl Catalog {
    /// `namespace`'s current flag document and the revision that wrote it.
    pub fn flags(&self, namespace: &str) -> Option<&FlagsRecord> {
        self.flags.get(namespace).and_then(|h| h.back())
    }

    /// `namespace`'s recorded flag documents, oldest first.
    pub fn flag_history(&self, namespace: &str) -> Vec<FlagsRecord> {
        self.flags
            .get(namespace)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn put_flags(
        &mut self,
        index: u64,
        namespace: &str,
        document: &str,
        expected_revision: Option<u64>,
        at_ms: u64,
    ) -> ApplyResult {
        let current = self.flags(namespace).map_or(0, |r| r.revision);
        if let Some(expected) = expected_revision {
            if expected != current {
                return ApplyResult::refused(ApplyError::FlagsChanged {
                    namespace: namespace.to_string(),
                    expected,
                    actual: current,
                });
            }
        }
        self.record_flags(index, namespace, document.into(), at_ms, "put".into())
    }

    pub(super) fn rollback_flags(
        &mut self,
        index: u64,
        namespace: &str,
        to_revision: u64,
        at_ms: u64,
    ) -> ApplyResult {
        let history = self.flags.get(namespace);
        let target = match to_revision {
            // 0: the one before the current.
            0 => history.and_then(|h| h.iter().rev().nth(1)),
            r => history.and_then(|h| h.iter().find(|rec| rec.revision == r)),
        };
        let Some(target) = target else {
            return ApplyResult::refused(ApplyError::FlagRevisionNotFound {
                namespace: namespace.to_string(),
                revision: to_revision,
            });
        };
        let (document, from) = (target.document.clone(), target.revision);
        self.record_flags(
            index,
            namespace,
            document,
            at_ms,
            format!("rollback to {from}"),
        )
    }

    fn record_flags(
        &mut self,
        index: u64,
        namespace: &str,
        document: Arc<str>,
        at_ms: u64,
        action: String,
    ) -> ApplyResult {
        if document.len() > MAX_FLAG_DOCUMENT_BYTES {
            return ApplyResult::refused(ApplyError::FlagDocumentTooLarge {
                bytes: document.len(),
                limit: MAX_FLAG_DOCUMENT_BYTES,
            });
        }
        let history = self.flags.entry(namespace.to_string()).or_default();
        history.push_back(FlagsRecord {
            revision: index,
            at_ms,
            document: document.clone(),
            action,
        });
        // Superseded records beyond the count or the bytes go, oldest first; the
        // current one always stays.
        let mut old_bytes: usize = history.iter().rev().skip(1).map(|r| r.document.len()).sum();
        while history.len() > 1
            && (history.len() > MAX_FLAG_HISTORY || old_bytes > MAX_FLAG_HISTORY_BYTES)
        {
            if let Some(gone) = history.pop_front() {
                old_bytes -= gone.document.len();
            }
        }
        self.revision = index;
        ApplyResult {
            reply: Ok(Reply::Done { revision: index }),
            change: Some(Change {
                revision: index,
                flags: vec![FlagsChange {
                    namespace: namespace.to_string(),
                    document,
                    revision: index,
                }],
                ..Change::default()
            }),
            ..ApplyResult::refused(ApplyError::Batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::{ApplyError, Catalog, Command, Limits};

    fn put(doc: &str, expected: Option<u64>) -> Command {
        Command::PutFlags {
            namespace: "default".into(),
            document: doc.into(),
            expected_revision: expected,
            at_ms: 9,
        }
    }

    #[test]
    fn put_compare_and_set_history_and_rollback() {
        let mut c = Catalog::new(Limits::default());
        assert!(c.apply(1, &put("{\"flags\":{}}", Some(0))).reply.is_ok());
        let err = c
            .apply(2, &put("{\"flags\":{\"a\":1}}", Some(0)))
            .reply
            .expect_err("stale");
        assert!(
            matches!(err, ApplyError::FlagsChanged { actual: 1, .. }),
            "{err}"
        );
        assert!(c
            .apply(3, &put("{\"flags\":{\"b\":1}}", Some(1)))
            .reply
            .is_ok());
        let rb = Command::RollbackFlags {
            namespace: "default".into(),
            to_revision: 0,
            at_ms: 10,
        };
        let r = c.apply(4, &rb);
        assert!(r.reply.is_ok());
        assert_eq!(r.change.map(|ch| ch.flags.len()), Some(1));
        let now = c.flags("default").expect("current");
        assert_eq!((&*now.document, now.revision), ("{\"flags\":{}}", 4));
        assert_eq!(now.action, "rollback to 1");
        assert_eq!(c.flag_history("default").len(), 3);
        let missing = Command::RollbackFlags {
            namespace: "default".into(),
            to_revision: 99,
            at_ms: 10,
        };
        assert!(c.apply(5, &missing).reply.is_err());
        for i in 0..30 {
            assert!(c.apply(10 + i, &put("{\"flags\":{}}", None)).reply.is_ok());
        }
        assert_eq!(c.flag_history("default").len(), super::MAX_FLAG_HISTORY);
    }
}
