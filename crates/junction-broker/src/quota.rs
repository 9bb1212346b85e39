//! Quota enforcement on this node (the limits and the token bucket are in
//! [`junction_types::quota`]).
//!
//! - **Rates** are enforced where the data is: a produce by the leader of its partition, a
//!   read by the node that serves it. Each node holds one bucket per tenant (and per station
//!   with its own limit) and kind, at the tenant's rate times this node's share of the
//!   tenant's partitions (those it leads over all of them, refreshed every
//!   [`SHARE_REFRESH`]). Unary calls over the rate are refused with the time to wait; streams
//!   (tails, group deliveries) are slowed down instead.
//! - **Stored bytes** are tallied every [`TALLY_PERIOD`] from every partition of the tenant
//!   (asking the node that hosts it), plus what this node accepted that a finished tally may
//!   not have seen: produces still in flight, and those stored since the last finished tally
//!   began (a produce admitted before a tally but stored after it measured its partition is
//!   thus counted; it may be counted twice until the next tally ends, which errs
//!   on the side of the limit). A tenant at or over its limit gets its produces refused;
//!   nothing is deleted. Other nodes' produces since the last tally are not seen, so a tenant
//!   can pass its limit by what the cluster accepts in one period.
//! - **Streams** are counted per node.
//!
//! [`QuotaBook`] makes every decision from the limits, the shares, the tallies and a clock
//! it is given; the broker only feeds it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use junction_types::quota::{QuotaField, RateBucket, Share, TenantQuotas};
use junction_types::{GroupId, MetaState, NodeId};
use parking_lot::Mutex;

use crate::{Broker, BrokerError};

/// How often the shares of partitions led here are recomputed.
pub const SHARE_REFRESH: Duration = Duration::from_millis(500);
/// How often the stored bytes of tenants with a stored-bytes limit are tallied.
pub const TALLY_PERIOD: Duration = Duration::from_secs(2);

/// A tenant, or one of its stations (by name without the tenant).
pub type Scope = (String, Option<String>);

fn scopes(tenant: &str, station: &str) -> [Scope; 2] {
    [
        (tenant.to_string(), None),
        (tenant.to_string(), Some(station.to_string())),
    ]
}

/// The limit of `field` for a scope.
fn limit_of(q: &TenantQuotas, scope: &Scope, field: QuotaField) -> Option<u64> {
    match &scope.1 {
        None => q.tenant.get(field),
        Some(s) => q.stations.get(s).and_then(|l| l.get(field)),
    }
}

/// A refusal, before it becomes a [`BrokerError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over a rate: retry after this many milliseconds.
    Throttled {
        scope: Scope,
        what: QuotaField,
        limit: u64,
        retry_after_ms: u64,
    },
    /// At a limit that waiting does not lift (stored bytes, streams).
    Exceeded {
        scope: Scope,
        what: QuotaField,
        limit: u64,
        used: u64,
    },
}

impl From<Refusal> for BrokerError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Throttled {
                scope: (tenant, station),
                what,
                limit,
                retry_after_ms,
            } => BrokerError::Throttled {
                tenant,
                station,
                what,
                limit,
                retry_after_ms,
            },
            Refusal::Exceeded {
                scope: (tenant, station),
                what,
                limit,
                used,
            } => BrokerError::QuotaExceeded {
                tenant,
                station,
                what,
                limit,
                used,
            },
        }
    }
}

/// Every quota decision of one node. Pure apart from its own state: the caller passes the
/// limits, this node's shares and the time.
#[derive(Debug, Default)]
pub struct QuotaBook {
    buckets: HashMap<(Scope, QuotaField), RateBucket>,
    /// Stored bytes at the last tally.
    stored: HashMap<Scope, u64>,
    /// Bytes of produces admitted here and not yet stored (or failed).
    in_flight: HashMap<Scope, u64>,
    /// Bytes of produces that completed since the running (or last) tally began.
    settled: HashMap<Scope, u64>,
    /// Bytes of produces that completed before the running tally began but perhaps after it
    /// measured their partition: counted until that tally ends.
    measuring: HashMap<Scope, u64>,
    /// Open streams per tenant on this node.
    streams: HashMap<String, u64>,
}

