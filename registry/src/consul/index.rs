//! `X-Consul-Index` and blocking queries.
//!
//! Each service (and each namespace, for the catalog-wide reads) has a modify index: the
//! revision of the last applied change that touched it. A background task follows the
//! watch hub and raises the index of what each change touched, then wakes only the
//! requests blocked on it, so an unrelated write wakes nobody. Nothing here runs on the
//! write path: publishing to the hub never waits for this task.
//!
//! Indexes never go backwards: a service no change has named since this node started
//! reports the node's floor (the catalog revision it started from, or the revision of
//! the last full reset), which is at least every index it had before. A blocked request
//! is a parked future (no thread); the totals are bounded per client and per node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{broadcast, Notify};

use crate::model::Change;

/// Slots kept before the table is folded into its floor (every slot then reads the
/// floor, which only wakes blocked requests once).
const MAX_SLOTS: usize = 200_000;

/// Per-service and per-namespace modify indexes, and who waits on them.
pub struct ServiceIndex {
    state: Mutex<State>,
    /// Woken on every change: requests on a service no change has named wait here.
    any: Notify,
}

#[derive(Default)]
struct State {
    floor: u64,
    /// namespace -> service -> slot; service "" is the namespace's own slot. Nested so
    /// that a read looks its slot up by `&str`, without building a key.
    slots: HashMap<String, HashMap<String, Slot>>,
    /// Slots in `slots`, all namespaces together.
    count: usize,
}

impl State {
    /// Raises the slot of `service` in `namespace` to `revision` (making it, from the
    /// floor, if it is new); what to wake when it moved.
    fn raise(&mut self, namespace: &str, service: &str, revision: u64) -> Option<Arc<Notify>> {
        let floor = self.floor;
        let services = match self.slots.get_mut(namespace) {
            Some(s) => s,
            None => self.slots.entry(namespace.to_string()).or_default(),
        };
        let slot = match services.get_mut(service) {
            Some(slot) => slot,
            None => {
                self.count += 1;
                services.entry(service.to_string()).or_insert_with(|| Slot {
                    index: floor,
                    notify: Arc::new(Notify::new()),
                })
            }
        };
        (revision > slot.index).then(|| {
            slot.index = revision;
            slot.notify.clone()
        })
    }
}

struct Slot {
    index: u64,
    notify: Arc<Notify>,
}

impl ServiceIndex {
    pub fn new(floor: u64) -> Self {
        Self {
            state: Mutex::new(State {
                floor,
                ..State::default()
            }),
            any: Notify::new(),
        }
    }

    /// The modify index of `service` in `namespace` ("" for the namespace itself), at
    /// least 1, and what to wait on for it to move.
    fn get(&self, namespace: &str, service: &str) -> (u64, Option<Arc<Notify>>) {
        let s = self.state.lock();
        match s.slots.get(namespace).and_then(|m| m.get(service)) {
            Some(slot) => (slot.index.max(1), Some(slot.notify.clone())),
            None => (s.floor.max(1), None),
        }
    }

    /// The modify index of `service` in `namespace` ("" for the namespace), at least 1.
    pub fn index(&self, namespace: &str, service: &str) -> u64 {
        self.get(namespace, service).0
    }

    /// Raises the index of everything `change` touched and wakes who waits on it.
    pub fn apply(&self, change: &Change) {
        if change.reset {
            self.reset(change.revision);
            return;
        }
        let mut touched: Vec<(&str, &str)> = Vec::new();
        touched.extend(
            change
                .upserted
                .iter()
                .map(|i| (i.namespace.as_str(), i.service.as_str())),
        );
        touched.extend(
            change
                .removed
                .iter()
                .map(|r| (r.namespace.as_str(), r.service.as_str())),
        );
        touched.extend(
            change
                .policies
                .iter()
                .map(|p| (p.namespace.as_str(), p.service.as_str())),
        );
        touched.extend(change.mtls.iter().map(|(n, s, _)| (n.as_str(), s.as_str())));
        if touched.is_empty() {
            return;
        }
        let mut woken: Vec<Arc<Notify>> = Vec::new();
        {
            let mut s = self.state.lock();
            if s.count + 2 * touched.len() > MAX_SLOTS {
                drop(s);
                self.reset(change.revision);
                return;
            }
            for (ns, svc) in &touched {
                woken.extend(s.raise(ns, svc, change.revision));
                woken.extend(s.raise(ns, "", change.revision));
            }
        }
        for n in woken {
            n.notify_waiters();
        }
        self.any.notify_waiters();
    }

    /// Every index becomes `revision` (a restored snapshot, or changes this task
    /// missed): every blocked request wakes and compares again.
    pub fn reset(&self, revision: u64) {
        let slots = {
            let mut s = self.state.lock();
            s.floor = s.floor.max(revision);
            s.count = 0;
            std::mem::take(&mut s.slots)
        };
        for slot in slots.into_values().flat_map(HashMap::into_values) {
            slot.notify.notify_waiters();
        }
        self.any.notify_waiters();
    }

