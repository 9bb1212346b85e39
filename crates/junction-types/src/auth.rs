//! Who may do what: roles, API keys and the authorization decision. Pure: hashing, clocks and
//! the wire live in the server; everything here is decided from values, the same way on every
//! node.
//!
//! A principal belongs to one tenant and has one role. Roles are ordered sets of operations:
//!
//! | role | operations |
//! |---|---|
//! | `reader` | describe (list and describe stations and groups), read (Read, Tail) |
//! | `producer` | describe, produce (Produce, ProduceStream, InitProducer) |
//! | `consumer` | describe, read, consume (join groups, Consume, ack) |
//! | `admin` | all of the above, manage stations, groups and API keys of its tenant |
//! | `cluster-admin` | everything, on every tenant, and tenants and nodes |
//!
//! A key may also be limited to stations whose name starts with a prefix. A principal asking
//! about another tenant's resources is told they do not exist (no existence leak); a missing
//! permission on its own tenant is refused naming the operation.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    Reader,
    Producer,
    Consumer,
    Admin,
    ClusterAdmin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Reader,
        Role::Producer,
        Role::Consumer,
        Role::Admin,
        Role::ClusterAdmin,
    ];

    /// The role's name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Producer => "producer",
            Role::Consumer => "consumer",
            Role::Admin => "admin",
            Role::ClusterAdmin => "cluster-admin",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Result<Role, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| AuthError::InvalidRole(s.to_string()))
    }

    /// Whether the role includes `op` (on its own tenant).
    pub fn allows(self, op: Operation) -> bool {
        use Operation::*;
        match self {
            Role::ClusterAdmin => true,
            Role::Admin => op != ManageCluster,
            Role::Consumer => matches!(op, Describe | Read | Consume),
            Role::Producer => matches!(op, Describe | Produce),
            Role::Reader => matches!(op, Describe | Read),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call does, as authorization sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// List and describe stations and groups.
    Describe,
    /// Read and tail messages.
    Read,
    /// Produce messages and initialise producers.
    Produce,
    /// Join consumer groups, consume and acknowledge.
    Consume,
    /// Create, update and delete stations; create, seek, clone and delete groups; resend dead
    /// letters.
    Manage,
    /// Create, list and revoke API keys of the tenant.
    ManageKeys,
    /// Create tenants; see every tenant.
    ManageCluster,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Describe => "describe",
            Operation::Read => "read",
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Manage => "manage",
            Operation::ManageKeys => "manage-keys",
            Operation::ManageCluster => "manage-cluster",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a credential or a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credential: send 'authorization: Bearer <token>' (an API key from 'junction auth key create', or the admin token)"
    )]
    Missing,
    #[error("malformed credential: {0}")]
    Malformed(String),
    /// Unknown key id or wrong secret: the same answer for both, so a caller cannot probe ids.
    #[error("invalid API key or token")]
    Invalid,
    #[error("API key {id} expired; create a new one")]
    Expired { id: String },
    #[error("API key {id} was revoked; create a new one")]
    Revoked { id: String },
    #[error("{role} of tenant '{tenant}' may not {operation}{}", scope_hint(.station_prefix))]
    Denied {
        tenant: String,
        role: Role,
        operation: Operation,
        station_prefix: Option<String>,
    },
    #[error("unknown role '{0}': use reader, producer, consumer, admin or cluster-admin")]
    InvalidRole(String),
    #[error("API key '{id}' does not exist")]
    KeyNotFound { id: String },
    #[error("API key id '{id}' is taken")]
    KeyExists { id: String },
    /// A JWT whose signature, issuer, audience or claims do not hold.
    #[error("JWT refused: {0}")]
    TokenRejected(String),
    #[error("the JWT expired; get a new one from the identity provider")]
    TokenExpired,
}

fn scope_hint(prefix: &Option<String>) -> String {
    match prefix {
        Some(p) => format!(" here (its key is limited to stations starting with '{p}')"),
        None => String::new(),
    }
}

