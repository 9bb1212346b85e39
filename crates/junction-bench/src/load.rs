//! The workloads. Producers are the SDK's `Producer` (or, with `--raw-grpc`, the raw
//! `ProduceStream` RPC with a window of batches in flight); readers use `Read`/`Tail`.
//! Latencies are recorded in microseconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use junction_client::{AuthedChannel, Bearer, Client, ClientOptions, Producer};
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::read_request::Start;
use junction_proto::v1::{Message, ProduceRequest, ReadRequest, StartPosition};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::spawn::{ProcUsage, Spawned};
use crate::{BenchArgs, Workload};

/// What a run measured.
pub struct LoadResult {
    pub workload: Workload,
    /// Messages acknowledged (produce), read (read) or delivered (e2e).
    pub messages: u64,
    pub payload_bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Microseconds.
    pub latency: Histogram<u64>,
    /// Produce only: microseconds from the actual hand-off of each batch (see `Counters`).
    pub latency_from_send: Option<Histogram<u64>>,
    /// e2e: produce throughput (acknowledged messages per second) while readers tailed.
    pub produce_rate: Option<f64>,
    /// Messages completed in each second of the run.
    pub per_second: Vec<u64>,
    /// Server process usage over the measured interval (spawned clusters only).
    pub usage: Option<ProcUsage>,
}

pub(crate) struct Counters {
    pub(crate) done: AtomicU64,
    pub(crate) errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    /// Produce latency from the moment each batch was actually handed to the stream (for
    /// `--rate`: excludes how late the sender's timer woke; what the NATS load generator
    /// reports).
    from_send: std::sync::Mutex<Option<Histogram<u64>>>,
    /// e2e: messages acknowledged per second while the readers tailed.
    produce_rate: std::sync::Mutex<Option<f64>>,
}

impl Counters {
    fn error(&self, n: u64, msg: String) {
        self.errors.fetch_add(n, Ordering::Relaxed);
        if let Ok(mut e) = self.first_error.lock() {
            e.get_or_insert(msg);
        }
    }
}

pub(crate) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 120_000_000, 3).context("creating a histogram")
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The TLS every connection of this bench run uses (set once, from `--tls` or `--tls-ca`,
/// before any connection is made); plaintext when unset.
static TLS: std::sync::OnceLock<junction_tls::ClientTls> = std::sync::OnceLock::new();

/// Makes every later connection of the run speak TLS with `tls`.
pub(crate) fn set_tls(tls: junction_tls::ClientTls) {
    let _already_set = TLS.set(tls);
}

/// Client options of the run (its TLS) calling with `token`.
pub(crate) fn options(token: Option<&str>) -> ClientOptions {
    ClientOptions {
        tls: TLS.get().cloned(),
        token: token.map(str::to_owned),
        ..ClientOptions::default()
    }
}

/// A connection to `addr` whose calls carry `token`.
async fn channel(addr: &str, token: Option<&str>) -> anyhow::Result<AuthedChannel> {
    let bearer = Bearer::new(token).context("the token is not a valid header value")?;
    Ok(InterceptedService::new(raw_channel(addr).await?, bearer))
}

async fn raw_channel(addr: &str) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(junction_proto::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(junction_proto::HTTP2_CONNECTION_WINDOW);
    match TLS.get() {
        Some(tls) => endpoint
            .connect_with_connector(junction_tls::TlsConnector::new(tls.clone()))
            .await
            .with_context(|| format!("connecting to {addr} over TLS")),
        None => endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}")),
    }
}

/// How long the bench's admin calls retry retryable failures (no leader yet, a node
/// restarting) before giving up.
const ADMIN_RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// The SDK client for the bench's admin calls: they retry through the SDK's retry policy,
/// so a cluster that has just started (no metadata leader known on every node yet) is
/// waited for, not reported as a failure.
pub(crate) fn admin(addrs: &[String], token: Option<&str>) -> anyhow::Result<Client> {
    Client::connect_with(
        addrs.iter().cloned(),
        options(token).with_retry_deadline(ADMIN_RETRY_DEADLINE),
    )
    .context("creating the admin client")
}

/// A fresh station name for this run.
pub(crate) fn default_station() -> String {
    format!(
        "bench-{}-{}",
        std::process::id(),
        now_us() / 1_000_000 % 100_000
    )
}

/// Creates `tenant` unless it exists (`default` always does).
pub(crate) async fn ensure_tenant(admin: &Client, tenant: &str) -> anyhow::Result<()> {
    if tenant == "default" {
        return Ok(());
    }
    match admin.create_tenant(tenant).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating tenant {tenant}")),
    }
}

