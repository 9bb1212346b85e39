//! Authentication of node-to-node (`Peer`) calls with a cluster secret.
//!
//! Every node of a cluster is given the same secret (a file, `--cluster-secret-file`); a
//! node sends it with each peer call in the [`CLUSTER_SECRET_HEADER`] metadata, and the
//! `Peer` service refuses any call without it, UNAUTHENTICATED. So a client that can reach
//! the port can neither join the cluster, nor vote, nor append, nor read a node's status.
//! The secret travels in the clear unless the connection is encrypted; it stops outsiders
//! and mistakes (a node of another cluster dialling the wrong address), not an eavesdropper.
//! A node without a secret accepts every peer call and says so loudly at start.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::RaftStoreError;

/// The metadata key that carries the secret.
pub const CLUSTER_SECRET_HEADER: &str = "x-junction-cluster-secret";
/// The metadata key that carries the id of the caller's cluster, once it knows one.
pub const CLUSTER_ID_HEADER: &str = "x-junction-cluster-id";

/// The id of the cluster a node's data belongs to, shared by its peer clients (which send it)
/// and its peer service (which checks callers against it).
///
/// The node that initialises the cluster makes the id, once; every other node adopts it from
/// the first authenticated peer call that carries one and keeps it in its store. (Clusters
/// initialised by a build without ids have none, and these checks stay off for them.) From then on a call
/// carrying another id is refused: a node started on another cluster's data directory (a
/// restored backup, a swapped volume) can neither take part in this cluster nor pull it into
/// its own state, and says so, naming both ids.
#[derive(Clone, Default)]
pub struct ClusterIdentity {
    inner: Arc<IdentityInner>,
}

#[derive(Default)]
struct IdentityInner {
    store: Option<junction_storage::Store>,
    /// The id kept in the store.
    id: parking_lot::RwLock<Option<AsciiMetadataValue>>,
}

impl fmt::Debug for ClusterIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterIdentity({:?})", self.get())
    }
}

impl ClusterIdentity {
    /// The identity kept in `store` (none yet for a new node).
    pub fn load(store: junction_storage::Store) -> Result<Self, RaftStoreError> {
        let id = match store.cluster_id()? {
            Some(text) => Some(Self::value(&text)?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(IdentityInner {
                store: Some(store),
                id: parking_lot::RwLock::new(id),
            }),
        })
    }

    fn value(text: &str) -> Result<AsciiMetadataValue, RaftStoreError> {
        AsciiMetadataValue::try_from(text)
            .map_err(|_| RaftStoreError::ClusterSecret(format!("bad cluster id {text:?}")))
    }

    /// The cluster id, once known.
    pub fn get(&self) -> Option<String> {
        self.inner
            .id
            .read()
            .as_ref()
            .and_then(|v| v.to_str().ok().map(str::to_owned))
    }

    /// What peer calls carry: the kept id.
    fn header(&self) -> Option<AsciiMetadataValue> {
        self.inner.id.read().clone()
    }

    /// Makes and keeps a new random id (128 bits, hex); for the node that initialises a
    /// cluster. An id already kept stays.
    pub fn create(&self) -> Result<String, RaftStoreError> {
        let id = random_hex(16)
            .map_err(|e| RaftStoreError::ClusterSecret(format!("generating a cluster id: {e}")))?;
        match self.adopt(&id) {
            Ok(_) => Ok(id),
            Err(RaftStoreError::ClusterMismatch { ours, .. }) => Ok(ours),
            Err(e) => Err(e),
        }
    }

    fn compare(ours: &AsciiMetadataValue, id: &str) -> Result<bool, RaftStoreError> {
        if ours.as_bytes() == id.as_bytes() {
            Ok(false)
        } else {
            Err(RaftStoreError::ClusterMismatch {
                ours: ours.to_str().unwrap_or("?").to_owned(),
                theirs: id.to_owned(),
            })
        }
    }

