//! The tail window: the most recently applied messages of a partition, kept in memory so that
//! readers following the end of the log (`Tail`, `Read` near the end, consumer-group delivery)
//! never touch RocksDB.
//!
//! A window holds a contiguous run of offsets `[first, first + len)` ending at the last
//! applied message, each as the encoded `StoredRecord` that is also stored (a `Bytes`, so a
//! reader takes a reference, not a copy). The state machine appends after each apply and
//! before it publishes the new state, so a reader that saw the state finds every message up to
//! it here unless the window let it go. Retention and compaction cut the window as they cut
//! the store; a snapshot install empties it.
//!
//! Memory is bounded per node by a [`TailBudget`] shared by every window of the node, and per
//! window by the budget's per-window share. A window over either bound lets go of its oldest
//! messages; one the budget cannot hold at all (every byte taken by other windows) is emptied
//! and starts again at the next apply. Windows nobody appended to for a sweep period are
//! emptied by [`TailWindow::sweep_idle`], so idle partitions do not keep memory that busy ones
//! need. A read the window does not cover returns `None`: the caller reads the store.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

/// What one message costs a window besides its bytes (the `Bytes` handle and its slot).
pub const ENTRY_OVERHEAD: usize = 48;

/// The memory every tail window of a node shares.
#[derive(Debug)]
pub struct TailBudget {
    limit: usize,
    per_window: usize,
    used: AtomicUsize,
}

impl TailBudget {
    /// A budget of `limit` bytes for the node (0 turns the windows off). One window may use
    /// at most a quarter of it, or all of it when that is under 1 MiB, so that a few busy
    /// partitions share it.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            per_window: (limit / 4).max(limit.min(1 << 20)),
            used: AtomicUsize::new(0),
        })
    }

    /// The node's limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bytes every window of the node holds now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }
}

#[derive(Debug, Default)]
struct Window {
    /// The offset of `entries[0]`.
    first: u64,
    entries: VecDeque<Bytes>,
    /// The bytes the entries cost (their lengths plus [`ENTRY_OVERHEAD`] each).
    bytes: usize,
    /// Appended to since the last [`TailWindow::sweep_idle`].
    touched: bool,
}

impl Window {
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

/// The tail window of one partition replica (see the module docs).
#[derive(Debug)]
pub struct TailWindow {
    budget: Arc<TailBudget>,
    inner: RwLock<Window>,
}

impl TailWindow {
    /// An empty window drawing on `budget`.
    pub fn new(budget: Arc<TailBudget>) -> Self {
        Self {
            budget,
            inner: RwLock::new(Window::default()),
        }
    }

    /// Adds the messages applied at `base, base + 1, …`. A gap after the window's end (a
    /// snapshot, a message the budget could not hold) starts the window again at `base`.
    pub fn append(&self, base: u64, records: Vec<Bytes>) {
        if self.budget.limit == 0 || records.is_empty() {
            return;
        }
        let mut w = self.inner.write();
        w.touched = true;
        if w.entries.is_empty() || w.end() != base {
            self.release(&mut w, usize::MAX);
            w.first = base;
        }
        for r in records {
            let cost = r.len() + ENTRY_OVERHEAD;
            if cost > self.budget.per_window {
                // Bigger than a window may be: nothing before it stays contiguous with what
                // follows, so start again after it.
                self.release(&mut w, usize::MAX);
                w.first = w.first + w.entries.len() as u64 + 1;
                continue;
            }
            w.entries.push_back(r);
            w.bytes += cost;
            self.budget.used.fetch_add(cost, Ordering::Relaxed);
            while w.bytes > self.budget.per_window || (self.budget.over() && !w.entries.is_empty())
            {
                self.release(&mut w, 1);
            }
        }
    }

