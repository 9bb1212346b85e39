//! The fault schedule: a pure function of the seed and the cluster shape, so that the same seed
//! always gives the same sequence of faults. Leader-targeted faults name *which* leader (of
//! partition `p`, or of the metadata group); the node that holds it is resolved when the fault
//! runs, since leadership is not deterministic.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proxy::BlockMode;
pub use crate::rng::{SplitMix64, derive_seed};

/// The kinds of fault, for counting and reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    KillNode,
    KillPartitionLeader,
    KillMetaLeader,
    Pause,
    Isolate,
    Split,
    OneWay,
    Bridge,
    Latency,
    Loss,
    RollingRestart,
    ClusterRestart,
    DiskFill,
    BitFlip,
    ReplaceNode,
}

impl FaultKind {
    pub const ALL: [FaultKind; 15] = [
        FaultKind::KillNode,
        FaultKind::KillPartitionLeader,
        FaultKind::KillMetaLeader,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::Split,
        FaultKind::OneWay,
        FaultKind::Bridge,
        FaultKind::Latency,
        FaultKind::Loss,
        FaultKind::RollingRestart,
        FaultKind::ClusterRestart,
        FaultKind::DiskFill,
        FaultKind::BitFlip,
        FaultKind::ReplaceNode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillNode => "kill-node",
            FaultKind::KillPartitionLeader => "kill-partition-leader",
            FaultKind::KillMetaLeader => "kill-meta-leader",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::Split => "split",
            FaultKind::OneWay => "one-way",
            FaultKind::Bridge => "bridge",
            FaultKind::Latency => "latency",
            FaultKind::Loss => "loss",
            FaultKind::RollingRestart => "rolling-restart",
            FaultKind::ClusterRestart => "cluster-restart",
            FaultKind::DiskFill => "disk-fill",
            FaultKind::BitFlip => "bit-flip",
            FaultKind::ReplaceNode => "replace-node",
        }
    }

    /// Relative frequency in a schedule.
    fn weight(self) -> u64 {
        match self {
            FaultKind::KillNode => 10,
            FaultKind::KillPartitionLeader => 12,
            FaultKind::KillMetaLeader => 6,
            FaultKind::Pause => 8,
            FaultKind::Isolate => 8,
            FaultKind::Split => 6,
            FaultKind::OneWay => 6,
            FaultKind::Bridge => 4,
            FaultKind::Latency => 8,
            FaultKind::Loss => 8,
            FaultKind::RollingRestart => 3,
            FaultKind::ClusterRestart => 3,
            FaultKind::DiskFill => 4,
            FaultKind::BitFlip => 4,
            FaultKind::ReplaceNode => 3,
        }
    }
}

impl std::str::FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault kind {s:?}; one of {}", names.join(", "))
            })
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one fault does. Node ids are 1-based, as in the member list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// `kill -9` a node, restart it after the hold.
    Kill { node: u64 },
    /// `kill -9` whichever node leads partition `partition` when the fault starts.
    KillPartitionLeader { partition: u32 },
    /// `kill -9` whichever node leads the metadata group when the fault starts.
    KillMetaLeader,
    /// SIGSTOP, then SIGCONT after the hold.
    Pause { node: u64 },
    /// Every link to and from `node` blocked.
    Isolate { node: u64, mode: BlockMode },
    /// Every link between `minority` and the other nodes blocked.
    Split { minority: Vec<u64>, mode: BlockMode },
    /// Only the link `from → to` blocked (the reverse direction still works).
    OneWay { from: u64, to: u64, mode: BlockMode },
    /// `left` and `right` cannot talk to each other; `bridge` talks to both.
    Bridge {
        left: Vec<u64>,
        bridge: u64,
        right: Vec<u64>,
        mode: BlockMode,
    },
    /// Every link to and from `node` delayed by `delay_ms` plus up to `jitter_ms` per chunk.
    Latency {
        node: u64,
        delay_ms: u32,
        jitter_ms: u32,
    },
    /// Every link to and from `node` lossy (see [`crate::proxy`] for the TCP emulation).
    Loss {
        node: u64,
        stall_per_mille: u32,
        stall_ms: u32,
        reset_per_10k: u32,
    },
    /// SIGTERM and restart each node in turn, waiting for it to rejoin before the next.
    RollingRestart { order: Vec<u64> },
    /// `kill -9` every node, restart them all after the hold.
    ClusterRestart,
    /// Fill the data file system of `node` (ENOSPC), free it after the hold.
    DiskFill { node: u64 },
    /// Stop `node`, flip one bit inside one stored message of one of its partition replicas
    /// (chosen by `pick`), restart it; the hold is how long its repair is watched for.
    BitFlip { node: u64, pick: u64 },
    /// `kill -9` `node`, delete its data directory (a replaced disk), restart it after the
    /// hold: it must rejoin the cluster and catch up, not start a new one.
    ReplaceNode { node: u64 },
}

