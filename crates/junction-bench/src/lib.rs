//! `junction bench`: load a Junction cluster and report throughput, latency percentiles
//! (HdrHistogram), server CPU per message and write amplification.
//!
//! - [`spawn`]: `--spawn N` real `junction serve` processes, with /proc counters.
//! - [`load`]: the produce (closed loop or fixed rate, coordinated-omission corrected), read
//!   and end-to-end workloads. Producers are the SDK's `Producer` (what applications use), or
//!   with `--raw-grpc` the bare `ProduceStream` RPC; readers use the raw `Read`/`Tail` RPCs.
//! - [`report`]: the table, `--json` and `--plot` SVG.

pub mod groups;
pub mod idempotence;
pub mod isolation;
pub mod lanes;
pub mod load;
pub mod report;
pub mod rest;
pub mod schema;
pub mod spawn;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

/// Which workload to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Produce messages and measure produce → ack.
    Produce,
    /// Replay `--messages` messages from earliest (produced first if the station is new).
    Read,
    /// A consumer group of one member (the SDK's `GroupConsumer`) consumes `--messages`
    /// stored messages from earliest and acks each one on its own (produced first if the
    /// station has fewer): the like-for-like counterpart of a pull consumer with acks.
    Consume,
    /// Produce and tail at once, measuring produce → delivery.
    E2e,
    /// Create the station, wait until every partition has a leader, then only measure the
    /// nodes' CPU and memory for `--duration` (default 30 s): the cost of idle partitions.
    /// More than 1,024 partitions go into stations of 1,000.
    Idle,
    /// I4: tenant `quiet` produces at `--rate` within its quota while tenant `noisy` offers
    /// 10× its `--noisy-quota` without backing off; `quiet`'s throughput and p99 are
    /// compared with a run without `noisy`, over `--rounds` rounds of `--duration` per phase.
    Isolation,
    /// I2/I3: a key-shared group of each of `--members` counts consumes one partition of
    /// `--keys` keys, each member handling one message at a time for `--work`; with
    /// `--poison`, once more with one key failing every delivery.
    Lanes,
    /// I1: `--groups` one-member groups consume a station produced at `--rate` (default 200
    /// msg/s); the others' p99 delivery latency with group 0 not acking against all acking.
    Groups,
    /// Issue 13: the SDK `Producer` idempotent against at-least-once at the same shape, one
    /// phase of `--duration` each per round, over `--rounds` rounds in alternating order.
    Idempotence,
    /// REST produce against gRPC unary produce: `--producers` callers, one batch of
    /// `--batch-size` in flight each, over `--rounds` rounds of `--duration` per API.
    Rest,
}

impl Workload {
    /// Whether the workload reads stored messages (written first when the station has fewer
    /// than `--messages`), so bytes written are not what it measures.
    pub fn replays(self) -> bool {
        matches!(self, Workload::Read | Workload::Consume)
    }
}

