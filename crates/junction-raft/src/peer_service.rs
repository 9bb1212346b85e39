//! The server side of the `Peer` service: routes each Raft RPC to the group it names.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use junction_proto::peer::peer_server::Peer;
use junction_proto::peer::{
    ChangeReplicasRequest, ChangeReplicasResponse, GroupStats, JoinClusterRequest,
    JoinClusterResponse, NodeStatusRequest, NodeStatusResponse, PartitionStatsRequest,
    PartitionStatsResponse, PingRequest, PingResponse, QuiesceRequest, QuiesceResponse, RaftReply,
    RaftRequest, ScrubDigestsRequest, ScrubDigestsResponse, ScrubNodeRequest, SnapshotChunk,
};
use junction_types::{GroupId, META_GROUP, NodeId};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::format::{self, Format, decode, encode};
use crate::promotion::{Promotion, PromotionView, ReplicaView, decide};
use crate::quiesce::PreVote;
use crate::snapshot::{SnapshotData, check_complete};
use crate::types::{MetaRaft, PartitionRaft, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// What the peer service needs from the node: its Raft groups and a place for snapshots.
pub trait GroupHost: Send + Sync + 'static {
    fn node_id(&self) -> NodeId;
    /// The highest cluster format level this node reports to its peers.
    fn format_level(&self) -> u16 {
        junction_types::format_level::SUPPORTED
    }
    fn meta_raft(&self) -> Option<MetaRaft>;
    /// Raft traffic that needs a partition group awake reached this node: entries, a
    /// snapshot, a vote or a leadership transfer (see [`crate::quiesce`]).
    fn wake_group(&self, _group: GroupId) {}
    /// What to do with a pre-vote in a partition group (see [`crate::quiesce::pre_vote`]).
    fn pre_vote_rule(&self, _group: GroupId) -> PreVote {
        PreVote::Answer
    }
    /// A leader asks this node to let some of its partition groups go quiet; returns those
    /// that did.
    fn quiesce(&self, _req: QuiesceRequest) -> QuiesceResponse {
        QuiesceResponse::default()
    }
    fn partition_raft(&self, group: GroupId) -> Option<PartitionRaft>;
    fn snapshot_dir(&self) -> PathBuf;
    fn node_status(&self) -> NodeStatusResponse;
    /// The stored size of the requested partition groups hosted here.
    fn partition_stats(&self, _groups: &[GroupId]) -> Vec<GroupStats> {
        Vec::new()
    }
    /// Whether this node may answer a vote (or pre-vote) in `group` from a candidate whose log
    /// ends at `candidate_last`; `Err` says why not (see [`crate::rejoin::VoteFloors`]).
    fn may_vote(&self, _group: GroupId, _candidate_last: Option<u64>) -> Result<(), String> {
        Ok(())
    }
    /// Digests of a partition replica's records in `[from, to)` in ranges of `span`, and
    /// the replica's applied index (see `junction_broker::scrub`). Blocking: called off the
    /// async workers.
    fn scrub_digests(
        &self,
        group: GroupId,
        _from: u64,
        _to: u64,
        _span: u64,
    ) -> Result<(Vec<u32>, u64), String> {
        Err(format!("group {group}: this node does not scrub"))
    }
    /// Runs one scrub pass over every partition replica here.
    fn scrub_node(
        self: Arc<Self>,
    ) -> futures::future::BoxFuture<'static, junction_proto::v1::NodeScrubReport> {
        Box::pin(async {
            junction_proto::v1::NodeScrubReport {
                error: "this node does not scrub".into(),
                ..Default::default()
            }
        })
    }
    /// Makes the voters of a partition group this node leads exactly `voters` (see the
    /// `ChangeReplicas` call).
    fn change_replicas(
        self: Arc<Self>,
        group: GroupId,
        _voters: Vec<NodeId>,
    ) -> futures::future::BoxFuture<'static, ChangeReplicasResponse> {
        Box::pin(async move {
            ChangeReplicasResponse {
                error: format!("group {group}: this node does not move replicas"),
                ..Default::default()
            }
        })
    }
}

