//! Consumer group membership, run by the controller.
//!
//! Joins, leaves and expiries go through the metadata group (which also computes the sticky
//! assignment), so every node sees the same members and epochs. Heartbeats do not: the
//! controller keeps each member's last heartbeat in memory. A new controller knows no
//! heartbeats and gives every member a full session timeout from the moment it took over, so a
//! controller failover never expires a healthy member.

use std::collections::HashMap;
use std::time::Duration;

use junction_types::groups::{
    GroupCursor, GroupMeta, GroupSettings, Lanes, dead_letter_station, validate_group_name,
};
use junction_types::{CommandResponse, MetaCommand, MetaError, StationName};
use tokio::time::Instant;

use crate::controller::PartitionView;
use crate::partition::now_ms;
use crate::{Broker, BrokerError};

/// Longest member id.
const MAX_MEMBER_ID_LEN: usize = 128;
/// How often the controller looks for expired sessions and refreshes partition leaders.
const SESSION_CHECK: Duration = Duration::from_millis(500);
/// How often the controller refreshes its view of partition leaders for assignments.
const LEADER_REFRESH: Duration = Duration::from_secs(2);

/// In-memory session state of the controller.
#[derive(Default)]
pub(crate) struct Sessions {
    /// (station, group, member) → last heartbeat.
    last_seen: HashMap<(String, String, String), Instant>,
    /// Partition group id → leader address, from the last probe.
    leaders: HashMap<u64, String>,
    /// Whether this node was the controller at the last check.
    was_controller: bool,
}

/// A member's view of its group: what the join and heartbeat calls return.
#[derive(Debug, Clone)]
pub struct MemberView {
    pub group: GroupMeta,
    pub member: String,
    /// (partition, epoch, leader address or empty).
    pub partitions: Vec<(u32, u64, String)>,
}

fn validate_member(member: &str) -> Result<(), BrokerError> {
    if member.is_empty() || member.len() > MAX_MEMBER_ID_LEN {
        return Err(BrokerError::InvalidArgument(format!(
            "member_id must be 1 to {MAX_MEMBER_ID_LEN} bytes, got {}",
            member.len()
        )));
    }
    Ok(())
}

impl Broker {
    pub(crate) fn group_meta(&self, station: &str, group: &str) -> Result<GroupMeta, BrokerError> {
        self.metadata()
            .group(station, group)
            .cloned()
            .ok_or_else(|| {
                BrokerError::Meta(MetaError::GroupNotFound {
                    station: station.to_string(),
                    group: group.to_string(),
                })
            })
    }

