//! Memory stations: replicas keep their Raft log and messages in the node's memory store.
//!
//! A restarted replica comes back empty and is caught up by its leader (the group allows
//! log reversion). Only the group's first replica ever initialises the group, and for a
//! memory group it does so only when no other replica holds the group's data: at creation,
//! or after every replica lost it. In the second case a marker on disk tells it the group
//! existed before, and it records the loss in the partition (`DataLost`), which `station
//! describe` shows: the station comes back empty and says so, never half-filled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use junction_proto::peer::NodeStatusRequest;
use junction_raft::{MetaRaft, PartitionRaft, PeerPool};
use junction_storage::Store;
use junction_storage::keys::{CF_RAFT_META, raft_tag};
use junction_types::{Command, GroupId, NodeId, PartitionCommand};
use openraft::async_runtime::watch::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::partition::now_ms;

/// What the initialiser of a memory group needs.
pub(crate) struct MemoryInit {
    pub(crate) me: NodeId,
    pub(crate) group: GroupId,
    pub(crate) replicas: Vec<NodeId>,
    pub(crate) raft: PartitionRaft,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) meta: MetaRaft,
    pub(crate) members: BTreeMap<NodeId, String>,
    /// The node's disk store (for the "initialised once" marker).
    pub(crate) disk: Store,
    pub(crate) shutdown: CancellationToken,
}

fn addrs(meta: &MetaRaft, fallback: &BTreeMap<NodeId, String>) -> BTreeMap<NodeId, String> {
    let m = meta.metrics();
    let m = m.borrow_watched();
    let from: BTreeMap<NodeId, String> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    if from.is_empty() {
        fallback.clone()
    } else {
        from
    }
}

impl MemoryInit {
    /// Whether every other replica answered and none holds the group's data or a leader.
    async fn others_hold_nothing(&self, addrs: &BTreeMap<NodeId, String>) -> bool {
        for r in self.replicas.iter().filter(|r| **r != self.me) {
            let Some(addr) = addrs.get(r) else {
                return false;
            };
            let Ok(mut client) = self.pool.client(addr) else {
                return false;
            };
            let status = tokio::time::timeout(
                Duration::from_secs(1),
                client.node_status(NodeStatusRequest {}),
            )
            .await;
            let Ok(Ok(status)) = status else {
                return false;
            };
            if status
                .into_inner()
                .groups
                .iter()
                .any(|g| g.group == self.group && (g.leader.is_some() || g.next_offset > 0))
            {
                return false;
            }
        }
        true
    }

    fn marker(&self) -> Option<Vec<u8>> {
        self.disk
            .get_tag(CF_RAFT_META, self.group, raft_tag::MEMORY_INITIALISED)
            .ok()
            .flatten()
    }

    fn write_marker(&self) -> Result<(), junction_storage::StorageError> {
        let mut b = self.disk.batch();
        b.put_tag(
            CF_RAFT_META,
            self.group,
            raft_tag::MEMORY_INITIALISED,
            &now_ms().to_be_bytes(),
        )?;
        self.disk.write_sync(b)
    }
}

/// Initialises a memory group once it is safe (see the module doc); returns when the group
/// is initialised (by this node or by replication from a leader) or on shutdown.
pub(crate) async fn init_memory_group(m: MemoryInit) {
    let group = m.group;
    loop {
        match m.raft.is_initialized().await {
            Ok(false) => {}
            Ok(true) | Err(_) => return,
        }
        let addrs = addrs(&m.meta, &m.members);
        if m.others_hold_nothing(&addrs).await {
            let existed = m.marker().is_some();
            if let Err(e) = m.write_marker() {
                tracing::warn!(group, error = %e, "memory group marker not written; will retry");
            } else {
                let nodes: Option<BTreeMap<NodeId, openraft::BasicNode>> = m
                    .replicas
                    .iter()
                    .map(|r| addrs.get(r).map(|a| (*r, openraft::BasicNode::new(a))))
                    .collect();
                if let Some(nodes) = nodes {
                    match m.raft.initialize(nodes).await {
                        Ok(()) if existed => {
                            tracing::warn!(
                                group,
                                "every replica of this memory partition lost its data; it restarts empty"
                            );
                            report_loss(&m).await;
                            return;
                        }
                        Ok(()) => return,
                        Err(e) => tracing::debug!(group, "memory group initialise: {e}"),
                    }
                }
            }
        }
        tokio::select! {
            _ = m.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Records the loss in the partition once this node leads it (it just initialised the group,
/// so it normally wins the first election).
async fn report_loss(m: &MemoryInit) {
    let at_ms = now_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && !m.shutdown.is_cancelled() {
        let leader = m.raft.metrics().borrow_watched().current_leader;
        if leader == Some(m.me) {
            let cmd = Command::Partition(PartitionCommand::DataLost { at_ms });
            match m.raft.client_write(cmd).await {
                Ok(_) => return,
                Err(e) => tracing::debug!(group = m.group, "recording data loss: {e}"),
            }
        } else if leader.is_some() {
            tracing::warn!(
                group = m.group,
                "another replica leads the reset memory partition; the loss is not recorded"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
