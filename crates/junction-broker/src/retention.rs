//! Retention and compaction, driven by each partition's leader.
//!
//! Every retention tick, the leader of a partition whose station has limits works out "remove
//! everything below offset N" ([`truncate_before`], a pure function of the partition's state
//! and the station's policy) and replicates it as a `Truncate { before: N }` entry; every
//! replica then cuts at the same offset with range deletes. Key compaction is the same: the
//! leader replicates `Compact { upto, tombstones_before_ms }` and every replica runs the same
//! deterministic compaction. With `discard: new`, byte and message limits refuse produces
//! (in the partition's batcher, see [`Admission`]) instead of removing messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use junction_raft::{PartitionShared, PartitionState};
use junction_storage::Store;
use junction_types::groups::{Isolation, Lag};
use junction_types::{
    Command, CommandResponse, CompactionPolicy, DiscardPolicy, GroupId, PartitionCommand, Record,
    Retention, StationMeta, StationPolicy,
};
use parking_lot::RwLock;

use crate::partition::now_ms;
use crate::{Broker, BrokerError};

/// How often leaders run retention and compaction.
#[derive(Debug, Clone, Copy)]
pub struct RetentionTuning {
    /// Period of the retention check (age, bytes, messages, ack) on every led partition.
    pub tick: Duration,
    /// Least time between two compactions of a partition.
    pub compaction_every: Duration,
    /// Least time between two flushes that let segments no message points into go (see
    /// `junction_storage::SegmentLog::release_below`).
    pub release_every: Duration,
}

impl Default for RetentionTuning {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            compaction_every: Duration::from_secs(60),
            release_every: Duration::from_secs(30),
        }
    }
}

/// Where the limits cut, as measured on the leader's stored data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cuts {
    /// The first offset whose timestamp is within `max_age` (messages below are too old).
    pub age: Option<u64>,
    /// The smallest offset from which the partition's bytes fit `max_bytes`.
    pub bytes: Option<u64>,
}

/// Decides where retention cuts: `Some(n)` means "remove every message below `n`".
///
/// - `max_age` always removes expired messages (whatever the discard policy);
/// - `max_messages` and `max_bytes` remove the oldest messages only with `discard: old`
///   (with `discard: new` they refuse produces instead);
/// - `ack`: with consumer groups (`ack_floor` is the lowest committed position over the
///   station's groups on this partition), everything below the floor is removed, and **no
///   limit removes a message some group has not acknowledged**: the cut is the floor. With no
///   group (`ack_floor: None`), `ack` removes nothing and the other limits apply as usual.
///
/// The result never exceeds `next` and is only `Some` when it is above `start`.
pub fn truncate_before(
    retention: &Retention,
    discard: DiscardPolicy,
    start: u64,
    next: u64,
    cuts: Cuts,
    ack_floor: Option<u64>,
) -> Option<u64> {
    let mut limit_cut = start;
    if retention.max_age_ms.is_some()
        && let Some(c) = cuts.age
    {
        limit_cut = limit_cut.max(c);
    }
    if discard == DiscardPolicy::Old {
        if let Some(m) = retention.max_messages {
            limit_cut = limit_cut.max(next.saturating_sub(m));
        }
        if retention.max_bytes.is_some()
            && let Some(c) = cuts.bytes
        {
            limit_cut = limit_cut.max(c);
        }
    }
    let cut = match (retention.ack, ack_floor) {
        (true, Some(floor)) => floor,
        _ => limit_cut,
    };
    let cut = cut.min(next);
    (cut > start).then_some(cut)
}

/// A partition's size as stored: first and next offset, live messages and their bytes
/// (key + headers + payload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionStats {
    pub start_offset: u64,
    pub next_offset: u64,
    pub messages: u64,
    pub bytes: u64,
    /// When a memory partition lost every replica and restarted empty (0: never).
    pub data_lost_at_ms: i64,
}

