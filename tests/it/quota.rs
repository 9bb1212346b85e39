//! Per-tenant quotas on a real 3-node cluster: rates refused with THROTTLED and a RetryInfo
//! (and the SDK waiting them out), stored bytes refusing produces without deleting anything,
//! station, group and stream counts, who may set and read quotas, and bad quota input.

use std::time::{Duration, Instant};

use futures::StreamExt;

use junction_client::proto::QuotaLimits;
use junction_client::{Client, ClientError, Code, Start};
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::{Message, ProduceRequest, ReadRequest, read_request};
use tonic_types::StatusExt;

use crate::harness::{TestCluster, wait_until};

fn msg(payload: usize) -> Message {
    Message {
        payload: vec![b'x'; payload].into(),
        partition: Some(0),
        ..Default::default()
    }
}

/// Sets limits of `tenant` (or of one of its stations) through the SDK.
async fn set(client: &Client, tenant: &str, station: Option<&str>, set: QuotaLimits) {
    client
        .set_quota(tenant, station, set, vec![])
        .await
        .unwrap_or_else(|e| panic!("setting a quota of {tenant}: {e}"));
}

/// Limits with one field set, named as the CLI names it.
fn limit(name: &str, value: u64) -> QuotaLimits {
    let mut l = QuotaLimits::default();
    let slot = match name {
        "produce-bytes-per-sec" => &mut l.produce_bytes_per_sec,
        "produce-messages-per-sec" => &mut l.produce_messages_per_sec,
        "consume-bytes-per-sec" => &mut l.consume_bytes_per_sec,
        "stored-bytes" => &mut l.stored_bytes,
        "stations" => &mut l.stations,
        "groups" => &mut l.groups,
        "streams" => &mut l.streams,
        other => panic!("no quota {other}"),
    };
    *slot = Some(value);
    l
}

/// Creates `tenant/name`'s tenant (if new) and the station, one partition, replication 3.
async fn tenant_station(client: &Client, full: &str) {
    let (tenant, _) = full.split_once('/').expect("tenant/name");
    match client.create_tenant(tenant).await {
        Ok(()) => {}
        Err(e) if e.is_already_exists() => {}
        Err(e) => panic!("tenant {tenant}: {e}"),
    }
    client.create_station(full, 1, 3).await.expect("station");
}

/// A raw unary produce of one message of `size` bytes to `station`.
async fn produce_raw(
    broker: &mut BrokerClient<tonic::transport::Channel>,
    station: &str,
    size: usize,
) -> Result<(), tonic::Status> {
    broker
        .produce(ProduceRequest {
            station: station.into(),
            messages: vec![msg(size)],
            request_id: 0,
            producer: None,
        })
        .await
        .map(drop)
}

/// Produces until the first refusal (raw calls, no retry) and returns it.
async fn produce_until_refused(
    broker: &mut BrokerClient<tonic::transport::Channel>,
    station: &str,
    size: usize,
) -> (u32, tonic::Status) {
    let mut admitted = 0;
    loop {
        match produce_raw(broker, station, size).await {
            Ok(()) => admitted += 1,
            Err(s) => return (admitted, s),
        }
        assert!(admitted < 10_000, "never refused");
    }
}

