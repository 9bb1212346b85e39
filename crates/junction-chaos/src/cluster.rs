//! The cluster under test: `junction serve` child processes on loopback, one fault-injecting
//! proxy per directed node-to-node link, and (when the machine allows mounting) a small tmpfs
//! per node so that its data disk can be filled.
//!
//! Every child is killed when the [`Cluster`] is dropped (and, through `PR_SET_PDEATHSIG`, when
//! this process dies); the temp dir goes with it unless kept.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use junction_proto::peer::peer_client::PeerClient;
use junction_proto::peer::{NodeStatusRequest, NodeStatusResponse};
use junction_raft::PeerChannel;
use junction_raft::peer_auth::{AttachSecret, ClusterSecret};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::disk::{copy_dir, mount_tmpfs, unmount, used_bytes};
use crate::proxy::{LinkMode, LinkStats, Proxy};
use crate::schedule::derive_seed;

/// Why the cluster could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("TLS for the run: {0}")]
    Tls(junction_tls::TlsError),
    #[error("cannot create the cluster's temp dir: {0}")]
    TempDir(std::io::Error),
    #[error("cannot reserve a loopback port: {0}")]
    Port(#[from] junction_testkit::PortError),
    #[error("cannot start the proxy for link {from}->{to}: {source}")]
    Proxy {
        from: u64,
        to: u64,
        source: std::io::Error,
    },
    #[error("cannot start node {id} ({bin}): {source}")]
    Spawn {
        id: u64,
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy the junction binary {bin}: {source}")]
    CopyBinary {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the log file of node {id}: {source}")]
    Log { id: u64, source: std::io::Error },
    #[error("no such node {0}")]
    NoSuchNode(u64),
    #[error("disk faults are unavailable: {0}")]
    NoDiskFaults(String),
    #[error("disk fault on node {id} failed: {reason}")]
    Disk { id: u64, reason: String },
    #[error("cannot make the cluster secret: {0}")]
    Secret(String),
    #[error("no admin token in {path} (the nodes make it on their first start): {reason}")]
    AdminToken { path: PathBuf, reason: String },
}

/// How to build the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: u64,
    pub bin: PathBuf,
    pub seed: u64,
    /// Extra `junction serve` flags given to every node.
    pub extra_args: Vec<String>,
    /// Try to put each node's data on its own tmpfs (needs CAP_SYS_ADMIN), for disk faults.
    pub disk_faults: bool,
    /// TLS everywhere, with a throwaway CA made for the run.
    pub tls: bool,
    /// Client authentication (`--auth keys`), with a bootstrap admin token the nodes make.
    pub auth: bool,
}

/// The tmpfs each node's data lives on, when mounting works.
const TMPFS_SIZE: u64 = 4 << 30;

struct Node {
    grpc: SocketAddr,
    /// The node-to-node service: the client port plus the default peer port offset.
    peer: SocketAddr,
    http: SocketAddr,
    /// Mount point of the node's tmpfs, or plain directory.
    root: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    mounted: bool,
    status: Option<PeerClient<PeerChannel>>,
}

/// A running cluster.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    spec: ClusterSpec,
    nodes: BTreeMap<u64, Node>,
    /// Per directed link: the proxy of the Raft traffic (to the peer port) and the proxy of
    /// the client calls one node forwards to another (to the client port).
    proxies: BTreeMap<(u64, u64), LinkProxies>,
    disk_faults: Result<(), String>,
    /// Exits nobody asked for: (node, status, ms since the cluster started).
    crashes: Vec<(u64, String)>,
    /// The nodes' shared secret for node-to-node calls, and its file.
    secret: ClusterSecret,
    secret_file: PathBuf,
    /// The run's CA and node certificate, with `spec.tls`.
    tls: Option<junction_tls::DevFiles>,
    /// What a client trusts, and what a node presents (the peer port needs it).
    client_tls: Option<junction_tls::ClientTls>,
    node_tls: Option<junction_tls::ClientTls>,
}

/// The two proxies of one directed node-to-node link.
struct LinkProxies {
    peer: Proxy,
    client: Proxy,
}

