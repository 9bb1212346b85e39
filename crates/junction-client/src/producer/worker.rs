//! The producer's background task: the I/O around [`Core`]. It learns the station's
//! partitions and their leaders, gets the producer identity, keeps one `ProduceStream` per
//! leader it sends to, and feeds commands, replies and time into the core.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use junction_proto::v1::{
    BatchError, InitProducerRequest, ProduceRequest, ProduceResponse, ProducerFields,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::core::{Core, CoreLimits, Followup, Refusal};
use super::{Command, ProducerOptions};
use crate::batch::BatchLimits;
use crate::client::Client;
use crate::error::ClientError;
use crate::retry;

/// How long a leader address that could not be reached is avoided (batches go through a seed
/// address meanwhile, which forwards them).
const AVOID_FOR: Duration = Duration::from_secs(2);
/// How long to wait before asking for an identity again after the cluster could not give one.
const IDENTITY_RETRY: Duration = Duration::from_millis(200);
/// How long the task spends on one route refresh.
const REFRESH_LIMIT: Duration = Duration::from_secs(2);
/// Route refreshes are at most this frequent.
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// Where the station's partitions are led.
struct Routes {
    tenant: String,
    leaders: Vec<Option<String>>,
}

/// What the streams report to the task.
enum Event {
    Reply(String, u64, ProduceResponse),
    Lost(String, u64, Status),
}

struct Conn {
    tx: mpsc::Sender<ProduceRequest>,
    generation: u64,
}

pub(crate) struct Worker {
    client: Client,
    station: String,
    options: ProducerOptions,
    name: Option<String>,
    rx: mpsc::UnboundedReceiver<Command>,
    accepting: bool,
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    closes: Vec<oneshot::Sender<()>>,
    /// Callers of `Producer::ready` waiting for the identity.
    readies: Vec<oneshot::Sender<Result<(), ClientError>>>,
    routes: Routes,
    refresh_at: Option<Instant>,
    last_refresh: Option<Instant>,
    /// When to ask for an identity again after the cluster could not give one.
    identity_at: Option<Instant>,
    conns: HashMap<String, Conn>,
    avoid: HashMap<String, Instant>,
    generation: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
}