async fn raw_broker(cluster: &TestCluster, node: u64) -> BrokerClient<tonic::transport::Channel> {
    BrokerClient::new(cluster.channel(node).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_rate_is_throttled_with_a_wait_and_the_sdk_waits_it_out() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    for station in ["acme/orders", "beta/orders"] {
        tenant_station(&client, station).await;
    }
    // 20 messages per second for the whole cluster; the one partition's leader holds all of it.
    set(&client, "acme", None, limit("produce-messages-per-sec", 20)).await;
    let mut raw = raw_broker(&cluster, 1).await;
    let (admitted, refusal) = produce_until_refused(&mut raw, "acme/orders", 10).await;
    // One second of burst, then refused (at most a few more earned while the calls ran).
    assert!((20..=40).contains(&admitted), "{admitted} admitted");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let info = refusal.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "THROTTLED");
    assert_eq!(info.metadata["tenant"], "acme");
    assert_eq!(info.metadata["quota"], "produce-messages-per-sec");
    assert_eq!(info.metadata["limit"], "20");
    let wait = refusal
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo with the wait");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    // Another tenant's produces are untouched.
    for _ in 0..100 {
        produce_raw(&mut raw, "beta/orders", 10)
            .await
            .expect("beta is not limited");
    }
    // The SDK waits each refusal out: every message is stored, at the quota's pace. (A
    // batch is admitted while the bucket is not in debt, so small batches show the pace.)
    let started = Instant::now();
    let producer = client.producer(
        "acme/orders",
        junction_client::ProducerOptions {
            max_batch_messages: 2,
            ..Default::default()
        },
    );
    let sends: Vec<_> = (0..60).map(|_| producer.send(msg(10))).collect();
    for s in sends {
        s.await.expect("stored after waiting");
    }
    // 60 messages at 20/s with at most one second of burst (and one batch of debt) take
    // at least 1.9 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the rate was not held: {:?}",
        started.elapsed()
    );
    let stats = client
        .describe_station("acme/orders")
        .await
        .expect("describe");
    let stored: u64 = stats.partition_info.iter().map(|p| p.next_offset).sum();
    assert_eq!(
        u64::from(admitted) + 60,
        stored,
        "nothing lost, nothing twice"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_bytes_refuse_produces_and_delete_nothing() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    tenant_station(&client, "acme/logs").await;
    set(&client, "acme", None, limit("stored-bytes", 4096)).await;
    let mut raw = raw_broker(&cluster, 2).await;
    let (admitted, refusal) = produce_until_refused(&mut raw, "acme/logs", 1000).await;
    assert_eq!(
        admitted, 5,
        "4 fit, the fifth passes the limit, then refused"
    );
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let info = refusal.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "QUOTA_EXCEEDED");
    assert_eq!(info.metadata["quota"], "stored-bytes");
    assert!(
        refusal.get_details_retry_info().is_none(),
        "waiting does not lift it"
    );
    assert!(refusal.message().contains("stored-bytes"), "{refusal:?}");
    // The SDK gives it to the caller instead of retrying.
    let err = client
        .produce("acme/logs", vec![msg(10)])
        .await
        .expect_err("refused");
    assert!(
        matches!(
            &err,
            ClientError::Status {
                code: Code::ResourceExhausted,
                ..
            }
        ),
        "{err:?}"
    );
    // Nothing was deleted, and the tally sees what is stored.
    let q = wait_until(Duration::from_secs(10), "stored bytes measured", || async {
        let q = client.get_quota("acme").await.expect("get quota");
        (q.stored_bytes == 5000).then_some(q)
    })
    .await;
    assert_eq!(q.limits.and_then(|l| l.stored_bytes), Some(4096));
    // Raising the limit lets produces in again.
    set(&client, "acme", None, limit("stored-bytes", 1 << 20)).await;
    client
        .produce("acme/logs", vec![msg(10)])
        .await
        .expect("room again");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_of_stations_groups_and_streams_are_held() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_tenant("acme").await.expect("tenant");
    set(
        &client,
        "acme",
        None,
        QuotaLimits {
            stations: Some(1),
            groups: Some(1),
            streams: Some(1),
            ..Default::default()
        },
    )
    .await;
    client.create_station("acme/a", 1, 3).await.expect("first");
    let err = client
        .create_station("acme/b", 1, 3)
        .await
        .expect_err("second station");
    let ClientError::Status { code, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*code, Code::ResourceExhausted);
    assert!(
        message.contains("stations") && message.contains("quota is 1"),
        "{message}"
    );
    client
        .create_group("acme/a", "g1", Default::default())
        .await
        .expect("first group");
    let err = client
        .create_group("acme/a", "g2", Default::default())
        .await
        .expect_err("second group");
    assert!(
        matches!(
            &err,
            ClientError::Status {
                code: Code::ResourceExhausted,
                ..
            }
        ),
        "{err:?}"
    );
    // Streams: one tail per node.
    let node = client.clone();
    let mut first = node.tail("acme/a", 0, Start::Earliest);
    client
        .produce("acme/a", vec![msg(1)])
        .await
        .expect("produce");
    first
        .next()
        .await
        .expect("first tail runs")
        .expect("message");
    let q = client.get_quota("acme").await.expect("quota");
    assert_eq!((q.stations_used, q.groups_used), (1, 1));
    let mut second = node.tail("acme/a", 0, Start::Earliest);
    let err = second
        .next()
        .await
        .expect("an answer")
        .expect_err("refused");
    assert!(
        matches!(&err, ClientError::Status { code: Code::ResourceExhausted, message } if message.contains("streams")),
        "{err:?}"
    );
    drop(first);
    // Closing the first frees its place (the server notices the stream ended).
    wait_until(
        Duration::from_secs(10),
        "the stream's place freed",
        || async {
            let mut t = node.tail("acme/a", 0, Start::Earliest);
            t.next().await.and_then(Result::ok)
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_over_the_consume_rate_are_throttled() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_tenant("acme").await.expect("tenant");
    client
        .create_station("acme/s", 1, 3)
        .await
        .expect("station");
    client
        .produce("acme/s", (0..10).map(|_| msg(1000)).collect())
        .await
        .expect("produce");
    set(
        &client,
        "acme",
        Some("s"),
        limit("consume-bytes-per-sec", 2000),
    )
    .await;
    let mut raw = raw_broker(&cluster, 3).await;
    let mut refused = None;
    for _ in 0..20 {
        let r = raw
            .read(ReadRequest {
                station: "acme/s".into(),
                partition: 0,
                start: Some(read_request::Start::Offset(0)),
                max_messages: 10,
                ..Default::default()
            })
            .await;
        if let Err(s) = r {
            refused = Some(s);
            break;
        }
    }
    let s = refused.expect("a read was throttled");
    assert_eq!(s.code(), Code::ResourceExhausted);
    let info = s.get_details_error_info().expect("info");
    assert_eq!(info.reason, "THROTTLED");
    assert_eq!(info.metadata["station"], "s");
    assert_eq!(info.metadata["quota"], "consume-bytes-per-sec");
    assert!(s.get_details_retry_info().is_some());
    // A tail is slowed down, not failed: it still delivers all ten.
    let mut tail = client.tail("acme/s", 0, Start::Earliest);
    for i in 0..10 {
        let m = tail.next().await.expect("open").expect("message");
        assert_eq!(m.offset, i);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_quota_input_is_refused_with_a_clear_status() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_tenant("acme").await.expect("tenant");
    let expect = |r: Result<_, ClientError>, code: Code, needle: &str| match r {
        Err(ClientError::Status { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(needle), "{message} lacks {needle}");
        }
        other => panic!("expected {code:?}, got {other:?}"),
    };
    expect(
        client
            .set_quota("acme", None, limit("stored-bytes", 0), vec![])
            .await,
        Code::InvalidArgument,
        "quota of 0",
    );
    expect(
        client
            .set_quota("acme", None, QuotaLimits::default(), vec!["bytes".into()])
            .await,
        Code::InvalidArgument,
        "unknown quota 'bytes'",
    );
    expect(
        client
            .set_quota("acme", Some("nope"), limit("stored-bytes", 5), vec![])
            .await,
        Code::NotFound,
        "acme/nope",
    );
    client
        .create_station("acme/s", 1, 3)
        .await
        .expect("station");
    expect(
        client
            .set_quota("acme", Some("s"), limit("groups", 5), vec![])
            .await,
        Code::InvalidArgument,
        "tenant-wide",
    );
    expect(
        client
            .set_quota("ghost", None, limit("streams", 5), vec![])
            .await,
        Code::NotFound,
        "ghost",
    );
    expect(
        client
            .set_quota("acme", None, QuotaLimits::default(), vec![])
            .await,
        Code::InvalidArgument,
        "nothing",
    );
    expect(client.get_quota("ghost").await, Code::NotFound, "ghost");
    // Clearing removes a limit.
    set(&client, "acme", None, limit("streams", 3)).await;
    let q = client
        .set_quota("acme", None, QuotaLimits::default(), vec!["streams".into()])
        .await
        .expect("clear");
    assert_eq!(q.limits.and_then(|l| l.streams), None);
    cluster.shutdown().await;
}
