//! Remote apply: merging peers' versions into the local tables (capture is off while this runs).
//! The CRDT rules are read here and in the files beside this one.
//!
//! Per row, causal length first: a change from an older life of the row is dropped; a row event
//! of a newer life moves the row there (an even life deletes it; an odd one resets every cell to
//! its default, or creates the row with defaults). A cell of a newer life whose row event has not
//! been applied here waits for it (see `waiting`) instead of making the row visible: a row life
//! becomes visible only once the write that began it arrived. Within one life each cell is a
//! last-writer-wins register ordered by (timestamp, site id, seq); a cell with no clock entry is
//! its default at timestamp zero. A winning value equal to the current one still takes the clock
//! (so every replica ends with the same metadata) but does not rewrite the row. Row events of the
//! same life keep the greatest stamp, again so metadata converges. The rules, with examples, are
//! in `docs/merge-rules.md`.
//!
//! Changes for a table or column this node does not have yet are parked, with all their
//! metadata, and merged by the same rules when the schema arrives.
//!
//! Merging is commutative and idempotent: replaying a change, or receiving changes in any order,
//! ends in the same state.
//!
//! - This file: the changeset side, run by the writer inside a group commit. A changeset is
//!   validated, checked against the bookkeeping (a version already held is a duplicate; our own
//!   site's versions are never taken from elsewhere), then merged whole and marked held, or
//!   buffered as a chunk of a partial version until every seq arrived (see `partial`).
//! - `row`: a row's life by causal length, and the fast path for rows never seen here.
//! - `cell`: a cell as a last-writer-wins register within one life.
//! - `park`: changes for a table or column this node does not know yet.
//! - `slice`: versions too large for one commit, merged in slices with client reads pinned.

mod cell;
mod park;
mod partial;
mod row;
mod slice;

use std::sync::atomic::Ordering;

use super::book::{self, Ord, Partial};
use super::change::{Change, Changeset};
use super::error::{Result, StoreError};
use super::hlc::{Observed, Timestamp};
use super::table::ROW_EVENT;
use super::writer::{Batch, Failure, Writer};
use super::{Applied, CommitEvent, Rejected};

pub(crate) use park::{parked_for, unpark};
pub(crate) use row::{RowMerger, local_lives_arrived, merge};
pub(crate) use slice::{Sliced, Slicer};

use partial::{buffered_changes, reassemble};
use slice::{SLICED_CHANGES_MIN, Source};

/// What merging one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merged {
    /// The base row changed (inserted, updated or deleted).
    Changed,
    /// Only metadata changed, or nothing at all.
    Unchanged,
    /// Parked until the schema knows its table or column.
    Parked,
    /// A cell waiting for the row event of its row life (see `waiting`).
    Waiting,
}

/// The context a change is merged in: who wrote it and where it came from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub(crate) ord: Ord,
    pub(crate) version: u64,
    pub(crate) ts: Timestamp,
}

impl Writer {
    /// Applies remote changesets inside the open transaction. A changeset refused before it
    /// wrote anything is reported and skipped; a failure after it may have written aborts.
    pub(crate) fn run_apply(
        &mut self,
        changesets: &[Changeset],
        wall_ms: u64,
        batch: &mut Batch,
    ) -> Result<Applied, Failure> {
        let mut applied = Applied::default();
        for changeset in reassemble(changesets) {
            let changeset = changeset.as_ref();
            let (site, version) = (changeset.site, changeset.version);
            match self.apply_one(changeset, wall_ms, batch)? {
                Ok(Outcome::Applied { changed }) => {
                    applied.versions.push((site, version));
                    applied.rows_changed += changed;
                    batch.event.applied.push((site, version));
                }
                Ok(Outcome::Buffered | Outcome::Sliced) => applied.buffered += 1,
                Ok(Outcome::Duplicate) => applied.duplicates += 1,
                Err(err) => {
                    tracing::warn!(%site, version, error = %err, "rejected a changeset");
                    self.shared
                        .stats
                        .rejected_total
                        .fetch_add(1, Ordering::Relaxed);
                    applied.rejected.push(Rejected {
                        site,
                        version,
                        reason: err.to_string(),
                    });
                }
            }
        }
        let stats = &self.shared.stats;
        stats
            .applied_versions_total
            .fetch_add(applied.versions.len() as u64, Ordering::Relaxed);
        stats
            .duplicates_total
            .fetch_add(applied.duplicates as u64, Ordering::Relaxed);
        Ok(applied)
    }

