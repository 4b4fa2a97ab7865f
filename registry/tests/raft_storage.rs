//! openraft's own storage conformance suite against our redb log store and the catalog
//! state machine.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use switchyard_registry::raft::log_store::LogStore;
use switchyard_registry::raft::state_machine::StateMachine;
use switchyard_registry::raft::TypeConfig;
use switchyard_registry::shared::Shared;
use switchyard_registry::RegistryConfig;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let db = redb::Database::create(dir.path().join("registry.redb"))
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        let db = Arc::new(db);
        let config = RegistryConfig::new(dir.path().to_path_buf());
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let shared = Shared::new(config.shared(), dir.path().to_path_buf(), rx);
        let log = LogStore::new(db.clone(), None, Arc::new(AtomicU64::new(0)), None)
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        let sm = StateMachine::open(shared.apply_handle(), db)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), Box<StorageError<u64>>> {
    Suite::test_all(Builder).map_err(Box::new)
}

/// The committed-index hint never names an entry that is not on disk: with an empty log
/// a hint of 5 is stored as "none" (a restart must not replay entries that are missing).
#[tokio::test]
async fn the_committed_hint_is_clamped_to_the_durable_log() {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Arc::new(redb::Database::create(dir.path().join("registry.redb")).expect("db"));
    let mut log = LogStore::new(db, None, Arc::new(AtomicU64::new(0)), None).expect("log store");
    let ahead = openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 5);
    log.save_committed(Some(ahead)).await.expect("save");
    assert_eq!(log.read_committed().await.expect("read"), None);
}
