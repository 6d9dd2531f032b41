//! A node's apply queue: changesets the core handed over wait here for the (simulated) store.
//!
//! As in the driver, the core bounds what is on its way into the store (it drops over its
//! in-flight bound and hears `Input::Applied` when a batch is done), so the queue itself needs
//! no bound; one batch is applied at a time, taking a delay that grows with its size.

use std::collections::VecDeque;
use std::time::Duration;

use strata_common::store::Changeset;

/// Settings of the simulated apply.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// Changesets applied in one store call at most (the driver's `apply_batch_max`).
    pub batch_max: usize,
    /// Time of one store call.
    pub delay: Duration,
    /// Extra time per changeset applied.
    pub per_changeset: Duration,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_max: 4096,
            delay: Duration::from_micros(500),
            per_changeset: Duration::from_micros(20),
        }
    }
}

/// One node's apply queue and the batch being applied.
#[derive(Debug, Default)]
pub struct ApplyQueue {
    queue: VecDeque<Vec<Changeset>>,
    running: Option<Vec<Changeset>>,
}

impl ApplyQueue {
    /// Queues a batch.
    pub fn offer(&mut self, batch: Vec<Changeset>) {
        self.queue.push_back(batch);
    }

    /// If nothing is being applied, takes the next batch (merging queued ones up to the batch
    /// bound) and returns how long applying it takes.
    pub fn start(&mut self, config: &ApplyConfig) -> Option<Duration> {
        if self.running.is_some() {
            return None;
        }
        let mut batch = self.queue.pop_front()?;
        while batch.len() < config.batch_max
            && let Some(more) = self.queue.pop_front()
        {
            batch.extend(more);
        }
        let delay = config.delay + config.per_changeset * batch.len() as u32;
        self.running = Some(batch);
        Some(delay)
    }

    /// The batch whose apply finished.
    pub fn finish(&mut self) -> Vec<Changeset> {
        self.running.take().unwrap_or_default()
    }

    /// Drops everything (the node crashed); returns how many changesets were lost.
    pub fn clear(&mut self) -> usize {
        let lost = self.queue.iter().map(Vec::len).sum::<usize>()
            + self.running.take().map_or(0, |b| b.len());
        self.queue.clear();
        lost
    }
}
