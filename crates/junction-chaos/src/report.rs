//! The results of a run: recovery times, the summary table, `results.json` and the SVG
//! timeline (hand-written; no plotting crate).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::checker::{CheckStats, Violation, count_by_kind};
use crate::history::{Attempt, FaultRecord, Outcome, StorageOutcome};
use crate::nemesis::Crash;
use crate::schedule::FaultKind;

/// Recovery after one killed leader, for one group it led.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySample {
    pub fault: usize,
    pub node: u64,
    /// `None` for the metadata group.
    pub partition: Option<u32>,
    /// Kill → first acknowledged produce (started after the kill) on the partition.
    pub produce_ms: Option<u64>,
    /// Kill → another leader reported with a higher term.
    pub election_ms: Option<u64>,
    /// Kill → the restarted old leader leading again at its old term (nobody was elected
    /// while it was down).
    #[serde(default)]
    pub resumed_ms: Option<u64>,
}

/// p50 / p99 / max of a set of durations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribution {
    pub count: usize,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
}

impl Distribution {
    pub fn of(samples: impl IntoIterator<Item = u64>) -> Self {
        let mut v: Vec<u64> = samples.into_iter().collect();
        v.sort_unstable();
        let rank = |p: f64| -> Option<u64> {
            if v.is_empty() {
                return None;
            }
            let idx = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v.get(idx.saturating_sub(1).min(v.len() - 1)).copied()
        };
        Self {
            count: v.len(),
            p50_ms: rank(50.0),
            p99_ms: rank(99.0),
            max_ms: v.last().copied(),
        }
    }

    fn show(&self) -> String {
        let ms = |x: Option<u64>| x.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
        format!(
            "n={:<3} p50 {:>8}  p99 {:>8}  max {:>8}",
            self.count,
            ms(self.p50_ms),
            ms(self.p99_ms),
            ms(self.max_ms)
        )
    }
}

/// Recovery samples of every leader kill.
pub fn recoveries(faults: &[FaultRecord], attempts: &[Attempt]) -> Vec<RecoverySample> {
    let mut first_ack: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for a in attempts {
        if let Outcome::Ok { partition, .. } = a.outcome {
            first_ack
                .entry(partition)
                .or_default()
                .push((a.start_ms, a.end_ms));
        }
    }
    let mut out = Vec::new();
    for f in faults {
        let Some(lk) = &f.leader_kill else { continue };
        let election = |p: Option<u32>| {
            lk.elections
                .iter()
                .find(|e| e.partition == p)
                .and_then(|e| e.new_leader_ms)
        };
        let resumed = |p: Option<u32>| {
            lk.elections
                .iter()
                .find(|e| e.partition == p)
                .and_then(|e| e.resumed_ms)
        };
        for &p in &lk.partitions {
            let produce_ms = first_ack.get(&p).and_then(|acks| {
                acks.iter()
                    .filter(|(start, _)| *start >= lk.killed_at_ms)
                    .map(|(_, end)| end.saturating_sub(lk.killed_at_ms))
                    .min()
            });
            out.push(RecoverySample {
                fault: f.index,
                node: lk.node,
                partition: Some(p),
                produce_ms,
                election_ms: election(Some(p)),
                resumed_ms: resumed(Some(p)),
            });
        }
        if lk.metadata {
            out.push(RecoverySample {
                fault: f.index,
                node: lk.node,
                partition: None,
                produce_ms: None,
                election_ms: election(None),
                resumed_ms: resumed(None),
            });
        }
    }
    out
}

/// A stretch of time in which a partition acknowledged no produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    pub partition: u32,
    pub from_ms: u64,
    pub to_ms: u64,
    /// Faults active during the outage.
    pub during: Vec<usize>,
}

