//! A healthy cluster: create, produce, read, tail, describe, delete, restart.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use junction_client::Start;

use crate::harness::{TestCluster, keyed, local_contents, read_all, wait_until};

/// Every acknowledged message is on every replica, byte for byte, at the offset it was
/// acknowledged with, and keyed messages stay in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_are_on_every_replica() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_tenant("acme").await.expect("create tenant");
    let station = client
        .create_station("acme/orders", 3, 3)
        .await
        .expect("create");
    assert_eq!(station.partition_info.len(), 3);
    assert!(
        station
            .partition_info
            .iter()
            .all(|p| p.leader.is_some() && p.replicas.len() == 3)
    );

    let mut acked = Vec::new();
    for batch in 0..20 {
        let msgs: Vec<_> = (0..25)
            .map(|i| keyed(&format!("tenant-{}", i % 7), format!("b{batch}-m{i}")))
            .collect();
        let positions = client
            .produce("acme/orders", msgs.clone())
            .await
            .expect("produce");
        for (m, p) in msgs.into_iter().zip(positions) {
            acked.push((p.partition, p.offset, m));
        }
    }
    assert_eq!(acked.len(), 500);

    // Each message readable where it was acknowledged, and per-key order equals send order.
    let mut by_partition: HashMap<u32, Vec<junction_proto::v1::StoredMessage>> = HashMap::new();
    for p in 0..3 {
        by_partition.insert(p, read_all(&client, "acme/orders", p).await);
    }
    for (p, off, m) in &acked {
        let stored = &by_partition[p][*off as usize];
        assert_eq!(stored.offset, *off);
        assert_eq!(stored.payload, m.payload);
        assert_eq!(stored.key, m.key);
        let expected =
            junction_types::partitioner::partition_for_key(m.key.as_deref().unwrap_or_default(), 3);
        assert_eq!(
            *p, expected,
            "keyed messages go to the documented partition"
        );
    }
    for msgs in by_partition.values() {
        assert!(
            msgs.iter().enumerate().all(|(i, m)| m.offset == i as u64),
            "offsets are dense"
        );
    }

    // Replicas converge to identical contents.
    let described = client
        .describe_station("acme/orders")
        .await
        .expect("describe");
    for p in &described.partition_info {
        let want = local_contents(&cluster.broker(p.leader.expect("leader")), p.group_id).await;
        assert_eq!(want.len() as u64, p.next_offset);
        for r in &p.replicas {
            let broker = cluster.broker(*r);
            wait_until(
                Duration::from_secs(10),
                "replica to hold every message",
                || async { (local_contents(&broker, p.group_id).await == want).then_some(()) },
            )
            .await;
        }
    }
    cluster.shutdown().await;
}

/// Any node answers any call: produce through one node, read through another, even when
/// neither holds the partition (replication factor 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_node_forwards_to_the_partition_leader() {
    let cluster = TestCluster::start(3).await;
    let admin = cluster.client_of(2);
    let s = admin.create_station("single", 3, 1).await.expect("create");
    for p in &s.partition_info {
        let holder = p.replicas[0];
        let other = (1..=3).find(|n| *n != holder).expect("another node");
        let msg = junction_proto::v1::Message {
            partition: Some(p.partition),
            ..keyed("k", format!("to-{}", p.partition))
        };
        let pos = cluster
            .client_of(other)
            .produce("single", vec![msg])
            .await
            .expect("forwarded produce");
        assert_eq!(pos[0].partition, p.partition);
        let third = (1..=3)
            .find(|n| *n != holder && *n != other)
            .expect("a third node");
        let read = cluster
            .client_of(third)
            .read("single", p.partition, Start::Earliest, 10)
            .await
            .expect("read");
        assert_eq!(read.messages.len(), 1);
        assert_eq!(
            read.messages[0].payload.as_ref(),
            format!("to-{}", p.partition).as_bytes()
        );
    }
    cluster.shutdown().await;
}

