//! One partition replica hosted on this node: its Raft group, the watch readers follow, and
//! the group-commit batcher that turns concurrent produce calls into few Raft entries.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use junction_raft::{PartitionRaft, PartitionShared};
use junction_types::command::{AppendBatch, BatchOutcome, SpannedBatch};
use junction_types::exactly_once::{AppendReject, DeliveryPolicy, Placement, ProducerBatch};
use junction_types::{
    Command, CommandResponse, GroupId, NodeId, PartitionCommand, Record, format_level,
};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::BrokerError;
use crate::retention::{Admission, Pending};

/// Where an appended batch landed: its first offset and the timestamp it was given; records
/// not stored because they were duplicates are listed with the offset of their first copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub timestamp_ms: i64,
    /// (index in the batch, offset of the first copy) of records dropped as duplicates of a
    /// stored message id.
    pub dups: Vec<(u32, u64)>,
    /// The whole batch was a retry of a batch the producer had stored: nothing was appended,
    /// these are the original positions.
    pub duplicate: bool,
}

impl Appended {
    /// Each of the batch's `count` records' offset, and whether it was a duplicate.
    pub fn positions(&self, count: u32) -> Vec<(u64, bool)> {
        let placement = Placement {
            base_offset: self.base_offset,
            timestamp_ms: self.timestamp_ms,
            dups: self.dups.clone(),
        };
        placement
            .positions(count)
            .into_iter()
            .map(|(o, d)| (o, d || self.duplicate))
            .collect()
    }
}

pub(crate) struct AppendRequest {
    pub(crate) records: Vec<Record>,
    /// Set by idempotent producers.
    pub(crate) producer: Option<ProducerBatch>,
    /// The producer sequence numbers the request covers (more than `records` when some were
    /// dead-lettered before it got here).
    pub(crate) sequence_span: u32,
    pub(crate) bytes: usize,
    pub(crate) reply: oneshot::Sender<Result<Appended, BrokerError>>,
}

/// A partition replica on this node.
pub struct PartitionReplica {
    pub group: GroupId,
    pub raft: PartitionRaft,
    /// Whether the group is quiescent here; woken before every write (see [`crate::quiet`]).
    pub quiet: Arc<crate::quiet::Quiet>,
    pub shared: Arc<PartitionShared>,
    pub(crate) appends: mpsc::Sender<AppendRequest>,
    /// The station's storage and retention policy, refreshed from the metadata.
    pub(crate) policy: Arc<parking_lot::RwLock<junction_types::StationPolicy>>,
    /// The station's exactly-once settings, refreshed from the metadata.
    pub(crate) delivery: Arc<parking_lot::RwLock<DeliveryPolicy>>,
    /// Where this replica's log and messages live: the node's disk store, or its memory
    /// store for memory stations.
    pub store: junction_storage::Store,
}

impl PartitionReplica {
    /// Returns the leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        // Copy out of the watch at once: holding the borrow would block the Raft core.
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Returns the group's voters as this replica knows them.
    pub fn voters(&self) -> Vec<NodeId> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Returns the index of the last log entry this replica applied (0: none).
    pub fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow_watched()
            .last_applied
            .as_ref()
            .map_or(0, |l| l.index)
    }

    /// Returns the current term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }
}

/// Batching limits of the group-commit loop.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Raft entries of one partition in flight at once; more requests wait and are merged.
    pub max_in_flight: usize,
    /// Bytes of records merged into one entry.
    pub max_entry_bytes: usize,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the group-commit loop reads as it makes each entry: the station's exactly-once
/// settings, and the metadata (for the cluster's format level).
pub(crate) struct EntrySettings {
    pub delivery: Arc<parking_lot::RwLock<DeliveryPolicy>>,
    pub meta: Arc<junction_raft::MetaShared>,
}

