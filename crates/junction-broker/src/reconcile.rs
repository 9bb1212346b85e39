//! Keeps the partition groups running on this node equal to what the metadata assigns it.
//!
//! Runs after every metadata change and once a second (to retry failures). A group is only
//! removed when the metadata has seen its creation (`group < next_group_id`) and no longer
//! lists this node: a node whose metadata lags never deletes a group it was just given.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use junction_types::{GroupId, META_GROUP, MetaState};

use crate::{Broker, BrokerError};

/// How often a node moves leaderships back to preferred replicas.
const REBALANCE_EVERY: Duration = Duration::from_secs(30);

impl Broker {
    pub(crate) async fn reconcile_loop(self: Arc<Self>) {
        let mut rx = self.subscribe_metadata();
        // Moving a leader makes in-flight produces fail and be retried (duplicates until the
        // idempotent producer exists), so leadership is rebalanced rarely: first 30 s after
        // start, then every 30 s.
        let mut last_rebalance = tokio::time::Instant::now();
        loop {
            let state = rx.borrow_and_update().clone();
            self.reconcile(&state).await;
            if last_rebalance.elapsed() >= REBALANCE_EVERY {
                self.rebalance_leaders().await;
                last_rebalance = tokio::time::Instant::now();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Starts missing replicas and removes ones the metadata no longer assigns here.
    pub async fn reconcile(&self, state: &MetaState) {
        let _serial = self.reconcile_lock.lock().await;
        if self.shutdown.is_cancelled() {
            return;
        }
        let wanted = state.groups_of(self.node_id());
        let running: BTreeSet<GroupId> = self.hosted().into_iter().collect();
        // New replicas come up in waves: the rest wait for a later pass (every second).
        let mut settling = self.settling_replicas();
        let mut deferred = 0usize;
        for (group, replicas) in &wanted {
            if let Some(detail) = self.partition(*group).and_then(|r| corrupt_stop(&r.raft)) {
                // Its Raft stopped on a stored entry that fails its checksum: the replica
                // cannot go on, so it is wiped and fetched again like any corrupt replica.
                metrics::counter!("junction_corruption_events_total", "kind" => "log").increment(1);
                tracing::error!(group, %detail, "a partition replica stopped on corrupt stored data");
                if let Err(e) = self.wipe_and_reopen(*group, replicas).await {
                    tracing::error!(group, error = %e, "repairing a corrupt replica failed; will retry");
                }
                continue;
            }
            if running.contains(group) {
                if let (Some(r), Some((station, _))) =
                    (self.partition(*group), state.partition_of_group(*group))
                {
                    *r.policy.write() = station.policy;
                    *r.delivery.write() = station.delivery;
                }
                continue;
            }
            if !self.may_open(settling) {
                deferred += 1;
                continue;
            }
            match self.open_partition(*group, replicas).await {
                Ok(()) => settling += 1,
                Err(BrokerError::CorruptReplica { detail, .. }) => {
                    metrics::counter!("junction_corruption_events_total", "kind" => "open")
                        .increment(1);
                    tracing::error!(group, %detail, "a partition replica cannot open: its stored data is corrupt");
                    if let Err(e) = self.wipe_and_reopen(*group, replicas).await {
                        tracing::error!(group, error = %e, "repairing a corrupt replica failed; will retry");
                    }
                }
                Err(e) => {
                    tracing::warn!(group, error = %e, "starting partition replica failed; will retry");
                }
            }
        }
        if deferred > 0 {
            tracing::debug!(
                settling,
                deferred,
                "opening more partition replicas once the ones just opened settle"
            );
        }
        for group in &running {
            if !wanted.contains_key(group) && *group < state.next_group_id {
                self.close_partition(*group, true).await;
            }
        }
        // Data of groups deleted while this node was down.
        match self.store.hosted_groups() {
            Ok(stored) => {
                for group in stored {
                    if group != META_GROUP
                        && group < state.next_group_id
                        && !wanted.contains_key(&group)
                        && self.partition(group).is_none()
                    {
                        self.close_partition(group, true).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing stored groups failed"),
        }
    }
}

/// Why a partition's Raft stopped, when it stopped because stored bytes failed their checksum
/// (a corrupt log entry or record read by Raft itself).
fn corrupt_stop(raft: &junction_raft::PartitionRaft) -> Option<String> {
    use openraft::async_runtime::watch::WatchReceiver;
    let m = raft.metrics();
    let m = m.borrow_watched();
    match &m.running_state {
        Err(openraft::errors::Fatal::StorageError(e)) => {
            let text = e.to_string();
            junction_raft::names_corruption(&text).then_some(text)
        }
        _ => None,
    }
}
