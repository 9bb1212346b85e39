//! The REST API through a real cluster: every route over real HTTP on each node's HTTP port,
//! problem documents for bad input, consuming with a fetch on one node and an ack on another,
//! an `Idempotency-Key` retried after the node that took the first attempt crashed, and the
//! OpenAPI document checked against the routes the nodes serve.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{TestCluster, wait_until};

/// A reply as the test reads it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a problem document with this status (and reason, when given).
    #[track_caller]
    pub fn problem(&self, status: u16, reason: Option<&str>) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert!(
            p["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "a problem says what went wrong: {p}"
        );
        if let Some(r) = reason {
            assert_eq!(p["reason"], r, "{p}");
        }
        p
    }

    #[track_caller]
    pub fn ok(&self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "status {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).await.expect("write head");
    s.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .expect("chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + size]);
        b = &b[end + 2 + size + 2..];
    }
}

/// Sends a request again after a 503 (no metadata or partition leader yet, a node stopping),
/// after its `Retry-After`, as a REST client should, for up to 30 s. A produce is sent once:
/// without an idempotency key a retry could store it twice, so its 503 is the test's to see.
async fn with_retry(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    let headers: &[(&str, &str)] = match body {
        Some(_) => &[("Content-Type", "application/json")],
        None => &[],
    };
    let once = method == "POST" && path.ends_with("/messages");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = http(addr, method, path, headers, body).await;
        if r.status != 503 || once || tokio::time::Instant::now() >= deadline {
            return r;
        }
        let after = r
            .header("retry-after")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(1)
            .min(5);
        tokio::time::sleep(Duration::from_secs(after)).await;
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    with_retry(addr, "GET", path, None).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, body).await
}

pub async fn send(addr: SocketAddr, method: &str, path: &str, body: &Value) -> Reply {
    let bytes = serde_json::to_vec(body).expect("json");
    with_retry(addr, method, path, Some(&bytes)).await
}

