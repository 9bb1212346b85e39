//! A node that starts with empty state: initialise a cluster, or rejoin the one it belongs to.
//!
//! A node loses its state when its disk or volume is replaced (a PVC recreated, a data
//! directory deleted). Its members may still run a cluster it was part of; initialising a new
//! one then splits it off for good. So before a node with empty state initialises, it asks
//! its configured members for their cluster id and how far each of their groups has applied
//! ([`decide`]): a member with an id means the cluster exists, and the node rejoins it as an
//! empty replica; only when no member answers with an id does the node that may initialise
//! (the lowest id, or one started with `--bootstrap`) do so.
//!
//! An empty replica is still a voter wherever it was one, and Raft's vote check compares a
//! candidate's log with the voter's own: an empty log grants every vote. A candidate that
//! misses entries which only the lost copy and one other replica held could then win with
//! this node's vote and overwrite entries that were acknowledged. So a rejoining node keeps
//! [`VoteFloors`]: per group, the highest index its members had applied when it asked (every
//! entry acknowledged to a client by then is at or below it). Until its own log reaches the
//! floor, it grants a vote (or pre-vote) in that group only to a candidate whose log reaches
//! it too. Once it has caught up, Raft's own check suffices. The floors are kept in the
//! node's store, so a crash in the middle of catching up does not forget them.

use std::collections::BTreeMap;

use junction_types::{GroupId, NodeId};

use crate::RaftStoreError;

/// What one member answered when asked for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub node: NodeId,
    /// Empty when the member does not know a cluster id yet.
    pub cluster_id: String,
    /// The last applied index of each group the member hosts.
    pub applied: BTreeMap<GroupId, u64>,
}

/// What a node with empty state does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Initialise a new cluster of the configured members.
    Initialise,
    /// Rejoin cluster `cluster_id`: adopt its id, initialise nothing, and vote only as
    /// [`VoteFloors`] allows until caught up.
    Rejoin {
        cluster_id: String,
        floors: VoteFloors,
    },
    /// Wait to be brought in (by the initialising node, or through `JoinCluster`).
    Wait,
}

/// Decides from the members' answers (those that answered at all). `may_initialise`: this
/// node is the lowest configured id or was started with `--bootstrap`.
///
/// Members that name different clusters are an error: the member list mixes clusters, and
/// no choice would be right.
pub fn decide(may_initialise: bool, answers: &[ProbeAnswer]) -> Result<Bootstrap, String> {
    let mut ids = answers
        .iter()
        .filter(|a| !a.cluster_id.is_empty())
        .map(|a| (a.cluster_id.as_str(), a.node));
    let Some((cluster_id, first)) = ids.next() else {
        return Ok(if may_initialise {
            Bootstrap::Initialise
        } else {
            Bootstrap::Wait
        });
    };
    if let Some((other, node)) = ids.find(|(id, _)| *id != cluster_id) {
        return Err(format!(
            "the configured members belong to different clusters: member {first} to \
             {cluster_id}, member {node} to {other}"
        ));
    }
    // A group nothing was applied in yet (one just created, its first replica not started)
    // gets no floor: it holds nothing to lose, and this node may still be the replica that
    // initialises it.
    let mut floors = BTreeMap::new();
    for a in answers.iter().filter(|a| a.cluster_id == cluster_id) {
        for (group, applied) in a.applied.iter().filter(|(_, a)| **a > 0) {
            let floor = floors.entry(*group).or_insert(0);
            *floor = (*floor).max(*applied);
        }
    }
    Ok(Bootstrap::Rejoin {
        cluster_id: cluster_id.to_owned(),
        floors: VoteFloors(floors),
    })
}

/// Per group, the log index a rejoining replica must hold (or a candidate must reach) before
/// it grants votes there. Empty for a node that never rejoined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VoteFloors(BTreeMap<GroupId, u64>);

/// The version byte of [`VoteFloors::encode`].
const FLOORS_VERSION: u8 = 1;

