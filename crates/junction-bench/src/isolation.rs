//! `junction bench isolation` (I4): does a tenant over its quota slow down another tenant?
//!
//! Tenant `quiet` produces at `--rate` (open loop, through the SDK, the way an application
//! does) within a quota twice that rate. Tenant `noisy` has a quota of `--noisy-quota`
//! messages/s and offers ten times that through the raw `ProduceStream` RPC without backing
//! off (a client that ignores the `RetryInfo` it gets: the worst neighbour). Each round runs
//! three phases of `--duration`: `quiet` alone, `quiet` with `noisy` offering exactly its
//! quota, and `quiet` with `noisy` offering ten times it (the order rotates between rounds,
//! so drift in the machine does not favour any). The report gives, per round and as medians
//! of the per-round ratios, `quiet`'s throughput and p99 with the over-quota neighbour over
//! alone (the I4 target) and over the within-quota neighbour (the cost of the excess alone:
//! what the neighbour is allowed to send is real work on the same disks and cores), and what
//! `noisy` got through.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use junction_client::proto::QuotaLimits;
use serde::Serialize;

use crate::load::{Counters, admin, ensure_tenant, produce, tenant_key};
use crate::{BenchArgs, median};

/// The I4 targets: the quiet tenant keeps this share of its throughput...
pub const MIN_THROUGHPUT_RATIO: f64 = 0.90;
/// ...and its p99 grows by at most this factor.
pub const MAX_P99_RATIO: f64 = 1.10;

/// One phase's measurement of one tenant.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Acknowledged messages per second.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// One round: the quiet tenant alone, beside the noisy one at its quota, and beside it at
/// ten times its quota.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub alone: Phase,
    pub at_quota: Phase,
    pub contended: Phase,
    /// The noisy tenant's acknowledged messages per second, and its refused batches.
    pub noisy_admitted: f64,
    pub noisy_refused_messages: u64,
    pub throughput_ratio: f64,
    pub p99_ratio: f64,
    /// With the noisy tenant over its quota, against it at its quota.
    pub excess_throughput_ratio: f64,
    pub excess_p99_ratio: f64,
}

/// The whole I4 report.
#[derive(Debug, Clone, Serialize)]
pub struct IsolationReport {
    pub command: String,
    pub quiet_rate: u64,
    pub quiet_quota: u64,
    pub noisy_quota: u64,
    pub noisy_offered: u64,
    pub duration_s: f64,
    /// TLS on every connection; each tenant calling with its own producer key.
    pub tls: bool,
    pub authenticated: bool,
    pub rounds: Vec<Round>,
    pub median_throughput_ratio: f64,
    pub median_p99_ratio: f64,
    pub median_excess_throughput_ratio: f64,
    pub median_excess_p99_ratio: f64,
    pub median_noisy_admitted: f64,
    /// The quiet tenant's p99 over every round's phase of each kind.
    pub pooled_p99: PooledP99,
    /// Throughput (median of the rounds' ratios) met its target, and p99 did by both the
    /// median of the rounds' ratios and the ratio over all rounds.
    pub passed: bool,
}

/// The quiet tenant's p99 over all rounds, per phase kind.
#[derive(Debug, Clone, Serialize)]
pub struct PooledP99 {
    pub alone_ms: f64,
    pub at_quota_ms: f64,
    pub contended_ms: f64,
}

impl PooledP99 {
    /// Beside the neighbour at ten times its quota, over alone: the I4 p99 figure.
    pub fn ratio(&self) -> f64 {
        self.contended_ms / self.alone_ms.max(1e-9)
    }
}

pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Runs one tenant's load for `args.duration` and measures it; also returns its latencies.
pub(crate) async fn phase(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
) -> anyhow::Result<(Phase, Histogram<u64>)> {
    let counters = Counters::new();
    let started = Instant::now();
    let h = produce(args, addrs, station, &counters, None).await?;
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let phase = Phase {
        throughput: counters.done.load(Ordering::Relaxed) as f64 / elapsed,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        errors: counters.errors.load(Ordering::Relaxed),
    };
    Ok((phase, h))
}

/// The latencies of every round's phases of one kind, merged: the p99 over all of them.
///
/// A phase's p99 is decided by its worst 1 %: at 5,000 msg/s over 20 s, 0.2 s of the
/// phase. One stall of the shared machine (a memtable flush, the load generator descheduled)
/// that lands in a phase decides its p99, so the ratio of two phases' p99s mostly says which
/// of them a stall hit. Merged over the rounds, each phase kind has run as long as the
/// others, in rotating order, and a stall counts with its weight in the whole population.
/// The reports give both statistics and call a target met only when both are.
pub(crate) struct Pooled(Histogram<u64>);

