//! Consumer groups run by the cluster: assignment and rebalancing, fencing, redelivery,
//! dead letters, per-key order, seek and clone, failover, and independence of groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use junction_client::proto::{self, GroupSettings, StartPosition, group_settings};
use junction_client::{Client, GroupConsumer, GroupMessage, GroupOptions};
use junction_proto::v1::groups_client::GroupsClient;
use tonic_types::StatusExt;

use crate::harness::{TestCluster, keyed, wait_until};

fn settings(ack_wait_ms: u64, max_deliveries: u32) -> GroupSettings {
    GroupSettings {
        start: Some(group_settings::Start::Position(
            StartPosition::Earliest as i32,
        )),
        ack_wait_ms,
        max_deliveries,
        max_in_flight: 0,
        session_timeout_ms: 3000,
        ..Default::default()
    }
}

fn opts(s: GroupSettings) -> GroupOptions {
    GroupOptions {
        settings: s,
        ..GroupOptions::default()
    }
}

async fn produce_keyed(client: &Client, station: &str, keys: usize, per_key: usize, tag: &str) {
    for seq in 0..per_key {
        let msgs = (0..keys)
            .map(|k| keyed(&format!("k{k}"), format!("{tag}:k{k}:{seq}")))
            .collect();
        client.produce(station, msgs).await.expect("produce");
    }
}

/// Receives until `n` distinct (partition, offset) were seen, acking each when `ack`.
async fn consume(c: &mut GroupConsumer, n: usize, ack: bool, limit: Duration) -> Vec<GroupMessage> {
    let deadline = Instant::now() + limit;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, c.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out with {} of {n} messages", seen.len()))
            .expect("consumer stopped");
        if ack {
            c.ack(&m);
        }
        seen.insert((m.partition(), m.offset()));
        out.push(m);
    }
    out
}

fn payload(m: &GroupMessage) -> String {
    String::from_utf8_lossy(&m.message.payload).into_owned()
}

/// Per key, first deliveries come in sequence order.
fn assert_per_key_order(msgs: &[GroupMessage]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in msgs.iter().filter(|m| m.delivery_count == 1) {
        let p = payload(m);
        let parts: Vec<&str> = p.split(':').collect();
        let seq: i64 = parts[2].parse().expect("seq");
        let prev = last.insert(parts[1].to_string(), seq);
        assert!(
            prev.is_none_or(|s| s < seq),
            "key {} out of order: {prev:?} then {seq}",
            parts[1]
        );
    }
}

async fn wait_lag_zero(client: &Client, station: &str, group: &str) {
    wait_until(
        Duration::from_secs(15),
        "group lag to reach zero",
        || async {
            let d = client.describe_group(station, group).await.ok()?;
            (d.partitions.iter().all(|p| p.known && p.lag == 0)).then_some(())
        },
    )
    .await;
}

