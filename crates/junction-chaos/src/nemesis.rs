//! Runs the faults of the schedule against the cluster: inject, hold, heal, and record what
//! was actually done (leaders resolved, faults skipped and why, recovery of killed leaders).

use std::collections::BTreeMap;
use std::time::Duration;

use junction_proto::peer::NodeStatusRequest;
use junction_proto::peer::peer_client::PeerClient;
use junction_raft::PeerChannel;
use junction_types::META_GROUP;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::cluster::{Cluster, leaders_of};
use crate::history::{Election, FaultRecord, LeaderKill};
use crate::proxy::LinkMode;
use crate::schedule::{Action, PlannedFault};

/// How long a restarted node may take to answer again.
const REJOIN_LIMIT: Duration = Duration::from_secs(30);
/// How long an election monitor watches for a new leader.
const ELECTION_LIMIT: Duration = Duration::from_secs(30);
/// What a node logs when a failed write poisons its store (junction-storage).
const POISON_LOG: &str = "the store is now poisoned";
/// What a node logs when a scrub finds a corrupt replica, when a read meets a corrupt
/// record, and when it wipes a replica to fetch it again (junction-broker, junction-server).
const SCRUB_FOUND_LOG: &str = "scrub found corrupt data";
const CORRUPT_READ_LOG: &str = "failed its checksum";
const CORRUPT_OPEN_LOG: &str = "its stored data is corrupt";
const REPAIR_LOG: &str = "wiping a corrupt partition replica";
/// What a node with empty state logs when it rejoins its members' cluster, and when it
/// initialises a new one (junction-broker).
const REJOIN_LOG: &str = "rejoining it as an empty replica";
const NEW_CLUSTER_LOG: &str = "initialising a new cluster";
/// How long a node with a poisoned store may take to stop.
const POISON_EXIT_LIMIT: Duration = Duration::from_secs(20);

