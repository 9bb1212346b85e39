//! The `Groups` gRPC service: consumer group membership (on the controller), positions (on
//! the partition leaders), delivery streams, and dead letters.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use junction_broker::delivery::pull::PullMember;
use junction_broker::delivery::{
    Answer, ConsumeControl, ConsumeEvent, DeadLetterSink, ParkedAction, dls_headers,
};
use junction_broker::groups::{GroupPosition, MemberView, SeekTarget};
use junction_broker::{Broker, BrokerError};
use junction_proto::v1::broker_server::Broker as _;
use junction_proto::v1::consume_request::Request as ConsumeReq;
use junction_proto::v1::groups_server::Groups;
use junction_proto::v1::*;
use junction_types::groups::{
    self as tg, GroupMeta, Isolation, LagBudget, StartFrom, dead_letter_station,
};
use junction_types::{Record, StationName};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Authenticator, CREDENTIAL_RECHECK, allow_station};
use crate::broker_service::{BrokerService, stored_message};
use crate::forward::{ClientPool, MAX_HOPS, forwarded, hops_of, settled, stamped, with_hops};
use crate::status::to_status;
use crate::telemetry;
use junction_types::auth::{Operation, Principal};

/// Forwards the call to the controller unless this node is the controller.
macro_rules! on_controller {
    ($self:ident, $hops:ident, $req:ident, $method:ident) => {
        if let Some(addr) = $self.controller_addr($hops)? {
            let r = $self
                .clients
                .groups(&addr)?
                .$method(with_hops($req, $hops + 1))
                .await;
            return settled(&$self.broker, r).await;
        }
    };
}

/// Forwards the call to the leader of `$partition` unless this node leads it.
macro_rules! on_partition_leader {
    ($self:ident, $hops:ident, $req:ident, $partition:expr, $method:ident) => {
        if let Some(addr) = $self
            .partition_route(&$req.station, $partition, $hops)
            .await?
        {
            return $self
                .clients
                .groups(&addr)?
                .$method(with_hops($req, $hops + 1))
                .await
                .map_err(forwarded);
        }
    };
}

/// The most messages one `Fetch` hands out.
pub const MAX_FETCH: u32 = 1000;

/// How long a dead-letter append may take.
const DLS_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves consumer groups.
pub struct GroupsService {
    broker: Arc<Broker>,
    clients: Arc<ClientPool>,
    routes: BrokerService,
    auth: Arc<Authenticator>,
}

impl GroupsService {
    pub fn new(broker: Arc<Broker>, clients: Arc<ClientPool>, auth: Arc<Authenticator>) -> Self {
        let routes = BrokerService::new(broker.clone(), clients.clone(), auth.clone());
        Self {
            broker,
            clients,
            routes,
            auth,
        }
    }

    /// Authenticates a call and checks `op` on its station.
    async fn allow<T>(&self, req: &Request<T>, station: &str, op: Operation) -> Result<(), Status> {
        let who = self.auth.principal(req.metadata()).await?;
        allow_station(&who, op, &parse(station)?)
    }

    /// Returns the controller's address when this node is not the controller.
    fn controller_addr(&self, hops: u32) -> Result<Option<String>, Status> {
        crate::forward::controller_addr(&self.broker, hops)
    }

    /// Where to run a call for one partition: `None` here (this node leads it), else the
    /// address to forward to.
    async fn partition_route(
        &self,
        station: &str,
        partition: u32,
        hops: u32,
    ) -> Result<Option<String>, Status> {
        // Called once the call is authorized: routing only.
        let meta = self
            .routes
            .station(station, &Principal::superuser(), Operation::Describe)
            .await?;
        let pm = meta.partitions.get(partition as usize).ok_or_else(|| {
            to_status(BrokerError::PartitionOutOfRange {
                station: meta.full_name(),
                partition,
                partitions: meta.partitions.len() as u32,
            })
        })?;
        let route = self.routes.route(pm.group_id, &pm.replicas).await?;
        if route.is_some() && hops >= MAX_HOPS {
            return Err(Status::unavailable(format!(
                "partition {partition} of '{station}': leader not found within {MAX_HOPS} hops; retry"
            )));
        }
        Ok(route)
    }