/// Keeps receiving and acking (redeliveries after a leader change or a lost ack batch are
/// normal at-least-once behaviour) until the group's lag is zero everywhere.
async fn drain_to_zero_lag(c: &mut GroupConsumer, client: &Client, station: &str, group: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = client.describe_group(station, group).await;
        if d.is_ok_and(|d| d.partitions.iter().all(|p| p.known && p.lag == 0)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "group {group} lag did not reach zero"
        );
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
            c.ack(&m);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_consumes_everything_in_key_order_and_resumes_where_it_left_off() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("orders", 4, 3)
        .await
        .expect("station");
    produce_keyed(&client, "orders", 20, 20, "a").await;

    let mut c = client
        .group_consumer("orders", "billing", opts(settings(30_000, 5)))
        .await
        .expect("join");
    let got = consume(&mut c, 400, true, Duration::from_secs(30)).await;
    assert_per_key_order(&got);
    drain_to_zero_lag(&mut c, &client, "orders", "billing").await;
    let d = client
        .describe_group("orders", "billing")
        .await
        .expect("describe");
    assert_eq!(d.members.len(), 1);
    assert_eq!(d.partitions.len(), 4);
    assert_eq!(
        d.partitions.iter().map(|p| p.committed).sum::<u64>(),
        400,
        "{:?}",
        d.partitions
    );
    c.close().await.expect("leave");

    // A new member of the same group starts from the group's position, not from earliest.
    produce_keyed(&client, "orders", 5, 2, "b").await;
    let mut c2 = client
        .group_consumer("orders", "billing", opts(settings(30_000, 5)))
        .await
        .expect("join again");
    let got = consume(&mut c2, 10, true, Duration::from_secs(30)).await;
    assert!(
        got.iter().all(|m| payload(m).starts_with("b:")),
        "only the new messages"
    );
    // ... and nothing older arrives.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(700), c2.recv()).await {
        assert!(
            payload(&m).starts_with("b:"),
            "unexpected message {}",
            payload(&m)
        );
        c2.ack(&m);
    }

    // A second group replays everything from earliest, independently.
    let mut other = client
        .group_consumer("orders", "audit", opts(settings(30_000, 5)))
        .await
        .expect("join audit");
    consume(&mut other, 410, true, Duration::from_secs(30)).await;
    let groups = client.list_groups("orders").await.expect("list");
    let names: BTreeSet<String> = groups.into_iter().map(|g| g.group).collect();
    assert_eq!(
        names,
        BTreeSet::from(["audit".to_string(), "billing".to_string()])
    );
    drop((c2, other));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_rebalance_when_members_join_leave_and_crash() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("events", 6, 3)
        .await
        .expect("station");
    let a = client
        .group_consumer("events", "g", opts(settings(30_000, 5)))
        .await
        .expect("join a");
    wait_until(Duration::from_secs(10), "a owns all 6", || async {
        (a.partitions().len() == 6).then_some(())
    })
    .await;
    let b = client
        .group_consumer("events", "g", opts(settings(30_000, 5)))
        .await
        .expect("join b");
    wait_until(Duration::from_secs(10), "a 3/b 3", || async {
        (a.partitions().len() == 3 && b.partitions().len() == 3).then_some(())
    })
    .await;
    let d = client
        .describe_group("events", "g")
        .await
        .expect("describe");
    assert_eq!(d.members.len(), 2);
    let owners: BTreeSet<Option<String>> =
        d.partitions.iter().map(|p| p.member_id.clone()).collect();
    assert_eq!(owners.len(), 2, "two owners: {owners:?}");

    // A clean leave moves b's partitions at once.
    b.close().await.expect("leave");
    wait_until(Duration::from_secs(10), "a owns all 6 again", || async {
        (a.partitions().len() == 6).then_some(())
    })
    .await;

    // A crashed member (no leave, no heartbeats) is expired after its session timeout.
    let c = client
        .group_consumer("events", "g", opts(settings(30_000, 5)))
        .await
        .expect("join c");
    wait_until(Duration::from_secs(10), "c gets its share", || async {
        (c.partitions().len() == 3).then_some(())
    })
    .await;
    drop(c); // stops its tasks without leaving
    wait_until(Duration::from_secs(15), "c's session to expire", || async {
        let d = client.describe_group("events", "g").await.ok()?;
        (d.members.len() == 1 && a.partitions().len() == 6).then_some(())
    })
    .await;
    drop(a);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_on_an_old_epoch_is_fenced() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("fence", 2, 3).await.expect("station");
    let mut raw = GroupsClient::connect(format!("http://{}", cluster.addr(1)))
        .await
        .expect("connect");
    let join = |m: &str| proto::JoinGroupRequest {
        station: "fence".into(),
        group: "g".into(),
        member_id: m.into(),
        client: "test".into(),
        settings: Some(settings(30_000, 5)),
    };
    let first = raw
        .join_group(join("m1"))
        .await
        .expect("join m1")
        .into_inner();
    assert_eq!(first.partitions.len(), 2);
    let second = raw
        .join_group(join("m2"))
        .await
        .expect("join m2")
        .into_inner();
    assert_eq!(second.partitions.len(), 1);
    let moved = second.partitions[0].partition;
    let old_epoch = first
        .partitions
        .iter()
        .find(|p| p.partition == moved)
        .expect("m1 had it")
        .epoch;
    assert!(second.partitions[0].epoch > old_epoch);

    // m1 still tries to consume the partition it lost: every node refuses, with FENCED.
    let leader = wait_until(
        Duration::from_secs(10),
        "the partition's leader",
        || async {
            let meta = cluster.broker(1).metadata();
            let group = meta.stations.get("default/fence")?.partitions[moved as usize].group_id;
            cluster.partition_leader(group)
        },
    )
    .await;
    let mut on_leader = GroupsClient::connect(format!("http://{}", cluster.addr(leader)))
        .await
        .expect("connect leader");
    let sub = proto::ConsumeRequest {
        request: Some(proto::consume_request::Request::Subscribe(
            proto::Subscribe {
                station: "fence".into(),
                group: "g".into(),
                partition: moved,
                member_id: "m1".into(),
                epoch: old_epoch,
                max_in_flight: 0,
            },
        )),
    };
    // Refused at once, or — when the leader had not applied the rebalance yet — the stream
    // ends with FENCED as soon as it does.
    // The request stream stays open (closing it would be the member leaving).
    let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
    req_tx.send(sub).expect("queue subscribe");
    let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(req_rx);
    let err = match on_leader.consume(requests).await {
        Err(e) => e,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .expect("fenced within 10 s")
                {
                    Err(e) => break e,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without a status"),
                }
            }
        }
    };
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.get_details_error_info().map(|i| i.reason),
        Some("FENCED".to_string())
    );
    // A heartbeat of a member that is not in the group says so.
    let hb = raw
        .heartbeat(proto::HeartbeatRequest {
            station: "fence".into(),
            group: "g".into(),
            member_id: "nobody".into(),
        })
        .await
        .expect_err("unknown member");
    assert_eq!(hb.code(), tonic::Code::NotFound);
    cluster.shutdown().await;
}