/// A tail delivers messages committed after it started, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_follows_new_messages() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("events", 1, 3).await.expect("create");
    client
        .produce("events", vec![keyed("a", "before")])
        .await
        .expect("produce");
    let mut tail = client.tail("events", 0, Start::Latest);
    let producer = client.clone();
    let sender = tokio::spawn(async move {
        for i in 0..50 {
            producer
                .produce("events", vec![keyed("a", format!("after-{i}"))])
                .await
                .expect("produce");
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 50 {
        let m = tokio::time::timeout(Duration::from_secs(10), tail.next())
            .await
            .expect("tail delivers within 10 s")
            .expect("stream open")
            .expect("message");
        seen.push(String::from_utf8_lossy(&m.payload).to_string());
    }
    sender.await.expect("producer");
    let want: Vec<String> = (0..50).map(|i| format!("after-{i}")).collect();
    assert_eq!(seen, want);
    cluster.shutdown().await;
}

/// Deleting a station removes its data from every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_station_data_is_removed_everywhere() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let s = client.create_station("tmp", 2, 3).await.expect("create");
    let msgs: Vec<_> = (0..100)
        .map(|i| keyed(&format!("k{i}"), vec![7u8; 100]))
        .collect();
    client.produce("tmp", msgs).await.expect("produce");
    let groups: Vec<u64> = s.partition_info.iter().map(|p| p.group_id).collect();
    client.delete_station("tmp").await.expect("delete");
    for id in 1..=3 {
        let broker = cluster.broker(id);
        wait_until(
            Duration::from_secs(10),
            "replicas to be removed",
            || async {
                let stored = broker.store().hosted_groups().ok()?;
                let gone = groups
                    .iter()
                    .all(|g| broker.partition(*g).is_none() && !stored.contains(g));
                gone.then_some(())
            },
        )
        .await;
        for g in &groups {
            let left = broker
                .store()
                .read_messages(*g, 0, u64::MAX, 10, 1 << 20)
                .expect("read store");
            assert!(left.is_empty(), "node {id} still has messages of group {g}");
        }
    }
    let err = client.describe_station("tmp").await.expect_err("gone");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    cluster.shutdown().await;
}

/// Restarting every node keeps every acknowledged message, stored once (the SDK's producer
/// is idempotent), and the cluster serves again — to the same producer too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_messages() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("durable", 2, 3)
        .await
        .expect("create");
    let producer = client.producer("durable", junction_client::ProducerOptions::default());
    let sends: Vec<_> = (0..200)
        .map(|i| producer.send(keyed(&format!("k{}", i % 10), format!("m{i}"))))
        .collect();
    let mut positions = Vec::new();
    for s in sends {
        positions.push(s.await.expect("produce"));
    }
    for id in 1..=3 {
        cluster.stop(id).await;
    }
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    cluster.wait_for_metadata_leader().await;
    // The producer survived the restart: its next message is stored once.
    let after = producer
        .send(keyed("k0", "after restart"))
        .await
        .expect("produce after restart");
    producer.close().await;
    let client = cluster.client();
    let mut stored = Vec::new();
    for p in 0..2 {
        let msgs = read_all(&client, "durable", p).await;
        for (pos, i) in positions.iter().zip(0..).filter(|(x, _)| x.partition == p) {
            let m = &msgs[pos.offset as usize];
            assert_eq!(m.offset, pos.offset);
            assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
        }
        stored.extend(msgs.into_iter().map(|m| (p, m.offset, m.payload.to_vec())));
    }
    // Every message, each exactly once.
    assert_eq!(stored.len(), 201, "no message stored twice");
    assert!(stored.contains(&(after.partition, after.offset, b"after restart".to_vec())));
    cluster.shutdown().await;
}

/// The standard health service answers SERVING, and /metrics exposes produce counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_metrics_endpoints_answer() {
    let cluster = TestCluster::start(1).await;
    let client = cluster.client();
    client.create_station("m", 1, 1).await.expect("create");
    client
        .produce("m", vec![keyed("k", "v")])
        .await
        .expect("produce");
    let channel = cluster.channel(1).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "junction.v1.Broker".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let metrics = crate::rest::get(cluster.http_addr(1), "/metrics").await;
    let body = String::from_utf8_lossy(&metrics.body);
    assert!(
        body.contains("junction_produce_messages_total"),
        "metrics page: {body}"
    );
    assert!(body.contains("junction_raft_is_leader"));
    let ready = crate::rest::get(cluster.http_addr(1), "/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    cluster.shutdown().await;
}

/// A tail from an offset past the end fails with OUT_OF_RANGE on a follower too (after the
/// follower's catch-up allowance), instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_past_the_end_fails_on_a_follower_too() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let s = client.create_station("edge", 1, 3).await.expect("create");
    client
        .produce("edge", vec![keyed("k", "one")])
        .await
        .expect("produce");
    let group = s.partition_info[0].group_id;
    let leader = cluster.partition_leader(group).expect("leader");
    let follower = (1..=3).find(|n| *n != leader).expect("follower");
    let mut tail = cluster
        .client_of(follower)
        .tail("edge", 0, Start::Offset(1_000));
    let first = tokio::time::timeout(Duration::from_secs(15), tail.next())
        .await
        .expect("the tail answers within 15 s")
        .expect("an item");
    let err = first.expect_err("offset 1000 is past the end");
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange), "{err}");
    cluster.shutdown().await;
}