    /// Takes `id` as this node's cluster id when it has none (stored before it is used);
    /// `Ok(true)` when it was adopted now, `Ok(false)` when it was already this node's, and
    /// [`RaftStoreError::ClusterMismatch`] when this node belongs to another cluster.
    pub fn adopt(&self, id: &str) -> Result<bool, RaftStoreError> {
        // Every checked peer call comes here: the usual case (the id is known) takes only the
        // read lock.
        if let Some(ours) = self.inner.id.read().as_ref() {
            return Self::compare(ours, id);
        }
        let mut current = self.inner.id.write();
        if let Some(ours) = current.as_ref() {
            return Self::compare(ours, id);
        }
        let value = Self::value(id)?;
        if let Some(store) = &self.inner.store {
            store.set_cluster_id(id)?;
        }
        *current = Some(value);
        Ok(true)
    }
}

/// `n` random bytes from the kernel's generator, as hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates `path` holding `text` (readable by its owner only), unless it exists: writes a
/// private temporary file beside it, fsyncs it, and hard-links it into place, which fails
/// atomically if the path exists. So processes racing to create one file agree on one
/// content and none reads it partly written. Returns whether this call created it.
pub fn create_whole(path: &Path, text: &str) -> std::io::Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{}", std::process::id(), random_hex(8)?));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let linked = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Shortest secret accepted: 32 characters (the dev cluster's are 64 hex digits, 256 bits).
pub const MIN_SECRET_LEN: usize = 32;

/// A validated cluster secret. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct ClusterSecret {
    value: Arc<AsciiMetadataValue>,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// Checks a secret: printable ASCII without spaces, at least [`MIN_SECRET_LEN`] long.
    /// Surrounding whitespace (a file's final newline) is ignored.
    pub fn new(text: &str) -> Result<Self, RaftStoreError> {
        let text = text.trim();
        if text.len() < MIN_SECRET_LEN {
            return Err(RaftStoreError::ClusterSecret(format!(
                "it has {} characters; at least {MIN_SECRET_LEN} are needed",
                text.len()
            )));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RaftStoreError::ClusterSecret(
                "only printable ASCII characters without spaces are allowed".to_owned(),
            ));
        }
        let value = AsciiMetadataValue::try_from(text)
            .map_err(|_| RaftStoreError::ClusterSecret("not a valid metadata value".to_owned()))?;
        Ok(Self {
            value: Arc::new(value),
        })
    }

    /// Reads the secret from a file.
    pub fn load(path: &Path) -> Result<Self, RaftStoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RaftStoreError::ClusterSecret(format!("reading {}: {e}", path.display()))
        })?;
        Self::new(&text).map_err(|e| match e {
            RaftStoreError::ClusterSecret(why) => {
                RaftStoreError::ClusterSecret(format!("{}: {why}", path.display()))
            }
            other => other,
        })
    }

    /// Reads the secret at `path`, or, when there is no file there, makes a new one (256
    /// random bits as 64 hex digits, from the kernel's generator) and writes it, readable by
    /// its owner only. For `junction dev`, the chaos suite and tests.
    pub fn load_or_create(path: &Path) -> Result<Self, RaftStoreError> {
        if path.exists() {
            return Self::load(path);
        }
        let io = |what: &str, e: std::io::Error| {
            RaftStoreError::ClusterSecret(format!("{what} {}: {e}", path.display()))
        };
        let text = random_hex(32).map_err(|e| io("generating a secret for", e))?;
        // Nodes started together on one path: the first to publish wins, the others read it.
        if create_whole(path, &format!("{text}\n")).map_err(|e| io("creating", e))? {
            Self::new(&text)
        } else {
            Self::load(path)
        }
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.value.as_bytes();
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Client side: adds the secret (if any) and this node's cluster id (once known) to every
/// peer call.
#[derive(Clone, Debug, Default)]
pub struct AttachSecret(pub Option<ClusterSecret>, pub Option<ClusterIdentity>);

/// Adds the caller's trace context to an outgoing node-to-node call. Set once, by a node that
/// exports traces; until then (and on nodes that do not) nothing is added.
static TRACE_CONTEXT: std::sync::OnceLock<fn(&mut tonic::metadata::MetadataMap)> =
    std::sync::OnceLock::new();

/// Installs the hook every [`AttachSecret`] call runs to carry the current trace context
/// (a W3C `traceparent`) to the called node. Only the first call takes effect.
pub fn set_trace_context_hook(inject: fn(&mut tonic::metadata::MetadataMap)) {
    let _ = TRACE_CONTEXT.set(inject);
}

impl Interceptor for AttachSecret {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(inject) = TRACE_CONTEXT.get() {
            inject(req.metadata_mut());
        }
        if let Some(secret) = &self.0 {
            req.metadata_mut()
                .insert(CLUSTER_SECRET_HEADER, (*secret.value).clone());
        }
        if let Some(id) = self.1.as_ref().and_then(ClusterIdentity::header) {
            req.metadata_mut().insert(CLUSTER_ID_HEADER, id);
        }
        Ok(req)
    }
}