impl Pooled {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self(crate::load::new_histogram()?))
    }

    pub(crate) fn add(&mut self, h: &Histogram<u64>) -> anyhow::Result<()> {
        self.0.add(h).context("merging latency histograms")
    }

    pub(crate) fn p99_ms(&self) -> f64 {
        ms(self.0.value_at_quantile(0.99))
    }
}

/// Creates a tenant and a station of it (both may exist already) and sets its quota. On a
/// cluster with authentication (`args.token`, a cluster-admin credential), returns a new
/// producer key of the tenant, which its load calls with.
async fn tenant(
    args: &BenchArgs,
    addrs: &[String],
    tenant: &str,
    station: &str,
    messages_per_sec: u64,
) -> anyhow::Result<Option<String>> {
    let client = admin(addrs, args.token.as_deref())?;
    ensure_tenant(&client, tenant).await?;
    match client
        .create_station(station, args.partitions, args.replication_factor)
        .await
    {
        Ok(_) => {}
        Err(e) if e.is_already_exists() => {}
        Err(e) => return Err(e).with_context(|| format!("creating station {station}")),
    }
    client
        .set_quota(
            tenant,
            None,
            QuotaLimits {
                produce_messages_per_sec: Some(messages_per_sec),
                ..Default::default()
            },
            vec![],
        )
        .await
        .with_context(|| format!("setting the quota of {tenant}"))?;
    match &args.token {
        Some(_) => Ok(Some(tenant_key(&client, tenant, "producer").await?)),
        None => Ok(None),
    }
}

/// Runs I4 and returns its report.
pub async fn run(
    args: &BenchArgs,
    addrs: &[String],
    command: String,
) -> anyhow::Result<IsolationReport> {
    let duration = args.duration.unwrap_or(Duration::from_secs(20));
    let quiet_rate = if args.rate == 0 { 5_000 } else { args.rate };
    let quiet_quota = quiet_rate * 2;
    let noisy_quota = args.noisy_quota;
    let noisy_offered = noisy_quota * 10;
    let tag = format!("i4-{}", std::process::id());
    let quiet_station = format!("quiet/{tag}");
    let noisy_station = format!("noisy/{tag}");
    let quiet_token = tenant(args, addrs, "quiet", &quiet_station, quiet_quota).await?;
    let noisy_token = tenant(args, addrs, "noisy", &noisy_station, noisy_quota).await?;
    let quiet = BenchArgs {
        token: quiet_token,
        duration: Some(duration),
        rate: quiet_rate,
        quiet: true,
        ..args.clone()
    };
    let noisy = BenchArgs {
        token: noisy_token,
        duration: Some(duration),
        rate: noisy_offered,
        raw_grpc: true,
        at_least_once: true,
        quiet: true,
        ..args.clone()
    };
    let polite = BenchArgs {
        rate: noisy_quota,
        ..noisy.clone()
    };
    let rounds_n = args.rounds.max(1);
    let mut rounds = Vec::with_capacity(rounds_n);
    let (mut pooled_alone, mut pooled_at_quota, mut pooled_contended) =
        (Pooled::new()?, Pooled::new()?, Pooled::new()?);
    for round in 0..rounds_n {
        let mut alone = None;
        let mut at_quota = None;
        let mut over = None;
        for step in 0..3 {
            match (round + step) % 3 {
                0 => {
                    let (q, h) = phase(&quiet, addrs, &quiet_station).await?;
                    pooled_alone.add(&h)?;
                    alone = Some(q);
                }
                1 => {
                    let (q, _) = tokio::join!(
                        phase(&quiet, addrs, &quiet_station),
                        phase(&polite, addrs, &noisy_station)
                    );
                    let (q, h) = q?;
                    pooled_at_quota.add(&h)?;
                    at_quota = Some(q);
                }
                _ => {
                    let (q, n) = tokio::join!(
                        phase(&quiet, addrs, &quiet_station),
                        phase(&noisy, addrs, &noisy_station)
                    );
                    let (q, h) = q?;
                    pooled_contended.add(&h)?;
                    over = Some((q, n?.0));
                }
            }
        }
        let (Some(alone), Some(at_quota), Some((contended, n))) = (alone, at_quota, over) else {
            anyhow::bail!("round {round} did not run every phase");
        };
        let throughput_ratio = contended.throughput / alone.throughput.max(1e-9);
        let p99_ratio = contended.p99_ms / alone.p99_ms.max(1e-9);
        let excess_throughput_ratio = contended.throughput / at_quota.throughput.max(1e-9);
        let excess_p99_ratio = contended.p99_ms / at_quota.p99_ms.max(1e-9);
        eprintln!(
            "round {}: quiet alone {:.0} msg/s p99 {:.2} ms; beside noisy at its quota p99 {:.2} ms; beside noisy at 10x {:.0} msg/s p99 {:.2} ms (×{throughput_ratio:.3}, p99 ×{p99_ratio:.3}; against at-quota p99 ×{excess_p99_ratio:.3}); noisy got {:.0} msg/s of its {noisy_quota}, {} messages refused",
            round + 1,
            alone.throughput,
            alone.p99_ms,
            at_quota.p99_ms,
            contended.throughput,
            contended.p99_ms,
            n.throughput,
            n.errors,
        );
        rounds.push(Round {
            alone,
            at_quota,
            contended,
            noisy_admitted: n.throughput,
            noisy_refused_messages: n.errors,
            throughput_ratio,
            p99_ratio,
            excess_throughput_ratio,
            excess_p99_ratio,
        });
    }
    let median_throughput_ratio = median(rounds.iter().map(|r| r.throughput_ratio).collect());
    let median_p99_ratio = median(rounds.iter().map(|r| r.p99_ratio).collect());
    let median_noisy_admitted = median(rounds.iter().map(|r| r.noisy_admitted).collect());
    let median_excess_throughput_ratio =
        median(rounds.iter().map(|r| r.excess_throughput_ratio).collect());
    let median_excess_p99_ratio = median(rounds.iter().map(|r| r.excess_p99_ratio).collect());
    let pooled = PooledP99 {
        alone_ms: pooled_alone.p99_ms(),
        at_quota_ms: pooled_at_quota.p99_ms(),
        contended_ms: pooled_contended.p99_ms(),
    };
    Ok(IsolationReport {
        command,
        quiet_rate,
        quiet_quota,
        noisy_quota,
        noisy_offered,
        duration_s: duration.as_secs_f64(),
        tls: args.tls || args.tls_ca.is_some(),
        authenticated: quiet.token.is_some(),
        passed: median_throughput_ratio >= MIN_THROUGHPUT_RATIO
            && median_p99_ratio <= MAX_P99_RATIO
            && pooled.ratio() <= MAX_P99_RATIO,
        pooled_p99: pooled,
        rounds,
        median_throughput_ratio,
        median_p99_ratio,
        median_excess_throughput_ratio,
        median_excess_p99_ratio,
        median_noisy_admitted,
    })
}

