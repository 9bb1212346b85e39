//! Delivery of one partition to one consumer group, run on the partition's leader.
//!
//! A [`Dispatcher`] task per (partition, group) reads committed messages from the group's
//! cursor onward, hands them to the member that owns the partition (at most `max_in_flight`
//! unacknowledged at once), and:
//! - keeps per-key order: a message is delivered only when it is the oldest unfinished message
//!   of its key, so a key's later messages wait until the earlier one is acked or
//!   dead-lettered (unkeyed messages are independent);
//! - redelivers what is not acked within `ack_wait` (or was nacked, after the nack's delay);
//! - after `max_deliveries`, appends the message with explanatory headers to the dead-letter
//!   station and counts it as done;
//! - replicates acks through the partition's Raft group in batches (one write in flight,
//!   the next batch gathering meanwhile), and tells the member which acks are durable.
//!
//! Nothing but the cursor is replicated: after a leader failover the new leader's dispatcher
//! starts from the replicated cursor. Acks count against the in-flight limit until they are
//! replicated, so what a failover can redeliver is at most `max_in_flight` messages per
//! partition. Delivery counts restart there too.
//!
//! Fencing: a subscription names the partition's assignment epoch. When the metadata moves the
//! partition to another member (a new epoch), the old subscription ends with `Fenced` and its
//! unacked messages go to the new owner.

pub mod engine;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use junction_types::groups::{
    GroupCursor, GroupMeta, GroupSettings, StartFrom, dead_letter_station,
};
use junction_types::{
    Command, CommandResponse, GroupId, PartitionCommand, Record, StationName, StoredRecord,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::partition::PartitionReplica;
use crate::{Broker, BrokerError};

/// A dispatcher with no subscriber for this long stops (its state is only a cache).
const IDLE_STOP: Duration = Duration::from_secs(30);
/// Most messages in one delivery batch.
const DELIVERY_BATCH: usize = 256;
/// Bytes read from storage at once.
const READ_BYTES: usize = 4 << 20;
/// How long a subscription with a newer epoch waits for this node's metadata to catch up.
const EPOCH_WAIT: Duration = Duration::from_secs(3);
/// Retry delay after a failed dead-letter append.
const DLS_RETRY: Duration = Duration::from_secs(1);

/// Header names added to a dead letter.
pub mod dls_headers {
    pub const GROUP: &str = "junction-dls-group";
    pub const REASON: &str = "junction-dls-reason";
    pub const DELIVERIES: &str = "junction-dls-deliveries";
    pub const STATION: &str = "junction-dls-station";
    pub const PARTITION: &str = "junction-dls-partition";
    pub const OFFSET: &str = "junction-dls-offset";
}

/// Appends dead letters. The server implements it (it can route a produce to any station's
/// leader); the broker only decides what to dead-letter.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Appends `record` to `station`; resolves once it is committed.
    fn append(
        &self,
        station: String,
        record: Record,
    ) -> futures::future::BoxFuture<'static, Result<(), BrokerError>>;
}

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub offset: u64,
    pub record: StoredRecord,
    /// 1 on first delivery.
    pub delivery_count: u32,
}

/// What a subscriber receives.
#[derive(Debug)]
pub enum ConsumeEvent {
    Deliveries(Vec<Delivered>),
    /// These acks are replicated; `committed` is the group's contiguous acked prefix.
    Committed {
        acks: Vec<u64>,
        committed: u64,
    },
}

/// What a subscriber sends.
#[derive(Debug)]
pub enum ConsumeControl {
    Ack(Vec<u64>),
    Nack { offsets: Vec<u64>, delay_ms: u64 },
    InProgress(Vec<u64>),
}

/// A member's subscription to one partition.
pub struct Subscription {
    pub events: mpsc::UnboundedReceiver<Result<ConsumeEvent, BrokerError>>,
    pub control: mpsc::UnboundedSender<ConsumeControl>,
}

