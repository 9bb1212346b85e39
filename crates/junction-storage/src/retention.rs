//! Storage operations of retention and compaction: the per-batch size index, range deletes
//! below a cut offset, and scans of a partition's messages.

use junction_types::GroupId;
use rocksdb::{Direction, IteratorMode, ReadOptions};

use crate::keys::*;
use crate::{Batch, StorageError, Store, rocks};

/// One decoded `size_index` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeEntry {
    /// The first offset of the batch.
    pub base: u64,
    /// The partition's cumulative bytes before `base`.
    pub bytes_before: u64,
    /// Each message's size, in offset order.
    pub sizes: Vec<u32>,
}

impl SizeEntry {
    fn decode(group: GroupId, key: &[u8], value: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: "size index entry",
            group,
            detail,
        };
        let base = u64_at(key, 8).ok_or_else(|| corrupt(format!("key of {} bytes", key.len())))?;
        let bytes_before =
            u64_at(value, 0).ok_or_else(|| corrupt(format!("value of {} bytes", value.len())))?;
        let rest = value.get(8..).unwrap_or_default();
        if rest.len() % 4 != 0 {
            return Err(corrupt(format!("value of {} bytes", value.len())));
        }
        let sizes = rest
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            base,
            bytes_before,
            sizes,
        })
    }

    /// Returns the cumulative bytes before `offset`, if it lies in `base..=base + len`.
    pub fn bytes_before(&self, offset: u64) -> Option<u64> {
        let k = usize::try_from(offset.checked_sub(self.base)?).ok()?;
        let sizes = self.sizes.get(..k)?;
        Some(self.bytes_before + sizes.iter().map(|s| u64::from(*s)).sum::<u64>())
    }
}

/// What a truncation below an offset must delete besides messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TruncatePlan {
    /// Time-index keys (full keys) strictly below this one go; the entry covering the cut
    /// offset stays so that time lookups still find it (readers clamp to the first offset).
    pub time_index_below: Option<Vec<u8>>,
    /// Size-index entries of batches starting below this base go; the batch holding the cut
    /// stays, so the bytes before the first offset can still be computed.
    pub size_index_below: Option<u64>,
}

impl Store {
    /// Returns the size-index entry of the batch holding `offset` (the last with base ≤ offset).
    pub fn size_entry_at(
        &self,
        group: GroupId,
        offset: u64,
    ) -> Result<Option<SizeEntry>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(group_start(group).to_vec());
        let key = group_u64(group, offset);
        let mut it = self.inner.db.iterator_cf_opt(
            self.cf(CF_SIZE_INDEX)?,
            ro,
            IteratorMode::From(&key, Direction::Reverse),
        );
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(rocks("iterate size index"))?;
                if u64_at(&k, 0) != Some(group) {
                    return Ok(None);
                }
                SizeEntry::decode(group, &k, &v).map(Some)
            }
        }
    }

    /// Returns the partition's cumulative appended bytes before `offset` (`None` when the size
    /// index does not cover it).
    pub fn bytes_before(&self, group: GroupId, offset: u64) -> Result<Option<u64>, StorageError> {
        Ok(self
            .size_entry_at(group, offset)?
            .and_then(|e| e.bytes_before(offset)))
    }

    /// Works out what truncating `group` below `before` deletes besides messages.
    pub fn plan_truncate(&self, group: GroupId, before: u64) -> Result<TruncatePlan, StorageError> {
        let size_index_below = self.size_entry_at(group, before)?.map(|e| e.base);
        // The time index is sparse (one entry per new millisecond) and sorted by time, which
        // follows offsets: walk it to the last entry below the cut.
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(group_end(group));
        let start = group_start(group);
        let it = self.inner.db.iterator_cf_opt(
            self.cf(CF_TIME_INDEX)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut last_below: Option<Vec<u8>> = None;
        for item in it {
            let (k, v) = item.map_err(rocks("iterate time index"))?;
            match u64_at(&v, 0) {
                Some(o) if o < before => last_below = Some(k.to_vec()),
                _ => break,
            }
        }
        Ok(TruncatePlan {
            time_index_below: last_below,
            size_index_below,
        })
    }
}