/// A node the running cluster does not know joins it (learner, then voter), and new stations
/// place replicas on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_node_joins_the_running_cluster() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client
        .create_station("before", 3, 3)
        .await
        .expect("station");
    let id = cluster.add_node().await;
    assert_eq!(id, 4);
    wait_until(
        Duration::from_secs(30),
        "node 4 to become a voter",
        || async {
            let all = cluster.running().into_iter().all(|n| {
                let b = cluster.broker(n);
                b.node_addrs().contains_key(&4)
            });
            (all && cluster.broker(4).is_voter()).then_some(())
        },
    )
    .await;
    // The new node serves, and new stations use it.
    let via_new = cluster.client_of(4);
    let s = via_new
        .create_station("after", 4, 3)
        .await
        .expect("station via node 4");
    assert!(
        s.partition_info.iter().any(|p| p.replicas.contains(&4)),
        "{:?}",
        s.partition_info
    );
    via_new
        .produce("after", vec![keyed("k", "hello")])
        .await
        .expect("produce via node 4");
    let status = via_new.cluster_status().await.expect("status");
    assert_eq!(status.nodes.len(), 4);
    assert!(status.nodes.iter().all(|n| n.alive), "{:?}", status.nodes);
    cluster.shutdown().await;
}

/// Server reflection lists every service the port serves, the standard health service and
/// reflection itself included, through both reflection protocol versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_every_served_service() {
    use tonic_reflection::pb::{v1, v1alpha};
    let cluster = TestCluster::start(1).await;
    let channel = cluster.channel(1).await;
    let expected = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "junction.v1.Admin",
        "junction.v1.Broker",
        "junction.v1.Groups",
    ];

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let reply = replies.next().await.expect("a reply").expect("reply ok");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected v1 reply: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "v1 lists {names:?}, not {name}"
        );
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let reply = replies.next().await.expect("a reply").expect("reply ok");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected v1alpha reply: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "v1alpha lists {names:?}"
    );
    cluster.shutdown().await;
}

/// The reported attack: one `Peer.JoinCluster` call naming a node at an address where nothing
/// listens. The node must not become a voter (nor stay a member), and the cluster must keep
/// its tolerance of one failure: with node 3 stopped afterwards, metadata writes still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_naming_an_unreachable_node_is_refused() {
    let mut cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_metadata_leader().await;
    let dead = dead_addr();
    // Asked through a follower and through the leader: the follower points at the leader.
    let follower = cluster
        .running()
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    let mut via_follower = cluster.peer_client(follower).await;
    let request = junction_proto::peer::JoinClusterRequest {
        node_id: 99,
        addr: dead.clone(),
    };
    let reply = via_follower
        .join_cluster(request.clone())
        .await
        .expect("join call")
        .into_inner();
    assert!(!reply.joined, "{reply:?}");
    assert_eq!(reply.leader_addr, cluster.addr(leader), "{reply:?}");

    let mut via_leader = cluster.peer_client(leader).await;
    let reply = via_leader
        .join_cluster(request)
        .await
        .expect("join call")
        .into_inner();
    assert!(!reply.joined, "{reply:?}");
    assert!(
        reply.error.contains("node 99 has not answered"),
        "{reply:?}"
    );
    wait_until(
        Duration::from_secs(10),
        "node 99 to leave the membership on every node",
        || async {
            cluster
                .running()
                .into_iter()
                .all(|n| !cluster.broker(n).node_addrs().contains_key(&99))
                .then_some(())
        },
    )
    .await;
    let status = cluster.client().cluster_status().await.expect("status");
    assert_eq!(status.nodes.len(), 3, "{:?}", status.nodes);

    // One failure is still tolerated.
    let survivor = if leader == 3 { 1 } else { leader };
    cluster.stop(if leader == 3 { 2 } else { 3 }).await;
    tokio::time::timeout(
        Duration::from_secs(20),
        cluster.client_of(survivor).create_tenant("after-the-join"),
    )
    .await
    .expect("metadata writes do not hang with one node down")
    .expect("tenant created");
    cluster.shutdown().await;
}

