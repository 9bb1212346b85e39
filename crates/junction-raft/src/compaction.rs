//! Key compaction, as every replica applies it from a replicated `Compact { upto, .. }` entry.
//!
//! For the offsets below `upto`, only the newest message of each key is kept. A kept newest
//! message that is a tombstone (empty payload plus the `tombstone` header) older than the
//! entry's tombstone cut-off is removed too, so its key disappears. Unkeyed messages are never
//! removed by compaction. Offsets never change: the removed offsets become holes that readers
//! skip. The decision depends only on the stored messages and the entry, so every replica
//! removes the same offsets.

use std::collections::HashMap;

use junction_storage::{Batch, Store};
use junction_types::{GroupId, StoredRecord, policy};

use crate::{RaftStoreError, decode};

/// What compaction needs to know of one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionItem {
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub tombstone: bool,
    pub timestamp_ms: i64,
}

/// The offsets a compaction removes and the tombstones it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionPlan {
    /// Offsets to delete, ascending.
    pub remove: Vec<u64>,
    /// Tombstones still kept (younger than the cut-off).
    pub tombstones_kept: u64,
}

/// Plans a compaction of `items` (in offset order; all below the compaction point).
pub fn plan_compaction(
    items: impl IntoIterator<Item = CompactionItem>,
    tombstones_before_ms: i64,
) -> CompactionPlan {
    // key → (offset, tombstone, timestamp) of its newest message so far.
    let mut newest: HashMap<Vec<u8>, (u64, bool, i64)> = HashMap::new();
    let mut remove = Vec::new();
    for item in items {
        let Some(key) = item.key else { continue };
        if let Some((old, _, _)) =
            newest.insert(key, (item.offset, item.tombstone, item.timestamp_ms))
        {
            remove.push(old);
        }
    }
    let mut tombstones_kept = 0;
    for (offset, tombstone, ts) in newest.into_values() {
        if tombstone {
            if ts < tombstones_before_ms {
                remove.push(offset);
            } else {
                tombstones_kept += 1;
            }
        }
    }
    remove.sort_unstable();
    CompactionPlan {
        remove,
        tombstones_kept,
    }
}

/// Compacts `group`'s messages in `[from, upto)` as stored now, adding the deletes to `b`.
pub(crate) fn compact_stored(
    store: &Store,
    b: &mut Batch<'_>,
    group: GroupId,
    from: u64,
    upto: u64,
    tombstones_before_ms: i64,
) -> Result<CompactionPlan, RaftStoreError> {
    let mut items = Vec::new();
    let mut bad: Option<RaftStoreError> = None;
    store.scan_messages(group, from, upto, |offset, value| {
        match decode::<StoredRecord>("stored record", value) {
            Ok(r) => {
                let tombstone = policy::is_tombstone(&r.headers, &r.payload);
                items.push(CompactionItem {
                    offset,
                    key: r.key,
                    tombstone,
                    timestamp_ms: r.timestamp_ms,
                });
                Ok(true)
            }
            Err(e) => {
                bad = Some(e);
                Ok(false)
            }
        }
    })?;
    if let Some(e) = bad {
        return Err(e);
    }
    let plan = plan_compaction(items, tombstones_before_ms);
    for offset in &plan.remove {
        b.delete_message(group, *offset)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(offset: u64, key: &str, tombstone: bool, ts: i64) -> CompactionItem {
        CompactionItem {
            offset,
            key: Some(key.as_bytes().to_vec()),
            tombstone,
            timestamp_ms: ts,
        }
    }

    #[test]
    fn newest_per_key_and_old_tombstones_go() {
        let items = vec![
            item(0, "a", false, 1),
            item(1, "b", false, 1),
            item(2, "a", false, 2),
            CompactionItem {
                offset: 3,
                key: None,
                tombstone: false,
                timestamp_ms: 2,
            },
            item(4, "b", true, 3),
            item(5, "c", true, 10),
        ];
        let plan = plan_compaction(items, 5);
        // a@0 superseded, b@1 superseded, b@4 an old tombstone; c@5 is a young tombstone.
        assert_eq!(plan.remove, vec![0, 1, 4]);
        assert_eq!(plan.tombstones_kept, 1);
    }
}