/// Opens a consume stream of `member` at `epoch`; the returned sender keeps it open.
async fn open_stream(
    on_leader: &mut GroupsClient<tonic::transport::Channel>,
    station: &str,
    member: &str,
    epoch: u64,
) -> (
    tokio::sync::mpsc::UnboundedSender<proto::ConsumeRequest>,
    tonic::Streaming<proto::ConsumeResponse>,
) {
    let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
    req_tx
        .send(proto::ConsumeRequest {
            request: Some(proto::consume_request::Request::Subscribe(
                proto::Subscribe {
                    station: station.into(),
                    group: "g".into(),
                    partition: 0,
                    member_id: member.into(),
                    epoch,
                    max_in_flight: 0,
                },
            )),
        })
        .expect("queue subscribe");
    let stream = on_leader
        .consume(tokio_stream::wrappers::UnboundedReceiverStream::new(req_rx))
        .await
        .expect("subscribed")
        .into_inner();
    (req_tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_subscribes_again_at_the_same_epoch_keeps_its_new_subscription() {
    // A client that reconnects (or a REST consumer whose pull session ended) subscribes again
    // at the epoch it holds. The new subscription replaces the old; the old one ending
    // afterwards must not take the new one with it.
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("again", 1, 3).await.expect("station");
    let mut raw = GroupsClient::connect(format!("http://{}", cluster.addr(1)))
        .await
        .expect("connect");
    let joined = raw
        .join_group(proto::JoinGroupRequest {
            station: "again".into(),
            group: "g".into(),
            member_id: "m1".into(),
            client: "test".into(),
            settings: Some(settings(30_000, 5)),
        })
        .await
        .expect("join")
        .into_inner();
    let epoch = joined.partitions[0].epoch;
    let leader = wait_until(
        Duration::from_secs(10),
        "the partition's leader",
        || async {
            let meta = cluster.broker(1).metadata();
            let group = meta.stations.get("default/again")?.partitions[0].group_id;
            cluster.partition_leader(group)
        },
    )
    .await;
    let mut on_leader = GroupsClient::connect(format!("http://{}", cluster.addr(leader)))
        .await
        .expect("connect leader");
    let (old_tx, mut old) = open_stream(&mut on_leader, "again", "m1", epoch).await;
    let (new_tx, mut new) = open_stream(&mut on_leader, "again", "m1", epoch).await;
    // The old one is replaced: it ends with FENCED.
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), old.message())
            .await
            .expect("the old subscription ends within 10 s")
        {
            Err(e) => break e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the old subscription ended without a status"),
        }
    };
    assert_eq!(
        err.get_details_error_info().map(|i| i.reason),
        Some("FENCED".to_string()),
        "{err:?}"
    );
    // The old client goes away for good.
    drop(old_tx);
    drop(old);
    produce_keyed(&client, "again", 3, 2, "after").await;
    let mut got = BTreeSet::new();
    while got.len() < 6 {
        let r = tokio::time::timeout(Duration::from_secs(10), new.message())
            .await
            .unwrap_or_else(|_| panic!("the new subscription got {} of 6 messages", got.len()))
            .expect("the new subscription is still open")
            .expect("the new subscription is not ended");
        let mut offsets = Vec::new();
        for d in r.deliveries {
            let m = d.message.expect("a message");
            assert_eq!(d.delivery_count, 1, "first deliveries only");
            got.insert(m.offset);
            offsets.push(m.offset);
        }
        // A key's next message comes once its previous one is acknowledged.
        new_tx
            .send(proto::ConsumeRequest {
                request: Some(proto::consume_request::Request::Ack(proto::Offsets {
                    offsets,
                    attempts: Vec::new(),
                })),
            })
            .expect("ack");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unacked_messages_are_redelivered_then_dead_lettered_in_key_order() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("jobs", 1, 3).await.expect("station");
    client
        .produce(
            "jobs",
            vec![
                keyed("k", "poison"),
                keyed("other", "fine"),
                keyed("k", "after-poison"),
            ],
        )
        .await
        .expect("produce");
    let mut c = client
        .group_consumer("jobs", "workers", opts(settings(300, 3)))
        .await
        .expect("join");
    let mut poison_deliveries = Vec::new();
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !order.contains(&"after-poison".to_string()) {
        let m = tokio::time::timeout(deadline - Instant::now(), c.recv())
            .await
            .expect("deliveries before the deadline")
            .expect("consumer running");
        let p = payload(&m);
        if p == "poison" {
            poison_deliveries.push(m.delivery_count);
            continue; // never acked
        }
        c.ack(&m);
        order.push(p);
    }
    assert_eq!(
        poison_deliveries,
        vec![1, 2, 3],
        "three deliveries, then dead-lettered"
    );
    assert!(
        order.contains(&"fine".to_string()),
        "another key is not held back"
    );

    // The dead letter, with headers explaining it.
    let dls = wait_until(Duration::from_secs(10), "the dead letter", || async {
        let r = client
            .read("jobs.dls", 0, junction_client::Start::Earliest, 10)
            .await
            .ok()?;
        r.messages.into_iter().next()
    })
    .await;
    assert_eq!(&dls.payload[..], b"poison");
    let h: BTreeMap<String, String> = dls
        .headers
        .iter()
        .map(|h| {
            (
                h.key.clone(),
                String::from_utf8_lossy(&h.value).into_owned(),
            )
        })
        .collect();
    assert_eq!(
        h.get("junction-dls-group").map(String::as_str),
        Some("workers")
    );
    assert_eq!(
        h.get("junction-dls-deliveries").map(String::as_str),
        Some("3")
    );
    assert_eq!(h.get("junction-dls-offset").map(String::as_str), Some("0"));
    assert_eq!(
        h.get("junction-dls-station").map(String::as_str),
        Some("default/jobs")
    );
    drain_to_zero_lag(&mut c, &client, "jobs", "workers").await;

    // Resending puts it back on the station, where the group gets it as a new message.
    let r = client
        .resend_dead_letters("jobs", "workers", 0, 0)
        .await
        .expect("resend");
    assert_eq!(r.resent, 1);
    let m = consume(&mut c, 1, true, Duration::from_secs(10)).await;
    assert_eq!(payload(&m[0]), "poison");
    assert_eq!(m[0].delivery_count, 1);
    assert_eq!(m[0].offset(), 3);
    drain_to_zero_lag(&mut c, &client, "jobs", "workers").await;
    drop(c);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seek_and_clone_move_positions_while_running() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("ledger", 2, 3)
        .await
        .expect("station");
    produce_keyed(&client, "ledger", 10, 10, "x").await;
    let mut c = client
        .group_consumer("ledger", "g", opts(settings(30_000, 5)))
        .await
        .expect("join");
    consume(&mut c, 100, true, Duration::from_secs(20)).await;
    drain_to_zero_lag(&mut c, &client, "ledger", "g").await;

    let cloned = client.clone_group("ledger", "g", "h").await.expect("clone");
    assert_eq!(cloned.group, "h");
    wait_lag_zero(&client, "ledger", "h").await;

    // Seek every partition back to earliest: the running member gets everything again.
    client
        .seek_group(
            "ledger",
            "g",
            None,
            proto::seek_group_request::Target::Position(StartPosition::Earliest as i32),
        )
        .await
        .expect("seek");
    let again = consume(&mut c, 100, true, Duration::from_secs(20)).await;
    assert_eq!(again.len(), 100);
    // The clone did not move.
    let h = client
        .describe_group("ledger", "h")
        .await
        .expect("describe h");
    assert!(h.partitions.iter().all(|p| p.lag == 0));

    client.delete_group("ledger", "h").await.expect("delete");
    let e = client
        .describe_group("ledger", "h")
        .await
        .expect_err("deleted");
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    drop(c);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_positions_survive_a_partition_leader_failover() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("pay", 1, 3).await.expect("station");
    produce_keyed(&client, "pay", 10, 20, "p").await;
    let mut c = client
        .group_consumer("pay", "g", opts(settings(30_000, 5)))
        .await
        .expect("join");
    consume(&mut c, 120, true, Duration::from_secs(20)).await;
    let committed = wait_until(Duration::from_secs(10), "120 acks replicated", || async {
        let d = client.describe_group("pay", "g").await.ok()?;
        let p = d.partitions.first()?;
        (p.committed + p.acked_beyond >= 120).then_some(p.committed)
    })
    .await;
    drop(c);

    let group = cluster.broker(1).metadata().stations["default/pay"].partitions[0].group_id;
    let leader = cluster.partition_leader(group).expect("leader");
    cluster.stop(leader).await;
    let mut c2 = client
        .group_consumer("pay", "g", opts(settings(30_000, 5)))
        .await
        .expect("rejoin");
    let rest = consume(
        &mut c2,
        200 - committed as usize,
        true,
        Duration::from_secs(30),
    )
    .await;
    let first = rest.iter().map(GroupMessage::offset).min().expect("some");
    assert!(
        first >= committed,
        "nothing acked before the failover is redelivered"
    );
    let offsets: BTreeSet<u64> = rest.iter().map(GroupMessage::offset).collect();
    assert_eq!(offsets, (committed..200).collect::<BTreeSet<u64>>());
    drop(c2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_group_slows_neither_producers_nor_other_groups() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("feed", 2, 3).await.expect("station");
    let batch = |round: usize| -> Vec<proto::Message> {
        (0..50)
            .map(|i| keyed(&format!("k{i}"), format!("r{round}:{i}")))
            .collect()
    };
    // Baseline: producing with no group at all.
    let t = Instant::now();
    for round in 0..20 {
        client.produce("feed", batch(round)).await.expect("produce");
    }
    let baseline = t.elapsed();

    // A group whose member takes messages and never acks (it holds its in-flight limit)...
    let mut stalled_settings = settings(60_000, 5);
    stalled_settings.max_in_flight = 10;
    let mut stalled = client
        .group_consumer("feed", "stalled", opts(stalled_settings))
        .await
        .expect("join stalled");
    consume(&mut stalled, 20, false, Duration::from_secs(20)).await;
    let t = Instant::now();
    for round in 20..40 {
        client.produce("feed", batch(round)).await.expect("produce");
    }
    let with_stalled = t.elapsed();
    // ... and a healthy group, which reads everything while the stalled one holds its window.
    let mut healthy = client
        .group_consumer("feed", "healthy", opts(settings(30_000, 5)))
        .await
        .expect("join healthy");
    consume(&mut healthy, 2000, true, Duration::from_secs(30)).await;
    drain_to_zero_lag(&mut healthy, &client, "feed", "healthy").await;
    // The stalled member holds its in-flight limit per partition and gets nothing beyond it
    // (only redeliveries of the same offsets, should its delivery restart).
    let mut offsets: BTreeSet<(u32, u64)> = BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), stalled.recv()).await {
        offsets.insert((m.partition(), m.offset()));
    }
    assert!(
        offsets.iter().all(|(_, o)| *o < 10),
        "a stalled member must not get more than max_in_flight: {offsets:?}"
    );
    let d = client
        .describe_group("feed", "stalled")
        .await
        .expect("describe");
    assert_eq!(d.partitions.iter().map(|p| p.lag).sum::<u64>(), 2000);
    eprintln!(
        "independence: 1000 messages produced in {baseline:?} with no group, {with_stalled:?} with a stalled group (ratio {:.2})",
        with_stalled.as_secs_f64() / baseline.as_secs_f64()
    );
    drop((stalled, healthy));
    cluster.shutdown().await;
}

