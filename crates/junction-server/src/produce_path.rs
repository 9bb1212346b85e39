//! The produce path: plan a batch (validate, pick partitions), then dispatch its parts in
//! order — to the local group-commit queue, or to the leader's node.
//!
//! Order is fixed at dispatch: a part is queued locally, or written to an ordered forward
//! stream, before the next batch is looked at. So batches pipelined on one client stream keep
//! their order per partition whether or not this node leads the partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use futures::future::BoxFuture;
use junction_broker::delivery::dls_headers;
use junction_broker::quota::ProduceCharge;
use junction_broker::schemas::{InvalidMessage, StationSchema};
use junction_broker::{Appended, BrokerError};
use junction_proto::v1::{
    Header, Message, MessagePosition, ProduceRequest, ProduceResponse, ProducerFields,
};
use junction_types::schema::{OnInvalid, SCHEMA_HEADER};
use junction_types::{Record, StationMeta};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::forward::{
    ClientPool, FORWARD_TIMEOUT, HOPS_HEADER, MAX_HOPS, forward_timed_out, forwarded, with_hops,
};
use crate::status::to_status;

/// One partition's share of a batch.
pub struct Part {
    pub partition: u32,
    /// An idempotent producer's fields (its batches go to one partition).
    pub producer: Option<ProducerFields>,
    /// Positions of these messages in the request.
    pub idx: Vec<usize>,
    pub msgs: Vec<Message>,
    /// Message bytes (key, headers, payload) of `msgs`, as quotas count them.
    pub bytes: u64,
    /// Messages (position in `msgs`) the station's schema refused, under `dead_letter`: the
    /// partition's leader sends them to the dead-letter station instead of storing them.
    pub invalid: Vec<(usize, InvalidMessage)>,
}

/// A validated batch split by partition.
pub struct Planned {
    pub station: StationMeta,
    pub parts: Vec<Part>,
    pub total: usize,
}

/// How one dispatched part completes.
pub enum PartWait {
    Local {
        part: u32,
        idx: Vec<usize>,
        n: u64,
        rx: oneshot::Receiver<Result<Appended, BrokerError>>,
        /// The produce's charge to stored-bytes quotas, settled when the wait ends.
        charge: ProduceCharge,
        /// Request positions of messages sent to the dead-letter station.
        dead: Vec<usize>,
        /// Covers the wait for the commit (see [`crate::telemetry`]).
        span: tracing::Span,
    },
    Remote {
        part: u32,
        idx: Vec<usize>,
        sent: Sent,
    },
    Unary {
        part: u32,
        idx: Vec<usize>,
        fut: BoxFuture<'static, Result<ProduceResponse, Status>>,
    },
}

/// Waits for every part and assembles the positions in request order.
pub async fn complete(total: usize, waits: Vec<PartWait>) -> Result<Vec<MessagePosition>, Status> {
    let mut positions = vec![MessagePosition::default(); total];
    let results = futures::future::join_all(waits.into_iter().map(|w| async move {
        match w {
            PartWait::Local {
                part,
                idx,
                n,
                rx,
                charge,
                dead,
                span,
            } => {
                let a = tracing::Instrument::instrument(rx, span).await;
                drop(charge);
                let a = a
                    .map_err(|_| {
                        Status::unavailable("the partition stopped; the outcome is unknown")
                    })?
                    .map_err(to_status)?;
                let count = u32::try_from(n).unwrap_or(u32::MAX);
                let stored = a
                    .positions(count)
                    .into_iter()
                    .map(|(offset, duplicate)| Placed {
                        offset,
                        duplicate,
                        dead_lettered: false,
                    });
                let dead_lettered = (0..dead.len()).map(|_| Placed {
                    offset: 0,
                    duplicate: false,
                    dead_lettered: true,
                });
                let idx = idx.into_iter().chain(dead).collect();
                Ok::<_, Status>((part, idx, stored.chain(dead_lettered).collect()))
            }
            PartWait::Remote { part, idx, sent } => {
                let resp = match tokio::time::timeout(FORWARD_TIMEOUT, sent.rx).await {
                    Ok(r) => r.map_err(|_| {
                        Status::unavailable("forward stream closed; outcome unknown")
                    })??,
                    Err(_) => {
                        // The leader stopped answering: later batches must not ride the same
                        // stream, they go to a fresh one (or another leader).
                        sent.alive.store(false, Ordering::Release);
                        return Err(forward_timed_out(&sent.addr));
                    }
                };
                Ok((part, idx, offsets_of(resp)?))
            }
            PartWait::Unary { part, idx, fut } => Ok((part, idx, offsets_of(fut.await?)?)),
        }
    }))
    .await;
    for r in results {
        let (part, idx, placed): (u32, Vec<usize>, Vec<Placed>) = r?;
        if placed.len() != idx.len() {
            return Err(Status::internal(
                "the leader returned a different number of positions",
            ));
        }
        for (i, p) in idx.into_iter().zip(placed) {
            positions[i] = MessagePosition {
                partition: if p.dead_lettered { 0 } else { part },
                offset: p.offset,
                duplicate: p.duplicate,
                dead_lettered: p.dead_lettered,
            };
        }
    }
    Ok(positions)
}

