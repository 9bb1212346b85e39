//! Scrubbing: finding stored bytes that went bad, and what to do about them.
//!
//! A pass over a partition replica reads every stored record, checks its CRC32C (record
//! format v2 carries one) and digests the records in ranges of [`DIGEST_SPAN`] offsets; a
//! follower compares its digests with its leader's over the offsets both have applied. A
//! failed checksum or a differing range is a corruption event. The replica cannot serve what
//! it lost, so it is wiped and rejoins the group as an empty replica that catches up from
//! the leader (log or snapshot) and does not vote before it holds what the members had
//! applied ([`junction_raft::rejoin`]). A leader never wipes itself: it hands leadership to
//! another voter, and the next pass repairs it as a follower.
//!
//! This module decides; [`crate::Broker`] reads, asks and acts (the I/O).

use junction_types::GroupId;

/// How the background scrubber runs on each node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubTuning {
    /// Time between the end of one pass and the start of the next; `None`: no background
    /// passes (`junction cluster scrub` still runs one).
    pub every: Option<std::time::Duration>,
    /// Most bytes a background pass reads per second (0: no limit).
    pub bytes_per_sec: u64,
}

impl Default for ScrubTuning {
    fn default() -> Self {
        Self {
            every: Some(std::time::Duration::from_secs(24 * 3600)),
            bytes_per_sec: 32 << 20,
        }
    }
}

/// How long to pause after reading `bytes` to keep to `bytes_per_sec` (0: no limit).
pub fn pace(bytes: u64, bytes_per_sec: u64) -> std::time::Duration {
    if bytes_per_sec == 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_micros(bytes.saturating_mul(1_000_000) / bytes_per_sec)
}

/// Offsets per digest range.
pub const DIGEST_SPAN: u64 = 1024;

/// The digest of records in ranges of `span` offsets from `from`, up to `to` (exclusive).
/// `records` yields (offset, checked record body) in offset order; offsets outside
/// `[from, to)` are ignored. Each digest covers the offset and body of every record of its
/// range (a compacted-away offset is simply absent, the same on every replica).
#[derive(Debug)]
pub struct Digester {
    from: u64,
    to: u64,
    span: u64,
    digests: Vec<u32>,
}

impl Digester {
    /// Starts digesting `[from, to)` in ranges of `span` (at least 1) offsets.
    pub fn new(from: u64, to: u64, span: u64) -> Self {
        let span = span.max(1);
        let n = to.saturating_sub(from).div_ceil(span);
        Self {
            from,
            to,
            span,
            digests: vec![0; usize::try_from(n).unwrap_or(usize::MAX)],
        }
    }

    /// Adds one record.
    pub fn add(&mut self, offset: u64, body: &[u8]) {
        if offset < self.from || offset >= self.to {
            return;
        }
        let i = usize::try_from((offset - self.from) / self.span).unwrap_or(usize::MAX);
        if let Some(d) = self.digests.get_mut(i) {
            let with_offset = crc32c::crc32c_append(*d, &offset.to_le_bytes());
            *d = crc32c::crc32c_append(with_offset, body);
        }
    }

    /// The digests, one per range.
    pub fn finish(self) -> Vec<u32> {
        self.digests
    }
}

/// The offsets a follower and its leader both hold and have applied: `[from, to)`, or
/// `None` when they share nothing to compare.
pub fn common_range(local: (u64, u64), leader: (u64, u64)) -> Option<(u64, u64)> {
    let from = local.0.max(leader.0);
    let to = local.1.min(leader.1);
    (from < to).then_some((from, to))
}

/// How many ranges differ (digests of the same ranges; a length difference counts as the
/// missing ranges differing).
pub fn mismatched(local: &[u32], leader: &[u32]) -> u64 {
    let differing = local.iter().zip(leader).filter(|(a, b)| a != b).count();
    (differing + local.len().abs_diff(leader.len())) as u64
}

/// What a pass found in one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Findings {
    pub corrupt_records: u64,
    pub mismatched_ranges: u64,
}

impl Findings {
    /// Whether the replica holds bytes it must not serve.
    pub fn corrupt(&self) -> bool {
        self.corrupt_records > 0 || self.mismatched_ranges > 0
    }
}

/// What to do with a replica after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing found.
    Healthy,
    /// Wipe it and rejoin as an empty replica.
    Repair,
    /// It leads: move leadership to this voter first; the next pass repairs it.
    HandOver(junction_types::NodeId),
    /// Corrupt, but no healthy majority is known to take over or to copy from (a single
    /// replica, or no other voter): leave it, report it.
    Stuck,
}

