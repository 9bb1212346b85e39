//! The cluster's format level (`junction_types::format_level`) and what level 2 adds: each
//! partition append carries its leader's CRC32C, checked by every replica on receipt and
//! before it stores the messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use junction_proto::peer::RaftRequest;
use junction_raft::types::{Entry, Vote};
use junction_types::format_level::{BASE, CHECKED_APPENDS};
use junction_types::{Command, PartitionCommand, Record};
use openraft::EntryPayload;
use openraft::raft::AppendEntriesRequest;

use crate::harness::{TestCluster, keyed, local_contents, wait_until};

/// A new cluster rises to level 2 once every node answered a ping with it. From then on
/// every append in every replica's log carries its leader's checksum, and an AppendEntries
/// whose checked append does not match its checksum (a byte changed on the wire) is refused
/// with DATA_LOSS without storing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_carry_their_leaders_checksum_once_every_node_reads_them() {
    let mut cluster = TestCluster::start(3).await;
    every_node_sees_level(&cluster, CHECKED_APPENDS).await;
    let client = cluster.client();
    let group = station(&cluster, "checked").await;
    let n = 30;
    for i in 0..n {
        client
            .produce("checked", vec![keyed("k", format!("message {i:03}"))])
            .await
            .expect("produce");
    }
    every_replica_holds(&cluster, group, n).await;
    let leader = wait_until(Duration::from_secs(10), "a leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let follower = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let before = local_contents(&cluster.broker(follower), group).await;

    // A forged AppendEntries to the follower: the checksum of one message, the bytes of
    // another.
    let record = |text: &str| Record {
        key: Some(b"k".to_vec()),
        headers: vec![],
        payload: text.as_bytes().to_vec(),
    };
    let append = |text: &str| PartitionCommand::Append {
        timestamp_ms: 1,
        records: vec![record(text)],
    };
    let PartitionCommand::Checked { crc, .. } = append("sent").checked() else {
        panic!("appends are checked")
    };
    let changed = PartitionCommand::Checked {
        crc,
        command: Box::new(append("sEnt")),
    };
    let term = {
        use openraft::async_runtime::watch::WatchReceiver;
        let replica = cluster
            .broker(leader)
            .partition(group)
            .expect("leader replica");
        let m = replica.raft.metrics();
        let term: u64 = m.borrow_watched().current_term;
        term
    };
    let rpc: AppendEntriesRequest<junction_raft::types::TypeConfig> = AppendEntriesRequest {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![Entry {
            log_id: openraft::LogId::new(
                openraft::impls::leader_id_adv::LeaderId {
                    term,
                    node_id: leader,
                },
                10_000,
            ),
            payload: EntryPayload::Normal(Command::Partition(changed)),
        }],
        leader_commit: None,
    };
    let payload = junction_raft::format::encode(&junction_raft::format::APPEND_ENTRIES, &rpc)
        .expect("encode");
    let mut peer = cluster.peer_client(follower).await;
    let refused = peer
        .append_entries(RaftRequest { group, payload })
        .await
        .expect_err("a changed append is refused");
    assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused:?}");
    assert!(
        refused.message().contains("corrupt log entry received")
            && refused.message().contains(&format!("group {group}")),
        "{refused:?}"
    );
    // Nothing of it was stored; the group goes on.
    client
        .produce("checked", vec![keyed("k", "after the forged entry")])
        .await
        .expect("produce after");
    let follower_broker = cluster.broker(follower);
    let after = wait_until(
        Duration::from_secs(10),
        "the follower to hold the next message",
        || async {
            let c = local_contents(&follower_broker, group).await;
            (c.len() == n + 1).then_some(c)
        },
    )
    .await;
    assert_eq!(
        after[..n],
        before[..],
        "the follower's messages did not change"
    );
    assert!(
        after[n].1.ends_with(b"after the forged entry"),
        "{:?}",
        after[n]
    );
    drop(follower_broker);

    // The follower's own log: every append in it is a checked one.
    cluster.stop(follower).await;
    let store = cluster.open_store(follower).await;
    let log = stored_log(&store, group);
    let mut checked = 0;
    for (index, bytes) in &log {
        let entry = junction_raft::format::decode_log_entry(bytes).expect("decode");
        if let EntryPayload::Normal(Command::Partition(cmd)) = &entry.payload {
            assert!(
                cmd.digest().is_none(),
                "entry {index} is an append without its leader's checksum: {cmd:?}"
            );
            if let PartitionCommand::Checked { .. } = cmd {
                assert_eq!(cmd.check(), Ok(()), "entry {index}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, n + 1, "one checked append per produce: {log:?}");
    drop(store);
    cluster.shutdown().await;
}

/// Waits until every running node's metadata is at format level `level`.
async fn every_node_sees_level(cluster: &TestCluster, level: u16) {
    for id in cluster.running() {
        let broker = cluster.broker(id);
        wait_until(
            Duration::from_secs(20),
            &format!("node {id} to see format level {level}"),
            || async { (broker.metadata().format_level == level).then_some(()) },
        )
        .await;
    }
}

/// Creates the one-partition station `name` with three replicas; returns its group.
async fn station(cluster: &TestCluster, name: &str) -> u64 {
    let spec = junction_client::StationSpec::new(name)
        .partitions(1)
        .replication_factor(3);
    let s = cluster
        .client()
        .create_station_with(spec)
        .await
        .expect("create");
    s.partition_info[0].group_id
}

/// Waits until every running node holds `n` messages of `group`.
async fn every_replica_holds(cluster: &TestCluster, group: u64, n: usize) {
    for id in cluster.running() {
        let broker = cluster.broker(id);
        wait_until(
            Duration::from_secs(20),
            &format!("node {id} to hold {n} messages"),
            || async { (local_contents(&broker, group).await.len() == n).then_some(()) },
        )
        .await;
    }
}

/// A rolling upgrade. While one node holds back at level 1 (as an older build would;
/// emulated with `--max-format-level 1`), the cluster stays at level 1 and appends carry no
/// checksum. Once that node runs without the limit, the level rises and appends are
/// checked; the log holds both kinds and every replica reads both. A node limited to level 1
/// then refuses to start on the cluster, naming both levels.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_level_rises_when_the_last_node_is_upgraded_and_never_goes_back() {
    let held = Arc::new(AtomicBool::new(true));
    let hold = held.clone();
    let mut cluster = TestCluster::start_with(3, move |c| {
        if c.node_id == 3 && hold.load(Ordering::SeqCst) {
            c.max_format_level = BASE;
        }
    })
    .await;
    // Every node has heard every other's level.
    for id in 1..=3u64 {
        let broker = cluster.broker(id);
        let levels = wait_until(
            Duration::from_secs(20),
            &format!("node {id} to hear the others' levels"),
            || async {
                let l = broker.peer_format_levels();
                (l.len() == 2).then_some(l)
            },
        )
        .await;
        for (peer, level) in levels {
            let want = if peer == 3 { BASE } else { CHECKED_APPENDS };
            assert_eq!(level, want, "node {id} heard node {peer}");
        }
    }
    let group = station(&cluster, "rolling").await;
    let client = cluster.client();
    for i in 0..5 {
        client
            .produce("rolling", vec![keyed("k", format!("before {i}"))])
            .await
            .expect("produce");
    }
    for id in 1..=3u64 {
        assert_eq!(
            cluster.broker(id).metadata().format_level,
            BASE,
            "node 3 holds the cluster at level 1"
        );
    }
    let status = client.cluster_status().await.expect("status");
    assert_eq!(
        status.format_level,
        u32::from(BASE),
        "ClusterStatus reports it"
    );
    every_replica_holds(&cluster, group, 5).await;

    // Node 3 is upgraded: restarted without the limit.
    held.store(false, Ordering::SeqCst);
    cluster.stop(3).await;
    cluster.restart(3).await;
    every_node_sees_level(&cluster, CHECKED_APPENDS).await;
    let status = client.cluster_status().await.expect("status");
    assert_eq!(status.format_level, u32::from(CHECKED_APPENDS));
    for i in 0..5 {
        client
            .produce("rolling", vec![keyed("k", format!("after {i}"))])
            .await
            .expect("produce");
    }
    every_replica_holds(&cluster, group, 10).await;

    // Going back is refused: a node limited to level 1 does not start on a level-2 cluster.
    held.store(true, Ordering::SeqCst);
    cluster.stop(3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match cluster.try_restart(3).await {
            Err(e) if e.to_string().contains("format level") => break e.to_string(),
            // The previous incarnation may still hold RocksDB's lock for a moment.
            Err(e) if e.to_string().contains("lock") => {
                assert!(tokio::time::Instant::now() < deadline, "still locked: {e}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(()) => panic!("a node limited to level 1 started on a level-2 cluster"),
        }
    };
    assert!(
        refused.contains("format level 2") && refused.contains("--max-format-level"),
        "{refused}"
    );

    // Node 3's log holds the five unchecked appends, then the five checked ones.
    let store = cluster.open_store(3).await;
    let log = stored_log(&store, group);
    let appends: Vec<bool> = log
        .iter()
        .filter_map(|(_, bytes)| {
            match junction_raft::format::decode_log_entry(bytes)
                .expect("decode")
                .payload
            {
                EntryPayload::Normal(Command::Partition(
                    cmd @ PartitionCommand::Checked { .. },
                )) => {
                    assert_eq!(cmd.check(), Ok(()));
                    Some(true)
                }
                EntryPayload::Normal(Command::Partition(cmd)) => {
                    cmd.digest().is_some().then_some(false)
                }
                _ => None,
            }
        })
        .collect();
    assert_eq!(appends, [[false; 5], [true; 5]].concat(), "{log:?}");
    drop(store);

    // Without the limit it starts, and reads both kinds.
    held.store(false, Ordering::SeqCst);
    cluster.restart(3).await;
    every_replica_holds(&cluster, group, 10).await;
    cluster.shutdown().await;
}

/// Every entry of `group`'s log in a stopped node's store (a partition on disk keeps it in
/// segment files).
fn stored_log(store: &junction_storage::Store, group: u64) -> Vec<(u64, Vec<u8>)> {
    store
        .segment_log(group, None)
        .expect("open the segment log")
        .expect("a partition on disk keeps its log in segments")
        .range(0, u64::MAX)
        .expect("read the log")
}
