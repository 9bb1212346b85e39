//! Real processes: three `junction serve` processes, `kill -9` mid-produce, restart, then
//! `kill -9` all three and restart: nothing acknowledged is gone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use junction_proto::peer::NodeStatusRequest;
use junction_proto::peer::peer_client::PeerClient;

use crate::failover::{check_history, spawn_producers};
use crate::harness::{read_all, wait_until};

/// Three node processes; every child is killed when this is dropped.
pub(crate) struct ProcessCluster {
    dir: tempfile::TempDir,
    pub(crate) grpc: BTreeMap<u64, String>,
    pub(crate) http: BTreeMap<u64, String>,
    children: BTreeMap<u64, Child>,
    /// More `junction serve` arguments, given to every node.
    pub(crate) extra_args: Vec<String>,
    /// Environment variables of every node.
    pub(crate) envs: Vec<(String, String)>,
}

/// A port for a child node: outside the ephemeral range, so no outgoing connection of a test
/// running alongside can take it before the child binds it.
fn free_port() -> u16 {
    junction_testkit::loopback_port().expect("free port")
}

impl ProcessCluster {
    pub(crate) fn new(n: u64) -> Self {
        // Client ports whose peer port (+ the default offset) is free too.
        let ports = junction_testkit::loopback_port_pairs(
            n as usize,
            junction_raft::DEFAULT_PEER_PORT_OFFSET,
        )
        .expect("free ports");
        let grpc: BTreeMap<u64, String> = (1..=n)
            .zip(ports)
            .map(|(id, port)| (id, format!("127.0.0.1:{port}")))
            .collect();
        let http = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            grpc,
            http,
            children: BTreeMap::new(),
            extra_args: Vec::new(),
            envs: Vec::new(),
        }
    }

    fn members(&self) -> String {
        self.grpc
            .iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id`'s peer service.
    fn peer_addr(&self, id: u64) -> String {
        junction_raft::peer_address(&self.grpc[&id], junction_raft::DEFAULT_PEER_PORT_OFFSET)
            .expect("peer address")
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    pub(crate) fn start(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{id}.log")))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_junction"))
            .args([
                "serve",
                "--id",
                &id.to_string(),
                "--listen",
                &self.grpc[&id],
                "--http",
                &self.http[&id],
            ])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--members", &self.members()])
            .args(&self.extra_args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn junction serve");
        self.children.insert(id, child);
    }

    pub(crate) fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub(crate) fn client(&self) -> junction_client::Client {
        junction_client::Client::connect(self.grpc.values().cloned()).expect("client")
    }

    pub(crate) async fn wait_ready(&self) {
        let client = self.client();
        let n = self.grpc.len();
        wait_until(
            Duration::from_secs(60),
            "all nodes alive with a metadata leader",
            || async {
                let s = client.cluster_status().await.ok()?;
                (s.metadata_leader.is_some() && s.nodes.iter().filter(|x| x.alive).count() == n)
                    .then_some(())
            },
        )
        .await;
    }

    /// Node `id`'s status of its groups, as its peer service answers it.
    pub(crate) async fn node_status(
        &self,
        id: u64,
    ) -> Option<junction_proto::peer::NodeStatusResponse> {
        let mut c = PeerClient::connect(format!("http://{}", self.peer_addr(id)))
            .await
            .ok()?;
        Some(c.node_status(NodeStatusRequest {}).await.ok()?.into_inner())
    }

    /// Returns the leader of `group` as node `id` sees it.
    pub(crate) async fn leader_seen_by(&self, id: u64, group: u64) -> Option<u64> {
        let status = self.node_status(id).await?;
        status
            .groups
            .into_iter()
            .find(|g| g.group == group)
            .and_then(|g| g.leader)
    }

    /// Returns (group → next offset) as node `id` itself has applied it.
    async fn local_offsets(&self, id: u64) -> Option<BTreeMap<u64, u64>> {
        let status = self.node_status(id).await?;
        Some(
            status
                .groups
                .into_iter()
                .filter(|g| g.group != 0)
                .map(|g| (g.group, g.next_offset))
                .collect(),
        )
    }

    fn dump_logs(&self) {
        for id in self.grpc.keys() {
            let p = self.dir.path().join(format!("node{id}.log"));
            if let Ok(text) = std::fs::read_to_string(&p) {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!(
                    "--- {} (last lines)\n{}",
                    display(&p),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for (_, mut c) in std::mem::take(&mut self.children) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_minus_nine_loses_nothing_acknowledged() {
    let mut cluster = ProcessCluster::new(3);
    for id in [3, 1, 2] {
        cluster.start(id); // any start order works
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_station("crash", 2, 3).await.expect("create");

    let (acked, stop, handles) = spawn_producers(client.clone(), "crash", 3);
    wait_until(Duration::from_secs(30), "acknowledged writes", || async {
        (acked.lock().len() >= 150).then_some(())
    })
    .await;
    cluster.kill9(2);
    let after_kill = acked.lock().len();
    wait_until(
        Duration::from_secs(30),
        "progress with a node down",
        || async { (acked.lock().len() >= after_kill + 150).then_some(()) },
    )
    .await;
    cluster.start(2);
    wait_until(
        Duration::from_secs(10),
        "more writes after the restart",
        || async { (acked.lock().len() >= after_kill + 300).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.expect("producer");
    }

    // The restarted node catches up with the others.
    let reference = cluster.local_offsets(1).await.expect("node 1 status");
    assert_eq!(reference.len(), 2);
    wait_until(Duration::from_secs(30), "node 2 to catch up", || async {
        let mine = cluster.local_offsets(2).await?;
        let theirs = cluster.local_offsets(1).await?;
        (mine == theirs && theirs == cluster.local_offsets(3).await?).then_some(())
    })
    .await;

    // kill -9 everything, restart, and every acknowledged message is still there.
    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in 1..=3 {
        cluster.start(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    let mut stored = BTreeMap::new();
    for p in 0..2 {
        stored.insert(p, read_all(&client, "crash", p).await);
    }
    let acked = acked.lock().clone();
    assert!(acked.len() >= 450);
    check_history(&acked, &stored);
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

/// A produce forwarded to a partition leader that stops answering (SIGSTOP keeps its TCP
/// connections open, so nothing fails fast) must not hang: it fails with UNAVAILABLE (outcome
/// unknown) once the forwarding deadline passes, on both the unary and the streaming path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_produce_to_a_paused_leader_fails_within_its_deadline() {
    use junction_proto::v1::ProduceRequest;
    use junction_proto::v1::broker_client::BrokerClient;
    use junction_server::forward::FORWARD_TIMEOUT;

    let mut cluster = ProcessCluster::new(3);
    for id in 1..=3 {
        cluster.start(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    client.create_station("paused", 1, 3).await.expect("create");
    let leader = wait_until(Duration::from_secs(30), "a partition leader", || async {
        let mut c = PeerClient::connect(format!("http://{}", cluster.peer_addr(1)))
            .await
            .ok()?;
        let status = c.node_status(NodeStatusRequest {}).await.ok()?.into_inner();
        status
            .groups
            .iter()
            .find(|g| g.group != 0)
            .and_then(|g| g.leader)
    })
    .await;
    let other = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut broker = BrokerClient::connect(format!("http://{}", cluster.grpc[&other]))
        .await
        .expect("connect");
    let request = |id| ProduceRequest {
        station: "paused".into(),
        messages: vec![crate::harness::keyed("k", "v")],
        request_id: id,
        producer: None,
    };
    // Warm the forwarding path so the follower's channel to the leader is connected.
    wait_until(Duration::from_secs(30), "a forwarded produce", || {
        let mut b = broker.clone();
        async move { b.produce(request(0)).await.ok() }
    })
    .await;

    signal(&cluster.children[&leader], "-STOP");
    // Sent at once, before the others time the leader out: both go to the paused leader.
    let started = std::time::Instant::now();
    let mut streaming = broker.clone();
    let unary = broker.produce(request(1));
    let stream = async move {
        let input = futures::stream::iter([request(2)]);
        let mut replies = streaming.produce_stream(input).await?.into_inner();
        replies
            .message()
            .await?
            .ok_or_else(|| tonic::Status::internal("the stream ended without a reply"))
    };
    let limit = FORWARD_TIMEOUT + Duration::from_secs(4);
    let (unary, stream) = tokio::time::timeout(limit, futures::future::join(unary, stream))
        .await
        .expect("forwarded produces to a paused leader hung past their deadline");
    let elapsed = started.elapsed();
    signal(&cluster.children[&leader], "-CONT");

    let status = unary.expect_err("a paused leader cannot acknowledge");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let reply = stream.expect("the stream itself stays up");
    let error = reply.error.expect("the batch failed");
    assert_eq!(error.code, tonic::Code::Unavailable as i32, "{error:?}");
    eprintln!("forwarded produces to the paused leader failed after {elapsed:?}");
}
