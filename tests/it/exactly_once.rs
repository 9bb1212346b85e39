//! Exactly-once produce through a real cluster: idempotent producer batches retried after a
//! lost reply, across a leader change, a snapshot catch-up and a whole-cluster restart;
//! fencing of a named producer's old instance; the message-id dedup window. The calls are raw
//! gRPC, as any client in any language makes them.

use std::time::Duration;

use junction_client::StationSpec;
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::{
    Header, InitProducerRequest, Message, MessagePosition, ProduceRequest, ProducerFields,
    StationPolicy,
};
use openraft::async_runtime::watch::WatchReceiver;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::{TestCluster, local_contents, read_all, wait_until};

async fn broker(cluster: &TestCluster, id: u64) -> BrokerClient<tonic::transport::Channel> {
    BrokerClient::new(cluster.channel(id).await)
}

async fn init(
    b: &mut BrokerClient<tonic::transport::Channel>,
    tenant: &str,
    name: Option<&str>,
) -> (u64, u32) {
    let r = b
        .init_producer(InitProducerRequest {
            tenant: tenant.into(),
            producer_name: name.map(str::to_string),
        })
        .await
        .expect("init producer")
        .into_inner();
    (r.producer_id, r.epoch)
}

fn msgs(partition: u32, payloads: &[&str]) -> Vec<Message> {
    payloads
        .iter()
        .map(|p| Message {
            key: None,
            headers: vec![],
            payload: p.as_bytes().to_vec().into(),
            partition: Some(partition),
            msg_id: None,
        })
        .collect()
}

fn request(station: &str, messages: Vec<Message>, p: (u64, u32), seq: u64) -> ProduceRequest {
    ProduceRequest {
        station: station.into(),
        messages,
        request_id: 0,
        producer: Some(ProducerFields {
            producer_id: p.0,
            epoch: p.1,
            base_sequence: seq,
        }),
    }
}

async fn produce(
    b: &mut BrokerClient<tonic::transport::Channel>,
    req: ProduceRequest,
) -> Result<Vec<MessagePosition>, tonic::Status> {
    b.produce(req).await.map(|r| r.into_inner().positions)
}

