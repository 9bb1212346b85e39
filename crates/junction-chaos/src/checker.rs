//! The checker: a pure function from the history and the final contents of every replica to
//! the list of violations. See [`check`] for the rules.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use junction_types::partitioner::partition_for_key;
use serde::{Deserialize, Serialize};

use crate::history::{Attempt, Observation, Outcome, decode_payload, show_payload};

/// One message as a replica stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// The full contents of one replica of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub node: u64,
    pub start_offset: u64,
    pub entries: Vec<StoredEntry>,
}

/// A replica that was read, or why it could not be.
#[derive(Debug, Clone)]
pub struct ReplicaRead {
    pub node: u64,
    pub result: Result<Replica, String>,
}

/// The kinds of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViolationKind {
    /// An acknowledged message is missing or different at its acknowledged position.
    Lost,
    /// A key's messages are stored out of their sequence order.
    Reordered,
    /// A stored message was never sent (or is corrupt).
    Unknown,
    /// A message whose produce failed definitely was stored anyway.
    FailedButWritten,
    /// One attempt was stored more than once (a duplicate no retry explains).
    UntracedDuplicate,
    /// A message was stored more than once although the producer was idempotent.
    Duplicate,
    /// A message is stored in a partition its key does not map to.
    WrongPartition,
    /// A replica's offsets are not dense.
    OffsetGap,
    /// Two replicas of a partition differ.
    ReplicaDivergence,
    /// A replica could not be read, or a partition has none.
    ReplicaUnreadable,
    /// A tailing reader saw a message that is not in the final state (an uncommitted read).
    VanishedRead,
    /// A tailing reader skipped or repeated offsets.
    TailGap,
    /// Replicas did not converge after the heal.
    NotConverged,
    /// The cluster did not serve produces again after the heal.
    NoRecovery,
    /// An acknowledged message was never delivered to the consumer group.
    GroupUndelivered,
    /// A key's messages were first delivered to the group out of sequence order.
    GroupReordered,
    /// The group dead-lettered a message although every delivery was acked.
    GroupDeadLettered,
    /// The group's lag did not reach zero after the drain.
    GroupLag,
    /// The pipeline's output does not hold each input message exactly as often as the input.
    PipelineMismatch,
    /// A node whose data directory was deleted initialised a new cluster instead of
    /// rejoining its own.
    NewCluster,
}

impl ViolationKind {
    pub fn name(self) -> &'static str {
        match self {
            ViolationKind::Lost => "lost",
            ViolationKind::Reordered => "reordered",
            ViolationKind::Unknown => "unknown",
            ViolationKind::FailedButWritten => "failed-but-written",
            ViolationKind::UntracedDuplicate => "untraced-duplicate",
            ViolationKind::Duplicate => "duplicate",
            ViolationKind::WrongPartition => "wrong-partition",
            ViolationKind::OffsetGap => "offset-gap",
            ViolationKind::ReplicaDivergence => "replica-divergence",
            ViolationKind::ReplicaUnreadable => "replica-unreadable",
            ViolationKind::VanishedRead => "vanished-read",
            ViolationKind::TailGap => "tail-gap",
            ViolationKind::NotConverged => "not-converged",
            ViolationKind::NoRecovery => "no-recovery",
            ViolationKind::GroupUndelivered => "group-undelivered",
            ViolationKind::GroupReordered => "group-reordered",
            ViolationKind::GroupDeadLettered => "group-dead-lettered",
            ViolationKind::GroupLag => "group-lag",
            ViolationKind::PipelineMismatch => "pipeline-mismatch",
            ViolationKind::NewCluster => "new-cluster",
        }
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One violation, with enough detail to find it in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub partition: Option<u32>,
    pub offset: Option<u64>,
    pub node: Option<u64>,
    pub key: Option<String>,
    pub detail: String,
}

