//! The Rust SDK against real nodes: pipelined producing (offsets, order), a producer and a
//! tail surviving the stop or `kill -9` of the node they are connected to, a tail resuming
//! after its replica stops (also after idling longer than the retry deadline), skipping a
//! dead seed, final errors keeping their code, retries running out with UNAVAILABLE when
//! every node is down, and the server's NOT_LEADER details matching what the client parses.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use junction_client::{
    Client, ClientError, ClientOptions, Code, Producer, ProducerOptions, Start, TailStream,
};
use junction_proto::v1::{Message, MessagePosition, StoredMessage};
use parking_lot::Mutex;

use crate::harness::{TestCluster, keyed, read_all, wait_until};

fn options(retry_deadline: Duration) -> ClientOptions {
    ClientOptions::default().with_retry_deadline(retry_deadline)
}

fn to_partition(partition: u32, payload: String) -> Message {
    Message {
        key: None,
        headers: vec![],
        payload: payload.into(),
        partition: Some(partition),
        msg_id: None,
    }
}

fn text(m: &StoredMessage) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// An address where nothing listens (a port that was free a moment ago).
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr.to_string()
}

/// Everything a tail delivers, collected by a background task until it is aborted.
struct Collector {
    seen: Arc<Mutex<Vec<StoredMessage>>>,
    task: tokio::task::JoinHandle<Option<ClientError>>,
}

impl Collector {
    fn start(mut tail: TailStream) -> Self {
        let seen: Arc<Mutex<Vec<StoredMessage>>> = Arc::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = tail.next().await {
                match item {
                    Ok(m) => sink.lock().push(m),
                    Err(err) => return Some(err),
                }
            }
            None
        });
        Self { seen, task }
    }

    fn len(&self) -> usize {
        self.seen.lock().len()
    }

    /// Waits until `n` messages arrived (failing on a tail error), then stops the tail.
    async fn wait_for(self, n: usize, limit: Duration) -> Vec<StoredMessage> {
        wait_until(limit, &format!("the tail to deliver {n} messages"), || {
            let done = self.task.is_finished();
            let len = self.len();
            async move {
                assert!(!done, "the tail ended early after {len} messages");
                (len >= n).then_some(())
            }
        })
        .await;
        self.task.abort();
        let _ = self.task.await;
        std::mem::take(&mut *self.seen.lock())
    }
}

/// The tail's next item, failing the test if none comes within 10 s.
async fn next_item(tail: &mut TailStream) -> Option<Result<StoredMessage, ClientError>> {
    tokio::time::timeout(Duration::from_secs(10), tail.next())
        .await
        .expect("the tail answers within 10 s")
}

/// Sends `range` as `m{i}` to partition 0; returns the futures of their positions.
fn send_range(
    producer: &Producer,
    range: std::ops::Range<usize>,
) -> Vec<(usize, junction_client::SendFuture)> {
    range
        .map(|i| (i, producer.send(to_partition(0, format!("m{i}")))))
        .collect()
}

/// Checks one partition after a failover: offsets dense, every acknowledged message stored
/// where it was acknowledged, every payload stored at least once, and the tail saw exactly
/// the stored log, in order, without gaps or repeats.
fn check_partition(
    acked: &BTreeMap<usize, MessagePosition>,
    stored: &[StoredMessage],
    tailed: &[StoredMessage],
    sent: usize,
) {
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(m.offset, i as u64, "offsets are dense");
    }
    for (i, pos) in acked {
        assert_eq!(pos.partition, 0);
        let m = stored
            .get(pos.offset as usize)
            .unwrap_or_else(|| panic!("acknowledged m{i} at offset {} is missing", pos.offset));
        assert_eq!(text(m), format!("m{i}"), "offset {}", pos.offset);
    }
    assert_eq!(acked.len(), sent, "every send was acknowledged");
    let payloads: BTreeSet<String> = stored.iter().map(text).collect();
    for i in 0..sent {
        assert!(payloads.contains(&format!("m{i}")), "m{i} is stored");
    }
    let tailed_offsets: Vec<u64> = tailed.iter().map(|m| m.offset).collect();
    let want: Vec<u64> = (0..stored.len() as u64).collect();
    assert_eq!(tailed_offsets, want, "the tail has no gap and no repeat");
    for (t, s) in tailed.iter().zip(stored) {
        assert_eq!(t.payload, s.payload, "tail and read agree at {}", s.offset);
    }
}

