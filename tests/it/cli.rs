//! The `junction` command line, run as the real binary (`--server`, stdin, stdout) against
//! real nodes: stations, tenants, produce, read (plain, JSON, follow) and cluster status.

use std::process::Stdio;
use std::time::Duration;

use junction_types::partitioner::partition_for_key;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::harness::{TestCluster, keyed, read_all, wait_until};

/// How long one CLI command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

pub(crate) struct Run {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

fn junction(cluster: &TestCluster, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_junction"));
    cmd.args(args)
        .args(["--server", &cluster.addrs().join(",")])
        .env_remove("JUNCTION_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs one command to completion, feeding `input` on stdin.
async fn run_with_input(cluster: &TestCluster, args: &[&str], input: &[u8]) -> Run {
    let mut cmd = junction(cluster, args);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn junction");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await.expect("write stdin");
        // Dropping stdin closes it: end of input.
    });
    let out = tokio::time::timeout(COMMAND_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("junction {args:?} did not finish in {COMMAND_LIMIT:?}"))
        .expect("wait for junction");
    writer.await.expect("stdin writer");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub(crate) async fn run(cluster: &TestCluster, args: &[&str]) -> Run {
    run_with_input(cluster, args, b"").await
}

/// Runs a command that must succeed; returns its stdout.
pub(crate) async fn ok(cluster: &TestCluster, args: &[&str]) -> String {
    let r = run(cluster, args).await;
    assert!(r.ok, "junction {args:?} failed: {}", r.stderr);
    r.stdout
}

pub(crate) async fn ok_json(cluster: &TestCluster, args: &[&str]) -> Value {
    let out = ok(cluster, args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("junction {args:?}: {e}: {out}"))
}

/// Splits a table line into its cells (columns are separated by two or more spaces).
pub(crate) fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The table row whose first cell is `first`.
pub(crate) fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .map(cells)
        .find(|c| c.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{text}"))
}

/// Station and tenant administration, in text and JSON, checked against the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn station_and_tenant_commands() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();

    assert_eq!(
        ok(&cluster, &["tenant", "create", "acme"]).await,
        "created tenant acme\n"
    );
    let tenants = ok(&cluster, &["tenant", "list"]).await;
    assert!(tenants.lines().any(|l| l == "acme"), "{tenants}");
    assert_eq!(
        client.list_tenants().await.expect("list"),
        tenants.lines().map(str::to_owned).collect::<Vec<_>>()
    );
    let json = ok_json(&cluster, &["tenant", "list", "--json"]).await;
    assert!(
        json.as_array()
            .expect("array")
            .contains(&Value::from("acme")),
        "{json}"
    );

    // Quotas: set in text, read back in JSON and from the cluster, cleared, bad input refused.
    let out = ok(
        &cluster,
        &[
            "tenant",
            "quota",
            "set",
            "acme",
            "--produce-bytes-per-sec",
            "10M",
            "--stations",
            "20",
        ],
    )
    .await;
    assert!(out.starts_with("tenant acme\n"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["produce-bytes-per-sec", "10485760"]),
        "{out}"
    );
    let json = ok_json(&cluster, &["tenant", "quota", "get", "acme", "--json"]).await;
    assert_eq!(
        json["limits"]["produce-bytes-per-sec"], 10_485_760,
        "{json}"
    );
    assert_eq!(json["limits"]["stations"], 20, "{json}");
    assert_eq!(json["used"]["stations"], 0, "{json}");
    let q = client.get_quota("acme").await.expect("quota");
    assert_eq!(q.limits.and_then(|l| l.stations), Some(20));
    ok(
        &cluster,
        &["tenant", "quota", "set", "acme", "--clear", "stations"],
    )
    .await;
    let json = ok_json(&cluster, &["tenant", "quota", "get", "acme", "--json"]).await;
    assert!(json["limits"].get("stations").is_none(), "{json}");
    let zero = run(
        &cluster,
        &["tenant", "quota", "set", "acme", "--streams", "0"],
    )
    .await;
    assert!(!zero.ok, "{}", zero.stdout);
    assert!(zero.stderr.contains("quota of 0"), "{}", zero.stderr);
    let junk = run(
        &cluster,
        &["tenant", "quota", "set", "acme", "--stored-bytes", "lots"],
    )
    .await;
    assert!(!junk.ok);
    assert!(junk.stderr.contains("is not a number"), "{}", junk.stderr);

    let out = ok(
        &cluster,
        &[
            "station",
            "create",
            "acme/orders",
            "--partitions",
            "3",
            "--max-message-bytes",
            "1000",
        ],
    )
    .await;
    assert_eq!(
        out,
        "created station acme/orders (3 partitions, replication factor 3)\n"
    );
    let out = ok(
        &cluster,
        &[
            "station",
            "create",
            "demo",
            "--partitions",
            "2",
            "--replication-factor",
            "1",
        ],
    )
    .await;
    assert!(
        out.starts_with("created station ")
            && out.contains("demo (2 partitions, replication factor 1)"),
        "{out}"
    );
    let again = run(&cluster, &["station", "create", "demo"]).await;
    assert!(!again.ok, "creating an existing station fails");
    assert!(again.stderr.contains("AlreadyExists"), "{}", again.stderr);

    // List: a table with both stations, and JSON filtered by tenant.
    let list = ok(&cluster, &["station", "list"]).await;
    assert_eq!(
        cells(list.lines().next().expect("header")),
        [
            "STATION",
            "PARTITIONS",
            "REPLICATION",
            "MAX MESSAGE",
            "CREATED"
        ]
    );
    let orders = row(&list, "acme/orders");
    assert_eq!(orders[1..4], ["3", "3", "1000 B"]);
    assert!(orders[4].ends_with(" UTC"), "{orders:?}");
    let demo = list
        .lines()
        .map(cells)
        .find(|c| c[0].ends_with("demo"))
        .expect("demo row");
    // Without --max-message-bytes the station gets the server's maximum.
    let demo_info = client.describe_station("demo").await.expect("describe");
    assert!(demo_info.max_message_bytes > 0);
    assert_eq!(
        demo[1..4],
        ["2", "1", &format!("{} B", demo_info.max_message_bytes)]
    );
    let json = ok_json(&cluster, &["station", "list", "--tenant", "acme", "--json"]).await;
    let stations = json.as_array().expect("array");
    assert_eq!(stations.len(), 1, "{json}");
    assert_eq!(stations[0]["tenant"], "acme");
    assert_eq!(stations[0]["name"], "orders");
    assert_eq!(stations[0]["partitions"], 3);
    assert_eq!(stations[0]["replication_factor"], 3);
    assert_eq!(stations[0]["max_message_bytes"], 1000);

    // Describe agrees with the SDK.
    let info = client
        .describe_station("acme/orders")
        .await
        .expect("describe");
    let text = ok(&cluster, &["station", "describe", "acme/orders"]).await;
    assert_eq!(row(&text, "station"), ["station", "acme/orders"]);
    assert_eq!(row(&text, "partitions"), ["partitions", "3"]);
    assert_eq!(row(&text, "max message"), ["max message", "1000 B"]);
    assert_eq!(
        cells(
            text.lines()
                .find(|l| l.starts_with("PARTITION"))
                .expect("partition table")
        ),
        [
            "PARTITION",
            "LEADER",
            "REPLICAS",
            "START OFFSET",
            "NEXT OFFSET",
            "MESSAGES",
            "BYTES",
            "PRODUCERS",
            "DEDUP IDS"
        ]
    );
    for p in &info.partition_info {
        let r = row(&text, &p.partition.to_string());
        let mut replicas = p.replicas.clone();
        replicas.sort_unstable();
        let listed: Vec<u64> = r[2]
            .split(',')
            .map(|x| x.parse().expect("replica id"))
            .collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, replicas, "{r:?}");
        assert!(r[1] == "-" || replicas.contains(&r[1].parse().expect("leader id")));
        assert_eq!(r[3..], ["0", "0", "0", "0", "0", "0 (0 B)"]);
    }
    let json = ok_json(&cluster, &["station", "describe", "acme/orders", "--json"]).await;
    assert_eq!(json["tenant"], "acme");
    assert_eq!(json["name"], "orders");
    assert_eq!(json["created_at_ms"], info.created_at_ms);
    let parts = json["partition_info"].as_array().expect("partitions");
    assert_eq!(parts.len(), 3);
    for (p, want) in parts.iter().zip(&info.partition_info) {
        assert_eq!(p["partition"], want.partition);
        assert_eq!(p["group_id"], want.group_id);
        assert_eq!(p["replicas"].as_array().expect("replicas").len(), 3);
        assert_eq!(p["next_offset"], 0);
    }

