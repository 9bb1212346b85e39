//! The I/O of scrubbing ([`crate::scrub`] decides): reading replicas, asking leaders for
//! their digests, wiping a corrupt replica and rejoining it, handing leadership over.

use std::time::Duration;

use junction_proto::peer::{NodeStatusRequest, ScrubDigestsRequest};
use junction_proto::v1::{NodeScrubReport, ReplicaScrubReport};
use junction_types::GroupId;

use crate::scrub::{Action, DIGEST_SPAN, Digester, Findings};
use crate::{Broker, BrokerError};

/// Records read from disk per step of a pass.
const STEP_RECORDS: usize = 4096;
/// Bytes read from disk per step of a pass.
const STEP_BYTES: usize = 8 << 20;
/// Corrupt offsets listed in a report.
const LISTED_OFFSETS: usize = 100;
/// How long one call to a leader may take.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// How long one node's pass may take when another node asked for it.
const NODE_PASS_LIMIT: Duration = Duration::from_secs(30 * 60);
/// Digest comparisons before differing ranges count as corruption: a follower that had not
/// yet applied a compaction or retention cut its leader had gets another look.
const COMPARISONS: usize = 3;

/// What reading a replica found: checksums, and digests of `[from, to)`.
struct Scan {
    records: u64,
    bytes: u64,
    corrupt: Vec<u64>,
    corrupt_count: u64,
    digests: Vec<u32>,
}

/// Hands every stored record of `group` in `[from, to)` to `visit` in offset order, reading
/// in steps and, with `bytes_per_sec`, pausing after each step to keep to that rate.
/// Blocking.
fn each_stored(
    store: &junction_storage::Store,
    group: GroupId,
    (from, to): (u64, u64),
    bytes_per_sec: u64,
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), BrokerError>,
) -> Result<(), BrokerError> {
    let mut at = from;
    while at < to {
        let step = store.read_messages(group, at, to, STEP_RECORDS, STEP_BYTES)?;
        let Some(last) = step.last().map(|(o, _)| *o) else {
            break;
        };
        let mut step_bytes = 0u64;
        for (offset, raw) in &step {
            step_bytes += raw.len() as u64;
            visit(*offset, raw)?;
        }
        at = last + 1;
        std::thread::sleep(crate::scrub::pace(step_bytes, bytes_per_sec));
    }
    Ok(())
}

/// Reads every record of `group` in `[start, next)` from `store`, checking each checksum and
/// digesting `[from, to)`. Blocking.
fn scan(
    store: &junction_storage::Store,
    group: GroupId,
    local: (u64, u64),
    (from, to): (u64, u64),
    bytes_per_sec: u64,
) -> Result<Scan, BrokerError> {
    let mut digester = Digester::new(from, to, DIGEST_SPAN);
    let mut out = Scan {
        records: 0,
        bytes: 0,
        corrupt: Vec::new(),
        corrupt_count: 0,
        digests: Vec::new(),
    };
    each_stored(store, group, local, bytes_per_sec, |offset, raw| {
        out.records += 1;
        out.bytes += raw.len() as u64;
        match junction_raft::format::check_record(raw) {
            Ok(body) => digester.add(offset, body),
            Err(_) => {
                out.corrupt_count += 1;
                if out.corrupt.len() < LISTED_OFFSETS {
                    out.corrupt.push(offset);
                }
                // A corrupt record still marks its range as differing.
                digester.add(offset, raw);
            }
        }
        Ok(())
    })?;
    out.digests = digester.finish();
    Ok(out)
}

impl Broker {
    /// The digests of `group`'s records in `[from, to)` (ranges of `span` offsets), as this
    /// replica holds them, and its applied log index. Refused when this replica does not
    /// hold the whole range or holds a corrupt record in it. Blocking.
    pub fn scrub_digests(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        span: u64,
    ) -> Result<(Vec<u32>, u64), BrokerError> {
        let replica = self.partition(group).ok_or(BrokerError::NotHosted {
            node: self.node_id(),
            group,
        })?;
        let applied = replica.applied_index();
        let state = replica.shared.current();
        if from < state.start_offset || to > state.next_offset {
            return Err(BrokerError::InvalidArgument(format!(
                "group {group} holds offsets [{}, {}) here, not all of [{from}, {to})",
                state.start_offset, state.next_offset
            )));
        }
        let mut digester = Digester::new(from, to, span);
        each_stored(&replica.store, group, (from, to), 0, |offset, raw| {
            let body = junction_raft::format::check_record(raw).map_err(|e| {
                BrokerError::CorruptRecord {
                    node: self.node_id(),
                    partition: self
                        .metadata()
                        .partition_of_group(group)
                        .map_or(0, |(_, p)| p),
                    offset,
                    detail: e.to_string(),
                }
            })?;
            digester.add(offset, body);
            Ok(())
        })?;
        Ok((digester.finish(), applied))
    }

