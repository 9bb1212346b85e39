//! One chaos run, start to finish: cluster, station, workload, faults, heal, convergence,
//! replica reads, check, report. The cluster is torn down on every exit path.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use junction_client::{Client, ClientError};
use tokio::time::Instant;

use crate::access::Access;
use crate::args::ChaosArgs;
use crate::checker::{CheckInput, Violation, ViolationKind, check};
use crate::cluster::{Cluster, ClusterSpec};
use crate::group_check::{GroupChecker, check_group};
use crate::history::History;
use crate::nemesis::Nemesis;
use crate::pipeline_check::{self, PipelineRunner};
use crate::report::{self, Distribution, Results};
use crate::schedule::{self, PlannedFault, ScheduleParams, SplitMix64};
use crate::verify::{self, PartitionLayout};
use crate::workload::{Recorder, Workload, WorkloadSpec};

const STATION: &str = "chaos";
const SETUP_LIMIT: Duration = Duration::from_secs(90);
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(120);
const READER_CATCH_UP: Duration = Duration::from_secs(30);
/// How long the consumer group may take to drain after convergence.
const GROUP_DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// What the suite cannot inject (printed and recorded in every run).
const NOT_INJECTABLE: &[&str] = &[
    "machine crash / power loss (loss of un-fsynced page cache): kill -9 keeps the page cache; needs a VM or a crash-simulating file system",
    "clock skew and jumps: nodes share the host clock (needs time namespaces or libfaketime)",
    "packet-level loss, reordering and duplication: the proxy works on TCP streams, so loss is emulated by stalls and resets",
    "slow disks, torn writes and corruption below RocksDB's own checksums (bit flips are \
     injected through RocksDB, inside stored messages)",
    "faults between clients and nodes: clients reach nodes directly; only node-to-node links go through proxies",
    "overlapping faults: faults run one at a time",
];

/// A replaced node that started a new cluster instead of rejoining its own.
fn new_cluster_violations(records: &[crate::history::FaultRecord]) -> Vec<Violation> {
    records
        .iter()
        .filter(|f| {
            matches!(
                f.outcome,
                Some(crate::history::StorageOutcome::Replaced {
                    new_cluster: true,
                    ..
                })
            )
        })
        .map(|f| {
            Violation::new(
                ViolationKind::NewCluster,
                format!(
                    "fault #{}: node {:?} initialised a new cluster after its data directory was \
                     deleted, instead of rejoining its own",
                    f.index, f.nodes
                ),
            )
        })
        .collect()
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    SplitMix64::new(nanos ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
        % 1_000_000_000
}

/// Runs the chaos suite. `Ok(true)`: no violation; `Ok(false)`: violations (see the summary
/// and `results.json`); `Err`: the run could not be carried out.
pub async fn run(args: ChaosArgs) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(random_seed);
    let bin = match &args.junction_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find the junction binary")?,
    };
    if !bin.is_file() {
        bail!("junction binary {} does not exist", bin.display());
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("chaos-out").join(seed.to_string()));
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the output dir {}", out.display()))?;
    let plan = schedule::plan(&ScheduleParams {
        seed,
        nodes: args.nodes,
        partitions: args.partitions,
        duration: args.duration,
        mean_interval: args.fault_interval,
        kinds: args.faults.clone(),
    });
    println!(
        "chaos: seed {seed} (rerun with --seed {seed}); {} nodes, {:?} of faults, {} planned:",
        args.nodes,
        args.duration,
        plan.len()
    );
    print!("{}", schedule::render(&plan));
    let _ignored = std::io::stdout().flush();

    let mut extra_args = vec![
        "--snapshot-every".to_owned(),
        args.snapshot_every.to_string(),
        "--keep-logs".to_owned(),
        args.keep_logs.to_string(),
        // Scrub often, so that a flipped bit is found and repaired within the run.
        "--scrub-every-ms".to_owned(),
        "3000".to_owned(),
    ];
    if !args.no_disk_faults {
        // Without preallocated WAL space a capped file system fails the node's very next
        // write with ENOSPC, so the disk-fill fault really bites.
        extra_args.push("--test-no-preallocation".to_owned());
    }
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: args.nodes,
        bin,
        seed,
        extra_args,
        disk_faults: !args.no_disk_faults,
        tls: args.tls,
        auth: args.auth,
    })
    .await
    .context("starting the cluster")?;
    println!(
        "chaos: cluster of {} nodes in {}",
        args.nodes,
        cluster.path().display()
    );
    if let Err(why) = cluster.disk_faults() {
        eprintln!("chaos: !!! disk-fill faults will be SKIPPED: {why}");
    }
    // SIGINT / SIGTERM end the run early but still tear the cluster down (and unmount its
    // disks).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let outcome = tokio::select! {
        outcome = drive(&args, seed, &plan, &mut cluster, &out) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
    };
    if outcome.is_err() {
        let _ignored = cluster.copy_logs(&out.join("logs"));
    }
    if let Some(kept) = cluster.shutdown(args.keep_data).await {
        println!("chaos: data and logs kept in {}", kept.display());
    }
    outcome
}

