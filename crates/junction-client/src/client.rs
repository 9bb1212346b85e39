//! The client handle: address book, cached channels and the retry loop every call goes through.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use junction_proto::v1::admin_client::AdminClient;
use junction_proto::v1::broker_client::BrokerClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::ClientError;
use crate::retry::{self, Backoff, Disposition};

/// Settings of a [`Client`]; `ClientOptions::default()` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a call keeps retrying UNAVAILABLE / connection failures (default 30 s). For a
    /// [`crate::TailStream`] and a [`crate::Producer`] stream it bounds one run of consecutive
    /// failures.
    pub retry_deadline: Duration,
    /// First delay between retries (default 50 ms); doubles after each failure.
    pub initial_backoff: Duration,
    /// Longest delay between retries (default 250 ms).
    pub max_backoff: Duration,
    /// Timeout of establishing one TCP/HTTP2 connection (default 5 s).
    pub connect_timeout: Duration,
    /// Largest gRPC message sent or received (default 64 MiB).
    pub max_message_size: usize,
    /// The credential sent with every call as `authorization: Bearer <token>` (an API key
    /// `jk_...` or the admin token); `None` for a cluster running with `--auth none`.
    pub token: Option<String>,
    /// TLS for every connection (the CA to trust, see [`junction_tls::ClientTls`]); `None`:
    /// plaintext. Addresses may be written `https://` or `http://` either way.
    pub tls: Option<junction_tls::ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            retry_deadline: Duration::from_secs(30),
            initial_backoff: retry::INITIAL_BACKOFF,
            max_backoff: retry::MAX_BACKOFF,
            connect_timeout: Duration::from_secs(5),
            max_message_size: 64 * 1024 * 1024,
            token: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    /// Sets [`ClientOptions::retry_deadline`].
    pub fn with_retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// Sets [`ClientOptions::token`].
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets [`ClientOptions::tls`].
    pub fn with_tls(mut self, tls: junction_tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`ClientOptions::tls`] to trust the CA certificates of a PEM file.
    pub fn with_tls_ca_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, ClientError> {
        let tls = junction_tls::ClientTls::from_ca_file(path.as_ref())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(self.with_tls(tls))
    }

    /// Sets [`ClientOptions::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff)
    }
}

/// A handle on a Junction cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addresses", &self.addresses())
            .finish_non_exhaustive()
    }
}

