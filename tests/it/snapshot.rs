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
    let follower = cluster
        .partition_follower(group, &s.partition_info[0].replicas)
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
    let purged = cluster.wait_log_purged(leader, group, 100).await;
    eprintln!("leader purged its log up to index {purged}");

    cluster.restart(follower).await;
    let want = local_contents(&cluster.broker(leader), group).await;
    assert_eq!(want.len(), 3200);
    let broker = cluster.broker(follower);
    wait_until(
        Duration::from_secs(30),
        "the follower to catch up",
        || async {
            broker.partition(group)?;
            (local_contents(&broker, group).await == want).then_some(())
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

/// Regression (chaos seed 11): a snapshot stream that ends cleanly but early — here the
/// header and the state frame only, as from a leader that stopped sending midway — is refused
/// with ABORTED before it reaches openraft. Installed, it would have lacked messages; refused
/// inside openraft, it stopped the follower's group for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_snapshot_stream_is_refused_and_the_replica_keeps_working() {
    use junction_proto::peer::SnapshotChunk;
    use junction_raft::snapshot::{FRAME_STATE, SNAPSHOT_STREAM_VERSION, write_frame};

    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let s = client.create_station("cut", 1, 3).await.expect("create");
    let group = s.partition_info[0].group_id;
    for i in 0..20 {
        client
            .produce("cut", vec![keyed("k", format!("m{i}"))])
            .await
            .expect("produce");
    }
    let leader = cluster.partition_leader(group).expect("leader");
    let follower = cluster
        .partition_follower(group, &s.partition_info[0].replicas)
        .expect("follower");
    let metrics = cluster
        .broker(leader)
        .partition(group)
        .expect("leader replica")
        .raft
        .metrics()
        .borrow_watched()
        .clone();
    let meta = junction_raft::SnapshotMeta {
        last_log_id: metrics.last_applied,
        last_membership: metrics.membership_config.as_ref().clone(),
    };
    let mut data = Vec::new();
    write_frame(
        &mut data,
        FRAME_STATE,
        &[SNAPSHOT_STREAM_VERSION],
        b"state of a snapshot that never finished",
    );
    let header = SnapshotChunk {
        group,
        vote: junction_raft::encode(&junction_raft::format::VOTE, &metrics.vote).expect("vote"),
        meta: junction_raft::encode(&junction_raft::format::SNAPSHOT_META, &meta).expect("meta"),
        data,
    };
    let mut peer = cluster.peer_client(follower).await;
    let status = peer
        .install_snapshot(futures::stream::iter([header]))
        .await
        .expect_err("a cut snapshot stream is refused");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");

    // The follower's group is alive: it keeps replicating and holds what the leader holds.
    for i in 20..40 {
        client
            .produce("cut", vec![keyed("k", format!("m{i}"))])
            .await
            .expect("produce after the refused snapshot");
    }
    let broker = cluster.broker(follower);
    let replica = broker.partition(group).expect("follower replica");
    assert!(
        replica
            .raft
            .metrics()
            .borrow_watched()
            .running_state
            .is_ok(),
        "the follower's group stopped"
    );
    let leader = cluster.partition_leader(group).expect("leader");
    let want = local_contents(&cluster.broker(leader), group).await;
    assert_eq!(want.len(), 40);
    wait_until(
        Duration::from_secs(20),
        "the follower to catch up",
        || async { (local_contents(&broker, group).await == want).then_some(()) },
    )
    .await;
    cluster.shutdown().await;
}
