//! The metadata group's state: tenants, stations and where each partition's replicas live.
//! `MetaState::apply` is the whole of the metadata state machine's logic; it is pure so that
//! every replica computes the same state from the same log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::auth::KeyRegistry;
use crate::command::{CommandResponse, MetaCommand};
use crate::exactly_once::{DeliveryPolicy, ProducerRegistry};
use crate::groups::{GroupMeta, GroupSettings, Lanes, MemberMeta};
use crate::policy::StationPolicy;
use crate::quota::{QuotaError, QuotaField, TenantQuotas};
use crate::schema::{SchemaRegistry, SchemaRegistryError};
use crate::{DEFAULT_TENANT, GroupId, NodeId};

/// Why the metadata group refused a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("tenant '{tenant}' already exists")]
    TenantExists { tenant: String },
    #[error("tenant '{tenant}' does not exist; create it first")]
    TenantNotFound { tenant: String },
    #[error("station '{station}' already exists")]
    StationExists { station: String },
    #[error("station '{station}' does not exist")]
    StationNotFound { station: String },
    #[error("consumer group '{group}' of station '{station}' already exists")]
    GroupExists { station: String, group: String },
    #[error("consumer group '{group}' of station '{station}' does not exist")]
    GroupNotFound { station: String, group: String },
    #[error("API key id '{id}' is taken")]
    KeyExists { id: String },
    #[error("API key '{id}' does not exist")]
    KeyNotFound { id: String },
    /// Creating one more station or group would pass the tenant's quota.
    #[error(
        "tenant '{tenant}' has {used} {what} and its quota is {limit}; delete one or ask a cluster admin to raise the quota"
    )]
    QuotaExceeded {
        tenant: String,
        what: QuotaField,
        limit: u64,
        used: u64,
    },
    #[error(transparent)]
    InvalidQuota(#[from] QuotaError),
    #[error(transparent)]
    Schema(#[from] SchemaRegistryError),
}

/// One partition: its Raft group and the nodes holding a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    pub group_id: GroupId,
    pub replicas: Vec<NodeId>,
}

/// A station's configuration and placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StationMeta {
    pub tenant: String,
    pub name: String,
    pub replication_factor: u32,
    pub max_message_bytes: u32,
    pub created_at_ms: i64,
    pub partitions: Vec<PartitionMeta>,
    /// Storage, retention and compaction settings.
    pub policy: StationPolicy,
    /// Exactly-once settings: the dedup window and producer expiry.
    pub delivery: DeliveryPolicy,
}

impl StationMeta {
    /// Returns `tenant/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.tenant, self.name)
    }
}

/// The replicated metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Tenant name → creation time (ms).
    pub tenants: BTreeMap<String, i64>,
    /// `tenant/name` → station.
    pub stations: BTreeMap<String, StationMeta>,
    /// The next partition group id to hand out. Group ids are never reused, so a node can tell
    /// a group that metadata has not heard of yet (id ≥ this) from one that was deleted.
    pub next_group_id: GroupId,
    /// (`tenant/station`, group name) → consumer group.
    pub groups: BTreeMap<(String, String), GroupMeta>,
    /// The next consumer group incarnation id.
    pub next_group_uid: u64,
    /// Producer ids and the epochs of named producers.
    pub producers: ProducerRegistry,
    /// API keys (their secrets' digests), by id.
    pub api_keys: KeyRegistry,
    /// Tenants' quotas (tenants without any limit are absent).
    pub quotas: BTreeMap<String, TenantQuotas>,
    /// Tenants' schemas and the stations bound to them.
    pub schemas: SchemaRegistry,
    /// Replica moves and node removals in progress.
    pub reconfig: Reconfig,
    /// The cluster's format level (metadata format version 8; see [`crate::format_level`]).
    pub format_level: u16,
}

/// Changes of where replicas live that are in progress (metadata format version 7). They
/// are metadata, not the controller's memory, so a move survives a controller failover: the
/// next controller carries on from here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconfig {
    /// Partition group → the replica list it moves to. The nodes of both lists host the
    /// group until the move finishes ([`MetaCommand::FinishMove`]); a node the move adds is
    /// listed after the current replicas, so it never initialises the group.
    pub moves: BTreeMap<GroupId, Vec<NodeId>>,
    /// Nodes being removed: their replicas move away, then they leave the metadata group.
    pub draining: BTreeSet<NodeId>,
    /// A rebalance was asked for and is not finished.
    pub rebalancing: bool,
}

impl Default for MetaState {
    fn default() -> Self {
        let mut tenants = BTreeMap::new();
        tenants.insert(DEFAULT_TENANT.to_string(), 0);
        Self {
            tenants,
            stations: BTreeMap::new(),
            next_group_id: 1,
            groups: BTreeMap::new(),
            next_group_uid: 1,
            producers: ProducerRegistry::default(),
            api_keys: KeyRegistry::default(),
            quotas: BTreeMap::new(),
            schemas: SchemaRegistry::default(),
            reconfig: Reconfig::default(),
            format_level: crate::format_level::BASE,
        }
    }
}

