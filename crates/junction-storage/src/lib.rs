//! The node's storage: one RocksDB holding every Raft group's log, vote and state machine
//! data, keyed by group id (see [`keys`]). This is the only crate that names `rocksdb`.
//!
//! - [`Store`]: open/close, typed reads and writes per group, range deletes.
//! - [`flusher`]: one thread that fsyncs the shared WAL for many appends at once (group
//!   commit across every Raft group), and poisons the store if an fsync ever fails.
//!
//! Durability rules enforced here:
//! - a vote is written with `sync = true` before `save_vote` returns;
//! - a log append is acknowledged (its callback fired) only after the WAL holding it is
//!   fsynced;
//! - state machine writes ([`Store::write_applied`]) skip the WAL: the Raft log is the
//!   source of truth and replays anything lost, so a message reaches the WAL once (in its log
//!   entry), not twice. Column families are flushed atomically (`atomic_flush`), so after a
//!   crash the state machine is always a consistent prefix of what was applied (its data and
//!   its `last_applied` marker from the same cut); [`Store::persist_applied`] flushes it
//!   before the logs it covers may be purged.

pub mod flusher;
pub mod keys;
pub mod pointer;
pub mod retention;
pub mod segment;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use junction_types::GroupId;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
};

pub use crate::flusher::FlushCallback;
use crate::flusher::Flusher;
use crate::keys::*;
pub use crate::retention::{SizeEntry, TruncatePlan};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("rocksdb {op} failed: {source}")]
    Rocks {
        op: &'static str,
        source: rocksdb::Error,
    },
    #[error("column family {0} is missing")]
    MissingCf(&'static str),
    #[error("corrupt {what} in group {group}: {detail}")]
    Corrupt {
        what: &'static str,
        group: GroupId,
        detail: String,
    },
    #[error("the store is poisoned by an earlier failed write or fsync and accepts no more writes")]
    Poisoned,
    #[error("group {0} was deleted on this node; a write to it is refused")]
    GroupDeleted(GroupId),
    #[error(
        "the data directory {path} holds data in store format {found}, which this build cannot \
         read (it reads format {supported}){hint}"
    )]
    StoreFormat {
        path: std::path::PathBuf,
        found: u8,
        supported: u8,
        hint: &'static str,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the segment file {path} is in segment format {found}, which this build cannot read \
         (it reads format {supported})"
    )]
    SegmentVersion {
        path: std::path::PathBuf,
        found: u8,
        supported: u8,
    },
    #[error(
        "the message at offset {offset} of group {group} is stored as a pointer into the log, \
         and this process has no decoder for log entries"
    )]
    NoEntryDecoder { group: GroupId, offset: u64 },
    #[error("resolving the store path {path}: {source}")]
    Path {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e)
    }
}

/// The layout of a data directory as a whole: key schema and the versioned value encodings
/// (`junction_raft::format`). Stored under [`STORE_FORMAT_KEY`] in the default column family
/// when a store is created; a store without it but with data predates versioned formats.
///
/// - 1: every Raft log in the `raft_log` column family.
/// - 2: partition logs in segment files ([`segment`]). A format 1 store is upgraded in
///   place: the marker first (so an older build refuses the store from then on), then each
///   partition's entries as its log is opened (`junction_raft::LogStore::segmented`).
/// - 3: stored messages may be pointers into the segment log ([`pointer`]) instead of
///   copies. A format 1 or 2 store is marked 3 on open (an older build then refuses it);
///   the copies it holds stay valid.
pub const STORE_FORMAT: u8 = 3;
/// Where the store format is kept.
pub const STORE_FORMAT_KEY: &[u8] = b"junction/store-format";

/// Stored messages at least this long are kept in RocksDB's blob files (see `open_inner`).
const MIN_BLOB_BYTES: u64 = 256;

/// The directory under the store's path that holds segment logs ([`segment`]).
pub const SEGMENTS_DIR: &str = "segments";

/// Where a node keeps the id of the cluster its data belongs to.
pub const CLUSTER_ID_KEY: &[u8] = b"junction/cluster-id";
/// Where a node that rejoined its cluster with empty state keeps its vote floors
/// (`junction_raft::rejoin::VoteFloors`, versioned there).
pub const REJOIN_FLOORS_KEY: &[u8] = b"junction/rejoin-floors";

impl Store {
    /// The id of the cluster this store's data belongs to, once known.
    pub fn cluster_id(&self) -> Result<Option<String>, StorageError> {
        let v = self
            .inner
            .db
            .get(CLUSTER_ID_KEY)
            .map_err(rocks("read the cluster id"))?;
        v.map(|b| {
            String::from_utf8(b).map_err(|_| StorageError::Corrupt {
                what: "cluster id",
                group: 0,
                detail: "not UTF-8".to_owned(),
            })
        })
        .transpose()
    }

    /// Records the cluster id, durably, before returning.
    pub fn set_cluster_id(&self, id: &str) -> Result<(), StorageError> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.inner
            .db
            .put_opt(CLUSTER_ID_KEY, id.as_bytes(), &w)
            .map_err(self.poisoning("write the cluster id"))
    }

    /// The encoded vote floors of a rejoined node, if it ever rejoined.
    pub fn rejoin_floors(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner
            .db
            .get(REJOIN_FLOORS_KEY)
            .map_err(rocks("read the rejoin vote floors"))
    }

    /// Records the encoded vote floors, durably, before returning.
    pub fn set_rejoin_floors(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.inner
            .db
            .put_opt(REJOIN_FLOORS_KEY, bytes, &w)
            .map_err(self.poisoning("write the rejoin vote floors"))
    }
}

/// Where an interrupted migration from store format 0 records how far it got: the column
/// family's index in [`MIGRATED_0_TO_1`] and the last key rewritten.
const MIGRATION_PROGRESS_KEY: &[u8] = b"junction/migration-0-1";
/// Values rewritten per atomic batch of the migration.
const MIGRATION_BATCH: usize = 4096;

/// The version byte a value of store format 0 gets in format 1, if it is one of the
/// encodings format 1 versions (log entries, stored messages, the postcard-encoded tags).
/// Version 1 of each is its format-0 bytes after the byte 1. A snapshot record gets 0: it
/// holds a state machine state of format 0 inside, which its reader versions when it reads it
/// (`junction_raft::sm_common`).
fn format_1_prefix(cf: &str, key: &[u8]) -> Option<u8> {
    let tag = (key.len() == 9).then(|| key[8]);
    match cf {
        keys::CF_RAFT_LOG | keys::CF_MESSAGES => Some(1),
        keys::CF_SM_META if tag == Some(sm_tag::SNAPSHOT_META) => Some(0),
        keys::CF_SM_META => Some(1),
        keys::CF_RAFT_META if tag == Some(raft_tag::MEMORY_INITIALISED) => None,
        keys::CF_RAFT_META => Some(1),
        _ => None,
    }
}

/// The column families whose values the migration from format 0 rewrites, in order.
const MIGRATED_0_TO_1: [&str; 4] = [
    keys::CF_RAFT_LOG,
    keys::CF_RAFT_META,
    keys::CF_SM_META,
    keys::CF_MESSAGES,
];

