//! Every key layout of the node's RocksDB, in one place.
//!
//! All keys start with the big-endian Raft group id, so one group's data is one contiguous
//! key range in each column family and can be dropped with a single range delete.
//!
//! | column family | key                               | value                            |
//! |---------------|-----------------------------------|----------------------------------|
//! | `raft_log`    | group u64 · index u64             | postcard openraft entry          |
//! | `raft_meta`   | group u64 · tag u8                | vote / committed / last purged   |
//! | `messages`    | group u64 · offset u64            | postcard `StoredRecord`          |
//! | `time_index`  | group u64 · timestamp_ms i64 (BE, sign-flipped) | first offset u64 BE |
//! | `sm_meta`     | group u64 · tag u8                | state machine state              |
//! | `size_index`  | group u64 · base offset u64       | bytes before base u64 BE · size u32 BE per message of the batch |

use junction_types::GroupId;

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_META: &str = "raft_meta";
pub const CF_MESSAGES: &str = "messages";
pub const CF_TIME_INDEX: &str = "time_index";
pub const CF_SM_META: &str = "sm_meta";
/// Per appended batch: the partition's cumulative bytes before it and each message's size,
/// so that the bytes between any two offsets cost two lookups (retention by bytes).
pub const CF_SIZE_INDEX: &str = "size_index";

/// Every column family, in the order they are opened.
pub const ALL_CFS: [&str; 6] = [
    CF_RAFT_LOG,
    CF_RAFT_META,
    CF_MESSAGES,
    CF_TIME_INDEX,
    CF_SM_META,
    CF_SIZE_INDEX,
];
/// The column families that hold state machine data (what a snapshot carries), by the index
/// snapshot frames use.
pub const SM_CFS: [&str; 4] = [CF_MESSAGES, CF_TIME_INDEX, CF_SM_META, CF_SIZE_INDEX];
/// Snapshot frame index of `messages`.
pub const SM_CF_MESSAGES: u8 = 0;
/// Snapshot frame index of `time_index`.
pub const SM_CF_TIME_INDEX: u8 = 1;
/// Snapshot frame index of `size_index`.
pub const SM_CF_SIZE_INDEX: u8 = 3;

/// Tags under `raft_meta`.
pub mod raft_tag {
    pub const VOTE: u8 = 1;
    pub const COMMITTED: u8 = 2;
    pub const LAST_PURGED: u8 = 3;
    /// On the disk store, for a memory group: set when this node first initialised it, so a
    /// later re-initialisation is known to follow the loss of every replica.
    pub const MEMORY_INITIALISED: u8 = 10;
}

/// Tags under `sm_meta`.
pub mod sm_tag {
    pub const APPLIED: u8 = 1;
    pub const MEMBERSHIP: u8 = 2;
    pub const STATE: u8 = 3;
    pub const SNAPSHOT_META: u8 = 4;
    /// The first log index the group's stored messages point to; absent when none does.
    /// Never part of a snapshot.
    pub const POINTERS_FROM: u8 = 5;
}

/// Returns `group · n` (16 bytes).
pub fn group_u64(group: GroupId, n: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

/// Returns `group · tag` (9 bytes).
pub fn group_tag(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// Returns `group · timestamp` with the sign bit flipped so negative times sort first.
pub fn group_time(group: GroupId, ts_ms: i64) -> [u8; 16] {
    group_u64(group, (ts_ms as u64) ^ (1 << 63))
}

/// Decodes the timestamp of a `time_index` key.
pub fn time_of(key: &[u8]) -> Option<i64> {
    u64_at(key, 8).map(|v| (v ^ (1 << 63)) as i64)
}

/// Returns the first key of `group` (inclusive) in any column family.
pub fn group_start(group: GroupId) -> [u8; 8] {
    group.to_be_bytes()
}

/// Returns the first key after `group` (exclusive end of its range).
pub fn group_end(group: GroupId) -> Vec<u8> {
    match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        // The last possible group: everything with this prefix sorts before 9 × 0xff.
        None => vec![0xff; 9],
    }
}

/// Reads a big-endian u64 at `at`, if the slice is long enough.
pub fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_group_then_number() {
        assert!(group_u64(1, u64::MAX) < group_u64(2, 0));
        assert!(group_u64(1, 9) < group_u64(1, 10));
        assert!(group_time(1, -5) < group_time(1, 0));
        assert!(group_time(1, 0) < group_time(1, 7));
        assert_eq!(time_of(&group_time(3, -42)), Some(-42));
        assert!(group_u64(7, u64::MAX).as_slice() < group_end(7).as_slice());
        assert!(group_start(7).as_slice() <= group_tag(7, 0).as_slice());
    }
}
