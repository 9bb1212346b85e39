//! `junction bench rest`: produce over REST against produce over gRPC, on the same cluster.
//!
//! `--producers` callers each send batches of `--batch-size` messages of `--message-size`
//! bytes, one batch at a time (closed loop), for `--duration` per phase:
//! - **gRPC**: the SDK's unary `Client::produce`, each caller its own `Client`;
//! - **REST**: `POST /api/v1/stations/{tenant}/{station}/messages` with a JSON body, each
//!   caller its own keep-alive HTTP/1.1 connection, callers spread over the nodes.
//!
//! Both are answered once the batch is replicated and durable. Each round runs both phases
//! (their order alternating); the report gives per phase messages/s and the batch latency's
//! p50/p99, their medians over `--rounds`, and REST over gRPC as ratios.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use junction_client::{Client, Message};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::load::{admin, new_histogram, options};
use crate::{BenchArgs, median};

/// One phase's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct RestPhase {
    pub api: &'static str,
    pub messages_per_sec: f64,
    pub batch_p50_ms: f64,
    pub batch_p99_ms: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestReport {
    pub command: String,
    pub producers: usize,
    pub batch_size: usize,
    pub message_size: usize,
    pub duration_s: f64,
    /// Per round: gRPC, REST.
    pub rounds: Vec<(RestPhase, RestPhase)>,
    pub median_grpc_msgs_per_sec: f64,
    pub median_rest_msgs_per_sec: f64,
    pub median_grpc_p99_ms: f64,
    pub median_rest_p99_ms: f64,
    /// REST msg/s over gRPC msg/s.
    pub throughput_ratio: f64,
    /// REST p99 over gRPC p99.
    pub p99_ratio: f64,
}

impl RestReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "rest: {} callers, batches of {} × {} B, one batch in flight per caller, {:.0} s per phase\n",
            self.producers, self.batch_size, self.message_size, self.duration_s
        );
        for (i, (g, r)) in self.rounds.iter().enumerate() {
            for p in [g, r] {
                t.push_str(&format!(
                    "  round {}  {:<5} {:>10.0} msg/s  batch p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}\n",
                    i + 1,
                    p.api,
                    p.messages_per_sec,
                    p.batch_p50_ms,
                    p.batch_p99_ms,
                    p.errors
                ));
            }
        }
        t.push_str(&format!(
            "median: gRPC {:.0} msg/s p99 {:.2} ms; REST {:.0} msg/s p99 {:.2} ms\n\
             REST/gRPC: throughput {:.3}, p99 {:.3}\n",
            self.median_grpc_msgs_per_sec,
            self.median_grpc_p99_ms,
            self.median_rest_msgs_per_sec,
            self.median_rest_p99_ms,
            self.throughput_ratio,
            self.p99_ratio
        ));
        t
    }
}

/// A keep-alive HTTP/1.1 connection that posts JSON.
struct HttpConn {
    host: String,
    io: BufReader<TcpStream>,
}

impl HttpConn {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Self {
            host: addr.to_owned(),
            io: BufReader::new(s),
        })
    }

    /// Posts `body`; returns the status.
    async fn post(&mut self, path: &str, token: Option<&str>, body: &[u8]) -> anyhow::Result<u16> {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let w = self.io.get_mut();
        w.write_all(head.as_bytes()).await?;
        w.write_all(body).await?;
        let mut line = String::new();
        self.io.read_line(&mut line).await?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.io.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().context("content-length")?;
            }
        }
        let mut rest = vec![0u8; length];
        self.io.read_exact(&mut rest).await?;
        Ok(status)
    }
}

fn payload(size: usize, i: usize) -> String {
    let mut p = format!("{i:08}");
    p.extend(std::iter::repeat_n('x', size.saturating_sub(p.len())));
    p
}

fn grpc_batch(args: &BenchArgs, round: usize) -> Vec<Message> {
    (0..args.batch_size)
        .map(|i| Message {
            payload: payload(args.message_size, round * 1_000_000 + i)
                .into_bytes()
                .into(),
            ..Default::default()
        })
        .collect()
}

fn rest_body(args: &BenchArgs, round: usize) -> anyhow::Result<Vec<u8>> {
    let messages: Vec<serde_json::Value> = (0..args.batch_size)
        .map(|i| serde_json::json!({"payload": payload(args.message_size, round * 1_000_000 + i)}))
        .collect();
    Ok(serde_json::to_vec(
        &serde_json::json!({ "messages": messages }),
    )?)
}

fn phase(
    api: &'static str,
    h: &Histogram<u64>,
    messages: u64,
    errors: u64,
    took: Duration,
) -> RestPhase {
    RestPhase {
        api,
        messages_per_sec: messages as f64 / took.as_secs_f64(),
        batch_p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
        batch_p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
    }
}