/// Store format 0 (before formats were versioned) to 1: version 1 of every versioned
/// structure is its format-0 postcard bytes after a version byte 1, so each such value gets
/// that byte in front. Batches are atomic and record their progress in the same batch, so a
/// migration cut by a crash resumes where it stopped and never rewrites a value twice.
fn migrate_0_to_1(db: &DB, path: &Path) -> Result<(), StorageError> {
    let progress = db
        .get(MIGRATION_PROGRESS_KEY)
        .map_err(rocks("read the migration progress"))?;
    let (mut first_cf, mut after): (usize, Option<Vec<u8>>) = match progress.as_deref() {
        Some([cf, key @ ..]) => (usize::from(*cf), Some(key.to_vec())),
        _ => (0, None),
    };
    tracing::warn!(
        path = %path.display(),
        resumed = progress.is_some(),
        "migrating the data directory from store format 0 to 1"
    );
    let mut rewritten = 0u64;
    while first_cf < MIGRATED_0_TO_1.len() {
        let name = MIGRATED_0_TO_1[first_cf];
        let cf = db.cf_handle(name).ok_or(StorageError::MissingCf(name))?;
        loop {
            let mode = match &after {
                Some(k) => rocksdb::IteratorMode::From(k, rocksdb::Direction::Forward),
                None => rocksdb::IteratorMode::Start,
            };
            let mut batch = WriteBatch::default();
            let mut last: Option<Vec<u8>> = None;
            let mut count = 0;
            for item in db.iterator_cf(cf, mode) {
                let (key, value) = item.map_err(rocks("read for the migration"))?;
                if after.as_deref() == Some(&key[..]) {
                    continue;
                }
                if let Some(prefix) = format_1_prefix(name, &key) {
                    let mut v = Vec::with_capacity(value.len() + 1);
                    v.push(prefix);
                    v.extend_from_slice(&value);
                    batch.put_cf(cf, &key, v);
                }
                last = Some(key.to_vec());
                count += 1;
                if count == MIGRATION_BATCH {
                    break;
                }
            }
            let Some(last) = last else { break };
            let mut marker = vec![first_cf as u8];
            marker.extend_from_slice(&last);
            batch.put(MIGRATION_PROGRESS_KEY, marker);
            let mut w = rocksdb::WriteOptions::default();
            w.set_sync(true);
            db.write_opt(batch, &w)
                .map_err(rocks("write the migration"))?;
            rewritten += count as u64;
            after = Some(last);
        }
        first_cf += 1;
        after = None;
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        db.put_opt(MIGRATION_PROGRESS_KEY, [first_cf as u8], &w)
            .map_err(rocks("write the migration progress"))?;
    }
    // The format is written by the caller; the progress record goes with it.
    db.delete(MIGRATION_PROGRESS_KEY)
        .map_err(rocks("finish the migration"))?;
    tracing::warn!(path = %path.display(), keys = rewritten, "migrated to store format 1");
    Ok(())
}

/// Checks (or, for a new store, writes) the store format, before anything else reads the
/// store: a node refuses data it cannot read instead of misreading it.
fn check_store_format(db: &DB, path: &Path) -> Result<(), StorageError> {
    let refuse = |found: u8, hint: &'static str| StorageError::StoreFormat {
        path: path.to_path_buf(),
        found,
        supported: STORE_FORMAT,
        hint,
    };
    match db
        .get(STORE_FORMAT_KEY)
        .map_err(rocks("read the store format"))?
    {
        Some(v) if v.as_slice() == [STORE_FORMAT] => Ok(()),
        Some(v) if v.as_slice() == [1] || v.as_slice() == [2] => {
            let mut w = rocksdb::WriteOptions::default();
            w.set_sync(true);
            db.put_opt(STORE_FORMAT_KEY, [STORE_FORMAT], &w)
                .map_err(rocks("write the store format"))
        }
        Some(v) => Err(refuse(
            v.first().copied().unwrap_or(0),
            " (written by a newer Junction?)",
        )),
        None => {
            let has_data = [keys::CF_RAFT_LOG, keys::CF_RAFT_META, keys::CF_SM_META]
                .iter()
                .filter_map(|cf| db.cf_handle(cf))
                .any(|cf| {
                    db.iterator_cf(cf, rocksdb::IteratorMode::Start)
                        .next()
                        .is_some()
                });
            if has_data {
                migrate_0_to_1(db, path)?;
            }
            let mut w = rocksdb::WriteOptions::default();
            w.set_sync(true);
            db.put_opt(STORE_FORMAT_KEY, [STORE_FORMAT], &w)
                .map_err(rocks("write the store format"))
        }
    }
}

fn rocks(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StorageError {
    move |source| StorageError::Rocks { op, source }
}

/// A handle to the node's RocksDB. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    // Field order matters: the flusher (and its thread's DB handle) goes first.
    flusher: Flusher,
    db: Arc<DB>,
    poisoned: Arc<AtomicBool>,
    /// The options the DB was opened with: they hold its statistics.
    opts: Options,
    /// A memory store: no WAL (nothing to recover from after a restart anyway), and syncs
    /// are no-ops.
    memory: bool,
    /// Groups deleted by [`Store::delete_group`]: a write that touches one is refused, so a
    /// late apply of a closing replica cannot bring back data after its deletion. Writers
    /// hold the read side while they write; a deletion takes the write side.
    deleted: parking_lot::RwLock<std::collections::HashSet<GroupId>>,
    /// Where segment logs live (`<store>/segments`); none for a memory store.
    segments_root: Option<std::path::PathBuf>,
    segments: segment::Registry,
    /// Bytes appended to segment files since the store opened.
    segment_bytes_written: std::sync::atomic::AtomicU64,
    /// Decodes log entries into stored records, to resolve message pointers.
    entry_records: std::sync::OnceLock<Arc<dyn pointer::EntryRecords>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.db.path())
            .finish()
    }
}

/// The segment log of one group (see [`segment`]): appends, reads, truncation and purging
/// of its Raft log entries. Cheap to clone; every clone is the same log.
#[derive(Clone)]
pub struct SegmentLog {
    store: Store,
    group: GroupId,
    log: Arc<parking_lot::Mutex<segment::GroupLog>>,
}

impl std::fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLog")
            .field("group", &self.group)
            .finish()
    }
}

impl SegmentLog {
    /// Writes entries `(index, payload)` (consecutive, following the last one); returns what
    /// must be fsynced for them to be durable, and the mark that records it once they are.
    fn write(
        &self,
        entries: &[(u64, &[u8])],
    ) -> Result<(segment::SyncSet, (u64, u64)), StorageError> {
        let store = &self.store;
        store.check_poisoned()?;
        store.fenced(&[self.group], || {
            let mut log = self.log.lock();
            let written = log.append(entries).inspect_err(|e| {
                if matches!(e, StorageError::Io { .. }) {
                    store.poison("segment append", e);
                }
            })?;
            store
                .inner
                .segment_bytes_written
                .fetch_add(written, Ordering::Relaxed);
            Ok((log.take_dirty(), log.append_mark()))
        })
    }

    /// Appends entries `(index, payload)` (consecutive, following the last one) and calls
    /// `done` once they are durable, from the flusher thread. Readable when this returns.
    pub fn append(
        &self,
        entries: &[(u64, &[u8])],
        done: FlushCallback,
    ) -> Result<(), StorageError> {
        let (files, (generation, below)) = self.write(entries)?;
        let log = self.log.clone();
        self.store.inner.flusher.submit(flusher::Job {
            wal: false,
            files,
            cb: Box::new(move |r| {
                if r.is_ok() {
                    log.lock().mark_durable(generation, below);
                }
                done(r)
            }),
        });
        Ok(())
    }

    /// Appends entries like [`SegmentLog::append`] and fsyncs them on the calling thread.
    pub fn append_durably(&self, entries: &[(u64, &[u8])]) -> Result<(), StorageError> {
        let (files, (generation, below)) = self.write(entries)?;
        files.sync().map_err(|source| {
            self.store.poison("segment sync", &source);
            StorageError::Io {
                op: "sync the segments of group",
                path: std::path::PathBuf::from(self.group.to_string()),
                source,
            }
        })?;
        self.log.lock().mark_durable(generation, below);
        Ok(())
    }

    /// Every entry below this index is fsynced on this node: a message may point to it.
    pub fn durable_below(&self) -> u64 {
        self.log.lock().durable_below()
    }

