//! The KV store: per namespace, keys in order (so a prefix is a range), each entry with
//! its create and modify revisions; check-and-set on the modify revision; a bound on
//! the bytes every namespace's entries hold together.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::apply::{ApplyError, ApplyResult, Catalog, Reply};
use crate::model::kv::{KvChange, KvEntry, MAX_KV_RECURSE};
use crate::model::Change;

/// Bytes counted per entry beyond its key and value, so that a flood of empty keys is
/// bounded too.
const ENTRY_OVERHEAD: usize = 64;

/// Every namespace's entries and the bytes they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct KvStore {
    /// namespace -> key -> entry.
    pub(super) namespaces: BTreeMap<String, BTreeMap<String, Arc<KvEntry>>>,
    /// namespace -> the revision of its last delete, so that an index reported for a
    /// prefix never goes backwards when its newest key is deleted (Consul keeps
    /// tombstones for that; one number per namespace is coarser but never wrong).
    pub(super) deleted: BTreeMap<String, u64>,
    /// Derived from `namespaces` (rebuilt after a snapshot load).
    #[serde(skip)]
    pub(super) bytes: usize,
}

fn counted(e: &KvEntry) -> usize {
    e.size() + ENTRY_OVERHEAD
}

impl KvStore {
    pub(super) fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.deleted.is_empty()
    }

    /// Recomputes the byte count (after a snapshot load).
    pub(super) fn recount(&mut self) {
        self.bytes = self
            .namespaces
            .values()
            .flat_map(|m| m.values())
            .map(|e| counted(e))
            .sum();
    }
}

/// The entries of `map` under `prefix`, in key order.
fn under<'a>(
    map: &'a BTreeMap<String, Arc<KvEntry>>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Arc<KvEntry>)> + 'a {
    map.range(prefix.to_string()..)
        .take_while(move |(k, _)| k.starts_with(prefix))
}

impl Catalog {
    /// The entry at `key`.
    pub fn kv_get(&self, namespace: &str, key: &str) -> Option<Arc<KvEntry>> {
        self.kv.namespaces.get(namespace)?.get(key).cloned()
    }

