//! The benchmark report: a table for people, JSON for machines, SVG for a look.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::LoadResult;
use crate::{BenchArgs, Workload};

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Everything a run reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub command: String,
    pub durability: String,
    pub message_size: usize,
    pub partitions: u32,
    pub replication_factor: u32,
    pub producers: usize,
    pub in_flight: usize,
    pub batch_size: usize,
    /// Produce: `sdk` (the client library's `Producer`) or `raw-grpc`.
    pub client: &'static str,
    /// Produce: whether producers were idempotent (producer ids and sequences).
    pub idempotent: bool,
    /// The schema the station was bound to (every message validated by the cluster).
    pub schema: Option<crate::schema::BenchSchema>,
    /// Whether the connections (clients and between nodes) were TLS.
    pub tls: bool,
    /// Whether every call carried a credential the nodes checked (`--auth`, `--token`).
    pub authenticated: bool,
    pub keys: u64,
    pub rate: u64,
    pub messages: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    pub latency_ms: Percentiles,
    /// Produce: latency from each batch's actual hand-off to the stream. With `--rate` it
    /// leaves out how late the sender woke (what `latency_ms` counts, correcting for
    /// coordinated omission); the NATS load generator reports this one.
    pub latency_from_send_ms: Option<Percentiles>,
    /// e2e: acknowledged produce throughput while the readers tailed.
    pub produce_msgs_per_s: Option<f64>,
    /// Server CPU (all spawned nodes) per message, in µs.
    pub server_cpu_us_per_msg: Option<f64>,
    /// Average cores the spawned nodes used together.
    pub server_cores: Option<f64>,
    /// Average cores each spawned node used, in node order.
    pub node_cores: Vec<f64>,
    /// Resident memory of each spawned node at the end, MiB, in node order.
    pub node_rss_mib: Vec<f64>,
    /// Bytes the nodes wrote to storage per payload byte, per replica.
    pub write_amplification: Option<f64>,
    /// The same, from the store's own counters, by cause: RocksDB's WAL, flush and
    /// compaction, then segment files.
    pub write_amplification_rocksdb: Option<[f64; 4]>,
    pub per_second: Vec<u64>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn percentiles(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(p))
        }
    };
    Percentiles {
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: if h.is_empty() { 0.0 } else { ms(h.max()) },
    }
}

impl Report {
    pub fn new(args: &BenchArgs, command: String, r: &LoadResult) -> Self {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let durability = format!(
            "replication factor {}; acknowledged after a majority committed it, each fsyncing its log (the partition's segment file) before acking",
            args.replication_factor
        );
        let produced_bytes = r.payload_bytes as f64;
        Report {
            workload: args.workload,
            command,
            durability,
            message_size: args.message_size,
            partitions: args.partitions,
            replication_factor: args.replication_factor,
            producers: args.producers,
            in_flight: args.in_flight,
            batch_size: args.batch_size,
            client: if args.raw_grpc { "raw-grpc" } else { "sdk" },
            idempotent: !args.at_least_once,
            schema: args.schema,
            tls: args.tls || args.tls_ca.is_some(),
            authenticated: args.token.is_some(),
            keys: args.keys,
            rate: args.rate,
            messages: r.messages,
            errors: r.errors,
            first_error: r.first_error.clone(),
            elapsed_s: secs,
            msgs_per_s: r.messages as f64 / secs,
            mb_per_s: r.payload_bytes as f64 / secs / 1e6,
            latency_ms: percentiles(&r.latency),
            produce_msgs_per_s: r.produce_rate,
            latency_from_send_ms: r
                .latency_from_send
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(percentiles),
            server_cpu_us_per_msg: r
                .usage
                .as_ref()
                .filter(|_| r.messages > 0)
                .map(|u| u.cpu_us as f64 / (r.messages.max(1) as f64)),
            server_cores: r.usage.as_ref().map(|u| u.cpu_us as f64 / 1e6 / secs),
            node_cores: r.usage.as_ref().map_or_else(Vec::new, |u| {
                u.node_cpu_us
                    .iter()
                    .map(|us| *us as f64 / 1e6 / secs)
                    .collect()
            }),
            node_rss_mib: r.usage.as_ref().map_or_else(Vec::new, |u| {
                u.node_rss_bytes
                    .iter()
                    .map(|b| *b as f64 / f64::from(1 << 20))
                    .collect()
            }),
            write_amplification: r
                .usage
                .as_ref()
                .filter(|_| !args.workload.replays() && produced_bytes > 0.0)
                .map(|u| {
                    u.write_bytes as f64
                        / (produced_bytes * f64::from(args.replication_factor.max(1)))
                }),
            write_amplification_rocksdb: r
                .usage
                .as_ref()
                .filter(|_| !args.workload.replays() && produced_bytes > 0.0)
                .map(|u| {
                    let per = produced_bytes * f64::from(args.replication_factor.max(1));
                    u.rocksdb.map(|b| b as f64 / per)
                }),
            per_second: r.per_second.clone(),
        }
    }