impl Worker {
    pub(crate) fn new(
        client: Client,
        station: String,
        options: ProducerOptions,
        name: Option<String>,
        rx: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            client,
            station,
            options,
            name,
            rx,
            accepting: true,
            flushes: Vec::new(),
            closes: Vec::new(),
            readies: Vec::new(),
            routes: Routes {
                tenant: String::new(),
                leaders: Vec::new(),
            },
            refresh_at: None,
            last_refresh: None,
            identity_at: None,
            conns: HashMap::new(),
            avoid: HashMap::new(),
            generation: 0,
            events_tx,
            events_rx,
        }
    }

    fn limits(&self) -> CoreLimits {
        let o = self.client.options();
        CoreLimits {
            batch: BatchLimits {
                max_messages: self.options.max_batch_messages.max(1),
                max_bytes: self.options.max_batch_bytes.max(1),
                linger: self.options.linger,
            },
            max_in_flight: self.options.max_in_flight,
            idempotent: self.options.idempotent,
            retry_deadline: o.retry_deadline,
            initial_backoff: o.initial_backoff,
            max_backoff: o.max_backoff,
        }
    }

    fn closing(&self) -> bool {
        !self.accepting || !self.closes.is_empty()
    }

    pub(crate) async fn run(mut self) {
        let mut core = match self.refresh_routes().await {
            Ok(partitions) => Core::new(self.limits(), partitions, sticky_start()),
            Err(e) => {
                let mut core = Core::new(self.limits(), 1, 0);
                core.kill(e);
                core
            }
        };
        // The identity is asked for at once, so the first send does not wait for it; when the
        // cluster cannot give one yet, the first send asks again.
        if core.wants_identity() {
            self.get_identity(&mut core).await;
        }
        loop {
            let now = Instant::now();
            core.expire(now);
            let force = self.force_upto();
            core.form_batches(now, force);
            self.complete_flushes(&core);
            if !self.readies.is_empty() {
                self.answer_readies(&core);
            }
            if self.closing() && core.is_idle() {
                break;
            }
            if core.wants_identity()
                && (!core.is_idle() || !self.readies.is_empty())
                && self.identity_at.is_none_or(|t| t <= now)
            {
                self.get_identity(&mut core).await;
                continue;
            }
            if self.refresh_at.is_some_and(|t| t <= now) {
                self.refresh_at = None;
                // Bounded: replies and commands wait meanwhile; old routes stay on failure.
                match tokio::time::timeout(REFRESH_LIMIT, self.refresh_routes()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "refreshing the station's routes failed");
                    }
                    Err(_) => tracing::debug!("refreshing the station's routes timed out"),
                }
            }
            self.send_ready(&mut core, now);
            let wake = [core.next_wake(), self.refresh_at, self.identity_at]
                .into_iter()
                .flatten()
                .min();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.rx.recv(), if self.accepting => self.on_command(&mut core, command),
                Some(event) = self.events_rx.recv() => self.on_event(&mut core, event),
                () = sleep => {}
            }
        }
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            self.on_command(&mut core, Some(command));
        }
        self.complete_flushes(&core);
        for done in self.closes.drain(..) {
            let _ = done.send(());
        }
    }

    /// Asks the cluster for a producer identity and installs it; a final refusal kills the
    /// producer, anything else is asked again after [`IDENTITY_RETRY`]. Waiting `ready`
    /// callers are answered at the top of the task's loop.
    async fn get_identity(&mut self, core: &mut Core) {
        match self.init_identity().await {
            Ok(identity) => {
                self.identity_at = None;
                core.set_identity(identity);
            }
            Err(e) if is_final(&e) => core.kill(e),
            Err(e) => {
                tracing::debug!(error = %e, "producer identity not available yet");
                self.identity_at = Some(Instant::now() + IDENTITY_RETRY);
            }
        }
    }

    /// Answers the `ready` callers once the producer is ready or dead.
    fn answer_readies(&mut self, core: &Core) {
        let outcome = match &core.dead {
            Some(e) => Err(e.clone()),
            None if !core.has_identity() => return,
            None => Ok(()),
        };
        for done in self.readies.drain(..) {
            let _ = done.send(outcome.clone());
        }
    }

    fn on_command(&mut self, core: &mut Core, command: Option<Command>) {
        match command {
            Some(Command::Send(message, reply)) => {
                if self.closing() {
                    let _ = reply.send(Err(ClientError::ProducerClosed));
                    return;
                }
                core.enqueue(message, reply, Instant::now());
            }
            Some(Command::Flush(done)) => self.flushes.push((core.next_msg(), done)),
            Some(Command::Close(done)) => self.closes.push(done),
            Some(Command::Ready(done)) => {
                self.readies.push(done);
                self.answer_readies(core);
            }
            None => self.accepting = false,
        }
    }

    /// Messages numbered below this must be batched now (a flush or close waits for them).
    fn force_upto(&self) -> Option<u64> {
        if self.closing() {
            return Some(u64::MAX);
        }
        self.flushes.iter().map(|(upto, _)| *upto).max()
    }

    fn complete_flushes(&mut self, core: &Core) {
        let oldest = core.oldest_unfinished();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(upto, _)| oldest.is_none_or(|o| o >= *upto));
        self.flushes = waiting;
        for (_, done) in done {
            let _ = done.send(());
        }
    }

    /// Learns the station's partitions, tenant and partition leaders; returns the partition
    /// count.
    async fn refresh_routes(&mut self) -> Result<u32, ClientError> {
        if let Some(last) = self.last_refresh
            && last.elapsed() < REFRESH_EVERY
        {
            self.refresh_at = Some(last + REFRESH_EVERY);
            return Ok(self.routes.leaders.len() as u32);
        }
        self.last_refresh = Some(Instant::now());
        let station = self.client.describe_station(&self.station).await?;
        let nodes: HashMap<u64, String> = match self.client.cluster_status().await {
            Ok(status) => status
                .nodes
                .into_iter()
                .filter_map(|n| Some((n.id, retry::normalize_address(&n.addr).ok()?)))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cluster status unavailable: sending through the seeds");
                HashMap::new()
            }
        };
        let mut leaders = vec![None; station.partitions as usize];
        for p in &station.partition_info {
            if let Some(slot) = leaders.get_mut(p.partition as usize) {
                *slot = p.leader.and_then(|l| nodes.get(&l).cloned());
            }
        }
        self.routes = Routes {
            tenant: station.tenant,
            leaders,
        };
        Ok(station.partitions.max(1))
    }

    async fn init_identity(&self) -> Result<(u64, u32), ClientError> {
        let req = InitProducerRequest {
            tenant: self.routes.tenant.clone(),
            producer_name: self.name.clone(),
        };
        let resp = self
            .client
            .with_retry(|ch| {
                let req = req.clone();
                let mut broker = self.client.broker(ch);
                async move { broker.init_producer(req).await }
            })
            .await?
            .into_inner();
        tracing::debug!(
            id = resp.producer_id,
            epoch = resp.epoch,
            "producer identity"
        );
        Ok((resp.producer_id, resp.epoch))
    }

    /// The address a partition's batches go to: its leader, unless that was unreachable a
    /// moment ago, else a seed (which forwards).
    fn route(&mut self, partition: u32) -> String {
        let now = Instant::now();
        self.avoid.retain(|_, until| *until > now);
        match self
            .routes
            .leaders
            .get(partition as usize)
            .cloned()
            .flatten()
        {
            Some(addr) if !self.avoid.contains_key(&addr) => addr,
            _ => self.client.inner.current_address(),
        }
    }

    fn send_ready(&mut self, core: &mut Core, now: Instant) {
        for id in core.sendable_now(now) {
            let Some(batch) = core.batches.get(&id) else {
                continue;
            };
            let addr = self.route(batch.partition);
            let req = ProduceRequest {
                station: self.station.clone(),
                messages: batch.messages.clone(),
                request_id: id,
                producer: batch.numbered.map(|((producer_id, epoch), base_sequence)| {
                    ProducerFields {
                        producer_id,
                        epoch,
                        base_sequence,
                    }
                }),
            };
            let tx = match self.conn(&addr) {
                Ok(tx) => tx,
                Err(e) => {
                    core.kill(e);
                    return;
                }
            };
            core.sent_to(id, &addr);
            if tx.try_send(req).is_err() {
                // A full or closed stream: retire it; the batch goes again after a backoff.
                self.conns.remove(&addr);
                core.stream_lost(&addr, Code::Unavailable, "produce stream closed", now);
            }
        }
    }

    /// The request sender of the stream to `addr`, opening it if needed. The stream's replies
    /// and its end arrive as events.
    fn conn(&mut self, addr: &str) -> Result<mpsc::Sender<ProduceRequest>, ClientError> {
        if let Some(c) = self.conns.get(addr) {
            return Ok(c.tx.clone());
        }
        let channel = self.client.inner.channel(addr)?;
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::channel(1024);
        let mut broker = self.client.broker(channel);
        let events = self.events_tx.clone();
        let connect_timeout = self.client.options().connect_timeout;
        let a = addr.to_owned();
        tokio::spawn(async move {
            let call = broker.produce_stream(ReceiverStream::new(rx));
            let mut replies = match tokio::time::timeout(connect_timeout, call).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(status)) => {
                    let _ = events.send(Event::Lost(a, generation, status));
                    return;
                }
                Err(_) => {
                    let status = Status::unavailable("timed out opening a produce stream");
                    let _ = events.send(Event::Lost(a, generation, status));
                    return;
                }
            };
            loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        if events.send(Event::Reply(a.clone(), generation, r)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let status = Status::unavailable("produce stream ended");
                        let _ = events.send(Event::Lost(a, generation, status));
                        return;
                    }
                    Err(status) => {
                        let _ = events.send(Event::Lost(a, generation, status));
                        return;
                    }
                }
            }
        });
        self.conns.insert(
            addr.to_owned(),
            Conn {
                tx: tx.clone(),
                generation,
            },
        );
        Ok(tx)
    }

    fn on_event(&mut self, core: &mut Core, event: Event) {
        let now = Instant::now();
        match event {
            Event::Lost(addr, generation, status) => {
                if self
                    .conns
                    .get(&addr)
                    .is_none_or(|c| c.generation != generation)
                {
                    return;
                }
                self.conns.remove(&addr);
                tracing::debug!(%addr, code = ?status.code(), message = status.message(), "produce stream lost");
                if retry::classify(&status) == retry::Disposition::Fail {
                    // The server refused the stream itself (e.g. a bad station): final.
                    core.kill(ClientError::from(status));
                    return;
                }
                if addr != self.client.inner.current_address() {
                    self.avoid.insert(addr.clone(), now + AVOID_FOR);
                } else {
                    self.client.inner.failed(&addr, &status);
                }
                core.stream_lost(&addr, status.code(), status.message(), now);
                self.schedule_refresh(now);
            }
            Event::Reply(addr, generation, resp) => {
                if self
                    .conns
                    .get(&addr)
                    .is_none_or(|c| c.generation != generation)
                {
                    return;
                }
                let id = resp.request_id;
                let current = core
                    .batches
                    .get(&id)
                    .is_some_and(|b| b.sent_to.as_deref() == Some(addr.as_str()));
                if !current {
                    return;
                }
                match resp.error {
                    None => core.acknowledged(id, resp.positions),
                    Some(error) => match core.refused(id, refusal(error), now) {
                        Followup::Nothing => {}
                        Followup::LeaderHint(p, leader) => {
                            if let Some(slot) = self.routes.leaders.get_mut(p as usize) {
                                *slot = Some(leader);
                            }
                        }
                        Followup::RefreshRoutes => self.schedule_refresh(now),
                    },
                }
            }
        }
    }

    fn schedule_refresh(&mut self, now: Instant) {
        if self.refresh_at.is_none() {
            self.refresh_at = Some(now + Duration::from_millis(50));
        }
    }
}