    /// A node holding a replica of the partition (this one when it does).
    async fn replica_route(&self, station: &str, partition: u32) -> Result<Option<String>, Status> {
        // Called once the call is authorized: routing only.
        let meta = self
            .routes
            .station(station, &Principal::superuser(), Operation::Describe)
            .await?;
        let pm = meta.partitions.get(partition as usize).ok_or_else(|| {
            to_status(BrokerError::PartitionOutOfRange {
                station: meta.full_name(),
                partition,
                partitions: meta.partitions.len() as u32,
            })
        })?;
        if self.broker.partition(pm.group_id).is_some() {
            return Ok(None);
        }
        let addrs = self.broker.node_addrs();
        pm.replicas
            .iter()
            .find_map(|r| addrs.get(r).cloned())
            .map(Some)
            .ok_or_else(|| Status::unavailable("no replica address known"))
    }

    /// Resumes (or skips) parked keys on the partition's leader.
    async fn parked_action(
        &self,
        req: Request<ParkedKeyRequest>,
        resume: bool,
    ) -> Result<Response<ParkedKeyResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Manage)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        if r.key.is_empty() && !(resume && r.all) {
            return Err(Status::invalid_argument(
                "name the parked key (or, to resume, ask for all)",
            ));
        }
        if let Some(addr) = self.partition_route(&r.station, r.partition, hops).await? {
            let mut client = self.clients.groups(&addr)?;
            let req = with_hops(r, hops + 1);
            let resp = if resume {
                client.resume_parked(req).await
            } else {
                client.skip_parked(req).await
            };
            return resp.map_err(forwarded);
        }
        let action = match (resume, r.all) {
            (true, true) => ParkedAction::ResumeAll,
            (true, false) => ParkedAction::Resume(r.key),
            (false, _) => ParkedAction::Skip(r.key),
        };
        let keys = self
            .broker
            .parked_action(&station, &r.group, r.partition, action)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ParkedKeyResponse { keys }))
    }
}

fn budget_of(b: &junction_proto::v1::LagBudget) -> LagBudget {
    LagBudget {
        max_messages: b.max_messages,
        max_bytes: b.max_bytes,
        max_age_ms: b.max_age_ms,
    }
}

fn budget_proto(b: &LagBudget) -> junction_proto::v1::LagBudget {
    junction_proto::v1::LagBudget {
        max_messages: b.max_messages,
        max_bytes: b.max_bytes,
        max_age_ms: b.max_age_ms,
    }
}

fn parse(name: &str) -> Result<StationName, Status> {
    StationName::parse(name).map_err(|e| to_status(e.into()))
}

fn answer(o: Offsets) -> Answer {
    Answer {
        offsets: o.offsets,
        attempts: o.attempts,
    }
}

/// The lanes a request names: `None` when it names no mode (a join then takes the group's).
pub fn lanes_from_proto(s: Option<&GroupSettings>) -> Result<Option<tg::Lanes>, Status> {
    let Some(s) = s else {
        return Ok(None);
    };
    let on_max_deliveries = match OnMaxDeliveries::try_from(s.on_max_deliveries) {
        Ok(OnMaxDeliveries::Unspecified) => None,
        Ok(OnMaxDeliveries::DeadLetter) => Some(tg::OnMaxDeliveries::DeadLetter),
        Ok(OnMaxDeliveries::Park) => Some(tg::OnMaxDeliveries::Park),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown on_max_deliveries {}: use dead_letter or park",
                s.on_max_deliveries
            )));
        }
    };
    let mode = match GroupMode::try_from(s.mode) {
        // Parking asked for without a mode: a partitioned group.
        Ok(GroupMode::Unspecified) if on_max_deliveries.is_some() => tg::GroupMode::Partitioned,
        Ok(GroupMode::Unspecified) => return Ok(None),
        Ok(GroupMode::Partitioned) => tg::GroupMode::Partitioned,
        Ok(GroupMode::KeyShared) => tg::GroupMode::KeyShared,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown group mode {}: use partitioned or key_shared",
                s.mode
            )));
        }
    };
    let d = tg::Lanes::default();
    Ok(Some(tg::Lanes {
        mode,
        max_in_flight_per_key: match s.max_in_flight_per_key {
            0 => d.max_in_flight_per_key,
            n => n,
        },
        on_max_deliveries: on_max_deliveries.unwrap_or(d.on_max_deliveries),
    }))
}