    // Delete; describing it afterwards fails with NOT_FOUND, and the SDK agrees.
    assert_eq!(
        ok(&cluster, &["station", "delete", "acme/orders"]).await,
        "deleted station acme/orders\n"
    );
    let gone = run(&cluster, &["station", "describe", "acme/orders"]).await;
    assert!(!gone.ok);
    assert!(gone.stderr.contains("NotFound"), "{}", gone.stderr);
    let err = client
        .describe_station("acme/orders")
        .await
        .expect_err("deleted");
    assert!(err.is_not_found(), "{err}");
    let json = ok_json(&cluster, &["station", "list", "--json"]).await;
    assert_eq!(json.as_array().expect("array").len(), 1, "{json}");
    cluster.shutdown().await;
}

/// `produce` with `--key-sep TAB` and with `--key` (and headers) stores what the lines say,
/// where the keys say; `read` prints it back as text and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn produce_and_read() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    ok(
        &cluster,
        &["station", "create", "demo", "--partitions", "2"],
    )
    .await;

    let input: String = (0..300)
        .map(|i| format!("k{}\tline {i}\n", i % 7))
        .collect();
    let r = run_with_input(
        &cluster,
        &["produce", "demo", "--key-sep", "TAB"],
        input.as_bytes(),
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "acknowledged 300 messages\n");
    let mut stored = [
        read_all(&client, "demo", 0).await,
        read_all(&client, "demo", 1).await,
    ];
    assert_eq!(stored.iter().map(Vec::len).sum::<usize>(), 300);
    assert!(stored.iter().all(|p| !p.is_empty()), "keys spread");
    for (p, msgs) in (0u32..).zip(&stored) {
        for m in msgs {
            let key = m.key.as_deref().expect("a key");
            assert_eq!(partition_for_key(key, 2), p);
            let payload = std::str::from_utf8(&m.payload).expect("utf-8");
            let i: usize = payload
                .strip_prefix("line ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("payload {payload:?}"));
            assert_eq!(key, format!("k{}", i % 7).as_bytes(), "the key of line {i}");
        }
        // Lines of one key keep their order.
        let order: Vec<usize> = msgs
            .iter()
            .filter(|m| m.key.as_deref() == msgs[0].key.as_deref())
            .map(|m| {
                m.payload[5..]
                    .iter()
                    .fold(0, |n, d| n * 10 + (d - b'0') as usize)
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }

    // --key: one key for every line (CRLF endings trimmed), plus a header.
    let r = run_with_input(
        &cluster,
        &["produce", "demo", "--key", "fixed", "--header", "src=cli"],
        b"x1\r\nx2\nx3\n",
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "acknowledged 3 messages\n");
    let p = partition_for_key(b"fixed", 2);
    let before = stored[p as usize].len();
    stored[p as usize] = read_all(&client, "demo", p).await;
    let added = &stored[p as usize][before..];
    assert_eq!(added.len(), 3);
    for (m, want) in added.iter().zip(["x1", "x2", "x3"]) {
        assert_eq!(m.key.as_deref(), Some(&b"fixed"[..]));
        assert_eq!(&m.payload[..], want.as_bytes());
        assert_eq!(m.headers.len(), 1);
        assert_eq!(m.headers[0].key, "src");
        assert_eq!(m.headers[0].value, b"cli");
    }

    // read: every partition from the earliest, one after the other, and --count across them.
    let text = ok(&cluster, &["read", "demo", "--from", "earliest"]).await;
    let want: Vec<String> = stored
        .iter()
        .flatten()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), want);
    let text = ok(
        &cluster,
        &["read", "demo", "--from", "earliest", "--count", "5"],
    )
    .await;
    assert_eq!(text.lines().collect::<Vec<_>>(), want[..5]);
    let text = ok(
        &cluster,
        &[
            "read",
            "demo",
            "--partition",
            "1",
            "--from",
            "3",
            "--count",
            "2",
        ],
    )
    .await;
    let expect: Vec<String> = stored[1][3..5]
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), expect);

    // --json: one object per line with the stored fields.
    let text = ok(
        &cluster,
        &["read", "demo", "--partition", &p.to_string(), "--json"],
    )
    .await;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), stored[p as usize].len());
    for (j, m) in lines.iter().zip(&stored[p as usize]) {
        assert_eq!(j["partition"], p);
        assert_eq!(j["offset"], m.offset);
        assert_eq!(j["timestamp_ms"], m.timestamp_ms);
        assert!(m.timestamp_ms > 0);
        assert_eq!(
            j["key"],
            String::from_utf8_lossy(m.key.as_deref().expect("key")).as_ref()
        );
        assert_eq!(j["payload"], String::from_utf8_lossy(&m.payload).as_ref());
    }
    let last = lines.last().expect("a line");
    assert_eq!(last["payload"], "x3");
    assert_eq!(last["headers"], serde_json::json!({"src": "cli"}));
    assert_eq!(lines[0]["headers"], serde_json::json!({}));

    // Producing to a station that does not exist fails, saying so.
    let r = run_with_input(&cluster, &["produce", "nope"], b"a\nb\n").await;
    assert!(!r.ok);
    assert!(r.stderr.contains("failed"), "{}", r.stderr);
    assert!(r.stderr.contains("NotFound"), "{}", r.stderr);
    cluster.shutdown().await;
}

