//! `junction bench groups` (I1): does a group that stops acking slow the other groups?
//!
//! One station gets `--groups` partitioned consumer groups of one member each (every member
//! its own `Client` and `GroupConsumer`). A producer (the SDK's, open loop) sends `--rate`
//! messages/s, each carrying its send time; every member acks what it receives and records
//! the delivery latency (send → receipt). Each round runs two phases of `--duration` on fresh
//! groups, the order alternating: every group acks, and group 0 stops acking (its member
//! receives and never acks, so its in-flight window fills and stays full). The report compares
//! the p99 delivery latency of the other groups across the two phases (the I1 target: within
//! 10 %).

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use junction_client::proto::{GroupSettings, StartPosition, group_settings};
use junction_client::{Client, GroupOptions, Message, ProducerOptions};
use serde::Serialize;

use crate::load::{admin, new_histogram, now_us, options};
use crate::{BenchArgs, median};

/// I1: the healthy groups' p99 with a stalled group over without, at most this.
pub const MAX_P99_RATIO: f64 = 1.10;

/// One phase's measurement of the healthy groups.
#[derive(Debug, Clone, Serialize)]
pub struct GroupsPhase {
    pub stalled: bool,
    /// Deliveries per second to the healthy groups together.
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The I1 report.
#[derive(Debug, Clone, Serialize)]
pub struct GroupsReport {
    pub command: String,
    pub groups: usize,
    pub rate: u64,
    pub duration_s: f64,
    /// Per round: all acking, then with group 0 stalled.
    pub rounds: Vec<(GroupsPhase, GroupsPhase)>,
    pub median_p99_ratio: f64,
    pub passed: bool,
}

/// One member: acks (unless `stalled`) and records latencies until `stop`.
async fn member(
    client: Client,
    station: String,
    group: String,
    stalled: bool,
    stop: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let options = GroupOptions {
        settings: GroupSettings {
            start: Some(group_settings::Start::Position(
                StartPosition::Latest as i32,
            )),
            ..Default::default()
        },
        client: "junction bench groups".into(),
        ..GroupOptions::default()
    };
    let mut consumer = client
        .group_consumer(&station, &group, options)
        .await
        .with_context(|| format!("joining {group}"))?;
    let mut h = new_histogram()?;
    loop {
        let left = stop.saturating_duration_since(Instant::now());
        let Ok(Some(m)) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let sent = m
            .message
            .payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .context("a payload without a send time")?;
        if m.delivery_count == 1 {
            h.saturating_record(now_us().saturating_sub(sent).max(1));
        }
        if !stalled {
            consumer.ack(&m);
        }
    }
    consumer.close().await.context("leaving the group")?;
    Ok(h)
}

/// Produces at `rate` until `stop`, each payload starting with its send time.
async fn producer(
    client: Client,
    station: String,
    rate: u64,
    size: usize,
    stop: Instant,
) -> anyhow::Result<()> {
    let producer = client.producer(&station, ProducerOptions::default());
    producer.ready().await.context("starting the producer")?;
    let started = Instant::now();
    let mut sends = Vec::new();
    let mut n = 0u64;
    while Instant::now() < stop {
        let at = started + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(at.into()).await;
        let mut payload = now_us().to_le_bytes().to_vec();
        payload.resize(size.max(8), b'x');
        sends.push(producer.send(Message {
            key: Some(format!("k{}", n % 100).into_bytes()),
            headers: vec![],
            payload: payload.into(),
            partition: None,
            msg_id: None,
        }));
        n += 1;
    }
    for s in sends {
        s.await.context("producing")?;
    }
    producer.close().await;
    Ok(())
}

async fn phase(
    args: &BenchArgs,
    addrs: &[String],
    base: &str,
    stalled: bool,
    tag: &str,
) -> anyhow::Result<GroupsPhase> {
    let duration = args.duration.unwrap_or(Duration::from_secs(20));
    let groups = args.groups.max(2);
    // A fresh station per phase, deleted afterwards: no phase inherits another's groups.
    let admin = admin(addrs, args.token.as_deref())?;
    let station = format!("{base}-{tag}");
    admin
        .create_station(&station, args.partitions, args.replication_factor)
        .await
        .with_context(|| format!("creating {station}"))?;
    let station = station.as_str();
    // Members join first (from the latest position), then the producer starts.
    let joined_by = Instant::now() + Duration::from_secs(5);
    let stop = joined_by + duration;
    let mut members = tokio::task::JoinSet::new();
    for g in 0..groups {
        let client = Client::connect_with(addrs.iter().cloned(), options(args.token.as_deref()))
            .context("creating a client")?;
        let (station, group) = (station.to_owned(), format!("{tag}-g{g}"));
        members.spawn(async move {
            let h = member(client, station, group, stalled && g == 0, stop).await;
            (g, h)
        });
    }
    tokio::time::sleep_until(joined_by.into()).await;
    let client = Client::connect_with(addrs.iter().cloned(), options(args.token.as_deref()))
        .context("creating a client")?;
    producer(
        client,
        station.to_owned(),
        rate(args),
        args.message_size,
        stop,
    )
    .await?;
    let mut healthy = new_histogram()?;
    while let Some(r) = members.join_next().await {
        let (g, h) = r.context("a member task failed")?;
        let h = h?;
        if !(stalled && g == 0) {
            healthy.add(&h).context("merging histograms")?;
        }
    }
    for g in 0..groups {
        let _ = admin.delete_group(station, &format!("{tag}-g{g}")).await;
    }
    let _ = admin.delete_station(station).await;
    let ms = |q: f64| healthy.value_at_quantile(q) as f64 / 1000.0;
    Ok(GroupsPhase {
        stalled,
        deliveries_per_sec: healthy.len() as f64 / duration.as_secs_f64(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: healthy.max() as f64 / 1000.0,
    })
}

/// The produce rate: `--rate`, or 200 msg/s (every group gets each message).
fn rate(args: &BenchArgs) -> u64 {
    if args.rate == 0 { 200 } else { args.rate }
}

/// Runs I1 and returns its report.
pub async fn run(
    args: &BenchArgs,
    addrs: &[String],
    command: String,
) -> anyhow::Result<GroupsReport> {
    let base = args
        .station
        .clone()
        .unwrap_or_else(|| format!("groups-{}", std::process::id()));
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        let mut clean = None;
        let mut stalled = None;
        for step in 0..2 {
            let stall = (round + step) % 2 == 1;
            let p = phase(args, addrs, &base, stall, &format!("r{round}-{step}")).await?;
            eprintln!(
                "round {round}: {}: p99 {:.2} ms, {:.0} deliveries/s",
                if stall {
                    "group 0 stalled"
                } else {
                    "all acking"
                },
                p.p99_ms,
                p.deliveries_per_sec
            );
            if stall {
                stalled = Some(p);
            } else {
                clean = Some(p);
            }
        }
        if let (Some(c), Some(s)) = (clean, stalled) {
            rounds.push((c, s));
        }
    }
    let median_p99_ratio = median(
        rounds
            .iter()
            .map(|(c, s)| s.p99_ms / c.p99_ms.max(1e-9))
            .collect(),
    );
    Ok(GroupsReport {
        command,
        groups: args.groups.max(2),
        rate: rate(args),
        duration_s: args
            .duration
            .unwrap_or(Duration::from_secs(20))
            .as_secs_f64(),
        rounds,
        median_p99_ratio,
        passed: median_p99_ratio <= MAX_P99_RATIO,
    })
}

impl GroupsReport {
    /// The report as text.
    pub fn table(&self) -> String {
        let mut t = format!(
            "groups: {} one-member groups on one station, {} msg/s produced, {:.0} s per phase\n",
            self.groups, self.rate, self.duration_s
        );
        for (i, (c, s)) in self.rounds.iter().enumerate() {
            t.push_str(&format!(
                "  round {i}: all acking p99 {:.2} ms (p50 {:.2}, max {:.1}, {:.0}/s) | group 0 stalled p99 {:.2} ms (p50 {:.2}, max {:.1}, {:.0}/s) | ratio {:.3}\n",
                c.p99_ms,
                c.p50_ms,
                c.max_ms,
                c.deliveries_per_sec,
                s.p99_ms,
                s.p50_ms,
                s.max_ms,
                s.deliveries_per_sec,
                s.p99_ms / c.p99_ms.max(1e-9)
            ));
        }
        t.push_str(&format!(
            "I1: the other groups' p99 with a stalled group over without (median of rounds): {:.3} (target <= {MAX_P99_RATIO})\n{}",
            self.median_p99_ratio,
            if self.passed { "PASS" } else { "FAIL" }
        ));
        t
    }
}
