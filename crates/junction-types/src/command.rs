//! What a Raft log entry carries (`Command`) and what applying it returns
//! (`CommandResponse`). One type serves every group so that one Raft type configuration and
//! one transport carry them all; the metadata group only ever sees `Meta` commands and a
//! partition group only `Partition` commands.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::auth::ApiKey;
use crate::exactly_once::{
    AppendReject, DeliveryPolicy, Placement, ProducerBatch, ProducerIdentity,
};
use crate::groups::{GroupMeta, GroupSettings, Lanes};
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
    /// Replaces a station's retention, discard and compaction settings (the storage tier is
    /// fixed at creation).
    UpdateStation {
        tenant: String,
        name: String,
        policy: StationPolicy,
    },
    /// Hands out a producer id (and, for a named producer, its next epoch).
    InitProducer {
        tenant: String,
        /// A stable name: initialising it again fences the previous instance.
        name: Option<String>,
    },
    /// `CreateStation` with exactly-once settings (what this build writes; the variant
    /// without them is still applied from logs written by earlier builds).
    CreateStationV2 {
        tenant: String,
        name: String,
        placement: Vec<Vec<u64>>,
        replication_factor: u32,
        max_message_bytes: u32,
        now_ms: i64,
        policy: StationPolicy,
        delivery: DeliveryPolicy,
    },
    /// `UpdateStation` with exactly-once settings.
    UpdateStationV2 {
        tenant: String,
        name: String,
        policy: StationPolicy,
        delivery: DeliveryPolicy,
    },
    /// Adds an API key (its id and secret digest were made by the node that took the call).
    CreateApiKey {
        key: ApiKey,
    },
    /// Revokes an API key; `tenant` limits it to that tenant's keys (a tenant admin's call).
    RevokeApiKey {
        id: String,
        tenant: Option<String>,
        now_ms: i64,
    },
    /// Sets or clears limits of a tenant or of one of its stations.
    SetQuota {
        tenant: String,
        change: crate::quota::QuotaChange,
    },
    /// Adds a schema version (compiled and checked for compatibility by the controller).
    RegisterSchema {
        version: crate::schema::NewVersion,
    },
    /// Changes a schema's compatibility mode.
    SetSchemaCompatibility {
        tenant: String,
        name: String,
        compatibility: crate::schema::Compatibility,
    },
    /// Deletes a schema version, or the whole schema (`version: None`).
    DeleteSchema {
        tenant: String,
        name: String,
        version: Option<u32>,
    },
    /// Binds a station (`tenant/name`) to a schema, or detaches it (`binding: None`).
    BindSchema {
        station: String,
        binding: Option<crate::schema::SchemaBinding>,
    },
    /// `CreateGroup` with how the members share partitions.
    CreateGroupV2 {
        station: String,
        group: String,
        settings: GroupSettings,
        lanes: Lanes,
        now_ms: i64,
    },
    /// `JoinGroup` with how the members share partitions (used when it creates the group).
    JoinGroupV2 {
        station: String,
        group: String,
        member: String,
        client: String,
        settings: GroupSettings,
        lanes: Lanes,
        now_ms: i64,
    },
    /// Starts removing a node: its replicas move away, then it leaves the metadata group.
    DrainNode {
        node: u64,
    },
    /// Starts moving partitions to new replica lists (group id, target replicas); groups that
    /// move already or no longer exist are skipped.
    StartMoves {
        moves: Vec<(u64, Vec<u64>)>,
    },
    /// A move's Raft membership change committed: the partition's replicas become
    /// `replicas` (ignored unless that is the move in progress).
    FinishMove {
        group: u64,
        replicas: Vec<u64>,
    },
    /// A drained node left the metadata group.
    ForgetNode {
        node: u64,
    },
    /// Starts or ends a rebalance.
    SetRebalancing {
        on: bool,
    },
    /// Raises the cluster's format level (see [`crate::format_level`]); never lowers it.
    RaiseFormatLevel {
        level: u16,
    },
}

/// One produce request's records in an [`PartitionCommand::AppendBatches`] entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    /// Set by idempotent producers: checked against the producer's sequence.
    pub producer: Option<ProducerBatch>,
    pub records: Vec<Record>,
}

/// A batch some of whose records were taken out before it was proposed (its station's schema
/// sent them to the dead-letter station): they still count in the producer's sequence, so a
/// retry of the whole request matches and the next batch follows on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpannedBatch {
    pub batch: AppendBatch,
    /// Sequence numbers the batch covers (its records plus those taken out).
    pub sequence_span: u32,
}

