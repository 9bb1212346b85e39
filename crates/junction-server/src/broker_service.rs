//! The `Broker` gRPC service: validate, route to the partition leader (here or by
//! forwarding), map the result.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use junction_broker::{Broker, BrokerError};
use junction_proto::v1::broker_server::Broker as BrokerApi;
use junction_proto::v1::read_request::Start;
use junction_proto::v1::{
    BatchError, Header, InitProducerRequest, InitProducerResponse, Message, ProduceRequest,
    ProduceResponse, ProducerFields, ReadRequest, ReadResponse, StartPosition, StoredMessage,
};
use junction_raft::peer_service::BoxStream;
use junction_types::exactly_once::{MAX_MSG_ID_BYTES, MSG_ID_HEADER, ProducerBatch};
use junction_types::partitioner::partition_for_key;
use junction_types::{GroupId, StationMeta, StationName, StoredRecord};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::{Authenticator, CREDENTIAL_RECHECK, allow_station, allow_tenant};
use crate::forward::{
    ClientPool, FORWARD_TIMEOUT, MAX_HOPS, forward_timed_out, forwarded, hops_of, with_hops,
};
use crate::produce_path::{
    Forwarders, Part, PartWait, Planned, apply_schema, complete, may_forward, record_of,
    split_invalid, too_many_hops,
};
use crate::status::to_status;
use junction_types::auth::{Operation, Principal};

const DEFAULT_MAX_MESSAGES: usize = 1000;
const DEFAULT_MAX_BYTES: usize = 4 << 20;
/// How long a follower waits for a partition to elect a leader before answering UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Batches with more payload bytes than this are validated against a schema on a blocking
/// thread rather than on an async worker.
const VALIDATE_INLINE_BYTES: usize = 256 << 10;

/// Serves produce and read calls. Cheap to clone (streams hand a clone to their task).
#[derive(Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
    clients: Arc<ClientPool>,
    pub(crate) auth: Arc<Authenticator>,
    /// Round-robin counter for unkeyed batches and replica choice.
    sticky: Arc<AtomicU32>,
}

