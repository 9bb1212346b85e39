//! The openraft type configuration shared by the metadata group and every partition group.

use junction_types::{Command, CommandResponse};

use crate::meta_sm::MetaStateMachine;
use crate::partition_sm::PartitionStateMachine;
use crate::snapshot::SnapshotData;

openraft::declare_raft_types!(
    /// One configuration for all groups: entries carry a [`Command`], applying returns a
    /// [`CommandResponse`]; node ids are `u64`, nodes are `BasicNode { addr }`.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
);

pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type Node = openraft::BasicNode;
pub type MetaRaft = openraft::Raft<TypeConfig, MetaStateMachine>;
pub type PartitionRaft = openraft::Raft<TypeConfig, PartitionStateMachine>;
