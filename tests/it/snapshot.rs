//! A follower that missed more than the retained log catches up by snapshot.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use crate::harness::{TestCluster, keyed, local_contents, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.snapshot_every = 50;
        c.keep_logs = 10;
    })
    .await;
    let client = cluster.client();
    let s = client.create_station("snap", 1, 3).await.expect("create");
    let group = s.partition_info[0].group_id;
    let leader = cluster.partition_leader(group).expect("leader");
    let follower = s.partition_info[0]
        .replicas
        .iter()
        .copied()
        .find(|r| *r != leader)
        .expect("follower");
    cluster.stop(follower).await;

    for b in 0..300 {
        let msgs = (0..10)
            .map(|i| keyed(&format!("k{i}"), format!("batch {b} message {i}")))
            .collect();
        client
            .produce("snap", msgs)
            .await
            .expect("produce while a follower is down");
    }
    // A consumer group acks part of it while the follower is down: its position must reach the
    // follower through the snapshot too.
    let mut consumer = client
        .group_consumer("snap", "g", junction_client::GroupOptions::default())
        .await
        .expect("join");
    let mut acked = 0;
    while acked < 1000 {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("deliveries")
            .expect("consumer running");
        consumer.ack(&m);
        acked += 1;
    }
    wait_until(
        Duration::from_secs(20),
        "the acks to be replicated",
        || async {
            let d = client.describe_group("snap", "g").await.ok()?;
            (d.partitions[0].committed >= 1000).then_some(())
        },
    )
    .await;
    drop(consumer);
    for b in 300..320 {
        let msgs = (0..10)
            .map(|i| keyed(&format!("k{i}"), format!("batch {b} message {i}")))
            .collect();
        client.produce("snap", msgs).await.expect("produce");
    }
    let leader = cluster.partition_leader(group).expect("leader");
    let purged = wait_until(
        Duration::from_secs(20),
        "the leader to purge its log",
        || async {
            let replica = cluster.broker(leader).partition(group)?;
            let purged = replica
                .raft
                .metrics()
                .borrow_watched()
                .purged
                .map(|l| l.index);
            purged.filter(|p| *p >= 100)
        },
    )
    .await;
    eprintln!("leader purged its log up to index {purged}");

    cluster.restart(follower).await;
    let want = local_contents(&cluster.broker(leader), group);
    assert_eq!(want.len(), 3200);
    let broker = cluster.broker(follower);
    wait_until(
        Duration::from_secs(30),
        "the follower to catch up",
        || async {
            broker
                .partition(group)
                .filter(|_| local_contents(&broker, group) == want)
                .map(|_| ())
        },
    )
    .await;
    let replica = broker.partition(group).expect("replica");
    let snapshot = replica.raft.metrics().borrow_watched().snapshot;
    assert!(
        snapshot.is_some_and(|s| s.index >= 100),
        "caught up through a snapshot: {snapshot:?}"
    );
    // Reads of the caught-up node equal the leader's, through the time index too.
    let state = replica.shared.current();
    assert_eq!(state.next_offset, 3200);
    let leader_cursors = cluster
        .broker(leader)
        .partition(group)
        .expect("leader replica")
        .shared
        .cursors();
    assert!(leader_cursors["g"].committed >= 1000);
    assert_eq!(
        replica.shared.cursors(),
        leader_cursors,
        "group positions came with the snapshot"
    );
    cluster.shutdown().await;
}