fn small_batches() -> ProducerOptions {
    ProducerOptions {
        max_batch_messages: 7,
        max_in_flight: 8,
        ..ProducerOptions::default()
    }
}

/// A producer with small batches and several in flight, over three partitions: every
/// message is acknowledged at its partition, offsets are dense, and the stored log holds
/// exactly what was acknowledged where it was acknowledged (nothing twice in a healthy
/// cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_pipelines_many_batches() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let station = client.create_station("pipe", 3, 3).await.expect("create");
    let groups: Vec<u64> = station.partition_info.iter().map(|p| p.group_id).collect();
    let terms = || -> Vec<u64> {
        groups
            .iter()
            .map(|g| {
                cluster
                    .running()
                    .into_iter()
                    .filter_map(|n| cluster.broker(n).partition(*g).map(|r| r.term()))
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    };
    let terms_before = terms();
    let producer = client.producer("pipe", small_batches());
    let sends: Vec<_> = (0..1000u32)
        .map(|i| producer.send(to_partition(i % 3, format!("m{i}"))))
        .collect();
    producer.flush().await.expect("flush");
    let mut acked: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
    for (i, send) in (0..).zip(sends) {
        let pos = send.await.expect("acknowledged");
        assert_eq!(pos.partition, i % 3);
        acked
            .entry(pos.partition)
            .or_default()
            .push((pos.offset, i));
    }
    producer.close().await;
    // A leader change (an election on an overloaded machine) makes in-flight batches fail and
    // be retried, which may store them twice until the idempotent producer exists; only a run
    // with stable leaders must hold each message exactly once.
    let stable = terms() == terms_before;
    for p in 0..3 {
        let acked = &acked[&p];
        let stored = read_all(&client, "pipe", p).await;
        for (offset, i) in acked {
            assert_eq!(text(&stored[*offset as usize]), format!("m{i}"));
        }
        if stable {
            assert_eq!(
                stored.len(),
                acked.len(),
                "partition {p} holds each message once"
            );
            let mut offsets: Vec<u64> = acked.iter().map(|(o, _)| *o).collect();
            offsets.sort_unstable();
            assert_eq!(offsets, (0..acked.len() as u64).collect::<Vec<_>>());
        } else {
            eprintln!("leaders changed during the test; duplicates from retries are allowed");
        }
    }
    cluster.shutdown().await;
}

/// Sends 1000 messages to a one-partition station through node `via` with many small
/// batches in flight; returns the offsets in send order.
async fn pipelined_offsets(cluster: &TestCluster, via: u64) -> Vec<u64> {
    let producer = cluster.client_of(via).producer("ordered", small_batches());
    let sends: Vec<_> = (0..1000)
        .map(|i| producer.send(to_partition(0, format!("n{via}-m{i}"))))
        .collect();
    let mut offsets = Vec::new();
    for send in sends {
        offsets.push(send.await.expect("acknowledged").offset);
    }
    producer.close().await;
    offsets
}

async fn ordered_station(cluster: &TestCluster) -> (u64, u64) {
    let s = cluster
        .client()
        .create_station("ordered", 1, 3)
        .await
        .expect("create");
    let group = s.partition_info[0].group_id;
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    (leader, follower)
}

/// Pipelined batches sent to the partition leader are stored in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_keeps_send_order_through_the_leader() {
    let cluster = TestCluster::start(3).await;
    let (leader, _) = ordered_station(&cluster).await;
    let offsets = pipelined_offsets(&cluster, leader).await;
    assert_eq!(offsets, (0..1000).collect::<Vec<_>>());
    cluster.shutdown().await;
}

/// The same through a node that does not lead the partition. It fails: that node forwards
/// each batch of the stream as its own unary call, concurrently, so the leader appends them
/// in whatever order they arrive (a server bug; no retry happens here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_keeps_send_order_through_a_follower() {
    let cluster = TestCluster::start(3).await;
    let (_, follower) = ordered_station(&cluster).await;
    let offsets = pipelined_offsets(&cluster, follower).await;
    let inversions = offsets.windows(2).filter(|w| w[0] > w[1]).count();
    assert_eq!(inversions, 0, "offsets in send order: {offsets:?}");
    cluster.shutdown().await;
}