/// An API key as the metadata group keeps it: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public id, part of the token (`jk_<id>_<secret>`).
    pub id: String,
    pub tenant: String,
    pub role: Role,
    /// Limits the key to stations whose name starts with this (within its tenant).
    pub station_prefix: Option<String>,
    /// SHA-256 of the secret part of the token.
    pub secret_sha256: [u8; 32],
    pub description: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

/// The prefix of every API key token.
pub const TOKEN_PREFIX: &str = "jk_";
/// Hex digits of a key id (64 bits).
pub const KEY_ID_HEX: usize = 16;
/// Hex digits of a key secret (256 bits).
pub const KEY_SECRET_HEX: usize = 64;

/// Splits `jk_<id>_<secret>` into its id and secret.
pub fn parse_token(token: &str) -> Result<(&str, &str), AuthError> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| AuthError::Malformed("an API key starts with 'jk_'".to_string()))?;
    let (id, secret) = rest
        .split_once('_')
        .ok_or_else(|| AuthError::Malformed("an API key is jk_<id>_<secret>".to_string()))?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, KEY_ID_HEX) || !hex(secret, KEY_SECRET_HEX) {
        return Err(AuthError::Malformed(format!(
            "an API key is jk_<{KEY_ID_HEX} hex digits>_<{KEY_SECRET_HEX} hex digits>"
        )));
    }
    Ok((id, secret))
}

/// Compares two digests in time independent of where they differ.
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The API keys of the cluster, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRegistry {
    pub keys: BTreeMap<String, ApiKey>,
}

impl KeyRegistry {
    /// Adds a key (ids are random; a taken id is refused, never overwritten).
    pub fn create(&mut self, key: ApiKey) -> Result<(), AuthError> {
        if self.keys.contains_key(&key.id) {
            return Err(AuthError::KeyExists { id: key.id });
        }
        self.keys.insert(key.id.clone(), key);
        Ok(())
    }

    /// Revokes a key of `tenant` (`None`: any tenant, for cluster admins). Revoking twice
    /// keeps the first time. A key of another tenant is reported as not found.
    pub fn revoke(&mut self, id: &str, tenant: Option<&str>, now_ms: i64) -> Result<(), AuthError> {
        let not_found = || AuthError::KeyNotFound { id: id.to_string() };
        let key = self.keys.get_mut(id).ok_or_else(not_found)?;
        if tenant.is_some_and(|t| t != key.tenant) {
            return Err(not_found());
        }
        key.revoked_ms.get_or_insert(now_ms);
        Ok(())
    }

    /// Checks a presented key: its id, the digest of its secret, expiry and revocation.
    pub fn verify(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        now_ms: i64,
    ) -> Result<Principal, AuthError> {
        let key = self.keys.get(id).ok_or(AuthError::Invalid)?;
        if !digest_eq(&key.secret_sha256, secret_sha256) {
            return Err(AuthError::Invalid);
        }
        if key.revoked_ms.is_some() {
            return Err(AuthError::Revoked { id: id.to_string() });
        }
        if key.expires_ms.is_some_and(|e| now_ms >= e) {
            return Err(AuthError::Expired { id: id.to_string() });
        }
        Ok(Principal {
            tenant: key.tenant.clone(),
            role: key.role,
            station_prefix: key.station_prefix.clone(),
            key_id: Some(key.id.clone()),
            expires_ms: None,
        })
    }
}

/// Who makes a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    pub role: Role,
    pub station_prefix: Option<String>,
    /// The API key it authenticated with (`None`: the admin token, a JWT, a node, or auth
    /// off).
    pub key_id: Option<String>,
    /// When the credential stops holding (a JWT's `exp`, in ms since the epoch); API keys are
    /// checked against the metadata instead.
    pub expires_ms: Option<i64>,
}

/// What authorization answers when a principal may not act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The resource belongs to another tenant: answer exactly as if it did not exist.
    Hidden,
    /// The principal's own resource, but not this operation.
    Denied(AuthError),
}

impl Principal {
    /// Whether its credential can stop holding while a stream is open (an API key can be
    /// revoked or expire, a JWT expires); open streams then recheck it.
    pub fn can_lapse(&self) -> bool {
        self.key_id.is_some() || self.expires_ms.is_some()
    }