fn offsets(p: &[MessagePosition]) -> Vec<(u64, bool)> {
    p.iter().map(|p| (p.offset, p.duplicate)).collect()
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// A batch whose reply was lost is sent again: it is stored once and the retry gets the
/// original offsets, marked duplicate. Gaps, foreign tenants, unknown ids and multi-partition
/// batches are refused with their own codes and reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_batch_is_stored_once_with_its_original_offsets() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("eo", 2, 3).await.expect("create");
    client.create_tenant("other").await.expect("tenant");
    let mut b = broker(&cluster, 1).await;
    let p = init(&mut b, "", None).await;

    let first = produce(&mut b, request("eo", msgs(0, &["a", "b", "c"]), p, 0))
        .await
        .expect("first");
    assert_eq!(offsets(&first), vec![(0, false), (1, false), (2, false)]);
    // The reply is "lost": the client sends the same batch again (here through another node).
    let mut b2 = broker(&cluster, 2).await;
    let again = produce(&mut b2, request("eo", msgs(0, &["a", "b", "c"]), p, 0))
        .await
        .expect("retry");
    assert_eq!(offsets(&again), vec![(0, true), (1, true), (2, true)]);
    let next = produce(&mut b, request("eo", msgs(0, &["d"]), p, 3))
        .await
        .expect("next");
    assert_eq!(offsets(&next), vec![(3, false)]);
    // The same sequence numbers on the other partition are that partition's own.
    let other_partition = produce(&mut b, request("eo", msgs(1, &["x"]), p, 0))
        .await
        .expect("partition 1");
    assert_eq!(offsets(&other_partition), vec![(0, false)]);
    let stored: Vec<_> = read_all(&client, "eo", 0)
        .await
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(stored, vec!["a", "b", "c", "d"]);

    // A gap: OUT_OF_RANGE, with the sequence the partition expects.
    let gap = produce(&mut b, request("eo", msgs(0, &["e"]), p, 9))
        .await
        .expect_err("gap");
    assert_eq!(gap.code(), Code::OutOfRange, "{gap:?}");
    assert_eq!(reason(&gap), "OUT_OF_ORDER_SEQUENCE");
    assert_eq!(
        gap.get_details_error_info()
            .and_then(|i| i.metadata.get("expected_sequence").cloned())
            .as_deref(),
        Some("4")
    );
    // The id belongs to tenant `default`.
    client
        .create_station("other/eo", 1, 3)
        .await
        .expect("create other");
    let foreign = produce(&mut b, request("other/eo", msgs(0, &["f"]), p, 0))
        .await
        .expect_err("foreign tenant");
    assert_eq!(foreign.code(), Code::PermissionDenied, "{foreign:?}");
    assert_eq!(reason(&foreign), "PRODUCER_TENANT_MISMATCH");
    // An id never handed out.
    let unknown = produce(&mut b, request("eo", msgs(0, &["g"]), (0, 0), 0))
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");
    assert_eq!(reason(&unknown), "UNKNOWN_PRODUCER");
    // An idempotent batch spanning two partitions.
    let mut mixed = msgs(0, &["h"]);
    mixed.extend(msgs(1, &["i"]));
    let spans = produce(&mut b, request("eo", mixed, p, 4))
        .await
        .expect_err("two partitions");
    assert_eq!(spans.code(), Code::InvalidArgument);
    assert!(spans.message().contains("one partition"), "{spans:?}");
    // Sequence overflow.
    let overflow = produce(&mut b, request("eo", msgs(0, &["j", "k"]), p, u64::MAX))
        .await
        .expect_err("overflow");
    assert_eq!(overflow.code(), Code::InvalidArgument, "{overflow:?}");
    assert_eq!(reason(&overflow), "SEQUENCE_OVERFLOW");
    // Nothing of the refused batches was stored.
    assert_eq!(read_all(&client, "eo", 0).await.len(), 4);
    assert_eq!(read_all(&client, "eo", 1).await.len(), 1);

    // On a stream, a refused batch's error carries the same reason.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = b
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let mut req = request("eo", msgs(0, &["z"]), p, 40);
    req.request_id = 7;
    tx.send(req).await.expect("send");
    let reply = replies.message().await.expect("reply").expect("one reply");
    let err = reply.error.expect("refused");
    let status =
        tonic::Status::with_details(Code::from_i32(err.code), err.message, err.details.into());
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(reason(&status), "OUT_OF_ORDER_SEQUENCE");

    // Every replica holds the same offsets.
    let s = client.describe_station("eo").await.expect("describe");
    let group = s.partition_info[0].group_id;
    let want = local_contents(&cluster.broker(1), group).await;
    for id in [2, 3] {
        let broker = cluster.broker(id);
        wait_until(Duration::from_secs(10), "replicas to agree", || async {
            (local_contents(&broker, group).await == want).then_some(())
        })
        .await;
    }
    assert_eq!(s.partition_info[0].producers, 1, "{s:?}");
    cluster.shutdown().await;
}

