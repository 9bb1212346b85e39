//! The Raft log of one group in the node's shared RocksDB.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use junction_storage::keys::{CF_RAFT_META, raft_tag};
use junction_storage::{StorageError, Store};
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
}

impl LogStore {
    /// Returns the log store of `group`.
    pub fn new(store: Store, group: GroupId) -> Self {
        Self {
            vote_store: store.clone(),
            store,
            group,
        }
    }

    /// Returns the log store of `group` with its log in `store` and its vote in `vote_store`.
    pub fn with_vote_store(store: Store, vote_store: Store, group: GroupId) -> Self {
        Self {
            store,
            group,
            vote_store,
        }
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
        let raw = self.store.log_range(self.group, start, end)?;
        let mut out = Vec::with_capacity(raw.len());
        for (index, bytes) in raw {
            let entry: Entry = format::decode_log_entry(&bytes)?;
            if entry.log_id.index != index {
                return Err(io::Error::other(StorageError::Corrupt {
                    what: "log entry",
                    group: self.group,
                    detail: format!("key index {index} holds entry {}", entry.log_id.index),
                }));
            }
            out.push(entry);
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
        let last = match self.store.last_log(self.group)? {
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
        b.delete_logs(self.group, 0, log_id.index + 1)?;
        self.store.write(b)?;
        Ok(())
    }
}
