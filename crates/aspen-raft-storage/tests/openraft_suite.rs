//! openraft's own storage test suite against the real redb log and SQLite state machine.

use aspen_raft_storage::{RedbLogStore, SqliteStateMachine, TypeConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use tempfile::TempDir;

struct OnDiskStores;

impl StoreBuilder<TypeConfig, RedbLogStore, SqliteStateMachine, TempDir> for OnDiskStores {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, SqliteStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|error| StorageError::write(TypeConfig::err_from_error(&error)))?;
        let log = RedbLogStore::open(dir.path().join("raft-log.redb"))
            .map_err(|error| StorageError::write(TypeConfig::err_from_error(&error)))?;
        let state_machine = SqliteStateMachine::open(dir.path().join("state-machine"))
            .map_err(|error| StorageError::write(TypeConfig::err_from_error(&error)))?;
        Ok((dir, log, state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_log_and_sqlite_state_machine_pass_the_openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(OnDiskStores).await
}