/// Converts settings from the wire, applying defaults for zero values.
pub fn settings_from_proto(s: Option<&GroupSettings>) -> tg::GroupSettings {
    let d = tg::GroupSettings::default();
    let Some(s) = s else {
        return d;
    };
    let start = match s.start {
        Some(group_settings::Start::Offset(o)) => StartFrom::Offset(o),
        Some(group_settings::Start::TimestampMs(t)) => StartFrom::Timestamp(t),
        Some(group_settings::Start::Position(p)) if p == StartPosition::Latest as i32 => {
            StartFrom::Latest
        }
        _ => StartFrom::Earliest,
    };
    let or = |v: u64, dflt: u64| if v == 0 { dflt } else { v };
    tg::GroupSettings {
        start,
        ack_wait_ms: or(s.ack_wait_ms, d.ack_wait_ms),
        max_deliveries: or(u64::from(s.max_deliveries), u64::from(d.max_deliveries)) as u32,
        max_in_flight: or(u64::from(s.max_in_flight), u64::from(d.max_in_flight)) as u32,
        session_timeout_ms: or(s.session_timeout_ms, d.session_timeout_ms),
    }
}

fn settings_to_proto(s: &tg::GroupSettings, lanes: &tg::Lanes) -> GroupSettings {
    let start = match s.start {
        StartFrom::Earliest => group_settings::Start::Position(StartPosition::Earliest as i32),
        StartFrom::Latest => group_settings::Start::Position(StartPosition::Latest as i32),
        StartFrom::Offset(o) => group_settings::Start::Offset(o),
        StartFrom::Timestamp(t) => group_settings::Start::TimestampMs(t),
    };
    GroupSettings {
        start: Some(start),
        ack_wait_ms: s.ack_wait_ms,
        max_deliveries: s.max_deliveries,
        max_in_flight: s.max_in_flight,
        session_timeout_ms: s.session_timeout_ms,
        mode: match lanes.mode {
            tg::GroupMode::Partitioned => GroupMode::Partitioned,
            tg::GroupMode::KeyShared => GroupMode::KeyShared,
        } as i32,
        max_in_flight_per_key: lanes.max_in_flight_per_key,
        on_max_deliveries: match lanes.on_max_deliveries {
            tg::OnMaxDeliveries::DeadLetter => OnMaxDeliveries::DeadLetter,
            tg::OnMaxDeliveries::Park => OnMaxDeliveries::Park,
        } as i32,
    }
}

/// Converts a group (without positions).
pub fn group_info(g: &GroupMeta) -> GroupInfo {
    GroupInfo {
        station: g.station.clone(),
        group: g.name.clone(),
        settings: Some(settings_to_proto(&g.settings, &g.lanes)),
        generation: g.generation,
        created_at_ms: g.created_at_ms,
        members: g
            .members
            .iter()
            .map(|(id, m)| GroupMember {
                member_id: id.clone(),
                client: m.client.clone(),
                joined_at_ms: m.joined_at_ms,
                partitions: g.partitions_of(id).into_iter().map(|(p, _)| p).collect(),
            })
            .collect(),
        partitions: vec![],
    }
}

fn member_assignment(v: MemberView) -> MemberAssignment {
    // Heartbeat three times per session.
    let session = v.group.settings.session_timeout_ms;
    MemberAssignment {
        member_id: v.member,
        generation: v.group.generation,
        partitions: v
            .partitions
            .into_iter()
            .map(|(partition, epoch, leader_addr)| PartitionAssignment {
                partition,
                epoch,
                leader_addr,
            })
            .collect(),
        heartbeat_interval_ms: (session / 3).max(100),
        session_timeout_ms: session,
    }
}

fn group_partition(g: &GroupMeta, p: u32, pos: Option<GroupPosition>) -> GroupPartition {
    let a = g.assignment.get(p as usize).and_then(Option::as_ref);
    let known = pos.is_some();
    let pos = pos.unwrap_or_default();
    GroupPartition {
        partition: p,
        member_id: a.map(|a| a.member.clone()),
        epoch: a.map_or(0, |a| a.epoch),
        committed: pos.committed,
        acked_beyond: pos.acked_beyond,
        high_watermark: pos.high_watermark,
        lag: pos.lag,
        oldest_unacked_age_ms: pos.oldest_unacked_age_ms,
        known,
        parked_keys: pos.parked_keys,
        budget: Some(budget_proto(&pos.budget)),
        detached_at_ms: pos.detached_at_ms,
    }
}

