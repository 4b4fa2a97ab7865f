//! Per-service counters that outlive catalog updates: circuit-breaker limits (Envoy's
//! active requests and active retries; its connection and pending-request limits are
//! not enforced yet) and the retry budget (Linkerd's rate over a 10 s window, Envoy's
//! share of active requests).
//!
//! Everything is an atomic with an RAII guard: the request path never locks, and a
//! request that ends any way at all (answered, timed out, cancelled by its caller)
//! gives its place back when its guard drops.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Which circuit-breaker limit refused a request (`limit` label, error text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Retries,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
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
}

/// A place under a counter's limit, given back on drop.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ServiceLimits>,
    which: Limit,
}

fn counter(l: &ServiceLimits, which: Limit) -> &AtomicU32 {
    match which {
        Limit::Requests => &l.active_requests,
        Limit::Retries => &l.active_retries,
    }
}

impl Permit {
    /// A place under `max` on `which`'s counter, or `None` at the limit (never above:
    /// the increment is undone before anyone else can be refused because of it).
    pub fn try_take(limits: &Arc<ServiceLimits>, which: Limit, max: u32) -> Option<Permit> {
        let c = counter(limits, which);
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
        counter(&self.limits, self.which).fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

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
