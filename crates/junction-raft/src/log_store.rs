//! The Raft log of one group: its entries in segment files (a partition on disk, see
//! [`junction_storage::segment`]) or in the node's RocksDB (the metadata group, and groups
//! of a memory store); its vote, committed marker and last purged id in RocksDB.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use junction_storage::keys::{CF_RAFT_META, raft_tag};
use junction_storage::{SegmentLog, StorageError, Store};
use junction_types::GroupId;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};

use crate::format::{self, Format, decode, encode};
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// One group's log, vote and committed marker. Cheap to clone (replication tasks read
/// concurrently through clones).
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Store,
    group: GroupId,
    /// Where the vote lives: `store`, or the disk store for a group whose log is in memory
    /// (a restarted replica must never vote twice in a term).
    vote_store: Store,
    /// Where the entries live: segment files, or `store`'s `raft_log` column family.
    segments: Option<SegmentLog>,
}

/// Log entries moved from RocksDB into segments per write.
const MIGRATE_CHUNK: u64 = 1_000;

impl LogStore {
    /// Returns the log store of `group`, entries in RocksDB.
    pub fn new(store: Store, group: GroupId) -> Self {
        Self {
            vote_store: store.clone(),
            store,
            group,
            segments: None,
        }
    }

    /// Returns the log store of `group` with its log in `store` and its vote in `vote_store`.
    pub fn with_vote_store(store: Store, vote_store: Store, group: GroupId) -> Self {
        Self {
            store,
            group,
            vote_store,
            segments: None,
        }
    }

    /// Returns the log store of `group` with its entries in segment files (RocksDB for a
    /// memory store). Entries an earlier build kept in RocksDB move into segments first:
    /// copied and fsynced, then removed from RocksDB with a synced write, so a crash at any
    /// point leaves them whole in one place or the other (the copy starts over).
    pub fn segmented(store: Store, group: GroupId) -> io::Result<Self> {
        let mut log = Self::new(store, group);
        let last_purged: Option<LogId> = log.get_meta(raft_tag::LAST_PURGED, &format::LOG_ID)?;
        let Some(seg) = log.store.segment_log(group, last_purged.map(|l| l.index))? else {
            return Ok(log);
        };
        if let Some((last, _)) = log.store.last_log(group)? {
            seg.clear()?;
            // A purge removed every entry up to its marker, so the log starts after it.
            let mut next = last_purged.map_or(0, |l| l.index + 1);
            while next <= last {
                let raw = log
                    .store
                    .log_range(group, next, next.saturating_add(MIGRATE_CHUNK))?;
                let refs: Vec<(u64, &[u8])> = raw.iter().map(|(i, b)| (*i, b.as_slice())).collect();
                if !refs.is_empty() {
                    seg.append_durably(&refs)?;
                }
                next = next.saturating_add(MIGRATE_CHUNK);
            }
            let mut b = log.store.batch();
            b.delete_logs(group, 0, u64::MAX)?;
            log.store.write_sync(b)?;
            tracing::info!(
                group,
                last,
                "moved the group's log entries into segment files"
            );
        }
        log.segments = Some(seg);
        Ok(log)
    }

