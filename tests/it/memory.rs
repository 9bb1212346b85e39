//! Memory stations: Raft log and messages in each node's memory store, replicated by Raft; a
//! restarted replica re-syncs from its peers; losing every replica brings the station back
//! empty, and `describe` says so; a per-node memory limit refuses produces when full.

use std::time::Duration;

use junction_client::proto::{Message, RetentionPolicy, StationPolicy, StorageTier};
use junction_client::{Client, Code, StationSpec};

use crate::harness::{TestCluster, local_contents, read_all, wait_until};

fn memory() -> StationPolicy {
    StationPolicy {
        storage: StorageTier::Memory as i32,
        retention: Some(RetentionPolicy::default()),
        ..Default::default()
    }
}

async fn create_memory(client: &Client, name: &str) -> u64 {
    let s = client
        .create_station_with(
            StationSpec::new(name)
                .partitions(1)
                .replication_factor(3)
                .policy(memory()),
        )
        .await
        .expect("create memory station");
    assert_eq!(
        s.policy.expect("policy").storage,
        StorageTier::Memory as i32
    );
    s.partition_info[0].group_id
}

fn msg(n: u64) -> Message {
    Message {
        key: None,
        headers: vec![],
        payload: format!("m{n}").into_bytes().into(),
        partition: None,
        msg_id: None,
    }
}

async fn produce(client: &Client, station: &str, from: u64, count: u64) {
    for chunk in (from..from + count).collect::<Vec<_>>().chunks(20) {
        client
            .produce(station, chunk.iter().copied().map(msg).collect())
            .await
            .expect("produce");
    }
}

