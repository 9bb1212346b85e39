//! The client against an in-process fake Broker that misbehaves on purpose: broken streams,
//! UNAVAILABLE batches, NOT_LEADER redirects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use junction_client::proto::broker_server::{Broker, BrokerServer};
use junction_client::proto::{
    BatchError, Message, MessagePosition, ProduceRequest, ProduceResponse, ReadRequest,
    ReadResponse, StoredMessage, read_request,
};
use junction_client::{Client, ClientOptions, Code, ProducerOptions, Start};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Default)]
struct State {
    partitions: HashMap<u32, Vec<StoredMessage>>,
    /// Break the produce stream (UNAVAILABLE) when this many batches were received in total.
    break_stream_at_batch: Option<usize>,
    /// Reply UNAVAILABLE to this many batches (the first ones) before accepting.
    unavailable_batches: usize,
    /// Unary produce answers NOT_LEADER pointing there.
    redirect_to: Option<String>,
    /// Unary produce answers this code.
    fail_with: Option<Code>,
    /// Tail streams break after this many replies.
    break_tail_after: Option<usize>,
    batches_received: usize,
    unary_calls: usize,
    tail_starts: Vec<Option<read_request::Start>>,
}

impl State {
    fn append(&mut self, messages: &[Message]) -> Vec<MessagePosition> {
        messages
            .iter()
            .map(|m| {
                let partition = m.partition.unwrap_or(0);
                let log = self.partitions.entry(partition).or_default();
                let offset = log.len() as u64;
                log.push(StoredMessage {
                    partition,
                    offset,
                    timestamp_ms: 0,
                    key: m.key.clone(),
                    headers: m.headers.clone(),
                    payload: m.payload.clone(),
                });
                MessagePosition { partition, offset }
            })
            .collect()
    }
}

#[derive(Clone, Default)]
struct Mock {
    state: Arc<Mutex<State>>,
}

enum Action {
    Reply(ProduceResponse),
    Break,
}

