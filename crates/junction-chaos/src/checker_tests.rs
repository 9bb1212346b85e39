//! Hand-made histories, clean and with every kind of violation.

use super::*;
use crate::history::{Attempt, Observation, Outcome};

const PARTS: u32 = 3;

/// A key that maps to partition `p` (of `PARTS`).
fn key_in(p: u32) -> String {
    (0..1000)
        .map(|i| format!("tenant-{i:03}"))
        .find(|k| partition_for_key(k.as_bytes(), PARTS) == p)
        .unwrap()
}

fn attempt(key: &str, seq: u64, attempt: u32, outcome: Outcome) -> Attempt {
    Attempt {
        key: key.to_owned(),
        seq,
        attempt,
        uid: seq * 1000 + 7,
        producer: 0,
        node: 1,
        start_ms: seq * 10,
        end_ms: seq * 10 + 5,
        outcome,
    }
}

fn ok(key: &str, seq: u64, n: u32, offset: u64) -> Attempt {
    let partition = partition_for_key(key.as_bytes(), PARTS);
    attempt(key, seq, n, Outcome::Ok { partition, offset })
}

fn indeterminate(key: &str, seq: u64, n: u32) -> Attempt {
    attempt(
        key,
        seq,
        n,
        Outcome::Indeterminate {
            reason: "timeout".into(),
        },
    )
}

fn failed(key: &str, seq: u64, n: u32) -> Attempt {
    attempt(
        key,
        seq,
        n,
        Outcome::Failed {
            code: "NotFound".into(),
            message: "no station".into(),
        },
    )
}

fn entry(offset: u64, a: &Attempt) -> StoredEntry {
    StoredEntry {
        offset,
        key: Some(a.key.as_bytes().to_vec()),
        payload: a.payload(),
    }
}

/// Every partition with the same contents on nodes 1, 2 and 3.
fn replicated(contents: BTreeMap<u32, Vec<StoredEntry>>) -> BTreeMap<u32, Vec<ReplicaRead>> {
    (0..PARTS)
        .map(|p| {
            let entries = contents.get(&p).cloned().unwrap_or_default();
            let reads = (1..=3)
                .map(|node| ReplicaRead {
                    node,
                    result: Ok(Replica {
                        node,
                        start_offset: 0,
                        entries: entries.clone(),
                    }),
                })
                .collect();
            (p, reads)
        })
        .collect()
}

fn run(
    attempts: &[Attempt],
    replicas: &BTreeMap<u32, Vec<ReplicaRead>>,
    observations: &[Observation],
) -> CheckReport {
    check(&CheckInput {
        partitions: PARTS,
        attempts,
        observations,
        replicas,
        exactly_once: false,
    })
}

fn kinds(r: &CheckReport) -> Vec<ViolationKind> {
    r.violations.iter().map(|v| v.kind).collect()
}

/// Key `k` in partition 0 with seqs 0..3 acknowledged at offsets 0..3.
fn clean() -> (String, Vec<Attempt>, BTreeMap<u32, Vec<StoredEntry>>) {
    let k = key_in(0);
    let attempts: Vec<Attempt> = (0..3).map(|s| ok(&k, s, 1, s)).collect();
    let stored = attempts.iter().map(|a| entry(a_offset(a), a)).collect();
    (k, attempts, BTreeMap::from([(0, stored)]))
}

fn a_offset(a: &Attempt) -> u64 {
    match a.outcome {
        Outcome::Ok { offset, .. } => offset,
        _ => panic!("not ok"),
    }
}

fn observe(p: u32, offset: u64, a: &Attempt) -> Observation {
    Observation {
        partition: p,
        offset,
        payload: a.payload(),
        at_ms: 1,
    }
}

#[test]
fn a_clean_history_passes() {
    let (_, attempts, stored) = clean();
    let obs: Vec<Observation> = attempts
        .iter()
        .enumerate()
        .map(|(i, a)| observe(0, i as u64, a))
        .collect();
    let r = run(&attempts, &replicated(stored), &obs);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.stats.ok, 3);
    assert_eq!(r.stats.stored, 3);
    assert_eq!(r.stats.duplicates, 0);
    assert_eq!(r.stats.replicas_checked, 9);
    assert_eq!(r.stats.observations, 3);
}

#[test]
fn a_lost_acknowledgement_is_caught() {
    let (_, attempts, mut stored) = clean();
    stored.get_mut(&0).unwrap().truncate(2);
    let r = run(&attempts, &replicated(stored), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::Lost]);
    assert_eq!(r.violations[0].offset, Some(2));
}

#[test]
fn an_overwritten_acknowledgement_is_lost_and_the_stranger_unknown() {
    let (k, attempts, mut stored) = clean();
    let stranger = StoredEntry {
        offset: 1,
        key: Some(k.as_bytes().to_vec()),
        payload: b"hello".to_vec(),
    };
    stored.get_mut(&0).unwrap()[1] = stranger;
    let r = run(&attempts, &replicated(stored), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::Lost, ViolationKind::Unknown]);
}

