//! Where leaders live: moving partition leadership back to each partition's preferred
//! replica (the first in its replica list, which placement spreads evenly), and handing
//! leadership off before a graceful shutdown so that clients see a handover, not an election.

use std::sync::Arc;
use std::time::Duration;

use junction_types::NodeId;
use openraft::async_runtime::watch::WatchReceiver;

use crate::Broker;

/// A follower within this many entries of the leader's log counts as caught up (to take
/// over leadership, or, as a learner, to become a voter).
pub(crate) const CAUGHT_UP_ENTRIES: u64 = 64;

/// The followers (voters and learners) within [`CAUGHT_UP_ENTRIES`] of the leader's log, from
/// the leader's metrics; empty on a node that does not lead.
pub(crate) fn caught_up_followers(
    m: &openraft::RaftMetrics<junction_raft::TypeConfig>,
) -> std::collections::BTreeSet<NodeId> {
    let last = m.last_log_index.unwrap_or(0);
    m.replication
        .iter()
        .flatten()
        .filter(|(_, l)| {
            l.as_ref()
                .is_some_and(|l| l.index + CAUGHT_UP_ENTRIES >= last)
        })
        .map(|(id, _)| *id)
        .collect()
}

/// Returns the follower to hand leadership to: `preferred` if caught up, else (when
/// `preferred` is `None`) the most up-to-date follower; `None` if this node is not the leader.
fn handoff_target<SM>(
    raft: &openraft::Raft<junction_raft::TypeConfig, SM>,
    preferred: Option<NodeId>,
) -> Option<NodeId>
where
    SM: openraft::storage::RaftStateMachine<junction_raft::TypeConfig>,
{
    let m = raft.metrics();
    let m = m.borrow_watched();
    if m.current_leader != Some(m.id) {
        return None;
    }
    let replication = m.replication.as_ref()?;
    let caught_up = caught_up_followers(&m);
    match preferred {
        Some(p) => (p != m.id && caught_up.contains(&p)).then_some(p),
        None => replication
            .iter()
            .filter(|(id, _)| **id != m.id)
            .max_by_key(|(_, l)| l.as_ref().map(|l| l.index))
            .map(|(id, _)| *id)
            .filter(|id| caught_up.contains(id)),
    }
}

/// The metadata voter to hand the controller role to (the most up-to-date caught-up one), if
/// this node leads the metadata group.
pub(crate) fn meta_handoff_target(b: &Broker) -> Option<NodeId> {
    handoff_target(b.meta_raft(), None)
}

impl Broker {
    /// Moves leadership of partitions this node leads to their preferred replica when that
    /// replica is caught up. Runs periodically from the reconcile loop.
    pub(crate) async fn rebalance_leaders(&self) {
        let state = self.metadata();
        let assigned = state.groups_of(self.node_id());
        for (group, replicas) in assigned {
            let Some(replica) = self.partition(group) else {
                continue;
            };
            // Never back onto a node being removed, nor onto one a move has not finished
            // adding.
            let listed = state
                .partition(group)
                .map(|p| p.replicas.clone())
                .unwrap_or(replicas);
            let preferred = listed
                .iter()
                .copied()
                .find(|n| !state.reconfig.draining.contains(n));
            if preferred == Some(self.node_id()) {
                continue;
            }
            if let Some(to) = handoff_target(&replica.raft, preferred) {
                tracing::info!(
                    group,
                    to,
                    "moving partition leadership to its preferred replica"
                );
                replica.quiet.wake();
                let _ = replica.raft.trigger().transfer_leader(to).await;
            }
        }
    }

    /// Hands off leadership of every group this node leads and waits (bounded) until it has
    /// moved, so a graceful stop costs clients a handover rather than an election timeout.
    pub(crate) async fn hand_off_leadership(&self, limit: Duration) {
        let mut waits = Vec::new();
        let partitions: Vec<Arc<crate::PartitionReplica>> = self.replicas();
        for replica in partitions {
            let raft = &replica.raft;
            if let Some(to) = handoff_target(raft, None) {
                replica.quiet.wake();
                let _ = raft.trigger().transfer_leader(to).await;
                let r = raft.clone();
                let leader = move || r.metrics().borrow_watched().current_leader;
                waits.push(Box::pin(wait_not_leader(leader, self.node_id(), limit))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);
            }
        }
        if let Some(to) = handoff_target(self.meta_raft(), None) {
            let _ = self.meta_raft().trigger().transfer_leader(to).await;
            let r = self.meta_raft().clone();
            let leader = move || r.metrics().borrow_watched().current_leader;
            waits.push(Box::pin(wait_not_leader(leader, self.node_id(), limit)));
        }
        futures::future::join_all(waits).await;
    }
}

/// Polls `leader` until it names another node, or `limit` passes.
async fn wait_not_leader(leader: impl Fn() -> Option<NodeId>, me: NodeId, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if leader().is_some_and(|l| l != me) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
