//! The key → partition mapping.
//!
//! `partition = (murmur2(key) & 0x7fffffff) % partitions`, where murmur2 is the 32-bit
//! MurmurHash2 with seed `0x9747b28c`, exactly as Kafka's default partitioner computes it. Any
//! client can therefore compute where a key lands, and a key maps to the same partition as it
//! would in a Kafka topic with the same partition count.

/// Kafka's murmur2 (32-bit MurmurHash2, seed 0x9747b28c, little-endian blocks).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Returns the partition of `key` in a station with `partitions` partitions (at least 1).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from Kafka's `UtilsTest.testMurmur2` (as signed ints there).
    #[test]
    fn matches_kafka_reference_values() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input) as i32, expected, "murmur2({input:?})");
        }
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        for n in [1u32, 3, 7, 1024] {
            for k in 0..200u32 {
                let key = format!("tenant-{k}");
                let p = partition_for_key(key.as_bytes(), n);
                assert!(p < n);
                assert_eq!(p, partition_for_key(key.as_bytes(), n));
            }
        }
    }
}
