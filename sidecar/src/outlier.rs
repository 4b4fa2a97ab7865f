//! Outlier detection's rules, apart from where they run: how many endpoints of a service
//! may be ejected at once, which endpoints the failure-percentage check ejects, and the
//! per-service counters both kinds of ejection share.
//!
//! Two detectors, as in Envoy:
//! - **consecutive failures** (`eject_after`, default 5), counted on the request path
//!   with one atomic per outcome (`endpoint::ActiveGuard`);
//! - **failure percentage**: every [`OutlierConfig::interval`] (10 s) a background task
//!   (`sweep`) reads each endpoint's requests and failures since the last interval and
//!   ejects those failing at least [`FAILURE_PERCENTAGE`] % of at least
//!   [`REQUEST_VOLUME`] requests, when at least [`MINIMUM_HOSTS`] endpoints have that
//!   volume. Envoy has it off by default; Switchyard turns it on, since a 90 % failing
//!   endpoint that answers one success in five never trips the consecutive rule.
//!
//! Both obey one cap, Envoy's `max_ejection_percent` (default 10 %, but at least one
//! endpoint): detection must never empty a service because the fault is really in the
//! caller or in a shared dependency. An ejection ends through one probe request
//! (Linkerd's probation: `endpoint::LiveState::admit`), not only through a timer.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Failure percentage at or above which an endpoint is ejected (Envoy's `threshold`).
pub const FAILURE_PERCENTAGE: u64 = 85;
/// Requests an endpoint needs in an interval for its percentage to count (Envoy's
/// `request_volume`): a few unlucky requests prove nothing.
pub const REQUEST_VOLUME: u64 = 50;
/// Endpoints with that volume a service needs before any is judged (Envoy's
/// `minimum_hosts`): with fewer, "the outlier" may be the whole service.
pub const MINIMUM_HOSTS: usize = 5;

/// Why an endpoint was ejected (the `kind` label of the ejections metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EjectKind {
    /// `eject_after` failures in a row.
    Consecutive,
    /// At least [`FAILURE_PERCENTAGE`] % failures over an interval.
    FailurePercentage,
    /// Its probe request failed: ejected again, for longer.
    ProbeFailed,
}

impl EjectKind {
    pub fn name(self) -> &'static str {
        match self {
            EjectKind::Consecutive => "consecutive",
            EjectKind::FailurePercentage => "failure-percentage",
            EjectKind::ProbeFailed => "probe-failed",
        }
    }
}

/// Sidecar-wide outlier timing (not per service: a policy tunes how eagerly, not how
/// the clock runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// How often the failure-percentage check runs (Envoy's `interval`, 10 s).
    pub interval: Duration,
    /// An ejection lasts this times the number of ejections of the endpoint so far
    /// (Envoy's `base_ejection_time`, 30 s)...
    pub base_ejection: Duration,
    /// ...up to this (Envoy's `max_ejection_time`, 300 s).
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }
}

impl OutlierConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.base_ejection.is_zero() {
            return Err("outlier interval and base ejection time must be above zero".into());
        }
        if self.max_ejection < self.base_ejection {
            return Err("the longest ejection must be at least the base ejection time".into());
        }
        Ok(())
    }
}

/// Most endpoints of `endpoints` that may be ejected at once: `percent` of them rounded
/// down, but at least one (Envoy), so a small service can still lose its one bad
/// endpoint. `percent = 0` turns ejection off (0 is the "off" of every percentage here).
pub fn ejection_cap(endpoints: usize, percent: u32) -> u32 {
    if percent == 0 || endpoints == 0 {
        return 0;
    }
    let share = endpoints.saturating_mul(percent.min(100) as usize) / 100;
    u32::try_from(share.max(1)).unwrap_or(u32::MAX)
}

/// The counters one service's endpoints share, carried from view to view (like
/// `limits::ServiceLimits`); its settings are stored again by every view update, so the
/// request path reads the current ones with a relaxed load.
#[derive(Debug)]
pub struct ServiceOutlier {
    /// The service's name, for log lines.
    pub service: Box<str>,
    /// Consecutive failures that eject (`eject_after`).
    pub eject_after: AtomicU32,
    /// [`ejection_cap`] for the current view.
    pub cap: AtomicU32,
    /// Endpoints ejected now (including those on probation). Recounted at each view
    /// update, so an endpoint that leaves the catalog while ejected frees its place.
    pub ejected: AtomicU32,
    /// Bumped whenever an endpoint is ejected, returns, or starts slow start: pools
    /// recount their usable endpoints (panic mode) only when it moved, never per pick.
    pub epoch: AtomicU64,
    pub base_ejection_ms: AtomicU64,
    pub max_ejection_ms: AtomicU64,
    /// The slow-start window an endpoint back from ejection ramps over (0: none).
    pub slow_start_ms: AtomicU64,
    /// When panic mode was last logged ([`crate::endpoint::clock_ms`]), so a flapping
    /// service logs once per [`PANIC_LOG_EVERY_MS`], not per change.
    pub panic_logged_ms: AtomicU64,
}

/// Least time between two panic-mode log lines of one service.
pub const PANIC_LOG_EVERY_MS: u64 = 10_000;

