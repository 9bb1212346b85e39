//! The Raft side of message pointers (see [`junction_storage::pointer`]): which records a
//! partition log entry carries, in the order the state machine numbers them, so the store can
//! resolve a pointer into the record an inline copy would have held.

use std::sync::Arc;

use junction_storage::Store;
use junction_storage::pointer::{EntryMessages, EntryRecords};
use junction_types::{Command, GroupId, PartitionCommand, Record};
use openraft::EntryPayload;

use crate::format;

/// The records of an append command, flattened across its batches: a record's ordinal is its
/// place in this list, whether or not the state machine stored it (a duplicate is skipped,
/// and keeps its number).
pub(crate) fn records_of(command: PartitionCommand) -> Option<Vec<Record>> {
    match command {
        PartitionCommand::Checked { command, .. } => records_of(*command),
        PartitionCommand::Append { records, .. } => Some(records),
        PartitionCommand::AppendBatches { batches, .. } => {
            Some(batches.into_iter().flat_map(|b| b.records).collect())
        }
        PartitionCommand::AppendSpanned { batches, .. } => {
            Some(batches.into_iter().flat_map(|b| b.batch.records).collect())
        }
        _ => None,
    }
}

/// Decodes partition log entries for the store.
struct PartitionEntries;

impl EntryRecords for PartitionEntries {
    fn open(
        &self,
        _group: GroupId,
        index: u64,
        entry: &[u8],
    ) -> Result<Box<dyn EntryMessages>, String> {
        // The borrowed reading first: it copies no record; the owned decode is the fallback
        // (and names what is wrong with an entry that fails both).
        if let Some(located) = view::locate(entry, index) {
            return Ok(Box::new(located));
        }
        let entry = format::decode_log_entry(entry).map_err(|e| e.to_string())?;
        if entry.log_id.index != index {
            return Err(format!("index {index} holds entry {}", entry.log_id.index));
        }
        match entry.payload {
            EntryPayload::Normal(Command::Partition(c)) => records_of(c)
                .map(|r| Box::new(Decoded(r)) as Box<dyn EntryMessages>)
                .ok_or_else(|| "the entry carries no messages".to_owned()),
            _ => Err("the entry carries no messages".to_owned()),
        }
    }
}

struct Decoded(Vec<Record>);

impl EntryMessages for Decoded {
    fn record(&self, ordinal: u32, timestamp_ms: i64) -> Result<Vec<u8>, String> {
        let r = self
            .0
            .get(ordinal as usize)
            .ok_or_else(|| format!("the entry carries {} records", self.0.len()))?;
        format::encode_record_of(timestamp_ms, r).map_err(|e| e.to_string())
    }
}

/// A borrowed reading of partition log entries: the shapes of `Entry`, `Command` and
/// `PartitionCommand` as postcard lays them out, with every record field borrowed from the
/// entry's bytes. Variants that carry no records are placeholders (an entry of that kind is
/// not resolved through here). `the_borrowed_reading_matches_the_owned_decode` keeps the
/// shapes in step with the real types.
mod view {
    use std::ops::Range;

    use junction_types::exactly_once::{DeliveryPolicy, ProducerBatch};
    use serde::Deserialize;

    use crate::types::LogId;

