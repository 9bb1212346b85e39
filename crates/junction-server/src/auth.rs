//! Authentication of client calls and the glue between handlers and the authorization
//! decision (`junction_types::auth`).
//!
//! With `--auth keys` every call on the client port carries `authorization: Bearer <token>`:
//! - an API key (`jk_<id>_<secret>`), checked against the metadata group's keys (digest,
//!   revocation, expiry) on the node that takes the call;
//! - the bootstrap admin token (from `--admin-token-file`), a cluster admin;
//! - or, from another node forwarding a call it has already authorized, the cluster secret.
//!
//! With `--auth none` every call is made as the cluster admin.

use std::path::Path;
use std::sync::Arc;

use junction_broker::{Broker, BrokerError};
use junction_raft::peer_auth::{CLUSTER_SECRET_HEADER, ClusterSecret};
use junction_types::auth::{AuthError, Operation, Principal, Refusal, TOKEN_PREFIX, digest_eq};
use junction_types::{MetaError, StationName};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::config::{AuthMode, Config, ConfigError};
use crate::status::to_status;

/// The metadata key of the credential.
pub const AUTHORIZATION: &str = "authorization";
/// How often an idle stream checks that the key it was opened with still holds: a revoked or
/// expired key ends its streams within this time.
pub const CREDENTIAL_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// Decides who makes each client call.
pub struct Authenticator {
    mode: AuthMode,
    /// SHA-256 of the bootstrap admin token.
    admin: Option<[u8; 32]>,
    /// Other nodes forward calls with the cluster secret.
    node: Option<ClusterSecret>,
    /// JWTs from an identity provider, when configured.
    jwt: Option<crate::jwt::JwtVerifier>,
    broker: Arc<Broker>,
}

impl Authenticator {
    /// Builds the authenticator of a node; with `--auth keys` reads (or makes) the admin
    /// token file.
    pub fn new(
        config: &Config,
        broker: Arc<Broker>,
        node: Option<ClusterSecret>,
    ) -> Result<Self, ConfigError> {
        let admin = match (config.auth, &config.admin_token_file) {
            (AuthMode::Keys, Some(path)) => Some(load_or_create_admin_token(path)?),
            _ => None,
        };
        let jwt = config
            .jwt_config()?
            .map(crate::jwt::JwtVerifier::new)
            .transpose()?;
        if jwt.is_some() && config.jwt_hs256_secret_file.is_some() {
            tracing::warn!(
                "--jwt-hs256-secret-file: JWTs signed with a shared secret; whoever holds the \
                 file can mint any tenant's credentials. For development only"
            );
        }
        Ok(Self {
            mode: config.auth,
            admin,
            node,
            jwt,
            broker,
        })
    }

    /// Whether credentials are checked.
    pub fn enabled(&self) -> bool {
        self.mode == AuthMode::Keys
    }

    /// Authenticates a call from its metadata.
    pub async fn principal(&self, md: &MetadataMap) -> Result<Principal, Status> {
        if !self.enabled() {
            return Ok(Principal::superuser());
        }
        let result = self.authenticate(md).await;
        if let Err(e) = &result {
            tracing::warn!(reason = %e, "refused a client call");
        }
        result.map_err(|e| to_status(BrokerError::Auth(e)))
    }

    async fn authenticate(&self, md: &MetadataMap) -> Result<Principal, AuthError> {
        if let (Some(secret), Some(presented)) = (&self.node, md.get(CLUSTER_SECRET_HEADER)) {
            return if secret.matches(presented.as_bytes()) {
                Ok(Principal::superuser())
            } else {
                Err(AuthError::Invalid)
            };
        }
        let value = md.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
        let text = value
            .to_str()
            .map_err(|_| AuthError::Malformed("the authorization value is not text".into()))?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Malformed("expected 'Bearer <token>'".into()))?
            .trim();
        if token.starts_with(TOKEN_PREFIX) {
            return self.broker.verify_api_key(token).await;
        }
        if token.matches('.').count() == 2 {
            return match &self.jwt {
                Some(jwt) => jwt.verify(token),
                None => Err(AuthError::TokenRejected(
                    "this cluster accepts no JWTs (it runs without --jwt-jwks-file)".into(),
                )),
            };
        }
        match &self.admin {
            Some(admin) if digest_eq(admin, &junction_broker::auth::digest(token)) => {
                Ok(Principal::superuser())
            }
            _ => Err(AuthError::Invalid),
        }
    }

    /// Checks that the credential a stream was opened with still holds (not revoked, not
    /// expired): long-lived streams call this as they go.
    pub fn still_valid(&self, p: &Principal) -> Result<(), Status> {
        if let Some(exp) = p.expires_ms {
            let now = junction_broker::partition::now_ms();
            if now >= exp.saturating_add(crate::jwt::LEEWAY.as_millis() as i64) {
                tracing::info!(tenant = %p.tenant, "ended a stream: its JWT expired");
                return Err(to_status(BrokerError::Auth(AuthError::TokenExpired)));
            }
        }
        let Some(id) = &p.key_id else {
            return Ok(());
        };
        let meta = self.broker.metadata();
        let now = junction_broker::partition::now_ms();
        let refused = match meta.api_keys.keys.get(id) {
            None => Some(AuthError::Invalid),
            Some(k) if k.revoked_ms.is_some() => Some(AuthError::Revoked { id: id.clone() }),
            Some(k) if k.expires_ms.is_some_and(|e| now >= e) => {
                Some(AuthError::Expired { id: id.clone() })
            }
            Some(_) => None,
        };
        match refused {
            None => Ok(()),
            Some(e) => {
                tracing::info!(key = %id, reason = %e, "ended a stream: its credential no longer holds");
                Err(to_status(BrokerError::Auth(e)))
            }
        }
    }
}

