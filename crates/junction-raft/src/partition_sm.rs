//! The partition state machine: an append-only message log with dense offsets.
//!
//! Applying `Append` writes each record at the next offset, the batch's first offset under
//! its timestamp in the time index, and the new state with `last_applied` — all in one
//! RocksDB write batch, so the state machine is always at a consistent log prefix.
//!
//! `Truncate` (retention) and `Compact` (key compaction) are decided by the leader and
//! applied here by every replica: truncation is a range delete below the cut, compaction
//! removes superseded messages below its point (see [`crate::compaction`]). Both first write
//! the entries applied before them in the same call, because they read the stored data.

use std::io;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use junction_storage::Store;
use junction_storage::keys::{CF_SM_META, sm_tag};
use junction_storage::pointer::Pointer;
use junction_types::command::{BatchOutcome, SpannedBatch};
use junction_types::exactly_once::{
    DedupIndex, DeliveryPolicy, MSG_ID_HEADER, Placement, ProducerTable, SequenceCheck,
};
use junction_types::groups::cursor_v2::{self, GroupCursorsV2};
use junction_types::groups::cursor_v3::{self, GroupCursorsV3};
use junction_types::groups::{GroupCursors, apply_cursor_command};
use junction_types::{Command, CommandResponse, GroupId, PartitionCommand, Record, StoredRecord};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::RaftStoreError;
use crate::format::{self, encode};
use crate::sm_common::{self, SnapshotBuilder};
use crate::snapshot::SnapshotData;
use crate::tail::{TailBudget, TailWindow};
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// The small state of a partition besides its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// The offset the next message gets (the high watermark).
    pub next_offset: u64,
    /// The first offset still stored.
    pub start_offset: u64,
    /// The largest timestamp assigned so far; timestamps never go backwards.
    pub last_timestamp_ms: i64,
    /// Key compaction has run over the offsets below this one.
    pub compacted_upto: u64,
    /// The bytes (key + headers + payload) of every message ever appended; the size index
    /// records it per batch.
    pub appended_bytes: u64,
    /// Tombstones kept by the last compaction (younger than their delay).
    pub tombstones: u64,
    /// The largest tombstone cut-off applied so far (compaction never un-expires).
    pub tombstone_cutoff_ms: i64,
    /// When a memory partition lost every replica and restarted empty (0: never).
    pub data_lost_at_ms: i64,
}

/// What the state machine persists besides messages (and what a snapshot's state frame holds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PersistedState {
    log: PartitionState,
    /// Consumer group name → position in this partition.
    groups: GroupCursors,
    /// Idempotent producers' sequences and recent batches.
    producers: ProducerTable,
    /// The first offset the message-id dedup index covers (the index itself is rebuilt from
    /// the messages stored from there on).
    dedup_from: u64,
}

impl PersistedState {
    /// Decodes the current version, or upgrades version 1 (log state and group positions),
    /// version 2 (cursors without parked keys) and version 3 (cursors without isolation).
    fn decode(b: &[u8]) -> Result<Self, RaftStoreError> {
        format::decode_upgrading(&format::PARTITION_STATE, b, |version, body| match version {
            1 => Some(
                format::decode_body::<(PartitionState, GroupCursorsV2)>(
                    &format::PARTITION_STATE,
                    body,
                )
                .map(|(log, groups)| PersistedState {
                    log,
                    groups: cursor_v2::upgrade(groups),
                    producers: ProducerTable::default(),
                    dedup_from: log.next_offset,
                }),
            ),
            2 => Some(
                format::decode_body::<(PartitionState, GroupCursorsV2, ProducerTable, u64)>(
                    &format::PARTITION_STATE,
                    body,
                )
                .map(|(log, groups, producers, dedup_from)| PersistedState {
                    log,
                    groups: cursor_v2::upgrade(groups),
                    producers,
                    dedup_from,
                }),
            ),
            3 => Some(
                format::decode_body::<(PartitionState, GroupCursorsV3, ProducerTable, u64)>(
                    &format::PARTITION_STATE,
                    body,
                )
                .map(|(log, groups, producers, dedup_from)| PersistedState {
                    log,
                    groups: cursor_v3::upgrade(groups),
                    producers,
                    dedup_from,
                }),
            ),
            _ => None,
        })
    }
}