impl MetaState {
    /// Applies one command and returns its result.
    pub fn apply(&mut self, cmd: &MetaCommand) -> CommandResponse {
        match cmd {
            MetaCommand::CreateTenant { name, now_ms } => {
                if self.tenants.contains_key(name) {
                    return CommandResponse::MetaRejected(MetaError::TenantExists {
                        tenant: name.clone(),
                    });
                }
                self.tenants.insert(name.clone(), *now_ms);
                CommandResponse::Done
            }
            MetaCommand::CreateStation {
                tenant,
                name,
                placement,
                replication_factor,
                max_message_bytes,
                now_ms,
                policy,
            } => self.create_station(
                tenant,
                name,
                placement,
                (*replication_factor, *max_message_bytes, *now_ms),
                *policy,
                DeliveryPolicy::default(),
            ),
            MetaCommand::CreateStationV2 {
                tenant,
                name,
                placement,
                replication_factor,
                max_message_bytes,
                now_ms,
                policy,
                delivery,
            } => self.create_station(
                tenant,
                name,
                placement,
                (*replication_factor, *max_message_bytes, *now_ms),
                *policy,
                *delivery,
            ),
            MetaCommand::DeleteStation { tenant, name } => {
                let full = format!("{tenant}/{name}");
                if self.stations.remove(&full).is_none() {
                    return CommandResponse::MetaRejected(MetaError::StationNotFound {
                        station: full,
                    });
                }
                self.groups.retain(|(s, _), _| *s != full);
                self.schemas.station_deleted(&full);
                self.reconfig.moves.retain(|g, _| {
                    self.stations
                        .values()
                        .any(|s| s.partitions.iter().any(|p| p.group_id == *g))
                });
                if let Some(q) = self.quotas.get_mut(tenant) {
                    q.stations.remove(name);
                    if q.is_empty() {
                        self.quotas.remove(tenant);
                    }
                }
                CommandResponse::Done
            }
            MetaCommand::DrainNode { node } => {
                self.reconfig.draining.insert(*node);
                CommandResponse::Done
            }
            MetaCommand::StartMoves { moves } => {
                for (group, target) in moves {
                    if self.partition(*group).is_some() && !self.reconfig.moves.contains_key(group)
                    {
                        self.reconfig.moves.insert(*group, target.clone());
                    }
                }
                CommandResponse::Done
            }
            MetaCommand::FinishMove { group, replicas } => {
                if self.reconfig.moves.get(group) == Some(replicas) {
                    self.reconfig.moves.remove(group);
                    if let Some(p) = self
                        .stations
                        .values_mut()
                        .flat_map(|s| &mut s.partitions)
                        .find(|p| p.group_id == *group)
                    {
                        p.replicas.clone_from(replicas);
                    }
                }
                CommandResponse::Done
            }
            MetaCommand::ForgetNode { node } => {
                self.reconfig.draining.remove(node);
                CommandResponse::Done
            }
            MetaCommand::SetRebalancing { on } => {
                self.reconfig.rebalancing = *on;
                CommandResponse::Done
            }
            MetaCommand::RaiseFormatLevel { level } => {
                self.format_level = self.format_level.max(*level);
                CommandResponse::Done
            }
            MetaCommand::CreateGroup {
                station,
                group,
                settings,
                now_ms,
            } => self.create_group(station, group, *settings, Lanes::default(), *now_ms),
            MetaCommand::CreateGroupV2 {
                station,
                group,
                settings,
                lanes,
                now_ms,
            } => self.create_group(station, group, *settings, *lanes, *now_ms),
            MetaCommand::JoinGroup {
                station,
                group,
                member,
                client,
                settings,
                now_ms,
            } => self.join_group(
                station,
                group,
                member,
                client,
                (*settings, Lanes::default()),
                *now_ms,
            ),
            MetaCommand::JoinGroupV2 {
                station,
                group,
                member,
                client,
                settings,
                lanes,
                now_ms,
            } => self.join_group(station, group, member, client, (*settings, *lanes), *now_ms),
            MetaCommand::LeaveGroup {
                station,
                group,
                members,
            } => {
                let Some(g) = self.groups.get_mut(&(station.clone(), group.clone())) else {
                    return CommandResponse::MetaRejected(MetaError::GroupNotFound {
                        station: station.clone(),
                        group: group.clone(),
                    });
                };
                let before = g.members.len();
                for m in members {
                    g.members.remove(m);
                }
                if g.members.len() != before {
                    g.rebalance();
                }
                CommandResponse::Group(g.clone())
            }
            MetaCommand::DeleteGroup { station, group } => {
                if self
                    .groups
                    .remove(&(station.clone(), group.clone()))
                    .is_none()
                {
                    return CommandResponse::MetaRejected(MetaError::GroupNotFound {
                        station: station.clone(),
                        group: group.clone(),
                    });
                }
                CommandResponse::Done
            }
            MetaCommand::UpdateStation {
                tenant,
                name,
                policy,
            } => {
                let delivery = self
                    .stations
                    .get(&format!("{tenant}/{name}"))
                    .map(|s| s.delivery)
                    .unwrap_or_default();
                self.update_station(tenant, name, *policy, delivery)
            }
            MetaCommand::UpdateStationV2 {
                tenant,
                name,
                policy,
                delivery,
            } => self.update_station(tenant, name, *policy, *delivery),
            MetaCommand::InitProducer { tenant, name } => {
                if !self.tenants.contains_key(tenant) {
                    return CommandResponse::MetaRejected(MetaError::TenantNotFound {
                        tenant: tenant.clone(),
                    });
                }
                CommandResponse::Producer(self.producers.init(tenant, name.as_deref()))
            }
            MetaCommand::CreateApiKey { key } => {
                if !self.tenants.contains_key(&key.tenant) {
                    return CommandResponse::MetaRejected(MetaError::TenantNotFound {
                        tenant: key.tenant.clone(),
                    });
                }
                match self.api_keys.create(key.clone()) {
                    Ok(()) => CommandResponse::Done,
                    Err(_) => {
                        CommandResponse::MetaRejected(MetaError::KeyExists { id: key.id.clone() })
                    }
                }
            }
            MetaCommand::RevokeApiKey { id, tenant, now_ms } => {
                // The only refusal: no such key (of that tenant).
                match self.api_keys.revoke(id, tenant.as_deref(), *now_ms) {
                    Ok(()) => CommandResponse::Done,
                    Err(_) => {
                        CommandResponse::MetaRejected(MetaError::KeyNotFound { id: id.clone() })
                    }
                }
            }
            MetaCommand::SetQuota { tenant, change } => match self.set_quota(tenant, change) {
                Ok(q) => CommandResponse::Quotas(q),
                Err(e) => CommandResponse::MetaRejected(e),
            },
            MetaCommand::RegisterSchema { version } => {
                if !self.tenants.contains_key(&version.tenant) {
                    return CommandResponse::MetaRejected(MetaError::TenantNotFound {
                        tenant: version.tenant.clone(),
                    });
                }
                match self.schemas.register(version) {
                    Ok(r) => CommandResponse::SchemaRegistered(r),
                    Err(e) => CommandResponse::MetaRejected(e.into()),
                }
            }
            MetaCommand::SetSchemaCompatibility {
                tenant,
                name,
                compatibility,
            } => match self.schemas.set_compatibility(tenant, name, *compatibility) {
                Ok(()) => CommandResponse::Done,
                Err(e) => CommandResponse::MetaRejected(e.into()),
            },
            MetaCommand::DeleteSchema {
                tenant,
                name,
                version,
            } => match self.schemas.delete(tenant, name, *version) {
                Ok(()) => CommandResponse::Done,
                Err(e) => CommandResponse::MetaRejected(e.into()),
            },
            MetaCommand::BindSchema { station, binding } => {
                if !self.stations.contains_key(station) {
                    return CommandResponse::MetaRejected(MetaError::StationNotFound {
                        station: station.clone(),
                    });
                }
                match self.schemas.bind(station, binding.clone()) {
                    Ok(()) => CommandResponse::Done,
                    Err(e) => CommandResponse::MetaRejected(e.into()),
                }
            }
        }
    }

