//! Key-shared groups ("lanes") through a real cluster: many members share one partition, each
//! key goes to one member at a time and in order, keys move when members come and go, a
//! stale answer is refused, and a group's mode is fixed at creation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use junction_client::proto::{self, GroupMode, GroupSettings, StartPosition, group_settings};
use junction_client::{Client, GroupConsumer, GroupOptions};
use junction_proto::v1::consume_request::Request as ConsumeReq;
use junction_proto::v1::groups_client::GroupsClient;
use junction_proto::v1::{ConsumeRequest, JoinGroupRequest, Nack, Offsets, Subscribe};
use tokio::sync::mpsc;

use crate::harness::{TestCluster, keyed, wait_until};

fn key_shared(ack_wait_ms: u64) -> GroupSettings {
    GroupSettings {
        start: Some(group_settings::Start::Position(
            StartPosition::Earliest as i32,
        )),
        ack_wait_ms,
        max_deliveries: 100,
        session_timeout_ms: 3000,
        mode: GroupMode::KeyShared as i32,
        ..Default::default()
    }
}

/// What the members of a test saw.
#[derive(Default)]
struct Seen {
    /// key → the member working on it now.
    busy: HashMap<String, String>,
    /// Two members (or two messages) of one key at once: must stay empty.
    overlaps: Vec<String>,
    /// key → sequence numbers of first deliveries, in delivery order.
    firsts: BTreeMap<String, Vec<u64>>,
    /// key → sequence numbers of every delivery, in delivery order.
    sightings: BTreeMap<String, Vec<u64>>,
    /// member → messages handled.
    per_member: BTreeMap<String, u64>,
    /// (partition, offset) acknowledged.
    acked: BTreeSet<(u32, u64)>,
}

/// Runs a member until `stop`: for each message, checks that nobody else holds its key,
/// works on it for a moment, then acks.
fn member(mut c: GroupConsumer, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<GroupConsumer> {
    tokio::spawn(async move {
        let me = c.member_id().to_owned();
        let mut n = 0u64;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), c.recv()).await {
            let payload = String::from_utf8_lossy(&m.message.payload).into_owned();
            let parts: Vec<&str> = payload.split(':').collect();
            let (key, seq) = (parts[0].to_owned(), parts[1].parse::<u64>().expect("seq"));
            {
                let mut s = seen.lock().expect("lock");
                if let Some(other) = s.busy.insert(key.clone(), me.clone()) {
                    s.overlaps
                        .push(format!("{key}: {me} got seq {seq} while {other} held it"));
                }
                if m.delivery_count == 1 {
                    s.firsts.entry(key.clone()).or_default().push(seq);
                }
                s.sightings.entry(key.clone()).or_default().push(seq);
            }
            // Work on it: long enough that keys are held while others are delivered.
            n += 1;
            if n.is_multiple_of(7) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            {
                let mut s = seen.lock().expect("lock");
                s.busy.remove(&key);
                *s.per_member.entry(me.clone()).or_default() += 1;
                if c.ack(&m) {
                    s.acked.insert((m.partition(), m.offset()));
                }
            }
        }
        c
    })
}

async fn produce(client: &Client, station: &str, keys: usize, per_key: usize, from: usize) {
    for seq in from..from + per_key {
        let msgs = (0..keys)
            .map(|k| keyed(&format!("k{k}"), format!("k{k}:{seq}")))
            .collect();
        client.produce(station, msgs).await.expect("produce");
    }
}

/// Four members share one partition (then a fifth joins and one leaves): every message is
/// handled, no key is ever with two members at once, first deliveries of a key come in order,
/// and every member gets a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_shared_members_share_a_partition_in_key_order() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("lanes", 1, 3).await.expect("create");
    const KEYS: usize = 200;
    produce(&client, "lanes", KEYS, 5, 0).await;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let options = GroupOptions {
        settings: key_shared(10_000),
        ..GroupOptions::default()
    };
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = client
            .group_consumer("lanes", "workers", options.clone())
            .await
            .expect("join");
        tasks.push(member(c, seen.clone()));
    }
    let info = client
        .describe_group("lanes", "workers")
        .await
        .expect("describe");
    assert_eq!(
        info.settings.as_ref().map(|s| s.mode),
        Some(GroupMode::KeyShared as i32)
    );
    assert_eq!(info.members.len(), 4);
    wait_until(Duration::from_secs(30), "the first 1,000 acks", || async {
        (seen.lock().expect("lock").acked.len() >= KEYS * 5).then_some(())
    })
    .await;
    // A fifth member joins, and more is produced while it settles in.
    let fifth = client
        .group_consumer("lanes", "workers", options.clone())
        .await
        .expect("join");
    tasks.push(member(fifth, seen.clone()));
    produce(&client, "lanes", KEYS, 5, 5).await;
    wait_until(Duration::from_secs(30), "all 2,000 acks", || async {
        (seen.lock().expect("lock").acked.len() >= KEYS * 10).then_some(())
    })
    .await;
    let mut consumers = Vec::new();
    for t in tasks {
        consumers.push(t.await.expect("member task"));
    }
    {
        let s = seen.lock().expect("lock");
        assert!(
            s.overlaps.is_empty(),
            "a key was held twice: {:?}",
            &s.overlaps[..s.overlaps.len().min(5)]
        );
        assert_eq!(s.firsts.len(), KEYS);
        for (key, seqs) in &s.firsts {
            let want: Vec<u64> = (0..10).collect();
            assert_eq!(seqs, &want, "first deliveries of {key}");
        }
        assert_eq!(
            s.per_member.len(),
            5,
            "every member got a share: {:?}",
            s.per_member
        );
    }
    for c in consumers {
        c.close().await.expect("leave");
    }
    cluster.shutdown().await;
}

