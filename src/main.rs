//! The `junction` binary: `serve` runs a node, `dev` a local three-node cluster, and the
//! client subcommands talk to a cluster. This file only parses and dispatches.

use clap::{Parser, Subcommand};

/// Junction: a Raft-replicated, tenant-aware log store.
#[derive(Parser)]
#[command(name = "junction", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Serve(Box<junction_server::ServeArgs>),
    /// Run a local cluster (three nodes, data under ./data) until Ctrl-C; a node that exits is
    /// restarted with its data.
    Dev(junction_cli::DevArgs),
    /// Run a real cluster under seeded faults and check that nothing acknowledged is lost,
    /// duplicated without cause, or reordered.
    Chaos(junction_chaos::ChaosArgs),
    /// Load a cluster and report throughput and latency (see docs/benchmarks.md).
    Bench(junction_bench::BenchArgs),
    #[command(flatten)]
    Client(junction_cli::ClientCommand),
}

async fn serve(args: junction_server::ServeArgs) -> anyhow::Result<()> {
    let config = junction_server::Config::load(&args)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("JUNCTION_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let telemetry = junction_server::telemetry::init(
        filter,
        config.otlp_endpoint.as_deref(),
        Some(config.node_id),
    )?;
    let result = serve_node(config).await;
    // Flushing waits on the exporter, which runs on this runtime: off the async workers.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// Raises the soft limit on open files to the hard limit: a node keeps one file open per
/// partition log segment, besides RocksDB's table files and its connections.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if got != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::info!(
            from = before,
            to = lim.rlim_max,
            "raised the open file limit"
        );
    } else {
        tracing::warn!(
            limit = before,
            error = %std::io::Error::last_os_error(),
            "could not raise the open file limit"
        );
    }
}

async fn serve_node(config: junction_server::Config) -> anyhow::Result<()> {
    raise_open_file_limit();
    let handle = junction_server::Server::start(config).await?;
    tracing::info!(grpc = %handle.grpc_addr, http = %handle.http_addr, peer = ?handle.peer_addr, "node serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let failed = handle.failed();
    let failure = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
        () = failed.cancelled() => true,
    };
    tracing::info!("shutting down");
    // Bounded: a node whose disk failed must not hang on its way out.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), handle.shutdown()).await;
    if failure {
        anyhow::bail!("the node stopped because its data store failed (see the log above)");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Dev(args) => junction_cli::run_dev(args).await,
        Command::Bench(args) => junction_bench::run(args).await,
        Command::Chaos(args) => {
            if junction_chaos::run(args).await? {
                Ok(())
            } else {
                eprintln!("chaos: violations found (see the report above)");
                std::process::exit(1)
            }
        }
        Command::Client(cmd) => junction_cli::run_client(cmd).await,
    }
}