pub(crate) struct Attach {
    member: String,
    epoch: u64,
    limit: usize,
    events: mpsc::UnboundedSender<Result<ConsumeEvent, BrokerError>>,
    control: mpsc::UnboundedReceiver<ConsumeControl>,
}

struct Attached {
    member: String,
    epoch: u64,
    limit: usize,
    events: mpsc::UnboundedSender<Result<ConsumeEvent, BrokerError>>,
}

/// Handle of a running dispatcher, kept by the broker.
pub(crate) type DispatcherHandle = mpsc::UnboundedSender<Attach>;

/// Where (partition group, group name) a dispatcher delivers.
pub(crate) type DispatcherKey = (GroupId, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PState {
    Ready,
    Delivered { deadline: Instant },
    Delayed { until: Instant },
    DeadLettering,
}

struct Pending {
    record: StoredRecord,
    deliveries: u32,
    state: PState,
}

enum Internal {
    AcksCommitted(Vec<u64>, Result<Option<GroupCursor>, BrokerError>),
    DeadLettered(u64, Result<(), BrokerError>),
}

fn fenced(station: &str, group: &str, partition: u32, detail: String) -> BrokerError {
    BrokerError::Fenced(format!(
        "group '{group}' of '{station}', partition {partition}: {detail}"
    ))
}

/// Checks that `member` owns `partition` at `epoch` in `g`.
fn check_owner(
    g: &GroupMeta,
    partition: u32,
    member: &str,
    epoch: u64,
) -> Result<(), (bool, String)> {
    match g
        .assignment
        .get(partition as usize)
        .and_then(Option::as_ref)
    {
        Some(a) if a.member == member && a.epoch == epoch => Ok(()),
        Some(a) if a.epoch < epoch => Err((true, format!("epoch {epoch} is not known yet"))),
        Some(a) => Err((
            false,
            format!(
                "assigned to member '{}' at epoch {}, not to '{member}' at epoch {epoch}",
                a.member, a.epoch
            ),
        )),
        None => Err((
            g.generation < epoch,
            format!("not assigned to any member (generation {})", g.generation),
        )),
    }
}

impl Broker {
    /// Subscribes `member` to `partition` of a group; this node must lead the partition.
    pub async fn subscribe(
        self: &Arc<Self>,
        station: &StationName,
        group: &str,
        partition: u32,
        member: &str,
        epoch: u64,
        max_in_flight: u32,
    ) -> Result<Subscription, BrokerError> {
        let full = station.full();
        let replica = self.hosted_replica(station, partition)?;
        self.ensure_partition_leader(&replica)?;
        // The subscriber may have heard of its epoch before this node applied it.
        let deadline = Instant::now() + EPOCH_WAIT;
        let mut meta_rx = self.subscribe_metadata();
        let settings = loop {
            let g = self.group_meta_soon(&full, group).await?;
            match check_owner(&g, partition, member, epoch) {
                Ok(()) => break g.settings,
                Err((true, _)) if Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, meta_rx.changed()).await;
                }
                Err((_, detail)) => return Err(fenced(&full, group, partition, detail)),
            }
        };
        let limit = match max_in_flight {
            0 => settings.max_in_flight,
            n => n.min(settings.max_in_flight),
        } as usize;
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let mut attach = Attach {
            member: member.to_string(),
            epoch,
            limit,
            events: ev_tx,
            control: ctl_rx,
        };
        let key = (replica.group, group.to_string());
        for _ in 0..2 {
            let existing = self.dispatchers.lock().get(&key).cloned();
            let handle = match existing {
                Some(h) if !h.is_closed() => h,
                _ => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.dispatchers.lock().insert(key.clone(), tx.clone());
                    let d = Dispatcher::new(
                        self.clone(),
                        full.clone(),
                        group.to_string(),
                        partition,
                        replica.clone(),
                    );
                    self.tasks_spawn(d.run(rx, tx.clone(), key.clone()));
                    tx
                }
            };
            match handle.send(attach) {
                Ok(()) => {
                    return Ok(Subscription {
                        events: ev_rx,
                        control: ctl_tx,
                    });
                }
                Err(mpsc::error::SendError(a)) => attach = a,
            }
        }
        Err(BrokerError::Unavailable(format!(
            "delivery of partition {partition} for group '{group}' is restarting; retry"
        )))
    }

    pub(crate) fn ensure_partition_leader(
        &self,
        replica: &PartitionReplica,
    ) -> Result<(), BrokerError> {
        match replica.leader() {
            Some(l) if l == self.node_id() => Ok(()),
            leader => Err(BrokerError::NotLeader {
                node: self.node_id(),
                group: replica.group,
                leader: leader.and_then(|l| self.addr_of(l).map(|a| (l, a))),
            }),
        }
    }

    /// The offset where a new group starts in a partition.
    fn start_offset_for(
        &self,
        replica: &PartitionReplica,
        start: StartFrom,
    ) -> Result<u64, BrokerError> {
        let s = replica.shared.current();
        Ok(match start {
            StartFrom::Earliest => s.start_offset,
            StartFrom::Latest => s.next_offset,
            StartFrom::Offset(o) => o.clamp(s.start_offset, s.next_offset),
            StartFrom::Timestamp(ts) => self.offset_for_time(replica.group, ts)?,
        })
    }

    /// Writes a group command to a partition this node leads and returns the cursor after it.
    pub(crate) async fn cursor_write(
        &self,
        replica: &PartitionReplica,
        cmd: PartitionCommand,
    ) -> Result<Option<GroupCursor>, BrokerError> {
        match replica.raft.client_write(Command::Partition(cmd)).await {
            Ok(r) => match r.data {
                CommandResponse::Cursor(c) => Ok(c),
                CommandResponse::Done => Ok(None),
                other => Err(BrokerError::Raft(format!("unexpected reply {other:?}"))),
            },
            Err(openraft::errors::RaftError::APIError(
                openraft::errors::ClientWriteError::ForwardToLeader(f),
            )) => Err(BrokerError::NotLeader {
                node: self.node_id(),
                group: replica.group,
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            }),
            Err(e) => Err(BrokerError::Unavailable(format!(
                "partition group {} write failed: {e}",
                replica.group
            ))),
        }
    }

    /// Returns the group's cursor in a partition this node leads, creating it from the
    /// group's start setting when the group has never read the partition.
    pub(crate) async fn ensure_cursor(
        &self,
        replica: &PartitionReplica,
        g: &GroupMeta,
    ) -> Result<GroupCursor, BrokerError> {
        if let Some(c) = replica
            .shared
            .cursors()
            .get(&g.name)
            .filter(|c| c.uid == g.uid)
        {
            return Ok(c.clone());
        }
        let start = self.start_offset_for(replica, g.settings.start)?;
        self.cursor_write(
            replica,
            PartitionCommand::GroupInit {
                group: g.name.clone(),
                uid: g.uid,
                start,
            },
        )
        .await?
        .ok_or_else(|| BrokerError::Raft("group cursor missing after init".into()))
    }
}

