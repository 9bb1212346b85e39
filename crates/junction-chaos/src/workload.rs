//! The workload: producers writing keyed, checkable messages, one message per RPC (so that
//! every attempt and its outcome is known), and one tailing reader per partition.
//!
//! Two ways to produce:
//! - exactly-once (the default): each producer is an idempotent `junction_client::Producer`,
//!   which retries through faults itself; an attempt is one `send` and its outcome. A key's
//!   retry after a failed send resends the same payload.
//! - at-least-once: produces go straight to the nodes' gRPC API (not through the client
//!   library's retry loop): one RPC is one recorded attempt; a failed or indeterminate attempt
//!   is retried with the same sequence number and a new attempt number, at another node.
//!
//! Each producer serves the keys of its own partitions and keeps a few produces in flight,
//! for different keys. A key's next sequence number is sent only once the previous one is
//! acknowledged.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use junction_client::{AuthedChannel, Client, Start};
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::{Message, ProduceRequest};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Endpoint;

use crate::history::{Attempt, Observation, Outcome, PayloadId, encode_payload};
use crate::schedule::{SplitMix64, derive_seed};

/// Shared, append-only record of attempts and observations, timed from one origin.
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    /// Sends an idempotent producer acknowledged with the position of a copy stored by an
    /// earlier try (its retry after a lost reply was recognised).
    duplicate_answers: std::sync::atomic::AtomicU64,
    attempts: Mutex<Vec<Attempt>>,
    observations: Mutex<Vec<Observation>>,
}

impl Recorder {
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            duplicate_answers: std::sync::atomic::AtomicU64::new(0),
            attempts: Mutex::new(Vec::new()),
            observations: Mutex::new(Vec::new()),
        }
    }

    /// Milliseconds since the origin.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// How many acknowledgements were retries recognised as already stored.
    pub fn duplicate_answers(&self) -> u64 {
        self.duplicate_answers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn push(&self, a: Attempt) {
        self.attempts.lock().push(a);
    }

    fn observe(&self, o: Observation) {
        self.observations.lock().push(o);
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().clone()
    }

    pub fn observations(&self) -> Vec<Observation> {
        self.observations.lock().clone()
    }

    /// Whether partition `p` has an acknowledged produce that started at or after `since_ms`.
    pub fn acked_since(&self, p: u32, since_ms: u64) -> bool {
        // Attempts are recorded as they end, so the scan can stop well before `since_ms`.
        self.attempts
            .lock()
            .iter()
            .rev()
            .take_while(|a| a.end_ms + 1000 >= since_ms)
            .any(|a| {
                a.start_ms >= since_ms
                    && matches!(a.outcome, Outcome::Ok { partition, .. } if partition == p)
            })
    }

    /// The highest offset each partition's reader has seen.
    pub fn observed_ends(&self) -> std::collections::BTreeMap<u32, u64> {
        let mut m = std::collections::BTreeMap::new();
        for o in self.observations.lock().iter() {
            let e = m.entry(o.partition).or_insert(0);
            *e = (*e).max(o.offset + 1);
        }
        m
    }
}

/// What the workload runs against.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub station: String,
    pub partitions: u32,
    pub producers: u32,
    pub keys: u32,
    pub seed: u64,
    /// `(node id, http://host:port)` of every node.
    pub nodes: Vec<(u64, String)>,
    /// Client-side limit of one produce RPC; past it the attempt is indeterminate.
    pub rpc_timeout: Duration,
    /// Produces each producer keeps in flight (for different keys).
    pub inflight: u32,
    /// Each producer is an idempotent client-library producer (see [`SDK_RETRY_DEADLINE`]);
    /// otherwise one raw RPC per attempt.
    pub exactly_once: bool,
    /// TLS and credential of every connection.
    pub access: crate::access::Access,
}

/// How long the idempotent producers retry one message (through any fault the schedule
/// injects and its recovery) before reporting it indeterminate.
pub const SDK_RETRY_DEADLINE: Duration = Duration::from_secs(300);

/// The name of key `i`: `tenant-000`, `tenant-001`, ...
pub fn key_name(i: u32, keys: u32) -> String {
    let width = keys.saturating_sub(1).to_string().len().max(3);
    format!("tenant-{i:0width$}")
}

