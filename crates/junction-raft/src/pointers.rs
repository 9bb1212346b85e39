//! The Raft side of message pointers (see [`junction_storage::pointer`]): which records a
//! partition log entry carries, in the order the state machine numbers them, so the store can
//! resolve a pointer into the record an inline copy would have held.

use std::sync::Arc;

use junction_storage::Store;
use junction_storage::pointer::{EntryMessages, EntryRecords};
use junction_types::{Command, GroupId, PartitionCommand, Record};
use openraft::EntryPayload;

use crate::format;

/// The records of an append command, flattened across its batches: a record's ordinal is its
/// place in this list, whether or not the state machine stored it (a duplicate is skipped,
/// and keeps its number).
pub(crate) fn records_of(command: PartitionCommand) -> Vec<Record> {
    match command {
        PartitionCommand::Checked { command, .. } => records_of(*command),
        PartitionCommand::Append { records, .. } => records,
        PartitionCommand::AppendBatches { batches, .. } => {
            batches.into_iter().flat_map(|b| b.records).collect()
        }
        PartitionCommand::AppendSpanned { batches, .. } => {
            batches.into_iter().flat_map(|b| b.batch.records).collect()
        }
        _ => Vec::new(),
    }
}

/// Decodes partition log entries for the store.
struct PartitionEntries;

impl EntryRecords for PartitionEntries {
    fn open(
        &self,
        _group: GroupId,
        index: u64,
        entry: &[u8],
    ) -> Result<Box<dyn EntryMessages>, String> {
        let entry = format::decode_log_entry(entry).map_err(|e| e.to_string())?;
        if entry.log_id.index != index {
            return Err(format!("index {index} holds entry {}", entry.log_id.index));
        }
        match entry.payload {
            EntryPayload::Normal(Command::Partition(c)) => Ok(Box::new(Decoded(records_of(c)))),
            _ => Err("the entry carries no messages".to_owned()),
        }
    }
}

struct Decoded(Vec<Record>);

impl EntryMessages for Decoded {
    fn record(&self, ordinal: u32, timestamp_ms: i64) -> Result<Vec<u8>, String> {
        let r = self
            .0
            .get(ordinal as usize)
            .ok_or_else(|| format!("the entry carries {} records", self.0.len()))?;
        format::encode_record_of(timestamp_ms, r).map_err(|e| e.to_string())
    }
}

/// Lets `store` resolve message pointers into partition log entries.
pub fn install(store: &Store) {
    store.set_entry_records(Arc::new(PartitionEntries));
}