/// What became of one batch of an `AppendBatches` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub placement: Placement,
    /// The whole batch was a producer's retry of a stored batch: nothing was appended.
    pub duplicate: bool,
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
    /// Appends produce batches at the next offsets, after the exactly-once checks: each
    /// batch's producer sequence (duplicates answered with their original placement, gaps and
    /// fenced epochs refused) and, with a dedup window, each message id. `delivery` is the
    /// station's setting when the leader proposed the entry, so every replica decides alike.
    AppendBatches {
        timestamp_ms: i64,
        delivery: DeliveryPolicy,
        batches: Vec<AppendBatch>,
    },
    /// `AppendBatches` where a batch's producer sequence covers more records than it stores
    /// (proposed only then, so logs without dead-lettered messages keep the older variant).
    AppendSpanned {
        timestamp_ms: i64,
        delivery: DeliveryPolicy,
        batches: Vec<SpannedBatch>,
    },
    /// Parks `key` for a group at its `head` offset, or (`head: None`) unparks it.
    GroupPark {
        group: String,
        uid: u64,
        key: Vec<u8>,
        head: Option<u64>,
    },
    /// Sets a group's isolation budget in the partition, or detaches / re-attaches it.
    GroupIsolation {
        group: String,
        uid: u64,
        change: crate::groups::Isolation,
    },
    /// An append (`Append`, `AppendBatches` or `AppendSpanned`) with the CRC32C its leader
    /// computed over its messages ([`PartitionCommand::digest`]). Every replica checks it
    /// before storing anything: a mismatch means the entry changed after the leader made it
    /// (in memory, on the wire or in a log), and the replica stops instead of storing it.
    /// Written only from format level [`crate::format_level::CHECKED_APPENDS`] on.
    Checked {
        crc: u32,
        command: Box<PartitionCommand>,
    },
}

/// A CRC32C over a sequence of fields, each byte string prefixed by its length (so that
/// moving bytes from one field to the next changes the digest). Small fields are gathered in
/// a buffer first: one CRC call per few records instead of several per record (the value is
/// the same, a CRC being a stream).
struct Digest {
    crc: u32,
    buf: [u8; 512],
    len: usize,
}

impl Digest {
    /// Fields up to this long are copied into the buffer; longer ones go to the CRC directly.
    const SMALL: usize = 256;

    fn new() -> Self {
        Digest {
            crc: 0,
            buf: [0; 512],
            len: 0,
        }
    }

    fn flush(&mut self) {
        self.crc = crc32c::crc32c_append(self.crc, &self.buf[..self.len]);
        self.len = 0;
    }

