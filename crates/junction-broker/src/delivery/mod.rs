//! Delivery of one partition to one consumer group, run on the partition's leader.
//!
//! A [`Dispatcher`] task per (partition, group) is the runtime around the pure
//! [`engine::Engine`], which decides who gets what and when. The dispatcher only does I/O:
//! - reads committed messages from the group's cursor onward into the engine (a bounded
//!   window, paced by the tenant's consume quota);
//! - feeds it subscriptions, acks, nacks, in-progress reports, the clock, durable acks and the
//!   outcome of dead-letter appends;
//! - carries out its commands: sends deliveries to members, replicates acks through the
//!   partition's Raft group in batches (one write in flight, the next gathering meanwhile),
//!   appends dead letters with explanatory headers, and ends fenced subscriptions.
//!
//! The engine keeps per-key order (a key's next message goes out once the previous one is
//! finished), redelivers what is not acked within `ack_wait` (or was nacked, after the nack's
//! delay), and gives up after `max_deliveries`. Acks count against a member's in-flight limit
//! until they are replicated, so what a leader failover can redeliver is bounded by
//! `max_in_flight`.
//!
//! Nothing but the cursor is replicated: after a leader failover the new leader's dispatcher
//! starts from the replicated cursor, and delivery counts restart there too.
//!
//! Fencing: a subscription names the partition's assignment epoch. When the metadata moves the
//! partition to another member (a new epoch), the old subscription ends with `Fenced` and its
//! unacked messages go to the new owner.

pub mod engine;
pub mod pull;

pub use engine::AckRefusal;
use engine::{Command as EngineCommand, Engine, EngineSettings, GiveUp, Mode, OnExhausted};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use tokio_stream::wrappers::UnboundedReceiverStream;

use junction_types::groups::{
    GroupCursor, GroupMeta, GroupMode, GroupSettings, Lanes, OnMaxDeliveries, StartFrom,
    dead_letter_station,
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
    Ack(Answer),
    Nack {
        answer: Answer,
        delay_ms: u64,
    },
    InProgress(Answer),
    /// A pulling subscriber may take this many more messages (`None`: it streams again,
    /// limited by its in-flight limit alone).
    Credit(Option<u32>),
    /// An ack, nack or in-progress report whose outcome the sender awaits: one result per
    /// offset, in order.
    Checked {
        control: Box<ConsumeControl>,
        reply: tokio::sync::oneshot::Sender<Vec<Result<(), AckRefusal>>>,
    },
}

/// Offsets a subscriber answers, with the delivery attempt each answers (empty, or shorter
/// than `offsets`: the current attempt).
#[derive(Debug, Default)]
pub struct Answer {
    pub offsets: Vec<u64>,
    pub attempts: Vec<u32>,
}

impl Answer {
    /// (offset, attempt named or None) pairs.
    fn pairs(&self) -> impl Iterator<Item = (u64, Option<u32>)> + '_ {
        self.offsets
            .iter()
            .enumerate()
            .map(|(i, o)| (*o, self.attempts.get(i).copied()))
    }
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

/// A subscription the dispatcher delivers to.
struct Attached {
    /// Which subscription this is: a member may subscribe again at the same epoch (a pulling
    /// member whose session ended, a stream that reconnected), and what the old one's control
    /// stream says afterwards must not reach the new one.
    id: u64,
    epoch: u64,
    events: mpsc::UnboundedSender<Result<ConsumeEvent, BrokerError>>,
}

/// What a running dispatcher is sent.
pub(crate) enum ToDispatcher {
    Attach(Attach),
    Operate(Operate),
}

/// An operator's action on a group's parked keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParkedAction {
    /// Deliver the key's head again, with a fresh count of deliveries.
    Resume(Vec<u8>),
    /// Resume every parked key.
    ResumeAll,
    /// Dead-letter the key's head (reason `skipped`); the key goes on once that is stored.
    Skip(Vec<u8>),
}

pub(crate) struct Operate {
    action: ParkedAction,
    reply: tokio::sync::oneshot::Sender<Result<u32, BrokerError>>,
}

