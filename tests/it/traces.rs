//! Traces across nodes: three `junction serve` processes export spans over OTLP/gRPC to a
//! collector run by the test (a real gRPC server on loopback speaking the OTLP trace
//! service). A produce sent with a W3C `traceparent` to a node that is not the partition's
//! leader becomes one trace across both nodes, and its delivery to a consumer group links
//! back to it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::{Message, ProduceRequest};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use parking_lot::Mutex;

use crate::harness::wait_until;
use crate::process::ProcessCluster;

/// One exported span, flattened: the node that sent it and what tests look at.
#[derive(Clone, Debug)]
struct Seen {
    node: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    links: Vec<String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Seen>>>);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock();
        for rs in req.into_inner().resource_spans {
            let node = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    seen.push(Seen {
                        node: node.clone(),
                        name: s.name,
                        trace: hex(&s.trace_id),
                        span: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_produce_is_one_trace_across_nodes_and_its_delivery_links_to_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let collector_addr = listener.local_addr().expect("collector address");
    let collector = Collector::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let svc = TraceServiceServer::new(collector.clone());
        async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
        }
    });

    let mut cluster = ProcessCluster::new(3);
    cluster.extra_args = vec!["--otlp-endpoint".into(), format!("http://{collector_addr}")];
    // Export every 100 ms instead of every 5 s.
    cluster.envs = vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())];
    for id in 1..=3 {
        cluster.start(id);
    }
    cluster.wait_ready().await;
    let client = cluster.client();
    let s = client
        .create_station("traced", 1, 3)
        .await
        .expect("station");
    let group = s.partition_info[0].group_id;
    let leader = wait_until(Duration::from_secs(15), "a partition leader", || async {
        cluster.leader_seen_by(1, group).await
    })
    .await;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");

    // The produce goes to a follower, which forwards it to the leader.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut broker = BrokerClient::connect(format!("http://{}", cluster.grpc[&follower]))
        .await
        .expect("connect");
    let mut req = tonic::Request::new(ProduceRequest {
        station: "traced".into(),
        messages: vec![Message {
            key: Some(b"k".to_vec()),
            payload: b"traced message".to_vec().into(),
            ..Message::default()
        }],
        request_id: 0,
        producer: None,
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{caller_span}-01")
            .parse()
            .expect("metadata"),
    );
    broker.produce(req).await.expect("produce");

    let (follower_s, leader_s) = (follower.to_string(), leader.to_string());
    let spans = wait_until(
        Duration::from_secs(30),
        "the produce's spans from both nodes",
        || async {
            let seen = collector.0.lock().clone();
            let of = |node: &str, name: &str| {
                seen.iter()
                    .find(|s| s.trace == trace && s.node == node && s.name == name)
                    .cloned()
            };
            Some((
                of(&follower_s, "/junction.v1.Broker/Produce")?,
                of(&follower_s, "forward")?,
                of(&leader_s, "/junction.v1.Broker/Produce")?,
                of(&leader_s, "append")?,
            ))
        },
    )
    .await;
    let (entry, forward, at_leader, append) = spans;
    assert_eq!(entry.parent, caller_span, "the caller's span is the parent");
    assert_eq!(
        forward.parent, entry.span,
        "forwarding is a step of the call"
    );
    assert_eq!(
        at_leader.parent, forward.span,
        "the leader's span continues the forward"
    );
    assert_eq!(append.parent, at_leader.span, "the append is a step there");

    // A REST produce with a traceparent, to the same follower: its HTTP span continues the
    // caller's trace, and the append it led to (on the leader, through a forward) too.
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let rest_caller = "b7ad6b7169203331";
    let tp = format!("00-{rest_trace}-{rest_caller}-01");
    let reply = crate::rest::http(
        cluster.http[&follower].parse().expect("http address"),
        "POST",
        "/api/v1/stations/default/traced/messages",
        &[("Content-Type", "application/json"), ("traceparent", &tp)],
        Some(br#"{"messages": [{"key": "r", "payload": "over rest"}]}"#),
    )
    .await;
    reply.ok();
    let (http_span, rest_append) = wait_until(
        Duration::from_secs(30),
        "the REST produce's spans",
        || async {
            let seen = collector.0.lock().clone();
            let in_trace = |name: &str| {
                seen.iter()
                    .find(|s| s.trace == rest_trace && s.name.starts_with(name))
                    .cloned()
            };
            Some((in_trace("POST /api/v1/stations/")?, in_trace("append")?))
        },
    )
    .await;
    assert_eq!(http_span.node, follower_s);
    assert_eq!(
        http_span.parent, rest_caller,
        "the caller's span is the parent"
    );
    assert_eq!(rest_append.node, leader_s, "the append ran on the leader");

    // Replication of entries is traced on the leader.
    wait_until(Duration::from_secs(15), "replication spans", || async {
        collector
            .0
            .lock()
            .iter()
            .any(|s| s.node == leader_s && s.name == "replicate")
            .then_some(())
    })
    .await;

    // Delivered to a consumer group: the delivery's span links to the producer's trace.
    let mut consumer = client
        .group_consumer(
            "traced",
            "readers",
            junction_client::GroupOptions {
                settings: junction_proto::v1::GroupSettings {
                    start: Some(junction_proto::v1::group_settings::Start::Position(
                        junction_proto::v1::StartPosition::Earliest as i32,
                    )),
                    ack_wait_ms: 30_000,
                    max_deliveries: 5,
                    session_timeout_ms: 3000,
                    ..Default::default()
                },
                ..junction_client::GroupOptions::default()
            },
        )
        .await
        .expect("join");
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a delivery in time")
        .expect("a message");
    assert_eq!(&m.message.payload[..], b"traced message");
    consumer.ack(&m);
    wait_until(
        Duration::from_secs(15),
        "a delivery span linked to the trace",
        || async {
            collector
                .0
                .lock()
                .iter()
                .any(|s| s.name == "deliver" && s.links.iter().any(|l| l == trace))
                .then_some(())
        },
    )
    .await;

    // Heartbeats outside any trace make no spans: every peer-call span belongs to a trace
    // that a node started (a replication) or a caller did.
    let seen = collector.0.lock().clone();
    let nodes: BTreeSet<&str> = seen.iter().map(|s| s.node.as_str()).collect();
    assert!(nodes.len() >= 2, "spans from several nodes: {nodes:?}");
    let orphans: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.name.starts_with("/junction.peer.") && s.parent.is_empty())
        .collect();
    assert!(
        orphans.is_empty(),
        "peer call spans without a parent: {orphans:?}"
    );
    let _ = consumer.close().await;
    drop(cluster);
    let _ = stop.send(());
    let _ = server.await;
}
