//! What both state machines share: where `last_applied`, membership and the current
//! snapshot's record live, the snapshot builder, and installing a received snapshot file.

use std::io;
use std::path::{Path, PathBuf};

use junction_storage::keys::{CF_SM_META, SM_CF_MESSAGES, sm_tag, u64_at};
use junction_storage::{Batch, Store};
use junction_types::GroupId;
use openraft::RaftSnapshotBuilder;
use serde::{Deserialize, Serialize};

use crate::RaftStoreError;
use crate::format::{self, decode, encode};
use crate::snapshot::{
    DumpFilter, FRAME_END, FRAME_STATE, FrameReader, LocalSnapshot, SNAPSHOT_STREAM_VERSION,
    SnapshotData, check_complete,
};
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// What the state frame of a received snapshot says about the data around it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InstallPlan {
    /// Messages below this offset belong to the snapshot (`None`: the state is everything).
    pub messages_below: Option<u64>,
    /// Messages below this offset were removed by retention: local copies go too.
    pub start_offset: u64,
    /// Compaction ran below this offset: a local message there that the snapshot does not
    /// carry was compacted away on the sender and goes too.
    pub compacted_upto: u64,
}

/// The persisted description of the current snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta,
    state: Vec<u8>,
    messages_below: Option<u64>,
}

/// Reads `last_applied` and the last membership of `group`.
pub(crate) fn load_applied(
    store: &Store,
    group: GroupId,
) -> io::Result<(Option<LogId>, StoredMembership)> {
    let applied = match store.get_tag(CF_SM_META, group, sm_tag::APPLIED)? {
        Some(b) => Some(decode::<LogId>(&format::LOG_ID, &b)?),
        None => None,
    };
    let membership = match store.get_tag(CF_SM_META, group, sm_tag::MEMBERSHIP)? {
        Some(b) => decode::<StoredMembership>(&format::MEMBERSHIP, &b)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// Reads a state machine's persisted state and its bytes, or, for a new group, the default
/// state and its encoding (what a snapshot carries until the first apply).
/// `decode` reads the current version and upgrades older ones; the bytes returned are always
/// in the current version (a state read in an older one is encoded again).
pub(crate) fn load_state<T>(
    store: &Store,
    group: GroupId,
    format: &format::Format,
    decode: impl FnOnce(&[u8]) -> Result<T, RaftStoreError>,
) -> Result<(T, Vec<u8>), RaftStoreError>
where
    T: Default + serde::Serialize,
{
    match store.get_tag(CF_SM_META, group, sm_tag::STATE)? {
        Some(b) => {
            let state = decode(&b)?;
            let bytes = if b.first() == Some(&format.version) {
                b
            } else {
                encode(format, &state)?
            };
            Ok((state, bytes))
        }
        None => {
            let empty = T::default();
            let bytes = encode(format, &empty)?;
            Ok((empty, bytes))
        }
    }
}

/// Adds `last_applied`, membership (when changed) and the state to `batch`.
pub(crate) fn put_applied(
    b: &mut Batch<'_>,
    group: GroupId,
    applied: Option<&LogId>,
    membership: Option<&StoredMembership>,
    state: &[u8],
) -> Result<(), RaftStoreError> {
    if let Some(a) = applied {
        b.put_tag(
            CF_SM_META,
            group,
            sm_tag::APPLIED,
            &encode(&format::LOG_ID, a)?,
        )?;
    }
    if let Some(m) = membership {
        b.put_tag(
            CF_SM_META,
            group,
            sm_tag::MEMBERSHIP,
            &encode(&format::MEMBERSHIP, m)?,
        )?;
    }
    b.put_tag(CF_SM_META, group, sm_tag::STATE, state)?;
    Ok(())
}

fn filter_of(messages_below: Option<u64>) -> DumpFilter {
    match messages_below {
        Some(n) => DumpFilter::MessagesBelow(n),
        None => DumpFilter::StateOnly,
    }
}

/// Returns the current snapshot of `group`, if one was built or installed.
pub(crate) fn current_snapshot(store: &Store, group: GroupId) -> io::Result<Option<Snapshot>> {
    let Some(b) = store.get_tag(CF_SM_META, group, sm_tag::SNAPSHOT_META)? else {
        return Ok(None);
    };
    let rec = decode_snapshot_record(&b)?;
    Ok(Some(Snapshot {
        meta: rec.meta,
        snapshot: SnapshotData::Local(LocalSnapshot {
            store: store.clone(),
            group,
            state: rec.state,
            filter: filter_of(rec.messages_below),
        }),
    }))
}

/// Reads a snapshot record. Version 0 is a record migrated from store format 0: the same
/// fields, with a state machine state of format 0 inside, which becomes version 1 of its
/// format (the byte 1, then the same bytes). See `junction_storage::STORE_FORMAT`.
fn decode_snapshot_record(b: &[u8]) -> Result<SnapshotRecord, RaftStoreError> {
    if let Some((&0, body)) = b.split_first() {
        let mut rec: SnapshotRecord =
            postcard::from_bytes(body).map_err(|source| RaftStoreError::Decode {
                what: format::SNAPSHOT_RECORD.what,
                source,
            })?;
        rec.state.insert(0, 1);
        return Ok(rec);
    }
    decode(&format::SNAPSHOT_RECORD, b)
}

fn put_snapshot_record(
    b: &mut Batch<'_>,
    group: GroupId,
    rec: &SnapshotRecord,
) -> Result<(), RaftStoreError> {
    b.put_tag(
        CF_SM_META,
        group,
        sm_tag::SNAPSHOT_META,
        &encode(&format::SNAPSHOT_RECORD, rec)?,
    )?;
    Ok(())
}

/// Builds a snapshot from state captured by the state machine between two applies.
pub struct SnapshotBuilder {
    pub(crate) store: Store,
    pub(crate) group: GroupId,
    pub(crate) applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
    pub(crate) state: Vec<u8>,
    pub(crate) messages_below: Option<u64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
        };
        let rec = SnapshotRecord {
            meta: meta.clone(),
            state: self.state.clone(),
            messages_below: self.messages_below,
        };
        let store = self.store.clone();
        let group = self.group;
        tokio::task::spawn_blocking(move || -> Result<(), RaftStoreError> {
            // Invariant: once a snapshot exists, openraft may purge the logs it covers, so the
            // state machine writes it covers (written without the WAL) must be durable first.
            store.persist_applied()?;
            let mut b = store.batch();
            put_snapshot_record(&mut b, group, &rec)?;
            store.write(b)?;
            Ok(())
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::Local(LocalSnapshot {
                store: self.store.clone(),
                group: self.group,
                state: self.state.clone(),
                filter: filter_of(self.messages_below),
            }),
        })
    }
}

