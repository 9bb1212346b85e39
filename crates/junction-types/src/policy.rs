//! A station's storage and retention policy: where its data lives (storage tier), how long it
//! is kept (retention limits and the discard policy), and whether it is compacted by key.
//!
//! The policy lives in the metadata ([`crate::StationMeta::policy`]); the partition leaders
//! read it and replicate their decisions (truncate, compact) through each partition's Raft
//! group, so every replica cuts at the same offsets.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The header that marks a message as a tombstone on a compacted station: a message with this
/// header and an empty payload deletes its key.
pub const TOMBSTONE_HEADER: &str = "tombstone";

/// The default time a tombstone is kept after compaction reaches it (24 h, as in Kafka).
pub const DEFAULT_TOMBSTONE_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Where a station's Raft log and messages live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageTier {
    /// RocksDB, fsynced before a produce is acknowledged.
    #[default]
    File,
    /// In memory, replicated by Raft, no disk writes.
    Memory,
}

/// What happens when a produce would exceed a byte or message limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiscardPolicy {
    /// The oldest messages are removed (retention cuts the front of the log).
    #[default]
    Old,
    /// The produce is refused (RESOURCE_EXHAUSTED); nothing is removed for bytes or count.
    New,
}

/// Whether a station keeps every message or only the newest per key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompactionPolicy {
    #[default]
    None,
    /// Only the newest message per key is kept; tombstones delete their key.
    Key,
}

/// Retention limits; `None` means unlimited. Limits apply per partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Messages older than this (by their leader-assigned timestamp) are removed.
    pub max_age_ms: Option<u64>,
    /// The stored bytes (key + headers + payload) of a partition.
    pub max_bytes: Option<u64>,
    /// The messages of a partition (offsets from the first retained to the end).
    pub max_messages: Option<u64>,
    /// Messages are removed once every consumer group of the station has acknowledged them;
    /// with no group, `ack` removes nothing. While any group exists, no limit removes a
    /// message that some group has not acknowledged.
    pub ack: bool,
}

impl Retention {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.max_age_ms.is_some()
            || self.max_bytes.is_some()
            || self.max_messages.is_some()
            || self.ack
    }
}

/// A station's storage, retention and compaction settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StationPolicy {
    pub storage: StorageTier,
    pub retention: Retention,
    pub discard: DiscardPolicy,
    pub compaction: CompactionPolicy,
    /// How long a tombstone stays after compaction reaches it, in ms.
    pub tombstone_delay_ms: u64,
}

impl Default for StationPolicy {
    fn default() -> Self {
        Self {
            storage: StorageTier::File,
            retention: Retention::default(),
            discard: DiscardPolicy::Old,
            compaction: CompactionPolicy::None,
            tombstone_delay_ms: DEFAULT_TOMBSTONE_DELAY_MS,
        }
    }
}

/// Why a policy setting could not be parsed or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

impl fmt::Display for StorageTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageTier::File => "file",
            StorageTier::Memory => "memory",
        })
    }
}

impl fmt::Display for DiscardPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiscardPolicy::Old => "old",
            DiscardPolicy::New => "new",
        })
    }
}

impl fmt::Display for CompactionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CompactionPolicy::None => "none",
            CompactionPolicy::Key => "key",
        })
    }
}

impl std::str::FromStr for StorageTier {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "file" => Ok(StorageTier::File),
            "memory" => Ok(StorageTier::Memory),
            _ => Err(PolicyError(format!(
                "storage must be 'file' or 'memory', got '{s}'"
            ))),
        }
    }
}

impl std::str::FromStr for DiscardPolicy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "old" => Ok(DiscardPolicy::Old),
            "new" => Ok(DiscardPolicy::New),
            _ => Err(PolicyError(format!(
                "discard must be 'old' or 'new', got '{s}'"
            ))),
        }
    }
}

impl std::str::FromStr for CompactionPolicy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(CompactionPolicy::None),
            "key" => Ok(CompactionPolicy::Key),
            _ => Err(PolicyError(format!(
                "compaction must be 'none' or 'key', got '{s}'"
            ))),
        }
    }
}

fn split_number(s: &str) -> Result<(u64, &str), PolicyError> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return Err(PolicyError(format!("'{s}' does not start with a number")));
    }
    let n: u64 = s[..end]
        .parse()
        .map_err(|_| PolicyError(format!("'{s}': number too large")))?;
    Ok((n, s[end..].trim()))
}

/// Parses a duration such as `500ms`, `30s`, `15m`, `12h`, `7d` or `2w` into milliseconds.
/// A bare number is seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, PolicyError> {
    let (n, unit) = split_number(s)?;
    let mult: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => {
            return Err(PolicyError(format!(
                "'{s}': unknown duration unit '{unit}' (use ms, s, m, h, d or w)"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| PolicyError(format!("'{s}' is too long")))
}

/// Parses a size such as `512`, `64KiB`, `10GiB`, `1MB` or `2G` into bytes (`K`/`KiB` = 1024,
/// `KB` = 1000).
pub fn parse_bytes(s: &str) -> Result<u64, PolicyError> {
    let (n, unit) = split_number(s)?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(PolicyError(format!(
                "'{s}': unknown size unit '{unit}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| PolicyError(format!("'{s}' is too large")))
}

/// Whether a record (by its headers and payload) is a tombstone.
pub fn is_tombstone(headers: &[(String, Vec<u8>)], payload: &[u8]) -> bool {
    payload.is_empty() && headers.iter().any(|(k, _)| k == TOMBSTONE_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration_ms("7d").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert_eq!(parse_duration_ms("30").unwrap(), 30_000);
        assert!(parse_duration_ms("7 fortnights").is_err());
        assert!(parse_duration_ms("d").is_err());
        assert_eq!(parse_bytes("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("99999999999999999999").is_err());
        assert!(parse_bytes("1ZiB").is_err());
        assert_eq!(
            "memory".parse::<StorageTier>().unwrap(),
            StorageTier::Memory
        );
        assert!("disk".parse::<StorageTier>().is_err());
    }

    #[test]
    fn tombstones_need_the_header_and_an_empty_payload() {
        let h = vec![(TOMBSTONE_HEADER.to_string(), vec![])];
        assert!(is_tombstone(&h, b""));
        assert!(!is_tombstone(&h, b"x"));
        assert!(!is_tombstone(&[], b""));
    }
}
