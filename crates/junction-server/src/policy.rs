//! Station policy between its wire form and the metadata form.

use junction_proto::v1 as pb;
use junction_types::exactly_once::DeliveryPolicy;
use junction_types::policy::DEFAULT_TOMBSTONE_DELAY_MS;
use junction_types::{CompactionPolicy, DiscardPolicy, Retention, StationPolicy, StorageTier};
use tonic::Status;

fn enum_value<T>(what: &str, v: i32, decode: impl Fn(i32) -> Option<T>) -> Result<T, Status> {
    decode(v).ok_or_else(|| Status::invalid_argument(format!("unknown {what} value {v}")))
}

/// Converts a request's policy (storage, retention and compaction; exactly-once settings);
/// `None` means every default.
pub fn from_proto(
    p: Option<&pb::StationPolicy>,
) -> Result<(StationPolicy, DeliveryPolicy), Status> {
    let Some(p) = p else {
        return Ok((StationPolicy::default(), DeliveryPolicy::default()));
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
    let defaults = DeliveryPolicy::default();
    let delivery = DeliveryPolicy {
        dedup_window_ms: p.dedup_window_ms,
        dedup_max_ids: p.dedup_max_ids.unwrap_or(defaults.dedup_max_ids),
        producer_expiry_ms: p.producer_expiry_ms.unwrap_or(defaults.producer_expiry_ms),
    };
    Ok((
        StationPolicy {
            storage,
            retention,
            discard,
            compaction,
            tombstone_delay_ms: p.tombstone_delay_ms.unwrap_or(DEFAULT_TOMBSTONE_DELAY_MS),
        },
        delivery,
    ))
}

/// Converts a station's settings for replies.
pub fn to_proto(p: &StationPolicy, d: &DeliveryPolicy) -> pb::StationPolicy {
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
        dedup_window_ms: d.dedup_window_ms,
        dedup_max_ids: Some(d.dedup_max_ids),
        producer_expiry_ms: Some(d.producer_expiry_ms),
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
        let d = DeliveryPolicy {
            dedup_window_ms: Some(120_000),
            dedup_max_ids: 10,
            producer_expiry_ms: 60_000,
        };
        assert_eq!(from_proto(Some(&to_proto(&p, &d))).unwrap(), (p, d));
        assert_eq!(
            from_proto(None).unwrap(),
            (StationPolicy::default(), DeliveryPolicy::default())
        );
        let mut bad = to_proto(&p, &d);
        bad.discard = 42;
        let e = from_proto(Some(&bad)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
