//! Pulling members: a member that asks for messages (`fetch`) and answers them (`settle`) in
//! separate calls, with no stream between them — the REST API's consumers, who may fetch on
//! one node and acknowledge on another.
//!
//! The partition leader keeps one subscription per pulling (member, epoch), exactly like a
//! streaming member's, except that the member takes only what it asked for: each fetch grants
//! the engine credit for the messages it wants and withdraws the rest when it returns, so
//! nothing waits at the leader with its ack clock running while nobody asked for it. What
//! arrives after a fetch returned (a race of a few messages at most) is kept for the next
//! fetch, at its latest delivery attempt.
//!
//! A settle names the delivery attempt it answers; the engine refuses a stale one, and the
//! refusal is given back to the caller (the REST API's 409), unlike a stream's, which is only
//! logged. A session whose member was fenced, or that nobody used for [`PULL_IDLE`], is
//! dropped, which detaches the member.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use junction_types::{GroupId, StationName};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{AckRefusal, ConsumeControl, ConsumeEvent, Delivered, Subscription};
use crate::{Broker, BrokerError};

/// A pulling session nobody fetched from or settled on for this long is dropped.
pub const PULL_IDLE: Duration = Duration::from_secs(600);
/// How often fetches look for sessions to drop.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The longest a fetch waits for a first message.
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(30);

type PullKey = (GroupId, String, String, u64);

/// The pulling sessions of the partitions this node leads.
#[derive(Default)]
pub struct PullSessions {
    map: parking_lot::Mutex<HashMap<PullKey, Arc<PullSession>>>,
    /// Serialises making sessions, so two fetches of one member do not subscribe twice.
    making: tokio::sync::Mutex<()>,
    /// When [`PullSessions::sweep`] last looked at every session.
    swept: parking_lot::Mutex<Option<Instant>>,
}

struct PullSession {
    inner: tokio::sync::Mutex<Inner>,
    control: mpsc::UnboundedSender<ConsumeControl>,
    last_used: parking_lot::Mutex<Instant>,
}

struct Inner {
    events: mpsc::UnboundedReceiver<Result<ConsumeEvent, BrokerError>>,
    /// Delivered to the member and not handed to a caller yet, by offset (latest attempt).
    kept: BTreeMap<u64, Delivered>,
}

impl Inner {
    /// Takes what has arrived, without waiting. An error ends the session.
    fn take_arrived(&mut self) -> Result<(), BrokerError> {
        loop {
            match self.events.try_recv() {
                Ok(e) => self.absorb(e)?,
                Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(BrokerError::Unavailable(
                        "the partition's delivery stopped; fetch again".into(),
                    ));
                }
            }
        }
    }

    fn absorb(&mut self, e: Result<ConsumeEvent, BrokerError>) -> Result<(), BrokerError> {
        match e? {
            ConsumeEvent::Deliveries(d) => {
                for d in d {
                    match self.kept.get(&d.offset) {
                        Some(k) if k.delivery_count >= d.delivery_count => {}
                        _ => {
                            self.kept.insert(d.offset, d);
                        }
                    }
                }
            }
            ConsumeEvent::Committed { .. } => {}
        }
        Ok(())
    }

    fn hand_out(&mut self, max: usize) -> Vec<Delivered> {
        let mut out = Vec::with_capacity(max.min(self.kept.len()));
        while out.len() < max {
            match self.kept.pop_first() {
                Some((_, d)) => out.push(d),
                None => break,
            }
        }
        out
    }
}

impl PullSession {
    fn new(s: Subscription) -> Self {
        Self {
            inner: tokio::sync::Mutex::new(Inner {
                events: s.events,
                kept: BTreeMap::new(),
            }),
            control: s.control,
            last_used: parking_lot::Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_used.lock() = Instant::now();
    }

    fn credit(&self, n: u32) -> Result<(), BrokerError> {
        self.control
            .send(ConsumeControl::Credit(Some(n)))
            .map_err(|_| BrokerError::Unavailable("the partition's delivery stopped".into()))
    }
}

/// Takes back a pulling member's credit when dropped.
struct Withdraw<'a>(&'a PullSession);

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        // The dispatcher may be gone already; then there is nothing to take back.
        let _ = self.0.control.send(ConsumeControl::Credit(Some(0)));
    }
}

impl PullSessions {
    fn get(&self, key: &PullKey) -> Option<Arc<PullSession>> {
        self.map.lock().get(key).cloned()
    }

    fn remove(&self, key: &PullKey) {
        self.map.lock().remove(key);
    }

    /// Drops sessions whose delivery ended or that nobody used for [`PULL_IDLE`]; at most once
    /// per [`SWEEP_EVERY`], as it visits every session.
    fn sweep(&self) {
        {
            let mut swept = self.swept.lock();
            if swept.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
                return;
            }
            *swept = Some(Instant::now());
        }
        self.map
            .lock()
            .retain(|_, s| !s.control.is_closed() && s.last_used.lock().elapsed() < PULL_IDLE);
    }

    /// How many sessions this node holds.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which pulling member a call is about.
#[derive(Debug, Clone)]
pub struct PullMember<'a> {
    pub station: &'a StationName,
    pub group: &'a str,
    pub partition: u32,
    pub member: &'a str,
    pub epoch: u64,
}

