//! Consumer groups: administration calls and the [`GroupConsumer`].
//!
//! A [`GroupConsumer`] joins its group, heartbeats, and follows the assignment the cluster
//! gives it: for each assigned partition a worker task opens a `Consume` stream to the
//! partition's leader, hands deliveries to [`GroupConsumer::recv`], and sends acks back in
//! batches. It follows leader changes (NOT_LEADER hints, then every known address) and stops a
//! partition's worker when the partition moves to another member (FENCED, or the next
//! heartbeat). Delivery is at least once: a message may come again (its
//! [`GroupMessage::delivery_count`] grows) when its ack did not reach the leader in time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use junction_proto::v1::consume_request::Request as ConsumeReq;
use junction_proto::v1::groups_client::GroupsClient;
use junction_proto::v1::{
    CloneGroupRequest, ConsumeRequest, CreateGroupRequest, DeleteGroupRequest,
    DescribeGroupRequest, GroupInfo, GroupSettings, HeartbeatRequest, JoinGroupRequest, LagBudget,
    LeaveGroupRequest, ListGroupsRequest, ListParkedRequest, MemberAssignment, Nack, Offsets,
    ParkedKey, ParkedKeyRequest, ResendDeadLettersRequest, ResendDeadLettersResponse,
    SeekGroupRequest, SetIsolationRequest, SetIsolationResponse, StoredMessage, Subscribe,
    seek_group_request, set_isolation_request,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::client::Client;
use crate::error::ClientError;
use crate::retry::{self, Backoff, Disposition};

/// `ErrorInfo.reason` of a subscription whose partition moved to another member.
pub const FENCED_REASON: &str = "FENCED";
/// Messages buffered between the partition workers and [`GroupConsumer::recv`].
const BUFFER: usize = 1024;

/// How a [`GroupConsumer`] joins.
#[derive(Debug, Clone, Default)]
pub struct GroupOptions {
    /// Settings used if the join creates the group (zero fields: server defaults).
    pub settings: GroupSettings,
    /// This member's in-flight limit per partition (0: the group's `max_in_flight`).
    pub max_in_flight: u32,
    /// Member id; a random one when `None`.
    pub member_id: Option<String>,
    /// Shown by `describe` (e.g. host and process id).
    pub client: String,
}

/// A message delivered to a group member.
#[derive(Debug, Clone)]
pub struct GroupMessage {
    pub message: StoredMessage,
    /// 1 on first delivery.
    pub delivery_count: u32,
    /// The assignment epoch it was delivered under (acks for older epochs are dropped).
    pub epoch: u64,
}

impl GroupMessage {
    pub fn partition(&self) -> u32 {
        self.message.partition
    }
    pub fn offset(&self) -> u64 {
        self.message.offset
    }
}

/// A member's answer to one delivery: (offset, the delivery's attempt), and a nack's delay.
enum Reply {
    Ack(u64, u32),
    Nack(u64, u32, u64),
    InProgress(u64, u32),
}

struct Worker {
    epoch: u64,
    replies: mpsc::UnboundedSender<Reply>,
    task: JoinHandle<()>,
}

type Workers = Arc<Mutex<HashMap<u32, Worker>>>;

/// A member of a consumer group. Dropping it stops its tasks; [`GroupConsumer::close`] also
/// leaves the group at once (otherwise its partitions move after the session timeout).
pub struct GroupConsumer {
    client: Client,
    station: String,
    group: String,
    member_id: String,
    rx: mpsc::Receiver<GroupMessage>,
    workers: Workers,
    coordinator: JoinHandle<()>,
}

fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("m-{:016x}", h.finish())
}

fn is_fenced(s: &Status) -> bool {
    s.get_details_error_info()
        .is_some_and(|i| i.reason == FENCED_REASON)
}

