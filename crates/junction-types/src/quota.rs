//! Per-tenant quotas: the limits kept in the metadata group, how a change to them is checked,
//! and the token bucket that decides whether a produce or a read fits a rate.
//!
//! Everything here is pure. The broker supplies the clock and each node's share of a
//! tenant's partitions; the decisions (admit, or refuse with how long to wait) are made here.
//!
//! ## What each limit means
//! - `produce-bytes` / `produce-messages` per second and `consume-bytes` per second: rates,
//!   enforced by the partition leaders. Each leader node gets the tenant's rate times its
//!   share of the tenant's partitions (the partitions it leads over all of them), so the
//!   cluster as a whole admits the tenant's rate when the tenant spreads its traffic over its
//!   partitions. A batch is admitted while the bucket is not in debt and may take it into debt;
//!   the next request then waits until the debt is paid back, so the long-run rate is the
//!   quota whatever the batch sizes, and the burst is one second of the rate.
//! - `stored-bytes`: the message bytes (key, headers, payload; counted once, not per replica)
//!   the tenant's stations may hold. Produces are refused while the tenant is at or over it;
//!   nothing is ever deleted because of it (retention does that).
//! - `stations`, `groups`: how many stations and consumer groups the tenant may have,
//!   enforced by the metadata state machine when one is created.
//! - `streams`: how many long-lived calls (produce streams, tails, group consume sessions) the
//!   tenant may have open **on each node**.
//!
//! A station can carry its own `produce-bytes`, `produce-messages`, `consume-bytes` and
//! `stored-bytes`: they narrow the tenant's limits for that station (the tenant's limit still
//! caps the sum of its stations).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum QuotaField {
    ProduceBytesPerSec,
    ProduceMessagesPerSec,
    ConsumeBytesPerSec,
    StoredBytes,
    Stations,
    Groups,
    Streams,
}

impl QuotaField {
    /// Every field, in display order.
    pub const ALL: [QuotaField; 7] = [
        QuotaField::ProduceBytesPerSec,
        QuotaField::ProduceMessagesPerSec,
        QuotaField::ConsumeBytesPerSec,
        QuotaField::StoredBytes,
        QuotaField::Stations,
        QuotaField::Groups,
        QuotaField::Streams,
    ];

    /// The name used by the CLI, the API and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaField::ProduceBytesPerSec => "produce-bytes-per-sec",
            QuotaField::ProduceMessagesPerSec => "produce-messages-per-sec",
            QuotaField::ConsumeBytesPerSec => "consume-bytes-per-sec",
            QuotaField::StoredBytes => "stored-bytes",
            QuotaField::Stations => "stations",
            QuotaField::Groups => "groups",
            QuotaField::Streams => "streams",
        }
    }

    /// Whether a station may carry this limit (the counts are tenant-wide only).
    pub fn per_station(self) -> bool {
        matches!(
            self,
            QuotaField::ProduceBytesPerSec
                | QuotaField::ProduceMessagesPerSec
                | QuotaField::ConsumeBytesPerSec
                | QuotaField::StoredBytes
        )
    }
}

impl fmt::Display for QuotaField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuotaField {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QuotaField::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| QuotaError::UnknownField(s.to_string()))
    }
}

/// A set of limits; a missing one does not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits(pub BTreeMap<QuotaField, u64>);

impl QuotaLimits {
    pub fn get(&self, field: QuotaField) -> Option<u64> {
        self.0.get(&field).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A tenant's limits and its stations' own limits (by station name, without the tenant).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantQuotas {
    pub tenant: QuotaLimits,
    pub stations: BTreeMap<String, QuotaLimits>,
}

impl TenantQuotas {
    pub fn is_empty(&self) -> bool {
        self.tenant.is_empty() && self.stations.values().all(QuotaLimits::is_empty)
    }

    /// Applies a validated change to the tenant's limits or to one station's.
    pub fn apply(&mut self, change: &QuotaChange) {
        let limits = match &change.station {
            Some(s) => self.stations.entry(s.clone()).or_default(),
            None => &mut self.tenant,
        };
        for f in &change.clear {
            limits.0.remove(f);
        }
        for (f, v) in &change.set {
            limits.0.insert(*f, *v);
        }
        self.stations.retain(|_, l| !l.is_empty());
    }
}

/// A change of limits: fields to set and fields to remove, for the tenant or one station.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaChange {
    /// The station (name without the tenant), or `None` for the tenant's own limits.
    pub station: Option<String>,
    pub set: Vec<(QuotaField, u64)>,
    pub clear: Vec<QuotaField>,
}

/// Why a quota change or name is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    #[error(
        "unknown quota '{0}': use produce-bytes-per-sec, produce-messages-per-sec, consume-bytes-per-sec, stored-bytes, stations, groups or streams"
    )]
    UnknownField(String),
    #[error(
        "a {0} quota of 0 would refuse everything; to remove the limit clear it, to lock a tenant out revoke its credentials"
    )]
    Zero(QuotaField),
    #[error("'{0}' is a tenant-wide limit; a station can only narrow the rates and stored-bytes")]
    NotPerStation(QuotaField),
    #[error("the change names {0} both to set and to clear")]
    SetAndClear(QuotaField),
    #[error("the change sets or clears nothing")]
    Empty,
}

