//! Authentication and tenant isolation on a real 3-node cluster with `--auth keys`: a matrix of
//! principals (tenants × roles) × RPCs × own/other tenant, each outcome asserted; missing,
//! malformed, wrong, revoked and expired credentials; streams ended by revocation.

use std::time::Duration;

use junction_proto::v1::admin_client::AdminClient;
use junction_proto::v1::broker_client::BrokerClient;
use junction_proto::v1::groups_client::GroupsClient;
use junction_proto::v1::*;
use junction_server::AuthMode;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::harness::{TestCluster, keyed, wait_until};

/// Adds a raw `authorization` value (or none) to every call.
#[derive(Clone)]
struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Ch = InterceptedService<Channel, Auth>;

/// Raw clients of one node that send `authorization` as given.
struct Caller {
    broker: BrokerClient<Ch>,
    admin: AdminClient<Ch>,
    groups: GroupsClient<Ch>,
}

impl Caller {
    async fn new(cluster: &TestCluster, node: u64, authorization: Option<&str>) -> Self {
        let ch = cluster.channel(node).await;
        let auth = Auth(authorization.map(|a| a.parse().expect("header value")));
        Self {
            broker: BrokerClient::with_interceptor(ch.clone(), auth.clone()),
            admin: AdminClient::with_interceptor(ch.clone(), auth.clone()),
            groups: GroupsClient::with_interceptor(ch, auth),
        }
    }

    async fn bearer(cluster: &TestCluster, node: u64, token: &str) -> Self {
        Self::new(cluster, node, Some(&format!("Bearer {token}"))).await
    }
}

/// A secured cluster and its admin token.
async fn secured() -> (TestCluster, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("admin.token");
    let path = token_file.clone();
    let cluster = TestCluster::start_with(3, move |c| {
        c.auth = AuthMode::Keys;
        c.admin_token_file = Some(path.clone());
    })
    .await;
    let token = std::fs::read_to_string(&token_file)
        .expect("the first node made the admin token")
        .trim()
        .to_string();
    (cluster, token, dir)
}

/// A tail of partition 0 of `station` from its end.
fn latest_tail(station: &str) -> ReadRequest {
    ReadRequest {
        station: station.into(),
        partition: 0,
        start: Some(read_request::Start::Position(StartPosition::Latest as i32)),
        max_messages: 10,
        max_bytes: 0,
        local_replica: false,
    }
}

/// Reads a stream to its end: the status it ended with, or `None` if it just ended.
async fn end_of<T>(stream: &mut tonic::Streaming<T>) -> Option<tonic::Status> {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(s) => return Some(s),
        }
    }
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// What each role may do on its own tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Describe,
    Read,
    Produce,
    Consume,
    Manage,
    Keys,
}

fn allowed(role: &str, kind: Kind) -> bool {
    match role {
        "reader" => matches!(kind, Kind::Describe | Kind::Read),
        "producer" => matches!(kind, Kind::Describe | Kind::Produce),
        "consumer" => matches!(kind, Kind::Describe | Kind::Read | Kind::Consume),
        "admin" => true,
        other => panic!("unknown role {other}"),
    }
}