impl Violation {
    pub fn new(kind: ViolationKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            partition: None,
            offset: None,
            node: None,
            key: None,
            detail: detail.into(),
        }
    }

    fn at(mut self, partition: u32, offset: u64) -> Self {
        self.partition = Some(partition);
        self.offset = Some(offset);
        self
    }

    fn on(mut self, node: u64) -> Self {
        self.node = Some(node);
        self
    }

    fn key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.kind)?;
        if let Some(p) = self.partition {
            write!(f, " partition {p}")?;
        }
        if let Some(o) = self.offset {
            write!(f, " offset {o}")?;
        }
        if let Some(n) = self.node {
            write!(f, " node {n}")?;
        }
        if let Some(k) = &self.key {
            write!(f, " key {k}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Counts the checker gathers on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStats {
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    pub indeterminate: u64,
    /// Indeterminate attempts that turned out to be stored.
    pub indeterminate_landed: u64,
    /// Stored copies of a `(key, seq)` beyond the first (each traced to its own attempt).
    pub duplicates: u64,
    /// Duplicates stored after a later sequence number of the same key (allowed: a retry of an
    /// indeterminate write that landed late).
    pub late_duplicates: u64,
    pub stored: u64,
    pub partitions_checked: u64,
    pub replicas_checked: u64,
    pub observations: u64,
}

/// What the checker needs.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub partitions: u32,
    pub attempts: &'a [Attempt],
    /// In the order each partition's reader received them.
    pub observations: &'a [Observation],
    pub replicas: &'a BTreeMap<u32, Vec<ReplicaRead>>,
    /// The producers were idempotent: every stored copy of a `(key, seq)` beyond the first is
    /// a violation, whatever the attempts' outcomes. (Retries then resend the same payload,
    /// so several attempts may carry one payload id.)
    pub exactly_once: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    pub violations: Vec<Violation>,
    pub stats: CheckStats,
}

type AttemptKey<'a> = (&'a str, u64, u32);