/// Runs the group-commit loop of one partition until its queue closes.
///
/// A permit is taken before reading the queue, so while `max_in_flight` entries are being
/// replicated, new requests pile up in the queue and all go into the next entry together:
/// the busier the partition, the bigger its entries. Entries are submitted in queue order
/// from this one task, so the log order is the arrival order.
pub(crate) async fn run_batcher(
    node: NodeId,
    group: GroupId,
    quiet: Arc<crate::quiet::Quiet>,
    mut rx: mpsc::Receiver<AppendRequest>,
    limits: BatchLimits,
    admission: Admission,
    settings: EntrySettings,
) {
    let EntrySettings { delivery, meta } = settings;
    let raft = quiet.raft().clone();
    let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let pending = Arc::new(parking_lot::Mutex::new(Pending::default()));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut bytes = first.bytes;
        let mut reqs = vec![first];
        while bytes < limits.max_entry_bytes {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.bytes;
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        // discard=new: refuse what does not fit, counting what is accepted but not applied.
        let mut reserved = Pending::default();
        if let Some(lim) = admission.limits() {
            match admission.used(&lim) {
                Ok(mut used) => {
                    let inflight = *pending.lock();
                    used.messages += inflight.messages;
                    used.bytes += inflight.bytes;
                    used.memory += inflight.bytes;
                    let mut kept = Vec::with_capacity(reqs.len());
                    for r in reqs {
                        match Admission::check(&lim, &used, &r.records) {
                            Ok((n, b)) => {
                                used.messages += n;
                                used.bytes += b;
                                used.memory += b;
                                reserved.messages += n;
                                reserved.bytes += b;
                                kept.push(r);
                            }
                            Err(e) => {
                                let _gone = r.reply.send(Err(e));
                            }
                        }
                    }
                    reqs = kept;
                }
                Err(e) => {
                    for r in reqs {
                        let _gone = r.reply.send(Err(BrokerError::Unavailable(format!(
                            "cannot check the partition's limits: {e}"
                        ))));
                    }
                    continue;
                }
            }
            if reqs.is_empty() {
                continue;
            }
            let mut p = pending.lock();
            p.messages += reserved.messages;
            p.bytes += reserved.bytes;
        }
        let total: usize = reqs.iter().map(|r| r.records.len()).sum();
        metrics::histogram!("junction_produce_entry_records").record(total as f64);
        let delivery = *delivery.read();
        // Without producers or a dedup window, the plain entry (cheaper to apply).
        let exactly_once =
            delivery.dedup_window_ms.is_some() || reqs.iter().any(|r| r.producer.is_some());
        let mut waiters = Vec::with_capacity(reqs.len());
        let spanned = reqs
            .iter()
            .any(|r| r.producer.is_some() && r.sequence_span as usize != r.records.len());
        let cmd = if spanned {
            let mut batches = Vec::with_capacity(reqs.len());
            for r in reqs {
                waiters.push((r.records.len() as u64, r.reply));
                batches.push(SpannedBatch {
                    sequence_span: r.sequence_span,
                    batch: AppendBatch {
                        producer: r.producer,
                        records: r.records,
                    },
                });
            }
            PartitionCommand::AppendSpanned {
                timestamp_ms: now_ms(),
                delivery,
                batches,
            }
        } else if exactly_once {
            let mut batches = Vec::with_capacity(reqs.len());
            for r in reqs {
                waiters.push((r.records.len() as u64, r.reply));
                batches.push(AppendBatch {
                    producer: r.producer,
                    records: r.records,
                });
            }
            PartitionCommand::AppendBatches {
                timestamp_ms: now_ms(),
                delivery,
                batches,
            }
        } else {
            let mut records = Vec::with_capacity(total);
            for r in reqs {
                waiters.push((r.records.len() as u64, r.reply));
                records.extend(r.records);
            }
            PartitionCommand::Append {
                timestamp_ms: now_ms(),
                records,
            }
        };
        // Once every member reads them, appends carry this leader's checksum of their
        // messages (see `junction_types::format_level`).
        let cmd = if meta.current().format_level >= format_level::CHECKED_APPENDS {
            cmd.checked()
        } else {
            cmd
        };
        // The commit notification is not used, but its receiver must live until the entry
        // completes, or openraft logs a warning for every entry.
        let (responder, committed, complete) = ProgressResponder::new();
        quiet.ready_to_write().await;
        if let Err(fatal) = raft
            .client_write_ff(Command::Partition(cmd), Some(responder))
            .await
        {
            let msg = format!("partition group {group} stopped: {fatal}");
            for (_, tx) in waiters {
                let _gone = tx.send(Err(BrokerError::Unavailable(msg.clone())));
            }
            return;
        }
        let pending2 = pending.clone();
        tokio::spawn(async move {
            let outcome = complete.await;
            drop(committed);
            drop(permit);
            {
                // Applied (or failed) now: the applied state counts it from here on.
                let mut p = pending2.lock();
                p.messages = p.messages.saturating_sub(reserved.messages);
                p.bytes = p.bytes.saturating_sub(reserved.bytes);
            }
            let result: Result<CommandResponse, Failure> = match outcome {
                Ok(Ok(resp)) => Ok(resp.data),
                Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(Failure::NotLeader(
                    f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                )),
                Ok(Err(other)) => Err(Failure::Unavailable(format!(
                    "append not committed: {other}"
                ))),
                Err(_) => Err(Failure::Unavailable(
                    "the partition stopped before the append completed; its outcome is unknown"
                        .into(),
                )),
            };
            let failed = |f: &Failure| match f {
                Failure::NotLeader(leader) => BrokerError::NotLeader {
                    node,
                    group,
                    leader: leader.clone(),
                },
                Failure::Unavailable(msg) => BrokerError::Unavailable(msg.clone()),
            };
            match result {
                Ok(CommandResponse::Appended {
                    base_offset,
                    timestamp_ms,
                    ..
                }) => {
                    let mut offset = base_offset;
                    for (n, tx) in waiters {
                        let _gone = tx.send(Ok(Appended {
                            base_offset: offset,
                            timestamp_ms,
                            dups: vec![],
                            duplicate: false,
                        }));
                        offset += n;
                    }
                }
                Ok(CommandResponse::Batches(outcomes)) if outcomes.len() == waiters.len() => {
                    for ((_, tx), outcome) in waiters.into_iter().zip(outcomes) {
                        let _gone = tx.send(outcome_of(outcome));
                    }
                }
                Ok(other) => {
                    let e = Failure::Unavailable(format!("unexpected append result {other:?}"));
                    for (_, tx) in waiters {
                        let _gone = tx.send(Err(failed(&e)));
                    }
                }
                Err(e) => {
                    for (_, tx) in waiters {
                        let _gone = tx.send(Err(failed(&e)));
                    }
                }
            }
        });
    }
}

fn outcome_of(outcome: Result<BatchOutcome, AppendReject>) -> Result<Appended, BrokerError> {
    match outcome {
        Ok(o) => {
            if o.duplicate {
                metrics::counter!("junction_produce_duplicate_batches_total").increment(1);
            }
            Ok(Appended {
                base_offset: o.placement.base_offset,
                timestamp_ms: o.placement.timestamp_ms,
                dups: o.placement.dups,
                duplicate: o.duplicate,
            })
        }
        Err(r) => Err(BrokerError::Produce(r)),
    }
}

/// Why a batch failed, in a form every waiter of the batch gets a copy of.
enum Failure {
    NotLeader(Option<(NodeId, String)>),
    Unavailable(String),
}