/// Where one message of a part went.
struct Placed {
    offset: u64,
    duplicate: bool,
    dead_lettered: bool,
}

fn offsets_of(resp: ProduceResponse) -> Result<Vec<Placed>, Status> {
    if let Some(e) = resp.error {
        return Err(forwarded(Status::with_details(
            tonic::Code::from_i32(e.code),
            e.message,
            e.details.into(),
        )));
    }
    Ok(resp
        .positions
        .into_iter()
        .map(|p| Placed {
            offset: p.offset,
            duplicate: p.duplicate,
            dead_lettered: p.dead_lettered,
        })
        .collect())
}

/// Validates every message of a planned batch against the station's schema. Valid messages
/// get the schema header (`name@version`; a header of that name sent by the client is
/// replaced). Under `reject` the first invalid message fails the batch; under `dead_letter`
/// invalid messages are marked in their part.
pub fn apply_schema(schema: &StationSchema, parts: &mut [Part]) -> Result<(), BrokerError> {
    let label = schema.label();
    for part in parts.iter_mut() {
        for (pos, m) in part.msgs.iter_mut().enumerate() {
            m.headers.retain(|h| h.key != SCHEMA_HEADER);
            match schema.validate(part.idx[pos], &m.payload) {
                Ok(()) => m.headers.push(Header {
                    key: SCHEMA_HEADER.to_owned(),
                    value: label.clone().into_bytes(),
                }),
                Err(invalid) => match schema.binding.on_invalid {
                    OnInvalid::Reject => return Err(BrokerError::InvalidMessage(invalid)),
                    OnInvalid::DeadLetter => part.invalid.push((pos, invalid)),
                },
            }
        }
    }
    Ok(())
}

/// Splits a part's messages into those to store and the dead letters (with the reason and
/// the station in headers); returns (stored messages, their request positions, dead letters,
/// their request positions).
pub fn split_invalid(
    station: &str,
    part: Part,
) -> (Vec<Message>, Vec<usize>, Vec<Record>, Vec<usize>) {
    if part.invalid.is_empty() {
        // The usual case: everything is stored, nothing is copied.
        return (part.msgs, part.idx, vec![], vec![]);
    }
    let mut reasons: HashMap<usize, String> = part
        .invalid
        .into_iter()
        .map(|(pos, inv)| (pos, inv.to_string()))
        .collect();
    let (mut keep, mut keep_idx, mut dead, mut dead_idx) = (vec![], vec![], vec![], vec![]);
    for (pos, (m, i)) in part.msgs.into_iter().zip(part.idx).enumerate() {
        match reasons.remove(&pos) {
            None => {
                keep.push(m);
                keep_idx.push(i);
            }
            Some(reason) => {
                let mut r = record_of(m);
                r.headers
                    .push((dls_headers::REASON.to_owned(), reason.into_bytes()));
                r.headers
                    .push((dls_headers::STATION.to_owned(), station.as_bytes().to_vec()));
                r.headers.push((
                    dls_headers::PARTITION.to_owned(),
                    part.partition.to_string().into_bytes(),
                ));
                dead.push(r);
                dead_idx.push(i);
            }
        }
    }
    (keep, keep_idx, dead, dead_idx)
}