/// A producer and a tail both connected to the partition leader keep working when that node
/// is stopped: every send is acknowledged, and the tail resumes elsewhere without a gap or a
/// repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_and_tail_survive_stopping_their_node() {
    let mut cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    let s = admin.create_station("survive", 1, 3).await.expect("create");
    let group = s.partition_info[0].group_id;
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    // The leader first: the producer's stream and the tail both go there.
    let mut seeds = vec![cluster.addr(leader)];
    seeds.extend(
        (1..=3)
            .filter(|id| *id != leader)
            .map(|id| cluster.addr(id)),
    );
    let client = Client::connect_with(seeds, options(Duration::from_secs(20))).expect("client");

    let tail = Collector::start(client.tail("survive", 0, Start::Earliest));
    let producer = client.producer("survive", ProducerOptions::default());
    let mut pending = send_range(&producer, 0..100);
    producer.flush().await.expect("flush");
    wait_until(Duration::from_secs(10), "the tail to catch up", || async {
        (tail.len() >= 100).then_some(())
    })
    .await;

    // Messages in flight while the node goes away, and more after.
    pending.extend(send_range(&producer, 100..150));
    cluster.stop(leader).await;
    pending.extend(send_range(&producer, 150..300));
    let mut acked = BTreeMap::new();
    for (i, send) in pending {
        let pos = send
            .await
            .unwrap_or_else(|e| panic!("m{i} not acknowledged: {e}"));
        acked.insert(i, pos);
    }
    producer.close().await;
    let new_leader = wait_until(Duration::from_secs(10), "a new leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    assert_ne!(new_leader, leader);

    let stored = read_all(&client, "survive", 0).await;
    let tailed = tail.wait_for(stored.len(), Duration::from_secs(20)).await;
    check_partition(&acked, &stored, &tailed, 300);
    cluster.shutdown().await;
}

/// A tail served by a follower replica resumes on another node when that replica stops,
/// delivering exactly the messages committed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_resumes_when_its_replica_stops() {
    let mut cluster = TestCluster::start(3).await;
    let s = cluster
        .client()
        .create_station("resume", 1, 3)
        .await
        .expect("create");
    let group = s.partition_info[0].group_id;
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let other = (1..=3)
        .find(|id| *id != leader && *id != follower)
        .expect("a third node");
    let tail_client = Client::connect_with(
        [
            cluster.addr(follower),
            cluster.addr(other),
            cluster.addr(leader),
        ],
        options(Duration::from_secs(20)),
    )
    .expect("client");
    let writer = Client::connect_with(
        [cluster.addr(leader), cluster.addr(other)],
        options(Duration::from_secs(20)),
    )
    .expect("client");

    let tail = Collector::start(tail_client.tail("resume", 0, Start::Earliest));
    for batch in 0..5 {
        let msgs = (0..10)
            .map(|i| keyed("k", format!("a{batch}-{i}")))
            .collect();
        writer.produce("resume", msgs).await.expect("produce");
    }
    wait_until(Duration::from_secs(10), "50 tailed messages", || async {
        (tail.len() >= 50).then_some(())
    })
    .await;
    cluster.stop(follower).await;
    for batch in 0..5 {
        let msgs = (0..10)
            .map(|i| keyed("k", format!("b{batch}-{i}")))
            .collect();
        writer.produce("resume", msgs).await.expect("produce");
    }
    let tailed = tail.wait_for(100, Duration::from_secs(20)).await;
    let offsets: Vec<u64> = tailed.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    let want: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|p| (0..5).flat_map(move |b| (0..10).map(move |i| format!("{p}{b}-{i}"))))
        .collect();
    assert_eq!(tailed.iter().map(text).collect::<Vec<_>>(), want);
    assert_eq!(read_all(&writer, "resume", 0).await.len(), 100);
    cluster.shutdown().await;
}

