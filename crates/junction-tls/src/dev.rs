//! A throwaway certificate authority: `junction dev` makes one under `./data/tls`, tests make
//! their own. Never for production: its key sits next to the certificates it signs.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::{TlsError, TlsPaths};

/// A certificate authority held in memory.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// The files [`DevCa::write_node_files`] wrote.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// Certificate, key and CA, for `junction serve --tls-cert/--tls-key/--tls-ca`.
    pub node: TlsPaths,
}

impl DevCa {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A node certificate for `hosts` (DNS names or IP addresses), usable for both server and
    /// client authentication (a node is both), and its key: (certificate PEM, key PEM).
    pub fn issue(&self, hosts: &[&str]) -> Result<(String, String), TlsError> {
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            hosts.first().copied().unwrap_or("junction"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `ca.pem`, `node.pem` and `node.key` (mode 0600) for `hosts` into `dir`.
    pub fn write_node_files(&self, dir: &Path, hosts: &[&str]) -> Result<DevFiles, TlsError> {
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(write_error(dir))?;
        let (cert, key) = self.issue(hosts)?;
        let files = DevFiles::in_dir(dir);
        write_atomically(&files.node.ca, self.cert_pem().as_bytes(), 0o644)?;
        write_atomically(&files.node.key, key.as_bytes(), 0o600)?;
        write_atomically(&files.node.cert, cert.as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// Writes a file through a temporary name and a rename, so a reader sees the old or the new
/// bytes, never half of them.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

impl DevFiles {
    /// The names of the files in `dir`.
    fn in_dir(dir: &Path) -> Self {
        DevFiles {
            node: TlsPaths {
                cert: dir.join("node.pem"),
                key: dir.join("node.key"),
                ca: dir.join("ca.pem"),
            },
        }
    }

    /// The CA certificate clients trust (`--tls-ca`).
    pub fn ca(&self) -> &Path {
        &self.node.ca
    }

    /// The files of an earlier [`DevCa::write_node_files`] into `dir`, if all are there.
    pub fn existing(dir: &Path) -> Option<Self> {
        let files = DevFiles::in_dir(dir);
        [&files.node.cert, &files.node.key, &files.node.ca]
            .iter()
            .all(|p| p.is_file())
            .then_some(files)
    }
}