/// `read --follow` prints what is stored, then new messages as they are produced, until it
/// is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_follow_prints_new_messages() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("live", 2, 3).await.expect("create");
    client
        .produce(
            "live",
            vec![
                junction_proto::v1::Message {
                    partition: Some(0),
                    ..keyed("a", "old-0")
                },
                junction_proto::v1::Message {
                    partition: Some(1),
                    ..keyed("b", "old-1")
                },
            ],
        )
        .await
        .expect("produce");

    let mut child = junction(
        &cluster,
        &["read", "live", "--from", "earliest", "--follow", "--json"],
    )
    .spawn()
    .expect("spawn read --follow");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next_line = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line in time")
            .expect("read stdout")
            .expect("still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    // What was stored first (the two partitions in either order): it is following now.
    let mut old: Vec<String> = Vec::new();
    for _ in 0..2 {
        old.push(
            next_line().await["payload"]
                .as_str()
                .expect("text")
                .to_owned(),
        );
    }
    old.sort();
    assert_eq!(old, ["old-0", "old-1"]);

    let mut produced = Vec::new();
    for i in 0..10u32 {
        let msg = junction_proto::v1::Message {
            partition: Some(i % 2),
            ..keyed("k", format!("new-{i}"))
        };
        let pos = client.produce("live", vec![msg]).await.expect("produce");
        produced.push((pos[0].partition, pos[0].offset, format!("new-{i}")));
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let j = next_line().await;
        // A retried first produce (at least once, under load) may have stored old-* twice.
        if j["payload"].as_str().is_some_and(|p| p.starts_with("old-")) {
            continue;
        }
        seen.push((
            u32::try_from(j["partition"].as_u64().expect("partition")).expect("u32"),
            j["offset"].as_u64().expect("offset"),
            j["payload"].as_str().expect("payload").to_owned(),
        ));
    }
    seen.sort();
    produced.sort();
    assert_eq!(seen, produced);

    child.start_kill().expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(!status.success(), "killed, not finished");
    // Nothing else was printed.
    let rest = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("stdout closes")
        .expect("read stdout");
    assert_eq!(rest, None);
    cluster.shutdown().await;
}