/// Installs a received snapshot file into `group`: writes the streamed keys in bounded
/// batches, then — in one final batch — the state, `last_applied`, membership and the
/// snapshot record, and syncs. Returns the state frame's bytes.
///
/// Crash safety: nothing is cleared first. Until the final batch lands, the old state and
/// `last_applied` stay in force, so a crash mid-install leaves a consistent (older) state
/// machine that is never behind the purged log. Overwriting instead of clearing is correct
/// because committed messages are identical on every replica: a key the snapshot writes
/// below the old end holds the same bytes, and keys above it stay invisible until re-applied
/// (deterministically, to the same bytes). (Chaos seed 7 found the clear-first version: a
/// `kill -9` mid-install lost `last_applied` while the log stayed purged, and the replica
/// could never restart.)
pub(crate) fn install_from_file(
    store: &Store,
    group: GroupId,
    meta: &SnapshotMeta,
    path: &Path,
    plan_of: impl Fn(&[u8]) -> Result<InstallPlan, RaftStoreError>,
) -> Result<Vec<u8>, RaftStoreError> {
    check_complete(path)?;
    let file = std::fs::File::open(path)
        .map_err(|_| RaftStoreError::BadSnapshot("snapshot file is missing"))?;
    let mut reader = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, file));
    let first = reader
        .next_frame()?
        .ok_or(RaftStoreError::BadSnapshot("empty snapshot"))?;
    if first.cf != FRAME_STATE {
        return Err(RaftStoreError::BadSnapshot(
            "snapshot does not start with its state",
        ));
    }
    if first.key != [SNAPSHOT_STREAM_VERSION] {
        return Err(RaftStoreError::Version {
            what: "snapshot stream",
            found: first.key.first().copied().unwrap_or(0),
            supported: SNAPSHOT_STREAM_VERSION,
        });
    }
    let state = first.value;
    let plan = plan_of(&state)?;
    let compacted = plan.start_offset..plan.compacted_upto;
    // Offsets the snapshot carries in the compacted range, ascending (frames come in order).
    let mut carried: Vec<u64> = Vec::new();
    let mut b = store.batch();
    let mut ended = false;
    while let Some(f) = reader.next_frame()? {
        if ended {
            return Err(RaftStoreError::BadSnapshot("frames after the end frame"));
        }
        if f.cf == FRAME_END {
            ended = true;
            continue;
        }
        if f.cf == FRAME_STATE {
            return Err(RaftStoreError::BadSnapshot("second state frame"));
        }
        if f.cf == SM_CF_MESSAGES
            && let Some(o) = u64_at(&f.key, 0)
            && compacted.contains(&o)
        {
            carried.push(o);
        }
        b.put_sm_raw(group, f.cf, &f.key, &f.value)?;
        if b.size_bytes() >= 4 << 20 {
            store.write(std::mem::replace(&mut b, store.batch()))?;
        }
    }
    if !ended {
        return Err(RaftStoreError::BadSnapshot(
            "truncated snapshot: no end frame",
        ));
    }
    if plan.start_offset > 0 || !compacted.is_empty() {
        // The cleanup reads the stored data: write the streamed keys first (harmless, see
        // above), then delete in the final batch.
        store.write(std::mem::replace(&mut b, store.batch()))?;
        if plan.start_offset > 0 {
            let cut = store.plan_truncate(group, plan.start_offset)?;
            b.truncate_below(group, plan.start_offset, &cut)?;
        }
        carried.sort_unstable();
        let mut stale = Vec::new();
        store.scan_stored_messages(group, compacted.start, compacted.end, |o, _| {
            if carried.binary_search(&o).is_err() {
                stale.push(o);
            }
            Ok(true)
        })?;
        for o in stale {
            b.delete_message(group, o)?;
        }
    }
    put_applied(
        &mut b,
        group,
        meta.last_log_id.as_ref(),
        Some(&meta.last_membership),
        &state,
    )?;
    let rec = SnapshotRecord {
        meta: meta.clone(),
        state: state.clone(),
        messages_below: plan.messages_below,
    };
    put_snapshot_record(&mut b, group, &rec)?;
    store.write(b)?;
    store.sync_wal()?;
    let _ignored = std::fs::remove_file(path);
    Ok(state)
}

