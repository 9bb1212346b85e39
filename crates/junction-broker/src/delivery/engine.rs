//! The delivery decisions of one partition to one consumer group, without I/O.
//!
//! The [`Engine`] is told what happens (a message was read, a member attached or left, an ack,
//! a nack, a timer, an ack write became durable, a dead letter was stored, an operator resumed
//! a key) and answers with [`Command`]s for the runtime to carry out: deliver a message to a
//! member, record an ack in the replicated cursor, append a dead letter, park or unpark a key,
//! fence a member. It never reads storage, never sends, never looks at a clock: `now` (in
//! milliseconds of any monotonic clock) comes with every call. The runtime owns the records
//! and the channels; the engine owns who gets what and when.
//!
//! ## Modes
//! - [`Mode::Partitioned`]: one member at a time receives the partition. A new subscription
//!   replaces (fences) the previous one, and what the previous one had in flight is delivered
//!   again at once.
//! - [`Mode::KeyShared`]: any number of members share the partition. Each key belongs to one
//!   member, chosen by rendezvous hashing over the attached members, so a join or a leave
//!   moves only the keys that must move. A key moves only when it has nothing in flight
//!   ("drain before move"): the old owner's deliveries are acked, nacked or expire first, so
//!   two members never work on the same key at once. Unkeyed messages go to the member with
//!   the most room.
//!
//! In both modes a key has at most `max_in_flight_per_key` messages in flight, taken from the
//! front of its unfinished messages in offset order; with the default of 1 the next message of
//! a key is delivered only once the previous one is finished. Each member has at most `limit`
//! messages unfinished, counting acks not yet durable (so what a leader failover can deliver
//! twice stays bounded).
//!
//! ## When deliveries run out
//! After `max_deliveries` deliveries without an ack, a message is dead-lettered
//! ([`OnExhausted::DeadLetter`]), or its key is parked ([`OnExhausted::Park`]): the key's
//! messages stay in order and wait while every other key flows, until an operator resumes the
//! key (its head is delivered again) or skips the head (dead-lettered, then the key resumes).
//! An unkeyed message has no key to park and is dead-lettered.
//!
//! ## Acks
//! An ack names the member, its epoch and the delivery attempt it answers. Anything else (an
//! ack from a member that no longer holds the message, or of an earlier attempt) is refused
//! with [`AckRefusal`] and changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// A message key.
pub type Key = Vec<u8>;

/// How a group's members share a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One member at a time (today's consumer groups).
    #[default]
    Partitioned,
    /// Any number of members; each key belongs to one of them.
    KeyShared,
}

/// What happens to a message whose deliveries are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExhausted {
    /// Append it to the dead-letter station and go on with its key.
    #[default]
    DeadLetter,
    /// Park its key: the key waits, in order, until resumed or skipped.
    Park,
}

/// The settings the engine decides by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    pub mode: Mode,
    /// How long a delivery may stay unacknowledged.
    pub ack_wait_ms: u64,
    /// Deliveries of one message before it is dead-lettered or its key parked.
    pub max_deliveries: u32,
    /// Messages of one key in flight at once (at least 1).
    pub max_in_flight_per_key: u32,
    pub on_exhausted: OnExhausted,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            mode: Mode::Partitioned,
            ack_wait_ms: 30_000,
            max_deliveries: 5,
            max_in_flight_per_key: 1,
            on_exhausted: OnExhausted::DeadLetter,
        }
    }
}

/// How much further than its window a dispatcher may read while nothing it holds can go.
pub const HOLD_GROWTH: usize = 4;
/// The most unfinished messages a dispatcher ever holds.
pub const MAX_HOLD: usize = 20_000;

/// How many unfinished messages a dispatcher may hold, `pending` of them held now and
/// `ready` of those deliverable: its `window`, or, while none of those held may go anywhere
/// (each waits behind its key's delivery, say to a member that crashed, until that expires),
/// up to [`HOLD_GROWTH`] windows (at most [`MAX_HOLD`]), so that the keys one member held up do
/// not hold up every other key of the partition. Without that, a full window of such keys'
/// messages stops the partition until their deliveries expire.
pub fn hold_limit(window: usize, pending: usize, ready: usize) -> usize {
    if ready == 0 && pending > 0 {
        (window * HOLD_GROWTH).min(MAX_HOLD).max(window)
    } else {
        window
    }
}

/// Why a message was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Its last delivery was nacked.
    Nacked,
    /// Its last delivery was not acked within `ack_wait`.
    AckWaitExpired,
    /// An operator skipped it (the head of a parked key).
    Skipped,
}

impl GiveUp {
    /// The reason written into the dead letter's headers.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Nacked => "nacked",
            GiveUp::AckWaitExpired => "ack-wait-expired",
            GiveUp::Skipped => "skipped",
        }
    }
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send the message at `offset` to `member` (its `attempt`-th delivery, from 1).
    Deliver {
        member: String,
        offset: u64,
        attempt: u32,
    },
    /// The message is finished: record it in the group's replicated cursor, then call
    /// [`Engine::acks_durable`].
    Ack { offset: u64 },
    /// Append the message to the dead-letter station, then call [`Engine::dead_lettered`].
    DeadLetter {
        offset: u64,
        attempts: u32,
        why: GiveUp,
    },
    /// Record (replicated) that `key` is parked at `offset`.
    Park {
        key: Key,
        offset: u64,
        attempts: u32,
        why: GiveUp,
    },
    /// Record (replicated) that `key` is no longer parked.
    Unpark { key: Key },
    /// End `member`'s subscription (at `epoch`): it was replaced.
    Fence {
        member: String,
        epoch: u64,
        reason: String,
    },
}

/// Why an ack, nack or progress report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckRefusal {
    #[error("offset {0} is not awaiting an ack (already finished, or never delivered)")]
    NotInFlight(u64),
    #[error("the subscription that received it was replaced or fenced; fetch again")]
    NotAttached,
    #[error(
        "offset {offset} is delivered to member '{holder}' (epoch {holder_epoch}), not to this one"
    )]
    NotYours {
        offset: u64,
        holder: String,
        holder_epoch: u64,
    },
    #[error(
        "offset {offset}: attempt {attempt} is stale, the current delivery is attempt {current}"
    )]
    OldAttempt {
        offset: u64,
        attempt: u32,
        current: u32,
    },
}

/// Why an operator's resume or skip was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParkRefusal {
    #[error("the key is not parked")]
    NotParked,
    #[error("the key's head is being dead-lettered already")]
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for its turn (or for a member).
    Ready,
    /// Out with a member.
    Delivered { epoch: u64, deadline: u64 },
    /// Redelivered after `until` (a nack's delay, or a failed dead-letter append).
    Delayed { until: u64 },
    /// The head of a parked key.
    Parked,
    /// Being appended to the dead-letter station.
    DeadLettering,
    /// The dead-letter append failed; tried again after `until`.
    DeadLetterRetry { until: u64, why: GiveUp },
}