/// What `station describe` shows of a partition's exactly-once state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactlyOnceStats {
    /// Idempotent producers with state in the partition.
    pub producers: u64,
    /// Message ids in the dedup window, and their bytes.
    pub dedup_ids: u64,
    pub dedup_id_bytes: u64,
}

/// What readers of a partition watch: the applied state, updated after every apply.
#[derive(Debug)]
pub struct PartitionShared {
    tx: watch::Sender<PartitionState>,
    groups: watch::Sender<Arc<GroupCursors>>,
    exactly_once: watch::Sender<ExactlyOnceStats>,
    window: TailWindow,
}

impl PartitionShared {
    /// Returns the state as of the last apply.
    pub fn current(&self) -> PartitionState {
        *self.tx.borrow()
    }

    /// Returns a receiver that sees every new applied state.
    pub fn subscribe(&self) -> watch::Receiver<PartitionState> {
        self.tx.subscribe()
    }

    /// Returns the consumer group cursors as of the last apply.
    pub fn cursors(&self) -> Arc<GroupCursors> {
        self.groups.borrow().clone()
    }

    /// Returns the exactly-once state's size as of the last apply.
    pub fn exactly_once(&self) -> ExactlyOnceStats {
        *self.exactly_once.borrow()
    }

    /// Returns the window of the most recently applied messages (see [`crate::tail`]).
    pub fn window(&self) -> &TailWindow {
        &self.window
    }

    /// Returns a receiver that sees every change of the consumer group cursors.
    pub fn subscribe_cursors(&self) -> watch::Receiver<Arc<GroupCursors>> {
        self.groups.subscribe()
    }
}

/// The state machine of one partition group.
pub struct PartitionStateMachine {
    store: Store,
    group: GroupId,
    state: PartitionState,
    groups: Arc<GroupCursors>,
    producers: ProducerTable,
    dedup: DedupIndex,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// The encoding of `state` and `groups` as last persisted: what a snapshot carries.
    state_bytes: Vec<u8>,
    shared: Arc<PartitionShared>,
    /// The partition's segment log, when its messages may point into it (a partition on
    /// disk; see [`junction_storage::pointer`]).
    log: Option<junction_storage::SegmentLog>,
    /// The first log index a stored message points to (`None`: none does).
    pointers_from: Option<u64>,
}

impl PartitionStateMachine {
    /// Opens the state machine of `group`, recovering its state from the store; its tail
    /// window draws on `budget`.
    pub fn open(store: Store, group: GroupId, budget: Arc<TailBudget>) -> io::Result<Self> {
        crate::pointers::install(&store);
        // Open already when the group's log store was opened first, as a node does.
        let log = store.open_segment_log(group);
        let pointers_from = match store.get_tag(CF_SM_META, group, sm_tag::POINTERS_FROM)? {
            Some(b) => Some(format::decode::<u64>(&format::POINTERS_FROM, &b)?),
            None => None,
        };
        let (applied, membership) = sm_common::load_applied(&store, group)?;
        let (persisted, state_bytes) = sm_common::load_state(
            &store,
            group,
            &format::PARTITION_STATE,
            PersistedState::decode,
        )?;
        let state = persisted.log;
        let groups = Arc::new(persisted.groups);
        let dedup = rebuild_dedup(&store, group, persisted.dedup_from, state.next_offset)?;
        let (tx, _) = watch::channel(state);
        let (gtx, _) = watch::channel(groups.clone());
        let (etx, _) = watch::channel(ExactlyOnceStats::default());
        let sm = Self {
            store,
            group,
            state,
            groups,
            producers: persisted.producers,
            dedup,
            applied,
            membership,
            state_bytes,
            shared: Arc::new(PartitionShared {
                tx,
                groups: gtx,
                exactly_once: etx,
                window: TailWindow::new(budget),
            }),
            log,
            pointers_from,
        };
        sm.release_unpointed();
        sm.publish_exactly_once();
        Ok(sm)
    }