const ST: &str = "/api/v1/stations/acme/orders";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stations_messages_and_bad_input_over_rest() {
    let cluster = TestCluster::start(3).await;
    let (a, b, c) = (
        cluster.http_addr(1),
        cluster.http_addr(2),
        cluster.http_addr(3),
    );

    // Cluster status, on any node.
    let status = get(b, "/api/v1/cluster").await.ok();
    assert_eq!(
        status["nodes"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    assert!(status["metadata_leader"].is_u64(), "{status}");
    let me = get(c, "/api/v1/whoami").await.ok();
    assert_eq!(me["auth_enabled"], false);

    // Tenants.
    assert_eq!(
        post(a, "/api/v1/tenants", &json!({"name": "acme"}))
            .await
            .status,
        201
    );
    post(b, "/api/v1/tenants", &json!({"name": "acme"}))
        .await
        .problem(409, None);
    // A tenant's limits and usage; a limit set, then cleared.
    let t = send(
        a,
        "PUT",
        "/api/v1/tenants/acme/quota",
        &json!({"set": {"stations": 5, "produce_messages_per_sec": 100000}}),
    )
    .await
    .ok();
    assert_eq!(t["limits"]["stations"], 5, "{t}");
    send(
        a,
        "PUT",
        "/api/v1/tenants/acme/quota",
        &json!({"set": {"stations": 0}}),
    )
    .await
    .problem(400, Some("INVALID_QUOTA"));
    let t = send(
        b,
        "PUT",
        "/api/v1/tenants/acme/quota",
        &json!({"clear": ["produce-messages-per-sec"]}),
    )
    .await
    .ok();
    assert!(t["limits"].get("produce_messages_per_sec").is_none(), "{t}");
    let t = get(c, "/api/v1/tenants/acme").await.ok();
    assert_eq!(t["tenant"], "acme");
    assert_eq!(t["stations_used"], 0);
    get(c, "/api/v1/tenants/nobody").await.problem(404, None);
    let tenants = get(c, "/api/v1/tenants").await.ok();
    assert!(
        tenants["tenants"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("acme"))),
        "{tenants}"
    );

    // Stations: create, list, describe, update.
    let created = post(
        a,
        "/api/v1/stations",
        &json!({"tenant": "acme", "name": "orders", "partitions": 2, "max_message_bytes": 2048,
                "policy": {"dedup_window_ms": 600000}}),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.json());
    let again = post(
        a,
        "/api/v1/stations",
        &json!({"tenant": "acme", "name": "orders"}),
    )
    .await;
    assert_eq!(again.problem(409, None)["code"], "ALREADY_EXISTS");
    let listed = get(b, "/api/v1/stations?tenant=acme").await.ok();
    assert_eq!(listed["stations"][0]["name"], "orders", "{listed}");
    let described = get(c, ST).await.ok();
    assert_eq!(
        described["partition_info"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(described["policy"]["dedup_window_ms"], 600000);
    let updated = send(
        b,
        "PUT",
        ST,
        &json!({"policy": {"dedup_window_ms": 600000, "retention": {"max_messages": 100000}}}),
    )
    .await
    .ok();
    assert_eq!(updated["policy"]["retention"]["max_messages"], 100000);

    // Produce text, JSON and bytes on node 2; read them back on node 3.
    let raw = [0xffu8, 0x00, 0xfe];
    let produced = post(
        b,
        &format!("{ST}/messages"),
        &json!({"messages": [
            {"key": "k1", "headers": {"source": "rest"}, "payload": "hello", "partition": 0},
            {"key": "k1", "json": {"a": 1, "b": [true, null]}, "partition": 0},
            {"base64": base64::engine::general_purpose::STANDARD.encode(raw), "partition": 0},
        ]}),
    )
    .await
    .ok();
    let positions = produced["positions"].as_array().expect("positions").clone();
    assert_eq!(positions.len(), 3);
    assert!(positions.iter().all(|p| p["duplicate"] == false));
    let read = get(c, &format!("{ST}/partitions/0/messages?from=0&max=10"))
        .await
        .ok();
    let msgs = read["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 3, "{read}");
    assert_eq!(msgs[0]["payload"], "hello");
    assert_eq!(msgs[0]["payload_encoding"], "text");
    assert_eq!(msgs[0]["key"], "k1");
    assert_eq!(msgs[0]["headers"]["source"], "rest");
    let json_payload: Value =
        serde_json::from_str(msgs[1]["payload"].as_str().expect("text")).expect("json text");
    assert_eq!(json_payload, json!({"a": 1, "b": [true, null]}));
    assert_eq!(msgs[2]["payload_encoding"], "base64");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(msgs[2]["payload"].as_str().expect("b64"))
            .expect("decodes"),
        raw
    );
    assert_eq!(read["high_watermark"], 3);
    // From a time: everything was produced after the epoch.
    let by_time = get(
        a,
        &format!("{ST}/partitions/0/messages?from_time_ms=1&max=1"),
    )
    .await
    .ok();
    assert_eq!(by_time["messages"][0]["offset"], 0);

    // An Idempotency-Key makes a retry (here on another node) store nothing again.
    let idem = |addr| async move {
        let body = serde_json::to_vec(&json!({"messages": [{"key": "k2", "payload": "once"}]}))
            .expect("json");
        http(
            addr,
            "POST",
            &format!("{ST}/messages"),
            &[
                ("Content-Type", "application/json"),
                ("Idempotency-Key", "order-77"),
            ],
            Some(&body),
        )
        .await
        .ok()
    };
    // A W3C traceparent on the request is stored with each message.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = http(
        b,
        "POST",
        &format!("{ST}/messages"),
        &[("Content-Type", "application/json"), ("traceparent", tp)],
        Some(br#"{"messages": [{"key": "t", "payload": "traced", "partition": 1}]}"#),
    )
    .await
    .ok();
    let at = traced["positions"][0]["offset"].as_u64().expect("offset");
    let back = get(c, &format!("{ST}/partitions/1/messages?from={at}&max=1"))
        .await
        .ok();
    assert_eq!(back["messages"][0]["headers"]["traceparent"], tp, "{back}");
    let first = idem(a).await;
    let retry = idem(c).await;
    assert_eq!(first["positions"][0]["duplicate"], false);
    assert_eq!(retry["positions"][0]["duplicate"], true);
    assert_eq!(
        first["positions"][0]["offset"],
        retry["positions"][0]["offset"]
    );
    assert_eq!(
        first["positions"][0]["partition"],
        retry["positions"][0]["partition"]
    );

    // Bad input: each a problem document a person can act on, never a 500.
    let msgs_path = format!("{ST}/messages");
    let p = http(
        a,
        "POST",
        &msgs_path,
        &[("Content-Type", "application/json")],
        Some(b"{\"messages\": [ {\"payload\": "),
    )
    .await;
    p.problem(400, None);
    http(
        a,
        "POST",
        &msgs_path,
        &[("Content-Type", "text/plain")],
        Some(b"hello"),
    )
    .await
    .problem(415, None);
    post(a, &msgs_path, &json!({"messages": [{"base64": "***"}]}))
        .await
        .problem(400, None);
    post(
        a,
        &msgs_path,
        &json!({"messages": [{"payload": "x", "json": 1}]}),
    )
    .await
    .problem(400, None);
    post(a, &msgs_path, &json!({"messages": []}))
        .await
        .problem(400, None);
    post(
        a,
        &msgs_path,
        &json!({"messages": [{"payload": "x", "colour": "red"}]}),
    )
    .await
    .problem(422, None);
    post(
        a,
        &msgs_path,
        &json!({"messages": [{"payload": "x".repeat(4096)}]}),
    )
    .await
    .problem(413, Some("MESSAGE_TOO_LARGE"));
    post(
        a,
        "/api/v1/stations/acme/nope/messages",
        &json!({"messages": [{"payload": "x"}]}),
    )
    .await
    .problem(404, None);
    post(a, "/api/v1/stations", &json!({"name": "bad name!"}))
        .await
        .problem(400, None);
    get(a, &format!("{ST}/partitions/0/messages?from=999"))
        .await
        .problem(400, None);
    get(a, &format!("{ST}/partitions/zero/messages"))
        .await
        .problem(400, None);
    get(a, &format!("{ST}/partitions/9/messages"))
        .await
        .problem(400, None);
    get(a, &format!("{ST}/partitions/0/messages?max=0"))
        .await
        .problem(400, None);
    get(a, "/api/v1/no/such/route").await.problem(404, None);
    get(a, "/api/v1/stations/acme/nope/dead-letters")
        .await
        .problem(404, None);
    let none = get(a, &format!("{ST}/dead-letters")).await.ok();
    assert_eq!(
        none["dead_letters"],
        json!([]),
        "no group, no dead letters: {none}"
    );
    http(a, "PATCH", "/api/v1/cluster", &[], None)
        .await
        .problem(405, None);

    // Delete.
    assert_eq!(http(b, "DELETE", ST, &[], None).await.status, 200);
    wait_until(
        Duration::from_secs(10),
        "the station to be gone",
        || async { (get(c, ST).await.status == 404).then_some(()) },
    )
    .await;
    cluster.shutdown().await;
}

/// Fetch on one node, ack on another; a stale receipt gets 409; a nacked message out of
/// deliveries is a dead letter the API lists and resends; groups are described, sought,
/// cloned and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consume_without_sticky_sessions_over_rest() {
    let cluster = TestCluster::start(3).await;
    let (a, b, c) = (
        cluster.http_addr(1),
        cluster.http_addr(2),
        cluster.http_addr(3),
    );
    post(
        a,
        "/api/v1/stations",
        &json!({"name": "jobs", "partitions": 2}),
    )
    .await
    .ok();
    let st = "/api/v1/stations/default/jobs";
    let batch: Vec<Value> = (0..20)
        .map(|i| json!({"key": format!("k{}", i % 5), "payload": format!("job-{i}")}))
        .collect();
    post(b, &format!("{st}/messages"), &json!({"messages": batch}))
        .await
        .ok();

    // Fetch on node 1, ack on node 2, until everything is done. A key's next message comes
    // once its previous one is acked, so this takes several rounds.
    let mut receipts = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut accepted = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 20 messages fetched in 20 s",
            seen.len()
        );
        let got = post(
            a,
            &format!("{st}/groups/workers/fetch"),
            &json!({"consumer": "w1", "max": 50, "wait_ms": 500}),
        )
        .await
        .ok();
        assert_eq!(got["member_id"], "rest:w1");
        let mut batch = Vec::new();
        let mut keys = std::collections::BTreeSet::new();
        for m in got["messages"].as_array().expect("messages") {
            assert_eq!(m["delivery_count"], 1, "{m}");
            assert!(
                keys.insert(m["message"]["key"].as_str().expect("key").to_owned()),
                "two messages of one key out at once: {got}"
            );
            seen.insert(
                m["message"]["payload"]
                    .as_str()
                    .expect("payload")
                    .to_owned(),
            );
            batch.push(m["receipt"].clone());
        }
        if !batch.is_empty() {
            let acked = post(
                b,
                &format!("{st}/groups/workers/ack"),
                &json!({"receipts": batch}),
            )
            .await
            .ok();
            accepted += acked["accepted"].as_u64().expect("accepted");
            receipts.extend(batch);
        }
    }
    assert_eq!(receipts.len(), 20, "each message fetched once");
    assert_eq!(accepted, 20);
    // The group's lag falls to zero (lag in messages and in time, per partition).
    wait_until(Duration::from_secs(10), "lag 0", || async {
        let g = get(c, &format!("{st}/groups/workers")).await.ok();
        (g["lag"] == 0 && g["partitions"].as_array().is_some_and(|p| p.len() == 2)).then_some(())
    })
    .await;
    // Acking again is stale: those deliveries are finished.
    let again = post(
        c,
        &format!("{st}/groups/workers/ack"),
        &json!({"receipts": [receipts[0]]}),
    )
    .await;
    let p = again.problem(409, Some("STALE_RECEIPT"));
    assert_eq!(p["metadata"]["accepted"], "0");
    // A damaged receipt is the caller's mistake.
    post(
        c,
        &format!("{st}/groups/workers/ack"),
        &json!({"receipts": ["nonsense"]}),
    )
    .await
    .problem(400, None);

    // An isolation budget, per partition; a limit of 0 is refused. Attached again at once.
    send(
        a,
        "PUT",
        &format!("{st}/groups/workers/budget"),
        &json!({"max_messages": 0}),
    )
    .await
    .problem(400, None);
    let set = send(
        b,
        "PUT",
        &format!("{st}/groups/workers/budget"),
        &json!({"max_messages": 500, "max_age_ms": 3_600_000}),
    )
    .await
    .ok();
    assert_eq!(set["partitions"].as_array().map(Vec::len), Some(2), "{set}");
    // A description is read from each partition's local replica, which may trail its leader by
    // a moment.
    wait_until(
        Duration::from_secs(10),
        "the budget on every replica",
        || async {
            let g = get(c, &format!("{st}/groups/workers")).await.ok();
            g["partitions"]
                .as_array()
                .expect("partitions")
                .iter()
                .all(|p| {
                    p["budget"]["max_messages"] == 500
                        && p["budget"]["max_age_ms"] == 3_600_000
                        && p["detached_at_ms"].is_null()
                })
                .then_some(())
        },
    )
    .await;
    let attached = post(
        a,
        &format!("{st}/groups/workers/attach"),
        &json!({"partition": 1}),
    )
    .await
    .ok();
    assert_eq!(attached["partitions"][0]["partition"], 1);
    assert_eq!(attached["partitions"][0]["budget"]["max_messages"], 500);
    post(a, &format!("{st}/groups/nobody/attach"), &json!({}))
        .await
        .problem(404, None);

    // Nack on node 3, fetch the redelivery on node 2; the first delivery's receipt is stale.
    post(
        b,
        &format!("{st}/messages"),
        &json!({"messages": [{"key": "x", "payload": "retry-me"}]}),
    )
    .await
    .ok();
    let fetch_one = |addr| async move {
        wait_until(Duration::from_secs(10), "a message to fetch", || async {
            let got = post(
                addr,
                &format!("{st}/groups/workers/fetch"),
                &json!({"consumer": "w1", "max": 1, "wait_ms": 500}),
            )
            .await
            .ok();
            got["messages"].as_array().and_then(|m| m.first().cloned())
        })
        .await
    };
    let first = fetch_one(c).await;
    assert_eq!(first["message"]["payload"], "retry-me");
    let in_progress = post(
        a,
        &format!("{st}/groups/workers/in-progress"),
        &json!({"receipts": [first["receipt"]]}),
    )
    .await
    .ok();
    assert_eq!(in_progress["accepted"], 1);
    post(
        c,
        &format!("{st}/groups/workers/nack"),
        &json!({"receipts": [first["receipt"]]}),
    )
    .await
    .ok();
    let second = fetch_one(b).await;
    assert_eq!(second["message"]["payload"], "retry-me");
    assert_eq!(second["delivery_count"], 2);
    post(
        a,
        &format!("{st}/groups/workers/ack"),
        &json!({"receipts": [first["receipt"]]}),
    )
    .await
    .problem(409, Some("STALE_RECEIPT"));
    // The stale ack changed nothing: the current delivery is still out and takes its ack.
    let ok = post(
        a,
        &format!("{st}/groups/workers/ack"),
        &json!({"receipts": [second["receipt"]]}),
    )
    .await
    .ok();
    assert_eq!(ok["accepted"], 1);

    // Groups: list, clone, seek, delete.
    let groups = get(a, &format!("{st}/groups")).await.ok();
    assert_eq!(groups["groups"][0]["group"], "workers", "{groups}");
    let cloned = post(
        b,
        &format!("{st}/groups/workers/clone"),
        &json!({"to": "audit"}),
    )
    .await;
    assert_eq!(cloned.status, 201, "{:?}", cloned.json());
    let sought = post(
        c,
        &format!("{st}/groups/audit/seek"),
        &json!({"position": "earliest"}),
    )
    .await
    .ok();
    assert_eq!(sought["group"], "audit");
    wait_until(
        Duration::from_secs(10),
        "the sought group to lag by 21",
        || async {
            let g = get(a, &format!("{st}/groups/audit")).await.ok();
            (g["lag"] == 21).then_some(())
        },
    )
    .await;
    post(
        c,
        &format!("{st}/groups/audit/seek"),
        &json!({"offset": 1, "time_ms": 5}),
    )
    .await
    .problem(400, None);
    assert_eq!(
        http(b, "DELETE", &format!("{st}/groups/audit"), &[], None)
            .await
            .status,
        200
    );
    get(a, &format!("{st}/groups/audit"))
        .await
        .problem(404, None);
    post(
        a,
        &format!("{st}/groups/workers/leave"),
        &json!({"consumer": "w1"}),
    )
    .await
    .ok();

    // Dead letters: a group that gives up after one delivery.
    post(
        a,
        &format!("{st}/groups"),
        &json!({"group": "strict", "settings": {"max_deliveries": 1, "start": "latest"}}),
    )
    .await
    .ok();
    // The group starts at the end; fetch once so its position is fixed before producing.
    post(
        a,
        &format!("{st}/groups/strict/fetch"),
        &json!({"wait_ms": 0}),
    )
    .await
    .ok();
    post(
        b,
        &format!("{st}/messages"),
        &json!({"messages": [{"key": "p", "payload": "poison"}]}),
    )
    .await
    .ok();
    let poison = wait_until(Duration::from_secs(10), "the poison message", || async {
        let got = post(
            a,
            &format!("{st}/groups/strict/fetch"),
            &json!({"wait_ms": 500}),
        )
        .await
        .ok();
        got["messages"].as_array().and_then(|m| m.first().cloned())
    })
    .await;
    post(
        c,
        &format!("{st}/groups/strict/nack"),
        &json!({"receipts": [poison["receipt"]]}),
    )
    .await
    .ok();
    let dead = wait_until(Duration::from_secs(15), "a dead letter", || async {
        let d = get(b, &format!("{st}/dead-letters")).await.ok();
        d["dead_letters"]
            .as_array()
            .and_then(|l| l.first().cloned())
    })
    .await;
    assert_eq!(dead["group"], "strict", "{dead}");
    assert_eq!(dead["deliveries"], 1, "{dead}");
    assert_eq!(dead["from_station"], "default/jobs", "{dead}");
    assert_eq!(dead["from_offset"], poison["message"]["offset"], "{dead}");
    assert_eq!(dead["message"]["payload"], "poison");
    assert!(dead["reason"].is_string(), "{dead}");
    let resent = post(
        c,
        &format!("{st}/dead-letters/resend"),
        &json!({"group": "strict"}),
    )
    .await
    .ok();
    assert_eq!(resent["resent"], 1);
    let back = wait_until(Duration::from_secs(10), "the resent message", || async {
        let got = post(
            a,
            &format!("{st}/groups/strict/fetch"),
            &json!({"wait_ms": 500}),
        )
        .await
        .ok();
        got["messages"].as_array().and_then(|m| m.first().cloned())
    })
    .await;
    assert_eq!(back["message"]["payload"], "poison");
    assert_eq!(back["delivery_count"], 1);
    cluster.shutdown().await;
}