    /// Up to `limit` entries under `prefix`, in key order.
    pub fn kv_list(&self, namespace: &str, prefix: &str, limit: usize) -> Vec<Arc<KvEntry>> {
        self.kv
            .namespaces
            .get(namespace)
            .map(|m| {
                under(m, prefix)
                    .take(limit)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The largest modify revision under `prefix` and of the namespace's last delete (0:
    /// neither), what Consul reports as a KV read's X-Consul-Index: it moves when
    /// anything under the prefix changes, and never backwards.
    pub fn kv_max_revision(&self, namespace: &str, prefix: &str) -> u64 {
        let written = self
            .kv
            .namespaces
            .get(namespace)
            .map(|m| {
                under(m, prefix)
                    .map(|(_, e)| e.modify_revision)
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        written.max(self.kv.deleted.get(namespace).copied().unwrap_or(0))
    }

    /// Bytes the store holds, as counted against `Limits::max_kv_bytes`.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes
    }

    pub(super) fn kv_put(
        &mut self,
        index: u64,
        namespace: &str,
        key: &str,
        value: &[u8],
        flags: u64,
        cas: Option<u64>,
    ) -> ApplyResult {
        let old = self.kv.namespaces.get(namespace).and_then(|m| m.get(key));
        // Consul's check-and-set: 0 means "only if absent", N "only if its modify index is N".
        if let Some(cas) = cas {
            let current = old.map_or(0, |e| e.modify_revision);
            if current != cas {
                return kv_reply(false, self.revision, None);
            }
        }
        let entry = KvEntry {
            key: key.to_string(),
            value: value.into(),
            flags,
            create_revision: old.map_or(index, |e| e.create_revision),
            modify_revision: index,
        };
        let freed = old.map_or(0, |e| counted(e));
        let would_hold = self.kv.bytes - freed + counted(&entry);
        let limit = self.limits.max_kv_bytes;
        if would_hold > limit {
            return ApplyResult::refused(ApplyError::KvFull { would_hold, limit });
        }
        let entry = Arc::new(entry);
        self.kv
            .namespaces
            .entry(namespace.to_string())
            .or_default()
            .insert(key.to_string(), entry.clone());
        self.kv.bytes = would_hold;
        self.revision = index;
        let change = Change {
            revision: index,
            kv: vec![KvChange {
                namespace: namespace.to_string(),
                key: key.to_string(),
                entry: Some(entry),
            }],
            ..Change::default()
        };
        kv_reply(true, index, Some(change))
    }

    pub(super) fn kv_delete(
        &mut self,
        index: u64,
        namespace: &str,
        key: &str,
        recurse: bool,
        cas: Option<u64>,
    ) -> ApplyResult {
        let Some(map) = self.kv.namespaces.get_mut(namespace) else {
            // Deleting what is not there succeeds, as in Consul (unless a CAS names an index).
            return kv_reply(cas.is_none_or(|c| c == 0), self.revision, None);
        };
        let keys: Vec<String> = if recurse {
            let keys: Vec<String> = under(map, key).map(|(k, _)| k.clone()).collect();
            if keys.len() > MAX_KV_RECURSE {
                return ApplyResult::refused(ApplyError::KvRecurseTooLarge {
                    prefix: key.to_string(),
                    count: keys.len(),
                    limit: MAX_KV_RECURSE,
                });
            }
            keys
        } else {
            if let Some(cas) = cas {
                let current = map.get(key).map_or(0, |e| e.modify_revision);
                if current != cas {
                    return kv_reply(false, self.revision, None);
                }
            }
            if map.contains_key(key) {
                vec![key.to_string()]
            } else {
                Vec::new()
            }
        };
        if keys.is_empty() {
            return kv_reply(true, self.revision, None);
        }
        let mut removed = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(e) = map.remove(&k) {
                self.kv.bytes -= counted(&e);
                removed.push(KvChange {
                    namespace: namespace.to_string(),
                    key: k,
                    entry: None,
                });
            }
        }
        if map.is_empty() {
            self.kv.namespaces.remove(namespace);
        }
        self.kv.deleted.insert(namespace.to_string(), index);
        self.revision = index;
        let change = Change {
            revision: index,
            kv: removed,
            ..Change::default()
        };
        kv_reply(true, index, Some(change))
    }
}

fn kv_reply(applied: bool, revision: u64, change: Option<Change>) -> ApplyResult {
    ApplyResult {
        reply: Ok(Reply::Kv { applied, revision }),
        change,
        ..ApplyResult::refused(ApplyError::Batch)
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::{Catalog, Command, Limits, Reply};

    fn put(key: &str, value: &str, cas: Option<u64>) -> Command {
        Command::KvPut {
            namespace: "default".into(),
            key: key.into(),
            value: value.as_bytes().to_vec(),
            flags: 7,
            cas,
        }
    }

    fn applied(c: &mut Catalog, index: u64, cmd: &Command) -> bool {
        match c.apply(index, cmd).reply {
            Ok(Reply::Kv { applied, .. }) => applied,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    #[test]
    fn put_get_cas_and_revisions() {
        let mut c = Catalog::new(Limits::default());
        assert!(applied(&mut c, 1, &put("config/a", "1", Some(0))));
        // cas=0 on an existing key is refused, and changes nothing.
        assert!(!applied(&mut c, 2, &put("config/a", "2", Some(0))));
        assert_eq!(c.revision(), 1);
        assert!(applied(&mut c, 3, &put("config/a", "3", Some(1))));
        let e = c.kv_get("default", "config/a").expect("entry");
        assert_eq!((e.create_revision, e.modify_revision, e.flags), (1, 3, 7));
        assert_eq!(&*e.value, b"3");
        assert!(!applied(&mut c, 4, &put("config/a", "4", Some(1))));
        assert!(applied(&mut c, 5, &put("config/b", "x", None)));
        assert_eq!(c.kv_max_revision("default", "config/"), 5);
        assert_eq!(c.kv_list("default", "config/", 10).len(), 2);
        assert_eq!(c.kv_list("other", "config/", 10).len(), 0);
    }

    #[test]
    fn delete_one_recurse_and_cas() {
        let mut c = Catalog::new(Limits::default());
        for (i, k) in ["a/1", "a/2", "a/3", "ab", "b"].iter().enumerate() {
            assert!(applied(&mut c, i as u64 + 1, &put(k, "v", None)));
        }
        let del = |key: &str, recurse, cas| Command::KvDelete {
            namespace: "default".into(),
            key: key.into(),
            recurse,
            cas,
        };
        assert!(!applied(&mut c, 10, &del("b", false, Some(4))));
        assert!(applied(&mut c, 11, &del("b", false, Some(5))));
        assert!(applied(&mut c, 12, &del("a/", true, None)));
        let left: Vec<String> = c
            .kv_list("default", "", 10)
            .iter()
            .map(|e| e.key.clone())
            .collect();
        assert_eq!(left, vec!["ab".to_string()]);
        let r = c.apply(13, &del("missing", false, None));
        assert!(r.change.is_none());
        assert!(applied(&mut c, 14, &del("ab", false, None)));
        assert_eq!(c.kv_bytes(), 0);
        // The index of a prefix whose keys are gone is the delete's, not 0.
        assert_eq!(c.kv_max_revision("default", "a/"), 14);
    }

    #[test]
    fn a_full_store_refuses_with_a_clear_error_and_keeps_everything() {
        let mut c = Catalog::new(Limits {
            max_kv_bytes: 1_000,
            ..Limits::default()
        });
        assert!(applied(&mut c, 1, &put("a", &"x".repeat(600), None)));
        let r = c.apply(2, &put("b", &"x".repeat(600), None));
        let err = r.reply.expect_err("full");
        assert!(err.to_string().contains("max-kv-bytes"), "{err}");
        assert!(c.kv_get("default", "b").is_none());
        // Replacing a value with one of the same size fits.
        assert!(applied(&mut c, 3, &put("a", &"y".repeat(600), None)));
    }
}

#[cfg(test)]
mod persist_tests {
    use crate::catalog::{Catalog, Command, Limits, PersistedCatalog};

    /// KV entries (with their revisions and the byte count) and flag history come back
    /// from a snapshot as they were.
    #[test]
    fn a_snapshot_keeps_kv_and_flags() {
        let mut c = Catalog::new(Limits::default());
        let put = Command::KvPut {
            namespace: "default".into(),
            key: "a/b".into(),
            value: vec![0, 1, 2, 255],
            flags: 9,
            cas: None,
        };
        assert!(c.apply(1, &put).reply.is_ok());
        let del = Command::KvDelete {
            namespace: "default".into(),
            key: "gone".into(),
            recurse: false,
            cas: None,
        };
        assert!(c.apply(2, &del).reply.is_ok());
        let flags = Command::PutFlags {
            namespace: "prod".into(),
            document: "{\"flags\":{}}".into(),
            expected_revision: None,
            at_ms: 3,
        };
        assert!(c.apply(3, &flags).reply.is_ok());
        let bytes = postcard::to_allocvec(&c.to_persisted()).expect("encode");
        let back: PersistedCatalog = postcard::from_bytes(&bytes).expect("decode");
        let again = Catalog::from_persisted(Limits::default(), back);
        assert_eq!(again.kv_get("default", "a/b"), c.kv_get("default", "a/b"));
        assert_eq!(again.kv_bytes(), c.kv_bytes());
        assert_eq!(again.kv_max_revision("default", "a/"), 1);
        assert_eq!(again.flag_history("prod"), c.flag_history("prod"));
    }
}