    /// Tells the segment log where stored messages start to point: the segments below it go
    /// once that is durable and Raft has purged them.
    fn release_unpointed(&self) {
        if let Some(log) = &self.log {
            let next = self.applied.map_or(0, |a| a.index + 1);
            log.release_below(self.pointers_from.unwrap_or(next));
        }
    }

    /// Finds where stored messages start to point after messages were removed (retention or
    /// compaction), and records it in `b` if it moved. Messages at or above `from` are all
    /// the ones that may still point (compaction writes its survivors inline).
    fn repoint(
        &mut self,
        b: &mut junction_storage::Batch<'_>,
        from: u64,
    ) -> Result<(), RaftStoreError> {
        if self.pointers_from.is_none() {
            return Ok(());
        }
        let found = self.store.first_pointer(self.group, from)?;
        self.set_pointers_from(b, found)
    }

    fn set_pointers_from(
        &mut self,
        b: &mut junction_storage::Batch<'_>,
        to: Option<u64>,
    ) -> Result<(), RaftStoreError> {
        if to == self.pointers_from {
            return Ok(());
        }
        match to {
            Some(i) => b.put_tag(
                CF_SM_META,
                self.group,
                sm_tag::POINTERS_FROM,
                &encode(&format::POINTERS_FROM, &i)?,
            )?,
            None => b.delete_tag(CF_SM_META, self.group, sm_tag::POINTERS_FROM)?,
        }
        self.pointers_from = to;
        Ok(())
    }

    fn publish_exactly_once(&self) {
        self.shared.exactly_once.send_replace(ExactlyOnceStats {
            producers: self.producers.len() as u64,
            dedup_ids: self.dedup.len() as u64,
            dedup_id_bytes: self.dedup.id_bytes() as u64,
        });
    }

    /// Returns the handle readers use to follow this partition.
    pub fn shared(&self) -> Arc<PartitionShared> {
        self.shared.clone()
    }

    fn encode_state(
        &self,
        log: &PartitionState,
        groups: &GroupCursors,
    ) -> Result<Vec<u8>, RaftStoreError> {
        // Encoded field by field like `PersistedState`, without cloning the cursors and
        // producers on every apply.
        encode(
            &format::PARTITION_STATE,
            &(log, groups, &self.producers, self.dedup.from_offset()),
        )
    }

    /// Applies one `AppendBatches` entry: for each batch, the producer sequence check, then
    /// the dedup window, then the append of what remains.
    fn append_batches(
        &mut self,
        b: &mut junction_storage::Batch<'_>,
        state: &mut PartitionState,
        (timestamp_ms, delivery): (i64, &DeliveryPolicy),
        batches: Vec<SpannedBatch>,
        at: Option<u64>,
        fresh: &mut Fresh,
    ) -> Result<CommandResponse, RaftStoreError> {
        let ts = timestamp_ms.max(state.last_timestamp_ms);
        self.producers.expire(ts, delivery.producer_expiry_ms);
        match delivery.dedup_window_ms {
            Some(w) => self.dedup.expire(ts, w),
            None => self.dedup.disable(state.next_offset),
        }
        let mut outcomes = Vec::with_capacity(batches.len());
        // What the batches store, written at the end in one go (one size-index record per
        // entry, as for a plain append); `next` is where the next stored record lands.
        let mut stored: Vec<(u32, Record)> = Vec::new();
        // Each record's place in the entry (see `pointers::records_of`).
        let mut ordinal = 0u32;
        for SpannedBatch {
            batch,
            sequence_span,
        } in batches
        {
            let first_ordinal = ordinal;
            ordinal =
                ordinal.saturating_add(u32::try_from(batch.records.len()).unwrap_or(u32::MAX));
            let next = state.next_offset + stored.len() as u64;
            // The producer's sequence counts what it sent, including records taken out before
            // the entry (a plain batch's span is its length).
            let count = sequence_span;
            if let Some(p) = &batch.producer {
                match self.producers.check(p, count) {
                    SequenceCheck::Append => {}
                    SequenceCheck::Duplicate(placement) => {
                        outcomes.push(Ok(BatchOutcome {
                            placement,
                            duplicate: true,
                        }));
                        continue;
                    }
                    SequenceCheck::Reject(r) => {
                        outcomes.push(Err(r));
                        continue;
                    }
                }
            }
            let mut records: Vec<(u32, Record)> = (first_ordinal..).zip(batch.records).collect();
            let mut dups = Vec::new();
            if delivery.dedup_window_ms.is_some() {
                let plain = records.iter().map(|(_, r)| r);
                let plan = match self.dedup.plan(plain, next, delivery.dedup_max_ids) {
                    Ok(plan) => plan,
                    Err(r) => {
                        outcomes.push(Err(r));
                        continue;
                    }
                };
                self.dedup.commit(&plan, ts);
                if !plan.dups.is_empty() {
                    let keep: std::collections::HashSet<u32> = plan.store.iter().copied().collect();
                    let mut i = 0u32;
                    records.retain(|_| {
                        let k = keep.contains(&i);
                        i += 1;
                        k
                    });
                }
                dups = plan.dups;
            } else {
                self.dedup.disable(next + records.len() as u64);
            }
            stored.extend(records);
            let placement = Placement {
                base_offset: next,
                timestamp_ms: ts,
                dups,
            };
            if let Some(p) = &batch.producer {
                self.producers.record(p, count, placement.clone());
            }
            outcomes.push(Ok(BatchOutcome {
                placement,
                duplicate: false,
            }));
        }
        self.append_records(b, state, ts, stored, at, fresh)?;
        Ok(CommandResponse::Batches(outcomes))
    }