    fn gather(&mut self, b: &[u8]) {
        if self.len + b.len() > self.buf.len() {
            self.flush();
        }
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    fn u64(&mut self, v: u64) {
        self.gather(&v.to_le_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        if b.len() <= Self::SMALL {
            self.gather(b);
        } else {
            self.flush();
            self.crc = crc32c::crc32c_append(self.crc, b);
        }
    }

    /// An append's kind (1, 2, 3), timestamp and number of records or batches.
    fn head(&mut self, kind: u64, timestamp_ms: i64, items: usize) {
        self.u64(kind);
        self.u64(timestamp_ms as u64);
        self.u64(items as u64);
    }

    fn finish(mut self) -> u32 {
        self.flush();
        self.crc
    }

    fn record(&mut self, r: &Record) {
        match &r.key {
            None => self.u64(0),
            Some(k) => {
                self.u64(1);
                self.bytes(k);
            }
        }
        self.u64(r.headers.len() as u64);
        for (name, value) in &r.headers {
            self.bytes(name.as_bytes());
            self.bytes(value);
        }
        self.bytes(&r.payload);
    }

    fn batch(&mut self, b: &AppendBatch) {
        match &b.producer {
            None => self.u64(0),
            Some(p) => {
                self.u64(1);
                self.u64(p.id);
                self.u64(u64::from(p.epoch));
                self.u64(p.base_sequence);
            }
        }
        self.u64(b.records.len() as u64);
        for r in &b.records {
            self.record(r);
        }
    }
}

impl PartitionCommand {
    /// The CRC32C a leader carries with an append: over its kind, timestamp, and every
    /// batch's producer fields and every record's key, headers and payload, in order. `None`
    /// for commands that carry no messages.
    pub fn digest(&self) -> Option<u32> {
        let mut d = Digest::new();
        match self {
            PartitionCommand::Append {
                timestamp_ms,
                records,
            } => {
                d.head(1, *timestamp_ms, records.len());
                for r in records {
                    d.record(r);
                }
            }
            PartitionCommand::AppendBatches {
                timestamp_ms,
                batches,
                ..
            } => {
                d.head(2, *timestamp_ms, batches.len());
                for b in batches {
                    d.batch(b);
                }
            }
            PartitionCommand::AppendSpanned {
                timestamp_ms,
                batches,
                ..
            } => {
                d.head(3, *timestamp_ms, batches.len());
                for b in batches {
                    d.u64(u64::from(b.sequence_span));
                    d.batch(&b.batch);
                }
            }
            _ => return None,
        }
        Some(d.finish())
    }

    /// This command with its leader's checksum: appends become [`PartitionCommand::Checked`],
    /// other commands stay as they are.
    pub fn checked(self) -> PartitionCommand {
        match self.digest() {
            Some(crc) => PartitionCommand::Checked {
                crc,
                command: Box::new(self),
            },
            None => self,
        }
    }

    /// The append inside a [`PartitionCommand::Checked`], if its checksum matches.
    pub fn verify(
        crc: u32,
        command: PartitionCommand,
    ) -> Result<PartitionCommand, ChecksumMismatch> {
        match command.digest() {
            Some(d) if d == crc => Ok(command),
            computed => Err(ChecksumMismatch {
                carried: crc,
                computed,
            }),
        }
    }

    /// Checks the leader's checksum of a [`PartitionCommand::Checked`]; other commands carry
    /// none and pass.
    pub fn check(&self) -> Result<(), ChecksumMismatch> {
        match self {
            PartitionCommand::Checked { crc, command } => match command.digest() {
                Some(d) if d == *crc => Ok(()),
                computed => Err(ChecksumMismatch {
                    carried: *crc,
                    computed,
                }),
            },
            _ => Ok(()),
        }
    }
}

/// A checked append whose messages do not give the checksum its leader computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the leader's checksum {carried:#010x} does not match the entry's messages ({})",
    computed.map_or_else(|| "not an append".to_string(), |c| format!("{c:#010x}"))
)]
pub struct ChecksumMismatch {
    pub carried: u32,
    pub computed: Option<u32>,
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
    /// A `Truncate` or `Compact` was applied: the partition's first offset afterwards and the
    /// messages the command removed on this replica.
    Retained {
        start_offset: u64,
        removed: u64,
    },
    /// The outcome of each batch of an `AppendBatches`, in order.
    Batches(Vec<Result<BatchOutcome, AppendReject>>),
    /// A producer identity from `InitProducer`.
    Producer(ProducerIdentity),
    /// A tenant's quotas after a `SetQuota`.
    Quotas(crate::quota::TenantQuotas),
    /// The version a `RegisterSchema` stored (or found).
    SchemaRegistered(crate::schema::Registered),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Meta(m) => write!(f, "meta:{m:?}"),
            Command::Partition(PartitionCommand::Append { records, .. }) => {
                write!(f, "append({} records)", records.len())
            }
            Command::Partition(PartitionCommand::AppendBatches { batches, .. }) => {
                let n: usize = batches.iter().map(|b| b.records.len()).sum();
                write!(f, "append({} batches, {n} records)", batches.len())
            }
            Command::Partition(PartitionCommand::AppendSpanned { batches, .. }) => {
                let n: usize = batches.iter().map(|b| b.batch.records.len()).sum();
                write!(f, "append({} batches, {n} records)", batches.len())
            }
            Command::Partition(PartitionCommand::GroupAck { group, offsets, .. }) => {
                write!(f, "group-ack({group}, {} offsets)", offsets.len())
            }
            Command::Partition(p) => write!(f, "{p:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: Option<&[u8]>, headers: &[(&str, &[u8])], payload: &[u8]) -> Record {
        Record {
            key: key.map(<[u8]>::to_vec),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            payload: payload.to_vec(),
        }
    }

    /// The digest of the sample in `a_checked_append_verifies_and_any_changed_byte_fails_it`.
    const FROZEN_SAMPLE_CRC: u32 = 0xff00_58f2;

    fn append(records: Vec<Record>) -> PartitionCommand {
        PartitionCommand::Append {
            timestamp_ms: 7,
            records,
        }
    }

