//! Exactly-once produce: the per-partition state that turns retried produce batches into
//! no-ops, decided in the partition state machine's apply so that every replica decides the
//! same way.
//!
//! Two mechanisms, usable together:
//!
//! - **Idempotent producers** ([`ProducerTable`]). A producer gets an id and an epoch from the
//!   metadata group and numbers its records per partition. A batch whose sequence is the next
//!   one is appended; a batch already stored (a retry) gets the original positions back and
//!   nothing is appended; a gap, an older epoch or an unknown producer is refused. The last
//!   [`RECENT_BATCHES`] batches of each producer are remembered with their positions, so a
//!   client with up to that many batches in flight always gets its original offsets.
//! - **Message-id deduplication** ([`DedupIndex`]). On a station with a dedup window, a message
//!   carrying a [`MSG_ID_HEADER`] whose id was stored in the partition within the window is not
//!   stored again. The index is a function of the stored messages (ids of messages at offsets
//!   from [`DedupIndex::from_offset`] on), so a replica that restarts or installs a snapshot
//!   rebuilds exactly the index the others hold.
//!
//! Everything here is pure: time is the leader-assigned timestamp of the entry being applied.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::record::Record;

/// The header that carries a message's deduplication id.
pub const MSG_ID_HEADER: &str = "junction-msg-id";
/// The longest message id accepted, in bytes.
pub const MAX_MSG_ID_BYTES: usize = 256;
/// Batches per producer whose positions a partition remembers (a producer keeps at most this
/// many batches of a partition in flight).
pub const RECENT_BATCHES: usize = 5;
/// The default time a producer may stay idle on a partition before its state is dropped.
pub const DEFAULT_PRODUCER_EXPIRY_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// The longest dedup window and producer expiry a station may set.
pub const MAX_EXACTLY_ONCE_WINDOW_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// The default cap on message ids one partition's dedup window holds.
pub const DEFAULT_DEDUP_MAX_IDS: u32 = 1_000_000;

/// A station's exactly-once settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryPolicy {
    /// Message-id deduplication window, in ms; `None`: off.
    pub dedup_window_ms: Option<u64>,
    /// The most message ids a partition's window holds; a batch that would exceed it is
    /// refused.
    pub dedup_max_ids: u32,
    /// How long a producer may stay idle on a partition before its state is dropped.
    pub producer_expiry_ms: u64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            dedup_window_ms: None,
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
            producer_expiry_ms: DEFAULT_PRODUCER_EXPIRY_MS,
        }
    }
}

/// Why a delivery policy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryPolicyError {
    #[error(
        "the dedup window must be between 1 ms and 7 days (got {0} ms); leave it unset to turn deduplication off"
    )]
    DedupWindow(u64),
    #[error("the producer expiry must be between 1 s and 7 days (got {0} ms)")]
    ProducerExpiry(u64),
    #[error("the dedup id cap must be at least 1")]
    DedupMaxIds,
}

impl DeliveryPolicy {
    /// Checks the bounds of every setting.
    pub fn validate(&self) -> Result<(), DeliveryPolicyError> {
        if let Some(w) = self.dedup_window_ms
            && (w == 0 || w > MAX_EXACTLY_ONCE_WINDOW_MS)
        {
            return Err(DeliveryPolicyError::DedupWindow(w));
        }
        if self.producer_expiry_ms < 1000 || self.producer_expiry_ms > MAX_EXACTLY_ONCE_WINDOW_MS {
            return Err(DeliveryPolicyError::ProducerExpiry(self.producer_expiry_ms));
        }
        if self.dedup_max_ids == 0 {
            return Err(DeliveryPolicyError::DedupMaxIds);
        }
        Ok(())
    }
}

/// The producer fields of a produce batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerBatch {
    pub id: u64,
    pub epoch: u32,
    /// The sequence number of the batch's first record in this partition.
    pub base_sequence: u64,
}

/// Where the records of a batch landed: stored records get consecutive offsets from
/// `base_offset` in batch order; `dups` lists the records that were not stored because their
/// message id was (batch index, offset of the first copy).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Placement {
    pub base_offset: u64,
    pub timestamp_ms: i64,
    pub dups: Vec<(u32, u64)>,
}

