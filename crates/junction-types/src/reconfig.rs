//! Where replicas should move: the decisions behind removing a node and rebalancing, apart
//! from any I/O. The controller feeds these functions the metadata and which nodes answer,
//! and writes what they return as metadata commands; partition leaders carry the moves out.
//!
//! A move replaces some replicas of one partition with others. The target list keeps the
//! replicas that stay in their order and appends the new ones, so the first replica (the one
//! that initialised the group) is never a node that joins empty.

use std::collections::{BTreeMap, BTreeSet};

use crate::meta::MetaState;
use crate::{GroupId, NodeId};

/// What the controller knows besides the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Voters of the metadata group.
    pub members: BTreeSet<NodeId>,
    /// Members that answered a status probe just now.
    pub live: BTreeSet<NodeId>,
    /// How many moves may be in progress at once.
    pub max_moves: usize,
    /// Balance replica counts even without a rebalance request (the automatic balancer).
    pub auto_balance: bool,
}

/// Why a node cannot be removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemovalError {
    #[error("node {node} is not a member of the cluster (members: {members:?})")]
    NotMember { node: NodeId, members: Vec<NodeId> },
    #[error(
        "removing node {node} would leave {left} node(s), fewer than {needed} ({why}); add a node first"
    )]
    TooFew {
        node: NodeId,
        left: usize,
        needed: usize,
        why: String,
    },
}

/// Nodes that may take replicas: live members not being removed.
fn eligible(state: &MetaState, cluster: &Cluster) -> BTreeSet<NodeId> {
    cluster
        .members
        .intersection(&cluster.live)
        .filter(|n| !state.reconfig.draining.contains(n))
        .copied()
        .collect()
}

/// Checks that `node` may be removed: it is a member, and the members left (not counting
/// nodes already being removed) still hold every station's replication factor and keep the
/// metadata group as fault tolerant as a three-node cluster (or as it is, if smaller).
pub fn check_removal(
    state: &MetaState,
    members: &BTreeSet<NodeId>,
    node: NodeId,
) -> Result<(), RemovalError> {
    if !members.contains(&node) {
        return Err(RemovalError::NotMember {
            node,
            members: members.iter().copied().collect(),
        });
    }
    let left = members
        .iter()
        .filter(|n| **n != node && !state.reconfig.draining.contains(n))
        .count();
    let widest = state
        .stations
        .values()
        .max_by_key(|s| s.replication_factor)
        .map(|s| (s.replication_factor as usize, s.full_name()));
    let metadata = members.len().min(3);
    let (needed, why) = match widest {
        Some((rf, station)) if rf > metadata => (
            rf,
            format!("station '{station}' has replication factor {rf}"),
        ),
        _ => (
            metadata,
            format!("the metadata group keeps at least {metadata} voters"),
        ),
    };
    if left < needed.max(1) {
        return Err(RemovalError::TooFew {
            node,
            left,
            needed: needed.max(1),
            why,
        });
    }
    Ok(())
}

/// The moves to start now: first those that take replicas off nodes being removed, then (when
/// a rebalance runs) those that even out replica counts, up to `max_moves` in progress.
/// Partitions with a replica on a node that is down are not moved by a rebalance.
pub fn plan_moves(state: &MetaState, cluster: &Cluster) -> Vec<(GroupId, Vec<NodeId>)> {
    plan(
        state,
        cluster,
        state.reconfig.rebalancing || cluster.auto_balance,
    )
}

/// How many moves a rebalance started now would make, as planned now (no limit on moves at
/// once).
pub fn rebalance_size(state: &MetaState, cluster: &Cluster) -> usize {
    let unlimited = Cluster {
        max_moves: usize::MAX,
        ..cluster.clone()
    };
    plan(state, &unlimited, true).len()
}