/// Waits until every running node holds `want` messages for `group`, all equal; returns them.
async fn all_hold(cluster: &TestCluster, group: u64, want: usize) -> Vec<(u64, bytes::Bytes)> {
    wait_until(
        Duration::from_secs(20),
        &format!("every replica of group {group} to hold {want} equal messages"),
        || async {
            let mut first: Option<Vec<(u64, bytes::Bytes)>> = None;
            for id in cluster.running() {
                let b = cluster.broker(id);
                b.partition(group)?;
                let c = local_contents(&b, group).await;
                if c.len() != want {
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
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_station_replicates_without_touching_disk() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let group = create_memory(&client, "fast").await;
    produce(&client, "fast", 0, 200).await;
    all_hold(&cluster, group, 200).await;
    assert_eq!(read_all(&client, "fast", 0).await.len(), 200);
    for id in cluster.running() {
        let b = cluster.broker(id);
        let disk = b.store();
        assert!(
            disk.read_messages(group, 0, u64::MAX, 10, 1 << 20)
                .expect("disk read")
                .is_empty(),
            "node {id} wrote messages of a memory station to disk"
        );
        assert!(
            disk.last_log(group).expect("disk log").is_none(),
            "node {id} wrote Raft entries of a memory station to disk"
        );
        let replica = b.partition(group).expect("replica");
        assert!(replica.store.approximate_bytes() > 0);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_memory_replicas_resync_from_their_peers() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let group = create_memory(&client, "resync").await;
    produce(&client, "resync", 0, 100).await;
    let mut total = 100;
    // Restart each node in turn (a minority each time), including the group's first
    // replica and its leader; nothing acknowledged is lost and every replica re-syncs.
    for id in [1, 2, 3] {
        cluster.stop(id).await;
        produce(&client, "resync", total, 50).await;
        total += 50;
        cluster.restart(id).await;
        let contents = all_hold(&cluster, group, total as usize).await;
        let payloads: Vec<String> = contents
            .iter()
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        for n in 0..total {
            assert!(
                payloads.iter().any(|p| p.contains(&format!("m{n}"))),
                "message m{n} was lost after restarting node {id}"
            );
        }
    }
    let d = client.describe_station("resync").await.expect("describe");
    assert_eq!(d.partition_info[0].data_lost_at_ms, None);
    assert_eq!(d.partition_info[0].messages, total);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_every_memory_replica_brings_the_station_back_empty() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let group = create_memory(&client, "volatile").await;
    produce(&client, "volatile", 0, 100).await;
    all_hold(&cluster, group, 100).await;
    for id in [1, 2, 3] {
        cluster.stop(id).await;
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.wait_for_metadata_leader().await;
    let client = cluster.client();
    let d = wait_until(
        Duration::from_secs(30),
        "the memory partition to come back empty and report the loss",
        || async {
            let d = client.describe_station("volatile").await.ok()?;
            let p = d.partition_info.first()?;
            (p.leader.is_some() && p.data_lost_at_ms.is_some()).then_some(d)
        },
    )
    .await;
    let p = &d.partition_info[0];
    assert_eq!((p.next_offset, p.messages), (0, 0));
    // It takes produces again, from offset 0, on every replica.
    produce(&client, "volatile", 1000, 10).await;
    let contents = all_hold(&cluster, group, 10).await;
    assert_eq!(contents[0].0, 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_memory_store_refuses_produces() {
    // The limit counts message bytes (key + headers + payload) of every memory replica here.
    let cluster = TestCluster::start_with(3, |c| c.memory_limit_bytes = 256 << 10).await;
    let client = cluster.client();
    create_memory(&client, "small").await;
    let big = |_: u64| Message {
        key: None,
        headers: vec![],
        payload: vec![b'x'; 4096].into(),
        partition: None,
        msg_id: None,
    };
    let mut refused = None;
    for n in 0..1000u64 {
        match client.produce("small", vec![big(n)]).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some((n, e));
                break;
            }
        }
    }
    let (n, e) = refused.expect("the memory limit refuses produces");
    eprintln!("memory limit of 256 KiB reached after {n} messages of 4 KiB");
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("memory storage is full"), "{e}");
    assert_eq!(n, 64, "256 KiB hold exactly 64 messages of 4 KiB");
    // File stations are not affected by the memory limit.
    client
        .create_station_with(
            StationSpec::new("durable")
                .partitions(1)
                .replication_factor(3),
        )
        .await
        .expect("create file station");
    client
        .produce("durable", vec![big(0); 100])
        .await
        .expect("file stations ignore the memory limit");
    cluster.shutdown().await;
}

/// Produce throughput of a memory station vs a file station, and of a file station while
/// retention cuts it every tick vs one without limits. In-process three-node cluster, debug
/// build, shared machine: the ratios are indicative, not benchmark figures. Run with
/// `cargo test --workspace --test it throughput_ratios -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn throughput_ratios() {
    let cluster = TestCluster::start_with(3, |c| c.retention_tick_ms = 100).await;
    let client = cluster.client();
    create_memory(&client, "bench-memory").await;
    for (name, p) in [
        ("bench-file", StationPolicy::default()),
        (
            "bench-retained",
            StationPolicy {
                retention: Some(RetentionPolicy {
                    max_messages: Some(20_000),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    ] {
        client
            .create_station_with(
                StationSpec::new(name)
                    .partitions(1)
                    .replication_factor(3)
                    .policy(p),
            )
            .await
            .expect("create");
    }
    async fn load(client: &Client, station: &str) -> f64 {
        const PRODUCERS: usize = 4;
        const BATCHES: usize = 40;
        const BATCH: usize = 50;
        let t0 = std::time::Instant::now();
        let tasks: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let client = client.clone();
                let station = station.to_string();
                tokio::spawn(async move {
                    for _ in 0..BATCHES {
                        let msgs = (0..BATCH)
                            .map(|_| Message {
                                key: None,
                                headers: vec![],
                                payload: vec![b'x'; 1024].into(),
                                partition: None,
                                msg_id: None,
                            })
                            .collect();
                        if let Err(e) = client.produce(&station, msgs).await {
                            panic!("produce to {station}: {e}");
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("producer");
        }
        (PRODUCERS * BATCHES * BATCH) as f64 / t0.elapsed().as_secs_f64()
    }
    // Warm up, then alternate to spread the machine's noise.
    load(&client, "bench-memory").await;
    load(&client, "bench-file").await;
    let (mut mem, mut file, mut retained) = (0.0, 0.0, 0.0);
    for _ in 0..2 {
        mem += load(&client, "bench-memory").await;
        file += load(&client, "bench-file").await;
        retained += load(&client, "bench-retained").await;
    }
    eprintln!(
        "msgs/s (1 KiB, 4 producers, batches of 50, RF 3): memory {:.0}, file {:.0}, file with retention {:.0}; memory/file {:.2}, retention kept {:.1} %",
        mem / 2.0,
        file / 2.0,
        retained / 2.0,
        mem / file,
        100.0 * retained / file
    );
    cluster.shutdown().await;
}
