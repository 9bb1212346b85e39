//! What a Raft log entry carries (`Command`) and what applying it returns
//! (`CommandResponse`). One type serves every group so that one Raft type configuration and
//! one transport carry them all; the metadata group only ever sees `Meta` commands and a
//! partition group only `Partition` commands.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::groups::{GroupMeta, GroupSettings};
use crate::meta::{MetaError, StationMeta};
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
    },
    DeleteStation {
        tenant: String,
        name: String,
    },
    /// Creates a consumer group of `station` (`tenant/name`) with no members.
    CreateGroup {
        station: String,
        group: String,
        settings: GroupSettings,
        now_ms: i64,
    },
    /// Adds a member (creating the group with `settings` if it does not exist) and
    /// rebalances. Joining again as an existing member changes nothing.
    JoinGroup {
        station: String,
        group: String,
        member: String,
        client: String,
        settings: GroupSettings,
        now_ms: i64,
    },
    /// Removes members (left, or their session expired) and rebalances.
    LeaveGroup {
        station: String,
        group: String,
        members: Vec<String>,
    },
    DeleteGroup {
        station: String,
        group: String,
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
    /// Creates the cursor of a consumer group at `start` (no effect if the group `uid`
    /// already has one).
    GroupInit { group: String, uid: u64, start: u64 },
    /// Acknowledges offsets for a group (acked or dead-lettered).
    GroupAck {
        group: String,
        uid: u64,
        offsets: Vec<u64>,
    },
    /// Moves a group's cursor to `offset` (clamped to the partition), forgetting later acks.
    GroupSeek {
        group: String,
        uid: u64,
        offset: u64,
    },
    /// Copies a group's cursor into another group.
    GroupClone {
        from: String,
        from_uid: u64,
        to: String,
        to_uid: u64,
    },
    /// Forgets a group's cursor.
    GroupDelete { group: String },
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
    /// A consumer group after a metadata change.
    Group(GroupMeta),
    /// A consumer group's cursor after a partition command (`None`: the group has none).
    Cursor(Option<crate::groups::GroupCursor>),
    Done,
    MetaRejected(MetaError),
    /// A command was sent to a group of the wrong kind (a bug, reported rather than panicking).
    WrongGroup,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Meta(m) => write!(f, "meta:{m:?}"),
            Command::Partition(PartitionCommand::Append { records, .. }) => {
                write!(f, "append({} records)", records.len())
            }
            Command::Partition(PartitionCommand::GroupAck { group, offsets, .. }) => {
                write!(f, "group-ack({group}, {} offsets)", offsets.len())
            }
            Command::Partition(p) => write!(f, "partition:{p:?}"),
        }
    }
}
