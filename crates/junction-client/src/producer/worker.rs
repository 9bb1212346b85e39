//! The producer's background task: batching, the stream, replies and retries.

use std::collections::BTreeMap;
use std::time::Instant;

use junction_proto::v1::{Message, MessagePosition, ProduceRequest, ProduceResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::{Code, Status};

use super::{Command, ProducerOptions, Reply};
use crate::batch::{Accumulator, BatchLimits, message_size};
use crate::client::{Attempts, Client};
use crate::error::ClientError;
use crate::retry::{self, Backoff, Disposition};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchState {
    /// To be written to the (next) stream.
    Unsent,
    /// Written to the current stream, awaiting its reply.
    Sent,
    /// Failed and waiting for its backoff to end.
    WaitingUntil(Instant),
}

struct Batch {
    messages: Vec<Message>,
    replies: Vec<Reply>,
    first_seq: u64,
    created: Instant,
    state: BatchState,
    backoff: Backoff,
    attempts: u32,
}

impl Batch {
    fn complete(self, positions: Vec<MessagePosition>) {
        for (reply, position) in self.replies.into_iter().zip(positions) {
            let _ = reply.send(Ok(position));
        }
    }

    fn fail(self, error: &ClientError) {
        for reply in self.replies {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

struct Conn {
    tx: mpsc::Sender<ProduceRequest>,
    responses: Streaming<ProduceResponse>,
    addr: String,
}

enum Event {
    Command(Option<Command>),
    Response(Result<Option<ProduceResponse>, Status>),
    Tick,
}

/// A queued message: the message, its reply channel, and its sequence number.
type Queued = (Message, Reply, u64);

pub(crate) struct Worker {
    client: Client,
    station: String,
    limits: BatchLimits,
    max_in_flight: usize,
    rx: mpsc::UnboundedReceiver<Command>,
    accepting: bool,
    queue: Accumulator<Queued>,
    next_seq: u64,
    outstanding: BTreeMap<u64, Batch>,
    next_batch_id: u64,
    conn: Option<Conn>,
    /// Set while a run of stream failures lasts.
    conn_attempts: Option<Attempts>,
    reconnect_at: Option<Instant>,
    /// Flush waiters with the last sequence number they wait for.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    closes: Vec<oneshot::Sender<()>>,
}

impl Worker {
    pub(crate) fn new(
        client: Client,
        station: String,
        options: ProducerOptions,
        rx: mpsc::UnboundedReceiver<Command>,
    ) -> Self {
        Self {
            client,
            station,
            limits: BatchLimits {
                max_messages: options.max_batch_messages.max(1),
                max_bytes: options.max_batch_bytes.max(1),
                linger: options.linger,
            },
            max_in_flight: options.max_in_flight.max(1),
            rx,
            accepting: true,
            queue: Accumulator::default(),
            next_seq: 0,
            outstanding: BTreeMap::new(),
            next_batch_id: 1,
            conn: None,
            conn_attempts: None,
            reconnect_at: None,
            flushes: Vec::new(),
            closes: Vec::new(),
        }
    }

    fn closing(&self) -> bool {
        !self.accepting || !self.closes.is_empty()
    }

    pub(crate) async fn run(mut self) {
        loop {
            let now = Instant::now();
            self.expire(now);
            self.form_batches(now);
            self.complete_flushes();
            if self.closing() && self.queue.is_empty() && self.outstanding.is_empty() {
                break;
            }
            let has_unsent = self
                .outstanding
                .values()
                .any(|b| b.state == BatchState::Unsent);
            if has_unsent {
                if self.conn.is_some() {
                    self.send_unsent();
                } else if self.reconnect_at.is_none_or(|t| t <= now) {
                    self.connect().await;
                    continue;
                }
            }
            let wake = self.next_wake();
            let event = {
                let conn = &mut self.conn;
                let rx = &mut self.rx;
                let sleep = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let response = async move {
                    match conn.as_mut() {
                        Some(conn) => conn.responses.message().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    command = rx.recv(), if self.accepting => Event::Command(command),
                    response = response => Event::Response(response),
                    () = sleep => Event::Tick,
                }
            };
            match event {
                Event::Command(command) => self.on_command(command),
                Event::Response(response) => self.on_response(response),
                Event::Tick => {}
            }
        }
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            self.on_command(Some(command));
        }
        self.complete_flushes();
        for done in self.closes.drain(..) {
            let _ = done.send(());
        }
    }

    fn on_command(&mut self, command: Option<Command>) {
        match command {
            Some(Command::Send(message, reply)) => {
                if self.closing() {
                    let _ = reply.send(Err(ClientError::ProducerClosed));
                    return;
                }
                let size = message_size(&message);
                let seq = self.next_seq;
                self.next_seq += 1;
                self.queue.push((message, reply, seq), size, Instant::now());
            }
            Some(Command::Flush(done)) => self.flushes.push((self.next_seq, done)),
            Some(Command::Close(done)) => self.closes.push(done),
            None => self.accepting = false,
        }
    }

    /// The sequence number of the oldest message not yet acknowledged or failed.
    fn oldest_unfinished(&self) -> Option<u64> {
        let queued = self.queue.front().map(|(_, _, seq)| *seq);
        let outstanding = self.outstanding.values().map(|b| b.first_seq).min();
        queued.into_iter().chain(outstanding).min()
    }

    /// Answers the flushes whose messages are all acknowledged or failed.
    fn complete_flushes(&mut self) {
        let oldest = self.oldest_unfinished();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(upto, _)| oldest.is_none_or(|o| o >= *upto));
        self.flushes = waiting;
        for (_, done) in done {
            let _ = done.send(());
        }
    }

    /// Whether a flush or close waits for the oldest queued message.
    fn forced(&self) -> bool {
        if self.closing() {
            return true;
        }
        let Some((_, _, front)) = self.queue.front() else {
            return false;
        };
        self.flushes.iter().any(|(upto, _)| front < upto)
    }

    fn form_batches(&mut self, now: Instant) {
        while self.outstanding.len() < self.max_in_flight
            && self.queue.ready(&self.limits, now, self.forced())
        {
            let items = self.queue.take_batch(&self.limits);
            let Some((_, _, first_seq)) = items.first() else {
                break;
            };
            let first_seq = *first_seq;
            let mut messages = Vec::with_capacity(items.len());
            let mut replies = Vec::with_capacity(items.len());
            for (message, reply, _) in items {
                messages.push(message);
                replies.push(reply);
            }
            let id = self.next_batch_id;
            self.next_batch_id += 1;
            self.outstanding.insert(
                id,
                Batch {
                    messages,
                    replies,
                    first_seq,
                    created: now,
                    state: BatchState::Unsent,
                    backoff: self.client.inner.options.backoff(),
                    attempts: 0,
                },
            );
        }
    }

    /// Fails batches older than the retry deadline and moves retries whose backoff ended back
    /// to `Unsent`.
    fn expire(&mut self, now: Instant) {
        let deadline = self.client.inner.options.retry_deadline;
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, b)| now >= b.created + deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(batch) = self.outstanding.remove(&id) {
                let error = ClientError::RetriesExhausted {
                    attempts: batch.attempts,
                    elapsed: now - batch.created,
                    code: Code::DeadlineExceeded,
                    message: "batch not acknowledged within the retry deadline".to_owned(),
                };
                batch.fail(&error);
            }
        }
        for batch in self.outstanding.values_mut() {
            if matches!(batch.state, BatchState::WaitingUntil(t) if t <= now) {
                batch.state = BatchState::Unsent;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let deadline = self.client.inner.options.retry_deadline;
        let mut wake: Option<Instant> = None;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if self.outstanding.len() < self.max_in_flight
            && let Some(t) = self.queue.linger_deadline(&self.limits)
        {
            consider(t);
        }
        for batch in self.outstanding.values() {
            consider(batch.created + deadline);
            if let BatchState::WaitingUntil(t) = batch.state {
                consider(t);
            }
            if batch.state == BatchState::Unsent
                && let Some(t) = self.reconnect_at
            {
                consider(t);
            }
        }
        wake
    }

    fn request(&self, id: u64, batch: &Batch) -> ProduceRequest {
        ProduceRequest {
            station: self.station.clone(),
            messages: batch.messages.clone(),
            request_id: id,
            producer: None,
        }
    }

    /// Writes every `Unsent` batch, in order, to the current stream.
    fn send_unsent(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let mut broken = false;
        let ids: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, b)| b.state == BatchState::Unsent)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(batch) = self.outstanding.get(&id) else {
                continue;
            };
            let req = self.request(id, batch);
            if conn.tx.try_send(req).is_err() {
                broken = true;
                break;
            }
            if let Some(batch) = self.outstanding.get_mut(&id) {
                batch.state = BatchState::Sent;
                batch.attempts += 1;
            }
        }
        if broken {
            let addr = conn.addr.clone();
            self.stream_failed(&addr, Status::unavailable("produce stream closed"));
        }
    }

    /// Opens a stream at the next address, queueing the unsent batches on it first (a server
    /// may wait for the first request before answering the call).
    async fn connect(&mut self) {
        let options = self.client.inner.options.clone();
        let attempts = self
            .conn_attempts
            .get_or_insert_with(|| Attempts::new(&options));
        let addr = attempts.next_address(&self.client);
        let remaining = attempts.remaining().max(options.connect_timeout);
        let channel = match self.client.inner.channel(&addr) {
            Ok(channel) => channel,
            Err(error) => {
                self.fail_all(&error);
                return;
            }
        };
        let (tx, rx) = mpsc::channel(2 * self.max_in_flight + 1);
        for (id, batch) in self.outstanding.iter_mut() {
            if batch.state == BatchState::Unsent {
                let req = ProduceRequest {
                    station: self.station.clone(),
                    messages: batch.messages.clone(),
                    request_id: *id,
                    producer: None,
                };
                if tx.try_send(req).is_ok() {
                    batch.state = BatchState::Sent;
                    batch.attempts += 1;
                }
            }
        }
        let mut broker = self.client.broker(channel);
        let call = broker.produce_stream(ReceiverStream::new(rx));
        match tokio::time::timeout(remaining, call).await {
            Ok(Ok(response)) => {
                self.conn = Some(Conn {
                    tx,
                    responses: response.into_inner(),
                    addr,
                });
                self.reconnect_at = None;
            }
            Ok(Err(status)) => self.stream_failed(&addr, status),
            Err(_elapsed) => self.stream_failed(
                &addr,
                Status::unavailable("timed out opening produce stream"),
            ),
        }
    }

    /// Handles a broken (or never opened) stream: batches on it go back to `Unsent` and are
    /// re-sent on a new stream after a backoff, or fail if the error is final.
    fn stream_failed(&mut self, addr: &str, status: Status) {
        self.conn = None;
        let mut on_stream = Vec::new();
        for (id, batch) in self.outstanding.iter_mut() {
            if batch.state == BatchState::Sent {
                batch.state = BatchState::Unsent;
                on_stream.push(*id);
            }
        }
        if on_stream.is_empty() && self.conn_attempts.is_none() {
            // An idle stream went away; open a new one when there is something to send.
            return;
        }
        tracing::debug!(%addr, code = ?status.code(), message = status.message(), "produce stream failed");
        match retry::classify(&status) {
            Disposition::Fail => {
                let error = ClientError::from(status);
                for id in on_stream {
                    if let Some(batch) = self.outstanding.remove(&id) {
                        batch.fail(&error);
                    }
                }
                self.conn_attempts = None;
                self.reconnect_at = None;
            }
            Disposition::Retry { leader_hint } => {
                let options = self.client.inner.options.clone();
                let attempts = self
                    .conn_attempts
                    .get_or_insert_with(|| Attempts::new(&options));
                match attempts.failed(&self.client, addr, &status, leader_hint) {
                    Ok(delay) => self.reconnect_at = Some(Instant::now() + delay),
                    Err(error) => {
                        self.fail_all(&error);
                        self.conn_attempts = None;
                        self.reconnect_at = None;
                    }
                }
            }
        }
    }

    fn fail_all(&mut self, error: &ClientError) {
        for (_, batch) in std::mem::take(&mut self.outstanding) {
            batch.fail(error);
        }
    }

    fn on_response(&mut self, response: Result<Option<ProduceResponse>, Status>) {
        let addr = self
            .conn
            .as_ref()
            .map(|c| c.addr.clone())
            .unwrap_or_default();
        let response = match response {
            Ok(Some(response)) => response,
            Ok(None) => {
                return self.stream_failed(&addr, Status::unavailable("produce stream ended"));
            }
            Err(status) => return self.stream_failed(&addr, status),
        };
        self.conn_attempts = None;
        let Some(mut batch) = self.outstanding.remove(&response.request_id) else {
            tracing::warn!(
                request_id = response.request_id,
                "reply to an unknown batch"
            );
            return;
        };
        let Some(error) = response.error else {
            if response.positions.len() == batch.messages.len() {
                batch.complete(response.positions);
            } else {
                let error = ClientError::invalid_response(format!(
                    "batch of {} messages got {} positions",
                    batch.messages.len(),
                    response.positions.len()
                ));
                batch.fail(&error);
            }
            return;
        };
        match retry::classify_batch(&error) {
            Disposition::Fail => batch.fail(&ClientError::Status {
                code: Code::from_i32(error.code),
                message: error.message,
            }),
            Disposition::Retry { leader_hint } => {
                if let Some(hint) = leader_hint {
                    self.client.inner.prefer(&hint);
                }
                let now = Instant::now();
                let retry_at = now + batch.backoff.next_delay();
                let deadline = batch.created + self.client.inner.options.retry_deadline;
                if retry_at >= deadline {
                    let error = ClientError::RetriesExhausted {
                        attempts: batch.attempts,
                        elapsed: now - batch.created,
                        code: Code::from_i32(error.code),
                        message: error.message,
                    };
                    batch.fail(&error);
                } else {
                    batch.state = BatchState::WaitingUntil(retry_at);
                    self.outstanding.insert(response.request_id, batch);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use junction_proto::v1::BatchError;

    use super::*;

    type Answer = oneshot::Receiver<Result<MessagePosition, ClientError>>;

    fn worker() -> Worker {
        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        let (_tx, rx) = mpsc::unbounded_channel();
        Worker::new(client, "s".into(), ProducerOptions::default(), rx)
    }

    /// Puts a one-message batch on the (pretend) stream as `id`.
    fn sent(worker: &mut Worker, id: u64) -> Answer {
        let (reply, answer) = oneshot::channel();
        let batch = Batch {
            messages: vec![Message::default()],
            replies: vec![reply],
            first_seq: 0,
            created: Instant::now(),
            state: BatchState::Sent,
            backoff: worker.client.inner.options.backoff(),
            attempts: 1,
        };
        worker.outstanding.insert(id, batch);
        answer
    }

    fn failed(id: u64, code: Code, leader_addr: &str) -> Result<Option<ProduceResponse>, Status> {
        Ok(Some(ProduceResponse {
            request_id: id,
            positions: vec![],
            error: Some(BatchError {
                code: code as i32,
                message: "m".into(),
                leader_addr: leader_addr.into(),
                details: vec![],
            }),
        }))
    }

    #[test]
    fn a_batch_naming_the_leader_is_retried_there() {
        let mut w = worker();
        let mut answer = sent(&mut w, 1);
        w.on_response(failed(1, Code::Unavailable, "127.0.0.1:2"));
        assert_eq!(w.client.inner.current_address(), "http://127.0.0.1:2");
        assert!(matches!(
            w.outstanding[&1].state,
            BatchState::WaitingUntil(_)
        ));
        assert!(answer.try_recv().is_err(), "not answered yet");
    }

    #[test]
    fn a_rejected_batch_fails_with_its_code() {
        let mut w = worker();
        let mut answer = sent(&mut w, 1);
        w.on_response(failed(1, Code::InvalidArgument, ""));
        assert!(w.outstanding.is_empty());
        let err = answer.try_recv().unwrap().unwrap_err();
        assert!(matches!(
            err,
            ClientError::Status {
                code: Code::InvalidArgument,
                ..
            }
        ));
        assert_eq!(w.client.inner.current_address(), "http://127.0.0.1:1");
    }

    #[test]
    fn an_acknowledged_batch_gets_its_positions() {
        let mut w = worker();
        let mut answer = sent(&mut w, 7);
        w.on_response(Ok(Some(ProduceResponse {
            request_id: 7,
            positions: vec![MessagePosition {
                partition: 2,
                offset: 41,
                duplicate: false,
            }],
            error: None,
        })));
        let pos = answer.try_recv().unwrap().unwrap();
        assert_eq!((pos.partition, pos.offset), (2, 41));
    }
}
