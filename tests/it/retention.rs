//! Retention (messages, bytes, age, discard new), key compaction and station policies, on
//! real three-node clusters: limits hold within a retention tick or two, every replica cuts
//! at the same offset and holds the same messages, and restarts and snapshot catch-up keep
//! the cut.

use std::time::{Duration, Instant};

use junction_client::proto::{
    self as pb, CompactionPolicy, DiscardPolicy, Header, Message, RetentionPolicy, StationInfo,
    StationPolicy, StorageTier,
};
use junction_client::{Client, Code, Start, StationSpec};
use junction_server::Config;
use openraft::async_runtime::watch::WatchReceiver;

use crate::cli::{ok, ok_json, row, run};
use crate::harness::{TestCluster, keyed, local_contents, read_all, wait_until};

const TICK_MS: u64 = 100;

fn fast(c: &mut Config) {
    c.retention_tick_ms = TICK_MS;
    c.compaction_every_ms = 200;
}

fn policy(f: impl FnOnce(&mut StationPolicy, &mut RetentionPolicy)) -> StationPolicy {
    let mut p = StationPolicy::default();
    let mut r = RetentionPolicy::default();
    f(&mut p, &mut r);
    p.retention = Some(r);
    p
}

async fn create(client: &Client, name: &str, p: StationPolicy) -> StationInfo {
    client
        .create_station_with(
            StationSpec::new(name)
                .partitions(1)
                .replication_factor(3)
                .policy(p),
        )
        .await
        .expect("create station")
}

/// An unkeyed message with a 10-byte payload.
fn ten_bytes(n: u64) -> Message {
    Message {
        key: None,
        headers: vec![],
        payload: format!("{n:010}").into_bytes().into(),
        partition: None,
        msg_id: None,
    }
}

fn tombstone(key: &str) -> Message {
    Message {
        key: Some(key.as_bytes().to_vec()),
        headers: vec![Header {
            key: "tombstone".into(),
            value: vec![],
        }],
        payload: Vec::new().into(),
        partition: None,
        msg_id: None,
    }
}

async fn produce_ten_byte_messages(client: &Client, station: &str, from: u64, count: u64) {
    produce_in_batches(client, station, from, count, 50).await;
}

async fn produce_in_batches(client: &Client, station: &str, from: u64, count: u64, size: u64) {
    let mut n = from;
    while n < from + count {
        let batch: Vec<Message> = (n..(n + size).min(from + count)).map(ten_bytes).collect();
        n += batch.len() as u64;
        client.produce(station, batch).await.expect("produce");
    }
}

/// (start, next) of `group` on node `id`.
fn offsets(cluster: &TestCluster, id: u64, group: u64) -> Option<(u64, u64)> {
    let s = cluster.broker(id).partition(group)?.shared.current();
    Some((s.start_offset, s.next_offset))
}

/// Waits until every running replica has `(start, next)` and the same messages; returns them.
async fn replicas_agree(
    cluster: &TestCluster,
    group: u64,
    want: (u64, u64),
) -> Vec<(u64, bytes::Bytes)> {
    wait_until(
        Duration::from_secs(15),
        &format!("every replica of group {group} at {want:?} with equal contents"),
        || async {
            let nodes = cluster.running();
            let mut first: Option<Vec<(u64, bytes::Bytes)>> = None;
            for id in nodes {
                if offsets(cluster, id, group) != Some(want) {
                    return None;
                }
                let c = local_contents(&cluster.broker(id), group).await;
                match &first {
                    None => first = Some(c),
                    Some(f) if *f == c => {}
                    Some(_) => return None,
                }
            }
            first
        },
    )
    .await
}

/// Waits until the partition leader's first offset is `want`; returns how long it took.
/// Waits until the leader of `group` has run `n` more retention passes.
async fn wait_for_retention_passes(cluster: &TestCluster, group: u64, n: u64) {
    let leader = cluster.partition_leader(group).expect("leader");
    let start = cluster.broker(leader).retention_passes();
    wait_until(
        Duration::from_secs(10),
        "retention passes on the partition leader",
        || async { (cluster.broker(leader).retention_passes() >= start + n).then_some(()) },
    )
    .await;
}

