//! The write path: every command goes through Raft. On the leader it is appended,
//! replicated to a majority, fsync'd and applied; a follower forwards it to the leader
//! over the internal service, so clients need not know who leads.
//!
//! Writes fail fast with `UNAVAILABLE` when no leader is known, or when this node leads
//! but has not heard from a majority recently (it may be on the small side of a
//! partition), instead of hanging until a quorum returns. Once this node's data dir
//! cannot be written ([`crate::storage_health`]) every write is refused with
//! `UNAVAILABLE` naming the dir and the OS error: its Raft has stopped for good.
//!
//! Group commit: on the leader, commands go through one batcher task. While one log entry
//! is being replicated and fsync'd, the commands that arrive meanwhile queue up, and the
//! next entry carries all of them ([`Command::Batch`], up to [`MAX_BATCH`]). A lone write
//! still goes out at once, alone; under load one fsync serves many registrations.
//! (openraft 0.9 waits for each append's fsync before the next, so batching below the
//! proposer cannot help.)

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use switchyard_proto::internal::RaftMessage;
use tokio::sync::{mpsc, oneshot};

use super::alias::{NodeId, Raft};
use super::network::Network;
use super::{decode, encode, CommandReply};
use crate::catalog::{ApplyError, Command, Reply};
use crate::storage_health::{StorageFailure, StorageHealth};

/// How long a write may wait to commit before the client is told no quorum answered.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most commands one log entry carries.
pub const MAX_BATCH: usize = 256;
/// Commands that may wait for the batcher on the leader by default
/// (`--max-pending-writes`); past it a write is refused with RESOURCE_EXHAUSTED and a
/// retry hint instead of waiting in an unbounded line of callers.
pub const DEFAULT_MAX_PENDING_WRITES: usize = 4_096;
/// Bounds of the retry hint an overloaded leader gives.
const MIN_RETRY_HINT: Duration = Duration::from_millis(20);
const MAX_RETRY_HINT: Duration = Duration::from_secs(5);

/// Why a proposal did not take effect.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    Refused(#[from] ApplyError),
    #[error("the registry could not write to its data dir ({0}); nothing was changed: check the disk and the registry's log")]
    Storage(String),
    #[error("the registry is shutting down; retry on another node")]
    ShuttingDown,
    /// This node's data dir cannot be written; it stopped taking writes until restarted.
    /// A write that met the failure was not acknowledged; in a cluster it may still
    /// commit through another node, so retry it (registrations are idempotent).
    #[error("{0}; this node takes no writes until it restarts: retry on another node")]
    StorageFailed(Arc<StorageFailure>),
    #[error("Raft stopped on this node ({0}); it takes no writes until it restarts: retry on another node")]
    RaftStopped(String),
    #[error("no registry leader is elected: {0}")]
    NoLeader(String),
    #[error("{0}")]
    NoQuorum(String),
    #[error("the registry leader at {addr} cannot be reached ({reason}); writes need a majority of the registry nodes up and reachable; reads still work on every node")]
    LeaderUnreachable { addr: String, reason: String },
    /// The leader's queue of writes waiting to commit is full: the client should back
    /// off for `retry_after` (sent as `grpc-retry-pushback-ms`, or HTTP `Retry-After`).
    #[error("the registry leader has {pending} writes waiting to commit, its maximum (--max-pending-writes): nothing was changed; retry in {} ms", retry_after.as_millis())]
    Overloaded {
        pending: usize,
        retry_after: Duration,
    },
}

/// A forwarded command's outcome, as it crosses the internal service.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireError {
    Refused(ApplyError),
    Unavailable(String),
    /// Added after 0.1.0 (at the end, so the others keep their bytes).
    Overloaded {
        pending: usize,
        retry_after_ms: u64,
    },
}

/// How the write path is tuned.
#[derive(Clone, Copy, Debug)]
pub struct ProposerSettings {
    /// A leader that has not heard from a majority for this long refuses writes.
    pub quorum_silence: Duration,
    /// Members expected, for the message of a write with no leader.
    pub cluster_size_hint: usize,
    /// Writes that may wait for the batcher (`--max-pending-writes`).
    pub max_pending: usize,
}