    /// Like `group_meta`, but waits briefly for this node's metadata to catch up with a group
    /// created a moment ago through the controller.
    pub(crate) async fn group_meta_soon(
        &self,
        station: &str,
        group: &str,
    ) -> Result<GroupMeta, BrokerError> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut rx = self.subscribe_metadata();
        loop {
            match self.group_meta(station, group) {
                Ok(g) => return Ok(g),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
                }
            }
        }
    }

    /// Returns a group as this node knows it.
    pub fn describe_group_meta(
        &self,
        station: &StationName,
        group: &str,
    ) -> Result<GroupMeta, BrokerError> {
        self.group_meta(&station.full(), group)
    }

    /// Creates the dead-letter station of `station` unless it exists (one partition, the
    /// station's replication factor).
    async fn ensure_dead_letter_station(&self, station: &StationName) -> Result<(), BrokerError> {
        let meta = self.station(station)?;
        let dls = StationName::parse(&dead_letter_station(&station.full()))?;
        if self.metadata().stations.contains_key(&dls.full()) {
            return Ok(());
        }
        match self
            .create_station(
                &dls,
                1,
                meta.replication_factor,
                meta.max_message_bytes + 4096,
            )
            .await
        {
            Ok(_) | Err(BrokerError::Meta(MetaError::StationExists { .. })) => Ok(()),
            // A station near the size ceiling: keep the dead letters' limit at the ceiling.
            Err(BrokerError::InvalidArgument(_)) => {
                match self
                    .create_station(&dls, 1, meta.replication_factor, 0)
                    .await
                {
                    Ok(_) | Err(BrokerError::Meta(MetaError::StationExists { .. })) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the dead-letter station now if it can. When it cannot (say, a replica node is
    /// down), the group is created anyway and the controller's session loop keeps trying;
    /// dead letters wait for it.
    pub(crate) async fn try_dead_letter_station(&self, station: &StationName) {
        if let Err(e) = self.ensure_dead_letter_station(station).await {
            tracing::warn!(station = %station.full(), error = %e, "dead-letter station not created yet; will retry");
        }
    }

    async fn group_write(&self, cmd: MetaCommand) -> Result<GroupMeta, BrokerError> {
        match self.meta_write(cmd).await? {
            CommandResponse::Group(g) => Ok(g),
            other => Err(BrokerError::Raft(format!(
                "unexpected metadata reply {other:?}"
            ))),
        }
    }

    /// Creates a consumer group with no members.
    pub async fn create_group(
        &self,
        station: &StationName,
        group: &str,
        settings: GroupSettings,
        lanes: Lanes,
    ) -> Result<GroupMeta, BrokerError> {
        validate_group_name(group)?;
        validate_settings(&settings, &lanes)?;
        self.ensure_controller()?;
        self.station(station)?;
        self.try_dead_letter_station(station).await;
        // The first command form while the lanes are the default, so that nodes that do not
        // know lanes yet still read the log.
        let cmd = if lanes == Lanes::default() {
            MetaCommand::CreateGroup {
                station: station.full(),
                group: group.to_string(),
                settings,
                now_ms: now_ms(),
            }
        } else {
            MetaCommand::CreateGroupV2 {
                station: station.full(),
                group: group.to_string(),
                settings,
                lanes,
                now_ms: now_ms(),
            }
        };
        self.group_write(cmd).await
    }

    /// Adds a member to a group (creating the group on first join) and returns its view.
    pub async fn join_group(
        &self,
        station: &StationName,
        group: &str,
        member: &str,
        client: &str,
        settings: GroupSettings,
        lanes: Option<Lanes>,
    ) -> Result<MemberView, BrokerError> {
        validate_group_name(group)?;
        validate_member(member)?;
        validate_settings(&settings, &lanes.unwrap_or_default())?;
        self.ensure_controller()?;
        self.station(station)?;
        let full = station.full();
        match self.metadata().group(&full, group) {
            None => self.try_dead_letter_station(station).await,
            // The mode is fixed when the group is created: a member asking for another one
            // would break the group's ordering promise.
            Some(g) => {
                if let Some(want) = lanes.filter(|l| l.mode != g.lanes.mode) {
                    return Err(BrokerError::InvalidArgument(format!(
                        "group '{group}' is {}, not {}; a group's mode is fixed when it is \
                         created (delete it, or use another group)",
                        g.lanes.mode.as_str(),
                        want.mode.as_str()
                    )));
                }
            }
        }
        self.touch(&full, group, member);
        let client: String = client.chars().take(256).collect();
        let cmd = match lanes.filter(|l| *l != Lanes::default()) {
            None => MetaCommand::JoinGroup {
                station: full,
                group: group.to_string(),
                member: member.to_string(),
                client,
                settings,
                now_ms: now_ms(),
            },
            Some(lanes) => MetaCommand::JoinGroupV2 {
                station: full,
                group: group.to_string(),
                member: member.to_string(),
                client,
                settings,
                lanes,
                now_ms: now_ms(),
            },
        };
        let g = self.group_write(cmd).await?;
        Ok(self.member_view(g, member))
    }

    /// Records a heartbeat and returns the member's current assignment. `MemberNotFound`
    /// when its session expired (the member must join again).
    pub fn heartbeat(
        &self,
        station: &StationName,
        group: &str,
        member: &str,
    ) -> Result<MemberView, BrokerError> {
        self.ensure_controller()?;
        let full = station.full();
        let g = self.group_meta(&full, group)?;
        if !g.members.contains_key(member) {
            return Err(BrokerError::MemberNotFound {
                group: group.to_string(),
                member: member.to_string(),
            });
        }
        self.touch(&full, group, member);
        Ok(self.member_view(g, member))
    }

    /// Removes a member at once (a clean leave: its partitions move without waiting for the
    /// session timeout).
    pub async fn leave_group(
        &self,
        station: &StationName,
        group: &str,
        member: &str,
    ) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        let full = station.full();
        self.sessions.lock().last_seen.remove(&(
            full.clone(),
            group.to_string(),
            member.to_string(),
        ));
        self.group_write(MetaCommand::LeaveGroup {
            station: full,
            group: group.to_string(),
            members: vec![member.to_string()],
        })
        .await?;
        Ok(())
    }

    /// Deletes a group. Its cursors in the partitions become unreachable: a group created
    /// later under the same name is a new incarnation and starts afresh.
    pub async fn delete_group(
        &self,
        station: &StationName,
        group: &str,
    ) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        self.meta_write(MetaCommand::DeleteGroup {
            station: station.full(),
            group: group.to_string(),
        })
        .await?;
        Ok(())
    }

    fn touch(&self, station: &str, group: &str, member: &str) {
        self.sessions.lock().last_seen.insert(
            (station.to_string(), group.to_string(), member.to_string()),
            Instant::now(),
        );
    }

    fn member_view(&self, group: GroupMeta, member: &str) -> MemberView {
        let groups: Vec<u64> = self
            .metadata()
            .stations
            .get(&group.station)
            .map(|s| s.partitions.iter().map(|p| p.group_id).collect())
            .unwrap_or_default();
        let sessions = self.sessions.lock();
        let partitions = group
            .partitions_of(member)
            .into_iter()
            .map(|(p, epoch)| {
                let addr = groups
                    .get(p as usize)
                    .and_then(|g| {
                        self.local_leader_addr(*g)
                            .or_else(|| sessions.leaders.get(g).cloned())
                    })
                    .unwrap_or_default();
                (p, epoch, addr)
            })
            .collect();
        MemberView {
            group,
            member: member.to_string(),
            partitions,
        }
    }

    /// The leader's address of a partition hosted here.
    fn local_leader_addr(&self, group: u64) -> Option<String> {
        let leader = self.partition(group)?.leader()?;
        self.addr_of(leader)
    }

    /// The controller's session loop: expires members whose heartbeats stopped and keeps a
    /// recent view of partition leaders for the assignments it hands out.
    pub(crate) async fn session_loop(&self) {
        let mut tick = tokio::time::interval(SESSION_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_probe: Option<Instant> = None;
        let mut last_dls_check: Option<Instant> = None;
        let shutdown = self.shutdown_token();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let is_controller = self.ensure_controller().is_ok();
            {
                let mut s = self.sessions.lock();
                if !is_controller || !s.was_controller {
                    // Not (or newly) the controller: forget old heartbeats, so that every
                    // member gets a full session from now on.
                    s.last_seen.clear();
                }
                s.was_controller = is_controller;
            }
            if !is_controller {
                continue;
            }
            let meta = self.metadata();
            if last_dls_check.is_none_or(|t| t.elapsed() >= LEADER_REFRESH) {
                last_dls_check = Some(Instant::now());
                // Stations with groups, and stations whose schema dead-letters invalid
                // messages, need a dead-letter station.
                let dead_lettering = meta.schemas.bindings.iter().filter_map(|(st, b)| {
                    (b.on_invalid == junction_types::schema::OnInvalid::DeadLetter).then_some(st)
                });
                let missing: std::collections::BTreeSet<String> = meta
                    .groups
                    .values()
                    .map(|g| &g.station)
                    .chain(dead_lettering)
                    .filter(|st| {
                        meta.stations.contains_key(*st)
                            && !meta.stations.contains_key(&dead_letter_station(st))
                    })
                    .cloned()
                    .collect();
                for st in missing {
                    if let Ok(name) = StationName::parse(&st) {
                        self.try_dead_letter_station(&name).await;
                    }
                }
            }
            if meta.groups.values().all(|g| g.members.is_empty()) {
                continue;
            }
            if last_probe.is_none_or(|t| t.elapsed() >= LEADER_REFRESH) {
                last_probe = Some(Instant::now());
                let probe = self.probe_nodes().await;
                let addrs = self.node_addrs();
                let mut leaders = HashMap::new();
                for station in meta.stations.values() {
                    for PartitionView {
                        group_id, leader, ..
                    } in self.partition_views(station, &probe)
                    {
                        if let Some(a) = leader.and_then(|l| addrs.get(&l).cloned()) {
                            leaders.insert(group_id, a);
                        }
                    }
                }
                self.sessions.lock().leaders = leaders;
            }
            let now = Instant::now();
            let mut expired: Vec<(String, String, Vec<String>)> = Vec::new();
            {
                let mut s = self.sessions.lock();
                for g in meta.groups.values() {
                    let timeout = Duration::from_millis(g.settings.session_timeout_ms);
                    let mut gone = Vec::new();
                    for m in g.members.keys() {
                        let seen = *s
                            .last_seen
                            .entry((g.station.clone(), g.name.clone(), m.clone()))
                            .or_insert(now);
                        if now.duration_since(seen) > timeout {
                            gone.push(m.clone());
                        }
                    }
                    if !gone.is_empty() {
                        expired.push((g.station.clone(), g.name.clone(), gone));
                    }
                }
            }
            for (station, group, members) in expired {
                tracing::info!(%station, %group, ?members, "consumer group sessions expired");
                let keys: Vec<_> = members
                    .iter()
                    .map(|m| (station.clone(), group.clone(), m.clone()))
                    .collect();
                match self
                    .meta_write(MetaCommand::LeaveGroup {
                        station,
                        group,
                        members,
                    })
                    .await
                {
                    Ok(_) => {
                        let mut s = self.sessions.lock();
                        for k in keys {
                            s.last_seen.remove(&k);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "expiring group members failed"),
                }
            }
        }
    }
}

/// Where a seek moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTarget {
    Earliest,
    Latest,
    Offset(u64),
    Timestamp(i64),
}

/// A group's position in one partition, as a replica of the partition knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPosition {
    pub committed: u64,
    pub acked_beyond: u64,
    pub high_watermark: u64,
    pub lag: u64,
    pub oldest_unacked_age_ms: u64,
    /// Keys parked in this partition.
    pub parked_keys: u64,
    /// How far behind the group may fall here before it is detached.
    pub budget: junction_types::groups::LagBudget,
    /// Since when the group is detached here (it no longer holds back `ack` retention).
    pub detached_at_ms: Option<i64>,
}

/// How old the message at `committed` is (0 when `committed` is the end, or when nothing is
/// stored from there on: compacted away): the age of a group's oldest unacknowledged message.
/// One read from the partition's store; a record that cannot be read or fails its checksum
/// is an error, not an age.
pub(crate) fn oldest_unacked_age_ms(
    replica: &crate::PartitionReplica,
    committed: u64,
    next: u64,
) -> Result<u64, BrokerError> {
    if committed >= next {
        return Ok(0);
    }
    let Some((offset, bytes)) = replica
        .store
        .read_messages(replica.group, committed, next, 1, 1 << 20)?
        .into_iter()
        .next()
    else {
        return Ok(0);
    };
    let r = junction_raft::decode_record(&bytes).map_err(|e| BrokerError::CorruptReplica {
        group: replica.group,
        detail: format!("offset {offset}: {e}"),
    })?;
    Ok((now_ms() - r.timestamp_ms).max(0) as u64)
}

impl Broker {
    /// The replica of `partition` of `station` hosted on this node.
    pub(crate) fn hosted_replica(
        &self,
        station: &StationName,
        partition: u32,
    ) -> Result<std::sync::Arc<crate::PartitionReplica>, BrokerError> {
        let meta = self.station(station)?;
        let pm =
            meta.partitions
                .get(partition as usize)
                .ok_or(BrokerError::PartitionOutOfRange {
                    station: station.full(),
                    partition,
                    partitions: meta.partitions.len() as u32,
                })?;
        self.partition(pm.group_id).ok_or(BrokerError::NotHosted {
            node: self.node_id(),
            group: pm.group_id,
        })
    }

    /// Like [`Broker::hosted_replica`], and this node must lead it.
    pub(crate) fn led_replica(
        &self,
        station: &StationName,
        partition: u32,
    ) -> Result<std::sync::Arc<crate::PartitionReplica>, BrokerError> {
        let replica = self.hosted_replica(station, partition)?;
        self.ensure_partition_leader(&replica)?;
        Ok(replica)
    }

    /// Moves a group's position in one partition this node leads. A running delivery starts
    /// over from there.
    pub async fn seek_partition(
        &self,
        station: &StationName,
        group: &str,
        partition: u32,
        target: SeekTarget,
    ) -> Result<(), BrokerError> {
        let replica = self.led_replica(station, partition)?;
        let g = self.group_meta_soon(&station.full(), group).await?;
        let s = replica.shared.current();
        let offset = match target {
            SeekTarget::Earliest => s.start_offset,
            SeekTarget::Latest => s.next_offset,
            SeekTarget::Offset(o) => {
                if o > s.next_offset {
                    return Err(BrokerError::InvalidArgument(format!(
                        "offset {o} is beyond the end of partition {partition} (next offset {})",
                        s.next_offset
                    )));
                }
                o
            }
            SeekTarget::Timestamp(ts) => self.offset_for_time(replica.group, ts)?,
        };
        self.cursor_write(
            &replica,
            junction_types::PartitionCommand::GroupSeek {
                group: group.to_string(),
                uid: g.uid,
                offset,
            },
        )
        .await?;
        Ok(())
    }

    /// Copies group `from`'s position in one partition this node leads into group `to`.
    pub async fn clone_partition(
        &self,
        station: &StationName,
        from: &str,
        to: &str,
        partition: u32,
    ) -> Result<(), BrokerError> {
        let replica = self.led_replica(station, partition)?;
        let full = station.full();
        let src = self.group_meta_soon(&full, from).await?;
        let dst = self.group_meta_soon(&full, to).await?;
        self.ensure_cursor(&replica, &src).await?;
        self.cursor_write(
            &replica,
            junction_types::PartitionCommand::GroupClone {
                from: from.to_string(),
                from_uid: src.uid,
                to: to.to_string(),
                to_uid: dst.uid,
            },
        )
        .await?;
        Ok(())
    }

    /// Sets a group's isolation budget in a partition, or attaches it again after it was
    /// detached; this node must lead the partition. Returns the cursor after the change.
    pub async fn set_group_isolation(
        &self,
        station: &StationName,
        group: &str,
        partition: u32,
        change: junction_types::groups::Isolation,
    ) -> Result<GroupCursor, BrokerError> {
        if let junction_types::groups::Isolation::Budget(b) = &change {
            b.validate()
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        }
        let replica = self.led_replica(station, partition)?;
        let g = self.group_meta_soon(&station.full(), group).await?;
        self.ensure_cursor(&replica, &g).await?;
        self.cursor_write(
            &replica,
            junction_types::PartitionCommand::GroupIsolation {
                group: group.to_string(),
                uid: g.uid,
                change,
            },
        )
        .await?
        .ok_or_else(|| BrokerError::Raft("group cursor missing after an isolation change".into()))
    }

    /// Returns a group's position in a partition hosted here (from the local replica, which
    /// may trail the leader by a moment). A group that has not read the partition yet is at
    /// its start setting.
    pub fn group_position(
        &self,
        station: &StationName,
        group: &str,
        partition: u32,
    ) -> Result<GroupPosition, BrokerError> {
        let replica = self.hosted_replica(station, partition)?;
        let g = self.group_meta(&station.full(), group)?;
        self.position_of(&replica, &g)
    }

    pub(crate) fn position_of(
        &self,
        replica: &crate::PartitionReplica,
        g: &GroupMeta,
    ) -> Result<GroupPosition, BrokerError> {
        let mut p = self.cursor_position(replica, g);
        p.oldest_unacked_age_ms = oldest_unacked_age_ms(replica, p.committed, p.high_watermark)?;
        Ok(p)
    }

    /// [`Broker::position_of`] from the replica's state alone, without reading the oldest
    /// unacknowledged message from disk (its age is left 0): what the retention pass needs
    /// for every group on every tick.
    pub(crate) fn cursor_position(
        &self,
        replica: &crate::PartitionReplica,
        g: &GroupMeta,
    ) -> GroupPosition {
        let s = replica.shared.current();
        let cursors = replica.shared.cursors();
        let mine = cursors.get(&g.name).filter(|c| c.uid == g.uid);
        let parked_keys = mine.map_or(0, |c| c.parked.len() as u64);
        let budget = mine.map(|c| c.budget).unwrap_or_default();
        let detached_at_ms = mine.and_then(|c| c.detached_at_ms);
        let (committed, acked_beyond) = match mine {
            Some(c) => (c.committed.max(s.start_offset), c.acked_beyond()),
            _ => match g.settings.start {
                junction_types::groups::StartFrom::Latest => (s.next_offset, 0),
                junction_types::groups::StartFrom::Offset(o) => {
                    (o.clamp(s.start_offset, s.next_offset), 0)
                }
                _ => (s.start_offset, 0),
            },
        };
        let lag = s
            .next_offset
            .saturating_sub(committed)
            .saturating_sub(acked_beyond);
        GroupPosition {
            parked_keys,
            budget,
            detached_at_ms,
            committed,
            acked_beyond,
            high_watermark: s.next_offset,
            lag,
            oldest_unacked_age_ms: 0,
        }
    }

    /// Positions of every group in every partition this node leads, for `/metrics`:
    /// (station, group, partition, position).
    pub fn led_group_positions(&self) -> Vec<(String, String, u32, GroupPosition)> {
        let meta = self.metadata();
        let mut out = Vec::new();
        for g in meta.groups.values() {
            let Some(st) = meta.stations.get(&g.station) else {
                continue;
            };
            for (i, pm) in st.partitions.iter().enumerate() {
                let Some(replica) = self.partition(pm.group_id) else {
                    continue;
                };
                if replica.leader() != Some(self.node_id()) {
                    continue;
                }
                match self.position_of(&replica, g) {
                    Ok(pos) => out.push((g.station.clone(), g.name.clone(), i as u32, pos)),
                    // Left out of the metrics rather than shown with a made-up age.
                    Err(e) => tracing::warn!(
                        station = %g.station,
                        group = %g.name,
                        partition = i,
                        error = %e,
                        "group position unreadable"
                    ),
                }
            }
        }
        out
    }
}

/// Checks a group's settings and lanes.
fn validate_settings(settings: &GroupSettings, lanes: &Lanes) -> Result<(), BrokerError> {
    settings
        .validate()
        .and_then(|()| lanes.validate())
        .map_err(|e| BrokerError::InvalidArgument(e.to_string()))
}
