//! A partition state machine on a real RocksDB store applies appends that carry their
//! leader's checksum, and refuses one whose messages changed after the leader made it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{entry, log_id};
use junction_raft::partition_sm::PartitionStateMachine;
use junction_raft::types::Entry;
use junction_types::{PartitionCommand, Record};
use openraft::storage::RaftStateMachine;

fn append(payloads: &[&[u8]]) -> PartitionCommand {
    PartitionCommand::Append {
        timestamp_ms: 1_700_000_000_000,
        records: payloads
            .iter()
            .map(|p| Record {
                key: Some(b"k".to_vec()),
                headers: vec![],
                payload: p.to_vec(),
            })
            .collect(),
    }
}

async fn apply(sm: &mut PartitionStateMachine, e: Entry) -> std::io::Result<()> {
    sm.apply(futures::stream::iter([Ok((e, None))])).await
}

#[tokio::test]
async fn a_checked_append_is_stored_and_a_changed_one_stops_the_replica() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = junction_storage::Store::open(&dir.path().join("db")).expect("store");
    let mut sm = PartitionStateMachine::open(store, 7, junction_raft::TailBudget::new(1 << 20))
        .expect("state machine");
    let shared = sm.shared();

    apply(&mut sm, entry(1, append(&[b"one", b"two"]).checked()))
        .await
        .expect("a checked append whose checksum matches is applied");
    assert_eq!(shared.current().next_offset, 2);

    // The leader's checksum of other messages: as if a byte changed on the way.
    let PartitionCommand::Checked { crc, .. } = append(&[b"three"]).checked() else {
        panic!("appends are checked")
    };
    let changed = PartitionCommand::Checked {
        crc,
        command: Box::new(append(&[b"threx"])),
    };
    let err = apply(&mut sm, entry(2, changed))
        .await
        .expect_err("a changed append is refused");
    assert!(
        junction_raft::names_corruption(&err.to_string()),
        "the replica's repair path must recognise it: {err}"
    );
    assert!(err.to_string().contains("group 7"), "{err}");
    assert_eq!(shared.current().next_offset, 2, "nothing of it was stored");
    let (applied, _) = sm.applied_state().await.expect("applied state");
    assert_eq!(applied, Some(log_id(1)), "the refused entry is not applied");
}
