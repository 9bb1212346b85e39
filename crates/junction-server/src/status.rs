//! The one table from broker errors to gRPC statuses.

use std::collections::HashMap;

use junction_broker::BrokerError;
use junction_types::MetaError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo` domain of Junction's errors.
pub const ERROR_DOMAIN: &str = "junction.dev";
/// `ErrorInfo` reason when a call reached a node that does not lead the group.
pub const REASON_NOT_LEADER: &str = "NOT_LEADER";
/// `ErrorInfo` reason when a consumer group member acted on an assignment it lost.
pub const REASON_FENCED: &str = "FENCED";

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
            | MetaError::GroupExists { .. },
        ) => Code::AlreadyExists,
        BrokerError::Fenced(_) => Code::FailedPrecondition,
        BrokerError::MemberNotFound { .. } => Code::NotFound,
        BrokerError::Meta(_) | BrokerError::StationNotFound(_) => Code::NotFound,
        BrokerError::TooFewNodes { .. } => Code::FailedPrecondition,
        BrokerError::NotLeader { .. }
        | BrokerError::NotHosted { .. }
        | BrokerError::Unavailable(_) => Code::Unavailable,
        BrokerError::Raft(_) => Code::Unavailable,
        BrokerError::Storage(_) => Code::Internal,
        BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
        BrokerError::Unimplemented(_) => Code::Unimplemented,
        _ => Code::Internal,
    }
}

/// Converts an error to a status; a not-leader error carries the leader in `ErrorInfo`.
pub fn to_status(e: BrokerError) -> Status {
    let code = code_of(&e);
    let message = e.to_string();
    if let BrokerError::NotLeader {
        leader: Some((id, addr)),
        ..
    } = &e
    {
        let meta = HashMap::from([
            ("leader_addr".to_string(), addr.clone()),
            ("leader_id".to_string(), id.to_string()),
        ]);
        return Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(REASON_NOT_LEADER, ERROR_DOMAIN, meta),
        );
    }
    if let BrokerError::Fenced(_) = &e {
        return Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(REASON_FENCED, ERROR_DOMAIN, HashMap::new()),
        );
    }
    Status::new(code, message)
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
        ];
        for (e, code) in rows {
            assert_eq!(to_status(e).code(), code);
        }
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