    /// A principal with every right (auth off, the admin token, another node).
    pub fn superuser() -> Self {
        Principal {
            tenant: crate::DEFAULT_TENANT.to_string(),
            role: Role::ClusterAdmin,
            station_prefix: None,
            key_id: None,
            expires_ms: None,
        }
    }

    /// Whether the principal sees `tenant` at all.
    pub fn sees_tenant(&self, tenant: &str) -> bool {
        self.role == Role::ClusterAdmin || self.tenant == tenant
    }

    /// Decides `op` on `tenant` (and `station`, a name within it, when the call names one).
    pub fn authorize(
        &self,
        op: Operation,
        tenant: &str,
        station: Option<&str>,
    ) -> Result<(), Refusal> {
        if self.role == Role::ClusterAdmin {
            return Ok(());
        }
        if self.tenant != tenant {
            return Err(Refusal::Hidden);
        }
        let in_scope = match (&self.station_prefix, station) {
            (Some(prefix), Some(name)) => name.starts_with(prefix.as_str()),
            // A key limited to some stations may not act on the tenant as a whole, except to
            // describe it and to initialise a producer (ids are the tenant's; producing still
            // checks each station).
            (Some(_), None) => matches!(op, Operation::Describe | Operation::Produce),
            (None, _) => true,
        };
        if in_scope && self.role.allows(op) {
            return Ok(());
        }
        Err(Refusal::Denied(AuthError::Denied {
            tenant: self.tenant.clone(),
            role: self.role,
            operation: op,
            station_prefix: self.station_prefix.clone(),
        }))
    }

    /// Whether the principal may see a station in a listing.
    pub fn lists_station(&self, tenant: &str, station: &str) -> bool {
        self.authorize(Operation::Describe, tenant, Some(station))
            .is_ok()
    }