/// Node-to-node calls need the cluster's secret: a client without it, or with another
/// secret, can neither join, nor vote, nor append, nor read a node's status; the nodes
/// themselves (which carry it) work as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_calls_without_the_cluster_secret_are_refused() {
    use junction_proto::peer::peer_client::PeerClient;
    use junction_proto::peer::{JoinClusterRequest, NodeStatusRequest, RaftRequest};
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("s", 1, 3).await.expect("station");
    client
        .produce("s", vec![keyed("k", "v")])
        .await
        .expect("the nodes replicate with their secret");

    let dead = dead_addr();
    let other_secret = tempfile::tempdir().expect("dir");
    let other =
        junction_raft::peer_auth::ClusterSecret::load_or_create(&other_secret.path().join("s"))
            .expect("secret");
    // The client port does not serve the peer service at all.
    let mut on_client_port = PeerClient::new(cluster.channel(1).await);
    let refused = on_client_port
        .join_cluster(JoinClusterRequest {
            node_id: 99,
            addr: dead.clone(),
        })
        .await
        .expect_err("no peer service on the client port");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused}");
    let channel = cluster.peer_channel(1).await;
    let clients = [
        (
            "no secret",
            junction_raft::peer_auth::AttachSecret(None, None),
        ),
        (
            "another cluster's secret",
            junction_raft::peer_auth::AttachSecret(Some(other), None),
        ),
    ];
    for (what, attach) in clients {
        let mut peer = PeerClient::with_interceptor(channel.clone(), attach);
        let join = peer
            .join_cluster(JoinClusterRequest {
                node_id: 99,
                addr: dead.clone(),
            })
            .await
            .expect_err("join refused");
        assert_eq!(join.code(), tonic::Code::Unauthenticated, "{what}: {join}");
        let status = peer
            .node_status(NodeStatusRequest {})
            .await
            .expect_err("status refused");
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{what}: {status}"
        );
        let vote = peer
            .vote(RaftRequest {
                group: 0,
                payload: vec![1, 2, 3],
            })
            .await
            .expect_err("vote refused");
        assert_eq!(vote.code(), tonic::Code::Unauthenticated, "{what}: {vote}");
        let append = peer
            .append_entries(RaftRequest {
                group: 0,
                payload: vec![],
            })
            .await
            .expect_err("append refused");
        assert_eq!(
            append.code(),
            tonic::Code::Unauthenticated,
            "{what}: {append}"
        );
    }
    // With the secret, the status call answers.
    let mut peer = cluster.peer_client(1).await;
    peer.node_status(NodeStatusRequest {})
        .await
        .expect("status with the secret");
    let status = client.cluster_status().await.expect("status");
    assert_eq!(status.nodes.len(), 3);
    assert!(status.nodes.iter().all(|n| n.alive), "{:?}", status.nodes);
    cluster.shutdown().await;
}

/// Every node of a cluster ends up with the id its metadata leader made; a peer call carrying
/// another cluster's id is refused, and a node whose data belongs to another cluster refuses
/// to start, naming both ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_another_clusters_data_refuses_to_start() {
    let mut cluster = TestCluster::start(3).await;
    let id = cluster.cluster_id().await;
    assert_eq!(id.len(), 32, "{id}");
    let status = cluster.client().cluster_status().await.expect("status");
    assert_eq!(status.cluster_id, id, "ClusterStatus reports the id");

    // A caller with this cluster's secret but another cluster's id.
    let secret =
        junction_raft::peer_auth::ClusterSecret::load(&cluster.secret_file()).expect("secret");
    let other = junction_raft::peer_auth::ClusterIdentity::default();
    other
        .adopt("0123456789abcdef0123456789abcdef")
        .expect("adopt");
    let mut peer = junction_proto::peer::peer_client::PeerClient::with_interceptor(
        cluster.peer_channel(1).await,
        junction_raft::peer_auth::AttachSecret(Some(secret), Some(other)),
    );
    let refused = peer
        .node_status(junction_proto::peer::NodeStatusRequest {})
        .await
        .expect_err("another cluster's call is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains(&id)
            && refused
                .message()
                .contains("0123456789abcdef0123456789abcdef"),
        "{refused}"
    );

    // Node 3's data is replaced by another cluster's (here: its recorded id is).
    cluster.stop(3).await;
    let store = cluster.open_store(3).await;
    assert_eq!(
        store.cluster_id().expect("id").as_deref(),
        Some(id.as_str())
    );
    store
        .set_cluster_id("fedcba9876543210fedcba9876543210")
        .expect("set id");
    drop(store);
    // The store was just closed; a start may still find RocksDB's lock held for a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match cluster.try_restart(3).await {
            Err(e) if e.to_string().contains("refusing to start") => break e.to_string(),
            Err(e) if tokio::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("unexpected start error: {e}"),
            Ok(()) => panic!("a node with another cluster's data started"),
        }
    };
    assert!(
        err.contains(&id) && err.contains("fedcba9876543210fedcba9876543210"),
        "{err}"
    );
    // The rest of the cluster is unaffected.
    cluster
        .client_of(1)
        .create_tenant("still-fine")
        .await
        .expect("tenant on the two healthy nodes");
    cluster.shutdown().await;
}