impl Action {
    pub fn kind(&self) -> FaultKind {
        match self {
            Action::Kill { .. } => FaultKind::KillNode,
            Action::KillPartitionLeader { .. } => FaultKind::KillPartitionLeader,
            Action::KillMetaLeader => FaultKind::KillMetaLeader,
            Action::Pause { .. } => FaultKind::Pause,
            Action::Isolate { .. } => FaultKind::Isolate,
            Action::Split { .. } => FaultKind::Split,
            Action::OneWay { .. } => FaultKind::OneWay,
            Action::Bridge { .. } => FaultKind::Bridge,
            Action::Latency { .. } => FaultKind::Latency,
            Action::Loss { .. } => FaultKind::Loss,
            Action::RollingRestart { .. } => FaultKind::RollingRestart,
            Action::ClusterRestart => FaultKind::ClusterRestart,
            Action::DiskFill { .. } => FaultKind::DiskFill,
            Action::BitFlip { .. } => FaultKind::BitFlip,
            Action::ReplaceNode { .. } => FaultKind::ReplaceNode,
        }
    }

    /// The directed links `(from, to)` this action blocks, for network partitions.
    pub fn blocked_links(&self, nodes: u64) -> Vec<(u64, u64)> {
        let all: Vec<u64> = (1..=nodes).collect();
        let cut = |a: &[u64], b: &[u64]| {
            let mut links = Vec::new();
            for &x in a {
                for &y in b {
                    if x != y {
                        links.push((x, y));
                        links.push((y, x));
                    }
                }
            }
            links
        };
        match self {
            Action::Isolate { node, .. } => cut(&[*node], &all),
            Action::Split { minority, .. } => {
                let majority: Vec<u64> = all
                    .iter()
                    .copied()
                    .filter(|n| !minority.contains(n))
                    .collect();
                cut(minority, &majority)
            }
            Action::OneWay { from, to, .. } => vec![(*from, *to)],
            Action::Bridge { left, right, .. } => cut(left, right),
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        match self {
            Action::Kill { node } => write!(f, "kill -9 node {node}"),
            Action::KillPartitionLeader { partition } => {
                write!(f, "kill -9 the leader of partition {partition}")
            }
            Action::KillMetaLeader => write!(f, "kill -9 the metadata leader"),
            Action::Pause { node } => write!(f, "SIGSTOP node {node}"),
            Action::Isolate { node, mode } => write!(f, "isolate node {node} ({mode})"),
            Action::Split { minority, mode } => {
                write!(f, "split off {{{}}} ({mode})", list(minority))
            }
            Action::OneWay { from, to, mode } => write!(f, "block {from}->{to} only ({mode})"),
            Action::Bridge {
                left,
                bridge,
                right,
                mode,
            } => write!(
                f,
                "bridge {{{}}} | {bridge} | {{{}}} ({mode})",
                list(left),
                list(right)
            ),
            Action::Latency {
                node,
                delay_ms,
                jitter_ms,
            } => write!(f, "delay links of node {node} by {delay_ms}+{jitter_ms} ms"),
            Action::Loss {
                node,
                stall_per_mille,
                stall_ms,
                reset_per_10k,
            } => write!(
                f,
                "lossy links of node {node} (stall {stall_per_mille}‰ x {stall_ms} ms, reset {reset_per_10k}/10k)"
            ),
            Action::RollingRestart { order } => write!(f, "rolling restart {}", list(order)),
            Action::ClusterRestart => write!(f, "kill -9 every node, restart all"),
            Action::DiskFill { node } => write!(f, "fill the data disk of node {node}"),
            Action::BitFlip { node, .. } => {
                write!(f, "flip a bit in a stored message of node {node}")
            }
            Action::ReplaceNode { node } => {
                write!(f, "kill -9 node {node}, delete its data, restart")
            }
        }
    }
}

/// One fault of the schedule. `at` is nominal: a fault starts at `at` or when the previous one
/// has healed, whichever is later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFault {
    pub index: usize,
    /// Offset from the start of the workload.
    pub at_ms: u64,
    /// How long the fault stays before it is healed (nominal for rolling restarts).
    pub hold_ms: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// What a schedule is drawn for.
#[derive(Debug, Clone)]
pub struct ScheduleParams {
    pub seed: u64,
    pub nodes: u64,
    pub partitions: u32,
    pub duration: Duration,
    /// Mean quiet time between one fault's heal and the next fault.
    pub mean_interval: Duration,
    /// The kinds to draw from; empty means every kind.
    pub kinds: Vec<FaultKind>,
}

const SCHEDULE_SALT: u64 = 0x5C4E_D01E;

/// Draws the schedule. Faults never overlap, and none keeps a majority of nodes down beyond
/// its hold (whole-cluster restart is down only for its hold by design).
pub fn plan(p: &ScheduleParams) -> Vec<PlannedFault> {
    let mut rng = SplitMix64::new(derive_seed(p.seed, SCHEDULE_SALT));
    let mean = p.mean_interval.as_secs_f64().max(0.05);
    let end = p.duration.as_millis() as u64;
    let kinds: Vec<FaultKind> = if p.kinds.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        FaultKind::ALL
            .into_iter()
            .filter(|k| p.kinds.contains(k))
            .collect()
    };
    let total_weight: u64 = kinds.iter().map(|k| k.weight()).sum();
    let mut faults = Vec::new();
    // Let the workload warm up before the first fault.
    let mut t = 2_000u64.min(end / 4);
    loop {
        let gap = (rng.exp(mean) * 1000.0).clamp(250.0, mean * 4000.0) as u64;
        t += gap;
        if t >= end {
            break;
        }
        let mut pick = rng.below(total_weight);
        let mut kind = FaultKind::KillNode;
        for &k in &kinds {
            if pick < k.weight() {
                kind = k;
                break;
            }
            pick -= k.weight();
        }
        let (action, hold_ms) = draw(&mut rng, kind, p);
        faults.push(PlannedFault {
            index: faults.len(),
            at_ms: t,
            hold_ms,
            action,
        });
        t += hold_ms;
    }
    faults
}