    /// Changes a tenant's (or one of its stations') limits; returns the tenant's quotas.
    fn set_quota(
        &mut self,
        tenant: &str,
        change: &crate::quota::QuotaChange,
    ) -> Result<TenantQuotas, MetaError> {
        change.validate()?;
        if !self.tenants.contains_key(tenant) {
            return Err(MetaError::TenantNotFound {
                tenant: tenant.to_string(),
            });
        }
        if let Some(station) = &change.station {
            let full = format!("{tenant}/{station}");
            if !self.stations.contains_key(&full) {
                return Err(MetaError::StationNotFound { station: full });
            }
        }
        let q = self.quotas.entry(tenant.to_string()).or_default();
        q.apply(change);
        let out = q.clone();
        if out.is_empty() {
            self.quotas.remove(tenant);
        }
        Ok(out)
    }

    /// A tenant's quotas (empty when it has none).
    pub fn quotas_of(&self, tenant: &str) -> TenantQuotas {
        self.quotas.get(tenant).cloned().unwrap_or_default()
    }

    /// A tenant's limit of one kind, if any.
    pub fn tenant_limit(&self, tenant: &str, field: QuotaField) -> Option<u64> {
        self.quotas.get(tenant).and_then(|q| q.tenant.get(field))
    }

    /// The stations of a tenant.
    pub fn stations_of_tenant<'a>(
        &'a self,
        tenant: &'a str,
    ) -> impl Iterator<Item = &'a StationMeta> + 'a {
        self.stations.values().filter(move |s| s.tenant == tenant)
    }

    /// How many consumer groups the stations of a tenant have.
    pub fn group_count_of_tenant(&self, tenant: &str) -> u64 {
        self.groups
            .keys()
            .filter(|(s, _)| self.stations.get(s).is_some_and(|m| m.tenant == tenant))
            .count() as u64
    }

    /// Refuses a new station when the tenant holds its quota of them.
    fn room_for_station(&self, tenant: &str) -> Result<(), MetaError> {
        let Some(limit) = self.tenant_limit(tenant, QuotaField::Stations) else {
            return Ok(());
        };
        let used = self.stations_of_tenant(tenant).count() as u64;
        if used >= limit {
            return Err(MetaError::QuotaExceeded {
                tenant: tenant.to_string(),
                what: QuotaField::Stations,
                limit,
                used,
            });
        }
        Ok(())
    }

    /// Refuses a new consumer group of `station` (`tenant/name`) when its tenant holds its
    /// quota of them.
    fn room_for_group(&self, station: &str) -> Result<(), MetaError> {
        let Some(tenant) = self.stations.get(station).map(|s| s.tenant.as_str()) else {
            return Ok(());
        };
        let Some(limit) = self.tenant_limit(tenant, QuotaField::Groups) else {
            return Ok(());
        };
        let used = self.group_count_of_tenant(tenant);
        if used >= limit {
            return Err(MetaError::QuotaExceeded {
                tenant: tenant.to_string(),
                what: QuotaField::Groups,
                limit,
                used,
            });
        }
        Ok(())
    }

    fn create_station(
        &mut self,
        tenant: &str,
        name: &str,
        placement: &[Vec<u64>],
        (replication_factor, max_message_bytes, now_ms): (u32, u32, i64),
        policy: StationPolicy,
        delivery: DeliveryPolicy,
    ) -> CommandResponse {
        let full = format!("{tenant}/{name}");
        if !self.tenants.contains_key(tenant) {
            return CommandResponse::MetaRejected(MetaError::TenantNotFound {
                tenant: tenant.to_string(),
            });
        }
        if self.stations.contains_key(&full) {
            return CommandResponse::MetaRejected(MetaError::StationExists { station: full });
        }
        if let Err(e) = self.room_for_station(tenant) {
            return CommandResponse::MetaRejected(e);
        }
        let partitions = placement
            .iter()
            .map(|replicas| {
                let group_id = self.next_group_id;
                self.next_group_id += 1;
                PartitionMeta {
                    group_id,
                    replicas: replicas.clone(),
                }
            })
            .collect();
        let station = StationMeta {
            tenant: tenant.to_string(),
            name: name.to_string(),
            replication_factor,
            max_message_bytes,
            created_at_ms: now_ms,
            partitions,
            policy,
            delivery,
        };
        self.stations.insert(full, station.clone());
        CommandResponse::StationCreated(station)
    }

    fn update_station(
        &mut self,
        tenant: &str,
        name: &str,
        policy: StationPolicy,
        delivery: DeliveryPolicy,
    ) -> CommandResponse {
        let full = format!("{tenant}/{name}");
        let Some(station) = self.stations.get_mut(&full) else {
            return CommandResponse::MetaRejected(MetaError::StationNotFound { station: full });
        };
        // The tier is fixed at creation: data cannot move between tiers in place.
        let storage = station.policy.storage;
        station.policy = StationPolicy { storage, ..policy };
        station.delivery = delivery;
        CommandResponse::StationCreated(station.clone())
    }

    fn create_group(
        &mut self,
        station: &str,
        group: &str,
        settings: GroupSettings,
        lanes: Lanes,
        now_ms: i64,
    ) -> CommandResponse {
        let Some(partitions) = self.stations.get(station).map(|s| s.partitions.len()) else {
            return CommandResponse::MetaRejected(MetaError::StationNotFound {
                station: station.to_owned(),
            });
        };
        let key = (station.to_owned(), group.to_owned());
        if self.groups.contains_key(&key) {
            return CommandResponse::MetaRejected(MetaError::GroupExists {
                station: station.to_owned(),
                group: group.to_owned(),
            });
        }
        if let Err(e) = self.room_for_group(station) {
            return CommandResponse::MetaRejected(e);
        }
        let g = self.new_group(station, group, (settings, lanes), now_ms, partitions);
        self.groups.insert(key, g.clone());
        CommandResponse::Group(g)
    }

    /// Adds a member (creating the group if it does not exist) and rebalances; joining again
    /// as an existing member changes nothing.
    fn join_group(
        &mut self,
        station: &str,
        group: &str,
        member: &str,
        client: &str,
        (settings, lanes): (GroupSettings, Lanes),
        now_ms: i64,
    ) -> CommandResponse {
        let Some(partitions) = self.stations.get(station).map(|s| s.partitions.len()) else {
            return CommandResponse::MetaRejected(MetaError::StationNotFound {
                station: station.to_owned(),
            });
        };
        let key = (station.to_owned(), group.to_owned());
        if !self.groups.contains_key(&key) {
            if let Err(e) = self.room_for_group(station) {
                return CommandResponse::MetaRejected(e);
            }
            let g = self.new_group(station, group, (settings, lanes), now_ms, partitions);
            self.groups.insert(key.clone(), g);
        }
        let Some(g) = self.groups.get_mut(&key) else {
            return CommandResponse::WrongGroup;
        };
        if !g.members.contains_key(member) {
            g.members.insert(
                member.to_owned(),
                MemberMeta {
                    client: client.to_owned(),
                    joined_at_ms: now_ms,
                    epoch: 0,
                },
            );
            g.rebalance();
            // The member's epoch is the generation its joining made.
            let generation = g.generation;
            if let Some(m) = g.members.get_mut(member) {
                m.epoch = generation;
            }
        }
        CommandResponse::Group(g.clone())
    }

    fn new_group(
        &mut self,
        station: &str,
        name: &str,
        (settings, lanes): (GroupSettings, Lanes),
        now_ms: i64,
        partitions: usize,
    ) -> GroupMeta {
        let uid = self.next_group_uid;
        self.next_group_uid += 1;
        GroupMeta {
            station: station.to_string(),
            name: name.to_string(),
            uid,
            settings,
            created_at_ms: now_ms,
            generation: 0,
            members: BTreeMap::new(),
            assignment: vec![None; partitions],
            lanes,
        }
    }

    /// Returns a consumer group.
    pub fn group(&self, station: &str, group: &str) -> Option<&GroupMeta> {
        self.groups.get(&(station.to_string(), group.to_string()))
    }

    /// Returns the consumer groups of a station.
    pub fn groups_of_station<'a>(
        &'a self,
        station: &'a str,
    ) -> impl Iterator<Item = &'a GroupMeta> {
        self.groups
            .iter()
            .filter(move |((s, _), _)| s == station)
            .map(|(_, g)| g)
    }

    /// Returns the station and partition index of a partition group.
    pub fn partition_of_group(&self, group: GroupId) -> Option<(&StationMeta, u32)> {
        self.stations.values().find_map(|s| {
            s.partitions
                .iter()
                .position(|p| p.group_id == group)
                .map(|i| (s, i as u32))
        })
    }

    /// Returns the nodes hosting a partition: its replicas, then (while it moves) the nodes
    /// the move adds. The first is the replica that initialised the group.
    pub fn hosts_of(&self, p: &PartitionMeta) -> Vec<NodeId> {
        let mut hosts = p.replicas.clone();
        if let Some(target) = self.reconfig.moves.get(&p.group_id) {
            hosts.extend(target.iter().filter(|n| !p.replicas.contains(n)));
        }
        hosts
    }

    /// Returns every partition group `node` hosts (see [`MetaState::hosts_of`]), with its
    /// hosts.
    pub fn groups_of(&self, node: NodeId) -> BTreeMap<GroupId, Vec<NodeId>> {
        let mut out = BTreeMap::new();
        for s in self.stations.values() {
            for p in &s.partitions {
                let hosts = self.hosts_of(p);
                if hosts.contains(&node) {
                    out.insert(p.group_id, hosts);
                }
            }
        }
        out
    }

    /// Returns how many partition replicas each node holds (counting those a move in
    /// progress adds).
    pub fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for s in self.stations.values() {
            for p in &s.partitions {
                for r in self.hosts_of(p) {
                    *counts.entry(r).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    /// Returns the partition of a group.
    pub fn partition(&self, group: GroupId) -> Option<&PartitionMeta> {
        self.stations
            .values()
            .flat_map(|s| &s.partitions)
            .find(|p| p.group_id == group)
    }

    /// Whether any partition lists `node` as a replica or as the target of a move.
    pub fn references(&self, node: NodeId) -> bool {
        self.stations
            .values()
            .flat_map(|s| &s.partitions)
            .any(|p| p.replicas.contains(&node))
            || self.reconfig.moves.values().any(|t| t.contains(&node))
    }
}

/// Chooses the replicas of `partitions` new partitions among `live` nodes so that replica
/// counts stay balanced: each partition takes the `rf` least-loaded live nodes (ties broken by
/// node id, rotated per partition so leaders spread too). The first replica of each list is
/// the one that initialises the partition's Raft group.
pub fn place_replicas(
    live: &BTreeSet<NodeId>,
    existing: &BTreeMap<NodeId, usize>,
    partitions: u32,
    rf: u32,
) -> Vec<Vec<NodeId>> {
    let mut load: BTreeMap<NodeId, usize> = live
        .iter()
        .map(|n| (*n, existing.get(n).copied().unwrap_or(0)))
        .collect();
    let mut firsts: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        let mut nodes: Vec<NodeId> = load.keys().copied().collect();
        let n = nodes.len().max(1);
        nodes.rotate_left(p as usize % n);
        // Stable sort keeps the rotation order among equally loaded nodes.
        nodes.sort_by_key(|id| load.get(id).copied().unwrap_or(0));
        let mut chosen: Vec<NodeId> = nodes.into_iter().take(rf as usize).collect();
        // The first replica initialises the group and usually leads it: spread that role too.
        if let Some(pos) =
            (0..chosen.len()).min_by_key(|i| firsts.get(&chosen[*i]).copied().unwrap_or(0))
        {
            let first = chosen.remove(pos);
            chosen.insert(0, first);
            *firsts.entry(first).or_insert(0) += 1;
        }
        for id in &chosen {
            if let Some(l) = load.get_mut(id) {
                *l += 1;
            }
        }
        out.push(chosen);
    }
    out
}

/// The metadata state as format version 1 stored it (before exactly-once settings and
/// producer ids), read when a node upgrades.
pub mod v1 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, PartitionMeta, StationMeta};
    use crate::exactly_once::{DeliveryPolicy, ProducerRegistry};
    use crate::groups::v1::{GroupMetaV1, upgrade};
    use crate::policy::StationPolicy;
    use crate::schema::SchemaRegistry;

    /// A station as version 1 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StationMetaV1 {
        pub tenant: String,
        pub name: String,
        pub replication_factor: u32,
        pub max_message_bytes: u32,
        pub created_at_ms: i64,
        pub partitions: Vec<PartitionMeta>,
        pub policy: StationPolicy,
    }

    /// The metadata state as version 1 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV1 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMetaV1>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMetaV1>,
        pub next_group_uid: u64,
    }

    impl From<MetaStateV1> for MetaState {
        fn from(v: MetaStateV1) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v
                    .stations
                    .into_iter()
                    .map(|(k, s)| {
                        (
                            k,
                            StationMeta {
                                tenant: s.tenant,
                                name: s.name,
                                replication_factor: s.replication_factor,
                                max_message_bytes: s.max_message_bytes,
                                created_at_ms: s.created_at_ms,
                                partitions: s.partitions,
                                policy: s.policy,
                                delivery: DeliveryPolicy::default(),
                            },
                        )
                    })
                    .collect(),
                next_group_id: v.next_group_id,
                groups: upgrade(v.groups),
                next_group_uid: v.next_group_uid,
                producers: ProducerRegistry::default(),
                api_keys: Default::default(),
                quotas: BTreeMap::new(),
                schemas: SchemaRegistry::default(),
                reconfig: Default::default(),
                format_level: crate::format_level::BASE,
            }
        }
    }
}

