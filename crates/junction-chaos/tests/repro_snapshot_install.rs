//! Targeted reproduction of a bug the chaos suite found (seed 7, `--duration 30m
//! --fault-interval 2s`): a node killed (-9) while it installs a snapshot sent by its leader
//! restarts with a partition replica that can never start again:
//!
//! ```text
//! starting partition replica failed; will retry group=1 error=raft failed: when Read
//! LogIndex(0): Cannot re-apply logs: need logs from index 0, but purged up to T55-N1.77231
//! ```
//!
//! Recipe: kill a follower, write more entries than the leader keeps below its snapshots,
//! restart the follower (the leader then streams it a snapshot), kill it again while it
//! installs the snapshot, restart it; the follower must host the partition and catch up.
//! In every broken replica the chaos runs produced (two with seed 7, two with
//! `junction chaos --duration 5m --seed 11 --faults one-way,cluster-restart,kill-node
//! --fault-interval 1s`), a whole-cluster `kill -9` hit a node that was catching up through
//! a snapshot: after a blocked link healed (seed 7), or ~0.3 s after it was restarted from
//! an earlier kill (seed 11).
//!
//! Fixed in 04adbab (the install no longer clears `last_applied` first; `junction-raft` has
//! the unit regression test). This process-level check passes on the fixed code; it was not
//! run against the pre-fix binary, so it stays ignored (about 40 s):
//! `cargo test --workspace --test repro_snapshot_install -- --ignored`.

use std::path::PathBuf;
use std::time::Duration;

use junction_chaos::cluster::{Cluster, ClusterSpec};
use junction_client::{Client, ClientOptions, Message};
use tokio::time::Instant;

fn junction_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("JUNCTION_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(debug) = exe.parent().and_then(|deps| deps.parent())
    {
        candidates.push(debug.join("junction"));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/junction"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/junction-target/debug/junction"));
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!("the junction binary was not found (looked at {candidates:?})"),
    }
}

async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "process-level check of the snapshot-install crash fix; about 40 s"]
async fn a_follower_killed_while_installing_a_snapshot_restarts_cleanly() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        bin: junction_bin(),
        seed: 1,
        extra_args: ["--snapshot-every", "200", "--keep-logs", "20"]
            .map(String::from)
            .to_vec(),
        disk_faults: false,
        tls: false,
        auth: false,
    })
    .await
    .expect("cluster");
    let addrs = cluster.grpc_addrs();
    let client = Client::connect_with(
        addrs.values().cloned(),
        ClientOptions::default().with_retry_deadline(Duration::from_secs(20)),
    )
    .expect("client");
    wait_for(Duration::from_secs(60), "a ready cluster", || async {
        let s = client.cluster_status().await.ok()?;
        (s.metadata_leader.is_some() && s.nodes.iter().all(|n| n.alive)).then_some(())
    })
    .await;
    client
        .create_station("repro", 1, 3)
        .await
        .expect("create station");
    let group = wait_for(Duration::from_secs(30), "a partition leader", || async {
        let info = client.describe_station("repro").await.ok()?;
        let p = info.partition_info.first()?;
        p.leader.map(|_| p.group_id)
    })
    .await;

    let payload = vec![b'x'; 2048];
    for round in 0..12u64 {
        let leaders = cluster.leaders().await;
        let leader = leaders.get(&group).map(|(l, _)| *l).expect("leader");
        let follower = cluster
            .ids()
            .into_iter()
            .find(|id| *id != leader)
            .expect("follower");
        // The follower misses more entries than the leader keeps below its snapshots (one
        // message per produce, so one Raft entry each).
        cluster.kill(follower).await.expect("kill");
        let mut producers = Vec::new();
        for _ in 0..8 {
            let client = client.clone();
            let payload = payload.clone();
            producers.push(tokio::spawn(async move {
                for _ in 0..60 {
                    let m = Message {
                        key: None,
                        headers: Vec::new(),
                        payload: payload.clone().into(),
                        partition: Some(0),
                        msg_id: None,
                    };
                    client.produce("repro", vec![m]).await.expect("produce");
                }
            }));
        }
        for p in producers {
            p.await.expect("producer task");
        }
        // Back up: the leader streams it a snapshot. Kill it again at a different moment of
        // the transfer/install each round.
        cluster.start_node(follower).expect("restart");
        cluster
            .wait_answering(&[follower], Duration::from_secs(30))
            .await
            .expect("follower answers");
        tokio::time::sleep(Duration::from_millis(120 * round)).await;
        cluster.kill(follower).await.expect("kill");
        cluster.start_node(follower).expect("restart");
        let caught_up = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let statuses = cluster.statuses().await;
                let end = |id: u64| {
                    statuses
                        .get(&id)
                        .and_then(|s| s.groups.iter().find(|g| g.group == group))
                        .map(|g| g.next_offset)
                };
                if end(follower).is_some() && end(follower) == end(leader) {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        assert!(
            caught_up,
            "round {round}: node {follower}, killed while catching up from node {leader}, \
             did not host partition group {group} again within 30 s; its log ends with:\n{}",
            cluster.log_tail(follower, 15)
        );
    }
    cluster.shutdown(false).await;
}
