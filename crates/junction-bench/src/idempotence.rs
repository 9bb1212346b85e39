//! `junction bench idempotence`: what the idempotent producer costs against at-least-once.
//!
//! One station, one cluster, one process: each round runs a phase of `--duration` with the
//! SDK's `Producer` idempotent (its default: a producer id, a sequence per partition, the
//! check in every replica's apply) and one with `at_least_once`, in alternating order, at the
//! same `--rate`, batch size and shape. Comparing phases of one run, interleaved, keeps the
//! machine's drift (page cache, compactions, other load) out of the ratio, which separate
//! invocations do not. The report gives per-round figures, the medians of the per-round
//! ratios, and the p99 over all rounds of each mode. The two statistics answer differently to
//! the shared machine's stalls: one stall decides the p99 of the phase it hits, which moves
//! that round's ratio but not the median of ten; merged over the rounds, a stall counts with
//! its weight in the whole population. The target is met only when both are. Targets (issue
//! 13): idempotent throughput ≥ 0.95 and p99 ≤ 1.05 of at-least-once.

use std::time::Duration;

use serde::Serialize;

use crate::isolation::{Phase, Pooled, phase};
use crate::load::{prepare, wait_for_leaders};
use crate::{BenchArgs, median};

/// Idempotent throughput over at-least-once: at least this.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.95;
/// Idempotent p99 over at-least-once: at most this.
pub const MAX_P99_RATIO: f64 = 1.05;

/// One round: both modes, one phase each.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub idempotent_first: bool,
    pub idempotent: Phase,
    pub at_least_once: Phase,
    pub throughput_ratio: f64,
    pub p99_ratio: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct IdempotenceReport {
    pub command: String,
    pub station: String,
    pub rate: u64,
    pub batch_size: usize,
    pub message_size: usize,
    pub duration_s: f64,
    pub rounds: Vec<Round>,
    pub median_throughput_ratio: f64,
    pub median_p99_ratio: f64,
    /// p99 over every round's phase of each mode.
    pub pooled_idempotent_p99_ms: f64,
    pub pooled_at_least_once_p99_ms: f64,
    pub pooled_p99_ratio: f64,
    /// The median throughput ratio met its target, and the p99 ratio did by both statistics
    /// (the median of the rounds' ratios and the ratio over all rounds).
    pub passed: bool,
}