    #[derive(Deserialize)]
    struct EntryView<'a> {
        log_id: LogId,
        #[serde(borrow)]
        payload: PayloadView<'a>,
    }

    #[derive(Deserialize)]
    enum PayloadView<'a> {
        Blank,
        Normal(#[serde(borrow)] CommandView<'a>),
        Membership,
    }

    #[derive(Deserialize)]
    enum CommandView<'a> {
        Meta,
        Partition(#[serde(borrow)] PartitionView<'a>),
    }

    #[derive(Deserialize)]
    enum PartitionView<'a> {
        Append {
            _timestamp_ms: i64,
            #[serde(borrow)]
            records: Vec<RecordView<'a>>,
        },
        GroupInit,
        GroupAck,
        GroupSeek,
        GroupClone,
        GroupDelete,
        Truncate,
        Compact,
        DataLost,
        AppendBatches {
            _timestamp_ms: i64,
            _delivery: DeliveryPolicy,
            #[serde(borrow)]
            batches: Vec<BatchView<'a>>,
        },
        AppendSpanned {
            _timestamp_ms: i64,
            _delivery: DeliveryPolicy,
            #[serde(borrow)]
            batches: Vec<SpannedView<'a>>,
        },
        GroupPark,
        GroupIsolation,
        Checked {
            _crc: u32,
            #[serde(borrow)]
            command: Box<PartitionView<'a>>,
        },
    }

    #[derive(Deserialize)]
    struct BatchView<'a> {
        _producer: Option<ProducerBatch>,
        #[serde(borrow)]
        records: Vec<RecordView<'a>>,
    }

    #[derive(Deserialize)]
    struct SpannedView<'a> {
        #[serde(borrow)]
        batch: BatchView<'a>,
        _sequence_span: u32,
    }

    #[derive(Deserialize)]
    struct RecordView<'a> {
        #[serde(borrow)]
        key: Option<&'a [u8]>,
        #[serde(borrow)]
        headers: Vec<(&'a str, &'a [u8])>,
        payload: &'a [u8],
    }

    /// Where one record's fields lie in the entry's bytes.
    struct Spans {
        key: Option<Range<usize>>,
        headers: Vec<(Range<usize>, Range<usize>)>,
        payload: Range<usize>,
    }

    /// The records of one entry, located in a copy of its bytes.
    pub(super) struct Located {
        bytes: Vec<u8>,
        records: Vec<Spans>,
    }

    fn records_of<'v, 'a>(c: &'v PartitionView<'a>) -> Option<Vec<&'v RecordView<'a>>> {
        match c {
            PartitionView::Checked { command, .. } => records_of(command),
            PartitionView::Append { records, .. } => Some(records.iter().collect()),
            PartitionView::AppendBatches { batches, .. } => {
                Some(batches.iter().flat_map(|b| &b.records).collect())
            }
            PartitionView::AppendSpanned { batches, .. } => {
                Some(batches.iter().flat_map(|b| &b.batch.records).collect())
            }
            _ => None,
        }
    }

    /// Reads the entry at `index` borrowed; `None` when it is not a checked log entry of
    /// that index carrying records (the owned decode then says what it is).
    pub(super) fn locate(entry: &[u8], index: u64) -> Option<Located> {
        // The segment log checked the frame's checksum over these very bytes.
        let body = crate::format::log_entry_body_of_checked_frame(entry).ok()?;
        let view: EntryView<'_> = postcard::from_bytes(body).ok()?;
        if view.log_id.index != index {
            return None;
        }
        let PayloadView::Normal(CommandView::Partition(command)) = &view.payload else {
            return None;
        };
        let base = entry.as_ptr() as usize;
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let records = records_of(command)?
            .into_iter()
            .map(|r| Spans {
                key: r.key.map(at),
                headers: r
                    .headers
                    .iter()
                    .map(|(k, v)| (at(k.as_bytes()), at(v)))
                    .collect(),
                payload: at(r.payload),
            })
            .collect();
        Some(Located {
            bytes: entry.to_vec(),
            records,
        })
    }

    impl junction_storage::pointer::EntryMessages for Located {
        fn record(&self, ordinal: u32, timestamp_ms: i64) -> Result<Vec<u8>, String> {
            let r = self
                .records
                .get(ordinal as usize)
                .ok_or_else(|| format!("the entry carries {} records", self.records.len()))?;
            let b = &self.bytes;
            let headers = r
                .headers
                .iter()
                .map(|(k, v)| {
                    std::str::from_utf8(&b[k.clone()])
                        .map(|k| (k, &b[v.clone()]))
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, String>>()?;
            crate::format::encode_record_ref(&junction_types::StoredRecordRef {
                timestamp_ms,
                key: r.key.clone().map(|k| &b[k]),
                headers,
                payload: &b[r.payload.clone()],
            })
            .map_err(|e| e.to_string())
        }
    }
}

/// Lets `store` resolve message pointers into partition log entries.
pub fn install(store: &Store) {
    store.set_entry_records(Arc::new(PartitionEntries));
}

#[cfg(test)]
mod tests {
    use junction_types::command::{AppendBatch, SpannedBatch};
    use junction_types::exactly_once::{DeliveryPolicy, ProducerBatch};

    use super::*;
    use crate::types::Entry;

    fn record(i: u8) -> Record {
        Record {
            key: i.is_multiple_of(2).then(|| vec![b'k', i]),
            headers: if i.is_multiple_of(3) {
                vec![("h".into(), vec![i; 3]), ("é".into(), vec![])]
            } else {
                vec![]
            },
            payload: vec![i; usize::from(i) * 7],
        }
    }

    /// Every append shape, checked or not: the borrowed reading finds the same records, and
    /// encodes each exactly as the owned decode does.
    #[test]
    fn the_borrowed_reading_matches_the_owned_decode() {
        let batch = |from: u8| AppendBatch {
            producer: Some(ProducerBatch {
                id: 3,
                epoch: 1,
                base_sequence: 9,
            }),
            records: (from..from + 3).map(record).collect(),
        };
        let commands = [
            PartitionCommand::Append {
                timestamp_ms: 5,
                records: (0..4).map(record).collect(),
            },
            PartitionCommand::AppendBatches {
                timestamp_ms: 5,
                delivery: DeliveryPolicy::default(),
                batches: vec![batch(0), batch(10)],
            },
            PartitionCommand::AppendSpanned {
                timestamp_ms: 5,
                delivery: DeliveryPolicy::default(),
                batches: vec![SpannedBatch {
                    batch: batch(20),
                    sequence_span: 5,
                }],
            },
        ];
        for command in commands {
            for cmd in [command.clone(), command.clone().checked()] {
                let want = records_of(cmd.clone()).unwrap();
                let entry = Entry {
                    log_id: openraft::LogId::new(
                        openraft::impls::leader_id_adv::LeaderId {
                            term: 2,
                            node_id: 1,
                        },
                        17,
                    ),
                    payload: EntryPayload::Normal(Command::Partition(cmd)),
                };
                let bytes = format::encode_log_entry(&entry).unwrap();
                let located = view::locate(&bytes, 17).expect("read borrowed");
                assert!(view::locate(&bytes, 18).is_none(), "another index");
                for (i, r) in want.iter().enumerate() {
                    assert_eq!(
                        located.record(i as u32, 42).unwrap(),
                        format::encode_record_of(42, r).unwrap()
                    );
                }
                assert!(located.record(want.len() as u32, 42).is_err());
            }
        }
        // Entries without records are left to the owned decode.
        let truncate = Entry {
            log_id: openraft::LogId::new(
                openraft::impls::leader_id_adv::LeaderId {
                    term: 2,
                    node_id: 1,
                },
                3,
            ),
            payload: EntryPayload::Normal(Command::Partition(PartitionCommand::Truncate {
                before: 4,
            })),
        };
        let bytes = format::encode_log_entry(&truncate).unwrap();
        assert!(view::locate(&bytes, 3).is_none());
        assert!(PartitionEntries.open(1, 3, &bytes).is_err());
    }
}