#[derive(Debug, Clone)]
struct Entry {
    key: Option<Key>,
    attempts: u32,
    state: State,
    /// Why it is being dead-lettered.
    why: Option<GiveUp>,
    /// The member of the current (or last) delivery.
    member: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct KeyState {
    /// Unfinished offsets of the key, in order.
    queue: VecDeque<u64>,
    owner: Option<String>,
    in_flight: u32,
    /// The parked head, when parked.
    parked: Option<u64>,
}

#[derive(Debug, Clone)]
struct Member {
    epoch: u64,
    limit: u32,
    /// Delivered and not finished.
    in_flight: u32,
    /// Finished (acked) but the ack is not durable yet.
    undurable: u32,
    /// A pulling member: how many more it asked for (None: a streaming member, limited by
    /// `limit` alone).
    credits: Option<u32>,
}

impl Member {
    /// How many more it may take, with `shared` undurable acks of nobody's counted too.
    fn room(&self, shared: u32) -> u32 {
        let room = self
            .limit
            .saturating_sub(self.in_flight + self.undurable + shared);
        self.credits.map_or(room, |c| room.min(c))
    }
}

/// Delivery state of one (partition, group). See the module documentation.
#[derive(Debug, Clone)]
pub struct Engine {
    settings: EngineSettings,
    entries: BTreeMap<u64, Entry>,
    keys: HashMap<Key, KeyState>,
    /// Offsets that may be delivered now as far as their key is concerned (state Ready,
    /// within their key's in-flight window, key not parked).
    ready: BTreeSet<u64>,
    /// (when, offset): ack deadlines and delays.
    timers: BTreeSet<(u64, u64)>,
    members: BTreeMap<String, Member>,
    /// Finished offsets whose ack is not durable yet, with the member that acked them.
    undurable: HashMap<u64, Option<String>>,
    /// Of those, the ones of no member (dead letters, acks of members that left). In
    /// partitioned mode they count against the member's room, as the member's own do.
    orphans: u32,
    /// Keys parked before their messages were read (restored after a failover).
    parked_ahead: HashMap<Key, u64>,
    out: Vec<Command>,
}

impl Engine {
    /// An engine with nothing read and nobody attached.
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            settings,
            entries: BTreeMap::new(),
            keys: HashMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            members: BTreeMap::new(),
            undurable: HashMap::new(),
            orphans: 0,
            parked_ahead: HashMap::new(),
            out: Vec::new(),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The commands decided since the last call, in order.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.out)
    }

    /// Messages read and not finished.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Messages that may be delivered now as far as their keys are concerned.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// How many more messages may be read in, for a dispatcher whose window is `window`
    /// ([`hold_limit`] of what is held now).
    pub fn room(&self, window: usize) -> usize {
        hold_limit(window, self.pending(), self.ready()).saturating_sub(self.pending())
    }

    /// How many times the message at `offset` was delivered (None: not held).
    pub fn attempts(&self, offset: u64) -> Option<u32> {
        self.entries.get(&offset).map(|e| e.attempts)
    }

    /// Deliveries out with members.
    pub fn in_flight(&self) -> u32 {
        self.members.values().map(|m| m.in_flight).sum()
    }

    /// The parked keys and their heads.
    pub fn parked(&self) -> BTreeMap<Key, u64> {
        let mut out: BTreeMap<Key, u64> = self.parked_ahead.clone().into_iter().collect();
        for (k, s) in &self.keys {
            if let Some(o) = s.parked {
                out.insert(k.clone(), o);
            }
        }
        out
    }

    /// The earliest timer, for the runtime to wake at.
    pub fn next_wake(&self) -> Option<u64> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// A key known to be parked at `offset` (from the replicated state), before its messages
    /// are read again.
    pub fn restore_parked(&mut self, key: Key, offset: u64) {
        self.parked_ahead.insert(key, offset);
    }

    /// A message read from the partition, in offset order.
    pub fn read(&mut self, offset: u64, key: Option<Key>) {
        if self.entries.contains_key(&offset) {
            return;
        }
        let mut state = State::Ready;
        if let Some(k) = &key {
            let ks = self.keys.entry(k.clone()).or_default();
            ks.queue.push_back(offset);
            if self.parked_ahead.get(k) == Some(&offset) {
                self.parked_ahead.remove(k);
                ks.parked = Some(offset);
                state = State::Parked;
            }
        }
        self.entries.insert(
            offset,
            Entry {
                key: key.clone(),
                attempts: 0,
                state,
                why: None,
                member: None,
            },
        );
        if state == State::Ready && self.eligible(offset, key.as_ref()) {
            self.ready.insert(offset);
        }
    }

    /// A member subscribed at `epoch`, taking at most `limit` unfinished messages.
    pub fn attach(&mut self, member: &str, epoch: u64, limit: u32) {
        let replaced: Vec<(String, u64)> = match self.settings.mode {
            Mode::Partitioned => self
                .members
                .iter()
                .map(|(m, s)| (m.clone(), s.epoch))
                .collect(),
            Mode::KeyShared => self
                .members
                .get(member)
                .map(|s| vec![(member.to_owned(), s.epoch)])
                .unwrap_or_default(),
        };
        for (old, old_epoch) in replaced {
            self.out.push(Command::Fence {
                member: old.clone(),
                epoch: old_epoch,
                reason: format!("replaced by a subscription of member '{member}' at epoch {epoch}"),
            });
            self.remove_member(&old);
        }
        self.members.insert(
            member.to_owned(),
            Member {
                epoch,
                limit: limit.max(1),
                in_flight: 0,
                undurable: 0,
                credits: None,
            },
        );
    }

    /// Makes `member` (at `epoch`) a pulling member that may take `credits` more messages
    /// (within its limit), or a streaming one again (`None`). Ignored for a member that is
    /// not attached at that epoch.
    pub fn grant(&mut self, member: &str, epoch: u64, credits: Option<u32>) {
        if let Some(m) = self.members.get_mut(member)
            && m.epoch == epoch
        {
            m.credits = credits;
        }
    }

    /// A member's subscription ended.
    pub fn detach(&mut self, member: &str) {
        self.remove_member(member);
    }

    fn remove_member(&mut self, member: &str) {
        let Some(gone) = self.members.remove(member) else {
            return;
        };
        let mine: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.member.as_deref() == Some(member) && matches!(e.state, State::Delivered { .. })
            })
            .map(|(o, _)| *o)
            .collect();
        match self.settings.mode {
            // The only member is gone: nobody else can be working on these.
            Mode::Partitioned => {
                for o in mine {
                    self.undeliver(o);
                    self.make_ready(o);
                }
            }
            // Drain before move: the deliveries stay out until they expire, so the key does
            // not reach another member while this one may still be working on it. They no
            // longer count against anyone's room.
            Mode::KeyShared => {
                for o in &mine {
                    if let Some(e) = self.entries.get_mut(o) {
                        e.member = None;
                    }
                }
            }
        }
        for o in self.undurable.values_mut() {
            if o.as_deref() == Some(member) {
                *o = None;
            }
        }
        self.orphans += gone.undurable;
    }

    /// An ack of `attempt` of `offset` from `member` at `epoch`.
    pub fn ack(
        &mut self,
        member: &str,
        epoch: u64,
        offset: u64,
        attempt: u32,
    ) -> Result<(), AckRefusal> {
        self.check_holder(member, epoch, offset, attempt)?;
        self.undeliver(offset);
        self.finish(offset, Some(member.to_owned()));
        Ok(())
    }

    /// A nack: deliver again after `delay_ms` (or give up when deliveries are used up).
    pub fn nack(
        &mut self,
        now: u64,
        member: &str,
        epoch: u64,
        offset: u64,
        attempt: u32,
        delay_ms: u64,
    ) -> Result<(), AckRefusal> {
        self.check_holder(member, epoch, offset, attempt)?;
        self.undeliver(offset);
        self.after_failure(now, offset, delay_ms, GiveUp::Nacked);
        Ok(())
    }

    /// The member is still working on it: the ack deadline starts over.
    pub fn in_progress(
        &mut self,
        now: u64,
        member: &str,
        epoch: u64,
        offset: u64,
        attempt: u32,
    ) -> Result<(), AckRefusal> {
        self.check_holder(member, epoch, offset, attempt)?;
        let new = now + self.settings.ack_wait_ms;
        if let Some(e) = self.entries.get_mut(&offset)
            && let State::Delivered { epoch, deadline } = e.state
        {
            self.timers.remove(&(deadline, offset));
            self.timers.insert((new, offset));
            e.state = State::Delivered {
                epoch,
                deadline: new,
            };
        }
        Ok(())
    }

    fn check_holder(
        &self,
        member: &str,
        epoch: u64,
        offset: u64,
        attempt: u32,
    ) -> Result<(), AckRefusal> {
        let Some(e) = self.entries.get(&offset) else {
            return Err(AckRefusal::NotInFlight(offset));
        };
        let State::Delivered {
            epoch: held_epoch, ..
        } = e.state
        else {
            return Err(AckRefusal::NotInFlight(offset));
        };
        if e.member.as_deref() != Some(member) || held_epoch != epoch {
            return Err(AckRefusal::NotYours {
                offset,
                holder: e.member.clone().unwrap_or_default(),
                holder_epoch: held_epoch,
            });
        }
        if attempt != e.attempts {
            return Err(AckRefusal::OldAttempt {
                offset,
                attempt,
                current: e.attempts,
            });
        }
        Ok(())
    }

    /// Acks recorded in the replicated cursor: they stop counting against their member.
    pub fn acks_durable(&mut self, offsets: &[u64]) {
        for o in offsets {
            match self.undurable.remove(o) {
                Some(Some(m)) => {
                    if let Some(s) = self.members.get_mut(&m) {
                        s.undurable = s.undurable.saturating_sub(1);
                    }
                }
                Some(None) => self.orphans = self.orphans.saturating_sub(1),
                None => {}
            }
        }
    }

    /// The dead-letter append of `offset` ended.
    pub fn dead_lettered(&mut self, now: u64, offset: u64, ok: bool, retry_after_ms: u64) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        if e.state != State::DeadLettering {
            return;
        }
        if ok {
            let key = e.key.clone();
            let was_parked = key
                .as_ref()
                .and_then(|k| self.keys.get(k))
                .is_some_and(|s| s.parked == Some(offset));
            self.finish(offset, None);
            // A skipped head is stored: its key resumes.
            if let (true, Some(k)) = (was_parked, key) {
                self.unpark(&k);
            }
        } else {
            let until = now + retry_after_ms;
            e.state = State::DeadLetterRetry {
                until,
                why: e.why.unwrap_or(GiveUp::AckWaitExpired),
            };
            self.timers.insert((until, offset));
        }
    }

    /// Time passed: expired deliveries and ended delays.
    pub fn tick(&mut self, now: u64) {
        while let Some((t, o)) = self.timers.first().copied() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, o));
            let Some(state) = self.entries.get(&o).map(|e| e.state) else {
                continue;
            };
            match state {
                State::Delivered { deadline, .. } if deadline == t => {
                    self.undeliver(o);
                    self.after_failure(now, o, 0, GiveUp::AckWaitExpired);
                }
                State::Delayed { until } if until == t => self.make_ready(o),
                State::DeadLetterRetry { until, why } if until == t => self.dead_letter(o, why),
                _ => {}
            }
        }
    }

    /// Operator: deliver a parked key's head again (with a fresh count of deliveries).
    pub fn resume(&mut self, key: &[u8]) -> Result<(), ParkRefusal> {
        if self.parked_ahead.remove(key).is_some() {
            self.out.push(Command::Unpark { key: key.to_vec() });
            return Ok(());
        }
        let Some(head) = self.keys.get(key).and_then(|s| s.parked) else {
            return Err(ParkRefusal::NotParked);
        };
        if self.entries.get(&head).map(|e| e.state) != Some(State::Parked) {
            return Err(ParkRefusal::Busy);
        }
        self.unpark(key);
        Ok(())
    }

    /// Ends a key's parking: its parked messages go out again, each with a fresh count.
    fn unpark(&mut self, key: &[u8]) {
        let Some(s) = self.keys.get_mut(key) else {
            return;
        };
        s.parked = None;
        let queue: Vec<u64> = s.queue.iter().copied().collect();
        for o in queue {
            if let Some(e) = self.entries.get_mut(&o)
                && e.state == State::Parked
            {
                e.attempts = 0;
                e.state = State::Ready;
            }
        }
        self.out.push(Command::Unpark { key: key.to_vec() });
        if s_is_idle(self.keys.get(key)) {
            self.keys.remove(key);
        } else {
            self.refresh_key(key);
        }
    }

    /// Operator: dead-letter a parked key's head; the key resumes once that is stored.
    pub fn skip(&mut self, key: &[u8]) -> Result<(), ParkRefusal> {
        let Some(head) = self.keys.get(key).and_then(|s| s.parked) else {
            return Err(ParkRefusal::NotParked);
        };
        match self.entries.get(&head).map(|e| e.state) {
            Some(State::Parked) => {
                self.give_up(head, GiveUp::Skipped);
                Ok(())
            }
            _ => Err(ParkRefusal::Busy),
        }
    }

    /// The cursor moved (a seek): forget what was read; deliveries out are void. Members
    /// stay attached.
    pub fn reset(&mut self) {
        self.parked_ahead.clear();
        self.entries.clear();
        self.keys.clear();
        self.ready.clear();
        self.timers.clear();
        self.undurable.clear();
        self.orphans = 0;
        for m in self.members.values_mut() {
            m.in_flight = 0;
            m.undurable = 0;
        }
    }

    /// Undurable acks of nobody that count against every member's room.
    fn shared(&self) -> u32 {
        match self.settings.mode {
            Mode::Partitioned => self.orphans,
            Mode::KeyShared => 0,
        }
    }

    /// Hands out ready messages while members have room.
    pub fn dispatch(&mut self, now: u64) {
        if self.members.is_empty() || self.ready.is_empty() {
            return;
        }
        // Walks the ready set in offset order without copying it; delivering removes the
        // offset, skipping leaves it, and `from` moves past it either way.
        let mut from = 0;
        while let Some(offset) = self.ready.range(from..).next().copied() {
            from = offset + 1;
            let shared = self.shared();
            if self.members.values().all(|m| m.room(shared) == 0) {
                break;
            }
            let Some(key) = self.entries.get(&offset).map(|e| e.key.clone()) else {
                self.ready.remove(&offset);
                continue;
            };
            let Some(member) = self.target(key.as_ref()) else {
                continue;
            };
            self.deliver(now, offset, &member);
        }
    }

    /// Who gets a message of `key` now (None: nobody may, for now).
    fn target(&mut self, key: Option<&Key>) -> Option<String> {
        let shared = self.shared();
        let has_room = |m: &Member| m.room(shared) > 0;
        match (self.settings.mode, key) {
            (Mode::Partitioned, _) => self
                .members
                .iter()
                .find(|(_, m)| has_room(m))
                .map(|(n, _)| n.clone()),
            (Mode::KeyShared, None) => self
                .members
                .iter()
                .filter(|(_, m)| has_room(m))
                .max_by_key(|(_, m)| m.room(shared))
                .map(|(n, _)| n.clone()),
            (Mode::KeyShared, Some(k)) => {
                let want = rendezvous(k, self.members.keys())?;
                let s = self.keys.get_mut(k)?;
                let owner = match &s.owner {
                    // Drain before move: while the key has anything in flight it stays where
                    // it is (even with an owner that left: its deliveries must expire first).
                    Some(o) if s.in_flight > 0 => o.clone(),
                    _ => {
                        s.owner = Some(want.clone());
                        want
                    }
                };
                self.members
                    .get(&owner)
                    .filter(|m| has_room(m))
                    .map(|_| owner)
            }
        }
    }

    fn deliver(&mut self, now: u64, offset: u64, member: &str) {
        let Some(m) = self.members.get_mut(member) else {
            return;
        };
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        let deadline = now + self.settings.ack_wait_ms;
        e.attempts += 1;
        e.state = State::Delivered {
            epoch: m.epoch,
            deadline,
        };
        e.member = Some(member.to_owned());
        m.in_flight += 1;
        if let Some(c) = &mut m.credits {
            *c = c.saturating_sub(1);
        }
        self.ready.remove(&offset);
        self.timers.insert((deadline, offset));
        if let Some(k) = &e.key
            && let Some(s) = self.keys.get_mut(k)
        {
            s.in_flight += 1;
            if s.owner.is_none() {
                s.owner = Some(member.to_owned());
            }
        }
        let attempt = e.attempts;
        self.out.push(Command::Deliver {
            member: member.to_owned(),
            offset,
            attempt,
        });
        if let Some(k) = self.entries.get(&offset).and_then(|e| e.key.clone()) {
            self.refresh_key(&k);
        }
    }

    /// Takes a delivered message back from its member (before an ack, a nack or an expiry).
    fn undeliver(&mut self, offset: u64) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        let State::Delivered { deadline, .. } = e.state else {
            return;
        };
        self.timers.remove(&(deadline, offset));
        e.state = State::Ready;
        if let Some(m) = e.member.as_ref().and_then(|m| self.members.get_mut(m)) {
            m.in_flight = m.in_flight.saturating_sub(1);
        }
        if let Some(k) = &e.key
            && let Some(s) = self.keys.get_mut(k)
        {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    /// A delivery ended without an ack.
    fn after_failure(&mut self, now: u64, offset: u64, delay_ms: u64, why: GiveUp) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        if e.attempts >= self.settings.max_deliveries {
            self.give_up(offset, why);
        } else if delay_ms == 0 {
            self.make_ready(offset);
        } else {
            let until = now + delay_ms;
            e.state = State::Delayed { until };
            self.timers.insert((until, offset));
            self.ready.remove(&offset);
            if let Some(k) = e.key.clone() {
                self.refresh_key(&k);
            }
        }
    }

    /// Deliveries are used up (or an operator skipped it): park the key or dead-letter.
    fn give_up(&mut self, offset: u64, why: GiveUp) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        self.ready.remove(&offset);
        let park = why != GiveUp::Skipped
            && self.settings.on_exhausted == OnExhausted::Park
            && e.key.is_some();
        if park {
            e.state = State::Parked;
            let attempts = e.attempts;
            if let Some(k) = e.key.clone() {
                // With several of a key in flight, more than one may run out: the key is
                // parked at the earliest.
                if let Some(s) = self.keys.get_mut(&k)
                    && s.parked.is_none_or(|head| offset < head)
                {
                    s.parked = Some(offset);
                    self.out.push(Command::Park {
                        key: k.clone(),
                        offset,
                        attempts,
                        why,
                    });
                }
                self.refresh_key(&k);
            }
        } else {
            self.dead_letter(offset, why);
        }
    }

    fn dead_letter(&mut self, offset: u64, why: GiveUp) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        e.state = State::DeadLettering;
        e.why = Some(why);
        self.out.push(Command::DeadLetter {
            offset,
            attempts: e.attempts,
            why,
        });
    }

    fn make_ready(&mut self, offset: u64) {
        let Some(e) = self.entries.get_mut(&offset) else {
            return;
        };
        if let State::Delayed { until } = e.state {
            self.timers.remove(&(until, offset));
        }
        e.state = State::Ready;
        let key = e.key.clone();
        if self.eligible(offset, key.as_ref()) {
            self.ready.insert(offset);
        }
        if let Some(k) = key {
            self.refresh_key(&k);
        }
    }

    /// Whether `offset` of `key` is within its key's in-flight window and the key is free.
    fn eligible(&self, offset: u64, key: Option<&Key>) -> bool {
        let Some(k) = key else {
            return true;
        };
        let Some(s) = self.keys.get(k) else {
            return true;
        };
        if s.parked.is_some() {
            return false;
        }
        let window = self.settings.max_in_flight_per_key.max(1) as usize;
        s.queue.iter().take(window).any(|o| *o == offset)
    }

    /// Recomputes which of a key's messages are ready to go. Only the key's first
    /// `max_in_flight_per_key` messages can be: a key's queue only loses messages, so one
    /// never leaves that window once in it, and the rest of a long backlog is not looked at.
    fn refresh_key(&mut self, key: &[u8]) {
        let Some(s) = self.keys.get(key) else {
            return;
        };
        let window = self.settings.max_in_flight_per_key.max(1) as usize;
        let parked = s.parked.is_some();
        for o in s.queue.iter().take(window) {
            let ready = self.entries.get(o).is_some_and(|e| e.state == State::Ready);
            if ready && !parked {
                self.ready.insert(*o);
            } else {
                self.ready.remove(o);
            }
        }
    }

    /// A message is done (acked, or stored as a dead letter).
    fn finish(&mut self, offset: u64, by: Option<String>) {
        let Some(e) = self.entries.remove(&offset) else {
            return;
        };
        self.ready.remove(&offset);
        if let State::Delayed { until } = e.state {
            self.timers.remove(&(until, offset));
        }
        if let Some(k) = &e.key {
            let empty = match self.keys.get_mut(k) {
                Some(s) => {
                    // Usually the head: found at once.
                    if let Some(i) = s.queue.iter().position(|o| *o == offset) {
                        s.queue.remove(i);
                    }
                    s.queue.is_empty() && s.in_flight == 0 && s.parked.is_none()
                }
                None => false,
            };
            if empty {
                self.keys.remove(k);
            } else {
                self.refresh_key(k);
            }
        }
        let by = by.filter(|m| self.members.contains_key(m));
        match by.as_ref().and_then(|m| self.members.get_mut(m)) {
            Some(m) => m.undurable += 1,
            None => self.orphans += 1,
        }
        self.undurable.insert(offset, by);
        self.out.push(Command::Ack { offset });
    }
}