impl QuotaBook {
    /// Checks a produce of `messages` messages and `bytes` bytes to `tenant/station` against
    /// every limit that applies, and charges it only if all of them admit it.
    pub fn admit_produce(
        &mut self,
        q: &TenantQuotas,
        tenant: &str,
        station: &str,
        share: impl Fn(&Scope) -> Share,
        now_ms: i64,
        (messages, bytes): (u64, u64),
    ) -> Result<Charge, Refusal> {
        let scopes = scopes(tenant, station);
        for scope in &scopes {
            if let Some(limit) = limit_of(q, scope, QuotaField::StoredBytes) {
                let used = self.stored_bytes(scope);
                if used >= limit {
                    return Err(Refusal::Exceeded {
                        scope: scope.clone(),
                        what: QuotaField::StoredBytes,
                        limit,
                        used,
                    });
                }
            }
        }
        let rates = [
            (QuotaField::ProduceBytesPerSec, bytes),
            (QuotaField::ProduceMessagesPerSec, messages),
        ];
        self.take_rates(q, &scopes, &share, now_ms, &rates)?;
        let limited: Vec<Scope> = scopes
            .into_iter()
            .filter(|s| limit_of(q, s, QuotaField::StoredBytes).is_some())
            .collect();
        for scope in &limited {
            *self.in_flight.entry(scope.clone()).or_default() += bytes;
        }
        Ok(Charge {
            scopes: limited,
            bytes,
        })
    }

    /// The stored bytes of `scope` as this node knows them: the last tally plus what it
    /// accepted that the tally may not have counted.
    pub fn stored_bytes(&self, scope: &Scope) -> u64 {
        [
            &self.stored,
            &self.in_flight,
            &self.settled,
            &self.measuring,
        ]
        .iter()
        .map(|m| m.get(scope).copied().unwrap_or(0))
        .fold(0u64, u64::saturating_add)
    }

    /// Records that an admitted produce completed (stored, failed, or its outcome no longer
    /// awaited): its bytes count until a tally that begins after now has ended.
    pub fn settle(&mut self, charge: &Charge) {
        for scope in &charge.scopes {
            if let Some(n) = self.in_flight.get_mut(scope) {
                *n = n.saturating_sub(charge.bytes);
                if *n == 0 {
                    self.in_flight.remove(scope);
                }
            }
            *self.settled.entry(scope.clone()).or_default() += charge.bytes;
        }
    }

    /// Whether a read of `tenant/station` may go now (`Err` with the wait while over the
    /// consume rate).
    pub fn check_consume(
        &mut self,
        q: &TenantQuotas,
        tenant: &str,
        station: &str,
        share: impl Fn(&Scope) -> Share,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        self.take_rates(
            q,
            &scopes(tenant, station),
            &share,
            now_ms,
            &[(QuotaField::ConsumeBytesPerSec, 0)],
        )
    }

    /// Charges bytes read (after the read: its size is only known then).
    pub fn charge_consume(&mut self, q: &TenantQuotas, tenant: &str, station: &str, bytes: u64) {
        for scope in scopes(tenant, station) {
            if limit_of(q, &scope, QuotaField::ConsumeBytesPerSec).is_some()
                && let Some(b) = self
                    .buckets
                    .get_mut(&(scope, QuotaField::ConsumeBytesPerSec))
            {
                b.take(bytes);
            }
        }
    }

    /// Checks every rate bucket first, then takes from all of them: a refusal by one charges
    /// none.
    fn take_rates(
        &mut self,
        q: &TenantQuotas,
        scopes: &[Scope],
        share: &impl Fn(&Scope) -> Share,
        now_ms: i64,
        amounts: &[(QuotaField, u64)],
    ) -> Result<(), Refusal> {
        let mut charged = Vec::new();
        for scope in scopes {
            for (field, amount) in amounts {
                let Some(limit) = limit_of(q, scope, *field) else {
                    continue;
                };
                let rate = share(scope).of(limit);
                let bucket = self
                    .buckets
                    .entry((scope.clone(), *field))
                    .or_insert_with(|| RateBucket::new(rate, now_ms));
                bucket.set_rate(rate, now_ms);
                if let Err(retry_after_ms) = bucket.check(now_ms) {
                    return Err(Refusal::Throttled {
                        scope: scope.clone(),
                        what: *field,
                        limit,
                        retry_after_ms,
                    });
                }
                charged.push(((scope.clone(), *field), *amount));
            }
        }
        for (key, amount) in charged {
            if let Some(b) = self.buckets.get_mut(&key) {
                b.take(amount);
            }
        }
        Ok(())
    }