fn draw(rng: &mut SplitMix64, kind: FaultKind, p: &ScheduleParams) -> (Action, u64) {
    let n = p.nodes.max(1);
    let node = |rng: &mut SplitMix64| 1 + rng.below(n);
    let mode = |rng: &mut SplitMix64| {
        if rng.chance(0.5) {
            BlockMode::Reset
        } else {
            BlockMode::Blackhole
        }
    };
    let shuffled = |rng: &mut SplitMix64| {
        let mut ids: Vec<u64> = (1..=n).collect();
        rng.shuffle(&mut ids);
        ids
    };
    match kind {
        FaultKind::KillNode => (Action::Kill { node: node(rng) }, rng.range(1_000, 8_000)),
        FaultKind::KillPartitionLeader => (
            Action::KillPartitionLeader {
                partition: rng.below(u64::from(p.partitions.max(1))) as u32,
            },
            rng.range(1_000, 8_000),
        ),
        FaultKind::KillMetaLeader => (Action::KillMetaLeader, rng.range(1_000, 8_000)),
        FaultKind::Pause => (Action::Pause { node: node(rng) }, rng.range(1_000, 6_000)),
        FaultKind::Isolate => {
            let action = Action::Isolate {
                node: node(rng),
                mode: mode(rng),
            };
            (action, rng.range(2_000, 8_000))
        }
        FaultKind::Split => {
            let ids = shuffled(rng);
            let minority_size = ((n - 1) / 2).max(1) as usize;
            let mut minority = ids[..minority_size.min(ids.len())].to_vec();
            minority.sort_unstable();
            let action = Action::Split {
                minority,
                mode: mode(rng),
            };
            (action, rng.range(2_000, 8_000))
        }
        FaultKind::OneWay => {
            let ids = shuffled(rng);
            let action = Action::OneWay {
                from: ids[0],
                to: ids.get(1).copied().unwrap_or(ids[0]),
                mode: mode(rng),
            };
            (action, rng.range(2_000, 8_000))
        }
        FaultKind::Bridge => {
            let ids = shuffled(rng);
            let bridge = ids[0];
            let rest = &ids[1..];
            let half = rest.len() / 2;
            let mut left = rest[..half].to_vec();
            let mut right = rest[half..].to_vec();
            left.sort_unstable();
            right.sort_unstable();
            let action = Action::Bridge {
                left,
                bridge,
                right,
                mode: mode(rng),
            };
            (action, rng.range(2_000, 8_000))
        }
        FaultKind::Latency => {
            let action = Action::Latency {
                node: node(rng),
                delay_ms: rng.range(20, 250) as u32,
                jitter_ms: rng.range(0, 100) as u32,
            };
            (action, rng.range(3_000, 10_000))
        }
        FaultKind::Loss => {
            let action = Action::Loss {
                node: node(rng),
                stall_per_mille: rng.range(20, 200) as u32,
                stall_ms: rng.range(200, 600) as u32,
                reset_per_10k: rng.range(1, 20) as u32,
            };
            (action, rng.range(3_000, 10_000))
        }
        FaultKind::RollingRestart => {
            let order = shuffled(rng);
            (Action::RollingRestart { order }, n * 3_000)
        }
        FaultKind::ClusterRestart => (Action::ClusterRestart, rng.range(500, 3_000)),
        FaultKind::DiskFill => (
            Action::DiskFill { node: node(rng) },
            rng.range(2_000, 6_000),
        ),
        FaultKind::BitFlip => (
            Action::BitFlip {
                node: node(rng),
                pick: rng.next_u64(),
            },
            rng.range(5_000, 10_000),
        ),
        FaultKind::ReplaceNode => (
            Action::ReplaceNode { node: node(rng) },
            rng.range(500, 3_000),
        ),
    }
}