    /// Records that the state machine's latest write points no message below `from`. The
    /// segments below it go once that write is durable: at the next
    /// [`Store::persist_applied`] (until then a crash could bring back messages pointing
    /// into them), and once Raft has purged them too.
    pub fn release_below(&self, from: u64) {
        self.log.lock().set_pending_release(from);
    }

    /// Visits the entries in `[from, to)` in order; `visit` returns `false` to stop.
    pub fn read(
        &self,
        from: u64,
        to: u64,
        visit: impl FnMut(u64, &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        // Located under the lock; read, checked and visited (decoded, by the log store)
        // without it, so appends never wait on a reader.
        let spans = self.log.lock().plan_read(from, to)?;
        segment::read_spans(&spans, visit)
    }

    /// Returns the entries in `[from, to)`.
    pub fn range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        self.read(from, to, |i, b| {
            out.push((i, b.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Returns the last entry.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let spans = {
            let log = self.log.lock();
            let Some(last) = log.last_index() else {
                return Ok(None);
            };
            log.plan_read(last, last + 1)?
        };
        let mut out = None;
        segment::read_spans(&spans, |i, b| {
            out = Some((i, b.to_vec()));
            Ok(false)
        })?;
        Ok(out)
    }

    /// The first and last index held, if any.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let log = self.log.lock();
        Some((log.first_index()?, log.last_index()?))
    }

    /// Removes every entry from `from` on; durable when this returns.
    pub fn truncate_from(&self, from: u64) -> Result<(), StorageError> {
        self.store.check_poisoned()?;
        self.log.lock().truncate_from(from)
    }

    /// Removes the segments whose entries are all at or below `upto`; durable when this
    /// returns. Entries at or below `upto` in a segment that also holds later ones stay
    /// until that segment goes.
    pub fn purge_through(&self, upto: u64) -> Result<(), StorageError> {
        self.store.check_poisoned()?;
        self.log.lock().purge_through(upto)
    }

    /// Removes every entry.
    pub fn clear(&self) -> Result<(), StorageError> {
        self.store.check_poisoned()?;
        self.log.lock().remove_all()
    }

    /// Bytes in the group's segment files.
    pub fn bytes(&self) -> u64 {
        self.log.lock().bytes()
    }

    /// Where entry `index`'s payload is on disk: its segment file and the payload's position
    /// in it (for inspection tools and fault-injection tests).
    pub fn locate(&self, index: u64) -> Option<(std::path::PathBuf, u64)> {
        self.log.lock().locate(index)
    }
}

/// One message read back: its offset and the encoded `StoredRecord`.
pub type RawMessage = (u64, Vec<u8>);

/// Bytes RocksDB wrote to files since the store opened, by cause (its statistics tickers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrittenBytes {
    /// Appended to the write-ahead log.
    pub wal: u64,
    /// Table files written by memtable flushes.
    pub flush: u64,
    /// Table files written by compactions.
    pub compaction: u64,
    /// Segment files (the partition logs, outside RocksDB).
    pub segments: u64,
}

/// How a [`Store`] is opened. The default is what production runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreOptions {
    /// Test-only: never preallocate file space (no `fallocate`). RocksDB normally reserves
    /// tens of MiB for its WAL ahead of time, so a disk that fills up goes unnoticed until that
    /// reserve runs out; without it the next write that needs a new page fails with ENOSPC.
    /// The chaos suite's disk-fill fault uses this to make a full disk bite at once.
    pub no_preallocation: bool,
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store at `path` with `options`.
    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StorageError> {
        Self::open_inner(path, None, options)
    }

    /// Opens an empty store that lives in memory only (RocksDB's memory environment, no
    /// WAL): the same layout and code paths as on disk, no file is written. Its data is gone
    /// when the last handle drops. `dir` is only created (empty): nothing is written in it.
    pub fn open_in_memory(dir: &Path) -> Result<Self, StorageError> {
        let env = rocksdb::Env::mem_env().map_err(rocks("create memory environment"))?;
        Self::open_inner(dir, Some(env), StoreOptions::default())
    }

    /// Returns the bytes the store holds (memtables plus table files, every column family):
    /// for a memory store, about the memory its data uses.
    pub fn approximate_bytes(&self) -> u64 {
        let db = &self.inner.db;
        ALL_CFS
            .iter()
            .filter_map(|name| db.cf_handle(name))
            .map(|cf| {
                [
                    "rocksdb.cur-size-all-mem-tables",
                    "rocksdb.total-sst-files-size",
                ]
                .iter()
                .filter_map(|p| db.property_int_value_cf(cf, *p).ok().flatten())
                .sum::<u64>()
            })
            .sum()
    }

    fn open_inner(
        path: &Path,
        env: Option<rocksdb::Env>,
        options: StoreOptions,
    ) -> Result<Self, StorageError> {
        // RocksDB's memory environment cannot resolve a relative path ("Not implemented:
        // GetAbsolutePath"), so every store is opened by its absolute path.
        let path = &std::path::absolute(path).map_err(|source| StorageError::Path {
            path: path.to_path_buf(),
            source,
        })?;
        let mut opts = Options::default();
        if let Some(env) = &env {
            opts.set_env(env);
        }
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Tickers only (no histograms or timers): bytes written by WAL, flush and compaction.
        opts.enable_statistics();
        opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        // Cold column families are flushed so WAL files can be recycled.
        opts.set_max_total_wal_size(256 << 20);
        // State machine writes skip the WAL: every column family must then be flushed at the
        // same sequence number, or a crash could keep a `last_applied` marker without the data
        // it covers.
        opts.set_atomic_flush(true);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_wal_bytes_per_sync(1 << 20);
        if options.no_preallocation {
            opts = opts
                .get_options_from_string("allow_fallocate=false")
                .map_err(rocks("set options"))?;
        }
        let cache = Cache::new_lru_cache(64 << 20);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            cf.set_block_based_table_factory(&block);
            // LZ4 on every level. Zstd on the bottommost level took 12 % of a node's CPU under
            // a produce load (each compaction recompressing fresh data) for a better ratio
            // only on compressible payloads; CPU is the scarcer resource of a broker.
            cf.set_compression_type(DBCompressionType::Lz4);
            cf.set_write_buffer_size(32 << 20);
            if *name == CF_RAFT_LOG || *name == CF_MESSAGES {
                // The two bulk column families. Every group's keys are interleaved, so each
                // level-0 file overlaps all of level 1, and a level-0 compaction rewrites the
                // whole of level 1: under a produce load compaction took 29 % of a node's CPU.
                // Bigger memtables and a later level-0 trigger rewrite level 1 several times
                // less often (reads merge a few more level-0 files, each with bloom filters).
                cf.set_write_buffer_size(64 << 20);
                cf.set_level_zero_file_num_compaction_trigger(12);
                cf.set_level_zero_slowdown_writes_trigger(40);
                cf.set_level_zero_stop_writes_trigger(56);
                cf.set_target_file_size_base(64 << 20);
                cf.set_max_bytes_for_level_base(1 << 30);
            }
            if *name == CF_RAFT_LOG {
                // Log entries live until the next snapshot purges them: compressing them on
                // every flush and compaction is wasted work.
                cf.set_compression_type(DBCompressionType::None);
            }
            if *name == CF_MESSAGES {
                // Messages of 256 bytes and more go to blob files as their memtable is
                // flushed, and table files keep only their keys and a reference: compaction
                // rewrites references, not payloads (under a 2 M × 1 KiB load it wrote as many
                // bytes again as the flushes had). Blob files whose messages retention or
                // compaction removed are garbage-collected as compaction reaches them.
                cf.set_enable_blob_files(true);
                cf.set_min_blob_size(MIN_BLOB_BYTES);
                cf.set_blob_file_size(64 << 20);
                cf.set_blob_compression_type(DBCompressionType::Lz4);
                cf.set_enable_blob_gc(true);
                cf.set_blob_gc_age_cutoff(0.25);
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs).map_err(rocks("open"))?);
        for cf in ALL_CFS {
            if db.cf_handle(cf).is_none() {
                return Err(StorageError::MissingCf(cf));
            }
        }
        check_store_format(&db, path)?;
        let poisoned = Arc::new(AtomicBool::new(false));
        let flusher = Flusher::start(db.clone(), poisoned.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                flusher,
                db,
                poisoned,
                opts,
                memory: env.is_some(),
                deleted: parking_lot::RwLock::default(),
                segments_root: env.is_none().then(|| path.join(SEGMENTS_DIR)),
                segments: segment::Registry::default(),
                segment_bytes_written: std::sync::atomic::AtomicU64::new(0),
                entry_records: std::sync::OnceLock::new(),
            }),
        })
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or(StorageError::MissingCf(name))
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        Ok(())
    }

    /// Returns a new write batch.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            groups: Vec::new(),
        }
    }

    /// Runs `write` unless the batch touches a deleted group, holding the deletion fence's
    /// read side throughout so that no deletion lands in between.
    fn fenced<T>(
        &self,
        groups: &[GroupId],
        write: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let deleted = self.inner.deleted.read();
        if let Some(g) = groups.iter().find(|g| deleted.contains(g)) {
            return Err(StorageError::GroupDeleted(*g));
        }
        write()
    }

    /// Writes a batch without waiting for fsync.
    ///
    /// A failed write poisons the store: RocksDB fails a write when it cannot append to its
    /// WAL (a full disk, an I/O error), and what reached the file is then unknown, so no
    /// later write may be acknowledged. The node is expected to stop (see
    /// [`Store::is_poisoned`]) and be restarted once the disk is fixed.
    pub fn write(&self, batch: Batch<'_>) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let Batch { wb, groups, .. } = batch;
        self.fenced(&groups, || {
            let result = if self.inner.memory {
                let mut wo = WriteOptions::default();
                wo.disable_wal(true);
                self.inner.db.write_opt(wb, &wo)
            } else {
                self.inner.db.write(wb)
            };
            result.map_err(self.poisoning("write"))
        })
    }

    /// Writes a batch of state machine changes without the WAL (see the crate docs): a crash
    /// loses what no flush has persisted yet, always a suffix of the applied entries, which
    /// the Raft log re-applies. Readable when this returns.
    pub fn write_applied(&self, batch: Batch<'_>) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        let Batch { wb, groups, .. } = batch;
        self.fenced(&groups, || {
            self.inner
                .db
                .write_opt(wb, &wo)
                .map_err(self.poisoning("write"))
        })
    }

    /// Makes every write so far durable, including [`Store::write_applied`] ones: flushes the
    /// memtables of every column family (atomically) and waits. Called before a snapshot
    /// lets Raft purge the log entries that could otherwise re-apply those writes.
    pub fn persist_applied(&self) -> Result<(), StorageError> {
        if self.inner.memory {
            return Ok(());
        }
        self.check_poisoned()?;
        let cfs = ALL_CFS
            .iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>, _>>()?;
        // Releases written before the flush are durable after it.
        let releases: Vec<_> = self
            .inner
            .segments
            .all()
            .into_iter()
            .map(|log| {
                let from = log.lock().pending_release();
                (log, from)
            })
            .collect();
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.inner
            .db
            .flush_cfs_opt(&cfs, &fo)
            .map_err(self.poisoning("flush"))?;
        for (log, from) in releases {
            // Only disk space is at stake: a segment left behind goes with a later release.
            if let Err(e) = log.lock().release_below(from) {
                tracing::warn!(error = %e, "removing segments no message points into failed");
            }
        }
        Ok(())
    }

    /// Whether a segment that no message points into any more waits for
    /// [`Store::persist_applied`] (see [`SegmentLog::release_below`]).
    pub fn releases_waiting(&self) -> bool {
        self.inner
            .segments
            .all()
            .iter()
            .any(|log| log.lock().release_waiting())
    }

    /// Maps a failed write to its error and poisons the store (see [`Store::write`]).
    fn poisoning(&self, op: &'static str) -> impl FnOnce(rocksdb::Error) -> StorageError + '_ {
        move |source| {
            self.poison(op, &source);
            StorageError::Rocks { op, source }
        }
    }

    /// Poisons the store after a failed write or fsync (of RocksDB or a segment file).
    fn poison(&self, op: &str, e: &dyn std::fmt::Display) {
        if !self.inner.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(op, error = %e, "a write to the store failed; the store is now poisoned and accepts no more writes");
        }
    }

    /// Whether a failed write or fsync poisoned the store. A poisoned store refuses every
    /// write until the node restarts.
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// Returns whether this is a memory store ([`Store::open_in_memory`]).
    pub fn is_memory(&self) -> bool {
        self.inner.memory
    }

    /// Writes a batch and fsyncs the WAL before returning.
    pub fn write_sync(&self, batch: Batch<'_>) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let Batch { wb, groups, .. } = batch;
        self.fenced(&groups, || self.write_durably(wb))
    }

    /// Writes `wb` and fsyncs the WAL (a memory store has none): the write of
    /// [`Store::write_sync`], without its checks.
    fn write_durably(&self, wb: WriteBatch) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        if self.inner.memory {
            wo.disable_wal(true);
        } else {
            wo.set_sync(true);
        }
        self.inner
            .db
            .write_opt(wb, &wo)
            .map_err(self.poisoning("sync write"))
    }

    /// Writes a batch now and calls `done` once the WAL holding it is fsynced (from the
    /// flusher thread). The write is readable when this returns.
    pub fn write_then_flush(
        &self,
        batch: Batch<'_>,
        done: FlushCallback,
    ) -> Result<(), StorageError> {
        self.write(batch)?;
        if self.inner.memory {
            done(Ok(()));
            return Ok(());
        }
        self.inner.flusher.submit(flusher::Job {
            wal: true,
            files: segment::SyncSet::default(),
            cb: done,
        });
        Ok(())
    }

    /// Fsyncs the WAL: everything written so far becomes durable.
    pub fn sync_wal(&self) -> Result<(), StorageError> {
        if self.inner.memory {
            return Ok(());
        }
        self.check_poisoned()?;
        self.inner
            .db
            .flush_wal(true)
            .map_err(self.poisoning("flush_wal"))
    }

    /// Reads `group · tag` in `cf`.
    pub fn get_tag(
        &self,
        cf: &'static str,
        group: GroupId,
        tag: u8,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner
            .db
            .get_cf(self.cf(cf)?, group_tag(group, tag))
            .map_err(rocks("get"))
    }

    /// Visits the keys `group · u64` of `cf` in `[from, upto)`, in order;
    /// `visit(n, value)` returns `false` to stop. The one range scan of the store.
    pub(crate) fn scan_range(
        &self,
        cf: &'static str,
        what: &'static str,
        group: GroupId,
        from: u64,
        upto: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        if from >= upto {
            return Ok(());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(group_u64(group, upto).to_vec());
        // The raw iterator lends each key and value: a scan of a million messages makes no
        // allocation per message (the boxed iterator copied both into two new boxes each).
        let mut it = self.inner.db.raw_iterator_cf_opt(self.cf(cf)?, ro);
        it.seek(group_u64(group, from));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let n = u64_at(k, 8).ok_or_else(|| StorageError::Corrupt {
                what,
                group,
                detail: format!("{} bytes", k.len()),
            })?;
            if !visit(n, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(rocks("iterate"))
    }

    /// Returns log entries of `group` with index in `[start, end)`, in order.
    pub fn log_range(
        &self,
        group: GroupId,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        self.scan_range(CF_RAFT_LOG, "log key", group, start, end, |i, v| {
            out.push((i, v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Returns the last log entry of `group`.
    pub fn last_log(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(group_start(group).to_vec());
        ro.set_iterate_upper_bound(group_end(group));
        let mut it = self
            .inner
            .db
            .iterator_cf_opt(self.cf(CF_RAFT_LOG)?, ro, IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(rocks("iterate log"))?;
                let index = u64_at(&k, 8).ok_or_else(|| StorageError::Corrupt {
                    what: "log key",
                    group,
                    detail: format!("{} bytes", k.len()),
                })?;
                Ok(Some((index, v.to_vec())))
            }
        }
    }

    /// Returns up to `max_count` messages of `group` from `from` (inclusive) to `upto`
    /// (exclusive), stopping once `max_bytes` is reached (at least one message is returned).
    pub fn read_messages(
        &self,
        group: GroupId,
        from: u64,
        upto: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<RawMessage>, StorageError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        self.scan_resolved(group, from, upto, |offset, record| {
            // A resolved pointer is already a fresh record: kept as it is, not copied.
            let record = record.into_owned();
            bytes += record.len();
            out.push((offset, record));
            Ok(out.len() < max_count && bytes < max_bytes)
        })?;
        Ok(out)
    }

    /// Returns the offset of the first message at or after `ts_ms`, if the time index has one.
    pub fn seek_time(&self, group: GroupId, ts_ms: i64) -> Result<Option<u64>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(group_end(group));
        let start = group_time(group, ts_ms);
        let mut it = self.inner.db.iterator_cf_opt(
            self.cf(CF_TIME_INDEX)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(rocks("iterate time index"))?;
                Ok(u64_at(&v, 0))
            }
        }
    }

    /// Visits every state-machine key of `group` (column families [`SM_CFS`]) from one
    /// consistent RocksDB snapshot, message pointers resolved to inline records. `visit(cf_index, key_suffix, value)` returns `false` to stop.
    pub fn scan_group_sm(
        &self,
        group: GroupId,
        mut visit: impl FnMut(u8, &[u8], &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        // Pinned before the snapshot: whatever it points to stays on disk while it is read.
        let mut resolver = Resolver::new(self, group);
        let snap = self.inner.db.snapshot();
        for (i, cf_name) in SM_CFS.iter().enumerate() {
            let cf = self.cf(cf_name)?;
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(group_end(group));
            ro.set_snapshot(&snap);
            let start = group_start(group);
            let it = self.inner.db.iterator_cf_opt(
                cf,
                ro,
                IteratorMode::From(&start, Direction::Forward),
            );
            for item in it {
                let (k, v) = item.map_err(rocks("scan group"))?;
                let suffix = k.get(8..).unwrap_or_default();
                let resolved = if cf_name == &CF_MESSAGES {
                    resolver.resolve(u64_at(suffix, 0).unwrap_or(0), &v)?
                } else {
                    None
                };
                if !visit(i as u8, suffix, resolved.as_deref().unwrap_or(&v))? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Visits the messages of `group` with offsets in `[from, upto)` in order, each as an
    /// inline record (pointers resolved, see [`pointer`]); `visit(offset, value)` returns
    /// `false` to stop.
    pub fn scan_messages(
        &self,
        group: GroupId,
        from: u64,
        upto: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        self.scan_resolved(group, from, upto, |o, record| visit(o, &record))
    }

    /// Like [`Store::scan_messages`], each record lent (an inline copy as RocksDB holds it)
    /// or given (a pointer resolved into a fresh record).
    fn scan_resolved(
        &self,
        group: GroupId,
        from: u64,
        upto: u64,
        mut visit: impl FnMut(u64, std::borrow::Cow<'_, [u8]>) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        use std::borrow::Cow;
        // Pinned before the scan starts: whatever it points to stays on disk while it runs.
        let mut resolver = Resolver::new(self, group);
        self.scan_range(
            CF_MESSAGES,
            "message key",
            group,
            from,
            upto,
            |o, v| match resolver.resolve(o, v)? {
                Some(record) => visit(o, Cow::Owned(record)),
                None => visit(o, Cow::Borrowed(v)),
            },
        )
    }

    /// Visits the stored values of `group`'s messages in `[from, upto)` as they are, inline
    /// records and pointers alike (fault injection and tests).
    pub fn scan_stored_messages(
        &self,
        group: GroupId,
        from: u64,
        upto: u64,
        visit: impl FnMut(u64, &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        self.scan_range(CF_MESSAGES, "message key", group, from, upto, visit)
    }

    /// Rewrites the messages of `group` in `[from, upto)` that are stored as pointers into
    /// copies, except those `skip` names (about to be deleted); returns how many it rewrote.
    /// Compaction does this to its survivors, so that the segments they pointed into can go.
    /// Written as it goes, like the state machine's own writes (without the WAL): a copy holds
    /// exactly what its pointer resolves to, so no reader sees a difference, whenever a crash
    /// comes.
    pub fn inline_pointers(
        &self,
        group: GroupId,
        from: u64,
        upto: u64,
        skip: impl Fn(u64) -> bool,
    ) -> Result<u64, StorageError> {
        let mut resolver = Resolver::new(self, group);
        let mut b = self.batch();
        let mut rewritten = 0;
        self.scan_range(CF_MESSAGES, "message key", group, from, upto, |o, v| {
            if skip(o) {
                return Ok(true);
            }
            if let Some(copy) = resolver.resolve(o, v)? {
                b.put_message(group, o, &copy)?;
                rewritten += 1;
                if b.size_bytes() >= 4 << 20 {
                    self.write_applied(std::mem::replace(&mut b, self.batch()))?;
                }
            }
            Ok(true)
        })?;
        self.write_applied(b)?;
        Ok(rewritten)
    }

    /// The log index the first message pointer at or after offset `from` names, if any.
    pub fn first_pointer(&self, group: GroupId, from: u64) -> Result<Option<u64>, StorageError> {
        let mut found = None;
        self.scan_range(CF_MESSAGES, "message key", group, from, u64::MAX, |o, v| {
            found = decode_pointer(group, o, v)?.map(|p| p.index);
            Ok(found.is_none())
        })?;
        Ok(found)
    }

    /// Installs the decoder that resolves message pointers (the first one installed stays).
    pub fn set_entry_records(&self, records: Arc<dyn pointer::EntryRecords>) {
        let _already = self.inner.entry_records.set(records);
    }

    /// Returns `group`'s segment log if it is open in this process.
    pub fn open_segment_log(&self, group: GroupId) -> Option<SegmentLog> {
        let log = self.inner.segments.get(group)?;
        Some(SegmentLog {
            store: self.clone(),
            group,
            log,
        })
    }

    /// Lists the groups that have Raft state on this node.
    pub fn hosted_groups(&self) -> Result<Vec<GroupId>, StorageError> {
        let cf = self.cf(CF_RAFT_META)?;
        let mut out = Vec::new();
        let mut next: Vec<u8> = Vec::new();
        loop {
            let mut it = self
                .inner
                .db
                .iterator_cf(cf, IteratorMode::From(&next, Direction::Forward));
            let Some(item) = it.next() else { break };
            let (k, _) = item.map_err(rocks("iterate raft meta"))?;
            let Some(group) = u64_at(&k, 0) else { break };
            out.push(group);
            match group.checked_add(1) {
                Some(n) => next = n.to_be_bytes().to_vec(),
                None => break,
            }
        }
        Ok(out)
    }

    /// Removes every key of `group` in every column family and syncs the removal. From
    /// then on every write that touches the group is refused ([`StorageError::GroupDeleted`])
    /// until [`Store::reinstate_group`]: a replica's last apply, still running while it
    /// closes, cannot write its data back after the deletion.
    pub fn delete_group(&self, group: GroupId) -> Result<(), StorageError> {
        let mut deleted = self.inner.deleted.write();
        deleted.insert(group);
        let mut b = self.batch();
        for cf in ALL_CFS {
            b.delete_group_range(cf, group)?;
        }
        self.check_poisoned()?;
        self.write_durably(b.wb)?;
        if let Some(root) = &self.inner.segments_root {
            match self.inner.segments.get(group) {
                Some(log) => log.lock().remove_all()?,
                None => segment::remove_group(root, group)?,
            }
        }
        Ok(())
    }

    /// Opens the segment log of `group` (see [`segment`]), removing segments wholly at or
    /// below `discard_through` (what Raft has purged); `None` for a memory store, whose
    /// logs stay in RocksDB.
    pub fn segment_log(
        &self,
        group: GroupId,
        discard_through: Option<u64>,
    ) -> Result<Option<SegmentLog>, StorageError> {
        self.segment_log_sized(group, discard_through, segment::DEFAULT_SEGMENT_BYTES)
    }

    /// [`Store::segment_log`] with segments of `segment_bytes` (tests use small ones).
    pub fn segment_log_sized(
        &self,
        group: GroupId,
        discard_through: Option<u64>,
        segment_bytes: u64,
    ) -> Result<Option<SegmentLog>, StorageError> {
        let Some(root) = &self.inner.segments_root else {
            return Ok(None);
        };
        let log = self
            .inner
            .segments
            .open(root, group, discard_through, segment_bytes)?;
        Ok(Some(SegmentLog {
            store: self.clone(),
            group,
            log,
        }))
    }

    /// Accepts writes to `group` again after [`Store::delete_group`] (a replica placed on
    /// this node anew).
    pub fn reinstate_group(&self, group: GroupId) {
        self.inner.deleted.write().remove(&group);
    }

    /// Returns the bytes RocksDB wrote since it opened, by cause.
    pub fn written_bytes(&self) -> WrittenBytes {
        use rocksdb::statistics::Ticker;
        let t = |ticker| self.inner.opts.get_ticker_count(ticker);
        WrittenBytes {
            wal: t(Ticker::WalFileBytes),
            flush: t(Ticker::FlushWriteBytes),
            compaction: t(Ticker::CompactWriteBytes),
            segments: self.inner.segment_bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Returns RocksDB's own statistics line for a property (for metrics and debugging).
    pub fn property(&self, name: &str) -> Option<String> {
        self.inner.db.property_value(name).ok().flatten()
    }
}

/// A write batch bound to its store, with typed writes.
pub struct Batch<'a> {
    store: &'a Store,
    wb: WriteBatch,
    /// The groups this batch writes to (for the deletion fence).
    groups: Vec<GroupId>,
}

impl Batch<'_> {
    /// Notes that the batch writes to `group`.
    fn touch(&mut self, group: GroupId) {
        if !self.groups.contains(&group) {
            self.groups.push(group);
        }
    }

    /// Puts `group · tag` in `cf`.
    pub fn put_tag(
        &mut self,
        cf: &'static str,
        group: GroupId,
        tag: u8,
        value: &[u8],
    ) -> Result<(), StorageError> {
        self.touch(group);
        self.wb
            .put_cf(self.store.cf(cf)?, group_tag(group, tag), value);
        Ok(())
    }

    /// Deletes `group · tag` in `cf`.
    pub fn delete_tag(
        &mut self,
        cf: &'static str,
        group: GroupId,
        tag: u8,
    ) -> Result<(), StorageError> {
        self.touch(group);
        self.wb.delete_cf(self.store.cf(cf)?, group_tag(group, tag));
        Ok(())
    }

    /// Puts a log entry.
    pub fn put_log(
        &mut self,
        group: GroupId,
        index: u64,
        value: &[u8],
    ) -> Result<(), StorageError> {
        self.touch(group);
        self.wb
            .put_cf(self.store.cf(CF_RAFT_LOG)?, group_u64(group, index), value);
        Ok(())
    }

    /// Deletes log entries with index in `[from, to)`.
    pub fn delete_logs(&mut self, group: GroupId, from: u64, to: u64) -> Result<(), StorageError> {
        self.touch(group);
        let cf = self.store.cf(CF_RAFT_LOG)?;
        if to == u64::MAX {
            self.wb
                .delete_range_cf(cf, &group_u64(group, from)[..], &group_end(group)[..]);
        } else {
            self.wb
                .delete_range_cf(cf, &group_u64(group, from)[..], &group_u64(group, to)[..]);
        }
        Ok(())
    }

    /// Puts a pointer for the message at `offset` (see [`pointer`]).
    pub fn put_message_pointer(
        &mut self,
        group: GroupId,
        offset: u64,
        p: &pointer::Pointer,
    ) -> Result<(), StorageError> {
        self.put_message(group, offset, &p.encode())
    }

    /// Puts a message at `offset`.
    pub fn put_message(
        &mut self,
        group: GroupId,
        offset: u64,
        value: &[u8],
    ) -> Result<(), StorageError> {
        self.touch(group);
        self.wb
            .put_cf(self.store.cf(CF_MESSAGES)?, group_u64(group, offset), value);
        Ok(())
    }

    /// Records that the first message at time `ts_ms` has `offset`.
    pub fn put_time_index(
        &mut self,
        group: GroupId,
        ts_ms: i64,
        offset: u64,
    ) -> Result<(), StorageError> {
        self.touch(group);
        self.wb.put_cf(
            self.store.cf(CF_TIME_INDEX)?,
            group_time(group, ts_ms),
            offset.to_be_bytes(),
        );
        Ok(())
    }

    /// Puts a raw state-machine key (from a snapshot stream) into `SM_CFS[cf_index]`.
    pub fn put_sm_raw(
        &mut self,
        group: GroupId,
        cf_index: u8,
        suffix: &[u8],
        value: &[u8],
    ) -> Result<(), StorageError> {
        self.touch(group);
        let name = SM_CFS
            .get(cf_index as usize)
            .copied()
            .ok_or_else(|| StorageError::Corrupt {
                what: "snapshot column family",
                group,
                detail: format!("index {cf_index}"),
            })?;
        let mut key = Vec::with_capacity(8 + suffix.len());
        key.extend_from_slice(&group.to_be_bytes());
        key.extend_from_slice(suffix);
        self.wb.put_cf(self.store.cf(name)?, key, value);
        Ok(())
    }

    fn delete_group_range(&mut self, cf: &'static str, group: GroupId) -> Result<(), StorageError> {
        self.wb.delete_range_cf(
            self.store.cf(cf)?,
            &group_start(group)[..],
            &group_end(group)[..],
        );
        Ok(())
    }

    /// Returns the encoded size of the batch.
    pub fn size_bytes(&self) -> usize {
        self.wb.size_in_bytes()
    }

    /// Returns whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }
}

/// Decodes a stored message value: `None` for an inline record, a damaged pointer as
/// corruption of the message at `offset`.
fn decode_pointer(
    group: GroupId,
    offset: u64,
    value: &[u8],
) -> Result<Option<pointer::Pointer>, StorageError> {
    pointer::Pointer::decode(value).map_err(|detail| StorageError::Corrupt {
        what: "message pointer",
        group,
        detail: format!("offset {offset}: {detail}"),
    })
}

/// Resolves the message pointers one scan meets (see [`pointer`]). It pins the group's
/// segment log as it is made, so the entries that the messages stored at that moment point to
/// stay on disk until it is dropped.
struct Resolver<'a> {
    store: &'a Store,
    group: GroupId,
    log: Option<(Arc<parking_lot::Mutex<segment::GroupLog>>, Option<u64>)>,
    /// The entry decoded last: the next pointers name it too, as a rule.
    current: Option<(u64, Box<dyn pointer::EntryMessages>)>,
}

impl<'a> Resolver<'a> {
    fn new(store: &'a Store, group: GroupId) -> Self {
        let log = store.inner.segments.get(group).map(|log| {
            let pin = log.lock().pin();
            (log, Some(pin))
        });
        Self {
            store,
            group,
            log,
            current: None,
        }
    }

    /// The inline record for a stored value: `None` when it is one already.
    fn resolve(&mut self, offset: u64, value: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let group = self.group;
        let Some(p) = decode_pointer(group, offset, value)? else {
            return Ok(None);
        };
        let entry = match &mut self.current {
            Some((index, entry)) if *index == p.index => entry,
            _ => {
                let decoded = self.decode_entry(offset, p.index)?;
                &self.current.insert((p.index, decoded)).1
            }
        };
        entry
            .record(p.ordinal, p.timestamp_ms)
            .map(Some)
            .map_err(|detail| StorageError::Corrupt {
                what: "message",
                group,
                detail: format!(
                    "offset {offset} (log entry {}, record {}): {detail}",
                    p.index, p.ordinal
                ),
            })
    }

    /// Reads log entry `index`, which the message at `offset` points to, and decodes its
    /// records.
    fn decode_entry(
        &mut self,
        offset: u64,
        index: u64,
    ) -> Result<Box<dyn pointer::EntryMessages>, StorageError> {
        let group = self.group;
        let records = self
            .store
            .inner
            .entry_records
            .get()
            .ok_or(StorageError::NoEntryDecoder { group, offset })?;
        let log = match &self.log {
            Some((log, _)) => log.clone(),
            None => {
                // Not open in this process (an offline tool): open it, nothing pinned, as
                // nothing else writes.
                let root = self.store.inner.segments_root.as_ref().ok_or_else(|| {
                    StorageError::Corrupt {
                        what: "message pointer",
                        group,
                        detail: format!("offset {offset} points into a log, in a memory store"),
                    }
                })?;
                let log = self.store.inner.segments.open(
                    root,
                    group,
                    None,
                    segment::DEFAULT_SEGMENT_BYTES,
                )?;
                self.log = Some((log.clone(), None));
                log
            }
        };
        let spans = log.lock().plan_read_kept(index, index + 1)?;
        let mut decoded = None;
        segment::read_spans(&spans, |_, entry| {
            decoded = Some(records.open(group, index, entry));
            Ok(false)
        })?;
        decoded
            .ok_or_else(|| StorageError::Corrupt {
                what: "message",
                group,
                detail: format!(
                    "offset {offset} points to log entry {index}, which is not on disk"
                ),
            })?
            .map_err(|detail| StorageError::Corrupt {
                what: "message",
                group,
                detail: format!("offset {offset} (log entry {index}): {detail}"),
            })
    }
}

impl Drop for Resolver<'_> {
    fn drop(&mut self) {
        if let Some((log, Some(pin))) = &self.log {
            log.lock().unpin(*pin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a store of format 0: the values as the builds before versioned formats wrote
    /// them, and no format key.
    fn format_0_store(path: &Path) {
        let store = Store::open(path).unwrap();
        let mut b = store.batch();
        for g in [1u64, 2] {
            for i in 0..3u64 {
                b.put_log(g, i, format!("e{g}-{i}").as_bytes()).unwrap();
                b.put_message(g, i, format!("m{g}-{i}").as_bytes()).unwrap();
            }
            b.put_tag(CF_RAFT_META, g, raft_tag::VOTE, b"vote").unwrap();
            b.put_tag(CF_RAFT_META, g, raft_tag::MEMORY_INITIALISED, b"raw")
                .unwrap();
            b.put_tag(CF_SM_META, g, sm_tag::STATE, b"state").unwrap();
            b.put_tag(CF_SM_META, g, sm_tag::SNAPSHOT_META, b"snap")
                .unwrap();
        }
        store.write_sync(b).unwrap();
        store.inner.db.delete(STORE_FORMAT_KEY).unwrap();
    }

    fn versioned(text: &str) -> Vec<u8> {
        let mut v = vec![1u8];
        v.extend_from_slice(text.as_bytes());
        v
    }

    #[test]
    fn a_format_0_store_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        format_0_store(dir.path());
        for _ in 0..2 {
            // The second open finds format 1 and rewrites nothing.
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.inner.db.get(STORE_FORMAT_KEY).unwrap().as_deref(),
                Some(&[STORE_FORMAT][..])
            );
            assert!(
                store
                    .inner
                    .db
                    .get(MIGRATION_PROGRESS_KEY)
                    .unwrap()
                    .is_none()
            );
            for g in [1u64, 2] {
                let logs = store.log_range(g, 0, 3).unwrap();
                assert_eq!(logs[2].1, versioned(&format!("e{g}-2")));
                let msgs = store.read_messages(g, 0, 3, 100, 1 << 20).unwrap();
                assert_eq!(msgs[1].1, versioned(&format!("m{g}-1")));
                assert_eq!(
                    store.get_tag(CF_RAFT_META, g, raft_tag::VOTE).unwrap(),
                    Some(versioned("vote"))
                );
                assert_eq!(
                    store.get_tag(CF_SM_META, g, sm_tag::STATE).unwrap(),
                    Some(versioned("state"))
                );
                // A snapshot record is marked version 0: its reader versions the state inside.
                assert_eq!(
                    store.get_tag(CF_SM_META, g, sm_tag::SNAPSHOT_META).unwrap(),
                    Some(b"\0snap".to_vec())
                );
                // Not a versioned encoding: left as it was.
                assert_eq!(
                    store
                        .get_tag(CF_RAFT_META, g, raft_tag::MEMORY_INITIALISED)
                        .unwrap(),
                    Some(b"raw".to_vec())
                );
            }
        }
    }

    #[test]
    fn a_migration_cut_by_a_crash_resumes_without_rewriting_twice() {
        let dir = tempfile::tempdir().unwrap();
        format_0_store(dir.path());
        {
            // As a crash would leave it: the log done, and the first raft_meta key.
            let store = Store::open(dir.path()).unwrap();
            // (That open migrated everything; undo to the crash point by hand.)
            let db = &store.inner.db;
            db.delete(STORE_FORMAT_KEY).unwrap();
            let meta = db.cf_handle(CF_RAFT_META).unwrap();
            let first_meta_key = group_tag(1, raft_tag::VOTE);
            for (cf, g) in [(CF_RAFT_META, 2u64), (CF_SM_META, 1), (CF_SM_META, 2)] {
                let (tag, raw): (u8, &[u8]) = if cf == CF_RAFT_META {
                    (raft_tag::VOTE, b"vote")
                } else {
                    (sm_tag::STATE, b"state")
                };
                db.put_cf(db.cf_handle(cf).unwrap(), group_tag(g, tag), raw)
                    .unwrap();
            }
            for g in [1u64, 2] {
                for i in 0..3u64 {
                    db.put_cf(
                        db.cf_handle(CF_MESSAGES).unwrap(),
                        group_u64(g, i),
                        format!("m{g}-{i}").as_bytes(),
                    )
                    .unwrap();
                }
            }
            assert!(db.get_cf(meta, first_meta_key).unwrap().is_some());
            let mut progress = vec![1u8];
            progress.extend_from_slice(&first_meta_key);
            db.put(MIGRATION_PROGRESS_KEY, progress).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        for g in [1u64, 2] {
            assert_eq!(
                store.get_tag(CF_RAFT_META, g, raft_tag::VOTE).unwrap(),
                Some(versioned("vote")),
                "group {g}"
            );
            assert_eq!(
                store.get_tag(CF_SM_META, g, sm_tag::STATE).unwrap(),
                Some(versioned("state"))
            );
            assert_eq!(
                store.log_range(g, 0, 1).unwrap()[0].1,
                versioned(&format!("e{g}-0"))
            );
            let msgs = store.read_messages(g, 0, 3, 100, 1 << 20).unwrap();
            assert_eq!(msgs[0].1, versioned(&format!("m{g}-0")));
        }
    }

    #[test]
    fn the_store_format_is_written_once_and_checked_at_every_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut b = store.batch();
            b.put_tag(CF_RAFT_META, 1, raft_tag::VOTE, b"v").unwrap();
            store.write_sync(b).unwrap();
            assert_eq!(
                store.inner.db.get(STORE_FORMAT_KEY).unwrap().as_deref(),
                Some(&[STORE_FORMAT][..])
            );
        }
        // Reopened: accepted, data intact.
        let store = Store::open(dir.path()).unwrap();
        assert!(
            store
                .get_tag(CF_RAFT_META, 1, raft_tag::VOTE)
                .unwrap()
                .is_some()
        );
        // A newer format is refused, naming both.
        store
            .inner
            .db
            .put(STORE_FORMAT_KEY, [STORE_FORMAT + 1])
            .unwrap();
        drop(store);
        let Err(err) = Store::open(dir.path()) else {
            panic!("a newer store format was accepted");
        };
        let text = err.to_string();
        assert!(
            text.contains(&format!("store format {}", STORE_FORMAT + 1))
                && text.contains(&format!("reads format {STORE_FORMAT}"))
                && text.contains("newer"),
            "{text}"
        );
        // Data without a format predates versioned formats: migrated (see below).
        // A memory store starts empty and gets the current format.
        let mem = tempfile::tempdir().unwrap();
        let store = Store::open_in_memory(mem.path()).unwrap();
        assert_eq!(
            store.inner.db.get(STORE_FORMAT_KEY).unwrap().as_deref(),
            Some(&[STORE_FORMAT][..])
        );
    }

    #[test]
    fn groups_are_isolated_and_deletable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        for g in [1u64, 2] {
            for i in 0..5u64 {
                b.put_log(g, i, format!("e{g}-{i}").as_bytes()).unwrap();
                b.put_message(g, i, b"m").unwrap();
            }
            b.put_tag(CF_RAFT_META, g, raft_tag::VOTE, b"v").unwrap();
        }
        store.write_sync(b).unwrap();
        assert_eq!(store.log_range(1, 1, 3).unwrap().len(), 2);
        assert_eq!(store.last_log(2).unwrap().unwrap().0, 4);
        assert_eq!(store.hosted_groups().unwrap(), vec![1, 2]);
        store.delete_group(1).unwrap();
        assert_eq!(store.hosted_groups().unwrap(), vec![2]);
        assert!(store.last_log(1).unwrap().is_none());
        assert_eq!(
            store.read_messages(2, 0, 10, 100, 1 << 20).unwrap().len(),
            5
        );
        assert!(
            store
                .read_messages(1, 0, 10, 100, 1 << 20)
                .unwrap()
                .is_empty()
        );
        // A late write to the deleted group (a closing replica's last apply) is refused
        // whichever write path it takes, and a batch touching another group too is refused
        // as a whole; other groups still take writes.
        for path in 0..3 {
            let mut b = store.batch();
            b.put_message(2, 9, b"late-other").unwrap();
            b.put_message(1, 9, b"late").unwrap();
            let res = match path {
                0 => store.write(b),
                1 => store.write_applied(b),
                _ => store.write_sync(b),
            };
            assert!(
                matches!(res, Err(StorageError::GroupDeleted(1))),
                "path {path}: {res:?}"
            );
        }
        assert!(
            store
                .read_messages(1, 0, 10, 100, 1 << 20)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.read_messages(2, 0, 10, 100, 1 << 20).unwrap().len(),
            5
        );
        assert!(
            !store.is_poisoned(),
            "a refused write must not poison the store"
        );
        // Placed here anew: writable again.
        store.reinstate_group(1);
        let mut b = store.batch();
        b.put_message(1, 0, b"again").unwrap();
        store.write(b).unwrap();
        assert_eq!(
            store.read_messages(1, 0, 10, 100, 1 << 20).unwrap().len(),
            1
        );
    }

    #[test]
    fn flushed_callback_fires_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let mut b = store.batch();
            b.put_log(9, 1, b"x").unwrap();
            store
                .write_then_flush(b, Box::new(move |r| tx.send(r.is_ok()).unwrap_or_default()))
                .unwrap();
            assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.log_range(9, 0, 5).unwrap(), vec![(1, b"x".to_vec())]);
    }

    #[test]
    fn time_index_finds_first_offset_at_or_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        b.put_time_index(3, 100, 0).unwrap();
        b.put_time_index(3, 200, 10).unwrap();
        b.put_time_index(4, 150, 99).unwrap();
        store.write(b).unwrap();
        assert_eq!(store.seek_time(3, 50).unwrap(), Some(0));
        assert_eq!(store.seek_time(3, 150).unwrap(), Some(10));
        assert_eq!(store.seek_time(3, 201).unwrap(), None);
    }

    #[test]
    fn a_memory_store_works_and_writes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_memory(dir.path()).unwrap();
        eprintln!("an empty memory store: {} bytes", store.approximate_bytes());
        let mut b = store.batch();
        b.put_message(1, 0, b"m").unwrap();
        store.write_sync(b).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut b = store.batch();
        b.put_message(1, 1, b"n").unwrap();
        store
            .write_then_flush(b, Box::new(move |r| tx.send(r.is_ok()).unwrap()))
            .unwrap();
        assert!(rx.recv().unwrap());
        store.sync_wal().unwrap();
        assert_eq!(store.read_messages(1, 0, 10, 10, 1 << 20).unwrap().len(), 2);
        assert!(store.is_memory());
        assert!(store.approximate_bytes() > 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no file written"
        );
        // A second memory store is independent.
        let other = Store::open_in_memory(dir.path()).unwrap();
        assert!(
            other
                .read_messages(1, 0, 10, 10, 1 << 20)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn format_1_and_2_stores_are_marked_format_3() {
        for older in [1u8, 2] {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = Store::open(dir.path()).unwrap();
                store.inner.db.put(STORE_FORMAT_KEY, [older]).unwrap();
            }
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.inner.db.get(STORE_FORMAT_KEY).unwrap().as_deref(),
                Some(&[3u8][..])
            );
        }
    }

    #[test]
    fn deleting_a_group_removes_its_segments_and_refuses_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seg = store.segment_log(5, None).unwrap().unwrap();
        seg.append_durably(&[(1, b"a".as_slice()), (2, b"b".as_slice())])
            .unwrap();
        let other = store.segment_log(6, None).unwrap().unwrap();
        other.append_durably(&[(1, b"c".as_slice())]).unwrap();
        let seg_dir = segment::group_dir(&dir.path().join(SEGMENTS_DIR), 5);
        assert!(seg_dir.exists());
        assert_eq!(store.written_bytes().segments, 3 * 16 + 3 + 2 * 28);
        store.delete_group(5).unwrap();
        assert!(!seg_dir.exists());
        assert_eq!(seg.bounds(), None);
        let err = seg.append_durably(&[(3, b"x".as_slice())]).unwrap_err();
        assert!(matches!(err, StorageError::GroupDeleted(5)), "{err}");
        assert!(!seg_dir.exists(), "a refused append creates nothing");
        assert_eq!(other.range(0, 10).unwrap(), vec![(1, b"c".to_vec())]);
        // Placed here again: a fresh log.
        store.reinstate_group(5);
        let seg = store.segment_log(5, None).unwrap().unwrap();
        seg.append_durably(&[(7, b"n".as_slice())]).unwrap();
        assert_eq!(seg.range(0, 10).unwrap(), vec![(7, b"n".to_vec())]);
        // A memory store keeps its logs in RocksDB.
        let mem = Store::open_in_memory(&dir.path().join("mem")).unwrap();
        assert!(mem.segment_log(5, None).unwrap().is_none());
    }
}
