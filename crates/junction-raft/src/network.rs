//! `RaftNetworkV2` over the `Peer` gRPC service. Every group on a node shares one HTTP/2
//! channel per peer (tonic multiplexes the calls); each request names its group.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use junction_proto::peer::peer_client::PeerClient;
use junction_proto::peer::{RaftReply, RaftRequest, SnapshotChunk};
use junction_types::GroupId;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{RaftNetworkFactory, RaftNetworkV2};
use parking_lot::Mutex;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::format::{self, Format, decode, encode};
use crate::peer_auth::{AttachSecret, ClusterIdentity, ClusterSecret};
use crate::snapshot::SnapshotData;
use crate::types::{Node, Snapshot, TypeConfig, Vote};

type RpcErr = RPCError<TypeConfig>;

/// Least time a request-response RPC to a peer is given.
///
/// openraft hands AppendEntries the heartbeat period (150 ms) as its deadline and votes the
/// minimum election timeout. Used as is, a link with more than ~75 ms of one-way latency makes
/// every AppendEntries time out before its reply arrives, and the group stops committing even
/// though every node is up. Heartbeats stay snappy regardless: openraft's heartbeat worker puts
/// its own heartbeat-period timeout around the call, and elections run on their own timer, so
/// a longer deadline here only lets a slow reply still count instead of being thrown away.
pub const MIN_RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Least time a whole snapshot stream is given (openraft passes `install_snapshot_timeout`).
pub const MIN_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns the deadline of one request-response RPC.
fn rpc_deadline(option: &RPCOption) -> Duration {
    option.hard_ttl().max(MIN_RPC_TIMEOUT)
}

/// Lazily connected gRPC clients to peers, keyed by address. Reconnects by itself.
#[derive(Debug, Default)]
pub struct PeerPool {
    clients: Mutex<HashMap<String, PeerClient<PeerChannel>>>,
    dial: DialOverrides,
    secret: Option<ClusterSecret>,
    identity: ClusterIdentity,
    port_offset: u16,
    tls: Option<junction_tls::ClientTls>,
}

/// The peer port of every node is its advertised client port plus this, unless configured
/// otherwise (`--peer-port-offset`; the same on every node of a cluster).
pub const DEFAULT_PEER_PORT_OFFSET: u16 = 100;

