//! The broker: everything one Junction node does, independent of the wire protocol.
//!
//! - [`Broker`]: owns the node's Raft groups — the metadata group (whose leader is the
//!   controller) and one group per hosted partition replica — and bootstraps the cluster.
//! - [`reconcile`]: makes the partition groups running on this node match the metadata.
//! - [`controller`]: station and tenant administration, node liveness, cluster status.
//! - [`partition`]: a hosted replica and its group-commit batcher.
//! - [`retention`]: leader-driven retention and key compaction, replicated as Raft entries;
//!   the discard-new and memory-limit admission checks.
//! - `memory`: how memory stations' groups start (create, join, or recreate after a total
//!   loss).
//!
//! Depends on types, storage and raft; knows nothing of gRPC services (the server crate maps
//! requests onto these calls and [`BrokerError`] onto statuses).

pub mod auth;
pub mod controller;
pub mod delivery;
mod error;
pub mod groups;
mod leadership;
mod membership;
mod memory;
pub mod moves;
pub mod partition;
pub mod producers;
pub mod quiet;
pub mod quota;
mod reconcile;
mod repair;
pub mod retention;
pub mod schemas;
pub mod scrub;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use junction_proto::peer::{GroupStatus, NodeStatusResponse};
use junction_raft::{
    GroupHost, LogStore, MetaRaft, MetaShared, MetaStateMachine, NetworkFactory, PartitionRaft,
    PartitionState, PeerPool, RaftTuning,
};
use junction_storage::Store;
use junction_types::{GroupId, META_GROUP, MetaState, NodeId, Record};
use openraft::async_runtime::watch::WatchReceiver;
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::error::BrokerError;
pub use crate::partition::{Appended, BatchLimits, PartitionReplica};
pub use crate::retention::{PartitionStats, RetentionTuning};

/// What the broker needs to know about its node and cluster.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub node_id: NodeId,
    /// Initial members: id → advertised `host:port` (client and peer gRPC).
    pub members: BTreeMap<NodeId, String>,
    pub data_dir: PathBuf,
    pub tuning: RaftTuning,
    /// Station default and ceiling for one message.
    pub max_message_bytes: u32,
    pub batch: BatchLimits,
    /// Advertised address → address to dial (fault-injection proxies in the chaos suite).
    pub dial_overrides: junction_raft::DialOverrides,
    /// Retention and compaction periods.
    pub retention: RetentionTuning,
    /// Most bytes the memory stations' replicas may use on this node.
    pub memory_limit_bytes: u64,
    /// Sent with every peer call; `None`: peer calls carry no secret.
    pub cluster_secret: Option<junction_raft::peer_auth::ClusterSecret>,
    /// A node's `Peer` service listens on its advertised port plus this (0: on the client
    /// port). The same on every node.
    pub peer_port_offset: u16,
    /// TLS of the connections to other nodes' peer ports; `None`: plaintext.
    pub peer_tls: Option<junction_tls::ClientTls>,
    /// Longest the schema validation of one message may take before it is refused.
    pub schema_validation_limit: Duration,
    /// This node may initialise a new cluster (see [`junction_raft::rejoin`]); the lowest
    /// member id may without it.
    pub bootstrap: bool,
    /// The background scrubber (see [`scrub`]).
    pub scrub: scrub::ScrubTuning,
    /// Replica moves: how many at once, and whether the balancer runs unasked.
    pub moves: moves::MoveTuning,
    /// Most bytes the tail windows of this node's replicas hold together (0: no windows;
    /// see [`junction_raft::tail`]).
    pub tail_window_bytes: usize,
    /// Most replicas a node brings up while earlier ones are still settling (electing, not yet
    /// quiet; see [`junction_raft::quiesce::may_open`]); 0: no limit.
    pub open_wave: usize,
    /// The highest cluster format level this node reports and takes part in.
    pub max_format_level: u16,
}

/// One message read: its offset and the encoded `StoredRecord` (shared, not copied, when it
/// came from a tail window).
pub type ReadMessage = (u64, bytes::Bytes);

