//! Helpers shared by this crate's integration tests.

use junction_raft::types::{Entry, LogId};
use junction_types::{Command, PartitionCommand};
use openraft::EntryPayload;

/// The id of entry `index`, in term 1 of node 1.
pub fn log_id(index: u64) -> LogId {
    openraft::LogId::new(
        openraft::impls::leader_id_adv::LeaderId {
            term: 1,
            node_id: 1,
        },
        index,
    )
}

/// A partition entry at `index` carrying `cmd`.
pub fn entry(index: u64, cmd: PartitionCommand) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Partition(cmd)),
    }
}
