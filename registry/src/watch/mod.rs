//! The watch hub: applied changes go to a bounded broadcast and a bounded history.
//!
//! Publishing never waits (a broadcast send only overwrites the oldest slot), so no
//! watcher can slow registration. A watcher that falls more than the buffer behind gets
//! `Lagged` from its receiver and is resynced with a fresh snapshot. The history lets a
//! reconnecting client resume from the revision it last saw without a full snapshot.
//!
//! [`budget`] bounds the bytes of events built for watchers and not yet taken by their
//! connections, per watcher and per node.

pub mod budget;

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::model::{Change, Revision};

struct History {
    events: VecDeque<Arc<Change>>,
    capacity: usize,
    /// Revision of the newest change dropped from the history: a resume from a revision
    /// at or after it can be served from `events`.
    floor: Revision,
}

/// Fan-out of applied changes to every watcher.
pub struct WatchHub {
    tx: broadcast::Sender<Arc<Change>>,
    history: Mutex<History>,
}

impl WatchHub {
    /// `buffer`: changes a watcher may fall behind before it is resynced.
    /// `history`: changes kept for resuming from a revision.
    pub fn new(buffer: usize, history: usize, floor: Revision) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        Self {
            tx,
            history: Mutex::new(History {
                events: VecDeque::with_capacity(history.min(65_536)),
                capacity: history.max(1),
                floor,
            }),
        }
    }

    /// Records and broadcasts a change. Call it with the catalog write lock held, so a
    /// watcher that subscribes under the read lock sees each change exactly once: either
    /// in its starting state or on its receiver.
    pub fn publish(&self, change: Change) {
        let change = Arc::new(change);
        {
            let mut h = self.history.lock();
            if h.events.len() == h.capacity {
                if let Some(old) = h.events.pop_front() {
                    h.floor = old.revision;
                }
            }
            h.events.push_back(change.clone());
        }
        // An error only means nobody is watching right now.
        let _ = self.tx.send(change);
    }

    /// Forgets the history (the catalog was replaced, e.g. by a snapshot from the
    /// leader) and tells every watcher to resync: a reset change makes each one send a
    /// fresh snapshot.
    pub fn reset(&self, revision: Revision) {
        {
            let mut h = self.history.lock();
            h.events.clear();
            h.floor = revision;
        }
        let _ = self.tx.send(Arc::new(Change {
            revision,
            reset: true,
            ..Change::default()
        }));
    }

    /// A receiver for every change published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Every change after `since`, or `None` when some of them are no longer held.
    pub fn since(&self, since: Revision) -> Option<Vec<Arc<Change>>> {
        let h = self.history.lock();
        if since < h.floor {
            return None;
        }
        Some(
            h.events
                .iter()
                .filter(|c| c.revision > since)
                .cloned()
                .collect(),
        )
    }
}

/// What one watcher asked for: its namespace's services (all when empty), and beside
/// them, if it asked, the namespace's flag document and the KV entries under prefixes.
#[derive(Clone, Debug, Default)]
pub struct Interest {
    pub namespace: String,
    pub services: Vec<String>,
    pub flags: bool,
    pub kv_prefixes: Vec<String>,
}

impl Interest {
    /// Whether a KV key is under one of the watched prefixes.
    pub fn wants_key(&self, namespace: &str, key: &str) -> bool {
        namespace == self.namespace && self.kv_prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// The part of a change one watcher asked for, or `None` when nothing matches.
pub fn filter(change: &Change, interest: &Interest) -> Option<Change> {
    let (namespace, services) = (interest.namespace.as_str(), interest.services.as_slice());
    let kv: Vec<_> = change
        .kv
        .iter()
        .filter(|k| interest.wants_key(&k.namespace, &k.key))
        .cloned()
        .collect();
    let flags: Vec<_> = change
        .flags
        .iter()
        .filter(|f| interest.flags && f.namespace == namespace)
        .cloned()
        .collect();
    if kv.is_empty() && flags.is_empty() && !change.touches(namespace, services) {
        return None;
    }
    let wanted = |ns: &str, svc: &str| {
        ns == namespace && (services.is_empty() || services.iter().any(|s| s == svc))
    };
    Some(Change {
        revision: change.revision,
        upserted: change
            .upserted
            .iter()
            .filter(|i| wanted(&i.namespace, &i.service))
            .cloned()
            .collect(),
        removed: change
            .removed
            .iter()
            .filter(|r| wanted(&r.namespace, &r.service))
            .cloned()
            .collect(),
        policies: change
            .policies
            .iter()
            .filter(|p| wanted(&p.namespace, &p.service))
            .cloned()
            .collect(),
        intentions: change
            .intentions
            .iter()
            .filter(|i| i.namespace == namespace)
            .cloned()
            .collect(),
        trust_bundle: change.trust_bundle.clone(),
        mtls: change
            .mtls
            .iter()
            .filter(|(ns, svc, _)| wanted(ns, svc))
            .cloned()
            .collect(),
        kv,
        flags,
        reset: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: Revision) -> Change {
        Change {
            revision,
            ..Change::default()
        }
    }

    #[test]
    fn history_serves_resumes_until_it_drops_the_needed_change() {
        let hub = WatchHub::new(8, 3, 0);
        for r in [2, 5, 7, 9] {
            hub.publish(change(r));
        }
        // 2 was dropped: resuming from before it is impossible, from 2 on it works.
        assert!(hub.since(1).is_none());
        let revs = |v: Vec<Arc<Change>>| v.iter().map(|c| c.revision).collect::<Vec<_>>();
        assert_eq!(hub.since(2).map(revs), Some(vec![5, 7, 9]));
        assert_eq!(hub.since(7).map(revs), Some(vec![9]));
        assert_eq!(hub.since(9).map(revs), Some(vec![]));
    }
}