    /// Whether the principal may create a key with `role` for `tenant`: a cluster admin any
    /// key; a tenant admin keys of its own tenant up to `admin`.
    pub fn may_grant(&self, tenant: &str, role: Role) -> Result<(), Refusal> {
        self.authorize(Operation::ManageKeys, tenant, None)?;
        if role == Role::ClusterAdmin && self.role != Role::ClusterAdmin {
            return Err(Refusal::Denied(AuthError::Denied {
                tenant: self.tenant.clone(),
                role: self.role,
                operation: Operation::ManageCluster,
                station_prefix: self.station_prefix.clone(),
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, tenant: &str, role: Role) -> ApiKey {
        ApiKey {
            id: id.to_string(),
            tenant: tenant.to_string(),
            role,
            station_prefix: None,
            secret_sha256: [7; 32],
            description: String::new(),
            created_ms: 1_000,
            expires_ms: Some(10_000),
            revoked_ms: None,
        }
    }

    fn who(tenant: &str, role: Role) -> Principal {
        Principal {
            tenant: tenant.to_string(),
            role,
            station_prefix: None,
            key_id: None,
            expires_ms: None,
        }
    }

    #[test]
    fn tokens_parse_strictly() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        let token = format!("jk_{id}_{secret}");
        assert_eq!(parse_token(&token), Ok((id, secret.as_str())));
        for bad in [
            "",
            "jk_",
            "Bearer x",
            &format!("jk_{id}"),
            &format!("jk_{id}_{}", &secret[1..]),
            &format!("jk_{}_{secret}", "z".repeat(16)),
            &format!("xx_{id}_{secret}"),
        ] {
            assert!(
                matches!(parse_token(bad), Err(AuthError::Malformed(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn verify_checks_digest_revocation_and_expiry() {
        let mut r = KeyRegistry::default();
        r.create(key("a", "acme", Role::Producer)).unwrap();
        assert_eq!(
            r.create(key("a", "other", Role::Admin)),
            Err(AuthError::KeyExists { id: "a".into() })
        );
        let p = r.verify("a", &[7; 32], 5_000).unwrap();
        assert_eq!((p.tenant.as_str(), p.role), ("acme", Role::Producer));
        assert_eq!(r.verify("a", &[8; 32], 5_000), Err(AuthError::Invalid));
        assert_eq!(r.verify("b", &[7; 32], 5_000), Err(AuthError::Invalid));
        assert_eq!(
            r.verify("a", &[7; 32], 10_000),
            Err(AuthError::Expired { id: "a".into() })
        );
        // Another tenant's admin cannot revoke it, and is told it does not exist.
        assert_eq!(
            r.revoke("a", Some("other"), 6_000),
            Err(AuthError::KeyNotFound { id: "a".into() })
        );
        r.revoke("a", Some("acme"), 6_000).unwrap();
        r.revoke("a", None, 7_000).unwrap();
        assert_eq!(r.keys["a"].revoked_ms, Some(6_000));
        assert_eq!(
            r.verify("a", &[7; 32], 6_500),
            Err(AuthError::Revoked { id: "a".into() })
        );
    }

    #[test]
    fn digests_compare_whole() {
        let a = [1u8; 32];
        let mut b = a;
        assert!(digest_eq(&a, &b));
        b[31] = 2;
        assert!(!digest_eq(&a, &b));
    }

    /// Every role × operation on its own tenant, and every role on another tenant.
    #[test]
    fn the_role_table() {
        use Operation::*;
        let ops = [
            Describe,
            Read,
            Produce,
            Consume,
            Manage,
            ManageKeys,
            ManageCluster,
        ];
        let expect = |role: Role, op: Operation| match role {
            Role::Reader => matches!(op, Describe | Read),
            Role::Producer => matches!(op, Describe | Produce),
            Role::Consumer => matches!(op, Describe | Read | Consume),
            Role::Admin => op != ManageCluster,
            Role::ClusterAdmin => true,
        };
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Ok(role));
            let p = who("acme", role);
            for op in ops {
                let own = p.authorize(op, "acme", Some("orders"));
                assert_eq!(own.is_ok(), expect(role, op), "{role} {op}");
                if let Err(r) = own {
                    assert!(matches!(r, Refusal::Denied(AuthError::Denied { .. })));
                }
                let other = p.authorize(op, "globex", Some("orders"));
                if role == Role::ClusterAdmin {
                    assert!(other.is_ok());
                } else {
                    assert_eq!(other, Err(Refusal::Hidden), "{role} {op} on another tenant");
                }
            }
        }
        assert!(Role::parse("root").is_err());
    }

    #[test]
    fn a_station_prefix_limits_the_key() {
        let p = Principal {
            station_prefix: Some("billing-".into()),
            ..who("acme", Role::Admin)
        };
        assert!(
            p.authorize(Operation::Produce, "acme", Some("billing-eu"))
                .is_ok()
        );
        assert!(matches!(
            p.authorize(Operation::Produce, "acme", Some("orders")),
            Err(Refusal::Denied(_))
        ));
        assert!(p.lists_station("acme", "billing-us"));
        assert!(!p.lists_station("acme", "orders"));
        // Tenant-wide operations (keys) need an unlimited key.
        assert!(p.authorize(Operation::ManageKeys, "acme", None).is_err());
        assert!(p.authorize(Operation::Describe, "acme", None).is_ok());
        assert!(p.authorize(Operation::Produce, "acme", None).is_ok());
        assert!(p.authorize(Operation::Manage, "acme", None).is_err());
        let msg = p
            .authorize(Operation::Produce, "acme", Some("orders"))
            .err()
            .map(|r| match r {
                Refusal::Denied(e) => e.to_string(),
                Refusal::Hidden => String::new(),
            })
            .unwrap_or_default();
        assert!(
            msg.contains("may not produce") && msg.contains("billing-"),
            "{msg}"
        );
    }

    #[test]
    fn only_cluster_admins_grant_cluster_admin() {
        let admin = who("acme", Role::Admin);
        assert!(admin.may_grant("acme", Role::Admin).is_ok());
        assert!(admin.may_grant("acme", Role::ClusterAdmin).is_err());
        assert_eq!(
            admin.may_grant("globex", Role::Reader),
            Err(Refusal::Hidden)
        );
        assert!(
            who("acme", Role::Producer)
                .may_grant("acme", Role::Reader)
                .is_err()
        );
        assert!(
            Principal::superuser()
                .may_grant("globex", Role::ClusterAdmin)
                .is_ok()
        );
    }
}