/// The tenant whose API key the clients of an `--auth` run call with (the stations under
/// test have no tenant prefix, so they belong to it).
const TENANT: &str = "default";

/// How the run's clients reach the cluster. On an `--auth` run, the bootstrap admin token
/// waits for the cluster and makes an API key of the tenant under test (role `admin`:
/// stations, produce, groups); every other call of the run uses that key, so the whole
/// workload goes through authentication and the tenant checks, forwarding included.
async fn access(cluster: &mut Cluster, nodes: u64) -> anyhow::Result<Access> {
    let addrs = cluster.grpc_addrs();
    let bootstrap = Access {
        tls: cluster.client_tls(),
        token: cluster.admin_token(SETUP_LIMIT).await?,
    };
    let admin = bootstrap.client(&addrs, Duration::from_secs(10))?;
    wait_ready(&admin, nodes, cluster).await?;
    if bootstrap.token.is_none() {
        return Ok(bootstrap);
    }
    let key = admin
        .create_api_key(junction_client::proto::CreateApiKeyRequest {
            tenant: TENANT.to_owned(),
            role: "admin".to_owned(),
            description: "junction chaos workload".to_owned(),
            ..Default::default()
        })
        .await
        .context("making the workload's API key")?;
    println!(
        "chaos: auth on; the workload calls with API key {} (tenant {TENANT}, role admin)",
        key.key.map(|k| k.id).unwrap_or_default()
    );
    Ok(Access {
        tls: bootstrap.tls,
        token: Some(key.token),
    })
}