async fn grpc_phase(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    round: usize,
) -> anyhow::Result<RestPhase> {
    let stop = Instant::now() + args.duration.unwrap_or(Duration::from_secs(20));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.producers {
        let client = Client::connect_with(addrs.iter().cloned(), options(args.token.as_deref()))?;
        let (station, batch) = (station.to_owned(), grpc_batch(args, round));
        tasks.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            let (mut sent, mut errors) = (0u64, 0u64);
            while Instant::now() < stop {
                let t = Instant::now();
                match client.produce(&station, batch.clone()).await {
                    Ok(p) => {
                        sent += p.len() as u64;
                        h.saturating_record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => errors += 1,
                }
            }
            anyhow::Ok((h, sent, errors))
        }));
    }
    gather("gRPC", tasks, start).await
}

async fn rest_phase(
    args: &BenchArgs,
    http: &[String],
    station: &str,
    round: usize,
) -> anyhow::Result<RestPhase> {
    let stop = Instant::now() + args.duration.unwrap_or(Duration::from_secs(20));
    let (tenant, name) = station.split_once('/').unwrap_or(("default", station));
    let path = format!("/api/v1/stations/{tenant}/{name}/messages");
    let body = rest_body(args, round)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.producers {
        let mut conn = HttpConn::connect(&http[i % http.len()]).await?;
        let (path, body, token) = (path.clone(), body.clone(), args.token.clone());
        let batch = args.batch_size as u64;
        tasks.push(tokio::spawn(async move {
            let mut h = new_histogram()?;
            let (mut sent, mut errors) = (0u64, 0u64);
            while Instant::now() < stop {
                let t = Instant::now();
                match conn.post(&path, token.as_deref(), &body).await? {
                    200 => {
                        sent += batch;
                        h.saturating_record(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            anyhow::Ok((h, sent, errors))
        }));
    }
    gather("REST", tasks, start).await
}

type PhaseTask = tokio::task::JoinHandle<anyhow::Result<(Histogram<u64>, u64, u64)>>;

async fn gather(
    api: &'static str,
    tasks: Vec<PhaseTask>,
    start: Instant,
) -> anyhow::Result<RestPhase> {
    let mut all = new_histogram()?;
    let (mut sent, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (h, s, e) = t.await??;
        all.add(&h)?;
        sent += s;
        errors += e;
    }
    Ok(phase(api, &all, sent, errors, start.elapsed()))
}

/// Runs the comparison. `http` are the nodes' HTTP addresses.
pub async fn run(
    args: &BenchArgs,
    addrs: &[String],
    http: &[String],
    command: String,
) -> anyhow::Result<RestReport> {
    if http.is_empty() {
        bail!("rest needs the nodes' HTTP addresses: --http-server host:port,... with --server");
    }
    let station = args
        .station
        .clone()
        .unwrap_or_else(crate::load::default_station);
    let admin = admin(addrs, args.token.as_deref())?;
    if admin.describe_station(&station).await.is_err() {
        admin
            .create_station(&station, args.partitions, args.replication_factor)
            .await
            .with_context(|| format!("creating {station}"))?;
    }
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        // Alternate the order so neither API always runs on a warmer cluster.
        let (g, r) = if round % 2 == 0 {
            let g = grpc_phase(args, addrs, &station, round).await?;
            (g, rest_phase(args, http, &station, round).await?)
        } else {
            let r = rest_phase(args, http, &station, round).await?;
            (grpc_phase(args, addrs, &station, round).await?, r)
        };
        eprintln!(
            "round {}: gRPC {:.0} msg/s p99 {:.2} ms, REST {:.0} msg/s p99 {:.2} ms",
            round + 1,
            g.messages_per_sec,
            g.batch_p99_ms,
            r.messages_per_sec,
            r.batch_p99_ms
        );
        rounds.push((g, r));
    }
    let med = |f: &dyn Fn(&(RestPhase, RestPhase)) -> f64| median(rounds.iter().map(f).collect());
    let (gt, rt) = (
        med(&|x| x.0.messages_per_sec),
        med(&|x| x.1.messages_per_sec),
    );
    let (gp, rp) = (med(&|x| x.0.batch_p99_ms), med(&|x| x.1.batch_p99_ms));
    Ok(RestReport {
        command,
        producers: args.producers,
        batch_size: args.batch_size,
        message_size: args.message_size,
        duration_s: args
            .duration
            .unwrap_or(Duration::from_secs(20))
            .as_secs_f64(),
        median_grpc_msgs_per_sec: gt,
        median_rest_msgs_per_sec: rt,
        median_grpc_p99_ms: gp,
        median_rest_p99_ms: rp,
        throughput_ratio: if gt > 0.0 { rt / gt } else { 0.0 },
        p99_ratio: if gp > 0.0 { rp / gp } else { 0.0 },
        rounds,
    })
}
