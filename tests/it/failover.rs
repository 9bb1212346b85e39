//! Leader failover under load: nothing acknowledged is lost, per-key order holds, offsets
//! stay dense.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::harness::{TestCluster, keyed, read_all, wait_until};

/// (key, seq) → (partition, offset) of every acknowledged produce.
type Acked = Arc<Mutex<BTreeMap<(String, u64), (u32, u64)>>>;

/// Starts `tasks` producers, each sending keyed messages with per-key sequence numbers one
/// batch at a time; returns the shared record of acknowledgements and a stop flag.
pub fn spawn_producers(
    client: junction_client::Client,
    station: &'static str,
    tasks: usize,
) -> (Acked, Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..5).map(|k| format!("tenant-{t}-{k}")).collect();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msgs = keys
                    .iter()
                    .map(|k| keyed(k, format!("{k}:{seq}")))
                    .collect();
                match client.produce(station, msgs).await {
                    Ok(positions) => {
                        let mut a = acked.lock();
                        for (k, p) in keys.iter().zip(positions) {
                            a.insert((k.clone(), seq), (p.partition, p.offset));
                        }
                        seq += 1;
                    }
                    // A failed batch is retried with the same sequence number.
                    Err(e) => tracing_warn(&e.to_string()),
                }
            }
        }));
    }
    (acked, stop, handles)
}

fn tracing_warn(msg: &str) {
    eprintln!("produce failed (will retry): {msg}");
}

/// Checks the invariants over everything stored in `partitions` partitions.
pub fn check_history(
    acked: &BTreeMap<(String, u64), (u32, u64)>,
    stored: &BTreeMap<u32, Vec<junction_proto::v1::StoredMessage>>,
) {
    // Dense offsets.
    for (p, msgs) in stored {
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.offset, i as u64, "partition {p} has a gap at {i}");
        }
    }
    // Every acknowledged message is where it was acknowledged.
    for ((key, seq), (p, off)) in acked {
        let m = stored
            .get(p)
            .and_then(|v| v.get(*off as usize))
            .unwrap_or_else(|| {
                panic!("acknowledged {key}:{seq} at partition {p} offset {off} is missing")
            });
        assert_eq!(
            m.payload.as_ref(),
            format!("{key}:{seq}").as_bytes(),
            "wrong message at {p}/{off}"
        );
    }
    // Per key, sequence numbers never go backwards (retries may repeat one).
    let mut last: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for msgs in stored.values() {
        for m in msgs {
            let text = String::from_utf8_lossy(&m.payload).to_string();
            let (key, seq) = text.rsplit_once(':').expect("payload is key:seq");
            let seq: u64 = seq.parse().expect("seq");
            let prev = last.insert(key.as_bytes().to_vec(), seq);
            assert!(
                prev.is_none_or(|p| p <= seq),
                "key {key} reordered: {prev:?} then {seq}"
            );
        }
    }
}

/// Stopping the leader of a partition mid-produce loses nothing that was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_leader_failover_loses_nothing() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let s = client.create_station("orders", 2, 3).await.expect("create");
    let group = s.partition_info[0].group_id;
    let (acked, stop, handles) = spawn_producers(client.clone(), "orders", 4);

    wait_until(
        Duration::from_secs(30),
        "100 acknowledged messages",
        || async { (acked.lock().len() >= 100).then_some(()) },
    )
    .await;
    let leader = cluster
        .partition_leader(group)
        .expect("partition 0 has a leader");
    let before = acked.lock().len();
    let killed_at = tokio::time::Instant::now();
    cluster.stop(leader).await;
    let new_leader = wait_until(
        Duration::from_secs(10),
        "a new partition leader",
        || async { cluster.partition_leader(group).filter(|l| *l != leader) },
    )
    .await;
    eprintln!(
        "partition leader {leader} replaced by {new_leader} in {:?}",
        killed_at.elapsed()
    );
    wait_until(
        Duration::from_secs(30),
        "producers to make progress after failover",
        || async { (acked.lock().len() >= before + 200).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.expect("producer task");
    }
    cluster.restart(leader).await;

    let mut stored = BTreeMap::new();
    for p in 0..2 {
        stored.insert(p, read_all(&client, "orders", p).await);
    }
    check_history(&acked.lock(), &stored);
    cluster.shutdown().await;
}
