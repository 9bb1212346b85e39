//! The one table from broker errors to gRPC statuses.

use std::collections::HashMap;

use junction_broker::BrokerError;
use junction_types::MetaError;
use junction_types::auth::AuthError;
use junction_types::exactly_once::AppendReject;
use junction_types::reconfig::RemovalError;
use junction_types::schema::SchemaRegistryError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo` domain of Junction's errors.
pub const ERROR_DOMAIN: &str = "junction.dev";
/// `ErrorInfo` reason when a call reached a node that does not lead the group.
pub const REASON_NOT_LEADER: &str = "NOT_LEADER";
/// `ErrorInfo` reason when a consumer group member acted on an assignment it lost.
pub const REASON_FENCED: &str = "FENCED";

/// `ErrorInfo` reason: a producer batch's sequence is not the next one (metadata
/// `expected_sequence`).
pub const REASON_OUT_OF_ORDER_SEQUENCE: &str = "OUT_OF_ORDER_SEQUENCE";
/// `ErrorInfo` reason: the partition has no state for the producer (expired, or never seen).
pub const REASON_UNKNOWN_PRODUCER: &str = "UNKNOWN_PRODUCER";
/// `ErrorInfo` reason: the batch was stored, but too long ago for its positions to be known.
pub const REASON_DUPLICATE_SEQUENCE: &str = "DUPLICATE_SEQUENCE";
/// `ErrorInfo` reason: a producer's sequence number would overflow.
pub const REASON_SEQUENCE_OVERFLOW: &str = "SEQUENCE_OVERFLOW";
/// `ErrorInfo` reason: a stored record failed its checksum on the node that read it (another
/// replica may still hold it intact).
pub const REASON_CORRUPT_RECORD: &str = "CORRUPT_RECORD";
/// A replica that could not open because its stored bytes are corrupt; it is being
/// fetched again (retry).
pub const REASON_CORRUPT_REPLICA: &str = "CORRUPT_REPLICA";
/// `ErrorInfo` reason: the partition's dedup window holds its maximum of ids.
pub const REASON_DEDUP_WINDOW_FULL: &str = "DEDUP_WINDOW_FULL";
/// `ErrorInfo` reason: a producer id used with another tenant's station.
pub const REASON_PRODUCER_TENANT: &str = "PRODUCER_TENANT_MISMATCH";

/// `ErrorInfo` reason: a message over its station's size limit (metadata `size`, `max`).
pub const REASON_MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";
/// `ErrorInfo` reason: an ack, nack or progress report of a delivery that is no longer out
/// (redelivered, finished, or given to another member); final for that receipt.
pub const REASON_STALE_RECEIPT: &str = "STALE_RECEIPT";

/// `ErrorInfo` reason: a resume or skip of a key that is not parked.
pub const REASON_NOT_PARKED: &str = "NOT_PARKED";

/// `ErrorInfo` reason: the call carried no credential.
pub const REASON_MISSING_CREDENTIAL: &str = "MISSING_CREDENTIAL";
/// `ErrorInfo` reason: the credential is not a well-formed token.
pub const REASON_MALFORMED_CREDENTIAL: &str = "MALFORMED_CREDENTIAL";
/// `ErrorInfo` reason: unknown key or wrong secret.
pub const REASON_INVALID_CREDENTIAL: &str = "INVALID_CREDENTIAL";
/// `ErrorInfo` reason: the API key expired.
pub const REASON_EXPIRED_CREDENTIAL: &str = "EXPIRED_CREDENTIAL";
/// `ErrorInfo` reason: the API key was revoked.
pub const REASON_REVOKED_CREDENTIAL: &str = "REVOKED_CREDENTIAL";
/// `ErrorInfo` reason: the caller's role does not include the operation (metadata
/// `operation`, `role`).
pub const REASON_PERMISSION_DENIED: &str = "PERMISSION_DENIED";

/// `ErrorInfo` reason: over a rate quota; retryable, with a `RetryInfo` saying when (metadata
/// `tenant`, `quota`, `limit`, and `station` for a station's own limit).
pub const REASON_THROTTLED: &str = "THROTTLED";
/// `ErrorInfo` reason: at a quota waiting does not lift (stored bytes, streams, stations,
/// groups); final until data is freed or the quota raised (metadata `tenant`, `quota`,
/// `limit`, `used`).
pub const REASON_QUOTA_EXCEEDED: &str = "QUOTA_EXCEEDED";
/// `ErrorInfo` reason: a quota change that cannot be applied (a limit of 0, an unknown name).
pub const REASON_INVALID_QUOTA: &str = "INVALID_QUOTA";

/// `ErrorInfo` reason: a schema that does not compile or exceeds a limit.
pub const REASON_INVALID_SCHEMA: &str = "INVALID_SCHEMA";
/// `ErrorInfo` reason: a schema version incompatible with earlier ones (metadata `mode`,
/// `violations`: how many).
pub const REASON_INCOMPATIBLE_SCHEMA: &str = "INCOMPATIBLE_SCHEMA";
/// `ErrorInfo` reason: no such schema or schema version.
pub const REASON_SCHEMA_NOT_FOUND: &str = "SCHEMA_NOT_FOUND";
/// `ErrorInfo` reason: a schema (version) a station uses cannot be deleted.
pub const REASON_SCHEMA_IN_USE: &str = "SCHEMA_IN_USE";
/// `ErrorInfo` reason: another version was registered meanwhile; retry.
pub const REASON_SCHEMA_CONFLICT: &str = "SCHEMA_CONFLICT";
/// `ErrorInfo` reason: a request about schemas that cannot be acted on (a bad name, a
/// different type for an existing schema, an unknown mode or policy).
pub const REASON_BAD_SCHEMA_REQUEST: &str = "BAD_SCHEMA_REQUEST";
/// `ErrorInfo` reason: a produced message its station's schema refuses (metadata `schema`,
/// `index`, `path`, `rule`).
pub const REASON_INVALID_MESSAGE: &str = "INVALID_MESSAGE";

/// Returns the gRPC code of an error.
pub fn code_of(e: &BrokerError) -> Code {
    match e {
        BrokerError::InvalidName(_)
        | BrokerError::InvalidArgument(_)
        | BrokerError::MessageTooLarge { .. }
        | BrokerError::PartitionOutOfRange { .. } => Code::InvalidArgument,
        BrokerError::Meta(
            MetaError::TenantExists { .. }
            | MetaError::StationExists { .. }
            | MetaError::GroupExists { .. }
            | MetaError::KeyExists { .. },
        ) => Code::AlreadyExists,
        BrokerError::Meta(MetaError::QuotaExceeded { .. })
        | BrokerError::Throttled { .. }
        | BrokerError::QuotaExceeded { .. } => Code::ResourceExhausted,
        BrokerError::Meta(MetaError::InvalidQuota(_)) => Code::InvalidArgument,
        BrokerError::Meta(MetaError::Schema(e)) => match e {
            SchemaRegistryError::NotFound { .. } | SchemaRegistryError::VersionNotFound { .. } => {
                Code::NotFound
            }
            SchemaRegistryError::InUse { .. } => Code::FailedPrecondition,
            SchemaRegistryError::Conflict { .. } => Code::Aborted,
            SchemaRegistryError::TooManyVersions { .. } => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        },
        BrokerError::InvalidSchema(_) | BrokerError::InvalidMessage(_) => Code::InvalidArgument,
        BrokerError::IncompatibleSchema { .. } => Code::FailedPrecondition,
        BrokerError::Fenced(_) | BrokerError::StaleReceipt(_) | BrokerError::NotParked(_) => {
            Code::FailedPrecondition
        }
        BrokerError::MemberNotFound { .. } => Code::NotFound,
        BrokerError::Meta(_) | BrokerError::StationNotFound(_) => Code::NotFound,
        BrokerError::TooFewNodes { .. } => Code::FailedPrecondition,
        BrokerError::Removal(RemovalError::NotMember { .. }) => Code::NotFound,
        BrokerError::Removal(RemovalError::TooFew { .. }) => Code::FailedPrecondition,
        BrokerError::NotLeader { .. }
        | BrokerError::NotHosted { .. }
        | BrokerError::Unavailable(_) => Code::Unavailable,
        BrokerError::Raft(_) => Code::Unavailable,
        BrokerError::Storage(_) => Code::Internal,
        BrokerError::CorruptRecord { .. } => Code::DataLoss,
        BrokerError::CorruptReplica { .. } => Code::Unavailable,
        BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
        BrokerError::Unimplemented(_) => Code::Unimplemented,
        BrokerError::Produce(r) => match r {
            AppendReject::Fenced { .. } | AppendReject::UnknownProducer { .. } => {
                Code::FailedPrecondition
            }
            AppendReject::OutOfOrderSequence { .. } => Code::OutOfRange,
            AppendReject::DuplicateSequence { .. } => Code::AlreadyExists,
            AppendReject::SequenceOverflow { .. } => Code::InvalidArgument,
            AppendReject::DedupFull { .. } => Code::ResourceExhausted,
        },
        BrokerError::UnknownProducerId(_) => Code::FailedPrecondition,
        BrokerError::ProducerTenant { .. } => Code::PermissionDenied,
        BrokerError::Auth(a) => match a {
            AuthError::Missing
            | AuthError::Malformed(_)
            | AuthError::Invalid
            | AuthError::Expired { .. }
            | AuthError::Revoked { .. }
            | AuthError::TokenRejected(_)
            | AuthError::TokenExpired => Code::Unauthenticated,
            AuthError::Denied { .. } => Code::PermissionDenied,
            AuthError::InvalidRole(_) => Code::InvalidArgument,
            AuthError::KeyNotFound { .. } => Code::NotFound,
            AuthError::KeyExists { .. } => Code::AlreadyExists,
        },
        _ => Code::Internal,
    }
}

/// The `ErrorInfo` reason and metadata of an error that carries one.
fn error_info(e: &BrokerError) -> Option<(&'static str, HashMap<String, String>)> {
    let none = HashMap::new;
    Some(match e {
        BrokerError::NotLeader {
            leader: Some((id, addr)),
            ..
        } => (
            REASON_NOT_LEADER,
            HashMap::from([
                ("leader_addr".to_string(), addr.clone()),
                ("leader_id".to_string(), id.to_string()),
            ]),
        ),
        BrokerError::Fenced(_) => (REASON_FENCED, none()),
        BrokerError::StaleReceipt(_) => (REASON_STALE_RECEIPT, none()),
        BrokerError::NotParked(_) => (REASON_NOT_PARKED, none()),
        BrokerError::MessageTooLarge { size, max } => (
            REASON_MESSAGE_TOO_LARGE,
            HashMap::from([
                ("size".to_string(), size.to_string()),
                ("max".to_string(), max.to_string()),
            ]),
        ),
        BrokerError::Throttled {
            tenant,
            station,
            what,
            limit,
            ..
        } => (
            REASON_THROTTLED,
            quota_meta(tenant, station.as_deref(), *what, *limit, None),
        ),
        BrokerError::QuotaExceeded {
            tenant,
            station,
            what,
            limit,
            used,
        } => (
            REASON_QUOTA_EXCEEDED,
            quota_meta(tenant, station.as_deref(), *what, *limit, Some(*used)),
        ),
        BrokerError::Meta(MetaError::QuotaExceeded {
            tenant,
            what,
            limit,
            used,
        }) => (
            REASON_QUOTA_EXCEEDED,
            quota_meta(tenant, None, *what, *limit, Some(*used)),
        ),
        BrokerError::Meta(MetaError::InvalidQuota(_)) => (REASON_INVALID_QUOTA, none()),
        BrokerError::Meta(MetaError::Schema(e)) => (
            match e {
                SchemaRegistryError::NotFound { .. }
                | SchemaRegistryError::VersionNotFound { .. } => REASON_SCHEMA_NOT_FOUND,
                SchemaRegistryError::InUse { .. } => REASON_SCHEMA_IN_USE,
                SchemaRegistryError::Conflict { .. } => REASON_SCHEMA_CONFLICT,
                SchemaRegistryError::TooManyVersions { .. } => REASON_QUOTA_EXCEEDED,
                _ => REASON_BAD_SCHEMA_REQUEST,
            },
            none(),
        ),
        BrokerError::InvalidSchema(_) => (REASON_INVALID_SCHEMA, none()),
        BrokerError::IncompatibleSchema {
            mode, violations, ..
        } => (
            REASON_INCOMPATIBLE_SCHEMA,
            HashMap::from([
                ("mode".to_string(), mode.to_string()),
                ("violations".to_string(), violations.len().to_string()),
            ]),
        ),
        BrokerError::InvalidMessage(m) => (
            REASON_INVALID_MESSAGE,
            HashMap::from([
                ("schema".to_string(), m.schema.clone()),
                ("index".to_string(), m.index.to_string()),
                ("path".to_string(), m.path.clone()),
                ("rule".to_string(), m.rule.clone()),
            ]),
        ),
        BrokerError::Produce(r) => match r {
            AppendReject::Fenced { current, .. } => (
                REASON_FENCED,
                HashMap::from([("current_epoch".to_string(), current.to_string())]),
            ),
            AppendReject::OutOfOrderSequence { expected, .. } => (
                REASON_OUT_OF_ORDER_SEQUENCE,
                HashMap::from([("expected_sequence".to_string(), expected.to_string())]),
            ),
            AppendReject::UnknownProducer { .. } => (REASON_UNKNOWN_PRODUCER, none()),
            AppendReject::DuplicateSequence { expected, .. } => (
                REASON_DUPLICATE_SEQUENCE,
                HashMap::from([("expected_sequence".to_string(), expected.to_string())]),
            ),
            AppendReject::SequenceOverflow { .. } => (REASON_SEQUENCE_OVERFLOW, none()),
            AppendReject::DedupFull { .. } => (REASON_DEDUP_WINDOW_FULL, none()),
        },
        BrokerError::CorruptReplica { group, .. } => (
            REASON_CORRUPT_REPLICA,
            HashMap::from([("group".to_string(), group.to_string())]),
        ),
        BrokerError::CorruptRecord { node, offset, .. } => (
            REASON_CORRUPT_RECORD,
            HashMap::from([
                ("node".to_string(), node.to_string()),
                ("offset".to_string(), offset.to_string()),
            ]),
        ),
        BrokerError::UnknownProducerId(_) => (REASON_UNKNOWN_PRODUCER, none()),
        BrokerError::ProducerTenant { .. } => (REASON_PRODUCER_TENANT, none()),
        BrokerError::Auth(a) => match a {
            AuthError::Missing => (REASON_MISSING_CREDENTIAL, none()),
            AuthError::Malformed(_) => (REASON_MALFORMED_CREDENTIAL, none()),
            AuthError::Invalid => (REASON_INVALID_CREDENTIAL, none()),
            AuthError::Expired { .. } | AuthError::TokenExpired => {
                (REASON_EXPIRED_CREDENTIAL, none())
            }
            AuthError::TokenRejected(_) => (REASON_INVALID_CREDENTIAL, none()),
            AuthError::Revoked { .. } => (REASON_REVOKED_CREDENTIAL, none()),
            AuthError::Denied {
                operation, role, ..
            } => (
                REASON_PERMISSION_DENIED,
                HashMap::from([
                    ("operation".to_string(), operation.to_string()),
                    ("role".to_string(), role.to_string()),
                ]),
            ),
            _ => return None,
        },
        _ => return None,
    })
}

fn quota_meta(
    tenant: &str,
    station: Option<&str>,
    what: junction_types::quota::QuotaField,
    limit: u64,
    used: Option<u64>,
) -> HashMap<String, String> {
    let mut m = HashMap::from([
        ("tenant".to_string(), tenant.to_string()),
        ("quota".to_string(), what.as_str().to_string()),
        ("limit".to_string(), limit.to_string()),
    ]);
    if let Some(s) = station {
        m.insert("station".to_string(), s.to_string());
    }
    if let Some(u) = used {
        m.insert("used".to_string(), u.to_string());
    }
    m
}

/// How long a throttled caller should wait, for the `RetryInfo` detail.
fn retry_after(e: &BrokerError) -> Option<std::time::Duration> {
    match e {
        BrokerError::Throttled { retry_after_ms, .. } => {
            Some(std::time::Duration::from_millis(*retry_after_ms))
        }
        _ => None,
    }
}

/// Converts an error to a status; errors a client acts on carry an `ErrorInfo` with a stable
/// reason (a not-leader error names the leader), and a throttled call a `RetryInfo`.
pub fn to_status(e: BrokerError) -> Status {
    let code = code_of(&e);
    let message = e.to_string();
    let retry = retry_after(&e);
    match error_info(&e) {
        Some((reason, meta)) => {
            let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, meta);
            if let Some(delay) = retry {
                details.set_retry_info(Some(delay));
            }
            Status::with_error_details(code, message, details)
        }
        None => Status::new(code, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_the_table() {
        let name_err = junction_types::StationName::parse("a b").unwrap_err();
        let rows: Vec<(BrokerError, Code)> = vec![
            (BrokerError::InvalidName(name_err), Code::InvalidArgument),
            (
                BrokerError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                BrokerError::MessageTooLarge { size: 2, max: 1 },
                Code::InvalidArgument,
            ),
            (
                BrokerError::PartitionOutOfRange {
                    station: "s".into(),
                    partition: 5,
                    partitions: 2,
                },
                Code::InvalidArgument,
            ),
            (
                BrokerError::Meta(MetaError::StationExists {
                    station: "s".into(),
                }),
                Code::AlreadyExists,
            ),
            (
                BrokerError::Meta(MetaError::TenantExists { tenant: "t".into() }),
                Code::AlreadyExists,
            ),
            (
                BrokerError::Meta(MetaError::TenantNotFound { tenant: "t".into() }),
                Code::NotFound,
            ),
            (BrokerError::StationNotFound("s".into()), Code::NotFound),
            (
                BrokerError::TooFewNodes {
                    requested: 5,
                    live: 3,
                    members: 3,
                },
                Code::FailedPrecondition,
            ),
            (
                BrokerError::NotLeader {
                    node: 1,
                    group: 2,
                    leader: None,
                },
                Code::Unavailable,
            ),
            (
                BrokerError::NotHosted { node: 1, group: 2 },
                Code::Unavailable,
            ),
            (BrokerError::Unavailable("x".into()), Code::Unavailable),
            (BrokerError::Raft("x".into()), Code::Unavailable),
            (
                BrokerError::ResourceExhausted("full".into()),
                Code::ResourceExhausted,
            ),
            (
                BrokerError::Unimplemented("later".into()),
                Code::Unimplemented,
            ),
            (
                BrokerError::Meta(MetaError::InvalidQuota(
                    junction_types::quota::QuotaError::Empty,
                )),
                Code::InvalidArgument,
            ),
        ];
        for (e, code) in rows {
            assert_eq!(to_status(e).code(), code);
        }
    }

    #[test]
    fn schema_errors_have_their_codes_and_reasons() {
        use junction_broker::schemas::InvalidMessage;
        use junction_types::schema::Compatibility;
        let registry = |e: SchemaRegistryError| BrokerError::Meta(MetaError::Schema(e));
        let rows: Vec<(BrokerError, Code, &str)> = vec![
            (
                BrokerError::InvalidSchema("does not parse".into()),
                Code::InvalidArgument,
                REASON_INVALID_SCHEMA,
            ),
            (
                BrokerError::IncompatibleSchema {
                    name: "orders".into(),
                    mode: Compatibility::Backward,
                    violations: vec!["FIELD_TYPE_CHANGED".into()],
                },
                Code::FailedPrecondition,
                REASON_INCOMPATIBLE_SCHEMA,
            ),
            (
                BrokerError::InvalidMessage(InvalidMessage {
                    schema: "orders@1".into(),
                    index: 3,
                    path: "/id".into(),
                    rule: "not an integer".into(),
                }),
                Code::InvalidArgument,
                REASON_INVALID_MESSAGE,
            ),
            (
                registry(SchemaRegistryError::NotFound {
                    tenant: "t".into(),
                    name: "n".into(),
                }),
                Code::NotFound,
                REASON_SCHEMA_NOT_FOUND,
            ),
            (
                registry(SchemaRegistryError::InUse {
                    name: "n".into(),
                    what: "version 1".into(),
                    stations: "t/s".into(),
                }),
                Code::FailedPrecondition,
                REASON_SCHEMA_IN_USE,
            ),
            (
                registry(SchemaRegistryError::Conflict {
                    name: "n".into(),
                    latest: Some(2),
                }),
                Code::Aborted,
                REASON_SCHEMA_CONFLICT,
            ),
            (
                registry(SchemaRegistryError::UnknownType { name: "xml".into() }),
                Code::InvalidArgument,
                REASON_BAD_SCHEMA_REQUEST,
            ),
        ];
        for (e, code, reason) in rows {
            let s = to_status(e);
            assert_eq!(s.code(), code, "{s:?}");
            assert_eq!(s.get_details_error_info().expect("info").reason, reason);
        }
        let s = to_status(BrokerError::InvalidMessage(InvalidMessage {
            schema: "orders@1".into(),
            index: 3,
            path: "/id".into(),
            rule: "not an integer".into(),
        }));
        assert_eq!(
            s.message(),
            "message 3 is not valid for schema orders@1: /id: not an integer"
        );
        let info = s.get_details_error_info().expect("info");
        assert_eq!(info.metadata["index"], "3");
        assert_eq!(info.metadata["path"], "/id");
    }

    #[test]
    fn quota_refusals_carry_their_reason_and_a_throttle_its_wait() {
        use junction_types::quota::QuotaField;
        let throttled = to_status(BrokerError::Throttled {
            tenant: "acme".into(),
            station: Some("orders".into()),
            what: QuotaField::ProduceBytesPerSec,
            limit: 1000,
            retry_after_ms: 250,
        });
        assert_eq!(throttled.code(), Code::ResourceExhausted);
        let info = throttled.get_details_error_info().expect("error info");
        assert_eq!(info.reason, REASON_THROTTLED);
        assert_eq!(info.metadata["quota"], "produce-bytes-per-sec");
        assert_eq!(info.metadata["station"], "orders");
        let retry = throttled.get_details_retry_info().expect("retry info");
        assert_eq!(
            retry.retry_delay,
            Some(std::time::Duration::from_millis(250))
        );
        let full = to_status(BrokerError::QuotaExceeded {
            tenant: "acme".into(),
            station: None,
            what: QuotaField::StoredBytes,
            limit: 10,
            used: 12,
        });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.get_details_error_info().map(|i| i.reason),
            Some(REASON_QUOTA_EXCEEDED.to_string())
        );
        assert!(
            full.get_details_retry_info().is_none(),
            "final, not retried"
        );
        let count = to_status(BrokerError::Meta(MetaError::QuotaExceeded {
            tenant: "acme".into(),
            what: QuotaField::Stations,
            limit: 1,
            used: 1,
        }));
        assert_eq!(count.code(), Code::ResourceExhausted);
        assert_eq!(
            count
                .get_details_error_info()
                .map(|i| i.metadata["quota"].clone()),
            Some("stations".to_string())
        );
    }

    #[test]
    fn producer_errors_carry_stable_reasons_and_fatal_never_shares_a_retryable_code() {
        let rows: Vec<(BrokerError, Code, &str)> = vec![
            (
                BrokerError::Produce(AppendReject::Fenced {
                    id: 1,
                    epoch: 0,
                    current: 2,
                }),
                Code::FailedPrecondition,
                REASON_FENCED,
            ),
            (
                BrokerError::Produce(AppendReject::OutOfOrderSequence {
                    id: 1,
                    got: 9,
                    expected: 4,
                }),
                Code::OutOfRange,
                REASON_OUT_OF_ORDER_SEQUENCE,
            ),
            (
                BrokerError::Produce(AppendReject::UnknownProducer { id: 1, got: 3 }),
                Code::FailedPrecondition,
                REASON_UNKNOWN_PRODUCER,
            ),
            (
                BrokerError::Produce(AppendReject::DuplicateSequence {
                    id: 1,
                    got: 0,
                    expected: 40,
                }),
                Code::AlreadyExists,
                REASON_DUPLICATE_SEQUENCE,
            ),
            (
                BrokerError::Produce(AppendReject::SequenceOverflow {
                    id: 1,
                    got: u64::MAX,
                    count: 2,
                }),
                Code::InvalidArgument,
                REASON_SEQUENCE_OVERFLOW,
            ),
            (
                BrokerError::Produce(AppendReject::DedupFull { max_ids: 5 }),
                Code::ResourceExhausted,
                REASON_DEDUP_WINDOW_FULL,
            ),
            (
                BrokerError::UnknownProducerId(7),
                Code::FailedPrecondition,
                REASON_UNKNOWN_PRODUCER,
            ),
            (
                BrokerError::ProducerTenant {
                    id: 7,
                    tenant: "a".into(),
                    owner: "b".into(),
                },
                Code::PermissionDenied,
                REASON_PRODUCER_TENANT,
            ),
        ];
        let auth_rows: Vec<(BrokerError, Code, &str)> = vec![
            (
                BrokerError::Auth(AuthError::Missing),
                Code::Unauthenticated,
                REASON_MISSING_CREDENTIAL,
            ),
            (
                BrokerError::Auth(AuthError::Malformed("x".into())),
                Code::Unauthenticated,
                REASON_MALFORMED_CREDENTIAL,
            ),
            (
                BrokerError::Auth(AuthError::Invalid),
                Code::Unauthenticated,
                REASON_INVALID_CREDENTIAL,
            ),
            (
                BrokerError::Auth(AuthError::Expired { id: "k".into() }),
                Code::Unauthenticated,
                REASON_EXPIRED_CREDENTIAL,
            ),
            (
                BrokerError::Auth(AuthError::Revoked { id: "k".into() }),
                Code::Unauthenticated,
                REASON_REVOKED_CREDENTIAL,
            ),
            (
                BrokerError::Auth(AuthError::Denied {
                    tenant: "t".into(),
                    role: junction_types::auth::Role::Reader,
                    operation: junction_types::auth::Operation::Produce,
                    station_prefix: None,
                }),
                Code::PermissionDenied,
                REASON_PERMISSION_DENIED,
            ),
        ];
        for (e, code, reason) in rows.into_iter().chain(auth_rows) {
            let s = to_status(e);
            assert_eq!(s.code(), code);
            assert_ne!(s.code(), Code::Unavailable);
            assert_eq!(s.get_details_error_info().unwrap().reason, reason);
        }
        let s = to_status(BrokerError::Produce(AppendReject::OutOfOrderSequence {
            id: 1,
            got: 9,
            expected: 4,
        }));
        assert_eq!(
            s.get_details_error_info()
                .unwrap()
                .metadata
                .get("expected_sequence")
                .map(String::as_str),
            Some("4")
        );
    }

    #[test]
    fn not_leader_carries_the_leader_address() {
        let s = to_status(BrokerError::NotLeader {
            node: 1,
            group: 0,
            leader: Some((2, "h:2".into())),
        });
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, REASON_NOT_LEADER);
        assert_eq!(
            info.metadata.get("leader_addr").map(String::as_str),
            Some("h:2")
        );
    }
}