/// Returns the bytes stored in `[from, next)` according to the size index (messages removed
/// by compaction still count; see [`partition_stats`] for the exact figure).
fn span_bytes(store: &Store, group: GroupId, from: u64, next: u64) -> Result<u64, BrokerError> {
    if from >= next {
        return Ok(0);
    }
    let end = store.bytes_before(group, next)?;
    let begin = store.bytes_before(group, from)?;
    match (begin, end) {
        (Some(b), Some(e)) => Ok(e.saturating_sub(b)),
        _ => Err(BrokerError::Unavailable(format!(
            "size index of group {group} does not cover offsets {from}..{next} yet"
        ))),
    }
}

/// Measures a partition. Exact: the compacted range (one message per key) is scanned, the
/// rest comes from the size index in two lookups.
pub fn partition_stats(
    store: &Store,
    group: GroupId,
    state: &PartitionState,
) -> Result<PartitionStats, BrokerError> {
    let start = state.start_offset;
    let next = state.next_offset;
    let dense_from = state.compacted_upto.clamp(start, next);
    let mut messages = next - dense_from;
    let mut bytes = span_bytes(store, group, dense_from, next)?;
    if dense_from > start {
        let mut bad = None;
        store.scan_messages(
            group,
            start,
            dense_from,
            |_, v| match junction_raft::decode_record(v) {
                Ok(r) => {
                    messages += 1;
                    bytes += (r.key.as_ref().map_or(0, Vec::len)
                        + r.headers
                            .iter()
                            .map(|(k, v)| k.len() + v.len())
                            .sum::<usize>()
                        + r.payload.len()) as u64;
                    Ok(true)
                }
                Err(e) => {
                    bad = Some(e);
                    Ok(false)
                }
            },
        )?;
        if let Some(e) = bad {
            return Err(BrokerError::Raft(e.to_string()));
        }
    }
    Ok(PartitionStats {
        start_offset: start,
        next_offset: next,
        messages,
        bytes,
        data_lost_at_ms: state.data_lost_at_ms,
    })
}

/// Returns the smallest offset `n` in `[start, next]` such that the bytes of `[n, next)` are
/// at most `max_bytes` (binary search over the size index).
pub fn bytes_cut(
    store: &Store,
    group: GroupId,
    start: u64,
    next: u64,
    max_bytes: u64,
) -> Result<Option<u64>, BrokerError> {
    let Some(end) = store.bytes_before(group, next)? else {
        return Ok(None);
    };
    let (mut lo, mut hi) = (start, next);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let Some(before_mid) = store.bytes_before(group, mid)? else {
            return Ok(None);
        };
        if end.saturating_sub(before_mid) <= max_bytes {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(Some(lo))
}

/// Measures the cuts the station's limits ask for on the stored data.
fn measure_cuts(
    store: &Store,
    group: GroupId,
    state: &PartitionState,
    retention: &Retention,
    now: i64,
) -> Result<Cuts, BrokerError> {
    let mut cuts = Cuts::default();
    if let Some(age) = retention.max_age_ms {
        let oldest_kept = now.saturating_sub(i64::try_from(age).unwrap_or(i64::MAX));
        cuts.age = Some(
            store
                .seek_time(group, oldest_kept)?
                .map_or(state.next_offset, |o| o.min(state.next_offset)),
        );
    }
    if let Some(max) = retention.max_bytes {
        cuts.bytes = bytes_cut(store, group, state.start_offset, state.next_offset, max)?;
    }
    Ok(cuts)
}

/// The admission checks of one partition, run by its batcher: the discard-new limits and,
/// for memory stations, the node's memory limit.
pub struct Admission {
    pub(crate) store: Store,
    pub(crate) group: GroupId,
    pub(crate) shared: Arc<PartitionShared>,
    /// The station's policy, refreshed by reconciliation.
    pub(crate) policy: Arc<RwLock<StationPolicy>>,
    /// For memory stations: the node's memory limit and what counts against it.
    pub(crate) memory: Option<(u64, MemoryGauge)>,
}

/// The message bytes (key + headers + payload) held by every memory-station replica on this
/// node: what the node's memory limit counts. Raft log and index overhead come on top (the
/// log is bounded by the snapshot interval).
#[derive(Clone)]
pub(crate) struct MemoryGauge {
    pub(crate) store: Store,
    pub(crate) groups: Arc<RwLock<HashMap<GroupId, Arc<PartitionShared>>>>,
}

impl MemoryGauge {
    pub(crate) fn used(&self) -> u64 {
        let groups: Vec<(GroupId, PartitionState)> = self
            .groups
            .read()
            .iter()
            .map(|(g, s)| (*g, s.current()))
            .collect();
        groups
            .iter()
            .filter_map(|(g, st)| partition_stats(&self.store, *g, st).ok())
            .map(|s| s.bytes)
            .sum()
    }
}

/// Messages and bytes a batcher has accepted but not seen applied yet.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Pending {
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
}