/// Handle of a running dispatcher, kept by the broker.
pub(crate) type DispatcherHandle = mpsc::UnboundedSender<ToDispatcher>;

/// Where (partition group, group name) a dispatcher delivers.
pub(crate) type DispatcherKey = (GroupId, String);

enum Internal {
    AcksCommitted(Vec<u64>, Result<Option<GroupCursor>, BrokerError>),
    DeadLettered(u64, Result<(), BrokerError>),
}

fn fenced(station: &str, group: &str, partition: u32, detail: String) -> BrokerError {
    BrokerError::Fenced(format!(
        "group '{group}' of '{station}', partition {partition}: {detail}"
    ))
}

/// Checks that `member` may consume `partition` at `epoch` in `g`: it owns the partition
/// (partitioned), or it is a member that joined at `epoch` (key-shared). The error says whether
/// the epoch may be one this node has not applied yet (worth waiting for), and why.
fn check_owner(
    g: &GroupMeta,
    partition: u32,
    member: &str,
    epoch: u64,
) -> Result<(), (bool, String)> {
    if g.lanes.mode == GroupMode::KeyShared {
        if partition as usize >= g.assignment.len() {
            return Err((false, format!("partition {partition} does not exist")));
        }
        return match g.members.get(member) {
            Some(m) if m.epoch == epoch => Ok(()),
            Some(m) if m.epoch < epoch => Err((true, format!("epoch {epoch} is not known yet"))),
            Some(m) => Err((
                false,
                format!(
                    "member '{member}' joined again at epoch {}, not {epoch}",
                    m.epoch
                ),
            )),
            None => Err((
                g.generation < epoch,
                format!("'{member}' is not a member (generation {})", g.generation),
            )),
        };
    }
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
        let attach = Attach {
            member: member.to_string(),
            epoch,
            limit,
            events: ev_tx,
            control: ctl_rx,
        };
        let mut msg = ToDispatcher::Attach(attach);
        for _ in 0..2 {
            let handle = self.dispatcher(&full, group, partition, &replica);
            match handle.send(msg) {
                Ok(()) => {
                    return Ok(Subscription {
                        events: ev_rx,
                        control: ctl_tx,
                    });
                }
                Err(mpsc::error::SendError(m)) => msg = m,
            }
        }
        Err(BrokerError::Unavailable(format!(
            "delivery of partition {partition} for group '{group}' is restarting; retry"
        )))
    }

    /// The running dispatcher of a group's partition, started if there is none.
    fn dispatcher(
        self: &Arc<Self>,
        full: &str,
        group: &str,
        partition: u32,
        replica: &Arc<PartitionReplica>,
    ) -> DispatcherHandle {
        let key = (replica.group, group.to_string());
        let existing = self.dispatchers.lock().get(&key).cloned();
        match existing {
            Some(h) if !h.is_closed() => h,
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.dispatchers.lock().insert(key.clone(), tx.clone());
                let d = Dispatcher::new(
                    self.clone(),
                    full.to_owned(),
                    group.to_string(),
                    partition,
                    replica.clone(),
                );
                self.tasks_spawn(d.run(rx, tx.clone(), key));
                tx
            }
        }
    }

    /// Resumes or skips parked keys of a group's partition; this node must lead it. Returns
    /// how many keys the action applied to.
    pub async fn parked_action(
        self: &Arc<Self>,
        station: &StationName,
        group: &str,
        partition: u32,
        action: ParkedAction,
    ) -> Result<u32, BrokerError> {
        let full = station.full();
        let replica = self.hosted_replica(station, partition)?;
        self.ensure_partition_leader(&replica)?;
        self.group_meta(&full, group)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mut msg = ToDispatcher::Operate(Operate { action, reply });
        for _ in 0..2 {
            let handle = self.dispatcher(&full, group, partition, &replica);
            match handle.send(msg) {
                Ok(()) => {
                    return answer.await.map_err(|_| {
                        BrokerError::Unavailable(format!(
                            "delivery of partition {partition} for group '{group}' stopped; retry"
                        ))
                    })?;
                }
                Err(mpsc::error::SendError(m)) => msg = m,
            }
        }
        Err(BrokerError::Unavailable(format!(
            "delivery of partition {partition} for group '{group}' is restarting; retry"
        )))
    }

    /// The stored message at `offset` of a partition this node holds (`None` when it is
    /// not stored, or cannot be decoded).
    pub async fn read_one(
        &self,
        station: &StationName,
        partition: u32,
        offset: u64,
    ) -> Option<StoredRecord> {
        let replica = self.hosted_replica(station, partition).ok()?;
        let (msgs, _) = self.read(replica.group, offset, 1, 16 << 20).await.ok()?;
        let (at, bytes) = msgs.into_iter().next()?;
        if at != offset {
            return None;
        }
        junction_raft::decode_record(&bytes).ok()
    }

    /// The parked keys of a group in a partition this node holds, with their heads, as the
    /// replicated position records them.
    pub fn parked_keys(
        &self,
        station: &StationName,
        group: &str,
        partition: u32,
    ) -> Result<std::collections::BTreeMap<Vec<u8>, u64>, BrokerError> {
        let full = station.full();
        let g = self.group_meta(&full, group)?;
        let replica = self.hosted_replica(station, partition)?;
        Ok(replica
            .shared
            .cursors()
            .get(group)
            .filter(|c| c.uid == g.uid)
            .map(|c| c.parked.clone())
            .unwrap_or_default())
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
        replica.quiet.ready_to_write().await;
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

/// What a subscription's control stream yields, tagged with its member and attachment id: the
/// control, or `None` when it ended.
type ControlItem = (String, u64, Option<ConsumeControl>);

/// The runtime of one (partition, group): reads records, feeds the [`Engine`] what happens,
/// and carries out its commands (deliveries, ack writes, dead letters, fencing).
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
    engine: Engine,
    /// The records of the messages the engine holds, by offset.
    records: HashMap<u64, StoredRecord>,
    /// The engine's clock starts here.
    clock: Instant,
    members: HashMap<String, Attached>,
    /// The id the next subscription gets.
    next_attachment: u64,
    /// Control streams of every subscription, each tagged with its member and attachment id.
    controls: SelectAll<BoxStream<'static, ControlItem>>,
    detached_since: Instant,
    ack_batch: Vec<u64>,
    ack_writing: bool,
    dead_lettering: usize,
    internal: mpsc::UnboundedSender<Internal>,
    internal_rx: Option<mpsc::UnboundedReceiver<Internal>>,
    /// Over the tenant's consume rate: no reading ahead until then.
    throttled_until: Option<Instant>,
    /// Parked-key writes, replicated one at a time in order.
    park_tx: Option<mpsc::UnboundedSender<PartitionCommand>>,
}

