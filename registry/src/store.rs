//! Durable storage of the catalog in redb: a log of applied commands plus a snapshot.
//!
//! Every batch of commands is written in one transaction and fsync'd before anyone is
//! told it succeeded (group commit). A snapshot of the whole catalog is taken every so
//! many commands and the log before it is dropped, so the disk stays bounded. At start
//! the snapshot is loaded and the log after it replayed through the same `apply` the
//! live path uses. The layout mirrors a Raft log store and state machine snapshot, which
//! is where the cluster will take it.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::catalog::{Catalog, Command, Limits, PersistedCatalog};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT_KEY: &str = "snapshot";
const FORMAT_KEY: &str = "format";
const FORMAT: &[u8] = b"switchyard-registry-1";

/// A storage failure. The operator usually has to act (disk full, permissions, a second
/// process on the same directory), so the messages say where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use data dir {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {path}: {source} (is another switchyard process using this --data-dir?)")]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    #[error("storage error: {0}")]
    Redb(Box<redb::Error>),
    #[error("{path} was written by another program or version (format {found:?})")]
    Format { path: PathBuf, found: String },
    #[error("corrupt record in the data dir: {0}")]
    Decode(#[from] postcard::Error),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Redb(Box::new(e))
    }
}

/// The redb database under `--data-dir`.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store and rebuilds the catalog it holds.
    pub fn open(dir: &Path, limits: Limits) -> Result<(Store, Catalog), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("registry.redb");
        let db = Database::create(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let store = Store { db };
        store.init(&path)?;
        let catalog = store.load(limits)?;
        Ok((store, catalog))
    }

    fn init(&self, path: &Path) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
            let found = meta
                .get(FORMAT_KEY)
                .map_err(redb::Error::from)?
                .map(|v| v.value().to_vec());
            match found {
                None => {
                    meta.insert(FORMAT_KEY, FORMAT).map_err(redb::Error::from)?;
                }
                Some(f) if f == FORMAT => {}
                Some(f) => {
                    return Err(StoreError::Format {
                        path: path.to_path_buf(),
                        found: String::from_utf8_lossy(&f).into_owned(),
                    })
                }
            }
            txn.open_table(LOG).map_err(redb::Error::from)?;
        }
        txn.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    fn load(&self, limits: Limits) -> Result<Catalog, StoreError> {
        let txn = self.db.begin_read().map_err(redb::Error::from)?;
        let meta = txn.open_table(META).map_err(redb::Error::from)?;
        let mut catalog = match meta.get(SNAPSHOT_KEY).map_err(redb::Error::from)? {
            Some(bytes) => {
                let p: PersistedCatalog = postcard::from_bytes(bytes.value())?;
                Catalog::from_persisted(limits, p)
            }
            None => Catalog::new(limits),
        };
        let log = txn.open_table(LOG).map_err(redb::Error::from)?;
        let from = catalog.applied_index() + 1;
        for row in log.range(from..).map_err(redb::Error::from)? {
            let (index, bytes) = row.map_err(redb::Error::from)?;
            let command: Command = postcard::from_bytes(bytes.value())?;
            // Replayed commands were validated when first proposed; a refusal here is the
            // same refusal the client saw then.
            let _ = catalog.apply(index.value(), &command);
        }
        Ok(catalog)
    }

    /// Appends a batch of commands in one durable transaction.
    pub fn append(&self, entries: &[(u64, &Command)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut log = txn.open_table(LOG).map_err(redb::Error::from)?;
            let mut buf = Vec::with_capacity(256);
            for (index, command) in entries {
                buf.clear();
                let bytes = postcard::to_extend(command, std::mem::take(&mut buf))?;
                log.insert(*index, bytes.as_slice())
                    .map_err(redb::Error::from)?;
                buf = bytes;
            }
        }
        txn.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Writes a snapshot and drops the log it covers, in one transaction.
    pub fn snapshot(&self, catalog: &PersistedCatalog, index: u64) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(catalog)?;
        let txn = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
            meta.insert(SNAPSHOT_KEY, bytes.as_slice())
                .map_err(redb::Error::from)?;
            let mut log = txn.open_table(LOG).map_err(redb::Error::from)?;
            log.retain_in(..=index, |_, _| false)
                .map_err(redb::Error::from)?;
        }
        txn.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Number of log entries not yet folded into a snapshot.
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(redb::Error::from)?;
        let log = txn.open_table(LOG).map_err(redb::Error::from)?;
        Ok(log.len().map_err(redb::Error::from)?)
    }
}
