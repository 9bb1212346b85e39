//! Replication as one pipelined gRPC stream per session (`Peer.AppendStream`).
//!
//! openraft's replication of a group to one follower is a *session*: a stream of
//! AppendEntries requests whose answers come back in order (`RaftNetworkV2::stream_append`,
//! answered on the follower by `Raft::stream_append`). Sent as unary calls, every request is
//! a new HTTP/2 stream with its headers, its secret check and a task on the follower, and the
//! next request waits for the answer to the previous one. Here a session is one bidirectional
//! gRPC stream: requests follow each other without waiting (up to [`MAX_IN_FLIGHT`]), each is
//! one DATA frame each way.
//!
//! A session of a quiet group has nothing to send for hours; holding its HTTP/2 stream open
//! would put thousands of streams on a peer connection. The leader side therefore opens the
//! gRPC stream at the session's first request and closes it after [`IDLE_CLOSE`] without
//! one, and opens a new one at the next request: openraft sees one session throughout.
//!
//! [`Leader`] is the sending side (the network of a leader's group), [`serve`] the receiving
//! side (the `Peer` service of the follower's node).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use junction_proto::peer::peer_client::PeerClient;
use junction_proto::peer::{RaftReply, RaftRequest};
use junction_types::{GroupId, META_GROUP};
use openraft::errors::{NetworkError, RPCError, Unreachable};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::format::{self, decode, encode};
use crate::network::PeerChannel;
use crate::peer_service::{AppendStreamStats, GroupHost, accept_append};
use crate::types::TypeConfig;

type RpcErr = RPCError<TypeConfig>;
type Answer = Result<StreamAppendResult<TypeConfig>, RpcErr>;

/// Requests of one session sent and not yet answered, at most. openraft's follower side
/// pipelines as many (`Raft::stream_append` buffers 64).
pub const MAX_IN_FLIGHT: usize = 64;

/// A session's gRPC stream is closed after this long without a request to send or an
/// answer to wait for, and opened again at its next request.
pub const IDLE_CLOSE: Duration = Duration::from_secs(5);

