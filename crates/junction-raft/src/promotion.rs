//! Whether a learner of the metadata group may become a voter.
//!
//! A pure decision over a view of the leader's replication state, so that it is tested
//! without a cluster; `peer_service::join` only gathers the view and acts on the verdict.
//!
//! A learner is promoted only when
//! - it is **reachable**: it acknowledged the leader's replication recently;
//! - it has **caught up**: it holds the log up to the index the leader asks for;
//! - the group **keeps a spare failure**: with the learner as a voter, the voters that answer
//!   now still form a majority after one more of them fails (where a group of that size can
//!   survive a failure at all: two voters never can).
//!
//! The last rule refuses to grow a degraded group: a group of three with one voter down still
//! runs on two, but as four voters with the newcomer it needs three of them, so it would then
//! stop on one more failure — of the newcomer, say.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use junction_types::NodeId;

/// What the leader knows of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaView {
    /// The highest log index the replica is known to hold.
    pub matched: Option<u64>,
    /// Time since the replica last acknowledged the leader; `None`: never.
    pub acked_ago: Option<Duration>,
}

/// The leader's view of the group when a learner asks to become a voter.
#[derive(Debug, Clone)]
pub struct PromotionView {
    /// This node, the leader: always counted as live.
    pub leader: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub learner: NodeId,
    /// The log index the learner must hold (the leader's commit index).
    pub needed: u64,
    /// Every replica but the leader.
    pub replicas: BTreeMap<NodeId, ReplicaView>,
    /// A replica that acknowledged within this time counts as live.
    pub live_within: Duration,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// Make the learner a voter.
    Promote,
    /// It already is one.
    AlreadyVoter,
    /// The learner has not acknowledged the leader recently (or ever).
    Unreachable { learner: NodeId },
    /// The learner is reachable but behind.
    NotCaughtUp {
        learner: NodeId,
        matched: Option<u64>,
        needed: u64,
    },
    /// With the learner as a voter, one more failure would leave no majority.
    NoSpareFailure {
        learner: NodeId,
        live_voters: usize,
        voters: usize,
    },
}

impl Promotion {
    /// Whether waiting may change the verdict (a learner still catching up, or not yet
    /// heard from); the other refusals stand until the group itself changes.
    pub fn worth_waiting(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::NotCaughtUp { .. })
    }
}

impl fmt::Display for Promotion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Promote => write!(f, "promote"),
            Self::AlreadyVoter => write!(f, "already a voter"),
            Self::Unreachable { learner } => write!(
                f,
                "node {learner} has not answered the metadata leader: it must be reachable at \
                 its address before it can become a voter"
            ),
            Self::NotCaughtUp {
                learner,
                matched,
                needed,
            } => write!(
                f,
                "node {learner} has not caught up with the metadata log (holds up to {}, \
                 needs {needed})",
                matched.map_or_else(|| "nothing".to_owned(), |m| m.to_string())
            ),
            Self::NoSpareFailure {
                learner,
                live_voters,
                voters,
            } => write!(
                f,
                "adding node {learner} as a voter now would leave the metadata group without a \
                 spare failure ({live_voters} of {voters} voters answer); bring the missing \
                 voters back first"
            ),
        }
    }
}