/// Initialising a named producer again fences the previous instance at once (the metadata
/// knows the new epoch), and the new instance starts its sequences at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_named_producer_fences_its_previous_instance() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("fence", 1, 3).await.expect("create");
    let mut b = broker(&cluster, 2).await;
    let old = init(&mut b, "default", Some("billing")).await;
    produce(&mut b, request("fence", msgs(0, &["1", "2"]), old, 0))
        .await
        .expect("old instance");
    let new = init(&mut b, "default", Some("billing")).await;
    assert_eq!((new.0, new.1), (old.0, old.1 + 1));
    let fenced = wait_until(
        Duration::from_secs(10),
        "the old instance to be fenced",
        || async {
            let mut b = broker(&cluster, 3).await;
            produce(&mut b, request("fence", msgs(0, &["3"]), old, 2))
                .await
                .err()
        },
    )
    .await;
    assert_eq!(fenced.code(), Code::FailedPrecondition, "{fenced:?}");
    assert_eq!(reason(&fenced), "FENCED");
    assert!(fenced.message().contains("fenced"), "{fenced:?}");
    let after = produce(&mut b, request("fence", msgs(0, &["3"]), new, 0))
        .await
        .expect("new instance");
    assert_eq!(offsets(&after), vec![(2, false)]);
    // Bad names.
    let bad = b
        .init_producer(InitProducerRequest {
            tenant: "default".into(),
            producer_name: Some("x".repeat(300)),
        })
        .await
        .expect_err("long name");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let nobody = b
        .init_producer(InitProducerRequest {
            tenant: "nobody".into(),
            producer_name: None,
        })
        .await
        .expect_err("unknown tenant");
    assert_eq!(nobody.code(), Code::NotFound);
    cluster.shutdown().await;
}

/// Through the SDK: `ready` holds the identity before any send, so a second instance of a
/// named producer fences the first as soon as it is ready; a producer of a station that does
/// not exist says so from `ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ready_named_producer_fences_the_instance_before_it() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    admin.create_station("ready", 1, 3).await.expect("create");
    let client = junction_client::Client::connect(cluster.addrs()).expect("client");
    let options = junction_client::ProducerOptions::default();
    let first = client.named_producer("ready", "ingest", options);
    first.ready().await.expect("first instance ready");
    let stored = first
        .send(crate::harness::keyed("k", "from the first".to_string()))
        .await
        .expect("the first instance sends");
    assert!(!stored.duplicate);
    let second = client.named_producer("ready", "ingest", options);
    second.ready().await.expect("second instance ready");
    let fenced = first
        .send(crate::harness::keyed("k", "late".to_string()))
        .await
        .expect_err("the first instance is fenced");
    assert!(
        matches!(fenced, junction_client::ClientError::Fenced { .. }),
        "{fenced:?}"
    );
    let after = second
        .send(crate::harness::keyed("k", "from the second".to_string()))
        .await
        .expect("the second instance sends");
    assert_eq!(after.offset, stored.offset + 1, "{after:?}");
    let missing = client.producer("no-such-station", options);
    let e = missing.ready().await.expect_err("unknown station");
    assert!(e.to_string().contains("no-such-station"), "{e}");
    cluster.shutdown().await;
}

