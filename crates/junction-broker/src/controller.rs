//! Administration, run by the controller (the metadata group's leader): tenants, stations and
//! their placement, plus node liveness probes and the cluster's view of each partition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use junction_proto::peer::{NodeStatusRequest, NodeStatusResponse};
use junction_types::exactly_once::DeliveryPolicy;
use junction_types::meta::place_replicas;
use junction_types::names::validate_tenant;
use junction_types::{
    Command, CommandResponse, GroupId, MAX_PARTITIONS, META_GROUP, MetaCommand, NodeId,
    StationMeta, StationName, StationPolicy,
};
use openraft::errors::{ClientWriteError, RaftError};

use crate::partition::now_ms;
use crate::{Broker, BrokerError};

/// How long a liveness probe waits for a node.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Rejects policies this build cannot honour or that make no sense.
pub fn validate_policy(p: &StationPolicy) -> Result<(), BrokerError> {
    let r = &p.retention;
    for (what, v) in [
        ("retention age", r.max_age_ms),
        ("retention bytes", r.max_bytes),
        ("retention messages", r.max_messages),
    ] {
        if v == Some(0) {
            return Err(BrokerError::InvalidArgument(format!(
                "{what} must be greater than 0 (leave it unset for no limit)"
            )));
        }
    }
    Ok(())
}

/// Rejects exactly-once settings out of bounds.
pub fn validate_delivery(d: &DeliveryPolicy) -> Result<(), BrokerError> {
    d.validate()
        .map_err(|e| BrokerError::InvalidArgument(e.to_string()))
}

/// The cluster's view of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: u32,
    pub group_id: GroupId,
    pub replicas: Vec<NodeId>,
    pub leader: Option<NodeId>,
    /// The Raft term of the leader's report (0 without a leader).
    pub term: u64,
    pub next_offset: u64,
    pub start_offset: u64,
    /// Messages stored and their bytes, when measured ([`Broker::measure_partitions`]).
    pub messages: u64,
    pub bytes: u64,
    /// When a memory partition lost every replica and restarted empty (0: never).
    pub data_lost_at_ms: i64,
    /// Idempotent producers with state in the partition, and its dedup window's ids and
    /// their bytes (when measured).
    pub producers: u64,
    pub dedup_ids: u64,
    pub dedup_id_bytes: u64,
}

/// What a status probe of every member found.
pub type Probe = BTreeMap<NodeId, Option<NodeStatusResponse>>;

impl Broker {
    /// Fails with `NotLeader` (naming the leader) unless this node leads the metadata group.
    pub fn ensure_controller(&self) -> Result<(), BrokerError> {
        let (leader, _) = self.meta_leader();
        if leader == Some(self.node_id()) {
            return Ok(());
        }
        Err(BrokerError::NotLeader {
            node: self.node_id(),
            group: META_GROUP,
            leader: leader.and_then(|l| self.addr_of(l).map(|a| (l, a))),
        })
    }

    /// Raises the cluster's format level once every member reports a higher one (see
    /// [`junction_types::format_level`]). Called by the controller.
    pub(crate) async fn raise_format_level(&self, state: &junction_types::MetaState) {
        let mut reported = self.peer_levels.read().clone();
        reported.insert(self.node_id(), self.cfg.max_format_level);
        let members = self.node_addrs().into_keys();
        let Some(level) =
            junction_types::format_level::raise_to(state.format_level, members, &reported)
        else {
            return;
        };
        match self
            .meta_write(MetaCommand::RaiseFormatLevel { level })
            .await
        {
            Ok(_) => tracing::info!(
                from = state.format_level,
                to = level,
                "every member understands a newer format: raised the cluster's format level"
            ),
            Err(e) => tracing::warn!(error = %e, "raising the cluster's format level: will retry"),
        }
    }

