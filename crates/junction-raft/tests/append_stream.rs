//! Replication sessions over `Peer.AppendStream`: a real follower (a partition Raft group on
//! RocksDB) behind a real `Peer` gRPC server on a loopback port, and the leader side of the
//! network sending it openraft's requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{entry, log_id};
use futures::StreamExt;
use junction_proto::peer::NodeStatusResponse;
use junction_proto::peer::peer_server::PeerServer;
use junction_raft::peer_service::AppendStreamStats;
use junction_raft::types::{Entry, MetaRaft, PartitionRaft, TypeConfig, Vote};
use junction_raft::{
    GroupHost, LogStore, NetworkFactory, PartitionShared, PartitionStateMachine, PeerPool,
    PeerService, RaftTuning,
};
use junction_types::{GroupId, NodeId, PartitionCommand, Record};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, StreamAppendError};
use openraft::{EntryPayload, RaftNetworkFactory, RaftNetworkV2};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const GROUP: GroupId = 7;

/// A node hosting one partition group, as a follower.
struct Follower {
    raft: PartitionRaft,
    dir: PathBuf,
}

impl GroupHost for Follower {
    fn node_id(&self) -> NodeId {
        2
    }
    fn meta_raft(&self) -> Option<MetaRaft> {
        None
    }
    fn partition_raft(&self, group: GroupId) -> Option<PartitionRaft> {
        (group == GROUP).then(|| self.raft.clone())
    }
    fn snapshot_dir(&self) -> PathBuf {
        self.dir.clone()
    }
    fn node_status(&self) -> NodeStatusResponse {
        NodeStatusResponse::default()
    }
}

struct Setup {
    addr: String,
    shared: Arc<PartitionShared>,
    streams: Arc<AppendStreamStats>,
    raft: PartitionRaft,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts a follower of group 7 behind a `Peer` server on an ephemeral loopback port.
async fn follower(streams: bool) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = junction_storage::Store::open(&dir.path().join("db")).expect("store");
    let log = LogStore::segmented(store.clone(), GROUP).expect("segment log");
    let sm = PartitionStateMachine::open(store, GROUP, junction_raft::TailBudget::new(1 << 20))
        .expect("state machine");
    let shared = sm.shared();
    let config = RaftTuning::default()
        .config("append-stream-test")
        .expect("config");
    let raft = PartitionRaft::new(
        2,
        config,
        NetworkFactory::new(GROUP, Arc::new(PeerPool::default())),
        log,
        sm,
    )
    .await
    .expect("raft");
    let host = Arc::new(Follower {
        raft: raft.clone(),
        dir: dir.path().join("snapshots"),
    });
    let mut service = PeerService::new(host);
    if !streams {
        service = service.without_append_streams();
    }
    let counts = service.append_streams();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(PeerServer::new(service))
            .serve_with_incoming(incoming)
            .await
            .expect("peer server");
    });
    Setup {
        addr,
        shared,
        streams: counts,
        raft,
        _dir: dir,
        server,
    }
}

/// The leader's connection to the follower for `group`.
async fn connection(addr: &str, group: GroupId) -> junction_raft::network::PeerConnection {
    NetworkFactory::new(group, Arc::new(PeerPool::default()))
        .new_client(
            2,
            &openraft::BasicNode {
                addr: addr.to_owned(),
            },
        )
        .await
}

fn append(payload: &[u8]) -> PartitionCommand {
    PartitionCommand::Append {
        timestamp_ms: 1_700_000_000_000,
        records: vec![Record {
            key: Some(b"k".to_vec()),
            headers: vec![],
            payload: payload.to_vec(),
        }],
    }
    .checked()
}

/// A request of node 1's term-1 leadership: `entries` after `prev` (`None`: from the start of
/// the log, index 0), committed up to `commit`.
fn request(
    prev: Option<u64>,
    entries: Vec<Entry>,
    commit: Option<u64>,
) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: prev.map(log_id),
        entries,
        leader_commit: commit.map(log_id),
    }
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Blank,
    }
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_millis(150))
}

