//! Quiescent partition groups: the decisions, apart from any I/O.
//!
//! Every openraft group ticks (about every 30 ms with a 150 ms heartbeat) and its leader sends
//! a heartbeat to each follower every period. With hundreds of partitions per node that is
//! most of a core spent on groups nobody writes to. A group that stayed idle for a while goes
//! *quiet* instead, as TiKV's hibernated regions and CockroachDB's quiesced ranges do:
//!
//! 1. Its leader sees no new entry for [`crate::RaftTuning::quiesce_after`], everything
//!    committed and applied, its membership settled and every member holding the last entry
//!    ([`leader_may_quiesce`]).
//! 2. It asks each follower to go quiet; a follower agrees only if it follows that leader in
//!    that term and its log ends at the same entry, committed ([`follower_accepts`]), and
//!    then stops the group's timer (no elections).
//! 3. When all agreed, and nothing was written meanwhile ([`QuietState::commit`]), the
//!    leader stops the group's timer too (no heartbeats).
//!
//! A quiet group wakes ([`QuietState::wake`]) on the next write on its leader, on entries, a
//! snapshot, a vote or a leadership transfer a replica receives for it (the leader's first
//! append after a write wakes the followers; heartbeats wake nobody, so an awake leader's
//! heartbeats cannot strand a follower that has just agreed), and on a follower whose node
//! stops hearing the leader's node: liveness is
//! checked once per node pair ([`Liveness`]), not per group. The remaining followers then
//! wake one after the other ([`wake_delay`]) so the first one is elected without a split vote.
//! While the leader's node still answers, a quiet follower refuses pre-votes, as an awake one
//! within its leader lease does (the caller's [`PreVote`] rule).
//!
//! Nothing here affects safety: Raft stays correct whatever the timers do. Quiescence only
//! decides when a group spends CPU.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use junction_types::NodeId;

/// What a leader knows of one of its groups (from openraft's metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    pub last_log: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    /// The log entry each other member (voter or learner) is known to hold up to.
    pub followers: Vec<(NodeId, Option<u64>)>,
    /// The effective membership is the committed one (no change in flight).
    pub membership_settled: bool,
}

/// Whether a leader may ask its followers to let a group go quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderVerdict {
    /// Ask these followers to go quiet at `last_index` (none: a one-replica group).
    Quiesce {
        last_index: u64,
        followers: Vec<NodeId>,
    },
    /// Stay awake, for this reason.
    Stay(&'static str),
}

/// Decides whether a group idle for `idle_for` may go quiet (`after` zero: never).
pub fn leader_may_quiesce(view: &LeaderView, idle_for: Duration, after: Duration) -> LeaderVerdict {
    use LeaderVerdict::Stay;
    if after.is_zero() {
        return Stay("quiescence is off");
    }
    if idle_for < after {
        return Stay("written to recently");
    }
    let Some(last) = view.last_log else {
        return Stay("empty log");
    };
    if view.committed != Some(last) {
        return Stay("last entry not committed");
    }
    if view.applied != Some(last) {
        return Stay("last entry not applied");
    }
    if !view.membership_settled {
        return Stay("membership change in flight");
    }
    if view.followers.iter().any(|(_, m)| *m != Some(last)) {
        return Stay("a follower is behind");
    }
    LeaderVerdict::Quiesce {
        last_index: last,
        followers: view.followers.iter().map(|(n, _)| *n).collect(),
    }
}

/// What a follower knows of a group when its leader asks it to go quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerView {
    pub is_leader: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log: Option<u64>,
    pub committed: Option<u64>,
}

/// A leader's request that one group go quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiesceAsk {
    pub leader: NodeId,
    pub term: u64,
    pub last_index: u64,
}

/// Whether a follower agrees to let a group go quiet; `Err` says why not.
pub fn follower_accepts(view: &FollowerView, ask: &QuiesceAsk) -> Result<(), &'static str> {
    if view.is_leader {
        return Err("this replica leads the group");
    }
    if view.leader != Some(ask.leader) || view.term != ask.term {
        return Err("this replica follows another leader or term");
    }
    if view.last_log != Some(ask.last_index) {
        return Err("this replica's log ends elsewhere");
    }
    if view.committed != Some(ask.last_index) {
        return Err("this replica has not learnt that the last entry is committed");
    }
    Ok(())
}