    /// Counts one more open stream of `tenant`, unless it holds its limit.
    pub fn open_stream(&mut self, q: &TenantQuotas, tenant: &str) -> Result<(), Refusal> {
        let open = self.streams.entry(tenant.to_string()).or_default();
        if let Some(limit) = q.tenant.get(QuotaField::Streams)
            && *open >= limit
        {
            return Err(Refusal::Exceeded {
                scope: (tenant.to_string(), None),
                what: QuotaField::Streams,
                limit,
                used: *open,
            });
        }
        *open += 1;
        Ok(())
    }

    pub fn close_stream(&mut self, tenant: &str) {
        if let Some(open) = self.streams.get_mut(tenant) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.streams.remove(tenant);
            }
        }
    }

    /// Open streams of a tenant on this node.
    pub fn streams_of(&self, tenant: &str) -> u64 {
        self.streams.get(tenant).copied().unwrap_or(0)
    }

    /// Starts a tally: what completed until now is counted until this tally ends (it will
    /// have been measured by then). Returns the scopes to measure.
    pub fn begin_tally(&mut self, quotas: &BTreeMap<String, TenantQuotas>) -> Vec<Scope> {
        for (scope, n) in self.settled.drain() {
            *self.measuring.entry(scope).or_default() += n;
        }
        let mut out = Vec::new();
        for (tenant, q) in quotas {
            if q.tenant.get(QuotaField::StoredBytes).is_some() {
                out.push((tenant.clone(), None));
            }
            for (station, l) in &q.stations {
                if l.get(QuotaField::StoredBytes).is_some() {
                    out.push((tenant.clone(), Some(station.clone())));
                }
            }
        }
        out
    }

    /// Records a tally's result; scopes no longer limited are forgotten.
    pub fn end_tally(&mut self, measured: HashMap<Scope, u64>) {
        self.stored = measured;
        self.measuring.clear();
    }

    /// Forgets buckets of scopes that no longer have a rate limit.
    pub fn retain_limited(&mut self, quotas: &BTreeMap<String, TenantQuotas>) {
        self.buckets.retain(|(scope, field), _| {
            quotas
                .get(&scope.0)
                .is_some_and(|q| limit_of(q, scope, *field).is_some())
        });
    }
}

/// The stored-bytes scopes a produce was charged to, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    scopes: Vec<Scope>,
    bytes: u64,
}

/// An admitted produce's charge to its tenant's stored bytes; hold it until the produce
/// completes (dropping it settles the charge).
pub struct ProduceCharge {
    broker: std::sync::Weak<Broker>,
    charge: Charge,
}

impl Drop for ProduceCharge {
    fn drop(&mut self) {
        if self.charge.scopes.is_empty() {
            return;
        }
        if let Some(b) = self.broker.upgrade() {
            b.quotas.book.lock().settle(&self.charge);
        }
    }
}

/// Holds one open stream of a tenant; dropping it closes the stream's count.
pub struct StreamPermit {
    broker: std::sync::Weak<Broker>,
    tenant: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some(b) = self.broker.upgrade() {
            b.quotas.book.lock().close_stream(&self.tenant);
        }
    }
}

/// The node's quota state: the book, and the shares it is fed.
#[derive(Default)]
pub struct NodeQuotas {
    pub(crate) book: Mutex<QuotaBook>,
    shares: parking_lot::RwLock<HashMap<Scope, Share>>,
}

/// The stations a scope covers: all of its tenant's, or the one it names.
fn stations_in<'a>(
    meta: &'a MetaState,
    scope: &'a Scope,
) -> impl Iterator<Item = &'a junction_types::StationMeta> + 'a {
    meta.stations_of_tenant(&scope.0)
        .filter(move |s| scope.1.as_ref().is_none_or(|name| *name == s.name))
}

/// The partitions of a scope and how many of them `me` leads according to `leader_of`.
fn share_in(
    meta: &MetaState,
    scope: &Scope,
    me: NodeId,
    leader_of: &impl Fn(GroupId) -> Option<NodeId>,
) -> Share {
    let mut share = Share { led: 0, total: 0 };
    for s in stations_in(meta, scope) {
        for p in &s.partitions {
            share.total += 1;
            if leader_of(p.group_id) == Some(me) {
                share.led += 1;
            }
        }
    }
    share
}

