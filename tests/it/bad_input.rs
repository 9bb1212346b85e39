//! Bad input gets a clear gRPC error, never a panic and never a half-done change.

use junction_client::Start;
use junction_proto::v1::Message;
use tonic::Code;

use crate::harness::{TestCluster, keyed};

fn code<T: std::fmt::Debug>(r: Result<T, junction_client::ClientError>) -> Option<Code> {
    r.expect_err("must fail").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();

    for bad in ["", "a b", "a/b/c", "-x", "acme/", "é"] {
        assert_eq!(
            code(client.create_station(bad, 1, 1).await),
            Some(Code::InvalidArgument),
            "name {bad:?}"
        );
    }
    assert_eq!(
        code(client.create_station("x", 1, 2).await),
        Some(Code::InvalidArgument),
        "rf 2"
    );
    assert_eq!(
        code(client.create_station("x", 2000, 3).await),
        Some(Code::InvalidArgument),
        "2000 partitions"
    );
    assert_eq!(
        code(client.create_station("x", 1, 5).await),
        Some(Code::FailedPrecondition),
        "rf 5 on 3 nodes"
    );
    assert_eq!(
        code(client.create_station("nope/x", 1, 1).await),
        Some(Code::NotFound),
        "unknown tenant"
    );

    client.create_station("ok", 2, 3).await.expect("create");
    assert_eq!(
        code(client.create_station("ok", 2, 3).await),
        Some(Code::AlreadyExists)
    );
    assert_eq!(
        code(client.produce("missing", vec![keyed("k", "v")]).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(client.produce("ok", vec![]).await),
        Some(Code::InvalidArgument),
        "empty batch"
    );
    let big = keyed("k", vec![0u8; (1 << 20) + 1]);
    assert_eq!(
        code(client.produce("ok", vec![big]).await),
        Some(Code::InvalidArgument),
        "oversized"
    );
    let wrong = Message {
        partition: Some(2),
        ..keyed("k", "v")
    };
    assert_eq!(
        code(client.produce("ok", vec![wrong]).await),
        Some(Code::InvalidArgument),
        "partition 2 of 2"
    );
    assert_eq!(
        code(client.read("ok", 9, Start::Earliest, 10).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(client.read("ok", 0, Start::Offset(1_000), 10).await),
        Some(Code::OutOfRange)
    );
    assert_eq!(
        code(client.read("missing", 0, Start::Earliest, 10).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(client.delete_station("missing").await),
        Some(Code::NotFound)
    );

    // Nothing was written by the rejected calls, and the station still works.
    for p in 0..2 {
        let r = client
            .read("ok", p, Start::Earliest, 10)
            .await
            .expect("read");
        assert!(r.messages.is_empty());
    }
    client
        .produce("ok", vec![keyed("k", "fine")])
        .await
        .expect("valid produce works");
    cluster.shutdown().await;
}