/// Maps an authorization refusal: another tenant's resource is reported as `hidden` (the
/// error a missing resource gets), a missing permission as PERMISSION_DENIED.
pub fn allow(
    p: &Principal,
    op: Operation,
    tenant: &str,
    station: Option<&str>,
    hidden: impl FnOnce() -> BrokerError,
) -> Result<(), Status> {
    p.authorize(op, tenant, station).map_err(|r| match r {
        Refusal::Hidden => to_status(hidden()),
        Refusal::Denied(e) => {
            tracing::info!(reason = %e, "refused a client call");
            to_status(BrokerError::Auth(e))
        }
    })
}

/// `op` on a station (another tenant's station does not exist for the caller).
pub fn allow_station(p: &Principal, op: Operation, station: &StationName) -> Result<(), Status> {
    allow(p, op, &station.tenant, Some(&station.name), || {
        BrokerError::StationNotFound(station.to_string())
    })
}

/// `op` on a tenant as a whole (another tenant does not exist for the caller).
pub fn allow_tenant(p: &Principal, op: Operation, tenant: &str) -> Result<(), Status> {
    allow(p, op, tenant, None, || {
        BrokerError::Meta(MetaError::TenantNotFound {
            tenant: tenant.to_string(),
        })
    })
}

/// Cluster operations (creating tenants) need the cluster-admin role.
pub fn allow_cluster(p: &Principal) -> Result<(), Status> {
    if p.role == junction_types::auth::Role::ClusterAdmin {
        return Ok(());
    }
    Err(to_status(BrokerError::Auth(AuthError::Denied {
        tenant: p.tenant.clone(),
        role: p.role,
        operation: Operation::ManageCluster,
        station_prefix: p.station_prefix.clone(),
    })))
}

/// Reads the admin token at `path`, or makes one there (256 random bits, hex, mode 0600).
fn load_or_create_admin_token(path: &Path) -> Result<[u8; 32], ConfigError> {
    let err = |what: &str, e: std::io::Error| {
        ConfigError::Auth(format!("{what} admin token file {}: {e}", path.display()))
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = junction_broker::auth::random_hex(32).map_err(|e| err("making", e))?;
            // Several nodes may share the path (the dev cluster): the first to publish its
            // token wins and the others read that one. The token is written whole to a file
            // of its own first, then linked into place, so no node ever reads a partial file.
            if junction_raft::peer_auth::create_whole(path, &format!("{token}\n"))
                .map_err(|e| err("creating", e))?
            {
                tracing::warn!(
                    path = %path.display(),
                    "made a new admin token (cluster-admin); keep the file secret"
                );
                format!("{token}\n")
            } else {
                std::fs::read_to_string(path).map_err(|e| err("reading", e))?
            }
        }
        Err(e) => return Err(err("reading", e)),
    };
    let token = text.trim();
    if token.len() < MIN_ADMIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Auth(format!(
            "admin token file {}: the token must be at least {MIN_ADMIN_TOKEN_LEN} printable \
             characters without spaces",
            path.display()
        )));
    }
    if token.starts_with(TOKEN_PREFIX) {
        return Err(ConfigError::Auth(format!(
            "admin token file {}: the admin token must not start with '{TOKEN_PREFIX}' (that \
             prefix is for API keys)",
            path.display()
        )));
    }
    Ok(junction_broker::auth::digest(token))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Nodes starting together on one token path (the dev cluster) all end up with the one
    /// token in the file, complete, and leave no temporary files behind.
    #[test]
    fn nodes_racing_to_make_the_admin_token_agree_on_one() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("admin.token");
            let digests: Vec<[u8; 32]> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| load_or_create_admin_token(&path)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("thread").expect("token"))
                    .collect()
            });
            let text = std::fs::read_to_string(&path).expect("token file");
            assert!(text.ends_with('\n'));
            let want = junction_broker::auth::digest(text.trim());
            assert!(digests.iter().all(|d| *d == want));
            let files = std::fs::read_dir(dir.path()).expect("dir").count();
            assert_eq!(files, 1, "temporary files left behind");
        }
    }
}