impl BrokerService {
    pub fn new(broker: Arc<Broker>, clients: Arc<ClientPool>, auth: Arc<Authenticator>) -> Self {
        Self {
            broker,
            clients,
            auth,
            sticky: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Finds a station `who` may do `op` on in this node's metadata, waiting briefly for
    /// metadata that may lag the controller (a station created a moment ago through another
    /// node). Another tenant's station is not found, whether it exists or not.
    pub(crate) async fn station(
        &self,
        name: &str,
        who: &Principal,
        op: Operation,
    ) -> Result<StationMeta, Status> {
        let name = StationName::parse(name).map_err(|e| to_status(e.into()))?;
        allow_station(who, op, &name)?;
        if let Ok(s) = self.broker.station(&name) {
            return Ok(s);
        }
        let mut rx = self.broker.subscribe_metadata();
        let wait = async {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                if let Some(s) = rx.borrow_and_update().stations.get(&name.full()).cloned() {
                    return Some(s);
                }
            }
        };
        match tokio::time::timeout(Duration::from_millis(500), wait).await {
            Ok(Some(s)) => Ok(s),
            _ => Err(to_status(BrokerError::StationNotFound(name.full()))),
        }
    }

    /// Checks a producer's batch against this node's metadata, waiting briefly when the id is
    /// newer than the metadata (a producer initialised a moment ago through another node).
    async fn check_producer(&self, tenant: &str, p: &ProducerBatch) -> Result<(), Status> {
        let mut rx = self.broker.subscribe_metadata();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            match self.broker.check_producer(tenant, p) {
                Err(BrokerError::Unavailable(msg)) => {
                    let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return Err(to_status(BrokerError::Unavailable(msg)));
                    }
                }
                other => return other.map_err(to_status),
            }
        }
    }

    /// Returns where to send a call for `group`: `None` when this node leads it, otherwise the
    /// address of the leader (or of a replica that will know it).
    pub(crate) async fn route(
        &self,
        group: GroupId,
        replicas: &[u64],
    ) -> Result<Option<String>, Status> {
        let me = self.broker.node_id();
        if let Some(r) = self.broker.partition(group) {
            let deadline = tokio::time::Instant::now() + LEADER_WAIT;
            loop {
                match r.leader() {
                    Some(l) if l == me => return Ok(None),
                    Some(l) => {
                        return self.broker.addr_of(l).map(Some).ok_or_else(|| {
                            Status::unavailable(format!("no address known for node {l}"))
                        });
                    }
                    None if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None => {
                        return Err(Status::unavailable(format!(
                            "partition group {group} has no leader yet; retry shortly"
                        )));
                    }
                }
            }
        }
        // Not a replica here: any live replica knows the leader and forwards once more.
        let addrs = self.broker.node_addrs();
        let pick = self.sticky.fetch_add(1, Ordering::Relaxed) as usize;
        let candidates: Vec<&String> = replicas.iter().filter_map(|r| addrs.get(r)).collect();
        if candidates.is_empty() {
            return Err(Status::unavailable(format!(
                "no replica address known for group {group}"
            )));
        }
        Ok(Some(candidates[pick % candidates.len()].clone()))
    }

    /// Validates a batch and splits it by partition. `trace` (the caller's W3C
    /// `traceparent`) is stored with every message that carries none of its own.
    async fn plan(
        &self,
        req: ProduceRequest,
        who: &Principal,
        trace: Option<&str>,
    ) -> Result<Planned, Status> {
        if req.messages.is_empty() {
            return Err(Status::invalid_argument(
                "empty batch: a produce request needs at least one message",
            ));
        }
        let station = self.station(&req.station, who, Operation::Produce).await?;
        if let Some(p) = &req.producer {
            self.check_producer(&station.tenant, &producer_batch(p))
                .await?;
        }
        let partitions = station.partitions.len() as u32;
        let max = station.max_message_bytes as usize;
        let sticky = self.sticky.fetch_add(1, Ordering::Relaxed) % partitions.max(1);
        let mut by_partition: BTreeMap<u32, Part> = BTreeMap::new();
        let total = req.messages.len();
        for (i, mut m) in req.messages.into_iter().enumerate() {
            move_msg_id(&mut m)?;
            if let Some(t) = trace
                && !m.headers.iter().any(|h| h.key == TRACEPARENT)
            {
                m.headers.push(Header {
                    key: TRACEPARENT.to_string(),
                    value: t.as_bytes().to_vec(),
                });
            }
            let size = m.key.as_ref().map_or(0, Vec::len)
                + m.headers
                    .iter()
                    .map(|h| h.key.len() + h.value.len())
                    .sum::<usize>()
                + m.payload.len();
            if size > max {
                return Err(to_status(BrokerError::MessageTooLarge { size, max }));
            }
            let p = match (m.partition, &m.key) {
                (Some(p), _) if p >= partitions => {
                    return Err(to_status(BrokerError::PartitionOutOfRange {
                        station: station.full_name(),
                        partition: p,
                        partitions,
                    }));
                }
                (Some(p), _) => p,
                (None, Some(k)) => partition_for_key(k, partitions),
                (None, None) => sticky,
            };
            m.partition = Some(p);
            let part = by_partition.entry(p).or_insert_with(|| Part {
                partition: p,
                producer: req.producer,
                idx: vec![],
                msgs: vec![],
                bytes: 0,
                invalid: vec![],
            });
            part.bytes += size as u64;
            part.idx.push(i);
            part.msgs.push(m);
        }
        if req.producer.is_some() && by_partition.len() > 1 {
            return Err(Status::invalid_argument(format!(
                "an idempotent producer's batch must go to one partition (this one spans {}: {:?}); its sequence numbers count per partition, so split the batch by partition",
                by_partition.len(),
                by_partition.keys().collect::<Vec<_>>()
            )));
        }
        let mut parts: Vec<Part> = by_partition.into_values().collect();
        if let Some(schema) = self
            .broker
            .station_schema(&station.full_name())
            .map_err(to_status)?
        {
            let payload: usize = parts
                .iter()
                .flat_map(|p| &p.msgs)
                .map(|m| m.payload.len())
                .sum();
            if payload > VALIDATE_INLINE_BYTES {
                // A large batch is validated off the async workers.
                parts = tokio::task::spawn_blocking(move || {
                    apply_schema(&schema, &mut parts).map(|()| parts)
                })
                .await
                .map_err(|e| Status::internal(format!("schema validation stopped: {e}")))?
                .map_err(to_status)?;
            } else {
                apply_schema(&schema, &mut parts).map_err(to_status)?;
            }
        }
        Ok(Planned {
            station,
            parts,
            total,
        })
    }

    /// Starts every part of a planned batch, in order: queued on the local group-commit loop,
    /// written to an ordered forward stream (`fwd`), or sent as a unary call (no `fwd`).
    /// Returns the waits; their completion does not affect the order any more.
    async fn dispatch(
        &self,
        planned: Planned,
        hops: u32,
        mut fwd: Option<&mut Forwarders>,
    ) -> Result<Vec<PartWait>, Status> {
        let mut waits = Vec::with_capacity(planned.parts.len());
        let full = planned.station.full_name();
        for part in planned.parts {
            let meta = &planned.station.partitions[part.partition as usize];
            let n = part.msgs.len() as u64;
            match self.route(meta.group_id, &meta.replicas).await? {
                None => {
                    // Quotas are held where the data is: here, the partition's leader (and
                    // before any conversion, so a refusal costs little).
                    let charge = self
                        .broker
                        .admit_produce(&planned.station, n, part.bytes)
                        .map_err(to_status)?;
                    metrics::counter!("junction_produce_bytes_total", "tenant" => planned.station.tenant.clone())
                        .increment(part.bytes);
                    let (partition, producer) = (part.partition, part.producer);
                    let (msgs, idx, dead, dead_idx) = split_invalid(&full, part);
                    // Dead letters first: if they cannot be stored, nothing is, and the
                    // producer's retry starts over.
                    let span = (!dead.is_empty())
                        .then(|| u32::try_from(msgs.len() + dead.len()).unwrap_or(u32::MAX));
                    if !dead.is_empty() {
                        metrics::counter!("junction_schema_dead_letters_total", "tenant" => planned.station.tenant.clone())
                            .increment(dead.len() as u64);
                        self.broker
                            .append_dead_letters(&full, dead)
                            .await
                            .map_err(to_status)?;
                    }
                    let records: Vec<_> = msgs.into_iter().map(record_of).collect();
                    let n = records.len() as u64;
                    let rx = if records.is_empty() && producer.is_none() {
                        // Every message went to the dead-letter station.
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let _ = tx.send(Ok(junction_broker::Appended {
                            base_offset: 0,
                            timestamp_ms: 0,
                            dups: vec![],
                            duplicate: false,
                        }));
                        rx
                    } else {
                        self.broker
                            .enqueue_append(
                                meta.group_id,
                                records,
                                producer.as_ref().map(producer_batch),
                                span,
                            )
                            .await
                            .map_err(to_status)?
                    };
                    waits.push(PartWait::Local {
                        part: partition,
                        idx,
                        n,
                        rx,
                        charge,
                        dead: dead_idx,
                        span: tracing::info_span!(
                            target: crate::telemetry::SPANS,
                            "append",
                            station = %full,
                            partition,
                            group = meta.group_id,
                            messages = n,
                        ),
                    });
                }
                Some(_) if !may_forward(hops) => {
                    return Err(too_many_hops(&planned.station, part.partition));
                }
                Some(addr) => match fwd.as_deref_mut() {
                    Some(f) => {
                        let sent = f
                            .send(&addr, full.clone(), part.msgs, part.producer, hops)
                            .await?;
                        waits.push(PartWait::Remote {
                            part: part.partition,
                            idx: part.idx,
                            sent,
                        });
                    }
                    None => {
                        let mut client = self.clients.broker(&addr)?;
                        let req = ProduceRequest {
                            station: full.clone(),
                            messages: part.msgs,
                            request_id: 0,
                            producer: part.producer,
                        };
                        let span = tracing::info_span!(
                            target: crate::telemetry::SPANS,
                            "forward",
                            station = %full,
                            partition = part.partition,
                            leader = %addr,
                            messages = n,
                        );
                        let fut = async move {
                            let mut req = with_hops(req, hops + 1);
                            req.set_timeout(FORWARD_TIMEOUT);
                            match tokio::time::timeout(FORWARD_TIMEOUT, client.produce(req)).await {
                                Ok(r) => Ok(r.map_err(forwarded)?.into_inner()),
                                Err(_) => Err(forward_timed_out(&addr)),
                            }
                        };
                        waits.push(PartWait::Unary {
                            part: part.partition,
                            idx: part.idx,
                            fut: Box::pin(tracing::Instrument::instrument(fut, span)),
                        });
                    }
                },
            }
        }
        Ok(waits)
    }

    /// A unary read: refused with THROTTLED while the tenant is over its consume rate.
    async fn read_checked(
        &self,
        req: &ReadRequest,
        station: &StationMeta,
        group: GroupId,
    ) -> Result<ReadResponse, Status> {
        self.broker
            .check_consume(&station.tenant, &station.name)
            .map_err(to_status)?;
        self.read_local(req, station, group).await
    }

    async fn read_local(
        &self,
        req: &ReadRequest,
        station: &StationMeta,
        group: GroupId,
    ) -> Result<ReadResponse, Status> {
        let replica = self.broker.partition(group).ok_or_else(|| {
            to_status(BrokerError::NotHosted {
                node: self.broker.node_id(),
                group,
            })
        })?;
        let state = replica.shared.current();
        let from = match req.start {
            Some(Start::Offset(o)) => {
                if o > state.next_offset {
                    return Err(Status::out_of_range(format!(
                        "offset {o} is beyond the end of partition {} (next offset {})",
                        req.partition, state.next_offset
                    )));
                }
                o
            }
            Some(Start::Position(p)) if p == StartPosition::Latest as i32 => state.next_offset,
            Some(Start::Position(_)) | None => state.start_offset,
            Some(Start::TimestampMs(ts)) => {
                self.broker.offset_for_time(group, ts).map_err(to_status)?
            }
        };
        let max_messages = if req.max_messages == 0 {
            DEFAULT_MAX_MESSAGES
        } else {
            req.max_messages as usize
        };
        let max_bytes = if req.max_bytes == 0 {
            DEFAULT_MAX_BYTES
        } else {
            req.max_bytes as usize
        };
        let (raw, state) = self
            .broker
            .read(group, from, max_messages, max_bytes)
            .await
            .map_err(to_status)?;
        let read_bytes: u64 = raw.iter().map(|(_, b)| b.len() as u64).sum();
        self.broker
            .charge_consume(&station.tenant, &station.name, read_bytes);
        metrics::counter!("junction_read_bytes_total", "tenant" => station.tenant.clone())
            .increment(read_bytes);
        let mut messages = Vec::with_capacity(raw.len());
        for (offset, bytes) in raw {
            let r = junction_raft::format::decode_record_ref(&bytes).map_err(|e| match e {
                junction_raft::RaftStoreError::Corrupt { detail, .. } => {
                    metrics::counter!("junction_corrupt_records_total").increment(1);
                    tracing::error!(
                        station = %req.station,
                        partition = req.partition,
                        offset,
                        %detail,
                        "a stored record failed its checksum on this node"
                    );
                    self.broker.corruption_found(group);
                    to_status(BrokerError::CorruptRecord {
                        node: self.broker.node_id(),
                        partition: req.partition,
                        offset,
                        detail,
                    })
                }
                e => Status::data_loss(format!("partition {} offset {offset}: {e}", req.partition)),
            })?;
            // The payload is handed on as a slice of the stored bytes (from a tail window,
            // shared with it): no copy.
            messages.push(StoredMessage {
                partition: req.partition,
                offset,
                timestamp_ms: r.timestamp_ms,
                key: r.key.map(<[u8]>::to_vec),
                headers: r
                    .headers
                    .into_iter()
                    .map(|(key, value)| Header {
                        key: key.to_owned(),
                        value: value.to_vec(),
                    })
                    .collect(),
                payload: bytes.slice_ref(r.payload),
            });
        }
        // Nothing stored from `from` to the end (compaction holes): continue at the end.
        let next_offset = messages
            .last()
            .map_or(from.max(state.start_offset).max(state.next_offset), |m| {
                m.offset + 1
            });
        metrics::counter!("junction_read_messages_total", "tenant" => station.tenant.clone())
            .increment(messages.len() as u64);
        Ok(ReadResponse {
            messages,
            next_offset,
            high_watermark: state.next_offset,
            start_offset: state.start_offset,
            below_start: from < state.start_offset,
        })
    }

    fn partition_of<'a>(
        &self,
        station: &'a StationMeta,
        p: u32,
    ) -> Result<&'a junction_types::PartitionMeta, Status> {
        station.partitions.get(p as usize).ok_or_else(|| {
            to_status(BrokerError::PartitionOutOfRange {
                station: station.full_name(),
                partition: p,
                partitions: station.partitions.len() as u32,
            })
        })
    }
}