/// One node's broker. Shared as `Arc<Broker>`.
pub struct Broker {
    cfg: BrokerConfig,
    store: Store,
    /// Log and messages of memory stations' replicas (RocksDB in memory, never on disk).
    mem_store: Store,
    /// The memory-station replicas hosted here (for the memory limit).
    memory_groups: Arc<RwLock<HashMap<GroupId, Arc<junction_raft::PartitionShared>>>>,
    pool: Arc<PeerPool>,
    /// The id of the cluster this node's data belongs to.
    identity: junction_raft::peer_auth::ClusterIdentity,
    meta: MetaRaft,
    meta_shared: Arc<MetaShared>,
    partitions: RwLock<HashMap<GroupId, Arc<PartitionReplica>>>,
    /// Serialises reconciliation (the loop and explicit calls).
    reconcile_lock: tokio::sync::Mutex<()>,
    /// Groups whose replica here a scrub is checking because a read found a corrupt record.
    scrubbing: parking_lot::Mutex<std::collections::BTreeSet<GroupId>>,
    /// Partition moves this node (as controller) is driving.
    moving: parking_lot::Mutex<std::collections::BTreeSet<GroupId>>,
    /// Consumer group sessions (used while this node is the controller).
    sessions: parking_lot::Mutex<groups::Sessions>,
    /// Running consumer group deliveries of partitions this node leads.
    dispatchers: parking_lot::Mutex<HashMap<delivery::DispatcherKey, delivery::DispatcherHandle>>,
    /// Subscriptions of pulling members (fetch and settle calls) on partitions this node leads.
    pulls: delivery::pull::PullSessions,
    dead_letters: std::sync::OnceLock<Arc<dyn delivery::DeadLetterSink>>,
    /// Completed passes of the retention loop (see [`Broker::retention_passes`]).
    retention_passes: std::sync::atomic::AtomicU64,
    /// Rate buckets, stored-bytes tallies and open streams of tenants with quotas.
    quotas: quota::NodeQuotas,
    /// Compiled schema versions.
    schema_cache: schemas::SchemaCache,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Set when this node rejoined its cluster with empty state (see
    /// [`junction_raft::rejoin`]); empty otherwise.
    vote_floors: RwLock<junction_raft::rejoin::VoteFloors>,
    /// Whether the metadata group had no state when this node started.
    started_empty: bool,
    /// Set once the metadata leader's answer shows this node is no longer a member (it was
    /// removed, perhaps while it was down): it serves nothing new and reports not ready.
    removed: std::sync::atomic::AtomicBool,
    /// A node that started with empty state answers no vote at all until it knows whether
    /// it rejoins a running cluster (and its vote floors) or starts a new one.
    votes_held: std::sync::atomic::AtomicBool,
    /// Which other members answer pings (see [`quiet`]).
    liveness: parking_lot::RwLock<junction_raft::quiesce::Liveness>,
    /// The format level each other member last reported in its answer to a ping.
    peer_levels: parking_lot::RwLock<BTreeMap<NodeId, u16>>,
    /// The memory every replica's tail window draws on.
    tail_budget: Arc<junction_raft::TailBudget>,
}

/// How long a node with empty state waits for each member's answer before it decides whether
/// to initialise or rejoin (members that are starting answer once they serve).
const PROBE_LIMIT: Duration = Duration::from_secs(3);

/// What one other member answered to `NodeStatus`; `None` when it could not be dialled or did
/// not answer within the limit.
type MemberAnswer = Option<Result<NodeStatusResponse, tonic::Status>>;

/// Between rounds of asking the members how to start, while none answers.
const BOOTSTRAP_RETRY: Duration = Duration::from_millis(500);

/// How often idle tail windows are emptied: a window nobody appended to for one to two of
/// these periods lets its memory go.
const TAIL_SWEEP: Duration = Duration::from_secs(5);

/// Asks every other configured member for its status at once, each for at most `limit`.
async fn ask_members(
    cfg: &BrokerConfig,
    pool: &PeerPool,
    limit: Duration,
) -> Vec<(NodeId, String, MemberAnswer)> {
    let calls = cfg
        .members
        .iter()
        .filter(|(id, _)| **id != cfg.node_id)
        .map(|(id, addr)| async move {
            let answer = match pool.client(addr) {
                Ok(mut client) => {
                    let call = client.node_status(junction_proto::peer::NodeStatusRequest {});
                    tokio::time::timeout(limit, call)
                        .await
                        .ok()
                        .map(|r| r.map(tonic::Response::into_inner))
                }
                Err(_) => None,
            };
            (*id, addr.clone(), answer)
        });
    futures::future::join_all(calls).await
}

/// Before a node with a known cluster id starts its groups, it asks the configured members
/// whether they belong to the same cluster: a member that refuses its calls as coming from
/// another cluster (its data directory was swapped, restored from another cluster, or its
/// member list is wrong) stops the start with both ids named. Members that do not answer
/// within a short time are not waited for.
async fn refuse_another_clusters_members(
    cfg: &BrokerConfig,
    pool: &PeerPool,
) -> Result<(), BrokerError> {
    let refusals: Vec<String> = ask_members(cfg, pool, Duration::from_secs(2))
        .await
        .into_iter()
        .filter_map(|(id, addr, answer)| match answer {
            Some(Err(status))
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().starts_with("cluster mismatch") =>
            {
                Some(format!(
                    "member {id} at {addr} answered: {}",
                    status.message()
                ))
            }
            _ => None,
        })
        .collect();
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(BrokerError::Raft(format!(
            "refusing to start: this node's data belongs to another cluster than its members'; \
             {}",
            refusals.join("; ")
        )))
    }
}