/// Splits the keys among the producers so that each producer serves the keys of its own
/// partitions: a partition that cannot take writes then stalls only its producers, and the
/// others keep measuring the rest of the cluster. With more producers than partitions, a
/// partition's keys are shared by several producers; with fewer, a producer serves several
/// partitions.
pub fn assign_keys(keys: u32, partitions: u32, producers: u32) -> Vec<Vec<u32>> {
    let producers = producers.max(1);
    let partitions = partitions.max(1);
    let mut out = vec![Vec::new(); producers as usize];
    let mut seen_in_partition = vec![0u32; partitions as usize];
    for k in 0..keys {
        let name = key_name(k, keys);
        let q = junction_types::partitioner::partition_for_key(name.as_bytes(), partitions);
        let j = seen_in_partition[q as usize];
        seen_in_partition[q as usize] += 1;
        let owner = if producers >= partitions {
            // Producers q, q + partitions, q + 2 * partitions, ... share partition q.
            let sharing: Vec<u32> = (q..producers).step_by(partitions as usize).collect();
            sharing[(j as usize) % sharing.len()]
        } else {
            q % producers
        };
        out[owner as usize].push(k);
    }
    out
}

/// How a produce RPC's failure is recorded.
pub fn classify(code: Code, message: &str) -> Outcome {
    match code {
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists => {
            Outcome::Failed {
                code: format!("{code:?}"),
                message: message.to_owned(),
            }
        }
        _ => Outcome::Indeterminate {
            reason: format!("{code:?}: {message}"),
        },
    }
}

/// Running producers and readers. Dropping it aborts them.
pub struct Workload {
    stop_producers: watch::Sender<bool>,
    stop_readers: watch::Sender<bool>,
    producers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

impl Workload {
    /// Starts `spec.producers` producers and one reader per partition.
    pub fn start(
        spec: &WorkloadSpec,
        recorder: Arc<Recorder>,
        reader_client: Client,
    ) -> Result<Workload, std::io::Error> {
        let mut channels = Vec::new();
        for (id, addr) in &spec.nodes {
            let ch = Endpoint::from_shared(addr.clone())
                .map_err(std::io::Error::other)?
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .initial_stream_window_size(junction_proto::HTTP2_STREAM_WINDOW)
                .initial_connection_window_size(junction_proto::HTTP2_CONNECTION_WINDOW);
            let client = spec.access.broker(ch).map_err(std::io::Error::other)?;
            channels.push((*id, client));
        }
        let channels = Arc::new(channels);
        let sdk = if spec.exactly_once {
            Some(
                Client::connect_with(
                    spec.nodes.iter().map(|(_, a)| a.clone()),
                    spec.access
                        .options()
                        .with_retry_deadline(SDK_RETRY_DEADLINE)
                        .with_connect_timeout(Duration::from_millis(500)),
                )
                .map_err(std::io::Error::other)?,
            )
        } else {
            None
        };
        let (stop_producers, _) = watch::channel(false);
        let (stop_readers, _) = watch::channel(false);
        let mut producers = Vec::new();
        for (p, keys) in assign_keys(spec.keys, spec.partitions, spec.producers)
            .into_iter()
            .enumerate()
        {
            let p = p as u32;
            if keys.is_empty() {
                continue;
            }
            let sink = match &sdk {
                Some(client) => Sink::Idempotent(client.producer(
                    &spec.station,
                    junction_client::ProducerOptions {
                        linger: Duration::from_millis(1),
                        ..Default::default()
                    },
                )),
                None => Sink::Raw(channels.clone()),
            };
            producers.push(tokio::spawn(produce_loop(
                p,
                keys,
                spec.clone(),
                sink,
                recorder.clone(),
                stop_producers.subscribe(),
            )));
        }
        let readers = (0..spec.partitions)
            .map(|p| {
                tokio::spawn(tail_loop(
                    p,
                    spec.station.clone(),
                    reader_client.clone(),
                    recorder.clone(),
                    stop_readers.subscribe(),
                ))
            })
            .collect();
        Ok(Workload {
            stop_producers,
            stop_readers,
            producers,
            readers,
        })
    }

    /// Stops the producers, letting in-flight attempts finish (each is bounded by the RPC
    /// timeout).
    pub async fn stop_producers(&mut self) {
        self.stop_producers.send_replace(true);
        for h in self.producers.drain(..) {
            let _ignored = h.await;
        }
    }