/// The `top` longest gaps (over one second) between acknowledgements on a partition.
pub fn outages(attempts: &[Attempt], faults: &[FaultRecord], top: usize) -> Vec<Outage> {
    let mut acks: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for a in attempts {
        if let Outcome::Ok { partition, .. } = a.outcome {
            acks.entry(partition).or_default().push(a.end_ms);
        }
    }
    let mut out = Vec::new();
    for (p, mut times) in acks {
        times.sort_unstable();
        for w in times.windows(2) {
            let (from_ms, to_ms) = (w[0], w[1]);
            if to_ms - from_ms > 1000 {
                let during = faults
                    .iter()
                    .filter(|f| f.start_ms < to_ms && f.end_ms > from_ms)
                    .map(|f| f.index)
                    .collect();
                out.push(Outage {
                    partition: p,
                    from_ms,
                    to_ms,
                    during,
                });
            }
        }
    }
    out.sort_by_key(|o| std::cmp::Reverse(o.to_ms - o.from_ms));
    out.truncate(top);
    out
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KindCount {
    pub injected: u64,
    pub skipped: u64,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub passed: bool,
    pub seed: u64,
    pub nodes: u64,
    pub partitions: u32,
    pub producers: u32,
    pub keys: u32,
    pub duration_s: f64,
    pub faults_injected: u64,
    pub faults_skipped: u64,
    pub faults_by_kind: BTreeMap<FaultKind, KindCount>,
    /// Bit flips and node replacements, and what became of them.
    #[serde(default)]
    pub storage_faults: StorageFaultStats,
    pub check: CheckStats,
    pub violations_by_kind: BTreeMap<String, u64>,
    /// The first violations (all of them are counted above).
    pub violations: Vec<Violation>,
    pub recovery_samples: Vec<RecoverySample>,
    pub produce_recovery: Distribution,
    pub election_recovery: Distribution,
    /// Kills after which the restarted old leader took its groups back before anyone else
    /// was elected.
    #[serde(default)]
    pub resumed_recovery: Distribution,
    /// The longest stretches without an acknowledged produce on a partition.
    pub outages: Vec<Outage>,
    pub converged: bool,
    pub crashes: Vec<Crash>,
    pub not_injected: Vec<String>,
    pub notes: Vec<String>,
    pub link_stats: BTreeMap<String, crate::proxy::LinkStats>,
    /// The consumer group's check (absent when the run had no group).
    pub group: Option<crate::group_check::GroupStats>,
    /// The effectively-once pipeline's check (absent when the run had none).
    #[serde(default)]
    pub pipeline: Option<crate::pipeline_check::PipelineStats>,
}

/// Faults by kind.
pub fn count_faults(faults: &[FaultRecord]) -> BTreeMap<FaultKind, KindCount> {
    let mut m: BTreeMap<FaultKind, KindCount> = BTreeMap::new();
    for f in faults {
        let e = m.entry(f.kind).or_default();
        if f.skipped.is_some() {
            e.skipped += 1;
        } else {
            e.injected += 1;
        }
    }
    m
}

/// Storage faults and their outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageFaultStats {
    pub bits_flipped: u64,
    pub corruption_detected: u64,
    pub corruption_repaired: u64,
    pub nodes_replaced: u64,
    pub rejoined: u64,
    pub new_clusters: u64,
}

/// Counts the outcomes of storage faults.
pub fn count_storage_faults(faults: &[FaultRecord]) -> StorageFaultStats {
    let mut s = StorageFaultStats::default();
    for f in faults {
        match f.outcome {
            Some(StorageOutcome::Flipped { detected, repaired }) => {
                s.bits_flipped += 1;
                s.corruption_detected += u64::from(detected);
                s.corruption_repaired += u64::from(repaired);
            }
            Some(StorageOutcome::Replaced {
                rejoined,
                new_cluster,
            }) => {
                s.nodes_replaced += 1;
                s.rejoined += u64::from(rejoined);
                s.new_clusters += u64::from(new_cluster);
            }
            None => {}
        }
    }
    s
}

pub fn violations_by_kind(v: &[Violation]) -> BTreeMap<String, u64> {
    count_by_kind(v)
        .into_iter()
        .map(|(k, n)| (k.name().to_owned(), n))
        .collect()
}