    /// Waits until the index of `service` ("" for the namespace) passes `seen`, or
    /// `hold` passes; returns the index then.
    pub async fn wait_past(
        &self,
        namespace: &str,
        service: &str,
        seen: u64,
        hold: Duration,
    ) -> u64 {
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            let (_, notify) = self.get(namespace, service);
            let any;
            let notified = match &notify {
                Some(n) => n.notified(),
                None => {
                    any = &self.any;
                    any.notified()
                }
            };
            tokio::pin!(notified);
            // Registered before the index is read again, so a change between the read
            // and the wait is not missed.
            notified.as_mut().enable();
            let now = self.index(namespace, service);
            if now > seen {
                return now;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.index(namespace, service);
            }
        }
    }
}

/// Follows the hub until it closes or `shutdown` flips; a lagged receiver resets.
pub async fn follow(
    index: Arc<ServiceIndex>,
    mut changes: broadcast::Receiver<Arc<Change>>,
    revision: impl Fn() -> u64 + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            n = changes.recv() => n,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match next {
            Ok(change) => index.apply(&change),
            Err(broadcast::error::RecvError::Lagged(_)) => index.reset(revision()),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Bounds on requests held open: per client address and per node.
#[derive(Debug)]
pub struct Blocking {
    max_total: usize,
    max_per_client: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Held while a request blocks; gives its place back when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    blocking: &'a Blocking,
    client: IpAddr,
}

impl Blocking {
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        Self {
            max_total,
            max_per_client,
            held: Mutex::new((0, HashMap::new())),
        }
    }

    /// A place for one more blocked request from `client`, or why not.
    pub fn take(&self, client: IpAddr) -> Result<Held<'_>, String> {
        let mut h = self.held.lock();
        if h.0 >= self.max_total {
            return Err(format!(
                "this node already holds {} blocking queries (--consul-max-blocking): retry later or use another node",
                self.max_total
            ));
        }
        let mine = h.1.entry(client).or_insert(0);
        if *mine >= self.max_per_client {
            return Err(format!(
                "{client} already holds {} blocking queries on this node (--consul-max-blocking-per-client): watch fewer services at once",
                self.max_per_client
            ));
        }
        *mine += 1;
        h.0 += 1;
        Ok(Held {
            blocking: self,
            client,
        })
    }

    /// Requests blocked now.
    pub fn held(&self) -> usize {
        self.held.lock().0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut h = self.blocking.held.lock();
        h.0 = h.0.saturating_sub(1);
        if let Some(n) = h.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                h.1.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, InstanceRef};

    fn upsert(revision: u64, service: &str) -> Change {
        Change {
            revision,
            upserted: vec![Arc::new(Instance {
                namespace: "default".into(),
                service: service.into(),
                id: format!("{service}-1"),
                address: "10.0.0.1".into(),
                port: 80,
                version: "1".into(),
                labels: Default::default(),
                weight: 1,
                zone: String::new(),
                state: crate::model::State::Serving,
                mesh_port: 0,
            })],
            ..Change::default()
        }
    }

    #[test]
    fn a_change_raises_only_what_it_touched_and_never_lowers() {
        let idx = ServiceIndex::new(5);
        assert_eq!(idx.index("default", "web"), 5);
        idx.apply(&upsert(7, "web"));
        assert_eq!(idx.index("default", "web"), 7);
        assert_eq!(idx.index("default", "payments"), 5);
        assert_eq!(idx.index("default", ""), 7);
        idx.apply(&Change {
            revision: 9,
            removed: vec![InstanceRef {
                namespace: "default".into(),
                service: "payments".into(),
                id: "p".into(),
            }],
            ..Change::default()
        });
        assert_eq!(idx.index("default", "web"), 7);
        assert_eq!(idx.index("default", "payments"), 9);
        // A reset lifts everything to at least its revision.
        idx.reset(12);
        assert_eq!(idx.index("default", "web"), 12);
        assert_eq!(ServiceIndex::new(0).index("default", "web"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_wait_wakes_on_its_service_and_not_on_others() {
        let idx = Arc::new(ServiceIndex::new(1));
        idx.apply(&upsert(2, "web"));
        let waiter = {
            let idx = idx.clone();
            tokio::spawn(async move {
                idx.wait_past("default", "web", 2, Duration::from_secs(60))
                    .await
            })
        };
        tokio::task::yield_now().await;
        idx.apply(&upsert(3, "payments"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        idx.apply(&upsert(4, "web"));
        assert_eq!(waiter.await.expect("as expected"), 4);
        // The deadline answers with the unchanged index.
        assert_eq!(
            idx.wait_past("default", "web", 4, Duration::from_secs(5))
                .await,
            4
        );
        // A service nobody changed yet wakes on its first change.
        let w = {
            let idx = idx.clone();
            tokio::spawn(async move {
                idx.wait_past("default", "new", 1, Duration::from_secs(60))
                    .await
            })
        };
        tokio::task::yield_now().await;
        idx.apply(&upsert(5, "new"));
        assert_eq!(w.await.expect("as expected"), 5);
    }

    #[test]
    fn blocked_requests_are_bounded_per_client_and_in_total() {
        let b = Blocking::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().expect("as expected");
        let c: IpAddr = "127.0.0.2".parse().expect("as expected");
        let h1 = b.take(a).expect("as expected");
        let _h2 = b.take(a).expect("as expected");
        assert!(b.take(a).expect_err("refused").contains("per-client"));
        let _h3 = b.take(c).expect("as expected");
        assert!(b
            .take(c)
            .expect_err("refused")
            .contains("--consul-max-blocking)"));
        drop(h1);
        assert_eq!(b.held(), 2);
        assert!(b.take(c).is_ok());
    }
}