/// Runs one RPC of `kind` as `c` against `tenant`'s resources; returns the outcome.
async fn call(
    c: &mut Caller,
    kind: Kind,
    rpc: &str,
    tenant: &str,
    tag: &str,
) -> Result<(), tonic::Status> {
    let station = format!("{tenant}/orders");
    match rpc {
        "Produce" => c
            .broker
            .produce(ProduceRequest {
                station,
                messages: vec![keyed("k", "v")],
                request_id: 1,
                producer: None,
            })
            .await
            .map(drop),
        "InitProducer" => c
            .broker
            .init_producer(InitProducerRequest {
                tenant: tenant.into(),
                producer_name: None,
            })
            .await
            .map(drop),
        "Read" => c
            .broker
            .read(ReadRequest {
                station,
                partition: 0,
                start: None,
                max_messages: 10,
                max_bytes: 0,
                local_replica: false,
            })
            .await
            .map(drop),
        "DescribeStation" => c
            .admin
            .describe_station(DescribeStationRequest { name: station })
            .await
            .map(drop),
        "CreateStation" => {
            let name = format!("{tenant}/tmp-{tag}");
            c.admin
                .create_station(CreateStationRequest {
                    name: name.clone(),
                    partitions: 1,
                    replication_factor: 1,
                    ..Default::default()
                })
                .await?;
            c.admin
                .delete_station(DeleteStationRequest { name })
                .await
                .map(drop)
        }
        "UpdateStation" => c
            .admin
            .update_station(UpdateStationRequest {
                name: station,
                policy: None,
            })
            .await
            .map(drop),
        "CreateGroup" => c
            .groups
            .create_group(CreateGroupRequest {
                station,
                group: format!("g-{tag}"),
                settings: None,
            })
            .await
            .map(drop),
        "DescribeGroup" => c
            .groups
            .describe_group(DescribeGroupRequest {
                station,
                group: "g0".into(),
                only_partitions: vec![],
            })
            .await
            .map(drop),
        "SeekGroup" => c
            .groups
            .seek_group(SeekGroupRequest {
                station,
                group: "g0".into(),
                partition: None,
                target: Some(seek_group_request::Target::Position(
                    StartPosition::Earliest as i32,
                )),
            })
            .await
            .map(drop),
        "ListApiKeys" => c
            .admin
            .list_api_keys(ListApiKeysRequest {
                tenant: tenant.into(),
            })
            .await
            .map(drop),
        "CreateApiKey" => c
            .admin
            .create_api_key(CreateApiKeyRequest {
                tenant: tenant.into(),
                role: "reader".into(),
                description: format!("made by {tag}"),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetQuota" => c
            .admin
            .get_quota(GetQuotaRequest {
                tenant: tenant.into(),
            })
            .await
            .map(drop),
        other => panic!("no RPC {other} ({kind:?})"),
    }
}

const RPCS: [(&str, Kind); 13] = [
    ("Produce", Kind::Produce),
    ("InitProducer", Kind::Produce),
    ("Read", Kind::Read),
    ("DescribeStation", Kind::Describe),
    ("CreateStation", Kind::Manage),
    ("UpdateStation", Kind::Manage),
    ("CreateGroup", Kind::Consume),
    ("DescribeGroup", Kind::Describe),
    ("SeekGroup", Kind::Manage),
    ("ListApiKeys", Kind::Keys),
    ("CreateApiKey", Kind::Keys),
    ("ListStations", Kind::Describe),
    ("GetQuota", Kind::Describe),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_tenant_matrix() {
    let (cluster, admin_token, _dir) = secured().await;
    let mut admin = Caller::bearer(&cluster, 1, &admin_token).await;
    for t in ["acme", "globex"] {
        admin
            .admin
            .create_tenant(CreateTenantRequest { name: t.into() })
            .await
            .expect("tenant");
        admin
            .admin
            .create_station(CreateStationRequest {
                name: format!("{t}/orders"),
                partitions: 1,
                replication_factor: 3,
                ..Default::default()
            })
            .await
            .expect("station");
        admin
            .groups
            .create_group(CreateGroupRequest {
                station: format!("{t}/orders"),
                group: "g0".into(),
                settings: None,
            })
            .await
            .expect("group");
    }
    let mut checked = 0;
    for tenant in ["acme", "globex"] {
        let other = if tenant == "acme" { "globex" } else { "acme" };
        for role in ["reader", "producer", "consumer", "admin"] {
            let key = admin
                .admin
                .create_api_key(CreateApiKeyRequest {
                    tenant: tenant.into(),
                    role: role.into(),
                    description: "matrix".into(),
                    ..Default::default()
                })
                .await
                .expect("key")
                .into_inner();
            // Each principal calls a different node, so keys are checked by every node.
            let node = 1 + (checked as u64 / 3) % 3;
            let mut c = Caller::bearer(&cluster, node, &key.token).await;
            for (rpc, kind) in RPCS {
                let tag = format!("{tenant}-{role}");
                if rpc == "ListStations" {
                    let listed = c
                        .admin
                        .list_stations(ListStationsRequest {
                            tenant: String::new(),
                        })
                        .await
                        .expect("list stations")
                        .into_inner()
                        .stations;
                    assert!(
                        !listed.is_empty() && listed.iter().all(|s| s.tenant == tenant),
                        "{tag} listed {listed:?}"
                    );
                    let status = c
                        .admin
                        .cluster_status(ClusterStatusRequest {})
                        .await
                        .expect("cluster status")
                        .into_inner();
                    assert!(status.stations.iter().all(|s| s.tenant == tenant), "{tag}");
                    let tenants = c
                        .admin
                        .list_tenants(ListTenantsRequest {})
                        .await
                        .expect("tenants")
                        .into_inner()
                        .tenants;
                    assert_eq!(tenants, vec![tenant.to_string()], "{tag}");
                    checked += 3;
                    continue;
                }
                let own = call(&mut c, kind, rpc, tenant, &tag).await;
                if allowed(role, kind) {
                    assert!(own.is_ok(), "{tag} {rpc} on its own tenant: {own:?}");
                } else {
                    let s = own.expect_err(&format!("{tag} {rpc} on its own tenant succeeded"));
                    assert_eq!(s.code(), Code::PermissionDenied, "{tag} {rpc}: {s:?}");
                    assert_eq!(reason(&s), "PERMISSION_DENIED", "{tag} {rpc}");
                    assert!(s.message().contains(role), "{tag} {rpc}: {}", s.message());
                }
                // Another tenant's resources do not exist for this principal, whatever its role.
                let s = call(&mut c, kind, rpc, other, &tag)
                    .await
                    .expect_err(&format!("{tag} {rpc} on tenant {other} succeeded"));
                assert_eq!(s.code(), Code::NotFound, "{tag} {rpc} on {other}: {s:?}");
                assert!(
                    !s.message().contains("may not"),
                    "{tag} {rpc}: {}",
                    s.message()
                );
                checked += 2;
            }
            // No tenant principal manages the cluster.
            let s = c
                .admin
                .create_tenant(CreateTenantRequest {
                    name: format!("new-{tenant}-{role}"),
                })
                .await
                .expect_err("a tenant principal created a tenant");
            assert_eq!(s.code(), Code::PermissionDenied);
            // Nor raises its own quota.
            let q = c
                .admin
                .set_quota(SetQuotaRequest {
                    tenant: tenant.into(),
                    set: Some(QuotaLimits {
                        streams: Some(1000),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .expect_err("a tenant principal set its quota");
            assert_eq!(q.code(), Code::PermissionDenied, "{q:?}");
            assert_eq!(reason(&q), "PERMISSION_DENIED");
            checked += 2;
        }
    }
    // A tenant's resource and a missing one look the same to an outsider.
    let globex = admin
        .admin
        .create_api_key(CreateApiKeyRequest {
            tenant: "globex".into(),
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    let mut g = Caller::bearer(&cluster, 2, &globex.token).await;
    let exists = g
        .admin
        .describe_station(DescribeStationRequest {
            name: "acme/orders".into(),
        })
        .await
        .expect_err("other tenant");
    let missing = g
        .admin
        .describe_station(DescribeStationRequest {
            name: "acme/nothing-here".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(exists.code(), missing.code());
    assert_eq!(
        exists.message().replace("orders", "X"),
        missing.message().replace("nothing-here", "X")
    );
    eprintln!("cross-tenant matrix: {checked} outcomes asserted");
    assert!(checked >= 200, "{checked}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_credentials_are_refused_and_revocation_reaches_every_node() {
    let (cluster, admin_token, _dir) = secured().await;
    let mut admin = Caller::bearer(&cluster, 1, &admin_token).await;
    admin
        .admin
        .create_station(CreateStationRequest {
            name: "orders".into(),
            partitions: 1,
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .expect("station");
    let produce = |c: &mut Caller| {
        let mut b = c.broker.clone();
        async move {
            b.produce(ProduceRequest {
                station: "orders".into(),
                messages: vec![keyed("k", "v")],
                request_id: 1,
                producer: None,
            })
            .await
        }
    };
    let key = admin
        .admin
        .create_api_key(CreateApiKeyRequest {
            role: "producer".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    let (id, _) = key.token.rsplit_once('_').expect("token shape");
    let wrong_secret = format!("{id}_{}", "0".repeat(64));
    for (auth, want) in [
        (None, "MISSING_CREDENTIAL"),
        (
            Some("Basic dXNlcjpwYXNz".to_string()),
            "MALFORMED_CREDENTIAL",
        ),
        (
            Some("Bearer jk_short_x".to_string()),
            "MALFORMED_CREDENTIAL",
        ),
        (Some(format!("Bearer {wrong_secret}")), "INVALID_CREDENTIAL"),
        (
            Some(format!("Bearer {}x", admin_token)),
            "INVALID_CREDENTIAL",
        ),
        (
            Some("Bearer nothing-like-the-admin-token-at-all-0000".to_string()),
            "INVALID_CREDENTIAL",
        ),
    ] {
        let mut c = Caller::new(&cluster, 2, auth.as_deref()).await;
        let s = produce(&mut c).await.expect_err("refused");
        assert_eq!(s.code(), Code::Unauthenticated, "{auth:?}: {s:?}");
        assert_eq!(reason(&s), want, "{auth:?}");
        // The secret never comes back in a message.
        assert!(!s.message().contains(&admin_token), "{}", s.message());
    }
    // The key works on every node at once (nodes that lag the controller wait for it)...
    for node in 1..=3 {
        let mut c = Caller::bearer(&cluster, node, &key.token).await;
        produce(&mut c).await.expect("a fresh key works everywhere");
    }
    // A tail opened with a key ends once the key is revoked.
    let reader_key = admin
        .admin
        .create_api_key(CreateApiKeyRequest {
            role: "reader".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    let mut reader = Caller::bearer(&cluster, 3, &reader_key.token).await;
    let mut tail = reader
        .broker
        .tail(latest_tail("orders"))
        .await
        .expect("tail")
        .into_inner();
    admin
        .admin
        .revoke_api_key(RevokeApiKeyRequest {
            id: reader_key.key.expect("key").id,
        })
        .await
        .expect("revoke");
    let ended = tokio::time::timeout(Duration::from_secs(15), end_of(&mut tail))
        .await
        .expect("the tail ended within the recheck period");
    let s = ended.expect("ended with a status");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(reason(&s), "REVOKED_CREDENTIAL");
    // Revoking the producer key: refused on every node once each has applied it.
    admin
        .admin
        .revoke_api_key(RevokeApiKeyRequest {
            id: key.key.expect("key").id,
        })
        .await
        .expect("revoke");
    for node in 1..=3 {
        wait_until(
            Duration::from_secs(10),
            "the revocation on every node",
            || async {
                let mut c = Caller::bearer(&cluster, node, &key.token).await;
                produce(&mut c)
                    .await
                    .err()
                    .filter(|s| reason(s) == "REVOKED_CREDENTIAL")
            },
        )
        .await;
    }
    let mut still = Caller::bearer(&cluster, 1, &admin_token).await;
    produce(&mut still)
        .await
        .expect("the admin token still works");
    // An expiring key: works, then is refused as expired.
    let short = admin
        .admin
        .create_api_key(CreateApiKeyRequest {
            role: "producer".into(),
            expires_in_ms: Some(1_500),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    wait_until(
        Duration::from_secs(10),
        "the short key to expire",
        || async {
            let mut c = Caller::bearer(&cluster, 2, &short.token).await;
            produce(&mut c)
                .await
                .err()
                .filter(|s| reason(s) == "EXPIRED_CREDENTIAL")
        },
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sdk_and_cli_speak_with_tokens() {
    let (cluster, admin_token, dir) = secured().await;
    let admin = junction_client::Client::connect_with(
        cluster.addrs(),
        junction_client::ClientOptions::default().with_token(admin_token.clone()),
    )
    .expect("client");
    admin.create_tenant("acme").await.expect("tenant");
    admin
        .create_station("acme/orders", 2, 3)
        .await
        .expect("station");
    let key = admin
        .create_api_key(CreateApiKeyRequest {
            tenant: "acme".into(),
            role: "producer".into(),
            station_prefix: Some("ord".into()),
            ..Default::default()
        })
        .await
        .expect("key");
    let me = junction_client::Client::connect_with(
        cluster.addrs(),
        junction_client::ClientOptions::default().with_token(key.token.clone()),
    )
    .expect("client");
    let who = me.who_am_i().await.expect("whoami");
    assert_eq!(
        (who.tenant.as_str(), who.role.as_str()),
        ("acme", "producer")
    );
    assert_eq!(who.station_prefix.as_deref(), Some("ord"));
    assert!(who.auth_enabled);
    // The SDK producer (InitProducer, cluster status, ProduceStream) works with a key.
    let producer = me.producer("acme/orders", Default::default());
    for i in 0..20 {
        producer
            .send(keyed(&format!("k{i}"), "v"))
            .await
            .expect("idempotent send with a key");
    }
    producer.close().await;
    // The CLI reads the token from a file.
    let token_file = dir.path().join("producer.token");
    std::fs::write(&token_file, format!("{}\n", key.token)).expect("write token");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_junction"))
        .args(["auth", "whoami", "--server", &cluster.addrs().join(",")])
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .expect("run junction");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("tenant acme, role producer"), "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_junction"))
        .args([
            "auth",
            "key",
            "list",
            "--server",
            &cluster.addrs().join(","),
        ])
        .env("JUNCTION_TOKEN", &admin_token)
        .output()
        .expect("run junction");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("producer") && text.contains("ord"), "{text}");
    // Without a token the CLI gets a clear refusal.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_junction"))
        .args(["station", "list", "--server", &cluster.addrs().join(",")])
        .env_remove("JUNCTION_TOKEN")
        .output()
        .expect("run junction");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no credential"), "{err}");
    cluster.shutdown().await;
}

/// A JWT signer standing in for an identity provider: an ES256 key and its JWKS.
struct IdP {
    key: ring::signature::EcdsaKeyPair,
    jwks: serde_json::Value,
}

impl IdP {
    fn new() -> Self {
        use base64::Engine;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("key generation");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        let raw = key.public_key().as_ref().to_vec();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "idp-1", "alg": "ES256",
            "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65]),
        }]});
        Self { key, jwks }
    }

    fn token(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", b64.encode(sig.as_ref()))
    }

    fn jwt(&self, tenant: &str, role: &str, aud: &str, exp_in_s: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        self.token(
            serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "idp-1"}),
            serde_json::json!({
                "iss": "https://id.example.com", "aud": aud, "exp": now + exp_in_s,
                "sub": "svc", "tenant": tenant, "role": role,
            }),
        )
    }
}

/// JWTs of an identity provider are credentials: their tenant and role hold like an API
/// key's; a token for another audience, an expired one and an unsigned one are refused with
/// the right reason; a stream opened with a token ends when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwts_from_an_identity_provider_are_credentials() {
    let dir = tempfile::tempdir().expect("temp dir");
    let idp = IdP::new();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks.to_string()).expect("jwks");
    let token_file = dir.path().join("admin.token");
    let (path, jwks_path) = (token_file.clone(), jwks.clone());
    let cluster = TestCluster::start_with(3, move |c| {
        c.auth = AuthMode::Keys;
        c.admin_token_file = Some(path.clone());
        c.jwt_jwks_file = Some(jwks_path.clone());
        c.jwt_issuer = Some("https://id.example.com".into());
        c.jwt_audience = Some("junction".into());
    })
    .await;
    let admin_token = std::fs::read_to_string(&token_file).expect("admin token");
    let mut admin = Caller::bearer(&cluster, 1, admin_token.trim()).await;
    admin
        .admin
        .create_tenant(CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .expect("tenant");
    for name in ["acme/orders", "orders"] {
        admin
            .admin
            .create_station(CreateStationRequest {
                name: name.into(),
                partitions: 1,
                replication_factor: 3,
                ..Default::default()
            })
            .await
            .expect("station");
    }
    let produce = |station: &str| ProduceRequest {
        station: station.into(),
        messages: vec![keyed("k", "v")],
        request_id: 1,
        producer: None,
    };

    // A producer of acme: produces there, cannot see the default tenant's station, may not
    // manage stations.
    let mut acme = Caller::bearer(&cluster, 2, &idp.jwt("acme", "producer", "junction", 600)).await;
    acme.broker
        .produce(produce("acme/orders"))
        .await
        .expect("a JWT producer of acme produces to acme's station");
    let hidden = acme
        .broker
        .produce(produce("default/orders"))
        .await
        .expect_err("another tenant's station");
    assert_eq!(hidden.code(), Code::NotFound, "{hidden}");
    let denied = acme
        .admin
        .create_station(CreateStationRequest {
            name: "acme/more".into(),
            partitions: 1,
            replication_factor: 3,
            ..Default::default()
        })
        .await
        .expect_err("a producer may not create stations");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied}");

    // Refusals, each with its reason.
    let none = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(r#"{"iss":"https://id.example.com","aud":"junction","exp":9999999999,"tenant":"acme","role":"admin"}"#)
        )
    };
    for (token, want) in [
        (
            idp.jwt("acme", "producer", "another-service", 600),
            "INVALID_CREDENTIAL",
        ),
        (
            idp.jwt("acme", "producer", "junction", -120),
            "EXPIRED_CREDENTIAL",
        ),
        (
            idp.jwt("acme", "superuser", "junction", 600),
            "INVALID_CREDENTIAL",
        ),
        (none, "MALFORMED_CREDENTIAL"),
    ] {
        let mut c = Caller::bearer(&cluster, 3, &token).await;
        let s = c
            .broker
            .produce(produce("acme/orders"))
            .await
            .expect_err("refused");
        assert_eq!(s.code(), Code::Unauthenticated, "{s}");
        assert_eq!(reason(&s), want, "{s}");
    }

    // A token in its last seconds (inside the 30 s clock-skew allowance): the tail opened
    // with it ends as expired.
    let mut ending = Caller::bearer(&cluster, 1, &idp.jwt("acme", "reader", "junction", -25)).await;
    let mut tail = ending
        .broker
        .tail(latest_tail("acme/orders"))
        .await
        .expect("tail opened while the token holds")
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(20), end_of(&mut tail))
        .await
        .expect("the tail ended once the token expired");
    let s = ended.expect("ended with a status");
    assert_eq!(s.code(), Code::Unauthenticated, "{s}");
    assert_eq!(reason(&s), "EXPIRED_CREDENTIAL", "{s}");
    cluster.shutdown().await;
}