async fn next(stream: &mut tonic::Streaming<proto::ConsumeResponse>) -> proto::ConsumeResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a response in time")
        .expect("stream")
        .expect("not ended")
}

/// A stale answer (naming an earlier delivery of a message) is refused and finishes
/// nothing; the answer to the current delivery is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_to_an_earlier_delivery_is_refused() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let station = client.create_station("stale", 1, 3).await.expect("create");
    client
        .produce("stale", vec![keyed("k", "only")])
        .await
        .expect("produce");
    let mut g = GroupsClient::new(cluster.channel(1).await);
    let joined = g
        .join_group(JoinGroupRequest {
            station: "stale".into(),
            group: "g".into(),
            member_id: "m1".into(),
            client: String::new(),
            settings: Some(key_shared(60_000)),
        })
        .await
        .expect("join")
        .into_inner();
    let epoch = joined.partitions[0].epoch;
    let group_id = station.partition_info[0].group_id;
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group_id)
    })
    .await;
    let mut g = GroupsClient::new(cluster.channel(leader).await);
    let (tx, rx) = mpsc::unbounded_channel();
    let send = |r: ConsumeReq| {
        tx.send(ConsumeRequest { request: Some(r) }).expect("send");
    };
    send(ConsumeReq::Subscribe(Subscribe {
        station: "stale".into(),
        group: "g".into(),
        partition: 0,
        member_id: "m1".into(),
        epoch,
        max_in_flight: 0,
    }));
    let mut stream = g
        .consume(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("consume")
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.deliveries[0].delivery_count, 1);
    send(ConsumeReq::Nack(Nack {
        offsets: vec![0],
        delay_ms: 0,
        attempts: vec![1],
    }));
    let second = next(&mut stream).await;
    assert_eq!(second.deliveries[0].delivery_count, 2);
    // The late ack of delivery 1: refused, so the message is still out as delivery 2, and a
    // nack of delivery 2 brings it again (had the late ack finished it, nothing would come).
    send(ConsumeReq::Ack(Offsets {
        offsets: vec![0],
        attempts: vec![1],
    }));
    send(ConsumeReq::Nack(Nack {
        offsets: vec![0],
        delay_ms: 0,
        attempts: vec![2],
    }));
    let third = next(&mut stream).await;
    assert_eq!(third.deliveries[0].delivery_count, 3, "{third:?}");
    // Then the ack of delivery 3: the only one committed.
    send(ConsumeReq::Ack(Offsets {
        offsets: vec![0],
        attempts: vec![3],
    }));
    let committed = next(&mut stream).await;
    assert!(committed.deliveries.is_empty(), "{committed:?}");
    assert_eq!(committed.committed_acks, vec![0]);
    assert_eq!(committed.committed, 1);
    cluster.shutdown().await;
}