/// How many nodes an action takes out of the majority at its worst moment (killed, paused, or
/// cut off from a majority of the others). Used to check the schedule never takes down a
/// majority, except the deliberate whole-cluster restart.
pub fn nodes_out(action: &Action, nodes: u64) -> u64 {
    match action {
        Action::Kill { .. }
        | Action::KillPartitionLeader { .. }
        | Action::KillMetaLeader
        | Action::Pause { .. }
        | Action::Isolate { .. }
        | Action::DiskFill { .. }
        | Action::BitFlip { .. }
        | Action::ReplaceNode { .. }
        | Action::RollingRestart { .. } => 1,
        Action::Split { minority, .. } => minority.len() as u64,
        Action::Bridge { .. } | Action::OneWay { .. } => 0,
        Action::Latency { .. } | Action::Loss { .. } => 0,
        Action::ClusterRestart => nodes,
    }
}

/// Renders the schedule, one fault per line.
pub fn render(faults: &[PlannedFault]) -> String {
    let mut out = String::new();
    for f in faults {
        out.push_str(&format!(
            "  #{:<3} t+{:>7.1}s  hold {:>4.1}s  {}\n",
            f.index,
            f.at_ms as f64 / 1000.0,
            f.hold_ms as f64 / 1000.0,
            f.action
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64, nodes: u64) -> ScheduleParams {
        ScheduleParams {
            seed,
            nodes,
            partitions: 6,
            duration: Duration::from_secs(600),
            mean_interval: Duration::from_secs(4),
            kinds: Vec::new(),
        }
    }

    #[test]
    fn same_seed_same_schedule_different_seed_different() {
        let a = plan(&params(42, 3));
        let b = plan(&params(42, 3));
        let c = plan(&params(43, 3));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(!a.is_empty());
    }

    #[test]
    fn faults_are_sequential_and_inside_the_duration() {
        for seed in 0..50 {
            let p = params(seed, 5);
            let faults = plan(&p);
            let mut last_end = 0;
            for f in &faults {
                assert!(f.at_ms >= last_end, "seed {seed}: overlap at #{}", f.index);
                assert!(f.at_ms < p.duration.as_millis() as u64);
                assert!(f.hold_ms > 0);
                last_end = f.at_ms + f.hold_ms;
            }
        }
    }

    #[test]
    fn no_fault_takes_down_a_majority_except_the_cluster_restart() {
        for nodes in [3, 5] {
            for seed in 0..100 {
                for f in plan(&params(seed, nodes)) {
                    let out = nodes_out(&f.action, nodes);
                    if f.action == Action::ClusterRestart {
                        assert!(f.hold_ms <= 3_000);
                    } else {
                        assert!(out <= (nodes - 1) / 2, "{nodes} nodes: {}", f.action);
                    }
                }
            }
        }
    }

    #[test]
    fn every_kind_appears_and_targets_are_valid() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..20 {
            for f in plan(&params(seed, 5)) {
                seen.insert(f.action.kind());
                match &f.action {
                    Action::Kill { node }
                    | Action::Pause { node }
                    | Action::Isolate { node, .. }
                    | Action::Latency { node, .. }
                    | Action::Loss { node, .. }
                    | Action::DiskFill { node }
                    | Action::BitFlip { node, .. }
                    | Action::ReplaceNode { node } => assert!((1..=5).contains(node)),
                    Action::KillPartitionLeader { partition } => assert!(*partition < 6),
                    Action::OneWay { from, to, .. } => assert_ne!(from, to),
                    Action::Bridge {
                        left,
                        bridge,
                        right,
                        ..
                    } => {
                        assert_eq!(left.len() + right.len() + 1, 5);
                        assert!(!left.contains(bridge) && !right.contains(bridge));
                        assert!(!left.is_empty() && !right.is_empty());
                    }
                    Action::RollingRestart { order } => {
                        let mut o = order.clone();
                        o.sort_unstable();
                        assert_eq!(o, vec![1, 2, 3, 4, 5]);
                    }
                    Action::Split { minority, .. } => assert_eq!(minority.len(), 2),
                    Action::KillMetaLeader | Action::ClusterRestart => {}
                }
            }
        }
        assert_eq!(seen.len(), FaultKind::ALL.len(), "{seen:?}");
    }

    #[test]
    fn kinds_can_be_restricted_and_parsed() {
        let p = ScheduleParams {
            kinds: vec![FaultKind::Latency, FaultKind::Pause],
            ..params(5, 3)
        };
        let faults = plan(&p);
        assert!(faults.len() > 10);
        assert!(
            faults
                .iter()
                .all(|f| matches!(f.action.kind(), FaultKind::Latency | FaultKind::Pause))
        );
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
        }
        assert!("nope".parse::<FaultKind>().is_err());
    }

    #[test]
    fn blocked_links_of_partitions() {
        let iso = Action::Isolate {
            node: 2,
            mode: BlockMode::Reset,
        };
        let mut links = iso.blocked_links(3);
        links.sort_unstable();
        assert_eq!(links, vec![(1, 2), (2, 1), (2, 3), (3, 2)]);
        let one = Action::OneWay {
            from: 1,
            to: 3,
            mode: BlockMode::Blackhole,
        };
        assert_eq!(one.blocked_links(3), vec![(1, 3)]);
        let bridge = Action::Bridge {
            left: vec![1, 2],
            bridge: 3,
            right: vec![4, 5],
            mode: BlockMode::Reset,
        };
        let links = bridge.blocked_links(5);
        assert_eq!(links.len(), 8);
        assert!(links.iter().all(|(a, b)| *a != 3 && *b != 3));
        let split = Action::Split {
            minority: vec![2, 4],
            mode: BlockMode::Reset,
        };
        assert_eq!(split.blocked_links(5).len(), 12);
    }

    #[test]
    fn a_short_run_still_gets_faults_and_render_lists_them() {
        let p = ScheduleParams {
            duration: Duration::from_secs(25),
            ..params(20_261_128, 3)
        };
        let faults = plan(&p);
        assert!(!faults.is_empty());
        let text = render(&faults);
        assert_eq!(text.lines().count(), faults.len());
    }
}