/// Whether a key has nothing left to track.
fn s_is_idle(s: Option<&KeyState>) -> bool {
    s.is_some_and(|s| s.queue.is_empty() && s.in_flight == 0 && s.parked.is_none())
}

/// The member a key belongs to: the highest hash of (key, member) wins, so adding or
/// removing a member moves only the keys that member wins or held.
fn rendezvous<'a>(key: &[u8], members: impl Iterator<Item = &'a String>) -> Option<String> {
    members
        .max_by_key(|m| (fnv1a(key, m.as_bytes()), m.as_str()))
        .cloned()
}

/// FNV-1a over `a`, a separator and `b`, finished with a 64-bit mix (stable across
/// versions and platforms: key ownership must not change with a rebuild).
fn fnv1a(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.iter().chain(std::iter::once(&0xff)).chain(b) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::*;

    fn key(i: u32) -> Option<Key> {
        Some(format!("k{i}").into_bytes())
    }

    fn shared(max_deliveries: u32, on_exhausted: OnExhausted) -> Engine {
        Engine::new(EngineSettings {
            mode: Mode::KeyShared,
            ack_wait_ms: 1_000,
            max_deliveries,
            max_in_flight_per_key: 1,
            on_exhausted,
        })
    }

    /// (member, offset, attempt) of every delivery among `cmds`.
    fn deliveries(cmds: &[Command]) -> Vec<(String, u64, u32)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Deliver {
                    member,
                    offset,
                    attempt,
                } => Some((member.clone(), *offset, *attempt)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_hold_limit_grows_only_while_nothing_held_can_go() {
        assert_eq!(hold_limit(1000, 0, 0), 1000, "nothing held: the window");
        assert_eq!(
            hold_limit(1000, 1000, 3),
            1000,
            "something can go: the window"
        );
        assert_eq!(hold_limit(1000, 1000, 0), 4000);
        assert_eq!(hold_limit(10_000, 10_000, 0), MAX_HOLD);
        assert_eq!(
            hold_limit(MAX_HOLD, 5, 0),
            MAX_HOLD,
            "never below the window"
        );
    }

    /// A member that crashed holds the heads of a few keys until their deliveries expire;
    /// the window is full of those keys' later messages. Reading on by the hold limit lets the
    /// other keys reach the member that is left at once.
    #[test]
    fn keys_held_up_by_a_crashed_member_do_not_hold_up_the_others() {
        let mut e = shared(10, OnExhausted::DeadLetter);
        let window = 8;
        e.attach("a", 1, 100);
        e.attach("b", 1, 100);
        // Keys 1 and 2 only, until the window is full.
        let mut next = 0u64;
        while e.pending() < window {
            e.read(next, key(1 + (next % 2) as u32));
            next += 1;
        }
        let first = step(&mut e, 0);
        assert_eq!(deliveries(&first).len(), 2, "each key's head goes out");
        // Both heads went to whoever owns them; both owners crash.
        e.detach("a");
        e.detach("b");
        e.attach("c", 1, 100);
        assert!(
            deliveries(&step(&mut e, 1)).is_empty(),
            "held until the deliveries expire"
        );
        assert_eq!((e.pending(), e.ready()), (window, 0));
        // The window's rule alone would read nothing more; the hold limit reads on.
        let limit = hold_limit(window, e.pending(), e.ready());
        assert!(limit > window);
        while e.pending() < limit {
            e.read(next, key(3 + (next % 5) as u32));
            next += 1;
        }
        assert!(e.ready() > 0);
        assert_eq!(
            hold_limit(window, e.pending(), e.ready()),
            window,
            "while something can go, reading stops at the window"
        );
        let more = deliveries(&step(&mut e, 2));
        assert_eq!(more.len(), 5, "every other key's head goes to c: {more:?}");
        assert!(more.iter().all(|(m, _, _)| m == "c"));
    }

    fn step(e: &mut Engine, now: u64) -> Vec<Command> {
        e.dispatch(now);
        e.take_commands()
    }

    #[test]
    fn partitioned_keeps_key_order_and_the_limit() {
        let mut e = Engine::new(EngineSettings::default());
        for (o, k) in [(0, 1), (1, 1), (2, 2), (3, 1)] {
            e.read(o, key(k));
        }
        e.read(4, None);
        e.attach("m", 1, 10);
        let d = deliveries(&step(&mut e, 0));
        // Key 1's second and third wait for its first; key 2 and the unkeyed one go.
        let offsets: Vec<u64> = d.iter().map(|x| x.1).collect();
        assert_eq!(offsets, vec![0, 2, 4]);
        e.ack("m", 1, 0, 1).unwrap();
        let cmds = step(&mut e, 1);
        assert!(cmds.contains(&Command::Ack { offset: 0 }));
        assert_eq!(deliveries(&cmds), vec![("m".to_owned(), 1, 1)]);

        // The member limit counts acks that are not durable yet.
        let mut e = Engine::new(EngineSettings::default());
        for o in 0..5 {
            e.read(o, None);
        }
        e.attach("m", 1, 2);
        assert_eq!(deliveries(&step(&mut e, 0)).len(), 2);
        e.ack("m", 1, 0, 1).unwrap();
        assert!(
            deliveries(&step(&mut e, 0)).is_empty(),
            "the ack is not durable yet"
        );
        e.acks_durable(&[0]);
        assert_eq!(deliveries(&step(&mut e, 0)).len(), 1);
    }

    #[test]
    fn a_pulling_member_takes_only_what_it_asked_for() {
        let mut e = shared(5, OnExhausted::DeadLetter);
        for o in 0..10 {
            e.read(o, key(o as u32));
        }
        e.attach("pull", 1, 100);
        e.grant("pull", 1, Some(0));
        assert!(
            deliveries(&step(&mut e, 0)).is_empty(),
            "no credit, nothing out"
        );
        e.grant("pull", 1, Some(3));
        assert_eq!(deliveries(&step(&mut e, 0)).len(), 3);
        // Acks free room under the limit but give no credit.
        e.ack("pull", 1, 0, 1).unwrap();
        e.acks_durable(&[0]);
        assert!(deliveries(&step(&mut e, 1)).is_empty());
        // A grant at another epoch is not this subscription's.
        e.grant("pull", 2, Some(5));
        assert!(deliveries(&step(&mut e, 1)).is_empty());
        // Credit stays within the limit; a streaming member again takes up to its limit.
        e.grant("pull", 1, None);
        assert_eq!(deliveries(&step(&mut e, 2)).len(), 7);
    }

    #[test]
    fn partitioned_replaces_the_member_and_redelivers_at_once() {
        let mut e = Engine::new(EngineSettings::default());
        e.read(0, key(1));
        e.attach("a", 1, 10);
        assert_eq!(deliveries(&step(&mut e, 0)), vec![("a".to_owned(), 0, 1)]);
        e.attach("b", 2, 10);
        let cmds = step(&mut e, 5);
        assert!(matches!(&cmds[0], Command::Fence { member, epoch: 1, .. } if member == "a"));
        assert_eq!(deliveries(&cmds), vec![("b".to_owned(), 0, 2)]);
        // The replaced member's late ack changes nothing.
        assert!(matches!(
            e.ack("a", 1, 0, 1),
            Err(AckRefusal::NotYours { .. })
        ));
        assert_eq!(e.in_flight(), 1);
    }

    #[test]
    fn key_shared_spreads_keys_and_keeps_each_with_one_member() {
        let mut e = shared(5, OnExhausted::DeadLetter);
        for m in ["a", "b", "c", "d"] {
            e.attach(m, 1, 1_000);
        }
        for o in 0..400u64 {
            e.read(o, key((o % 100) as u32));
        }
        let d = deliveries(&step(&mut e, 0));
        // One message per key (the first 100), spread over every member.
        assert_eq!(d.len(), 100);
        let by_member: HashSet<&str> = d.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(by_member.len(), 4, "{by_member:?}");
        let owner: HashMap<u64, String> = d.iter().map(|x| (x.1 % 100, x.0.clone())).collect();
        // Acking in any order keeps each key with its member.
        for round in 0..3u64 {
            for (m, o, a) in &d {
                let o = o + round * 100;
                e.ack(m, 1, o, *a).unwrap();
            }
            e.acks_durable(&(0..400).collect::<Vec<_>>());
            let next = deliveries(&step(&mut e, 1));
            assert_eq!(next.len(), 100);
            for (m, o, _) in &next {
                assert_eq!(&owner[&(o % 100)], m, "key {} moved", o % 100);
                assert_eq!(o / 100, round + 1);
            }
        }
    }

    #[test]
    fn a_key_moves_to_a_new_member_only_when_drained() {
        let mut e = shared(5, OnExhausted::DeadLetter);
        e.attach("a", 1, 1_000);
        for o in 0..200u64 {
            e.read(o, key((o % 100) as u32));
        }
        let first = deliveries(&step(&mut e, 0));
        assert_eq!(first.len(), 100);
        e.attach("b", 1, 1_000);
        // Nothing new may go anywhere: every key has its first message in flight with a.
        assert!(deliveries(&step(&mut e, 1)).is_empty());
        for (m, o, a) in &first {
            e.ack(m, 1, *o, *a).unwrap();
        }
        e.acks_durable(&(0..100).collect::<Vec<_>>());
        let second = deliveries(&step(&mut e, 2));
        assert_eq!(second.len(), 100);
        let moved = second.iter().filter(|x| x.0 == "b").count();
        // Rendezvous hashing gives b about half the keys.
        assert!((25..=75).contains(&moved), "{moved} keys moved to b");
    }

    #[test]
    fn a_member_that_leaves_key_shared_holds_its_keys_until_they_expire() {
        let mut e = shared(5, OnExhausted::DeadLetter);
        e.attach("a", 1, 10);
        e.attach("b", 1, 10);
        e.read(0, key(7));
        e.read(1, key(7));
        let d = deliveries(&step(&mut e, 0));
        let holder = d[0].0.clone();
        let other = if holder == "a" { "b" } else { "a" };
        e.detach(&holder);
        // Not before the delivery expires: the member may still be working on it.
        assert!(deliveries(&step(&mut e, 999)).is_empty());
        e.tick(1_000);
        assert_eq!(
            deliveries(&step(&mut e, 1_000)),
            vec![(other.to_owned(), 0, 2)]
        );
    }

    #[test]
    fn stale_acks_are_refused_and_change_nothing() {
        let mut e = shared(5, OnExhausted::DeadLetter);
        e.attach("a", 1, 10);
        e.read(0, key(1));
        let d = deliveries(&step(&mut e, 0));
        assert_eq!(d, vec![("a".to_owned(), 0, 1)]);
        e.tick(1_000); // expired: attempt 2 goes out
        let d = deliveries(&step(&mut e, 1_000));
        assert_eq!(d, vec![("a".to_owned(), 0, 2)]);
        assert_eq!(
            e.ack("a", 1, 0, 1),
            Err(AckRefusal::OldAttempt {
                offset: 0,
                attempt: 1,
                current: 2
            })
        );
        assert!(matches!(
            e.ack("b", 1, 0, 2),
            Err(AckRefusal::NotYours { .. })
        ));
        assert!(matches!(
            e.ack("a", 2, 0, 2),
            Err(AckRefusal::NotYours { .. })
        ));
        assert_eq!(e.ack("a", 1, 9, 1), Err(AckRefusal::NotInFlight(9)));
        assert_eq!(e.in_flight(), 1);
        assert!(e.take_commands().is_empty());
        e.ack("a", 1, 0, 2).unwrap();
        assert_eq!(e.ack("a", 1, 0, 2), Err(AckRefusal::NotInFlight(0)));
    }

    #[test]
    fn used_up_deliveries_dead_letter_and_the_key_goes_on() {
        let mut e = shared(2, OnExhausted::DeadLetter);
        e.attach("a", 1, 10);
        e.read(0, key(1));
        e.read(1, key(1));
        step(&mut e, 0);
        e.nack(0, "a", 1, 0, 1, 0).unwrap();
        assert_eq!(deliveries(&step(&mut e, 0)), vec![("a".to_owned(), 0, 2)]);
        e.nack(1, "a", 1, 0, 2, 0).unwrap();
        let cmds = step(&mut e, 1);
        assert_eq!(
            cmds,
            vec![Command::DeadLetter {
                offset: 0,
                attempts: 2,
                why: GiveUp::Nacked
            }]
        );
        // A failed append is retried after the delay; the key waits meanwhile.
        e.dead_lettered(2, 0, false, 500);
        assert!(step(&mut e, 3).is_empty());
        e.tick(502);
        assert_eq!(
            e.take_commands(),
            vec![Command::DeadLetter {
                offset: 0,
                attempts: 2,
                why: GiveUp::Nacked
            }]
        );
        e.dead_lettered(503, 0, true, 500);
        let cmds = step(&mut e, 503);
        assert!(cmds.contains(&Command::Ack { offset: 0 }));
        assert_eq!(deliveries(&cmds), vec![("a".to_owned(), 1, 1)]);
    }

    #[test]
    fn a_poison_key_parks_while_the_others_flow_then_resumes_or_skips() {
        let mut e = shared(2, OnExhausted::Park);
        e.attach("a", 1, 100);
        for o in 0..6u64 {
            e.read(o, key((o % 2) as u32)); // key 0: 0, 2, 4; key 1: 1, 3, 5
        }
        step(&mut e, 0);
        let mut parked = None;
        for now in [1_000, 2_000] {
            e.tick(now); // offset 0 expires twice
            let cmds = step(&mut e, now);
            for c in &cmds {
                if let Command::Park { key, offset, .. } = c {
                    parked = Some((key.clone(), *offset));
                }
            }
            for (m, o, a) in deliveries(&cmds) {
                if o % 2 == 1 {
                    e.ack(&m, 1, o, a).unwrap();
                }
            }
        }
        // Key 1 flows to the end while key 0 is parked at offset 0.
        for _ in 0..4 {
            let cmds = step(&mut e, 2_001);
            for c in &cmds {
                if let Command::Park { key, offset, .. } = c {
                    parked = Some((key.clone(), *offset));
                }
            }
            for (m, o, a) in deliveries(&cmds) {
                assert_eq!(o % 2, 1, "key 0 is parked, offset {o} went out");
                e.ack(&m, 1, o, a).unwrap();
            }
            e.acks_durable(&[1, 3, 5]);
        }
        assert_eq!(parked, Some((b"k0".to_vec(), 0)));
        assert_eq!(e.parked(), BTreeMap::from([(b"k0".to_vec(), 0)]));
        assert_eq!(e.pending(), 3);
        assert_eq!(e.skip(b"k1"), Err(ParkRefusal::NotParked));
        // Resume: the head goes out again with a fresh count.
        e.resume(b"k0").unwrap();
        let cmds = step(&mut e, 2_002);
        assert!(cmds.contains(&Command::Unpark {
            key: b"k0".to_vec()
        }));
        assert_eq!(deliveries(&cmds), vec![("a".to_owned(), 0, 1)]);
        // It fails again and parks again; skip dead-letters it and the key resumes.
        e.nack(2_003, "a", 1, 0, 1, 0).unwrap();
        step(&mut e, 2_003);
        e.nack(2_004, "a", 1, 0, 2, 0).unwrap();
        let cmds = step(&mut e, 2_004);
        assert!(matches!(cmds.last(), Some(Command::Park { offset: 0, .. })));
        e.skip(b"k0").unwrap();
        assert_eq!(e.skip(b"k0"), Err(ParkRefusal::Busy));
        assert_eq!(
            e.take_commands(),
            vec![Command::DeadLetter {
                offset: 0,
                attempts: 2,
                why: GiveUp::Skipped
            }]
        );
        e.dead_lettered(2_005, 0, true, 100);
        let cmds = step(&mut e, 2_005);
        assert!(cmds.contains(&Command::Unpark {
            key: b"k0".to_vec()
        }));
        assert_eq!(deliveries(&cmds), vec![("a".to_owned(), 2, 1)]);
        assert!(e.parked().is_empty());
    }

    #[test]
    fn a_key_parked_before_a_failover_stays_parked() {
        let mut e = shared(2, OnExhausted::Park);
        e.restore_parked(b"k3".to_vec(), 10);
        e.attach("a", 1, 100);
        e.read(10, key(3));
        e.read(11, key(3));
        e.read(12, key(4));
        assert_eq!(deliveries(&step(&mut e, 0)), vec![("a".to_owned(), 12, 1)]);
        assert_eq!(e.parked(), BTreeMap::from([(b"k3".to_vec(), 10)]));
        e.resume(b"k3").unwrap();
        assert_eq!(deliveries(&step(&mut e, 1)), vec![("a".to_owned(), 10, 1)]);
    }

    /// What the model test remembers about deliveries it has seen.
    #[derive(Default)]
    struct Seen {
        /// How often each kind of command came (coverage of the run).
        counts: BTreeMap<&'static str, u64>,
        /// (member, epoch, attempt) of each offset's live delivery.
        out: BTreeMap<u64, (String, u64, u32)>,
        first_delivered: HashMap<u64, ()>,
        last_first_of_key: HashMap<Key, u64>,
        acked: HashSet<u64>,
        undurable: Vec<u64>,
        dead_lettering: Vec<u64>,
        parked: HashSet<Key>,
    }

    fn absorb(
        cmds: Vec<Command>,
        seen: &mut Seen,
        keys: &HashMap<u64, Option<Key>>,
        epochs: &HashMap<String, u64>,
    ) {
        for c in cmds {
            let kind = match &c {
                Command::Deliver { attempt: 1, .. } => "deliver",
                Command::Deliver { .. } => "redeliver",
                Command::Ack { .. } => "ack",
                Command::DeadLetter { .. } => "dead-letter",
                Command::Park { .. } => "park",
                Command::Unpark { .. } => "unpark",
                Command::Fence { .. } => "fence",
            };
            *seen.counts.entry(kind).or_default() += 1;
            match c {
                Command::Deliver {
                    member,
                    offset,
                    attempt,
                } => {
                    let k = keys[&offset].clone();
                    if let Some(k) = &k {
                        assert!(
                            !seen.parked.contains(k),
                            "delivered {offset} of a parked key"
                        );
                    }
                    if seen.first_delivered.insert(offset, ()).is_none()
                        && let Some(k) = k
                    {
                        // First deliveries of a key are in offset order.
                        if let Some(prev) = seen.last_first_of_key.insert(k, offset) {
                            assert!(prev < offset, "key order: {prev} then {offset}");
                        }
                    }
                    seen.out
                        .insert(offset, (member.clone(), epochs[&member], attempt));
                }
                Command::Ack { offset } => {
                    assert!(seen.acked.insert(offset), "{offset} finished twice");
                    seen.out.remove(&offset);
                    seen.undurable.push(offset);
                }
                Command::DeadLetter { offset, .. } => {
                    seen.out.remove(&offset);
                    seen.dead_lettering.push(offset);
                }
                Command::Park { key, offset, .. } => {
                    seen.out.remove(&offset);
                    seen.parked.insert(key);
                }
                Command::Unpark { key } => {
                    seen.parked.remove(&key);
                }
                Command::Fence { .. } => {}
            }
        }
    }

    fn check_invariants(e: &Engine) {
        let per_key = e.settings.max_in_flight_per_key;
        let mut holders: HashMap<&Key, (HashSet<Option<&String>>, u32)> = HashMap::new();
        for entry in e.entries.values() {
            if let (Some(k), State::Delivered { .. }) = (&entry.key, entry.state) {
                let h = holders.entry(k).or_default();
                h.0.insert(entry.member.as_ref());
                h.1 += 1;
            }
        }
        for (k, (members, n)) in holders {
            assert!(n <= per_key, "key {k:?} has {n} in flight");
            let live: Vec<_> = members.iter().flatten().collect();
            assert!(live.len() <= 1, "key {k:?} is with {live:?}");
        }
        for (name, m) in &e.members {
            let out = e
                .entries
                .values()
                .filter(|x| {
                    x.member.as_ref() == Some(name) && matches!(x.state, State::Delivered { .. })
                })
                .count() as u32;
            assert_eq!(out, m.in_flight, "{name}'s in-flight count");
            assert!(
                m.in_flight + m.undurable <= m.limit,
                "{name} over its limit"
            );
        }
    }

    fn model(
        seed: u64,
        mode: Mode,
        on_exhausted: OnExhausted,
        per_key: u32,
    ) -> BTreeMap<&'static str, u64> {
        let mut rng = junction_testkit::SplitMix(seed);
        let mut e = Engine::new(EngineSettings {
            mode,
            ack_wait_ms: 100,
            max_deliveries: 3,
            max_in_flight_per_key: per_key,
            on_exhausted,
        });
        let mut now = 0u64;
        let mut next_offset = 0u64;
        let mut keys: HashMap<u64, Option<Key>> = HashMap::new();
        let mut epochs: HashMap<String, u64> = HashMap::new();
        let mut attached: Vec<String> = Vec::new();
        let mut seen = Seen::default();
        let members = ["m0", "m1", "m2", "m3"];
        for _ in 0..600 {
            match rng.below(12) {
                0..=2 => {
                    let k = match rng.below(8) {
                        0 => None,
                        n => key(n as u32),
                    };
                    keys.insert(next_offset, k.clone());
                    e.read(next_offset, k);
                    next_offset += 1;
                }
                3 => {
                    let m = members[rng.below(4) as usize].to_owned();
                    let ep = epochs.get(&m).copied().unwrap_or(0) + 1;
                    epochs.insert(m.clone(), ep);
                    e.attach(&m, ep, 1 + rng.below(6) as u32);
                    if mode == Mode::Partitioned {
                        attached.clear();
                    }
                    attached.retain(|x| x != &m);
                    attached.push(m);
                }
                4 if !attached.is_empty() => {
                    let m = attached.remove(rng.below(attached.len() as u64) as usize);
                    e.detach(&m);
                }
                5..=7 => {
                    // An ack of something out, sometimes stale on purpose.
                    if let Some((&o, (m, ep, a))) = seen
                        .out
                        .iter()
                        .nth(rng.below(seen.out.len().max(1) as u64) as usize)
                    {
                        let (m, ep, a) = (m.clone(), *ep, *a);
                        let stale = rng.below(5) == 0;
                        let r = if stale {
                            e.ack(&m, ep + 1, o, a)
                        } else {
                            e.ack(&m, ep, o, a)
                        };
                        if stale {
                            assert!(r.is_err());
                        }
                        if r.is_err() && !stale {
                            // The delivery ended meanwhile (expired, member replaced).
                            seen.out.remove(&o);
                        }
                    }
                }
                8 => {
                    if let Some((&o, (m, ep, a))) = seen.out.iter().next() {
                        let (m, ep, a) = (m.clone(), *ep, *a);
                        if e.nack(now, &m, ep, o, a, rng.below(150)).is_err() {
                            seen.out.remove(&o);
                        }
                    }
                }
                9 => {
                    now += rng.below(120);
                    e.tick(now);
                }
                10 => {
                    let n = rng.below(seen.undurable.len() as u64 + 1) as usize;
                    let durable: Vec<u64> = seen.undurable.drain(..n).collect();
                    e.acks_durable(&durable);
                    if let Some(o) = seen.dead_lettering.pop() {
                        let ok = rng.below(3) > 0;
                        e.dead_lettered(now, o, ok, 50);
                    }
                }
                _ => {
                    if let Some(k) = seen.parked.iter().next().cloned() {
                        if rng.below(2) == 0 {
                            let _ = e.resume(&k);
                        } else {
                            let _ = e.skip(&k);
                        }
                    }
                }
            }
            let cmds = step(&mut e, now);
            absorb(cmds, &mut seen, &keys, &epochs);
            check_invariants(&e);
        }
        // Drain: one member acks everything, parked keys resume, dead letters are stored.
        let ep = epochs.get("drain").copied().unwrap_or(0) + 1;
        epochs.insert("drain".to_owned(), ep);
        for m in attached.drain(..) {
            e.detach(&m);
        }
        e.attach("drain", ep, 10_000);
        for _ in 0..10_000 {
            now += 200;
            e.tick(now);
            let pending: Vec<u64> = seen.undurable.drain(..).collect();
            e.acks_durable(&pending);
            for o in std::mem::take(&mut seen.dead_lettering) {
                e.dead_lettered(now, o, true, 10);
            }
            for k in seen.parked.clone() {
                let _ = e.resume(&k);
            }
            let cmds = step(&mut e, now);
            absorb(cmds, &mut seen, &keys, &epochs);
            let out: Vec<(u64, String, u64, u32)> = seen
                .out
                .iter()
                .map(|(o, (m, ep, a))| (*o, m.clone(), *ep, *a))
                .collect();
            for (o, m, ep, a) in out {
                if m == "drain" {
                    e.ack(&m, ep, o, a)
                        .unwrap_or_else(|r| panic!("seed {seed}: {r}"));
                }
            }
            absorb(e.take_commands(), &mut seen, &keys, &epochs);
            check_invariants(&e);
            if e.pending() == 0 {
                break;
            }
        }
        assert_eq!(
            e.pending(),
            0,
            "seed {seed}: messages never finished: {:?} keys {:?} ready {:?} members {:?}",
            e.entries,
            e.keys,
            e.ready,
            e.members
        );
        assert_eq!(seen.acked.len() as u64, next_offset, "seed {seed}");
        seen.counts
    }

    #[test]
    fn seeded_model_of_deliveries_keys_and_parking() {
        let mut coverage: BTreeMap<&str, u64> = BTreeMap::new();
        for seed in 0..120 {
            let (mode, on_exhausted, per_key) = match seed % 4 {
                0 => (Mode::Partitioned, OnExhausted::DeadLetter, 1),
                1 => (Mode::KeyShared, OnExhausted::DeadLetter, 1),
                2 => (Mode::KeyShared, OnExhausted::Park, 1),
                _ => (Mode::KeyShared, OnExhausted::Park, 3),
            };
            for (kind, n) in model(seed, mode, on_exhausted, per_key) {
                *coverage.entry(kind).or_default() += n;
            }
        }
        // The runs went through every kind of decision.
        for kind in [
            "deliver",
            "redeliver",
            "ack",
            "dead-letter",
            "park",
            "unpark",
            "fence",
        ] {
            assert!(
                coverage.get(kind).copied().unwrap_or(0) > 0,
                "no {kind}: {coverage:?}"
            );
        }
    }
}
