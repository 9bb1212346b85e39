//! The flags of `junction chaos`.

use std::path::PathBuf;
use std::time::Duration;

use crate::schedule::FaultKind;

/// Run a seeded chaos test against a real local cluster and check the history.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ChaosArgs {
    /// Cluster size: 3 or 5 nodes.
    #[arg(long, default_value_t = 3, value_parser = parse_nodes)]
    pub nodes: u64,
    /// How long faults are injected: `90s`, `2m`, `30m`, `1h30m` (a bare number is seconds).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the fault schedule and the workload (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Producer tasks; each serves the keys of its own partitions.
    #[arg(long, default_value_t = 8)]
    pub producers: u32,
    /// Produces each producer keeps in flight, each for a different key (a key never has two).
    #[arg(long, default_value_t = 4)]
    pub inflight: u32,
    /// Client-side deadline of one produce RPC; a produce without a reply by then is recorded
    /// as indeterminate and retried at another node.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,
    /// Distinct keys (`tenant-000`, `tenant-001`, ...).
    #[arg(long, default_value_t = 200)]
    pub keys: u32,
    /// Partitions of the station under test.
    #[arg(long, default_value_t = 6)]
    pub partitions: u32,
    /// Replication factor of the station under test.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// Mean quiet time between one fault's heal and the next fault (`4`, `4s`, `500ms`).
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub fault_interval: Duration,
    /// Only these fault kinds, comma-separated (default: all): kill-node,
    /// kill-partition-leader, kill-meta-leader, pause, isolate, split, one-way, bridge,
    /// latency, loss, rolling-restart, cluster-restart, disk-fill, bit-flip, replace-node.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Output directory (default `./chaos-out/<seed>`): history.json, results.json,
    /// timeline.svg and the nodes' logs.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `junction` binary to run nodes with (default: this executable).
    #[arg(long)]
    pub junction_bin: Option<PathBuf>,
    /// Keep the nodes' data dirs and logs (the path is printed).
    #[arg(long)]
    pub keep_data: bool,
    /// Do not try to mount a tmpfs per node; disk-fill faults are then skipped.
    #[arg(long)]
    pub no_disk_faults: bool,
    /// Raft entries between snapshots on the nodes (small, so catch-up by snapshot happens).
    #[arg(long, default_value_t = 1000)]
    pub snapshot_every: u64,
    /// Raft entries kept below a snapshot on the nodes.
    #[arg(long, default_value_t = 200)]
    pub keep_logs: u64,
    /// Produce one RPC per attempt without producer ids (at-least-once: a retry of an
    /// indeterminate attempt may store a message twice, and the checker allows that). By
    /// default producers are the client library's idempotent producers, every retry resends
    /// the same payload, and any duplicate is a violation.
    #[arg(long)]
    pub at_least_once: bool,
    /// Run the cluster on TLS (a throwaway CA: TLS on the client ports, mutual TLS between
    /// nodes) and every client over TLS.
    #[arg(long)]
    pub tls: bool,
    /// Run the cluster with client authentication (`--auth keys`): the run makes an API key
    /// for the tenant under test (role `admin`, made with the bootstrap admin token) and every
    /// client of the workload, the consumer group, the pipeline and the replica reads calls
    /// with it.
    #[arg(long)]
    pub auth: bool,
}

impl Default for ChaosArgs {
    fn default() -> Self {
        Self {
            nodes: 3,
            duration: Duration::from_secs(120),
            seed: None,
            producers: 8,
            inflight: 4,
            rpc_timeout: Duration::from_secs(2),
            keys: 200,
            partitions: 6,
            replication_factor: 3,
            fault_interval: Duration::from_secs(4),
            at_least_once: false,
            tls: false,
            auth: false,
            faults: Vec::new(),
            out: None,
            junction_bin: None,
            keep_data: false,
            no_disk_faults: false,
            snapshot_every: 1000,
            keep_logs: 200,
        }
    }
}

fn parse_nodes(s: &str) -> Result<u64, String> {
    match s.trim() {
        "3" => Ok(3),
        "5" => Ok(5),
        other => Err(format!("{other}: the chaos cluster has 3 or 5 nodes")),
    }
}

/// Parses a humane duration: `90s`, `2m`, `30m`, `1h30m`, `500ms`, `1.5m`; a bare number is
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(secs) = text.parse::<f64>() {
        return secs_to_duration(secs, s);
    }
    let mut total = 0.0_f64;
    let mut rest = text;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a number before {unit:?}"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hrs" => 3600.0,
            "" => return Err(format!("{s:?}: a unit (ms, s, m, h) is needed after {num}")),
            other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)")),
        };
        total += value * scale;
        rest = next;
    }
    secs_to_duration(total, s)
}

fn secs_to_duration(secs: f64, original: &str) -> Result<Duration, String> {
    if (0.0..1e9).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("{original:?}: not a usable duration"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ChaosArgs,
    }

    #[test]
    fn humane_durations() {
        let d = |s: &str| parse_duration(s).unwrap();
        assert_eq!(d("90s"), Duration::from_secs(90));
        assert_eq!(d("2m"), Duration::from_secs(120));
        assert_eq!(d("30m"), Duration::from_secs(1800));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("1.5m"), Duration::from_secs(90));
        assert_eq!(d("4"), Duration::from_secs(4));
        assert_eq!(d(" 120s "), Duration::from_secs(120));
        for bad in ["", "s", "10x", "1m30", "-5", "abc", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_flags() {
        let w = Wrapper::parse_from(["chaos"]);
        assert_eq!(w.args, ChaosArgs::default());
    }

    #[test]
    fn flags_parse() {
        let w = Wrapper::parse_from([
            "chaos",
            "--nodes",
            "5",
            "--duration",
            "30m",
            "--seed",
            "7",
            "--fault-interval",
            "2",
            "--out",
            "/tmp/x",
            "--keep-data",
            "--faults",
            "latency,kill-node",
        ]);
        assert_eq!(w.args.faults, vec![FaultKind::Latency, FaultKind::KillNode]);
        assert_eq!(w.args.nodes, 5);
        assert_eq!(w.args.duration, Duration::from_secs(1800));
        assert_eq!(w.args.seed, Some(7));
        assert_eq!(w.args.fault_interval, Duration::from_secs(2));
        assert_eq!(w.args.out, Some(PathBuf::from("/tmp/x")));
        assert!(w.args.keep_data);
        assert!(Wrapper::try_parse_from(["chaos", "--nodes", "4"]).is_err());
    }
}
