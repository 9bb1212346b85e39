//! A key-shared consumer group in the chaos workload: [`MEMBERS`] members (Rust group
//! consumers, in this process) share every partition while the faults run, and ack every
//! delivery. Members crash too: each drops its consumer without leaving a while after it
//! joined (what it held is redelivered to another member once `ack_wait` passes) and joins
//! again as a new member. Crashes are timed, not counted in messages: a count made a faster
//! build crash its members more often (a release build crashed one every 0.4 s, holding
//! most keys up behind `ack_wait` at any moment, so the group fell behind by design of the
//! workload, not of the broker). After the heal the group drains to zero lag, and the checker
//! verifies that:
//! - every acknowledged produce was delivered to the group at least once;
//! - per key, first deliveries came in sequence order;
//! - nothing was dead-lettered (`max_deliveries` is far above what faults can cause), so
//!   every message was acked by the group, and the group's final lag is zero.
//!
//! Redeliveries (after leader changes, or acks lost with a leader) are counted, not faulted:
//! delivery is at least once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use junction_client::proto::{GroupMode, GroupSettings, StartPosition, group_settings};
use junction_client::{Client, GroupOptions, Start};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::checker::{Violation, ViolationKind};
use crate::history::{Attempt, Outcome, decode_payload};
use crate::workload::Recorder;

/// The chaos run's consumer group.
pub const GROUP: &str = "chaos-checker";
/// Deliveries before a message would be dead-lettered: never reached by redeliveries alone.
const MAX_DELIVERIES: u32 = 1000;
/// Members sharing the group's partitions.
pub const MEMBERS: usize = 3;
/// Member `i` crashes at its first message `CRASH_AFTER + i × CRASH_STAGGER` after it
/// joined, then rejoins.
const CRASH_AFTER: Duration = Duration::from_secs(10);
const CRASH_STAGGER: Duration = Duration::from_millis(3_300);

/// One message as the group member received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDelivery {
    pub partition: u32,
    pub offset: u64,
    pub delivery_count: u32,
    pub key: String,
    pub seq: u64,
    pub at_ms: u64,
}

/// What the group check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    pub deliveries: u64,
    pub distinct_delivered: u64,
    pub redeliveries: u64,
    pub dead_letters: u64,
    pub final_lag: Option<u64>,
    pub acked_not_delivered: u64,
    pub rejoins: u64,
    /// Members sharing the partitions at once.
    #[serde(default)]
    pub members: u64,
    /// Members that crashed (dropped without leaving) and were replaced.
    #[serde(default)]
    pub member_crashes: u64,
}

/// The running members.
pub struct GroupChecker {
    deliveries: Arc<Mutex<Vec<GroupDelivery>>>,
    rejoins: Arc<Mutex<u64>>,
    crashes: Arc<Mutex<u64>>,
    task: JoinHandle<()>,
}

fn settings() -> GroupSettings {
    GroupSettings {
        start: Some(group_settings::Start::Position(
            StartPosition::Earliest as i32,
        )),
        ack_wait_ms: 5_000,
        max_deliveries: MAX_DELIVERIES,
        max_in_flight: 500,
        session_timeout_ms: 10_000,
        mode: GroupMode::KeyShared as i32,
        ..Default::default()
    }
}

/// What the members share.
#[derive(Clone)]
struct Shared {
    client: Client,
    station: String,
    rec: Arc<Recorder>,
    deliveries: Arc<Mutex<Vec<GroupDelivery>>>,
    rejoins: Arc<Mutex<u64>>,
    crashes: Arc<Mutex<u64>>,
}