/// `cluster status` shows the metadata leader, every node (a stopped one as not alive) and
/// every partition, in text and JSON, as the cluster reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_status_text_and_json() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let s = client.create_station("stat", 2, 3).await.expect("create");
    client
        .produce(
            "stat",
            vec![junction_proto::v1::Message {
                partition: Some(1),
                ..keyed("k", "v")
            }],
        )
        .await
        .expect("produce");
    let leader = cluster.wait_for_metadata_leader().await;

    let id = cluster.cluster_id().await;
    let text = ok(&cluster, &["cluster", "status"]).await;
    let mut lines = text.lines();
    let first = lines.next().expect("a line");
    assert!(
        first.starts_with(&format!("cluster: {id} (format level ")),
        "{text}"
    );
    let second = lines.next().expect("a line");
    assert!(
        second.starts_with(&format!("metadata leader: node {leader} (term ")),
        "{text}"
    );
    assert_eq!(
        cells(
            text.lines()
                .find(|l| l.starts_with("NODE"))
                .expect("node table")
        ),
        ["NODE", "ADDRESS", "ALIVE", "REPLICAS", "LEADERS"]
    );
    for id in 1..=3u64 {
        let r = row(&text, &id.to_string());
        assert_eq!(r[1], cluster.addr(id));
        assert_eq!(r[2], "yes");
        assert_eq!(r[3], "2", "node {id} holds a replica of both partitions");
    }
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(cells)
        .filter(|c| c.first() == Some(&"default/stat"))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0][1], "0");
    assert_eq!(rows[1][1], "1");
    assert_eq!(rows[0][4], "0");
    assert_eq!(rows[1][4], "1");

    let json = ok_json(&cluster, &["cluster", "status", "--json"]).await;
    assert_eq!(json["metadata_leader"], leader);
    assert!(json["metadata_term"].as_u64().expect("term") >= 1);
    let nodes = json["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        let id = n["id"].as_u64().expect("id");
        assert_eq!(n["addr"], cluster.addr(id));
        assert_eq!(n["alive"], true);
        assert_eq!(n["partition_replicas"], 2);
    }
    let leaders: u64 = nodes
        .iter()
        .map(|n| n["partition_leaders"].as_u64().expect("leaders"))
        .sum();
    assert_eq!(leaders, 2, "one leader per partition");
    let stations = json["stations"].as_array().expect("stations");
    let stat = stations
        .iter()
        .find(|x| x["name"] == "stat")
        .expect("the station");
    let parts = stat["partition_info"].as_array().expect("partitions");
    for (p, want) in parts.iter().zip(&s.partition_info) {
        assert_eq!(p["group_id"], want.group_id);
        assert!(p["leader"].is_u64(), "{p}");
    }
    assert_eq!(parts[1]["next_offset"], 1);

    // A scrub of the healthy cluster: every replica checked on every node, nothing corrupt
    // (exit status 0).
    let scrub = ok_json(&cluster, &["cluster", "scrub", "--json"]).await;
    let nodes = scrub["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{scrub}");
    for n in nodes {
        assert_eq!(n["error"], "", "{n}");
        let replicas = n["replicas"].as_array().expect("replicas");
        assert_eq!(replicas.len(), 2, "{n}");
        for r in replicas {
            assert_eq!(r["action"], "ok", "{r}");
            assert_eq!(r["corrupt_records"], 0, "{r}");
            assert_eq!(r["station"], "default/stat", "{r}");
        }
    }
    let text = ok(&cluster, &["cluster", "scrub"]).await;
    assert!(
        text.contains("ACTION") && text.contains("default/stat"),
        "{text}"
    );

    // A stopped node shows as not alive once the cluster notices.
    let victim = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.stop(victim).await;
    wait_until(
        Duration::from_secs(20),
        "the stopped node to be reported dead",
        || async {
            let s = client.cluster_status().await.ok()?;
            s.nodes
                .iter()
                .any(|n| n.id == victim && !n.alive)
                .then_some(())
        },
    )
    .await;
    let text = ok(&cluster, &["cluster", "status"]).await;
    assert_eq!(row(&text, &victim.to_string())[2], "no", "{text}");
    let json = ok_json(&cluster, &["cluster", "status", "--json"]).await;
    let dead = json["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == victim)
        .expect("victim listed");
    assert_eq!(dead["alive"], false);
    // Reading through the CLI still works with the node down.
    let out = ok(&cluster, &["read", "stat", "--partition", "1"]).await;
    assert_eq!(out, "v\n");
    cluster.shutdown().await;
}

