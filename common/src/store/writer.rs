//! The writer: one thread that owns the writer connection and commits in groups.
//!
//! Requests (local transactions, remote changesets, schema changes) arrive on a bounded queue.
//! The writer takes whatever is queued (up to a bound, waiting briefly when several callers were
//! seen sharing commits), runs the requests in one SQLite transaction and commits once: under
//! load many requests share one commit. A request refused before it wrote anything (a malformed
//! changeset, an oversized transaction) is just left out; one that fails after it may have
//! written (bad SQL halfway through, a constraint) rolls the group back, and the group is run
//! again one request per transaction, so it fails alone. No savepoints: inside a savepoint every
//! statement of a large request costs time in proportion to the pages the request touched.
//!
//! A client's statements run under the writer rules (see `authorize`), are prepared under cache
//! keys the store's own SQL never uses, and stop at their deadline, when their caller goes away
//! or when the store closes (see `deadline`); a request stopped in a group is refused, not rerun,
//! when the group is retried request by request. A full disk answers `DiskFull`, is recorded
//! for health, and is cleared by the next successful commit.
//!
//! Replies and the commit event go out only after the commit, and the bookkeeping cache is
//! replaced only then, so nothing ever reports a version the database does not hold.
//!
//! Order of work in a group: requests in arrival order; then the heads and the clock are saved;
//! then COMMIT; then the caches are published, the commit event broadcast, and replies sent.
//!
//! ## Large remote versions: merged in slices, readers pinned
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
//!   claim the version before its last slice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, params_from_iter};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, Tokenizer};
use tokio::sync::oneshot;

use super::activity::Worker;
use super::apply::{self, Origin};
use super::book::{Books, Ord, Partial};
use super::capture::{Capture, CaptureError};
use super::change::Changeset;
use super::deadline::{self, Deadline, Guard};
use super::error::{Result, StoreError};
use super::hlc::{self, Clock, Observed};
use super::local::Recorder;
use super::meta;
use super::pin::{self, Pin};
use super::schema::{self, Schema};
use super::{
    Applied, Catalog, CommitEvent, Committed, MigrationReport, Rejected, Shared, Statement,
};

/// Starts the statement-cache key of every client statement (a comment, so SQLite ignores it):
/// the store's own SQL never starts with it, so a client's text never finds a statement that
/// was prepared, and authorized, for the store's own use.
const CLIENT_SQL_PREFIX: &str = "/* client */ ";

/// Requests a group commit takes at most; bounds the work (and latency) of one commit.
const GROUP_REQUESTS_MAX: usize = 256;

/// How long the writer waits for the callers of its last group to send again before it commits
/// what it has: bounds the latency added to a commit, and only applies once several callers were
/// seen sharing a commit (a lone caller never waits).
const GROUP_WAIT_MAX: Duration = Duration::from_micros(300);

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

/// The answer to a transaction. The statements travel back so that the caller's thread, not
/// the writer's, pays for freeing them (a measurable share of a batch's cost).
pub(crate) type TransactReply = (Result<Committed>, Vec<Statement>);

/// A request to the writer.
pub(crate) enum Request {
    Transact {
        statements: Vec<Statement>,
        /// When the client's statements must stop; `None` for the store's trusted callers.
        deadline: Option<Deadline>,
        reply: oneshot::Sender<TransactReply>,
    },
    Apply {
        changesets: Vec<Changeset>,
        reply: oneshot::Sender<Result<Applied>>,
    },
    Migrate {
        schema: Box<Schema>,
        reply: oneshot::Sender<Result<MigrationReport>>,
    },
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::Transact { .. } => "transact",
            Request::Apply { .. } => "apply",
            Request::Migrate { .. } => "migrate",
        }
    }
}

/// The writer's state; lives on the writer thread.
pub(crate) struct Writer {
    pub(crate) conn: Connection,
    pub(crate) capture: Arc<Capture>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) books: Books,
    pub(crate) clock: Clock,
    pub(crate) catalog: Arc<Catalog>,
    /// Set while user statements run, so the authorizer applies the user rules.
    pub(crate) user_mode: Arc<AtomicBool>,
    /// Why the authorizer last denied something.
    pub(crate) denied: Arc<Mutex<Option<String>>>,
    /// The clock value last persisted.
    pub(crate) hlc_saved: hlc::Timestamp,
    /// Stops client statements at their deadline or when the store closes.
    pub(crate) guard: Arc<Guard>,
    /// The database file, named when the disk is full.
    pub(crate) path: std::path::PathBuf,
    /// Large remote versions merged in slices, and the pin that hides them from readers.
    pub(crate) slicer: Slicer,
}

/// The sliced merges of large remote versions (see the module doc).
#[derive(Default)]
pub(crate) struct Slicer {
    /// Versions to merge, in arrival order; the first one is being merged.
    jobs: VecDeque<Sliced>,
    /// The pin while the first job runs.
    pin: Option<Pin>,
    /// The connection that holds pins, kept between them.
    holder: Option<Connection>,
    /// Rows changed by commits during the pin, announced when it ends.
    deferred: Vec<(String, Vec<u8>)>,
}