/// A retry after the partition leader died, and after a follower that caught up by snapshot
/// became the leader, is still recognised: producer state is replicated and part of the
/// snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_across_a_leader_kill_and_a_snapshot_catch_up_are_stored_once() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.snapshot_every = 50;
        c.keep_logs = 10;
    })
    .await;
    let client = cluster.client();
    let s = client
        .create_station("eo-fail", 1, 3)
        .await
        .expect("create");
    let group = s.partition_info[0].group_id;
    let replicas = s.partition_info[0].replicas.clone();
    let leader = cluster.partition_leader(group).expect("leader");
    let entry = replicas
        .iter()
        .copied()
        .find(|r| *r != leader)
        .expect("other node");
    let mut b = broker(&cluster, entry).await;
    let p = init(&mut b, "", None).await;
    let first = produce(&mut b, request("eo-fail", msgs(0, &["a", "b"]), p, 0))
        .await
        .expect("first");

    cluster.stop(leader).await;
    let retry = wait_until(
        Duration::from_secs(20),
        "a new leader to answer",
        || async {
            produce(
                &mut b.clone(),
                request("eo-fail", msgs(0, &["a", "b"]), p, 0),
            )
            .await
            .ok()
        },
    )
    .await;
    assert_eq!(offsets(&retry), vec![(0, true), (1, true)]);
    assert_eq!(offsets(&first), vec![(0, false), (1, false)]);
    cluster.restart(leader).await;

    // A follower misses many entries and catches up by snapshot.
    let leader = wait_until(Duration::from_secs(20), "a leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let lagging = cluster
        .partition_follower(group, &replicas)
        .expect("follower");
    cluster.stop(lagging).await;
    let entry = replicas
        .iter()
        .copied()
        .find(|r| *r != lagging)
        .expect("running node");
    let mut b = broker(&cluster, entry).await;
    let mut seq = 2;
    for i in 0..200 {
        let batch = msgs(0, &[&format!("m{i}")]);
        produce(&mut b, request("eo-fail", batch, p, seq))
            .await
            .expect("produce while a follower is down");
        seq += 1;
    }
    let last_batch = msgs(0, &["last"]);
    let last = produce(&mut b, request("eo-fail", last_batch.clone(), p, seq))
        .await
        .expect("last");
    cluster.wait_log_purged(leader, group, 100).await;
    cluster.restart(lagging).await;
    let want = local_contents(&cluster.broker(leader), group).await;
    let broker_l = cluster.broker(lagging);
    wait_until(
        Duration::from_secs(30),
        "the follower to catch up",
        || async {
            broker_l.partition(group)?;
            (local_contents(&broker_l, group).await == want).then_some(())
        },
    )
    .await;
    let replica = broker_l.partition(group).expect("replica");
    assert!(
        replica
            .raft
            .metrics()
            .borrow_watched()
            .snapshot
            .is_some_and(|s| s.index >= 100),
        "caught up through a snapshot"
    );
    assert_eq!(replica.shared.exactly_once().producers, 1);
    // Make the caught-up follower the leader (asking whoever leads, again while it does not
    // take: a transfer is dropped when the target lags at that moment), then retry the last
    // batch through it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let current = cluster.partition_leader(group);
        if current == Some(lagging) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the caught-up node did not take the lead (leader {current:?})"
        );
        if let Some(replica) = current.and_then(|l| cluster.broker(l).partition(group)) {
            replica
                .raft
                .trigger()
                .transfer_leader(lagging)
                .await
                .expect("transfer leadership");
        }
        // Give this request two seconds to take effect.
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while cluster.partition_leader(group) != Some(lagging)
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let mut bl = broker(&cluster, lagging).await;
    let retry = produce(&mut bl, request("eo-fail", last_batch, p, seq))
        .await
        .expect("retry on the new leader");
    assert_eq!(retry[0].offset, last[0].offset);
    assert!(retry[0].duplicate);
    assert_eq!(
        read_all(&client, "eo-fail", 0).await.len(),
        203,
        "each message stored once"
    );
    cluster.shutdown().await;
}

