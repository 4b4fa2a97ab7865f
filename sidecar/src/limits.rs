//! Per-service counters that outlive catalog updates: Envoy's circuit-breaker limits
//! (active requests and active retries here; open connections and requests waiting for
//! one in [`ConnGate`], which the proxy's connector passes every new connection
//! through) and the retry budget (Linkerd's rate over a 10 s window, Envoy's share of
//! active requests).
//!
//! Everything is an atomic with an RAII guard: the request path never locks, and a
//! request that ends any way at all (answered, timed out, cancelled by its caller)
//! gives its place back when its guard drops.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// Which circuit-breaker limit refused a request (`limit` label, error text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Retries,
    Connections,
    Pending,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
            Limit::Connections => "max_connections",
            Limit::Pending => "max_pending",
        }
    }
}

/// Seconds in the retry budget's window (Linkerd's `ttl`).
pub const BUDGET_WINDOW_SECS: u64 = 10;
const SLOTS: usize = BUDGET_WINDOW_SECS as usize;

/// Linkerd's retry budget with atomics: retries in the last [`BUDGET_WINDOW_SECS`]
/// may be at most `percent`% of the requests in it plus `min_per_second` × the window.
///
/// One slot per second; each slot is one `AtomicU64` holding the second it counts (high
/// 32 bits) and the count (low 32 bits), so rolling a slot over to a new second and
/// counting in it is one compare-and-swap: no count is lost at a boundary, and there is
/// no lock. A request costs one atomic add (two at the turn of a second); only a retry
/// reads the whole window.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: [AtomicU64; SLOTS],
    retries: [AtomicU64; SLOTS],
}

fn bump(slots: &[AtomicU64; SLOTS], now_s: u64) {
    let second = now_s & 0xffff_ffff;
    let slot = &slots[(now_s % BUDGET_WINDOW_SECS) as usize];
    let mut cur = slot.load(Ordering::Relaxed);
    loop {
        let next = if cur >> 32 == second {
            cur.saturating_add(1)
        } else {
            (second << 32) | 1
        };
        match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(seen) => cur = seen,
        }
    }
}

fn window_sum(slots: &[AtomicU64; SLOTS], now_s: u64) -> u64 {
    let oldest = now_s.saturating_sub(BUDGET_WINDOW_SECS - 1) & 0xffff_ffff;
    let newest = now_s & 0xffff_ffff;
    slots
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .filter(|v| (oldest..=newest).contains(&(v >> 32)))
        .map(|v| v & 0xffff_ffff)
        .sum()
}

impl RetryBudget {
    /// Counts a request (not a retry) at second `now_s`.
    pub fn deposit(&self, now_s: u64) {
        bump(&self.requests, now_s);
    }

    /// Takes one retry from the budget; false when it is spent. Concurrent callers may
    /// overshoot by the few that read the window at the same moment.
    pub fn withdraw(&self, now_s: u64, percent: u32, min_per_second: u32) -> bool {
        let requests = window_sum(&self.requests, now_s);
        let retries = window_sum(&self.retries, now_s);
        let allowed = u64::from(min_per_second) * BUDGET_WINDOW_SECS
            + requests.saturating_mul(u64::from(percent)) / 100;
        if retries >= allowed {
            return false;
        }
        bump(&self.retries, now_s);
        true
    }
}

/// A service's live counters, carried from view to view like endpoints' live state.
#[derive(Debug, Default)]
pub struct ServiceLimits {
    /// Requests in flight (until their response body ends).
    pub active_requests: AtomicU32,
    /// Retry attempts in flight (until their response head arrives).
    pub active_retries: AtomicU32,
    pub budget: RetryBudget,
    /// Open upstream connections and requests waiting for one.
    pub conns: Arc<ConnGate>,
    /// The proxy's pooled clients for this service, made on its first request. Typed by
    /// the proxy (this module sits below it), which downcasts: one pointer comparison.
    pub clients: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

/// A place under a counter's limit, given back on drop.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ServiceLimits>,
    which: Limit,
}

