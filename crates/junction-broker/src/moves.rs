//! Moving partition replicas between nodes: removing a node and rebalancing.
//!
//! The decisions are pure: [`junction_types::reconfig`] chooses the moves from the metadata,
//! [`next_step`] chooses a partition leader's next Raft membership step. The rest is I/O:
//!
//! - The controller (the metadata leader) runs [`Broker::reconfig_loop`]: it records new moves
//!   in the metadata (`StartMoves`), asks each moving partition's leader to change its voters
//!   (`Peer.ChangeReplicas`) until it answers done, then records the result (`FinishMove`).
//!   A drained node leaves the metadata group last. Everything in progress is metadata, so a
//!   new controller carries on after a failover, and every step may be repeated.
//! - A partition leader serving `ChangeReplicas` ([`Broker::change_replicas`]) adds the new
//!   nodes as learners, waits until they caught up, hands leadership over if it is itself
//!   leaving, and replaces the voters in one joint-consensus change. A node being removed keeps
//!   its replica until the metadata records the new replica list; then reconciliation deletes
//!   it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use junction_proto::peer::{ChangeReplicasRequest, ChangeReplicasResponse};
use junction_types::reconfig::{self, Cluster, check_removal};
use junction_types::{GroupId, MetaCommand, MetaState, NodeId};
use openraft::ChangeMembers;
use openraft::async_runtime::watch::WatchReceiver;

use crate::{Broker, BrokerError};

/// How replicas move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveTuning {
    /// Moves in progress at once, cluster-wide (the balancer's rate limit).
    pub max_moves: usize,
    /// Even out replica counts without being asked (`junction station rebalance` asks).
    pub auto_balance: bool,
}

impl Default for MoveTuning {
    fn default() -> Self {
        Self {
            max_moves: 2,
            auto_balance: false,
        }
    }
}

/// Longest one `ChangeReplicas` call works before it answers (the controller asks again).
const CHANGE_LIMIT: Duration = Duration::from_secs(20);
/// The controller's wait for one `ChangeReplicas` answer.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Between the controller's passes, and between automatic balance checks.
const PASS_EVERY: Duration = Duration::from_secs(1);
const AUTO_BALANCE_EVERY: Duration = Duration::from_secs(30);
/// Between a follower's checks that the metadata leader still counts it as a member.
const MEMBERSHIP_CHECK_EVERY: Duration = Duration::from_secs(3);

/// A partition group's membership as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub me: NodeId,
    /// Voters of every configuration in effect (both, during a joint change).
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Nodes whose log is within [`crate::leadership::CAUGHT_UP_ENTRIES`] of the leader's
    /// (the leader itself included).
    pub caught_up: BTreeSet<NodeId>,
    /// A joint configuration is in effect (a change was interrupted).
    pub joint: bool,
}

/// A leader's next step towards voters `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done,
    /// Add these nodes as learners (they start catching up).
    AddLearners(Vec<NodeId>),
    /// Wait until these learners caught up: promoting a learner far behind would stall
    /// writes until it catches up.
    WaitCatchUp(Vec<NodeId>),
    /// This leader is not among the target voters: hand leadership to one that is first.
    HandOff,
    /// One joint-consensus change to exactly these voters.
    ReplaceVoters(BTreeSet<NodeId>),
    /// Drop learners left by an abandoned move.
    RemoveLearners(BTreeSet<NodeId>),
}

/// The next membership step of a partition leader that is to have voters `target`.
pub fn next_step(v: &GroupView, target: &BTreeSet<NodeId>) -> Step {
    if v.voters == *target && !v.joint {
        let stale: BTreeSet<NodeId> = v.learners.difference(target).copied().collect();
        return if stale.is_empty() {
            Step::Done
        } else {
            Step::RemoveLearners(stale)
        };
    }
    let missing: Vec<NodeId> = target
        .iter()
        .copied()
        .filter(|n| !v.voters.contains(n) && !v.learners.contains(n))
        .collect();
    if !missing.is_empty() {
        return Step::AddLearners(missing);
    }
    let lagging: Vec<NodeId> = target
        .iter()
        .copied()
        .filter(|n| v.learners.contains(n) && !v.caught_up.contains(n))
        .collect();
    if !lagging.is_empty() {
        return Step::WaitCatchUp(lagging);
    }
    if !target.contains(&v.me) {
        return Step::HandOff;
    }
    Step::ReplaceVoters(target.clone())
}