/// A tail that has been idle for longer than the retry deadline still reconnects when its
/// node stops: the deadline bounds a run of failures, not the time since the last message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_tail_reconnects_after_its_node_stops() {
    let mut cluster = TestCluster::start(3).await;
    cluster
        .client()
        .create_station("idle", 1, 3)
        .await
        .expect("create");
    let deadline = Duration::from_secs(1);
    let client = Client::connect_with(cluster.addrs(), options(deadline)).expect("client");
    let writer = Client::connect_with([cluster.addr(2), cluster.addr(3)], options(deadline * 10))
        .expect("client");
    writer
        .produce("idle", vec![keyed("k", "first")])
        .await
        .expect("produce");
    let mut tail = client.tail("idle", 0, Start::Earliest);
    let first = next_item(&mut tail).await.expect("open").expect("message");
    assert_eq!(text(&first), "first");
    // The scenario itself: nothing to deliver for longer than the retry deadline.
    tokio::time::sleep(deadline + Duration::from_millis(500)).await;
    cluster.stop(1).await; // the node the tail is connected to (the first address)
    writer
        .produce("idle", vec![keyed("k", "second")])
        .await
        .expect("produce");
    let second = next_item(&mut tail)
        .await
        .expect("still open")
        .expect("the tail reconnected");
    assert_eq!((second.offset, text(&second)), (1, "second".to_owned()));
    cluster.shutdown().await;
}

/// A seed where nothing listens is skipped: admin calls, unary produce and read, a producer
/// and a tail all work through the next seed, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_skip_a_dead_seed() {
    let cluster = TestCluster::start(1).await;
    let dead = dead_address();
    let started = Instant::now();
    let client = Client::connect_with(
        [dead.clone(), cluster.addr(1)],
        options(Duration::from_secs(20)),
    )
    .expect("client");
    client.create_station("seeds", 1, 1).await.expect("create");
    let pos = client
        .produce("seeds", vec![keyed("k", "unary")])
        .await
        .expect("produce");
    assert_eq!(pos[0].offset, 0);

    // Fresh clients, so that each kind of call meets the dead seed first.
    let fresh = || {
        Client::connect_with(
            [dead.clone(), cluster.addr(1)],
            options(Duration::from_secs(20)),
        )
        .expect("client")
    };
    let read = fresh()
        .read("seeds", 0, Start::Earliest, 10)
        .await
        .expect("read");
    assert_eq!(read.messages.len(), 1);
    let producer = fresh().producer("seeds", ProducerOptions::default());
    let pos = producer
        .send(keyed("k", "streamed"))
        .await
        .expect("producer send");
    assert_eq!(pos.offset, 1);
    producer.close().await;
    let mut tail = fresh().tail("seeds", 0, Start::Earliest);
    for want in ["unary", "streamed"] {
        let m = next_item(&mut tail)
            .await
            .expect("stream open")
            .expect("message");
        assert_eq!(text(&m), want);
    }
    assert_eq!(client.addresses()[0], format!("http://{dead}"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a refused connection costs one short backoff, not the retry deadline: {:?}",
        started.elapsed()
    );
    cluster.shutdown().await;
}

fn status_code(err: &ClientError) -> Code {
    match err {
        ClientError::Status { code, .. } => *code,
        other => panic!("expected a final status, got {other}"),
    }
}

/// Final errors reach the caller at once with the server's code (as `ClientError::Status`,
/// not retried until the deadline), through unary calls, the producer's stream, and a tail;
/// the producer keeps working after a rejected batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn final_errors_keep_their_code() {
    let cluster = TestCluster::start(3).await;
    let client =
        Client::connect_with(cluster.addrs(), options(Duration::from_secs(30))).expect("client");
    let station = client.create_station("final", 2, 3).await.expect("create");
    let group = station.partition_info[1].group_id;
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let started = Instant::now();

    let err = client
        .produce("missing", vec![keyed("k", "v")])
        .await
        .expect_err("missing station");
    assert_eq!(status_code(&err), Code::NotFound, "{err}");
    let err = client
        .create_station("final", 2, 3)
        .await
        .expect_err("exists");
    assert_eq!(status_code(&err), Code::AlreadyExists, "{err}");
    let err = client
        .read("final", 7, Start::Earliest, 1)
        .await
        .expect_err("no partition 7");
    assert_eq!(status_code(&err), Code::InvalidArgument, "{err}");

    // Through a producer's stream.
    let producer = client.producer("final", ProducerOptions::default());
    let err = producer
        .send(to_partition(5, "x".into()))
        .await
        .expect_err("partition 5 of 2");
    assert_eq!(status_code(&err), Code::InvalidArgument, "{err}");
    let pos = producer
        .send(to_partition(1, "fine".into()))
        .await
        .expect("the producer still works");
    assert_eq!((pos.partition, pos.offset), (1, 0));
    producer.close().await;
    let missing = client.producer("missing", ProducerOptions::default());
    let err = missing
        .send(keyed("k", "v"))
        .await
        .expect_err("missing station");
    assert_eq!(status_code(&err), Code::NotFound, "{err}");
    missing.close().await;

    // A tail from an offset past the end fails once and ends; so does one of a missing station.
    // (Asked of the partition leader: a follower waits for the offset instead.)
    let mut tail = cluster
        .client_of(leader)
        .tail("final", 1, Start::Offset(1_000));
    let err = next_item(&mut tail)
        .await
        .expect("an item")
        .expect_err("bad offset");
    assert_eq!(status_code(&err), Code::OutOfRange, "{err}");
    assert!(next_item(&mut tail).await.is_none(), "the tail ended");
    let mut tail = client.tail("missing", 0, Start::Earliest);
    let err = next_item(&mut tail)
        .await
        .expect("an item")
        .expect_err("missing");
    assert_eq!(status_code(&err), Code::NotFound, "{err}");
    assert!(next_item(&mut tail).await.is_none(), "the tail ended");

    assert!(
        started.elapsed() < Duration::from_secs(15),
        "final errors are not retried: {:?}",
        started.elapsed()
    );
    cluster.shutdown().await;
}

