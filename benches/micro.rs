//! Micro-benchmarks of the hot paths: the partitioner, record encoding, the storage append
//! path (one partition entry's messages in one RocksDB batch) and the read path.
//! Run: `cargo bench --bench micro` (numbers are per iteration; compare runs on one machine).

use junction_storage::Store;
use junction_types::partitioner::partition_for_key;
use junction_types::{Record, StoredRecord};

fn main() {
    divan::main();
}

fn record(size: usize) -> StoredRecord {
    StoredRecord {
        timestamp_ms: 1_795_000_000_000,
        key: Some(b"tenant-042".to_vec()),
        headers: vec![],
        payload: vec![7u8; size],
    }
}

#[divan::bench(args = [8, 32, 128])]
fn partition_a_key(bencher: divan::Bencher, len: usize) {
    let key = vec![b'k'; len];
    bencher.bench(|| partition_for_key(divan::black_box(&key), 64));
}

#[divan::bench(args = [128, 1024])]
fn encode_stored_record(bencher: divan::Bencher, size: usize) {
    let r = record(size);
    bencher.bench(|| postcard::to_stdvec(divan::black_box(&r)));
}

#[divan::bench(args = [128, 1024])]
fn decode_stored_record(bencher: divan::Bencher, size: usize) {
    let bytes = postcard::to_stdvec(&record(size)).expect("encode");
    bencher.bench(|| postcard::from_bytes::<StoredRecord>(divan::black_box(&bytes)));
}

/// Encoding a 100-record Raft command (what the leader's log append and replication send).
#[divan::bench(args = [128, 1024])]
fn encode_append_batch_of_100(bencher: divan::Bencher, size: usize) {
    let records: Vec<Record> = (0..100)
        .map(|i| Record {
            key: Some(format!("k{i}").into_bytes()),
            headers: vec![],
            payload: vec![1u8; size],
        })
        .collect();
    let cmd = junction_types::Command::Partition(junction_types::PartitionCommand::Append {
        timestamp_ms: 1,
        records,
    });
    bencher.bench(|| postcard::to_stdvec(divan::black_box(&cmd)));
}

/// The state machine's write of one 100-message entry (no fsync: apply does not sync).
#[divan::bench(args = [128, 1024])]
fn store_100_messages(bencher: divan::Bencher, size: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let value = postcard::to_stdvec(&record(size)).expect("encode");
    let mut offset = 0u64;
    bencher.bench_local(|| {
        let mut b = store.batch();
        for _ in 0..100 {
            b.put_message(1, offset, &value).expect("put");
            offset += 1;
        }
        store.write(b).expect("write");
    });
}

/// Reading 1000 stored messages from the middle of a partition.
#[divan::bench(args = [128, 1024])]
fn read_1000_messages(bencher: divan::Bencher, size: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open");
    let value = postcard::to_stdvec(&record(size)).expect("encode");
    for chunk in 0..50u64 {
        let mut b = store.batch();
        for i in 0..1000 {
            b.put_message(1, chunk * 1000 + i, &value).expect("put");
        }
        store.write(b).expect("write");
    }
    bencher.bench_local(|| {
        store
            .read_messages(1, 20_000, 50_000, 1000, 64 << 20)
            .expect("read")
    });
}
