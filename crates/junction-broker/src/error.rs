//! The broker's error type. The server maps each variant to one gRPC status.

use junction_types::{GroupId, MetaError, NameError, NodeId};

/// Everything a broker operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidArgument(String),
    /// A node cannot be removed (not a member, or too few would be left).
    #[error(transparent)]
    Removal(#[from] junction_types::reconfig::RemovalError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("station '{0}' does not exist")]
    StationNotFound(String),
    #[error(
        "partition {partition} is out of range: station '{station}' has {partitions} partitions (0..{partitions})"
    )]
    PartitionOutOfRange {
        station: String,
        partition: u32,
        partitions: u32,
    },
    #[error(
        "replication factor {requested} needs {requested} live nodes, but only {live} of {members} nodes are reachable"
    )]
    TooFewNodes {
        requested: u32,
        live: usize,
        members: usize,
    },
    #[error("message of {size} bytes exceeds the station's limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    /// Not the leader of the group; retry on `leader` (when known).
    #[error("node {node} is not the leader of group {group}{}", leader_hint(.leader))]
    NotLeader {
        node: NodeId,
        group: GroupId,
        leader: Option<(NodeId, String)>,
    },
    /// This node does not host the group (yet, or any more).
    #[error("group {group} is not hosted on node {node}")]
    NotHosted { node: NodeId, group: GroupId },
    /// Transient: no leader, raft shutting down, peer unreachable, outcome unknown.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] junction_storage::StorageError),
    /// A stored record on this node failed its checksum (see `junction_raft::decode_record`).
    #[error("partition {partition} offset {offset} is corrupt on node {node}: {detail}")]
    CorruptRecord {
        node: u64,
        partition: u32,
        offset: u64,
        detail: String,
    },
    /// This node's replica of a group holds bytes that fail their checksum, so it cannot
    /// open; it is wiped and fetched again from the other replicas.
    #[error("the replica of group {group} on this node is corrupt: {detail}")]
    CorruptReplica { group: GroupId, detail: String },
    #[error("raft failed: {0}")]
    Raft(String),
    /// A consumer group member acted on an assignment it no longer holds.
    #[error("fenced: {0}")]
    Fenced(String),
    /// An operator's resume or skip of a key that is not parked.
    #[error("{0}")]
    NotParked(String),
    /// An ack, nack or progress report of a pulled delivery that is no longer out to the
    /// member (redelivered, finished, given to another member, or its leader changed).
    #[error("stale receipt: {0}")]
    StaleReceipt(String),
    /// A heartbeat from a member the group does not have (its session expired).
    #[error(
        "member '{member}' is not in consumer group '{group}' (its session expired?); join again"
    )]
    MemberNotFound { group: String, member: String },
    /// A limit refuses the request (`discard: new` station full, memory limit reached).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The partition refused a produce batch (producer sequence, fencing, dedup window).
    #[error(transparent)]
    Produce(#[from] junction_types::exactly_once::AppendReject),
    /// A producer id used with a station of another tenant.
    #[error(
        "producer {id} belongs to tenant '{owner}', not '{tenant}': initialise a producer for tenant '{tenant}'"
    )]
    ProducerTenant {
        id: u64,
        tenant: String,
        owner: String,
    },
    /// A producer id the cluster never handed out.
    #[error("producer id {0} was never handed out by this cluster: call InitProducer first")]
    UnknownProducerId(u64),
    /// A credential was missing or refused, or the caller may not do this.
    #[error(transparent)]
    Auth(#[from] junction_types::auth::AuthError),
    /// Over a rate quota: retry after the wait.
    #[error(
        "tenant '{tenant}'{} is over its {what} quota of {limit}; retry in {retry_after_ms} ms",
        station_hint(.station)
    )]
    Throttled {
        tenant: String,
        station: Option<String>,
        what: junction_types::quota::QuotaField,
        limit: u64,
        retry_after_ms: u64,
    },
    /// At a quota waiting does not lift (stored bytes, open streams).
    #[error(
        "tenant '{tenant}'{} holds {used} of its {limit} {what}: {}",
        station_hint(.station),
        exceeded_hint(*.what)
    )]
    QuotaExceeded {
        tenant: String,
        station: Option<String>,
        what: junction_types::quota::QuotaField,
        limit: u64,
        used: u64,
    },
    /// A schema that does not compile (or exceeds a limit).
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    /// A schema version that may not follow the earlier ones under the schema's mode.
    #[error(
        "the new version of schema '{name}' is not {mode} compatible: {}",
        .violations.join("; ")
    )]
    IncompatibleSchema {
        name: String,
        mode: junction_types::schema::Compatibility,
        violations: Vec<String>,
    },
    /// A produced message that its station's schema refuses.
    #[error("{0}")]
    InvalidMessage(crate::schemas::InvalidMessage),
    /// The feature exists in the API but this build does not provide it.
    #[error("{0}")]
    Unimplemented(String),
}

impl BrokerError {
    /// A copy for one more receiver of the same failure (the error type is not `Clone`
    /// because storage errors are not).
    pub fn for_subscriber(&self) -> BrokerError {
        match self {
            BrokerError::Fenced(s) => BrokerError::Fenced(s.clone()),
            BrokerError::NotLeader {
                node,
                group,
                leader,
            } => BrokerError::NotLeader {
                node: *node,
                group: *group,
                leader: leader.clone(),
            },
            BrokerError::Meta(m) => BrokerError::Meta(m.clone()),
            BrokerError::Produce(r) => BrokerError::Produce(r.clone()),
            BrokerError::Auth(a) => BrokerError::Auth(a.clone()),
            BrokerError::Throttled {
                tenant,
                station,
                what,
                limit,
                retry_after_ms,
            } => BrokerError::Throttled {
                tenant: tenant.clone(),
                station: station.clone(),
                what: *what,
                limit: *limit,
                retry_after_ms: *retry_after_ms,
            },
            BrokerError::QuotaExceeded {
                tenant,
                station,
                what,
                limit,
                used,
            } => BrokerError::QuotaExceeded {
                tenant: tenant.clone(),
                station: station.clone(),
                what: *what,
                limit: *limit,
                used: *used,
            },
            BrokerError::MemberNotFound { group, member } => BrokerError::MemberNotFound {
                group: group.clone(),
                member: member.clone(),
            },
            other => BrokerError::Unavailable(other.to_string()),
        }
    }
}

fn station_hint(station: &Option<String>) -> String {
    station
        .as_ref()
        .map(|s| format!(" (station '{s}')"))
        .unwrap_or_default()
}

fn exceeded_hint(what: junction_types::quota::QuotaField) -> &'static str {
    use junction_types::quota::QuotaField;
    match what {
        QuotaField::StoredBytes => {
            "produces are refused until retention or deleting data frees space, or a cluster admin raises the quota"
        }
        QuotaField::Streams => {
            "close a stream (on this node) or ask a cluster admin to raise the quota"
        }
        _ => "ask a cluster admin to raise the quota",
    }
}

fn leader_hint(leader: &Option<(NodeId, String)>) -> String {
    match leader {
        Some((id, addr)) => format!("; the leader is node {id} at {addr}"),
        None => "; no leader is known yet".to_string(),
    }
}

impl From<std::io::Error> for BrokerError {
    fn from(e: std::io::Error) -> Self {
        BrokerError::Raft(e.to_string())
    }
}
