//! Domain types of Junction, shared by every other crate: station names, the partitioner,
//! records, the commands replicated through Raft, and the metadata model.
//!
//! This crate does no I/O and has no async code: it must not depend on tokio, tonic, openraft
//! or rocksdb. Everything here is deterministic, because Raft state machines are built on it.
//!
//! - [`names`]: validated tenant and station names.
//! - [`partitioner`]: the documented key → partition hash (Kafka-compatible murmur2).
//! - [`record`]: a message as stored, and its on-disk encoding.
//! - [`command`]: what a Raft log entry carries and what applying it returns.
//! - [`meta`]: the metadata group's state (tenants, stations, placement, consumer groups) and
//!   its pure apply.
//! - [`exactly_once`]: idempotent producer sequences and the message-id dedup window.
//! - [`groups`]: consumer group settings, sticky assignment and per-partition cursors.
//! - [`auth`]: roles, API keys and the authorization decision.
//! - [`policy`]: storage tier, retention, discard and compaction settings of a station.
//! - [`quota`]: per-tenant limits and the token bucket that enforces rates.
//! - [`schema`]: the schema registry (versions, compatibility modes, station bindings).
//! - [`format_level`]: the cluster's format level, raised once every member understands it.

pub mod auth;
pub mod command;
pub mod exactly_once;
pub mod format_level;
pub mod groups;
pub mod meta;
pub mod names;
pub mod partitioner;
pub mod policy;
pub mod quota;
pub mod reconfig;
pub mod record;
pub mod schema;

pub use command::{Command, CommandResponse, MetaCommand, PartitionCommand};
pub use meta::{MetaError, MetaState, PartitionMeta, StationMeta};
pub use names::{NameError, StationName};
pub use policy::{
    CompactionPolicy, DiscardPolicy, PolicyError, Retention, StationPolicy, StorageTier,
};
pub use record::{Record, StoredRecord, StoredRecordRef};

/// Raft group id. Group 0 is the metadata group; partitions get ids from 1 upwards.
pub type GroupId = u64;
/// Node id, as given in the member list (`1=host:port,...`).
pub type NodeId = u64;
/// The metadata group's id.
pub const META_GROUP: GroupId = 0;
/// The tenant that always exists and that names without a `tenant/` prefix belong to.
pub const DEFAULT_TENANT: &str = "default";
/// The most partitions a station may have.
pub const MAX_PARTITIONS: u32 = 1024;