/// A large remote version being merged in slices.
struct Sliced {
    site: super::change::SiteId,
    origin: Origin,
    source: Source,
    /// Rows its slices changed so far.
    changed: usize,
    /// When its first slice began, and how many slices it took.
    started: Option<Instant>,
    slices: u32,
}

/// Where the changes of a sliced version come from.
enum Source {
    /// It arrived whole: its changes, and the index where the next slice starts.
    Memory {
        changes: Vec<super::change::Change>,
        next: usize,
    },
    /// Its chunks are buffered: the seq where the next slice starts.
    Buffered { next_seq: u32 },
}

impl Writer {
    /// Serves requests until every sender is gone, then shuts down cleanly.
    pub(crate) fn run(mut self, requests: flume::Receiver<Request>) {
        // How many requests the last group held: with several callers each waiting for its
        // reply before sending again, a commit is only shared if the writer waits for them.
        let mut expected = 1;
        self.resume_sliced();
        loop {
            // While a version is merged in slices, requests are served between two slices.
            let first = if self.slicer.jobs.is_empty() {
                match requests.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            } else {
                match requests.try_recv() {
                    Ok(first) => first,
                    Err(_) => {
                        self.shared.activity.begin(Worker::Writer);
                        self.slice(false);
                        self.shared.activity.end(Worker::Writer);
                        continue;
                    }
                }
            };
            let mut group = vec![first];
            let deadline = Instant::now() + GROUP_WAIT_MAX;
            while group.len() < GROUP_REQUESTS_MAX {
                let next = if group.len() < expected {
                    requests.recv_deadline(deadline).ok()
                } else {
                    requests.try_recv().ok()
                };
                match next {
                    Some(request) => group.push(request),
                    None => break,
                }
            }
            expected = group.len();
            self.shared.activity.begin(Worker::Writer);
            let mut pending = Vec::new();
            for request in group {
                match request {
                    Request::Migrate { schema, reply } => {
                        // A schema change commits alone, after what was queued before it, and
                        // after any sliced merge (it would change the tables under it).
                        self.commit_group(std::mem::take(&mut pending));
                        while !self.slicer.jobs.is_empty() {
                            self.slice(true);
                        }
                        let result = self.migrate(*schema);
                        let _ = reply.send(result);
                    }
                    other => pending.push(other),
                }
            }
            self.commit_group(pending);
            self.slice(false);
            self.shared.activity.end(Worker::Writer);
        }
        if let Err(err) = self.shutdown() {
            tracing::error!(error = %err, "store did not shut down cleanly");
        }
    }

    fn shutdown(&mut self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        self.conn.execute_batch("PRAGMA synchronous = FULL;")?;
        meta::set(&self.conn, "clean", &1)?;
        Ok(())
    }

    /// Commits a group: every request in one transaction; or, if one of them failed after it
    /// may have written, each request in a transaction of its own.
    fn commit_group(&mut self, group: Vec<Request>) {
        if group.is_empty() {
            return;
        }
        if group.len() > 1
            && let Some(results) = self.try_group(&group)
        {
            for (request, result) in group.into_iter().zip(results) {
                reply(request, result);
            }
            return;
        }
        for request in group {
            self.commit_alone(request);
        }
    }

    /// Runs a group in one transaction, without savepoints: a savepoint around a large request
    /// makes each of its statements cost time in proportion to the pages the request touched.
    /// Returns `None`, rolled back, when a request failed after it may have written.
    fn try_group(&mut self, group: &[Request]) -> Option<Vec<ItemResult>> {
        let wall_ms = self.shared.options.wall_clock.now_ms();
        self.run_sql("BEGIN IMMEDIATE").ok()?;
        let mut batch = Batch::default();
        let mut results = Vec::with_capacity(group.len());
        for request in group {
            let result = match request {
                Request::Transact {
                    statements,
                    deadline,
                    ..
                } => match self.run_transact(statements, deadline.as_ref(), wall_ms, &mut batch) {
                    Ok(committed) => ItemResult::Transact(Ok(committed)),
                    Err(Failure::Clean(err)) => ItemResult::Transact(Err(err)),
                    Err(Failure::Dirty(_)) => {
                        self.abort();
                        return None;
                    }
                },
                Request::Apply { changesets, .. } => {
                    match self.run_apply(changesets, wall_ms, &mut batch) {
                        Ok(applied) => ItemResult::Apply(applied),
                        Err(_) => {
                            self.abort();
                            return None;
                        }
                    }
                }
                Request::Migrate { .. } => unreachable!("migrations are split off before"),
            };
            results.push(result);
        }
        match self.commit(batch) {
            Ok(()) => Some(results),
            Err(err) => {
                tracing::warn!(error = %err, "group commit failed; retrying its requests one by one");
                None
            }
        }
    }

    /// Runs one request in a transaction of its own and replies.
    fn commit_alone(&mut self, request: Request) {
        let wall_ms = self.shared.options.wall_clock.now_ms();
        match request {
            Request::Transact {
                statements,
                deadline,
                reply,
            } => {
                let result = self.alone(|w, batch| {
                    w.run_transact(&statements, deadline.as_ref(), wall_ms, batch)
                });
                let _ = reply.send((result, statements));
            }
            Request::Apply { changesets, reply } => {
                let result = self.alone(|w, batch| w.run_apply(&changesets, wall_ms, batch));
                let result = match result {
                    // Not the changesets' fault: they are fetched again once space returns.
                    Err(err @ StoreError::DiskFull { .. }) => Err(err),
                    Err(_) if changesets.len() > 1 => {
                        Ok(self.apply_one_by_one(&changesets, wall_ms))
                    }
                    Err(err) => Ok(rejected_all(&changesets, &err)),
                    ok => ok,
                };
                let _ = reply.send(result);
            }
            Request::Migrate { schema, reply } => {
                let _ = reply.send(self.migrate(*schema));
            }
        }
    }