    /// Lets go of up to `n` of the oldest messages.
    fn release(&self, w: &mut Window, n: usize) {
        let mut freed = 0;
        let mut count = 0;
        while count < n {
            let Some(e) = w.entries.pop_front() else {
                break;
            };
            freed += e.len() + ENTRY_OVERHEAD;
            count += 1;
        }
        w.first += count as u64;
        w.bytes -= freed;
        self.budget.used.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Returns the messages from `from` below `upto`, at most `max_count` and stopping once
    /// `max_bytes` is reached (at least one), as `Store::read_messages` does; `None` when the
    /// window does not hold `from`.
    pub fn read(
        &self,
        from: u64,
        upto: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Option<Vec<(u64, Bytes)>> {
        let w = self.inner.read();
        if from < w.first || from >= w.end() || from >= upto {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = usize::try_from(from - w.first).ok()?;
        for (i, e) in w.entries.iter().enumerate().skip(start) {
            let offset = w.first + i as u64;
            if offset >= upto {
                break;
            }
            bytes += e.len();
            out.push((offset, e.clone()));
            if out.len() >= max_count || bytes >= max_bytes {
                break;
            }
        }
        Some(out)
    }

    /// Drops the messages below `offset` (a retention or compaction cut).
    pub fn trim_below(&self, offset: u64) {
        let mut w = self.inner.write();
        let n = offset.saturating_sub(w.first);
        self.release(&mut w, usize::try_from(n).unwrap_or(usize::MAX));
        if w.entries.is_empty() {
            w.first = w.first.max(offset);
        }
    }

    /// Empties the window (a snapshot replaced the partition's state).
    pub fn clear(&self) {
        let mut w = self.inner.write();
        self.release(&mut w, usize::MAX);
    }

    /// Empties the window if nothing was appended since the last call; returns whether it did
    /// free anything.
    pub fn sweep_idle(&self) -> bool {
        let mut w = self.inner.write();
        if std::mem::take(&mut w.touched) || w.entries.is_empty() {
            return false;
        }
        self.release(&mut w, usize::MAX);
        true
    }

    /// The offsets the window holds, `[first, end)`.
    pub fn range(&self) -> (u64, u64) {
        let w = self.inner.read();
        (w.first, w.end())
    }

    /// The bytes the window holds.
    pub fn bytes(&self) -> usize {
        self.inner.read().bytes
    }
}

impl Drop for TailWindow {
    fn drop(&mut self) {
        let bytes = self.inner.get_mut().bytes;
        self.budget.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    fn offsets(v: Option<Vec<(u64, Bytes)>>) -> Option<Vec<u64>> {
        v.map(|v| v.into_iter().map(|(o, _)| o).collect())
    }

    #[test]
    fn reads_follow_the_store_rules() {
        let w = TailWindow::new(TailBudget::new(1 << 20));
        w.append(10, (0..5).map(|_| msg(100)).collect());
        assert_eq!(w.range(), (10, 15));
        assert_eq!(
            offsets(w.read(9, 15, 10, 1 << 20)),
            None,
            "below the window"
        );
        assert_eq!(offsets(w.read(15, 16, 10, 1 << 20)), None, "at its end");
        assert_eq!(
            offsets(w.read(11, 15, 10, 1 << 20)),
            Some(vec![11, 12, 13, 14])
        );
        assert_eq!(offsets(w.read(11, 13, 10, 1 << 20)), Some(vec![11, 12]));
        assert_eq!(offsets(w.read(11, 15, 2, 1 << 20)), Some(vec![11, 12]));
        // Stops once the bytes reach the limit, and always returns one.
        assert_eq!(offsets(w.read(10, 15, 10, 150)), Some(vec![10, 11]));
        assert_eq!(offsets(w.read(10, 15, 10, 1)), Some(vec![10]));
        assert_eq!(w.read(12, 13, 1, 1).unwrap()[0].1, msg(100));
    }

    #[test]
    fn a_gap_starts_the_window_again() {
        let budget = TailBudget::new(1 << 20);
        let w = TailWindow::new(budget.clone());
        w.append(0, vec![msg(10), msg(10)]);
        w.append(5, vec![msg(10)]);
        assert_eq!(w.range(), (5, 6));
        assert_eq!(w.read(0, 6, 10, 1 << 20), None);
        assert_eq!(budget.used(), 10 + ENTRY_OVERHEAD);
        w.append(6, vec![msg(10)]);
        assert_eq!(w.range(), (5, 7));
    }

    #[test]
    fn a_window_keeps_to_its_share_and_the_node_to_its_limit() {
        // 4 MiB node: 1 MiB per window.
        let budget = TailBudget::new(4 << 20);
        let a = TailWindow::new(budget.clone());
        a.append(0, (0..3000).map(|_| msg(1000)).collect());
        assert!(a.bytes() <= 1 << 20, "{}", a.bytes());
        let (first, end) = a.range();
        assert_eq!(end, 3000);
        assert!(first > 0);
        assert_eq!(budget.used(), a.bytes());
        // Five busy windows on a four-window budget: the node stays under its limit.
        let more: Vec<TailWindow> = (0..4).map(|_| TailWindow::new(budget.clone())).collect();
        for (i, w) in more.iter().enumerate() {
            w.append(0, (0..3000).map(|_| msg(1000 + i)).collect());
        }
        assert!(budget.used() <= 4 << 20, "{}", budget.used());
        let total: usize = more.iter().map(TailWindow::bytes).sum::<usize>() + a.bytes();
        assert_eq!(budget.used(), total);
        drop(more);
        assert_eq!(budget.used(), a.bytes());
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_message_bigger_than_a_window_is_skipped_and_the_window_restarts_after_it() {
        let budget = TailBudget::new(1 << 20);
        let w = TailWindow::new(budget.clone());
        w.append(0, vec![msg(10), msg(2 << 20), msg(10)]);
        assert_eq!(w.range(), (2, 3));
        assert_eq!(offsets(w.read(1, 3, 10, 1 << 20)), None);
        assert_eq!(offsets(w.read(2, 3, 10, 1 << 20)), Some(vec![2]));
        assert_eq!(budget.used(), 10 + ENTRY_OVERHEAD);
    }

    #[test]
    fn cuts_clears_and_sweeps_release_memory() {
        let budget = TailBudget::new(1 << 20);
        let w = TailWindow::new(budget.clone());
        w.append(0, (0..10).map(|_| msg(10)).collect());
        w.trim_below(4);
        assert_eq!(w.range(), (4, 10));
        assert_eq!(budget.used(), 6 * (10 + ENTRY_OVERHEAD));
        // A cut beyond the end leaves an empty window that starts there.
        w.trim_below(20);
        assert_eq!(w.range(), (20, 20));
        assert_eq!(budget.used(), 0);
        w.append(20, vec![msg(10)]);
        assert!(!w.sweep_idle(), "appended since the last sweep");
        assert!(w.sweep_idle(), "idle for a whole sweep period");
        assert_eq!(budget.used(), 0);
        w.append(21, vec![msg(10)]);
        w.clear();
        assert_eq!(budget.used(), 0);
        assert_eq!(w.read(21, 22, 1, 1), None);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let budget = TailBudget::new(0);
        let w = TailWindow::new(budget.clone());
        w.append(0, vec![msg(10)]);
        assert_eq!(w.read(0, 1, 1, 1), None);
        assert_eq!(budget.used(), 0);
    }

    /// Seeded model: random appends, cuts, clears and sweeps against a plain map of what the
    /// store holds; whatever the window answers must equal the store's answer, and the budget
    /// must equal the windows' bytes.
    #[test]
    fn the_window_never_answers_differently_from_the_store() {
        let mut rng = junction_testkit::SplitMix(0x5eed);
        let mut next = move |n: u64| rng.below(n);
        let budget = TailBudget::new(64 << 10);
        let w = TailWindow::new(budget.clone());
        let mut store: std::collections::BTreeMap<u64, Bytes> = Default::default();
        let mut end = 0u64;
        let mut hits = 0;
        for _ in 0..20_000 {
            match next(20) {
                0..=11 => {
                    let n = 1 + next(8) as usize;
                    let recs: Vec<Bytes> = (0..n)
                        .map(|i| Bytes::from(vec![(end + i as u64) as u8; 1 + next(3000) as usize]))
                        .collect();
                    for (i, r) in recs.iter().enumerate() {
                        store.insert(end + i as u64, r.clone());
                    }
                    w.append(end, recs);
                    end += n as u64;
                }
                12 => {
                    let cut = end.saturating_sub(next(50));
                    store.retain(|o, _| *o >= cut);
                    w.trim_below(cut);
                }
                13 => {
                    w.sweep_idle();
                }
                _ => {
                    let from = end.saturating_sub(next(100));
                    let (count, bytes) = (1 + next(20) as usize, 1 + next(20_000) as usize);
                    if let Some(got) = w.read(from, end, count, bytes) {
                        hits += 1;
                        let mut want = Vec::new();
                        let mut b = 0;
                        for (o, r) in store.range(from..end) {
                            b += r.len();
                            want.push((*o, r.clone()));
                            if want.len() >= count || b >= bytes {
                                break;
                            }
                        }
                        assert_eq!(got, want);
                    }
                }
            }
            assert_eq!(budget.used(), w.bytes());
            assert!(w.bytes() <= budget.per_window);
        }
        assert!(hits > 1000, "the window answered {hits} reads");
    }
}
