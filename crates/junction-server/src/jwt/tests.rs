use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use serde_json::json;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ISS: &str = "https://id.example.com";
const AUD: &str = "junction";
/// A fixed 2048-bit RSA key (made with `openssl genpkey`), only for these tests.
const RSA_PEM: &str = include_str!("test-rsa-key.pem");

/// A signing key and its public JWK.
enum Signer {
    Es(EcdsaKeyPair),
    Rs(RsaKeyPair),
    Hs(ring::hmac::Key),
}

struct TestKey {
    kid: String,
    signer: Signer,
    jwk: Value,
}

fn es256_key(kid: &str) -> Result<TestKey, Box<dyn std::error::Error>> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| "ECDSA key generation")?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| "ECDSA key")?;
    let raw = pair.public_key().as_ref().to_vec();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    });
    Ok(TestKey {
        kid: kid.to_owned(),
        signer: Signer::Es(pair),
        jwk,
    })
}

fn rs256_key(kid: &str) -> Result<TestKey, Box<dyn std::error::Error>> {
    let body: String = RSA_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body)?;
    let pair = RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("RSA key: {e}"))?;
    let components: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
    let (n, e) = (components.n, components.e);
    let jwk = json!({
        "kty": "RSA", "kid": kid, "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e),
    });
    Ok(TestKey {
        kid: kid.to_owned(),
        signer: Signer::Rs(pair),
        jwk,
    })
}

fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "exp": now_s() + 600, "sub": "billing",
        "tenant": "acme", "role": "producer", "stations": "orders",
    })
}

fn part(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A compact JWS of `claims` under `header`, signed by `key`.
fn sign_with(
    header: &Value,
    claims: &Value,
    key: &TestKey,
) -> Result<String, Box<dyn std::error::Error>> {
    let input = format!("{}.{}", part(header), part(claims));
    let rng = SystemRandom::new();
    let sig = match &key.signer {
        Signer::Es(k) => k
            .sign(&rng, input.as_bytes())
            .map_err(|_| "sign")?
            .as_ref()
            .to_vec(),
        Signer::Rs(k) => {
            let mut sig = vec![0u8; k.public().modulus_len()];
            k.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                .map_err(|_| "sign")?;
            sig
        }
        Signer::Hs(k) => ring::hmac::sign(k, input.as_bytes()).as_ref().to_vec(),
    };
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

fn sign(key: &TestKey, claims: &Value) -> Result<String, Box<dyn std::error::Error>> {
    let alg = match key.signer {
        Signer::Es(_) => "ES256",
        Signer::Rs(_) => "RS256",
        Signer::Hs(_) => "HS256",
    };
    sign_with(
        &json!({"alg": alg, "typ": "JWT", "kid": key.kid}),
        claims,
        key,
    )
}

fn write_jwks(
    dir: &std::path::Path,
    keys: &[&TestKey],
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = dir.join("jwks.json");
    let set = json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
    std::fs::write(&path, serde_json::to_vec(&set)?)?;
    Ok(path)
}

fn config(keys: JwtKeys) -> JwtConfig {
    JwtConfig {
        keys,
        issuer: ISS.into(),
        audience: AUD.into(),
        tenant_claim: "tenant".into(),
        role_claim: "role".into(),
    }
}

fn verifier(
    dir: &std::path::Path,
    keys: &[&TestKey],
) -> Result<JwtVerifier, Box<dyn std::error::Error>> {
    Ok(JwtVerifier::new(config(JwtKeys::Jwks(write_jwks(
        dir, keys,
    )?)))?)
}

fn rejected_because(r: Result<Principal, AuthError>, why: &str) -> bool {
    matches!(&r, Err(AuthError::TokenRejected(w)) if w.contains(why))
}

#[test]
fn valid_rs256_and_es256_tokens_name_their_tenant_role_and_expiry() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, b, r) = (es256_key("a")?, es256_key("b")?, rs256_key("r")?);
    let v = verifier(dir.path(), &[&a, &b, &r])?;
    for key in [&a, &b, &r] {
        let p = v.verify(&sign(key, &claims())?)?;
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.role, Role::Producer);
        assert_eq!(p.station_prefix.as_deref(), Some("orders"));
        assert!(p.key_id.is_none());
        assert!(p.expires_ms.is_some_and(|e| e > now_s() * 1000));
    }
    // An audience list that holds ours.
    let mut c = claims();
    c["aud"] = json!(["other", AUD]);
    v.verify(&sign(&r, &c)?)?;
    Ok(())
}