fn now_ms() -> i64 {
    crate::partition::now_ms()
}

impl Broker {
    /// The share of `scope` led here: cached, computed on a miss.
    fn share(&self, meta: &MetaState, scope: &Scope) -> Share {
        if let Some(s) = self.quotas.shares.read().get(scope) {
            return *s;
        }
        let s = share_in(meta, scope, self.node_id(), &|g| {
            self.partition(g).and_then(|r| r.leader())
        });
        self.quotas.shares.write().insert(scope.clone(), s);
        s
    }

    /// Admits a produce to a partition of `station` that this node leads, or refuses it
    /// with the quota it would pass. Hold the charge until the produce completes.
    pub fn admit_produce(
        self: &std::sync::Arc<Self>,
        station: &junction_types::StationMeta,
        messages: u64,
        bytes: u64,
    ) -> Result<ProduceCharge, BrokerError> {
        let meta = self.metadata();
        let charge = match meta.quotas.get(&station.tenant) {
            None => Charge {
                scopes: Vec::new(),
                bytes,
            },
            Some(q) => self
                .quotas
                .book
                .lock()
                .admit_produce(
                    q,
                    &station.tenant,
                    &station.name,
                    |s| self.share(&meta, s),
                    now_ms(),
                    (messages, bytes),
                )
                .map_err(|e| refused(&station.tenant, e))?,
        };
        Ok(ProduceCharge {
            broker: std::sync::Arc::downgrade(self),
            charge,
        })
    }

    /// Whether a read of `tenant/station` may go now; `Err` names the wait.
    pub fn check_consume(&self, tenant: &str, station: &str) -> Result<(), BrokerError> {
        let meta = self.metadata();
        let Some(q) = meta.quotas.get(tenant) else {
            return Ok(());
        };
        let r = self.quotas.book.lock().check_consume(
            q,
            tenant,
            station,
            |s| self.share(&meta, s),
            now_ms(),
        );
        r.map_err(|e| refused(tenant, e))
    }

    /// Charges bytes read from `tenant/station` to its consume rate.
    pub fn charge_consume(&self, tenant: &str, station: &str, bytes: u64) {
        let meta = self.metadata();
        if let Some(q) = meta.quotas.get(tenant) {
            self.quotas
                .book
                .lock()
                .charge_consume(q, tenant, station, bytes);
        }
    }

    /// Opens one stream of `tenant` on this node, unless it holds its limit of streams.
    pub fn open_stream(
        self: &std::sync::Arc<Self>,
        tenant: &str,
    ) -> Result<StreamPermit, BrokerError> {
        let meta = self.metadata();
        let q = meta.quotas_of(tenant);
        self.quotas
            .book
            .lock()
            .open_stream(&q, tenant)
            .map_err(|e| refused(tenant, e))?;
        Ok(StreamPermit {
            broker: std::sync::Arc::downgrade(self),
            tenant: tenant.to_string(),
        })
    }

    /// Open streams of a tenant on this node.
    pub fn open_streams(&self, tenant: &str) -> u64 {
        self.quotas.book.lock().streams_of(tenant)
    }

