//! Grouping queued messages into batches: pure logic, no I/O.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use junction_proto::v1::Message;

/// Limits of one batch and how long a message may wait for company.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) linger: Duration,
}

/// The approximate encoded size of a message.
pub(crate) fn message_size(message: &Message) -> usize {
    let headers: usize = message
        .headers
        .iter()
        .map(|h| h.key.len() + h.value.len() + 4)
        .sum();
    message.payload.len() + message.key.as_ref().map_or(0, Vec::len) + headers + 16
}

/// A FIFO of items waiting to be batched, with their sizes.
#[derive(Debug)]
pub(crate) struct Accumulator<T> {
    queue: VecDeque<(T, usize)>,
    bytes: usize,
    oldest: Option<Instant>,
}

impl<T> Default for Accumulator<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            bytes: 0,
            oldest: None,
        }
    }
}

impl<T> Accumulator<T> {
    pub(crate) fn push(&mut self, item: T, size: usize, now: Instant) {
        if self.queue.is_empty() {
            self.oldest = Some(now);
        }
        self.bytes += size;
        self.queue.push_back((item, size));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.queue.front().map(|(item, _)| item)
    }

    /// When the oldest item's linger runs out.
    pub(crate) fn linger_deadline(&self, limits: &BatchLimits) -> Option<Instant> {
        self.oldest.map(|t| t + limits.linger)
    }

    /// Whether a batch should be taken now: a full batch is waiting, the oldest item lingered
    /// long enough, or `force` (flush / close).
    pub(crate) fn ready(&self, limits: &BatchLimits, now: Instant, force: bool) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        force
            || self.queue.len() >= limits.max_messages.max(1)
            || self.bytes >= limits.max_bytes
            || self
                .linger_deadline(limits)
                .is_some_and(|deadline| now >= deadline)
    }

    /// Takes the next batch from the front: at most `max_messages` items and, unless a single
    /// item is larger, at most `max_bytes`. What remains keeps the linger clock of the oldest
    /// item taken, so it never waits longer than `linger` past the batch it missed.
    pub(crate) fn take_batch(&mut self, limits: &BatchLimits) -> Vec<T> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((_, size)) = self.queue.front() {
            let size = *size;
            let full = batch.len() >= limits.max_messages.max(1)
                || (!batch.is_empty() && bytes + size > limits.max_bytes);
            if full {
                break;
            }
            if let Some((item, _)) = self.queue.pop_front() {
                bytes += size;
                self.bytes -= size;
                batch.push(item);
            }
        }
        if self.queue.is_empty() {
            self.oldest = None;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_messages: usize, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            max_messages,
            max_bytes,
            linger: Duration::from_millis(2),
        }
    }

    #[test]
    fn batches_respect_message_count() {
        let now = Instant::now();
        let l = limits(3, 1 << 20);
        let mut acc = Accumulator::default();
        for i in 0..7 {
            acc.push(i, 10, now);
        }
        assert!(acc.ready(&l, now, false));
        assert_eq!(acc.take_batch(&l), vec![0, 1, 2]);
        assert_eq!(acc.take_batch(&l), vec![3, 4, 5]);
        assert!(!acc.ready(&l, now, false), "one message, linger not passed");
        assert!(acc.ready(&l, now, true));
        assert!(acc.ready(&l, now + Duration::from_millis(2), false));
        assert_eq!(acc.take_batch(&l), vec![6]);
        assert!(acc.is_empty());
        assert_eq!(acc.linger_deadline(&l), None);
    }

    #[test]
    fn batches_respect_bytes_but_take_one_oversized_item() {
        let now = Instant::now();
        let l = limits(100, 100);
        let mut acc = Accumulator::default();
        acc.push("a", 40, now);
        acc.push("b", 40, now);
        acc.push("c", 40, now);
        acc.push("huge", 500, now);
        acc.push("d", 10, now);
        assert!(acc.ready(&l, now, false));
        assert_eq!(acc.take_batch(&l), vec!["a", "b"]);
        assert_eq!(acc.take_batch(&l), vec!["c"]);
        assert_eq!(acc.take_batch(&l), vec!["huge"]);
        assert_eq!(acc.len(), 1);
        assert!(!acc.ready(&l, now, false));
        assert_eq!(acc.take_batch(&l), vec!["d"]);
    }

    #[test]
    fn linger_clock_starts_with_the_first_item() {
        let t0 = Instant::now();
        let l = limits(10, 1000);
        let mut acc = Accumulator::default();
        assert!(!acc.ready(&l, t0, true), "empty is never ready");
        acc.push(1, 1, t0);
        acc.push(2, 1, t0 + Duration::from_millis(1));
        assert_eq!(acc.linger_deadline(&l), Some(t0 + Duration::from_millis(2)));
        assert!(!acc.ready(&l, t0 + Duration::from_millis(1), false));
        assert!(acc.ready(&l, t0 + Duration::from_millis(2), false));
    }

    #[test]
    fn message_size_counts_key_headers_and_payload() {
        let m = Message {
            key: Some(b"key".to_vec()),
            headers: vec![junction_proto::v1::Header {
                key: "h".into(),
                value: b"vv".to_vec(),
            }],
            payload: bytes::Bytes::from_static(b"hello"),
            partition: None,
            msg_id: None,
        };
        assert_eq!(message_size(&m), 5 + 3 + (1 + 2 + 4) + 16);
    }
}