/// Flags of `junction bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// produce | read | consume | e2e | idle | isolation | lanes | groups | idempotence | rest
    #[arg(value_enum)]
    pub workload: Workload,
    /// Cluster to load (comma-separated host:port). Without it, --spawn nodes are started.
    #[arg(long, env = "JUNCTION_SERVER")]
    pub server: Option<String>,
    /// Start this many `junction serve` processes on loopback and stop them afterwards.
    #[arg(long, default_value_t = 3)]
    pub spawn: u64,
    /// Where spawned nodes keep their data (a temp dir inside; default: the system temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Station to use (created if missing). Default: a fresh `bench-<pid>-<time>`.
    #[arg(long)]
    pub station: Option<String>,
    /// Partitions of the station the bench creates (an existing station keeps its own).
    #[arg(long, default_value_t = 3)]
    pub partitions: u32,
    /// Replication factor of the station the bench creates.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    pub message_size: usize,
    /// Messages to produce (or to replay, for `read`).
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Run for this long instead of a message count (e.g. 30s, 2m).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Concurrent producers (SDK: each its own `Client` and `Producer`; raw: each its own
    /// streams).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Batches in flight per producer. The SDK producer keeps at most `in-flight` ×
    /// `batch-size` messages unacknowledged, and at most `in-flight` batches per partition.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Messages per produce batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Bind the station to a schema (registered by the bench, `on-invalid reject`), so the
    /// cluster validates every message; payloads are valid records of the schema.
    #[arg(long, value_enum)]
    pub schema: Option<schema::BenchSchema>,
    /// Distinct keys (0: unkeyed, sticky round-robin per batch).
    #[arg(long, default_value_t = 0)]
    pub keys: u64,
    /// Fixed total rate in messages/s (open loop; latency counted from each message's
    /// intended send time, so stalls are not hidden). 0: closed loop.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Send every batch to one node and let it pick the partition and forward, instead of
    /// sending each batch to its partition's leader (measures the cost of forwarding).
    #[arg(long)]
    pub via_any_node: bool,
    /// Speak the raw `ProduceStream` RPC (one stream per partition leader, `--in-flight`
    /// batches per producer) instead of the client library's `Producer`. The default measures
    /// what an application gets from the SDK: its batching, routing and retries.
    #[arg(long)]
    pub raw_grpc: bool,
    /// Produce without producer ids (at-least-once). By default producers are idempotent,
    /// as the SDK's `Producer` is: each takes a producer id and numbers its messages per
    /// partition, and every partition checks the sequence when it applies a batch.
    #[arg(long)]
    pub at_least_once: bool,
    /// With --spawn: run the nodes on TLS (a throwaway CA; mutual TLS between nodes) and
    /// connect over TLS.
    #[arg(long)]
    pub tls: bool,
    /// With --server: speak TLS and trust this CA (PEM).
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// With --spawn: the nodes authenticate every client call (`--auth keys`). The bench
    /// uses the bootstrap admin token only to make API keys; the load calls with an API key
    /// of the station's tenant (role admin; `isolation`: each tenant its own producer key).
    #[arg(long)]
    pub auth: bool,
    /// With --server: the credential of every call (an API key or the admin token; for
    /// `isolation` a cluster-admin one, which makes each tenant's producer key).
    #[arg(long, env = "JUNCTION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How long the SDK producer waits for more messages to fill a batch (its `linger`).
    #[arg(long, value_parser = parse_duration, default_value = "2ms")]
    pub linger: Duration,
    /// Concurrent tail readers for `e2e` (spread over partitions).
    #[arg(long, default_value_t = 0)]
    pub readers: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput over time and the latency distribution as SVG to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Do not draw the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// `isolation`: the noisy tenant's quota in messages/s (it offers ten times this).
    #[arg(long, default_value_t = 1_000)]
    pub noisy_quota: u64,
    /// `isolation`: rounds to run (each: the quiet tenant alone, and with the noisy one).
    /// `lanes`: rounds of every member count. `idempotence`: rounds of both modes.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// `lanes`: the member counts to compare (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub members: Vec<usize>,
    /// `lanes`: how long a member works on each message (slept, like a handler's I/O).
    #[arg(long, value_parser = parse_duration, default_value = "5ms")]
    pub work: Duration,
    /// `lanes`: each member's limit of unacknowledged messages per partition (0: the
    /// group's `max_in_flight`, 1000). A member that joins first takes up to this many keys
    /// before the others arrive, and a key moves only once it is drained. `consume`: the
    /// group's `max_in_flight` and the member's limit (0: the server's default, 1,000).
    #[arg(long, default_value_t = 0)]
    pub member_in_flight: u32,
    /// `groups`: how many consumer groups read the station.
    #[arg(long, default_value_t = 50)]
    pub groups: usize,
    /// `lanes`: also run the most members with one key failing every delivery (I3).
    #[arg(long)]
    pub poison: bool,
    /// `rest` with --server: the nodes' HTTP addresses (comma-separated host:port).
    #[arg(long)]
    pub http_server: Option<String>,
}

