//! Large remote versions, merged in slices while client reads stay pinned.
//!
//! Measured with `strata-bench bigtx` (a 50,000-row version, 300,000 changes, 66 chunks): each
//! chunk is buffered in tens of milliseconds, but the chunk that completed the version took one
//! commit of 2.7 s (reading the buffer back, merging, deleting the buffer), and a 1-row local
//! write queued behind it waited as long. The merge reads what it is about to write, so nothing
//! of it can leave the write lock; it is split instead: a remote version of more than
//! [`SLICED_CHANGES_MIN`] changes is not merged in the group that completes it: the group only
//! records it (buffered chunks stay buffered, the partial stays, marked complete) and the writer
//! merges it afterwards in slices of about [`SLICE_CHANGES`] changes, one commit each, serving
//! whatever was queued between two slices. A local write waits for one slice at most.
//!
//! Readers must not see half of the version, so while a sliced merge runs, client queries read
//! the state pinned before its first slice (see `pin`, an SQLite snapshot). The costs, accepted:
//! - Anything committed during the pin, local writes included, is invisible to client queries
//!   until the pin ends (a client does not read its own write back meanwhile). Commit events
//!   still go out at once with their local versions (replication to peers does not wait) but
//!   the rows they changed are announced only when the pin ends, so that subscribers re-query
//!   when they can see them.
//! - The pin lasts at most [`SLICED_PIN_MAX`]: past it, the rest of the version is merged in one
//!   commit (a stall, as before this scheme, but a stuck merge cannot keep readers behind).
//! - The log cannot be checkpointed past the pin; it grows by what is written meanwhile.
//! - The version is marked held only in its last slice. A crash between slices leaves slices
//!   merged but the version not held: a buffered version (each slice deletes the buffered
//!   changes it merged, in its commit) resumes from the buffer when the store opens; one that
//!   arrived whole is fetched again from peers and merged again, which is idempotent (a cell or
//!   row event already merged carries the same stamp, so it changes nothing). Until then, after
//!   such a crash, readers see the slices merged before it.
//! - Sync serving and extraction are never pinned: they follow the bookkeeping, which does not

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::super::CommitEvent;
use super::super::change::{Change, SiteId};
use super::super::error::Result;
use super::super::pin::{self, Pin};
use super::super::writer::{Batch, Failure, Writer};
use super::Origin;
use super::partial::buffered_changes;

/// Remote versions with more changes than this are merged in slices (see the module doc): below
/// it a merge takes a few tens of milliseconds, which a local write can wait.
pub(crate) const SLICED_CHANGES_MIN: usize = 16_384;

/// Changes merged per slice (rounded up to whole rows): bounds how long a local write waits for
/// a slice, about 20-40 ms of merging here.
pub(crate) const SLICE_CHANGES: usize = 4_096;

/// How long client reads may stay pinned behind one sliced merge before the rest of the version
/// is merged in one commit: bounds how stale a client read can be.
pub(crate) const SLICED_PIN_MAX: Duration = Duration::from_secs(5);

/// Versions waiting for a sliced merge at most; more are merged whole in their group. Bounds the
/// memory of versions that arrived whole (a version holds up to `cells_max` changes).
pub(crate) const SLICED_VERSIONS_MAX: usize = 4;

/// The sliced merges of large remote versions (see the module doc).
#[derive(Default)]
pub(crate) struct Slicer {
    /// Versions to merge, in arrival order; the first one is being merged.
    pub(crate) jobs: VecDeque<Sliced>,
    /// The pin while the first job runs.
    pub(crate) pin: Option<Pin>,
    /// The connection that holds pins, kept between them.
    pub(crate) holder: Option<Connection>,
    /// Rows changed by commits during the pin, announced when it ends.
    pub(crate) deferred: Vec<(String, Vec<u8>)>,
}