impl Client {
    pub(crate) fn groups(&self, channel: Channel) -> GroupsClient<crate::client::AuthedChannel> {
        let max = self.inner.options.max_message_size;
        GroupsClient::new(self.authed(channel))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Creates a consumer group with no members.
    pub async fn create_group(
        &self,
        station: &str,
        group: &str,
        settings: GroupSettings,
    ) -> Result<GroupInfo, ClientError> {
        let req = CreateGroupRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            settings: Some(settings),
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.create_group(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Lists the groups of a station (every station's when `station` is empty).
    pub async fn list_groups(&self, station: &str) -> Result<Vec<GroupInfo>, ClientError> {
        let req = ListGroupsRequest {
            station: station.to_owned(),
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.list_groups(req).await }
            })
            .await?;
        Ok(r.into_inner().groups)
    }

    /// Settings, members, assignment and per-partition positions and lag.
    pub async fn describe_group(
        &self,
        station: &str,
        group: &str,
    ) -> Result<GroupInfo, ClientError> {
        let req = DescribeGroupRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            only_partitions: vec![],
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.describe_group(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Moves a group (one partition, or all) to `target` while it runs.
    pub async fn seek_group(
        &self,
        station: &str,
        group: &str,
        partition: Option<u32>,
        target: seek_group_request::Target,
    ) -> Result<(), ClientError> {
        let req = SeekGroupRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            partition,
            target: Some(target),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.groups(ch);
            async move { c.seek_group(req).await }
        })
        .await?;
        Ok(())
    }

    /// Creates `to` with `from`'s settings and positions.
    pub async fn clone_group(
        &self,
        station: &str,
        from: &str,
        to: &str,
    ) -> Result<GroupInfo, ClientError> {
        let req = CloneGroupRequest {
            station: station.to_owned(),
            from_group: from.to_owned(),
            to_group: to.to_owned(),
            partition: None,
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.clone_group(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The parked keys of a group (one partition, or all), each with its head message.
    pub async fn list_parked(
        &self,
        station: &str,
        group: &str,
        partition: Option<u32>,
    ) -> Result<Vec<ParkedKey>, ClientError> {
        let req = ListParkedRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            partition,
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.list_parked(req).await }
            })
            .await?;
        Ok(r.into_inner().keys)
    }

    /// Delivers a parked key's head again (`key: None`: every parked key of the partition);
    /// returns how many keys were resumed.
    pub async fn resume_parked(
        &self,
        station: &str,
        group: &str,
        partition: u32,
        key: Option<&[u8]>,
    ) -> Result<u32, ClientError> {
        let req = ParkedKeyRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            partition,
            key: key.map(<[u8]>::to_vec).unwrap_or_default(),
            all: key.is_none(),
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.resume_parked(req).await }
            })
            .await?;
        Ok(r.into_inner().keys)
    }

    /// Moves a parked key's head to the dead-letter station; the key goes on.
    pub async fn skip_parked(
        &self,
        station: &str,
        group: &str,
        partition: u32,
        key: &[u8],
    ) -> Result<(), ClientError> {
        let req = ParkedKeyRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            partition,
            key: key.to_vec(),
            all: false,
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.groups(ch);
            async move { c.skip_parked(req).await }
        })
        .await?;
        Ok(())
    }

    /// Sets a group's isolation budget (one partition, or every one): past it, the group is
    /// detached and no longer holds back `ack` retention. Returns each partition's state.
    pub async fn set_group_budget(
        &self,
        station: &str,
        group: &str,
        partition: Option<u32>,
        budget: LagBudget,
    ) -> Result<Vec<(u32, SetIsolationResponse)>, ClientError> {
        self.set_isolation(
            station,
            group,
            partition,
            set_isolation_request::Change::Budget(budget),
        )
        .await
    }

    /// Attaches a detached group again (one partition, or every one): it holds back `ack`
    /// retention from its position once more. Returns each partition's state.
    pub async fn reattach_group(
        &self,
        station: &str,
        group: &str,
        partition: Option<u32>,
    ) -> Result<Vec<(u32, SetIsolationResponse)>, ClientError> {
        self.set_isolation(
            station,
            group,
            partition,
            set_isolation_request::Change::Reattach(true),
        )
        .await
    }

    async fn set_isolation(
        &self,
        station: &str,
        group: &str,
        partition: Option<u32>,
        change: set_isolation_request::Change,
    ) -> Result<Vec<(u32, SetIsolationResponse)>, ClientError> {
        let partitions: Vec<u32> = match partition {
            Some(p) => vec![p],
            None => (0..self.describe_station(station).await?.partitions).collect(),
        };
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            let req = SetIsolationRequest {
                station: station.to_owned(),
                group: group.to_owned(),
                partition: p,
                change: Some(change),
            };
            let r = self
                .with_retry(|ch| {
                    let req = req.clone();
                    let mut c = self.groups(ch);
                    async move { c.set_isolation(req).await }
                })
                .await?;
            out.push((p, r.into_inner()));
        }
        Ok(out)
    }

    /// Deletes a group.
    pub async fn delete_group(&self, station: &str, group: &str) -> Result<(), ClientError> {
        let req = DeleteGroupRequest {
            station: station.to_owned(),
            group: group.to_owned(),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.groups(ch);
            async move { c.delete_group(req).await }
        })
        .await?;
        Ok(())
    }

    /// Appends dead letters of `station` (optionally only `group`'s, from dead-letter offset
    /// `from`) back to `station`.
    pub async fn resend_dead_letters(
        &self,
        station: &str,
        group: &str,
        from: u64,
        to: u64,
    ) -> Result<ResendDeadLettersResponse, ClientError> {
        let req = ResendDeadLettersRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            from_offset: from,
            to_offset: to,
        };
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.resend_dead_letters(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    async fn join(&self, req: &JoinGroupRequest) -> Result<MemberAssignment, ClientError> {
        let r = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.groups(ch);
                async move { c.join_group(req).await }
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Joins a consumer group and starts consuming (needs a Tokio runtime). Returns once the
    /// join succeeded.
    pub async fn group_consumer(
        &self,
        station: &str,
        group: &str,
        options: GroupOptions,
    ) -> Result<GroupConsumer, ClientError> {
        let member_id = options.member_id.clone().unwrap_or_else(random_id);
        let join = JoinGroupRequest {
            station: station.to_owned(),
            group: group.to_owned(),
            member_id: member_id.clone(),
            client: options.client.clone(),
            settings: Some(options.settings),
        };
        let first = self.join(&join).await?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let workers: Workers = Arc::default();
        let ctx = Coordinator {
            client: self.clone(),
            join,
            max_in_flight: options.max_in_flight,
            workers: workers.clone(),
            tx,
        };
        let coordinator = tokio::spawn(ctx.run(first));
        Ok(GroupConsumer {
            client: self.clone(),
            station: station.to_owned(),
            group: group.to_owned(),
            member_id,
            rx,
            workers,
            coordinator,
        })
    }
}

impl GroupConsumer {
    /// The next delivered message; `None` once the consumer stopped.
    pub async fn recv(&mut self) -> Option<GroupMessage> {
        self.rx.recv().await
    }

    /// The member id.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Partitions this member currently consumes.
    pub fn partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Worker>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reply(&self, m: &GroupMessage, r: Reply) -> bool {
        match self.lock().get(&m.partition()) {
            Some(w) if w.epoch == m.epoch => w.replies.send(r).is_ok(),
            _ => false,
        }
    }

    /// Acknowledges a message. Returns false when this member no longer owns its partition
    /// (the message will be delivered to the new owner).
    pub fn ack(&self, m: &GroupMessage) -> bool {
        self.reply(m, Reply::Ack(m.offset(), m.delivery_count))
    }

    /// A handle that acknowledges this member's messages from other tasks.
    pub fn acker(&self) -> Acker {
        Acker {
            workers: self.workers.clone(),
        }
    }

    /// Asks for redelivery after `delay`.
    pub fn nack(&self, m: &GroupMessage, delay: Duration) -> bool {
        self.reply(
            m,
            Reply::Nack(m.offset(), m.delivery_count, delay.as_millis() as u64),
        )
    }

    /// Extends the ack deadline of a message still being worked on.
    pub fn in_progress(&self, m: &GroupMessage) -> bool {
        self.reply(m, Reply::InProgress(m.offset(), m.delivery_count))
    }

    /// Handles messages with up to `concurrency` handlers running at once, until the
    /// consumer stops: a message is acked when its handler returns `Ok`, and nacked (delivered
    /// again after `retry_delay`) when it returns `Err`. The cluster gives a member a key's next
    /// message only once the previous one is finished (with the group's
    /// `max_in_flight_per_key` of 1), so two handlers never work on one key at once: a
    /// key-shared group's members each run a pool, and every key keeps its order.
    pub async fn process<F, Fut, E>(
        &mut self,
        concurrency: usize,
        retry_delay: Duration,
        handler: F,
    ) where
        F: Fn(GroupMessage) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let acker = self.acker();
        let mut running = tokio::task::JoinSet::new();
        let mut open = true;
        loop {
            let room = running.len() < concurrency.max(1);
            tokio::select! {
                m = self.rx.recv(), if open && room => match m {
                    Some(m) => {
                        let work = handler(m.clone());
                        running.spawn(async move { (m, work.await) });
                    }
                    None => open = false,
                },
                Some(done) = running.join_next(), if !running.is_empty() => match done {
                    Ok((m, Ok(()))) => {
                        acker.ack(&m);
                    }
                    Ok((m, Err(e))) => {
                        tracing::debug!(offset = m.offset(), error = %e, "handler failed; nacked");
                        acker.nack(&m, retry_delay);
                    }
                    // A handler that panicked: its message is redelivered after ack_wait.
                    Err(e) => tracing::warn!(error = %e, "a message handler panicked"),
                },
                else => return,
            }
        }
    }

    /// Stops consuming and leaves the group, so its partitions move at once.
    pub async fn close(self) -> Result<(), ClientError> {
        self.stop();
        let req = LeaveGroupRequest {
            station: self.station.clone(),
            group: self.group.clone(),
            member_id: self.member_id.clone(),
        };
        self.client
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.client.groups(ch);
                async move { c.leave_group(req).await }
            })
            .await?;
        Ok(())
    }

    fn stop(&self) {
        self.coordinator.abort();
        for (_, w) in self.lock().drain() {
            w.task.abort();
        }
    }
}