/// The metadata state as format version 2 stored it (before API keys).
pub mod v2 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, StationMeta};
    use crate::exactly_once::ProducerRegistry;
    use crate::groups::v1::{GroupMetaV1, upgrade};
    use crate::schema::SchemaRegistry;

    /// The metadata state as version 2 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV2 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMeta>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMetaV1>,
        pub next_group_uid: u64,
        pub producers: ProducerRegistry,
    }

    impl From<MetaStateV2> for MetaState {
        fn from(v: MetaStateV2) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v.stations,
                next_group_id: v.next_group_id,
                groups: upgrade(v.groups),
                next_group_uid: v.next_group_uid,
                producers: v.producers,
                api_keys: Default::default(),
                quotas: BTreeMap::new(),
                schemas: SchemaRegistry::default(),
                reconfig: Default::default(),
                format_level: crate::format_level::BASE,
            }
        }
    }
}

/// The metadata state as format version 3 stored it (before quotas).
pub mod v3 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, StationMeta};
    use crate::auth::KeyRegistry;
    use crate::exactly_once::ProducerRegistry;
    use crate::groups::v1::{GroupMetaV1, upgrade};
    use crate::schema::SchemaRegistry;

    /// The metadata state as version 3 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV3 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMeta>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMetaV1>,
        pub next_group_uid: u64,
        pub producers: ProducerRegistry,
        pub api_keys: KeyRegistry,
    }

    impl From<MetaStateV3> for MetaState {
        fn from(v: MetaStateV3) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v.stations,
                next_group_id: v.next_group_id,
                groups: upgrade(v.groups),
                next_group_uid: v.next_group_uid,
                producers: v.producers,
                api_keys: v.api_keys,
                quotas: BTreeMap::new(),
                schemas: SchemaRegistry::default(),
                reconfig: Default::default(),
                format_level: crate::format_level::BASE,
            }
        }
    }
}