    /// Writes records `(ordinal, record)` at the next offsets with timestamp `ts` (≥ the last
    /// one); returns the first offset. With `at` (the index of their log entry, durable on
    /// this node) each is stored as a pointer into the log, else as a copy.
    fn append_records(
        &mut self,
        b: &mut junction_storage::Batch<'_>,
        state: &mut PartitionState,
        ts: i64,
        records: Vec<(u32, Record)>,
        at: Option<u64>,
        fresh: &mut Fresh,
    ) -> Result<u64, RaftStoreError> {
        let base = state.next_offset;
        let count = records.len() as u64;
        if count == 0 {
            // Every record was a duplicate: nothing to write, no timestamp to advance.
            return Ok(base);
        }
        let sizes: Vec<u32> = records
            .iter()
            .map(|(_, r)| u32::try_from(r.size()).unwrap_or(u32::MAX))
            .collect();
        if !sizes.is_empty() {
            b.put_size_index(self.group, base, state.appended_bytes, &sizes)?;
            state.appended_bytes += sizes.iter().map(|s| u64::from(*s)).sum::<u64>();
        }
        if ts > state.last_timestamp_ms || base == 0 {
            b.put_time_index(self.group, ts, base)?;
        }
        if let Some(index) = at
            && self.pointers_from.is_none()
        {
            self.set_pointers_from(b, Some(index))?;
        }
        for (i, (ordinal, r)) in records.into_iter().enumerate() {
            let offset = base + i as u64;
            let stored = StoredRecord {
                timestamp_ms: ts,
                key: r.key,
                headers: r.headers,
                payload: r.payload,
            };
            let encoded = format::encode_record(&stored)?;
            match at {
                Some(index) => b.put_message_pointer(
                    self.group,
                    offset,
                    &Pointer {
                        index,
                        ordinal,
                        timestamp_ms: ts,
                    },
                )?,
                None => b.put_message(self.group, offset, &encoded)?,
            }
            fresh.push(offset, encoded);
        }
        state.next_offset = base + count;
        state.last_timestamp_ms = ts;
        Ok(base)
    }
}