/// Runs the comparison and returns its report.
pub async fn run(
    args: &BenchArgs,
    addrs: &[String],
    command: String,
) -> anyhow::Result<IdempotenceReport> {
    let duration = args.duration.unwrap_or(Duration::from_secs(20));
    let station = args
        .station
        .clone()
        .unwrap_or_else(crate::load::default_station);
    prepare(args, addrs, &station).await?;
    wait_for_leaders(args, addrs, &station, Duration::from_secs(120)).await?;
    let mode = |at_least_once: bool, duration: Duration| BenchArgs {
        at_least_once,
        duration: Some(duration),
        quiet: true,
        ..args.clone()
    };
    // Unmeasured: the first phase would otherwise also pay for cold caches and connections.
    let warm = duration.min(Duration::from_secs(5));
    phase(&mode(false, warm), addrs, &station).await?;
    phase(&mode(true, warm), addrs, &station).await?;

    let idem = mode(false, duration);
    let alo = mode(true, duration);
    let (mut pooled_idem, mut pooled_alo) = (Pooled::new()?, Pooled::new()?);
    let mut rounds = Vec::with_capacity(args.rounds.max(1));
    for round in 0..args.rounds.max(1) {
        let idempotent_first = round % 2 == 0;
        let (i, a) = if idempotent_first {
            let i = phase(&idem, addrs, &station).await?;
            (i, phase(&alo, addrs, &station).await?)
        } else {
            let a = phase(&alo, addrs, &station).await?;
            (phase(&idem, addrs, &station).await?, a)
        };
        pooled_idem.add(&i.1)?;
        pooled_alo.add(&a.1)?;
        let (idempotent, at_least_once) = (i.0, a.0);
        let throughput_ratio = idempotent.throughput / at_least_once.throughput.max(1e-9);
        let p99_ratio = idempotent.p99_ms / at_least_once.p99_ms.max(1e-9);
        eprintln!(
            "round {}: idempotent {:.0} msg/s p99 {:.2} ms, at-least-once {:.0} msg/s p99 {:.2} ms (×{throughput_ratio:.3}, p99 ×{p99_ratio:.3})",
            round + 1,
            idempotent.throughput,
            idempotent.p99_ms,
            at_least_once.throughput,
            at_least_once.p99_ms
        );
        rounds.push(Round {
            idempotent_first,
            idempotent,
            at_least_once,
            throughput_ratio,
            p99_ratio,
        });
    }
    let median_throughput_ratio = median(rounds.iter().map(|r| r.throughput_ratio).collect());
    let median_p99_ratio = median(rounds.iter().map(|r| r.p99_ratio).collect());
    let pooled_idempotent_p99_ms = pooled_idem.p99_ms();
    let pooled_at_least_once_p99_ms = pooled_alo.p99_ms();
    let pooled_p99_ratio = pooled_idempotent_p99_ms / pooled_at_least_once_p99_ms.max(1e-9);
    Ok(IdempotenceReport {
        command,
        station,
        rate: args.rate,
        batch_size: args.batch_size,
        message_size: args.message_size,
        duration_s: duration.as_secs_f64(),
        passed: median_throughput_ratio >= MIN_THROUGHPUT_RATIO
            && median_p99_ratio <= MAX_P99_RATIO
            && pooled_p99_ratio <= MAX_P99_RATIO,
        rounds,
        median_throughput_ratio,
        median_p99_ratio,
        pooled_idempotent_p99_ms,
        pooled_at_least_once_p99_ms,
        pooled_p99_ratio,
    })
}

impl IdempotenceReport {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let rate = if self.rate == 0 {
            "closed loop".to_owned()
        } else {
            format!("{} msg/s", self.rate)
        };
        let mut t = format!(
            "idempotent vs at-least-once (SDK Producer): {rate}, batches of {}, {} B; {} round(s) of {:.0} s per mode\n",
            self.batch_size,
            self.message_size,
            self.rounds.len(),
            self.duration_s
        );
        t.push_str(&format!(
            "{:>5} {:>6} {:>11} {:>8} {:>8} {:>11} {:>8} {:>8} {:>7} {:>7}\n",
            "round",
            "first",
            "idem msg/s",
            "p50 ms",
            "p99 ms",
            "alo msg/s",
            "p50 ms",
            "p99 ms",
            "thr ×",
            "p99 ×"
        ));
        for (n, r) in self.rounds.iter().enumerate() {
            t.push_str(&format!(
                "{:>5} {:>6} {:>11.0} {:>8.2} {:>8.2} {:>11.0} {:>8.2} {:>8.2} {:>7.3} {:>7.3}\n",
                n + 1,
                if r.idempotent_first { "idem" } else { "alo" },
                r.idempotent.throughput,
                r.idempotent.p50_ms,
                r.idempotent.p99_ms,
                r.at_least_once.throughput,
                r.at_least_once.p50_ms,
                r.at_least_once.p99_ms,
                r.throughput_ratio,
                r.p99_ratio
            ));
        }
        t.push_str(&format!(
            "median of the rounds: throughput ×{:.3} (target ≥ {MIN_THROUGHPUT_RATIO}), p99 ×{:.3} (target ≤ {MAX_P99_RATIO})\n",
            self.median_throughput_ratio, self.median_p99_ratio
        ));
        t.push_str(&format!(
            "over all rounds: p99 idempotent {:.2} ms, at-least-once {:.2} ms: ×{:.3} (target ≤ {MAX_P99_RATIO}); both statistics within target: {}\n",
            self.pooled_idempotent_p99_ms,
            self.pooled_at_least_once_p99_ms,
            self.pooled_p99_ratio,
            if self.passed { "yes, met" } else { "no, NOT met" }
        ));
        t
    }
}