/// A produce with an Idempotency-Key whose node crashes after storing it; the retry on
/// another node stores nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_retried_after_a_crash_stores_once() {
    let mut cluster = TestCluster::start(3).await;
    post(
        cluster.http_addr(1),
        "/api/v1/stations",
        &json!({"name": "pay", "policy": {"dedup_window_ms": 600000}}),
    )
    .await
    .ok();
    let described = get(cluster.http_addr(1), "/api/v1/stations/default/pay")
        .await
        .ok();
    let group = described["partition_info"][0]["group_id"]
        .as_u64()
        .expect("group");
    let leader = wait_until(Duration::from_secs(10), "a partition leader", || async {
        cluster.partition_leader(group)
    })
    .await;
    let body = serde_json::to_vec(&json!({"messages": [{"payload": "charge 10"}]})).expect("json");
    let produce = |addr| {
        let body = body.clone();
        async move {
            http(
                addr,
                "POST",
                "/api/v1/stations/default/pay/messages",
                &[
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", "charge-1"),
                ],
                Some(&body),
            )
            .await
        }
    };
    let first = produce(cluster.http_addr(leader)).await.ok();
    cluster.stop(leader).await;
    let other = cluster.running()[0];
    let retry = wait_until(
        Duration::from_secs(30),
        "the retry to be answered",
        || async {
            let r = produce(cluster.http_addr(other)).await;
            (r.status == 200).then(|| r.json())
        },
    )
    .await;
    assert_eq!(retry["positions"][0]["duplicate"], true, "{retry}");
    assert_eq!(
        retry["positions"][0]["offset"],
        first["positions"][0]["offset"]
    );
    let read = get(
        cluster.http_addr(other),
        "/api/v1/stations/default/pay/partitions/0/messages",
    )
    .await
    .ok();
    assert_eq!(read["messages"].as_array().map(Vec::len), Some(1), "{read}");
    cluster.shutdown().await;
}

