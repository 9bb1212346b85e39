//! `junction dev`: a local cluster of child `junction serve` processes.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use junction_client::{Client, ClientOptions};
use tokio::process::{Child, Command};

use crate::common::{DEFAULT_SERVERS, out};

/// How long the cluster has to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopping nodes get after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Run a local cluster: N `junction serve` child processes on consecutive ports.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Directory of the nodes' data (`nodeI/`) and logs (`nodeI.log`).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// gRPC port of node 1; node I listens on BASE+I-1.
    #[arg(long, default_value_t = 7701)]
    pub base_port: u16,
    /// HTTP (health, metrics) port of node 1; node I listens on BASE+I-1.
    #[arg(long, default_value_t = 8701)]
    pub http_base_port: u16,
    /// Run the nodes with `--auth keys` and the admin token in `DATA_DIR/admin.token` (which
    /// `./scripts/junction` sends for you; elsewhere set `JUNCTION_TOKEN_FILE`). Off by
    /// default: a dev cluster listens on loopback only, and every `junction` command it
    /// prints must work as shown, with no credential to pass.
    #[arg(long)]
    pub auth: bool,
    /// TLS on the client ports too (clients then need `JUNCTION_TLS_CA=DATA_DIR/tls/ca.pem`).
    /// By default the dev cluster makes a throwaway CA and a node certificate under
    /// `DATA_DIR/tls` (kept across runs) and runs **mutual TLS between the nodes**, while the
    /// client ports, on loopback only, stay plaintext so that every command it prints works
    /// as shown from any directory.
    #[arg(long, conflicts_with = "insecure")]
    pub tls: bool,
    /// No TLS at all, not even between the nodes.
    #[arg(long)]
    pub insecure: bool,
}

/// The files every node of the dev cluster is started with.
#[derive(Debug, Clone)]
pub(crate) struct ClusterFiles {
    pub(crate) secret: PathBuf,
    /// The admin token file, when authentication is on.
    pub(crate) admin_token: Option<PathBuf>,
    /// The throwaway CA and node certificate, unless `--insecure`.
    pub(crate) tls: Option<junction_tls::DevFiles>,
    /// Whether the client ports speak TLS too (`--tls`).
    pub(crate) client_tls: bool,
}

impl ClusterFiles {
    /// The files under `data_dir`, made on first start.
    fn prepare(args: &DevArgs) -> anyhow::Result<Self> {
        let secret = secret_path(&args.data_dir);
        junction_raft::peer_auth::ClusterSecret::load_or_create(&secret)?;
        let admin_token = if !args.auth {
            None
        } else {
            // 256 random bits as hex, mode 0600: the same shape as the cluster secret.
            let path = args.data_dir.join("admin.token");
            junction_raft::peer_auth::ClusterSecret::load_or_create(&path)
                .with_context(|| format!("making the admin token {}", path.display()))?;
            Some(path)
        };
        let tls = if args.insecure {
            None
        } else {
            let dir = args.data_dir.join("tls");
            Some(match junction_tls::DevFiles::existing(&dir) {
                Some(files) => files,
                None => junction_tls::DevCa::new("Junction dev CA (throwaway)")?
                    .write_node_files(&dir, &["127.0.0.1", "localhost"])
                    .with_context(|| format!("making the dev certificates in {}", dir.display()))?,
            })
        };
        Ok(Self {
            secret,
            admin_token,
            tls,
            client_tls: args.tls,
        })
    }
}

/// The ports and paths of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodePlan {
    pub(crate) id: u16,
    pub(crate) listen: String,
    /// The node-to-node service: the gRPC port plus the default peer port offset.
    pub(crate) peer: String,
    pub(crate) http: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) log: PathBuf,
}