pub(crate) fn stored_message(partition: u32, offset: u64, r: StoredRecord) -> StoredMessage {
    StoredMessage {
        partition,
        offset,
        timestamp_ms: r.timestamp_ms,
        key: r.key,
        headers: r
            .headers
            .into_iter()
            .map(|(key, value)| Header { key, value })
            .collect(),
        payload: r.payload.into(),
    }
}

#[tonic::async_trait]
impl BrokerApi for BrokerService {
    async fn produce(
        &self,
        req: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let trace = traceparent(req.metadata());
        let req = req.into_inner();
        let request_id = req.request_id;
        let mut tenant = who.tenant.clone();
        let positions = async {
            let planned = self.plan(req, &who, trace.as_deref()).await?;
            tenant.clone_from(&planned.station.tenant);
            let total = planned.total;
            let waits = self.dispatch(planned, hops, None).await?;
            complete(total, waits).await
        }
        .await
        .inspect_err(|s| count_error(&tenant, s))?;
        metrics::counter!("junction_produce_messages_total", "tenant" => tenant)
            .increment(positions.len() as u64);
        Ok(Response::new(ProduceResponse {
            request_id,
            positions,
            error: None,
        }))
    }

    async fn init_producer(
        &self,
        req: Request<InitProducerRequest>,
    ) -> Result<Response<InitProducerResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let tenant = if r.tenant.is_empty() {
            junction_types::DEFAULT_TENANT.to_string()
        } else {
            r.tenant.clone()
        };
        allow_tenant(&who, Operation::Produce, &tenant)?;
        match self.broker.ensure_controller() {
            Ok(()) => {}
            Err(BrokerError::NotLeader {
                leader: Some((_, addr)),
                ..
            }) if hops < MAX_HOPS => {
                return self
                    .clients
                    .broker(&addr)?
                    .init_producer(with_hops(r, hops + 1))
                    .await
                    .map_err(forwarded);
            }
            Err(e) => return Err(to_status(e)),
        }
        let p = self
            .broker
            .init_producer(&tenant, r.producer_name.as_deref())
            .await
            .map_err(to_status)?;
        Ok(Response::new(InitProducerResponse {
            producer_id: p.id,
            epoch: p.epoch,
        }))
    }

    type ProduceStreamStream = BoxStream<ProduceResponse>;

    async fn produce_stream(
        &self,
        req: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        // Counted against the tenant's streams where the client holds it (not again where it
        // is forwarded to).
        let permit = if hops == 0 {
            Some(self.broker.open_stream(&who.tenant).map_err(to_status)?)
        } else {
            None
        };
        let trace = traceparent(req.metadata());
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ProduceResponse, Status>>(256);
        let svc = self.clone();
        let shutdown = self.broker.shutdown_token();
        tokio::spawn(async move {
            let _permit = permit;
            // Each batch is planned and dispatched in arrival order (which fixes its place in
            // every partition's log); the replies go out as batches complete.
            let mut forwarders = Forwarders::new(svc.clients.clone());
            let mut running = futures::stream::FuturesUnordered::new();
            loop {
                tokio::select! {
                    // The node stops: answer what is running, then end the stream (the client
                    // sends the rest elsewhere) instead of holding the node open.
                    () = shutdown.cancelled() => break,
                    next = input.next() => match next {
                        Some(Ok(batch)) => {
                            let id = batch.request_id;
                            // A key revoked or expired while the stream is open ends it.
                            if let Err(s) = svc.auth.still_valid(&who) {
                                let _ = tx.send(Err(s)).await;
                                break;
                            }
                            let mut tenant = who.tenant.clone();
                            let started = async {
                                let planned = svc.plan(batch, &who, trace.as_deref()).await?;
                                tenant.clone_from(&planned.station.tenant);
                                let total = planned.total;
                                Ok::<_, Status>((total, svc.dispatch(planned, hops, Some(&mut forwarders)).await?))
                            }
                            .await;
                            running.push(async move {
                                let result = match started {
                                    Ok((total, waits)) => complete(total, waits).await,
                                    Err(s) => Err(s),
                                };
                                match result.inspect_err(|s| count_error(&tenant, s)) {
                                    Ok(positions) => {
                                        metrics::counter!("junction_produce_messages_total", "tenant" => tenant).increment(positions.len() as u64);
                                        ProduceResponse { request_id: id, positions, error: None }
                                    }
                                    Err(s) => ProduceResponse { request_id: id, positions: vec![], error: Some(batch_error(&s)) },
                                }
                            });
                        }
                        Some(Err(_)) | None => break,
                    },
                    Some(resp) = running.next(), if !running.is_empty() => {
                        if tx.send(Ok(resp)).await.is_err() { return; }
                    }
                }
            }
            while let Some(resp) = running.next().await {
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let req = req.into_inner();
        let station = self.station(&req.station, &who, Operation::Read).await?;
        let part = self.partition_of(&station, req.partition)?;
        if req.local_replica {
            if self.broker.partition(part.group_id).is_none() {
                return Err(Status::failed_precondition(format!(
                    "node {} holds no replica of partition {} of {}",
                    self.broker.node_id(),
                    req.partition,
                    station.full_name()
                )));
            }
            return Ok(Response::new(
                self.read_checked(&req, &station, part.group_id).await?,
            ));
        }
        match self.route(part.group_id, &part.replicas).await? {
            None => Ok(Response::new(
                self.read_checked(&req, &station, part.group_id).await?,
            )),
            Some(addr) => {
                if hops >= MAX_HOPS {
                    return Err(Status::unavailable("partition leadership is moving; retry"));
                }
                let mut client = self.clients.broker(&addr)?;
                let mut req = with_hops(req, hops + 1);
                req.set_timeout(FORWARD_TIMEOUT);
                match tokio::time::timeout(FORWARD_TIMEOUT, client.read(req)).await {
                    Ok(r) => r.map_err(forwarded),
                    Err(_) => Err(forward_timed_out(&addr)),
                }
            }
        }
    }

    type TailStream = BoxStream<ReadResponse>;

    async fn tail(&self, req: Request<ReadRequest>) -> Result<Response<Self::TailStream>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let req = req.into_inner();
        let station = self.station(&req.station, &who, Operation::Read).await?;
        let part = self.partition_of(&station, req.partition)?.clone();
        // A stream of the tenant's, counted on the node the client holds it on (not again
        // where it is forwarded to).
        let permit = if hops == 0 {
            Some(
                self.broker
                    .open_stream(&station.tenant)
                    .map_err(to_status)?,
            )
        } else {
            None
        };
        // Any replica can serve a tail: it only ever holds committed messages.
        let Some(replica) = self.broker.partition(part.group_id) else {
            let addr = self
                .route(part.group_id, &part.replicas)
                .await?
                .ok_or_else(|| {
                    Status::unavailable("partition replica is not ready on this node yet; retry")
                })?;
            if hops >= MAX_HOPS {
                return Err(Status::unavailable("partition leadership is moving; retry"));
            }
            let mut client = self.clients.broker(&addr)?;
            let remote = client
                .tail(with_hops(req, hops + 1))
                .await
                .map_err(forwarded)?
                .into_inner();
            // The permit lives as long as the forwarded stream.
            let remote = remote.map(move |r| {
                let _held = &permit;
                r
            });
            return Ok(Response::new(Box::pin(remote)));
        };
        let state = replica.shared.current();
        let first = match req.start {
            // A follower that lags behind the offset the client already reached waits for it
            // instead of failing; only the leader knows an offset is truly past the end.
            Some(Start::Offset(o))
                if o > state.next_offset && replica.leader() != Some(self.broker.node_id()) =>
            {
                ReadResponse {
                    messages: vec![],
                    next_offset: o,
                    high_watermark: state.next_offset,
                    start_offset: state.start_offset,
                    below_start: false,
                }
            }
            _ => self.read_local(&req, &station, part.group_id).await?,
        };
        let (tx, rx) = mpsc::channel::<Result<ReadResponse, Status>>(16);
        let svc = self.clone();
        let mut watch = replica.shared.subscribe();
        let shutdown = self.broker.shutdown_token();
        tokio::spawn(async move {
            let _permit = permit;
            let mut next = first.next_offset;
            // A lagging follower gets a while to reach an offset the client already had; an
            // offset that never arrives is past the end everywhere.
            let mut catch_up = (next > watch.borrow().next_offset)
                .then(|| tokio::time::Instant::now() + Duration::from_secs(5));
            let mut resp = first;
            loop {
                if !resp.messages.is_empty() && tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                // Wait for new commits, the client leaving, or shutdown.
                loop {
                    let end = watch.borrow_and_update().next_offset;
                    if end >= next {
                        catch_up = None;
                    }
                    if end > next {
                        break;
                    }
                    let catch_up_at = catch_up.unwrap_or_else(tokio::time::Instant::now);
                    tokio::select! {
                        _ = tokio::time::sleep_until(catch_up_at), if catch_up.is_some() => {
                            let _ = tx.send(Err(Status::out_of_range(format!(
                                "offset {next} is beyond the end of partition {} (this replica has {end} messages and did not catch up within 5 s)",
                                req.partition
                            )))).await;
                            return;
                        },
                        changed = watch.changed() => if changed.is_err() {
                            let _ = tx.send(Err(Status::unavailable("the partition replica stopped; resume elsewhere"))).await;
                            return;
                        },
                        _ = tx.closed() => return,
                        _ = shutdown.cancelled() => {
                            let _ = tx.send(Err(Status::unavailable("node shutting down; resume elsewhere"))).await;
                            return;
                        }
                        // An idle tail still ends soon after its key is revoked or expires.
                        () = tokio::time::sleep(CREDENTIAL_RECHECK), if who.can_lapse() => {
                            if let Err(s) = svc.auth.still_valid(&who) {
                                let _ = tx.send(Err(s)).await;
                                return;
                            }
                        }
                    }
                }
                if let Err(s) = svc.auth.still_valid(&who) {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
                let mut r = req.clone();
                r.start = Some(Start::Offset(next));
                // Over the tenant's consume rate: the tail slows down instead of failing.
                while let Err(junction_broker::BrokerError::Throttled { retry_after_ms, .. }) =
                    svc.broker.check_consume(&station.tenant, &station.name)
                {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(retry_after_ms)) => {}
                        _ = tx.closed() => return,
                        _ = shutdown.cancelled() => return,
                    }
                }
                resp = match svc.read_local(&r, &station, part.group_id).await {
                    Ok(resp) => resp,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                next = resp.next_offset;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Converts a request's producer fields.
fn producer_batch(p: &ProducerFields) -> ProducerBatch {
    ProducerBatch {
        id: p.producer_id,
        epoch: p.epoch,
        base_sequence: p.base_sequence,
    }
}

/// The W3C trace context header: taken from a produce call's metadata and stored as a
/// header of each message that has none, so consumers continue the producer's trace.
pub const TRACEPARENT: &str = "traceparent";

/// The caller's `traceparent`, when it is well formed (`00-<32 hex>-<16 hex>-<2 hex>`, ids
/// not all zero); anything else is ignored, as W3C Trace Context asks.
pub fn traceparent(md: &tonic::metadata::MetadataMap) -> Option<String> {
    let v = md.get(TRACEPARENT)?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    match parts.as_slice() {
        [version, trace, span, flags]
            if hex(version, 2)
                && *version != "ff"
                && hex(trace, 32)
                && nonzero(trace)
                && hex(span, 16)
                && nonzero(span)
                && hex(flags, 2) =>
        {
            Some(v.to_owned())
        }
        _ => None,
    }
}

/// Moves a message's `msg_id` field into its `junction-msg-id` header (where it is stored),
/// checking its length; a header and a field that disagree are refused.
fn move_msg_id(m: &mut Message) -> Result<(), Status> {
    if let Some(id) = m.msg_id.take() {
        match m.headers.iter().find(|h| h.key == MSG_ID_HEADER) {
            Some(h) if h.value != id.as_bytes() => {
                return Err(Status::invalid_argument(
                    "a message has both a msg_id and a different junction-msg-id header; send one of them",
                ));
            }
            Some(_) => {}
            None => m.headers.push(Header {
                key: MSG_ID_HEADER.to_string(),
                value: id.into_bytes(),
            }),
        }
    }
    if let Some(h) = m.headers.iter().find(|h| h.key == MSG_ID_HEADER)
        && (h.value.is_empty() || h.value.len() > MAX_MSG_ID_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "a message id must be 1 to {MAX_MSG_ID_BYTES} bytes (got {} bytes)",
            h.value.len()
        )));
    }
    Ok(())
}

fn count_error(tenant: &str, s: &Status) {
    metrics::counter!(
        "junction_produce_errors_total",
        "tenant" => tenant.to_string(),
        "code" => format!("{:?}", s.code())
    )
    .increment(1);
}

fn batch_error(s: &Status) -> BatchError {
    use tonic_types::StatusExt;
    let leader_addr = s
        .get_details_error_info()
        .and_then(|i| i.metadata.get("leader_addr").cloned())
        .unwrap_or_default();
    BatchError {
        code: s.code() as i32,
        message: s.message().to_string(),
        leader_addr,
        details: s.details().to_vec(),
    }
}

/// Whether a status means "try again" (used by tests and forwarding).
pub fn is_retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_taken() {
        let of = |v: &str| {
            let mut md = tonic::metadata::MetadataMap::new();
            if let Ok(v) = v.parse() {
                md.insert(TRACEPARENT, v);
            }
            traceparent(&md)
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(of(good).as_deref(), Some(good));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(of(bad), None, "{bad}");
        }
        assert_eq!(traceparent(&tonic::metadata::MetadataMap::new()), None);
    }
}