/// The metadata state as format version 4 stored it (before schemas).
pub mod v4 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, StationMeta};
    use crate::auth::KeyRegistry;
    use crate::exactly_once::ProducerRegistry;
    use crate::groups::v1::{GroupMetaV1, upgrade};
    use crate::quota::TenantQuotas;
    use crate::schema::SchemaRegistry;

    /// The metadata state as version 4 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV4 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMeta>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMetaV1>,
        pub next_group_uid: u64,
        pub producers: ProducerRegistry,
        pub api_keys: KeyRegistry,
        pub quotas: BTreeMap<String, TenantQuotas>,
    }

    impl From<MetaStateV4> for MetaState {
        fn from(v: MetaStateV4) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v.stations,
                next_group_id: v.next_group_id,
                groups: upgrade(v.groups),
                next_group_uid: v.next_group_uid,
                producers: v.producers,
                api_keys: v.api_keys,
                quotas: v.quotas,
                schemas: SchemaRegistry::default(),
                reconfig: Default::default(),
                format_level: crate::format_level::BASE,
            }
        }
    }
}

/// The metadata state as format version 5 stored it (before group lanes and member epochs).
pub mod v5 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, StationMeta};
    use crate::auth::KeyRegistry;
    use crate::exactly_once::ProducerRegistry;
    use crate::groups::v1::{GroupMetaV1, upgrade};
    use crate::quota::TenantQuotas;
    use crate::schema::SchemaRegistry;

    /// The metadata state as version 5 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV5 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMeta>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMetaV1>,
        pub next_group_uid: u64,
        pub producers: ProducerRegistry,
        pub api_keys: KeyRegistry,
        pub quotas: BTreeMap<String, TenantQuotas>,
        pub schemas: SchemaRegistry,
    }

    impl From<MetaStateV5> for MetaState {
        fn from(v: MetaStateV5) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v.stations,
                next_group_id: v.next_group_id,
                groups: upgrade(v.groups),
                next_group_uid: v.next_group_uid,
                producers: v.producers,
                api_keys: v.api_keys,
                quotas: v.quotas,
                schemas: v.schemas,
                reconfig: Default::default(),
                format_level: crate::format_level::BASE,
            }
        }
    }
}