/// Acks race a leader change: what the group sees again afterwards is bounded by what was in
/// flight plus the acks not yet replicated, never the whole partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivery_after_a_leader_change_is_bounded() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("stream", 1, 3)
        .await
        .expect("station");
    for round in 0..20 {
        let msgs = (0..100)
            .map(|i| keyed(&format!("k{}", i % 10), format!("{round}:{i}")))
            .collect();
        client.produce("stream", msgs).await.expect("produce");
    }
    let mut s = settings(30_000, 5);
    s.max_in_flight = 50;
    let mut c = client
        .group_consumer("stream", "g", opts(s))
        .await
        .expect("join");
    let first = consume(&mut c, 700, true, Duration::from_secs(30)).await;
    let group = cluster.broker(1).metadata().stations["default/stream"].partitions[0].group_id;
    let leader = cluster.partition_leader(group).expect("leader");
    cluster.stop(leader).await;
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for m in &first {
        *seen.entry(m.offset()).or_default() += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..2000).any(|o| !seen.contains_key(&o)) {
        assert!(Instant::now() < deadline, "{} of 2000 seen", seen.len());
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
            c.ack(&m);
            *seen.entry(m.offset()).or_default() += 1;
        }
    }
    let again: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!("redelivered after the leader change: {again} of 2000 (max_in_flight 50)");
    assert!(
        again <= 50,
        "redelivery bounded by max_in_flight (unreplicated acks count as in flight): {again}"
    );
    drop(c);
    cluster.shutdown().await;
}