/// Checks the arguments and lays out the nodes and the `--members` list.
pub(crate) fn plan(args: &DevArgs) -> anyhow::Result<(Vec<NodePlan>, String)> {
    if args.nodes == 0 || args.nodes > 99 {
        bail!("--nodes must be between 1 and 99");
    }
    let last = |base: u16| base.checked_add(args.nodes - 1);
    let (Some(grpc_last), Some(http_last)) = (last(args.base_port), last(args.http_base_port))
    else {
        bail!("ports beyond 65535");
    };
    if args.base_port == 0 || args.http_base_port == 0 {
        bail!("ports must not be 0");
    }
    if args.base_port <= http_last && args.http_base_port <= grpc_last {
        bail!("the gRPC and HTTP port ranges overlap");
    }
    let offset = junction_raft::DEFAULT_PEER_PORT_OFFSET;
    let Some(peer_last) = grpc_last.checked_add(offset) else {
        bail!("peer ports (gRPC port + {offset}) beyond 65535");
    };
    let peer_base = args.base_port + offset;
    if peer_base <= http_last && args.http_base_port <= peer_last {
        bail!(
            "the HTTP ports overlap the peer ports ({peer_base}..={peer_last}, the gRPC ports \
             + {offset})"
        );
    }
    let nodes: Vec<NodePlan> = (1..=args.nodes)
        .map(|id| NodePlan {
            id,
            listen: format!("127.0.0.1:{}", args.base_port + id - 1),
            peer: format!("127.0.0.1:{}", peer_base + id - 1),
            http: format!("127.0.0.1:{}", args.http_base_port + id - 1),
            data_dir: args.data_dir.join(format!("node{id}")),
            log: args.data_dir.join(format!("node{id}.log")),
        })
        .collect();
    let members = nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.listen))
        .collect::<Vec<_>>()
        .join(",");
    Ok((nodes, members))
}

struct Node {
    plan: NodePlan,
    child: Child,
}

/// The running children. Dropping it stops them (SIGTERM, a short wait, then SIGKILL), so
/// that no exit path leaves nodes behind; [`Cluster::shutdown`] is the patient version.
#[derive(Default)]
struct Cluster {
    nodes: Vec<Node>,
}