/// Makes an API key of `tenant` with `role` through `admin` (a cluster-admin client) and
/// returns its token.
pub(crate) async fn tenant_key(admin: &Client, tenant: &str, role: &str) -> anyhow::Result<String> {
    let key = admin
        .create_api_key(junction_proto::v1::CreateApiKeyRequest {
            tenant: tenant.to_owned(),
            role: role.to_owned(),
            description: "junction bench".to_owned(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("making an API key of tenant {tenant}"))?;
    Ok(key.token)
}

/// Creates the station if it does not exist yet (with `--schema`, registers the schema and
/// binds the station to it).
pub(crate) async fn prepare(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
) -> anyhow::Result<()> {
    let admin = admin(addrs, args.token.as_deref())?;
    let mut station_spec = junction_client::StationSpec::new(station)
        .partitions(args.partitions)
        .replication_factor(args.replication_factor);
    if let Some(schema) = args.schema {
        let tenant = station.split_once('/').map_or("", |(t, _)| t);
        let mut spec = junction_client::SchemaSpec::new(
            crate::schema::SCHEMA_NAME,
            schema.kind(),
            schema.text(),
        );
        spec.tenant = tenant.to_owned();
        let registered = admin
            .create_schema(&spec)
            .await
            .context("registering the bench schema")?;
        station_spec = station_spec.schema(
            crate::schema::SCHEMA_NAME,
            Some(registered.version),
            "reject",
        );
    }
    let created = admin.create_station_with(station_spec).await;
    match created {
        Ok(_) => Ok(()),
        // Also what a retry after a lost reply reports.
        Err(e) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating station {station}")),
    }
}

/// Runs the selected workload.
pub async fn run(
    args: &BenchArgs,
    addrs: &[String],
    spawned: Option<&mut Spawned>,
) -> anyhow::Result<LoadResult> {
    let station = args.station.clone().unwrap_or_else(default_station);
    if args.workload == Workload::Idle {
        let stations = idle_stations(&station, args.partitions);
        for (name, partitions) in &stations {
            let mut one = args.clone();
            one.partitions = *partitions;
            prepare(&one, addrs, name).await?;
        }
        for (name, _) in &stations {
            wait_for_leaders(args, addrs, name, Duration::from_secs(1800)).await?;
        }
    } else {
        prepare(args, addrs, &station).await?;
    }
    if args.workload.replays() {
        let existing = total_offsets(args, addrs, &station).await?;
        if existing < args.messages {
            eprintln!("writing {} messages to replay", args.messages - existing);
            let mut fill = args.clone();
            fill.duration = None;
            fill.rate = 0;
            fill.messages = args.messages - existing;
            produce(&fill, addrs, &station, &Counters::new(), None).await?;
        }
    }
    let counters = Arc::new(Counters::new());
    let before = spawned.as_deref().map(Spawned::usage);
    let started = Instant::now();
    let series = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ticker = tokio::spawn(tick(
        counters.clone(),
        args.quiet,
        target(args),
        series.clone(),
    ));
    let (latency, messages) = match args.workload {
        Workload::Produce => {
            let h = produce(args, addrs, &station, &counters, None).await?;
            (h, counters.done.load(Ordering::Relaxed))
        }
        Workload::Read => read(args, addrs, &station, &counters).await?,
        Workload::Consume => consume(args, addrs, &station, &counters).await?,
        Workload::Isolation
        | Workload::Lanes
        | Workload::Groups
        | Workload::Idempotence
        | Workload::Rest => {
            anyhow::bail!("the isolation, lanes and groups workloads run through their own modules")
        }
        Workload::E2e => e2e(args, addrs, &station, &counters).await?,
        Workload::Idle => {
            // Nothing to do but wait: the nodes' CPU over this time is the result.
            tokio::time::sleep(args.duration.unwrap_or(Duration::from_secs(30))).await;
            (new_histogram()?, 0)
        }
    };
    let elapsed = started.elapsed();
    ticker.abort();
    let per_second = series.lock().map(|s| s.clone()).unwrap_or_default();
    let usage = match (before, spawned) {
        (Some(b), Some(s)) => {
            s.all_running()?;
            let a = s.usage();
            Some(ProcUsage {
                cpu_us: a.cpu_us.saturating_sub(b.cpu_us),
                node_cpu_us: a
                    .node_cpu_us
                    .iter()
                    .zip(&b.node_cpu_us)
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect(),
                write_bytes: a.write_bytes.saturating_sub(b.write_bytes),
                rocksdb: std::array::from_fn(|i| a.rocksdb[i].saturating_sub(b.rocksdb[i])),
                node_rss_bytes: a.node_rss_bytes,
            })
        }
        _ => None,
    };
    if !args.quiet {
        eprintln!();
    }
    let first_error = counters.first_error.lock().ok().and_then(|e| e.clone());
    Ok(LoadResult {
        workload: args.workload,
        messages,
        payload_bytes: messages * args.message_size as u64,
        errors: counters.errors.load(Ordering::Relaxed),
        first_error,
        elapsed,
        latency,
        latency_from_send: counters.from_send.lock().ok().and_then(|h| h.clone()),
        produce_rate: counters.produce_rate.lock().ok().and_then(|r| *r),
        per_second,
        usage,
    })
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: std::sync::Mutex::new(None),
            from_send: std::sync::Mutex::new(None),
            produce_rate: std::sync::Mutex::new(None),
        }
    }
}

