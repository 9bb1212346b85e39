//! Group commit: one thread fsyncs on behalf of every append queued since its last fsync,
//! across all Raft groups of the node — the shared WAL once, and each segment file (and new
//! directory entry) that a queued append wrote to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use rocksdb::DB;

use crate::segment::SyncSet;

/// Called once the WAL is durable (or the fsync failed).
pub type FlushCallback = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// What one append waits for: the WAL, segment files, or both.
pub(crate) struct Job {
    pub(crate) wal: bool,
    pub(crate) files: SyncSet,
    pub(crate) cb: FlushCallback,
}

pub(crate) struct Flusher {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    pub(crate) fn start(db: Arc<DB>, poisoned: Arc<AtomicBool>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("junction-wal-sync".into())
            .spawn(move || run(db, poisoned, rx));
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "could not start the WAL sync thread");
                None
            }
        };
        Self {
            tx: Some(tx),
            thread,
        }
    }

    pub(crate) fn submit(&self, job: Job) {
        let Some(tx) = &self.tx else {
            return (job.cb)(Err(std::io::Error::other(
                "the WAL sync thread has stopped",
            )));
        };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            (job.cb)(Err(std::io::Error::other(
                "the WAL sync thread has stopped",
            )));
        }
    }
}

impl Drop for Flusher {
    /// Stops the thread after it has answered every queued callback, so that the thread's
    /// handle on the DB is gone when the store is dropped (the DB can then be reopened).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ignored = t.join();
        }
    }
}

fn run(db: Arc<DB>, poisoned: Arc<AtomicBool>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let wal = waiting.iter().any(|j| j.wal);
        let files = SyncSet::union(waiting.iter_mut().map(|j| std::mem::take(&mut j.files)));
        // A failed fsync leaves the page cache in an unknown state (fsyncgate): never report
        // success again after one, so no write is acknowledged that might not be on disk.
        let result = if poisoned.load(Ordering::Acquire) {
            Err("the store is poisoned by an earlier failed fsync".to_string())
        } else {
            let wal = if wal {
                db.flush_wal(true).map_err(|e| e.to_string())
            } else {
                Ok(())
            };
            wal.and_then(|()| files.sync().map_err(|e| e.to_string()))
                .inspect_err(|e| {
                    poisoned.store(true, Ordering::Release);
                    tracing::error!(error = %e, "fsync failed; the store is now poisoned");
                })
        };
        for job in waiting {
            (job.cb)(result.clone().map_err(std::io::Error::other));
        }
    }
}
