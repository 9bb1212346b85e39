//! Quiescent partition groups on this node: the I/O around [`junction_raft::quiesce`], which
//! holds the rules and explains the protocol.
//!
//! - [`Quiet`]: one replica's state and its openraft timer, started and stopped together.
//! - [`Broker::quiesce_loop`]: as leader, finds idle groups and asks their followers.
//! - [`Broker::liveness_loop`]: pings the other members; wakes the followers of quiet groups
//!   whose leader's node went silent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use junction_proto::peer::{PingRequest, QuiesceGroup, QuiesceRequest, QuiesceResponse};
use junction_raft::PartitionRaft;
use junction_raft::quiesce::{
    FollowerView, LeaderVerdict, LeaderView, Liveness, PreVote, QuiesceAsk, QuietState, Ticket,
    follower_accepts, leader_may_quiesce, wake_delay,
};
use junction_types::{GroupId, NodeId};
use openraft::Instant as _;
use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;

use crate::Broker;
use crate::partition::PartitionReplica;

/// A new replica counts against the node's opening wave until it first goes quiet or for this
/// long, whichever is first (a group with steady traffic never goes quiet).
pub(crate) const SETTLE_PERIOD: Duration = Duration::from_secs(10);

/// The clock openraft stamps its metrics with.
type RaftInstant = openraft::alias::InstantOf<junction_raft::TypeConfig>;

/// One partition replica's quiescence and the openraft timer it switches.
pub struct Quiet {
    state: parking_lot::Mutex<QuietState>,
    raft: PartitionRaft,
    /// openraft's leader lease (the longest election timeout): a leader whose quorum has not
    /// acknowledged it for this long refuses writes until a heartbeat round renews it.
    lease: Duration,
    /// Set when the group wakes from quiet, cleared once a write found the lease renewed: only
    /// then do writes look at the lease, so an awake group's writes never read the metrics.
    lease_unsure: std::sync::atomic::AtomicBool,
}

