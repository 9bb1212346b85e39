//! Micro-benchmarks of the hot paths: the partitioner, record encoding, the storage append
//! path (one partition entry's messages in one RocksDB batch), the read path, the leader's
//! checksum of an append, and validating a 1 KiB message against a schema of each type.
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

/// The CRC32C a leader carries with an append of 200 messages (and every replica checks).
#[divan::bench(args = [128, 1024])]
fn digest_an_append_of_200(bencher: divan::Bencher, size: usize) {
    let cmd = junction_types::PartitionCommand::Append {
        timestamp_ms: 1_795_000_000_000,
        records: (0..200)
            .map(|_| Record {
                key: Some(b"tenant-042".to_vec()),
                headers: vec![],
                payload: vec![7u8; size],
            })
            .collect(),
    };
    bencher.bench(|| divan::black_box(&cmd).digest());
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

/// An order with `items` line items, as the three schema languages describe it.
pub mod order {
    pub const JSON_SCHEMA: &str = r#"{
      "type": "object",
      "properties": {
        "id": {"type": "integer"},
        "customer": {"type": "string", "maxLength": 64},
        "items": {"type": "array", "items": {
          "type": "object",
          "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
          "required": ["sku", "qty"]
        }}
      },
      "required": ["id", "customer", "items"]
    }"#;
    pub const PROTO: &str = r#"
      syntax = "proto3";
      package shop;
      message Item { string sku = 1; int32 qty = 2; }
      message Order { int64 id = 1; string customer = 2; repeated Item items = 3; }
    "#;
    pub const AVRO: &str = r#"{
      "type": "record", "name": "Order", "fields": [
        {"name": "id", "type": "long"},
        {"name": "customer", "type": "string"},
        {"name": "items", "type": {"type": "array", "items": {
          "type": "record", "name": "Item", "fields": [
            {"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}}}
      ]}"#;

    fn sku(i: usize) -> String {
        format!("SKU-{i:06}-BLUE-XL")
    }

    pub fn json(items: usize) -> Vec<u8> {
        let items: Vec<String> = (0..items)
            .map(|i| format!(r#"{{"sku": "{}", "qty": {}}}"#, sku(i), i % 9 + 1))
            .collect();
        format!(
            r#"{{"id": 4211, "customer": "customer-0042", "items": [{}]}}"#,
            items.join(", ")
        )
        .into_bytes()
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn proto(items: usize) -> Vec<u8> {
        let mut out = vec![0x08];
        varint(4211, &mut out);
        out.push(0x12);
        varint(13, &mut out);
        out.extend_from_slice(b"customer-0042");
        for i in 0..items {
            let s = sku(i);
            let mut item = vec![0x0a];
            varint(s.len() as u64, &mut item);
            item.extend_from_slice(s.as_bytes());
            item.push(0x10);
            varint((i % 9 + 1) as u64, &mut item);
            out.push(0x1a);
            varint(item.len() as u64, &mut out);
            out.extend_from_slice(&item);
        }
        out
    }

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        varint(((v << 1) ^ (v >> 63)) as u64, out);
    }

    pub fn avro(items: usize) -> Vec<u8> {
        let mut out = Vec::new();
        zigzag(4211, &mut out);
        zigzag(13, &mut out);
        out.extend_from_slice(b"customer-0042");
        zigzag(items as i64, &mut out);
        for i in 0..items {
            let s = sku(i);
            zigzag(s.len() as i64, &mut out);
            out.extend_from_slice(s.as_bytes());
            zigzag((i % 9 + 1) as i64, &mut out);
        }
        zigzag(0, &mut out);
        out
    }
}

/// Line items that make each encoding about 1 KiB.
fn items_for_1k(encode: fn(usize) -> Vec<u8>) -> usize {
    (1..200).find(|n| encode(*n).len() >= 1024).unwrap_or(200)
}

#[divan::bench(args = ["protobuf", "json", "avro"])]
fn validate_1k_message(bencher: divan::Bencher, kind: &str) {
    use junction_schema::{Limits, Schema, SchemaKind};
    type Case = (
        SchemaKind,
        &'static str,
        Option<&'static str>,
        fn(usize) -> Vec<u8>,
    );
    let (k, text, message, encode): Case = match kind {
        "protobuf" => (
            SchemaKind::Protobuf,
            order::PROTO,
            Some("shop.Order"),
            order::proto,
        ),
        "json" => (SchemaKind::Json, order::JSON_SCHEMA, None, order::json),
        _ => (SchemaKind::Avro, order::AVRO, None, order::avro),
    };
    let schema = Schema::compile(k, text, message, Limits::default()).expect("schema");
    let payload = encode(items_for_1k(encode));
    schema.validate(&payload).expect("valid");
    bencher.bench(|| schema.validate(divan::black_box(&payload)));
}