/// Producer state and the dedup window survive a restart of every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_state_survives_a_whole_cluster_restart() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station_with(
            StationSpec::new("eo-restart")
                .partitions(1)
                .replication_factor(3)
                .policy(StationPolicy {
                    dedup_window_ms: Some(600_000),
                    ..Default::default()
                }),
        )
        .await
        .expect("create");
    let mut b = broker(&cluster, 1).await;
    let p = init(&mut b, "", None).await;
    let batch = msgs(0, &["a", "b", "c"]);
    let first = produce(&mut b, request("eo-restart", batch.clone(), p, 0))
        .await
        .expect("first");
    let with_id = vec![with_msg_id("order-17", "payload")];
    let stored = produce(&mut b, plain("eo-restart", with_id.clone()))
        .await
        .expect("with id");
    drop(b);
    for id in [1, 2, 3] {
        cluster.stop(id).await;
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    let retry = wait_until(
        Duration::from_secs(30),
        "the cluster to serve again",
        || async {
            let mut b = broker(&cluster, 2).await;
            produce(&mut b, request("eo-restart", batch.clone(), p, 0))
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(offsets(&retry), vec![(0, true), (1, true), (2, true)]);
    assert_eq!(offsets(&first), vec![(0, false), (1, false), (2, false)]);
    let mut b = broker(&cluster, 3).await;
    let again = produce(&mut b, plain("eo-restart", with_id))
        .await
        .expect("again");
    assert_eq!(offsets(&again), vec![(stored[0].offset, true)]);
    assert_eq!(read_all(&client, "eo-restart", 0).await.len(), 4);
    cluster.shutdown().await;
}

fn with_msg_id(id: &str, payload: &str) -> Message {
    Message {
        key: None,
        headers: vec![],
        payload: payload.as_bytes().to_vec().into(),
        partition: Some(0),
        msg_id: Some(id.into()),
    }
}

fn plain(station: &str, messages: Vec<Message>) -> ProduceRequest {
    ProduceRequest {
        station: station.into(),
        messages,
        request_id: 0,
        producer: None,
    }
}

/// The message-id dedup window: ids seen within it are not stored again (in the same batch
/// too), the header and the field are one id, the window expires, and bad settings and ids
/// are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dedup_window_drops_repeated_message_ids() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let spec = |name: &str, window: Option<u64>, max_ids: Option<u32>| {
        StationSpec::new(name)
            .partitions(1)
            .replication_factor(3)
            .policy(StationPolicy {
                dedup_window_ms: window,
                dedup_max_ids: max_ids,
                ..Default::default()
            })
    };
    client
        .create_station_with(spec("dedup", Some(1_500), None))
        .await
        .expect("create");
    let mut b = broker(&cluster, 1).await;
    let first = produce(
        &mut b,
        plain(
            "dedup",
            vec![
                with_msg_id("a", "1"),
                with_msg_id("b", "2"),
                with_msg_id("a", "3"),
            ],
        ),
    )
    .await
    .expect("first");
    assert_eq!(offsets(&first), vec![(0, false), (1, false), (0, true)]);
    // The header form is the same id.
    let mut header = with_msg_id("x", "4");
    header.msg_id = None;
    header.headers.push(Header {
        key: "junction-msg-id".into(),
        value: b"b".to_vec(),
    });
    let second = produce(&mut b, plain("dedup", vec![header, with_msg_id("c", "5")]))
        .await
        .expect("second");
    assert_eq!(offsets(&second), vec![(1, true), (2, false)]);
    // After the window, an id is new again (a later message's timestamp moves the window).
    let expired = wait_until(Duration::from_secs(20), "the window to pass", || async {
        let mut b = b.clone();
        let r = produce(&mut b, plain("dedup", vec![with_msg_id("a", "6")]))
            .await
            .expect("produce");
        (!r[0].duplicate).then_some(r)
    })
    .await;
    assert_eq!(expired[0].offset, 3);
    let s = client.describe_station("dedup").await.expect("describe");
    assert_eq!(
        s.policy.as_ref().and_then(|p| p.dedup_window_ms),
        Some(1_500)
    );
    assert!(s.partition_info[0].dedup_ids >= 1, "{s:?}");

    // A full window refuses the batch, storing none of it.
    client
        .create_station_with(spec("dedup-small", Some(600_000), Some(2)))
        .await
        .expect("create small");
    produce(
        &mut b,
        plain(
            "dedup-small",
            vec![with_msg_id("1", "a"), with_msg_id("2", "b")],
        ),
    )
    .await
    .expect("two ids fit");
    let full = produce(&mut b, plain("dedup-small", vec![with_msg_id("3", "c")]))
        .await
        .expect_err("full");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert_eq!(reason(&full), "DEDUP_WINDOW_FULL");
    assert_eq!(read_all(&client, "dedup-small", 0).await.len(), 2);

    // Bad settings and ids.
    for (window, what) in [(0, "zero"), (8 * 24 * 3_600_000, "eight days")] {
        let e = client
            .create_station_with(spec(&format!("bad-{}", what.len()), Some(window), None))
            .await
            .expect_err(what);
        assert!(e.to_string().contains("dedup window"), "{what}: {e}");
    }
    let long = produce(
        &mut b,
        plain("dedup", vec![with_msg_id(&"i".repeat(257), "x")]),
    )
    .await
    .expect_err("long id");
    assert_eq!(long.code(), Code::InvalidArgument);
    let mut both = with_msg_id("a", "y");
    both.headers.push(Header {
        key: "junction-msg-id".into(),
        value: b"other".to_vec(),
    });
    let conflict = produce(&mut b, plain("dedup", vec![both]))
        .await
        .expect_err("conflicting ids");
    assert_eq!(conflict.code(), Code::InvalidArgument);
    // Without a window, ids are ordinary headers.
    client
        .create_station("no-dedup", 1, 3)
        .await
        .expect("create");
    for _ in 0..2 {
        let r = produce(&mut b, plain("no-dedup", vec![with_msg_id("same", "z")]))
            .await
            .expect("no window");
        assert!(!r[0].duplicate);
    }
    assert_eq!(read_all(&client, "no-dedup", 0).await.len(), 2);
    cluster.shutdown().await;
}