/// The median of `v` (0 when empty; the mean of the middle two when even).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration '{s}'"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in '{s}' (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Runs a benchmark and prints (and optionally writes) its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.message_size < 8 && args.workload == Workload::E2e {
        bail!("e2e needs --message-size of at least 8 (the send time travels in the payload)");
    }
    if args.batch_size == 0 || args.in_flight == 0 || args.producers == 0 {
        bail!("--batch-size, --in-flight and --producers must be at least 1");
    }
    if args.schema.is_some() && args.workload == Workload::E2e {
        bail!(
            "--schema is for the produce and read workloads (e2e writes a time into the payload)"
        );
    }
    if args.schema.is_some() {
        let min = schema::min_size();
        if args.message_size < min {
            bail!("--schema protobuf needs --message-size of at least {min} (its fixed fields)");
        }
    }
    if args.via_any_node && !args.raw_grpc {
        bail!(
            "--via-any-node needs --raw-grpc: the SDK producer always sends to partition leaders"
        );
    }
    if args.tls && args.server.is_some() {
        bail!("--tls makes the spawned nodes' certificates; for --server give --tls-ca");
    }
    if args.tls_ca.is_some() && args.server.is_none() {
        bail!("--tls-ca is for --server; with --spawn use --tls");
    }
    if args.auth && args.server.is_some() {
        bail!("--auth starts the spawned nodes with authentication; for --server give --token");
    }
    if args.token.is_some() && args.server.is_none() {
        bail!("--token is for --server; with --spawn use --auth (the bench makes its own keys)");
    }
    let mut args = args;
    let command = redacted_command(std::env::args());
    let exe = std::env::current_exe().context("finding the junction executable")?;
    let mut spawned = None;
    if let Some(ca) = &args.tls_ca {
        load::set_tls(
            junction_tls::ClientTls::from_ca_file(ca)
                .with_context(|| format!("--tls-ca {}", ca.display()))?,
        );
    }
    let addrs: Vec<String> = match &args.server {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => {
            eprintln!("starting {} junction nodes on loopback", args.spawn);
            let s = spawn::Spawned::start(
                &exe,
                args.spawn,
                args.data_dir.clone(),
                args.tls,
                args.auth,
            )?;
            if let Some(ca) = &s.tls_ca {
                load::set_tls(junction_tls::ClientTls::from_ca_file(ca)?);
            }
            args.token = s.admin_token(Duration::from_secs(60)).await?;
            let addrs = s.addrs.clone();
            spawned = Some(s);
            addrs
        }
    };
    spawn::wait_ready(&addrs, args.token.as_deref(), Duration::from_secs(60)).await?;
    if args.workload != Workload::Isolation
        && let (Some(s), Some(admin_token)) = (&spawned, args.token.clone())
        && s.admin_token_file.is_some()
    {
        // The load calls with an API key of the station's tenant, as an application would.
        let station = args.station.clone().unwrap_or_else(load::default_station);
        let tenant = station.split_once('/').map_or("default", |(t, _)| t);
        let admin = load::admin(&addrs, Some(&admin_token))?;
        load::ensure_tenant(&admin, tenant).await?;
        args.token = Some(load::tenant_key(&admin, tenant, "admin").await?);
        args.station = Some(station);
    }
    if args.workload == Workload::Isolation {
        if args.noisy_quota == 0 {
            bail!("--noisy-quota must be at least 1 (a quota of 0 is refused)");
        }
        let report = isolation::run(&args, &addrs, command).await?;
        drop(spawned);
        return publish(&report.table(), &report, args.json.as_deref());
    }
    if args.workload == Workload::Rest {
        let http: Vec<String> = match (&spawned, &args.http_server) {
            (Some(s), _) => s.http_addrs().to_vec(),
            (None, Some(list)) => list.split(',').map(|s| s.trim().to_owned()).collect(),
            (None, None) => Vec::new(),
        };
        let report = rest::run(&args, &addrs, &http, command).await?;
        drop(spawned);
        return publish(&report.table(), &report, args.json.as_deref());
    }
    if args.workload == Workload::Idempotence {
        let report = idempotence::run(&args, &addrs, command).await?;
        drop(spawned);
        return publish(&report.table(), &report, args.json.as_deref());
    }
    if args.workload == Workload::Groups {
        let report = groups::run(&args, &addrs, command).await?;
        drop(spawned);
        return publish(&report.table(), &report, args.json.as_deref());
    }
    if args.workload == Workload::Lanes {
        let report = lanes::run(&args, &addrs, command).await?;
        drop(spawned);
        return publish(&report.table(), &report, args.json.as_deref());
    }
    let result = load::run(&args, &addrs, spawned.as_mut()).await?;
    let report = report::Report::new(&args, command, &result);
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::svg(&report, &result))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(spawned);
    Ok(())
}

/// Prints a report's table and writes it as JSON to `json` when given.
fn publish(
    table: &str,
    report: &impl serde::Serialize,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    println!("{table}");
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The command line for the report, with the value of `--token` replaced.
fn redacted_command(argv: impl IntoIterator<Item = String>) -> String {
    let mut out = Vec::new();
    let mut hide_next = false;
    for arg in argv {
        if hide_next {
            out.push("<redacted>".to_owned());
            hide_next = false;
        } else if arg == "--token" {
            out.push(arg);
            hide_next = true;
        } else if arg.starts_with("--token=") {
            out.push("--token=<redacted>".to_owned());
        } else {
            out.push(arg);
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_command_never_shows_the_token() {
        let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            redacted_command(argv("junction bench produce --token jk_a_secret --rate 5")),
            "junction bench produce --token <redacted> --rate 5"
        );
        assert_eq!(
            redacted_command(argv("junction bench produce --token=jk_a_secret")),
            "junction bench produce --token=<redacted>"
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