impl Quiet {
    pub(crate) fn new(raft: PartitionRaft, lease: Duration) -> Self {
        Self {
            state: parking_lot::Mutex::new(QuietState::new(Instant::now())),
            raft,
            lease,
            lease_unsure: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Wakes the group and, on its leader, makes sure it may write: a leader that was quiet
    /// sent no heartbeats, so its lease has run out and openraft would refuse the write (as
    /// if it were no leader). One heartbeat round renews it; bounded by twice the lease, after
    /// which the write goes ahead and fails as it would have.
    pub async fn ready_to_write(&self) {
        use std::sync::atomic::Ordering;
        self.wake();
        if !self.lease_unsure.load(Ordering::Acquire) {
            return;
        }
        if self.lease_fresh() {
            self.lease_unsure.store(false, Ordering::Release);
            return;
        }
        let asked = RaftInstant::now();
        if self.raft.trigger().heartbeat().await.is_err() {
            return;
        }
        let _ = self
            .raft
            .wait(Some(self.lease * 2))
            .metrics(
                |m| {
                    m.state != ServerState::Leader
                        || m.last_quorum_acked.is_some_and(|t| *t >= asked)
                },
                "a quorum acknowledges the woken leader",
            )
            .await;
    }

    /// Whether writes need no lease renewal first: this replica does not lead (the write
    /// fails or is forwarded as usual), leads alone, or was acknowledged recently.
    fn lease_fresh(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader
            || m.membership_config.membership().voter_ids().count() <= 1
        {
            return true;
        }
        let margin = self.lease / 4;
        m.last_quorum_acked
            .is_some_and(|t| t.elapsed() + margin < self.lease)
    }

    /// The group's Raft handle.
    pub(crate) fn raft(&self) -> &PartitionRaft {
        &self.raft
    }

    pub fn is_quiet(&self) -> bool {
        self.state.lock().is_quiet()
    }

    /// Whether the replica is still settling (see [`QuietState::settling`]).
    pub fn settling(&self, period: Duration) -> bool {
        self.state.lock().settling(Instant::now(), period)
    }

    /// Something needs the group awake: starts its timer if it was quiet. Called on Raft
    /// traffic that needs a replica awake, and (through [`Quiet::ready_to_write`]) before
    /// every write a leader makes.
    pub fn wake(&self) {
        let mut s = self.state.lock();
        if s.wake(Instant::now()) {
            self.lease_unsure
                .store(true, std::sync::atomic::Ordering::Release);
            self.raft.runtime_config().tick(true);
        }
    }

    /// Records the log's end; returns how long it has not moved and a ticket to quiesce at it.
    fn observe(&self, last_log: Option<u64>) -> (Duration, Ticket) {
        let mut s = self.state.lock();
        let idle = s.observe(last_log, Instant::now());
        (idle, s.ticket())
    }

    /// The followers agreed: goes quiet unless something happened since `ticket`.
    fn commit(&self, ticket: Ticket, last_log: Option<u64>) -> bool {
        let mut s = self.state.lock();
        let quiet = s.commit(ticket, last_log);
        if quiet {
            self.raft.runtime_config().tick(false);
        }
        quiet
    }

    /// This follower agreed to its leader's request.
    fn follow_quiet(&self) {
        let mut s = self.state.lock();
        if s.follow_quiet() {
            self.raft.runtime_config().tick(false);
        }
    }
}

/// A group this node leads, read from its metrics: `None` when it does not lead it.
fn leader_view(raft: &PartitionRaft, me: NodeId) -> Option<(LeaderView, u64)> {
    let m = raft.metrics();
    let m = m.borrow_watched();
    if m.state != ServerState::Leader || m.current_leader != Some(me) {
        return None;
    }
    let followers = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(n, _)| **n != me)
                .map(|(n, l)| (*n, l.as_ref().map(|l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let view = LeaderView {
        last_log: m.last_log_index,
        committed: m.local_committed.as_ref().map(|l| l.index),
        applied: m.last_applied.as_ref().map(|l| l.index),
        followers,
        membership_settled: m.membership_config.log_id() == m.committed_membership_config.log_id(),
    };
    Some((view, m.current_term))
}

/// A group leader's request pending its followers' answers.
struct Pending {
    replica: Arc<PartitionReplica>,
    ticket: Ticket,
    followers: Vec<NodeId>,
}

impl Broker {
    /// As leader, lets idle groups go quiet, every quarter of `quiesce_after`.
    pub(crate) async fn quiesce_loop(self: Arc<Self>) {
        let after = self.cfg.tuning.quiesce_after;
        if after.is_zero() {
            return;
        }
        let mut every = tokio::time::interval((after / 4).max(Duration::from_millis(50)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            self.quiesce_pass(after).await;
        }
    }

    async fn quiesce_pass(&self, after: Duration) {
        let me = self.cfg.node_id;
        let replicas: Vec<Arc<PartitionReplica>> = self.replicas();
        let mut asks: BTreeMap<NodeId, Vec<QuiesceGroup>> = BTreeMap::new();
        let mut pending = Vec::new();
        for replica in replicas {
            if replica.quiet.is_quiet() {
                continue;
            }
            let Some((view, term)) = leader_view(&replica.raft, me) else {
                continue;
            };
            let (idle, ticket) = replica.quiet.observe(view.last_log);
            let LeaderVerdict::Quiesce {
                last_index,
                followers,
            } = leader_may_quiesce(&view, idle, after)
            else {
                continue;
            };
            for f in &followers {
                asks.entry(*f).or_default().push(QuiesceGroup {
                    group: replica.group,
                    term,
                    last_index,
                });
            }
            pending.push(Pending {
                replica,
                ticket,
                followers,
            });
        }
        if pending.is_empty() {
            return;
        }
        let limit = self.cfg.tuning.heartbeat * 4;
        let calls = asks.into_iter().map(|(node, groups)| async move {
            let quiet = match self.addr_of(node).map(|a| self.pool.client(&a)) {
                Some(Ok(mut client)) => {
                    let call = client.quiesce(QuiesceRequest { leader: me, groups });
                    match tokio::time::timeout(limit, call).await {
                        Ok(Ok(r)) => r.into_inner().quiet,
                        _ => Vec::new(),
                    }
                }
                _ => Vec::new(),
            };
            (
                node,
                quiet.into_iter().collect::<std::collections::BTreeSet<_>>(),
            )
        });
        let agreed: BTreeMap<NodeId, std::collections::BTreeSet<GroupId>> =
            futures::future::join_all(calls).await.into_iter().collect();
        for p in pending {
            let all = p
                .followers
                .iter()
                .all(|f| agreed.get(f).is_some_and(|g| g.contains(&p.replica.group)));
            if !all {
                continue;
            }
            let last_log = p.replica.raft.metrics().borrow_watched().last_log_index;
            if p.replica.quiet.commit(p.ticket, last_log) {
                tracing::debug!(group = p.replica.group, "partition group quiescent");
            }
        }
    }

    /// Answers a leader's request that groups go quiet (see [`follower_accepts`]).
    pub(crate) fn quiesce_followers(&self, req: QuiesceRequest) -> QuiesceResponse {
        let mut quiet = Vec::new();
        for g in req.groups {
            let Some(replica) = self.partition(g.group) else {
                continue;
            };
            let view = {
                let m = replica.raft.metrics();
                let m = m.borrow_watched();
                FollowerView {
                    is_leader: m.state == ServerState::Leader,
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log: m.last_log_index,
                    committed: m.local_committed.as_ref().map(|l| l.index),
                }
            };
            let ask = QuiesceAsk {
                leader: req.leader,
                term: g.term,
                last_index: g.last_index,
            };
            match follower_accepts(&view, &ask) {
                Ok(()) => {
                    replica.quiet.follow_quiet();
                    quiet.push(g.group);
                }
                Err(why) => tracing::debug!(group = g.group, why, "stays awake"),
            }
        }
        QuiesceResponse { quiet }
    }

    /// This node's replicas still settling: opened within [`SETTLE_PERIOD`] and not yet quiet.
    pub fn settling_replicas(&self) -> usize {
        self.replicas()
            .iter()
            .filter(|r| r.quiet.settling(SETTLE_PERIOD))
            .count()
    }

    /// Whether reconciliation may bring up one more replica now that `settling` are settling:
    /// always when quiescence is off (nothing would settle).
    pub(crate) fn may_open(&self, settling: usize) -> bool {
        self.cfg.tuning.quiesce_after.is_zero()
            || junction_raft::quiesce::may_open(settling, self.cfg.open_wave)
    }

    /// The pre-vote rule of a partition group (see [`junction_raft::quiesce::pre_vote`]).
    pub(crate) fn pre_vote_rule(&self, group: GroupId) -> PreVote {
        let Some(replica) = self.partition(group) else {
            return PreVote::Answer;
        };
        if !replica.quiet.is_quiet() {
            return PreVote::Answer;
        }
        let (is_leader, leader) = {
            let m = replica.raft.metrics();
            let m = m.borrow_watched();
            (m.state == ServerState::Leader, m.current_leader)
        };
        junction_raft::quiesce::pre_vote(
            is_leader,
            leader,
            &self.liveness.read(),
            Instant::now(),
            self.cfg.tuning.heartbeat * 2,
        )
    }

    /// Pings every other member each heartbeat period; wakes the followers of quiet groups
    /// whose leader's node stopped answering.
    pub(crate) async fn liveness_loop(self: Arc<Self>) {
        let tuning = &self.cfg.tuning;
        let me = self.cfg.node_id;
        let mut every = tokio::time::interval(tuning.heartbeat);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit = tuning.heartbeat * 2;
        let shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let addrs = self.node_addrs();
            let pool = &self.pool;
            self.liveness
                .write()
                .set_members(me, addrs.keys().copied(), Instant::now());
            let pings =
                addrs
                    .into_iter()
                    .filter(|(n, _)| *n != me)
                    .map(|(node, addr)| async move {
                        // The answer's format level (0 from builds before levels: level 1).
                        let answered = match pool.client(&addr) {
                            Ok(mut client) => {
                                let call = client.ping(PingRequest { from: me });
                                match tokio::time::timeout(limit, call).await {
                                    Ok(Ok(r)) if r.get_ref().node_id == node => Some(
                                        u16::try_from(r.get_ref().format_level)
                                            .unwrap_or(u16::MAX)
                                            .max(junction_types::format_level::BASE),
                                    ),
                                    _ => None,
                                }
                            }
                            Err(_) => None,
                        };
                        (node, answered.map(|level| (Instant::now(), level)))
                    });
            let answers = futures::future::join_all(pings).await;
            let suspected = {
                let mut live = self.liveness.write();
                let mut levels = self.peer_levels.write();
                for (node, answer) in answers {
                    if let Some((at, level)) = answer {
                        live.answered(node, at);
                        levels.insert(node, level);
                    }
                }
                live.check(Instant::now())
            };
            for node in suspected {
                tracing::info!(
                    node,
                    "node does not answer; waking the quiet groups it leads"
                );
                self.wake_followers_of(node);
            }
        }
    }

    /// Wakes this node's quiet replicas of groups `leader` leads, the first replica in line at
    /// once and the others a step later each (see [`wake_delay`]).
    fn wake_followers_of(&self, leader: NodeId) {
        let me = self.cfg.node_id;
        let step = self.cfg.tuning.election_min;
        let replicas: Vec<Arc<PartitionReplica>> = self.replicas();
        for replica in replicas {
            if !replica.quiet.is_quiet() || replica.leader() != Some(leader) {
                continue;
            }
            let delay = wake_delay(&replica.voters(), leader, me, step);
            if delay.is_zero() {
                replica.quiet.wake();
            } else {
                let shutdown = self.shutdown.clone();
                self.tasks.spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(delay) => {
                            if replica.quiet.is_quiet() {
                                replica.quiet.wake();
                            }
                        }
                    }
                });
            }
        }
    }
}

/// A fresh [`Liveness`] for a node's tuning.
pub(crate) fn liveness(tuning: &junction_raft::RaftTuning) -> parking_lot::RwLock<Liveness> {
    parking_lot::RwLock::new(Liveness::new(tuning.suspect_after()))
}