/// The limits a produce is checked against; `None` fields do not apply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) messages: Option<u64>,
    pub(crate) bytes: Option<u64>,
    pub(crate) memory: Option<u64>,
}

/// What the limits are compared with: the partition's messages and bytes, and the node's
/// memory store's bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Used {
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    pub(crate) memory: u64,
}

impl Admission {
    /// Returns the limits that can refuse produces, if any apply.
    pub(crate) fn limits(&self) -> Option<Limits> {
        let p = *self.policy.read();
        let r = p.retention;
        let mut l = Limits {
            memory: self.memory.as_ref().map(|(limit, _)| *limit),
            ..Limits::default()
        };
        if p.discard == DiscardPolicy::New {
            l.messages = r.max_messages;
            l.bytes = r.max_bytes;
        }
        (l != Limits::default()).then_some(l)
    }

    /// Measures what the limits are compared with (applied data only).
    pub(crate) fn used(&self, limits: &Limits) -> Result<Used, BrokerError> {
        let mut used = Used::default();
        if limits.messages.is_some() || limits.bytes.is_some() {
            let s = partition_stats(&self.store, self.group, &self.shared.current())?;
            used.messages = s.messages;
            used.bytes = s.bytes;
        }
        if let (Some(_), Some((_, gauge))) = (limits.memory, &self.memory) {
            used.memory = gauge.used();
        }
        Ok(used)
    }

    /// Checks one produce request against the limits, given what is used plus what is
    /// already accepted and in flight. Returns the request's (messages, bytes).
    pub(crate) fn check(
        limits: &Limits,
        used: &Used,
        records: &[Record],
    ) -> Result<(u64, u64), BrokerError> {
        let n = records.len() as u64;
        let b: u64 = records.iter().map(|r| r.size() as u64).sum();
        if let Some(max) = limits.messages
            && used.messages + n > max
        {
            return Err(BrokerError::ResourceExhausted(format!(
                "the partition holds {} of its {max} messages and the station discards new messages; {n} more do not fit",
                used.messages
            )));
        }
        if let Some(max) = limits.bytes
            && used.bytes + b > max
        {
            return Err(BrokerError::ResourceExhausted(format!(
                "the partition holds {} of its {max} bytes and the station discards new messages; {b} more bytes do not fit",
                used.bytes
            )));
        }
        if let Some(max) = limits.memory
            && used.memory + b > max
        {
            return Err(BrokerError::ResourceExhausted(format!(
                "this node's memory storage is full ({} of its {max} bytes are used by memory stations); retention or deleting a memory station frees it",
                used.memory
            )));
        }
        Ok((n, b))
    }
}

/// The lowest position committed by the station's attached consumer groups on this
/// partition: the `ack` retention floor. `None` while the station has no attached group. A
/// group that has not read the partition yet counts at its start position (so `earliest`
/// groups protect all); a group detached here (past its isolation budget) does not count.
fn ack_floor(
    broker: &Broker,
    station: &StationMeta,
    replica: &crate::PartitionReplica,
) -> Option<u64> {
    let meta = broker.metadata();
    meta.groups_of_station(&station.full_name())
        .map(|g| broker.cursor_position(replica, g))
        .filter(|p| p.detached_at_ms.is_none())
        .map(|p| p.committed)
        .min()
}