/// Checks a history against the final state:
/// - replicas: dense offsets, byte-identical contents across the replicas of a partition;
/// - every stored payload decodes to an attempt that was made (else `unknown`), in the
///   partition its key maps to, and no attempt is stored twice; a definitely failed attempt is
///   never stored;
/// - every acknowledged attempt is at its acknowledged offset with its payload (zero loss);
/// - order: `seq` of a key is only sent once `seq - 1` is acknowledged, so every stored copy
///   of `seq` must come after the acknowledged `seq - 1`;
/// - every message a tailing reader saw is in the final state at the same offset, and each
///   reader saw offsets without gaps.
pub fn check(input: &CheckInput<'_>) -> CheckReport {
    let mut v = Vec::new();
    let mut stats = CheckStats::default();
    let mut by_id: HashMap<AttemptKey<'_>, &Attempt> = HashMap::new();
    let mut acked: HashMap<&str, BTreeMap<u64, (u32, u64)>> = HashMap::new();
    for a in input.attempts {
        stats.attempts += 1;
        match &a.outcome {
            Outcome::Ok { partition, offset } => {
                stats.ok += 1;
                acked
                    .entry(a.key.as_str())
                    .or_default()
                    .insert(a.seq, (*partition, *offset));
            }
            Outcome::Failed { .. } => stats.failed += 1,
            Outcome::Indeterminate { .. } => stats.indeterminate += 1,
        }
        // Several attempts may resend one payload: the acknowledged one speaks for it.
        let id = (a.key.as_str(), a.seq, a.attempt);
        if !by_id.get(&id).is_some_and(|prev| prev.outcome.is_ok()) {
            by_id.insert(id, a);
        }
    }

    let reference = check_replicas(input, &mut v, &mut stats);

    // Every stored message → the attempt that wrote it.
    let mut copies: HashMap<AttemptKey<'_>, Vec<(u32, u64)>> = HashMap::new();
    let mut per_seq: HashMap<(&str, u64), u64> = HashMap::new();
    let mut located: Vec<(&Attempt, u32, u64)> = Vec::new();
    for (&p, entries) in &reference {
        for (&offset, e) in entries {
            stats.stored += 1;
            let unknown = |why: &str| {
                Violation::new(
                    ViolationKind::Unknown,
                    format!("{why}: {:?}", show_payload(&e.payload)),
                )
                .at(p, offset)
            };
            let Some(id) = decode_payload(&e.payload) else {
                v.push(unknown("payload is not one the workload writes"));
                continue;
            };
            if e.key.as_deref() != Some(id.key.as_bytes()) {
                v.push(unknown("message key does not match its payload"));
                continue;
            }
            let Some(&a) = by_id.get(&(id.key.as_str(), id.seq, id.attempt)) else {
                v.push(unknown("no such attempt was made"));
                continue;
            };
            if a.uid != id.uid {
                v.push(unknown("unique id differs from the attempt's"));
                continue;
            }
            let expected = partition_for_key(a.key.as_bytes(), input.partitions);
            if p != expected {
                v.push(
                    Violation::new(
                        ViolationKind::WrongPartition,
                        format!(
                            "seq {} stored in partition {p}, key maps to {expected}",
                            a.seq
                        ),
                    )
                    .at(p, offset)
                    .key(&a.key),
                );
            }
            copies
                .entry((a.key.as_str(), a.seq, a.attempt))
                .or_default()
                .push((p, offset));
            *per_seq.entry((a.key.as_str(), a.seq)).or_default() += 1;
            located.push((a, p, offset));
        }
    }

    for (id, locs) in &copies {
        let Some(a) = by_id.get(id) else { continue };
        match &a.outcome {
            Outcome::Failed { code, .. } => {
                for &(p, o) in locs {
                    v.push(
                        Violation::new(
                            ViolationKind::FailedButWritten,
                            format!(
                                "seq {} attempt {} failed with {code} but is stored",
                                a.seq, a.attempt
                            ),
                        )
                        .at(p, o)
                        .key(&a.key),
                    );
                }
            }
            Outcome::Ok { partition, offset } => {
                let extra: Vec<_> = locs
                    .iter()
                    .filter(|l| **l != (*partition, *offset))
                    .collect();
                if let Some(&&(p, o)) = extra.first() {
                    v.push(
                        Violation::new(
                            ViolationKind::UntracedDuplicate,
                            format!(
                                "acknowledged attempt {} of seq {} (at {partition}/{offset}) is also stored at {:?}",
                                a.attempt, a.seq, extra
                            ),
                        )
                        .at(p, o)
                        .key(&a.key),
                    );
                }
            }
            Outcome::Indeterminate { .. } => {
                stats.indeterminate_landed += 1;
                if locs.len() > 1 {
                    v.push(
                        Violation::new(
                            ViolationKind::UntracedDuplicate,
                            format!(
                                "one attempt ({} of seq {}) is stored {} times: {locs:?}",
                                a.attempt,
                                a.seq,
                                locs.len()
                            ),
                        )
                        .at(locs[0].0, locs[0].1)
                        .key(&a.key),
                    );
                }
            }
        }
    }
    stats.duplicates = per_seq.values().map(|n| n.saturating_sub(1)).sum();
    if input.exactly_once {
        let mut dups: Vec<_> = per_seq.iter().filter(|(_, n)| **n > 1).collect();
        dups.sort();
        for ((key, seq), n) in dups {
            let at: Vec<(u32, u64)> = located
                .iter()
                .filter(|(a, _, _)| a.key == *key && a.seq == *seq)
                .map(|(_, p, o)| (*p, *o))
                .collect();
            let (p, o) = at.first().copied().unwrap_or_default();
            v.push(
                Violation::new(
                    ViolationKind::Duplicate,
                    format!("seq {seq} is stored {n} times ({at:?}) by an idempotent producer"),
                )
                .at(p, o)
                .key(key),
            );
        }
    }

    // Zero loss.
    for a in input.attempts {
        let Outcome::Ok { partition, offset } = a.outcome else {
            continue;
        };
        let found = reference.get(&partition).and_then(|m| m.get(&offset));
        let lost = |detail: String| {
            Violation::new(ViolationKind::Lost, detail)
                .at(partition, offset)
                .key(&a.key)
        };
        match found {
            Some(e) if e.payload == a.payload() => {}
            Some(e) => v.push(lost(format!(
                "acknowledged seq {} attempt {} but the offset holds {:?}",
                a.seq,
                a.attempt,
                show_payload(&e.payload)
            ))),
            None => v.push(lost(format!(
                "acknowledged seq {} attempt {} but the offset is not stored",
                a.seq, a.attempt
            ))),
        }
        let expected = partition_for_key(a.key.as_bytes(), input.partitions);
        if partition != expected {
            v.push(
                Violation::new(
                    ViolationKind::WrongPartition,
                    format!(
                        "seq {} acknowledged in partition {partition}, key maps to {expected}",
                        a.seq
                    ),
                )
                .at(partition, offset)
                .key(&a.key),
            );
        }
    }

    // Order: every copy of seq s comes after the acknowledged seq s-1.
    located.sort_by_key(|(a, p, o)| (*p, *o, a.seq));
    for (a, p, o) in &located {
        let Some(seqs) = acked.get(a.key.as_str()) else {
            continue;
        };
        if let Some(prev) = a.seq.checked_sub(1)
            && let Some(&(pp, po)) = seqs.get(&prev)
            && pp == *p
            && *o <= po
        {
            v.push(
                Violation::new(
                    ViolationKind::Reordered,
                    format!(
                        "seq {} (attempt {}) stored at offset {o}, before or at seq {prev} acknowledged at offset {po}",
                        a.seq, a.attempt
                    ),
                )
                .at(*p, *o)
                .key(&a.key),
            );
        }
        if !a.outcome.is_ok()
            && let Some(&(np, no)) = seqs.get(&(a.seq + 1))
            && np == *p
            && *o > no
        {
            stats.late_duplicates += 1;
        }
    }

    check_real_time_order(input.attempts, &mut v);
    check_observations(input, &reference, &mut v, &mut stats);
    v.sort_by_key(|a| (a.kind, a.partition, a.offset));
    CheckReport {
        violations: v,
        stats,
    }
}

