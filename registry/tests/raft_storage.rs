//! openraft's own storage conformance suite against our redb log store and the catalog
//! state machine.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use switchyard_registry::node::Shared;
use switchyard_registry::raft::log_store::LogStore;
use switchyard_registry::raft::state_machine::StateMachine;
use switchyard_registry::raft::TypeConfig;
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
        let limits = config.limits;
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let shared = Shared::new(config, rx);
        let log = LogStore::new(db.clone(), None, Arc::new(AtomicU64::new(0)))
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        let sm = StateMachine::open(shared, db, limits)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), Box<StorageError<u64>>> {
    Suite::test_all(Builder).map_err(Box::new)
}