/// A group's mode is fixed at creation; out-of-range lanes settings are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_groups_mode_is_fixed_and_bad_lanes_are_refused() {
    let cluster = TestCluster::start(1).await;
    let client = cluster.client();
    client.create_station("modes", 1, 1).await.expect("create");
    client
        .create_group("modes", "plain", GroupSettings::default())
        .await
        .expect("a partitioned group");
    let e = client
        .group_consumer(
            "modes",
            "plain",
            GroupOptions {
                settings: key_shared(10_000),
                ..GroupOptions::default()
            },
        )
        .await
        .err()
        .expect("joining a partitioned group as key-shared");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("fixed when it is created"), "{e}");
    let e = client
        .create_group(
            "modes",
            "wide",
            GroupSettings {
                max_in_flight_per_key: 5000,
                ..key_shared(10_000)
            },
        )
        .await
        .expect_err("max_in_flight_per_key out of range");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("max_in_flight_per_key"), "{e}");
    let e = client
        .create_group(
            "modes",
            "odd",
            GroupSettings {
                mode: 9,
                ..GroupSettings::default()
            },
        )
        .await
        .expect_err("unknown mode");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    // A member without a mode joins the key-shared group as it is.
    client
        .create_group("modes", "shared", key_shared(10_000))
        .await
        .expect("a key-shared group");
    let c = client
        .group_consumer("modes", "shared", GroupOptions::default())
        .await
        .expect("join without a mode");
    let info = client
        .describe_group("modes", "shared")
        .await
        .expect("describe");
    assert_eq!(
        info.settings.as_ref().map(|s| s.mode),
        Some(GroupMode::KeyShared as i32)
    );
    c.close().await.expect("leave");
    cluster.shutdown().await;
}

/// The first sight of each sequence number of a key comes after every earlier one
/// (redeliveries of what was seen are allowed): returns where that broke. Every delivery
/// counts, whatever its delivery count: a message a crashed member had buffered comes again
/// with a higher count, and a new leader counts from 1 again.
fn gaps(sightings: &BTreeMap<String, Vec<u64>>) -> Vec<String> {
    let mut out = Vec::new();
    for (key, seqs) in sightings {
        let mut seen = BTreeSet::new();
        for s in seqs {
            if seen.insert(*s) && (0..*s).any(|e| !seen.contains(&e)) {
                out.push(format!(
                    "{key}: {s} before {:?}",
                    (0..*s).find(|e| !seen.contains(e))
                ));
            }
        }
    }
    out
}

/// 1,000 keys and 8 members on one partition: a member crashes (its keys move once their
/// deliveries expire), two join, and then the partition's leader is stopped. Nothing is
/// lost, no key is with two members at once while the leader stands, and each key's messages
/// are first seen in order throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_shared_order_holds_through_a_member_crash_and_a_leader_change() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let station = client.create_station("lanes2", 1, 3).await.expect("create");
    let group_id = station.partition_info[0].group_id;
    const KEYS: usize = 1000;
    produce(&client, "lanes2", KEYS, 2, 0).await;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let options = GroupOptions {
        settings: key_shared(2_000),
        ..GroupOptions::default()
    };
    // Every member sees all messages through this: first sight per key, across redeliveries.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client
            .group_consumer("lanes2", "crowd", options.clone())
            .await
            .expect("join");
        let id = c.member_id().to_owned();
        tasks.push((id, member(c, seen.clone())));
    }
    wait_until(Duration::from_secs(30), "some progress", || async {
        (seen.lock().expect("lock").acked.len() >= KEYS / 2).then_some(())
    })
    .await;
    // A crash: the member stops without leaving; what it held waits for ack_wait.
    let (crashed, task) = tasks.remove(0);
    task.abort();
    let _ = task.await;
    seen.lock()
        .expect("lock")
        .busy
        .retain(|_, holder| *holder != crashed);
    for _ in 0..2 {
        let c = client
            .group_consumer("lanes2", "crowd", options.clone())
            .await
            .expect("join");
        let id = c.member_id().to_owned();
        tasks.push((id, member(c, seen.clone())));
    }
    produce(&client, "lanes2", KEYS, 2, 2).await;
    wait_until(Duration::from_secs(60), "4,000 acks", || async {
        (seen.lock().expect("lock").acked.len() >= KEYS * 4).then_some(())
    })
    .await;
    {
        let s = seen.lock().expect("lock");
        assert!(
            s.overlaps.is_empty(),
            "a key was held twice: {:?}",
            &s.overlaps[..s.overlaps.len().min(5)]
        );
    }
    // The partition's leader goes; the members follow the new one.
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group_id)
    })
    .await;
    cluster.stop(leader).await;
    let client = cluster.client_of(
        cluster
            .running()
            .into_iter()
            .next()
            .expect("a running node"),
    );
    produce(&client, "lanes2", KEYS, 2, 4).await;
    wait_until(Duration::from_secs(90), "6,000 acks", || async {
        (seen.lock().expect("lock").acked.len() >= KEYS * 6).then_some(())
    })
    .await;
    for (_, t) in tasks {
        t.abort();
    }
    {
        let s = seen.lock().expect("lock");
        assert_eq!(s.sightings.len(), KEYS);
        let broken = gaps(&s.sightings);
        assert!(
            broken.is_empty(),
            "keys seen out of order: {:?}",
            &broken[..broken.len().min(5)]
        );
        for (key, seqs) in &s.sightings {
            let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
            assert_eq!(distinct, (0..6).collect(), "{key}: nothing lost");
        }
    }
    cluster.shutdown().await;
}