async fn leader_cuts_at(cluster: &TestCluster, group: u64, want: u64) -> Duration {
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(5),
        &format!("the leader of group {group} to cut at {want}"),
        || async {
            let leader = cluster.partition_leader(group)?;
            (offsets(cluster, leader, group)?.0 == want).then_some(())
        },
    )
    .await;
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_limit_holds_on_every_replica() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(&client, "capped", policy(|_, r| r.max_messages = Some(100))).await;
    let group = s.partition_info[0].group_id;
    produce_ten_byte_messages(&client, "capped", 0, 1000).await;
    let took = leader_cuts_at(&cluster, group, 900).await;
    eprintln!("message limit enforced {took:?} after the last produce (tick {TICK_MS} ms)");
    assert!(
        took <= Duration::from_millis(3 * TICK_MS + 500),
        "limit held only after {took:?}"
    );
    let contents = replicas_agree(&cluster, group, (900, 1000)).await;
    assert_eq!(contents.len(), 100);
    assert_eq!(contents[0].0, 900);

    // Reading below the first offset says so and starts at the first offset.
    let r = client
        .read("capped", 0, Start::Offset(0), 10)
        .await
        .expect("read");
    assert!(r.below_start);
    assert_eq!(r.start_offset, 900);
    assert_eq!(r.messages[0].offset, 900);
    assert_eq!(&r.messages[0].payload[..], b"0000000900");
    let r = client
        .read("capped", 0, Start::Offset(950), 10)
        .await
        .expect("read");
    assert!(!r.below_start);
    assert_eq!(r.messages[0].offset, 950);

    let d = client.describe_station("capped").await.expect("describe");
    let p = &d.partition_info[0];
    assert_eq!(
        (p.start_offset, p.next_offset, p.messages, p.bytes),
        (900, 1000, 100, 1000)
    );
    let r = d.policy.expect("policy").retention.expect("retention");
    assert_eq!(r.max_messages, Some(100));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn byte_and_age_limits_hold_and_can_be_changed() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(&client, "sized", policy(|_, r| r.max_bytes = Some(1000))).await;
    let group = s.partition_info[0].group_id;
    produce_ten_byte_messages(&client, "sized", 0, 300).await;
    let took = leader_cuts_at(&cluster, group, 200).await;
    eprintln!("byte limit enforced {took:?} after the last produce");
    replicas_agree(&cluster, group, (200, 300)).await;
    let d = client.describe_station("sized").await.expect("describe");
    assert_eq!(d.partition_info[0].bytes, 1000);
    assert_eq!(d.partition_info[0].messages, 100);

    // Add an age limit: everything produced so far expires, newer messages stay.
    let mut p = d.policy.expect("policy");
    p.retention.as_mut().expect("retention").max_age_ms = Some(2000);
    let updated = client.update_station("sized", p).await.expect("update");
    let r = updated
        .policy
        .expect("policy")
        .retention
        .expect("retention");
    assert_eq!((r.max_age_ms, r.max_bytes), (Some(2000), Some(1000)));
    leader_cuts_at_within(&cluster, group, 300, Duration::from_secs(8)).await;
    replicas_agree(&cluster, group, (300, 300)).await;
    produce_ten_byte_messages(&client, "sized", 300, 5).await;
    let fresh = client
        .read("sized", 0, Start::Offset(0), 100)
        .await
        .expect("read");
    assert_eq!(fresh.messages.len(), 5, "fresh messages are kept");
    assert!(fresh.below_start);
    // And they expire too.
    leader_cuts_at_within(&cluster, group, 305, Duration::from_secs(8)).await;
    let d = client.describe_station("sized").await.expect("describe");
    assert_eq!(
        (d.partition_info[0].messages, d.partition_info[0].bytes),
        (0, 0)
    );
    cluster.shutdown().await;
}