    /// Background passes, one every [`crate::scrub::ScrubTuning::every`] after the last.
    pub(crate) async fn scrub_loop(&self) {
        let tuning = self.cfg.scrub;
        let Some(every) = tuning.every else {
            return;
        };
        let shutdown = self.shutdown_token();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let report = tokio::select! {
                r = self.scrub_node_at(tuning.bytes_per_sec) => r,
                () = shutdown.cancelled() => return,
            };
            let records: u64 = report.replicas.iter().map(|r| r.records).sum();
            let corrupt: u64 = report
                .replicas
                .iter()
                .filter(|r| r.corrupt_records > 0 || r.mismatched_ranges > 0)
                .count() as u64;
            tracing::info!(
                replicas = report.replicas.len(),
                records,
                corrupt_replicas = corrupt,
                "background scrub pass done"
            );
        }
    }

    /// A read found a corrupt record in this node's replica of `group`: scrub that replica
    /// now (once at a time), which wipes and re-fetches it when it follows.
    pub fn corruption_found(self: &std::sync::Arc<Self>, group: GroupId) {
        if !self.scrubbing.lock().insert(group) {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            let shutdown = broker.shutdown_token();
            tokio::select! {
                report = broker.scrub_replica(group) => {
                    tracing::warn!(group, action = %report.action, corrupt = report.corrupt_records, "scrubbed a replica after a corrupt read");
                }
                () = shutdown.cancelled() => {}
            }
            broker.scrubbing.lock().remove(&group);
        });
    }

    /// Runs one scrub pass on every node at once (this one directly, the others through
    /// their peer service); a node that cannot be asked gets a report with its error.
    pub async fn scrub_cluster(&self) -> Vec<NodeScrubReport> {
        let calls = self.node_addrs().into_iter().map(|(id, addr)| async move {
            if id == self.node_id() {
                return self.scrub_node().await;
            }
            let failed = |error: String| NodeScrubReport {
                node: id,
                replicas: Vec::new(),
                error,
            };
            let mut client = match self.pool.client(&addr) {
                Ok(c) => c,
                Err(e) => return failed(e.to_string()),
            };
            match tokio::time::timeout(
                NODE_PASS_LIMIT,
                client.scrub_node(junction_proto::peer::ScrubNodeRequest {}),
            )
            .await
            {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => failed(s.message().to_owned()),
                Err(_) => failed(format!("no report within {} s", NODE_PASS_LIMIT.as_secs())),
            }
        });
        futures::future::join_all(calls).await
    }

    /// Runs one scrub pass over every partition replica on this node (one at a time) and
    /// acts on what it finds.
    pub async fn scrub_node(&self) -> NodeScrubReport {
        self.scrub_node_at(0).await
    }

    /// [`Broker::scrub_node`], reading at most `bytes_per_sec` (0: no limit).
    async fn scrub_node_at(&self, bytes_per_sec: u64) -> NodeScrubReport {
        let mut groups: Vec<GroupId> = self.partitions.read().keys().copied().collect();
        groups.sort_unstable();
        let mut replicas = Vec::with_capacity(groups.len());
        for group in groups {
            replicas.push(self.scrub_replica_at(group, bytes_per_sec).await);
        }
        NodeScrubReport {
            node: self.node_id(),
            replicas,
            error: String::new(),
        }
    }

    /// Scrubs one replica: checksums, digests against the leader, then the decided action.
    pub async fn scrub_replica(&self, group: GroupId) -> ReplicaScrubReport {
        self.scrub_replica_at(group, 0).await
    }

    async fn scrub_replica_at(&self, group: GroupId, bytes_per_sec: u64) -> ReplicaScrubReport {
        let meta = self.metadata();
        let (station, partition) = meta
            .partition_of_group(group)
            .map(|(s, p)| (s.full_name(), p))
            .unwrap_or_default();
        let mut report = ReplicaScrubReport {
            group,
            station,
            partition,
            action: "skipped".into(),
            ..Default::default()
        };
        match self.inspect(group, bytes_per_sec, &mut report).await {
            Ok(findings) => {
                report.action = self.act(group, findings).await;
            }
            Err(e) => report.error = e.to_string(),
        }
        report
    }

    /// Reads the replica and compares it with its leader; fills the counts of `report`.
    async fn inspect(
        &self,
        group: GroupId,
        bytes_per_sec: u64,
        report: &mut ReplicaScrubReport,
    ) -> Result<Findings, BrokerError> {
        let mut findings = Findings::default();
        for attempt in 0..COMPARISONS {
            let replica = self.partition(group).ok_or(BrokerError::NotHosted {
                node: self.node_id(),
                group,
            })?;
            let local_applied = replica.applied_index();
            let state = replica.shared.current();
            let local = (state.start_offset, state.next_offset);
            let leader = replica.leader();
            // What to compare with: the leader's range and digests, unless this replica leads.
            let theirs = match leader {
                Some(l) if l != self.node_id() => self.leader_range(group, l).await?,
                _ => None,
            };
            let common = theirs
                .as_ref()
                .and_then(|(_, range)| crate::scrub::common_range(local, *range))
                .unwrap_or((local.1, local.1));
            let store = replica.store.clone();
            let scan = tokio::task::spawn_blocking(move || {
                scan(&store, group, local, common, bytes_per_sec)
            })
            .await
            .map_err(|e| BrokerError::Unavailable(format!("scrub task failed: {e}")))??;
            report.records = scan.records;
            report.bytes = scan.bytes;
            report.corrupt_offsets.clone_from(&scan.corrupt);
            report.corrupt_records = scan.corrupt_count;
            findings.corrupt_records = scan.corrupt_count;
            findings.mismatched_ranges = 0;
            report.mismatched_ranges = 0;
            let Some((addr, _)) = theirs.filter(|_| common.0 < common.1) else {
                break;
            };
            let (digests, leader_applied) = self.leader_digests(&addr, group, common).await?;
            let mismatched = crate::scrub::mismatched(&scan.digests, &digests);
            if mismatched == 0 || scan.corrupt_count > 0 {
                break;
            }
            // Ranges differ. Only a replica that had applied everything its leader had when
            // the leader digested is judged by them: one that lags may just not have applied
            // a compaction or a retention cut yet. Let it catch up and look again.
            if local_applied >= leader_applied {
                findings.mismatched_ranges = mismatched;
                report.mismatched_ranges = mismatched;
                if attempt + 1 == COMPARISONS {
                    break;
                }
            } else if attempt + 1 == COMPARISONS {
                report.error = format!(
                    "{mismatched} ranges differ from the leader's, but this replica (applied \
                     {local_applied}) trails the leader's digest (applied {leader_applied}); \
                     not judged"
                );
                break;
            }
            self.wait_applied(group, leader_applied, Duration::from_secs(10))
                .await;
        }
        if findings.corrupt() {
            metrics::counter!("junction_corruption_events_total", "kind" => if findings.corrupt_records > 0 { "checksum" } else { "digest" })
                .increment(1);
            tracing::error!(
                group,
                corrupt_records = findings.corrupt_records,
                mismatched_ranges = findings.mismatched_ranges,
                offsets = ?report.corrupt_offsets,
                "scrub found corrupt data in a partition replica"
            );
        }
        Ok(findings)
    }

    /// The leader's client address and `[start, next)` of `group`, from its status.
    async fn leader_range(
        &self,
        group: GroupId,
        leader: junction_types::NodeId,
    ) -> Result<Option<(String, (u64, u64))>, BrokerError> {
        let Some(addr) = self.node_addrs().get(&leader).cloned() else {
            return Ok(None);
        };
        let mut client = self
            .pool
            .client(&addr)
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let status = tokio::time::timeout(CALL_LIMIT, client.node_status(NodeStatusRequest {}))
            .await
            .map_err(|_| BrokerError::Unavailable(format!("leader {leader} did not answer")))?
            .map_err(|s| BrokerError::Unavailable(format!("leader {leader}: {}", s.message())))?
            .into_inner();
        Ok(status
            .groups
            .into_iter()
            .find(|g| g.group == group)
            .map(|g| (addr, (g.start_offset, g.next_offset))))
    }

    async fn leader_digests(
        &self,
        addr: &str,
        group: GroupId,
        (from, to): (u64, u64),
    ) -> Result<(Vec<u32>, u64), BrokerError> {
        let mut client = self
            .pool
            .client(addr)
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let req = ScrubDigestsRequest {
            group,
            from,
            to,
            span: DIGEST_SPAN,
        };
        let reply = tokio::time::timeout(CALL_LIMIT, client.scrub_digests(req))
            .await
            .map_err(|_| BrokerError::Unavailable(format!("the leader at {addr} did not answer")))?
            .map_err(|s| {
                BrokerError::Unavailable(format!("the leader at {addr}: {}", s.message()))
            })?
            .into_inner();
        if !reply.error.is_empty() {
            return Err(BrokerError::Unavailable(format!(
                "the leader at {addr} could not digest [{from}, {to}): {}",
                reply.error
            )));
        }
        Ok((reply.digests, reply.applied_index))
    }

    /// Waits (at most `limit`) until this replica of `group` applied `index`.
    async fn wait_applied(&self, group: GroupId, index: u64, limit: Duration) {
        if let Some(r) = self.partition(group) {
            // A timeout only means the next look judges nothing (see `inspect`).
            let _ = r
                .raft
                .wait(Some(limit))
                .applied_index_at_least(Some(index), "scrub: catch up with the leader")
                .await;
        }
    }

    /// Acts on a pass's findings; returns the report's action.
    async fn act(&self, group: GroupId, findings: Findings) -> String {
        let Some(replica) = self.partition(group) else {
            return "skipped".into();
        };
        let voters = replica.voters();
        let leads = replica.leader() == Some(self.node_id());
        match crate::scrub::decide(findings, self.node_id(), leads, &voters, group) {
            Action::Healthy => "ok".into(),
            Action::Stuck => "stuck".into(),
            Action::HandOver(to) => {
                replica.quiet.wake();
                if let Err(e) = replica.raft.trigger().transfer_leader(to).await {
                    tracing::warn!(group, to, error = %e, "handing leadership over failed");
                }
                "handing-over".into()
            }
            Action::Repair => match self.rejoin_replica(group).await {
                Ok(()) => {
                    metrics::counter!("junction_replica_repairs_total").increment(1);
                    "repairing".into()
                }
                Err(e) => {
                    tracing::error!(group, error = %e, "repairing a corrupt replica failed");
                    format!("repair failed: {e}")
                }
            },
        }
    }

    /// Wipes this node's replica of `group` and starts it again empty: the leader sends it
    /// the group's log or a snapshot. Until it holds what the other members had applied, it
    /// does not vote there (a vote floor, kept across restarts).
    pub async fn rejoin_replica(&self, group: GroupId) -> Result<(), BrokerError> {
        let _serial = self.reconcile_lock.lock().await;
        let replicas = self
            .metadata()
            .groups_of(self.node_id())
            .remove(&group)
            .ok_or(BrokerError::NotHosted {
                node: self.node_id(),
                group,
            })?;
        self.wipe_and_reopen(group, &replicas).await
    }

    /// [`Broker::rejoin_replica`] for a caller that holds the reconcile lock.
    pub(crate) async fn wipe_and_reopen(
        &self,
        group: GroupId,
        replicas: &[junction_types::NodeId],
    ) -> Result<(), BrokerError> {
        let floor = self
            .members_applied(group)
            .await
            .max(self.partition(group).map_or(0, |r| r.applied_index()));
        {
            let mut floors = self.vote_floors.write();
            floors.raise(group, floor);
            self.store.set_rejoin_floors(&floors.encode())?;
        }
        tracing::warn!(
            group,
            floor,
            "wiping a corrupt partition replica; it catches up from the leader"
        );
        let store = self
            .partition(group)
            .map_or_else(|| self.store.clone(), |r| r.store.clone());
        self.close_partition(group, false).await;
        // The replica's vote survives the wipe: a replica that forgot whom it voted for
        // could vote twice in one term and let two leaders be elected.
        let vote = store.get_tag(
            junction_storage::keys::CF_RAFT_META,
            group,
            junction_storage::keys::raft_tag::VOTE,
        )?;
        let wiped = store.clone();
        tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
            wiped.delete_group(group)?;
            wiped.reinstate_group(group);
            if let Some(vote) = vote {
                let mut b = wiped.batch();
                b.put_tag(
                    junction_storage::keys::CF_RAFT_META,
                    group,
                    junction_storage::keys::raft_tag::VOTE,
                    &vote,
                )?;
                wiped.write_sync(b)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("wiping group {group} failed: {e}")))??;
        self.open_partition(group, replicas).await
    }

    /// The highest index of `group` the other members say they applied (0 when none
    /// answers).
    async fn members_applied(&self, group: GroupId) -> u64 {
        self.probe_members()
            .await
            .iter()
            .filter_map(|a| a.applied.get(&group).copied())
            .max()
            .unwrap_or(0)
    }
}