impl GroupChecker {
    /// Starts the members; each consumes in the background, rejoining when it stops or
    /// after its crash.
    pub fn start(client: Client, station: String, rec: Arc<Recorder>) -> Self {
        let shared = Shared {
            client,
            station,
            rec,
            deliveries: Arc::default(),
            rejoins: Arc::default(),
            crashes: Arc::default(),
        };
        let (deliveries, rejoins, crashes) = (
            shared.deliveries.clone(),
            shared.rejoins.clone(),
            shared.crashes.clone(),
        );
        let task = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every member.
            let mut members = tokio::task::JoinSet::new();
            for i in 0..MEMBERS as u32 {
                members.spawn(member(shared.clone(), CRASH_AFTER + CRASH_STAGGER * i));
            }
            while members.join_next().await.is_some() {}
        });
        Self {
            deliveries,
            rejoins,
            crashes,
            task,
        }
    }

    /// Waits (bounded) until every partition's messages below `ends` were delivered and the
    /// group's lag is zero, then stops the member and returns what it received, the final
    /// lag (None when it could not be read) and the dead-letter count.
    pub async fn finish(
        self,
        client: &Client,
        station: &str,
        ends: &BTreeMap<u32, u64>,
        limit: Duration,
    ) -> (Vec<GroupDelivery>, Option<u64>, u64, (u64, u64)) {
        let deadline = Instant::now() + limit;
        let mut lag = None;
        loop {
            let delivered: BTreeSet<(u32, u64)> = self
                .deliveries
                .lock()
                .iter()
                .map(|d| (d.partition, d.offset))
                .collect();
            let all = ends
                .iter()
                .all(|(p, end)| (0..*end).all(|o| delivered.contains(&(*p, o))));
            if all {
                lag = client
                    .describe_group(station, GROUP)
                    .await
                    .ok()
                    .filter(|d| d.partitions.iter().all(|p| p.known))
                    .map(|d| d.partitions.iter().map(|p| p.lag).sum::<u64>());
                if lag == Some(0) {
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.task.abort();
        let dls = format!("{station}{}", junction_types::groups::DEAD_LETTER_SUFFIX);
        let dead_letters = client
            .read(&dls, 0, Start::Latest, 1)
            .await
            .map_or(0, |r| r.high_watermark);
        let rejoins = *self.rejoins.lock();
        let crashes = *self.crashes.lock();
        let deliveries = self.deliveries.lock().clone();
        (deliveries, lag, dead_letters, (rejoins, crashes))
    }
}

/// One member: consumes and acks; at its first message `crash_after` after it joined it
/// drops its consumer without leaving (a crash) and joins again as a new member.
async fn member(sh: Shared, crash_after: Duration) {
    loop {
        let opts = GroupOptions {
            settings: settings(),
            client: "junction chaos".into(),
            ..GroupOptions::default()
        };
        let mut consumer = match sh.client.group_consumer(&sh.station, GROUP, opts).await {
            Ok(c) => c,
            Err(_) => {
                // The cluster may be faulted right now: count it and try again.
                *sh.rejoins.lock() += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let crash_at = Instant::now() + crash_after;
        let crashed = loop {
            let Some(m) = consumer.recv().await else {
                break false;
            };
            let id = decode_payload(&m.message.payload);
            sh.deliveries.lock().push(GroupDelivery {
                partition: m.partition(),
                offset: m.offset(),
                delivery_count: m.delivery_count,
                key: id.as_ref().map(|i| i.key.clone()).unwrap_or_default(),
                seq: id.map_or(u64::MAX, |i| i.seq),
                at_ms: sh.rec.now_ms(),
            });
            if Instant::now() >= crash_at {
                // Received, never acked: another member gets it once ack_wait passes.
                break true;
            }
            consumer.ack(&m);
        };
        drop(consumer);
        if crashed {
            *sh.crashes.lock() += 1;
        } else {
            *sh.rejoins.lock() += 1;
        }
    }
}

/// Checks the group's deliveries against the produce history.
pub fn check_group(
    attempts: &[Attempt],
    deliveries: &[GroupDelivery],
    final_lag: Option<u64>,
    dead_letters: u64,
    (rejoins, member_crashes): (u64, u64),
) -> (GroupStats, Vec<Violation>) {
    let mut violations = Vec::new();
    let mut seen: BTreeMap<(u32, u64), u32> = BTreeMap::new();
    for d in deliveries {
        *seen.entry((d.partition, d.offset)).or_default() += 1;
    }
    let mut acked_not_delivered = 0u64;
    for a in attempts {
        if let Outcome::Ok { partition, offset } = a.outcome
            && !seen.contains_key(&(partition, offset))
        {
            acked_not_delivered += 1;
            if violations.len() < 100 {
                let mut v = Violation::new(
                    ViolationKind::GroupUndelivered,
                    format!(
                        "{}#{} acknowledged at {partition}:{offset} was never delivered to the group",
                        a.key, a.seq
                    ),
                );
                v.partition = Some(partition);
                v.offset = Some(offset);
                v.key = Some(a.key.clone());
                violations.push(v);
            }
        }
    }
    // Per key, the first delivery of each acknowledged sequence number, in delivery order.
    let acked: BTreeSet<(String, u64)> = attempts
        .iter()
        .filter(|a| a.outcome.is_ok())
        .map(|a| (a.key.clone(), a.seq))
        .collect();
    let mut first: HashMap<(String, u64), usize> = HashMap::new();
    for (i, d) in deliveries.iter().enumerate() {
        first.entry((d.key.clone(), d.seq)).or_insert(i);
    }
    let mut last_by_key: HashMap<&str, (u64, usize)> = HashMap::new();
    for (key, seq) in &acked {
        let Some(at) = first.get(&(key.clone(), *seq)) else {
            continue;
        };
        if let Some((prev_seq, prev_at)) = last_by_key.get(key.as_str())
            && prev_at > at
        {
            let mut v = Violation::new(
                ViolationKind::GroupReordered,
                format!("{key}#{seq} was first delivered before {key}#{prev_seq}"),
            );
            v.key = Some(key.clone());
            violations.push(v);
        }
        last_by_key.insert(key.as_str(), (*seq, *at));
    }
    if dead_letters > 0 {
        violations.push(Violation::new(
            ViolationKind::GroupDeadLettered,
            format!("{dead_letters} messages were dead-lettered although every delivery was acked"),
        ));
    }
    if final_lag != Some(0) {
        violations.push(Violation::new(
            ViolationKind::GroupLag,
            format!("the group's lag after the drain was {final_lag:?}, not 0"),
        ));
    }
    let stats = GroupStats {
        deliveries: deliveries.len() as u64,
        distinct_delivered: seen.len() as u64,
        redeliveries: deliveries.len() as u64 - seen.len() as u64,
        dead_letters,
        final_lag,
        acked_not_delivered,
        rejoins,
        members: MEMBERS as u64,
        member_crashes,
    };
    (stats, violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(key: &str, seq: u64, partition: u32, offset: u64) -> Attempt {
        crate::fixtures::acked(key, seq, partition, offset, 0, 1)
    }

    fn delivered(key: &str, seq: u64, offset: u64, count: u32) -> GroupDelivery {
        GroupDelivery {
            partition: 0,
            offset,
            delivery_count: count,
            key: key.into(),
            seq,
            at_ms: 0,
        }
    }

    #[test]
    fn redeliveries_are_counted_and_order_is_checked_on_first_deliveries() {
        let attempts = vec![ok("a", 0, 0, 0), ok("a", 1, 0, 1), ok("b", 0, 0, 2)];
        let d = vec![
            delivered("a", 0, 0, 1),
            delivered("a", 1, 1, 1),
            delivered("a", 0, 0, 2),
            delivered("b", 0, 2, 1),
        ];
        let (stats, v) = check_group(&attempts, &d, Some(0), 0, (0, 0));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!((stats.redeliveries, stats.distinct_delivered), (1, 3));
    }

    #[test]
    fn missing_reordered_dead_lettered_and_lagging_are_violations() {
        let attempts = vec![ok("a", 0, 0, 0), ok("a", 1, 0, 1), ok("b", 0, 0, 2)];
        let d = vec![delivered("a", 1, 1, 1), delivered("a", 0, 0, 1)];
        let (stats, v) = check_group(&attempts, &d, Some(3), 1, (0, 0));
        let kinds: Vec<ViolationKind> = v.iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            vec![
                ViolationKind::GroupUndelivered,
                ViolationKind::GroupReordered,
                ViolationKind::GroupDeadLettered,
                ViolationKind::GroupLag
            ]
        );
        assert_eq!(stats.acked_not_delivered, 1);
    }
}