    /// Whether the entries live in segment files.
    pub fn is_segmented(&self) -> bool {
        self.segments.is_some()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        tag: u8,
        format: &Format,
    ) -> io::Result<Option<T>> {
        match self.store.get_tag(CF_RAFT_META, self.group, tag)? {
            None => Ok(None),
            Some(b) => Ok(Some(decode(format, &b)?)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let group = self.group;
        let mut out = Vec::new();
        // A segment log hands out entries whose frame checksum it has just checked over the
        // same bytes; entries kept in RocksDB are checked by their own.
        let decode_entry = if self.segments.is_some() {
            format::decode_log_entry_of_checked_frame
        } else {
            format::decode_log_entry
        };
        let mut take = |index: u64, bytes: &[u8]| -> Result<bool, StorageError> {
            let entry: Entry = decode_entry(bytes).map_err(|e| StorageError::Corrupt {
                what: "log entry",
                group,
                detail: format!("at index {index}: {e}"),
            })?;
            if entry.log_id.index != index {
                return Err(StorageError::Corrupt {
                    what: "log entry",
                    group,
                    detail: format!("index {index} holds entry {}", entry.log_id.index),
                });
            }
            out.push(entry);
            Ok(true)
        };
        match &self.segments {
            Some(seg) => seg.read(start, end, take)?,
            None => {
                for (index, bytes) in self.store.log_range(group, start, end)? {
                    take(index, &bytes)?;
                }
            }
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        match self
            .vote_store
            .get_tag(CF_RAFT_META, self.group, raft_tag::VOTE)?
        {
            None => Ok(None),
            Some(b) => Ok(Some(decode(&format::VOTE, &b)?)),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.get_meta(raft_tag::LAST_PURGED, &format::LOG_ID)?;
        let last = match &self.segments {
            Some(seg) => seg.last()?,
            None => self.store.last_log(self.group)?,
        };
        let last = match last {
            None => None,
            Some((_, bytes)) => {
                let e: Entry = format::decode_log_entry(&bytes)?;
                Some(e.log_id)
            }
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        // Invariant: a vote is on disk before any message relies on it, or a restarted node
        // could vote twice in one term.
        let bytes = encode(&format::VOTE, vote)?;
        let store = self.vote_store.clone();
        let group = self.group;
        tokio::task::spawn_blocking(move || {
            let mut b = store.batch();
            b.put_tag(CF_RAFT_META, group, raft_tag::VOTE, &bytes)?;
            store.write_sync(b)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Not synced: it only speeds up recovery; losing it is safe.
        let mut b = self.store.batch();
        match committed {
            Some(c) => b.put_tag(
                CF_RAFT_META,
                self.group,
                raft_tag::COMMITTED,
                &encode(&format::LOG_ID, &c)?,
            )?,
            None => b.delete_tag(CF_RAFT_META, self.group, raft_tag::COMMITTED)?,
        }
        self.store.write(b)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        self.get_meta(raft_tag::COMMITTED, &format::LOG_ID)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        if let Some(seg) = &self.segments {
            let encoded = entries
                .into_iter()
                .map(|e| Ok((e.log_id.index, format::encode_log_entry(&e)?)))
                .collect::<Result<Vec<_>, crate::RaftStoreError>>()?;
            let refs: Vec<(u64, &[u8])> = encoded.iter().map(|(i, b)| (*i, b.as_slice())).collect();
            // Readable now; `callback` fires once the segment files are fsynced, which is
            // when openraft may count this node towards a commit quorum.
            seg.append(&refs, Box::new(move |r| callback.io_completed(r)))?;
            return Ok(());
        }
        let mut b = self.store.batch();
        for entry in entries {
            b.put_log(
                self.group,
                entry.log_id.index,
                &format::encode_log_entry(&entry)?,
            )?;
        }
        // Readable now; `callback` fires once the shared WAL is fsynced, which is when openraft
        // may count this node towards a commit quorum.
        self.store
            .write_then_flush(b, Box::new(move |r| callback.io_completed(r)))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        if let Some(seg) = &self.segments {
            // Durable when it returns: a later append at these indexes must never be followed,
            // after a crash, by the entries it replaced.
            seg.truncate_from(from)?;
            return Ok(());
        }
        let mut b = self.store.batch();
        b.delete_logs(self.group, from, u64::MAX)?;
        // Not synced: the WAL keeps order, so the truncation is durable before any later
        // append that overwrites these indexes is.
        self.store.write(b)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // The marker goes first (same batch, WAL-ordered): openraft ignores entries at or below
        // it, so a crash between the two can never expose a hole.
        let mut b = self.store.batch();
        b.put_tag(
            CF_RAFT_META,
            self.group,
            raft_tag::LAST_PURGED,
            &encode(&format::LOG_ID, &log_id)?,
        )?;
        if let Some(seg) = &self.segments {
            // The marker is durable before any segment goes; a segment a crash brings back
            // after its removal is wholly at or below it and is discarded on open.
            self.store.write_sync(b)?;
            seg.purge_through(log_id.index)?;
            return Ok(());
        }
        b.delete_logs(self.group, 0, log_id.index + 1)?;
        self.store.write(b)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::EntryPayload;
    use openraft::storage::RaftLogStorage;

    use super::*;

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 },
            index,
        )
    }

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn a_log_kept_in_rocksdb_moves_into_segments_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        // As an earlier build left it: entries 1..=50 in the raft_log column family, and
        // entries of another group that must stay.
        let mut b = store.batch();
        for i in 1..=50 {
            b.put_log(9, i, &format::encode_log_entry(&blank(2, i)).unwrap())
                .unwrap();
        }
        b.put_log(3, 1, &format::encode_log_entry(&blank(1, 1)).unwrap())
            .unwrap();
        store.write_sync(b).unwrap();

        let mut log = LogStore::segmented(store.clone(), 9).unwrap();
        assert!(log.is_segmented());
        assert!(store.last_log(9).unwrap().is_none(), "moved out of RocksDB");
        assert!(
            store.last_log(3).unwrap().is_some(),
            "other groups untouched"
        );
        let entries = log.try_get_log_entries(1..51).await.unwrap();
        let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
        assert_eq!(ids, (1..=50).map(|i| log_id(2, i)).collect::<Vec<_>>());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 50)));

        // Purge and truncate through the segment log, then reopen: what was said stays said.
        log.purge(log_id(2, 10)).await.unwrap();
        log.truncate_after(Some(log_id(2, 40))).await.unwrap();
        drop(log);
        let mut log = LogStore::segmented(store.clone(), 9).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(2, 10)));
        assert_eq!(state.last_log_id, Some(log_id(2, 40)));
        let entries = log.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(entries.first().map(|e| e.log_id), Some(log_id(2, 11)));
        assert_eq!(entries.len(), 30);
    }

    #[tokio::test]
    async fn a_damaged_segment_entry_reads_as_a_corrupt_log_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let seg = store.segment_log(4, None).unwrap().unwrap();
        let good = format::encode_log_entry(&blank(1, 1)).unwrap();
        // A frame whose own checksum holds but whose entry does not decode.
        seg.append_durably(&[(1, good.as_slice()), (2, b"\x02garbage".as_slice())])
            .unwrap();
        drop(seg);
        let mut log = LogStore::segmented(store, 4).unwrap();
        let err = log.try_get_log_entries(1..3).await.unwrap_err();
        assert!(crate::names_corruption(&err.to_string()), "{err}");
    }
}