/// Two members, each running up to 16 handlers at once through `GroupConsumer::process`:
/// every message is handled, failed handlers' messages come again, and no key is ever in two
/// handlers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_handlers_keep_each_key_to_one_at_a_time() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("pool", 2, 3).await.expect("create");
    const KEYS: usize = 50;
    produce(&client, "pool", KEYS, 8, 0).await;
    let busy: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let overlaps: Arc<Mutex<u64>> = Arc::default();
    let handled: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let failures: Arc<Mutex<u64>> = Arc::default();
    let options = GroupOptions {
        settings: key_shared(10_000),
        ..GroupOptions::default()
    };
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let mut c = client
            .group_consumer("pool", "pool", options.clone())
            .await
            .expect("join");
        let (busy, overlaps, handled, failures) = (
            busy.clone(),
            overlaps.clone(),
            handled.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            c.process(16, Duration::ZERO, move |m| {
                let (busy, overlaps, handled, failures) = (
                    busy.clone(),
                    overlaps.clone(),
                    handled.clone(),
                    failures.clone(),
                );
                async move {
                    let payload = String::from_utf8_lossy(&m.message.payload).into_owned();
                    let key = payload.split(':').next().unwrap_or_default().to_owned();
                    if busy
                        .lock()
                        .expect("lock")
                        .insert(key.clone(), m.offset())
                        .is_some()
                    {
                        *overlaps.lock().expect("lock") += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    busy.lock().expect("lock").remove(&key);
                    // Every message's first delivery fails once when its offset ends in 3.
                    if m.delivery_count == 1 && m.offset() % 10 == 3 {
                        *failures.lock().expect("lock") += 1;
                        return Err("a transient failure");
                    }
                    handled.lock().expect("lock").insert(payload);
                    Ok(())
                }
            })
            .await;
            c
        }));
    }
    wait_until(Duration::from_secs(30), "every message handled", || async {
        (handled.lock().expect("lock").len() >= KEYS * 8).then_some(())
    })
    .await;
    assert_eq!(
        *overlaps.lock().expect("lock"),
        0,
        "a key was in two handlers at once"
    );
    assert!(
        *failures.lock().expect("lock") > 0,
        "some handlers failed and were retried"
    );
    for t in tasks {
        t.abort();
    }
    cluster.shutdown().await;
}

/// A member that crashed holds the heads of keys `a` and `b` until `ack_wait` (60 s) passes,
/// and the dispatcher's window (256 messages, the least) is full of those keys' later
/// messages. A message of key `c` produced after them still reaches the member that is left
/// long before then: while nothing it holds can go, the dispatcher reads past its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_held_by_a_crashed_member_do_not_hold_up_the_others() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("held", 1, 3).await.expect("create");
    for batch in 0..4 {
        let msgs = (0..100)
            .map(|i| {
                let seq = batch * 50 + i / 2;
                let key = if i % 2 == 0 { "a" } else { "b" };
                keyed(key, format!("{key}:{seq}"))
            })
            .collect();
        client.produce("held", msgs).await.expect("produce");
    }
    let options = GroupOptions {
        settings: GroupSettings {
            max_in_flight: 10,
            ..key_shared(60_000)
        },
        ..GroupOptions::default()
    };
    let mut crashing = client
        .group_consumer("held", "g", options.clone())
        .await
        .expect("join");
    let mut heads = BTreeSet::new();
    while heads.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(20), crashing.recv())
            .await
            .expect("the heads of a and b within 20 s")
            .expect("a message");
        heads.insert(String::from_utf8_lossy(&m.message.payload).into_owned());
    }
    assert_eq!(
        heads,
        BTreeSet::from(["a:0".to_owned(), "b:0".to_owned()]),
        "one message per key at a time"
    );
    // The crash: dropped without acking or leaving.
    drop(crashing);
    client
        .produce("held", vec![keyed("c", "c:0".to_owned())])
        .await
        .expect("produce c");
    let mut other = client
        .group_consumer("held", "g", options)
        .await
        .expect("join");
    let m = tokio::time::timeout(Duration::from_secs(20), other.recv())
        .await
        .expect("key c within 20 s, not after a and b's 60 s ack_wait")
        .expect("a message");
    assert_eq!(String::from_utf8_lossy(&m.message.payload), "c:0");
    assert_eq!(m.delivery_count, 1);
    assert!(other.ack(&m));
    cluster.shutdown().await;
}