/// A large remote version being merged in slices.
pub(crate) struct Sliced {
    pub(super) site: SiteId,
    pub(crate) origin: Origin,
    pub(super) source: Source,
    /// Rows its slices changed so far.
    pub(super) changed: usize,
    /// When its first slice began, and how many slices it took.
    pub(super) started: Option<Instant>,
    pub(super) slices: u32,
}

/// Where the changes of a sliced version come from.
pub(super) enum Source {
    /// It arrived whole: its changes, and the index where the next slice starts.
    Memory { changes: Vec<Change>, next: usize },
    /// Its chunks are buffered: the seq where the next slice starts.
    Buffered { next_seq: u32 },
}

impl Writer {
    /// Whether one more version may wait for a sliced merge (see [`SLICED_VERSIONS_MAX`]).
    pub(crate) fn can_slice(&self, batch: &Batch) -> bool {
        self.slicer.jobs.len() + batch.sliced.len() < SLICED_VERSIONS_MAX
    }

    pub(crate) fn count_sliced_pending(&self) {
        self.shared
            .stats
            .sliced_pending
            .store(self.slicer.jobs.len() as u64, Ordering::Relaxed);
    }

    /// Versions whose chunks were all buffered but which were not merged whole (a crash between
    /// slices): merged again from the buffer, in slices.
    pub(crate) fn resume_sliced(&mut self) {
        for (&ord, book) in &self.books.sites {
            let Some(&site) = self.books.ids.get(&ord) else {
                continue;
            };
            for (&version, partial) in &book.partials {
                if partial.is_complete() && self.slicer.jobs.len() < SLICED_VERSIONS_MAX {
                    tracing::info!(%site, version, "resuming the sliced merge of a large version");
                    self.slicer.jobs.push_back(Sliced {
                        site,
                        origin: Origin {
                            ord,
                            version,
                            ts: partial.ts,
                        },
                        source: Source::Buffered { next_seq: 0 },
                        changed: 0,
                        started: None,
                        slices: 0,
                    });
                }
            }
        }
        self.count_sliced_pending();
    }

    /// Merges the next slice of the first sliced version, in a commit of its own (`whole`: all
    /// the rest of it). Pins client reads before the first slice; unpins after the last.
    pub(crate) fn slice(&mut self, whole: bool) {
        let Some(mut job) = self.slicer.jobs.pop_front() else {
            return;
        };
        let mut whole = whole;
        let started = *job.started.get_or_insert_with(Instant::now);
        job.slices += 1;
        if self.slicer.pin.is_none() {
            match self.take_pin() {
                Ok(pin) => self.slicer.pin = Some(pin),
                Err(err) => {
                    // Fail closed: without a pin readers would see slices, so merge it whole.
                    tracing::warn!(error = %err, "could not pin reads; merging a large version whole");
                    whole = true;
                }
            }
        }
        if self
            .slicer
            .pin
            .as_ref()
            .is_some_and(|p| p.since.elapsed() > SLICED_PIN_MAX)
        {
            if !whole {
                tracing::warn!(
                    site = %job.site,
                    version = job.origin.version,
                    "a sliced merge outlasted its pin; merging the rest of it at once"
                );
            }
            whole = true;
        }
        let result = self.alone(|w, batch| {
            w.merge_slice(&mut job, whole, batch)
                .map_err(Failure::Dirty)
        });
        match result {
            Ok(false) => self.slicer.jobs.push_front(job),
            Ok(true) => {
                tracing::info!(
                    site = %job.site,
                    version = job.origin.version,
                    slices = job.slices,
                    rows_changed = job.changed,
                    ms = started.elapsed().as_millis() as u64,
                    "merged a large remote version in slices"
                );
                self.unpin();
            }
            Err(err) => {
                tracing::warn!(
                    site = %job.site,
                    version = job.origin.version,
                    error = %err,
                    "a sliced merge failed; the version stays missing and is fetched again"
                );
                self.shared
                    .stats
                    .rejected_total
                    .fetch_add(1, Ordering::Relaxed);
                if matches!(job.source, Source::Buffered { .. }) {
                    let ord = job.origin.ord;
                    let version = job.origin.version;
                    let _ = self.alone(|w, _| {
                        w.books
                            .sites
                            .entry(ord)
                            .or_default()
                            .drop_partial(&w.conn, ord, version)
                            .map_err(Failure::Dirty)
                    });
                }
                self.unpin();
            }
        }
        self.count_sliced_pending();
    }