/// The leader's view of a partition group; `Err(leader)` when this node does not lead it.
fn group_view(raft: &junction_raft::PartitionRaft) -> Result<GroupView, Option<NodeId>> {
    let m = raft.metrics();
    let m = m.borrow_watched();
    if m.current_leader != Some(m.id) {
        return Err(m.current_leader);
    }
    if m.replication.is_none() {
        return Err(None);
    }
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let mut caught_up = crate::leadership::caught_up_followers(&m);
    caught_up.insert(m.id);
    Ok(GroupView {
        me: m.id,
        learners: membership
            .learner_ids()
            .filter(|n| !voters.contains(n))
            .collect(),
        voters,
        caught_up,
        joint: membership.get_joint_config().len() > 1,
    })
}

/// Whether `status`, the answer of the node `leader` this node takes for the metadata leader,
/// shows that this node (which believes itself a voter) was removed: `leader` leads and its
/// voters do not include `me`. A learner still joining believes no such thing.
pub fn removed_by(
    me: NodeId,
    believes_voter: bool,
    leader: NodeId,
    status: &junction_proto::peer::NodeStatusResponse,
) -> bool {
    let leads = status
        .groups
        .iter()
        .any(|g| g.group == junction_types::META_GROUP && g.leader == Some(leader));
    believes_voter && leads && !status.meta_voters.is_empty() && !status.meta_voters.contains(&me)
}

fn not_done(leader: Option<NodeId>, error: String) -> ChangeReplicasResponse {
    ChangeReplicasResponse {
        done: false,
        leader,
        error,
    }
}

impl Broker {
    /// Serves `Peer.ChangeReplicas`: makes the voters of `group` exactly `voters`, if this
    /// node leads it. Answers within [`CHANGE_LIMIT`]; the caller repeats until done.
    pub async fn change_replicas(
        &self,
        group: GroupId,
        voters: Vec<NodeId>,
    ) -> ChangeReplicasResponse {
        let target: BTreeSet<NodeId> = voters.into_iter().collect();
        let Some(replica) = self.partition(group) else {
            return not_done(
                None,
                format!("group {group} is not hosted on node {}", self.node_id()),
            );
        };
        let raft = &replica.raft;
        let deadline = tokio::time::Instant::now() + CHANGE_LIMIT;
        loop {
            // Every step may write (learners, voters, a hand-off): the group stays awake.
            replica.quiet.ready_to_write().await;
            let view = match group_view(raft) {
                Ok(v) => v,
                Err(leader) => {
                    return not_done(
                        leader,
                        format!("node {} does not lead group {group}", self.node_id()),
                    );
                }
            };
            let step = next_step(&view, &target);
            tracing::debug!(group, ?step, "replica change step");
            let failed = match step {
                Step::Done => {
                    return ChangeReplicasResponse {
                        done: true,
                        ..Default::default()
                    };
                }
                Step::AddLearners(nodes) => {
                    let mut failed = None;
                    for n in nodes {
                        let Some(addr) = self.addr_of(n) else {
                            return not_done(None, format!("no address known for node {n}"));
                        };
                        tracing::info!(group, node = n, "adding a partition replica as a learner");
                        if let Err(e) = raft
                            .add_learner(n, openraft::BasicNode::new(addr), false)
                            .await
                        {
                            failed = Some(format!("adding node {n} as a learner: {e}"));
                            break;
                        }
                    }
                    failed
                }
                Step::WaitCatchUp(lagging) => {
                    if tokio::time::Instant::now() >= deadline {
                        return not_done(
                            Some(view.me),
                            format!("learners {lagging:?} of group {group} are still catching up"),
                        );
                    }
                    let mut rx = raft.metrics();
                    let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
                    None
                }
                Step::HandOff => {
                    let to = target
                        .iter()
                        .copied()
                        .find(|n| view.voters.contains(n) && view.caught_up.contains(n));
                    return match to {
                        Some(to) => {
                            tracing::info!(
                                group,
                                to,
                                "handing partition leadership over before leaving its voters"
                            );
                            match raft.trigger().transfer_leader(to).await {
                                Ok(()) => not_done(
                                    Some(to),
                                    format!("leadership of group {group} handed to node {to}"),
                                ),
                                Err(e) => not_done(
                                    None,
                                    format!(
                                        "handing leadership of group {group} to node {to}: {e}"
                                    ),
                                ),
                            }
                        }
                        None => not_done(
                            Some(view.me),
                            format!("no caught-up voter of group {group} to hand leadership to"),
                        ),
                    };
                }
                Step::ReplaceVoters(voters) => {
                    tracing::info!(group, ?voters, "changing partition voters");
                    raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
                        .await
                        .err()
                        .map(|e| format!("changing the voters of group {group}: {e}"))
                }
                Step::RemoveLearners(nodes) => raft
                    .change_membership(ChangeMembers::RemoveNodes(nodes), false)
                    .await
                    .err()
                    .map(|e| format!("removing learners of group {group}: {e}")),
            };
            if let Some(error) = failed {
                return not_done(None, error);
            }
            if tokio::time::Instant::now() >= deadline {
                return not_done(
                    Some(view.me),
                    format!("group {group}: the change is still under way"),
                );
            }
        }
    }