impl RaftStateMachine<TypeConfig> for PartitionStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        // A handle of its own: the write batch borrows it while `self` changes.
        let store = self.store.clone();
        let mut b = store.batch();
        let mut state = self.state;
        let mut groups: Option<GroupCursors> = None;
        let mut applied = None;
        let mut membership = None;
        let mut replies = Vec::new();
        let mut fresh = Fresh::default();
        while let Some((entry, responder)) = entries.try_next().await? {
            applied = Some(entry.log_id);
            // Messages point into the log only where it is fsynced on this node: openraft
            // applies what a quorum holds, which may not yet include this node's own copy.
            let at = self
                .log
                .as_ref()
                .filter(|log| log.durable_below() > entry.log_id.index)
                .map(|_| entry.log_id.index);
            let payload = match entry.payload {
                // The leader's checksum: checked on receipt (the peer service), and again here
                // before anything is stored, against a change in this node's memory or log.
                EntryPayload::Normal(Command::Partition(PartitionCommand::Checked {
                    crc,
                    command,
                })) => match PartitionCommand::verify(crc, *command) {
                    Ok(c) => EntryPayload::Normal(Command::Partition(c)),
                    Err(e) => {
                        return Err(RaftStoreError::Corrupt {
                            what: "log entry",
                            detail: format!("group {} at {}: {e}", self.group, entry.log_id),
                        }
                        .into());
                    }
                },
                p => p,
            };
            let resp = match payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResponse::None
                }
                EntryPayload::Normal(Command::Partition(PartitionCommand::Append {
                    timestamp_ms,
                    records,
                })) => {
                    // Written by a leader that needed no exactly-once checks: no dedup window.
                    let ts = timestamp_ms.max(state.last_timestamp_ms);
                    let count = records.len() as u32;
                    self.dedup.disable(state.next_offset + u64::from(count));
                    let records = (0..).zip(records).collect();
                    let base =
                        self.append_records(&mut b, &mut state, ts, records, at, &mut fresh)?;
                    CommandResponse::Appended {
                        base_offset: base,
                        count,
                        timestamp_ms: ts,
                    }
                }
                EntryPayload::Normal(Command::Partition(PartitionCommand::AppendBatches {
                    timestamp_ms,
                    delivery,
                    batches,
                })) => {
                    let batches = batches
                        .into_iter()
                        .map(|batch| SpannedBatch {
                            sequence_span: u32::try_from(batch.records.len()).unwrap_or(u32::MAX),
                            batch,
                        })
                        .collect();
                    self.append_batches(
                        &mut b,
                        &mut state,
                        (timestamp_ms, &delivery),
                        batches,
                        at,
                        &mut fresh,
                    )?
                }
                EntryPayload::Normal(Command::Partition(PartitionCommand::AppendSpanned {
                    timestamp_ms,
                    delivery,
                    batches,
                })) => self.append_batches(
                    &mut b,
                    &mut state,
                    (timestamp_ms, &delivery),
                    batches,
                    at,
                    &mut fresh,
                )?,
                EntryPayload::Normal(Command::Partition(PartitionCommand::Truncate { before })) => {
                    // The cut reads the stored indexes: write what this call applied so far.
                    self.store
                        .write_applied(std::mem::replace(&mut b, store.batch()))
                        .map_err(RaftStoreError::from)?;
                    fresh.hand_to(&self.shared.window);
                    let before = before.min(state.next_offset);
                    let mut removed = 0;
                    if before > state.start_offset {
                        let plan = self
                            .store
                            .plan_truncate(self.group, before)
                            .map_err(RaftStoreError::from)?;
                        b.truncate_below(self.group, before, &plan)
                            .map_err(RaftStoreError::from)?;
                        self.dedup.truncate(before);
                        self.shared.window.trim_below(before);
                        removed = before - state.start_offset;
                        state.start_offset = before;
                        // Group positions below the cut skip forward with it.
                        let g = groups.get_or_insert_with(|| (*self.groups).clone());
                        for c in g.values_mut() {
                            c.skip_to(before);
                        }
                        self.repoint(&mut b, before.max(state.compacted_upto))?;
                    }
                    CommandResponse::Retained {
                        start_offset: state.start_offset,
                        removed,
                    }
                }
                EntryPayload::Normal(Command::Partition(PartitionCommand::Compact {
                    upto,
                    tombstones_before_ms,
                })) => {
                    self.store
                        .write_applied(std::mem::replace(&mut b, store.batch()))
                        .map_err(RaftStoreError::from)?;
                    fresh.hand_to(&self.shared.window);
                    let upto = upto.min(state.next_offset);
                    let cutoff = tombstones_before_ms.max(state.tombstone_cutoff_ms);
                    // The scan reads the whole range: keep it off the async workers.
                    let (store, group, from) = (self.store.clone(), self.group, state.start_offset);
                    let plan = tokio::task::spawn_blocking(move || {
                        crate::compaction::plan_stored(&store, group, from, upto, cutoff)
                    })
                    .await
                    .map_err(io::Error::other)??;
                    // Survivors that point into the log become copies, so the segments
                    // below the compacted range can go once retention no longer needs them.
                    if self.pointers_from.is_some() {
                        let (store, group, from) =
                            (self.store.clone(), self.group, state.start_offset);
                        let removed = plan.remove.clone();
                        tokio::task::spawn_blocking(move || {
                            store.inline_pointers(group, from, upto, |o| {
                                removed.binary_search(&o).is_ok()
                            })
                        })
                        .await
                        .map_err(io::Error::other)?
                        .map_err(RaftStoreError::from)?;
                    }
                    crate::compaction::apply_plan(&mut b, self.group, &plan)?;
                    self.dedup.removed(&plan.remove);
                    // Compaction removed messages below `upto`: the window keeps none of them.
                    self.shared.window.trim_below(upto);
                    state.compacted_upto = state.compacted_upto.max(upto);
                    self.repoint(&mut b, state.compacted_upto.max(state.start_offset))?;
                    state.tombstone_cutoff_ms = cutoff;
                    state.tombstones = plan.tombstones_kept;
                    CommandResponse::Retained {
                        start_offset: state.start_offset,
                        removed: plan.remove.len() as u64,
                    }
                }
                EntryPayload::Normal(Command::Partition(PartitionCommand::DataLost { at_ms })) => {
                    state.data_lost_at_ms = at_ms;
                    CommandResponse::Done
                }
                EntryPayload::Normal(Command::Partition(cmd)) => {
                    let g = groups.get_or_insert_with(|| (*self.groups).clone());
                    apply_cursor_command(g, &cmd, state.start_offset, state.next_offset)
                }
                EntryPayload::Normal(Command::Meta(_)) => CommandResponse::WrongGroup,
            };
            if let Some(r) = responder {
                replies.push((r, resp));
            }
        }
        let state_bytes = self.encode_state(&state, groups.as_ref().unwrap_or(&self.groups))?;
        sm_common::put_applied(
            &mut b,
            self.group,
            applied.as_ref(),
            membership.as_ref(),
            &state_bytes,
        )?;
        self.store.write_applied(b).map_err(RaftStoreError::from)?;
        // Readers woken by the new state find its messages in the window.
        fresh.hand_to(&self.shared.window);
        if applied.is_some() {
            self.applied = applied;
        }
        self.release_unpointed();
        if let Some(m) = membership {
            self.membership = m;
        }
        self.state = state;
        self.state_bytes = state_bytes;
        self.shared.tx.send_replace(state);
        self.publish_exactly_once();
        if let Some(g) = groups {
            self.groups = Arc::new(g);
            self.shared.groups.send_replace(self.groups.clone());
        }
        for (r, resp) in replies {
            r.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            group: self.group,
            applied: self.applied,
            membership: self.membership.clone(),
            state: self.state_bytes.clone(),
            messages_below: Some(self.state.next_offset),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let path = sm_common::spool_file(snapshot).await?;
        let store = self.store.clone();
        let group = self.group;
        let meta2 = meta.clone();
        let state_bytes = tokio::task::spawn_blocking(move || {
            sm_common::install_from_file(&store, group, &meta2, &path, |s| {
                let st = PersistedState::decode(s)?.log;
                Ok(sm_common::InstallPlan {
                    messages_below: Some(st.next_offset),
                    start_offset: st.start_offset,
                    compacted_upto: st.compacted_upto,
                })
            })
        })
        .await
        .map_err(io::Error::other)??;
        // Every message the snapshot carries is a copy: none points into the log any more.
        let store = self.store.clone();
        let mut b = store.batch();
        self.set_pointers_from(&mut b, None)?;
        store.write(b).map_err(RaftStoreError::from)?;
        let persisted = PersistedState::decode(&state_bytes)?;
        let state = persisted.log;
        let (store, group, from) = (self.store.clone(), self.group, persisted.dedup_from);
        self.dedup = tokio::task::spawn_blocking(move || {
            rebuild_dedup(&store, group, from, state.next_offset)
        })
        .await
        .map_err(io::Error::other)??;
        self.producers = persisted.producers;
        // Snapshots from earlier builds carry version 1: keep the state in the current one.
        self.state_bytes = self.encode_state(&state, &persisted.groups)?;
        self.state = state;
        self.groups = Arc::new(persisted.groups);
        self.publish_exactly_once();
        self.shared.groups.send_replace(self.groups.clone());
        self.shared.window.clear();
        self.applied = meta.last_log_id;
        self.release_unpointed();
        self.membership = meta.last_membership.clone();
        self.shared.tx.send_replace(state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        sm_common::current_snapshot(&self.store, self.group)
    }
}

