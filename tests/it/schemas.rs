//! Schemas enforced by a real 3-node cluster: the registry in the metadata group (versions,
//! compatibility refusals, in-use deletes, failover), validation of every produce on the node
//! that receives it under both `on-invalid` policies, and the `junction schema` commands.

use std::time::Duration;

use junction_client::proto::Message;
use junction_client::{Client, SchemaSpec, StationSpec};
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::schemas_client::SchemasClient;
use junction_proto::v1::{
    CreateSchemaRequest, DeleteSchemaRequest, InitProducerRequest, ProduceRequest, ProducerFields,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::{TestCluster, read_all, wait_until};

const ORDER_V1: &str = r#"{
  "type": "object",
  "properties": {
    "id": {"type": "integer"},
    "sku": {"type": "string"}
  },
  "required": ["id"],
  "additionalProperties": false
}"#;

/// Adds an optional property: BACKWARD compatible.
const ORDER_V2: &str = r#"{
  "type": "object",
  "properties": {
    "id": {"type": "integer"},
    "sku": {"type": "string"},
    "note": {"type": "string"}
  },
  "required": ["id"],
  "additionalProperties": false
}"#;

/// Requires a new property: not BACKWARD compatible.
const ORDER_BAD: &str = r#"{
  "type": "object",
  "properties": {
    "id": {"type": "integer"},
    "sku": {"type": "string"},
    "customer": {"type": "string"}
  },
  "required": ["id", "customer"],
  "additionalProperties": false
}"#;

const ORDER_PROTO: &str = r#"
syntax = "proto3";
package shop;
message Order {
  int64 id = 1;
  string sku = 2;
}
"#;

fn request(name: &str, kind: &str, text: &str) -> CreateSchemaRequest {
    CreateSchemaRequest {
        tenant: String::new(),
        name: name.into(),
        r#type: kind.into(),
        text: text.into(),
        message: None,
        compatibility: None,
    }
}