/// The OpenAPI document is 3.1, every operation it lists is served, and a method it does not
/// list on a path is not (the routes and the document are made from the same handlers; this
/// checks what a node really serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openapi_document_matches_the_routes() {
    let cluster = TestCluster::start(1).await;
    let a = cluster.http_addr(1);
    let doc = get(a, "/api/v1/openapi.json").await.ok();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{tenant}", "default")
            .replace("{station}", "nowhere")
            .replace("{partition}", "0")
            .replace("{group}", "g");
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let r = http(
                a,
                &method.to_ascii_uppercase(),
                &concrete,
                &[("Content-Type", "application/json")],
                Some(b"{}"),
            )
            .await;
            assert!(
                r.status != 405
                    && !(r.status == 404
                        && r.json()["code"] == "NOT_FOUND"
                        && r.json()["detail"] == "no such route in the REST API"),
                "{method} {path} is documented but not served: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            assert!(
                r.status < 500,
                "{method} {path}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        // The methods it does not list are not served.
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_some() {
                continue;
            }
            let r = http(a, &method.to_ascii_uppercase(), &concrete, &[], None).await;
            assert_eq!(
                r.status, 405,
                "{method} {path} is served but not documented"
            );
        }
    }
    assert!(operations >= 24, "{operations} operations documented");
    cluster.shutdown().await;
}

