//! Self-preservation (Eureka): when a large share of the leases misses its renewals at
//! once, the likelier cause is a network problem between the clients and the registry,
//! not a mass death, so expiry pauses until renewals recover.
//!
//! The decision is a pure function of counts and settings, so it is tested with plain
//! values; the expiry loop only gathers the counts and acts on the answer.

use std::time::Duration;

use tokio::time::Instant;

/// When self-preservation applies (see `RegistryConfig::self_preservation_*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preservation {
    /// Above this share of leases at risk at once, expiry pauses (1.0 disables it).
    pub threshold: f64,
    /// The rule applies only with at least this many leases.
    pub min_leases: usize,
}

/// What the expiry loop does this round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Expire the leases whose deadline passed.
    Expire,
    /// Expire nothing: `share` of the leases is at risk, more than the threshold.
    Pause { share: f64 },
}

impl Preservation {
    /// Whether the rule can apply with this many leases; below the minimum the at-risk
    /// count need not be taken at all.
    pub fn applies(&self, leases: usize) -> bool {
        leases >= self.min_leases
    }

    /// Decides from the number of leases and how many of them are at risk (see
    /// [`at_risk`]).
    pub fn decide(&self, leases: usize, at_risk: usize) -> Decision {
        let share = at_risk as f64 / leases.max(1) as f64;
        if self.applies(leases) && share > self.threshold && self.threshold < 1.0 {
            Decision::Pause { share }
        } else {
            Decision::Expire
        }
    }
}

/// A lease missed a renewal: less than a third of its TTL is left (clients renew every
/// third), or it is overdue.
pub fn at_risk(deadline: Instant, ttl_seconds: u32, now: Instant) -> bool {
    deadline.saturating_duration_since(now) < Duration::from_secs(u64::from(ttl_seconds)) / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Preservation = Preservation {
        threshold: 0.5,
        min_leases: 20,
    };

    #[test]
    fn more_than_the_threshold_at_risk_pauses_expiry() {
        assert_eq!(DEFAULT.decide(100, 50), Decision::Expire, "exactly half");
        assert_eq!(DEFAULT.decide(100, 51), Decision::Pause { share: 0.51 });
        assert_eq!(DEFAULT.decide(100, 100), Decision::Pause { share: 1.0 });
        assert_eq!(DEFAULT.decide(100, 0), Decision::Expire);
    }

    #[test]
    fn a_small_registry_expires_normally() {
        assert!(!DEFAULT.applies(19));
        assert!(DEFAULT.applies(20));
        assert_eq!(DEFAULT.decide(19, 19), Decision::Expire);
        assert_eq!(DEFAULT.decide(20, 20), Decision::Pause { share: 1.0 });
        assert_eq!(DEFAULT.decide(0, 0), Decision::Expire);
    }

    #[test]
    fn a_threshold_of_one_disables_it() {
        let off = Preservation {
            threshold: 1.0,
            ..DEFAULT
        };
        assert_eq!(off.decide(100, 100), Decision::Expire);
        let min_zero = Preservation {
            min_leases: 0,
            ..DEFAULT
        };
        assert_eq!(
            min_zero.decide(0, 0),
            Decision::Expire,
            "no leases, no pause"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_at_risk_with_less_than_a_third_of_its_ttl_left() {
        let now = Instant::now();
        let ttl = 30;
        assert!(!at_risk(now + Duration::from_secs(30), ttl, now));
        assert!(
            !at_risk(now + Duration::from_secs(10), ttl, now),
            "a third left"
        );
        assert!(at_risk(now + Duration::from_millis(9_999), ttl, now));
        assert!(at_risk(now, ttl, now), "due now");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            at_risk(now + Duration::from_secs(1), ttl, Instant::now()),
            "overdue"
        );
    }
}