impl Placement {
    /// The offset of each of the batch's `count` records, and whether it was a duplicate.
    pub fn positions(&self, count: u32) -> Vec<(u64, bool)> {
        let mut out = Vec::with_capacity(count as usize);
        let mut dups = self.dups.iter().peekable();
        let mut next = self.base_offset;
        for i in 0..count {
            match dups.peek() {
                Some((j, off)) if *j == i => {
                    out.push((*off, true));
                    dups.next();
                }
                _ => {
                    out.push((next, false));
                    next += 1;
                }
            }
        }
        out
    }
}

/// A batch a producer stored, remembered to answer its retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
    pub base_sequence: u64,
    pub count: u32,
    pub placement: Placement,
}

/// One producer's state in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: u32,
    /// Timestamp of its last stored batch.
    pub last_seen_ms: i64,
    /// Its last batches, oldest first; never empty.
    pub recent: VecDeque<StoredBatch>,
}

impl ProducerEntry {
    /// The sequence its next batch must start at.
    pub fn next_sequence(&self) -> u64 {
        self.recent
            .back()
            .map_or(0, |b| b.base_sequence + u64::from(b.count))
    }
}

/// Why a batch was refused by the sequence check (or the dedup window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AppendReject {
    #[error(
        "producer {id} epoch {epoch} was fenced by epoch {current}: another instance with the same producer name took over; stop this instance"
    )]
    Fenced { id: u64, epoch: u32, current: u32 },
    #[error(
        "producer {id} sent sequence {got} but this partition expects {expected}: a batch before it was lost; the producer must resend from {expected}"
    )]
    OutOfOrderSequence { id: u64, got: u64, expected: u64 },
    #[error(
        "producer {id} is unknown on this partition (sequence {got}, expected 0): its state expired after being idle; initialise the producer again"
    )]
    UnknownProducer { id: u64, got: u64 },
    #[error(
        "producer {id} sent sequence {got}, stored long ago (the partition remembers positions of the last {RECENT_BATCHES} batches only; the next sequence is {expected})"
    )]
    DuplicateSequence { id: u64, got: u64, expected: u64 },
    #[error(
        "producer {id}: sequence {got} plus {count} records overflows; initialise the producer again"
    )]
    SequenceOverflow { id: u64, got: u64, count: u32 },
    #[error(
        "the partition's dedup window already holds {max_ids} message ids; produce more slowly, shorten the window or raise the cap"
    )]
    DedupFull { max_ids: u32 },
}

/// What the sequence check decided for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Store it.
    Append,
    /// Already stored: answer with the original placement.
    Duplicate(Placement),
    Reject(AppendReject),
}

/// The producers of one partition: id → state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProducerTable {
    pub producers: BTreeMap<u64, ProducerEntry>,
}

impl ProducerTable {
    /// Decides what to do with a batch of `count` records (`count` ≥ 1).
    pub fn check(&self, b: &ProducerBatch, count: u32) -> SequenceCheck {
        if b.base_sequence.checked_add(u64::from(count)).is_none() {
            return SequenceCheck::Reject(AppendReject::SequenceOverflow {
                id: b.id,
                got: b.base_sequence,
                count,
            });
        }
        let Some(e) = self.producers.get(&b.id) else {
            // A producer's first batch on a partition starts at 0.
            return if b.base_sequence == 0 {
                SequenceCheck::Append
            } else {
                SequenceCheck::Reject(AppendReject::UnknownProducer {
                    id: b.id,
                    got: b.base_sequence,
                })
            };
        };
        if b.epoch < e.epoch {
            return SequenceCheck::Reject(AppendReject::Fenced {
                id: b.id,
                epoch: b.epoch,
                current: e.epoch,
            });
        }
        if b.epoch > e.epoch {
            // A new epoch numbers from 0 again.
            return if b.base_sequence == 0 {
                SequenceCheck::Append
            } else {
                SequenceCheck::Reject(AppendReject::OutOfOrderSequence {
                    id: b.id,
                    got: b.base_sequence,
                    expected: 0,
                })
            };
        }
        let expected = e.next_sequence();
        if b.base_sequence == expected {
            return SequenceCheck::Append;
        }
        if let Some(s) = e
            .recent
            .iter()
            .find(|s| s.base_sequence == b.base_sequence && s.count == count)
        {
            return SequenceCheck::Duplicate(s.placement.clone());
        }
        if b.base_sequence < expected {
            SequenceCheck::Reject(AppendReject::DuplicateSequence {
                id: b.id,
                got: b.base_sequence,
                expected,
            })
        } else {
            SequenceCheck::Reject(AppendReject::OutOfOrderSequence {
                id: b.id,
                got: b.base_sequence,
                expected,
            })
        }
    }