/// Acknowledges a [`GroupConsumer`]'s messages from any task (see [`GroupConsumer::acker`]).
#[derive(Clone)]
pub struct Acker {
    workers: Workers,
}

impl Acker {
    fn reply(&self, m: &GroupMessage, r: Reply) -> bool {
        let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        match workers.get(&m.partition()) {
            Some(w) if w.epoch == m.epoch => w.replies.send(r).is_ok(),
            _ => false,
        }
    }

    /// Like [`GroupConsumer::ack`].
    pub fn ack(&self, m: &GroupMessage) -> bool {
        self.reply(m, Reply::Ack(m.offset(), m.delivery_count))
    }

    /// Like [`GroupConsumer::nack`].
    pub fn nack(&self, m: &GroupMessage, delay: Duration) -> bool {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.reply(m, Reply::Nack(m.offset(), m.delivery_count, delay_ms))
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Coordinator {
    client: Client,
    join: JoinGroupRequest,
    max_in_flight: u32,
    workers: Workers,
    tx: mpsc::Sender<GroupMessage>,
}

impl Coordinator {
    async fn run(self, first: MemberAssignment) {
        let mut assignment = first;
        loop {
            self.apply(&assignment);
            let interval = Duration::from_millis(assignment.heartbeat_interval_ms.max(100));
            tokio::time::sleep(interval).await;
            if self.tx.is_closed() {
                return;
            }
            let hb = HeartbeatRequest {
                station: self.join.station.clone(),
                group: self.join.group.clone(),
                member_id: self.join.member_id.clone(),
            };
            let r = self
                .client
                .with_retry(|ch| {
                    let hb = hb.clone();
                    let mut c = self.client.groups(ch);
                    async move { c.heartbeat(hb).await }
                })
                .await;
            match r {
                Ok(a) => assignment = a.into_inner(),
                Err(e) if e.code() == Some(Code::NotFound) => {
                    tracing::info!(member = %self.join.member_id, "session expired; joining again");
                    match self.client.join(&self.join).await {
                        Ok(a) => assignment = a,
                        Err(e) => tracing::warn!(error = %e, "rejoin failed"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Starts workers for new (or re-epoched) partitions and stops revoked ones.
    fn apply(&self, a: &MemberAssignment) {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted: HashMap<u32, (u64, String)> = a
            .partitions
            .iter()
            .map(|p| (p.partition, (p.epoch, p.leader_addr.clone())))
            .collect();
        workers.retain(|p, w| {
            let keep = wanted.get(p).is_some_and(|(e, _)| *e == w.epoch) && !w.task.is_finished();
            if !keep {
                w.task.abort();
            }
            keep
        });
        for (p, (epoch, hint)) in wanted {
            if workers.contains_key(&p) {
                continue;
            }
            let (rtx, rrx) = mpsc::unbounded_channel();
            let w = PartitionWorker {
                client: self.client.clone(),
                subscribe: Subscribe {
                    station: self.join.station.clone(),
                    group: self.join.group.clone(),
                    partition: p,
                    member_id: self.join.member_id.clone(),
                    epoch,
                    max_in_flight: self.max_in_flight,
                },
                hint: (!hint.is_empty())
                    .then(|| retry::normalize_address(&hint).ok())
                    .flatten(),
                tx: self.tx.clone(),
            };
            let task = tokio::spawn(w.run(rrx));
            workers.insert(
                p,
                Worker {
                    epoch,
                    replies: rtx,
                    task,
                },
            );
        }
    }
}

struct PartitionWorker {
    client: Client,
    subscribe: Subscribe,
    hint: Option<String>,
    tx: mpsc::Sender<GroupMessage>,
}

impl PartitionWorker {
    async fn run(mut self, mut replies: mpsc::UnboundedReceiver<Reply>) {
        let mut backoff = Backoff::default();
        let mut rotate = 0usize;
        loop {
            let addr = match self.hint.take() {
                Some(a) => a,
                None => {
                    let addrs = self.client.addresses();
                    if addrs.is_empty() {
                        return;
                    }
                    rotate += 1;
                    addrs[rotate % addrs.len()].clone()
                }
            };
            let status = self.session(&addr, &mut replies, &mut backoff).await;
            if is_fenced(&status) || status.code() == Code::NotFound || self.tx.is_closed() {
                tracing::debug!(partition = self.subscribe.partition, %status, "partition worker stops");
                return;
            }
            match retry::classify(&status) {
                Disposition::Retry { leader_hint } => self.hint = leader_hint,
                Disposition::Throttled { after } => {
                    tokio::time::sleep(after).await;
                    continue;
                }
                Disposition::Fail if status.code() == Code::Ok => {}
                Disposition::Fail => {
                    tracing::warn!(partition = self.subscribe.partition, %status, "consume failed");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One `Consume` stream; returns why it ended.
    async fn session(
        &mut self,
        addr: &str,
        replies: &mut mpsc::UnboundedReceiver<Reply>,
        backoff: &mut Backoff,
    ) -> Status {
        let channel = match self.client.inner.channel(addr) {
            Ok(c) => c,
            Err(e) => return Status::unavailable(e.to_string()),
        };
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let _ = req_tx.send(ConsumeRequest {
            request: Some(ConsumeReq::Subscribe(self.subscribe.clone())),
        });
        let mut c = self.client.groups(channel);
        let mut stream = match c
            .consume(tokio_stream::wrappers::UnboundedReceiverStream::new(req_rx))
            .await
        {
            Ok(s) => s.into_inner(),
            Err(s) => return s,
        };
        let epoch = self.subscribe.epoch;
        let mut buf = Vec::new();
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(resp)) => {
                        *backoff = Backoff::default();
                        for d in resp.deliveries {
                            let Some(message) = d.message else { continue };
                            let gm = GroupMessage { message, delivery_count: d.delivery_count, epoch };
                            if self.tx.send(gm).await.is_err() {
                                return Status::cancelled("consumer dropped");
                            }
                        }
                    }
                    Ok(None) => return Status::unavailable("consume stream ended"),
                    Err(s) => return s,
                },
                n = replies.recv_many(&mut buf, 4096) => {
                    if n == 0 {
                        return Status::cancelled("consumer dropped");
                    }
                    let mut acks = Offsets::default();
                    for r in buf.drain(..) {
                        let req = match r {
                            Reply::Ack(o, attempt) => {
                                acks.offsets.push(o);
                                acks.attempts.push(attempt);
                                continue;
                            }
                            Reply::Nack(o, attempt, delay_ms) => ConsumeReq::Nack(Nack {
                                offsets: vec![o],
                                delay_ms,
                                attempts: vec![attempt],
                            }),
                            Reply::InProgress(o, attempt) => ConsumeReq::InProgress(Offsets {
                                offsets: vec![o],
                                attempts: vec![attempt],
                            }),
                        };
                        let _ = req_tx.send(ConsumeRequest { request: Some(req) });
                    }
                    if !acks.offsets.is_empty() {
                        let _ = req_tx.send(ConsumeRequest { request: Some(ConsumeReq::Ack(acks)) });
                    }
                }
            }
        }
    }
}
