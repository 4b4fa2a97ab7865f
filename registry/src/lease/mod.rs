//! Lease deadlines, held only by the node that expires leases (the leader).
//!
//! Renewals never touch the log (the etcd model): they move a deadline in memory. When
//! deadlines pass, the expiry loop proposes one `ExpireLeases` command for the batch. A
//! node that starts (or, in a cluster, becomes leader) gives every lease its full TTL
//! first, so a restart never mass-expires instances.
//!
//! - this file: [`LeaseKeeper`], the deadline table (grant, renew, promote on becoming
//!   leader, take what expired).
//! - [`expiry`]: the leader's loop that proposes `ExpireLeases` for what expired.
//! - [`preservation`]: self-preservation, the pure decision to pause expiry when too many
//!   leases miss their renewals at once.
//! - [`checkpoint`]: the leader's loop that records remaining TTLs in the log.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::LeaseId;

pub mod checkpoint;
pub mod expiry;
pub mod preservation;

/// Most leases expired by one command, so one apply stays short.
pub const MAX_EXPIRE_BATCH: usize = 1_000;

#[derive(Default)]
struct Inner {
    /// id -> (deadline, ttl_seconds)
    leases: HashMap<LeaseId, (Instant, u32)>,
    /// Ordered deadlines for finding the next expiry without a scan.
    queue: BTreeSet<(Instant, LeaseId)>,
    /// Deadlines as of the last applied checkpoint (any node), for a new leader to honour.
    hints: HashMap<LeaseId, Instant>,
}

impl Inner {
    fn set(&mut self, id: LeaseId, deadline: Instant, ttl: u32) {
        if let Some((old, _)) = self.leases.insert(id, (deadline, ttl)) {
            self.queue.remove(&(old, id));
        }
        self.queue.insert((deadline, id));
    }
}

/// The deadline table. One short mutex; renewals of many leases take it once.
#[derive(Default)]
pub struct LeaseKeeper {
    inner: Mutex<Inner>,
    changed: Notify,
    /// The Raft term whose leadership last restarted the clocks ([`LeaseKeeper::promote_for`]):
    /// until it is the current term, the deadlines are a follower's stale ones and
    /// nothing may be expired from them.
    promoted_term: std::sync::atomic::AtomicU64,
}

impl LeaseKeeper {
    /// Starts (or restarts) a lease's clock with its full TTL.
    pub fn grant(&self, id: LeaseId, ttl_seconds: u32) {
        let deadline = Instant::now() + Duration::from_secs(u64::from(ttl_seconds));
        let mut inner = self.inner.lock();
        inner.set(id, deadline, ttl_seconds);
        // A fresh grant supersedes any checkpoint.
        inner.hints.remove(&id);
        drop(inner);
        self.changed.notify_one();
    }

    /// Puts a lease's clock back to run out again after `after`, keeping its own TTL for
    /// the renewals that come before (an expiry that could not be committed).
    pub fn retry(&self, id: LeaseId, ttl_seconds: u32, after: Duration) {
        let mut inner = self.inner.lock();
        inner.set(id, Instant::now() + after, ttl_seconds);
        drop(inner);
        self.changed.notify_one();
    }

    pub fn remove(&self, id: LeaseId) {
        let mut inner = self.inner.lock();
        if let Some((old, _)) = inner.leases.remove(&id) {
            inner.queue.remove(&(old, id));
        }
        inner.hints.remove(&id);
    }

    /// Records an applied checkpoint: the lease had `remaining_ms` left when the leader
    /// wrote it, which is about now on this node.
    pub fn hint(&self, id: LeaseId, remaining_ms: u64) {
        let at = Instant::now() + Duration::from_millis(remaining_ms);
        self.inner.lock().hints.insert(id, at);
    }

    /// On becoming leader: every lease gets its full TTL, except that a checkpointed one
    /// gets what its checkpoint left, but at least `grace` or half its TTL (whichever is
    /// longer), so live clients have time to reconnect and renew. Returns how many
    /// leases honoured a checkpoint.
    pub fn promote(&self, leases: impl Iterator<Item = (LeaseId, u32)>, grace: Duration) -> usize {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let mut honoured = 0;
        for (id, ttl) in leases {
            let ttl_d = Duration::from_secs(u64::from(ttl));
            let full = now + ttl_d;
            let least = grace.max(ttl_d / 2).min(ttl_d);
            let deadline = match inner.hints.get(&id) {
                Some(hint) => {
                    honoured += 1;
                    (*hint).max(now + least).min(full)
                }
                None => full,
            };
            inner.set(id, deadline, ttl);
        }
        drop(inner);
        self.changed.notify_one();
        honoured
    }

    /// [`LeaseKeeper::promote`] for the leadership of `term`; from then on
    /// [`LeaseKeeper::promoted_for`] says the clocks may be expired from in that term.
    pub fn promote_for(
        &self,
        term: u64,
        leases: impl Iterator<Item = (LeaseId, u32)>,
        grace: Duration,
    ) -> usize {
        let honoured = self.promote(leases, grace);
        self.promoted_term
            .store(term, std::sync::atomic::Ordering::Release);
        honoured
    }