/// Converts a wire message to a record.
pub fn record_of(m: Message) -> Record {
    Record {
        key: m.key,
        headers: m.headers.into_iter().map(|h| (h.key, h.value)).collect(),
        payload: m.payload.to_vec(),
    }
}

/// Returns the error for a call that has been forwarded too often.
pub fn too_many_hops(station: &StationMeta, p: u32) -> Status {
    Status::unavailable(format!(
        "partition {p} of {} is moving between leaders; retry",
        station.full_name()
    ))
}

/// A batch written to a forward stream.
pub struct Sent {
    /// The leader's reply.
    pub rx: oneshot::Receiver<Result<ProduceResponse, Status>>,
    /// Cleared to retire the stream.
    alive: Arc<AtomicBool>,
    addr: String,
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ProduceResponse, Status>>>>>;

struct ForwardStream {
    tx: mpsc::Sender<ProduceRequest>,
    waiters: Waiters,
    alive: Arc<AtomicBool>,
}

/// Ordered forward streams of one client stream, one per leader node.
pub struct Forwarders {
    clients: Arc<ClientPool>,
    streams: HashMap<String, ForwardStream>,
    next_id: u64,
}

impl Forwarders {
    pub fn new(clients: Arc<ClientPool>) -> Self {
        Self {
            clients,
            streams: HashMap::new(),
            next_id: 0,
        }
    }

    /// Writes `msgs` to the forward stream to `addr` (opening it if needed) and returns the
    /// receiver of the leader's reply.
    pub async fn send(
        &mut self,
        addr: &str,
        station: String,
        msgs: Vec<Message>,
        producer: Option<ProducerFields>,
        hops: u32,
    ) -> Result<Sent, Status> {
        let usable = self
            .streams
            .get(addr)
            .is_some_and(|s| s.alive.load(Ordering::Acquire));
        if !usable {
            let s = self.open(addr, hops).await?;
            self.streams.insert(addr.to_string(), s);
        }
        let stream = self
            .streams
            .get(addr)
            .ok_or_else(|| Status::internal("forward stream vanished"))?;
        self.next_id += 1;
        let id = self.next_id;
        let (tx, rx) = oneshot::channel();
        stream.waiters.lock().insert(id, tx);
        let req = ProduceRequest {
            station,
            messages: msgs,
            request_id: id,
            producer,
        };
        if stream.tx.send(req).await.is_err() {
            stream.alive.store(false, Ordering::Release);
            stream.waiters.lock().remove(&id);
            return Err(Status::unavailable(
                "forward stream to the partition leader closed; retry",
            ));
        }
        Ok(Sent {
            rx,
            alive: stream.alive.clone(),
            addr: addr.to_string(),
        })
    }

    async fn open(&self, addr: &str, hops: u32) -> Result<ForwardStream, Status> {
        let (tx, rx) = mpsc::channel::<ProduceRequest>(256);
        let mut client = self.clients.broker(addr)?;
        let mut req = with_hops(tokio_stream::wrappers::ReceiverStream::new(rx), hops + 1);
        debug_assert!(req.metadata().contains_key(HOPS_HEADER));
        req.set_timeout(std::time::Duration::from_secs(3600));
        let mut replies = client
            .produce_stream(req)
            .await
            .map_err(forwarded)?
            .into_inner();
        let waiters: Waiters = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (w, a) = (waiters.clone(), alive.clone());
        tokio::spawn(async move {
            let failure = loop {
                match replies.next().await {
                    Some(Ok(resp)) => {
                        if let Some(waiter) = w.lock().remove(&resp.request_id) {
                            let _gone = waiter.send(Ok(resp));
                        }
                    }
                    Some(Err(s)) => break forwarded(s),
                    None => {
                        break Status::unavailable(
                            "forward stream to the partition leader ended; outcome unknown",
                        );
                    }
                }
            };
            a.store(false, Ordering::Release);
            for (_, waiter) in w.lock().drain() {
                let _gone = waiter.send(Err(failure.clone()));
            }
        });
        Ok(ForwardStream { tx, waiters, alive })
    }
}

/// Whether a forwarded call may go one hop further.
pub fn may_forward(hops: u32) -> bool {
    hops < MAX_HOPS
}