/// What node `id` logged since `mark`, once `done` holds for it or `limit` has passed.
async fn wait_for_log(
    cluster: &Cluster,
    id: u64,
    mark: u64,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let log = cluster.log_since(id, mark);
        if done(&log) || Instant::now() >= deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An exit of a node that no fault asked for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Crash {
    pub node: u64,
    pub at_ms: u64,
    pub status: String,
    pub log_tail: String,
}

/// Executes faults; owns the background election monitors.
pub struct Nemesis {
    origin: Instant,
    /// Partition index → Raft group.
    partition_groups: Vec<u64>,
    monitors: Vec<(usize, JoinHandle<Vec<Election>>)>,
    pub crashes: Vec<Crash>,
}

impl Nemesis {
    pub fn new(origin: Instant, partition_groups: Vec<u64>) -> Self {
        Self {
            origin,
            partition_groups,
            monitors: Vec::new(),
            crashes: Vec::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn partition_of(&self, group: u64) -> Option<u32> {
        self.partition_groups
            .iter()
            .position(|g| *g == group)
            .map(|p| p as u32)
    }

    /// Notes nodes that died on their own and starts them again.
    pub async fn revive_crashed(&mut self, cluster: &mut Cluster) {
        for (node, status) in cluster.take_crashes() {
            let crash = Crash {
                node,
                at_ms: self.now_ms(),
                status,
                log_tail: cluster.log_tail(node, 40),
            };
            eprintln!(
                "chaos: !!! node {node} exited on its own ({}); last log lines:\n{}",
                crash.status, crash.log_tail
            );
            self.crashes.push(crash);
        }
        for id in cluster.ids() {
            if !cluster.is_running(id) {
                let _ignored = cluster.start_node(id);
            }
        }
    }

    /// Injects one fault, holds it, heals it.
    pub async fn execute(&mut self, cluster: &mut Cluster, f: &PlannedFault) -> FaultRecord {
        let hold = Duration::from_millis(f.hold_ms);
        let mut rec = FaultRecord {
            index: f.index,
            kind: f.action.kind(),
            description: f.action.to_string(),
            start_ms: self.now_ms(),
            end_ms: 0,
            nodes: Vec::new(),
            skipped: None,
            leader_kill: None,
            notes: Vec::new(),
            outcome: None,
        };
        let n = cluster.ids().len() as u64;
        match &f.action {
            Action::Kill { node } => self.kill_and_restart(cluster, *node, hold, &mut rec).await,
            Action::KillPartitionLeader { partition } => {
                let group = self.partition_groups.get(*partition as usize).copied();
                self.kill_leader_of(cluster, group, hold, &mut rec).await;
            }
            Action::KillMetaLeader => {
                self.kill_leader_of(cluster, Some(META_GROUP), hold, &mut rec)
                    .await;
            }
            Action::Pause { node } => {
                rec.nodes.push(*node);
                match cluster.pause(*node) {
                    Ok(true) => {
                        tokio::time::sleep(hold).await;
                        let _ignored = cluster.resume(*node);
                    }
                    _ => rec.skipped = Some(format!("node {node} was not running")),
                }
            }
            Action::Isolate { mode, .. }
            | Action::Split { mode, .. }
            | Action::OneWay { mode, .. }
            | Action::Bridge { mode, .. } => {
                for (a, b) in f.action.blocked_links(n) {
                    cluster.set_link(a, b, LinkMode::Blocked { how: *mode });
                }
                rec.nodes = affected(&f.action);
                tokio::time::sleep(hold).await;
                cluster.heal_links();
            }
            Action::Latency {
                node,
                delay_ms,
                jitter_ms,
            } => {
                rec.nodes.push(*node);
                cluster.set_links_of(
                    *node,
                    LinkMode::Delay {
                        delay_ms: *delay_ms,
                        jitter_ms: *jitter_ms,
                    },
                );
                tokio::time::sleep(hold).await;
                cluster.heal_links();
            }
            Action::Loss {
                node,
                stall_per_mille,
                stall_ms,
                reset_per_10k,
            } => {
                rec.nodes.push(*node);
                cluster.set_links_of(
                    *node,
                    LinkMode::Lossy {
                        stall_per_mille: *stall_per_mille,
                        stall_ms: *stall_ms,
                        reset_per_10k: *reset_per_10k,
                    },
                );
                tokio::time::sleep(hold).await;
                cluster.heal_links();
            }
            Action::RollingRestart { order } => {
                for &node in order {
                    rec.nodes.push(node);
                    let _ignored = cluster.terminate(node, Duration::from_secs(10)).await;
                    let targets = leader_offsets(cluster).await;
                    self.restart(cluster, node, &mut rec).await;
                    self.wait_caught_up(cluster, node, &targets, &mut rec).await;
                }
            }
            Action::ClusterRestart => {
                let ids = cluster.ids();
                for &id in &ids {
                    let _ignored = cluster.kill(id).await;
                }
                rec.nodes = ids.clone();
                tokio::time::sleep(hold).await;
                for &id in &ids {
                    if let Err(e) = cluster.start_node(id) {
                        rec.notes.push(format!("restart of node {id} failed: {e}"));
                    }
                }
                if let Err(missing) = cluster.wait_answering(&ids, REJOIN_LIMIT * 2).await {
                    rec.notes.push(format!(
                        "nodes {missing:?} did not answer after the restart"
                    ));
                }
            }
            Action::BitFlip { node, pick } => {
                rec.nodes.push(*node);
                // Stopped cleanly: after `kill -9` the node re-applies log entries past its
                // last flush on restart and would rewrite the changed message itself.
                let _ignored = cluster.terminate(*node, Duration::from_secs(15)).await;
                let flipped = cluster
                    .data_dir(*node)
                    .map_err(|e| e.to_string())
                    .and_then(|dir| crate::disk::flip_stored_bit(&dir, *pick));
                let mark = cluster.log_len(*node);
                self.restart(cluster, *node, &mut rec).await;
                match flipped {
                    Ok((group, offset)) => {
                        rec.notes.push(format!(
                            "flipped a bit of group {group} offset {offset} on node {node}"
                        ));
                        // The node's scrubber (or a read) finds it and the replica is wiped
                        // and fetched again; a leader hands over first.
                        let seen = wait_for_log(cluster, *node, mark, hold, |log| {
                            log.contains(REPAIR_LOG)
                        })
                        .await;
                        let detected = [SCRUB_FOUND_LOG, CORRUPT_READ_LOG, CORRUPT_OPEN_LOG]
                            .iter()
                            .any(|l| seen.contains(l));
                        rec.outcome = Some(crate::history::StorageOutcome::Flipped {
                            detected,
                            repaired: seen.contains(REPAIR_LOG),
                        });
                        rec.notes.push(match (detected, seen.contains(REPAIR_LOG)) {
                            (_, true) => format!("corruption detected and repaired on node {node}"),
                            (true, false) => format!(
                                "corruption detected on node {node}, not repaired within {hold:?} \
                                 (a leader hands over first)"
                            ),
                            (false, false) => format!(
                                "corruption on node {node} not detected within {hold:?} (a \
                                 retention cut may have removed the message first)"
                            ),
                        });
                    }
                    Err(e) => rec.notes.push(format!("no bit flipped: {e}")),
                }
            }
            Action::ReplaceNode { node } => {
                rec.nodes.push(*node);
                let _ignored = cluster.kill(*node).await;
                match cluster.wipe_data(*node) {
                    Ok(()) => rec
                        .notes
                        .push(format!("node {node}'s data directory deleted")),
                    Err(e) => rec.notes.push(format!("deleting the data failed: {e}")),
                }
                tokio::time::sleep(hold).await;
                let mark = cluster.log_len(*node);
                self.restart(cluster, *node, &mut rec).await;
                // The node answers before it decides how to start: wait for its decision.
                let log = wait_for_log(cluster, *node, mark, REJOIN_LIMIT, |log| {
                    log.contains(REJOIN_LOG) || log.contains(NEW_CLUSTER_LOG)
                })
                .await;
                rec.outcome = Some(crate::history::StorageOutcome::Replaced {
                    rejoined: log.contains(REJOIN_LOG),
                    new_cluster: log.contains(NEW_CLUSTER_LOG),
                });
                rec.notes.push(if log.contains(REJOIN_LOG) {
                    format!("node {node} rejoined the cluster as an empty replica")
                } else if log.contains(NEW_CLUSTER_LOG) {
                    format!("!!! node {node} initialised a new cluster instead of rejoining")
                } else {
                    format!("node {node} restarted; no rejoin logged within {REJOIN_LIMIT:?}")
                });
            }
            Action::DiskFill { node } => {
                rec.nodes.push(*node);
                let mark = cluster.log_len(*node);
                match cluster.fill_disk(*node) {
                    Ok(size) => {
                        rec.notes.push(format!(
                            "file system capped at the {size} bytes in use (the node runs \
                             without preallocation, so its next write needing space fails)"
                        ));
                        tokio::time::sleep(hold).await;
                        if let Err(e) = cluster.free_disk(*node) {
                            rec.notes.push(format!("freeing the disk failed: {e}"));
                        }
                        // A node that hit the full disk poisons its store and stops (which
                        // takes a moment: it shuts its groups down first).
                        let poisoned = cluster.log_since(*node, mark).contains(POISON_LOG);
                        if poisoned {
                            let deadline = Instant::now() + POISON_EXIT_LIMIT;
                            while cluster.is_running(*node) && Instant::now() < deadline {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        if cluster.is_running(*node) {
                            rec.notes.push(if poisoned {
                                format!(
                                    "node {node} poisoned its store but did not exit within \
                                     {POISON_EXIT_LIMIT:?}"
                                )
                            } else {
                                format!(
                                    "node {node} kept running (it wrote nothing that needed space)"
                                )
                            });
                        } else {
                            // Expected: a failed write poisons the store and the node stops
                            // so that it is restarted once the disk has space again.
                            let exits = cluster.take_exits_of(*node);
                            rec.notes.push(format!(
                                "node {node} stopped on the full disk ({}); restarted after \
                                 freeing it",
                                exits.join(", ")
                            ));
                            self.restart(cluster, *node, &mut rec).await;
                        }
                    }
                    Err(e) => {
                        eprintln!("chaos: !!! SKIPPED fault #{} ({}): {e}", f.index, f.action);
                        rec.skipped = Some(e.to_string());
                    }
                }
            }
        }
        rec.end_ms = self.now_ms();
        rec
    }

    async fn kill_leader_of(
        &mut self,
        cluster: &mut Cluster,
        group: Option<u64>,
        hold: Duration,
        rec: &mut FaultRecord,
    ) {
        let leaders = cluster.leaders().await;
        match group.and_then(|g| leaders.get(&g)) {
            Some(&(leader, _)) => {
                rec.description = format!("{} (node {leader})", rec.description);
                self.kill_and_restart(cluster, leader, hold, rec).await;
            }
            None => {
                // No leader to kill: the group is electing. Fall back to holding nothing.
                rec.skipped = Some("no leader known for the group at that moment".to_owned());
            }
        }
    }

    async fn kill_and_restart(
        &mut self,
        cluster: &mut Cluster,
        node: u64,
        hold: Duration,
        rec: &mut FaultRecord,
    ) {
        rec.nodes.push(node);
        let leaders = cluster.leaders().await;
        let led: Vec<(u64, u64)> = leaders
            .iter()
            .filter(|(_, (l, _))| *l == node)
            .map(|(g, (_, term))| (*g, *term))
            .collect();
        let _ignored = cluster.kill(node).await;
        let killed_at_ms = self.now_ms();
        if !led.is_empty() {
            rec.leader_kill = Some(LeaderKill {
                node,
                killed_at_ms,
                partitions: led
                    .iter()
                    .filter_map(|(g, _)| self.partition_of(*g))
                    .collect(),
                metadata: led.iter().any(|(g, _)| *g == META_GROUP),
                elections: Vec::new(),
            });
            // Every node, the killed one included: once restarted it may report leading its
            // groups again at the old term (see `Election::resumed_ms`).
            let addrs: Vec<(u64, String)> = cluster.peer_addrs().into_iter().collect();
            let watched: Vec<(Option<u32>, u64, u64)> = led
                .iter()
                .filter_map(|&(g, term)| {
                    let p = self.partition_of(g);
                    (p.is_some() || g == META_GROUP).then_some((p, g, term))
                })
                .collect();
            let origin = self.origin;
            let clients: Vec<_> = addrs
                .iter()
                .filter_map(|(id, a)| {
                    let ep = Endpoint::from_shared(a.clone()).ok()?;
                    Some((
                        *id,
                        cluster.peer_client(&ep.connect_timeout(Duration::from_millis(300))),
                    ))
                })
                .collect();
            let handle = tokio::spawn(watch_elections(
                clients,
                node,
                watched,
                origin,
                killed_at_ms,
            ));
            self.monitors.push((rec.index, handle));
        }
        tokio::time::sleep(hold).await;
        self.restart(cluster, node, rec).await;
    }

    async fn restart(&mut self, cluster: &mut Cluster, node: u64, rec: &mut FaultRecord) {
        if let Err(e) = cluster.start_node(node) {
            rec.notes
                .push(format!("restart of node {node} failed: {e}"));
            return;
        }
        if cluster.wait_answering(&[node], REJOIN_LIMIT).await.is_err() {
            rec.notes.push(format!(
                "node {node} did not answer within {REJOIN_LIMIT:?} of its restart"
            ));
        }
    }

    /// Waits until every group node `node` hosts reports a leader and has caught up with
    /// where its leader was when the node went down (a rolling restart moves on only then, so
    /// it never has two replicas of a group behind at once).
    async fn wait_caught_up(
        &mut self,
        cluster: &mut Cluster,
        node: u64,
        targets: &BTreeMap<u64, u64>,
        rec: &mut FaultRecord,
    ) {
        let deadline = Instant::now() + REJOIN_LIMIT;
        loop {
            if let Some(s) = cluster.node_status(node).await
                && !s.groups.is_empty()
                && s.groups.iter().all(|g| {
                    g.leader.is_some()
                        && g.next_offset >= targets.get(&g.group).copied().unwrap_or(0)
                })
            {
                return;
            }
            if Instant::now() >= deadline {
                rec.notes.push(format!(
                    "node {node} had not caught up with its groups' leaders {REJOIN_LIMIT:?} after its restart"
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Heals everything: links up, paused nodes resumed, disks freed, dead nodes restarted.
    pub async fn heal_all(&mut self, cluster: &mut Cluster) -> Vec<String> {
        let mut notes = Vec::new();
        cluster.heal_links();
        for id in cluster.ids() {
            if cluster.is_paused(id) {
                let _ignored = cluster.resume(id);
            }
            if cluster.disk_faults().is_ok() {
                let _ignored = cluster.free_disk(id);
            }
        }
        self.revive_crashed(cluster).await;
        if let Err(missing) = cluster
            .wait_answering(&cluster.ids(), REJOIN_LIMIT * 2)
            .await
        {
            notes.push(format!("nodes {missing:?} do not answer after the heal"));
        }
        notes
    }

    /// Waits for the election monitors and files their results into the fault records.
    pub async fn collect_elections(&mut self, records: &mut [FaultRecord]) {
        for (index, handle) in self.monitors.drain(..) {
            let Ok(elections) = handle.await else {
                continue;
            };
            if let Some(lk) = records
                .iter_mut()
                .find(|r| r.index == index)
                .and_then(|r| r.leader_kill.as_mut())
            {
                lk.elections = elections;
            }
        }
    }
}

/// Each group's `next_offset` on its leader, as far as the answering nodes tell.
async fn leader_offsets(cluster: &mut Cluster) -> BTreeMap<u64, u64> {
    let statuses = cluster.statuses().await;
    let leaders = leaders_of(&statuses);
    let mut out = BTreeMap::new();
    for (group, (leader, _)) in leaders {
        let offset = statuses
            .get(&leader)
            .and_then(|s| s.groups.iter().find(|g| g.group == group))
            .map(|g| g.next_offset);
        if let Some(o) = offset {
            out.insert(group, o);
        }
    }
    out
}

/// Nodes a network fault cuts off (for the record).
fn affected(action: &Action) -> Vec<u64> {
    match action {
        Action::Isolate { node, .. } => vec![*node],
        Action::Split { minority, .. } => minority.clone(),
        Action::OneWay { from, to, .. } => vec![*from, *to],
        Action::Bridge { bridge, .. } => vec![*bridge],
        _ => Vec::new(),
    }
}

/// Polls the nodes until each watched group has a leader again: another node reporting it
/// leads with a higher term than the killed leader had (an election), or the killed node,
/// restarted, reporting it leads again (its old leadership resumed).
async fn watch_elections(
    clients: Vec<(u64, PeerClient<PeerChannel>)>,
    killed: u64,
    watched: Vec<(Option<u32>, u64, u64)>,
    origin: Instant,
    killed_at_ms: u64,
) -> Vec<Election> {
    let mut clients = clients;
    let mut elected: BTreeMap<u64, u64> = BTreeMap::new();
    let mut resumed: BTreeMap<u64, u64> = BTreeMap::new();
    let deadline = Instant::now() + ELECTION_LIMIT;
    let done = |e: &BTreeMap<u64, u64>, r: &BTreeMap<u64, u64>, g: u64| {
        e.contains_key(&g) || r.contains_key(&g)
    };
    while watched
        .iter()
        .any(|&(_, g, _)| !done(&elected, &resumed, g))
        && Instant::now() < deadline
    {
        let polls = clients.iter_mut().map(|(id, c)| async move {
            let call = c.node_status(NodeStatusRequest {});
            match tokio::time::timeout(Duration::from_millis(500), call).await {
                Ok(Ok(r)) => Some((*id, r.into_inner())),
                _ => None,
            }
        });
        let statuses: BTreeMap<u64, _> = futures::future::join_all(polls)
            .await
            .into_iter()
            .flatten()
            .collect();
        let now = (origin.elapsed().as_millis() as u64).saturating_sub(killed_at_ms);
        for &(_, group, old_term) in &watched {
            if done(&elected, &resumed, group) {
                continue;
            }
            let reports = statuses
                .values()
                .flat_map(|s| s.groups.iter())
                .filter(|g| g.group == group);
            if reports
                .clone()
                .any(|g| g.leader.is_some() && g.term > old_term)
            {
                elected.insert(group, now);
            } else if statuses.get(&killed).is_some_and(|s| {
                s.groups
                    .iter()
                    .any(|g| g.group == group && g.leader == Some(killed))
            }) {
                resumed.insert(group, now);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watched
        .iter()
        .map(|&(partition, group, _)| Election {
            partition,
            new_leader_ms: elected.get(&group).copied(),
            resumed_ms: resumed.get(&group).copied(),
        })
        .collect()
}