/// The messages one `apply` call stored, kept for the tail window until their write is done.
#[derive(Default)]
struct Fresh {
    base: u64,
    records: Vec<bytes::Bytes>,
}

impl Fresh {
    fn push(&mut self, offset: u64, encoded: Vec<u8>) {
        if self.base + self.records.len() as u64 != offset {
            // Not contiguous (never expected): the window only ever takes a contiguous run.
            self.records.clear();
        }
        if self.records.is_empty() {
            self.base = offset;
        }
        self.records.push(bytes::Bytes::from(encoded));
    }

    /// Hands the messages written so far to `window`.
    fn hand_to(&mut self, window: &TailWindow) {
        if !self.records.is_empty() {
            window.append(self.base, std::mem::take(&mut self.records));
        }
    }
}

/// Rebuilds the dedup index from the stored messages at offsets `from..upto`.
fn rebuild_dedup(
    store: &Store,
    group: GroupId,
    from: u64,
    upto: u64,
) -> Result<DedupIndex, RaftStoreError> {
    let mut index = DedupIndex::new(from);
    let mut bad: Option<RaftStoreError> = None;
    store.scan_messages(
        group,
        from,
        upto,
        |offset, value| match format::decode_record(value) {
            Ok(r) => {
                if let Some((_, id)) = r.headers.iter().find(|(k, _)| k == MSG_ID_HEADER) {
                    index.rebuild_add(offset, r.timestamp_ms, id);
                }
                Ok(true)
            }
            Err(e) => {
                bad = Some(e);
                Ok(false)
            }
        },
    )?;
    match bad {
        Some(e) => Err(e),
        None => Ok(index),
    }
}