/// The counter a [`Permit`] holds a place on (connection limits have their own gate).
fn counter(l: &ServiceLimits, which: Limit) -> Option<&AtomicU32> {
    match which {
        Limit::Requests => Some(&l.active_requests),
        Limit::Retries => Some(&l.active_retries),
        Limit::Connections | Limit::Pending => None,
    }
}

impl Permit {
    /// A place under `max` on `which`'s counter, or `None` at the limit (never above:
    /// the increment is undone before anyone else can be refused because of it).
    pub fn try_take(limits: &Arc<ServiceLimits>, which: Limit, max: u32) -> Option<Permit> {
        let c = counter(limits, which)?;
        let before = c.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            c.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit {
            limits: limits.clone(),
            which,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = counter(&self.limits, self.which) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl ServiceLimits {
    /// Most retries in flight at once: Envoy's retry budget, `percent`% of the active
    /// requests, never below `floor` (`max_retries`, which is also Envoy's
    /// `min_retry_concurrency` of 3).
    pub fn retry_concurrency(&self, percent: u32, floor: u32) -> u32 {
        let active = u64::from(self.active_requests.load(Ordering::Relaxed));
        let share = u32::try_from(active * u64::from(percent) / 100).unwrap_or(u32::MAX);
        share.max(floor)
    }
}

/// A connection limit refused a request: carried through hyper's connect error so the
/// proxy can tell it from an endpoint that failed (it counts against no endpoint and is
/// not retried).
#[derive(Debug, thiserror::Error)]
#[error("the service's {} limit ({max}) is reached", limit.name())]
pub struct Overflowed {
    pub limit: Limit,
    pub max: u32,
}

/// The connection counters of one service; outlives catalog updates like its other
/// limits. The limits themselves follow the policy (set on each update).
#[derive(Debug)]
pub struct ConnGate {
    open: AtomicU32,
    pending: AtomicU32,
    max_connections: AtomicU32,
    max_pending: AtomicU32,
    freed: Notify,
}

impl Default for ConnGate {
    fn default() -> Self {
        Self {
            open: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            max_connections: AtomicU32::new(1_024),
            max_pending: AtomicU32::new(1_024),
            freed: Notify::new(),
        }
    }
}

impl ConnGate {
    /// Applies the service's current limits (a raised limit lets waiters in at once).
    pub fn set_limits(&self, max_connections: u32, max_pending: u32) {
        let before = self.max_connections.swap(max_connections, Ordering::AcqRel);
        self.max_pending.store(max_pending, Ordering::Release);
        if max_connections > before {
            self.freed.notify_waiters();
        }
    }

    /// Connections open to the service's endpoints now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }

    /// A place for one more connection now, or `None` at `max_connections` (never
    /// above: the increment is undone first). TCP listeners take theirs here.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnPermit> {
        let max = self.max_connections.load(Ordering::Acquire);
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnPermit { gate: self.clone() })
    }

    /// A place for one more connection: at once while under `max_connections`, else
    /// after waiting among at most `max_pending` others, for at most `wait` (then the
    /// connection limit refuses it). Dropping the future gives the waiting place back.
    ///
    /// The bound matters beyond the request timeout: hyper's pool finishes a connect in
    /// the background when an idle connection served the request first, and such a
    /// connect must not hold a waiting place for longer than a connect may take.
    pub async fn acquire(
        self: &Arc<Self>,
        wait: std::time::Duration,
    ) -> Result<ConnPermit, Overflowed> {
        if let Some(p) = self.try_open() {
            return Ok(p);
        }
        let max_pending = self.max_pending.load(Ordering::Acquire);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflowed {
                limit: Limit::Pending,
                max: max_pending,
            });
        }
        let _waiting = Waiting(self);
        let waited = tokio::time::timeout(wait, async {
            loop {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                // Registered before the check, so a connection closed in between wakes us.
                freed.as_mut().enable();
                if let Some(p) = self.try_open() {
                    return p;
                }
                freed.await;
            }
        })
        .await;
        waited.map_err(|_| Overflowed {
            limit: Limit::Connections,
            max: self.max_connections.load(Ordering::Acquire),
        })
    }
}

