//! TLS on a real cluster: the client port serves the cluster's certificate, the peer port
//! demands a client certificate of the cluster CA, a plaintext client is told to use TLS, and a
//! certificate rewritten on disk is served from then on while producers keep going.

use std::sync::Arc;
use std::time::Duration;

use junction_client::{Client, ClientOptions, ProducerOptions};
use junction_proto::peer::NodeStatusRequest;
use junction_proto::peer::peer_client::PeerClient;
use junction_tls::rustls_pki_types::{self, CertificateDer};
use junction_tls::{ClientTls, DevCa, DevFiles};
use tokio::io::AsyncWriteExt;

use crate::harness::{TestCluster, keyed, read_all, wait_until};

const HOSTS: &[&str] = &["127.0.0.1", "localhost"];

/// A three-node cluster on TLS, with certificates of `ca` written to `dir`.
async fn tls_cluster(ca: &DevCa, dir: &std::path::Path) -> (TestCluster, DevFiles) {
    let files = ca.write_node_files(dir, HOSTS).expect("certificates");
    let node = files.node.clone();
    let cluster = TestCluster::start_with(3, move |c| {
        c.tls_cert = Some(node.cert.clone());
        c.tls_key = Some(node.key.clone());
        c.tls_ca = Some(node.ca.clone());
        c.tls_reload_ms = 100;
    })
    .await;
    (cluster, files)
}

fn tls_client(cluster: &TestCluster, files: &DevFiles) -> Client {
    let options = ClientOptions::default()
        .with_tls_ca_file(files.ca())
        .expect("CA file");
    Client::connect_with(cluster.addrs(), options).expect("client")
}

/// The leaf certificate node `addr` serves on its client port.
async fn served_certificate(addr: &str, files: &DevFiles) -> Option<CertificateDer<'static>> {
    let config = ClientTls::from_ca_file(files.ca()).ok()?.config();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").ok()?;
    let mut tls = junction_tls::tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .ok()?;
    let cert = tls.get_ref().1.peer_certificates()?.first()?.clone();
    let _ = tls.shutdown().await;
    Some(cert)
}