/// Either kind of Raft group (they differ only in their state machine type).
enum AnyRaft {
    Meta(MetaRaft),
    Partition(PartitionRaft),
}

/// Serves the `Peer` gRPC service for every group on this node.
pub struct PeerService<H> {
    host: Arc<H>,
    spool_seq: AtomicU64,
}

impl<H: GroupHost> PeerService<H> {
    pub fn new(host: Arc<H>) -> Self {
        Self {
            host,
            spool_seq: AtomicU64::new(0),
        }
    }

    fn raft(&self, group: GroupId) -> Option<AnyRaft> {
        if group == META_GROUP {
            self.host.meta_raft().map(AnyRaft::Meta)
        } else {
            self.host.partition_raft(group).map(AnyRaft::Partition)
        }
    }
}

fn not_hosted() -> Response<RaftReply> {
    Response::new(RaftReply {
        not_hosted: true,
        ..Default::default()
    })
}

/// A vote this node does not answer: the candidate counts it as not granted.
fn withheld(why: String) -> Response<RaftReply> {
    Response::new(RaftReply {
        error: why,
        ..Default::default()
    })
}

fn reply<T: serde::Serialize, E: std::fmt::Display>(
    format: &Format,
    r: Result<T, E>,
) -> Result<Response<RaftReply>, Status> {
    Ok(Response::new(match r {
        Ok(v) => RaftReply {
            payload: encode(format, &v).map_err(|e| Status::internal(e.to_string()))?,
            ..Default::default()
        },
        Err(e) => RaftReply {
            error: e.to_string(),
            ..Default::default()
        },
    }))
}