async fn leader_cuts_at_within(cluster: &TestCluster, group: u64, want: u64, limit: Duration) {
    wait_until(
        limit,
        &format!("group {group} to cut at {want}"),
        || async {
            let leader = cluster.partition_leader(group)?;
            (offsets(cluster, leader, group)?.0 == want).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discard_new_refuses_produces_with_resource_exhausted() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(
        &client,
        "bounded",
        policy(|p, r| {
            r.max_messages = Some(10);
            p.discard = DiscardPolicy::New as i32;
        }),
    )
    .await;
    let group = s.partition_info[0].group_id;
    produce_ten_byte_messages(&client, "bounded", 0, 10).await;
    let e = client
        .produce("bounded", vec![ten_bytes(10)])
        .await
        .expect_err("the eleventh message does not fit");
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("discards new"), "{e}");
    // Several retention passes later nothing was removed.
    wait_for_retention_passes(&cluster, group, 5).await;
    assert_eq!(replicas_agree(&cluster, group, (0, 10)).await.len(), 10);

    // A bigger limit admits more, up to the new limit.
    let d = client.describe_station("bounded").await.expect("describe");
    let mut p = d.policy.expect("policy");
    p.retention.as_mut().expect("retention").max_messages = Some(15);
    client.update_station("bounded", p).await.expect("update");
    wait_until(
        Duration::from_secs(5),
        "the new limit to admit produces",
        || async {
            client
                .produce("bounded", vec![ten_bytes(10)])
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    produce_ten_byte_messages(&client, "bounded", 11, 4).await;
    let e = client
        .produce("bounded", vec![ten_bytes(99)])
        .await
        .expect_err("full again");
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    replicas_agree(&cluster, group, (0, 15)).await;

    // A byte limit refuses as well.
    create(
        &client,
        "bounded-bytes",
        policy(|p, r| {
            r.max_bytes = Some(100);
            p.discard = DiscardPolicy::New as i32;
        }),
    )
    .await;
    produce_ten_byte_messages(&client, "bounded-bytes", 0, 10).await;
    let e = client
        .produce("bounded-bytes", vec![ten_bytes(10)])
        .await
        .expect_err("100 bytes are used");
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert!(e.to_string().contains("bytes"), "{e}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_survives_restart_and_snapshot_catch_up() {
    let mut cluster = TestCluster::start_with(3, |c| {
        fast(c);
        c.snapshot_every = 50;
        c.keep_logs = 10;
    })
    .await;
    let client = cluster.client();
    let s = create(&client, "kept", policy(|_, r| r.max_messages = Some(500))).await;
    let group = s.partition_info[0].group_id;
    let follower = cluster
        .partition_follower(group, &s.partition_info[0].replicas)
        .expect("follower");
    cluster.stop(follower).await;
    // Small batches: enough Raft entries for snapshots and log purges.
    produce_in_batches(&client, "kept", 0, 3000, 10).await;
    leader_cuts_at(&cluster, group, 2500).await;
    let leader = cluster.partition_leader(group).expect("leader");
    wait_until(
        Duration::from_secs(20),
        "the leader to purge its log",
        || async {
            let r = cluster.broker(leader).partition(group)?;
            let purged = r.raft.metrics().borrow_watched().purged.map(|l| l.index);
            purged.filter(|p| *p >= 100)
        },
    )
    .await;

    cluster.restart(follower).await;
    let contents = replicas_agree(&cluster, group, (2500, 3000)).await;
    assert_eq!(contents.len(), 500);
    let snap = cluster
        .broker(follower)
        .partition(group)
        .expect("replica")
        .raft
        .metrics()
        .borrow_watched()
        .snapshot;
    assert!(
        snap.is_some_and(|s| s.index >= 100),
        "caught up by snapshot: {snap:?}"
    );

    // Restarting every node keeps the cut and the contents.
    for id in [1, 2, 3] {
        cluster.stop(id).await;
        cluster.restart(id).await;
    }
    cluster.wait_for_metadata_leader().await;
    let after = replicas_agree(&cluster, group, (2500, 3000)).await;
    assert_eq!(after, contents);
    let d = cluster
        .client()
        .describe_station("kept")
        .await
        .expect("describe");
    assert_eq!(d.partition_info[0].messages, 500);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_keeps_the_newest_per_key_on_every_replica() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(
        &client,
        "table",
        policy(|p, _| {
            p.compaction = CompactionPolicy::Key as i32;
            p.tombstone_delay_ms = Some(1);
        }),
    )
    .await;
    let group = s.partition_info[0].group_id;
    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let mut last_offset = std::collections::BTreeMap::new();
    for round in 0..10 {
        let msgs: Vec<Message> = keys
            .iter()
            .map(|k| keyed(k, format!("{k}={round}")))
            .collect();
        let pos = client.produce("table", msgs).await.expect("produce");
        for (k, p) in keys.iter().zip(pos) {
            last_offset.insert(k.clone(), p.offset);
        }
    }
    client
        .produce("table", vec![tombstone("k3")])
        .await
        .expect("tombstone");
    last_offset.remove("k3");
    let want_offsets: Vec<u64> = {
        let mut v: Vec<u64> = last_offset.values().copied().collect();
        v.sort_unstable();
        v
    };
    let contents = wait_until(
        Duration::from_secs(10),
        "compaction to keep one message per live key on every replica",
        || async {
            let mut first = None;
            for id in cluster.running() {
                let c = local_contents(&cluster.broker(id), group).await;
                let offs: Vec<u64> = c.iter().map(|(o, _)| *o).collect();
                if offs != want_offsets {
                    return None;
                }
                match &first {
                    None => first = Some(c),
                    Some(f) if *f == c => {}
                    Some(_) => return None,
                }
            }
            first
        },
    )
    .await;
    assert_eq!(contents.len(), 7);
    // A reader from the earliest offset sees exactly the last value of each live key, at its
    // original offset.
    let read = read_all(&client, "table", 0).await;
    let seen: Vec<(String, String, u64)> = read
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(&m.payload).into_owned(),
                m.offset,
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> = {
        let mut w: Vec<(String, String, u64)> = last_offset
            .iter()
            .map(|(k, o)| (k.clone(), format!("{k}=9"), *o))
            .collect();
        w.sort_by_key(|x| x.2);
        w
    };
    assert_eq!(seen, want);
    let d = client.describe_station("table").await.expect("describe");
    assert_eq!(d.partition_info[0].messages, 7);
    assert_eq!(d.partition_info[0].next_offset, 81);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn young_tombstones_stay_until_their_delay() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(
        &client,
        "slow-tombstones",
        policy(|p, _| {
            p.compaction = CompactionPolicy::Key as i32;
            p.tombstone_delay_ms = Some(3_600_000);
        }),
    )
    .await;
    let group = s.partition_info[0].group_id;
    client
        .produce("slow-tombstones", vec![keyed("a", "1"), keyed("b", "1")])
        .await
        .expect("produce");
    client
        .produce("slow-tombstones", vec![tombstone("a"), keyed("b", "2")])
        .await
        .expect("produce");
    // a=1 and b=1 go; the tombstone of a stays (its delay is an hour), b=2 stays.
    wait_until(
        Duration::from_secs(10),
        "compaction on every replica",
        || async {
            for id in cluster.running() {
                let offsets: Vec<u64> = local_contents(&cluster.broker(id), group)
                    .await
                    .iter()
                    .map(|(o, _)| *o)
                    .collect();
                if offsets != [2, 3] {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let read = read_all(&client, "slow-tombstones", 0).await;
    assert!(read[0].payload.is_empty() && read[0].headers[0].key == "tombstone");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_policies_get_clear_statuses() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let e = client
        .create_station_with(StationSpec::new("zero").policy(policy(|_, r| {
            r.max_messages = Some(0);
        })))
        .await
        .expect_err("zero limit");
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("greater than 0"), "{e}");
    let e = client
        .create_station_with(StationSpec::new("weird").policy(StationPolicy {
            discard: 77,
            ..Default::default()
        }))
        .await
        .expect_err("unknown enum");
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    client
        .create_station_with(
            StationSpec::new("plain")
                .partitions(1)
                .replication_factor(3),
        )
        .await
        .expect("create");
    let e = client
        .update_station(
            "plain",
            policy(|p, _| p.storage = StorageTier::Memory as i32),
        )
        .await
        .expect_err("tier change");
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("cannot change"), "{e}");
    let e = client
        .update_station("nope", StationPolicy::default())
        .await
        .expect_err("unknown station");
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    // A plain station reports the defaults.
    let d = client.describe_station("plain").await.expect("describe");
    let p: pb::StationPolicy = d.policy.expect("policy");
    assert_eq!(p.storage, StorageTier::File as i32);
    assert_eq!(p.discard, DiscardPolicy::Old as i32);
    assert_eq!(p.compaction, CompactionPolicy::None as i32);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_creates_updates_and_describes_policies() {
    let cluster = TestCluster::start_with(3, fast).await;
    ok(
        &cluster,
        &[
            "station",
            "create",
            "capped",
            "--replication-factor",
            "3",
            "--retention-messages",
            "5",
            "--retention-age",
            "7d",
            "--discard",
            "new",
        ],
    )
    .await;
    let text = ok(&cluster, &["station", "describe", "capped"]).await;
    assert_eq!(row(&text, "storage"), ["storage", "file"]);
    assert_eq!(row(&text, "retention"), ["retention", "age 7d, messages 5"]);
    assert_eq!(row(&text, "discard"), ["discard", "new"]);
    assert_eq!(row(&text, "compaction"), ["compaction", "none"]);
    ok(
        &cluster,
        &[
            "station",
            "update",
            "capped",
            "--retention-messages",
            "none",
            "--retention-bytes",
            "10GiB",
            "--compaction",
            "key",
        ],
    )
    .await;
    let json = ok_json(&cluster, &["station", "describe", "capped", "--json"]).await;
    assert_eq!(
        json["policy"]["retention"]["max_messages"],
        serde_json::Value::Null
    );
    assert_eq!(json["policy"]["retention"]["max_bytes"], 10u64 << 30);
    assert_eq!(json["policy"]["retention"]["max_age_ms"], 7 * 86_400_000u64);
    assert_eq!(json["policy"]["compaction"], "key");
    assert_eq!(json["policy"]["discard"], "new");
    assert_eq!(json["partition_info"][0]["messages"], 0);
    let bad = run(
        &cluster,
        &[
            "station",
            "update",
            "capped",
            "--retention-age",
            "7 fortnights",
        ],
    )
    .await;
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("unknown duration unit"),
        "{}",
        bad.stderr
    );
    let none = run(&cluster, &["station", "update", "capped"]).await;
    assert!(!none.ok);
    assert!(none.stderr.contains("nothing to update"), "{}", none.stderr);
    ok(
        &cluster,
        &[
            "station",
            "create",
            "volatile",
            "--replication-factor",
            "3",
            "--storage",
            "memory",
        ],
    )
    .await;
    let text = ok(&cluster, &["station", "describe", "volatile"]).await;
    assert_eq!(row(&text, "storage"), ["storage", "memory"]);
    let tier = run(
        &cluster,
        &["station", "update", "volatile", "--storage", "file"],
    )
    .await;
    assert!(!tier.ok);
    assert!(tier.stderr.contains("cannot change"), "{}", tier.stderr);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compacted_station_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start_with(3, |c| {
        fast(c);
        c.snapshot_every = 50;
        c.keep_logs = 10;
    })
    .await;
    let client = cluster.client();
    let s = create(
        &client,
        "table",
        policy(|p, _| {
            p.compaction = CompactionPolicy::Key as i32;
            p.tombstone_delay_ms = Some(1);
        }),
    )
    .await;
    let group = s.partition_info[0].group_id;
    let follower = cluster
        .partition_follower(group, &s.partition_info[0].replicas)
        .expect("follower");
    cluster.stop(follower).await;
    for b in 0..300 {
        let msgs = (0..10)
            .map(|i| keyed(&format!("k{}", (b * 10 + i) % 20), format!("b{b}")))
            .collect();
        client.produce("table", msgs).await.expect("produce");
    }
    let dead: Vec<Message> = (0..5).map(|i| tombstone(&format!("k{i}"))).collect();
    client.produce("table", dead).await.expect("tombstones");
    let leader = cluster.partition_leader(group).expect("leader");
    wait_until(
        Duration::from_secs(20),
        "the leader to compact and purge its log",
        || async {
            let b = cluster.broker(leader);
            let r = b.partition(group)?;
            let purged = r.raft.metrics().borrow_watched().purged.map(|l| l.index);
            (purged.is_some_and(|p| p >= 100) && local_contents(&b, group).await.len() == 15)
                .then_some(())
        },
    )
    .await;
    cluster.restart(follower).await;
    let want = local_contents(&cluster.broker(leader), group).await;
    wait_until(
        Duration::from_secs(30),
        "the restarted follower to hold exactly the compacted messages",
        || async {
            let b = cluster.broker(follower);
            b.partition(group)?;
            (local_contents(&b, group).await == want).then_some(())
        },
    )
    .await;
    let read = read_all(&client, "table", 0).await;
    assert_eq!(read.len(), 15);
    for m in &read {
        // Even batches wrote k0..k9, odd ones k10..k19; k0..k4 are deleted.
        let key: u32 = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default())[1..]
            .parse()
            .expect("key number");
        let last = if key < 10 { "b298" } else { "b299" };
        assert!(key >= 5, "k{key} was deleted by its tombstone");
        assert_eq!(
            &m.payload[..],
            last.as_bytes(),
            "only the last value of k{key}"
        );
    }
    cluster.shutdown().await;
}

/// An isolation budget: a group that falls past it is detached, and `ack` retention passes it
/// (a dead consumer cannot hold everyone's disk); re-attached, it holds retention again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_past_its_budget_is_detached_and_no_longer_holds_ack_retention() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(&client, "budgeted", policy(|_, r| r.ack = true)).await;
    let group = s.partition_info[0].group_id;
    let opts = || junction_client::GroupOptions::default();
    let mut live = client
        .group_consumer("budgeted", "live", opts())
        .await
        .expect("join live");
    let dead = client
        .group_consumer("budgeted", "dead", opts())
        .await
        .expect("join dead");
    // Bad budgets are refused, and change nothing.
    let zero = run(
        &cluster,
        &[
            "group",
            "budget",
            "budgeted",
            "dead",
            "--max-lag-messages",
            "0",
        ],
    )
    .await;
    assert!(
        !zero.ok && zero.stderr.contains("at least 1"),
        "{}",
        zero.stderr
    );
    let set = ok(
        &cluster,
        &[
            "group",
            "budget",
            "budgeted",
            "dead",
            "--max-lag-messages",
            "20",
        ],
    )
    .await;
    assert_eq!(
        set.trim(),
        "partition 0: attached, budget 20 messages",
        "{set}"
    );
    // "dead" consumes nothing; "live" acknowledges everything.
    produce_ten_byte_messages(&client, "budgeted", 0, 100).await;
    for _ in 0..100 {
        let m = tokio::time::timeout(Duration::from_secs(20), live.recv())
            .await
            .expect("delivery")
            .expect("running");
        live.ack(&m);
    }
    // 100 behind, budget 20: detached, and retention cuts at "live"'s floor.
    leader_cuts_at(&cluster, group, 100).await;
    // Descriptions are read from a local replica, which may trail the leader by a moment.
    wait_until(
        Duration::from_secs(10),
        "dead described as detached",
        || async {
            let d = client.describe_group("budgeted", "dead").await.ok()?;
            // What retention removed is skipped: nothing is left to lag.
            (d.partitions[0].detached_at_ms.is_some() && d.partitions[0].lag == 0).then_some(())
        },
    )
    .await;
    let text = wait_until(Duration::from_secs(10), "the CLI shows it", || async {
        let text = ok(&cluster, &["group", "describe", "budgeted", "dead"]).await;
        row(&text, "0")
            .iter()
            .any(|c| c.starts_with("since "))
            .then_some(text)
    })
    .await;
    assert!(text.contains("isolation budget: 20 messages"), "{text}");
    // A group without a budget is never detached.
    let l = client
        .describe_group("budgeted", "live")
        .await
        .expect("describe");
    assert_eq!(l.partitions[0].detached_at_ms, None);

    // Attached again, "dead" holds retention from its position once more.
    let attached = ok(&cluster, &["group", "attach", "budgeted", "dead"]).await;
    assert_eq!(attached.trim(), "partition 0: attached, budget 20 messages");
    produce_ten_byte_messages(&client, "budgeted", 100, 10).await;
    for _ in 0..10 {
        let m = tokio::time::timeout(Duration::from_secs(20), live.recv())
            .await
            .expect("delivery")
            .expect("running");
        live.ack(&m);
    }
    wait_until(Duration::from_secs(10), "live acked everything", || async {
        let l = client.describe_group("budgeted", "live").await.ok()?;
        (l.partitions[0].lag == 0).then_some(())
    })
    .await;
    wait_for_retention_passes(&cluster, group, 5).await;
    let leader = cluster.partition_leader(group).expect("leader");
    assert_eq!(offsets(&cluster, leader, group), Some((100, 110)));
    // 10 behind is within 20: attached it stays.
    wait_until(
        Duration::from_secs(10),
        "dead described as attached",
        || async {
            let d = client.describe_group("budgeted", "dead").await.ok()?;
            d.partitions[0].detached_at_ms.is_none().then_some(())
        },
    )
    .await;
    drop(dead);
    drop(live);
    cluster.shutdown().await;
}

/// `ack` retention: a message goes once every consumer group of the station acknowledged it,
/// and never before — whatever other limit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ack_retention_drops_only_what_every_group_acknowledged() {
    let cluster = TestCluster::start_with(3, fast).await;
    let client = cluster.client();
    let s = create(
        &client,
        "acked",
        policy(|_, r| {
            r.ack = true;
            r.max_messages = Some(10);
        }),
    )
    .await;
    let group = s.partition_info[0].group_id;
    // Two groups exist before anything is produced: nothing may go until both ack.
    let opts = || junction_client::GroupOptions::default();
    let mut fast_group = client
        .group_consumer("acked", "fast", opts())
        .await
        .expect("join fast");
    let mut slow_group = client
        .group_consumer("acked", "slow", opts())
        .await
        .expect("join slow");
    produce_ten_byte_messages(&client, "acked", 0, 100).await;

    // "fast" acks everything, "slow" only the first 30.
    for _ in 0..100 {
        let m = tokio::time::timeout(Duration::from_secs(20), fast_group.recv())
            .await
            .expect("delivery")
            .expect("running");
        fast_group.ack(&m);
    }
    let mut slow_seen = 0;
    while slow_seen < 30 {
        let m = tokio::time::timeout(Duration::from_secs(20), slow_group.recv())
            .await
            .expect("delivery")
            .expect("running");
        if m.offset() < 30 {
            slow_group.ack(&m);
            slow_seen += 1;
        }
    }
    // The cut follows the slowest group, not max_messages (10).
    leader_cuts_at(&cluster, group, 30).await;
    replicas_agree(&cluster, group, (30, 100)).await;
    // Several more passes change nothing while "slow" stands still.
    wait_for_retention_passes(&cluster, group, 5).await;
    let leader = cluster.partition_leader(group).expect("leader");
    assert_eq!(offsets(&cluster, leader, group), Some((30, 100)));
    let d = client
        .describe_group("acked", "slow")
        .await
        .expect("describe");
    assert_eq!(d.partitions[0].committed, 30);
    assert_eq!(d.partitions[0].lag, 70);

    // Deleting the slow group releases the rest: the floor is now "fast" at 100.
    drop(slow_group);
    client.delete_group("acked", "slow").await.expect("delete");
    leader_cuts_at(&cluster, group, 100).await;
    drop(fast_group);
    cluster.shutdown().await;
}