    #[test]
    fn a_checked_append_verifies_and_any_changed_byte_fails_it() {
        let cmd = append(vec![rec(Some(b"k"), &[("h", b"v")], b"hello")]);
        let PartitionCommand::Checked { crc, command } = cmd.clone().checked() else {
            panic!("an append is checked")
        };
        assert_eq!(PartitionCommand::verify(crc, *command), Ok(cmd.clone()));
        assert_eq!(cmd.clone().checked().check(), Ok(()));
        assert_eq!(
            cmd.check(),
            Ok(()),
            "an unchecked command has nothing to check"
        );
        // Every field counts, and so does where one field ends and the next begins.
        let changed = [
            append(vec![rec(Some(b"k"), &[("h", b"v")], b"hellp")]),
            append(vec![rec(Some(b"K"), &[("h", b"v")], b"hello")]),
            append(vec![rec(None, &[("h", b"v")], b"hello")]),
            append(vec![rec(Some(b"k"), &[("h", b"w")], b"hello")]),
            append(vec![rec(Some(b"k"), &[("hv", b"")], b"hello")]),
            append(vec![rec(Some(b"k"), &[], b"hello")]),
            append(vec![
                rec(Some(b"k"), &[("h", b"v")], b"hello"),
                rec(None, &[], b""),
            ]),
            PartitionCommand::Append {
                timestamp_ms: 8,
                records: vec![rec(Some(b"k"), &[("h", b"v")], b"hello")],
            },
        ];
        for c in changed {
            let swapped = PartitionCommand::Checked {
                crc,
                command: Box::new(c.clone()),
            };
            assert!(
                swapped.check().is_err() && PartitionCommand::verify(crc, c.clone()).is_err(),
                "{c:?} passed the original's checksum"
            );
        }
        // Frozen: the digest is part of the entry format (every replica computes it, whatever
        // its build), so its value for a sample never changes.
        assert_eq!(crc, FROZEN_SAMPLE_CRC, "{crc:#010x}");
    }

    /// The buffered digest equals the plain CRC32C of the same field stream, for fields of
    /// every size around the buffer's bounds.
    #[test]
    fn the_gathered_digest_is_the_crc_of_the_field_stream() {
        for size in [0usize, 1, 255, 256, 257, 500, 511, 512, 513, 4096] {
            let records: Vec<Record> = (0..7u8)
                .map(|i| {
                    rec(
                        Some(&[i; 3]),
                        &[("name", &vec![i; size / 3])],
                        &vec![i; size],
                    )
                })
                .collect();
            let mut stream = Vec::new();
            let mut put = |b: &[u8]| stream.extend_from_slice(b);
            put(&1u64.to_le_bytes());
            put(&7u64.to_le_bytes());
            put(&(records.len() as u64).to_le_bytes());
            for r in &records {
                put(&1u64.to_le_bytes());
                let key = r.key.as_deref().unwrap_or_default();
                put(&(key.len() as u64).to_le_bytes());
                put(key);
                put(&(r.headers.len() as u64).to_le_bytes());
                for (n, v) in &r.headers {
                    put(&(n.len() as u64).to_le_bytes());
                    put(n.as_bytes());
                    put(&(v.len() as u64).to_le_bytes());
                    put(v);
                }
                put(&(r.payload.len() as u64).to_le_bytes());
                put(&r.payload);
            }
            assert_eq!(
                append(records).digest(),
                Some(crc32c::crc32c(&stream)),
                "payloads of {size} bytes"
            );
        }
    }

    #[test]
    fn batches_digest_their_producer_fields_and_spans() {
        let batch = |epoch| AppendBatch {
            producer: Some(ProducerBatch {
                id: 9,
                epoch,
                base_sequence: 4,
            }),
            records: vec![rec(None, &[], b"x")],
        };
        let batches = |epoch| PartitionCommand::AppendBatches {
            timestamp_ms: 1,
            delivery: DeliveryPolicy::default(),
            batches: vec![batch(epoch)],
        };
        let spanned = |span| PartitionCommand::AppendSpanned {
            timestamp_ms: 1,
            delivery: DeliveryPolicy::default(),
            batches: vec![SpannedBatch {
                batch: batch(1),
                sequence_span: span,
            }],
        };
        let all = [
            batches(1).digest(),
            batches(2).digest(),
            spanned(1).digest(),
            spanned(2).digest(),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(a.is_some());
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn only_appends_are_checked() {
        let seek = PartitionCommand::Truncate { before: 3 };
        assert_eq!(seek.digest(), None);
        assert_eq!(seek.clone().checked(), seek);
        assert!(PartitionCommand::verify(0, seek).is_err());
        let nested = append(vec![]).checked();
        assert!(
            PartitionCommand::verify(0, nested).is_err(),
            "a checked entry inside another is never valid"
        );
    }
}
