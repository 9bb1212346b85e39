//! A cluster of real `junction serve` processes for `--spawn N`, stopped when dropped, with
//! the per-process CPU and disk-write counters the report needs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// Spawned nodes; every child is killed and its data removed on drop.
pub struct Spawned {
    /// The CA clients trust, when the nodes run on TLS.
    pub tls_ca: Option<PathBuf>,
    /// The bootstrap admin token's file, when the nodes run with `--auth keys` (the first
    /// node to start writes it).
    pub admin_token_file: Option<PathBuf>,
    _dir: tempfile::TempDir,
    pub addrs: Vec<String>,
    http: Vec<String>,
    children: Vec<Child>,
}

/// CPU time (µs) and bytes written to storage, summed over the spawned processes.
#[derive(Debug, Clone, Default)]
pub struct ProcUsage {
    pub cpu_us: u64,
    /// CPU time (µs) of each node, in node order.
    pub node_cpu_us: Vec<u64>,
    pub write_bytes: u64,
    /// What the store says it wrote (`junction_storage_written_bytes_total`), by cause:
    /// RocksDB's WAL, memtable flushes and compactions, then segment files.
    pub rocksdb: [u64; 4],
    /// Resident memory of each node when measured (not a difference), in node order.
    pub node_rss_bytes: Vec<u64>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(junction_testkit::loopback_port()?)
}

impl Spawned {
    /// Starts `n` nodes with data in a temp dir (under `base` when given).
    /// With `tls`, the nodes run on TLS with a throwaway CA made in that dir ([`Spawned::tls_ca`]).
    /// With `auth`, they authenticate every client call (`--auth keys`, a cluster secret
    /// between them, the admin token in [`Spawned::admin_token_file`]).
    pub fn start(
        exe: &std::path::Path,
        n: u64,
        base: Option<PathBuf>,
        tls: bool,
        auth: bool,
    ) -> anyhow::Result<Self> {
        let dir = match base {
            Some(b) => tempfile::Builder::new()
                .prefix("junction-bench-")
                .tempdir_in(b)?,
            None => tempfile::Builder::new()
                .prefix("junction-bench-")
                .tempdir()?,
        };
        // Client ports whose peer port (+ the default offset) is free too.
        let grpc: Vec<String> = junction_testkit::loopback_port_pairs(
            n as usize,
            junction_raft::DEFAULT_PEER_PORT_OFFSET,
        )?
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
        let mut http = Vec::new();
        for _ in 0..n {
            http.push(format!("127.0.0.1:{}", free_port()?));
        }
        let members = grpc
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let tls_files = if tls {
            Some(
                junction_tls::DevCa::new("Junction bench CA (throwaway)")?
                    .write_node_files(&dir.path().join("tls"), &["127.0.0.1", "localhost"])?,
            )
        } else {
            None
        };
        let mut node_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(f) = &tls_files {
            for (flag, path) in [
                ("--tls-cert", &f.node.cert),
                ("--tls-key", &f.node.key),
                ("--tls-ca", &f.node.ca),
            ] {
                node_args.push(flag.into());
                node_args.push(path.into());
            }
        }
        let admin_token_file = auth.then(|| dir.path().join("admin-token"));
        if let Some(token_file) = &admin_token_file {
            let secret = dir.path().join("cluster-secret");
            junction_raft::peer_auth::ClusterSecret::load_or_create(&secret)
                .map_err(|e| anyhow::anyhow!("making the cluster secret: {e}"))?;
            for (flag, value) in [
                ("--auth", std::ffi::OsString::from("keys")),
                ("--admin-token-file", token_file.into()),
                ("--cluster-secret-file", secret.into()),
            ] {
                node_args.push(flag.into());
                node_args.push(value);
            }
        }
        let mut children = Vec::new();
        for i in 0..n as usize {
            let log = std::fs::File::create(dir.path().join(format!("node{}.log", i + 1)))?;
            let child = Command::new(exe)
                .args([
                    "serve",
                    "--id",
                    &(i + 1).to_string(),
                    "--listen",
                    &grpc[i],
                    "--http",
                    &http[i],
                ])
                .arg("--data-dir")
                .arg(dir.path().join(format!("node{}", i + 1)))
                .args(["--members", &members])
                .args(&node_args)
                .env("JUNCTION_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?;
            children.push(child);
        }
        Ok(Self {
            tls_ca: tls_files.map(|f| f.node.ca),
            admin_token_file,
            _dir: dir,
            addrs: grpc,
            http,
            children,
        })
    }

    /// The bootstrap admin token (`None` without `auth`), once the first node has written it.
    /// The nodes' HTTP addresses.
    pub fn http_addrs(&self) -> &[String] {
        &self.http
    }

    pub async fn admin_token(&self, limit: Duration) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reason = match junction_testkit::read_admin_token(path) {
                Ok(token) => return Ok(Some(token)),
                Err(reason) => reason,
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no node wrote the admin token to {} within {limit:?} ({reason})",
                    path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sums CPU time and storage writes of every node process (Linux `/proc`).
    pub fn usage(&self) -> ProcUsage {
        let mut u = ProcUsage::default();
        for c in &self.children {
            let pid = c.id();
            let cpu = proc_cpu_us(pid).unwrap_or(0);
            u.cpu_us += cpu;
            u.node_cpu_us.push(cpu);
            if let Some(w) = proc_write_bytes(pid) {
                u.write_bytes += w;
            }
            u.node_rss_bytes.push(proc_rss_bytes(pid).unwrap_or(0));
        }
        for h in &self.http {
            if let Some(page) = http_get(h, "/metrics") {
                for (i, cause) in ["wal", "flush", "compaction", "segments"]
                    .iter()
                    .enumerate()
                {
                    u.rocksdb[i] += written_bytes(&page, cause);
                }
            }
        }
        u
    }

    /// Returns whether every child is still running.
    pub fn all_running(&mut self) -> anyhow::Result<()> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                bail!("node {} exited during the benchmark ({status})", i + 1);
            }
        }
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

fn proc_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some((utime + stime) * 1_000_000 / ticks)
}

/// Resident memory of a process (`VmRSS` in `/proc/PID/status`).
fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A plain HTTP/1.0 GET on loopback, for the node's own `/metrics` page.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Sums `junction_storage_written_bytes_total{cause=...}` over a metrics page.
fn written_bytes(page: &str, cause: &str) -> u64 {
    let label = format!("cause=\"{cause}\"");
    page.lines()
        .filter(|l| l.starts_with("junction_storage_written_bytes_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn proc_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the cluster answers ClusterStatus with a metadata leader and all nodes alive.
/// The calls go through the SDK, whose retry policy rides out nodes that do not answer yet.
pub async fn wait_ready(
    addrs: &[String],
    token: Option<&str>,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let admin = crate::load::admin(addrs, token)?;
    let mut last = String::from("no answer yet");
    loop {
        match tokio::time::timeout_at(deadline, admin.cluster_status()).await {
            Ok(Ok(s)) if s.metadata_leader.is_some() && s.nodes.iter().all(|n| n.alive) => {
                return Ok(());
            }
            Ok(Ok(s)) => {
                let alive = s.nodes.iter().filter(|n| n.alive).count();
                last = format!(
                    "{alive}/{} nodes alive, metadata leader {:?}",
                    s.nodes.len(),
                    s.metadata_leader
                );
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the cluster was not ready within {limit:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