#[test]
fn reordering_is_caught() {
    let k = key_in(0);
    let a0 = ok(&k, 0, 1, 1);
    let a1 = ok(&k, 1, 1, 0);
    let stored = BTreeMap::from([(0, vec![entry(0, &a1), entry(1, &a0)])]);
    let r = run(&[a0, a1], &replicated(stored), &[]);
    // Both the key's order and the real-time order are broken.
    assert_eq!(
        kinds(&r),
        vec![ViolationKind::Reordered, ViolationKind::Reordered]
    );
    assert!(
        r.violations
            .iter()
            .all(|v| v.key.as_deref() == Some(k.as_str()))
    );
}

#[test]
fn real_time_order_across_keys_is_checked() {
    // Two keys of partition 0: b starts after a was acknowledged yet gets a lower offset.
    let k1 = key_in(0);
    let k2 = (0..1000)
        .map(|i| format!("tenant-{i:03}"))
        .filter(|k| partition_for_key(k.as_bytes(), PARTS) == 0)
        .nth(1)
        .unwrap();
    let mut a = ok(&k1, 0, 1, 1);
    a.start_ms = 0;
    a.end_ms = 10;
    let mut b = ok(&k2, 0, 1, 0);
    b.start_ms = 20;
    b.end_ms = 30;
    let stored = BTreeMap::from([(0, vec![entry(0, &b), entry(1, &a)])]);
    let r = run(&[a.clone(), b.clone()], &replicated(stored.clone()), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::Reordered]);
    assert!(r.violations[0].detail.contains("real-time"));
    // Overlapping produces may land in either order.
    b.start_ms = 5;
    let r = run(&[a, b], &replicated(stored), &[]);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
}

#[test]
fn a_duplicate_from_an_indeterminate_attempt_is_allowed_and_counted() {
    let k = key_in(1);
    let first = indeterminate(&k, 0, 1);
    let retry = ok(&k, 0, 2, 1);
    let next = ok(&k, 1, 1, 2);
    let stored = BTreeMap::from([(1, vec![entry(0, &first), entry(1, &retry), entry(2, &next)])]);
    let r = run(&[first, retry, next], &replicated(stored), &[]);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.stats.duplicates, 1);
    assert_eq!(r.stats.indeterminate_landed, 1);
    assert_eq!(r.stats.late_duplicates, 0);
}

#[test]
fn an_indeterminate_write_landing_late_is_allowed() {
    // seq 0's first attempt timed out but was committed after the retry and after seq 1.
    let k = key_in(1);
    let first = indeterminate(&k, 0, 1);
    let retry = ok(&k, 0, 2, 0);
    let next = ok(&k, 1, 1, 1);
    let stored = BTreeMap::from([(1, vec![entry(0, &retry), entry(1, &next), entry(2, &first)])]);
    let r = run(&[first, retry, next], &replicated(stored), &[]);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.stats.late_duplicates, 1);
}

#[test]
fn an_attempt_stored_twice_is_an_untraced_duplicate() {
    let k = key_in(0);
    let a = ok(&k, 0, 1, 0);
    let stored = BTreeMap::from([(0, vec![entry(0, &a), entry(1, &a)])]);
    let r = run(std::slice::from_ref(&a), &replicated(stored), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::UntracedDuplicate]);

    let i = indeterminate(&k, 0, 1);
    let stored = BTreeMap::from([(0, vec![entry(0, &i), entry(1, &i)])]);
    let r = run(&[i], &replicated(stored), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::UntracedDuplicate]);
}

#[test]
fn a_failed_attempt_that_was_stored_is_caught() {
    let k = key_in(2);
    let f = failed(&k, 0, 1);
    let retry = ok(&k, 0, 2, 1);
    let stored = BTreeMap::from([(2, vec![entry(0, &f), entry(1, &retry)])]);
    let r = run(&[f, retry], &replicated(stored), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::FailedButWritten]);
}

#[test]
fn payloads_nobody_sent_are_unknown() {
    let (k, attempts, mut stored) = clean();
    let mut forged = ok(&k, 7, 1, 3);
    stored.get_mut(&0).unwrap().push(entry(3, &forged));
    forged.uid += 1;
    let mut with_other_uid = attempts.clone();
    with_other_uid.push(forged);
    let r = run(&with_other_uid, &replicated(stored.clone()), &[]);
    // The stored copy names an attempt whose uid differs, and that ack is then "lost".
    assert_eq!(kinds(&r), vec![ViolationKind::Lost, ViolationKind::Unknown]);
    let r = run(&attempts, &replicated(stored), &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::Unknown]);
}

#[test]
fn a_message_in_the_wrong_partition_is_caught() {
    let k = key_in(0);
    let mut a = ok(&k, 0, 1, 0);
    a.outcome = Outcome::Ok {
        partition: 1,
        offset: 0,
    };
    let stored = BTreeMap::from([(1, vec![entry(0, &a)])]);
    let r = run(&[a], &replicated(stored), &[]);
    assert_eq!(
        kinds(&r),
        vec![ViolationKind::WrongPartition, ViolationKind::WrongPartition]
    );
}

