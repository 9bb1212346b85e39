//! The producer's decisions, without I/O: which partition a message goes to, when a batch is
//! formed, which batches may be sent now (and with which sequence numbers), and what a reply
//! or a failure does. The worker (`worker.rs`) only moves bytes and time into it.
//!
//! Idempotence: a batch gets its producer identity and sequence numbers when it is first
//! sent, in batch order per partition, and keeps them for every retry, so the partition can
//! recognise a retry. At most [`MAX_IDEMPOTENT_IN_FLIGHT`] numbered batches of a partition are
//! unacknowledged at once (the partition remembers the positions of that many). When a
//! numbered batch can no longer be stored with its numbers (it failed for good, or the
//! partition forgot the producer), the producer is re-initialised (a new identity, sequences
//! from 0) once no numbered batch is left unresolved; batches that were refused are numbered
//! again under the new identity, which is safe because a refused batch was not stored.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use junction_proto::v1::{Message, MessagePosition};
use junction_types::partitioner::partition_for_key;
use tonic::Code;

use super::Reply;
use crate::batch::{Accumulator, BatchLimits, message_size};
use crate::error::ClientError;
use crate::retry::Backoff;

/// The most numbered batches of one partition an idempotent producer keeps unacknowledged
/// (the partition remembers the positions of the last five batches of each producer).
pub(crate) const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