/// The human summary.
pub fn summary(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== junction chaos: seed {} | {} nodes | {} partitions | {} producers x {} keys | {:.0}s ==",
        r.seed, r.nodes, r.partitions, r.producers, r.keys, r.duration_s
    );
    let _ = writeln!(
        s,
        "faults injected: {} (skipped: {})",
        r.faults_injected, r.faults_skipped
    );
    let _ = writeln!(s, "  {:<24}{:>9}{:>9}", "kind", "injected", "skipped");
    for (k, c) in &r.faults_by_kind {
        let _ = writeln!(s, "  {:<24}{:>9}{:>9}", k.name(), c.injected, c.skipped);
    }
    let st = &r.storage_faults;
    if st.bits_flipped > 0 {
        let _ = writeln!(
            s,
            "bit flips: {} stored messages changed, {} detected, {} repaired within the fault's hold",
            st.bits_flipped, st.corruption_detected, st.corruption_repaired
        );
    }
    if st.nodes_replaced > 0 {
        let _ = writeln!(
            s,
            "node replacements: {} data directories deleted, {} rejoined their cluster, {} started a new one",
            st.nodes_replaced, st.rejoined, st.new_clusters
        );
    }
    if let Some(g) = &r.group {
        let _ = writeln!(
            s,
            "consumer group ({} key-shared members, {} crashed and replaced): {} deliveries, {} distinct, {} redelivered, {} dead letters, final lag {}, {} rejoins",
            g.members,
            g.member_crashes,
            g.deliveries,
            g.distinct_delivered,
            g.redeliveries,
            g.dead_letters,
            g.final_lag
                .map_or_else(|| "unknown".to_string(), |l| l.to_string()),
            g.rejoins
        );
    }
    if let Some(p) = &r.pipeline {
        let _ = writeln!(
            s,
            "pipeline: {} inputs completed ({} outputs dropped as already stored, {} failed and redelivered, {} restarts); output {} messages for {} stored inputs",
            p.completed, p.deduplicated, p.errors, p.restarts, p.output_messages, p.input_messages
        );
    }
    let c = &r.check;
    let _ = writeln!(
        s,
        "produce attempts: {}  ok {}  failed {}  indeterminate {} (of which stored: {})",
        c.attempts, c.ok, c.failed, c.indeterminate, c.indeterminate_landed
    );
    let _ = writeln!(
        s,
        "stored: {} messages; duplicates {} (landing after a later seq: {}); {} partitions, {} replicas compared; {} reads observed by tailers",
        c.stored,
        c.duplicates,
        c.late_duplicates,
        c.partitions_checked,
        c.replicas_checked,
        c.observations
    );
    let _ = writeln!(
        s,
        "recovery after leader kills (per group led):\n  kill -> first ack on the partition   {}\n  kill -> new leader elected          {}\n  kill -> old leader back, restarted   {}",
        r.produce_recovery.show(),
        r.election_recovery.show(),
        r.resumed_recovery.show()
    );
    if !r.outages.is_empty() {
        let _ = writeln!(
            s,
            "longest write outages (no produce acknowledged on the partition):"
        );
        for o in &r.outages {
            let _ = writeln!(
                s,
                "  partition {} {:>6.1}s from t+{:.1}s, during faults {:?}",
                o.partition,
                (o.to_ms - o.from_ms) as f64 / 1000.0,
                o.from_ms as f64 / 1000.0,
                o.during
            );
        }
    }
    if !r.crashes.is_empty() {
        let _ = writeln!(s, "nodes that exited on their own: {}", r.crashes.len());
        for c in &r.crashes {
            let _ = writeln!(s, "  node {} at t+{}ms: {}", c.node, c.at_ms, c.status);
        }
    }
    for n in &r.not_injected {
        let _ = writeln!(s, "not injected: {n}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    if r.violations_by_kind.is_empty() {
        let _ = writeln!(s, "violations: none");
    } else {
        let _ = writeln!(s, "violations:");
        for (k, n) in &r.violations_by_kind {
            let _ = writeln!(s, "  {k:<24}{n:>9}");
        }
        for v in r.violations.iter().take(20) {
            let _ = writeln!(s, "  {v}");
        }
    }
    let _ = writeln!(
        s,
        "RESULT: {} (seed {})",
        if r.passed { "PASS" } else { "FAIL" },
        r.seed
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ack, kill_fault};

    #[test]
    fn percentiles_use_nearest_rank() {
        let d = Distribution::of([5, 1, 3, 2, 4]);
        assert_eq!(d.count, 5);
        assert_eq!(d.p50_ms, Some(3));
        assert_eq!(d.p99_ms, Some(5));
        assert_eq!(d.max_ms, Some(5));
        let d = Distribution::of((1..=100).collect::<Vec<_>>());
        assert_eq!(d.p50_ms, Some(50));
        assert_eq!(d.p99_ms, Some(99));
        assert_eq!(Distribution::of([]).p50_ms, None);
    }

    #[test]
    fn recovery_is_the_first_ack_started_after_the_kill() {
        let attempts = vec![
            ack(0, 900, 1500), // started before the kill: does not count
            ack(0, 1200, 2300),
            ack(0, 1100, 2600),
            ack(2, 1001, 1002), // another partition
        ];
        let r = recoveries(&[kill_fault()], &attempts);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].partition, Some(0));
        assert_eq!(r[0].produce_ms, Some(1300));
        assert_eq!(r[0].election_ms, Some(700));
        assert_eq!(r[1].partition, Some(1));
        assert_eq!(r[1].produce_ms, None);
        assert_eq!(r[1].election_ms, None);
        assert_eq!(r[2].partition, None);
        assert_eq!(r[2].election_ms, Some(900));
    }

    #[test]
    fn outages_are_the_longest_gaps_between_acks() {
        let attempts = vec![
            ack(0, 0, 100),
            ack(0, 0, 3100),
            ack(0, 0, 4050),
            ack(0, 0, 5500),
            ack(1, 0, 200),
            ack(1, 0, 900),
        ];
        let o = outages(&attempts, &[kill_fault()], 5);
        assert_eq!(o.len(), 2);
        assert_eq!((o[0].partition, o[0].from_ms, o[0].to_ms), (0, 100, 3100));
        assert_eq!(o[0].during, vec![3]);
        assert_eq!((o[1].from_ms, o[1].to_ms), (4050, 5500));
        assert!(o[1].during.is_empty());
        assert_eq!(outages(&attempts, &[], 1).len(), 1);
    }

    #[test]
    fn storage_fault_outcomes_are_counted() {
        let with = |outcome| FaultRecord {
            outcome: Some(outcome),
            ..kill_fault()
        };
        let faults = vec![
            kill_fault(),
            with(StorageOutcome::Flipped {
                detected: true,
                repaired: true,
            }),
            with(StorageOutcome::Flipped {
                detected: true,
                repaired: false,
            }),
            with(StorageOutcome::Flipped {
                detected: false,
                repaired: false,
            }),
            with(StorageOutcome::Replaced {
                rejoined: true,
                new_cluster: false,
            }),
        ];
        assert_eq!(
            count_storage_faults(&faults),
            StorageFaultStats {
                bits_flipped: 3,
                corruption_detected: 2,
                corruption_repaired: 1,
                nodes_replaced: 1,
                rejoined: 1,
                new_clusters: 0,
            }
        );
        // A record from before the field existed reads as no outcome.
        let mut json = serde_json::to_value(kill_fault()).expect("json");
        json.as_object_mut().expect("object").remove("outcome");
        let old: FaultRecord = serde_json::from_value(json).expect("old record");
        assert_eq!(old.outcome, None);
    }

    #[test]
    fn summary_mentions_the_verdict_and_kinds() {
        let faults = vec![kill_fault()];
        let r = Results {
            passed: true,
            seed: 9,
            nodes: 3,
            partitions: 6,
            producers: 8,
            keys: 200,
            duration_s: 10.0,
            faults_injected: 1,
            faults_skipped: 0,
            faults_by_kind: count_faults(&faults),
            storage_faults: count_storage_faults(&faults),
            check: CheckStats::default(),
            violations_by_kind: BTreeMap::new(),
            violations: vec![],
            recovery_samples: vec![],
            produce_recovery: Distribution::of([100]),
            election_recovery: Distribution::default(),
            resumed_recovery: Distribution::default(),
            outages: vec![],
            converged: true,
            crashes: vec![],
            not_injected: vec!["disk-fill: no".into()],
            notes: vec![],
            link_stats: BTreeMap::new(),
            group: None,
            pipeline: None,
        };
        let text = summary(&r);
        assert!(text.contains("RESULT: PASS (seed 9)"));
        assert!(text.contains("kill-partition-leader"));
        assert!(text.contains("violations: none"));
        assert!(text.contains("not injected: disk-fill"));
        assert!(!text.contains("bit flips:"), "no storage faults, no line");
        let flipped = Results {
            storage_faults: StorageFaultStats {
                bits_flipped: 2,
                corruption_detected: 2,
                corruption_repaired: 1,
                ..StorageFaultStats::default()
            },
            ..r
        };
        assert!(
            summary(&flipped).contains(
                "bit flips: 2 stored messages changed, 2 detected, 1 repaired within the fault's hold"
            ),
            "{}",
            summary(&flipped)
        );
    }
}