/// Checks the leader's checksum of every checked append among received entries.
fn check_received(group: GroupId, rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    for e in &rpc.entries {
        if let openraft::EntryPayload::Normal(junction_types::Command::Partition(cmd)) = &e.payload
        {
            cmd.check().map_err(|m| {
                format!(
                    "corrupt log entry received: group {group} at {}: {m}",
                    e.log_id
                )
            })?;
        }
    }
    Ok(())
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

#[tonic::async_trait]
impl<H: GroupHost> Peer for PeerService<H> {
    async fn append_entries(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&format::APPEND_ENTRIES, &r.payload).map_err(bad)?;
        match self.raft(r.group) {
            None => Ok(not_hosted()),
            Some(AnyRaft::Meta(raft)) => {
                reply(&format::APPEND_REPLY, raft.append_entries(rpc).await)
            }
            Some(AnyRaft::Partition(raft)) => {
                // Entries that fail their leader's checksum changed on the way: none is
                // stored, and the leader sends them again (read again from its log).
                if let Err(detail) = check_received(r.group, &rpc) {
                    metrics::counter!("junction_corruption_events_total", "kind" => "replication")
                        .increment(1);
                    tracing::error!(group = r.group, %detail, "refused corrupt entries from the leader");
                    return Err(Status::data_loss(detail));
                }
                // Entries wake a quiet follower once they are in (its election timer then
                // starts from this leader's message); heartbeats wake nobody.
                let entries = !rpc.entries.is_empty();
                let res = raft.append_entries(rpc).await;
                if entries {
                    self.host.wake_group(r.group);
                }
                reply(&format::APPEND_REPLY, res)
            }
        }
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let rpc: VoteRequest<TypeConfig> =
            decode(&format::VOTE_REQUEST, &r.payload).map_err(bad)?;
        if let Err(why) = self
            .host
            .may_vote(r.group, rpc.last_log_id.as_ref().map(|l| l.index))
        {
            return Ok(withheld(why));
        }
        match self.raft(r.group) {
            None => Ok(not_hosted()),
            Some(AnyRaft::Meta(raft)) => reply(&format::VOTE_REPLY, raft.vote(rpc).await),
            Some(AnyRaft::Partition(raft)) => {
                self.host.wake_group(r.group);
                reply(&format::VOTE_REPLY, raft.vote(rpc).await)
            }
        }
    }

    async fn pre_vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let rpc: VoteRequest<TypeConfig> =
            decode(&format::VOTE_REQUEST, &r.payload).map_err(bad)?;
        if let Err(why) = self
            .host
            .may_vote(r.group, rpc.last_log_id.as_ref().map(|l| l.index))
        {
            return Ok(withheld(why));
        }
        match self.raft(r.group) {
            None => Ok(not_hosted()),
            Some(AnyRaft::Meta(raft)) => reply(&format::VOTE_REPLY, raft.pre_vote(rpc).await),
            Some(AnyRaft::Partition(raft)) => match self.host.pre_vote_rule(r.group) {
                PreVote::Withhold => Ok(withheld(format!(
                    "group {} is quiescent here and its leader's node answers",
                    r.group
                ))),
                PreVote::Lead => {
                    self.host.wake_group(r.group);
                    Ok(withheld(format!(
                        "group {} is quiescent and led by this node",
                        r.group
                    )))
                }
                PreVote::Answer => {
                    self.host.wake_group(r.group);
                    reply(&format::VOTE_REPLY, raft.pre_vote(rpc).await)
                }
            },
        }
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let rpc: TransferLeaderRequest<TypeConfig> =
            decode(&format::TRANSFER_LEADER, &r.payload).map_err(bad)?;
        match self.raft(r.group) {
            None => Ok(not_hosted()),
            Some(AnyRaft::Meta(raft)) => reply(
                &format::TRANSFER_REPLY,
                raft.handle_transfer_leader(rpc).await,
            ),
            Some(AnyRaft::Partition(raft)) => {
                self.host.wake_group(r.group);
                reply(
                    &format::TRANSFER_REPLY,
                    raft.handle_transfer_leader(rpc).await,
                )
            }
        }
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let group = first.group;
        let vote: Vote = decode(&format::VOTE, &first.vote).map_err(bad)?;
        let meta: SnapshotMeta = decode(&format::SNAPSHOT_META, &first.meta).map_err(bad)?;
        let Some(raft) = self.raft(group) else {
            return Ok(not_hosted());
        };
        let dir = self.host.snapshot_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Status::internal(format!("snapshot dir: {e}")))?;
        let seq = self.spool_seq.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("recv-{group}-{seq}-{}.snap", std::process::id()));
        let spooled = spool(&path, first.data, &mut stream).await;
        if let Err(e) = spooled {
            let _ignored = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        // A stream that ended early (its sender died or failed reading its store) must not
        // reach openraft: installing it would lose messages, and refusing it there is a fatal
        // storage error that stops the group. The leader gets an error and sends again.
        let check = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                check_complete(&path)?;
                if group != META_GROUP {
                    crate::snapshot::check_records(&path)?;
                }
                Ok::<(), crate::RaftStoreError>(())
            })
            .await
        };
        match check {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ignored = tokio::fs::remove_file(&path).await;
                tracing::error!(group, error = %e, "refused a received snapshot");
                return Err(Status::aborted(format!(
                    "snapshot stream for group {group} is refused ({e}); send it again"
                )));
            }
            Err(e) => {
                let _ignored = tokio::fs::remove_file(&path).await;
                return Err(Status::internal(format!(
                    "checking the snapshot failed: {e}"
                )));
            }
        }
        let snapshot = Snapshot {
            meta,
            snapshot: SnapshotData::Received(path.clone()),
        };
        let r = match raft {
            AnyRaft::Meta(raft) => reply(
                &format::SNAPSHOT_REPLY,
                raft.install_full_snapshot(vote, snapshot).await,
            ),
            AnyRaft::Partition(raft) => {
                self.host.wake_group(group);
                reply(
                    &format::SNAPSHOT_REPLY,
                    raft.install_full_snapshot(vote, snapshot).await,
                )
            }
        };
        // Installed snapshots delete their file; a rejected one must not leak it.
        let _ignored = tokio::fs::remove_file(&path).await;
        r
    }

    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            node_id: self.host.node_id(),
            format_level: u32::from(self.host.format_level()),
        }))
    }

    async fn quiesce(
        &self,
        req: Request<QuiesceRequest>,
    ) -> Result<Response<QuiesceResponse>, Status> {
        Ok(Response::new(self.host.quiesce(req.into_inner())))
    }

    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Ok(Response::new(self.host.node_status()))
    }

    async fn join_cluster(
        &self,
        req: Request<JoinClusterRequest>,
    ) -> Result<Response<JoinClusterResponse>, Status> {
        let r = req.into_inner();
        if r.node_id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument(
                "join needs a node id and an address",
            ));
        }
        let meta = self
            .host
            .meta_raft()
            .ok_or_else(|| Status::unavailable("no metadata group on this node"))?;
        Ok(Response::new(join(&meta, r.node_id, &r.addr).await))
    }

    async fn partition_stats(
        &self,
        req: Request<PartitionStatsRequest>,
    ) -> Result<Response<PartitionStatsResponse>, Status> {
        let groups = self.host.partition_stats(&req.into_inner().groups);
        Ok(Response::new(PartitionStatsResponse { groups }))
    }

    async fn scrub_digests(
        &self,
        req: Request<ScrubDigestsRequest>,
    ) -> Result<Response<ScrubDigestsResponse>, Status> {
        let r = req.into_inner();
        let host = self.host.clone();
        let answer =
            tokio::task::spawn_blocking(move || host.scrub_digests(r.group, r.from, r.to, r.span))
                .await
                .map_err(|e| Status::internal(format!("digest task failed: {e}")))?;
        Ok(Response::new(match answer {
            Ok((digests, applied_index)) => ScrubDigestsResponse {
                digests,
                error: String::new(),
                applied_index,
            },
            Err(error) => ScrubDigestsResponse {
                digests: Vec::new(),
                error,
                applied_index: 0,
            },
        }))
    }

    async fn scrub_node(
        &self,
        _req: Request<ScrubNodeRequest>,
    ) -> Result<Response<junction_proto::v1::NodeScrubReport>, Status> {
        Ok(Response::new(self.host.clone().scrub_node().await))
    }

    async fn change_replicas(
        &self,
        req: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let r = req.into_inner();
        if r.group == META_GROUP || r.voters.is_empty() {
            return Err(Status::invalid_argument(
                "a replica change needs a partition group and at least one voter",
            ));
        }
        Ok(Response::new(
            self.host.clone().change_replicas(r.group, r.voters).await,
        ))
    }
}