    /// Starts removing `node`: its replicas move to the other nodes, then it leaves the
    /// metadata group (the controller's [`Broker::reconfig_loop`] does both). Returns at once;
    /// the cluster status shows the node as draining until it is gone. Idempotent.
    pub async fn remove_node(&self, node: NodeId) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        let state = self.metadata();
        if state.reconfig.draining.contains(&node) {
            return Ok(());
        }
        check_removal(&state, &self.meta_voters(), node)?;
        tracing::info!(node, "removing a node: moving its replicas away");
        self.meta_write(MetaCommand::DrainNode { node }).await?;
        Ok(())
    }

    /// Starts a rebalance: replicas move (a few at a time) until every node's replica count
    /// is within one of the others'. Returns how many moves it expects.
    pub async fn rebalance(&self) -> Result<usize, BrokerError> {
        self.ensure_controller()?;
        let expected = reconfig::rebalance_size(&self.metadata(), &self.cluster_view().await);
        self.meta_write(MetaCommand::SetRebalancing { on: true })
            .await?;
        Ok(expected)
    }

    /// Whether this node learnt from the metadata leader that it is no longer a member.
    pub fn is_removed(&self) -> bool {
        self.removed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Watches whether this node is still a member: every few seconds a follower asks the
    /// metadata leader it knows for its voters. A node removed while it was down (or whose
    /// removal it never applied) still believes its old membership; the leader's answer
    /// tells it otherwise, and it then reports not ready instead of serving stale metadata.
    pub(crate) async fn membership_watch(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(MEMBERSHIP_CHECK_EVERY) => {}
            }
            let (leader, _) = self.meta_leader();
            let Some(leader) = leader.filter(|l| *l != self.node_id()) else {
                continue;
            };
            let Some(addr) = self.addr_of(leader) else {
                continue;
            };
            let Some(status) = self.node_status_of(&addr).await else {
                continue;
            };
            let removed = removed_by(self.node_id(), self.is_voter(), leader, &status);
            let was = self
                .removed
                .swap(removed, std::sync::atomic::Ordering::Relaxed);
            if removed && !was {
                tracing::error!(
                    leader,
                    voters = ?status.meta_voters,
                    "this node is no longer a member of the cluster (it was removed); it \
                     reports not ready. To bring it back, start it on an empty data directory"
                );
            }
        }
    }

    /// The voters of the metadata group.
    pub fn meta_voters(&self) -> BTreeSet<NodeId> {
        let m = self.meta_raft().metrics();
        let m = m.borrow_watched();
        m.membership_config.membership().voter_ids().collect()
    }

    async fn cluster_view(&self) -> Cluster {
        // `reconfig` reads `live` only to choose targets, where it leaves out draining nodes
        // itself: the placeable nodes are the same answer.
        Cluster {
            members: self.meta_voters(),
            live: self.placeable_nodes().await,
            max_moves: self.config().moves.max_moves,
            auto_balance: self.config().moves.auto_balance,
        }
    }

    /// The controller's work on moves: runs on every node, acts while it is the controller.
    pub(crate) async fn reconfig_loop(self: Arc<Self>) {
        let mut rx = self.subscribe_metadata();
        let mut last_auto = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(PASS_EVERY) => {}
            }
            if self.ensure_controller().is_err() {
                continue;
            }
            let state = self.metadata();
            self.raise_format_level(&state).await;
            let auto =
                self.config().moves.auto_balance && last_auto.elapsed() >= AUTO_BALANCE_EVERY;
            if state.reconfig == junction_types::meta::Reconfig::default() && !auto {
                continue;
            }
            if auto {
                last_auto = tokio::time::Instant::now();
            }
            if let Err(e) = self.reconfig_pass(&state).await {
                tracing::warn!(error = %e, "moving replicas: will retry");
            }
        }
    }

    async fn reconfig_pass(self: &Arc<Self>, state: &MetaState) -> Result<(), BrokerError> {
        let cluster = self.cluster_view().await;
        let plan = reconfig::plan_moves(state, &cluster);
        if !plan.is_empty() {
            for (group, target) in &plan {
                let from = state.partition(*group).map(|p| p.replicas.clone());
                tracing::info!(group, ?from, to = ?target, "moving a partition's replicas");
            }
            self.meta_write(MetaCommand::StartMoves { moves: plan })
                .await?;
        }
        for (group, target) in &state.reconfig.moves {
            self.spawn_move(*group, target.clone());
        }
        for node in reconfig::drained(state) {
            self.retire(node).await?;
        }
        if state.reconfig.rebalancing
            && state.reconfig.draining.is_empty()
            && reconfig::balanced(state, &cluster)
        {
            tracing::info!("rebalance finished");
            self.meta_write(MetaCommand::SetRebalancing { on: false })
                .await?;
        }
        Ok(())
    }

    /// Drives one move in the background unless it is being driven already.
    fn spawn_move(self: &Arc<Self>, group: GroupId, target: Vec<NodeId>) {
        if !self.moving.lock().insert(group) {
            return;
        }
        let b = self.clone();
        self.tasks.spawn(async move {
            let shutdown = b.shutdown.clone();
            tokio::select! {
                // A stopping node leaves the move to the next controller.
                () = shutdown.cancelled() => {}
                r = b.drive_move(group, &target) => if let Err(e) = r {
                    tracing::info!(group, error = %e, "partition move not finished yet; will retry");
                }
            }
            b.moving.lock().remove(&group);
        });
    }

    /// Asks the partition's leader to change its voters to `target`, following leadership
    /// hints, and records the move as finished once it answers done.
    async fn drive_move(&self, group: GroupId, target: &[NodeId]) -> Result<(), BrokerError> {
        let state = self.metadata();
        let Some(p) = state.partition(group) else {
            return Ok(());
        };
        let mut ask: Vec<NodeId> = state.hosts_of(p);
        let mut last_error = String::from("no replica answered");
        for _ in 0..8 {
            let Some(node) = ask.first().copied() else {
                break;
            };
            let answer = if node == self.node_id() {
                self.change_replicas(group, target.to_vec()).await
            } else {
                let Some(addr) = self.addr_of(node) else {
                    ask.remove(0);
                    continue;
                };
                let call = async {
                    let mut client = self.peers().client(&addr).map_err(|e| e.to_string())?;
                    client
                        .change_replicas(ChangeReplicasRequest {
                            group,
                            voters: target.to_vec(),
                        })
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|e| e.to_string())
                };
                match tokio::time::timeout(CALL_LIMIT, call).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) => not_done(None, e),
                    Err(_) => not_done(None, format!("node {node} did not answer in time")),
                }
            };
            if answer.done {
                tracing::info!(group, replicas = ?target, "partition move finished");
                self.meta_write(MetaCommand::FinishMove {
                    group,
                    replicas: target.to_vec(),
                })
                .await?;
                return Ok(());
            }
            last_error = answer.error;
            match answer.leader {
                Some(l) if l != node => {
                    ask.retain(|n| *n != l);
                    ask.insert(0, l);
                }
                Some(_) => {}
                None => {
                    ask.remove(0);
                }
            }
        }
        Err(BrokerError::Unavailable(format!(
            "moving group {group}: {last_error}"
        )))
    }

    /// Takes a drained node out of the metadata group, then forgets it. The controller hands
    /// its own leadership over first when it is the node leaving; a node that still hosts
    /// partitions (it has not applied the last move yet) is waited for.
    async fn retire(&self, node: NodeId) -> Result<(), BrokerError> {
        if node == self.node_id() {
            if let Some(to) = crate::leadership::meta_handoff_target(self) {
                tracing::info!(
                    to,
                    "handing the controller role over before leaving the cluster"
                );
                let _ = self.meta_raft().trigger().transfer_leader(to).await;
            }
            return Ok(());
        }
        let voters = self.meta_voters();
        let member = self.addr_of(node);
        if let Some(addr) = &member {
            let still_hosting = self.node_status_of(addr).await.is_some_and(|status| {
                status
                    .groups
                    .iter()
                    .any(|g| g.group != junction_types::META_GROUP)
            });
            if still_hosting {
                tracing::debug!(node, "waiting for a drained node to release its replicas");
                return Ok(());
            }
            tracing::info!(node, "removing a drained node from the metadata group");
            let change = if voters.contains(&node) {
                ChangeMembers::ReplaceAllVoters(
                    voters.iter().copied().filter(|v| *v != node).collect(),
                )
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([node]))
            };
            self.meta_raft()
                .change_membership(change, false)
                .await
                .map_err(|e| {
                    BrokerError::Unavailable(format!(
                        "removing node {node} from the metadata group: {e}"
                    ))
                })?;
        }
        tracing::info!(node, "node removed from the cluster");
        self.meta_write(MetaCommand::ForgetNode { node }).await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn view(me: NodeId, voters: &[NodeId], learners: &[NodeId], caught_up: &[NodeId]) -> GroupView {
        GroupView {
            me,
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            caught_up: caught_up.iter().copied().collect(),
            joint: false,
        }
    }

    fn set(n: &[NodeId]) -> BTreeSet<NodeId> {
        n.iter().copied().collect()
    }

    #[test]
    fn a_move_adds_waits_replaces_and_is_then_done() {
        let target = set(&[2, 3, 4]);
        let v = view(1, &[1, 2, 3], &[], &[1, 2, 3]);
        assert_eq!(next_step(&v, &target), Step::AddLearners(vec![4]));
        let v = view(1, &[1, 2, 3], &[4], &[1, 2, 3]);
        assert_eq!(next_step(&v, &target), Step::WaitCatchUp(vec![4]));
        // Node 1 leads and leaves: it hands over first.
        let v = view(1, &[1, 2, 3], &[4], &[1, 2, 3, 4]);
        assert_eq!(next_step(&v, &target), Step::HandOff);
        let v = view(2, &[1, 2, 3], &[4], &[1, 2, 3, 4]);
        assert_eq!(next_step(&v, &target), Step::ReplaceVoters(target.clone()));
        // Interrupted in the joint configuration: the change is made again.
        let mut joint = view(2, &[1, 2, 3, 4], &[], &[1, 2, 3, 4]);
        joint.joint = true;
        assert_eq!(
            next_step(&joint, &target),
            Step::ReplaceVoters(target.clone())
        );
        let v = view(2, &[2, 3, 4], &[], &[2, 3, 4]);
        assert_eq!(next_step(&v, &target), Step::Done);
    }

    #[test]
    fn a_voter_missing_from_the_leaders_voters_was_removed() {
        use junction_proto::peer::{GroupStatus, NodeStatusResponse};
        let answer = |leader: Option<NodeId>, voters: &[NodeId]| NodeStatusResponse {
            node_id: 1,
            groups: vec![GroupStatus {
                group: junction_types::META_GROUP,
                leader,
                ..Default::default()
            }],
            meta_voters: voters.to_vec(),
            ..Default::default()
        };
        assert!(removed_by(4, true, 1, &answer(Some(1), &[1, 2, 3])));
        assert!(!removed_by(4, true, 1, &answer(Some(1), &[1, 2, 3, 4])));
        // A learner that is joining is not "removed".
        assert!(!removed_by(4, false, 1, &answer(Some(1), &[1, 2, 3])));
        // Only the leader's word counts, and an answer without voters (an older node) says
        // nothing.
        assert!(!removed_by(4, true, 1, &answer(Some(2), &[1, 2, 3])));
        assert!(!removed_by(4, true, 1, &answer(Some(1), &[])));
    }

    #[test]
    fn stale_learners_are_dropped_and_a_repeated_call_is_done() {
        let target = set(&[1, 2, 3]);
        let v = view(1, &[1, 2, 3], &[5], &[1, 2, 3]);
        assert_eq!(next_step(&v, &target), Step::RemoveLearners(set(&[5])));
        let v = view(1, &[1, 2, 3], &[], &[1, 2, 3]);
        assert_eq!(next_step(&v, &target), Step::Done);
    }

    /// Seeded model: a group that applies each step (and sometimes loses its leader or stops
    /// half way) always reaches exactly the target voters, never with fewer than the target's
    /// majority of caught-up voters in any configuration it passes through.
    #[test]
    fn seeded_model_reaches_the_target() {
        for seed in 0..500u64 {
            let mut rng = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n.max(1)
            };
            let nodes: Vec<NodeId> = (1..=6).collect();
            let pick = |next: &mut dyn FnMut(u64) -> u64| {
                let mut s = BTreeSet::new();
                while s.len() < 3 {
                    s.insert(nodes[next(6) as usize]);
                }
                s
            };
            let start = pick(&mut next);
            // Moves replace some replicas, never all (removal keeps a majority of nodes).
            let target = loop {
                let t = pick(&mut next);
                if !t.is_disjoint(&start) {
                    break t;
                }
            };
            let mut v = GroupView {
                me: *start.iter().next().unwrap(),
                voters: start,
                learners: BTreeSet::new(),
                caught_up: BTreeSet::new(),
                joint: false,
            };
            v.caught_up = v.voters.clone();
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 100, "seed {seed}: no progress");
                match next_step(&v, &target) {
                    Step::Done => break,
                    Step::AddLearners(ns) => v.learners.extend(ns),
                    Step::WaitCatchUp(ns) => {
                        if next(2) == 0 {
                            v.caught_up.extend(ns);
                        }
                    }
                    Step::HandOff => {
                        assert!(!target.contains(&v.me));
                        let to = target
                            .iter()
                            .copied()
                            .find(|n| v.voters.contains(n) && v.caught_up.contains(n));
                        if let Some(to) = to {
                            v.me = to;
                        }
                    }
                    Step::ReplaceVoters(t) => {
                        assert!(t.contains(&v.me), "seed {seed}: the leader stays a voter");
                        assert!(
                            t.iter().all(|n| v.caught_up.contains(n)),
                            "seed {seed}: only caught-up nodes become voters"
                        );
                        // Sometimes the change stops in the joint configuration.
                        if next(3) == 0 {
                            v.voters.extend(t.iter().copied());
                            v.learners.retain(|n| !t.contains(n));
                            v.joint = true;
                        } else {
                            v.learners.retain(|n| !t.contains(n));
                            v.voters = t;
                            v.joint = false;
                        }
                    }
                    Step::RemoveLearners(ls) => v.learners.retain(|n| !ls.contains(n)),
                }
            }
            assert_eq!(v.voters, target, "seed {seed}");
            assert!(v.learners.is_empty(), "seed {seed}");
        }
    }
}