impl Default for ServiceOutlier {
    fn default() -> Self {
        let cfg = OutlierConfig::default();
        Self {
            service: "".into(),
            eject_after: AtomicU32::new(5),
            cap: AtomicU32::new(1),
            ejected: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
            base_ejection_ms: AtomicU64::new(millis(cfg.base_ejection)),
            max_ejection_ms: AtomicU64::new(millis(cfg.max_ejection)),
            slow_start_ms: AtomicU64::new(0),
            panic_logged_ms: AtomicU64::new(0),
        }
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ServiceOutlier {
    pub fn new(service: &str) -> Self {
        Self {
            service: service.into(),
            ..Self::default()
        }
    }

    /// Takes a place under the cap for one more ejection; false at the cap.
    pub fn try_take(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives an ejection's place back.
    pub fn give_back(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Tells every pool of the service to recount.
    pub fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// How long the `times`-th ejection of an endpoint lasts.
    pub fn ejection_ms(&self, times: u32) -> u64 {
        self.base_ejection_ms
            .load(Ordering::Relaxed)
            .saturating_mul(u64::from(times.max(1)))
            .min(self.max_ejection_ms.load(Ordering::Relaxed))
    }

    /// True when a panic-mode line may be logged now (and records that it was).
    pub fn may_log_panic(&self, now_ms: u64) -> bool {
        let last = self.panic_logged_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= PANIC_LOG_EVERY_MS)
            && self
                .panic_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// One endpoint's interval, as the failure-percentage check reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntervalCounts {
    pub requests: u64,
    pub failures: u64,
    /// Already ejected (or not SERVING): never judged again, never counted as a host.
    pub skip: bool,
}

/// Positions in `counts` that the failure-percentage check ejects, worst first (so the
/// cap, applied by the caller in this order, keeps the worst out).
pub fn failure_percentage_outliers(counts: &[IntervalCounts]) -> Vec<usize> {
    let judged = counts
        .iter()
        .filter(|c| !c.skip && c.requests >= REQUEST_VOLUME)
        .count();
    if judged < MINIMUM_HOSTS {
        return Vec::new();
    }
    let mut out: Vec<(usize, u64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            !c.skip
                && c.requests >= REQUEST_VOLUME
                && c.failures.saturating_mul(100) >= FAILURE_PERCENTAGE * c.requests
        })
        // Failure share in parts per million, for the ordering only.
        .map(|(i, c)| (i, c.failures.saturating_mul(1_000_000) / c.requests.max(1)))
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out.into_iter().map(|(i, _)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_share_rounded_down_but_at_least_one() {
        assert_eq!(ejection_cap(10, 10), 1);
        assert_eq!(ejection_cap(19, 10), 1);
        assert_eq!(ejection_cap(20, 10), 2);
        assert_eq!(
            ejection_cap(2, 10),
            1,
            "a small service may lose its bad one"
        );
        assert_eq!(ejection_cap(1, 10), 1);
        assert_eq!(ejection_cap(4, 50), 2);
        assert_eq!(ejection_cap(4, 100), 4);
        assert_eq!(ejection_cap(4, 250), 4, "never above every endpoint");
        assert_eq!(ejection_cap(10, 0), 0, "0 % turns ejection off");
        assert_eq!(ejection_cap(0, 10), 0);
        assert_eq!(ejection_cap(usize::MAX, 100), u32::MAX, "no overflow");
    }

    #[test]
    fn places_under_the_cap_are_taken_and_given_back() {
        let o = ServiceOutlier::default();
        o.cap.store(2, Ordering::Relaxed);
        assert!(o.try_take());
        assert!(o.try_take());
        assert!(!o.try_take(), "at the cap");
        o.give_back();
        assert!(o.try_take());
        for _ in 0..5 {
            o.give_back();
        }
        assert_eq!(o.ejected.load(Ordering::Relaxed), 0, "never below zero");
    }

    #[test]
    fn ejections_last_longer_each_time_up_to_the_maximum() {
        let o = ServiceOutlier::default();
        assert_eq!(o.ejection_ms(1), 30_000);
        assert_eq!(o.ejection_ms(3), 90_000);
        assert_eq!(o.ejection_ms(50), 300_000);
        assert_eq!(o.ejection_ms(u32::MAX), 300_000);
    }

    fn c(requests: u64, failures: u64) -> IntervalCounts {
        IntervalCounts {
            requests,
            failures,
            skip: false,
        }
    }

    #[test]
    fn failure_percentage_needs_volume_and_enough_hosts() {
        // Five judged hosts, two at or above 85 %: both, the worst first.
        let counts = [c(100, 0), c(100, 85), c(100, 95), c(100, 84), c(60, 1)];
        assert_eq!(failure_percentage_outliers(&counts), vec![2, 1]);
        // Four hosts with volume: nobody is judged.
        let few = [c(100, 100), c(100, 0), c(100, 0), c(100, 0), c(49, 0)];
        assert!(failure_percentage_outliers(&few).is_empty());
        // A host below the volume is not ejected whatever its share.
        let low = [
            c(100, 0),
            c(100, 0),
            c(100, 0),
            c(100, 0),
            c(100, 0),
            c(10, 10),
        ];
        assert!(failure_percentage_outliers(&low).is_empty());
        // Skipped (already ejected) hosts count for nothing.
        let mut skipped = counts;
        skipped[0].skip = true;
        assert!(failure_percentage_outliers(&skipped).is_empty());
    }

    #[test]
    fn panic_lines_are_rate_limited() {
        let o = ServiceOutlier::default();
        assert!(o.may_log_panic(1_000));
        assert!(!o.may_log_panic(5_000));
        assert!(o.may_log_panic(11_000));
    }
}