#[tonic::async_trait]
impl Broker for Mock {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let req = request.into_inner();
        let mut st = self.state.lock().unwrap();
        st.unary_calls += 1;
        if let Some(leader) = st.redirect_to.clone() {
            let details = ErrorDetails::with_error_info(
                "NOT_LEADER",
                "junction",
                [("leader_addr".to_owned(), leader)],
            );
            return Err(Status::with_error_details(
                Code::FailedPrecondition,
                "not the leader",
                details,
            ));
        }
        if let Some(code) = st.fail_with {
            return Err(Status::new(code, "rejected"));
        }
        let positions = st.append(&req.messages);
        Ok(Response::new(ProduceResponse {
            request_id: req.request_id,
            positions,
            error: None,
        }))
    }

    type ProduceStreamStream = ReceiverStream<Result<ProduceResponse, Status>>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let action = {
                    let mut st = state.lock().unwrap();
                    st.batches_received += 1;
                    if st.break_stream_at_batch == Some(st.batches_received) {
                        Action::Break
                    } else if st.unavailable_batches > 0 {
                        st.unavailable_batches -= 1;
                        Action::Reply(ProduceResponse {
                            request_id: req.request_id,
                            positions: vec![],
                            error: Some(BatchError {
                                code: Code::Unavailable as i32,
                                message: "no leader".into(),
                                leader_addr: String::new(),
                            }),
                        })
                    } else {
                        let positions = st.append(&req.messages);
                        Action::Reply(ProduceResponse {
                            request_id: req.request_id,
                            positions,
                            error: None,
                        })
                    }
                };
                match action {
                    Action::Reply(resp) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        if tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                    }
                    Action::Break => {
                        let _ = tx.send(Err(Status::unavailable("stream broke"))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let req = request.into_inner();
        let st = self.state.lock().unwrap();
        let log = st
            .partitions
            .get(&req.partition)
            .cloned()
            .unwrap_or_default();
        let from = match req.start {
            Some(read_request::Start::Offset(o)) => o as usize,
            _ => 0,
        };
        let messages: Vec<_> = log.iter().skip(from).take(2).cloned().collect();
        Ok(Response::new(ReadResponse {
            next_offset: (from + messages.len()) as u64,
            high_watermark: log.len() as u64,
            start_offset: 0,
            messages,
        }))
    }

    type TailStream = ReceiverStream<Result<ReadResponse, Status>>;

    async fn tail(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let break_after = {
            let mut st = self.state.lock().unwrap();
            st.tail_starts.push(req.start);
            st.break_tail_after
        };
        let mut from = match req.start {
            Some(read_request::Start::Offset(o)) => o as usize,
            _ => 0,
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut replies = 0;
            loop {
                if break_after == Some(replies) {
                    let _ = tx.send(Err(Status::unavailable("tail broke"))).await;
                    return;
                }
                let (messages, hw) = {
                    let st = state.lock().unwrap();
                    let log = st
                        .partitions
                        .get(&req.partition)
                        .cloned()
                        .unwrap_or_default();
                    let messages: Vec<_> = log.iter().skip(from).take(2).cloned().collect();
                    (messages, log.len())
                };
                if messages.is_empty() {
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                from += messages.len();
                let resp = ReadResponse {
                    next_offset: from as u64,
                    high_watermark: hw as u64,
                    start_offset: 0,
                    messages,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                replies += 1;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn start(mock: Mock) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(BrokerServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
    });
    addr
}

fn message(i: usize) -> Message {
    Message {
        key: None,
        headers: vec![],
        payload: Bytes::from(format!("m{i}")),
        partition: Some((i % 3) as u32),
    }
}

fn options() -> ClientOptions {
    ClientOptions::default().with_retry_deadline(Duration::from_secs(5))
}

#[tokio::test]
async fn producer_pipelines_batches() {
    let mock = Mock::default();
    let addr = start(mock.clone()).await;
    let client = Client::connect_with([addr.to_string()], options()).unwrap();
    let producer = client.producer(
        "s",
        ProducerOptions {
            max_batch_messages: 7,
            ..Default::default()
        },
    );
    let futures: Vec<_> = (0..1000).map(|i| producer.send(message(i))).collect();
    producer.flush().await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for (i, f) in futures.into_iter().enumerate() {
        let pos = f.await.unwrap();
        assert_eq!(pos.partition, (i % 3) as u32);
        assert!(seen.insert((pos.partition, pos.offset)));
    }
    producer.close().await;
    let st = mock.state.lock().unwrap();
    assert_eq!(st.partitions.values().map(Vec::len).sum::<usize>(), 1000);
    assert!(st.batches_received >= 1000 / 7);
    // Order within a partition is kept.
    for log in st.partitions.values() {
        let ids: Vec<usize> = log
            .iter()
            .map(|m| {
                std::str::from_utf8(&m.payload).unwrap()[1..]
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}

#[tokio::test]
async fn producer_retries_unavailable_batches_and_broken_streams() {
    let mock = Mock::default();
    {
        let mut st = mock.state.lock().unwrap();
        st.unavailable_batches = 2;
        st.break_stream_at_batch = Some(6);
    }
    let addr = start(mock.clone()).await;
    let client = Client::connect_with([addr.to_string()], options()).unwrap();
    let producer = client.producer(
        "s",
        ProducerOptions {
            max_batch_messages: 10,
            max_in_flight: 3,
            ..Default::default()
        },
    );
    let futures: Vec<_> = (0..200).map(|i| producer.send(message(i))).collect();
    for f in futures {
        f.await.unwrap();
    }
    drop(producer);
    let st = mock.state.lock().unwrap();
    assert_eq!(st.partitions.values().map(Vec::len).sum::<usize>(), 200);
}

#[tokio::test]
async fn producer_fails_when_nothing_answers() {
    let client = Client::connect_with(
        ["127.0.0.1:1"],
        ClientOptions::default().with_retry_deadline(Duration::from_millis(300)),
    )
    .unwrap();
    let producer = client.producer("s", ProducerOptions::default());
    let err = producer.send(message(0)).await.unwrap_err();
    assert!(err.code().is_some(), "{err}");
    producer.close().await;
}

#[tokio::test]
async fn unary_produce_follows_not_leader() {
    let leader = Mock::default();
    let leader_addr = start(leader.clone()).await;
    let follower = Mock::default();
    follower.state.lock().unwrap().redirect_to = Some(leader_addr.to_string());
    let follower_addr = start(follower.clone()).await;

    let client = Client::connect_with([follower_addr.to_string()], options()).unwrap();
    let positions = client
        .produce("s", vec![message(0), message(1)])
        .await
        .unwrap();
    assert_eq!(positions.len(), 2);
    assert_eq!(follower.state.lock().unwrap().unary_calls, 1);
    assert_eq!(leader.state.lock().unwrap().unary_calls, 1);
    assert!(
        client
            .addresses()
            .contains(&format!("http://{leader_addr}"))
    );
}

#[tokio::test]
async fn final_errors_keep_their_code() {
    let mock = Mock::default();
    mock.state.lock().unwrap().fail_with = Some(Code::InvalidArgument);
    let addr = start(mock.clone()).await;
    let client = Client::connect_with([addr.to_string()], options()).unwrap();
    let err = client.produce("s", vec![message(0)]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert_eq!(mock.state.lock().unwrap().unary_calls, 1, "not retried");
}

#[tokio::test]
async fn calls_skip_a_dead_seed() {
    let mock = Mock::default();
    let addr = start(mock.clone()).await;
    let client =
        Client::connect_with(["127.0.0.1:1".to_owned(), addr.to_string()], options()).unwrap();
    client.produce("s", vec![message(0)]).await.unwrap();
    let resp = client.read("s", 0, Start::Earliest, 0).await.unwrap();
    assert_eq!(resp.messages.len(), 1);
}

#[tokio::test]
async fn tail_resumes_after_a_broken_stream() {
    let mock = Mock::default();
    {
        let mut st = mock.state.lock().unwrap();
        let msgs: Vec<_> = (0..9)
            .map(|i| Message {
                partition: Some(0),
                ..message(i)
            })
            .collect();
        st.append(&msgs);
        st.break_tail_after = Some(2);
    }
    let addr = start(mock.clone()).await;
    let client = Client::connect_with([addr.to_string()], options()).unwrap();
    let tail = client.tail("s", 0, Start::Earliest);
    let offsets: Vec<u64> = tail.take(9).map(|m| m.unwrap().offset).collect().await;
    assert_eq!(offsets, (0..9).collect::<Vec<_>>());
    let starts = mock.state.lock().unwrap().tail_starts.clone();
    assert_eq!(
        starts,
        vec![
            Some(read_request::Start::Position(1)),
            Some(read_request::Start::Offset(4)),
            Some(read_request::Start::Offset(8)),
        ]
    );
}

/// A TCP proxy to `target` that can be killed, cutting every connection like a dead node.
async fn proxy(target: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, handle)
}

#[tokio::test]
async fn producer_and_tail_survive_a_dead_node() {
    let mock = Mock::default();
    let first = start(mock.clone()).await;
    let second = start(mock.clone()).await;
    let (proxied, kill) = proxy(first).await;
    let mut kill = Some(kill);
    let client =
        Client::connect_with([proxied.to_string(), second.to_string()], options()).unwrap();

    let tail = client.tail("s", 0, Start::Earliest);
    let reader = tokio::spawn(async move {
        tail.take(300)
            .map(|m| m.unwrap().offset)
            .collect::<Vec<_>>()
            .await
    });

    let producer = client.producer("s", ProducerOptions::default());
    let mut futures = Vec::new();
    for i in 0..300 {
        futures.push(producer.send(Message {
            partition: Some(0),
            ..message(i)
        }));
        if i == 100 {
            producer.flush().await.unwrap();
            if let Some(kill) = kill.take() {
                kill.abort();
                let _ = kill.await;
            }
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for f in futures {
        f.await.unwrap();
    }
    let offsets = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(offsets, (0..300).collect::<Vec<_>>());
    let starts = mock.state.lock().unwrap().tail_starts.clone();
    assert!(starts.len() >= 2, "the tail reconnected: {starts:?}");
}