#[cfg(test)]
mod persisted_tests {
    use junction_types::groups::GroupCursor;

    use super::*;

    /// `encode_state` writes a borrowed tuple; it must decode as `PersistedState`.
    #[test]
    fn the_borrowed_encoding_decodes_as_the_persisted_state() {
        let log = PartitionState {
            next_offset: 7,
            start_offset: 2,
            ..PartitionState::default()
        };
        let mut groups = GroupCursors::new();
        let mut c = GroupCursor::new(3, 2);
        c.ack(5);
        groups.insert("g".into(), c);
        let mut producers = ProducerTable::default();
        producers.record(
            &junction_types::exactly_once::ProducerBatch {
                id: 4,
                epoch: 1,
                base_sequence: 0,
            },
            2,
            Placement::default(),
        );
        let bytes = encode(&format::PARTITION_STATE, &(&log, &groups, &producers, 6u64)).unwrap();
        let back = PersistedState::decode(&bytes).unwrap();
        assert_eq!(back.log, log);
        assert_eq!(back.groups, groups);
        assert_eq!(back.producers, producers);
        assert_eq!(back.dedup_from, 6);
    }

    /// Version 1 (log state and groups only) is upgraded: no producers, and the dedup window
    /// covers nothing stored before.
    #[test]
    fn version_1_is_upgraded() {
        let log = PartitionState {
            next_offset: 7,
            ..PartitionState::default()
        };
        let mut bytes = postcard::to_allocvec(&(&log, &GroupCursors::new())).unwrap();
        bytes.insert(0, 1);
        let back = PersistedState::decode(&bytes).unwrap();
        assert_eq!(back.log, log);
        assert!(back.producers.is_empty());
        assert_eq!(back.dedup_from, 7);
        bytes[0] = 9;
        assert!(PersistedState::decode(&bytes).is_err());
    }
}