fn target(args: &BenchArgs) -> Option<u64> {
    if args.duration.is_some() {
        None
    } else {
        Some(args.messages)
    }
}

/// Samples progress once a second into `series`, drawing a progress line.
async fn tick(
    c: Arc<Counters>,
    quiet: bool,
    target: Option<u64>,
    series: Arc<std::sync::Mutex<Vec<u64>>>,
) {
    let mut last = 0;
    let mut seconds = 0u64;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    loop {
        interval.tick().await;
        seconds += 1;
        let done = c.done.load(Ordering::Relaxed);
        if let Ok(mut s) = series.lock() {
            s.push(done - last);
        }
        if !quiet {
            let bar = match target {
                Some(t) if t > 0 => {
                    let filled = ((done as f64 / t as f64) * 30.0).min(30.0) as usize;
                    format!(
                        "[{}{}] {:>3}%",
                        "#".repeat(filled),
                        ".".repeat(30 - filled),
                        (done * 100 / t).min(100)
                    )
                }
                _ => format!("{seconds:>5}s"),
            };
            eprint!(
                "\r{bar}  {done:>10} msgs  {:>9} msg/s  errors {}   ",
                done - last,
                c.errors.load(Ordering::Relaxed)
            );
        }
        last = done;
    }
}

/// Describes `station`.
async fn describe(
    admin: &Client,
    station: &str,
) -> anyhow::Result<junction_proto::v1::StationInfo> {
    admin
        .describe_station(station)
        .await
        .with_context(|| format!("describing station {station}"))
}

async fn total_offsets(args: &BenchArgs, addrs: &[String], station: &str) -> anyhow::Result<u64> {
    let info = describe(&admin(addrs, args.token.as_deref())?, station).await?;
    Ok(info.partition_info.iter().map(|p| p.next_offset).sum())
}

/// The stations `idle` creates for `partitions` partitions: `station` itself when one station
/// can hold them all (1,024 at most), else stations of 1,000 named `station-1`, `station-2`, …
fn idle_stations(station: &str, partitions: u32) -> Vec<(String, u32)> {
    const MAX: u32 = 1024;
    const CHUNK: u32 = 1000;
    if partitions <= MAX {
        return vec![(station.to_owned(), partitions)];
    }
    (0..partitions.div_ceil(CHUNK))
        .map(|i| {
            let n = (partitions - i * CHUNK).min(CHUNK);
            (format!("{station}-{}", i + 1), n)
        })
        .collect()
}

