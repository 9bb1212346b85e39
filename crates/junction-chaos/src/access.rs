//! How the run's clients reach the cluster: the CA they trust (a `--tls` run) and the
//! credential they call with (an `--auth` run).

use junction_client::{AuthedChannel, Bearer, Client, ClientError, ClientOptions};
use junction_proto::v1::broker_client::BrokerClient;
use tonic::transport::Endpoint;

/// TLS and credential of the run's clients; the default is plaintext without a credential.
#[derive(Clone, Default)]
pub struct Access {
    pub tls: Option<junction_tls::ClientTls>,
    /// `authorization: Bearer` of every call (an API key of the tenant under test).
    pub token: Option<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Access {
    /// SDK options with this TLS and credential.
    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            tls: self.tls.clone(),
            token: self.token.clone(),
            ..ClientOptions::default()
        }
    }

    /// An SDK client of the nodes at `addrs` whose calls retry for up to `retry_deadline`.
    pub fn client(
        &self,
        addrs: &std::collections::BTreeMap<u64, String>,
        retry_deadline: std::time::Duration,
    ) -> Result<Client, ClientError> {
        Client::connect_with(
            addrs.values().cloned(),
            self.options().with_retry_deadline(retry_deadline),
        )
    }

    /// A raw broker stub on `endpoint` (not connected yet) whose calls carry the credential.
    pub fn broker(&self, endpoint: Endpoint) -> Result<BrokerClient<AuthedChannel>, ClientError> {
        let channel = junction_tls::channel(endpoint, self.tls.as_ref());
        Ok(BrokerClient::with_interceptor(
            channel,
            Bearer::new(self.token.as_deref())?,
        ))
    }
}