    /// Records a batch that [`ProducerTable::check`] allowed and that was stored.
    pub fn record(&mut self, b: &ProducerBatch, count: u32, placement: Placement) {
        let now = placement.timestamp_ms;
        let stored = StoredBatch {
            base_sequence: b.base_sequence,
            count,
            placement,
        };
        let e = self.producers.entry(b.id).or_insert_with(|| ProducerEntry {
            epoch: b.epoch,
            last_seen_ms: now,
            recent: VecDeque::new(),
        });
        if b.epoch != e.epoch {
            e.epoch = b.epoch;
            e.recent.clear();
        }
        e.last_seen_ms = now;
        e.recent.push_back(stored);
        while e.recent.len() > RECENT_BATCHES {
            e.recent.pop_front();
        }
    }

    /// Drops the producers idle for longer than `expiry_ms` at `now_ms`; returns how many.
    pub fn expire(&mut self, now_ms: i64, expiry_ms: u64) -> usize {
        let before = self.producers.len();
        let expiry = i64::try_from(expiry_ms).unwrap_or(i64::MAX);
        self.producers
            .retain(|_, e| e.last_seen_ms.saturating_add(expiry) >= now_ms);
        before - self.producers.len()
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }
}

/// Returns a record's message id, if it carries one.
pub fn msg_id(r: &Record) -> Option<&[u8]> {
    r.headers
        .iter()
        .find(|(k, _)| k == MSG_ID_HEADER)
        .map(|(_, v)| v.as_slice())
}

/// The message ids stored in a partition within its dedup window.
///
/// Invariant: the index holds the id of every stored message at an offset ≥ `from_offset`
/// that carries one, and nothing else — so it can be rebuilt from the stored messages alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupIndex {
    from_offset: u64,
    ids: HashMap<Vec<u8>, u64>,
    /// Offset → (timestamp, id), for expiry (timestamps never decrease with offsets).
    by_offset: BTreeMap<u64, (i64, Vec<u8>)>,
}

impl DedupIndex {
    /// An empty index covering offsets from `from_offset` on.
    pub fn new(from_offset: u64) -> Self {
        Self {
            from_offset,
            ..Self::default()
        }
    }

