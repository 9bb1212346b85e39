//! JSON Web Tokens from an identity provider, as client credentials.
//!
//! A node started with `--jwt-jwks-file` (RS256 and ES256 public keys as a JWKS document,
//! what an identity provider publishes) or, for development, `--jwt-hs256-secret-file`
//! accepts `authorization: Bearer <JWT>` besides API keys. It refuses to start without
//! `--jwt-issuer` and `--jwt-audience`. A token is accepted when:
//! - its header names an algorithm the key allows (RS256 for RSA keys, ES256 for P-256 keys,
//!   HS256 for the development secret; `none` and every other algorithm are refused) and, with
//!   several keys, a `kid` that is in the set;
//! - its signature verifies, and it carries `exp` (not passed), `iss` and `aud` equal to the
//!   configured ones (`nbf`, when present, has passed; 30 s of clock skew are allowed);
//! - it names a tenant (claim `--jwt-tenant-claim`, default `tenant`) and a role (claim
//!   `--jwt-role-claim`, default `role`: reader, producer, consumer, admin or
//!   cluster-admin), and optionally a station prefix (claim `stations`).
//!
//! The JWKS file is read again when it changes (checked at most every 5 s), so the identity
//! provider's key rotation reaches the node without a restart.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use junction_types::auth::{AuthError, Principal, Role};
use parking_lot::Mutex;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents, UnparsedPublicKey,
};
use serde_json::Value;

use crate::config::ConfigError;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// How often the JWKS file is looked at again.
const JWKS_RECHECK: Duration = Duration::from_secs(5);
/// Verified tokens remembered at most (the memory is cleared when full).
const VERIFIED_MAX: usize = 10_000;

/// Where the verification keys come from.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    /// RS256 / ES256 public keys, a JWKS document.
    Jwks(PathBuf),
    /// A shared HS256 secret (development only: anyone holding it can mint tokens).
    Hs256(PathBuf),
}

/// The JWT settings of a node.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub keys: JwtKeys,
    pub issuer: String,
    pub audience: String,
    pub tenant_claim: String,
    pub role_claim: String,
}

/// The signature algorithms accepted, each tied to one kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
    Hs256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::Hs256 => "HS256",
        }
    }
}

enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed P-256 point (0x04 || x || y).
    P256(Vec<u8>),
    Hmac(ring::hmac::Key),
}

/// One verification key.
struct Key {
    kid: Option<String>,
    alg: Alg,
    material: Material,
}

impl Key {
    fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, input, signature)
                .is_ok(),
            Material::P256(point) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(input, signature)
                .is_ok(),
            Material::Hmac(key) => ring::hmac::verify(key, input, signature).is_ok(),
        }
    }
}

struct Loaded {
    bytes: Vec<u8>,
    keys: Vec<Key>,
    checked: Instant,
    /// Increases when the keys change: what was verified with the old keys is verified again.
    generation: u64,
}

/// A token whose signature and claims were checked, by the SHA-256 of its text.
struct Verified {
    principal: Principal,
    exp: i64,
    generation: u64,
}

fn config_error(m: String) -> ConfigError {
    ConfigError::Auth(m)
}

fn b64(field: &str, v: &Value) -> Result<Vec<u8>, String> {
    let text = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no '{field}'"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| format!("'{field}' is not base64url: {e}"))
}

/// The keys of a JWKS document: RSA keys for RS256, P-256 keys for ES256; anything else (a
/// symmetric key, another curve, an `alg` the key does not fit) is refused.
fn parse_jwks(path: &std::path::Path, bytes: &[u8]) -> Result<Vec<Key>, ConfigError> {
    let what = || format!("JWKS file {}", path.display());
    let doc: Value = serde_json::from_slice(bytes)
        .map_err(|e| config_error(format!("{}: not JSON: {e}", what())))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| config_error(format!("{}: no \"keys\" array", what())))?;
    let mut keys = Vec::new();
    for (i, jwk) in list.iter().enumerate() {
        let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
        let name = kid.clone().unwrap_or_else(|| format!("#{i}"));
        let bad = |m: String| config_error(format!("{}: key {name}: {m}", what()));
        let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or("");
        let (alg, material) = match kty {
            "RSA" => {
                let n = b64("n", jwk).map_err(bad)?;
                let e = b64("e", jwk).map_err(bad)?;
                if n.len() < 256 {
                    return Err(bad(format!(
                        "an RSA key of {} bits; at least 2048 are required",
                        n.len() * 8
                    )));
                }
                (Alg::Rs256, Material::Rsa { n, e })
            }
            "EC" if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => {
                let x = b64("x", jwk).map_err(bad)?;
                let y = b64("y", jwk).map_err(bad)?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(bad("P-256 coordinates must be 32 bytes each".into()));
                }
                let mut point = vec![4u8];
                point.extend(x);
                point.extend(y);
                (Alg::Es256, Material::P256(point))
            }
            other => {
                return Err(bad(format!(
                    "kty '{other}': only RSA (RS256) and P-256 EC (ES256) keys are accepted"
                )));
            }
        };
        if let Some(declared) = jwk.get("alg").and_then(Value::as_str)
            && declared != alg.name()
        {
            return Err(bad(format!(
                "declares alg {declared}, but a {kty} key is used with {} here",
                alg.name()
            )));
        }
        keys.push(Key { kid, alg, material });
    }
    if keys.is_empty() {
        return Err(config_error(format!("{}: no keys", what())));
    }
    Ok(keys)
}

