//! Test harness: an in-process cluster of real nodes (real RocksDB, real gRPC on ephemeral
//! loopback ports), with stop/restart of any node, and `wait_until` for conditions.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use junction_broker::Broker;
use junction_client::Client;
use junction_server::{Config, Server, ServerHandle};
use tokio::net::TcpListener;

/// Polls `check` until it returns `Some`, failing the test with `what` after `limit`.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

struct Slot {
    grpc: SocketAddr,
    http: SocketAddr,
    data_dir: PathBuf,
    handle: Option<ServerHandle>,
}

/// A cluster of in-process nodes with ids 1..=n.
pub struct TestCluster {
    _dir: tempfile::TempDir,
    slots: BTreeMap<u64, Slot>,
    members: String,
    tweak: Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl TestCluster {
    /// Starts `n` nodes with default settings.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` nodes, letting `tweak` adjust each node's config.
    pub async fn start_with(n: u64, tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut listeners = BTreeMap::new();
        // Client ports whose peer port (+ the default offset) is free too.
        let ports = junction_testkit::loopback_port_pairs(
            n as usize,
            junction_raft::DEFAULT_PEER_PORT_OFFSET,
        )
        .expect("ports");
        for (id, port) in (1..=n).zip(ports) {
            let g = TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind grpc");
            let h = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
            listeners.insert(id, (g, h));
        }
        let members = listeners
            .iter()
            .map(|(id, (g, _))| format!("{id}={}", g.local_addr().expect("addr")))
            .collect::<Vec<_>>()
            .join(",");
        junction_raft::peer_auth::ClusterSecret::load_or_create(&dir.path().join("cluster-secret"))
            .expect("cluster secret");
        let mut cluster = TestCluster {
            _dir: dir,
            slots: BTreeMap::new(),
            members,
            tweak: Arc::new(tweak),
        };
        let mut starting = Vec::new();
        for (id, (g, h)) in listeners {
            let data_dir = cluster._dir.path().join(format!("node{id}"));
            let slot = Slot {
                grpc: g.local_addr().expect("addr"),
                http: h.local_addr().expect("addr"),
                data_dir: data_dir.clone(),
                handle: None,
            };
            cluster.slots.insert(id, slot);
            let config = cluster.config(id);
            starting.push((id, tokio::spawn(Server::start_with_listeners(config, g, h))));
        }
        for (id, task) in starting {
            let handle = task.await.expect("start task").expect("node starts");
            cluster.slots.get_mut(&id).expect("slot").handle = Some(handle);
        }
        cluster.wait_for_metadata_leader().await;
        cluster
    }

    /// Starts one more node (the next id) whose member list is the old one plus itself: the
    /// running cluster does not know it, so it must join.
    pub async fn add_node(&mut self) -> u64 {
        let id = self.slots.keys().max().copied().unwrap_or(0) + 1;
        let port =
            junction_testkit::loopback_port_pairs(1, junction_raft::DEFAULT_PEER_PORT_OFFSET)
                .expect("ports")[0];
        let g = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind grpc");
        let h = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let slot = Slot {
            grpc: g.local_addr().expect("addr"),
            http: h.local_addr().expect("addr"),
            data_dir: self._dir.path().join(format!("node{id}")),
            handle: None,
        };
        self.members = format!("{},{id}={}", self.members, slot.grpc);
        self.slots.insert(id, slot);
        let handle = Server::start_with_listeners(self.config(id), g, h)
            .await
            .expect("node starts");
        self.slots.get_mut(&id).expect("slot").handle = Some(handle);
        id
    }

    /// The file of the cluster's node-to-node secret (every test cluster has one).
    pub fn secret_file(&self) -> PathBuf {
        self._dir.path().join("cluster-secret")
    }

    /// A connected gRPC channel to node `id`.
    pub async fn channel(&self, id: u64) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(id)))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A connected gRPC channel to node `id`'s peer port.
    pub async fn peer_channel(&self, id: u64) -> tonic::transport::Channel {
        let addr =
            junction_raft::peer_address(&self.addr(id), junction_raft::DEFAULT_PEER_PORT_OFFSET)
                .expect("peer address");
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A `Peer` client of node `id` that carries the cluster secret, as another node would.
    pub async fn peer_client(
        &self,
        id: u64,
    ) -> junction_proto::peer::peer_client::PeerClient<junction_raft::PeerChannel> {
        let secret =
            junction_raft::peer_auth::ClusterSecret::load(&self.secret_file()).expect("secret");
        junction_proto::peer::peer_client::PeerClient::with_interceptor(
            self.peer_channel(id).await,
            junction_raft::peer_auth::AttachSecret(Some(secret), None),
        )
    }

    fn config(&self, id: u64) -> Config {
        let slot = &self.slots[&id];
        let mut c = Config {
            node_id: id,
            listen: slot.grpc.to_string(),
            http: slot.http.to_string(),
            data_dir: slot.data_dir.clone(),
            members: self.members.clone(),
            cluster_secret_file: Some(self.secret_file()),
            ..Config::default()
        };
        (self.tweak)(&mut c);
        c
    }

    /// Returns the gRPC addresses of all nodes.
    pub fn addrs(&self) -> Vec<String> {
        self.slots.values().map(|s| s.grpc.to_string()).collect()
    }

    /// Returns the gRPC address of node `id`.
    pub fn addr(&self, id: u64) -> String {
        self.slots[&id].grpc.to_string()
    }

    /// Returns the HTTP address of node `id`.
    pub fn http_addr(&self, id: u64) -> SocketAddr {
        self.slots[&id].http
    }

    /// Returns a client that knows every node.
    pub fn client(&self) -> Client {
        Client::connect(self.addrs()).expect("client")
    }

    /// Returns a client that only knows node `id`.
    pub fn client_of(&self, id: u64) -> Client {
        Client::connect([self.addr(id)]).expect("client")
    }

    /// Returns the broker of a running node.
    pub fn broker(&self, id: u64) -> Arc<Broker> {
        self.slots[&id]
            .handle
            .as_ref()
            .expect("node is running")
            .broker
            .clone()
    }

    /// Returns the ids of running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.slots
            .iter()
            .filter(|(_, s)| s.handle.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Waits until every running node agrees on one metadata leader; returns it.
    pub async fn wait_for_metadata_leader(&self) -> u64 {
        wait_until(
            Duration::from_secs(20),
            "a metadata leader every node agrees on",
            || async {
                let leaders: Vec<Option<u64>> = self
                    .running()
                    .into_iter()
                    .map(|id| self.broker(id).meta_leader().0)
                    .collect();
                match leaders.first() {
                    Some(Some(l))
                        if leaders.iter().all(|x| *x == Some(*l)) && self.running().contains(l) =>
                    {
                        Some(*l)
                    }
                    _ => None,
                }
            },
        )
        .await
    }

    /// Returns the node leading partition `group`, as its own replica reports.
    pub fn partition_leader(&self, group: u64) -> Option<u64> {
        self.running().into_iter().find(|id| {
            self.broker(*id)
                .partition(group)
                .is_some_and(|r| r.leader() == Some(*id))
        })
    }

    /// Returns a replica of partition `group` (listed in `replicas`) that does not lead it.
    pub fn partition_follower(&self, group: u64, replicas: &[u64]) -> Option<u64> {
        let leader = self.partition_leader(group)?;
        replicas.iter().copied().find(|r| *r != leader)
    }

    /// Stops node `id` (its data stays).
    pub async fn stop(&mut self, id: u64) {
        let handle = self
            .slots
            .get_mut(&id)
            .and_then(|s| s.handle.take())
            .expect("node is running");
        handle.shutdown().await;
    }

    /// Waits until every running node knows the same cluster id, and returns it.
    pub async fn cluster_id(&self) -> String {
        wait_until(
            Duration::from_secs(20),
            "every node to know the cluster id",
            || async {
                let ids: Vec<Option<String>> = self
                    .running()
                    .into_iter()
                    .map(|n| self.broker(n).identity().get())
                    .collect();
                let first = ids.first()?.clone()?;
                ids.iter()
                    .all(|i| i.as_deref() == Some(&first))
                    .then_some(first)
            },
        )
        .await
    }

    /// Opens the store of stopped node `id` (its last handle may hold RocksDB's lock for a
    /// moment after the stop).
    pub async fn open_store(&self, id: u64) -> junction_storage::Store {
        let db = self.data_dir(id).join("db");
        wait_until(
            Duration::from_secs(10),
            &format!("node {id}'s store to be free"),
            || async {
                let store = junction_storage::Store::open(&db).ok()?;
                // Its messages may point into the partition logs: let reads resolve them.
                junction_raft::pointers::install(&store);
                Some(store)
            },
        )
        .await
    }

    /// The data directory of node `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.slots[&id].data_dir.clone()
    }

    /// Starts a stopped node once on its ports and data, returning the start's outcome (a
    /// node that starts is kept running).
    pub async fn try_restart(&mut self, id: u64) -> Result<(), junction_server::ServerError> {
        let (grpc, http) = (self.slots[&id].grpc, self.slots[&id].http);
        let g = TcpListener::bind(grpc).await.expect("bind grpc");
        let h = TcpListener::bind(http).await.expect("bind http");
        let handle = Server::start_with_listeners(self.config(id), g, h).await?;
        self.slots.get_mut(&id).expect("slot").handle = Some(handle);
        Ok(())
    }

    /// Restarts a stopped node on the same ports and data.
    pub async fn restart(&mut self, id: u64) {
        let (grpc, http) = (self.slots[&id].grpc, self.slots[&id].http);
        let handle = wait_until(Duration::from_secs(20), "the node to restart", || async {
            let g = TcpListener::bind(grpc).await.ok()?;
            let h = TcpListener::bind(http).await.ok()?;
            // The previous incarnation's RocksDB lock is released once its last handle drops.
            match Server::start_with_listeners(self.config(id), g, h).await {
                Ok(handle) => Some(handle),
                Err(e) => {
                    eprintln!("node {id} did not start yet: {e}");
                    None
                }
            }
        })
        .await;
        self.slots.get_mut(&id).expect("slot").handle = Some(handle);
    }

    /// Waits until node `id` has purged its log of `group` up to at least `index` (so a
    /// follower that missed those entries must catch up by snapshot); returns the index.
    pub async fn wait_log_purged(&self, id: u64, group: u64, index: u64) -> u64 {
        use openraft::async_runtime::watch::WatchReceiver;
        wait_until(
            Duration::from_secs(20),
            "the leader to purge its log",
            || async {
                let replica = self.broker(id).partition(group)?;
                let purged = replica
                    .raft
                    .metrics()
                    .borrow_watched()
                    .purged
                    .map(|l| l.index);
                purged.filter(|p| *p >= index)
            },
        )
        .await
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for id in self.running() {
            self.stop(id).await;
        }
    }
}