    /// Returns the human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let opt = |v: Option<f64>, unit: &str| {
            v.map_or("n/a (not spawned)".to_string(), |v| format!("{v:.2}{unit}"))
        };
        let _ = writeln!(t, "workload        {:?}", self.workload);
        let _ = writeln!(
            t,
            "messages        {} x {} B ({} errors)",
            self.messages, self.message_size, self.errors
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(t, "first error     {e}");
        }
        let _ = writeln!(
            t,
            "throughput      {:.0} msg/s, {:.2} MB/s over {:.2} s",
            self.msgs_per_s, self.mb_per_s, self.elapsed_s
        );
        if let Some(p) = self.produce_msgs_per_s {
            let _ = writeln!(
                t,
                "produce         {p:.0} msg/s acknowledged while the readers tailed"
            );
        }
        let l = &self.latency_ms;
        let _ = writeln!(
            t,
            "latency (ms)    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if let Some(l) = self.latency_from_send_ms.as_ref().filter(|_| self.rate > 0) {
            let _ = writeln!(
                t,
                "  from send     p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} (from each batch's actual hand-off; the line above counts from its intended send time)",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        let _ = writeln!(
            t,
            "server CPU      {} per msg, {} cores",
            opt(self.server_cpu_us_per_msg, " µs"),
            opt(self.server_cores, "")
        );
        if !self.node_cores.is_empty() {
            let per: Vec<String> = self
                .node_cores
                .iter()
                .enumerate()
                .map(|(i, c)| format!("node {} {:.1} %", i + 1, c * 100.0))
                .collect();
            let _ = writeln!(t, "CPU per node    {} of a core", per.join(", "));
        }
        if !self.node_rss_mib.is_empty() {
            let per: Vec<String> = self
                .node_rss_mib
                .iter()
                .enumerate()
                .map(|(i, m)| format!("node {} {m:.1} MiB", i + 1))
                .collect();
            let _ = writeln!(t, "RSS per node    {}", per.join(", "));
        }
        let amplification = if self.workload.replays() {
            "n/a (the workload reads what was produced before it)".to_owned()
        } else {
            format!(
                "{} bytes written per byte produced, per replica",
                opt(self.write_amplification, "")
            )
        };
        let _ = writeln!(t, "write amp.      {amplification}");
        if let Some([wal, flush, compaction, segments]) = self.write_amplification_rocksdb {
            let _ = writeln!(
                t,
                "  by cause      segments {segments:.2} + RocksDB WAL {wal:.2} + flush {flush:.2} + compaction {compaction:.2} (memtables not yet flushed at the end are not counted)"
            );
        }
        let _ = writeln!(
            t,
            "shape           {} partitions, rf {}, {} producers x {} in flight x {} msgs/batch, keys {}, rate {}",
            self.partitions,
            self.replication_factor,
            self.producers,
            self.in_flight,
            self.batch_size,
            self.keys,
            if self.rate == 0 {
                "closed loop".to_string()
            } else {
                format!("{} msg/s", self.rate)
            }
        );
        if self.workload == Workload::Produce || self.workload == Workload::E2e {
            let _ = writeln!(
                t,
                "producer        {}, {}",
                self.client,
                if self.idempotent {
                    "idempotent"
                } else {
                    "at-least-once"
                }
            );
        }
        if let Some(schema) = self.schema {
            let _ = writeln!(
                t,
                "schema          {}: the station validates every message (on-invalid reject)",
                schema.kind()
            );
        }
        let _ = writeln!(
            t,
            "transport       {}, {}",
            if self.tls { "TLS" } else { "plaintext" },
            if self.authenticated {
                "every call authenticated (API key)"
            } else {
                "no credentials"
            }
        );
        let _ = writeln!(t, "durability      {}", self.durability);
        let _ = write!(t, "command         {}", self.command);
        t
    }
}

/// Draws throughput per second and the latency percentile curve.
pub fn svg(report: &Report, r: &LoadResult) -> String {
    let (w, h) = (900.0, 620.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        s,
        r#"<text x="20" y="24" font-size="15">junction bench {:?}: {:.0} msg/s, p99 {:.2} ms</text>"#,
        report.workload, report.msgs_per_s, report.latency_ms.p99
    );
    // Panel 1: throughput per second.
    let (x0, y0, pw, ph) = (60.0, 50.0, 800.0, 220.0);
    let max = report.per_second.iter().copied().max().unwrap_or(1).max(1) as f64;
    let n = report.per_second.len().max(2) as f64;
    let pts: Vec<String> = report
        .per_second
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                x0 + pw * i as f64 / (n - 1.0),
                y0 + ph - ph * (*v as f64) / max
            )
        })
        .collect();
    let _ = write!(
        s,
        r#"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="gray"/>"#
    );
    let _ = write!(
        s,
        r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{}"/>"#,
        pts.join(" ")
    );
    let _ = write!(
        s,
        r#"<text x="{x0}" y="{}">msgs per second (max {max:.0}) over {} s</text>"#,
        y0 + ph + 16.0,
        report.per_second.len()
    );
    // Panel 2: latency by percentile, x = log scale of 1/(1-p).
    let (x0, y0, pw, ph) = (60.0, 330.0, 800.0, 240.0);
    let _ = write!(
        s,
        r#"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="gray"/>"#
    );
    let hist = &r.latency;
    if !hist.is_empty() {
        let maxv = ms(hist.max()).max(0.001);
        let mut pts = Vec::new();
        let decades = 5.0; // up to p99.999
        for i in 0..=200 {
            let x = f64::from(i) / 200.0 * decades;
            let p = 1.0 - 10f64.powf(-x);
            let v = ms(hist.value_at_quantile(p.min(0.999_999)));
            pts.push(format!(
                "{:.1},{:.1}",
                x0 + pw * x / decades,
                y0 + ph - ph * v / maxv
            ));
        }
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="crimson" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for (i, label) in ["p0", "p90", "p99", "p99.9", "p99.99", "p99.999"]
            .iter()
            .enumerate()
        {
            let x = x0 + pw * i as f64 / decades;
            let _ = write!(
                s,
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                y0 + ph + 16.0
            );
        }
        let _ = write!(
            s,
            r#"<text x="{x0}" y="{}">latency (ms, max {maxv:.2}) by percentile</text>"#,
            y0 - 6.0
        );
    }
    s.push_str("</svg>\n");
    s
}
