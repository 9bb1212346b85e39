//! Station policy between its wire form and the metadata form.

use junction_proto::v1 as pb;
use junction_types::policy::DEFAULT_TOMBSTONE_DELAY_MS;
use junction_types::{CompactionPolicy, DiscardPolicy, Retention, StationPolicy, StorageTier};
use tonic::Status;

fn enum_value<T>(what: &str, v: i32, decode: impl Fn(i32) -> Option<T>) -> Result<T, Status> {
    decode(v).ok_or_else(|| Status::invalid_argument(format!("unknown {what} value {v}")))
}

/// Converts a request's policy; `None` means every default.
pub fn from_proto(p: Option<&pb::StationPolicy>) -> Result<StationPolicy, Status> {
    let Some(p) = p else {
        return Ok(StationPolicy::default());
    };
    let storage = enum_value(
        "storage tier",
        p.storage,
        |v| match pb::StorageTier::try_from(v).ok()? {
            pb::StorageTier::Unspecified | pb::StorageTier::File => Some(StorageTier::File),
            pb::StorageTier::Memory => Some(StorageTier::Memory),
        },
    )?;
    let discard = enum_value(
        "discard policy",
        p.discard,
        |v| match pb::DiscardPolicy::try_from(v).ok()? {
            pb::DiscardPolicy::Unspecified | pb::DiscardPolicy::Old => Some(DiscardPolicy::Old),
            pb::DiscardPolicy::New => Some(DiscardPolicy::New),
        },
    )?;
    let compaction =
        enum_value(
            "compaction policy",
            p.compaction,
            |v| match pb::CompactionPolicy::try_from(v).ok()? {
                pb::CompactionPolicy::Unspecified | pb::CompactionPolicy::None => {
                    Some(CompactionPolicy::None)
                }
                pb::CompactionPolicy::Key => Some(CompactionPolicy::Key),
            },
        )?;
    let retention = p
        .retention
        .as_ref()
        .map(|r| Retention {
            max_age_ms: r.max_age_ms,
            max_bytes: r.max_bytes,
            max_messages: r.max_messages,
            ack: r.ack,
        })
        .unwrap_or_default();
    Ok(StationPolicy {
        storage,
        retention,
        discard,
        compaction,
        tombstone_delay_ms: p.tombstone_delay_ms.unwrap_or(DEFAULT_TOMBSTONE_DELAY_MS),
    })
}

/// Converts a station's policy for replies.
pub fn to_proto(p: &StationPolicy) -> pb::StationPolicy {
    pb::StationPolicy {
        storage: match p.storage {
            StorageTier::File => pb::StorageTier::File,
            StorageTier::Memory => pb::StorageTier::Memory,
        } as i32,
        retention: Some(pb::RetentionPolicy {
            max_age_ms: p.retention.max_age_ms,
            max_bytes: p.retention.max_bytes,
            max_messages: p.retention.max_messages,
            ack: p.retention.ack,
        }),
        discard: match p.discard {
            DiscardPolicy::Old => pb::DiscardPolicy::Old,
            DiscardPolicy::New => pb::DiscardPolicy::New,
        } as i32,
        compaction: match p.compaction {
            CompactionPolicy::None => pb::CompactionPolicy::None,
            CompactionPolicy::Key => pb::CompactionPolicy::Key,
        } as i32,
        tombstone_delay_ms: Some(p.tombstone_delay_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_and_unknown_enums_are_rejected() {
        let p = StationPolicy {
            storage: StorageTier::File,
            retention: Retention {
                max_age_ms: Some(5),
                max_bytes: None,
                max_messages: Some(9),
                ack: true,
            },
            discard: DiscardPolicy::New,
            compaction: CompactionPolicy::Key,
            tombstone_delay_ms: 7,
        };
        assert_eq!(from_proto(Some(&to_proto(&p))).unwrap(), p);
        assert_eq!(from_proto(None).unwrap(), StationPolicy::default());
        let mut bad = to_proto(&p);
        bad.discard = 42;
        let e = from_proto(Some(&bad)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