    /// Refreshes the shares and tallies stored bytes, until shutdown.
    pub(crate) async fn quota_loop(self: std::sync::Arc<Self>) {
        let mut last_tally: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(SHARE_REFRESH) => {}
            }
            let meta = self.metadata();
            if meta.quotas.is_empty() {
                self.quotas.shares.write().clear();
                continue;
            }
            let me = self.node_id();
            let leader_of = |g| self.partition(g).and_then(|r| r.leader());
            let mut shares = HashMap::new();
            for (tenant, q) in &meta.quotas {
                let mut scope_list = vec![(tenant.clone(), None)];
                scope_list.extend(q.stations.keys().map(|s| (tenant.clone(), Some(s.clone()))));
                for scope in scope_list {
                    let s = share_in(&meta, &scope, me, &leader_of);
                    shares.insert(scope, s);
                }
            }
            *self.quotas.shares.write() = shares;
            self.quotas.book.lock().retain_limited(&meta.quotas);
            if last_tally.is_none_or(|t| t.elapsed() >= TALLY_PERIOD) {
                last_tally = Some(tokio::time::Instant::now());
                self.tally_stored(&meta).await;
            }
        }
    }

    /// Measures the stored bytes of every scope with a stored-bytes limit.
    async fn tally_stored(&self, meta: &MetaState) {
        let scope_list = self.quotas.book.lock().begin_tally(&meta.quotas);
        if scope_list.is_empty() {
            self.quotas.book.lock().end_tally(HashMap::new());
            return;
        }
        let mut groups: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::new();
        for s in meta.stations.values() {
            if scope_list.iter().any(|(t, _)| *t == s.tenant) {
                for p in &s.partitions {
                    groups.insert(p.group_id, p.replicas.clone());
                }
            }
        }
        let bytes = self.measure_groups(&groups).await;
        let mut measured: HashMap<Scope, u64> = HashMap::new();
        for scope in scope_list {
            let total = stations_in(meta, &scope)
                .flat_map(|s| &s.partitions)
                .filter_map(|p| bytes.get(&p.group_id))
                .sum();
            measured.insert(scope, total);
        }
        self.quotas.book.lock().end_tally(measured);
    }
}