impl QuotaChange {
    /// Checks the change on its own (the metadata state machine checks the tenant and
    /// station exist).
    pub fn validate(&self) -> Result<(), QuotaError> {
        if self.set.is_empty() && self.clear.is_empty() {
            return Err(QuotaError::Empty);
        }
        for (f, v) in &self.set {
            if *v == 0 {
                return Err(QuotaError::Zero(*f));
            }
            if self.clear.contains(f) {
                return Err(QuotaError::SetAndClear(*f));
            }
        }
        if self.station.is_some()
            && let Some(f) = self
                .set
                .iter()
                .map(|(f, _)| *f)
                .chain(self.clear.iter().copied())
                .find(|f| !f.per_station())
        {
            return Err(QuotaError::NotPerStation(f));
        }
        Ok(())
    }
}

/// A node's share of a tenant's (or a station's) partitions: the ones it leads over all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub led: u64,
    pub total: u64,
}

impl Share {
    pub const WHOLE: Share = Share { led: 1, total: 1 };

    /// `rate` scaled to this share, at least 1 while the node leads any partition (a node
    /// asked to take a produce leads the partition, even if its view of the others lags).
    pub fn of(self, rate: u64) -> u64 {
        if self.total == 0 {
            return rate;
        }
        let led = self.led.clamp(1, self.total);
        ((u128::from(rate) * u128::from(led)) / u128::from(self.total)).max(1) as u64
    }
}

/// Milli-units per unit: the bucket counts in thousandths so that a rate of `r` units per
/// second refills exactly `r` milli-units per millisecond.
const MILLI: i128 = 1000;
/// The burst a bucket allows: this many milliseconds of its rate.
pub const BURST_MS: i128 = 1000;

/// A token bucket that may go into debt: a request is admitted while the balance is
/// positive and takes its whole cost, and refused while the balance is in debt, with the
/// time until it is paid back. The long-run rate is `rate` whatever the request sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateBucket {
    /// Units per second.
    rate: u64,
    /// Milli-units; at most `rate × BURST_MS`.
    balance: i128,
    at_ms: i64,
}

