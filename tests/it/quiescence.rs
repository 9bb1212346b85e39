//! Quiescent partitions: idle groups stop their Raft timers on every replica, wake on the next
//! write without an election, keep their leader when a follower restarts, and elect another
//! leader when the leader's node is killed.

use std::time::{Duration, Instant};

use junction_proto::v1::Message;
use openraft::async_runtime::watch::WatchReceiver;

use crate::harness::{TestCluster, read_all, wait_until};
use crate::process::ProcessCluster;

/// Short, so the tests do not wait long (the default is 2 s).
const QUIESCE_MS: u64 = 500;

fn to_partition(partition: u32, payload: String) -> Message {
    Message {
        partition: Some(partition),
        payload: payload.into_bytes().into(),
        ..Default::default()
    }
}

/// Whether every running node's replica of each of `groups` is quiet.
fn all_quiet(cluster: &TestCluster, groups: &[u64]) -> bool {
    cluster.running().into_iter().all(|id| {
        let b = cluster.broker(id);
        groups
            .iter()
            .all(|g| b.partition(*g).is_some_and(|r| r.quiet.is_quiet()))
    })
}

/// The term of `group` as node `id`'s replica knows it.
fn term(cluster: &TestCluster, id: u64, group: u64) -> u64 {
    cluster
        .broker(id)
        .partition(group)
        .expect("replica")
        .raft
        .metrics()
        .borrow_watched()
        .current_term
}

