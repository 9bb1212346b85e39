use std::sync::Arc;

use futures::StreamExt;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A TLS listener on 127.0.0.1 serving `config()`; echoes one byte per connection.
async fn serve(
    config: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    stop: CancellationToken,
) -> Result<std::net::SocketAddr, std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut conns = Box::pin(incoming(listener, config, "test", stop));
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = conns.next().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if conn.read_exact(&mut b).await.is_ok() {
                    let _ = conn.write_all(&b).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Connects, round-trips a byte, and returns the server's leaf certificate.
async fn handshake(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<CertificateDer<'static>, Box<dyn std::error::Error>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1")?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?;
    Ok(certs.first().ok_or("empty chain")?.clone().into_owned())
}

/// A client trusting `trusted` that presents a certificate issued by `issuer` (or none).
fn client(
    trusted: &DevCa,
    issuer: Option<&DevCa>,
) -> Result<Arc<ClientConfig>, Box<dyn std::error::Error>> {
    let p = Path::new("test");
    let mut roots = RootCertStore::empty();
    for c in parse_certs("ca", p, trusted.cert_pem().as_bytes())? {
        roots.add(c)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match issuer {
        Some(ca) => {
            let (cert, key) = ca.issue(&["127.0.0.1"])?;
            builder.with_client_auth_cert(
                parse_certs("cert", p, cert.as_bytes())?,
                parse_key(p, key.as_bytes())?,
            )?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A CA, node files in a temp dir, their `NodeTls`, and a listener serving the client port's
/// (or, with `peer`, the peer port's) configuration.
struct Fixture {
    dir: tempfile::TempDir,
    ca: DevCa,
    files: DevFiles,
    tls: Arc<NodeTls>,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

async fn fixture(hosts: &[&str], peer: bool) -> Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let ca = DevCa::new("test CA")?;
    let files = ca.write_node_files(dir.path(), hosts)?;
    let tls = NodeTls::load(files.node.clone())?;
    let stop = CancellationToken::new();
    let t = tls.clone();
    let addr = if peer {
        serve(move || t.peer_port(), stop.clone()).await?
    } else {
        serve(move || t.client_port(), stop.clone()).await?
    };
    Ok(Fixture {
        dir,
        ca,
        files,
        tls,
        addr,
        stop,
    })
}

#[tokio::test]
async fn a_rewritten_certificate_is_served_from_the_next_connection_on() -> TestResult {
    let Fixture {
        dir,
        ca,
        files,
        tls,
        addr,
        stop,
    } = fixture(&["127.0.0.1", "localhost"], false).await?;
    let trust = ClientTls::from_ca_file(files.ca())?.config();

    let first = handshake(addr, trust.clone()).await?;
    assert!(
        !tls.reload_if_changed()?,
        "unchanged files are not reloaded"
    );
    assert_eq!(tls.loads(), 1);

    // The files are replaced (a renewal by the same CA), as cert-manager does.
    ca.write_node_files(dir.path(), &["127.0.0.1", "localhost"])?;
    assert!(tls.reload_if_changed()?, "changed files are reloaded");
    assert_eq!(tls.loads(), 2);
    let second = handshake(addr, trust).await?;
    assert_ne!(first, second, "the new certificate is served");
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn files_that_do_not_load_keep_the_previous_certificate() -> TestResult {
    let Fixture {
        dir: _dir,
        ca,
        files,
        tls,
        addr,
        stop,
    } = fixture(&["127.0.0.1"], false).await?;
    let trust = ClientTls::from_ca_file(files.ca())?.config();
    let before = handshake(addr, trust.clone()).await?;

    // A key that does not belong to the certificate (half of a rotation).
    let (_, other_key) = ca.issue(&["127.0.0.1"])?;
    std::fs::write(&files.node.key, other_key)?;
    let err = tls
        .reload_if_changed()
        .err()
        .ok_or("a mismatched key was loaded")?;
    assert!(matches!(err, TlsError::Config { .. }), "{err}");
    // A truncated certificate file.
    std::fs::write(&files.node.cert, b"")?;
    let err = tls
        .reload_if_changed()
        .err()
        .ok_or("an empty file was loaded")?;
    assert!(matches!(err, TlsError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("node.pem"), "{err}");

    assert_eq!(tls.loads(), 1);
    assert_eq!(
        handshake(addr, trust).await?,
        before,
        "still the old certificate"
    );
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn the_peer_port_requires_a_certificate_of_the_cluster_ca() -> TestResult {
    let other = DevCa::new("another CA")?;
    let Fixture {
        dir: _dir,
        ca,
        files: _,
        tls,
        addr,
        stop,
    } = fixture(&["127.0.0.1"], true).await?;

    handshake(addr, client(&ca, Some(&ca))?).await?;
    // The node's own outgoing configuration is such a client.
    handshake(addr, tls.outgoing()).await?;
    for (what, config) in [
        ("no client certificate", client(&ca, None)?),
        ("a certificate of another CA", client(&ca, Some(&other))?),
    ] {
        assert!(
            handshake(addr, config).await.is_err(),
            "{what} was accepted on the peer port"
        );
    }
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn a_plaintext_client_is_told_to_use_tls() -> TestResult {
    let Fixture {
        dir: _dir,
        ca: _,
        files,
        tls: _,
        addr,
        stop,
    } = fixture(&["127.0.0.1"], false).await?;

    // A plaintext gRPC client is told, at once and without retrying, that TLS is needed.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let refused = tokio::time::timeout(
        HANDSHAKE_TIMEOUT / 2,
        health.check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await?
    .err()
    .ok_or("a plaintext call succeeded on a TLS port")?;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert_eq!(refused.message(), PLAINTEXT_REFUSED);
    // A silent client meanwhile does not block a real one.
    let _silent = TcpStream::connect(addr).await?;
    handshake(addr, ClientTls::from_ca_file(files.ca())?.config()).await?;
    stop.cancel();
    Ok(())
}

#[test]
fn missing_and_malformed_files_are_named() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = DevCa::new("test CA")?;
    let files = ca.write_node_files(dir.path(), &["127.0.0.1"])?;
    let mut paths = files.node.clone();
    paths.key = dir.path().join("missing.key");
    let err = NodeTls::load(paths).err().ok_or("a missing key loaded")?;
    assert!(
        matches!(err, TlsError::Read { .. }) && err.to_string().contains("missing.key"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )?;
    let mut paths = files.node.clone();
    paths.ca = garbage;
    let err = NodeTls::load(paths).err().ok_or("a garbage CA loaded")?;
    assert!(err.to_string().contains("garbage.pem"), "{err}");
    assert!(ClientTls::from_ca_file(&dir.path().join("nope.pem")).is_err());
    Ok(())
}
