//! The tail window (`junction_raft::tail`) on a real three-node cluster: a read at the end of
//! a partition is served from memory, sharing the bytes the window holds, and returns what
//! the store holds; older offsets come from the store; the node's windows keep to their
//! limit; a retention cut cuts the windows too.

use std::time::Duration;

use junction_client::StationSpec;
use junction_client::proto::RetentionPolicy;

use crate::harness::{TestCluster, keyed, wait_until};

const LIMIT: u64 = 16 << 10;
const MESSAGES: u64 = 400;

/// Checks every read of `group` on node `id` from each offset of `froms` against the store,
/// and that a read from the window's first offset shares the window's bytes.
async fn reads_match_the_store(cluster: &TestCluster, id: u64, group: u64, froms: &[u64]) {
    let b = cluster.broker(id);
    let replica = b.partition(group).expect("replica");
    let state = replica.shared.current();
    let disk = b
        .store()
        .read_messages(group, 0, state.next_offset, 10_000, 64 << 20)
        .expect("store read");
    for &from in froms {
        let (got, _) = b.read(group, from, 1000, 1 << 20).await.expect("read");
        let want: Vec<(u64, Vec<u8>)> = disk
            .iter()
            .filter(|(o, _)| *o >= from)
            .take(got.len().max(1))
            .cloned()
            .collect();
        let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|(o, v)| (o, v.to_vec())).collect();
        assert_eq!(got, want, "node {id}: read from {from}");
    }
    let (first, end) = replica.shared.window().range();
    assert_eq!(
        end, state.next_offset,
        "node {id}: the window ends at the last message"
    );
    let (got, _) = b.read(group, first, 1, 1 << 20).await.expect("read");
    let held = replica
        .shared
        .window()
        .read(first, end, 1, 1)
        .expect("the window holds its first offset");
    assert_eq!(
        got[0].1.as_ptr(),
        held[0].1.as_ptr(),
        "node {id}: a read at the tail shares the window's bytes instead of reading the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_reads_come_from_memory_and_return_what_the_store_holds() {
    let cluster = TestCluster::start_with(3, |c| {
        c.tail_window_bytes = LIMIT;
        c.retention_tick_ms = 100;
    })
    .await;
    let client = cluster.client();
    let s = client
        .create_station_with(
            StationSpec::new("tailed")
                .partitions(1)
                .replication_factor(3),
        )
        .await
        .expect("create");
    let station = format!("{}/{}", s.tenant, s.name);
    let group = s.partition_info[0].group_id;
    for chunk in 0..MESSAGES / 50 {
        let batch = (0..50)
            .map(|i| {
                keyed(
                    "k",
                    format!("message {:04} {}", chunk * 50 + i, "x".repeat(80)),
                )
            })
            .collect();
        client.produce(&station, batch).await.expect("produce");
    }
    for id in 1..=3 {
        let b = cluster.broker(id);
        wait_until(Duration::from_secs(10), "every message applied", || async {
            (b.partition(group)?.shared.current().next_offset == MESSAGES).then_some(())
        })
        .await;
        let (first, end) = b.partition(group).expect("replica").shared.window().range();
        // About 130 bytes a message plus the window's overhead: 16 KiB holds about 90.
        assert!(
            first > 0 && end - first > 20 && end - first < 200,
            "node {id}: the window holds only the newest messages: {first}..{end}"
        );
        let (used, limit) = b.tail_window_bytes();
        assert_eq!(limit, LIMIT as usize);
        assert!(
            used > 0 && used <= limit,
            "node {id}: {used} of {limit} bytes"
        );
        reads_match_the_store(&cluster, id, group, &[0, first - 1, first, end - 1]).await;
    }

    // Keep the newest 30: every replica's window starts at the cut or later.
    let mut policy = client
        .describe_station(&station)
        .await
        .expect("describe")
        .policy
        .unwrap_or_default();
    policy
        .retention
        .get_or_insert_with(RetentionPolicy::default)
        .max_messages = Some(30);
    client
        .update_station(&station, policy)
        .await
        .expect("update");
    for id in 1..=3 {
        let b = cluster.broker(id);
        wait_until(Duration::from_secs(10), "the retention cut", || async {
            (b.partition(group)?.shared.current().start_offset == MESSAGES - 30).then_some(())
        })
        .await;
        let (first, end) = b.partition(group).expect("replica").shared.window().range();
        assert!(
            first >= MESSAGES - 30 && end == MESSAGES,
            "node {id}: the window after the cut: {first}..{end}"
        );
        reads_match_the_store(&cluster, id, group, &[0, MESSAGES - 30, MESSAGES - 1]).await;
    }
    cluster.shutdown().await;
}