impl Batch<'_> {
    /// Records the sizes of a batch of messages starting at `base`.
    pub fn put_size_index(
        &mut self,
        group: GroupId,
        base: u64,
        bytes_before: u64,
        sizes: &[u32],
    ) -> Result<(), StorageError> {
        self.touch(group);
        let mut v = Vec::with_capacity(8 + 4 * sizes.len());
        v.extend_from_slice(&bytes_before.to_be_bytes());
        for s in sizes {
            v.extend_from_slice(&s.to_be_bytes());
        }
        self.wb
            .put_cf(self.store.cf(CF_SIZE_INDEX)?, group_u64(group, base), v);
        Ok(())
    }

    /// Deletes every message of `group` below `before` — one range delete per column family,
    /// never message by message — plus the index entries `plan` names.
    pub fn truncate_below(
        &mut self,
        group: GroupId,
        before: u64,
        plan: &TruncatePlan,
    ) -> Result<(), StorageError> {
        self.touch(group);
        let start = group_start(group);
        self.wb.delete_range_cf(
            self.store.cf(CF_MESSAGES)?,
            &start[..],
            &group_u64(group, before)[..],
        );
        if let Some(k) = &plan.time_index_below {
            self.wb
                .delete_range_cf(self.store.cf(CF_TIME_INDEX)?, &start[..], &k[..]);
        }
        if let Some(base) = plan.size_index_below {
            self.wb.delete_range_cf(
                self.store.cf(CF_SIZE_INDEX)?,
                &start[..],
                &group_u64(group, base)[..],
            );
        }
        Ok(())
    }

    /// Deletes one message (compaction).
    pub fn delete_message(&mut self, group: GroupId, offset: u64) -> Result<(), StorageError> {
        self.touch(group);
        self.wb
            .delete_cf(self.store.cf(CF_MESSAGES)?, group_u64(group, offset));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_index_answers_bytes_between_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        b.put_size_index(3, 0, 0, &[10, 20]).unwrap();
        b.put_size_index(3, 2, 30, &[5, 5, 5]).unwrap();
        b.put_size_index(4, 0, 0, &[1000]).unwrap();
        store.write(b).unwrap();
        assert_eq!(store.bytes_before(3, 0).unwrap(), Some(0));
        assert_eq!(store.bytes_before(3, 1).unwrap(), Some(10));
        assert_eq!(store.bytes_before(3, 2).unwrap(), Some(30));
        assert_eq!(store.bytes_before(3, 4).unwrap(), Some(40));
        assert_eq!(store.bytes_before(3, 5).unwrap(), Some(45));
        assert_eq!(store.bytes_before(3, 6).unwrap(), None);
        assert_eq!(store.bytes_before(2, 0).unwrap(), None);
    }

    #[test]
    fn truncation_removes_messages_and_index_prefixes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        for o in 0..10u64 {
            b.put_message(5, o, b"m").unwrap();
            b.put_message(6, o, b"other group").unwrap();
        }
        b.put_time_index(5, 100, 0).unwrap();
        b.put_time_index(5, 200, 4).unwrap();
        b.put_time_index(5, 300, 8).unwrap();
        b.put_size_index(5, 0, 0, &[1, 1, 1, 1]).unwrap();
        b.put_size_index(5, 4, 4, &[1, 1, 1, 1]).unwrap();
        b.put_size_index(5, 8, 8, &[1, 1]).unwrap();
        store.write(b).unwrap();
        let plan = store.plan_truncate(5, 6).unwrap();
        assert_eq!(plan.size_index_below, Some(4));
        let mut b = store.batch();
        b.truncate_below(5, 6, &plan).unwrap();
        store.write(b).unwrap();
        let left: Vec<u64> = store
            .read_messages(5, 0, 100, 100, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        assert_eq!(left, vec![6, 7, 8, 9]);
        assert_eq!(
            store.read_messages(6, 0, 100, 100, 1 << 20).unwrap().len(),
            10
        );
        // The entry covering offset 6 (time 200 → 4) stays; time 100 is gone.
        assert_eq!(store.seek_time(5, 0).unwrap(), Some(4));
        assert_eq!(store.bytes_before(5, 6).unwrap(), Some(6));
        assert_eq!(store.bytes_before(5, 10).unwrap(), Some(10));
        assert_eq!(store.bytes_before(5, 2).unwrap(), None);
    }
}