struct Dispatcher {
    broker: Arc<Broker>,
    station: String,
    group: String,
    partition: u32,
    replica: Arc<PartitionReplica>,
    uid: u64,
    settings: GroupSettings,
    cursor: GroupCursor,
    read_pos: u64,
    pending: BTreeMap<u64, Pending>,
    key_queues: HashMap<Vec<u8>, VecDeque<u64>>,
    ready: BTreeSet<u64>,
    timers: BTreeSet<(Instant, u64)>,
    in_flight: usize,
    attached: Option<Attached>,
    detached_since: Instant,
    ack_batch: Vec<u64>,
    ack_writing: bool,
    /// Acks in the replication write under way: with `ack_batch`, they count against the
    /// in-flight limit, so what a failover can redeliver is at most `max_in_flight`.
    ack_writing_count: usize,
    dead_lettering: usize,
    internal: mpsc::UnboundedSender<Internal>,
    internal_rx: Option<mpsc::UnboundedReceiver<Internal>>,
    /// Over the tenant's consume rate: no reading ahead until then.
    throttled_until: Option<Instant>,
}

impl Dispatcher {
    fn new(
        broker: Arc<Broker>,
        station: String,
        group: String,
        partition: u32,
        replica: Arc<PartitionReplica>,
    ) -> Self {
        let (itx, irx) = mpsc::unbounded_channel();
        Self {
            broker,
            station,
            group,
            partition,
            replica,
            uid: 0,
            settings: GroupSettings::default(),
            cursor: GroupCursor::default(),
            read_pos: 0,
            pending: BTreeMap::new(),
            key_queues: HashMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            in_flight: 0,
            attached: None,
            detached_since: Instant::now(),
            ack_batch: Vec::new(),
            ack_writing: false,
            ack_writing_count: 0,
            dead_lettering: 0,
            internal: itx,
            internal_rx: Some(irx),
            throttled_until: None,
        }
    }

