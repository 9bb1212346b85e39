//! Following a partition with the Tail RPC, reconnecting when the stream breaks.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use junction_proto::v1::{ReadResponse, StoredMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::{Code, Status};

use crate::broker::{Start, read_request};
use crate::client::{Attempts, Client};
use crate::error::ClientError;
use crate::retry::{self, Disposition};

/// The messages of one partition, from a start position on, as they commit.
///
/// When the stream breaks with UNAVAILABLE or a connection error (or the server ends it), it
/// is re-opened on the next address after a backoff, resuming after the last message
/// delivered; a run of failures longer than the client's retry deadline ends the stream with
/// [`ClientError::RetriesExhausted`]. OUT_OF_RANGE on resuming from an offset the cluster
/// already reported (a lagging replica) is retried the same way. Any other error is yielded
/// once and ends the stream.
pub struct TailStream {
    inner: Pin<Box<dyn Stream<Item = Result<StoredMessage, ClientError>> + Send>>,
}

impl std::fmt::Debug for TailStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailStream").finish_non_exhaustive()
    }
}

impl Stream for TailStream {
    type Item = Result<StoredMessage, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl Client {
    /// Follows one partition of `station` from `start`: yields stored messages, then new ones
    /// as they commit, until dropped or a non-retryable error.
    ///
    /// The stream is opened at once by a background task (so `Start::Latest` means about
    /// "when `tail` was called", not "when first polled"), which must therefore run inside a
    /// Tokio runtime. `Start::Latest` is first resolved to the partition's high watermark with
    /// a Read call, so that reconnects resume from there. Up to [`TAIL_BUFFER`] messages are read ahead; dropping the stream stops
    /// the task.
    pub fn tail(&self, station: &str, partition: u32, start: Start) -> TailStream {
        let state = TailState {
            attempts: Attempts::new(&self.inner.options),
            since: Since::Failure,
            client: self.clone(),
            station: station.to_owned(),
            partition,
            start,
            next_expected: None,
            offset_known: false,
            stream: None,
            addr: String::new(),
            buffer: VecDeque::new(),
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    () = tx.closed() => return,
                };
                let Some(item) = item else { return };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        TailStream {
            inner: Box::pin(ReceiverStream::new(rx)),
        }
    }
}

/// How many messages a [`TailStream`] reads ahead of its consumer.
pub const TAIL_BUFFER: usize = 256;

struct TailState {
    client: Client,
    station: String,
    partition: u32,
    /// Where the next (re)opened stream starts.
    start: Start,
    /// The offset after the last message delivered.
    next_expected: Option<u64>,
    /// Whether `start` is an offset the cluster reported (not one the caller asked for): then
    /// OUT_OF_RANGE only means the replica serving the tail lags behind, and is retried.
    offset_known: bool,
    stream: Option<Streaming<ReadResponse>>,
    /// The address `stream` is connected to.
    addr: String,
    buffer: VecDeque<StoredMessage>,
    /// The current run of failures (its deadline, backoff and addresses).
    attempts: Attempts,
    /// What happened since the last failure.
    since: Since,
    done: bool,
}

/// What happened since the last failure of a tail: decides whether the next failure
/// continues the current run of failures or starts a new one (with a new deadline), so that
/// the retry deadline bounds consecutive failures and not, say, an idle time without
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Since {
    /// Nothing went right yet: a failure continues the current run.
    Failure,
    /// A stream opened: a failure starts a new run, keeping the grown backoff.
    Opened,
    /// Messages arrived: a failure starts a new run from the first backoff.
    Delivered,
}

impl TailState {
    async fn next(&mut self) -> Option<Result<StoredMessage, ClientError>> {
        loop {
            if let Some(message) = self.buffer.pop_front() {
                self.next_expected = Some(message.offset + 1);
                return Some(Ok(message));
            }
            if self.done {
                return None;
            }
            let result = match self.stream.as_mut() {
                None => self.open().await,
                Some(stream) => match stream.message().await {
                    Ok(Some(resp)) => {
                        self.accept(resp);
                        Ok(())
                    }
                    Ok(None) => {
                        self.stream = None;
                        let addr = self.addr.clone();
                        self.retry(&addr, Status::unavailable("tail stream ended"))
                            .await
                    }
                    Err(status) => {
                        self.stream = None;
                        let addr = self.addr.clone();
                        self.retry(&addr, status).await
                    }
                },
            };
            if let Err(err) = result {
                self.done = true;
                self.stream = None;
                return Some(Err(err));
            }
        }
    }

