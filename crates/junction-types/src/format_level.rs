//! The cluster's format level: which kinds of Raft entries its nodes may write.
//!
//! A node of a newer build understands entries an older build does not. Writing one while an
//! older node is still a member would stall that node's replication (it refuses what it
//! cannot read), so a new kind of entry is gated: each level names what it adds, every node
//! reports the highest level it understands (in its answers to peers' pings), and the
//! controller raises the level recorded in the metadata ([`crate::MetaState::format_level`])
//! only once every member of the cluster reports it. The level never goes down, and a node
//! whose build understands less than the recorded level refuses to start. (Kafka's
//! `metadata.version` and finalized feature levels work the same way.)
//!
//! | level | adds |
//! |---|---|
//! | 1 | everything before levels existed |
//! | 2 | partition leaders carry a CRC32C of each append's messages in the entry ([`crate::PartitionCommand::Checked`]); every replica checks it before storing them |

use std::collections::BTreeMap;

use crate::NodeId;

/// The level a cluster starts at, and the level of a node that does not report one (a build
/// from before levels).
pub const BASE: u16 = 1;

/// Partition appends carry the leader's CRC32C ([`crate::PartitionCommand::Checked`]).
pub const CHECKED_APPENDS: u16 = 2;

/// The highest level this build understands.
pub const SUPPORTED: u16 = CHECKED_APPENDS;

/// The level the cluster may be raised to: the lowest level any member reports, when that is
/// above `current`. A member that has not reported holds the level where it is.
pub fn raise_to(
    current: u16,
    members: impl IntoIterator<Item = NodeId>,
    reported: &BTreeMap<NodeId, u16>,
) -> Option<u16> {
    let mut lowest: Option<u16> = None;
    for m in members {
        let level = *reported.get(&m)?;
        lowest = Some(lowest.map_or(level, |l| l.min(level)));
    }
    lowest.filter(|l| *l > current)
}

/// Whether a node that takes part in levels up to `mine` may run in a cluster at `level`;
/// otherwise the error names both levels and what to do.
pub fn check_supported(level: u16, mine: u16) -> Result<(), String> {
    if level <= mine {
        Ok(())
    } else if mine < SUPPORTED {
        Err(format!(
            "the cluster runs at format level {level}, and this node is limited to level \
             {mine} (--max-format-level): raise or remove that limit"
        ))
    } else {
        Err(format!(
            "the cluster runs at format level {level}, this build understands up to {mine}: \
             upgrade this node to a newer Junction"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_rises_only_once_every_member_reports_it() {
        let reported: BTreeMap<NodeId, u16> = [(1, 2), (2, 2), (3, 1)].into();
        assert_eq!(raise_to(1, [1, 2, 3], &reported), None, "node 3 is older");
        assert_eq!(raise_to(1, [1, 2], &reported), Some(2));
        assert_eq!(
            raise_to(1, [1, 2, 4], &reported),
            None,
            "node 4 has not answered"
        );
        assert_eq!(raise_to(2, [1, 2], &reported), None, "already there");
        let newer: BTreeMap<NodeId, u16> = [(1, 3), (2, 2)].into();
        assert_eq!(
            raise_to(1, [1, 2], &newer),
            Some(2),
            "the lowest member decides"
        );
        assert_eq!(raise_to(3, [1, 2], &newer), None, "never lowered");
        assert_eq!(raise_to(1, [], &newer), None, "no members, no decision");
    }

    #[test]
    fn a_build_refuses_a_level_above_its_own() {
        assert!(check_supported(BASE, SUPPORTED).is_ok());
        assert!(check_supported(SUPPORTED, SUPPORTED).is_ok());
        let e = check_supported(SUPPORTED + 1, SUPPORTED).unwrap_err();
        assert!(e.contains(&format!("level {}", SUPPORTED + 1)), "{e}");
        assert!(e.contains("upgrade"), "{e}");
        let e = check_supported(CHECKED_APPENDS, BASE).unwrap_err();
        assert!(e.contains("--max-format-level"), "{e}");
    }
}