#[test]
fn tokens_for_others_expired_or_tampered_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, stranger) = (es256_key("a")?, es256_key("a")?);
    let v = verifier(dir.path(), &[&a])?;
    let with = |k: &str, val: Value| {
        let mut c = claims();
        c[k] = val;
        c
    };
    let without = |k: &str| {
        let mut c = claims();
        if let Some(o) = c.as_object_mut() {
            o.remove(k);
        }
        c
    };
    assert!(rejected_because(
        v.verify(&sign(&a, &with("aud", json!("other-service")))?),
        "wrong audience"
    ));
    assert!(rejected_because(
        v.verify(&sign(&a, &with("aud", json!(["x", "y"])))?),
        "wrong audience"
    ));
    assert!(rejected_because(
        v.verify(&sign(&a, &with("iss", json!("https://evil")))?),
        "wrong issuer"
    ));
    assert!(matches!(
        v.verify(&sign(&a, &with("exp", json!(now_s() - 120)))?),
        Err(AuthError::TokenExpired)
    ));
    // Within the clock-skew allowance it still holds.
    v.verify(&sign(&a, &with("exp", json!(now_s() - 5)))?)?;
    for claim in ["exp", "iss", "aud"] {
        assert!(
            rejected_because(v.verify(&sign(&a, &without(claim))?), claim),
            "without {claim}"
        );
    }
    assert!(rejected_because(
        v.verify(&sign(&a, &with("nbf", json!(now_s() + 600)))?),
        "nbf"
    ));
    // Same kid, another key: the signature does not verify.
    assert!(rejected_because(
        v.verify(&sign(&stranger, &claims())?),
        "signature"
    ));
    // The claims changed after signing (a role raised to cluster-admin).
    let good = sign(&a, &claims())?;
    let mut pieces: Vec<&str> = good.split('.').collect();
    let raised = part(&with("role", json!("cluster-admin")));
    pieces[1] = &raised;
    assert!(rejected_because(v.verify(&pieces.join(".")), "signature"));
    // Cut off, or with an extra part.
    let (head, _) = good.rsplit_once('.').ok_or("three parts")?;
    assert!(v.verify(&format!("{head}.")).is_err());
    assert!(matches!(
        v.verify(&format!("{good}.x")),
        Err(AuthError::Malformed(_))
    ));
    assert!(matches!(v.verify("a.b.c"), Err(AuthError::Malformed(_))));
    Ok(())
}

#[test]
fn alg_none_and_algorithm_confusion_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a, r) = (es256_key("a")?, rs256_key("r")?);
    let v = verifier(dir.path(), &[&a, &r])?;
    let none = format!(
        "{}.{}.",
        part(&json!({"alg": "none", "typ": "JWT"})),
        part(&claims())
    );
    assert!(
        matches!(v.verify(&none), Err(AuthError::Malformed(_))),
        "alg none"
    );
    // HS256 "signed" with the RSA public key's JWK as the secret: no HS256 key is configured.
    let confused = TestKey {
        kid: "r".into(),
        signer: Signer::Hs(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            r.jwk.to_string().as_bytes(),
        )),
        jwk: Value::Null,
    };
    assert!(rejected_because(
        v.verify(&sign(&confused, &claims())?),
        "no configured key for alg HS256"
    ));
    // An ES256 header on an RSA signature (kid of the RSA key).
    let mixed = sign_with(&json!({"alg": "ES256", "kid": "r"}), &claims(), &r)?;
    assert!(v.verify(&mixed).is_err());
    for alg in ["PS256", "RS512", "EdDSA"] {
        let t = format!("{}.{}.AAAA", part(&json!({"alg": alg})), part(&claims()));
        assert!(rejected_because(v.verify(&t), "unsupported alg"), "{alg}");
    }
    let crit = sign_with(
        &json!({"alg": "ES256", "kid": "a", "crit": ["exp"]}),
        &claims(),
        &a,
    )?;
    assert!(rejected_because(v.verify(&crit), "critical"));
    Ok(())
}

#[test]
fn the_tenant_and_role_claims_must_be_there_and_valid() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a = es256_key("a")?;
    let v = verifier(dir.path(), &[&a])?;
    for (claim, value, why) in [
        ("tenant", Value::Null, "naming the tenant"),
        ("tenant", json!("Not A Tenant!"), "tenant claim"),
        ("role", Value::Null, "naming the role"),
        ("role", json!("root"), "unknown role 'root'"),
    ] {
        let mut c = claims();
        match value {
            Value::Null => {
                c.as_object_mut().ok_or("object")?.remove(claim);
            }
            v => c[claim] = v,
        }
        assert!(
            rejected_because(v.verify(&sign(&a, &c)?), why),
            "{claim}: {c}"
        );
    }
    Ok(())
}