/// The SDK producer (idempotent by default) keeps sending while partition leaders are stopped
/// and restarted: every message is stored exactly once, in send order per key, at the
/// position its send reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sdk_producer_stores_each_message_once_through_leader_kills() {
    use futures::StreamExt;
    use std::collections::BTreeMap;

    let mut cluster = TestCluster::start(3).await;
    let admin = cluster.client();
    let s = admin.create_station("sdk-eo", 2, 3).await.expect("create");
    let groups: Vec<u64> = s.partition_info.iter().map(|p| p.group_id).collect();
    let client = junction_client::Client::connect_with(
        cluster.addrs(),
        junction_client::ClientOptions::default().with_retry_deadline(Duration::from_secs(60)),
    )
    .expect("client");
    let producer = client.producer(
        "sdk-eo",
        junction_client::ProducerOptions {
            max_batch_messages: 20,
            ..Default::default()
        },
    );
    const N: usize = 3000;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let (producer, acked) = (producer.clone(), acked.clone());
        tokio::spawn(async move {
            let sends = futures::stream::iter(0..N).map(|i| {
                let key = format!("k{}", i % 10);
                let fut = producer.send(crate::harness::keyed(&key, format!("{key}:{i}")));
                let acked = acked.clone();
                async move {
                    let r = fut.await;
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (i, r)
                }
            });
            sends.buffered(400).collect::<Vec<_>>().await
        })
    };
    for (round, group) in groups.iter().enumerate() {
        let at = (round + 1) * N / 3;
        wait_until(
            Duration::from_secs(60),
            "messages to be acknowledged",
            || async { (acked.load(std::sync::atomic::Ordering::Relaxed) >= at).then_some(()) },
        )
        .await;
        let leader = cluster.partition_leader(*group).expect("leader");
        cluster.stop(leader).await;
        wait_until(Duration::from_secs(20), "a new leader", || async {
            cluster.partition_leader(*group).filter(|l| *l != leader)
        })
        .await;
        cluster.restart(leader).await;
    }
    let results = tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("every send completes")
        .expect("sender task");
    producer.close().await;
    let mut reported = BTreeMap::new();
    let mut retried = 0;
    for (i, r) in results {
        let p = r.unwrap_or_else(|e| panic!("message {i} failed: {e}"));
        retried += usize::from(p.duplicate);
        reported.insert(i, (p.partition, p.offset));
    }
    eprintln!("{retried} of {N} messages were answered by a retry of a stored batch");
    let mut seen: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let mut last_per_key: BTreeMap<String, usize> = BTreeMap::new();
    for p in 0..2u32 {
        for m in read_all(&admin, "sdk-eo", p).await {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let (key, i) = text.split_once(':').expect("key:i");
            let i: usize = i.parse().expect("number");
            assert!(
                seen.insert(text.clone(), (p, m.offset)).is_none(),
                "{text} stored twice"
            );
            if let Some(prev) = last_per_key.insert(key.to_string(), i) {
                assert!(prev < i, "key {key}: {i} stored after {prev}");
            }
            assert_eq!(reported.get(&i), Some(&(p, m.offset)), "{text}");
        }
    }
    assert_eq!(seen.len(), N, "every message stored");
    cluster.shutdown().await;
}

