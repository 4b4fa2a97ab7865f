//! The write path of a single node: proposals are batched, written to the store in one
//! fsync'd transaction (group commit), then applied to the catalog in log order.
//!
//! It runs on its own OS thread because redb's commit blocks on fsync; while one batch
//! is being synced, new proposals queue up and form the next, larger batch. The cluster
//! replaces this module with openraft's `client_write`; `apply` stays the same.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::catalog::{ApplyError, Command, Reply};
use crate::node::Shared;
use crate::store::Store;

/// Most commands written in one transaction.
const MAX_BATCH: usize = 1_024;
/// Proposals that may wait for the writer before `propose` itself waits (backpressure).
const QUEUE: usize = 8_192;

/// Why a proposal did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    Refused(#[from] ApplyError),
    #[error("the registry could not write to its data dir ({0}); nothing was changed: check the disk and the registry's log")]
    Storage(String),
    #[error("the registry is shutting down; retry on another node")]
    ShuttingDown,
}

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<Reply, ProposeError>>,
}

/// Submits commands to the writer. Cloned into every API handler.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Writes and applies one command; returns once it is durable and applied.
    pub async fn propose(&self, command: Command) -> Result<Reply, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { command, reply })
            .await
            .map_err(|_| ProposeError::ShuttingDown)?;
        rx.await.map_err(|_| ProposeError::ShuttingDown)?
    }
}

/// Starts the writer thread. It ends when every [`Proposer`] is dropped.
pub fn spawn(
    store: Store,
    shared: Arc<Shared>,
    snapshot_every: u64,
) -> std::io::Result<(Proposer, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = std::thread::Builder::new()
        .name("registry-writer".into())
        .spawn(move || run(store, shared, rx, snapshot_every))?;
    Ok((Proposer { tx }, handle))
}

fn run(store: Store, shared: Arc<Shared>, mut rx: mpsc::Receiver<Proposal>, snapshot_every: u64) {
    let mut next_index = shared.catalog.read().applied_index() + 1;
    let mut unsnapshotted = store.log_len().unwrap_or(0);
    let mut batch: Vec<Proposal> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let entries: Vec<(u64, &Command)> = batch
            .iter()
            .enumerate()
            .map(|(i, p)| (next_index + i as u64, &p.command))
            .collect();
        if let Err(e) = store.append(&entries) {
            tracing::error!(error = %e, "write to the data dir failed; refusing this batch");
            let msg = e.to_string();
            for p in batch.drain(..) {
                let _ = p.reply.send(Err(ProposeError::Storage(msg.clone())));
            }
            continue;
        }
        shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        shared.metrics.commit_batch_size.observe(batch.len() as f64);

        let written = batch.len() as u64;
        let mut replies = Vec::with_capacity(batch.len());
        {
            let mut catalog = shared.catalog.write();
            for p in batch.drain(..) {
                let result = catalog.apply(next_index, &p.command);
                next_index += 1;
                for (id, ttl) in &result.leases_granted {
                    shared.leases.grant(*id, *ttl);
                }
                for id in &result.leases_removed {
                    shared.leases.remove(*id);
                }
                if let Command::ExpireLeases { .. } = p.command {
                    shared
                        .metrics
                        .lease_expiries
                        .inc_by(result.leases_removed.len() as u64);
                }
                if let Some(change) = result.change {
                    shared.hub.publish(change);
                }
                replies.push((p.reply, result.reply.map_err(ProposeError::from)));
            }
            shared
                .metrics
                .instances
                .set(catalog.instance_count() as i64);
            shared.metrics.leases.set(catalog.lease_count() as i64);
            shared.metrics.revision.set(catalog.revision() as i64);
        }
        for (tx, reply) in replies {
            // The caller may have gone away; the change stands regardless.
            let _ = tx.send(reply);
        }

        unsnapshotted += written;
        if unsnapshotted >= snapshot_every {
            let (persisted, index) = {
                let c = shared.catalog.read();
                (c.to_persisted(), c.applied_index())
            };
            match store.snapshot(&persisted, index) {
                Ok(()) => unsnapshotted = 0,
                Err(e) => {
                    tracing::warn!(error = %e, "snapshot failed; the log keeps growing until one succeeds")
                }
            }
        }
    }
}
