//! API keys: making them (random id and secret, on the node that takes the call), recording
//! them in the metadata group, and checking a presented token against the metadata. The
//! decision who may do what is `junction_types::auth`; this is the I/O around it.

use junction_types::MetaCommand;
use junction_types::auth::{
    ApiKey, AuthError, KEY_ID_HEX, KEY_SECRET_HEX, Principal, Role, TOKEN_PREFIX, parse_token,
};
use sha2::{Digest, Sha256};

use crate::{Broker, BrokerError};

/// The longest key description accepted, in bytes.
pub const MAX_KEY_DESCRIPTION_BYTES: usize = 256;

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub use junction_raft::peer_auth::random_hex;

/// What to create a key with.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub tenant: String,
    pub role: Role,
    pub station_prefix: Option<String>,
    pub expires_in_ms: Option<u64>,
    pub description: String,
}

impl Broker {
    /// Creates an API key (on the controller) and returns it with its token, which is never
    /// stored.
    pub async fn create_api_key(&self, spec: KeySpec) -> Result<(ApiKey, String), BrokerError> {
        junction_types::names::validate_tenant(&spec.tenant)?;
        if spec.description.len() > MAX_KEY_DESCRIPTION_BYTES {
            return Err(BrokerError::InvalidArgument(format!(
                "a key description is at most {MAX_KEY_DESCRIPTION_BYTES} bytes (got {})",
                spec.description.len()
            )));
        }
        if spec.expires_in_ms == Some(0) {
            return Err(BrokerError::InvalidArgument(
                "expires_in_ms must be above 0 (leave it unset for a key that does not expire)"
                    .into(),
            ));
        }
        if let Some(p) = &spec.station_prefix {
            junction_types::names::validate_station_prefix(p)?;
        }
        self.ensure_controller()?;
        let id = random_hex(KEY_ID_HEX / 2)?;
        let secret = random_hex(KEY_SECRET_HEX / 2)?;
        let now = crate::partition::now_ms();
        let key = ApiKey {
            id: id.clone(),
            tenant: spec.tenant,
            role: spec.role,
            station_prefix: spec.station_prefix,
            secret_sha256: digest(&secret),
            description: spec.description,
            created_ms: now,
            expires_ms: spec
                .expires_in_ms
                .map(|ms| now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))),
            revoked_ms: None,
        };
        self.meta_write(MetaCommand::CreateApiKey { key: key.clone() })
            .await?;
        Ok((key, format!("{TOKEN_PREFIX}{id}_{secret}")))
    }

    /// Revokes a key (on the controller); `tenant` limits it to that tenant's keys.
    pub async fn revoke_api_key(&self, id: &str, tenant: Option<&str>) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        self.meta_write(MetaCommand::RevokeApiKey {
            id: id.to_string(),
            tenant: tenant.map(str::to_string),
            now_ms: crate::partition::now_ms(),
        })
        .await?;
        Ok(())
    }

    /// Checks an API key token against this node's metadata. A well-formed key this node
    /// does not know yet may have just been created on the controller: the metadata is
    /// waited for, briefly, before the key is called invalid.
    pub async fn verify_api_key(&self, token: &str) -> Result<Principal, AuthError> {
        let (id, secret) = parse_token(token)?;
        let hash = digest(secret);
        let check = |meta: &junction_types::MetaState| {
            meta.api_keys.verify(id, &hash, crate::partition::now_ms())
        };
        let meta = self.metadata();
        if meta.api_keys.keys.contains_key(id) {
            return check(&meta);
        }
        let mut changes = self.subscribe_metadata();
        let deadline = tokio::time::Instant::now() + KEY_PROPAGATION_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    let meta = changes.borrow_and_update().clone();
                    if meta.api_keys.keys.contains_key(id) {
                        return check(&meta);
                    }
                }
                _ => return check(&self.metadata()),
            }
        }
    }
}

/// How long a node waits for its metadata to learn a key it has not seen.
pub const KEY_PROPAGATION_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
