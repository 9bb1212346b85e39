//! The server's configuration: one typed struct filled from defaults, an optional TOML file,
//! `JUNCTION_*` environment variables and flags, in that order of precedence (lowest first).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use junction_broker::{BatchLimits, BrokerConfig};
use junction_raft::RaftTuning;
use junction_types::NodeId;
use serde::Deserialize;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid member list entry '{entry}': expected ID=HOST:PORT, e.g. 1=127.0.0.1:7701")]
    BadMember { entry: String },
    #[error("node id {id} is not in the member list ({members})")]
    NotAMember { id: NodeId, members: String },
    #[error("invalid dial override '{entry}': expected ADVERTISED=DIALLED")]
    BadOverride { entry: String },
    #[error("node id must be at least 1")]
    ZeroId,
    #[error("{field} must be {rule}, got {value}")]
    OutOfRange {
        field: &'static str,
        rule: &'static str,
        value: u64,
    },
}

/// Everything `junction serve` can be configured with. TOML keys are kebab-case; unknown keys
/// are an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// This node's id (≥ 1).
    pub node_id: NodeId,
    /// Address the gRPC server (public API and node-to-node Raft traffic) binds.
    pub listen: String,
    /// Address other nodes and clients use to reach this node; defaults to `listen`.
    pub advertise: Option<String>,
    /// Address of the HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub http: String,
    /// Where the node's RocksDB and snapshot spool live.
    pub data_dir: PathBuf,
    /// Initial members as `1=host:port,2=host:port,3=host:port` (advertised addresses). Empty
    /// means a single-node cluster of this node.
    pub members: String,
    /// Largest message (key + headers + payload) a station may accept, in bytes.
    pub max_message_bytes: u32,
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Raft entries between snapshots of a group.
    pub snapshot_every: u64,
    /// Raft entries kept below a snapshot for lagging followers.
    pub keep_logs: u64,
    /// Raft entries of one partition replicating at once (group commit merges the rest).
    pub max_in_flight: usize,
    /// `ADVERTISED=DIALLED,...`: dial another address for a peer (for fault-injecting
    /// proxies in the chaos suite). Empty in production.
    pub dial_overrides: String,
    /// Test-only (chaos suite): no file space preallocation in RocksDB, so a full disk
    /// surfaces at the next write. See `junction_storage::StoreOptions`.
    pub test_no_preallocation: bool,
}

impl Default for Config {
    fn default() -> Self {
        let t = RaftTuning::default();
        Self {
            node_id: 1,
            listen: "127.0.0.1:7701".into(),
            advertise: None,
            http: "127.0.0.1:8701".into(),
            data_dir: PathBuf::from("./data/node1"),
            members: String::new(),
            max_message_bytes: 1 << 20,
            heartbeat_ms: t.heartbeat.as_millis() as u64,
            election_min_ms: t.election_min.as_millis() as u64,
            election_max_ms: t.election_max.as_millis() as u64,
            snapshot_every: t.snapshot_every,
            keep_logs: t.keep_logs,
            max_in_flight: 8,
            dial_overrides: String::new(),
            test_no_preallocation: false,
        }
    }
}

/// Flags of `junction serve`; each also reads a `JUNCTION_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (keys as below, kebab-case).
    #[arg(long, env = "JUNCTION_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id (≥ 1).
    #[arg(long = "id", env = "JUNCTION_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// gRPC bind address (public API and node-to-node traffic).
    #[arg(long, env = "JUNCTION_LISTEN")]
    pub listen: Option<String>,
    /// Address others reach this node at (default: --listen).
    #[arg(long, env = "JUNCTION_ADVERTISE")]
    pub advertise: Option<String>,
    /// HTTP bind address for /healthz, /readyz and /metrics.
    #[arg(long, env = "JUNCTION_HTTP")]
    pub http: Option<String>,
    /// Data directory.
    #[arg(long, env = "JUNCTION_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Initial members: 1=host:port,2=host:port,3=host:port
    #[arg(long, env = "JUNCTION_MEMBERS")]
    pub members: Option<String>,
    /// Largest accepted message in bytes (default 1 MiB).
    #[arg(long, env = "JUNCTION_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<u32>,
    /// Raft heartbeat period in ms.
    #[arg(long, env = "JUNCTION_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Raft entries between snapshots.
    #[arg(long, env = "JUNCTION_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Raft entries kept below a snapshot.
    #[arg(long, env = "JUNCTION_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    /// ADVERTISED=DIALLED,... peer address overrides (fault-injection proxies).
    #[arg(long, env = "JUNCTION_DIAL_OVERRIDES")]
    pub dial_overrides: Option<String>,
    /// Test-only: no RocksDB file preallocation (the chaos suite's disk-fill fault).
    #[arg(long, hide = true)]
    pub test_no_preallocation: bool,
}