/// One replica's quiescence: whether its timer is stopped, and how long it has been idle.
#[derive(Debug, Clone)]
pub struct QuietState {
    quiet: bool,
    /// When the replica was opened on this node.
    opened: Instant,
    /// Went quiet at least once since it was opened.
    ever_quiet: bool,
    /// Bumped by every wake-up: a quiescence decided before one is void.
    epoch: u64,
    last_log: Option<u64>,
    idle_since: Instant,
}

/// A leader's decision to quiesce, to be confirmed by [`QuietState::commit`] once the
/// followers agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    last_log: Option<u64>,
}

impl QuietState {
    /// A replica that just started: awake, idle from `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            quiet: false,
            opened: now,
            ever_quiet: false,
            epoch: 0,
            last_log: None,
            idle_since: now,
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Whether the replica is still settling at `now`: opened less than `period` ago and not
    /// quiet once since. A node brings up new replicas only while few are settling
    /// ([`may_open`]).
    pub fn settling(&self, now: Instant, period: Duration) -> bool {
        !self.ever_quiet && now.saturating_duration_since(self.opened) < period
    }

    /// Something happened in the group (a write, a Raft message): it is awake and idle from
    /// `now`. Returns whether it was quiet, i.e. whether its timer must be started again.
    pub fn wake(&mut self, now: Instant) -> bool {
        self.epoch = self.epoch.wrapping_add(1);
        self.idle_since = now;
        std::mem::replace(&mut self.quiet, false)
    }

    /// Records the log's end as seen at `now` and returns how long it has not moved.
    pub fn observe(&mut self, last_log: Option<u64>, now: Instant) -> Duration {
        if last_log != self.last_log {
            self.last_log = last_log;
            self.idle_since = now;
        }
        now.saturating_duration_since(self.idle_since)
    }

    /// Starts a quiescence at the log's end last observed.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            epoch: self.epoch,
            last_log: self.last_log,
        }
    }

    /// Goes quiet if nothing happened since `ticket` was taken and the log still ends at
    /// `last_log`. Returns whether it did (then the caller stops the group's timer).
    pub fn commit(&mut self, ticket: Ticket, last_log: Option<u64>) -> bool {
        if self.quiet || ticket.epoch != self.epoch || ticket.last_log != last_log {
            return false;
        }
        self.quiet = true;
        self.ever_quiet = true;
        true
    }

    /// A follower agreed to a leader's request: it goes quiet (idempotent).
    pub fn follow_quiet(&mut self) -> bool {
        self.ever_quiet = true;
        !std::mem::replace(&mut self.quiet, true)
    }
}

/// Whether a node may bring up one more partition replica while `settling` of its replicas
/// are settling ([`QuietState::settling`]); `wave` 0 sets no limit. Each new group ticks,
/// elects and heartbeats until it goes quiet: a thousand at once overload a small node, whose
/// late heartbeats and votes then start elections faster than any finishes. In waves, each
/// wave elects and goes quiet before the next one starts.
pub fn may_open(settling: usize, wave: usize) -> bool {
    wave == 0 || settling < wave
}

/// How long a follower of a quiet group whose leader's node is suspected waits before it
/// wakes: the first other replica at once, the next one `step` later, and so on, so the first
/// one is usually elected before the next one stands (no split vote). Replicas not in the
/// list wake last.
pub fn wake_delay(replicas: &[NodeId], suspected: NodeId, me: NodeId, step: Duration) -> Duration {
    let others = replicas.iter().filter(|n| **n != suspected);
    let rank = others
        .clone()
        .position(|n| *n == me)
        .unwrap_or_else(|| others.count());
    step.saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX))
}

/// What a replica does with a pre-vote request for a group that is quiet here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreVote {
    /// Answer it (and wake: an election may follow).
    Answer,
    /// Refuse it: the group's leader's node still answers (a leader lease, node-wide).
    Withhold,
    /// Refuse it and wake: this replica is the quiet leader, whose followers agreed to its
    /// leadership (openraft's own lease check would let it grant, its quorum acks being old).
    /// Its heartbeats then reach the candidate, typically a restarted replica.
    Lead,
}

/// The pre-vote rule for a quiet group: a follower whose leader's node answered within `lease`
/// withholds its pre-vote, as an awake follower refuses one within its leader lease; so does
/// the leader, which also wakes. A follower that has not heard the leader's node for longer,
/// or knows no leader, answers. The lease
/// is shorter than the suspicion time, so when the leader's node dies the first follower to
/// suspect it finds the others ready to answer.
pub fn pre_vote(
    is_leader: bool,
    leader: Option<NodeId>,
    liveness: &Liveness,
    now: Instant,
    lease: Duration,
) -> PreVote {
    if is_leader {
        return PreVote::Lead;
    }
    match leader {
        Some(l) if liveness.heard_within(l, now, lease) => PreVote::Withhold,
        _ => PreVote::Answer,
    }
}