/// The file a snapshot is installed from: a received one is already spooled; a local one
/// (this node's own state handed straight to another state machine, as openraft's storage
/// suite does) is dumped to a spool file first, so both take the same install path.
pub(crate) async fn spool_file(snapshot: SnapshotData) -> Result<PathBuf, RaftStoreError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncWriteExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let local = match snapshot {
        SnapshotData::Received(path) => return Ok(path),
        SnapshotData::Local(local) => local,
    };
    let path = std::env::temp_dir().join(format!(
        "junction-local-snapshot-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let io = |_| RaftStoreError::BadSnapshot("cannot spool a local snapshot");
    let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let dumper = tokio::task::spawn_blocking(move || local.dump(1 << 20, &tx));
    while let Some(chunk) = rx.recv().await {
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    dumper
        .await
        .map_err(|_| RaftStoreError::BadSnapshot("the local snapshot dump panicked"))??;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use junction_storage::keys::{CF_SM_META, SM_CF_MESSAGES, sm_tag};

    use super::*;
    use crate::snapshot::{write_end, write_frame};

    /// A snapshot record migrated from store format 0 (version 0, its state unversioned)
    /// reads as the same record with a version 1 state.
    #[test]
    fn a_migrated_snapshot_record_reads_with_a_versioned_state() {
        let rec = SnapshotRecord {
            meta: SnapshotMeta {
                last_log_id: Some(log_id(9)),
                last_membership: StoredMembership::default(),
            },
            state: b"format 0 state".to_vec(),
            messages_below: Some(12),
        };
        let mut migrated = vec![0u8];
        migrated.extend_from_slice(&postcard::to_allocvec(&rec).unwrap());
        let back = decode_snapshot_record(&migrated).unwrap();
        let mut want = vec![1u8];
        want.extend_from_slice(b"format 0 state");
        assert_eq!(back.state, want);
        assert_eq!(back.messages_below, Some(12));
        assert_eq!(back.meta.last_log_id, Some(log_id(9)));
        // Version 1 records read as written; unknown versions are refused.
        let v1 = encode(&format::SNAPSHOT_RECORD, &rec).unwrap();
        assert_eq!(
            decode_snapshot_record(&v1).unwrap().state,
            b"format 0 state"
        );
        let mut v2 = v1.clone();
        v2[0] = 2;
        assert!(decode_snapshot_record(&v2).is_err());
    }

    fn log_id(index: u64) -> LogId {
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    /// Regression (chaos seed 7): an install that dies midway must leave `last_applied` and
    /// the state as they were, never behind the purged log.
    /// Regression (chaos seed 11): a snapshot stream cut at a frame boundary (the sender
    /// stopped early and closed the stream cleanly) is refused, and nothing changes.
    #[test]
    fn a_snapshot_without_its_end_frame_is_never_installed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut b = store.batch();
        put_applied(&mut b, 7, Some(&log_id(100)), None, b"old state").unwrap();
        b.put_message(7, 0, b"m0").unwrap();
        store.write(b).unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(200)),
            last_membership: StoredMembership::default(),
        };
        let path = dir.path().join("snap");

        let mut stream = Vec::new();
        write_frame(
            &mut stream,
            FRAME_STATE,
            &[SNAPSHOT_STREAM_VERSION],
            b"new state",
        );
        write_frame(&mut stream, 0, &0u64.to_be_bytes(), b"m0");
        let cut = stream.len();
        write_frame(&mut stream, 0, &1u64.to_be_bytes(), b"m1");
        std::fs::write(&path, &stream[..cut]).unwrap();
        assert!(
            install_from_file(&store, 7, &meta, &path, |_| Ok(InstallPlan {
                messages_below: Some(2),
                ..InstallPlan::default()
            }))
            .is_err()
        );
        let (applied, _) = load_applied(&store, 7).unwrap();
        assert_eq!(applied.map(|l| l.index), Some(100));
        assert_eq!(store.read_messages(7, 0, 2, 10, 1 << 20).unwrap().len(), 1);

        // The same snapshot, complete, installs.
        let before = stream.len() as u64;
        write_end(&mut stream, before);
        std::fs::write(&path, &stream).unwrap();
        assert_eq!(
            install_from_file(&store, 7, &meta, &path, |_| Ok(InstallPlan {
                messages_below: Some(2),
                ..InstallPlan::default()
            }))
            .unwrap(),
            b"new state"
        );
        let (applied, _) = load_applied(&store, 7).unwrap();
        assert_eq!(applied.map(|l| l.index), Some(200));
        assert_eq!(
            store.read_messages(7, 0, 2, 10, 1 << 20).unwrap(),
            vec![(0, b"m0".to_vec()), (1, b"m1".to_vec())]
        );
    }

    #[test]
    fn an_interrupted_install_keeps_the_old_applied_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut b = store.batch();
        put_applied(&mut b, 7, Some(&log_id(100)), None, b"old state").unwrap();
        b.put_message(7, 0, b"m0").unwrap();
        store.write(b).unwrap();

        let mut stream = Vec::new();
        write_frame(
            &mut stream,
            FRAME_STATE,
            &[SNAPSHOT_STREAM_VERSION],
            b"new state",
        );
        write_frame(&mut stream, 0, &0u64.to_be_bytes(), b"m0");
        write_frame(&mut stream, 0, &1u64.to_be_bytes(), b"m1");
        stream.truncate(stream.len() - 1); // the sender died mid-frame
        let path = dir.path().join("snap");
        std::fs::write(&path, &stream).unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(200)),
            last_membership: StoredMembership::default(),
        };
        assert!(
            install_from_file(&store, 7, &meta, &path, |_| Ok(InstallPlan {
                messages_below: Some(2),
                ..InstallPlan::default()
            }))
            .is_err()
        );

        let (applied, _) = load_applied(&store, 7).unwrap();
        assert_eq!(applied.map(|l| l.index), Some(100));
        assert_eq!(
            store
                .get_tag(CF_SM_META, 7, sm_tag::STATE)
                .unwrap()
                .as_deref(),
            Some(&b"old state"[..])
        );
        assert_eq!(
            store.read_messages(7, 0, 1, 10, 1 << 20).unwrap(),
            vec![(0, b"m0".to_vec())]
        );
    }

    /// A replica that was down while retention and compaction ran ends, after installing
    /// the snapshot, with exactly the sender's messages: nothing below the first offset and
    /// no local message the sender compacted away.
    #[test]
    fn install_drops_truncated_and_compacted_local_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut b = store.batch();
        put_applied(&mut b, 9, Some(&log_id(10)), None, b"old").unwrap();
        for o in 0..10u64 {
            b.put_message(9, o, b"local").unwrap();
        }
        b.put_size_index(9, 0, 0, &[5; 10]).unwrap();
        store.write(b).unwrap();

        let mut stream = Vec::new();
        write_frame(&mut stream, FRAME_STATE, &[SNAPSHOT_STREAM_VERSION], b"new");
        for o in [5u64, 7, 8, 9, 10, 11] {
            write_frame(&mut stream, SM_CF_MESSAGES, &o.to_be_bytes(), b"sent");
        }
        let before = stream.len() as u64;
        write_end(&mut stream, before);
        let path = dir.path().join("snap");
        std::fs::write(&path, &stream).unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(20)),
            last_membership: StoredMembership::default(),
        };
        install_from_file(&store, 9, &meta, &path, |_| {
            Ok(InstallPlan {
                messages_below: Some(12),
                start_offset: 4,
                compacted_upto: 8,
            })
        })
        .unwrap();
        let left: Vec<u64> = store
            .read_messages(9, 0, 100, 100, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        assert_eq!(left, vec![5, 7, 8, 9, 10, 11]);
        let (applied, _) = load_applied(&store, 9).unwrap();
        assert_eq!(applied.map(|l| l.index), Some(20));
    }
}