fn text(payload: &str) -> Message {
    Message {
        payload: payload.as_bytes().to_vec().into(),
        partition: Some(0),
        ..Default::default()
    }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

async fn raw(cluster: &TestCluster, node: u64) -> BrokerClient<tonic::transport::Channel> {
    BrokerClient::new(cluster.channel(node).await)
}

async fn produce(
    broker: &mut BrokerClient<tonic::transport::Channel>,
    station: &str,
    messages: Vec<Message>,
    producer: Option<ProducerFields>,
) -> Result<junction_proto::v1::ProduceResponse, tonic::Status> {
    broker
        .produce(ProduceRequest {
            station: station.into(),
            messages,
            request_id: 0,
            producer,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Registers `ORDER_V1` as `orders` and creates the station `orders` (one partition, three
/// replicas) bound to it at `version` (`None`: the latest), rejecting invalid messages.
async fn orders_station(client: &Client, version: Option<u32>) {
    client
        .create_schema(&SchemaSpec::new("orders", "json", ORDER_V1))
        .await
        .expect("register");
    client
        .create_station_with(
            StationSpec::new("orders")
                .partitions(1)
                .replication_factor(3)
                .schema("orders", version, "reject"),
        )
        .await
        .expect("station");
}

/// The stored messages of partition 0 of `station`, as (payload, headers).
async fn stored(client: &Client, station: &str) -> Vec<(String, Vec<(String, Vec<u8>)>)> {
    read_all(client, station, 0)
        .await
        .into_iter()
        .map(|m| {
            (
                String::from_utf8_lossy(&m.payload).into_owned(),
                m.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_refuses_incompatible_versions_and_every_node_validates_with_the_latest() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let v1 = client
        .create_schema(&SchemaSpec::new("orders", "json", ORDER_V1))
        .await
        .expect("register v1");
    assert_eq!((v1.version, v1.existing), (1, false));
    // The same text again: the existing version, nothing added.
    let again = client
        .create_schema(&SchemaSpec::new("orders", "json", ORDER_V1))
        .await
        .expect("register v1 again");
    assert_eq!((again.version, again.existing), (1, true));

    // A new required property breaks BACKWARD: refused with the rule and the path.
    let check = client
        .check_schema(&SchemaSpec::new("orders", "json", ORDER_BAD))
        .await
        .expect("check");
    assert!(!check.compatible);
    assert!(
        check.violations.iter().any(|v| v.contains("customer")),
        "{:?}",
        check.violations
    );
    let mut schemas = SchemasClient::new(cluster.channel(2).await);
    let status = schemas
        .create_schema(request("orders", "json", ORDER_BAD))
        .await
        .expect_err("incompatible version registered");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "INCOMPATIBLE_SCHEMA");
    assert!(
        status.message().contains("customer"),
        "{}",
        status.message()
    );

    // Not a schema at all: INVALID_ARGUMENT naming the parse error.
    let status = schemas
        .create_schema(request("broken", "json", "{\"type\": "))
        .await
        .expect_err("unparsable schema registered");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("info").reason,
        "INVALID_SCHEMA"
    );

    client
        .create_station_with(
            StationSpec::new("orders")
                .partitions(1)
                .replication_factor(3)
                .schema("orders", None, "reject"),
        )
        .await
        .expect("station with a schema");
    let described = client.describe_station("orders").await.expect("describe");
    assert_eq!(described.schema, "orders@latest");
    assert_eq!(described.on_invalid, "reject");

    // Every node validates, whether or not it leads the partition: a valid message is stored
    // with the schema header, an invalid one fails its whole batch with the message's index,
    // path and rule, and nothing of that batch is stored.
    for node in 1..=3 {
        let mut b = raw(&cluster, node).await;
        produce(
            &mut b,
            "orders",
            vec![text(&format!(r#"{{"id": {node}}}"#))],
            None,
        )
        .await
        .unwrap_or_else(|s| panic!("valid message via node {node}: {s:?}"));
        let s = produce(
            &mut b,
            "orders",
            vec![text(r#"{"id": 100}"#), text(r#"{"id": "seven"}"#)],
            None,
        )
        .await
        .expect_err("an invalid message was accepted");
        assert_eq!(s.code(), Code::InvalidArgument, "node {node}: {s:?}");
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "INVALID_MESSAGE");
        assert_eq!(info.metadata["index"], "1");
        assert_eq!(info.metadata["schema"], "orders@1");
        assert!(info.metadata["path"].contains("id"), "{:?}", info.metadata);
        let s = produce(&mut b, "orders", vec![text("not json")], None)
            .await
            .expect_err("a non-JSON payload was accepted");
        assert_eq!(s.code(), Code::InvalidArgument);
    }
    let msgs = stored(&client, "orders").await;
    assert_eq!(
        msgs.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        vec![r#"{"id": 1}"#, r#"{"id": 2}"#, r#"{"id": 3}"#]
    );
    for (_, h) in &msgs {
        assert_eq!(header(h, "junction-schema"), Some("orders@1"));
    }

    // Version 2 (compatible) is registered; the station follows the latest, so every node
    // soon validates with it: a `note` passes and is stamped @2.
    let v2 = client
        .create_schema(&SchemaSpec::new("orders", "json", ORDER_V2))
        .await
        .expect("register v2");
    assert_eq!((v2.version, v2.existing), (2, false));
    for node in 1..=3 {
        let b = raw(&cluster, node).await;
        wait_until(Duration::from_secs(10), "node validates with v2", || {
            let mut b = b.clone();
            async move {
                produce(
                    &mut b,
                    "orders",
                    vec![text(r#"{"id": 9, "note": "gift"}"#)],
                    None,
                )
                .await
                .ok()
            }
        })
        .await;
    }
    let msgs = stored(&client, "orders").await;
    let last = msgs.last().expect("stored");
    assert_eq!(header(&last.1, "junction-schema"), Some("orders@2"));

    // What a station uses cannot be deleted; after detaching it can.
    let status = schemas
        .delete_schema(DeleteSchemaRequest {
            tenant: String::new(),
            name: "orders".into(),
            version: Some(2),
        })
        .await
        .expect_err("deleted the version a station follows");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.get_details_error_info().expect("info").reason,
        "SCHEMA_IN_USE"
    );
    assert!(
        status.message().contains("default/orders"),
        "{}",
        status.message()
    );
    client
        .delete_schema("", "orders", Some(1))
        .await
        .expect("v1 is unused");
    client.detach_schema("orders").await.expect("detach");
    produce(
        &mut raw(&cluster, 1).await,
        "orders",
        vec![text("free text")],
        None,
    )
    .await
    .expect("no schema, no validation");
    client
        .delete_schema("", "orders", None)
        .await
        .expect("delete");
    let gone = client
        .get_schema("", "orders")
        .await
        .expect_err("still there");
    assert!(gone.is_not_found(), "{gone}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_policy_stores_the_valid_messages_and_keeps_an_idempotent_producers_sequence() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let mut spec = SchemaSpec::new("shop-orders", "protobuf", ORDER_PROTO);
    spec.message = Some("shop.Order".into());
    client.create_schema(&spec).await.expect("register");
    client
        .create_station("orders", 1, 3)
        .await
        .expect("station");
    client
        .attach_schema("orders", "shop-orders", Some(1), "dead_letter")
        .await
        .expect("attach");
    let valid = |id: u8| {
        // Field 1 (varint) = id (< 128: one byte), field 2 (string) = "a".
        Message {
            payload: vec![0x08, id, 0x12, 0x01, b'a'].into(),
            partition: Some(0),
            ..Default::default()
        }
    };
    // Field 1 with the wrong wire type (length-delimited): not an Order.
    let invalid = Message {
        payload: vec![0x0a, 0x02, b'x', b'y'].into(),
        partition: Some(0),
        ..Default::default()
    };

    let mut b = raw(&cluster, 1).await;
    let init = b
        .init_producer(InitProducerRequest {
            tenant: String::new(),
            producer_name: Some("dl-test".into()),
        })
        .await
        .expect("init producer")
        .into_inner();
    let fields = |base_sequence| ProducerFields {
        producer_id: init.producer_id,
        epoch: init.epoch,
        base_sequence,
    };
    let batch = vec![valid(1), invalid.clone(), valid(2)];
    let first = produce(&mut b, "orders", batch.clone(), Some(fields(0)))
        .await
        .expect("mixed batch");
    let flags: Vec<(bool, bool)> = first
        .positions
        .iter()
        .map(|p| (p.duplicate, p.dead_lettered))
        .collect();
    assert_eq!(flags, vec![(false, false), (false, true), (false, false)]);
    assert_eq!(first.positions[0].offset, 0);
    assert_eq!(first.positions[2].offset, 1);

    // The same batch again (a retry after a lost reply): the stored ones are duplicates with
    // their original offsets; the sequence counted the dead letter, so nothing is stored twice.
    let retry = produce(&mut b, "orders", batch, Some(fields(0)))
        .await
        .expect("retry");
    assert!(retry.positions[0].duplicate && retry.positions[2].duplicate);
    assert_eq!(retry.positions[2].offset, 1);
    // The next batch follows on at sequence 3 (three sent, two stored).
    let next = produce(&mut b, "orders", vec![valid(3)], Some(fields(3)))
        .await
        .expect("next batch follows the spanned one");
    assert_eq!(next.positions[0].offset, 2);
    assert!(!next.positions[0].duplicate);
    // An all-invalid batch still advances the sequence.
    let all_bad = produce(&mut b, "orders", vec![invalid.clone()], Some(fields(4)))
        .await
        .expect("all dead-lettered");
    assert!(all_bad.positions[0].dead_lettered);
    produce(&mut b, "orders", vec![valid(4)], Some(fields(5)))
        .await
        .expect("after an all-invalid batch");

    let msgs = stored(&client, "orders").await;
    assert_eq!(msgs.len(), 4, "valid messages stored once each");
    for (_, h) in &msgs {
        assert_eq!(header(h, "junction-schema"), Some("shop-orders@1"));
    }
    // The dead letters name the rule and the station; a retried batch may store its dead
    // letter again (dead letters are at-least-once), never the valid messages.
    let dead = stored(&client, "orders.dls").await;
    assert!((2..=3).contains(&dead.len()), "{} dead letters", dead.len());
    for (_, h) in &dead {
        let reason = header(h, "junction-dls-reason").expect("reason header");
        assert!(reason.contains("shop-orders@1"), "{reason}");
        assert_eq!(header(h, "junction-dls-station"), Some("default/orders"));
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_survives_a_controller_failover() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    orders_station(&client, Some(1)).await;
    let leader = cluster.wait_for_metadata_leader().await;
    cluster.stop(leader).await;
    let survivor = cluster.running()[0];
    let c = cluster.client_of(survivor);
    // A new controller takes registrations and keeps the history.
    let v2 = wait_until(Duration::from_secs(20), "a new controller", || {
        let c = c.clone();
        async move {
            c.create_schema(&SchemaSpec::new("orders", "json", ORDER_V2))
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(v2.version, 2);
    let info = c.get_schema("", "orders").await.expect("get");
    assert_eq!(
        info.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(info.stations, vec!["default/orders@1".to_string()]);
    // Pinned to version 1: a `note` is still refused.
    let b = raw(&cluster, survivor).await;
    let s = wait_until(Duration::from_secs(20), "a refusal by schema", || {
        let mut b = b.clone();
        async move {
            match produce(
                &mut b,
                "orders",
                vec![text(r#"{"id": 1, "note": "x"}"#)],
                None,
            )
            .await
            {
                Err(s) if s.code() == Code::InvalidArgument => Some(s),
                _ => None,
            }
        }
    })
    .await;
    assert!(s.message().contains("orders@1"), "{}", s.message());
    cluster.restart(leader).await;
    let back = cluster.client_of(leader);
    let info = wait_until(
        Duration::from_secs(20),
        "the restarted node's registry",
        || {
            let back = back.clone();
            async move {
                back.get_schema("", "orders")
                    .await
                    .ok()
                    .filter(|i| i.versions.len() == 2)
            }
        },
    )
    .await;
    assert_eq!(info.compatibility, "BACKWARD");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_commands() {
    let cluster = TestCluster::start(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = dir.path().join("v1.json");
    let bad = dir.path().join("bad.json");
    std::fs::write(&v1, ORDER_V1).expect("write");
    std::fs::write(&bad, ORDER_BAD).expect("write");
    let (v1, bad) = (v1.to_str().expect("utf-8"), bad.to_str().expect("utf-8"));
    let out = crate::cli::ok(
        &cluster,
        &["schema", "create", "orders", "--type", "json", "--file", v1],
    )
    .await;
    assert!(out.contains("registered schema orders version 1"), "{out}");
    let r = crate::cli::run(
        &cluster,
        &["schema", "check", "orders", "--type", "json", "--file", bad],
    )
    .await;
    assert!(!r.ok, "an incompatible check exits non-zero");
    assert!(r.stdout.contains("NOT compatible"), "{}", r.stdout);
    assert!(r.stdout.contains("customer"), "{}", r.stdout);
    crate::cli::ok(
        &cluster,
        &[
            "station",
            "create",
            "orders",
            "--replication-factor",
            "3",
            "--schema",
            "orders@1",
            "--on-invalid",
            "dead_letter",
        ],
    )
    .await;
    let d = crate::cli::ok_json(&cluster, &["station", "describe", "orders", "--json"]).await;
    assert_eq!(d["schema"], "orders@1");
    assert_eq!(d["on_invalid"], "dead_letter");
    let list = crate::cli::ok(&cluster, &["schema", "list"]).await;
    let row = crate::cli::row(&list, "orders");
    assert_eq!(row[1], "json");
    assert_eq!(row[2], "BACKWARD");
    assert_eq!(row[4], "default/orders@1");
    let text = crate::cli::ok(
        &cluster,
        &["schema", "describe", "orders", "--version", "1"],
    )
    .await;
    assert_eq!(text.trim(), ORDER_V1.trim());
    let r = crate::cli::run(&cluster, &["schema", "delete", "orders"]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("detach"), "{}", r.stderr);
    crate::cli::ok(&cluster, &["schema", "detach", "orders"]).await;
    crate::cli::ok(&cluster, &["schema", "compatibility", "orders", "full"]).await;
    let d = crate::cli::ok_json(&cluster, &["schema", "describe", "orders", "--json"]).await;
    assert_eq!(d["compatibility"], "FULL");
    crate::cli::ok(&cluster, &["schema", "delete", "orders"]).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_schemas_and_bad_payloads_get_clear_statuses() {
    let cluster = TestCluster::start(3).await;
    let mut schemas = SchemasClient::new(cluster.channel(1).await);
    let refused = |kind: &str, text: String| {
        let mut schemas = schemas.clone();
        let kind = kind.to_owned();
        async move {
            schemas
                .create_schema(request("bad", &kind, &text))
                .await
                .expect_err("a bad schema was registered")
        }
    };
    // Bigger than a gRPC message may be: refused by the transport, nothing registered.
    let huge = format!("{{\"description\": \"{}\"}}", "x".repeat(10 << 20));
    let s = refused("json", huge).await;
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{s:?}"
    );
    // Bigger than the schema limit (1 MiB).
    let s = refused(
        "json",
        format!("{{\"description\": \"{}\"}}", "x".repeat(2 << 20)),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("bytes"), "{}", s.message());
    // A remote reference is not fetched.
    let s = refused(
        "json",
        r#"{"$ref": "https://example.com/order.json"}"#.to_owned(),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("remote"), "{}", s.message());
    // An import the registry does not have.
    let s = refused(
        "protobuf",
        "syntax = \"proto3\"; import \"other/order.proto\"; message A { int32 x = 1; }".to_owned(),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // An Avro default of the wrong type.
    let s = refused(
        "avro",
        r#"{"type": "record", "name": "R", "fields": [{"name": "n", "type": "int", "default": "seven"}]}"#
            .to_owned(),
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = refused("xml", "<a/>".to_owned()).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(
        s.get_details_error_info().expect("info").reason,
        "BAD_SCHEMA_REQUEST"
    );
    assert!(
        schemas
            .list_schemas(junction_proto::v1::ListSchemasRequest {
                tenant: String::new()
            })
            .await
            .expect("list")
            .into_inner()
            .schemas
            .is_empty(),
        "nothing was registered"
    );

    // A payload nested deeper than the limit is refused, not validated for ever.
    schemas
        .create_schema(request("any", "json", r#"{"type": "array"}"#))
        .await
        .expect("register");
    let client = cluster.client();
    client
        .create_station_with(
            StationSpec::new("deep")
                .partitions(1)
                .replication_factor(3)
                .schema("any", None, "reject"),
        )
        .await
        .expect("station");
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let s = produce(&mut raw(&cluster, 2).await, "deep", vec![text(&deep)], None)
        .await
        .expect_err("a document nested 5000 deep was accepted");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(read_all(&client, "deep", 0).await.is_empty());
    cluster.shutdown().await;
}

/// A change made through a node that is not the controller is visible through that node as
/// soon as the call returns: the node waits to apply it before it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_made_through_a_follower_is_read_back_through_it() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_metadata_leader().await;
    let follower = cluster
        .running()
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    let c = cluster.client_of(follower);
    for i in 1..=8u32 {
        let name = format!("s{i}");
        let v = c
            .create_schema(&SchemaSpec::new(&name, "json", ORDER_V1))
            .await
            .expect("register through a follower");
        assert_eq!(v.version, 1);
        let info = c.get_schema("", &name).await.expect("read back at once");
        assert_eq!(info.versions.len(), 1, "{name}");
        c.create_schema(&SchemaSpec::new(&name, "json", ORDER_V2))
            .await
            .expect("second version");
        let info = c.get_schema("", &name).await.expect("read back at once");
        assert_eq!(
            info.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 2],
            "{name}"
        );
        c.create_station_with(StationSpec::new(&name).partitions(1).replication_factor(3))
            .await
            .expect("station through a follower");
        let s = c.describe_station(&name).await.expect("described at once");
        assert_eq!(s.partitions, 1);
    }
    // Registering a known text with an explicit mode returns the version and sets the mode.
    let mut spec = SchemaSpec::new("s1", "json", ORDER_V2);
    spec.compatibility = Some("full".into());
    let again = c.create_schema(&spec).await.expect("known text");
    assert!(again.existing);
    assert_eq!(again.version, 2);
    let info = c.get_schema("", "s1").await.expect("get");
    assert_eq!(info.compatibility, "FULL");
    cluster.shutdown().await;
}

/// `read --decode` prints Protobuf and Avro payloads as JSON with the version named in each
/// message's header; a message stored before the binding is printed as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_decode_prints_protobuf_and_avro_payloads_as_json() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let avro = r#"{"type":"record","name":"Order","fields":[{"name":"id","type":"string"},{"name":"qty","type":"int"}]}"#;
    client
        .create_schema(&SchemaSpec::new("orders-pb", "protobuf", ORDER_PROTO))
        .await
        .expect("protobuf schema");
    client
        .create_schema(&SchemaSpec::new("orders-avro", "avro", avro))
        .await
        .expect("avro schema");
    for (station, schema) in [("pb", "orders-pb"), ("av", "orders-avro")] {
        client
            .create_station_with(
                StationSpec::new(station)
                    .partitions(1)
                    .replication_factor(3)
                    .schema(schema, None, "reject"),
            )
            .await
            .expect("station");
    }
    let mut b = raw(&cluster, cluster.running()[0]).await;
    let bin = |payload: &[u8]| Message {
        payload: payload.to_vec().into(),
        partition: Some(0),
        ..Default::default()
    };
    // id = 7 (int64: a JSON string in the Protobuf mapping), sku = "x"
    produce(
        &mut b,
        "pb",
        vec![bin(&[0x08, 0x07, 0x12, 0x01, b'x'])],
        None,
    )
    .await
    .expect("protobuf produce");
    // id = "ab", qty = 3
    produce(&mut b, "av", vec![bin(&[0x04, b'a', b'b', 0x06])], None)
        .await
        .expect("avro produce");

    let out = crate::cli::ok(&cluster, &["read", "pb", "--decode"]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v, serde_json::json!({"id": "7", "sku": "x"}));
    let out = crate::cli::ok(&cluster, &["read", "av", "--decode", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["decoded"], serde_json::json!({"id": "ab", "qty": 3}));
    assert_eq!(v["headers"]["junction-schema"], "orders-avro@1");
    assert_eq!(v["offset"], 0);

    // A station without a schema: printed as stored, nothing to decode.
    client
        .create_station_with(StationSpec::new("plain").partitions(1))
        .await
        .expect("station");
    produce(&mut b, "plain", vec![text("hello")], None)
        .await
        .expect("plain produce");
    let out = crate::cli::ok(&cluster, &["read", "plain", "--decode", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["payload"], "hello");
    assert!(v.get("decoded").is_none() && v.get("decode_error").is_none());
    cluster.shutdown().await;
}

/// A node that was down while versions were registered, and whose metadata log was purged
/// meanwhile, gets the registry through a snapshot and validates with the latest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_registrations_gets_the_registry_by_snapshot() {
    use openraft::async_runtime::watch::WatchReceiver;
    let mut cluster = TestCluster::start_with(3, |c| {
        c.snapshot_every = 20;
        c.keep_logs = 5;
    })
    .await;
    let client = cluster.client();
    orders_station(&client, None).await;
    let leader = cluster.wait_for_metadata_leader().await;
    let down = cluster
        .running()
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    let down_at = cluster.broker(down).meta_applied_index();
    cluster.stop(down).await;
    // 30 more schemas and a second version of `orders` (adds `note`).
    for i in 0..30 {
        client
            .create_schema(&SchemaSpec::new(format!("s{i}"), "json", ORDER_V1))
            .await
            .expect("register while a node is down");
    }
    client
        .create_schema(&SchemaSpec::new("orders", "json", ORDER_V2))
        .await
        .expect("version 2");
    let meta_leader = cluster.wait_for_metadata_leader().await;
    // The leader's log no longer holds what the stopped node lacks.
    wait_until(Duration::from_secs(20), "the metadata log purged", || {
        let broker = cluster.broker(meta_leader);
        async move {
            let purged = broker
                .meta_raft()
                .metrics()
                .borrow_watched()
                .purged
                .map(|l| l.index);
            purged.filter(|p| *p > down_at).map(|_| ())
        }
    })
    .await;
    cluster.restart(down).await;
    let broker = cluster.broker(down);
    wait_until(Duration::from_secs(30), "the node to catch up", || {
        let broker = broker.clone();
        async move {
            let meta = broker.metadata();
            let orders = meta.schemas.get("default", "orders")?;
            (orders.latest().map(|v| v.version) == Some(2)
                && meta.schemas.get("default", "s29").is_some())
            .then_some(())
        }
    })
    .await;
    let snapshot = broker.meta_raft().metrics().borrow_watched().snapshot;
    assert!(
        snapshot.is_some_and(|s| s.index > down_at),
        "caught up through a snapshot: {snapshot:?}"
    );
    // Through that node: a `note` is valid under version 2 and carries its label.
    let mut b = raw(&cluster, down).await;
    let reply = wait_until(
        Duration::from_secs(20),
        "a produce through the node",
        || {
            let mut b = b.clone();
            async move {
                produce(&mut b, "orders", vec![text(r#"{"id":1,"note":"n"}"#)], None)
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(reply.positions.len(), 1);
    let e = produce(&mut b, "orders", vec![text(r#"{"id":"x"}"#)], None)
        .await
        .expect_err("invalid under version 2");
    assert_eq!(e.code(), Code::InvalidArgument);
    let msgs = stored(&client, "orders").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(header(&msgs[0].1, "junction-schema"), Some("orders@2"));
    cluster.shutdown().await;
}
