//! The bytes of watch events that are built but not yet taken by their connections, per
//! watcher and for the whole node.
//!
//! An event is charged when it is encoded and given back when the connection has
//! written it out: its bytes live in a [`Bytes`] whose owner ([`Charged`]) releases them
//! on drop, wherever that happens (the HTTP/2 send queue, hyper, or the stream itself).
//! So the gauge counts exactly what a watcher that does not read makes the node hold.
//!
//! Two bounds:
//! - per watcher, [`STREAM_BUFFER_BYTES`]: the next event is built only while less than
//!   this of the watcher's own is unsent (one snapshot larger than it may go alone).
//!   Until then its changes wait in the hub's shared broadcast, costing nothing per
//!   watcher; one that falls past the broadcast is resynced with a fresh snapshot when
//!   it has room again.
//! - per node, `max_watch_buffer_bytes`: an event that does not fit is not queued and
//!   its watcher is closed. Exception: a small delta ([`SMALL_DELTA_BYTES`]) for a
//!   watcher with nothing unsent, so a watcher that keeps up still gets every change
//!   while others hold the budget; at most one such delta per watcher exceeds it.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

/// 256 MiB: about 300 snapshots of a 0.8 MB catalog held for watchers that do not read,
/// a small share of a registry's memory next to the 100,000-instance goal (300 MiB).
pub const DEFAULT_MAX_WATCH_BUFFER_BYTES: usize = 256 * 1024 * 1024;
/// Bytes of its own a watcher may have unsent before its next event waits: several
/// deltas in flight for a watcher that reads, a bounded cost for one that does not.
pub const STREAM_BUFFER_BYTES: usize = 64 * 1024;
/// A delta this small is queued for a watcher with nothing unsent even when the node's
/// budget is full (a registration's delta is about 5 KiB at most).
pub const SMALL_DELTA_BYTES: usize = 16 * 1024;

/// The node's budget for unsent watch events.
pub struct WatchBudget {
    held: AtomicUsize,
    cap: usize,
    gauge: Gauge<i64, AtomicI64>,
}

/// An event that did not fit in the node's budget.
#[derive(Debug)]
pub struct Full {
    pub held: usize,
    pub cap: usize,
}

impl WatchBudget {
    pub fn new(cap: usize, gauge: Gauge<i64, AtomicI64>) -> Self {
        Self {
            held: AtomicUsize::new(0),
            cap,
            gauge,
        }
    }

    /// Bytes held for every watcher now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether nothing more fits (new watchers are refused at once then).
    pub fn is_full(&self) -> bool {
        self.held() >= self.cap
    }

    fn reserve(&self, bytes: usize, always: bool) -> Result<(), Full> {
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            let next = held.saturating_add(bytes);
            if !always && next > self.cap {
                return Err(Full {
                    held,
                    cap: self.cap,
                });
            }
            match self
                .held
                .compare_exchange_weak(held, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => held = now,
            }
        }
        self.gauge.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        Ok(())
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
        self.gauge.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// One watcher's unsent bytes, and the task to wake when they are taken.
pub struct StreamBytes {
    budget: Arc<WatchBudget>,
    unsent: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

impl StreamBytes {
    pub fn new(budget: Arc<WatchBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            unsent: AtomicUsize::new(0),
            waker: Mutex::new(None),
        })
    }

    /// This watcher's bytes not yet taken by its connection.
    pub fn unsent(&self) -> usize {
        self.unsent.load(Ordering::Acquire)
    }

    /// Ready while this watcher has room for another event; otherwise wakes the task
    /// once its bytes are taken.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.unsent() < STREAM_BUFFER_BYTES {
            return Poll::Ready(());
        }
        *self.waker.lock() = Some(cx.waker().clone());
        // Taken between the check and storing the waker: nobody would wake us.
        if self.unsent() < STREAM_BUFFER_BYTES {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Charges `data` (one encoded event) to this watcher and the node, or refuses it
    /// when the node's budget is full. `small_delta`: the event is a delta, which a
    /// watcher with nothing unsent may queue whatever the budget (see the module doc).
    pub fn charge(
        self: &Arc<Self>,
        data: impl Into<Bytes>,
        small_delta: bool,
    ) -> Result<Bytes, Full> {
        let data: Bytes = data.into();
        let len = data.len();
        let always = small_delta && len <= SMALL_DELTA_BYTES && self.unsent() == 0;
        self.budget.reserve(len, always)?;
        self.unsent.fetch_add(len, Ordering::AcqRel);
        Ok(Bytes::from_owner(Charged {
            data,
            stream: self.clone(),
        }))
    }

    /// The node's budget this watcher draws on.
    pub fn budget(&self) -> &WatchBudget {
        &self.budget
    }
}

/// The owner of an event's bytes: gives them back to the watcher and the node when the
/// last slice of them is dropped.
struct Charged {
    /// The event's bytes: this watcher's own, or a delta shared by every watcher of its
    /// kind (each charged for it).
    data: Bytes,
    stream: Arc<StreamBytes>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        let len = self.data.len();
        self.stream.budget.release(len);
        self.stream.unsent.fetch_sub(len, Ordering::AcqRel);
        if let Some(waker) = self.stream.waker.lock().take() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(cap: usize) -> (Arc<WatchBudget>, Arc<StreamBytes>) {
        let budget = Arc::new(WatchBudget::new(cap, Gauge::default()));
        (budget.clone(), StreamBytes::new(budget))
    }

    #[test]
    fn bytes_are_held_until_the_last_slice_is_dropped() {
        let (budget, s) = stream(1_000);
        let bytes = s.charge(vec![0; 600], false).expect("fits");
        let tail = bytes.slice(100..);
        drop(bytes);
        assert_eq!((budget.held(), s.unsent()), (600, 600));
        drop(tail);
        assert_eq!((budget.held(), s.unsent()), (0, 0));
    }

    #[test]
    fn the_node_budget_refuses_what_does_not_fit_but_a_small_delta_to_an_idle_watcher() {
        let (budget, a) = stream(1_000);
        let b = StreamBytes::new(budget.clone());
        let held = a.charge(vec![0; 900], false).expect("fits");
        let refused = b.charge(vec![0; 200], false).expect_err("over the budget");
        assert_eq!((refused.held, refused.cap), (900, 1_000));
        // b has nothing unsent: its small delta goes, once.
        let delta = b.charge(vec![0; 200], true).expect("small delta");
        assert!(
            b.charge(vec![0; 200], true).is_err(),
            "b has one unsent now"
        );
        // a holds bytes of its own: no exception for it.
        assert!(a.charge(vec![0; 200], true).is_err());
        drop((held, delta));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_watcher_has_room_again_once_its_bytes_are_taken() {
        let (_, s) = stream(usize::MAX);
        let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let waker = Waker::from(Arc::new(Flag(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        let small = s.charge(vec![0; 10], false).expect("fits");
        assert!(
            s.poll_room(&mut cx).is_ready(),
            "a little unsent leaves room"
        );
        let snapshot = s.charge(vec![0; STREAM_BUFFER_BYTES], false).expect("fits");
        assert!(s.poll_room(&mut cx).is_pending());
        drop(small);
        assert!(woken.load(Ordering::SeqCst));
        assert!(
            s.poll_room(&mut cx).is_pending(),
            "the snapshot is still unsent"
        );
        drop(snapshot);
        assert!(s.poll_room(&mut cx).is_ready());
    }
}