/// A `Peer` client of `addr` over TLS with `tls` (and the cluster secret).
fn peer_over(
    addr: &str,
    tls: ClientTls,
    cluster: &TestCluster,
) -> PeerClient<junction_raft::PeerChannel> {
    let secret =
        junction_raft::peer_auth::ClusterSecret::load(&cluster.secret_file()).expect("secret");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2));
    PeerClient::with_interceptor(
        junction_tls::channel(endpoint, Some(&tls)),
        junction_raft::peer_auth::AttachSecret(Some(secret), None),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_cluster_serves_tls_clients_and_refuses_plaintext_and_strangers() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = DevCa::new("test cluster CA").expect("CA");
    let (cluster, files) = tls_cluster(&ca, dir.path()).await;

    // The nodes replicate over mutual TLS; a TLS client produces and reads.
    let client = tls_client(&cluster, &files);
    client
        .create_station("secure", 1, 3)
        .await
        .expect("station");
    client
        .produce("secure", vec![keyed("k", "over TLS")])
        .await
        .expect("produce over TLS");
    let read = read_all(&client, "secure", 0).await;
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].payload, b"over TLS".to_vec());

    // A plaintext client is told to use TLS, without retrying for its whole deadline.
    let plain = Client::connect_with(
        cluster.addrs(),
        ClientOptions::default().with_retry_deadline(Duration::from_secs(20)),
    )
    .expect("client");
    let started = std::time::Instant::now();
    let refused = plain.cluster_status().await.expect_err("plaintext refused");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::Unauthenticated),
        "{refused}"
    );
    assert!(refused.to_string().contains("requires TLS"), "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a plaintext client retried for {:?}",
        started.elapsed()
    );

    // The peer port: a TLS client without a certificate, or with one of another CA, cannot
    // even ask for the node's status; the node's own kind of certificate can.
    let peer =
        junction_raft::peer_address(&cluster.addr(1), junction_raft::DEFAULT_PEER_PORT_OFFSET)
            .expect("peer address");
    let other_ca = DevCa::new("another CA").expect("CA");
    let other_dir = tempfile::tempdir().expect("dir");
    let other = other_ca
        .write_node_files(other_dir.path(), HOSTS)
        .expect("other certificates");
    // Trusts the cluster CA (so the server is accepted) but presents the other CA's cert.
    let mut stranger_paths = other.node.clone();
    stranger_paths.ca = files.ca().to_path_buf();
    let stranger = junction_tls::NodeTls::load(stranger_paths).expect("stranger TLS");
    for (what, tls) in [
        (
            "no client certificate",
            ClientTls::from_ca_file(files.ca()).expect("CA"),
        ),
        ("another CA's certificate", ClientTls::of_node(stranger)),
    ] {
        let mut c = peer_over(&peer, tls, &cluster);
        let r = c.node_status(NodeStatusRequest {}).await;
        assert!(r.is_err(), "{what}: the peer port answered");
    }
    let own = junction_tls::NodeTls::load(files.node.clone()).expect("node TLS");
    let mut c = peer_over(&peer, ClientTls::of_node(own), &cluster);
    c.node_status(NodeStatusRequest {})
        .await
        .expect("a node certificate of the cluster CA is accepted");
    // Plaintext on the peer port is refused too.
    let mut plain_peer = PeerClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    let r = plain_peer
        .node_status(NodeStatusRequest {})
        .await
        .expect_err("plaintext peer call refused");
    assert_eq!(r.code(), tonic::Code::Unauthenticated, "{r}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_rewritten_on_disk_is_served_while_producers_keep_going() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = DevCa::new("test cluster CA").expect("CA");
    let (cluster, files) = tls_cluster(&ca, dir.path()).await;
    let client = tls_client(&cluster, &files);
    client
        .create_station("rotate", 3, 3)
        .await
        .expect("station");
    let before: Vec<_> = {
        let mut v = Vec::new();
        for addr in cluster.addrs() {
            v.push(
                served_certificate(&addr, &files)
                    .await
                    .expect("a certificate"),
            );
        }
        v
    };

    // Producing all along, from a producer whose connections were made before the renewal.
    let producer = Arc::new(client.producer("rotate", ProducerOptions::default()));
    let p = producer.clone();
    let sending = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..600u32 {
            sent.push(p.send(keyed(&format!("k{}", i % 7), i.to_string())));
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut acked = 0;
        for s in sent {
            s.await.expect("acknowledged across the renewal");
            acked += 1;
        }
        acked
    });

    // The renewal: same CA, new key and certificate, as cert-manager writes it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ca.write_node_files(dir.path(), HOSTS)
        .expect("renewed certificates");
    for (addr, old) in cluster.addrs().iter().zip(&before) {
        wait_until(
            Duration::from_secs(10),
            "the renewed certificate served",
            || async {
                let now = served_certificate(addr, &files).await?;
                (now != *old).then_some(())
            },
        )
        .await;
    }
    assert_eq!(sending.await.expect("sender"), 600);
    producer.flush().await.expect("flush");

    // New connections (a new client, the nodes between themselves) work with the new files.
    let fresh = tls_client(&cluster, &files);
    fresh
        .produce("rotate", vec![keyed("after", "renewal")])
        .await
        .expect("produce after the renewal");
    let mut total = 0;
    for partition in 0..3 {
        total += read_all(&fresh, "rotate", partition).await.len();
    }
    assert_eq!(total, 601, "every acknowledged message is there once");
    cluster.shutdown().await;
}

/// `junction dev`'s shape: `--plaintext-client-port` keeps the client port plaintext (a plain
/// client works, forwarded calls too) while the nodes replicate over mutual TLS and the peer
/// port still refuses a caller without the cluster's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plaintext_client_port_keeps_mutual_tls_between_the_nodes() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = DevCa::new("test cluster CA").expect("CA");
    let files = ca
        .write_node_files(dir.path(), HOSTS)
        .expect("certificates");
    let node = files.node.clone();
    let cluster = TestCluster::start_with(3, move |c| {
        c.tls_cert = Some(node.cert.clone());
        c.tls_key = Some(node.key.clone());
        c.tls_ca = Some(node.ca.clone());
        c.plaintext_client_port = true;
    })
    .await;
    // A plain client of node 1 only: creating and producing are forwarded to the leaders.
    let plain = cluster.client_of(1);
    plain.create_station("dev", 3, 3).await.expect("station");
    for p in 0..3u32 {
        plain
            .produce(
                "dev",
                vec![junction_proto::v1::Message {
                    partition: Some(p),
                    ..keyed("k", "plain")
                }],
            )
            .await
            .expect("produce, forwarded as needed");
    }
    let mut total = 0;
    for p in 0..3 {
        total += read_all(&plain, "dev", p).await.len();
    }
    assert_eq!(total, 3);
    let peer =
        junction_raft::peer_address(&cluster.addr(1), junction_raft::DEFAULT_PEER_PORT_OFFSET)
            .expect("peer address");
    let mut stranger = peer_over(
        &peer,
        ClientTls::from_ca_file(files.ca()).expect("CA"),
        &cluster,
    );
    assert!(
        stranger.node_status(NodeStatusRequest {}).await.is_err(),
        "the peer port answered a caller without a certificate"
    );
    cluster.shutdown().await;
}