/// The effectively-once pipeline: a member that produced outputs and crashed before
/// acknowledging its inputs has them delivered again; the outputs it produced are not stored a
/// second time, and the output station holds each input's output once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_that_crashes_between_produce_and_ack_outputs_each_input_once() {
    use std::collections::BTreeMap;

    use junction_client::{GroupOptions, PipelineOptions, output_msg_id};

    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("orders", 2, 3)
        .await
        .expect("create input");
    client
        .create_station("invoices", 1, 3)
        .await
        .expect("create output without a window");
    let refused = client
        .pipeline("orders", "billing", "invoices", PipelineOptions::default())
        .await
        .err()
        .expect("an output without a dedup window is refused");
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    client
        .update_station(
            "invoices",
            StationPolicy {
                dedup_window_ms: Some(600_000),
                ..Default::default()
            },
        )
        .await
        .expect("window");
    const N: usize = 40;
    let inputs: Vec<Message> = (0..N)
        .map(|i| crate::harness::keyed(&format!("c{}", i % 4), format!("order {i}")))
        .collect();
    client.produce("orders", inputs).await.expect("inputs");

    let options = || PipelineOptions {
        group: GroupOptions {
            settings: junction_proto::v1::GroupSettings {
                ack_wait_ms: 60_000,
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    };
    // The first member completes every other delivery; for the rest it produces the output
    // (as `complete` would) and crashes before acknowledging. Deliveries stop once every key
    // waits for an unacknowledged message.
    let mut first = client
        .pipeline("orders", "billing", "invoices", options())
        .await
        .expect("pipeline");
    let mut done = std::collections::BTreeSet::new();
    let mut crashed = std::collections::BTreeSet::new();
    let mut i = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), first.recv()).await {
        let out = invoice(&m);
        if i % 2 == 0 {
            first.complete(&m, vec![out]).await.expect("complete");
            done.insert((m.partition(), m.offset()));
        } else {
            let mut out = out;
            out.msg_id = Some(output_msg_id("orders", m.partition(), m.offset(), 0));
            client.produce("invoices", vec![out]).await.expect("output");
            crashed.insert((m.partition(), m.offset()));
        }
        i += 1;
    }
    assert!(!crashed.is_empty() && !done.is_empty());
    assert!(crashed.is_disjoint(&done));
    // The member is gone (as after a crash and its session's end): its partitions move.
    first.close().await.expect("leave");

    // A new member gets the unacknowledged inputs again, and the rest; it completes them all.
    let mut second = client
        .pipeline("orders", "billing", "invoices", options())
        .await
        .expect("pipeline again");
    let mut redone = 0;
    while done.len() < N {
        let m = tokio::time::timeout(Duration::from_secs(30), second.recv())
            .await
            .expect("delivery")
            .expect("consumer running");
        let at = (m.partition(), m.offset());
        let positions = second
            .complete(&m, vec![invoice(&m)])
            .await
            .expect("complete");
        assert_eq!(
            positions[0].duplicate,
            crashed.contains(&at),
            "an output is a duplicate exactly when the crashed member had produced it"
        );
        redone += usize::from(crashed.contains(&at));
        assert!(done.insert(at), "an acknowledged input came back: {at:?}");
    }
    assert_eq!(
        redone,
        crashed.len(),
        "every crashed input was delivered again"
    );
    second.close().await.expect("close");
    let stored = read_all(&client, "invoices", 0).await;
    let mut per_input: BTreeMap<String, usize> = BTreeMap::new();
    for m in &stored {
        *per_input
            .entry(String::from_utf8_lossy(&m.payload).into_owned())
            .or_default() += 1;
    }
    assert_eq!(per_input.len(), N, "every input has its output");
    assert!(per_input.values().all(|n| *n == 1), "{per_input:?}");
    cluster.shutdown().await;
}

fn invoice(m: &junction_client::GroupMessage) -> Message {
    Message {
        key: m.message.key.clone(),
        headers: vec![],
        payload: format!(
            "invoice for {}",
            String::from_utf8_lossy(&m.message.payload)
        )
        .into_bytes()
        .into(),
        partition: None,
        msg_id: None,
    }
}