/// How long a join call waits for the new learner to answer and catch up before it refuses
/// (the joining node asks again; its calls allow 30 s).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(15);
/// A replica that acknowledged the leader within this time counts as live.
const LIVE_WITHIN: Duration = Duration::from_secs(2);

/// The leader's view of the metadata group for [`promotion::decide`]; `None` when this node
/// is not the leader (then the leader's address, when known).
fn promotion_view(meta: &MetaRaft, learner: NodeId) -> Result<PromotionView, String> {
    let m = meta.metrics();
    let m = m.borrow_watched();
    let membership = m.membership_config.membership();
    let (Some(replication), Some(heartbeat)) = (&m.replication, &m.heartbeat) else {
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()))
            .unwrap_or_default();
        return Err(leader_addr);
    };
    let replicas = replication
        .iter()
        .map(|(id, matched)| {
            let acked_ago = heartbeat
                .get(id)
                .and_then(|t| t.as_ref())
                .map(|t| openraft::Instant::elapsed(&**t));
            (
                *id,
                ReplicaView {
                    matched: matched.as_ref().map(|l| l.index),
                    acked_ago,
                },
            )
        })
        .collect();
    Ok(PromotionView {
        leader: m.id,
        voters: membership.voter_ids().collect(),
        learner,
        needed: m.cluster_committed.as_ref().map_or(0, |l| l.index),
        replicas,
        live_within: LIVE_WITHIN,
    })
}