/// Waits until every partition of `station` has a leader (for `idle`: measuring before the
/// elections are over would count them).
pub(crate) async fn wait_for_leaders(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let admin = admin(addrs, args.token.as_deref())?;
    loop {
        let info = describe(&admin, station).await?;
        let led = info
            .partition_info
            .iter()
            .filter(|p| p.leader.is_some())
            .count();
        if led == info.partition_info.len() {
            eprintln!("all {led} partitions have a leader");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "only {led} of {} partitions had a leader after {limit:?}",
                info.partition_info.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Produces per the arguments; returns the produce → ack latency histogram.
pub(crate) async fn produce(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    counters: &Counters,
    _unused: Option<()>,
) -> anyhow::Result<Histogram<u64>> {
    if !args.raw_grpc {
        return sdk_produce(args, addrs, station, counters).await;
    }
    let counters_ptr: &Counters = counters;
    let quota = Arc::new(AtomicU64::new(if args.duration.is_some() {
        u64::MAX
    } else {
        args.messages
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let batch_seq = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let filler = filler(args)?;
    let routes = Routes::discover(args, addrs, station).await?;
    let routes = &routes;
    let mut tasks = futures::stream::FuturesUnordered::new();
    for p in 0..args.producers {
        let addr = addrs[p % addrs.len()].clone();
        let (quota, stop, batch_seq, filler) = (
            quota.clone(),
            stop.clone(),
            batch_seq.clone(),
            filler.clone(),
        );
        let args = args.clone();
        let station = station.to_string();
        tasks.push(async move {
            producer(
                &args,
                &addr,
                routes,
                &station,
                counters_ptr,
                quota,
                stop,
                batch_seq,
                started,
                filler,
            )
            .await
        });
    }
    // Never completes (polling a finished future again would panic): once the duration is
    // over it only raises `stop`, and the producers finish what they have in flight.
    let stopper = async {
        if let Some(d) = args.duration {
            tokio::time::sleep(d).await;
            stop.store(true, Ordering::Relaxed);
        }
        futures::future::pending::<()>().await;
    };
    tokio::pin!(stopper);
    let mut total = new_histogram()?;
    let mut left = args.producers;
    while left > 0 {
        tokio::select! {
            () = &mut stopper => {}
            r = tasks.next() => match r {
                Some(h) => { total.add(h?).context("merging histograms")?; left -= 1; }
                None => break,
            }
        }
    }
    Ok(total)
}

/// Produces through the SDK: each of `--producers` tasks owns a `Client` and a `Producer`
/// and keeps at most `in-flight × batch-size` messages unacknowledged (closed loop), or sends
/// `batch-size` messages at each tick of `--rate` (open loop). The SDK forms the batches,
/// routes them to partition leaders and retries what it may; the bench records each
/// message's latency when its `send` future completes.
async fn sdk_produce(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    counters: &Counters,
) -> anyhow::Result<Histogram<u64>> {
    let quota = AtomicU64::new(if args.duration.is_some() {
        u64::MAX
    } else {
        args.messages
    });
    let stop = AtomicBool::new(false);
    let tick = AtomicU64::new(0);
    let filler = filler(args)?;
    let hist = std::sync::Mutex::new(new_histogram()?);
    let from_send = std::sync::Mutex::new(new_histogram()?);
    let producer_options = junction_client::ProducerOptions {
        max_batch_messages: args.batch_size,
        max_in_flight: args.in_flight,
        linger: args.linger,
        idempotent: !args.at_least_once,
        ..Default::default()
    };
    // Every producer learns its routes and identity before the clock starts, as a service's
    // producers do at start-up; the run measures sending.
    let mut ready = Vec::with_capacity(args.producers);
    for _ in 0..args.producers {
        let client = Client::connect_with(addrs.iter().cloned(), options(args.token.as_deref()))
            .context("creating a client")?;
        let producer = client.producer(station, producer_options);
        producer.ready().await.context("starting a producer")?;
        ready.push(producer);
    }
    let started = Instant::now();
    let shared = SdkShared {
        args,
        counters,
        quota: &quota,
        stop: &stop,
        tick: &tick,
        started,
        filler: &filler,
        hist: &hist,
        from_send: &from_send,
    };
    let mut producers = futures::stream::FuturesUnordered::new();
    for producer in ready {
        producers.push(sdk_producer(&shared, producer));
    }
    let stopper = async {
        if let Some(d) = args.duration {
            tokio::time::sleep(d).await;
            stop.store(true, Ordering::Relaxed);
        }
        futures::future::pending::<()>().await;
    };
    tokio::pin!(stopper);
    loop {
        tokio::select! {
            () = &mut stopper => {}
            r = producers.next() => match r {
                Some(r) => r?,
                None => break,
            }
        }
    }
    if let Ok(mut h) = counters.from_send.lock() {
        *h = from_send.lock().ok().map(|h| h.clone());
    }
    let total = hist.lock().map(|h| h.clone()).ok();
    total.context("a latency histogram was poisoned")
}

/// What the SDK producer tasks of one run share.
struct SdkShared<'a> {
    args: &'a BenchArgs,
    counters: &'a Counters,
    /// Messages still to send (closed count) or `u64::MAX` (timed run).
    quota: &'a AtomicU64,
    stop: &'a AtomicBool,
    /// Ticks of `--rate` handed out so far, over all producers.
    tick: &'a AtomicU64,
    started: Instant,
    filler: &'a Filler,
    hist: &'a std::sync::Mutex<Histogram<u64>>,
    from_send: &'a std::sync::Mutex<Histogram<u64>>,
}

async fn sdk_producer(shared: &SdkShared<'_>, producer: Producer) -> anyhow::Result<()> {
    let args = shared.args;
    let window = Arc::new(Semaphore::new(args.in_flight * args.batch_size));
    let mut groups = tokio::task::JoinSet::new();
    let mut key_counter = 0u64;
    let mut msg_counter = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let want = args.batch_size as u64;
        let got = shared
            .quota
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(want))
            });
        let n = got.map_or(0, |q| q.min(want));
        if n == 0 {
            break;
        }
        // Open loop: the intended send time of this tick. Closed loop: the hand-off, once the
        // window has room (a message a closed loop has not sent yet has no latency).
        let intended = if args.rate > 0 {
            let tick = shared.tick.fetch_add(1, Ordering::Relaxed);
            let at = shared.started
                + Duration::from_secs_f64(tick as f64 * want as f64 / args.rate as f64);
            sleep_until_precisely(at).await;
            Some(at)
        } else {
            None
        };
        let permits = window
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .context("the send window closed")?;
        let sent = Instant::now();
        let due = intended.unwrap_or(sent);
        let sends: Vec<_> = (0..n)
            .map(|_| {
                let key = (args.keys > 0).then(|| {
                    key_counter += 1;
                    format!("key-{}", key_counter % args.keys).into_bytes()
                });
                msg_counter += 1;
                producer.send(Message {
                    key,
                    headers: vec![],
                    payload: payload(
                        args.workload,
                        shared.filler,
                        args.message_size,
                        msg_counter,
                        due,
                    ),
                    partition: None,
                    msg_id: None,
                })
            })
            .collect();
        // Completions are awaited apart from the sender, so the window refills as acks come.
        groups.spawn(sdk_await_group(sends, due, sent, permits));
        while let Some(finished) = groups.try_join_next() {
            shared.absorb(finished.context("a completion task failed")?);
        }
    }
    while let Some(finished) = groups.join_next().await {
        shared.absorb(finished.context("a completion task failed")?);
    }
    producer.close().await;
    Ok(())
}

/// How the messages of one group of sends ended.
struct GroupOutcome {
    /// Per acknowledged message: µs from its intended send time, and from its hand-off.
    latencies: Vec<(u64, u64)>,
    errors: u64,
    first_error: Option<String>,
}

/// Waits for a group's send futures, then returns its window permits.
async fn sdk_await_group(
    sends: Vec<junction_client::SendFuture>,
    due: Instant,
    sent: Instant,
    permits: tokio::sync::OwnedSemaphorePermit,
) -> GroupOutcome {
    let mut outcome = GroupOutcome {
        latencies: Vec::with_capacity(sends.len()),
        errors: 0,
        first_error: None,
    };
    for send in sends {
        match send.await {
            Ok(_) => outcome.latencies.push((
                (due.elapsed().as_micros() as u64).max(1),
                (sent.elapsed().as_micros() as u64).max(1),
            )),
            Err(e) => {
                outcome.errors += 1;
                outcome
                    .first_error
                    .get_or_insert_with(|| format!("send failed: {e}"));
            }
        }
    }
    drop(permits);
    outcome
}

impl SdkShared<'_> {
    fn absorb(&self, outcome: GroupOutcome) {
        if outcome.errors > 0 {
            self.counters
                .error(outcome.errors, outcome.first_error.unwrap_or_default());
        }
        let n = outcome.latencies.len() as u64;
        if let (Ok(mut hist), Ok(mut from_send)) = (self.hist.lock(), self.from_send.lock()) {
            for (from_due, from_hand_off) in outcome.latencies {
                let _ = hist.record(from_due);
                let _ = from_send.record(from_hand_off);
            }
        }
        self.counters.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// Where each partition's batches go: the partition's leader, so no node forwards (what a
/// Kafka client does, and what the NATS load generator does by connecting to the stream
/// leader). Keyed loads leave the choice of partition to the server.
#[derive(Clone)]
struct Routes {
    /// Address of each partition's leader, by partition; empty: send everything to the
    /// producer's own node and let the server pick the partition.
    leaders: Vec<String>,
}

impl Routes {
    async fn discover(args: &BenchArgs, addrs: &[String], station: &str) -> anyhow::Result<Self> {
        if args.keys > 0 || args.via_any_node {
            return Ok(Self { leaders: vec![] });
        }
        let admin = admin(addrs, args.token.as_deref())?;
        let nodes = admin.cluster_status().await?.nodes;
        let info = describe(&admin, station).await?;
        let mut leaders = Vec::new();
        for p in &info.partition_info {
            let addr = p
                .leader
                .and_then(|l| nodes.iter().find(|n| n.id == l))
                .map(|n| n.addr.clone());
            match addr {
                Some(a) => leaders.push(a),
                // No leader known yet: route nothing, let the server pick.
                None => return Ok(Self { leaders: vec![] }),
            }
        }
        Ok(Self { leaders })
    }
}

/// A batch in flight: its intended send time, its actual hand-off and its message count.
type InFlight = (Instant, Instant, u64);

#[allow(clippy::too_many_arguments)]
async fn producer(
    args: &BenchArgs,
    addr: &str,
    routes: &Routes,
    station: &str,
    counters: &Counters,
    quota: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    batch_seq: Arc<AtomicU64>,
    started: Instant,
    filler: Filler,
) -> anyhow::Result<Histogram<u64>> {
    // One stream per distinct destination; `route[p]` is partition p's stream.
    let mut dests: Vec<String> = routes.leaders.clone();
    dests.sort();
    dests.dedup();
    if dests.is_empty() {
        dests.push(addr.to_string());
    }
    let route: Vec<usize> = routes
        .leaders
        .iter()
        .map(|a| dests.iter().position(|d| d == a).unwrap_or(0))
        .collect();
    // Idempotent producers: an identity, and the next sequence of each partition.
    let identity = if !args.at_least_once {
        if route.is_empty() {
            anyhow::bail!(
                "idempotent raw-grpc producers need batches of one partition each: use an unkeyed load without --via-any-node, or add --at-least-once"
            );
        }
        let tenant = station.split_once('/').map_or("", |(t, _)| t).to_string();
        let r = BrokerClient::new(channel(addr, args.token.as_deref()).await?)
            .init_producer(junction_proto::v1::InitProducerRequest {
                tenant,
                producer_name: None,
            })
            .await?
            .into_inner();
        Some((r.producer_id, r.epoch))
    } else {
        None
    };
    let mut sequences = vec![0u64; route.len()];
    let window = Arc::new(Semaphore::new(args.in_flight));
    let pending: Arc<Mutex<HashMap<u64, InFlight>>> = Arc::default();
    let hist = Arc::new(Mutex::new(new_histogram()?));
    if let Ok(mut h) = counters.from_send.lock()
        && h.is_none()
    {
        *h = Some(new_histogram()?);
    }
    let mut senders = Vec::new();
    let mut receivers = futures::stream::FuturesUnordered::new();
    for d in &dests {
        let mut client = BrokerClient::new(channel(d, args.token.as_deref()).await?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel::<ProduceRequest>(args.in_flight);
        let mut replies = client
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        senders.push(tx);
        let (window, pending, hist) = (window.clone(), pending.clone(), hist.clone());
        receivers.push(async move {
            while let Some(reply) = replies.next().await {
                let reply = match reply {
                    Ok(r) => r,
                    Err(s) => {
                        let n: u64 = pending.lock().await.drain().map(|(_, (_, _, n))| n).sum();
                        counters.error(n.max(1), format!("stream failed: {s}"));
                        // Release the window, or the sender waits forever.
                        window.close();
                        return;
                    }
                };
                let Some((due, sent, n)) = pending.lock().await.remove(&reply.request_id) else {
                    continue;
                };
                match reply.error {
                    Some(e) => counters.error(n, format!("batch failed: {}", e.message)),
                    None => {
                        let us = due.elapsed().as_micros() as u64;
                        let _ = hist.lock().await.record_n(us.max(1), n);
                        if let Ok(mut h) = counters.from_send.lock()
                            && let Some(h) = h.as_mut()
                        {
                            let _ = h.record_n((sent.elapsed().as_micros() as u64).max(1), n);
                        }
                        counters.done.fetch_add(n, Ordering::Relaxed);
                    }
                }
                window.add_permits(1);
            }
        });
    }
    let receiver = async { while receivers.next().await.is_some() {} };
    let sender = async {
        let mut key_counter = 0u64;
        let mut msg_counter = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let want = args.batch_size as u64;
            let got = quota.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(want))
            });
            let n = match got {
                Ok(q) => q.min(want),
                Err(_) => 0,
            };
            if n == 0 {
                break;
            }
            let seq = batch_seq.fetch_add(1, Ordering::Relaxed);
            let intended = if args.rate > 0 {
                let at = started
                    + Duration::from_secs_f64(
                        seq as f64 * args.batch_size as f64 / args.rate as f64,
                    );
                sleep_until_precisely(at).await;
                Some(at)
            } else {
                None
            };
            let Ok(permit) = window.acquire().await else {
                break;
            };
            // Closed loop: latency counts from the hand-off, once the window has room.
            let due = intended.unwrap_or_else(Instant::now);
            permit.forget();
            // Unkeyed batches go round-robin over the partitions, each to its leader.
            let partition = (!route.is_empty()).then(|| (seq % route.len() as u64) as u32);
            let messages = (0..n)
                .map(|_| {
                    let key = (args.keys > 0).then(|| {
                        key_counter += 1;
                        format!("key-{}", key_counter % args.keys).into_bytes()
                    });
                    msg_counter += 1;
                    Message {
                        key,
                        headers: vec![],
                        payload: payload(
                            args.workload,
                            &filler,
                            args.message_size,
                            msg_counter,
                            due,
                        ),
                        partition,
                        msg_id: None,
                    }
                })
                .collect();
            pending.lock().await.insert(seq, (due, Instant::now(), n));
            let dest = partition.map_or(0, |p| route[p as usize]);
            let producer = match (identity, partition) {
                (Some((producer_id, epoch)), Some(p)) => {
                    let base_sequence = sequences[p as usize];
                    sequences[p as usize] += n;
                    Some(junction_proto::v1::ProducerFields {
                        producer_id,
                        epoch,
                        base_sequence,
                    })
                }
                _ => None,
            };
            if senders[dest]
                .send(ProduceRequest {
                    station: station.to_string(),
                    messages,
                    request_id: seq,
                    producer,
                })
                .await
                .is_err()
            {
                break;
            }
        }
        senders.clear();
    };
    let ((), ()) = futures::join!(sender, receiver);
    let h = hist.lock().await.clone();
    Ok(h)
}