/// A channel whose calls carry the client's credential.
pub type AuthedChannel = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// The header for `token` (an API key `jk_...`, a JWT or the admin token); `None`: calls
    /// go without credentials. For callers that speak the raw gRPC stubs
    /// (`BrokerClient::with_interceptor(channel, bearer)`).
    pub fn new(token: Option<&str>) -> Result<Bearer, ClientError> {
        match token {
            Some(t) => format!("Bearer {}", t.trim())
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| ClientError::InvalidToken),
            None => Ok(Bearer(None)),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub(crate) struct Inner {
    pub(crate) options: ClientOptions,
    bearer: Bearer,
    pool: Mutex<Pool>,
}

/// Known addresses (seeds, then leader hints), the one calls go to first, and their channels.
struct Pool {
    addrs: Vec<String>,
    current: usize,
    channels: HashMap<String, Channel>,
}

impl Client {
    /// Creates a client for the given seed addresses (`host:port` or `http://host:port`) with
    /// default options. No connection is made until the first call.
    pub fn connect(
        seeds: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, ClientError> {
        Self::connect_with(seeds, ClientOptions::default())
    }

    /// Like [`Client::connect`], with explicit options.
    pub fn connect_with(
        seeds: impl IntoIterator<Item = impl Into<String>>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let mut addrs: Vec<String> = Vec::new();
        for seed in seeds {
            let seed: String = seed.into();
            if options.tls.is_none() && seed.trim().to_ascii_lowercase().starts_with("https://") {
                return Err(ClientError::Tls(format!(
                    "{seed} is an https:// address but no CA to trust was given \
                     (ClientOptions::with_tls_ca_file, or --tls-ca / JUNCTION_TLS_CA)"
                )));
            }
            let addr = retry::normalize_address(&seed)?;
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        let bearer = Bearer::new(options.token.as_deref())?;
        Ok(Client {
            inner: Arc::new(Inner {
                bearer,
                options,
                pool: Mutex::new(Pool {
                    addrs,
                    current: 0,
                    channels: HashMap::new(),
                }),
            }),
        })
    }

    /// The options this client was created with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Every address the client knows (seeds and leaders it was pointed to), `http://` form.
    pub fn addresses(&self) -> Vec<String> {
        self.inner.lock().addrs.clone()
    }

    /// `channel` with this client's credential on every call.
    pub(crate) fn authed(&self, channel: Channel) -> AuthedChannel {
        InterceptedService::new(channel, self.inner.bearer.clone())
    }

    pub(crate) fn broker(&self, channel: Channel) -> BrokerClient<AuthedChannel> {
        let max = self.inner.options.max_message_size;
        BrokerClient::new(self.authed(channel))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub(crate) fn admin(&self, channel: Channel) -> AdminClient<AuthedChannel> {
        let max = self.inner.options.max_message_size;
        AdminClient::new(self.authed(channel))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Runs `op` against one address after another until it succeeds, fails with a final
    /// status, or the retry deadline passes.
    pub(crate) async fn with_retry<T, F, Fut>(&self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempts = Attempts::new(&self.inner.options);
        loop {
            let addr = attempts.next_address(self);
            let channel = self.inner.channel(&addr)?;
            let remaining = attempts.remaining();
            let outcome = tokio::time::timeout(remaining, op(channel)).await;
            let status = match outcome {
                Ok(Ok(value)) => {
                    self.inner.succeeded(&addr);
                    return Ok(value);
                }
                Ok(Err(status)) => status,
                Err(_elapsed) => {
                    return Err(attempts.exhausted(Code::DeadlineExceeded, "retry deadline passed"));
                }
            };
            match retry::classify(&status) {
                Disposition::Fail => return Err(status.into()),
                // Over the tenant's quota: the same node, after the wait it named (a wait past
                // the deadline gives the refusal to the caller now).
                Disposition::Throttled { after } => {
                    if after >= attempts.remaining() {
                        return Err(status.into());
                    }
                    tracing::debug!(%addr, ?after, "throttled by quota; waiting");
                    tokio::time::sleep(after).await;
                }
                Disposition::Retry { leader_hint } => {
                    tracing::debug!(%addr, code = ?status.code(), message = status.message(), "retrying");
                    let delay = attempts.failed(self, &addr, &status, leader_hint)?;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The address calls go to first.
    pub(crate) fn current_address(&self) -> String {
        let pool = self.lock();
        pool.addrs
            .get(pool.current)
            .or_else(|| pool.addrs.first())
            .cloned()
            .unwrap_or_default()
    }

    /// The (lazily connecting) channel of an address, created on first use.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut pool = self.lock();
        if let Some(channel) = pool.channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint =
            Endpoint::from_shared(addr.to_owned()).map_err(|err| ClientError::InvalidAddress {
                addr: addr.to_owned(),
                reason: err.to_string(),
            })?;
        let endpoint = endpoint
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(junction_proto::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(junction_proto::HTTP2_CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = junction_tls::channel(endpoint, self.options.tls.as_ref());
        pool.channels.insert(addr.to_owned(), channel.clone());
        if !pool.addrs.iter().any(|a| a == addr) {
            pool.addrs.push(addr.to_owned());
        }
        Ok(channel)
    }

    /// Makes `addr` the address calls go to first.
    pub(crate) fn succeeded(&self, addr: &str) {
        let mut pool = self.lock();
        if let Some(i) = pool.addrs.iter().position(|a| a == addr) {
            pool.current = i;
        }
    }

    /// Moves calls on to the next address if `addr` is still the first choice. A channel whose
    /// internal worker died ("Service was not ready") is dropped so that it is rebuilt.
    pub(crate) fn failed(&self, addr: &str, status: &Status) {
        let mut pool = self.lock();
        if status.message().starts_with("Service was not ready") {
            pool.channels.remove(addr);
        }
        let len = pool.addrs.len();
        if len > 0 && pool.addrs.get(pool.current).is_some_and(|a| a == addr) {
            pool.current = (pool.current + 1) % len;
        }
    }

    /// Learns a leader address and makes it the first choice.
    pub(crate) fn prefer(&self, addr: &str) {
        let mut pool = self.lock();
        let i = match pool.addrs.iter().position(|a| a == addr) {
            Some(i) => i,
            None => {
                pool.addrs.push(addr.to_owned());
                pool.addrs.len() - 1
            }
        };
        pool.current = i;
    }
}

/// Bookkeeping of one run of retries: deadline, backoff and where to go next.
pub(crate) struct Attempts {
    started: Instant,
    deadline: Instant,
    backoff: Backoff,
    count: u32,
    hint: Option<String>,
    last_was_hint: bool,
    last: Option<(Code, String)>,
}

impl Attempts {
    pub(crate) fn new(options: &ClientOptions) -> Self {
        let started = Instant::now();
        Self {
            started,
            deadline: started + options.retry_deadline,
            backoff: options.backoff(),
            count: 0,
            hint: None,
            last_was_hint: false,
            last: None,
        }
    }

    /// The address of the next attempt: a leader hint if one arrived, else the current one.
    pub(crate) fn next_address(&mut self, client: &Client) -> String {
        self.count += 1;
        self.hint
            .take()
            .unwrap_or_else(|| client.inner.current_address())
    }

    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Records a retryable failure of an attempt at `addr` and returns how long to wait
    /// before the next one, or the final error when the deadline does not leave room for it.
    pub(crate) fn failed(
        &mut self,
        client: &Client,
        addr: &str,
        status: &Status,
        leader_hint: Option<String>,
    ) -> Result<Duration, ClientError> {
        self.record(client, addr, status.code(), status.message(), leader_hint);
        self.delay()
    }

    /// Like [`Attempts::failed`] for failures that are not a [`Status`].
    pub(crate) fn record(
        &mut self,
        client: &Client,
        addr: &str,
        code: Code,
        message: &str,
        leader_hint: Option<String>,
    ) {
        self.last = Some((code, message.to_owned()));
        match leader_hint.filter(|hint| hint != addr) {
            Some(hint) => {
                client.inner.prefer(&hint);
                self.hint = Some(hint);
            }
            None => {
                let pseudo = Status::new(code, message);
                client.inner.failed(addr, &pseudo);
            }
        }
    }

    /// The wait before the next attempt (none for the first jump to a leader hint), or the
    /// final error if that wait would end past the deadline.
    pub(crate) fn delay(&mut self) -> Result<Duration, ClientError> {
        let delay = if self.hint.is_some() && !self.last_was_hint {
            self.last_was_hint = true;
            Duration::ZERO
        } else {
            self.last_was_hint = false;
            self.backoff.next_delay()
        };
        if Instant::now() + delay >= self.deadline {
            let (code, message) = self
                .last
                .clone()
                .unwrap_or((Code::Unavailable, "retry deadline passed".to_owned()));
            return Err(self.exhausted(code, &message));
        }
        Ok(delay)
    }

    /// Starts over after a success (used by long-lived streams).
    pub(crate) fn reset(&mut self, options: &ClientOptions) {
        *self = Self::new(options);
    }

    /// Starts a new run of failures with a new deadline, but keeps the backoff grown so far
    /// (used by streams that opened but delivered nothing before failing again).
    pub(crate) fn restart_clock(&mut self, options: &ClientOptions) {
        let backoff = self.backoff.clone();
        *self = Self::new(options);
        self.backoff = backoff;
    }

    pub(crate) fn exhausted(&self, code: Code, message: &str) -> ClientError {
        ClientError::RetriesExhausted {
            attempts: self.count,
            elapsed: self.started.elapsed(),
            code,
            message: message.to_owned(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn connect_normalizes_and_dedups_seeds() {
        let client = Client::connect(["127.0.0.1:1", "http://127.0.0.1:1", "127.0.0.1:2"]).unwrap();
        assert_eq!(
            client.addresses(),
            vec![
                "http://127.0.0.1:1".to_owned(),
                "http://127.0.0.1:2".to_owned()
            ]
        );
    }

    #[test]
    fn connect_rejects_nothing_and_garbage() {
        let none: [&str; 0] = [];
        assert!(matches!(
            Client::connect(none),
            Err(ClientError::NoAddresses)
        ));
        assert!(matches!(
            Client::connect(["ftp://x:1"]),
            Err(ClientError::InvalidAddress { .. })
        ));
        // An https:// address needs a CA to trust.
        assert!(matches!(
            Client::connect(["https://x:1"]),
            Err(ClientError::Tls(_))
        ));
    }

    #[test]
    fn failures_rotate_and_hints_are_preferred() {
        let client = Client::connect(["a:1", "b:1"]).unwrap();
        let inner = &client.inner;
        assert_eq!(inner.current_address(), "http://a:1");
        inner.failed("http://a:1", &Status::unavailable("x"));
        assert_eq!(inner.current_address(), "http://b:1");
        // A stale failure report of an address that is no longer current changes nothing.
        inner.failed("http://a:1", &Status::unavailable("x"));
        assert_eq!(inner.current_address(), "http://b:1");
        inner.failed("http://b:1", &Status::unavailable("x"));
        assert_eq!(inner.current_address(), "http://a:1");
        inner.prefer("http://c:1");
        assert_eq!(inner.current_address(), "http://c:1");
        assert_eq!(client.addresses().len(), 3);
        inner.succeeded("http://b:1");
        assert_eq!(inner.current_address(), "http://b:1");
    }

    #[test]
    fn attempts_follow_hint_then_back_off_until_deadline() {
        let options = ClientOptions::default().with_retry_deadline(Duration::from_secs(2));
        let client = Client::connect(["a:1", "b:1"]).unwrap();
        let mut attempts = Attempts::new(&options);
        let first = attempts.next_address(&client);
        assert_eq!(first, "http://a:1");
        let delay = attempts
            .failed(
                &client,
                &first,
                &Status::unavailable("x"),
                Some("http://c:1".into()),
            )
            .unwrap();
        assert_eq!(delay, Duration::ZERO);
        assert_eq!(attempts.next_address(&client), "http://c:1");
        let delay = attempts
            .failed(&client, "http://c:1", &Status::unavailable("x"), None)
            .unwrap();
        assert_eq!(delay, Duration::from_millis(50));
    }

    #[tokio::test]
    async fn calls_follow_a_not_leader_hint() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use tonic_types::{ErrorDetails, StatusExt};

        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        let calls = AtomicU32::new(0);
        let answer = client
            .with_retry(|_channel| {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if call == 0 {
                        // What a node answers when it may not forward to the leader.
                        let details = ErrorDetails::with_error_info(
                            crate::NOT_LEADER_REASON,
                            "junction.dev",
                            [(crate::LEADER_ADDR_KEY.to_owned(), "127.0.0.1:2".to_owned())],
                        );
                        Err(Status::with_error_details(
                            Code::Unavailable,
                            "not the leader",
                            details,
                        ))
                    } else {
                        Ok(call)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(answer, 1, "retried once");
        assert_eq!(
            client.addresses(),
            vec![
                "http://127.0.0.1:1".to_owned(),
                "http://127.0.0.1:2".to_owned()
            ]
        );
        assert_eq!(client.inner.current_address(), "http://127.0.0.1:2");
    }

    #[tokio::test]
    async fn final_statuses_are_not_retried() {
        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        let mut calls = 0;
        let err = client
            .with_retry(|_channel| {
                calls += 1;
                async { Err::<(), _>(Status::invalid_argument("bad")) }
            })
            .await
            .unwrap_err();
        assert_eq!(calls, 1);
        assert!(matches!(
            err,
            ClientError::Status {
                code: Code::InvalidArgument,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn unreachable_servers_exhaust_the_deadline() {
        // Port 1 on localhost refuses connections.
        let options = ClientOptions::default().with_retry_deadline(Duration::from_millis(400));
        let client = Client::connect_with(["127.0.0.1:1"], options).unwrap();
        let err = client.list_tenants().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        assert!(matches!(err, ClientError::RetriesExhausted { attempts, .. } if attempts >= 2));
    }
}
