//! openraft's own storage test suite (`openraft::testing::log::Suite`) against Junction's log
//! store with each of its two state machines, on a real RocksDB store in a temp dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use junction_raft::log_store::LogStore;
use junction_raft::meta_sm::MetaStateMachine;
use junction_raft::partition_sm::PartitionStateMachine;
use junction_raft::types::TypeConfig;
use junction_storage::Store;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

/// Every build gets a fresh store; the temp dir lives as long as the guard.
struct MetaBuilder;
struct PartitionBuilder;
/// A partition whose log is in segment files, as every partition on disk has.
struct SegmentedBuilder;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    (dir, store)
}

impl StoreBuilder<TypeConfig, LogStore, MetaStateMachine, tempfile::TempDir> for MetaBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, MetaStateMachine), StorageError<TypeConfig>> {
        let (dir, store) = store();
        let sm = MetaStateMachine::open(store.clone()).expect("state machine");
        Ok((dir, LogStore::new(store, junction_types::META_GROUP), sm))
    }
}

/// A partition state machine on a fresh store, with its log in RocksDB or in segment files.
fn partition(segmented: bool) -> (tempfile::TempDir, LogStore, PartitionStateMachine) {
    let (dir, store) = store();
    let sm = PartitionStateMachine::open(store.clone(), 7, junction_raft::TailBudget::new(1 << 20))
        .expect("state machine");
    let log = if segmented {
        let log = LogStore::segmented(store, 7).expect("segment log");
        assert!(log.is_segmented());
        log
    } else {
        LogStore::new(store, 7)
    };
    (dir, log, sm)
}

impl StoreBuilder<TypeConfig, LogStore, PartitionStateMachine, tempfile::TempDir>
    for PartitionBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, PartitionStateMachine), StorageError<TypeConfig>>
    {
        Ok(partition(false))
    }
}

impl StoreBuilder<TypeConfig, LogStore, PartitionStateMachine, tempfile::TempDir>
    for SegmentedBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, PartitionStateMachine), StorageError<TypeConfig>>
    {
        Ok(partition(true))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_log_store_and_a_partition_state_machine_pass_openraft_s_suite() {
    Suite::test_all(SegmentedBuilder)
        .await
        .expect("openraft storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_store_and_the_metadata_state_machine_pass_openraft_s_suite() {
    Suite::test_all(MetaBuilder)
        .await
        .expect("openraft storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_store_and_a_partition_state_machine_pass_openraft_s_suite() {
    Suite::test_all(PartitionBuilder)
        .await
        .expect("openraft storage suite");
}
