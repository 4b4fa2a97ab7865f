//! The Raft log in redb. One table holds entries by index; another holds the vote, the
//! committed log id and the last purged log id. Each `append` is one write transaction,
//! committed (fsync'd) before openraft is told the entries are durable.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, ReadableTable, TableDefinition};

use super::alias::{Entry, LogId, StorageError, Vote};
use super::{decode, encode, TypeConfig};
use crate::metrics::Metrics;

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

/// The log store; cheap to clone (the database is shared).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    metrics: Option<Arc<Metrics>>,
    /// Mirrors the committed index for `Cluster.Status`.
    committed: Arc<AtomicU64>,
}

impl LogStore {
    /// Creates the tables if they do not exist yet.
    pub fn new(
        db: Arc<Database>,
        metrics: Option<Arc<Metrics>>,
        committed: Arc<AtomicU64>,
    ) -> Result<Self, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Self {
            db,
            metrics,
            committed,
        })
    }

    fn get_meta<T: for<'a> serde::Deserialize<'a>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let meta = txn.open_table(META).map_err(read_err)?;
        match meta.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(decode(v.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = encode(value).map_err(io)?;
        let txn = self.db.begin_write().map_err(io)?;
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
        let txn = self.db.begin_read().map_err(read_err)?;
        let log = txn.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        let iter = match end {
            Some(end) if end <= start => return Ok(out),
            Some(end) => log.range(start..end).map_err(read_err)?,
            None => log.range(start..).map_err(read_err)?,
        };
        for row in iter {
            let (_, v) = row.map_err(read_err)?;
            out.push(decode(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(PURGED)?;
        let last = {
            let txn = self.db.begin_read().map_err(read_err)?;
            let log = txn.open_table(LOG).map_err(read_err)?;
            let last = log.last().map_err(read_err)?;
            let bytes = last.map(|(_, v)| v.value().to_vec());
            match bytes {
                Some(b) => Some(decode::<Entry>(&b).map_err(read_err)?.log_id),
                None => None,
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed
            .store(committed.map_or(0, |c| c.index), Ordering::Release);
        self.put_meta(COMMITTED, &committed)
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
        let started = std::time::Instant::now();
        let mut count = 0u64;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut log = txn.open_table(LOG).map_err(io)?;
            for entry in entries {
                let bytes = encode(&entry).map_err(io)?;
                log.insert(entry.log_id.index, bytes.as_slice())
                    .map_err(io)?;
                count += 1;
            }
        }
        let result = txn.commit().map_err(std::io::Error::other);
        if let Some(m) = &self.metrics {
            m.commit_seconds.observe(started.elapsed().as_secs_f64());
            m.commit_batch_size.observe(count as f64);
        }
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = io(std::io::Error::other(e.to_string()));
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut log = txn.open_table(LOG).map_err(io)?;
            log.retain_in(log_id.index.., |_, _| false).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = encode(&log_id).map_err(io)?;
        let txn = self.db.begin_write().map_err(io)?;
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