/// A node whose data directory is lost (a replaced disk) rejoins the cluster it belonged to,
/// with the same id, instead of initialising a new one; it catches up on the metadata and
/// on every message, votes only once caught up, and then counts in quorums again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_lost_its_data_rejoins_and_catches_up() {
    let mut cluster = TestCluster::start(3).await;
    let id = cluster.cluster_id().await;
    let client = cluster.client_of(2);
    client.create_station("kept", 1, 3).await.expect("create");
    let producer = client.producer("kept", junction_client::ProducerOptions::default());
    for i in 0..50 {
        producer
            .send(keyed("k", format!("m{i}")))
            .await
            .expect("produce");
    }
    producer.close().await;
    let group = client
        .describe_station("kept")
        .await
        .expect("describe")
        .partition_info[0]
        .group_id;

    // Node 1, the lowest id (the one that initialised the cluster), loses everything.
    cluster.stop(1).await;
    std::fs::remove_dir_all(cluster.data_dir(1)).expect("delete node 1's data");
    cluster.restart(1).await;
    let rejoined = cluster.broker(1);
    assert_eq!(
        rejoined.identity().get().as_deref(),
        Some(id.as_str()),
        "node 1 took its members' cluster id instead of making a new one"
    );
    let floors = rejoined.vote_floors();
    assert!(
        floors.floor(junction_types::META_GROUP).unwrap_or(0) > 0
            && floors.floor(group).unwrap_or(0) > 0,
        "node 1 recorded what its members had applied: {floors:?}"
    );
    let want = local_contents(&cluster.broker(2), group).await;
    assert_eq!(want.len(), 50);
    wait_until(
        Duration::from_secs(60),
        "node 1 to hold the station and its messages again",
        || async {
            let b = cluster.broker(1);
            (b.metadata().stations.contains_key("default/kept")
                && local_contents(&b, group).await == want)
                .then_some(())
        },
    )
    .await;

    // With node 3 down, every write needs node 1's acknowledgement: it is a voter again.
    cluster.stop(3).await;
    let positions = cluster
        .client_of(1)
        .produce("kept", vec![keyed("k", "after the rejoin")])
        .await
        .expect("produce with nodes 1 and 2");
    assert_eq!(positions[0].offset, 50);
    cluster
        .client_of(1)
        .create_tenant("after-rejoin")
        .await
        .expect("metadata write with nodes 1 and 2");
    cluster.shutdown().await;
}

/// A stored record whose bytes change on one node's disk fails its checksum there: a read of
/// that replica answers DATA_LOSS (`CORRUPT_RECORD`, naming the node and offset) instead of
/// serving the changed bytes, while the other replicas serve the record intact; then the
/// corrupt replica repairs itself from the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_record_is_refused_not_served() {
    use junction_proto::v1::ReadRequest;
    use junction_proto::v1::broker_client::BrokerClient;
    use tonic_types::StatusExt;

    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("bits", 1, 3).await.expect("create");
    let payloads: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("payload {i:04}").into_bytes())
        .collect();
    client
        .produce(
            "bits",
            payloads.iter().map(|p| keyed("k", p.clone())).collect(),
        )
        .await
        .expect("produce");
    let described = client.describe_station("bits").await.expect("describe");
    let group = described.partition_info[0].group_id;
    let want = local_contents(&cluster.broker(1), group).await;
    assert_eq!(want.len(), 20);
    for id in [2, 3] {
        let broker = cluster.broker(id);
        wait_until(
            Duration::from_secs(10),
            "every replica holds the batch",
            || async { (local_contents(&broker, group).await == want).then_some(()) },
        )
        .await;
    }

    // Flip one bit of offset 7's payload in node 3's store, as a failing disk would.
    flip_payload_bit(&mut cluster, 3, group, 7, b"payload 0007").await;

    let read_local = |id: u64| {
        let cluster = &cluster;
        async move {
            let mut broker = BrokerClient::new(cluster.channel(id).await);
            broker
                .read(ReadRequest {
                    station: "bits".into(),
                    partition: 0,
                    start: Some(junction_proto::v1::read_request::Start::Offset(0)),
                    max_messages: 100,
                    local_replica: true,
                    ..Default::default()
                })
                .await
        }
    };
    let status = wait_until(
        Duration::from_secs(20),
        "node 3 to serve its replica again",
        || async {
            match read_local(3).await {
                Err(s) if s.code() == tonic::Code::DataLoss => Some(s),
                Err(s) => {
                    eprintln!("node 3 not ready: {s}");
                    None
                }
                Ok(r) => panic!(
                    "node 3 served a corrupted replica: {:?}",
                    r.into_inner()
                        .messages
                        .iter()
                        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                        .collect::<Vec<_>>()
                ),
            }
        },
    )
    .await;
    assert!(status.message().contains("checksum mismatch"), "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "CORRUPT_RECORD");
    assert_eq!(info.metadata.get("node").map(String::as_str), Some("3"));
    assert_eq!(info.metadata.get("offset").map(String::as_str), Some("7"));

    // The other replicas hold it intact.
    for id in [1, 2] {
        let read = read_local(id)
            .await
            .expect("an intact replica")
            .into_inner();
        let got: Vec<Vec<u8>> = read.messages.iter().map(|m| m.payload.to_vec()).collect();
        assert_eq!(got, payloads, "node {id}");
    }
    // Node 3 repairs itself: the corrupt read started a scrub of its replica, which wiped it
    // (a leader hands over first, and the next corrupt read repairs it); it catches up from
    // the leader and serves the intact records.
    wait_until(
        Duration::from_secs(30),
        "node 3 to repair its replica",
        || async {
            let r = read_local(3).await.ok()?.into_inner();
            let got: Vec<Vec<u8>> = r.messages.iter().map(|m| m.payload.to_vec()).collect();
            (got == payloads).then_some(())
        },
    )
    .await;
    cluster.shutdown().await;
}