/// Checks every partition's replicas against each other and returns the reference contents
/// (the longest readable replica) of each.
fn check_replicas<'a>(
    input: &CheckInput<'a>,
    v: &mut Vec<Violation>,
    stats: &mut CheckStats,
) -> BTreeMap<u32, BTreeMap<u64, &'a StoredEntry>> {
    let mut reference = BTreeMap::new();
    for p in 0..input.partitions {
        stats.partitions_checked += 1;
        let reads = input.replicas.get(&p).map(Vec::as_slice).unwrap_or(&[]);
        let mut readable: Vec<&Replica> = Vec::new();
        for r in reads {
            match &r.result {
                Ok(rep) => readable.push(rep),
                Err(e) => v.push(
                    Violation::new(ViolationKind::ReplicaUnreadable, e.clone())
                        .on(r.node)
                        .at(p, 0),
                ),
            }
        }
        readable.sort_by_key(|r| (std::cmp::Reverse(r.entries.len()), r.node));
        let Some(best) = readable.first() else {
            let mut viol = Violation::new(
                ViolationKind::ReplicaUnreadable,
                "no replica of the partition could be read",
            );
            viol.partition = Some(p);
            v.push(viol);
            reference.insert(p, BTreeMap::new());
            continue;
        };
        for r in &readable {
            stats.replicas_checked += 1;
            let mut expect = r.start_offset;
            for e in &r.entries {
                if e.offset != expect {
                    v.push(
                        Violation::new(
                            ViolationKind::OffsetGap,
                            format!("expected offset {expect}, found {}", e.offset),
                        )
                        .on(r.node)
                        .at(p, expect),
                    );
                }
                expect = e.offset + 1;
            }
        }
        let base: BTreeMap<u64, &StoredEntry> =
            best.entries.iter().map(|e| (e.offset, e)).collect();
        for r in readable.iter().skip(1) {
            let mine: BTreeMap<u64, &StoredEntry> =
                r.entries.iter().map(|e| (e.offset, e)).collect();
            let mut differing = Vec::new();
            for (off, e) in &base {
                if *off < r.start_offset {
                    continue;
                }
                match mine.get(off) {
                    Some(m) if m == e => {}
                    _ => differing.push(*off),
                }
            }
            differing.extend(mine.keys().filter(|o| !base.contains_key(o)));
            if let Some(&first) = differing.first() {
                let detail = match (base.get(&first), mine.get(&first)) {
                    (Some(a), Some(b)) => format!(
                        "differs from node {} at {} offsets; first: {:?} vs {:?}",
                        best.node,
                        differing.len(),
                        show_payload(&b.payload),
                        show_payload(&a.payload)
                    ),
                    _ => format!(
                        "differs from node {} at {} offsets (has {} entries, node {} has {}); first missing/extra offset {first}",
                        best.node,
                        differing.len(),
                        r.entries.len(),
                        best.node,
                        best.entries.len()
                    ),
                };
                v.push(
                    Violation::new(ViolationKind::ReplicaDivergence, detail)
                        .on(r.node)
                        .at(p, first),
                );
            }
        }
        reference.insert(p, base);
    }
    reference
}