impl VoteFloors {
    pub fn new(floors: BTreeMap<GroupId, u64>) -> Self {
        Self(floors)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `group`'s floor to `floor`, or keeps a higher one.
    pub fn raise(&mut self, group: GroupId, floor: u64) {
        let f = self.0.entry(group).or_insert(floor);
        *f = (*f).max(floor);
    }

    pub fn floor(&self, group: GroupId) -> Option<u64> {
        self.0.get(&group).copied()
    }

    /// Whether this replica, holding its log up to `own_last`, may grant a vote in `group`
    /// to a candidate whose log ends at `candidate_last` (Raft's own check still follows).
    pub fn may_grant(
        &self,
        group: GroupId,
        own_last: Option<u64>,
        candidate_last: Option<u64>,
    ) -> bool {
        match self.0.get(&group) {
            None | Some(0) => true,
            Some(&floor) => own_last >= Some(floor) || candidate_last >= Some(floor),
        }
    }

    /// The stored form: a version byte, then the number of groups and each (group, floor),
    /// all as little-endian u64.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + 16 * self.0.len());
        out.push(FLOORS_VERSION);
        out.extend_from_slice(&(self.0.len() as u64).to_le_bytes());
        for (group, floor) in &self.0 {
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&floor.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RaftStoreError> {
        const WHAT: &str = "the rejoin vote floors";
        let bad = |detail: &str| RaftStoreError::Format {
            what: WHAT,
            detail: detail.to_owned(),
        };
        let (&version, rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
        if version != FLOORS_VERSION {
            return Err(RaftStoreError::Version {
                what: WHAT,
                found: version,
                supported: FLOORS_VERSION,
            });
        }
        let mut words = rest.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        });
        if rest.len() % 8 != 0 {
            return Err(bad("length is not a whole number of words"));
        }
        let n = words.next().ok_or_else(|| bad("no count"))?;
        if (rest.len() / 8) as u64 != 1 + 2 * n {
            return Err(bad("count does not match the length"));
        }
        let mut floors = BTreeMap::new();
        while let (Some(group), Some(floor)) = (words.next(), words.next()) {
            floors.insert(group, floor);
        }
        Ok(Self(floors))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn answer(node: NodeId, id: &str, applied: &[(GroupId, u64)]) -> ProbeAnswer {
        ProbeAnswer {
            node,
            cluster_id: id.to_owned(),
            applied: applied.iter().copied().collect(),
        }
    }

    #[test]
    fn without_an_existing_cluster_only_the_chosen_node_initialises() {
        let fresh = [answer(2, "", &[(0, 0)]), answer(3, "", &[])];
        assert_eq!(decide(true, &fresh), Ok(Bootstrap::Initialise));
        assert_eq!(decide(false, &fresh), Ok(Bootstrap::Wait));
        // Nobody answered at all.
        assert_eq!(decide(true, &[]), Ok(Bootstrap::Initialise));
        assert_eq!(decide(false, &[]), Ok(Bootstrap::Wait));
    }

    #[test]
    fn an_existing_cluster_is_rejoined_with_the_highest_applied_index_per_group() {
        let answers = [
            answer(2, "abc", &[(0, 40), (7, 100)]),
            answer(3, "abc", &[(0, 42), (7, 90), (9, 5), (11, 0)]),
            // A member that has not learnt the id yet says nothing about the cluster.
            answer(4, "", &[(0, 1_000)]),
        ];
        for may_initialise in [true, false] {
            let Ok(Bootstrap::Rejoin { cluster_id, floors }) = decide(may_initialise, &answers)
            else {
                panic!("expected a rejoin");
            };
            assert_eq!(cluster_id, "abc");
            assert_eq!(
                floors,
                VoteFloors::new([(0, 42), (7, 100), (9, 5)].into_iter().collect())
            );
        }
    }

    #[test]
    fn members_of_different_clusters_are_an_error_naming_both() {
        let err = decide(true, &[answer(2, "abc", &[]), answer(3, "def", &[])]).unwrap_err();
        assert!(err.contains("abc") && err.contains("def") && err.contains("member 3"));
    }

    #[test]
    fn votes_below_the_floor_are_withheld_until_either_log_reaches_it() {
        let floors = VoteFloors::new([(0, 50), (1, 0)].into_iter().collect());
        // Empty and behind: only a candidate that holds the floor gets the vote.
        assert!(!floors.may_grant(0, None, None));
        assert!(!floors.may_grant(0, None, Some(49)));
        assert!(floors.may_grant(0, None, Some(50)));
        assert!(!floors.may_grant(0, Some(10), Some(20)));
        // Caught up: Raft's own check decides.
        assert!(floors.may_grant(0, Some(50), None));
        assert!(floors.may_grant(0, Some(80), Some(3)));
        // No floor, or a floor of 0 (a cluster that had applied nothing).
        assert!(floors.may_grant(1, None, None));
        assert!(floors.may_grant(2, None, None));
        assert!(VoteFloors::default().may_grant(0, None, None));
    }

    /// Seeded model: whatever the floors and logs, a vote is withheld exactly when both logs
    /// are below the group's floor.
    #[test]
    fn model_withholds_exactly_below_the_floor() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..10_000 {
            let floors: BTreeMap<GroupId, u64> = (0..next(4)).map(|g| (g, next(100))).collect();
            let floors = VoteFloors::new(floors);
            let group = next(5);
            let own = (next(4) > 0).then(|| next(120));
            let cand = (next(4) > 0).then(|| next(120));
            let floor = floors.floor(group).unwrap_or(0);
            let withheld =
                floor > 0 && own.is_none_or(|o| o < floor) && cand.is_none_or(|c| c < floor);
            assert_eq!(floors.may_grant(group, own, cand), !withheld);
            // Round trip through the stored form.
            assert_eq!(VoteFloors::decode(&floors.encode()).unwrap(), floors);
        }
    }

    #[test]
    fn stored_floors_are_frozen_bytes() {
        let floors = VoteFloors::new([(0, 42), (7, 0x0102)].into_iter().collect());
        let v1: &[u8] = &[
            1, // version
            2, 0, 0, 0, 0, 0, 0, 0, // two groups
            0, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0, // group 0: 42
            7, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, // group 7: 0x0102
        ];
        assert_eq!(floors.encode(), v1);
        assert_eq!(VoteFloors::decode(v1).unwrap(), floors);
    }

    #[test]
    fn bad_stored_floors_are_errors() {
        assert!(VoteFloors::decode(&[]).is_err());
        let newer = VoteFloors::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert!(newer.to_string().contains("version 2"), "{newer}");
        assert!(
            VoteFloors::decode(&[1, 1, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "count 1, no pairs"
        );
        assert!(
            VoteFloors::decode(&[1, 0, 0, 0]).is_err(),
            "truncated count"
        );
        assert_eq!(
            VoteFloors::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
            VoteFloors::default()
        );
    }
}