#[test]
fn divergent_replicas_and_gaps_are_caught() {
    let (_, attempts, stored) = clean();
    let mut replicas = replicated(stored);
    // Node 2 misses the last message; node 3 has offsets 0, 2 (a gap and a hole).
    let reads = replicas.get_mut(&0).unwrap();
    if let Ok(r) = &mut reads[1].result {
        r.entries.truncate(2);
    }
    if let Ok(r) = &mut reads[2].result {
        r.entries.remove(1);
    }
    let r = run(&attempts, &replicas, &[]);
    let k = kinds(&r);
    assert!(k.contains(&ViolationKind::OffsetGap), "{k:?}");
    assert_eq!(
        k.iter()
            .filter(|x| **x == ViolationKind::ReplicaDivergence)
            .count(),
        2
    );
    // Node 1 (the longest) is the reference, so nothing is lost.
    assert!(!k.contains(&ViolationKind::Lost));
}

#[test]
fn byte_differences_between_replicas_are_divergence() {
    let (_, attempts, stored) = clean();
    let mut replicas = replicated(stored);
    if let Ok(r) = &mut replicas.get_mut(&0).unwrap()[2].result {
        r.entries[0].payload.push(b'!');
    }
    let r = run(&attempts, &replicas, &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::ReplicaDivergence]);
    assert_eq!(r.violations[0].node, Some(3));
}

#[test]
fn unreadable_replicas_are_reported() {
    let (_, attempts, stored) = clean();
    let mut replicas = replicated(stored);
    replicas.get_mut(&0).unwrap()[0].result = Err("connection refused".into());
    let r = run(&attempts, &replicas, &[]);
    assert_eq!(kinds(&r), vec![ViolationKind::ReplicaUnreadable]);
    replicas.remove(&1);
    let r = run(&attempts, &replicas, &[]);
    assert_eq!(
        kinds(&r),
        vec![
            ViolationKind::ReplicaUnreadable,
            ViolationKind::ReplicaUnreadable
        ]
    );
}

#[test]
fn a_read_that_vanished_is_caught() {
    let (_, attempts, stored) = clean();
    let k = key_in(0);
    let ghost = indeterminate(&k, 3, 1);
    let mut obs: Vec<Observation> = attempts
        .iter()
        .enumerate()
        .map(|(i, a)| observe(0, i as u64, a))
        .collect();
    obs.push(observe(0, 3, &ghost));
    let mut all = attempts.clone();
    all.push(ghost);
    let r = run(&all, &replicated(stored), &obs);
    assert_eq!(kinds(&r), vec![ViolationKind::VanishedRead]);
}

#[test]
fn a_reader_that_skips_is_caught() {
    let (_, attempts, stored) = clean();
    let obs = vec![observe(0, 0, &attempts[0]), observe(0, 2, &attempts[2])];
    let r = run(&attempts, &replicated(stored), &obs);
    assert_eq!(kinds(&r), vec![ViolationKind::TailGap]);
}

#[test]
fn counts_by_kind() {
    let v = vec![
        Violation::new(ViolationKind::Lost, "a"),
        Violation::new(ViolationKind::Lost, "b"),
        Violation::new(ViolationKind::TailGap, "c"),
    ];
    let m = count_by_kind(&v);
    assert_eq!(m.get(&ViolationKind::Lost), Some(&2));
    assert_eq!(m.get(&ViolationKind::TailGap), Some(&1));
    assert!(v[0].to_string().starts_with("[lost]"));
}

#[test]
fn with_idempotent_producers_any_duplicate_is_a_violation() {
    let k = key_in(1);
    let first = indeterminate(&k, 0, 1);
    let retry = ok(&k, 0, 2, 1);
    let next = ok(&k, 1, 1, 2);
    let stored = BTreeMap::from([(1, vec![entry(0, &first), entry(1, &retry), entry(2, &next)])]);
    let replicas = replicated(stored);
    let attempts = [first, retry, next];
    let r = check(&CheckInput {
        partitions: PARTS,
        attempts: &attempts,
        observations: &[],
        replicas: &replicas,
        exactly_once: true,
    });
    assert_eq!(kinds(&r), vec![ViolationKind::Duplicate]);
    assert_eq!(r.violations[0].key.as_deref(), Some(k.as_str()));
}

#[test]
fn a_resent_payload_is_judged_by_its_acknowledged_attempt() {
    // Idempotent retries resend the same payload: an indeterminate try, then an acknowledged
    // one (the same payload id), stored once.
    let k = key_in(0);
    let lost = indeterminate(&k, 0, 1);
    let acked = ok(&k, 0, 1, 0);
    let stored = BTreeMap::from([(0, vec![entry(0, &acked)])]);
    let replicas = replicated(stored);
    let attempts = [acked.clone(), lost];
    let r = check(&CheckInput {
        partitions: PARTS,
        attempts: &attempts,
        observations: &[],
        replicas: &replicas,
        exactly_once: true,
    });
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.stats.duplicates, 0);
}
