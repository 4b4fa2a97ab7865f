//! The Raft log in redb. One table holds entries by index; another holds the vote, the
//! committed log id and the last purged log id.
//!
//! `append` only queues the entries (readable at once, as openraft requires) and wakes a
//! flusher thread, which writes everything queued so far in one fsync'd transaction and
//! only then tells openraft the entries are durable. So an fsync never blocks a runtime
//! worker (with one worker, that would stall gRPC, DNS and watch fan-out for its whole
//! duration), and appends that arrive during an fsync share the next one. Group commit
//! of client writes happens one level up, in the proposer, because openraft 0.9 waits for
//! each append to be flushed before it makes the next.
//!
//! Durability contract: openraft learns that an entry is stored (and so may count it
//! toward a commit and answer the client) only from the callback, which runs after the
//! transaction holding it committed with an fsync. A failed write or fsync is passed to
//! the callback as an error, never swallowed, and reported to the node's
//! [`StorageHealth`] before that, so the node is unhealthy before openraft stops.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::alias::{Entry, LogId, StorageError, Vote};
use super::{decode, encode, TypeConfig};
use crate::metrics::Metrics;
use crate::storage_health::{os_text, StorageHealth};

pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";

fn io<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

/// The log store; cheap to clone (the database and the queue are shared).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
    /// Wakes the flusher; when the last store is dropped the flusher exits.
    wake: mpsc::Sender<()>,
    /// Mirrors the committed index for `Cluster.Status`.
    committed: Arc<AtomicU64>,
}

struct Inner {
    db: Arc<Database>,
    metrics: Option<Arc<Metrics>>,
    pending: Mutex<Pending>,
    /// Signalled after every flush, for callers that must wait for an empty queue.
    flushed: Condvar,
    /// The newest log id known to be on disk: the committed-index hint never names an
    /// entry past it (a hint ahead of the durable log would make a restart replay
    /// entries that are not there).
    durable: Mutex<Option<LogId>>,
    /// Told of a failed write before openraft is (see the module doc).
    storage: Option<StorageHealth>,
    /// Set by the first failed flush: redb refuses every later write to the file, so
    /// queued entries will never drain.
    write_failed: std::sync::atomic::AtomicBool,
}

/// Entries appended but not yet on disk, and the callbacks waiting for them. An entry
/// leaves `entries` only after the transaction holding it committed, so a reader always
/// finds it here or in the table.
#[derive(Default)]
struct Pending {
    entries: BTreeMap<u64, (Entry, Vec<u8>)>,
    callbacks: Vec<LogFlushed<TypeConfig>>,
}

