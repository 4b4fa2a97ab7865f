//! The leader's expiry loop: proposes `ExpireLeases` for the leases whose deadline
//! passed, promptly after it passes, at most [`MAX_EXPIRE_BATCH`](super::MAX_EXPIRE_BATCH)
//! a command, unless [self-preservation](super::preservation) holds expiry back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::preservation::{Decision, Preservation};
use super::LeaseKeeper;
use crate::catalog::{Catalog, Command};
use crate::model::LeaseId;
use crate::raft::propose::Proposer;
use crate::shared::Shared;

/// After an expiry that could not be committed (no quorum), the leases' clocks run again:
/// each runs out a second after now, unless renewed before, and keeps its own TTL (a
/// renewal meanwhile answers and extends by that TTL, not by the second). Leases a
/// Register re-granted meanwhile, or the catalog no longer has, are left alone.
fn put_back(leases: &LeaseKeeper, catalog: &Catalog, expired: &[LeaseId]) {
    for &id in expired {
        if leases.contains(id) {
            continue;
        }
        if let Some(ttl) = catalog.lease_ttl(id) {
            leases.retry(id, ttl, Duration::from_secs(1));
        }
    }
}

/// A node that stops leading stops preserving: only the leader runs lease clocks, so
/// its gauge must not keep saying 1 as a follower (a false alert after an election).
/// Returns true when it was preserving.
fn step_down(preserving: &mut bool, gauge: &prometheus_client::metrics::gauge::Gauge) -> bool {
    if !*preserving {
        return false;
    }
    gauge.set(0);
    *preserving = false;
    true
}

/// Proposes `ExpireLeases` for leases whose deadline passed, promptly after it passes.
pub async fn expiry_loop(
    shared: Arc<Shared>,
    proposer: Proposer,
    preservation: Preservation,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(100);
    let mut preserving = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = tokio::time::Instant::now();
        // Self-preservation (Eureka): a mass of leases running out together is more
        // likely a network problem between clients and the registry than a mass death.
        if proposer.is_leader() {
            let total = shared.leases.len();
            let overdue = if preservation.applies(total) {
                shared.leases.at_risk(now)
            } else {
                0
            };
            if let Decision::Pause { share } = preservation.decide(total, overdue) {
                if !preserving {
                    tracing::warn!(
                        overdue,
                        leases = total,
                        threshold = preservation.threshold,
                        "self-preservation: {:.0}% of leases missed their renewals at once; expiry paused until renewals recover",
                        share * 100.0
                    );
                    shared.metrics.self_preservation.set(1);
                    preserving = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                continue;
            }
            if preserving {
                tracing::info!(
                    overdue,
                    leases = total,
                    "self-preservation over: renewals recovered; expiring the rest"
                );
                shared.metrics.self_preservation.set(0);
                preserving = false;
            }
        } else if step_down(&mut preserving, &shared.metrics.self_preservation) {
            tracing::info!(
                "self-preservation ends here: this node no longer leads (the leader decides now)"
            );
        }
        // Only the leader runs lease clocks (the etcd model), and only once they were
        // restarted for its term: until then they are the deadlines this node kept as
        // a follower, which no renewal moved.
        let term = proposer.raft().metrics().borrow().current_term;
        let runs_clocks = proposer.is_leader() && shared.leases.promoted_for(term);
        if !runs_clocks {
            // A follower's deadlines are never renewed, so they pass: waiting for them
            // would spin. Wait for a change instead (the promotion notifies), or a
            // second at most, for a leadership that came without one.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shared.leases.changed() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            continue;
        }
        let expired = shared.leases.take_expired(now);
        if !expired.is_empty() {
            tracing::info!(
                leases = expired.len(),
                "leases expired; removing their instances"
            );
            let leases: Vec<(u64, u64)> = {
                let catalog = shared.catalog.read();
                expired
                    .iter()
                    .filter_map(|id| catalog.lease_granted_at(*id).map(|g| (*id, g)))
                    .collect()
            };
            if let Err(e) = proposer.propose(Command::ExpireLeases { leases }).await {
                // Nothing was removed: put the clocks back (unless a Register already
                // re-granted a lease) and retry after a pause, still listening for
                // shutdown.
                tracing::warn!(error = %e, ?retry, "could not expire leases; will retry");
                put_back(&shared.leases, &shared.catalog.read(), &expired);
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                retry = (retry * 2).min(Duration::from_secs(5));
            } else {
                retry = Duration::from_millis(100);
            }
            continue;
        }
        let next = shared
            .leases
            .next_deadline()
            .unwrap_or(now + Duration::from_secs(1))
            .min(now + Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.leases.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demoted_leader_stops_saying_it_preserves() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let mut preserving = true;
        gauge.set(1);
        assert!(step_down(&mut preserving, &gauge));
        assert_eq!(gauge.get(), 0);
        assert!(!preserving);
        assert!(!step_down(&mut preserving, &gauge), "only once");
    }
    use crate::catalog::testing::{inst, reg};

    /// The hostile probe's finding: after a failed expiry proposal (leader without
    /// quorum) renewals answered `ttl_seconds: 1`, and an instance renewing on schedule
    /// was expired once quorum returned. The lease keeps its own TTL now.
    #[tokio::test(start_paused = true)]
    async fn a_lease_put_back_after_a_failed_expiry_keeps_its_ttl() {
        let mut catalog = Catalog::default();
        let Command::Register { instance, .. } = reg(inst("web", "web-1", "1.0.0")) else {
            unreachable!("reg builds a Register");
        };
        catalog.apply_next(
            1,
            &Command::Register {
                instance,
                ttl_seconds: 30,
                lease_id: None,
            },
        );
        let (id, ttl) = catalog.leases().next().expect("a lease");
        assert_eq!(ttl, 30);
        let leases = LeaseKeeper::default();
        leases.grant(id, ttl);
        tokio::time::advance(Duration::from_secs(31)).await;
        let expired = leases.take_expired(tokio::time::Instant::now());
        assert_eq!(expired, vec![id]);
        put_back(&leases, &catalog, &expired);
        let mut out = Vec::new();
        leases.renew(&[id], &mut out);
        assert_eq!(
            out,
            vec![(id, Some(30))],
            "renewals answer the lease's own TTL"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(
            leases.take_expired(tokio::time::Instant::now()).is_empty(),
            "renewed for 30 s, not 1 s"
        );
    }
}