/// Decides what to do with replica `me` of `group` given what a pass found, whether it
/// leads, and the group's voters.
pub fn decide(
    findings: Findings,
    me: junction_types::NodeId,
    leads: bool,
    voters: &[junction_types::NodeId],
    group: GroupId,
) -> Action {
    if !findings.corrupt() {
        return Action::Healthy;
    }
    let others: Vec<_> = voters.iter().copied().filter(|v| *v != me).collect();
    // A majority of the group without this replica must exist to copy from.
    if others.is_empty() || others.len() < voters.len() / 2 + 1 {
        return Action::Stuck;
    }
    if leads {
        // Spread handovers of different groups over the other voters.
        let pick = usize::try_from(group % others.len() as u64).unwrap_or(0);
        return Action::HandOver(others[pick]);
    }
    Action::Repair
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(records: &[(u64, &[u8])], from: u64, to: u64, span: u64) -> Vec<u32> {
        let mut d = Digester::new(from, to, span);
        for (o, b) in records {
            d.add(*o, b);
        }
        d.finish()
    }

    #[test]
    fn equal_records_digest_equally_and_a_flipped_bit_shows_in_its_range_only() {
        let bodies: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 16]).collect();
        let records: Vec<(u64, &[u8])> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64, b.as_slice()))
            .collect();
        let a = digests(&records, 0, 10, 4);
        assert_eq!(a.len(), 3);
        assert_eq!(a, digests(&records, 0, 10, 4));
        let mut flipped = bodies.clone();
        flipped[5][3] ^= 1;
        let records_b: Vec<(u64, &[u8])> = flipped
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64, b.as_slice()))
            .collect();
        let b = digests(&records_b, 0, 10, 4);
        assert_eq!(mismatched(&a, &b), 1);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_eq!(a[2], b[2]);
    }

    #[test]
    fn a_missing_or_moved_record_changes_the_digest() {
        let r: Vec<(u64, &[u8])> = vec![(0, b"a"), (1, b"b"), (2, b"c")];
        let missing: Vec<(u64, &[u8])> = vec![(0, b"a"), (2, b"c")];
        let moved: Vec<(u64, &[u8])> = vec![(0, b"a"), (1, b"c"), (2, b"b")];
        let d = digests(&r, 0, 3, 10);
        assert_ne!(d, digests(&missing, 0, 3, 10));
        assert_ne!(d, digests(&moved, 0, 3, 10));
        // Records outside the range do not count.
        let more: Vec<(u64, &[u8])> = vec![(0, b"a"), (1, b"b"), (2, b"c"), (3, b"x")];
        assert_eq!(d, digests(&more, 0, 3, 10));
    }

    #[test]
    fn the_common_range_is_what_both_hold() {
        assert_eq!(common_range((0, 100), (0, 120)), Some((0, 100)));
        assert_eq!(common_range((30, 100), (10, 90)), Some((30, 90)));
        assert_eq!(common_range((0, 0), (0, 50)), None);
        assert_eq!(common_range((60, 80), (0, 60)), None);
        assert_eq!(mismatched(&[1, 2], &[1, 2, 3]), 1);
        assert_eq!(mismatched(&[], &[]), 0);
    }

    #[test]
    fn pacing_keeps_to_the_rate() {
        use std::time::Duration;
        assert_eq!(pace(1 << 20, 0), Duration::ZERO);
        assert_eq!(pace(32 << 20, 32 << 20), Duration::from_secs(1));
        assert_eq!(pace(8 << 20, 32 << 20), Duration::from_millis(250));
        assert_eq!(pace(0, 1), Duration::ZERO);
        assert_eq!(pace(u64::MAX, 1), Duration::from_micros(u64::MAX));
    }

    #[test]
    fn decisions() {
        let bad = Findings {
            corrupt_records: 1,
            mismatched_ranges: 0,
        };
        let voters = [1, 2, 3];
        assert_eq!(
            decide(Findings::default(), 1, true, &voters, 7),
            Action::Healthy
        );
        assert_eq!(decide(bad, 3, false, &voters, 7), Action::Repair);
        match decide(bad, 1, true, &voters, 7) {
            Action::HandOver(to) => assert!(to == 2 || to == 3),
            other => panic!("a corrupt leader must hand over, not {other:?}"),
        }
        assert_eq!(decide(bad, 1, true, &[1], 7), Action::Stuck);
        assert_eq!(decide(bad, 1, false, &[1, 2], 7), Action::Stuck);
        let diverged = Findings {
            corrupt_records: 0,
            mismatched_ranges: 2,
        };
        assert_eq!(decide(diverged, 2, false, &voters, 7), Action::Repair);
    }

    /// Seeded model: for random replica contents and a random single corruption, the
    /// follower's digests differ from the leader's exactly when the corruption falls in the
    /// compared range, and always in exactly one range.
    #[test]
    fn seeded_model_corruption_is_found_in_its_range() {
        let mut rng = junction_testkit::SplitMix(0x5c2b_2026);
        for _ in 0..500 {
            let n = rng.below(300) + 1;
            let span = rng.below(64) + 1;
            let bodies: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    (0..rng.below(20) + 1)
                        .map(|_| rng.below(256) as u8)
                        .collect()
                })
                .collect();
            let leader_next = n;
            let local_next = rng.below(n) + 1;
            let start = rng.below(local_next);
            let (from, to) = common_range((start, local_next), (0, leader_next)).expect("shared");
            let leader: Vec<(u64, &[u8])> = bodies
                .iter()
                .enumerate()
                .map(|(i, b)| (i as u64, b.as_slice()))
                .collect();
            let bad_at = rng.below(n) as usize;
            let mut local_bodies = bodies.clone();
            let byte = rng.below(local_bodies[bad_at].len() as u64) as usize;
            local_bodies[bad_at][byte] ^= 1 << rng.below(8);
            let local: Vec<(u64, &[u8])> = local_bodies
                .iter()
                .enumerate()
                .map(|(i, b)| (i as u64, b.as_slice()))
                .collect();
            let m = mismatched(
                &digests(&local, from, to, span),
                &digests(&leader, from, to, span),
            );
            let inside = (from..to).contains(&(bad_at as u64));
            assert_eq!(
                m,
                u64::from(inside),
                "n={n} span={span} bad_at={bad_at} [{from},{to})"
            );
        }
    }
}