/// Votes needed out of `voters`.
fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// The decision.
pub fn decide(view: &PromotionView) -> Promotion {
    if view.voters.contains(&view.learner) {
        return Promotion::AlreadyVoter;
    }
    let live = |id: &NodeId| {
        *id == view.leader
            || view
                .replicas
                .get(id)
                .and_then(|r| r.acked_ago)
                .is_some_and(|ago| ago <= view.live_within)
    };
    if !live(&view.learner) {
        return Promotion::Unreachable {
            learner: view.learner,
        };
    }
    let matched = view.replicas.get(&view.learner).and_then(|r| r.matched);
    if matched.is_none_or(|m| m < view.needed) {
        return Promotion::NotCaughtUp {
            learner: view.learner,
            matched,
            needed: view.needed,
        };
    }
    let voters_after = view.voters.len() + 1;
    let live_after = view.voters.iter().filter(|v| live(v)).count() + 1;
    // The failures a group of this size survives at best (0 for two voters).
    let possible_spare = voters_after - quorum(voters_after);
    let spare = live_after.saturating_sub(quorum(voters_after));
    if spare < possible_spare.min(1) {
        return Promotion::NoSpareFailure {
            learner: view.learner,
            live_voters: live_after - 1,
            voters: view.voters.len(),
        };
    }
    Promotion::Promote
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(2);

    fn up(matched: u64) -> ReplicaView {
        ReplicaView {
            matched: Some(matched),
            acked_ago: Some(Duration::from_millis(100)),
        }
    }

    fn down(matched: u64) -> ReplicaView {
        ReplicaView {
            matched: Some(matched),
            acked_ago: Some(Duration::from_secs(30)),
        }
    }

    /// Leader 1, voters 1..=n, learner n+1 with `learner`, the other voters as given.
    fn view(n: u64, others: &[ReplicaView], learner: Option<ReplicaView>) -> PromotionView {
        let mut replicas: BTreeMap<NodeId, ReplicaView> = (2..=n)
            .zip(others.iter().copied())
            .collect::<BTreeMap<_, _>>();
        if let Some(l) = learner {
            replicas.insert(n + 1, l);
        }
        PromotionView {
            leader: 1,
            voters: (1..=n).collect(),
            learner: n + 1,
            needed: 50,
            replicas,
            live_within: WINDOW,
        }
    }

    #[test]
    fn a_caught_up_learner_of_a_healthy_group_is_promoted() {
        for n in 1..=6u64 {
            let others = vec![up(50); (n - 1) as usize];
            assert_eq!(
                decide(&view(n, &others, Some(up(50)))),
                Promotion::Promote,
                "{n} voters"
            );
        }
    }

    #[test]
    fn a_learner_never_heard_from_is_unreachable() {
        // The reported attack: node 99 at an address where nothing listens.
        let never = ReplicaView {
            matched: None,
            acked_ago: None,
        };
        let v = view(3, &[up(50), up(50)], Some(never));
        assert_eq!(decide(&v), Promotion::Unreachable { learner: 4 });
        assert!(decide(&v).worth_waiting());
        // Not even in the replication view.
        assert_eq!(
            decide(&view(3, &[up(50), up(50)], None)),
            Promotion::Unreachable { learner: 4 }
        );
        // Heard from once, long ago.
        assert_eq!(
            decide(&view(3, &[up(50), up(50)], Some(down(50)))),
            Promotion::Unreachable { learner: 4 }
        );
    }

    #[test]
    fn a_learner_behind_is_not_caught_up() {
        let v = view(3, &[up(50), up(50)], Some(up(49)));
        assert_eq!(
            decide(&v),
            Promotion::NotCaughtUp {
                learner: 4,
                matched: Some(49),
                needed: 50
            }
        );
        assert!(decide(&v).worth_waiting());
        let nothing = ReplicaView {
            matched: None,
            acked_ago: Some(Duration::ZERO),
        };
        assert!(matches!(
            decide(&view(3, &[up(50), up(50)], Some(nothing))),
            Promotion::NotCaughtUp { matched: None, .. }
        ));
        // The boundary: holding exactly the needed index is enough.
        assert_eq!(
            decide(&view(3, &[up(50), up(50)], Some(up(50)))),
            Promotion::Promote
        );
    }

    #[test]
    fn a_degraded_group_is_not_grown() {
        // 3 voters, one down: as 4 voters it would need 3 of the 3 that answer.
        let v = view(3, &[up(50), down(40)], Some(up(50)));
        assert_eq!(
            decide(&v),
            Promotion::NoSpareFailure {
                learner: 4,
                live_voters: 2,
                voters: 3
            }
        );
        assert!(!decide(&v).worth_waiting());
        // 4 voters, one down: as 5 it needs 3 of 4 that answer, one spare: fine.
        assert_eq!(
            decide(&view(4, &[up(50), up(50), down(40)], Some(up(50)))),
            Promotion::Promote
        );
        // 2 voters, one down: 3 voters with 2 answering have no spare.
        assert!(matches!(
            decide(&view(2, &[down(40)], Some(up(50)))),
            Promotion::NoSpareFailure { .. }
        ));
        // 1 voter: 2 voters can never spare a failure, so growing to 2 is allowed.
        assert_eq!(decide(&view(1, &[], Some(up(50)))), Promotion::Promote);
    }

    #[test]
    fn a_voter_is_left_alone() {
        let mut v = view(3, &[up(50), up(50)], Some(up(50)));
        v.voters.insert(4);
        assert_eq!(decide(&v), Promotion::AlreadyVoter);
    }

    /// Seeded model check: over random views, a promotion never leaves a group that answers
    /// now without a spare failure when its size allows one, and never promotes a silent or
    /// lagging learner.
    #[test]
    fn seeded_random_views_keep_the_invariants() {
        let mut state: u64 = 0x5eed_2026_1204;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut promoted = 0;
        for _ in 0..20_000 {
            let n = 1 + next(7);
            let others: Vec<ReplicaView> = (2..=n)
                .map(|_| ReplicaView {
                    matched: Some(next(60)),
                    acked_ago: (next(5) > 0).then(|| Duration::from_millis(next(2600))),
                })
                .collect();
            // Around the needed index (50), mostly heard from recently.
            let learner = (next(8) > 0).then(|| ReplicaView {
                matched: (next(8) > 0).then(|| 45 + next(10)),
                acked_ago: (next(8) > 0).then(|| Duration::from_millis(next(2600))),
            });
            let v = view(n, &others, learner);
            if decide(&v) != Promotion::Promote {
                continue;
            }
            promoted += 1;
            let l = v.replicas[&v.learner];
            assert!(l.acked_ago.is_some_and(|a| a <= WINDOW), "{v:?}");
            assert!(l.matched.is_some_and(|m| m >= v.needed), "{v:?}");
            let size = v.voters.len() + 1;
            let live = 2 + others
                .iter()
                .filter(|r| r.acked_ago.is_some_and(|a| a <= WINDOW))
                .count();
            if size >= 3 {
                assert!(live > quorum(size), "no spare failure: {v:?}");
            } else {
                assert_eq!(live, size, "{v:?}");
            }
        }
        assert!(
            promoted > 1000,
            "the model reached few promotions: {promoted}"
        );
    }
}
