//! Station storage/retention/compaction flags of `station create` and `station update`, and
//! how `station describe` shows them.

use anyhow::anyhow;
use junction_client::proto::{
    CompactionPolicy, DiscardPolicy, RetentionPolicy, StationInfo, StationPolicy, StorageTier,
};
use junction_types::policy::{parse_bytes, parse_duration_ms};
use serde_json::{Value, json};

/// Storage, retention and compaction flags. On `update`, unset flags keep the current value
/// and `none` removes a limit.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Storage tier: file (durable, default) or memory.
    #[arg(long, value_name = "file|memory")]
    pub storage: Option<String>,
    /// Remove messages older than this (e.g. 30s, 15m, 12h, 7d; `none` for no limit).
    #[arg(long, value_name = "DURATION")]
    pub retention_age: Option<String>,
    /// Largest size of each partition (e.g. 512MiB, 10GiB; `none` for no limit).
    #[arg(long, value_name = "SIZE")]
    pub retention_bytes: Option<String>,
    /// Most messages in each partition (`none` for no limit).
    #[arg(long, value_name = "N")]
    pub retention_messages: Option<String>,
    /// Remove messages once every consumer group has acknowledged them (`--retention-ack
    /// false` turns it off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub retention_ack: Option<bool>,
    /// Keep only the newest message per key: none or key.
    #[arg(long, value_name = "none|key")]
    pub compaction: Option<String>,
    /// When a byte or message limit is reached: drop the oldest (old) or refuse produces (new).
    #[arg(long, value_name = "old|new")]
    pub discard: Option<String>,
    /// How long tombstones stay after compaction reaches them (default 24h).
    #[arg(long, value_name = "DURATION")]
    pub tombstone_delay: Option<String>,
    /// Message-id deduplication window (e.g. 2m; at most 7d; `none` turns it off): a message
    /// whose `junction-msg-id` was stored in its partition within the window is not stored
    /// again.
    #[arg(long, value_name = "DURATION")]
    pub dedup_window: Option<String>,
    /// Most message ids one partition's dedup window holds (default 1000000).
    #[arg(long, value_name = "N")]
    pub dedup_max_ids: Option<u32>,
    /// How long an idempotent producer may stay idle before partitions forget it (default 7d).
    #[arg(long, value_name = "DURATION")]
    pub producer_expiry: Option<String>,
}

fn limit(v: &str, parse: impl Fn(&str) -> Result<u64, String>) -> anyhow::Result<Option<u64>> {
    if v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let n = parse(v).map_err(|e| anyhow!(e))?;
    if n == 0 {
        return Err(anyhow!(
            "'{v}': a limit must be greater than 0 (use `none` for no limit)"
        ));
    }
    Ok(Some(n))
}

impl PolicyArgs {
    /// Whether any flag was given.
    pub fn any(&self) -> bool {
        self.storage.is_some()
            || self.retention_age.is_some()
            || self.retention_bytes.is_some()
            || self.retention_messages.is_some()
            || self.retention_ack.is_some()
            || self.compaction.is_some()
            || self.discard.is_some()
            || self.tombstone_delay.is_some()
            || self.dedup_window.is_some()
            || self.dedup_max_ids.is_some()
            || self.producer_expiry.is_some()
    }

    /// Applies the flags on top of `base`.
    pub fn apply(&self, mut base: StationPolicy) -> anyhow::Result<StationPolicy> {
        let mut r = base.retention.unwrap_or_default();
        if let Some(s) = &self.storage {
            base.storage = match s.to_ascii_lowercase().as_str() {
                "file" => StorageTier::File,
                "memory" => StorageTier::Memory,
                _ => return Err(anyhow!("--storage must be file or memory, got '{s}'")),
            } as i32;
        }
        if let Some(v) = &self.retention_age {
            r.max_age_ms = limit(v, |s| parse_duration_ms(s).map_err(|e| e.to_string()))?;
        }
        if let Some(v) = &self.retention_bytes {
            r.max_bytes = limit(v, |s| parse_bytes(s).map_err(|e| e.to_string()))?;
        }
        if let Some(v) = &self.retention_messages {
            r.max_messages = limit(v, |s| {
                s.parse::<u64>()
                    .map_err(|_| format!("--retention-messages: '{s}' is not a number"))
            })?;
        }
        if let Some(a) = self.retention_ack {
            r.ack = a;
        }
        if let Some(c) = &self.compaction {
            base.compaction = match c.to_ascii_lowercase().as_str() {
                "none" => CompactionPolicy::None,
                "key" => CompactionPolicy::Key,
                _ => return Err(anyhow!("--compaction must be none or key, got '{c}'")),
            } as i32;
        }
        if let Some(d) = &self.discard {
            base.discard = match d.to_ascii_lowercase().as_str() {
                "old" => DiscardPolicy::Old,
                "new" => DiscardPolicy::New,
                _ => return Err(anyhow!("--discard must be old or new, got '{d}'")),
            } as i32;
        }
        if let Some(t) = &self.tombstone_delay {
            base.tombstone_delay_ms = Some(parse_duration_ms(t).map_err(|e| anyhow!(e))?);
        }
        if let Some(w) = &self.dedup_window {
            base.dedup_window_ms = if w.eq_ignore_ascii_case("none") {
                None
            } else {
                Some(parse_duration_ms(w).map_err(|e| anyhow!("--dedup-window: {e}"))?)
            };
        }
        if let Some(n) = self.dedup_max_ids {
            base.dedup_max_ids = Some(n);
        }
        if let Some(e) = &self.producer_expiry {
            base.producer_expiry_ms =
                Some(parse_duration_ms(e).map_err(|e| anyhow!("--producer-expiry: {e}"))?);
        }
        base.retention = Some(r);
        Ok(base)
    }
}