/// Sleeps until `at` to within tens of microseconds. Tokio's timer ticks in whole
/// milliseconds and woke the fixed-rate sender 1.2 ms late on average, which the
/// intended-send-time latency then counted; the last stretch is slept on a blocking thread
/// (an hrtimer-backed `nanosleep`), without spinning a core.
async fn sleep_until_precisely(at: Instant) {
    let coarse = at.checked_sub(Duration::from_millis(2));
    if let Some(c) = coarse.filter(|c| *c > Instant::now()) {
        tokio::time::sleep_until(c.into()).await;
    }
    let rest = at.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

/// Pseudo-random bytes (xorshift, as the peer load generator uses) that payloads are cut
/// from: 1 MiB more than one message, so that consecutive messages carry different bytes and
/// storage compression (LZ4 on 4 KiB blocks) cannot flatter the write figures.
const FILLER_SPAN: usize = 1 << 20;

/// What payloads are cut from.
#[derive(Clone)]
pub(crate) struct Filler {
    bytes: Bytes,
    /// With `--schema`: how many valid records of the message size lie back to back.
    records: Option<u64>,
}

fn filler(args: &BenchArgs) -> anyhow::Result<Filler> {
    let random = random_filler(args.message_size);
    match args.schema {
        None => Ok(Filler {
            bytes: random,
            records: None,
        }),
        Some(_) => {
            let (bytes, k) =
                crate::schema::pool(args.message_size, &random).with_context(|| {
                    format!(
                        "--message-size {} is too small for the schema's records",
                        args.message_size
                    )
                })?;
            Ok(Filler {
                bytes,
                records: Some(k),
            })
        }
    }
}

fn random_filler(size: usize) -> Bytes {
    let mut v = vec![0u8; size + FILLER_SPAN];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x & 0xff) as u8;
    }
    Bytes::from(v)
}