/// The `traceparent` header of a stored message, if it has one.
fn traceparent_of(headers: &[(String, Vec<u8>)]) -> Option<&[u8]> {
    headers
        .iter()
        .find(|(k, _)| k == crate::broker_service::TRACEPARENT)
        .map(|(_, v)| v.as_slice())
}

type ConsumeStream = Pin<Box<dyn Stream<Item = Result<ConsumeResponse, Status>> + Send>>;

/// Passes `inner` on, and ends it with the credential's error once the key it was opened with
/// is revoked or expires (checked every [`CREDENTIAL_RECHECK`]).
fn end_on_revocation(
    mut inner: ConsumeStream,
    auth: Arc<Authenticator>,
    who: Principal,
) -> ConsumeStream {
    if !who.can_lapse() {
        return inner;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CREDENTIAL_RECHECK);
        loop {
            tokio::select! {
                item = inner.next() => match item {
                    Some(item) => if tx.send(item).await.is_err() { return },
                    None => return,
                },
                _ = tick.tick() => if let Err(s) = auth.still_valid(&who) {
                    let _ = tx.send(Err(s)).await;
                    return;
                },
                () = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn create_group(
        &self,
        req: Request<CreateGroupRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Consume)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        on_controller!(self, hops, r, create_group);
        let g = self
            .broker
            .create_group(
                &station,
                &r.group,
                settings_from_proto(r.settings.as_ref()),
                lanes_from_proto(r.settings.as_ref())?.unwrap_or_default(),
            )
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, group_info(&g)))
    }

    async fn join_group(
        &self,
        req: Request<JoinGroupRequest>,
    ) -> Result<Response<MemberAssignment>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Consume)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        on_controller!(self, hops, r, join_group);
        let v = self
            .broker
            .join_group(
                &station,
                &r.group,
                &r.member_id,
                &r.client,
                settings_from_proto(r.settings.as_ref()),
                lanes_from_proto(r.settings.as_ref())?,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(member_assignment(v)))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<MemberAssignment>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Consume)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        on_controller!(self, hops, r, heartbeat);
        let v = self
            .broker
            .heartbeat(&station, &r.group, &r.member_id)
            .map_err(to_status)?;
        Ok(Response::new(member_assignment(v)))
    }

    async fn leave_group(
        &self,
        req: Request<LeaveGroupRequest>,
    ) -> Result<Response<LeaveGroupResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Consume)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        on_controller!(self, hops, r, leave_group);
        self.broker
            .leave_group(&station, &r.group, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(LeaveGroupResponse {}))
    }

    async fn list_groups(
        &self,
        req: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let filter = if r.station.is_empty() {
            None
        } else {
            Some(parse(&r.station)?.full())
        };
        let meta = self.broker.metadata();
        let groups = meta
            .groups
            .values()
            .filter(|g| filter.as_ref().is_none_or(|s| *s == g.station))
            .filter(|g| {
                StationName::parse(&g.station).is_ok_and(|n| who.lists_station(&n.tenant, &n.name))
            })
            .map(group_info)
            .collect();
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        req: Request<DescribeGroupRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Describe)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        let g = self
            .broker
            .describe_group_meta(&station, &r.group)
            .map_err(to_status)?;
        let mut info = group_info(&g);
        let parts: Vec<u32> = if r.only_partitions.is_empty() {
            (0..g.assignment.len() as u32).collect()
        } else {
            r.only_partitions.clone()
        };
        for p in parts {
            let pos = match self.broker.group_position(&station, &r.group, p) {
                Ok(pos) => Some(pos),
                Err(BrokerError::NotHosted { .. }) if hops < MAX_HOPS => {
                    match self.replica_route(&r.station, p).await {
                        Ok(Some(addr)) => {
                            let sub = DescribeGroupRequest {
                                station: r.station.clone(),
                                group: r.group.clone(),
                                only_partitions: vec![p],
                            };
                            match self
                                .clients
                                .groups(&addr)?
                                .describe_group(with_hops(sub, hops + 1))
                                .await
                            {
                                Ok(resp) => resp
                                    .into_inner()
                                    .partitions
                                    .into_iter()
                                    .next()
                                    .filter(|x| x.known)
                                    .map(|x| GroupPosition {
                                        committed: x.committed,
                                        acked_beyond: x.acked_beyond,
                                        high_watermark: x.high_watermark,
                                        lag: x.lag,
                                        oldest_unacked_age_ms: x.oldest_unacked_age_ms,
                                        parked_keys: x.parked_keys,
                                        budget: x
                                            .budget
                                            .as_ref()
                                            .map(budget_of)
                                            .unwrap_or_default(),
                                        detached_at_ms: x.detached_at_ms,
                                    }),
                                Err(_) => None,
                            }
                        }
                        _ => None,
                    }
                }
                Err(BrokerError::NotHosted { .. }) => None,
                Err(e) => return Err(to_status(e)),
            };
            info.partitions.push(group_partition(&g, p, pos));
        }
        Ok(Response::new(info))
    }

    async fn seek_group(
        &self,
        req: Request<SeekGroupRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Manage)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        let g = self
            .broker
            .describe_group_meta(&station, &r.group)
            .map_err(to_status)?;
        let target = match r.target {
            Some(seek_group_request::Target::Offset(o)) => SeekTarget::Offset(o),
            Some(seek_group_request::Target::TimestampMs(t)) => SeekTarget::Timestamp(t),
            Some(seek_group_request::Target::Position(p)) if p == StartPosition::Latest as i32 => {
                SeekTarget::Latest
            }
            Some(seek_group_request::Target::Position(_)) => SeekTarget::Earliest,
            None => {
                return Err(Status::invalid_argument(
                    "seek needs a target: offset, timestamp_ms or position",
                ));
            }
        };
        let n = g.assignment.len() as u32;
        let parts: Vec<u32> = match r.partition {
            Some(p) if p >= n => {
                return Err(to_status(BrokerError::PartitionOutOfRange {
                    station: station.full(),
                    partition: p,
                    partitions: n,
                }));
            }
            Some(p) => vec![p],
            None => (0..n).collect(),
        };
        if matches!(target, SeekTarget::Offset(_)) && r.partition.is_none() && n > 1 {
            return Err(Status::invalid_argument(
                "an offset seek needs a partition (offsets differ per partition); use a time or position for all partitions",
            ));
        }
        for p in parts {
            match self.partition_route(&r.station, p, hops).await? {
                None => self
                    .broker
                    .seek_partition(&station, &r.group, p, target)
                    .await
                    .map_err(to_status)?,
                Some(addr) => {
                    let mut sub = r.clone();
                    sub.partition = Some(p);
                    self.clients
                        .groups(&addr)?
                        .seek_group(with_hops(sub, hops + 1))
                        .await
                        .map_err(forwarded)?;
                }
            }
        }
        Ok(Response::new(group_info(&g)))
    }

    async fn clone_group(
        &self,
        req: Request<CloneGroupRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Manage)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        if let Some(p) = r.partition {
            // One partition's position, on its leader.
            on_partition_leader!(self, hops, r, p, clone_group);
            self.broker
                .clone_partition(&station, &r.from_group, &r.to_group, p)
                .await
                .map_err(to_status)?;
            let g = self
                .broker
                .describe_group_meta(&station, &r.to_group)
                .map_err(to_status)?;
            return Ok(Response::new(group_info(&g)));
        }
        on_controller!(self, hops, r, clone_group);
        let src = self
            .broker
            .describe_group_meta(&station, &r.from_group)
            .map_err(to_status)?;
        let dst = self
            .broker
            .create_group(&station, &r.to_group, src.settings, src.lanes)
            .await
            .map_err(to_status)?;
        for p in 0..src.assignment.len() as u32 {
            let sub = CloneGroupRequest {
                partition: Some(p),
                ..r.clone()
            };
            let res = match self.partition_route(&r.station, p, 0).await {
                Ok(None) => self
                    .broker
                    .clone_partition(&station, &r.from_group, &r.to_group, p)
                    .await
                    .map_err(to_status),
                Ok(Some(addr)) => self
                    .clients
                    .groups(&addr)?
                    .clone_group(with_hops(sub, 1))
                    .await
                    .map(|_| ())
                    .map_err(forwarded),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                return Err(Status::new(
                    e.code(),
                    format!(
                        "group '{}' was created but copying partition {p}'s position failed ({}); delete it and clone again",
                        r.to_group,
                        e.message()
                    ),
                ));
            }
        }
        Ok(stamped(&self.broker, group_info(&dst)))
    }

    async fn delete_group(
        &self,
        req: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Manage)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        on_controller!(self, hops, r, delete_group);
        self.broker
            .delete_group(&station, &r.group)
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, DeleteGroupResponse {}))
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        req: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty consume stream"))?;
        let Some(ConsumeReq::Subscribe(sub)) = first.request else {
            return Err(Status::invalid_argument(
                "the first message of a consume stream must be `subscribe`",
            ));
        };
        let station = parse(&sub.station)?;
        allow_station(&who, Operation::Consume, &station)?;
        let permit = self
            .broker
            .open_stream(&station.tenant)
            .map_err(to_status)?;
        let subscription = self
            .broker
            .subscribe(
                &station,
                &sub.group,
                sub.partition,
                &sub.member_id,
                sub.epoch,
                sub.max_in_flight,
            )
            .await
            .map_err(to_status)?;
        let control = subscription.control;
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let c = match m.request {
                    Some(ConsumeReq::Ack(o)) => ConsumeControl::Ack(answer(o)),
                    Some(ConsumeReq::Nack(n)) => ConsumeControl::Nack {
                        answer: Answer {
                            offsets: n.offsets,
                            attempts: n.attempts,
                        },
                        delay_ms: n.delay_ms,
                    },
                    Some(ConsumeReq::InProgress(o)) => ConsumeControl::InProgress(answer(o)),
                    Some(ConsumeReq::Subscribe(_)) | None => continue,
                };
                if control.send(c).is_err() {
                    break;
                }
            }
            // Dropping `control` detaches the subscriber.
        });
        let partition = sub.partition;
        let tenant = station.tenant.clone();
        let (station_name, group) = (sub.station.clone(), sub.group.clone());
        let out = tokio_stream::wrappers::UnboundedReceiverStream::new(subscription.events).map(
            move |e| match e {
                Ok(ConsumeEvent::Deliveries(d)) => {
                    // The stream's place in the tenant's quota of streams, held while it runs.
                    let _held = &permit;
                    metrics::counter!("junction_group_delivered_total", "tenant" => tenant.clone())
                        .increment(d.len() as u64);
                    telemetry::record_delivery(
                        &station_name,
                        &group,
                        partition,
                        d.len(),
                        d.iter().filter_map(|d| traceparent_of(&d.record.headers)),
                    );
                    Ok(ConsumeResponse {
                        deliveries: d
                            .into_iter()
                            .map(|d| Delivery {
                                message: Some(stored_message(partition, d.offset, d.record)),
                                delivery_count: d.delivery_count,
                            })
                            .collect(),
                        committed_acks: vec![],
                        committed: 0,
                    })
                }
                Ok(ConsumeEvent::Committed { acks, committed }) => Ok(ConsumeResponse {
                    deliveries: vec![],
                    committed_acks: acks,
                    committed,
                }),
                Err(e) => Err(to_status(e)),
            },
        );
        Ok(Response::new(end_on_revocation(
            Box::pin(out),
            self.auth.clone(),
            who,
        )))
    }

    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Consume)
            .await?;
        let r = req.into_inner();
        if r.max_messages == 0 || r.max_messages > MAX_FETCH {
            return Err(Status::invalid_argument(format!(
                "max_messages must be 1 to {MAX_FETCH}, not {}",
                r.max_messages
            )));
        }
        let station = parse(&r.station)?;
        on_partition_leader!(self, hops, r, r.partition, fetch);
        let member = PullMember {
            station: &station,
            group: &r.group,
            partition: r.partition,
            member: &r.member_id,
            epoch: r.epoch,
        };
        let wait = Duration::from_millis(r.wait_ms);
        if r.peek {
            let ready = self
                .broker
                .pull_peek(&member, r.max_messages, wait)
                .await
                .map_err(to_status)?;
            return Ok(Response::new(FetchResponse {
                deliveries: Vec::new(),
                ready,
            }));
        }
        let delivered = self
            .broker
            .pull_fetch(&member, r.max_messages, wait)
            .await
            .map_err(to_status)?;
        metrics::counter!("junction_group_delivered_total", "tenant" => station.tenant.clone())
            .increment(delivered.len() as u64);
        telemetry::record_delivery(
            &r.station,
            &r.group,
            r.partition,
            delivered.len(),
            delivered
                .iter()
                .filter_map(|d| traceparent_of(&d.record.headers)),
        );
        Ok(Response::new(FetchResponse {
            deliveries: delivered
                .into_iter()
                .map(|d| Delivery {
                    message: Some(stored_message(r.partition, d.offset, d.record)),
                    delivery_count: d.delivery_count,
                })
                .collect(),
            ready: 0,
        }))
    }

    async fn settle(
        &self,
        req: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Consume)
            .await?;
        let r = req.into_inner();
        if r.attempts.len() != r.offsets.len() {
            return Err(Status::invalid_argument(format!(
                "{} offsets but {} attempts: name the delivery each offset answers",
                r.offsets.len(),
                r.attempts.len()
            )));
        }
        let station = parse(&r.station)?;
        let answer = Answer {
            offsets: r.offsets.clone(),
            attempts: r.attempts.clone(),
        };
        let control = match SettleKind::try_from(r.kind) {
            Ok(SettleKind::Ack) => ConsumeControl::Ack(answer),
            Ok(SettleKind::Nack) => ConsumeControl::Nack {
                answer,
                delay_ms: r.delay_ms,
            },
            Ok(SettleKind::InProgress) => ConsumeControl::InProgress(answer),
            Ok(SettleKind::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(
                    "kind must be ack, nack or in_progress",
                ));
            }
        };
        on_partition_leader!(self, hops, r, r.partition, settle);
        let member = PullMember {
            station: &station,
            group: &r.group,
            partition: r.partition,
            member: &r.member_id,
            epoch: r.epoch,
        };
        let results = self
            .broker
            .pull_settle(&member, control)
            .await
            .map_err(to_status)?;
        Ok(Response::new(SettleResponse {
            outcomes: r
                .offsets
                .iter()
                .zip(results)
                .map(|(offset, result)| SettleOutcome {
                    offset: *offset,
                    accepted: result.is_ok(),
                    refusal: result.err().map(|e| e.to_string()).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn list_parked(
        &self,
        req: Request<ListParkedRequest>,
    ) -> Result<Response<ListParkedResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Read)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        let meta = self
            .routes
            .station(&r.station, &Principal::superuser(), Operation::Describe)
            .await?;
        let parts: Vec<u32> = match r.partition {
            Some(p) => vec![p],
            None => (0..meta.partitions.len() as u32).collect(),
        };
        let mut keys = Vec::new();
        for p in parts {
            if let Some(addr) = self.partition_route(&r.station, p, hops).await? {
                let sub = ListParkedRequest {
                    station: r.station.clone(),
                    group: r.group.clone(),
                    partition: Some(p),
                };
                let resp = self
                    .clients
                    .groups(&addr)?
                    .list_parked(with_hops(sub, hops + 1))
                    .await
                    .map_err(forwarded)?;
                keys.extend(resp.into_inner().keys);
                continue;
            }
            let parked = self
                .broker
                .parked_keys(&station, &r.group, p)
                .map_err(to_status)?;
            for (key, head_offset) in parked {
                let head = self
                    .broker
                    .read_one(&station, p, head_offset)
                    .await
                    .map(|rec| stored_message(p, head_offset, rec));
                keys.push(ParkedKey {
                    partition: p,
                    key,
                    head_offset,
                    head,
                });
            }
        }
        Ok(Response::new(ListParkedResponse { keys }))
    }

    async fn resume_parked(
        &self,
        req: Request<ParkedKeyRequest>,
    ) -> Result<Response<ParkedKeyResponse>, Status> {
        self.parked_action(req, true).await
    }

    async fn skip_parked(
        &self,
        req: Request<ParkedKeyRequest>,
    ) -> Result<Response<ParkedKeyResponse>, Status> {
        self.parked_action(req, false).await
    }

    async fn set_isolation(
        &self,
        req: Request<SetIsolationRequest>,
    ) -> Result<Response<SetIsolationResponse>, Status> {
        let hops = hops_of(&req);
        self.allow(&req, &req.get_ref().station, Operation::Manage)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        let change = match &r.change {
            Some(set_isolation_request::Change::Budget(b)) => Isolation::Budget(budget_of(b)),
            Some(set_isolation_request::Change::Reattach(true)) => Isolation::Reattach,
            Some(set_isolation_request::Change::Reattach(false)) | None => {
                return Err(Status::invalid_argument(
                    "say what to change: a `budget`, or `reattach: true`",
                ));
            }
        };
        on_partition_leader!(self, hops, r, r.partition, set_isolation);
        let c = self
            .broker
            .set_group_isolation(&station, &r.group, r.partition, change)
            .await
            .map_err(to_status)?;
        Ok(Response::new(SetIsolationResponse {
            budget: Some(budget_proto(&c.budget)),
            detached_at_ms: c.detached_at_ms,
        }))
    }

    async fn resend_dead_letters(
        &self,
        req: Request<ResendDeadLettersRequest>,
    ) -> Result<Response<ResendDeadLettersResponse>, Status> {
        self.allow(&req, &req.get_ref().station, Operation::Manage)
            .await?;
        let r = req.into_inner();
        let station = parse(&r.station)?;
        let dls = dead_letter_station(&station.full());
        // Through this node's own broker service, in process: it routes the reads and the
        // appends to the partitions' leaders wherever they are.
        let mut next = r.from_offset;
        let mut resent = 0u64;
        loop {
            if r.to_offset != 0 && next >= r.to_offset {
                break;
            }
            let resp = self
                .routes
                .read(self.clients.node_request(ReadRequest {
                    station: dls.clone(),
                    partition: 0,
                    start: Some(read_request::Start::Offset(next)),
                    max_messages: 500,
                    max_bytes: 0,
                    local_replica: false,
                }))
                .await?
                .into_inner();
            if resp.messages.is_empty() {
                next = next.max(resp.next_offset);
                break;
            }
            let mut batch = Vec::new();
            for m in resp.messages {
                if r.to_offset != 0 && m.offset >= r.to_offset {
                    break;
                }
                next = m.offset + 1;
                let group = m
                    .headers
                    .iter()
                    .find(|h| h.key == dls_headers::GROUP)
                    .map(|h| String::from_utf8_lossy(&h.value).into_owned());
                if !r.group.is_empty() && group.as_deref() != Some(r.group.as_str()) {
                    continue;
                }
                batch.push(Message {
                    key: m.key,
                    headers: m
                        .headers
                        .into_iter()
                        .filter(|h| !h.key.starts_with("junction-dls-"))
                        .collect(),
                    payload: m.payload,
                    partition: None,
                    msg_id: None,
                });
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                self.routes
                    .produce(self.clients.node_request(ProduceRequest {
                        station: station.full(),
                        messages: batch,
                        request_id: 0,
                        producer: None,
                    }))
                    .await?;
                resent += n;
            }
        }
        Ok(Response::new(ResendDeadLettersResponse {
            resent,
            next_offset: next,
        }))
    }
}

/// Appends dead letters through this node's own broker service, in process (no network
/// call to itself): the service routes each append to the dead-letter station's leader
/// wherever it is.
pub struct InProcessDeadLetters {
    pub service: std::sync::Weak<BrokerService>,
    pub clients: Arc<ClientPool>,
}

impl DeadLetterSink for InProcessDeadLetters {
    fn append(
        &self,
        station: String,
        record: Record,
    ) -> futures::future::BoxFuture<'static, Result<(), BrokerError>> {
        let service = self.service.upgrade();
        let req = self.clients.node_request(ProduceRequest {
            station,
            messages: vec![Message {
                key: record.key,
                headers: record
                    .headers
                    .into_iter()
                    .map(|(key, value)| Header { key, value })
                    .collect(),
                payload: record.payload.into(),
                partition: Some(0),
                msg_id: None,
            }],
            request_id: 0,
            producer: None,
        });
        Box::pin(async move {
            let Some(service) = service else {
                return Err(BrokerError::Unavailable("the node is stopping".into()));
            };
            match tokio::time::timeout(DLS_TIMEOUT, service.produce(req)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err(BrokerError::Unavailable(format!(
                    "dead-letter append failed: {}",
                    s.message()
                ))),
                Err(_) => Err(BrokerError::Unavailable(
                    "dead-letter append timed out".into(),
                )),
            }
        })
    }
}