/// Why a peer cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot derive the peer address of '{addr}': {reason}")]
    Address { addr: String, reason: &'static str },
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// The address of a node's `Peer` service: its advertised client address (`host:port`) with
/// the port moved up by `offset` (0: the same address, the peer service on the client port).
pub fn peer_address(addr: &str, offset: u16) -> Result<String, DialError> {
    if offset == 0 {
        return Ok(addr.to_owned());
    }
    let bad = |reason| DialError::Address {
        addr: addr.to_owned(),
        reason,
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    let peer = port
        .checked_add(offset)
        .ok_or_else(|| bad("the port plus the peer port offset is above 65535"))?;
    Ok(format!("{host}:{peer}"))
}

/// The channel of peer clients: every call carries the cluster secret, if there is one.
pub type PeerChannel = InterceptedService<Channel, AttachSecret>;

/// Advertised address → address actually dialled. Empty in production; the chaos suite uses
/// it to send each node-to-node link through its own fault-injecting proxy.
pub type DialOverrides = Arc<HashMap<String, String>>;

impl PeerPool {
    /// Returns a pool that dials `dial[addr]` instead of `addr` where given.
    pub fn with_overrides(dial: DialOverrides) -> Self {
        Self::new(dial, None, ClusterIdentity::default(), 0, None)
    }

    /// Returns a pool that dials `dial[addr]` instead of `addr` where given, and sends
    /// `secret` and this node's cluster id (once known) with every call. A peer's `Peer`
    /// service is dialled at its advertised address with the port moved up by `port_offset`
    /// (see [`peer_address`]); over TLS when `tls` is given (presenting the node's
    /// certificate, which the peer port requires).
    pub fn new(
        dial: DialOverrides,
        secret: Option<ClusterSecret>,
        identity: ClusterIdentity,
        port_offset: u16,
        tls: Option<junction_tls::ClientTls>,
    ) -> Self {
        Self {
            clients: Mutex::default(),
            dial,
            secret,
            identity,
            port_offset,
            tls,
        }
    }

    /// Returns the address to dial for a peer address (an override, or itself).
    pub fn dial_addr<'a>(&'a self, addr: &'a str) -> &'a str {
        self.dial.get(addr).map_or(addr, String::as_str)
    }

    /// Returns a client of the `Peer` service of the node advertised at `addr` (`host:port`,
    /// its client address).
    pub fn client(&self, addr: &str) -> Result<PeerClient<PeerChannel>, DialError> {
        let mut map = self.clients.lock();
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let peer = peer_address(addr, self.port_offset)?;
        let ep = Endpoint::from_shared(format!("http://{}", self.dial_addr(&peer)))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .initial_stream_window_size(junction_proto::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(junction_proto::HTTP2_CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let client = PeerClient::with_interceptor(
            junction_tls::channel(ep, self.tls.as_ref()),
            AttachSecret(self.secret.clone(), Some(self.identity.clone())),
        )
        .max_decoding_message_size(512 << 20)
        .max_encoding_message_size(512 << 20);
        map.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}

/// Creates the per-peer connections of one group.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    pool: Arc<PeerPool>,
}

impl NetworkFactory {
    /// Returns the factory for `group`.
    pub fn new(group: GroupId, pool: Arc<PeerPool>) -> Self {
        Self { group, pool }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &Node) -> PeerConnection {
        PeerConnection {
            group: self.group,
            target,
            client: self.pool.client(&node.addr).map_err(|e| e.to_string()),
        }
    }
}

/// One group's connection to one peer.
pub struct PeerConnection {
    group: GroupId,
    target: u64,
    client: Result<PeerClient<PeerChannel>, String>,
}

fn unreachable(msg: impl ToString) -> RpcErr {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

fn network(msg: impl ToString) -> RpcErr {
    RPCError::Network(NetworkError::from_string(msg))
}

/// Turns a gRPC outcome into the reply payload, classifying failures the way openraft's
/// backoff expects: a peer that is down or does not host the group yet is "unreachable".
fn payload_of(
    target: u64,
    r: Result<Result<tonic::Response<RaftReply>, tonic::Status>, tokio::time::error::Elapsed>,
) -> Result<Vec<u8>, RpcErr> {
    match r {
        Err(_) => Err(network(format!("request to node {target} timed out"))),
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            Err(unreachable(format!("node {target}: {}", status.message())))
        }
        Ok(Err(status)) => Err(network(format!("node {target}: {status}"))),
        Ok(Ok(resp)) => {
            let reply = resp.into_inner();
            if reply.not_hosted {
                Err(unreachable(format!(
                    "node {target} does not host the group yet"
                )))
            } else if !reply.error.is_empty() {
                Err(network(format!("node {target}: {}", reply.error)))
            } else {
                Ok(reply.payload)
            }
        }
    }
}

impl PeerConnection {
    fn client(&self) -> Result<PeerClient<PeerChannel>, RpcErr> {
        self.client.clone().map_err(unreachable)
    }

    fn request<T: serde::Serialize>(&self, format: &Format, v: &T) -> Result<RaftRequest, RpcErr> {
        Ok(RaftRequest {
            group: self.group,
            payload: encode(format, v).map_err(network)?,
        })
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcErr> {
        let req = self.request(&format::APPEND_ENTRIES, &rpc)?;
        let mut c = self.client()?;
        let call = tokio::time::timeout(rpc_deadline(&option), c.append_entries(req));
        let r = if rpc.entries.is_empty() {
            call.await
        } else {
            // Exported only by a node that traces; the call carries it to the follower,
            // whose span of the call becomes its child.
            let span = tracing::info_span!(
                target: crate::TRACE_TARGET,
                "replicate",
                group = self.group,
                target_node = self.target,
                entries = rpc.entries.len(),
            );
            tracing::Instrument::instrument(call, span).await
        };
        let payload = payload_of(self.target, r)?;
        decode(&format::APPEND_REPLY, &payload).map_err(network)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        let req = self.request(&format::VOTE_REQUEST, &rpc)?;
        let mut c = self.client()?;
        let r = tokio::time::timeout(rpc_deadline(&option), c.vote(req)).await;
        let payload = payload_of(self.target, r)?;
        decode(&format::VOTE_REPLY, &payload).map_err(network)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        let req = self.request(&format::VOTE_REQUEST, &rpc)?;
        let mut c = self.client()?;
        let r = tokio::time::timeout(rpc_deadline(&option), c.pre_vote(req)).await;
        let payload = payload_of(self.target, r)?;
        decode(&format::VOTE_REPLY, &payload).map_err(network)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RpcErr> {
        let req = self.request(&format::TRANSFER_LEADER, &req)?;
        let mut c = self.client()?;
        let r = tokio::time::timeout(rpc_deadline(&option), c.transfer_leader(req)).await;
        let payload = payload_of(self.target, r)?;
        decode(&format::TRANSFER_REPLY, &payload).map_err(network)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let net = |m: String| StreamingError::Network(NetworkError::from_string(m));
        let SnapshotData::Local(local) = snapshot.snapshot else {
            return Err(net("only a local snapshot can be sent".into()));
        };
        let header = SnapshotChunk {
            group: self.group,
            vote: encode(&format::VOTE, &vote).map_err(|e| net(e.to_string()))?,
            meta: encode(&format::SNAPSHOT_META, &snapshot.meta).map_err(|e| net(e.to_string()))?,
            data: Vec::new(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let dumper = tokio::task::spawn_blocking(move || local.dump(1 << 20, &tx));
        let group = self.group;
        let chunks = futures::stream::once(async move { header }).chain(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(move |data| SnapshotChunk {
                group,
                data,
                ..Default::default()
            }),
        );
        let mut c = self
            .client
            .clone()
            .map_err(|e| StreamingError::Unreachable(Unreachable::from_string(e)))?;
        let target = self.target;
        let deadline = option.hard_ttl().max(MIN_SNAPSHOT_TIMEOUT);
        let send = tokio::time::timeout(deadline, c.install_snapshot(chunks));
        let r = tokio::select! {
            r = send => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match dumper.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(net(format!("reading the snapshot failed: {e}"))),
            Err(e) => return Err(net(format!("snapshot reader panicked: {e}"))),
        }
        let payload = payload_of(target, r).map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => net(other.to_string()),
        })?;
        decode(&format::SNAPSHOT_REPLY, &payload).map_err(|e| net(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_move_the_port_up_by_the_offset() -> Result<(), DialError> {
        assert_eq!(peer_address("10.0.0.1:7701", 100)?, "10.0.0.1:7801");
        assert_eq!(
            peer_address("junction-0.junction:7701", 100)?,
            "junction-0.junction:7801"
        );
        assert_eq!(peer_address("[::1]:7701", 100)?, "[::1]:7801");
        assert_eq!(peer_address("10.0.0.1:7701", 0)?, "10.0.0.1:7701");
        for bad in ["10.0.0.1", ":7701", "10.0.0.1:x", "10.0.0.1:65500"] {
            assert!(
                matches!(peer_address(bad, 100), Err(DialError::Address { .. })),
                "{bad} was accepted"
            );
        }
        Ok(())
    }

    #[test]
    fn rpc_deadlines_have_a_floor_above_the_heartbeat_period() {
        // openraft passes the heartbeat period (150 ms) for AppendEntries: a 100 ms link
        // would time every call out. The floor keeps replication working.
        assert_eq!(
            rpc_deadline(&RPCOption::new(Duration::from_millis(150))),
            MIN_RPC_TIMEOUT
        );
        // Longer deadlines (a configured snapshot timeout) are kept.
        assert_eq!(
            rpc_deadline(&RPCOption::new(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
    }
}
