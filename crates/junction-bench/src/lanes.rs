//! `junction bench lanes` (I2, I3): key-shared consumption of one partition.
//!
//! Each phase fills a fresh one-partition station with `--keys` keys (each key's messages
//! numbered from 0) and lets a fresh key-shared group consume it with N members, every member
//! its own `Client` and `GroupConsumer`, handling one message at a time: it checks the key's
//! order, works for `--work` (a handler's I/O, slept), and acks. Throughput is the acks of
//! `--duration`, counted after the first delivery. For each of `--members` (I2: 8 members
//! against 1) and, with `--poison`, once more with the largest member count while one key
//! fails every delivery (I3: the other keys' throughput against the clean run). Rounds rotate
//! nothing (each phase has its own station and group); the report gives medians.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use junction_client::proto::{GroupMode, GroupSettings, StartPosition, group_settings};
use junction_client::{Client, GroupOptions, Message, ProducerOptions};
use serde::Serialize;

use crate::load::{admin, options};
use crate::{BenchArgs, median};

/// I2: 8 members reach at least this multiple of 1 member's throughput.
pub const MIN_SPEEDUP: f64 = 6.0;
/// I3: with a poison key, the other keys keep at least this share of their throughput.
pub const MIN_POISON_RATIO: f64 = 0.95;
/// The key that fails every delivery in a poison phase.
const POISON_KEY: &str = "key-0";

/// One phase's result.
#[derive(Debug, Clone, Serialize)]
pub struct LanesPhase {
    pub members: usize,
    pub poison: bool,
    /// Acks per second of the keys that do not fail.
    pub throughput: f64,
    pub acked: u64,
    /// A key's message seen before an earlier one of the key.
    pub order_violations: u64,
    /// Deliveries of messages already seen (after an expiry or a nack).
    pub redeliveries: u64,
    /// The least and most any member acked.
    pub member_min: u64,
    pub member_max: u64,
}

/// The lanes report.
#[derive(Debug, Clone, Serialize)]
pub struct LanesReport {
    pub command: String,
    pub keys: u64,
    pub work_ms: f64,
    pub duration_s: f64,
    pub rounds: Vec<Vec<LanesPhase>>,
    /// Median throughput per member count (clean phases).
    pub median_throughput: Vec<(usize, f64)>,
    /// Median of the per-round ratios: most members over fewest.
    pub median_speedup: f64,
    /// Median of the per-round ratios: poison over clean, at the most members.
    pub median_poison_ratio: Option<f64>,
    pub order_violations: u64,
    pub passed: bool,
}

/// Per key, the highest sequence number seen so far.
type Order = std::sync::Mutex<HashMap<Vec<u8>, u64>>;

#[derive(Default)]
struct Tally {
    acked: u64,
    violations: u64,
    redeliveries: u64,
}

/// Fills a fresh station with `total` messages over `keys` keys; returns its name.
async fn fill(
    client: &Client,
    base: &str,
    tag: &str,
    keys: u64,
    total: u64,
) -> anyhow::Result<String> {
    let station = format!("{base}-{tag}");
    client
        .create_station(&station, 1, 3)
        .await
        .with_context(|| format!("creating {station}"))?;
    let producer = client.producer(&station, ProducerOptions::default());
    producer.ready().await.context("starting the producer")?;
    let mut sends = Vec::with_capacity(total as usize);
    for i in 0..total {
        let (k, seq) = (i % keys, i / keys);
        sends.push(producer.send(Message {
            key: Some(format!("key-{k}").into_bytes()),
            headers: vec![],
            payload: seq.to_string().into_bytes().into(),
            partition: None,
            msg_id: None,
        }));
    }
    for s in sends {
        s.await.context("filling the station")?;
    }
    producer.close().await;
    Ok(station)
}

/// What every member of a phase is given.
#[derive(Clone)]
struct Plan {
    station: String,
    group: String,
    work: Duration,
    poison: bool,
    order: Arc<Order>,
    stop: Instant,
    max_in_flight: u32,
}