    /// Applies one changeset. The outer error means it failed after it may have written; the
    /// inner one that it was refused untouched.
    fn apply_one(
        &mut self,
        changeset: &Changeset,
        wall_ms: u64,
        batch: &mut Batch,
    ) -> Result<Result<Outcome>, Failure> {
        if let Err(err) = changeset.validate() {
            return Ok(Err(err.into()));
        }
        if changeset.site == self.shared.site {
            // Never take content for our own site from elsewhere: we wrote it, or it never was.
            let head = self.books.sites.get(&self.shared.ord).map_or(0, |b| b.head);
            return Ok(if changeset.version <= head {
                Ok(Outcome::Duplicate)
            } else {
                Err(StoreError::Malformed(format!(
                    "version {} of our own site is beyond our head {head}",
                    changeset.version
                )))
            });
        }
        if self.clock.observe(changeset.ts, wall_ms) == Observed::FarFuture {
            self.shared
                .stats
                .far_future_total
                .fetch_add(1, Ordering::Relaxed);
        }
        let ord = self
            .books
            .ord_of(&self.conn, changeset.site)
            .map_err(Failure::Dirty)?;
        let version = changeset.version;
        let sliced = |s: &Sliced| s.origin.ord == ord && s.origin.version == version;
        if self.books.sites.get(&ord).is_some_and(|b| b.has(version))
            || self.slicer.jobs.iter().any(sliced)
            || batch.sliced.iter().any(sliced)
        {
            return Ok(Ok(Outcome::Duplicate));
        }
        let outcome = self
            .merge_changeset(ord, changeset, wall_ms, batch)
            .map_err(Failure::Dirty)?;
        batch.touched.insert(ord);
        Ok(Ok(outcome))
    }