    async fn run(
        mut self,
        mut attaches: mpsc::UnboundedReceiver<Attach>,
        me: DispatcherHandle,
        key: DispatcherKey,
    ) {
        let mut control: Option<mpsc::UnboundedReceiver<ConsumeControl>> = None;
        let result = self.run_inner(&mut attaches, &mut control).await;
        if let Err(e) = &result {
            tracing::debug!(station = %self.station, group = %self.group, partition = self.partition, error = %e, "dispatcher stopped");
        }
        // Unregister first, so that new subscriptions start a fresh dispatcher.
        {
            let mut map = self.broker.dispatchers.lock();
            if map.get(&key).is_some_and(|h| h.same_channel(&me)) {
                map.remove(&key);
            }
        }
        attaches.close();
        let err = match result {
            Ok(()) => BrokerError::Unavailable("delivery stopped; subscribe again".into()),
            Err(e) => e,
        };
        if let Some(a) = self.attached.take() {
            let _ = a.events.send(Err(err.for_subscriber()));
        }
        while let Ok(a) = attaches.try_recv() {
            let _ = a.events.send(Err(err.for_subscriber()));
        }
    }

    async fn run_inner(
        &mut self,
        attaches: &mut mpsc::UnboundedReceiver<Attach>,
        control: &mut Option<mpsc::UnboundedReceiver<ConsumeControl>>,
    ) -> Result<(), BrokerError> {
        let g = self.broker.group_meta(&self.station, &self.group)?;
        self.uid = g.uid;
        self.settings = g.settings;
        self.cursor = self.broker.ensure_cursor(&self.replica, &g).await?;
        self.read_pos = self.cursor.committed;
        let mut state_rx = self.replica.shared.subscribe();
        let mut cursor_rx = self.replica.shared.subscribe_cursors();
        let mut meta_rx = self.broker.subscribe_metadata();
        let Some(mut internal_rx) = self.internal_rx.take() else {
            return Err(BrokerError::Raft("dispatcher started twice".into()));
        };
        let mut check = tokio::time::interval(Duration::from_millis(250));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.broker.shutdown_token();
        loop {
            self.fill()?;
            self.dispatch();
            self.commit_acks();
            let wake = self
                .timers
                .first()
                .map_or_else(|| Instant::now() + Duration::from_secs(3600), |(t, _)| *t);
            tokio::select! {
                a = attaches.recv() => match a {
                    Some(a) => {
                        let ctl = self.attach(a);
                        *control = Some(ctl);
                    }
                    None => return Ok(()),
                },
                c = next_control(control) => match c {
                    Some(c) => self.on_control(c),
                    None => {
                        *control = None;
                        self.detach();
                    }
                },
                r = state_rx.changed() => {
                    if r.is_err() {
                        return Err(BrokerError::Unavailable("partition stopped".into()));
                    }
                }
                r = cursor_rx.changed() => {
                    if r.is_err() {
                        return Err(BrokerError::Unavailable("partition stopped".into()));
                    }
                    let cursors = cursor_rx.borrow_and_update().clone();
                    self.on_cursor(cursors.get(&self.group).cloned());
                }
                r = meta_rx.changed() => {
                    if r.is_err() {
                        return Err(BrokerError::Unavailable("metadata stopped".into()));
                    }
                    let meta = meta_rx.borrow_and_update().clone();
                    if self.on_metadata(meta.group(&self.station, &self.group)) {
                        *control = None;
                    }
                }
                m = internal_rx.recv() => {
                    if let Some(m) = m {
                        self.on_internal(m)?;
                    }
                }
                () = tokio::time::sleep_until(wake) => self.expire(),
                () = sleep_until_some(self.throttled_until), if self.throttled_until.is_some() => {
                    self.throttled_until = None;
                }
                _ = check.tick() => {
                    self.broker.ensure_partition_leader(&self.replica)?;
                    if self.broker.partition(self.replica.group).is_none() {
                        return Err(BrokerError::Unavailable("partition closed".into()));
                    }
                    if self.attached.is_none()
                        && !self.ack_writing
                        && self.ack_batch.is_empty()
                        && self.dead_lettering == 0
                        && self.detached_since.elapsed() >= IDLE_STOP
                    {
                        return Ok(());
                    }
                }
                () = shutdown.cancelled() => {
                    return Err(BrokerError::Unavailable("node is stopping".into()));
                }
            }
        }
    }

