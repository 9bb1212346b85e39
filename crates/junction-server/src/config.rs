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
    #[error(
        "cannot take a node id from pod name '{name}': expected NAME-ORDINAL, e.g. junction-0 \
         (node id = ordinal + 1)"
    )]
    BadPodName { name: String },
    #[error("--id {id} contradicts --id-from-pod-name {pod_name} (node id {derived}); give one")]
    IdConflict {
        id: NodeId,
        pod_name: String,
        derived: NodeId,
    },
    #[error("cluster secret: {0}")]
    ClusterSecret(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("peer service: {0}")]
    Peer(String),
    #[error("TLS: {0}")]
    Tls(String),
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
    /// Address the public gRPC server (clients, and calls forwarded between nodes) binds.
    pub listen: String,
    /// Address the node-to-node `Peer` service (Raft, joins, status) binds; defaults to the
    /// host of `listen` with its port plus `peer_port_offset`.
    pub peer_listen: Option<String>,
    /// Every node's peer port is its advertised client port plus this (the same on every
    /// node). 0 serves the peer service on the client port (tests, and clusters made before
    /// the peer port existed).
    pub peer_port_offset: u16,
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
    /// A partition group nobody wrote to for this long stops its Raft timers (0: never).
    pub quiesce_after_ms: u64,
    /// Raft entries of one partition replicating at once (group commit merges the rest).
    pub max_in_flight: usize,
    /// `ADVERTISED=DIALLED,...`: dial another address for a peer (for fault-injecting
    /// proxies in the chaos suite). Empty in production.
    pub dial_overrides: String,
    /// How often partition leaders apply retention limits, in ms.
    pub retention_tick_ms: u64,
    /// Least time between two key compactions of a partition, in ms.
    pub compaction_every_ms: u64,
    /// Most bytes the replicas of memory stations may hold on this node.
    pub memory_limit_bytes: u64,
    /// Most bytes of recently applied messages this node keeps in memory for tail readers,
    /// all partitions together (0: none; every read goes to RocksDB).
    pub tail_window_bytes: u64,
    /// Most partition replicas a node brings up while earlier ones are still electing and
    /// not yet quiet (0: no limit).
    pub open_wave: usize,
    /// The highest cluster format level this node takes part in (see
    /// `junction_types::format_level`; default: the highest this build understands).
    pub max_format_level: u16,
    /// Longest the schema validation of one message may take, in ms.
    pub schema_validation_limit_ms: u64,
    /// File holding the secret every node of the cluster shares; node-to-node calls without
    /// it are refused. `None`: peer calls are not authenticated (a warning at start).
    pub cluster_secret_file: Option<PathBuf>,
    /// With empty state and no member answering with a cluster id, this node initialises
    /// the cluster (as the lowest member id does without it).
    pub bootstrap: bool,
    /// Whether client calls must carry a credential.
    pub auth: AuthMode,
    /// File with the bootstrap admin token (cluster-admin); made on first start when missing.
    pub admin_token_file: Option<PathBuf>,
    /// JWKS document (RS256/ES256 public keys) that JWTs used as credentials must verify
    /// against (with `auth = "keys"`).
    pub jwt_jwks_file: Option<PathBuf>,
    /// Development only: a shared HS256 secret for JWTs instead of a JWKS.
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// The `iss` every JWT must carry (required with JWTs).
    pub jwt_issuer: Option<String>,
    /// The `aud` every JWT must carry (required with JWTs).
    pub jwt_audience: Option<String>,
    /// The claim naming the principal's tenant.
    pub jwt_tenant_claim: String,
    /// The claim naming the principal's role.
    pub jwt_role_claim: String,
    /// The node's certificate chain (PEM). With `tls_key` and `tls_ca`, both ports speak TLS:
    /// the client port serves this certificate, the peer port also requires a client
    /// certificate signed by `tls_ca`. All three or none.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): verifies the other nodes.
    pub tls_ca: Option<PathBuf>,
    /// With TLS: serve the client port without it (the peer port keeps mutual TLS). For a
    /// development cluster on loopback only.
    pub plaintext_client_port: bool,
    /// How often the TLS files are checked for changes (a renewed certificate is served from
    /// the next connection on), in ms.
    pub tls_reload_ms: u64,
    /// An OTLP/gRPC collector (`http://host:4317`) to export spans to. `None`: no spans are
    /// made at all.
    pub otlp_endpoint: Option<String>,
    /// Time between background scrub passes, in ms (0: none).
    pub scrub_every_ms: u64,
    /// Most bytes per second a background scrub pass reads (0: no limit).
    pub scrub_bytes_per_sec: u64,
    /// Partition moves in progress at once, cluster-wide (node removal and rebalancing).
    pub max_moves: u32,
    /// Rebalance replicas onto new nodes without being asked (checked every 30 s).
    pub auto_balance: bool,
    /// Test-only (chaos suite): no file space preallocation in RocksDB, so a full disk
    /// surfaces at the next write. See `junction_storage::StoreOptions`.
    pub test_no_preallocation: bool,
}