fn signal(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        // SAFETY: `kill` has no memory-safety preconditions; the pid is our unreaped child.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

impl Cluster {
    /// The first node that exited, with its status.
    fn exited(&mut self) -> Option<(NodePlan, String)> {
        for node in &mut self.nodes {
            match node.child.try_wait() {
                Ok(Some(status)) => return Some((node.plan.clone(), status.to_string())),
                Ok(None) => {}
                Err(err) => return Some((node.plan.clone(), err.to_string())),
            }
        }
        None
    }

    async fn shutdown(&mut self) {
        for node in &self.nodes {
            signal(&node.child, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        for mut node in self.nodes.drain(..) {
            let stopped = tokio::time::timeout_at(deadline, node.child.wait()).await;
            if stopped.is_err() {
                eprintln!("node {} did not stop in time; killing it", node.plan.id);
                let _ = node.child.start_kill();
                let _ = node.child.wait().await;
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.nodes.is_empty() {
            return;
        }
        for node in &self.nodes {
            signal(&node.child, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for node in &mut self.nodes {
            while matches!(node.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = node.child.start_kill();
        }
    }
}

/// The file of the dev cluster's shared node-to-node secret, made on first start.
fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster-secret")
}

fn spawn(
    exe: &Path,
    node: &NodePlan,
    members: &str,
    files: &ClusterFiles,
) -> anyhow::Result<Child> {
    std::fs::create_dir_all(&node.data_dir)
        .with_context(|| format!("creating {}", node.data_dir.display()))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&node.log)
        .with_context(|| format!("opening {}", node.log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--id")
        .arg(node.id.to_string())
        .arg("--listen")
        .arg(&node.listen)
        .arg("--http")
        .arg(&node.http)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .arg("--members")
        .arg(members)
        .arg("--cluster-secret-file")
        .arg(&files.secret);
    match &files.admin_token {
        Some(token) => {
            cmd.args(["--auth", "keys", "--admin-token-file"])
                .arg(token);
        }
        None => {
            cmd.args(["--auth", "none"]);
        }
    }
    if let Some(tls) = &files.tls {
        cmd.arg("--tls-cert")
            .arg(&tls.node.cert)
            .arg("--tls-key")
            .arg(&tls.node.key)
            .arg("--tls-ca")
            .arg(&tls.node.ca);
        if !files.client_tls {
            cmd.arg("--plaintext-client-port");
        }
    }
    cmd
        // Settings meant for a single node would break a local cluster.
        .env_remove("JUNCTION_CONFIG")
        .env_remove("JUNCTION_ADVERTISE")
        // The logs are files: no terminal colours.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        // Own process group: Ctrl-C reaches only this process, which stops the nodes in order.
        .process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: the closure only calls `prctl`, which is async-signal-safe, between fork and
    // exec. It makes the kernel send SIGTERM to the node if this process dies (even by
    // SIGKILL), so nodes never outlive `junction dev`.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting node {} ({})", node.id, exe.display()))
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn exited_error(plan: &NodePlan, status: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "node {} exited unexpectedly ({status}); last lines of {}:\n{}",
        plan.id,
        plan.log.display(),
        log_tail(&plan.log, 20)
    )
}

/// Polls the cluster until it has a metadata leader and every node is alive.
async fn wait_ready(client: &Client, cluster: &mut Cluster, nodes: usize) -> anyhow::Result<u64> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_state = String::new();
    loop {
        if let Some((plan, status)) = cluster.exited() {
            return Err(exited_error(&plan, &status));
        }
        let state =
            match tokio::time::timeout(Duration::from_secs(3), client.cluster_status()).await {
                Ok(Ok(status)) => {
                    let alive = status.nodes.iter().filter(|n| n.alive).count();
                    match status.metadata_leader {
                        Some(leader) if alive >= nodes => return Ok(leader),
                        Some(leader) => {
                            format!("{alive}/{nodes} nodes alive, metadata leader node {leader}")
                        }
                        None => format!("{alive}/{nodes} nodes alive, no metadata leader yet"),
                    }
                }
                Ok(Err(_)) | Err(_) => "waiting for the nodes to answer".to_owned(),
            };
        if state != last_state {
            eprintln!("  {state}");
            last_state = state;
        }
        if Instant::now() >= deadline {
            bail!(
                "cluster not ready after {} s ({last_state})",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_requested(term: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Waits for Ctrl-C / SIGTERM. A node that exits meanwhile (a crash, or a `kill -9` while
/// trying out failover) is reported and started again after a pause, with its data kept.
async fn wait_for_stop(
    cluster: &mut Cluster,
    term: &mut tokio::signal::unix::Signal,
    exe: &Path,
    members: &str,
    files: &ClusterFiles,
) -> anyhow::Result<()> {
    let stop = stop_requested(term);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                let Some((plan, status)) = cluster.exited() else { continue };
                eprintln!("node {} exited ({status}); restarting it in {RESTART_DELAY:?} with its data", plan.id);
                tokio::select! {
                    () = &mut stop => return Ok(()),
                    () = tokio::time::sleep(RESTART_DELAY) => {}
                }
                let child = spawn(exe, &plan, members, files)?;
                if let Some(node) = cluster.nodes.iter_mut().find(|n| n.plan.id == plan.id) {
                    node.child = child;
                }
                eprintln!("node {} restarted", plan.id);
            }
        }
    }
}

/// Fails with the first address of `plans` that cannot be bound, before any node starts: a
/// second `junction dev` would otherwise start nodes that die at once on a busy port, or
/// talk to the first cluster's nodes and report it ready.
fn check_ports_free(plans: &[NodePlan]) -> anyhow::Result<()> {
    for plan in plans {
        for addr in [&plan.listen, &plan.peer, &plan.http] {
            if let Err(err) = std::net::TcpListener::bind(addr.as_str()) {
                if err.kind() == std::io::ErrorKind::AddrInUse {
                    bail!(
                        "port {addr} (node {}) is in use: is another `junction dev` running? \
                         Stop it, or choose other ports with --base-port and --http-base-port",
                        plan.id
                    );
                }
                return Err(err).with_context(|| format!("binding {addr} (node {})", plan.id));
            }
        }
    }
    Ok(())
}

/// How long `junction dev` waits before restarting a node that exited.
const RESTART_DELAY: Duration = Duration::from_secs(3);

/// Starts the nodes, waits until the cluster is ready, then runs until Ctrl-C or until a
/// node exits; every node is stopped before this returns, whatever happens.
pub async fn run_dev(mut args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    args.data_dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let (plans, members) = plan(&args)?;
    check_ports_free(&plans)?;
    let exe = std::env::current_exe().context("finding the junction executable")?;
    eprintln!("data under {}", args.data_dir.display());
    let files = ClusterFiles::prepare(&args)?;
    let mut cluster = Cluster::default();
    for plan in &plans {
        let child = spawn(&exe, plan, &members, &files)?;
        out(&format!(
            "node {}: grpc {}  peer {}  http {}  log {}\n",
            plan.id,
            plan.listen,
            plan.peer,
            plan.http,
            plan.log.display()
        ))?;
        cluster.nodes.push(Node {
            plan: plan.clone(),
            child,
        });
    }
    let result = run_cluster(&args, &plans, &mut cluster, &files).await;
    eprintln!("stopping the nodes");
    cluster.shutdown().await;
    eprintln!("stopped");
    result
}

async fn run_cluster(
    args: &DevArgs,
    plans: &[NodePlan],
    cluster: &mut Cluster,
    files: &ClusterFiles,
) -> anyhow::Result<()> {
    let servers = plans
        .iter()
        .map(|p| p.listen.clone())
        .collect::<Vec<_>>()
        .join(",");
    let mut options = ClientOptions::default().with_retry_deadline(Duration::from_secs(2));
    if let Some(path) = &files.admin_token {
        let token =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        options = options.with_token(token.trim());
    }
    if let (Some(tls), true) = (&files.tls, files.client_tls) {
        options = options.with_tls_ca_file(tls.ca())?;
    }
    let client = Client::connect_with(crate::common::split_addresses(&servers), options)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    eprintln!("waiting for the cluster to be ready");
    let leader = tokio::select! {
        ready = wait_ready(&client, cluster, plans.len()) => ready?,
        () = stop_requested(&mut term) => return Ok(()),
    };
    let mut text = format!(
        "\njunction dev cluster ready: {} nodes, metadata leader node {leader}\n",
        plans.len()
    );
    if servers != DEFAULT_SERVERS {
        text.push_str(&format!("  export JUNCTION_SERVER={servers}\n"));
    }
    match &files.admin_token {
        Some(token) => text.push_str(&format!(
            "authentication is on; the admin token (cluster-admin) is in {}\n  \
             ./scripts/junction sends it; elsewhere: export JUNCTION_TOKEN_FILE={}\n",
            token.display(),
            token.display()
        )),
        None => text
            .push_str("authentication is off (loopback only; `junction dev --auth` turns it on)\n"),
    }
    match (&files.tls, files.client_tls) {
        (Some(tls), true) => text.push_str(&format!(
            "TLS on every port (a throwaway CA in {dir}); clients trust it with:\n  \
             export JUNCTION_TLS_CA={ca}\n  grpcurl -cacert {ca} 127.0.0.1:{port} list\n",
            dir = tls.ca().parent().unwrap_or(Path::new(".")).display(),
            ca = tls.ca().display(),
            port = args.base_port,
        )),
        (Some(tls), false) => text.push_str(&format!(
            "node-to-node traffic: mutual TLS (a throwaway CA in {}); client ports: plaintext \
             on loopback (`junction dev --tls` for TLS there too)\n",
            tls.ca().parent().unwrap_or(Path::new(".")).display(),
        )),
        (None, _) => text.push_str(
            "WARNING: --insecure: plaintext on every port, between the nodes too; anything on \
             this machine can read and alter the traffic\n",
        ),
    }
    let rf = if args.nodes >= 3 {
        ""
    } else {
        " --replication-factor 1"
    };
    // From a checkout (`./scripts/dev`), the CLI is `./scripts/junction`; elsewhere the
    // binary is on the PATH or named in full.
    let cli = if Path::new("scripts/junction").is_file() {
        "./scripts/junction"
    } else {
        "junction"
    };
    text.push_str(&format!(
        "try:\n  {cli} station create demo --partitions 3{rf}\n  echo hello | {cli} produce demo\n  {cli} read demo\npress Ctrl-C to stop\n"
    ));
    out(&text)?;
    let exe = std::env::current_exe().context("finding the junction executable")?;
    let members = plans
        .iter()
        .map(|p| format!("{}={}", p.id, p.listen))
        .collect::<Vec<_>>()
        .join(",");
    wait_for_stop(cluster, &mut term, &exe, &members, files).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args(nodes: u16, base: u16, http: u16) -> DevArgs {
        DevArgs {
            data_dir: PathBuf::from("./data"),
            nodes,
            base_port: base,
            http_base_port: http,
            auth: false,
            tls: false,
            insecure: false,
        }
    }

    #[test]
    fn default_plan() {
        let (nodes, members) = plan(&args(3, 7701, 8701)).unwrap();
        assert_eq!(
            members,
            "1=127.0.0.1:7701,2=127.0.0.1:7702,3=127.0.0.1:7703"
        );
        assert_eq!(nodes[2].listen, "127.0.0.1:7703");
        assert_eq!(nodes[2].peer, "127.0.0.1:7803");
        assert_eq!(nodes[2].http, "127.0.0.1:8703");
        assert_eq!(nodes[2].data_dir, PathBuf::from("./data/node3"));
        assert_eq!(nodes[2].log, PathBuf::from("./data/node3.log"));
    }

    /// In tests the current executable is the test harness, which rejects `serve --id ...`
    /// and exits: `run_dev` must report that and leave no process behind.
    #[tokio::test]
    async fn a_node_that_exits_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let args = DevArgs {
            data_dir: dir.path().to_path_buf(),
            nodes: 2,
            base_port: 17_701,
            http_base_port: 18_701,
            auth: false,
            tls: false,
            insecure: false,
        };
        let err = tokio::time::timeout(Duration::from_secs(30), run_dev(args))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("exited unexpectedly"), "{err:#}");
        assert!(dir.path().join("node1.log").exists());
        assert!(dir.path().join("node2").is_dir());
        // The throwaway CA and node certificate were made for the nodes.
        let tls = junction_tls::DevFiles::existing(&dir.path().join("tls")).expect("TLS files");
        junction_tls::NodeTls::load(tls.node).expect("the dev certificates load");
    }

    #[test]
    fn a_busy_port_is_named() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_port = free.local_addr().unwrap().port();
        drop(free);
        let plans = vec![NodePlan {
            id: 2,
            listen: format!("127.0.0.1:{free_port}"),
            peer: format!("127.0.0.1:{free_port}"),
            http: format!("127.0.0.1:{port}"),
            data_dir: PathBuf::from("d"),
            log: PathBuf::from("l"),
        }];
        let err = check_ports_free(&plans).unwrap_err().to_string();
        assert!(
            err.contains(&format!("port 127.0.0.1:{port} (node 2) is in use")),
            "{err}"
        );
    }

    #[test]
    fn bad_plans() {
        assert!(plan(&args(0, 7701, 8701)).is_err());
        assert!(plan(&args(3, 65534, 8701)).is_err());
        assert!(plan(&args(3, 7701, 7702)).is_err());
        assert!(plan(&args(1, 7701, 7702)).is_ok());
        // HTTP ports on the peer ports (gRPC + 100).
        assert!(plan(&args(3, 7701, 7802)).is_err());
        assert!(plan(&args(3, 65500, 8701)).is_err());
    }
}
