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

use bytes::Bytes;
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
    /// Deltas already filtered and encoded, by change and kind of watcher: see
    /// [`WatchHub::encoded`].
    frames: Mutex<VecDeque<EncodedDelta>>,
}

/// How many encoded deltas [`WatchHub::encoded`] keeps: enough for every kind of watcher
/// (namespace, services, flags, prefixes) a change reaches before the next one comes.
const ENCODED_KEPT: usize = 64;

/// One change as one kind of watcher is sent it.
struct EncodedDelta {
    revision: Revision,
    interest: Interest,
    cluster_id: String,
    /// The gRPC frame; `None` when the change holds nothing this kind of watcher wants.
    frame: Option<Bytes>,
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
            frames: Mutex::new(VecDeque::with_capacity(ENCODED_KEPT)),
        }
    }

    /// The delta of change `revision` for watchers of `interest` in cluster
    /// `cluster_id`, as a gRPC frame: built by `build` (filter, then encode) for the first
    /// such watcher and shared by the rest. A change that reaches 1,000 sidecars watching
    /// the same namespace is filtered and encoded once, not 1,000 times, and the same
    /// bytes go to every connection. `build` runs without the lock held.
    pub fn encoded(
        &self,
        revision: Revision,
        interest: &Interest,
        cluster_id: &str,
        build: impl FnOnce() -> Option<Bytes>,
    ) -> Option<Bytes> {
        let found = |frames: &VecDeque<EncodedDelta>| {
            frames
                .iter()
                .rev()
                .find(|e| {
                    e.revision == revision && e.cluster_id == cluster_id && e.interest == *interest
                })
                .map(|e| e.frame.clone())
        };
        if let Some(frame) = found(&self.frames.lock()) {
            return frame;
        }
        let frame = build();
        let mut frames = self.frames.lock();
        // Another watcher may have built it meanwhile: keep one entry.
        if found(&frames).is_none() {
            if frames.len() == ENCODED_KEPT {
                frames.pop_front();
            }
            frames.push_back(EncodedDelta {
                revision,
                interest: interest.clone(),
                cluster_id: cluster_id.to_string(),
                frame: frame.clone(),
            });
        }
        frame
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
        self.frames.lock().clear();
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

    #[test]
    fn a_delta_is_built_once_per_kind_of_watcher_and_shared() {
        let hub = WatchHub::new(8, 8, 0);
        let web = Interest {
            namespace: "default".into(),
            ..Interest::default()
        };
        let other = Interest {
            namespace: "other".into(),
            ..Interest::default()
        };
        let mut built = 0;
        let mut get = |revision, interest: &Interest, cluster: &str, out: Option<&'static [u8]>| {
            hub.encoded(revision, interest, cluster, || {
                built += 1;
                out.map(Bytes::from_static)
            })
        };
        let a = get(5, &web, "c1", Some(b"five"));
        let b = get(5, &web, "c1", Some(b"not built again"));
        assert_eq!(a.as_deref(), Some(&b"five"[..]));
        assert_eq!(
            b.as_deref(),
            Some(&b"five"[..]),
            "the second watcher shares the frame"
        );
        // Another kind of watcher, another change, another cluster: each built anew.
        assert_eq!(get(5, &other, "c1", None), None);
        assert_eq!(
            get(5, &other, "c1", Some(b"x")),
            None,
            "nothing to send is kept too"
        );
        assert_eq!(
            get(6, &web, "c1", Some(b"six")).as_deref(),
            Some(&b"six"[..])
        );
        assert_eq!(get(5, &web, "c2", Some(b"c2")).as_deref(), Some(&b"c2"[..]));
        assert_eq!(built, 4);
        // A reset forgets them (the catalog was replaced).
        hub.reset(7);
        let again = hub.encoded(5, &web, "c1", || Some(Bytes::from_static(b"rebuilt")));
        assert_eq!(again.as_deref(), Some(&b"rebuilt"[..]));
        // At most ENCODED_KEPT are kept, the oldest going first.
        for r in 100..100 + ENCODED_KEPT as u64 {
            hub.encoded(r, &web, "c1", || None);
        }
        assert_eq!(hub.frames.lock().len(), ENCODED_KEPT);
        let rebuilt = hub.encoded(5, &web, "c1", || Some(Bytes::from_static(b"evicted")));
        assert_eq!(rebuilt.as_deref(), Some(&b"evicted"[..]));
    }
}