/// The payload of a producer's `n`-th message: its own slice of the filler (no copy). For e2e
/// the first 8 bytes carry the intended send time (µs since the epoch).
fn payload(w: Workload, filler: &Filler, size: usize, n: u64, due: Instant) -> Bytes {
    let at = match filler.records {
        Some(k) => (n % k) as usize * size,
        None => (n as usize).wrapping_mul(size.max(1)) % FILLER_SPAN,
    };
    let slice = filler.bytes.slice(at..at + size);
    if w != Workload::E2e {
        return slice;
    }
    let sent = now_us().saturating_sub(due.elapsed().as_micros() as u64);
    let mut v = slice.to_vec();
    v[..8].copy_from_slice(&sent.to_be_bytes());
    Bytes::from(v)
}

/// Replays `args.messages` messages from earliest, all partitions in parallel.
async fn read(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    counters: &Arc<Counters>,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut tasks = Vec::new();
    let per_partition = args.messages.div_ceil(u64::from(args.partitions.max(1)));
    for p in 0..args.partitions {
        let addr = addrs[p as usize % addrs.len()].clone();
        let (station, counters) = (station.to_string(), counters.clone());
        let token = args.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = BrokerClient::new(channel(&addr, token.as_deref()).await?)
                .max_decoding_message_size(64 << 20);
            let mut h = new_histogram()?;
            let mut next = 0u64;
            let mut got = 0u64;
            while got < per_partition {
                let t = Instant::now();
                let r = client
                    .read(ReadRequest {
                        station: station.clone(),
                        partition: p,
                        start: Some(Start::Offset(next)),
                        max_messages: 10_000,
                        max_bytes: 8 << 20,
                        local_replica: false,
                    })
                    .await?
                    .into_inner();
                let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                if r.messages.is_empty() {
                    break;
                }
                got += r.messages.len() as u64;
                counters
                    .done
                    .fetch_add(r.messages.len() as u64, Ordering::Relaxed);
                next = r.next_offset;
            }
            Ok::<_, anyhow::Error>((h, got))
        }));
    }
    let mut total = new_histogram()?;
    let mut n = 0;
    for t in tasks {
        let (h, got) = t.await??;
        total.add(h).context("merging histograms")?;
        n += got;
    }
    Ok((total, n))
}

