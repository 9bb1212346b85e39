//! The history of a run: every produce attempt with its outcome, everything the tailing
//! readers saw, and every fault as it was executed. Pure data, serialisable to JSON.
//!
//! Every attempt writes a distinct payload, `key|seq|attempt|uid`, so a stored message names
//! the exact attempt that wrote it: a duplicate can be traced to the attempt behind it.

use serde::{Deserialize, Serialize};

use crate::schedule::{FaultKind, PlannedFault};

/// How a produce attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Acknowledged at this position.
    Ok { partition: u32, offset: u64 },
    /// Definitely not written (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS).
    Failed { code: String, message: String },
    /// May or may not have been written (timeout, UNAVAILABLE, connection lost, ...).
    Indeterminate { reason: String },
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}

/// One produce RPC of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub key: String,
    /// Per-key sequence number; `seq + 1` is only sent once `seq` is acknowledged.
    pub seq: u64,
    /// 1 for the first attempt at `(key, seq)`, then 2, 3, ... for retries.
    pub attempt: u32,
    /// Unique id of the message `(key, seq)`, shared by its attempts.
    pub uid: u64,
    pub producer: u32,
    /// The node the RPC was sent to.
    pub node: u64,
    /// Milliseconds since the workload started.
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Attempt {
    /// The payload this attempt sent.
    pub fn payload(&self) -> Vec<u8> {
        encode_payload(&PayloadId {
            key: self.key.clone(),
            seq: self.seq,
            attempt: self.attempt,
            uid: self.uid,
        })
    }

    pub fn id(&self) -> PayloadId {
        PayloadId {
            key: self.key.clone(),
            seq: self.seq,
            attempt: self.attempt,
            uid: self.uid,
        }
    }
}

/// What a payload says about the attempt that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PayloadId {
    pub key: String,
    pub seq: u64,
    pub attempt: u32,
    pub uid: u64,
}

pub fn encode_payload(id: &PayloadId) -> Vec<u8> {
    format!("{}|{}|{}|{:016x}", id.key, id.seq, id.attempt, id.uid).into_bytes()
}

/// Parses `key|seq|attempt|uid`; `None` for anything else.
pub fn decode_payload(bytes: &[u8]) -> Option<PayloadId> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split('|');
    let key = parts.next()?.to_owned();
    let seq = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let uid_text = parts.next()?;
    if uid_text.len() != 16 || parts.next().is_some() || key.is_empty() {
        return None;
    }
    let uid = u64::from_str_radix(uid_text, 16).ok()?;
    Some(PayloadId {
        key,
        seq,
        attempt,
        uid,
    })
}

/// Shows a payload as text when it is UTF-8, as hex otherwise.
pub fn show_payload(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => show_payload_hex(bytes),
    }
}

/// A message a tailing reader received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub partition: u32,
    pub offset: u64,
    #[serde(with = "text_bytes")]
    pub payload: Vec<u8>,
    pub at_ms: u64,
}

/// A fault as it was executed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    pub index: usize,
    pub kind: FaultKind,
    /// What was done, with leaders resolved to node ids.
    pub description: String,
    pub start_ms: u64,
    /// When the fault was healed.
    pub end_ms: u64,
    /// Nodes killed, paused, isolated or restarted.
    pub nodes: Vec<u64>,
    /// Set when the fault could not be injected (and why).
    pub skipped: Option<String>,
    /// For kills: what the killed node led at the moment it died.
    pub leader_kill: Option<LeaderKill>,
    /// Anything notable (slow restart, unexpected state).
    pub notes: Vec<String>,
    /// What a storage fault (bit flip, node replacement) led to.
    #[serde(default)]
    pub outcome: Option<StorageOutcome>,
}

/// What a storage fault led to, as the node's log told within the fault's hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "fault")]
pub enum StorageOutcome {
    /// A bit of a stored message was flipped: whether the node found it, and whether it
    /// wiped and refetched the replica.
    Flipped { detected: bool, repaired: bool },
    /// A data directory was deleted: whether the node rejoined its cluster, or (never
    /// acceptable) initialised a new one.
    Replaced { rejoined: bool, new_cluster: bool },
}

/// The groups a killed node led, and how long each took to get a new leader.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaderKill {
    pub node: u64,
    pub killed_at_ms: u64,
    /// Partitions (indexes) the node led.
    pub partitions: Vec<u32>,
    /// Whether it led the metadata group.
    pub metadata: bool,
    /// Partition index (or `None` for the metadata group) → ms until another node was reported
    /// leader with a higher term; missing when that did not happen within the monitor's limit.
    pub elections: Vec<Election>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Election {
    pub partition: Option<u32>,
    /// Kill → another node reported leading the group with a higher term.
    pub new_leader_ms: Option<u64>,
    /// Kill → the killed node, restarted before the others elected anyone, reported leading
    /// the group again (openraft restores a leader's committed vote on restart, so a short
    /// kill can end with the old leader back at its old term and no election at all).
    #[serde(default)]
    pub resumed_ms: Option<u64>,
}

/// Everything recorded in a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub seed: u64,
    pub nodes: u64,
    pub partitions: u32,
    pub station: String,
    pub schedule: Vec<PlannedFault>,
    pub faults: Vec<FaultRecord>,
    pub attempts: Vec<Attempt>,
    pub observations: Vec<Observation>,
}

mod text_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) if !text.starts_with("0x") => s.serialize_str(text),
            _ => s.serialize_str(&super::show_payload_hex(bytes)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        match text.strip_prefix("0x") {
            Some(hex) if hex.len() % 2 == 0 => (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| serde::de::Error::custom("bad hex payload"))
                })
                .collect(),
            _ => Ok(text.into_bytes()),
        }
    }
}

fn show_payload_hex(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("0x{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let id = PayloadId {
            key: "tenant-007".into(),
            seq: 42,
            attempt: 3,
            uid: 0xdead_beef,
        };
        let bytes = encode_payload(&id);
        assert_eq!(bytes, b"tenant-007|42|3|00000000deadbeef");
        assert_eq!(decode_payload(&bytes), Some(id));
    }

    #[test]
    fn garbage_payloads_do_not_decode() {
        for bad in [
            &b""[..],
            b"x",
            b"k|1|2",
            b"k|1|2|zz",
            b"k|a|2|00000000deadbeef",
            b"k|1|2|00000000deadbeef|extra",
            b"|1|2|00000000deadbeef",
            b"\xff\xfe",
        ] {
            assert_eq!(decode_payload(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn observations_serialise_text_and_binary_payloads() {
        for payload in [
            b"a|1|1|0000000000000001".to_vec(),
            vec![0xff, 0, 1],
            b"0xab".to_vec(),
        ] {
            let o = Observation {
                partition: 1,
                offset: 2,
                payload,
                at_ms: 3,
            };
            let json = serde_json::to_string(&o).unwrap();
            let back: Observation = serde_json::from_str(&json).unwrap();
            assert_eq!(back, o, "{json}");
        }
    }

    #[test]
    fn attempts_serialise_flat() {
        let a = Attempt {
            key: "k".into(),
            seq: 1,
            attempt: 1,
            uid: 9,
            producer: 0,
            node: 2,
            start_ms: 10,
            end_ms: 12,
            outcome: Outcome::Ok {
                partition: 3,
                offset: 4,
            },
        };
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["outcome"], "ok");
        assert_eq!(json["offset"], 4);
        let back: Attempt = serde_json::from_value(json).unwrap();
        assert_eq!(back, a);
        assert_eq!(a.payload(), b"k|1|1|0000000000000009");
    }
}