/// Detaches the station's groups that fell past their isolation budget on this partition
/// (the decision is `LagBudget::exceeded_by`; this only measures and writes).
async fn detach_laggards(
    broker: &Broker,
    station: &StationMeta,
    replica: &crate::PartitionReplica,
) -> Result<(), BrokerError> {
    let meta = broker.metadata();
    let full = station.full_name();
    for g in meta.groups_of_station(&full) {
        // From the replica's state first: most groups have no budget, and the disk reads
        // below are made only for the limits that are set.
        let pos = broker.cursor_position(replica, g);
        if pos.budget.is_unlimited() || pos.detached_at_ms.is_some() {
            continue;
        }
        let age_ms = match pos.budget.max_age_ms {
            Some(_) => {
                crate::groups::oldest_unacked_age_ms(replica, pos.committed, pos.high_watermark)?
            }
            None => 0,
        };
        let bytes = match pos.budget.max_bytes {
            Some(_) => {
                let store = replica.store.clone();
                let (group, from, next) = (replica.group, pos.committed, pos.high_watermark);
                tokio::task::spawn_blocking(move || span_bytes(&store, group, from, next))
                    .await
                    .map_err(|e| BrokerError::Raft(e.to_string()))??
            }
            None => 0,
        };
        let lag = Lag {
            messages: pos.lag,
            bytes,
            age_ms,
        };
        let Some(why) = pos.budget.exceeded_by(&lag) else {
            continue;
        };
        broker
            .cursor_write(
                replica,
                PartitionCommand::GroupIsolation {
                    group: g.name.clone(),
                    uid: g.uid,
                    change: Isolation::Detach { at_ms: now_ms() },
                },
            )
            .await?;
        tracing::warn!(
            station = %full, group = %g.name, partition_group = replica.group, why = %why,
            "a consumer group fell past its isolation budget and is detached: retention no \
             longer waits for it (attach it again with `junction group attach`)"
        );
        metrics::counter!("junction_group_detached_total", "tenant" => station.tenant.clone())
            .increment(1);
    }
    Ok(())
}