    /// Applies each changeset in a transaction of its own, so one that fails costs only itself.
    fn apply_one_by_one(&mut self, changesets: &[Changeset], wall_ms: u64) -> Applied {
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

    /// Runs `f` in a transaction of its own: committed if it succeeds, rolled back if not.
    fn alone<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Batch) -> Result<T, Failure>,
    ) -> Result<T> {
        if let Err(err) = self.run_sql("BEGIN IMMEDIATE") {
            return Err(self.storage_error(err, "could not begin a transaction"));
        }
        let mut batch = Batch::default();
        match f(self, &mut batch) {
            Ok(value) => {
                self.commit(batch)?;
                Ok(value)
            }
            Err(failure) => {
                self.abort();
                Err(self.disk_full(failure.into_error()))
            }
        }
    }

    /// The error for a failure of the store's own SQL: a full disk says so (and is recorded for
    /// health); anything else means the metadata cannot be trusted.
    fn storage_error(&self, err: rusqlite::Error, doing: &str) -> StoreError {
        match self.disk_full(StoreError::Sqlite(err)) {
            StoreError::Sqlite(err) => StoreError::Corrupt(format!("{doing}: {err}")),
            other => other,
        }
    }

    /// Turns SQLite's "disk full" into [`StoreError::DiskFull`] and records it for health; passes
    /// anything else through.
    fn disk_full(&self, err: StoreError) -> StoreError {
        let full = matches!(
            &err,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::DiskFull
        );
        if !full {
            return err;
        }
        let file = self.path.display().to_string();
        let dir = self
            .path
            .parent()
            .map_or_else(|| ".".to_owned(), |d| d.display().to_string());
        let activity = &self.shared.activity;
        if activity.disk_full().is_none() {
            tracing::error!(%file, %dir, "disk full: writes fail until space is freed");
            activity.set_disk_full(Some(format!("disk full: file system of {dir} ({file})")));
        }
        StoreError::DiskFull { file, dir }
    }

    /// Commits the open transaction, then publishes the bookkeeping and the commit event.
    fn commit(&mut self, batch: Batch) -> Result<()> {
        if let Err(err) = self.finish_group(&batch.touched) {
            let err = match self.disk_full(err) {
                err @ StoreError::DiskFull { .. } => err,
                err => {
                    tracing::error!(error = %err, "commit failed; rolled back");
                    StoreError::Corrupt(format!("commit failed: {err}"))
                }
            };
            self.abort();
            return Err(err);
        }
        if self.shared.activity.disk_full().is_some() {
            tracing::info!("a commit succeeded again: the disk has space");
            self.shared.activity.set_disk_full(None);
        }
        let stats = &self.shared.stats;
        if batch.slice {
            stats.slices_total.fetch_add(1, Ordering::Relaxed);
        }
        if batch.unpin {
            // Counted before the bookkeeping says the version is held.
            stats.sliced_versions_total.fetch_add(1, Ordering::Relaxed);
            stats.applied_versions_total.fetch_add(1, Ordering::Relaxed);
        }
        if batch.unpin
            && let Some(pin) = self.slicer.pin.take()
        {
            // Before the bookkeeping says the version is held, so no caller who sees it held
            // reads the state from before it.
            self.slicer.holder = Some(pin.release(&self.shared.pin));
        }
        self.publish();
        let mut event = batch.event;
        self.slicer.jobs.extend(batch.sliced);
        self.count_sliced_pending();
        if self.slicer.pin.is_some() {
            // Client queries cannot see these rows before the pin ends: announced then.
            self.slicer.deferred.append(&mut event.changed);
        } else {
            event.changed.append(&mut self.slicer.deferred);
        }
        event.changed.sort();
        event.changed.dedup();
        if !event.local.is_empty() || !event.changed.is_empty() || !event.applied.is_empty() {
            // No receiver is fine; a lagging one learns it lagged and recovers.
            let _ = self.shared.events.send(Arc::new(event));
        }
        Ok(())
    }

    /// Rolls the open transaction back and reloads the bookkeeping it may have changed.
    fn abort(&mut self) {
        if let Err(err) = self.run_sql("ROLLBACK") {
            tracing::error!(error = %err, "rollback failed");
        }
        self.reload();
    }

    fn finish_group(&mut self, touched: &HashSet<Ord>) -> Result<()> {
        let own = self.shared.ord;
        for ord in touched {
            if let Some(book) = self.books.sites.get(ord).filter(|_| *ord != own) {
                book.save_head(&self.conn, *ord)?;
            }
        }
        // Our head and the clock share a row: one page written per commit, not two.
        let last = self.clock.last();
        if touched.contains(&own) || last > self.hlc_saved {
            let head = self.books.sites.get(&own).map_or(0, |b| b.head);
            self.conn
                .prepare_cached("UPDATE __strata_sites SET head = ?2, hlc = ?3 WHERE ord = ?1")?
                .execute(rusqlite::params![
                    own,
                    super::book::to_sql(head),
                    last.as_sql()
                ])?;
        }
        self.run_sql("COMMIT")?;
        self.hlc_saved = last;
        self.shared
            .stats
            .commits_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes the bookkeeping cache after a commit.
    fn publish(&self) {
        let mut shared = self
            .shared
            .books
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        shared.clone_from(&self.books);
    }

    /// Reloads the bookkeeping from the database after a failed commit.
    fn reload(&mut self) {
        match Books::load(&self.conn) {
            Ok(books) => self.books = books,
            Err(err) => tracing::error!(error = %err, "could not reload bookkeeping"),
        }
    }

    /// Runs one fixed statement (transaction control), prepared once.
    fn run_sql(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.raw_execute().map(|_| ())
    }

    // ---- local transactions ----

    /// Runs a local transaction inside the open one.
    fn run_transact(
        &mut self,
        statements: &[Statement],
        deadline: Option<&Deadline>,
        wall_ms: u64,
        batch: &mut Batch,
    ) -> Result<Committed, Failure> {
        if self.guard.closing() {
            return Err(Failure::Clean(StoreError::Closed));
        }
        // Not run at all when its caller gave up or its time passed while it was queued: a
        // request stopped in a group is refused here when the group is run again request by
        // request, so it never runs twice.
        if let Some(why) = deadline.and_then(Deadline::stop) {
            let deadline = deadline.unwrap_or_else(|| unreachable!("stop came from it"));
            self.count_stopped();
            return Err(Failure::Clean(deadline.error(why, "transaction")));
        }
        let limits = &self.shared.options;
        if statements.len() > limits.statements_max {
            return Err(Failure::Clean(StoreError::TooLarge {
                what: "statement count",
                size: statements.len(),
                limit: limits.statements_max,
            }));
        }
        let ord = self.shared.ord;
        let head = self.books.sites.get(&ord).map_or(0, |b| b.head);
        let ts = self.clock.tick(wall_ms);
        let version = head + 1;
        self.guard.arm(deadline);
        let result = self
            .run_statements(statements, deadline, version, ts)
            .map_err(|(completed, err)| {
                // The store's bookkeeping SQL between client statements can be stopped too.
                match deadline::stopped(&self.guard, deadline, "transaction") {
                    Some(stopped) => {
                        self.count_stopped();
                        (completed, stopped)
                    }
                    None => (completed, err),
                }
            });
        self.guard.disarm();
        self.capture.set_capturing(false);
        self.user_mode.store(false, Ordering::Relaxed);
        let (rows_affected, recorder) = result.map_err(|(completed, err)| {
            // SQLite undoes a failed statement by itself, so a request whose first statement
            // failed wrote nothing, unless the failure ended the whole transaction (an
            // interrupt, a full disk): the group goes on without it instead of being rerun
            // request by request, which a client sending refused writes in a loop would
            // otherwise force on every group.
            if completed == 0 && !self.conn.is_autocommit() {
                Failure::Clean(err)
            } else {
                Failure::Dirty(err)
            }
        })?;
        let Some(changeset) = recorder.finish() else {
            return Ok(Committed {
                version: None,
                ts,
                rows_affected,
                changeset: None,
            });
        };
        // Cells that waited for a row life this transaction's inserts began merge now.
        let waited = apply::local_lives_arrived(
            &self.conn,
            &self.catalog.by_name,
            &self.books,
            &changeset.changes,
        )
        .map_err(Failure::Dirty)?;
        if waited {
            self.shared
                .stats
                .count_waiting(&self.conn, 0)
                .map_err(Failure::Dirty)?;
        }
        self.books.sites.entry(ord).or_default().head = version;
        self.shared
            .stats
            .local_versions_total
            .fetch_add(1, Ordering::Relaxed);
        let changeset = Arc::new(changeset);
        batch.touched.insert(ord);
        batch.event.local.push(Arc::clone(&changeset));
        batch.event.changed.extend(
            changeset
                .changes
                .iter()
                .map(|c| (c.table.clone(), c.pk.clone())),
        );
        Ok(Committed {
            version: Some(version),
            ts,
            rows_affected,
            changeset: Some(changeset),
        })
    }

    fn run_statements(
        &self,
        statements: &[Statement],
        deadline: Option<&Deadline>,
        version: u64,
        ts: hlc::Timestamp,
    ) -> Result<(Vec<usize>, Recorder), (usize, StoreError)> {
        let mut recorder = Recorder::new(self.shared.site, self.shared.ord, version, ts);
        let mut rows_affected = Vec::with_capacity(statements.len());
        self.capture.begin(self.shared.options.cells_max);
        // Batches usually repeat one statement with different parameters: prepare it once.
        let mut prepared: Option<(&str, rusqlite::CachedStatement<'_>)> = None;
        for (index, statement) in statements.iter().enumerate() {
            if prepared
                .as_ref()
                .is_none_or(|(sql, _)| *sql != statement.sql)
            {
                // Back to the cache before the next one is prepared.
                drop(prepared.take());
                check_statement(index, statement, self.shared.options.sql_bytes_max)
                    .map_err(|err| (index, err))?;
                let stmt = self.user_statement(|| self.prepare(&statement.sql));
                prepared = Some((
                    &statement.sql,
                    stmt.map_err(|err| (index, self.classify(index, deadline, err)))?,
                ));
            }
            let Some((_, stmt)) = prepared.as_mut() else {
                unreachable!("prepared just above");
            };
            let params = params_from_iter(statement.params.iter());
            let affected = self
                .user_statement(|| stmt.execute(params))
                .map_err(|err| (index, self.classify(index, deadline, err)))?;
            if self.conn.is_autocommit() {
                // The authorizer refuses transaction control; this is the second line of defence.
                return Err((
                    index,
                    StoreError::Refused {
                        index,
                        reason: "the statement ended the request's transaction".into(),
                    },
                ));
            }
            rows_affected.push(affected);
            recorder
                .record(&self.conn, self.capture.take(), index)
                .map_err(|err| (index + 1, err))?;
        }
        Ok((rows_affected, recorder))
    }

    /// Runs `f` under the user rules (authorizer) with capture on.
    fn user_statement<T>(&self, f: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        self.capture.set_capturing(true);
        self.user_mode.store(true, Ordering::Relaxed);
        let result = f();
        self.user_mode.store(false, Ordering::Relaxed);
        self.capture.set_capturing(false);
        result
    }

    /// Prepares a client's statement under a cache key the store's own SQL never has, so that no
    /// text a client sends can reach a statement prepared (and authorized) for the store's use.
    fn prepare(&self, sql: &str) -> rusqlite::Result<rusqlite::CachedStatement<'_>> {
        let mut keyed = String::with_capacity(CLIENT_SQL_PREFIX.len() + sql.len());
        keyed.push_str(CLIENT_SQL_PREFIX);
        keyed.push_str(sql);
        let stmt = self.conn.prepare_cached(&keyed).map_err(|err| match err {
            rusqlite::Error::SqlInputError {
                error,
                msg,
                sql,
                offset,
            } => rusqlite::Error::SqlInputError {
                error,
                msg,
                sql,
                // Offsets count from the client's text, not from the prefix.
                offset: offset.saturating_sub(CLIENT_SQL_PREFIX.len() as i32),
            },
            other => other,
        })?;
        if stmt.column_count() > 0 {
            // A read, or a write with RETURNING: either way rows nobody would see.
            return Err(rusqlite::Error::ExecuteReturnedResults);
        }
        Ok(stmt)
    }

    fn count_stopped(&self) {
        self.shared
            .stats
            .stopped_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Turns a SQLite error from a user statement into the precise store error.
    fn classify(
        &self,
        index: usize,
        deadline: Option<&Deadline>,
        err: rusqlite::Error,
    ) -> StoreError {
        if let Some(stopped) =
            deadline::stopped(&self.guard, deadline, &format!("statement {index}"))
        {
            self.count_stopped();
            return stopped;
        }
        if let Some(captured) = self.capture.take_error() {
            return match captured {
                CaptureError::TooManyCells { limit } => StoreError::TooLarge {
                    what: "cells changed by one transaction",
                    size: limit + 1,
                    limit,
                },
                CaptureError::KeyUpdate { .. } | CaptureError::Unreplicable { .. } => {
                    StoreError::Refused {
                        index,
                        reason: captured.to_string(),
                    }
                }
                CaptureError::Key { .. } => StoreError::Constraint {
                    index,
                    message: captured.to_string(),
                },
                other => StoreError::Corrupt(other.to_string()),
            };
        }
        if let rusqlite::Error::SqliteFailure(code, _) = &err
            && code.code == ErrorCode::TooBig
        {
            // Built past the writer's length limit inside an expression: SQLite cannot say which
            // column it was meant for, so the answer names the limits.
            return StoreError::Refused {
                index,
                reason: format!(
                    "a value or row is over {} bytes, the most the writer builds; a replicated                      value may be at most {} bytes",
                    super::WRITER_VALUE_BYTES_MAX,
                    super::CELL_BYTES_MAX
                ),
            };
        }
        let denied = self
            .denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // A refusal by the authorizer surfaces as SQLITE_AUTH or, for functions, as a plain
        // error: either way the authorizer's reason is the precise one.
        match (statement_error(index, err), denied) {
            (_, Some(reason)) => StoreError::Refused { index, reason },
            (other, None) => other,
        }
    }

    // ---- remote changes ----

    /// Applies remote changesets inside the open transaction. A changeset refused before it
    /// wrote anything is reported and skipped; a failure after it may have written aborts.
    fn run_apply(
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
        partial.have.insert(changeset.seqs());
        let complete = partial.is_complete();
        let mut buffer = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO __strata_buffered (ord, version, seq, tbl, pk, col, val, cl)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for change in &changeset.changes {
            buffer.execute(rusqlite::params![
                ord,
                super::book::to_sql(version),
                change.seq,
                change.table,
                change.pk,
                change.column.as_deref().unwrap_or(super::table::ROW_EVENT),
                change.value,
                super::book::to_sql(change.cl),
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
        let changed = self.merge_all(origin, &changes, &mut batch.event)?;
        let book = self.books.sites.entry(ord).or_default();
        book.drop_partial(&self.conn, ord, version)?;
        book.mark(&self.conn, ord, version)?;
        Ok(Outcome::Applied { changed })
    }

    fn merge_all(
        &mut self,
        origin: Origin,
        changes: &[super::change::Change],
        event: &mut CommitEvent,
    ) -> Result<usize> {
        let mut changed_total = 0;
        let mut merger =
            apply::RowMerger::new(&self.conn, &self.catalog.by_name, &self.books, origin);
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

    // ---- sliced merges of large remote versions ----

    /// Whether one more version may wait for a sliced merge (see [`SLICED_VERSIONS_MAX`]).
    fn can_slice(&self, batch: &Batch) -> bool {
        self.slicer.jobs.len() + batch.sliced.len() < SLICED_VERSIONS_MAX
    }

    fn count_sliced_pending(&self) {
        self.shared
            .stats
            .sliced_pending
            .store(self.slicer.jobs.len() as u64, Ordering::Relaxed);
    }

    /// Versions whose chunks were all buffered but which were not merged whole (a crash between
    /// slices): merged again from the buffer, in slices.
    fn resume_sliced(&mut self) {
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
    fn slice(&mut self, whole: bool) {
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
                        super::book::to_sql(origin.version),
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

    // ---- schema ----

    fn migrate(&mut self, desired: Schema) -> Result<MigrationReport> {
        let plan =
            schema::plan(&self.catalog.schema, &desired).map_err(StoreError::SchemaRefused)?;
        if plan.is_empty() {
            return Ok(MigrationReport::default());
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match self.migrate_in_transaction(&desired, &plan) {
            Ok((report, catalog)) => {
                if let Err(err) = self.conn.execute_batch("COMMIT") {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.reload();
                    return Err(err.into());
                }
                self.install(catalog);
                self.publish();
                Ok(report)
            }
            Err(err) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.reload();
                Err(err)
            }
        }
    }

    fn migrate_in_transaction(
        &mut self,
        desired: &Schema,
        plan: &schema::Plan,
    ) -> Result<(MigrationReport, Arc<Catalog>)> {
        let refused = |table: &str, column: Option<&str>, err: rusqlite::Error| {
            StoreError::SchemaRefused(schema::SchemaRefusal {
                table: table.to_owned(),
                column: column.map(str::to_owned),
                reason: schema::Refusal::Sqlite(err.to_string()),
            })
        };
        let mut report = MigrationReport::default();
        let mut tids: HashMap<String, i64> = self
            .catalog
            .by_name
            .iter()
            .map(|(name, t)| (name.clone(), t.tid))
            .collect();
        // Table ids are never reused, so metadata of one table never lands in another's.
        let first_tid = tids.values().copied().max().unwrap_or(0) + 1;
        for (tid, table) in (first_tid..).zip(&plan.new_tables) {
            self.conn
                .execute_batch(table.ddl())
                .map_err(|err| refused(table.name(), None, err))?;
            tids.insert(table.name().to_owned(), tid);
            report.tables_created.push(table.name().to_owned());
        }
        for (table, column) in &plan.new_columns {
            self.conn
                .execute_batch(&format!(
                    "ALTER TABLE {} ADD COLUMN {}",
                    schema::quote(table),
                    column.definition()
                ))
                .map_err(|err| refused(table, Some(column.name()), err))?;
            report
                .columns_added
                .push(format!("{table}.{}", column.name()));
        }
        for index in &plan.drop_indexes {
            self.conn
                .execute_batch(&format!("DROP INDEX IF EXISTS {}", schema::quote(index)))?;
            self.conn
                .execute("DELETE FROM __strata_indexes WHERE name = ?1", [index])?;
            report.indexes_dropped.push(index.clone());
        }
        for index in &plan.create_indexes {
            self.conn
                .execute_batch(index.ddl())
                .map_err(|err| refused(index.table(), None, err))?;
            self.conn.execute(
                "INSERT INTO __strata_indexes (name, tbl, ddl) VALUES (?1, ?2, ?3)",
                [index.name(), index.table(), index.ddl()],
            )?;
            report.indexes_created.push(index.name().to_owned());
        }
        let changed: HashSet<&str> = plan
            .new_tables
            .iter()
            .map(|t| t.name())
            .chain(plan.new_columns.iter().map(|(t, _)| t.as_str()))
            .collect();
        let catalog = Arc::new(Catalog::new(desired.clone(), &tids));
        for name in &changed {
            let table = catalog.by_name.get(*name).ok_or_else(|| {
                StoreError::Corrupt(format!("migrated table {name} is not in the catalog"))
            })?;
            self.conn.execute_batch(&table.metadata_ddl())?;
            self.conn.execute_batch(&table.trigger_ddl())?;
            self.conn.execute(
                "INSERT INTO __strata_tables (name, tid, ddl) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET ddl = excluded.ddl",
                rusqlite::params![table.name(), table.tid, table.def.ddl()],
            )?;
        }
        let version: i64 = meta::get(&self.conn, "schema_version")?.unwrap_or(0);
        meta::set(&self.conn, "schema_version", &(version + 1))?;
        // Changes parked for what now exists are merged by the usual rules (a cell whose row
        // life has not arrived goes on to wait for it).
        let mut waited = 0;
        for name in changed {
            for parked in apply::parked_for(&self.conn, name)? {
                let known = match &parked.change.column {
                    None => true,
                    Some(column) => catalog
                        .by_name
                        .get(name)
                        .is_some_and(|t| t.tracked_position(column).is_some()),
                };
                if known {
                    let merged = apply::merge(
                        &self.conn,
                        &catalog.by_name,
                        &self.books,
                        parked.origin,
                        &parked.change,
                    )?;
                    apply::unpark(&self.conn, &parked)?;
                    report.parked_merged += 1;
                    if merged == apply::Merged::Waiting {
                        waited += 1;
                    }
                }
            }
        }
        self.shared.stats.count_waiting(&self.conn, waited)?;
        Ok((report, catalog))
    }

    /// Makes a catalog current for the writer, the capture functions and the readers.
    pub(crate) fn install(&mut self, catalog: Arc<Catalog>) {
        self.capture.set_tables(catalog.by_tid.clone());
        *self
            .shared
            .catalog
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&catalog);
        self.catalog = catalog;
    }
}

/// How a request of a group failed.
enum Failure {
    /// Refused before it wrote anything: the transaction goes on without it.
    Clean(StoreError),
    /// Failed after it may have written: the transaction must be rolled back.
    Dirty(StoreError),
}

impl Failure {
    fn into_error(self) -> StoreError {
        match self {
            Failure::Clean(err) | Failure::Dirty(err) => err,
        }
    }
}

/// What a transaction's requests changed, published after its commit.
#[derive(Default)]
struct Batch {
    touched: HashSet<Ord>,
    event: CommitEvent,
    /// Large versions this transaction recorded for a sliced merge, adopted after its commit.
    sliced: Vec<Sliced>,
    /// This transaction ends a sliced merge: client reads are unpinned right after its commit.
    unpin: bool,
    /// This transaction is a slice of a sliced merge.
    slice: bool,
}

/// The result of a request of a group, replied after the commit.
enum ItemResult {
    Transact(Result<Committed>),
    Apply(Applied),
}

fn reply(request: Request, result: ItemResult) {
    match (request, result) {
        (
            Request::Transact {
                statements, reply, ..
            },
            ItemResult::Transact(result),
        ) => {
            let _ = reply.send((result, statements));
        }
        (Request::Apply { reply, .. }, ItemResult::Apply(applied)) => {
            let _ = reply.send(Ok(applied));
        }
        (request, _) => unreachable!("a result always matches its request: {}", request.kind()),
    }
}

/// Joins chunks of one version that arrived together and cover it whole, so the version is
/// merged at once instead of going through the buffer of partial versions (written to disk and
/// read back). Chunks that do not complete a version pass through as they are.
fn reassemble(changesets: &[Changeset]) -> Vec<std::borrow::Cow<'_, Changeset>> {
    use std::borrow::Cow;
    let mut chunks: HashMap<(super::change::SiteId, u64), Vec<&Changeset>> = HashMap::new();
    for changeset in changesets {
        if !changeset.is_complete() {
            chunks
                .entry((changeset.site, changeset.version))
                .or_default()
                .push(changeset);
        }
    }
    let mut joined: HashMap<(super::change::SiteId, u64), Changeset> = HashMap::new();
    for (key, mut parts) in chunks {
        parts.sort_by_key(|c| c.seq_first);
        let last_seq = parts.iter().map(|c| c.last_seq).min().unwrap_or(0);
        let mut covered: Option<u32> = None;
        for part in &parts {
            let contiguous = match covered {
                None => part.seq_first == 0,
                Some(end) => part.seq_first <= end.saturating_add(1),
            };
            if !contiguous {
                break;
            }
            covered = Some(covered.map_or(part.seq_last, |end| end.max(part.seq_last)));
        }
        if covered.is_none_or(|end| end < last_seq) || parts.iter().any(|p| p.validate().is_err()) {
            continue;
        }
        let mut changes: Vec<super::change::Change> = parts
            .iter()
            .flat_map(|p| p.changes.iter().cloned())
            .collect();
        changes.sort_by_key(|c| c.seq);
        changes.dedup_by_key(|c| c.seq);
        let first = parts[0];
        joined.insert(
            key,
            Changeset {
                site: first.site,
                version: first.version,
                ts: first.ts,
                seq_first: 0,
                seq_last: last_seq.max(changes.last().map_or(0, |c| c.seq)),
                last_seq: last_seq.max(changes.last().map_or(0, |c| c.seq)),
                changes,
            },
        );
    }
    let mut out = Vec::with_capacity(changesets.len());
    let mut placed = std::collections::HashSet::new();
    for changeset in changesets {
        let key = (changeset.site, changeset.version);
        if changeset.is_complete() {
            out.push(Cow::Borrowed(changeset));
        } else if let Some(whole) = joined.remove(&key) {
            out.push(Cow::Owned(whole));
            placed.insert(key);
        } else if !placed.contains(&key) {
            // A chunk that stays partial.
            out.push(Cow::Borrowed(changeset));
        }
    }
    out
}

/// Every changeset refused for one reason.
fn rejected_all(changesets: &[Changeset], err: &StoreError) -> Applied {
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
enum Outcome {
    Applied {
        changed: usize,
    },
    Buffered,
    /// Whole, and recorded for a sliced merge after this commit.
    Sliced,
    Duplicate,
}

/// Buffered changes of a version from seq `from`, at most `limit` of them, in seq order.
fn buffered_changes(
    conn: &Connection,
    ord: Ord,
    version: u64,
    from: u32,
    limit: usize,
) -> Result<Vec<super::change::Change>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, tbl, pk, col, val, cl FROM __strata_buffered
         WHERE ord = ?1 AND version = ?2 AND seq >= ?3 ORDER BY seq LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        rusqlite::params![
            ord,
            super::book::to_sql(version),
            from,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |row| {
            let col: String = row.get(3)?;
            Ok(super::change::Change {
                table: row.get(1)?,
                pk: row.get(2)?,
                column: if col == super::table::ROW_EVENT {
                    None
                } else {
                    Some(col)
                },
                value: row.get(4)?,
                cl: super::book::from_sql(row.get(5)?),
                seq: row.get(0)?,
            })
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Refuses statement forms replication cannot allow, before SQLite sees them: `INSERT OR
/// REPLACE`, `REPLACE INTO` and `UPDATE OR REPLACE` delete rows without telling the triggers.
fn check_statement(index: usize, statement: &Statement, sql_bytes_max: usize) -> Result<()> {
    if statement.sql.len() > sql_bytes_max {
        return Err(StoreError::TooLarge {
            what: "statement SQL in bytes",
            size: statement.sql.len(),
            limit: sql_bytes_max,
        });
    }
    // Tokenizing costs more than running a typical statement; most never mention the word.
    let sql = statement.sql.as_bytes();
    let mentions_replace = sql.iter().enumerate().any(|(i, &b)| {
        b | 0x20 == b'r'
            && sql
                .get(i..i + 7)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"replace"))
    });
    if !mentions_replace {
        return Ok(());
    }
    let tokens = Tokenizer::new(&SQLiteDialect {}, &statement.sql)
        .tokenize()
        .map_err(|err| StoreError::BadStatement {
            index,
            message: err.to_string(),
        })?;
    let words: Vec<&Token> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let keyword = |t: Option<&&Token>, k: Keyword| matches!(t, Some(Token::Word(w)) if w.keyword == k && w.quote_style.is_none());
    for (i, token) in words.iter().enumerate() {
        let replace_here = keyword(Some(token), Keyword::REPLACE);
        if !replace_here {
            continue;
        }
        let or_before = i > 0 && keyword(words.get(i - 1), Keyword::OR);
        let call = matches!(words.get(i + 1), Some(Token::LParen));
        let into_after = keyword(words.get(i + 1), Keyword::INTO);
        if (or_before && !call) || into_after {
            return Err(StoreError::Refused {
                index,
                reason: "INSERT OR REPLACE / REPLACE is refused on replicated tables: it deletes \
                         rows behind replication's back. Use INSERT ... ON CONFLICT (key) DO \
                         UPDATE SET ..."
                    .into(),
            });
        }
    }
    Ok(())
}

/// The precise store error for a SQLite error of a user statement (bad SQL, unknown table,
/// constraint, refused by the authorizer); I/O and internal failures stay `Sqlite`.
pub(crate) fn statement_error(index: usize, err: rusqlite::Error) -> StoreError {
    let unknown_or_bad = |message: String| match message.strip_prefix("no such table: ") {
        Some(table) => StoreError::UnknownTable {
            index,
            table: table.to_owned(),
        },
        None => StoreError::BadStatement { index, message },
    };
    match err {
        rusqlite::Error::SqliteFailure(code, message) => {
            let message = message.unwrap_or_else(|| code.to_string());
            match code.code {
                ErrorCode::AuthorizationForStatementDenied => StoreError::Refused {
                    index,
                    reason: message,
                },
                ErrorCode::ConstraintViolation => StoreError::Constraint { index, message },
                ErrorCode::Unknown
                | ErrorCode::ApiMisuse
                | ErrorCode::TypeMismatch
                | ErrorCode::TooBig
                | ErrorCode::ParameterOutOfRange => unknown_or_bad(message),
                _ => StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, Some(message))),
            }
        }
        rusqlite::Error::ExecuteReturnedResults => StoreError::BadStatement {
            index,
            message: "statement returns rows; use a query for reads".into(),
        },
        rusqlite::Error::MultipleStatement => StoreError::BadStatement {
            index,
            message: "one statement per entry; split the SQL".into(),
        },
        rusqlite::Error::InvalidParameterCount(got, expected) => StoreError::BadStatement {
            index,
            message: format!("statement takes {expected} parameters, {got} given"),
        },
        rusqlite::Error::SqlInputError {
            error, msg, offset, ..
        } => {
            if error.code == ErrorCode::AuthorizationForStatementDenied {
                StoreError::Refused { index, reason: msg }
            } else if msg.starts_with("no such table: ") {
                unknown_or_bad(msg)
            } else {
                StoreError::BadStatement {
                    index,
                    message: format!("{msg} (at offset {offset})"),
                }
            }
        }
        other => StoreError::BadStatement {
            index,
            message: other.to_string(),
        },
    }
}
