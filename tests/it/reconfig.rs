//! Removing nodes and moving replicas: `remove-node` while producing, a rebalance after
//! adding nodes, a controller crash in the middle of a move, and the refusals.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use junction_client::Client;
use junction_proto::v1::{ClusterStatusResponse, StationInfo};

use crate::harness::{TestCluster, keyed, local_contents, read_all, wait_until};

/// Produces batches until `stop` is set; returns every acknowledged payload with where it was
/// acknowledged. Failed produces (a leader moving) are retried by the SDK or dropped: only an
/// acknowledgement counts.
fn produce_in_background(
    client: Client,
    station: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(u32, u64, bytes::Bytes)>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut batch = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let msgs: Vec<_> = (0..10)
                .map(|i| keyed(&format!("k{}", i % 5), format!("b{batch}-m{i}")))
                .collect();
            if let Ok(positions) = client.produce(station, msgs.clone()).await {
                for (m, p) in msgs.into_iter().zip(positions) {
                    acked.push((p.partition, p.offset, m.payload));
                }
            }
            batch += 1;
        }
        acked
    })
}

/// Produces `batches` batches of 20 keyed messages; returns where each was acknowledged.
async fn produce_batches(
    client: &Client,
    station: &str,
    batches: usize,
) -> Vec<(u32, u64, bytes::Bytes)> {
    let mut acked = Vec::new();
    for b in 0..batches {
        let msgs: Vec<_> = (0..20)
            .map(|i| keyed(&format!("k{i}"), format!("{b}-{i}")))
            .collect();
        let pos = client
            .produce(station, msgs.clone())
            .await
            .expect("produce");
        for (m, p) in msgs.into_iter().zip(pos) {
            acked.push((p.partition, p.offset, m.payload));
        }
    }
    acked
}

/// Every acknowledged payload is stored at its acknowledged offset.
async fn assert_acked_stored(
    client: &Client,
    station: &str,
    partitions: u32,
    acked: &[(u32, u64, bytes::Bytes)],
) {
    let mut stored = BTreeMap::new();
    for p in 0..partitions {
        stored.insert(p, read_all(client, station, p).await);
    }
    for (p, off, payload) in acked {
        let m = stored[p]
            .get(*off as usize)
            .unwrap_or_else(|| panic!("acknowledged {p}/{off} is missing"));
        assert_eq!(m.offset, *off);
        assert_eq!(&m.payload, payload, "partition {p} offset {off}");
    }
}

async fn status(client: &Client) -> ClusterStatusResponse {
    client.cluster_status().await.expect("cluster status")
}

fn replica_nodes(s: &StationInfo) -> BTreeSet<u64> {
    s.partition_info
        .iter()
        .flat_map(|p| p.replicas.iter().copied())
        .collect()
}