fn stale(m: &PullMember<'_>) -> BrokerError {
    BrokerError::StaleReceipt(format!(
        "member '{}' of group '{}' holds no deliveries of partition {} at epoch {} on this \
         leader (the leader changed, or the member was replaced): fetch again",
        m.member, m.group, m.partition, m.epoch
    ))
}

impl Broker {
    /// Pulling sessions on this node.
    pub fn pull_sessions(&self) -> &PullSessions {
        &self.pulls
    }

    fn pull_key(&self, m: &PullMember<'_>) -> Result<PullKey, BrokerError> {
        let replica = self.hosted_replica(m.station, m.partition)?;
        self.ensure_partition_leader(&replica)?;
        Ok((
            replica.group,
            m.group.to_owned(),
            m.member.to_owned(),
            m.epoch,
        ))
    }

    /// Hands a pulling member up to `max` deliveries of the partition, waiting up to `wait`
    /// for the first; this node must lead the partition.
    pub async fn pull_fetch(
        self: &Arc<Self>,
        m: &PullMember<'_>,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Delivered>, BrokerError> {
        self.pull(m, max, wait, true).await.map(|(d, _)| d)
    }

    /// Waits up to `wait` until deliveries are ready for a pulling member and says how many
    /// (at most `max`), handing out none: they stay for its next fetch. Dropping this call
    /// loses nothing, which is what a caller that waits on several partitions needs.
    pub async fn pull_peek(
        self: &Arc<Self>,
        m: &PullMember<'_>,
        max: u32,
        wait: Duration,
    ) -> Result<u32, BrokerError> {
        self.pull(m, max, wait, false).await.map(|(_, ready)| ready)
    }

    async fn pull(
        self: &Arc<Self>,
        m: &PullMember<'_>,
        max: u32,
        wait: Duration,
        take: bool,
    ) -> Result<(Vec<Delivered>, u32), BrokerError> {
        if max == 0 {
            return Err(BrokerError::InvalidArgument(
                "ask for at least one message".into(),
            ));
        }
        let key = self.pull_key(m)?;
        self.pulls.sweep();
        let session = match self.pulls.get(&key) {
            Some(s) => s,
            None => {
                let _making = self.pulls.making.lock().await;
                match self.pulls.get(&key) {
                    Some(s) => s,
                    None => {
                        let sub = self
                            .subscribe(m.station, m.group, m.partition, m.member, m.epoch, 0)
                            .await?;
                        let s = Arc::new(PullSession::new(sub));
                        // Nothing goes out until asked for.
                        s.credit(0)?;
                        self.pulls.map.lock().insert(key.clone(), s.clone());
                        s
                    }
                }
            }
        };
        session.touch();
        let mut inner = session.inner.lock().await;
        // Whatever happens, nothing more goes out until the next fetch: also when this call
        // is dropped while it waits (its caller gave up, or a wait on another partition won).
        let guard = Withdraw(&session);
        let result = self
            .fill_pull(&session, &mut inner, max, wait.min(MAX_PULL_WAIT))
            .await;
        drop(guard);
        match result {
            Ok(()) if take => Ok((inner.hand_out(max as usize), 0)),
            Ok(()) => {
                let ready = u32::try_from(inner.kept.len()).unwrap_or(u32::MAX);
                Ok((Vec::new(), ready.min(max)))
            }
            Err(e) => {
                drop(inner);
                self.pulls.remove(&key);
                Err(e)
            }
        }
    }

    async fn fill_pull(
        &self,
        session: &PullSession,
        inner: &mut Inner,
        max: u32,
        wait: Duration,
    ) -> Result<(), BrokerError> {
        inner.take_arrived()?;
        let kept = u32::try_from(inner.kept.len()).unwrap_or(u32::MAX);
        if kept >= max {
            return Ok(());
        }
        session.credit(max - kept)?;
        let deadline = Instant::now() + wait;
        // The dispatcher sends what it has in one batch: the first arrival is most of it.
        if inner.kept.is_empty() {
            match tokio::time::timeout_at(deadline, inner.events.recv()).await {
                Err(_) => return Ok(()),
                Ok(None) => {
                    return Err(BrokerError::Unavailable(
                        "the partition's delivery stopped; fetch again".into(),
                    ));
                }
                Ok(Some(e)) => inner.absorb(e)?,
            }
        }
        // Let the dispatcher finish a batch it is sending.
        tokio::task::yield_now().await;
        inner.take_arrived()
    }

    /// Answers deliveries of a pulling member: one result per offset, in order (a refused
    /// one says why). This node must lead the partition.
    pub async fn pull_settle(
        &self,
        m: &PullMember<'_>,
        control: ConsumeControl,
    ) -> Result<Vec<Result<(), AckRefusal>>, BrokerError> {
        let key = self.pull_key(m)?;
        let Some(session) = self.pulls.get(&key) else {
            return Err(stale(m));
        };
        session.touch();
        let (reply, answer) = oneshot::channel();
        session
            .control
            .send(ConsumeControl::Checked {
                control: Box::new(control),
                reply,
            })
            .map_err(|_| stale(m))?;
        answer.await.map_err(|_| stale(m))
    }
}
