//! The one error type of the client.

use std::time::Duration;

use tonic::Code;

/// Everything a client call can fail with.
///
/// Use [`ClientError::code`] to branch on the gRPC status code a failure carries.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `Client::connect` was given no addresses.
    #[error("no server addresses given")]
    NoAddresses,
    /// The token cannot be sent as a gRPC metadata value.
    #[error("the token has characters a header cannot carry (printable ASCII only)")]
    InvalidToken,

    /// TLS could not be set up (a CA file that cannot be read or parsed, an https:// address
    /// without a CA).
    #[error("TLS: {0}")]
    Tls(String),

    /// A server address could not be parsed.
    #[error("invalid server address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The server answered with a status that is not retried (INVALID_ARGUMENT, NOT_FOUND,
    /// ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ...).
    #[error("server returned {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },

    /// Every attempt failed with a retryable error until the retry deadline passed.
    #[error("gave up after {attempts} attempts in {elapsed:?}, last error {code:?}: {message}")]
    RetriesExhausted {
        /// How many attempts were made.
        attempts: u32,
        /// Time spent from the first attempt.
        elapsed: Duration,
        /// The code of the last failure (UNAVAILABLE for connection failures).
        code: Code,
        /// The message of the last failure.
        message: String,
    },

    /// The server's answer broke the protocol (e.g. a missing field or a wrong count).
    #[error("invalid response from server: {reason}")]
    InvalidResponse {
        /// What was wrong.
        reason: String,
    },

    /// Another instance of this named producer was started: this one can no longer send.
    #[error("producer fenced: {message}")]
    Fenced {
        /// The server's message.
        message: String,
    },

    /// The producer was closed before the message could be sent.
    #[error("producer is closed")]
    ProducerClosed,
}

impl ClientError {
    /// The gRPC status code behind the error, when it came from a server or from retrying.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { code, .. } | Self::RetriesExhausted { code, .. } => Some(*code),
            Self::Fenced { .. } => Some(Code::FailedPrecondition),
            _ => None,
        }
    }

    /// Whether the error is the server saying the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }

    /// Whether the error is the server saying the thing already exists.
    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(Code::AlreadyExists)
    }

    pub(crate) fn invalid_response(reason: impl Into<String>) -> Self {
        Self::InvalidResponse {
            reason: reason.into(),
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        Self::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}
