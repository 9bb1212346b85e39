//! A short seeded chaos run against the real `junction` binary: a few faults, then the full
//! check. The binary is `$JUNCTION_BIN`, else the `junction` next to this test's own target
//! dir, else `$CARGO_TARGET_DIR/debug/junction`, else `~/.cache/junction-target/debug/junction`.

use std::path::PathBuf;
use std::time::Duration;

use junction_chaos::ChaosArgs;

fn junction_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("JUNCTION_BIN") {
        candidates.push(PathBuf::from(p));
    }
    // This test runs from <target>/debug/deps/smoke-<hash>.
    if let Ok(exe) = std::env::current_exe()
        && let Some(debug) = exe.parent().and_then(|deps| deps.parent())
    {
        candidates.push(debug.join("junction"));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/junction"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/junction-target/debug/junction"));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/junction"));
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "the junction binary was not found (looked at {candidates:?}); build it with \
             `cargo build --workspace` or point JUNCTION_BIN at it"
        ),
    }
}

/// Runs `args` (with a temp output dir and the built binary) and asserts a clean result.
#[allow(clippy::expect_used)] // a test helper: a failed step fails the test
async fn assert_clean_run(args: ChaosArgs) -> serde_json::Value {
    let out = tempfile::tempdir().expect("temp dir");
    let args = ChaosArgs {
        out: Some(out.path().to_path_buf()),
        junction_bin: Some(junction_bin()),
        ..args
    };
    // Bounded: the run itself has deadlines on every phase; this is a backstop.
    let passed = tokio::time::timeout(Duration::from_secs(600), junction_chaos::run(args))
        .await
        .expect("the chaos run finished within 10 minutes")
        .expect("the chaos run could be carried out");
    let results: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("results.json")).expect("results.json written"),
    )
    .expect("results.json is JSON");
    assert!(out.path().join("history.json").is_file());
    assert!(out.path().join("timeline.svg").is_file());
    assert!(
        passed,
        "violations: {}",
        serde_json::to_string_pretty(&results["violations"]).unwrap_or_default()
    );
    assert!(results["faults_injected"].as_u64().unwrap_or(0) >= 1);
    assert!(results["check"]["ok"].as_u64().unwrap_or(0) > 0);
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_seeded_run_finds_no_violation() {
    assert_clean_run(ChaosArgs {
        duration: Duration::from_secs(25),
        seed: Some(20_261_128),
        fault_interval: Duration::from_secs(2),
        ..ChaosArgs::default()
    })
    .await;
}

/// The secure configuration a deployment runs: TLS on every connection (mutual between
/// nodes) and every client call authenticated with a tenant API key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_run_with_tls_and_auth_finds_no_violation() {
    let results = assert_clean_run(ChaosArgs {
        duration: Duration::from_secs(20),
        seed: Some(20_261_205),
        fault_interval: Duration::from_secs(2),
        tls: true,
        auth: true,
        ..ChaosArgs::default()
    })
    .await;
    // The consumer group and the pipeline ran with the key too.
    assert!(
        results["group"]["deliveries"].as_u64().unwrap_or(0) > 0,
        "{}",
        results["group"]
    );
    assert!(
        results["pipeline"]["completed"].as_u64().unwrap_or(0) > 0,
        "{}",
        results["pipeline"]
    );
}

/// A run with any flags, for long runs before `junction chaos` is wired into the binary:
/// `JUNCTION_CHAOS_ARGS="--duration 30m --seed 7" cargo test --workspace --test smoke -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long; flags come from JUNCTION_CHAOS_ARGS"]
async fn configured_run() {
    use clap::Parser;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        args: ChaosArgs,
    }
    let flags = std::env::var("JUNCTION_CHAOS_ARGS").unwrap_or_default();
    let mut argv = vec!["chaos".to_owned()];
    argv.extend(flags.split_whitespace().map(str::to_owned));
    let mut args = Flags::parse_from(argv).args;
    if args.junction_bin.is_none() {
        args.junction_bin = Some(junction_bin());
    }
    let passed = junction_chaos::run(args)
        .await
        .expect("the chaos run could be carried out");
    assert!(
        passed,
        "the chaos run found violations (see the summary above)"
    );
}