/// One member: handles messages one at a time until `stop`.
async fn member(client: Client, plan: Plan) -> anyhow::Result<Tally> {
    let Plan {
        station,
        group,
        work,
        poison,
        order,
        stop,
        max_in_flight,
    } = plan;
    let options = GroupOptions {
        settings: GroupSettings {
            start: Some(group_settings::Start::Position(
                StartPosition::Earliest as i32,
            )),
            mode: GroupMode::KeyShared as i32,
            ..Default::default()
        },
        client: "junction bench lanes".into(),
        max_in_flight,
        ..GroupOptions::default()
    };
    let mut consumer = client
        .group_consumer(&station, &group, options)
        .await
        .context("joining the group")?;
    let mut tally = Tally::default();
    loop {
        let left = stop.saturating_duration_since(Instant::now());
        let Ok(Some(m)) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let key = m.message.key.clone().unwrap_or_default();
        let seq: u64 = std::str::from_utf8(&m.message.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .context("a payload that is not a sequence number")?;
        {
            let mut o = order
                .lock()
                .map_err(|_| anyhow::anyhow!("the order table was poisoned"))?;
            match o.get(&key) {
                Some(high) if seq <= *high => tally.redeliveries += 1,
                Some(high) if seq != high + 1 => {
                    tally.violations += 1;
                    o.insert(key.clone(), seq);
                }
                None if seq != 0 => {
                    tally.violations += 1;
                    o.insert(key.clone(), seq);
                }
                _ => {
                    o.insert(key.clone(), seq);
                }
            }
        }
        tokio::time::sleep(work).await;
        if poison && key == POISON_KEY.as_bytes() {
            consumer.nack(&m, Duration::ZERO);
        } else if Instant::now() < stop {
            consumer.ack(&m);
            tally.acked += 1;
        }
    }
    consumer.close().await.context("leaving the group")?;
    Ok(tally)
}

async fn phase(
    args: &BenchArgs,
    addrs: &[String],
    members: usize,
    poison: bool,
    tag: &str,
) -> anyhow::Result<LanesPhase> {
    let duration = args.duration.unwrap_or(Duration::from_secs(10));
    let work = args.work;
    let keys = if args.keys == 0 { 1000 } else { args.keys };
    // Enough that the largest group never runs dry: half again what it can handle.
    let per_member = duration.as_secs_f64() / work.as_secs_f64().max(1e-4);
    let total = ((per_member * members as f64 * 1.5) as u64).max(keys * 2);
    let admin = admin(addrs, args.token.as_deref())?;
    let base = args
        .station
        .clone()
        .unwrap_or_else(|| format!("lanes-{}", std::process::id()));
    let station = fill(&admin, &base, tag, keys, total).await?;
    let group = format!("g-{tag}");
    let order: Arc<Order> = Arc::default();
    // The clock starts as the members start joining (a join takes milliseconds).
    let joined = Instant::now();
    let stop = joined + duration;
    let plan = Plan {
        station: station.clone(),
        group: group.clone(),
        work,
        poison,
        order,
        stop,
        max_in_flight: args.member_in_flight,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..members {
        let client = Client::connect_with(addrs.iter().cloned(), options(args.token.as_deref()))
            .context("creating a client")?;
        tasks.spawn(member(client, plan.clone()));
    }
    let mut per_member = Vec::with_capacity(members);
    let mut total_tally = Tally::default();
    while let Some(r) = tasks.join_next().await {
        let t = r.context("a member task failed")??;
        per_member.push(t.acked);
        total_tally.acked += t.acked;
        total_tally.violations += t.violations;
        total_tally.redeliveries += t.redeliveries;
    }
    let elapsed = stop
        .saturating_duration_since(joined)
        .as_secs_f64()
        .max(1e-9);
    let _ = admin.delete_group(&station, &group).await;
    let _ = admin.delete_station(&station).await;
    Ok(LanesPhase {
        members,
        poison,
        throughput: total_tally.acked as f64 / elapsed,
        acked: total_tally.acked,
        order_violations: total_tally.violations,
        redeliveries: total_tally.redeliveries,
        member_min: per_member.iter().copied().min().unwrap_or(0),
        member_max: per_member.iter().copied().max().unwrap_or(0),
    })
}

/// Runs I2 (and I3 with `--poison`) and returns the report.
pub async fn run(
    args: &BenchArgs,
    addrs: &[String],
    command: String,
) -> anyhow::Result<LanesReport> {
    let mut counts = args.members.clone();
    counts.sort_unstable();
    counts.dedup();
    if counts.is_empty() || counts[0] == 0 {
        anyhow::bail!("--members needs member counts of at least 1, e.g. 1,8");
    }
    let most = counts[counts.len() - 1];
    let fewest = counts[0];
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        let mut phases = Vec::new();
        for m in &counts {
            let p = phase(args, addrs, *m, false, &format!("r{round}-m{m}")).await?;
            eprintln!(
                "round {round}: {m} member(s): {:.0} msg/s, {} out of order",
                p.throughput, p.order_violations
            );
            phases.push(p);
        }
        if args.poison {
            let p = phase(args, addrs, most, true, &format!("r{round}-m{most}-poison")).await?;
            eprintln!(
                "round {round}: {most} member(s) with a poison key: {:.0} msg/s",
                p.throughput
            );
            phases.push(p);
        }
        rounds.push(phases);
    }
    let clean = |r: &Vec<LanesPhase>, m: usize| {
        r.iter()
            .find(|p| p.members == m && !p.poison)
            .map_or(0.0, |p| p.throughput)
    };
    let median_throughput = counts
        .iter()
        .map(|m| (*m, median(rounds.iter().map(|r| clean(r, *m)).collect())))
        .collect();
    let median_speedup = median(
        rounds
            .iter()
            .map(|r| clean(r, most) / clean(r, fewest).max(1e-9))
            .collect(),
    );
    let median_poison_ratio = args.poison.then(|| {
        median(
            rounds
                .iter()
                .map(|r| {
                    let poisoned = r.iter().find(|p| p.poison).map_or(0.0, |p| p.throughput);
                    poisoned / clean(r, most).max(1e-9)
                })
                .collect(),
        )
    });
    let order_violations = rounds.iter().flatten().map(|p| p.order_violations).sum();
    let speedup_ok = fewest != 1 || most != 8 || median_speedup >= MIN_SPEEDUP;
    let poison_ok = median_poison_ratio.is_none_or(|r| r >= MIN_POISON_RATIO);
    Ok(LanesReport {
        command,
        keys: if args.keys == 0 { 1000 } else { args.keys },
        work_ms: args.work.as_secs_f64() * 1000.0,
        duration_s: args
            .duration
            .unwrap_or(Duration::from_secs(10))
            .as_secs_f64(),
        rounds,
        median_throughput,
        median_speedup,
        median_poison_ratio,
        order_violations,
        passed: speedup_ok && poison_ok && order_violations == 0,
    })
}

impl LanesReport {
    /// The report as text.
    pub fn table(&self) -> String {
        let mut t = format!(
            "lanes: key-shared consumption of 1 partition, {} keys, {:.1} ms of work per message, {:.0} s per phase, {} round(s)\n",
            self.keys,
            self.work_ms,
            self.duration_s,
            self.rounds.len()
        );
        for (i, r) in self.rounds.iter().enumerate() {
            for p in r {
                t.push_str(&format!(
                    "  round {i}: {:>2} member(s){}: {:>8.0} msg/s  acked {:>7}  per member {}-{}  redelivered {}  out of order {}\n",
                    p.members,
                    if p.poison { " + poison key" } else { "" },
                    p.throughput,
                    p.acked,
                    p.member_min,
                    p.member_max,
                    p.redeliveries,
                    p.order_violations
                ));
            }
        }
        for (m, tp) in &self.median_throughput {
            t.push_str(&format!("median, {m} member(s): {tp:.0} msg/s\n"));
        }
        t.push_str(&format!(
            "I2 speedup (most members over fewest, median of rounds): {:.2}x (target >= {MIN_SPEEDUP} for 8 over 1)\n",
            self.median_speedup
        ));
        if let Some(r) = self.median_poison_ratio {
            t.push_str(&format!(
                "I3 other keys with a poison key over without (median of rounds): {r:.3} (target >= {MIN_POISON_RATIO})\n"
            ));
        }
        t.push_str(&format!(
            "per-key order violations: {}\n{}",
            self.order_violations,
            if self.passed { "PASS" } else { "FAIL" }
        ));
        t
    }
}