/// Submits commands. Cloned into every API handler.
#[derive(Clone)]
pub struct Proposer {
    core: Arc<Core>,
    /// To the batcher (leader-side group commit).
    queue: mpsc::Sender<Queued>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// What writing needs, shared by the callers and the batcher.
struct Core {
    raft: Raft,
    network: Network,
    /// A leader that has not heard from a majority for this long refuses writes.
    quorum_silence: Duration,
    cluster_size_hint: usize,
    storage: StorageHealth,
    /// The cluster's log format, mirrored by the state machine: the write gate.
    cluster_format: Arc<AtomicU32>,
    max_pending: usize,
    /// How long the last entry took to commit (microseconds): the retry hint's base.
    last_commit_micros: AtomicU64,
}

/// One command waiting for the batcher, and where its outcome goes.
struct Queued {
    command: Command,
    reply: oneshot::Sender<Result<Result<Reply, ProposeError>, Forward>>,
}

impl Proposer {
    /// Starts the batcher task; call inside the runtime.
    pub fn new(
        raft: Raft,
        network: Network,
        settings: ProposerSettings,
        metrics: Option<Arc<crate::metrics::Metrics>>,
        storage: StorageHealth,
        cluster_format: Arc<AtomicU32>,
    ) -> Self {
        let max_pending = settings.max_pending.max(1);
        let core = Arc::new(Core {
            raft,
            network,
            quorum_silence: settings.quorum_silence,
            cluster_size_hint: settings.cluster_size_hint,
            storage,
            cluster_format,
            max_pending,
            last_commit_micros: AtomicU64::new(0),
        });
        let (queue, queued) = mpsc::channel(max_pending);
        tokio::spawn(batcher(core.clone(), queued, metrics.clone()));
        Self {
            core,
            queue,
            metrics,
        }
    }

    pub fn raft(&self) -> &Raft {
        &self.core.raft
    }

    pub fn network(&self) -> &Network {
        &self.core.network
    }

    /// The leader's id and address, when one is known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        self.core.leader()
    }

    pub fn is_leader(&self) -> bool {
        self.core.is_leader()
    }

    /// Writes and applies one command, forwarding it to the leader when needed.
    pub async fn propose(&self, command: Command) -> Result<Reply, ProposeError> {
        let started = std::time::Instant::now();
        let (outcome, result) = match self.submit(command.clone()).await {
            // A write that waited here past the commit timeout (a partition, an
            // election) is not handed on: its client has most likely given up and may
            // have written since, and this late copy would land after that (the
            // chaos test's register applied after its own client's deregister).
            Err(Forward::To(_)) if started.elapsed() >= COMMIT_TIMEOUT => (
                "unavailable",
                Err(ProposeError::NoQuorum(format!(
                    "the write waited {:?} for a leader to take it, past the {COMMIT_TIMEOUT:?} commit timeout, so it was not forwarded: nothing was changed, retry",
                    started.elapsed()
                ))),
            ),
            Err(Forward::To(addr)) => ("forwarded", self.core.forward(&addr, command).await),
            Err(Forward::Failed(e)) => ("unavailable", Err(e)),
            Ok(r) => ("ok", r),
        };
        if let Some(m) = &self.metrics {
            let outcome = match &result {
                Err(ProposeError::Refused(_)) => "refused",
                Err(_) => "unavailable",
                Ok(_) => outcome,
            };
            m.proposals
                .get_or_create(&crate::metrics::OutcomeLabels { outcome })
                .inc();
        }
        result
    }

    /// Writes here only (a forwarded command): no second hop.
    pub async fn propose_here(&self, command: Command) -> Result<Reply, ProposeError> {
        match self.submit(command).await {
            Err(Forward::To(_)) => Err(ProposeError::NoLeader(
                "the leadership moved while the command was forwarded; retry".into(),
            )),
            Err(Forward::Failed(e)) => Err(e),
            Ok(r) => r,
        }
    }