    fn is_head(&self, offset: u64, key: Option<&Vec<u8>>) -> bool {
        match key {
            None => true,
            Some(k) => self
                .key_queues
                .get(k)
                .and_then(VecDeque::front)
                .is_none_or(|h| *h == offset),
        }
    }

    fn make_ready(&mut self, offset: u64) {
        let Some(p) = self.pending.get_mut(&offset) else {
            return;
        };
        p.state = PState::Ready;
        let key = p.record.key.clone();
        if self.is_head(offset, key.as_ref()) {
            self.ready.insert(offset);
        }
    }

    fn clear_timer(&mut self, offset: u64, state: PState) {
        match state {
            PState::Delivered { deadline } => {
                self.timers.remove(&(deadline, offset));
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            PState::Delayed { until } => {
                self.timers.remove(&(until, offset));
            }
            PState::Ready | PState::DeadLettering => {}
        }
    }

    /// Removes a message that is done (acked or dead-lettered) and releases its key.
    fn finish(&mut self, offset: u64) {
        let Some(p) = self.pending.remove(&offset) else {
            return;
        };
        self.clear_timer(offset, p.state);
        self.ready.remove(&offset);
        if let Some(k) = p.record.key {
            let next = match self.key_queues.get_mut(&k) {
                Some(q) => {
                    if q.front() == Some(&offset) {
                        q.pop_front();
                    } else {
                        q.retain(|o| *o != offset);
                    }
                    q.front().copied()
                }
                None => None,
            };
            match next {
                Some(n) => {
                    if self
                        .pending
                        .get(&n)
                        .is_some_and(|p| p.state == PState::Ready)
                    {
                        self.ready.insert(n);
                    }
                }
                None => {
                    self.key_queues.remove(&k);
                }
            }
        }
        self.ack_batch.push(offset);
    }

    fn window(&self) -> usize {
        (self.settings.max_in_flight as usize * 2).clamp(256, 20_000)
    }

    /// Reads more committed messages into `pending`.
    fn fill(&mut self) -> Result<(), BrokerError> {
        let window = self.window();
        let state = self.replica.shared.current();
        if self.read_pos < state.start_offset {
            // Retention removed messages this group had not read: skip them, and say so.
            metrics::counter!("junction_group_skipped_messages_total", "group" => self.group.clone())
                .increment(state.start_offset - self.read_pos);
            self.read_pos = state.start_offset;
        }
        if self.throttled_until.is_some() {
            return Ok(());
        }
        let (tenant, station) = self.station.split_once('/').unwrap_or(("", &self.station));
        while self.pending.len() < window && self.read_pos < state.next_offset {
            // Over the tenant's consume rate: read on once it is paid back.
            if let Err(BrokerError::Throttled { retry_after_ms, .. }) =
                self.broker.check_consume(tenant, station)
            {
                self.throttled_until = Some(Instant::now() + Duration::from_millis(retry_after_ms));
                break;
            }
            let want = window - self.pending.len();
            let (msgs, _) =
                self.broker
                    .read(self.replica.group, self.read_pos, want, READ_BYTES)?;
            if msgs.is_empty() {
                self.read_pos = state.next_offset;
                break;
            }
            let read_bytes: u64 = msgs.iter().map(|(_, b)| b.len() as u64).sum();
            self.broker.charge_consume(tenant, station, read_bytes);
            for (offset, bytes) in msgs {
                self.read_pos = offset + 1;
                if self.cursor.is_acked(offset) {
                    continue;
                }
                let record: StoredRecord =
                    junction_raft::decode(&junction_raft::format::RECORD, &bytes).map_err(|e| {
                        BrokerError::Raft(format!(
                            "partition {} offset {offset} is unreadable: {e}",
                            self.partition
                        ))
                    })?;
                let key = record.key.clone();
                if let Some(k) = &key {
                    self.key_queues
                        .entry(k.clone())
                        .or_default()
                        .push_back(offset);
                }
                self.pending.insert(
                    offset,
                    Pending {
                        record,
                        deliveries: 0,
                        state: PState::Ready,
                    },
                );
                if self.is_head(offset, key.as_ref()) {
                    self.ready.insert(offset);
                }
            }
        }
        Ok(())
    }

    /// Hands ready messages to the subscriber, up to its in-flight limit.
    fn dispatch(&mut self) {
        let Some(a) = &self.attached else {
            return;
        };
        let limit = a.limit;
        let events = a.events.clone();
        let ack_wait = Duration::from_millis(self.settings.ack_wait_ms);
        let mut batch = Vec::new();
        while self.in_flight + self.ack_batch.len() + self.ack_writing_count < limit {
            let Some(offset) = self.ready.pop_first() else {
                break;
            };
            let Some(p) = self.pending.get_mut(&offset) else {
                continue;
            };
            let deadline = Instant::now() + ack_wait;
            p.deliveries += 1;
            p.state = PState::Delivered { deadline };
            self.timers.insert((deadline, offset));
            self.in_flight += 1;
            batch.push(Delivered {
                offset,
                record: p.record.clone(),
                delivery_count: p.deliveries,
            });
            if batch.len() >= DELIVERY_BATCH {
                let _ = events.send(Ok(ConsumeEvent::Deliveries(std::mem::take(&mut batch))));
            }
        }
        if !batch.is_empty() {
            let _ = events.send(Ok(ConsumeEvent::Deliveries(batch)));
        }
    }

    /// Starts replicating the gathered acks unless a write is already under way.
    fn commit_acks(&mut self) {
        if self.ack_writing || self.ack_batch.is_empty() {
            return;
        }
        let mut offsets = std::mem::take(&mut self.ack_batch);
        offsets.sort_unstable();
        offsets.dedup();
        self.ack_writing = true;
        self.ack_writing_count = offsets.len();
        let broker = self.broker.clone();
        let replica = self.replica.clone();
        let tx = self.internal.clone();
        let cmd = PartitionCommand::GroupAck {
            group: self.group.clone(),
            uid: self.uid,
            offsets: offsets.clone(),
        };
        self.broker.tasks_spawn(async move {
            let r = broker.cursor_write(&replica, cmd).await;
            let _ = tx.send(Internal::AcksCommitted(offsets, r));
        });
    }

    fn attach(&mut self, a: Attach) -> mpsc::UnboundedReceiver<ConsumeControl> {
        if let Some(old) = self.attached.take() {
            let _ = old.events.send(Err(fenced(
                &self.station,
                &self.group,
                self.partition,
                format!(
                    "replaced by a subscription of member '{}' at epoch {}",
                    a.member, a.epoch
                ),
            )));
        }
        self.redeliver_in_flight();
        self.attached = Some(Attached {
            member: a.member,
            epoch: a.epoch,
            limit: a.limit.max(1),
            events: a.events,
        });
        a.control
    }

    fn detach(&mut self) {
        self.attached = None;
        self.detached_since = Instant::now();
        self.redeliver_in_flight();
    }

    /// Everything delivered to a subscriber that is gone goes back to ready.
    fn redeliver_in_flight(&mut self) {
        let delivered: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.state, PState::Delivered { .. }))
            .map(|(o, _)| *o)
            .collect();
        for o in delivered {
            if let Some(state) = self.pending.get(&o).map(|p| p.state) {
                self.clear_timer(o, state);
            }
            self.make_ready(o);
        }
    }

    fn on_control(&mut self, c: ConsumeControl) {
        match c {
            ConsumeControl::Ack(offsets) => {
                for o in offsets {
                    if self.pending.get(&o).is_some_and(|p| p.deliveries > 0) {
                        self.finish(o);
                    }
                }
            }
            ConsumeControl::Nack { offsets, delay_ms } => {
                for o in offsets {
                    let Some(state) = self.pending.get(&o).map(|p| p.state) else {
                        continue;
                    };
                    if !matches!(state, PState::Delivered { .. }) {
                        continue;
                    }
                    self.clear_timer(o, state);
                    self.after_failed_delivery(o, delay_ms, "nacked");
                }
            }
            ConsumeControl::InProgress(offsets) => {
                let ack_wait = Duration::from_millis(self.settings.ack_wait_ms);
                for o in offsets {
                    if let Some(p) = self.pending.get_mut(&o)
                        && let PState::Delivered { deadline } = p.state
                    {
                        let new = Instant::now() + ack_wait;
                        self.timers.remove(&(deadline, o));
                        self.timers.insert((new, o));
                        p.state = PState::Delivered { deadline: new };
                    }
                }
            }
        }
    }

    /// A delivery ended without an ack: dead-letter after `max_deliveries`, else redeliver
    /// (after `delay_ms`).
    fn after_failed_delivery(&mut self, offset: u64, delay_ms: u64, reason: &'static str) {
        let Some(p) = self.pending.get_mut(&offset) else {
            return;
        };
        if p.deliveries >= self.settings.max_deliveries {
            p.state = PState::DeadLettering;
            self.dead_letter(offset, reason);
        } else if delay_ms == 0 {
            self.make_ready(offset);
        } else {
            let until = Instant::now() + Duration::from_millis(delay_ms);
            p.state = PState::Delayed { until };
            self.timers.insert((until, offset));
        }
    }

    fn dead_letter(&mut self, offset: u64, reason: &'static str) {
        let Some(p) = self.pending.get(&offset) else {
            return;
        };
        let Some(sink) = self.broker.dead_letter_sink() else {
            tracing::error!("no dead-letter sink configured; the message stays pending");
            return;
        };
        let mut headers = p.record.headers.clone();
        headers.extend([
            (
                dls_headers::GROUP.to_string(),
                self.group.clone().into_bytes(),
            ),
            (dls_headers::REASON.to_string(), reason.as_bytes().to_vec()),
            (
                dls_headers::DELIVERIES.to_string(),
                p.deliveries.to_string().into_bytes(),
            ),
            (
                dls_headers::STATION.to_string(),
                self.station.clone().into_bytes(),
            ),
            (
                dls_headers::PARTITION.to_string(),
                self.partition.to_string().into_bytes(),
            ),
            (
                dls_headers::OFFSET.to_string(),
                offset.to_string().into_bytes(),
            ),
        ]);
        let record = Record {
            key: p.record.key.clone(),
            headers,
            payload: p.record.payload.clone(),
        };
        let station = dead_letter_station(&self.station);
        let tx = self.internal.clone();
        self.dead_lettering += 1;
        let fut = sink.append(station, record);
        self.broker.tasks_spawn(async move {
            let r = fut.await;
            let _ = tx.send(Internal::DeadLettered(offset, r));
        });
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((t, o)) = self.timers.first().copied() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, o));
            let Some(state) = self.pending.get(&o).map(|p| p.state) else {
                continue;
            };
            match state {
                PState::Delivered { deadline } if deadline == t => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    self.after_failed_delivery(o, 0, "ack-wait-expired");
                }
                PState::Delayed { until } if until == t => self.make_ready(o),
                _ => {}
            }
        }
    }

    fn on_internal(&mut self, m: Internal) -> Result<(), BrokerError> {
        match m {
            Internal::AcksCommitted(acks, r) => {
                self.ack_writing = false;
                self.ack_writing_count = 0;
                let cursor = r?;
                // Through the same path as the watch, so that a seek applied meanwhile is
                // noticed whichever of the two arrives first.
                self.on_cursor(cursor);
                let committed = self.cursor.committed;
                if let Some(a) = &self.attached {
                    let _ = a
                        .events
                        .send(Ok(ConsumeEvent::Committed { acks, committed }));
                }
            }
            Internal::DeadLettered(offset, r) => {
                self.dead_lettering = self.dead_lettering.saturating_sub(1);
                match r {
                    Ok(()) => {
                        metrics::counter!("junction_group_dead_letters_total", "group" => self.group.clone())
                            .increment(1);
                        self.finish(offset);
                    }
                    Err(e) => {
                        tracing::warn!(offset, error = %e, "dead-letter append failed; retrying");
                        if let Some(p) = self.pending.get_mut(&offset) {
                            let until = Instant::now() + DLS_RETRY;
                            p.state = PState::Delayed { until };
                            self.timers.insert((until, offset));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn on_cursor(&mut self, c: Option<GroupCursor>) {
        let Some(c) = c.filter(|c| c.uid == self.uid) else {
            return;
        };
        if c.seek_epoch != self.cursor.seek_epoch {
            // A seek: start over from the new position.
            self.pending.clear();
            self.key_queues.clear();
            self.ready.clear();
            self.timers.clear();
            self.in_flight = 0;
            self.ack_batch.clear();
            self.read_pos = c.committed;
        }
        self.cursor = c;
    }

    /// Returns true when the subscriber was fenced (the caller drops its control channel).
    fn on_metadata(&mut self, g: Option<&GroupMeta>) -> bool {
        let Some(a) = &self.attached else {
            return false;
        };
        let detail = match g {
            None => "the group was deleted".to_string(),
            Some(g) if g.uid != self.uid => "the group was re-created".to_string(),
            Some(g) => match check_owner(g, self.partition, &a.member, a.epoch) {
                Ok(()) => return false,
                Err((_, d)) => d,
            },
        };
        let _ = a.events.send(Err(fenced(
            &self.station,
            &self.group,
            self.partition,
            detail,
        )));
        self.detach();
        true
    }
}

async fn next_control(
    control: &mut Option<mpsc::UnboundedReceiver<ConsumeControl>>,
) -> Option<ConsumeControl> {
    match control {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is no `at` (a disabled `select!` branch).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