/// One member of a fresh consumer group takes every stored message from earliest and acks
/// each one as it arrives, until `--messages` first deliveries; the latency histogram holds
/// the gaps between consecutive deliveries.
async fn consume(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    counters: &Arc<Counters>,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    use junction_client::proto::{GroupSettings, group_settings};
    let client = admin(addrs, args.token.as_deref())?;
    let group = format!("bench-consume-{}", now_us());
    let group_options = junction_client::GroupOptions {
        settings: GroupSettings {
            start: Some(group_settings::Start::Position(
                StartPosition::Earliest as i32,
            )),
            // 0: the server's default (1,000 per partition).
            max_in_flight: args.member_in_flight,
            ..Default::default()
        },
        client: "junction bench consume".into(),
        max_in_flight: args.member_in_flight,
        ..Default::default()
    };
    let mut consumer = client
        .group_consumer(station, &group, group_options)
        .await
        .with_context(|| format!("joining group {group}"))?;
    let mut gaps = new_histogram()?;
    let mut delivered = 0u64;
    let mut last = Instant::now();
    // A stall this long means the group stopped delivering: fail rather than report it.
    let stall = Duration::from_secs(60);
    while delivered < args.messages {
        let m = match tokio::time::timeout(stall, consumer.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("the group consumer stopped after {delivered} messages"),
            Err(_) => bail!("no delivery for {stall:?} after {delivered} messages"),
        };
        let now = Instant::now();
        gaps.saturating_record((now - last).as_micros() as u64);
        last = now;
        if !consumer.ack(&m) {
            bail!(
                "partition {} moved away from the only member of {group}",
                m.partition()
            );
        }
        if m.delivery_count == 1 {
            delivered += 1;
            counters.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    consumer.close().await.context("leaving the group")?;
    client
        .delete_group(station, &group)
        .await
        .with_context(|| format!("deleting group {group}"))?;
    Ok((gaps, delivered))
}

/// Produces while tails follow every partition; latency is produce → delivery.
async fn e2e(
    args: &BenchArgs,
    addrs: &[String],
    station: &str,
    counters: &Arc<Counters>,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let readers = if args.readers == 0 {
        args.partitions as usize
    } else {
        args.readers
    };
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tails = Vec::new();
    for r in 0..readers {
        let partition = (r % args.partitions.max(1) as usize) as u32;
        let addr = addrs[r % addrs.len()].clone();
        let (station, delivered, stop) = (station.to_string(), delivered.clone(), stop.clone());
        let token = args.token.clone();
        let count_this = r < args.partitions as usize;
        tails.push(tokio::spawn(async move {
            let mut client = BrokerClient::new(channel(&addr, token.as_deref()).await?)
                .max_decoding_message_size(64 << 20);
            let mut stream = client
                .tail(ReadRequest {
                    station,
                    partition,
                    start: Some(Start::Position(StartPosition::Latest as i32)),
                    max_messages: 10_000,
                    max_bytes: 8 << 20,
                    local_replica: false,
                })
                .await?
                .into_inner();
            let mut h = new_histogram()?;
            while !stop.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
                let Ok(Some(batch)) = next else { continue };
                let batch = batch?;
                let now = now_us();
                for m in &batch.messages {
                    if let Some(b) = m.payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                        let _ = h.record(now.saturating_sub(u64::from_be_bytes(b)).max(1));
                    }
                }
                if count_this {
                    delivered.fetch_add(batch.messages.len() as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, anyhow::Error>(h)
        }));
    }
    // Producers count into a private counter; progress shows deliveries.
    let produced = Counters::new();
    let mirror = {
        let (delivered, counters) = (delivered.clone(), counters.clone());
        tokio::spawn(async move {
            loop {
                counters
                    .done
                    .store(delivered.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let producing = Instant::now();
    produce(args, addrs, station, &produced, None).await?;
    let acked = produced.done.load(Ordering::Relaxed);
    if let Ok(mut r) = counters.produce_rate.lock() {
        *r = Some(acked as f64 / producing.elapsed().as_secs_f64().max(1e-9));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.load(Ordering::Relaxed) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    mirror.abort();
    let mut total = new_histogram()?;
    for t in tails {
        total.add(t.await??).context("merging histograms")?;
    }
    let n = delivered.load(Ordering::Relaxed);
    counters.done.store(n, Ordering::Relaxed);
    if produced.errors.load(Ordering::Relaxed) > 0 {
        counters.error(
            produced.errors.load(Ordering::Relaxed),
            produced
                .first_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default(),
        );
    }
    if n < acked {
        counters.error(
            acked - n,
            format!(
                "{} acknowledged messages were not delivered within 30 s",
                acked - n
            ),
        );
    }
    Ok((total, n))
}

#[cfg(test)]
mod tests {
    use super::idle_stations;

    #[test]
    fn many_idle_partitions_are_spread_over_stations() {
        assert_eq!(idle_stations("s", 1000), vec![("s".to_owned(), 1000)]);
        assert_eq!(idle_stations("s", 1024), vec![("s".to_owned(), 1024)]);
        let many = idle_stations("s", 10_500);
        assert_eq!(many.len(), 11);
        assert_eq!(many[0], ("s-1".to_owned(), 1000));
        assert_eq!(many[10], ("s-11".to_owned(), 500));
        assert_eq!(many.iter().map(|(_, n)| n).sum::<u32>(), 10_500);
    }
}
