//! A partition on disk stores each message once: its log entry, in the segment log. The
//! `messages` column family holds a pointer into the log, resolved on every read, and the
//! segments stay while a message points into them, whatever Raft purged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{entry, log_id};
use junction_raft::format;
use junction_raft::log_store::LogStore;
use junction_raft::partition_sm::PartitionStateMachine;
use junction_raft::types::Entry;
use junction_storage::pointer::{self, Pointer};
use junction_storage::{SegmentLog, Store};
use junction_types::command::AppendBatch;
use junction_types::exactly_once::{DeliveryPolicy, MSG_ID_HEADER};
use junction_types::{PartitionCommand, Record, StoredRecord};
use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};

const GROUP: u64 = 7;
const TS: i64 = 1_700_000_000_000;

fn record(payload: &[u8], id: Option<&str>) -> Record {
    Record {
        key: Some(b"k".to_vec()),
        headers: id
            .map(|i| vec![(MSG_ID_HEADER.to_owned(), i.as_bytes().to_vec())])
            .unwrap_or_default(),
        payload: payload.to_vec(),
    }
}

fn append(index: u64) -> PartitionCommand {
    PartitionCommand::Append {
        timestamp_ms: TS,
        records: vec![
            record(format!("m{index}-a").as_bytes(), None),
            record(format!("m{index}-b").as_bytes(), None),
        ],
    }
    .checked()
}

/// A node's order: the log (small segments), then the state machine.
fn open(dir: &std::path::Path) -> (Store, SegmentLog, LogStore, PartitionStateMachine) {
    let store = Store::open(&dir.join("db")).unwrap();
    let seg = store.segment_log_sized(GROUP, None, 512).unwrap().unwrap();
    let log = LogStore::segmented(store.clone(), GROUP).unwrap();
    let sm = PartitionStateMachine::open(
        store.clone(),
        GROUP,
        junction_raft::TailBudget::new(1 << 20),
    )
    .unwrap();
    (store, seg, log, sm)
}

/// Appends `e` to the log durably (as the flusher would have by the time it commits) and
/// applies it.
async fn log_and_apply(seg: &SegmentLog, sm: &mut PartitionStateMachine, e: Entry) {
    let bytes = format::encode_log_entry(&e).unwrap();
    seg.append_durably(&[(e.log_id.index, &bytes)]).unwrap();
    sm.apply(futures::stream::iter([Ok((e, None))]))
        .await
        .unwrap();
}

/// Builds a snapshot and purges Raft's log up to `index`, as openraft does after one.
async fn snapshot_and_purge(
    sm: &mut PartitionStateMachine,
    log: &mut LogStore,
    index: u64,
) -> junction_raft::types::Snapshot {
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    log.purge(log_id(index)).await.unwrap();
    snap
}

fn payloads(store: &Store) -> Vec<(u64, Vec<u8>)> {
    store
        .read_messages(GROUP, 0, u64::MAX, 1_000, 1 << 30)
        .unwrap()
        .into_iter()
        .map(|(o, v)| (o, format::decode_record(&v).unwrap().payload))
        .collect()
}

fn stored_kinds(store: &Store) -> Vec<bool> {
    let mut out = Vec::new();
    store
        .scan_stored_messages(GROUP, 0, u64::MAX, |_, v| {
            out.push(Pointer::decode(v).unwrap().is_some());
            Ok(true)
        })
        .unwrap();
    out
}

fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(junction_storage::segment::group_dir(
        &dir.join("db").join(junction_storage::SEGMENTS_DIR),
        GROUP,
    ))
    .map_or(0, |d| d.count())
}

#[tokio::test]
async fn messages_point_into_the_log_and_read_back_as_the_copies_they_replace() {
    let dir = tempfile::tempdir().unwrap();
    let (store, seg, _log, mut sm) = open(dir.path());
    log_and_apply(&seg, &mut sm, entry(1, append(1))).await;

    // Two batches with message ids; one record repeats an id and is not stored, so the
    // records after it keep their place in the entry, not their offset.
    let dedup = DeliveryPolicy {
        dedup_window_ms: Some(60_000),
        ..DeliveryPolicy::default()
    };
    let batches = PartitionCommand::AppendBatches {
        timestamp_ms: TS + 5,
        delivery: dedup,
        batches: vec![
            AppendBatch {
                producer: None,
                records: vec![record(b"x", Some("1")), record(b"y", Some("2"))],
            },
            AppendBatch {
                producer: None,
                records: vec![record(b"x again", Some("1")), record(b"z", Some("3"))],
            },
        ],
    }
    .checked();
    log_and_apply(&seg, &mut sm, entry(2, batches)).await;

    // Applied ahead of this node's own copy of the entry (not in its log): stored as a copy.
    sm.apply(futures::stream::iter([Ok((entry(3, append(3)), None))]))
        .await
        .unwrap();

    let want: Vec<(u64, Vec<u8>)> = vec![
        (0, b"m1-a".to_vec()),
        (1, b"m1-b".to_vec()),
        (2, b"x".to_vec()),
        (3, b"y".to_vec()),
        (4, b"z".to_vec()),
        (5, b"m3-a".to_vec()),
        (6, b"m3-b".to_vec()),
    ];
    assert_eq!(payloads(&store), want);
    assert_eq!(
        stored_kinds(&store),
        vec![true, true, true, true, true, false, false]
    );
    // A resolved pointer is byte for byte the copy an inline write stores (digests match).
    let read = store.read_messages(GROUP, 4, 5, 1, 1 << 20).unwrap();
    let copy = format::encode_record(&StoredRecord {
        timestamp_ms: TS + 5,
        key: Some(b"k".to_vec()),
        headers: vec![(MSG_ID_HEADER.to_owned(), b"3".to_vec())],
        payload: b"z".to_vec(),
    })
    .unwrap();
    assert_eq!(read, vec![(4, copy)]);

    // After a restart the pointers still resolve, and the dedup index rebuilt through them
    // still knows id 3.
    drop((sm, seg, _log, store));
    let (store, _seg, _log, _sm) = open(dir.path());
    assert_eq!(payloads(&store), want);
}

