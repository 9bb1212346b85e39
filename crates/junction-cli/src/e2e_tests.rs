//! The commands against the in-memory fake cluster of `mock.rs`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use clap::Parser;

use crate::ClientCommand;
use crate::mock::Mock;

#[derive(clap::Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: ClientCommand,
}

fn parse(server: &str, args: &[&str]) -> ClientCommand {
    let argv = ["junction"]
        .iter()
        .chain(args)
        .copied()
        .chain(["--server", server]);
    Cli::try_parse_from(argv.collect::<Vec<_>>())
        .unwrap()
        .command
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

async fn produce(server: &str, args: &[&str], input: &[u8]) -> anyhow::Result<u64> {
    let ClientCommand::Produce(args) = parse(server, args) else {
        panic!("not produce");
    };
    crate::produce::run_from(args, input).await
}

async fn read(server: &str, args: &[&str]) -> anyhow::Result<String> {
    let ClientCommand::Read(args) = parse(server, args) else {
        panic!("not read");
    };
    let out = Captured::default();
    crate::read::run_to(args, Box::new(out.clone())).await?;
    Ok(out.text())
}

#[tokio::test]
async fn produce_then_read() {
    let mock = Mock::default();
    let server = mock.clone().start().await.to_string();
    crate::run_client(parse(
        &server,
        &["station", "create", "demo", "--partitions", "2"],
    ))
    .await
    .unwrap();

    let input: String = (0..2000)
        .map(|i| format!("k{}\tline {i}\n", i % 7))
        .collect();
    let acked = produce(
        &server,
        &["produce", "demo", "--key-sep", "\\t"],
        input.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(acked, 2000);
    let stored = mock.payloads("demo");
    assert_eq!(stored.iter().map(Vec::len).sum::<usize>(), 2000);
    assert!(
        stored.iter().all(|log| !log.is_empty()),
        "keys spread over partitions"
    );

    let acked = produce(
        &server,
        &["produce", "demo", "--partition", "1"],
        b"last\r\n",
    )
    .await
    .unwrap();
    assert_eq!(acked, 1);

    // Every partition, to the end.
    let text = read(&server, &["read", "demo"]).await.unwrap();
    assert_eq!(text.lines().count(), 2001);
    assert!(text.ends_with("last\n"));

    // --count across partitions, JSON.
    let text = read(&server, &["read", "demo", "--count", "5", "--json"])
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["partition"], 0);
    assert_eq!(lines[0]["offset"], 0);
    assert!(lines[0]["key"].as_str().unwrap().starts_with('k'));

    // One partition from an offset.
    let text = read(
        &server,
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
    .await
    .unwrap();
    assert_eq!(text.lines().count(), 2);

    // Follow: waits for new messages.
    let follow = tokio::spawn({
        let server = server.clone();
        async move {
            read(
                &server,
                &[
                    "read",
                    "demo",
                    "--partition",
                    "0",
                    "--from",
                    "latest",
                    "--follow",
                    "--count",
                    "3",
                ],
            )
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    produce(
        &server,
        &["produce", "demo", "--partition", "0"],
        b"a\nb\nc\n",
    )
    .await
    .unwrap();
    let text = tokio::time::timeout(std::time::Duration::from_secs(10), follow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(text, "a\nb\nc\n");
}

#[tokio::test]
async fn produce_to_a_missing_station_fails() {
    let server = Mock::default().start().await.to_string();
    let err = produce(&server, &["produce", "nope"], b"x\ny\n")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("failed"), "{err:#}");
}

#[tokio::test]
async fn admin_commands_run() {
    let mock = Mock::default();
    let server = mock.clone().start().await.to_string();
    for args in [
        &["tenant", "create", "acme"][..],
        &["tenant", "list"],
        &[
            "station",
            "create",
            "acme/orders",
            "--partitions",
            "3",
            "--max-message-bytes",
            "1000",
        ],
        &["station", "list"],
        &["station", "list", "--tenant", "acme", "--json"],
        &["station", "describe", "acme/orders"],
        &["station", "describe", "acme/orders", "--json"],
        &["cluster", "status"],
        &["cluster", "status", "--json"],
        &["station", "delete", "acme/orders"],
    ] {
        crate::run_client(parse(&server, args))
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
    }
    let err = crate::run_client(parse(&server, &["station", "describe", "acme/orders"]))
        .await
        .unwrap_err();
    let code = err
        .downcast_ref::<junction_client::ClientError>()
        .and_then(junction_client::ClientError::code);
    assert_eq!(code, Some(tonic::Code::NotFound), "{err:#}");
}

#[test]
fn cluster_status_text() {
    use junction_client::proto::*;
    let status = ClusterStatusResponse {
        nodes: vec![NodeInfo {
            id: 1,
            addr: "127.0.0.1:7701".into(),
            alive: true,
            partition_replicas: 2,
            partition_leaders: 1,
        }],
        metadata_leader: Some(1),
        metadata_term: 3,
        stations: vec![StationInfo {
            tenant: "default".into(),
            name: "demo".into(),
            partitions: 1,
            partition_info: vec![PartitionInfo {
                partition: 0,
                replicas: vec![1, 2, 3],
                leader: None,
                next_offset: 9,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    assert_eq!(
        crate::cluster::status_text(&status),
        "metadata leader: node 1 (term 3)\n\n\
         NODE  ADDRESS         ALIVE  REPLICAS  LEADERS\n\
         1     127.0.0.1:7701  yes    2         1\n\n\
         STATION       PARTITION  LEADER  REPLICAS  NEXT OFFSET\n\
         default/demo  0          -       1,2,3     9\n"
    );
}