impl Config {
    /// Builds the effective configuration: defaults, then the file, then env/flags.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut c = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => Config::default(),
        };
        if let Some(v) = args.node_id {
            c.node_id = v;
        }
        if let Some(v) = &args.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &args.advertise {
            c.advertise = Some(v.clone());
        }
        if let Some(v) = &args.http {
            c.http = v.clone();
        }
        if let Some(v) = &args.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &args.members {
            c.members = v.clone();
        }
        if let Some(v) = args.max_message_bytes {
            c.max_message_bytes = v;
        }
        if let Some(v) = args.heartbeat_ms {
            c.heartbeat_ms = v;
            // Keep the election timeout a safe multiple of the heartbeat.
            c.election_min_ms = c.election_min_ms.max(v * 4);
            c.election_max_ms = c.election_max_ms.max(v * 6);
        }
        if let Some(v) = args.snapshot_every {
            c.snapshot_every = v;
        }
        if let Some(v) = args.keep_logs {
            c.keep_logs = v;
        }
        if let Some(v) = &args.dial_overrides {
            c.dial_overrides = v.clone();
        }
        if args.test_no_preallocation {
            c.test_no_preallocation = true;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges and the member list.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::ZeroId);
        }
        let members = self.member_map()?;
        self.dial_overrides()?;
        if !members.contains_key(&self.node_id) {
            return Err(ConfigError::NotAMember {
                id: self.node_id,
                members: self.members.clone(),
            });
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > 64 << 20 {
            return Err(ConfigError::OutOfRange {
                field: "max-message-bytes",
                rule: "between 1 and 64 MiB",
                value: u64::from(self.max_message_bytes),
            });
        }
        if self.heartbeat_ms == 0 || self.election_min_ms < self.heartbeat_ms * 2 {
            return Err(ConfigError::OutOfRange {
                field: "election-min-ms",
                rule: "at least twice heartbeat-ms",
                value: self.election_min_ms,
            });
        }
        if self.election_max_ms <= self.election_min_ms {
            return Err(ConfigError::OutOfRange {
                field: "election-max-ms",
                rule: "greater than election-min-ms",
                value: self.election_max_ms,
            });
        }
        Ok(())
    }

    /// Returns the advertised address.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }

    /// Parses the member list (or this node alone when it is empty).
    pub fn member_map(&self) -> Result<BTreeMap<NodeId, String>, ConfigError> {
        parse_members(&self.members, self.node_id, &self.advertised())
    }

    /// Parses `ADVERTISED=DIALLED,...`.
    pub fn dial_overrides(&self) -> Result<junction_raft::DialOverrides, ConfigError> {
        let mut map = std::collections::HashMap::new();
        for entry in self
            .dial_overrides
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (from, to) = entry
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride {
                    entry: entry.to_string(),
                })?;
            map.insert(from.trim().to_string(), to.trim().to_string());
        }
        Ok(std::sync::Arc::new(map))
    }

    /// Returns the broker's part of the configuration.
    pub fn broker_config(&self) -> Result<BrokerConfig, ConfigError> {
        Ok(BrokerConfig {
            node_id: self.node_id,
            members: self.member_map()?,
            data_dir: self.data_dir.clone(),
            tuning: RaftTuning {
                heartbeat: Duration::from_millis(self.heartbeat_ms),
                election_min: Duration::from_millis(self.election_min_ms),
                election_max: Duration::from_millis(self.election_max_ms),
                snapshot_every: self.snapshot_every,
                keep_logs: self.keep_logs,
            },
            max_message_bytes: self.max_message_bytes,
            batch: BatchLimits {
                max_in_flight: self.max_in_flight,
                max_entry_bytes: 4 << 20,
            },
            dial_overrides: self.dial_overrides()?,
        })
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_members(
    list: &str,
    me: NodeId,
    my_addr: &str,
) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut out = BTreeMap::new();
    if list.trim().is_empty() {
        out.insert(me, my_addr.to_string());
        return Ok(out);
    }
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || ConfigError::BadMember {
            entry: entry.to_string(),
        };
        let (id, addr) = entry.split_once('=').ok_or_else(bad)?;
        let id: NodeId = id.trim().parse().map_err(|_| bad())?;
        let addr = addr.trim();
        if id == 0 || !addr.contains(':') {
            return Err(bad());
        }
        out.insert(id, addr.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_reject_garbage() {
        let m = parse_members("1=a:1, 2=b:2,3=c:3", 1, "x:9").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[&2], "b:2");
        assert!(parse_members("1=a:1,nope", 1, "x").is_err());
        assert!(parse_members("0=a:1", 1, "x").is_err());
        assert_eq!(parse_members("", 4, "me:1").unwrap()[&4], "me:1");
    }

    #[test]
    fn flags_override_file_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.toml");
        std::fs::write(
            &path,
            "node-id = 2\nmembers = \"1=a:1,2=b:2\"\nlisten = \"b:2\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            listen: Some("b:3".into()),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!((c.node_id, c.listen.as_str()), (2, "b:3"));
        std::fs::write(&path, "node-id = 2\nbogus = 1\n").unwrap();
        assert!(matches!(
            Config::load(&args),
            Err(ConfigError::Parse { .. })
        ));
    }
}
