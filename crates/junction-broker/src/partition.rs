//! One partition replica hosted on this node: its Raft group, the watch readers follow, and
//! the group-commit batcher that turns concurrent produce calls into few Raft entries.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use junction_raft::{PartitionRaft, PartitionShared};
use junction_types::{Command, CommandResponse, GroupId, NodeId, PartitionCommand, Record};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::BrokerError;
use crate::retention::{Admission, Pending};

/// Where an appended batch landed: its first offset and the timestamp it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub timestamp_ms: i64,
}

pub(crate) struct AppendRequest {
    pub(crate) records: Vec<Record>,
    pub(crate) bytes: usize,
    pub(crate) reply: oneshot::Sender<Result<Appended, BrokerError>>,
}

/// A partition replica on this node.
pub struct PartitionReplica {
    pub group: GroupId,
    pub raft: PartitionRaft,
    pub shared: Arc<PartitionShared>,
    pub(crate) appends: mpsc::Sender<AppendRequest>,
    /// The station's storage and retention policy, refreshed from the metadata.
    pub(crate) policy: Arc<parking_lot::RwLock<junction_types::StationPolicy>>,
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

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    raft: PartitionRaft,
    mut rx: mpsc::Receiver<AppendRequest>,
    limits: BatchLimits,
    admission: Admission,
) {
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
        let mut records = Vec::with_capacity(total);
        let mut waiters = Vec::with_capacity(reqs.len());
        for r in reqs {
            waiters.push((r.records.len() as u64, r.reply));
            records.extend(r.records);
        }
        metrics::histogram!("junction_produce_entry_records").record(total as f64);
        let cmd = Command::Partition(PartitionCommand::Append {
            timestamp_ms: now_ms(),
            records,
        });
        // The commit notification is not used, but its receiver must live until the entry
        // completes, or openraft logs a warning for every entry.
        let (responder, committed, complete) = ProgressResponder::new();
        if let Err(fatal) = raft.client_write_ff(cmd, Some(responder)).await {
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
            let result: Result<Appended, Failure> = match outcome {
                Ok(Ok(resp)) => match resp.data {
                    CommandResponse::Appended {
                        base_offset,
                        timestamp_ms,
                        ..
                    } => Ok(Appended {
                        base_offset,
                        timestamp_ms,
                    }),
                    other => Err(Failure::Unavailable(format!(
                        "unexpected append result {other:?}"
                    ))),
                },
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
            let mut offset = result.as_ref().map(|a| a.base_offset).unwrap_or(0);
            for (n, tx) in waiters {
                let r = match &result {
                    Ok(a) => Ok(Appended {
                        base_offset: offset,
                        timestamp_ms: a.timestamp_ms,
                    }),
                    Err(Failure::NotLeader(leader)) => Err(BrokerError::NotLeader {
                        node,
                        group,
                        leader: leader.clone(),
                    }),
                    Err(Failure::Unavailable(msg)) => Err(BrokerError::Unavailable(msg.clone())),
                };
                offset += n;
                let _gone = tx.send(r);
            }
        });
    }
}

/// Why a batch failed, in a form every waiter of the batch gets a copy of.
enum Failure {
    NotLeader(Option<(NodeId, String)>),
    Unavailable(String),
}
