//! What a Raft log entry carries (`Command`) and what applying it returns
//! (`CommandResponse`). One type serves every group so that one Raft type configuration and
//! one transport carry them all; the metadata group only ever sees `Meta` commands and a
//! partition group only `Partition` commands.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::meta::{MetaError, StationMeta};
use crate::policy::StationPolicy;
use crate::record::Record;

/// The application data of a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Meta(MetaCommand),
    Partition(PartitionCommand),
}

/// Changes to the metadata group's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    CreateTenant {
        name: String,
        now_ms: i64,
    },
    /// Creates a station; group ids are assigned when the command is applied.
    CreateStation {
        tenant: String,
        name: String,
        /// Replica node ids of each partition, chosen by the controller.
        placement: Vec<Vec<u64>>,
        replication_factor: u32,
        max_message_bytes: u32,
        now_ms: i64,
        /// Storage, retention and compaction settings.
        #[serde(default)]
        policy: StationPolicy,
    },
    DeleteStation {
        tenant: String,
        name: String,
    },
    /// Replaces a station's retention, discard and compaction settings (the storage tier is
    /// fixed at creation).
    UpdateStation {
        tenant: String,
        name: String,
        policy: StationPolicy,
    },
}

/// Changes to one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionCommand {
    /// Appends records at the next offsets. `timestamp_ms` comes from the leader's clock; the
    /// state machine never lets a partition's timestamps go backwards.
    Append {
        timestamp_ms: i64,
        records: Vec<Record>,
    },
    /// Removes every message below `before` (retention). Decided by the leader, applied by
    /// every replica with range deletes; offsets are never reused.
    Truncate { before: u64 },
    /// Key compaction of the offsets below `upto`: only the newest message per key is kept;
    /// tombstones with a timestamp below `tombstones_before_ms` are dropped with their key.
    Compact {
        upto: u64,
        tombstones_before_ms: i64,
    },
    /// A memory partition lost every replica at `at_ms` and restarted empty (recorded so that
    /// `station describe` says so).
    DataLost { at_ms: i64 },
}

/// The result of applying one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResponse {
    /// Blank and membership entries.
    #[default]
    None,
    /// The records of an `Append` got offsets `base_offset..base_offset + count`.
    Appended {
        base_offset: u64,
        count: u32,
        timestamp_ms: i64,
    },
    StationCreated(StationMeta),
    Done,
    MetaRejected(MetaError),
    /// A command was sent to a group of the wrong kind (a bug, reported rather than panicking).
    WrongGroup,
    /// A `Truncate` or `Compact` was applied: the partition's first offset afterwards and the
    /// messages the command removed on this replica.
    Retained {
        start_offset: u64,
        removed: u64,
    },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Meta(m) => write!(f, "meta:{m:?}"),
            Command::Partition(PartitionCommand::Append { records, .. }) => {
                write!(f, "append({} records)", records.len())
            }
            Command::Partition(p) => write!(f, "{p:?}"),
        }
    }
}