/// Across keys: an acknowledged produce that started after another one on the same partition
/// was acknowledged must have a higher offset (the log's order respects real time).
fn check_real_time_order(attempts: &[Attempt], v: &mut Vec<Violation>) {
    let mut by_partition: HashMap<u32, Vec<(u64, u64, u64, &Attempt)>> = HashMap::new();
    for a in attempts {
        if let Outcome::Ok { partition, offset } = a.outcome {
            by_partition
                .entry(partition)
                .or_default()
                .push((a.start_ms, a.end_ms, offset, a));
        }
    }
    for (p, acks) in by_partition {
        let mut by_end: Vec<&(u64, u64, u64, &Attempt)> = acks.iter().collect();
        by_end.sort_by_key(|x| x.1);
        let mut by_start: Vec<&(u64, u64, u64, &Attempt)> = acks.iter().collect();
        by_start.sort_by_key(|x| x.0);
        // The highest offset among acks that ended strictly before the current start.
        let mut done = 0;
        let mut highest: Option<(u64, &Attempt)> = None;
        for b in by_start {
            while let Some(a) = by_end.get(done)
                && a.1 < b.0
            {
                if highest.is_none_or(|(o, _)| a.2 > o) {
                    highest = Some((a.2, a.3));
                }
                done += 1;
            }
            if let Some((o, a)) = highest
                && b.2 <= o
            {
                v.push(
                    Violation::new(
                        ViolationKind::Reordered,
                        format!(
                            "real-time order: {} seq {} started at t+{}ms and got offset {}, below offset {o} of {} seq {} acknowledged at t+{}ms",
                            b.3.key, b.3.seq, b.0, b.2, a.key, a.seq, a.end_ms
                        ),
                    )
                    .at(p, b.2)
                    .key(&b.3.key),
                );
            }
        }
    }
}

fn check_observations(
    input: &CheckInput<'_>,
    reference: &BTreeMap<u32, BTreeMap<u64, &StoredEntry>>,
    v: &mut Vec<Violation>,
    stats: &mut CheckStats,
) {
    let mut last: HashMap<u32, u64> = HashMap::new();
    for o in input.observations {
        stats.observations += 1;
        let found = reference.get(&o.partition).and_then(|m| m.get(&o.offset));
        match found {
            Some(e) if e.payload == o.payload => {}
            other => v.push(
                Violation::new(
                    ViolationKind::VanishedRead,
                    format!(
                        "a reader saw {:?} at t+{}ms; the final state holds {}",
                        show_payload(&o.payload),
                        o.at_ms,
                        other.map_or_else(
                            || "nothing".to_owned(),
                            |e| format!("{:?}", show_payload(&e.payload))
                        )
                    ),
                )
                .at(o.partition, o.offset),
            ),
        }
        let expected = match last.get(&o.partition) {
            Some(prev) => prev + 1,
            None => 0,
        };
        if o.offset != expected {
            v.push(
                Violation::new(
                    ViolationKind::TailGap,
                    format!("reader expected offset {expected} next, got {}", o.offset),
                )
                .at(o.partition, o.offset),
            );
        }
        last.insert(o.partition, o.offset);
    }
}

/// Violations counted by kind.
pub fn count_by_kind(violations: &[Violation]) -> BTreeMap<ViolationKind, u64> {
    let mut m = BTreeMap::new();
    for x in violations {
        *m.entry(x.kind).or_default() += 1;
    }
    m
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