/// The metadata state as format version 6 stored it (before replica moves and node
/// removals).
pub mod v6 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, StationMeta};
    use crate::auth::KeyRegistry;
    use crate::exactly_once::ProducerRegistry;
    use crate::groups::GroupMeta;
    use crate::quota::TenantQuotas;
    use crate::schema::SchemaRegistry;

    /// The metadata state as version 6 stored it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV6 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMeta>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMeta>,
        pub next_group_uid: u64,
        pub producers: ProducerRegistry,
        pub api_keys: KeyRegistry,
        pub quotas: BTreeMap<String, TenantQuotas>,
        pub schemas: SchemaRegistry,
    }

    impl From<MetaStateV6> for MetaState {
        fn from(v: MetaStateV6) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v.stations,
                next_group_id: v.next_group_id,
                groups: v.groups,
                next_group_uid: v.next_group_uid,
                producers: v.producers,
                api_keys: v.api_keys,
                quotas: v.quotas,
                schemas: v.schemas,
                reconfig: Default::default(),
                format_level: crate::format_level::BASE,
            }
        }
    }
}

pub mod v7 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{MetaState, Reconfig, StationMeta};
    use crate::auth::KeyRegistry;
    use crate::exactly_once::ProducerRegistry;
    use crate::groups::GroupMeta;
    use crate::quota::TenantQuotas;
    use crate::schema::SchemaRegistry;

    /// The metadata state as version 7 stored it (before format levels: level 1).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MetaStateV7 {
        pub tenants: BTreeMap<String, i64>,
        pub stations: BTreeMap<String, StationMeta>,
        pub next_group_id: u64,
        pub groups: BTreeMap<(String, String), GroupMeta>,
        pub next_group_uid: u64,
        pub producers: ProducerRegistry,
        pub api_keys: KeyRegistry,
        pub quotas: BTreeMap<String, TenantQuotas>,
        pub schemas: SchemaRegistry,
        pub reconfig: Reconfig,
    }

    impl From<MetaStateV7> for MetaState {
        fn from(v: MetaStateV7) -> Self {
            MetaState {
                tenants: v.tenants,
                stations: v.stations,
                next_group_id: v.next_group_id,
                groups: v.groups,
                next_group_uid: v.next_group_uid,
                producers: v.producers,
                api_keys: v.api_keys,
                quotas: v.quotas,
                schemas: v.schemas,
                reconfig: v.reconfig,
                format_level: crate::format_level::BASE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(state: &mut MetaState, name: &str, parts: u32) -> CommandResponse {
        let live: BTreeSet<u64> = [1, 2, 3].into();
        let placement = place_replicas(&live, &state.replica_counts(), parts, 3);
        state.apply(&MetaCommand::CreateStation {
            tenant: "default".into(),
            name: name.into(),
            placement,
            replication_factor: 3,
            max_message_bytes: 1 << 20,
            now_ms: 1,
            policy: StationPolicy::default(),
        })
    }

    #[test]
    fn station_creation_assigns_fresh_group_ids() {
        let mut s = MetaState::default();
        let CommandResponse::StationCreated(a) = create(&mut s, "a", 2) else {
            panic!()
        };
        let CommandResponse::StationCreated(b) = create(&mut s, "b", 1) else {
            panic!()
        };
        let ids: Vec<u64> = a
            .partitions
            .iter()
            .chain(&b.partitions)
            .map(|p| p.group_id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
        // Deleting never makes an id reusable.
        assert_eq!(
            s.apply(&MetaCommand::DeleteStation {
                tenant: "default".into(),
                name: "a".into()
            }),
            CommandResponse::Done
        );
        let CommandResponse::StationCreated(c) = create(&mut s, "a", 1) else {
            panic!()
        };
        assert_eq!(c.partitions[0].group_id, 4);
    }

    #[test]
    fn duplicate_station_and_unknown_tenant_are_rejected() {
        let mut s = MetaState::default();
        create(&mut s, "a", 1);
        assert!(matches!(
            create(&mut s, "a", 1),
            CommandResponse::MetaRejected(MetaError::StationExists { .. })
        ));
        let r = s.apply(&MetaCommand::CreateStation {
            tenant: "nope".into(),
            name: "x".into(),
            placement: vec![vec![1]],
            replication_factor: 1,
            max_message_bytes: 1,
            now_ms: 1,
            policy: StationPolicy::default(),
        });
        assert!(matches!(
            r,
            CommandResponse::MetaRejected(MetaError::TenantNotFound { .. })
        ));
    }

    #[test]
    fn placement_balances_replicas_and_leaders() {
        let live: BTreeSet<u64> = [1, 2, 3, 4, 5].into();
        let placement = place_replicas(&live, &BTreeMap::new(), 10, 3);
        let mut counts = BTreeMap::<u64, usize>::new();
        let mut firsts = BTreeMap::<u64, usize>::new();
        for replicas in &placement {
            assert_eq!(replicas.len(), 3);
            let distinct: BTreeSet<_> = replicas.iter().collect();
            assert_eq!(distinct.len(), 3, "replicas on distinct nodes");
            for r in replicas {
                *counts.entry(*r).or_default() += 1;
            }
            *firsts.entry(replicas[0]).or_default() += 1;
        }
        assert!(counts.values().all(|c| *c == 6), "{counts:?}");
        assert!(firsts.values().all(|c| *c == 2), "{firsts:?}");
    }

    #[test]
    fn update_changes_retention_but_never_the_storage_tier() {
        let mut s = MetaState::default();
        create(&mut s, "a", 1);
        let policy = StationPolicy {
            storage: crate::StorageTier::Memory,
            retention: crate::Retention {
                max_messages: Some(5),
                ..Default::default()
            },
            discard: crate::DiscardPolicy::New,
            ..Default::default()
        };
        let r = s.apply(&MetaCommand::UpdateStation {
            tenant: "default".into(),
            name: "a".into(),
            policy,
        });
        let CommandResponse::StationCreated(st) = r else {
            panic!("{r:?}")
        };
        assert_eq!(st.policy.storage, crate::StorageTier::File);
        assert_eq!(st.policy.retention.max_messages, Some(5));
        assert_eq!(st.policy.discard, crate::DiscardPolicy::New);
        assert_eq!(s.stations["default/a"].policy, st.policy);
        assert_eq!(
            s.partition_of_group(st.partitions[0].group_id)
                .map(|(x, i)| (x.name.as_str(), i)),
            Some(("a", 0))
        );
        assert!(matches!(
            s.apply(&MetaCommand::UpdateStation {
                tenant: "default".into(),
                name: "zz".into(),
                policy,
            }),
            CommandResponse::MetaRejected(MetaError::StationNotFound { .. })
        ));
    }

    fn set_quota(
        state: &mut MetaState,
        tenant: &str,
        station: Option<&str>,
        set: &[(QuotaField, u64)],
    ) -> CommandResponse {
        state.apply(&MetaCommand::SetQuota {
            tenant: tenant.into(),
            change: crate::quota::QuotaChange {
                station: station.map(str::to_string),
                set: set.to_vec(),
                clear: vec![],
            },
        })
    }

    #[test]
    fn station_and_group_counts_are_held_to_the_tenant_quota() {
        let mut s = MetaState::default();
        assert!(matches!(
            set_quota(
                &mut s,
                "default",
                None,
                &[(QuotaField::Stations, 1), (QuotaField::Groups, 1)]
            ),
            CommandResponse::Quotas(_)
        ));
        assert!(matches!(
            create(&mut s, "a", 1),
            CommandResponse::StationCreated(_)
        ));
        let r = create(&mut s, "b", 1);
        assert_eq!(
            r,
            CommandResponse::MetaRejected(MetaError::QuotaExceeded {
                tenant: "default".into(),
                what: QuotaField::Stations,
                limit: 1,
                used: 1,
            })
        );
        let group = |s: &mut MetaState, name: &str| {
            s.apply(&MetaCommand::CreateGroup {
                station: "default/a".into(),
                group: name.into(),
                settings: Default::default(),
                now_ms: 1,
            })
        };
        assert!(matches!(group(&mut s, "g1"), CommandResponse::Group(_)));
        assert!(matches!(
            group(&mut s, "g2"),
            CommandResponse::MetaRejected(MetaError::QuotaExceeded {
                what: QuotaField::Groups,
                ..
            })
        ));
        // Joining creates a group too: held to the same count; joining an existing one is not.
        let join = |s: &mut MetaState, name: &str| {
            s.apply(&MetaCommand::JoinGroup {
                station: "default/a".into(),
                group: name.into(),
                member: "m".into(),
                client: "c".into(),
                settings: Default::default(),
                now_ms: 1,
            })
        };
        assert!(matches!(
            join(&mut s, "g3"),
            CommandResponse::MetaRejected(MetaError::QuotaExceeded { .. })
        ));
        assert!(matches!(join(&mut s, "g1"), CommandResponse::Group(_)));
        // Lowering a quota below what exists removes nothing.
        set_quota(&mut s, "default", None, &[(QuotaField::Stations, 1)]);
        assert!(s.stations.contains_key("default/a"));
    }

    #[test]
    fn quota_changes_are_checked_and_station_limits_go_with_their_station() {
        let mut s = MetaState::default();
        assert_eq!(
            set_quota(&mut s, "nope", None, &[(QuotaField::Streams, 2)]),
            CommandResponse::MetaRejected(MetaError::TenantNotFound {
                tenant: "nope".into()
            })
        );
        assert!(matches!(
            set_quota(
                &mut s,
                "default",
                Some("a"),
                &[(QuotaField::StoredBytes, 2)]
            ),
            CommandResponse::MetaRejected(MetaError::StationNotFound { .. })
        ));
        assert_eq!(
            set_quota(&mut s, "default", None, &[(QuotaField::Streams, 0)]),
            CommandResponse::MetaRejected(MetaError::InvalidQuota(QuotaError::Zero(
                QuotaField::Streams
            )))
        );
        assert!(s.quotas.is_empty(), "refused changes leave nothing behind");
        create(&mut s, "a", 1);
        let CommandResponse::Quotas(q) = set_quota(
            &mut s,
            "default",
            Some("a"),
            &[(QuotaField::StoredBytes, 2)],
        ) else {
            panic!("not set")
        };
        assert_eq!(q.stations["a"].get(QuotaField::StoredBytes), Some(2));
        assert_eq!(s.quotas_of("default"), q);
        s.apply(&MetaCommand::DeleteStation {
            tenant: "default".into(),
            name: "a".into(),
        });
        assert!(s.quotas.is_empty(), "{:?}", s.quotas);
    }

    #[test]
    fn the_format_level_starts_at_the_base_and_only_rises() {
        let mut s = MetaState::default();
        assert_eq!(s.format_level, crate::format_level::BASE);
        assert_eq!(
            s.apply(&MetaCommand::RaiseFormatLevel { level: 2 }),
            CommandResponse::Done
        );
        assert_eq!(s.format_level, 2);
        s.apply(&MetaCommand::RaiseFormatLevel { level: 1 });
        assert_eq!(s.format_level, 2, "never lowered");
    }
}
