//! A Junction node as a server: configuration, the public gRPC services (`Broker`, `Admin`,
//! `Groups`, health and reflection) on the client port, the node-to-node `Peer` service on
//! the peer port (client port + `--peer-port-offset`), and HTTP on a third.
//!
//! - [`config`]: the one configuration struct (defaults < TOML < env < flags).
//! - [`broker_service`], [`admin_service`]: thin handlers — validate, route, call, map.
//! - [`status`]: the one error → gRPC status table. [`forward`]: hop-limited forwarding.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`; [`rest`]: the REST API under `/api/v1`.
//!
//! [`Server::start`] takes bound listeners and returns a [`ServerHandle`] with the real
//! addresses, so tests run many nodes in one process on port 0.

pub mod admin_service;
pub mod auth;
pub mod broker_service;
pub mod config;
pub mod console;
pub mod forward;
pub mod groups_service;
pub mod http;
pub mod jwt;
pub mod policy;
pub mod produce_path;
pub mod rest;
pub mod schemas_service;
pub mod status;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use junction_broker::{Broker, BrokerError};
use junction_proto::peer::peer_server::PeerServer;
use junction_proto::v1::admin_server::AdminServer;
use junction_proto::v1::broker_server::BrokerServer;
use junction_proto::v1::groups_server::GroupsServer;
use junction_proto::v1::schemas_server::SchemasServer;
use junction_raft::PeerService;
use junction_storage::{Store, StoreOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::config::{AuthMode, Config, ConfigError, ServeArgs};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create or resolve data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] junction_storage::StorageError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] junction_tls::TlsError),
}

/// A running node.
pub struct ServerHandle {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Where the node-to-node service listens; `None` when it shares the client port.
    pub peer_addr: Option<SocketAddr>,
    pub broker: Arc<Broker>,
    stop: CancellationToken,
    /// Stops the peer listener: after the broker shut down (its leaderships handed over).
    peer_stop: CancellationToken,
    failed: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The service dead letters are appended through; the broker's sink holds it weakly (the
    /// service holds the broker).
    _dead_letters: Arc<broker_service::BrokerService>,
}

/// How often the server checks whether its store was poisoned.
const POISON_CHECK: Duration = Duration::from_millis(100);

impl ServerHandle {
    /// Stops serving clients, shuts every Raft group down (handing leaderships over through
    /// the peer service, which stops last) and closes RocksDB.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.broker.shutdown().await;
        self.peer_stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// Returns a future that resolves when the node is asked to stop.
    pub fn stopped(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Cancelled when the node can no longer work and must stop: a write to its store failed
    /// (full disk, I/O error), so the store refuses every write and its Raft groups have
    /// stopped. The binary shuts down and exits non-zero, so a supervisor restarts it once
    /// the disk is fixed; nothing acknowledged is lost (acknowledged writes were fsynced).
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }
}

/// Serves `router` on `incoming` until `stop`.
fn serve<I, IO, IE>(
    router: GrpcRouter,
    incoming: I,
    stop: CancellationToken,
    what: &'static str,
) -> tokio::task::JoinHandle<()>
where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(listener = what, error = %e, "gRPC server stopped");
        }
    })
}

/// A router of either listener: every call passes the span layer first.
type GrpcRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<telemetry::RpcSpans, tower::layer::util::Identity>,
>;

/// The gRPC server settings of both listeners.
fn grpc_builder() -> tonic::transport::Server<
    tower::layer::util::Stack<telemetry::RpcSpans, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(junction_proto::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(junction_proto::HTTP2_CONNECTION_WINDOW)
        .layer(telemetry::RpcSpans::grpc())
}

/// Streams a peer may reset before the peer port accepted them, per connection. h2's default
/// (20) guards public ports against reset floods; on the peer port every group's Raft calls
/// share one connection per peer, and when a node is overloaded (a thousand groups electing
/// at once) the callers' deadlines cancel hundreds of calls not yet accepted: at 20 the port
/// answered with GOAWAY `too_many_resets`, which cut every group's traffic with that peer and
/// turned the overload into an election storm that did not end. Only cluster members (the
/// secret, or mutual TLS) reach this port.
const PEER_PENDING_RESETS: usize = 1 << 16;

/// The server builder of the peer port (see [`PEER_PENDING_RESETS`]).
fn peer_grpc_builder() -> tonic::transport::Server<
    tower::layer::util::Stack<telemetry::RpcSpans, tower::layer::util::Identity>,
> {
    grpc_builder().http2_max_pending_accept_reset_streams(Some(PEER_PENDING_RESETS))
}

/// Starts a node.
pub struct Server;