#[test]
fn configurations_that_would_accept_too_much_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a = es256_key("a")?;
    let path = write_jwks(dir.path(), &[&a])?;
    let mut no_issuer = config(JwtKeys::Jwks(path.clone()));
    no_issuer.issuer = String::new();
    assert!(JwtVerifier::new(no_issuer).is_err(), "no issuer");
    let mut no_audience = config(JwtKeys::Jwks(path.clone()));
    no_audience.audience = " ".into();
    assert!(JwtVerifier::new(no_audience).is_err(), "no audience");
    // A symmetric key in a JWKS would let anyone who reads the file mint tokens.
    std::fs::write(
        &path,
        br#"{"keys":[{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0","kid":"s"}]}"#,
    )?;
    let err = JwtVerifier::new(config(JwtKeys::Jwks(path.clone())))
        .err()
        .ok_or("an oct key was accepted")?;
    assert!(err.to_string().contains("only RSA"), "{err}");
    // An EC key declared for another algorithm.
    let mut jwk = a.jwk.clone();
    jwk["alg"] = json!("RS256");
    std::fs::write(&path, serde_json::to_vec(&json!({"keys": [jwk]}))?)?;
    assert!(JwtVerifier::new(config(JwtKeys::Jwks(path.clone()))).is_err());
    std::fs::write(&path, b"{not json")?;
    assert!(JwtVerifier::new(config(JwtKeys::Jwks(path.clone()))).is_err());
    // A short HS256 secret.
    let secret = dir.path().join("hs");
    std::fs::write(&secret, b"short")?;
    assert!(JwtVerifier::new(config(JwtKeys::Hs256(secret))).is_err());
    Ok(())
}

#[test]
fn hs256_with_a_development_secret() -> TestResult {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("hs");
    std::fs::write(&secret, b"0123456789abcdef0123456789abcdef\n")?;
    let v = JwtVerifier::new(config(JwtKeys::Hs256(secret)))?;
    let key = |s: &[u8]| TestKey {
        kid: "dev".into(),
        signer: Signer::Hs(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s)),
        jwk: Value::Null,
    };
    v.verify(&sign(&key(b"0123456789abcdef0123456789abcdef"), &claims())?)?;
    assert!(rejected_because(
        v.verify(&sign(
            &key(b"another secret of thirty-two chars"),
            &claims()
        )?),
        "signature"
    ));
    Ok(())
}

#[test]
fn a_rotated_jwks_is_picked_up_without_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (old, new) = (es256_key("old")?, es256_key("new")?);
    let v = verifier(dir.path(), &[&old])?;
    let token = sign(&new, &claims())?;
    assert!(v.verify(&token).is_err(), "the new key is not known yet");
    // The identity provider publishes the new key.
    write_jwks(dir.path(), &[&old, &new])?;
    // Instead of waiting JWKS_RECHECK: the next verify is due to look at the file.
    let recheck_due = |v: &JwtVerifier| {
        let mut loaded = v.loaded.lock();
        loaded.checked = Instant::now()
            .checked_sub(JWKS_RECHECK)
            .unwrap_or(loaded.checked);
    };
    recheck_due(&v);
    assert!(v.verify(&token).is_ok(), "the new key was never picked up");
    // A key file that no longer loads keeps the keys in use.
    std::fs::write(dir.path().join("jwks.json"), b"{broken")?;
    recheck_due(&v);
    v.verify(&token)?;
    Ok(())
}

/// A token is verified once; later calls check only its expiry, until the keys change.
#[test]
fn a_verified_token_is_remembered_until_it_expires_or_the_keys_change() -> TestResult {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir()?;
    let (a, b) = (es256_key("a")?, es256_key("b")?);
    let v = verifier(dir.path(), &[&a, &b])?;
    let token = sign(&a, &claims())?;
    let first = v.verify(&token)?;
    assert_eq!(v.hits.load(Ordering::Relaxed), 0);
    assert_eq!(v.verify(&token)?, first);
    assert_eq!(
        v.hits.load(Ordering::Relaxed),
        1,
        "the second call is remembered"
    );
    // Past its expiry (and the leeway) the remembered token is refused.
    let later = now_s() + 600 + LEEWAY.as_secs() as i64 + 1;
    assert!(matches!(
        v.verify_at(&token, later),
        Err(AuthError::TokenExpired)
    ));
    // A tampered token is another token: verified in full, and refused.
    let mut tampered = token.clone();
    tampered.push('A');
    assert!(v.verify(&tampered).is_err());
    // Key `a` withdrawn: its tokens are checked again, and refused.
    v.verify(&token)?;
    write_jwks(dir.path(), &[&b])?;
    {
        let mut loaded = v.loaded.lock();
        loaded.checked = Instant::now()
            .checked_sub(JWKS_RECHECK)
            .unwrap_or(loaded.checked);
    }
    assert!(
        rejected_because(v.verify(&token), "no configured key"),
        "a token of a withdrawn key must not be served from memory"
    );
    Ok(())
}