/// Adds `id` to the metadata group: as a learner, then — once it answers, has caught up, and
/// the group keeps a spare failure with it (see [`promotion`]) — as a voter. A node that is
/// not reachable at `addr` stays a learner, which no quorum counts.
async fn join(meta: &MetaRaft, id: NodeId, addr: &str) -> JoinClusterResponse {
    let refused = |leader_addr: String, error: String| JoinClusterResponse {
        joined: false,
        leader_addr,
        error,
    };
    let raft_refused = |e: openraft::errors::RaftError<
        crate::types::TypeConfig,
        openraft::errors::ClientWriteError<crate::types::TypeConfig>,
    >| match e {
        openraft::errors::RaftError::APIError(
            openraft::errors::ClientWriteError::ForwardToLeader(f),
        ) => refused(
            f.leader_node.map(|n| n.addr).unwrap_or_default(),
            "not the metadata leader".into(),
        ),
        other => refused(String::new(), other.to_string()),
    };
    match promotion_view(meta, id) {
        Err(leader_addr) => return refused(leader_addr, "not the metadata leader".into()),
        Ok(view) if decide(&view) == Promotion::AlreadyVoter => {
            return JoinClusterResponse {
                joined: true,
                ..JoinClusterResponse::default()
            };
        }
        Ok(_) => {}
    }
    let known_learner = {
        let m = meta.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&id)
            .is_some_and(|n| n.addr == addr)
    };
    if !known_learner {
        tracing::info!(
            node = id,
            addr,
            "adding a node to the metadata group as a learner"
        );
        if let Err(e) = meta
            .add_learner(id, openraft::BasicNode::new(addr), false)
            .await
        {
            return raft_refused(e);
        }
    }
    let deadline = tokio::time::Instant::now() + CATCH_UP_LIMIT;
    let verdict = loop {
        let verdict = match promotion_view(meta, id) {
            Ok(view) => decide(&view),
            Err(leader_addr) => return refused(leader_addr, "not the metadata leader".into()),
        };
        if !verdict.worth_waiting() || tokio::time::Instant::now() >= deadline {
            break verdict;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match verdict {
        Promotion::AlreadyVoter => JoinClusterResponse {
            joined: true,
            ..JoinClusterResponse::default()
        },
        Promotion::Promote => {
            tracing::info!(node = id, addr, "promoting a caught-up learner to voter");
            match meta
                .change_membership(
                    openraft::ChangeMembers::AddVoterIds(std::collections::BTreeSet::from([id])),
                    false,
                )
                .await
            {
                Ok(_) => JoinClusterResponse {
                    joined: true,
                    ..JoinClusterResponse::default()
                },
                Err(e) => raft_refused(e),
            }
        }
        refusal @ Promotion::Unreachable { .. } => {
            // Nothing answers at that address: take the learner out again, so that a call
            // naming a made-up node leaves no trace in the membership. A real node asks
            // again once it is up.
            tracing::warn!(node = id, addr, reason = %refusal, "removing an unreachable learner");
            if let Err(e) = meta
                .change_membership(
                    openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([id])),
                    false,
                )
                .await
            {
                tracing::warn!(node = id, error = %e, "removing the learner failed");
            }
            refused(String::new(), refusal.to_string())
        }
        refusal => {
            tracing::warn!(node = id, addr, reason = %refusal, "not promoting a learner");
            refused(String::new(), refusal.to_string())
        }
    }
}

async fn spool(
    path: &std::path::Path,
    first: Vec<u8>,
    stream: &mut Streaming<SnapshotChunk>,
) -> Result<(), Status> {
    let io = |e: std::io::Error| Status::internal(format!("spooling snapshot: {e}"));
    let file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&first).await.map_err(io)?;
    while let Some(chunk) = stream.next().await {
        w.write_all(&chunk?.data).await.map_err(io)?;
    }
    w.flush().await.map_err(io)?;
    Ok(())
}

/// The type of a boxed stream, for services that return one.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