impl Server {
    /// Binds the configured addresses and starts the node.
    pub async fn start(config: Config) -> Result<ServerHandle, ServerError> {
        let grpc = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let http = TcpListener::bind(&config.http)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.http.clone(),
                source,
            })?;
        Self::start_with_listeners(config, grpc, http).await
    }

    /// Starts a node on already-bound client and HTTP listeners; the peer listener (unless
    /// the peer service shares the client port) is bound here from the configuration.
    pub async fn start_with_listeners(
        mut config: Config,
        grpc: TcpListener,
        http: TcpListener,
    ) -> Result<ServerHandle, ServerError> {
        config.validate()?;
        http::init_metrics();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        // Resolved once, here: every path under it (the store, the memory tier's stores) is
        // then absolute, whatever the working directory does later.
        config.data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|source| ServerError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        tracing::info!(data_dir = %config.data_dir.display(), "data directory");
        let cluster_secret = config.cluster_secret()?;
        if cluster_secret.is_none() {
            tracing::warn!(
                "no --cluster-secret-file: node-to-node calls are NOT authenticated, so anyone \
                 who can reach {} can join this cluster or disturb its Raft groups; give every \
                 node the same secret file outside a test setup",
                config.listen
            );
        }
        let grpc_addr = grpc.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let http_addr = http.local_addr().map_err(|source| ServerError::Bind {
            addr: config.http.clone(),
            source,
        })?;
        let peer = match config.peer_listen()? {
            Some(addr) => {
                Some(
                    TcpListener::bind(&addr)
                        .await
                        .map_err(|source| ServerError::Bind {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let peer_addr = match &peer {
            Some(l) => Some(l.local_addr().map_err(|source| ServerError::Bind {
                addr: "peer listener".into(),
                source,
            })?),
            None => {
                tracing::warn!(
                    "--peer-port-offset 0: the node-to-node service shares the client port {}",
                    config.listen
                );
                None
            }
        };
        let tls = match config.tls_paths()? {
            Some(paths) => Some(junction_tls::NodeTls::load(paths)?),
            None => {
                tracing::warn!(
                    "no --tls-cert/--tls-key/--tls-ca: client and node-to-node traffic is \
                     plaintext; anyone on the network path can read and alter it"
                );
                None
            }
        };
        let outgoing_tls = tls.clone().map(junction_tls::ClientTls::of_node);
        // The client port's TLS: none with --plaintext-client-port (the peer port keeps its
        // mutual TLS), and then calls forwarded to other nodes' client ports are plaintext too.
        let client_tls = tls.clone().filter(|_| !config.plaintext_client_port);
        if tls.is_some() && client_tls.is_none() {
            tracing::warn!(
                "--plaintext-client-port: the client port {} is plaintext (the peer port keeps \
                 mutual TLS); for a development cluster on loopback only",
                config.listen
            );
        }
        let forward_tls = client_tls.clone().and(outgoing_tls.clone());
        tracing::info!(?config, %grpc_addr, %http_addr, ?peer_addr, tls = tls.is_some(), "starting node");
        let store = {
            let path = config.data_dir.join("db");
            let options = StoreOptions {
                no_preallocation: config.test_no_preallocation,
            };
            tokio::task::spawn_blocking(move || Store::open_with(&path, options))
                .await
                .map_err(|e| BrokerError::Raft(format!("opening the store panicked: {e}")))??
        };
        let mut broker_config = config.broker_config()?;
        broker_config.peer_tls = outgoing_tls.clone();
        let broker = Broker::start(broker_config, store.clone()).await?;
        let clients = Arc::new(forward::ClientPool::with_overrides(
            config.dial_overrides()?,
            junction_raft::peer_auth::AttachSecret(cluster_secret.clone(), None),
            forward_tls,
        ));
        let auth = Arc::new(auth::Authenticator::new(
            &config,
            broker.clone(),
            cluster_secret.clone(),
        )?);
        if !auth.enabled() {
            tracing::warn!(
                "--auth none: client calls are NOT authenticated; anyone who can reach {} can \
                 read, write and administer every tenant",
                config.listen
            );
        }
        let stop = CancellationToken::new();
        let dead_letters = Arc::new(broker_service::BrokerService::new(
            broker.clone(),
            clients.clone(),
            auth.clone(),
        ));
        broker.set_dead_letter_sink(Arc::new(groups_service::InProcessDeadLetters {
            service: Arc::downgrade(&dead_letters),
            clients: clients.clone(),
        }));

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<BrokerServer<broker_service::BrokerService>>()
            .await;
        health
            .set_serving::<AdminServer<admin_service::AdminService>>()
            .await;
        health
            .set_serving::<GroupsServer<groups_service::GroupsService>>()
            .await;
        health
            .set_serving::<SchemasServer<schemas_service::SchemasService>>()
            .await;
        // Reflection lists every service this port serves: Junction's own, the standard
        // health service and reflection itself, in both protocol versions (v1 and the
        // v1alpha that older tools still ask for).
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(junction_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder()
            .build_v1()
            .map_err(|e| BrokerError::Raft(format!("reflection: {e}")))?;
        let reflection_v1alpha = reflection_builder()
            .build_v1alpha()
            .map_err(|e| BrokerError::Raft(format!("reflection: {e}")))?;

        let router = grpc_builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                BrokerServer::new(broker_service::BrokerService::new(
                    broker.clone(),
                    clients.clone(),
                    auth.clone(),
                ))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            )
            .add_service(AdminServer::new(admin_service::AdminService::new(
                broker.clone(),
                clients.clone(),
                auth.clone(),
            )))
            .add_service(SchemasServer::new(schemas_service::SchemasService::new(
                broker.clone(),
                clients.clone(),
                auth.clone(),
            )))
            .add_service(
                GroupsServer::new(groups_service::GroupsService::new(
                    broker.clone(),
                    clients.clone(),
                    auth.clone(),
                ))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            );
        let peer_service = tonic::service::interceptor::InterceptedService::new(
            PeerServer::new(PeerService::new(broker.clone()))
                .max_decoding_message_size(512 << 20)
                .max_encoding_message_size(512 << 20),
            junction_raft::peer_auth::RequireSecret(
                cluster_secret.clone(),
                Some(broker.identity().clone()),
            ),
        );
        let peer_stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let router = match peer {
            None => router.add_service(peer_service),
            Some(peer) => {
                let peer_router = peer_grpc_builder().add_service(peer_service);
                tasks.push(match &tls {
                    Some(tls) => {
                        let t = tls.clone();
                        let incoming = junction_tls::incoming(
                            peer,
                            move || t.peer_port(),
                            "peer",
                            peer_stop.clone(),
                        );
                        serve(peer_router, incoming, peer_stop.clone(), "peer")
                    }
                    None => {
                        let incoming = tonic::transport::server::TcpIncoming::from(peer)
                            .with_nodelay(Some(true));
                        serve(peer_router, incoming, peer_stop.clone(), "peer")
                    }
                });
                router
            }
        };
        // The builder's `tcp_nodelay` only reaches sockets tonic accepts itself: set it on the
        // accepted sockets here. Without it every reply waited on Nagle's algorithm and the
        // peer's delayed ACK, 40 ms a time on Linux (p99 of produce was 45-90 ms).
        if let Some(tls) = &tls {
            tasks.push(tls.watch(
                Duration::from_millis(config.tls_reload_ms),
                peer_stop.clone(),
            ));
        }
        let grpc_task = match client_tls {
            Some(tls) => {
                let incoming =
                    junction_tls::incoming(grpc, move || tls.client_port(), "client", stop.clone());
                serve(router, incoming, stop.clone(), "client")
            }
            None => {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
                serve(router, incoming, stop.clone(), "client")
            }
        };
        let s2 = stop.clone();
        let app = http::router(
            broker.clone(),
            Arc::new(rest::Rest::new(
                broker.clone(),
                clients.clone(),
                auth.clone(),
            )),
        );
        let http_task = tokio::spawn(async move {
            if let Err(e) = axum::serve(http, app)
                .with_graceful_shutdown(s2.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
        let failed = CancellationToken::new();
        let (s3, f) = (stop.clone(), failed.clone());
        let poison_task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = s3.cancelled() => return,
                    () = tokio::time::sleep(POISON_CHECK) => {}
                }
                if store.is_poisoned() {
                    tracing::error!(
                        "the data store failed a write and is poisoned; this node stops and \
                         must be restarted once its disk is fixed"
                    );
                    f.cancel();
                    return;
                }
            }
        });
        tasks.extend([grpc_task, http_task, poison_task]);
        let handle = ServerHandle {
            grpc_addr,
            http_addr,
            peer_addr,
            broker,
            stop,
            peer_stop,
            failed,
            tasks,
            _dead_letters: dead_letters,
        };
        // With the peer service answering (members starting at the same time ask each other
        // for their cluster), a node with empty state initialises the cluster or rejoins it.
        if let Err(e) = handle.broker.bootstrap_metadata().await {
            handle.shutdown().await;
            return Err(e.into());
        }
        Ok(handle)
    }
}
