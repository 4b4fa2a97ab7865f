//! The leader's checkpoint loop: a slow, batched record of each lease's remaining TTL in
//! the log, so a new leader can honour it instead of a full TTL (repeated elections then
//! cannot keep a dead instance alive forever).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::MAX_EXPIRE_BATCH;
use crate::catalog::Command;
use crate::raft::propose::Proposer;
use crate::shared::Shared;

/// On the leader, every `lease_checkpoint_interval`: writes each lease's remaining TTL
/// to the log, in batches of 1,000, for a future leader to honour.
pub async fn checkpoint_loop(
    shared: Arc<Shared>,
    proposer: Proposer,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !proposer.is_leader() {
            continue;
        }
        let remaining = shared.leases.remaining();
        let batches: Vec<Vec<(u64, u64, u64)>> = {
            let catalog = shared.catalog.read();
            remaining
                .iter()
                .filter_map(|(id, ms)| catalog.lease_granted_at(*id).map(|g| (*id, g, *ms)))
                .collect::<Vec<_>>()
                .chunks(MAX_EXPIRE_BATCH)
                .map(<[_]>::to_vec)
                .collect()
        };
        for leases in batches {
            match proposer.propose(Command::CheckpointLeases { leases }).await {
                Ok(_) => {
                    shared.metrics.lease_checkpoints.inc();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "lease checkpoint skipped");
                    break;
                }
            }
        }
    }
}
