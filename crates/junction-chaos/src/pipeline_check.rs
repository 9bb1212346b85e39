//! An effectively-once pipeline in the chaos workload: a [`junction_client::Pipeline`]
//! consumes the station under test as its own group while the faults run and copies every
//! message (same key, same payload) to an output station with a dedup window, acknowledging
//! each input once its copy is acknowledged. Faults make it see redeliveries, lost replies and
//! restarts. After the heal it drains, and the check is that the output holds each stored
//! input message exactly as many times as the input does — once, with idempotent producers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use junction_client::proto::{GroupSettings, StartPosition, group_settings};
use junction_client::{Client, GroupOptions, Message, PipelineOptions, Start};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::checker::{ReplicaRead, Violation, ViolationKind};

/// The station the pipeline writes to.
pub const OUTPUT: &str = "chaos-out";
/// The pipeline's consumer group.
pub const GROUP: &str = "chaos-pipeline";
/// The output station's dedup window: longer than any run.
pub const OUTPUT_DEDUP_WINDOW_MS: u64 = 6 * 60 * 60 * 1000;
/// Inputs completed at once.
const CONCURRENCY: usize = 256;

/// What the pipeline did and what the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStats {
    /// Inputs completed (output acknowledged, input acknowledged).
    pub completed: u64,
    /// Completions whose output had been stored by an earlier delivery (dropped by the
    /// dedup window).
    pub deduplicated: u64,
    /// Completions that failed (the input is delivered again).
    pub errors: u64,
    /// Times the pipeline was started again after its consumer stopped.
    pub restarts: u64,
    /// Messages in the output station, and the input messages it should mirror.
    pub output_messages: u64,
    pub input_messages: u64,
}