#[tokio::test]
async fn segments_stay_while_messages_point_into_them_and_go_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (store, seg, mut log, mut sm) = open(dir.path());
    for i in 1..=40 {
        log_and_apply(&seg, &mut sm, entry(i, append(i))).await;
    }
    let files = segment_files(dir.path());
    assert!(files > 4, "{files} segments");

    // Raft purges its log up to a snapshot: the entries are no longer Raft's to read, but
    // every message still points into them.
    let snap = snapshot_and_purge(&mut sm, &mut log, 40).await;
    assert!(
        log.try_get_log_entries(1..41).await.unwrap().is_empty(),
        "purged for Raft"
    );
    assert_eq!(segment_files(dir.path()), files);
    assert_eq!(payloads(&store).len(), 80);

    // Retention removes the first 60 messages (30 entries); once that is durable, the
    // segments holding only entries below 31 go.
    sm.apply(futures::stream::iter([Ok((
        entry(41, PartitionCommand::Truncate { before: 60 }),
        None,
    ))]))
    .await
    .unwrap();
    // Not yet: until a flush makes the truncation durable, a crash would bring back
    // messages pointing into them.
    assert!(store.releases_waiting());
    assert_eq!(segment_files(dir.path()), files);
    store.persist_applied().unwrap();
    assert!(!store.releases_waiting());
    let left = segment_files(dir.path());
    assert!(left < files, "{left} of {files} segments left");
    assert_eq!(payloads(&store).first().map(|(o, _)| *o), Some(60));
    assert_eq!(payloads(&store).len(), 20);
    assert_eq!(stored_kinds(&store), vec![true; 20]);

    // The snapshot carries copies, whichever node installs it.
    let dir2 = tempfile::tempdir().unwrap();
    let (store2, _seg2, _log2, mut sm2) = open(dir2.path());
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(payloads(&store2), payloads(&store));
    assert_eq!(stored_kinds(&store2), vec![false; 20]);

    // A damaged pointer is named as corruption, never read as a record.
    let mut b = store.batch();
    let mut bad = Pointer {
        index: 35,
        ordinal: 0,
        timestamp_ms: TS,
    }
    .encode();
    bad[7] ^= 1;
    b.put_message(GROUP, 60, &bad).unwrap();
    store.write(b).unwrap();
    let err = store
        .read_messages(GROUP, 60, 61, 1, 1 << 20)
        .unwrap_err()
        .to_string();
    assert!(junction_raft::names_corruption(&err), "{err}");
    assert_eq!(bad[0], pointer::VERSION);
}

#[tokio::test]
async fn compaction_turns_its_survivors_into_copies_so_old_segments_can_go() {
    let dir = tempfile::tempdir().unwrap();
    let (store, seg, mut log, mut sm) = open(dir.path());
    // 30 entries of two messages, keys k0..k4 in turn: compaction keeps the newest per key.
    for i in 1..=30u64 {
        let records = (0..2u64)
            .map(|j| Record {
                key: Some(format!("k{}", (2 * i + j) % 5).into_bytes()),
                headers: vec![],
                payload: format!("v{i}-{j}").into_bytes(),
            })
            .collect();
        let cmd = PartitionCommand::Append {
            timestamp_ms: TS,
            records,
        };
        log_and_apply(&seg, &mut sm, entry(i, cmd.checked())).await;
    }
    let files = segment_files(dir.path());
    let before = payloads(&store);
    sm.apply(futures::stream::iter([Ok((
        entry(
            31,
            PartitionCommand::Compact {
                upto: 50,
                tombstones_before_ms: 0,
            },
        ),
        None,
    ))]))
    .await
    .unwrap();
    let after = payloads(&store);
    // Below 50 one message per key survives, each the newest of its key there.
    let below: Vec<&(u64, Vec<u8>)> = after.iter().filter(|(o, _)| *o < 50).collect();
    assert_eq!(below.len(), 5, "{below:?}");
    for (o, p) in &below {
        assert_eq!(before.iter().find(|(b, _)| b == o).map(|(_, v)| v), Some(p));
        assert!(*o >= 45, "offset {o} is not the newest of its key below 50");
    }
    assert_eq!(after.len(), 5 + 10);
    let kinds = stored_kinds(&store);
    assert_eq!(kinds[..5], [false; 5], "survivors are copies");
    assert_eq!(kinds[5..], [true; 10], "the rest still points");

    // Once Raft purged its log and the state machine's writes are durable, only the
    // segments holding entries 26 on (offsets 50 on) stay.
    let snap = snapshot_and_purge(&mut sm, &mut log, 31).await;
    let left = segment_files(dir.path());
    assert!(left < files, "{left} of {files} segments left");
    assert_eq!(payloads(&store), after);
    drop((snap, sm, seg, log, store));
    let (store, _seg, _log, _sm) = open(dir.path());
    assert_eq!(payloads(&store), after);
}