/// Turns a refusal into the broker's error, counting it by tenant and quota.
fn refused(tenant: &str, r: Refusal) -> BrokerError {
    let what = match &r {
        Refusal::Throttled { what, .. } | Refusal::Exceeded { what, .. } => *what,
    };
    metrics::counter!(
        "junction_quota_refusals_total",
        "tenant" => tenant.to_string(),
        "quota" => what.as_str()
    )
    .increment(1);
    r.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_types::quota::{QuotaChange, QuotaLimits};

    fn quotas(set: &[(QuotaField, u64)], station: &[(QuotaField, u64)]) -> TenantQuotas {
        let mut q = TenantQuotas::default();
        if !set.is_empty() {
            q.apply(&QuotaChange {
                station: None,
                set: set.to_vec(),
                clear: vec![],
            });
        }
        if !station.is_empty() {
            q.stations
                .insert("s".into(), QuotaLimits(station.iter().copied().collect()));
        }
        q
    }

    fn third(_: &Scope) -> Share {
        Share { led: 1, total: 3 }
    }

    #[test]
    fn a_produce_is_refused_with_a_wait_once_the_share_of_the_rate_is_used() {
        let q = quotas(&[(QuotaField::ProduceBytesPerSec, 3000)], &[]);
        let mut b = QuotaBook::default();
        // This node's third: 1000 bytes per second, one second of burst.
        assert_eq!(
            b.admit_produce(&q, "t", "s", third, 0, (1, 1000)).map(drop),
            Ok(())
        );
        let Err(Refusal::Throttled {
            what,
            limit,
            retry_after_ms,
            ..
        }) = b.admit_produce(&q, "t", "s", third, 0, (1, 10)).map(drop)
        else {
            panic!("not throttled")
        };
        assert_eq!((what, limit), (QuotaField::ProduceBytesPerSec, 3000));
        assert!((1..=2).contains(&retry_after_ms), "{retry_after_ms}");
        assert_eq!(
            b.admit_produce(&q, "t", "s", third, 2, (1, 10)).map(drop),
            Ok(()),
            "paid back"
        );
        // Another tenant is not affected.
        assert_eq!(
            b.admit_produce(&q, "u", "s", third, 2, (1, 1_000_000))
                .map(drop),
            Ok(())
        );
    }

    #[test]
    fn a_station_limit_narrows_the_tenant_and_a_refusal_charges_nothing() {
        let q = quotas(
            &[(QuotaField::ProduceMessagesPerSec, 100)],
            &[(QuotaField::ProduceMessagesPerSec, 10)],
        );
        let mut b = QuotaBook::default();
        let whole = |_: &Scope| Share::WHOLE;
        assert_eq!(
            b.admit_produce(&q, "t", "s", whole, 0, (10, 1)).map(drop),
            Ok(())
        );
        let r = b.admit_produce(&q, "t", "s", whole, 0, (10, 1)).map(drop);
        assert!(
            matches!(&r, Err(Refusal::Throttled { scope, limit: 10, .. }) if scope.1.as_deref() == Some("s")),
            "{r:?}"
        );
        // Other stations of the tenant still have the tenant's 90 left, not 80.
        assert_eq!(
            b.admit_produce(&q, "t", "x", whole, 0, (90, 1)).map(drop),
            Ok(())
        );
        assert!(
            b.admit_produce(&q, "t", "x", whole, 0, (1, 1))
                .map(drop)
                .is_err()
        );
    }

    #[test]
    fn stored_bytes_refuse_produces_at_the_limit_counting_what_was_accepted() {
        let q = quotas(&[(QuotaField::StoredBytes, 1000)], &[]);
        let mut b = QuotaBook::default();
        let all: BTreeMap<String, TenantQuotas> = [("t".to_string(), q.clone())].into();
        assert_eq!(b.begin_tally(&all), vec![("t".to_string(), None)]);
        b.end_tally([(("t".to_string(), None), 900)].into());
        let whole = |_: &Scope| Share::WHOLE;
        assert_eq!(
            b.admit_produce(&q, "t", "s", whole, 0, (1, 200)).map(drop),
            Ok(())
        );
        assert_eq!(
            b.admit_produce(&q, "t", "s", whole, 0, (1, 1)).map(drop),
            Err(Refusal::Exceeded {
                scope: ("t".to_string(), None),
                what: QuotaField::StoredBytes,
                limit: 1000,
                used: 1100,
            })
        );
        // Retention freed space: the next tally lets produces in again.
        b.begin_tally(&all);
        b.end_tally([(("t".to_string(), None), 100)].into());
        assert_eq!(
            b.admit_produce(&q, "t", "s", whole, 0, (1, 1)).map(drop),
            Ok(())
        );
    }

    #[test]
    fn a_produce_stored_after_a_tally_measured_counts_until_a_later_tally_ends() {
        let q = quotas(&[(QuotaField::StoredBytes, 600)], &[]);
        let mut b = QuotaBook::default();
        let all: BTreeMap<String, TenantQuotas> = [("t".to_string(), q.clone())].into();
        let t: Scope = ("t".to_string(), None);
        let whole = |_: &Scope| Share::WHOLE;
        let charge = b
            .admit_produce(&q, "t", "s", whole, 0, (1, 600))
            .expect("admitted");
        // A tally begins and measures the partition before the produce is stored.
        b.begin_tally(&all);
        b.end_tally([(t.clone(), 0)].into());
        assert_eq!(b.stored_bytes(&t), 600, "in flight, still counted");
        // Stored; the next tally begins, and may measure before or after it was: either way
        // the bytes count until that tally ends.
        b.settle(&charge);
        assert_eq!(b.stored_bytes(&t), 600);
        b.begin_tally(&all);
        assert_eq!(
            b.stored_bytes(&t),
            600,
            "the running tally may have missed it"
        );
        assert!(
            b.admit_produce(&q, "t", "s", whole, 0, (1, 1)).is_err(),
            "at the limit"
        );
        b.end_tally([(t.clone(), 600)].into());
        assert_eq!(
            b.stored_bytes(&t),
            600,
            "counted once by the tally, not twice"
        );
    }

    /// Produces admitted, stored and tallied in random interleavings: the book never counts
    /// less than what is stored plus what is in flight, and once everything is stored and a
    /// whole tally has run, it counts exactly what is stored.
    #[test]
    fn seeded_model_the_book_never_counts_less_than_is_stored_or_in_flight() {
        let q = quotas(&[(QuotaField::StoredBytes, u64::MAX)], &[]);
        let all: BTreeMap<String, TenantQuotas> = [("t".to_string(), q.clone())].into();
        let t: Scope = ("t".to_string(), None);
        let whole = |_: &Scope| Share::WHOLE;
        for seed in 0..50u64 {
            let mut rng = junction_testkit::SplitMix(seed);
            let mut b = QuotaBook::default();
            let mut stored = 0u64;
            // Admitted, not yet stored: (charge, stored yet).
            let mut flying: Vec<(Charge, bool)> = Vec::new();
            // A running tally: what it measured, if it measured yet.
            let mut tally: Option<Option<u64>> = None;
            for _ in 0..2_000 {
                match rng.below(6) {
                    0 => {
                        let bytes = 1 + rng.below(100);
                        let c = b
                            .admit_produce(&q, "t", "s", whole, 0, (1, bytes))
                            .expect("no limit is reached");
                        flying.push((c, false));
                    }
                    1 if !flying.is_empty() => {
                        // The partition stores one (the client has not heard yet).
                        let i = rng.below(flying.len() as u64) as usize;
                        if !flying[i].1 {
                            flying[i].1 = true;
                            stored += flying[i].0.bytes;
                        }
                    }
                    2 if !flying.is_empty() => {
                        // One completes: stored, or failed.
                        let i = rng.below(flying.len() as u64) as usize;
                        let (c, was_stored) = flying.swap_remove(i);
                        if !was_stored && rng.below(2) == 0 {
                            stored += c.bytes;
                        }
                        b.settle(&c);
                    }
                    3 if tally.is_none() => {
                        b.begin_tally(&all);
                        tally = Some(None);
                    }
                    4 if tally == Some(None) => tally = Some(Some(stored)),
                    5 if matches!(tally, Some(Some(_))) => {
                        let measured = tally.take().flatten().unwrap_or_default();
                        b.end_tally([(t.clone(), measured)].into());
                    }
                    _ => {}
                }
                let in_flight: u64 = flying.iter().filter(|f| !f.1).map(|f| f.0.bytes).sum();
                assert!(
                    b.stored_bytes(&t) >= stored + in_flight,
                    "seed {seed}: counted {} < stored {stored} + in flight {in_flight}",
                    b.stored_bytes(&t)
                );
            }
            for (c, was_stored) in flying.drain(..) {
                if !was_stored {
                    stored += c.bytes;
                }
                b.settle(&c);
            }
            if tally.take().is_some() {
                b.end_tally([(t.clone(), 0)].into());
            }
            // A whole tally after everything settled counts exactly what is stored.
            b.begin_tally(&all);
            b.end_tally([(t.clone(), stored)].into());
            assert_eq!(b.stored_bytes(&t), stored, "seed {seed}");
        }
    }

    #[test]
    fn reads_wait_once_their_bytes_are_charged() {
        let q = quotas(&[(QuotaField::ConsumeBytesPerSec, 1000)], &[]);
        let mut b = QuotaBook::default();
        let whole = |_: &Scope| Share::WHOLE;
        assert_eq!(b.check_consume(&q, "t", "s", whole, 0), Ok(()));
        b.charge_consume(&q, "t", "s", 1500);
        let r = b.check_consume(&q, "t", "s", whole, 0);
        assert!(
            matches!(
                r,
                Err(Refusal::Throttled {
                    retry_after_ms: 501,
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(b.check_consume(&q, "t", "s", whole, 501), Ok(()));
    }

    #[test]
    fn streams_are_counted_per_tenant() {
        let q = quotas(&[(QuotaField::Streams, 2)], &[]);
        let mut b = QuotaBook::default();
        assert_eq!(b.open_stream(&q, "t"), Ok(()));
        assert_eq!(b.open_stream(&q, "t"), Ok(()));
        assert!(matches!(
            b.open_stream(&q, "t"),
            Err(Refusal::Exceeded {
                used: 2,
                limit: 2,
                ..
            })
        ));
        assert_eq!(b.open_stream(&TenantQuotas::default(), "u"), Ok(()));
        b.close_stream("t");
        assert_eq!(b.streams_of("t"), 1);
        assert_eq!(b.open_stream(&q, "t"), Ok(()));
    }

    #[test]
    fn the_share_counts_the_partitions_led_here() {
        let mut meta = MetaState::default();
        for name in ["a", "b"] {
            meta.apply(&junction_types::MetaCommand::CreateStation {
                tenant: "default".into(),
                name: name.into(),
                placement: vec![vec![1, 2], vec![2, 1]],
                replication_factor: 2,
                max_message_bytes: 1024,
                now_ms: 0,
                policy: Default::default(),
            });
        }
        // Node 1 leads the groups with odd ids.
        let leader = |g: GroupId| Some(if g % 2 == 1 { 1 } else { 2 });
        let tenant = ("default".to_string(), None);
        assert_eq!(
            share_in(&meta, &tenant, 1, &leader),
            Share { led: 2, total: 4 }
        );
        let a = ("default".to_string(), Some("a".to_string()));
        assert_eq!(share_in(&meta, &a, 2, &leader), Share { led: 1, total: 2 });
        let none = ("other".to_string(), None);
        assert_eq!(
            share_in(&meta, &none, 1, &leader),
            Share { led: 0, total: 0 }
        );
    }
}