/// Server side: refuses peer calls without the secret (when the node has one), and calls from
/// another cluster (see [`ClusterIdentity`]).
#[derive(Clone, Debug, Default)]
pub struct RequireSecret(pub Option<ClusterSecret>, pub Option<ClusterIdentity>);

impl RequireSecret {
    fn check_cluster(&self, req: &Request<()>) -> Result<(), Status> {
        let (Some(identity), Some(theirs)) = (&self.1, req.metadata().get(CLUSTER_ID_HEADER))
        else {
            return Ok(());
        };
        let theirs = theirs
            .to_str()
            .map_err(|_| Status::invalid_argument("unreadable cluster id"))?;
        match identity.adopt(theirs) {
            Ok(true) => {
                tracing::info!(
                    cluster = theirs,
                    "joined cluster (adopted its id from a peer)"
                );
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(RaftStoreError::ClusterMismatch { ours, theirs }) => {
                tracing::error!(
                    remote = ?req.remote_addr(),
                    ours = %ours,
                    theirs = %theirs,
                    "refused a peer call from another cluster"
                );
                Err(Status::failed_precondition(format!(
                    "cluster mismatch: this node's data belongs to cluster {ours}, the caller's \
                     to cluster {theirs}"
                )))
            }
            Err(e) => Err(Status::internal(format!("recording the cluster id: {e}"))),
        }
    }
}

impl Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(secret) = &self.0 else {
            self.check_cluster(&req)?;
            return Ok(req);
        };
        match req.metadata().get(CLUSTER_SECRET_HEADER) {
            Some(v) if secret.matches(v.as_bytes()) => {
                self.check_cluster(&req)?;
                Ok(req)
            }
            presented => {
                tracing::warn!(
                    remote = ?req.remote_addr(),
                    secret_presented = presented.is_some(),
                    "refused a peer call that does not carry this cluster's secret"
                );
                Err(Status::unauthenticated(
                    "node-to-node calls need this cluster's secret (--cluster-secret-file)",
                ))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn secrets_are_checked() {
        assert!(ClusterSecret::new(GOOD).is_ok());
        assert!(ClusterSecret::new(&format!("  {GOOD}\n")).is_ok());
        let short = ClusterSecret::new("short").unwrap_err().to_string();
        assert!(short.contains("5 characters; at least 32"), "{short}");
        let spaced = ClusterSecret::new(&format!("{GOOD} x")).unwrap_err();
        assert!(spaced.to_string().contains("without spaces"), "{spaced}");
        assert!(ClusterSecret::new(&format!("{GOOD}é")).is_err());
    }

    #[test]
    fn a_created_secret_is_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let made = ClusterSecret::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let again = ClusterSecret::load_or_create(&path).unwrap();
        assert!(made.matches(again.value.as_bytes()));
        let other = dir.path().join("other");
        let fresh = ClusterSecret::load_or_create(&other).unwrap();
        assert!(
            !made.matches(fresh.value.as_bytes()),
            "two secrets are different"
        );
    }

    #[test]
    fn an_identity_is_adopted_once_and_kept_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = junction_storage::Store::open(dir.path()).unwrap();
        let id = ClusterIdentity::load(store.clone()).unwrap();
        assert_eq!(id.get(), None);
        assert!(id.adopt("aaaa").unwrap());
        assert!(!id.adopt("aaaa").unwrap());
        let err = id.adopt("bbbb").unwrap_err().to_string();
        assert!(err.contains("aaaa") && err.contains("bbbb"), "{err}");
        drop(id);
        let again = ClusterIdentity::load(store).unwrap();
        assert_eq!(again.get().as_deref(), Some("aaaa"));
        // A created id is random, kept, and sent; creating again keeps the first.
        assert_eq!(again.create().unwrap(), "aaaa");
        let fresh = ClusterIdentity::default();
        let made = fresh.create().unwrap();
        assert_eq!(made.len(), 32);
        assert_ne!(made, ClusterIdentity::default().create().unwrap());
        assert_eq!(fresh.get().as_deref(), Some(made.as_str()));
        let req = AttachSecret(None, Some(fresh.clone()))
            .call(Request::new(()))
            .unwrap();
        let sent = req.metadata().get(CLUSTER_ID_HEADER).unwrap();
        assert_eq!(sent.to_str().unwrap(), made);
    }