impl LogStore {
    /// Creates the tables if they do not exist yet and starts the flusher thread. A
    /// failed log write is reported to `storage` (tests of the store alone pass `None`).
    pub fn new(
        db: Arc<Database>,
        metrics: Option<Arc<Metrics>>,
        committed: Arc<AtomicU64>,
        storage: Option<StorageHealth>,
    ) -> Result<Self, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        // Unreadable here means no hint is written until the next flush: safe.
        let durable = last_stored(&db).unwrap_or_default();
        let inner = Arc::new(Inner {
            db,
            metrics,
            pending: Mutex::new(Pending::default()),
            flushed: Condvar::new(),
            durable: Mutex::new(durable),
            storage,
            write_failed: std::sync::atomic::AtomicBool::new(false),
        });
        let (wake, woken) = mpsc::channel();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(weak, woken))
            .map_err(redb::Error::Io)?;
        Ok(Self {
            inner,
            wake,
            committed,
        })
    }

    /// Blocks until every queued entry is on disk: truncate and purge rewrite the table
    /// and must not race a batch in flight. Both are rare (conflicts, snapshots). After a
    /// failed flush the queue never empties: that is an error, not a wait forever.
    fn drain(&self) -> Result<(), StorageError> {
        let mut pending = self.inner.pending.lock();
        while !pending.entries.is_empty() {
            if self.inner.write_failed.load(Ordering::Acquire) {
                return Err(io(std::io::Error::other(
                    "an earlier write of the Raft log failed",
                )));
            }
            let _ = self.wake.send(());
            self.inner.flushed.wait(&mut pending);
        }
        Ok(())
    }

    fn get_meta<T: for<'a> serde::Deserialize<'a>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self.inner.db.begin_read().map_err(read_err)?;
        let meta = txn.open_table(META).map_err(read_err)?;
        match meta.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(decode(v.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// Writes one meta key; `durable: false` leaves the fsync to the next durable commit
    /// (redb keeps the order), for values that are only hints after a crash.
    fn put_meta<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        durable: bool,
    ) -> Result<(), StorageError> {
        let bytes = encode(value).map_err(io)?;
        let mut txn = self.inner.db.begin_write().map_err(io)?;
        if !durable {
            txn.set_durability(Durability::None);
        }
        {
            let mut meta = txn.open_table(META).map_err(io)?;
            meta.insert(key, bytes.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        // Queued entries first, then the table: an entry flushed in between is in the
        // table by the time it is read, so none is missed.
        let mut out: BTreeMap<u64, Entry> = {
            let pending = self.inner.pending.lock();
            let queued = match end {
                Some(end) => pending.entries.range(start..end),
                None => pending.entries.range(start..),
            };
            queued.map(|(i, (e, _))| (*i, e.clone())).collect()
        };
        let txn = self.inner.db.begin_read().map_err(read_err)?;
        let log = txn.open_table(LOG).map_err(read_err)?;
        let iter = match end {
            Some(end) => log.range(start..end).map_err(read_err)?,
            None => log.range(start..).map_err(read_err)?,
        };
        for row in iter {
            let (k, v) = row.map_err(read_err)?;
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(k.value()) {
                slot.insert(decode(v.value()).map_err(read_err)?);
            }
        }
        Ok(out.into_values().collect())
    }
}

/// The flusher: one transaction (one fsync) per wake-up for everything queued by then.
fn flusher(inner: Weak<Inner>, woken: mpsc::Receiver<()>) {
    while woken.recv().is_ok() {
        // Coalesce the wake-ups of everything queued so far.
        while woken.try_recv().is_ok() {}
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let (batch, last, callbacks) = {
            let mut pending = inner.pending.lock();
            let batch: Vec<(u64, Vec<u8>)> = pending
                .entries
                .iter()
                .map(|(i, (_, bytes))| (*i, bytes.clone()))
                .collect();
            let last = pending.entries.values().last().map(|(e, _)| e.log_id);
            (batch, last, std::mem::take(&mut pending.callbacks))
        };
        if batch.is_empty() && callbacks.is_empty() {
            inner.flushed.notify_all();
            continue;
        }
        let started = std::time::Instant::now();
        let result = write_batch(&inner.db, &batch);
        if let Some(m) = &inner.metrics {
            m.commit_seconds.observe(started.elapsed().as_secs_f64());
        }
        if result.is_ok() {
            if last.is_some() {
                *inner.durable.lock() = last;
            }
            // Only now may readers find these in the table instead. (After a failed write
            // they stay queued: openraft stops on the error, and no reader sees a hole.)
            let mut pending = inner.pending.lock();
            for (i, _) in &batch {
                pending.entries.remove(i);
            }
        }
        if let Err(e) = &result {
            inner.write_failed.store(true, Ordering::Release);
            // Before the callbacks: the node is unhealthy before openraft stops on them.
            match &inner.storage {
                Some(storage) => {
                    storage.fail("writing the Raft log", os_text(e));
                }
                None => tracing::error!(error = %e, "the Raft log could not be written"),
            }
        }
        inner.flushed.notify_all();
        for callback in callbacks {
            let outcome = match &result {
                Ok(()) => Ok(()),
                // Keep the kind (StorageFull, PermissionDenied) for openraft's error.
                Err(redb::Error::Io(io)) => Err(std::io::Error::new(io.kind(), io.to_string())),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            callback.log_io_completed(outcome);
        }
    }
}

/// The log id of the newest entry in the table.
fn last_stored(db: &Database) -> Result<Option<LogId>, StorageError> {
    let txn = db.begin_read().map_err(read_err)?;
    let log = txn.open_table(LOG).map_err(read_err)?;
    let last = log.last().map_err(read_err)?;
    match last {
        Some((_, v)) => Ok(Some(decode::<Entry>(v.value()).map_err(read_err)?.log_id)),
        None => Ok(None),
    }
}

fn write_batch(db: &Database, batch: &[(u64, Vec<u8>)]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut log = txn.open_table(LOG)?;
        for (index, bytes) in batch {
            log.insert(*index, bytes.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(PURGED)?;
        let queued = self
            .inner
            .pending
            .lock()
            .entries
            .last_key_value()
            .map(|(_, (e, _))| e.log_id);
        let last = last_stored(&self.inner.db)?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: queued.or(last).or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed
            .store(committed.map_or(0, |c| c.index), Ordering::Release);
        // A hint (openraft re-learns the committed index from the leader), so it rides
        // along with the next log fsync instead of costing one of its own per write. A
        // follower may learn an index its own flusher has not made durable yet: the hint
        // is clamped to what is on disk now, so whichever fsync persists it, the entries
        // it names are there.
        let durable = *self.inner.durable.lock();
        let hint = match (committed, durable) {
            (Some(c), Some(d)) if c.index > d.index => Some(d),
            (Some(_), None) => None,
            (c, _) => c,
        };
        self.put_meta(COMMITTED, &hint, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encode everything before queueing anything: all of the entries or none.
        let encoded = entries
            .into_iter()
            .map(|entry| encode(&entry).map(|bytes| (entry, bytes)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        {
            let mut pending = self.inner.pending.lock();
            for (entry, bytes) in encoded {
                pending.entries.insert(entry.log_id.index, (entry, bytes));
            }
            pending.callbacks.push(callback);
        }
        // A send fails only when the flusher is gone, which the next read of the log will
        // not notice; say so loudly.
        if self.wake.send(()).is_err() {
            tracing::error!("the Raft log flusher stopped; writes will not complete");
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.drain()?;
        let txn = self.inner.db.begin_write().map_err(io)?;
        {
            let mut log = txn.open_table(LOG).map_err(io)?;
            log.retain_in(log_id.index.., |_, _| false).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        *self.inner.durable.lock() = last_stored(&self.inner.db)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.drain()?;
        let bytes = encode(&log_id).map_err(io)?;
        let txn = self.inner.db.begin_write().map_err(io)?;
        {
            let mut meta = txn.open_table(META).map_err(io)?;
            meta.insert(PURGED, bytes.as_slice()).map_err(io)?;
            let mut log = txn.open_table(LOG).map_err(io)?;
            log.retain_in(..=log_id.index, |_, _| false).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        Ok(())
    }
}