impl RateBucket {
    /// A full bucket (one burst available).
    pub fn new(rate: u64, now_ms: i64) -> Self {
        Self {
            rate,
            balance: i128::from(rate) * BURST_MS,
            at_ms: now_ms,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Changes the rate from now on (what was earned at the old rate is kept, up to the new
    /// burst).
    pub fn set_rate(&mut self, rate: u64, now_ms: i64) {
        if rate != self.rate {
            self.refill(now_ms);
            self.rate = rate;
            self.balance = self.balance.min(i128::from(rate) * BURST_MS);
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let dt = i128::from(now_ms.saturating_sub(self.at_ms).max(0));
        let cap = i128::from(self.rate) * BURST_MS;
        self.balance = (self.balance + dt * i128::from(self.rate)).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Whether a request may go now: `Err(wait_ms)` while the bucket is in debt.
    pub fn check(&mut self, now_ms: i64) -> Result<(), u64> {
        self.refill(now_ms);
        if self.balance > 0 {
            return Ok(());
        }
        let rate = i128::from(self.rate.max(1));
        // Milli-units owed, plus one, over milli-units earned per millisecond.
        let wait = (-self.balance + rate) / rate;
        Err(u64::try_from(wait).unwrap_or(u64::MAX).max(1))
    }

    /// Takes `amount` units (after a successful [`RateBucket::check`]).
    pub fn take(&mut self, amount: u64) {
        self.balance -= i128::from(amount) * MILLI;
    }

    /// Check, then take.
    pub fn try_take(&mut self, now_ms: i64, amount: u64) -> Result<(), u64> {
        self.check(now_ms)?;
        self.take(amount);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_round_trip_and_unknown_ones_are_refused() {
        for f in QuotaField::ALL {
            assert_eq!(f.as_str().parse::<QuotaField>(), Ok(f));
        }
        assert!(matches!(
            "bytes".parse::<QuotaField>(),
            Err(QuotaError::UnknownField(_))
        ));
    }

    #[test]
    fn changes_are_validated() {
        let set = |station: Option<&str>, f, v| QuotaChange {
            station: station.map(str::to_string),
            set: vec![(f, v)],
            clear: vec![],
        };
        assert_eq!(
            set(None, QuotaField::Stations, 0).validate(),
            Err(QuotaError::Zero(QuotaField::Stations))
        );
        assert_eq!(set(None, QuotaField::Stations, 3).validate(), Ok(()));
        assert_eq!(
            set(Some("s"), QuotaField::Groups, 3).validate(),
            Err(QuotaError::NotPerStation(QuotaField::Groups))
        );
        assert_eq!(
            set(Some("s"), QuotaField::StoredBytes, 3).validate(),
            Ok(())
        );
        assert_eq!(QuotaChange::default().validate(), Err(QuotaError::Empty));
        let both = QuotaChange {
            station: None,
            set: vec![(QuotaField::Streams, 1)],
            clear: vec![QuotaField::Streams],
        };
        assert_eq!(
            both.validate(),
            Err(QuotaError::SetAndClear(QuotaField::Streams))
        );
    }

    #[test]
    fn applying_sets_clears_and_forgets_empty_stations() {
        let mut q = TenantQuotas::default();
        q.apply(&QuotaChange {
            station: Some("orders".into()),
            set: vec![(QuotaField::StoredBytes, 10)],
            clear: vec![],
        });
        q.apply(&QuotaChange {
            station: None,
            set: vec![(QuotaField::Stations, 2), (QuotaField::Groups, 5)],
            clear: vec![],
        });
        assert_eq!(q.stations["orders"].get(QuotaField::StoredBytes), Some(10));
        assert_eq!(q.tenant.get(QuotaField::Groups), Some(5));
        q.apply(&QuotaChange {
            station: Some("orders".into()),
            set: vec![],
            clear: vec![QuotaField::StoredBytes],
        });
        assert!(q.stations.is_empty());
        q.apply(&QuotaChange {
            station: None,
            set: vec![],
            clear: vec![QuotaField::Stations, QuotaField::Groups],
        });
        assert!(q.is_empty());
    }

    #[test]
    fn shares_scale_rates_and_never_reach_zero() {
        assert_eq!(Share { led: 1, total: 3 }.of(300), 100);
        assert_eq!(Share { led: 3, total: 3 }.of(300), 300);
        assert_eq!(Share { led: 0, total: 3 }.of(300), 100, "a leader has one");
        assert_eq!(
            Share {
                led: 1,
                total: 1000
            }
            .of(10),
            1
        );
        assert_eq!(Share { led: 0, total: 0 }.of(7), 7);
        assert_eq!(Share::WHOLE.of(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_bucket_admits_a_burst_then_refuses_with_the_time_to_wait() {
        let mut b = RateBucket::new(1000, 0);
        // One second of burst, then in debt.
        assert_eq!(b.try_take(0, 600), Ok(()));
        assert_eq!(b.try_take(0, 600), Ok(()));
        // 200 units owed at 1000/s: 200 ms (and a bit) to pay back.
        let wait = b.check(0).unwrap_err();
        assert_eq!(wait, 201);
        assert!(b.check(200).is_err());
        assert_eq!(b.check(201), Ok(()));
        // Time never runs backwards inside the bucket.
        assert_eq!(b.check(100), Ok(()));
    }

    #[test]
    fn lowering_the_rate_caps_the_burst() {
        let mut b = RateBucket::new(1000, 0);
        b.set_rate(10, 0);
        assert_eq!(b.try_take(0, 10), Ok(()));
        assert!(b.check(0).is_err());
        assert_eq!(b.rate(), 10);
    }

    /// Model: a greedy client that sends random sizes and honours the wait it is given. At
    /// every point of the run, what was admitted never exceeds the burst plus the rate times
    /// the elapsed time plus one request; over the run it gets at least the rate (less a
    /// rounding loss of at most a millisecond of rate per wait).
    #[test]
    fn seeded_model_the_long_run_rate_is_the_quota() {
        for seed in 0..200u64 {
            let mut rng = junction_testkit::SplitMix(seed);
            let rate = 1 + rng.below(100_000);
            let max_req = 1 + rng.below(rate * 2);
            let mut b = RateBucket::new(rate, 0);
            let mut admitted: u128 = 0;
            let mut now: i64 = 0;
            let end: i64 = 20_000;
            let mut biggest = 0u64;
            let mut waits = 0u128;
            while now < end {
                let size = 1 + rng.below(max_req);
                match b.try_take(now, size) {
                    Ok(()) => {
                        admitted += u128::from(size);
                        biggest = biggest.max(size);
                    }
                    Err(wait) => {
                        assert!(wait >= 1, "seed {seed}");
                        waits += 1;
                        now += i64::try_from(wait).unwrap_or(i64::MAX / 2);
                    }
                }
                let bound = u128::from(rate) * (u128::try_from(now).unwrap_or(0) + 1000) / 1000
                    + u128::from(biggest);
                assert!(
                    admitted <= bound,
                    "seed {seed}: {admitted} admitted by {now} ms at rate {rate}"
                );
            }
            let floor = (u128::from(rate) * u128::try_from(end).unwrap_or(0) / 1000)
                .saturating_sub(waits * u128::from(rate) / 1000 + u128::from(rate));
            assert!(
                admitted >= floor,
                "seed {seed}: only {admitted} admitted over {end} ms at rate {rate} (floor {floor})"
            );
        }
    }
}
