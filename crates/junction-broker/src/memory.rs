//! Memory stations: replicas keep their Raft log and messages in the node's memory store;
//! only the group's Raft vote is on disk, so a restarted replica never votes twice in a term.
//!
//! A restarted replica comes back with an empty log and is caught up by its leader (the group
//! allows log reversion). Only the group's first replica ever initialises the group, and it
//! decides before opening the group: when no other replica holds the group's data or a
//! leader, it initialises it — at creation, or after every replica lost it. In the second
//! case a disk marker tells it the group existed before: it clears its stale vote, starts the
//! group empty and records the loss in the partition (`DataLost`), which `station describe`
//! shows. The station comes back empty and says so, never half-filled. While some replica
//! does not answer, the decision waits (the open is retried).

use std::collections::BTreeMap;
use std::time::Duration;

use junction_proto::peer::PartitionStatsRequest;
use junction_raft::{PartitionRaft, PeerPool};
use junction_storage::Store;
use junction_storage::keys::{CF_RAFT_META, raft_tag};
use junction_types::{Command, GroupId, NodeId, PartitionCommand};
use openraft::async_runtime::watch::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::BrokerError;
use crate::partition::now_ms;

/// What the first replica of a memory group does when it opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryStart {
    /// Open it and wait for the leader (other replicas hold it, or this one already does).
    Join,
    /// A new group: initialise it.
    Create,
    /// Every replica lost it: initialise it empty and record the loss.
    Recreate,
}

/// Decides how the first replica opens memory group `group` (see the module doc). Fails
/// (to be retried) while some replica does not answer.
pub(crate) async fn decide_start(
    me: NodeId,
    group: GroupId,
    replicas: &[NodeId],
    pool: &PeerPool,
    addrs: &BTreeMap<NodeId, String>,
    memory: &Store,
    disk: &Store,
) -> Result<MemoryStart, BrokerError> {
    if memory.last_log(group)?.is_some() {
        return Ok(MemoryStart::Join);
    }
    for r in replicas.iter().filter(|r| **r != me) {
        let waiting = || {
            BrokerError::Unavailable(format!(
                "memory partition group {group}: waiting for replica node {r} to answer before deciding whether its data survives"
            ))
        };
        let addr = addrs.get(r).ok_or_else(waiting)?;
        let mut client = pool.client(addr).map_err(|_| waiting())?;
        let stats = tokio::time::timeout(
            Duration::from_secs(1),
            client.partition_stats(PartitionStatsRequest {
                groups: vec![group],
            }),
        )
        .await
        .map_err(|_| waiting())?
        .map_err(|_| waiting())?;
        // A replica that restarted has an empty log (its vote, on disk, says nothing about
        // the data); one that holds any entry keeps the group alive.
        if stats
            .into_inner()
            .groups
            .iter()
            .any(|g| g.group == group && (g.last_log_index.is_some() || g.next_offset > 0))
        {
            return Ok(MemoryStart::Join);
        }
    }
    let existed = disk
        .get_tag(CF_RAFT_META, group, raft_tag::MEMORY_INITIALISED)?
        .is_some();
    let mut b = disk.batch();
    if existed {
        // The stale vote would keep the group from being initialised again.
        b.delete_tag(CF_RAFT_META, group, raft_tag::VOTE)?;
    } else {
        b.put_tag(
            CF_RAFT_META,
            group,
            raft_tag::MEMORY_INITIALISED,
            &now_ms().to_be_bytes(),
        )?;
    }
    disk.write_sync(b)?;
    Ok(if existed {
        MemoryStart::Recreate
    } else {
        MemoryStart::Create
    })
}

/// Records a total loss in the partition once this node leads it (it just initialised the
/// group, so it normally wins the first election).
pub(crate) async fn report_loss(
    me: NodeId,
    group: GroupId,
    raft: PartitionRaft,
    shutdown: CancellationToken,
) {
    tracing::warn!(
        group,
        "every replica of this memory partition lost its data; it restarts empty"
    );
    let at_ms = now_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() {
        let leader = raft.metrics().borrow_watched().current_leader;
        if leader == Some(me) {
            let cmd = Command::Partition(PartitionCommand::DataLost { at_ms });
            match raft.client_write(cmd).await {
                Ok(_) => return,
                Err(e) => tracing::debug!(group, "recording data loss: {e}"),
            }
        } else if leader.is_some() {
            tracing::warn!(
                group,
                "another replica leads the reset memory partition; the loss is not recorded"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