    /// Whether the clocks were restarted for the leadership of `term` (the expiry loop
    /// acts only then: a new leader's first moments run on a follower's deadlines).
    pub fn promoted_for(&self, term: u64) -> bool {
        term != 0
            && self
                .promoted_term
                .load(std::sync::atomic::Ordering::Acquire)
                == term
    }

    /// Every lease's remaining time in milliseconds, for a checkpoint.
    pub fn remaining(&self) -> Vec<(LeaseId, u64)> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .leases
            .iter()
            .map(|(id, (deadline, _))| {
                (
                    *id,
                    deadline.saturating_duration_since(now).as_millis() as u64,
                )
            })
            .collect()
    }

    /// How many leases missed a renewal ([`preservation::at_risk`]). Many at once means
    /// clients lost the registry, not died.
    pub fn at_risk(&self, now: Instant) -> usize {
        let inner = self.inner.lock();
        inner
            .leases
            .values()
            .filter(|(deadline, ttl)| preservation::at_risk(*deadline, *ttl, now))
            .count()
    }

    /// Renews each lease; `None` for a lease this node does not hold (expired, revoked or
    /// never granted), which tells the client to register again.
    pub fn renew(&self, ids: &[LeaseId], out: &mut Vec<(LeaseId, Option<u32>)>) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        for &id in ids {
            let renewed = match inner.leases.get_mut(&id) {
                Some((deadline, ttl)) => {
                    let old = *deadline;
                    *deadline = now + Duration::from_secs(u64::from(*ttl));
                    Some((old, *deadline, *ttl))
                }
                None => None,
            };
            match renewed {
                Some((old, new, ttl)) => {
                    inner.queue.remove(&(old, id));
                    inner.queue.insert((new, id));
                    out.push((id, Some(ttl)));
                }
                None => out.push((id, None)),
            }
        }
    }

    /// Forgets every lease (the catalog was replaced).
    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.leases.clear();
        inner.queue.clear();
        inner.hints.clear();
    }

    pub fn contains(&self, id: LeaseId) -> bool {
        self.inner.lock().leases.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes up to [`MAX_EXPIRE_BATCH`] leases whose deadline has passed. They leave the
    /// table at once, so a late renewal answers `found=false` instead of racing the
    /// expiry; the caller proposes their removal.
    pub fn take_expired(&self, now: Instant) -> Vec<LeaseId> {
        let mut inner = self.inner.lock();
        let mut expired = Vec::new();
        while expired.len() < MAX_EXPIRE_BATCH {
            let Some(&(deadline, id)) = inner.queue.first() else {
                break;
            };
            if deadline > now {
                break;
            }
            inner.queue.pop_first();
            inner.leases.remove(&id);
            expired.push(id);
        }
        expired
    }

    /// When the next lease runs out, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.inner.lock().queue.first().map(|(d, _)| *d)
    }

    /// Resolves when a lease is granted, so the expiry loop can recompute its sleep.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expiry loop acts only once the clocks were restarted for the current term:
    /// a new leader's first moments run on the deadlines it kept as a follower.
    #[test]
    fn clocks_count_only_for_the_term_that_restarted_them() {
        let keeper = LeaseKeeper::default();
        assert!(!keeper.promoted_for(0));
        assert!(!keeper.promoted_for(3));
        keeper.promote_for(3, [(1, 10)].into_iter(), Duration::from_secs(3));
        assert!(keeper.promoted_for(3));
        assert!(
            !keeper.promoted_for(4),
            "a later term needs its own restart"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_honours_checkpoints_but_gives_at_least_the_grace() {
        let keeper = LeaseKeeper::default();
        keeper.hint(1, 3_000); // checkpointed with 3 s left of 4
        keeper.hint(2, 100); // nearly dead
        let grace = Duration::from_secs(2);
        let honoured = keeper.promote([(1, 4), (2, 4), (3, 10)].into_iter(), grace);
        assert_eq!(honoured, 2);
        let now = Instant::now();
        tokio::time::advance(Duration::from_millis(2_100)).await;
        assert_eq!(
            keeper.take_expired(Instant::now()),
            vec![2],
            "the grace, not a full TTL"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            keeper.take_expired(Instant::now()),
            vec![1],
            "what the checkpoint left"
        );
        assert_eq!(
            keeper.next_deadline(),
            Some(now + Duration::from_secs(10)),
            "lease 3 got the full TTL"
        );
        // A renewal or grant after the checkpoint wins over the hint.
        keeper.hint(4, 10);
        keeper.grant(4, 10);
        keeper.promote([(4, 10)].into_iter(), grace);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!keeper.take_expired(Instant::now()).contains(&4));
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_moves_the_deadline_and_unknown_leases_are_not_found() {
        let keeper = LeaseKeeper::default();
        keeper.grant(1, 2);
        keeper.grant(2, 2);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let mut out = Vec::new();
        keeper.renew(&[1, 99], &mut out);
        assert_eq!(out, vec![(1, Some(2)), (99, None)]);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(keeper.take_expired(Instant::now()), vec![2]);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(keeper.take_expired(Instant::now()), vec![1]);
        assert!(keeper.is_empty());
    }
}