/// [`plan_moves`], balancing or not.
fn plan(state: &MetaState, cluster: &Cluster, balance: bool) -> Vec<(GroupId, Vec<NodeId>)> {
    let mut budget = cluster.max_moves.saturating_sub(state.reconfig.moves.len());
    let targets = eligible(state, cluster);
    let mut load: BTreeMap<NodeId, usize> = targets.iter().map(|n| (*n, 0)).collect();
    for (n, c) in state.replica_counts() {
        if let Some(l) = load.get_mut(&n) {
            *l = c;
        }
    }
    let mut out = Vec::new();
    let idle: Vec<(GroupId, &Vec<NodeId>)> = state
        .stations
        .values()
        .flat_map(|s| &s.partitions)
        .filter(|p| !state.reconfig.moves.contains_key(&p.group_id))
        .map(|p| (p.group_id, &p.replicas))
        .collect();
    // Draining first.
    for (group, replicas) in &idle {
        if budget == 0 {
            return out;
        }
        let leaving: Vec<NodeId> = replicas
            .iter()
            .copied()
            .filter(|n| state.reconfig.draining.contains(n))
            .collect();
        if leaving.is_empty() {
            continue;
        }
        let mut target: Vec<NodeId> = replicas
            .iter()
            .copied()
            .filter(|n| !leaving.contains(n))
            .collect();
        for _ in &leaving {
            let Some(new) = least_loaded(&load, |n| !target.contains(&n) && !replicas.contains(&n))
            else {
                break;
            };
            target.push(new);
            *load.entry(new).or_insert(0) += 1;
        }
        if target.len() == replicas.len() {
            out.push((*group, target));
            budget -= 1;
        }
    }
    if !balance {
        return out;
    }
    let planned: BTreeSet<GroupId> = out.iter().map(|(g, _)| *g).collect();
    let mut moved: BTreeSet<GroupId> = planned;
    while budget > 0 {
        let Some((group, from, to)) = best_balancing_move(&idle, &moved, &load, &targets) else {
            break;
        };
        let Some((_, replicas)) = idle.iter().find(|(g, _)| *g == group) else {
            break;
        };
        let mut target: Vec<NodeId> = replicas.iter().copied().filter(|n| *n != from).collect();
        target.push(to);
        if let Some(l) = load.get_mut(&from) {
            *l -= 1;
        }
        *load.entry(to).or_insert(0) += 1;
        moved.insert(group);
        out.push((group, target));
        budget -= 1;
    }
    // Replica counts even (and nothing else moving): spread the preferred leaders, the first
    // replica of each list, by reordering lists. A reorder changes no Raft membership, so
    // its move finishes at once; leaders follow within the leader rebalance period.
    if out.is_empty() && state.reconfig.moves.is_empty() {
        let mut firsts: BTreeMap<NodeId, usize> = targets.iter().map(|n| (*n, 0)).collect();
        for (_, replicas) in &idle {
            if let Some(f) = replicas.first().and_then(|f| firsts.get_mut(f)) {
                *f += 1;
            }
        }
        while budget > 0 {
            let Some((group, to)) = best_leader_move(&idle, &moved, &firsts, &targets) else {
                break;
            };
            let Some((_, replicas)) = idle.iter().find(|(g, _)| *g == group) else {
                break;
            };
            let mut target: Vec<NodeId> = vec![to];
            target.extend(replicas.iter().copied().filter(|n| *n != to));
            if let Some(f) = replicas.first().and_then(|f| firsts.get_mut(f)) {
                *f -= 1;
            }
            *firsts.entry(to).or_insert(0) += 1;
            moved.insert(group);
            out.push((group, target));
            budget -= 1;
        }
    }
    out
}

/// A partition whose first replica is on a node preferred by two or more partitions more than
/// another node it also lists: that node becomes its first replica.
fn best_leader_move(
    idle: &[(GroupId, &Vec<NodeId>)],
    moved: &BTreeSet<GroupId>,
    firsts: &BTreeMap<NodeId, usize>,
    targets: &BTreeSet<NodeId>,
) -> Option<(GroupId, NodeId)> {
    let mut by_firsts: Vec<(usize, NodeId)> = firsts.iter().map(|(n, c)| (*c, *n)).collect();
    by_firsts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(high, from) in &by_firsts {
        for &(low, to) in by_firsts.iter().rev() {
            if high < low + 2 {
                break;
            }
            let found = idle.iter().find(|(g, replicas)| {
                !moved.contains(g)
                    && replicas.first() == Some(&from)
                    && replicas.contains(&to)
                    && replicas.iter().all(|n| targets.contains(n))
            });
            if let Some((g, _)) = found {
                return Some((*g, to));
            }
        }
    }
    None
}

/// Whether a rebalance has nothing left to do: no move in progress and none worth starting.
pub fn balanced(state: &MetaState, cluster: &Cluster) -> bool {
    if !state.reconfig.moves.is_empty() {
        return false;
    }
    let one = Cluster {
        max_moves: 1,
        ..cluster.clone()
    };
    plan(state, &one, true).is_empty()
}

/// Draining nodes that no partition references any more: ready to leave the metadata group.
pub fn drained(state: &MetaState) -> Vec<NodeId> {
    state
        .reconfig
        .draining
        .iter()
        .copied()
        .filter(|n| !state.references(*n))
        .collect()
}