/// Reads a whole partition through `client` from offset 0 to its high watermark.
pub async fn read_all(
    client: &Client,
    station: &str,
    partition: u32,
) -> Vec<junction_proto::v1::StoredMessage> {
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let r = client
            .read(
                station,
                partition,
                junction_client::Start::Offset(next),
                1000,
            )
            .await
            .expect("read");
        if r.messages.is_empty() {
            assert_eq!(
                r.next_offset, r.high_watermark,
                "an empty read must be at the end"
            );
            return out;
        }
        next = r.next_offset;
        out.extend(r.messages);
    }
}

/// Reads every message a node holds locally for `group` (no forwarding, no leader check).
pub async fn local_contents(broker: &Broker, group: u64) -> Vec<(u64, bytes::Bytes)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let (batch, _) = broker
            .read(group, from, 10_000, 64 << 20)
            .await
            .expect("local read");
        match batch.last() {
            None => return out,
            Some((last, _)) => from = last + 1,
        }
        out.extend(batch);
    }
}

/// Builds a keyed message.
pub fn keyed(key: &str, payload: impl Into<Vec<u8>>) -> junction_proto::v1::Message {
    junction_proto::v1::Message {
        key: Some(key.as_bytes().to_vec()),
        headers: vec![],
        payload: payload.into().into(),
        partition: None,
        msg_id: None,
    }
}