/// A producer identity: id and epoch.
pub(crate) type Identity = (u64, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchState {
    /// To be sent (again).
    Unsent,
    /// Sent, awaiting its reply.
    Sent,
    /// Failed and waiting for its backoff to end.
    WaitingUntil(Instant),
}

/// A batch of one partition.
pub(crate) struct Batch {
    pub(crate) partition: u32,
    pub(crate) messages: Vec<Message>,
    replies: Vec<Reply>,
    /// The producer's number of its first message (for flushes).
    first_msg: u64,
    created: Instant,
    pub(crate) state: BatchState,
    backoff: Backoff,
    pub(crate) attempts: u32,
    /// Identity and base sequence, fixed at the first send (idempotent producers).
    pub(crate) numbered: Option<(Identity, u64)>,
    /// Where it was last sent.
    pub(crate) sent_to: Option<String>,
    /// The last retryable failure, reported if the retry deadline passes.
    last_error: Option<(Code, String)>,
}

impl Batch {
    fn complete(self, positions: Vec<MessagePosition>) {
        for (reply, position) in self.replies.into_iter().zip(positions) {
            let _ = reply.send(Ok(position));
        }
    }

    fn fail(self, error: &ClientError) {
        for reply in self.replies {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// A batch failure as the server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: Code,
    pub(crate) message: String,
    /// The `ErrorInfo` reason, when the server gave one.
    pub(crate) reason: String,
    /// Retry at this address (normalised), when the server named the leader.
    pub(crate) leader_hint: Option<String>,
    /// Over the tenant's rate quota: retry after this wait.
    pub(crate) throttled: Option<Duration>,
}

/// A message waiting for a batch: the message, its reply, and its number.
type Queued = (Message, Reply, u64);

/// What the worker must do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Followup {
    Nothing,
    /// The partition's leader moved to this address.
    LeaderHint(u32, String),
    /// The partition's leader is unknown: refresh the station's routes.
    RefreshRoutes,
}

/// Settings of the core.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoreLimits {
    pub(crate) batch: BatchLimits,
    /// Batches of one partition formed and not yet acknowledged.
    pub(crate) max_in_flight: usize,
    pub(crate) idempotent: bool,
    pub(crate) retry_deadline: Duration,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
}

/// The producer's state.
pub(crate) struct Core {
    limits: CoreLimits,
    partitions: u32,
    queues: Vec<Accumulator<Queued>>,
    /// The partition unkeyed messages go to until its next batch is formed.
    sticky: u32,
    /// The next sequence number of each partition under `identity`.
    sequences: Vec<u64>,
    identity: Option<Identity>,
    /// A new identity is needed before more batches are numbered.
    reinit: bool,
    next_msg: u64,
    pub(crate) batches: BTreeMap<u64, Batch>,
    next_batch: u64,
    /// Set when the producer can no longer send (fenced): every send fails with it.
    pub(crate) dead: Option<ClientError>,
}

impl Core {
    pub(crate) fn new(limits: CoreLimits, partitions: u32, first_sticky: u32) -> Self {
        let partitions = partitions.max(1);
        let mut limits = limits;
        limits.max_in_flight = limits.max_in_flight.max(1);
        if limits.idempotent {
            limits.max_in_flight = limits.max_in_flight.min(MAX_IDEMPOTENT_IN_FLIGHT);
        }
        Self {
            limits,
            partitions,
            queues: (0..partitions).map(|_| Accumulator::default()).collect(),
            sticky: first_sticky % partitions,
            sequences: vec![0; partitions as usize],
            identity: None,
            reinit: false,
            next_msg: 0,
            batches: BTreeMap::new(),
            next_batch: 1,
            dead: None,
        }
    }

    /// Whether the producer needs an identity (its first, or a new one) before it can number
    /// more batches, and may get it now (nothing numbered is unresolved).
    pub(crate) fn wants_identity(&self) -> bool {
        self.limits.idempotent
            && (self.identity.is_none() || self.reinit)
            && self.dead.is_none()
            && !self.batches.values().any(|b| b.numbered.is_some())
    }

    /// Whether batches can be numbered now: the producer is not idempotent, or holds an
    /// identity it need not renew.
    pub(crate) fn has_identity(&self) -> bool {
        !self.limits.idempotent || (self.identity.is_some() && !self.reinit)
    }

    /// Installs a (new) identity: sequences start at 0 in every partition.
    pub(crate) fn set_identity(&mut self, identity: Identity) {
        self.identity = Some(identity);
        self.reinit = false;
        self.sequences.iter_mut().for_each(|s| *s = 0);
    }

    /// Queues a message; returns its number (for flushes). A message naming a partition out
    /// of range fails at once.
    pub(crate) fn enqueue(&mut self, message: Message, reply: Reply, now: Instant) -> u64 {
        let n = self.next_msg;
        self.next_msg += 1;
        if let Some(e) = &self.dead {
            let _ = reply.send(Err(e.clone()));
            return n;
        }
        let p = match (message.partition, &message.key) {
            (Some(p), _) if p >= self.partitions => {
                let _ = reply.send(Err(ClientError::Status {
                    code: Code::InvalidArgument,
                    message: format!(
                        "partition {p} is out of range: the station has {} partitions",
                        self.partitions
                    ),
                }));
                return n;
            }
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, self.partitions),
            (None, None) => self.sticky,
        };
        let mut message = message;
        message.partition = Some(p);
        let size = message_size(&message);
        self.queues[p as usize].push((message, reply, n), size, now);
        n
    }

    /// The number the next queued message gets.
    pub(crate) fn next_msg(&self) -> u64 {
        self.next_msg
    }

    /// The number of the oldest message not yet acknowledged or failed.
    pub(crate) fn oldest_unfinished(&self) -> Option<u64> {
        let queued = self
            .queues
            .iter()
            .filter_map(|q| q.front().map(|(_, _, n)| *n));
        let batched = self.batches.values().map(|b| b.first_msg);
        queued.chain(batched).min()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.batches.is_empty() && self.queues.iter().all(Accumulator::is_empty)
    }

    fn in_flight(&self, p: u32) -> usize {
        self.batches.values().filter(|b| b.partition == p).count()
    }

    /// Forms the batches that are ready (full, lingered long enough, or `force`d by a flush
    /// or close reaching the message `force_upto`).
    pub(crate) fn form_batches(&mut self, now: Instant, force_upto: Option<u64>) {
        for p in 0..self.partitions {
            loop {
                if self.in_flight(p) >= self.limits.max_in_flight {
                    break;
                }
                let q = &mut self.queues[p as usize];
                let forced = match (force_upto, q.front()) {
                    (Some(upto), Some((_, _, n))) => *n < upto,
                    _ => false,
                };
                if !q.ready(&self.limits.batch, now, forced) {
                    break;
                }
                let items = q.take_batch(&self.limits.batch);
                let Some((_, _, first_msg)) = items.first() else {
                    break;
                };
                let first_msg = *first_msg;
                let (messages, replies): (Vec<_>, Vec<_>) =
                    items.into_iter().map(|(m, r, _)| (m, r)).unzip();
                if p == self.sticky {
                    self.sticky = (self.sticky + 1) % self.partitions;
                }
                let id = self.next_batch;
                self.next_batch += 1;
                self.batches.insert(
                    id,
                    Batch {
                        partition: p,
                        messages,
                        replies,
                        first_msg,
                        created: now,
                        state: BatchState::Unsent,
                        backoff: Backoff::new(self.limits.initial_backoff, self.limits.max_backoff),
                        attempts: 0,
                        numbered: None,
                        sent_to: None,
                        last_error: None,
                    },
                );
            }
        }
    }

    /// When the next batch would be formed by its linger running out.
    pub(crate) fn next_linger(&self) -> Option<Instant> {
        (0..self.partitions)
            .filter(|p| self.in_flight(*p) < self.limits.max_in_flight)
            .filter_map(|p| self.queues[p as usize].linger_deadline(&self.limits.batch))
            .min()
    }

    /// The batches to send now, in order. Numbers the ones sent for the first time.
    ///
    /// Numbered batches of a partition leave in sequence order: one waiting for its backoff
    /// holds back the later numbered ones. A batch is numbered only after every earlier batch
    /// of its partition is, so sequences follow batch order; an earlier batch waiting for a
    /// new identity holds back new numbering, never the sending of batches already numbered
    /// (they must resolve before the identity can change).
    pub(crate) fn sendable_now(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        let mut hold_numbered = vec![false; self.partitions as usize];
        let mut hold_new = vec![false; self.partitions as usize];
        let can_number = self.has_identity();
        let ids: Vec<u64> = self.batches.keys().copied().collect();
        for id in ids {
            let Some(b) = self.batches.get_mut(&id) else {
                continue;
            };
            let p = b.partition as usize;
            if let BatchState::WaitingUntil(t) = b.state
                && t <= now
            {
                b.state = BatchState::Unsent;
            }
            let numbered = b.numbered.is_some() || !self.limits.idempotent;
            match b.state {
                BatchState::Sent => continue,
                BatchState::WaitingUntil(_) => {
                    hold_new[p] = true;
                    if numbered {
                        hold_numbered[p] = true;
                    }
                    continue;
                }
                BatchState::Unsent => {}
            }
            if numbered {
                if hold_numbered[p] {
                    hold_new[p] = true;
                    continue;
                }
            } else {
                match (can_number && !hold_new[p], self.identity) {
                    (true, Some(identity)) => {
                        let seq = self.sequences[p];
                        self.sequences[p] = seq + b.messages.len() as u64;
                        b.numbered = Some((identity, seq));
                    }
                    _ => {
                        hold_new[p] = true;
                        continue;
                    }
                }
            }
            b.state = BatchState::Sent;
            b.attempts += 1;
            out.push(id);
        }
        out
    }

    /// Records where a batch went.
    pub(crate) fn sent_to(&mut self, id: u64, addr: &str) {
        if let Some(b) = self.batches.get_mut(&id) {
            b.sent_to = Some(addr.to_owned());
        }
    }

    /// The stream to `addr` broke (`code`, `message`): its batches are sent again after their
    /// backoff.
    pub(crate) fn stream_lost(&mut self, addr: &str, code: Code, message: &str, now: Instant) {
        for b in self.batches.values_mut() {
            if b.state == BatchState::Sent && b.sent_to.as_deref() == Some(addr) {
                b.state = BatchState::WaitingUntil(now + b.backoff.next_delay());
                b.last_error = Some((code, message.to_owned()));
            }
        }
    }

    /// Whether an earlier batch of the same partition, numbered under the same identity, is
    /// still unresolved (it may yet be stored, and then `identity`'s later batches fit).
    fn earlier_unresolved(&self, id: u64, p: u32, identity: Option<Identity>) -> bool {
        self.batches.range(..id).any(|(_, b)| {
            b.partition == p && b.numbered.is_some() && b.numbered.map(|n| n.0) == identity
        })
    }

    /// A batch was acknowledged.
    pub(crate) fn acknowledged(&mut self, id: u64, positions: Vec<MessagePosition>) {
        let Some(b) = self.batches.remove(&id) else {
            return;
        };
        if positions.len() == b.messages.len() {
            b.complete(positions);
        } else {
            let e = ClientError::invalid_response(format!(
                "batch of {} messages got {} positions",
                b.messages.len(),
                positions.len()
            ));
            self.failed_for_good(b, &e);
        }
    }

    fn failed_for_good(&mut self, b: Batch, e: &ClientError) {
        if b.numbered.is_some() {
            // Its sequence numbers are spent without being stored (or unknown): later
            // batches need a new identity.
            self.reinit = true;
        }
        b.fail(e);
    }

    /// A batch was refused or failed; decides between retrying, renumbering and failing.
    pub(crate) fn refused(&mut self, id: u64, r: Refusal, now: Instant) -> Followup {
        let Some(mut b) = self.batches.remove(&id) else {
            return Followup::Nothing;
        };
        let p = b.partition;
        match r.reason.as_str() {
            "FENCED" => {
                let e = ClientError::Fenced { message: r.message };
                b.fail(&e);
                self.kill(e);
                return Followup::Nothing;
            }
            // Not stored (decided when applied): number it again under a new identity, or
            // (out of order behind an unresolved batch) just retry it after that one.
            "UNKNOWN_PRODUCER" | "OUT_OF_ORDER_SEQUENCE" => {
                let identity = b.numbered.map(|n| n.0);
                if r.reason == "OUT_OF_ORDER_SEQUENCE" && self.earlier_unresolved(id, p, identity) {
                    return self.retry_later(id, b, r, now);
                }
                b.numbered = None;
                b.state = BatchState::Unsent;
                self.reinit = true;
                self.batches.insert(id, b);
                return Followup::Nothing;
            }
            _ => {}
        }
        if let Some(after) = r.throttled {
            return self.retry_after(id, b, r, now, after);
        }
        let retryable = r.code == Code::Unavailable || r.leader_hint.is_some();
        if retryable {
            return self.retry_later(id, b, r, now);
        }
        let e = ClientError::Status {
            code: r.code,
            message: r.message,
        };
        self.failed_for_good(b, &e);
        Followup::Nothing
    }

    fn retry_later(&mut self, id: u64, mut b: Batch, r: Refusal, now: Instant) -> Followup {
        let delay = b.backoff.next_delay();
        self.retry_after(id, b, r, now, delay)
    }

    /// Sends the batch again after `delay`, unless that passes its retry deadline.
    fn retry_after(
        &mut self,
        id: u64,
        mut b: Batch,
        r: Refusal,
        now: Instant,
        delay: Duration,
    ) -> Followup {
        let retry_at = now + delay;
        if retry_at >= b.created + self.limits.retry_deadline {
            let e = ClientError::RetriesExhausted {
                attempts: b.attempts,
                elapsed: now - b.created,
                code: r.code,
                message: r.message,
            };
            self.failed_for_good(b, &e);
            return Followup::Nothing;
        }
        b.state = BatchState::WaitingUntil(retry_at);
        b.last_error = Some((r.code, r.message.clone()));
        let p = b.partition;
        self.batches.insert(id, b);
        match r.leader_hint {
            Some(addr) => Followup::LeaderHint(p, addr),
            None if r.code == Code::Unavailable => Followup::RefreshRoutes,
            None => Followup::Nothing,
        }
    }

    /// Fails batches past the retry deadline.
    pub(crate) fn expire(&mut self, now: Instant) {
        let deadline = self.limits.retry_deadline;
        let expired: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| now >= b.created + deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(b) = self.batches.remove(&id) {
                let (code, message) = b.last_error.clone().unwrap_or_else(|| {
                    (
                        Code::DeadlineExceeded,
                        "batch not acknowledged within the retry deadline".to_owned(),
                    )
                });
                let e = ClientError::RetriesExhausted {
                    attempts: b.attempts,
                    elapsed: now - b.created,
                    code,
                    message,
                };
                self.failed_for_good(b, &e);
            }
        }
    }

    /// The earliest time something is due: a linger, a backoff, a deadline.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let deadline = self.limits.retry_deadline;
        let batches = self.batches.values().flat_map(|b| {
            let waiting = match b.state {
                BatchState::WaitingUntil(t) => Some(t),
                _ => None,
            };
            [Some(b.created + deadline), waiting]
        });
        batches.flatten().chain(self.next_linger()).min()
    }

    /// Fails everything (queued and batched) with `e`; later sends fail with it too.
    pub(crate) fn kill(&mut self, e: ClientError) {
        for (_, b) in std::mem::take(&mut self.batches) {
            b.fail(&e);
        }
        for q in &mut self.queues {
            let limits = BatchLimits {
                max_messages: usize::MAX,
                max_bytes: usize::MAX,
                linger: Duration::ZERO,
            };
            for (_, reply, _) in q.take_batch(&limits) {
                let _ = reply.send(Err(e.clone()));
            }
        }
        self.dead = Some(e);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    type Answer = oneshot::Receiver<Result<MessagePosition, ClientError>>;

    fn limits(idempotent: bool) -> CoreLimits {
        CoreLimits {
            batch: BatchLimits {
                max_messages: 2,
                max_bytes: 1 << 20,
                linger: Duration::ZERO,
            },
            max_in_flight: 8,
            idempotent,
            retry_deadline: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }

    fn msg(p: u32) -> Message {
        Message {
            key: None,
            headers: vec![],
            payload: vec![1].into(),
            partition: Some(p),
            msg_id: None,
        }
    }

    fn send(core: &mut Core, p: u32, now: Instant) -> Answer {
        let (tx, rx) = oneshot::channel();
        core.enqueue(msg(p), tx, now);
        rx
    }

    fn seq(core: &Core, id: u64) -> Option<u64> {
        core.batches[&id].numbered.map(|(_, s)| s)
    }

    fn refusal(code: Code, reason: &str) -> Refusal {
        Refusal {
            code,
            message: "m".into(),
            reason: reason.into(),
            leader_hint: None,
            throttled: None,
        }
    }

    fn positions(offsets: &[u64]) -> Vec<MessagePosition> {
        offsets
            .iter()
            .map(|o| MessagePosition {
                partition: 0,
                offset: *o,
                duplicate: false,
                dead_lettered: false,
            })
            .collect()
    }

    #[test]
    fn keyed_messages_follow_the_partitioner_and_unkeyed_ones_stick() {
        let now = Instant::now();
        let want = partition_for_key(b"alice", 4);
        let sticky = (want + 1) % 4;
        let mut core = Core::new(limits(false), 4, sticky);
        let (tx, _rx) = oneshot::channel();
        let mut m = msg(0);
        m.partition = None;
        m.key = Some(b"alice".to_vec());
        core.enqueue(m, tx, now);
        assert_eq!(core.queues[want as usize].len(), 1);
        let mut rxs = vec![];
        for _ in 0..2 {
            let (tx, rx) = oneshot::channel();
            let mut m = msg(0);
            m.partition = None;
            core.enqueue(m, tx, now);
            rxs.push(rx);
        }
        assert_eq!(
            core.queues[sticky as usize].len(),
            2,
            "unkeyed messages stick to one partition"
        );
        core.form_batches(now, None);
        assert_eq!(
            core.sticky,
            (sticky + 1) % 4,
            "the sticky partition moves on after a batch"
        );
        let (tx, mut rx) = oneshot::channel();
        core.enqueue(msg(9), tx, now);
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(ClientError::Status {
                code: Code::InvalidArgument,
                ..
            })
        ));
    }

    #[test]
    fn batches_are_numbered_in_order_at_their_first_send_and_keep_their_numbers() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 2, 0);
        let _a: Vec<Answer> = (0..5).map(|_| send(&mut core, 0, now)).collect();
        let _b = send(&mut core, 1, now);
        core.form_batches(now, None);
        assert!(core.sendable_now(now).is_empty(), "no identity yet");
        assert!(core.wants_identity());
        core.set_identity((7, 0));
        let sent = core.sendable_now(now);
        assert_eq!(sent.len(), 4);
        // Partition 0: batches of 2, 2 and 1 messages; partition 1: one batch.
        let p0: Vec<u64> = sent
            .iter()
            .copied()
            .filter(|id| core.batches[id].partition == 0)
            .collect();
        assert_eq!(
            p0.iter().map(|id| seq(&core, *id)).collect::<Vec<_>>(),
            vec![Some(0), Some(2), Some(4)]
        );
        // A lost stream: the batches go again with the same numbers, in order.
        core.stream_lost("", Code::Unavailable, "lost", now);
        for id in &sent {
            core.sent_to(*id, "a");
        }
        core.stream_lost("a", Code::Unavailable, "lost", now);
        let later = now + Duration::from_secs(2);
        let again = core.sendable_now(later);
        assert_eq!(again, sent);
        assert_eq!(seq(&core, p0[1]), Some(2));
        assert_eq!(core.batches[&p0[1]].attempts, 2);
    }

    #[test]
    fn a_partition_never_sends_past_an_earlier_batch_waiting_to_retry() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 1, 0);
        let _a: Vec<Answer> = (0..4).map(|_| send(&mut core, 0, now)).collect();
        core.form_batches(now, None);
        core.set_identity((1, 0));
        let sent = core.sendable_now(now);
        assert_eq!(sent.len(), 2);
        // The first is refused as unavailable, the second as out of order behind it.
        let f = core.refused(sent[0], refusal(Code::Unavailable, ""), now);
        assert_eq!(f, Followup::RefreshRoutes);
        core.refused(
            sent[1],
            refusal(Code::OutOfRange, "OUT_OF_ORDER_SEQUENCE"),
            now,
        );
        assert_eq!(seq(&core, sent[1]), Some(2), "kept its numbers");
        assert!(!core.reinit);
        // Nothing goes before the first batch's backoff ends; then both, in order.
        assert!(core.sendable_now(now).is_empty());
        assert_eq!(core.sendable_now(now + Duration::from_secs(2)), sent);
    }

    #[test]
    fn a_throttled_batch_waits_the_time_the_server_gave_and_keeps_its_numbers() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 1, 0);
        let mut answers: Vec<Answer> = (0..2).map(|_| send(&mut core, 0, now)).collect();
        core.form_batches(now, None);
        core.set_identity((1, 0));
        let sent = core.sendable_now(now);
        let mut r = refusal(Code::ResourceExhausted, "THROTTLED");
        r.throttled = Some(Duration::from_millis(700));
        assert_eq!(core.refused(sent[0], r, now), Followup::Nothing);
        assert!(answers[0].try_recv().is_err(), "not failed");
        assert_eq!(seq(&core, sent[0]), Some(0), "kept its numbers");
        assert!(!core.reinit);
        assert!(
            core.sendable_now(now + Duration::from_millis(699))
                .is_empty()
        );
        assert_eq!(
            core.sendable_now(now + Duration::from_millis(700)),
            vec![sent[0]]
        );
    }

    #[test]
    fn a_batch_that_failed_for_good_leads_to_a_new_identity_and_later_batches_are_renumbered() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 1, 0);
        let mut answers: Vec<Answer> = (0..4).map(|_| send(&mut core, 0, now)).collect();
        core.form_batches(now, None);
        core.set_identity((1, 0));
        let sent = core.sendable_now(now);
        core.refused(sent[0], refusal(Code::InvalidArgument, ""), now);
        assert!(matches!(
            answers[0].try_recv().unwrap(),
            Err(ClientError::Status {
                code: Code::InvalidArgument,
                ..
            })
        ));
        // The second was numbered after the failed one: the partition refuses it as out of
        // order, and nothing earlier is unresolved.
        assert!(!core.wants_identity(), "a numbered batch is unresolved");
        core.refused(
            sent[1],
            refusal(Code::OutOfRange, "OUT_OF_ORDER_SEQUENCE"),
            now,
        );
        assert!(core.wants_identity());
        core.set_identity((2, 0));
        let again = core.sendable_now(now);
        assert_eq!(again, vec![sent[1]]);
        assert_eq!(core.batches[&sent[1]].numbered, Some(((2, 0), 0)));
        core.acknowledged(sent[1], positions(&[5, 6]));
        assert_eq!(answers[2].try_recv().unwrap().unwrap().offset, 5);
        assert!(core.is_idle());
    }

    #[test]
    fn an_unknown_producer_is_renumbered_transparently() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 1, 0);
        let mut answers: Vec<Answer> = (0..2).map(|_| send(&mut core, 0, now)).collect();
        core.form_batches(now, None);
        core.set_identity((1, 0));
        let sent = core.sendable_now(now);
        core.refused(
            sent[0],
            refusal(Code::FailedPrecondition, "UNKNOWN_PRODUCER"),
            now,
        );
        assert!(
            answers[0].try_recv().is_err(),
            "not answered: it is sent again"
        );
        assert!(core.wants_identity());
        core.set_identity((3, 0));
        assert_eq!(core.sendable_now(now), sent);
        core.acknowledged(sent[0], positions(&[0, 1]));
        assert_eq!(answers[1].try_recv().unwrap().unwrap().offset, 1);
    }

    #[test]
    fn fencing_fails_everything_and_every_later_send() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 2, 0);
        let mut a = send(&mut core, 0, now);
        let mut queued: Vec<Answer> = (0..3).map(|_| send(&mut core, 1, now)).collect();
        core.form_batches(now, None);
        core.set_identity((1, 0));
        let sent = core.sendable_now(now);
        core.refused(sent[0], refusal(Code::FailedPrecondition, "FENCED"), now);
        assert!(matches!(
            a.try_recv().unwrap(),
            Err(ClientError::Fenced { .. })
        ));
        for q in &mut queued {
            assert!(matches!(
                q.try_recv().unwrap(),
                Err(ClientError::Fenced { .. })
            ));
        }
        let mut later = send(&mut core, 0, now);
        assert!(matches!(
            later.try_recv().unwrap(),
            Err(ClientError::Fenced { .. })
        ));
        assert!(core.is_idle());
    }

    #[test]
    fn at_most_five_numbered_batches_per_partition() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 1, 0);
        let _a: Vec<Answer> = (0..20).map(|_| send(&mut core, 0, now)).collect();
        core.form_batches(now, None);
        core.set_identity((1, 0));
        assert_eq!(core.sendable_now(now).len(), MAX_IDEMPOTENT_IN_FLIGHT);
        let plain = Core::new(limits(false), 1, 0);
        assert_eq!(plain.limits.max_in_flight, 8);
    }

    #[test]
    fn an_expired_batch_fails_and_forces_a_new_identity() {
        let now = Instant::now();
        let mut core = Core::new(limits(true), 1, 0);
        let mut a = send(&mut core, 0, now);
        core.form_batches(now, None);
        core.set_identity((1, 0));
        core.sendable_now(now);
        core.expire(now + Duration::from_secs(31));
        assert!(matches!(
            a.try_recv().unwrap(),
            Err(ClientError::RetriesExhausted { .. })
        ));
        assert!(core.wants_identity());
    }

    /// A seeded model: random replies (acknowledged, unavailable, out of order, unknown
    /// producer, final errors, lost streams) never send a partition's numbered batches out of
    /// sequence order, never give one batch two numberings under one identity, and answer
    /// every message exactly once.
    #[test]
    fn seeded_model_numbers_stay_contiguous_and_every_message_is_answered_once() {
        for seed in 0..100u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = |n: u64| {
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (rng >> 33) % n
            };
            let mut now = Instant::now();
            let mut core = Core::new(limits(true), 3, 0);
            let mut answers: Vec<Answer> = Vec::new();
            let mut epoch = 0u32;
            // Per identity and partition: the next sequence the model expects to be handed out.
            let mut handed: BTreeMap<(Identity, u32), u64> = BTreeMap::new();
            // Batch → the numbering it was last sent with.
            let mut numbering: BTreeMap<u64, (Identity, u64)> = BTreeMap::new();
            for _ in 0..400 {
                now += Duration::from_millis(next(300));
                for _ in 0..next(4) {
                    answers.push(send(&mut core, next(3) as u32, now));
                }
                core.expire(now);
                core.form_batches(now, None);
                if core.wants_identity() {
                    epoch += 1;
                    core.set_identity((1, epoch));
                }
                for id in core.sendable_now(now) {
                    let b = &core.batches[&id];
                    let (ident, s) = b.numbered.expect("idempotent batches are numbered");
                    if numbering.insert(id, (ident, s)) != Some((ident, s)) {
                        let want = handed.entry((ident, b.partition)).or_insert(0);
                        assert_eq!(s, *want, "seed {seed}: numbers are contiguous");
                        *want += b.messages.len() as u64;
                    }
                    core.sent_to(id, "a");
                }
                let in_flight: Vec<u64> = core
                    .batches
                    .iter()
                    .filter(|(_, b)| b.state == BatchState::Sent)
                    .map(|(id, _)| *id)
                    .collect();
                for id in in_flight {
                    match next(8) {
                        0..=2 => {
                            let n = core.batches[&id].messages.len();
                            core.acknowledged(id, positions(&vec![0; n]));
                        }
                        3 => {
                            core.refused(id, refusal(Code::Unavailable, ""), now);
                        }
                        4 => {
                            core.refused(
                                id,
                                refusal(Code::OutOfRange, "OUT_OF_ORDER_SEQUENCE"),
                                now,
                            );
                        }
                        5 if next(10) == 0 => {
                            core.refused(
                                id,
                                refusal(Code::FailedPrecondition, "UNKNOWN_PRODUCER"),
                                now,
                            );
                        }
                        6 if next(10) == 0 => {
                            core.refused(id, refusal(Code::InvalidArgument, ""), now);
                        }
                        7 => core.stream_lost("a", Code::Unavailable, "lost", now),
                        _ => {}
                    }
                }
            }
            // Drain: everything acknowledged.
            for _ in 0..1000 {
                if core.is_idle() {
                    break;
                }
                now += Duration::from_secs(2);
                core.form_batches(now, Some(u64::MAX));
                if core.wants_identity() {
                    epoch += 1;
                    core.set_identity((1, epoch));
                }
                core.sendable_now(now);
                let sent: Vec<u64> = core
                    .batches
                    .iter()
                    .filter(|(_, b)| b.state == BatchState::Sent)
                    .map(|(id, _)| *id)
                    .collect();
                for id in sent {
                    let n = core.batches[&id].messages.len();
                    core.acknowledged(id, positions(&vec![0; n]));
                }
            }
            assert!(
                core.is_idle(),
                "seed {seed}: drained; left {:?}, reinit {}, identity {:?}, queued {:?}",
                core.batches
                    .iter()
                    .map(|(id, b)| (*id, b.partition, b.state, b.numbered))
                    .collect::<Vec<_>>(),
                core.reinit,
                core.identity,
                core.queues.iter().map(|q| q.len()).collect::<Vec<_>>()
            );
            for (i, a) in answers.iter_mut().enumerate() {
                assert!(a.try_recv().is_ok(), "seed {seed}: message {i} answered");
            }
        }
    }
}