/// The least-loaded node (ties to the lowest id) that `allowed` accepts.
fn least_loaded(
    load: &BTreeMap<NodeId, usize>,
    allowed: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    load.iter()
        .filter(|(n, _)| allowed(**n))
        .min_by_key(|(n, l)| (**l, **n))
        .map(|(n, _)| *n)
}

/// The move that narrows the spread of replica counts most: a replica of a partition whose
/// replicas are all eligible, from the most loaded node to the least loaded one the partition
/// lacks, when their counts differ by two or more.
fn best_balancing_move(
    idle: &[(GroupId, &Vec<NodeId>)],
    moved: &BTreeSet<GroupId>,
    load: &BTreeMap<NodeId, usize>,
    targets: &BTreeSet<NodeId>,
) -> Option<(GroupId, NodeId, NodeId)> {
    let mut by_load: Vec<(usize, NodeId)> = load.iter().map(|(n, l)| (*l, *n)).collect();
    by_load.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(high, from) in &by_load {
        for &(low, to) in by_load.iter().rev() {
            if high < low + 2 {
                break;
            }
            let found = idle.iter().find(|(g, replicas)| {
                !moved.contains(g)
                    && replicas.contains(&from)
                    && !replicas.contains(&to)
                    && replicas.iter().all(|n| targets.contains(n))
            });
            if let Some((g, _)) = found {
                return Some((*g, from, to));
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::command::{CommandResponse, MetaCommand};
    use crate::meta::place_replicas;
    use crate::policy::StationPolicy;

    fn cluster(members: &[NodeId]) -> Cluster {
        Cluster {
            members: members.iter().copied().collect(),
            live: members.iter().copied().collect(),
            max_moves: 1000,
            auto_balance: false,
        }
    }

    fn station(state: &mut MetaState, name: &str, on: &[NodeId], parts: u32, rf: u32) {
        let live: BTreeSet<NodeId> = on.iter().copied().collect();
        let placement = place_replicas(&live, &state.replica_counts(), parts, rf);
        let r = state.apply(&MetaCommand::CreateStation {
            tenant: "default".into(),
            name: name.into(),
            placement,
            replication_factor: rf,
            max_message_bytes: 1 << 20,
            now_ms: 1,
            policy: StationPolicy::default(),
        });
        assert!(matches!(r, CommandResponse::StationCreated(_)), "{r:?}");
    }

    /// Carries out every move at once (what the partition leaders do, then FinishMove).
    fn finish_all(state: &mut MetaState) {
        let moves: Vec<(GroupId, Vec<NodeId>)> = state
            .reconfig
            .moves
            .iter()
            .map(|(g, t)| (*g, t.clone()))
            .collect();
        for (group, replicas) in moves {
            assert_eq!(
                state.apply(&MetaCommand::FinishMove { group, replicas }),
                CommandResponse::Done
            );
        }
    }

    fn spread(state: &MetaState, nodes: &[NodeId]) -> (usize, usize) {
        let counts = state.replica_counts();
        let c: Vec<usize> = nodes
            .iter()
            .map(|n| counts.get(n).copied().unwrap_or(0))
            .collect();
        (
            c.iter().copied().min().unwrap_or(0),
            c.iter().copied().max().unwrap_or(0),
        )
    }

    #[test]
    fn removal_is_refused_below_the_replication_factor_or_three_voters() {
        let mut s = MetaState::default();
        station(&mut s, "a", &[1, 2, 3, 4], 4, 3);
        let four: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        assert_eq!(check_removal(&s, &four, 4), Ok(()));
        assert!(matches!(
            check_removal(&s, &four, 9),
            Err(RemovalError::NotMember { node: 9, .. })
        ));
        s.apply(&MetaCommand::DrainNode { node: 4 });
        let e = check_removal(&s, &four, 3).unwrap_err();
        assert!(
            e.to_string()
                .contains("would leave 2 node(s), fewer than 3"),
            "{e}"
        );
        // Replication factor 5 on five nodes: none can go.
        let mut s = MetaState::default();
        let five: BTreeSet<NodeId> = [1, 2, 3, 4, 5].into();
        station(&mut s, "wide", &[1, 2, 3, 4, 5], 1, 5);
        let e = check_removal(&s, &five, 5).unwrap_err();
        assert!(
            e.to_string()
                .contains("'default/wide' has replication factor 5"),
            "{e}"
        );
        // The last node of a one-node cluster stays.
        let one: BTreeSet<NodeId> = [1].into();
        assert!(check_removal(&MetaState::default(), &one, 1).is_err());
    }

    #[test]
    fn draining_moves_every_replica_off_the_node_and_appends_the_new_one() {
        let mut s = MetaState::default();
        station(&mut s, "a", &[1, 2, 3, 4], 8, 3);
        s.apply(&MetaCommand::DrainNode { node: 1 });
        let c = cluster(&[1, 2, 3, 4]);
        let plan = plan_moves(&s, &c);
        let on_one: Vec<GroupId> = s
            .stations
            .values()
            .flat_map(|st| &st.partitions)
            .filter(|p| p.replicas.contains(&1))
            .map(|p| p.group_id)
            .collect();
        assert_eq!(plan.iter().map(|(g, _)| *g).collect::<Vec<_>>(), on_one);
        for (g, target) in &plan {
            let before = &s.partition(*g).unwrap().replicas;
            assert!(!target.contains(&1));
            assert_eq!(target.len(), 3);
            // The kept replicas in their order, then the newcomer.
            let kept: Vec<NodeId> = before.iter().copied().filter(|n| *n != 1).collect();
            assert_eq!(&target[..2], &kept[..]);
            assert!(!before.contains(&target[2]));
        }
        s.apply(&MetaCommand::StartMoves { moves: plan });
        assert!(drained(&s).is_empty(), "still referenced while moves run");
        // Nothing more to start while they run.
        assert!(plan_moves(&s, &c).is_empty());
        finish_all(&mut s);
        assert_eq!(drained(&s), vec![1]);
        assert!(!s.references(1));
    }

    #[test]
    fn a_move_is_limited_by_the_moves_in_progress() {
        let mut s = MetaState::default();
        station(&mut s, "a", &[1, 2, 3], 6, 3);
        s.apply(&MetaCommand::DrainNode { node: 3 });
        let mut c = cluster(&[1, 2, 3, 4]);
        c.max_moves = 2;
        let plan = plan_moves(&s, &c);
        assert_eq!(plan.len(), 2);
        s.apply(&MetaCommand::StartMoves { moves: plan });
        assert!(plan_moves(&s, &c).is_empty());
        // A node that is down takes nothing.
        finish_all(&mut s);
        c.live.remove(&4);
        assert!(plan_moves(&s, &c).is_empty(), "only node 4 could take them");
    }

    #[test]
    fn finish_move_ignores_a_stale_target_and_delete_clears_moves() {
        let mut s = MetaState::default();
        station(&mut s, "a", &[1, 2, 3], 1, 3);
        let g = s.stations["default/a"].partitions[0].group_id;
        let before = s.partition(g).unwrap().replicas.clone();
        s.apply(&MetaCommand::StartMoves {
            moves: vec![(g, vec![before[0], before[1], 4])],
        });
        // A second start for the same group is skipped, as is an unknown group.
        s.apply(&MetaCommand::StartMoves {
            moves: vec![(g, vec![5, 6, 7]), (999, vec![1])],
        });
        assert_eq!(s.reconfig.moves.len(), 1);
        assert_eq!(
            s.groups_of(4).get(&g),
            Some(&vec![before[0], before[1], before[2], 4])
        );
        s.apply(&MetaCommand::FinishMove {
            group: g,
            replicas: vec![5, 6, 7],
        });
        assert_eq!(s.partition(g).unwrap().replicas, before);
        s.apply(&MetaCommand::DeleteStation {
            tenant: "default".into(),
            name: "a".into(),
        });
        assert!(s.reconfig.moves.is_empty());
    }

    #[test]
    fn rebalance_spreads_replicas_onto_added_nodes() {
        let mut s = MetaState::default();
        station(&mut s, "a", &[1, 2, 3], 10, 3);
        let c = cluster(&[1, 2, 3, 4, 5]);
        assert!(plan_moves(&s, &c).is_empty(), "no rebalance asked for");
        assert!(!balanced(&s, &c));
        s.apply(&MetaCommand::SetRebalancing { on: true });
        // A partition moves at most once per plan, so it takes a few passes.
        let mut moves = 0;
        for _ in 0..10 {
            let plan = plan_moves(&s, &c);
            moves += plan
                .iter()
                .filter(|(g, t)| {
                    let before: BTreeSet<NodeId> =
                        s.partition(*g).unwrap().replicas.iter().copied().collect();
                    before != t.iter().copied().collect::<BTreeSet<NodeId>>()
                })
                .count();
            s.apply(&MetaCommand::StartMoves { moves: plan });
            finish_all(&mut s);
        }
        let firsts = |s: &MetaState| {
            let mut f: BTreeMap<NodeId, usize> = BTreeMap::new();
            for st in s.stations.values() {
                for p in &st.partitions {
                    *f.entry(p.replicas[0]).or_insert(0) += 1;
                }
            }
            f
        };
        // Then the preferred leaders spread too: 10 partitions, 2 per node.
        assert_eq!(moves, 12, "each move brings one replica to a new node");
        assert_eq!(
            firsts(&s).values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2, 2, 2],
            "{:?}",
            firsts(&s)
        );
        let (lo, hi) = spread(&s, &[1, 2, 3, 4, 5]);
        assert_eq!((lo, hi), (6, 6), "30 replicas over 5 nodes");
        assert!(balanced(&s, &c));
        for st in s.stations.values() {
            for p in &st.partitions {
                let distinct: BTreeSet<NodeId> = p.replicas.iter().copied().collect();
                assert_eq!(distinct.len(), 3);
            }
        }
    }

    /// Seeded model: random stations, node additions, removals and crashes of moves in
    /// progress; every step keeps each partition at its replication factor with distinct,
    /// member replicas, and the end state is balanced within one with nothing left on
    /// removed nodes.
    #[test]
    fn seeded_model_of_removals_and_rebalances() {
        for seed in 0..200u64 {
            let mut rng = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n.max(1)
            };
            let mut s = MetaState::default();
            let mut members: BTreeSet<NodeId> = [1, 2, 3].into();
            let mut next_node = 4;
            let rfs = [1u32, 3];
            for i in 0..(2 + next(4)) {
                let on: Vec<NodeId> = members.iter().copied().collect();
                station(
                    &mut s,
                    &format!("s{i}"),
                    &on,
                    1 + next(6) as u32,
                    rfs[next(2) as usize],
                );
            }
            for _ in 0..30 {
                let mut c = cluster(&members.iter().copied().collect::<Vec<_>>());
                c.max_moves = 1 + next(3) as usize;
                match next(6) {
                    0 => {
                        members.insert(next_node);
                        next_node += 1;
                    }
                    1 => {
                        let pick: Vec<NodeId> = members.iter().copied().collect();
                        let n = pick[next(pick.len() as u64) as usize];
                        if check_removal(&s, &members, n).is_ok() {
                            s.apply(&MetaCommand::DrainNode { node: n });
                        }
                    }
                    2 => {
                        s.apply(&MetaCommand::SetRebalancing { on: true });
                    }
                    _ => {}
                }
                let plan = plan_moves(&s, &c);
                s.apply(&MetaCommand::StartMoves { moves: plan });
                // Some moves finish; the rest stay in progress (a controller failover picks
                // them up from the metadata).
                let running: Vec<(GroupId, Vec<NodeId>)> = s
                    .reconfig
                    .moves
                    .iter()
                    .map(|(g, t)| (*g, t.clone()))
                    .collect();
                for (group, replicas) in running {
                    if next(2) == 0 {
                        s.apply(&MetaCommand::FinishMove { group, replicas });
                    }
                }
                for n in drained(&s) {
                    members.remove(&n);
                    s.apply(&MetaCommand::ForgetNode { node: n });
                }
                for st in s.stations.values() {
                    for p in &st.partitions {
                        let distinct: BTreeSet<NodeId> = p.replicas.iter().copied().collect();
                        assert_eq!(
                            distinct.len(),
                            st.replication_factor as usize,
                            "seed {seed}"
                        );
                        assert!(
                            distinct.is_subset(&members),
                            "seed {seed}: {p:?} on removed nodes"
                        );
                    }
                }
            }
            // Settle: run the rebalance to the end.
            s.apply(&MetaCommand::SetRebalancing { on: true });
            for _ in 0..500 {
                let c = cluster(&members.iter().copied().collect::<Vec<_>>());
                let plan = plan_moves(&s, &c);
                s.apply(&MetaCommand::StartMoves { moves: plan });
                finish_all(&mut s);
                for n in drained(&s) {
                    members.remove(&n);
                    s.apply(&MetaCommand::ForgetNode { node: n });
                }
                if balanced(&s, &c) && s.reconfig.draining.is_empty() {
                    break;
                }
            }
            assert!(s.reconfig.draining.is_empty(), "seed {seed}: drains finish");
            let c = cluster(&members.iter().copied().collect::<Vec<_>>());
            assert!(balanced(&s, &c), "seed {seed}: the rebalance ends");
            let nodes: Vec<NodeId> = members.iter().copied().collect();
            let (lo, hi) = spread(&s, &nodes);
            assert!(
                hi <= lo + 1,
                "seed {seed}: spread {lo}..{hi} over {nodes:?}"
            );
        }
    }
}