/// `consume` prints and acknowledges; `group` and `dls` show and move what the cluster holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_group_commands() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("work", 2, 3).await.expect("station");
    let lines: String = (0..10).map(|i| format!("job-{i}\n")).collect();
    let r = run_with_input(&cluster, &["produce", "work"], lines.as_bytes()).await;
    assert!(r.ok, "{}", r.stderr);

    // Six now, as JSON with delivery counts; the group remembers them.
    let out = ok(
        &cluster,
        &["consume", "work", "--group", "g", "--count", "6", "--json"],
    )
    .await;
    let first: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(first.len(), 6);
    assert!(first.iter().all(|v| v["delivery_count"] == 1));
    // The rest: exactly the four not printed before.
    let out = ok(
        &cluster,
        &["consume", "work", "--group", "g", "--idle-exit", "2"],
    )
    .await;
    let mut all: Vec<String> = out.lines().map(str::to_owned).collect();
    all.extend(
        first
            .iter()
            .map(|v| v["payload"].as_str().expect("payload").to_owned()),
    );
    all.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    want.sort();
    assert_eq!(all, want);

    let d = ok_json(&cluster, &["group", "describe", "work", "g", "--json"]).await;
    let lag: u64 = d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["lag"].as_u64().expect("lag"))
        .sum();
    assert_eq!(lag, 0, "{d}");
    let text = ok(&cluster, &["group", "list", "work"]).await;
    assert_eq!(row(&text, "default/work")[1], "g");

    // Seek back to earliest: everything comes again.
    ok(&cluster, &["group", "seek", "work", "g", "earliest"]).await;
    let d = ok_json(&cluster, &["group", "describe", "work", "g", "--json"]).await;
    let lag: u64 = d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["lag"].as_u64().expect("lag"))
        .sum();
    assert_eq!(lag, 10, "{d}");
    ok(&cluster, &["group", "clone", "work", "g", "g2"]).await;
    ok(&cluster, &["group", "delete", "work", "g2"]).await;
    let gone = run(&cluster, &["group", "describe", "work", "g2"]).await;
    assert!(
        !gone.ok && gone.stderr.contains("does not exist"),
        "{}",
        gone.stderr
    );

    // Nothing dead-lettered yet.
    assert_eq!(ok(&cluster, &["dls", "list", "work"]).await, "");
    let out = ok(&cluster, &["dls", "resend", "work"]).await;
    assert!(out.starts_with("resent 0 dead letter(s)"), "{out}");
    cluster.shutdown().await;
}