/// The running pipeline.
pub struct PipelineRunner {
    stats: Arc<Mutex<PipelineStats>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn options() -> PipelineOptions {
    PipelineOptions {
        group: GroupOptions {
            settings: GroupSettings {
                start: Some(group_settings::Start::Position(
                    StartPosition::Earliest as i32,
                )),
                ack_wait_ms: 5_000,
                max_deliveries: 1000,
                max_in_flight: 500,
                session_timeout_ms: 10_000,
                ..Default::default()
            },
            client: "junction chaos pipeline".to_owned(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The output of one input: a copy.
fn copy_of(m: &junction_client::GroupMessage) -> Message {
    Message {
        key: m.message.key.clone(),
        headers: vec![],
        payload: m.message.payload.clone(),
        partition: None,
        msg_id: None,
    }
}

impl PipelineRunner {
    /// Starts the pipeline from `input` to [`OUTPUT`] (which must exist with a dedup window),
    /// restarting it whenever its consumer stops.
    pub fn start(client: Client, input: String) -> Self {
        let stats: Arc<Mutex<PipelineStats>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let s = stats.clone();
        let task = tokio::spawn(async move {
            let mut first = true;
            while !*stopped.borrow() {
                if !first {
                    s.lock().restarts += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                first = false;
                let mut pipeline = match client.pipeline(&input, GROUP, OUTPUT, options()).await {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("chaos: starting the pipeline: {e}; retrying");
                        continue;
                    }
                };
                let completer = pipeline.completer();
                let mut running = FuturesUnordered::new();
                loop {
                    tokio::select! {
                        m = pipeline.recv(), if running.len() < CONCURRENCY => match m {
                            Some(m) => {
                                let c = completer.clone();
                                running.push(async move {
                                    c.complete(&m, vec![copy_of(&m)]).await
                                });
                            }
                            None => break,
                        },
                        Some(r) = running.next(), if !running.is_empty() => {
                            let mut st = s.lock();
                            match r {
                                Ok(positions) => {
                                    st.completed += 1;
                                    st.deduplicated += positions.iter().filter(|p| p.duplicate).count() as u64;
                                }
                                Err(_) => st.errors += 1,
                            }
                        }
                        _ = stopped.changed() => {
                            drop(running);
                            let _ = pipeline.close().await;
                            return;
                        }
                    }
                }
            }
        });
        Self { stats, stop, task }
    }

    /// Waits (up to `limit`) until the output holds as many messages as the input's
    /// reference replicas, stops the pipeline, reads the output and compares.
    pub async fn finish(
        self,
        client: &Client,
        input: &BTreeMap<u32, Vec<ReplicaRead>>,
        output_partitions: u32,
        limit: Duration,
    ) -> (PipelineStats, Vec<Violation>) {
        let expected = stored_payloads(input);
        let want: u64 = expected.values().sum();
        let deadline = Instant::now() + limit;
        loop {
            let have = output_size(client, output_partitions).await;
            if have >= want || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        let mut stats = self.stats.lock().clone();
        let mut got: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        let mut violations = Vec::new();
        for p in 0..output_partitions {
            match read_partition(client, p).await {
                Ok(payloads) => {
                    for payload in payloads {
                        *got.entry(payload).or_default() += 1;
                    }
                }
                Err(e) => violations.push(Violation::new(
                    ViolationKind::PipelineMismatch,
                    format!("cannot read partition {p} of {OUTPUT}: {e}"),
                )),
            }
        }
        stats.output_messages = got.values().sum();
        stats.input_messages = want;
        violations.extend(compare(&expected, &got));
        (stats, violations)
    }
}

/// Each payload stored in the input (from the first readable replica of each partition), with
/// its number of copies.
fn stored_payloads(input: &BTreeMap<u32, Vec<ReplicaRead>>) -> BTreeMap<Vec<u8>, u64> {
    let mut out = BTreeMap::new();
    for reads in input.values() {
        if let Some(r) = reads.iter().find_map(|r| r.result.as_ref().ok()) {
            for e in &r.entries {
                *out.entry(e.payload.clone()).or_default() += 1;
            }
        }
    }
    out
}

/// Output copies beyond the input's are duplicates; fewer are missing outputs.
pub fn compare(expected: &BTreeMap<Vec<u8>, u64>, got: &BTreeMap<Vec<u8>, u64>) -> Vec<Violation> {
    let mut v = Vec::new();
    for (payload, want) in expected {
        let have = got.get(payload).copied().unwrap_or(0);
        if have != *want {
            v.push(Violation::new(
                ViolationKind::PipelineMismatch,
                format!(
                    "input message {:?} is stored {want} time(s) in the input and {have} time(s) in {OUTPUT}",
                    crate::history::show_payload(payload)
                ),
            ));
        }
    }
    for (payload, have) in got {
        if !expected.contains_key(payload) {
            v.push(Violation::new(
                ViolationKind::PipelineMismatch,
                format!(
                    "{OUTPUT} holds {have} copies of {:?}, which is not in the input",
                    crate::history::show_payload(payload)
                ),
            ));
        }
    }
    v
}

async fn output_size(client: &Client, partitions: u32) -> u64 {
    let mut total = 0;
    for p in 0..partitions {
        if let Ok(r) = client.read(OUTPUT, p, Start::Latest, 1).await {
            total += r.high_watermark.saturating_sub(r.start_offset);
        }
    }
    total
}

async fn read_partition(
    client: &Client,
    p: u32,
) -> Result<Vec<Vec<u8>>, junction_client::ClientError> {
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let r = client.read(OUTPUT, p, Start::Offset(next), 1000).await?;
        if r.messages.is_empty() {
            return Ok(out);
        }
        next = r.next_offset;
        out.extend(r.messages.into_iter().map(|m| m.payload.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_must_mirror_the_input() {
        let expected = BTreeMap::from([(b"a".to_vec(), 1), (b"b".to_vec(), 1)]);
        assert!(compare(&expected, &expected).is_empty());
        let twice = BTreeMap::from([(b"a".to_vec(), 2), (b"b".to_vec(), 1)]);
        assert_eq!(compare(&expected, &twice).len(), 1);
        let missing = BTreeMap::from([(b"a".to_vec(), 1)]);
        assert_eq!(compare(&expected, &missing).len(), 1);
        let extra = BTreeMap::from([(b"a".to_vec(), 1), (b"b".to_vec(), 1), (b"c".to_vec(), 1)]);
        assert_eq!(compare(&expected, &extra).len(), 1);
    }
}
