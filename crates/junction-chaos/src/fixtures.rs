//! Test fixtures shared by the checker, report and timeline tests.

use crate::history::{Attempt, Election, FaultRecord, LeaderKill, Outcome};
use crate::schedule::FaultKind;

/// An acknowledged attempt of `key#seq` at `partition:offset`, running `start..end` ms.
pub fn acked(key: &str, seq: u64, partition: u32, offset: u64, start: u64, end: u64) -> Attempt {
    Attempt {
        key: key.into(),
        seq,
        attempt: 1,
        uid: seq,
        producer: 0,
        node: 1,
        start_ms: start,
        end_ms: end,
        outcome: Outcome::Ok { partition, offset },
    }
}

/// An acknowledged attempt on partition `p`, running `start..end` ms.
pub fn ack(p: u32, start: u64, end: u64) -> Attempt {
    acked("k", 0, p, 0, start, end)
}

/// A kill of node 2 at 1000 ms, leader of partitions 0 and 1 and of the metadata group:
/// partition 0 elected a new leader 700 ms later, the metadata group 900 ms later.
pub fn kill_fault() -> FaultRecord {
    FaultRecord {
        index: 3,
        kind: FaultKind::KillPartitionLeader,
        description: "kill".into(),
        start_ms: 1000,
        end_ms: 4000,
        nodes: vec![2],
        skipped: None,
        outcome: None,
        leader_kill: Some(LeaderKill {
            node: 2,
            killed_at_ms: 1000,
            partitions: vec![0, 1],
            metadata: true,
            elections: vec![
                Election {
                    partition: Some(0),
                    new_leader_ms: Some(700),
                    resumed_ms: None,
                },
                Election {
                    partition: None,
                    new_leader_ms: Some(900),
                    resumed_ms: None,
                },
            ],
        }),
        notes: vec![],
    }
}