/// Formats milliseconds as the largest whole unit (`7d`, `90m`, `1500ms`).
pub fn format_duration_ms(ms: u64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Formats bytes with a binary unit when exact (`10GiB`), else in bytes.
pub fn format_bytes(b: u64) -> String {
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if b >= size && b.is_multiple_of(size) {
            return format!("{}{unit}", b / size);
        }
    }
    format!("{b}B")
}

fn storage_name(p: &StationPolicy) -> &'static str {
    match StorageTier::try_from(p.storage) {
        Ok(StorageTier::Memory) => "memory",
        _ => "file",
    }
}

fn discard_name(p: &StationPolicy) -> &'static str {
    match DiscardPolicy::try_from(p.discard) {
        Ok(DiscardPolicy::New) => "new",
        _ => "old",
    }
}

fn compaction_name(p: &StationPolicy) -> &'static str {
    match CompactionPolicy::try_from(p.compaction) {
        Ok(CompactionPolicy::Key) => "key",
        _ => "none",
    }
}

/// `(label, value)` rows describing a station's policy.
pub fn policy_rows(s: &StationInfo) -> Vec<(String, String)> {
    let p = s.policy.unwrap_or_default();
    let r: RetentionPolicy = p.retention.unwrap_or_default();
    let mut limits = Vec::new();
    if let Some(a) = r.max_age_ms {
        limits.push(format!("age {}", format_duration_ms(a)));
    }
    if let Some(b) = r.max_bytes {
        limits.push(format!("bytes {}", format_bytes(b)));
    }
    if let Some(m) = r.max_messages {
        limits.push(format!("messages {m}"));
    }
    if r.ack {
        limits.push("ack".to_owned());
    }
    let retention = if limits.is_empty() {
        "unlimited".to_owned()
    } else {
        limits.join(", ")
    };
    let mut compaction = compaction_name(&p).to_owned();
    if compaction == "key" {
        compaction.push_str(&format!(
            " (tombstones kept {})",
            format_duration_ms(p.tombstone_delay_ms.unwrap_or(0))
        ));
    }
    let dedup = match p.dedup_window_ms {
        Some(w) => format!(
            "window {} (at most {} ids per partition)",
            format_duration_ms(w),
            p.dedup_max_ids.unwrap_or(0)
        ),
        None => "off".to_owned(),
    };
    vec![
        ("storage".into(), storage_name(&p).into()),
        ("retention".into(), retention),
        ("discard".into(), discard_name(&p).into()),
        ("compaction".into(), compaction),
        ("dedup".into(), dedup),
        (
            "producer expiry".into(),
            format_duration_ms(p.producer_expiry_ms.unwrap_or(0)),
        ),
    ]
}

/// The policy as JSON.
pub fn policy_json(s: &StationInfo) -> Value {
    let p = s.policy.unwrap_or_default();
    let r = p.retention.unwrap_or_default();
    json!({
        "storage": storage_name(&p),
        "retention": {
            "max_age_ms": r.max_age_ms,
            "max_bytes": r.max_bytes,
            "max_messages": r.max_messages,
            "ack": r.ack,
        },
        "discard": discard_name(&p),
        "compaction": compaction_name(&p),
        "tombstone_delay_ms": p.tombstone_delay_ms,
        "dedup_window_ms": p.dedup_window_ms,
        "dedup_max_ids": p.dedup_max_ids,
        "producer_expiry_ms": p.producer_expiry_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_apply_on_top_of_the_current_policy() {
        let args = PolicyArgs {
            retention_age: Some("7d".into()),
            retention_bytes: Some("10GiB".into()),
            discard: Some("new".into()),
            ..Default::default()
        };
        let p = args.apply(StationPolicy::default()).unwrap();
        let r = p.retention.unwrap();
        assert_eq!(r.max_age_ms, Some(7 * 86_400_000));
        assert_eq!(r.max_bytes, Some(10 << 30));
        assert_eq!(p.discard, DiscardPolicy::New as i32);
        let clear = PolicyArgs {
            retention_age: Some("none".into()),
            ..Default::default()
        };
        let p2 = clear.apply(p).unwrap();
        assert_eq!(p2.retention.unwrap().max_age_ms, None);
        assert_eq!(p2.retention.unwrap().max_bytes, Some(10 << 30));
        let bad = PolicyArgs {
            retention_messages: Some("0".into()),
            ..Default::default()
        };
        assert!(bad.apply(StationPolicy::default()).is_err());
        let dedup = PolicyArgs {
            dedup_window: Some("2m".into()),
            producer_expiry: Some("1d".into()),
            ..Default::default()
        };
        let p3 = dedup.apply(p2).unwrap();
        assert_eq!(p3.dedup_window_ms, Some(120_000));
        assert_eq!(p3.producer_expiry_ms, Some(86_400_000));
        let off = PolicyArgs {
            dedup_window: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(off.apply(p3).unwrap().dedup_window_ms, None);
        assert_eq!(format_duration_ms(7 * 86_400_000), "7d");
        assert_eq!(format_bytes(10 << 30), "10GiB");
        assert_eq!(format_bytes(1000), "1000B");
    }
}