/// A loopback address where nothing listens (the port was free a moment ago).
fn dead_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .to_string()
}

/// A W3C `traceparent` in a produce call's metadata is stored with every message that has
/// none of its own, also when the call is forwarded to the partition's leader, so consumers
/// continue the producer's trace; a malformed one is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_traceparent_is_stored_with_the_messages_it_produced() {
    use junction_proto::v1::broker_client::BrokerClient;
    use junction_proto::v1::{Header, ProduceRequest};
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let s = client
        .create_station("traced", 1, 3)
        .await
        .expect("station");
    let leader = wait_until(Duration::from_secs(10), "a leader", || async {
        cluster.partition_leader(s.partition_info[0].group_id)
    })
    .await;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    let mut broker = BrokerClient::new(cluster.channel(follower).await);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let own = "00-11111111111111111111111111111111-2222222222222222-00";
    let produce = |trace: &'static str| {
        let mut req = tonic::Request::new(ProduceRequest {
            station: "traced".into(),
            messages: vec![
                keyed("a", "plain"),
                junction_proto::v1::Message {
                    headers: vec![Header {
                        key: "traceparent".into(),
                        value: own.as_bytes().to_vec(),
                    }],
                    ..keyed("b", "own")
                },
            ],
            request_id: 0,
            producer: None,
        });
        req.metadata_mut()
            .insert("traceparent", trace.parse().expect("metadata"));
        req
    };
    broker.produce(produce(tp)).await.expect("produce");
    broker
        .produce(produce("not-a-trace"))
        .await
        .expect("produce with a malformed traceparent");
    let stored = read_all(&client, "traced", 0).await;
    let trace_of = |i: usize| {
        stored[i]
            .headers
            .iter()
            .find(|h| h.key == "traceparent")
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
    };
    assert_eq!(stored.len(), 4);
    assert_eq!(trace_of(0).as_deref(), Some(tp), "taken from the call");
    assert_eq!(
        trace_of(1).as_deref(),
        Some(own),
        "the message's own is kept"
    );
    assert_eq!(trace_of(2), None, "a malformed traceparent is ignored");
    cluster.shutdown().await;
}

/// Creates `station` (one partition, three replicas), produces `n` messages `payload NNNN`
/// and waits until every replica holds them; returns the group, its leader and the records.
async fn replicated_payloads(
    cluster: &TestCluster,
    station: &str,
    n: usize,
) -> (u64, u64, Vec<(u64, bytes::Bytes)>) {
    let spec = junction_client::StationSpec::new(station)
        .partitions(1)
        .replication_factor(3);
    replicated(cluster, spec, n, |i| keyed("k", format!("payload {i:04}"))).await
}