fn assert_exhausted_unavailable(err: &ClientError, deadline: Duration) {
    match err {
        ClientError::RetriesExhausted {
            attempts,
            elapsed,
            code,
            ..
        } => {
            assert_eq!(*code, Code::Unavailable, "{err}");
            assert!(*attempts >= 2, "{err}");
            assert!(*elapsed <= deadline + Duration::from_secs(2), "{err}");
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
}

/// With every node stopped, unary calls, a producer and an open tail give up after the retry
/// deadline with UNAVAILABLE, having tried more than once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_run_out_with_unavailable_when_every_node_is_down() {
    let mut cluster = TestCluster::start(3).await;
    cluster
        .client()
        .create_station("down", 1, 3)
        .await
        .expect("create");
    let deadline = Duration::from_millis(1500);
    let client = Client::connect_with(cluster.addrs(), options(deadline)).expect("client");
    client
        .produce("down", vec![keyed("k", "before")])
        .await
        .expect("produce while up");
    let mut tail = client.tail("down", 0, Start::Earliest);
    let first = next_item(&mut tail).await.expect("open").expect("message");
    assert_eq!(text(&first), "before");
    let producer = client.producer("down", ProducerOptions::default());
    producer
        .send(keyed("k", "streamed"))
        .await
        .expect("producer works while up");
    let second = next_item(&mut tail).await.expect("open").expect("message");
    assert_eq!(text(&second), "streamed");

    for id in 1..=3 {
        cluster.stop(id).await;
    }
    let started = Instant::now();
    let err = client
        .produce("down", vec![keyed("k", "after")])
        .await
        .expect_err("nothing answers");
    assert_exhausted_unavailable(&err, deadline);
    let err = client
        .list_stations(None)
        .await
        .expect_err("nothing answers");
    assert_exhausted_unavailable(&err, deadline);
    let err = producer
        .send(keyed("k", "after"))
        .await
        .expect_err("nothing answers");
    assert_exhausted_unavailable(&err, deadline);
    producer.close().await;
    let err = next_item(&mut tail)
        .await
        .expect("an item")
        .expect_err("nothing answers");
    assert_exhausted_unavailable(&err, deadline);
    assert!(next_item(&mut tail).await.is_none(), "the tail ended");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// NOT_LEADER for real: a node that may not forward (the hop limit is reached) answers with
/// an `ErrorInfo` whose reason and `leader_addr` are the ones the client follows, naming the
/// metadata leader; the client itself never sees it because nodes forward its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_leader_details_name_the_leader() {
    use junction_proto::v1::CreateTenantRequest;
    use junction_proto::v1::admin_client::AdminClient;
    use junction_server::forward::{HOPS_HEADER, MAX_HOPS};
    use tonic_types::StatusExt;

    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_metadata_leader().await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut admin = AdminClient::connect(format!("http://{}", cluster.addr(follower)))
        .await
        .expect("connect");
    let mut req = tonic::Request::new(CreateTenantRequest {
        name: "acme".into(),
    });
    req.metadata_mut().insert(
        HOPS_HEADER,
        MAX_HOPS.to_string().parse().expect("header value"),
    );
    let status = admin.create_tenant(req).await.expect_err("not the leader");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, junction_client::NOT_LEADER_REASON);
    assert_eq!(
        info.metadata.get(junction_client::LEADER_ADDR_KEY),
        Some(&cluster.addr(leader))
    );

    // The SDK's call through the same follower is forwarded and succeeds.
    cluster
        .client_of(follower)
        .create_tenant("acme")
        .await
        .expect("forwarded");
    assert!(
        cluster
            .client_of(leader)
            .list_tenants()
            .await
            .expect("list")
            .contains(&"acme".to_owned())
    );
    cluster.shutdown().await;
}