    #[test]
    fn calls_carry_the_cluster_id_and_another_clusters_are_refused() {
        let ours = ClusterIdentity::default();
        ours.adopt("aaaa").unwrap();
        let theirs = ClusterIdentity::default();
        theirs.adopt("bbbb").unwrap();
        let fresh = ClusterIdentity::default();

        // A node without an id adopts the caller's.
        let req = AttachSecret(None, Some(ours.clone()))
            .call(Request::new(()))
            .unwrap();
        assert!(RequireSecret(None, Some(fresh.clone())).call(req).is_ok());
        assert_eq!(fresh.get().as_deref(), Some("aaaa"));

        // Another cluster's call is refused, both ids named.
        let req = AttachSecret(None, Some(theirs))
            .call(Request::new(()))
            .unwrap();
        let refused = RequireSecret(None, Some(ours.clone()))
            .call(req)
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("aaaa") && refused.message().contains("bbbb"),
            "{refused}"
        );

        // A caller that knows no id yet (a new node) is not refused for it.
        let req = AttachSecret(None, Some(ClusterIdentity::default()))
            .call(Request::new(()))
            .unwrap();
        assert!(req.metadata().get(CLUSTER_ID_HEADER).is_none());
        assert!(RequireSecret(None, Some(ours)).call(req).is_ok());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = ClusterSecret::new(GOOD).unwrap();
        assert!(!format!("{s:?}").contains("0123"));
        assert!(!format!("{:?}", AttachSecret(Some(s), None)).contains("0123"));
    }

    #[test]
    fn the_server_accepts_only_the_secret_the_client_attaches() {
        let secret = ClusterSecret::new(GOOD).unwrap();
        let mut attach = AttachSecret(Some(secret.clone()), None);
        let mut require = RequireSecret(Some(secret), None);
        let req = attach.call(Request::new(())).unwrap();
        assert!(require.call(req).is_ok());

        let missing = require.call(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);

        let other = ClusterSecret::new("fedcba9876543210fedcba9876543210").unwrap();
        let wrong = AttachSecret(Some(other), None)
            .call(Request::new(()))
            .unwrap();
        assert_eq!(
            require.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );

        let mut prefix = Request::new(());
        prefix
            .metadata_mut()
            .insert(CLUSTER_SECRET_HEADER, GOOD[..31].parse().unwrap());
        assert!(require.call(prefix).is_err());
    }

    #[test]
    fn without_a_secret_calls_pass_and_carry_nothing() {
        let req = AttachSecret(None, None).call(Request::new(())).unwrap();
        assert!(req.metadata().get(CLUSTER_SECRET_HEADER).is_none());
        assert!(RequireSecret(None, None).call(req).is_ok());
    }
}