    /// Opens the Tail stream at the next address.
    async fn open(&mut self) -> Result<(), ClientError> {
        if self.start == Start::Latest {
            // Pin "latest" to an offset once, so that a reconnect does not skip what was
            // produced while the stream was down.
            let end = self
                .client
                .read(&self.station, self.partition, Start::Latest, 1)
                .await?;
            self.start = Start::Offset(end.high_watermark);
            self.offset_known = true;
        }
        let addr = self.attempts.next_address(&self.client);
        let channel = self.client.inner.channel(&addr)?;
        let req = read_request(&self.station, self.partition, self.start, 0);
        let mut broker = self.client.broker(channel);
        match tokio::time::timeout(self.attempts.remaining(), broker.tail(req)).await {
            Ok(Ok(resp)) => {
                self.stream = Some(resp.into_inner());
                self.addr = addr;
                if self.since == Since::Failure {
                    self.since = Since::Opened;
                }
                Ok(())
            }
            Ok(Err(status)) => self.retry(&addr, status).await,
            Err(_elapsed) => Err(self
                .attempts
                .exhausted(Code::DeadlineExceeded, "retry deadline passed opening tail")),
        }
    }

    /// Takes one response's messages, skipping any already delivered, and moves the resume
    /// point past them.
    fn accept(&mut self, resp: ReadResponse) {
        self.since = Since::Delivered;
        self.client.inner.succeeded(&self.addr);
        let empty_partition = resp.messages.is_empty() && resp.high_watermark == 0;
        let mut resume = resp.next_offset;
        for message in resp.messages {
            if self.next_expected.is_some_and(|next| message.offset < next)
                || self
                    .buffer
                    .back()
                    .is_some_and(|last| message.offset <= last.offset)
            {
                continue;
            }
            resume = resume.max(message.offset + 1);
            self.buffer.push_back(message);
        }
        if let Some(next) = self.next_expected {
            resume = resume.max(next);
        }
        if resume > 0 || empty_partition {
            self.start = Start::Offset(resume);
            self.offset_known = true;
        }
    }

