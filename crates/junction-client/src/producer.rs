//! A pipelined, idempotent producer: messages are partitioned on the client, grouped into
//! per-partition batches by a background task and sent to each partition's leader over a
//! `ProduceStream`, several batches in flight.

mod core;
mod worker;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use junction_proto::v1::{Message, MessagePosition};
use tokio::sync::{mpsc, oneshot};

use crate::client::Client;
use crate::error::ClientError;
use worker::Worker;

/// Settings of a [`Producer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerOptions {
    /// Most messages in one batch (default 500).
    pub max_batch_messages: usize,
    /// Most bytes in one batch, roughly (default 1 MiB); a larger single message goes alone.
    pub max_batch_bytes: usize,
    /// How long a queued message waits for more to fill its batch (default 2 ms).
    pub linger: Duration,
    /// Most batches of one partition sent and not yet acknowledged (default 5; an idempotent
    /// producer uses at most 5).
    pub max_in_flight: usize,
    /// Whether the producer is idempotent (default `true`): every batch carries the producer's
    /// id, epoch and sequence numbers, so a retried batch is stored once and gets its
    /// original offsets. With `false`, a retry after an unknown outcome may store a batch
    /// twice.
    pub idempotent: bool,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            max_batch_messages: 500,
            max_batch_bytes: 1024 * 1024,
            linger: Duration::from_millis(2),
            max_in_flight: 5,
            idempotent: true,
        }
    }
}

pub(crate) type Reply = oneshot::Sender<Result<MessagePosition, ClientError>>;

pub(crate) enum Command {
    Send(Message, Reply),
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
    Ready(oneshot::Sender<Result<(), ClientError>>),
}

/// Sends messages to one station in pipelined batches.
///
/// [`Producer::send`] only queues the message and returns a future of its position. The
/// background task picks each message's partition (its `partition` field; else the murmur2
/// hash of its key, as in Kafka; else a partition that changes with each batch), groups a
/// partition's messages into batches (up to `max_batch_messages` / `max_batch_bytes`, waiting
/// at most `linger`) and sends them to the partition's leader, with up to `max_in_flight`
/// batches per partition unacknowledged. When the leader moves, the batches follow it.
///
/// Failure handling: a batch refused with UNAVAILABLE or a leader change, or caught in a
/// broken stream, is sent again, after the earlier batches of its partition and with the same
/// sequence numbers, until the client's retry deadline passes from the batch's creation; any
/// other error fails the batch's messages at once.
///
/// Idempotence (the default): the producer gets an id from the cluster and numbers its
/// messages per partition, so every retry of a stored batch is answered with the original
/// positions (marked `duplicate`) instead of being stored again, and a partition's batches are
/// stored in the order they were sent. A producer made with [`Client::named_producer`] keeps
/// its id across restarts: starting it again fences the previous instance, whose sends then
/// fail with [`ClientError::Fenced`].
///
/// Clones share the same queue and task. Dropping every clone (or [`Producer::close`]) still
/// completes everything queued, as long as the Tokio runtime runs.
#[derive(Clone)]
pub struct Producer {
    tx: mpsc::UnboundedSender<Command>,
    station: Arc<str>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("station", &self.station)
            .finish_non_exhaustive()
    }
}

/// The position of one message sent with [`Producer::send`], once acknowledged. Dropping it
/// does not cancel the send.
#[derive(Debug)]
pub struct SendFuture {
    state: SendState,
}

#[derive(Debug)]
enum SendState {
    Waiting(oneshot::Receiver<Result<MessagePosition, ClientError>>),
    Done,
}

impl Future for SendFuture {
    type Output = Result<MessagePosition, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            SendState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Ready(result) => {
                    self.state = SendState::Done;
                    Poll::Ready(result.unwrap_or(Err(ClientError::ProducerClosed)))
                }
                Poll::Pending => Poll::Pending,
            },
            SendState::Done => Poll::Ready(Err(ClientError::ProducerClosed)),
        }
    }
}

impl Client {
    /// Starts a producer for `station` (`tenant/name` or `name`). Must be called inside a
    /// Tokio runtime: it spawns the producer's background task.
    pub fn producer(&self, station: &str, options: ProducerOptions) -> Producer {
        self.start_producer(station, None, options)
    }

    /// Starts an idempotent producer with a stable `name` (per tenant): its id survives
    /// restarts, and starting it again fences the instance started before, so at most one
    /// instance writes as this producer.
    pub fn named_producer(&self, station: &str, name: &str, options: ProducerOptions) -> Producer {
        let options = ProducerOptions {
            idempotent: true,
            ..options
        };
        self.start_producer(station, Some(name.to_owned()), options)
    }

    fn start_producer(
        &self,
        station: &str,
        name: Option<String>,
        options: ProducerOptions,
    ) -> Producer {
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Worker::new(self.clone(), station.to_owned(), options, name, rx);
        tokio::spawn(worker.run());
        Producer {
            tx,
            station: station.into(),
        }
    }
}

impl Producer {
    /// The station this producer writes to.
    pub fn station(&self) -> &str {
        &self.station
    }

    /// Queues a message and returns a future of its position. The message is sent whether or
    /// not the future is awaited. Queueing never waits: to bound memory, keep a limited number
    /// of these futures outstanding.
    pub fn send(&self, message: Message) -> SendFuture {
        let (reply, rx) = oneshot::channel();
        let state = match self.tx.send(Command::Send(message, reply)) {
            Ok(()) => SendState::Waiting(rx),
            Err(_) => SendState::Done,
        };
        SendFuture { state }
    }

    /// Waits until every message queued before this call is acknowledged or failed (their
    /// outcome is reported by their own futures).
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .map_err(|_| ClientError::ProducerClosed)?;
        rx.await.map_err(|_| ClientError::ProducerClosed)
    }

    /// Waits until the producer can send without first asking the cluster anything: it knows
    /// the station's partitions and, when idempotent, holds its identity (which a named
    /// producer's start uses to fence its previous instance). Sending does not need this; it
    /// takes the start-up round trips out of the first sends' latency, and reports at once a
    /// producer that cannot start (an unknown station, a refused identity).
    pub async fn ready(&self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Ready(done))
            .map_err(|_| ClientError::ProducerClosed)?;
        rx.await.map_err(|_| ClientError::ProducerClosed)?
    }

    /// Completes everything queued so far, then stops the background task. Sends after this
    /// (from any clone) fail with [`ClientError::ProducerClosed`].
    pub async fn close(self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Close(done)).is_ok() {
            let _ = rx.await;
        }
    }
}