    fn merge_changeset(
        &mut self,
        ord: Ord,
        changeset: &Changeset,
        wall_ms: u64,
        batch: &mut Batch,
    ) -> Result<Outcome> {
        let version = changeset.version;
        let has_partial = self
            .books
            .sites
            .get(&ord)
            .is_some_and(|b| b.partials.contains_key(&version));
        let origin = Origin {
            ord,
            version,
            ts: changeset.ts,
        };
        if changeset.is_complete() && !has_partial {
            if changeset.changes.len() > SLICED_CHANGES_MIN && self.can_slice(batch) {
                batch.sliced.push(Sliced {
                    site: changeset.site,
                    origin,
                    source: Source::Memory {
                        changes: changeset.changes.clone(),
                        next: 0,
                    },
                    changed: 0,
                    started: None,
                    slices: 0,
                });
                return Ok(Outcome::Sliced);
            }
            let changed = self.merge_all(origin, &changeset.changes, &mut batch.event)?;
            let book = self.books.sites.entry(ord).or_default();
            book.mark(&self.conn, ord, version)?;
            return Ok(Outcome::Applied { changed });
        }
        // Part of a version: buffer it until every seq is covered.
        let book = self.books.sites.entry(ord).or_default();
        let partial = book.partials.entry(version).or_insert_with(|| Partial {
            ts: changeset.ts,
            last_seq: changeset.last_seq,
            have: Default::default(),
            since_ms: wall_ms,
        });
        partial.last_seq = partial.last_seq.min(changeset.last_seq);
        if partial.have.gaps(&changeset.seqs()).next().is_none() {
            return Ok(Outcome::Duplicate);
        }
        partial.cover(changeset.seqs(), changeset.last_seq);
        let complete = partial.is_complete();
        let mut buffer = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO __strata_buffered (ord, version, seq, tbl, pk, col, val, cl)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for change in &changeset.changes {
            buffer.execute(rusqlite::params![
                ord,
                book::to_sql(version),
                change.seq,
                change.table,
                change.pk,
                change.column.as_deref().unwrap_or(ROW_EVENT),
                change.value,
                book::to_sql(change.cl),
            ])?;
        }
        drop(buffer);
        if !complete {
            book.save_partial(&self.conn, ord, version)?;
            self.shared
                .stats
                .buffered_chunks_total
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Outcome::Buffered);
        }
        let last_seq = partial.last_seq;
        if last_seq as usize > SLICED_CHANGES_MIN && self.can_slice(batch) {
            // The complete partial stays recorded, so a crash before the last slice resumes.
            let book = self.books.sites.entry(ord).or_default();
            book.save_partial(&self.conn, ord, version)?;
            batch.sliced.push(Sliced {
                site: changeset.site,
                origin,
                source: Source::Buffered { next_seq: 0 },
                changed: 0,
                started: None,
                slices: 0,
            });
            return Ok(Outcome::Sliced);
        }
        let changes = buffered_changes(&self.conn, ord, version, 0, u32::MAX as usize)?;
        if cfg!(debug_assertions)
            && let Some(partial) = self
                .books
                .sites
                .get(&ord)
                .and_then(|b| b.partials.get(&version))
        {
            partial.check_buffered(&changes);
        }
        let changed = self.merge_all(origin, &changes, &mut batch.event)?;
        let book = self.books.sites.entry(ord).or_default();
        book.drop_partial(&self.conn, ord, version)?;
        book.mark(&self.conn, ord, version)?;
        Ok(Outcome::Applied { changed })
    }

    pub(crate) fn merge_all(
        &mut self,
        origin: Origin,
        changes: &[Change],
        event: &mut CommitEvent,
    ) -> Result<usize> {
        let mut changed_total = 0;
        let mut merger = RowMerger::new(&self.conn, &self.catalog.by_name, &self.books, origin);
        // The changes of one row come one after another (they were recorded that way).
        for row in changes.chunk_by(|a, b| a.table == b.table && a.pk == b.pk) {
            let (changed, parked) = merger.row(row)?;
            if changed > 0 {
                changed_total += changed;
                event
                    .changed
                    .push((row[0].table.clone(), row[0].pk.clone()));
            }
            self.shared
                .stats
                .parked_total
                .fetch_add(parked as u64, Ordering::Relaxed);
        }
        let (waited, saw_waiting) = (merger.waited(), merger.saw_waiting());
        merger.finish()?;
        self.shared
            .stats
            .merged_changes_total
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        if saw_waiting {
            self.shared.stats.count_waiting(&self.conn, waited)?;
        }
        Ok(changed_total)
    }

    /// Applies each changeset in a transaction of its own, so one that fails costs only itself.
    pub(crate) fn apply_one_by_one(&mut self, changesets: &[Changeset], wall_ms: u64) -> Applied {
        let mut total = Applied::default();
        for changeset in changesets {
            let one = std::slice::from_ref(changeset);
            match self.alone(|w, batch| w.run_apply(one, wall_ms, batch)) {
                Ok(applied) => total.absorb(applied),
                // Not the changeset's fault: it stays missing and is fetched again later.
                Err(StoreError::DiskFull { .. }) => {}
                Err(err) => total.absorb(rejected_all(one, &err)),
            }
        }
        total
    }
}

/// Every changeset refused for one reason.
pub(crate) fn rejected_all(changesets: &[Changeset], err: &StoreError) -> Applied {
    Applied {
        rejected: changesets
            .iter()
            .map(|c| Rejected {
                site: c.site,
                version: c.version,
                reason: err.to_string(),
            })
            .collect(),
        ..Applied::default()
    }
}

/// What applying one changeset did.
pub(super) enum Outcome {
    Applied {
        changed: usize,
    },
    Buffered,
    /// Whole, and recorded for a sliced merge after this commit.
    Sliced,
    Duplicate,
}