/// Three real `junction serve` processes, killed with SIGKILL when dropped.
struct Processes {
    dir: tempfile::TempDir,
    grpc: BTreeMap<u64, String>,
    children: BTreeMap<u64, Child>,
}

impl Processes {
    fn start(n: u64) -> Self {
        // Ports outside the ephemeral range: see junction_testkit.
        // Client ports whose peer port is free too, and HTTP ports.
        let ports = junction_testkit::loopback_port_pairs(
            n as usize,
            junction_raft::DEFAULT_PEER_PORT_OFFSET,
        )
        .expect("ports");
        let http_ports = junction_testkit::loopback_ports(n as usize).expect("ports");
        let mut grpc = BTreeMap::new();
        let mut http = BTreeMap::new();
        for ((id, port), http_port) in (1..=n).zip(ports).zip(http_ports) {
            grpc.insert(id, format!("127.0.0.1:{port}"));
            http.insert(id, format!("127.0.0.1:{http_port}"));
        }
        let members = grpc
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut children = BTreeMap::new();
        for id in 1..=n {
            let log = std::fs::File::create(dir.path().join(format!("node{id}.log"))).expect("log");
            let child = Command::new(env!("CARGO_BIN_EXE_junction"))
                .args(["serve", "--id", &id.to_string()])
                .args(["--listen", &grpc[&id], "--http", &http[&id]])
                .arg("--data-dir")
                .arg(dir.path().join(format!("node{id}")))
                .args(["--members", &members])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn junction serve");
            children.insert(id, child);
        }
        Self {
            dir,
            grpc,
            children,
        }
    }

    fn kill9(&mut self, id: u64) {
        if let Some(mut child) = self.children.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.children) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for id in self.grpc.keys() {
                let path = self.dir.path().join(format!("node{id}.log"));
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!(
                    "--- node {id} log (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

/// Like `producer_and_tail_survive_stopping_their_node`, but the node (a real process leading
/// the partition) dies by SIGKILL: connections break without a goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_and_tail_survive_kill_minus_nine_of_their_node() {
    let mut nodes = Processes::start(3);
    let admin = Client::connect(nodes.grpc.values().cloned()).expect("client");
    wait_until(Duration::from_secs(40), "three live nodes", || async {
        let s = admin.cluster_status().await.ok()?;
        (s.metadata_leader.is_some() && s.nodes.iter().filter(|n| n.alive).count() == 3)
            .then_some(())
    })
    .await;
    admin.create_station("killed", 1, 3).await.expect("create");
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        let s = admin.describe_station("killed").await.ok()?;
        s.partition_info[0].leader
    })
    .await;
    let mut seeds = vec![nodes.grpc[&leader].clone()];
    seeds.extend(
        nodes
            .grpc
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, a)| a.clone()),
    );
    let client = Client::connect_with(seeds, options(Duration::from_secs(20))).expect("client");

    let tail = Collector::start(client.tail("killed", 0, Start::Earliest));
    let producer = client.producer("killed", ProducerOptions::default());
    let mut pending = send_range(&producer, 0..100);
    producer.flush().await.expect("flush");
    wait_until(Duration::from_secs(10), "the tail to catch up", || async {
        (tail.len() >= 100).then_some(())
    })
    .await;

    pending.extend(send_range(&producer, 100..150));
    nodes.kill9(leader);
    pending.extend(send_range(&producer, 150..300));
    let mut acked = BTreeMap::new();
    for (i, send) in pending {
        let pos = send
            .await
            .unwrap_or_else(|e| panic!("m{i} not acknowledged: {e}"));
        acked.insert(i, pos);
    }
    producer.close().await;

    let stored = read_all(&client, "killed", 0).await;
    let tailed = tail.wait_for(stored.len(), Duration::from_secs(20)).await;
    check_partition(&acked, &stored, &tailed, 300);
}