/// Converts a stream's batch error, with the reason its status details carry.
fn refusal(error: BatchError) -> Refusal {
    let code = Code::from_i32(error.code);
    let status = Status::with_details(code, error.message.clone(), error.details.into());
    let reason = status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default();
    let leader_hint = Some(error.leader_addr.as_str())
        .filter(|a| !a.is_empty())
        .and_then(|a| retry::normalize_address(a).ok());
    let throttled = retry::throttled(&status);
    Refusal {
        code,
        message: error.message,
        reason,
        leader_hint,
        throttled,
    }
}

/// Whether getting an identity failed for good (not a transient failure).
fn is_final(e: &ClientError) -> bool {
    !matches!(e, ClientError::RetriesExhausted { .. })
}

/// Where unkeyed messages start: spread producers over partitions.
fn sticky_start() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos / 1000
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_error_keeps_its_reason_and_leader() {
        let status = Status::with_error_details(
            Code::OutOfRange,
            "gap",
            tonic_types::ErrorDetails::with_error_info(
                "OUT_OF_ORDER_SEQUENCE",
                "junction.dev",
                HashMap::new(),
            ),
        );
        let r = refusal(BatchError {
            code: Code::OutOfRange as i32,
            message: "gap".into(),
            leader_addr: "127.0.0.1:9".into(),
            details: status.details().to_vec(),
        });
        assert_eq!(r.reason, "OUT_OF_ORDER_SEQUENCE");
        assert_eq!(r.code, Code::OutOfRange);
        assert_eq!(r.leader_hint.as_deref(), Some("http://127.0.0.1:9"));
        let plain = refusal(BatchError {
            code: Code::Unavailable as i32,
            message: "down".into(),
            leader_addr: String::new(),
            details: vec![],
        });
        assert_eq!((plain.reason.as_str(), plain.leader_hint), ("", None));
    }
}