    pub async fn stop_readers(&mut self) {
        self.stop_readers.send_replace(true);
        for h in self.readers.drain(..) {
            let _ignored = h.await;
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for h in self.producers.iter().chain(&self.readers) {
            h.abort();
        }
    }
}

struct KeyState {
    name: String,
    index: u32,
    next_seq: u64,
    attempt: u32,
    /// The node (index into the channels) this key's next attempt goes to.
    target: usize,
    busy: bool,
    not_before: Instant,
}

/// Where a producer's attempts go.
#[derive(Clone)]
enum Sink {
    /// Raw RPCs to the nodes (at-least-once).
    Raw(Arc<Vec<(u64, BrokerClient<AuthedChannel>)>>),
    /// An idempotent producer.
    Idempotent(junction_client::Producer),
}

/// How one attempt is sent.
enum Send {
    Raw(Box<(BrokerClient<AuthedChannel>, ProduceRequest)>),
    Idempotent(junction_client::SendFuture),
}

/// One attempt, ready to run without borrowing the producer's state.
struct Shot {
    key: usize,
    id: PayloadId,
    node: u64,
    send: Send,
    /// When the attempt began: taken before the message is handed to the producer, which
    /// may send (and store) it before this attempt's future is first polled.
    start_ms: u64,
}

async fn shoot(shot: Shot, timeout: Duration, rec: Arc<Recorder>) -> (usize, Attempt) {
    let Shot {
        key,
        id,
        node,
        send,
        start_ms,
    } = shot;
    let (mut client, req) = match send {
        Send::Raw(raw) => *raw,
        Send::Idempotent(fut) => {
            let outcome = match fut.await {
                Ok(pos) => {
                    if pos.duplicate {
                        rec.duplicate_answers
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Outcome::Ok {
                        partition: pos.partition,
                        offset: pos.offset,
                    }
                }
                Err(e @ junction_client::ClientError::RetriesExhausted { .. }) => {
                    Outcome::Indeterminate {
                        reason: e.to_string(),
                    }
                }
                Err(e) => classify(e.code().unwrap_or(Code::Unknown), &e.to_string()),
            };
            return (key, attempt_of(id, node, start_ms, rec.now_ms(), outcome));
        }
    };
    let outcome = match tokio::time::timeout(timeout, client.produce(req)).await {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            match (resp.error, resp.positions.as_slice()) {
                (None, [pos]) => Outcome::Ok {
                    partition: pos.partition,
                    offset: pos.offset,
                },
                (Some(e), _) => classify(Code::from_i32(e.code), &e.message),
                (None, other) => Outcome::Indeterminate {
                    reason: format!("reply with {} positions for 1 message", other.len()),
                },
            }
        }
        Ok(Err(status)) => classify(status.code(), status.message()),
        Err(_) => Outcome::Indeterminate {
            reason: format!("no reply within {timeout:?}"),
        },
    };
    (key, attempt_of(id, node, start_ms, rec.now_ms(), outcome))
}

fn attempt_of(id: PayloadId, node: u64, start_ms: u64, end_ms: u64, outcome: Outcome) -> Attempt {
    Attempt {
        key: id.key,
        seq: id.seq,
        attempt: id.attempt,
        uid: id.uid,
        producer: 0,
        node,
        start_ms,
        end_ms,
        outcome,
    }
}

/// One producer: keeps up to `spec.inflight` produces in flight, each for a different key,
/// and never more than one per key.
async fn produce_loop(
    id: u32,
    keys: Vec<u32>,
    spec: WorkloadSpec,
    sink: Sink,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = SplitMix64::new(derive_seed(spec.seed, 0x50_0000 + u64::from(id)));
    let n = spec.nodes.len().max(1);
    let now = Instant::now();
    let mut state: Vec<KeyState> = keys
        .iter()
        .map(|&k| KeyState {
            name: key_name(k, spec.keys),
            index: k,
            next_seq: 0,
            attempt: 0,
            target: rng.below(n as u64) as usize,
            busy: false,
            not_before: now,
        })
        .collect();
    let mut inflight = FuturesUnordered::new();
    let mut stopped = *stop.borrow();
    loop {
        while !stopped && inflight.len() < spec.inflight.max(1) as usize {
            let now = Instant::now();
            let ready: Vec<usize> = (0..state.len())
                .filter(|&i| !state[i].busy && state[i].not_before <= now)
                .collect();
            if ready.is_empty() {
                break;
            }
            let ki = ready[rng.below(ready.len() as u64) as usize];
            let key = &mut state[ki];
            key.busy = true;
            // An idempotent producer's retry resends the same payload (one payload per seq).
            if !spec.exactly_once || key.attempt == 0 {
                key.attempt += 1;
            }
            let uid = derive_seed(
                spec.seed ^ derive_seed(u64::from(key.index), 0x71D),
                key.next_seq,
            );
            let id = PayloadId {
                key: key.name.clone(),
                seq: key.next_seq,
                attempt: key.attempt,
                uid,
            };
            let message = Message {
                key: Some(key.name.clone().into_bytes()),
                headers: Vec::new(),
                payload: encode_payload(&id).into(),
                partition: None,
                msg_id: None,
            };
            // Before the hand-off: an idempotent producer sends on its own task, possibly
            // before the attempt's future below first runs (a start taken there once made a
            // message stored before another's acknowledgement look started after it).
            let start_ms = rec.now_ms();
            let (node, send) = match &sink {
                Sink::Raw(channels) => {
                    let Some((node, client)) = channels.get(key.target % n).cloned() else {
                        return;
                    };
                    let req = ProduceRequest {
                        station: spec.station.clone(),
                        messages: vec![message],
                        request_id: 0,
                        producer: None,
                    };
                    (node, Send::Raw(Box::new((client, req))))
                }
                Sink::Idempotent(producer) => (0, Send::Idempotent(producer.send(message))),
            };
            let shot = Shot {
                key: ki,
                id,
                node,
                send,
                start_ms,
            };
            inflight.push(shoot(shot, spec.rpc_timeout, rec.clone()));
        }
        if stopped && inflight.is_empty() {
            if let Sink::Idempotent(producer) = sink {
                producer.close().await;
            }
            return;
        }
        tokio::select! {
            Some((ki, mut attempt)) = inflight.next(), if !inflight.is_empty() => {
                attempt.producer = id;
                let ok = attempt.outcome.is_ok();
                rec.push(attempt);
                let key = &mut state[ki];
                key.busy = false;
                if ok {
                    key.next_seq += 1;
                    key.attempt = 0;
                } else {
                    // Another node next time, after a short pause.
                    if n > 1 {
                        key.target = (key.target + 1 + rng.below(n as u64 - 1) as usize) % n;
                    }
                    key.not_before = Instant::now() + Duration::from_millis(rng.range(20, 200));
                }
            }
            _ = stop.changed(), if !stopped => stopped = true,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

async fn tail_loop(
    partition: u32,
    station: String,
    client: Client,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next: Option<u64> = None;
    while !*stop.borrow() {
        let start = next.map_or(Start::Earliest, Start::Offset);
        let mut stream = client.tail(&station, partition, start);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(m)) => {
                        next = Some(m.offset + 1);
                        rec.observe(Observation {
                            partition,
                            offset: m.offset,
                            payload: m.payload.to_vec(),
                            at_ms: rec.now_ms(),
                        });
                    }
                    // The client gave up on a long run of failures: open a new tail.
                    Some(Err(_)) | None => break,
                },
                _ = stop.changed() => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_zero_padded() {
        assert_eq!(key_name(0, 200), "tenant-000");
        assert_eq!(key_name(199, 200), "tenant-199");
        assert_eq!(key_name(7, 5000), "tenant-0007");
    }

    #[test]
    fn keys_are_split_by_partition() {
        use junction_types::partitioner::partition_for_key;
        let part = |k: u32| partition_for_key(key_name(k, 200).as_bytes(), 6);
        // More producers than partitions: each producer serves one partition.
        let a = assign_keys(200, 6, 8);
        assert_eq!(a.iter().map(Vec::len).sum::<usize>(), 200);
        for (i, keys) in a.iter().enumerate() {
            assert!(!keys.is_empty(), "producer {i} has no keys");
            assert!(
                keys.iter().all(|k| part(*k) == (i as u32) % 6),
                "producer {i}"
            );
        }
        // Fewer: each producer serves whole partitions.
        let b = assign_keys(200, 6, 4);
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 200);
        for (i, keys) in b.iter().enumerate() {
            assert!(keys.iter().all(|k| part(*k) % 4 == i as u32));
        }
        // Every key exactly once.
        let mut all: Vec<u32> = a.concat();
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn only_the_definite_codes_are_failures() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::AlreadyExists,
        ] {
            assert!(
                matches!(classify(code, "x"), Outcome::Failed { .. }),
                "{code:?}"
            );
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
            Code::ResourceExhausted,
        ] {
            assert!(
                matches!(classify(code, "x"), Outcome::Indeterminate { .. }),
                "{code:?}"
            );
        }
    }

    #[test]
    fn recorder_answers_progress_questions() {
        let rec = Recorder::new(Instant::now());
        rec.push(Attempt {
            key: "k".into(),
            seq: 0,
            attempt: 1,
            uid: 1,
            producer: 0,
            node: 1,
            start_ms: 50,
            end_ms: 60,
            outcome: Outcome::Ok {
                partition: 2,
                offset: 0,
            },
        });
        assert!(rec.acked_since(2, 50));
        assert!(!rec.acked_since(2, 51));
        assert!(!rec.acked_since(1, 0));
        rec.observe(Observation {
            partition: 2,
            offset: 4,
            payload: vec![],
            at_ms: 1,
        });
        assert_eq!(rec.observed_ends().get(&2), Some(&5));
    }
}