    /// On the leader, through the batcher; elsewhere straight to Raft, which names the
    /// leader to forward to.
    async fn submit(&self, command: Command) -> Result<Result<Reply, ProposeError>, Forward> {
        if let Command::Batch(_) = command {
            return Ok(Err(ProposeError::Refused(ApplyError::Batch)));
        }
        // The leader's upgrade loop proposes the format change itself, after asking
        // every member; nothing else may write what an older member cannot decode.
        if !matches!(command, Command::SetClusterFormat { .. }) {
            let cluster = self.core.cluster_format.load(Ordering::Acquire);
            if let Err(e) = crate::catalog::format::check_writable(&command, cluster) {
                return Ok(Err(ProposeError::Refused(ApplyError::FormatTooNew(e))));
            }
        }
        if let Some(failure) = self.core.storage.failure() {
            return Err(Forward::Failed(ProposeError::StorageFailed(failure)));
        }
        if !self.core.is_leader() {
            return self.core.write(command).await.map(one);
        }
        let (reply, outcome) = oneshot::channel();
        match self.queue.try_send(Queued { command, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(m) = &self.metrics {
                    m.writes_overloaded.inc();
                }
                return Err(Forward::Failed(self.core.overloaded()));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Forward::Failed(ProposeError::ShuttingDown));
            }
        }
        outcome
            .await
            .unwrap_or(Err(Forward::Failed(ProposeError::ShuttingDown)))
    }
}

/// A single command's reply.
fn one(reply: CommandReply) -> Result<Reply, ProposeError> {
    match reply {
        CommandReply::One(r) => r.map_err(ProposeError::Refused),
        CommandReply::Batch(_) => Err(ProposeError::Storage(
            "a single command was answered as a batch".into(),
        )),
    }
}

/// The leader's group commit: takes whatever has queued (up to [`MAX_BATCH`]), writes it
/// as one entry, answers each caller, repeats. One entry in flight at a time, so the
/// next batch fills while this one commits.
async fn batcher(
    core: Arc<Core>,
    mut queued: mpsc::Receiver<Queued>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queued.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        if let Some(m) = &metrics {
            m.commit_batch_size.observe(batch.len() as f64);
        }
        let started = std::time::Instant::now();
        if batch.len() == 1 {
            if let Some(q) = batch.pop() {
                let outcome = core.write(q.command).await.map(one);
                core.commit_took(started.elapsed());
                let _ = q.reply.send(outcome);
            }
            continue;
        }
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.drain(..).map(|q| (q.command, q.reply)).unzip();
        let count = commands.len();
        let written = core.write(Command::Batch(commands)).await;
        core.commit_took(started.elapsed());
        match written {
            Ok(CommandReply::Batch(results)) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result.map_err(ProposeError::Refused)));
                }
            }
            Ok(_) => {
                let e = ProposeError::Storage("a batch was answered with the wrong shape".into());
                for reply in replies {
                    let _ = reply.send(Ok(Err(e.clone())));
                }
            }
            Err(forward) => {
                for reply in replies {
                    let _ = reply.send(Err(forward.clone()));
                }
            }
        }
    }
}

impl Core {
    fn commit_took(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.last_commit_micros.store(micros, Ordering::Relaxed);
    }

    /// The refusal of a write that found the queue full, with a hint of how long the
    /// queue takes to drain: a full queue is `max_pending / MAX_BATCH` entries, each
    /// about as slow as the last commit.
    fn overloaded(&self) -> ProposeError {
        let per_entry = Duration::from_micros(self.last_commit_micros.load(Ordering::Relaxed));
        let entries = u32::try_from(self.max_pending.div_ceil(MAX_BATCH)).unwrap_or(u32::MAX);
        let retry_after = per_entry
            .saturating_mul(entries)
            .clamp(MIN_RETRY_HINT, MAX_RETRY_HINT);
        ProposeError::Overloaded {
            pending: self.max_pending,
            retry_after,
        }
    }

    fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    fn no_leader(&self) -> ProposeError {
        let members = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count()
            .max(self.cluster_size_hint);
        ProposeError::NoLeader(format!(
            "a majority of the {members} registry nodes must be up and reachable; reads still work on every node"
        ))
    }

    async fn write(&self, command: Command) -> Result<CommandReply, Forward> {
        // During an election no leader is known for a moment: wait for one (bounded)
        // rather than failing a write that would succeed a few hundred ms later.
        if self.raft.metrics().borrow().current_leader.is_none() {
            let _ = self
                .raft
                .wait(Some(self.quorum_silence))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await;
        }
        let silent_ms = {
            let m = self.raft.metrics().borrow().clone();
            (m.state == ServerState::Leader)
                .then_some(m.millis_since_quorum_ack)
                .flatten()
        };
        if let Some(ms) = silent_ms {
            if u128::from(ms) > self.quorum_silence.as_millis() {
                return Err(Forward::Failed(ProposeError::NoQuorum(format!(
                    "this registry node leads but has not heard from a majority for {ms} ms; writes need a majority of nodes up (reads still work)"
                ))));
            }
        }
        let written = tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(command)).await;
        match written {
            Err(_) => Err(Forward::Failed(ProposeError::NoQuorum(format!(
                "the write was not committed within {COMMIT_TIMEOUT:?}: a majority of registry nodes must be up"
            )))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match f.leader_node {
                Some(node) => Err(Forward::To(node.addr)),
                None => Err(Forward::Failed(self.no_leader())),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Forward::Failed(ProposeError::Storage(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(Forward::Failed(self.stopped(e))),
        }
    }

    /// Why a write met a stopped Raft: a storage failure (recorded here when the log
    /// store did not record it first), our own shutdown, or anything else.
    fn stopped(&self, fatal: openraft::error::Fatal<NodeId>) -> ProposeError {
        if let openraft::error::Fatal::StorageError(e) = &fatal {
            return ProposeError::StorageFailed(self.storage.fail("Raft storage", e));
        }
        match (self.storage.failure(), fatal) {
            (Some(failure), _) => ProposeError::StorageFailed(failure),
            (None, openraft::error::Fatal::Stopped) => ProposeError::ShuttingDown,
            (None, other) => {
                tracing::error!(error = %other, "Raft stopped");
                ProposeError::RaftStopped(other.to_string())
            }
        }
    }

    async fn forward(&self, addr: &str, command: Command) -> Result<Reply, ProposeError> {
        let mut client = self.network.client(addr).map_err(ProposeError::NoLeader)?;
        let data = encode(&command).map_err(|e| ProposeError::Storage(e.to_string()))?;
        let answer = tokio::time::timeout(COMMIT_TIMEOUT, client.forward(RaftMessage { data }))
            .await
            .map_err(|_| {
                ProposeError::NoQuorum(format!(
                    "the leader at {addr} did not answer within {COMMIT_TIMEOUT:?}; writes need a majority of the registry nodes up and reachable"
                ))
            })?
            .map_err(|s| ProposeError::LeaderUnreachable {
                addr: addr.to_string(),
                reason: s.message().to_string(),
            })?
            .into_inner();
        let result: Result<Reply, WireError> =
            decode(&answer.data).map_err(|e| ProposeError::Storage(e.to_string()))?;
        match result {
            Ok(r) => Ok(r),
            Err(WireError::Refused(e)) => Err(ProposeError::Refused(e)),
            Err(WireError::Unavailable(m)) => Err(ProposeError::NoLeader(m)),
            Err(WireError::Overloaded {
                pending,
                retry_after_ms,
            }) => Err(ProposeError::Overloaded {
                pending,
                retry_after: Duration::from_millis(retry_after_ms),
            }),
        }
    }
}

#[derive(Clone)]
enum Forward {
    To(String),
    Failed(ProposeError),
}