    pub(crate) async fn meta_write(
        &self,
        cmd: MetaCommand,
    ) -> Result<CommandResponse, BrokerError> {
        match self.meta_raft().client_write(Command::Meta(cmd)).await {
            Ok(resp) => match resp.data {
                CommandResponse::MetaRejected(e) => Err(BrokerError::Meta(e)),
                other => Ok(other),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(BrokerError::NotLeader {
                    node: self.node_id(),
                    group: META_GROUP,
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                })
            }
            Err(e) => Err(BrokerError::Unavailable(format!(
                "metadata write failed: {e}"
            ))),
        }
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, name: &str) -> Result<(), BrokerError> {
        validate_tenant(name)?;
        self.ensure_controller()?;
        self.meta_write(MetaCommand::CreateTenant {
            name: name.to_string(),
            now_ms: now_ms(),
        })
        .await?;
        Ok(())
    }

    /// Sets or clears limits of a tenant or of one of its stations; returns its quotas.
    pub async fn set_quota(
        &self,
        tenant: &str,
        change: junction_types::quota::QuotaChange,
    ) -> Result<junction_types::quota::TenantQuotas, BrokerError> {
        change.validate().map_err(|e| BrokerError::Meta(e.into()))?;
        self.ensure_controller()?;
        match self
            .meta_write(MetaCommand::SetQuota {
                tenant: tenant.to_string(),
                change,
            })
            .await?
        {
            CommandResponse::Quotas(q) => Ok(q),
            other => Err(BrokerError::Raft(format!(
                "unexpected quota result {other:?}"
            ))),
        }
    }

    /// Creates a station, placing its replicas on the least-loaded live nodes, and waits (up to
    /// 10 s) until every partition has a leader.
    pub async fn create_station(
        &self,
        name: &StationName,
        partitions: u32,
        replication_factor: u32,
        max_message_bytes: u32,
    ) -> Result<StationMeta, BrokerError> {
        self.create_station_with_policy(
            name,
            partitions,
            replication_factor,
            max_message_bytes,
            StationPolicy::default(),
            DeliveryPolicy::default(),
        )
        .await
    }