    /// Waits before the next attempt if `status` is retryable, else returns it as the error.
    async fn retry(&mut self, addr: &str, status: Status) -> Result<(), ClientError> {
        let disposition = if status.code() == Code::OutOfRange && self.offset_known {
            Disposition::Retry { leader_hint: None }
        } else {
            retry::classify(&status)
        };
        match disposition {
            Disposition::Fail => Err(status.into()),
            Disposition::Throttled { after } => {
                tokio::time::sleep(after).await;
                Ok(())
            }
            Disposition::Retry { leader_hint } => {
                tracing::debug!(
                    station = %self.station,
                    partition = self.partition,
                    %addr,
                    code = ?status.code(),
                    message = status.message(),
                    "tail stream broke; reconnecting"
                );
                let options = &self.client.inner.options;
                match std::mem::replace(&mut self.since, Since::Failure) {
                    Since::Delivered => self.attempts.reset(options),
                    Since::Opened => self.attempts.restart_clock(options),
                    Since::Failure => {}
                }
                let delay = self
                    .attempts
                    .failed(&self.client, addr, &status, leader_hint)?;
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn state() -> TailState {
        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        TailState {
            attempts: Attempts::new(client.options()),
            since: Since::Failure,
            client,
            station: "s".into(),
            partition: 0,
            start: Start::Latest,
            next_expected: None,
            offset_known: false,
            stream: None,
            addr: "http://127.0.0.1:1".into(),
            buffer: VecDeque::new(),
            done: false,
        }
    }

    fn msg(offset: u64) -> StoredMessage {
        StoredMessage {
            offset,
            ..Default::default()
        }
    }

    fn resp(offsets: &[u64], next: u64, hw: u64) -> ReadResponse {
        ReadResponse {
            messages: offsets.iter().copied().map(msg).collect(),
            next_offset: next,
            high_watermark: hw,
            start_offset: 0,
            below_start: false,
        }
    }

    #[test]
    fn resume_point_follows_delivered_messages() {
        let mut st = state();
        st.accept(resp(&[], 0, 0));
        assert_eq!(st.start, Start::Offset(0));
        st.accept(resp(&[0, 1, 2], 3, 3));
        assert_eq!(st.start, Start::Offset(3));
        assert_eq!(st.buffer.len(), 3);
        st.next_expected = Some(3);
        st.buffer.clear();
        // A re-sent message after a reconnect is skipped.
        st.accept(resp(&[2, 3], 4, 4));
        assert_eq!(
            st.buffer.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(st.start, Start::Offset(4));
    }

    #[test]
    fn latest_start_is_pinned_by_the_first_reply() {
        let mut st = state();
        st.accept(resp(&[], 42, 42));
        assert_eq!(st.start, Start::Offset(42));
    }

    #[tokio::test]
    async fn out_of_range_is_retried_only_from_an_offset_the_cluster_reported() {
        // The caller's own offset: OUT_OF_RANGE is final.
        let mut st = state();
        st.start = Start::Offset(100);
        let err = st
            .retry("http://127.0.0.1:1", Status::out_of_range("beyond the end"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::OutOfRange));

        // After a reply the resume offset is the cluster's: a replica that has not caught up
        // yet answers OUT_OF_RANGE, which is retried.
        let mut st = state();
        st.accept(resp(&[0, 1, 2], 3, 3));
        assert!(st.offset_known);
        st.retry(
            "http://127.0.0.1:1",
            Status::out_of_range("lagging replica"),
        )
        .await
        .unwrap();
        assert_eq!(st.start, Start::Offset(3));
        // Other final codes stay final.
        let err = st
            .retry("http://127.0.0.1:1", Status::not_found("station deleted"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound));
    }

    /// A state whose client gives up after 200 ms of failures.
    fn impatient() -> TailState {
        let options = crate::ClientOptions::default()
            .with_retry_deadline(std::time::Duration::from_millis(200));
        let client = Client::connect_with(["127.0.0.1:1"], options).unwrap();
        TailState {
            attempts: Attempts::new(client.options()),
            client,
            ..state()
        }
    }

    #[tokio::test]
    async fn the_deadline_counts_from_the_first_failure_not_the_last_message() {
        let mut st = impatient();
        st.accept(resp(&[0], 1, 1));
        // Idle for longer than the retry deadline, then the stream breaks: retried.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        st.retry(
            "http://127.0.0.1:1",
            Status::unavailable("node shutting down"),
        )
        .await
        .unwrap();
        // A reconnect that opens but delivers nothing also ends the run of failures.
        st.since = Since::Opened;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        st.retry(
            "http://127.0.0.1:1",
            Status::unavailable("node shutting down"),
        )
        .await
        .unwrap();
        // Failures with nothing in between do exhaust the deadline.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let err = st
            .retry("http://127.0.0.1:1", Status::unavailable("still down"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::RetriesExhausted {
                    code: Code::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tail_of_unreachable_cluster_ends_with_error() {
        use futures::StreamExt;
        let options = crate::ClientOptions::default()
            .with_retry_deadline(std::time::Duration::from_millis(300));
        let client = Client::connect_with(["127.0.0.1:1"], options).unwrap();
        let mut tail = client.tail("s", 0, Start::Earliest);
        let err = tail.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        assert!(tail.next().await.is_none());
    }
}
