//! Per-key quarantine (`on_max_deliveries: park`) through a real cluster: a poison key parks
//! while every other key flows, the parked key is replicated state that survives a partition
//! leader kill, and an operator resumes it (its backlog is then delivered in order) or skips
//! its head to the dead-letter station (the key then goes on).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use junction_client::proto::{
    GroupMode, GroupSettings, OnMaxDeliveries, StartPosition, group_settings,
};
use junction_client::{GroupConsumer, GroupOptions};

use crate::harness::{TestCluster, keyed, wait_until};

#[derive(Default)]
struct Seen {
    /// payload → deliveries.
    deliveries: BTreeMap<String, u32>,
    /// Payloads acked, in order.
    acked: Vec<String>,
}

/// Nacks every delivery of a payload starting with `fail` while `failing` is set; acks
/// everything else.
fn member(
    mut c: GroupConsumer,
    seen: Arc<Mutex<Seen>>,
    failing: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), c.recv()).await
            else {
                continue;
            };
            let payload = String::from_utf8_lossy(&m.message.payload).into_owned();
            let fail = failing
                .lock()
                .expect("lock")
                .iter()
                .any(|f| payload.starts_with(f.as_str()));
            let mut s = seen.lock().expect("lock");
            *s.deliveries.entry(payload.clone()).or_default() += 1;
            if fail {
                c.nack(&m, Duration::ZERO);
            } else if c.ack(&m) {
                s.acked.push(payload);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_key_parks_survives_failover_and_is_resumed_or_skipped() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let station = client
        .create_station("quarantine", 1, 3)
        .await
        .expect("station");
    let group_id = station.partition_info[0].group_id;
    let settings = GroupSettings {
        start: Some(group_settings::Start::Position(
            StartPosition::Earliest as i32,
        )),
        ack_wait_ms: 2_000,
        max_deliveries: 2,
        mode: GroupMode::KeyShared as i32,
        on_max_deliveries: OnMaxDeliveries::Park as i32,
        session_timeout_ms: 3_000,
        ..Default::default()
    };
    client
        .create_group("quarantine", "billing", settings)
        .await
        .expect("group");
    // The poison key's three messages first, then 40 of ten healthy keys.
    let mut batch = vec![
        keyed("poison", "poison-0"),
        keyed("poison", "poison-1"),
        keyed("poison", "poison-2"),
    ];
    for i in 0..40 {
        batch.push(keyed(&format!("k{}", i % 10), format!("ok-{i}")));
    }
    client.produce("quarantine", batch).await.expect("produce");

    let seen = Arc::new(Mutex::new(Seen::default()));
    let failing = Arc::new(Mutex::new(vec!["poison".to_owned()]));
    let stop = Arc::new(AtomicBool::new(false));
    let options = GroupOptions {
        settings,
        ..GroupOptions::default()
    };
    let consumer = client
        .group_consumer("quarantine", "billing", options.clone())
        .await
        .expect("join");
    let task = member(consumer, seen.clone(), failing.clone(), stop.clone());

    // The healthy keys all go through while the poison key parks at its first message.
    wait_until(
        Duration::from_secs(30),
        "40 healthy messages acked",
        || async { (seen.lock().expect("lock").acked.len() == 40).then_some(()) },
    )
    .await;
    let parked = wait_until(Duration::from_secs(15), "the poison key parked", || async {
        let keys = client
            .list_parked("quarantine", "billing", None)
            .await
            .expect("list");
        (!keys.is_empty()).then_some(keys)
    })
    .await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].key, b"poison");
    assert_eq!(parked[0].head_offset, 0);
    let head = parked[0].head.as_ref().expect("the head message");
    assert_eq!(head.payload.as_ref(), b"poison-0");
    {
        let s = seen.lock().expect("lock");
        assert_eq!(
            s.deliveries.get("poison-0"),
            Some(&2),
            "max_deliveries of the head"
        );
        assert!(
            !s.deliveries.contains_key("poison-1"),
            "the key's backlog waits behind its head: {:?}",
            s.deliveries
        );
    }
    let g = client
        .describe_group("quarantine", "billing")
        .await
        .expect("describe");
    assert_eq!(g.partitions[0].parked_keys, 1);
    assert_eq!(g.partitions[0].lag, 3, "the parked key's three messages");

    // Kill the partition leader: the parked key is replicated and stays parked.
    let leader = cluster.partition_leader(group_id).expect("leader");
    cluster.stop(leader).await;
    let client = cluster.client_of(cluster.running()[0]);
    let new_leader = wait_until(
        Duration::from_secs(30),
        "a new partition leader",
        || async { cluster.partition_leader(group_id).filter(|l| *l != leader) },
    )
    .await;
    // New traffic flows through the new leader ...
    client
        .produce("quarantine", vec![keyed("k1", "after-failover")])
        .await
        .expect("produce");
    wait_until(
        Duration::from_secs(30),
        "the message after failover acked",
        || async {
            seen.lock()
                .expect("lock")
                .acked
                .contains(&"after-failover".to_owned())
                .then_some(())
        },
    )
    .await;
    // ... and the parked key's messages do not.
    {
        let s = seen.lock().expect("lock");
        assert_eq!(s.deliveries.get("poison-0"), Some(&2), "{:?}", s.deliveries);
        assert!(!s.deliveries.contains_key("poison-1"));
    }
    let still = client
        .list_parked("quarantine", "billing", Some(0))
        .await
        .expect("list on the new leader");
    assert_eq!(still.len(), 1, "parked on node {new_leader}: {still:?}");

    // Resuming a key that is not parked is refused and changes nothing.
    let err = client
        .resume_parked("quarantine", "billing", 0, Some(b"k1"))
        .await
        .expect_err("not parked");
    assert!(err.to_string().contains("not parked"), "{err}");

    // Resume: the consumer is fixed, the key's head and backlog go out in order.
    failing.lock().expect("lock").clear();
    let n = client
        .resume_parked("quarantine", "billing", 0, Some(b"poison"))
        .await
        .expect("resume");
    assert_eq!(n, 1);
    wait_until(
        Duration::from_secs(30),
        "the poison key drained",
        || async {
            let s = seen.lock().expect("lock");
            let poison: Vec<&String> = s.acked.iter().filter(|p| p.starts_with("poison")).collect();
            (poison == ["poison-0", "poison-1", "poison-2"]).then_some(())
        },
    )
    .await;
    wait_until(Duration::from_secs(10), "no key parked", || async {
        client
            .list_parked("quarantine", "billing", None)
            .await
            .expect("list")
            .is_empty()
            .then_some(())
    })
    .await;

    // Skip: another key parks; skipping moves its head to the dead-letter station and the
    // key goes on with its next message.
    failing.lock().expect("lock").push("bad-0".into());
    client
        .produce(
            "quarantine",
            vec![keyed("bad", "bad-0"), keyed("bad", "bad-1")],
        )
        .await
        .expect("produce");
    wait_until(Duration::from_secs(30), "the bad key parked", || async {
        let keys = client
            .list_parked("quarantine", "billing", None)
            .await
            .expect("list");
        keys.iter().any(|k| k.key == b"bad").then_some(())
    })
    .await;
    client
        .skip_parked("quarantine", "billing", 0, b"bad")
        .await
        .expect("skip");
    wait_until(
        Duration::from_secs(30),
        "bad-1 acked after the skip",
        || async {
            seen.lock()
                .expect("lock")
                .acked
                .contains(&"bad-1".to_owned())
                .then_some(())
        },
    )
    .await;
    let dead = wait_until(
        Duration::from_secs(15),
        "the skipped head dead-lettered",
        || async {
            let r = client
                .read("quarantine.dls", 0, junction_client::Start::Earliest, 10)
                .await
                .ok()?;
            r.messages
                .into_iter()
                .find(|m| m.payload.as_ref() == b"bad-0")
        },
    )
    .await;
    let reason = dead
        .headers
        .iter()
        .find(|h| h.key == "junction-dls-reason")
        .map(|h| String::from_utf8_lossy(&h.value).into_owned());
    assert_eq!(reason.as_deref(), Some("skipped"));
    assert_eq!(seen.lock().expect("lock").deliveries.get("bad-0"), Some(&2));

    stop.store(true, Ordering::Relaxed);
    task.await.expect("member");
    cluster.shutdown().await;
}