    /// Like [`Broker::create_station`], with storage, retention and compaction settings, and
    /// exactly-once settings.
    pub async fn create_station_with_policy(
        &self,
        name: &StationName,
        partitions: u32,
        replication_factor: u32,
        max_message_bytes: u32,
        policy: StationPolicy,
        delivery: DeliveryPolicy,
    ) -> Result<StationMeta, BrokerError> {
        validate_policy(&policy)?;
        validate_delivery(&delivery)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(BrokerError::InvalidArgument(format!(
                "partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"
            )));
        }
        if ![1, 3, 5].contains(&replication_factor) {
            return Err(BrokerError::InvalidArgument(format!(
                "replication factor must be 1, 3 or 5, got {replication_factor}"
            )));
        }
        let ceiling = self.config().max_message_bytes;
        let max_message_bytes = if max_message_bytes == 0 {
            ceiling
        } else {
            max_message_bytes
        };
        if max_message_bytes > ceiling {
            return Err(BrokerError::InvalidArgument(format!(
                "max message size {max_message_bytes} exceeds the server's limit of {ceiling} bytes"
            )));
        }
        self.ensure_controller()?;
        let members = self.node_addrs().len();
        let live = self.placeable_nodes().await;
        if (replication_factor as usize) > live.len() {
            return Err(BrokerError::TooFewNodes {
                requested: replication_factor,
                live: live.len(),
                members,
            });
        }
        let placement = place_replicas(
            &live,
            &self.metadata().replica_counts(),
            partitions,
            replication_factor,
        );
        // The entry of earlier builds when no exactly-once setting is used, so nodes not yet
        // upgraded still apply it (see "Rolling upgrades" in the README).
        let cmd = if delivery == DeliveryPolicy::default() {
            MetaCommand::CreateStation {
                tenant: name.tenant.clone(),
                name: name.name.clone(),
                placement,
                replication_factor,
                max_message_bytes,
                now_ms: now_ms(),
                policy,
            }
        } else {
            MetaCommand::CreateStationV2 {
                tenant: name.tenant.clone(),
                name: name.name.clone(),
                placement,
                replication_factor,
                max_message_bytes,
                now_ms: now_ms(),
                policy,
                delivery,
            }
        };
        let station = match self.meta_write(cmd).await? {
            CommandResponse::StationCreated(s) => s,
            other => {
                return Err(BrokerError::Raft(format!(
                    "unexpected create result {other:?}"
                )));
            }
        };
        self.wait_for_leaders(&station, Duration::from_secs(10))
            .await;
        Ok(station)
    }

    async fn wait_for_leaders(&self, station: &StationMeta, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let views = self.partition_views(station, &self.probe_nodes().await);
            if views.iter().all(|v| v.leader.is_some()) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(station = %station.full_name(), "some partitions have no leader yet");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces a station's retention, discard and compaction settings; leaders apply them
    /// from their next retention tick. The storage tier cannot change.
    pub async fn update_station(
        &self,
        name: &StationName,
        policy: StationPolicy,
        delivery: DeliveryPolicy,
    ) -> Result<StationMeta, BrokerError> {
        let current = self.station(name)?;
        if current.policy.storage != policy.storage {
            return Err(BrokerError::InvalidArgument(format!(
                "station '{}' uses {} storage; the storage tier is chosen at creation and cannot change",
                name.full(),
                current.policy.storage
            )));
        }
        validate_policy(&policy)?;
        validate_delivery(&delivery)?;
        self.ensure_controller()?;
        let cmd = if delivery == current.delivery {
            MetaCommand::UpdateStation {
                tenant: name.tenant.clone(),
                name: name.name.clone(),
                policy,
            }
        } else {
            MetaCommand::UpdateStationV2 {
                tenant: name.tenant.clone(),
                name: name.name.clone(),
                policy,
                delivery,
            }
        };
        match self.meta_write(cmd).await? {
            CommandResponse::StationCreated(s) => Ok(s),
            other => Err(BrokerError::Raft(format!(
                "unexpected update result {other:?}"
            ))),
        }
    }

    /// Deletes a station; every replica removes its data when it applies the change.
    pub async fn delete_station(&self, name: &StationName) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        self.meta_write(MetaCommand::DeleteStation {
            tenant: name.tenant.clone(),
            name: name.name.clone(),
        })
        .await?;
        Ok(())
    }

    /// Returns a station from this node's metadata.
    pub fn station(&self, name: &StationName) -> Result<StationMeta, BrokerError> {
        self.metadata()
            .stations
            .get(&name.full())
            .cloned()
            .ok_or_else(|| BrokerError::StationNotFound(name.full()))
    }

    /// Asks every member for its status; `None` for members that did not answer in time.
    pub async fn probe_nodes(&self) -> Probe {
        let me = self.node_id();
        let calls = self.node_addrs().into_iter().map(|(id, addr)| async move {
            if id == me {
                return (id, Some(self.local_status()));
            }
            (id, self.node_status_of(&addr).await)
        });
        futures::future::join_all(calls).await.into_iter().collect()
    }

    /// One node's status, if it answers within [`PROBE_TIMEOUT`].
    pub(crate) async fn node_status_of(&self, addr: &str) -> Option<NodeStatusResponse> {
        let mut client = self.peers().client(addr).ok()?;
        tokio::time::timeout(PROBE_TIMEOUT, client.node_status(NodeStatusRequest {}))
            .await
            .ok()?
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// The members that answer a status probe now, except those being removed (they take no
    /// new replicas).
    pub(crate) async fn placeable_nodes(&self) -> BTreeSet<NodeId> {
        let draining = self.metadata().reconfig.draining.clone();
        self.probe_nodes()
            .await
            .into_iter()
            .filter(|(id, s)| s.is_some() && !draining.contains(id))
            .map(|(id, _)| id)
            .collect()
    }

    /// Combines probe answers into one view per partition: the leader as reported by the
    /// replica with the highest term, and the offsets reported by that leader (or the highest
    /// seen when the leader did not answer).
    pub fn partition_views(&self, station: &StationMeta, probe: &Probe) -> Vec<PartitionView> {
        let mut by_group: BTreeMap<GroupId, Vec<&junction_proto::peer::GroupStatus>> =
            BTreeMap::new();
        for status in probe.values().flatten() {
            for g in &status.groups {
                by_group.entry(g.group).or_default().push(g);
            }
        }
        station
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let reports = by_group
                    .get(&p.group_id)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let best = reports
                    .iter()
                    .filter(|g| g.leader.is_some())
                    .max_by_key(|g| g.term);
                let leader = best.and_then(|g| g.leader);
                let from_leader = leader.and_then(|l| {
                    probe
                        .get(&l)
                        .and_then(Option::as_ref)
                        .and_then(|s| s.groups.iter().find(|g| g.group == p.group_id))
                });
                let (next_offset, start_offset) = match from_leader {
                    Some(g) => (g.next_offset, g.start_offset),
                    None => (
                        reports.iter().map(|g| g.next_offset).max().unwrap_or(0),
                        reports.iter().map(|g| g.start_offset).max().unwrap_or(0),
                    ),
                };
                PartitionView {
                    partition: i as u32,
                    group_id: p.group_id,
                    replicas: p.replicas.clone(),
                    leader,
                    term: best.map_or(0, |g| g.term),
                    next_offset,
                    start_offset,
                    messages: 0,
                    bytes: 0,
                    data_lost_at_ms: 0,
                    producers: 0,
                    dedup_ids: 0,
                    dedup_id_bytes: 0,
                }
            })
            .collect()
    }

    /// Fills in the stored size of each partition, as its leader (or, without a leader, its
    /// first answering replica) measures it.
    pub async fn measure_partitions(&self, views: &mut [PartitionView]) {
        let me = self.node_id();
        let mut asks: BTreeMap<NodeId, Vec<GroupId>> = BTreeMap::new();
        for v in views.iter() {
            let node = v
                .leader
                .or_else(|| v.replicas.iter().copied().find(|r| *r == me))
                .or_else(|| v.replicas.first().copied());
            if let Some(n) = node {
                asks.entry(n).or_default().push(v.group_id);
            }
        }
        let stats = self.group_stats(asks).await;
        for v in views.iter_mut() {
            if let Some(g) = stats.get(&v.group_id) {
                v.messages = g.messages;
                v.bytes = g.bytes;
                v.data_lost_at_ms = g.data_lost_at_ms;
                v.producers = g.producers;
                v.dedup_ids = g.dedup_ids;
                v.dedup_id_bytes = g.dedup_id_bytes;
                v.start_offset = g.start_offset;
                v.next_offset = g.next_offset;
            }
        }
    }

    /// Asks each node for the stats of the groups listed for it (this node answers itself);
    /// nodes that do not answer in time are left out.
    async fn group_stats(
        &self,
        asks: BTreeMap<NodeId, Vec<GroupId>>,
    ) -> BTreeMap<GroupId, junction_proto::peer::GroupStats> {
        let me = self.node_id();
        let addrs = self.node_addrs();
        let calls = asks.into_iter().map(|(node, groups)| {
            let addr = addrs.get(&node).cloned();
            async move {
                if node == me {
                    return junction_raft::GroupHost::partition_stats(self, &groups);
                }
                let Some(addr) = addr else { return Vec::new() };
                let Ok(mut client) = self.peers().client(&addr) else {
                    return Vec::new();
                };
                let req = junction_proto::peer::PartitionStatsRequest { groups };
                match tokio::time::timeout(PROBE_TIMEOUT, client.partition_stats(req)).await {
                    Ok(Ok(r)) => r.into_inner().groups,
                    _ => Vec::new(),
                }
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .map(|g| (g.group, g))
            .collect()
    }

    /// The stored message bytes of each group (group → replicas), measured on this node when
    /// it hosts a replica, otherwise on the first replica; groups nobody answered for are
    /// missing.
    pub async fn measure_groups(
        &self,
        groups: &BTreeMap<GroupId, Vec<NodeId>>,
    ) -> BTreeMap<GroupId, u64> {
        let me = self.node_id();
        let mut asks: BTreeMap<NodeId, Vec<GroupId>> = BTreeMap::new();
        for (g, replicas) in groups {
            let node = if self.partition(*g).is_some() {
                Some(me)
            } else {
                replicas.first().copied()
            };
            if let Some(n) = node {
                asks.entry(n).or_default().push(*g);
            }
        }
        self.group_stats(asks)
            .await
            .into_iter()
            .map(|(g, s)| (g, s.bytes))
            .collect()
    }
}