/// Gives a waiting place back however the wait ends.
struct Waiting<'a>(&'a ConnGate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open connection's place under `max_connections`, given back when the
/// connection closes (hyper drops it).
#[derive(Debug)]
pub struct ConnPermit {
    gate: Arc<ConnGate>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        self.gate.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn connections_stop_at_the_limit_and_waiters_at_theirs() {
        let gate = Arc::new(ConnGate::default());
        gate.set_limits(2, 1);
        let a = gate.acquire(LONG).await.expect("first");
        let _b = gate.acquire(LONG).await.expect("second");
        assert_eq!(gate.open(), 2);
        // The third waits (one pending place), the fourth is refused at once.
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire(LONG).await.map(|_p| ()) })
        };
        while gate.pending() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = gate.acquire(LONG).await.expect_err("past max_pending");
        assert_eq!(refused.limit, Limit::Pending);
        assert_eq!(gate.open(), 2, "never above the limit");
        drop(a);
        waiter
            .await
            .expect("task")
            .expect("admitted once a connection closed");
        assert_eq!(gate.pending(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_its_place_back() {
        let gate = Arc::new(ConnGate::default());
        gate.set_limits(1, 1);
        let _a = gate.acquire(LONG).await.expect("first");
        let waited = tokio::time::timeout(Duration::from_millis(20), gate.acquire(LONG)).await;
        assert!(waited.is_err(), "still waiting when cancelled");
        assert_eq!(gate.pending(), 0);
        // A bounded wait ends with the connection limit, and gives its place back too.
        let refused = gate
            .acquire(Duration::from_millis(20))
            .await
            .expect_err("no connection freed in time");
        assert_eq!(refused.limit, Limit::Connections);
        assert_eq!(gate.pending(), 0);
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_plus_a_floor_per_second() {
        let b = RetryBudget::default();
        for _ in 0..1_000 {
            b.deposit(100);
        }
        // 20% of 1000 + 10/s over 10 s.
        let granted = (0..1_000).filter(|_| b.withdraw(100, 20, 10)).count();
        assert_eq!(granted, 300);
        // Without requests only the floor is left, and it is shared by the window.
        let empty = RetryBudget::default();
        assert_eq!((0..500).filter(|_| empty.withdraw(5, 20, 10)).count(), 100);
    }

    #[test]
    fn the_window_forgets_what_is_older_than_ten_seconds() {
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.deposit(10);
        }
        assert_eq!((0..100).filter(|_| b.withdraw(10, 50, 0)).count(), 50);
        assert!(!b.withdraw(19, 50, 0), "still within the window");
        // Second 20: both the requests and the retries of second 10 have aged out.
        assert!(!b.withdraw(20, 50, 0), "no requests in the window");
        b.deposit(20);
        b.deposit(20);
        assert!(b.withdraw(20, 50, 0));
        assert!(!b.withdraw(20, 50, 0));
    }

    #[test]
    fn permits_stop_at_the_limit_and_give_their_place_back() {
        let l = Arc::new(ServiceLimits::default());
        let held: Vec<Permit> = (0..3)
            .filter_map(|_| Permit::try_take(&l, Limit::Requests, 3))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(Permit::try_take(&l, Limit::Requests, 3).is_none());
        assert_eq!(l.active_requests.load(Ordering::Relaxed), 3, "not above it");
        drop(held);
        assert_eq!(l.active_requests.load(Ordering::Relaxed), 0);
        assert!(Permit::try_take(&l, Limit::Requests, 3).is_some());
    }

    #[test]
    fn retry_concurrency_is_a_share_of_active_requests_with_a_floor() {
        let l = ServiceLimits::default();
        assert_eq!(l.retry_concurrency(20, 3), 3);
        l.active_requests.store(100, Ordering::Relaxed);
        assert_eq!(l.retry_concurrency(20, 3), 20);
    }
}