impl IsolationReport {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut t = format!(
            "I4 tenant isolation: quiet at {} msg/s (quota {}), noisy offering {} msg/s against a quota of {}; {} round(s) of {:.0} s per phase; {}, {}\n",
            self.quiet_rate,
            self.quiet_quota,
            self.noisy_offered,
            self.noisy_quota,
            self.rounds.len(),
            self.duration_s,
            if self.tls { "TLS" } else { "plaintext" },
            if self.authenticated {
                "each tenant with its own API key"
            } else {
                "no credentials"
            }
        );
        t.push_str(&format!(
            "{:>5} {:>11} {:>8} {:>8} {:>11} {:>8} {:>7} {:>7} {:>9} {:>9}\n",
            "round",
            "alone/s",
            "p99 ms",
            "@q p99",
            "10x msg/s",
            "p99 ms",
            "thr ×",
            "p99 ×",
            "p99 ×@q",
            "noisy/s"
        ));
        for (i, r) in self.rounds.iter().enumerate() {
            t.push_str(&format!(
                "{:>5} {:>11.0} {:>8.2} {:>8.2} {:>11.0} {:>8.2} {:>7.3} {:>7.3} {:>9.3} {:>9.0}\n",
                i + 1,
                r.alone.throughput,
                r.alone.p99_ms,
                r.at_quota.p99_ms,
                r.contended.throughput,
                r.contended.p99_ms,
                r.throughput_ratio,
                r.p99_ratio,
                r.excess_p99_ratio,
                r.noisy_admitted
            ));
        }
        t.push_str(&format!(
            "median of the rounds: throughput ×{:.3} (target ≥ {MIN_THROUGHPUT_RATIO}), p99 ×{:.3} (target ≤ {MAX_P99_RATIO}: {}); against the neighbour at its quota: throughput ×{:.3}, p99 ×{:.3}; noisy admitted {:.0} msg/s of its {} quota\n",
            self.median_throughput_ratio,
            self.median_p99_ratio,
            if self.median_p99_ratio <= MAX_P99_RATIO {
                "within"
            } else {
                "above"
            },
            self.median_excess_throughput_ratio,
            self.median_excess_p99_ratio,
            self.median_noisy_admitted,
            self.noisy_quota,
        ));
        t.push_str(&format!(
            "over all rounds: quiet's p99 alone {:.2} ms, beside the neighbour at its quota {:.2} ms, at 10x {:.2} ms: p99 ×{:.3} (target ≤ {MAX_P99_RATIO}); I4 (both p99 statistics within target): {}\n",
            self.pooled_p99.alone_ms,
            self.pooled_p99.at_quota_ms,
            self.pooled_p99.contended_ms,
            self.pooled_p99.ratio(),
            if self.passed { "met" } else { "NOT met" }
        ));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