/// Creates the one-partition station `spec`, produces `message(i)` for `i` in `0..n` and
/// waits until every replica holds them; returns the group, its leader and the records.
async fn replicated(
    cluster: &TestCluster,
    spec: junction_client::StationSpec,
    n: usize,
    message: impl Fn(usize) -> junction_proto::v1::Message,
) -> (u64, u64, Vec<(u64, bytes::Bytes)>) {
    let client = cluster.client();
    let s = client.create_station_with(spec).await.expect("create");
    let group = s.partition_info[0].group_id;
    client
        .produce(
            &format!("{}/{}", s.tenant, s.name),
            (0..n).map(message).collect(),
        )
        .await
        .expect("produce");
    let leader = wait_until(Duration::from_secs(10), "a leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let want = local_contents(&cluster.broker(leader), group).await;
    assert_eq!(want.len(), n);
    for id in 1..=3 {
        let broker = cluster.broker(id);
        wait_until(
            Duration::from_secs(10),
            "every replica holds the batch",
            || async { (try_local_contents(&broker, group).await? == want).then_some(()) },
        )
        .await;
    }
    (group, leader, want)
}

/// Waits until node `id`'s replica of `group` holds `want` again after it was wiped and
/// fetched anew (a rebuilt replica keeps a vote floor; one that was not rebuilt has none).
async fn wait_rebuilt(cluster: &TestCluster, id: u64, group: u64, want: &[(u64, bytes::Bytes)]) {
    let broker = cluster.broker(id);
    wait_until(
        Duration::from_secs(30),
        "the replica to be rebuilt",
        || async { (try_local_contents(&broker, group).await? == want).then_some(()) },
    )
    .await;
    assert!(
        broker.vote_floors().floor(group).is_some(),
        "node {id}'s replica of group {group} was not rebuilt (no vote floor for it)"
    );
}

/// Asserts that every node reported `group` whole (`records`), intact and unchanged.
fn assert_all_clean(
    report: &junction_proto::v1::ScrubResponse,
    group: u64,
    records: u64,
    when: &str,
) {
    assert_eq!(report.nodes.len(), 3);
    for n in &report.nodes {
        assert!(n.error.is_empty(), "node {}: {}", n.node, n.error);
        let r = n
            .replicas
            .iter()
            .find(|r| r.group == group)
            .expect("replica report");
        assert_eq!(
            (
                r.records,
                r.corrupt_records,
                r.mismatched_ranges,
                r.action.as_str()
            ),
            (records, 0, 0, "ok"),
            "node {} {when}: {r:?}",
            n.node
        );
    }
}

/// Stops node `id`, flips one bit of the stored record at `offset` of `group` (inside
/// `payload`, which the record must hold), as a failing disk would, and restarts the node.
async fn flip_payload_bit(
    cluster: &mut TestCluster,
    id: u64,
    group: u64,
    offset: u64,
    payload: &[u8],
) {
    cluster.stop(id).await;
    let store = cluster.open_store(id).await;
    let mut bytes = store
        .read_messages(group, offset, offset + 1, 1, 1 << 20)
        .expect("read the record")
        .pop()
        .expect("the offset is stored")
        .1;
    let at = bytes
        .windows(payload.len())
        .position(|w| w == payload)
        .expect("the payload is in the stored bytes");
    bytes[at + 3] ^= 0x04;
    let mut batch = store.batch();
    batch.put_message(group, offset, &bytes).expect("put");
    store.write_sync(batch).expect("write");
    drop(store);
    cluster.restart(id).await;
}

/// A flipped bit in a follower's stored Raft log entry (format version 2 carries a CRC32C):
/// the replica refuses the entry as it starts instead of applying or sending it, is wiped
/// keeping its vote and catches up from the leader; the others never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_log_entry_is_refused_and_the_replica_rebuilt() {
    let mut cluster = TestCluster::start(3).await;
    let (group, leader, want) = replicated_payloads(&cluster, "logged", 40).await;
    let bad = (1..=3).find(|n| *n != leader).expect("a follower");
    cluster.stop(bad).await;
    let store = cluster.open_store(bad).await;
    let log = store
        .segment_log(group, None)
        .expect("open the segment log")
        .expect("a partition on disk keeps its log in segments");
    let (index, mut bytes) = log
        .last()
        .expect("read the log")
        .expect("the log has entries");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    let e = junction_raft::format::decode_log_entry(&bytes).expect_err("a flipped bit is caught");
    assert!(junction_raft::names_corruption(&e.to_string()), "{e}");
    // The same bit flipped on disk, in the entry's frame.
    let (path, payload_at) = log.locate(index).expect("the entry is on disk");
    drop(log);
    drop(store);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the segment");
        let pos = payload_at + at as u64;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, pos).expect("read");
        f.write_all_at(&[b[0] ^ 0x10], pos).expect("write");
        f.sync_all().expect("sync");
    }
    cluster.restart(bad).await;
    wait_rebuilt(&cluster, bad, group, &want).await;
    // It takes part again: a write commits and reaches it.
    let client = cluster.client();
    client
        .produce("logged", vec![keyed("k", "after the repair")])
        .await
        .expect("produce");
    let broker = cluster.broker(bad);
    wait_until(
        Duration::from_secs(10),
        "the new write on the rebuilt replica",
        || async {
            (try_local_contents(&broker, group).await?.len() == want.len() + 1).then_some(())
        },
    )
    .await;
    drop(broker);
    cluster.shutdown().await;
}

/// Everything `broker` holds of `group`, or `None` while it cannot read it (a replica
/// being reopened, or a corrupt record).
async fn try_local_contents(
    broker: &junction_broker::Broker,
    group: u64,
) -> Option<Vec<(u64, bytes::Bytes)>> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let (batch, _) = broker.read(group, from, 10_000, 64 << 20).await.ok()?;
        match batch.last() {
            None => return Some(out),
            Some((last, _)) => from = last + 1,
        }
        out.extend(batch);
    }
}