/// Whether client calls are authenticated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Every call is allowed, as the cluster admin (a warning at start).
    #[default]
    None,
    /// Every call carries `authorization: Bearer <token>`: an API key or the admin token.
    Keys,
}

impl Default for Config {
    fn default() -> Self {
        let t = RaftTuning::default();
        Self {
            node_id: 1,
            listen: "127.0.0.1:7701".into(),
            peer_listen: None,
            peer_port_offset: junction_raft::DEFAULT_PEER_PORT_OFFSET,
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
            quiesce_after_ms: t.quiesce_after.as_millis() as u64,
            max_in_flight: 8,
            dial_overrides: String::new(),
            retention_tick_ms: 1000,
            compaction_every_ms: 60_000,
            memory_limit_bytes: 1 << 30,
            tail_window_bytes: 64 << 20,
            open_wave: 100,
            max_format_level: junction_types::format_level::SUPPORTED,
            schema_validation_limit_ms: 100,
            cluster_secret_file: None,
            bootstrap: false,
            jwt_jwks_file: None,
            jwt_hs256_secret_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_tenant_claim: "tenant".into(),
            jwt_role_claim: "role".into(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_reload_ms: junction_tls::DEFAULT_RELOAD_INTERVAL.as_millis() as u64,
            plaintext_client_port: false,
            auth: AuthMode::None,
            admin_token_file: None,
            otlp_endpoint: None,
            scrub_every_ms: 24 * 3600 * 1000,
            scrub_bytes_per_sec: 32 << 20,
            max_moves: 2,
            auto_balance: false,
            test_no_preallocation: false,
        }
    }
}

/// Flags of `junction serve`; each also reads a `JUNCTION_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file: the settings below as kebab-case keys (`node-id`, `listen`,
    /// `data-dir`, ...), plus `election-min-ms`, `election-max-ms`, `max-in-flight`,
    /// `retention-tick-ms` and `compaction-every-ms`. Flags and variables override it.
    #[arg(long, env = "JUNCTION_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id (≥ 1).
    #[arg(long = "id", env = "JUNCTION_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// Node id from a StatefulSet pod name: NAME-ORDINAL is node ORDINAL + 1 (`junction-0` is
    /// node 1). On Kubernetes, pass the pod name from the downward API.
    #[arg(long, env = "JUNCTION_ID_FROM_POD_NAME", value_name = "POD_NAME")]
    pub id_from_pod_name: Option<String>,
    /// gRPC bind address (public API and node-to-node traffic).
    #[arg(long, env = "JUNCTION_LISTEN")]
    pub listen: Option<String>,
    /// Address others reach this node at (default: --listen).
    #[arg(long, env = "JUNCTION_ADVERTISE")]
    pub advertise: Option<String>,
    /// HTTP bind address for /healthz, /readyz and /metrics.
    #[arg(long, env = "JUNCTION_HTTP")]
    pub http: Option<String>,
    /// Data directory (default ./data/node1); a relative path is resolved against the working
    /// directory once, at start, and logged.
    #[arg(long, env = "JUNCTION_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Initial members: 1=host:port,2=host:port,3=host:port (default: this node alone).
    #[arg(long, env = "JUNCTION_MEMBERS")]
    pub members: Option<String>,
    /// Largest accepted message in bytes (default 1 MiB).
    #[arg(long, env = "JUNCTION_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<u32>,
    /// Most bytes memory stations may hold on this node (default 1 GiB).
    #[arg(long, env = "JUNCTION_MEMORY_LIMIT_BYTES")]
    pub memory_limit_bytes: Option<u64>,
    /// Most bytes of recently applied messages kept in memory for readers at the tail of
    /// their partitions, all partitions of the node together (default 64 MiB; 0: none).
    #[arg(long, env = "JUNCTION_TAIL_WINDOW_BYTES", value_name = "BYTES")]
    pub tail_window_bytes: Option<u64>,
    /// Most partition replicas the node brings up while earlier ones are still electing and
    /// not yet quiet, so that creating or restarting thousands of partitions goes in waves
    /// (default 100; 0: no limit; no effect with --quiesce-after-ms 0).
    #[arg(long, env = "JUNCTION_OPEN_WAVE", value_name = "N")]
    pub open_wave: Option<usize>,
    /// The highest cluster format level this node reports (default: the highest this build
    /// understands). The cluster writes a new kind of entry only once every node reports
    /// its level; during a rolling upgrade, set the old build's level on the upgraded nodes
    /// to keep the option of going back until you lift it. A node refuses to start on a
    /// cluster already above its level.
    #[arg(long, env = "JUNCTION_MAX_FORMAT_LEVEL", value_name = "LEVEL")]
    pub max_format_level: Option<u16>,
    /// Longest the schema validation of one message may take before the message is refused,
    /// in ms (default 100).
    #[arg(long, env = "JUNCTION_SCHEMA_VALIDATION_LIMIT_MS")]
    pub schema_validation_limit_ms: Option<u64>,
    /// Raft heartbeat period in ms.
    #[arg(long, env = "JUNCTION_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Raft entries between snapshots.
    #[arg(long, env = "JUNCTION_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Raft entries kept below a snapshot.
    #[arg(long, env = "JUNCTION_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    /// A partition nobody wrote to for this many ms goes quiescent: its Raft group stops
    /// ticking and heartbeating until the next write, or until a follower's node stops
    /// hearing the leader's node (default 2000; 0: never).
    #[arg(long, env = "JUNCTION_QUIESCE_AFTER_MS", value_name = "MS")]
    pub quiesce_after_ms: Option<u64>,
    /// Address the node-to-node service (Raft, joins) binds. Default: the host of --listen,
    /// port + --peer-port-offset. Only other nodes of the cluster may call it.
    #[arg(long, env = "JUNCTION_PEER_LISTEN", value_name = "HOST:PORT")]
    pub peer_listen: Option<String>,
    /// A node's peer port is its advertised client port plus this (default 100; the same on
    /// every node). 0 serves the peer service on the client port.
    #[arg(long, env = "JUNCTION_PEER_PORT_OFFSET", value_name = "N")]
    pub peer_port_offset: Option<u16>,
    /// ADVERTISED=DIALLED,... peer address overrides (fault-injection proxies).
    #[arg(long, env = "JUNCTION_DIAL_OVERRIDES")]
    pub dial_overrides: Option<String>,
    /// File with the secret all nodes of the cluster share (at least 32 printable characters,
    /// e.g. `openssl rand -hex 32`). Node-to-node calls (Raft, joins, status) without it are
    /// refused; without this flag they are not authenticated at all.
    #[arg(long, env = "JUNCTION_CLUSTER_SECRET_FILE", value_name = "PATH")]
    pub cluster_secret_file: Option<PathBuf>,
    /// This node may initialise a new cluster when it starts with empty state and none of its
    /// members answers with an existing cluster id. Without the flag, the lowest member id
    /// may. A node with empty state whose members run a cluster always rejoins it instead (a
    /// replaced disk), whatever this flag says.
    #[arg(long, env = "JUNCTION_BOOTSTRAP")]
    pub bootstrap: bool,
    /// `keys`: every client call must carry `authorization: Bearer <token>` (an API key made
    /// with `junction auth key create`, or the admin token) and may only touch its tenant.
    /// Needs --cluster-secret-file (nodes forward calls to each other with it) and
    /// --admin-token-file. `none` (default): no credentials, everything allowed.
    #[arg(long, env = "JUNCTION_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// File holding the bootstrap admin token (a cluster-admin credential). When the file does
    /// not exist, a new token is made and written there (mode 0600) on first start.
    #[arg(long, env = "JUNCTION_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Accept JWTs (with --auth keys) signed by the RS256/ES256 keys of this JWKS file (what
    /// the identity provider publishes; re-read when it changes). Needs --jwt-issuer and
    /// --jwt-audience.
    #[arg(long, env = "JUNCTION_JWT_JWKS_FILE", value_name = "PATH")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// Development only: accept HS256 JWTs signed with the secret in this file.
    #[arg(long, env = "JUNCTION_JWT_HS256_SECRET_FILE", value_name = "PATH")]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// The issuer (`iss`) a JWT must name.
    #[arg(long, env = "JUNCTION_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audience (`aud`) a JWT must name.
    #[arg(long, env = "JUNCTION_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The JWT claim naming the tenant (default `tenant`).
    #[arg(long, env = "JUNCTION_JWT_TENANT_CLAIM")]
    pub jwt_tenant_claim: Option<String>,
    /// The JWT claim naming the role (default `role`).
    #[arg(long, env = "JUNCTION_JWT_ROLE_CLAIM")]
    pub jwt_role_claim: Option<String>,
    /// This node's certificate chain, PEM. With --tls-key and --tls-ca, the client port
    /// speaks TLS and the peer port mutual TLS (a certificate signed by the CA is required).
    /// The certificate must name the host of --advertise and allow server and client auth.
    #[arg(long, env = "JUNCTION_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, env = "JUNCTION_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA, PEM: other nodes' certificates must be signed by it.
    #[arg(long, env = "JUNCTION_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-*: the client port stays plaintext, the peer port keeps mutual TLS (what
    /// `junction dev` runs on loopback). Not for a port others can reach.
    #[arg(long, env = "JUNCTION_PLAINTEXT_CLIENT_PORT")]
    pub plaintext_client_port: bool,
    /// How often the TLS files are read for changes, in ms (default 5000).
    #[arg(long, env = "JUNCTION_TLS_RELOAD_MS", value_name = "MS")]
    pub tls_reload_ms: Option<u64>,
    /// Export spans (client and peer calls, appends, forwards, deliveries, replication) to
    /// this OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. The W3C `traceparent` of a
    /// client call becomes their parent. Off by default, and then nothing is traced.
    /// `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` variables tune sampling and batching.
    #[arg(long, env = "JUNCTION_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Time between background scrub passes, in ms (default one day; 0: none). A pass checks
    /// the checksum of every record this node stores and compares each replica's range
    /// digests with its leader's; a corrupt follower replica is wiped and fetched again.
    #[arg(long, env = "JUNCTION_SCRUB_EVERY_MS", value_name = "MS")]
    pub scrub_every_ms: Option<u64>,
    /// Most bytes per second a background scrub pass reads (default 32 MiB; 0: no limit).
    #[arg(long, env = "JUNCTION_SCRUB_BYTES_PER_SEC", value_name = "BYTES")]
    pub scrub_bytes_per_sec: Option<u64>,
    /// Partition moves in progress at once, cluster-wide, when a node is removed or replicas
    /// are rebalanced (default 2). Read by the controller.
    #[arg(long, env = "JUNCTION_MAX_MOVES", value_name = "N")]
    pub max_moves: Option<u32>,
    /// Move replicas onto nodes added later without `junction station rebalance` (checked
    /// every 30 s, at most --max-moves at once).
    #[arg(long, env = "JUNCTION_AUTO_BALANCE")]
    pub auto_balance: bool,
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
        if let Some(pod_name) = &args.id_from_pod_name {
            let derived = node_id_from_pod_name(pod_name)?;
            if let Some(id) = args.node_id.filter(|id| *id != derived) {
                return Err(ConfigError::IdConflict {
                    id,
                    pod_name: pod_name.clone(),
                    derived,
                });
            }
            c.node_id = derived;
        }
        if let Some(v) = &args.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &args.advertise {
            c.advertise = Some(v.clone());
        }
        if let Some(v) = &args.peer_listen {
            c.peer_listen = Some(v.clone());
        }
        if let Some(v) = args.peer_port_offset {
            c.peer_port_offset = v;
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
        if let Some(v) = args.schema_validation_limit_ms {
            c.schema_validation_limit_ms = v.max(1);
        }
        if let Some(v) = args.memory_limit_bytes {
            c.memory_limit_bytes = v;
        }
        if let Some(v) = args.tail_window_bytes {
            c.tail_window_bytes = v;
        }
        if let Some(v) = args.open_wave {
            c.open_wave = v;
        }
        if let Some(v) = args.max_format_level {
            c.max_format_level = v;
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
        if let Some(v) = args.quiesce_after_ms {
            c.quiesce_after_ms = v;
        }
        if let Some(v) = &args.dial_overrides {
            c.dial_overrides = v.clone();
        }
        if let Some(v) = &args.cluster_secret_file {
            c.cluster_secret_file = Some(v.clone());
        }
        c.bootstrap |= args.bootstrap;
        if let Some(v) = args.auth {
            c.auth = v;
        }
        if let Some(v) = &args.admin_token_file {
            c.admin_token_file = Some(v.clone());
        }
        if let Some(v) = &args.jwt_jwks_file {
            c.jwt_jwks_file = Some(v.clone());
        }
        if let Some(v) = &args.jwt_hs256_secret_file {
            c.jwt_hs256_secret_file = Some(v.clone());
        }
        if let Some(v) = &args.jwt_issuer {
            c.jwt_issuer = Some(v.clone());
        }
        if let Some(v) = &args.jwt_audience {
            c.jwt_audience = Some(v.clone());
        }
        if let Some(v) = &args.jwt_tenant_claim {
            c.jwt_tenant_claim = v.clone();
        }
        if let Some(v) = &args.jwt_role_claim {
            c.jwt_role_claim = v.clone();
        }
        if let Some(v) = &args.tls_cert {
            c.tls_cert = Some(v.clone());
        }
        if let Some(v) = &args.tls_key {
            c.tls_key = Some(v.clone());
        }
        if let Some(v) = &args.tls_ca {
            c.tls_ca = Some(v.clone());
        }
        if let Some(v) = args.tls_reload_ms {
            c.tls_reload_ms = v;
        }
        if args.plaintext_client_port {
            c.plaintext_client_port = true;
        }
        if let Some(v) = &args.otlp_endpoint {
            c.otlp_endpoint = Some(v.clone());
        }
        if let Some(v) = args.scrub_every_ms {
            c.scrub_every_ms = v;
        }
        if let Some(v) = args.max_moves {
            c.max_moves = v;
        }
        if args.auto_balance {
            c.auto_balance = true;
        }
        if let Some(v) = args.scrub_bytes_per_sec {
            c.scrub_bytes_per_sec = v;
        }
        if args.test_no_preallocation {
            c.test_no_preallocation = true;
        }
        c.validate()?;
        Ok(c)
    }

    /// The cluster secret, read from its file.
    pub fn cluster_secret(
        &self,
    ) -> Result<Option<junction_raft::peer_auth::ClusterSecret>, ConfigError> {
        self.cluster_secret_file
            .as_deref()
            .map(junction_raft::peer_auth::ClusterSecret::load)
            .transpose()
            .map_err(|e| ConfigError::ClusterSecret(e.to_string()))
    }

    /// Checks ranges and the member list.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if self.auth == AuthMode::Keys {
            if self.cluster_secret_file.is_none() {
                return Err(ConfigError::Auth(
                    "--auth keys needs --cluster-secret-file: nodes forward calls to each other \
                     with it"
                        .into(),
                ));
            }
            if self.admin_token_file.is_none() {
                return Err(ConfigError::Auth(
                    "--auth keys needs --admin-token-file (made on first start when missing): \
                     it is the credential that creates the first API keys"
                        .into(),
                ));
            }
        }
        if self.max_moves == 0 {
            return Err(ConfigError::OutOfRange {
                field: "max-moves",
                rule: "at least 1",
                value: 0,
            });
        }
        let members = self.member_map()?;
        self.dial_overrides()?;
        self.peer_listen()?;
        self.jwt_config()?;
        if self.tls_paths()?.is_some() {
            if self.peer_port_offset == 0 {
                return Err(ConfigError::Tls(
                    "TLS needs the peer service on its own port (mutual TLS there, server TLS on \
                     the client port): --peer-port-offset must not be 0"
                        .into(),
                ));
            }
            if self.tls_reload_ms == 0 {
                return Err(ConfigError::OutOfRange {
                    field: "tls-reload-ms",
                    rule: "at least 1",
                    value: 0,
                });
            }
        }
        if !members.contains_key(&self.node_id) {
            return Err(ConfigError::NotAMember {
                id: self.node_id,
                members: self.members.clone(),
            });
        }
        if self.max_format_level < junction_types::format_level::BASE
            || self.max_format_level > junction_types::format_level::SUPPORTED
        {
            return Err(ConfigError::OutOfRange {
                field: "max-format-level",
                rule: "between 1 and the highest level this build understands",
                value: u64::from(self.max_format_level),
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
        if self.quiesce_after_ms != 0 && self.quiesce_after_ms < self.election_max_ms {
            return Err(ConfigError::OutOfRange {
                field: "quiesce-after-ms",
                rule: "0 (never) or at least election-max-ms",
                value: self.quiesce_after_ms,
            });
        }
        Ok(())
    }

    /// The address the peer service binds, `None` when it shares the client port. An explicit
    /// `peer_listen` must use the port other nodes derive from the advertised address.
    pub fn peer_listen(&self) -> Result<Option<String>, ConfigError> {
        if self.peer_port_offset == 0 {
            if let Some(p) = &self.peer_listen {
                return Err(ConfigError::Peer(format!(
                    "--peer-listen {p} with --peer-port-offset 0: an offset of 0 serves the \
                     peer service on the client port; drop one of the two"
                )));
            }
            return Ok(None);
        }
        let derive = |addr: &str| {
            junction_raft::peer_address(addr, self.peer_port_offset)
                .map_err(|e| ConfigError::Peer(e.to_string()))
        };
        let expected = derive(&self.advertised())?;
        match &self.peer_listen {
            None => derive(&self.listen).map(Some),
            Some(p) => {
                let port = |a: &str| a.rsplit_once(':').map(|(_, port)| port.to_owned());
                if port(p) != port(&expected) {
                    return Err(ConfigError::Peer(format!(
                        "--peer-listen {p}: other nodes reach this node's peer service at \
                         {expected} (advertised address + --peer-port-offset {}), so it must \
                         listen on that port",
                        self.peer_port_offset
                    )));
                }
                Ok(Some(p.clone()))
            }
        }
    }

    /// The JWT settings, when JWTs are accepted. Keys need `--auth keys`, an issuer and an
    /// audience; a JWKS and an HS256 secret together are refused.
    pub fn jwt_config(&self) -> Result<Option<crate::jwt::JwtConfig>, ConfigError> {
        let keys = match (&self.jwt_jwks_file, &self.jwt_hs256_secret_file) {
            (None, None) => {
                if self.jwt_issuer.is_some() || self.jwt_audience.is_some() {
                    return Err(ConfigError::Auth(
                        "--jwt-issuer/--jwt-audience without --jwt-jwks-file: no keys to verify \
                         JWTs with"
                            .into(),
                    ));
                }
                return Ok(None);
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Auth(
                    "--jwt-jwks-file and --jwt-hs256-secret-file: give one".into(),
                ));
            }
            (Some(p), None) => crate::jwt::JwtKeys::Jwks(p.clone()),
            (None, Some(p)) => crate::jwt::JwtKeys::Hs256(p.clone()),
        };
        if self.auth != AuthMode::Keys {
            return Err(ConfigError::Auth(
                "JWTs are credentials: they need --auth keys".into(),
            ));
        }
        let (Some(issuer), Some(audience)) = (&self.jwt_issuer, &self.jwt_audience) else {
            return Err(ConfigError::Auth(
                "JWT authentication needs --jwt-issuer and --jwt-audience: a token minted for \
                 another service must not be accepted here"
                    .into(),
            ));
        };
        Ok(Some(crate::jwt::JwtConfig {
            keys,
            issuer: issuer.clone(),
            audience: audience.clone(),
            tenant_claim: self.jwt_tenant_claim.clone(),
            role_claim: self.jwt_role_claim.clone(),
        }))
    }

    /// The TLS files, when TLS is configured (all three of cert, key and CA, or none).
    pub fn tls_paths(&self) -> Result<Option<junction_tls::TlsPaths>, ConfigError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(junction_tls::TlsPaths {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            _ => Err(ConfigError::Tls(
                "--tls-cert, --tls-key and --tls-ca go together: give all three or none".into(),
            )),
        }
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
                quiesce_after: Duration::from_millis(self.quiesce_after_ms),
            },
            max_message_bytes: self.max_message_bytes,
            batch: BatchLimits {
                max_in_flight: self.max_in_flight,
                max_entry_bytes: 4 << 20,
            },
            dial_overrides: self.dial_overrides()?,
            retention: junction_broker::RetentionTuning {
                tick: Duration::from_millis(self.retention_tick_ms.max(10)),
                compaction_every: Duration::from_millis(self.compaction_every_ms),
                ..junction_broker::RetentionTuning::default()
            },
            memory_limit_bytes: self.memory_limit_bytes,
            cluster_secret: self.cluster_secret()?,
            peer_port_offset: self.peer_port_offset,
            peer_tls: None,
            schema_validation_limit: Duration::from_millis(self.schema_validation_limit_ms),
            bootstrap: self.bootstrap,
            scrub: junction_broker::scrub::ScrubTuning {
                every: (self.scrub_every_ms > 0)
                    .then(|| Duration::from_millis(self.scrub_every_ms)),
                bytes_per_sec: self.scrub_bytes_per_sec,
            },
            moves: junction_broker::moves::MoveTuning {
                max_moves: self.max_moves as usize,
                auto_balance: self.auto_balance,
            },
            tail_window_bytes: usize::try_from(self.tail_window_bytes).unwrap_or(usize::MAX),
            open_wave: self.open_wave,
            max_format_level: self.max_format_level,
        })
    }
}

