//! TLS for Junction's listeners and outgoing connections, on rustls with the `ring` provider
//! (no OpenSSL, no aws-lc).
//!
//! - [`NodeTls`]: a node's certificate, key and cluster CA, read from PEM files and read again
//!   when they change ([`NodeTls::watch`]), so a renewed certificate (cert-manager rewrites the
//!   Secret's files) is served without a restart. A set of files that does not load (a key
//!   that does not match its certificate, a half-written file) keeps the previous set in use
//!   and is reported; nothing is ever served with a default.
//! - [`incoming`]: the accept loop of a TLS listener for tonic: handshakes run in their own
//!   tasks with a deadline, so a slow or plaintext client cannot hold up the others, and each
//!   connection takes the configuration current when it arrived.
//! - [`ClientTls`] and [`channel`]: a tonic channel whose connections are TLS, with the
//!   configuration (and so the client certificate) current at each connect.
//! - [`DevCa`]: a throwaway certificate authority for `junction dev` and tests.
//!
//! The client port serves TLS without asking for client certificates (clients authenticate
//! with tokens); the peer port requires a client certificate signed by the cluster CA.

mod dev;
mod io;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

pub use crate::dev::{DevCa, DevFiles};
pub use crate::io::{ClientTls, PLAINTEXT_REFUSED, TlsConn, TlsConnector, channel, incoming};
/// The rustls types this crate's API uses, for callers that inspect connections.
pub use {rustls, rustls_pki_types, tokio_rustls};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`NodeTls::watch`] looks at the files by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Why TLS material could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("TLS setup with {cert} and {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("the CA file {path} cannot verify client certificates: {reason}")]
    Verifier { path: PathBuf, reason: String },
    #[error("CA certificate in {path}: {source}")]
    Ca {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The three PEM files of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The node's certificate chain (leaf first). It must name the host part of the node's
    /// advertised address (DNS name or IP) and allow both server and client authentication.
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA: verifies the other nodes (client certificates on the peer port, server
    /// certificates when this node dials) and is what clients trust.
    pub ca: PathBuf,
}

/// The crypto provider of every configuration made here: *ring*. rustls deprecates it for
/// lacking post-quantum key exchange (aws-lc-rs has it), but aws-lc-rs is a large C/CMake
/// build; the trade-off is written down in docs/security.md.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const H2: &[u8] = b"h2";

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Parses every certificate of a PEM file.
pub fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "private key",
            path: path.to_owned(),
            expected: "PEM private key",
        },
        other => TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// A root store of the certificates of a PEM file.
pub fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs("CA file", path, pem)? {
        roots.add(cert).map_err(|source| TlsError::Ca {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The bytes of the three files, as last loaded.
#[derive(PartialEq, Eq)]
struct FileBytes {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

/// The configurations made from one set of files.
struct Material {
    files: FileBytes,
    client_port: Arc<ServerConfig>,
    peer_port: Arc<ServerConfig>,
    outgoing: Arc<ClientConfig>,
}

impl Material {
    fn build(paths: &TlsPaths, files: FileBytes) -> Result<Self, TlsError> {
        let chain = parse_certs("certificate file", &paths.cert, &files.cert)?;
        let key = parse_key(&paths.key, &files.key)?;
        let roots = Arc::new(roots(&paths.ca, &files.ca)?);
        let config_error = |source| TlsError::Config {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            source,
        };
        let builder = || {
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(config_error)
        };
        let mut client_port = builder()?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_error)?;
        client_port.alpn_protocols = vec![H2.to_vec()];
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier {
                path: paths.ca.clone(),
                reason: e.to_string(),
            })?;
        let mut peer_port = builder()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_error)?;
        peer_port.alpn_protocols = vec![H2.to_vec()];
        let mut outgoing = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_error)?;
        outgoing.alpn_protocols = vec![H2.to_vec()];
        Ok(Self {
            files,
            client_port: Arc::new(client_port),
            peer_port: Arc::new(peer_port),
            outgoing: Arc::new(outgoing),
        })
    }
}

/// A node's TLS configurations, made from its PEM files and remade when they change.
pub struct NodeTls {
    paths: TlsPaths,
    current: ArcSwap<Material>,
    loads: AtomicU64,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("paths", &self.paths)
            .field("loads", &self.loads.load(Ordering::Relaxed))
            .finish()
    }
}

impl NodeTls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(paths: TlsPaths) -> Result<Arc<Self>, TlsError> {
        let files = Self::read_files(&paths)?;
        let material = Material::build(&paths, files)?;
        Ok(Arc::new(Self {
            paths,
            current: ArcSwap::from_pointee(material),
            loads: AtomicU64::new(1),
        }))
    }

    fn read_files(paths: &TlsPaths) -> Result<FileBytes, TlsError> {
        Ok(FileBytes {
            cert: read("certificate file", &paths.cert)?,
            key: read("private key file", &paths.key)?,
            ca: read("CA file", &paths.ca)?,
        })
    }

    /// The files this was loaded from.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// How many times a set of files was loaded (1 after [`NodeTls::load`]).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The client port's configuration: the node's certificate, no client certificates.
    pub fn client_port(&self) -> Arc<ServerConfig> {
        self.current.load().client_port.clone()
    }

    /// The peer port's configuration: a client certificate signed by the CA is required.
    pub fn peer_port(&self) -> Arc<ServerConfig> {
        self.current.load().peer_port.clone()
    }

    /// The configuration of connections this node makes: trusts the CA, presents the node's
    /// certificate when asked.
    pub fn outgoing(&self) -> Arc<ClientConfig> {
        self.current.load().outgoing.clone()
    }

    /// Reads the files and, when their bytes changed, makes new configurations from them.
    /// Returns whether it did; on an error the configurations in use stay.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let files = Self::read_files(&self.paths)?;
        if files == self.current.load().files {
            return Ok(false);
        }
        let material = Material::build(&self.paths, files)?;
        self.current.store(Arc::new(material));
        self.loads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Looks at the files every `every` until `stop`, logging each reload and each set of
    /// files that does not load (once per distinct error).
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match tls.reload_if_changed() {
                    Ok(true) => {
                        last_error = None;
                        tracing::info!(cert = %tls.paths.cert.display(), "TLS certificate reloaded");
                    }
                    Ok(false) => last_error = None,
                    Err(e) => {
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!(
                                error = %e,
                                "TLS files changed but do not load; still serving the previous certificate"
                            );
                            last_error = Some(e);
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