/// A flipped bit in a follower's stored record: a scrub pass finds it on that node only
/// (checksum), wipes that replica, which catches up from the leader; the next pass finds
/// every replica intact, and the repaired replica counts in quorums again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_finds_a_flipped_bit_and_the_replica_is_repaired_from_the_leader() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let (group, leader, want) = replicated_payloads(&cluster, "scrubbed", 50).await;
    // A clean cluster scrubs clean.
    let clean = client.scrub().await.expect("scrub");
    assert_all_clean(&clean, group, 50, "before");

    // Flip one bit of offset 7's payload in a follower's store, as a failing disk would.
    let bad = (1..=3).find(|n| *n != leader).expect("a follower");
    flip_payload_bit(&mut cluster, bad, group, 7, b"payload 0007").await;
    wait_until(
        Duration::from_secs(20),
        "the replica to run again",
        || async { cluster.broker(bad).partition(group).map(|_| ()) },
    )
    .await;

    // Scrub until the corrupt replica was wiped (a replica that happens to lead hands
    // leadership over first).
    let found = std::cell::Cell::new(0u64);
    wait_until(
        Duration::from_secs(30),
        "a scrub pass to repair the corrupt replica",
        || {
            let (client, found) = (&client, &found);
            async move {
                let report = client.scrub().await.expect("scrub");
                let mut repaired = false;
                for n in &report.nodes {
                    for r in n.replicas.iter().filter(|r| r.group == group) {
                        if n.node == bad {
                            found.set(found.get() + r.corrupt_records);
                            if r.corrupt_records > 0 {
                                assert_eq!(r.corrupt_offsets, vec![7], "{r:?}");
                            }
                            repaired |= r.action == "repairing";
                        } else {
                            assert_eq!(
                                (r.corrupt_records, r.mismatched_ranges),
                                (0, 0),
                                "healthy node {} reported {r:?}",
                                n.node
                            );
                        }
                    }
                }
                repaired.then_some(())
            }
        },
    )
    .await;
    assert!(found.get() > 0, "the flipped bit was not found");
    wait_rebuilt(&cluster, bad, group, &want).await;
    let after = client.scrub().await.expect("scrub");
    assert_all_clean(&after, group, 50, "after the repair");
    // The repaired replica is part of every quorum again: with another node down, writes
    // still commit.
    let other = (1..=3)
        .find(|n| *n != bad && *n != leader)
        .expect("a third node");
    cluster.stop(other).await;
    wait_until(
        Duration::from_secs(30),
        "a write with the repaired replica in quorum",
        || async {
            client
                .produce("scrubbed", vec![keyed("k", "after the repair")])
                .await
                .ok()
        },
    )
    .await;
    cluster.shutdown().await;
}

/// The background scrubber finds and repairs a flipped bit in a follower's replica without
/// anyone asking or reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_background_scrubber_repairs_a_flipped_bit_on_its_own() {
    let mut cluster = TestCluster::start_with(3, |c| c.scrub_every_ms = 300).await;
    let (group, leader, want) = replicated_payloads(&cluster, "scrubbed", 30).await;
    let bad = (1..=3).find(|n| *n != leader).expect("a follower");
    flip_payload_bit(&mut cluster, bad, group, 12, b"payload 0012").await;
    let broker = cluster.broker(bad);
    // Until repaired, the record there fails its checksum.
    if let Ok((raw, _)) = broker.read(group, 12, 1, 1 << 20).await
        && let Some((12, bytes)) = raw.first()
        && bytes != &want[12].1
    {
        assert!(
            junction_raft::format::check_record(bytes).is_err(),
            "a changed record passed its checksum"
        );
    }
    drop(broker);
    wait_rebuilt(&cluster, bad, group, &want).await;
    cluster.shutdown().await;
}

/// A flipped bit in a record a replica must read to open (its dedup window is rebuilt from
/// the stored messages): the replica cannot start, so the node wipes it and fetches it again
/// from the leader instead of retrying the same failure forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_cannot_open_for_corruption_is_rebuilt() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let spec = junction_client::StationSpec::new("windowed")
        .partitions(1)
        .replication_factor(3)
        .policy(junction_proto::v1::StationPolicy {
            dedup_window_ms: Some(600_000),
            ..Default::default()
        });
    let (group, leader, want) = replicated(&cluster, spec, 20, |i| junction_proto::v1::Message {
        msg_id: Some(format!("id-{i}")),
        ..keyed("k", format!("payload {i:04}"))
    })
    .await;
    let bad = (1..=3).find(|n| *n != leader).expect("a follower");
    flip_payload_bit(&mut cluster, bad, group, 4, b"payload 0004").await;
    wait_rebuilt(&cluster, bad, group, &want).await;
    // The rebuilt replica knows the window: a repeated id is still a duplicate.
    cluster.stop(leader).await;
    let again = wait_until(
        Duration::from_secs(30),
        "a produce without the old leader",
        || async {
            client
                .produce(
                    "windowed",
                    vec![junction_proto::v1::Message {
                        msg_id: Some("id-3".into()),
                        ..keyed("k", "again")
                    }],
                )
                .await
                .ok()
        },
    )
    .await;
    assert!(again[0].duplicate, "{again:?}");
    cluster.shutdown().await;
}
