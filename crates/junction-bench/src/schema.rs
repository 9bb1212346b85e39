//! `--schema protobuf`: the station is bound to a Protobuf schema (`on-invalid reject`), so
//! every produced message is validated by the cluster, and payloads are valid encodings of
//! its message type at exactly `--message-size` bytes.

use bytes::Bytes;

/// The schema registered for the bench (an order, as applications send).
pub const ORDER_PROTO: &str = r#"syntax = "proto3";
package bench;
message Order {
  int64 id = 1;
  string sku = 2;
  int32 quantity = 3;
  double price = 4;
  string customer = 5;
  bytes note = 6;
}
"#;

/// The name the schema is registered under.
pub const SCHEMA_NAME: &str = "bench-order";

/// How many distinct records the payload pool holds.
const RECORDS: u64 = 4096;

/// Which schema the station is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchSchema {
    /// A Protobuf `Order` with six fields (numbers, strings, a double, bytes).
    Protobuf,
}

impl BenchSchema {
    /// The registry's name for the type.
    pub fn kind(self) -> &'static str {
        match self {
            BenchSchema::Protobuf => "protobuf",
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            BenchSchema::Protobuf => ORDER_PROTO,
        }
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

fn string_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Encodes order `n` as exactly `size` bytes (the `note` field pads it), or `None` when
/// `size` is too small for the fixed fields.
pub fn order(n: u64, size: usize, filler: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(size);
    out.push(1 << 3);
    varint(&mut out, n + 1);
    string_field(&mut out, 2, format!("SKU-{:06}", n % 1_000_000).as_bytes());
    out.push(3 << 3);
    varint(&mut out, n % 100 + 1);
    out.push((4 << 3) | 1);
    out.extend_from_slice(&((n % 10_000) as f64 / 100.0 + 1.0).to_le_bytes());
    string_field(&mut out, 5, format!("customer-{}", n % 9973).as_bytes());
    // The note: tag, length, bytes — find the length whose varint fits the rest.
    let rest = size.checked_sub(out.len() + 1)?;
    let note = (0..=rest)
        .rev()
        .find(|l| l + varint_len(*l as u64) == rest)?;
    let start = (n as usize * 31) % filler.len().saturating_sub(note).max(1);
    string_field(&mut out, 6, filler.get(start..start + note)?);
    (out.len() == size).then_some(out)
}

/// The smallest `--message-size` the schema's payloads fit in.
pub fn min_size() -> usize {
    (1..4096)
        .find(|s| order(999_999, *s, &[0u8; 4096]).is_some())
        .unwrap_or(4096)
}

/// `RECORDS` valid orders of `size` bytes, back to back; record `i` starts at `i * size`.
pub fn pool(size: usize, filler: &[u8]) -> Option<(Bytes, u64)> {
    let mut v = Vec::with_capacity(size * RECORDS as usize);
    for n in 0..RECORDS {
        v.extend(order(n, size, filler)?);
    }
    Some((Bytes::from(v), RECORDS))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use junction_schema::{Limits, Schema, SchemaKind};

    #[test]
    fn every_record_is_a_valid_order_of_exactly_the_size() {
        let schema = Schema::compile(SchemaKind::Protobuf, ORDER_PROTO, None, Limits::default())
            .expect("compiles");
        let filler: Vec<u8> = (0..(1 << 16)).map(|i| (i * 7 % 251) as u8).collect();
        let min = min_size();
        assert!(min < 80, "{min}");
        assert!(order(999_999, min - 1, &filler).is_none());
        for size in [min, min + 1, 128, 129, 200, 1024, 4096, 16_384] {
            let (bytes, k) = pool(size, &filler).expect("fits");
            assert_eq!(bytes.len(), size * k as usize);
            for i in [0, 1, k / 2, k - 1] {
                let at = i as usize * size;
                let rec = &bytes[at..at + size];
                assert_eq!(schema.validate(rec), Ok(()), "size {size} record {i}");
                let json = schema.to_json(rec).expect("decodes");
                assert_eq!(json["id"], (i + 1).to_string());
            }
        }
    }
}