/// `consume --exec` runs a command per message, several at once in a key-shared group,
/// acks what exits 0 and nacks the rest; each key's messages still run one at a time, in
/// order. A parking group's poison key shows in `group parked` and is skipped with
/// `group skip`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consume_exec_runs_a_command_per_message_and_parked_keys_are_managed() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_station("jobs", 2, 3).await.expect("station");
    let lines: String = (0..40).map(|i| format!("k{}\tjob-{i}\n", i % 4)).collect();
    let r = run_with_input(
        &cluster,
        &["produce", "jobs", "--key-sep", "TAB"],
        lines.as_bytes(),
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().display().to_string();
    // Each command appends its payload to its key's file, slowly enough that four run at
    // once; a command that finds its key's lock held reports an overlap.
    let cmd = format!(
        "mkdir {out}/lock-$JUNCTION_KEY 2>/dev/null || echo overlap >> {out}/overlaps; \
         cat >> {out}/$JUNCTION_KEY; echo >> {out}/$JUNCTION_KEY; sleep 0.05; \
         rmdir {out}/lock-$JUNCTION_KEY"
    );
    let r = run(
        &cluster,
        &[
            "consume",
            "jobs",
            "--group",
            "exec",
            "--mode",
            "key_shared",
            "--exec",
            &cmd,
            "--concurrency",
            "4",
            "--count",
            "40",
        ],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("40 message(s) handled"), "{}", r.stderr);
    assert!(
        !dir.path().join("overlaps").exists(),
        "two commands held one key at once"
    );
    for k in 0..4 {
        let got = std::fs::read_to_string(dir.path().join(format!("k{k}"))).expect("key file");
        let want: Vec<String> = (0..40)
            .filter(|i| i % 4 == k)
            .map(|i| format!("job-{i}"))
            .collect();
        assert_eq!(got.lines().collect::<Vec<_>>(), want, "key k{k} in order");
    }

    // A parking group: the command fails for one key; it parks, the rest are acked.
    let r = run(
        &cluster,
        &[
            "consume",
            "jobs",
            "--group",
            "strict",
            "--on-max-deliveries",
            "park",
            "--max-deliveries",
            "1",
            "--exec",
            "test \"$JUNCTION_KEY\" != k2",
            "--retry-delay-ms",
            "0",
            "--count",
            "30",
        ],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let parked = wait_until(Duration::from_secs(15), "k2 parked", || async {
        let v = ok_json(&cluster, &["group", "parked", "jobs", "strict", "--json"]).await;
        (v.as_array().map(Vec::len) == Some(1)).then_some(v)
    })
    .await;
    assert_eq!(parked[0]["key"], "k2", "{parked}");
    assert_eq!(parked[0]["head"]["payload"], "job-2", "{parked}");
    let p = parked[0]["partition"]
        .as_u64()
        .expect("partition")
        .to_string();
    let d = ok(&cluster, &["group", "describe", "jobs", "strict"]).await;
    assert!(d.contains("then park"), "{d}");
    let dj = ok_json(&cluster, &["group", "describe", "jobs", "strict", "--json"]).await;
    assert_eq!(dj["settings"]["on_max_deliveries"], "park", "{dj}");
    let parked_total: u64 = dj["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["parked_keys"].as_u64().expect("parked_keys"))
        .sum();
    assert_eq!(parked_total, 1, "{dj}");
    let not = run(
        &cluster,
        &[
            "group",
            "resume",
            "jobs",
            "strict",
            "--partition",
            &p,
            "--key",
            "k1",
        ],
    )
    .await;
    assert!(
        !not.ok && not.stderr.contains("not parked"),
        "{}",
        not.stderr
    );
    let skipped = ok(
        &cluster,
        &[
            "group",
            "skip",
            "jobs",
            "strict",
            "--partition",
            &p,
            "--key",
            "k2",
        ],
    )
    .await;
    assert!(skipped.contains("skipped"), "{skipped}");
    cluster.shutdown().await;
}

/// Exactly-once from the command line: a station with a dedup window, `produce
/// --msg-id-header` run twice on the same input stores each line once, and `station describe`
/// shows the window, the producers and the ids held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn produce_twice_with_message_ids_stores_once() {
    let cluster = TestCluster::start(3).await;
    ok(
        &cluster,
        &[
            "station",
            "create",
            "ledger",
            "--partitions",
            "1",
            "--dedup-window",
            "10m",
        ],
    )
    .await;
    let input = b"debit 10\ncredit 5\ndebit 2\n";
    for _ in 0..2 {
        let r = run_with_input(
            &cluster,
            &["produce", "ledger", "--msg-id-header", "import-42"],
            input,
        )
        .await;
        assert!(r.ok, "{}", r.stderr);
        assert_eq!(r.stdout, "acknowledged 3 messages\n");
    }
    let stored = read_all(&cluster.client(), "ledger", 0).await;
    let lines: Vec<_> = stored
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(lines, vec!["debit 10", "credit 5", "debit 2"]);
    let describe = ok(&cluster, &["station", "describe", "ledger"]).await;
    assert!(
        describe.contains("window 10m (at most 1000000 ids per partition)"),
        "{describe}"
    );
    let json = ok_json(&cluster, &["station", "describe", "ledger", "--json"]).await;
    assert_eq!(json["policy"]["dedup_window_ms"], 600_000);
    assert_eq!(json["partition_info"][0]["dedup_ids"], 3, "{json}");
    assert_eq!(json["partition_info"][0]["producers"], 2, "{json}");
    // Turning the window off; bad values are refused with the reason.
    ok(
        &cluster,
        &["station", "update", "ledger", "--dedup-window", "none"],
    )
    .await;
    let json = ok_json(&cluster, &["station", "describe", "ledger", "--json"]).await;
    assert!(json["policy"]["dedup_window_ms"].is_null(), "{json}");
    let bad = run(
        &cluster,
        &["station", "update", "ledger", "--dedup-window", "8d"],
    )
    .await;
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("between 1 ms and 7 days"),
        "{}",
        bad.stderr
    );
    // Without idempotence the same lines are stored again (no window now).
    let r = run_with_input(&cluster, &["produce", "ledger", "--no-idempotent"], input).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(read_all(&cluster.client(), "ledger", 0).await.len(), 6);
    cluster.shutdown().await;
}
