//! The JSON shapes of the REST API and their conversion to and from the gRPC messages.
//!
//! Bytes (keys, header values, payloads) travel as text when they are UTF-8 and as base64
//! otherwise; every such field says which in its `*_encoding` companion, so a reader never
//! guesses.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use junction_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::Problem;

/// How a byte field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// UTF-8 text, as is.
    Text,
    /// Standard base64 (with padding).
    Base64,
}

/// Writes bytes as text when they are UTF-8, otherwise as base64.
pub fn encode_bytes(bytes: &[u8]) -> (String, Encoding) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), Encoding::Text),
        Err(_) => (B64.encode(bytes), Encoding::Base64),
    }
}

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, Problem> {
    B64.decode(text.trim())
        .map_err(|e| Problem::bad_request(format!("`{field}` is not valid standard base64: {e}")))
}

// ---------------------------------------------------------------------------------------
// Cluster, tenants, identity

#[derive(Debug, Serialize, ToSchema)]
pub struct Node {
    pub id: u64,
    pub addr: String,
    /// Whether the node answered a status probe just now.
    pub alive: bool,
    pub partition_replicas: u32,
    pub partition_leaders: u32,
    /// Being removed: its replicas move away, then it leaves the cluster.
    pub draining: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Cluster {
    /// Empty for a cluster initialised by a build without ids.
    pub cluster_id: String,
    pub metadata_leader: Option<u64>,
    pub metadata_term: u64,
    pub nodes: Vec<Node>,
    pub stations: Vec<Station>,
    /// Partition moves in progress (node removals and rebalancing).
    pub moves_in_progress: u32,
    /// A rebalance runs.
    pub rebalancing: bool,
    /// The cluster's format level: which kinds of log entries it writes.
    pub format_level: u32,
}

impl From<pb::ClusterStatusResponse> for Cluster {
    fn from(c: pb::ClusterStatusResponse) -> Self {
        Self {
            cluster_id: c.cluster_id,
            metadata_leader: c.metadata_leader,
            metadata_term: c.metadata_term,
            nodes: c
                .nodes
                .into_iter()
                .map(|n| Node {
                    id: n.id,
                    addr: n.addr,
                    alive: n.alive,
                    partition_replicas: n.partition_replicas,
                    partition_leaders: n.partition_leaders,
                    draining: n.draining,
                })
                .collect(),
            stations: c.stations.into_iter().map(Station::from).collect(),
            moves_in_progress: c.moves_in_progress,
            rebalancing: c.rebalancing,
            format_level: c.format_level,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub tenant: String,
    pub role: String,
    pub station_prefix: Option<String>,
    /// The API key's id; empty for the admin token, or when authentication is off.
    pub key_id: String,
    /// Whether the cluster checks credentials at all.
    pub auth_enabled: bool,
}

impl From<pb::WhoAmIResponse> for WhoAmI {
    fn from(w: pb::WhoAmIResponse) -> Self {
        Self {
            tenant: w.tenant,
            role: w.role,
            station_prefix: w.station_prefix,
            key_id: w.key_id,
            auth_enabled: w.auth_enabled,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateTenant {
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Tenants {
    pub tenants: Vec<String>,
}

/// Limits; an absent one does not apply. Rates are per second for the whole cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produce_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produce_messages_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume_bytes_per_sec: Option<u64>,
    /// Message bytes the stations may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Tenant-wide only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<u64>,
    /// Open streams per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u64>,
}

impl From<Option<pb::QuotaLimits>> for QuotaLimits {
    fn from(l: Option<pb::QuotaLimits>) -> Self {
        let l = l.unwrap_or_default();
        Self {
            produce_bytes_per_sec: l.produce_bytes_per_sec,
            produce_messages_per_sec: l.produce_messages_per_sec,
            consume_bytes_per_sec: l.consume_bytes_per_sec,
            stored_bytes: l.stored_bytes,
            stations: l.stations,
            groups: l.groups,
            streams: l.streams,
        }
    }
}

impl From<QuotaLimits> for pb::QuotaLimits {
    fn from(l: QuotaLimits) -> Self {
        Self {
            produce_bytes_per_sec: l.produce_bytes_per_sec,
            produce_messages_per_sec: l.produce_messages_per_sec,
            consume_bytes_per_sec: l.consume_bytes_per_sec,
            stored_bytes: l.stored_bytes,
            stations: l.stations,
            groups: l.groups,
            streams: l.streams,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StationQuota {
    pub station: String,
    pub limits: QuotaLimits,
    pub stored_bytes: u64,
}

/// A tenant: its limits and what it uses.
#[derive(Debug, Serialize, ToSchema)]
pub struct Tenant {
    pub tenant: String,
    pub limits: QuotaLimits,
    /// Stations with limits of their own.
    pub station_limits: Vec<StationQuota>,
    pub stations_used: u64,
    pub groups_used: u64,
    pub stored_bytes: u64,
    /// Open streams on the node that answered.
    pub streams_open: u64,
}

impl From<pb::TenantQuota> for Tenant {
    fn from(q: pb::TenantQuota) -> Self {
        Self {
            tenant: q.tenant,
            limits: q.limits.into(),
            station_limits: q
                .stations
                .into_iter()
                .map(|s| StationQuota {
                    station: s.station,
                    limits: s.limits.into(),
                    stored_bytes: s.stored_bytes,
                })
                .collect(),
            stations_used: q.stations_used,
            groups_used: q.groups_used,
            stored_bytes: q.stored_bytes,
            streams_open: q.streams_open,
        }
    }
}

/// Sets and clears a tenant's limits (cluster admins only), or one of its stations'.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    /// A station of the tenant (its name without the tenant) whose limits narrow the
    /// tenant's; absent: the tenant's own limits.
    #[serde(default)]
    pub station: Option<String>,
    #[serde(default)]
    pub set: QuotaLimits,
    /// Limits to remove: produce-bytes-per-sec, produce-messages-per-sec,
    /// consume-bytes-per-sec, stored-bytes, stations, groups, streams.
    #[serde(default)]
    pub clear: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Stations

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// A limit removes the oldest messages.
    #[default]
    Old,
    /// A produce that would exceed a limit is refused.
    New,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compaction {
    #[default]
    None,
    /// Only the newest message per key is kept.
    Key,
}

/// Retention limits, per partition; absent means unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Remove messages once every consumer group acknowledged them.
    #[serde(default)]
    pub ack: bool,
}

/// Storage, retention, compaction and deduplication of a station.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub discard: Discard,
    #[serde(default)]
    pub compaction: Compaction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstone_delay_ms: Option<u64>,
    /// Message-id (and `Idempotency-Key`) deduplication window; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_max_ids: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_expiry_ms: Option<u64>,
}

impl From<Option<pb::StationPolicy>> for Policy {
    fn from(p: Option<pb::StationPolicy>) -> Self {
        let p = p.unwrap_or_default();
        let r = p.retention.unwrap_or_default();
        Self {
            storage: match pb::StorageTier::try_from(p.storage) {
                Ok(pb::StorageTier::Memory) => Storage::Memory,
                _ => Storage::File,
            },
            retention: Retention {
                max_age_ms: r.max_age_ms,
                max_bytes: r.max_bytes,
                max_messages: r.max_messages,
                ack: r.ack,
            },
            discard: match pb::DiscardPolicy::try_from(p.discard) {
                Ok(pb::DiscardPolicy::New) => Discard::New,
                _ => Discard::Old,
            },
            compaction: match pb::CompactionPolicy::try_from(p.compaction) {
                Ok(pb::CompactionPolicy::Key) => Compaction::Key,
                _ => Compaction::None,
            },
            tombstone_delay_ms: p.tombstone_delay_ms,
            dedup_window_ms: p.dedup_window_ms,
            dedup_max_ids: p.dedup_max_ids,
            producer_expiry_ms: p.producer_expiry_ms,
        }
    }
}

impl From<Policy> for pb::StationPolicy {
    fn from(p: Policy) -> Self {
        Self {
            storage: match p.storage {
                Storage::File => pb::StorageTier::File,
                Storage::Memory => pb::StorageTier::Memory,
            } as i32,
            retention: Some(pb::RetentionPolicy {
                max_age_ms: p.retention.max_age_ms,
                max_bytes: p.retention.max_bytes,
                max_messages: p.retention.max_messages,
                ack: p.retention.ack,
            }),
            discard: match p.discard {
                Discard::Old => pb::DiscardPolicy::Old,
                Discard::New => pb::DiscardPolicy::New,
            } as i32,
            compaction: match p.compaction {
                Compaction::None => pb::CompactionPolicy::None,
                Compaction::Key => pb::CompactionPolicy::Key,
            } as i32,
            tombstone_delay_ms: p.tombstone_delay_ms,
            dedup_window_ms: p.dedup_window_ms,
            dedup_max_ids: p.dedup_max_ids,
            producer_expiry_ms: p.producer_expiry_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Partition {
    pub partition: u32,
    /// The partition's Raft group.
    pub group_id: u64,
    pub replicas: Vec<u64>,
    pub leader: Option<u64>,
    /// The Raft term of the leader (0 when none is known).
    pub term: u64,
    pub next_offset: u64,
    pub start_offset: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Memory stations: when every replica was lost and the partition restarted empty.
    pub data_lost_at_ms: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Station {
    pub tenant: String,
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub max_message_bytes: u32,
    pub created_at_ms: i64,
    pub policy: Policy,
    /// `name@version` of the schema messages are checked against.
    pub schema: Option<String>,
    /// `reject` or `dead_letter`, with a schema.
    pub on_invalid: Option<String>,
    /// Filled when a station is described (and in the cluster status).
    pub partition_info: Vec<Partition>,
}

impl From<pb::StationInfo> for Station {
    fn from(s: pb::StationInfo) -> Self {
        let has_schema = !s.schema.is_empty();
        Self {
            tenant: s.tenant,
            name: s.name,
            partitions: s.partitions,
            replication_factor: s.replication_factor,
            max_message_bytes: s.max_message_bytes,
            created_at_ms: s.created_at_ms,
            policy: Policy::from(s.policy),
            schema: has_schema.then_some(s.schema),
            on_invalid: has_schema.then_some(s.on_invalid),
            partition_info: s
                .partition_info
                .into_iter()
                .map(|p| Partition {
                    partition: p.partition,
                    group_id: p.group_id,
                    replicas: p.replicas,
                    leader: p.leader,
                    term: p.term,
                    next_offset: p.next_offset,
                    start_offset: p.start_offset,
                    messages: p.messages,
                    bytes: p.bytes,
                    data_lost_at_ms: p.data_lost_at_ms,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Stations {
    pub stations: Vec<Station>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateStation {
    /// Absent: the `default` tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    pub name: String,
    /// 1 to 1024 (default 1).
    #[serde(default)]
    pub partitions: Option<u32>,
    /// 1, 3 or 5 (default 3 on a cluster of three or more nodes, else 1).
    #[serde(default)]
    pub replication_factor: Option<u32>,
    /// Default: the server's maximum.
    #[serde(default)]
    pub max_message_bytes: Option<u32>,
    #[serde(default)]
    pub policy: Option<Policy>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateStation {
    /// The complete new settings (the storage tier cannot change).
    pub policy: Policy,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StationsQuery {
    /// Only this tenant's stations.
    pub tenant: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Messages

/// A message to produce. Exactly one of `payload` (UTF-8 text), `json` (any JSON value,
/// stored as its compact text) or `base64` gives the payload; none means an empty payload.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    /// Messages with the same key go to the same partition, in order.
    #[serde(default)]
    pub key: Option<String>,
    /// Header values as text.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub payload: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub json: Option<serde_json::Value>,
    #[serde(default)]
    pub base64: Option<String>,
    /// Overrides the partitioner.
    #[serde(default)]
    pub partition: Option<u32>,
    /// Deduplication id (1 to 256 bytes), effective on stations with a dedup window.
    #[serde(default)]
    pub msg_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Produce {
    pub messages: Vec<NewMessage>,
}

impl NewMessage {
    /// Converts to the wire message; `idempotency` is the id to use when the message names
    /// none.
    pub fn into_proto(
        self,
        index: usize,
        idempotency: Option<String>,
    ) -> Result<pb::Message, Problem> {
        let at = |field: &str| format!("messages[{index}].{field}");
        let payload = match (self.payload, self.json, self.base64) {
            (None, None, None) => Vec::new(),
            (Some(text), None, None) => text.into_bytes(),
            (None, Some(value), None) => serde_json::to_vec(&value)
                .map_err(|e| Problem::bad_request(format!("{}: {e}", at("json"))))?,
            (None, None, Some(b)) => decode_base64(&at("base64"), &b)?,
            _ => {
                return Err(Problem::bad_request(format!(
                    "{}: give at most one of `payload`, `json` and `base64`",
                    at("payload")
                )));
            }
        };
        Ok(pb::Message {
            key: self.key.map(String::into_bytes),
            headers: self
                .headers
                .into_iter()
                .map(|(key, value)| pb::Header {
                    key,
                    value: value.into_bytes(),
                })
                .collect(),
            payload: payload.into(),
            partition: self.partition,
            msg_id: self.msg_id.or(idempotency),
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
    /// Already stored (a retry, or a message id within the dedup window): the first copy's
    /// position.
    pub duplicate: bool,
    /// Refused by the station's schema and stored in its dead-letter station instead.
    pub dead_lettered: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Produced {
    /// One per message, in request order.
    pub positions: Vec<Position>,
}

impl From<pb::ProduceResponse> for Produced {
    fn from(r: pb::ProduceResponse) -> Self {
        Self {
            positions: r
                .positions
                .into_iter()
                .map(|p| Position {
                    partition: p.partition,
                    offset: p.offset,
                    duplicate: p.duplicate,
                    dead_lettered: p.dead_lettered,
                })
                .collect(),
        }
    }
}

/// A stored message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub partition: u32,
    pub offset: u64,
    /// Milliseconds since the Unix epoch, assigned by the partition leader.
    pub timestamp_ms: i64,
    pub key: Option<String>,
    pub key_encoding: Option<Encoding>,
    /// Header values that are UTF-8 text.
    pub headers: BTreeMap<String, String>,
    /// Header values that are not, in base64.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers_base64: BTreeMap<String, String>,
    pub payload: String,
    pub payload_encoding: Encoding,
}

impl From<pb::StoredMessage> for Message {
    fn from(m: pb::StoredMessage) -> Self {
        let (key, key_encoding) = match m.key.as_deref().map(encode_bytes) {
            Some((k, e)) => (Some(k), Some(e)),
            None => (None, None),
        };
        let mut headers = BTreeMap::new();
        let mut headers_base64 = BTreeMap::new();
        for h in m.headers {
            match String::from_utf8(h.value) {
                Ok(text) => headers.insert(h.key, text),
                Err(e) => headers_base64.insert(h.key, B64.encode(e.as_bytes())),
            };
        }
        let (payload, payload_encoding) = encode_bytes(&m.payload);
        Self {
            partition: m.partition,
            offset: m.offset,
            timestamp_ms: m.timestamp_ms,
            key,
            key_encoding,
            headers,
            headers_base64,
            payload,
            payload_encoding,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// First offset to read (default: the earliest stored).
    pub from: Option<u64>,
    /// Instead of `from`: the first message at or after this time (ms since the Unix epoch).
    pub from_time_ms: Option<i64>,
    /// At most this many messages (default 100, at most 1000).
    pub max: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Messages {
    pub messages: Vec<Message>,
    /// The offset to read from next.
    pub next_offset: u64,
    /// The offset the next produced message will get.
    pub high_watermark: u64,
    /// The first offset still stored.
    pub start_offset: u64,
    /// The requested offset was removed by retention; the messages start at `start_offset`.
    pub below_start: bool,
}

impl From<pb::ReadResponse> for Messages {
    fn from(r: pb::ReadResponse) -> Self {
        Self {
            messages: r.messages.into_iter().map(Message::from).collect(),
            next_offset: r.next_offset,
            high_watermark: r.high_watermark,
            start_offset: r.start_offset,
            below_start: r.below_start,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Consumer groups

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// Each partition is delivered to one member at a time.
    #[default]
    Partitioned,
    /// Every member consumes every partition; each key goes to one member at a time.
    KeyShared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    Earliest,
    Latest,
}

/// A group's settings; absent fields take the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<GroupMode>,
    /// Where a new group starts: `earliest` (default) or `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Start>,
    /// Instead of `start`: an offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_offset: Option<u64>,
    /// Instead of `start`: a time (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_ms: Option<i64>,
    /// Redelivery when not acknowledged within this (default 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait_ms: Option<u64>,
    /// Dead-lettered after this many deliveries (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<u32>,
    /// Unacknowledged messages per partition at once (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Messages of one key in flight at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_key: Option<u32>,
    /// A member that is not heard from for this long leaves (default 10 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout_ms: Option<u64>,
    /// What happens to a message whose deliveries are used up (default `dead_letter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_max_deliveries: Option<OnMaxDeliveries>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnMaxDeliveries {
    /// Append it to the dead-letter station; its key goes on.
    DeadLetter,
    /// Park its key: the key waits, in order, until resumed or skipped.
    Park,
}

impl GroupSettings {
    pub fn into_proto(self) -> Result<pb::GroupSettings, Problem> {
        use pb::group_settings::Start as S;
        let start = match (self.start, self.start_offset, self.start_time_ms) {
            (None, None, None) => None,
            (Some(Start::Earliest), None, None) => {
                Some(S::Position(pb::StartPosition::Earliest as i32))
            }
            (Some(Start::Latest), None, None) => {
                Some(S::Position(pb::StartPosition::Latest as i32))
            }
            (None, Some(o), None) => Some(S::Offset(o)),
            (None, None, Some(t)) => Some(S::TimestampMs(t)),
            _ => {
                return Err(Problem::bad_request(
                    "give at most one of `start`, `start_offset` and `start_time_ms`",
                ));
            }
        };
        Ok(pb::GroupSettings {
            start,
            ack_wait_ms: self.ack_wait_ms.unwrap_or(0),
            max_deliveries: self.max_deliveries.unwrap_or(0),
            max_in_flight: self.max_in_flight.unwrap_or(0),
            session_timeout_ms: self.session_timeout_ms.unwrap_or(0),
            mode: match self.mode {
                None => pb::GroupMode::Unspecified,
                Some(GroupMode::Partitioned) => pb::GroupMode::Partitioned,
                Some(GroupMode::KeyShared) => pb::GroupMode::KeyShared,
            } as i32,
            max_in_flight_per_key: self.max_in_flight_per_key.unwrap_or(0),
            on_max_deliveries: match self.on_max_deliveries {
                None => pb::OnMaxDeliveries::Unspecified,
                Some(OnMaxDeliveries::DeadLetter) => pb::OnMaxDeliveries::DeadLetter,
                Some(OnMaxDeliveries::Park) => pb::OnMaxDeliveries::Park,
            } as i32,
        })
    }

    fn from_proto(s: Option<pb::GroupSettings>) -> Self {
        use pb::group_settings::Start as S;
        let s = s.unwrap_or_default();
        let (start, start_offset, start_time_ms) = match s.start {
            Some(S::Offset(o)) => (None, Some(o), None),
            Some(S::TimestampMs(t)) => (None, None, Some(t)),
            Some(S::Position(p)) if p == pb::StartPosition::Latest as i32 => {
                (Some(Start::Latest), None, None)
            }
            _ => (Some(Start::Earliest), None, None),
        };
        Self {
            mode: Some(match pb::GroupMode::try_from(s.mode) {
                Ok(pb::GroupMode::KeyShared) => GroupMode::KeyShared,
                _ => GroupMode::Partitioned,
            }),
            start,
            start_offset,
            start_time_ms,
            ack_wait_ms: Some(s.ack_wait_ms),
            max_deliveries: Some(s.max_deliveries),
            max_in_flight: Some(s.max_in_flight),
            max_in_flight_per_key: Some(s.max_in_flight_per_key),
            session_timeout_ms: Some(s.session_timeout_ms),
            on_max_deliveries: Some(match pb::OnMaxDeliveries::try_from(s.on_max_deliveries) {
                Ok(pb::OnMaxDeliveries::Park) => OnMaxDeliveries::Park,
                _ => OnMaxDeliveries::DeadLetter,
            }),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupMember {
    pub member_id: String,
    pub client: String,
    pub joined_at_ms: i64,
    pub partitions: Vec<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupPartition {
    pub partition: u32,
    pub member_id: Option<String>,
    pub epoch: u64,
    /// Every offset below is acknowledged (or dead-lettered).
    pub committed: u64,
    /// Acknowledged offsets above `committed`.
    pub acked_beyond: u64,
    pub high_watermark: u64,
    /// Messages not yet acknowledged.
    pub lag: u64,
    /// Lag in time: the age of the oldest unacknowledged message (0 when none).
    pub oldest_unacked_age_ms: u64,
    /// False when the partition's position could not be read.
    pub known: bool,
    /// Keys parked in this partition.
    pub parked_keys: u64,
    /// The group's isolation budget here.
    pub budget: LagBudget,
    /// Since when (ms) the group is detached here: past its budget, `ack` retention no longer
    /// waits for it. Absent: attached.
    pub detached_at_ms: Option<i64>,
}

/// How far behind a group may fall in a partition before it is detached. An absent limit is
/// no limit.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LagBudget {
    /// Most unacknowledged messages (at least 1).
    #[schema(minimum = 1)]
    pub max_messages: Option<u64>,
    /// Most unacknowledged bytes (at least 1).
    #[schema(minimum = 1)]
    pub max_bytes: Option<u64>,
    /// Oldest unacknowledged message's age (1 ms to a year).
    #[schema(minimum = 1, maximum = 31536000000_u64)]
    pub max_age_ms: Option<u64>,
}

impl LagBudget {
    pub fn from_proto(b: Option<pb::LagBudget>) -> Self {
        let b = b.unwrap_or_default();
        Self {
            max_messages: b.max_messages,
            max_bytes: b.max_bytes,
            max_age_ms: b.max_age_ms,
        }
    }

    pub fn into_proto(self) -> pb::LagBudget {
        pb::LagBudget {
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            max_age_ms: self.max_age_ms,
        }
    }
}

/// A new isolation budget for a group, in every partition (or one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    /// Most unacknowledged messages (at least 1).
    #[schema(minimum = 1)]
    pub max_messages: Option<u64>,
    /// Most unacknowledged bytes (at least 1).
    #[schema(minimum = 1)]
    pub max_bytes: Option<u64>,
    /// Oldest unacknowledged message's age (1 ms to a year).
    #[schema(minimum = 1, maximum = 31536000000_u64)]
    pub max_age_ms: Option<u64>,
    /// One partition only (absent: every partition).
    pub partition: Option<u32>,
}

impl SetBudget {
    pub fn budget(&self) -> LagBudget {
        LagBudget {
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            max_age_ms: self.max_age_ms,
        }
    }
}

/// Attach a detached group again, in every partition (or one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachGroup {
    /// One partition only (absent: every partition).
    pub partition: Option<u32>,
}

/// A group's isolation in one partition after a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionIsolation {
    pub partition: u32,
    pub budget: LagBudget,
    /// Since when the group is detached here (absent: attached).
    pub detached_at_ms: Option<i64>,
}

/// A group's isolation in the partitions a change applied to.
#[derive(Debug, Serialize, ToSchema)]
pub struct Isolation {
    pub partitions: Vec<PartitionIsolation>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Group {
    /// `tenant/name` of the station.
    pub station: String,
    pub group: String,
    pub settings: GroupSettings,
    pub generation: u64,
    pub created_at_ms: i64,
    pub members: Vec<GroupMember>,
    /// Filled when a group is described.
    pub partitions: Vec<GroupPartition>,
    /// Messages not yet acknowledged, over the partitions.
    pub lag: u64,
}

impl From<pb::GroupInfo> for Group {
    fn from(g: pb::GroupInfo) -> Self {
        let partitions: Vec<GroupPartition> = g
            .partitions
            .into_iter()
            .map(|p| GroupPartition {
                partition: p.partition,
                member_id: p.member_id,
                epoch: p.epoch,
                committed: p.committed,
                acked_beyond: p.acked_beyond,
                high_watermark: p.high_watermark,
                lag: p.lag,
                oldest_unacked_age_ms: p.oldest_unacked_age_ms,
                known: p.known,
                parked_keys: p.parked_keys,
                budget: LagBudget::from_proto(p.budget),
                detached_at_ms: p.detached_at_ms,
            })
            .collect();
        Self {
            station: g.station,
            group: g.group,
            settings: GroupSettings::from_proto(g.settings),
            generation: g.generation,
            created_at_ms: g.created_at_ms,
            members: g
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id,
                    client: m.client,
                    joined_at_ms: m.joined_at_ms,
                    partitions: m.partitions,
                })
                .collect(),
            lag: partitions.iter().map(|p| p.lag).sum(),
            partitions,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Groups {
    pub groups: Vec<Group>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub group: String,
    #[serde(default)]
    pub settings: GroupSettings,
}

/// Where to move a group: exactly one of `offset`, `time_ms` and `position`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Seek {
    /// Absent: every partition.
    #[serde(default)]
    pub partition: Option<u32>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub time_ms: Option<i64>,
    #[serde(default)]
    pub position: Option<Start>,
}

impl Seek {
    pub fn target(&self) -> Result<pb::seek_group_request::Target, Problem> {
        use pb::seek_group_request::Target as T;
        match (self.offset, self.time_ms, self.position) {
            (Some(o), None, None) => Ok(T::Offset(o)),
            (None, Some(t), None) => Ok(T::TimestampMs(t)),
            (None, None, Some(p)) => Ok(T::Position(match p {
                Start::Earliest => pb::StartPosition::Earliest,
                Start::Latest => pb::StartPosition::Latest,
            } as i32)),
            _ => Err(Problem::bad_request(
                "give exactly one of `offset`, `time_ms` and `position`",
            )),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneGroup {
    /// The new group's name.
    pub to: String,
}

// ---------------------------------------------------------------------------------------
// Dead letters

/// A message a group gave up on, as its station's dead-letter station keeps it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetter {
    /// Its offset in the dead-letter station (the handle for resending it).
    pub offset: u64,
    pub timestamp_ms: i64,
    /// The group that gave up (absent for a message the station's schema refused).
    pub group: Option<String>,
    /// Why: `max_deliveries`, `nacked`, a schema refusal…
    pub reason: Option<String>,
    /// Deliveries made before it was given up.
    pub deliveries: Option<u32>,
    /// Where it was: station, partition and offset.
    pub from_station: Option<String>,
    pub from_partition: Option<u32>,
    pub from_offset: Option<u64>,
    /// The message as it was produced (with the dead-letter headers).
    pub message: Message,
}

impl From<pb::StoredMessage> for DeadLetter {
    fn from(m: pb::StoredMessage) -> Self {
        use junction_broker::delivery::dls_headers as h;
        let header = |name: &str| {
            m.headers
                .iter()
                .find(|x| x.key == name)
                .map(|x| String::from_utf8_lossy(&x.value).into_owned())
        };
        Self {
            offset: m.offset,
            timestamp_ms: m.timestamp_ms,
            group: header(h::GROUP),
            reason: header(h::REASON),
            deliveries: header(h::DELIVERIES).and_then(|v| v.parse().ok()),
            from_station: header(h::STATION),
            from_partition: header(h::PARTITION).and_then(|v| v.parse().ok()),
            from_offset: header(h::OFFSET).and_then(|v| v.parse().ok()),
            message: Message::from(m),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetters {
    pub dead_letters: Vec<DeadLetter>,
    /// The dead-letter offset to list from next.
    pub next_offset: u64,
    /// How many the dead-letter station holds from `start_offset` on.
    pub high_watermark: u64,
    pub start_offset: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLettersQuery {
    /// First dead-letter offset (default: the earliest).
    pub from: Option<u64>,
    /// At most this many (default 100, at most 1000).
    pub max: Option<u32>,
}

/// Which dead letters to resend: offsets `from_offset` (inclusive) to `to_offset`
/// (exclusive); absent means from the start / to the end.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resend {
    /// Only this group's dead letters.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub from_offset: Option<u64>,
    #[serde(default)]
    pub to_offset: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Resent {
    pub resent: u64,
    /// The dead-letter offset after the last one examined.
    pub next_offset: u64,
}

/// An empty answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    pub ok: bool,
}

// ---------------------------------------------------------------------------------------
// Parked keys

/// A key the group parked, and the message that used up its deliveries.
#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedKey {
    pub partition: u32,
    pub key: String,
    pub key_encoding: Encoding,
    pub head_offset: u64,
    /// The head message (absent when it could not be read).
    pub head: Option<Message>,
}

impl From<pb::ParkedKey> for ParkedKey {
    fn from(k: pb::ParkedKey) -> Self {
        let (key, key_encoding) = encode_bytes(&k.key);
        Self {
            partition: k.partition,
            key,
            key_encoding,
            head_offset: k.head_offset,
            head: k.head.map(Message::from),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedKeys {
    pub keys: Vec<ParkedKey>,
}

/// Which parked key: `key` as text, or `key_base64`; `all` (resume only) for every parked key
/// of the partition.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParkedKeyAction {
    pub partition: u32,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_base64: Option<String>,
    #[serde(default)]
    pub all: bool,
}

impl ParkedKeyAction {
    /// The key's bytes (empty with `all`).
    pub fn key_bytes(&self) -> Result<Vec<u8>, Problem> {
        match (&self.key, &self.key_base64, self.all) {
            (Some(k), None, false) => Ok(k.clone().into_bytes()),
            (None, Some(b), false) => decode_base64("key_base64", b),
            (None, None, true) => Ok(Vec::new()),
            _ => Err(Problem::bad_request(
                "give exactly one of `key`, `key_base64` and `all`",
            )),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedDone {
    /// Keys the action applied to.
    pub keys: u32,
}