async fn drive(
    args: &ChaosArgs,
    seed: u64,
    plan: &[PlannedFault],
    cluster: &mut Cluster,
    out: &Path,
) -> anyhow::Result<bool> {
    let addrs = cluster.grpc_addrs();
    let access = access(cluster, args.nodes).await?;
    let admin = access.client(&addrs, Duration::from_secs(10))?;
    let layout = create_station(&admin, args).await?;
    create_output_station(&admin, args).await?;
    println!("chaos: station {STATION:?} ready: {layout:?}");

    let origin = Instant::now();
    let recorder = Arc::new(Recorder::new(origin));
    let reader_client = access.client(&addrs, Duration::from_secs(60))?;
    let mut workload = Workload::start(
        &WorkloadSpec {
            station: STATION.to_owned(),
            partitions: args.partitions,
            producers: args.producers,
            keys: args.keys,
            seed,
            nodes: addrs.iter().map(|(id, a)| (*id, a.clone())).collect(),
            rpc_timeout: args.rpc_timeout,
            inflight: args.inflight,
            exactly_once: !args.at_least_once,
            access: access.clone(),
        },
        recorder.clone(),
        reader_client,
    )?;

    let group_client = access.client(&addrs, Duration::from_secs(20))?;
    let group = GroupChecker::start(group_client.clone(), STATION.to_owned(), recorder.clone());
    let pipeline_client = access.client(&addrs, Duration::from_secs(60))?;
    let pipeline = PipelineRunner::start(pipeline_client.clone(), STATION.to_owned());

    // Faults.
    let mut nemesis = Nemesis::new(origin, layout.iter().map(|l| l.group).collect());
    let run_end = origin + args.duration;
    let mut records = Vec::new();
    for f in plan {
        let at = origin + Duration::from_millis(f.at_ms);
        tokio::time::sleep_until(at).await;
        if Instant::now() >= run_end {
            break;
        }
        nemesis.revive_crashed(cluster).await;
        println!(
            "chaos: t+{:>6.1}s fault #{} {} (hold {:.1}s)",
            recorder.now_ms() as f64 / 1000.0,
            f.index,
            f.action,
            f.hold_ms as f64 / 1000.0
        );
        let rec = nemesis.execute(cluster, f).await;
        for n in &rec.notes {
            println!("chaos:          note: {n}");
        }
        records.push(rec);
    }
    tokio::time::sleep_until(run_end).await;

    // Heal, and check the cluster serves again.
    let mut notes = nemesis.heal_all(cluster).await;
    let heal_ms = recorder.now_ms();
    println!(
        "chaos: t+{:.1}s healed; waiting for every partition to accept writes",
        heal_ms as f64 / 1000.0
    );
    let mut extra_violations = Vec::new();
    let deadline = Instant::now() + RECOVERY_LIMIT;
    let stalled = loop {
        let stalled: Vec<u32> = (0..args.partitions)
            .filter(|p| !recorder.acked_since(*p, heal_ms))
            .collect();
        if stalled.is_empty() || Instant::now() >= deadline {
            break stalled;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !stalled.is_empty() {
        extra_violations.push(Violation::new(
            ViolationKind::NoRecovery,
            format!("partitions {stalled:?} acknowledged no produce within {RECOVERY_LIMIT:?} of the heal"),
        ));
    }
    workload.stop_producers().await;
    nemesis.revive_crashed(cluster).await;

    // Convergence, then the readers catch up, then read every replica.
    println!("chaos: producers stopped; waiting for the replicas to converge");
    let converged = verify::wait_converged(cluster, &layout, CONVERGENCE_LIMIT).await;
    if let Err(detail) = &converged {
        extra_violations.push(Violation::new(ViolationKind::NotConverged, detail.clone()));
    }
    if let Ok(ends) = &converged {
        let deadline = Instant::now() + READER_CATCH_UP;
        loop {
            let seen = recorder.observed_ends();
            let behind: Vec<u32> = ends
                .iter()
                .filter(|(p, end)| **end > 0 && seen.get(p).copied().unwrap_or(0) < **end)
                .map(|(p, _)| *p)
                .collect();
            if behind.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                notes.push(format!(
                    "tailing readers of partitions {behind:?} had not caught up {READER_CATCH_UP:?} after convergence"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    workload.stop_readers().await;
    let ends = converged.clone().unwrap_or_default();
    println!("chaos: draining the consumer group");
    let (deliveries, lag, dead_letters, rejoins) = group
        .finish(&group_client, STATION, &ends, GROUP_DRAIN_LIMIT)
        .await;
    let replicas = verify::read_replicas(&addrs, STATION, &layout, &access).await;
    println!("chaos: draining the pipeline");
    let (pipeline_stats, pipeline_violations) = pipeline
        .finish(
            &pipeline_client,
            &replicas,
            args.partitions,
            GROUP_DRAIN_LIMIT,
        )
        .await;
    nemesis.collect_elections(&mut records).await;

    let attempts = recorder.attempts();
    let observations = recorder.observations();
    let mut report = check(&CheckInput {
        partitions: args.partitions,
        attempts: &attempts,
        observations: &observations,
        replicas: &replicas,
        exactly_once: !args.at_least_once,
    });
    extra_violations.extend(new_cluster_violations(&records));
    report.violations.extend(extra_violations);
    let (group_stats, group_violations) =
        check_group(&attempts, &deliveries, lag, dead_letters, rejoins);
    report.violations.extend(group_violations);
    report.violations.extend(pipeline_violations);
    let passed = report.violations.is_empty();

    let samples = report::recoveries(&records, &attempts);
    let faults_by_kind = report::count_faults(&records);
    let mut not_injected: Vec<String> = NOT_INJECTABLE.iter().map(|s| (*s).to_owned()).collect();
    if let Err(why) = cluster.disk_faults() {
        not_injected.insert(0, format!("disk-fill: {why}"));
    }
    let results = Results {
        passed,
        seed,
        nodes: args.nodes,
        partitions: args.partitions,
        producers: args.producers,
        keys: args.keys,
        duration_s: args.duration.as_secs_f64(),
        faults_injected: faults_by_kind.values().map(|c| c.injected).sum(),
        faults_skipped: faults_by_kind.values().map(|c| c.skipped).sum(),
        faults_by_kind,
        storage_faults: report::count_storage_faults(&records),
        check: report.stats.clone(),
        violations_by_kind: report::violations_by_kind(&report.violations),
        violations: report.violations.iter().take(1000).cloned().collect(),
        produce_recovery: Distribution::of(samples.iter().filter_map(|s| s.produce_ms)),
        election_recovery: Distribution::of(samples.iter().filter_map(|s| s.election_ms)),
        resumed_recovery: Distribution::of(samples.iter().filter_map(|s| s.resumed_ms)),
        recovery_samples: samples,
        outages: report::outages(&attempts, &records, 5),
        converged: converged.is_ok(),
        crashes: nemesis.crashes.clone(),
        not_injected,
        notes,
        link_stats: cluster.link_stats(),
        group: Some(group_stats),
        pipeline: Some(pipeline_stats),
    };
    let history = History {
        seed,
        nodes: args.nodes,
        partitions: args.partitions,
        station: STATION.to_owned(),
        schedule: plan.to_vec(),
        faults: records,
        attempts,
        observations,
    };
    write_outputs(out, &history, &results)?;
    // Always kept: slow failovers and outages are investigated from them even when nothing
    // was violated.
    let logs = out.join("logs");
    if cluster.copy_logs(&logs).is_ok() {
        println!("chaos: node logs copied to {}", logs.display());
    }
    print!("{}", report::summary(&results));
    if !args.at_least_once {
        println!(
            "idempotent producers: {} sends acknowledged by a retry of a batch already stored (each stored once)",
            recorder.duplicate_answers()
        );
    }
    println!("chaos: wrote {}", out.display());
    Ok(passed)
}

async fn wait_ready(admin: &Client, nodes: u64, cluster: &mut Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_LIMIT;
    loop {
        if let Ok(s) = admin.cluster_status().await
            && s.metadata_leader.is_some()
            && s.nodes.iter().filter(|n| n.alive).count() as u64 == nodes
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut tails = String::new();
            for id in cluster.ids() {
                tails.push_str(&format!("--- node {id}\n{}\n", cluster.log_tail(id, 20)));
            }
            bail!("the cluster did not become ready within {SETUP_LIMIT:?}\n{tails}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the pipeline's output station, with its dedup window.
async fn create_output_station(admin: &Client, args: &ChaosArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_LIMIT;
    let spec = || {
        junction_client::StationSpec::new(pipeline_check::OUTPUT)
            .partitions(args.partitions)
            .replication_factor(args.replication_factor)
            .policy(junction_client::proto::StationPolicy {
                dedup_window_ms: Some(pipeline_check::OUTPUT_DEDUP_WINDOW_MS),
                ..Default::default()
            })
    };
    loop {
        match admin.create_station_with(spec()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_already_exists() => return Ok(()),
            Err(e @ ClientError::RetriesExhausted { .. }) if Instant::now() < deadline => {
                eprintln!("chaos: creating the pipeline's output station: {e}; retrying");
            }
            Err(e) => return Err(e).context("creating the pipeline's output station"),
        }
    }
}

async fn create_station(admin: &Client, args: &ChaosArgs) -> anyhow::Result<Vec<PartitionLayout>> {
    let deadline = Instant::now() + SETUP_LIMIT;
    loop {
        match admin
            .create_station(STATION, args.partitions, args.replication_factor)
            .await
        {
            Ok(_) => break,
            Err(e) if e.is_already_exists() => break,
            // The SDK already retried retryable failures (no leader yet, a node not up)
            // with backoff; go on doing so until the setup limit. Anything else is final.
            Err(e @ ClientError::RetriesExhausted { .. }) if Instant::now() < deadline => {
                eprintln!("chaos: creating the station: {e}; retrying");
            }
            Err(e) => return Err(e).context("creating the station under test"),
        }
    }
    loop {
        if let Ok(info) = admin.describe_station(STATION).await {
            let layout: Vec<PartitionLayout> = info
                .partition_info
                .iter()
                .map(|p| PartitionLayout {
                    partition: p.partition,
                    group: p.group_id,
                    replicas: p.replicas.clone(),
                })
                .collect();
            let complete = layout.len() == args.partitions as usize
                && info.partition_info.iter().all(|p| p.leader.is_some());
            if complete {
                let mut by_partition = layout;
                by_partition.sort_by_key(|l| l.partition);
                return Ok(by_partition);
            }
        }
        if Instant::now() >= deadline {
            bail!("the station's partitions did not all elect a leader within {SETUP_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T, pretty: bool) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    if pretty {
        serde_json::to_writer_pretty(&mut w, value)?;
    } else {
        serde_json::to_writer(&mut w, value)?;
    }
    w.flush()?;
    Ok(())
}

fn write_outputs(out: &Path, history: &History, results: &Results) -> anyhow::Result<()> {
    write_json(&out.join("history.json"), history, false)?;
    write_json(&out.join("results.json"), results, true)?;
    let title = format!(
        "junction chaos seed {} - {} nodes, {} faults, {} violations",
        results.seed,
        results.nodes,
        results.faults_injected,
        results.violations_by_kind.values().sum::<u64>()
    );
    let svg = crate::svg::timeline_svg(&title, &history.attempts, &history.faults);
    std::fs::write(out.join("timeline.svg"), svg).context("cannot write timeline.svg")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::kill_fault;
    use crate::history::{FaultRecord, StorageOutcome};

    #[test]
    fn only_a_replaced_node_that_started_a_new_cluster_is_a_violation() {
        let replaced = |rejoined, new_cluster| FaultRecord {
            outcome: Some(StorageOutcome::Replaced {
                rejoined,
                new_cluster,
            }),
            ..kill_fault()
        };
        let records = vec![kill_fault(), replaced(true, false), replaced(false, false)];
        assert!(new_cluster_violations(&records).is_empty());
        let records = vec![replaced(true, false), replaced(false, true)];
        let v = new_cluster_violations(&records);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, ViolationKind::NewCluster);
        assert!(v[0].detail.contains("new cluster"), "{}", v[0].detail);
    }
}