    /// Merges one slice of `job` (or all the rest) inside the open transaction; in the last one
    /// marks the version held. Returns whether the version is done.
    fn merge_slice(&mut self, job: &mut Sliced, whole: bool, batch: &mut Batch) -> Result<bool> {
        let limit = if whole { usize::MAX } else { SLICE_CHANGES };
        let origin = job.origin;
        batch.slice = true;
        let done = match &mut job.source {
            Source::Memory { changes, next } => {
                let start = *next;
                let mut end = start.saturating_add(limit).min(changes.len());
                // Whole rows: a row's changes come one after another.
                while end < changes.len()
                    && end > start
                    && changes[end].table == changes[end - 1].table
                    && changes[end].pk == changes[end - 1].pk
                {
                    end += 1;
                }
                job.changed += self.merge_all(origin, &changes[start..end], &mut batch.event)?;
                *next = end;
                end >= changes.len()
            }
            Source::Buffered { next_seq } => {
                let mut slice =
                    buffered_changes(&self.conn, origin.ord, origin.version, *next_seq, limit)?;
                let done = slice.len() < limit;
                if !done {
                    // Whole rows: the last row may go on in the next page.
                    let last = slice.len() - 1;
                    let cut = (0..=last)
                        .rev()
                        .take_while(|&i| {
                            slice[i].table == slice[last].table && slice[i].pk == slice[last].pk
                        })
                        .last()
                        .unwrap_or(0);
                    if cut > 0 {
                        slice.truncate(cut);
                    }
                }
                let from = *next_seq;
                if let Some(last) = slice.last() {
                    *next_seq = last.seq.saturating_add(1);
                }
                job.changed += self.merge_all(origin, &slice, &mut batch.event)?;
                // Forgotten in the commit that merged them: the last slice need not delete the
                // whole buffer (hundreds of milliseconds), and a resumed merge starts after them.
                self.conn
                    .prepare_cached(
                        "DELETE FROM __strata_buffered
                         WHERE ord = ?1 AND version = ?2 AND seq >= ?3 AND seq < ?4",
                    )?
                    .execute(rusqlite::params![
                        origin.ord,
                        super::super::book::to_sql(origin.version),
                        from,
                        *next_seq
                    ])?;
                done
            }
        };
        if !done {
            return Ok(false);
        }
        let (ord, version) = (origin.ord, origin.version);
        let book = self.books.sites.entry(ord).or_default();
        if book.partials.contains_key(&version) {
            book.drop_partial(&self.conn, ord, version)?;
        }
        book.mark(&self.conn, ord, version)?;
        batch.touched.insert(ord);
        batch.event.applied.push((job.site, version));
        batch.unpin = true;
        Ok(true)
    }

    /// Pins client reads to the newest committed state.
    fn take_pin(&mut self) -> Result<Pin> {
        let holder = match self.slicer.holder.take() {
            Some(holder) => holder,
            None => pin::open_holder(&self.path)?,
        };
        Pin::take(holder, &self.shared.pin)
    }

    /// Ends the pin and announces the rows changed while it lasted.
    fn unpin(&mut self) {
        if let Some(pin) = self.slicer.pin.take() {
            self.slicer.holder = Some(pin.release(&self.shared.pin));
        }
        let mut changed = std::mem::take(&mut self.slicer.deferred);
        if changed.is_empty() {
            return;
        }
        changed.sort();
        changed.dedup();
        let event = CommitEvent {
            changed,
            ..CommitEvent::default()
        };
        let _ = self.shared.events.send(Arc::new(event));
    }
}
