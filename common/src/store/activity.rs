//! What the store's threads are doing right now, for readiness and the watchdog.
//!
//! The writer and the checkpointer each mark when they start a piece of work and clear the mark
//! when it ends; a reader of [`StoreHealth`] sees how long the current piece has been running.
//! One atomic store per mark: nothing here can slow or block the threads it watches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the store's threads are doing, for readiness and the watchdog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Requests waiting in the writer's queue.
    pub queued: usize,
    /// How long the writer has been working on its current group; `None` while it waits for work.
    pub writer_busy: Option<Duration>,
    /// How long the checkpointer has been in its current checkpoint; `None` while it sleeps.
    pub checkpointer_busy: Option<Duration>,
    /// Set while writes fail because the disk is full: which file system, in words.
    pub disk_full: Option<String>,
}

/// The marks the store's threads keep. Times are milliseconds since `epoch`, plus one, so that
/// zero means idle.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    writer_since: AtomicU64,
    checkpointer_since: AtomicU64,
    disk_full: Mutex<Option<String>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            writer_since: AtomicU64::new(0),
            checkpointer_since: AtomicU64::new(0),
            disk_full: Mutex::new(None),
        }
    }
}

/// Which thread a mark belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Worker {
    Writer,
    Checkpointer,
}

impl Activity {
    fn mark(&self, worker: Worker) -> &AtomicU64 {
        match worker {
            Worker::Writer => &self.writer_since,
            Worker::Checkpointer => &self.checkpointer_since,
        }
    }

    /// `worker` starts a piece of work.
    pub(crate) fn begin(&self, worker: Worker) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.mark(worker).store(now + 1, Ordering::Relaxed);
    }

    /// `worker` finished its piece of work and waits for the next.
    pub(crate) fn end(&self, worker: Worker) {
        self.mark(worker).store(0, Ordering::Relaxed);
    }

    /// How long `worker` has been busy, if it is.
    pub(crate) fn busy(&self, worker: Worker) -> Option<Duration> {
        let since = self.mark(worker).load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        Some(Duration::from_millis(now.saturating_sub(since)))
    }

    /// Records that writes fail for a full disk (`Some`), or succeed again (`None`).
    pub(crate) fn set_disk_full(&self, what: Option<String>) {
        *self
            .disk_full
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = what;
    }

    /// The full file system, while writes fail for it.
    pub(crate) fn disk_full(&self) -> Option<String> {
        self.disk_full
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reports_busy_until_it_ends() {
        let activity = Activity::default();
        assert_eq!(activity.busy(Worker::Writer), None);
        activity.begin(Worker::Writer);
        assert!(activity.busy(Worker::Writer).is_some());
        assert_eq!(activity.busy(Worker::Checkpointer), None);
        activity.end(Worker::Writer);
        assert_eq!(activity.busy(Worker::Writer), None);
    }
}