/// Waits until `done` holds, failing after `limit`.
async fn wait_for(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_one_pipelined_stream_closed_when_idle_and_opened_again() {
    let f = follower(true).await;
    let mut conn = connection(&f.addr, GROUP).await;
    let (tx, rx) = mpsc::unbounded_channel();
    // openraft reads a session's answers all along (its replication task waits on them);
    // so does this task, and the test reads them from it.
    let (answer_tx, answer_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut answers = conn
            .stream_append(UnboundedReceiverStream::new(rx), option())
            .await
            .expect("a session starts");
        while let Some(answer) = answers.next().await {
            answer_tx.send(answer).expect("the test reads answers");
        }
    });
    let mut answers = UnboundedReceiverStream::new(answer_rx);

    // Three requests sent before any answer is read: pipelined on one stream.
    tx.send(request(None, vec![blank(0)], None)).unwrap();
    tx.send(request(Some(0), vec![entry(1, append(b"one"))], None))
        .unwrap();
    tx.send(request(Some(1), vec![entry(2, append(b"two"))], None))
        .unwrap();
    for index in 0..=2 {
        let answer = answers.next().await.expect("an answer");
        assert_eq!(
            answer.expect("no network error"),
            Ok(Some(log_id(index))),
            "answers come in the order of the requests"
        );
    }
    assert_eq!(f.streams.opened.load(Ordering::Relaxed), 1);
    assert_eq!(f.streams.open.load(Ordering::Relaxed), 1);

    // Nothing to send: the leader closes the stream (a quiet group holds none) ...
    wait_for(
        junction_raft::append_stream::IDLE_CLOSE * 4,
        "the idle stream closed",
        || f.streams.open.load(Ordering::Relaxed) == 0,
    )
    .await;
    // ... and the same session opens a new one at its next request, which commits.
    tx.send(request(Some(2), vec![entry(3, append(b"three"))], Some(3)))
        .unwrap();
    let answer = answers
        .next()
        .await
        .expect("an answer after the idle close");
    assert_eq!(answer.expect("no network error"), Ok(Some(log_id(3))));
    assert_eq!(f.streams.opened.load(Ordering::Relaxed), 2);
    wait_for(
        Duration::from_secs(10),
        "the committed entries applied",
        || f.shared.current().next_offset == 3,
    )
    .await;

    // openraft ends the session: the stream ends once every request is answered.
    drop(tx);
    assert!(answers.next().await.is_none(), "the session ended");
    reader.await.expect("the reader ends with the session");
    wait_for(Duration::from_secs(10), "the stream closed", || {
        f.streams.open.load(Ordering::Relaxed) == 0
    })
    .await;
    f.raft.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_failures_end_the_session_with_their_reason() {
    let f = follower(true).await;

    // A follower that does not host the group: unreachable, so openraft backs off.
    let mut other = connection(&f.addr, GROUP + 1).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut answers = other
        .stream_append(UnboundedReceiverStream::new(rx), option())
        .await
        .expect("a session starts");
    tx.send(request(None, vec![blank(0)], None)).unwrap();
    let err = answers
        .next()
        .await
        .expect("an answer")
        .expect_err("not hosted");
    assert!(
        matches!(err, openraft::errors::RPCError::Unreachable(_)),
        "{err}"
    );
    assert!(answers.next().await.is_none(), "an error ends the session");
    drop(answers);

    let mut conn = connection(&f.addr, GROUP).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut answers = conn
        .stream_append(UnboundedReceiverStream::new(rx), option())
        .await
        .expect("a session starts");
    tx.send(request(
        None,
        vec![blank(0), entry(1, append(b"one"))],
        None,
    ))
    .unwrap();
    assert_eq!(
        answers.next().await.expect("an answer").expect("answered"),
        Ok(Some(log_id(1)))
    );
    // A request that does not follow the follower's log: the follower names its conflict.
    tx.send(request(Some(4), vec![entry(5, append(b"gap"))], None))
        .unwrap();
    assert_eq!(
        answers.next().await.expect("an answer").expect("answered"),
        Err(StreamAppendError::Conflict(log_id(4)))
    );
    drop(answers);

    // Entries changed on the way (their leader's checksum fails): refused, nothing stored,
    // and the session ends with the reason.
    let (tx, rx) = mpsc::unbounded_channel();
    let mut answers = conn
        .stream_append(UnboundedReceiverStream::new(rx), option())
        .await
        .expect("a session starts");
    let PartitionCommand::Checked { crc, .. } = append(b"three") else {
        panic!("appends are checked")
    };
    let changed = PartitionCommand::Checked {
        crc,
        command: Box::new(PartitionCommand::Append {
            timestamp_ms: 1_700_000_000_000,
            records: vec![Record {
                key: Some(b"k".to_vec()),
                headers: vec![],
                payload: b"threx".to_vec(),
            }],
        }),
    };
    tx.send(request(Some(1), vec![entry(2, changed)], Some(1)))
        .unwrap();
    let err = answers
        .next()
        .await
        .expect("an answer")
        .expect_err("corrupt entries are refused");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(answers.next().await.is_none(), "an error ends the session");
    // The stored log still ends at 1: a request after it is accepted.
    drop(answers);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut answers = conn
        .stream_append(UnboundedReceiverStream::new(rx), option())
        .await
        .expect("a session starts");
    tx.send(request(Some(1), vec![entry(2, append(b"three"))], Some(2)))
        .unwrap();
    assert_eq!(
        answers.next().await.expect("an answer").expect("answered"),
        Ok(Some(log_id(2)))
    );
    wait_for(
        Duration::from_secs(10),
        "the committed entries applied",
        || f.shared.current().next_offset == 2,
    )
    .await;
    f.raft.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_without_append_streams_gets_unary_calls() {
    let f = follower(false).await;
    let mut conn = connection(&f.addr, GROUP).await;

    // The first session learns that the follower does not serve streams ...
    let (tx, rx) = mpsc::unbounded_channel();
    let mut answers = conn
        .stream_append(UnboundedReceiverStream::new(rx), option())
        .await
        .expect("a session starts");
    tx.send(request(None, vec![blank(0)], None)).unwrap();
    let err = answers
        .next()
        .await
        .expect("an answer")
        .expect_err("no stream");
    assert!(err.to_string().contains("append streams"), "{err}");
    drop(answers);

    // ... and the next one replicates with unary calls.
    let (tx, rx) = mpsc::unbounded_channel();
    let mut answers = conn
        .stream_append(UnboundedReceiverStream::new(rx), option())
        .await
        .expect("a session starts");
    tx.send(request(None, vec![blank(0)], None)).unwrap();
    tx.send(request(Some(0), vec![entry(1, append(b"one"))], Some(1)))
        .unwrap();
    for index in 0..=1 {
        assert_eq!(
            answers.next().await.expect("an answer").expect("answered"),
            Ok(Some(log_id(index)))
        );
    }
    wait_for(
        Duration::from_secs(10),
        "the committed entry applied",
        || f.shared.current().next_offset == 1,
    )
    .await;
    assert_eq!(f.streams.opened.load(Ordering::Relaxed), 0);
    f.raft.shutdown().await.expect("shutdown");
}