/// Replicates parked-key changes in the order they were decided. A failed write is logged:
/// the key is parked again after its deliveries are used up once more on the next leader.
async fn write_parks(
    broker: Arc<Broker>,
    replica: Arc<PartitionReplica>,
    mut rx: mpsc::UnboundedReceiver<PartitionCommand>,
) {
    while let Some(cmd) = rx.recv().await {
        if let Err(e) = broker.cursor_write(&replica, cmd).await {
            tracing::warn!(group = replica.group, error = %e, "a parked-key change was not replicated");
        }
    }
}

/// The engine settings of a group.
fn engine_settings(s: &GroupSettings, lanes: &Lanes) -> EngineSettings {
    EngineSettings {
        mode: match lanes.mode {
            GroupMode::Partitioned => Mode::Partitioned,
            GroupMode::KeyShared => Mode::KeyShared,
        },
        ack_wait_ms: s.ack_wait_ms,
        max_deliveries: s.max_deliveries,
        max_in_flight_per_key: lanes.max_in_flight_per_key,
        on_exhausted: match lanes.on_max_deliveries {
            OnMaxDeliveries::DeadLetter => OnExhausted::DeadLetter,
            OnMaxDeliveries::Park => OnExhausted::Park,
        },
    }
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
        let settings = GroupSettings::default();
        Self {
            broker,
            station,
            group,
            partition,
            replica,
            uid: 0,
            engine: Engine::new(engine_settings(&settings, &Lanes::default())),
            settings,
            cursor: GroupCursor::default(),
            read_pos: 0,
            records: HashMap::new(),
            clock: Instant::now(),
            members: HashMap::new(),
            next_attachment: 0,
            controls: SelectAll::new(),
            detached_since: Instant::now(),
            ack_batch: Vec::new(),
            ack_writing: false,
            dead_lettering: 0,
            internal: itx,
            internal_rx: Some(irx),
            throttled_until: None,
            park_tx: None,
        }
    }

    /// The engine's time: milliseconds since the dispatcher started.
    fn now(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(
        mut self,
        mut attaches: mpsc::UnboundedReceiver<ToDispatcher>,
        me: DispatcherHandle,
        key: DispatcherKey,
    ) {
        let result = self.run_inner(&mut attaches).await;
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
        for (_, a) in self.members.drain() {
            let _ = a.events.send(Err(err.for_subscriber()));
        }
        while let Ok(m) = attaches.try_recv() {
            match m {
                ToDispatcher::Attach(a) => {
                    let _ = a.events.send(Err(err.for_subscriber()));
                }
                ToDispatcher::Operate(o) => {
                    let _ = o.reply.send(Err(err.for_subscriber()));
                }
            }
        }
    }

    async fn run_inner(
        &mut self,
        attaches: &mut mpsc::UnboundedReceiver<ToDispatcher>,
    ) -> Result<(), BrokerError> {
        let g = self.broker.group_meta(&self.station, &self.group)?;
        self.uid = g.uid;
        self.settings = g.settings;
        self.engine = Engine::new(engine_settings(&self.settings, &g.lanes));
        self.cursor = self.broker.ensure_cursor(&self.replica, &g).await?;
        self.read_pos = self.cursor.committed;
        self.restore_parked();
        let (park_tx, park_rx) = mpsc::unbounded_channel();
        self.park_tx = Some(park_tx);
        self.broker.tasks_spawn(write_parks(
            self.broker.clone(),
            self.replica.clone(),
            park_rx,
        ));
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
            self.fill().await?;
            let now = self.now();
            self.engine.dispatch(now);
            self.carry_out();
            self.commit_acks();
            let wake = self.engine.next_wake().map_or_else(
                || Instant::now() + Duration::from_secs(3600),
                |t| self.clock + Duration::from_millis(t),
            );
            tokio::select! {
                a = attaches.recv() => match a {
                    Some(ToDispatcher::Attach(a)) => self.attach(a),
                    Some(ToDispatcher::Operate(o)) => self.operate(o),
                    None => return Ok(()),
                },
                Some((member, id, c)) = self.controls.next(), if !self.controls.is_empty() => {
                    match c {
                        Some(c) => self.on_control(&member, id, c),
                        None => self.detach(&member, id),
                    }
                }
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
                    self.on_metadata(meta.group(&self.station, &self.group));
                }
                m = internal_rx.recv() => {
                    if let Some(m) = m {
                        self.on_internal(m)?;
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = self.now();
                    self.engine.tick(now);
                }
                () = sleep_until_some(self.throttled_until), if self.throttled_until.is_some() => {
                    self.throttled_until = None;
                }
                _ = check.tick() => {
                    self.broker.ensure_partition_leader(&self.replica)?;
                    if self.broker.partition(self.replica.group).is_none() {
                        return Err(BrokerError::Unavailable("partition closed".into()));
                    }
                    if self.members.is_empty()
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

    fn window(&self) -> usize {
        (self.settings.max_in_flight as usize * 2).clamp(256, 20_000)
    }

    /// Reads more committed messages into the engine.
    async fn fill(&mut self) -> Result<(), BrokerError> {
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
        // Reads on past the window while nothing held can go (see `engine::hold_limit`).
        while self.read_pos < state.next_offset {
            let want = self.engine.room(window);
            if want == 0 {
                break;
            }
            // Over the tenant's consume rate: read on once it is paid back.
            if let Err(BrokerError::Throttled { retry_after_ms, .. }) =
                self.broker.check_consume(tenant, station)
            {
                self.throttled_until = Some(Instant::now() + Duration::from_millis(retry_after_ms));
                break;
            }
            let (msgs, _) = self
                .broker
                .read(self.replica.group, self.read_pos, want, READ_BYTES)
                .await?;
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
                let record: StoredRecord = junction_raft::decode_record(&bytes).map_err(|e| {
                    BrokerError::Raft(format!(
                        "partition {} offset {offset} is unreadable: {e}",
                        self.partition
                    ))
                })?;
                self.engine.read(offset, record.key.clone());
                self.records.insert(offset, record);
            }
        }
        Ok(())
    }

    /// Carries out what the engine decided.
    fn carry_out(&mut self) {
        let mut deliveries: HashMap<String, Vec<Delivered>> = HashMap::new();
        for c in self.engine.take_commands() {
            match c {
                EngineCommand::Deliver {
                    member,
                    offset,
                    attempt,
                } => match self.records.get(&offset) {
                    Some(record) => deliveries.entry(member).or_default().push(Delivered {
                        offset,
                        record: record.clone(),
                        delivery_count: attempt,
                    }),
                    None => tracing::error!(offset, "a delivery of a message that was not read"),
                },
                EngineCommand::Ack { offset } => {
                    self.records.remove(&offset);
                    self.ack_batch.push(offset);
                }
                EngineCommand::DeadLetter {
                    offset,
                    attempts,
                    why,
                } => self.dead_letter(offset, attempts, why),
                EngineCommand::Park {
                    key,
                    offset,
                    attempts,
                    why,
                } => {
                    tracing::warn!(
                        station = %self.station, group = %self.group, partition = self.partition,
                        key = %String::from_utf8_lossy(&key), offset, attempts, why = why.as_str(),
                        "a key is parked: its messages wait until it is resumed or skipped"
                    );
                    self.record_park(key, Some(offset));
                }
                EngineCommand::Unpark { key } => self.record_park(key, None),
                EngineCommand::Fence {
                    member,
                    epoch,
                    reason,
                } => {
                    if self.members.get(&member).is_some_and(|a| a.epoch == epoch)
                        && let Some(a) = self.members.remove(&member)
                    {
                        let _ = a.events.send(Err(fenced(
                            &self.station,
                            &self.group,
                            self.partition,
                            reason,
                        )));
                    }
                }
            }
        }
        for (member, batch) in deliveries {
            let Some(a) = self.members.get(&member) else {
                continue;
            };
            let mut batch = batch.into_iter().peekable();
            while batch.peek().is_some() {
                let part: Vec<Delivered> = batch.by_ref().take(DELIVERY_BATCH).collect();
                let _ = a.events.send(Ok(ConsumeEvent::Deliveries(part)));
            }
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

    fn attach(&mut self, a: Attach) {
        self.engine.attach(
            &a.member,
            a.epoch,
            u32::try_from(a.limit).unwrap_or(u32::MAX),
        );
        // Fences the subscriptions it replaces before this one is known.
        self.carry_out();
        let id = self.next_attachment;
        self.next_attachment += 1;
        let member = a.member.clone();
        let stream = UnboundedReceiverStream::new(a.control)
            .map(move |c| (member.clone(), id, Some(c)))
            .chain(futures::stream::once({
                let member = a.member.clone();
                async move { (member, id, None) }
            }));
        self.controls.push(Box::pin(stream));
        self.members.insert(
            a.member,
            Attached {
                id,
                epoch: a.epoch,
                events: a.events,
            },
        );
    }

    /// The member's epoch if subscription `id` is its current one.
    fn current_epoch(&self, member: &str, id: u64) -> Option<u64> {
        self.members
            .get(member)
            .filter(|a| a.id == id)
            .map(|a| a.epoch)
    }

    /// A subscription's control stream ended: the member left, unless it has subscribed again
    /// since (at any epoch), or was fenced.
    fn detach(&mut self, member: &str, id: u64) {
        if self.current_epoch(member, id).is_some() {
            self.members.remove(member);
            self.engine.detach(member);
            if self.members.is_empty() {
                self.detached_since = Instant::now();
            }
        }
    }

    fn on_control(&mut self, member: &str, id: u64, c: ConsumeControl) {
        enum What {
            Ack,
            Nack(u64),
            InProgress,
        }
        let now = self.now();
        let (c, reply) = match c {
            ConsumeControl::Checked { control, reply } => (*control, Some(reply)),
            c => (c, None),
        };
        // What a replaced or fenced subscription says is refused (its credit must not reach the
        // member's new subscription at the same epoch).
        let epoch = self.current_epoch(member, id);
        let (answer, what) = match c {
            ConsumeControl::Ack(a) => (a, What::Ack),
            ConsumeControl::Nack { answer, delay_ms } => (answer, What::Nack(delay_ms)),
            ConsumeControl::InProgress(a) => (a, What::InProgress),
            ConsumeControl::Credit(n) => {
                if let Some(epoch) = epoch {
                    self.engine.grant(member, epoch, n);
                }
                return;
            }
            ConsumeControl::Checked { .. } => {
                tracing::error!(member, "a checked answer inside a checked answer, ignored");
                return;
            }
        };
        let Some(epoch) = epoch else {
            if let Some(reply) = reply {
                let _ = reply.send(vec![Err(AckRefusal::NotAttached); answer.offsets.len()]);
            }
            return;
        };
        let mut results = Vec::with_capacity(answer.offsets.len());
        for (o, named) in answer.pairs() {
            // An answer naming no attempt answers the current one.
            let attempt = named.or_else(|| self.engine.attempts(o)).unwrap_or(0);
            let r = match what {
                What::Ack => self.engine.ack(member, epoch, o, attempt),
                What::Nack(delay_ms) => self.engine.nack(now, member, epoch, o, attempt, delay_ms),
                What::InProgress => self.engine.in_progress(now, member, epoch, o, attempt),
            };
            if let Err(r) = &r {
                tracing::debug!(member, epoch, offset = o, reason = %r, "answer refused");
            }
            results.push(r);
        }
        if let Some(reply) = reply {
            // The asker may have given up waiting; the answer took effect all the same.
            let _ = reply.send(results);
        }
    }

    fn dead_letter(&mut self, offset: u64, attempts: u32, why: GiveUp) {
        let Some(record) = self.records.get(&offset) else {
            tracing::error!(offset, "a dead letter of a message that was not read");
            return;
        };
        let Some(sink) = self.broker.dead_letter_sink() else {
            tracing::error!("no dead-letter sink configured; the message stays pending");
            return;
        };
        let mut headers = record.headers.clone();
        headers.extend([
            (
                dls_headers::GROUP.to_string(),
                self.group.clone().into_bytes(),
            ),
            (
                dls_headers::REASON.to_string(),
                why.as_str().as_bytes().to_vec(),
            ),
            (
                dls_headers::DELIVERIES.to_string(),
                attempts.to_string().into_bytes(),
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
            key: record.key.clone(),
            headers,
            payload: record.payload.clone(),
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

    fn on_internal(&mut self, m: Internal) -> Result<(), BrokerError> {
        match m {
            Internal::AcksCommitted(acks, r) => {
                self.ack_writing = false;
                let cursor = r?;
                self.engine.acks_durable(&acks);
                // Through the same path as the watch, so that a seek applied meanwhile is
                // noticed whichever of the two arrives first.
                self.on_cursor(cursor);
                let committed = self.cursor.committed;
                for a in self.members.values() {
                    let _ = a.events.send(Ok(ConsumeEvent::Committed {
                        acks: acks.clone(),
                        committed,
                    }));
                }
            }
            Internal::DeadLettered(offset, r) => {
                self.dead_lettering = self.dead_lettering.saturating_sub(1);
                let now = self.now();
                let retry_ms = u64::try_from(DLS_RETRY.as_millis()).unwrap_or(u64::MAX);
                match r {
                    Ok(()) => {
                        metrics::counter!("junction_group_dead_letters_total", "group" => self.group.clone())
                            .increment(1);
                        self.engine.dead_lettered(now, offset, true, retry_ms);
                    }
                    Err(e) => {
                        tracing::warn!(offset, error = %e, "dead-letter append failed; retrying");
                        self.engine.dead_lettered(now, offset, false, retry_ms);
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
        let sought = c.seek_epoch != self.cursor.seek_epoch;
        self.cursor = c;
        if sought {
            // A seek: start over from the new position.
            self.engine.reset();
            self.records.clear();
            self.ack_batch.clear();
            self.read_pos = self.cursor.committed;
            self.restore_parked();
        }
    }

    /// Tells the engine the keys the replicated position has parked.
    fn restore_parked(&mut self) {
        for (key, head) in &self.cursor.parked {
            if *head >= self.cursor.committed {
                self.engine.restore_parked(key.clone(), *head);
            }
        }
    }

    /// Replicates that a key parked at `head` (or, `None`, that it no longer is), in the
    /// order the engine decided.
    fn record_park(&mut self, key: Vec<u8>, head: Option<u64>) {
        let cmd = PartitionCommand::GroupPark {
            group: self.group.clone(),
            uid: self.uid,
            key,
            head,
        };
        if let Some(tx) = &self.park_tx
            && tx.send(cmd).is_err()
        {
            tracing::error!("the parked-key writer stopped");
        }
    }

    fn operate(&mut self, o: Operate) {
        let key_text = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
        let result = match &o.action {
            ParkedAction::Resume(k) => self
                .engine
                .resume(k)
                .map(|()| 1)
                .map_err(|r| (k.clone(), r)),
            ParkedAction::Skip(k) => self.engine.skip(k).map(|()| 1).map_err(|r| (k.clone(), r)),
            ParkedAction::ResumeAll => {
                let keys: Vec<Vec<u8>> = self.engine.parked().into_keys().collect();
                let mut n = 0u32;
                for k in keys {
                    if self.engine.resume(&k).is_ok() {
                        n += 1;
                    }
                }
                Ok(n)
            }
        };
        let result = result.map_err(|(k, r)| match r {
            engine::ParkRefusal::NotParked => BrokerError::NotParked(format!(
                "key '{}' of group '{}' is not parked in partition {}",
                key_text(&k),
                self.group,
                self.partition
            )),
            engine::ParkRefusal::Busy => BrokerError::Unavailable(format!(
                "key '{}': its head is being dead-lettered or not read yet; retry",
                key_text(&k)
            )),
        });
        tracing::info!(station = %self.station, group = %self.group, partition = self.partition, action = ?o.action, ok = result.is_ok(), "parked keys: operator action");
        self.carry_out();
        let _ = o.reply.send(result);
    }

    /// Fences the members the metadata no longer gives the partition to.
    fn on_metadata(&mut self, g: Option<&GroupMeta>) {
        let gone: Vec<(String, String)> = self
            .members
            .iter()
            .filter_map(|(member, a)| {
                let detail = match g {
                    None => "the group was deleted".to_string(),
                    Some(g) if g.uid != self.uid => "the group was re-created".to_string(),
                    Some(g) => check_owner(g, self.partition, member, a.epoch).err()?.1,
                };
                Some((member.clone(), detail))
            })
            .collect();
        for (member, detail) in gone {
            if let Some(a) = self.members.remove(&member) {
                let _ = a.events.send(Err(fenced(
                    &self.station,
                    &self.group,
                    self.partition,
                    detail,
                )));
            }
            self.engine.detach(&member);
            if self.members.is_empty() {
                self.detached_since = Instant::now();
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is no `at` (a disabled `select!` branch).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
