//! TLS connections for tonic: the server's accept loop and the client's connector.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};

use crate::{H2, HANDSHAKE_TIMEOUT, NodeTls, TlsError, provider, read, roots};

/// One accepted TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
}

impl TlsConn {
    /// The client's certificate chain, when it presented one (the peer port requires it).
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.inner.get_ref().1.peer_certificates()
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local,
            remote_addr: self.remote,
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` until `stop`, and yields those whose TLS handshake
/// (with the configuration `config()` returns at that moment) completes within
/// [`HANDSHAKE_TIMEOUT`]. Each handshake runs in its own task; a failed one (a plaintext
/// client, a client certificate from another CA) is logged with the remote address and
/// dropped. `what` names the listener in the logs.
pub fn incoming(
    listener: TcpListener,
    config: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    what: &'static str,
    stop: CancellationToken,
) -> impl Stream<Item = Result<TlsConn, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, go on.
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let acceptor = tokio_rustls::TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                // A TLS connection starts with a handshake record (content type 22); anything
                // else is a plaintext client, answered with a clear gRPC error.
                let mut first = [0u8; 1];
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                    Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
                        tracing::warn!(listener = what, %remote, "plaintext connection to a TLS port refused");
                        refuse_plaintext(tcp).await;
                        return;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => return,
                }
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let conn = TlsConn {
                            inner,
                            local,
                            remote: Some(remote),
                        };
                        let _closed = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(listener = what, %remote, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        tracing::warn!(listener = what, %remote, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream_from(rx)
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 22;

/// What a plaintext gRPC client is told.
pub const PLAINTEXT_REFUSED: &str = "this port requires TLS: connect with TLS and trust the cluster's CA (junction --tls-ca FILE or JUNCTION_TLS_CA; the dev cluster's is ./data/tls/ca.pem)";

/// Answers every request of a plaintext HTTP/2 connection with gRPC status UNAUTHENTICATED
/// and [`PLAINTEXT_REFUSED`] (a trailers-only response), then lets it close: a client that
/// forgot TLS learns why at once instead of retrying a connection that keeps breaking.
async fn refuse_plaintext(tcp: TcpStream) {
    let service = hyper::service::service_fn(|_req| async {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "16")
            .header("grpc-message", percent_encode(PLAINTEXT_REFUSED))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), service);
    // Bounded: the client gets its answers, then the connection goes.
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn).await;
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except `%` stays.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Where a client's TLS configuration comes from: fixed, or a node's current one.
#[derive(Clone)]
pub struct ClientTls {
    source: Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates of a PEM file; no client certificate.
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let pem = read("CA file", path)?;
        Self::from_ca_pem(path, &pem)
    }

    /// Trusts the CA certificates of PEM bytes (`path` names them in errors).
    pub fn from_ca_pem(path: &Path, pem: &[u8]) -> Result<Self, TlsError> {
        let roots = roots(path, pem)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Ca {
                path: path.to_owned(),
                source,
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![H2.to_vec()];
        Ok(Self::fixed(Arc::new(config)))
    }

    /// A fixed configuration.
    pub fn fixed(config: Arc<ClientConfig>) -> Self {
        Self {
            source: Arc::new(move || config.clone()),
            server_name: None,
        }
    }

    /// A node's outgoing configuration, as it is at each connect (reloaded certificates are
    /// presented from the next connection on).
    pub fn of_node(tls: Arc<NodeTls>) -> Self {
        Self {
            source: Arc::new(move || tls.outgoing()),
            server_name: None,
        }
    }

    /// Verifies servers against `name` instead of the host dialled (a certificate made for a
    /// DNS name, reached through an IP address or a tunnel).
    pub fn with_server_name(
        mut self,
        name: &str,
    ) -> Result<Self, rustls_pki_types::InvalidDnsNameError> {
        self.server_name = Some(ServerName::try_from(name.to_owned())?);
        Ok(self)
    }

    /// The configuration for a connection made now.
    pub fn config(&self) -> Arc<ClientConfig> {
        (self.source)()
    }
}

/// A tonic connector that dials TCP and runs a TLS handshake.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    tls: ClientTls,
}

impl TlsConnector {
    pub fn new(tls: ClientTls) -> Self {
        Self { tls }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid(format!("no port in {uri}")))?;
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("{host} is no valid TLS server name: {e}")))?,
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls.config())
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A lazily connecting channel for `endpoint`: TLS through [`TlsConnector`] when `tls` is
/// given (the endpoint's URI then stays `http://`, the connector does the TLS), plain TCP
/// otherwise.
pub fn channel(endpoint: Endpoint, tls: Option<&ClientTls>) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector::new(tls.clone())),
        None => endpoint.connect_lazy(),
    }
}