/// Node-level liveness of the other members: each is pinged a few times a second, and is
/// suspected once it has not answered for `suspect_after`.
#[derive(Debug, Clone)]
pub struct Liveness {
    suspect_after: Duration,
    peers: BTreeMap<NodeId, PeerLife>,
}

#[derive(Debug, Clone, Copy)]
struct PeerLife {
    /// The last answer, or when tracking began.
    heard: Instant,
    suspected: bool,
}

impl Liveness {
    pub fn new(suspect_after: Duration) -> Self {
        Self {
            suspect_after,
            peers: BTreeMap::new(),
        }
    }

    /// Tracks exactly `members` (minus `me`); a new one counts as heard from at `now`.
    pub fn set_members(
        &mut self,
        me: NodeId,
        members: impl IntoIterator<Item = NodeId>,
        now: Instant,
    ) {
        let wanted: std::collections::BTreeSet<NodeId> =
            members.into_iter().filter(|n| *n != me).collect();
        self.peers.retain(|n, _| wanted.contains(n));
        for n in wanted {
            self.peers.entry(n).or_insert(PeerLife {
                heard: now,
                suspected: false,
            });
        }
    }

    /// `peer` answered a ping at `now`.
    pub fn answered(&mut self, peer: NodeId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.heard = p.heard.max(now);
            p.suspected = false;
        }
    }

    /// The peers that became suspected by `now` (each reported once per silence).
    pub fn check(&mut self, now: Instant) -> Vec<NodeId> {
        let mut newly = Vec::new();
        for (n, p) in &mut self.peers {
            if !p.suspected && now.saturating_duration_since(p.heard) >= self.suspect_after {
                p.suspected = true;
                newly.push(*n);
            }
        }
        newly
    }

    pub fn is_suspected(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.suspected)
    }

    /// Whether `peer` answered within `within` of `now`.
    pub fn heard_within(&self, peer: NodeId, now: Instant, within: Duration) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| !p.suspected && now.saturating_duration_since(p.heard) < within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(last: u64, followers: &[(NodeId, Option<u64>)]) -> LeaderView {
        LeaderView {
            last_log: Some(last),
            committed: Some(last),
            applied: Some(last),
            followers: followers.to_vec(),
            membership_settled: true,
        }
    }

    const AFTER: Duration = Duration::from_secs(2);

    #[test]
    fn a_replica_settles_when_it_first_goes_quiet_or_after_the_period() {
        let t0 = Instant::now();
        let period = Duration::from_secs(10);
        let mut s = QuietState::new(t0);
        assert!(s.settling(t0, period));
        assert!(s.settling(t0 + Duration::from_secs(9), period));
        assert!(!s.settling(t0 + period, period), "settled by age");
        // A follower that agreed to go quiet has settled, and stays settled once woken.
        let mut f = QuietState::new(t0);
        assert!(f.follow_quiet());
        assert!(!f.settling(t0, period));
        f.wake(t0);
        assert!(!f.settling(t0, period));
        // So has a leader whose quiescence was confirmed; one whose ticket was void has not.
        s.observe(Some(3), t0);
        let ticket = s.ticket();
        s.wake(t0);
        assert!(!s.commit(ticket, Some(3)));
        assert!(s.settling(t0, period));
        let mut l = QuietState::new(t0);
        l.observe(Some(3), t0);
        assert!(l.commit(l.ticket(), Some(3)));
        assert!(!l.settling(t0, period));
        // Waves: a limit of 0 never holds a replica back.
        assert!(may_open(99, 100) && !may_open(100, 100) && may_open(10_000, 0));
    }

    #[test]
    fn an_idle_settled_group_quiesces_with_all_its_followers() {
        let v = settled(9, &[(2, Some(9)), (3, Some(9))]);
        assert_eq!(
            leader_may_quiesce(&v, AFTER, AFTER),
            LeaderVerdict::Quiesce {
                last_index: 9,
                followers: vec![2, 3]
            }
        );
        // A one-replica group has nobody to ask.
        assert_eq!(
            leader_may_quiesce(&settled(4, &[]), AFTER, AFTER),
            LeaderVerdict::Quiesce {
                last_index: 4,
                followers: vec![]
            }
        );
    }

    #[test]
    fn a_group_stays_awake_while_anything_is_unfinished() {
        let base = settled(9, &[(2, Some(9)), (3, Some(9))]);
        let stay = |v: &LeaderView, idle: Duration, after: Duration| {
            matches!(leader_may_quiesce(v, idle, after), LeaderVerdict::Stay(_))
        };
        assert!(stay(&base, AFTER, Duration::ZERO), "off");
        assert!(
            stay(&base, AFTER - Duration::from_millis(1), AFTER),
            "recent write"
        );
        let mut v = base.clone();
        v.last_log = None;
        assert!(stay(&v, AFTER, AFTER), "empty");
        let mut v = base.clone();
        v.committed = Some(8);
        assert!(stay(&v, AFTER, AFTER), "uncommitted");
        let mut v = base.clone();
        v.applied = Some(8);
        assert!(stay(&v, AFTER, AFTER), "unapplied");
        let mut v = base.clone();
        v.membership_settled = false;
        assert!(stay(&v, AFTER, AFTER), "membership");
        let mut v = base.clone();
        v.followers[1].1 = Some(8);
        assert!(stay(&v, AFTER, AFTER), "follower behind");
        let mut v = base;
        v.followers[0].1 = None;
        assert!(stay(&v, AFTER, AFTER), "follower unknown");
    }

    #[test]
    fn a_follower_agrees_only_with_its_leader_at_the_same_committed_end() {
        let view = FollowerView {
            is_leader: false,
            leader: Some(1),
            term: 4,
            last_log: Some(9),
            committed: Some(9),
        };
        let ask = QuiesceAsk {
            leader: 1,
            term: 4,
            last_index: 9,
        };
        assert_eq!(follower_accepts(&view, &ask), Ok(()));
        for bad in [
            QuiesceAsk { leader: 2, ..ask },
            QuiesceAsk { term: 5, ..ask },
            QuiesceAsk {
                last_index: 10,
                ..ask
            },
        ] {
            assert!(follower_accepts(&view, &bad).is_err(), "{bad:?}");
        }
        let mut v = view.clone();
        v.committed = Some(8);
        assert!(follower_accepts(&v, &ask).is_err());
        let mut v = view;
        v.is_leader = true;
        assert!(follower_accepts(&v, &ask).is_err());
    }

    #[test]
    fn a_wake_up_voids_a_quiescence_in_flight() {
        let t0 = Instant::now();
        let mut s = QuietState::new(t0);
        assert_eq!(s.observe(Some(5), t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(3);
        assert_eq!(s.observe(Some(5), later), Duration::from_secs(3));
        let ticket = s.ticket();
        assert!(!s.wake(later), "was awake");
        assert!(!s.commit(ticket, Some(5)), "a write came in between");
        let ticket = s.ticket();
        assert!(!s.commit(ticket, Some(6)), "the log moved");
        assert!(s.commit(ticket, Some(5)));
        assert!(s.is_quiet());
        assert!(!s.commit(ticket, Some(5)), "already quiet");
        assert!(s.wake(later), "was quiet: start the timer");
        assert!(!s.is_quiet());
        assert!(s.follow_quiet());
        assert!(!s.follow_quiet(), "idempotent");
    }

    #[test]
    fn followers_of_a_suspected_leader_wake_in_turn() {
        let step = Duration::from_millis(300);
        assert_eq!(wake_delay(&[1, 2, 3], 1, 2, step), Duration::ZERO);
        assert_eq!(wake_delay(&[1, 2, 3], 1, 3, step), step);
        assert_eq!(wake_delay(&[3, 1, 2], 1, 2, step), step);
        assert_eq!(wake_delay(&[1, 2, 3], 2, 1, step), Duration::ZERO);
        // Not listed (a replica list from before a move): after every listed one.
        assert_eq!(wake_delay(&[1, 2, 3], 1, 4, step), step * 2);
    }

    #[test]
    fn liveness_suspects_once_per_silence_and_clears_on_an_answer() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(ms(600));
        l.set_members(1, [1, 2, 3], t0);
        assert!(l.check(t0 + ms(599)).is_empty());
        l.answered(2, t0 + ms(500));
        assert_eq!(l.check(t0 + ms(600)), vec![3]);
        assert!(l.is_suspected(3) && !l.is_suspected(2) && !l.is_suspected(1));
        assert!(l.check(t0 + ms(900)).is_empty(), "reported once");
        assert_eq!(l.check(t0 + ms(1100)), vec![2]);
        l.answered(3, t0 + ms(1200));
        assert!(!l.is_suspected(3));
        // A removed member is forgotten; a new one starts as heard from.
        l.set_members(1, [1, 2, 4], t0 + ms(1300));
        assert!(!l.is_suspected(3));
        assert!(l.check(t0 + ms(1800)).is_empty());
        assert_eq!(l.check(t0 + ms(1900)), vec![4]);
    }

    #[test]
    fn a_quiet_follower_withholds_pre_votes_while_its_leader_answers() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let lease = ms(300);
        let mut l = Liveness::new(ms(600));
        l.set_members(2, [1, 2, 3], t0);
        l.answered(1, t0 + ms(100));
        assert_eq!(
            pre_vote(false, Some(1), &l, t0 + ms(399), lease),
            PreVote::Withhold
        );
        assert_eq!(
            pre_vote(true, Some(2), &l, t0 + ms(200), lease),
            PreVote::Lead
        );
        assert_eq!(
            pre_vote(true, Some(2), &l, t0 + ms(9000), lease),
            PreVote::Lead
        );
        assert_eq!(
            pre_vote(false, None, &l, t0 + ms(200), lease),
            PreVote::Answer
        );
        assert_eq!(
            pre_vote(false, Some(9), &l, t0 + ms(200), lease),
            PreVote::Answer
        );
        // Silent for longer than the lease, not yet suspected: it answers already.
        assert_eq!(
            pre_vote(false, Some(1), &l, t0 + ms(400), lease),
            PreVote::Answer
        );
        l.check(t0 + ms(800));
        assert_eq!(
            pre_vote(false, Some(1), &l, t0 + ms(800), lease),
            PreVote::Answer
        );
    }

    /// A seeded model of three replicas of one group: random writes, quiescence rounds,
    /// wake-ups and leader changes. Whatever the order, a replica that leads is never quiet
    /// while a follower is awake (that follower would elect itself for nothing).
    #[test]
    fn model_quiet_leaders_never_strand_awake_followers() {
        for seed in 0..300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let t0 = Instant::now();
            let mut now = t0;
            let mut states: Vec<QuietState> = (0..3).map(|_| QuietState::new(t0)).collect();
            let mut last: u64 = 1;
            let mut leader = 0usize;
            let mut term = 1u64;
            let mut in_flight: Option<(Ticket, Vec<usize>)> = None;
            for _ in 0..200 {
                now += Duration::from_millis(rng.below(1500));
                match rng.below(6) {
                    0 => {
                        // A write on the leader: it wakes, the entry reaches every follower.
                        states[leader].wake(now);
                        last += 1;
                        for s in states.iter_mut() {
                            s.wake(now);
                        }
                    }
                    1 | 2 => {
                        // The leader asks: followers that agree go quiet at once.
                        let idle = states[leader].observe(Some(last), now);
                        let view = settled(last, &[(1, Some(last)), (2, Some(last))]);
                        if let LeaderVerdict::Quiesce { .. } =
                            leader_may_quiesce(&view, idle, AFTER)
                        {
                            let agreeing: Vec<usize> = (0..3)
                                .filter(|i| *i != leader && rng.below(4) != 0)
                                .collect();
                            for i in &agreeing {
                                states[*i].follow_quiet();
                            }
                            in_flight = Some((states[leader].ticket(), agreeing));
                        }
                    }
                    3 => {
                        // The answers arrive: the leader commits only if all agreed.
                        if let Some((ticket, agreeing)) = in_flight.take()
                            && agreeing.len() == 2
                        {
                            states[leader].commit(ticket, Some(last));
                        }
                    }
                    4 => {
                        // A heartbeat from an awake leader carries no entries: it wakes
                        // nobody (an awake leader with quiet followers is safe).
                    }
                    _ => {
                        // The leader's node is suspected: the first other replica wakes, is
                        // elected, and its first entry wakes everyone.
                        let next = (leader + 1) % 3;
                        states[next].wake(now);
                        leader = next;
                        term += 1;
                        last += 1;
                        in_flight = None;
                        for s in states.iter_mut() {
                            s.wake(now);
                        }
                    }
                }
                if states[leader].is_quiet() {
                    for (i, s) in states.iter().enumerate() {
                        assert!(
                            s.is_quiet(),
                            "seed {seed} term {term}: leader {leader} quiet, replica {i} awake"
                        );
                    }
                }
            }
        }
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }
}