impl LinkProxies {
    fn set_mode(&self, mode: LinkMode) {
        self.peer.set_mode(mode);
        self.client.set_mode(mode);
    }
}

fn free_port() -> Result<SocketAddr, ClusterError> {
    let port = junction_testkit::loopback_port()?;
    Ok(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)))
}

fn signal(child: &Child, sig: libc::c_int) -> bool {
    match child.id() {
        // SAFETY: sending a signal to our own child's pid has no memory-safety implications.
        Some(pid) => unsafe { libc::kill(pid as libc::pid_t, sig) == 0 },
        None => false,
    }
}

impl Cluster {
    /// Reserves ports, starts the proxies and every node. The nodes run a private copy of
    /// `spec.bin`, so a rebuild during a long run cannot mix versions.
    pub async fn start(mut spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("junction-chaos-")
            .tempdir()
            .map_err(ClusterError::TempDir)?;
        let path = dir.path().to_path_buf();
        // Named so that `pgrep -f 'junction serve --id 1'` (the README's way to find a dev
        // node) never matches a chaos node running alongside.
        let private_bin = path.join("junction-chaos-node");
        std::fs::copy(&spec.bin, &private_bin).map_err(|source| ClusterError::CopyBinary {
            bin: spec.bin.clone(),
            source,
        })?;
        spec.bin = private_bin;
        // Node-to-node calls are authenticated in the chaos runs as in production.
        let secret_file = path.join("cluster-secret");
        let secret = ClusterSecret::load_or_create(&secret_file)
            .map_err(|e| ClusterError::Secret(e.to_string()))?;
        let (tls, client_tls, node_tls) = if spec.tls {
            let files = junction_tls::DevCa::new("Junction chaos CA (throwaway)")
                .and_then(|ca| ca.write_node_files(&path.join("tls"), &["127.0.0.1", "localhost"]))
                .map_err(ClusterError::Tls)?;
            let client =
                junction_tls::ClientTls::from_ca_file(files.ca()).map_err(ClusterError::Tls)?;
            let node =
                junction_tls::NodeTls::load(files.node.clone()).map_err(ClusterError::Tls)?;
            (
                Some(files),
                Some(client),
                Some(junction_tls::ClientTls::of_node(node)),
            )
        } else {
            (None, None, None)
        };
        let mut nodes = BTreeMap::new();
        let offset = junction_raft::DEFAULT_PEER_PORT_OFFSET;
        let ports = junction_testkit::loopback_port_pairs(spec.nodes as usize, offset)?;
        for (id, port) in (1..=spec.nodes).zip(ports) {
            let root = path.join(format!("node{id}"));
            std::fs::create_dir_all(&root).map_err(ClusterError::TempDir)?;
            nodes.insert(
                id,
                Node {
                    grpc: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
                    peer: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port + offset)),
                    http: free_port()?,
                    root,
                    log: path.join(format!("node{id}.log")),
                    child: None,
                    paused: false,
                    mounted: false,
                    status: None,
                },
            );
        }
        let mut disk_faults = if spec.disk_faults {
            Ok(())
        } else {
            Err("disabled by --no-disk-faults".to_owned())
        };
        if disk_faults.is_ok() {
            for node in nodes.values_mut() {
                match mount_tmpfs(&node.root, TMPFS_SIZE, false) {
                    Ok(()) => node.mounted = true,
                    Err(e) => {
                        disk_faults = Err(format!(
                            "cannot mount a tmpfs for the data dirs ({e}); filling a disk safely \
                             needs a file system of its own, and mounting one needs CAP_SYS_ADMIN"
                        ));
                        break;
                    }
                }
            }
            if disk_faults.is_err() {
                for node in nodes.values_mut().filter(|n| n.mounted) {
                    unmount(&node.root);
                    node.mounted = false;
                }
            }
        }
        // From here on, dropping the cluster (on any error) unmounts and cleans up.
        let mut cluster = Cluster {
            dir: Some(dir),
            path,
            spec,
            nodes,
            proxies: BTreeMap::new(),
            disk_faults,
            crashes: Vec::new(),
            secret,
            secret_file,
            tls,
            client_tls,
            node_tls,
        };
        let targets: Vec<(u64, SocketAddr, SocketAddr)> = cluster
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.peer, n.grpc))
            .collect();
        for &(from, _, _) in &targets {
            for &(to, peer, client) in &targets {
                if from == to {
                    continue;
                }
                let seed = derive_seed(cluster.spec.seed, 0x10_000 + from * 100 + to);
                let peer = Proxy::start(peer, seed)
                    .await
                    .map_err(|source| ClusterError::Proxy { from, to, source })?;
                let client = Proxy::start(client, derive_seed(seed, 1))
                    .await
                    .map_err(|source| ClusterError::Proxy { from, to, source })?;
                cluster
                    .proxies
                    .insert((from, to), LinkProxies { peer, client });
            }
        }
        let ids: Vec<u64> = cluster.ids();
        for id in ids {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The temp dir holding data dirs and logs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether disk faults can be injected, and if not why.
    pub fn disk_faults(&self) -> Result<(), String> {
        self.disk_faults.clone()
    }

    /// `http://host:port` of every node's peer service, by id.
    pub fn peer_addrs(&self) -> BTreeMap<u64, String> {
        self.nodes
            .iter()
            .map(|(id, n)| (*id, format!("http://{}", n.peer)))
            .collect()
    }

    /// `http://host:port` of every node's public API, by id.
    pub fn grpc_addrs(&self) -> BTreeMap<u64, String> {
        self.nodes
            .iter()
            .map(|(id, n)| (*id, format!("http://{}", n.grpc)))
            .collect()
    }

    fn node(&self, id: u64) -> Result<&Node, ClusterError> {
        self.nodes.get(&id).ok_or(ClusterError::NoSuchNode(id))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node, ClusterError> {
        self.nodes.get_mut(&id).ok_or(ClusterError::NoSuchNode(id))
    }

    fn members(&self) -> String {
        self.nodes
            .iter()
            .map(|(id, n)| format!("{id}={}", n.grpc))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn overrides(&self, id: u64) -> String {
        self.proxies
            .iter()
            .filter(|((from, _), _)| *from == id)
            .filter_map(|((_, to), p)| {
                let target = self.nodes.get(to)?;
                Some(format!(
                    "{}={},{}={}",
                    target.peer,
                    p.peer.addr(),
                    target.grpc,
                    p.client.addr()
                ))
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id` if it is not running.
    pub fn start_node(&mut self, id: u64) -> Result<(), ClusterError> {
        if self.is_running(id) {
            return Ok(());
        }
        let members = self.members();
        let overrides = self.overrides(id);
        let bin = self.spec.bin.clone();
        let extra = self.spec.extra_args.clone();
        let secret_file = self.secret_file.clone();
        let auth_args: Vec<std::ffi::OsString> = if self.spec.auth {
            vec![
                "--auth".into(),
                "keys".into(),
                "--admin-token-file".into(),
                self.admin_token_file().into(),
            ]
        } else {
            Vec::new()
        };
        let tls_args: Vec<std::ffi::OsString> = match &self.tls {
            Some(f) => vec![
                "--tls-cert".into(),
                f.node.cert.clone().into(),
                "--tls-key".into(),
                f.node.key.clone().into(),
                "--tls-ca".into(),
                f.node.ca.clone().into(),
            ],
            None => Vec::new(),
        };
        let node = self.node_mut(id)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|source| ClusterError::Log { id, source })?;
        let log2 = log
            .try_clone()
            .map_err(|source| ClusterError::Log { id, source })?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .args(["--id", &id.to_string()])
            .args(["--listen", &node.grpc.to_string()])
            .args(["--http", &node.http.to_string()])
            .arg("--data-dir")
            .arg(node.root.join("data"))
            .args(["--members", &members])
            .args(["--dial-overrides", &overrides])
            .arg("--cluster-secret-file")
            .arg(&secret_file)
            .args(&tls_args)
            .args(&auth_args)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("JUNCTION_") && k != "JUNCTION_LOG" {
                cmd.env_remove(k);
            }
        }
        if std::env::var_os("JUNCTION_LOG").is_none() {
            cmd.env("JUNCTION_LOG", "info,openraft=warn");
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child
        // when its parent goes away, so that no node outlives a crashed chaos run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| ClusterError::Spawn { id, bin, source })?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// Whether node `id` has a live process (paused counts as running).
    pub fn is_running(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        match node.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                node.child = None;
                node.paused = false;
                let what = describe_exit(status);
                self.crashes.push((id, what));
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.paused)
    }

    /// Takes node `id`'s recorded exits (ones a fault expected, so not crashes).
    pub fn take_exits_of(&mut self, id: u64) -> Vec<String> {
        let (mine, rest) = std::mem::take(&mut self.crashes)
            .into_iter()
            .partition(|(node, _)| *node == id);
        self.crashes = rest;
        mine.into_iter().map(|(_, what)| what).collect()
    }

    /// Exits nobody asked for since the last call.
    pub fn take_crashes(&mut self) -> Vec<(u64, String)> {
        for id in self.ids() {
            self.is_running(id);
        }
        std::mem::take(&mut self.crashes)
    }

    /// `kill -9` node `id` and reap it.
    pub async fn kill(&mut self, id: u64) -> Result<(), ClusterError> {
        let node = self.node_mut(id)?;
        if let Some(mut child) = node.child.take() {
            let _ignored = child.start_kill();
            let _ignored = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        node.paused = false;
        Ok(())
    }

    /// SIGTERM node `id`, waiting up to `grace` before SIGKILL.
    pub async fn terminate(&mut self, id: u64, grace: Duration) -> Result<(), ClusterError> {
        let node = self.node_mut(id)?;
        if let Some(mut child) = node.child.take() {
            if node.paused {
                signal(&child, libc::SIGCONT);
            }
            signal(&child, libc::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ignored = child.start_kill();
                let _ignored = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            }
        }
        node.paused = false;
        Ok(())
    }

    pub fn pause(&mut self, id: u64) -> Result<bool, ClusterError> {
        let node = self.node_mut(id)?;
        let ok = node
            .child
            .as_ref()
            .is_some_and(|c| signal(c, libc::SIGSTOP));
        node.paused |= ok;
        Ok(ok)
    }

    pub fn resume(&mut self, id: u64) -> Result<(), ClusterError> {
        let node = self.node_mut(id)?;
        if let Some(c) = node.child.as_ref() {
            signal(c, libc::SIGCONT);
        }
        node.paused = false;
        Ok(())
    }

    pub fn set_link(&self, from: u64, to: u64, mode: LinkMode) {
        if let Some(p) = self.proxies.get(&(from, to)) {
            p.set_mode(mode);
        }
    }

    /// Sets every link to and from `id`.
    pub fn set_links_of(&self, id: u64, mode: LinkMode) {
        for ((from, to), p) in &self.proxies {
            if *from == id || *to == id {
                p.set_mode(mode);
            }
        }
    }

    pub fn heal_links(&self) {
        for p in self.proxies.values() {
            p.set_mode(LinkMode::Up);
        }
    }

    /// Traffic per link: `f->t` the Raft traffic, `f->t forwarded` the forwarded client calls.
    pub fn link_stats(&self) -> BTreeMap<String, LinkStats> {
        self.proxies
            .iter()
            .flat_map(|((f, t), p)| {
                [
                    (format!("{f}->{t}"), p.peer.stats()),
                    (format!("{f}->{t} forwarded"), p.client.stats()),
                ]
            })
            .collect()
    }

    /// Node `id`'s data directory (what `--data-dir` names).
    pub fn data_dir(&self, id: u64) -> Result<PathBuf, ClusterError> {
        Ok(self.node(id)?.root.join("data"))
    }

    /// Deletes node `id`'s data directory (stop the node first): a replaced disk.
    pub fn wipe_data(&self, id: u64) -> Result<(), ClusterError> {
        let dir = self.data_dir(id)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClusterError::Disk {
                id,
                reason: format!("removing {}: {e}", dir.display()),
            }),
        }
    }

    /// Fills node `id`'s data file system: shrinks its tmpfs to what is in use right now.
    pub fn fill_disk(&self, id: u64) -> Result<u64, ClusterError> {
        self.disk_faults
            .clone()
            .map_err(ClusterError::NoDiskFaults)?;
        let node = self.node(id)?;
        let mut last = String::new();
        for _ in 0..20 {
            let used =
                used_bytes(&node.root).map_err(|reason| ClusterError::Disk { id, reason })?;
            // Round up to a page: tmpfs sizes are in pages.
            let size = used.div_ceil(4096).max(1) * 4096;
            match mount_tmpfs(&node.root, size, true) {
                Ok(()) => return Ok(size),
                // The node wrote more between statvfs and the remount; try again.
                Err(e) => last = e,
            }
        }
        Err(ClusterError::Disk { id, reason: last })
    }

    /// Gives node `id`'s file system its full size back.
    pub fn free_disk(&self, id: u64) -> Result<(), ClusterError> {
        self.disk_faults
            .clone()
            .map_err(ClusterError::NoDiskFaults)?;
        let node = self.node(id)?;
        mount_tmpfs(&node.root, TMPFS_SIZE, true)
            .map_err(|reason| ClusterError::Disk { id, reason })
    }

    /// Where the nodes keep the bootstrap admin token (all share the file; the first node to
    /// start makes it).
    fn admin_token_file(&self) -> PathBuf {
        self.path.join("admin-token")
    }

    /// The bootstrap admin token on an `auth` run (`None` without), waiting up to `limit`
    /// for the first node to have written it.
    pub async fn admin_token(&self, limit: Duration) -> Result<Option<String>, ClusterError> {
        if !self.spec.auth {
            return Ok(None);
        }
        let path = self.admin_token_file();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reason = match junction_testkit::read_admin_token(&path) {
                Ok(token) => return Ok(Some(token)),
                Err(reason) => reason,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::AdminToken { path, reason });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What clients of the run trust (`None` without TLS).
    pub fn client_tls(&self) -> Option<junction_tls::ClientTls> {
        self.client_tls.clone()
    }

    /// A peer client for `endpoint`, carrying the cluster secret (and presenting the nodes'
    /// certificate on a TLS run, as the peer port requires).
    pub fn peer_client(&self, endpoint: &Endpoint) -> PeerClient<PeerChannel> {
        PeerClient::with_interceptor(
            junction_tls::channel(endpoint.clone(), self.node_tls.as_ref()),
            AttachSecret(Some(self.secret.clone()), None),
        )
    }

    /// Asks node `id` for the state of the groups it hosts (direct, never through a proxy).
    pub async fn node_status(&mut self, id: u64) -> Option<NodeStatusResponse> {
        let secret = self.secret.clone();
        let tls = self.node_tls.clone();
        let node = self.nodes.get_mut(&id)?;
        if node.child.is_none() || node.paused {
            return None;
        }
        let client = match &node.status {
            Some(c) => c.clone(),
            None => {
                let ep = Endpoint::from_shared(format!("http://{}", node.peer))
                    .ok()?
                    .connect_timeout(Duration::from_millis(500));
                let c = PeerClient::with_interceptor(
                    junction_tls::channel(ep, tls.as_ref()),
                    AttachSecret(Some(secret), None),
                );
                node.status = Some(c.clone());
                c
            }
        };
        let mut client = client;
        let call = client.node_status(NodeStatusRequest {});
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Status of every node that answers.
    pub async fn statuses(&mut self) -> BTreeMap<u64, NodeStatusResponse> {
        let mut out = BTreeMap::new();
        for id in self.ids() {
            if let Some(s) = self.node_status(id).await {
                out.insert(id, s);
            }
        }
        out
    }

    /// The leader and term of every group, as the answering nodes report it (highest term
    /// wins).
    pub async fn leaders(&mut self) -> BTreeMap<u64, (u64, u64)> {
        leaders_of(&self.statuses().await)
    }

    /// Waits until every node in `ids` answers its status probe.
    pub async fn wait_answering(&mut self, ids: &[u64], limit: Duration) -> Result<(), Vec<u64>> {
        let deadline = Instant::now() + limit;
        loop {
            let mut missing = Vec::new();
            for &id in ids {
                if self.node_status(id).await.is_none() {
                    missing.push(id);
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(missing);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Some(node) = self.nodes.get(&id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&node.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The size of node `id`'s log so far (a mark for [`Cluster::log_since`]).
    pub fn log_len(&self, id: u64) -> u64 {
        self.nodes
            .get(&id)
            .and_then(|n| std::fs::metadata(&n.log).ok())
            .map_or(0, |m| m.len())
    }

    /// What node `id` logged after `mark` (from [`Cluster::log_len`]).
    pub fn log_since(&self, id: u64, mark: u64) -> String {
        let Some(node) = self.nodes.get(&id) else {
            return String::new();
        };
        let bytes = std::fs::read(&node.log).unwrap_or_default();
        let from = usize::try_from(mark).unwrap_or(usize::MAX).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// Copies every node's log into `dest`.
    pub fn copy_logs(&self, dest: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dest)?;
        for (id, node) in &self.nodes {
            if node.log.exists() {
                std::fs::copy(&node.log, dest.join(format!("node{id}.log")))?;
            }
        }
        Ok(())
    }

    /// Kills every node and waits for them; keeps (and returns) the temp dir if `keep`.
    pub async fn shutdown(mut self, keep: bool) -> Option<PathBuf> {
        for id in self.ids() {
            let _ignored = self.kill(id).await;
        }
        self.proxies.clear();
        let kept = if keep {
            // A kept tmpfs would vanish at unmount: copy the data out first.
            for (id, node) in &self.nodes {
                if node.mounted {
                    let dest = self.path.join(format!("node{id}-data"));
                    let _ignored = copy_dir(&node.root, &dest);
                }
            }
            Some(self.path.clone())
        } else {
            None
        };
        for node in self.nodes.values_mut().filter(|n| n.mounted) {
            unmount(&node.root);
            node.mounted = false;
        }
        if let (true, Some(dir)) = (keep, self.dir.take()) {
            let _kept = dir.keep();
        }
        kept
    }
}

/// Picks, per group, the leader reported with the highest term: group → (leader, term).
pub fn leaders_of(statuses: &BTreeMap<u64, NodeStatusResponse>) -> BTreeMap<u64, (u64, u64)> {
    let mut best: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for s in statuses.values() {
        for g in &s.groups {
            if let Some(l) = g.leader {
                let e = best.entry(g.group).or_insert((g.term, l));
                if g.term > e.0 {
                    *e = (g.term, l);
                }
            }
        }
    }
    best.into_iter().map(|(g, (t, l))| (g, (l, t))).collect()
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(child) = node.child.as_mut() {
                signal(child, libc::SIGCONT);
                let _ignored = child.start_kill();
            }
        }
        // Give the kernel a moment to tear the processes down before unmounting.
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                for _ in 0..50 {
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if node.mounted {
                unmount(&node.root);
                node.mounted = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_proto::peer::GroupStatus;

    fn status(node: u64, groups: &[(u64, Option<u64>, u64)]) -> NodeStatusResponse {
        NodeStatusResponse {
            node_id: node,
            groups: groups
                .iter()
                .map(|&(group, leader, term)| GroupStatus {
                    group,
                    leader,
                    next_offset: 0,
                    start_offset: 0,
                    term,
                    applied_index: 0,
                    quiet: false,
                })
                .collect(),
            cluster_id: String::new(),
            meta_voters: Vec::new(),
        }
    }

    #[test]
    fn leaders_prefer_the_highest_term() {
        let mut m = BTreeMap::new();
        m.insert(1, status(1, &[(0, Some(1), 3), (5, Some(1), 2)]));
        m.insert(2, status(2, &[(0, Some(2), 4), (5, None, 9)]));
        let l = leaders_of(&m);
        assert_eq!(l.get(&0), Some(&(2, 4)));
        assert_eq!(l.get(&5), Some(&(1, 2)));
    }
}
