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
use junction_broker::{Appended, BrokerError};
use junction_proto::v1::{
    Message, MessagePosition, ProduceRequest, ProduceResponse, ProducerFields,
};
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
            PartWait::Local { part, idx, n, rx } => {
                let a = rx
                    .await
                    .map_err(|_| {
                        Status::unavailable("the partition stopped; the outcome is unknown")
                    })?
                    .map_err(to_status)?;
                let count = u32::try_from(n).unwrap_or(u32::MAX);
                Ok::<_, Status>((part, idx, a.positions(count)))
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
        let (part, idx, offsets) = r?;
        if offsets.len() != idx.len() {
            return Err(Status::internal(
                "the leader returned a different number of positions",
            ));
        }
        for (i, (offset, duplicate)) in idx.into_iter().zip(offsets) {
            positions[i] = MessagePosition {
                partition: part,
                offset,
                duplicate,
            };
        }
    }
    Ok(positions)
}

fn offsets_of(resp: ProduceResponse) -> Result<Vec<(u64, bool)>, Status> {
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
        .map(|p| (p.offset, p.duplicate))
        .collect())
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