    /// The first offset the index covers.
    pub fn from_offset(&self) -> u64 {
        self.from_offset
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bytes of ids held (for `station describe`).
    pub fn id_bytes(&self) -> usize {
        self.ids.keys().map(Vec::len).sum()
    }

    /// Adds a stored message while rebuilding (offsets ascending, ≥ `from_offset`).
    pub fn rebuild_add(&mut self, offset: u64, timestamp_ms: i64, id: &[u8]) {
        if offset >= self.from_offset {
            self.ids.insert(id.to_vec(), offset);
            self.by_offset.insert(offset, (timestamp_ms, id.to_vec()));
        }
    }

    /// Deduplication is off: forget everything and cover nothing below `next_offset`.
    pub fn disable(&mut self, next_offset: u64) {
        self.ids.clear();
        self.by_offset.clear();
        self.from_offset = self.from_offset.max(next_offset);
    }

    /// Forgets the ids of messages older than `window_ms` at `now_ms`.
    pub fn expire(&mut self, now_ms: i64, window_ms: u64) {
        let horizon = now_ms.saturating_sub(i64::try_from(window_ms).unwrap_or(i64::MAX));
        while let Some((&off, (ts, _))) = self.by_offset.first_key_value() {
            if *ts >= horizon {
                break;
            }
            if let Some((_, id)) = self.by_offset.remove(&off) {
                self.ids.remove(&id);
            }
            self.from_offset = self.from_offset.max(off + 1);
        }
    }

    /// Retention removed every message below `before`.
    pub fn truncate(&mut self, before: u64) {
        let kept = self.by_offset.split_off(&before);
        for (_, (_, id)) in std::mem::replace(&mut self.by_offset, kept) {
            self.ids.remove(&id);
        }
        self.from_offset = self.from_offset.max(before);
    }

    /// Compaction removed these messages.
    pub fn removed(&mut self, offsets: &[u64]) {
        for off in offsets {
            if let Some((_, id)) = self.by_offset.remove(off) {
                self.ids.remove(&id);
            }
        }
    }

    /// The offset of the stored message with this id.
    pub fn lookup(&self, id: &[u8]) -> Option<u64> {
        self.ids.get(id).copied()
    }

    /// Decides which records of a batch to store: returns the indexes of the records to store
    /// and the duplicates (batch index, offset of the first copy), or `DedupFull`. Records
    /// stored get offsets from `next_offset` in order; an id repeated inside the batch is a
    /// duplicate of its first occurrence. Nothing changes until [`DedupIndex::commit`].
    pub fn plan<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Record>,
        next_offset: u64,
        max_ids: u32,
    ) -> Result<DedupPlan, AppendReject> {
        let mut plan = DedupPlan::default();
        let mut fresh: HashMap<&[u8], u64> = HashMap::new();
        let mut next = next_offset;
        for (i, r) in records.into_iter().enumerate() {
            let i = i as u32;
            match msg_id(r) {
                Some(id) => {
                    if let Some(off) = self.lookup(id).or_else(|| fresh.get(id).copied()) {
                        plan.dups.push((i, off));
                    } else {
                        fresh.insert(id, next);
                        plan.store.push(i);
                        plan.new_ids.push((next, id.to_vec()));
                        next += 1;
                    }
                }
                None => {
                    plan.store.push(i);
                    next += 1;
                }
            }
        }
        if self.ids.len() + plan.new_ids.len() > max_ids as usize {
            return Err(AppendReject::DedupFull { max_ids });
        }
        Ok(plan)
    }

    /// Records the new ids of a stored plan.
    pub fn commit(&mut self, plan: &DedupPlan, timestamp_ms: i64) {
        for (off, id) in &plan.new_ids {
            self.ids.insert(id.clone(), *off);
            self.by_offset.insert(*off, (timestamp_ms, id.clone()));
        }
    }
}

/// Which records of a batch are stored (see [`DedupIndex::plan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupPlan {
    /// Batch indexes of the records to store, ascending.
    pub store: Vec<u32>,
    /// (batch index, offset of the first copy) of the records not stored.
    pub dups: Vec<(u32, u64)>,
    /// (offset, id) of the stored records that carry an id.
    pub new_ids: Vec<(u64, Vec<u8>)>,
}

/// Producer ids handed out per tenant in blocks of this many.
const ID_BLOCK: u64 = 1024;

/// A producer's identity, as `InitProducer` returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerIdentity {
    pub id: u64,
    pub epoch: u32,
}

/// The metadata group's record of producer ids: which tenant owns each id, and the current
/// epoch of every named producer. Anonymous ids are handed out from per-tenant blocks, so the
/// record grows by one block per [`ID_BLOCK`] producers, not one entry per producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerRegistry {
    next_id: u64,
    /// First id of a block → (end of the block, owning tenant).
    blocks: BTreeMap<u64, (u64, String)>,
    /// Tenant → (next id, end) of its open block.
    open: BTreeMap<String, (u64, u64)>,
    /// (tenant, producer name) → its identity.
    named: BTreeMap<(String, String), ProducerIdentity>,
    /// Named producer id → current epoch.
    epochs: BTreeMap<u64, u32>,
}

impl Default for ProducerRegistry {
    fn default() -> Self {
        Self {
            next_id: 1,
            blocks: BTreeMap::new(),
            open: BTreeMap::new(),
            named: BTreeMap::new(),
            epochs: BTreeMap::new(),
        }
    }
}

impl ProducerRegistry {
    fn allocate(&mut self, tenant: &str) -> u64 {
        if let Some((next, end)) = self.open.get_mut(tenant)
            && *next < *end
        {
            let id = *next;
            *next += 1;
            return id;
        }
        let lo = self.next_id;
        let hi = lo + ID_BLOCK;
        self.next_id = hi;
        self.blocks.insert(lo, (hi, tenant.to_string()));
        self.open.insert(tenant.to_string(), (lo + 1, hi));
        lo
    }

