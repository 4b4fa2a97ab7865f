//! The leadership loop: mirrors Raft's role, term and indexes into the metrics, and on
//! becoming leader restarts every lease clock (the etcd model: only the leader runs them).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::alias::Raft;
use super::propose::Proposer;
use crate::catalog::Command;
use crate::shared::Shared;

/// Least time a new leader gives a checkpointed lease, so live clients can reconnect
/// and renew after the election.
const LEADER_GRACE: Duration = Duration::from_secs(3);

/// Watches Raft's role. On becoming leader, every lease gets its full TTL again (or what
/// its checkpoint left) before anything can expire, so a leader change never
/// mass-expires instances and repeated elections do not keep dead ones alive.
pub async fn leadership_loop(
    shared: Arc<Shared>,
    raft: Raft,
    proposer: Proposer,
    mesh: Arc<crate::identity::MeshSettings>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    // The term whose leadership restarted the lease clocks: a node may lose and win
    // the leadership between two looks at the metrics, so the term is compared, not a
    // was-leader flag.
    let mut led_term: Option<u64> = None;
    loop {
        let (is_leader, term) = {
            let m = metrics.borrow_and_update();
            let g = &shared.metrics;
            g.raft_term.set(m.current_term as i64);
            g.raft_leader.set(m.current_leader.unwrap_or(0) as i64);
            g.raft_is_leader
                .set(i64::from(m.state == openraft::ServerState::Leader));
            g.raft_applied_index
                .set(m.last_applied.map_or(0, |l| l.index) as i64);
            g.raft_commit_index
                .set(shared.committed.load(std::sync::atomic::Ordering::Acquire) as i64);
            if let Some(replication) = &m.replication {
                let last = m.last_log_index.unwrap_or(0);
                for (peer, matched) in replication {
                    let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
                    g.raft_replication_lag
                        .get_or_create(&crate::metrics::PeerLabels {
                            peer: peer.to_string(),
                        })
                        .set(lag as i64);
                }
            }
            (m.state == openraft::ServerState::Leader, m.current_term)
        };
        if is_leader && led_term != Some(term) {
            if shared.catalog.read().cluster_id().is_empty() {
                tokio::spawn(name_the_cluster(shared.clone(), proposer.clone()));
            }
            if shared.catalog.read().mesh_ca().is_none() {
                tokio::spawn(crate::identity::make_first_root(
                    shared.clone(),
                    proposer.clone(),
                    mesh.clone(),
                ));
            }
            let catalog = shared.catalog.read();
            let total = catalog.lease_count();
            let honoured = shared
                .leases
                .promote_for(term, catalog.leases(), LEADER_GRACE);
            tracing::info!(
                leases = total,
                checkpointed = honoured,
                "this node leads now; leases restart with their full TTL, or what their last checkpoint left (at least {LEADER_GRACE:?})"
            );
        }
        led_term = is_leader.then_some(term);
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Commits a cluster id when the catalog has none (a new cluster, or the first election
/// after an upgrade from a release without ids). Bounded: a leader that loses its term
/// meanwhile stops, and the next one tries again.
async fn name_the_cluster(shared: Arc<Shared>, proposer: Proposer) {
    let id = format!("{:032x}", fastrand::u128(..));
    for _ in 0..20 {
        if !shared.catalog.read().cluster_id().is_empty() || !proposer.is_leader() {
            return;
        }
        match proposer
            .propose_here(Command::InitCluster { id: id.clone() })
            .await
        {
            Ok(_) => {
                tracing::info!(cluster_id = %shared.catalog.read().cluster_id(), "the cluster has an id; watchers compare it before trusting a revision");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cluster id not committed yet; trying again"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