fn payloads(msgs: &[junction_proto::v1::StoredMessage]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_partitions_go_quiet_and_wake_on_a_write() {
    let cluster = TestCluster::start_with(3, |c| c.quiesce_after_ms = QUIESCE_MS).await;
    let client = cluster.client();
    let s = client.create_station("idle", 3, 3).await.expect("create");
    let groups: Vec<u64> = s.partition_info.iter().map(|p| p.group_id).collect();
    for p in 0..3 {
        client
            .produce("idle", vec![to_partition(p, format!("first-{p}"))])
            .await
            .expect("produce");
    }
    wait_until(
        Duration::from_secs(20),
        "every replica of every partition to go quiet",
        || async { all_quiet(&cluster, &groups).then_some(()) },
    )
    .await;

    // Quiet means no heartbeats: the time the leader last had a quorum's acknowledgement
    // stops moving. Watched over ten heartbeat periods (an awake leader moves it each one).
    let g = groups[0];
    let leader = cluster.partition_leader(g).expect("a leader");
    let acked = || {
        cluster
            .broker(leader)
            .partition(g)
            .and_then(|r| r.raft.metrics().borrow_watched().last_quorum_acked)
    };
    let before = acked();
    assert!(before.is_some(), "the leader had heard its followers");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(acked(), before, "a quiet leader sent heartbeats");
    assert!(
        all_quiet(&cluster, &groups),
        "a replica woke with nothing written"
    );

    // A write wakes the group and is acknowledged, without an election. It goes to each
    // leader's broker directly, so no client retry could hide a first refusal (a woken
    // leader's lease has run out; it renews it before writing).
    let terms: Vec<u64> = groups.iter().map(|g| term(&cluster, 1, *g)).collect();
    for (p, g) in groups.iter().enumerate() {
        let leader = cluster.partition_leader(*g).expect("a leader");
        let record = junction_types::Record {
            key: None,
            headers: Vec::new(),
            payload: format!("second-{p}").into_bytes(),
        };
        let appended = tokio::time::timeout(
            Duration::from_secs(10),
            cluster.broker(leader).append(*g, vec![record]),
        )
        .await
        .expect("a write to a quiet partition answers")
        .expect("the quiet leader accepts the write at once");
        assert_eq!(appended.base_offset, 1);
    }
    for (p, g) in groups.iter().enumerate() {
        assert_eq!(
            payloads(&read_all(&client, "idle", p as u32).await),
            [format!("first-{p}"), format!("second-{p}")]
        );
        assert_eq!(
            term(&cluster, 1, *g),
            terms[p],
            "group {g} held an election"
        );
    }
    // Every replica applied the second message, and all go quiet again.
    wait_until(
        Duration::from_secs(20),
        "the partitions to go quiet again",
        || async {
            let applied = cluster.running().into_iter().all(|id| {
                let b = cluster.broker(id);
                groups.iter().all(|g| {
                    b.partition(*g)
                        .is_some_and(|r| r.shared.current().next_offset == 2)
                })
            });
            (applied && all_quiet(&cluster, &groups)).then_some(())
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_follower_does_not_unseat_a_quiet_leader() {
    let mut cluster = TestCluster::start_with(3, |c| c.quiesce_after_ms = QUIESCE_MS).await;
    let client = cluster.client();
    let s = client.create_station("calm", 1, 3).await.expect("create");
    let g = s.partition_info[0].group_id;
    client
        .produce("calm", vec![to_partition(0, "a".into())])
        .await
        .expect("produce");
    wait_until(
        Duration::from_secs(20),
        "the partition to go quiet",
        || async { all_quiet(&cluster, &[g]).then_some(()) },
    )
    .await;
    let leader = cluster.partition_leader(g).expect("a leader");
    let follower = cluster
        .partition_follower(g, &[1, 2, 3])
        .expect("a follower");
    let before = term(&cluster, leader, g);

    // The restarted replica starts awake, with its election timer running: its pre-votes are
    // withheld (the quiet leader wakes, the quiet follower still hears the leader's node) and
    // the leader's heartbeats reach it.
    cluster.stop(follower).await;
    cluster.restart(follower).await;
    wait_until(
        Duration::from_secs(20),
        "the restarted follower to follow, then everyone to go quiet again",
        || async {
            let follows = cluster
                .broker(follower)
                .partition(g)
                .is_some_and(|r| r.leader() == Some(leader));
            (follows && all_quiet(&cluster, &[g])).then_some(())
        },
    )
    .await;
    assert_eq!(cluster.partition_leader(g), Some(leader));
    for id in [1, 2, 3] {
        assert_eq!(term(&cluster, id, g), before, "node {id} saw an election");
    }
    client
        .produce("calm", vec![to_partition(0, "b".into())])
        .await
        .expect("produce after the restart");
    assert_eq!(payloads(&read_all(&client, "calm", 0).await), ["a", "b"]);
    cluster.shutdown().await;
}

/// The failover of a quiet partition: its leader's process is killed; the followers' nodes
/// stop hearing it, wake their replicas and elect one of them. Real processes (`kill -9`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_partition_elects_a_new_leader_when_its_leader_is_killed() {
    let mut cluster = ProcessCluster::new(3);
    cluster.extra_args = vec!["--quiesce-after-ms".into(), QUIESCE_MS.to_string()];
    for id in 1..=3 {
        cluster.start(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    let s = client.create_station("sleepy", 3, 3).await.expect("create");
    let groups: Vec<u64> = s.partition_info.iter().map(|p| p.group_id).collect();
    for p in 0..3 {
        client
            .produce("sleepy", vec![to_partition(p, format!("before-{p}"))])
            .await
            .expect("produce");
    }
    let quiet_everywhere = |nodes: Vec<u64>| {
        let cluster = &cluster;
        let groups = &groups;
        async move {
            for id in nodes {
                let status = cluster.node_status(id).await?;
                let quiet = groups.iter().all(|g| {
                    status
                        .groups
                        .iter()
                        .any(|s| s.group == *g && s.quiet && s.leader.is_some())
                });
                if !quiet {
                    return None;
                }
            }
            Some(())
        }
    };
    wait_until(
        Duration::from_secs(30),
        "every partition quiet on every node",
        || quiet_everywhere(vec![1, 2, 3]),
    )
    .await;
    let mut leaders = Vec::new();
    for g in &groups {
        leaders.push(
            cluster
                .leader_seen_by(1, *g)
                .await
                .expect("node 1 knows the leader"),
        );
    }
    let g = groups[0];
    let leader = leaders[0];

    cluster.kill9(leader);
    let killed = Instant::now();
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let new_leader = wait_until(
        Duration::from_secs(20),
        "another replica to lead the quiet partition",
        || async {
            let l = cluster.leader_seen_by(others[0], g).await?;
            (l != leader && cluster.leader_seen_by(others[1], g).await? == l).then_some(l)
        },
    )
    .await;
    let elected = killed.elapsed();
    let pos = wait_until(
        Duration::from_secs(20),
        "a produce to the partition to be acknowledged",
        || async {
            client
                .produce("sleepy", vec![to_partition(0, "after".into())])
                .await
                .ok()
        },
    )
    .await;
    eprintln!(
        "quiet partition: leader {leader} killed; {new_leader} elected after {elected:?}, first \
         produce acknowledged after {:?}",
        killed.elapsed()
    );
    assert_eq!(pos[0].offset, 1);
    assert_eq!(
        payloads(&read_all(&client, "sleepy", 0).await),
        ["before-0", "after"]
    );
    // The partitions the killed node did not lead were not woken: their leaders' nodes still
    // answer. (A group with a member down does not go quiet again until the member is back.)
    for (p, g) in groups.iter().enumerate() {
        if leaders[p] == leader {
            continue;
        }
        for id in &others {
            let status = cluster.node_status(*id).await.expect("status");
            let s = status
                .groups
                .iter()
                .find(|s| s.group == *g)
                .expect("hosted");
            assert!(s.quiet, "group {g} woke on node {id}");
            assert_eq!(s.leader, Some(leaders[p]));
        }
        assert_eq!(
            payloads(&read_all(&client, "sleepy", p as u32).await),
            [format!("before-{p}")]
        );
    }
}

/// New replicas come up in waves: with a wave of 4, a node never has more than 4 replicas
/// settling (opened, not yet quiet) and opens its first 4 before any other, and a
/// 12-partition station still gets every leader and goes quiet everywhere; a produce to each
/// partition then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_replicas_come_up_in_waves() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const WAVE: usize = 4;
    const PARTITIONS: usize = 12;
    let cluster = Arc::new(
        TestCluster::start_with(3, |c| {
            c.quiesce_after_ms = QUIESCE_MS;
            c.open_wave = WAVE;
        })
        .await,
    );
    // Watches every node while the station is created: the most replicas settling at once,
    // and the fewest replicas hosted once there were any.
    let most = Arc::new(AtomicUsize::new(0));
    let fewest = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (cluster, most, fewest, stop) =
            (cluster.clone(), most.clone(), fewest.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for id in cluster.running() {
                    let b = cluster.broker(id);
                    most.fetch_max(b.settling_replicas(), Ordering::Relaxed);
                    let hosted = b.hosted().len();
                    if hosted > 0 {
                        fewest.fetch_min(hosted, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let client = cluster.client();
    let s = client
        .create_station("waves", PARTITIONS as u32, 3)
        .await
        .expect("create");
    let groups: Vec<u64> = s.partition_info.iter().map(|p| p.group_id).collect();
    wait_until(
        Duration::from_secs(60),
        "every replica of every partition to be opened and go quiet",
        || async { all_quiet(&cluster, &groups).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");
    let (most, fewest) = (most.load(Ordering::Relaxed), fewest.load(Ordering::Relaxed));
    assert!(
        (1..=WAVE).contains(&most),
        "at most {WAVE} replicas settle at once on a node, saw {most}"
    );
    assert!(
        fewest <= WAVE,
        "a node opens its first wave before the rest (fewest hosted seen: {fewest})"
    );
    for p in 0..PARTITIONS as u32 {
        client
            .produce("waves", vec![to_partition(p, format!("m-{p}"))])
            .await
            .expect("produce");
    }
    for p in 0..PARTITIONS as u32 {
        let got = read_all(&client, "waves", p).await;
        assert_eq!(payloads(&got), vec![format!("m-{p}")]);
    }
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.shutdown().await,
        Err(_) => panic!("the cluster is still shared"),
    }
}