    /// Initialises a producer of `tenant`: an anonymous one gets a fresh id at epoch 0; a
    /// named one keeps its id and gets the next epoch (fencing the previous instance), or a
    /// fresh id once its epochs run out.
    pub fn init(&mut self, tenant: &str, name: Option<&str>) -> ProducerIdentity {
        let Some(name) = name else {
            return ProducerIdentity {
                id: self.allocate(tenant),
                epoch: 0,
            };
        };
        let key = (tenant.to_string(), name.to_string());
        let ident = match self.named.get(&key) {
            Some(p) if p.epoch < u32::MAX => ProducerIdentity {
                id: p.id,
                epoch: p.epoch + 1,
            },
            Some(p) => {
                let old = p.id;
                self.epochs.remove(&old);
                ProducerIdentity {
                    id: self.allocate(tenant),
                    epoch: 0,
                }
            }
            None => ProducerIdentity {
                id: self.allocate(tenant),
                epoch: 0,
            },
        };
        self.named.insert(key, ident);
        self.epochs.insert(ident.id, ident.epoch);
        ident
    }

    /// The tenant an id was handed out to (`None`: never handed out).
    pub fn owner(&self, id: u64) -> Option<&str> {
        let (_, (hi, tenant)) = self.blocks.range(..=id).next_back()?;
        (id < *hi).then_some(tenant.as_str())
    }

    /// Whether the id may have been handed out after this state (a lagging replica).
    pub fn is_future(&self, id: u64) -> bool {
        id >= self.next_id
    }

    /// The current epoch of a named producer's id (`None` for anonymous ids).
    pub fn current_epoch(&self, id: u64) -> Option<u32> {
        self.epochs.get(&id).copied()
    }

