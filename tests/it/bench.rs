//! `junction bench` as a user runs it: the binary spawns its own three nodes, loads them
//! through the SDK producer (or the raw RPC) and reports what was acknowledged.

use std::process::Command;

/// Runs `junction bench produce` with `extra` flags and returns its JSON report.
fn bench(dir: &std::path::Path, name: &str, extra: &[&str]) -> serde_json::Value {
    bench_workload(dir, "produce", name, extra)
}

/// Runs `junction bench <workload>` (3,000 messages) with `extra` flags and returns its JSON
/// report.
fn bench_workload(
    dir: &std::path::Path,
    workload: &str,
    name: &str,
    extra: &[&str],
) -> serde_json::Value {
    let json = dir.join(format!("{name}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_junction"))
        .args(["bench", workload, "--spawn", "3", "--quiet"])
        .args([
            "--messages",
            "3000",
            "--batch-size",
            "100",
            "--in-flight",
            "4",
        ])
        .args(["--partitions", "3", "--replication-factor", "3"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .expect("run junction bench");
    assert!(
        out.status.success(),
        "bench {extra:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read(&json).expect("the bench wrote its report");
    serde_json::from_slice(&text).expect("the report is JSON")
}

#[test]
fn bench_measures_the_sdk_producer_and_the_raw_rpc() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, extra, client, idempotent) in [
        ("sdk-keyed", &["--keys", "50"][..], "sdk", true),
        ("sdk-alo", &["--at-least-once"][..], "sdk", false),
        ("raw", &["--raw-grpc"][..], "raw-grpc", true),
        // The secure configuration: TLS everywhere, every call with a tenant API key.
        ("secure-sdk", &["--tls", "--auth"][..], "sdk", true),
        (
            "secure-raw",
            &["--tls", "--auth", "--raw-grpc"][..],
            "raw-grpc",
            true,
        ),
    ] {
        let report = bench(dir.path(), name, extra);
        assert_eq!(report["messages"], 3000, "{name}: {report}");
        assert_eq!(report["errors"], 0, "{name}: {report}");
        assert_eq!(report["client"], client, "{name}");
        assert_eq!(report["idempotent"], idempotent, "{name}");
        let secure = name.starts_with("secure");
        assert_eq!(report["tls"], secure, "{name}");
        assert_eq!(report["authenticated"], secure, "{name}");
        assert!(
            report["latency_ms"]["p50"]
                .as_f64()
                .is_some_and(|p| p > 0.0),
            "{name}: no latency recorded: {report}"
        );
    }
}

/// The like-for-like consumption workload: the bench writes the messages, then one member of
/// a fresh group takes and acks every one (with a window smaller than the station, so the
/// acks must be replicated for delivery to go on).
#[test]
fn bench_consume_takes_and_acks_every_stored_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = bench_workload(
        dir.path(),
        "consume",
        "consume",
        &["--member-in-flight", "200"],
    );
    assert_eq!(report["workload"], "consume", "{report}");
    assert_eq!(report["messages"], 3000, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(
        report["msgs_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "no throughput: {report}"
    );
    assert!(
        report["server_cpu_us_per_msg"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "no server CPU measured: {report}"
    );
    assert!(
        report["write_amplification"].is_null(),
        "a consume run reports no write amplification: {report}"
    );
}

#[test]
fn bench_refuses_flags_the_sdk_cannot_honour() {
    let out = Command::new(env!("CARGO_BIN_EXE_junction"))
        .args([
            "bench",
            "produce",
            "--via-any-node",
            "--server",
            "127.0.0.1:1",
        ])
        .output()
        .expect("run junction bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--via-any-node needs --raw-grpc"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_junction"))
        .args(["bench", "produce", "--auth", "--server", "127.0.0.1:1"])
        .output()
        .expect("run junction bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("for --server give --token"), "{err}");
}

/// I4 as a user runs it (short), in the secure configuration (TLS, each tenant calling with
/// its own producer key): the noisy tenant is held near its quota and refused the rest, the
/// quiet one loses nothing; the report carries both phases of each round.
#[test]
fn bench_isolation_reports_both_tenants() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("i4.json");
    let out = Command::new(env!("CARGO_BIN_EXE_junction"))
        .args(["bench", "isolation", "--spawn", "3", "--quiet"])
        .args(["--duration", "3s", "--rounds", "1", "--rate", "500"])
        .args(["--noisy-quota", "200", "--batch-size", "20"])
        .args(["--tls", "--auth"])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run junction bench isolation");
    assert!(
        out.status.success(),
        "bench isolation failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("JSON");
    assert_eq!(report["tls"], true, "{report}");
    assert_eq!(report["authenticated"], true, "{report}");
    let round = &report["rounds"][0];
    assert_eq!(round["alone"]["errors"], 0, "{report}");
    assert_eq!(round["contended"]["errors"], 0, "{report}");
    assert!(
        round["noisy_refused_messages"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "the noisy tenant was never refused: {report}"
    );
    // Offered 2,000 msg/s against a quota of 200: what got through is near the quota (one
    // second of burst over three, and a batch of debt per leader), far below the offer.
    let admitted = round["noisy_admitted"].as_f64().expect("admitted");
    assert!(admitted < 600.0, "{admitted} msg/s admitted: {report}");
    assert!(
        round["alone"]["throughput"]
            .as_f64()
            .is_some_and(|t| t > 0.0),
        "{report}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("I4 tenant isolation"),
        "no table printed"
    );
}
