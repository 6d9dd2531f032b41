//! The apply worker: batches the changesets the core hands out into the store, reports each
//! batch back to the loop, and quarantines versions the store rejects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{Event, Shared};
use crate::cluster::handle::lock;
use crate::store::{Changeset, SiteId};
use strata_core::quarantine::Recorded;

pub(super) async fn apply_worker(shared: Arc<Shared>, mut queue: mpsc::Receiver<Vec<Changeset>>) {
    loop {
        let first = tokio::select! {
            () = shared.cancel.cancelled() => return,
            first = queue.recv() => first,
        };
        let Some(mut batch) = first else { return };
        while batch.len() < shared.options.apply_batch_max {
            match queue.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        shared.metrics.apply_queue_depth.set(queue.len() as i64);
        let count = batch.len();
        apply(&shared, batch).await;
        // Applied, rejected or failed: no longer on its way.
        let reported = tokio::select! {
            () = shared.cancel.cancelled() => return,
            reported = shared.events.send(Event::Applied(count)) => reported,
        };
        if reported.is_err() {
            return;
        }
    }
}

/// Applies changesets and records batch size, latency and replication lag. A version the store
/// rejects is quarantined; a quarantined version waiting for its next attempt is not tried.
pub(super) async fn apply(shared: &Shared, mut batch: Vec<Changeset>) {
    {
        let quarantine = lock(&shared.quarantine);
        if !quarantine.is_empty() {
            let now = Instant::now();
            batch.retain(|c| quarantine.due(c.site, c.version, now));
        }
    }
    for (site, version) in shared.faults.take_refused(&mut batch) {
        quarantine_version(shared, site, version, "refused by fault injection");
    }
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let stamps: HashMap<(crate::store::SiteId, u64), u64> = batch
        .iter()
        .map(|c| ((c.site, c.version), c.ts.millis()))
        .collect();
    shared
        .metrics
        .apply_batch_changesets
        .observe(batch.len() as f64);
    match shared.store.apply(batch).await {
        Ok(applied) => {
            shared.metrics.apply_batches.inc();
            shared
                .metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
            let now = crate::store::WallClock::System.now_ms();
            let mut worst = 0;
            for key in &applied.versions {
                if let Some(ts) = stamps.get(key) {
                    let lag = now.saturating_sub(*ts);
                    worst = worst.max(lag);
                    shared
                        .metrics
                        .replication_lag_seconds
                        .observe(lag as f64 / 1000.0);
                }
            }
            if !applied.versions.is_empty() {
                shared.metrics.replication_lag_max_ms.set(worst as i64);
            }
            let mut quarantine = lock(&shared.quarantine);
            let mut cleared = false;
            for &(site, version) in &applied.versions {
                cleared |= quarantine.cleared(site, version);
            }
            if cleared {
                tracing::info!(
                    quarantined = quarantine.len(),
                    "a quarantined version was applied"
                );
            }
            drop(quarantine);
            for rejected in &applied.rejected {
                quarantine_version(shared, rejected.site, rejected.version, &rejected.reason);
            }
            shared
                .metrics
                .quarantined_versions
                .set(lock(&shared.quarantine).len() as i64);
        }
        Err(err) => tracing::error!(error = %err, "applying changes failed"),
    }
}

/// Puts a version this node could not apply or fetch into quarantine: logged at WARN and counted
/// the first time, rescheduled further out each time after.
pub(super) fn quarantine_version(shared: &Shared, site: SiteId, version: u64, reason: &str) {
    let mut quarantine = lock(&shared.quarantine);
    let recorded = quarantine.record(site, version, reason, Instant::now(), &mut rand::rng());
    let count = quarantine.len();
    drop(quarantine);
    shared.metrics.quarantined_versions.set(count as i64);
    match recorded {
        Recorded::New => {
            shared.metrics.quarantined.inc();
            tracing::warn!(%site, version, %reason, quarantined = count,
                "quarantined a version this node cannot apply; it is retried with back-off");
        }
        Recorded::Again => {
            tracing::debug!(%site, version, %reason, "a quarantined version failed again");
        }
        Recorded::Full => {
            shared.metrics.quarantine_full.inc();
            tracing::debug!(%site, version, %reason, "quarantine full; version not recorded");
        }
    }
}