fn unreachable(msg: impl ToString) -> RpcErr {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

fn network(msg: impl ToString) -> RpcErr {
    RPCError::Network(NetworkError::from_string(msg))
}

/// A gRPC failure as openraft's backoff expects it: a peer that is down is "unreachable".
fn status_error(target: u64, status: &Status) -> RpcErr {
    if status.code() == tonic::Code::Unavailable {
        unreachable(format!("node {target}: {}", status.message()))
    } else {
        network(format!("node {target}: {status}"))
    }
}

/// One answer of the follower, or why there is none.
fn answer_of(target: u64, reply: RaftReply) -> Answer {
    if reply.not_hosted {
        return Err(unreachable(format!(
            "node {target} does not host the group yet"
        )));
    }
    if !reply.error.is_empty() {
        return Err(network(format!("node {target}: {}", reply.error)));
    }
    decode(&format::STREAM_APPEND_REPLY, &reply.payload).map_err(network)
}

/// A request sent on the open stream and not yet answered.
struct Sent {
    at: Instant,
    /// Spans the round trip of a request with entries, on a node that exports traces.
    _span: Option<tracing::Span>,
}

/// The open gRPC stream of a session.
struct OpenCall {
    /// Requests go here; `None` once the leader side closed its half (idle, or openraft ended
    /// the session) and waits for the follower to end the stream.
    requests: Option<mpsc::Sender<RaftRequest>>,
    replies: Streaming<RaftReply>,
    sent: VecDeque<Sent>,
    /// When the last request was answered (or the stream opened).
    quiet_since: Instant,
}

/// The sending side of one replication session: yields the follower's answers in the order
/// of openraft's requests.
pub struct Leader<S> {
    group: GroupId,
    target: u64,
    client: Result<PeerClient<PeerChannel>, String>,
    requests: S,
    requests_ended: bool,
    call: Option<OpenCall>,
    /// How long a request may wait for its answer.
    deadline: Duration,
    /// Cleared when the follower does not serve `AppendStream` (a node of an older build
    /// during a rolling upgrade): the connection then sends unary calls.
    streams: Arc<AtomicBool>,
    ended: bool,
}

impl<S> Leader<S>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    pub fn new(
        group: GroupId,
        target: u64,
        client: Result<PeerClient<PeerChannel>, String>,
        requests: S,
        deadline: Duration,
        streams: Arc<AtomicBool>,
    ) -> Self {
        Self {
            group,
            target,
            client,
            requests,
            requests_ended: false,
            call: None,
            deadline,
            streams,
            ended: false,
        }
    }

    /// The session's answers, in order; an error ends it.
    pub fn answers(self) -> impl Stream<Item = Answer> + Send + 'static {
        futures::stream::unfold(self, |mut s| async move {
            let answer = s.next_answer().await?;
            s.ended = answer.is_err();
            Some((answer, s))
        })
    }

    fn request(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> Result<RaftRequest, RpcErr> {
        Ok(RaftRequest {
            group: self.group,
            payload: encode(&format::APPEND_ENTRIES, rpc).map_err(network)?,
        })
    }

    fn sent(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> Sent {
        let span = (!rpc.entries.is_empty()).then(|| {
            tracing::info_span!(
                target: crate::TRACE_TARGET,
                "replicate",
                group = self.group,
                target_node = self.target,
                entries = rpc.entries.len(),
            )
        });
        Sent {
            at: Instant::now(),
            _span: span,
        }
    }

    /// Opens the session's gRPC stream with its first request.
    async fn open(&mut self, rpc: AppendEntriesRequest<TypeConfig>) -> Result<(), RpcErr> {
        let mut client = self.client.clone().map_err(unreachable)?;
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        let first = self.request(&rpc)?;
        let sent = self.sent(&rpc);
        tx.try_send(first)
            .map_err(|_| network("a new request channel refused its first request"))?;
        let opened =
            tokio::time::timeout(self.deadline, client.append_stream(ReceiverStream::new(rx)))
                .await
                .map_err(|_| {
                    network(format!(
                        "opening the append stream to node {} timed out",
                        self.target
                    ))
                })?;
        let replies = match opened {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                self.streams.store(false, Ordering::Relaxed);
                tracing::info!(
                    target_node = self.target,
                    "the peer does not serve append streams; replicating with unary calls"
                );
                return Err(network(format!(
                    "node {} does not serve append streams",
                    self.target
                )));
            }
            Err(status) => return Err(status_error(self.target, &status)),
        };
        self.call = Some(OpenCall {
            requests: Some(tx),
            replies,
            sent: VecDeque::from([sent]),
            quiet_since: Instant::now(),
        });
        Ok(())
    }

    /// The next answer; `None` when openraft ended the session and every request was answered.
    async fn next_answer(&mut self) -> Option<Answer> {
        loop {
            if self.ended {
                return None;
            }
            let Some(call) = self.call.as_mut() else {
                if self.requests_ended {
                    return None;
                }
                let rpc = self.requests.next().await?;
                if let Err(e) = self.open(rpc).await {
                    return Some(Err(e));
                }
                continue;
            };
            let wake_at = match call.sent.front() {
                Some(oldest) => oldest.at + self.deadline,
                None => call.quiet_since + IDLE_CLOSE,
            };
            let may_send = call.requests.is_some() && call.sent.len() < MAX_IN_FLIGHT;
            tokio::select! {
                biased;
                reply = call.replies.message() => match reply {
                    Ok(Some(reply)) => {
                        if call.sent.pop_front().is_none() {
                            return Some(Err(network(format!(
                                "node {} answered a request that was not sent",
                                self.target
                            ))));
                        }
                        if call.sent.is_empty() {
                            call.quiet_since = Instant::now();
                        }
                        return Some(answer_of(self.target, reply));
                    }
                    Ok(None) if call.sent.is_empty() => self.call = None,
                    Ok(None) => {
                        return Some(Err(network(format!(
                            "node {} ended the append stream with {} requests unanswered",
                            self.target,
                            call.sent.len()
                        ))));
                    }
                    Err(status) => return Some(Err(status_error(self.target, &status))),
                },
                rpc = self.requests.next(), if may_send => match rpc {
                    Some(rpc) => {
                        let request = match self.request(&rpc) {
                            Ok(r) => r,
                            Err(e) => return Some(Err(e)),
                        };
                        let sent = self.sent(&rpc);
                        let call = self.call.as_mut()?;
                        let queued = call.requests.as_ref().map(|tx| tx.try_send(request));
                        if !matches!(queued, Some(Ok(()))) {
                            return Some(Err(network(format!(
                                "the append stream to node {} closed",
                                self.target
                            ))));
                        }
                        call.sent.push_back(sent);
                    }
                    None => {
                        // openraft ended the session: close our half, collect what is owed.
                        self.requests_ended = true;
                        call.requests = None;
                    }
                },
                () = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    match call.sent.front() {
                        Some(oldest) if oldest.at + self.deadline <= now => {
                            return Some(Err(network(format!(
                                "a request to node {} timed out",
                                self.target
                            ))));
                        }
                        Some(_) => {}
                        None if call.quiet_since + IDLE_CLOSE <= now => {
                            // Idle: close our half; the follower ends the stream, and the
                            // next request opens a new one.
                            call.requests = None;
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// The follower's side of `Peer.AppendStream`: hands the requests to the group's
/// `Raft::stream_append` and streams its answers back in order.
pub type Replies = Pin<Box<dyn Stream<Item = Result<RaftReply, Status>> + Send>>;

/// Serves one append stream.
pub fn serve<H: GroupHost>(
    host: Arc<H>,
    stats: Arc<AppendStreamStats>,
    inbound: Streaming<RaftRequest>,
) -> Replies {
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    stats.opened.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("junction_peer_append_streams").increment(1.0);
    tokio::spawn(async move {
        let ended = follow(host, inbound, &tx).await;
        stats.open.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("junction_peer_append_streams").decrement(1.0);
        if let Err(status) = ended {
            let _closed = tx.send(Err(status)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

type Out = mpsc::Sender<Result<RaftReply, Status>>;

async fn follow<H: GroupHost>(
    host: Arc<H>,
    mut inbound: Streaming<RaftRequest>,
    out: &Out,
) -> Result<(), Status> {
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    let group = first.group;
    let (requests, rx) = mpsc::channel::<AppendEntriesRequest<TypeConfig>>(MAX_IN_FLIGHT);
    let rx = ReceiverStream::new(rx);
    let mut answers = if group == META_GROUP {
        match host.meta_raft() {
            Some(raft) => raft.stream_append(rx).boxed(),
            None => return not_hosted(out).await,
        }
    } else {
        match host.partition_raft(group) {
            Some(raft) => raft.stream_append(rx).boxed(),
            None => return not_hosted(out).await,
        }
    };
    let mut requests = Some(requests);
    // Per request handed on and not yet answered: whether it carried entries (which wake a
    // quiet partition group once they are in, as over unary calls).
    let mut carried: VecDeque<bool> = VecDeque::new();
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            let rpc = accept(group, req)?;
            carried.push_back(group != META_GROUP && !rpc.entries.is_empty());
            let tx = requests
                .as_ref()
                .ok_or_else(|| Status::internal("a request after the end of the stream"))?;
            tx.try_send(rpc)
                .map_err(|_| Status::internal("the group's append pipeline is full"))?;
        }
        let may_take = requests.is_some() && carried.len() < MAX_IN_FLIGHT;
        tokio::select! {
            biased;
            answer = answers.next() => {
                let Some(answer) = answer else { return Ok(()) };
                if carried.pop_front() == Some(true) {
                    host.wake_group(group);
                }
                let reply = match answer {
                    Ok(result) => RaftReply {
                        payload: encode(&format::STREAM_APPEND_REPLY, &result)
                            .map_err(|e| Status::internal(e.to_string()))?,
                        ..Default::default()
                    },
                    Err(fatal) => RaftReply {
                        error: fatal.to_string(),
                        ..Default::default()
                    },
                };
                if out.send(Ok(reply)).await.is_err() {
                    return Ok(());
                }
            }
            req = inbound.message(), if may_take => match req? {
                Some(req) => next = Some(req),
                // The leader closed its half: answer what is in, then end.
                None => requests = None,
            },
        }
    }
}

/// Decodes and checks one request of the stream of `group`.
fn accept(group: GroupId, req: RaftRequest) -> Result<AppendEntriesRequest<TypeConfig>, Status> {
    if req.group != group {
        return Err(Status::invalid_argument(format!(
            "an append stream of group {group} carried a request for group {}",
            req.group
        )));
    }
    accept_append(group, &req.payload)
}

async fn not_hosted(out: &Out) -> Result<(), Status> {
    let _closed = out
        .send(Ok(RaftReply {
            not_hosted: true,
            ..Default::default()
        }))
        .await;
    Ok(())
}
