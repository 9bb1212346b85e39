//! Forwarding calls to the node that can answer them, with a hop limit so that two nodes
//! with stale views can never bounce a request forever.

use std::collections::HashMap;
use std::time::Duration;

use junction_proto::v1::admin_client::AdminClient;
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::groups_client::GroupsClient;
use junction_raft::peer_auth::AttachSecret;
use parking_lot::Mutex;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// gRPC metadata key counting how many times a request was forwarded.
pub const HOPS_HEADER: &str = "x-junction-hops";
/// Forwarding stops after this many hops (client → any node → replica → leader).
pub const MAX_HOPS: u32 = 2;

/// How long a forwarded produce waits for the leader's reply. A leader that is paused
/// (SIGSTOP) or cut off keeps the TCP connection open and never answers; past this deadline
/// the call fails with UNAVAILABLE (outcome unknown) instead of hanging, so clients retry
/// and the server does not pile up stuck calls.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns the error of a forwarded call that got no reply within [`FORWARD_TIMEOUT`].
pub fn forward_timed_out(addr: &str) -> Status {
    Status::unavailable(format!(
        "the partition leader at {addr} did not answer within {} s; outcome unknown",
        FORWARD_TIMEOUT.as_secs()
    ))
}

/// Returns the hop count of a request.
pub fn hops_of<T>(req: &tonic::Request<T>) -> u32 {
    req.metadata()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Wraps `msg` in a request marked with `hops`.
pub fn with_hops<T>(msg: T, hops: u32) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = hops.to_string().parse() {
        r.metadata_mut().insert(HOPS_HEADER, v);
    }
    r
}

/// Reply metadata naming the metadata log index a controller's answer reflects.
pub const META_INDEX_HEADER: &str = "x-junction-meta-index";

/// How long a node that forwarded a metadata change waits to apply it itself before it
/// answers. Past it the node answers anyway (the change is made; only this node's view lags).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Wraps a controller's reply, stamped with the metadata index it reflects.
pub fn stamped<T>(broker: &junction_broker::Broker, msg: T) -> tonic::Response<T> {
    let mut r = tonic::Response::new(msg);
    if let Ok(v) = broker.meta_applied_index().to_string().parse() {
        r.metadata_mut().insert(META_INDEX_HEADER, v);
    }
    r
}

/// Finishes a metadata call forwarded to the controller: a failure is mapped by
/// [`forwarded`]; a success is returned once this node has applied the change too, so a
/// client that reads through this node next sees its own write.
pub async fn settled<T>(
    broker: &junction_broker::Broker,
    reply: Result<tonic::Response<T>, Status>,
) -> Result<tonic::Response<T>, Status> {
    let reply = reply.map_err(forwarded)?;
    let index = reply
        .metadata()
        .get(META_INDEX_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(index) = index
        && !broker.wait_meta_applied(index, SETTLE_LIMIT).await
    {
        tracing::warn!(
            index,
            applied = broker.meta_applied_index(),
            "a forwarded metadata change is not applied here yet; answering anyway"
        );
    }
    Ok(reply)
}

/// Lazily connected channels to other nodes' public API. Every call made through the pool
/// carries the cluster secret: the node that took the call has authorized it, and the node it
/// is forwarded to trusts that (see `crate::auth`).
#[derive(Default)]
pub struct ClientPool {
    channels: Mutex<HashMap<String, Channel>>,
    dial: junction_raft::DialOverrides,
    node: AttachSecret,
    tls: Option<junction_tls::ClientTls>,
}

/// A channel whose calls carry the node credential.
pub type NodeChannel = InterceptedService<Channel, AttachSecret>;

/// Maps the failure of a forwarded call: a broken connection to the other node means the
/// outcome is unknown, which clients must treat as retryable (UNAVAILABLE).
pub fn forwarded(s: Status) -> Status {
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
            Status::unavailable(format!(
                "forwarded call failed, outcome unknown: {}",
                s.message()
            ))
        }
        _ => s,
    }
}

impl ClientPool {
    /// A request this node makes of its own services in process (dead letters, resends),
    /// carrying the node credential as a forwarded call does: it is authorized already.
    pub fn node_request<T>(&self, message: T) -> Request<T> {
        let mut stamp = self.node.clone();
        match tonic::service::Interceptor::call(&mut stamp, Request::new(())) {
            Ok(r) => {
                let (metadata, extensions, ()) = r.into_parts();
                Request::from_parts(metadata, extensions, message)
            }
            Err(_) => Request::new(message),
        }
    }

    /// Returns a pool that dials `dial[addr]` instead of `addr` where given.
    /// Calls go over TLS when `tls` is given.
    pub fn with_overrides(
        dial: junction_raft::DialOverrides,
        node: AttachSecret,
        tls: Option<junction_tls::ClientTls>,
    ) -> Self {
        Self {
            channels: Mutex::default(),
            dial,
            node,
            tls,
        }
    }

    fn channel(&self, addr: &str) -> Result<NodeChannel, Status> {
        let channel = self.raw_channel(addr)?;
        Ok(InterceptedService::new(channel, self.node.clone()))
    }

    fn raw_channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut map = self.channels.lock();
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let target = self.dial.get(addr).map_or(addr, String::as_str);
        let ep = Endpoint::from_shared(format!("http://{target}"))
            .map_err(|e| Status::internal(format!("bad node address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .initial_stream_window_size(junction_proto::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(junction_proto::HTTP2_CONNECTION_WINDOW)
            // A peer that stops answering (paused, cut off) is noticed and the connection
            // dropped, which ends the forward streams riding on it.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let ch = junction_tls::channel(ep, self.tls.as_ref());
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Returns a Broker client for `addr`.
    pub fn broker(&self, addr: &str) -> Result<BrokerClient<NodeChannel>, Status> {
        Ok(BrokerClient::new(self.channel(addr)?)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20))
    }

    /// Returns a Groups client for `addr`.
    pub fn groups(&self, addr: &str) -> Result<GroupsClient<NodeChannel>, Status> {
        Ok(GroupsClient::new(self.channel(addr)?)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20))
    }

    /// Returns an Admin client for `addr`.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<NodeChannel>, Status> {
        Ok(AdminClient::new(self.channel(addr)?))
    }

    /// Returns a Schemas client for `addr`.
    pub fn schemas(
        &self,
        addr: &str,
    ) -> Result<junction_proto::v1::schemas_client::SchemasClient<NodeChannel>, Status> {
        Ok(junction_proto::v1::schemas_client::SchemasClient::new(
            self.channel(addr)?,
        ))
    }
}

/// Where a metadata change runs: `None` when this node is the controller, otherwise the
/// controller's address (or the not-leader status when it is unknown or the call has been
/// forwarded too often).
pub fn controller_addr(
    broker: &junction_broker::Broker,
    hops: u32,
) -> Result<Option<String>, Status> {
    match broker.ensure_controller() {
        Ok(()) => Ok(None),
        Err(junction_broker::BrokerError::NotLeader {
            leader: Some((_, addr)),
            ..
        }) if hops < MAX_HOPS => Ok(Some(addr)),
        Err(e) => Err(crate::status::to_status(e)),
    }
}
