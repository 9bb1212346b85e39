//! Pure retry logic: backoff, address normalisation, and which failures are worth retrying.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::error::ClientError;

/// First delay between attempts.
pub(crate) const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Longest delay between attempts. A partition whose leader died takes a new one in about
/// 0.8–1.1 s (two election timeouts: the first candidate meets the old leader's lease); with
/// a cap of 1 s the retries after 0.75 s came 0.8 s apart and most writes resumed only at
/// 1.57 s after a kill (chaos, seed 502: p99 1.60 s). At 250 ms they resume within a quarter
/// second of the election, for at most four calls a second per waiting request (Kafka's
/// producer retries every 100 ms by default).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// The `ErrorInfo.reason` a node uses when it is not the leader it needs to be.
pub const NOT_LEADER_REASON: &str = "NOT_LEADER";
/// The `ErrorInfo.metadata` key that carries the leader's address.
pub const LEADER_ADDR_KEY: &str = "leader_addr";
/// The `ErrorInfo.reason` of a call over its tenant's rate quota; its `RetryInfo` says when to
/// try again.
pub const THROTTLED_REASON: &str = "THROTTLED";
/// The `ErrorInfo.reason` of a read that met a record whose checksum failed on the node that
/// answered. Retried: that replica repairs itself from the others (a leader hands over first),
/// and the record is intact on them.
pub const CORRUPT_RECORD_REASON: &str = "CORRUPT_RECORD";
/// The longest wait a throttled call is told to take that the SDK honours as given.
pub(crate) const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(30);

/// Exponential backoff: `initial`, doubling each time, capped at `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            max,
            next: initial.min(max),
        }
    }

    /// The delay to wait now; the following one doubles (up to the cap).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(INITIAL_BACKOFF, MAX_BACKOFF)
    }
}

/// What to do about a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Try again, at the leader's address first when one is known (already normalised).
    Retry { leader_hint: Option<String> },
    /// Over the tenant's rate quota: wait this long, then try the same node again.
    Throttled { after: Duration },
    /// Give the error to the caller.
    Fail,
}

/// Decides whether a failed call is retried. UNAVAILABLE, transport failures (connection
/// refused, reset, dropped mid-stream) and `NOT_LEADER` error details are retried; every other
/// status is final.
pub(crate) fn classify(status: &Status) -> Disposition {
    if let Some(after) = throttled(status) {
        return Disposition::Throttled { after };
    }
    if let Some(info) = status.get_details_error_info()
        && info.reason == CORRUPT_RECORD_REASON
    {
        return Disposition::Retry { leader_hint: None };
    }
    if let Some(info) = status.get_details_error_info()
        && info.reason == NOT_LEADER_REASON
    {
        let leader_hint = info
            .metadata
            .get(LEADER_ADDR_KEY)
            .and_then(|addr| normalize_address(addr).ok());
        return Disposition::Retry { leader_hint };
    }
    if status.code() == Code::Unavailable || is_transport_failure(status) {
        Disposition::Retry { leader_hint: None }
    } else {
        Disposition::Fail
    }
}

/// The wait a throttled call was given (`THROTTLED` with a `RetryInfo`; capped at
/// [`MAX_THROTTLE_WAIT`]), or `None` when the call was not throttled.
pub(crate) fn throttled(status: &Status) -> Option<Duration> {
    let info = status.get_details_error_info()?;
    if info.reason != THROTTLED_REASON {
        return None;
    }
    let after = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or(INITIAL_BACKOFF);
    Some(after.clamp(Duration::from_millis(1), MAX_THROTTLE_WAIT))
}

/// Whether a status was made up locally by tonic from a connection-level failure rather than
/// sent by a server: such statuses carry the underlying error as their source.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    let local_code = matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Cancelled
    );
    local_code
        && (std::error::Error::source(status).is_some()
            || status.message().starts_with("Service was not ready")
            || status.message().starts_with("h2 protocol error"))
}