    /// Named producers of a tenant.
    pub fn named_count(&self, tenant: &str) -> usize {
        self.named.keys().filter(|(t, _)| t == tenant).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn batch(id: u64, epoch: u32, seq: u64) -> ProducerBatch {
        ProducerBatch {
            id,
            epoch,
            base_sequence: seq,
        }
    }

    fn at(base_offset: u64, ts: i64) -> Placement {
        Placement {
            base_offset,
            timestamp_ms: ts,
            dups: vec![],
        }
    }

    #[test]
    fn the_sequence_check_accepts_next_answers_retries_and_refuses_gaps() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(&batch(1, 0, 0), 3), SequenceCheck::Append);
        t.record(&batch(1, 0, 0), 3, at(10, 1));
        assert_eq!(t.check(&batch(1, 0, 3), 2), SequenceCheck::Append);
        t.record(&batch(1, 0, 3), 2, at(13, 2));
        // A retry of either batch gets its original placement.
        assert_eq!(
            t.check(&batch(1, 0, 0), 3),
            SequenceCheck::Duplicate(at(10, 1))
        );
        assert_eq!(
            t.check(&batch(1, 0, 3), 2),
            SequenceCheck::Duplicate(at(13, 2))
        );
        // A gap.
        assert_eq!(
            t.check(&batch(1, 0, 6), 1),
            SequenceCheck::Reject(AppendReject::OutOfOrderSequence {
                id: 1,
                got: 6,
                expected: 5
            })
        );
        // An unknown producer must start at 0.
        assert_eq!(
            t.check(&batch(2, 0, 4), 1),
            SequenceCheck::Reject(AppendReject::UnknownProducer { id: 2, got: 4 })
        );
        // Overflow.
        assert!(matches!(
            t.check(&batch(1, 0, u64::MAX), 2),
            SequenceCheck::Reject(AppendReject::SequenceOverflow { .. })
        ));
    }

    #[test]
    fn a_newer_epoch_fences_the_older_and_restarts_at_zero() {
        let mut t = ProducerTable::default();
        t.record(&batch(1, 0, 0), 1, at(0, 1));
        assert!(matches!(
            t.check(&batch(1, 1, 5), 1),
            SequenceCheck::Reject(AppendReject::OutOfOrderSequence { expected: 0, .. })
        ));
        assert_eq!(t.check(&batch(1, 1, 0), 1), SequenceCheck::Append);
        t.record(&batch(1, 1, 0), 1, at(1, 2));
        assert_eq!(
            t.check(&batch(1, 0, 1), 1),
            SequenceCheck::Reject(AppendReject::Fenced {
                id: 1,
                epoch: 0,
                current: 1
            })
        );
        assert_eq!(t.producers[&1].recent.len(), 1);
    }

    #[test]
    fn only_the_last_batches_are_remembered() {
        let mut t = ProducerTable::default();
        for i in 0..(RECENT_BATCHES as u64 + 2) {
            t.record(&batch(1, 0, i), 1, at(i, 1));
        }
        assert_eq!(t.producers[&1].recent.len(), RECENT_BATCHES);
        assert!(matches!(
            t.check(&batch(1, 0, 0), 1),
            SequenceCheck::Reject(AppendReject::DuplicateSequence { expected: 7, .. })
        ));
        assert_eq!(
            t.check(&batch(1, 0, 6), 1),
            SequenceCheck::Duplicate(at(6, 1))
        );
    }

    #[test]
    fn idle_producers_expire_and_then_must_start_over() {
        let mut t = ProducerTable::default();
        t.record(&batch(1, 0, 0), 1, at(0, 1_000));
        t.record(&batch(2, 0, 0), 1, at(1, 5_000));
        assert_eq!(t.expire(5_999, 5_000), 0);
        assert_eq!(t.expire(6_001, 5_000), 1);
        assert_eq!(
            t.check(&batch(1, 0, 1), 1),
            SequenceCheck::Reject(AppendReject::UnknownProducer { id: 1, got: 1 })
        );
        assert!(t.producers.contains_key(&2));
    }

    fn rec(id: Option<&str>) -> Record {
        Record {
            key: None,
            headers: id
                .map(|i| vec![(MSG_ID_HEADER.to_string(), i.as_bytes().to_vec())])
                .unwrap_or_default(),
            payload: vec![],
        }
    }

    #[test]
    fn the_dedup_plan_skips_known_and_repeated_ids() {
        let mut d = DedupIndex::new(0);
        let recs = [rec(Some("a")), rec(None), rec(Some("a")), rec(Some("b"))];
        let p = d.plan(&recs, 100, 10).unwrap();
        assert_eq!(p.store, vec![0, 1, 3]);
        assert_eq!(p.dups, vec![(2, 100)]);
        d.commit(&p, 7);
        assert_eq!(d.lookup(b"a"), Some(100));
        assert_eq!(d.lookup(b"b"), Some(102));
        let p2 = d.plan(&[rec(Some("b")), rec(Some("c"))], 103, 10).unwrap();
        assert_eq!(p2.dups, vec![(0, 102)]);
        assert_eq!(p2.store, vec![1]);
        assert_eq!(
            d.plan(&[rec(Some("c"))], 103, 2),
            Err(AppendReject::DedupFull { max_ids: 2 })
        );
        let placement = Placement {
            base_offset: 103,
            timestamp_ms: 7,
            dups: p2.dups.clone(),
        };
        assert_eq!(placement.positions(2), vec![(102, true), (103, false)]);
    }

    #[test]
    fn the_window_expires_by_timestamp_and_follows_truncation_and_compaction() {
        let mut d = DedupIndex::new(0);
        for (off, ts, id) in [(0, 10, "a"), (1, 20, "b"), (2, 30, "c"), (3, 40, "d")] {
            let p = d.plan(&[rec(Some(id))], off, 100).unwrap();
            d.commit(&p, ts);
        }
        d.expire(35, 10);
        assert_eq!(d.lookup(b"b"), None);
        assert_eq!(d.lookup(b"c"), Some(2));
        assert_eq!(d.from_offset(), 2);
        d.removed(&[3]);
        assert_eq!(d.lookup(b"d"), None);
        d.truncate(3);
        assert_eq!(d.lookup(b"c"), None);
        assert_eq!(d.from_offset(), 3);
        d.disable(9);
        assert!(d.is_empty());
        assert_eq!(d.from_offset(), 9);
    }

    /// A seeded model test: random batches (fresh, retried, gapped, from a fenced epoch, after
    /// idling) against a model of what a partition must hold; and the state survives an
    /// encode/decode round trip (as in a snapshot) at any point.
    #[test]
    fn seeded_model_of_producer_state_across_snapshots() {
        for seed in 0..200u64 {
            let mut rng = Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut table = ProducerTable::default();
            // Model: producer → (epoch, next sequence, sent batches (seq, count, offset)).
            let mut model: BTreeMap<u64, ModelProducer> = BTreeMap::new();
            let mut next_offset = 0u64;
            let mut now = 0i64;
            let expiry = 1_000u64;
            for _ in 0..300 {
                now += rng.below(30) as i64;
                let expired = table.expire(now, expiry);
                let before = model.len();
                model.retain(|_, m| m.3 + expiry as i64 >= now);
                assert_eq!(expired, before - model.len(), "seed {seed}");
                let id = rng.below(4);
                let count = 1 + rng.below(3) as u32;
                let (epoch, next, sent, _) = model.get(&id).cloned().unwrap_or((0, 0, vec![], now));
                let kind = rng.below(10);
                let (b, want) = match kind {
                    // A retry of a remembered batch.
                    0..=2 if !sent.is_empty() => {
                        let k = sent
                            .len()
                            .saturating_sub(1 + rng.below(RECENT_BATCHES as u64) as usize);
                        let (s, c, off) = sent[k];
                        (batch(id, epoch, s), Want::Dup(off, c))
                    }
                    // A gap.
                    3 => (batch(id, epoch, next + 1 + rng.below(5)), Want::Reject),
                    // An old epoch.
                    4 if epoch > 0 => (batch(id, epoch - 1, 0), Want::Reject),
                    // A new epoch.
                    5 => (batch(id, epoch + 1, 0), Want::Append),
                    _ => (batch(id, epoch, next), Want::Append),
                };
                let b = ProducerBatch { ..b };
                let c = if let Want::Dup(_, c) = want { c } else { count };
                match (table.check(&b, c), want) {
                    (SequenceCheck::Append, Want::Append) => {
                        let p = at(next_offset, now);
                        table.record(&b, c, p);
                        let m = model.entry(id).or_insert((b.epoch, 0, vec![], now));
                        if m.0 != b.epoch {
                            *m = (b.epoch, 0, vec![], now);
                        }
                        m.2.push((b.base_sequence, c, next_offset));
                        if m.2.len() > RECENT_BATCHES {
                            m.2.remove(0);
                        }
                        m.1 = b.base_sequence + u64::from(c);
                        m.3 = now;
                        next_offset += u64::from(c);
                    }
                    (SequenceCheck::Duplicate(p), Want::Dup(off, _)) => {
                        assert_eq!(p.base_offset, off, "seed {seed}")
                    }
                    (SequenceCheck::Reject(_), Want::Reject) => {}
                    (got, want) => panic!("seed {seed}: {b:?} got {got:?}, want {want:?}"),
                }
                if rng.below(20) == 0 {
                    let bytes = postcard::to_allocvec(&table).unwrap();
                    let back: ProducerTable = postcard::from_bytes(&bytes).unwrap();
                    assert_eq!(back, table, "seed {seed}");
                    table = back;
                }
                for (id, m) in &model {
                    let e = &table.producers[id];
                    assert_eq!((e.epoch, e.next_sequence()), (m.0, m.1), "seed {seed}");
                }
                assert_eq!(table.len(), model.len(), "seed {seed}");
            }
        }
    }

    /// A seeded model test of the dedup index: after any sequence of appends, expiries,
    /// truncations, compactions and switching off, the live index equals the one rebuilt from
    /// the stored messages alone (what a restarted replica or a snapshot install computes).
    #[test]
    fn seeded_model_the_dedup_index_is_a_function_of_the_stored_messages() {
        for seed in 0..200u64 {
            let mut rng = Lcg(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
            let mut d = DedupIndex::new(0);
            let mut stored: BTreeMap<u64, (i64, Option<String>)> = BTreeMap::new();
            let (mut next, mut now) = (0u64, 0i64);
            for _ in 0..200 {
                now += rng.below(20) as i64;
                match rng.below(10) {
                    0 => d.expire(now, 1 + rng.below(100)),
                    1 if next > 0 => {
                        let before = rng.below(next + 1);
                        stored.retain(|o, _| *o >= before);
                        d.truncate(before);
                    }
                    2 if !stored.is_empty() => {
                        let gone: Vec<u64> = stored
                            .keys()
                            .copied()
                            .filter(|_| rng.below(4) == 0)
                            .collect();
                        for o in &gone {
                            stored.remove(o);
                        }
                        d.removed(&gone);
                    }
                    3 if rng.below(4) == 0 => d.disable(next),
                    _ => {
                        let recs: Vec<Record> = (0..1 + rng.below(4))
                            .map(|_| {
                                let id = rng.below(30);
                                rec((id < 25).then(|| format!("m{id}")).as_deref())
                            })
                            .collect();
                        if let Ok(p) = d.plan(&recs, next, 20) {
                            for i in &p.store {
                                let id = msg_id(&recs[*i as usize])
                                    .map(|b| String::from_utf8_lossy(b).into_owned());
                                stored.insert(next, (now, id));
                                next += 1;
                            }
                            d.commit(&p, now);
                            assert!(d.len() <= 20, "seed {seed}");
                        }
                    }
                }
                let mut rebuilt = DedupIndex::new(d.from_offset());
                for (o, (ts, id)) in &stored {
                    if let Some(id) = id {
                        rebuilt.rebuild_add(*o, *ts, id.as_bytes());
                    }
                }
                assert_eq!(rebuilt, d, "seed {seed}");
            }
        }
    }

    #[test]
    fn the_registry_hands_out_ids_per_tenant_and_bumps_named_epochs() {
        let mut r = ProducerRegistry::default();
        let a = r.init("t1", None);
        let b = r.init("t2", None);
        let c = r.init("t1", None);
        assert_eq!((a.id, c.id), (1, 2));
        assert_eq!(r.owner(a.id), Some("t1"));
        assert_eq!(r.owner(b.id), Some("t2"));
        assert_eq!(r.owner(c.id), Some("t1"));
        assert!(r.is_future(ID_BLOCK * 2 + 1));
        assert_eq!(r.owner(ID_BLOCK * 2 + 1), None);
        let n1 = r.init("t1", Some("orders"));
        let n2 = r.init("t1", Some("orders"));
        assert_eq!((n2.id, n2.epoch), (n1.id, n1.epoch + 1));
        assert_eq!(r.current_epoch(n1.id), Some(1));
        assert_eq!(r.current_epoch(a.id), None);
        // The same name in another tenant is another producer.
        let other = r.init("t2", Some("orders"));
        assert_ne!(other.id, n1.id);
        assert_eq!(r.owner(other.id), Some("t2"));
        // A block full of ids opens another.
        for _ in 0..ID_BLOCK {
            r.init("t1", None);
        }
        let last = r.init("t1", None);
        assert_eq!(r.owner(last.id), Some("t1"));
        assert_eq!(r.named_count("t1"), 1);
    }

    /// (epoch, next sequence, remembered batches (sequence, count, offset), last seen).
    type ModelProducer = (u32, u64, Vec<(u64, u32, u64)>, i64);

    /// The state a partition keeps per producer, with realistic magnitudes (large ids,
    /// sequences and offsets, five remembered batches): what `station describe` counts.
    #[test]
    fn a_producer_costs_a_partition_about_a_hundred_bytes() {
        let mut t = ProducerTable::default();
        for p in 0..100u64 {
            for i in 0..RECENT_BATCHES as u64 {
                t.record(
                    &batch(1_000_000 + p, 3, 1_000_000_000 + i * 500),
                    500,
                    Placement {
                        base_offset: 5_000_000_000 + i * 500,
                        timestamp_ms: 1_764_000_000_000,
                        dups: vec![],
                    },
                );
            }
        }
        let per_producer = postcard::to_allocvec(&t).unwrap().len() / 100;
        eprintln!("{per_producer} bytes per producer and partition");
        assert!((60..=128).contains(&per_producer), "{per_producer}");
    }

    #[derive(Debug, Clone, Copy)]
    enum Want {
        Append,
        Dup(u64, u32),
        Reject,
    }

    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }
}