/// Waits until every running node's metadata has no moves, no draining node and no
/// rebalance, and lists exactly `members`.
async fn wait_settled(cluster: &TestCluster, members: &[u64], limit: Duration) {
    let want: BTreeSet<u64> = members.iter().copied().collect();
    wait_until(limit, "the moves to finish on every node", || async {
        members
            .iter()
            .all(|id| {
                let b = cluster.broker(*id);
                let meta = b.metadata();
                meta.reconfig == junction_types::meta::Reconfig::default()
                    && b.meta_voters() == want
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_node_while_producing_loses_nothing_and_releases_its_data() {
    let mut cluster = TestCluster::start(4).await;
    let client = cluster.client_of(1);
    let station = client
        .create_station("moving", 4, 3)
        .await
        .expect("station");
    let controller = cluster.wait_for_metadata_leader().await;
    // The node to remove: one holding replicas, not the controller.
    let counts = status(&client).await.nodes;
    let leaving = counts
        .iter()
        .filter(|n| n.id != controller && n.partition_replicas > 0)
        .max_by_key(|n| n.partition_replicas)
        .expect("a node with replicas")
        .id;
    let groups_there: Vec<u64> = station
        .partition_info
        .iter()
        .filter(|p| p.replicas.contains(&leaving))
        .map(|p| p.group_id)
        .collect();
    assert!(!groups_there.is_empty());
    let stay = cluster
        .running()
        .into_iter()
        .find(|n| *n != leaving)
        .expect("another node");
    let producer_client = cluster.client_of(stay);
    let stop = Arc::new(AtomicBool::new(false));
    let producing = produce_in_background(producer_client, "moving", stop.clone());
    // Some messages before the removal starts.
    wait_until(
        Duration::from_secs(20),
        "messages before the removal",
        || async {
            let d = client.describe_station("moving").await.ok()?;
            (d.partition_info.iter().map(|p| p.next_offset).sum::<u64>() >= 200).then_some(())
        },
    )
    .await;

    cluster
        .client_of(stay)
        .remove_node(leaving)
        .await
        .expect("remove node");
    let st = status(&cluster.client_of(stay)).await;
    assert!(
        st.nodes.iter().any(|n| n.id == leaving && n.draining),
        "the node shows as draining: {:?}",
        st.nodes
    );
    // Repeating the call is harmless.
    cluster
        .client_of(stay)
        .remove_node(leaving)
        .await
        .expect("remove node again");
    let members: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|n| *n != leaving)
        .collect();
    wait_settled(&cluster, &members, Duration::from_secs(120)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = producing.await.expect("producer");
    assert!(acked.len() >= 200, "produced {}", acked.len());

    // Nothing acknowledged is lost; every partition has three replicas on the others.
    let via = cluster.client_of(stay);
    assert_acked_stored(&via, "moving", 4, &acked).await;
    let d = via.describe_station("moving").await.expect("describe");
    for p in &d.partition_info {
        assert_eq!(p.replicas.len(), 3, "{p:?}");
        assert!(!p.replicas.contains(&leaving), "{p:?}");
    }
    // The replicas agree with their leaders byte for byte, and the Raft groups' voters are
    // the listed replicas.
    for p in &d.partition_info {
        let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
            cluster.partition_leader(p.group_id)
        })
        .await;
        let want = local_contents(&cluster.broker(leader), p.group_id).await;
        for r in &p.replicas {
            let b = cluster.broker(*r);
            wait_until(Duration::from_secs(15), "replicas to converge", || async {
                (local_contents(&b, p.group_id).await == want).then_some(())
            })
            .await;
        }
        let raft = cluster
            .broker(leader)
            .partition(p.group_id)
            .expect("hosted")
            .raft
            .clone();
        let voters: BTreeSet<u64> = {
            use openraft::async_runtime::watch::WatchReceiver;
            let m = raft.metrics();
            let m = m.borrow_watched();
            m.membership_config.membership().voter_ids().collect()
        };
        assert_eq!(
            voters,
            p.replicas.iter().copied().collect::<BTreeSet<u64>>()
        );
    }
    // The node left the cluster and released its partitions' data.
    let st = status(&via).await;
    assert!(!st.nodes.iter().any(|n| n.id == leaving), "{:?}", st.nodes);
    let removed = cluster.broker(leaving);
    wait_until(
        Duration::from_secs(15),
        "the removed node to release its replicas",
        || async {
            groups_there
                .iter()
                .all(|g| removed.partition(*g).is_none())
                .then_some(())
        },
    )
    .await;
    drop(removed);
    cluster.stop(leaving).await;
    let store = cluster.open_store(leaving).await;
    let left: Vec<u64> = store
        .hosted_groups()
        .expect("groups")
        .into_iter()
        .filter(|g| *g != junction_types::META_GROUP)
        .collect();
    assert!(
        left.is_empty(),
        "partition data left on the removed node: {left:?}"
    );
    drop(store);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_spreads_replicas_onto_added_nodes() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client_of(1);
    client.create_station("wide", 6, 3).await.expect("station");
    let acked = produce_batches(&client, "wide", 10).await;
    for _ in 0..2 {
        let id = cluster.add_node().await;
        wait_until(
            Duration::from_secs(30),
            "the new node to be a voter",
            || async { cluster.broker(id).is_voter().then_some(()) },
        )
        .await;
    }
    let st = status(&client).await;
    assert_eq!(
        st.nodes.iter().map(|n| n.partition_replicas).sum::<u32>(),
        18
    );
    assert!(
        st.nodes
            .iter()
            .filter(|n| n.id > 3)
            .all(|n| n.partition_replicas == 0)
    );
    let planned = client.rebalance().await.expect("rebalance");
    assert!(planned >= 6, "planned {planned} moves");
    wait_settled(&cluster, &[1, 2, 3, 4, 5], Duration::from_secs(180)).await;
    let st = status(&client).await;
    let counts: Vec<u32> = st.nodes.iter().map(|n| n.partition_replicas).collect();
    let (lo, hi) = (
        counts.iter().copied().min().expect("nodes"),
        counts.iter().copied().max().expect("nodes"),
    );
    assert!(
        hi <= lo + 1,
        "replicas per node within one of even: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<u32>(), 18);
    let d = client.describe_station("wide").await.expect("describe");
    assert!(replica_nodes(&d).contains(&4) && replica_nodes(&d).contains(&5));
    // The preferred leaders (first replicas) are spread too: 6 partitions over 5 nodes.
    let mut firsts: BTreeMap<u64, usize> = (1..=5).map(|n| (n, 0)).collect();
    for p in &d.partition_info {
        *firsts.entry(p.replicas[0]).or_insert(0) += 1;
    }
    let most = firsts.values().copied().max().expect("nodes");
    let least = firsts.values().copied().min().expect("nodes");
    assert!(most <= least + 1, "preferred leaders per node: {firsts:?}");
    assert_acked_stored(&client, "wide", 6, &acked).await;
    // The moved partitions serve writes.
    client
        .produce("wide", vec![keyed("after", "rebalance")])
        .await
        .expect("produce after the rebalance");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_survives_a_controller_crash() {
    // One move at a time, so the crash lands while moves are left.
    let mut cluster = TestCluster::start_with(4, |c| c.max_moves = 1).await;
    let client = cluster.client_of(1);
    client.create_station("crash", 6, 3).await.expect("station");
    let acked = produce_batches(&client, "crash", 5).await;
    let controller = cluster.wait_for_metadata_leader().await;
    let leaving = cluster
        .running()
        .into_iter()
        .rev()
        .find(|n| *n != controller)
        .expect("a node to remove");
    let via = cluster
        .running()
        .into_iter()
        .find(|n| *n != controller && *n != leaving)
        .expect("a third node");
    cluster
        .client_of(via)
        .remove_node(leaving)
        .await
        .expect("remove node");
    // Crash the controller while a move is in progress.
    wait_until(Duration::from_secs(30), "a move in progress", || async {
        (!cluster.broker(via).metadata().reconfig.moves.is_empty()).then_some(())
    })
    .await;
    cluster.stop(controller).await;
    let new_controller = cluster.wait_for_metadata_leader().await;
    assert_ne!(new_controller, controller);
    // The crashed node comes back; the removal still finishes.
    cluster.restart(controller).await;
    let members: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|n| *n != leaving)
        .collect();
    wait_settled(&cluster, &members, Duration::from_secs(180)).await;
    let client = cluster.client_of(via);
    let d = client.describe_station("crash").await.expect("describe");
    assert!(
        !replica_nodes(&d).contains(&leaving),
        "{:?}",
        d.partition_info
    );
    assert!(d.partition_info.iter().all(|p| p.replicas.len() == 3));
    assert_acked_stored(&client, "crash", 6, &acked).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removals_that_would_lose_safety_are_refused() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client_of(2);
    client.create_station("three", 1, 3).await.expect("station");
    let e = client.remove_node(3).await.expect_err("too few nodes");
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
    assert!(
        e.to_string()
            .contains("would leave 2 node(s), fewer than 3"),
        "{e}"
    );
    let e = client.remove_node(9).await.expect_err("unknown node");
    assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
    assert!(e.to_string().contains("node 9 is not a member"), "{e}");
    // Nothing changed.
    let meta = cluster.broker(1).metadata();
    assert!(meta.reconfig.draining.is_empty());
    cluster.shutdown().await;
}

/// A node that is down can be removed: its partitions keep a majority, so their leaders move
/// the replicas without it, and the metadata group drops it. Started again on its old data,
/// it stays out of the cluster (and not ready) instead of rejoining or disturbing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_is_down_can_be_removed_and_stays_out() {
    let mut cluster = TestCluster::start(4).await;
    let client = cluster.client_of(1);
    client.create_station("down", 4, 3).await.expect("station");
    let acked = produce_batches(&client, "down", 5).await;
    let controller = cluster.wait_for_metadata_leader().await;
    let gone = cluster
        .running()
        .into_iter()
        .rev()
        .find(|n| *n != controller)
        .expect("a node to remove");
    cluster.stop(gone).await;
    let members: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter(|n| *n != gone)
        .collect();
    let via = cluster.client_of(members[0]);
    via.remove_node(gone)
        .await
        .expect("remove a node that is down");
    wait_settled(&cluster, &members, Duration::from_secs(120)).await;
    let d = via.describe_station("down").await.expect("describe");
    assert!(!replica_nodes(&d).contains(&gone), "{:?}", d.partition_info);
    assert_acked_stored(&via, "down", 4, &acked).await;
    // Back on its old data (which predates its removal): the metadata leader's answer shows
    // it is no longer a member, so it reports not ready and takes no part.
    cluster.restart(gone).await;
    let back = cluster.broker(gone);
    wait_until(
        Duration::from_secs(30),
        "the node to learn it was removed",
        || async { back.is_removed().then_some(()) },
    )
    .await;
    let st = status(&via).await;
    assert_eq!(
        st.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
        members,
        "the removed node is not listed again"
    );
    let ready = crate::rest::http(cluster.http_addr(gone), "GET", "/readyz", &[], None).await;
    let text = String::from_utf8_lossy(&ready.body);
    assert_eq!(ready.status, 503, "{text}");
    assert!(text.contains("was removed from the cluster"), "{text}");
    assert_ne!(
        back.meta_leader().0,
        Some(gone),
        "it did not take over the metadata group"
    );
    // The cluster still serves writes with it running.
    via.produce("down", vec![keyed("after", "removal")])
        .await
        .expect("produce after the removal");
    drop(back);
    cluster.shutdown().await;
}