/// With `--auth keys`, REST calls are authenticated and authorized exactly as gRPC calls:
/// no credential is 401, another tenant's station is 404 (no existence leak), a role without
/// the operation is 403, and the node-to-node secret cannot be passed from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_calls_are_authorized_as_grpc_calls_are() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("admin.token");
    let path = token_file.clone();
    let cluster = TestCluster::start_with(3, move |c| {
        c.auth = junction_server::AuthMode::Keys;
        c.admin_token_file = Some(path.clone());
    })
    .await;
    let admin_token = std::fs::read_to_string(&token_file)
        .expect("admin token")
        .trim()
        .to_owned();
    let a = cluster.http_addr(1);
    let as_token = |token: &str| format!("Bearer {token}");
    let call = |method: &'static str, path: String, auth: Option<String>, body: Option<Value>| async move {
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json"));
        let mut headers = vec![("Content-Type", "application/json".to_owned())];
        if let Some(v) = auth {
            headers.push(("Authorization", v));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http(a, method, &path, &headers, bytes.as_deref()).await
    };
    let admin = Some(as_token(&admin_token));
    for t in ["acme", "globex"] {
        call(
            "POST",
            "/api/v1/tenants".into(),
            admin.clone(),
            Some(json!({"name": t})),
        )
        .await
        .ok();
        call(
            "POST",
            "/api/v1/stations".into(),
            admin.clone(),
            Some(json!({"tenant": t, "name": "orders"})),
        )
        .await
        .ok();
    }
    let grpc = junction_client::Client::connect_with(
        cluster.addrs(),
        junction_client::ClientOptions::default().with_token(admin_token.clone()),
    )
    .expect("client");
    let key = |role: &str| {
        let grpc = grpc.clone();
        let role = role.to_owned();
        async move {
            grpc.create_api_key(junction_proto::v1::CreateApiKeyRequest {
                tenant: "acme".into(),
                role,
                ..Default::default()
            })
            .await
            .expect("key")
            .token
        }
    };
    let producer = Some(as_token(&key("producer").await));
    let reader = Some(as_token(&key("reader").await));
    let produce = json!({"messages": [{"payload": "x"}]});

    // No credential, a bad one, and the cluster secret header instead of one.
    let none = call("GET", "/api/v1/stations".into(), None, None).await;
    none.problem(401, Some("MISSING_CREDENTIAL"));
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    call(
        "GET",
        "/api/v1/stations".into(),
        Some("Bearer jk_nope_nope".into()),
        None,
    )
    .await
    .problem(401, None);
    let secret = std::fs::read_to_string(cluster.secret_file()).expect("secret");
    let r = http(
        a,
        "GET",
        "/api/v1/stations",
        &[(
            junction_raft::peer_auth::CLUSTER_SECRET_HEADER,
            secret.trim(),
        )],
        None,
    )
    .await;
    r.problem(401, Some("MISSING_CREDENTIAL"));

    // The console's header: who the credential is.
    let me = call("GET", "/api/v1/whoami".into(), producer.clone(), None)
        .await
        .ok();
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["role"], "producer");
    assert_eq!(me["auth_enabled"], true);

    // Own tenant: allowed by role; the other tenant: as if it did not exist.
    call(
        "POST",
        "/api/v1/stations/acme/orders/messages".into(),
        producer.clone(),
        Some(produce.clone()),
    )
    .await
    .ok();
    call(
        "POST",
        "/api/v1/stations/globex/orders/messages".into(),
        producer.clone(),
        Some(produce.clone()),
    )
    .await
    .problem(404, None);
    call(
        "GET",
        "/api/v1/stations/globex/orders/partitions/0/messages".into(),
        reader.clone(),
        None,
    )
    .await
    .problem(404, None);
    let mine = call(
        "GET",
        "/api/v1/stations/acme/orders/partitions/0/messages".into(),
        reader.clone(),
        None,
    )
    .await
    .ok();
    assert_eq!(mine["messages"].as_array().map(Vec::len), Some(1));
    let listed = call("GET", "/api/v1/stations".into(), reader.clone(), None)
        .await
        .ok();
    let names: Vec<&str> = listed["stations"]
        .as_array()
        .expect("stations")
        .iter()
        .filter_map(|s| s["tenant"].as_str())
        .collect();
    assert!(names.iter().all(|t| *t == "acme"), "{listed}");
    // A role without the operation.
    call(
        "POST",
        "/api/v1/stations/acme/orders/messages".into(),
        reader.clone(),
        Some(produce.clone()),
    )
    .await
    .problem(403, Some("PERMISSION_DENIED"));
    call(
        "DELETE",
        "/api/v1/stations/acme/orders".into(),
        producer.clone(),
        None,
    )
    .await
    .problem(403, Some("PERMISSION_DENIED"));
    call(
        "POST",
        "/api/v1/tenants".into(),
        producer,
        Some(json!({"name": "x"})),
    )
    .await
    .problem(403, Some("PERMISSION_DENIED"));
    cluster.shutdown().await;
}