impl Broker {
    /// Opens the node's groups and starts the metadata group. A node with empty state then
    /// initialises or rejoins the cluster in [`Broker::bootstrap_metadata`], which the server
    /// calls once its peer service answers.
    pub async fn start(cfg: BrokerConfig, store: Store) -> Result<Arc<Self>, BrokerError> {
        let identity = junction_raft::peer_auth::ClusterIdentity::load(store.clone())
            .map_err(|e| BrokerError::Raft(e.to_string()))?;
        let pool = Arc::new(PeerPool::new(
            cfg.dial_overrides.clone(),
            cfg.cluster_secret.clone(),
            identity.clone(),
            cfg.peer_port_offset,
            cfg.peer_tls.clone(),
        ));
        refuse_another_clusters_members(&cfg, &pool).await?;
        let vote_floors = match store.rejoin_floors()? {
            Some(bytes) => junction_raft::rejoin::VoteFloors::decode(&bytes)
                .map_err(|e| BrokerError::Raft(e.to_string()))?,
            None => junction_raft::rejoin::VoteFloors::default(),
        };
        let sm = MetaStateMachine::open(store.clone())?;
        let meta_shared = sm.shared();
        // A cluster that runs at a level this build does not understand writes entries it
        // cannot read: refuse to start rather than stall or misread them.
        junction_types::format_level::check_supported(
            meta_shared.current().format_level,
            cfg.max_format_level,
        )
        .map_err(BrokerError::Raft)?;
        let config = cfg
            .tuning
            .config("junction-meta")
            .map_err(|e| BrokerError::Raft(e.to_string()))?;
        let meta = MetaRaft::new(
            cfg.node_id,
            config,
            NetworkFactory::new(META_GROUP, pool.clone()),
            LogStore::new(store.clone(), META_GROUP),
            sm,
        )
        .await
        .map_err(|e| BrokerError::Raft(e.to_string()))?;
        // Decided now, before any peer can reach this node: once its peer service answers,
        // a leader may replicate into an empty node before it asks its members anything.
        let started_empty = !meta
            .is_initialized()
            .await
            .map_err(|e| BrokerError::Raft(e.to_string()))?;
        let mem_store = Store::open_in_memory(&cfg.data_dir.join("memory"))?;
        let cfg_tuning = cfg.tuning.clone();
        let tail_budget = junction_raft::TailBudget::new(cfg.tail_window_bytes);
        let broker = Arc::new(Self {
            cfg,
            store,
            mem_store,
            memory_groups: Arc::new(RwLock::new(HashMap::new())),
            pool,
            identity,
            votes_held: std::sync::atomic::AtomicBool::new(started_empty && vote_floors.is_empty()),
            started_empty,
            vote_floors: RwLock::new(vote_floors),
            meta,
            meta_shared,
            partitions: RwLock::new(HashMap::new()),
            reconcile_lock: tokio::sync::Mutex::new(()),
            scrubbing: parking_lot::Mutex::default(),
            moving: parking_lot::Mutex::default(),
            sessions: parking_lot::Mutex::default(),
            dispatchers: parking_lot::Mutex::default(),
            pulls: delivery::pull::PullSessions::default(),
            dead_letters: std::sync::OnceLock::new(),
            retention_passes: std::sync::atomic::AtomicU64::new(0),
            quotas: quota::NodeQuotas::default(),
            schema_cache: schemas::SchemaCache::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            removed: std::sync::atomic::AtomicBool::new(false),
            liveness: quiet::liveness(&cfg_tuning),
            peer_levels: Default::default(),
            tail_budget,
        });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.reconcile_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.session_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.retention_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.quota_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.join_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.scrub_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.reconfig_loop().await });
        let b = broker.clone();
        broker
            .tasks
            .spawn(async move { b.membership_watch().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.quiesce_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.liveness_loop().await });
        let b = broker.clone();
        broker.tasks.spawn(async move { b.tail_sweep_loop().await });
        Ok(broker)
    }

    /// For a node that started with empty state: asks the members whether a cluster runs,
    /// and initialises a new one or rejoins it (see [`junction_raft::rejoin`]). Until it
    /// knows, it answers no vote; when no member answers yet and it may not initialise, it
    /// asks again in the background. Nothing for a node with state.
    pub async fn bootstrap_metadata(self: &Arc<Self>) -> Result<(), BrokerError> {
        if !self.started_empty {
            return Ok(());
        }
        if self.bootstrap_once().await? {
            return Ok(());
        }
        let broker = self.clone();
        self.tasks.spawn(async move {
            let shutdown = broker.shutdown_token();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(BOOTSTRAP_RETRY) => {}
                    () = shutdown.cancelled() => return,
                }
                match broker.bootstrap_once().await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "deciding how to start failed; asking again");
                    }
                }
            }
        });
        Ok(())
    }

    /// One round of [`Broker::bootstrap_metadata`]: `Ok(true)` once decided (votes are
    /// answered again), `Ok(false)` to ask again later.
    async fn bootstrap_once(&self) -> Result<bool, BrokerError> {
        use junction_raft::rejoin::{Bootstrap, decide};
        let lowest = self.cfg.members.keys().next().copied() == Some(self.cfg.node_id);
        let answers = self.probe_members().await;
        let decision = decide(self.cfg.bootstrap || lowest, &answers)
            .map_err(|e| BrokerError::Raft(format!("refusing to start: {e}")))?;
        match decision {
            Bootstrap::Wait => return Ok(false),
            Bootstrap::Rejoin { cluster_id, floors } => {
                self.identity.adopt(&cluster_id).map_err(|e| {
                    BrokerError::Raft(format!("refusing to start with empty state: {e}"))
                })?;
                self.store.set_rejoin_floors(&floors.encode())?;
                tracing::warn!(
                    cluster = %cluster_id,
                    floors = ?floors,
                    "this node has no state but its members run cluster {cluster_id}: rejoining \
                     it as an empty replica; each group catches up from its leader, and this \
                     node votes in a group only once it holds what the members had applied"
                );
                *self.vote_floors.write() = floors;
            }
            Bootstrap::Initialise => {
                let initialized = self
                    .meta
                    .is_initialized()
                    .await
                    .map_err(|e| BrokerError::Raft(e.to_string()))?;
                if !initialized {
                    self.initialise_cluster().await?;
                }
            }
        }
        self.votes_held
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(true)
    }

    /// Asks every other member for its cluster id and how far its groups have applied;
    /// returns the answers that came (a member that does not answer in time is left out).
    async fn probe_members(&self) -> Vec<junction_raft::rejoin::ProbeAnswer> {
        ask_members(&self.cfg, &self.pool, PROBE_LIMIT)
            .await
            .into_iter()
            .filter_map(|(id, addr, answer)| match answer {
                Some(Ok(r)) => Some(junction_raft::rejoin::ProbeAnswer {
                    node: id,
                    cluster_id: r.cluster_id,
                    applied: r
                        .groups
                        .iter()
                        .map(|g| (g.group, g.applied_index))
                        .collect(),
                }),
                Some(Err(status)) => {
                    tracing::info!(member = id, %addr, %status, "member did not answer");
                    None
                }
                None => {
                    tracing::info!(member = id, %addr, "member did not answer in time");
                    None
                }
            })
            .collect()
    }

    async fn initialise_cluster(&self) -> Result<(), BrokerError> {
        let nodes: BTreeMap<NodeId, openraft::BasicNode> = self
            .cfg
            .members
            .iter()
            .map(|(id, addr)| (*id, openraft::BasicNode::new(addr)))
            .collect();
        // The cluster's id is made here, once, by the one node that initialises it; every
        // other node adopts it from the first peer call that carries it, or from its members'
        // answers when it starts with empty state.
        let id = match self.identity.get() {
            Some(id) => id,
            None => self
                .identity
                .create()
                .map_err(|e| BrokerError::Raft(e.to_string()))?,
        };
        tracing::info!(members = ?self.cfg.members, cluster = %id, "initialising a new cluster");
        match self.meta.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(openraft::errors::RaftError::APIError(
                openraft::errors::InitializeError::NotAllowed(e),
            )) => {
                tracing::info!("cluster already initialised: {e}");
                Ok(())
            }
            Err(e) => Err(BrokerError::Raft(e.to_string())),
        }
    }

    /// The vote floors this node keeps since it rejoined with empty state (empty when it
    /// never did).
    pub fn vote_floors(&self) -> junction_raft::rejoin::VoteFloors {
        self.vote_floors.read().clone()
    }

    /// Whether this replica may answer a vote in `group` (see [`junction_raft::rejoin`]).
    fn vote_allowed(&self, group: GroupId, candidate_last: Option<u64>) -> Result<(), String> {
        if self.votes_held.load(std::sync::atomic::Ordering::Acquire) {
            return Err(format!(
                "node {} started with empty state and is still asking its members whether a \
                 cluster runs; it votes once it knows",
                self.cfg.node_id
            ));
        }
        let floors = self.vote_floors.read();
        if floors.is_empty() {
            return Ok(());
        }
        let own_last = if group == META_GROUP {
            self.meta.metrics().borrow_watched().last_log_index
        } else {
            self.partition(group)
                .and_then(|r| r.raft.metrics().borrow_watched().last_log_index)
        };
        if floors.may_grant(group, own_last, candidate_last) {
            Ok(())
        } else {
            Err(format!(
                "node {} rejoined with empty state and holds group {group} up to {own_last:?}; \
                 it votes there only for a candidate holding index {} (what its members had \
                 applied when it rejoined)",
                self.cfg.node_id,
                floors.floor(group).unwrap_or(0)
            ))
        }
    }

    /// Sets where dead letters are appended (once; later calls are ignored).
    pub fn set_dead_letter_sink(&self, sink: Arc<dyn delivery::DeadLetterSink>) {
        let _ = self.dead_letters.set(sink);
    }

    pub fn dead_letter_sink(&self) -> Option<Arc<dyn delivery::DeadLetterSink>> {
        self.dead_letters.get().cloned()
    }

    /// Runs a background task that shutdown waits for.
    pub(crate) fn tasks_spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(f);
    }

    /// Returns this node's id.
    pub fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// The format level each other member last reported (in its answer to a ping).
    pub fn peer_format_levels(&self) -> BTreeMap<NodeId, u16> {
        self.peer_levels.read().clone()
    }

    /// Returns the broker's configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// Returns the metadata as this node last applied it.
    pub fn metadata(&self) -> Arc<MetaState> {
        self.meta_shared.current()
    }

    /// Returns a receiver of metadata changes.
    pub fn subscribe_metadata(&self) -> tokio::sync::watch::Receiver<Arc<MetaState>> {
        self.meta_shared.subscribe()
    }

    /// The id of the cluster this node's data belongs to (see `ClusterIdentity`).
    pub fn identity(&self) -> &junction_raft::peer_auth::ClusterIdentity {
        &self.identity
    }

    /// Returns the index of the last metadata entry applied here.
    pub fn meta_applied_index(&self) -> u64 {
        self.meta_shared.applied_index()
    }

    /// Waits until this node has applied the metadata entry at `index`, for at most `limit`;
    /// returns whether it has.
    pub async fn wait_meta_applied(&self, index: u64, limit: std::time::Duration) -> bool {
        self.meta_shared.wait_applied(index, limit).await
    }

    /// Returns the metadata group's Raft handle.
    pub fn meta_raft(&self) -> &MetaRaft {
        &self.meta
    }

    /// Returns (leader id, term) of the metadata group as this node sees it.
    pub fn meta_leader(&self) -> (Option<NodeId>, u64) {
        let m = self.meta.metrics();
        let m = m.borrow_watched();
        (m.current_leader, m.current_term)
    }

    /// Returns the advertised address of every member, from the metadata group's membership.
    pub fn node_addrs(&self) -> BTreeMap<NodeId, String> {
        let m = self.meta.metrics();
        let m = m.borrow_watched();
        let from_membership: BTreeMap<NodeId, String> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        if from_membership.is_empty() {
            self.cfg.members.clone()
        } else {
            from_membership
        }
    }

    /// Returns the address of `node`, if known.
    pub fn addr_of(&self, node: NodeId) -> Option<String> {
        self.node_addrs().remove(&node)
    }

    /// Returns every partition replica hosted here (a copy of the list: no lock is held).
    pub(crate) fn replicas(&self) -> Vec<Arc<PartitionReplica>> {
        self.partitions.read().values().cloned().collect()
    }

    /// Returns the replica of `group` hosted here.
    pub fn partition(&self, group: GroupId) -> Option<Arc<PartitionReplica>> {
        self.partitions.read().get(&group).cloned()
    }

    /// Returns the ids of the partition groups hosted here.
    pub fn hosted(&self) -> Vec<GroupId> {
        self.partitions.read().keys().copied().collect()
    }

    /// Returns the node-to-node client pool.
    pub fn peers(&self) -> &Arc<PeerPool> {
        &self.pool
    }

    /// Appends records to a partition this node leads. Resolves once they are committed by a
    /// majority (fsynced) and applied.
    pub async fn append(
        &self,
        group: GroupId,
        records: Vec<Record>,
    ) -> Result<Appended, BrokerError> {
        self.enqueue_append(group, records, None, None)
            .await?
            .await
            .map_err(|_| {
                BrokerError::Unavailable(format!(
                    "partition group {group} stopped; the append's outcome is unknown"
                ))
            })?
    }

    /// Queues records for the partition's group-commit loop and returns the receiver of the
    /// outcome. Appends queued one after another land in the log in that order.
    /// `producer`: an idempotent producer's batch fields (checked when applied).
    pub async fn enqueue_append(
        &self,
        group: GroupId,
        records: Vec<Record>,
        producer: Option<junction_types::exactly_once::ProducerBatch>,
        sequence_span: Option<u32>,
    ) -> Result<oneshot::Receiver<Result<Appended, BrokerError>>, BrokerError> {
        let replica = self.partition(group).ok_or(BrokerError::NotHosted {
            node: self.cfg.node_id,
            group,
        })?;
        let bytes = records.iter().map(Record::size).sum();
        let sequence_span =
            sequence_span.unwrap_or_else(|| u32::try_from(records.len()).unwrap_or(u32::MAX));
        let (tx, rx) = oneshot::channel();
        replica
            .appends
            .send(partition::AppendRequest {
                records,
                producer,
                sequence_span,
                bytes,
                reply: tx,
            })
            .await
            .map_err(|_| {
                BrokerError::Unavailable(format!("partition group {group} is stopping"))
            })?;
        Ok(rx)
    }

    /// Reads committed messages of a hosted partition from `from`; returns them with the
    /// partition state they were read against. Messages still in the replica's tail window
    /// come from memory; older ones from the store, on a blocking thread.
    pub async fn read(
        &self,
        group: GroupId,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<(Vec<ReadMessage>, PartitionState), BrokerError> {
        let replica = self.partition(group).ok_or(BrokerError::NotHosted {
            node: self.cfg.node_id,
            group,
        })?;
        let state = replica.shared.current();
        let from = from.max(state.start_offset);
        let (count, bytes) = (max_count.max(1), max_bytes.max(1));
        if from >= state.next_offset {
            return Ok((Vec::new(), state));
        }
        if let Some(msgs) = replica
            .shared
            .window()
            .read(from, state.next_offset, count, bytes)
        {
            metrics::counter!("junction_read_requests_total", "source" => "memory").increment(1);
            return Ok((msgs, state));
        }
        metrics::counter!("junction_read_requests_total", "source" => "disk").increment(1);
        let store = replica.store.clone();
        let msgs = tokio::task::spawn_blocking(move || {
            store.read_messages(group, from, state.next_offset, count, bytes)
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("a read of group {group} stopped: {e}")))??;
        Ok((
            msgs.into_iter()
                .map(|(o, v)| (o, bytes::Bytes::from(v)))
                .collect(),
            state,
        ))
    }

    /// Bytes the tail windows of this node's replicas hold, and their limit.
    pub fn tail_window_bytes(&self) -> (usize, usize) {
        (self.tail_budget.used(), self.tail_budget.limit())
    }

    /// Empties, every few seconds, the tail windows nobody appended to since the last pass,
    /// so idle partitions give their memory to busy ones.
    async fn tail_sweep_loop(self: Arc<Self>) {
        let mut every = tokio::time::interval(TAIL_SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            for r in self.replicas() {
                r.shared.window().sweep_idle();
            }
        }
    }

    /// Returns the offset of the first message at or after `ts_ms` (or the end).
    pub fn offset_for_time(&self, group: GroupId, ts_ms: i64) -> Result<u64, BrokerError> {
        let replica = self.partition(group).ok_or(BrokerError::NotHosted {
            node: self.cfg.node_id,
            group,
        })?;
        let end = replica.shared.current().next_offset;
        Ok(replica
            .store
            .seek_time(group, ts_ms)?
            .map_or(end, |o| o.min(end)))
    }

    /// Returns the RocksDB handle.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Returns the token cancelled when the broker shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Hands leadership off (bounded), then stops every group cleanly so that RocksDB can be
    /// closed.
    pub async fn shutdown(&self) {
        self.hand_off_leadership(Duration::from_secs(2)).await;
        self.shutdown.cancel();
        self.tasks.close();
        let groups: Vec<Arc<PartitionReplica>> =
            self.partitions.write().drain().map(|(_, r)| r).collect();
        for r in groups {
            let _ignored = tokio::time::timeout(Duration::from_secs(5), r.raft.shutdown()).await;
        }
        let _ignored = tokio::time::timeout(Duration::from_secs(5), self.meta.shutdown()).await;
        let _ignored = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }

    async fn open_partition(&self, group: GroupId, replicas: &[NodeId]) -> Result<(), BrokerError> {
        let (policy, delivery) = self
            .metadata()
            .partition_of_group(group)
            .map(|(s, _)| (s.policy, s.delivery))
            .unwrap_or_default();
        let memory = policy.storage == junction_types::StorageTier::Memory;
        // A replica placed here again after an earlier one was deleted (group ids are never
        // reused by stations, but a replica may move away and back).
        self.store.reinstate_group(group);
        self.mem_store.reinstate_group(group);
        let store = if memory {
            self.mem_store.clone()
        } else {
            self.store.clone()
        };
        let first = replicas.first() == Some(&self.cfg.node_id);
        let memory_start = if first && memory {
            Some(
                memory::decide_start(
                    self.cfg.node_id,
                    group,
                    replicas,
                    &self.pool,
                    &self.node_addrs(),
                    &self.mem_store,
                    &self.store,
                )
                .await?,
            )
        } else {
            None
        };
        // The log first: the state machine's messages may point into it (and it reads
        // them as it opens). A memory group's vote stays on disk: a restarted replica
        // never votes twice.
        let log_store = if memory {
            LogStore::with_vote_store(store.clone(), self.store.clone(), group)
        } else {
            // Opening reads the newest segment through (and moves an older build's log out
            // of RocksDB): off the async workers.
            let s = store.clone();
            tokio::task::spawn_blocking(move || LogStore::segmented(s, group))
                .await
                .map_err(|e| BrokerError::Raft(e.to_string()))?
                .map_err(|e| open_failure(group, e))?
        };
        let sm = junction_raft::PartitionStateMachine::open(
            store.clone(),
            group,
            self.tail_budget.clone(),
        )
        .map_err(|e| open_failure(group, e))?;
        let shared = sm.shared();
        let config = self
            .cfg
            .tuning
            .config_with(&format!("junction-partition-{group}"), memory)
            .map_err(|e| BrokerError::Raft(e.to_string()))?;
        let raft = PartitionRaft::new(
            self.cfg.node_id,
            config,
            NetworkFactory::new(group, self.pool.clone()),
            log_store,
            sm,
        )
        .await
        .map_err(|e| {
            // Raft reads the log's last entry and re-applies what the state machine lacks as
            // it starts: a stored entry that fails its checksum surfaces here.
            let detail = e.to_string();
            if junction_raft::names_corruption(&detail) {
                BrokerError::CorruptReplica { group, detail }
            } else {
                BrokerError::Raft(detail)
            }
        })?;
        // A group this node's members held when it rejoined with empty state runs already:
        // its leader brings this replica up to date.
        let running_elsewhere = self.vote_floors.read().floor(group).is_some();
        if first
            && memory_start != Some(memory::MemoryStart::Join)
            && !running_elsewhere
            && !raft
                .is_initialized()
                .await
                .map_err(|e| BrokerError::Raft(e.to_string()))?
        {
            let addrs = self.node_addrs();
            let mut nodes = BTreeMap::new();
            for r in replicas {
                let addr = addrs.get(r).cloned().ok_or_else(|| {
                    BrokerError::Unavailable(format!(
                        "no address known for node {r} (group {group})"
                    ))
                })?;
                nodes.insert(*r, openraft::BasicNode::new(addr));
            }
            match raft.initialize(nodes).await {
                Ok(()) if memory_start == Some(memory::MemoryStart::Recreate) => {
                    self.tasks.spawn(memory::report_loss(
                        self.cfg.node_id,
                        group,
                        raft.clone(),
                        self.shutdown.clone(),
                    ));
                }
                Ok(()) => {}
                Err(e) => tracing::debug!(group, "partition group initialise: {e}"),
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        let node = self.cfg.node_id;
        let limits = self.cfg.batch;
        let quiet = Arc::new(quiet::Quiet::new(
            raft.clone(),
            self.cfg.tuning.election_max,
        ));
        let policy = Arc::new(RwLock::new(policy));
        let delivery = Arc::new(RwLock::new(delivery));
        let admission = retention::Admission {
            store: store.clone(),
            group,
            shared: shared.clone(),
            policy: policy.clone(),
            memory: memory.then(|| {
                (
                    self.cfg.memory_limit_bytes,
                    retention::MemoryGauge {
                        store: self.mem_store.clone(),
                        groups: self.memory_groups.clone(),
                    },
                )
            }),
        };
        if memory {
            self.memory_groups.write().insert(group, shared.clone());
        }
        self.tasks.spawn(partition::run_batcher(
            node,
            group,
            quiet.clone(),
            rx,
            limits,
            admission,
            partition::EntrySettings {
                delivery: delivery.clone(),
                meta: self.meta_shared.clone(),
            },
        ));
        let replica = Arc::new(PartitionReplica {
            group,
            quiet: quiet.clone(),
            raft,
            shared,
            appends: tx,
            policy,
            delivery,
            store,
        });
        self.partitions.write().insert(group, replica);
        tracing::info!(group, ?replicas, "partition replica started");
        Ok(())
    }

    async fn close_partition(&self, group: GroupId, delete_data: bool) {
        let replica = self.partitions.write().remove(&group);
        self.memory_groups.write().remove(&group);
        if let Some(r) = replica {
            let _ignored = tokio::time::timeout(Duration::from_secs(5), r.raft.shutdown()).await;
        }
        if delete_data {
            let store = self.store.clone();
            let mem = self.mem_store.clone();
            let res = tokio::task::spawn_blocking(move || {
                mem.delete_group(group)?;
                store.delete_group(group)
            })
            .await;
            match res {
                Ok(Ok(())) => tracing::info!(group, "partition replica deleted"),
                Ok(Err(e)) => tracing::error!(group, error = %e, "deleting partition data failed"),
                Err(e) => tracing::error!(group, error = %e, "deleting partition data panicked"),
            }
        }
    }

    /// Returns the status of every group hosted here (for peers and the admin API).
    pub fn local_status(&self) -> NodeStatusResponse {
        let mut groups = Vec::new();
        {
            let m = self.meta.metrics();
            let m = m.borrow_watched();
            groups.push(GroupStatus {
                group: META_GROUP,
                leader: m.current_leader,
                next_offset: 0,
                start_offset: 0,
                term: m.current_term,
                applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
                quiet: false,
            });
        }
        let replicas: Vec<Arc<PartitionReplica>> = self.replicas();
        for r in replicas {
            let s = r.shared.current();
            groups.push(GroupStatus {
                group: r.group,
                leader: r.leader(),
                next_offset: s.next_offset,
                start_offset: s.start_offset,
                term: r.term(),
                applied_index: r.applied_index(),
                quiet: r.quiet.is_quiet(),
            });
        }
        NodeStatusResponse {
            node_id: self.cfg.node_id,
            groups,
            cluster_id: self.identity.get().unwrap_or_default(),
            meta_voters: self.meta_voters().into_iter().collect(),
        }
    }
}

impl GroupHost for Broker {
    fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    fn format_level(&self) -> u16 {
        self.cfg.max_format_level
    }

    fn meta_raft(&self) -> Option<MetaRaft> {
        Some(self.meta.clone())
    }

    fn wake_group(&self, group: GroupId) {
        if let Some(r) = self.partition(group) {
            r.quiet.wake();
        }
    }

    fn pre_vote_rule(&self, group: GroupId) -> junction_raft::quiesce::PreVote {
        Broker::pre_vote_rule(self, group)
    }

    fn quiesce(
        &self,
        req: junction_proto::peer::QuiesceRequest,
    ) -> junction_proto::peer::QuiesceResponse {
        self.quiesce_followers(req)
    }

    fn partition_raft(&self, group: GroupId) -> Option<PartitionRaft> {
        self.partition(group).map(|r| r.raft.clone())
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("snapshots")
    }

    fn node_status(&self) -> NodeStatusResponse {
        self.local_status()
    }

    fn may_vote(&self, group: GroupId, candidate_last: Option<u64>) -> Result<(), String> {
        self.vote_allowed(group, candidate_last)
    }

    fn scrub_digests(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
        span: u64,
    ) -> Result<(Vec<u32>, u64), String> {
        Broker::scrub_digests(self, group, from, to, span).map_err(|e| e.to_string())
    }

    fn scrub_node(
        self: Arc<Self>,
    ) -> futures::future::BoxFuture<'static, junction_proto::v1::NodeScrubReport> {
        Box::pin(async move { Broker::scrub_node(&self).await })
    }

    fn change_replicas(
        self: Arc<Self>,
        group: GroupId,
        voters: Vec<NodeId>,
    ) -> futures::future::BoxFuture<'static, junction_proto::peer::ChangeReplicasResponse> {
        Box::pin(async move { Broker::change_replicas(&self, group, voters).await })
    }

    fn partition_stats(&self, groups: &[GroupId]) -> Vec<junction_proto::peer::GroupStats> {
        groups
            .iter()
            .filter_map(|g| {
                let s = Broker::partition_stats(self, *g).ok()?;
                let replica = self.partition(*g)?;
                let last_log_index = replica.raft.metrics().borrow_watched().last_log_index;
                let eo = replica.shared.exactly_once();
                Some(junction_proto::peer::GroupStats {
                    last_log_index,
                    group: *g,
                    start_offset: s.start_offset,
                    next_offset: s.next_offset,
                    messages: s.messages,
                    bytes: s.bytes,
                    data_lost_at_ms: s.data_lost_at_ms,
                    producers: eo.producers,
                    dedup_ids: eo.dedup_ids,
                    dedup_id_bytes: eo.dedup_id_bytes,
                })
            })
            .collect()
    }
}

/// Maps a failure to open a replica's log or state machine: damage (a checked entry, record,
/// pointer or segment that fails its checks) means the replica is rebuilt from the leader.
fn open_failure(group: GroupId, e: std::io::Error) -> BrokerError {
    let typed = matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<junction_raft::RaftStoreError>()),
        Some(junction_raft::RaftStoreError::Corrupt { .. })
    );
    let detail = e.to_string();
    if typed || junction_raft::names_corruption(&detail) {
        BrokerError::CorruptReplica { group, detail }
    } else {
        BrokerError::from(e)
    }
}