/// The controller (metadata leader) fails over: members keep their session and partitions,
/// and the group goes on from its replicated positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_failover_keeps_members_and_positions() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("ctl", 2, 3).await.expect("station");
    produce_keyed(&client, "ctl", 10, 20, "before").await;
    let mut c = client
        .group_consumer("ctl", "g", opts(settings(30_000, 5)))
        .await
        .expect("join");
    consume(&mut c, 200, true, Duration::from_secs(30)).await;
    drain_to_zero_lag(&mut c, &client, "ctl", "g").await;
    let before = client.describe_group("ctl", "g").await.expect("describe");

    let controller = cluster.wait_for_metadata_leader().await;
    cluster.stop(controller).await;
    let new_controller = cluster.wait_for_metadata_leader().await;
    assert_ne!(new_controller, controller);
    produce_keyed(&client, "ctl", 10, 10, "after").await;
    let got = consume(&mut c, 100, true, Duration::from_secs(30)).await;
    assert!(
        got.iter().all(|m| payload(m).starts_with("after:")),
        "nothing acked before the failover comes again"
    );
    drain_to_zero_lag(&mut c, &client, "ctl", "g").await;
    // Still the same single member, never expired, same generation.
    let after = client.describe_group("ctl", "g").await.expect("describe");
    assert_eq!(after.members.len(), 1);
    assert_eq!(after.members[0].member_id, c.member_id());
    assert_eq!(after.generation, before.generation);
    drop(c);
    cluster.shutdown().await;
}