fn load(keys: &JwtKeys) -> Result<(Vec<u8>, Vec<Key>), ConfigError> {
    match keys {
        JwtKeys::Jwks(path) => {
            let bytes = std::fs::read(path).map_err(|e| {
                config_error(format!("cannot read JWKS file {}: {e}", path.display()))
            })?;
            let keys = parse_jwks(path, &bytes)?;
            Ok((bytes, keys))
        }
        JwtKeys::Hs256(path) => {
            let bytes = std::fs::read(path).map_err(|e| {
                config_error(format!("cannot read HS256 secret {}: {e}", path.display()))
            })?;
            let secret = String::from_utf8_lossy(&bytes).trim().to_owned();
            if secret.len() < 32 {
                return Err(config_error(format!(
                    "HS256 secret {} must hold at least 32 characters",
                    path.display()
                )));
            }
            let key = Key {
                kid: None,
                alg: Alg::Hs256,
                material: Material::Hmac(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    secret.as_bytes(),
                )),
            };
            Ok((bytes, vec![key]))
        }
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Verifies JWTs against the configured keys, issuer and audience.
pub struct JwtVerifier {
    config: JwtConfig,
    loaded: Mutex<Loaded>,
    /// Clients send the same token with every call: its signature is checked once, then its
    /// expiry on each use, until the keys change.
    verified: Mutex<std::collections::HashMap<[u8; 32], Verified>>,
    /// Calls answered from `verified` (tests watch it).
    hits: std::sync::atomic::AtomicU64,
}

impl JwtVerifier {
    /// Loads the keys; refuses a configuration without issuer or audience.
    pub fn new(config: JwtConfig) -> Result<Self, ConfigError> {
        if config.issuer.trim().is_empty() || config.audience.trim().is_empty() {
            return Err(config_error(
                "JWT authentication needs --jwt-issuer and --jwt-audience: a token minted for \
                 another service must not be accepted here"
                    .into(),
            ));
        }
        let (bytes, keys) = load(&config.keys)?;
        Ok(Self {
            config,
            loaded: Mutex::new(Loaded {
                bytes,
                keys,
                checked: Instant::now(),
                generation: 0,
            }),
            verified: Mutex::default(),
            hits: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Reads the key file again when it changed (at most every few seconds); a file that no
    /// longer loads keeps the previous keys and is logged.
    fn refresh(&self) {
        let mut loaded = self.loaded.lock();
        if loaded.checked.elapsed() < JWKS_RECHECK {
            return;
        }
        loaded.checked = Instant::now();
        match load(&self.config.keys) {
            Ok((bytes, _)) if bytes == loaded.bytes => {}
            Ok((bytes, keys)) => {
                tracing::info!(keys = keys.len(), "JWT verification keys reloaded");
                loaded.bytes = bytes;
                loaded.keys = keys;
                loaded.generation += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWT key file changed but does not load; keeping the previous keys")
            }
        }
    }

    /// Verifies `token` and returns the principal it names.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_at(token, now_s())
    }

    /// [`JwtVerifier::verify`] at the time `now` (seconds since the epoch): from the tokens
    /// already verified with the current keys (checking only the expiry), or in full.
    fn verify_at(&self, token: &str, now: i64) -> Result<Principal, AuthError> {
        self.refresh();
        let generation = self.loaded.lock().generation;
        let digest: [u8; 32] = match ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
        {
            Ok(d) => d,
            Err(_) => return self.verify_signed(token, now),
        };
        let leeway = LEEWAY.as_secs() as i64;
        {
            let mut verified = self.verified.lock();
            if let Some(v) = verified.get(&digest).filter(|v| v.generation == generation) {
                if now > v.exp.saturating_add(leeway) {
                    verified.remove(&digest);
                    return Err(AuthError::TokenExpired);
                }
                self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(v.principal.clone());
            }
        }
        let principal = self.verify_signed(token, now)?;
        if let Some(exp) = principal.expires_ms.map(|ms| ms / 1000) {
            let mut verified = self.verified.lock();
            if verified.len() >= VERIFIED_MAX {
                verified.clear();
            }
            verified.insert(
                digest,
                Verified {
                    principal: principal.clone(),
                    exp,
                    generation,
                },
            );
        }
        Ok(principal)
    }

    /// Checks the token's signature and claims.
    fn verify_signed(&self, token: &str, now: i64) -> Result<Principal, AuthError> {
        let rejected = |why: String| AuthError::TokenRejected(why);
        let malformed = |why: &str| AuthError::Malformed(format!("not a JWT: {why}"));
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected header.payload.signature"));
        };
        let json = |part: &str, what: &str| -> Result<Value, AuthError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| malformed(&format!("the {what} is not base64url")))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|_| malformed(&format!("the {what} is not JSON")))?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(malformed(&format!("the {what} is not a JSON object")))
            }
        };
        let header = json(h, "header")?;
        let alg = match header.get("alg").and_then(Value::as_str) {
            Some("RS256") => Alg::Rs256,
            Some("ES256") => Alg::Es256,
            Some("HS256") => Alg::Hs256,
            Some("none") | Some("None") | Some("NONE") => {
                return Err(AuthError::Malformed(
                    "an unsigned JWT (alg none) is never accepted".into(),
                ));
            }
            Some(other) => return Err(rejected(format!("unsupported alg {other}"))),
            None => return Err(malformed("no alg in the header")),
        };
        if header.get("crit").is_some() {
            return Err(rejected(
                "critical header extensions are not supported".into(),
            ));
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let signature = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| malformed("the signature is not base64url"))?;
        let input = &token.as_bytes()[..h.len() + 1 + p.len()];
        {
            let loaded = self.loaded.lock();
            let candidates: Vec<&Key> = loaded
                .keys
                .iter()
                .filter(|k| k.alg == alg)
                .filter(|k| match (kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                })
                .collect();
            if candidates.is_empty() {
                return Err(rejected(format!(
                    "no configured key for alg {}{}",
                    alg.name(),
                    kid.map(|k| format!(" and kid {k}")).unwrap_or_default()
                )));
            }
            if !candidates.iter().any(|k| k.verifies(input, &signature)) {
                return Err(rejected("signature does not verify".into()));
            }
        }
        let claims = json(p, "payload")?;
        let leeway = LEEWAY.as_secs() as i64;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| rejected("no 'exp' claim (a number of seconds)".into()))?;
        if now > exp.saturating_add(leeway) {
            return Err(AuthError::TokenExpired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_i64()
                .ok_or_else(|| rejected("'nbf' is not a number".into()))?;
            if now.saturating_add(leeway) < nbf {
                return Err(rejected("not valid yet (nbf)".into()));
            }
        }
        match claims.get("iss").and_then(Value::as_str) {
            Some(iss) if iss == self.config.issuer => {}
            Some(_) => return Err(rejected("wrong issuer".into())),
            None => return Err(rejected("no 'iss' claim".into())),
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.config.audience,
            Some(Value::Array(list)) => list
                .iter()
                .any(|a| a.as_str() == Some(self.config.audience.as_str())),
            Some(_) => false,
            None => return Err(rejected("no 'aud' claim".into())),
        };
        if !audience_ok {
            return Err(rejected("wrong audience".into()));
        }
        self.principal(&claims, exp)
    }

    fn principal(&self, claims: &Value, exp: i64) -> Result<Principal, AuthError> {
        let text = |name: &str| -> Option<String> {
            claims.get(name).and_then(Value::as_str).map(str::to_owned)
        };
        let tenant = text(&self.config.tenant_claim).ok_or_else(|| {
            AuthError::TokenRejected(format!(
                "no '{}' claim naming the tenant",
                self.config.tenant_claim
            ))
        })?;
        junction_types::names::validate_tenant(&tenant)
            .map_err(|e| AuthError::TokenRejected(format!("tenant claim: {e}")))?;
        let role_text = text(&self.config.role_claim).ok_or_else(|| {
            AuthError::TokenRejected(format!(
                "no '{}' claim naming the role",
                self.config.role_claim
            ))
        })?;
        let role = Role::parse(&role_text).map_err(|_| {
            AuthError::TokenRejected(format!(
                "unknown role '{role_text}' in the '{}' claim",
                self.config.role_claim
            ))
        })?;
        let station_prefix = text("stations");
        if let Some(prefix) = &station_prefix {
            junction_types::names::validate_station_prefix(prefix)
                .map_err(|e| AuthError::TokenRejected(format!("stations claim: {e}")))?;
        }
        Ok(Principal {
            tenant,
            role,
            station_prefix,
            key_id: None,
            expires_ms: Some(exp.saturating_mul(1000)),
        })
    }
}

#[cfg(test)]
mod tests;