impl Broker {
    /// Runs retention and compaction on the partitions this node leads, until shutdown.
    pub(crate) async fn retention_loop(self: Arc<Self>) {
        let tuning = self.config().retention;
        let mut last_compaction: HashMap<GroupId, tokio::time::Instant> = HashMap::new();
        let mut last_release = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(tuning.tick) => {}
            }
            let meta = self.metadata();
            let replicas: Vec<Arc<crate::PartitionReplica>> = self.replicas();
            for replica in replicas {
                if replica.leader() != Some(self.node_id()) {
                    continue;
                }
                let Some((station, _)) = meta.partition_of_group(replica.group) else {
                    continue;
                };
                if let Err(e) = self
                    .retain_partition(&replica, station, tuning, &mut last_compaction)
                    .await
                {
                    tracing::debug!(group = replica.group, error = %e, "retention pass failed; will retry");
                }
            }
            // Segments that retention or compaction left no message pointing into go once
            // the writes that said so are durable; snapshots flush them too, but an idle
            // partition takes none, so flush for them now and then.
            if last_release.elapsed() >= tuning.release_every && self.store.releases_waiting() {
                last_release = tokio::time::Instant::now();
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.persist_applied()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "flushing to release segments failed"),
                    Err(e) => tracing::warn!(error = %e, "flushing to release segments failed"),
                }
            }
            self.retention_passes
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// Returns how many passes the retention loop has completed over the partitions this
    /// node leads: something that waits for retention to have had its chance (that a limit
    /// removed nothing, say) waits for this to grow instead of for a time.
    pub fn retention_passes(&self) -> u64 {
        self.retention_passes
            .load(std::sync::atomic::Ordering::Acquire)
    }

    async fn retain_partition(
        &self,
        replica: &crate::PartitionReplica,
        station: &StationMeta,
        tuning: RetentionTuning,
        last_compaction: &mut HashMap<GroupId, tokio::time::Instant>,
    ) -> Result<(), BrokerError> {
        let group = replica.group;
        let policy = station.policy;
        detach_laggards(self, station, replica).await?;
        let state = replica.shared.current();
        let now = now_ms();
        if policy.retention.is_limited() {
            let store = replica.store.clone();
            let retention = policy.retention;
            let cuts = tokio::task::spawn_blocking(move || {
                measure_cuts(&store, group, &state, &retention, now)
            })
            .await
            .map_err(|e| BrokerError::Raft(e.to_string()))??;
            let floor = ack_floor(self, station, replica);
            if let Some(before) = truncate_before(
                &policy.retention,
                policy.discard,
                state.start_offset,
                state.next_offset,
                cuts,
                floor,
            ) {
                self.propose(replica, PartitionCommand::Truncate { before })
                    .await?;
                metrics::counter!("junction_retention_truncated_messages_total")
                    .increment(before - state.start_offset);
            }
        }
        if policy.compaction == CompactionPolicy::Key {
            let due = last_compaction
                .get(&group)
                .is_none_or(|t| t.elapsed() >= tuning.compaction_every);
            let state = replica.shared.current();
            let work = state.next_offset > state.compacted_upto.max(state.start_offset)
                || state.tombstones > 0;
            if due && work {
                let cutoff = now
                    .saturating_sub(i64::try_from(policy.tombstone_delay_ms).unwrap_or(i64::MAX));
                let resp = self
                    .propose(
                        replica,
                        PartitionCommand::Compact {
                            upto: state.next_offset,
                            tombstones_before_ms: cutoff,
                        },
                    )
                    .await?;
                if let CommandResponse::Retained { removed, .. } = resp {
                    metrics::counter!("junction_compaction_removed_messages_total")
                        .increment(removed);
                }
                last_compaction.insert(group, tokio::time::Instant::now());
            }
        }
        Ok(())
    }

    async fn propose(
        &self,
        replica: &crate::PartitionReplica,
        cmd: PartitionCommand,
    ) -> Result<CommandResponse, BrokerError> {
        replica.quiet.ready_to_write().await;
        replica
            .raft
            .client_write(Command::Partition(cmd))
            .await
            .map(|r| r.data)
            .map_err(|e| BrokerError::Unavailable(format!("retention entry not committed: {e}")))
    }

    /// Returns the stored size of a partition hosted here.
    pub fn partition_stats(&self, group: GroupId) -> Result<PartitionStats, BrokerError> {
        let replica = self.partition(group).ok_or(BrokerError::NotHosted {
            node: self.node_id(),
            group,
        })?;
        partition_stats(&replica.store, group, &replica.shared.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ret(age: Option<u64>, bytes: Option<u64>, messages: Option<u64>, ack: bool) -> Retention {
        Retention {
            max_age_ms: age,
            max_bytes: bytes,
            max_messages: messages,
            ack,
        }
    }

    #[test]
    fn message_limit_cuts_to_the_newest_n() {
        let r = ret(None, None, Some(10), false);
        let cut = truncate_before(&r, DiscardPolicy::Old, 0, 25, Cuts::default(), None);
        assert_eq!(cut, Some(15));
        // Already within the limit: nothing to do.
        assert_eq!(
            truncate_before(&r, DiscardPolicy::Old, 15, 25, Cuts::default(), None),
            None
        );
        // discard=new never removes for a count limit.
        assert_eq!(
            truncate_before(&r, DiscardPolicy::New, 0, 25, Cuts::default(), None),
            None
        );
    }

    #[test]
    fn the_strictest_limit_wins_and_age_ignores_discard_new() {
        let r = ret(Some(1000), Some(100), Some(20), false);
        let cuts = Cuts {
            age: Some(7),
            bytes: Some(12),
        };
        assert_eq!(
            truncate_before(&r, DiscardPolicy::Old, 0, 25, cuts, None),
            Some(12)
        );
        assert_eq!(
            truncate_before(&r, DiscardPolicy::New, 0, 25, cuts, None),
            Some(7)
        );
        // A cut past the end (everything expired) stops at the end.
        let all = Cuts {
            age: Some(99),
            bytes: None,
        };
        assert_eq!(
            truncate_before(&r, DiscardPolicy::New, 3, 25, all, None),
            Some(25)
        );
    }

    #[test]
    fn ack_retention_drops_to_the_floor_and_protects_unacked_messages() {
        let r = ret(None, None, Some(5), true);
        // No consumer group: ack removes nothing; the count limit still applies.
        assert_eq!(
            truncate_before(&r, DiscardPolicy::Old, 0, 20, Cuts::default(), None),
            Some(15)
        );
        // Groups acked up to 8: the count limit would cut at 15, but 8..15 are not acked.
        assert_eq!(
            truncate_before(&r, DiscardPolicy::Old, 0, 20, Cuts::default(), Some(8)),
            Some(8)
        );
        let only_ack = ret(None, None, None, true);
        assert_eq!(
            truncate_before(&only_ack, DiscardPolicy::Old, 0, 20, Cuts::default(), None),
            None
        );
        assert_eq!(
            truncate_before(
                &only_ack,
                DiscardPolicy::Old,
                4,
                20,
                Cuts::default(),
                Some(4)
            ),
            None
        );
        // A floor past the end (cannot happen, but) is clamped.
        assert_eq!(
            truncate_before(
                &only_ack,
                DiscardPolicy::Old,
                4,
                20,
                Cuts::default(),
                Some(99)
            ),
            Some(20)
        );
    }

    #[test]
    fn discard_new_check_counts_what_is_in_flight() {
        let rec = |n: usize| Record {
            key: None,
            headers: vec![],
            payload: vec![0; n],
        };
        let limits = Limits {
            messages: Some(10),
            bytes: Some(1000),
            memory: None,
        };
        let used = |messages, bytes| Used {
            messages,
            bytes,
            memory: 0,
        };
        assert_eq!(
            Admission::check(&limits, &used(8, 0), &[rec(1), rec(1)]).unwrap(),
            (2, 2)
        );
        let e = Admission::check(&limits, &used(9, 0), &[rec(1), rec(1)]).unwrap_err();
        assert!(matches!(e, BrokerError::ResourceExhausted(_)), "{e}");
        assert!(e.to_string().contains("discards new"), "{e}");
        let e = Admission::check(&limits, &used(0, 990), &[rec(11)]).unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");
        let mem = Limits {
            memory: Some(100),
            ..Limits::default()
        };
        let full = Used {
            memory: 95,
            ..Used::default()
        };
        assert!(Admission::check(&mem, &full, &[rec(5)]).is_ok());
        let e = Admission::check(&mem, &full, &[rec(6)]).unwrap_err();
        assert!(e.to_string().contains("memory storage is full"), "{e}");
    }

    #[test]
    fn bytes_cut_finds_the_smallest_fitting_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        // Ten messages of 10 bytes in two batches.
        b.put_size_index(1, 0, 0, &[10; 4]).unwrap();
        b.put_size_index(1, 4, 40, &[10; 6]).unwrap();
        store.write(b).unwrap();
        assert_eq!(bytes_cut(&store, 1, 0, 10, 35).unwrap(), Some(7));
        assert_eq!(bytes_cut(&store, 1, 0, 10, 30).unwrap(), Some(7));
        assert_eq!(bytes_cut(&store, 1, 0, 10, 1000).unwrap(), Some(0));
        assert_eq!(bytes_cut(&store, 1, 0, 10, 0).unwrap(), Some(10));
        assert_eq!(bytes_cut(&store, 1, 8, 10, 5).unwrap(), Some(10));
    }
}
