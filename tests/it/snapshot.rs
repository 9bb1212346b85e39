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
    assert_eq!(want.len(), 3000);
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
    assert_eq!(state.next_offset, 3000);
    cluster.shutdown().await;
}