/// Turns `host:port` or `http://host:port` into the `http://host:port` form channels use.
pub(crate) fn normalize_address(addr: &str) -> Result<String, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = addr.trim();
    let rest = match trimmed.split_once("://") {
        // TLS is a client option (`ClientOptions::tls`), not a property of one address.
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            rest
        }
        Some(_) => return Err(invalid("only http:// and https:// addresses are supported")),
        None => trimmed,
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(invalid("empty address"));
    }
    if rest.contains('/') || rest.chars().any(char::is_whitespace) {
        return Err(invalid("expected host:port"));
    }
    let normalized = format!("http://{rest}");
    match normalized.parse::<tonic::transport::Uri>() {
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) && uri.port_u16().is_some() => {
            Ok(normalized)
        }
        Ok(_) => Err(invalid("expected host:port")),
        Err(err) => Err(invalid(&err.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, vec![50, 100, 200, 250, 250, 250, 250, 250]);
    }

    #[test]
    fn backoff_initial_above_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(
            normalize_address("127.0.0.1:7701").unwrap(),
            "http://127.0.0.1:7701"
        );
        assert_eq!(
            normalize_address(" http://node1:7701/ ").unwrap(),
            "http://node1:7701"
        );
        assert_eq!(
            normalize_address("HTTP://node1:7701").unwrap(),
            "http://node1:7701"
        );
        assert_eq!(
            normalize_address("[::1]:7701").unwrap(),
            "http://[::1]:7701"
        );
        // TLS is the client's option; an https:// address names the same node.
        assert_eq!(
            normalize_address("https://node1:7701").unwrap(),
            "http://node1:7701"
        );
    }

    #[test]
    fn bad_addresses_are_rejected() {
        for bad in [
            "",
            "  ",
            "ftp://x:1",
            "grpc://x:1",
            "http://",
            "a b:1",
            "x:1/path",
            "host",
            "host:",
            "host:99999",
        ] {
            let err = normalize_address(bad).unwrap_err();
            assert!(
                matches!(err, ClientError::InvalidAddress { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn unavailable_is_retried_others_are_not() {
        assert_eq!(
            classify(&Status::unavailable("down")),
            Disposition::Retry { leader_hint: None }
        );
        for status in [
            Status::invalid_argument("x"),
            Status::not_found("x"),
            Status::already_exists("x"),
            Status::failed_precondition("x"),
            Status::resource_exhausted("x"),
            Status::unknown("server bug"),
        ] {
            assert_eq!(classify(&status), Disposition::Fail, "{status:?}");
        }
        assert_eq!(
            classify(&Status::unknown("Service was not ready: transport error")),
            Disposition::Retry { leader_hint: None }
        );
    }

    #[test]
    fn a_throttled_call_waits_the_time_it_was_given() {
        let mut details = tonic_types::ErrorDetails::with_error_info(
            THROTTLED_REASON,
            "junction.dev",
            std::collections::HashMap::new(),
        );
        details.set_retry_info(Some(Duration::from_millis(340)));
        let status = Status::with_error_details(Code::ResourceExhausted, "slow down", details);
        assert_eq!(
            classify(&status),
            Disposition::Throttled {
                after: Duration::from_millis(340)
            }
        );
        // Without a RetryInfo, the first backoff step; an absurd wait is capped.
        let bare = Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            tonic_types::ErrorDetails::with_error_info(
                THROTTLED_REASON,
                "junction.dev",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(
            classify(&bare),
            Disposition::Throttled {
                after: INITIAL_BACKOFF
            }
        );
        let mut long = tonic_types::ErrorDetails::with_error_info(
            THROTTLED_REASON,
            "junction.dev",
            std::collections::HashMap::new(),
        );
        long.set_retry_info(Some(Duration::from_secs(3600)));
        let status = Status::with_error_details(Code::ResourceExhausted, "slow down", long);
        assert_eq!(
            classify(&status),
            Disposition::Throttled {
                after: MAX_THROTTLE_WAIT
            }
        );
        // A quota that waiting does not lift is final.
        let full = Status::with_error_details(
            Code::ResourceExhausted,
            "full",
            tonic_types::ErrorDetails::with_error_info(
                "QUOTA_EXCEEDED",
                "junction.dev",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(classify(&full), Disposition::Fail);
    }

    #[test]
    fn a_corrupt_replica_is_retried_other_data_loss_is_not() {
        let corrupt = Status::with_error_details(
            Code::DataLoss,
            "offset 7 is corrupt on node 3",
            tonic_types::ErrorDetails::with_error_info(
                CORRUPT_RECORD_REASON,
                "junction",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(classify(&corrupt), Disposition::Retry { leader_hint: None });
        assert_eq!(classify(&Status::data_loss("gone")), Disposition::Fail);
    }

    #[test]
    fn not_leader_details_give_a_hint() {
        let details = tonic_types::ErrorDetails::with_error_info(
            NOT_LEADER_REASON,
            "junction",
            [(LEADER_ADDR_KEY.to_owned(), "10.0.0.2:7702".to_owned())],
        );
        let status = Status::with_error_details(Code::FailedPrecondition, "not leader", details);
        assert_eq!(
            classify(&status),
            Disposition::Retry {
                leader_hint: Some("http://10.0.0.2:7702".to_owned())
            }
        );

        let details = tonic_types::ErrorDetails::with_error_info(
            NOT_LEADER_REASON,
            "junction",
            std::collections::HashMap::new(),
        );
        let status = Status::with_error_details(Code::FailedPrecondition, "not leader", details);
        assert_eq!(classify(&status), Disposition::Retry { leader_hint: None });
    }
}
