//! The openraft configuration Junction runs every group with.

use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};

/// Timing and log-retention knobs for Raft groups.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    /// Leader → follower heartbeat period.
    pub heartbeat: Duration,
    /// A follower that hears nothing for a random time in `[min, max]` starts an election.
    ///
    /// openraft's leader lease is `max`: a follower that heard the leader less than `max` ago
    /// refuses to vote, so the first candidate (timing out between `min` and `max`) is always
    /// refused and wins on its second try, about `2 × min` to `min + max` after the leader's
    /// last heartbeat. With 600–900 ms a killed leader's partition took 1.7 s (p50) to 2.1 s
    /// (p99) to accept writes again; with 300–500 ms, well under 1.5 s. A follower that times
    /// out while the leader is fine does no harm: pre-vote is on, and the other replicas,
    /// still hearing the leader, refuse it without anyone's term changing.
    pub election_min: Duration,
    pub election_max: Duration,
    /// Entries between snapshots. Partition snapshots are cheap (a few bytes of state; the
    /// data is read from RocksDB only when a snapshot is sent), metadata ones are small.
    pub snapshot_every: u64,
    /// Entries kept below the snapshot, so briefly lagging followers catch up from the log.
    pub keep_logs: u64,
    /// A partition group nobody wrote to for this long goes quiet: no ticks, no heartbeats
    /// (see [`crate::quiesce`]). Zero: never.
    pub quiesce_after: Duration,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(150),
            election_min: Duration::from_millis(300),
            election_max: Duration::from_millis(500),
            snapshot_every: 20_000,
            keep_logs: 5_000,
            quiesce_after: Duration::from_secs(2),
        }
    }
}

impl RaftTuning {
    /// A member that has not answered a ping for this long is suspected down: followers of
    /// quiet groups it leads wake and elect another leader.
    pub fn suspect_after(&self) -> Duration {
        self.heartbeat * 4
    }

    /// Returns the validated openraft config.
    pub fn config(&self, cluster_name: &str) -> Result<Arc<Config>, openraft::ConfigError> {
        self.config_with(cluster_name, false)
    }

    /// Like [`RaftTuning::config`]; `memory` is for groups whose replicas keep their log in
    /// memory: a restarted replica comes back with an empty log.
    ///
    /// Every group accepts a follower whose log went back (openraft's `allow_log_reversion`)
    /// and replicates everything (entries or a snapshot) to it again: besides memory
    /// replicas, a node whose disk was replaced rejoins with empty state
    /// ([`crate::rejoin`], which also keeps its votes from electing a replica that misses
    /// acknowledged entries).
    pub fn config_with(
        &self,
        cluster_name: &str,
        _memory: bool,
    ) -> Result<Arc<Config>, openraft::ConfigError> {
        let c = Config {
            allow_log_reversion: Some(true),
            cluster_name: cluster_name.to_string(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs,
            // A follower this far behind gets a snapshot instead of entries.
            replication_lag_threshold: self.keep_logs.max(1000),
            install_snapshot_timeout: 60_000,
            max_payload_entries: 512,
            enable_pre_vote: Some(true),
            // openraft keeps a ring of per-entry stage timestamps per group (1,024 by
            // default, six stages), read only with its `runtime-stats` feature, which is off:
            // one slot is enough, and saves the memory in every replica.
            log_stage_capacity: Some(1),
            ..Default::default()
        };
        c.validate().map(Arc::new)
    }
}