/// The node id of a StatefulSet pod: `NAME-ORDINAL` → ORDINAL + 1 (ids start at 1, ordinals
/// at 0), so `junction-0` is node 1 and `my-release-junction-4` node 5.
pub fn node_id_from_pod_name(pod_name: &str) -> Result<NodeId, ConfigError> {
    let bad = || ConfigError::BadPodName {
        name: pod_name.to_string(),
    };
    let (prefix, ordinal) = pod_name.trim().rsplit_once('-').ok_or_else(bad)?;
    if prefix.is_empty() || ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let ordinal: NodeId = ordinal.parse().map_err(|_| bad())?;
    ordinal.checked_add(1).ok_or_else(bad)
}

/// Parses `1=host:port,2=host:port`. Hosts may be IP addresses or DNS names (e.g. a
/// Kubernetes headless Service's `pod.service.namespace.svc.cluster.local`); names are
/// resolved each time a peer connection is (re)established, so a pod that comes back with a
/// new IP is found again.
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
    fn jwt_and_tls_settings_that_cannot_work_are_refused() {
        let secure = || Config {
            auth: AuthMode::Keys,
            cluster_secret_file: Some("s".into()),
            admin_token_file: Some("a".into()),
            jwt_jwks_file: Some("jwks.json".into()),
            jwt_issuer: Some("https://id".into()),
            jwt_audience: Some("junction".into()),
            ..Config::default()
        };
        assert!(secure().validate().is_ok());
        let refused = |c: Config, what: &str| {
            let e = c.validate().expect_err(what).to_string();
            assert!(!e.is_empty(), "{what}");
        };
        refused(
            Config {
                jwt_issuer: None,
                ..secure()
            },
            "no issuer",
        );
        refused(
            Config {
                jwt_audience: None,
                ..secure()
            },
            "no audience",
        );
        refused(
            Config {
                auth: AuthMode::None,
                ..secure()
            },
            "JWTs with --auth none",
        );
        refused(
            Config {
                jwt_hs256_secret_file: Some("hs".into()),
                ..secure()
            },
            "a JWKS and an HS256 secret",
        );
        refused(
            Config {
                jwt_jwks_file: None,
                ..secure()
            },
            "an issuer without keys",
        );
        refused(
            Config {
                tls_cert: Some("c".into()),
                ..Config::default()
            },
            "a certificate without key and CA",
        );
        refused(
            Config {
                tls_cert: Some("c".into()),
                tls_key: Some("k".into()),
                tls_ca: Some("ca".into()),
                peer_port_offset: 0,
                ..Config::default()
            },
            "TLS with the peer service on the client port",
        );
        refused(
            Config {
                peer_listen: Some("127.0.0.1:9999".into()),
                ..Config::default()
            },
            "a peer port other nodes would not dial",
        );
    }

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
    fn node_id_from_statefulset_pod_names() {
        assert_eq!(node_id_from_pod_name("junction-0").unwrap(), 1);
        assert_eq!(node_id_from_pod_name("my-release-junction-4").unwrap(), 5);
        for bad in [
            "junction",
            "junction-",
            "-3",
            "junction-x",
            "junction-+1",
            "j-99999999999999999999",
        ] {
            assert!(
                matches!(
                    node_id_from_pod_name(bad),
                    Err(ConfigError::BadPodName { .. })
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn statefulset_pod_takes_its_id_from_its_name_and_dns_members() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junction.toml");
        let members: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "{}=junction-{i}.junction-headless.ns.svc.cluster.local:7701",
                    i + 1
                )
            })
            .collect();
        std::fs::write(
            &path,
            format!(
                "members = \"{}\"\nlisten = \"0.0.0.0:7701\"\nhttp = \"0.0.0.0:8701\"\n",
                members.join(",")
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            id_from_pod_name: Some("junction-2".into()),
            advertise: Some("junction-2.junction-headless.ns.svc.cluster.local:7701".into()),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.node_id, 3);
        let m = c.broker_config().unwrap().members;
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[&3],
            "junction-2.junction-headless.ns.svc.cluster.local:7701"
        );
        assert_eq!(c.advertised(), m[&3]);

        // An explicit id that agrees is fine; one that contradicts the pod name is refused.
        let agree = ServeArgs {
            node_id: Some(3),
            ..args.clone()
        };
        assert_eq!(Config::load(&agree).unwrap().node_id, 3);
        let clash = ServeArgs {
            node_id: Some(1),
            ..args.clone()
        };
        assert!(matches!(
            Config::load(&clash),
            Err(ConfigError::IdConflict {
                id: 1,
                derived: 3,
                ..
            })
        ));
        // A pod whose ordinal is outside the member list (scaled up without new members).
        let outside = ServeArgs {
            id_from_pod_name: Some("junction-3".into()),
            ..args
        };
        assert!(matches!(
            Config::load(&outside),
            Err(ConfigError::NotAMember { id: 4, .. })
        ));
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

    #[test]
    fn the_format_level_limit_is_read_and_kept_within_what_the_build_knows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.toml");
        let base = "node-id = 1\nmembers = \"1=a:1\"\nlisten = \"a:1\"\n";
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        std::fs::write(&path, base).unwrap();
        let c = Config::load(&args).unwrap();
        assert_eq!(c.max_format_level, junction_types::format_level::SUPPORTED);
        std::fs::write(&path, format!("{base}max-format-level = 1\n")).unwrap();
        let c = Config::load(&args).unwrap();
        assert_eq!(c.max_format_level, 1);
        assert!(c.validate().is_ok());
        for bad in [0, junction_types::format_level::SUPPORTED + 1] {
            let c = Config {
                max_format_level: bad,
                ..c.clone()
            };
            assert!(
                matches!(
                    c.validate(),
                    Err(ConfigError::OutOfRange {
                        field: "max-format-level",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
